"""The mounted filesystem: the tree, shared guest memory, lifetime, the shell interface."""
import ctypes
import errno
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kvmfs import abi
from guests import spinning_vcpu
from kvmfs.client import alloc_guest_memory, ioctl

MiB = 1 << 20


def vm_dirs(mnt):
    return sorted(n for n in os.listdir(mnt) if n.startswith("vm"))


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_tree_and_system_ioctls(mounted, kvm):
    assert {"kvm", "cmd", "info"} <= set(os.listdir(mounted))
    assert kvm.get_api_version() == abi.API_VERSION
    assert kvm.get_vcpu_mmap_size() == abi.VCPU_MMAP_SIZE
    assert kvm.check_extension(abi.KVM_CAP_NR_MEMSLOTS) == abi.KVM_USER_MEM_SLOTS
    assert kvm.check_extension(abi.KVM_CAP_MULTI_ADDRESS_SPACE) == abi.KVM_ADDRESS_SPACE_NUM
    assert kvm.check_extension(9999) == 0
    with pytest.raises(OSError) as e:
        ioctl(kvm.fd, abi.KVM_RUN, 0)
    assert e.value.errno == errno.EINVAL
    assert f"NR_MEMSLOTS: {abi.KVM_USER_MEM_SLOTS}" in open(os.path.join(mounted, "info", "caps")).read()


def test_vm_appears_and_is_freed_on_close(mounted, kvm):
    vm = kvm.create_vm()
    name = os.path.basename(vm.dir)
    assert name in os.listdir(mounted)
    assert {"ctl", "cmd", "mem", "as1", "info"} <= set(os.listdir(vm.dir))
    vcpu = vm.create_vcpu(3)
    assert {"vcpu3", "vcpu3.run", "vcpu3.cmd"} <= set(os.listdir(vm.dir))
    vcpu.close()
    vm.close()
    assert wait_for(lambda: name not in os.listdir(mounted))


def test_guest_memory_is_shared_both_ways(mounted, kvm):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(2 * MiB)
    vm.set_user_memory_region(0, 0, 0x100000, MiB, mem.address)
    vm.set_user_memory_region(1, 0, 0x200000, MiB, mem.address + MiB)   # adjacent: reads cross it
    mem.map[0:4] = b"VMM!"
    assert vm.read_gpa(0x100000, 4) == b"VMM!"
    vm.write_gpa(0x180000, b"from mem file")
    assert mem.map[0x80000:0x80000 + 13] == b"from mem file"
    mem.map[MiB - 2:MiB + 2] = b"ABCD"
    assert vm.read_gpa(0x200000 - 2, 4) == b"ABCD"                     # across two slots
    # A hole answers EIO; a read that starts in a slot stops at its end.
    with pytest.raises(OSError) as e:
        vm.read_gpa(0x50000, 16)
    assert e.value.errno == errno.EIO
    assert len(vm.read_gpa(0x300000 - 8, 64)) == 8
    rows = vm.info("memslots").splitlines()
    assert rows[0].split()[:6] == ["as", "slot", "gpa_start", "gpa_end", "size", "flags"]
    assert rows[1].split()[:5] == ["0", "0", "0x100000", "0x1fffff", "0x100000"]
    assert "memfd:guest" in rows[1]
    vm.close()
    mem.close()


def test_address_space_1_has_its_own_memory(mounted, kvm):
    vm = kvm.create_vm()
    m0, m1 = alloc_guest_memory(MiB), alloc_guest_memory(MiB)
    vm.set_user_memory_region(0, 0, 0, MiB, m0.address)
    vm.set_user_memory_region(1 << 16 | 0, 0, 0, MiB, m1.address)      # same id and gpa, as_id 1
    vm.write_gpa(0x10, b"zero", as_id=0)
    vm.write_gpa(0x10, b"one!", as_id=1)
    assert m0.map[0x10:0x14] == b"zero" and m1.map[0x10:0x14] == b"one!"
    vm.close()


