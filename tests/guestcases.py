"""Guest cases: one table of guests run on real /dev/kvm and on a kvmfs mount.

Owns: the guest case table (CASES), the vCPU set-ups (real mode, 32-bit protected
with PSE or PAE paging, 64-bit long mode at CPL 0 or CPL 3, built with
KVM_SET_SREGS over page tables written here), the VMM loop that runs a case and
turns what it sees into text lines, and the vCPU API cases (API_CASES) that need
no guest code.  tests/t6_guests.py runs both tables; `python tests/guestcases.py
[MNT]` prints every case's lines (on /dev/kvm without MNT).

A case names a guest (kvmfs/guests/NAME.S, built by kvmfs.guests), a set-up, a VMM
script and the result it expects.  The result is a list of lines, one per
KVM_RUN:

    IO out port=0x10 size=1 count=1 data=42 | rax=0x42
    IO in port=0x11 size=1 count=1 | rax=0x11223344
    MMIO write addr=0xd0000 len=4 data=44556677 | rip=0x1010
    MMIO read addr=0xd0010 len=1 | rax=0x0 rip=0x1025
    HLT | rip=0x1001                       (also SHUTDOWN, IRQ_WINDOW_OPEN, INTR, ...)
    INTERNAL_ERROR suberror=1
    EINTR exit_reason=IO | ...             (KVM_RUN failed: errno name, exit_reason left behind)

then `text "..."` lines (what went to port 0xE9, when the case collects it) and
`mem GPA: HEX` lines (guest memory after the last run).  The registers are the
case's `regs`, read with KVM_GET_REGS after each run; RIP is left out at OUT exits
(where it stands is host-specific, spec section 1) unless the case sets
rip_at_out (string I/O, emulated on every host).  `if=` and `ready=` (kvm_run's
if_flag and ready_for_interrupt_injection) are added when the case sets irqflags.

The VMM answers IN exits and MMIO reads with the case's `answers`, in order, and
then with the default patterns below (the same as tools/run_guest.c):
IN byte i = 0x41 + i, MMIO read byte i = 0x81 + i.

Memory (every case): slot 0 = 512 KiB at gpa 0 (memfd), guest image at its load
gpa, GDT at 0x500, page tables from 0x20000, stack below 0x8000, data at 0x3000;
gpa 0xD0000 is covered by no slot (MMIO); with `rom`, slot 1 = 64 KiB READONLY at
gpa 0x100000 filled with bytes 0xA0 + (i % 32).
"""
import ctypes
import errno
import os
import signal
import sys
from dataclasses import dataclass, field

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvmfs import abi, guests  # noqa: E402
from kvmfs.client import Kvm, alloc_guest_memory  # noqa: E402

RAM_SIZE = 0x80000
ROM_GPA, ROM_SIZE = 0x100000, 0x10000
MMIO_GPA = 0xD0000
GDT_GPA = 0x500
PT_GPA = 0x20000
ALIAS_VA, ALIAS_RAM, ALIAS_MMIO_VA = 0x800000, 0x5000, 0x801000
STACK_TOP = 0x8000
TERMINAL = {"HLT", "SHUTDOWN", "INTERNAL_ERROR", "FAIL_ENTRY", "UNKNOWN"}
END_PORT = 0xFF            # an OUT to this port ends a guest that cannot HLT (CPL 3)

GDT = [0,
       0x00CF9B000000FFFF,     # 0x08 code32
       0x00CF93000000FFFF,     # 0x10 data
       0x00AF9B000000FFFF,     # 0x18 code64
       0x00CF93000000FFFF,     # 0x20 data
       0x00AFFB000000FFFF,     # 0x28 (0x2b) code64 DPL 3
       0x00CFF3000000FFFF]     # 0x30 (0x33) data DPL 3


def in_pattern(n):
    return bytes((0x41 + i) & 0xFF for i in range(n))


def mmio_pattern(n):
    return bytes((0x81 + i) & 0xFF for i in range(n))


def rom_pattern(n):
    return bytes(0xA0 + (i % 32) for i in range(n))


# --- set-ups -------------------------------------------------------------------------
def _put(mem, gpa, data):
    mem.map[gpa:gpa + len(data)] = data


def _q(v):
    return v.to_bytes(8, "little")


def _seg(s, selector, code, dpl=0, db=1, l=0):
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 11 if code else 3
    s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable = 1, dpl, db, 1, l, 1, 0, 0


def _tables_long(mem, user):
    """4-level identity map of 1 GiB in 2 MiB pages, plus 4 KiB aliases; A/D preset."""
    u = 4 if user else 0
    pml4, pdpt, pd, pt = PT_GPA, PT_GPA + 0x1000, PT_GPA + 0x2000, PT_GPA + 0x3000
    _put(mem, pml4, _q(pdpt | 0x23 | u))
    _put(mem, pdpt, _q(pd | 0x23 | u))
    _put(mem, pd, b"".join(_q(i << 21 | 0xE3 | u) for i in range(512)))
    _put(mem, pd + 8 * (ALIAS_VA >> 21), _q(pt | 0x23 | u))
    _put(mem, pt, _q(ALIAS_RAM | 0x63 | u) + _q(MMIO_GPA | 0x63 | u))
    return pml4


def _tables_pse(mem):
    pd, pt = PT_GPA, PT_GPA + 0x1000
    _put(mem, pd, (0xE3).to_bytes(4, "little"))                  # 4 MiB page at 0
    _put(mem, pd + 4 * (ALIAS_VA >> 22), (pt | 0x23).to_bytes(4, "little"))
    _put(mem, pt + 4 * ((ALIAS_VA >> 12) & 0x3FF),
         (ALIAS_RAM | 0x63).to_bytes(4, "little") + (MMIO_GPA | 0x63).to_bytes(4, "little"))
    return pd


def _tables_pae(mem):
    pdpt, pd, pt = PT_GPA, PT_GPA + 0x1000, PT_GPA + 0x2000
    _put(mem, pdpt, _q(pd | 0x1))                                # PDPTEs: P only
    _put(mem, pd, _q(0xE3))                                      # 2 MiB page at 0
    _put(mem, pd + 8 * (ALIAS_VA >> 21), _q(pt | 0x23))
    _put(mem, pt + 8 * ((ALIAS_VA >> 12) & 0x1FF), _q(ALIAS_RAM | 0x63) + _q(MMIO_GPA | 0x63))
    return pdpt


