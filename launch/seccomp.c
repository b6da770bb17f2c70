/*
 * kvmfs-seccomp - run an unmodified KVM program on a kvmfs mount.
 *
 *   kvmfs-seccomp --mount MNT [--dev PATH]... [--no-convert] [--no-mmu-notify] [-v]
 *                 -- PROGRAM [ARGS...]
 *
 * A seccomp user-notification supervisor.  It forks; the child sets
 * PR_SET_NO_NEW_PRIVS, installs the filter below with
 * SECCOMP_FILTER_FLAG_NEW_LISTENER, hands the listener fd to the parent over a
 * socketpair and execs PROGRAM.  The parent answers the notifications until
 * PROGRAM and every process it started (they inherit the filter) are gone, then
 * exits with PROGRAM's status (128+N if a signal N killed it; 125 if the
 * supervisor itself failed, 126/127 if PROGRAM cannot be run).  It works for
 * statically linked programs (Firecracker is static musl, Go binaries), where
 * an LD_PRELOAD shim cannot.  Signals sent to the supervisor by a process are
 * relayed to PROGRAM (those of the terminal reach it directly); PROGRAM is
 * killed if the supervisor dies (without it every trapped call fails).
 *
 * What this file owns: the filter, the translation of the few calls where kvmfs
 * differs from /dev/kvm, and the supervisor's process handling.  The daemon
 * owns everything else: every other ioctl, mmap of the vCPU fd and KVM_RUN go
 * straight from the program to the mount, at full speed and with native signal
 * semantics.
 *
 * Trapped (everything else is SECCOMP_RET_ALLOW; other architectures, i.e.
 * int 0x80 calls, kill the process; x32 numbers are allowed):
 *
 *   open, openat, openat2
 *       To redirect /dev/kvm.  The path is read from the target.  If the file
 *       the target would open is the character device 10:232 (one stat through
 *       /proc/TID/root, cwd or fd/N: the jailer's mknod, a symlink), or the path
 *       resolves (lexically, against the target's root and cwd or dirfd) to
 *       /dev/kvm or a --dev path, the supervisor opens MNT/kvm itself and
 *       installs it as the call's result (SECCOMP_IOCTL_NOTIF_ADDFD with
 *       SECCOMP_ADDFD_FLAG_SEND; O_CLOEXEC as asked), so the kernel never
 *       re-reads the path.  Every other open is CONTINUEd: the kernel then
 *       re-reads the path, and another thread of the target may have changed it
 *       in between.  That is fine because the redirect is a convenience, not a
 *       security boundary: the program can reach the real /dev/kvm by other
 *       means (io_uring, a path rewritten after the check, an inherited fd).
 *
 *   ioctl KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_CREATE_GUEST_MEMFD
 *       (the rows of fd_ioctls[]; the filter compares the low 32 bits of cmd)
 *       KVM returns a new fd; kvmfs returns an id N and the fd is the file
 *       MNT/.../N.  If the target's fd is a kvmfs file (its pidfd_getfd copy
 *       lives on a fuse.kvmfs mount), the supervisor opens that file itself,
 *       sends KVMFS_ACT_FOR so that the daemon treats its requests as the
 *       target's (a VM belongs to the process that created it), issues the same
 *       ioctl, opens the new file and installs it with KVM's fd flags.
 *       Any other fd (real /dev/kvm, a non-KVM device using the same numbers):
 *       CONTINUE.
 *
 *   ioctl KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2
 *       The daemon maps shared memory (memfd, tmpfs, files) itself.  Private
 *       anonymous memory is converted in place to a memfd first, inside the
 *       stopped program ("memslots" below; --no-convert: the daemon answers
 *       EFAULT at the guest's first access instead).  The range is noted for the
 *       MMU notifications, then the call goes to the daemon.
 *
 *   munmap, mremap, mmap with MAP_FIXED, mprotect, pkey_mprotect, madvise
 *       ("MMU notifications" below; --no-mmu-notify: not trapped).  KVM's MMU
 *       notifier sees the VMM's address-space changes by itself; the daemon
 *       learns those of guest RAM through KVMFS_MMU_NOTIFY.  Calls on other
 *       memory are CONTINUEd.
 *
 * What it cannot do:
 *   - io_uring opens (IORING_OP_OPENAT) are not seen; nor are paths that name
 *     /dev/kvm only through a symlink the lexical resolution gets wrong when no
 *     file 10:232 is behind them (e.g. /dev/kvm missing and "/x/link/../kvm").
 *   - A target that serves a FUSE file system from the thread that opens a
 *     file on it would deadlock the device check (the stat waits for that
 *     thread); VMMs do not do that.
 *   - KVM_GET_STATS_FD and KVM_CREATE_DEVICE are not served by the daemon yet:
 *     their rows exist but are not trapped (the daemon answers them itself).
 *   - A kvmfs-aware program (clients/kvmfs.h) must not run under it: its
 *     KVM_CREATE_VM would get an fd, not the id it expects.
 *   - Guest RAM of a program that is traced already (gdb, strace) is not
 *     converted, and its unmaps are reported before they happen, not around.
 *   - A signal that arrives before the supervisor has received the
 *     notification (microseconds) still makes the call fail with EINTR if its
 *     handler lacks SA_RESTART (the kernel's doing, as for any seccomp agent).
 *   - munmap and the like are not seen through io_uring, shmdt, brk,
 *     process_madvise, nor mremap moving private memory into guest RAM.
 *   - One notification is handled at a time.  A conversion stops the program
 *     for about 1 ms, plus about 1 s per GiB of guest RAM that holds data, plus
 *     about 10 ms per GiB of address space scanned in pagemap.
 *
 * Cost (supervisor CPU per trapped call, on a nested-virtualisation host):
 * about 10 us for a call it only looks at (munmap elsewhere), 20 us for an
 * open or an ioctl on a non-kvmfs fd, 50 us for a redirected /dev/kvm open,
 * plus the daemon's own time for what it asks of it.
 *
 * Kernel: 5.14 (SECCOMP_ADDFD_FLAG_SEND); pidfd_getfd (5.6) and the
 * conversion's ptrace need ptrace access to the target (root, or the same user
 * without Yama restrictions); PIDFD_THREAD (6.9) is used when present, else the
 * thread's process.  x86-64 only.
 * Opens and fd-creating ioctls need no syscall inside the target.  The
 * conversion runs mmap and close in it, and the MMU path the program's own
 * call; a program that installs its own seccomp filters later (Firecracker)
 * still works, because a stacked filter's ALLOW does not override this one's
 * USER_NOTIF, but those filters also judge the injected calls.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/ptrace.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/audit.h>
#include <linux/falloc.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#include "kvmfs.h"

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef SECCOMP_RET_KILL_PROCESS
#define SECCOMP_RET_KILL_PROCESS 0x80000000U
#endif

#ifndef SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
#define SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV (1UL << 5)
#endif
#define ERESTARTSYS 512              /* the kernel's, not exported */
#define ERESTARTNOINTR 513

#define PROG "kvmfs-seccomp"
#define KVM_MISC_MINOR 232          /* /dev/kvm is 10:232 */
#define EXIT_SETUP 125               /* the supervisor itself failed (as env(1), docker) */

/* --- the fd-creating ioctls ----------------------------------------------------
 * One row per KVM ioctl that hands out a new fd.  On kvmfs the ioctl returns an
 * id and the fd is a file next to the one the ioctl was issued on:
 *   child  the new file, relative to the directory of that file, %d = the id;
 *          NULL while the daemon does not serve the ioctl (the row is then not
 *          trapped, and the daemon's own answer reaches the program)
 *   argsz  0: the argument is an integer; else the size of the struct it points
 *          to, copied from the target, and back to it when the number says _IOR
 *   fd_at  -1: KVM returns the new fd; else the offset of the __u32 in the struct
 *          where KVM stores it (KVM_CREATE_DEVICE), and the ioctl returns 0
 *   fdfl   the flags KVM gives the new fd (anon_inode_getfd's O_CLOEXEC, or 0)
 */
struct fd_ioctl {
	unsigned int cmd;
	const char *name;
	const char *child;
	size_t argsz;
	int fd_at;
	int fdfl;
};

static const struct fd_ioctl fd_ioctls[] = {
	{ KVM_CREATE_VM, "KVM_CREATE_VM", "vm%d/ctl", 0, -1, O_CLOEXEC },
	{ KVM_CREATE_VCPU, "KVM_CREATE_VCPU", "vcpu%d", 0, -1, O_CLOEXEC },
	{ KVM_CREATE_GUEST_MEMFD, "KVM_CREATE_GUEST_MEMFD", "gmem%d",
	  sizeof(struct kvm_create_guest_memfd), -1, 0 },           /* not CLOEXEC in KVM */
	{ KVM_GET_STATS_FD, "KVM_GET_STATS_FD", NULL, 0, -1, O_CLOEXEC },
	{ KVM_CREATE_DEVICE, "KVM_CREATE_DEVICE", NULL, sizeof(struct kvm_create_device),
	  offsetof(struct kvm_create_device, fd), O_CLOEXEC },      /* KVM_CREATE_DEVICE_TEST: no fd */
};
#define N_FD_IOCTLS (sizeof(fd_ioctls) / sizeof(fd_ioctls[0]))

/* The memslot ioctls: trapped to convert private anonymous memory and to learn
 * the ranges of guest RAM. */
static const unsigned int memslot_ioctls[] = { KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2 };
#define N_MEMSLOT_IOCTLS (sizeof(memslot_ioctls) / sizeof(memslot_ioctls[0]))

/* --- options and state ------------------------------------------------------------ */
#define MAX_DEVS 16
static char mnt[PATH_MAX];           /* the mount, absolute */
static char mnt_kvm[PATH_MAX + 8];   /* MNT/kvm */
static char *devs[MAX_DEVS + 1];     /* target-view paths that mean /dev/kvm, normalised */
static int n_devs;
static int verbose;
static int convert_ram = 1;          /* --no-convert: leave private guest RAM alone */
static int mmu_notify = 1;           /* --no-mmu-notify: do not trap munmap and the like */
static int listener = -1;
static int chld_fd = -1;             /* a signalfd for SIGCHLD: tracee stops wake us */
static struct seccomp_notif_sizes sizes;

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...)
{
	va_list ap;
	char buf[1024];
	int n = snprintf(buf, sizeof(buf), PROG ": ");

	va_start(ap, fmt);
	vsnprintf(buf + n, sizeof(buf) - n, fmt, ap);
	va_end(ap);
	n = strlen(buf);
	if (n < (int)sizeof(buf) - 1) {
		buf[n++] = '\n';
		buf[n] = '\0';
	}
	if (write(2, buf, n) < 0) {
		/* nowhere left to say it */
	}
}

