"""The C client (clients/kvmfs.h) through tools/hello_vm.c, on kvmfs and on /dev/kvm.

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


@pytest.fixture(scope="module")
def hello_vm(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler (gcc) to build tools/hello_vm.c")
    exe = tmp_path_factory.mktemp("clients") / "hello_vm"
    cc = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", "-O2",
                         "-I", os.path.join(REPO, "clients"), "-o", str(exe),
                         os.path.join(REPO, "tools", "hello_vm.c")],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return str(exe)


def run(exe, mnt, *args):
    env = dict(os.environ)
    env.pop("KVMFS_MNT", None)
    if mnt is not None:
        env["KVMFS_MNT"] = str(mnt)
    p = subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=TIMEOUT)
    where = f"KVMFS_MNT={mnt}" if mnt is not None else "/dev/kvm"
    assert p.returncode == 0, (f"hello_vm {' '.join(args)} on {where} exited {p.returncode}\n"
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
