"""A VM: its memslots (in the native MMU), host memory, vCPUs and VM ioctls.

Owns: one native kvmfs_mmu, the HostMemory mappings of the creator's memory,
the vCPUs, the count of open VM/vCPU files.  Lock order: Vm.lock, then the
native mmu_lock (inside C).  A VM belongs to the process that created it
(`owner_pid`, a thread-group id): VM and vCPU ioctls from any other process get
EIO, as in KVM.

Lifetime:  CREATED --open ctl/vcpu--> OPEN --last close--> freed
           CREATED --creator exits without opening--> freed
"""
import collections
import errno
import logging
import threading

from kvmfs import abi, memslots, procmem
from kvmfs._native import ensure, ffi, lib
from kvmfs.errors import KvmError, check
from kvmfs.hostmem import HostMemory

log = logging.getLogger("kvmfs.vm")

SlotInfo = collections.namedtuple(
    "SlotInfo", "as_id id flags base_gfn npages userspace_addr dirty_count")


class Vm:
    UNKNOWN_IOCTL_ERRNO = errno.ENOTTY   # spec 3.2: VM fds answer ENOTTY

    def __init__(self, system, vm_id, owner_pid):
        self.system = system
        self.id = vm_id
        self.owner_pid = owner_pid
        self.owner_start = procmem.process_start_time(owner_pid)
        self.owner_uid = procmem.owner_uid(owner_pid)
        self.lock = threading.Lock()
        self.mmu = ffi.gc(lib.kvmfs_mmu_new(), lambda p: None)  # freed explicitly in destroy()
        if self.mmu == ffi.NULL:
            raise KvmError(errno.ENOMEM, "KVM_CREATE_VM")
        self.hostmem = HostMemory(self.mmu, owner_pid)
        self.vcpus = {}
        self.refs = 0
        self.opened = False
        self.dead = False
        self.killed = None            # why KVM would have killed the VM (kvm_vm_dead)
        self.tss_addr = None
        self.identity_map_addr = 0xFFFBC000
        self.manual_protect = 0
        self.counters = {"memslot_changes": 0, "dirty_log_gets": 0, "dirty_log_clears": 0}

    # --- lifetime -------------------------------------------------------------------
    def get_ref(self):
        with self.lock:
            self.refs += 1
            self.opened = True

    def put_ref(self):
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.system.destroy_vm(self, "last file closed")

    def unreachable(self):
        return not self.opened and self.refs == 0 and not procmem.alive(self.owner_pid, self.owner_start)

    def destroy(self):
        with self.lock:
            if self.dead:
                return
            self.dead = True
            vcpus = list(self.vcpus.values())
            self.vcpus.clear()
        for v in vcpus:
            v.destroy()
        lib.kvmfs_mmu_free(self.mmu)
        self.hostmem.close()

    def check_owner(self, ctx):
        """VM and vCPU ioctls from a process other than the creator: EIO (kvm->mm != current->mm)."""
        if ctx.tgid != self.owner_pid:
            tgid = procmem.recheck_tgid(ctx.pid)
            if tgid != self.owner_pid:
                raise KvmError(errno.EIO, "ioctl", f"vm{self.id} belongs to pid {self.owner_pid}, not {tgid}")
        if self.dead:
            raise KvmError(errno.EIO, "ioctl", f"vm{self.id} is dead")
        if self.killed:
            raise KvmError(errno.EIO, "ioctl", f"vm{self.id} was killed: {self.killed}", warn=False)

    def kill(self, why):
        """As KVM's kvm_vm_dead(): every VM and vCPU ioctl answers EIO from now on."""
        log.warning("vm%d killed: %s", self.id, why)
        self.killed = why
        for v in list(self.vcpus.values()):       # the others leave KVM_RUN (EINTR), then EIO
            if v.native != ffi.NULL:
                lib.kvmfs_vcpu_kick(v.native)

    # --- VM ioctls --------------------------------------------------------------------
    def check_extension(self, ctx, arg, data):
        """KVM_CHECK_EXTENSION (vm): as on the system fd, for this VM's type."""
        return abi.CAPS.get(arg, 0)

    def create_vcpu(self, ctx, arg, data):
        """KVM_CREATE_VCPU (vm): id -> K (open MNT/vmN/vcpuK).

        EINVAL: id >= KVM_CAP_MAX_VCPU_ID or too many vCPUs; EEXIST: id in use.
        """
        from kvmfs.vcpu import Vcpu
        op = "KVM_CREATE_VCPU"
        check(arg < abi.KVM_MAX_VCPU_ID, errno.EINVAL, op, f"id {arg} >= {abi.KVM_MAX_VCPU_ID}")
        with self.lock:
            check(len(self.vcpus) < abi.KVM_MAX_VCPUS, errno.EINVAL, op, "too many vCPUs")
            check(arg not in self.vcpus, errno.EEXIST, op, f"vcpu{arg} exists")
            self.vcpus[arg] = Vcpu(self, arg)
        return arg

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
            lib.kvmfs_dirty_set_manual_protect(self.mmu, cap.args[0])
            return 0
        raise KvmError(errno.EINVAL, op, f"capability {cap.cap} cannot be enabled")

    def _logged_slot(self, op, slot):
        as_id, sid = slot >> 16, slot & 0xFFFF
        check(as_id < abi.KVM_ADDRESS_SPACE_NUM and sid < abi.KVM_USER_MEM_SLOTS, errno.EINVAL, op,
              f"slot 0x{slot:x}")
        info = ffi.new("struct kvmfs_slot_info *")
        rc = lib.kvmfs_memslot_get(self.mmu, as_id, sid, info)
        if rc < 0 or not info.flags & abi.KVM_MEM_LOG_DIRTY_PAGES:
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
        buf = ffi.new("char[]", nbytes)
        ensure(lib.kvmfs_dirty_get_log(self.mmu, as_id, sid, buf, nbytes), op)
        procmem.write(ctx.pid, log_arg.dirty_bitmap, (int(ffi.cast("uintptr_t", buf)), nbytes), op)
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
        mask = ffi.new("char[]", max(nbytes, 1))
        procmem.read_into(ctx.pid, c.dirty_bitmap, int(ffi.cast("uintptr_t", mask)), nbytes, op)
        ensure(lib.kvmfs_dirty_clear_log(self.mmu, as_id, sid, c.first_page, c.num_pages, mask), op)
        self.counters["dirty_log_clears"] += 1
        return 0

    IOCTLS = {
        abi.KVM_CHECK_EXTENSION: check_extension,
        abi.KVM_CREATE_VCPU: create_vcpu,
        abi.KVM_SET_USER_MEMORY_REGION: set_user_memory_region,
        abi.KVM_SET_USER_MEMORY_REGION2: set_user_memory_region2,
        abi.KVM_SET_TSS_ADDR: set_tss_addr,
        abi.KVM_SET_IDENTITY_MAP_ADDR: set_identity_map_addr,
        abi.KVM_ENABLE_CAP: enable_cap,
        abi.KVM_GET_DIRTY_LOG: get_dirty_log,
        abi.KVM_CLEAR_DIRTY_LOG: clear_dirty_log,
    }

    # --- guest-physical memory as a file ---------------------------------------------
    def access_gpa(self, as_id, gpa, length, data=None):
        """Read (data None) or write guest memory at gpa; stops at a hole.

        Returns bytes (read) or the count written.  A hole at gpa: EIO; host
        memory that cannot be shared: EFAULT.
        """
        op = "read guest memory" if data is None else "write guest memory"
        buf = ffi.new("char[]", length) if data is None else ffi.from_buffer(data)
        miss = ffi.new("uint64_t *")
        done = 0
        while done < length:
            fn = lib.kvmfs_mmu_read_gpa if data is None else lib.kvmfs_mmu_write_gpa
            n = fn(self.mmu, as_id, gpa + done, buf + done, length - done, miss)
            if n > 0:
                done += n
                continue
            if n == 0 and miss[0]:
                self.hostmem.resolve(miss[0], op)
                continue
            if done:
                break
            raise KvmError(-n if n < 0 else errno.EIO, op, f"no memslot at gpa 0x{gpa:x}", warn=False)
        return ffi.buffer(buf, done)[:] if data is None else done

    # --- views -----------------------------------------------------------------------
    def slots(self, as_id):
        """The slots of one address space, sorted by gpa, as plain SlotInfo values."""
        n = lib.kvmfs_memslot_count(self.mmu, as_id)
        out = ffi.new("struct kvmfs_slot_info[]", max(n, 1))
        n = min(lib.kvmfs_memslot_list(self.mmu, as_id, out, n), n)
        # Copied out: an element of `out` is a view into memory freed with `out`.
        return [SlotInfo(*(getattr(out[i], f) for f in SlotInfo._fields)) for i in range(n)]
