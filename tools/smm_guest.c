/*
 * smm_guest - a 16-bit guest interrupted by KVM_SMI: its SMM handler runs from
 * SMRAM, reads and changes the state-save map, and RSM goes back to the guest.
 *
 *   gcc -Wall -I clients -o smm_guest tools/smm_guest.c
 *   KVMFS_MNT=mnt ./smm_guest
 *
 * Two 512 KiB memslots of memfd memory at gpa 0: RAM in address space 0 and
 * SMRAM in address space 1.  The guest (real mode, RAM 0x1000) sets AX and BX,
 * writes AL to port 0x10 and 0x11 and halts.  At the exit for port 0x10 the VMM
 * injects an SMI; at the next KVM_RUN the vCPU saves its state at SMBASE + 0xFE00
 * (the 32-bit map: no long mode in CPUID) and runs the handler at
 * SMBASE + 0x8000, which exists only in SMRAM.  The handler writes 0x99 to port
 * 0x20, the saved EIP to port 0x21, stores 0xbeef as the saved EAX and executes
 * RSM, so the guest's write to port 0x11 shows 0xef.  Each exit prints one line;
 * at HLT it prints the map's fields, whether RAM stayed untouched where the map
 * would be without address space 1, and MSR_IA32_SMBASE.  Exits 0 when every
 * ioctl worked and the guest halted.
 */
#include "kvmfs.h"

#define MEM_SIZE (512 << 10)
#define CODE_GPA 0x1000
#define SMBASE 0x30000
#define MAP (SMBASE + 0xfe00)
#define MSR_IA32_SMBASE 0x9e

static const char *where = "/dev/kvm";

static int fail(const char *what)
{
	fprintf(stderr, "smm_guest: %s failed on %s: %s\n", what, where, strerror(errno));
	return 1;
}

/* mov ax, 0x1234; mov bx, 0x5678; out 0x10, al; out 0x11, al; hlt */
static const unsigned char guest_code[] = {
	0xb8, 0x34, 0x12, 0xbb, 0x78, 0x56, 0xe6, 0x10, 0xe6, 0x11, 0xf4,
};

/*
 * At SMBASE + 0x8000, in big real mode with CS base SMBASE, so the map is
 * reached through 32-bit offsets from DS base 0 (SMRAM is at gpa 0 of its
 * address space):
 *   mov al, 0x99; out 0x20, al
 *   addr32 mov eax, [0x3fff0]            ; saved EIP
 *   out 0x21, eax
 *   addr32 mov dword [0x3ffd0], 0xbeef   ; saved EAX
 *   rsm
 */
static const unsigned char smm_handler[] = {
	0xb0, 0x99, 0xe6, 0x20,
	0x67, 0x66, 0xa1, 0xf0, 0xff, 0x03, 0x00,
	0x66, 0xe7, 0x21,
	0x67, 0x66, 0xc7, 0x05, 0xd0, 0xff, 0x03, 0x00, 0xef, 0xbe, 0x00, 0x00,
	0x0f, 0xaa,
};

static __u32 get32(const char *mem, unsigned off)
{
	__u32 v;

	memcpy(&v, mem + off, sizeof(v));
	return v;
}

static const char *exit_name(__u32 reason)
{
	switch (reason) {
	case KVM_EXIT_IO: return "IO";
	case KVM_EXIT_HLT: return "HLT";
	case KVM_EXIT_MMIO: return "MMIO";
	case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";
	case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
	case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
	default: return NULL;
	}
}

static int print_exit(int vcpu, struct kvm_run *run)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	const char *name = exit_name(run->exit_reason);

	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
		return fail("KVM_GET_REGS");
	if (name)
		printf("exit=%s", name);
	else
		printf("exit=%u", run->exit_reason);
	if (run->exit_reason == KVM_EXIT_IO) {
		unsigned long long data = 0;

		/* Little-endian: the low io.size bytes of `data` are the OUT data. */
		if (run->io.size <= sizeof(data))
			memcpy(&data, (char *)run + run->io.data_offset, run->io.size);
		printf(" port=0x%x size=%u data=0x%llx", run->io.port, run->io.size, data);
	}
	printf(" smm=%d cs_base=0x%llx rip=0x%llx rax=0x%llx\n",
	       run->flags & KVM_RUN_X86_SMM ? 1 : 0, (unsigned long long)sregs.cs.base,
	       (unsigned long long)regs.rip, (unsigned long long)regs.rax);
	return 0;
}

