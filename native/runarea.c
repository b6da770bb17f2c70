/*
 * runarea.c - kvm_run areas a VMM can truncate under the daemon.
 *
 * A vCPU's kvm_run area is memory both the VMM and the daemon map MAP_SHARED:
 * the page cache of the mount's own vmN/vcpuK file (kvmfs_runarea_map: the
 * daemon maps its own file, so the VMM's mmap of its vCPU fd shares the same
 * pages, as with KVM), or a tmpfs file for VMs without a mount.  A VMM that can
 * open the tmpfs file read-write can also truncate it; the daemon's next access
 * to the mapping would then die of SIGBUS, and with it every VM of the mount.  The guard: every area is
 * registered here, and a SIGBUS inside one replaces that area in the daemon
 * with private zero pages (the VMM that truncated its own run area loses it,
 * nobody else loses anything) and the access is retried.  A SIGBUS elsewhere
 * goes to the handler that was there before (Python's faulthandler, or the
 * default action).
 *
 * Owns: the table of registered areas and the SIGBUS handler.  Lock-free: slots
 * are claimed and released with atomics, and the handler only reads them.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>
#include <sys/mman.h>

#include "kvmfs_internal.h"

#define MAX_AREAS 8192

static uintptr_t area_start[MAX_AREAS];   /* 0: free */
static size_t area_size[MAX_AREAS];
static uint64_t replaced;                  /* areas replaced after a truncation */
static struct sigaction previous;

KVMFS_API int kvmfs_runarea_add(void *start, uint64_t size)
{
	for (int i = 0; i < MAX_AREAS; i++) {
		uintptr_t free_slot = 0;
		if (__atomic_load_n(&area_start[i], __ATOMIC_RELAXED))
			continue;
		area_size[i] = size;
		if (__atomic_compare_exchange_n(&area_start[i], &free_slot, (uintptr_t)start, false,
						__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
			return 0;
	}
	return -ENOSPC;
}

KVMFS_API void kvmfs_runarea_remove(void *start)
{
	for (int i = 0; i < MAX_AREAS; i++)
		if (__atomic_load_n(&area_start[i], __ATOMIC_SEQ_CST) == (uintptr_t)start) {
			__atomic_store_n(&area_start[i], 0, __ATOMIC_SEQ_CST);
			return;
		}
}

KVMFS_API uint64_t kvmfs_runarea_replaced(void)
{
	return __atomic_load_n(&replaced, __ATOMIC_SEQ_CST);
}

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
	uintptr_t a = (uintptr_t)si->si_addr;
	int saved = errno;

	for (int i = 0; i < MAX_AREAS; i++) {
		uintptr_t s = __atomic_load_n(&area_start[i], __ATOMIC_SEQ_CST);
		if (s && a >= s && a < s + area_size[i]) {
			/* mmap is a plain system call: safe here in practice */
			if (mmap((void *)s, area_size[i], PROT_READ | PROT_WRITE,
				 MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) != MAP_FAILED) {
				__atomic_add_fetch(&replaced, 1, __ATOMIC_SEQ_CST);
				errno = saved;
				return;                 /* the access is retried on the new pages */
			}
		}
	}
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, si, ctx);
		return;
	}
	if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
		return;
	}
	signal(sig, SIG_DFL);                   /* returning re-faults: the default action */
}

KVMFS_API int kvmfs_runarea_install_guard(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_sigbus;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	return sigaction(SIGBUS, &sa, &previous) ? -errno : 0;
}

/*
 * Map `size` bytes of the file at `path` shared, zeroed, populated and locked.
 * For the mount's own vCPU files: their page cache is the kvm_run area, so it
 * must never be evicted (a re-read would come back from the daemon as zeros):
 * mlock keeps it resident.  Called with the GIL released (cffi), because each
 * step is a FUSE request another daemon thread answers.
 *
 * The rule for the daemon's own FUSE mappings: never wait for a FUSE answer
 * while holding this process's mmap lock (a fault on the file, an munmap), as
 * the thread that would answer may need the lock too (a new worker's stack, an
 * allocator arena).  So the pages are put in the cache by a write of whole
 * pages first, which FUSE does without reading, and the mapping finds them
 * there; kvmfs_runarea_unmap writes them back before unmapping.  (A store into
 * a page the kernel is writing back waits for that answer under the fault's
 * per-VMA lock only, which no other mapping change needs; daemon stores into
 * kvm_run are made from C, without the GIL, for the same reason.)
 */
KVMFS_API int kvmfs_runarea_map(const char *path, uint64_t size, void **out)
{
	int fd = open(path, O_RDWR | O_CLOEXEC), err;
	void *p, *zeros;
	ssize_t n;

	if (fd < 0)
		return -errno;
	zeros = calloc(1, size);
	n = zeros ? pwrite(fd, zeros, size, 0) : -1;
	err = n < 0 ? (zeros ? -errno : -ENOMEM) : (uint64_t)n != size ? -EIO : 0;
	free(zeros);
	if (err) {
		close(fd);
		return err;
	}
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
	err = p == MAP_FAILED ? -errno : 0;
	close(fd);
	if (err)
		return err;
	if (mlock(p, size)) {
		err = -errno;
		munmap(p, size);
		return err;
	}
	*out = p;
	return 0;
}

/*
 * munmap of a FUSE file's dirty pages writes them back and waits for the
 * daemon's answer with the mmap lock held (fuse_vma_close), which a daemon
 * thread serving that answer may need: so write them back first with msync,
 * which waits without the lock.  Nothing dirties them in between: the vCPU is
 * gone, and no VMM maps the area any more (its mapping would hold the VM).
 */
KVMFS_API void kvmfs_runarea_unmap(void *p, uint64_t size)
{
	msync(p, size, MS_SYNC);
	munmap(p, size);
}
