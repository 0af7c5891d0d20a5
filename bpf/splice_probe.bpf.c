// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The agent's question to the running kernel, asked with a real socket pair
 * instead of a version number: can splice() read bytes that sk_msg redirected
 * into a socket's receive queue? The agent puts a connected pair of loopback
 * sockets at index 0 (sender) and 1 (receiver), sends one byte and splices.
 * Loaded for the question only, attached to nothing but its own sockhash.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} probe_sockets SEC(".maps");

SEC("sk_msg")
int redirect_to_receiver(struct sk_msg_md *msg)
{
	__u32 receiver = 1;

	bpf_msg_redirect_hash(msg, &probe_sockets, &receiver, BPF_F_INGRESS);
	return SK_PASS;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