#define debug(...) do { if (verbose) warn(__VA_ARGS__); } while (0)

static void close_keep_errno(int fd)
{
	int saved = errno;

	if (fd >= 0)
		close(fd);
	errno = saved;
}

/* --- the filter ------------------------------------------------------------------- */
#define MAX_FILTER 64
enum { L_ALLOW, L_NOTIFY, L_MMAP, N_LABELS };
struct bpf {
	struct sock_filter insn[MAX_FILTER];
	unsigned int n;
	struct { unsigned int at; int label; int on_true; } fix[MAX_FILTER];
	unsigned int n_fix;
	unsigned int label_at[N_LABELS];
};

static void emit(struct bpf *b, struct sock_filter f)
{
	if (b->n >= MAX_FILTER) {
		warn("internal error: filter too long");
		exit(EXIT_SETUP);
	}
	b->insn[b->n++] = f;
}

/* A conditional jump to a label (on_true: when the test holds, else when not). */
static void jump(struct bpf *b, unsigned short op, unsigned int k, int label, int on_true)
{
	b->fix[b->n_fix].at = b->n;
	b->fix[b->n_fix].label = label;
	b->fix[b->n_fix++].on_true = on_true;
	emit(b, (struct sock_filter)BPF_JUMP(BPF_JMP | op | BPF_K, k, 0, 0));
}

static void load(struct bpf *b, unsigned int offset)
{
	emit(b, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offset));
}

static void ret(struct bpf *b, unsigned int action)
{
	emit(b, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, action));
}

static void build_filter(struct bpf *b)
{
	unsigned int i;

	memset(b, 0, sizeof(*b));
	load(b, offsetof(struct seccomp_data, arch));
	emit(b, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
	ret(b, SECCOMP_RET_KILL_PROCESS);
	load(b, offsetof(struct seccomp_data, nr));
	jump(b, BPF_JEQ, __NR_openat, L_NOTIFY, 1);
	jump(b, BPF_JEQ, __NR_open, L_NOTIFY, 1);
	jump(b, BPF_JEQ, __NR_openat2, L_NOTIFY, 1);
	if (mmu_notify) {
		jump(b, BPF_JEQ, __NR_munmap, L_NOTIFY, 1);
		jump(b, BPF_JEQ, __NR_mremap, L_NOTIFY, 1);
		jump(b, BPF_JEQ, __NR_mprotect, L_NOTIFY, 1);
		jump(b, BPF_JEQ, __NR_pkey_mprotect, L_NOTIFY, 1);
		jump(b, BPF_JEQ, __NR_madvise, L_NOTIFY, 1);
		jump(b, BPF_JEQ, __NR_mmap, L_MMAP, 1);
	}
	jump(b, BPF_JEQ, __NR_ioctl, L_ALLOW, 0);
	/* cmd is an unsigned int: the low word of args[1] (little endian) */
	load(b, offsetof(struct seccomp_data, args[1]));
	for (i = 0; i < N_FD_IOCTLS; i++)
		if (fd_ioctls[i].child)
			jump(b, BPF_JEQ, fd_ioctls[i].cmd, L_NOTIFY, 1);
	for (i = 0; i < N_MEMSLOT_IOCTLS; i++)
		jump(b, BPF_JEQ, memslot_ioctls[i], L_NOTIFY, 1);
	b->label_at[L_ALLOW] = b->n;
	ret(b, SECCOMP_RET_ALLOW);
	if (mmu_notify) {                   /* mmap: only MAP_FIXED replaces a mapping */
		b->label_at[L_MMAP] = b->n;
		load(b, offsetof(struct seccomp_data, args[3]));
		jump(b, BPF_JSET, MAP_FIXED, L_NOTIFY, 1);
		ret(b, SECCOMP_RET_ALLOW);
	}
	b->label_at[L_NOTIFY] = b->n;
	ret(b, SECCOMP_RET_USER_NOTIF);
	for (i = 0; i < b->n_fix; i++) {
		unsigned int off = b->label_at[b->fix[i].label] - b->fix[i].at - 1;

		if (b->fix[i].on_true)
			b->insn[b->fix[i].at].jt = (unsigned char)off;
		else
			b->insn[b->fix[i].at].jf = (unsigned char)off;
	}
}

/* --- replies ---------------------------------------------------------------------- */

/* SECCOMP_IOCTL_NOTIF_SEND; ENOENT (the target is gone, or a signal took it out
 * of the call) is normal and ignored. */
static void reply(__u64 id, __s64 val, int err, __u32 flags)
{
	struct seccomp_notif_resp *resp = alloca(sizes.seccomp_notif_resp);

	memset(resp, 0, sizes.seccomp_notif_resp);
	resp->id = id;
	resp->val = val;
	resp->error = err ? -err : 0;
	resp->flags = flags;
	while (ioctl(listener, SECCOMP_IOCTL_NOTIF_SEND, resp) < 0) {
		if (errno == EINTR)
			continue;
		if (errno != ENOENT)
			warn("SECCOMP_IOCTL_NOTIF_SEND: %s", strerror(errno));
		return;
	}
}

static void reply_continue(__u64 id)
{
	reply(id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
}

static void reply_error(__u64 id, int err)
{
	reply(id, -1, err, 0);
}

/* Whether the notification is still pending (the target still waits in it). */
static int id_valid(__u64 id)
{
	while (ioctl(listener, SECCOMP_IOCTL_NOTIF_ID_VALID, &id) < 0) {
		if (errno != EINTR)
			return 0;
	}
	return 1;
}

/* Install our fd into the target.  send: as the call's result (ADDFD_FLAG_SEND),
 * which also answers the notification.  Returns the target's fd number, or
 * -errno (ENOENT: the target left the call). */
static int addfd(__u64 id, int fd, int cloexec, int send)
{
	struct seccomp_notif_addfd a = {
		.id = id,
		.flags = send ? SECCOMP_ADDFD_FLAG_SEND : 0,
		.srcfd = (__u32)fd,
		.newfd = 0,
		.newfd_flags = cloexec ? O_CLOEXEC : 0,
	};
	int r;

	while ((r = ioctl(listener, SECCOMP_IOCTL_NOTIF_ADDFD, &a)) < 0) {
		if (errno != EINTR)
			return -errno;
	}
	return r;
}

/* Install fd as the call's result; on failure answer the call with the error. */
static void reply_fd(__u64 id, int fd, int cloexec)
{
	int r = addfd(id, fd, cloexec, 1);

	if (r < 0 && r != -ENOENT)
		reply_error(id, -r);
}

/* --- the target's memory and files ------------------------------------------------- */

/* Read len bytes at addr of thread tid: 0, or -errno (EFAULT, ESRCH). */
static int read_mem(pid_t tid, __u64 addr, void *buf, size_t len)
{
	struct iovec l = { buf, len }, r = { (void *)(uintptr_t)addr, len };
	ssize_t n = process_vm_readv(tid, &l, 1, &r, 1, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EFAULT;
}

static int write_mem(pid_t tid, __u64 addr, const void *buf, size_t len)
{
	struct iovec l = { (void *)buf, len }, r = { (void *)(uintptr_t)addr, len };
	ssize_t n = process_vm_writev(tid, &l, 1, &r, 1, 0);

	if (n < 0)
		return -errno;
	return (size_t)n == len ? 0 : -EFAULT;
}

/* Read a NUL-terminated string, page by page (a path may end just before an
 * unmapped page).  Returns its length, or -errno (EFAULT, ESRCH, ENAMETOOLONG). */
static int read_string(pid_t tid, __u64 addr, char *buf, size_t size)
{
	size_t got = 0;
	long page = sysconf(_SC_PAGESIZE);

	while (got < size) {
		size_t chunk = page - ((addr + got) & (page - 1));
		char *nul;
		int r;

		if (chunk > size - got)
			chunk = size - got;
		r = read_mem(tid, addr + got, buf + got, chunk);
		if (r < 0)
			return r;
		nul = memchr(buf + got, '\0', chunk);
		if (nul)
			return nul - buf;
		got += chunk;
	}
	return -ENAMETOOLONG;
}

static int read_link(const char *link, char *buf, size_t size)
{
	ssize_t n = readlink(link, buf, size - 1);

	if (n < 0)
		return -errno;
	if ((size_t)n >= size - 1)
		return -ENAMETOOLONG;
	buf[n] = '\0';
	return 0;
}

/* Normalise an absolute path lexically in place: no "", "." or ".." components
 * (".." stops at "/"), no trailing slash.  Returns whether the original ended in
 * a slash, "/." or "/.." (then it can only name a directory). */
static int normalise(char *path)
{
	char *out = path, *p = path;
	int dir_only = 0;

	while (*p) {
		char *seg, *end;
		size_t len;

		while (*p == '/')
			p++;
		if (!*p) {
			dir_only = 1;
			break;
		}
		seg = p;
		end = strchr(seg, '/');
		if (!end)
			end = seg + strlen(seg);
		len = end - seg;
		p = end;
		dir_only = 0;
		if (len == 1 && seg[0] == '.') {
			dir_only = 1;
			continue;
		}
		if (len == 2 && seg[0] == '.' && seg[1] == '.') {
			while (out > path && *--out != '/')
				;
			dir_only = 1;
			continue;
		}
		*out++ = '/';
		memmove(out, seg, len);
		out += len;
	}
	if (out == path)
		*out++ = '/';
	*out = '\0';
	return dir_only;
}

/* The path an open call names, as the target sees it (inside its root), absolute
 * and normalised, into out.  0, or -1 when it cannot tell (then the call is left
 * to the kernel). */
static int target_path(pid_t tid, int dirfd, const char *path, char *out, size_t size)
{
	char link[64], base[PATH_MAX], root[PATH_MAX];
	size_t rootlen;

	if (!*path)
		return -1;
	if (path[0] == '/') {
		base[0] = '\0';
	} else {
		if (dirfd == AT_FDCWD)
			snprintf(link, sizeof(link), "/proc/%d/cwd", tid);
		else
			snprintf(link, sizeof(link), "/proc/%d/fd/%d", tid, dirfd);
		if (read_link(link, base, sizeof(base)) < 0 || base[0] != '/')
			return -1;          /* gone, not an fd, or not a directory ("pipe:[..]") */
		/* the link is in our view; the target's root may be a subtree of it */
		snprintf(link, sizeof(link), "/proc/%d/root", tid);
		if (read_link(link, root, sizeof(root)) < 0)
			return -1;
		rootlen = strlen(root);
		if (strcmp(root, "/") != 0) {
			if (strncmp(base, root, rootlen) != 0 || (base[rootlen] != '/' && base[rootlen]))
				return -1;  /* outside its root (an fd from before a chroot) */
			memmove(base, base + rootlen, strlen(base + rootlen) + 1);
		}
	}
	if (snprintf(out, size, "%s/%s", base, path) >= (int)size)
		return -1;
	if (normalise(out))
		return -1;                  /* "/dev/kvm/" and the like: not a device */
	return 0;
}

/* The last component of a path ("" if it ends in a slash). */
static const char *last_component(const char *path)
{
	const char *slash = strrchr(path, '/');

	return slash ? slash + 1 : path;
}

/* Does the open name /dev/kvm?  Either the file the target would open is the KVM
 * device node (the jailer's mknod, a symlink: the kernel resolves the path in the
 * target's view through /proc/TID/{root,cwd,fd/N}), or the path is /dev/kvm or a
 * --dev path by name (no such file needed), compared after resolving it, which is
 * done only when its last component is one of theirs. */
static int names_kvm(pid_t tid, int dirfd, const char *path, int flags)
{
	char proc[PATH_MAX + 64], abs[PATH_MAX];
	const char *base = last_component(path);
	struct stat st;
	int i;

	if (path[0] == '/')
		snprintf(proc, sizeof(proc), "/proc/%d/root%s", tid, path);
	else if (dirfd == AT_FDCWD)
		snprintf(proc, sizeof(proc), "/proc/%d/cwd/%s", tid, path);
	else
		snprintf(proc, sizeof(proc), "/proc/%d/fd/%d/%s", tid, dirfd, path);
	if (fstatat(AT_FDCWD, proc, &st, (flags & O_NOFOLLOW) ? AT_SYMLINK_NOFOLLOW : 0) == 0 &&
	    S_ISCHR(st.st_mode) && major(st.st_rdev) == 10 && minor(st.st_rdev) == KVM_MISC_MINOR)
		return 1;
	for (i = 0; i < n_devs; i++)
		if (strcmp(base, last_component(devs[i])) == 0)
			break;
	if (i == n_devs || target_path(tid, dirfd, path, abs, sizeof(abs)) < 0)
		return 0;
	for (i = 0; i < n_devs; i++)
		if (strcmp(abs, devs[i]) == 0)
			return 1;
	return 0;
}

/* --- open, openat, openat2 -------------------------------------------------------- */
static void handle_open(struct seccomp_notif *req)
{
	pid_t tid = req->pid;
	const __u64 *a = req->data.args;
	char path[PATH_MAX];
	int dirfd, fd, r;
	__u64 flags;

	switch (req->data.nr) {
	case __NR_open:
		dirfd = AT_FDCWD;
		r = read_string(tid, a[0], path, sizeof(path));
		flags = (unsigned int)a[1];
		break;
	case __NR_openat:
		dirfd = (int)a[0];
		r = read_string(tid, a[1], path, sizeof(path));
		flags = (unsigned int)a[2];
		break;
	default: {                          /* openat2 */
		struct open_how how;

		if (a[3] < sizeof(how) || read_mem(tid, a[2], &how, sizeof(how)) < 0) {
			reply_continue(req->id); /* the kernel answers EINVAL / EFAULT */
			return;
		}
		dirfd = (int)a[0];
		flags = how.flags;
		r = read_string(tid, a[1], path, sizeof(path));
		break;
	}
	}
	if (r < 0) {
		reply_continue(req->id);    /* EFAULT, ENAMETOOLONG: the kernel says so */
		return;
	}
	/* O_PATH, O_DIRECTORY, O_CREAT|O_EXCL on /dev/kvm: the kernel's answer is right */
	if ((flags & (O_PATH | O_DIRECTORY)) || (flags & (O_CREAT | O_EXCL)) == (O_CREAT | O_EXCL) ||
	    !names_kvm(tid, dirfd, path, (int)flags)) {
		reply_continue(req->id);
		return;
	}
	if (!id_valid(req->id))
		return;
	fd = open(mnt_kvm, (int)(flags & (O_ACCMODE | O_NONBLOCK)) | O_CLOEXEC);
	debug("tid %d: open %s -> %s (%s)", tid, path, mnt_kvm, fd < 0 ? strerror(errno) : "ok");
	if (fd < 0) {
		reply_error(req->id, errno);
		return;
	}
	reply_fd(req->id, fd, (flags & O_CLOEXEC) != 0);
	close(fd);
}

/* --- kvmfs files -------------------------------------------------------------------- */
#define MAX_MOUNTS 32
static dev_t kvmfs_devs[MAX_MOUNTS];
static int n_kvmfs_devs = -1;        /* -1: not read yet */

static void read_mounts(void)
{
	FILE *f = fopen("/proc/self/mountinfo", "re");
	char line[4096];

	n_kvmfs_devs = 0;
	if (!f)
		return;
	while (fgets(line, sizeof(line), f) && n_kvmfs_devs < MAX_MOUNTS) {
		unsigned int maj, min;
		char *sep = strstr(line, " - ");

		if (!sep || sscanf(line, "%*u %*u %u:%u", &maj, &min) != 2)
			continue;
		if (strncmp(sep + 3, "fuse.kvmfs ", 11) == 0)
			kvmfs_devs[n_kvmfs_devs++] = makedev(maj, min);
	}
	fclose(f);
}

/* Whether st_dev is a fuse.kvmfs mount; the list is read again on a miss (a
 * mount made after the last look). */
static int is_kvmfs_dev(dev_t dev)
{
	int i, pass;

	for (pass = 0; pass < 2; pass++) {
		if (pass || n_kvmfs_devs < 0)
			read_mounts();
		for (i = 0; i < n_kvmfs_devs; i++)
			if (kvmfs_devs[i] == dev)
				return 1;
	}
	return 0;
}

/* The thread's process id, from /proc/TID/status (for kernels without PIDFD_THREAD). */
static pid_t tgid_of(pid_t tid)
{
	char name[64], line[256];
	FILE *f;
	pid_t tgid = -1;

	snprintf(name, sizeof(name), "/proc/%d/status", tid);
	f = fopen(name, "re");
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "Tgid: %d", &tgid) == 1)
			break;
	fclose(f);
	return tgid;
}

static int pidfd_of(pid_t tid)
{
	int pidfd = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
	pid_t tgid;

	if (pidfd >= 0 || errno != EINVAL)
		return pidfd;
	tgid = tgid_of(tid);            /* before 6.9: only a process has a pidfd */
	if (tgid < 0) {
		errno = ESRCH;
		return -1;
	}
	return (int)syscall(SYS_pidfd_open, tgid, 0);
}

/* If the target's fd is a file of a kvmfs mount, its path (in our view) into
 * path and 1; 0 if it is not; -errno when that cannot be told (ESRCH: gone). */
static int kvmfs_file_of(pid_t tid, int target_fd, char *path, size_t size)
{
	char link[64];
	struct stat st;
	int pidfd, fd, r;

	pidfd = pidfd_of(tid);
	if (pidfd < 0)
		return -errno;
	fd = (int)syscall(SYS_pidfd_getfd, pidfd, target_fd, 0);
	r = fd < 0 ? -errno : 0;
	close(pidfd);
	if (r < 0)
		return r;
	r = 0;
	if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && is_kvmfs_dev(st.st_dev)) {
		snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
		r = read_link(link, path, size) == 0 ? 1 : -ENAMETOOLONG;
	}
	close(fd);
	return r;
}

