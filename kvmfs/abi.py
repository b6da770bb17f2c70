"""The KVM ABI subset kvmfs speaks (x86-64), declared once.

Owns: ioctl numbers (built from direction, type, number and struct size),
capability numbers and the values kvmfs answers for them, exit reasons, memslot
flags and the ctypes layouts of every fixed-size argument struct.  Everything
else in kvmfs, the Python client and the tests read these names; nothing else
writes an ioctl number or a struct offset down.  The numbers and layouts are
those of linux/kvm.h (see spec/kvm-abi.md).

This is the source the C copies are checked against (tests/t0_abi.py): the
host's <linux/kvm.h> and clients/kvmfs.h through tools/abi_dump.c,
native/kvmfs_internal.h the same way, and native/kvm_abi.h through the cffi
module built from it.  A name added here that the uapi headers define must
also be printed by tools/abi_dump.c (and get a fallback in clients/kvmfs.h
when older host headers lack it); t0 says which.
"""
import ctypes
import os

# --- ioctl encoding: dir << 30 | size << 16 | type << 8 | nr -------------------
IOC_NONE, IOC_WRITE, IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction, nr, size, kind=KVMIO):
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def IO(nr):
    return _ioc(IOC_NONE, nr, 0)


def IOW(nr, struct):
    return _ioc(IOC_WRITE, nr, ctypes.sizeof(struct))


def IOR(nr, struct):
    return _ioc(IOC_READ, nr, ctypes.sizeof(struct))


def IOWR(nr, struct):
    return _ioc(IOC_READ | IOC_WRITE, nr, ctypes.sizeof(struct))


def ioc_dir(cmd):
    return (cmd >> 30) & 3


def ioc_size(cmd):
    return (cmd >> 16) & 0x3FFF


def ioc_type(cmd):
    return (cmd >> 8) & 0xFF


# --- structs ---------------------------------------------------------------------
class Struct(ctypes.Structure):
    """A kvm_* struct; bytes(s) and Struct.from_bytes(b) for the wire form."""

    @classmethod
    def from_bytes(cls, data):
        return cls.from_buffer_copy(bytes(data).ljust(ctypes.sizeof(cls), b"\0")[:ctypes.sizeof(cls)])


class kvm_userspace_memory_region(Struct):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class kvm_userspace_memory_region2(Struct):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64), ("guest_memfd_offset", ctypes.c_uint64),
                ("guest_memfd", ctypes.c_uint32), ("pad1", ctypes.c_uint32),
                ("pad2", ctypes.c_uint64 * 14)]


class kvm_dirty_log(Struct):
    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


class kvm_clear_dirty_log(Struct):
    _fields_ = [("slot", ctypes.c_uint32), ("num_pages", ctypes.c_uint32),
                ("first_page", ctypes.c_uint64), ("dirty_bitmap", ctypes.c_uint64)]


class kvm_enable_cap(Struct):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("args", ctypes.c_uint64 * 4), ("pad", ctypes.c_uint8 * 64)]


class kvm_create_guest_memfd(Struct):
    _fields_ = [("size", ctypes.c_uint64), ("flags", ctypes.c_uint64),
                ("reserved", ctypes.c_uint64 * 6)]


class kvm_memory_attributes(Struct):
    _fields_ = [("address", ctypes.c_uint64), ("size", ctypes.c_uint64),
                ("attributes", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


class kvm_regs(Struct):
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10",
        "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32),
                ("selector", ctypes.c_uint16)] + [
        (n, ctypes.c_uint8) for n in ("type", "present", "dpl", "db", "s", "l", "g",
                                     "avl", "unusable", "padding")]


class kvm_dtable(Struct):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16),
                ("padding", ctypes.c_uint16 * 3)]


SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class kvm_sregs(Struct):
    _fields_ = [(n, kvm_segment) for n in SEGMENTS] + [
        ("gdt", kvm_dtable), ("idt", kvm_dtable)] + [
        (n, ctypes.c_uint64) for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                                      "apic_base")] + [
        ("interrupt_bitmap", ctypes.c_uint64 * 4)]


class kvm_fpu(Struct):
    _fields_ = [("fpr", ctypes.c_uint8 * 16 * 8), ("fcw", ctypes.c_uint16),
                ("fsw", ctypes.c_uint16), ("ftwx", ctypes.c_uint8), ("pad1", ctypes.c_uint8),
                ("last_opcode", ctypes.c_uint16), ("last_ip", ctypes.c_uint64),
                ("last_dp", ctypes.c_uint64), ("xmm", ctypes.c_uint8 * 16 * 16),
                ("mxcsr", ctypes.c_uint32), ("pad2", ctypes.c_uint32)]


class kvm_interrupt(Struct):
    _fields_ = [("irq", ctypes.c_uint32)]


class kvm_msr_entry(Struct):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32),
                ("data", ctypes.c_uint64)]


class kvm_msrs(Struct):
    """Header only: `nmsrs` entries of kvm_msr_entry follow in the caller's memory."""
    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class kvm_msr_list(Struct):
    """Header only: `nmsrs` u32 indices follow in the caller's memory."""
    _fields_ = [("nmsrs", ctypes.c_uint32)]


class kvm_cpuid_entry2(Struct):
    _fields_ = [(n, ctypes.c_uint32) for n in (
        "function", "index", "flags", "eax", "ebx", "ecx", "edx")] + [
        ("padding", ctypes.c_uint32 * 3)]


