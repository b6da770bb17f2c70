/*
 * fd_games: what KVM's VM and vCPU fds do under dup, close and exec.
 *
 * - The VM and vCPU fds come with FD_CLOEXEC; dup and dup2 (to fd 200) give copies
 *   without it, fcntl(F_DUPFD_CLOEXEC) one with it; each copy answers VM ioctls.
 * - All four VM fds are closed: vCPU 0 still runs (the vCPU holds its VM).
 * - vCPU 0 runs through a dup of its fd after the original is closed, and through an
 *   F_DUPFD_CLOEXEC copy of that; then all its fds are closed and the last exit is
 *   read from the kvm_run mapping, which stays.
 * - The program execs itself (/proc/self/exe --after-exec NAME=FD ...).  In the new
 *   image the FD_CLOEXEC fds are gone (F_GETFD -> EBADF), while the copies made with
 *   dup and FD_CLOEXEC cleared survive: the system fd works as before (and creates a
 *   VM), but a VM or vCPU fd answers EIO, as in any other process than the creator's
 *   (the exec gave this process a new mm).
 * The guest is real mode: OUT of a counter to port 0x10 in a loop.
 */
#include "common.h"

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define HIGH_FD 200

GUEST(guest_code,
	".code16\n"
	"xor %ax, %ax\n"
	"1: out %al, $0x10\n"
	"inc %ax\n"
	"jmp 1b\n");

static int cloexec(int fd)
{
	int f = fcntl(fd, F_GETFD);

	if (f < 0)
		die("F_GETFD: %s", strerror(errno));
	return !!(f & FD_CLOEXEC);
}

static int xdup(int fd)
{
	int r = dup(fd);

	if (r < 0)
		die("dup: %s", strerror(errno));
	return r;
}

static int xdupfd_cloexec(int fd)
{
	int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);

	if (r < 0)
		die("F_DUPFD_CLOEXEC: %s", strerror(errno));
	return r;
}

/* A copy of fd without FD_CLOEXEC. */
static int inheritable_dup(int fd)
{
	int r = xdup(fd);

	if (fcntl(r, F_SETFD, 0) < 0)
		die("F_SETFD: %s", strerror(errno));
	return r;
}

static void vm_check(const char *name, int fd)
{
	int flag = cloexec(fd);
	const char *r = res(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY));

	printf("%s: FD_CLOEXEC=%d, KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) -> %s\n",
	       name, flag, r);
}

static void run_line(const char *what, int fd, struct kvm_run *run)
{
	xrun(fd);
	printf("%s: %s\n", what, describe_exit(run));
}

/* The new image: argv holds NAME=FD pairs; NAME's prefix says the fd's kind. */
static int after_exec(int argc, char **argv)
{
	struct kvm_regs regs;
	int i, fd, r;

	for (i = 0; i < argc; i++) {
		char *eq = strchr(argv[i], '=');

		if (!eq)
			die("bad argument %s", argv[i]);
		*eq = 0;
		fd = atoi(eq + 1);
		r = fcntl(fd, F_GETFD);
		printf("after exec: %s: F_GETFD -> %s\n", argv[i], res(r));
		if (r < 0)
			continue;
		if (!strncmp(argv[i], "sys", 3)) {
			printf("after exec: %s: KVM_GET_API_VERSION -> %s\n", argv[i],
			       res(ioctl(fd, KVM_GET_API_VERSION, 0)));
			printf("after exec: %s: KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) -> %s\n", argv[i],
			       res(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY)));
			r = ioctl(fd, KVM_CREATE_VM, 0);
			printf("after exec: %s: KVM_CREATE_VM -> %s\n", argv[i], res(r < 0 ? -1 : 0));
			if (r >= 0) {
				int v = ioctl(r, KVM_CREATE_VCPU, 0);

				printf("after exec: %s: KVM_CREATE_VCPU on the new VM -> %s\n", argv[i],
				       res(v < 0 ? -1 : 0));
				if (v >= 0)
					close(v);
				close(r);
			}
		} else if (!strncmp(argv[i], "vm", 2)) {
			printf("after exec: %s: KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) -> %s\n", argv[i],
			       res(ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY)));
			printf("after exec: %s: KVM_CREATE_VCPU -> %s\n", argv[i],
			       res(ioctl(fd, KVM_CREATE_VCPU, 1) < 0 ? -1 : 0));
		} else if (!strncmp(argv[i], "vcpu", 4)) {
			printf("after exec: %s: KVM_RUN -> %s\n", argv[i],
			       res(ioctl(fd, KVM_RUN, 0)));
			printf("after exec: %s: KVM_GET_REGS -> %s\n", argv[i],
			       res(ioctl(fd, KVM_GET_REGS, &regs)));
		}
	}
	return 0;
}

