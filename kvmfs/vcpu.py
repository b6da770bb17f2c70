"""A vCPU: its kvm_run area, the native engine, and the vCPU ioctls.

Owns: one native kvmfs_vcpu (a unicorn engine driven from C) and the kvm_run
area, a 12288-byte file in the mount's tmpfs run directory that MNT/vmN/vcpuK.run
links to, so that a client's MAP_SHARED mapping and the daemon's are the same
pages: exit data is visible the moment KVM_RUN returns, and the client's
writes (IN data, MMIO read data, immediate_exit) are seen by the next run
without any copy.  KVM_RUN runs in the FUSE worker thread that serves it; the
GIL is released inside C for the whole emulation.

Lock: Vcpu.lock is KVM's vcpu->mutex (every vCPU ioctl holds it); it comes
before the host-memory lock and the mmu_lock (see vm.py for the whole order).
"""
import ctypes
import errno
import functools
import logging
import threading

from kvmfs import _native as native, abi, procmem
from kvmfs.errors import KvmError, check

log = logging.getLogger("kvmfs.vcpu")

_MSR_SIZE = ctypes.sizeof(abi.kvm_msr_entry)
_CPUID_SIZE = ctypes.sizeof(abi.kvm_cpuid_entry2)
_MSRS_HDR = ctypes.sizeof(abi.kvm_msrs)      # the entries follow the header in the caller's memory
_CPUID_HDR = ctypes.sizeof(abi.kvm_cpuid2)
# MSR_IA32_APICBASE at reset (x86): the default xAPIC base, enabled, bootstrap processor.


def serialized(handler):
    """vCPU ioctls run one at a time per vCPU, as under KVM's vcpu->mutex: a
    KVM_GET_REGS issued while KVM_RUN is in the guest waits for the exit."""
    @functools.wraps(handler)
    def locked(self, ctx, arg, data):
        with self.lock:
            return handler(self, ctx, arg, data)
    return locked