@pytest.mark.expect_log(r"read guest memory: EFAULT .*private anonymous memory")
def test_private_anonymous_memory_fails_on_access_with_a_hint(mounted, kvm):
    vm = kvm.create_vm()
    anon = mmap.mmap(-1, MiB, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(anon))
    vm.set_user_memory_region(0, 0, 0, MiB, addr)             # accepted, as KVM accepts it
    with pytest.raises(OSError) as e:
        vm.read_gpa(0, 8)
    assert e.value.errno == errno.EFAULT
    assert wait_for(lambda: "memfd_create" in mounted.test_log())
    vm.close()


@pytest.mark.expect_log(r"ioctl: EIO \(vm\d+ belongs to pid")
def test_vm_ioctl_from_another_process_is_eio(mounted, kvm):
    vm = kvm.create_vm()
    pid = os.fork()
    if pid == 0:
        try:
            ioctl(vm.fd, abi.KVM_CHECK_EXTENSION, 0)
            os._exit(1)
        except OSError as e:
            os._exit(0 if e.errno == errno.EIO else 2)
    assert os.waitpid(pid, 0)[1] == 0
    vm.close()


CLIENT = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, %r)
    from kvmfs.client import Kvm, alloc_guest_memory
    kvm = Kvm(sys.argv[1])
    vm = kvm.create_vm()
    mem = alloc_guest_memory(1 << 20)
    vm.set_user_memory_region(0, 0, 0, 1 << 20, mem.address)
    vcpu = vm.create_vcpu(0)
    print(os.path.basename(vm.dir), flush=True)
    time.sleep(60)
