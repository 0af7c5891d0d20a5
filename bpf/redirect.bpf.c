// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg, attached to msg_senders: hand each message a socket of ours sends
 * straight to the receive queue of the connection's other socket, while that
 * socket is in msg_receivers on this node and keeps up with what it is given.
 * The kernel never makes a redirecting sender wait, so the program keeps the
 * account: senders add what they redirect into a receiver's
 * receive_queues entry, and a receiver records there how much of it it has
 * read whenever it sends (here, or from sockops when its sends take TCP).
 * When a receiver's unread bytes pass the budget, the sender's direction
 * falls back to TCP, for good: the receiver reads the redirected bytes first,
 * then TCP's, so going back would reorder them.
 */
#include "helpers.h"

const volatile struct datapath_config config = {};

static __always_inline bool is_draining(void)
{
	__u32 key = 0;
	__u32 *value = bpf_map_lookup_elem(&draining, &key);

	return value && *value;
}

/*
 * The socket's own view of its tuple, and its peer's (our remote end is its local end).
 * An IPv4 socket's addresses are mapped with constant stores, and only its IPv4 words
 * are tested for loopback: the fast path pays a family test and no more lookups.
 */
static __always_inline void tuples_from_msg(struct sk_msg_md *msg, const struct socket_state *state,
					    struct sock_tuple *self, struct sock_tuple *peer)
{
	bool loopback;

	self->handshake = state->handshake;
	if (msg->family == AF_INET6) {
		READ_IP6(&self->local_ip, msg->local_ip6);
		READ_IP6(&self->remote_ip, msg->remote_ip6);
		loopback = tuple_is_loopback(self);
	} else {
		__be32 local = msg->local_ip4, remote = msg->remote_ip4;

		set_mapped(&self->local_ip, local);
		set_mapped(&self->remote_ip, remote);
		loopback = is_loopback(local) || is_loopback(remote);
	}
	self->local_port = bpf_htons((__u16)msg->local_port);
	self->remote_port = ctx_remote_port(msg->remote_port);
	if (loopback)
		self->netns_cookie = bpf_get_netns_cookie(msg);

	peer->netns_cookie = self->netns_cookie;
	peer->handshake = self->handshake;
	peer->local_ip = self->remote_ip;
	peer->remote_ip = self->local_ip;
	peer->local_port = self->remote_port;
	peer->remote_port = self->local_port;
}

static __always_inline int take_tcp(struct socket_state *state, enum counter reason)
{
	state->flags |= SOCKET_SENDS_TCP;
	count(reason, 1);
	count(COUNTER_MSG_PASSED, 1);
	return SK_PASS;
}

/*
 * Redirecting fails or is refused: the first message decides that the
 * socket's sends take TCP; a socket that has redirected before falls back.
 */
static __always_inline int decline(struct socket_state *state, enum counter fallback)
{
	if (state->flags & SOCKET_SENDS_REDIRECTED)
		return take_tcp(state, fallback);
	return take_tcp(state, COUNTER_MSG_PEER_NOT_TARGET);
}

/* The application's end of an application hop (connect4 marked which end it is). */
static __always_inline bool is_app_end(const struct socket_state *state)
{
	__u16 app_is = state->flags & SOCKET_ACCEPTED ? CONNECTION_SERVER_IS_APP
						      : CONNECTION_CLIENT_IS_APP;

	return state->conn.flags & app_is;
}

/*
 * An application's connection sends for the first time, or the second: count
 * it in its pod's app_reuse (client_ip is the pod's address on both hops). A
 * second send while the pod counts as short-lived (a probe's, or an older
 * connection's) means its use changed: it learns anew, and its next
 * connections join while it does.
 */
static __always_inline void learn_app_reuse(struct socket_state *state)
{
	struct app_reuse fresh = {}, *reuse;
	bool again = state->flags & SOCKET_SENT;

	state->flags |= again ? SOCKET_SENT_AGAIN : SOCKET_SENT;
	reuse = bpf_map_lookup_elem(&app_reuse, &state->conn.client_ip);
	if (!reuse) {
		/* NOEXIST: another connection of the pod may have made it meanwhile. */
		fresh.last_connect_ns = bpf_ktime_get_ns();
		bpf_map_update_elem(&app_reuse, &state->conn.client_ip, &fresh, BPF_NOEXIST);
		reuse = bpf_map_lookup_elem(&app_reuse, &state->conn.client_ip);
		if (!reuse)
			return;
	}
	if (again && short_lived(reuse)) {
		learn_anew(reuse);
		return;
	}
	if (again) {
		__sync_fetch_and_add(&reuse->reused, 1);
		return;
	}
	/* Racing halvings lose a count or two: a rate, not a ledger. */
	if (reuse->connections >= APP_REUSE_WINDOW) {
		reuse->connections /= 2;
		reuse->reused /= 2;
	}
	__sync_fetch_and_add(&reuse->connections, 1);
}

SEC("sk_msg")
int redirect_msg(struct sk_msg_md *msg)
{
	struct sock_tuple self = {}, peer = {};
	struct bpf_sock *sk = msg->sk;
	struct socket_state *state;
	struct receive_queue *queue;
	__u32 size = msg->size;

	/*
	 * Without the feature no socket joins a sockhash and this never runs; the check lets
	 * the verifier drop the rest, and with it the helper that needs CAP_PERFMON.
	 */
	if (!(config.features & FEATURE_SK_MSG_REDIRECT) || !sk)
		return SK_PASS;
	state = bpf_sk_storage_get(&socket_states, sk, NULL, 0);
	if (state && !(state->flags & SOCKET_SENT_AGAIN) && is_app_end(state))
		learn_app_reuse(state);
	if (!state || (state->flags & (SOCKET_SENDS_TCP | SOCKET_IN_RECEIVERS)) == SOCKET_SENDS_TCP) {
		count(COUNTER_MSG_PASSED, 1);
		return SK_PASS; /* nothing to decide and nothing to report */
	}
	tuples_from_msg(msg, state, &self, &peer);
	if (state->flags & SOCKET_IN_RECEIVERS)
		report_consumed(sk, &self);
	if (state->flags & SOCKET_SENDS_TCP) {
		count(COUNTER_MSG_PASSED, 1);
		return SK_PASS;
	}
	if (is_draining())
		return take_tcp(state, COUNTER_FALLBACK_DRAINING);

	queue = bpf_map_lookup_elem(&receive_queues, &peer);
	if (!queue)
		return decline(state, COUNTER_FALLBACK_RECEIVER_UNKNOWN);
	if (queue->redirected - queue->consumed > config.redirect_budget)
		return take_tcp(state, COUNTER_FALLBACK_BUDGET);
	if (bpf_msg_redirect_hash(msg, &msg_receivers, &peer, BPF_F_INGRESS) != SK_PASS)
		return decline(state, COUNTER_FALLBACK_REDIRECT_FAILED);

	state->flags |= SOCKET_SENDS_REDIRECTED;
	__sync_fetch_and_add(&queue->redirected, size);
	count(COUNTER_MSG_REDIRECTED, 1);
	count(COUNTER_MSG_BYTES_REDIRECTED, size);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
