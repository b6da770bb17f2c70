"""Guest memory is the VMM's memory: find what backs a VMM address and map it here.

As KVM walks the VMAs of `current->mm`, the daemon reads the VM owner's
/proc/PID/maps, finds the mapping that holds an hva, opens the very file behind
it (/proc/PID/map_files/START-END), checks that its device and inode are the
ones the maps line names, and maps the same pages MAP_SHARED into the daemon.
The native MMU then reaches guest memory through that mapping: what the VMM
writes the guest sees at once, and the reverse.  Memory that cannot be shared
this way (private anonymous, private file mappings) or that is not mapped at all
resolves to an error that the caller turns into EFAULT with a hint.

Owns: the daemon's mappings of VMM memory for one VM (one per VMA resolved).
Must not touch: memslots (mmu.c owns them).
"""
import errno
import logging
import mmap
import os
import threading
from dataclasses import dataclass

from kvmfs._native import ffi, lib
from kvmfs.errors import KvmError

log = logging.getLogger("kvmfs.hostmem")

HINT = ("allocate guest memory the daemon can share: memfd_create() + mmap(MAP_SHARED) "
        "(kvmfs.client.alloc_guest_memory(), kvmfs_alloc_guest_memory() in kvmfs.h), "
        "or a MAP_SHARED tmpfs/regular file")


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


def find_vma(pid, hva):
    """The mapping of pid that contains hva, or None."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                dash = line.index("-")
                start = int(line[:dash], 16)
                if start > hva:
                    return None
                end = int(line[dash + 1:line.index(" ")], 16)
                if hva < end:
                    return parse_maps_line(line)
    except (OSError, ValueError):
        return None
    return None


class HostMemory:
    """The daemon's mappings of one VM owner's memory."""

    def __init__(self, mmu, pid):
        self.mmu = mmu
        self.pid = pid
        self.maps = {}          # hva start -> (mmap object, size)
        self.allocated = set()  # starts of the ranges kvmfs allocated itself
        self.lock = threading.Lock()  # vCPUs missing the same range resolve it once

    def resolve(self, hva, what):
        """Map the VMA holding hva and register it with the MMU.

        Raises KvmError(EFAULT) with a log line saying why and how to fix it.
        """
        with self.lock:
            self._resolve(hva, what)

    def _resolve(self, hva, what):
        vma = find_vma(self.pid, hva)
        if vma is None:
            raise KvmError(errno.EFAULT, what, f"VMM address 0x{hva:x} is not mapped in pid {self.pid}")
        if vma.perms[3] != "s" or vma.inode == 0:
            kind = "private anonymous" if vma.inode == 0 else f"a private mapping of {vma.path}"
            raise KvmError(errno.EFAULT, what,
                           f"VMM address 0x{hva:x} is {kind} memory the daemon cannot share; {HINT}")
        if vma.perms[1] != "w":
            raise KvmError(errno.EFAULT, what,
                           f"VMM address 0x{hva:x} is mapped read-only; guest memory must be writable")
        mapping = self._map(vma, what)
        size = vma.end - vma.start
        rc = lib.kvmfs_hostmem_add(self.mmu, vma.start, size, ffi.from_buffer(mapping))
        if rc == -errno.EEXIST:         # another thread resolved it first
            mapping.close()
            return
        if rc < 0:
            mapping.close()
            raise KvmError(-rc, what, f"cannot register host memory 0x{vma.start:x}+0x{size:x}")
        self.maps[vma.start] = (mapping, size)
        log.debug("pid %d: mapped %s 0x%x-0x%x", self.pid, vma.path, vma.start, vma.end)

    def _map(self, vma, what):
        try:
            fd = os.open(f"/proc/{self.pid}/map_files/{vma.start:x}-{vma.end:x}", os.O_RDWR)
        except OSError as e:
            raise KvmError(errno.EFAULT, what, f"cannot open the file behind 0x{vma.start:x}: {e}; {HINT}")
        try:
            st = os.fstat(fd)
            if (os.major(st.st_dev), os.minor(st.st_dev)) != vma.dev or st.st_ino != vma.inode:
                raise KvmError(errno.EFAULT, what, f"mapping at 0x{vma.start:x} changed while resolving it")
            return mmap.mmap(fd, vma.end - vma.start, mmap.MAP_SHARED,
                             mmap.PROT_READ | mmap.PROT_WRITE, offset=vma.offset)
        except (OSError, ValueError) as e:
            raise KvmError(errno.EFAULT, what, f"cannot map the file behind 0x{vma.start:x}: {e}")
        finally:
            os.close(fd)

    def allocate(self, size):
        """Guest memory kvmfs allocates itself (for shell users): a daemon memfd.

        Its "VMM address" is the daemon's own mapping, registered at once, so it
        never needs resolving through /proc.
        """
        fd = os.memfd_create("kvmfs-guest", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        ptr = ffi.from_buffer(mapping)
        addr = int(ffi.cast("uintptr_t", ptr))
        rc = lib.kvmfs_hostmem_add(self.mmu, addr, size, ptr)
        if rc < 0:
            del ptr
            mapping.close()
            raise KvmError(-rc, "allocate guest memory", f"{size} bytes")
        self.maps[addr] = (mapping, size)
        self.allocated.add(addr)
        return addr

    def allocated_by_kvmfs(self, hva):
        return any(s <= hva < s + self.maps[s][1] for s in self.allocated if s in self.maps)

    def invalidate(self, hva, size):
        """MMU-notifier invalidation: zap and unmap what lies in [hva, hva+size)."""
        ptrs = ffi.new("void *[]", 64)
        sizes = ffi.new("uint64_t[]", 64)
        while True:
            n = lib.kvmfs_hostmem_remove(self.mmu, hva, size, ptrs, sizes, 64)
            if n < 0:
                raise KvmError(-n, "invalidate", f"0x{hva:x}+0x{size:x}")
            for start in [s for s, (_, sz) in self.maps.items() if s < hva + size and hva < s + sz]:
                self.maps.pop(start)[0].close()
            if n < 64:
                return

    def close(self):
        for mapping, _ in self.maps.values():
            try:
                mapping.close()
            except BufferError:
                pass
        self.maps.clear()
