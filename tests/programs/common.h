/*
 * Small helpers shared by the test programs: plain KVM through <linux/kvm.h> and libc.
 *
 * Every program opens /dev/kvm, maps each vCPU's kvm_run area from the vCPU fd (size
 * from KVM_GET_VCPU_MMAP_SIZE) and prints deterministic lines on stdout: no addresses,
 * fd numbers or timings.  An unexpected failure prints one line on stderr and exits 1.
 *
 * Guest code is written in assembler inside the program (GUEST below) and copied into
 * guest memory; two set-ups are offered: real mode (CS base 0), and 64-bit code at CPL 3
 * with IOPL 3 (page tables and a GDT built here), which a PVM host runs natively on its
 * shadow MMU rather than in KVM's instruction emulator.
 */
#ifndef TEST_PROGRAMS_COMMON_H
#define TEST_PROGRAMS_COMMON_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

/* GUEST(name, "asm"): the bytes name[0 .. name##_end) of the assembled guest code. The
 * code states its own mode (.code16 or .code64); labels are numeric and local. */
#define GUEST(name, code)                                                        \
	extern const unsigned char name[], name##_end[];                         \
	__asm__(".pushsection .rodata\n"                                         \
		".globl " #name "\n.hidden " #name "\n"                          \
		".globl " #name "_end\n.hidden " #name "_end\n"                  \
		#name ":\n" code "\n" #name "_end:\n"                            \
		".code64\n.popsection\n")

static const char *prog_name = "program";

static inline void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "%s: ", prog_name);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static inline const char *errname(int e)
{
	switch (e) {
	case 0: return "0";
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EINTR: return "EINTR";
	case EIO: return "EIO";
	case ENXIO: return "ENXIO";
	case E2BIG: return "E2BIG";
	case EBADF: return "EBADF";
	case EAGAIN: return "EAGAIN";
	case ENOMEM: return "ENOMEM";
	case EACCES: return "EACCES";
	case EFAULT: return "EFAULT";
	case EBUSY: return "EBUSY";
	case EEXIST: return "EEXIST";
	case ENODEV: return "ENODEV";
	case EINVAL: return "EINVAL";
	case ENOSPC: return "ENOSPC";
	case ENOTTY: return "ENOTTY";
	case ENOSYS: return "ENOSYS";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case EHWPOISON: return "EHWPOISON";
	default: return "E?";
	}
}

/* "0", "5" for a nonnegative result, else "-1 ENAME". */
static inline const char *result_str(int ret, int err)
{
	static char buf[64];

	if (ret >= 0)
		snprintf(buf, sizeof(buf), "%d", ret);
	else
		snprintf(buf, sizeof(buf), "-1 %s", errname(err));
	return buf;
}

/* result_str of a call's result and the errno it left: res(ioctl(...)). */
static inline const char *res(int ret)
{
	return result_str(ret, errno);
}

static inline const char *exit_name(uint32_t reason)
{
	static char buf[32];

	switch (reason) {
	case KVM_EXIT_UNKNOWN: return "UNKNOWN";
	case KVM_EXIT_IO: return "IO";
	case KVM_EXIT_DEBUG: return "DEBUG";
	case KVM_EXIT_HLT: return "HLT";
	case KVM_EXIT_MMIO: return "MMIO";
	case KVM_EXIT_IRQ_WINDOW_OPEN: return "IRQ_WINDOW_OPEN";
	case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
	case KVM_EXIT_INTR: return "INTR";
	case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
	case 39: return "MEMORY_FAULT";           /* KVM_EXIT_MEMORY_FAULT (Linux 6.8) */
	default:
		snprintf(buf, sizeof(buf), "exit%u", reason);
		return buf;
	}
}

/* ioctl that must succeed: its result, or die naming it. */
#define XIOCTL(fd, req, arg) xioctl_((fd), (req), (arg), #req)
static inline int xioctl_(int fd, unsigned long req, void *arg, const char *name)
{
	int r = ioctl(fd, req, arg);

	if (r < 0)
		die("%s: %s (%s)", name, errname(errno), strerror(errno));
	return r;
}
#define XIOCTLV(fd, req, val) xioctlv_((fd), (req), (unsigned long)(val), #req)
static inline int xioctlv_(int fd, unsigned long req, unsigned long val, const char *name)
{
	int r = ioctl(fd, req, val);

	if (r < 0)
		die("%s: %s (%s)", name, errname(errno), strerror(errno));
	return r;
}

