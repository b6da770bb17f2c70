"""A VM: its memslots (in the native MMU), host memory, vCPUs and VM ioctls.

Owns: one native kvmfs_mmu, the HostMemory mappings of the creator's memory,
the vCPUs.  A VM belongs to the process that created it (`owner`, a
procmem.Process pinned by pidfd: a later process with the same number is not
it): VM and vCPU ioctls and every file that reaches its state
(memory, kvm_run) answer only that process, as KVM compares kvm->mm with
current->mm (EIO for ioctls).  A VM created through a text command belongs to
its creator's user instead (`shell_owned`): shell commands run in short-lived
processes.

Lock order (the whole daemon; a lock is only taken after the ones above it):
    Vcpu.lock (KVM's vcpu->mutex)  ->  HostMemory.lock  ->  System.lock
    ->  Vm.lock  ->  the native mmu_lock (inside C)
fs.py's handle-table lock, the server's pool lock and launchers.py's
Invalidations.lock are leaves: nothing is taken while they are held.  An MMU-
notifier START takes the native mmu_lock alone (invalidate_begin), then
HostMemory.lock -> mmu_lock (the zap).  Creating a vCPU maps its kvm_run area
with no lock held: that takes FUSE requests of its own (runarea.py).
In KVM_RUN: Vcpu.lock -> HostMemory.lock -> mmu_lock.

Lifetime (KVM: every file and every running call holds a reference; the VM's
memory goes with the last one):
    LIVE --last VM/vCPU file closed, creator gone unopened, destroy_vm, unmount-->
    DEAD (out of the tree; ioctls EIO; running vCPUs kicked out)
    DEAD --last hold released (open files, requests in flight, views)--> FREED
`holds` counts the references to the VM's memory: one for the System table
while LIVE, one per open file of the VM, one per view reading it.  `files`
counts the open VM and vCPU files (KVM's fds).
"""
import collections
import contextlib
import errno
import logging
import os
import threading

from kvmfs import _native as native, abi, memslots, procmem
from kvmfs.errors import KvmError, check
from kvmfs.hostmem import HostMemory
from kvmfs.launchers import NotifierLog

log = logging.getLogger("kvmfs.vm")

SlotInfo = collections.namedtuple("SlotInfo", native.SLOT_FIELDS)
IDENTITY_MAP_ADDR_DEFAULT = 0xFFFBC000     # where KVM puts the EPT identity map unless told


