/*
 * preload.c - libkvmfs-preload.so: runs an unmodified, dynamically linked KVM
 * program (QEMU, kvmtool, a sample written against <linux/kvm.h>) on a kvmfs
 * mount, through LD_PRELOAD.
 *
 *   KVMFS_MOUNT=/path/to/mnt LD_PRELOAD=build/launch/libkvmfs-preload.so prog ...
 *
 * Environment, read once when the library initialises:
 *   KVMFS_MOUNT          the kvmfs mount.  Unset or empty: the library does nothing
 *                        at all, every call goes straight to the system.
 *   KVMFS_DEVICES        more paths that stand for /dev/kvm, colon-separated.
 *   KVMFS_PRELOAD_DEBUG  "1": one line per decision on stderr.  Nothing is ever
 *                        written to stdout, nor to stderr without it.
 *
 * What it owns:
 *  - Opening the device.  open/open64/openat/openat64, their _FORTIFY_SOURCE
 *    forms (__open_2 ...) and fopen/fopen64 of a path that names /dev/kvm (or an
 *    entry of KVMFS_DEVICES) open $KVMFS_MOUNT/kvm with the caller's flags.  The
 *    path is normalised lexically ("//dev/./kvm", "../dev/kvm" from /tmp, a
 *    dirfd of /dev); symlinks are not followed.  Everything else goes to the next
 *    definition (dlsym(RTLD_NEXT)).
 *  - The fds KVM hands out of an ioctl.  kvmfs answers KVM_CREATE_VM with a VM
 *    id N, KVM_CREATE_VCPU with K, KVM_CREATE_GUEST_MEMFD with G; the library
 *    opens the file that is that fd (MNT/vmN/ctl, MNT/vmN/vcpuK, MNT/vmN/gmemG)
 *    and returns it, as KVM would.  One table (CHILD_ROWS) says, per ioctl, on
 *    which file kind it is issued, the child's path and its open flags.  Whether
 *    an fd is a kvmfs file is decided from the file itself (its st_dev is a
 *    fuse.kvmfs mount in /proc/self/mountinfo, cached per device), never from
 *    fd numbers, so dup, fork and fds from elsewhere behave; a real /dev/kvm fd
 *    gets the real ioctl, untouched.  Every other ioctl is one switch and the raw
 *    system call.
 *  - Guest memory the daemon can share.  KVM_SET_USER_MEMORY_REGION(2) on a kvmfs
 *    VM file first converts the private parts of [userspace_addr, +memory_size)
 *    (private anonymous memory, [heap], MAP_PRIVATE file mappings) in place into
 *    memfd MAP_SHARED memory: same address, contents, protection and madvise
 *    state (DONTFORK, DONTDUMP, [NO]HUGEPAGE, mlock).  Only pages present or
 *    swapped are copied (one pagemap read per 512 MiB, one pwrite per run of
 *    pages).  Parts that cannot be converted (PROT_NONE, hugetlb, sealed,
 *    userfaultfd-registered, VM_IO/PFNMAP, [stack]/[vdso]; memfd_create failing)
 *    are left as they are: the ioctl goes on, and the daemon answers EFAULT at
 *    the guest's first access with a log line.
 *  - MMU notifications.  The library keeps the hva ranges of successful memslots
 *    on kvmfs VM files (keyed by the VM file's st_dev/st_ino and the slot id) and
 *    brackets each munmap, mremap, mmap(MAP_FIXED), mprotect, madvise(DONTNEED,
 *    DONTNEED_LOCKED, REMOVE, FREE) and fallocate(PUNCH_HOLE) that touches them
 *    with KVMFS_MMU_NOTIFY START/END on a private fd of $KVMFS_MOUNT/kvm (a
 *    system file: it holds no VM).  If the daemon answers ENOTTY it is not asked
 *    again.  Fix-ups so the guest sees what a KVM guest would: madvise(DONTNEED,
 *    FREE) of memory this library converted (MAP_SHARED now, where DONTNEED
 *    would not zero) is done as MADV_REMOVE; new private memory mapped over a
 *    registered range (mmap, mremap) is converted before the call returns; the
 *    part an mremap grows converted memory by is fresh zeroed memory, as it
 *    would have been.  MADV_REMOVE is used only where /proc/self/maps still shows
 *    the library's own memfd ("/memfd:kvmfs-converted-memory"): memory unmapped
 *    behind its back is not punched.
 *
 * What it cannot do:
 *  - statically linked programs (Firecracker, Go), raw syscall(2), inline system
 *    calls, io_uring and libc-internal calls (brk, and mmap/munmap by malloc and
 *    free, for instance) are not seen: use the seccomp launcher for those; nor are
 *    ftruncate shrinking a file that backs guest memory, and shmat/shmdt;
 *  - memory mapped over a registered range by a call not interposed here, or
 *    by another thread between the conversion's copy and its mmap, stays as it
 *    is (the conversion is not atomic against concurrent writers of the range);
 *  - converted memory is MAP_SHARED: a child forked while it is mapped (and not
 *    MADV_DONTFORK, which QEMU sets on guest RAM) shares it with its parent
 *    instead of getting a copy-on-write copy; NUMA policy (mbind) and KSM
 *    (MADV_MERGEABLE) of the old mapping are not carried over; while a part is
 *    copied it exists twice;
 *  - a MAP_PRIVATE file mapping is converted as it reads at that moment; pages
 *    past the file's end read as zeros afterwards instead of SIGBUS;
 *  - memslots stay in the table until deleted (memory_size 0), also after their
 *    VM is gone (the library does not interpose close); the tables have fixed
 *    sizes (MAX_REG, MAX_CONV: beyond them ranges are not tracked, logged);
 *  - the device cache keys on st_dev: a kvmfs device number reused by another
 *    FUSE file system after an unmount is not noticed;
 *  - notifications go to the daemon of $KVMFS_MOUNT, not to another kvmfs mount
 *    the program opened by its own path;
 *  - a signal handler that calls munmap/mmap while its thread is inside this
 *    library can deadlock on g_tab.
 *
 * Locks (never held across a call into the program, nor across an ioctl to the
 * daemon):
 *  - g_slow (mutex): the parse buffer, the device cache and conversions;
 *  - g_tab (rwlock): the memslot and converted-range tables and their hull;
 *    read in the mm interposers, written on changes;
 *  - g_nfd_lock (mutex): the private notification fd (held while it is opened,
 *    a FUSE open); taken alone.
 *  Order: g_slow before g_tab.  pthread_atfork takes all three around fork and
 *  gives the child fresh ones; the child keeps the tables.  Nothing allocates
 *  on the paths of ordinary calls; the hot paths are a flag, a switch and (mm
 *  calls) two relaxed loads of the hull of the tracked ranges.
 */
#undef _FORTIFY_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "kvmfs.h"

#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
#ifndef MREMAP_DONTUNMAP
#define MREMAP_DONTUNMAP 4
#endif
#ifndef MFD_CLOEXEC
#define MFD_CLOEXEC 1U
#endif
#ifndef MLOCK_ONFAULT
#define MLOCK_ONFAULT 1
#endif

#define EXPORT __attribute__((visibility("default")))
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define TLS __thread __attribute__((tls_model("initial-exec")))

/* --- fds that ioctls create: one row each ------------------------------------------
 * X(request, file kinds it is issued on, child path, open flags, where the id is)
 * The path: %D the directory of the file the ioctl was issued on, %B its name,
 * %N the id the daemon answered.  ID_RETURN: the ioctl's return value is the id
 * and the library returns the fd; otherwise the byte offset of a __u32 in the
 * ioctl's struct that holds the id and gets the fd (KVM_CREATE_DEVICE's .fd).
 * Not implemented by the daemon yet, to be added here when it is:
 *   X(KVM_GET_STATS_FD,  ON_VM | ON_VCPU, ..., O_RDONLY | O_CLOEXEC, ID_RETURN)
 *   X(KVM_CREATE_DEVICE, ON_VM, ..., O_RDWR | O_CLOEXEC, offsetof(struct kvm_create_device, fd))
 */
#define ON_SYSTEM 1
#define ON_VM 2
#define ON_VCPU 4
#define ID_RETURN (-1)
#define CHILD_ROWS(X)                                                                      \
	X(KVM_CREATE_VM, ON_SYSTEM, "%D/vm%N/ctl", O_RDWR | O_CLOEXEC, ID_RETURN)          \
	X(KVM_CREATE_VCPU, ON_VM, "%D/vcpu%N", O_RDWR | O_CLOEXEC, ID_RETURN)              \
	X(KVM_CREATE_GUEST_MEMFD, ON_VM, "%D/gmem%N", O_RDWR, ID_RETURN)

struct child_row {
	unsigned int request;
	int on;
	const char *path;
	int flags;
	int id_at;
};

#define CHILD_ROW(req, on, path, flags, id_at) {(unsigned int)(req), on, path, flags, id_at},
static const struct child_row g_child[] = {CHILD_ROWS(CHILD_ROW)};
#define CHILD_CASE(req, on, path, flags, id_at) case (unsigned int)(req):

