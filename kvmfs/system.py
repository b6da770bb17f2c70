"""The /dev/kvm analogue: system ioctls and the table of live VMs.

Owns: VM ids and the table of LIVE Vm objects (vm.py has the lifetime and the
daemon's lock order).
"""
import contextlib
import errno
import itertools
import logging
import threading

from kvmfs import _native as native, abi, procmem
from kvmfs.errors import KvmError, check
from kvmfs.vm import Vm

log = logging.getLogger("kvmfs.system")

SHELL_VMS_PER_USER = 64


class System:
    """All VMs of one mount."""

    def __init__(self, run_dir, mountpoint=None):
        self.lock = threading.Lock()
        self.vms = {}
        self.run_dir = run_dir          # tmpfs directory for kvm_run areas
        self.mountpoint = mountpoint    # where fs.py serves this System (None: no mount)
        self.internal_tids = set()      # daemon threads making requests of their own mount
        self._ids = itertools.count()
        self.runareas_replaced = 0

    @contextlib.contextmanager
    def internal_request(self):
        """While this is entered, the daemon thread's own requests to the mount (fs.py
        sees them by thread id) are the daemon's: they hold no VM and need no owner."""
        tid = threading.get_native_id()
        with self.lock:
            self.internal_tids.add(tid)
        try:
            yield
        finally:
            with self.lock:
                self.internal_tids.discard(tid)

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

        EINVAL for a type outside KVM_CAP_VM_TYPES.  From a text command the VM
        belongs to the caller's user, not to the process (vm.py).
        """
        check(arg < 64 and abi.CAPS[abi.KVM_CAP_VM_TYPES] >> arg & 1, errno.EINVAL,
              "KVM_CREATE_VM", f"unsupported VM type {arg}")
        if ctx.shell:
            # A process's VMs are bounded by its fd limit (each is an fd); a user's shell
            # VMs have no fd, so they get a bound of their own.
            mine = sum(1 for _, vm in self.live_vms() if vm.shell_owned and vm.owner_uid == ctx.uid)
            check(mine < SHELL_VMS_PER_USER, errno.EMFILE, "create_vm",
                  f"uid {ctx.uid} has {mine} shell VMs; destroy_vm one first")
        owner = procmem.Process.of_caller(ctx.pid, "KVM_CREATE_VM")
        return self.new_vm(owner, ctx.uid if ctx.shell else None).id

    def get_supported_cpuid(self, ctx, arg, data):
        """KVM_GET_SUPPORTED_CPUID (system): fills the caller's kvm_cpuid2 entries.

        E2BIG when nent is smaller than the list; nent above 256 is clamped.
        """
        from kvmfs import vcpu
        return vcpu.get_supported_cpuid(ctx, arg, data)

    # --- lifetime -----------------------------------------------------------------
    def new_vm(self, owner, shell_uid=None):
        """A LIVE VM owned by the procmem.Process owner (which it takes over), or for
        shell_uid by that user."""
        with self.lock:
            vm_id = next(self._ids)
        try:
            vm = Vm(self, vm_id, owner, shell_uid)
        except BaseException:
            owner.close()
            raise
        with self.lock:
            self.vms[vm_id] = vm
        who = f"uid {shell_uid} (shell)" if shell_uid is not None else f"pid {owner.tgid}"
        log.info("vm%d created by %s", vm_id, who)
        return vm

    def get_vm(self, vm_id):
        vm = self.vms.get(vm_id)
        if vm is None or vm.dead:
            raise KvmError(errno.ENOENT, "lookup", f"no vm{vm_id}", warn=False)
        return vm

    def vms_owned_by(self, ctx):
        """The live VMs the caller's process owns (not shell VMs)."""
        return [vm for _, vm in self.live_vms()
                if not vm.shell_owned and not vm.dead and vm.owner.owns(ctx.pid)]

    def live_vms(self):
        """A snapshot of the table, sorted by id (views hold each VM while reading it)."""
        with self.lock:
            return sorted(self.vms.items())

    def destroy_vm(self, vm, why):
        with self.lock:
            if self.vms.get(vm.id) is not vm:
                return
            del self.vms[vm.id]
        vm.destroy()
        log.info("vm%d destroyed (%s)", vm.id, why)

    def reap(self):
        """Free VMs nobody can reach any more: never opened and their creator exited;
        say when a VMM truncated its kvm_run area (it was replaced by private pages);
        forget caller threads that have exited."""
        replaced = native.runarea_replaced()
        if replaced != self.runareas_replaced:
            log.warning("%d kvm_run area(s) truncated by their VMM: replaced by private pages "
                        "(the VMM no longer sees their exits)", replaced - self.runareas_replaced)
            self.runareas_replaced = replaced
        for _, vm in self.live_vms():
            if vm.unreachable():
                self.destroy_vm(vm, f"creator pid {vm.owner_pid} exited without opening it")
        procmem.prune_callers()

    def destroy_all(self):
        for _, vm in self.live_vms():
            self.destroy_vm(vm, "unmount")