def setup(vcpu, mem, mode, rip, rflags=None):
    """Put vCPU 0 into `mode` at `rip`; GPRs 0, RSP STACK_TOP."""
    s = vcpu.get_sregs()
    _put(mem, GDT_GPA, b"".join(_q(d) for d in GDT))
    if mode == "real":
        s.cs.selector, s.cs.base = 0, 0
        flags = 0x2
    else:
        s.gdt.base, s.gdt.limit = GDT_GPA, 8 * len(GDT) - 1
        s.idt.base, s.idt.limit = 0, 0
        user = mode == "user64"
        if mode in ("long64", "user64"):
            _seg(s.cs, 0x2B if user else 0x18, True, dpl=3 if user else 0, db=0, l=1)
            data = 0x33 if user else 0x10
            s.cr3 = _tables_long(mem, user)
            s.cr4, s.efer, s.cr0 = 0x20, 0x500, 0x80000011
        else:
            _seg(s.cs, 0x08, True)
            data = 0x10
            s.cr0, s.cr4, s.efer = 0x11, 0, 0
            if mode == "pse32":
                s.cr3, s.cr4, s.cr0 = _tables_pse(mem), 0x10, 0x80000011
            elif mode == "pae":
                s.cr3, s.cr4, s.cr0 = _tables_pae(mem), 0x20, 0x80000011
        for name in ("ds", "es", "fs", "gs", "ss"):
            _seg(getattr(s, name), data, False, dpl=3 if user else 0)
        flags = 0x3002 if user else 0x2
    vcpu.set_sregs(s)
    r = abi.kvm_regs()
    r.rip, r.rsp = rip, STACK_TOP
    r.rflags = flags if rflags is None else rflags
    vcpu.set_regs(r)


# --- the case table ------------------------------------------------------------------
@dataclass(frozen=True)
class GuestCase:
    name: str
    guest: str
    mode: str                      # real | pse32 | pae | long64 | user64
    expect: tuple                  # the ABI's lines (VMX/SVM KVM and kvmfs)
    regs: tuple = ("rip",)
    script: dict = field(default_factory=dict)   # run index -> actions before that KVM_RUN
    answers: tuple = ()            # IN / MMIO-read data, in order; then the default patterns
    mem: tuple = ()                # (gpa, size) to show after the last run
    stops: int = 1                 # how many terminal exits end the case
    rom: bool = False
    rflags: int = None
    rip_at_out: bool = False
    irqflags: bool = False
    text: bool = False             # collect OUT bytes to port 0xE9 into `text` lines
    max_runs: int = 64
    host: dict = field(default_factory=dict)     # host kind -> that host's lines, or HOST_QUIRK
    why: str = ""

    def expected_kvm(self, kind):
        """The lines real KVM on this kind of host gives (the first, if it has several)."""
        return self.kvm_answers(kind)[0]

    def kvm_answers(self, kind):
        """Every answer real KVM on this kind of host may give: a host entry that is a
        list of lists names alternatives (a host whose answer varies from run to run)."""
        want = self.host.get(kind, self.expect)
        if want == HOST_QUIRK:
            return None
        if want and isinstance(want[0], (list, tuple)):
            return [tuple(w) for w in want]
        return [tuple(want)]

    def expected_kvmfs(self):
        return tuple(self.expect)

    def comparable(self, kind):
        return self.kvm_answers(kind) == [self.expected_kvmfs()]


# A host entry saying this kind of host answers with its own machine's values (e.g. PVM's CPUID
# shows host feature bits): the case must run there, its lines are not compared.
HOST_QUIRK = "host quirk"


def _hex(data):
    return bytes(data).hex()


def describe(vcpu, err, case):
    """One line for the KVM_RUN that just returned (err: None or an errno)."""
    run = vcpu.kvm_run
    reason = abi.EXIT_REASONS.get(run.exit_reason, str(run.exit_reason))
    if err is not None:
        line = f"{errno.errorcode.get(err, err)} exit_reason={reason}"
        is_out = False
    else:
        line, is_out = reason, False
        if run.exit_reason == abi.KVM_EXIT_IO:
            io = run.exit.io
            is_out = io.direction == abi.KVM_EXIT_IO_OUT
            line = (f"IO {'out' if is_out else 'in'} port={io.port:#x} size={io.size} "
                    f"count={io.count}")
            if is_out:
                line += f" data={_hex(vcpu.io_data())}"
        elif run.exit_reason == abi.KVM_EXIT_MMIO:
            m = run.exit.mmio
            line = f"MMIO {'write' if m.is_write else 'read'} addr={m.phys_addr:#x} len={m.len}"
            if m.is_write:
                line += f" data={_hex(m.data[:m.len])}"
        elif run.exit_reason == abi.KVM_EXIT_INTERNAL_ERROR:
            line = f"INTERNAL_ERROR suberror={run.exit.internal.suberror}"
    regs = vcpu.get_regs()
    shown = [f"{n}={getattr(regs, n):#x}" for n in case.regs
             if not (n == "rip" and is_out and not case.rip_at_out)]
    if case.irqflags:
        shown += [f"if={run.if_flag}", f"ready={run.ready_for_interrupt_injection}"]
    return line + (" | " + " ".join(shown) if shown else "")


def _act(vcpu, action):
    kind, *args = action
    run = vcpu.kvm_run
    if kind == "immediate_exit":
        run.immediate_exit = args[0]
    elif kind == "window":
        run.request_interrupt_window = args[0]
    elif kind == "interrupt":
        vcpu.interrupt(args[0])
    elif kind == "alarm":          # SIGALRM after args[0] s, then every 50 ms until the run ends
        signal.setitimer(signal.ITIMER_REAL, args[0], 0.05)
    else:
        raise ValueError(action)


def _drive(vcpu, case, mem, rom):
    """The VMM loop of run_case (its own frame: no kvm_run view outlives it)."""
    lines, text, answers, stops = [], b"", list(case.answers), 0
    for n in range(case.max_runs):
        for action in case.script.get(n, ()):
            _act(vcpu, action)
        err = None
        try:
            vcpu.run()
        except OSError as e:
            err = e.errno
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        run = vcpu.kvm_run
        io = run.exit.io
        if (case.text and err is None and run.exit_reason == abi.KVM_EXIT_IO
                and io.direction == abi.KVM_EXIT_IO_OUT and io.port == 0xE9):
            text += vcpu.io_data()
            continue
        if text:
            lines.append(f"text {text.decode(errors='replace')!r}")
            text = b""
        lines.append(describe(vcpu, err, case))
        if err is None and run.exit_reason == abi.KVM_EXIT_IO and io.direction == abi.KVM_EXIT_IO_IN:
            n_bytes = io.size * io.count
            vcpu.set_io_data(answers.pop(0) if answers else in_pattern(n_bytes))
        elif err is None and run.exit_reason == abi.KVM_EXIT_MMIO and not run.exit.mmio.is_write:
            m = run.exit.mmio
            data = answers.pop(0) if answers else mmio_pattern(m.len)
            ctypes.memmove(ctypes.addressof(m.data), bytes(data), m.len)
        reason = abi.EXIT_REASONS.get(run.exit_reason, "?")
        if (err is not None or reason in TERMINAL
                or (reason == "IO" and io.direction == abi.KVM_EXIT_IO_OUT and io.port == END_PORT)):
            stops += 1
            if stops >= case.stops:
                break
    if text:
        lines.append(f"text {text.decode(errors='replace')!r}")
    for gpa, size in case.mem:
        src, off = (rom, gpa - ROM_GPA) if gpa >= ROM_GPA else (mem, gpa)
        lines.append(f"mem {gpa:#x}: {bytes(src.map[off:off + size]).hex()}")
    return lines


