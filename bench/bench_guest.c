/*
 * bench_guest.c - guest-running benchmarks for `make bench`, on a kvmfs mount
 * ($KVMFS_MNT) or on the host's /dev/kvm ($KVMFS_MNT unset).  Written against
 * <linux/kvm.h> and clients/kvmfs.h only; the guests are the hand-assembled
 * loops of the performance anchors (kvm_bench.c).
 *
 *   bench_guest exit    MODE N REPS          per rep: ns per KVM_RUN -> OUT exit round trip
 *   bench_guest compute MODE ITERS REPS      per rep: ns per guest instruction (one KVM_RUN
 *                                            = ITERS x {add, xor, dec, jnz}, then out)
 *   bench_guest memloop MODE ITERS REPS      per rep: ns per guest instruction of
 *                                            {add [rdi+rsi],eax; add esi,64; and esi,0xfffff;
 *                                            dec ecx; jnz} over a 1 MiB dirty-logged slot
 *                                            (KVM_GET_DIRTY_LOG between reps, not timed)
 *   bench_guest touch   MODE MIB REPS        per rep (fresh slot each time, logging on):
 *                                            "first clean getlog": ns per page of the first
 *                                            write to each page, ns per page of a write to a
 *                                            page re-protected by KVM_GET_DIRTY_LOG, ns of
 *                                            that GET_DIRTY_LOG (all pages dirty)
 *   bench_guest dirtylog MODE MIB REPS       per rep: "all none": ns of KVM_GET_DIRTY_LOG
 *                                            after the guest wrote every page of the slot
 *                                            (GET clears and re-protects), and right after
 *                                            (nothing dirty), and the best of 5 more calls
 *   bench_guest hostmap MIB REPS             per rep: ns per page of a first write through a
 *                                            second MAP_SHARED mapping of memfd memory the
 *                                            first mapping already populated (what the daemon
 *                                            pays on first use of a VMM page: a minor fault)
 *   bench_guest smp     NV MODE ITERS REPS   per rep: aggregate guest instructions per
 *                                            second of NV vCPUs, one thread each, each
 *                                            running the compute loop once
 *
 * MODE: real (16-bit real mode), long (64-bit CPL 0), user (64-bit CPL 3, IOPL 3).
 * touch, dirtylog and memloop need long or user.  Long mode identity-maps 4 GiB;
 * the data slot at 1 GiB is mapped with 4 KiB guest pages (BG_PAGES=2m: 2 MiB
 * pages), so a first touch on kvmfs walks 4 levels.  $BG_FRESH=1 leaves the data
 * memory unpopulated (by default the VMM writes every page before creating the
 * slot, so the figure is the MMU's fill cost and not the host's page allocation).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kvmfs.h"

#define die(...) do { fprintf(stderr, __VA_ARGS__); fprintf(stderr, " (errno %d: %s)\n", errno, \
			strerror(errno)); exit(1); } while (0)

#define LOW_SZ (4u << 20)
#define CODE_GPA 0x1000
#define PML4_GPA 0x10000
#define PDPT_GPA 0x11000
#define PD_GPA 0x12000          /* 4 PDs: 4 GiB */
#define PT_GPA 0x200000         /* 4 KiB tables of the data region: 2 MiB = 1 GiB of pages */
#define DATA_GPA 0x40000000ull
#define DATA_MAX (1ull << 30)
#define IO_PORT 0x10

enum mode { M_REAL, M_LONG, M_USER };

static double now_ns(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e9 + t.tv_nsec;
}

struct vm {
	int sys, fd;
	size_t run_sz;
	uint8_t *low;
	enum mode mode;
};

struct cpu {
	int fd;
	struct kvm_run *run;
};

