// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getsockopt: answer SO_ORIGINAL_DST (and IPv6's IP6T_SO_ORIGINAL_DST)
 * for connections connect4 or connect6 rewrote, on both ends, as netfilter
 * would have after a REDIRECT (the connecting end's conntrack entry then has
 * the original destination too, so under iptables it answers the address it
 * connected to). This runs after every getsockopt on the node, so everything
 * else returns at once, untouched: the kernel's answer, length and error stand
 * (also for optlen > PAGE_SIZE, where the program sees only a prefix of the
 * buffer).
 */
#include <linux/in.h>
#include <linux/in6.h>

#include "helpers.h"

/*
 * The connection's family decides, as it decides which conntrack table holds it. An IPv4
 * connection, on an IPv4 socket or IPv4-mapped on an IPv6 one, is iptables': netfilter answers
 * (SOL_IP, SO_ORIGINAL_DST) with a sockaddr_in for both sockets (ipv6_getsockopt hands SOL_IP
 * to ip_getsockopt), and (SOL_IPV6, IP6T_SO_ORIGINAL_DST) looks it up in the IPv6 table,
 * where it is not: ENOENT. A pure IPv6 connection the other way round. The level that finds
 * nothing keeps the kernel's error.
 */
static __always_inline bool asked_for_its_family(const struct bpf_sockopt *ctx,
						 const struct socket_state *state)
{
	if (ctx->level == SOL_IP)
		return is_mapped(&state->conn.original_ip);
	return !is_mapped(&state->conn.original_ip);
}

static __always_inline int answer_ipv4(struct bpf_sockopt *ctx, const struct socket_state *state)
{
	struct sockaddr_in *answer = ctx->optval;

	if ((void *)(answer + 1) > ctx->optval_end)
		return ALLOW; /* caller's buffer too small: keep the kernel's error */
	answer->sin_family = AF_INET;
	answer->sin_port = state->conn.original_port;
	answer->sin_addr.s_addr = state->conn.original_ip.word[3];
	__builtin_memset(answer->__pad, 0, sizeof(answer->__pad));
	ctx->optlen = sizeof(*answer);
	/* Keep clang from merging the two 4-byte context stores into one 8-byte store. */
	barrier();
	ctx->retval = 0;
	count(COUNTER_ORIGINAL_DST_ANSWERED, 1);
	return ALLOW;
}

static __always_inline int answer_ipv6(struct bpf_sockopt *ctx, const struct socket_state *state)
{
	struct sockaddr_in6 *answer = ctx->optval;

	if ((void *)(answer + 1) > ctx->optval_end)
		return ALLOW; /* caller's buffer too small: keep the kernel's error */
	answer->sin6_family = AF_INET6;
	answer->sin6_port = state->conn.original_port;
	answer->sin6_flowinfo = 0;
	answer->sin6_addr.in6_u.u6_addr32[0] = state->conn.original_ip.word[0];
	answer->sin6_addr.in6_u.u6_addr32[1] = state->conn.original_ip.word[1];
	answer->sin6_addr.in6_u.u6_addr32[2] = state->conn.original_ip.word[2];
	answer->sin6_addr.in6_u.u6_addr32[3] = state->conn.original_ip.word[3];
	answer->sin6_scope_id = 0;
	ctx->optlen = sizeof(*answer);
	barrier();
	ctx->retval = 0;
	count(COUNTER_ORIGINAL_DST_ANSWERED, 1);
	return ALLOW;
}

SEC("cgroup/getsockopt")
int answer_original_dst(struct bpf_sockopt *ctx)
{
	struct socket_state *state;
	struct bpf_sock *sk;

	/* One test serves both levels: */
	_Static_assert(SO_ORIGINAL_DST == IP6T_SO_ORIGINAL_DST, "the two options share a number");
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return ALLOW;
	sk = ctx->sk;
	if (!sk || (sk->family != AF_INET && sk->family != AF_INET6) || sk->type != SOCK_STREAM)
		return ALLOW;

	state = bpf_sk_storage_get(&socket_states, sk, NULL, 0);
	if (!state || !(state->conn.flags & CONNECTION_REWRITTEN))
		return ALLOW; /* not ours: netfilter's answer stands */
	if (!asked_for_its_family(ctx, state))
		return ALLOW;
	if (ctx->level == SOL_IP)
		return answer_ipv4(ctx, state);
	return answer_ipv6(ctx, state);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
