"""Hostile and racing clients on a mount: no crash, no leak of another's memory, no lost signal.

Each test names the defect it guards against; after each, the daemon must still
answer (the `mounted` fixture's daemon is shared, so a crash fails the rest too).
"""
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import conftest
import guestcases
from guests import spinning_vcpu
from kvmfs import abi
from kvmfs.client import Kvm, alloc_guest_memory

def healthy(mnt):
    with open(os.path.join(mnt, "info", "vms")) as f:
        return f.read().startswith("vm ")


def gone(mnt, vm, timeout=10):
    """Wait until vm's directory has left the tree."""
    name, deadline = os.path.basename(vm.dir), time.monotonic() + timeout
    while name in os.listdir(mnt):
        assert time.monotonic() < deadline, f"{name} still there"
        time.sleep(0.01)


def errno_of(fn, *args):
    try:
        fn(*args)
    except OSError as e:
        return e.errno
    return 0


# --- lifetimes ---------------------------------------------------------------------------
def test_guest_memory_file_outliving_its_vm_answers_eio(mounted, kvm):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(0x10000)
    vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
    fd = os.open(os.path.join(vm.dir, "mem"), os.O_RDWR)
    try:
        assert os.pread(fd, 4, 0) == b"\0\0\0\0"
        vm.close()                                           # the last VM fd: the VM is destroyed
        gone(mounted, vm)                                    # (FUSE's RELEASE comes after close())
        assert errno_of(os.pread, fd, 4, 0) == errno.EIO     # (a freed MMU was read here)
        assert errno_of(os.pwrite, fd, b"x", 0) == errno.EIO
    finally:
        os.close(fd)
    assert healthy(mounted)


def test_closing_a_vm_under_a_running_text_command_run(mounted, kvm):
    vm, vcpu, mem = spinning_vcpu(kvm)
    cmd = os.open(os.path.join(vm.dir, "vcpu0.cmd"), os.O_RDWR)
    out = {}

    def run():
        try:
            os.write(cmd, b"run\n")
        except OSError as e:
            out["errno"] = e.errno

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    assert t.is_alive()
    vcpu.close()
    vm.close()                                               # VM destroyed: the vCPU is kicked out
    t.join(10)
    assert not t.is_alive()
    assert out.get("errno") in (errno.EINTR, errno.EIO)
    os.close(cmd)                                            # the last hold: the VM is freed now
    assert healthy(mounted)


