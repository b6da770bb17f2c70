/*
 * bench_memslots.c - KVM_SET_USER_MEMORY_REGION add/delete cost with K other
 * slots present, on a kvmfs mount or on /dev/kvm (KVMFS_MNT unset).
 *
 *   bench_memslots K N      -> prints "<ns per add> <ns per delete>"
 *
 * K 4 KiB slots are created first (one memfd, every other page, so no two are
 * adjacent), then N times: add one more slot, delete it.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#include "kvmfs.h"

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s K N\n", argv[0]);
		return 2;
	}
	long k = atol(argv[1]), n = atol(argv[2]);
	int sys_fd = kvmfs_open_system(kvmfs_default_mnt());
	int vm_fd = sys_fd < 0 ? -1 : kvmfs_create_vm(sys_fd, 0);
	if (vm_fd < 0) {
		perror("create vm");
		return 1;
	}
	size_t size = (size_t)(2 * k + 2) * 4096;
	char *mem = kvmfs_alloc_guest_memory(size);
	if (!mem) {
		perror("guest memory");
		return 1;
	}
	for (long i = 0; i < k; i++) {
		struct kvm_userspace_memory_region r = {
			.slot = (unsigned)i, .guest_phys_addr = (uint64_t)(2 * i) << 12,
			.memory_size = 4096, .userspace_addr = (uint64_t)(uintptr_t)(mem + 2 * i * 4096)};
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
			perror("add slot");
			return 1;
		}
	}
	struct kvm_userspace_memory_region r = {
		.slot = (unsigned)k, .guest_phys_addr = (uint64_t)(2 * k) << 12, .memory_size = 4096,
		.userspace_addr = (uint64_t)(uintptr_t)(mem + 2 * k * 4096)};
	double add = 0, del = 0;
	for (long i = 0; i < n; i++) {
		double t0 = now_ns();
		r.memory_size = 4096;
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
			perror("add");
			return 1;
		}
		double t1 = now_ns();
		r.memory_size = 0;
		if (ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
			perror("delete");
			return 1;
		}
		double t2 = now_ns();
		add += t1 - t0;
		del += t2 - t1;
	}
	printf("%.0f %.0f\n", add / n, del / n);
	return 0;
}
