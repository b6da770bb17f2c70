"""One ABI, checked everywhere: kvmfs/abi.py against every other copy.

kvmfs/abi.py is the source.  The other copies are checked against it:

- the host's <linux/kvm.h> and clients/kvmfs.h (which adds what an older host
  header lacks, e.g. guest_memfd): tools/abi_dump.c compiled against the header
  alone, and with kvmfs.h on top, prints every ioctl number, constant,
  capability, struct size and member offset and size the header has; each line
  must match abi.py, and with kvmfs.h every uapi name and member of abi.py must
  be there;
- native/kvmfs_internal.h (the daemon's C constants): abi_dump.c compiled with
  -DWITH_NATIVE_ABI, same comparison;
- native/kvm_abi.h (the C structs of the fast path): through the cffi module
  built from it, every struct's size and every member's offset and size, and
  every integer #define cffi exposes under an abi.py name.

The C compilations skip without gcc (and the host-header ones without a kernel
header); the cffi checks always run.
"""
import ctypes
import os
import shutil
import subprocess

import pytest

from kvmfs import abi

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(REPO, "tools", "abi_dump.c")
VARIANTS = {
    "system-header": [],
    "with-kvmfs-h": ["-DWITH_KVMFS_H", "-I", os.path.join(REPO, "clients")],
    "native-headers": ["-DWITH_NATIVE_ABI", "-I", os.path.join(REPO, "native")],
}

# abi.py names that no uapi header defines: kvmfs's answers, kernel-internal
# limits, the ioctl encoding's parts and x86 facts outside linux/kvm.h.
NOT_IN_UAPI = {
    "IOC_NONE", "IOC_WRITE", "IOC_READ", "API_VERSION", "VCPU_MMAP_SIZE",
    "KVM_USER_MEM_SLOTS", "KVM_ADDRESS_SPACE_NUM", "KVM_MAX_VCPUS", "KVM_MAX_VCPU_ID",
    "KVM_MAX_CPUID_ENTRIES", "KVM_MAX_MSR_ENTRIES", "KVM_MEM_FLAGS_V1", "PAGE_SIZE", "PAGE_SHIFT", "TASK_SIZE_MAX",
    "GUEST_PHYS_BITS", "MSR_IA32_SMBASE",
}
# abi.py classes that are parts of another struct (kvm_run's exit union members,
# the anonymous members of kvm_vcpu_events) or no C struct at all.
NOT_A_C_STRUCT = {"Struct", "u64_arg", "kvm_run_exit"}


def abi_constants():
    """{NAME: value} of every integer constant abi.py declares."""
    return {n: v for n, v in vars(abi).items()
            if n.isupper() and isinstance(v, int) and not isinstance(v, bool)}


def abi_structs():
    """{name: class} of the abi.py structs that linux/kvm.h declares under that name."""
    return {n: c for n, c in vars(abi).items()
            if isinstance(c, type) and issubclass(c, (ctypes.Structure, ctypes.Union))
            and not n.startswith(("_", "kvm_run_")) and n not in NOT_A_C_STRUCT}


def _is_part(t):
    """Is this member type declared inline in C (an anonymous or kvm_run exit struct)?"""
    return isinstance(t, type) and issubclass(t, (ctypes.Structure, ctypes.Union)) and (
        t.__name__.startswith(("_", "kvm_run_")) or t is abi.kvm_run_exit)


def member_paths(cls, prefix="", base=0):
    """{path: (offset, size)} of every member of cls and of its inline parts, as
    tools/abi_dump.c names them (kvm_run's exit union members at the top)."""
    out = {}
    for name, typ, *_ in cls._fields_:
        m = getattr(cls, name)
        if cls is abi.kvm_run and name == "exit":
            out.update(member_paths(typ, prefix, base + m.offset))
            continue
        out[prefix + name] = (base + m.offset, m.size)
        if _is_part(typ):
            out.update(member_paths(typ, prefix + name + ".", base + m.offset))
    return out


def abi_value(name):
    """What kvmfs/abi.py says NAME is (see tools/abi_dump.c for the name forms)."""
    if name == "KVM_API_VERSION":
        return abi.API_VERSION
    if name.isupper():
        return getattr(abi, name)
    struct, _, path = name.partition(".")
    cls = getattr(abi, struct)
    if not path:
        return ctypes.sizeof(cls)
    path, _, size = path.partition(":")
    offset, nbytes = member_paths(cls)[path]
    return nbytes if size else offset


