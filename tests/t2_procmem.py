"""t2: who is calling and whose memory a VM maps (procmem, hostmem), no FUSE.

Process and thread ids get reused; these tests make them be reused on purpose.
A fresh pid namespace (`unshare --pid --fork --mount-proc`, root only) has
small numbers and a writable /proc/sys/kernel/ns_last_pid, so the next fork
can be handed exactly the number of a process or thread that just went away.
The namespace scenarios are functions of this file (`_ns_*`), run as
`python t2_procmem.py NAME` inside the namespace; they print one JSON object.

Guest memory is a memfd mapped MAP_SHARED at a fixed address (HVA) in a child
playing the VMM, and read through a native MMU with one slot at gpa 0 over it,
the way vm.py's access_gpa does.
"""
import ctypes
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvmfs import hostmem, procmem  # noqa: E402
from kvmfs._kvmfs_native import ffi, lib  # noqa: E402
from kvmfs.errors import KvmError  # noqa: E402

HVA = 0x5A5A00000000
SIZE = 0x10000
MAP_SHARED, MAP_FIXED_NOREPLACE = 0x01, 0x100000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mmap.restype = ctypes.c_void_p

# What a child VMM runs after exec: the same address, another memfd (see test_exec_...).
EXEC_VMM = textwrap.dedent(f"""
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mmap.restype = ctypes.c_void_p
    fd = os.memfd_create("after-exec")
    os.ftruncate(fd, {SIZE})
    assert libc.mmap({HVA}, {SIZE}, 3, {MAP_SHARED | MAP_FIXED_NOREPLACE}, fd, 0) == {HVA}
    ctypes.memmove({HVA}, b"the program exec'd later", 24)
    os.read(int(sys.argv[1]), 1)
""")


# --- helpers --------------------------------------------------------------------------------

def map_guest_memory(name, text):
    """A memfd mapped MAP_SHARED at HVA in this process, starting with text."""
    fd = os.memfd_create(name)
    os.ftruncate(fd, SIZE)
    assert _libc.mmap(HVA, SIZE, 3, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0) == HVA
    os.close(fd)
    ctypes.memmove(HVA, text, len(text))


class Vmm:
    """A forked child with guest memory at HVA; it exits when told to (exit())."""

    def __init__(self, name, text):
        r, self._go = os.pipe()
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                map_guest_memory(name, text)
                os.write(ready_w, b"x")
                os.read(r, 1)
            finally:
                os._exit(0)
        os.close(r)
        os.close(ready_w)
        assert os.read(ready_r, 1) == b"x"
        os.close(ready_r)

    def exit(self):
        os.write(self._go, b"x")
        os.close(self._go)
        os.waitpid(self.pid, 0)


class Mmu:
    """A native MMU with one slot at gpa 0 over [HVA, HVA+SIZE)."""

    def __init__(self):
        self.mmu = lib.kvmfs_mmu_new()
        assert self.mmu != ffi.NULL
        assert lib.kvmfs_memslot_set(self.mmu, 0, 0, 0, 0, SIZE, HVA, ffi.NULL) >= 0

    def read(self, hm, n=64):
        """What gpa 0 reads through hm (bytes), as vm.py's access_gpa does."""
        buf = ffi.new("char[]", n)
        miss = ffi.new("uint64_t *")
        while True:
            got = lib.kvmfs_mmu_read_gpa(self.mmu, 0, 0, buf, n, miss)
            if got > 0:
                return ffi.buffer(buf, got)[:].rstrip(b"\0")
            assert got == 0 and miss[0], got
            hm.resolve(miss[0], "read guest memory")

    def free(self):
        lib.kvmfs_mmu_free(self.mmu)


def read_or_errno(mmu, hm):
    try:
        return mmu.read(hm).decode()
    except KvmError as e:
        return errno.errorcode[e.errno]


def next_pid_is(pid):
    """Make the next fork in this (private) pid namespace get pid."""
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(pid - 1))


def sleeper():
    pid = os.fork()
    if pid == 0:
        try:
            os.read(os.pipe()[0], 1)     # blocks until killed
        finally:
            os._exit(0)
    return pid


