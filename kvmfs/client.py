"""Python client: Kvm / Vm / Vcpu handles named after the ioctls.

Works on a kvmfs mount and on the real /dev/kvm alike: the only difference is
how a create call turns into a file descriptor (kvmfs returns an id and the
client opens MNT/vmN/ctl, MNT/vmN/vcpuK, MNT/vmN/vcpuK.run; KVM returns the fd).
Errors are OSError with the ioctl's errno.

    from kvmfs.client import Kvm, alloc_guest_memory
    kvm = Kvm("mnt")                     # or Kvm() for /dev/kvm
    vm = kvm.create_vm()
    mem = alloc_guest_memory(1 << 20)    # memfd-backed, shareable with kvmfs
    vm.set_user_memory_region(0, 0, 0x0, mem.size, mem.address)
    vcpu = vm.create_vcpu(0)
    vcpu.run(); print(vcpu.kvm_run.exit_reason)
"""
import ctypes
import mmap
import os

from kvmfs import abi

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd, cmd, arg=0):
    """Raw ioctl: arg is an int or a ctypes object (passed by reference).  Returns the result."""
    if isinstance(arg, int):
        ptr = ctypes.c_void_p(arg)
    else:
        ptr = ctypes.c_void_p(ctypes.addressof(arg))
    rc = _libc.ioctl(fd, cmd, ptr)
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{abi.IOCTL_NAMES.get(cmd, hex(cmd))}: {os.strerror(e)}")
    return rc


class GuestMemory:
    """memfd-backed MAP_SHARED memory: guest RAM kvmfs (and KVM) can use."""

    def __init__(self, size, name="guest"):
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(self._anchor)

    def __getitem__(self, i):
        return self.map[i]

    def __setitem__(self, i, v):
        self.map[i] = v

    def close(self):
        del self._anchor
        self.map.close()
        os.close(self.fd)


def alloc_guest_memory(size, name="guest"):
    return GuestMemory(size, name)


class Kvm:
    """The system fd: MNT/kvm on kvmfs, /dev/kvm when path is None."""

    def __init__(self, mnt=None):
        self.mnt = mnt
        self.path = os.path.join(mnt, "kvm") if mnt else "/dev/kvm"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def close(self):
        os.close(self.fd)

    def get_api_version(self):
        return ioctl(self.fd, abi.KVM_GET_API_VERSION, 0)

    def check_extension(self, cap):
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def get_vcpu_mmap_size(self):
        return ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0)

    def create_vm(self, vm_type=0):
        r = ioctl(self.fd, abi.KVM_CREATE_VM, vm_type)
        if self.mnt is None:
            return Vm(self, r, None)
        vm_dir = os.path.join(self.mnt, f"vm{r}")
        return Vm(self, os.open(os.path.join(vm_dir, "ctl"), os.O_RDWR | os.O_CLOEXEC), vm_dir)

    def get_supported_cpuid(self, nent=abi.KVM_MAX_CPUID_ENTRIES):
        buf = _cpuid_buffer(nent)
        ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buf)
        return list(buf.entries[:buf.nent])


def _cpuid_buffer(nent, entries=()):
    class cpuid(ctypes.Structure):
        _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32),
                    ("entries", abi.kvm_cpuid_entry2 * max(nent, 1))]
    buf = cpuid(nent)
    for i, e in enumerate(entries):
        buf.entries[i] = e
    return buf


