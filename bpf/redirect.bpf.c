// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * sk_msg, attached to both sockhashes: hand each message a socket of ours
 * sends straight to the receive queue of the connection's other socket, when
 * that socket is on this node and a redirect target (a sidecar's, or with
 * FEATURE_SK_MSG_TO_APPS any). Otherwise the message takes the ordinary TCP
 * path, so a missing peer costs nothing but speed.
 */
#include "helpers.h"

const volatile struct datapath_config config = {};

static __always_inline bool is_draining(void)
{
	__u32 key = 0;
	__u32 *value = bpf_map_lookup_elem(&draining, &key);

	return value && *value;
}

SEC("sk_msg")
int redirect_msg(struct sk_msg_md *msg)
{
	struct sock_tuple peer = {};
	__u32 size = msg->size;

	if (is_draining()) {
		count(COUNTER_MSG_PASSED, 1);
		return SK_PASS;
	}

	/* The peer's own view: our remote end is its local end. */
	peer.local_ip = msg->remote_ip4;
	peer.remote_ip = msg->local_ip4;
	peer.local_port = ctx_remote_port(msg->remote_port);
	peer.remote_port = bpf_htons((__u16)msg->local_port);
	if (tuple_is_loopback(&peer))
		peer.netns_cookie = bpf_get_netns_cookie(msg);

	if (bpf_msg_redirect_hash(msg, &sidecar_sockets, &peer, BPF_F_INGRESS) == SK_PASS ||
	    ((config.features & FEATURE_SK_MSG_TO_APPS) &&
	     bpf_msg_redirect_hash(msg, &app_sockets, &peer, BPF_F_INGRESS) == SK_PASS)) {
		count(COUNTER_MSG_REDIRECTED, 1);
		count(COUNTER_MSG_BYTES_REDIRECTED, size);
	} else {
		count(COUNTER_MSG_PASSED, 1);
	}
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
