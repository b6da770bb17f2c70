"""Conformance cases: one table, run against real /dev/kvm and against a kvmfs mount.

Owns: the case table (CASES), the two backends that reach KVM's ioctls (RealKvm on
/dev/kvm, Kvmfs on a mount point, differing only in the fd convention of
ARCHITECTURE.md section 2) and the ioctl helpers the cases use.  It is a library:
tests/t4_conformance.py runs the table; `python tests/conformance.py [MNT]` prints it.

Each case is a small function `run(backend) -> result`.  A result is built from
plain values only: an ioctl's return value, the name of its errno ("EINVAL"), "fd"
for a call that produced a new fd (KVM) or id (kvmfs), and read-back values such as
a dirty bitmap word.  Every case carries the answer the spec gives
(spec/kvm-abi.md): `expect` is the ABI's answer, i.e. what KVM gives on a VMX/SVM
host and what kvmfs must give.  Where the answer depends on the host (spec section 1:
no SMM on the measuring PVM host, so address space 1 is refused there), `host`
maps a host kind ("pvm") to that host's answer; where kvmfs differs from KVM on
purpose, `kvmfs` holds kvmfs's answer and `why` says why.  A case is compared
between the two backends only when both are expected to give the same answer.

Guest memory is always memfd-backed MAP_SHARED memory (both KVM and kvmfs accept
it), allocated through the backend so that it is released after each case.
"""
import ast
import ctypes
import errno
import fcntl
import mmap
import os
import sys
from dataclasses import dataclass, field

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvmfs import abi  # noqa: E402

PAGE = abi.PAGE_SIZE
SAME = object()            # Case.kvmfs default: kvmfs gives KVM's answer
FD = "fd"                  # result of a successful KVM_CREATE_VM / KVM_CREATE_VCPU
UNKNOWN_IOCTL = abi.IO(0xFE)   # no KVM ioctl uses number 0xFE
KERNEL_HVA = 0xFFFF888000000000
HUGE_HVA = 1 << 44         # user address with room for 2^43 bytes below 2^47

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
_libc.ioctl.restype = ctypes.c_int
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


# --- ioctl helpers ----------------------------------------------------------------
def ioctl_raw(fd, request, arg=0):
    """ioctl(fd, request, arg); return its result, raise OSError on failure.

    `arg` is an int (passed by value, as `_IO` ioctls take it) or a ctypes object /
    bytearray (passed by pointer, copied back)."""
    if isinstance(arg, int):
        if 0 <= arg < 2 ** 31:
            return fcntl.ioctl(fd, request, arg)
        rc = _libc.ioctl(fd, request, arg & (2 ** 64 - 1))   # fcntl takes a C int only
        if rc < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return rc
    return fcntl.ioctl(fd, request, arg, True)


def errname(e):
    return errno.errorcode.get(e, str(e))


def ioctl(fd, request, arg=0):
    """Like ioctl_raw, but answer the errno's name ("EINVAL") instead of raising."""
    try:
        return ioctl_raw(fd, request, arg)
    except OSError as e:
        return errname(e.errno)


def slot_field(slot, as_id=0):
    return (as_id << 16) | slot


def set_memslot(vm, slot, gpa, size, hva, flags=0, as_id=0, v=1,
                gmem_fd=0, gmem_offset=0, pad=0):
    """KVM_SET_USER_MEMORY_REGION (v=1) or ..._REGION2 (v=2); 0 or errno name."""
    if v == 1:
        r = abi.kvm_userspace_memory_region(slot_field(slot, as_id), flags, gpa, size, hva)
        return ioctl(vm, abi.KVM_SET_USER_MEMORY_REGION, r)
    r = abi.kvm_userspace_memory_region2()
    r.slot, r.flags, r.guest_phys_addr = slot_field(slot, as_id), flags, gpa
    r.memory_size, r.userspace_addr = size, hva
    r.guest_memfd_offset, r.guest_memfd = gmem_offset, gmem_fd & 0xFFFFFFFF
    r.pad1 = pad
    for i in range(14):
        r.pad2[i] = pad
    return ioctl(vm, abi.KVM_SET_USER_MEMORY_REGION2, r)