static void vm_open(struct vm *v, enum mode mode)
{
	v->mode = mode;
	v->sys = kvmfs_open_system(kvmfs_default_mnt());
	if (v->sys < 0)
		die("open system fd");
	v->fd = kvmfs_create_vm(v->sys, 0);
	if (v->fd < 0)
		die("KVM_CREATE_VM");
	int sz = ioctl(v->sys, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (sz < 0)
		die("KVM_GET_VCPU_MMAP_SIZE");
	v->run_sz = sz;
	v->low = kvmfs_alloc_guest_memory(LOW_SZ);
	if (!v->low || kvmfs_set_memslot(v->fd, 0, 0, 0, 0, LOW_SZ, v->low) < 0)
		die("low memory slot");
	if (mode == M_REAL)
		return;
	uint64_t *pml4 = (uint64_t *)(v->low + PML4_GPA), *pdpt = (uint64_t *)(v->low + PDPT_GPA);
	uint64_t *pd = (uint64_t *)(v->low + PD_GPA), *pt = (uint64_t *)(v->low + PT_GPA);
	int big = getenv("BG_PAGES") && !strcmp(getenv("BG_PAGES"), "2m");
	pml4[0] = PDPT_GPA | 7;
	for (int i = 0; i < 4; i++)
		pdpt[i] = (PD_GPA + i * 4096) | 7;
	for (uint64_t i = 0; i < 4 * 512; i++)
		pd[i] = (i << 21) | 0x87;                       /* P RW US PS */
	if (!big) {
		for (uint64_t i = 0; i < 512; i++)              /* PD 1 covers [1 GiB, 2 GiB) */
			pd[512 + i] = (PT_GPA + i * 4096) | 7;
		for (uint64_t p = 0; p < DATA_MAX >> 12; p++)
			pt[p] = (DATA_GPA + (p << 12)) | 7;
	}
}

static void cpu_open(struct vm *v, struct cpu *c, int id)
{
	c->fd = kvmfs_create_vcpu(v->fd, id);
	if (c->fd < 0)
		die("KVM_CREATE_VCPU");
	c->run = kvmfs_map_run(c->fd, v->run_sz);
	if (!c->run)
		die("map kvm_run");
	struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = {.c.nent = 256};
	if (ioctl(v->sys, KVM_GET_SUPPORTED_CPUID, &cpuid) == 0)
		(void)ioctl(c->fd, KVM_SET_CPUID2, &cpuid);
	struct kvm_sregs s;
	if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0)
		die("KVM_GET_SREGS");
	if (v->mode == M_REAL) {
		s.cs.base = 0;
		s.cs.selector = 0;
		s.ds.base = 0;
		s.ds.selector = 0;
		s.es = s.fs = s.gs = s.ss = s.ds;
	} else {
		int user = v->mode == M_USER;
		s.cr3 = PML4_GPA;
		s.cr4 = 1u << 5;
		s.cr0 = 0x80050033;
		s.efer = 0x500;
		struct kvm_segment seg = {.base = 0, .limit = 0xffffffff, .selector = 1 << 3,
					  .present = 1, .type = 11, .dpl = 0, .db = 0, .s = 1, .l = 1, .g = 1};
		s.cs = seg;
		if (user) {
			s.cs.selector = (3 << 3) | 3;
			s.cs.dpl = 3;
		}
		seg.type = 3;
		seg.selector = 2 << 3;
		seg.l = 0;
		seg.db = 1;
		if (user) {
			seg.selector = (4 << 3) | 3;
			seg.dpl = 3;
		}
		s.ds = s.es = s.fs = s.gs = s.ss = seg;
	}
	if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0)
		die("KVM_SET_SREGS");
	struct kvm_regs r = {.rip = CODE_GPA, .rflags = v->mode == M_USER ? 0x3002 : 2,
			     .rdx = IO_PORT, .rsp = 0x8000};
	if (ioctl(c->fd, KVM_SET_REGS, &r) < 0)
		die("KVM_SET_REGS");
}

static void run_io(struct cpu *c)
{
	if (ioctl(c->fd, KVM_RUN, 0) < 0)
		die("KVM_RUN");
	if (c->run->exit_reason != KVM_EXIT_IO || c->run->io.port != IO_PORT) {
		struct kvm_regs r;
		ioctl(c->fd, KVM_GET_REGS, &r);
		fprintf(stderr, "unexpected exit %u (rip 0x%llx)\n", c->run->exit_reason,
			(unsigned long long)r.rip);
		exit(2);
	}
}

static enum mode parse_mode(const char *m)
{
	if (!strcmp(m, "real"))
		return M_REAL;
	if (!strcmp(m, "long"))
		return M_LONG;
	if (!strcmp(m, "user"))
		return M_USER;
	fprintf(stderr, "MODE: real, long or user\n");
	exit(2);
}

/* ------------------------------------------------------------------ guests -- */
static size_t code_exit(uint8_t *c)
{
	static const uint8_t k[] = {0xee, 0xeb, 0xfd};  /* out dx,al ; jmp $-1 */
	memcpy(c, k, sizeof(k));
	return sizeof(k);
}

