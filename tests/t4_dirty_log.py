"""Dirty logging through the mount: KVM's answers for a known workload, and no lost dirty page.

The invariant test follows the kernel's dirty_log_test: guest code on two vCPUs
keeps writing random pages of a logged slot (each vCPU bumps its own counter
in the page) while the VMM harvests the bitmap round after round.  A page whose
counters changed between the snapshots taken after harvests r-1 and r was
written after harvest r-1, so it must be reported by harvest r or, if the write
raced with it, by harvest r+1.  Zero misses allowed.
"""
import threading
import time

import pytest

from kvmfs import abi
from kvmfs.client import Kvm, alloc_guest_memory

from tests.guests import assemble_text

CODE_GPA = 0x1000
STOP_GPA = 0x2000
LOG_GPA = 0x100000
NPAGES = 256
LOG_SIZE = NPAGES * abi.PAGE_SIZE

# 32-bit flat protected mode, no paging.  EDI = vCPU index, EBX = seed.
WRITER = f"""
    .code32
loop:
    cmpl $0, {STOP_GPA:#x}
    jne done
    imul $1103515245, %ebx, %ebx
    add $12345, %ebx
    mov %ebx, %eax
    shr $16, %eax
    and ${NPAGES - 1}, %eax
    shl $12, %eax
    incl {LOG_GPA:#x}(%eax,%edi,4)
    jmp loop
done:
    hlt
"""

# Real mode: write pages 0, 3 and 15 of the 16-page logged slot at 0x10000, halt; twice.
KNOWN = """
    .code16
    mov $0x1000, %ax
    mov %ax, %ds
again:
    movb $1, 0x0000
    movb $1, 0x3000
    movb $1, 0xf000
    hlt
    jmp again
"""

def flat32(vcpu):
    s = vcpu.get_sregs()
    for name, sel, typ in (("cs", 8, 11), ("ds", 16, 3), ("es", 16, 3), ("ss", 16, 3),
                           ("fs", 16, 3), ("gs", 16, 3)):
        seg = getattr(s, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, sel, typ
        seg.present, seg.dpl, seg.db, seg.s, seg.l, seg.g = 1, 0, 1, 1, 0, 1
    s.cr0 |= 1
    vcpu.set_sregs(s)

def real_mode_at(vcpu, rip):
    s = vcpu.get_sregs()
    s.cs.selector, s.cs.base = 0, 0
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = rip, 2
    vcpu.set_regs(r)

@pytest.fixture(params=["kvmfs", "kvm"])
def kvm(request, mounted, real_kvm):
    k = Kvm(mounted if request.param == "kvmfs" else None)
    yield k
    k.close()

def test_known_workload_bitmap_matches_kvm(kvm):
    vm = kvm.create_vm()
    mem = alloc_guest_memory(0x20000)
    image = assemble_text(KNOWN, CODE_GPA)
    mem.map[CODE_GPA:CODE_GPA + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 0x10000, mem.address)
    vm.set_user_memory_region(1, abi.KVM_MEM_LOG_DIRTY_PAGES, 0x10000, 0x10000, mem.address + 0x10000)
    vcpu = vm.create_vcpu(0)
    real_mode_at(vcpu, CODE_GPA)
    assert vm.get_dirty_log(1, 16) == [0]                    # a fresh slot reports nothing
    mem.map[0x10000 + 5 * abi.PAGE_SIZE] = 7                  # host writes are not logged
    vcpu.run()
    assert vcpu.kvm_run.exit_reason == abi.KVM_EXIT_HLT
    assert vm.get_dirty_log(1, 16) == [0x8009]
    assert vm.get_dirty_log(1, 16) == [0]                    # GET cleared it
    vcpu.run()
    assert vm.get_dirty_log(1, 16) == [0x8009]               # and re-armed the protection
    vcpu.run()
    vm.clear_dirty_log(1, 0, 16, [0x1])                      # CLEAR works without manual protect
    assert vm.get_dirty_log(1, 16) == [0x8008]
    vm.set_user_memory_region(1, 0, 0x10000, 0x10000, mem.address + 0x10000)
    with pytest.raises(OSError) as e:                        # logging off: the bitmap is gone
        vm.get_dirty_log(1, 16)
    assert e.value.errno == 2
    vcpu.close()
    vm.close()

def run_until_halt(vcpu, errors):
    try:
        while True:
            vcpu.run()
            if vcpu.kvm_run.exit_reason == abi.KVM_EXIT_HLT:
                return
            errors.append(f"unexpected exit {vcpu.kvm_run.exit_reason}")
            return
    except OSError as e:
        errors.append(str(e))

@pytest.mark.parametrize("harvest", ["get", "clear"])
def test_no_lost_dirty_page(mounted, harvest):
    kvm = Kvm(mounted)
    vm = kvm.create_vm()
    if harvest == "clear":
        vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)
    low = alloc_guest_memory(0x10000)
    data = alloc_guest_memory(LOG_SIZE)
    image = assemble_text(WRITER, CODE_GPA)
    low.map[CODE_GPA:CODE_GPA + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 0x10000, low.address)
    vm.set_user_memory_region(1, abi.KVM_MEM_LOG_DIRTY_PAGES, LOG_GPA, LOG_SIZE, data.address)
    vcpus = []
    for i in range(2):
        v = vm.create_vcpu(i)
        flat32(v)
        r = v.get_regs()
        r.rip, r.rflags, r.rdi, r.rbx = CODE_GPA, 2, i, 0x1234567 * (i + 1)
        v.set_regs(r)
        vcpus.append(v)
    counters = memoryview(data.map).cast("I")

    def snapshot():
        return [tuple(counters[p * 1024 + v] for v in range(2)) for p in range(NPAGES)]

    def harvest_once():
        words = vm.get_dirty_log(1, NPAGES)
        if harvest == "clear":
            vm.clear_dirty_log(1, 0, NPAGES, words)
        return {w * 64 + b for w, word in enumerate(words) for b in range(64) if word >> b & 1}

    errors = []
    threads = [threading.Thread(target=run_until_halt, args=(v, errors)) for v in vcpus]
    for t in threads:
        t.start()
    misses, reported = [], 0
    prev_snap = snapshot()
    prev_changed, prev_bits = set(), set()
    try:
        for rnd in range(40):
            time.sleep(0.005)
            bits = harvest_once()
            snap = snapshot()
            changed = {p for p in range(NPAGES) if snap[p] != prev_snap[p]}
            # pages written after harvest r-1 and before snapshot r: in harvest r or r+1
            misses += [(rnd, p) for p in prev_changed if p not in prev_bits and p not in bits]
            reported += len(bits)
            prev_snap, prev_changed, prev_bits = snap, changed, bits
    finally:
        low.map[STOP_GPA:STOP_GPA + 4] = b"\1\0\0\0"
        for t in threads:
            t.join(30)
    bits = harvest_once()
    misses += [(40, p) for p in prev_changed if p not in prev_bits and p not in bits]
    assert not errors
    assert not misses, f"{len(misses)} written pages never reported: {misses[:10]}"
    total = sum(sum(c) for c in snapshot())
    assert total > 1000 and reported > 100, (total, reported)   # the guests really ran
    for v in vcpus:
        v.close()
    vm.close()
    kvm.close()