def get_dirty_log(vm, slot, as_id=0, bitmap_addr=None):
    """KVM_GET_DIRTY_LOG; the first bitmap word (pages 0-63) or the errno name.

    The buffer starts all ones so that a bitmap KVM did not write cannot pass as 0.
    With `bitmap_addr`, KVM writes there instead, and the result is the return value."""
    bitmap = (ctypes.c_uint64 * 8)(*([2 ** 64 - 1] * 8))
    addr = ctypes.addressof(bitmap) if bitmap_addr is None else bitmap_addr
    log = abi.kvm_dirty_log(slot_field(slot, as_id), 0, addr)
    rc = ioctl(vm, abi.KVM_GET_DIRTY_LOG, log)
    return int(bitmap[0]) if rc == 0 and bitmap_addr is None else rc


def in_child(fn):
    """Run fn() in a forked child and return its (literal) result."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into the caller's code
        try:
            os.close(r)
            try:
                out = repr(fn())
            except BaseException as e:  # report, the parent asserts on it
                out = repr(("child raised", repr(e)))
            os.write(w, out.encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    return ast.literal_eval(b"".join(chunks).decode() or "None")


# --- backends -----------------------------------------------------------------------
class Backend:
    """The fds and memory of one case; `cleanup()` releases them all.

    Attributes: name (for reports), real (True for the host's /dev/kvm)."""
    name = "?"
    real = False

    def __init__(self):
        self._fds = []
        self._maps = []

    def _track(self, fd):
        self._fds.append(fd)
        return fd

    def open_system(self):
        return self._track(os.open(self.system_path, os.O_RDWR | os.O_CLOEXEC))

    def create_vm(self, sys_fd, vm_type=0):
        raise NotImplementedError

    def create_vcpu(self, vm_fd, vcpu_id):
        raise NotImplementedError

    def try_create_vm(self, sys_fd, vm_type=0):
        """FD, or the errno name."""
        try:
            self.create_vm(sys_fd, vm_type)
            return FD
        except OSError as e:
            return errname(e.errno)

    def try_create_vcpu(self, vm_fd, vcpu_id):
        try:
            self.create_vcpu(vm_fd, vcpu_id)
            return FD
        except OSError as e:
            return errname(e.errno)

    def vm(self):
        """A fresh default VM's fd."""
        return self.create_vm(self.open_system())

    def memfd(self, size):
        """memfd-backed MAP_SHARED memory of `size` bytes; returns its address."""
        fd = os.memfd_create("kvmfs-conformance", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        return self._keep(mm, size)

    def anonymous(self, size):
        """Private anonymous memory (what KVM accepts and kvmfs cannot share)."""
        mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                       mmap.PROT_READ | mmap.PROT_WRITE)
        return self._keep(mm, size)

    def readonly(self, size):
        """memfd memory mapped, then made read-only (mprotect)."""
        addr = self.memfd(size)
        if _libc.mprotect(ctypes.c_void_p(addr), ctypes.c_size_t(size), mmap.PROT_READ) < 0:
            raise OSError(ctypes.get_errno(), "mprotect")
        return addr

    def unmapped(self, size):
        """A page-aligned user address with nothing mapped there (just unmapped)."""
        mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf = (ctypes.c_char * size).from_buffer(mm)
        addr = ctypes.addressof(buf)
        del buf
        mm.close()
        return addr

    def _keep(self, mm, size):
        buf = (ctypes.c_char * size).from_buffer(mm)
        self._maps.append((mm, buf))
        return ctypes.addressof(buf)

    def cleanup(self):
        while self._fds:
            try:
                os.close(self._fds.pop())
            except OSError:
                pass
        while self._maps:
            mm, buf = self._maps.pop()
            del buf
            mm.close()


class RealKvm(Backend):
    """The host's KVM: new fds come straight from the ioctls."""
    name = "kvm"
    real = True

    def __init__(self, path="/dev/kvm"):
        super().__init__()
        self.system_path = path

    def create_vm(self, sys_fd, vm_type=0):
        return self._track(ioctl_raw(sys_fd, abi.KVM_CREATE_VM, vm_type))

    def create_vcpu(self, vm_fd, vcpu_id):
        return self._track(ioctl_raw(vm_fd, abi.KVM_CREATE_VCPU, vcpu_id))


class Kvmfs(Backend):
    """A kvmfs mount: the ioctls return ids; the fds are opened by path."""
    name = "kvmfs"
    real = False

    def __init__(self, mnt):
        super().__init__()
        self.mnt = str(mnt)
        self.system_path = os.path.join(self.mnt, "kvm")
        self._vm_dirs = {}

    def _open(self, path):
        return self._track(os.open(path, os.O_RDWR | os.O_CLOEXEC))

    def create_vm(self, sys_fd, vm_type=0):
        n = ioctl_raw(sys_fd, abi.KVM_CREATE_VM, vm_type)
        vm_dir = os.path.join(self.mnt, f"vm{n}")
        fd = self._open(os.path.join(vm_dir, "ctl"))
        self._vm_dirs[fd] = vm_dir
        return fd

    def create_vcpu(self, vm_fd, vcpu_id):
        k = ioctl_raw(vm_fd, abi.KVM_CREATE_VCPU, vcpu_id)
        return self._open(os.path.join(self._vm_dirs[vm_fd], f"vcpu{k}"))

    def cleanup(self):
        super().cleanup()
        self._vm_dirs.clear()


def host_kind():
    """Which KVM vendor module this host runs: "pvm", "vmx", "svm" or "unknown"."""
    for module, kind in (("kvm_pvm", "pvm"), ("kvm_intel", "vmx"), ("kvm_amd", "svm")):
        if os.path.isdir(f"/sys/module/{module}"):
            return kind
    return "unknown"


# --- the table ---------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    run: object
    expect: object                               # the ABI's answer (VMX/SVM KVM, kvmfs)
    host: dict = field(default_factory=dict)     # host kind -> that host's answer
    kvmfs: object = SAME                         # kvmfs's answer where it differs on purpose
    why: str = ""

    def expected_kvm(self, kind):
        return self.host.get(kind, self.expect)

    def expected_kvmfs(self):
        return self.expect if self.kvmfs is SAME else self.kvmfs

    def comparable(self, kind):
        """Do real KVM on this host and kvmfs owe the same answer?"""
        return self.expected_kvm(kind) == self.expected_kvmfs()


CASES = []
NO_SMM = "address space 1 needs SMM; the PVM host has none and refuses it (spec 1, 7.1)"


def _add(name, run, expect, host=None, kvmfs=SAME, why=""):
    assert name not in {c.name for c in CASES}, name
    CASES.append(Case(name, run, expect, host or {}, kvmfs, why))


def case(expect, host=None, kvmfs=SAME, why=""):
    """Register the decorated function as a case named after it."""
    def deco(fn):
        doc = (fn.__doc__ or "").strip()
        _add(fn.__name__.replace("_", "-"), fn, expect, host, kvmfs, why or doc)
        return fn
    return deco


# --- system fd ------------------------------------------------------------------------
@case(12)
def api_version(b):
    """KVM_GET_API_VERSION(0) -> 12 (spec 3.1)."""
    return ioctl(b.open_system(), abi.KVM_GET_API_VERSION, 0)


@case("EINVAL")
def api_version_nonzero_arg(b):
    """KVM_GET_API_VERSION with a nonzero argument -> EINVAL (spec 3.1)."""
    return ioctl(b.open_system(), abi.KVM_GET_API_VERSION, 1)


@case((12288, "EINVAL"))
def vcpu_mmap_size(b):
    """KVM_GET_VCPU_MMAP_SIZE(0) -> 12288; nonzero argument -> EINVAL (spec 3.1)."""
    s = b.open_system()
    return ioctl(s, abi.KVM_GET_VCPU_MMAP_SIZE, 0), ioctl(s, abi.KVM_GET_VCPU_MMAP_SIZE, 1)


@case("EINVAL")
def system_unknown_ioctl(b):
    """An unknown ioctl on the system fd -> EINVAL, not ENOTTY (spec 3.1, 13.3)."""
    return ioctl(b.open_system(), UNKNOWN_IOCTL, 0)


@case(("EINVAL", "EINVAL", "EINVAL", "EINVAL"))
def system_fd_vm_ioctl(b):
    """VM ioctls on the system fd -> EINVAL (spec 3.1)."""
    s = b.open_system()
    mem = abi.kvm_userspace_memory_region(0, 0, 0, PAGE, b.memfd(PAGE))
    return (ioctl(s, abi.KVM_CREATE_VCPU, 0),
            ioctl(s, abi.KVM_SET_USER_MEMORY_REGION, mem),
            ioctl(s, abi.KVM_SET_TSS_ADDR, 0xFFFBD000),
            ioctl(s, abi.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log()))


@case(("EINVAL", "EINVAL"))
def system_fd_vcpu_ioctl(b):
    """vCPU ioctls on the system fd -> EINVAL (spec 3.1)."""
    s = b.open_system()
    return ioctl(s, abi.KVM_RUN, 0), ioctl(s, abi.KVM_GET_REGS, abi.kvm_regs())


@case(FD)
def create_vm_default(b):
    """KVM_CREATE_VM(0) gives a VM (spec 3.1)."""
    return b.try_create_vm(b.open_system(), abi.KVM_X86_DEFAULT_VM)


@case("EINVAL")
def create_vm_bad_type(b):
    """KVM_CREATE_VM with an unknown type (0xdead) -> EINVAL (spec 3.1)."""
    return b.try_create_vm(b.open_system(), 0xDEAD)


@case((0, "EINVAL"))
def create_vm_unsupported_type(b):
    """Type 1 (SW_PROTECTED) is not in KVM_CAP_VM_TYPES -> EINVAL (spec 3.1, 4)."""
    s = b.open_system()
    types = ioctl(s, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_VM_TYPES)
    vm_type = abi.KVM_X86_SW_PROTECTED_VM
    return (types & 1 << vm_type if isinstance(types, int) else types,
            b.try_create_vm(s, vm_type))


# KVM_CHECK_EXTENSION, only for what kvmfs claims; values from spec section 4.
CAP_VALUES = {
    "HLT": 1, "USER_MEMORY": 1, "SET_TSS_ADDR": 1, "NR_MEMSLOTS": 32764,
    "DESTROY_MEMORY_REGION_WORKS": 1, "JOIN_MEMORY_REGIONS_WORKS": 1,
    "SET_IDENTITY_MAP_ADDR": 1, "MAX_VCPUS": 1024, "READONLY_MEM": 1, "ENABLE_CAP_VM": 1,
    "CHECK_EXTENSION_VM": 1, "MULTI_ADDRESS_SPACE": 2, "MAX_VCPU_ID": 4096,
    "USER_MEMORY2": 1, "VM_TYPES": 1, "VCPU_EVENTS": 1,
}
CAP_HOST = {"MULTI_ADDRESS_SPACE": {"pvm": (0, 0)}}   # spec 1: no SMM there


def _check_extension(cap):
    def run(b):
        s = b.open_system()
        vm = b.create_vm(s)
        return ioctl(s, abi.KVM_CHECK_EXTENSION, cap), ioctl(vm, abi.KVM_CHECK_EXTENSION, cap)
    return run


for _name, _value in CAP_VALUES.items():
    _cap = getattr(abi, "KVM_CAP_" + _name)
    if abi.CAPS.get(_cap):   # compare only what kvmfs claims to support
        _add(f"check-extension-{_name.lower().replace('_', '-')}", _check_extension(_cap),
             (_value, _value), CAP_HOST.get(_name),
             why=f"KVM_CHECK_EXTENSION({_name}) on the system and VM fd (spec 4)")

_add("check-extension-unknown", _check_extension(9999), (0, 0),
     why="an unknown capability answers 0 on the system and VM fd (spec 4)")
_add("check-extension-x86-smm", _check_extension(abi.KVM_CAP_X86_SMM), (1, 1),
     {"pvm": (0, 0)},
     why="SMM (KVM_SMI, RSM, address space 1) as on VMX/SVM hosts; PVM has none (spec 1, 4)")


# --- VM fd ------------------------------------------------------------------------------
@case(("EFAULT", "EFAULT", "EFAULT"))
def vm_ioctl_null_struct_pointer(b):
    """A pointer-argument ioctl given NULL or a kernel address -> EFAULT (spec 3.2, 12)."""
    vm = b.vm()
    return (ioctl(vm, abi.KVM_SET_USER_MEMORY_REGION, 0),
            ioctl(vm, abi.KVM_GET_DIRTY_LOG, 0),
            ioctl(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, KERNEL_HVA))


@case("ENOTTY")
def vm_unknown_ioctl(b):
    """An unknown ioctl on a VM fd -> ENOTTY (spec 3.2)."""
    return ioctl(b.vm(), UNKNOWN_IOCTL, 0)


@case(("ENOTTY", "ENOTTY"))
def vm_fd_vcpu_ioctl(b):
    """KVM_RUN and KVM_GET_REGS on a VM fd -> ENOTTY (spec 3.2)."""
    vm = b.vm()
    return ioctl(vm, abi.KVM_RUN, 0), ioctl(vm, abi.KVM_GET_REGS, abi.kvm_regs())


@case((FD, FD))
def create_vcpu_ids(b):
    """vCPU ids 0 and 4095 (MAX_VCPU_ID - 1) are accepted (spec 3.2)."""
    vm = b.vm()
    return b.try_create_vcpu(vm, 0), b.try_create_vcpu(vm, 4095)


@case(("EINVAL", FD))
def create_vcpu_id_4096(b):
    """vCPU id 4096 (= MAX_VCPU_ID) -> EINVAL; 4095 then works (spec 3.2)."""
    vm = b.vm()
    return b.try_create_vcpu(vm, 4096), b.try_create_vcpu(vm, 4095)


@case(("EINVAL", "EINVAL", "EINVAL", FD, FD))
def create_vcpu_id_2_32(b):
    """vCPU ids >= 2^32 -> EINVAL, and do not create the id of their low 32 bits (spec 3.2)."""
    vm = b.vm()
    return (b.try_create_vcpu(vm, 1 << 32), b.try_create_vcpu(vm, (1 << 32) + 1),
            b.try_create_vcpu(vm, 2 ** 64 - 1), b.try_create_vcpu(vm, 0),
            b.try_create_vcpu(vm, 1))


@case((FD, "EEXIST", FD))
def create_vcpu_duplicate(b):
    """A vCPU id already in use -> EEXIST; another id still works (spec 3.2)."""
    vm = b.vm()
    return b.try_create_vcpu(vm, 3), b.try_create_vcpu(vm, 3), b.try_create_vcpu(vm, 4)


@case("EINVAL")
def vcpu_unknown_ioctl(b):
    """An unknown ioctl on a vCPU fd -> EINVAL, not ENOTTY (spec 3.3, 13.3)."""
    vm = b.vm()
    return ioctl(b.create_vcpu(vm, 0), UNKNOWN_IOCTL, 0)


@case("EINVAL")
def vcpu_run_nonzero_arg(b):
    """KVM_RUN with a nonzero argument -> EINVAL (spec 3.3)."""
    vm = b.vm()
    return ioctl(b.create_vcpu(vm, 0), abi.KVM_RUN, 1)


@case((0, 0, "EINVAL", "EINVAL"))
def set_tss_addr(b):
    """KVM_SET_TSS_ADDR: 0xfffbd000 and 0xfffff000-3 pages are fine, above -> EINVAL (spec 3.2)."""
    vm = b.vm()
    return (ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFBD000),
            ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFFD000),
            ioctl(vm, abi.KVM_SET_TSS_ADDR, 0xFFFFE000),
            ioctl(vm, abi.KVM_SET_TSS_ADDR, 1 << 32))


