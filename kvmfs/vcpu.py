"""A vCPU: its kvm_run area, the native engine, and the vCPU ioctls.

Owns: one native kvmfs_vcpu (a unicorn engine driven from C) and the kvm_run
area, a 12288-byte file in the mount's tmpfs run directory that MNT/vmN/vcpuK.run
links to, so that a client's MAP_SHARED mapping and the daemon's are the same
pages: exit data is visible the moment KVM_RUN returns, and the client's
writes (IN data, MMIO read data, immediate_exit) are seen by the next run
without any copy.  KVM_RUN runs in the FUSE worker thread that serves it; the
GIL is released inside C for the whole emulation.
"""
import errno
import logging
import functools
import mmap
import os
import threading

from kvmfs import abi, procmem
from kvmfs._native import ensure, ffi, lib
from kvmfs.errors import KvmError, check

log = logging.getLogger("kvmfs.vcpu")


def _serialized(handler):
    """vCPU ioctls run one at a time per vCPU, as under KVM's vcpu->mutex: a
    KVM_GET_REGS issued while KVM_RUN is in the guest waits for the exit."""
    @functools.wraps(handler)
    def locked(self, ctx, arg, data):
        with self.lock:
            return handler(self, ctx, arg, data)
    return locked


class Vcpu:
    UNKNOWN_IOCTL_ERRNO = errno.EINVAL   # spec 3.3: vCPU fds answer EINVAL, not ENOTTY

    def __init__(self, vm, vcpu_id):
        self.vm = vm
        self.id = vcpu_id
        self.lock = threading.Lock()
        self.run_path = os.path.join(vm.system.run_dir, f"vm{vm.id}-vcpu{vcpu_id}.run")
        fd = os.open(self.run_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, abi.VCPU_MMAP_SIZE)
            if vm.owner_uid is not None:
                os.fchown(fd, vm.owner_uid, -1)
            self.run_map = mmap.mmap(fd, abi.VCPU_MMAP_SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        # Lifetime: run_cdata pins run_map's buffer for as long as the native vCPU lives.
        self.run_cdata = ffi.from_buffer(self.run_map)
        self.run = ffi.cast("struct kvm_run *", self.run_cdata)
        self.native = lib.kvmfs_vcpu_new(vm.mmu, vcpu_id, self.run)
        if self.native == ffi.NULL:
            raise KvmError(errno.ENOMEM, "KVM_CREATE_VCPU", "cannot create the emulator")
        self.run.apic_base = 0xFEE00900

    def destroy(self):
        if self.native != ffi.NULL:
            lib.kvmfs_vcpu_free(self.native)
            self.native = ffi.NULL
        try:
            os.unlink(self.run_path)
        except OSError:
            pass
        del self.run, self.run_cdata
        try:
            self.run_map.close()
        except BufferError:
            pass

    def _engine(self, op):
        if self.native == ffi.NULL:
            raise KvmError(errno.EIO, op, "the vCPU was destroyed")
        return self.native

    # --- vCPU ioctls --------------------------------------------------------------------
    def run_ioctl(self, ctx, arg, data):
        """KVM_RUN (vcpu): run the guest until its next exit (run->exit_reason).

        EINVAL: arg != 0, cr8 > 15; EINTR: a signal or immediate_exit; EFAULT:
        guest memory the daemon cannot reach (one log line says why).
        """
        check(arg == 0, errno.EINVAL, "KVM_RUN", f"arg {arg}")
        v = self._engine("KVM_RUN")
        while True:
            rc = lib.kvmfs_vcpu_run(v)
            if rc == lib.KVMFS_RUN_VM_DEAD:
                where = lib.kvmfs_vcpu_miss_hva(v)
                self.vm.kill(f"vcpu{self.id}: SMI state save at gpa 0x{where:x} has no writable "
                             "memslot in address space 1")
                raise KvmError(errno.EIO, "KVM_RUN", "the VM is dead", warn=False)
            if rc != lib.KVMFS_RUN_NEED_HVA:
                return ensure(rc, "KVM_RUN", warn=rc not in (-errno.EINTR,))
            try:
                self.vm.hostmem.resolve(lib.kvmfs_vcpu_miss_hva(v), f"KVM_RUN vm{self.vm.id}/vcpu{self.id}")
            except KvmError as e:
                self.run.exit_reason = abi.KVM_EXIT_UNKNOWN
                raise e

    def _state(self, ctype, fn, op, data):
        """Get or set one register block in place in the FUSE argument buffer."""
        ensure(fn(self._engine(op), ffi.cast(ctype + " *", data)), op)
        return 0

    def get_regs(self, ctx, arg, data):
        """KVM_GET_REGS (vcpu): general registers, RIP and RFLAGS."""
        return self._state("struct kvm_regs", lib.kvmfs_vcpu_get_regs, "KVM_GET_REGS", data)

    def set_regs(self, ctx, arg, data):
        """KVM_SET_REGS (vcpu)."""
        return self._state("struct kvm_regs", lib.kvmfs_vcpu_set_regs, "KVM_SET_REGS", data)

    def get_sregs(self, ctx, arg, data):
        """KVM_GET_SREGS (vcpu): segments, descriptor tables, control registers, EFER."""
        return self._state("struct kvm_sregs", lib.kvmfs_vcpu_get_sregs, "KVM_GET_SREGS", data)

    def set_sregs(self, ctx, arg, data):
        """KVM_SET_SREGS (vcpu): EINVAL for control state hardware would refuse."""
        return self._state("struct kvm_sregs", lib.kvmfs_vcpu_set_sregs, "KVM_SET_SREGS", data)

    def get_fpu(self, ctx, arg, data):
        """KVM_GET_FPU (vcpu)."""
        return self._state("struct kvm_fpu", lib.kvmfs_vcpu_get_fpu, "KVM_GET_FPU", data)

    def set_fpu(self, ctx, arg, data):
        """KVM_SET_FPU (vcpu)."""
        return self._state("struct kvm_fpu", lib.kvmfs_vcpu_set_fpu, "KVM_SET_FPU", data)

    def interrupt(self, ctx, arg, data):
        """KVM_INTERRUPT (vcpu): queue an external interrupt; EINVAL for irq >= 256."""
        irq = abi.kvm_interrupt.from_address(data).irq
        check(irq < 256, errno.EINVAL, "KVM_INTERRUPT", f"irq {irq}")
        ensure(lib.kvmfs_vcpu_interrupt(self._engine("KVM_INTERRUPT"), irq), "KVM_INTERRUPT")
        return 0

    def _msrs(self, ctx, arg, data, op, fn):
        hdr = abi.kvm_msrs.from_address(data)
        n = hdr.nmsrs
        check(n <= 1024, errno.E2BIG, op, f"{n} msrs")
        esize = abi.STRUCT_SIZES[abi.kvm_msr_entry]
        entries = ffi.new("struct kvm_msr_entry[]", max(n, 1))
        addr = int(ffi.cast("uintptr_t", entries))
        procmem.read_into(ctx.pid, arg + 8, addr, n * esize, op)
        done = ensure(fn(self._engine(op), entries, n), op)
        if fn is lib.kvmfs_vcpu_get_msrs:
            procmem.write(ctx.pid, arg + 8, (addr, n * esize), op)
        return done

    def get_msrs(self, ctx, arg, data):
        """KVM_GET_MSRS (vcpu): fills the entries that follow kvm_msrs; returns how many."""
        return self._msrs(ctx, arg, data, "KVM_GET_MSRS", lib.kvmfs_vcpu_get_msrs)

    def set_msrs(self, ctx, arg, data):
        """KVM_SET_MSRS (vcpu): returns how many entries were set."""
        return self._msrs(ctx, arg, data, "KVM_SET_MSRS", lib.kvmfs_vcpu_set_msrs)

    def set_cpuid2(self, ctx, arg, data):
        """KVM_SET_CPUID2 (vcpu): E2BIG above 256 entries; the entries come from the caller."""
        op = "KVM_SET_CPUID2"
        n = abi.kvm_cpuid2.from_address(data).nent
        check(n <= abi.KVM_MAX_CPUID_ENTRIES, errno.E2BIG, op, f"{n} entries")
        entries = ffi.new("struct kvm_cpuid_entry2[]", max(n, 1))
        procmem.read_into(ctx.pid, arg + 8, int(ffi.cast("uintptr_t", entries)), n * 40, op)
        ensure(lib.kvmfs_vcpu_set_cpuid(self._engine(op), entries, n), op)
        return 0

    def set_guest_debug(self, ctx, arg, data):
        """KVM_SET_GUEST_DEBUG (vcpu): single-step (ENABLE|SINGLESTEP) with KVM_EXIT_DEBUG."""
        dbg = abi.kvm_guest_debug.from_address(data)
        ensure(lib.kvmfs_vcpu_set_guest_debug(self._engine("KVM_SET_GUEST_DEBUG"), dbg.control),
               "KVM_SET_GUEST_DEBUG")
        return 0

    def smi(self, ctx, arg, data):
        """KVM_SMI (vcpu): queue a system-management interrupt, taken by the next
        KVM_RUN (or right after RSM when the vCPU is in SMM)."""
        ensure(lib.kvmfs_vcpu_smi(self._engine("KVM_SMI")), "KVM_SMI")
        return 0

    def get_vcpu_events(self, ctx, arg, data):
        """KVM_GET_VCPU_EVENTS (vcpu): queued exception and interrupt, shadow, SMM state."""
        return self._state("struct kvm_vcpu_events", lib.kvmfs_vcpu_get_events,
                           "KVM_GET_VCPU_EVENTS", data)

    def set_vcpu_events(self, ctx, arg, data):
        """KVM_SET_VCPU_EVENTS (vcpu): EINVAL for unknown flags, an exception vector
        above 31 or NMI, and for NMIs (not modelled)."""
        return self._state("struct kvm_vcpu_events", lib.kvmfs_vcpu_set_events,
                           "KVM_SET_VCPU_EVENTS", data)

    IOCTLS = {
        abi.KVM_RUN: run_ioctl,
        abi.KVM_GET_REGS: get_regs,
        abi.KVM_SET_REGS: set_regs,
        abi.KVM_GET_SREGS: get_sregs,
        abi.KVM_SET_SREGS: set_sregs,
        abi.KVM_GET_FPU: get_fpu,
        abi.KVM_SET_FPU: set_fpu,
        abi.KVM_INTERRUPT: interrupt,
        abi.KVM_GET_MSRS: get_msrs,
        abi.KVM_SET_MSRS: set_msrs,
        abi.KVM_SET_CPUID2: set_cpuid2,
        abi.KVM_SET_GUEST_DEBUG: set_guest_debug,
        abi.KVM_SMI: smi,
        abi.KVM_GET_VCPU_EVENTS: get_vcpu_events,
        abi.KVM_SET_VCPU_EVENTS: set_vcpu_events,
    }
    IOCTLS = {cmd: _serialized(fn) for cmd, fn in IOCTLS.items()}

    # --- views ---------------------------------------------------------------------
    def stats(self):
        if self.native == ffi.NULL:
            return None
        st = ffi.new("struct kvmfs_vcpu_stats *")
        lib.kvmfs_vcpu_get_stats(self.native, st)
        return st


def get_supported_cpuid(ctx, arg, data):
    op = "KVM_GET_SUPPORTED_CPUID"
    hdr = abi.kvm_cpuid2.from_address(data)
    entries = ffi.new("struct kvm_cpuid_entry2[]", abi.KVM_MAX_CPUID_ENTRIES)
    n = ensure(lib.kvmfs_supported_cpuid(entries, min(hdr.nent, abi.KVM_MAX_CPUID_ENTRIES)), op)
    procmem.write(ctx.pid, arg + 8, (int(ffi.cast("uintptr_t", entries)), n * 40), op)
    hdr.nent = n
    return 0