def test_harvests_under_a_running_guest_lose_or_repeat_no_instruction(mounted):
    """Each harvest stops the vCPU to flush its TLB; a counted RMW loop must still end exact."""
    kvm = Kvm(mounted)
    vm = kvm.create_vm()
    low = alloc_guest_memory(0x10000)
    data = alloc_guest_memory(LOG_SIZE)
    image = assemble_text(f"""
        .code32
        xor %ecx, %ecx
    1:  incl {LOG_GPA:#x}
        incl {LOG_GPA + 0x1000:#x}
        inc %ecx
        cmpl $0, {STOP_GPA:#x}
        je 1b
        mov %ecx, {STOP_GPA + 4:#x}
        hlt
    """, CODE_GPA)
    low.map[CODE_GPA:CODE_GPA + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 0x10000, low.address)
    vm.set_user_memory_region(1, abi.KVM_MEM_LOG_DIRTY_PAGES, LOG_GPA, LOG_SIZE, data.address)
    v = vm.create_vcpu(0)
    flat32(v)
    r = v.get_regs()
    r.rip, r.rflags = CODE_GPA, 2
    v.set_regs(r)
    errors = []
    t = threading.Thread(target=run_until_halt, args=(v, errors))
    t.start()
    counters = memoryview(data.map).cast("I")
    deadline = time.monotonic() + 30
    while counters[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.001)                           # harvest only once the guest is running
    for _ in range(50):                             # the guest loops until told to stop
        vm.get_dirty_log(1, NPAGES)                 # re-protects: a remote flush each time
    low.map[STOP_GPA:STOP_GPA + 4] = b"\1\0\0\0"
    t.join(30)
    iters = memoryview(low.map).cast("I")[(STOP_GPA + 4) // 4]
    assert not errors and not t.is_alive()
    assert iters > 0
    assert (counters[0], counters[1024]) == (iters, iters)
    v.close()
    vm.close()
    kvm.close()
