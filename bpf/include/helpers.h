/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Small helpers shared by the programs: one lookup or one conversion each. */
#ifndef MESHACCEL_HELPERS_H
#define MESHACCEL_HELPERS_H

#include <stdbool.h>
#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "kernel.h"
#include "maps.h"
#include "meshaccel.h"

/* Not in the UAPI headers a BPF build can include. */
#define AF_INET 2
#define AF_INET6 10
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#define SOL_IP 0
#define SOL_IPV6 41
#define SO_ORIGINAL_DST 80 /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */
#define SOL_SOCKET 1
#define SO_RCVBUF 8
#define EEXIST 17

/* Where resolvers send queries, UDP and TCP alike. */
#define DNS_PORT 53

/* SO_RCVBUF a receiver of redirected bytes gets at least (the kernel doubles it). */
#define RECEIVE_BUFFER_FLOOR (1 << 20)

#define barrier() asm volatile("" ::: "memory")

/* Return values of cgroup sock_addr, sockops and sockopt programs. */
#define ALLOW 1

/* kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/<container> is
 * level 4; leave room for runtimes that nest deeper. */
#define MAX_CGROUP_LEVEL 8

static __always_inline void count(enum counter index, __u64 n)
{
	__u32 key = index;
	__u64 *value = bpf_map_lookup_elem(&counters, &key);

	/* Per-CPU, yet atomic: a softirq program can interrupt one running in process context. */
	if (value)
		__sync_fetch_and_add(value, n);
}

