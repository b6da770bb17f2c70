"""System-management mode on the mount: KVM_SMI, the SMRAM state-save map, RSM.

The host's /dev/kvm has no SMM (PVM: KVM_SMI answers ENOTTY and address space 1
is refused, spec section 1), so these guests run on kvmfs only and the expected
values are those of VMX/SVM KVM's arch/x86/kvm/smm.c: the map at SMBASE + 0xFE00
in address space 1 (64-bit layout for guests whose CPUID has long mode, 32-bit
otherwise), the handler at SMBASE:0x8000 in big real mode, RSM restoring the
map (including a relocated SMBASE).  Every guest has RAM in address space 0 and
a different memory, SMRAM, in address space 1, so a test can tell which one an
access reached.  The vCPU-events and #UD-for-RSM cases that real KVM here can
answer are in tests/guestcases.py.
"""
import errno
import os
import struct

import pytest

import guestcases
from kvmfs import abi
from kvmfs.client import Kvm, alloc_guest_memory
from kvmfs.guests import assemble_text

MEM = 0x80000
SMBASE = 0x30000
MAP = SMBASE + 0xFE00


class SmmVm:
    """A VM with RAM (address space 0) and SMRAM (address space 1), both at gpa 0."""

    def __init__(self, mnt, smram_flags=0, smram=True):
        self.kvm = Kvm(mnt)
        self.vm = self.kvm.create_vm()
        self.ram = alloc_guest_memory(MEM)
        self.smram = alloc_guest_memory(MEM)
        self.vm.set_user_memory_region(0, 0, 0, MEM, self.ram.address)
        if smram:
            self.vm.set_user_memory_region(1 << 16, smram_flags, 0, MEM, self.smram.address)
        self.vcpu = self.vm.create_vcpu(0)

    def put(self, mem, gpa, text, base=None):
        code = assemble_text(text, gpa if base is None else base)
        mem.map[gpa:gpa + len(code)] = code

    def real_mode(self, rip=0x1000):
        guestcases.setup(self.vcpu, self.ram, "real", rip)

    def run(self):
        """KVM_RUN once: (exit name, OUT port or None, OUT data as int or None)."""
        self.vcpu.run()
        run = self.vcpu.kvm_run
        name = abi.EXIT_REASONS.get(run.exit_reason, str(run.exit_reason))
        if run.exit_reason == abi.KVM_EXIT_IO:
            return name, run.exit.io.port, int.from_bytes(self.vcpu.io_data(), "little")
        return name, None, None

    def in_smm(self):
        """kvm_run.flags' SMM bit, and what KVM_GET_VCPU_EVENTS says."""
        ev = self.vcpu.get_vcpu_events()
        return bool(self.vcpu.kvm_run.flags & abi.KVM_RUN_X86_SMM), ev.smi.smm, ev.smi.pending

    def map(self, base=MAP):
        return bytes(self.smram.map[base:base + 512])

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()


def u32(m, off):
    return struct.unpack_from("<I", m, off)[0]


def u64(m, off):
    return struct.unpack_from("<Q", m, off)[0]


@pytest.fixture
def smm(mounted):
    vms = []

    def make(**kw):
        vms.append(SmmVm(mounted, **kw))
        return vms[-1]
    yield make
    for v in vms:
        v.close()


REAL_GUEST = """
    .code16
    mov $0x1234, %ax
    mov $0x5678, %bx
    out %al, $0x10
    out %al, $0x11
    hlt
"""


def test_smi_from_real_mode_saves_the_32bit_map_and_rsm_restores_it(smm):
    g = smm(smram_flags=abi.KVM_MEM_LOG_DIRTY_PAGES)
    g.put(g.ram, 0x1000, REAL_GUEST)
    g.put(g.smram, SMBASE + 0x8000, f"""
        .code16
        mov $0x99, %al
        out %al, $0x20
        addr32 movl {MAP + 0x1F0:#x}, %eax       # saved EIP
        out %eax, $0x21
        addr32 movl $0xBEEF, {MAP + 0x1D0:#x}    # saved EAX: RSM must load it
        rsm
    """, base=0x8000)
    g.real_mode()
    v = g.vcpu

    assert g.run() == ("IO", 0x10, 0x34)
    assert g.in_smm() == (False, 0, 0)
    v.smi()
    assert g.in_smm()[1:] == (0, 1)                     # pending until the next KVM_RUN

    assert g.run() == ("IO", 0x20, 0x99)
    assert g.in_smm() == (True, 1, 0)
    s, r = v.get_sregs(), v.get_regs()
    assert (s.cs.selector, s.cs.base, s.cs.limit, r.rip) == (0x3000, SMBASE, 0xFFFFFFFF, 0x8002)
    assert (s.ds.base, s.ds.limit, s.ds.g, s.ss.base) == (0, 0xFFFFFFFF, 1, 0)
    assert (s.cr0, s.cr4, s.idt.limit, r.rflags) == (0x60000010, 0, 0, 2)
    m = g.map()
    assert u32(m, 0x1F0) == 0x1008                      # EIP after the completed OUT
    assert (u32(m, 0x1F4), u32(m, 0x1FC)) == (2, 0x60000010)          # EFLAGS, CR0
    assert (u32(m, 0x1D0), u32(m, 0x1DC)) == (0x1234, 0x5678)          # EAX, EBX
    assert (u32(m, 0xF8), u32(m, 0xFC)) == (SMBASE, 0x20000)           # SMBASE, revision
    assert bytes(g.ram.map[MAP:MAP + 512]) == bytes(512)               # address space 0 untouched
    dirty = g.vm.get_dirty_log(1 << 16, MEM >> 12)
    assert dirty[MAP >> 18] >> ((MAP >> 12) % 64) & 1                  # the save is dirty-logged
    assert "smm: yes" in g.vm.info("vcpu0")

    assert g.run() == ("IO", 0x21, 0x1008)
    assert g.run() == ("IO", 0x11, 0xEF)                # back, with the EAX the handler wrote
    assert g.in_smm() == (False, 0, 0)
    r, s = v.get_regs(), v.get_sregs()
    assert (r.rax, r.rbx, r.rip, s.cs.base, s.cr0) == (0xBEEF, 0x5678, 0x1008, 0, 0x60000010)
    assert g.run()[0] == "HLT"
    assert v.get_msrs([abi.MSR_IA32_SMBASE]) == {abi.MSR_IA32_SMBASE: SMBASE}