/* --- configuration (set once by init) ---------------------------------------------- */
#define MAX_DEVICES 8
static int g_inited;            /* init has run (atomic) */
static int g_active;            /* KVMFS_MOUNT is set: translate (atomic) */
static int g_debug;
static uint64_t g_page = 4096;
static char g_sys[PATH_MAX];    /* $KVMFS_MOUNT/kvm, normalised */
static char g_device[MAX_DEVICES][PATH_MAX];   /* /dev/kvm and KVMFS_DEVICES, normalised */
static const char *g_device_name[MAX_DEVICES]; /* their last components */
static int g_ndevice;
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static TLS int t_in_init, t_in_dlsym;

/* --- state ---------------------------------------------------------------------------- */
static pthread_mutex_t g_slow = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t g_tab = PTHREAD_RWLOCK_INITIALIZER;
static pthread_mutex_t g_nfd_lock = PTHREAD_MUTEX_INITIALIZER;

struct range {
	uint64_t start, end;
};

/* A memslot on a kvmfs VM file, and memory this library converted (g_tab). */
#define MAX_REG 1024
#define MAX_CONV 1024
struct reg {
	dev_t dev;
	ino_t ino;
	uint32_t slot;
	uint64_t start, end;
};
static struct reg g_reg[MAX_REG];
static int g_nreg;
static struct range g_conv[MAX_CONV];
static int g_nconv;
static uint64_t g_lo = UINT64_MAX, g_hi;   /* hull of both tables: atomic, relaxed */

/* Devices known to be kvmfs mounts or not (g_slow). */
#define MAX_DEVC 64
static struct {
	dev_t dev;
	int kvmfs;
} g_devc[MAX_DEVC];
static int g_ndevc, g_devc_next;

static char g_buf[1 << 16];     /* /proc line reader (g_slow) */

/* The private system fd that carries KVMFS_MMU_NOTIFY (g_nfd_lock). */
static int g_nfd = -1;
static char g_nfd_link[PATH_MAX];
static int g_notify_off;        /* the daemon answered ENOTTY (atomic) */

/* --- small helpers ---------------------------------------------------------------------- */
__attribute__((format(printf, 1, 2))) static void dbg(const char *fmt, ...)
{
	char buf[768];
	va_list ap;
	int n, m, saved;

	if (!g_debug)
		return;
	saved = errno;
	n = snprintf(buf, sizeof(buf), "kvmfs-preload[%d]: ", (int)getpid());
	va_start(ap, fmt);
	m = vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
	va_end(ap);
	n = m < 0 ? n : (n + m > (int)sizeof(buf) - 2 ? (int)sizeof(buf) - 2 : n + m);
	buf[n++] = '\n';
	syscall(SYS_write, 2, buf, (size_t)n);
	errno = saved;
}

static inline int active(void)
{
	return __atomic_load_n(&g_active, __ATOMIC_ACQUIRE);
}

static int sys_open(const char *path, int flags)
{
	return (int)syscall(SYS_openat, AT_FDCWD, path, flags, 0);
}

static void sys_close(int fd)
{
	int saved = errno;

	syscall(SYS_close, fd);
	errno = saved;
}

static inline void *sys_mmap(uint64_t addr, uint64_t len, int prot, int flags, int fd, off_t off)
{
	return (void *)syscall(SYS_mmap, addr, len, prot, flags, fd, off);
}

/* ioctl(2) itself, for the untranslated requests: inline on x86-64 (a call of
 * libc's syscall() costs about as much as the rest of the wrapper). */
static inline long sys_ioctl(int fd, unsigned long request, void *arg)
{
#if defined(__x86_64__)
	long r;

	__asm__ volatile("syscall"
			 : "=a"(r)
			 : "0"((long)SYS_ioctl), "D"((long)fd), "S"(request), "d"(arg)
			 : "rcx", "r11", "memory");
	if (UNLIKELY((unsigned long)r > -4096UL)) {
		errno = (int)-r;
		return -1;
	}
	return r;
#else
	return syscall(SYS_ioctl, fd, request, arg);
#endif
}

static inline long sys_madvise(uint64_t addr, uint64_t len, int advice)
{
	return syscall(SYS_madvise, addr, len, advice);
}

/* The page-rounded range of [addr, addr+len); 0 if it is empty or wraps. */
static inline int page_range(uint64_t addr, uint64_t len, uint64_t *lo, uint64_t *hi)
{
	uint64_t end = addr + len;

	if (!len || end < addr)
		return 0;
	*lo = addr & ~(g_page - 1);
	*hi = end > UINT64_MAX - (g_page - 1) ? UINT64_MAX & ~(g_page - 1) : (end + g_page - 1) & ~(g_page - 1);
	return *lo < *hi;
}

/* Might [lo, hi) touch a tracked range?  Lock-free; a superset answer is fine. */
static inline int near(uint64_t lo, uint64_t hi)
{
	return lo < __atomic_load_n(&g_hi, __ATOMIC_RELAXED) && hi > __atomic_load_n(&g_lo, __ATOMIC_RELAXED);
}

static int fd_path(int fd, char *buf, size_t size)
{
	char link[40];
	ssize_t n;

	snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
	n = readlink(link, buf, size - 1);
	if (n < 0 || (size_t)n >= size - 1)
		return -1;
	buf[n] = '\0';
	return 0;
}

static const char *last_name(const char *path)
{
	const char *slash = strrchr(path, '/');

	return slash ? slash + 1 : path;
}

static int digits(const char *s)
{
	if (!*s)
		return 0;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return 0;
	return 1;
}

/* Which kind of kvmfs file a path names: ON_SYSTEM, ON_VM, ON_VCPU or 0. */
static int kind_of(const char *path)
{
	const char *name = last_name(path);

	if (!strcmp(name, "kvm"))
		return ON_SYSTEM;
	if (!strcmp(name, "ctl"))
		return ON_VM;
	if (!strncmp(name, "vcpu", 4) && digits(name + 4))
		return ON_VCPU;
	return 0;
}

/* Normalises an absolute path lexically in place: no "//", ".", ".." or trailing '/'. */
static void normalise(char *p)
{
	const char *in = p, *c;
	size_t o = 0, n;

	while (*in) {
		while (*in == '/')
			in++;
		if (!*in)
			break;
		for (c = in; *in && *in != '/'; in++)
			;
		n = (size_t)(in - c);
		if (n == 1 && c[0] == '.')
			continue;
		if (n == 2 && c[0] == '.' && c[1] == '.') {
			while (o > 0 && p[--o] != '/')
				;
			continue;
		}
		p[o++] = '/';
		memmove(p + o, c, n);
		o += n;
	}
	if (!o)
		p[o++] = '/';
	p[o] = '\0';
}

/* base/rel (rel relative, base absolute; rel absolute: rel), normalised, into out. */
static int join(char *out, size_t size, const char *base, const char *rel)
{
	int n = rel[0] == '/' ? snprintf(out, size, "%s", rel) : snprintf(out, size, "%s/%s", base, rel);

	if (n < 0 || (size_t)n >= size)
		return -1;
	normalise(out);
	return 0;
}

/* Reads a /proc file line by line (g_slow held); fn returns nonzero to stop.
 * Lines longer than the buffer are skipped. */
typedef int (*line_fn)(char *line, void *ctx);
static int each_line(const char *path, line_fn fn, void *ctx)
{
	size_t len = 0;
	int fd, skip = 0;
	ssize_t n;
	char *p, *end, *nl;

	fd = sys_open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	for (;;) {
		n = read(fd, g_buf + len, sizeof(g_buf) - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0 && len && !skip) {
				g_buf[len] = '\0';
				fn(g_buf, ctx);
			}
			break;
		}
		len += (size_t)n;
		p = g_buf;
		end = g_buf + len;
		while ((nl = memchr(p, '\n', (size_t)(end - p)))) {
			*nl = '\0';
			if (!skip && fn(p, ctx))
				goto out;
			skip = 0;
			p = nl + 1;
		}
		len = (size_t)(end - p);
		if (len == sizeof(g_buf) - 1) {
			skip = 1;
			len = 0;
		} else {
			memmove(g_buf, p, len);
		}
	}
out:
	sys_close(fd);
	return 0;
}

static const char *parse_num(const char *s, int base, uint64_t *v)
{
	uint64_t x = 0;
	const char *start = s;
	int d;

	for (;; s++) {
		if (*s >= '0' && *s <= '9')
			d = *s - '0';
		else if (base == 16 && *s >= 'a' && *s <= 'f')
			d = *s - 'a' + 10;
		else if (base == 16 && *s >= 'A' && *s <= 'F')
			d = *s - 'A' + 10;
		else
			break;
		x = x * (uint64_t)base + (uint64_t)d;
	}
	*v = x;
	return s == start ? NULL : s;
}

/* One line of /proc/self/maps (or a header line of smaps). */
struct vma {
	uint64_t start, end, off, ino;
	unsigned maj, min;
	char perms[5];
	const char *path;
};

