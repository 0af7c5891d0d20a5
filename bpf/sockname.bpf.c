// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getpeername4, getsockname4 and their IPv6 twins: the sockets of a connection
 * connect4 rewrote answer address queries (getpeername, the peer accept()
 * returns, getsockname) as they would under Istio's iptables, where NAT
 * rewrites packets and sockets keep their addresses:
 *
 *  - the connecting socket's peer is the destination it asked for, not
 *    127.0.0.1:<outbound> or <pod>:<inbound>; its local address, which the
 *    rewrite to loopback made 127.0.0.1, is its pod's address;
 *  - the sidecar's accepted socket of an application's connection has the
 *    application's pod address as its peer, not 127.0.0.1.
 *
 * The record's addresses are in the connection's family (IPv4-mapped for an
 * IPv4 connection), which is how an IPv6 socket shows them: the IPv6 hooks
 * write all 16 bytes, the IPv4 ones the IPv4 word.
 *
 * Ports stay the socket's own (they differ between the two paths anyway).
 * These run for every address query of a socket under the attach cgroup:
 * everything that is not a steered connection returns at once, untouched.
 */
#include "helpers.h"

static __always_inline const struct socket_state *steered(struct bpf_sock_addr *ctx)
{
	struct socket_state *state;

	if (!ctx->sk)
		return NULL;
	state = bpf_sk_storage_get(&socket_states, ctx->sk, NULL, 0);
	if (!state || !(state->conn.flags & CONNECTION_REWRITTEN))
		return NULL;
	return state;
}

static __always_inline int restore_peer(struct bpf_sock_addr *ctx, bool ipv6_socket)
{
	const struct socket_state *state = steered(ctx);
	struct ip_address peer;

	if (!state)
		return ALLOW;
	if (state->flags & SOCKET_ACCEPTED) {
		/* Only the hop to the local sidecar made the peer loopback. */
		read_address(ctx, ipv6_socket, &peer);
		if (!is_any_loopback(&peer) || is_zero(&state->conn.client_ip))
			return ALLOW;
		write_address(ctx, ipv6_socket, &state->conn.client_ip);
	} else {
		write_address(ctx, ipv6_socket, &state->conn.original_ip);
		ctx->user_port = state->conn.original_port;
	}
	count(COUNTER_PEER_ADDRESS_RESTORED, 1);
	return ALLOW;
}

static __always_inline int restore_local(struct bpf_sock_addr *ctx, bool ipv6_socket)
{
	const struct socket_state *state = steered(ctx);
	struct ip_address local;

	/* An accepting end's local address is the listener's, as under iptables. */
	if (!state || (state->flags & SOCKET_ACCEPTED))
		return ALLOW;
	read_address(ctx, ipv6_socket, &local);
	if (!is_any_loopback(&local) || is_zero(&state->conn.client_ip))
		return ALLOW;
	write_address(ctx, ipv6_socket, &state->conn.client_ip);
	count(COUNTER_LOCAL_ADDRESS_RESTORED, 1);
	return ALLOW;
}

SEC("cgroup/getpeername4")
int restore_peer_address(struct bpf_sock_addr *ctx)
{
	return restore_peer(ctx, false);
}

SEC("cgroup/getsockname4")
int restore_local_address(struct bpf_sock_addr *ctx)
{
	return restore_local(ctx, false);
}

SEC("cgroup/getpeername6")
int restore_peer_address6(struct bpf_sock_addr *ctx)
{
	return restore_peer(ctx, true);
}

SEC("cgroup/getsockname6")
int restore_local_address6(struct bpf_sock_addr *ctx)
{
	return restore_local(ctx, true);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