/* Open a kvmfs file and make its requests act for thread tid's process. */
static int open_acting_for(const char *path, pid_t tid)
{
	struct kvmfs_act_for act = { .tid = (__u32)tid, .flags = 0 };
	static int told;
	int fd = open(path, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		return -errno;
	if (ioctl(fd, KVMFS_ACT_FOR, &act) < 0) {
		int err = errno;

		if (err == ENOTTY && !told++)
			warn("%s: KVMFS_ACT_FOR: %s (the daemon does not serve it: too old for "
			     "this supervisor)", path, strerror(err));
		close(fd);
		return -err;
	}
	return fd;
}

/* --- fd-creating ioctls ----------------------------------------------------------- */
static void handle_fd_ioctl(struct seccomp_notif *req, const struct fd_ioctl *row)
{
	pid_t tid = req->pid;
	__u64 arg = req->data.args[2];
	char file[PATH_MAX], child[PATH_MAX], name[64], *slash;
	unsigned char buf[256];
	int r, own = -1, fd = -1, id, gone = 0;
	static int told;

	r = kvmfs_file_of(tid, (int)req->data.args[0], file, sizeof(file));
	if (r <= 0) {
		/* not kvmfs (0), a bad fd (EBADF): KVM or the kernel answers; gone: nothing to do */
		if (r != -ESRCH)
			reply_continue(req->id);
		if (r < 0 && r != -EBADF && r != -ESRCH && !told++)
			warn("tid %d: %s: its fd cannot be examined (%s): left to the kernel",
			     tid, row->name, strerror(-r));
		return;
	}
	if (row->argsz > sizeof(buf) || (row->argsz && (r = read_mem(tid, arg, buf, row->argsz)) < 0)) {
		if (r != -ESRCH)
			reply_error(req->id, EFAULT);
		return;
	}
	if (!id_valid(req->id))
		return;
	own = open_acting_for(file, tid);
	if (own < 0) {
		r = own;
		goto fail;
	}
	id = ioctl(own, row->cmd, row->argsz ? (unsigned long)buf : (unsigned long)arg);
	if (id < 0) {
		r = -errno;
		goto fail;
	}
	if (row->argsz && (_IOC_DIR(row->cmd) & _IOC_READ) && (r = write_mem(tid, arg, buf, row->argsz)) < 0) {
		gone = r == -ESRCH;
		goto fail;
	}
	if (row->cmd == KVM_CREATE_DEVICE && (((struct kvm_create_device *)buf)->flags & KVM_CREATE_DEVICE_TEST)) {
		reply(req->id, id, 0, 0);       /* a test: no device, no fd */
		close(own);
		return;
	}
	slash = strrchr(file, '/');
	*slash = '\0';
	snprintf(name, sizeof(name), row->child, id);
	if (snprintf(child, sizeof(child), "%s/%s", file, name) >= (int)sizeof(child)) {
		r = -ENAMETOOLONG;
		goto fail;
	}
	fd = open(child, O_RDWR | O_CLOEXEC);
	debug("tid %d: %s on %s/... -> %d: %s (%s)", tid, row->name, file, id, child,
	      fd < 0 ? strerror(errno) : "ok");
	if (fd < 0) {
		r = -errno;
		goto fail;
	}
	if (row->fd_at < 0) {
		reply_fd(req->id, fd, row->fdfl & O_CLOEXEC);
	} else {
		/* KVM stores the fd in the struct and returns 0 */
		__u32 target_fd;

		r = addfd(req->id, fd, row->fdfl & O_CLOEXEC, 0);
		if (r < 0) {
			gone = r == -ENOENT;
			goto fail;
		}
		target_fd = (__u32)r;
		memcpy(buf + row->fd_at, &target_fd, sizeof(target_fd));
		r = write_mem(tid, arg, buf, row->argsz);
		if (r < 0) {            /* the fd stays in the target, as KVM would leave it */
			gone = r == -ESRCH;
			goto fail;
		}
		reply(req->id, 0, 0, 0);
	}
	close(own);
	close(fd);
	return;
fail:
	debug("tid %d: %s: %s", tid, row->name, strerror(-r));
	close_keep_errno(own);
	close_keep_errno(fd);
	if (!gone)
		reply_error(req->id, -r);
}

/* --- ptrace: stopping threads and making calls inside them --------------------------
 * The conversion of guest RAM and the MMU notifications below act on a thread
 * that waits in a notification.  What they rely on (x86-64):
 *   - PTRACE_INTERRUPT, then an answer -ERESTARTNOINTR to the notification, makes
 *     the thread stop in get_signal(), before the restart logic and before user
 *     mode, with orig_rax = the syscall, rip after its `syscall` instruction and
 *     rax = -ERESTARTNOINTR, or -ERESTARTSYS if the interrupt took it out of the
 *     wait first (without WAIT_KILLABLE_RECV; the answer then gets ENOENT);
 *   - from there a syscall runs through that instruction (rip - 2): registers set
 *     with orig_rax = -1 (no restart logic on the way out), then PTRACE_SYSCALL to
 *     its entry and to its exit stop;
 *   - the thread is then put where the kernel's restart would have put it (rip - 2,
 *     rax = the syscall: it makes the call again, which is a new notification), or
 *     past the call with a result in rax;
 *   - an injected call meets the filter like any other: if it is one we trap, its
 *     notification is answered CONTINUE while we wait for it, and notifications of
 *     other threads that arrive meanwhile are kept for the main loop.
 * Signals a stopped thread would have taken are held and sent again after the
 * detach.  Threads are seized with PTRACE_O_EXITKILL: a program left stopped, or
 * with changed registers, by a supervisor that died is worse than none.
 */
static pid_t child_pid;
static int child_status, child_reaped;

/* A wait for a thread we trace may see our child's end: keep it for supervise(). */
static void note_exit(pid_t pid, int status)
{
	if (pid == child_pid && !child_reaped && (WIFEXITED(status) || WIFSIGNALED(status))) {
		child_status = status;
		child_reaped = 1;
	}
}

/* Notifications received while a call was injected, for the main loop. */
struct pending {
	struct pending *next;
	struct seccomp_notif req;           /* sizes.seccomp_notif bytes */
};
static struct pending *deferred, **deferred_tail = &deferred;

/* Receive a notification: the injected call `nr` of thread tid is CONTINUEd, any
 * other kept. */
static void take_notification(pid_t tid, long nr)
{
	struct pending *p = calloc(1, offsetof(struct pending, req) + sizes.seccomp_notif);

	if (!p)
		return;
	if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, &p->req) < 0) {
		free(p);
		return;
	}
	if (p->req.pid == (__u32)tid && p->req.data.nr == nr) {
		reply_continue(p->req.id);
		free(p);
		return;
	}
	*deferred_tail = p;
	deferred_tail = &p->next;
}

