"""MMU notifiers and the launchers' own ioctls through the mount (launchers.py).

KVMFS_MMU_NOTIFY is how a VMM's change of its own address space reaches kvmfs
(the preload library sends it): between START and END no guest fault installs a
mapping of the range, and after END the guest sees what the VMM has there now.
KVMFS_ACT_FOR lets a supervisor create a VM for a process it could ptrace.
"""
import errno
import fcntl
import mmap
import os
import threading
import time

import pytest

from kvmfs import abi
from kvmfs.client import alloc_guest_memory
from tests import guestcases
from tests.guests import assemble_text

CODE_GPA = 0x1000
DATA_GPA = 0x10000          # slot 1: one page the VMM replaces

# real mode: load the byte at DATA_GPA, OUT it to port 0x10, then HLT
READER = f"""
    .code16
    mov ${DATA_GPA >> 4:#x}, %ax
    mov %ax, %ds
    movb 0, %al
    out %al, $0x10
    hlt
"""


def notify(fd, start, end, phase, event=abi.KVMFS_MMU_EVENT_UNMAP, cause=abi.KVMFS_CAUSE_MMAP_FIXED):
    return fcntl.ioctl(fd, abi.KVMFS_MMU_NOTIFY, bytes(abi.kvmfs_mmu_notify(start, end, phase, event, cause)))


class Guest:
    """A VM whose slot 1 is one page of shared memory at a fixed VMM address."""

    def __init__(self, kvm):
        self.vm = kvm.create_vm()
        self.low = alloc_guest_memory(0x10000)
        image = assemble_text(READER, CODE_GPA)
        self.low.map[CODE_GPA:CODE_GPA + len(image)] = image
        self.vm.set_user_memory_region(0, 0, 0, 0x10000, self.low.address)
        self.page = mmap.mmap(-1, 4096, mmap.MAP_SHARED)      # shared anonymous: shmem
        import ctypes
        self._anchor = ctypes.c_char.from_buffer(self.page)
        self.hva = ctypes.addressof(self._anchor)
        self.vm.set_user_memory_region(1, 0, DATA_GPA, 4096, self.hva)
        self.vcpu = self.vm.create_vcpu(0)

    def read(self):
        """Run the reader from the start; the byte it OUTs."""
        guestcases.setup(self.vcpu, self.low, "real", CODE_GPA)
        self.vcpu.run()
        assert self.vcpu.kvm_run.exit_reason == abi.KVM_EXIT_IO
        value = self.vcpu.io_data()[0]
        self.vcpu.run()
        assert self.vcpu.kvm_run.exit_reason == abi.KVM_EXIT_HLT
        return value

    def replace(self, value):
        """mmap(MAP_FIXED) a new shared page over the slot's page, holding `value`."""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        p = libc.mmap(self.hva, 4096, 3, mmap.MAP_SHARED | mmap.MAP_ANONYMOUS | 0x10, -1, 0)
        assert p == self.hva
        ctypes.c_uint8.from_address(self.hva).value = value

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.low.close()
        del self._anchor
        self.page.close()


@pytest.fixture
def guest(kvm):
    g = Guest(kvm)
    yield g
    g.close()


def stats(vm):
    return dict(line.split(": ") for line in vm.info("stats").splitlines())


def test_a_replaced_mapping_is_seen_after_the_notifier_call(guest, kvm):
    guest.page[0] = 0x11
    assert guest.read() == 0x11
    notify(kvm.fd, guest.hva, guest.hva + 4096, abi.KVMFS_NOTIFY_START)
    guest.replace(0x22)
    notify(kvm.fd, guest.hva, guest.hva + 4096, abi.KVMFS_NOTIFY_END)
    assert guest.read() == 0x22
    st = stats(guest.vm)
    assert int(st["notifier_invalidations"]) == 1 and int(st["notifier_sptes_zapped"]) == 1
    events = guest.vm.info("notifier").splitlines()
    assert events[0].split() == ["seq", "start", "end", "event", "cause", "sptes_zapped"]
    assert events[1].split() == ["1", f"0x{guest.hva:x}", f"0x{guest.hva + 4096:x}", "unmap",
                                 "mmap_fixed", "1"]


def test_without_the_notifier_the_guest_keeps_the_old_page(guest):
    """What the notifier is for: the daemon still maps the old page (as KVM without
    MMU notifiers would keep its stale spte)."""
    guest.page[0] = 0x11
    assert guest.read() == 0x11
    guest.replace(0x22)
    assert guest.read() == 0x11


