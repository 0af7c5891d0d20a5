/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ABI between the eBPF programs and the agent: layout only, no logic.
 *
 * Every struct here is mirrored by a ctypes Structure in agent/layout.py and
 * checked against this object's BTF by tests/unit/test_layout.py. Addresses
 * and ports are kept in network byte order everywhere (the __be types say
 * so), because that is how the kernel hands them to the programs.
 */
#ifndef MESHACCEL_H
#define MESHACCEL_H

#include <linux/types.h>

/*
 * An address of either family, 16 bytes in network byte order. An IPv4
 * address is stored IPv4-mapped (::ffff:a.b.c.d), which is how the kernel
 * shows an IPv4 peer of a dual-stack socket: a connection seen from an IPv4
 * socket and from an IPv6 socket carrying it then gives the same bytes, so
 * both ends of one connection compute one key whatever their sockets' family.
 */
struct ip_address {
	__be32 word[4];
};
_Static_assert(sizeof(struct ip_address) == 16, "ip_address layout is ABI");

/*
 * A connection's identity that survives NAT: the next sequence numbers of
 * both directions right after the handshake (each end's ISN + 1). The
 * connecting side files the connection under it, the accepting side claims it:
 * Istio's PREROUTING REDIRECT may rewrite the client's port on a conntrack
 * clash (a recent iptables-path connection left the same reply tuple), so
 * the two ends of one connection do not always see the same 4-tuple.
 */
struct handshake_key {
	__u32 client_seq;
	__u32 server_seq;
};
_Static_assert(sizeof(struct handshake_key) == 8, "handshake_key layout is ABI");

/*
 * One TCP connection as seen by one of its sockets, the key of its sockhash
 * and receive_queues entries. The peer socket's view is the same tuple with
 * local and remote swapped.
 *
 * Loopback tuples repeat in every network namespace (127.0.0.1:41000 ->
 * 127.0.0.1:15001 can exist in each pod at once), so tuples that touch
 * 127.0.0.0/8 or ::1 carry the netns cookie; others carry 0, because a sender cannot
 * know its peer's namespace. Every key carries the connection's handshake,
 * which both ends know and nobody else can make: a look-alike tuple in another
 * namespace (a pod that can make one with another pod's addresses) never has
 * the key of a real connection, so no socket can take another's bytes.
 */
struct sock_tuple {
	__u64 netns_cookie;
	struct handshake_key handshake;
	struct ip_address local_ip;
	struct ip_address remote_ip;
	__be16 local_port;
	__be16 remote_port;
	__u32 pad;
};
_Static_assert(sizeof(struct sock_tuple) == 56, "sock_tuple layout is ABI");

enum connection_flags {
	/*
	 * connect() was rewritten: the sockets answer SO_ORIGINAL_DST, and the
	 * address queries the rewrite changed, as under iptables (sockname.bpf.c).
	 */
	CONNECTION_REWRITTEN = 1 << 0,
	/*
	 * Which ends may receive redirected bytes: a sidecar's socket always, an
	 * application's only in a pod with POD_SK_MSG_TO_APP.
	 */
	CONNECTION_CLIENT_TAKES_MSG = 1 << 1,
	CONNECTION_SERVER_TAKES_MSG = 1 << 2,
	/*
	 * A DNS query steered to the proxy's DNS port (dns.bpf.c): the socket's
	 * replies from there carry original_ip:original_port as their source.
	 */
	CONNECTION_DNS = 1 << 3,
	/*
	 * Which end is the pod's application (an application hop: the app's
	 * outbound connect to its sidecar, or the sidecar's inbound passthrough
	 * to its app). Its sends teach the pod's app_reuse (maps.h).
	 */
	CONNECTION_CLIENT_IS_APP = 1 << 4,
	CONNECTION_SERVER_IS_APP = 1 << 5,
};

/*
 * A connection connect4 steered or marked: where it was going, whose its ends
 * are, and the connecting pod's address (what the client's socket would have
 * as its local address, and the accepting one as its peer, without the rewrite).
 */