@case((0, 0, FD, "EINVAL"))
def set_identity_map_addr(b):
    """KVM_SET_IDENTITY_MAP_ADDR: 0 before any vCPU (twice), EINVAL after (spec 3.2)."""
    vm = b.vm()
    return (ioctl(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, abi.u64_arg(0xFFFBC000)),
            ioctl(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, abi.u64_arg(0xFEFFC000)),
            b.try_create_vcpu(vm, 0),
            ioctl(vm, abi.KVM_SET_IDENTITY_MAP_ADDR, abi.u64_arg(0xFFFBC000)))


@case((12, "EIO", "EIO", "EIO", "EIO", 1))
def vm_ioctl_from_child_process(b):
    """VM and vCPU ioctls from a forked child -> EIO; the system fd still works (spec 3.2)."""
    s = b.open_system()
    vm = b.create_vm(s)
    vcpu = b.create_vcpu(vm, 0)
    hva = b.memfd(PAGE)

    def child():
        return (ioctl(s, abi.KVM_GET_API_VERSION, 0),
                ioctl(vm, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_USER_MEMORY),
                ioctl(vm, abi.KVM_CREATE_VCPU, 1),
                set_memslot(vm, 0, 0, PAGE, hva),
                ioctl(vcpu, abi.KVM_GET_REGS, abi.kvm_regs()))
    return in_child(child) + (ioctl(vm, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_USER_MEMORY),)


