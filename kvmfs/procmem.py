"""A client process's memory and identity, as KVM has them through `current`.

FUSE gives the daemon the calling thread's id; pointers inside ioctl structs
(dirty bitmaps, cpuid and msr arrays) are followed here with
process_vm_readv/process_vm_writev on that thread.

Owns: the cache of caller threads (thread id -> process), and `Process`, a
process pinned for the life of the object.  Must not touch: VMs (vm.py decides
who owns what; this module only says who is calling and whether a process is
still the same one).

Identity that cannot be reused.  Thread and process ids are numbers the kernel
hands out again once their task is reaped, so neither a cached "tid -> tgid"
answer nor a stored pid says anything about who has the number later.  A pidfd
does: it refers to one task for as long as it is open, and poll() on it
reports that task's exit (a thread pidfd, PIDFD_THREAD, that thread's exit).
The rule used throughout: a read of /proc/<n>/... made while a pidfd of n had
not yet reported an exit was a read of that pidfd's task, because the number
could not change hands in between.

Resolving a caller thread (caller_tgid, Process.owns):
  1. pidfd_open(tid, PIDFD_THREAD): pin whatever thread has the number now;
  2. read Tgid from /proc/<tid>/status;
  3. poll the pidfd: no exit yet means step 2 read that very thread.
A cache hit costs one non-blocking poll() of the pidfd: once the thread has
exited, its entry is dropped and the number resolved again.

Pinning a process (Process.of_pid): a pidfd of the thread-group leader, then
an O_DIRECTORY fd of /proc/<tgid>, then a poll of the pidfd (the same rule).
The directory fd keeps referring to that process: openat(dirfd, "maps") never
reaches a later process with the same number (it fails with ESRCH once the
process is gone).

fds are closed when the last reference to their holder goes (CPython frees at
once), never under a thread that is still using them: a closed number can be
reused by the next open(), and polling or openat()-ing a reused number would
ask about someone else.  Locks: _callers_lock, taken alone, only to add or
evict cache entries (hits take no lock).
"""
import ctypes
import errno
import itertools
import os
import resource
import select
import threading

from kvmfs.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)

PIDFD_THREAD = os.O_EXCL        # linux/pidfd.h: a pidfd of one thread, not of its process


