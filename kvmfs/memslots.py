"""KVM_SET_USER_MEMORY_REGION(2): argument checks in the kernel's order.

The checks of spec section 7.2 (steps 1-9) run here, on the argument alone;
the checks that depend on the slot's current state (7.3: DELETE of an absent
slot, overlap, resize, moved hva, READONLY toggle) and the commit run in C
(kvmfs_memslot_set), which returns the kind of change it made.  Nothing is
changed before every check has passed.
"""
import errno

from kvmfs import _native as native, abi
from kvmfs.errors import KvmError

MAX_NPAGES = (1 << 31) - 1


def check_region(op, slot, flags, gpa, size, hva, v2, guest_memfd_supported=False):
    """Spec 7.2 steps 1-9, in kernel order.  Returns (as_id, id)."""
    as_id, sid = slot >> 16, slot & 0xFFFF

    def fail(detail):
        raise KvmError(errno.EINVAL, op, detail)

    if sid >= abi.KVM_USER_MEM_SLOTS:                     # the ioctl wrapper's test runs first
        fail(f"slot id {sid} >= {abi.KVM_USER_MEM_SLOTS}")
    if not v2 and flags & ~abi.KVM_MEM_FLAGS_V1:           # 1
        fail(f"flags 0x{flags:x} not valid for KVM_SET_USER_MEMORY_REGION")
    valid = abi.KVM_MEM_LOG_DIRTY_PAGES | abi.KVM_MEM_READONLY
    if guest_memfd_supported:
        valid |= abi.KVM_MEM_GUEST_MEMFD
    if flags & ~valid:                                     # 2
        fail(f"unsupported flags 0x{flags:x}")
    if flags & abi.KVM_MEM_GUEST_MEMFD and flags & (abi.KVM_MEM_LOG_DIRTY_PAGES | abi.KVM_MEM_READONLY):
        fail("GUEST_MEMFD with LOG_DIRTY_PAGES or READONLY")
    if size & (abi.PAGE_SIZE - 1):                         # 3
        fail(f"memory_size 0x{size:x} not page aligned")
    if gpa & (abi.PAGE_SIZE - 1):                          # 4
        fail(f"guest_phys_addr 0x{gpa:x} not page aligned")
    if hva & (abi.PAGE_SIZE - 1) or hva + size > abi.TASK_SIZE_MAX:  # 5 (access_ok)
        fail(f"userspace_addr 0x{hva:x}+0x{size:x} not page aligned or not user memory")
    if as_id >= abi.KVM_ADDRESS_SPACE_NUM:                 # 7
        fail(f"address space {as_id} >= {abi.KVM_ADDRESS_SPACE_NUM}")
    if gpa + size >= 1 << 64:                              # 8
        fail("guest_phys_addr + memory_size wraps")
    if (size >> abi.PAGE_SHIFT) > MAX_NPAGES:              # 9
        fail(f"{size >> abi.PAGE_SHIFT} pages is more than 2^31-1")
    if size and ((gpa + size - 1) >> abi.GUEST_PHYS_BITS):  # 10, the x86 commit-time check
        fail(f"last gfn beyond the {abi.GUEST_PHYS_BITS}-bit guest physical address width")
    return as_id, sid


def set_region(mmu, op, slot, flags, gpa, size, hva, v2):
    """Check, then commit through C.  Returns the change name."""
    as_id, sid = check_region(op, slot, flags, gpa, size, hva, v2)
    return native.MEMSLOT_CHANGES[native.memslot_set(mmu, as_id, sid, flags, gpa, size, hva, op)]