# --- memslots: spec 7 and 12, in both address spaces and through both ioctls --------
class Slots:
    """A fresh VM plus 16 pages of memfd memory, for memslot cases."""
    NPAGES = 16

    def __init__(self, b, as_id, v=1):
        self.b, self.as_id, self.v = b, as_id, v
        self.vm = b.vm()
        self.hva = b.memfd(self.NPAGES * PAGE)

    def set(self, slot, gpa, size, hva=None, flags=0, as_id=None, **kw):
        return set_memslot(self.vm, slot, gpa, size, self.hva if hva is None else hva, flags,
                           as_id=self.as_id if as_id is None else as_id, v=self.v, **kw)

    def host_write(self, offset, size):
        """Store into the slot memory from the host side (never dirty-logged, spec 8.1)."""
        ctypes.memset(self.hva + offset, 0x5A, size)

    def log(self, slot, as_id=None, bitmap_addr=None):
        return get_dirty_log(self.vm, slot, self.as_id if as_id is None else as_id, bitmap_addr)


LOG = abi.KVM_MEM_LOG_DIRTY_PAGES
RO = abi.KVM_MEM_READONLY
P2 = 2 * PAGE
MiB = 1 << 20

# name -> (expect, run(s: Slots)); each becomes name/asN/vM.
MEMSLOT_RULES = {
    # 7.1 encoding
    "slot-id-32763": ((0, 0), lambda s: (s.set(32763, 0, P2), s.set(32763, 0, 0))),
    "slot-id-32764": (("EINVAL",), lambda s: (s.set(32764, 0, P2),)),
    "slot-id-0xffff": (("EINVAL",), lambda s: (s.set(0xFFFF, 0, P2),)),
    # 7.2 checks
    "flag-bit3": (("EINVAL",), lambda s: (s.set(0, 0, P2, flags=1 << 3),)),
    "flag-bit16": (("EINVAL",), lambda s: (s.set(0, 0, P2, flags=1 << 16),)),
    "size-unaligned": (("EINVAL", "EINVAL"),
                       lambda s: (s.set(0, 0, PAGE + 512), s.set(0, 0, 512))),
    "gpa-unaligned": (("EINVAL",), lambda s: (s.set(0, 0x800, P2),)),
    "hva-unaligned": (("EINVAL",), lambda s: (s.set(0, 0, PAGE, hva=s.hva + 8),)),
    "hva-kernel": (("EINVAL",), lambda s: (s.set(0, 0, PAGE, hva=KERNEL_HVA),)),
    "gpa-wrap": (("EINVAL",), lambda s: (s.set(0, 2 ** 64 - PAGE, P2),)),
    "too-many-pages": (("EINVAL", 0), lambda s: (s.set(0, 0, (1 << 31) * PAGE, hva=HUGE_HVA),
                                                  s.set(0, 0, P2, hva=HUGE_HVA))),
    "gpa-2-52": (("EINVAL",), lambda s: (s.set(0, 1 << 52, PAGE),)),
    "readonly-create": ((0, 0), lambda s: (s.set(0, 0, P2, flags=RO),
                                            s.set(1, MiB, P2, flags=RO | LOG))),
    "unmapped-hva": ((0,), lambda s: (s.set(0, 0, 4 * PAGE, hva=s.b.unmapped(4 * PAGE)),)),
    "anonymous-private": ((0,), lambda s: (s.set(0, 0, 4 * PAGE, hva=s.b.anonymous(4 * PAGE)),)),
    # 7.3 create, delete
    "create-delete": ((0, 0), lambda s: (s.set(0, 0, P2), s.set(0, 0, 0))),
    "delete-absent": (("EINVAL",), lambda s: (s.set(5, 0, 0),)),
    "delete-twice": ((0, 0, "EINVAL"),
                     lambda s: (s.set(0, 0, P2), s.set(0, 0, 0), s.set(0, 0, 0))),
    "delete-ignores-other-fields": (
        (0, 0), lambda s: (s.set(0, 0, P2), s.set(0, 16 * MiB, 0, hva=s.hva + P2, flags=LOG))),
    "delete-frees-range": ((0, 0, 0), lambda s: (s.set(0, 0, P2), s.set(0, 0, 0),
                                                 s.set(1, 0, P2))),
    "overlap-on-create": (
        (0, "EEXIST", "EEXIST", "EEXIST", "EEXIST"),
        lambda s: (s.set(0, 4 * PAGE, 4 * PAGE),
                   s.set(1, 2 * PAGE, 4 * PAGE),       # covers the first half
                   s.set(1, 6 * PAGE, 4 * PAGE),       # covers the second half
                   s.set(1, 0, 16 * PAGE),             # contains it
                   s.set(1, 5 * PAGE, PAGE))),         # inside it
    "adjacent": ((0, 0, 0), lambda s: (s.set(0, 4 * PAGE, 4 * PAGE),
                                       s.set(1, 0, 4 * PAGE),
                                       s.set(2, 8 * PAGE, 4 * PAGE))),
    "shared-host-memory": ((0, 0), lambda s: (s.set(0, 0, 4 * PAGE), s.set(1, MiB, 4 * PAGE))),
    # 7.3 changes of an existing slot
    "identical": ((0, 0), lambda s: (s.set(0, 0, P2), s.set(0, 0, P2))),
    "resize": ((0, "EINVAL", "EINVAL"),
               lambda s: (s.set(0, 0, 4 * PAGE), s.set(0, 0, 8 * PAGE), s.set(0, 0, P2))),
    "changed-hva": ((0, "EINVAL"), lambda s: (s.set(0, 0, P2), s.set(0, 0, P2, hva=s.hva + P2))),
    "readonly-toggle-on": ((0, "EINVAL"), lambda s: (s.set(0, 0, P2), s.set(0, 0, P2, flags=RO))),
    "readonly-toggle-off": ((0, "EINVAL"), lambda s: (s.set(0, 0, P2, flags=RO), s.set(0, 0, P2))),
    "move": ((0, 0, 0, "EEXIST"),
             lambda s: (s.set(0, 0, P2), s.set(0, MiB, P2),
                        s.set(1, 0, P2),                 # the old place is free
                        s.set(2, MiB, P2))),             # the new one is taken
    "move-overlapping-own-range": ((0, 0), lambda s: (s.set(0, 0, 4 * PAGE),
                                                      s.set(0, 2 * PAGE, 4 * PAGE))),
    "move-overlapping-another": ((0, 0, "EEXIST"),
                                 lambda s: (s.set(0, 0, P2), s.set(1, MiB, P2),
                                            s.set(0, MiB + PAGE, P2))),
    "move-toggles-log": ((0, 0, 0), lambda s: (s.set(0, 0, P2), s.set(0, MiB, P2, flags=LOG),
                                               s.log(0))),
    "move-keeps-log": ((0, 0, 0), lambda s: (s.set(0, 0, P2, flags=LOG), s.set(0, MiB, P2, flags=LOG),
                                             s.log(0))),
    "flags-only-log-toggle": ((0, "ENOENT", 0, 0, 0, "ENOENT"),
                              lambda s: (s.set(0, 0, P2), s.log(0),
                                         s.set(0, 0, P2, flags=LOG), s.log(0),
                                         s.set(0, 0, P2), s.log(0))),
    # 8.1 KVM_GET_DIRTY_LOG
    "dirty-log-not-logging": ((0, "ENOENT"), lambda s: (s.set(0, 0, P2), s.log(0))),
    "dirty-log-absent-slot": (("ENOENT",), lambda s: (s.log(7),)),
    "dirty-log-fresh-slot": ((0, 0), lambda s: (s.set(0, 0, 4 * PAGE, flags=LOG), s.log(0))),
    "dirty-log-id-32764": (("EINVAL",), lambda s: (s.log(32764),)),
    "dirty-log-host-writes-not-logged": (
        (0, 0), lambda s: (s.set(0, 0, 4 * PAGE, flags=LOG), s.host_write(0, 4 * PAGE),
                           s.log(0))[::2]),
    "dirty-log-bitmap-unwritable": (
        (0, "EFAULT", "EFAULT", "EFAULT"),
        lambda s: (s.set(0, 0, 4 * PAGE, flags=LOG), s.log(0, bitmap_addr=0),
                   s.log(0, bitmap_addr=s.b.readonly(PAGE)), s.log(0, bitmap_addr=KERNEL_HVA))),
}
CONTROL_SLOT = 9   # slot id and gpa (1 GiB) no rule above uses
V1_ONLY = {"dirty-log-not-logging", "dirty-log-absent-slot", "dirty-log-id-32764",
           "dirty-log-host-writes-not-logged", "dirty-log-bitmap-unwritable"}


