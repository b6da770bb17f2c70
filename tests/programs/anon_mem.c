/*
 * anon_mem: guest RAM from mmap(MAP_PRIVATE | MAP_ANONYMOUS), seen from both sides.
 *
 * The VMM writes the code, GDT, page tables and byte patterns into some pages (0x2000,
 * 0x4000) BEFORE KVM_SET_USER_MEMORY_REGION, and leaves others untouched (0x3000,
 * 0x5000, 0x6000).  The guest (64-bit, CPL 3) sums 256 bytes of pages 0x2000, 0x3000
 * and 0x4000, stores the sums at 0x6000 and OUTs them, stores a marker into the
 * untouched page 0x5000 and a byte into 0x2010, then OUTs to port 0x1f.  The VMM reads
 * the guest's stores through its own pointer and writes new values: into page 0x3000,
 * which the guest has only read so far, into 0x2000 and over the guest's marker.  On
 * the second run the guest sums again, reads 0x5000, and ends with an OUT to 0xff.
 * Printed: every value observed on either side.
 */
#include "common.h"

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define PT_GPA 0x8000

GUEST(guest_code,
	".code64\n"
	".macro sumpage addr, dst\n"
	"  mov $\\addr, %esi\n"
	"  xor %eax, %eax\n"
	"  mov $256, %ecx\n"
	"1: movzbl (%rsi), %edx\n"
	"  add %edx, %eax\n"
	"  inc %rsi\n"
	"  dec %ecx\n"
	"  jnz 1b\n"
	"  mov %eax, \\dst\n"
	"  out %eax, $0x10\n"
	".endm\n"
	"sumpage 0x2000, 0x6000\n"
	"sumpage 0x3000, 0x6004\n"
	"sumpage 0x4000, 0x6008\n"
	"movl $0xfeedface, 0x5000\n"
	"movb $0x99, 0x2010\n"
	"out %al, $0x1f\n"
	"sumpage 0x2000, 0x600c\n"
	"sumpage 0x3000, 0x6010\n"
	"sumpage 0x4000, 0x6014\n"
	"mov 0x5000, %eax\n"
	"out %eax, $0x11\n"
	"out %al, $0xff\n"
	"jmp .\n");

static uint32_t rd32(const unsigned char *ram, unsigned off)
{
	uint32_t v;

	memcpy(&v, ram + off, 4);
	return v;
}

/* Run to the next OUT: to port 0x10 or 0x11 (printed as `what`), or the end port. */
static void run_phase(int vcpu, struct kvm_run *run, unsigned end_port)
{
	static const char *const what[] = { "sum 0x2000", "sum 0x3000", "sum 0x4000" };
	int i = 0;

	for (;;) {
		xrun(vcpu);
		if (is_io(run, KVM_EXIT_IO_OUT, 0x10) && i < 3) {
			printf("guest: %s = %u\n", what[i++], out_value(run));
			continue;
		}
		if (is_io(run, KVM_EXIT_IO_OUT, 0x11)) {
			printf("guest: read 0x5000 = 0x%x\n", out_value(run));
			continue;
		}
		if (is_io(run, KVM_EXIT_IO_OUT, end_port) && i == 3)
			return;
		die("unexpected exit %s", describe_exit(run));
	}
}

int main(void)
{
	struct kvm_run *run;
	unsigned char *ram;
	int kvm, vm, vcpu, i;

	prog_name = "anon_mem";
	kvm = kvm_open();
	vm = create_vm(kvm);
	ram = anon_ram(RAM_SIZE);
	memcpy(ram + CODE_GPA, guest_code, guest_code_end - guest_code);
	for (i = 0; i < 256; i++) {
		ram[0x2000 + i] = (unsigned char)(i * 7 + 3);
		ram[0x4000 + i] = (unsigned char)(i & 0x3f);
	}
	vcpu = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	run = map_run(kvm, vcpu);
	setup_user64(kvm, vcpu, ram, PT_GPA, CODE_GPA);  /* writes GDT and tables into ram */
	set_region(vm, 0, 0, RAM_SIZE, ram);

	run_phase(vcpu, run, 0x1f);
	printf("vmm: 0x6000 = %u %u %u\n", rd32(ram, 0x6000), rd32(ram, 0x6004), rd32(ram, 0x6008));
	printf("vmm: 0x5000 = 0x%x\n", rd32(ram, 0x5000));
	printf("vmm: 0x2010 = 0x%x\n", ram[0x2010]);

	for (i = 0; i < 256; i++) {
		ram[0x3000 + i] = 1;
		ram[0x2000 + i] += 1;
	}
	memcpy(ram + 0x5000, "\x04\x03\x02\x01", 4);
	run_phase(vcpu, run, 0xff);
	printf("vmm: 0x600c = %u %u %u\n", rd32(ram, 0x600c), rd32(ram, 0x6010), rd32(ram, 0x6014));
	return 0;
}
