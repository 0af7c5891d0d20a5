// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: once a connection connect4 steered is established, hand what
 * connect4 knew to the accepting socket's storage, where getsockopt finds it,
 * and put both sockets into the sockhashes of their roles for sk_msg
 * (msg_senders, msg_receivers). Also count each pod's inbound listeners as
 * they open and close, for connect4 (maps.h, inbound_listeners).
 *
 * sockops cannot ask for the socket's cgroup (the verifier refuses
 * bpf_sk_cgroup_id here), so for connections it trusts only what connect4
 * recorded: the active side in its own storage, the passive side by the
 * handshake the active side just filed (its ACK is what establishes the
 * passive side). Only the listen() callback runs in its owner's task, where
 * the task's cgroup names the pod.
 */
#include "helpers.h"

const volatile struct datapath_config config = {};

/*
 * An IPv4 socket's addresses are stored IPv4-mapped; an IPv6 socket's are read
 * as they are, which for an IPv4 connection on it (a dual-stack listener's, a
 * connect to ::ffff:a.b.c.d) is already the mapped form: its peer, of either
 * family, computes the same tuple.
 */
static __always_inline void tuple_from_sockops(struct sock_tuple *tuple,
					       struct bpf_sock_ops *skops,
					       const struct handshake_key *handshake)
{
	tuple->netns_cookie = 0;
	tuple->handshake = *handshake;
	if (skops->family == AF_INET6) {
		READ_IP6(&tuple->local_ip, skops->local_ip6);
		READ_IP6(&tuple->remote_ip, skops->remote_ip6);
	} else {
		set_mapped(&tuple->local_ip, skops->local_ip4);
		set_mapped(&tuple->remote_ip, skops->remote_ip4);
	}
	tuple->local_port = bpf_htons((__u16)skops->local_port);
	tuple->remote_port = ctx_remote_port(skops->remote_port);
	tuple->pad = 0;
	if (tuple_is_loopback(tuple))
		tuple->netns_cookie = bpf_get_netns_cookie(skops);
}

/* A socket that takes redirected bytes starts with an empty receive queue. */
static __always_inline bool open_receive_queue(const struct sock_tuple *self)
{
	struct receive_queue queue = {};

	return bpf_map_update_elem(&receive_queues, self, &queue, BPF_ANY) == 0;
}

/*
 * A receiver holds at most about the budget while bytes come by sk_msg; after
 * a fallback they come by TCP, whose receive buffer autotuning grew to 15-33
 * MiB on a sidecar socket behind a slow application here (6-10 MiB under
 * iptables): the first segments after a long silence seem to arrive in one
 * round trip. Both ends are on this node, so a fixed buffer of twice the
 * budget (at least 1 MiB) costs no throughput; it also ends autotuning.
 */
static __always_inline void fix_receive_buffer(struct bpf_sock_ops *skops)
{
	int size = config.redirect_budget;

	if (size < RECEIVE_BUFFER_FLOOR)
		size = RECEIVE_BUFFER_FLOOR;
	if (bpf_setsockopt(skops, SOL_SOCKET, SO_RCVBUF, &size, sizeof(size)))
		count(COUNTER_ERROR_RECEIVE_BUFFER, 1);
}

/*
 * NOEXIST: a key held by a live socket stays its. Entries go when their
 * socket closes, so only a look-alike tuple in another network namespace
 * (non-loopback keys carry no netns) can find its key taken.
 */
static __always_inline bool join(struct bpf_sock_ops *skops, void *sockhash,
				 struct sock_tuple *self)
{
	long err = bpf_sock_hash_update(skops, sockhash, self, BPF_NOEXIST);

	if (err == -EEXIST)
		count(COUNTER_SOCKHASH_KEY_TAKEN, 1);
	else
		count(err ? COUNTER_ERROR_SOCKHASH_UPDATE : COUNTER_SOCKHASH_ADDED, 1);
	return err == 0;
}

/*
 * Put the socket in the sockhashes of its roles: msg_receivers if it takes
 * redirected bytes, msg_senders if its peer does (then its sends run sk_msg).
 * Either asks for RTT callbacks, which come only while TCP carries the
 * socket's own data: a receiver reports from there what it has read, a sender
 * whose direction fell back leaves msg_senders.
 */
static __always_inline void join_sockhashes(struct bpf_sock_ops *skops,
					    struct socket_state *state, struct sock_tuple *self,
					    bool takes_msg, bool peer_takes_msg)
{
	if (!(config.features & FEATURE_SK_MSG_REDIRECT) || !(takes_msg || peer_takes_msg))
		return;
	if (takes_msg && open_receive_queue(self) && join(skops, &msg_receivers, self)) {
		state->flags |= SOCKET_IN_RECEIVERS;
		fix_receive_buffer(skops);
	}
	if (peer_takes_msg && join(skops, &msg_senders, self))
		state->flags |= SOCKET_IN_SENDERS;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_RTT_CB_FLAG);
}

/* The connecting side: connect4 left what it knew in the socket's storage. */
static __always_inline void on_active_established(struct bpf_sock_ops *skops)
{
	struct handshake_key handshake = {};
	struct sock_tuple self = {};
	struct socket_state *state;

	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&socket_states, skops->sk, NULL, 0);
	if (!state)
		return; /* not a connection connect4 steered */

	handshake.client_seq = skops->snd_nxt;
	handshake.server_seq = skops->rcv_nxt;
	state->handshake = handshake;
	if (bpf_map_update_elem(&handshakes, &handshake, &state->conn, BPF_ANY)) {
		count(COUNTER_ERROR_MAP_UPDATE, 1);
		return;
	}
	tuple_from_sockops(&self, skops, &handshake);
	join_sockhashes(skops, state, &self, state->conn.flags & CONNECTION_CLIENT_TAKES_MSG,
			state->conn.flags & CONNECTION_SERVER_TAKES_MSG);
}