static struct pending *next_deferred(void)
{
	struct pending *p = deferred;

	if (p) {
		deferred = p->next;
		if (!deferred)
			deferred_tail = &deferred;
	}
	return p;
}

static void deadline_in(struct timespec *d, int ms)
{
	clock_gettime(CLOCK_MONOTONIC, d);
	d->tv_sec += ms / 1000;
	d->tv_nsec += (long)(ms % 1000) * 1000000;
	if (d->tv_nsec >= 1000000000) {
		d->tv_sec++;
		d->tv_nsec -= 1000000000;
	}
}

static int ms_until(const struct timespec *d)
{
	struct timespec now;
	long ms;

	clock_gettime(CLOCK_MONOTONIC, &now);
	ms = (d->tv_sec - now.tv_sec) * 1000 + (d->tv_nsec - now.tv_nsec) / 1000000;
	return ms < 0 ? 0 : ms > 60000 ? 60000 : (int)ms + 1;
}

/* waitpid(tid, __WALL), sleeping on SIGCHLD, until the deadline (NULL: none).
 * While an injected call `nr` runs (nr >= 0), its notification is answered.
 * 1: *st is set; 0: timed out; -errno. */
static int wait_tracee(pid_t tid, int *st, const struct timespec *deadline, long nr)
{
	for (;;) {
		struct pollfd p[2] = { { chld_fd, POLLIN, 0 }, { nr >= 0 ? listener : -1, POLLIN, 0 } };
		struct signalfd_siginfo si;
		int timeout = -1;
		pid_t r = waitpid(tid, st, __WALL | WNOHANG);

		if (r == tid)
			return 1;
		if (r < 0 && errno != EINTR)
			return -errno;
		if (deadline) {
			timeout = ms_until(deadline);
			if (timeout <= 1 && ms_until(deadline) <= 0)
				return 0;
		}
		if (chld_fd < 0 && (timeout < 0 || timeout > 1))
			timeout = 1;            /* no signalfd: poll the wait */
		if (poll(p, 2, timeout) < 0 && errno != EINTR)
			return -errno;
		while (chld_fd >= 0 && read(chld_fd, &si, sizeof(si)) == sizeof(si))
			;
		if (p[1].revents & POLLIN)
			take_notification(tid, nr);
	}
}

/* The threads we trace, all of one process. */
struct thread {
	pid_t tid;
	int stopped;    /* in a ptrace-stop */
	int gone;       /* exited, or no longer ours to wait for */
	int sig;        /* a signal it stopped to take, held until the detach */
};
struct world {
	pid_t tgid;
	struct thread *t;
	int n, cap;
};

static struct thread *world_find(struct world *w, pid_t tid)
{
	int i;

	for (i = 0; i < w->n; i++)
		if (w->t[i].tid == tid)
			return &w->t[i];
	return NULL;
}

/* PTRACE_SEIZE one thread into w: 1, 0 if it is gone already, or -errno. */
static int world_seize(struct world *w, pid_t tid)
{
	if (w->n == w->cap) {
		int cap = w->cap ? 2 * w->cap : 16;
		struct thread *t = realloc(w->t, cap * sizeof(*t));

		if (!t)
			return -ENOMEM;
		w->t = t;
		w->cap = cap;
	}
	if (ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL) < 0)
		return errno == ESRCH ? 0 : -errno;
	w->t[w->n++] = (struct thread){ .tid = tid };
	return 1;
}

/* Seize the threads of w->tgid not seized yet: how many, or -errno. */
static int seize_new(struct world *w)
{
	char name[64];
	struct dirent *e;
	int added = 0, r = 0;
	DIR *d;

	snprintf(name, sizeof(name), "/proc/%d/task", w->tgid);
	d = opendir(name);
	if (!d)
		return -errno;
	while (r >= 0 && (e = readdir(d))) {
		pid_t tid = (pid_t)atoi(e->d_name);

		if (tid > 0 && !world_find(w, tid) && (r = world_seize(w, tid)) > 0)
			added++;
	}
	closedir(d);
	return r < 0 ? r : added;
}

/* Wait until t is in a ptrace-stop or gone: 0, or -ETIMEDOUT at the deadline. */
static int wait_stopped(struct thread *t, const struct timespec *deadline)
{
	while (!t->stopped && !t->gone) {
		int st, r = wait_tracee(t->tid, &st, deadline, -1);

		if (r == 0)
			return -ETIMEDOUT;
		if (r < 0) {
			t->gone = 1;            /* ECHILD: not ours to wait for any more */
		} else if (WIFSTOPPED(st)) {
			if ((st >> 16) != PTRACE_EVENT_STOP)   /* a signal-delivery-stop */
				t->sig = WSTOPSIG(st);
			t->stopped = 1;
		} else {
			note_exit(t->tid, st);
			t->gone = 1;
		}
	}
	return 0;
}

static int interrupt_and_wait(struct thread *t, const struct timespec *deadline)
{
	if (!t->stopped && !t->gone && ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0 && errno == ESRCH)
		t->gone = 1;
	return wait_stopped(t, deadline);
}

/* Stop every thread of the process, those it starts meanwhile included. */
static int stop_world(struct world *w)
{
	struct timespec deadline;
	int i, r, rounds;

	deadline_in(&deadline, 2000);
	for (rounds = 0; rounds < 64; rounds++) {
		for (i = 0; i < w->n; i++)
			if (!w->t[i].stopped && !w->t[i].gone && ptrace(PTRACE_INTERRUPT, w->t[i].tid, 0, 0) < 0 &&
			    errno == ESRCH)
				w->t[i].gone = 1;
		for (i = 0; i < w->n; i++)
			if (wait_stopped(&w->t[i], &deadline) < 0)
				return -ETIMEDOUT;
		r = seize_new(w);                   /* threads cloned before their creator stopped */
		if (r <= 0)
			return r;
	}
	return -EAGAIN;
}

/* Let every thread go.  A thread seized but not stopped is stopped first
 * (PTRACE_DETACH needs a stopped tracee).  Held signals are sent again: through
 * the detach for a thread in its signal-delivery-stop, else (keep: the thread
 * whose registers we set) with tgkill. */
