/*
 * kvmfs-seccomp - run an unmodified KVM program on a kvmfs mount.
 *
 *   kvmfs-seccomp --mount MNT [--dev PATH]... [-v] -- PROGRAM [ARGS...]
 *
 * A seccomp user-notification supervisor.  It forks; the child sets
 * PR_SET_NO_NEW_PRIVS, installs the filter below with
 * SECCOMP_FILTER_FLAG_NEW_LISTENER, hands the listener fd to the parent over a
 * socketpair and execs PROGRAM.  The parent answers the notifications until
 * PROGRAM and every process it started (they inherit the filter) are gone, then
 * exits with PROGRAM's status (128+N if a signal N killed it).  It works for
 * statically linked programs (Firecracker is static musl, Go binaries), where
 * an LD_PRELOAD shim cannot.
 *
 * What this file owns: the filter, the translation of the few calls where kvmfs
 * differs from /dev/kvm, and the supervisor's process handling (fork, exec,
 * signals it relays, exit status).  The daemon owns everything else: every
 * other ioctl, mmap of the vCPU fd and KVM_RUN go straight from the program to
 * the mount, at full speed and with native signal semantics.
 *
 * Trapped (everything else is SECCOMP_RET_ALLOW; other architectures, i.e.
 * int 0x80 calls, are killed; x32 numbers are allowed):
 *
 *   open, openat, openat2
 *       To redirect /dev/kvm.  The path is read from the target and resolved
 *       (absolute, relative to its cwd or dirfd, lexically normalised).  If it
 *       names /dev/kvm or a --dev path, or the file the target would see
 *       (/proc/TID/root + path) is a character device 10:232, the supervisor
 *       opens MNT/kvm itself and installs it as the call's result
 *       (SECCOMP_IOCTL_NOTIF_ADDFD with SECCOMP_ADDFD_FLAG_SEND), so the kernel
 *       never re-reads the path.  Every other path is CONTINUEd: the kernel then
 *       re-reads it, so another thread of the target can change it in between.
 *       That is fine because the redirect is a convenience, not a security
 *       boundary: the program can reach the real /dev/kvm by other means
 *       (io_uring, a path rewritten after the check, an fd it inherited).
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
 *       CONTINUE for now: the daemon maps shared memory (memfd, tmpfs, files)
 *       itself and answers EFAULT at the first guest access to private
 *       anonymous memory.  (Converting such memory in place is phase 2.)
 *
 * What it cannot do:
 *   - io_uring opens (IORING_OP_OPENAT) are not seen; nor are paths reached
 *     through a symlink the lexical normalisation gets wrong when no file 10:232
 *     is behind them (e.g. /dev/kvm missing and "/x/link/../kvm").
 *   - A target that serves a FUSE file system from the thread that opens a
 *     file on it would deadlock the char-device check (the stat waits for that
 *     thread); VMMs do not do that.
 *   - KVM_GET_STATS_FD and KVM_CREATE_DEVICE are not served by the daemon yet:
 *     their rows exist but are not trapped (the daemon answers them itself).
 *   - A kvmfs-aware program (clients/kvmfs.h with KVMFS_MNT) must not run under
 *     it: its KVM_CREATE_VM would get an fd, not the id it expects.
 *   - One notification is handled at a time; nothing trapped is slow.
 *
 * Kernel: 5.14 (SECCOMP_ADDFD_FLAG_SEND); pidfd_getfd needs 5.6 and ptrace
 * access to the target (root, or the same user without Yama restrictions);
 * PIDFD_THREAD (6.9) is used when present, else the thread's process.
 * The supervisor needs no syscall inside the target: a program that installs
 * its own seccomp filters later (Firecracker) still works, because a stacked
 * filter's ALLOW does not override this one's USER_NOTIF.
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
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/audit.h>
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
	  offsetof(struct kvm_create_device, fd), O_CLOEXEC },
};
#define N_FD_IOCTLS (sizeof(fd_ioctls) / sizeof(fd_ioctls[0]))

/* The memslot ioctls: trapped for the conversion of private anonymous memory. */
static const unsigned int memslot_ioctls[] = { KVM_SET_USER_MEMORY_REGION, KVM_SET_USER_MEMORY_REGION2 };
#define N_MEMSLOT_IOCTLS (sizeof(memslot_ioctls) / sizeof(memslot_ioctls[0]))

