"""THE ioctl table: every ioctl kvmfs answers, declared once per fd kind.

A row names the ioctl (its number comes from kvmfs.abi under the same name),
the kind of file it is issued on, the handler (a method of System, Vm or Vcpu
named after the ioctl: KVM_SET_USER_MEMORY_REGION -> Vm.set_user_memory_region),
the capability that announces it and the errnos it documents (api.rst's card).
fs.py dispatches from this table, the text commands (commands.py) are built on
the same handlers, and the faulty-fd test sweeps it.  Adding an ioctl is one row
here plus its handler.

The ioctl number says how FUSE copies the argument: _IOW/_IOR/_IOWR structs
are copied in and/or out by their encoded size, _IO ones pass the integer arg.
"""
import collections
import errno

from kvmfs import abi

SYSTEM, VM, VCPU = "system", "vm", "vcpu"
FD_KINDS = (SYSTEM, VM, VCPU)

# What an unknown ioctl answers on each kind of fd (spec 3.1-3.3, measured on KVM).
UNKNOWN_ERRNO = {SYSTEM: errno.EINVAL, VM: errno.ENOTTY, VCPU: errno.EINVAL}

Ioctl = collections.namedtuple("Ioctl", "name number fd handler cap errnos")


def _row(name, fd, cap=None, errnos="", handler=None):
    return Ioctl(name, getattr(abi, name), fd, handler or name[len("KVM_"):].lower(), cap, errnos)


IOCTLS = (
    _row("KVM_GET_API_VERSION", SYSTEM, errnos="EINVAL (arg != 0)"),
    _row("KVM_CHECK_EXTENSION", SYSTEM),
    _row("KVM_GET_VCPU_MMAP_SIZE", SYSTEM, errnos="EINVAL (arg != 0)"),
    _row("KVM_CREATE_VM", SYSTEM, errnos="EINVAL (type)"),
    _row("KVM_GET_SUPPORTED_CPUID", SYSTEM, abi.KVM_CAP_EXT_CPUID, "E2BIG EFAULT"),

    _row("KVM_CHECK_EXTENSION", VM, abi.KVM_CAP_CHECK_EXTENSION_VM),
    _row("KVM_CREATE_VCPU", VM, errnos="EINVAL (id) EEXIST"),
    _row("KVM_SET_USER_MEMORY_REGION", VM, abi.KVM_CAP_USER_MEMORY, "EINVAL EEXIST"),
    _row("KVM_SET_USER_MEMORY_REGION2", VM, abi.KVM_CAP_USER_MEMORY2, "EINVAL EEXIST"),
    _row("KVM_SET_TSS_ADDR", VM, abi.KVM_CAP_SET_TSS_ADDR, "EINVAL"),
    _row("KVM_SET_IDENTITY_MAP_ADDR", VM, abi.KVM_CAP_SET_IDENTITY_MAP_ADDR, "EINVAL (vCPUs exist)"),
    _row("KVM_ENABLE_CAP", VM, abi.KVM_CAP_ENABLE_CAP_VM, "EINVAL"),
    _row("KVM_GET_DIRTY_LOG", VM, errnos="EINVAL ENOENT EFAULT"),
    _row("KVM_CLEAR_DIRTY_LOG", VM, abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, "EINVAL ENOENT EFAULT"),

    _row("KVM_RUN", VCPU, errnos="EINVAL EINTR EFAULT EIO"),
    _row("KVM_GET_REGS", VCPU),
    _row("KVM_SET_REGS", VCPU),
    _row("KVM_GET_SREGS", VCPU),
    _row("KVM_SET_SREGS", VCPU, errnos="EINVAL"),
    _row("KVM_GET_FPU", VCPU),
    _row("KVM_SET_FPU", VCPU),
    _row("KVM_INTERRUPT", VCPU, errnos="EINVAL (irq)"),
    _row("KVM_GET_MSRS", VCPU, errnos="E2BIG EFAULT"),
    _row("KVM_SET_MSRS", VCPU, errnos="E2BIG EFAULT"),
    _row("KVM_SET_CPUID2", VCPU, abi.KVM_CAP_EXT_CPUID, "E2BIG EFAULT EINVAL"),
    _row("KVM_SET_GUEST_DEBUG", VCPU, abi.KVM_CAP_SET_GUEST_DEBUG, "EINVAL"),
    _row("KVM_SMI", VCPU, abi.KVM_CAP_X86_SMM),
    _row("KVM_GET_VCPU_EVENTS", VCPU, abi.KVM_CAP_VCPU_EVENTS),
    _row("KVM_SET_VCPU_EVENTS", VCPU, abi.KVM_CAP_VCPU_EVENTS, "EINVAL"),
)

# fd kind -> ioctl number -> row
BY_FD = {kind: {row.number: row for row in IOCTLS if row.fd == kind} for kind in FD_KINDS}

def name_of(number):
    """"KVM_CREATE_IRQCHIP (0xae60)" or "ioctl 0x...(dir, type, nr, size)" for an unknown one."""
    name = abi.IOCTL_NAMES.get(number)
    if name is not None:
        return f"{name} (0x{number:x})"
    return (f"ioctl 0x{number:x} (dir {abi.ioc_dir(number)}, type 0x{abi.ioc_type(number):x}, "
            f"nr 0x{number & 0xff:x}, size {abi.ioc_size(number)})")