def test_views_read_while_vms_come_and_go(mounted, kvm):
    stop = time.time() + 2
    errors = []

    def churn():
        mem = alloc_guest_memory(0x10000)
        while time.time() < stop:
            vm = kvm.create_vm()
            vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
            vm.create_vcpu(0).close()
            vm.close()

    def read():
        while time.time() < stop:
            for view in ("json", "vms"):
                try:
                    with open(os.path.join(mounted, "info", view)) as f:
                        f.read()
                except OSError as e:
                    errors.append(e)

    threads = [threading.Thread(target=churn), threading.Thread(target=read),
               threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert healthy(mounted)


# --- signals -----------------------------------------------------------------------------
# --- what one caller may see of another ---------------------------------------------------
@pytest.mark.parametrize("kind", ["kvm", "ctl", "vcpu"])
def test_failed_read_ioctl_copies_nothing_back(mounted, kvm, kind):
    """An unknown _IOR ioctl answers its errno and leaves the caller's buffer as it was
    (libfuse replied with its uninitialised heap buffer, which the kernel copied out)."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    fd = {"kvm": kvm.fd, "ctl": vm.fd, "vcpu": vcpu.fd}[kind]
    size = 4096
    buf = (ctypes.c_char * size)(*([0x5A] * size))
    cmd = abi._ioc(abi.IOC_READ, 0xEE, size)
    with pytest.raises(OSError) as e:
        fcntl.ioctl(fd, cmd, buf, True)
    assert e.value.errno in (errno.EINVAL, errno.ENOTTY)
    assert bytes(buf) == b"\x5a" * size
    vcpu.close()
    vm.close()


def _as_other_process(code, mnt, uid=None):
    """Run code in a child process (of this uid, or as `uid`); returns its stdout."""
    pre = (lambda: os.setresuid(uid, uid, uid)) if uid is not None else None
    out = subprocess.run([sys.executable, "-c", code, mnt], capture_output=True, text=True,
                         preexec_fn=pre, cwd="/")
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


PROBE = """
import errno, os, sys
def probe(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
d = sys.argv[1]
print(probe(lambda: os.open(d + "/mem", os.O_RDONLY)),
      probe(lambda: os.readlink(d + "/vcpu0.run")),
      probe(lambda: os.open(d + "/info/vcpu0", os.O_RDONLY)))
"""


@pytest.mark.expect_log(r"(open|readlink): EACCES .* belongs to pid")
def test_another_process_reaches_no_guest_state(mounted, kvm):
    """Same uid, not the creator: no guest memory, no kvm_run (as its ioctls get EIO)."""
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    mem_, run_, view = _as_other_process(PROBE, vm.dir).split()
    assert (mem_, run_) == ("EACCES", "EACCES")
    assert view == "ok"                                      # a view: same user may read it
    vcpu.close()
    vm.close()


@pytest.fixture
def world_mount(mounted):
    """A mount of its own in a directory every user may traverse (pytest's tmp is 0700)."""
    top = tempfile.mkdtemp(prefix="kvmfs-world.", dir="/tmp")
    os.chmod(top, 0o755)
    mnt = os.path.join(top, "mnt")
    os.mkdir(mnt)
    m = conftest.start_mount(mnt, os.path.join(top, "daemon.log"))
    try:
        yield m
    finally:
        conftest.unmount(m, m.proc)
        shutil.rmtree(top, ignore_errors=True)


SIBLING_PROBE = """
import errno, fcntl, os, sys
mnt = sys.argv[1]
r, w = os.pipe()
r2, w2 = os.pipe()
creator = os.fork()
if creator == 0:
    fd = os.open(mnt + "/kvm", os.O_RDWR)
    n = fcntl.ioctl(fd, 0xAE01, 0)                       # KVM_CREATE_VM
    ctl = os.open(f"{mnt}/vm{n}/ctl", os.O_RDWR)
    fcntl.ioctl(ctl, 0xAE41, 0)                          # KVM_CREATE_VCPU
    os.write(w, str(n).encode())
    os.read(r2, 1)
    os._exit(0)
n = int(os.read(r, 16))


def probe():
    try:
        os.close(os.open(f"{mnt}/vm{n}/vcpu0", os.O_RDWR))
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]


sibling = os.fork()
if sibling == 0:
    print("sibling", probe(), flush=True)
    os._exit(0)
os.waitpid(sibling, 0)
print("ancestor", probe(), flush=True)
os.write(w2, b"x")
os.waitpid(creator, 0)
"""


def test_a_vcpu_file_opens_for_its_owner_and_those_who_may_act_for_it(mounted):
    """The vCPU file maps its kvm_run area: a process of the same user that is neither
    the VM's owner nor an ancestor of it (which could ptrace it anyway) cannot open it."""
    top = tempfile.mkdtemp(prefix="kvmfs-world.", dir="/tmp")
    os.chmod(top, 0o755)
    mnt = os.path.join(top, "mnt")
    os.mkdir(mnt)
    m = conftest.start_mount(mnt, os.path.join(top, "daemon.log"), "--mode", "0666")
    try:
        python = shutil.which("python3", path="/usr/bin:/bin")    # one uid 65534 may run
        if python is None:
            pytest.skip("no system python3 for a process of another user")
        run = subprocess.run([python, "-c", SIBLING_PROBE, mnt], capture_output=True, text=True,
                             cwd="/", preexec_fn=lambda: os.setresuid(65534, 65534, 65534),
                             timeout=60)
        assert run.returncode == 0, run.stderr
        out = run.stdout.strip()
        assert out.splitlines() == ["sibling EACCES", "ancestor ok"], out
        assert "belongs to pid" in open(os.path.join(top, "daemon.log")).read()
    finally:
        conftest.unmount(m, m.proc)
        shutil.rmtree(top, ignore_errors=True)


def test_other_users_reach_nothing_by_default(world_mount):
    """/dev/kvm's model: the mount's owner only (uid 65534 read root's VMs and made its own)."""
    kvm = Kvm(world_mount)
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    paths = [os.path.join(world_mount, p) for p in
             ("kvm", "cmd", "info/json", os.path.basename(vm.dir) + "/info/vcpu0")]
    out = subprocess.run(["/bin/sh", "-c", 'for p; do cat "$p" >/dev/null; done', "sh"] + paths,
                         capture_output=True, text=True, cwd="/",
                         preexec_fn=lambda: os.setresuid(65534, 65534, 65534))
    assert out.stderr.count("Permission denied") == len(paths), out.stderr
    vcpu.close()
    vm.close()
    kvm.close()


# --- text commands -------------------------------------------------------------------------
@pytest.mark.parametrize("line, says", [
    ("create_vcpu -1", "ID -1: expected 0..0xffffffff"),
    ("create_vcpu 0x1" + "0" * 20, "expected 0..0xffffffff"),
    ("set_user_memory_region 0 0 0 0x1001", "memory_size 0x1001 not page aligned"),
    ("set_user_memory_region 0 0 0", "missing SIZE"),
    ("set_user_memory_region 0 0 0 0x1000 0x0 extra", "unexpected 'extra'"),
    ("create_vcpu 'unbalanced", "cannot parse"),
    ("create_vcpu zero", "expected a number"),
    ("enable_cap NO_SUCH_CAP", "no such capability"),
    ("frobnicate", "unknown command"),
])
@pytest.mark.expect_log(r"WARNING kvmfs.fs: [a-z_]+: EINVAL ")
def test_malformed_commands_answer_einval_with_the_reason(mounted, line, says):
    exec_ = subprocess.run(["bash", "-c", f"exec 3<>cmd; echo create_vm >&3; read -r _ vm <&3; "
                            f"cd vm$vm; echo {line!r} > cmd; cat cmd; cd ..; "
                            "echo destroy_vm $vm > cmd"],
                           cwd=mounted, capture_output=True, text=True)
    assert "Invalid argument" in exec_.stderr, exec_.stderr
    assert exec_.stdout.startswith("error: EINVAL") and says in exec_.stdout, exec_.stdout
    assert healthy(mounted)


@pytest.mark.expect_log(r"KVM_SET_USER_MEMORY_REGION: EEXIST .* overlaps another slot")
def test_refused_shell_slots_leave_no_memory_behind(mounted):
    """Each refused 64 MiB slot from the shell allocated its memory first and kept it."""
    script = ("exec 3<>cmd; echo create_vm >&3; read -r _ vm <&3; cd vm$vm; "
              "echo 'set_user_memory_region 0 0 0 0x4000000' > cmd; "
              "for i in $(seq 20); do echo \"set_user_memory_region $i 0 0 0x4000000\" > cmd "
              "2>/dev/null; done; cat info/memslots | wc -l; cd ..; echo destroy_vm $vm > cmd")
    pid = mounted.proc.pid                                   # the foreground daemon
    before = len(open(f"/proc/{pid}/maps").readlines())
    out = subprocess.run(["bash", "-c", script], cwd=mounted, capture_output=True, text=True)
    assert out.stdout.strip() == "2", out.stdout + out.stderr        # header + one slot
    after = len(open(f"/proc/{pid}/maps").readlines())
    assert after <= before + 2, (before, after)


@pytest.fixture(scope="module")
def signal_race(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler (gcc) to build tests/helpers/signal_race.c")
    here = os.path.dirname(os.path.abspath(__file__))
    exe = str(tmp_path_factory.mktemp("helpers") / "signal_race")
    cc = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", "-O2", "-pthread",
                         "-I", os.path.join(os.path.dirname(here), "clients"), "-o", exe,
                         os.path.join(here, "helpers", "signal_race.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return exe


def _race(exe, mnt, rounds):
    env = {k: v for k, v in os.environ.items() if k != "KVMFS_MNT"}
    if mnt is not None:
        env["KVMFS_MNT"] = mnt
    p = subprocess.Popen([exe, str(rounds)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        # A lost signal leaves the client in uninterruptible sleep: it cannot be reaped.
        pytest.fail(f"signal_race on {mnt or '/dev/kvm'} hung: a KVM_RUN missed its signal")
    assert p.returncode == 0, f"exit {p.returncode}\n{out}\n{err}"
    return out


def test_a_signal_at_any_moment_ends_kvm_run(mounted, signal_race):
    """A signal that reached a KVM_RUN request while libfuse dispatched it was consumed and
    the guest loop ran forever (the client unkillable).  1000 rounds at random moments."""
    assert "every one ended by its signal" in _race(signal_race, mounted, 1000)


def test_a_signal_at_any_moment_ends_kvm_run_on_real_kvm(real_kvm, signal_race):
    assert "every one ended by its signal" in _race(signal_race, None, 200)


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_huge_dirty_view_is_streamed(mounted, kvm):
    """info/dirty of a 2^22-page slot with every page dirty (INITIALLY_SET) was rendered
    whole (~90 MB) before open returned; it is produced as it is read."""
    vm = kvm.create_vm()
    vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                  abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET)
    npages = 1 << 22
    mem = alloc_guest_memory(npages * 4096)                  # sparse: nothing is touched
    vm.set_user_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, npages * 4096, mem.address)
    before = _rss_kib(mounted.proc.pid)
    with open(os.path.join(vm.dir, "info", "dirty", "0.0"), "rb") as f:
        head = f.read(1 << 16)
        assert healthy(mounted)                              # other requests go on meanwhile
        f.seek(50 << 20)                                     # far into the text: no pages before
        mid = f.read(64)
    assert _rss_kib(mounted.proc.pid) - before < 32 << 10, "the whole view was kept in memory"
    lines = head.decode().splitlines()
    assert lines[:3] == ["page gpa", "0 0x0", "1 0x1000"]
    assert mid and mid.count(b"\n") >= 2
    f = open(os.path.join(vm.dir, "info", "dirty", "0.0"), "rb")
    total = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
    f.close()
    expected = len("page gpa\n") + sum(len(f"{p} 0x{p << 12:x}\n") for p in range(npages))
    assert total == expected
    vm.close()
    mem.close()


@pytest.mark.expect_log(r"kvm_run area\(s\) truncated by their VMM")
def test_the_kvm_run_area_cannot_be_truncated(mounted, kvm):
    """The kvm_run area is the page cache of the vCPU file (KVM: an anon inode): truncating
    it, by either name, is EINVAL, and the vCPU goes on running with its area intact."""
    vm = kvm.create_vm()
    mem = alloc_guest_memory(0x10000)
    mem.map[0x1000:0x1002] = b"\xf4\xf4"                     # hlt; hlt
    vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
    vcpu = vm.create_vcpu(0)
    guestcases.setup(vcpu, mem, "real", 0x1000)
    for name in ("vcpu0.run", "vcpu0"):
        with pytest.raises(OSError) as e:
            os.truncate(os.path.join(vm.dir, name), 0)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            os.ftruncate(vcpu.fd, 0)
        assert e.value.errno == errno.EINVAL
    assert os.readlink(os.path.join(vm.dir, "vcpu0.run")) == "vcpu0"
    assert os.fstat(vcpu.fd).st_size == abi.VCPU_MMAP_SIZE
    fcntl.ioctl(vcpu.fd, abi.KVM_RUN, 0)                     # the daemon writes the HLT exit
    assert vcpu.kvm_run.exit_reason == abi.KVM_EXIT_HLT
    fcntl.ioctl(vcpu.fd, abi.KVM_RUN, 0)
    assert vcpu.get_regs().rip == 0x1002
    assert healthy(mounted)
    vcpu.close()
    vm.close()


@pytest.mark.expect_log(r"create_vm: EMFILE")
def test_a_user_has_a_bounded_number_of_shell_vms(mounted):
    """Shell VMs outlive their commands, so they are bounded per user (a process's VMs are
    bounded by its fds): the fuzzer grew a daemon by 230 MB of them."""
    from kvmfs.system import SHELL_VMS_PER_USER
    script = (f"for i in $(seq {SHELL_VMS_PER_USER + 1}); do echo create_vm > cmd || exit 7; done")
    out = subprocess.run(["bash", "-c", script], cwd=mounted, capture_output=True, text=True)
    assert out.returncode == 7 and "Too many open files" in out.stderr, out.stderr
    mine = [line.split()[0] for line in open(os.path.join(mounted, "info", "vms")).read().splitlines()
            if f"uid:{os.getuid()}" in line]
    assert len(mine) == SHELL_VMS_PER_USER
    for name in mine:
        with open(os.path.join(mounted, "cmd"), "w") as f:
            f.write(f"destroy_vm {name[2:]}\n")
    assert healthy(mounted)