def run_case(mnt, case, cpuid=None):
    """Run `case` on the mount `mnt` (None: /dev/kvm); return its lines."""
    kvm = Kvm(mnt)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(RAM_SIZE)
    rom = None
    old = signal.signal(signal.SIGALRM, lambda *a: None)
    try:
        image = guests.load(case.guest)
        base = guests.gpa(case.guest)
        _put(mem, base, image)
        vm.set_user_memory_region(0, 0, 0, RAM_SIZE, mem.address)
        if case.rom:
            rom = alloc_guest_memory(ROM_SIZE, "rom")
            _put(rom, 0, rom_pattern(ROM_SIZE))
            vm.set_user_memory_region(1, abi.KVM_MEM_READONLY, ROM_GPA, ROM_SIZE, rom.address)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(cpuid if cpuid is not None else kvm.get_supported_cpuid())
        setup(vcpu, mem, case.mode, base, case.rflags)
        lines = _drive(vcpu, case, mem, rom)
        vcpu.close()
        return lines
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        vm.close()
        mem.close()
        if rom is not None:
            rom.close()
        kvm.close()


CASES = []
# kvm-pvm runs paging only in long mode: SET_SREGS with CR0.PG and EFER.LME clear is
# accepted, but the vCPU shuts down on its next run (the host logs why).
PVM_NO_LEGACY_PAGING = ["SHUTDOWN | rax=0x0 rbx=0x0 rip=0x1000", "mem 0x5000: 0000000000000000",
                        "mem 0x3000: 00000000"]


def case(name, guest, mode, expect, **kw):
    assert name not in {c.name for c in CASES}, name
    CASES.append(GuestCase(name, guest, mode, tuple(expect), **kw))


# --- port I/O ------------------------------------------------------------------------
case("io-out-in-sizes", "io_ports", "real", [
         'IO out port=0x10 size=1 count=1 data=42 | rax=0x42 rbx=0x0 rcx=0x0',
         'IO out port=0x10 size=2 count=1 data=1234 | rax=0x3412 rbx=0x0 rcx=0x0',
         'IO out port=0x10 size=4 count=1 data=12345678 | rax=0x78563412 rbx=0x0 rcx=0x0',
         'IO in port=0x11 size=1 count=1 | rax=0x11223344 rbx=0x0 rcx=0x0',
         'IO in port=0x1234 size=2 count=1 | rax=0x112233a1 rbx=0x112233a1 rcx=0x0',
         'IO in port=0x1234 size=4 count=1 | rax=0x1122b2b1 rbx=0x112233a1 rcx=0x1122b2b1',
         'HLT | rax=0xc4c3c2c1 rbx=0x112233a1 rcx=0x1122b2b1',
         'mem 0x3000: a1332211b1b22211c1c2c3c4',
     ], regs=("rax", "rbx", "rcx"),
     answers=(b"\xa1", b"\xb1\xb2", b"\xc1\xc2\xc3\xc4"), mem=((0x3000, 12),),
     why="OUT data 42/3412/78563412 (spec 6.5 run-out-*); IN data written at data_offset "
         "completes into AL/AX/EAX on the next KVM_RUN, upper bytes kept")
case("rep-outsb", "rep_outsb", "real", [
         'IO out port=0xe9 size=1 count=1 data=61 | rcx=0x3 rsi=0x100e rip=0x100a',
         'IO out port=0xe9 size=1 count=1 data=62 | rcx=0x2 rsi=0x100f rip=0x100a',
         'IO out port=0xe9 size=1 count=1 data=63 | rcx=0x1 rsi=0x1010 rip=0x100a',
         'IO out port=0xe9 size=1 count=1 data=64 | rcx=0x0 rsi=0x1011 rip=0x100a',
         'HLT | rcx=0x0 rsi=0x1011 rip=0x100d',
     ], regs=("rcx", "rsi", "rip"), rip_at_out=True,
     why="rep outsb: one exit per element with count 1, RCX/RSI already stepped; RIP stays on "
         "the instruction at every exit, the last one included: the next KVM_RUN finds RCX 0 "
         "and retires it (spec 6.5; string I/O goes through KVM's emulator on every host)")
case("rep-insb", "rep_insb", "real", [
         'IO in port=0x20 size=1 count=4 | rcx=0x4 rdi=0x3000 rip=0x100a',
         'HLT | rcx=0x0 rdi=0x3004 rip=0x100d',
         'mem 0x3000: 7778797a',
     ], regs=("rcx", "rdi", "rip"), mem=((0x3000, 4),),
     answers=(b"wxyz",),
     why="rep insb reads ahead: one IN exit with count 4; the data lands at ES:DI (spec 6.5)")
case("hlt-resume", "hlt_resume", "real", [
         'HLT | rip=0x1001',
         'IO out port=0xe9 size=1 count=1 data=55',
         'HLT | rip=0x1006',
     ], stops=2,
     why="HLT exits with RIP after the HLT; the next KVM_RUN resumes there (spec 6.5)")

# --- MMIO ----------------------------------------------------------------------------
case("mmio-real", "mmio_real", "real", [
         'MMIO write addr=0xd0000 len=1 data=11 | rax=0xd000 rbx=0x0 rcx=0x0 rip=0x100a',
         'MMIO write addr=0xd0002 len=2 data=2233 | rax=0xd000 rbx=0x0 rcx=0x0 rip=0x1010',
         'MMIO write addr=0xd0004 len=4 data=44556677 | rax=0xd000 rbx=0x0 rcx=0x0 rip=0x1019',
         'MMIO read addr=0xd0010 len=1 | rax=0xd000 rbx=0x0 rcx=0x0 rip=0x1019',
         'MMIO read addr=0xd0012 len=2 | rax=0xd0a1 rbx=0x0 rcx=0x0 rip=0x101c',
         'MMIO read addr=0xd0014 len=4 | rax=0xd0a1 rbx=0xb2b1 rcx=0x0 rip=0x1020',
         'HLT | rax=0xd0a1 rbx=0xb2b1 rcx=0xc4c3c2c1 rip=0x1026',
     ], regs=("rax", "rbx", "rcx", "rip"),
     answers=(b"\xa1", b"\xb1\xb2", b"\xc1\xc2\xc3\xc4"),
     why="real-mode MMIO of 1/2/4 bytes at a gpa with no slot: writes retired (RIP past), "
         "reads complete with the VMM's data on the next KVM_RUN (RIP on the load until then)")