static int parse_vma(const char *s, struct vma *v)
{
	uint64_t maj, min;

	if (!(s = parse_num(s, 16, &v->start)) || *s++ != '-' || !(s = parse_num(s, 16, &v->end)) ||
	    *s++ != ' ')
		return -1;
	if (strlen(s) < 5 || s[4] != ' ')
		return -1;
	memcpy(v->perms, s, 4);
	v->perms[4] = '\0';
	s += 5;
	if (!(s = parse_num(s, 16, &v->off)) || *s++ != ' ' || !(s = parse_num(s, 16, &maj)) ||
	    *s++ != ':' || !(s = parse_num(s, 16, &min)) || *s++ != ' ' || !(s = parse_num(s, 10, &v->ino)))
		return -1;
	while (*s == ' ')
		s++;
	v->maj = (unsigned)maj;
	v->min = (unsigned)min;
	v->path = s;
	return 0;
}

static int vma_prot(const struct vma *v)
{
	return (v->perms[0] == 'r' ? PROT_READ : 0) | (v->perms[1] == 'w' ? PROT_WRITE : 0) |
	       (v->perms[2] == 'x' ? PROT_EXEC : 0);
}

/* --- is this fd a kvmfs file? -------------------------------------------------------- */
struct mi_ctx {
	unsigned maj, min;
	int found, kvmfs;
};

static int mountinfo_line(char *line, void *p)
{
	struct mi_ctx *c = p;
	uint64_t maj, min;
	const char *s = line, *sep;
	int i;

	for (i = 0; i < 2; i++) {       /* mount id, parent id */
		s = strchr(s, ' ');
		if (!s)
			return 0;
		s++;
	}
	if (!(s = parse_num(s, 10, &maj)) || *s++ != ':' || !parse_num(s, 10, &min))
		return 0;
	if (maj != c->maj || min != c->min)
		return 0;
	sep = strstr(s, " - ");
	if (!sep)
		return 0;
	c->found = 1;
	c->kvmfs = !strncmp(sep + 3, "fuse.kvmfs ", 11);
	return c->kvmfs;            /* a device can have several mounts: any kvmfs one wins */
}

static int is_kvmfs_dev(dev_t dev)
{
	struct mi_ctx c = {major(dev), minor(dev), 0, 0};
	int i, saved = errno;

	pthread_mutex_lock(&g_slow);
	for (i = 0; i < g_ndevc; i++)
		if (g_devc[i].dev == dev) {
			c.kvmfs = g_devc[i].kvmfs;
			goto out;
		}
	if (each_line("/proc/self/mountinfo", mountinfo_line, &c) < 0)
		goto out;               /* no /proc: not kvmfs, and not cached */
	i = g_ndevc < MAX_DEVC ? g_ndevc++ : g_devc_next++ % MAX_DEVC;
	g_devc[i].dev = dev;
	g_devc[i].kvmfs = c.kvmfs;
	dbg("device %u:%u is %s", c.maj, c.min, c.kvmfs ? "a kvmfs mount" : "not kvmfs");
out:
	pthread_mutex_unlock(&g_slow);
	errno = saved;
	return c.kvmfs;
}

/* A kvmfs file: fills st and path, returns its kind (ON_*), or 0 if it is not kvmfs. */
static int kvmfs_file(int fd, struct stat *st, char *path, size_t size)
{
	int saved = errno, kind = 0;

	if (fstat(fd, st) == 0 && is_kvmfs_dev(st->st_dev) && fd_path(fd, path, size) == 0)
		kind = kind_of(path);
	errno = saved;
	return kind;
}

/* --- the tables (g_tab) --------------------------------------------------------------- */
static void hull_update(void)
{
	uint64_t lo = UINT64_MAX, hi = 0;
	int i;

	for (i = 0; i < g_nreg; i++) {
		lo = g_reg[i].start < lo ? g_reg[i].start : lo;
		hi = g_reg[i].end > hi ? g_reg[i].end : hi;
	}
	for (i = 0; i < g_nconv; i++) {
		lo = g_conv[i].start < lo ? g_conv[i].start : lo;
		hi = g_conv[i].end > hi ? g_conv[i].end : hi;
	}
	__atomic_store_n(&g_lo, lo, __ATOMIC_RELAXED);
	__atomic_store_n(&g_hi, hi, __ATOMIC_RELAXED);
}

static void reg_put(dev_t dev, ino_t ino, uint32_t slot, uint64_t start, uint64_t end)
{
	int i;

	pthread_rwlock_wrlock(&g_tab);
	for (i = 0; i < g_nreg; i++)
		if (g_reg[i].dev == dev && g_reg[i].ino == ino && g_reg[i].slot == slot)
			break;
	if (i == MAX_REG) {
		dbg("memslot table full: slot %u at 0x%llx is not tracked", slot, (unsigned long long)start);
	} else {
		if (i == g_nreg)
			g_nreg++;
		g_reg[i] = (struct reg){dev, ino, slot, start, end};
		hull_update();
	}
	pthread_rwlock_unlock(&g_tab);
}

static void reg_del(dev_t dev, ino_t ino, uint32_t slot)
{
	int i;

	pthread_rwlock_wrlock(&g_tab);
	for (i = 0; i < g_nreg; i++)
		if (g_reg[i].dev == dev && g_reg[i].ino == ino && g_reg[i].slot == slot) {
			g_reg[i] = g_reg[--g_nreg];
			hull_update();
			break;
		}
	pthread_rwlock_unlock(&g_tab);
}

/* Removes [lo, hi) from the converted ranges (g_tab written). */
static void conv_cut_locked(uint64_t lo, uint64_t hi)
{
	struct range e;
	int i;

	for (i = 0; i < g_nconv; i++) {
		e = g_conv[i];
		if (e.end <= lo || e.start >= hi)
			continue;
		if (e.start < lo && e.end > hi) {
			g_conv[i].end = lo;
			if (g_nconv < MAX_CONV)
				g_conv[g_nconv++] = (struct range){hi, e.end};
			else
				dbg("converted-range table full: 0x%llx-0x%llx is not tracked",
				    (unsigned long long)hi, (unsigned long long)e.end);
		} else if (e.start < lo) {
			g_conv[i].end = lo;
		} else if (e.end > hi) {
			g_conv[i].start = hi;
		} else {
			g_conv[i--] = g_conv[--g_nconv];
		}
	}
}

static void conv_add_locked(uint64_t lo, uint64_t hi)
{
	conv_cut_locked(lo, hi);
	if (g_nconv < MAX_CONV)
		g_conv[g_nconv++] = (struct range){lo, hi};
	else
		dbg("converted-range table full: 0x%llx-0x%llx is not tracked", (unsigned long long)lo,
		    (unsigned long long)hi);
}

static void conv_cut(uint64_t lo, uint64_t hi)
{
	pthread_rwlock_wrlock(&g_tab);
	conv_cut_locked(lo, hi);
	hull_update();
	pthread_rwlock_unlock(&g_tab);
}

static void conv_add(uint64_t lo, uint64_t hi)
{
	pthread_rwlock_wrlock(&g_tab);
	conv_add_locked(lo, hi);
	hull_update();
	pthread_rwlock_unlock(&g_tab);
}

/* What [lo, hi) touches (g_tab read): registered ranges (their hull within
 * [lo, hi) in rlo/rhi) and converted ones. */
struct hit {
	int reg, conv;
	uint64_t rlo, rhi;
};

static void scan(uint64_t lo, uint64_t hi, struct hit *h)
{
	int i;

	h->reg = h->conv = 0;
	h->rlo = UINT64_MAX;
	h->rhi = 0;
	pthread_rwlock_rdlock(&g_tab);
	for (i = 0; i < g_nreg; i++) {
		if (g_reg[i].end <= lo || g_reg[i].start >= hi)
			continue;
		h->reg = 1;
		h->rlo = g_reg[i].start < h->rlo ? g_reg[i].start : h->rlo;
		h->rhi = g_reg[i].end > h->rhi ? g_reg[i].end : h->rhi;
	}
	for (i = 0; i < g_nconv && !h->conv; i++)
		h->conv = g_conv[i].start < hi && g_conv[i].end > lo;
	pthread_rwlock_unlock(&g_tab);
	h->rlo = h->rlo < lo ? lo : h->rlo;
	h->rhi = h->rhi > hi ? hi : h->rhi;
}

/* Sorts and merges n ranges in place; returns the new count. */
static int merge(struct range *r, int n)
{
	struct range t;
	int i, j, m = 0;

	for (i = 1; i < n; i++)
		for (j = i; j > 0 && r[j - 1].start > r[j].start; j--) {
			t = r[j];
			r[j] = r[j - 1];
			r[j - 1] = t;
		}
	for (i = 0; i < n; i++) {
		if (m && r[i].start <= r[m - 1].end) {
			if (r[i].end > r[m - 1].end)
				r[m - 1].end = r[i].end;
		} else {
			r[m++] = r[i];
		}
	}
	return m;
}

/* The parts of [lo, hi) in registered (conv == 0) or converted (conv == 1) ranges,
 * sorted and merged, at most max (the last one then covers the rest). */
