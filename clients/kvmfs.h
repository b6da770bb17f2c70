/*
 * kvmfs.h - header-only C client for kvmfs (and for real /dev/kvm).
 *
 * kvmfs serves the KVM API from a FUSE mount: the same ioctl numbers, structs
 * and errno values as <linux/kvm.h>.  The one difference is where KVM hands out
 * a new fd (ARCHITECTURE.md section 2): on kvmfs KVM_CREATE_VM returns a VM id N
 * and the VM fd is MNT/vmN/ctl; KVM_CREATE_VCPU returns K and the vCPU fd is
 * MNT/vmN/vcpuK, whose mmap is the kvm_run area as on KVM.  These helpers
 * hide that difference, so one program runs on both:
 *
 *   int kvm  = kvmfs_open_system(NULL);       // $KVMFS_MNT/kvm, or /dev/kvm
 *   int vm   = kvmfs_create_vm(kvm, 0);       // a VM fd either way
 *   int vcpu = kvmfs_create_vcpu(vm, 0);      // a vCPU fd either way
 *   struct kvm_run *run = kvmfs_map_run(vcpu, ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0));
 *   void *ram = kvmfs_alloc_guest_memory(1 << 20);   // memfd-backed, MAP_SHARED
 *
 * Every other call is a plain ioctl() on those fds.  Functions return -1 (fds)
 * or NULL (pointers) with errno set on failure, and never print.
 *
 * Guest memory must be shareable with the daemon (ARCHITECTURE.md section 3):
 * kvmfs_alloc_guest_memory() gives memfd-backed MAP_SHARED memory, which real
 * KVM accepts as well.
 *
 * The numbers come from the system's <linux/kvm.h>; definitions newer than that
 * header (KVM_SET_USER_MEMORY_REGION2, guest_memfd, memory attributes) are added
 * below behind #ifndef, with the layouts of spec/kvm-abi.md section 5.
 * tests/t0_abi.py checks every number and layout here against kvmfs/abi.py.
 */
#ifndef KVMFS_H
#define KVMFS_H

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/kvm.h>

/* --- definitions newer than older system headers -------------------------------- */
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif

#ifndef KVM_SET_USER_MEMORY_REGION2
struct kvm_userspace_memory_region2 {
	__u32 slot;
	__u32 flags;
	__u64 guest_phys_addr;
	__u64 memory_size;
	__u64 userspace_addr;
	__u64 guest_memfd_offset;
	__u32 guest_memfd;
	__u32 pad1;
	__u64 pad2[14];
};
#define KVM_SET_USER_MEMORY_REGION2 _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2)
#endif

#ifndef KVM_CREATE_GUEST_MEMFD
struct kvm_create_guest_memfd {
	__u64 size;
	__u64 flags;
	__u64 reserved[6];
};
#define KVM_CREATE_GUEST_MEMFD _IOWR(KVMIO, 0xd4, struct kvm_create_guest_memfd)
#endif

#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes {
	__u64 address;
	__u64 size;
	__u64 attributes;
	__u64 flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif

#ifndef KVM_MEMORY_ATTRIBUTE_PRIVATE
#define KVM_MEMORY_ATTRIBUTE_PRIVATE (1ULL << 3)
#endif
#ifndef GUEST_MEMFD_FLAG_MMAP
#define GUEST_MEMFD_FLAG_MMAP (1ULL << 0)
#endif
#ifndef GUEST_MEMFD_FLAG_INIT_SHARED
#define GUEST_MEMFD_FLAG_INIT_SHARED (1ULL << 1)
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_EXIT_TDX
#define KVM_EXIT_TDX 40
#endif
#ifndef KVM_SYSTEM_EVENT_TDX_FATAL
#define KVM_SYSTEM_EVENT_TDX_FATAL 7
#endif
#ifndef KVM_RUN_X86_GUEST_MODE
#define KVM_RUN_X86_GUEST_MODE (1 << 2)
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_PRIVATE
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#endif
#ifndef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
#define KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP 225
#endif
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_CAP_PRE_FAULT_MEMORY
#define KVM_CAP_PRE_FAULT_MEMORY 236
#endif
#ifndef KVM_CAP_GUEST_MEMFD_FLAGS
#define KVM_CAP_GUEST_MEMFD_FLAGS 244
#endif
#ifndef KVM_X86_DEFAULT_VM
#define KVM_X86_DEFAULT_VM 0
#endif
#ifndef KVM_X86_SW_PROTECTED_VM
#define KVM_X86_SW_PROTECTED_VM 1
#endif

/* --- helpers ------------------------------------------------------------------- */

/* The path an fd was opened from (or "anon_inode:kvm-vm" and the like). */
static inline int kvmfs__fd_path(int fd, char *buf, size_t size)
{
	char link[64];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, buf, size - 1);
	if (n < 0)
		return -1;
	if ((size_t)n >= size - 1) {
		errno = ENAMETOOLONG;
		return -1;
	}
	buf[n] = '\0';
	return 0;
}