/* --- options and state ------------------------------------------------------------ */
#define MAX_DEVS 16
static char mnt[PATH_MAX];           /* the mount, absolute */
static char mnt_kvm[PATH_MAX + 8];   /* MNT/kvm */
static char *devs[MAX_DEVS + 1];     /* target-view paths that mean /dev/kvm, normalised */
static int n_devs;
static int verbose;
static int listener = -1;
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
struct bpf {
	struct sock_filter insn[MAX_FILTER];
	unsigned int n;
	unsigned int to_notify[MAX_FILTER];  /* jumps to patch: insn index */
	unsigned int n_notify;
};

static void emit(struct bpf *b, struct sock_filter f)
{
	if (b->n >= MAX_FILTER) {
		warn("internal error: filter too long");
		exit(EXIT_SETUP);
	}
	b->insn[b->n++] = f;
}

/* if A == k: goto NOTIFY (patched once the program's end is known) */
static void jeq_notify(struct bpf *b, unsigned int k)
{
	b->to_notify[b->n_notify++] = b->n;
	emit(b, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, k, 0, 0));
}

static void build_filter(struct bpf *b)
{
	unsigned int i, ioctl_jump, allow, notify;

	memset(b, 0, sizeof(*b));
	emit(b, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
	emit(b, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
	emit(b, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
	emit(b, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)));
	jeq_notify(b, __NR_openat);
	jeq_notify(b, __NR_open);
	jeq_notify(b, __NR_openat2);
	ioctl_jump = b->n;                        /* if nr != ioctl: goto ALLOW */
	emit(b, (struct sock_filter)BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 0));
	/* cmd is an unsigned int: the low word of args[1] (little endian) */
	emit(b, (struct sock_filter)BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[1])));
	for (i = 0; i < N_FD_IOCTLS; i++)
		if (fd_ioctls[i].child)
			jeq_notify(b, fd_ioctls[i].cmd);
	for (i = 0; i < N_MEMSLOT_IOCTLS; i++)
		jeq_notify(b, memslot_ioctls[i]);
	allow = b->n;
	emit(b, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
	notify = b->n;
	emit(b, (struct sock_filter)BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF));
	b->insn[ioctl_jump].jf = allow - ioctl_jump - 1;
	for (i = 0; i < b->n_notify; i++)
		b->insn[b->to_notify[i]].jt = notify - b->to_notify[i] - 1;
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

/* Does the open name /dev/kvm?  By name (the defaults and --dev), or by the file
 * the target would open being the KVM device node (the jailer's mknod, a symlink). */
static int names_kvm(pid_t tid, const char *path, int flags)
{
	char proc[PATH_MAX + 32];
	struct stat st;
	int i;

	for (i = 0; i < n_devs; i++)
		if (strcmp(path, devs[i]) == 0)
			return 1;
	snprintf(proc, sizeof(proc), "/proc/%d/root%s", tid, path);
	if (fstatat(AT_FDCWD, proc, &st, (flags & O_NOFOLLOW) ? AT_SYMLINK_NOFOLLOW : 0) < 0)
		return 0;
	return S_ISCHR(st.st_mode) && major(st.st_rdev) == 10 && minor(st.st_rdev) == KVM_MISC_MINOR;
}

/* --- open, openat, openat2 -------------------------------------------------------- */
static void handle_open(struct seccomp_notif *req)
{
	pid_t tid = req->pid;
	const __u64 *a = req->data.args;
	char path[PATH_MAX], abs[PATH_MAX];
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
	    target_path(tid, dirfd, path, abs, sizeof(abs)) < 0 || !names_kvm(tid, abs, (int)flags)) {
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
	int r, own = -1, fd = -1, id;

	r = kvmfs_file_of(tid, (int)req->data.args[0], file, sizeof(file));
	if (r <= 0) {
		/* not kvmfs (0), a bad fd (EBADF): KVM or the kernel answers; gone: nothing to do */
		if (r != -ESRCH)
			reply_continue(req->id);
		if (r < 0 && r != -EBADF && r != -ESRCH)
			debug("tid %d: %s: the fd cannot be examined (%s): left to the kernel",
			      tid, row->name, strerror(-r));
		return;
	}
	if (row->argsz && (r = read_mem(tid, arg, buf, row->argsz)) < 0) {
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
	if (row->argsz && (_IOC_DIR(row->cmd) & _IOC_READ) && (r = write_mem(tid, arg, buf, row->argsz)) < 0)
		goto fail;
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
		if (r < 0)
			goto fail;
		target_fd = (__u32)r;
		memcpy(buf + row->fd_at, &target_fd, sizeof(target_fd));
		r = write_mem(tid, arg, buf, row->argsz);
		if (r < 0)              /* the fd stays in the target, as KVM would leave it */
			goto fail;
		reply(req->id, 0, 0, 0);
	}
	close(own);
	close(fd);
	return;
fail:
	debug("tid %d: %s: %s", tid, row->name, strerror(-r));
	close_keep_errno(own);
	close_keep_errno(fd);
	if (r != -ENOENT && r != -ESRCH)
		reply_error(req->id, -r);
}