static __always_inline bool is_loopback(__be32 ip)
{
	return (ip & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

/* The IPv4-mapped form of an IPv4 address (::ffff:a.b.c.d): how struct ip_address holds it. */
static __always_inline void set_mapped(struct ip_address *addr, __be32 ip)
{
	addr->word[0] = 0;
	addr->word[1] = 0;
	addr->word[2] = bpf_htonl(0xffff);
	addr->word[3] = ip;
}

static __always_inline bool is_mapped(const struct ip_address *addr)
{
	return addr->word[0] == 0 && addr->word[1] == 0 && addr->word[2] == bpf_htonl(0xffff);
}

static __always_inline bool is_ipv6_loopback(const struct ip_address *addr)
{
	return addr->word[0] == 0 && addr->word[1] == 0 && addr->word[2] == 0 &&
	       addr->word[3] == bpf_htonl(1);
}

static __always_inline bool is_zero(const struct ip_address *addr)
{
	return !(addr->word[0] | addr->word[1] | addr->word[2] | addr->word[3]);
}

static __always_inline bool same_address(const struct ip_address *a, const struct ip_address *b)
{
	return a->word[0] == b->word[0] && a->word[1] == b->word[1] && a->word[2] == b->word[2] &&
	       a->word[3] == b->word[3];
}

/* 127.0.0.0/8 (mapped) or ::1: addresses that repeat in every network namespace. */
static __always_inline bool is_any_loopback(const struct ip_address *addr)
{
	return (is_mapped(addr) && is_loopback(addr->word[3])) || is_ipv6_loopback(addr);
}

static __always_inline bool tuple_is_loopback(const struct sock_tuple *tuple)
{
	return is_any_loopback(&tuple->local_ip) || is_any_loopback(&tuple->remote_ip);
}

/*
 * bpf_sock_ops and sk_msg_md present remote_port as the __be16 shifted into
 * the upper half of the u32 on little-endian hosts (and in the lower half on
 * big-endian ones), while local_port is in host byte order.
 */
static __always_inline __be16 ctx_remote_port(__u32 remote_port)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	return (__be16)(remote_port >> 16);
#else
	return (__be16)remote_port;
#endif
}

/* The pod the current task belongs to: its nearest cgroup ancestor that is a pod. */
static __always_inline struct pod_info *current_pod(__u64 *pod_cgroup_id)
{
	for (int level = 1; level <= MAX_CGROUP_LEVEL; level++) {
		__u64 id = bpf_get_current_ancestor_cgroup_id(level);
		struct pod_info *pod;

		if (!id)
			break; /* past the task's own cgroup */
		pod = bpf_map_lookup_elem(&pods, &id);
		if (pod) {
			*pod_cgroup_id = id;
			return pod;
		}
	}
	return NULL;
}

static __always_inline bool pod_port_excluded(__u64 pod_cgroup_id, __be16 port,
					      enum traffic_direction direction)
{
	struct pod_port_key key = {};

	key.pod_cgroup_id = pod_cgroup_id;
	key.port = port;
	key.direction = direction;
	return bpf_map_lookup_elem(&pod_ports, &key) != NULL;
}

/*
 * Who the mesh's OUTPUT rules exempt as its proxy: Istio's by uid and by gid alike,
 * Linkerd's and Kuma's by uid only (a process with only the proxy's gid is an app there).
 */
static __always_inline bool is_sidecar(const struct pod_info *pod, __u64 uid_gid)
{
	if ((__u32)uid_gid == pod->sidecar_uid)
		return true;
	return !(pod->flags & POD_SIDECAR_UID_ONLY) && (__u32)(uid_gid >> 32) == pod->sidecar_uid;
}

/* A query the pod's mesh would send to its proxy's DNS server (is_sidecar() aside). */
static __always_inline bool captures_dns(const struct pod_info *pod, __u32 user_port)
{
	return (pod->flags & POD_DNS_CAPTURE) && pod->dns_port &&
	       (__be16)user_port == bpf_htons(DNS_PORT);
}

static __always_inline __be32 localhost(void)
{
	return bpf_htonl(0x7f000001); /* 127.0.0.1, where iptables REDIRECT sends OUTPUT traffic */
}

/*
 * An IPv6 socket's address from a context's four words (user_ip6, local_ip6, ...): the
 * verifier allows only 4-byte reads at constant offsets from the context pointer, so the
 * reads are volatile (clang would otherwise share one pointer between two branches' reads).
 */
#define READ_IP6(dst, words)                                                                     \
	do {                                                                                     \
		(dst)->word[0] = *(volatile __u32 *)&(words)[0];                                 \
		(dst)->word[1] = *(volatile __u32 *)&(words)[1];                                 \
		(dst)->word[2] = *(volatile __u32 *)&(words)[2];                                 \
		(dst)->word[3] = *(volatile __u32 *)&(words)[3];                                 \
	} while (0)

#define WRITE_IP6(words, src)                                                                    \
	do {                                                                                     \
		(words)[0] = (src)->word[0];                                                     \
		(words)[1] = (src)->word[1];                                                     \
		(words)[2] = (src)->word[2];                                                     \
		(words)[3] = (src)->word[3];                                                     \
	} while (0)

/* The pod's own address of the connection's family; false if it has none. */
static __always_inline bool pod_address(const struct pod_info *pod, bool ipv4,
					struct ip_address *own)
{
	if (ipv4) {
		set_mapped(own, pod->ip);
		return pod->ip != 0;
	}
	*own = pod->ipv6;
	return !is_zero(own);
}

/*
 * A sock_addr hook's user address in the maps' form, and back. `ipv6_socket` is
 * a constant at every call: each hook keeps to its own context fields
 * (connect4 may touch only user_ip4, connect6 only user_ip6).
 */
static __always_inline void read_address(struct bpf_sock_addr *ctx, bool ipv6_socket,
					 struct ip_address *addr)
{
	if (ipv6_socket)
		READ_IP6(addr, ctx->user_ip6);
	else
		set_mapped(addr, ctx->user_ip4);
}

static __always_inline void write_address(struct bpf_sock_addr *ctx, bool ipv6_socket,
					  const struct ip_address *addr)
{
	if (ipv6_socket)
		WRITE_IP6(ctx->user_ip6, addr);
	else
		ctx->user_ip4 = addr->word[3];
}

/* Send the connect or datagram to `addr`:`port` instead. */
static __always_inline void steer(struct bpf_sock_addr *ctx, bool ipv6_socket,
				  const struct ip_address *addr, __be16 port)
{
	write_address(ctx, ipv6_socket, addr);
	ctx->user_port = port;
}

/*
 * Where ip6tables REDIRECT sends OUTPUT traffic of the socket's family: [::1], or
 * ::ffff:127.0.0.1 for an IPv4 connection on an IPv6 socket (iptables' rules see it).
 */
static __always_inline void set_localhost(struct ip_address *addr, bool mapped)
{
	if (mapped) {
		set_mapped(addr, localhost());
	} else {
		addr->word[0] = 0;
		addr->word[1] = 0;
		addr->word[2] = 0;
		addr->word[3] = bpf_htonl(1);
	}
}

/*
 * Most of the pod's recent application connections sent once (struct
 * app_reuse): joining a sockhash costs each new socket more than redirecting
 * one message saves, so its application hops are left to TCP (connect4).
 */
static __always_inline bool short_lived(const struct app_reuse *reuse)
{
	return reuse->connections >= APP_REUSE_SAMPLES && 2 * reuse->reused < reuse->connections;
}

/* The pod's use changed: its next APP_REUSE_SAMPLES connections join while it learns anew. */
static __always_inline void learn_anew(struct app_reuse *reuse)
{
	reuse->connections = 0;
	reuse->reused = 0;
	reuse->skipped = 0;
}

/*
 * As a receiver: tell the socket's senders how much of what they redirected
 * it has read. Its own queue is the one socket a program may look at
 * (bpf_skc_to_tcp_sock, for loaders with CAP_PERFMON).
 */
static __always_inline void report_consumed(struct bpf_sock *sk, const struct sock_tuple *self)
{
	struct receive_queue *queue = bpf_map_lookup_elem(&receive_queues, self);
	struct sock___meshaccel *own;
	__u64 redirected, unread;

	if (!queue)
		return;
	own = (struct sock___meshaccel *)bpf_skc_to_tcp_sock(sk);
	if (!own)
		return;
	redirected = queue->redirected;
	unread = (__u32)own->sk_backlog.rmem_alloc.counter;
	/* Consumption only grows; an unread figure above what was redirected proves nothing. */
	if (redirected > unread && redirected - unread > queue->consumed)
		queue->consumed = redirected - unread;
}

#endif /* MESHACCEL_HELPERS_H */
