"""Access to a client process's memory and identity, as KVM has through `current`.

FUSE gives the daemon the calling thread's id; pointers inside ioctl structs
(dirty bitmaps, cpuid and msr arrays) are followed here with
process_vm_readv/process_vm_writev on that thread.
"""
import ctypes
import errno
import os

from kvmfs.errors import KvmError

_libc = ctypes.CDLL(None, use_errno=True)


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


_tgids = {}


def tgid_of(tid):
    """The process (thread group) a FUSE request's thread belongs to."""
    tgid = _tgids.get(tid)
    if tgid is None:
        tgid = _read_tgid(tid)
        if tgid is not None and len(_tgids) < 65536:
            _tgids[tid] = tgid
    return tgid


def _read_tgid(tid):
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def forget(tid):
    _tgids.pop(tid, None)


def recheck_tgid(tid):
    """Re-read a thread's process after a cached answer failed a check (ids get reused)."""
    _tgids.pop(tid, None)
    return tgid_of(tid)


def process_start_time(pid):
    """Start time (clock ticks since boot) of pid, or None when it has exited: tells a
    live process from a later one that reused its pid."""
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
    return start_time is not None and process_start_time(pid) == start_time


def owner_uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