def sleeper_with_pid(pid):
    """A sleeping child with the given pid, once the kernel has freed the number
    (a thread's number is freed a little after join() returns); None if it never is."""
    for _ in range(1000):
        next_pid_is(pid)
        child = sleeper()
        if child == pid:
            return child
        reap(child)
        threading.Event().wait(0.002)
    return None


def wait_thread_gone(tid):
    """Until the kernel has let go of a joined thread (join() returns before it exits)."""
    while os.path.exists(f"/proc/self/task/{tid}"):
        threading.Event().wait(0.001)


def reap(pid):
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def in_pid_namespace(scenario):
    """Run _ns_<scenario> in a fresh pid namespace; its JSON result."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private pid namespace")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable,
                        os.path.abspath(__file__), scenario],
                       capture_output=True, text=True, timeout=60, env=env)
    if p.returncode != 0 and "unshare" in p.stderr and not p.stdout:
        pytest.skip(f"cannot make a pid namespace here: {p.stderr.strip()}")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.splitlines()[-1])


# --- pid reuse: a VM's memory stays its creator's --------------------------------------------

def _ns_memory_after_pid_reuse():
    creator = Vmm("creator", b"creator's memory")
    early, late = Mmu(), Mmu()
    hm_early = hostmem.HostMemory(early.mmu, creator.pid)     # resolves while the creator lives
    hm_late = hostmem.HostMemory(late.mmu, creator.pid)       # only after its pid is reused
    pinned = procmem.Process.of_pid(creator.pid) if hasattr(procmem, "Process") else None
    hm_pinned = hostmem.HostMemory(Mmu().mmu, pinned) if pinned else None
    before = early.read(hm_early).decode()
    creator.exit()
    next_pid_is(creator.pid)
    victim = Vmm("victim", b"another process's secret")
    out = {"reused": victim.pid == creator.pid, "before": before,
           "early": read_or_errno(early, hm_early), "late": read_or_errno(late, hm_late),
           "late_vma": repr(hm_late.find_vma(HVA)) if hasattr(hm_late, "find_vma") else None}
    if pinned:
        out["pinned_alive"] = pinned.alive()
        out["pinned_late"] = read_or_errno(Mmu(), hm_pinned)
    victim.exit()
    return out


def test_guest_memory_is_never_resolved_through_a_reused_pid():
    r = in_pid_namespace("_ns_memory_after_pid_reuse")
    assert r["reused"]
    assert r["before"] == r["early"] == "creator's memory"   # mapped while it lived: kept
    assert r["late"] == "EFAULT", "read the memory of the process that reused the pid"
    assert r["late_vma"] == "None"
    assert r["pinned_alive"] is False and r["pinned_late"] == "EFAULT"


def test_exec_unbinds_guest_memory():
    """After exec the creator's pid is the same but its address space is not: the
    new program's memory at the same address is not the VM's."""
    go_r, go_w = os.pipe()
    ready_r, ready_w = os.pipe()
    stop_r, stop_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            map_guest_memory("before-exec", b"the VM's memory")
            os.write(ready_w, b"x")
            os.read(go_r, 1)
            os.set_inheritable(stop_r, True)
            os.execv(sys.executable, [sys.executable, "-c", EXEC_VMM, str(stop_r)])
        finally:
            os._exit(1)
    for fd in (go_r, ready_w, stop_r):
        os.close(fd)
    mmu = Mmu()
    try:
        assert os.read(ready_r, 1) == b"x"
        hm = hostmem.HostMemory(mmu.mmu, pid)
        find_vma = getattr(hm, "find_vma", lambda hva: hostmem.find_vma(pid, hva))
        assert find_vma(HVA) is not None
        os.write(go_w, b"x")            # the child execs; wait for the new program's mapping
        for _ in range(2000):
            with open(f"/proc/{pid}/maps") as f:
                if any(line.startswith(f"{HVA:x}-") and "after-exec" in line for line in f):
                    break
            threading.Event().wait(0.005)
        else:
            pytest.fail("the exec'd child did not map its memory")
        assert read_or_errno(mmu, hm) == "EFAULT", "read the memory of the program exec'd later"
        assert find_vma(HVA) is None
        hm.close()
    finally:
        mmu.free()
        os.close(stop_w)
        reap(pid)
        for fd in (go_w, ready_r):
            os.close(fd)


# --- tid and pid reuse: the owner check -----------------------------------------------------

def _ns_thread_id_reuse():
    tids, go = [], threading.Event()

    def thread():
        tids.append(threading.get_native_id())
        go.wait()
    t = threading.Thread(target=thread)
    t.start()
    while not tids:
        threading.Event().wait(0.001)
    tid = tids[0]
    me = os.getpid()
    out = {"before": procmem.tgid_of(tid) == me}
    if hasattr(procmem, "Process"):
        owner = procmem.Process.of_pid(me)
        out["owns_before"] = owner.owns(tid)
    go.set()
    t.join()
    wait_thread_gone(tid)
    other = sleeper_with_pid(tid)
    out["reused"] = other == tid
    if other is None:
        return out
    out["tgid_of"] = procmem.tgid_of(tid)       # the old name; same cache
    out["expected"] = other
    if hasattr(procmem, "Process"):
        out["caller_tgid"] = procmem.caller_tgid(tid)
        out["owns_after"] = owner.owns(tid)
    reap(other)
    return out


def test_a_reused_thread_id_is_not_taken_for_the_dead_threads_process():
    r = in_pid_namespace("_ns_thread_id_reuse")
    assert r["reused"] and r["before"], r
    assert r["tgid_of"] == r["expected"], "answered from a cache entry of a dead thread"
    assert r["owns_before"]
    assert r["caller_tgid"] == r["expected"] and r["owns_after"] is False


def _ns_owner_pid_reuse():
    creator = Vmm("creator", b"x")
    owner = procmem.Process.of_pid(creator.pid)
    out = {"owns_creator": owner.owns(creator.pid)}
    creator.exit()
    other = sleeper_with_pid(creator.pid)
    out.update(reused=other == creator.pid, alive=owner.alive(), owns_other=owner.owns(other),
               tgid=procmem.caller_tgid(other) == owner.tgid)
    try:
        owner.open_fd("maps")
        out["open"] = "opened"
    except OSError as e:
        out["open"] = errno.errorcode[e.errno]
    again = procmem.Process.of_pid(other)
    out.update(new_serial=again.serial != owner.serial, new_owns=again.owns(other))
    reap(other)
    return out


def test_a_process_reusing_the_owners_pid_does_not_own_its_vm():
    r = in_pid_namespace("_ns_owner_pid_reuse")
    assert r["owns_creator"] and r["reused"] and r["tgid"]    # same number, same tgid...
    assert r["alive"] is False and r["owns_other"] is False     # ...but not the owner
    assert r["open"] == "ESRCH"
    assert r["new_serial"] and r["new_owns"]


# --- Process and caller_tgid ------------------------------------------------------------------

def test_process_of_own_pid():
    with procmem.Process.of_pid(os.getpid()) as p:
        assert p.tgid == os.getpid() and p.uid == os.geteuid() and p.alive()
        with p.open_proc("status") as f:
            assert f"Pid:\t{os.getpid()}\n" in f.read()
        fd = p.open_fd("maps")
        os.close(fd)
        assert p.owns(threading.get_native_id())
        assert p.owns(os.getpid())
    assert not p.alive() and "closed" in repr(p)
    with pytest.raises(OSError) as e:
        p.open_proc("status")
    assert e.value.errno == errno.ESRCH


def test_process_of_gone_or_non_leader_is_esrch():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(KvmError) as e:
        procmem.Process.of_pid(pid)
    assert e.value.errno == errno.ESRCH
    tid, go = [], threading.Event()
    t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), go.wait()))
    t.start()
    while not tid:
        threading.Event().wait(0.001)
    try:
        with pytest.raises(KvmError) as e:
            procmem.Process.of_pid(tid[0])       # a thread, not a process
        assert e.value.errno == errno.ESRCH
        with procmem.Process.of_caller(tid[0]) as p:
            assert p.tgid == os.getpid() and p.owns(tid[0])
    finally:
        go.set()
        t.join()
    wait_thread_gone(tid[0])
    with pytest.raises(KvmError) as e:
        procmem.Process.of_caller(tid[0])
    assert e.value.errno == errno.ESRCH


def test_a_zombie_is_not_alive():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    p = procmem.Process.of_pid(pid)
    assert p.alive() and p.owns(pid)
    os.close(w)
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # exited, not reaped yet
    assert not p.alive() and not p.owns(pid)
    os.waitpid(pid, 0)
    assert not p.alive()
    p.close()


def test_caller_tgid_of_threads():
    assert procmem.caller_tgid(os.getpid()) == os.getpid()
    tid, go = [], threading.Event()
    t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), go.wait()))
    t.start()
    while not tid:
        threading.Event().wait(0.001)
    assert procmem.caller_tgid(tid[0]) == os.getpid()
    assert procmem.caller_tgid(tid[0]) == os.getpid()         # a hit
    go.set()
    t.join()
    wait_thread_gone(tid[0])
    # Gone: the entry is dropped, not answered (unless the number went to a new thread).
    assert procmem.caller_tgid(tid[0]) in (None, procmem._read_tgid(tid[0]))
    assert procmem.caller_tgid(2 ** 22 + 12345) is None       # above any pid_max


def test_concurrent_checks_of_one_thread_and_process():
    """Many daemon threads polling the same pidfds at once (poll sets are not shared)."""
    p = procmem.Process.of_pid(os.getpid())
    tid = threading.get_native_id()
    errors = []

    def hammer():
        try:
            for _ in range(3000):
                assert p.alive() and p.owns(tid) and procmem.caller_tgid(tid) == os.getpid()
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(e)
    ts = [threading.Thread(target=hammer) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    p.close()
    assert not errors


# --- no leaks ----------------------------------------------------------------------------------

def _guest_mappings_in_daemon():
    with open("/proc/self/maps") as f:
        return sum("memfd:kvmfs-guest" in line or "memfd:leak-check" in line for line in f)


def test_vm_lifetimes_leak_no_fds_and_no_mappings():
    vmm = Vmm("leak-check", b"guest")
    before_fds, before_maps = open_fds(), _guest_mappings_in_daemon()
    for i in range(300):
        mmu = Mmu()
        owner = procmem.Process.of_pid(vmm.pid) if i % 2 else vmm.pid  # both forms
        hm = hostmem.HostMemory(mmu.mmu, owner)
        assert mmu.read(hm) == b"guest"
        hm.allocate(0x2000)
        mmu.free()
        hm.close()
        if i % 2:
            owner.close()
        assert not hm.maps
    after_fds, after_maps = open_fds(), _guest_mappings_in_daemon()
    vmm.exit()
    assert after_fds == before_fds
    assert after_maps == before_maps


def test_invalidate_unmaps():
    vmm = Vmm("leak-check", b"guest")
    mmu = Mmu()
    hm = hostmem.HostMemory(mmu.mmu, vmm.pid)
    try:
        before = _guest_mappings_in_daemon()
        assert mmu.read(hm) == b"guest" and _guest_mappings_in_daemon() == before + 1
        hm.invalidate(HVA, SIZE)
        assert _guest_mappings_in_daemon() == before and not hm.maps
        assert mmu.read(hm) == b"guest"                      # resolved again
    finally:
        mmu.free()
        hm.close()
        vmm.exit()


def test_the_caller_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(procmem, "CALLERS_MAX", 8)
    for tid in list(procmem._callers):
        procmem.forget(tid)
    before = open_fds()
    for _ in range(30):
        t = threading.Thread(target=lambda: procmem.caller_tgid(threading.get_native_id()))
        t.start()
        t.join()
    assert procmem.cached_callers() <= 8
    assert open_fds() <= before + 8
    for tid in list(procmem._callers):
        procmem.forget(tid)
    assert open_fds() == before


if __name__ == "__main__":
    print(json.dumps(globals()[sys.argv[1]]()))


def test_exited_callers_leave_the_cache():
    """The caller cache holds live threads only once pruned (the reaper prunes it every
    second), not the last CALLERS_MAX threads ever seen."""
    pids = []
    for _ in range(5):
        pid = os.fork()
        if pid == 0:
            time.sleep(10)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        assert procmem.caller_tgid(pid) == pid
    assert all(pid in procmem._callers for pid in pids)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert procmem.prune_callers() >= len(pids)
    assert not any(pid in procmem._callers for pid in pids)
