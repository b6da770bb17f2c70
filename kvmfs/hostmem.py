"""Guest memory is the VMM's memory: find what backs a VMM address and map it here.

As KVM walks the VMAs of `kvm->mm`, the daemon reads the VM creator's maps,
finds the mapping that holds an hva, opens the very file behind it
(map_files/START-END), checks that its device and inode are the ones the maps
line names, and maps the same pages MAP_SHARED into the daemon.  The native MMU
then reaches guest memory through that mapping: what the VMM writes the guest
sees at once, and the reverse.  Memory that cannot be shared this way (private
anonymous, private file mappings) or that is not mapped at all resolves to an
error that the caller turns into EFAULT with a hint.

Bound to one address space for the VM's life, as kvm->mm is:
  - everything is opened relative to the creator's pinned /proc directory
    (procmem.Process), never through its pid number, which a later process
    can get;
  - the maps file is opened once, when the HostMemory is made, and re-read
    from its start on each lookup: an open maps file keeps walking the address
    space it was opened on (after an exec it reads as empty, after an exit it
    fails), so a lookup never reads another address space's layout;
  - map_files/ is looked up in the creator's current address space, and the
    file it gives is used only when its device and inode are those of the
    pinned maps line: the same object, mapped at the pinned mapping's offset.
Once the creator has exited (or exec'd), ranges not resolved yet fail with
EFAULT, logged once; ranges already mapped stay mapped (they are the VMM's own
shared memory, which the VM was given).

Owns: the daemon's mappings of VMM memory for one VM (one per VMA resolved),
mapped and unmapped here with mmap(2)/munmap(2), and the open maps file.
Must not touch: memslots (mmu.c owns them).
Locks: HostMemory.lock (resolve, invalidate, close), then _maps_lock (the maps
file's read position); find_vma takes _maps_lock alone.
"""
import ctypes
import errno
import logging
import mmap
import os
import threading
import time
from dataclasses import dataclass

from kvmfs import _native as native, procmem
from kvmfs.errors import KvmError

log = logging.getLogger("kvmfs.hostmem")

HINT = ("allocate guest memory the daemon can share: memfd_create() + mmap(MAP_SHARED) "
        "(kvmfs.client.alloc_guest_memory(), kvmfs_alloc_guest_memory() in kvmfs.h), "
        "or a MAP_SHARED tmpfs/regular file")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.munmap.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
RETRY_PAUSE = 0.0002      # between lookups racing an MMU-notifier invalidation


def _mmap_shared(fd, size, offset):
    """A MAP_SHARED read/write mapping of fd; its address (unmapped with _munmap only)."""
    addr = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, offset)
    if addr == _MAP_FAILED or addr is None:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return addr


def _munmap(addr, size):
    if _libc.munmap(addr, size) != 0:
        e = ctypes.get_errno()
        log.error("munmap 0x%x+0x%x: %s", addr, size, os.strerror(e))


@dataclass
class Vma:
    start: int
    end: int
    perms: str
    offset: int
    dev: tuple
    inode: int
    path: str


def parse_maps_line(line):
    parts = line.split(None, 5)
    start, end = (int(x, 16) for x in parts[0].split("-"))
    major, minor = (int(x, 16) for x in parts[3].split(":"))
    path = parts[5].rstrip("\n") if len(parts) > 5 else ""
    return Vma(start, end, parts[1], int(parts[2], 16), (major, minor), int(parts[4]), path)


def _scan(lines, hva):
    """(the Vma of lines holding hva or None, whether there was any line at all)."""
    seen = False
    for line in lines:
        seen = True
        dash = line.index("-")
        start = int(line[:dash], 16)
        if start > hva:
            return None, True
        end = int(line[dash + 1:line.index(" ")], 16)
        if hva < end:
            return parse_maps_line(line), True
    return None, seen


def find_vma(pid, hva):
    """The mapping of whatever process has id pid now that contains hva, or None.

    Deprecated (the number may be another process's by now): HostMemory.find_vma.
    """
    try:
        with open(f"/proc/{pid}/maps", errors="surrogateescape") as f:
            return _scan(f, hva)[0]
    except (OSError, ValueError):
        return None


