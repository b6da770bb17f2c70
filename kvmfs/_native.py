"""The binding layer: the only user of the compiled fast path (kvmfs._kvmfs_native).

One thin wrapper per exported C function (native/kvmfs_native.h), in the same
order and under the same name without the `kvmfs_` prefix.  Every wrapper
checks the C result once, here: a negative result is -errno and becomes
KvmError(errno, op); callers above never see a raw return code, and no other
kvmfs module touches `lib` or `ffi` for calls (tests of the C layer do).

Buffer lifetimes (the cffi equivalent of a SAFETY: note): a buffer handed to C
is owned by the Python caller and must outlive the call only, unless a wrapper
says otherwise (kvm_run areas and host mappings live as long as their owner).

Names that are not calls (struct types, KVMFS_* constants) are read through
`ffi`/`lib` of this module.
"""
import errno
import os

from kvmfs._kvmfs_native import ffi, lib
from kvmfs.errors import KvmError


def ensure(rc, op, detail="", warn=True):
    """rc, or KvmError(-rc, op) when rc is a negative errno."""
    if rc < 0:
        raise KvmError(-rc, op, detail, warn=warn)
    return rc


def new(ctype, init=None):
    """A zeroed C object owned by the caller (freed when the last reference goes)."""
    return ffi.new(ctype, init)


def addr(cdata):
    """The integer address of a cdata buffer (for process_vm_readv/writev)."""
    return int(ffi.cast("uintptr_t", cdata))


def cast(ctype, value):
    return ffi.cast(ctype, value)


def from_buffer(buf):
    """A char[] view of a Python buffer; the buffer stays exported while the view lives."""
    return ffi.from_buffer(buf)


def unpack(cdata, n):
    return ffi.buffer(cdata, n)[:]


NULL = ffi.NULL


# --- mmu.c: one MMU per VM ---------------------------------------------------------------
def mmu_new():
    """A new MMU; KvmError(ENOMEM) when C cannot allocate one.  Freed by mmu_free only."""
    mmu = lib.kvmfs_mmu_new()
    if mmu == ffi.NULL:
        raise KvmError(errno.ENOMEM, "KVM_CREATE_VM", "cannot allocate the MMU")
    return mmu


def mmu_free(mmu):
    lib.kvmfs_mmu_free(mmu)


# What kvmfs_memslot_set did (KVM's enum kvm_mr_change).
MEMSLOT_CHANGES = {lib.KVMFS_MR_CREATE: "create", lib.KVMFS_MR_DELETE: "delete", lib.KVMFS_MR_MOVE: "move",
                   lib.KVMFS_MR_FLAGS_ONLY: "flags", lib.KVMFS_MR_NONE: "none"}


def memslot_set(mmu, as_id, sid, flags, gpa, size, hva, op):
    """Commit one memslot change; returns the KVMFS_MR_* kind.  A refusal says
    which of C's rules refused it."""
    why = ffi.new("const char **")
    rc = lib.kvmfs_memslot_set(mmu, as_id, sid, flags, gpa, size, hva, why)
    if rc < 0:
        reason = ffi.string(why[0]).decode() if why[0] != ffi.NULL else "refused"
        raise KvmError(-rc, op, f"slot {as_id}:{sid} gpa 0x{gpa:x} size 0x{size:x} "
                       f"flags 0x{flags:x}: {reason}")
    return rc


def memslot_get(mmu, as_id, sid):
    """The slot as a struct kvmfs_slot_info, or None when it does not exist."""
    info = ffi.new("struct kvmfs_slot_info *")
    return info if lib.kvmfs_memslot_get(mmu, as_id, sid, info) >= 0 else None


def memslot_list(mmu, as_id):
    """The slots of one address space sorted by gpa, copied out of C as tuples of
    SLOT_FIELDS (an element of a cffi array is a view into memory freed with it)."""
    n = lib.kvmfs_memslot_count(mmu, as_id)
    out = ffi.new("struct kvmfs_slot_info[]", max(n, 1))
    n = min(lib.kvmfs_memslot_list(mmu, as_id, out, n), n)
    return [tuple(getattr(out[i], f) for f in SLOT_FIELDS) for i in range(n)]


