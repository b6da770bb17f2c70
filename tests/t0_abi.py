"""kvmfs/abi.py against the C compiler's view of <linux/kvm.h>.

tools/abi_dump.c prints ioctl numbers, constants, capability numbers, struct sizes
and member offsets, one "NAME VALUE" a line, for whatever the header defines.  It
is compiled twice: against the system header alone, and with clients/kvmfs.h on
top (which adds what the older system header lacks, e.g. guest_memfd).  Every
printed line must match kvmfs/abi.py.  Skips without gcc or a kernel header.
"""
import ctypes
import os
import shutil
import subprocess

import pytest

from kvmfs import abi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "tools", "abi_dump.c")
VARIANTS = {"system-header": [], "with-kvmfs-h": ["-DWITH_KVMFS_H", "-I", os.path.join(REPO, "clients")]}


def abi_value(name):
    """What kvmfs/abi.py says NAME is (see tools/abi_dump.c for the name forms)."""
    if name == "KVMIO":
        return abi.KVMIO
    if name == "KVM_API_VERSION":
        return abi.API_VERSION
    if name.startswith("KVM_"):
        return getattr(abi, name)
    struct, _, path = name.partition(".")
    cls = getattr(abi, struct)
    if not path:
        return ctypes.sizeof(cls)
    offset = 0
    for member in path.split("."):
        fields = dict(cls._fields_)
        if member not in fields and "exit" in fields:   # kvm_run's (anonymous) exit union
            offset += cls.exit.offset
            cls = fields["exit"]
            fields = dict(cls._fields_)
        offset += getattr(cls, member).offset
        cls = fields[member]
    return offset


def _dump(variant, tmp_path_factory):
    """{NAME: value} printed by tools/abi_dump.c compiled in one variant."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler (gcc) to build tools/abi_dump.c")
    if not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("no <linux/kvm.h> (install the kernel headers, e.g. linux-libc-dev)")
    exe = tmp_path_factory.mktemp("abi") / f"abi_dump-{variant}"
    cc = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", *VARIANTS[variant],
                         "-o", str(exe), SOURCE], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        name, value = line.split()
        values[name] = int(value)
    return variant, values


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def dump(request, tmp_path_factory):
    return _dump(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def dump_with_kvmfs_h(tmp_path_factory):
    return _dump("with-kvmfs-h", tmp_path_factory)


def test_dump_matches_abi(dump):
    variant, values = dump
    wrong = []
    for name, value in values.items():
        try:
            ours = abi_value(name)
        except AttributeError:
            wrong.append(f"{name}: C says {value:#x}, kvmfs/abi.py lacks it")
            continue
        if ours != value:
            wrong.append(f"{name}: C says {value:#x} ({value}), kvmfs/abi.py {ours:#x} ({ours})")
    assert not wrong, f"{variant}: " + "\n".join(wrong)


def test_dump_covers_the_basics(dump):
    variant, values = dump
    for name in ("KVM_RUN", "KVM_SET_USER_MEMORY_REGION", "kvm_run", "kvm_regs", "kvm_sregs",
                 "kvm_run.io.port", "kvm_run.mmio.data", "KVM_CAP_NR_MEMSLOTS"):
        assert name in values, f"{variant}: abi_dump printed no {name}"


def test_kvmfs_h_declares_every_ioctl(dump_with_kvmfs_h):
    """With clients/kvmfs.h, C knows every ioctl and capability kvmfs/abi.py declares
    (the system header alone may be older than kvmfs)."""
    variant, values = dump_with_kvmfs_h
    missing = [n for n in list(abi.IOCTL_NAMES.values()) + [
        "KVM_CAP_" + c for c in abi.CAP_NAMES.values()] if n not in values]
    assert not missing, "clients/kvmfs.h lacks: " + ", ".join(sorted(missing))


def test_struct_sizes_are_the_specs():
    """kvmfs/abi.py's own table of sizes (spec section 5) holds for its ctypes structs."""
    for cls, size in abi.STRUCT_SIZES.items():
        assert ctypes.sizeof(cls) == size, cls.__name__
    assert ctypes.sizeof(abi.kvm_run) == 2352