def test_smi_from_long_mode_saves_the_64bit_map_and_rsm_returns_to_long_mode(smm):
    g = smm()
    v = g.vcpu
    v.set_cpuid2(g.kvm.get_supported_cpuid())            # long mode in CPUID: the 64-bit map
    g.put(g.ram, 0x1000, """
        .code64
        mov $0x1122334455667788, %rax
        mov $0x0F0E0D0C0B0A0908, %r15
        out %al, $0x10
        out %al, $0x11
        hlt
    """)
    g.put(g.smram, SMBASE + 0x8000, f"""
        .code16
        addr32 movl {MAP + 0x178:#x}, %eax       # RIP
        out %eax, $0x20
        addr32 movl {MAP + 0x158:#x}, %eax       # CR0
        out %eax, $0x21
        addr32 movl {MAP + 0x0D0:#x}, %eax       # EFER
        out %eax, $0x22
        addr32 movl {MAP + 0x010:#x}, %eax       # CS selector | attributes << 16
        out %eax, $0x23
        addr32 movl $0xCAFE, {MAP + 0x1F8:#x}    # RAX's low half
        rsm
    """, base=0x8000)
    guestcases.setup(v, g.ram, "long64", 0x1000)
    before = v.get_sregs()

    assert g.run() == ("IO", 0x10, 0x88)
    v.smi()
    assert g.run() == ("IO", 0x20, 0x1016)               # after the two 10-byte movs and the OUT
    s = v.get_sregs()
    assert (s.cr0, s.cr4, s.efer, s.cs.l, s.cs.base) == (0x10, 0, 0, 0, SMBASE)
    assert g.in_smm() == (True, 1, 0)
    assert g.run() == ("IO", 0x21, 0x80000011)
    assert g.run() == ("IO", 0x22, 0x500)                # LME | LMA as saved
    # CS 0x18: G L P S type 11 -> attributes 0xa09b (KVM's flags >> 8)
    assert g.run() == ("IO", 0x23, 0xA09B0018)
    m = g.map()
    assert (u64(m, 0x150), u64(m, 0x148), u32(m, 0xFC)) == (before.cr3, 0x20, 0x00020064)
    assert (u64(m, 0x1F8), u64(m, 0x180)) == (0x1122334455667788, 0x0F0E0D0C0B0A0908)  # RAX, R15
    assert (u32(m, 0x064), u64(m, 0x068)) == (before.gdt.limit, before.gdt.base)
    assert u32(m, 0x100) == SMBASE

    assert g.run() == ("IO", 0x11, 0xFE)
    s, r = v.get_sregs(), v.get_regs()
    assert g.in_smm() == (False, 0, 0)
    assert (s.cr0, s.cr3, s.cr4, s.efer) == (0x80000011, before.cr3, 0x20, 0x500)
    assert (s.cs.selector, s.cs.l, s.cs.db, s.ss.selector) == (0x18, 1, 0, 0x10)
    assert (r.rax, r.r15) == (0x112233440000CAFE, 0x0F0E0D0C0B0A0908)
    assert g.run()[0] == "HLT"


