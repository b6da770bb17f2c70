"""Edges where kvmfs answered differently from KVM (found by fuzzing), run on both.

Each test runs the same client code on the mount and on /dev/kvm and compares.
"""
import errno

import pytest

import guestcases

from kvmfs import abi
from kvmfs.client import Kvm, _msr_buffer, alloc_guest_memory, ioctl

MSR_IA32_TSC = 0x10


@pytest.fixture(params=["kvmfs", "kvm"])
def kvm(request, mounted):
    if request.param == "kvm":
        request.getfixturevalue("real_kvm")
    k = Kvm(mounted if request.param == "kvmfs" else None)
    yield k
    k.close()


def real_mode_vcpu(kvm, code, slot_size=0x10000):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(slot_size)
    mem.map[0x1000:0x1000 + len(code)] = code
    vm.set_user_memory_region(0, 0, 0, slot_size, mem.address)
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.get_supported_cpuid())
    guestcases.setup(vcpu, mem, "real", 0x1000)
    return vm, vcpu, mem


@pytest.mark.expect_log(r"KVM_GET_MSRS: E2BIG")
@pytest.mark.parametrize("n, want", [(255, 255), (256, errno.E2BIG), (300, errno.E2BIG)])
def test_msr_ioctls_take_at_most_255_entries(kvm, n, want):
    vm = kvm.create_vm()
    vcpu = vm.create_vcpu(0)
    try:
        got = ioctl(vcpu.fd, abi.KVM_GET_MSRS, _msr_buffer([MSR_IA32_TSC] * n))
    except OSError as e:
        got = e.errno
    assert got == want
    vcpu.close()
    vm.close()


def test_a_load_straddling_the_end_of_memory_exits_with_the_part_outside(kvm):
    """mov eax, [ds:0xeffe] (DS base 0x1000: gpa 0xfffe, inside the segment's 64 KiB)
    with memory up to 0x10000: an MMIO read of 2 bytes at 0x10000 (kvmfs said 4 bytes
    at 0xfffc); the 2 bytes inside come from memory."""
    code = bytes([0x66, 0xA1, 0xFE, 0xEF,        # mov eax, [0xeffe]
                  0xF4])                          # hlt
    vm, vcpu, mem = real_mode_vcpu(kvm, code)
    s = vcpu.get_sregs()
    s.ds.selector, s.ds.base = 0x100, 0x1000
    vcpu.set_sregs(s)
    mem.map[0xFFFE:0x10000] = b"\x11\x22"
    vcpu.run()
    run = vcpu.kvm_run
    assert run.exit_reason == abi.KVM_EXIT_MMIO, (run.exit_reason, hex(vcpu.get_regs().rip))
    assert (run.exit.mmio.phys_addr, run.exit.mmio.len, run.exit.mmio.is_write) == (0x10000, 2, 0)
    run.exit.mmio.data[0:2] = [0x33, 0x44]
    vcpu.run()
    assert run.exit_reason == abi.KVM_EXIT_HLT
    assert vcpu.get_regs().rax & 0xFFFFFFFF == 0x44332211
    del run                                                   # a view into the kvm_run mapping
    vcpu.close()
    vm.close()