case("mmio-64", "mmio64", "long64", [
         'MMIO write addr=0xd0000 len=1 data=11 | rax=0x0 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x1008',
         'MMIO write addr=0xd0002 len=2 data=2233 | rax=0x0 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x1012',
         'MMIO write addr=0xd0004 len=4 data=44556677 | rax=0x0 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x101d',
         'MMIO write addr=0xd0008 len=8 data=08090a0b0c0d0e0f | rax=0xf0e0d0c0b0a0908 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x102f',
         'MMIO read addr=0xd0010 len=1 | rax=0xf0e0d0c0b0a0908 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x102f',
         'MMIO read addr=0xd0012 len=2 | rax=0xf0e0d0c0b0a0981 rbx=0x0 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x1036',
         'MMIO read addr=0xd0014 len=4 | rax=0xf0e0d0c0b0a0981 rbx=0x8281 rcx=0x0 rdx=0x0 rsi=0x0 rip=0x103e',
         'MMIO read addr=0xd0018 len=8 | rax=0xf0e0d0c0b0a0981 rbx=0x8281 rcx=0x84838281 rdx=0x0 rsi=0x0 rip=0x1045',
         'MMIO write addr=0xd0020 len=4 data=01efcdab | rax=0xf0e0d0c0b0a0981 rbx=0x8281 rcx=0x84838281 rdx=0x8887868584838281 rsi=0x0 rip=0x1058',
         'MMIO read addr=0xd0024 len=4 | rax=0xf0e0d0c0b0a0981 rbx=0x8281 rcx=0x84838281 rdx=0x8887868584838281 rsi=0x0 rip=0x1058',
         'HLT | rax=0xf0e0d0c0b0a0981 rbx=0x8281 rcx=0x84838281 rdx=0x8887868584838281 rsi=0x84838281 rip=0x106b',
         'mem 0x5000: cefaedfe',
     ], regs=("rax", "rbx", "rcx", "rdx", "rsi", "rip"),
     mem=((ALIAS_RAM, 4),),
     why="64-bit MMIO of 1/2/4/8 bytes; phys_addr is the gpa after the guest's page walk "
         "(0x801000 -> 0xD0000); data is little-endian as the store lays it out (spec 6.5)")
case("mmio-rmw", "mmio_rmw", "long64", [
         'MMIO read addr=0xd0000 len=8 | rax=0x0 rsp=0x8000 rsi=0x0 rdi=0x0 rip=0x1007 rflags=0x2',
         'MMIO read addr=0xd0008 len=4 | rax=0x1010101 rsp=0x7ff8 rsi=0x0 rdi=0x0 rip=0x1013 rflags=0x2',
         'MMIO write addr=0xd0008 len=4 data=11213141 | rax=0x1010101 rsp=0x7ff8 rsi=0x0 rdi=0x0 rip=0x101a rflags=0x6',
         'MMIO read addr=0xd0010 len=1 | rax=0x1010101 rsp=0x7ff8 rsi=0xd0010 rdi=0x3000 rip=0x1025 rflags=0x6',
         'HLT | rax=0x1010101 rsp=0x7ff8 rsi=0xd0011 rdi=0x3001 rip=0x1027 rflags=0x6',
         'mem 0x7ff8: 0102030405060708',
         'mem 0x3000: 99',
     ], regs=("rax", "rsp", "rsi", "rdi", "rip", "rflags"),
     answers=(bytes(range(1, 9)), b"\x10\x20\x30\x40", b"\x99"),
     mem=((STACK_TOP - 8, 8), (0x3000, 1)),
     why="push [mmio] (8-byte read, stack store to RAM), add [mmio], eax (read exit then write "
         "exit with the sum, flags from the add), movsb from MMIO (read exit, store to RAM)")
case("rom-write", "rom_write", "long64", [
         'MMIO write addr=0x100000 len=4 data=efbeadde | rax=0x0 rip=0x100b',
         'HLT | rax=0xa3a2a1a0 rip=0x1013',
         'mem 0x100000: a0a1a2a3a4a5a6a7',
     ], regs=("rax", "rip"), rom=True,
     mem=((ROM_GPA, 8),),
     why="a store to a READONLY slot is an MMIO write exit and is not stored; loads read the "
         "slot (spec 7.4)")
case("fetch-no-slot", "fetch_noslot", "real", [
         'INTERNAL_ERROR suberror=1',
     ],
     regs=(),
     why="a code fetch from a gpa without a slot cannot be emulated: INTERNAL_ERROR "
         "suberror 1 (spec 6.5 run-code-outside-memslots)")
case("gp-np-error-codes", "gp_errcode", "long64", [
         'IO out port=0x13 size=4 count=1 data=38120000',
         'IO out port=0x13 size=4 count=1 data=20000000',
         'HLT | rip=0x1063',
     ],
     why="64-bit #GP(0x1238) for a selector past the GDT limit and #NP(0x20) for a not-present "
         "descriptor, delivered through the guest's IDT with their error codes pushed")
case("triple-fault", "triple_fault", "long64", [
         'SHUTDOWN | rip=0x1000',
         'SHUTDOWN | rip=0x1000',
     ], stops=2,
     why="64-bit ud2 with IDT limit 0 -> triple fault -> SHUTDOWN, and SHUTDOWN again on "
         "the next KVM_RUN (spec 6.5)")

# --- run control ---------------------------------------------------------------------
case("immediate-exit-completes-in", "in_echo", "real", [
         'IO in port=0x20 size=1 count=1 | rax=0x0 rip=0x1000',
         'EINTR exit_reason=IO | rax=0x7a rip=0x1002',
         'IO out port=0xe9 size=1 count=1 data=7a | rax=0x7a',
         'HLT | rax=0x7a rip=0x1005',
     ], regs=("rax", "rip"), stops=2,
     answers=(b"\x7a",), script={1: (("immediate_exit", 1),), 2: (("immediate_exit", 0),)},
     why="immediate_exit: KVM_RUN completes the pending IN (AL, RIP) and returns EINTR "
         "without running; exit_reason stays IO (spec 6.5, 13.2)")
case("signal-interrupts-spin", "spin", "real", [
         'EINTR exit_reason=INTR | rip=0x1000',
     ], regs=("rip",),
     script={0: (("alarm", 0.05),)},
     why="SIGALRM during `jmp $`: KVM_RUN -1/EINTR with exit_reason INTR, RIP on the jmp "
         "(spec 6.5 run-signal-interrupts-busy-guest)")
case("interrupt-real-mode", "irq_real", "real", [
         'IO out port=0xe9 size=1 count=1 data=61 | rsp=0x8000 if=0 ready=0',
         'HLT | rsp=0x8000 rip=0x1016 if=1 ready=1',
         'IO out port=0xe9 size=1 count=1 data=49 | rsp=0x7ffa if=0 ready=0',
         'IO out port=0xe9 size=1 count=1 data=62 | rsp=0x8000 if=1 ready=1',
         'HLT | rsp=0x8000 rip=0x101b if=1 ready=1',
     ], regs=("rsp", "rip"), irqflags=True,
     stops=2, script={2: (("interrupt", 0x20),)},
     why="KVM_INTERRUPT while the guest sits after sti; hlt: its IVT handler runs on the next "
         "KVM_RUN; if_flag/ready_for_interrupt_injection follow RFLAGS.IF (spec 10.3)")
