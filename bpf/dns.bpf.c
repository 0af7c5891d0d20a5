// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4, recvmsg4 and their IPv6 twins: DNS over unconnected UDP, in pods
 * whose mesh captures DNS (POD_DNS_CAPTURE), as the mesh's DNS rules would:
 *
 *  - an application's datagram to port 53 (sendto with an address) goes to
 *    127.0.0.1:<dns_port>, the proxy's DNS server ([::1] for an IPv6 server,
 *    ::ffff:127.0.0.1 for an IPv4-mapped one); the proxy's own queries go
 *    where they were sent;
 *  - a reply from there to a socket whose query was steered,
 *    here or at connect (connect.bpf.c), is given the source address the
 *    application asked, as conntrack's reverse NAT gives it under iptables.
 *
 * The server asked is kept in the socket's storage: one per socket, the last
 * one asked. A resolver that asks several servers from one unconnected socket
 * at once sees every reply from the last one (glibc connects a socket per
 * server; musl checks a reply's source against its list, which still matches).
 */
#include "helpers.h"

static __always_inline int capture_dns_sendmsg(struct bpf_sock_addr *ctx, bool ipv6_socket)
{
	struct ip_address server, proxy, own;
	struct socket_state *state;
	struct pod_info *pod;
	__u64 pod_cgroup_id = 0;
	bool ipv4;

	if (ctx->type != SOCK_DGRAM || (__be16)ctx->user_port != bpf_htons(DNS_PORT))
		return ALLOW;
	pod = current_pod(&pod_cgroup_id);
	if (!pod || !captures_dns(pod, ctx->user_port))
		return ALLOW;
	if (is_sidecar(pod, bpf_get_current_uid_gid()))
		return ALLOW;
	read_address(ctx, ipv6_socket, &server);
	ipv4 = is_mapped(&server);
	if (!pod_address(pod, ipv4, &own)) {
		/* No address of this family: the mesh has no rules for it here either. */
		count(COUNTER_BYPASS_FAMILY_NOT_IN_POD, 1);
		return ALLOW;
	}

	state = ctx->sk ? bpf_sk_storage_get(&socket_states, ctx->sk, NULL,
					     BPF_SK_STORAGE_GET_F_CREATE)
			: NULL;
	if (!state) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return ALLOW; /* without a record the reply would name the proxy: leave it to iptables */
	}
	/* A connected socket's record names the server it is connected to: keep it. */
	if (!(state->conn.flags & CONNECTION_REWRITTEN)) {
		state->conn.original_ip = server;
		state->conn.original_port = (__be16)ctx->user_port;
		state->conn.flags = CONNECTION_DNS;
		state->conn.client_ip = own;
		state->flags = 0;
	}
	set_localhost(&proxy, ipv4);
	steer(ctx, ipv6_socket, &proxy, pod->dns_port);
	count(COUNTER_DNS_DATAGRAM_CAPTURED, 1);
	return ALLOW;
}

static __always_inline int restore_dns_reply(struct bpf_sock_addr *ctx, bool ipv6_socket)
{
	struct ip_address source, proxy;
	struct socket_state *state;
	struct pod_info *pod;
	__u64 pod_cgroup_id = 0;
	bool ipv4;

	/* Every datagram received with its address comes here: the cheap tests first. */
	if (ipv6_socket) {
		read_address(ctx, true, &source);
		ipv4 = is_mapped(&source);
		set_localhost(&proxy, ipv4);
		if (!same_address(&source, &proxy))
			return ALLOW;
	} else {
		if (ctx->user_ip4 != localhost())
			return ALLOW;
		ipv4 = true;
	}
	if (!ctx->sk)
		return ALLOW;
	state = bpf_sk_storage_get(&socket_states, ctx->sk, NULL, 0);
	if (!state || !(state->conn.flags & CONNECTION_DNS))
		return ALLOW;
	/* The reply is of the query's family (the proxy's [::1] never answers for an IPv4 server). */
	if (is_mapped(&state->conn.original_ip) != ipv4)
		return ALLOW;
	/* Only the proxy's DNS server answers for the server asked. */
	pod = current_pod(&pod_cgroup_id);
	if (!pod || (__be16)ctx->user_port != pod->dns_port)
		return ALLOW;
	steer(ctx, ipv6_socket, &state->conn.original_ip, state->conn.original_port);
	count(COUNTER_DNS_REPLY_ADDRESS_RESTORED, 1);
	return ALLOW;
}

SEC("cgroup/sendmsg4")
int capture_dns_sendmsg4(struct bpf_sock_addr *ctx)
{
	return capture_dns_sendmsg(ctx, false);
}

SEC("cgroup/recvmsg4")
int restore_dns_reply_source(struct bpf_sock_addr *ctx)
{
	return restore_dns_reply(ctx, false);
}

SEC("cgroup/sendmsg6")
int capture_dns_sendmsg6(struct bpf_sock_addr *ctx)
{
	return capture_dns_sendmsg(ctx, true);
}

SEC("cgroup/recvmsg6")
int restore_dns_reply_source6(struct bpf_sock_addr *ctx)
{
	return restore_dns_reply(ctx, true);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
