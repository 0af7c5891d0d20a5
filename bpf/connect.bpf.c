// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/connect4 and cgroup/connect6: steer a pod's TCP connects to its
 * sidecar, the way Istio's OUTPUT rules (iptables and ip6tables) would, before
 * a single packet exists.
 *
 *  - in a pod whose mesh captures DNS, the app's UDP and TCP connects to port
 *    53 go to 127.0.0.1:<dns_port> (unconnected UDP: dns.bpf.c); *
 *  - the app's connect to a remote destination goes to 127.0.0.1:<outbound>;
 *  - the sidecar's connect to a meshed pod on this node goes straight to that
 *    pod's <inbound> listener, skipping the PREROUTING redirect;
 *  - the sidecar's connect to its own pod (the inbound passthrough) is left
 *    as it is, only marked for socket-to-socket acceleration.
 *
 * An IPv4-mapped destination on an IPv6 socket is the IPv4 connection it is
 * (iptables' rules, not ip6tables', see its packets): it is steered as
 * connect4 steers, to ::ffff:127.0.0.1. A pure IPv6 one goes to [::1], where
 * ip6tables' REDIRECT sends it. A pod is steered only in the families it has
 * an address of.
 *
 * What connect4 learns (the original destination, which ends may receive
 * redirected bytes) is kept in the socket's storage until sockops, once the
 * connection is established, hands it to the accepting socket.
 */
#include "helpers.h"

const volatile struct datapath_config config = {};

/*
 * Where a connect is going, in the one address form of the maps. ipv4: an IPv4
 * connection (connect4, or an IPv4-mapped address on an IPv6 socket).
 */
struct destination {
	struct ip_address ip;
	__be16 port;
	bool ipv4;
};

/*
 * What sockops will need once the connection is established, on the socket
 * itself; `own` is the pod's address of the connection's family.
 */
static __always_inline bool remember_connect(struct bpf_sock_addr *ctx,
					     const struct destination *dst,
					     const struct ip_address *own, __u16 flags)
{
	struct socket_state *state = NULL;

	if (ctx->sk)
		state = bpf_sk_storage_get(&socket_states, ctx->sk, NULL,
					   BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return false;
	}
	state->conn.original_ip = dst->ip;
	state->conn.original_port = dst->port;
	state->conn.flags = flags;
	state->conn.client_ip = *own;
	state->flags = 0;
	return true;
}

static __always_inline bool outbound_cidr_included(const struct pod_info *pod, __u64 pod_cgroup_id,
						   const struct destination *dst)
{
	struct pod_cidr_key key = {};

	key.prefixlen = POD_CIDR_PREFIX_BITS + 128;
	key.family = dst->ipv4 ? AF_INET : AF_INET6;
	key.pod_cgroup_id = pod_cgroup_id;
	key.addr = dst->ip;
	if (bpf_map_lookup_elem(&outbound_excluded_cidrs, &key))
		return false; /* exclusions win over inclusions, as in istio-iptables */
	if (pod->flags & POD_OUTBOUND_INCLUDE_ALL)
		return true;
	return bpf_map_lookup_elem(&outbound_included_cidrs, &key) != NULL;
}

/*
 * An application's socket receives redirected bytes only in a pod that opted
 * in, or everywhere on a kernel whose splice() reads them.
 */
static __always_inline __u16 app_takes_msg(const struct pod_info *pod, __u16 flag)
{
	if (config.features & FEATURE_SK_MSG_TO_EVERY_APP)
		return flag;
	return pod->flags & POD_SK_MSG_TO_APP ? flag : 0;
}

/*
 * Whether this application hop should stay on TCP: the pod's connections are
 * short-lived (app_reuse, taught by sk_msg), as when an application opens a
 * connection per request, and it keeps making them. Every APP_REUSE_PROBE-th
 * such hop joins anyway: one that sends twice makes the pod learn anew, as
 * does a pause in its connects (a pod that connects rarely gains nothing from
 * skipping, and its next connection may well be a long one).
 */
static __always_inline bool app_hop_on_tcp(const struct ip_address *own)
{
	struct app_reuse *reuse = bpf_map_lookup_elem(&app_reuse, own);
	__u64 now, last;

	if (!reuse)
		return false;
	now = bpf_ktime_get_ns();
	last = reuse->last_connect_ns;
	reuse->last_connect_ns = now;
	if (now - last >= APP_REUSE_PAUSE_NS) {
		learn_anew(reuse);
		return false;
	}
	if (!short_lived(reuse))
		return false;
	/* Racing connects may share a count: the probes only need to keep coming. */
	if (reuse->skipped++ % APP_REUSE_PROBE == 0)
		return false;
	count(COUNTER_APP_HOP_ON_TCP, 1);
	return true;
}