struct connection {
	struct ip_address original_ip;
	struct ip_address client_ip; /* of the connection's family: IPv4-mapped or IPv6 */
	__be16 original_port;
	__u16 flags; /* enum connection_flags */
};
_Static_assert(sizeof(struct connection) == 36, "connection layout is ABI");

/*
 * What the datapath keeps on a socket of a steered connection, in its
 * socket-local storage (freed with the socket: no entry outlives it, no
 * callback has to remove it). connect4 creates it on the connecting socket;
 * sockops on the accepting socket, from the handshake the connecting side
 * filed. Once a socket's sends take TCP they never go back: the receiver reads
 * redirected bytes before TCP ones, so only this one-way switch keeps the order.
 */
enum socket_flags {
	SOCKET_SENDS_TCP = 1 << 0,
	SOCKET_SENDS_REDIRECTED = 1 << 1,
	SOCKET_IN_SENDERS = 1 << 2,   /* in msg_senders: its sends run sk_msg */
	SOCKET_IN_RECEIVERS = 1 << 3, /* in msg_receivers: it takes redirected bytes */
	/* The accepting end of a steered connection (else the connecting end). */
	SOCKET_ACCEPTED = 1 << 4,
	/* An application's end that sent once, and again (counted in app_reuse). */
	SOCKET_SENT = 1 << 5,
	SOCKET_SENT_AGAIN = 1 << 6,
};

struct socket_state {
	struct connection conn; /* what connect4 knew about the connection */
	__u32 flags;            /* enum socket_flags */
	struct handshake_key handshake; /* the connection's, for its sock_tuple keys */
};
_Static_assert(sizeof(struct socket_state) == 48, "socket_state layout is ABI");

/*
 * A redirect target's receive queue as its senders know it, keyed by the
 * receiving socket's own tuple: senders add what they redirect, the receiver
 * records how much of it it has read whenever it sends (it can read its own
 * queue; a sender cannot read another socket's).
 */
struct receive_queue {
	__u64 redirected; /* bytes redirected into the socket */
	__u64 consumed;   /* of which the socket had read, as of its last send */
};
_Static_assert(sizeof(struct receive_queue) == 16, "receive_queue layout is ABI");

/*
 * How a pod's application connections have been used lately, as sk_msg saw
 * their first sends: of `connections` that sent, `reused` sent again. Both
 * are halved when `connections` reaches APP_REUSE_WINDOW, so the record
 * follows change. `skipped` counts the application hops connect4 left to TCP;
 * `last_connect_ns` is the pod's last application connect (bpf_ktime_get_ns).
 */
struct app_reuse {
	__u32 connections;
	__u32 reused;
	__u32 skipped;
	__u32 pad;
	__u64 last_connect_ns;
};
_Static_assert(sizeof(struct app_reuse) == 24, "app_reuse layout is ABI");

enum app_reuse_limits {
	/* Fewer connections than this decide nothing: every application hop joins. */
	APP_REUSE_SAMPLES = 16,
	APP_REUSE_WINDOW = 64,
	/* Of the application hops left to TCP, every APP_REUSE_PROBE-th joins anyway. */
	APP_REUSE_PROBE = 8,
	/* A pause this long between a pod's application connects starts its record over. */
	APP_REUSE_PAUSE_NS = 1000000000,
};

enum pod_flags {
	/* No includeOutboundIPRanges list: every outbound CIDR is included. */
	POD_OUTBOUND_INCLUDE_ALL = 1 << 0,
	/*
	 * sk_msg may deliver into this pod's application sockets (opt-in per pod:
	 * bytes queued by sk_msg are invisible to splice() and TCP_ZEROCOPY_RECEIVE).
	 */
	POD_SK_MSG_TO_APP = 1 << 1,
	/*
	 * The proxy is the process with sidecar_uid as its uid only (Linkerd's and
	 * Kuma's rules); without it, its gid counts too (Istio's --gid-owner rules).
	 */
	POD_SIDECAR_UID_ONLY = 1 << 2,
	/*
	 * The mesh captures the application's DNS (Istio's DNS proxying, Kuma's
	 * built-in DNS): UDP and TCP to port 53 go to 127.0.0.1:<dns_port>.
	 */
	POD_DNS_CAPTURE = 1 << 3,
};

