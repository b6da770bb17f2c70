/*
 * hello_vm - the smallest VM, on kvmfs ($KVMFS_MNT set) or on /dev/kvm (unset).
 *
 *   gcc -Wall -I clients -o hello_vm tools/hello_vm.c
 *   KVMFS_MNT=mnt ./hello_vm          # through a kvmfs mount
 *   ./hello_vm                         # through the host's /dev/kvm
 *   ./hello_vm --run                   # also run the guest: it prints "4" on port 0x3f8
 *
 * It creates a VM, adds two memslots backed by memfd memory (64 KiB at gpa 0,
 * 64 KiB at gpa 1 MiB), writes bytes into guest memory through the host
 * mapping, and on kvmfs reads them back through MNT/vmN/mem and prints
 * MNT/vmN/info/memslots.  With --run, a vCPU runs a 16-bit guest that adds two
 * registers and writes the sum to a port.  Exits 0 when everything worked.
 */
#include "kvmfs.h"

#define SLOT_SIZE (64 << 10)
#define SLOT1_GPA (1 << 20)
#define CODE_GPA 0x1000
#define PORT 0x3f8

static const char *where = "/dev/kvm";

static int fail(const char *what)
{
	fprintf(stderr, "hello_vm: %s failed on %s: %s\n", what, where, strerror(errno));
	return 1;
}

/* Print MNT/vmN/<name> to stdout. */
static int cat(const char *dir, const char *name)
{
	char path[PATH_MAX + 32], buf[4096];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	printf("--- %s ---\n", path);
	while ((n = read(fd, buf, sizeof(buf))) > 0)
		fwrite(buf, 1, (size_t)n, stdout);
	close(fd);
	return n < 0 ? -1 : 0;
}

/* kvmfs: the bytes written through the host mapping are guest memory at `gpa`. */
static int check_mem(const char *dir, __u64 gpa, const void *want, size_t len)
{
	char path[PATH_MAX + 32], got[64];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/mem", dir);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = pread(fd, got, len, (off_t)gpa);
	close(fd);
	if (n != (ssize_t)len || memcmp(got, want, len) != 0) {
		fprintf(stderr, "hello_vm: %s at gpa 0x%llx does not show the bytes written\n",
			path, (unsigned long long)gpa);
		errno = EIO;
		return -1;
	}
	printf("mem at gpa 0x%llx: %.*s\n", (unsigned long long)gpa, (int)len, got);
	return 0;
}

/* mov dx, 0x3f8; add al, bl; add al, '0'; out dx, al; mov al, '\n'; out dx, al; hlt */
static const unsigned char guest_code[] = {
	0xba, 0xf8, 0x03, 0x00, 0xd8, 0x04, '0', 0xee, 0xb0, '\n', 0xee, 0xf4,
};

static int run_guest(int sys_fd, int vm_fd)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	struct kvm_run *run;
	int vcpu, size, i;

	vcpu = kvmfs_create_vcpu(vm_fd, 0);
	if (vcpu < 0)
		return fail("KVM_CREATE_VCPU");
	size = ioctl(sys_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (size < 0)
		return fail("KVM_GET_VCPU_MMAP_SIZE");
	run = kvmfs_map_run(vcpu, (size_t)size);
	if (!run)
		return fail("mapping kvm_run");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	sregs.cs.base = 0;
	sregs.cs.selector = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
		return fail("KVM_SET_SREGS");
	memset(&regs, 0, sizeof(regs));
	regs.rip = CODE_GPA;
	regs.rax = 2;
	regs.rbx = 2;
	regs.rflags = 0x2;
	if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_REGS");

	for (i = 0; i < 16; i++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			return fail("KVM_RUN");
		switch (run->exit_reason) {
		case KVM_EXIT_HLT:
			printf("guest halted\n");
			munmap(run, (size_t)size);
			close(vcpu);
			return 0;
		case KVM_EXIT_IO:
			if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == PORT &&
			    run->io.size == 1 && run->io.count == 1) {
				unsigned char c = *((unsigned char *)run + run->io.data_offset);

				printf(c >= ' ' && c < 0x7f ? "guest wrote: '%c'\n" : "guest wrote: 0x%02x\n", c);
				break;
			}
			fprintf(stderr, "hello_vm: unexpected IO exit, port 0x%x\n", run->io.port);
			return 1;
		default:
			fprintf(stderr, "hello_vm: unexpected exit reason %u\n", run->exit_reason);
			return 1;
		}
	}
	fprintf(stderr, "hello_vm: guest did not halt\n");
	return 1;
}

int main(int argc, char **argv)
{
	static const char hello0[] = "hello, slot 0";
	static const char hello1[] = "hello, slot 1";
	const char *mnt = kvmfs_default_mnt();
	char dir[PATH_MAX];
	int sys_fd, vm_fd, version, on_kvmfs, rc = 0;
	char *mem0, *mem1;

	if (mnt)
		where = mnt;
	sys_fd = kvmfs_open_system(NULL);
	if (sys_fd < 0)
		return fail("opening the system fd");
	version = ioctl(sys_fd, KVM_GET_API_VERSION, 0);
	if (version != KVM_API_VERSION) {
		fprintf(stderr, "hello_vm: API version %d, expected %d\n", version, KVM_API_VERSION);
		return 1;
	}
	vm_fd = kvmfs_create_vm(sys_fd, KVM_X86_DEFAULT_VM);
	if (vm_fd < 0)
		return fail("KVM_CREATE_VM");
	on_kvmfs = kvmfs_vm_dir(vm_fd, dir, sizeof(dir)) == 0;
	if (on_kvmfs)
		printf("VM at %s\n", dir);

	mem0 = kvmfs_alloc_guest_memory(SLOT_SIZE);
	mem1 = kvmfs_alloc_guest_memory(SLOT_SIZE);
	if (!mem0 || !mem1)
		return fail("allocating guest memory");
	if (kvmfs_set_memslot(vm_fd, 0, 0, 0, 0, SLOT_SIZE, mem0) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION (slot 0, gpa 0)");
	if (kvmfs_set_memslot(vm_fd, 0, 1, 0, SLOT1_GPA, SLOT_SIZE, mem1) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION (slot 1, gpa 1 MiB)");

	/* Guest memory is the VMM's memory: write through the host mapping. */
	memcpy(mem0, hello0, sizeof(hello0) - 1);
	memcpy(mem0 + CODE_GPA, guest_code, sizeof(guest_code));
	memcpy(mem1 + 0x100, hello1, sizeof(hello1) - 1);
	printf("slot 0: gpa 0x0, %d KiB; slot 1: gpa 0x%x, %d KiB\n",
	       SLOT_SIZE >> 10, SLOT1_GPA, SLOT_SIZE >> 10);

	if (on_kvmfs) {
		if (check_mem(dir, 0, hello0, sizeof(hello0) - 1) < 0 ||
		    check_mem(dir, SLOT1_GPA + 0x100, hello1, sizeof(hello1) - 1) < 0)
			return fail("reading guest memory back through vmN/mem");
		if (cat(dir, "info/memslots") < 0)
			return fail("reading vmN/info/memslots");
	}

	if (argc > 1 && strcmp(argv[1], "--run") == 0)
		rc = run_guest(sys_fd, vm_fd);

	munmap(mem0, SLOT_SIZE);
	munmap(mem1, SLOT_SIZE);
	close(vm_fd);
	close(sys_fd);
	return rc;
}