static size_t code_compute(uint8_t *c, enum mode m, long iters)
{
	size_t n = 0;
	uint32_t it = (uint32_t)iters;
	if (m != M_REAL) {
		c[n++] = 0xb9;                                  /* mov ecx, iters */
		memcpy(c + n, &it, 4);
		n += 4;
		static const uint8_t body[] = {0x01, 0xc8, 0x31, 0xc3, 0xff, 0xc9, 0x75, 0xf8,
					       0xee, 0xeb, (uint8_t)-(5 + 8 + 3)};
		memcpy(c + n, body, sizeof(body));
		return n + sizeof(body);
	}
	c[n++] = 0x66;
	c[n++] = 0xb9;
	memcpy(c + n, &it, 4);
	n += 4;
	static const uint8_t body[] = {0x66, 0x01, 0xc8, 0x66, 0x31, 0xc3, 0x66, 0x49, 0x75, 0xf6,
				       0xee, 0xeb, (uint8_t)-(6 + 10 + 3)};
	memcpy(c + n, body, sizeof(body));
	return n + sizeof(body);
}

/* start: mov ecx,iters; mov rdi,DATA; xor esi,esi
 * l: add [rdi+rsi],eax; add esi,64; and esi,0xfffff; dec ecx; jnz l; out; jmp start */
static size_t code_memloop(uint8_t *c, long iters)
{
	size_t n = 0;
	uint32_t it = (uint32_t)iters;
	uint64_t data = DATA_GPA;
	c[n++] = 0xb9;
	memcpy(c + n, &it, 4);
	n += 4;
	c[n++] = 0x48;
	c[n++] = 0xbf;
	memcpy(c + n, &data, 8);
	n += 8;
	c[n++] = 0x31;
	c[n++] = 0xf6;
	size_t loop = n;
	static const uint8_t body[] = {0x01, 0x04, 0x37, 0x83, 0xc6, 0x40, 0x81, 0xe6, 0xff, 0xff,
				       0x0f, 0x00, 0xff, 0xc9};
	memcpy(c + n, body, sizeof(body));
	n += sizeof(body);
	c[n++] = 0x75;
	c[n] = (uint8_t)(loop - (n + 1));
	n++;
	c[n++] = 0xee;
	c[n++] = 0xeb;
	c[n] = (uint8_t)(0 - (n + 1));
	return n + 1;
}

/* start: mov rdi,DATA; mov rcx,npages; l: mov [rdi],al; add rdi,4096; dec rcx; jnz l;
 * out; jmp start */
static size_t code_touch(uint8_t *c, uint64_t npages)
{
	size_t n = 0;
	uint64_t data = DATA_GPA;
	uint32_t stride = 4096;
	c[n++] = 0x48;
	c[n++] = 0xbf;
	memcpy(c + n, &data, 8);
	n += 8;
	c[n++] = 0x48;
	c[n++] = 0xb9;
	memcpy(c + n, &npages, 8);
	n += 8;
	size_t loop = n;
	c[n++] = 0x88;
	c[n++] = 0x07;
	c[n++] = 0x48;
	c[n++] = 0x81;
	c[n++] = 0xc7;
	memcpy(c + n, &stride, 4);
	n += 4;
	c[n++] = 0x48;
	c[n++] = 0xff;
	c[n++] = 0xc9;
	c[n++] = 0x75;
	c[n] = (uint8_t)(loop - (n + 1));
	n++;
	c[n++] = 0xee;
	c[n++] = 0xeb;
	c[n] = (uint8_t)(0 - (n + 1));
	return n + 1;
}

/* --------------------------------------------------------------- data slot -- */
static uint8_t *data_slot(struct vm *v, size_t size, unsigned flags)
{
	uint8_t *mem = kvmfs_alloc_guest_memory(size);
	if (!mem)
		die("data memory");
	if (!getenv("BG_FRESH") || strcmp(getenv("BG_FRESH"), "1"))
		for (size_t o = 0; o < size; o += 4096)
			mem[o] = 1;                             /* host pages present */
	if (kvmfs_set_memslot(v->fd, 0, 1, flags, DATA_GPA, size, mem) < 0)
		die("data slot");
	return mem;
}

static void data_slot_drop(struct vm *v, uint8_t *mem, size_t size)
{
	if (kvmfs_set_memslot(v->fd, 0, 1, 0, DATA_GPA, 0, mem) < 0)
		die("delete data slot");
	kvmfs_invalidate(v->fd, mem, size);
	munmap(mem, size);
}