def test_a_fault_during_an_invalidation_waits_for_its_end(guest, kvm):
    """KVM's retry: a fault on a range whose invalidation has started installs nothing
    until it ends, and then sees the new mapping, never the old one."""
    guest.page[0] = 0x11
    notify(kvm.fd, guest.hva, guest.hva + 4096, abi.KVMFS_NOTIFY_START)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("v", guest.read()))
    t.start()
    time.sleep(0.3)
    assert "v" not in result                   # retrying, not reading the old page
    guest.replace(0x33)
    notify(kvm.fd, guest.hva, guest.hva + 4096, abi.KVMFS_NOTIFY_END)
    t.join(10)
    assert result["v"] == 0x33
    assert int(stats(guest.vm)["mmu_notifier_retries"]) >= 1


@pytest.mark.expect_log(r"invalidation of 0x[0-9a-f]+-0x[0-9a-f]+ never ended")
def test_closing_the_file_ends_its_invalidations(guest, mounted):
    guest.page[0] = 0x44
    fd = os.open(os.path.join(mounted, "kvm"), os.O_RDWR)
    notify(fd, guest.hva, guest.hva + 4096, abi.KVMFS_NOTIFY_START)
    os.close(fd)
    deadline = time.monotonic() + 5           # RELEASE is asynchronous
    while True:
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("v", guest.read()), daemon=True)
        t.start()
        t.join(1)
        if "v" in done:
            break
        assert time.monotonic() < deadline
        t.join()
    assert done["v"] == 0x44


@pytest.mark.parametrize("start,end,phase,event", [
    (0x1000, 0x1000, 0, 0), (0x1001, 0x2000, 0, 0), (0x1000, 0x2000, 2, 0), (0x1000, 0x2000, 0, 9)])
@pytest.mark.expect_log(r"KVMFS_MMU_NOTIFY: EINVAL")
def test_malformed_notifier_calls_are_einval(kvm, start, end, phase, event):
    with pytest.raises(OSError) as e:
        notify(kvm.fd, start, end, phase, event)
    assert e.value.errno == errno.EINVAL


def test_an_end_without_a_start_changes_nothing(kvm):
    notify(kvm.fd, 0x1000, 0x2000, abi.KVMFS_NOTIFY_END)        # no error, nothing to end


@pytest.mark.expect_log(r"ioctl: EIO \(vm\d+ belongs to pid")
def test_act_for_creates_the_vm_for_that_process(mounted):
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(w)
        os.read(r, 1)
        os._exit(0)
    os.close(r)
    try:
        fd = os.open(os.path.join(mounted, "kvm"), os.O_RDWR)
        fcntl.ioctl(fd, abi.KVMFS_ACT_FOR, bytes(abi.kvmfs_act_for(child, 0)))
        n = fcntl.ioctl(fd, abi.KVM_CREATE_VM, 0)
        owners = {line.split()[0]: line for line in open(os.path.join(mounted, "info", "vms"))}
        assert f"pid:{child}" in owners[f"vm{n}"]
        # a VM file opened here acts for the child too, so it is the child's VM
        ctl = os.open(os.path.join(mounted, f"vm{n}", "ctl"), os.O_RDWR)
        with pytest.raises(OSError) as e:
            fcntl.ioctl(ctl, abi.KVM_CREATE_VCPU, 0)
        assert e.value.errno == errno.EIO
        fcntl.ioctl(ctl, abi.KVMFS_ACT_FOR, bytes(abi.kvmfs_act_for(child, 0)))
        assert fcntl.ioctl(ctl, abi.KVM_CREATE_VCPU, 0) == 0
        os.close(ctl)
        os.close(fd)
    finally:
        os.close(w)
        os.waitpid(child, 0)


@pytest.mark.parametrize("tid,flags,err", [(0, 0, errno.ESRCH), (2**31 - 1, 0, errno.ESRCH),
                                           (None, 1, errno.EINVAL)])
@pytest.mark.expect_log(r"KVMFS_ACT_FOR: E(SRCH|INVAL)")
def test_act_for_refusals(kvm, tid, flags, err):
    with pytest.raises(OSError) as e:
        fcntl.ioctl(kvm.fd, abi.KVMFS_ACT_FOR, bytes(abi.kvmfs_act_for(os.getpid() if tid is None else tid, flags)))
    assert e.value.errno == err
