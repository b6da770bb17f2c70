/*
 * run_guest - run a flat guest image on kvmfs ($KVMFS_MNT set) or on /dev/kvm (unset),
 * printing one line per exit.
 *
 *   gcc -Wall -I clients -o run_guest tools/run_guest.c
 *   ./run_guest build/guests/mmio64.bin 0x1000 long64
 *   KVMFS_MNT=mnt ./run_guest build/guests/io_ports.bin 0x1000 real
 *
 * The VM has one 512 KiB memslot at gpa 0 (memfd memory) holding the image at
 * GPA; gpa 0xD0000 and everything from 0x80000 up is MMIO.  Modes, set up with
 * KVM_SET_SREGS (after KVM_SET_CPUID2 with the supported list):
 *   real    CS selector 0 base 0, RIP = GPA, RSP 0x8000
 *   long64  64-bit CPL 0: GDT at 0x500, identity page tables at 0x20000 (1 GiB in
 *           2 MiB pages, plus 4 KiB pages 0x800000 -> 0x5000 and 0x801000 -> 0xD0000),
 *           IDT limit 0, RIP = GPA, RSP 0x8000
 * The VMM answers IN with bytes 0x41, 0x42, ... and MMIO reads with 0x81, 0x82, ...
 * (the default patterns of tests/guestcases.py).  Each exit prints the line format
 * of tests/guestcases.py, followed by the registers; RIP is left out at OUT exits
 * (where it stands there is host-specific).  Bytes sent to port 0xE9 are gathered
 * into `text "..."` lines.  It stops at HLT, SHUTDOWN, INTERNAL_ERROR, FAIL_ENTRY,
 * an OUT to port 0xFF, or a failed KVM_RUN; exits 0 when the guest got that far.
 */
#include "kvmfs.h"

#include <stdint.h>

#define RAM_SIZE 0x80000
#define STACK_TOP 0x8000
#define GDT_GPA 0x500
#define PT_GPA 0x20000
#define MMIO_GPA 0xD0000
#define END_PORT 0xFF
#define MAX_RUNS 100000

static const char *where = "/dev/kvm";

static int fail(const char *what)
{
	fprintf(stderr, "run_guest: %s failed on %s: %s\n", what, where, strerror(errno));
	return 2;
}

static void put64(unsigned char *mem, uint64_t gpa, uint64_t v)
{
	memcpy(mem + gpa, &v, 8);
}

static void seg(struct kvm_segment *s, __u16 sel, int code, int l)
{
	memset(s, 0, sizeof(*s));
	s->limit = 0xffffffff;
	s->selector = sel;
	s->type = code ? 11 : 3;
	s->present = 1;
	s->s = 1;
	s->g = 1;
	s->l = l;
	s->db = l ? 0 : 1;
}

static int setup_long64(int vcpu, unsigned char *mem, struct kvm_sregs *s)
{
	static const uint64_t gdt[] = {
		0, 0x00CF9B000000FFFFull, 0x00CF93000000FFFFull, 0x00AF9B000000FFFFull,
	};
	uint64_t pml4 = PT_GPA, pdpt = PT_GPA + 0x1000, pd = PT_GPA + 0x2000, pt = PT_GPA + 0x3000;
	int i;

	(void)vcpu;
	memcpy(mem + GDT_GPA, gdt, sizeof(gdt));
	put64(mem, pml4, pdpt | 0x23);
	put64(mem, pdpt, pd | 0x23);
	for (i = 0; i < 512; i++)
		put64(mem, pd + 8 * i, (uint64_t)i << 21 | 0xE3);
	put64(mem, pd + 8 * (0x800000 >> 21), pt | 0x23);
	put64(mem, pt, 0x5000 | 0x63);
	put64(mem, pt + 8, MMIO_GPA | 0x63);
	s->gdt.base = GDT_GPA;
	s->gdt.limit = sizeof(gdt) - 1;
	s->idt.base = 0;
	s->idt.limit = 0;
	seg(&s->cs, 0x18, 1, 1);
	seg(&s->ds, 0x10, 0, 0);
	s->es = s->fs = s->gs = s->ss = s->ds;
	s->cr3 = pml4;
	s->cr4 = 0x20;
	s->efer = 0x500;
	s->cr0 = 0x80000011;
	return 0;
}