def _dump(variant, tmp_path_factory):
    """{NAME: value} printed by tools/abi_dump.c compiled in one variant."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler (gcc) to build tools/abi_dump.c")
    if variant != "native-headers" and not os.path.exists("/usr/include/linux/kvm.h"):
        pytest.skip("no <linux/kvm.h> (install the kernel headers, e.g. linux-libc-dev)")
    exe = tmp_path_factory.mktemp("abi") / f"abi_dump-{variant}"
    cc = subprocess.run([gcc, "-Wall", "-Wextra", "-Werror", *VARIANTS[variant],
                         "-o", str(exe), SOURCE], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values = {}
    for line in out.splitlines():
        name, value = line.split()
        assert name not in values, f"{variant}: abi_dump printed {name} twice"
        values[name] = int(value)
    return variant, values


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    """Lazily compiled dumps, one per variant, shared by the module's tests."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = _dump(variant, tmp_path_factory)
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_dump_matches_abi(dumps, variant):
    """Every number a C header has for a name is the number abi.py has for it."""
    variant, values = dumps(variant)
    wrong = []
    for name, value in values.items():
        try:
            ours = abi_value(name)
        except (AttributeError, KeyError):
            wrong.append(f"{name}: C says {value:#x}, kvmfs/abi.py lacks it")
            continue
        if ours != value:
            wrong.append(f"{name}: C says {value:#x} ({value}), kvmfs/abi.py {ours:#x} ({ours})")
    assert not wrong, f"{variant}:\n" + "\n".join(wrong)


@pytest.mark.parametrize("variant", ["system-header", "with-kvmfs-h"])
def test_dump_covers_the_basics(dumps, variant):
    variant, values = dumps(variant)
    for name in ("KVM_RUN", "KVM_SET_USER_MEMORY_REGION", "kvm_run", "kvm_regs", "kvm_sregs",
                 "kvm_run.io.port", "kvm_run.mmio.data", "KVM_CAP_NR_MEMSLOTS"):
        assert name in values, f"{variant}: abi_dump printed no {name}"


def test_kvmfs_h_declares_all_of_abi_py(dumps):
    """With clients/kvmfs.h, C knows every uapi number and every struct member abi.py
    declares (the system header alone may be older than kvmfs), so tools/abi_dump.c
    compares all of them.  kvm_run.memory_fault needs a 6.8 header: kvmfs.h cannot add
    a member to the header's kvm_run."""
    _, system = dumps("system-header")
    _, values = dumps("with-kvmfs-h")
    missing = sorted(n for n in abi_constants() if n not in NOT_IN_UAPI and n not in values)
    for struct, cls in abi_structs().items():
        if struct not in values:
            missing.append(struct)
        for path in member_paths(cls):
            if struct == "kvm_run" and path.startswith("memory_fault") and \
                    "KVM_SET_USER_MEMORY_REGION2" not in system:
                continue
            for name in (f"{struct}.{path}", f"{struct}.{path}:size"):
                if name not in values:
                    missing.append(name)
    assert not missing, ("not printed by tools/abi_dump.c with clients/kvmfs.h (add the "
                         "line there, or the fallback to kvmfs.h): " + ", ".join(missing))


def test_native_headers_declare_the_memslot_abi(dumps):
    """The daemon's C constants are checked at all: native/kvmfs_internal.h still has them."""
    _, values = dumps("native-headers")
    for name in ("KVM_MEM_LOG_DIRTY_PAGES", "KVM_MEM_READONLY", "KVM_ADDRESS_SPACE_NUM",
                 "KVM_USER_MEM_SLOTS"):
        assert name in values, f"native headers: abi_dump printed no {name}"


# --- native/kvm_abi.h, through the cffi module built from it -------------------------
def _native():
    from kvmfs._kvmfs_native import ffi, lib
    return ffi, lib