class Vcpu:
    """One vCPU.  Attributes: vm, id, lock (KVM's vcpu->mutex), kvm_run (the
    struct kvm_run over run_area), native (the C vCPU, NULL once freed).

    Lifetime: created by KVM_CREATE_VCPU; its engine is freed only with its VM's
    memory (Vm.free), when no request can be running it any more.
    """

    def __init__(self, vm, vcpu_id, run_area):
        """run_area: a runarea.RunArea, which the vCPU owns from now on."""
        self.vm = vm
        self.id = vcpu_id
        self.lock = threading.Lock()
        self.run_area = run_area
        self.kvm_run = native.cast("struct kvm_run *", run_area.cdata)
        self.native = native.NULL
        try:
            self.native = native.vcpu_new(vm.mmu, vcpu_id, self.kvm_run)
        except KvmError:
            self.free()
            raise

    def free(self):
        """Free the engine and the kvm_run area (only from Vm.free: nothing runs it)."""
        if self.native != native.NULL:
            native.vcpu_free(self.native)
            self.native = native.NULL
        del self.kvm_run
        self.run_area.close()

    def kick(self):
        """Make a running KVM_RUN return (KVM_EXIT_INTR) before its next instruction."""
        if self.native != native.NULL:
            native.vcpu_kick(self.native)

    def _engine(self, op):
        if self.native == native.NULL:
            raise KvmError(errno.EIO, op, "the vCPU was destroyed")
        return self.native

    # --- vCPU ioctls (KVM's vcpu->mutex held: see serialized) ------------------------
    @serialized
    def run(self, ctx, arg, data):
        """KVM_RUN (vcpu): run the guest until its next exit (kvm_run.exit_reason).

        EINVAL: arg != 0; EINTR (exit_reason INTR): a signal or immediate_exit,
        also a signal that came while the request was on its way to the engine;
        EFAULT: guest memory the daemon cannot reach (one log line says why);
        EIO: the VM was killed.
        """
        check(arg == 0, errno.EINVAL, "KVM_RUN", f"arg {arg}")
        v = self._engine("KVM_RUN")
        while True:
            if ctx.interrupted():
                # FUSE delivered the caller's signal before the engine ran: libfuse took
                # the INTERRUPT while dispatching and sends no signal for it.  KVM ends
                # KVM_RUN on any pending signal, so this one must too.
                native.vcpu_set_exit_reason(v, abi.KVM_EXIT_INTR)
                raise KvmError(errno.EINTR, "KVM_RUN", "interrupted", warn=False)
            rc = native.vcpu_run(v)
            if rc == native.RUN_VM_DEAD:
                where = native.vcpu_miss_hva(v)
                self.vm.kill(f"vcpu{self.id}: SMI state save at gpa 0x{where:x} has no writable "
                             "memslot in address space 1")
                raise KvmError(errno.EIO, "KVM_RUN", "the VM is dead", warn=False)
            if rc != native.RUN_NEED_HVA:
                return native.ensure(rc, "KVM_RUN", warn=rc != -errno.EINTR)
            try:
                self.vm.hostmem.resolve(native.vcpu_miss_hva(v),
                                        f"KVM_RUN vm{self.vm.id}/vcpu{self.id}")
            except KvmError:
                native.vcpu_set_exit_reason(v, abi.KVM_EXIT_UNKNOWN)
                raise

    def _state(self, what, ctype, op, data):
        """Get or set one register block in place in the FUSE argument buffer."""
        native.vcpu_state(self._engine(op), what, ctype, data, op)
        return 0

    @serialized
    def get_regs(self, ctx, arg, data):
        """KVM_GET_REGS (vcpu): general registers, RIP and RFLAGS."""
        return self._state("get_regs", "struct kvm_regs", "KVM_GET_REGS", data)

    @serialized
    def set_regs(self, ctx, arg, data):
        """KVM_SET_REGS (vcpu)."""
        return self._state("set_regs", "struct kvm_regs", "KVM_SET_REGS", data)

    @serialized
    def get_sregs(self, ctx, arg, data):
        """KVM_GET_SREGS (vcpu): segments, descriptor tables, control registers, EFER."""
        return self._state("get_sregs", "struct kvm_sregs", "KVM_GET_SREGS", data)

    @serialized
    def set_sregs(self, ctx, arg, data):
        """KVM_SET_SREGS (vcpu): EINVAL for control state hardware would refuse."""
        return self._state("set_sregs", "struct kvm_sregs", "KVM_SET_SREGS", data)

    @serialized
    def get_fpu(self, ctx, arg, data):
        """KVM_GET_FPU (vcpu)."""
        return self._state("get_fpu", "struct kvm_fpu", "KVM_GET_FPU", data)

    @serialized
    def set_fpu(self, ctx, arg, data):
        """KVM_SET_FPU (vcpu)."""
        return self._state("set_fpu", "struct kvm_fpu", "KVM_SET_FPU", data)

    @serialized
    def interrupt(self, ctx, arg, data):
        """KVM_INTERRUPT (vcpu): queue an external interrupt; EINVAL for irq >= 256."""
        irq = abi.kvm_interrupt.from_address(data).irq
        check(irq < 256, errno.EINVAL, "KVM_INTERRUPT", f"irq {irq}")
        native.vcpu_interrupt(self._engine("KVM_INTERRUPT"), irq)
        return 0

    def _msrs(self, ctx, arg, data, op, write):
        n = abi.kvm_msrs.from_address(data).nmsrs
        # before the entries are read: E2BIG, not EFAULT, for a short buffer (as msr_io)
        check(n < abi.KVM_MAX_MSR_ENTRIES, errno.E2BIG, op,
              f"{n} msrs (at most {abi.KVM_MAX_MSR_ENTRIES - 1})")
        entries = native.new("struct kvm_msr_entry[]", max(n, 1))
        procmem.read_into(ctx.pid, arg + _MSRS_HDR, native.addr(entries), n * _MSR_SIZE, op)
        done = native.vcpu_msrs(self._engine(op), entries, n, write, op)
        if not write:
            procmem.write(ctx.pid, arg + _MSRS_HDR, (native.addr(entries), n * _MSR_SIZE), op)
        return done

    @serialized
    def get_msrs(self, ctx, arg, data):
        """KVM_GET_MSRS (vcpu): fills the entries that follow kvm_msrs; returns how many.
        E2BIG: nmsrs >= 256; EFAULT: entries not readable or writable."""
        return self._msrs(ctx, arg, data, "KVM_GET_MSRS", write=False)

    @serialized
    def set_msrs(self, ctx, arg, data):
        """KVM_SET_MSRS (vcpu): returns how many entries were set (it stops at the
        first refused).  E2BIG: nmsrs >= 256; EFAULT: entries not readable."""
        return self._msrs(ctx, arg, data, "KVM_SET_MSRS", write=True)

    @serialized
    def set_cpuid2(self, ctx, arg, data):
        """KVM_SET_CPUID2 (vcpu): E2BIG above 256 entries; the entries come from the caller."""
        op = "KVM_SET_CPUID2"
        n = abi.kvm_cpuid2.from_address(data).nent
        check(n <= abi.KVM_MAX_CPUID_ENTRIES, errno.E2BIG, op, f"{n} entries")
        entries = native.new("struct kvm_cpuid_entry2[]", max(n, 1))
        procmem.read_into(ctx.pid, arg + _CPUID_HDR, native.addr(entries), n * _CPUID_SIZE, op)
        native.vcpu_set_cpuid(self._engine(op), entries, n)
        return 0

    @serialized
    def set_guest_debug(self, ctx, arg, data):
        """KVM_SET_GUEST_DEBUG (vcpu): single-step (ENABLE|SINGLESTEP) with KVM_EXIT_DEBUG."""
        dbg = abi.kvm_guest_debug.from_address(data)
        native.vcpu_set_guest_debug(self._engine("KVM_SET_GUEST_DEBUG"), dbg.control)
        return 0

    @serialized
    def smi(self, ctx, arg, data):
        """KVM_SMI (vcpu): queue a system-management interrupt, taken by the next
        KVM_RUN (or right after RSM when the vCPU is in SMM)."""
        native.vcpu_smi(self._engine("KVM_SMI"))
        return 0

    @serialized
    def get_vcpu_events(self, ctx, arg, data):
        """KVM_GET_VCPU_EVENTS (vcpu): queued exception and interrupt, shadow, SMM state."""
        return self._state("get_events", "struct kvm_vcpu_events", "KVM_GET_VCPU_EVENTS", data)

    @serialized
    def set_vcpu_events(self, ctx, arg, data):
        """KVM_SET_VCPU_EVENTS (vcpu): EINVAL for unknown flags, an exception vector
        above 31 or NMI, and for NMIs (not modelled)."""
        return self._state("set_events", "struct kvm_vcpu_events", "KVM_SET_VCPU_EVENTS", data)

    # --- views ---------------------------------------------------------------------
    def stats(self):
        if self.native == native.NULL:
            return None
        return native.vcpu_get_stats(self.native)


def get_supported_cpuid(ctx, arg, data):
    """KVM_GET_SUPPORTED_CPUID's work (system.py answers the ioctl)."""
    op = "KVM_GET_SUPPORTED_CPUID"
    hdr = abi.kvm_cpuid2.from_address(data)
    entries = native.new("struct kvm_cpuid_entry2[]", abi.KVM_MAX_CPUID_ENTRIES)
    n = native.supported_cpuid(entries, min(hdr.nent, abi.KVM_MAX_CPUID_ENTRIES))
    procmem.write(ctx.pid, arg + _CPUID_HDR, (native.addr(entries), n * _CPUID_SIZE), op)
    hdr.nent = n
    return 0