/*
 * An accelerated pod, keyed by its pod-level cgroup id. dns_port took the
 * upper half of what was a __u32 flags, ipv6 was appended: every other field
 * kept its offset. A pod has an address of one family or both; the other is
 * zero, and connections of a family the pod has no address of are left alone.
 */
struct pod_info {
	__be32 ip;             /* IPv4, or 0 */
	__u32 sidecar_uid;     /* the proxy's uid (and gid, see POD_SIDECAR_UID_ONLY): Istio 1337 */
	__be16 outbound_port;  /* the proxy's outbound listener: Istio 15001 */
	__be16 inbound_port;   /* the proxy's inbound listener: Istio 15006 */
	__u16 flags;           /* enum pod_flags */
	__be16 dns_port;       /* the proxy's DNS server (POD_DNS_CAPTURE): 15053, else 0 */
	struct ip_address ipv6; /* or all zero */
};
_Static_assert(sizeof(struct pod_info) == 32, "pod_info layout is ABI");

enum traffic_direction {
	DIRECTION_OUTBOUND = 0,
	DIRECTION_INBOUND = 1,
};

/* A port a pod's traffic must not be redirected for, in one direction. */
struct pod_port_key {
	__u64 pod_cgroup_id;
	__be16 port;
	__u8 direction; /* enum traffic_direction */
	__u8 pad[5];
};
_Static_assert(sizeof(struct pod_port_key) == 16, "pod_port_key layout is ABI");

/*
 * LPM-trie key of a per-pod CIDR. The trie compares bits after prefixlen in
 * memory order, so family and pod_cgroup_id are always part of the prefix and
 * one trie serves every pod and both families: prefixlen =
 * POD_CIDR_PREFIX_BITS + 96 + length for an IPv4 CIDR (stored as part of
 * ::ffff:0:0/96), POD_CIDR_PREFIX_BITS + length for an IPv6 one. The family
 * keeps an IPv6 CIDR that spans the mapped range (::/0) from matching IPv4
 * destinations: ip6tables' ranges never see IPv4 packets either.
 */
struct pod_cidr_key {
	__u32 prefixlen;
	__u32 family; /* AF_INET or AF_INET6, host order */
	__u64 pod_cgroup_id;
	struct ip_address addr;
};
_Static_assert(sizeof(struct pod_cidr_key) == 32, "pod_cidr_key layout is ABI");

enum { POD_CIDR_PREFIX_BITS = 96 /* family + pod_cgroup_id */ };

enum datapath_features {
	/* A sidecar's connect to a meshed pod on this node goes straight to that pod's inbound listener. */
	FEATURE_SAME_NODE_INBOUND = 1 << 0,
	/*
	 * Both ends of steered connections join a sockhash; sk_msg moves bytes
	 * socket to socket while the receiver keeps up (see redirect_budget).
	 */
	FEATURE_SK_MSG_REDIRECT = 1 << 1,
	/* 1 << 2 was FEATURE_SK_MSG_TO_APPS, now per pod (POD_SK_MSG_TO_APP): never reuse. */
	/*
	 * Every application socket is a redirect target, as if every pod had
	 * POD_SK_MSG_TO_APP: set by the agent only where splice() reads redirected
	 * bytes (it asks the kernel at load, agent/probes.py), never by a setting.
	 */
	FEATURE_SK_MSG_TO_EVERY_APP = 1 << 3,
};

/* Set in .rodata before load. */
struct datapath_config {
	__u32 features; /* enum datapath_features */
	/*
	 * Bytes a receiving socket may hold unread (as far as it last told) before
	 * that direction of the connection falls back to TCP for good.
	 */
	__u32 redirect_budget;
};
_Static_assert(sizeof(struct datapath_config) == 8, "datapath_config layout is ABI");