def _memslot_case(name, expect, rule, as_id, v):
    why = f"spec 7/8/12 rule '{name}' in address space {as_id} through " + (
        "KVM_SET_USER_MEMORY_REGION" if v == 1 else "KVM_SET_USER_MEMORY_REGION2")
    if as_id == 1:
        why += "; " + NO_SMM
    if 0 not in expect:
        # Only refusals: end with a valid slot, so that a VM refusing everything fails.
        expect, plain = expect + (0,), rule

        def rule(s):
            return plain(s) + (s.set(CONTROL_SLOT, 1 << 30, P2),)
    host = {"pvm": ("EINVAL",) * len(expect)} if as_id == 1 else None
    _add(f"memslot-{name}/as{as_id}/v{v}", lambda b: rule(Slots(b, as_id, v)), expect, host,
         why=why)


for _name, (_expect, _rule) in MEMSLOT_RULES.items():
    for _as in (0, 1):
        for _v in ((1,) if _name in V1_ONLY else (1, 2)):
            _memslot_case(_name, _expect, _rule, _as, _v)


@case(("EINVAL", "EINVAL", "EINVAL", 0))
def memslot_as_id_2(b):
    """as_id 2 and 0xffff are beyond the address spaces -> EINVAL, also for GET_DIRTY_LOG (7.1, 8.1)."""
    s = Slots(b, 2)
    return s.set(0, 0, P2), s.set(0, 0, P2, as_id=0xFFFF), s.log(0), s.set(0, 0, P2, as_id=0)


