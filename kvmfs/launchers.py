"""kvmfs's own ioctls, for the launchers of `kvmfs run` (abi.py: KVMFS_*).

KVMFS_ACT_FOR: the seccomp supervisor makes KVM_CREATE_VM and KVM_CREATE_VCPU
for the program it watches, which cannot be done as the program (the kernel
gives the supervisor no way to run an ioctl in the program).  After it, the open
file's requests act for the thread's process: the VM belongs to it, as if it
had made the call.  Allowed to root, and to a same-user ancestor of the thread:
both could ptrace the thread and make the call inside it anyway, so nothing is
granted that was not theirs.

KVMFS_MMU_NOTIFY: MMU-notifier calls from inside the VMM (the preload library
wraps munmap, mremap, mmap(MAP_FIXED), mprotect, madvise and hole punches of
registered ranges).  As Linux's notifiers are per mm, a call applies to every
VM the calling process owns.  A START stays open on the file that sent it until
its END; a file closed with STARTs open ends them (a VMM that dies in between
does not leave the range blocked).

Locks: Invalidations.lock, a leaf (VM and MMU locks are taken outside it).
"""
import collections
import errno
import logging
import threading
import time

from kvmfs import abi, procmem
from kvmfs.caller import Caller
from kvmfs.errors import KvmError, check

log = logging.getLogger("kvmfs.launchers")

EVENTS_KEPT = 256          # per VM, for info/notifier


# --- KVMFS_ACT_FOR ----------------------------------------------------------------------
def _status(pid):
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return fields


def act_for(ctx, data):
    """The Caller that requests on this file act for (KVMFS_ACT_FOR's argument)."""
    op = "KVMFS_ACT_FOR"
    req = abi.kvmfs_act_for.from_address(data)
    check(req.flags == 0, errno.EINVAL, op, f"flags 0x{req.flags:x}")
    tid = req.tid
    tgid = procmem.caller_tgid(tid) if tid > 0 else None
    if tgid is None:
        raise KvmError(errno.ESRCH, op, f"no thread {tid}")
    try:
        st = _status(tid)
        uids = {int(x) for x in st["Uid"]}
        gids = {int(x) for x in st["Gid"]}
    except (OSError, KeyError, ValueError):
        raise KvmError(errno.ESRCH, op, f"thread {tid} is gone") from None
    why = _why_not(ctx, tgid, uids)
    if why:
        raise KvmError(errno.EPERM, op, why)
    log.debug("pid %d acts for thread %d (pid %d)", ctx.tgid, tid, tgid)
    return Caller(tid, min(uids), min(gids), tgid=tgid, interrupted=ctx.interrupted)


def _why_not(ctx, tgid, uids):
    """Why ctx may not act for process tgid (whose uids are `uids`), or None."""
    if ctx.uid == 0:
        return None
    if uids != {ctx.uid}:
        return f"pid {tgid} does not run as uid {ctx.uid} alone"
    if not _is_ancestor(ctx.tgid, tgid):
        return f"pid {ctx.tgid} is not an ancestor of pid {tgid}"
    return None


def may_act_for(ctx, tgid):
    """Whether ctx could act for process tgid (KVMFS_ACT_FOR's rule)."""
    try:
        uids = {int(x) for x in _status(tgid)["Uid"]}
    except (OSError, KeyError, ValueError):
        return False
    return _why_not(ctx, tgid, uids) is None


def _is_ancestor(anc, pid):
    for _ in range(4096):
        if pid == anc:
            return True
        if pid <= 1:
            return False
        try:
            pid = int(_status(pid)["PPid"][0])
        except (OSError, KeyError, ValueError, IndexError):
            return False
    return False


# --- KVMFS_MMU_NOTIFY -------------------------------------------------------------------
class Invalidations:
    """The STARTs an open file has sent and not ended: [(vm, start, end)]."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = []

    def notify(self, system, ctx, data):
        op = "KVMFS_MMU_NOTIFY"
        req = abi.kvmfs_mmu_notify.from_address(data)
        start, end = req.start, req.end
        check(start < end and not (start | end) & (abi.PAGE_SIZE - 1), errno.EINVAL, op,
              f"range 0x{start:x}-0x{end:x}")
        check(req.event in (abi.KVMFS_MMU_EVENT_UNMAP, abi.KVMFS_MMU_EVENT_CLEAR,
                            abi.KVMFS_MMU_EVENT_PROTECTION_VMA), errno.EINVAL, op,
              f"event {req.event}")
        if req.phase == abi.KVMFS_NOTIFY_START:
            for vm in system.vms_owned_by(ctx):
                if not vm.hold():
                    continue
                vm.mmu_invalidate_begin(start, end, req.event, req.cause)
                with self.lock:
                    self.open.append((vm, start, end))
            return 0
        check(req.phase == abi.KVMFS_NOTIFY_END, errno.EINVAL, op, f"phase {req.phase}")
        with self.lock:
            mine = [e for e in self.open if e[1] == start and e[2] == end]
            for e in mine:
                self.open.remove(e)
        for vm, _, _ in mine:
            vm.mmu_invalidate_end()
            vm.unhold()
        return 0

    def release(self):
        with self.lock:
            left, self.open = self.open, []
        for vm, start, end in left:
            log.warning("vm%d: invalidation of 0x%x-0x%x never ended (its file was closed); "
                        "ending it", vm.id, start, end)
            vm.mmu_invalidate_end()
            vm.unhold()


class NotifierLog:
    """A VM's last EVENTS_KEPT invalidations, for MNT/vmN/info/notifier."""

    EVENT_NAMES = {abi.KVMFS_MMU_EVENT_UNMAP: "unmap", abi.KVMFS_MMU_EVENT_CLEAR: "clear",
                   abi.KVMFS_MMU_EVENT_PROTECTION_VMA: "protection_vma"}

    def __init__(self):
        self.events = collections.deque(maxlen=EVENTS_KEPT)
        self.count = 0

    def add(self, start, end, event, cause, zapped):
        self.count += 1
        self.events.append((self.count, time.monotonic(), start, end, event, cause, zapped))

    def render(self):
        lines = ["seq start end event cause sptes_zapped"]
        for seq, _, start, end, event, cause, zapped in list(self.events):
            lines.append(f"{seq} 0x{start:x} 0x{end:x} {self.EVENT_NAMES.get(event, event)} "
                         f"{abi.KVMFS_CAUSES.get(cause, cause or '-')} {zapped}")
        return "\n".join(lines) + "\n"