class Vm:
    def __init__(self, system, vm_id, owner, shell_uid=None):
        """owner: the creating procmem.Process, which this VM now holds (closed with it)."""
        self.system = system
        self.id = vm_id
        self.owner = owner
        self.owner_pid = owner.tgid              # for views and log lines only
        self.owner_uid = owner.uid if shell_uid is None else shell_uid
        self.shell_owned = shell_uid is not None
        self.lock = threading.Lock()
        self.mmu = native.mmu_new()
        self.hostmem = HostMemory(self.mmu, owner)
        self.vcpus = {}
        self.creating = set()         # vCPU ids whose kvm_run area is being mapped
        self.holds = 1                # the System table's, until the VM is DEAD
        self.files = 0
        self.opened = False
        self.dead = False
        self.freed = False
        self.killed = None            # why KVM would have killed the VM (kvm_vm_dead)
        self.tss_addr = None
        self.identity_map_addr = IDENTITY_MAP_ADDR_DEFAULT
        self.manual_protect = 0
        self.counters = {"memslot_changes": 0, "dirty_log_gets": 0, "dirty_log_clears": 0,
                         "notifier_invalidations": 0, "notifier_sptes_zapped": 0}
        self.notifier = NotifierLog()

    # --- lifetime -------------------------------------------------------------------
    def hold(self):
        """Take a reference to the VM's memory; False once it is DEAD."""
        with self.lock:
            if self.dead:
                return False
            self.holds += 1
            return True

    def unhold(self):
        with self.lock:
            self.holds -= 1
            last = self.holds == 0
        if last:
            self.free()

    @contextlib.contextmanager
    def held(self):
        """`with vm.held() as alive:` -- alive is False (and nothing held) when DEAD."""
        alive = self.hold()
        try:
            yield alive
        finally:
            if alive:
                self.unhold()

    def get_ref(self):
        """A VM or vCPU file was opened (the caller holds the VM already)."""
        with self.lock:
            self.files += 1
            self.opened = True

    def put_ref(self):
        """A VM or vCPU file was closed: the last one destroys the VM, as in KVM."""
        with self.lock:
            self.files -= 1
            last = self.files == 0 and not self.shell_owned
        if last:
            self.system.destroy_vm(self, "last file closed")

    def unreachable(self):
        return (not self.shell_owned and not self.opened and self.files == 0
                and not self.owner.alive())

    def destroy(self):
        """LIVE -> DEAD: out of reach of new requests; running vCPUs leave KVM_RUN.
        Called by System.destroy_vm only (which has removed the VM from its table)."""
        with self.lock:
            if self.dead:
                return
            self.dead = True
            vcpus = list(self.vcpus.values())
        for v in vcpus:
            v.kick()
        self.unhold()                 # the table's reference

    def free(self):
        """DEAD -> FREED: nothing holds the VM any more; return everything it has."""
        with self.lock:
            assert self.dead and self.holds == 0 and not self.freed
            self.freed = True
            vcpus = list(self.vcpus.values())
            self.vcpus.clear()
        for v in vcpus:
            v.free()
        native.mmu_free(self.mmu)
        self.mmu = native.NULL
        self.hostmem.close()
        self.owner.close()

    def check_owner(self, ctx, op="ioctl"):
        """Requests that reach the VM from another process: EIO, as KVM answers an
        ioctl when kvm->mm != current->mm (for a shell-owned VM: another user)."""
        if self.shell_owned:
            if ctx.uid != self.owner_uid and ctx.uid != 0:
                raise KvmError(errno.EIO, op, f"vm{self.id} belongs to uid {self.owner_uid}, not {ctx.uid}")
        elif not self.owner.owns(ctx.pid):
            raise KvmError(errno.EIO, op, f"vm{self.id} belongs to pid {self.owner_pid}, "
                           f"not to the process of thread {ctx.pid}")
        if self.dead:
            raise KvmError(errno.EIO, op, f"vm{self.id} is dead", warn=False)
        if self.killed:
            raise KvmError(errno.EIO, op, f"vm{self.id} was killed: {self.killed}", warn=False)

    def kill(self, why):
        """As KVM's kvm_vm_dead(): every VM and vCPU ioctl answers EIO from now on."""
        log.warning("vm%d killed: %s", self.id, why)
        with self.lock:
            self.killed = why
            vcpus = list(self.vcpus.values())
        for v in vcpus:                # the others leave KVM_RUN (EINTR), then EIO
            v.kick()

    # --- MMU notifiers (launchers.py, commands.py) -------------------------------------
    def mmu_invalidate_begin(self, start, end, event, cause=0):
        """invalidate_range_start over the owner's [start, end): hostmem.py zaps it."""
        zapped = self.hostmem.invalidate_begin(start, end)
        self.notifier.add(start, end, event, cause, zapped)
        self.counters["notifier_invalidations"] += 1
        self.counters["notifier_sptes_zapped"] += zapped
        return zapped

    def mmu_invalidate_end(self):
        self.hostmem.invalidate_end()

    # --- VM ioctls --------------------------------------------------------------------
    def check_extension(self, ctx, arg, data):
        """KVM_CHECK_EXTENSION (vm): as on the system fd, for this VM's type."""
        return abi.CAPS.get(arg, 0)

    def create_vcpu(self, ctx, arg, data):
        """KVM_CREATE_VCPU (vm): id -> K (open MNT/vmN/vcpuK).

        EINVAL: id >= KVM_CAP_MAX_VCPU_ID or too many vCPUs; EEXIST: id in use.
        The id is reserved (`creating`) while the kvm_run area is mapped, which
        takes FUSE requests of its own, so no lock is held then.
        """
        from kvmfs.vcpu import Vcpu
        op = "KVM_CREATE_VCPU"
        check(arg < abi.KVM_MAX_VCPU_ID, errno.EINVAL, op, f"id {arg} >= {abi.KVM_MAX_VCPU_ID}")
        with self.lock:
            check(len(self.vcpus) + len(self.creating) < abi.KVM_MAX_VCPUS, errno.EINVAL, op,
                  "too many vCPUs")
            check(arg not in self.vcpus and arg not in self.creating, errno.EEXIST, op,
                  f"vcpu{arg} exists")
            check(not self.dead, errno.EIO, op, "the VM is dead")
            self.creating.add(arg)
        try:
            vcpu = Vcpu(self, arg, self._new_run_area(arg))
            with self.lock:
                self.vcpus[arg] = vcpu
        finally:
            with self.lock:
                self.creating.discard(arg)
        return arg

    def _new_run_area(self, k):
        """The kvm_run area of vCPU k: the page cache of the mount's own vcpuK file for a
        process's VM, a tmpfs file for a shell VM or without a mount (runarea.py)."""
        from kvmfs.runarea import RunArea
        mnt = self.system.mountpoint
        if mnt is None or self.shell_owned:
            return RunArea.tmpfs(self.system.run_dir, f"vm{self.id}-vcpu{k}", self.owner_uid)
        with self.system.internal_request():
            return RunArea.of_mount(os.path.join(mnt, f"vm{self.id}", f"vcpu{k}"))

    def set_user_memory_region(self, ctx, arg, data):
        """KVM_SET_USER_MEMORY_REGION (vm): create, delete, move or change flags of a slot.

        EINVAL: spec 7.2/7.3; EEXIST: overlap on create or move.
        """
        r = abi.kvm_userspace_memory_region.from_address(data)
        return self._set_region("KVM_SET_USER_MEMORY_REGION", r, v2=False)

    def set_user_memory_region2(self, ctx, arg, data):
        """KVM_SET_USER_MEMORY_REGION2 (vm): the same with guest_memfd fields (not supported yet)."""
        r = abi.kvm_userspace_memory_region2.from_address(data)
        return self._set_region("KVM_SET_USER_MEMORY_REGION2", r, v2=True)

    def _set_region(self, op, r, v2):
        change = memslots.set_region(self.mmu, op, r.slot, r.flags, r.guest_phys_addr,
                                     r.memory_size, r.userspace_addr, v2)
        self.counters["memslot_changes"] += 1
        log.debug("vm%d %s slot 0x%x: %s", self.id, op, r.slot, change)
        return 0

    def set_tss_addr(self, ctx, arg, data):
        """KVM_SET_TSS_ADDR (vm): recorded (only VMX without unrestricted guest needs it).

        EINVAL above 0xFFFFD000.
        """
        check(arg <= 0xFFFFD000, errno.EINVAL, "KVM_SET_TSS_ADDR", f"0x{arg:x}")
        self.tss_addr = arg
        return 0

    def set_identity_map_addr(self, ctx, arg, data):
        """KVM_SET_IDENTITY_MAP_ADDR (vm): recorded; EINVAL once a vCPU exists."""
        addr = abi.u64_arg.from_address(data).value
        with self.lock:
            check(not self.vcpus, errno.EINVAL, "KVM_SET_IDENTITY_MAP_ADDR", "vCPUs exist")
            self.identity_map_addr = addr
        return 0

    def enable_cap(self, ctx, arg, data):
        """KVM_ENABLE_CAP (vm): KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 only; EINVAL otherwise."""
        cap = abi.kvm_enable_cap.from_address(data)
        op = "KVM_ENABLE_CAP"
        if cap.cap == abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 and abi.CAPS[cap.cap]:
            allowed = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
            if cap.args[0] & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
                allowed = abi.CAPS[cap.cap]
            check(cap.flags == 0 and not cap.args[0] & ~allowed, errno.EINVAL, op,
                  f"MANUAL_DIRTY_LOG_PROTECT2 flags 0x{cap.flags:x} args 0x{cap.args[0]:x}")
            self.manual_protect = cap.args[0]
            native.dirty_set_manual_protect(self.mmu, cap.args[0])
            return 0
        raise KvmError(errno.EINVAL, op, f"capability {cap.cap} cannot be enabled")

    def _logged_slot(self, op, slot):
        as_id, sid = slot >> 16, slot & 0xFFFF
        check(as_id < abi.KVM_ADDRESS_SPACE_NUM and sid < abi.KVM_USER_MEM_SLOTS, errno.EINVAL, op,
              f"slot 0x{slot:x}")
        info = native.memslot_get(self.mmu, as_id, sid)
        if info is None or not info.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
            raise KvmError(errno.ENOENT, op, f"slot {as_id}:{sid} absent or not logging", warn=False)
        return as_id, sid, info.npages

    def get_dirty_log(self, ctx, arg, data):
        """KVM_GET_DIRTY_LOG (vm): the slot's bitmap into the caller's buffer.

        Without manual protection the reported pages are cleared and
        write-protected again.  EINVAL: bad slot encoding; ENOENT: no slot or not
        logging; EFAULT: bitmap not writable.
        """
        op = "KVM_GET_DIRTY_LOG"
        log_arg = abi.kvm_dirty_log.from_address(data)
        as_id, sid, npages = self._logged_slot(op, log_arg.slot)
        nbytes = (npages + 63) // 64 * 8
        buf = native.new("char[]", nbytes)
        native.dirty_get_log(self.mmu, as_id, sid, buf, nbytes, op)
        procmem.write(ctx.pid, log_arg.dirty_bitmap, (native.addr(buf), nbytes), op)
        self.counters["dirty_log_gets"] += 1
        return 0

    def clear_dirty_log(self, ctx, arg, data):
        """KVM_CLEAR_DIRTY_LOG (vm): clear and re-protect the pages set in the caller's mask.

        EINVAL: slot encoding, first_page not a multiple of 64, range outside the
        slot, num_pages not a multiple of 64 short of the slot's end; ENOENT: no
        slot or not logging; EFAULT: mask not readable.
        """
        op = "KVM_CLEAR_DIRTY_LOG"
        c = abi.kvm_clear_dirty_log.from_address(data)
        check(c.first_page & 63 == 0, errno.EINVAL, op, f"first_page {c.first_page} not a multiple of 64")
        as_id, sid, npages = self._logged_slot(op, c.slot)
        check(c.first_page <= npages and c.num_pages <= npages - c.first_page
              and not (c.num_pages < npages - c.first_page and c.num_pages & 63),
              errno.EINVAL, op, f"pages {c.first_page}+{c.num_pages} of {npages}")
        nbytes = (c.num_pages + 63) // 64 * 8
        mask = native.new("char[]", max(nbytes, 1))
        procmem.read_into(ctx.pid, c.dirty_bitmap, native.addr(mask), nbytes, op)
        native.dirty_clear_log(self.mmu, as_id, sid, c.first_page, c.num_pages, mask, op)
        self.counters["dirty_log_clears"] += 1
        return 0

    # --- guest-physical memory as a file ---------------------------------------------
    def access_gpa(self, as_id, gpa, length, data=None):
        """Read (data None) or write guest memory at gpa; stops at a hole.

        Returns bytes (read) or the count written.  A hole at gpa: EIO; host
        memory that cannot be shared: EFAULT.
        """
        op = "read guest memory" if data is None else "write guest memory"
        buf = native.new("char[]", length) if data is None else native.from_buffer(data)
        done = 0
        while done < length:
            n, miss_hva = native.mmu_access_gpa(self.mmu, as_id, gpa + done, buf + done,
                                                length - done, data is not None)
            if n > 0:
                done += n
                continue
            if n == 0 and miss_hva:
                self.hostmem.resolve(miss_hva, op)
                continue
            if done:
                break
            raise KvmError(-n if n < 0 else errno.EIO, op, f"no memslot at gpa 0x{gpa:x}", warn=False)
        return native.unpack(buf, done) if data is None else done

    # --- views -----------------------------------------------------------------------
    def slots(self, as_id):
        """The slots of one address space, sorted by gpa, as plain SlotInfo values."""
        return [SlotInfo(*row) for row in native.memslot_list(self.mmu, as_id)]