static void detach_world(struct world *w, pid_t keep)
{
	struct timespec deadline;
	int i;

	deadline_in(&deadline, 2000);
	for (i = 0; i < w->n; i++) {
		struct thread *t = &w->t[i];

		if (!t->gone && !t->stopped && interrupt_and_wait(t, &deadline) < 0)
			warn("thread %d does not stop: it stays traced", t->tid);
		if (t->gone || !t->stopped)
			continue;
		if (ptrace(PTRACE_DETACH, t->tid, 0, t->tid == keep ? 0 : t->sig) < 0 && errno != ESRCH)
			warn("PTRACE_DETACH %d: %s", t->tid, strerror(errno));
		if (t->tid == keep && t->sig)
			syscall(SYS_tgkill, w->tgid, t->tid, t->sig);
	}
	free(w->t);
	w->t = NULL;
	w->n = w->cap = 0;
}

/* Run syscall nr(a[0..5]) in the stopped thread t, at insn (a `syscall`
 * instruction), the other registers from base.  0 and *result, or -errno of ptrace. */
static int inject(struct thread *t, const struct user_regs_struct *base, __u64 insn, long nr,
		  const __u64 a[6], long *result)
{
	struct user_regs_struct r = *base;
	int st, stops = 0, w;

	r.rax = nr;
	r.orig_rax = -1;                    /* no syscall restart on the way back to user mode */
	r.rip = insn;
	r.rdi = a[0];
	r.rsi = a[1];
	r.rdx = a[2];
	r.r10 = a[3];
	r.r8 = a[4];
	r.r9 = a[5];
	if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0)
		return -errno;
	while (stops < 2) {                 /* the syscall's entry and exit stops */
		if (ptrace(PTRACE_SYSCALL, t->tid, 0, 0) < 0)
			return -errno;
		w = wait_tracee(t->tid, &st, NULL, nr);
		if (w < 0)
			return w;
		if (!WIFSTOPPED(st)) {
			note_exit(t->tid, st);
			t->gone = 1;
			return -ESRCH;
		}
		if (WSTOPSIG(st) == (SIGTRAP | 0x80))
			stops++;
		else if ((st >> 16) == 0)
			t->sig = WSTOPSIG(st);      /* a signal: held (PTRACE_SYSCALL with 0 drops it) */
	}
	if (ptrace(PTRACE_GETREGS, t->tid, 0, &r) < 0)
		return -errno;
	*result = (long)r.rax;
	return 0;
}

/* Take the notifying thread t out of its call into a ptrace-stop (see above). */
static int interrupt_call(struct thread *t, const struct seccomp_notif *req, const struct timespec *deadline)
{
	if (ptrace(PTRACE_INTERRUPT, t->tid, 0, 0) < 0) {
		if (errno == ESRCH)
			t->gone = 1;
		return -errno;
	}
	reply(req->id, -1, ERESTARTNOINTR, 0);
	return wait_stopped(t, deadline);
}

/* Are the registers where the notification left the thread: interrupted in it? */
static int in_the_call(const struct user_regs_struct *r, const struct seccomp_notif *req)
{
	return ((long)r->rax == -ERESTARTSYS || (long)r->rax == -ERESTARTNOINTR) &&
	       r->orig_rax == (__u64)req->data.nr &&
	       r->rip == req->data.instruction_pointer && r->rdi == req->data.args[0] &&
	       r->rsi == req->data.args[1] && r->rdx == req->data.args[2] &&
	       r->r10 == req->data.args[3] && r->r8 == req->data.args[4] && r->r9 == req->data.args[5];
}

/* Was the call made with a `syscall` instruction (the one we run calls through)? */
static int by_syscall_insn(const struct seccomp_notif *req)
{
	unsigned char code[2];

	return read_mem(req->pid, req->data.instruction_pointer - 2, code, 2) == 0 &&
	       code[0] == 0x0f && code[1] == 0x05;
}

/* Make the notifying thread's call inside it, ourselves: stopped, the same
 * syscall with the same arguments, its result returned as the call's.  With a
 * memfd (>= 0), an mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS) is made as
 * MAP_SHARED of that memfd instead (fresh zeroed memory either way): guest RAM
 * stays shareable when the VMM replaces it.
 * 1: done (*result); 0: not (cannot trace it), the call still waits for an
 * answer; -1: not, and the call is gone (the thread left it for a signal). */
static int call_in_target(const struct seccomp_notif *req, pid_t tgid, int memfd, long *result)
{
	struct world w = { .tgid = tgid };
	struct user_regs_struct saved, r;
	const __u64 insn = req->data.instruction_pointer - 2;
	struct timespec deadline;
	struct thread *t;
	__u64 a[6];
	long ignored;
	int res = -1, tfd = -1;

	memcpy(a, req->data.args, sizeof(a));
	if (!by_syscall_insn(req) || world_seize(&w, req->pid) <= 0) {
		free(w.t);
		return 0;
	}
	t = &w.t[0];
	if (memfd >= 0 && (tfd = addfd(req->id, memfd, 1, 0)) >= 0) {
		a[3] = (a[3] & ~(__u64)(MAP_TYPE | MAP_ANONYMOUS)) | MAP_SHARED;
		a[4] = (__u64)tfd;
		a[5] = 0;
	}
	deadline_in(&deadline, 2000);
	if (interrupt_call(t, req, &deadline) < 0 || t->gone || !t->stopped ||
	    ptrace(PTRACE_GETREGS, t->tid, 0, &saved) < 0 || !in_the_call(&saved, req)) {
		if (tfd >= 0)
			warn("pid %d: fd %d (a memfd) stays open in it", tgid, tfd);
		detach_world(&w, 0);        /* untouched: its own restart, or its signal */
		return -1;
	}
	if (inject(t, &saved, insn, (long)req->data.nr, a, result) == 0) {
		r = saved;                  /* past the call, with its result */
		r.rax = (__u64)*result;
		r.orig_rax = -1;
		res = 1;
	} else {
		r = saved;                  /* as the kernel's restart would: it calls again */
		r.rax = saved.orig_rax;
		r.rip = insn;
		r.orig_rax = -1;
	}
	if (tfd >= 0 && !t->gone) {
		__u64 c[6] = { (__u64)tfd, 0, 0, 0, 0, 0 };

		inject(t, &saved, insn, __NR_close, c, &ignored);
	}
	if (!t->gone && ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0)
		res = -1;
	detach_world(&w, t->tid);
	return res;
}

/* --- memslots: private anonymous guest RAM, converted in place -----------------------
 * The daemon maps the VMM's memory through /proc/PID/map_files, which works for
 * shared memory only.  Private anonymous memory (Firecracker's, kvmtool's,
 * QEMU's default) is converted when a memslot is made of it, inside the stopped
 * program, which keeps its addresses and contents:
 *
 *   1. the target's fd is a kvmfs file, the range is page-aligned and wholly
 *      private anonymous memory (no file, not [heap]/[stack]) of one protection;
 *   2. every thread of the process is PTRACE_SEIZEd (no stop yet: this checks
 *      that we may), a memfd of the range's size is made here and installed into
 *      the target with ADDFD (without SEND: the call still waits);
 *   3. every thread is stopped (PTRACE_INTERRUPT; the notifying one leaves its
 *      wait, see above), and the range checked again;
 *   4. the pages present or swapped out per /proc/PID/pagemap (not the shared
 *      zero page) are copied once, process_vm_readv straight into our mapping of
 *      the memfd;
 *   5. mmap(addr, len, prot, MAP_SHARED|MAP_FIXED, fd, 0) and close(fd) run in the
 *      notifying thread;
 *   6. it is set to make KVM_SET_USER_MEMORY_REGION again and every thread is
 *      let go: the new notification finds shared memory and goes to the daemon.
 * A range whose conversion failed is not tried again (its slot then fails at
 * first use, as without conversion).
 * What the program can tell afterwards: the range is MAP_SHARED, so a child
 * forked later shares it instead of getting a copy, and MADV_DONTNEED no longer
 * empties it by itself (with the MMU notifications on, DONTNEED and FREE of it
 * punch the memfd: see there).  Not converted: hugetlb (MAP_HUGETLB) and private
 * file mappings (snapshots), ranges with holes or mixed protections.  The
 * injected mmap and close meet the program's own seccomp filters, if it installed
 * some before making its memslots.
 */
#define RAM_MEMFD "kvmfs-guest-ram"
#define RAM_MAPS_NAME "/memfd:" RAM_MEMFD " (deleted)"

/* Whether [start, end) is wholly private anonymous memory of one protection:
 * its PROT_* bits, or -1. */
static int private_anon_prot(pid_t tid, __u64 start, __u64 end)
{
	char name[64], *line = NULL;
	size_t cap = 0;
	__u64 covered = start;
	int prot = -1, ok = 1;
	FILE *f;

	snprintf(name, sizeof(name), "/proc/%d/maps", tid);
	f = fopen(name, "re");
	if (!f)
		return -1;
	while (ok && covered < end && getline(&line, &cap, f) > 0) {
		unsigned long lo, hi, ino;
		char perms[5], *path;
		int off = 0, p;

		if (sscanf(line, "%lx-%lx %4s %*s %*s %lu %n", &lo, &hi, perms, &ino, &off) < 4 || !off)
			continue;
		if (hi <= covered)
			continue;
		path = line + off;
		path[strcspn(path, "\n")] = '\0';
		p = (perms[0] == 'r' ? PROT_READ : 0) | (perms[1] == 'w' ? PROT_WRITE : 0) |
		    (perms[2] == 'x' ? PROT_EXEC : 0);
		ok = lo <= covered && ino == 0 && perms[3] == 'p' && (p & PROT_READ) &&
		     (!*path || strncmp(path, "[anon:", 6) == 0) && (prot < 0 || p == prot);
		prot = p;
		covered = hi;
	}
	free(line);
	fclose(f);
	return ok && covered >= end ? prot : -1;
}

/* Ranges not to try again: (process, start, size). */
#define MAX_FAILED 64
static struct { pid_t tgid; __u64 start, size; } failed[MAX_FAILED];
static unsigned int n_failed;

static int failed_before(pid_t tgid, __u64 start, __u64 size)
{
	unsigned int i;

	for (i = 0; i < n_failed && i < MAX_FAILED; i++)
		if (failed[i].tgid == tgid && failed[i].start == start && failed[i].size == size)
			return 1;
	return 0;
}

static void remember_failure(pid_t tgid, __u64 start, __u64 size)
{
	unsigned int i = n_failed++ % MAX_FAILED;

	failed[i].tgid = tgid;
	failed[i].start = start;
	failed[i].size = size;
}

