"""The System / Vm / Vcpu objects without FUSE: handlers called as fs.py calls them."""
import ctypes
import errno
import os
import subprocess
import sys
import tempfile

import pytest

from kvmfs import abi, commands
from kvmfs.caller import Caller
from kvmfs.procmem import Process
from kvmfs.client import alloc_guest_memory
from kvmfs.errors import KvmError
from kvmfs.system import System

MiB = 1 << 20


Ctx = Caller.this_process()     # the caller as fs.py describes it: this process


@pytest.fixture
def system():
    with tempfile.TemporaryDirectory() as run_dir:
        s = System(run_dir)
        yield s
        s.destroy_all()


def call(obj, handler, arg=0, struct=None):
    return handler(obj, Ctx, arg, ctypes.addressof(struct) if struct is not None else 0)


def region(slot, flags, gpa, size, hva):
    return abi.kvm_userspace_memory_region(slot, flags, gpa, size, hva)


def errno_of(fn, *args, **kw):
    with pytest.raises(KvmError) as e:
        fn(*args, **kw)
    return e.value.errno


def test_system_ioctls(system):
    assert call(system, System.get_api_version) == abi.API_VERSION
    assert errno_of(call, system, System.get_api_version, 1) == errno.EINVAL
    assert call(system, System.get_vcpu_mmap_size) == abi.VCPU_MMAP_SIZE
    assert call(system, System.check_extension, abi.KVM_CAP_NR_MEMSLOTS) == abi.KVM_USER_MEM_SLOTS
    assert errno_of(call, system, System.create_vm, abi.KVM_X86_SW_PROTECTED_VM) == errno.EINVAL  # not built
    vm_id = call(system, System.create_vm, abi.KVM_X86_DEFAULT_VM)
    assert system.vms[vm_id].owner_pid == os.getpid()


def test_memslots_and_guest_memory(system):
    vm = system.new_vm(Process.of_pid(os.getpid()))
    mem = alloc_guest_memory(2 * MiB)
    set_region = type(vm).set_user_memory_region
    assert call(vm, set_region, struct=region(0, 0, 0, MiB, mem.address)) == 0
    assert errno_of(call, vm, set_region, struct=region(1, 0, 0x80000, MiB, mem.address)) == errno.EEXIST
    assert errno_of(call, vm, set_region, struct=region(2, 0, 0x1000, 0x800, mem.address)) == errno.EINVAL
    assert errno_of(call, vm, set_region, struct=region(3, 0, 0, 0, 0)) == errno.EINVAL   # delete absent
    call(vm, set_region, struct=region(1, 0, MiB, MiB, mem.address + MiB))
    mem.map[MiB - 4:MiB + 4] = b"abcdefgh"
    assert vm.access_gpa(0, MiB - 4, 8) == b"abcdefgh"          # across two slots
    assert vm.access_gpa(0, 0x10, 3, b"xyz") == 3
    assert mem.map[0x10:0x13] == b"xyz"
    assert errno_of(vm.access_gpa, 0, 4 * MiB, 8) == errno.EIO
    assert [(s.id, s.base_gfn, s.npages) for s in vm.slots(0)] == [(0, 0, 256), (1, 256, 256)]


def test_dirty_log_handlers_check_before_they_touch(system):
    vm = system.new_vm(Process.of_pid(os.getpid()))
    mem = alloc_guest_memory(MiB)
    call(vm, type(vm).set_user_memory_region, struct=region(0, 0, 0, MiB, mem.address))
    bitmap = (ctypes.c_uint64 * 4)()
    log = abi.kvm_dirty_log(0, 0, ctypes.addressof(bitmap))
    assert errno_of(call, vm, type(vm).get_dirty_log, struct=log) == errno.ENOENT   # not logging
    call(vm, type(vm).set_user_memory_region,
         struct=region(0, abi.KVM_MEM_LOG_DIRTY_PAGES, 0, MiB, mem.address))
    bitmap[0] = 0xFF
    assert call(vm, type(vm).get_dirty_log, struct=log) == 0 and list(bitmap) == [0, 0, 0, 0]
    clear = abi.kvm_clear_dirty_log(0, 3, 0, ctypes.addressof(bitmap))
    assert errno_of(call, vm, type(vm).clear_dirty_log, struct=clear) == errno.EINVAL  # 3 of 256
    clear = abi.kvm_clear_dirty_log(0, 64, 1, ctypes.addressof(bitmap))
    assert errno_of(call, vm, type(vm).clear_dirty_log, struct=clear) == errno.EINVAL  # first_page 1
    cap = abi.kvm_enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0)
    cap.args[0] = abi.KVM_DIRTY_LOG_INITIALLY_SET
    assert errno_of(call, vm, type(vm).enable_cap, struct=cap) == errno.EINVAL     # SET without ENABLE


def test_vcpus_and_lifetime(system):
    vm = system.new_vm(Process.of_pid(os.getpid()))
    assert call(vm, type(vm).create_vcpu, 7) == 7
    assert errno_of(call, vm, type(vm).create_vcpu, 7) == errno.EEXIST
    assert errno_of(call, vm, type(vm).create_vcpu, abi.KVM_MAX_VCPU_ID) == errno.EINVAL
    ident = abi.u64_arg(0xFEFFC000)
    assert errno_of(call, vm, type(vm).set_identity_map_addr, struct=ident) == errno.EINVAL
    run_path = vm.vcpus[7].run_area.path
    assert os.stat(run_path).st_size == abi.VCPU_MMAP_SIZE
    vm.get_ref()
    vm.put_ref()                                   # the last file closed: the VM is freed
    assert vm.dead and vm.id not in system.vms and not os.path.exists(run_path)


def test_reaper_frees_vms_of_dead_creators_that_never_opened_them(system):
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    vm = system.new_vm(Process.of_pid(child.pid))       # pinned while it runs
    child.communicate(b"")                               # then it exits without opening the VM
    system.reap()
    assert vm.dead and vm.id not in system.vms
    alive = system.new_vm(Process.of_pid(os.getpid()))
    system.reap()
    assert not alive.dead


def test_text_commands_answer_like_the_ioctls(system):
    assert commands.execute(system, Ctx, "create_vm") == "vm 0\n"
    vm = system.vms[0]
    assert commands.execute(vm, Ctx, "set_user_memory_region 0 0 0x0 0x10000").startswith("ok hva=0x")
    with pytest.raises(KvmError) as e:
        commands.execute(vm, Ctx, "set_user_memory_region 1 0 0x0 0x10000")
    assert e.value.errno == errno.EEXIST
    assert commands.last_reply(vm).startswith("error: EEXIST")
    assert commands.execute(vm, Ctx, "set_user_memory_region 0 0 0x0 0").startswith("ok")  # delete
    with pytest.raises(KvmError) as e:
        commands.execute(system, Ctx, "check_extension")            # missing argument
    assert e.value.errno == errno.EINVAL
    assert commands.execute(system, Ctx, "check_extension NR_MEMSLOTS") == \
        f"{abi.KVM_USER_MEM_SLOTS}\n"