class kvm_cpuid2(Struct):
    """Header only: `nent` kvm_cpuid_entry2 follow in the caller's memory."""
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class kvm_guest_debug(Struct):
    _fields_ = [("control", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("debugreg", ctypes.c_uint64 * 8)]


class _events_exception(Struct):
    _fields_ = [("injected", ctypes.c_uint8), ("nr", ctypes.c_uint8),
                ("has_error_code", ctypes.c_uint8), ("pending", ctypes.c_uint8),
                ("error_code", ctypes.c_uint32)]


class _events_interrupt(Struct):
    _fields_ = [(n, ctypes.c_uint8) for n in ("injected", "nr", "soft", "shadow")]


class _events_nmi(Struct):
    _fields_ = [(n, ctypes.c_uint8) for n in ("injected", "pending", "masked", "pad")]


class _events_smi(Struct):
    _fields_ = [(n, ctypes.c_uint8) for n in ("smm", "pending", "smm_inside_nmi", "latched_init")]


class _events_triple_fault(Struct):
    _fields_ = [("pending", ctypes.c_uint8)]


class kvm_vcpu_events(Struct):
    _fields_ = [("exception", _events_exception), ("interrupt", _events_interrupt),
                ("nmi", _events_nmi), ("sipi_vector", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("smi", _events_smi), ("triple_fault", _events_triple_fault),
                ("reserved", ctypes.c_uint8 * 26), ("exception_has_payload", ctypes.c_uint8),
                ("exception_payload", ctypes.c_uint64)]


KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4
KVM_VCPUEVENT_VALID_SMM = 0x8
KVM_VCPUEVENT_VALID_PAYLOAD = 0x10
KVM_VCPUEVENT_VALID_TRIPLE_FAULT = 0x20

# kvm_run.flags (x86)
KVM_RUN_X86_SMM = 0x1
KVM_RUN_X86_BUS_LOCK = 0x2
KVM_RUN_X86_GUEST_MODE = 0x4

# kvm_guest_debug.control (generic bits, then x86's)
KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000
KVM_GUESTDBG_INJECT_DB = 0x40000
KVM_GUESTDBG_INJECT_BP = 0x80000

# kvm_cpuid_entry2.flags ("SIGNIFCANT" is the uapi header's own spelling)
KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 0x1
KVM_CPUID_FLAG_STATEFUL_FUNC = 0x2
KVM_CPUID_FLAG_STATE_READ_NEXT = 0x4

# kvm_irqfd.flags, kvm_ioeventfd.flags
KVM_IRQFD_FLAG_DEASSIGN = 0x1
KVM_IRQFD_FLAG_RESAMPLE = 0x2
KVM_IOEVENTFD_FLAG_DATAMATCH = 0x1
KVM_IOEVENTFD_FLAG_PIO = 0x2
KVM_IOEVENTFD_FLAG_DEASSIGN = 0x4

# kvm_mp_state.mp_state (x86)
KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

# MSRs with a meaning in the KVM API: SMBASE is readable and writable only by
# the host (KVM_GET/SET_MSRS), as KVM does it.
MSR_IA32_SMBASE = 0x9E


class kvm_irqfd(Struct):
    _fields_ = [("fd", ctypes.c_uint32), ("gsi", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("resamplefd", ctypes.c_uint32), ("pad", ctypes.c_uint8 * 16)]


class kvm_ioeventfd(Struct):
    _fields_ = [("datamatch", ctypes.c_uint64), ("addr", ctypes.c_uint64),
                ("len", ctypes.c_uint32), ("fd", ctypes.c_int32), ("flags", ctypes.c_uint32),
                ("pad", ctypes.c_uint8 * 36)]


class kvm_irq_routing(Struct):
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", ctypes.c_uint32)]


class u64_arg(Struct):
    _fields_ = [("value", ctypes.c_uint64)]


STRUCT_SIZES = {  # spec/kvm-abi.md section 5; tests/t0_abi.py asserts them
    kvm_userspace_memory_region: 32, kvm_userspace_memory_region2: 160,
    kvm_dirty_log: 16, kvm_clear_dirty_log: 24, kvm_enable_cap: 104,
    kvm_create_guest_memfd: 64, kvm_memory_attributes: 32, kvm_regs: 144,
    kvm_segment: 24, kvm_dtable: 16, kvm_sregs: 312, kvm_fpu: 416,
    kvm_interrupt: 4, kvm_msrs: 8, kvm_msr_entry: 16, kvm_cpuid2: 8,
    kvm_cpuid_entry2: 40, kvm_guest_debug: 72, kvm_irqfd: 32, kvm_ioeventfd: 64,
    kvm_irq_routing: 8, kvm_vcpu_events: 64,
}

# --- the ioctl table: name -> number ----------------------------------------------
# System ioctls (MNT/kvm)
KVM_GET_API_VERSION = IO(0x00)
KVM_CREATE_VM = IO(0x01)
KVM_CHECK_EXTENSION = IO(0x03)
KVM_GET_VCPU_MMAP_SIZE = IO(0x04)
KVM_GET_SUPPORTED_CPUID = IOWR(0x05, kvm_cpuid2)
KVM_GET_MSR_INDEX_LIST = IOWR(0x02, kvm_msr_list)
# VM ioctls (MNT/vmN/ctl)
KVM_CREATE_VCPU = IO(0x41)
KVM_GET_DIRTY_LOG = IOW(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = IOW(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = IO(0x47)
KVM_SET_IDENTITY_MAP_ADDR = IOW(0x48, u64_arg)
KVM_SET_USER_MEMORY_REGION2 = IOW(0x49, kvm_userspace_memory_region2)
KVM_CREATE_IRQCHIP = IO(0x60)
KVM_SET_GSI_ROUTING = IOW(0x6A, kvm_irq_routing)
KVM_IRQFD = IOW(0x76, kvm_irqfd)
KVM_IOEVENTFD = IOW(0x79, kvm_ioeventfd)
KVM_ENABLE_CAP = IOW(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = IOWR(0xC0, kvm_clear_dirty_log)
KVM_SET_MEMORY_ATTRIBUTES = IOW(0xD2, kvm_memory_attributes)
KVM_CREATE_GUEST_MEMFD = IOWR(0xD4, kvm_create_guest_memfd)
# vCPU ioctls (MNT/vmN/vcpuK)
KVM_RUN = IO(0x80)
KVM_GET_REGS = IOR(0x81, kvm_regs)
KVM_SET_REGS = IOW(0x82, kvm_regs)
KVM_GET_SREGS = IOR(0x83, kvm_sregs)
KVM_SET_SREGS = IOW(0x84, kvm_sregs)
KVM_INTERRUPT = IOW(0x86, kvm_interrupt)
KVM_GET_MSRS = IOWR(0x88, kvm_msrs)
KVM_SET_MSRS = IOW(0x89, kvm_msrs)
KVM_GET_FPU = IOR(0x8C, kvm_fpu)
KVM_SET_FPU = IOW(0x8D, kvm_fpu)
KVM_SET_CPUID2 = IOW(0x90, kvm_cpuid2)
KVM_GET_CPUID2 = IOWR(0x91, kvm_cpuid2)
KVM_GET_MP_STATE = IOR(0x98, kvm_mp_state)
KVM_SET_MP_STATE = IOW(0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = IOW(0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = IOR(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = IOW(0xA0, kvm_vcpu_events)
KVM_SMI = IO(0xB7)

# Only numbers of KVM's ioctl type: the flag constants above are KVM_* ints too.
IOCTL_NAMES = {v: k for k, v in list(globals().items())
               if k.startswith("KVM_") and isinstance(v, int) and ioc_type(v) == KVMIO}

# --- capabilities: number, and the value kvmfs answers -------------------------------
API_VERSION = 12
VCPU_MMAP_SIZE = 3 * 4096
KVM_USER_MEM_SLOTS = 32764
KVM_ADDRESS_SPACE_NUM = 2
KVM_MAX_VCPUS = 1024
KVM_MAX_VCPU_ID = 4096
KVM_MAX_CPUID_ENTRIES = 256
KVM_MAX_MSR_ENTRIES = 256       # msr_io's MAX_IO_MSRS: nmsrs must be below it (E2BIG)

KVM_CAP_IRQCHIP = 0
KVM_CAP_HLT = 1
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_COALESCED_MMIO = 15
KVM_CAP_SYNC_MMU = 16
KVM_CAP_DESTROY_MEMORY_REGION_WORKS = 21
KVM_CAP_USER_NMI = 22
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_IRQ_ROUTING = 25
KVM_CAP_JOIN_MEMORY_REGIONS_WORKS = 30
KVM_CAP_IRQFD = 32
KVM_CAP_IOEVENTFD = 36
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_INTERNAL_ERROR_DATA = 40
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_SYNC_REGS = 74
KVM_CAP_READONLY_MEM = 81
KVM_CAP_ENABLE_CAP_VM = 98
KVM_CAP_CHECK_EXTENSION_VM = 105
KVM_CAP_X86_SMM = 117
KVM_CAP_MULTI_ADDRESS_SPACE = 118
KVM_CAP_SPLIT_IRQCHIP = 121
KVM_CAP_MAX_VCPU_ID = 128
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_X86_DISABLE_EXITS = 143
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_BINARY_STATS_FD = 203
KVM_CAP_SYSTEM_EVENT_DATA = 215
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225
KVM_CAP_USER_MEMORY2 = 231
KVM_CAP_MEMORY_FAULT_INFO = 232
KVM_CAP_MEMORY_ATTRIBUTES = 233
KVM_CAP_GUEST_MEMFD = 234
KVM_CAP_VM_TYPES = 235
KVM_CAP_PRE_FAULT_MEMORY = 236
KVM_CAP_GUEST_MEMFD_FLAGS = 244

# What kvmfs answers today: only what it really does.  Every capability the spec
# lists appears here; a number not in this table answers 0, as KVM does.  A row
# changes when the feature behind it is built.
CAPS = {
    KVM_CAP_IRQCHIP: 0,            # no in-kernel irqchip: KVM_CREATE_IRQCHIP is ENOTTY
    KVM_CAP_HLT: 1,
    KVM_CAP_USER_MEMORY: 1,
    KVM_CAP_SET_TSS_ADDR: 1,
    KVM_CAP_EXT_CPUID: 1,            # KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2
    KVM_CAP_NR_VCPUS: min(os.sysconf("SC_NPROCESSORS_ONLN"), KVM_MAX_VCPUS),   # as KVM: online CPUs
    KVM_CAP_NR_MEMSLOTS: KVM_USER_MEM_SLOTS,
    KVM_CAP_MP_STATE: 0,
    KVM_CAP_COALESCED_MMIO: 0,
    KVM_CAP_SYNC_MMU: 1,             # MMU notifiers: KVMFS_MMU_NOTIFY from kvmfs run (launchers.py)
    KVM_CAP_DESTROY_MEMORY_REGION_WORKS: 1,
    KVM_CAP_USER_NMI: 0,
    KVM_CAP_SET_GUEST_DEBUG: 1,      # single-step (KVM_GUESTDBG_SINGLESTEP)
    KVM_CAP_IRQ_ROUTING: 0,
    KVM_CAP_JOIN_MEMORY_REGIONS_WORKS: 1,
    KVM_CAP_IRQFD: 0,
    KVM_CAP_IOEVENTFD: 0,
    KVM_CAP_SET_IDENTITY_MAP_ADDR: 1,
    KVM_CAP_INTERNAL_ERROR_DATA: 1,  # internal.ndata/data filled
    KVM_CAP_VCPU_EVENTS: 1,          # exception, interrupt, shadow and SMI state (no NMIs)
    KVM_CAP_MAX_VCPUS: KVM_MAX_VCPUS,
    KVM_CAP_SYNC_REGS: 0,
    KVM_CAP_READONLY_MEM: 1,
    KVM_CAP_ENABLE_CAP_VM: 1,
    KVM_CAP_CHECK_EXTENSION_VM: 1,
    KVM_CAP_X86_SMM: 1,              # KVM_SMI, SMRAM state save, RSM, address space 1
    KVM_CAP_MULTI_ADDRESS_SPACE: KVM_ADDRESS_SPACE_NUM,
    KVM_CAP_SPLIT_IRQCHIP: 0,
    KVM_CAP_MAX_VCPU_ID: KVM_MAX_VCPU_ID,
    KVM_CAP_IMMEDIATE_EXIT: 1,
    KVM_CAP_X86_DISABLE_EXITS: 0,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2: 3,   # ENABLE | INITIALLY_SET
    KVM_CAP_DIRTY_LOG_RING: 0,
    KVM_CAP_BINARY_STATS_FD: 0,
    KVM_CAP_SYSTEM_EVENT_DATA: 0,
    KVM_CAP_DIRTY_LOG_RING_ACQ_REL: 0,
    KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP: 0,
    KVM_CAP_USER_MEMORY2: 1,
    KVM_CAP_MEMORY_FAULT_INFO: 0,
    KVM_CAP_MEMORY_ATTRIBUTES: 0,
    KVM_CAP_GUEST_MEMFD: 0,
    KVM_CAP_VM_TYPES: 1 << 0,      # KVM_X86_DEFAULT_VM only
    KVM_CAP_PRE_FAULT_MEMORY: 0,
    KVM_CAP_GUEST_MEMFD_FLAGS: 0,
}

CAP_NAMES = {v: k[len("KVM_CAP_"):] for k, v in list(globals().items())
             if k.startswith("KVM_CAP_")}

# --- memslots ---------------------------------------------------------------------
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_MEM_FLAGS_V1 = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY

KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# KVM_CREATE_VM types (x86); KVM_CAP_VM_TYPES is a bitmask of 1 << type
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1

# guest_memfd and memory attributes
GUEST_MEMFD_FLAG_MMAP = 1 << 0
GUEST_MEMFD_FLAG_INIT_SHARED = 1 << 1
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3

PAGE_SIZE = 4096
PAGE_SHIFT = 12
TASK_SIZE_MAX = (1 << 47) - PAGE_SIZE   # x86-64 user address space (4-level paging)
GUEST_PHYS_BITS = 52                     # MAXPHYADDR kvmfs reports; last gfn must fit

# --- kvm_run ----------------------------------------------------------------------
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_NOTIFY = 37
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40

EXIT_REASONS = {v: k[len("KVM_EXIT_"):] for k, v in list(globals().items())
                if k.startswith("KVM_EXIT_")}

# --- kvmfs's own ioctls (type 'k'), for the launchers of `kvmfs run` --------------
# Not KVM's: real KVM answers ENOTTY.  KVMFS_ACT_FOR (any kvmfs file): from now on
# this open file's requests act for thread `tid`'s process, as if that process had
# made them (the seccomp supervisor creating VMs and vCPUs for the program it
# watches).  Allowed to root, and to a same-user ancestor of the thread (one that
# could ptrace it anyway); EPERM otherwise, ESRCH if the thread is gone.
# KVMFS_MMU_NOTIFY (system file): an MMU-notifier call for the caller's process:
# [start, end) of its address space is about to change (phase START) or has
# changed (phase END); every VM the process owns zaps what maps the range.
KVMFS_IOCTL_TYPE = 0x6B


class kvmfs_act_for(Struct):
    _fields_ = [("tid", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class kvmfs_mmu_notify(Struct):
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("phase", ctypes.c_uint32), ("event", ctypes.c_uint16),
                ("cause", ctypes.c_uint16)]


KVMFS_ACT_FOR = _ioc(IOC_WRITE, 0x01, ctypes.sizeof(kvmfs_act_for), KVMFS_IOCTL_TYPE)
KVMFS_MMU_NOTIFY = _ioc(IOC_WRITE, 0x02, ctypes.sizeof(kvmfs_mmu_notify), KVMFS_IOCTL_TYPE)
KVMFS_NOTIFY_START = 0
KVMFS_NOTIFY_END = 1
# kvmfs_mmu_notify.event: the numbers of the kernel's enum mmu_notifier_event
KVMFS_MMU_EVENT_UNMAP = 0            # munmap, mremap, mmap(MAP_FIXED) over the range
KVMFS_MMU_EVENT_CLEAR = 1            # madvise(DONTNEED/REMOVE/FREE), hole punch
KVMFS_MMU_EVENT_PROTECTION_VMA = 2   # mprotect
# kvmfs_mmu_notify.cause: the VMM's call, for the event view
KVMFS_CAUSE_MUNMAP = 1
KVMFS_CAUSE_MREMAP = 2
KVMFS_CAUSE_MMAP_FIXED = 3
KVMFS_CAUSE_MPROTECT = 4
KVMFS_CAUSE_MADV_DONTNEED = 5
KVMFS_CAUSE_MADV_REMOVE = 6
KVMFS_CAUSE_MADV_FREE = 7
KVMFS_CAUSE_PUNCH_HOLE = 8
KVMFS_CAUSES = {v: k[len("KVMFS_CAUSE_"):].lower() for k, v in list(globals().items())
                if k.startswith("KVMFS_CAUSE_")}

KVM_EXIT_IO_IN = 0                   # kvm_run.io.direction
KVM_EXIT_IO_OUT = 1
KVM_PIO_PAGE_OFFSET = 1              # pages into the vCPU mapping: the port-I/O data
KVM_COALESCED_MMIO_PAGE_OFFSET = 2   # the coalesced MMIO ring

# kvm_run.internal.suberror
KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
# kvm_run.emulation_failure.flags
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1 << 0

# kvm_run.system_event.type
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3
KVM_SYSTEM_EVENT_WAKEUP = 4
KVM_SYSTEM_EVENT_SUSPEND = 5
KVM_SYSTEM_EVENT_SEV_TERM = 6
KVM_SYSTEM_EVENT_TDX_FATAL = 7

# kvm_run.memory_fault.flags
KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3


class kvm_run_hw(Struct):
    _fields_ = [("hardware_exit_reason", ctypes.c_uint64)]


class kvm_run_ex(Struct):
    _fields_ = [("exception", ctypes.c_uint32), ("error_code", ctypes.c_uint32)]


class kvm_run_io(Struct):
    _fields_ = [("direction", ctypes.c_uint8), ("size", ctypes.c_uint8),
                ("port", ctypes.c_uint16), ("count", ctypes.c_uint32),
                ("data_offset", ctypes.c_uint64)]


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", ctypes.c_uint64), ("data", ctypes.c_uint8 * 8),
                ("len", ctypes.c_uint32), ("is_write", ctypes.c_uint8)]


class kvm_run_internal(Struct):
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32),
                ("data", ctypes.c_uint64 * 16)]


class kvm_run_emulation_failure(Struct):
    """The internal exit with suberror KVM_INTERNAL_ERROR_EMULATION."""
    _fields_ = [("suberror", ctypes.c_uint32), ("ndata", ctypes.c_uint32),
                ("flags", ctypes.c_uint64), ("insn_size", ctypes.c_uint8),
                ("insn_bytes", ctypes.c_uint8 * 15)]


class kvm_run_system_event(Struct):
    _fields_ = [("type", ctypes.c_uint32), ("ndata", ctypes.c_uint32),
                ("data", ctypes.c_uint64 * 16)]


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", ctypes.c_uint64), ("cpu", ctypes.c_uint32)]


class kvm_run_debug(Struct):
    _fields_ = [("exception", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("pc", ctypes.c_uint64), ("dr6", ctypes.c_uint64), ("dr7", ctypes.c_uint64)]


class kvm_run_memory_fault(Struct):
    _fields_ = [("flags", ctypes.c_uint64), ("gpa", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [("hw", kvm_run_hw), ("fail_entry", kvm_run_fail_entry), ("ex", kvm_run_ex),
                ("io", kvm_run_io), ("debug", kvm_run_debug), ("mmio", kvm_run_mmio),
                ("internal", kvm_run_internal), ("emulation_failure", kvm_run_emulation_failure),
                ("system_event", kvm_run_system_event), ("memory_fault", kvm_run_memory_fault),
                ("padding", ctypes.c_uint8 * 256)]


class kvm_run(Struct):
    _fields_ = [("request_interrupt_window", ctypes.c_uint8), ("immediate_exit", ctypes.c_uint8),
                ("padding1", ctypes.c_uint8 * 6), ("exit_reason", ctypes.c_uint32),
                ("ready_for_interrupt_injection", ctypes.c_uint8), ("if_flag", ctypes.c_uint8),
                ("flags", ctypes.c_uint16), ("cr8", ctypes.c_uint64), ("apic_base", ctypes.c_uint64),
                ("exit", kvm_run_exit), ("kvm_valid_regs", ctypes.c_uint64),
                ("kvm_dirty_regs", ctypes.c_uint64), ("s", ctypes.c_uint8 * 2048)]


assert ctypes.sizeof(kvm_run) == 2352
assert kvm_run.exit.offset == 32 and kvm_run.kvm_valid_regs.offset == 288
for _cls, _size in STRUCT_SIZES.items():
    assert ctypes.sizeof(_cls) == _size, (_cls.__name__, ctypes.sizeof(_cls), _size)

INTERNAL_ERROR_NAMES = {v: k[len("KVM_INTERNAL_ERROR_"):] for k, v in list(globals().items())
                        if k.startswith("KVM_INTERNAL_ERROR_") and isinstance(v, int)
                        and "_FLAG_" not in k}