/* The PFN of the shared zero page (pages only read, never written, map it), or 0
 * when pagemap hides PFNs from us (without CAP_SYS_ADMIN). */
static __u64 zero_pfn(void)
{
	static int known;
	static __u64 pfn;
	long page = sysconf(_SC_PAGESIZE);
	volatile char *p;
	__u64 e;
	int fd;

	if (known)
		return pfn;
	known = 1;
	p = mmap(NULL, page, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		return 0;
	(void)p[0];
	fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	if (fd >= 0 && pread(fd, &e, sizeof(e), (off_t)((uintptr_t)p / page) * 8) == sizeof(e) && (e >> 63))
		pfn = e & ((1ULL << 55) - 1);
	if (fd >= 0)
		close(fd);
	munmap((void *)p, page);
	return pfn;
}

/* Copy the pages of [start, start+size) of the stopped process that hold data
 * (present, or swapped out) to dst.  0, or -errno. */
static int copy_present(pid_t tgid, __u64 start, __u64 size, unsigned char *dst, __u64 *copied)
{
	const __u64 page = (__u64)sysconf(_SC_PAGESIZE), zero = zero_pfn();
	__u64 npages = size / page, i, run = 0, nrun = 0, e[512];
	char name[64];
	int fd, err = 0;

	snprintf(name, sizeof(name), "/proc/%d/pagemap", tgid);
	fd = open(name, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -errno;
	for (i = 0; i <= npages && !err; i++) {
		int data = 0;

		if (i < npages) {
			__u64 x;

			if (i % 512 == 0) {
				size_t want = (npages - i < 512 ? npages - i : 512) * sizeof(e[0]);

				if (pread(fd, e, want, (off_t)((start / page + i) * sizeof(e[0]))) != (ssize_t)want) {
					err = -EIO;
					break;
				}
			}
			x = e[i % 512];
			data = (x >> 62 & 1) || ((x >> 63 & 1) && !(zero && (x & ((1ULL << 55) - 1)) == zero));
		}
		if (data) {
			if (!nrun++)
				run = i;
			continue;
		}
		while (nrun) {                  /* copy the run that ends here */
			struct iovec l = { dst + run * page, nrun * page };
			struct iovec r = { (void *)(uintptr_t)(start + run * page), nrun * page };
			ssize_t n = process_vm_readv(tgid, &l, 1, &r, 1, 0);

			if (n <= 0 || n % page) {
				err = n < 0 ? -errno : -EFAULT;
				break;
			}
			*copied += n / page;
			run += n / page;
			nrun -= n / page;
		}
	}
	close(fd);
	return err;
}

/* Convert [start, start+size) of the notifying thread's process (the steps
 * above).  1: converted; 0: not, and the call still waits for our answer;
 * -1: not, and the call is gone (it will be made again, or was left for a signal). */
static int convert(const struct seccomp_notif *req, pid_t tgid, __u64 start, __u64 size)
{
	struct world w = { .tgid = tgid };
	struct user_regs_struct saved, r;
	const __u64 insn = req->data.instruction_pointer - 2;
	struct thread *t = NULL;
	struct timespec t0, t1, deadline;
	__u64 copied = 0, a[6];
	void *map = MAP_FAILED;
	int memfd, tfd = -1, res = 0, prot, err = 0;
	const char *why = NULL;
	long ret;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	if (!by_syscall_insn(req))
		return 0;
	memfd = (int)syscall(SYS_memfd_create, RAM_MEMFD, 1U /* MFD_CLOEXEC */);
	if (memfd < 0 || ftruncate(memfd, (off_t)size) < 0) {
		warn("memfd of 0x%llx bytes: %s", (unsigned long long)size, strerror(errno));
		close_keep_errno(memfd);
		return 0;
	}
	err = seize_new(&w);
	if (err < 0 || !world_find(&w, req->pid)) {
		why = "PTRACE_SEIZE";
		goto out;
	}
	tfd = addfd(req->id, memfd, 1, 0);
	if (tfd < 0) {
		err = tfd;
		res = tfd == -ENOENT ? -1 : 0;
		why = "SECCOMP_IOCTL_NOTIF_ADDFD";
		goto out;
	}
	res = -1;                           /* from here on the call is interrupted */
	deadline_in(&deadline, 2000);
	err = interrupt_call(world_find(&w, req->pid), req, &deadline);
	if (!err)
		err = stop_world(&w);
	t = world_find(&w, req->pid);       /* after stop_world(), which may move w.t */
	if (t->gone || !t->stopped || ptrace(PTRACE_GETREGS, t->tid, 0, &saved) < 0 ||
	    !in_the_call(&saved, req)) {
		t = NULL;                   /* it left the call (a signal): leave it alone */
		if (!err)
			err = -EINTR;
		why = "the thread left the call";
		goto out_fd;
	}
	if (err < 0) {
		why = "stopping its threads";
		goto out_fd;
	}
	prot = private_anon_prot(tgid, start, start + size);    /* again, now that it is stopped */
	if (prot < 0) {
		err = -EAGAIN;
		why = "the range changed";
		goto out_fd;
	}
	map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, memfd, 0);
	if (map == MAP_FAILED) {
		err = -errno;
		why = "mmap of the memfd";
		goto out_fd;
	}
	err = copy_present(tgid, start, size, map, &copied);
	if (err < 0) {
		why = "copying";
		goto out_fd;
	}
	a[0] = start, a[1] = size, a[2] = (__u64)prot, a[3] = MAP_SHARED | MAP_FIXED, a[4] = (__u64)tfd, a[5] = 0;
	err = inject(t, &saved, insn, __NR_mmap, a, &ret);
	if (err == 0 && ret != (long)start)
		err = ret < 0 ? (int)ret : -EFAULT;
	if (err < 0) {
		why = "the injected mmap";
		goto out_fd;
	}
	res = 1;
out_fd:
	if (err == -ESRCH && t)
		t->gone = 1;                /* the process died meanwhile */
	if (t && !t->gone) {
		a[0] = (__u64)tfd, a[1] = a[2] = a[3] = a[4] = a[5] = 0;
		if (inject(t, &saved, insn, __NR_close, a, &ret) < 0 || ret < 0)
			warn("pid %d: the injected close(%d) failed", tgid, tfd);
	} else if (!t && tfd >= 0) {
		warn("pid %d: fd %d (a memfd) stays open in it", tgid, tfd);
	}
	if (t && !t->gone) {
		r = saved;                  /* as the kernel's restart would: it calls again */
		r.rax = saved.orig_rax;
		r.rip = insn;
		r.orig_rax = -1;
		if (ptrace(PTRACE_SETREGS, t->tid, 0, &r) < 0)
			warn("pid %d: restoring thread %d: %s", tgid, t->tid, strerror(errno));
	}
out:
	detach_world(&w, t ? t->tid : 0);
	if (map != MAP_FAILED)
		munmap(map, size);
	close(memfd);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	if (res == 1) {
		debug("pid %d: converted 0x%llx-0x%llx to shared memory (%llu pages copied) in %.1f ms",
		      tgid, (unsigned long long)start, (unsigned long long)(start + size),
		      (unsigned long long)copied,
		      (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
	} else if (err == -ESRCH || (t && t->gone)) {
		debug("pid %d: exited while its guest memory was converted", tgid);
	} else {
		remember_failure(tgid, start, size);
		warn("pid %d: guest memory 0x%llx-0x%llx stays private (%s: %s); the daemon cannot "
		     "map it", tgid, (unsigned long long)start, (unsigned long long)(start + size),
		     why ? why : "?", strerror(-err));
	}
	return res;
}

/* The hvas of the memslots each process asked for (as far as we saw: a failed
 * call is counted too, which only costs a needless notification). */
struct range {
	pid_t tgid;
	__u32 slot;             /* as_id << 16 | slot */
	__u64 vm;               /* a hash of the VM file's path */
	__u64 start, end;
};
static struct range *ranges;
static int n_ranges, cap_ranges;

static __u64 hash_path(const char *s)
{
	__u64 h = 1469598103934665603ULL;       /* FNV-1a */

	while (*s)
		h = (h ^ (unsigned char)*s++) * 1099511628211ULL;
	return h;
}

static void note_memslot(pid_t tgid, const char *vm_file, __u32 slot, __u64 start, __u64 size)
{
	__u64 vm = hash_path(vm_file);
	int i, j;

	for (i = 0; i < n_ranges; i++)
		if (ranges[i].tgid == tgid && ranges[i].vm == vm && ranges[i].slot == slot)
			ranges[i--] = ranges[--n_ranges];
	if (!size)
		return;
	if (n_ranges == cap_ranges) {
		for (i = j = 0; i < n_ranges; i++)      /* drop those of processes gone */
			if (kill(ranges[i].tgid, 0) == 0 || errno != ESRCH)
				ranges[j++] = ranges[i];
		n_ranges = j;
	}
	if (n_ranges == cap_ranges) {
		int cap = cap_ranges ? 2 * cap_ranges : 64;
		struct range *r = realloc(ranges, cap * sizeof(*r));

		if (!r)
			return;
		ranges = r;
		cap_ranges = cap;
	}
	ranges[n_ranges++] = (struct range){ tgid, slot, vm, start, start + size };
}

/* Does [start, end) meet a registered range (of process tgid; 0: of any)? */
static int registered(pid_t tgid, __u64 start, __u64 end)
{
	int i;

	for (i = 0; i < n_ranges; i++)
		if ((!tgid || ranges[i].tgid == tgid) && ranges[i].start < end && start < ranges[i].end)
			return 1;
	return 0;
}

/* KVM_SET_USER_MEMORY_REGION(2): note the range, convert private anonymous
 * memory, then let the daemon have the call. */
static void handle_memslot(struct seccomp_notif *req)
{
	const __u64 page = (__u64)sysconf(_SC_PAGESIZE);
	pid_t tid = req->pid, tgid;
	char file[PATH_MAX];
	struct {                                /* the common head of both structs */
		__u32 slot, flags;
		__u64 guest_phys_addr, memory_size, userspace_addr;
	} m;
	int r;

	if (!convert_ram && !mmu_notify) {
		reply_continue(req->id);
		return;
	}
	r = kvmfs_file_of(tid, (int)req->data.args[0], file, sizeof(file));
	if (r <= 0) {
		if (r != -ESRCH)
			reply_continue(req->id);
		return;
	}
	if (read_mem(tid, req->data.args[2], &m, sizeof(m)) < 0 || (tgid = tgid_of(tid)) < 0) {
		reply_continue(req->id);        /* the daemon answers EFAULT */
		return;
	}
	if (mmu_notify)
		note_memslot(tgid, file, m.slot, m.userspace_addr, m.memory_size);
	if (!convert_ram || !m.memory_size || (m.flags & KVM_MEM_GUEST_MEMFD) ||
	    ((m.userspace_addr | m.memory_size) & (page - 1)) ||
	    m.userspace_addr + m.memory_size < m.userspace_addr ||
	    failed_before(tgid, m.userspace_addr, m.memory_size) ||
	    private_anon_prot(tid, m.userspace_addr, m.userspace_addr + m.memory_size) < 0) {
		reply_continue(req->id);        /* shared already, or the daemon answers */
		return;
	}
	if (!id_valid(req->id))
		return;
	if (convert(req, tgid, m.userspace_addr, m.memory_size) == 0)
		reply_continue(req->id);
	/* else: the thread makes the call again, or has left it */
}

/* --- MMU notifications -------------------------------------------------------------
 * KVM's MMU notifier sees every change of the VMM's address space; the daemon
 * learns of them through KVMFS_MMU_NOTIFY on a system file acting for the VMM.
 * Trapped: munmap, mremap, mmap with MAP_FIXED, mprotect, pkey_mprotect, madvise.
 * A call that meets no registered range (the hvas of the memslots its process
 * asked for) is CONTINUEd.  Otherwise:
 *   - UNMAP (munmap, mremap, mmap MAP_FIXED) and PROTECTION_VMA (mprotect): the
 *     daemon must not map the old pages again between its zap and the change, so
 *     it gets START, then we make the call inside the stopped thread
 *     (call_in_target), then END, and the thread gets the call's result.  An
 *     mmap(MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS) there is made as a MAP_SHARED
 *     mapping of a fresh memfd (zeroed memory either way), so that guest RAM
 *     stays shareable;
 *   - CLEAR (madvise DONTNEED, DONTNEED_LOCKED, FREE, REMOVE): the memory is
 *     shared with the daemon, whose mapping sees what the VMM's sees after such a
 *     call, so START and END come before the CONTINUE.  On RAM we converted, the
 *     VMM's DONTNEED or FREE would not free or zero it any more (it is shared
 *     now): the memfd's part of the range is punched out as well, through
 *     /proc/PID/map_files, as the private memory would have been emptied.
 * A thread that cannot be traced gets START and END before a CONTINUE: the
 * daemon could then map the old pages again before the change (one warning).
 */

static int mmu_notify_range(int sys, __u32 phase, __u16 event, __u16 cause, __u64 start, __u64 end)
{
	struct kvmfs_mmu_notify n = { .start = start, .end = end, .phase = phase, .event = event, .cause = cause };

	return ioctl(sys, KVMFS_MMU_NOTIFY, &n);
}

/* MADV_DONTNEED/FREE on converted RAM: punch the memfd where [start, end) maps it. */
static void punch_converted(pid_t tgid, __u64 start, __u64 end)
{
	char name[96], *line = NULL;
	size_t cap = 0;
	static int told;
	FILE *f;

	snprintf(name, sizeof(name), "/proc/%d/maps", tgid);
	f = fopen(name, "re");
	if (!f)
		return;
	while (getline(&line, &cap, f) > 0) {
		unsigned long lo, hi, off;
		char perms[5];
		int at = 0, fd;
		__u64 s, e;

		if (sscanf(line, "%lx-%lx %4s %lx %*s %*u %n", &lo, &hi, perms, &off, &at) < 4 || !at)
			continue;
		if (hi <= start || lo >= end || perms[3] != 's' ||
		    strncmp(line + at, RAM_MAPS_NAME, strlen(RAM_MAPS_NAME)) != 0)
			continue;
		s = start > lo ? start : lo;
		e = end < hi ? end : hi;
		snprintf(name, sizeof(name), "/proc/%d/map_files/%lx-%lx", tgid, lo, hi);
		fd = open(name, O_RDWR | O_CLOEXEC);
		if (fd < 0 || fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					(off_t)(off + (s - lo)), (off_t)(e - s)) < 0) {
			if (!told++)
				warn("pid %d: punching converted RAM (%s): %s", tgid, name, strerror(errno));
		}
		close_keep_errno(fd);
	}
	free(line);
	fclose(f);
}

static void handle_mm(struct seccomp_notif *req)
{
	const __u64 *a = req->data.args, page = (__u64)sysconf(_SC_PAGESIZE);
	struct { __u64 start, end; } rg[2];
	int n = 0, i, sys, done = 0, clear = 0;
	__u16 event = KVMFS_MMU_EVENT_UNMAP, cause;
	static int told_open, told_trace;
	pid_t tgid;
	long result;

#define RANGE(addr, len) do { \
		__u64 s_ = (addr) & ~(page - 1), e_ = ((addr) + (len) + page - 1) & ~(page - 1); \
		if ((len) && e_ > s_) { rg[n].start = s_; rg[n++].end = e_; } \
	} while (0)
	switch (req->data.nr) {
	case __NR_munmap:
		cause = KVMFS_CAUSE_MUNMAP;
		RANGE(a[0], a[1]);
		break;
	case __NR_mmap:
		cause = KVMFS_CAUSE_MMAP_FIXED;
		RANGE(a[0], a[1]);
		break;
	case __NR_mremap:
		cause = KVMFS_CAUSE_MREMAP;
		RANGE(a[0], a[1]);
		if (a[3] & MREMAP_FIXED)
			RANGE(a[4], a[2]);
		break;
	case __NR_mprotect:
	case __NR_pkey_mprotect:
		event = KVMFS_MMU_EVENT_PROTECTION_VMA;
		cause = KVMFS_CAUSE_MPROTECT;
		RANGE(a[0], a[1]);
		break;
	default:                                /* madvise */
		event = KVMFS_MMU_EVENT_CLEAR;
		clear = 1;
		cause = kvmfs_madvise_cause((int)a[2]);
		if (cause)
			RANGE(a[0], a[1]);
	}
#undef RANGE
	for (i = 0; i < n && !registered(0, rg[i].start, rg[i].end); i++)
		;
	if (i == n) {
		reply_continue(req->id);        /* the common case: not guest memory */
		return;
	}
	tgid = tgid_of(req->pid);
	for (i = 0; i < n && !registered(tgid, rg[i].start, rg[i].end); i++)
		;
	if (tgid < 0 || i == n) {
		reply_continue(req->id);
		return;
	}
	if (!id_valid(req->id))
		return;
	sys = open_acting_for(mnt_kvm, req->pid);
	if (sys < 0) {
		if (!told_open++)
			warn("pid %d: no MMU notifications (%s/kvm: %s)", tgid, mnt, strerror(-sys));
		reply_continue(req->id);
		return;
	}
	for (i = 0; i < n; i++)
		if (mmu_notify_range(sys, KVMFS_NOTIFY_START, event, cause, rg[i].start, rg[i].end) < 0)
			debug("pid %d: KVMFS_MMU_NOTIFY start 0x%llx-0x%llx: %s", tgid,
			      (unsigned long long)rg[i].start, (unsigned long long)rg[i].end, strerror(errno));
	if (clear) {
		if (cause != KVMFS_CAUSE_MADV_REMOVE)
			punch_converted(tgid, rg[0].start, rg[0].end);
	} else {
		int memfd = -1;

		if (req->data.nr == __NR_mmap && convert_ram && (a[3] & MAP_TYPE) == MAP_PRIVATE &&
		    (a[3] & MAP_ANONYMOUS) && !(a[3] & MAP_HUGETLB)) {
			memfd = (int)syscall(SYS_memfd_create, RAM_MEMFD, 1U /* MFD_CLOEXEC */);
			if (memfd >= 0 && ftruncate(memfd, (off_t)(rg[0].end - rg[0].start)) < 0) {
				close(memfd);
				memfd = -1;
			}
		}
		done = call_in_target(req, tgid, memfd, &result);
		if (memfd >= 0)
			close(memfd);
		if (done == 0 && !told_trace++)
			warn("pid %d: cannot trace it: memory calls on guest RAM are reported before "
			     "they happen, not around them", tgid);
	}
	for (i = 0; i < n; i++)
		mmu_notify_range(sys, KVMFS_NOTIFY_END, event, cause, rg[i].start, rg[i].end);
	close(sys);
	debug("tid %d: %s 0x%llx-0x%llx of guest RAM: %s", req->pid,
	      req->data.nr == __NR_munmap ? "munmap" : req->data.nr == __NR_mmap ? "mmap(MAP_FIXED)" :
	      req->data.nr == __NR_mremap ? "mremap" : req->data.nr == __NR_madvise ? "madvise" : "mprotect",
	      (unsigned long long)rg[0].start, (unsigned long long)rg[0].end,
	      done == 1 ? "made by us between START and END" : done < 0 ? "interrupted" :
	      "START and END, then CONTINUE");
	if (done == 0)
		reply_continue(req->id);
	if (done == 1 && verbose)
		debug("tid %d: result %ld", req->pid, result);
}

/* --- one notification --------------------------------------------------------------- */
static void handle(struct seccomp_notif *req)
{
	unsigned int cmd, i;

	switch (req->data.nr) {
	case __NR_open:
	case __NR_openat:
	case __NR_openat2:
		handle_open(req);
		return;
	case __NR_munmap:
	case __NR_mremap:
	case __NR_mmap:
	case __NR_mprotect:
	case __NR_pkey_mprotect:
	case __NR_madvise:
		handle_mm(req);
		return;
	case __NR_ioctl:
		cmd = (unsigned int)req->data.args[1];
		for (i = 0; i < N_FD_IOCTLS; i++)
			if (fd_ioctls[i].child && fd_ioctls[i].cmd == cmd) {
				handle_fd_ioctl(req, &fd_ioctls[i]);
				return;
			}
		for (i = 0; i < N_MEMSLOT_IOCTLS; i++)
			if (memslot_ioctls[i] == cmd) {
				handle_memslot(req);
				return;
			}
		break;
	}
	reply_continue(req->id);            /* not ours (the filter and this table disagree) */
}

/* --- process handling ----------------------------------------------------------------- */
static int send_fd(int sock, int fd)
{
	char c = 0;
	struct iovec iov = { &c, 1 };
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} u;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			    .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *cm = CMSG_FIRSTHDR(&m);

	memset(u.buf, 0, sizeof(u.buf));
	cm->cmsg_level = SOL_SOCKET;
	cm->cmsg_type = SCM_RIGHTS;
	cm->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cm), &fd, sizeof(int));
	while (sendmsg(sock, &m, 0) < 0)
		if (errno != EINTR)
			return -1;
	return 0;
}