static int pieces(uint64_t lo, uint64_t hi, int conv, struct range *out, int max)
{
	uint64_t s, e;
	int i, n = 0, count;

	pthread_rwlock_rdlock(&g_tab);
	count = conv ? g_nconv : g_nreg;
	for (i = 0; i < count; i++) {
		s = conv ? g_conv[i].start : g_reg[i].start;
		e = conv ? g_conv[i].end : g_reg[i].end;
		if (e <= lo || s >= hi)
			continue;
		s = s < lo ? lo : s;
		e = e > hi ? hi : e;
		if (n == max) {
			n = merge(out, n);
			if (n == max) {         /* still full: widen the last one */
				out[n - 1].end = e > out[n - 1].end ? e : out[n - 1].end;
				continue;
			}
		}
		out[n++] = (struct range){s, e};
	}
	pthread_rwlock_unlock(&g_tab);
	return merge(out, n);
}

/* --- MMU notifications --------------------------------------------------------------- */
static int notify_fd(void)
{
	char link[PATH_MAX];
	int fd;

	pthread_mutex_lock(&g_nfd_lock);
	if (g_nfd >= 0 && (fd_path(g_nfd, link, sizeof(link)) < 0 || strcmp(link, g_nfd_link))) {
		dbg("the notification fd %d was closed by the program; opening another", g_nfd);
		g_nfd = -1;             /* not ours any more: not closed */
	}
	if (g_nfd < 0) {
		fd = sys_open(g_sys, O_RDWR | O_CLOEXEC);
		if (fd >= 0 && fd_path(fd, g_nfd_link, sizeof(g_nfd_link)) < 0) {
			sys_close(fd);
			fd = -1;
		}
		if (fd < 0)
			dbg("cannot open %s for notifications: %s", g_sys, strerror(errno));
		g_nfd = fd;
	}
	fd = g_nfd;
	pthread_mutex_unlock(&g_nfd_lock);
	return fd;
}

static const char *cause_name(unsigned cause)
{
	static const char *const names[] = {"?", "munmap", "mremap", "mmap_fixed", "mprotect",
					    "madv_dontneed", "madv_remove", "madv_free", "punch_hole"};

	return cause < sizeof(names) / sizeof(names[0]) ? names[cause] : "?";
}

static int notify(int fd, uint64_t start, uint64_t end, unsigned phase, unsigned event, unsigned cause)
{
	struct kvmfs_mmu_notify n = {.start = start, .end = end, .phase = phase,
				     .event = (__u16)event, .cause = (__u16)cause};

	if (syscall(SYS_ioctl, fd, KVMFS_MMU_NOTIFY, &n) == 0)
		return 0;
	if (errno == ENOTTY) {
		if (!__atomic_exchange_n(&g_notify_off, 1, __ATOMIC_RELAXED))
			dbg("KVMFS_MMU_NOTIFY: ENOTTY, the daemon takes no notifications: none are sent");
	} else {
		dbg("KVMFS_MMU_NOTIFY %s 0x%llx-0x%llx (%s): %s", phase ? "end" : "start",
		    (unsigned long long)start, (unsigned long long)end, cause_name(cause), strerror(errno));
	}
	return -1;
}

/* START for [start, end); returns the fd to send END on, or -1 (then no END). */
static int notify_begin(uint64_t start, uint64_t end, unsigned event, unsigned cause)
{
	int fd, saved = errno;

	if (start >= end || __atomic_load_n(&g_notify_off, __ATOMIC_RELAXED)) {
		errno = saved;
		return -1;
	}
	fd = notify_fd();
	if (fd >= 0 && notify(fd, start, end, KVMFS_NOTIFY_START, event, cause) < 0)
		fd = -1;
	if (fd >= 0)
		dbg("MMU notification %s 0x%llx-0x%llx", cause_name(cause), (unsigned long long)start,
		    (unsigned long long)end);
	errno = saved;
	return fd;
}

static void notify_end(int fd, uint64_t start, uint64_t end, unsigned event, unsigned cause)
{
	int saved = errno;

	if (fd >= 0)
		notify(fd, start, end, KVMFS_NOTIFY_END, event, cause);
	errno = saved;
}

/* --- converting private memory to memfd MAP_SHARED memory in place --------------------- */
#define VF_DONTFORK (1u << 0)
#define VF_DONTDUMP (1u << 1)
#define VF_HUGEPAGE (1u << 2)
#define VF_NOHUGEPAGE (1u << 3)
#define VF_LOCKED (1u << 4)
#define VF_LOCKONFAULT (1u << 5)
#define VF_KEEP (1u << 6)       /* cannot be replaced: left private */
#define MAX_PARTS 32
#define MEMFD_NAME "kvmfs-converted-memory"     /* /proc/self/maps: "/memfd:" MEMFD_NAME " (deleted)" */

struct part {
	uint64_t start, end, vma;
	int prot, file;
	unsigned flags;
	const char *why;        /* VF_KEEP: the reason */
};

struct conv_ctx {
	uint64_t lo, hi, next;
	int n, more, smaps_at;
	struct part p[MAX_PARTS];
};

static int maps_part(char *line, void *p)
{
	static const char *const special[] = {"[stack]", "[vvar]", "[vvar_vclock]", "[vdso]",
					      "[vsyscall]", "[uprobes]"};
	struct conv_ctx *c = p;
	struct vma v;
	size_t i;

	if (parse_vma(line, &v) < 0 || v.end <= c->lo)
		return 0;
	if (v.start >= c->hi)
		return 1;
	if (v.perms[3] == 's')
		return 0;               /* shared already */
	for (i = 0; i < sizeof(special) / sizeof(special[0]); i++)
		if (!strcmp(v.path, special[i])) {
			dbg("0x%llx-0x%llx %s: left private", (unsigned long long)v.start,
			    (unsigned long long)v.end, v.path);
			return 0;
		}
	if (c->n == MAX_PARTS) {
		c->more = 1;
		c->next = v.start > c->lo ? v.start : c->lo;
		return 1;
	}
	c->p[c->n++] = (struct part){
		.start = v.start > c->lo ? v.start : c->lo,
		.end = v.end < c->hi ? v.end : c->hi,
		.vma = v.start, .prot = vma_prot(&v), .file = v.ino != 0,
	};
	return 0;
}

static void vmflags(struct part *pt, const char *s)
{
	static const struct {
		char name[3];
		unsigned flag;
		const char *why;
	} known[] = {
		{"dc", VF_DONTFORK, NULL}, {"dd", VF_DONTDUMP, NULL}, {"hg", VF_HUGEPAGE, NULL},
		{"nh", VF_NOHUGEPAGE, NULL}, {"lo", VF_LOCKED, NULL}, {"lf", VF_LOCKONFAULT, NULL},
		{"ht", VF_KEEP, "hugetlb"}, {"io", VF_KEEP, "VM_IO"}, {"pf", VF_KEEP, "PFN map"},
		{"gd", VF_KEEP, "grows down"}, {"sl", VF_KEEP, "sealed"}, {"ss", VF_KEEP, "shadow stack"},
		{"um", VF_KEEP, "userfaultfd"}, {"uw", VF_KEEP, "userfaultfd"}, {"ui", VF_KEEP, "userfaultfd"},
	};
	size_t i;

	while (*s) {
		while (*s == ' ')
			s++;
		if (s[0] && s[1] && (s[2] == ' ' || !s[2]))
			for (i = 0; i < sizeof(known) / sizeof(known[0]); i++)
				if (s[0] == known[i].name[0] && s[1] == known[i].name[1]) {
					pt->flags |= known[i].flag;
					if (known[i].why)
						pt->why = known[i].why;
				}
		while (*s && *s != ' ')
			s++;
	}
}

static int smaps_line(char *line, void *p)
{
	struct conv_ctx *c = p;
	struct vma v;
	int i;

	if (!strncmp(line, "VmFlags:", 8)) {
		if (c->smaps_at >= 0)
			vmflags(&c->p[c->smaps_at], line + 8);
		return 0;
	}
	if (!((line[0] >= '0' && line[0] <= '9') || (line[0] >= 'a' && line[0] <= 'f')) ||
	    parse_vma(line, &v) < 0)
		return 0;
	c->smaps_at = -1;
	if (v.start > c->p[c->n - 1].vma)
		return 1;
	for (i = 0; i < c->n; i++)
		if (c->p[i].vma == v.start)
			c->smaps_at = i;
	return 0;
}

static int write_all(int fd, uint64_t src, uint64_t len, uint64_t off, uint64_t *writes)
{
	ssize_t n;

	while (len) {
		++*writes;
		n = pwrite(fd, (const void *)(uintptr_t)src, len, (off_t)off);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			if (n == 0)
				errno = EIO;
			return -1;
		}
		src += (uint64_t)n;
		off += (uint64_t)n;
		len -= (uint64_t)n;
	}
	return 0;
}

/* Copies the present or swapped pages of private anonymous [start, start+len) into
 * mfd at offset 0: one pwrite per run of such pages.  Without pagemap: all of it.
 * Counts the pages copied and the writes. */
