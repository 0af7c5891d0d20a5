/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Every map of the datapath, declared once. Each program object includes
 * this header; the agent gives every map a pin path before load, so the
 * objects share one instance of each map and a restarted agent adopts them.
 * Sizes are defaults: the agent sets max_entries before load.
 */
#ifndef MESHACCEL_MAPS_H
#define MESHACCEL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "meshaccel.h"

/* Accelerated pods by pod-level cgroup id; written only by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, struct pod_info);
} pods SEC(".maps");

/*
 * Accelerated pods on this node by address (IPv4 mapped, IPv6; a dual-stack pod
 * has two entries): a sidecar's destination -> its pod.
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2048);
	__type(key, struct ip_address);
	__type(value, __u64); /* pod cgroup id */
} pod_ips SEC(".maps");

/*
 * Listening sockets on each pod's inbound port, by pod cgroup id, as sockops
 * saw them open and close. No entry: not seen (the listener predates the
 * datapath), trusted as the agent's pod set says. Zero: the pod's inbound
 * listener closed (its sidecar is gone, perhaps the pod and its address too):
 * a sidecar's connect is not steered there but left to iptables, which never
 * refuses what the real destination accepts. Entries go with the pod's (agent).
 */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u64);
	__type(value, __u32);
} inbound_listeners SEC(".maps");

/* The pod (cgroup id) of each listener counted in inbound_listeners, on the listener. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} listener_pods SEC(".maps");

/* Ports excluded from redirection, per pod and direction (the mesh's own ports and annotations). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pod_port_key);
	__type(value, __u8);
} pod_ports SEC(".maps");

/* excludeOutboundIPRanges, per pod. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct pod_cidr_key);
	__type(value, __u8);
} outbound_excluded_cidrs SEC(".maps");

/* includeOutboundIPRanges, per pod (consulted unless the pod includes everything). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct pod_cidr_key);
	__type(value, __u8);
} outbound_included_cidrs SEC(".maps");

/*
 * Active -> passive sockops hand-off: the connecting side files what connect4
 * knew under the handshake's sequence numbers, the accepting side (whose
 * ACK-triggered callback always runs later) takes it. LRU, as a connection can
 * die between the two.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct handshake_key);
	__type(value, struct connection);
} handshakes SEC(".maps");

/*
 * The sockets of accelerated connections, keyed by each socket's own view,
 * in two sockhashes by role. The sk_msg program is attached to msg_senders
 * only: a socket whose sends may be redirected (its peer takes redirected
 * bytes) joins it and runs sk_msg on every send. A socket that takes
 * redirected bytes joins msg_receivers, the map sk_msg redirects into. A
 * socket can be in both. Sends of a socket in msg_receivers alone take the
 * kernel's plain TCP path: sk_msg's own send path costs about a third more
 * CPU per byte even when it passes everything (measured on 6.18), and a
 * socket cannot shed it while it is in any map with the program.
 */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_tuple);
	__type(value, __u64);
} msg_senders SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_tuple);
	__type(value, __u64);
} msg_receivers SEC(".maps");

/* Every socket of a steered connection: what connect4 knew, and its sk_msg roles. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for socket storage */
	__type(key, int);
	__type(value, struct socket_state);
} socket_states SEC(".maps");

/*
 * The receive queue of every socket in msg_receivers, keyed by its own
 * tuple. LRU, so a closed socket's entry needs no callback to go: a live
 * entry evicted costs its senders only their socket-to-socket path (they
 * fall back to TCP, which is always safe).
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sock_tuple);
	__type(value, struct receive_queue);
} receive_queues SEC(".maps");

/*
 * Each pod's application connections, by the pod's address (IPv4-mapped or
 * IPv6: a dual-stack pod learns per family): sk_msg counts their first and
 * second sends, connect4 reads it to leave short-lived application hops to TCP
 * (a socket joining a sockhash costs more than one message saves). LRU: an
 * entry needs nobody to remove it, and one lost only starts the learning over.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 2048);
	__type(key, struct ip_address);
	__type(value, struct app_reuse);
} app_reuse SEC(".maps");

/*
 * One __u32, non-zero while the agent unloads: sk_msg stops redirecting so
 * that what is already queued on the receiving sockets is read before the
 * sockhash (and with it those queues) goes away.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} draining SEC(".maps");

/*
 * The struct datapath_config the objects were loaded with (their .rodata is
 * not pinned): written by the agent at load, read by the agent that adopts.
 * No program reads it.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct datapath_config);
} loaded_config SEC(".maps");

/* Event counters, indexed by enum counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, COUNTER_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

#endif /* MESHACCEL_MAPS_H */