class _iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_iovec), ctypes.c_ulong,
                                   ctypes.POINTER(_iovec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def _xfer(fn, pid, local_addr, remote_addr, size, op):
    if size == 0:
        return
    local = _iovec(local_addr, size)
    remote = _iovec(remote_addr, size)
    n = fn(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if n != size:
        raise KvmError(errno.EFAULT, op, f"cannot access {size} bytes at 0x{remote_addr:x} in pid {pid}")


def read(pid, addr, size, op="read caller memory"):
    """Bytes from the caller's address space; EFAULT when not readable."""
    buf = ctypes.create_string_buffer(size)
    _xfer(_libc.process_vm_readv, pid, ctypes.addressof(buf), addr, size, op)
    return buf.raw


def read_into(pid, addr, local_addr, size, op="read caller memory"):
    _xfer(_libc.process_vm_readv, pid, local_addr, addr, size, op)


def write(pid, addr, data, op="write caller memory"):
    """Write bytes (or a buffer at a local address) into the caller's memory."""
    if isinstance(data, (bytes, bytearray)):
        buf = ctypes.create_string_buffer(bytes(data), len(data))
        _xfer(_libc.process_vm_writev, pid, ctypes.addressof(buf), addr, len(data), op)
    else:
        local_addr, size = data
        _xfer(_libc.process_vm_writev, pid, local_addr, addr, size, op)


# --- fds that close when their last user lets go ---------------------------------------

class _Fd:
    """An fd closed when the object is freed (not before: see the module docstring)."""
    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, TypeError):   # TypeError: os already torn down at interpreter exit
            pass


class _Pidfd(_Fd):
    """A pidfd and a poll set holding only it."""
    __slots__ = ("_poll",)

    def __init__(self, fd):
        super().__init__(fd)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def exited(self):
        """Whether the task has exited: poll() with timeout 0, one system call."""
        try:
            return bool(self._poll.poll(0))
        except RuntimeError:          # another thread is inside poll() on the same set
            p = select.poll()
            p.register(self.fd, select.POLLIN)
            return bool(p.poll(0))


def _status_field(fd, key):
    """The numbers of the `key:` line of an open /proc status file, or None."""
    data = b""
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    for line in data.split(b"\n"):
        if line.startswith(key):
            return [int(x) for x in line.split()[1:]]
    return None


# --- caller threads -----------------------------------------------------------------------

class _Caller:
    """A thread seen making a request: its process and a pidfd that says when it exits.

    `owner` is the serial of the Process this thread was last shown to belong to
    (0: none yet); a thread never moves to another process, so the answer holds
    for as long as the pidfd reports no exit.
    """
    __slots__ = ("tgid", "pidfd", "owner")

    def __init__(self, tgid, pidfd):
        self.tgid = tgid
        self.pidfd = pidfd
        self.owner = 0


def _callers_max():
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft // 8))


CALLERS_MAX = _callers_max()     # one pidfd each; the oldest entry goes first
_callers = {}                    # tid -> _Caller
_callers_lock = threading.Lock()
_thread_pidfds = True            # False on kernels without PIDFD_THREAD (before 6.9): no cache


def _read_tgid(tid):
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        tgid = _status_field(fd, b"Tgid:")
    except OSError:
        return None
    finally:
        os.close(fd)
    return tgid[0] if tgid else None


def _resolve(tid):
    """A fresh _Caller for tid (cached when it could be pinned), or None: no such thread."""
    global _thread_pidfds
    with _callers_lock:
        _callers.pop(tid, None)
    if _thread_pidfds:
        try:
            pidfd = _Pidfd(os.pidfd_open(tid, PIDFD_THREAD))
        except OSError as e:
            if e.errno == errno.ESRCH:
                return None
            if e.errno == errno.EINVAL:
                _thread_pidfds = False
            pidfd = None        # EMFILE and the like: answer now, cache nothing
    else:
        pidfd = None
    tgid = _read_tgid(tid)
    if tgid is None:
        return None
    if pidfd is None:
        # Unpinned: right for the duration of a request (the calling thread is
        # waiting in it, so it holds its number), not beyond, hence not cached.
        return _Caller(tgid, None)
    if pidfd.exited():
        return None
    c = _Caller(tgid, pidfd)
    with _callers_lock:
        while len(_callers) >= CALLERS_MAX:
            del _callers[next(iter(_callers))]
        _callers[tid] = c
    return c


def _caller(tid):
    c = _callers.get(tid)
    if c is None or c.pidfd.exited():
        c = _resolve(tid)
    return c


def caller_tgid(tid):
    """The process (thread-group id) of the live thread tid, or None when there is none.

    Cached per thread and checked on each call with one poll() of the thread's
    pidfd, so a thread id reused by another process is resolved again, never
    answered from the cache.
    """
    c = _callers.get(tid)
    if c is None or c.pidfd.exited():
        c = _resolve(tid)
        if c is None:
            return None
    return c.tgid


def prune_callers():
    """Drop the cached threads that have exited (one poll() over all their pidfds), so
    the cache holds live callers only, not the last CALLERS_MAX ever seen."""
    with _callers_lock:
        entries = [(tid, c) for tid, c in _callers.items() if c.pidfd is not None]
    if not entries:
        return 0
    p = select.poll()
    by_fd = {}
    for tid, c in entries:
        by_fd[c.pidfd.fd] = (tid, c)
        p.register(c.pidfd.fd, select.POLLIN)
    gone = [by_fd[fd] for fd, _ in p.poll(0) if fd in by_fd]
    with _callers_lock:
        for tid, c in gone:
            if _callers.get(tid) is c:
                del _callers[tid]
    return len(gone)


def forget(tid):
    """Drop the cached answer for tid (its pidfd closes once no caller uses it)."""
    with _callers_lock:
        _callers.pop(tid, None)


def cached_callers():
    """How many threads are cached (each holds one pidfd)."""
    return len(_callers)


# --- processes ----------------------------------------------------------------------------

class Process:
    """A process pinned by a pidfd and a /proc/<tgid> directory fd.

    Attributes:
      tgid    its process id (the number, for messages and views only: never look
              it up again, use open_proc/open_fd)
      uid     its effective uid when pinned (the owner of the files it creates)
      serial  a number no other Process of this daemon ever has

    Lifetime:  PINNED --process exits--> GONE (alive() False, opens fail ESRCH)
               PINNED/GONE --close()--> CLOSED (alive() False, opens fail ESRCH)
    """
    _serials = itertools.count(1)

    def __init__(self, tgid, uid, pidfd, dirfd, memfd=None):
        self.tgid = tgid
        self.uid = uid
        self.serial = next(Process._serials)
        self._pidfd = pidfd
        self._dir = dirfd
        self._mem = memfd          # /proc/<tgid>/mem: bound to the address space it was opened on
        self._gone = False
        self._execed = False

    @classmethod
    def of_pid(cls, tgid, op="pin process"):
        """Pin the process that has id tgid now.

        ESRCH when there is none (or tgid is a thread that does not lead its
        process).
        """
        try:
            pidfd = _Pidfd(os.pidfd_open(tgid))
        except OSError as e:
            # ENOENT (EINVAL before Linux 6.9): tgid names a thread, not a process.
            raise KvmError(errno.ESRCH if e.errno in (errno.ENOENT, errno.EINVAL) else e.errno,
                           op, f"pid {tgid}: {e.strerror}", warn=False) from None
        try:
            dirfd = _Fd(os.open(f"/proc/{tgid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            fd = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd.fd)
            try:
                uids = _status_field(fd, b"Uid:")
            finally:
                os.close(fd)
        except OSError as e:
            raise KvmError(errno.ESRCH, op, f"pid {tgid}: {e.strerror}", warn=False) from None
        if pidfd.exited() or not uids:   # /proc/<tgid> may already have been someone else's
            raise KvmError(errno.ESRCH, op, f"pid {tgid} has exited", warn=False)
        try:
            memfd = _Fd(os.open("mem", os.O_RDONLY | os.O_CLOEXEC, dir_fd=dirfd.fd))
        except OSError:
            memfd = None               # not ours to read: exec goes unnoticed (owns())
        return cls(tgid, uids[1], pidfd, dirfd, memfd)

    @classmethod
    def of_caller(cls, tid, op="pin caller"):
        """Pin the process of the live thread tid (a request's caller); ESRCH if gone.

        The thread is polled again after the pin: still alive, so its process
        held its tgid throughout, and the pin is of that process.
        """
        c = _caller(tid)
        if c is not None:
            p = cls.of_pid(c.tgid, op)
            if c.pidfd is None or not c.pidfd.exited():
                c.owner = p.serial
                return p
            p.close()
        raise KvmError(errno.ESRCH, op, f"thread {tid} has exited", warn=False)

    def alive(self):
        """Whether the process still runs (a zombie does not): one poll() of its pidfd."""
        pidfd = self._pidfd
        if self._gone or pidfd is None:
            return False
        if pidfd.exited():
            self._gone = True
            return False
        return True

    def owns(self, tid):
        """Whether the thread tid is alive and belongs to this live process.

        Costs one poll() of the thread's pidfd when the thread was seen before
        (the VM/vCPU ioctl owner check), two the first time.
        """
        c = _callers.get(tid)
        if c is None or c.pidfd.exited():
            c = _resolve(tid)
            if c is None:
                return False
        if c.owner == self.serial:
            return not self.execed()
        # The thread was alive (polled above) with tgid; this process is alive
        # after that, so tgid was its number meanwhile: the thread is one of its.
        if c.tgid != self.tgid or not self.alive() or self.execed():
            return False
        c.owner = self.serial
        return True

    def execed(self):
        """Whether the process has left the address space it was pinned in (exec),
        as KVM's kvm->mm != current->mm: a read of the pinned mem file finds no
        address space any more (0 bytes) where a live one answers EIO at address 0."""
        mem = self._mem
        if self._execed or mem is None:
            return self._execed
        try:
            gone = os.pread(mem.fd, 1, 0) == b""
        except OSError:
            return False
        self._execed = gone and self.alive()
        return self._execed

    def open_fd(self, name, flags=os.O_RDONLY):
        """os.open() of a file under this process's /proc directory (e.g. "map_files/A-B").

        OSError(ESRCH) once the process has gone or the object is closed.
        """
        d = self._dir
        if d is None:
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH), name)
        return os.open(name, flags | os.O_CLOEXEC, dir_fd=d.fd)

    def open_proc(self, name, mode="r", **kw):
        """open() of a file under this process's /proc directory (e.g. "maps")."""
        d = self._dir
        if d is None:
            raise OSError(errno.ESRCH, os.strerror(errno.ESRCH), name)
        return open(name, mode, opener=lambda path, flags: os.open(path, flags | os.O_CLOEXEC,
                                                                   dir_fd=d.fd), **kw)

    def close(self):
        """Let go of the pidfd and the directory fd (closed once no thread uses them)."""
        self._pidfd = None
        self._dir = None
        self._mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._dir is None else "gone" if self._gone else "pinned"
        return f"<Process {self.tgid} uid {self.uid} {state}>"


# --- the old number-based helpers, until their callers move to the above ------------------

def tgid_of(tid):
    """caller_tgid(tid) (the old name)."""
    return caller_tgid(tid)


def recheck_tgid(tid):
    """Resolve tid again, bypassing the cache (the old name; caller_tgid is never stale)."""
    forget(tid)
    return caller_tgid(tid)


def process_start_time(pid):
    """Start time (clock ticks since boot) of pid, or None when it has exited.

    Deprecated: a number, looked up again later, can name another process; pin
    the process with Process.of_pid instead.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def alive(pid, start_time):
    """Deprecated: Process.alive()."""
    return start_time is not None and process_start_time(pid) == start_time


def owner_uid(pid):
    """Deprecated: Process.uid."""
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