/*
 * Index of each per-CPU event counter. Stable: never renumber, retire
 * instead (the agent's metrics and dashboards use these numbers).
 */
enum counter {
	COUNTER_CONNECT_OUTBOUND_REDIRECTED = 0,
	COUNTER_CONNECT_INBOUND_REDIRECTED = 1,
	COUNTER_CONNECT_SIDECAR_TO_OWN_POD = 2,
	COUNTER_SOCKHASH_ADDED = 3,
	COUNTER_MSG_REDIRECTED = 4,
	COUNTER_MSG_BYTES_REDIRECTED = 5,
	COUNTER_MSG_PASSED = 6,
	COUNTER_ORIGINAL_DST_ANSWERED = 7,
	COUNTER_BYPASS_LOCAL_DESTINATION = 8,
	COUNTER_BYPASS_OUTBOUND_PORT_EXCLUDED = 9,
	COUNTER_BYPASS_OUTBOUND_CIDR_EXCLUDED = 10,
	COUNTER_BYPASS_SIDECAR_REMOTE_DESTINATION = 11,
	COUNTER_BYPASS_INBOUND_PORT_EXCLUDED = 12,
	COUNTER_BYPASS_SAME_NODE_INBOUND_DISABLED = 13,
	COUNTER_ERROR_MAP_UPDATE = 14,
	COUNTER_ERROR_SOCKHASH_UPDATE = 15,
	/* A direction's first message found no redirect target: it takes TCP for good. */
	COUNTER_MSG_PEER_NOT_TARGET = 16,
	/* A redirecting direction fell back to TCP for good, by reason (enum fallback_reason). */
	COUNTER_FALLBACK_BUDGET = 17,
	COUNTER_FALLBACK_RECEIVER_UNKNOWN = 18,
	COUNTER_FALLBACK_REDIRECT_FAILED = 19,
	COUNTER_FALLBACK_DRAINING = 20,
	/* A socket's state could not be allocated: its connection is left to TCP. */
	COUNTER_ERROR_SOCKET_STATE = 21,
	/* A sender that fell back left msg_senders: its sends take the plain TCP path again. */
	COUNTER_SENDER_LEFT = 22,
	/* A receiver's TCP receive buffer could not be fixed (bpf_setsockopt refused). */
	COUNTER_ERROR_RECEIVE_BUFFER = 23,
	/* getpeername()/accept() or getsockname() answered as under iptables. */
	COUNTER_PEER_ADDRESS_RESTORED = 24,
	COUNTER_LOCAL_ADDRESS_RESTORED = 25,
	/* A sidecar's connect to a same-node pod whose inbound listener closed: left to iptables. */
	COUNTER_BYPASS_NO_INBOUND_LISTENER = 26,
	/* A socket did not join a sockhash: a live socket already has its key. */
	COUNTER_SOCKHASH_KEY_TAKEN = 27,
	/* An application's DNS went to its proxy's DNS port: at connect (UDP or TCP), or per sendto. */
	COUNTER_DNS_CONNECT_CAPTURED = 28,
	COUNTER_DNS_DATAGRAM_CAPTURED = 29,
	/* A reply from the proxy's DNS port was given the address the application asked. */
	COUNTER_DNS_REPLY_ADDRESS_RESTORED = 30,
	/*
	 * A pod's connect (or DNS query) of an address family the pod has no
	 * address of (an IPv4-only pod's IPv6, an IPv6-only pod's IPv4): left alone,
	 * as the mesh installs no rules for a family the pod does not have.
	 */
	COUNTER_BYPASS_FAMILY_NOT_IN_POD = 31,
	/*
	 * An application hop left to TCP (no sockhash, no sk_msg): most of its
	 * pod's recent application connections sent once (app_reuse).
	 */
	COUNTER_APP_HOP_ON_TCP = 32,
	COUNTER_MAX,
};

#endif /* MESHACCEL_H */
