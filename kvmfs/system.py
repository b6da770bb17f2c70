"""The /dev/kvm analogue: system ioctls and the table of live VMs.

Owns: VM ids and the Vm objects.  Lock order: System.lock, then a Vm's lock,
then the native mmu_lock (taken inside C).
"""
import errno
import itertools
import logging
import threading

from kvmfs import abi
from kvmfs.errors import KvmError, check
from kvmfs.vm import Vm

log = logging.getLogger("kvmfs.system")


class System:
    """All VMs of one mount."""

    UNKNOWN_IOCTL_ERRNO = errno.EINVAL   # spec 3.1: the system fd answers EINVAL, not ENOTTY

    def __init__(self, run_dir):
        self.lock = threading.Lock()
        self.vms = {}
        self.run_dir = run_dir          # tmpfs directory for kvm_run areas
        self._ids = itertools.count()

    # --- ioctls -------------------------------------------------------------------
    def get_api_version(self, ctx, arg, data):
        """KVM_GET_API_VERSION (system): arg must be 0 (EINVAL); returns 12."""
        check(arg == 0, errno.EINVAL, "KVM_GET_API_VERSION", f"arg {arg}")
        return abi.API_VERSION

    def check_extension(self, ctx, arg, data):
        """KVM_CHECK_EXTENSION (system, vm): capability number -> value; 0 when not built."""
        return abi.CAPS.get(arg, 0)

    def get_vcpu_mmap_size(self, ctx, arg, data):
        """KVM_GET_VCPU_MMAP_SIZE (system): arg must be 0 (EINVAL); the kvm_run area's size."""
        check(arg == 0, errno.EINVAL, "KVM_GET_VCPU_MMAP_SIZE", f"arg {arg}")
        return abi.VCPU_MMAP_SIZE

    def create_vm(self, ctx, arg, data):
        """KVM_CREATE_VM (system): type -> VM id N (open MNT/vmN/ctl for the VM fd).

        EINVAL for a type outside KVM_CAP_VM_TYPES.
        """
        check(arg < 64 and abi.CAPS[abi.KVM_CAP_VM_TYPES] >> arg & 1, errno.EINVAL,
              "KVM_CREATE_VM", f"unsupported VM type {arg}")
        return self.new_vm(ctx.tgid).id

    def get_supported_cpuid(self, ctx, arg, data):
        """KVM_GET_SUPPORTED_CPUID (system): fills the caller's kvm_cpuid2 entries.

        E2BIG when nent is smaller than the list; nent above 256 is clamped.
        """
        from kvmfs import vcpu
        return vcpu.get_supported_cpuid(ctx, arg, data)

    IOCTLS = {
        abi.KVM_GET_API_VERSION: get_api_version,
        abi.KVM_CHECK_EXTENSION: check_extension,
        abi.KVM_GET_VCPU_MMAP_SIZE: get_vcpu_mmap_size,
        abi.KVM_CREATE_VM: create_vm,
        abi.KVM_GET_SUPPORTED_CPUID: get_supported_cpuid,
    }

    # --- lifetime -----------------------------------------------------------------
    def new_vm(self, owner_pid):
        with self.lock:
            vm_id = next(self._ids)
            vm = Vm(self, vm_id, owner_pid)
            self.vms[vm_id] = vm
        log.info("vm%d created by pid %d", vm_id, owner_pid)
        return vm

    def get_vm(self, vm_id):
        vm = self.vms.get(vm_id)
        if vm is None or vm.dead:
            raise KvmError(errno.ENOENT, "lookup", f"no vm{vm_id}", warn=False)
        return vm

    def destroy_vm(self, vm, why):
        with self.lock:
            if self.vms.get(vm.id) is not vm:
                return
            del self.vms[vm.id]
        vm.destroy()
        log.info("vm%d freed (%s)", vm.id, why)

    def reap(self):
        """Free VMs nobody can reach any more: never opened and their creator exited."""
        for vm in list(self.vms.values()):
            if vm.unreachable():
                self.destroy_vm(vm, f"creator pid {vm.owner_pid} exited without opening it")

    def destroy_all(self):
        for vm in list(self.vms.values()):
            self.destroy_vm(vm, "unmount")