case("interrupt-window-real", "window", "real", [
         'IRQ_WINDOW_OPEN | rip=0x1000 if=1 ready=1',
         'IO out port=0xe9 size=1 count=1 data=57 | if=1 ready=1',
         'HLT | rip=0x1005 if=1 ready=1',
     ], host={"pvm": [[
         'IO out port=0xe9 size=1 count=1 data=57 | if=1 ready=1',
         'HLT | rip=0x1005 if=1 ready=1',
     ], [
         'IRQ_WINDOW_OPEN | rip=0x1000 if=1 ready=1',
         'IO out port=0xe9 size=1 count=1 data=57 | if=1 ready=1',
         'HLT | rip=0x1005 if=1 ready=1',
     ]]}, rflags=0x202, irqflags=True,
     script={0: (("window", 1),), 1: (("window", 0),)},
     why="request_interrupt_window with IF 1: IRQ_WINDOW_OPEN before the guest runs further "
         "(spec 10.3); the PVM host emulates real mode and mostly runs on (spec 1), but "
         "now and then gives the exit too, so both are accepted there")

# --- modes ---------------------------------------------------------------------------
case("modes-real-to-long", "demo", "real", [
         "text 'hello from real mode\\nhello from 32-bit protected mode\\nhello from 64-bit long mode\\n'",
         'IO out port=0xea size=1 count=1 data=00',
         'MMIO write addr=0x100000 len=4 data=08000000 | rip=0x10c6',
         'MMIO write addr=0x101000 len=4 data=07000000 | rip=0x10c6',
         'MMIO write addr=0x102000 len=4 data=06000000 | rip=0x10c6',
         'MMIO write addr=0x103000 len=4 data=05000000 | rip=0x10c6',
         'MMIO write addr=0x104000 len=4 data=04000000 | rip=0x10c6',
         'MMIO write addr=0x105000 len=4 data=03000000 | rip=0x10c6',
         'MMIO write addr=0x106000 len=4 data=02000000 | rip=0x10c6',
         'MMIO write addr=0x107000 len=4 data=01000000 | rip=0x10c6',
         "text 'wrote 8 pages\\n'",
         'HLT | rip=0x10de',
     ], regs=("rip",), text=True, max_runs=400,
     why="the guest itself goes real -> protected -> long mode (GDT, page tables, EFER.LME, "
         "CR0.PG) and prints in each; 8 page stores after the OUT to 0xEA")
case("user64-cpl3", "user64", "user64", [
         'IO out port=0x10 size=1 count=1 data=42 | rax=0x42 rbx=0x0 rcx=0x0 rdx=0x0',
         'IO in port=0x11 size=1 count=1 | rax=0x42 rbx=0x0 rcx=0x0 rdx=0x0',
         'MMIO write addr=0xd0000 len=4 data=88776655 | rax=0x41 rbx=0x41 rcx=0x0 rdx=0x0',
         'MMIO read addr=0xd0004 len=4 | rax=0x41 rbx=0x41 rcx=0x0 rdx=0x0',
         'MMIO write addr=0x100000 len=4 data=efbeadde | rax=0x41 rbx=0x41 rcx=0x84838281 rdx=0x0',
         'IO out port=0xff size=1 count=1 data=41 | rax=0x41 rbx=0x41 rcx=0x84838281 rdx=0xa3a2a1a0',
         'mem 0x3000: 78563412',
         'mem 0x5000: 0df0feca',
         'mem 0x100000: a0a1a2a3',
     ], regs=("rax", "rbx", "rcx", "rdx"), rom=True,
     mem=((0x3000, 4), (ALIAS_RAM, 4), (ROM_GPA, 4)),
     why="64-bit CPL 3 with IOPL 3 (natively run on a PVM host): port I/O, MMIO, READONLY slot, "
         "RAM through the guest's page tables")
case("user64-interrupt-window", "user64", "user64", [
         'IRQ_WINDOW_OPEN | rip=0x1000 if=1 ready=1',
         'IO out port=0x10 size=1 count=1 data=42 | if=1 ready=1',
     ], regs=("rip",), rom=True, rflags=0x3202,
     irqflags=True, script={0: (("window", 1),), 1: (("window", 0),)}, max_runs=2,
     why="request_interrupt_window with IF 1 at CPL 3: IRQ_WINDOW_OPEN with RIP unchanged "
         "(spec 10.3, the MMU path on PVM)")
case("prot32-flat", "paging32", "prot32", [
         'MMIO write addr=0x800000 len=4 data=0df0feca | rax=0x0 rbx=0x0 rip=0x100a',
         'MMIO read addr=0x800004 len=4 | rax=0x0 rbx=0x0 rip=0x100a',
         'MMIO write addr=0x801010 len=4 data=78563412 | rax=0x84838281 rbx=0x0 rip=0x1019',
         'MMIO read addr=0x801014 len=4 | rax=0x84838281 rbx=0x0 rip=0x1019',
         'HLT | rax=0x84838281 rbx=0x84838281 rip=0x102a',
         'mem 0x5000: 0000000000000000',
         'mem 0x3000: 01000000',
     ], regs=("rax", "rbx", "rip"),
     mem=((ALIAS_RAM, 8), (0x3000, 4)),
     why="32-bit protected mode without paging (flat segments from KVM_SET_SREGS): the "
         "addresses 0x800000.. have no slot, so every access there is MMIO")
case("paging-pse32", "paging32", "pse32", [
         'MMIO write addr=0xd0010 len=4 data=78563412 | rax=0x0 rbx=0x0 rip=0x1019',
         'MMIO read addr=0xd0014 len=4 | rax=0x0 rbx=0x0 rip=0x1019',
         'HLT | rax=0x0 rbx=0x84838281 rip=0x102a',
         'mem 0x5000: 0df0feca00000000',
         'mem 0x3000: 01000000',
     ], host={"pvm": PVM_NO_LEGACY_PAGING}, regs=("rax", "rbx", "rip"),
     mem=((ALIAS_RAM, 8), (0x3000, 4)),
     why="32-bit paging with a 4 MiB PSE page and a 4 KiB page table: RAM and MMIO through "
         "non-identity mappings")
case("paging-pae", "paging32", "pae", [
         'MMIO write addr=0xd0010 len=4 data=78563412 | rax=0x0 rbx=0x0 rip=0x1019',
         'MMIO read addr=0xd0014 len=4 | rax=0x0 rbx=0x0 rip=0x1019',
         'HLT | rax=0x0 rbx=0x84838281 rip=0x102a',
         'mem 0x5000: 0df0feca00000000',
         'mem 0x3000: 01000000',
     ], host={"pvm": PVM_NO_LEGACY_PAGING}, regs=("rax", "rbx", "rip"),
     mem=((ALIAS_RAM, 8), (0x3000, 4)),
     why="PAE paging (PDPT, 2 MiB page, 4 KiB page table): RAM and MMIO through non-identity "
         "mappings")


# --- vCPU API cases (no guest code runs) ------------------------------------------------
API_CASES = []


def api_case(expect, host=None):
    def deco(fn):
        API_CASES.append(GuestCase(fn.__name__.replace("_", "-"), "", "", tuple(expect),
                                   host=host or {}, why=(fn.__doc__ or "").strip()))
        _API_FNS[API_CASES[-1].name] = fn
        return fn
    return deco


_API_FNS = {}


def _seg_line(name, s):
    return (f"{name} sel={s.selector:#x} base={s.base:#x} limit={s.limit:#x} type={s.type} "
            f"present={s.present} dpl={s.dpl} db={s.db} s={s.s} l={s.l} g={s.g}")