/* Is this fd a kvmfs file?  Real KVM's VM and vCPU fds are anonymous inodes and
 * /dev/kvm is a character device; kvmfs's are regular files on the mount. */
static inline int kvmfs_is_kvmfs_fd(int fd)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -1;
	return S_ISREG(st.st_mode) ? 1 : 0;
}

/* Cut the last path component of `path` in place; fails if it is not `name`. */
static inline int kvmfs__strip(char *path, const char *name)
{
	char *slash = strrchr(path, '/');

	if (!slash || strcmp(slash + 1, name) != 0) {
		errno = EINVAL;
		return -1;
	}
	*slash = '\0';
	return 0;
}

static inline int kvmfs__open_at(const char *dir, const char *fmt, long id)
{
	char path[PATH_MAX], name[64];

	snprintf(name, sizeof(name), fmt, id);
	if (snprintf(path, sizeof(path), "%s/%s", dir, name) >= (int)sizeof(path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	return open(path, O_RDWR | O_CLOEXEC);
}

/* The mount point kvmfs_open_system(NULL) uses: $KVMFS_MNT, or NULL for /dev/kvm. */
static inline const char *kvmfs_default_mnt(void)
{
	const char *mnt = getenv("KVMFS_MNT");

	return (mnt && *mnt) ? mnt : NULL;
}

/* The system fd: MNT/kvm, or /dev/kvm when mnt is NULL and $KVMFS_MNT is unset. */
static inline int kvmfs_open_system(const char *mnt)
{
	char path[PATH_MAX];

	if (!mnt)
		mnt = kvmfs_default_mnt();
	if (!mnt)
		return open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (snprintf(path, sizeof(path), "%s/kvm", mnt) >= (int)sizeof(path)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	return open(path, O_RDWR | O_CLOEXEC);
}

/* KVM_CREATE_VM; returns the VM fd (kvmfs: opens MNT/vmN/ctl). */
static inline int kvmfs_create_vm(int sys_fd, unsigned long type)
{
	char dir[PATH_MAX];
	int id, fd, kvmfs = kvmfs_is_kvmfs_fd(sys_fd);

	if (kvmfs < 0)
		return -1;
	id = ioctl(sys_fd, KVM_CREATE_VM, type);
	if (id < 0 || !kvmfs)
		return id;
	if (kvmfs__fd_path(sys_fd, dir, sizeof(dir)) < 0 || kvmfs__strip(dir, "kvm") < 0)
		return -1;
	fd = kvmfs__open_at(dir, "vm%ld/ctl", id);
	return fd;
}

/* The directory MNT/vmN of a kvmfs VM fd, into buf; -1 (EINVAL) for real KVM. */
static inline int kvmfs_vm_dir(int vm_fd, char *buf, size_t size)
{
	int kvmfs = kvmfs_is_kvmfs_fd(vm_fd);

	if (kvmfs <= 0) {
		if (kvmfs == 0)
			errno = EINVAL;
		return -1;
	}
	if (kvmfs__fd_path(vm_fd, buf, size) < 0)
		return -1;
	return kvmfs__strip(buf, "ctl");
}

/* KVM_CREATE_VCPU; returns the vCPU fd (kvmfs: opens MNT/vmN/vcpuK). */
static inline int kvmfs_create_vcpu(int vm_fd, unsigned long id)
{
	char dir[PATH_MAX];
	int k, kvmfs = kvmfs_is_kvmfs_fd(vm_fd);

	if (kvmfs < 0)
		return -1;
	k = ioctl(vm_fd, KVM_CREATE_VCPU, id);
	if (k < 0 || !kvmfs)
		return k;
	if (kvmfs_vm_dir(vm_fd, dir, sizeof(dir)) < 0)
		return -1;
	return kvmfs__open_at(dir, "vcpu%ld", k);
}

/* --- kvmfs's own ioctls (not KVM's: real KVM answers ENOTTY) -------------------
 * For the launchers of `kvmfs run` (kvmfs/abi.py explains each).  KVMFS_ACT_FOR:
 * this open file's requests act for thread `tid`'s process from now on.
 * KVMFS_MMU_NOTIFY on the system file: [start, end) of the caller's address space
 * is about to change (KVMFS_NOTIFY_START) or has changed (KVMFS_NOTIFY_END). */
#define KVMFS_IOCTL_TYPE 0x6B
struct kvmfs_act_for {
	__u32 tid;
	__u32 flags;
};
struct kvmfs_mmu_notify {
	__u64 start;
	__u64 end;
	__u32 phase;
	__u16 event;
	__u16 cause;
};
#define KVMFS_ACT_FOR _IOW(KVMFS_IOCTL_TYPE, 0x01, struct kvmfs_act_for)
#define KVMFS_MMU_NOTIFY _IOW(KVMFS_IOCTL_TYPE, 0x02, struct kvmfs_mmu_notify)
#define KVMFS_NOTIFY_START 0
#define KVMFS_NOTIFY_END 1
#define KVMFS_MMU_EVENT_UNMAP 0
#define KVMFS_MMU_EVENT_CLEAR 1
#define KVMFS_MMU_EVENT_PROTECTION_VMA 2
#define KVMFS_CAUSE_MUNMAP 1
#define KVMFS_CAUSE_MREMAP 2
#define KVMFS_CAUSE_MMAP_FIXED 3
#define KVMFS_CAUSE_MPROTECT 4
#define KVMFS_CAUSE_MADV_DONTNEED 5
#define KVMFS_CAUSE_MADV_REMOVE 6
#define KVMFS_CAUSE_MADV_FREE 7
#define KVMFS_CAUSE_PUNCH_HOLE 8

#ifndef MADV_DONTNEED_LOCKED
#define MADV_DONTNEED_LOCKED 24      /* Linux 5.18 */
#endif

/* The KVMFS_CAUSE_* of a madvise() of guest RAM, or 0 for an advice that changes
 * no mapping (no MMU-notifier call). */
static inline unsigned kvmfs_madvise_cause(int advice)
{
	switch (advice) {
	case MADV_DONTNEED:
	case MADV_DONTNEED_LOCKED:
		return KVMFS_CAUSE_MADV_DONTNEED;
	case MADV_FREE:
		return KVMFS_CAUSE_MADV_FREE;
	case MADV_REMOVE:
		return KVMFS_CAUSE_MADV_REMOVE;
	}
	return 0;
}

/* The kvm_run area of a vCPU, `size` = KVM_GET_VCPU_MMAP_SIZE; NULL on failure.
 * mmap of the vCPU fd, on kvmfs as on KVM (the PIO page and the coalesced-MMIO
 * ring follow at their page offsets). */
static inline struct kvm_run *kvmfs_map_run(int vcpu_fd, size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu_fd, 0);

	return p == MAP_FAILED ? NULL : (struct kvm_run *)p;
}

/* `size` bytes of zeroed guest memory, memfd-backed and MAP_SHARED, so that
 * both real KVM and the kvmfs daemon can use it; NULL on failure.  Release it
 * with munmap(p, size). */
static inline void *kvmfs_alloc_guest_memory(size_t size)
{
	void *p;
	int fd, saved;

	fd = (int)syscall(SYS_memfd_create, "kvmfs-guest-memory", 1U /* MFD_CLOEXEC */);
	if (fd < 0)
		return NULL;
	if (ftruncate(fd, (off_t)size) < 0) {
		saved = errno;
		close(fd);
		errno = saved;
		return NULL;
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	saved = errno;
	close(fd);
	errno = saved;
	return p == MAP_FAILED ? NULL : p;
}

/* KVM_SET_USER_MEMORY_REGION for slot `slot` of address space `as_id`. */
static inline int kvmfs_set_memslot(int vm_fd, unsigned as_id, unsigned slot, unsigned flags,
				    __u64 gpa, __u64 size, void *hva)
{
	struct kvm_userspace_memory_region r = {
		.slot = as_id << 16 | slot, .flags = flags, .guest_phys_addr = gpa,
		.memory_size = size, .userspace_addr = (__u64)(unsigned long)hva,
	};

	return ioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

/*
 * MMU-notifier invalidation: tell kvmfs that [hva, hva+size) of this process is
 * about to be (or was) munmap'ed, mremap'ed or madvise(DONTNEED)'ed, so it zaps
 * the guest mappings of it and resolves the range again on next use (the kernel
 * does this by itself for /dev/kvm).  No-op returning 0 on real KVM.
 */
static inline int kvmfs_invalidate(int vm_fd, void *hva, size_t size)
{
	char dir[PATH_MAX], line[96];
	int fd, n, saved, kvmfs = kvmfs_is_kvmfs_fd(vm_fd);

	if (kvmfs <= 0)
		return kvmfs;
	if (kvmfs_vm_dir(vm_fd, dir, sizeof(dir)) < 0)
		return -1;
	if (strlen(dir) + sizeof("/cmd") > sizeof(dir)) {
		errno = ENAMETOOLONG;
		return -1;
	}
	strcat(dir, "/cmd");
	fd = open(dir, O_WRONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = snprintf(line, sizeof(line), "invalidate 0x%lx 0x%zx\n", (unsigned long)hva, size);
	n = (int)write(fd, line, (size_t)n) == n ? 0 : -1;
	saved = errno;
	close(fd);
	errno = saved;
	return n;
}

#endif /* KVMFS_H */
