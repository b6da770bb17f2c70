"""The MMU through the mount: slot changes under a running vCPU, sptes and counters as text.

A slot deleted or moved while a vCPU loops over it must never be reached
through the old mapping: once KVM_SET_USER_MEMORY_REGION returns, the VMM's
memory behind the old slot stops changing, and the vCPU's next access to the
old gpa is an MMIO exit.
"""
import threading
import time

import pytest

from kvmfs import abi
from kvmfs.client import alloc_guest_memory

from tests.guests import assemble_text

CODE_GPA = 0x1000
DATA_GPA = 0x100000

# 32-bit flat: keep incrementing the dword at DATA_GPA, forever.
WRITER = f"""
    .code32
loop:
    incl {DATA_GPA:#x}
    jmp loop
"""


def flat32(vcpu, rip):
    s = vcpu.get_sregs()
    for name, sel, typ in (("cs", 8, 11), ("ds", 16, 3), ("es", 16, 3), ("ss", 16, 3)):
        seg = getattr(s, name)
        seg.base, seg.limit, seg.selector, seg.type = 0, 0xFFFFFFFF, sel, typ
        seg.present, seg.db, seg.s, seg.g = 1, 1, 1, 1
    s.cr0 |= 1
    vcpu.set_sregs(s)
    r = vcpu.get_regs()
    r.rip, r.rflags = rip, 2
    vcpu.set_regs(r)


@pytest.mark.parametrize("change", ["delete", "move"])
def test_slot_change_under_a_running_vcpu_drops_the_old_mapping(kvm, change):
    vm = kvm.create_vm()
    low = alloc_guest_memory(0x10000)
    data = alloc_guest_memory(0x10000)
    image = assemble_text(WRITER, CODE_GPA)
    low.map[CODE_GPA:CODE_GPA + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 0x10000, low.address)
    vm.set_user_memory_region(1, 0, DATA_GPA, 0x10000, data.address)
    vcpu = vm.create_vcpu(0)
    flat32(vcpu, CODE_GPA)
    counter = memoryview(data.map).cast("I")
    result = {}

    def run():
        try:
            vcpu.run()
            result["exit"] = vcpu.kvm_run.exit_reason
        except OSError as e:
            result["errno"] = e.errno

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while counter[0] < 1000 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert counter[0] >= 1000                          # the guest is writing through the slot
    if change == "delete":
        vm.set_user_memory_region(1, 0, DATA_GPA, 0, 0)
    else:
        vm.set_user_memory_region(1, 0, DATA_GPA + 0x100000, 0x10000, data.address)
    after = counter[0]
    t.join(5)
    time.sleep(0.05)
    assert counter[0] == after                          # nothing reached the old mapping
    assert not t.is_alive() and result.get("exit") == abi.KVM_EXIT_MMIO, result
    mmio = vcpu.kvm_run.exit.mmio
    assert (mmio.phys_addr, mmio.len, mmio.is_write) == (DATA_GPA, 4, 0)   # incl reads first
    del mmio
    if change == "move":                                # the moved slot serves its new gpa
        assert vm.read_gpa(DATA_GPA + 0x100000, 4) == bytes(data.map[0:4])
    stats = vm.info("stats")
    assert "mmu_flushes: 0" not in stats
    vcpu.close()
    vm.close()


def test_mmu_view_lists_sptes_with_dirty_and_write_state(kvm):
    vm = kvm.create_vm()
    low = alloc_guest_memory(0x10000)
    data = alloc_guest_memory(0x10000)
    image = assemble_text(f"""
        .code32
        movl $1, {DATA_GPA:#x}
        movl {DATA_GPA + 0x1000:#x}, %eax
        hlt
    """, CODE_GPA)
    low.map[CODE_GPA:CODE_GPA + len(image)] = image
    vm.set_user_memory_region(0, 0, 0, 0x10000, low.address)
    vm.set_user_memory_region(1, abi.KVM_MEM_LOG_DIRTY_PAGES, DATA_GPA, 0x10000, data.address)
    vcpu = vm.create_vcpu(0)
    flat32(vcpu, CODE_GPA)
    vcpu.run()
    assert vcpu.kvm_run.exit_reason == abi.KVM_EXIT_HLT
    rows = {line.split()[1]: line.split()[4] for line in vm.info("mmu").splitlines()[1:]}
    assert rows[hex(DATA_GPA >> 12)] == "RWXAD"         # written: writable, accessed, dirty
    assert rows[hex((DATA_GPA >> 12) + 1)] == "R-XA-"   # read only: still write-protected
    assert "mmu_wp_faults: 1" in vm.info("stats")
    assert vm.get_dirty_log(1, 16) == [1]
    rows = {line.split()[1]: line.split()[4] for line in vm.info("mmu").splitlines()[1:]}
    assert rows[hex(DATA_GPA >> 12)][1] == "-"          # GET re-protected the page
    vcpu.close()
    vm.close()