static int recv_fd(int sock)
{
	char c;
	struct iovec iov = { &c, 1 };
	union {
		struct cmsghdr h;
		char buf[CMSG_SPACE(sizeof(int))];
	} u;
	struct msghdr m = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf,
			    .msg_controllen = sizeof(u.buf) };
	struct cmsghdr *cm;
	ssize_t n;
	int fd;

	while ((n = recvmsg(sock, &m, MSG_CMSG_CLOEXEC)) < 0)
		if (errno != EINTR)
			return -1;
	cm = CMSG_FIRSTHDR(&m);
	if (n != 1 || !cm || cm->cmsg_type != SCM_RIGHTS || cm->cmsg_len != CMSG_LEN(sizeof(int))) {
		errno = EPROTO;
		return -1;
	}
	memcpy(&fd, CMSG_DATA(cm), sizeof(int));
	return fd;
}

/* The child: filter, listener to the parent, exec.  Never returns. */
static void child(int sock, char **argv, const sigset_t *oldmask, pid_t parent)
{
	struct bpf b;
	struct sock_fprog prog;
	int fd;

	/* Without the supervisor every trapped call would fail with ENOSYS. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() != parent)
		_exit(EXIT_SETUP);
	build_filter(&b);
	prog.len = (unsigned short)b.n;
	prog.filter = b.insn;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		warn("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
		_exit(EXIT_SETUP);
	}
	/* WAIT_KILLABLE_RECV (5.19): once we have the notification, only a fatal
	 * signal takes the thread out of the call, so an open or a KVM_CREATE_VM does
	 * not fail with EINTR where it would not on /dev/kvm.  Nothing trapped is
	 * slow, so holding a signal until the answer costs little. */
	fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
			  SECCOMP_FILTER_FLAG_NEW_LISTENER | SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV, &prog);
	if (fd < 0 && errno == EINVAL)
		fd = (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (fd < 0) {
		warn("seccomp(SECCOMP_FILTER_FLAG_NEW_LISTENER): %s", strerror(errno));
		_exit(EXIT_SETUP);
	}
	if (send_fd(sock, fd) < 0) {
		warn("sending the listener: %s", strerror(errno));
		_exit(EXIT_SETUP);
	}
	close(fd);
	close(sock);
	sigprocmask(SIG_SETMASK, oldmask, NULL);
	execvp(argv[0], argv);               /* its opens are answered by the parent */
	warn("%s: %s", argv[0], strerror(errno));
	_exit(errno == ENOENT ? 127 : 126);
}