SLOT_FIELDS = ("as_id", "id", "flags", "base_gfn", "npages", "userspace_addr", "dirty_count")


def memslot_count(mmu, as_id):
    return lib.kvmfs_memslot_count(mmu, as_id)


HOSTMEM_READONLY = lib.KVMFS_HOSTMEM_READONLY


def hostmem_add(mmu, hva, size, ptr, op, seq, flags=0):
    """Register daemon memory ptr as the VMM's [hva, hva+size); ptr must stay mapped
    until hostmem_remove returns it (or the MMU is freed).  seq: invalidate_seq()
    read before the VMM's memory was looked up; KvmError(EAGAIN) when an
    invalidation since (or in progress over the range) may have made it stale."""
    return ensure(lib.kvmfs_hostmem_add(mmu, hva, size, ptr, flags, seq), op,
                  f"host memory 0x{hva:x}+0x{size:x}", warn=False)


def hostmem_remove(mmu, hva, size, op="invalidate"):
    """Zap and forget the ranges overlapping [hva, hva+size); returns their daemon
    addresses and sizes (the caller unmaps them) and how many sptes were zapped."""
    ptrs = ffi.new("void *[]", 64)
    sizes = ffi.new("uint64_t[]", 64)
    zapped = ffi.new("uint64_t *")
    out = []
    while True:
        n = ensure(lib.kvmfs_hostmem_remove(mmu, hva, size, zapped, ptrs, sizes, 64), op,
                   f"0x{hva:x}+0x{size:x}")
        out += [(addr(ptrs[i]), sizes[i]) for i in range(n)]
        if n < 64:
            return out, zapped[0]


def invalidate_begin(mmu, start, end):
    lib.kvmfs_mmu_invalidate_begin(mmu, start, end)


def invalidate_end(mmu):
    lib.kvmfs_mmu_invalidate_end(mmu)


def invalidate_seq(mmu):
    return lib.kvmfs_mmu_invalidate_seq(mmu)


def invalidate_retry(mmu, seq, start, end):
    """Whether what was looked up of [start, end) at seq may be stale (retry it)."""
    return lib.kvmfs_mmu_invalidate_retry(mmu, seq, start, end) != 0


def mmu_access_gpa(mmu, as_id, gpa, buf, length, write):
    """Copy between guest-physical memory and buf (a char* cdata).  Returns
    (bytes done, miss_hva): done 0 with miss_hva set means resolve that hva first."""
    miss = ffi.new("uint64_t *")
    fn = lib.kvmfs_mmu_write_gpa if write else lib.kvmfs_mmu_read_gpa
    n = fn(mmu, as_id, gpa, buf, length, miss)
    return n, miss[0]


def dirty_set_manual_protect(mmu, options):
    lib.kvmfs_dirty_set_manual_protect(mmu, options)


def dirty_get_log(mmu, as_id, sid, buf, nbytes, op):
    return ensure(lib.kvmfs_dirty_get_log(mmu, as_id, sid, buf, nbytes), op)


def dirty_clear_log(mmu, as_id, sid, first_page, num_pages, mask, op):
    return ensure(lib.kvmfs_dirty_clear_log(mmu, as_id, sid, first_page, num_pages, mask), op)


def mmu_test_young(mmu, as_id, gfn, npages, op="test_young"):
    return ensure(lib.kvmfs_mmu_test_young(mmu, as_id, gfn, npages), op)


def mmu_clear_young(mmu, as_id, gfn, npages, op="clear_young"):
    return ensure(lib.kvmfs_mmu_clear_young(mmu, as_id, gfn, npages), op)


def mmu_get_stats(mmu):
    st = ffi.new("struct kvmfs_mmu_stats *")
    lib.kvmfs_mmu_get_stats(mmu, st)
    return {f: getattr(st, f) for f in dir(st)}


def view_piece(name, *args, cursor, size=1 << 16):
    """(text, cursor): the next piece of a C view (kvmfs_view_NAME: "sptes" for
    info/mmu, "dirty" for info/dirty/A.S) from cursor (0 at first); b"" at the end."""
    c = ffi.new("uint64_t *", cursor)
    buf = ffi.new("char[]", size)
    n = ensure(getattr(lib, "kvmfs_view_" + name)(*args, c, buf, size), "view " + name, warn=False)
    return ffi.unpack(buf, n), c[0]