@case((0, 0, 0, "EEXIST"), host={"pvm": (0, "EINVAL", "EINVAL", "EINVAL")}, why=(
    "address spaces are independent: the same id and range in both is fine (7.1); " + NO_SMM))
def memslot_address_spaces_independent(b):
    s = Slots(b, 0)
    return (s.set(0, 0, P2), s.set(0, 0, P2, as_id=1), s.set(1, MiB, P2, as_id=1),
            s.set(2, MiB, P2, as_id=1))


@case((0, 0), why="REGION2 padding is not checked (spec 5)")
def memslot_v2_padding_ignored(b):
    s = Slots(b, 0, v=2)
    return s.set(0, 0, P2, pad=0xA5A5A5A5), s.set(0, 0, 0, pad=0xFFFFFFFF)


def _gmem_rules(as_id):
    """The GUEST_MEMFD flag; each case ends with a valid slot as a control."""
    sfx = f"/as{as_id}"
    gmem = abi.KVM_MEM_GUEST_MEMFD

    def add(name, v, flags, expect, kvmfs=SAME, why="", **kw):
        def run(b):
            s = Slots(b, as_id, v)
            return s.set(0, 0, P2, flags=flags, **kw), s.set(CONTROL_SLOT, 1 << 30, P2)
        host = {"pvm": ("EINVAL", "EINVAL")} if as_id == 1 else None
        _add(f"memslot-guest-memfd-{name}{sfx}", run, (expect, 0), host,
             SAME if kvmfs is SAME else (kvmfs, 0),
             why=why + ("; " + NO_SMM if as_id == 1 else ""))

    add("through-v1", 1, gmem, "EINVAL",
        why="KVM_SET_USER_MEMORY_REGION takes only LOG_DIRTY_PAGES|READONLY (7.2 step 1)")
    add("with-log", 2, gmem | LOG, "EINVAL",
        why="GUEST_MEMFD with LOG_DIRTY_PAGES -> EINVAL (7.2 step 2)")
    add("with-readonly", 2, gmem | RO, "EINVAL",
        why="GUEST_MEMFD with READONLY -> EINVAL (7.2 step 2)")
    add("offset-unaligned", 2, gmem, "EINVAL", gmem_fd=-1, gmem_offset=0x800,
        why="guest_memfd_offset not page-aligned -> EINVAL before the fd is looked up "
            "(7.2 step 6); kvmfs refuses the flag itself, also EINVAL")
    add("through-v2", 2, gmem, "EBADF", kvmfs="EINVAL", gmem_fd=-1,
        why="KVM looks the guest_memfd up (-1: EBADF, 9.3); kvmfs does not support "
            "guest_memfd yet (KVM_CAP_GUEST_MEMFD = 0) and refuses the flag as KVM refuses "
            "an unsupported flag: EINVAL (7.2 step 2)")


for _as in (0, 1):
    _gmem_rules(_as)


def by_name(name):
    for c in CASES:
        if c.name == name:
            return c
    raise KeyError(name)


def run_case(backend, c):
    """Run one case on one backend and release everything it made."""
    try:
        return c.run(backend)
    finally:
        backend.cleanup()


def main(argv):
    """Print every case's result on /dev/kvm and (given a mount point) on kvmfs."""
    kind = host_kind()
    backends = [RealKvm()] if os.path.exists("/dev/kvm") else []
    if len(argv) > 1:
        backends.append(Kvmfs(argv[1]))
    bad = 0
    for c in CASES:
        cells = []
        for b in backends:
            want = c.expected_kvm(kind) if b.real else c.expected_kvmfs()
            try:
                got = run_case(b, c)
            except Exception as e:
                got = f"raised {e!r}"
            mark = "ok" if got == want else f"FAIL (want {want!r})"
            bad += got != want
            cells.append(f"{b.name}={got!r} {mark}")
        print(f"{c.name:55} " + "  ".join(cells))
    print(f"{len(CASES)} cases on host kind {kind}; {bad} results differ from the spec")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