static inline int kvm_open(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open /dev/kvm: %s", strerror(errno));
	if (ioctl(fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("KVM_GET_API_VERSION is not %d", KVM_API_VERSION);
	return fd;
}

static inline int create_vm(int kvm)
{
	return XIOCTLV(kvm, KVM_CREATE_VM, 0);
}

static inline void set_region(int vm, uint32_t slot, uint64_t gpa, uint64_t size, void *hva)
{
	struct kvm_userspace_memory_region r = {
		.slot = slot, .flags = 0, .guest_phys_addr = gpa,
		.memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)hva,
	};

	XIOCTL(vm, KVM_SET_USER_MEMORY_REGION, &r);
}

/* Guest RAM from a memfd, mapped MAP_SHARED. */
static inline void *memfd_ram(size_t size)
{
	int fd = memfd_create("guest", MFD_CLOEXEC);
	void *p;

	if (fd < 0 || ftruncate(fd, size) < 0)
		die("memfd for guest RAM: %s", strerror(errno));
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die("mmap guest RAM: %s", strerror(errno));
	close(fd);
	return p;
}

/* Guest RAM from private anonymous memory. */
static inline void *anon_ram(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	if (p == MAP_FAILED)
		die("mmap anonymous guest RAM: %s", strerror(errno));
	return p;
}

static inline size_t vcpu_mmap_size(int kvm)
{
	int n = XIOCTLV(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);

	if ((size_t)n < sizeof(struct kvm_run))
		die("KVM_GET_VCPU_MMAP_SIZE %d is below sizeof(struct kvm_run)", n);
	return n;
}

/* The vCPU fd's kvm_run area. */
static inline struct kvm_run *map_run(int kvm, int vcpu)
{
	void *p = mmap(NULL, vcpu_mmap_size(kvm), PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);

	if (p == MAP_FAILED)
		die("mmap of the vCPU fd: %s", strerror(errno));
	return p;
}

/* KVM_RUN: 0, or -errno. */
static inline int run_vcpu(int vcpu)
{
	return ioctl(vcpu, KVM_RUN, 0) < 0 ? -errno : 0;
}

static inline void xrun(int vcpu)
{
	int r = run_vcpu(vcpu);

	if (r < 0)
		die("KVM_RUN: %s (%s)", errname(-r), strerror(-r));
}

static inline unsigned char *io_data(struct kvm_run *run)
{
	return (unsigned char *)run + run->io.data_offset;
}

/* One line for an exit: "IO out port=0x10 size=1 count=1 data=41", "HLT", ... */
static inline const char *describe_exit(struct kvm_run *run)
{
	static char buf[512];
	int n = snprintf(buf, sizeof(buf), "%s", exit_name(run->exit_reason));

	if (run->exit_reason == KVM_EXIT_IO) {
		n += snprintf(buf + n, sizeof(buf) - n, " %s port=0x%x size=%u count=%u",
			      run->io.direction == KVM_EXIT_IO_OUT ? "out" : "in",
			      run->io.port, run->io.size, run->io.count);
		if (run->io.direction == KVM_EXIT_IO_OUT) {
			unsigned i, len = run->io.size * run->io.count;

			n += snprintf(buf + n, sizeof(buf) - n, " data=");
			for (i = 0; i < len && n < (int)sizeof(buf) - 3; i++)
				n += snprintf(buf + n, sizeof(buf) - n, "%02x", io_data(run)[i]);
		}
	} else if (run->exit_reason == KVM_EXIT_MMIO) {
		snprintf(buf + n, sizeof(buf) - n, " %s addr=0x%llx len=%u",
			 run->mmio.is_write ? "write" : "read",
			 (unsigned long long)run->mmio.phys_addr, run->mmio.len);
	} else if (run->exit_reason == KVM_EXIT_INTERNAL_ERROR) {
		snprintf(buf + n, sizeof(buf) - n, " suberror=%u", run->internal.suberror);
	}
	return buf;
}

/* The OUT data of an IO exit as a little-endian number (size 1, 2 or 4, count 1). */
static inline uint32_t out_value(struct kvm_run *run)
{
	uint32_t v = 0;

	memcpy(&v, io_data(run), run->io.size <= 4 ? run->io.size : 4);
	return v;
}

static inline int is_io(struct kvm_run *run, int dir, unsigned port)
{
	return run->exit_reason == KVM_EXIT_IO && run->io.direction == dir && run->io.port == port;
}

/* The exit must be an OUT to `port`: its value, else die. */
static inline uint32_t expect_out(struct kvm_run *run, unsigned port)
{
	if (!is_io(run, KVM_EXIT_IO_OUT, port))
		die("expected an OUT to port 0x%x, got %s", port, describe_exit(run));
	return out_value(run);
}

/* Real mode at CS:IP 0:rip, RFLAGS 0x2, RSP 0x8000 (other GPRs as they are). */
static inline void setup_real(int vcpu, uint64_t rip)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	XIOCTL(vcpu, KVM_GET_SREGS, &s);
	s.cs.selector = 0;
	s.cs.base = 0;
	XIOCTL(vcpu, KVM_SET_SREGS, &s);
	memset(&r, 0, sizeof(r));
	r.rip = rip;
	r.rsp = 0x8000;
	r.rflags = 0x2;
	XIOCTL(vcpu, KVM_SET_REGS, &r);
}