def _cffi_paths(ffi, ctype, prefix="", base=0):
    """{path: (offset, size)} of a cffi struct's members, inline structs and unions
    (kvm_run's anonymous exit union is flattened by cffi itself) recursed into."""
    out = {}
    for name, f in ctype.fields:
        out[prefix + name] = (base + f.offset, ffi.sizeof(f.type))
        if f.type.kind in ("struct", "union") and (
                f.type.cname.startswith("struct $") or f.type.cname.startswith("union $")
                or f.type.cname.startswith("struct kvm_run_")):
            out.update(_cffi_paths(ffi, f.type, prefix + name + ".", base + f.offset))
    return out


def _kvm_abi_h_structs(ffi):
    return sorted(n for n in ffi.list_types()[1] if n.startswith("kvm_"))


def test_kvm_abi_h_structs_match_abi():
    """native/kvm_abi.h: each struct has abi.py's size, and each of its members abi.py's
    offset and size; abi.py declares every struct and member it has."""
    ffi, _ = _native()
    wrong = []
    for name in _kvm_abi_h_structs(ffi):
        ctype = ffi.typeof(f"struct {name}")
        cls = getattr(abi, name, None)
        if cls is None:
            wrong.append(f"struct {name}: kvmfs/abi.py lacks it")
            continue
        if ffi.sizeof(ctype) != ctypes.sizeof(cls):
            wrong.append(f"sizeof(struct {name}): C {ffi.sizeof(ctype)}, abi.py {ctypes.sizeof(cls)}")
        ours = member_paths(cls)
        for path, (offset, size) in _cffi_paths(ffi, ctype).items():
            if path not in ours:
                wrong.append(f"{name}.{path}: kvmfs/abi.py lacks it")
            elif ours[path] != (offset, size):
                wrong.append(f"{name}.{path}: C offset {offset} size {size}, "
                             f"abi.py offset {ours[path][0]} size {ours[path][1]}")
    assert not wrong, "native/kvm_abi.h:\n" + "\n".join(wrong)


def test_kvm_abi_h_covers_the_run_area():
    """The structs the fast path writes are checked at all: kvm_abi.h still declares them."""
    ffi, _ = _native()
    assert {"kvm_run", "kvm_regs", "kvm_sregs", "kvm_vcpu_events"} <= set(_kvm_abi_h_structs(ffi))


def test_native_module_constants_match_abi():
    """Every integer constant of the cffi module (the #defines of native/kvm_abi.h and
    kvmfs_native.h) that has an abi.py name has abi.py's value."""
    _, lib = _native()
    ours = abi_constants()
    wrong = [f"{n}: C {getattr(lib, n)}, abi.py {ours[n]}" for n in dir(lib)
             if n in ours and getattr(lib, n) != ours[n]]
    assert not wrong, "native module:\n" + "\n".join(wrong)


# --- abi.py on its own --------------------------------------------------------------
def test_kvmfs_answers_are_the_specs():
    """The values kvmfs answers with (spec sections 3, 4, 7.1), which the other tiers
    then compare against by name."""
    assert abi.API_VERSION == 12
    assert abi.VCPU_MMAP_SIZE == 3 * abi.PAGE_SIZE == 12288
    assert abi.KVM_USER_MEM_SLOTS == 32764
    assert abi.KVM_ADDRESS_SPACE_NUM == 2                # VMX/SVM with SMM
    assert (abi.KVM_MAX_VCPUS, abi.KVM_MAX_VCPU_ID) == (1024, 4096)
    assert abi.KVM_MAX_CPUID_ENTRIES == 256
    assert abi.KVM_MAX_MSR_ENTRIES == 256


def test_struct_sizes_are_the_specs():
    """kvmfs/abi.py's own table of sizes (spec section 5) holds for its ctypes structs."""
    for cls, size in abi.STRUCT_SIZES.items():
        assert ctypes.sizeof(cls) == size, cls.__name__
    assert ctypes.sizeof(abi.kvm_run) == 2352


def test_ioctl_numbers_encode_their_struct():
    """Each ioctl number's type byte is KVMIO, and the names table holds ioctls only."""
    for number, name in abi.IOCTL_NAMES.items():
        assert abi.ioc_type(number) == abi.KVMIO, name
        assert getattr(abi, name) == number
    assert not set(abi.IOCTL_NAMES.values()) & set(abi.CAP_NAMES)
    assert "KVM_RUN_X86_SMM" not in abi.IOCTL_NAMES.values()