static int set_cpuid(int sys_fd, int vcpu)
{
	struct kvm_cpuid2 *c;
	int rc;

	c = calloc(1, sizeof(*c) + 256 * sizeof(struct kvm_cpuid_entry2));
	if (!c)
		return -1;
	c->nent = 256;
	rc = ioctl(sys_fd, KVM_GET_SUPPORTED_CPUID, c);
	if (rc == 0)
		rc = ioctl(vcpu, KVM_SET_CPUID2, c);
	free(c);
	return rc;
}

static const char *reason_name(__u32 r)
{
	switch (r) {
	case KVM_EXIT_UNKNOWN: return "UNKNOWN";
	case KVM_EXIT_IO: return "IO";
	case KVM_EXIT_HLT: return "HLT";
	case KVM_EXIT_MMIO: return "MMIO";
	case KVM_EXIT_IRQ_WINDOW_OPEN: return "IRQ_WINDOW_OPEN";
	case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
	case KVM_EXIT_INTR: return "INTR";
	case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
	case KVM_EXIT_SYSTEM_EVENT: return "SYSTEM_EVENT";
	case KVM_EXIT_MEMORY_FAULT: return "MEMORY_FAULT";
	default: return NULL;
	}
}

static void hex(const unsigned char *p, size_t n)
{
	while (n--)
		printf("%02x", *p++);
}

static void flush_text(char *text, size_t *len)
{
	size_t i;

	if (!*len)
		return;
	printf("text '");
	for (i = 0; i < *len; i++) {
		unsigned char c = (unsigned char)text[i];

		if (c == '\n')
			printf("\\n");
		else if (c == '\\' || c == '\'')
			printf("\\%c", c);
		else if (c >= ' ' && c < 0x7f)
			putchar(c);
		else
			printf("\\x%02x", c);
	}
	printf("'\n");
	*len = 0;
}

