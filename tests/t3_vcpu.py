"""t3: the native vCPU (native/vcpu.c) through cffi, without FUSE.

Each test builds an mmu, one memslot over memfd memory registered as host
memory, a VCPU_MMAP_SIZE kvm_run area, loads a guest assembled from GNU as
source (tests/guests.py) and runs it to its exits.
"""
import mmap
import os
import struct
import threading
import time

import pytest

from kvmfs._kvmfs_native import ffi, lib
from kvmfs.abi import (KVM_EXIT_DEBUG, KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR,
                       KVM_EXIT_IO, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, KVM_EXIT_IRQ_WINDOW_OPEN,
                       KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_GUESTDBG_ENABLE,
                       KVM_GUESTDBG_SINGLESTEP, KVM_INTERNAL_ERROR_EMULATION, KVM_MEM_READONLY,
                       KVM_PIO_PAGE_OFFSET, PAGE_SIZE, VCPU_MMAP_SIZE)

from guests import assemble, assemble_text

PIO = KVM_PIO_PAGE_OFFSET * PAGE_SIZE      # io.data_offset: the port-I/O page of kvm_run
MEM = 4 << 20


class Vm:
    """One mmu with a RAM slot at gpa 0 (MEM bytes) and vCPUs."""

    def __init__(self, mem=MEM, slot_flags=0):
        self.mmu = lib.kvmfs_mmu_new()
        self.fd = os.memfd_create("guest")
        os.ftruncate(self.fd, mem)
        self.mem = mmap.mmap(self.fd, mem)
        self.ptr = ffi.from_buffer(self.mem)
        self.hva = int(ffi.cast("uintptr_t", self.ptr))
        assert lib.kvmfs_hostmem_add(self.mmu, self.hva, mem, self.ptr, 0, lib.kvmfs_mmu_invalidate_seq(self.mmu)) == 0
        assert lib.kvmfs_memslot_set(self.mmu, 0, 0, slot_flags, 0, mem, self.hva, ffi.NULL) >= 0
        self.vcpus = []

    def add_slot(self, slot, gpa, size, flags=0, offset=0):
        assert lib.kvmfs_memslot_set(self.mmu, 0, slot, flags, gpa, size, self.hva + offset, ffi.NULL) >= 0

    def load(self, gpa, data):
        self.mem[gpa:gpa + len(data)] = data

    def vcpu(self, id=0):
        c = Vcpu(self, id)
        self.vcpus.append(c)
        return c


class Vcpu:
    def __init__(self, vm, id):
        self.vm = vm
        self.runbuf = mmap.mmap(-1, VCPU_MMAP_SIZE)
        self.run_p = ffi.cast("struct kvm_run *", ffi.from_buffer(self.runbuf))
        self.v = lib.kvmfs_vcpu_new(vm.mmu, id, self.run_p)
        assert self.v != ffi.NULL

    @property
    def run(self):
        return self.run_p

    def go(self):
        rc = lib.kvmfs_vcpu_run(self.v)
        while rc == lib.KVMFS_RUN_NEED_HVA:
            rc = lib.kvmfs_vcpu_run(self.v)
        return rc

    def regs(self):
        r = ffi.new("struct kvm_regs *")
        assert lib.kvmfs_vcpu_get_regs(self.v, r) == 0
        return r

    def set_regs(self, **kw):
        r = self.regs()
        for k, val in kw.items():
            setattr(r, k, val)
        assert lib.kvmfs_vcpu_set_regs(self.v, r) == 0

    def sregs(self):
        s = ffi.new("struct kvm_sregs *")
        assert lib.kvmfs_vcpu_get_sregs(self.v, s) == 0
        return s

    def set_sregs(self, s):
        return lib.kvmfs_vcpu_set_sregs(self.v, s)

    def real_mode_at(self, ip, cs=0):
        s = self.sregs()
        s.cs.selector = cs
        s.cs.base = cs << 4
        assert self.set_sregs(s) == 0
        self.set_regs(rip=ip, rflags=2, rsp=0x8000)

    def io_data(self, n):
        return bytes(self.runbuf[PIO:PIO + n])

    def set_io_data(self, data):
        self.runbuf[PIO:PIO + len(data)] = data


def real(src, base=0x1000):
    return assemble_text(".code16\n" + src, base)


