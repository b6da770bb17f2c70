/*
 * bench_raw.c - a VMM written against <linux/kvm.h> only, for `kvmfs run`:
 * the same binary runs on /dev/kvm and, unmodified, on kvmfs through the
 * preload library or the seccomp supervisor.
 *
 *   bench_raw exit N REPS       ns per OUT-exit round trip (real mode, `out; jmp`)
 *   bench_raw convert MIB REPS  ns for KVM_SET_USER_MEMORY_REGION of MIB MiB of touched
 *                               private anonymous memory (kvmfs run converts it)
 *   bench_raw munmap MIB REPS   ns for munmap of MIB MiB (0: a page) of touched memory registered
 *                               as a slot (kvmfs run: an MMU-notifier invalidation)
 * One line per repetition.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

static uint64_t now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

struct vm {
	int kvm, vm, vcpu;
	struct kvm_run *run;
	uint8_t *low;
};

static void vm_open(struct vm *v)
{
	struct kvm_userspace_memory_region r = {0};
	struct kvm_sregs s;
	struct kvm_regs regs = {0};
	int fd = memfd_create("bench-low", MFD_CLOEXEC);
	long size;

	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0)
		die("/dev/kvm");
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		die("KVM_CREATE_VM");
	if (fd < 0 || ftruncate(fd, 0x10000))
		die("memfd");
	v->low = mmap(NULL, 0x10000, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	/* out dx, al; jmp $-3 */
	memcpy(v->low + 0x1000, "\xee\xeb\xfd", 3);
	r.memory_size = 0x10000;
	r.userspace_addr = (uintptr_t)v->low;
	if (ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &r))
		die("KVM_SET_USER_MEMORY_REGION");
	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die("KVM_CREATE_VCPU");
	size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	v->run = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap vcpu");
	if (ioctl(v->vcpu, KVM_GET_SREGS, &s))
		die("KVM_GET_SREGS");
	s.cs.base = 0;
	s.cs.selector = 0;
	if (ioctl(v->vcpu, KVM_SET_SREGS, &s))
		die("KVM_SET_SREGS");
	regs.rip = 0x1000;
	regs.rdx = 0x10;
	regs.rflags = 2;
	if (ioctl(v->vcpu, KVM_SET_REGS, &regs))
		die("KVM_SET_REGS");
}

static void run_once(struct vm *v)
{
	if (ioctl(v->vcpu, KVM_RUN, 0))
		die("KVM_RUN");
}

int main(int argc, char **argv)
{
	struct vm v;
	long n, reps;

	if (argc != 4)
		return 2;
	n = atol(argv[2]);
	reps = atol(argv[3]);
	vm_open(&v);
	for (long rep = 0; rep < reps; rep++) {
		uint64_t t0, t;
		if (!strcmp(argv[1], "exit")) {
			run_once(&v);
			t0 = now();
			for (long i = 0; i < n; i++)
				run_once(&v);
			t = (now() - t0) / n;
		} else {
			size_t size = n ? (size_t)n << 20 : 4096;     /* 0: one page */
			uint8_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
					  MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
			struct kvm_userspace_memory_region r = {
				.slot = 1, .guest_phys_addr = 1ull << 32, .memory_size = size,
				.userspace_addr = (uintptr_t)p,
			};
			if (p == MAP_FAILED)
				die("mmap");
			for (size_t i = 0; i < size; i += 4096)
				p[i] = 1;
			t0 = now();
			if (ioctl(v.vm, KVM_SET_USER_MEMORY_REGION, &r))
				die("KVM_SET_USER_MEMORY_REGION");
			t = now() - t0;
			if (!strcmp(argv[1], "munmap")) {
				t0 = now();
				munmap(p, size);
				t = now() - t0;
			} else {
				munmap(p, size);
			}
			r.memory_size = 0;
			if (ioctl(v.vm, KVM_SET_USER_MEMORY_REGION, &r))
				die("delete slot");
		}
		printf("%llu\n", (unsigned long long)t);
	}
	return 0;
}