int main(int argc, char **argv)
{
	static char text[1 << 16];
	size_t text_len = 0;
	const char *mnt = kvmfs_default_mnt();
	unsigned long long gpa;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	unsigned char *mem;
	int sys_fd, vm, vcpu, size, long64, n, i;
	FILE *f;
	size_t len;

	if (argc != 4 || (strcmp(argv[3], "real") && strcmp(argv[3], "long64"))) {
		fprintf(stderr, "usage: run_guest IMAGE GPA real|long64\n");
		return 2;
	}
	if (mnt)
		where = mnt;
	gpa = strtoull(argv[2], NULL, 0);
	long64 = !strcmp(argv[3], "long64");

	mem = kvmfs_alloc_guest_memory(RAM_SIZE);
	if (!mem)
		return fail("allocating guest memory");
	f = fopen(argv[1], "rb");
	if (!f)
		return fail(argv[1]);
	if (gpa >= RAM_SIZE) {
		fprintf(stderr, "run_guest: gpa 0x%llx outside the slot\n", gpa);
		return 2;
	}
	len = fread(mem + gpa, 1, RAM_SIZE - gpa, f);
	fclose(f);
	if (!len)
		return fail("reading the image");

	sys_fd = kvmfs_open_system(NULL);
	if (sys_fd < 0)
		return fail("opening the system fd");
	vm = kvmfs_create_vm(sys_fd, 0);
	if (vm < 0)
		return fail("KVM_CREATE_VM");
	if (kvmfs_set_memslot(vm, 0, 0, 0, 0, RAM_SIZE, mem) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");
	vcpu = kvmfs_create_vcpu(vm, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	size = ioctl(sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	run = size > 0 ? kvmfs_map_run(vcpu, (size_t)size) : NULL;
	if (!run)
		return fail("mapping kvm_run");
	if (set_cpuid(sys_fd, vcpu) < 0)
		return fail("KVM_SET_CPUID2");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	if (long64)
		setup_long64(vcpu, mem, &sregs);
	else
		sregs.cs.selector = 0, sregs.cs.base = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = gpa;
	regs.rsp = STACK_TOP;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");

	for (n = 0; n < MAX_RUNS; n++) {
		int rc = ioctl(vcpu, KVM_RUN, 0), err = errno, is_out = 0, done = 0;
		const char *name = reason_name(run->exit_reason);
		unsigned char *io = (unsigned char *)run + run->io.data_offset;

		if (rc == 0 && run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT &&
		    run->io.port == 0xE9 && text_len + run->io.size * run->io.count < sizeof(text)) {
			memcpy(text + text_len, io, run->io.size * run->io.count);
			text_len += run->io.size * run->io.count;
			continue;
		}
		flush_text(text, &text_len);
		if (rc < 0) {
			printf("%s exit_reason=", err == EINTR ? "EINTR" : err == EFAULT ? "EFAULT" : "errno");
			done = 1;
		}
		if (name)
			printf("%s", name);
		else
			printf("%u", run->exit_reason);
		if (rc == 0) {
			switch (run->exit_reason) {
			case KVM_EXIT_IO:
				is_out = run->io.direction == KVM_EXIT_IO_OUT;
				printf(" %s port=0x%x size=%u count=%u", is_out ? "out" : "in", run->io.port,
				       run->io.size, run->io.count);
				if (is_out) {
					printf(" data=");
					hex(io, (size_t)run->io.size * run->io.count);
					done = run->io.port == END_PORT;
				} else {
					for (i = 0; i < run->io.size * (int)run->io.count; i++)
						io[i] = (unsigned char)(0x41 + i);
				}
				break;
			case KVM_EXIT_MMIO:
				printf(" %s addr=0x%llx len=%u", run->mmio.is_write ? "write" : "read",
				       (unsigned long long)run->mmio.phys_addr, run->mmio.len);
				if (run->mmio.is_write) {
					printf(" data=");
					hex(run->mmio.data, run->mmio.len);
				} else {
					for (i = 0; i < (int)run->mmio.len; i++)
						run->mmio.data[i] = (unsigned char)(0x81 + i);
				}
				break;
			case KVM_EXIT_INTERNAL_ERROR:
				printf(" suberror=%u", run->internal.suberror);
				done = 1;
				break;
			case KVM_EXIT_HLT:
			case KVM_EXIT_SHUTDOWN:
			case KVM_EXIT_FAIL_ENTRY:
			case KVM_EXIT_UNKNOWN:
				done = 1;
				break;
			}
		}
		if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
			return fail("KVM_GET_REGS");
		printf(" | rax=0x%llx rbx=0x%llx rcx=0x%llx rdx=0x%llx rsi=0x%llx rdi=0x%llx rsp=0x%llx",
		       (unsigned long long)regs.rax, (unsigned long long)regs.rbx,
		       (unsigned long long)regs.rcx, (unsigned long long)regs.rdx,
		       (unsigned long long)regs.rsi, (unsigned long long)regs.rdi,
		       (unsigned long long)regs.rsp);
		if (!is_out)
			printf(" rip=0x%llx", (unsigned long long)regs.rip);
		printf(" rflags=0x%llx\n", (unsigned long long)regs.rflags);
		fflush(stdout);
		if (done)
			break;
	}
	flush_text(text, &text_len);
	munmap(run, (size_t)size);
	close(vcpu);
	close(vm);
	close(sys_fd);
	munmap(mem, RAM_SIZE);
	return n < MAX_RUNS ? 0 : 1;
}