/*
 * The sk_msg roles of an application hop (app_is_client: the application's
 * end connects): the sidecar's end takes redirected bytes, the application's
 * too where app_takes_msg() allows; none while the pod's connections are
 * short-lived.
 */
static __always_inline __u16 app_hop_roles(const struct pod_info *pod,
					   const struct ip_address *own, bool app_is_client)
{
	__u16 sidecar_takes = app_is_client ? CONNECTION_SERVER_TAKES_MSG : CONNECTION_CLIENT_TAKES_MSG;
	__u16 app_takes = app_is_client ? CONNECTION_CLIENT_TAKES_MSG : CONNECTION_SERVER_TAKES_MSG;
	__u16 app_is = app_is_client ? CONNECTION_CLIENT_IS_APP : CONNECTION_SERVER_IS_APP;

	if (!(config.features & FEATURE_SK_MSG_REDIRECT) || app_hop_on_tcp(own))
		return 0;
	return sidecar_takes | app_takes_msg(pod, app_takes) | app_is;
}

/* Loopback (127/8, ::1, and :: which connects to it), or the pod's own address. */
static __always_inline bool is_local(const struct destination *dst, const struct ip_address *own)
{
	if (dst->ipv4)
		return is_loopback(dst->ip.word[3]) || dst->ip.word[3] == own->word[3];
	return is_ipv6_loopback(&dst->ip) || is_zero(&dst->ip) || same_address(&dst->ip, own);
}

static __always_inline int redirect_outbound(struct bpf_sock_addr *ctx, const struct pod_info *pod,
					     __u64 pod_cgroup_id, const struct destination *dst,
					     const struct ip_address *own, bool ipv6_socket)
{
	struct ip_address sidecar;

	/* Istio returns traffic over lo untouched: loopback and the pod's own address. */
	if (is_local(dst, own)) {
		count(COUNTER_BYPASS_LOCAL_DESTINATION, 1);
		return ALLOW;
	}
	if (pod_port_excluded(pod_cgroup_id, dst->port, DIRECTION_OUTBOUND)) {
		count(COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED, 1);
		return ALLOW;
	}
	if (!outbound_cidr_included(pod, pod_cgroup_id, dst)) {
		count(COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED, 1);
		return ALLOW;
	}
	/* Without a record the sidecar could not learn where to go: leave it to iptables. */
	if (!remember_connect(ctx, dst, own, CONNECTION_REWRITTEN | app_hop_roles(pod, own, true)))
		return ALLOW;

	/* 127.0.0.1 or [::1], as iptables' or ip6tables' REDIRECT does for OUTPUT */
	set_localhost(&sidecar, dst->ipv4);
	steer(ctx, ipv6_socket, &sidecar, pod->outbound_port);
	count(COUNTER_CONNECT_OUTBOUND_REDIRECTED, 1);
	return ALLOW;
}

/* Never steer to a listener known to be closed (maps.h, inbound_listeners). */
static __always_inline bool inbound_listener_may_be_open(__u64 pod_cgroup_id)
{
	__u32 *listeners = bpf_map_lookup_elem(&inbound_listeners, &pod_cgroup_id);

	return !listeners || *listeners > 0;
}

static __always_inline int redirect_sidecar(struct bpf_sock_addr *ctx, const struct pod_info *pod,
					    __u64 pod_cgroup_id, const struct destination *dst,
					    const struct ip_address *own)
{
	struct pod_info *peer;
	__u64 *peer_cgroup_id;

	peer_cgroup_id = bpf_map_lookup_elem(&pod_ips, &dst->ip);
	if (!peer_cgroup_id) {
		count(COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION, 1);
		return ALLOW;
	}
	if (*peer_cgroup_id == pod_cgroup_id) {
		/* Inbound passthrough to the app: the address stays, the bytes may skip TCP. */
		__u16 roles = app_hop_roles(pod, own, false);

		if (roles)
			remember_connect(ctx, dst, own, roles);
		count(COUNTER_CONNECT_SIDECAR_TO_OWN_POD, 1);
		return ALLOW;
	}
	if (!(config.features & FEATURE_SAME_NODE_INBOUND)) {
		count(COUNTER_BYPASS_SAME_NODE_INBOUND_DISABLED, 1);
		return ALLOW;
	}
	peer = bpf_map_lookup_elem(&pods, peer_cgroup_id);
	if (!peer) {
		count(COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION, 1);
		return ALLOW;
	}
	if (pod_port_excluded(*peer_cgroup_id, dst->port, DIRECTION_INBOUND)) {
		count(COUNTER_BYPASS_INBOUND_PORT_EXCLUDED, 1);
		return ALLOW;
	}
	if (!inbound_listener_may_be_open(*peer_cgroup_id)) {
		count(COUNTER_BYPASS_NO_INBOUND_LISTENER, 1);
		return ALLOW;
	}
	if (!remember_connect(ctx, dst, own,
			      CONNECTION_REWRITTEN | CONNECTION_CLIENT_TAKES_MSG |
				      CONNECTION_SERVER_TAKES_MSG))
		return ALLOW;

	ctx->user_port = peer->inbound_port;
	count(COUNTER_CONNECT_INBOUND_REDIRECTED, 1);
	return ALLOW;
}

