"""Test guests: assemble source text or a kvmfs/guests/*.S file at a load address,
and the spinning vCPU the signal and lifetime tests run.

A thin front of kvmfs.guests (the one assembler), kept for the tests that
assemble inline sources.
"""
import os

from kvmfs.client import alloc_guest_memory
from kvmfs.guests import SRC_DIR, assemble_text


def assemble(name, base=0x1000):
    """kvmfs/guests/NAME (with its .S) linked at base."""
    with open(os.path.join(SRC_DIR, name)) as f:
        return assemble_text(f.read(), base)


def spinning_vcpu(kvm):
    """A VM whose vCPU 0 is set up to run `jmp $` in real mode: (vm, vcpu, memory)."""
    vm = kvm.create_vm()
    mem = alloc_guest_memory(0x10000)
    mem.map[0x1000:0x1002] = b"\xeb\xfe"                     # jmp $
    vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs.selector, s.cs.base = 0, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip = 0x1000
    vcpu.set_regs(r)
    return vm, vcpu, mem


__all__ = ["assemble", "assemble_text", "spinning_vcpu"]
