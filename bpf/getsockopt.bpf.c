// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * cgroup/getsockopt: answer SO_ORIGINAL_DST for connections connect4
 * rewrote, on both ends, as netfilter would have after a REDIRECT (the
 * connecting end's conntrack entry then has the original destination too, so
 * under iptables it answers the address it connected to). This runs after every
 * getsockopt on the node, so everything else returns at once, untouched:
 * the kernel's answer, length and error stand (also for optlen > PAGE_SIZE,
 * where the program sees only a prefix of the buffer).
 */
#include <linux/in.h>

#include "helpers.h"

SEC("cgroup/getsockopt")
int answer_original_dst(struct bpf_sockopt *ctx)
{
	struct sockaddr_in *answer = ctx->optval;
	struct socket_state *state;
	struct bpf_sock *sk;

	if (ctx->level != SOL_IP || ctx->optname != SO_ORIGINAL_DST)
		return ALLOW;
	sk = ctx->sk;
	if (!sk || sk->family != AF_INET || sk->type != SOCK_STREAM)
		return ALLOW;

	state = bpf_sk_storage_get(&socket_states, sk, NULL, 0);
	if (!state || !(state->conn.flags & CONNECTION_REWRITTEN))
		return ALLOW; /* not ours: netfilter's answer stands */
	if ((void *)(answer + 1) > ctx->optval_end)
		return ALLOW; /* caller's buffer too small: keep the kernel's error */

	answer->sin_family = AF_INET;
	answer->sin_port = state->conn.original_port;
	answer->sin_addr.s_addr = state->conn.original_ip;
	__builtin_memset(answer->__pad, 0, sizeof(answer->__pad));
	ctx->optlen = sizeof(*answer);
	/* Keep clang from merging the two 4-byte context stores into one 8-byte store. */
	barrier();
	ctx->retval = 0;
	count(COUNTER_ORIGINAL_DST_ANSWERED, 1);
	return ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