/* --- memslots ----------------------------------------------------------------------- */
static void handle_memslot(struct seccomp_notif *req)
{
	reply_continue(req->id);
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
static void child(int sock, char **argv, const sigset_t *oldmask)
{
	struct bpf b;
	struct sock_fprog prog;
	int fd;

	/* Without the supervisor every trapped call would fail with ENOSYS. */
	prctl(PR_SET_PDEATHSIG, SIGKILL);
	if (getppid() == 1)
		_exit(EXIT_SETUP);
	build_filter(&b);
	prog.len = (unsigned short)b.n;
	prog.filter = b.insn;
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
		warn("PR_SET_NO_NEW_PRIVS: %s", strerror(errno));
		_exit(EXIT_SETUP);
	}
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

static int supervise(pid_t pid, int sfd)
{
	int status = 0, reaped = 0, hup = 0, pidfd;
	struct seccomp_notif *req = malloc(sizes.seccomp_notif);

	if (!req) {
		warn("out of memory");
		return EXIT_SETUP;
	}
	pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	while (!(reaped && hup)) {
		struct pollfd p[3] = {
			{ .fd = hup ? -1 : listener, .events = POLLIN },
			{ .fd = reaped ? -1 : pidfd, .events = POLLIN },
			{ .fd = sfd, .events = POLLIN },
		};
		int n = poll(p, 3, pidfd < 0 && !reaped ? 100 : -1);

		if (n < 0) {
			if (errno == EINTR)
				continue;
			warn("poll: %s", strerror(errno));
			break;
		}
		if (p[2].revents & POLLIN) {
			struct signalfd_siginfo si;

			if (read(sfd, &si, sizeof(si)) == sizeof(si) && !reaped &&
			    si.ssi_code != SI_KERNEL)
				kill(pid, (int)si.ssi_signo);
		}
		if (!reaped && (pidfd < 0 || (p[1].revents & POLLIN))) {
			pid_t w = waitpid(pid, &status, WNOHANG);

			if (w == pid || (w < 0 && errno == ECHILD))
				reaped = 1;
		}
		if (p[0].revents & POLLIN) {
			memset(req, 0, sizes.seccomp_notif);
			if (ioctl(listener, SECCOMP_IOCTL_NOTIF_RECV, req) == 0)
				handle(req);
			else if (errno != EINTR && errno != ENOENT)
				warn("SECCOMP_IOCTL_NOTIF_RECV: %s", strerror(errno));
		} else if (p[0].revents & (POLLHUP | POLLERR)) {
			hup = 1;                /* no process uses the filter any more */
			if (!reaped && waitpid(pid, &status, 0) == pid)
				reaped = 1;
			reaped = 1;
		}
	}
	free(req);
	if (pidfd >= 0)
		close(pidfd);
	if (WIFSIGNALED(status))
		return 128 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

static void usage(void)
{
	fprintf(stderr, "usage: " PROG " --mount MNT [--dev PATH]... [-v] -- PROGRAM [ARGS...]\n"
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
	sigset_t set, old;
	int i, sv[2], sfd;
	size_t j;
	pid_t pid;

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
	sigemptyset(&set);
	for (j = 0; j < sizeof(relayed) / sizeof(relayed[0]); j++)
		sigaddset(&set, relayed[j]);
	sigprocmask(SIG_BLOCK, &set, &old);
	pid = fork();
	if (pid < 0) {
		warn("fork: %s", strerror(errno));
		return EXIT_SETUP;
	}
	if (pid == 0) {
		close(sv[0]);
		child(sv[1], argv + i, &old);
	}
	close(sv[1]);
	sfd = signalfd(-1, &set, SFD_CLOEXEC);
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