/*
 * An application's UDP or TCP connect to port 53 in a pod whose mesh captures
 * DNS: to the proxy's DNS server, as the mesh's DNS rules do. Port exclusions
 * do not apply (Kuma excludes 53 from its TCP capture because its DNS rule
 * comes first). The socket remembers the server it asked for: getpeername
 * answers it (sockname.bpf.c), a UDP reply carries it as its source (dns.bpf.c).
 */
static __always_inline int capture_dns_connect(struct bpf_sock_addr *ctx, const struct pod_info *pod,
					       const struct destination *dst,
					       const struct ip_address *own, bool ipv6_socket)
{
	struct ip_address proxy;

	if (!remember_connect(ctx, dst, own, CONNECTION_REWRITTEN | CONNECTION_DNS))
		return ALLOW;
	set_localhost(&proxy, dst->ipv4);
	steer(ctx, ipv6_socket, &proxy, pod->dns_port);
	count(COUNTER_DNS_CONNECT_CAPTURED, 1);
	return ALLOW;
}

/* A UDP socket connected again, elsewhere: what it recorded of a DNS server no longer holds. */
static __always_inline void forget_dns_server(struct bpf_sock_addr *ctx)
{
	struct socket_state *state;

	if (!ctx->sk)
		return;
	state = bpf_sk_storage_get(&socket_states, ctx->sk, NULL, 0);
	if (state)
		state->conn.flags = 0;
}

/* Both hooks, once the destination is read: `ipv6_socket` is a constant in each. */
static __always_inline int redirect_connect(struct bpf_sock_addr *ctx,
					    const struct destination *dst, bool ipv6_socket)
{
	struct ip_address own;
	struct pod_info *pod;
	__u64 pod_cgroup_id = 0;
	__u64 uid_gid;

	if (ctx->type == SOCK_DGRAM) {
		/* UDP is steered only as DNS: anything else costs one storage lookup. */
		if (dst->port != bpf_htons(DNS_PORT)) {
			forget_dns_server(ctx);
			return ALLOW;
		}
	} else if (ctx->type != SOCK_STREAM) {
		return ALLOW;
	}
	pod = current_pod(&pod_cgroup_id);
	if (!pod)
		return ALLOW; /* not an accelerated pod: nothing here is ours */
	if (!pod_address(pod, dst->ipv4, &own)) {
		/* No address of this family: the mesh has no rules for it here either. */
		count(COUNTER_BYPASS_FAMILY_NOT_IN_POD, 1);
		if (ctx->type == SOCK_DGRAM)
			forget_dns_server(ctx);
		return ALLOW;
	}

	uid_gid = bpf_get_current_uid_gid();
	if (is_sidecar(pod, uid_gid)) {
		/* The proxy's own queries go where it sends them, as under the mesh's rules. */
		if (ctx->type == SOCK_DGRAM)
			return ALLOW;
		return redirect_sidecar(ctx, pod, pod_cgroup_id, dst, &own);
	}
	if (captures_dns(pod, dst->port))
		return capture_dns_connect(ctx, pod, dst, &own, ipv6_socket);
	if (ctx->type == SOCK_DGRAM) {
		forget_dns_server(ctx);
		return ALLOW;
	}
	return redirect_outbound(ctx, pod, pod_cgroup_id, dst, &own, ipv6_socket);
}

SEC("cgroup/connect4")
int redirect_connect4(struct bpf_sock_addr *ctx)
{
	struct destination dst = {};

	read_address(ctx, false, &dst.ip);
	dst.port = (__be16)ctx->user_port;
	dst.ipv4 = true;
	return redirect_connect(ctx, &dst, false);
}

SEC("cgroup/connect6")
int redirect_connect6(struct bpf_sock_addr *ctx)
{
	struct destination dst = {};

	read_address(ctx, true, &dst.ip);
	dst.port = (__be16)ctx->user_port;
	dst.ipv4 = is_mapped(&dst.ip);
	return redirect_connect(ctx, &dst, true);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