class HostMemory:
    """The daemon's mappings of one VM creator's memory.

    Attributes:
      process    the creator (procmem.Process), or None when it had gone already
      pid        its process id, for messages
      maps       VMM hva start -> (daemon address, size) of every mapping made here
      allocated  the starts of the ranges kvmfs allocated itself (keys of maps)
    """

    def __init__(self, mmu, process):
        """mmu: the VM's native MMU; process: its creator, a procmem.Process that
        the caller keeps and closes (or, the older form, a pid: pinned here, now,
        and let go of by close())."""
        self.mmu = mmu
        self._own_process = not isinstance(process, procmem.Process)
        if self._own_process:
            self.pid = process
            try:
                process = procmem.Process.of_pid(process, "pin VM creator")
            except KvmError as e:
                log.info("%s: guest memory cannot be resolved", e)
                process = None
        else:
            self.pid = process.tgid
        self.process = process
        self.maps = {}
        self.allocated = set()
        self.lock = threading.Lock()       # vCPUs missing the same range resolve it once
        self._maps_lock = threading.Lock()
        self._maps = None
        self._gone_logged = False
        self._closed = False
        if process is not None:
            try:
                self._maps = process.open_proc("maps", errors="surrogateescape")
            except OSError as e:
                log.info("pid %d: cannot open its maps (%s); guest memory cannot be resolved",
                         self.pid, e.strerror)

    # --- looking up the creator's mappings -----------------------------------------------
    def find_vma(self, hva):
        """The creator's mapping that contains hva, or None (not mapped, or creator gone)."""
        return self._find(hva)[0]

    def _find(self, hva):
        """(Vma or None, whether the creator's address space is still there)."""
        with self._maps_lock:
            f = self._maps
            if f is None:
                return None, False
            try:
                f.seek(0)
                return _scan(f, hva)
            except (OSError, ValueError):  # ESRCH: the creator exited
                return None, False

    def _gone(self, what, hva):
        if self.process is not None and self.process.alive():
            why = f"creator pid {self.pid} has replaced its address space (exec)"
        else:
            why = f"creator pid {self.pid} has exited"
        if not self._gone_logged:
            self._gone_logged = True
            log.warning("%s: %s; guest memory it had not shared yet cannot be reached", what, why)
        return KvmError(errno.EFAULT, what, f"VMM address 0x{hva:x}: {why}", warn=False)

    # --- resolving --------------------------------------------------------------------------
    def resolve(self, hva, what):
        """Map the VMA holding hva and register it with the MMU.

        Raises KvmError(EFAULT) with a log line saying why and how to fix it.
        """
        with self.lock:
            seq = native.invalidate_seq(self.mmu)      # before the maps are read
            try:
                done = self._resolve(hva, what, seq)
            except KvmError:
                # what refused it (unmapped, private, read-only) may be the VMM's
                # change in progress: only an answer no invalidation overlapped counts
                if not native.invalidate_retry(self.mmu, seq, hva, hva + 1):
                    raise
                done = False
        if not done:
            time.sleep(RETRY_PAUSE)     # the VMM is changing this range: let it finish

    def _resolve(self, hva, what, seq):
        """True once hva is registered; False when an MMU-notifier invalidation made
        what was looked up at seq stale (the caller retries, as KVM's fault path does)."""
        if self._closed:
            raise KvmError(errno.EFAULT, what, f"VMM address 0x{hva:x}: the VM is gone", warn=False)
        if any(s <= hva < s + sz for s, (_, sz) in self.maps.items()):
            return True                 # another vCPU resolved it since this one missed
        vma, mm_there = self._find(hva)
        if not mm_there:
            raise self._gone(what, hva)
        if vma is None:
            raise KvmError(errno.EFAULT, what, f"VMM address 0x{hva:x} is not mapped in pid {self.pid}")
        if vma.perms[3] != "s" or vma.inode == 0:
            kind = "private anonymous" if vma.inode == 0 else f"a private mapping of {vma.path}"
            raise KvmError(errno.EFAULT, what,
                           f"VMM address 0x{hva:x} is {kind} memory the daemon cannot share; {HINT}")
        # Only the part of the VMA no registered range covers: a VMA the VMM split
        # (mprotect) and merged again is partly registered already.
        lo = max([vma.start] + [s + sz for s, (_, sz) in self.maps.items() if s + sz <= hva])
        hi = min([vma.end] + [s for s in self.maps if s > hva])
        size = hi - lo
        readonly = vma.perms[1] != "w"          # reads work, guest writes EFAULT (mmu.c)
        addr = self._map(vma, lo, size, what)
        # SAFETY: C keeps this daemon address until hostmem_remove hands it back
        # (invalidate) or the MMU is freed; it is unmapped only after either.
        try:
            native.hostmem_add(self.mmu, lo, size, native.cast("void *", addr), what, seq,
                               native.HOSTMEM_READONLY if readonly else 0)
        except KvmError as e:
            _munmap(addr, size)
            if e.errno == errno.EAGAIN:
                return False
            raise KvmError(errno.EFAULT if e.errno == errno.EEXIST else e.errno, what,
                           f"cannot register host memory 0x{lo:x}+0x{size:x}: "
                           f"{os.strerror(e.errno)}") from None
        self.maps[lo] = (addr, size)
        log.debug("pid %d: mapped %s 0x%x-0x%x%s", self.pid, vma.path, lo, hi,
                  " (read-only)" if readonly else "")
        return True

    def _map(self, vma, lo, size, what):
        """The daemon's read/write mapping of [lo, lo+size) of vma's file (read/write
        even where the VMM's is read-only: C refuses the guest's writes there)."""
        try:
            fd = self.process.open_fd(f"map_files/{vma.start:x}-{vma.end:x}", os.O_RDWR)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise self._gone(what, vma.start) from None
            raise KvmError(errno.EFAULT, what,
                           f"cannot open the file behind 0x{vma.start:x}: {e}; {HINT}") from None
        try:
            st = os.fstat(fd)
            if (os.major(st.st_dev), os.minor(st.st_dev)) != vma.dev or st.st_ino != vma.inode:
                raise KvmError(errno.EFAULT, what, f"mapping at 0x{vma.start:x} changed while resolving it")
            return _mmap_shared(fd, size, vma.offset + (lo - vma.start))
        except OSError as e:
            raise KvmError(errno.EFAULT, what, f"cannot map the file behind 0x{vma.start:x}: {e}") from None
        finally:
            os.close(fd)

    # --- memory kvmfs allocates ------------------------------------------------------------
    def allocate(self, size):
        """Guest memory kvmfs allocates itself (for shell users): a daemon memfd.

        Its "VMM address" is the daemon's own mapping, registered at once, so it
        never needs resolving through /proc.
        """
        fd = os.memfd_create("kvmfs-guest", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            addr = _mmap_shared(fd, size, 0)
        except OSError as e:
            raise KvmError(e.errno, "allocate guest memory", f"{size} bytes") from None
        finally:
            os.close(fd)
        # SAFETY: as in _resolve, the mapping outlives its registration.
        try:
            native.hostmem_add(self.mmu, addr, size, native.cast("void *", addr), "allocate guest memory",
                               native.invalidate_seq(self.mmu))
        except KvmError:
            _munmap(addr, size)
            raise
        with self.lock:
            self.maps[addr] = (addr, size)
            self.allocated.add(addr)
        return addr

    def allocated_by_kvmfs(self, hva):
        return any(s <= hva < s + self.maps[s][1] for s in list(self.allocated) if s in self.maps)

    # --- letting go --------------------------------------------------------------------------
    def invalidate(self, hva, size):
        """A whole MMU-notifier invalidation of [hva, hva+size) (begin, then end);
        returns how many sptes were zapped."""
        zapped = self.invalidate_begin(hva, hva + size)
        self.invalidate_end()
        return zapped

    def invalidate_begin(self, start, end):
        """invalidate_range_start: from now until invalidate_end no fault installs a
        mapping of [start, end); what maps it now is zapped (every vCPU's TLB
        flushed) and unmapped.  Returns how many sptes were zapped."""
        native.invalidate_begin(self.mmu, start, end)
        with self.lock:
            _, zapped = native.hostmem_remove(self.mmu, start, end - start)
            for s in [s for s, (_, sz) in self.maps.items() if s < end and start < s + sz]:
                _munmap(*self.maps.pop(s))
                self.allocated.discard(s)
        return zapped

    def invalidate_end(self):
        """invalidate_range_end: faults that looked the range up before now retry."""
        native.invalidate_end(self.mmu)

    def close(self):
        """Unmap everything and let go of the creator (after the MMU is freed or
        no longer reaches these mappings)."""
        with self.lock:
            self._closed = True
            for addr, size in self.maps.values():
                _munmap(addr, size)
            self.maps.clear()
            self.allocated.clear()
            with self._maps_lock:
                if self._maps is not None:
                    self._maps.close()
                    self._maps = None
            if self._own_process and self.process is not None:
                self.process.close()
