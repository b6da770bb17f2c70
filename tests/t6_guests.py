"""Guests: the cases of tests/guestcases.py on real KVM and on kvmfs, and whole guests.

Per case, as in t4_conformance: test_kvm (the host's /dev/kvm gives the case's
lines, for this kind of host), test_kvmfs (kvmfs gives the ABI's lines) and
test_kvmfs_same_as_kvm (both give the same lines, where they owe the same).
Each case runs in a forked child with a time limit, so a guest that never exits
fails its case instead of hanging the session.  Then: the demo guest (text and
dirty pages), 4 vCPUs incrementing one counter with lock xadd, a client killed
in KVM_RUN, and tools/run_guest.c on both.
"""
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import guestcases
from conformance import host_kind
from guestcases import API_CASES, CASES, run_api_case, run_case
from kvmfs import abi, guests
from kvmfs.client import Kvm, alloc_guest_memory

HOST = host_kind()
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASE_TIMEOUT = 10.0
_results = {}


def in_child(fn, timeout=CASE_TIMEOUT):
    """fn() in a forked child; its repr'd result, or ["timeout"] / ["child raised ..."]."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            try:
                out = repr(fn())
            except BaseException as e:
                out = repr([f"child raised {e!r}"])
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return ["timeout"]
            chunk = os.read(r, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    import ast
    return ast.literal_eval(b"".join(chunks).decode() or "['child wrote nothing']")


def result(side, mnt, case, api=False):
    key = (side, case.name, api)
    if key not in _results:
        fn = run_api_case if api else run_case
        _results[key] = tuple(in_child(lambda: fn(mnt, case)))
    return _results[key]



@pytest.fixture(scope="module")
def kvm(real_kvm):
    return None          # Kvm(None) opens /dev/kvm


@pytest.fixture(scope="module")
def kvmfs(mounted):
    return str(mounted)


def _diff(got, want):
    return "\n".join(["got:"] + ["  " + x for x in got] + ["want:"] + ["  " + x for x in want])


# --- the table ---------------------------------------------------------------------
ALL = [(c, False) for c in CASES] + [(c, True) for c in API_CASES]


def _id(p):
    return p[0].name


@pytest.mark.parametrize("entry", ALL, ids=_id)
def test_kvm(kvm, entry):
    case, api = entry
    got = result("kvm", kvm, case, api)
    answers = case.kvm_answers(HOST)
    if answers is None:                    # this host answers with its own values: ran is enough
        assert not any(str(x).startswith(("child raised", "timeout")) for x in got), got
        return
    assert got in answers, f"{case.name} on /dev/kvm ({HOST}): {case.why}\n" + _diff(got, answers[0])


@pytest.mark.parametrize("entry", ALL, ids=_id)
def test_kvmfs(kvmfs, entry, expect_log):
    case, api = entry
    expect_log.errnos(case.expected_kvmfs())
    got = result("kvmfs", kvmfs, case, api)
    want = case.expected_kvmfs()
    assert got == want, f"{case.name} on kvmfs: {case.why}\n" + _diff(got, want)


@pytest.mark.parametrize("entry", [e for e in ALL if e[0].kvm_answers(HOST) is not None
                                   and e[0].comparable(HOST)], ids=_id)
def test_kvmfs_same_as_kvm(kvm, kvmfs, entry, expect_log):
    case, api = entry
    expect_log.errnos(case.expected_kvmfs())
    theirs = result("kvm", kvm, case, api)
    ours = result("kvmfs", kvmfs, case, api)
    assert ours == theirs, f"{case.name}: kvmfs differs from /dev/kvm\n" + _diff(ours, theirs)


def test_table_is_well_formed():
    names = [c.name for c in CASES + API_CASES]
    assert len(names) == len(set(names))
    for c in CASES:
        assert c.why and c.expect, c.name
        assert set(c.host) <= {"pvm", "vmx", "svm"}, c.name
        assert os.path.exists(guests.source(c.guest)), c.guest


# --- the demo guest ------------------------------------------------------------------
MiB = 1 << 20


def run_demo(mnt):
    """tools/demo.py's VMM loop (plus SET_CPUID2): the printed text and the dirty pages."""
    kvm = Kvm(mnt)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(2 * MiB)
    try:
        image = guests.load("demo")
        mem.map[0x1000:0x1000 + len(image)] = image
        vm.set_user_memory_region(0, 0, 0, 2 * MiB, mem.address)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.get_supported_cpuid())     # EFER.LME needs CPUID.LM (spec 10.4)
        s = vcpu.get_sregs()
        s.cs.selector, s.cs.base = 0, 0
        vcpu.set_sregs(s)
        r = vcpu.get_regs()
        r.rip, r.rflags = 0x1000, 2
        vcpu.set_regs(r)
        text, logged, last = b"", False, None
        for _ in range(1000):
            vcpu.run()
            reason = vcpu.kvm_run.exit_reason
            port = vcpu.kvm_run.exit.io.port
            if reason == abi.KVM_EXIT_IO and port == 0xE9:
                text += vcpu.io_data()
            elif reason == abi.KVM_EXIT_IO and port == 0xEA and not logged:
                vm.set_user_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, 2 * MiB, mem.address)
                logged = True
            else:
                last = abi.EXIT_REASONS.get(reason, reason)
                break
        bitmap = vm.get_dirty_log(0, 2 * MiB // 4096) if logged else []
        pages = [w * 64 + b for w, word in enumerate(bitmap) for b in range(64) if word >> b & 1]
        words = [int.from_bytes(mem.map[0x100000 + i * 4096:0x100000 + i * 4096 + 4], "little")
                 for i in range(8)]
        vcpu.close()
        return [last, text.decode(errors="replace"), pages, words]
    finally:
        vm.close()
        mem.close()
        kvm.close()


DEMO_EXPECT = ["HLT", "hello from real mode\nhello from 32-bit protected mode\n"
               "hello from 64-bit long mode\nwrote 8 pages\n",
               list(range(256, 264)), [8, 7, 6, 5, 4, 3, 2, 1]]


def test_demo_guest(real_kvm, mounted):
    """kvmfs/guests/demo.S prints in real, protected and long mode, and dirties exactly 8 pages."""
    theirs = in_child(lambda: run_demo(None))
    assert theirs == DEMO_EXPECT
    ours = in_child(lambda: run_demo(str(mounted)))
    assert ours == theirs


# --- several vCPUs -------------------------------------------------------------------
N_VCPUS, N_ITER = 4, 300000


def run_counter(mnt):
    """N_VCPUS threads, each KVM_RUN on its own vCPU running counter64 (CPL 3)."""
    kvm = Kvm(mnt)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(guestcases.RAM_SIZE)
    try:
        image = guests.load("counter64")
        mem.map[0x1000:0x1000 + len(image)] = image
        vm.set_user_memory_region(0, 0, 0, guestcases.RAM_SIZE, mem.address)
        cpuid = kvm.get_supported_cpuid()
        vcpus = []
        for i in range(N_VCPUS):
            v = vm.create_vcpu(i)
            v.set_cpuid2(cpuid)
            guestcases.setup(v, mem, "user64", 0x1000)
            r = v.get_regs()
            r.rcx = N_ITER
            v.set_regs(r)
            vcpus.append(v)
        exits = [None] * N_VCPUS

        def drive(i):
            v = vcpus[i]
            for _ in range(100):
                try:
                    v.run()
                except OSError as e:
                    exits[i] = f"errno {e.errno}"
                    return
                run = v.kvm_run
                if run.exit_reason == abi.KVM_EXIT_IO and run.exit.io.port == guestcases.END_PORT:
                    exits[i] = "done"
                    return
                exits[i] = abi.EXIT_REASONS.get(run.exit_reason, run.exit_reason)
                if run.exit_reason != abi.KVM_EXIT_IO:
                    return

        threads = [threading.Thread(target=drive, args=(i,)) for i in range(N_VCPUS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        total = int.from_bytes(mem.map[0x3000:0x3004], "little")
        rcx = [v.get_regs().rcx for v in vcpus]
        for v in vcpus:
            v.close()
        return [exits, total, rcx]
    finally:
        vm.close()
        mem.close()
        kvm.close()


COUNTER_EXPECT = [["done"] * N_VCPUS, N_VCPUS * N_ITER, [0] * N_VCPUS]


def test_vcpus_lock_xadd_kvm(real_kvm):
    assert in_child(lambda: run_counter(None), timeout=30) == COUNTER_EXPECT


def test_vcpus_lock_xadd_kvmfs(mounted):
    assert in_child(lambda: run_counter(str(mounted)), timeout=30) == COUNTER_EXPECT


# --- a client killed in KVM_RUN ----------------------------------------------------------
KILLED_CLIENT = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import guestcases
    from kvmfs import guests
    from kvmfs.client import Kvm, alloc_guest_memory
    kvm = Kvm({mnt!r})
    vm = kvm.create_vm()
    mem = alloc_guest_memory(guestcases.RAM_SIZE)
    mem.map[0x1000:0x1002] = guests.load("spin")
    vm.set_user_memory_region(0, 0, 0, guestcases.RAM_SIZE, mem.address)
    v = vm.create_vcpu(0)
    guestcases.setup(v, mem, "real", 0x1000)
    print(os.path.basename(vm.dir), flush=True)
    v.run()
    print("KVM_RUN returned", flush=True)
""")


def test_killed_client(mounted):
    """SIGKILL during KVM_RUN of `jmp $`: the VM leaves the mount, the daemon serves on."""
    script = KILLED_CLIENT.format(repo=REPO, tests=os.path.dirname(__file__), mnt=str(mounted))
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name = p.stdout.readline().strip()
        assert name.startswith("vm"), name
        time.sleep(0.3)                      # well inside KVM_RUN by now
        assert p.poll() is None, "KVM_RUN of a `jmp $` guest returned"
        assert os.path.isdir(os.path.join(mounted, name))
    finally:
        p.kill()
        p.wait()
    deadline = time.monotonic() + 10
    while os.path.exists(os.path.join(mounted, name)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(os.path.join(mounted, name)), f"{name} outlived its killed client"
    case = next(c for c in CASES if c.name == "hlt-resume")
    assert in_child(lambda: run_case(str(mounted), case)) == list(case.expect)
    assert mounted.proc.poll() is None


# --- tools/run_guest.c --------------------------------------------------------------------
C_GUESTS = [("io_ports", "real"), ("rep_insb", "real"), ("mmio_real", "real"),
            ("mmio64", "long64"), ("mmio_rmw", "long64"), ("triple_fault", "long64"),
            ("fetch_noslot", "real"), ("demo", "real")]


@pytest.fixture(scope="module")
def run_guest_bin(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler")
    out = str(tmp_path_factory.mktemp("run_guest") / "run_guest")
    subprocess.run([cc, "-O1", "-Wall", "-Werror", "-I", os.path.join(REPO, "clients"), "-o", out,
                    os.path.join(REPO, "tools", "run_guest.c")], check=True)
    return out


def c_lines(binary, mnt, guest, mode):
    env = dict(os.environ)
    env.pop("KVMFS_MNT", None)
    if mnt:
        env["KVMFS_MNT"] = mnt
    p = subprocess.run([binary, guests.path(guest), "%#x" % guests.gpa(guest), mode],
                       capture_output=True, text=True, env=env, timeout=CASE_TIMEOUT)
    assert p.returncode == 0, p.stderr
    # Host-specific: RFLAGS after a triple fault (RF is set on the PVM host); RIP at OUT
    # exits is already left out by run_guest.
    return [re.sub(r" rflags=0x[0-9a-f]+$", "", line) if line.startswith("SHUTDOWN") else line
            for line in p.stdout.splitlines()]


@pytest.mark.parametrize("guest,mode", C_GUESTS, ids=[g for g, _ in C_GUESTS])
def test_run_guest_c(run_guest_bin, real_kvm, mounted, guest, mode):
    theirs = c_lines(run_guest_bin, None, guest, mode)
    assert theirs and theirs[-1].startswith(("HLT", "SHUTDOWN", "INTERNAL_ERROR")), theirs
    ours = c_lines(run_guest_bin, str(mounted), guest, mode)
    assert ours == theirs
