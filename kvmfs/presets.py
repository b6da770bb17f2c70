"""Ready vCPU states: what a VMM writes before its first KVM_RUN, for a mode.

    real     real mode, CS:IP = 0:rip
    long64   64-bit long mode at rip: a flat GDT at GDT_GPA, 4-level page tables
             at PT_GPA mapping the first 1 GiB 1:1 with 2 MiB pages

`apply(put, sregs, mode, rip)` fills `sregs` (a kvm_sregs read from the vCPU)
and returns the kvm_regs to set; `put(gpa, data)` writes guest memory.  The
`setup` text command and the test cases use it, on the mount and on /dev/kvm.
"""
from kvmfs import abi

MODES = ("real", "long64")
GDT_GPA = 0x500
PT_GPA = 0x20000
STACK_TOP = 0x8000

GDT = (0,
       0x00CF9B000000FFFF,     # 0x08 code32
       0x00CF93000000FFFF,     # 0x10 data
       0x00AF9B000000FFFF,     # 0x18 code64
       0x00CF93000000FFFF)     # 0x20 data

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_A, PTE_D, PTE_PS = 1 << 0, 1 << 1, 1 << 5, 1 << 6, 1 << 7
RFLAGS_FIXED = 1 << 1
SEG_CODE, SEG_DATA = 11, 3                 # execute/read accessed, read/write accessed


def _q(v):
    return v.to_bytes(8, "little")


def flat_segment(s, selector, code, l=0):
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = SEG_CODE if code else SEG_DATA
    s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable = 1, 0, 0 if l else 1, 1, l, 1, 0, 0


def identity_map_1g(put):
    """PML4 -> PDPT -> PD of 512 2 MiB pages at PT_GPA; returns CR3."""
    pml4, pdpt, pd = PT_GPA, PT_GPA + 0x1000, PT_GPA + 0x2000
    table = PTE_P | PTE_RW | PTE_A
    put(pml4, _q(pdpt | table))
    put(pdpt, _q(pd | table))
    put(pd, b"".join(_q(i << 21 | table | PTE_D | PTE_PS) for i in range(512)))
    return pml4


def apply(put, sregs, mode, rip):
    """Set sregs for `mode` (writing the GDT and tables it needs); the regs to set."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    s = sregs
    if mode == "real":
        s.cs.selector, s.cs.base = 0, 0
    else:
        put(GDT_GPA, b"".join(_q(d) for d in GDT))
        s.gdt.base, s.gdt.limit = GDT_GPA, 8 * len(GDT) - 1
        s.idt.base, s.idt.limit = 0, 0
        flat_segment(s.cs, 0x18, True, l=1)
        for name in ("ds", "es", "fs", "gs", "ss"):
            flat_segment(getattr(s, name), 0x10, False)
        s.cr3 = identity_map_1g(put)
        s.cr4, s.efer, s.cr0 = CR4_PAE, EFER_LME | EFER_LMA, CR0_PG | CR0_ET | CR0_PE
    regs = abi.kvm_regs()
    regs.rip, regs.rsp, regs.rflags = rip, STACK_TOP, RFLAGS_FIXED
    return regs