static int run_guest(int vcpu, struct kvm_run *run)
{
	struct kvm_vcpu_events events;
	int i, smi_sent = 0;

	for (i = 0; i < 16; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			return fail("KVM_RUN");
		if (print_exit(vcpu, run))
			return 1;
		if (run->exit_reason == KVM_EXIT_HLT)
			return 0;
		if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT) {
			fprintf(stderr, "smm_guest: unexpected exit\n");
			return 1;
		}
		if (!smi_sent) {
			/* Pending until the next KVM_RUN, which enters SMM. */
			if (ioctl(vcpu, KVM_SMI, 0) < 0)
				return fail("KVM_SMI");
			if (ioctl(vcpu, KVM_GET_VCPU_EVENTS, &events) < 0)
				return fail("KVM_GET_VCPU_EVENTS");
			printf("smi pending=%u smm=%u\n", events.smi.pending, events.smi.smm);
			smi_sent = 1;
		}
	}
	fprintf(stderr, "smm_guest: guest did not halt\n");
	return 1;
}

static int setup_vcpu(int vcpu)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");
	return 0;
}

static int print_smbase_msr(int vcpu)
{
	struct {
		struct kvm_msrs hdr;
		struct kvm_msr_entry entry;
	} msrs;

	memset(&msrs, 0, sizeof(msrs));
	msrs.hdr.nmsrs = 1;
	msrs.entry.index = MSR_IA32_SMBASE;
	if (ioctl(vcpu, KVM_GET_MSRS, &msrs) != 1)
		return fail("KVM_GET_MSRS (MSR_IA32_SMBASE)");
	printf("smbase msr=0x%llx\n", (unsigned long long)msrs.entry.data);
	return 0;
}

int main(void)
{
	const char *mnt = kvmfs_default_mnt();
	struct kvm_run *run;
	char *ram, *smram;
	int sys_fd, vm_fd, vcpu, size, i, untouched;

	if (mnt)
		where = mnt;
	sys_fd = kvmfs_open_system(NULL);
	if (sys_fd < 0)
		return fail("opening the system fd");
	vm_fd = kvmfs_create_vm(sys_fd, KVM_X86_DEFAULT_VM);
	if (vm_fd < 0)
		return fail("KVM_CREATE_VM");

	ram = kvmfs_alloc_guest_memory(MEM_SIZE);
	smram = kvmfs_alloc_guest_memory(MEM_SIZE);
	if (!ram || !smram)
		return fail("allocating guest memory");
	if (kvmfs_set_memslot(vm_fd, 0, 0, 0, 0, MEM_SIZE, ram) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION (RAM, address space 0)");
	if (kvmfs_set_memslot(vm_fd, 1, 0, 0, 0, MEM_SIZE, smram) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION (SMRAM, address space 1)");
	memcpy(ram + CODE_GPA, guest_code, sizeof(guest_code));
	memcpy(smram + SMBASE + 0x8000, smm_handler, sizeof(smm_handler));

	vcpu = kvmfs_create_vcpu(vm_fd, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	size = ioctl(sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (size < 0)
		return fail("KVM_GET_VCPU_MMAP_SIZE");
	run = kvmfs_map_run(vcpu, (size_t)size);
	if (!run)
		return fail("mapping kvm_run");
	if (setup_vcpu(vcpu) || run_guest(vcpu, run))
		return 1;

	/* The state save went to SMRAM; the handler's store to saved EAX is there too. */
	printf("map eip=0x%x eflags=0x%x cr0=0x%x smbase=0x%x revision=0x%x ebx=0x%x\n",
	       get32(smram, MAP + 0x1f0), get32(smram, MAP + 0x1f4), get32(smram, MAP + 0x1fc),
	       get32(smram, MAP + 0xf8), get32(smram, MAP + 0xfc), get32(smram, MAP + 0x1dc));
	untouched = 1;
	for (i = MAP; i < MAP + 0x200; i++)
		if (ram[i])
			untouched = 0;
	printf("ram map untouched=%d\n", untouched);
	if (print_smbase_msr(vcpu))
		return 1;

	munmap(run, (size_t)size);
	munmap(ram, MEM_SIZE);
	munmap(smram, MEM_SIZE);
	close(vcpu);
	close(vm_fd);
	close(sys_fd);
	return 0;
}