static int copy_present(int mfd, uint64_t start, uint64_t len, int pm, uint64_t *pmbuf, size_t cap,
			uint64_t *pages, uint64_t *writes)
{
	uint64_t npages = len / g_page, done = 0, run = UINT64_MAX, i, got;
	ssize_t r;

	while (pm >= 0 && done < npages) {
		got = npages - done < cap ? npages - done : cap;
		r = pread(pm, pmbuf, got * 8, (off_t)((start / g_page + done) * 8));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 8)
			break;
		got = (uint64_t)r / 8;
		for (i = 0; i < got; i++) {
			int used = (pmbuf[i] >> 62) != 0;       /* bit 63 present, bit 62 swapped */

			if (used && run == UINT64_MAX) {
				run = done + i;
			} else if (!used && run != UINT64_MAX) {
				*pages += done + i - run;
				if (write_all(mfd, start + run * g_page, (done + i - run) * g_page, run * g_page,
					      writes) < 0)
					return -1;
				run = UINT64_MAX;
			}
		}
		done += got;
	}
	if (done < npages && run == UINT64_MAX)
		run = done;     /* pagemap failed: copy the rest whole */
	if (run == UINT64_MAX)
		return 0;
	*pages += npages - run;
	return write_all(mfd, start + run * g_page, (npages - run) * g_page, run * g_page, writes);
}

/* Replaces one private part by memfd MAP_SHARED memory with the same contents. */
static int convert_part(const struct part *pt, int pm, uint64_t *pmbuf, size_t cap)
{
	uint64_t len = pt->end - pt->start, pages = 0, writes = 0;
	void *m;
	int mfd;

	if (!pt->prot || (pt->flags & VF_KEEP)) {
		dbg("0x%llx-0x%llx: %s, left private", (unsigned long long)pt->start,
		    (unsigned long long)pt->end, pt->prot ? pt->why : "PROT_NONE");
		return -1;
	}
	mfd = (int)syscall(SYS_memfd_create, MEMFD_NAME, MFD_CLOEXEC);
	if (mfd < 0) {
		dbg("memfd_create: %s; 0x%llx-0x%llx left private", strerror(errno),
		    (unsigned long long)pt->start, (unsigned long long)pt->end);
		return -1;
	}
	if (ftruncate(mfd, (off_t)len) < 0)
		goto fail;
	if (pt->file) {
		/* A private file mapping reads as the file where not written: copy all;
		 * pages past the file's end fault (EFAULT) and stay zero. */
		if (write_all(mfd, pt->start, len, 0, &writes) < 0 && errno != EFAULT)
			goto fail;
		pages = len / g_page;
	} else if (copy_present(mfd, pt->start, len, pm, pmbuf, cap, &pages, &writes) < 0) {
		goto fail;
	}
	m = sys_mmap(pt->start, len, pt->prot, MAP_SHARED | MAP_FIXED, mfd, 0);
	if (m == MAP_FAILED)
		goto fail;
	if (pt->flags & VF_DONTFORK)
		sys_madvise(pt->start, len, MADV_DONTFORK);
	if (pt->flags & VF_DONTDUMP)
		sys_madvise(pt->start, len, MADV_DONTDUMP);
	if (pt->flags & VF_HUGEPAGE)
		sys_madvise(pt->start, len, MADV_HUGEPAGE);
	if (pt->flags & VF_NOHUGEPAGE)
		sys_madvise(pt->start, len, MADV_NOHUGEPAGE);
	if (pt->flags & VF_LOCKONFAULT)
		syscall(SYS_mlock2, pt->start, len, MLOCK_ONFAULT);
	else if (pt->flags & VF_LOCKED)
		syscall(SYS_mlock, pt->start, len);
	sys_close(mfd);
	dbg("converted 0x%llx-0x%llx (%s) to memfd shared memory: %llu pages copied in %llu writes",
	    (unsigned long long)pt->start, (unsigned long long)pt->end,
	    pt->file ? "private file mapping" : "private anonymous", (unsigned long long)pages,
	    (unsigned long long)writes);
	return 0;
fail:
	dbg("converting 0x%llx-0x%llx: %s; left as it was", (unsigned long long)pt->start,
	    (unsigned long long)pt->end, strerror(errno));
	sys_close(mfd);
	return -1;
}