# --- runarea.c: kvm_run areas the VMM may truncate -------------------------------------
def runarea_add(cdata, size):
    """Guard the kvm_run area at cdata (size bytes) until runarea_remove."""
    return ensure(lib.kvmfs_runarea_add(cdata, size), "register the kvm_run area")


def runarea_remove(cdata):
    lib.kvmfs_runarea_remove(cdata)


def runarea_replaced():
    return lib.kvmfs_runarea_replaced()


def runarea_install_guard():
    return ensure(lib.kvmfs_runarea_install_guard(), "install the SIGBUS guard")


def runarea_map(path, size):
    """(cdata, buffer) of `size` bytes of the file at path, mapped shared, zeroed and
    locked (runarea_unmap frees it); the GIL is released while the FUSE requests run."""
    out = ffi.new("void **")
    ensure(lib.kvmfs_runarea_map(os.fsencode(path), size, out), "map the kvm_run area", path)
    p = ffi.cast("char *", out[0])
    return p, ffi.buffer(p, size)


def runarea_unmap(cdata, size):
    lib.kvmfs_runarea_unmap(cdata, size)


# --- vcpu.c: one engine per vCPU ---------------------------------------------------------
def vcpu_set_exit_reason(v, reason):
    """kvm_run.exit_reason = reason, stored from C (runarea.c: never with the GIL held)."""
    lib.kvmfs_vcpu_set_exit_reason(v, reason)


def vcpu_new(mmu, vcpu_id, run):
    """A native vCPU over the kvm_run area `run`, which must stay mapped until vcpu_free."""
    v = lib.kvmfs_vcpu_new(mmu, vcpu_id, run)
    if v == ffi.NULL:
        raise KvmError(errno.ENOMEM, "KVM_CREATE_VCPU", "cannot create the emulator")
    return v


def vcpu_free(v):
    lib.kvmfs_vcpu_free(v)


RUN_NEED_HVA = lib.KVMFS_RUN_NEED_HVA
RUN_VM_DEAD = lib.KVMFS_RUN_VM_DEAD


def vcpu_run(v):
    """One KVM_RUN in C with the GIL released: 0, RUN_NEED_HVA, RUN_VM_DEAD or -errno
    (returned raw: the caller's loop tells these apart)."""
    return lib.kvmfs_vcpu_run(v)


def vcpu_miss_hva(v):
    return lib.kvmfs_vcpu_miss_hva(v)


def vcpu_kick(v):
    lib.kvmfs_vcpu_kick(v)


def vcpu_install_intr_signal(signo):
    return ensure(lib.kvmfs_vcpu_install_intr_signal(signo), "install the interrupt signal")


def vcpu_state(v, what, ctype, data, op):
    """KVM_GET_/SET_<what> on the struct at daemon address data (the FUSE buffer)."""
    return ensure(getattr(lib, "kvmfs_vcpu_" + what)(v, ffi.cast(ctype + " *", data)), op)


def vcpu_msrs(v, entries, n, write, op):
    fn = lib.kvmfs_vcpu_set_msrs if write else lib.kvmfs_vcpu_get_msrs
    return ensure(fn(v, entries, n), op)


def vcpu_set_cpuid(v, entries, n, op="KVM_SET_CPUID2"):
    return ensure(lib.kvmfs_vcpu_set_cpuid(v, entries, n), op)


def supported_cpuid(entries, n, op="KVM_GET_SUPPORTED_CPUID"):
    return ensure(lib.kvmfs_supported_cpuid(entries, n), op)


def vcpu_interrupt(v, irq, op="KVM_INTERRUPT"):
    return ensure(lib.kvmfs_vcpu_interrupt(v, irq), op)


def vcpu_smi(v, op="KVM_SMI"):
    return ensure(lib.kvmfs_vcpu_smi(v), op)


def vcpu_set_guest_debug(v, control, op="KVM_SET_GUEST_DEBUG"):
    return ensure(lib.kvmfs_vcpu_set_guest_debug(v, control), op)


def vcpu_get_stats(v):
    st = ffi.new("struct kvmfs_vcpu_stats *")
    lib.kvmfs_vcpu_get_stats(v, st)
    return st