def _errno_of(fn):
    try:
        return str(fn())
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


@api_case([
    "regs rax=0x0 rbx=0x0 rcx=0x0 rdx=0x600 rsi=0x0 rdi=0x0 rsp=0x0 rbp=0x0 r8-r15=0 "
    "rip=0xfff0 rflags=0x2",
    "cs sel=0xf000 base=0xffff0000 limit=0xffff type=11 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "ds sel=0x0 base=0x0 limit=0xffff type=3 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "es sel=0x0 base=0x0 limit=0xffff type=3 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "fs sel=0x0 base=0x0 limit=0xffff type=3 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "gs sel=0x0 base=0x0 limit=0xffff type=3 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "ss sel=0x0 base=0x0 limit=0xffff type=3 present=1 dpl=0 db=0 s=1 l=0 g=0",
    "tr sel=0x0 base=0x0 limit=0xffff type=11 present=1 dpl=0 db=0 s=0 l=0 g=0",
    "ldt sel=0x0 base=0x0 limit=0xffff type=2 present=1 dpl=0 db=0 s=0 l=0 g=0",
    "gdt base=0x0 limit=0xffff idt base=0x0 limit=0xffff",
    "cr0=0x60000010 cr2=0x0 cr3=0x0 cr4=0x0 efer=0x0 apic_base=0xfee00900",
])
def reset_state(vm, vcpu, mem):
    """A new vCPU's registers (spec 10.2)."""
    r, s = vcpu.get_regs(), vcpu.get_sregs()
    hi = "0" if not any(getattr(r, f"r{i}") for i in range(8, 16)) else "nonzero"
    out = ["regs " + " ".join(f"{n}={getattr(r, n):#x}" for n in
                              ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"))
           + f" r8-r15={hi} rip={r.rip:#x} rflags={r.rflags:#x}"]
    out += [_seg_line(n, getattr(s, n)) for n in abi.SEGMENTS]
    out.append(f"gdt base={s.gdt.base:#x} limit={s.gdt.limit:#x} "
               f"idt base={s.idt.base:#x} limit={s.idt.limit:#x}")
    out.append(f"cr0={s.cr0:#x} cr2={s.cr2:#x} cr3={s.cr3:#x} cr4={s.cr4:#x} efer={s.efer:#x} "
               f"apic_base={s.apic_base:#x}")
    return out


@api_case(["exact", "rflags 0x0 -> 0x2", "rflags 0x246 -> 0x246"])
def regs_round_trip(vm, vcpu, mem):
    """KVM_SET_REGS then KVM_GET_REGS is exact, except RFLAGS bit 1, which reads 1 (spec 10.1)."""
    r = abi.kvm_regs()
    for i, (name, _) in enumerate(abi.kvm_regs._fields_):
        setattr(r, name, 0x1111111111111111 * (i % 15 + 1) if name not in ("rip", "rflags") else 0)
    r.rip, r.rflags = 0x1234, 0x202
    vcpu.set_regs(r)
    got = vcpu.get_regs()
    out = ["exact" if bytes(got) == bytes(r) else f"differs: {bytes(got).hex()}"]
    for flags in (0x0, 0x246):
        r.rflags = flags
        vcpu.set_regs(r)
        out.append(f"rflags {flags:#x} -> {vcpu.get_regs().rflags:#x}")
    return out


def _long_sregs(vcpu, mem):
    s = vcpu.get_sregs()
    _seg(s.cs, 0x18, True, db=0, l=1)
    for n in ("ds", "es", "fs", "gs", "ss"):
        _seg(getattr(s, n), 0x10, False)
    s.cr3 = _tables_long(mem, False)
    s.cr4, s.efer, s.cr0 = 0x20, 0x500, 0x80000011
    return s


@api_case(["valid long mode 0", "PG without PE EINVAL", "LMA without paging EINVAL",
           "CS.L outside long mode EINVAL", "LME+PG without PAE EINVAL",
           "reserved CR4 bit EINVAL"])
def sregs_refusals(vm, vcpu, mem):
    """KVM_SET_SREGS refuses inconsistent control state with EINVAL (spec 10.1)."""
    vcpu.set_cpuid2(vm.kvm.get_supported_cpuid())
    base = vcpu.get_sregs()
    out = []

    def attempt(label, edit):
        s = abi.kvm_sregs.from_buffer_copy(bytes(base))
        edit(s)
        out.append(f"{label} {_errno_of(lambda: vcpu.set_sregs(s))}")
        vcpu.set_sregs(base)

    def long_ok(s):
        s2 = _long_sregs(vcpu, mem)
        ctypes.memmove(ctypes.addressof(s), ctypes.addressof(s2), ctypes.sizeof(s))

    def long_no_pae(s):
        long_ok(s)
        s.cr4 = 0

    attempt("valid long mode", long_ok)
    attempt("PG without PE", lambda s: setattr(s, "cr0", 0x80000010))
    attempt("LMA without paging", lambda s: setattr(s, "efer", 0x400))
    attempt("CS.L outside long mode", lambda s: setattr(s.cs, "l", 1))
    attempt("LME+PG without PAE", long_no_pae)
    attempt("reserved CR4 bit", lambda s: setattr(s, "cr4", 1 << 40))
    return out


@api_case(["irq 255 0", "irq 256 EINVAL"])
def interrupt_range(vm, vcpu, mem):
    """KVM_INTERRUPT without in-kernel irqchip: vectors 0-255 queue, 256 is EINVAL (spec 10.3)."""
    return [f"irq {n} {_errno_of(lambda: vcpu.interrupt(n))}" for n in (255, 256)]


@api_case(["arg 1 EINVAL", "cr8 16 EINVAL exit_reason=UNKNOWN", "cr8 15 then exit_reason=HLT"])
def run_argument_errors(vm, vcpu, mem):
    """KVM_RUN with arg 1, or with kvm_run.cr8 > 15, fails EINVAL before running (spec 3.3, 6.2)."""
    from kvmfs.client import ioctl
    _put(mem, 0x1000, b"\xf4")
    setup(vcpu, mem, "real", 0x1000)
    out = [f"arg 1 {_errno_of(lambda: ioctl(vcpu.fd, abi.KVM_RUN, 1))}"]
    vcpu.kvm_run.cr8 = 16
    e = _errno_of(vcpu.run)
    out.append(f"cr8 16 {e} exit_reason={abi.EXIT_REASONS.get(vcpu.kvm_run.exit_reason)}")
    vcpu.kvm_run.cr8 = 15
    e = _errno_of(vcpu.run)
    reason = abi.EXIT_REASONS.get(vcpu.kvm_run.exit_reason, vcpu.kvm_run.exit_reason)
    out.append(f"cr8 15 then exit_reason={reason}" if e == "0" else f"cr8 15 then {e}")
    return out


@api_case(["run 1: OUT 0x10 data 0x1", "run 2: OUT 0x10 data 0x2", "run 3: OUT 0x10 data 0x3"])
def code_rewritten_between_runs(vm, vcpu, mem):
    """The VMM rewrites the code at RIP between runs: the next KVM_RUN runs the new code."""
    out = []
    for n in (1, 2, 3):
        _put(mem, 0x1000, bytes([0xB0, n, 0xE6, 0x10, 0xF4]))     # mov al,n; out 0x10,al; hlt
        setup(vcpu, mem, "real", 0x1000)
        vcpu.run()
        out.append(f"run {n}: OUT {vcpu.kvm_run.exit.io.port:#x} data {vcpu.io_data()[0]:#x}")
        vcpu.run()
    return out


def _cpuid_entry(fn, index=0, flags=0, eax=0, ebx=0, ecx=0, edx=0):
    e = abi.kvm_cpuid_entry2()
    e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, index, flags, eax, ebx, ecx, edx
    return e


CPUID_QUERIES = [(0, 0), (1, 0), (2, 0), (7, 0), (7, 1), (0x20, 0), (0x40000000, 0),
                 (0x80000001, 0), (0x80000008, 0)]


@api_case([
    "before SET_CPUID2: leaf 0x0.0 = 0 0 0 0",
    "leaf 0x0.0 = 0x7 0x756e6547 0x6c65746e 0x49656e69",
    "leaf 0x1.0 = 0x806c1 0x1234 0x20b0c0d 0x201",
    "leaf 0x2.0 = 0x0 0x0 0x0 0x0",
    "leaf 0x7.0 = 0x0 0x77 0x0 0x0",
    "leaf 0x7.1 = 0x71 0x0 0x0 0x0",
    "leaf 0x20.0 = 0x0 0x77 0x0 0x0",
    "leaf 0x40000000.0 = 0x0 0x77 0x0 0x0",
    "leaf 0x80000001.0 = 0x0 0x0 0x0 0x20100800",
    "leaf 0x80000008.0 = 0x0 0x77 0x0 0x0",
    "after KVM_RUN: same table 0, another EINVAL",
], host={"pvm": HOST_QUIRK})
def cpuid_from_set_cpuid2(vm, vcpu, mem):
    """CPUID answers from KVM_SET_CPUID2's table: exact matches (index where flagged), a leaf
    past its range's maximum reads as the highest basic leaf, other leaves zeros; OSXSAVE follows
    CR4 and the APIC bit the APIC base.  Once the vCPU has run, only the same table is accepted
    (spec 10.4).  PVM answers leaf 7 and out-of-range leaves with the host's values, and refuses
    even the same table after a run (KVM's runtime-CPUID-update bug from commit 93da6af, fixed
    upstream in December 2025)."""
    def run_queries(queries, vcpu=vcpu):
        code = b""
        for i, (fn, idx) in enumerate(queries):
            out = 0x3000 + 16 * i
            code += b"\x66\xb8" + fn.to_bytes(4, "little") + b"\x66\xb9" + idx.to_bytes(4, "little")
            code += b"\x0f\xa2\x66\xa3" + out.to_bytes(2, "little")
            for modrm in (0x1E, 0x0E, 0x16):                     # ebx, ecx, edx
                code += bytes([0x66, 0x89, modrm]) + (out + 4 * (1 + (0x1E, 0x0E, 0x16).index(modrm))).to_bytes(2, "little")
        _put(mem, 0x1000, code + b"\xf4")
        setup(vcpu, mem, "real", 0x1000)
        vcpu.run()
        return [[int.from_bytes(mem.map[0x3000 + 16 * i + 4 * k:0x3004 + 16 * i + 4 * k], "little")
                 for k in range(4)] for i in range(len(queries))]
    other = vm.create_vcpu(1)
    try:
        out = ["before SET_CPUID2: leaf 0x0.0 = " +
               " ".join(str(x) for x in run_queries([(0, 0)], other)[0])]
    finally:
        other.close()
    table = [
        _cpuid_entry(0, eax=7, ebx=0x756E6547, ecx=0x6C65746E, edx=0x49656E69),   # GenuineIntel
        _cpuid_entry(1, eax=0x806C1, ebx=0x1234, ecx=0x0A0B0C0D | 1 << 27, edx=0x1),
        _cpuid_entry(7, index=0, flags=abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ebx=0x77),
        _cpuid_entry(7, index=1, flags=abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX, eax=0x71),
        _cpuid_entry(0x80000000, eax=0x80000001),
        _cpuid_entry(0x80000001, edx=0x20100800),
    ]
    vcpu.set_cpuid2(table)
    for (fn, idx), r in zip(CPUID_QUERIES, run_queries(CPUID_QUERIES)):
        out.append(f"leaf {fn:#x}.{idx} = " + " ".join(f"{x:#x}" for x in r))
    same = _errno_of(lambda: vcpu.set_cpuid2(table))
    another = _errno_of(lambda: vcpu.set_cpuid2(table[:-1]))
    out.append(f"after KVM_RUN: same table {same}, another {another}")
    return out


def _events_line(ev):
    return (f"exception {ev.exception.injected},{ev.exception.nr},{ev.exception.has_error_code},"
            f"{ev.exception.error_code:#x} interrupt {ev.interrupt.injected},{ev.interrupt.nr},"
            f"{ev.interrupt.shadow} nmi {ev.nmi.injected},{ev.nmi.pending},{ev.nmi.masked} "
            f"smi {ev.smi.smm},{ev.smi.pending} flags={ev.flags:#x}")


_EVENTS_ABI = [
    "new: exception 0,0,0,0x0 interrupt 0,0,0 nmi 0,0,0 smi 0,0 flags=0xd",
    "KVM_INTERRUPT 0x20: exception 0,0,0,0x0 interrupt 1,32,0 nmi 0,0,0 smi 0,0 flags=0xd",
    "interrupt cleared: exception 0,0,0,0x0 interrupt 0,32,0 nmi 0,0,0 smi 0,0 flags=0xd",
    "flags 0x40 EINVAL", "flags PAYLOAD EINVAL", "flags TRIPLE_FAULT EINVAL",
    "exception 32 EINVAL", "exception 2 (NMI) EINVAL",
    "exception 13 error 0x18 0: exception 1,13,1,0x18 interrupt 0,0,0 nmi 0,0,0 smi 0,0 flags=0xd",
    "pending exception without PAYLOAD 0: exception 0,6,0,0x0 interrupt 0,0,0 nmi 0,0,0 smi 0,0 "
    "flags=0xd",
    "shadow 1 0: exception 0,0,0,0x0 interrupt 0,0,1 nmi 0,0,0 smi 0,0 flags=0xd",
]


@api_case(_EVENTS_ABI + [
    "smi pending 0: exception 0,0,0,0x0 interrupt 0,0,0 nmi 0,0,0 smi 0,1 flags=0xd",
    "KVM_SMI 0: exception 0,0,0,0x0 interrupt 0,0,0 nmi 0,0,0 smi 0,1 flags=0xd",
], host={"pvm": _EVENTS_ABI + [
    "smi pending EINVAL",
    "KVM_SMI ENOTTY: exception 0,0,0,0x0 interrupt 0,0,0 nmi 0,0,0 smi 0,0 flags=0xd",
]})
def vcpu_events(vm, vcpu, mem):
    """KVM_GET/SET_VCPU_EVENTS without an in-kernel irqchip: KVM_INTERRUPT shows as an injected
    interrupt, vectors stay readable once the event is gone, unknown or unenabled flags
    (PAYLOAD, TRIPLE_FAULT) and exception vectors above 31 or NMI are EINVAL, a pending
    exception without PAYLOAD is dropped, SMI state comes with VALID_SMM (spec 10.3).  PVM has
    no SMM: it refuses SMI state and KVM_SMI."""
    out = [f"new: {_events_line(vcpu.get_vcpu_events())}"]
    vcpu.interrupt(0x20)
    out.append(f"KVM_INTERRUPT 0x20: {_events_line(vcpu.get_vcpu_events())}")
    ev = vcpu.get_vcpu_events()
    ev.interrupt.injected = 0
    vcpu.set_vcpu_events(ev)
    out.append(f"interrupt cleared: {_events_line(vcpu.get_vcpu_events())}")

    def attempt(label, edit, show=True):
        ev = abi.kvm_vcpu_events()
        edit(ev)
        e = _errno_of(lambda: vcpu.set_vcpu_events(ev))
        out.append(f"{label} {e}" + (f": {_events_line(vcpu.get_vcpu_events())}"
                                     if e == "0" and show else ""))
        vcpu.set_vcpu_events(abi.kvm_vcpu_events())

    def exc(nr, err=None, pending=False):
        def edit(ev):
            ev.exception.nr = nr
            if pending:
                ev.exception.pending = 1
            else:
                ev.exception.injected = 1
            if err is not None:
                ev.exception.has_error_code, ev.exception.error_code = 1, err
        return edit

    attempt("flags 0x40", lambda ev: setattr(ev, "flags", 0x40))
    attempt("flags PAYLOAD", lambda ev: setattr(ev, "flags", abi.KVM_VCPUEVENT_VALID_PAYLOAD))
    attempt("flags TRIPLE_FAULT", lambda ev: setattr(ev, "flags", abi.KVM_VCPUEVENT_VALID_TRIPLE_FAULT))
    attempt("exception 32", exc(32))
    attempt("exception 2 (NMI)", exc(2))
    attempt("exception 13 error 0x18", exc(13, 0x18))
    attempt("pending exception without PAYLOAD", exc(6, pending=True))
    attempt("shadow 1", lambda ev: (setattr(ev, "flags", abi.KVM_VCPUEVENT_VALID_SHADOW),
                                    setattr(ev.interrupt, "shadow", 1)))
    ev = abi.kvm_vcpu_events()
    ev.flags = abi.KVM_VCPUEVENT_VALID_SHADOW
    vcpu.set_vcpu_events(ev)
    attempt("smi pending", lambda ev: (setattr(ev, "flags", abi.KVM_VCPUEVENT_VALID_SMM),
                                       setattr(ev.smi, "pending", 1)), show=True)
    ev = abi.kvm_vcpu_events()
    ev.flags = abi.KVM_VCPUEVENT_VALID_SMM
    vcpu.set_vcpu_events(ev)
    e = _errno_of(vcpu.smi)
    out.append(f"KVM_SMI {e}: {_events_line(vcpu.get_vcpu_events())}")
    return out


def _run_to_out(vcpu):
    """KVM_RUN once: "OUT PORT data VALUE", or "exit REASON" for any other exit."""
    vcpu.run()
    run = vcpu.kvm_run
    if run.exit_reason != abi.KVM_EXIT_IO:
        return f"exit {abi.EXIT_REASONS.get(run.exit_reason, run.exit_reason)}"
    return f"OUT {run.exit.io.port:#x} data {int.from_bytes(vcpu.io_data(), 'little'):#x}"


@api_case(["OUT 0x66 data 0x1000"])
def rsm_outside_smm_is_ud(vm, vcpu, mem):
    """RSM outside SMM raises #UD through the guest's IVT, with the RSM's address pushed."""
    _put(mem, 0x18, (0x2000).to_bytes(4, "little"))               # IVT[6] = 0000:2000
    _put(mem, 0x1000, b"\x0f\xaa")                                # rsm
    _put(mem, 0x2000, b"\x58\xe7\x66\xf4")                        # pop ax; out 0x66,ax; hlt
    setup(vcpu, mem, "real", 0x1000)
    return [_run_to_out(vcpu)]


@api_case(["OUT 0x66 data 0x1000 then OUT 0x10 data 0x0"])
def exception_injected_by_set_vcpu_events(vm, vcpu, mem):
    """An exception KVM_SET_VCPU_EVENTS marks injected is delivered by the next KVM_RUN,
    before the instruction at RIP runs (here #UD through the real-mode IVT)."""
    _put(mem, 0x18, (0x2000).to_bytes(4, "little"))               # IVT[6] = 0000:2000
    _put(mem, 0x1000, b"\xe6\x10\xf4")                            # out 0x10,al; hlt
    _put(mem, 0x2000, b"\x58\xe7\x66\x50\xcf")                    # pop ax; out 0x66,ax; push ax; iret
    setup(vcpu, mem, "real", 0x1000)
    ev = abi.kvm_vcpu_events()
    ev.exception.injected, ev.exception.nr = 1, 6
    vcpu.set_vcpu_events(ev)
    return [f"{_run_to_out(vcpu)} then {_run_to_out(vcpu)}"]


@api_case(["OUT 0x66 data 0x1000"])
def interrupt_before_any_guest_access(vm, vcpu, mem):
    """KVM_INTERRUPT before the first KVM_RUN, IF set: delivered through the IVT before the
    guest has touched any memory (the IVT and stack pages are reached first by the delivery)."""
    _put(mem, 0x20 * 4, (0x2000).to_bytes(4, "little"))          # IVT[0x20] = 0000:2000
    _put(mem, 0x1000, b"\xf4")                                     # hlt
    _put(mem, 0x2000, b"\x58\xe7\x66\xf4")                        # pop ax; out 0x66,ax; hlt
    setup(vcpu, mem, "real", 0x1000, rflags=0x202)
    vcpu.interrupt(0x20)
    return [_run_to_out(vcpu)]


def run_api_case(mnt, case):
    kvm = Kvm(mnt)
    vm = kvm.create_vm()
    mem = alloc_guest_memory(RAM_SIZE)
    try:
        vm.set_user_memory_region(0, 0, 0, RAM_SIZE, mem.address)
        vcpu = vm.create_vcpu(0)
        try:
            return list(_API_FNS[case.name](vm, vcpu, mem))
        finally:
            vcpu.close()
    finally:
        vm.close()
        mem.close()
        kvm.close()


def main(argv):
    from conformance import host_kind
    mnt = argv[0] if argv else None
    print(f"# {'kvmfs at ' + mnt if mnt else '/dev/kvm'} ({host_kind()} host)")
    for c in CASES:
        print(f"{c.name}:")
        try:
            for line in run_case(mnt, c):
                print("    " + repr(line) + ",")
        except OSError as e:
            print(f"    error {e}")
    for c in API_CASES:
        print(f"{c.name}:")
        for line in run_api_case(mnt, c):
            print("    " + repr(line) + ",")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main(sys.argv[1:])