class Vm:
    def __init__(self, kvm, fd, vm_dir):
        self.kvm = kvm
        self.fd = fd
        self.dir = vm_dir
        self.id = int(os.path.basename(vm_dir)[2:]) if vm_dir else None

    def close(self):
        os.close(self.fd)

    def check_extension(self, cap):
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, cap)

    def set_user_memory_region(self, slot, flags, guest_phys_addr, memory_size, userspace_addr):
        r = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, memory_size, userspace_addr)
        return ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, r)

    def set_user_memory_region2(self, slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                guest_memfd_offset=0, guest_memfd=0):
        r = abi.kvm_userspace_memory_region2(slot, flags, guest_phys_addr, memory_size, userspace_addr,
                                             guest_memfd_offset, guest_memfd)
        return ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION2, r)

    def create_vcpu(self, vcpu_id):
        r = ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id)
        if self.dir is None:
            return Vcpu(self, r)
        return Vcpu(self, os.open(os.path.join(self.dir, f"vcpu{r}"), os.O_RDWR | os.O_CLOEXEC))

    def set_tss_addr(self, addr):
        return ioctl(self.fd, abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr):
        return ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, abi.u64_arg(addr))

    def enable_cap(self, cap, *args, flags=0):
        c = abi.kvm_enable_cap(cap, flags)
        for i, a in enumerate(args):
            c.args[i] = a
        return ioctl(self.fd, abi.KVM_ENABLE_CAP, c)

    def get_dirty_log(self, slot, npages):
        """The slot's dirty bitmap as a list of u64 words (page i = bit i % 64 of word i // 64)."""
        words = (ctypes.c_uint64 * ((npages + 63) // 64))()
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, abi.kvm_dirty_log(slot, 0, ctypes.addressof(words)))
        return list(words)

    def clear_dirty_log(self, slot, first_page, num_pages, mask_words):
        words = (ctypes.c_uint64 * max(len(mask_words), 1))(*mask_words)
        c = abi.kvm_clear_dirty_log(slot, num_pages, first_page, ctypes.addressof(words))
        return ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, c)

    # kvmfs only: MMU-notifier invalidation and guest-physical memory as a file
    def invalidate(self, hva, size):
        """Before munmap/mremap/madvise(DONTNEED) of guest memory: kvmfs forgets the range."""
        if self.dir is not None:
            with open(os.path.join(self.dir, "cmd"), "w") as f:
                f.write(f"invalidate 0x{hva:x} 0x{size:x}\n")

    def close_memory(self, mem):
        """Invalidate, then release GuestMemory (what a VMM does before munmap)."""
        self.invalidate(mem.address, mem.size)
        mem.close()

    def read_gpa(self, gpa, size, as_id=0):
        with open(os.path.join(self.dir, "as1/mem" if as_id else "mem"), "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, gpa)

    def write_gpa(self, gpa, data, as_id=0):
        with open(os.path.join(self.dir, "as1/mem" if as_id else "mem"), "r+b", buffering=0) as f:
            return os.pwrite(f.fileno(), data, gpa)

    def info(self, view):
        with open(os.path.join(self.dir, "info", view)) as f:
            return f.read()


class Vcpu:
    def __init__(self, vm, fd):
        self.vm = vm
        self.fd = fd
        # the kvm_run area: mmap of the vCPU fd, on kvmfs as on KVM
        size = vm.kvm.get_vcpu_mmap_size()
        self.run_map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.kvm_run = abi.kvm_run.from_buffer(self.run_map)

    def close(self):
        del self.kvm_run
        self.run_map.close()
        os.close(self.fd)

    def run(self):
        return ioctl(self.fd, abi.KVM_RUN, 0)

    def io_data(self):
        """The bytes of the current IO exit (OUT data, or where IN data goes)."""
        io = self.kvm_run.exit.io
        return self.run_map[io.data_offset:io.data_offset + io.size * io.count]

    def set_io_data(self, data):
        off = self.kvm_run.exit.io.data_offset
        self.run_map[off:off + len(data)] = data

    def get_regs(self):
        r = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, r)
        return r

    def set_regs(self, regs):
        return ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self):
        s = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, s)
        return s

    def set_sregs(self, sregs):
        return ioctl(self.fd, abi.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        f = abi.kvm_fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, f)
        return f

    def set_fpu(self, fpu):
        return ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def interrupt(self, irq):
        return ioctl(self.fd, abi.KVM_INTERRUPT, abi.kvm_interrupt(irq))

    def set_cpuid2(self, entries):
        return ioctl(self.fd, abi.KVM_SET_CPUID2, _cpuid_buffer(len(entries), entries))

    def get_msrs(self, indices):
        buf = _msr_buffer(indices)
        n = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def set_msrs(self, values):
        buf = _msr_buffer(list(values), list(values.values()))
        return ioctl(self.fd, abi.KVM_SET_MSRS, buf)

    def set_guest_debug(self, control):
        return ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, abi.kvm_guest_debug(control))

    def smi(self):
        return ioctl(self.fd, abi.KVM_SMI)

    def get_vcpu_events(self):
        ev = abi.kvm_vcpu_events()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, events):
        return ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)


def _msr_buffer(indices, values=None):
    class msrs(ctypes.Structure):
        _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("entries", abi.kvm_msr_entry * max(len(indices), 1))]
    buf = msrs(len(indices))
    for i, idx in enumerate(indices):
        buf.entries[i].index = idx
        if values is not None:
            buf.entries[i].data = values[i]
    return buf


__all__ = ["Kvm", "Vm", "Vcpu", "GuestMemory", "alloc_guest_memory", "ioctl"]
