"""Shared set-up of the reproducers: `python tests/fuzz_repro/NAME.py MNT` on a mount."""
import ctypes
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from kvmfs import abi  # noqa: E402,F401
from kvmfs.client import Kvm, alloc_guest_memory, ioctl  # noqa: E402,F401

MNT = sys.argv[1] if len(sys.argv) > 1 else "mnt"
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


def spin_vm():
    """vm with 64 KiB at gpa 0 and vcpu0 in real mode at `jmp $` (0x1000)."""
    kvm = Kvm(MNT)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(0x10000)
    mem.map[0x1000:0x1002] = b"\xeb\xfe"
    vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs.selector = s.cs.base = 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = 0x1000, 2
    vcpu.set_regs(r)
    return kvm, vm, vcpu, mem