static double get_log(struct vm *v, uint64_t *bitmap, size_t words, long *dirty)
{
	struct kvm_dirty_log log = {.slot = 1, .dirty_bitmap = bitmap};
	double t0 = now_ns();
	if (ioctl(v->fd, KVM_GET_DIRTY_LOG, &log) < 0)
		die("KVM_GET_DIRTY_LOG");
	double t = now_ns() - t0;
	if (dirty) {
		long d = 0;
		for (size_t i = 0; i < words; i++)
			d += __builtin_popcountll(bitmap[i]);
		*dirty = d;
	}
	return t;
}

/* -------------------------------------------------------------- benchmarks -- */
static void bench_exit(enum mode m, long n, int reps)
{
	struct vm v;
	struct cpu c;
	vm_open(&v, m);
	code_exit(v.low + CODE_GPA);
	cpu_open(&v, &c, 0);
	for (int i = 0; i < 200; i++)
		run_io(&c);
	for (int r = 0; r < reps; r++) {
		double t0 = now_ns();
		for (long i = 0; i < n; i++)
			run_io(&c);
		printf("%.1f\n", (now_ns() - t0) / n);
		fflush(stdout);
	}
}

static void bench_compute(enum mode m, long iters, int reps, int mem)
{
	struct vm v;
	struct cpu c;
	uint8_t *data = NULL;
	vm_open(&v, m);
	if (mem) {
		if (m == M_REAL) {
			fprintf(stderr, "memloop needs long or user mode\n");
			exit(2);
		}
		code_memloop(v.low + CODE_GPA, iters);
		data = data_slot(&v, 1 << 20, KVM_MEM_LOG_DIRTY_PAGES);
	} else {
		code_compute(v.low + CODE_GPA, m, iters);
	}
	cpu_open(&v, &c, 0);
	uint64_t bitmap[4];
	run_io(&c);                                             /* warm: one full pass */
	double instrs = (mem ? 5.0 : 4.0) * iters;
	for (int r = 0; r < reps; r++) {
		if (mem)
			get_log(&v, bitmap, 4, NULL);
		double t0 = now_ns();
		run_io(&c);
		printf("%.4f\n", (now_ns() - t0) / instrs);
		fflush(stdout);
	}
	(void)data;
}

/* touch and dirtylog: a vCPU whose guest writes one byte per page of an MIB data slot */
static void touch_open(const char *what, enum mode m, size_t size, struct vm *v, struct cpu *c)
{
	if (m == M_REAL || size > DATA_MAX) {
		fprintf(stderr, "%s needs long or user mode and MIB <= 1024\n", what);
		exit(2);
	}
	vm_open(v, m);
	code_touch(v->low + CODE_GPA, size >> 12);
	cpu_open(v, c, 0);
}

static void bench_touch(enum mode m, long mib, int reps)
{
	struct vm v;
	struct cpu c;
	size_t size = (size_t)mib << 20, npages = size >> 12, words = (npages + 63) / 64;
	uint64_t *bitmap = calloc(words, 8);
	touch_open("touch", m, size, &v, &c);
	for (int r = 0; r < reps; r++) {
		uint8_t *mem = data_slot(&v, size, KVM_MEM_LOG_DIRTY_PAGES);
		double t0 = now_ns();
		run_io(&c);
		double first = (now_ns() - t0) / npages;
		long d;
		get_log(&v, bitmap, words, &d);
		if ((size_t)d != npages)
			fprintf(stderr, "warning: %ld dirty pages after the first pass, want %zu\n", d, npages);
		t0 = now_ns();
		run_io(&c);
		double clean = (now_ns() - t0) / npages;
		double g = get_log(&v, bitmap, words, &d);
		if ((size_t)d != npages)
			fprintf(stderr, "warning: %ld dirty pages after the second pass, want %zu\n", d, npages);
		printf("%.1f %.1f %.0f\n", first, clean, g);
		fflush(stdout);
		data_slot_drop(&v, mem, size);
	}
}

