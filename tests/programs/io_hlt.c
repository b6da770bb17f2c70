/*
 * io_hlt: a real-mode guest's port I/O and HLT.
 *
 * The guest (CS base 0, RIP 0x1000, RAM from a memfd mapped MAP_SHARED) does OUTs of a
 * byte, a word and a dword to port 0x10, an IN of a byte from port 0x11 whose data the
 * VMM writes into the PIO data page, a `rep outsb` of "hello" to port 0x12 (one exit per
 * byte), then HLT.  Printed: each exit (reason, direction, port, size, count, data),
 * then RAX, RCX, RSI and RIP from KVM_GET_REGS.  RIP is not printed at the OUT exits:
 * where it stands there differs between KVM hosts.
 */
#include "common.h"

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define IN_VALUE 0x5a

GUEST(guest_code,
	".code16\n"
	"mov $0x41, %al\n"
	"out %al, $0x10\n"
	"mov $0x42, %al\n"
	"out %al, $0x10\n"
	"mov $0x1234, %ax\n"
	"out %ax, $0x10\n"
	"mov $0x89abcdef, %eax\n"
	"out %eax, $0x10\n"
	"in $0x11, %al\n"
	"mov $(2f - guest_code + 0x1000), %si\n"
	"mov $5, %cx\n"
	"mov $0x12, %dx\n"
	"cld\n"
	"rep outsb\n"
	"hlt\n"
	"2: .ascii \"hello\"\n");

int main(void)
{
	struct kvm_regs regs;
	struct kvm_run *run;
	unsigned char *ram;
	int kvm, vm, vcpu, exits = 0;

	prog_name = "io_hlt";
	kvm = kvm_open();
	vm = create_vm(kvm);
	ram = memfd_ram(RAM_SIZE);
	memcpy(ram + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, RAM_SIZE, ram);
	vcpu = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	run = map_run(kvm, vcpu);
	setup_real(vcpu, CODE_GPA);

	for (;;) {
		if (++exits > 100)
			die("the guest did not halt after 100 exits");
		xrun(vcpu);
		printf("%s\n", describe_exit(run));
		if (is_io(run, KVM_EXIT_IO_IN, 0x11) && run->io.size == 1 && run->io.count == 1) {
			io_data(run)[0] = IN_VALUE;
			continue;
		}
		if (run->exit_reason == KVM_EXIT_HLT)
			break;
		if (run->exit_reason != KVM_EXIT_IO)
			die("unexpected exit %s", describe_exit(run));
	}
	XIOCTL(vcpu, KVM_GET_REGS, &regs);
	printf("rax=0x%llx rcx=0x%llx rsi=0x%llx rip=0x%llx\n",
	       (unsigned long long)regs.rax, (unsigned long long)regs.rcx,
	       (unsigned long long)regs.rsi, (unsigned long long)regs.rip);
	return 0;
}
