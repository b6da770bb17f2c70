/*
 * mmu_cases: what a guest sees when the VMM changes the host mapping of its RAM
 * (KVM's MMU notifiers at work).
 *
 * Slot 0 (gpa 0, a memfd) holds the GDT, the code and the page tables; slot 1 is the
 * RAM: 64 KiB of private anonymous memory at gpa 0x100000.  The guest (64-bit, CPL 3)
 * serves commands: IN port 0x20 gives the command (1 store, 2 load), IN 0x21 the gpa,
 * IN 0x22 the value to store; a store is acknowledged by an OUT of the value to port
 * 0x31, a load answered by an OUT of the dword read to port 0x30.
 *
 * (a) the guest stores; mprotect(PROT_READ) of the RAM: a guest load still works, a
 *     guest store makes KVM_RUN fail with EFAULT (again on a retry); after
 *     mprotect(PROT_READ | PROT_WRITE) the next KVM_RUN completes the store;
 * (b) madvise(MADV_DONTNEED) of a page the guest wrote: the guest reads zero;
 * (c) mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS) of a fresh page over a guest page:
 *     the VMM's new value reaches the guest, and the guest's store reaches the VMM;
 * (d) munmap of a guest page: a guest load makes KVM_RUN fail with EFAULT; once the
 *     page is mapped again the same load completes (reading zero).
 *
 * The guest runs at CPL 3 because on a PVM host that is the shadow-MMU path, which is
 * KVM's: CPL-0 code there runs in KVM's instruction emulator, where a write to a
 * read-only or unmapped host page is reported as an MMIO exit instead of EFAULT (a host
 * quirk).  exit_reason after EFAULT is not printed: it is not defined unless it is
 * KVM_EXIT_MEMORY_FAULT, and this kernel leaves 0 there.
 */
#include "common.h"

#define LOW_SIZE 0x10000
#define CODE_GPA 0x1000
#define PT_GPA 0x8000
#define RAM_GPA 0x100000
#define RAM_SIZE 0x10000
#define PAGE 0x1000

GUEST(guest_code,
	".code64\n"
	"1: in $0x20, %eax\n"
	"mov %eax, %ebx\n"
	"in $0x21, %eax\n"
	"mov %eax, %edi\n"
	"cmp $1, %ebx\n"
	"jne 2f\n"
	"in $0x22, %eax\n"
	"mov %eax, (%rdi)\n"
	"out %eax, $0x31\n"
	"jmp 1b\n"
	"2: mov (%rdi), %eax\n"
	"out %eax, $0x30\n"
	"jmp 1b\n");

enum { STORE = 1, LOAD = 2 };

static int vcpu;
static struct kvm_run *run;
static unsigned char *ram;

/* Run the guest's command loop until it answers the command: 0 and *answer, or the
 * failing KVM_RUN's -errno (call again with the same arguments to resume). */
static int command(uint32_t op, uint32_t gpa, uint32_t value, uint32_t *answer)
{
	int r, i;

	for (i = 0; i < 10; i++) {
		r = run_vcpu(vcpu);
		if (r < 0)
			return r;
		if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN &&
		    run->io.size == 4 && run->io.count == 1) {
			uint32_t v = run->io.port == 0x20 ? op : run->io.port == 0x21 ? gpa : value;

			memcpy(io_data(run), &v, 4);
			continue;
		}
		if (is_io(run, KVM_EXIT_IO_OUT, op == STORE ? 0x31 : 0x30)) {
			*answer = out_value(run);
			return 0;
		}
		die("unexpected exit %s", describe_exit(run));
	}
	die("no answer to command %u after 10 exits", op);
}

static void report(const char *what, int r, uint32_t answer)
{
	if (r < 0)
		printf("%s -> KVM_RUN -1 %s\n", what, errname(-r));
	else
		printf("%s -> 0x%x\n", what, answer);
}

static void guest_store(const char *label, uint32_t gpa, uint32_t value)
{
	char what[128];
	uint32_t a = 0;
	int r;

	snprintf(what, sizeof(what), "%s: guest stores 0x%x at 0x%x", label, value, gpa);
	r = command(STORE, gpa, value, &a);
	report(what, r, a);
}