/* Converts the private parts of [lo, hi) (page-aligned) in place. */
static void convert_range(uint64_t lo, uint64_t hi)
{
	const size_t cap = (1 << 20) / 8;       /* pagemap entries per read */
	struct conv_ctx c;
	uint64_t *pmbuf = NULL;
	int i, pm = -1, saved = errno;

	pthread_mutex_lock(&g_slow);
	while (lo < hi) {
		memset(&c, 0, sizeof(c));
		c.lo = lo;
		c.hi = hi;
		c.smaps_at = -1;
		if (each_line("/proc/self/maps", maps_part, &c) < 0)
			break;
		if (c.n) {
			each_line("/proc/self/smaps", smaps_line, &c);
			if (pm < 0)
				pm = sys_open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
			if (!pmbuf) {
				pmbuf = sys_mmap(0, cap * 8, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
				if (pmbuf == MAP_FAILED) {
					pmbuf = NULL;
					sys_close(pm);
					pm = -1;
				}
			}
		}
		for (i = 0; i < c.n; i++)
			if (convert_part(&c.p[i], pm, pmbuf, cap) == 0)
				conv_add(c.p[i].start, c.p[i].end);
		lo = c.more ? c.next : hi;
	}
	if (pmbuf)
		syscall(SYS_munmap, pmbuf, cap * 8);
	if (pm >= 0)
		sys_close(pm);
	pthread_mutex_unlock(&g_slow);
	errno = saved;
}

/* Converts what of [lo, hi) lies in registered ranges (new memory mapped there). */
static void convert_registered(uint64_t lo, uint64_t hi)
{
	struct range r[16];
	int i, n = pieces(lo, hi, 0, r, 16);

	for (i = 0; i < n; i++)
		convert_range(r[i].start, r[i].end);
}

/* --- ioctl ------------------------------------------------------------------------------ */
static void init(void);

static inline void ensure_init(void)
{
	if (UNLIKELY(!__atomic_load_n(&g_inited, __ATOMIC_ACQUIRE)) && !t_in_init)
		pthread_once(&g_once, init);
}

/* Expands a CHILD_ROWS path for the file at `path` and id `id`. */
static int child_path(char *out, size_t size, const char *fmt, const char *path, long id)
{
	const char *name = last_name(path);
	size_t o = 0, n;
	char num[24];
	const char *s;

	for (; *fmt; fmt++) {
		s = fmt;
		n = 1;
		if (*fmt == '%' && fmt[1]) {
			switch (*++fmt) {
			case 'D':
				s = path;
				n = (size_t)(name - path) - (name > path);
				break;
			case 'B':
				s = name;
				n = strlen(name);
				break;
			case 'N':
				n = (size_t)snprintf(num, sizeof(num), "%ld", id);
				s = num;
				break;
			default:
				s = fmt;
			}
		}
		if (o + n >= size)
			return -1;
		memcpy(out + o, s, n);
		o += n;
	}
	out[o] = '\0';
	return 0;
}

static int create_child(int fd, unsigned long request, void *arg, const struct child_row *row)
{
	char path[PATH_MAX], child[PATH_MAX];
	struct stat st;
	long r, id;
	int cfd, saved = errno;

	if (!(kvmfs_file(fd, &st, path, sizeof(path)) & row->on))
		return (int)syscall(SYS_ioctl, fd, request, arg);
	r = syscall(SYS_ioctl, fd, request, arg);
	if (r < 0)
		return (int)r;
	id = row->id_at == ID_RETURN ? r : (long)*(__u32 *)((char *)arg + row->id_at);
	if (child_path(child, sizeof(child), row->path, path, id) < 0) {
		errno = ENAMETOOLONG;
		return -1;
	}
	do
		cfd = sys_open(child, row->flags);
	while (cfd < 0 && errno == EINTR);
	if (cfd < 0) {
		dbg("ioctl 0x%lx on %s answered %ld, but %s: %s", request, path, id, child, strerror(errno));
		return -1;
	}
	dbg("ioctl 0x%lx on %s: %s is fd %d", request, path, child, cfd);
	errno = saved;
	if (row->id_at == ID_RETURN)
		return cfd;
	*(__u32 *)((char *)arg + row->id_at) = (__u32)cfd;
	return (int)r;
}

/* Copies len bytes of the caller's memory at src without faulting on a bad pointer. */
static int read_self(void *dst, const void *src, size_t len)
{
	struct iovec l = {dst, len}, r = {(void *)(uintptr_t)src, len};

	if (syscall(SYS_process_vm_readv, getpid(), &l, 1UL, &r, 1UL, 0UL) == (long)len)
		return 0;
	if (errno == EFAULT)
		return -1;
	memcpy(dst, src, len);  /* process_vm_readv refused (seccomp, ENOSYS): read it */
	return 0;
}

static int set_memory_region(int fd, unsigned long request, void *arg)
{
	struct kvm_userspace_memory_region2 m;
	char path[PATH_MAX];
	struct stat st;
	uint64_t start, size;
	int track, saved = errno, e;
	long r;
	size_t len = (unsigned int)request == (unsigned int)KVM_SET_USER_MEMORY_REGION2
			     ? sizeof(struct kvm_userspace_memory_region2)
			     : sizeof(struct kvm_userspace_memory_region);

	if (kvmfs_file(fd, &st, path, sizeof(path)) != ON_VM || read_self(&m, arg, len) < 0) {
		errno = saved;
		return (int)syscall(SYS_ioctl, fd, request, arg);
	}
	start = m.userspace_addr;
	size = m.memory_size;
	track = size && !(start & (g_page - 1)) && !(size & (g_page - 1)) && start + size > start &&
		!(len == sizeof(m) && (m.flags & KVM_MEM_GUEST_MEMFD) && !start);
	if (track)
		convert_range(start, start + size);
	r = syscall(SYS_ioctl, fd, request, arg);
	e = errno;
	if (r == 0) {
		if (!size)
			reg_del(st.st_dev, st.st_ino, m.slot);
		else if (track)
			reg_put(st.st_dev, st.st_ino, m.slot, start, start + size);
		dbg("%s slot 0x%x: 0x%llx+0x%llx", path, m.slot, (unsigned long long)start,
		    (unsigned long long)size);
	}
	errno = r < 0 ? e : saved;
	return (int)r;
}

static __attribute__((noinline)) int ioctl_slow(int fd, unsigned long request, void *arg)
{
	size_t i;

	ensure_init();
	if (!active())
		return (int)syscall(SYS_ioctl, fd, request, arg);
	switch ((unsigned int)request) {
	case (unsigned int)KVM_SET_USER_MEMORY_REGION:
	case (unsigned int)KVM_SET_USER_MEMORY_REGION2:
		return set_memory_region(fd, request, arg);
	}
	for (i = 0; i < sizeof(g_child) / sizeof(g_child[0]); i++)
		if (g_child[i].request == (unsigned int)request)
			return create_child(fd, request, arg, &g_child[i]);
	return (int)syscall(SYS_ioctl, fd, request, arg);
}

EXPORT int ioctl(int fd, unsigned long request, ...)
{
	va_list ap;
	void *arg;

	va_start(ap, request);
	arg = va_arg(ap, void *);
	va_end(ap);
	switch ((unsigned int)request) {      /* the kernel takes the command as 32 bits */
	CHILD_ROWS(CHILD_CASE)
	case (unsigned int)KVM_SET_USER_MEMORY_REGION:
	case (unsigned int)KVM_SET_USER_MEMORY_REGION2:
		return ioctl_slow(fd, request, arg);
	default:
		return (int)sys_ioctl(fd, request, arg);
	}
}

/* --- the mm calls --------------------------------------------------------------------- */
EXPORT int munmap(void *addr, size_t len)
{
	uint64_t lo, hi;
	struct hit h;
	int nfd = -1, saved, e;
	long r;

	if (!active() || !page_range((uintptr_t)addr, len, &lo, &hi) || !near(lo, hi))
		return (int)syscall(SYS_munmap, addr, len);
	saved = errno;
	scan(lo, hi, &h);
	if (h.reg)
		nfd = notify_begin(h.rlo, h.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MUNMAP);
	r = syscall(SYS_munmap, addr, len);
	e = errno;
	if (r == 0 && h.conv)
		conv_cut(lo, hi);
	notify_end(nfd, h.rlo, h.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MUNMAP);
	errno = r < 0 ? e : saved;
	return (int)r;
}

static void *do_mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	uint64_t lo = 0, hi = 0;
	struct hit h = {0, 0, 0, 0};
	int nfd = -1, saved, e, replace;
	void *p;

	replace = (flags & MAP_FIXED) && !(flags & MAP_FIXED_NOREPLACE);
	if (!active())
		return sys_mmap((uintptr_t)addr, len, prot, flags, fd, off);
	saved = errno;
	if (replace && page_range((uintptr_t)addr, len, &lo, &hi) && near(lo, hi)) {
		scan(lo, hi, &h);
		if (h.reg)
			nfd = notify_begin(h.rlo, h.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MMAP_FIXED);
	}
	p = sys_mmap((uintptr_t)addr, len, prot, flags, fd, off);
	e = errno;
	if (p != MAP_FAILED) {
		/* Whatever was converted there is gone (MAP_FIXED), or was gone before
		 * by a call not seen here. */
		if (h.conv || (!replace && page_range((uintptr_t)p, len, &lo, &hi) && near(lo, hi)))
			conv_cut(lo, hi);
		/* New private memory where a memslot is: make it shareable, as on KVM the
		 * slot would simply use it. */
		if ((flags & MAP_TYPE) == MAP_PRIVATE && !(flags & MAP_HUGETLB) &&
		    page_range((uintptr_t)p, len, &lo, &hi) && near(lo, hi))
			convert_registered(lo, hi);
	}
	notify_end(nfd, h.rlo, h.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MMAP_FIXED);
	errno = p == MAP_FAILED ? e : saved;
	return p;
}

EXPORT void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
	return do_mmap(addr, len, prot, flags, fd, off);
}

EXPORT void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off64_t off)
{
	return do_mmap(addr, len, prot, flags, fd, (off_t)off);
}

EXPORT int mprotect(void *addr, size_t len, int prot)
{
	uint64_t lo, hi;
	struct hit h;
	int nfd = -1, saved, e;
	long r;

	if (!active() || !page_range((uintptr_t)addr, len, &lo, &hi) || !near(lo, hi))
		return (int)syscall(SYS_mprotect, addr, len, prot);
	saved = errno;
	scan(lo, hi, &h);
	if (h.reg)
		nfd = notify_begin(h.rlo, h.rhi, KVMFS_MMU_EVENT_PROTECTION_VMA, KVMFS_CAUSE_MPROTECT);
	r = syscall(SYS_mprotect, addr, len, prot);
	e = errno;
	notify_end(nfd, h.rlo, h.rhi, KVMFS_MMU_EVENT_PROTECTION_VMA, KVMFS_CAUSE_MPROTECT);
	errno = r < 0 ? e : saved;
	return (int)r;
}

/* Is [lo, hi) still all this library's memfd memory?  (It is not after an unmap
 * the library did not see; MADV_REMOVE must then not punch whatever is there.) */
struct still_ctx {
	uint64_t lo, hi, at;
};

static int still_line(char *line, void *p)
{
	struct still_ctx *c = p;
	struct vma v;

	if (parse_vma(line, &v) < 0 || v.end <= c->at)
		return 0;
	if (v.start > c->at || v.perms[3] != 's' || strcmp(v.path, "/memfd:" MEMFD_NAME " (deleted)"))
		return 1;
	c->at = v.end;
	return c->at >= c->hi;
}

static int still_converted(uint64_t lo, uint64_t hi)
{
	struct still_ctx c = {lo, hi, lo};

	pthread_mutex_lock(&g_slow);
	each_line("/proc/self/maps", still_line, &c);
	pthread_mutex_unlock(&g_slow);
	return c.at >= hi;
}

/* madvise(advice) of [lo, hi), where the converted parts c[] get MADV_REMOVE: memfd
 * memory is not zeroed by DONTNEED, and MADV_FREE refuses shared memory. */
static long madvise_zeroing(uint64_t lo, uint64_t hi, int advice, const struct range *c, int n)
{
	uint64_t cur = lo;
	int i, err = 0;

	for (i = 0; i <= n; i++) {
		uint64_t s = i < n ? c[i].start : hi, e = i < n ? c[i].end : hi;

		if (cur < s && sys_madvise(cur, s - cur, advice) < 0 && !err)
			err = errno;
		if (s < e && !still_converted(s, e)) {
			dbg("0x%llx-0x%llx is no longer converted memory", (unsigned long long)s,
			    (unsigned long long)e);
			conv_cut(s, e);
			if (sys_madvise(s, e - s, advice) < 0 && !err)
				err = errno;
		} else if (s < e && sys_madvise(s, e - s, MADV_REMOVE) < 0) {
			dbg("MADV_REMOVE of converted 0x%llx-0x%llx: %s; the advice given as it was",
			    (unsigned long long)s, (unsigned long long)e, strerror(errno));
			if (sys_madvise(s, e - s, advice) < 0 && !err)
				err = errno;
		}
		cur = e > cur ? e : cur;
	}
	if (err) {
		errno = err;
		return -1;
	}
	return 0;
}