int main(int argc, char **argv)
{
	char args[10][32];
	char *exec_argv[12];
	struct kvm_run *run0, *run1;
	int kvm, vm, vm_dup, vm_dup2, vm_cx, vm_b, vcpu0, vcpu1, fd, fd2, n = 0;
	void *ram;

	prog_name = "fd_games";
	if (argc >= 2 && !strcmp(argv[1], "--after-exec"))
		return after_exec(argc - 2, argv + 2);

	kvm = kvm_open();
	vm = create_vm(kvm);
	ram = memfd_ram(RAM_SIZE);
	memcpy((char *)ram + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, RAM_SIZE, ram);
	vcpu0 = XIOCTLV(vm, KVM_CREATE_VCPU, 0);
	vcpu1 = XIOCTLV(vm, KVM_CREATE_VCPU, 1);
	printf("vcpu0 fd: FD_CLOEXEC=%d\n", cloexec(vcpu0));
	printf("vcpu1 fd: FD_CLOEXEC=%d\n", cloexec(vcpu1));
	run0 = map_run(kvm, vcpu0);
	run1 = map_run(kvm, vcpu1);
	setup_real(vcpu0, CODE_GPA);
	setup_real(vcpu1, CODE_GPA);

	vm_dup = xdup(vm);
	if (dup2(vm, HIGH_FD) != HIGH_FD)
		die("dup2: %s", strerror(errno));
	vm_dup2 = HIGH_FD;
	vm_cx = xdupfd_cloexec(vm);
	vm_check("vm fd", vm);
	vm_check("vm dup", vm_dup);
	vm_check("vm dup2", vm_dup2);
	vm_check("vm F_DUPFD_CLOEXEC", vm_cx);
	close(vm);
	close(vm_dup);
	close(vm_dup2);
	close(vm_cx);
	printf("closed every fd of the VM\n");
	run_line("vcpu0 run", vcpu0, run0);

	fd = xdup(vcpu0);
	close(vcpu0);
	run_line("vcpu0 run through a dup, original closed", fd, run0);
	fd2 = xdupfd_cloexec(fd);
	printf("vcpu0 F_DUPFD_CLOEXEC: FD_CLOEXEC=%d\n", cloexec(fd2));
	run_line("vcpu0 run through its F_DUPFD_CLOEXEC copy", fd2, run0);
	close(fd);
	close(fd2);
	printf("vcpu0 fds closed; kvm_run mapping says: %s\n", describe_exit(run0));

	run_line("vcpu1 run", vcpu1, run1);

	/* A second VM whose fd survives the exec through an inheritable copy. */
	vm_b = create_vm(kvm);
	printf("vm B fd: FD_CLOEXEC=%d\n", cloexec(vm_b));

	exec_argv[n++] = argv[0];
	exec_argv[n++] = "--after-exec";
#define ARG(name, fdv) (snprintf(args[n], sizeof(args[n]), "%s=%d", (name), (fdv)), \
			exec_argv[n] = args[n], n++)
	ARG("sys", kvm);
	ARG("vm-B", vm_b);
	ARG("vcpu1", vcpu1);
	ARG("vcpu1-F_DUPFD_CLOEXEC", xdupfd_cloexec(vcpu1));
	ARG("sys-inheritable-dup", inheritable_dup(kvm));
	ARG("vm-B-inheritable-dup", inheritable_dup(vm_b));
	ARG("vcpu1-inheritable-dup", inheritable_dup(vcpu1));
	exec_argv[n] = NULL;
	fflush(stdout);
	execv("/proc/self/exe", exec_argv);
	die("exec /proc/self/exe: %s", strerror(errno));
}
