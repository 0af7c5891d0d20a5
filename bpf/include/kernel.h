/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The only kernel-internal field the datapath reads, declared CO-RE style:
 * libbpf relocates the access to the running kernel's layout at load, so no
 * vmlinux.h is needed and one build serves every kernel with BTF.
 */
#ifndef MESHACCEL_KERNEL_H
#define MESHACCEL_KERNEL_H

#include <linux/types.h>

/* struct sock: what its receive queues hold, in bytes (redirected ones included since 6.13). */
struct sock___meshaccel {
	struct {
		struct {
			int counter;
		} rmem_alloc;
	} sk_backlog;
} __attribute__((preserve_access_index));

#endif /* MESHACCEL_KERNEL_H */