def test_rsm_takes_a_relocated_smbase_from_the_map(smm):
    new = 0x50000
    g = smm()
    g.put(g.ram, 0x1000, REAL_GUEST)
    g.put(g.smram, SMBASE + 0x8000, f"""
        .code16
        addr32 movl ${new:#x}, {MAP + 0xF8:#x}   # the map's SMBASE field
        out %al, $0x20
        rsm
    """, base=0x8000)
    g.put(g.smram, new + 0x8000, """
        .code16
        out %al, $0x30
        rsm
    """, base=0x8000)
    g.real_mode()
    v = g.vcpu
    assert g.run() == ("IO", 0x10, 0x34)
    v.smi()
    assert g.run()[:2] == ("IO", 0x20)
    assert v.get_msrs([abi.MSR_IA32_SMBASE]) == {abi.MSR_IA32_SMBASE: SMBASE}
    assert g.run()[:2] == ("IO", 0x11)
    assert v.get_msrs([abi.MSR_IA32_SMBASE]) == {abi.MSR_IA32_SMBASE: new}
    v.smi()
    assert g.run()[:2] == ("IO", 0x30)
    s = v.get_sregs()
    assert (s.cs.selector, s.cs.base, v.get_regs().rip) == (new >> 4, new, 0x8000)
    assert u32(g.map(new + 0xFE00), 0x1F0) == 0x100A      # saved where the new base says
    assert g.run()[0] == "HLT"


def test_smi_while_in_smm_waits_for_rsm_then_enters_at_once(smm):
    g = smm()
    g.put(g.ram, 0x1000, """
        .code16
        out %al, $0x10
        hlt
    """)
    g.put(g.smram, SMBASE + 0x8000, """
        .code16
        out %al, $0x20
        rsm
    """, base=0x8000)
    g.real_mode()
    v = g.vcpu
    assert g.run()[:2] == ("IO", 0x10)
    v.smi()
    assert g.run()[:2] == ("IO", 0x20)
    v.smi()
    assert g.in_smm() == (True, 1, 1)                    # blocked while in SMM
    assert g.run()[:2] == ("IO", 0x20)                   # RSM, then the pending SMI right away
    assert g.in_smm() == (True, 1, 0)
    assert u32(g.map(), 0x1F0) == 0x1002
    assert g.run()[0] == "HLT"
    assert v.get_regs().rip == 0x1003


def test_vcpu_events_move_the_vcpu_between_address_spaces(smm):
    g = smm()
    g.put(g.ram, 0x1000, ".code16\n mov $1, %al\n out %al, $0x10\n hlt\n")
    g.put(g.smram, 0x1000, ".code16\n mov $2, %al\n out %al, $0x10\n hlt\n")
    g.real_mode()
    v = g.vcpu
    ev = abi.kvm_vcpu_events()
    ev.flags, ev.smi.smm = abi.KVM_VCPUEVENT_VALID_SMM, 1
    v.set_vcpu_events(ev)
    assert g.run() == ("IO", 0x10, 2)                    # fetched from SMRAM
    assert g.in_smm() == (True, 1, 0)
    ev.smi.smm = 0
    v.set_vcpu_events(ev)
    g.real_mode()
    assert g.run() == ("IO", 0x10, 1)
    assert g.in_smm() == (False, 0, 0)


@pytest.mark.parametrize("smram", ["none", "readonly"])
@pytest.mark.expect_log(r"WARNING kvmfs\.vm: vm\d+ killed: vcpu0: SMI state save")
def test_a_state_save_with_nowhere_to_go_kills_only_that_vm(smm, mounted, smram):
    g = smm(smram=smram != "none", smram_flags=abi.KVM_MEM_READONLY)
    g.put(g.ram, 0x1000, REAL_GUEST)
    g.real_mode()
    assert g.run()[:2] == ("IO", 0x10)
    g.vcpu.smi()
    with pytest.raises(OSError) as e:
        g.vcpu.run()
    assert e.value.errno == errno.EIO
    for call in (g.vcpu.get_regs, lambda: g.vm.check_extension(abi.KVM_CAP_X86_SMM)):
        with pytest.raises(OSError) as e:
            call()
        assert e.value.errno == errno.EIO
    assert "killed" in mounted.test_log()
    other = smm()                                        # the daemon and other VMs go on
    other.put(other.ram, 0x1000, REAL_GUEST)
    other.real_mode()
    assert other.run() == ("IO", 0x10, 0x34)


def test_smi_and_vcpu_events_as_text_commands(smm):
    g = smm()
    g.put(g.ram, 0x1000, REAL_GUEST)
    g.put(g.smram, SMBASE + 0x8000, ".code16\n out %al, $0x20\n rsm\n", base=0x8000)
    g.real_mode()
    fd = os.open(os.path.join(g.vm.dir, "vcpu0.cmd"), os.O_RDWR)
    try:
        def cmd(line):
            os.write(fd, line.encode() + b"\n")
            return os.pread(fd, 4096, 0).decode()
        assert "port: 0x10" in cmd("run")
        assert cmd("smi") == "ok\n"
        assert "smi.pending: 1" in cmd("get_vcpu_events")
        out = cmd("run")
        assert "smm: 1" in out and "port: 0x20" in out
        assert "smi.smm: 1" in cmd("get_vcpu_events")
    finally:
        os.close(fd)