static inline void put64(void *mem, uint64_t off, uint64_t v)
{
	memcpy((char *)mem + off, &v, 8);
}

static inline void flat_seg(struct kvm_segment *s, uint16_t sel, int code, int dpl, int l)
{
	memset(s, 0, sizeof(*s));
	s->base = 0;
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = code ? 11 : 3;
	s->present = 1;
	s->dpl = dpl;
	s->db = l ? 0 : 1;
	s->s = 1;
	s->l = l;
	s->g = 1;
}

#define USER64_GDT_GPA 0x500
#define USER64_PT_SIZE 0x3000

/*
 * 64-bit mode at CPL 3 with IOPL 3 (OUT and IN allowed, no HLT: a CPL-3 guest ends
 * with an OUT): a GDT at gpa 0x500 and 4-level page tables at pt_gpa (three pages:
 * PML4, PDPT, PD) identity-mapping the first GiB in 2 MiB user pages with A and D set,
 * written through `low`, the host address of gpa 0.  IDT limit 0: any exception is a
 * triple fault.  CPUID is the supported list.
 */
static inline void setup_user64(int kvm, int vcpu, void *low, uint64_t pt_gpa, uint64_t rip)
{
	static const uint64_t gdt[] = {
		0, 0x00CF9B000000FFFFull, 0x00CF93000000FFFFull, 0x00AF9B000000FFFFull,
		0x00CF93000000FFFFull, 0x00AFFB000000FFFFull, 0x00CFF3000000FFFFull,
	};
	struct {
		struct kvm_cpuid2 c;
		struct kvm_cpuid_entry2 e[256];
	} cpuid;
	struct kvm_sregs s;
	struct kvm_regs r;
	int i;

	memset(&cpuid, 0, sizeof(cpuid));
	cpuid.c.nent = 256;
	XIOCTL(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid);
	XIOCTL(vcpu, KVM_SET_CPUID2, &cpuid);

	memcpy((char *)low + USER64_GDT_GPA, gdt, sizeof(gdt));
	put64(low, pt_gpa, (pt_gpa + 0x1000) | 0x27);               /* P RW U A */
	put64(low, pt_gpa + 0x1000, (pt_gpa + 0x2000) | 0x27);
	for (i = 0; i < 512; i++)
		put64(low, pt_gpa + 0x2000 + 8 * i, (uint64_t)i << 21 | 0xE7);   /* + PS D */

	XIOCTL(vcpu, KVM_GET_SREGS, &s);
	s.gdt.base = USER64_GDT_GPA;
	s.gdt.limit = sizeof(gdt) - 1;
	s.idt.base = 0;
	s.idt.limit = 0;
	flat_seg(&s.cs, 0x2b, 1, 3, 1);
	flat_seg(&s.ds, 0x33, 0, 3, 0);
	s.es = s.fs = s.gs = s.ss = s.ds;
	s.cr3 = pt_gpa;
	s.cr4 = 0x20;                    /* PAE */
	s.efer = 0x500;                  /* LME LMA */
	s.cr0 = 0x80000011;              /* PG ET PE */
	XIOCTL(vcpu, KVM_SET_SREGS, &s);

	memset(&r, 0, sizeof(r));
	r.rip = rip;
	r.rsp = 0x8000;
	r.rflags = 0x3002;               /* IOPL 3 */
	XIOCTL(vcpu, KVM_SET_REGS, &r);
}

#endif
