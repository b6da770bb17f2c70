/*
 * remap_stress: guest reads of a page racing the VMM's replacement of that page.
 *
 * Slot 0 (gpa 0, a memfd) holds the code, GDT and page tables and, at 0xc000, the
 * stable words: seq (u32 @0), stop (u32 @8) and ack (u32 @16).  Slot 1 is one page of
 * private anonymous memory at gpa 0x100000.  A VMM thread runs N cycles; cycle g:
 *     seq = 2g-1; mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS) a fresh page over the
 *     slot's page; write g into it; seq = 2g; wait until the guest acknowledges g.
 * The guest (64-bit, CPL 3, so a PVM host runs it natively on its shadow MMU) loops:
 *     s1 = seq; v = page; s2 = seq; if s1 == s2 and s1 is even, the page must hold
 *     s1/2 (the page was not being replaced meanwhile): if v differs it is a stale page,
 *     reported by an OUT to port 0x40, else it writes ack = s1/2.  Every 2^20 loops it
 *     OUTs its count to port 0x41; once stop is set it OUTs to port 0x42.
 * After N cycles the thread sets stop.  Printed: the generation reached, how many
 * generations the guest checked, and the number of stale reads (0).
 */
#include "common.h"

#include <pthread.h>
#include <sched.h>
#include <time.h>

#define LOW_SIZE 0x10000
#define CODE_GPA 0x1000
#define PT_GPA 0x8000
#define STABLE_GPA 0xc000
#define PAGE_GPA 0x100000
#define PAGE 0x1000
#define CYCLES 2000
#define DEADLINE_S 120

GUEST(guest_code,
	".code64\n"
	"mov $0xc000, %esi\n"
	"mov $0x100000, %edi\n"
	"xor %ecx, %ecx\n"
	"1: mov (%rsi), %eax\n"
	"mov (%rdi), %edx\n"
	"mov (%rsi), %ebx\n"
	"cmp %eax, %ebx\n"
	"jne 3f\n"
	"test $1, %eax\n"
	"jnz 3f\n"
	"shr %eax\n"
	"cmp %eax, %edx\n"
	"je 2f\n"
	"out %eax, $0x40\n"
	"jmp 3f\n"
	"2: mov %eax, 16(%rsi)\n"
	"3: inc %ecx\n"
	"test $0xfffff, %ecx\n"
	"jnz 4f\n"
	"mov %ecx, %eax\n"
	"out %eax, $0x41\n"
	"4: cmpl $0, 8(%rsi)\n"
	"je 1b\n"
	"mov %ecx, %eax\n"
	"out %eax, $0x42\n"
	"5: jmp 5b\n");

static unsigned char *low, *page;
static uint32_t reached;
static const char *thread_failed;

static uint32_t *stable(unsigned off)
{
	return (uint32_t *)(low + STABLE_GPA + off);
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *remapper(void *arg)
{
	double deadline = now() + DEADLINE_S;
	uint32_t g;

	(void)arg;
	for (g = 1; g <= CYCLES; g++) {
		__atomic_store_n(stable(0), 2 * g - 1, __ATOMIC_SEQ_CST);
		if (mmap(page, PAGE, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS,
			 -1, 0) != page) {
			thread_failed = "mmap(MAP_FIXED) failed";
			break;
		}
		__atomic_store_n((uint32_t *)page, g, __ATOMIC_SEQ_CST);
		__atomic_store_n(stable(0), 2 * g, __ATOMIC_SEQ_CST);
		reached = g;
		while (__atomic_load_n(stable(16), __ATOMIC_SEQ_CST) != g) {
			if (now() > deadline) {
				thread_failed = "the guest stopped acknowledging generations";
				goto out;
			}
			sched_yield();
		}
	}
out:
	__atomic_store_n(stable(8), 1, __ATOMIC_SEQ_CST);
	return NULL;
}

int main(void)
{
	struct kvm_run *run;
	pthread_t thread;
	unsigned stale = 0;
	int kvm, vm, vcpu;

	prog_name = "remap_stress";
	kvm = kvm_open();
	vm = create_vm(kvm);
	low = memfd_ram(LOW_SIZE);
	page = anon_ram(PAGE);
	memcpy(low + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, LOW_SIZE, low);
	set_region(vm, 1, PAGE_GPA, PAGE, page);
	vcpu = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	run = map_run(kvm, vcpu);
	setup_user64(kvm, vcpu, low, PT_GPA, CODE_GPA);

	if (pthread_create(&thread, NULL, remapper, NULL))
		die("pthread_create failed");
	for (;;) {
		xrun(vcpu);
		if (is_io(run, KVM_EXIT_IO_OUT, 0x40)) {
			struct kvm_regs regs;

			XIOCTL(vcpu, KVM_GET_REGS, &regs);
			if (stale++ < 5)
				fprintf(stderr, "remap_stress: stale read: generation %u published, page "
					"read 0x%llx\n", out_value(run), (unsigned long long)(uint32_t)regs.rdx);
			continue;
		}
		if (is_io(run, KVM_EXIT_IO_OUT, 0x41))
			continue;
		if (is_io(run, KVM_EXIT_IO_OUT, 0x42))
			break;
		die("unexpected exit %s", describe_exit(run));
	}
	if (pthread_join(thread, NULL))
		die("pthread_join failed");
	if (thread_failed)
		die("%s (generation %u, stale reads %u)", thread_failed, reached, stale);
	printf("generation reached: %u\n", reached);
	printf("generations the guest checked: %u\n", *stable(16));
	printf("stale reads: %u\n", stale);
	return stale ? 1 : 0;
}