@pytest.fixture
def vm():
    return Vm()


def start_real(vm, src, base=0x1000):
    vm.load(base, real(src, base))
    c = vm.vcpu()
    c.real_mode_at(base)
    return c


# ------------------------------------------------------------------ IO ----

@pytest.mark.parametrize("insn,size,data", [
    ("mov $0x42,%al\nmov $0x10,%dx\nout %al,%dx", 1, b"\x42"),
    ("mov $0x3412,%ax\nmov $0x10,%dx\nout %ax,%dx", 2, b"\x12\x34"),
    ("mov $0x78563412,%eax\nmov $0x10,%dx\nout %eax,%dx", 4, b"\x12\x34\x56\x78"),
])
def test_out(vm, insn, size, data):
    c = start_real(vm, insn + "\nhlt\n")
    assert c.go() == 0
    r = c.run
    assert r.exit_reason == KVM_EXIT_IO
    assert (r.io.direction, r.io.size, r.io.port, r.io.count, r.io.data_offset) == (
        KVM_EXIT_IO_OUT, size, 0x10, 1, PIO)
    assert c.io_data(size) == data
    assert c.go() == 0 and r.exit_reason == KVM_EXIT_HLT


def test_out_is_precise_inside_a_block(vm):
    c = start_real(vm, "xor %ax,%ax\nout %al,%dx\ninc %ax\nout %al,%dx\ninc %ax\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    assert c.regs().rax & 0xffff == 0
    assert c.io_data(1) == b"\x00"
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    assert c.regs().rax & 0xffff == 1 and c.io_data(1) == b"\x01"
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rax & 0xffff == 2


@pytest.mark.parametrize("insn,ilen", [
    ("out %al,%dx", 1), ("out %ax,%dx", 1), ("out %eax,%dx", 2),
    ("out %al,$0x10", 2), ("out %eax,$0x10", 3)])
def test_out_exit_rip_on_the_instruction(vm, insn, ilen):
    # VMX/SVM fast PIO: RIP stays on the OUT until the next KVM_RUN skips it
    c = start_real(vm, "mov $0x10,%dx\n" + insn + "\nhlt\n")     # mov: 3 bytes
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.direction == KVM_EXIT_IO_OUT
    assert c.regs().rip == 0x1003
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rip == 0x1003 + ilen + 1


def test_out_exit_rip_long_mode(vm):
    code = assemble_text(".code64\nmov $0x10,%dx\nout %eax,%dx\nout %al,$0x11\nhlt\n", 0x100000)
    vm.load(0x100000, code)
    c = vm.vcpu()
    long_mode(vm, c, 0x100000)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 0x10
    assert c.regs().rip == 0x100004
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 0x11
    assert c.regs().rip == 0x100005
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT and c.regs().rip == 0x100008


def test_immediate_exit_completes_out(vm):
    c = start_real(vm, "mov $0x10,%dx\nout %al,%dx\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.regs().rip == 0x1003
    c.run.immediate_exit = 1
    assert c.go() == -4 and c.run.exit_reason == KVM_EXIT_IO
    assert c.regs().rip == 0x1004
    c.run.immediate_exit = 0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT and c.regs().rip == 0x1005


def test_out_skip_follows_userspace_rip(vm):
    # KVM skips the OUT only if RIP is still on it (complete_fast_pio_out)
    c = start_real(vm, "mov $0x10,%dx\nout %al,%dx\nhlt\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    c.set_regs(rip=0x1003)                         # same RIP: still skipped
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT and c.regs().rip == 0x1005
    c.set_regs(rip=0x1003)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.regs().rip == 0x1003
    c.set_regs(rip=0x1005)                         # moved: no skip
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT and c.regs().rip == 0x1006


@pytest.mark.parametrize("insn,size,mask", [
    ("in %dx,%al", 1, 0xff), ("in %dx,%ax", 2, 0xffff), ("in %dx,%eax", 4, 0xffffffff)])
def test_in(vm, insn, size, mask):
    c = start_real(vm, "mov $0x11223344,%eax\nmov $0x20,%dx\n" + insn + "\nmov %eax,%ebx\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    r = c.run
    assert (r.io.direction, r.io.size, r.io.port, r.io.count) == (KVM_EXIT_IO_IN, size, 0x20, 1)
    rip = c.regs().rip
    assert vm.mem[rip] in (0xec, 0xed, 0x66)     # RIP on the IN
    c.set_io_data(bytes([0xa1, 0xb2, 0xc3, 0xd4])[:size])
    assert c.go() == 0 and r.exit_reason == KVM_EXIT_HLT
    want = (0x11223344 & ~mask) | (0xd4c3b2a1 & mask)
    assert c.regs().rbx & 0xffffffff == want


def test_rep_outsb(vm):
    vm.load(0x3000, b"abc")
    c = start_real(vm, "mov $0x3000,%si\nmov $3,%cx\nmov $0x30,%dx\ncld\nrep outsb\nhlt\n")
    got = []
    for i in range(3):
        assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
        assert c.run.io.count == 1 and c.run.io.direction == KVM_EXIT_IO_OUT
        got.append(c.io_data(1))
        r = c.regs()
        assert r.rcx & 0xffff == 2 - i and r.rsi & 0xffff == 0x3001 + i
        # emulated string I/O: RIP on the instruction at every element (the
        # last one too, measured); the next run retires it
        assert r.rip == 0x100a
    assert b"".join(got) == b"abc"
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT and c.regs().rip == 0x100d


def test_rep_insb(vm):
    c = start_real(vm, "mov $0x3000,%di\nmov $4,%cx\nmov $0x30,%dx\ncld\nrep insb\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    assert c.run.io.direction == KVM_EXIT_IO_IN and c.run.io.count == 4
    c.set_io_data(b"wxyz")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert vm.mem[0x3000:0x3004] == b"wxyz"
    assert c.regs().rcx & 0xffff == 0


def test_hlt_rip_after(vm):
    c = start_real(vm, "nop\nhlt\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rip == 0x1002
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rip == 0x1003


def test_reset_state_first_fetch(vm):
    vm.add_slot(1, 0xFFFF0000, 0x10000, offset=0x100000)
    vm.mem[0x100000 + 0xFFF0] = 0xF4
    c = vm.vcpu()
    r = c.regs()
    assert (r.rip, r.rflags, r.rdx) == (0xFFF0, 2, 0x600)
    s = c.sregs()
    assert (s.cs.selector, s.cs.base, s.cs.limit, s.cs.type) == (0xF000, 0xFFFF0000, 0xFFFF, 11)
    assert s.cr0 == 0x60000010 and s.apic_base == 0xFEE00900
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rip == 0xFFF1


# ---------------------------------------------------------------- MMIO ----

MMIO = 0x200000 + 0x100000   # inside the 4 MiB? no: slot covers [0, 4M); use a hole above
HOLE = 0x800000


@pytest.mark.parametrize("size,insn,reg", [
    (1, "movb (%esi),%bl", "rbx"), (2, "movw (%esi),%bx", "rbx"),
    (4, "movl (%esi),%ebx", "rbx")])
def test_mmio_read(vm, size, insn, reg):
    c = start_real(vm, "mov $%#x,%%esi\naddr32 %s\nhlt\n" % (HOLE, insn))
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO
    r = c.run
    assert (r.mmio.phys_addr, r.mmio.len, r.mmio.is_write) == (HOLE, size, 0)
    rip = c.regs().rip
    ffi.memmove(r.mmio.data, bytes([1, 2, 3, 4, 5, 6, 7, 8]), 8)
    assert c.go() == 0 and r.exit_reason == KVM_EXIT_HLT
    assert c.regs().rbx & ((1 << (8 * size)) - 1) == int.from_bytes(bytes([1, 2, 3, 4])[:size], "little")
    assert c.regs().rip > rip


@pytest.mark.parametrize("size,insn", [
    (1, "movb %al,(%esi)"), (2, "movw %ax,(%esi)"), (4, "movl %eax,(%esi)")])
def test_mmio_write(vm, size, insn):
    c = start_real(vm, "mov $%#x,%%esi\nmov $0x44332211,%%eax\naddr32 %s\nhlt\n" % (HOLE + 8, insn))
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO
    r = c.run
    assert (r.mmio.phys_addr, r.mmio.len, r.mmio.is_write) == (HOLE + 8, size, 1)
    assert bytes(r.mmio.data)[:size] == bytes([0x11, 0x22, 0x33, 0x44])[:size]
    assert c.go() == 0 and r.exit_reason == KVM_EXIT_HLT


def test_mmio_rmw_add(vm):
    c = start_real(vm, "mov $%#x,%%esi\nmov $5,%%eax\naddr32 add %%eax,(%%esi)\nhlt\n" % HOLE)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO and c.run.mmio.is_write == 0
    ffi.memmove(c.run.mmio.data, struct.pack("<Q", 100), 8)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO and c.run.mmio.is_write == 1
    assert struct.unpack("<I", bytes(c.run.mmio.data)[:4])[0] == 105
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_mmio_push(vm):
    c = start_real(vm, "mov $%#x,%%esi\naddr32 pushw (%%esi)\npop %%bx\nhlt\n" % HOLE)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO and c.run.mmio.len == 2
    ffi.memmove(c.run.mmio.data, b"\xcd\xab", 2)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().rbx & 0xffff == 0xabcd


def test_readonly_slot_write_is_mmio():
    vm = Vm()
    vm.add_slot(1, 0x900000, 0x1000, flags=KVM_MEM_READONLY, offset=0x200000)
    vm.mem[0x200000] = 0x77
    c = start_real(vm, "mov $0x900000,%esi\naddr32 movb (%esi),%bl\naddr32 movb $9,(%esi)\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO
    assert c.run.mmio.is_write == 1 and c.run.mmio.phys_addr == 0x900000
    assert c.regs().rbx & 0xff == 0x77
    assert vm.mem[0x200000] == 0x77
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_code_fetch_from_hole(vm):
    c = vm.vcpu()
    s = c.sregs()
    s.cs.base = HOLE          # a hidden base no real-mode selector gives
    s.cs.selector = 0
    c.set_sregs(s)
    c.set_regs(rip=0)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_INTERNAL_ERROR
    assert c.run.internal.suberror == KVM_INTERNAL_ERROR_EMULATION


# -------------------------------------------------------- run semantics ----

def test_immediate_exit_completes_in(vm):
    c = start_real(vm, "mov $0x20,%dx\nin %dx,%al\nhlt\n")
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    rip = c.regs().rip
    c.set_io_data(b"\x5a")
    c.run.immediate_exit = 1
    assert c.go() == -4           # -EINTR
    assert c.run.exit_reason == KVM_EXIT_IO
    assert c.regs().rax & 0xff == 0x5a and c.regs().rip == rip + 1
    c.run.immediate_exit = 0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_cr8_check(vm):
    c = start_real(vm, "hlt\n")
    c.run.cr8 = 16
    assert c.go() == -22


def test_kick_from_other_thread(vm):
    c = start_real(vm, "1: jmp 1b\n")
    t = threading.Timer(0.2, lambda: lib.kvmfs_vcpu_kick(c.v))
    t.start()
    t0 = time.time()
    assert c.go() == -4
    assert c.run.exit_reason == KVM_EXIT_INTR
    assert time.time() - t0 < 5
    t.join()


def test_kick_before_run(vm):
    c = start_real(vm, "hlt\n")
    lib.kvmfs_vcpu_kick(c.v)
    assert c.go() == -4 and c.run.exit_reason == KVM_EXIT_INTR
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_signal_kicks(vm):
    import signal
    assert lib.kvmfs_vcpu_install_intr_signal(signal.SIGUSR1) == 0
    c = start_real(vm, "1: jmp 1b\n")
    tid = threading.get_native_id()
    res = []

    def runner():
        res.append(threading.get_native_id())
        res.append(c.go())
    th = threading.Thread(target=runner)
    th.start()
    time.sleep(0.2)
    signal.pthread_kill(th.ident, signal.SIGUSR1)
    th.join(5)
    assert not th.is_alive() and res[1] == -4 and c.run.exit_reason == KVM_EXIT_INTR
    del tid


# ------------------------------------------------------------- events ----

def test_triple_fault_shutdown(vm):
    # 64-bit-free variant: real mode with an IVT limit of 0 is not a fault on
    # KVM; use protected mode with an empty IDT instead.
    c = start_real(vm, "ud2\n")
    s = c.sregs()
    s.cr0 |= 1
    s.cs.selector = 8
    s.cs.db = 1
    s.cs.limit = 0xffffffff
    s.cs.g = 1
    s.idt.limit = 0
    assert c.set_sregs(s) == 0
    c.set_regs(rip=0x1000)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_SHUTDOWN
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_SHUTDOWN


def test_interrupt_injection_real_mode(vm):
    # IVT entry 0x20 -> 0000:0x2000, handler writes to port 0x99 and irets
    vm.load(0x20 * 4, struct.pack("<HH", 0x2000, 0))
    vm.load(0x2000, real("mov $0x99,%dx\nout %al,%dx\niret\n", 0x2000))
    c = start_real(vm, "mov $7,%al\nsti\nhlt\nmov $0x55,%dx\nout %al,%dx\nhlt\n")
    assert lib.kvmfs_vcpu_interrupt(c.v, 256) == -22
    assert lib.kvmfs_vcpu_interrupt(c.v, 0x21) == 0
    assert lib.kvmfs_vcpu_interrupt(c.v, 0x20) == 0    # replaces
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 0x99
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 0x55
    assert c.run.if_flag == 1 and c.run.ready_for_interrupt_injection == 1


def test_interrupt_window(vm):
    c = start_real(vm, "cli\nnop\nsti\nnop\nnop\nhlt\n")
    c.run.request_interrupt_window = 1
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IRQ_WINDOW_OPEN
    assert c.run.if_flag == 1 and c.run.ready_for_interrupt_injection == 1
    c.run.request_interrupt_window = 0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_single_step(vm):
    c = start_real(vm, "nop\nnop\nhlt\n")
    assert lib.kvmfs_vcpu_set_guest_debug(c.v, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP) == 0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_DEBUG and c.run.debug.pc == 0x1001
    assert c.run.debug.exception == 1
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_DEBUG and c.run.debug.pc == 0x1002
    lib.kvmfs_vcpu_set_guest_debug(c.v, 0)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


# ------------------------------------------------------- regs and modes ----

def test_regs_roundtrip(vm):
    c = vm.vcpu()
    r = c.regs()
    for i, name in enumerate(["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r15"]):
        setattr(r, name, 0x1111 * (i + 1))
    r.rflags = 0
    assert lib.kvmfs_vcpu_set_regs(c.v, r) == 0
    r2 = c.regs()
    assert r2.rflags == 2 and r2.r15 == r.r15 and r2.rax == r.rax


def test_sregs_checks(vm):
    c = vm.vcpu()
    s = c.sregs()
    s.cr0 |= 1 << 31
    assert c.set_sregs(s) == -22          # PG without PE
    s = c.sregs()
    s.cs.l = 1
    assert c.set_sregs(s) == -22          # CS.L outside long mode
    s = c.sregs()
    s.efer = 1 << 10
    assert c.set_sregs(s) == -22          # LMA without paging
    s = c.sregs()
    s.cr0 |= 0x80000001
    s.efer = 1 << 8
    assert c.set_sregs(s) == -22          # LME+PG without PAE


def long_mode(vm, c, entry):
    """Identity-map 1 GiB with 2 MiB pages at 0x10000, a GDT at 0x9000."""
    pml4, pdpt, pd = 0x10000, 0x11000, 0x12000
    vm.load(pml4, struct.pack("<Q", pdpt | 3))
    vm.load(pdpt, struct.pack("<Q", pd | 3))
    vm.load(pd, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    vm.load(0x9000, struct.pack("<QQQ", 0, 0x00af9b000000ffff, 0x00cf93000000ffff))
    s = c.sregs()
    s.cr3 = pml4
    s.cr4 = 1 << 5
    s.cr0 = 0x80000011
    s.efer = (1 << 8) | (1 << 10)
    s.gdt.base, s.gdt.limit = 0x9000, 23
    for name in ("ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        seg.selector, seg.base, seg.limit, seg.type, seg.s, seg.present, seg.db, seg.g = \
            16, 0, 0xffffffff, 3, 1, 1, 1, 1
    s.cs.selector, s.cs.base, s.cs.limit, s.cs.type = 8, 0, 0xffffffff, 11
    s.cs.l, s.cs.db, s.cs.g, s.cs.s, s.cs.present = 1, 0, 1, 1, 1
    assert c.set_sregs(s) == 0
    c.set_regs(rip=entry, rsp=0x80000, rflags=2)


def test_long_mode_guest(vm):
    code = assemble_text(""".code64
        mov $0x123456789abcdef0, %rax
        mov %rax, 0x300000
        mov $0x300000, %rbx
        mov (%rbx), %rcx
        mov $0x10, %dx
        out %eax, %dx
        movq $1, 0x1000000          # 16 MiB: a hole -> MMIO write of 8 bytes
        mov 0x1000000, %r9          # MMIO read of 8 bytes
        hlt
    """, 0x100000)
    vm.load(0x100000, code)
    c = vm.vcpu()
    long_mode(vm, c, 0x100000)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO
    assert c.io_data(4) == struct.pack("<I", 0x9abcdef0)
    assert c.regs().rcx == 0x123456789abcdef0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO
    assert c.run.mmio.len == 8 and c.run.mmio.is_write == 1 and c.run.mmio.phys_addr == 0x1000000
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_MMIO and c.run.mmio.len == 8
    ffi.memmove(c.run.mmio.data, struct.pack("<Q", 0x0102030405060708), 8)
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    assert c.regs().r9 == 0x0102030405060708
    s = c.sregs()
    assert s.cs.l == 1 and s.efer & (1 << 10)


def test_long_mode_page_fault_and_ud_delivery(vm):
    # IDT with #PF (14) and #UD (6) handlers that report the vector by OUT
    code = assemble_text(""".code64
        mov $0x40000000, %rax        # beyond the 1 GiB identity map: #PF
        mov (%rax), %rbx
        ud2
        hlt
    pf: pop %rbx                     # error code
        mov %cr2, %rax
        mov $14, %dx
        out %eax, %dx
        addq $3, (%rsp)              # skip the 3-byte load
        iretq
    ud: mov $6, %dx
        out %eax, %dx
        addq $2, (%rsp)
        iretq
    """, 0x100000)
    vm.load(0x100000, code)
    # find handler offsets by assembling the prefix
    pf_off = len(assemble_text(".code64\nmov $0x40000000,%rax\nmov (%rax),%rbx\nud2\nhlt\n", 0))
    ud_off = pf_off + len(assemble_text(".code64\npop %rbx\nmov %cr2,%rax\nmov $14,%dx\nout %eax,%dx\naddq $3,(%rsp)\niretq\n", 0))

    def gate(off):
        off += 0x100000
        return struct.pack("<HHBBHII", off & 0xffff, 8, 0, 0x8e, (off >> 16) & 0xffff, off >> 32, 0)
    idt = bytearray(256 * 16)
    idt[14 * 16:15 * 16] = gate(pf_off)
    idt[6 * 16:7 * 16] = gate(ud_off)
    vm.load(0xa000, bytes(idt))
    c = vm.vcpu()
    long_mode(vm, c, 0x100000)
    s = c.sregs()
    s.idt.base, s.idt.limit = 0xa000, 256 * 16 - 1
    assert c.set_sregs(s) == 0
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 14
    assert c.regs().rax == 0x40000000 and c.sregs().cr2 == 0x40000000
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO and c.run.io.port == 6
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT


def test_mode_switch_real_to_long(vm):
    vm.load(0x1000, assemble("modeswitch.S", 0x1000))
    c = vm.vcpu()
    c.real_mode_at(0x1000)
    ports = []
    for _ in range(3):
        assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_IO, c.run.exit_reason
        ports.append(c.run.io.port)
    assert ports == [0x16, 0x32, 0x64]
    assert c.go() == 0 and c.run.exit_reason == KVM_EXIT_HLT
    s = c.sregs()
    assert s.cs.l == 1 and s.efer & (1 << 10) and s.cr0 & (1 << 31)


def test_lock_xadd_smp():
    vm = Vm()
    n, iters = 3, 20000
    code = assemble_text(""".code64
        mov $%d, %%ecx
    1:  mov $1, %%eax
        lock xadd %%eax, 0x300000
        dec %%ecx
        jnz 1b
        hlt
    """ % iters, 0x100000)
    vm.load(0x100000, code)
    cs = [vm.vcpu(i) for i in range(n)]
    for c in cs:
        long_mode(vm, c, 0x100000)
    res = []
    ths = [threading.Thread(target=lambda c=c: res.append((c.go(), c.run.exit_reason))) for c in cs]
    for t in ths:
        t.start()
    for t in ths:
        t.join(60)
    assert res == [(0, KVM_EXIT_HLT)] * n
    assert struct.unpack("<I", vm.mem[0x300000:0x300004])[0] == n * iters


@pytest.mark.parametrize("lm", [1, 0], ids=["64-bit map", "32-bit map"])
def test_smram_map_round_trip(lm):
    """native/smm.c: what enter_smm saves is what RSM loads back, field by field (32-bit
    fields in the 32-bit map), at the offsets of KVM's arch/x86/kvm/smm.h."""
    st = ffi.new("struct kvmfs_smm_state *")
    mask = (1 << 64) - 1 if lm else (1 << 32) - 1
    regs = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"] + (
        [f"r{i}" for i in range(8, 16)] if lm else [])
    for i, name in enumerate(regs):
        setattr(st.regs, name, (0x0101010101010101 * (i + 1)) & mask)
    st.regs.rip, st.regs.rflags = 0x1234567890 & mask, 0x246
    s = st.sregs
    for i, name in enumerate(("es", "cs", "ss", "ds", "fs", "gs", "tr", "ldt")):
        seg = getattr(s, name)
        seg.selector, seg.base, seg.limit = 8 * (i + 1), (0x10000 * (i + 1)) & mask, 0xFFFFF
        seg.type, seg.present, seg.dpl, seg.db, seg.s, seg.g = 3 + (i % 9), 1, i % 4, 1, 1, 1
        seg.l = 1 if lm and name == "cs" else 0
        seg.db = 0 if seg.l else 1
    s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit = 0x500, 0x37, 0x600, 0xFFF
    s.cr0, s.cr3, s.cr4 = 0x80000011, 0x20000, 0x20
    s.efer = 0x500 if lm else 0
    st.dr6, st.dr7, st.smbase = 0xFFFF0FF0, 0x400, 0x30000
    buf = ffi.new("uint8_t[512]")
    lib.kvmfs_smram_save(buf, st, lm)
    m = bytes(buf)
    if lm:   # a few offsets straight from smm.h (map offset = offset - 0xFE00)
        assert struct.unpack_from("<QQ", m, 0x170) == (0x246, st.regs.rip)   # RFLAGS, RIP
        assert struct.unpack_from("<Q", m, 0x1F8)[0] == st.regs.rax            # gprs[15]
        # CS: selector, attributes (G L P DPL1 S type 4 -> 0xa0b4), limit, base
        assert struct.unpack_from("<HHIQ", m, 0x10) == (16, 0xA0B4, 0xFFFFF, 0x20000)
        assert struct.unpack_from("<IQ", m, 0x64) == (0x37, 0x500)
        assert struct.unpack_from("<I", m, 0xFC)[0] == 0x00020064
    else:
        assert struct.unpack_from("<IIII", m, 0x1F0) == (st.regs.rip, 0x246, 0x20000, 0x80000011)
        assert struct.unpack_from("<I", m, 0x1D0 + 4 * 3)[0] == st.regs.rbx  # EAX ECX EDX EBX
        assert struct.unpack_from("<I", m, 0xFC)[0] == 0x00020000
    back = ffi.new("struct kvmfs_smm_state *")
    lib.kvmfs_smram_load(buf, back, lm)
    assert bytes(ffi.buffer(ffi.addressof(back.regs))) == bytes(ffi.buffer(ffi.addressof(st.regs)))
    for name in ("es", "cs", "ss", "ds", "fs", "gs", "tr", "ldt"):
        a, b = getattr(back.sregs, name), getattr(s, name)
        assert [getattr(a, f) for f in ("selector", "base", "limit", "type", "present", "dpl",
                                        "db", "s", "l", "g")] == \
               [getattr(b, f) for f in ("selector", "base", "limit", "type", "present", "dpl",
                                        "db", "s", "l", "g")], name
    assert (back.sregs.cr0, back.sregs.cr3, back.sregs.cr4, back.sregs.efer) == \
           (s.cr0, s.cr3, s.cr4, s.efer)
    assert (back.sregs.gdt.base, back.sregs.gdt.limit, back.sregs.idt.base, back.sregs.idt.limit) == \
           (0x500, 0x37, 0x600, 0xFFF)
    assert (back.dr6, back.dr7, back.smbase) == (0xFFFF0FF0, 0x400, 0x30000)
