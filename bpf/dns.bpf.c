// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/sendmsg4 and cgroup/recvmsg4: DNS over unconnected UDP, in pods
 * whose mesh captures DNS (POD_DNS_CAPTURE), as the mesh's DNS rules would:
 *
 *  - an application's datagram to port 53 (sendto with an address) goes to
 *    127.0.0.1:<dns_port>, the proxy's DNS server; the proxy's own queries
 *    go where they were sent;
 *  - a reply from 127.0.0.1:<dns_port> to a socket whose query was steered,
 *    here or at connect (connect.bpf.c), is given the source address the
 *    application asked, as conntrack's reverse NAT gives it under iptables.
 *
 * The server asked is kept in the socket's storage: one per socket, the last
 * one asked. A resolver that asks several servers from one unconnected socket
 * at once sees every reply from the last one (glibc connects a socket per
 * server; musl checks a reply's source against its list, which still matches).
 */
#include "helpers.h"

SEC("cgroup/sendmsg4")
int capture_dns_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct socket_state *state;
	struct pod_info *pod;
	__u64 pod_cgroup_id = 0;

	if (ctx->type != SOCK_DGRAM || (__be16)ctx->user_port != bpf_htons(DNS_PORT))
		return ALLOW;
	pod = current_pod(&pod_cgroup_id);
	if (!pod || !captures_dns(pod, ctx->user_port))
		return ALLOW;
	if (is_sidecar(pod, bpf_get_current_uid_gid()))
		return ALLOW;

	state = ctx->sk ? bpf_sk_storage_get(&socket_states, ctx->sk, NULL,
					     BPF_SK_STORAGE_GET_F_CREATE)
			: NULL;
	if (!state) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return ALLOW; /* without a record the reply would name the proxy: leave it to iptables */
	}
	/* A connected socket's record names the server it is connected to: keep it. */
	if (!(state->conn.flags & CONNECTION_REWRITTEN)) {
		state->conn.original_ip = ctx->user_ip4;
		state->conn.original_port = (__be16)ctx->user_port;
		state->conn.flags = CONNECTION_DNS;
		state->conn.client_ip = pod->ip;
		state->flags = 0;
	}
	ctx->user_ip4 = localhost();
	ctx->user_port = pod->dns_port;
	count(COUNTER_DNS_DATAGRAM_CAPTURED, 1);
	return ALLOW;
}

SEC("cgroup/recvmsg4")
int restore_dns_reply_source(struct bpf_sock_addr *ctx)
{
	struct socket_state *state;
	struct pod_info *pod;
	__u64 pod_cgroup_id = 0;

	/* Every datagram received with its address comes here: the cheap test first. */
	if (ctx->user_ip4 != localhost() || !ctx->sk)
		return ALLOW;
	state = bpf_sk_storage_get(&socket_states, ctx->sk, NULL, 0);
	if (!state || !(state->conn.flags & CONNECTION_DNS))
		return ALLOW;
	/* Only the proxy's DNS server answers for the server asked. */
	pod = current_pod(&pod_cgroup_id);
	if (!pod || (__be16)ctx->user_port != pod->dns_port)
		return ALLOW;
	ctx->user_ip4 = state->conn.original_ip;
	ctx->user_port = state->conn.original_port;
	count(COUNTER_DNS_REPLY_ADDRESS_RESTORED, 1);
	return ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
