// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sockops: once a connection connect4 steered is established, hand what
 * connect4 knew to the accepting socket, file it under that socket's own
 * tuple for getsockopt, and put both sockets into a sockhash for sk_msg:
 * target_sockets if they may receive redirected bytes, sender_sockets if not.
 *
 * sockops cannot ask for the socket's cgroup (the verifier refuses
 * bpf_sk_cgroup_id here), so it trusts only what connect4 recorded: the
 * active side by socket cookie, the passive side by the handshake the active
 * side just filed (its ACK is what establishes the passive side).
 */
#include "helpers.h"

const volatile struct datapath_config config = {};

static __always_inline void tuple_from_sockops(struct sock_tuple *tuple,
					       struct bpf_sock_ops *skops)
{
	tuple->netns_cookie = 0;
	tuple->local_ip = skops->local_ip4;
	tuple->remote_ip = skops->remote_ip4;
	tuple->local_port = bpf_htons((__u16)skops->local_port);
	tuple->remote_port = ctx_remote_port(skops->remote_port);
	tuple->pad = 0;
	if (tuple_is_loopback(tuple))
		tuple->netns_cookie = bpf_get_netns_cookie(skops);
}

/* A redirect target starts with an empty receive queue (a closed socket's entry may remain). */
static __always_inline bool open_receive_queue(const struct sock_tuple *self)
{
	struct receive_queue queue = {};

	return bpf_map_update_elem(&receive_queues, self, &queue, BPF_ANY) == 0;
}

/*
 * Give the socket its sending state and put it in its sockhash: from then on
 * sk_msg runs for every message it sends. A socket that takes redirected
 * bytes joins target_sockets, any other sender_sockets. Without its state the
 * socket is left out, and its connection keeps to TCP.
 */
static __always_inline void join_sockhash(struct bpf_sock_ops *skops, struct sock_tuple *self,
					  bool takes_msg)
{
	struct bpf_sock *sk = skops->sk;
	long err;

	if (!(config.features & FEATURE_SK_MSG_REDIRECT) || !sk)
		return;
	if (!bpf_sk_storage_get(&socket_states, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE)) {
		count(COUNTER_ERROR_SOCKET_STATE, 1);
		return;
	}
	if (takes_msg && open_receive_queue(self))
		err = bpf_sock_hash_update(skops, &target_sockets, self, BPF_ANY);
	else
		err = bpf_sock_hash_update(skops, &sender_sockets, self, BPF_ANY);
	count(err ? COUNTER_ERROR_SOCKHASH_UPDATE : COUNTER_SOCKHASH_ADDED, 1);
}

/* The connecting side: connect4 left what it knew under the socket cookie. */
static __always_inline void on_active_established(struct bpf_sock_ops *skops)
{
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct handshake_key handshake = {};
	struct sock_tuple self = {};
	struct connection *recorded;
	struct connection conn;

	recorded = bpf_map_lookup_elem(&connecting_sockets, &cookie);
	if (!recorded)
		return;
	conn = *recorded;
	bpf_map_delete_elem(&connecting_sockets, &cookie);

	handshake.client_seq = skops->snd_nxt;
	handshake.server_seq = skops->rcv_nxt;
	if (bpf_map_update_elem(&handshakes, &handshake, &conn, BPF_ANY)) {
		count(COUNTER_ERROR_MAP_UPDATE, 1);
		return;
	}
	tuple_from_sockops(&self, skops);
	join_sockhash(skops, &self, conn.flags & CONNECTION_CLIENT_TAKES_MSG);
}

/* The accepting side: ours if the connecting side filed this handshake. */
static __always_inline void on_passive_established(struct bpf_sock_ops *skops)
{
	struct handshake_key handshake = {};
	struct sock_tuple self = {};
	struct connection *filed;
	struct connection conn;

	handshake.client_seq = skops->rcv_nxt;
	handshake.server_seq = skops->snd_nxt;
	filed = bpf_map_lookup_elem(&handshakes, &handshake);
	if (!filed)
		return;
	conn = *filed;
	bpf_map_delete_elem(&handshakes, &handshake);

	tuple_from_sockops(&self, skops);
	if (bpf_map_update_elem(&connections, &self, &conn, BPF_ANY)) {
		count(COUNTER_ERROR_MAP_UPDATE, 1);
		return;
	}
	/* To forget the connection when this socket closes. */
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	join_sockhash(skops, &self, conn.flags & CONNECTION_SERVER_TAKES_MSG);
}

static __always_inline void on_state_change(struct bpf_sock_ops *skops)
{
	struct sock_tuple self = {};

	if (skops->args[1] != BPF_TCP_CLOSE)
		return;
	tuple_from_sockops(&self, skops);
	bpf_map_delete_elem(&connections, &self);
}

SEC("sockops")
int track_sockets(struct bpf_sock_ops *skops)
{
	if (skops->family != AF_INET)
		return ALLOW;

	switch (skops->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		on_active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_passive_established(skops);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state_change(skops);
		break;
	}
	return ALLOW;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