static void bench_dirtylog(enum mode m, long mib, int reps)
{
	struct vm v;
	struct cpu c;
	size_t size = (size_t)mib << 20, npages = size >> 12, words = (npages + 63) / 64;
	uint64_t *bitmap = calloc(words, 8);
	touch_open("dirtylog", m, size, &v, &c);
	data_slot(&v, size, KVM_MEM_LOG_DIRTY_PAGES);
	run_io(&c);                                             /* map every page */
	get_log(&v, bitmap, words, NULL);
	for (int r = 0; r < reps; r++) {
		long d;
		run_io(&c);                                     /* every page dirty again */
		double all = get_log(&v, bitmap, words, &d);
		if ((size_t)d != npages)
			fprintf(stderr, "warning: %ld dirty pages, want %zu\n", d, npages);
		double none = get_log(&v, bitmap, words, &d), steady = 1e18;
		if (d)
			fprintf(stderr, "warning: %ld dirty pages, want 0\n", d);
		for (int k = 0; k < 5; k++) {
			double t = get_log(&v, bitmap, words, NULL);
			steady = t < steady ? t : steady;
		}
		printf("%.0f %.0f %.0f\n", all, none, steady);
		fflush(stdout);
	}
}

static void bench_hostmap(long mib, int reps)
{
	size_t size = (size_t)mib << 20;
	for (int r = 0; r < reps; r++) {
		int fd = (int)syscall(SYS_memfd_create, "bench", 1U);
		if (fd < 0 || ftruncate(fd, (off_t)size) < 0)
			die("memfd");
		uint8_t *a = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		uint8_t *b = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (a == MAP_FAILED || b == MAP_FAILED)
			die("mmap");
		for (size_t o = 0; o < size; o += 4096)
			a[o] = 1;
		double t0 = now_ns();
		for (size_t o = 0; o < size; o += 4096)
			((volatile uint8_t *)b)[o] = 2;
		printf("%.1f\n", (now_ns() - t0) / (size >> 12));
		fflush(stdout);
		munmap(a, size);
		munmap(b, size);
		close(fd);
	}
}

struct smp_arg {
	struct cpu c;
	pthread_barrier_t *go;
};

static void *smp_thread(void *p)
{
	struct smp_arg *a = p;
	pthread_barrier_wait(a->go);
	run_io(&a->c);
	return NULL;
}

static void bench_smp(int nv, enum mode m, long iters, int reps)
{
	struct vm v;
	struct smp_arg a[64];
	pthread_t t[64];
	pthread_barrier_t go;
	if (nv < 1 || nv > 64)
		die("NV");
	vm_open(&v, m);
	code_compute(v.low + CODE_GPA, m, iters);
	for (int i = 0; i < nv; i++) {
		cpu_open(&v, &a[i].c, i);
		a[i].go = &go;
		run_io(&a[i].c);                                /* warm */
	}
	for (int r = 0; r < reps; r++) {
		pthread_barrier_init(&go, NULL, nv + 1);
		for (int i = 0; i < nv; i++)
			pthread_create(&t[i], NULL, smp_thread, &a[i]);
		pthread_barrier_wait(&go);
		double t0 = now_ns();
		for (int i = 0; i < nv; i++)
			pthread_join(t[i], NULL);
		double ns = now_ns() - t0;
		pthread_barrier_destroy(&go);
		printf("%.4f\n", ns / (4.0 * iters * nv));      /* ns per instruction, aggregate */
		fflush(stdout);
	}
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s exit|compute|memloop|touch|dirtylog MODE ARG REPS | "
			"smp NV MODE ITERS REPS\n", argv[0]);
		return 2;
	}
	const char *cmd = argv[1];
	if (!strcmp(cmd, "smp")) {
		if (argc < 6)
			return 2;
		bench_smp(atoi(argv[2]), parse_mode(argv[3]), atol(argv[4]), atoi(argv[5]));
		return 0;
	}
	if (!strcmp(cmd, "hostmap")) {
		bench_hostmap(atol(argv[2]), atoi(argv[3]));
		return 0;
	}
	enum mode m = parse_mode(argv[2]);
	if (argc < 5)
		return 2;
	long arg = atol(argv[3]);
	int reps = atoi(argv[4]);
	if (!strcmp(cmd, "exit"))
		bench_exit(m, arg, reps);
	else if (!strcmp(cmd, "compute"))
		bench_compute(m, arg, reps, 0);
	else if (!strcmp(cmd, "memloop"))
		bench_compute(m, arg, reps, 1);
	else if (!strcmp(cmd, "touch"))
		bench_touch(m, arg, reps);
	else if (!strcmp(cmd, "dirtylog"))
		bench_dirtylog(m, arg, reps);
	else {
		fprintf(stderr, "unknown command %s\n", cmd);
		return 2;
	}
	return 0;
}