EXPORT int madvise(void *addr, size_t len, int advice)
{
	struct range c[16];
	uint64_t lo, hi;
	struct hit h;
	unsigned cause;
	int nfd = -1, saved, e, n = 0;
	long r;

	cause = kvmfs_madvise_cause(advice);
	if (!cause)
		return (int)syscall(SYS_madvise, addr, len, advice);
	if (!active() || ((uintptr_t)addr & (g_page - 1)) || !page_range((uintptr_t)addr, len, &lo, &hi) ||
	    !near(lo, hi))
		return (int)syscall(SYS_madvise, addr, len, advice);
	saved = errno;
	scan(lo, hi, &h);
	if (h.conv && advice != MADV_REMOVE)
		n = pieces(lo, hi, 1, c, 16);
	if (h.reg)
		nfd = notify_begin(h.rlo, h.rhi, KVMFS_MMU_EVENT_CLEAR, cause);
	r = n ? madvise_zeroing(lo, hi, advice, c, n) : syscall(SYS_madvise, addr, len, advice);
	e = errno;
	notify_end(nfd, h.rlo, h.rhi, KVMFS_MMU_EVENT_CLEAR, cause);
	errno = r < 0 ? e : saved;
	return (int)r;
}

struct prot_ctx {
	uint64_t addr;
	int prot;
};

static int prot_line(char *line, void *p)
{
	struct prot_ctx *c = p;
	struct vma v;

	if (parse_vma(line, &v) < 0 || v.end <= c->addr)
		return 0;
	if (v.start <= c->addr)
		c->prot = vma_prot(&v);
	return 1;
}

/* mremap grew converted memory at [lo, hi): on private memory that part would be
 * new zeroed pages; on the memfd it is past its end (SIGBUS) or old contents. */