/* Signals the supervisor relays to the program.  One sent by the terminal
 * (SI_KERNEL) reached the program's process group already. */
static const int relayed[] = { SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGCONT, SIGWINCH };

/* Reap what the kernel holds for us: our child's end, and threads that exited
 * while we traced them (a traced thread stays a zombie until its tracer waits for
 * it, and keeps its leader from being reaped).  A tracee found stopped is let go.
 * block: until our child is reaped. */
static void reap(int block)
{
	while (!(block && child_reaped)) {
		int st;
		pid_t w = waitpid(-1, &st, __WALL | (block ? 0 : WNOHANG));

		if (w == 0)
			return;
		if (w < 0) {
			if (errno == EINTR)
				continue;
			if (errno == ECHILD)
				child_reaped = 1;       /* nothing left: our child was reaped before */
			return;
		}
		if (WIFSTOPPED(st))
			ptrace(PTRACE_DETACH, w, 0, (st >> 16) == PTRACE_EVENT_STOP ? 0 : WSTOPSIG(st));
		else
			note_exit(w, st);
	}
}

static int supervise(pid_t pid, int sfd)
{
	int hup = 0;
	struct seccomp_notif *req = malloc(sizes.seccomp_notif);

	if (!req) {
		warn("out of memory");
		return EXIT_SETUP;
	}
	while (!(child_reaped && hup)) {
		struct pending *d;
		struct pollfd p[3] = {
			{ .fd = hup ? -1 : listener, .events = POLLIN },
			{ .fd = chld_fd, .events = POLLIN },
			{ .fd = sfd, .events = POLLIN },
		};
		struct signalfd_siginfo si;
		int n;

		while ((d = next_deferred())) {  /* received while a call was injected */
			handle(&d->req);
			free(d);
		}
		n = poll(p, 3, chld_fd < 0 ? 100 : -1);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			warn("poll: %s", strerror(errno));
			break;
		}
		if ((p[2].revents & POLLIN) && read(sfd, &si, sizeof(si)) == sizeof(si) && !child_reaped &&
		    si.ssi_code != SI_KERNEL)
			kill(pid, (int)si.ssi_signo);
		if (chld_fd < 0 || (p[1].revents & POLLIN)) {
			while (chld_fd >= 0 && read(chld_fd, &si, sizeof(si)) == sizeof(si))
				;
			reap(0);
		}
		if (p[0].revents & POLLIN) {
			memset(req, 0, sizes.seccomp_notif);
			if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, req) == 0)
				handle(req);
			else if (errno != EINTR && errno != ENOENT)
				warn("SECCOMP_IOCTL_NOTIF_RECV: %s", strerror(errno));
		} else if (p[0].revents & (POLLHUP | POLLERR)) {
			hup = 1;                /* no process uses the filter any more */
			reap(1);
		}
	}
	free(req);
	if (WIFSIGNALED(child_status))
		return 128 + WTERMSIG(child_status);
	return WEXITSTATUS(child_status);
}

static void usage(void)
{
	fprintf(stderr, "usage: " PROG " --mount MNT [--dev PATH]... [--no-convert] [--no-mmu-notify] [-v]\n"
		"       -- PROGRAM [ARGS...]\n"
		"Runs PROGRAM with /dev/kvm (and each --dev PATH) opening MNT/kvm, a kvmfs mount.\n");
	exit(EXIT_SETUP);
}

static void add_dev(const char *path)
{
	char *p;

	if (n_devs >= MAX_DEVS || path[0] != '/') {
		warn("--dev %s: %s", path, path[0] != '/' ? "not an absolute path" : "too many");
		exit(EXIT_SETUP);
	}
	p = malloc(strlen(path) + 2);
	if (!p) {
		warn("out of memory");
		exit(EXIT_SETUP);
	}
	strcpy(p, path);
	normalise(p);
	devs[n_devs++] = p;
}

int main(int argc, char **argv)
{
	const char *mount = NULL;
	struct stat st;
	sigset_t relay, chld, blocked, old;
	int i, sv[2], sfd;
	size_t j;
	pid_t pid, parent;

	for (i = 1; i < argc; i++) {
		if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		} else if (strcmp(argv[i], "--mount") == 0 && i + 1 < argc) {
			mount = argv[++i];
		} else if (strncmp(argv[i], "--mount=", 8) == 0) {
			mount = argv[i] + 8;
		} else if (strcmp(argv[i], "--dev") == 0 && i + 1 < argc) {
			add_dev(argv[++i]);
		} else if (strncmp(argv[i], "--dev=", 6) == 0) {
			add_dev(argv[i] + 6);
		} else if (strcmp(argv[i], "--no-convert") == 0) {
			convert_ram = 0;
		} else if (strcmp(argv[i], "--no-mmu-notify") == 0) {
			mmu_notify = 0;
		} else if (strcmp(argv[i], "-v") == 0 || strcmp(argv[i], "--verbose") == 0) {
			verbose = 1;
		} else if (argv[i][0] == '-') {
			usage();
		} else {
			break;
		}
	}
	if (!mount || i >= argc)
		usage();
	add_dev("/dev/kvm");
	if (!realpath(mount, mnt)) {
		warn("--mount %s: %s", mount, strerror(errno));
		return EXIT_SETUP;
	}
	snprintf(mnt_kvm, sizeof(mnt_kvm), "%s/kvm", mnt);
	if (stat(mnt_kvm, &st) < 0) {
		warn("--mount %s: %s: %s", mount, mnt_kvm, strerror(errno));
		return EXIT_SETUP;
	}
	if (!is_kvmfs_dev(st.st_dev)) {
		warn("--mount %s: not a kvmfs mount (no fuse.kvmfs file system there)", mount);
		return EXIT_SETUP;
	}
	if (syscall(SYS_seccomp, SECCOMP_GET_NOTIF_SIZES, 0, &sizes) < 0) {
		warn("seccomp(SECCOMP_GET_NOTIF_SIZES): %s", strerror(errno));
		return EXIT_SETUP;
	}
	if (sizes.seccomp_notif < sizeof(struct seccomp_notif))
		sizes.seccomp_notif = sizeof(struct seccomp_notif);
	if (sizes.seccomp_notif_resp < sizeof(struct seccomp_notif_resp))
		sizes.seccomp_notif_resp = sizeof(struct seccomp_notif_resp);
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
		warn("socketpair: %s", strerror(errno));
		return EXIT_SETUP;
	}
	/* Relayed signals and SIGCHLD (tracee stops, our child's end) are read from
	 * signalfds; the child gets the old mask back before its exec. */
	sigemptyset(&relay);
	for (j = 0; j < sizeof(relayed) / sizeof(relayed[0]); j++)
		sigaddset(&relay, relayed[j]);
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	blocked = relay;
	sigaddset(&blocked, SIGCHLD);
	sigprocmask(SIG_BLOCK, &blocked, &old);
	parent = getpid();
	pid = fork();
	if (pid < 0) {
		warn("fork: %s", strerror(errno));
		return EXIT_SETUP;
	}
	if (pid == 0) {
		close(sv[0]);
		child(sv[1], argv + i, &old, parent);
	}
	child_pid = pid;
	close(sv[1]);
	signal(SIGPIPE, SIG_IGN);            /* stderr gone: the supervisor keeps going */
	sfd = signalfd(-1, &relay, SFD_CLOEXEC);
	chld_fd = signalfd(-1, &chld, SFD_CLOEXEC | SFD_NONBLOCK);
	listener = recv_fd(sv[0]);
	close(sv[0]);
	if (listener < 0) {
		/* the child said why */
		int status;

		waitpid(pid, &status, 0);
		return WIFEXITED(status) && WEXITSTATUS(status) ? WEXITSTATUS(status) : EXIT_SETUP;
	}
	return supervise(pid, sfd);
}