/*
 * An accepted socket inherits its listener's callback flags (since 5.10), and
 * with them a counted listener's STATE_CB: only the listener's close is
 * counted, so its children drop it instead of paying a run per state change.
 */
static __always_inline void drop_inherited_state_callbacks(struct bpf_sock_ops *skops)
{
	__u32 flags = skops->bpf_sock_ops_cb_flags;

	if (flags & BPF_SOCK_OPS_STATE_CB_FLAG)
		bpf_sock_ops_cb_flags_set(skops, flags & ~BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* The accepting side: ours if the connecting side filed this handshake. */
static __always_inline void on_passive_established(struct bpf_sock_ops *skops)
{
	struct handshake_key handshake = {};
	struct sock_tuple self = {};
	struct socket_state *state;
	struct connection *filed;
	struct connection conn;

	drop_inherited_state_callbacks(skops);
	handshake.client_seq = skops->rcv_nxt;
	handshake.server_seq = skops->snd_nxt;
	filed = bpf_map_lookup_elem(&handshakes, &handshake);
	if (!filed)
		return;
	conn = *filed;
	bpf_map_delete_elem(&handshakes, &handshake);

	if (!skops->sk)
		return;
	state = bpf_sk_storage_get(&socket_states, skops->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!state) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return;
	}
	state->conn = conn;
	state->flags = SOCKET_ACCEPTED;
	state->handshake = handshake;
	tuple_from_sockops(&self, skops, &handshake);
	join_sockhashes(skops, state, &self, conn.flags & CONNECTION_SERVER_TAKES_MSG,
			conn.flags & CONNECTION_CLIENT_TAKES_MSG);
}

/*
 * TCP carries this socket's data (an ACK came back): a receiver reports what
 * it has read, for senders whose own sends run no sk_msg of ours to do it; a
 * socket that only sends, and whose sends fell back to TCP, leaves
 * msg_senders, and with it sk_msg's send path (nothing was ever redirected
 * into it, so nothing waits in its queue).
 */
static __always_inline void on_rtt(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	struct socket_state *state;
	struct sock_tuple self = {};

	/* Also lets the verifier drop what needs CAP_PERFMON when sk_msg is off. */
	if (!(config.features & FEATURE_SK_MSG_REDIRECT) || !sk)
		return;
	state = bpf_sk_storage_get(&socket_states, sk, NULL, 0);
	if (!state)
		return;
	tuple_from_sockops(&self, skops, &state->handshake);
	if (state->flags & SOCKET_IN_RECEIVERS) {
		report_consumed(sk, &self);
		return;
	}
	if (!(state->flags & SOCKET_SENDS_TCP) || !(state->flags & SOCKET_IN_SENDERS))
		return;
	if (bpf_map_delete_elem(&msg_senders, &self) == 0)
		count(COUNTER_SENDER_LEFT, 1);
	state->flags &= ~SOCKET_IN_SENDERS;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & ~BPF_SOCK_OPS_RTT_CB_FLAG);
}

/*
 * A listener opens (in the listen() call, so the current task is its owner):
 * count it if it is its pod's inbound listener, and ask to hear when it closes.
 */
static __always_inline void on_listen(struct bpf_sock_ops *skops)
{
	__u64 pod_cgroup_id = 0;
	struct pod_info *pod;
	__u64 *owner;
	__u32 *listeners;
	__u32 none = 0;

	pod = current_pod(&pod_cgroup_id);
	if (!pod || !skops->sk || skops->local_port != bpf_ntohs(pod->inbound_port))
		return;
	owner = bpf_sk_storage_get(&listener_pods, skops->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!owner) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return;
	}
	listeners = bpf_map_lookup_elem(&inbound_listeners, &pod_cgroup_id);
	if (!listeners) {
		/* NOEXIST: a listener of the same pod opening at once may have made it. */
		bpf_map_update_elem(&inbound_listeners, &pod_cgroup_id, &none, BPF_NOEXIST);
		listeners = bpf_map_lookup_elem(&inbound_listeners, &pod_cgroup_id);
		if (!listeners) {
			count(COUNTER_ERROR_MAP_UPDATE, 1); /* full: the pod stays "not seen" */
			return;
		}
	}
	__sync_fetch_and_add(listeners, 1);
	*owner = pod_cgroup_id;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* Only counted listeners ask for state callbacks: this is one closing. */
static __always_inline void on_state_change(struct bpf_sock_ops *skops)
{
	__u64 *owner;
	__u32 *listeners;

	if (skops->args[0] != BPF_TCP_LISTEN || !skops->sk)
		return;
	owner = bpf_sk_storage_get(&listener_pods, skops->sk, NULL, 0);
	if (!owner || !*owner)
		return;
	listeners = bpf_map_lookup_elem(&inbound_listeners, owner);
	if (listeners && *listeners > 0)
		__sync_fetch_and_add(listeners, -1);
	*owner = 0;
}

SEC("sockops")
int track_sockets(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET && skops->family != AF_INET6)
		return ALLOW;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive_established(skops);
		break;
	case BPF_SOCK_OPS_RTT_CB:
		on_rtt(skops);
		break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB:
		on_listen(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state_change(skops);
		break;
	}
	return ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