static void guest_load(const char *label, uint32_t gpa)
{
	char what[128];
	uint32_t a = 0;
	int r;

	snprintf(what, sizeof(what), "%s: guest loads 0x%x", label, gpa);
	r = command(LOAD, gpa, 0, &a);
	report(what, r, a);
}

static void vmm_reads(const char *label, uint32_t gpa)
{
	uint32_t v;

	memcpy(&v, ram + (gpa - RAM_GPA), 4);
	printf("%s: vmm reads 0x%x at 0x%x\n", label, v, gpa);
}

static void xmprotect(int prot)
{
	if (mprotect(ram, RAM_SIZE, prot) < 0)
		die("mprotect: %s", strerror(errno));
}

static void map_fresh(uint32_t gpa)
{
	void *want = ram + (gpa - RAM_GPA);

	if (mmap(want, PAGE, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
		 -1, 0) != want)
		die("mmap MAP_FIXED: %s", strerror(errno));
}

int main(void)
{
	unsigned char *low;
	uint32_t a = 0, v;
	int kvm, vm, r;

	prog_name = "mmu_cases";
	kvm = kvm_open();
	vm = create_vm(kvm);
	low = memfd_ram(LOW_SIZE);
	ram = anon_ram(RAM_SIZE);
	memcpy(low + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, LOW_SIZE, low);
	set_region(vm, 1, RAM_GPA, RAM_SIZE, ram);
	vcpu = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	run = map_run(kvm, vcpu);
	setup_user64(kvm, vcpu, low, PT_GPA, CODE_GPA);

	/* (a) mprotect */
	guest_store("a", 0x100000, 0x11111111);
	xmprotect(PROT_READ);
	printf("a: mprotect(PROT_READ)\n");
	guest_load("a", 0x100000);
	guest_store("a", 0x100000, 0x22222222);
	r = command(STORE, 0x100000, 0x22222222, &a);
	report("a: KVM_RUN again", r, a);
	xmprotect(PROT_READ | PROT_WRITE);
	printf("a: mprotect(PROT_READ | PROT_WRITE)\n");
	r = command(STORE, 0x100000, 0x22222222, &a);
	report("a: KVM_RUN again", r, a);
	vmm_reads("a", 0x100000);

	/* (b) MADV_DONTNEED */
	guest_store("b", 0x101000, 0x33333333);
	vmm_reads("b", 0x101000);
	if (madvise(ram + 0x1000, PAGE, MADV_DONTNEED) < 0)
		die("madvise: %s", strerror(errno));
	printf("b: madvise(MADV_DONTNEED)\n");
	vmm_reads("b", 0x101000);
	guest_load("b", 0x101000);

	/* (c) a fresh page mapped over a guest page */
	guest_store("c", 0x102000, 0x44444444);
	guest_load("c", 0x102000);
	map_fresh(0x102000);
	printf("c: mmap(MAP_FIXED) of a fresh page\n");
	vmm_reads("c", 0x102000);
	v = 0x55555555;
	memcpy(ram + 0x2000, &v, 4);
	printf("c: vmm stores 0x%x at 0x102000\n", v);
	guest_load("c", 0x102000);
	guest_store("c", 0x102000, 0x66666666);
	vmm_reads("c", 0x102000);

	/* (d) munmap */
	guest_store("d", 0x103000, 0x77777777);
	if (munmap(ram + 0x3000, PAGE) < 0)
		die("munmap: %s", strerror(errno));
	printf("d: munmap\n");
	guest_load("d", 0x103000);
	map_fresh(0x103000);
	printf("d: mmap(MAP_FIXED) of the page again\n");
	r = command(LOAD, 0x103000, 0, &a);
	report("d: KVM_RUN again", r, a);
	guest_store("d", 0x103000, 0x88888888);
	vmm_reads("d", 0x103000);
	guest_load("d", 0x100000);
	return 0;
}
