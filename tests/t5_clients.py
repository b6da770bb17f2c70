"""The C client (clients/kvmfs.h) through tools/hello_vm.c, on kvmfs and on /dev/kvm, and
tools/smm_guest.c on kvmfs.

hello_vm is built once with `gcc -I clients`; the same binary runs against the
mount (KVMFS_MNT=<mnt>) and against the host's /dev/kvm (KVMFS_MNT unset), and
must exit 0 on both.  The `--run` form also runs its 16-bit guest to HLT and
prints what the guest wrote to port 0x3f8.
"""
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 30


def build(tmp_path_factory, name):
    """tools/NAME.c compiled against clients/kvmfs.h."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip(f"no C compiler (gcc) to build tools/{name}.c")
    exe = tmp_path_factory.mktemp("clients") / name
    cc = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", "-O2",
                         "-I", os.path.join(REPO, "clients"), "-o", str(exe),
                         os.path.join(REPO, "tools", f"{name}.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return str(exe)


@pytest.fixture(scope="module")
def hello_vm(tmp_path_factory):
    return build(tmp_path_factory, "hello_vm")


@pytest.fixture(scope="module")
def smm_guest(tmp_path_factory):
    return build(tmp_path_factory, "smm_guest")


def run(exe, mnt, *args):
    env = dict(os.environ)
    env.pop("KVMFS_MNT", None)
    if mnt is not None:
        env["KVMFS_MNT"] = str(mnt)
    p = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    where = f"KVMFS_MNT={mnt}" if mnt is not None else "/dev/kvm"
    name = " ".join([os.path.basename(exe), *args])
    assert p.returncode == 0, (f"{name} on {where} exited {p.returncode}\n"
                               f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p.stdout


def test_hello_vm_on_kvmfs(hello_vm, mounted):
    out = run(hello_vm, mounted)
    assert "info/memslots" in out          # it printed the VM's memslots view
    assert "hello, slot 1" in out          # and read guest memory back through vmN/mem


def test_hello_vm_on_dev_kvm(hello_vm, real_kvm):
    run(hello_vm, None)


def test_hello_vm_runs_guest_on_kvmfs(hello_vm, mounted):
    out = run(hello_vm, mounted, "--run")
    assert "guest wrote: '4'" in out and "guest halted" in out


def test_hello_vm_runs_guest_on_dev_kvm(hello_vm, real_kvm):
    out = run(hello_vm, None, "--run")
    assert "guest wrote: '4'" in out and "guest halted" in out


# tools/smm_guest.c runs on the mount only: the host's /dev/kvm has no SMM (spec section 1).
SMM_GUEST_LINES = [
    "exit=IO port=0x10 size=1 data=0x34 smm=0 cs_base=0x0 rip=0x1006 rax=0x1234",
    "smi pending=1 smm=0",
    "exit=IO port=0x20 size=1 data=0x99 smm=1 cs_base=0x30000 rip=0x8002 rax=0x1299",
    # out 0x21, eax: all of the saved EIP, 4 bytes.
    "exit=IO port=0x21 size=4 data=0x1008 smm=1 cs_base=0x30000 rip=0x800b rax=0x1008",
    # RSM restored the state the handler changed: saved EAX is now 0xbeef.
    "exit=IO port=0x11 size=1 data=0xef smm=0 cs_base=0x0 rip=0x1008 rax=0xbeef",
    "exit=HLT smm=0 cs_base=0x0 rip=0x100b rax=0xbeef",
    "map eip=0x1008 eflags=0x2 cr0=0x60000010 smbase=0x30000 revision=0x20000 ebx=0x5678",
    "ram map untouched=1",
    "smbase msr=0x30000",
]


def test_smm_guest_on_kvmfs(smm_guest, mounted):
    """KVM_SMI, the handler in SMRAM (address space 1), the state-save map and RSM from C."""
    out = run(smm_guest, mounted)
    assert out.splitlines() == SMM_GUEST_LINES