static void fresh_tail(uint64_t lo, uint64_t hi)
{
	struct prot_ctx c = {lo - 1, -1};

	pthread_mutex_lock(&g_slow);
	each_line("/proc/self/maps", prot_line, &c);
	pthread_mutex_unlock(&g_slow);
	if (c.prot >= 0 &&
	    sys_mmap(lo, hi - lo, c.prot, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED)
		dbg("mremap grew converted memory: 0x%llx-0x%llx is fresh memory", (unsigned long long)lo,
		    (unsigned long long)hi);
}

/* mremap moved [olo, ohi) to nlo, its first len bytes kept: so do the converted
 * parts (keep: the old range stays mapped, MREMAP_DONTUNMAP). */
static void conv_move(uint64_t olo, uint64_t ohi, uint64_t len, uint64_t nlo, int keep)
{
	struct range c[16];
	int i, n = pieces(olo, olo + len < ohi ? olo + len : ohi, 1, c, 16);

	pthread_rwlock_wrlock(&g_tab);
	if (!keep)
		conv_cut_locked(olo, ohi);
	for (i = 0; i < n; i++)
		conv_add_locked(c[i].start - olo + nlo, c[i].end - olo + nlo);
	hull_update();
	pthread_rwlock_unlock(&g_tab);
}

EXPORT void *mremap(void *old, size_t old_size, size_t new_size, int flags, ...)
{
	uint64_t olo = 0, ohi = 0, glo = 0, ghi = 0, flo = 0, fhi = 0, nlo, nhi, osz;
	struct hit ho = {0, 0, 0, 0}, hf = {0, 0, 0, 0};
	int nfo = -1, nff = -1, saved, e, gnear = 0, tail_conv = 0;
	void *newp = NULL, *p;
	va_list ap;

	if (flags & MREMAP_FIXED) {
		va_start(ap, flags);
		newp = va_arg(ap, void *);
		va_end(ap);
	}
	if (!active())
		return (void *)syscall(SYS_mremap, old, old_size, new_size, flags, newp);
	saved = errno;
	osz = (old_size + g_page - 1) & ~(g_page - 1);
	/* What of the old range may go away: all of it if it can move, the tail if it shrinks. */
	if (old_size && (flags & (MREMAP_MAYMOVE | MREMAP_FIXED | MREMAP_DONTUNMAP)))
		page_range((uintptr_t)old, old_size, &olo, &ohi);
	else if (old_size && new_size < old_size)
		page_range((uintptr_t)old + new_size, old_size - new_size, &olo, &ohi);
	if (olo < ohi && near(olo, ohi)) {
		scan(olo, ohi, &ho);
		if (ho.reg)
			nfo = notify_begin(ho.rlo, ho.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MREMAP);
	}
	/* MREMAP_FIXED replaces what was at the new address. */
	if ((flags & MREMAP_FIXED) && page_range((uintptr_t)newp, new_size, &flo, &fhi) && near(flo, fhi)) {
		scan(flo, fhi, &hf);
		if (hf.reg)
			nff = notify_begin(hf.rlo, hf.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MREMAP);
	}
	if (old_size && page_range((uintptr_t)old, old_size, &glo, &ghi) && near(glo, ghi)) {
		struct range c[1];

		gnear = 1;
		tail_conv = new_size > old_size && pieces(ghi - g_page, ghi, 1, c, 1) > 0;
	}
	p = (void *)syscall(SYS_mremap, old, old_size, new_size, flags, newp);
	e = errno;
	if (p != MAP_FAILED) {
		nlo = (uintptr_t)p;
		nhi = nlo + ((new_size + g_page - 1) & ~(g_page - 1));
		if (hf.conv)
			conv_cut(flo, fhi);
		if (nlo != glo && near(nlo, nhi))
			conv_cut(nlo, nhi);     /* stale: that range was free */
		if (gnear && nlo != glo)
			conv_move(glo, ghi, nhi - nlo, nlo, (flags & MREMAP_DONTUNMAP) != 0);
		else if (ho.conv)
			conv_cut(olo, ohi);     /* shrunk in place */
		if (tail_conv && nlo + osz < nhi)
			fresh_tail(nlo + osz, nhi);
		if (near(nlo, nhi))
			convert_registered(nlo, nhi);
	}
	notify_end(nff, hf.rlo, hf.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MREMAP);
	notify_end(nfo, ho.rlo, ho.rhi, KVMFS_MMU_EVENT_UNMAP, KVMFS_CAUSE_MREMAP);
	errno = p == MAP_FAILED ? e : saved;
	return p;
}

/* fallocate(PUNCH_HOLE): the hvas where the punched part of the file is mapped. */
#define MAX_PUNCH 8
struct punch_ctx {
	unsigned maj, min;
	uint64_t ino, off, end;
	struct range r[MAX_PUNCH];
	int n;
};

static int punch_line(char *line, void *p)
{
	struct punch_ctx *c = p;
	struct vma v;
	uint64_t fs, fe;

	if (parse_vma(line, &v) < 0 || v.ino != c->ino || v.maj != c->maj || v.min != c->min)
		return 0;
	fs = v.off > c->off ? v.off : c->off;
	fe = v.off + (v.end - v.start) < c->end ? v.off + (v.end - v.start) : c->end;
	if (fs >= fe)
		return 0;
	fs = v.start + (fs - v.off);
	fe = v.start + (fe - v.off);
	if (c->n == MAX_PUNCH)
		c->n = merge(c->r, c->n);
	if (c->n == MAX_PUNCH) {        /* still full: the last one covers this one too */
		c->r[c->n - 1].start = fs < c->r[c->n - 1].start ? fs : c->r[c->n - 1].start;
		c->r[c->n - 1].end = fe > c->r[c->n - 1].end ? fe : c->r[c->n - 1].end;
		return 0;
	}
	c->r[c->n++] = (struct range){fs, fe};
	return 0;
}

static int do_fallocate(int fd, int mode, off_t off, off_t len)
{
	struct range reg[MAX_PUNCH], hits[MAX_PUNCH * MAX_PUNCH];
	struct punch_ctx c;
	struct stat st;
	int nfd[MAX_PUNCH * MAX_PUNCH], saved, e, i, j, k, n = 0;
	long r;

	if (!active() || !(mode & FALLOC_FL_PUNCH_HOLE) || off < 0 || len <= 0 ||
	    !__atomic_load_n(&g_hi, __ATOMIC_RELAXED))
		return (int)syscall(SYS_fallocate, fd, mode, off, len);
	saved = errno;
	if (fstat(fd, &st) == 0) {
		memset(&c, 0, sizeof(c));
		c.maj = major(st.st_dev);
		c.min = minor(st.st_dev);
		c.ino = st.st_ino;
		c.off = (uint64_t)off & ~(g_page - 1);
		c.end = ((uint64_t)off + (uint64_t)len + g_page - 1) & ~(g_page - 1);
		pthread_mutex_lock(&g_slow);
		each_line("/proc/self/maps", punch_line, &c);
		pthread_mutex_unlock(&g_slow);
		c.n = merge(c.r, c.n);
		for (i = 0; i < c.n; i++) {
			k = pieces(c.r[i].start, c.r[i].end, 0, reg, MAX_PUNCH);
			for (j = 0; j < k; j++)
				hits[n++] = reg[j];
		}
	}
	for (i = 0; i < n; i++)
		nfd[i] = notify_begin(hits[i].start, hits[i].end, KVMFS_MMU_EVENT_CLEAR, KVMFS_CAUSE_PUNCH_HOLE);
	r = syscall(SYS_fallocate, fd, mode, off, len);
	e = errno;
	for (i = 0; i < n; i++)
		notify_end(nfd[i], hits[i].start, hits[i].end, KVMFS_MMU_EVENT_CLEAR, KVMFS_CAUSE_PUNCH_HOLE);
	errno = r < 0 ? e : saved;
	return (int)r;
}

EXPORT int fallocate(int fd, int mode, off_t off, off_t len)
{
	return do_fallocate(fd, mode, off, len);
}

EXPORT int fallocate64(int fd, int mode, off64_t off, off64_t len)
{
	return do_fallocate(fd, mode, (off_t)off, (off_t)len);
}

/* --- opening /dev/kvm ------------------------------------------------------------------ */
enum { R_OPEN, R_OPEN64, R_OPENAT, R_OPENAT64, R_OPEN_2, R_OPEN64_2, R_OPENAT_2, R_OPENAT64_2,
       R_FOPEN, R_FOPEN64, R_COUNT };
static const char *const g_real_name[R_COUNT] = {
	"open", "open64", "openat", "openat64", "__open_2", "__open64_2", "__openat_2", "__openat64_2",
	"fopen", "fopen64",
};
static void *g_real[R_COUNT];

/* The next definition of an interposed function; NULL while dlsym runs (a call
 * from inside dlsym then takes the system call). */
static void *real(int which)
{
	void *p = __atomic_load_n(&g_real[which], __ATOMIC_ACQUIRE);
	int saved;

	if (!p && !t_in_dlsym) {
		saved = errno;
		t_in_dlsym = 1;
		p = dlsym(RTLD_NEXT, g_real_name[which]);
		t_in_dlsym = 0;
		__atomic_store_n(&g_real[which], p, __ATOMIC_RELEASE);
		errno = saved;
	}
	return p;
}

/* Does (dirfd, path) name /dev/kvm or a KVMFS_DEVICES entry? */
static int names_device(int dirfd, const char *path)
{
	char base[PATH_MAX], full[2 * PATH_MAX];
	const char *name;
	int i, saved, hit = 0;

	if (t_in_init || t_in_dlsym || !path)
		return 0;
	ensure_init();
	if (!active())
		return 0;
	/* Normalising keeps a last component that is a name, so the name decides the
	 * common case without a system call; "." and ".." need the whole path. */
	name = last_name(path);
	if (!*name)
		return 0;       /* "/dev/kvm/": not a directory, whatever it is */
	if (strcmp(name, ".") && strcmp(name, "..")) {
		for (i = 0; i < g_ndevice && strcmp(name, g_device_name[i]); i++)
			;
		if (i == g_ndevice)
			return 0;
	}
	saved = errno;
	if (path[0] != '/') {
		if (dirfd == AT_FDCWD ? !getcwd(base, sizeof(base)) : fd_path(dirfd, base, sizeof(base)) < 0)
			goto out;
		if (base[0] != '/')
			goto out;       /* "anon_inode:..." and the like */
	}
	if (join(full, sizeof(full), base, path) < 0)
		goto out;
	for (i = 0; i < g_ndevice && !hit; i++)
		hit = !strcmp(full, g_device[i]);
	if (hit)
		dbg("%s: opening %s instead", path, g_sys);
out:
	errno = saved;
	return hit;
}

#define NEEDS_MODE(flags) (((flags) & O_CREAT) || ((flags) & O_TMPFILE) == O_TMPFILE)

static int open_common(int which, int dirfd, const char *path, int flags, mode_t mode)
{
	void *f;

	if (names_device(dirfd, path)) {
		path = g_sys;
		dirfd = AT_FDCWD;
	}
	f = real(which);
	if (!f)
		return (int)syscall(SYS_openat, dirfd, path, flags, mode);
	switch (which) {
	case R_OPEN:
	case R_OPEN64:
		return ((int (*)(const char *, int, ...))f)(path, flags, mode);
	case R_OPENAT:
	case R_OPENAT64:
		return ((int (*)(int, const char *, int, ...))f)(dirfd, path, flags, mode);
	case R_OPEN_2:
	case R_OPEN64_2:
		return ((int (*)(const char *, int))f)(path, flags);
	default:
		return ((int (*)(int, const char *, int))f)(dirfd, path, flags);
	}
}

EXPORT int open(const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;

	if (NEEDS_MODE(flags)) {
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_common(R_OPEN, AT_FDCWD, path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;

	if (NEEDS_MODE(flags)) {
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_common(R_OPEN64, AT_FDCWD, path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;

	if (NEEDS_MODE(flags)) {
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_common(R_OPENAT, dirfd, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
	mode_t mode = 0;
	va_list ap;

	if (NEEDS_MODE(flags)) {
		va_start(ap, flags);
		mode = (mode_t)va_arg(ap, int);
		va_end(ap);
	}
	return open_common(R_OPENAT64, dirfd, path, flags, mode);
}

EXPORT int __open_2(const char *path, int flags)
{
	return open_common(R_OPEN_2, AT_FDCWD, path, flags, 0);
}

EXPORT int __open64_2(const char *path, int flags)
{
	return open_common(R_OPEN64_2, AT_FDCWD, path, flags, 0);
}

EXPORT int __openat_2(int dirfd, const char *path, int flags)
{
	return open_common(R_OPENAT_2, dirfd, path, flags, 0);
}

EXPORT int __openat64_2(int dirfd, const char *path, int flags)
{
	return open_common(R_OPENAT64_2, dirfd, path, flags, 0);
}

static FILE *fopen_common(int which, const char *path, const char *mode)
{
	FILE *(*f)(const char *, const char *);

	if (names_device(AT_FDCWD, path))
		path = g_sys;
	f = (FILE * (*)(const char *, const char *)) real(which);
	if (!f) {
		errno = ENOSYS;
		return NULL;
	}
	return f(path, mode);
}

EXPORT FILE *fopen(const char *path, const char *mode)
{
	return fopen_common(R_FOPEN, path, mode);
}

EXPORT FILE *fopen64(const char *path, const char *mode)
{
	return fopen_common(R_FOPEN64, path, mode);
}

/* --- set-up ----------------------------------------------------------------------------- */
static void fork_prepare(void)
{
	pthread_mutex_lock(&g_slow);
	pthread_rwlock_wrlock(&g_tab);
	pthread_mutex_lock(&g_nfd_lock);
}

static void fork_parent(void)
{
	pthread_mutex_unlock(&g_nfd_lock);
	pthread_rwlock_unlock(&g_tab);
	pthread_mutex_unlock(&g_slow);
}

static void fork_child(void)
{
	static const pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
	static const pthread_rwlock_t rw = PTHREAD_RWLOCK_INITIALIZER;

	memcpy(&g_nfd_lock, &m, sizeof(m));
	memcpy(&g_tab, &rw, sizeof(rw));
	memcpy(&g_slow, &m, sizeof(m));
}

static int add_device(const char *cwd, const char *path)
{
	if (g_ndevice == MAX_DEVICES || !*path || (path[0] != '/' && !cwd) ||
	    join(g_device[g_ndevice], PATH_MAX, cwd ? cwd : "/", path) < 0)
		return -1;
	g_device_name[g_ndevice] = last_name(g_device[g_ndevice]);
	if (!*g_device_name[g_ndevice])
		return -1;      /* "/" */
	g_ndevice++;
	return 0;
}

static void init(void)
{
	char cwd[PATH_MAX], dev[PATH_MAX];
	const char *mnt, *list, *s, *colon;
	size_t n;
	long page;

	t_in_init = 1;
	mnt = getenv("KVMFS_MOUNT");
	g_debug = (s = getenv("KVMFS_PRELOAD_DEBUG")) && !strcmp(s, "1");
	if (!mnt || !*mnt)
		goto out;       /* nothing at all */
	page = sysconf(_SC_PAGESIZE);
	if (page > 0)
		g_page = (uint64_t)page;
	if (!getcwd(cwd, sizeof(cwd)) || cwd[0] != '/')
		cwd[0] = '\0';
	if ((mnt[0] != '/' && !cwd[0]) || join(dev, sizeof(dev), cwd, mnt) < 0 ||
	    snprintf(g_sys, sizeof(g_sys), "%s%skvm", dev, strcmp(dev, "/") ? "/" : "") >= (int)sizeof(g_sys)) {
		dbg("KVMFS_MOUNT=%s: cannot use it; passing everything through", mnt);
		goto out;
	}
	add_device(NULL, "/dev/kvm");
	for (list = getenv("KVMFS_DEVICES"); list && *list; list = *colon ? colon + 1 : colon) {
		colon = strchrnul(list, ':');
		n = (size_t)(colon - list);
		if (n && n < sizeof(dev)) {
			memcpy(dev, list, n);
			dev[n] = '\0';
			if (add_device(cwd[0] ? cwd : NULL, dev) < 0)
				dbg("KVMFS_DEVICES: %s not used", dev);
		}
	}
	pthread_atfork(fork_prepare, fork_parent, fork_child);
	__atomic_store_n(&g_active, 1, __ATOMIC_RELEASE);
	dbg("active: /dev/kvm is %s", g_sys);
out:
	__atomic_store_n(&g_inited, 1, __ATOMIC_RELEASE);
	t_in_init = 0;
}

__attribute__((constructor)) static void preload_init(void)
{
	ensure_init();
}
