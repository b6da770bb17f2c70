"""OUT-exit round trip with the Python client (kvmfs.client), for `make bench`.

    bench_pyclient.py MNT|- N REPS    per rep: ns per vcpu.run() -> KVM_EXIT_IO

MNT "-" means the host's /dev/kvm.  The guest is `out dx,al ; jmp $-1` in real
mode at 0x1000 (the guest of bench/bench_guest.c `exit real`).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kvmfs import abi  # noqa: E402
from kvmfs.client import Kvm, alloc_guest_memory  # noqa: E402


def main(mnt, n, reps):
    kvm = Kvm(None if mnt == "-" else mnt)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(1 << 20)
    mem.map[0x1000:0x1003] = bytes([0xEE, 0xEB, 0xFD])
    vm.set_user_memory_region(0, 0, 0, mem.size, mem.address)
    vcpu = vm.create_vcpu(0)
    s = vcpu.get_sregs()
    s.cs.base = s.cs.selector = 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags, r.rdx = 0x1000, 2, 0x10
    vcpu.set_regs(r)
    run = vcpu.run
    kr = vcpu.kvm_run
    for _ in range(200):
        run()
    if kr.exit_reason != abi.KVM_EXIT_IO:
        sys.exit("unexpected exit %d" % kr.exit_reason)
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            run()
            if kr.exit_reason != 2:
                sys.exit("unexpected exit %d" % kr.exit_reason)
        print("%.1f" % ((time.perf_counter() - t0) * 1e9 / n), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
