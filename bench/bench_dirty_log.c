/*
 * bench_dirty_log.c - KVM_GET_DIRTY_LOG on one big logged slot, on a kvmfs
 * mount or on /dev/kvm (KVMFS_MNT unset).
 *
 *   bench_dirty_log MIB N all|none   -> prints "<ns per call> <dirty pages reported>"
 *
 * "all": KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET makes every page
 * of the new slot dirty, and manual protection leaves the bits set, so each
 * call reports (and copies out) every page.  "none": a fresh slot, no page dirty.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvmfs.h"

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s MIB N all|none\n", argv[0]);
		return 2;
	}
	size_t size = (size_t)atol(argv[1]) << 20;
	long n = atol(argv[2]);
	int all = !strcmp(argv[3], "all");
	int sys_fd = kvmfs_open_system(kvmfs_default_mnt());
	int vm_fd = sys_fd < 0 ? -1 : kvmfs_create_vm(sys_fd, 0);
	if (vm_fd < 0) {
		perror("create vm");
		return 1;
	}
	if (all) {
		struct kvm_enable_cap cap = {.cap = KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, .args = {3}};
		if (ioctl(vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
			perror("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)");
			return 1;
		}
	}
	void *mem = kvmfs_alloc_guest_memory(size);
	if (!mem || kvmfs_set_memslot(vm_fd, 0, 0, KVM_MEM_LOG_DIRTY_PAGES, 0, size, mem) < 0) {
		perror("slot");
		return 1;
	}
	size_t words = (size >> 12) / 64;
	uint64_t *bitmap = calloc(words, 8);
	struct kvm_dirty_log log = {.slot = 0, .dirty_bitmap = bitmap};
	struct timespec a, b;
	clock_gettime(CLOCK_MONOTONIC, &a);
	for (long i = 0; i < n; i++)
		if (ioctl(vm_fd, KVM_GET_DIRTY_LOG, &log) < 0) {
			perror("KVM_GET_DIRTY_LOG");
			return 1;
		}
	clock_gettime(CLOCK_MONOTONIC, &b);
	long dirty = 0;
	for (size_t i = 0; i < words; i++)
		dirty += __builtin_popcountll(bitmap[i]);
	printf("%.0f %ld\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n, dirty);
	return 0;
}
