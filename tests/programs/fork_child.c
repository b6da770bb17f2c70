/*
 * fork_child: a VM belongs to the process (the mm) that created it.
 *
 * The parent creates a VM and a vCPU and runs its real-mode guest (OUT of a counter to
 * port 0x10 in a loop) once, then forks.  The child tries KVM_RUN, KVM_GET_REGS,
 * KVM_SET_USER_MEMORY_REGION and KVM_CREATE_VCPU on the inherited VM and vCPU fds
 * (KVM answers EIO: `kvm->mm != current->mm`), KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY)
 * on the inherited system fd (it works), and creates a VM of its own through that fd,
 * with a vCPU; then it exits.  The parent runs its guest again, which goes on where it
 * stopped.  Printed: each result, with errno names.
 */
#include "common.h"

#include <sys/wait.h>

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000

GUEST(guest_code,
	".code16\n"
	"xor %ax, %ax\n"
	"1: out %al, $0x10\n"
	"inc %ax\n"
	"jmp 1b\n");

static void report(const char *who, const char *what, int ret)
{
	printf("%s: %s -> %s\n", who, what, res(ret));
}

static void child(int kvm, int vm, int vcpu, void *ram)
{
	struct kvm_userspace_memory_region region = {
		.slot = 1, .guest_phys_addr = 0x100000, .memory_size = 0x1000,
		.userspace_addr = (uint64_t)(uintptr_t)ram,
	};
	struct kvm_regs regs;
	int r, vm2;

	report("child", "KVM_RUN", ioctl(vcpu, KVM_RUN, 0));
	report("child", "KVM_GET_REGS", ioctl(vcpu, KVM_GET_REGS, &regs));
	report("child", "KVM_SET_USER_MEMORY_REGION", ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region));
	report("child", "KVM_CREATE_VCPU", ioctl(vm, KVM_CREATE_VCPU, 1) < 0 ? -1 : 0);
	report("child", "KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the system fd",
	       ioctl(kvm, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY));
	vm2 = ioctl(kvm, KVM_CREATE_VM, 0);
	report("child", "KVM_CREATE_VM on the system fd", vm2 < 0 ? -1 : 0);
	if (vm2 >= 0) {
		r = ioctl(vm2, KVM_CREATE_VCPU, 0);
		report("child", "KVM_CREATE_VCPU on its own VM", r < 0 ? -1 : 0);
		if (r >= 0)
			close(r);
		close(vm2);
	}
	fflush(stdout);
	_exit(0);
}

int main(void)
{
	struct kvm_run *run;
	void *ram;
	int kvm, vm, vcpu, status;
	pid_t pid;

	prog_name = "fork_child";
	kvm = kvm_open();
	vm = create_vm(kvm);
	ram = memfd_ram(RAM_SIZE);
	memcpy((char *)ram + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, RAM_SIZE, ram);
	vcpu = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	run = map_run(kvm, vcpu);
	setup_real(vcpu, CODE_GPA);

	xrun(vcpu);
	printf("parent: run 1: %s\n", describe_exit(run));
	fflush(stdout);

	pid = fork();
	if (pid < 0)
		die("fork: %s", strerror(errno));
	if (pid == 0)
		child(kvm, vm, vcpu, ram);
	if (waitpid(pid, &status, 0) != pid)
		die("waitpid: %s", strerror(errno));
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		die("the child ended with status 0x%x", status);
	printf("parent: child exited 0\n");

	xrun(vcpu);
	printf("parent: run 2: %s\n", describe_exit(run));
	xrun(vcpu);
	printf("parent: run 3: %s\n", describe_exit(run));
	return 0;
}