""")


def test_sigkilled_client_leaves_no_vm(mounted, tmp_path):
    script = tmp_path / "client.py"
    script.write_text(CLIENT % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.Popen([sys.executable, str(script), mounted], stdout=subprocess.PIPE, text=True)
    name = p.stdout.readline().strip()
    assert name in os.listdir(mounted)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert wait_for(lambda: name not in os.listdir(mounted)), os.listdir(mounted)


def test_vm_of_a_creator_that_never_opened_it_is_reaped(mounted):
    code = ("import sys; sys.path.insert(0, %r); from kvmfs.client import ioctl; from kvmfs import abi; "
            "import os; fd = os.open(sys.argv[1] + '/kvm', os.O_RDWR); "
            "print(ioctl(fd, abi.KVM_CREATE_VM, 0))" % os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code, mounted], capture_output=True, text=True, check=True)
    name = f"vm{int(out.stdout)}"
    assert wait_for(lambda: name not in os.listdir(mounted), timeout=10)


def sh(cmd, mnt, check=True):
    return subprocess.run(["bash", "-c", cmd], cwd=mnt, capture_output=True, text=True, check=check)


def test_shell_creates_vm_loads_image_and_reads_it_back(mounted, tmp_path):
    image = tmp_path / "guest.bin"
    image.write_bytes(bytes(range(256)) * 64)          # 16 KiB
    out = sh(f"""
        exec 3<>cmd; echo create_vm >&3; read -r word vm <&3
        cd vm$vm
        echo 'set_user_memory_region 0 0 0x10000 0x100000' > cmd
        echo 'set_user_memory_region 0x10001 0 0x0 0x1000' > cmd
        dd if={image} of=mem bs=4096 seek=16 conv=notrunc status=none
        dd if=mem bs=4096 skip=16 count=4 status=none > {tmp_path}/back.bin
        cat info/memslots
        echo vm$vm
    """, mounted)
    assert (tmp_path / "back.bin").read_bytes() == image.read_bytes()
    lines = out.stdout.splitlines()
    assert any(line.startswith("0 0 0x10000 0x10ffff 0x100000") for line in lines), out.stdout
    assert any(line.startswith("1 1 0x0 0xfff 0x1000") for line in lines), out.stdout


@pytest.mark.expect_log(r"(KVM_SET_USER_MEMORY_REGION|set_user_memory_region): (EEXIST|EINVAL) ",
                        r"command: EINVAL \(unknown command")
def test_shell_command_errors_are_the_ioctl_errnos(mounted):
    out = sh("""
        exec 3<>cmd; echo create_vm >&3; read -r word vm <&3
        cd vm$vm
        echo 'set_user_memory_region 0 0 0x0 0x1000' > cmd
        echo 'set_user_memory_region 1 0 0x0 0x1000' > cmd || echo overlap-refused
        echo 'set_user_memory_region 32764 0 0x10000 0x1000' > cmd || echo bad-slot-refused
        cat cmd
        echo 'no_such_command' > cmd || echo unknown-refused
    """, mounted, check=False)
    assert "overlap-refused" in out.stdout and "File exists" in out.stderr
    assert "bad-slot-refused" in out.stdout and "Invalid argument" in out.stderr
    assert "error: EINVAL" in out.stdout
    assert "unknown-refused" in out.stdout


def test_unknown_paths_and_views_are_read_only(mounted, kvm):
    assert not os.path.exists(os.path.join(mounted, "vm999999"))
    vm = kvm.create_vm()
    with pytest.raises(OSError) as e:
        open(os.path.join(vm.dir, "info", "memslots"), "w")
    assert e.value.errno == errno.EACCES
    vm.close()


@pytest.mark.expect_log(r"read guest memory: EFAULT .*is not mapped in pid")
def test_invalidation_forgets_unmapped_memory(mounted, kvm):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(MiB)
    vm.set_user_memory_region(0, 0, 0, MiB, mem.address)
    vm.write_gpa(0, b"before")
    assert mem.map[0:6] == b"before"
    vm.close_memory(mem)                    # invalidate, then munmap: the daemon lets go too
    with pytest.raises(OSError) as e:
        vm.read_gpa(0, 6)                   # nothing mapped at the hva any more
    assert e.value.errno == errno.EFAULT
    again = alloc_guest_memory(MiB)         # a VMM maps new memory and moves the slot onto it
    vm.set_user_memory_region(0, 0, 0, 0, 0)
    vm.set_user_memory_region(0, 0, 0, MiB, again.address)
    again.map[0:5] = b"after"
    assert vm.read_gpa(0, 5) == b"after"
    assert "notifier_invalidations: 1" in vm.info("stats")
    vm.close()


def test_a_running_vcpu_stalls_nothing_and_a_signal_ends_it(mounted, kvm):
    """A vCPU in an endless loop occupies one request; cat, another VM and ioctls go on."""
    import threading
    vm, vcpu, mem = spinning_vcpu(kvm)
    result = {}

    def run():
        try:
            vcpu.run()
            result["rc"] = 0
        except OSError as e:
            result["errno"] = e.errno

    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    t = threading.Thread(target=run)
    t.start()
    try:
        time.sleep(0.2)
        assert t.is_alive()                                  # still in the guest
        assert "vm" in open(os.path.join(mounted, "info", "vms")).read()
        other = kvm.create_vm()                              # other VMs and ioctls are served
        other.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
        assert other.check_extension(abi.KVM_CAP_USER_MEMORY) == 1
        other.close()
        for _ in range(50):                                  # a signal ends KVM_RUN with EINTR
            signal.pthread_kill(t.ident, signal.SIGUSR1)
            t.join(0.1)
            if not t.is_alive():
                break
        assert not t.is_alive()
        assert result == {"errno": errno.EINTR}
        assert vcpu.kvm_run.exit_reason == abi.KVM_EXIT_INTR
    finally:
        signal.signal(signal.SIGUSR1, old)
    vcpu.close()
    vm.close()


def test_umount_after_the_daemon_died(mounted, tmp_path):
    """`kvmfs mount` returns once the mount answers; `kvmfs umount` also clears a dead mount."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "kvmfs", "mount", str(mnt)], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    assert os.path.exists(mnt / "kvm")                      # answering when mount returned
    pid = int(out.split("daemon pid ")[1].rstrip(")\n"))
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"))
    with pytest.raises(OSError) as e:
        os.listdir(mnt)
    assert e.value.errno == errno.ENOTCONN
    subprocess.run([sys.executable, "-m", "kvmfs", "umount", str(mnt)], cwd=repo, check=True)
    assert os.listdir(mnt) == [] and not os.path.ismount(mnt)


def test_info_dirty_lists_logged_slots(mounted, kvm):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(2 * MiB)
    vm.set_user_memory_region(0, 0, 0, MiB, mem.address)
    vm.set_user_memory_region(1 << 16 | 2, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, MiB, mem.address + MiB)
    assert os.listdir(os.path.join(vm.dir, "info", "dirty")) == ["1.2"]
    assert vm.info("dirty/1.2").splitlines() == ["page gpa"]      # nothing written yet
    assert "1 2 0x0 0xfffff 0x100000 log_dirty" in vm.info("memslots")
    vm.close()


def test_shell_runs_a_guest_and_reads_its_exits(mounted, tmp_path):
    # mov al, 0x41; out 0x10, al; inc byte [0x2000]; hlt  (real mode, loaded at gpa 0x1000)
    (tmp_path / "g.bin").write_bytes(bytes.fromhex("b041" "e610" "fe060020" "f4"))
    out = sh(f"""
        set -e
        exec 3<>cmd; echo create_vm >&3; read -r _ vm <&3; cd vm$vm
        echo 'set_user_memory_region 0 0 0x0 0x10000' > cmd
        dd if={tmp_path}/g.bin of=mem bs=4096 seek=1 conv=notrunc status=none
        echo 'create_vcpu 0' > cmd
        echo 'set_sregs cs.base=0 cs.selector=0' > vcpu0.cmd
        echo 'set_regs rip=0x1000' > vcpu0.cmd
        exec 4<>vcpu0.cmd
        echo run >&4; cat <&4
        echo run >&4; cat <&4
        echo get_regs > vcpu0.cmd; grep rip vcpu0.cmd
        echo 'test_young 0 2 1' > cmd; cat cmd
        echo 'clear_young 0 2 1' > cmd; echo 'test_young 0 2 1' > cmd; cat cmd
        dd if=mem bs=1 skip=8192 count=1 status=none | od -An -tx1
    """, mounted)
    lines = out.stdout.split("\n")
    assert lines[:7] == ["exit_reason: IO", "rip: 0x1002", "direction: out", "size: 1", "port: 0x10",
                         "count: 1", "data: 41"], out.stdout      # RIP stays on the OUT (VMX/SVM)
    assert "exit_reason: HLT" in lines
    assert "rip: 0x1009" in lines, out.stdout                 # past the hlt at 0x1008
    assert lines[-4:-1] == ["1", "0", " 01"], out.stdout        # young, cleared, memory written


def test_stat_json_describes_vms_slots_and_vcpus(mounted, kvm, tmp_path):
    import json
    vm = kvm.create_vm()
    mem = alloc_guest_memory(MiB)
    vm.set_user_memory_region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0x100000, MiB, mem.address)
    vcpu = vm.create_vcpu(1)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "kvmfs", "stat", mounted, "--json"], cwd=repo,
                         capture_output=True, text=True, check=True).stdout
    state = json.loads(out)["vms"][os.path.basename(vm.dir)]
    assert state["owner_pid"] == os.getpid()
    assert [(s["slot"], s["gpa_start"], s["size"], s["flags"]) for s in state["memslots"]] == \
        [(0, 0x100000, MiB, "log_dirty")]
    assert [v["id"] for v in state["vcpus"]] == [1]
    bad = subprocess.run([sys.executable, "-m", "kvmfs", "stat", str(tmp_path)], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "kvmfs mount DIR" in bad.stderr
    vcpu.close()
    vm.close()


def test_vcpu_ioctls_wait_for_a_running_kvm_run(mounted, kvm):
    """As under KVM's vcpu mutex: KVM_GET_REGS during KVM_RUN waits; the view says running."""
    import threading
    vm, vcpu, mem = spinning_vcpu(kvm)
    old = signal.signal(signal.SIGUSR1, lambda *a: None)
    runner = threading.Thread(target=lambda: pytest.raises(OSError, vcpu.run))
    runner.start()
    try:
        time.sleep(0.1)
        assert "state: running" in vm.info("vcpu0")
        got = {}
        reader = threading.Thread(target=lambda: got.update(rip=vcpu.get_regs().rip))
        reader.start()
        reader.join(0.3)
        assert reader.is_alive() and not got               # waits while the guest runs
        for _ in range(50):
            signal.pthread_kill(runner.ident, signal.SIGUSR1)
            runner.join(0.1)
            if not runner.is_alive():
                break
        reader.join(5)
        assert got["rip"] == 0x1000                         # then answers, with the loop's RIP
    finally:
        signal.signal(signal.SIGUSR1, old)
    vcpu.close()
    vm.close()
