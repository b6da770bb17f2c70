/*
 * smm.c - the SMRAM state-save map, as KVM lays it out (arch/x86/kvm/smm.h):
 * 512 bytes at SMBASE + 0xFE00 in the SMM address space, AMD64-based for
 * guests whose CPUID has long mode, P6-based (32-bit) for the others.
 *
 * The first half converts between the map and the vCPU's register blocks
 * (offsets are from the start of the map, SMBASE + 0xFE00: the layout is
 * declared by the offsets of save64/load64 and save32/load32).  The second
 * half is SMM entry (KVM's enter_smm) and RSM (emulator_leave_smm):
 *
 *   RUNNING --SMI pending, not in SMM--> map saved, SMM (address space 1)
 *   SMM --RSM--> map loaded, RUNNING   (a state RSM cannot enter: SHUTDOWN)
 *
 * Locking: none; it runs in the vCPU's thread (kvmfs_smram_* are pure).
 */
#include <string.h>

#include "vcpu_internal.h"

#define SMRAM_MAP_OFFSET 0xfe00       /* the map, from SMBASE */
#define SMM_HANDLER_RIP 0x8000        /* the handler's entry, from SMBASE */
#define SMM_AS_ID 1                   /* SMRAM is in the SMM address space */
#define SMM_REVISION_64 0x00020064    /* revision ids KVM writes */
#define SMM_REVISION_32 0x00020000

/* kvm_regs order -> the architectural order KVM uses (RAX RCX RDX RBX RSP RBP RSI RDI R8..) */
static uint64_t *gpr(struct kvm_regs *r, int i)
{
	uint64_t *by_kvm_regs = &r->rax;   /* rax rbx rcx rdx rsi rdi rsp rbp r8.. */
	static const int arch_to_regs[8] = { 0, 2, 3, 1, 6, 7, 4, 5 };
	return &by_kvm_regs[i < 8 ? arch_to_regs[i] : i];
}

#define PUT(type, map, off, val) (*(type *)((map) + (off)) = (type)(val))
#define GET(type, map, off) (*(const type *)((map) + (off)))

/* Descriptor attribute bits as KVM stores them (enter_smm_get_segment_flags). */
static uint32_t seg_flags(const struct kvm_segment *s)
{
	return (uint32_t)s->g << 23 | (uint32_t)s->db << 22 | (uint32_t)s->l << 21 |
	       (uint32_t)s->avl << 20 | (uint32_t)s->present << 15 | (uint32_t)(s->dpl & 3) << 13 |
	       (uint32_t)s->s << 12 | (uint32_t)(s->type & 15) << 8;
}

static void set_seg_flags(struct kvm_segment *s, uint32_t f)
{
	s->g = (f >> 23) & 1;
	s->db = (f >> 22) & 1;
	s->l = (f >> 21) & 1;
	s->avl = (f >> 20) & 1;
	s->present = (f >> 15) & 1;
	s->dpl = (f >> 13) & 3;
	s->s = (f >> 12) & 1;
	s->type = (f >> 8) & 15;
	s->unusable = !s->present;
	s->padding = 0;
}

/* es cs ss ds fs gs: KVM's VCPU_SREG_* order, which both maps follow */
static struct kvm_segment *sreg(struct kvm_sregs *s, int n)
{
	struct kvm_segment *order[6] = { &s->es, &s->cs, &s->ss, &s->ds, &s->fs, &s->gs };
	return order[n];
}

/* --------------------------------------------------------------- 64-bit -- */

static void seg64_put(uint8_t *m, int off, const struct kvm_segment *s)
{
	PUT(uint16_t, m, off, s->selector);
	PUT(uint16_t, m, off + 2, seg_flags(s) >> 8);
	PUT(uint32_t, m, off + 4, s->limit);
	PUT(uint64_t, m, off + 8, s->base);
}

static void seg64_get(const uint8_t *m, int off, struct kvm_segment *s)
{
	memset(s, 0, sizeof(*s));
	s->selector = GET(uint16_t, m, off);
	set_seg_flags(s, (uint32_t)GET(uint16_t, m, off + 2) << 8);
	s->limit = GET(uint32_t, m, off + 4);
	s->base = GET(uint64_t, m, off + 8);
}

static void save64(uint8_t *m, const struct kvmfs_smm_state *st)
{
	struct kvm_regs r = st->regs;
	struct kvm_sregs s = st->sregs;

	for (int i = 0; i < 16; i++)
		PUT(uint64_t, m, 0x1f8 - i * 8, *gpr(&r, i));   /* R15 first ... RAX last */
	PUT(uint64_t, m, 0x178, r.rip);
	PUT(uint32_t, m, 0x170, r.rflags);
	PUT(uint64_t, m, 0x168, st->dr6);
	PUT(uint64_t, m, 0x160, st->dr7);
	PUT(uint64_t, m, 0x158, s.cr0);
	PUT(uint64_t, m, 0x150, s.cr3);
	PUT(uint64_t, m, 0x148, s.cr4);
	PUT(uint32_t, m, 0x100, st->smbase);
	PUT(uint32_t, m, 0x0fc, SMM_REVISION_64);
	PUT(uint64_t, m, 0x0d0, s.efer);
	PUT(uint8_t, m, 0x0cb, st->int_shadow);
	seg64_put(m, 0x090, &s.tr);
	PUT(uint32_t, m, 0x084, s.idt.limit);
	PUT(uint64_t, m, 0x088, s.idt.base);
	seg64_put(m, 0x070, &s.ldt);
	PUT(uint32_t, m, 0x064, s.gdt.limit);
	PUT(uint64_t, m, 0x068, s.gdt.base);
	for (int n = 0; n < 6; n++)
		seg64_put(m, n * 16, sreg(&s, n));
}

static void load64(const uint8_t *m, struct kvmfs_smm_state *st)
{
	struct kvm_sregs *s = &st->sregs;

	for (int i = 0; i < 16; i++)
		*gpr(&st->regs, i) = GET(uint64_t, m, 0x1f8 - i * 8);
	st->regs.rip = GET(uint64_t, m, 0x178);
	st->regs.rflags = GET(uint32_t, m, 0x170) | X86_RFLAGS_FIXED;
	st->dr6 = GET(uint64_t, m, 0x168);
	st->dr7 = GET(uint64_t, m, 0x160);
	s->cr0 = GET(uint64_t, m, 0x158);
	s->cr3 = GET(uint64_t, m, 0x150);
	s->cr4 = GET(uint64_t, m, 0x148);
	st->smbase = GET(uint32_t, m, 0x100);
	s->efer = GET(uint64_t, m, 0x0d0);
	st->int_shadow = GET(uint8_t, m, 0x0cb);
	seg64_get(m, 0x090, &s->tr);
	s->idt.limit = GET(uint32_t, m, 0x084);
	s->idt.base = GET(uint64_t, m, 0x088);
	seg64_get(m, 0x070, &s->ldt);
	s->gdt.limit = GET(uint32_t, m, 0x064);
	s->gdt.base = GET(uint64_t, m, 0x068);
	for (int n = 0; n < 6; n++)
		seg64_get(m, n * 16, sreg(s, n));
}

/* --------------------------------------------------------------- 32-bit -- */

/* where a segment's flags, limit and base sit (ldtr and tr have their own) */
static int seg32_off(int n) { return n < 3 ? 0x184 + n * 12 : 0x12c + (n - 3) * 12; }

static void seg32_put(uint8_t *m, int off, int sel_off, const struct kvm_segment *s)
{
	PUT(uint32_t, m, sel_off, s->selector);
	PUT(uint32_t, m, off, seg_flags(s));
	PUT(uint32_t, m, off + 4, s->limit);
	PUT(uint32_t, m, off + 8, s->base);
}

static void seg32_get(const uint8_t *m, int off, int sel_off, struct kvm_segment *s)
{
	memset(s, 0, sizeof(*s));
	s->selector = GET(uint32_t, m, sel_off);
	set_seg_flags(s, GET(uint32_t, m, off));
	s->limit = GET(uint32_t, m, off + 4);
	s->base = GET(uint32_t, m, off + 8);
}

static void save32(uint8_t *m, const struct kvmfs_smm_state *st)
{
	struct kvm_regs r = st->regs;
	struct kvm_sregs s = st->sregs;

	PUT(uint32_t, m, 0x1fc, s.cr0);
	PUT(uint32_t, m, 0x1f8, s.cr3);
	PUT(uint32_t, m, 0x1f4, r.rflags);
	PUT(uint32_t, m, 0x1f0, r.rip);
	for (int i = 0; i < 8; i++)
		PUT(uint32_t, m, 0x1d0 + i * 4, *gpr(&r, i));
	PUT(uint32_t, m, 0x1cc, st->dr6);
	PUT(uint32_t, m, 0x1c8, st->dr7);
	seg32_put(m, 0x15c, 0x1c4, &s.tr);
	seg32_put(m, 0x178, 0x1c0, &s.ldt);
	PUT(uint32_t, m, 0x174, s.gdt.base);
	PUT(uint32_t, m, 0x170, s.gdt.limit);
	PUT(uint32_t, m, 0x158, s.idt.base);
	PUT(uint32_t, m, 0x154, s.idt.limit);
	for (int n = 0; n < 6; n++)
		seg32_put(m, seg32_off(n), 0x1a8 + n * 4, sreg(&s, n));
	PUT(uint32_t, m, 0x114, s.cr4);
	PUT(uint8_t, m, 0x11a, st->int_shadow);
	PUT(uint32_t, m, 0x0fc, SMM_REVISION_32);
	PUT(uint32_t, m, 0x0f8, st->smbase);
}

static void load32(const uint8_t *m, struct kvmfs_smm_state *st)
{
	struct kvm_sregs *s = &st->sregs;

	s->cr0 = GET(uint32_t, m, 0x1fc);
	s->cr3 = GET(uint32_t, m, 0x1f8);
	st->regs.rflags = GET(uint32_t, m, 0x1f4) | X86_RFLAGS_FIXED;
	st->regs.rip = GET(uint32_t, m, 0x1f0);
	for (int i = 0; i < 8; i++)
		*gpr(&st->regs, i) = GET(uint32_t, m, 0x1d0 + i * 4);
	st->dr6 = GET(uint32_t, m, 0x1cc);
	st->dr7 = GET(uint32_t, m, 0x1c8);
	seg32_get(m, 0x15c, 0x1c4, &s->tr);
	seg32_get(m, 0x178, 0x1c0, &s->ldt);
	s->gdt.base = GET(uint32_t, m, 0x174);
	s->gdt.limit = GET(uint32_t, m, 0x170);
	s->idt.base = GET(uint32_t, m, 0x158);
	s->idt.limit = GET(uint32_t, m, 0x154);
	for (int n = 0; n < 6; n++)
		seg32_get(m, seg32_off(n), 0x1a8 + n * 4, sreg(s, n));
	s->cr4 = GET(uint32_t, m, 0x114);
	st->int_shadow = GET(uint8_t, m, 0x11a);
	st->smbase = GET(uint32_t, m, 0x0f8);
	/* EFER is not in the 32-bit map: it stays */
}

KVMFS_API void kvmfs_smram_save(uint8_t *map, const struct kvmfs_smm_state *st, int lm)
{
	memset(map, 0, KVMFS_SMRAM_MAP_SIZE);
	if (lm)
		save64(map, st);
	else
		save32(map, st);
}

/* Only the fields the map holds are written (registers, control and
 * descriptor-table state, segments, DR6/DR7, SMBASE); the rest of *st stays. */
KVMFS_API void kvmfs_smram_load(const uint8_t *map, struct kvmfs_smm_state *st, int lm)
{
	if (lm)
		load64(map, st);
	else
		load32(map, st);
}

/* ------------------------------------------------------- entry and RSM -- */

static void smm_state_now(kvmfs_vcpu *v, struct kvmfs_smm_state *st)
{
	memset(st, 0, sizeof(*st));
	kvmfs_vcpu_get_regs(v, &st->regs);
	kvmfs_vcpu_get_sregs(v, &st->sregs);
	st->dr6 = rreg(v, UC_X86_REG_DR6);
	st->dr7 = rreg(v, UC_X86_REG_DR7);
	st->smbase = v->smbase;
	st->int_shadow = 0;               /* the shadow is not tracked across exits */
}

/*
 * Take a pending SMI (KVM's enter_smm): save the state to SMRAM in address
 * space 1, then start the handler at SMBASE:0x8000 in big real mode.  The map
 * is written before anything changes, so a NEED_HVA retry starts over.  A map
 * with nowhere to go kills the VM, as in KVM.
 */
int enter_smm(kvmfs_vcpu *v)
{
	struct kvmfs_smm_state st;
	uint8_t map[KVMFS_SMRAM_MAP_SIZE];
	struct kvmfs_xlate xl;
	bool lm = guest_has_lm(v);

	smm_state_now(v, &st);
	kvmfs_smram_save(map, &st, lm);
	int k = gphys(v, SMM_AS_ID, (uint64_t)v->smbase + SMRAM_MAP_OFFSET, map, sizeof map, true, &xl);
	if (k == KVMFS_XL_NEED_HVA)
		return KVMFS_RUN_NEED_HVA;          /* miss_hva set by copy_guest */
	if (k) {
		v->miss_hva = (uint64_t)v->smbase + SMRAM_MAP_OFFSET;   /* reported by the caller */
		return KVMFS_RUN_VM_DEAD;
	}
	v->smi_pending = false;
	v->in_smm = true;
	v->stats.smis++;

	struct kvm_regs *r = &st.regs;
	struct kvm_sregs *s = &st.sregs;
	r->rflags = X86_RFLAGS_FIXED;
	r->rip = SMM_HANDLER_RIP;
	s->cr0 &= ~(X86_CR0_PE | X86_CR0_EM | X86_CR0_TS | X86_CR0_PG);
	s->cr4 = 0;
	s->idt.base = 0;
	s->idt.limit = 0;                 /* undocumented, as KVM */
	struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0,
				    .type = X86_DESC_TYPE_RW_DATA, .present = 1, .s = 1, .g = 1 };
	s->ds = s->es = s->fs = s->gs = s->ss = data;
	s->cs = data;
	s->cs.selector = (v->smbase >> 4) & 0xffff;
	s->cs.base = v->smbase;
	s->efer = lm ? 0 : s->efer & ~(X86_EFER_LME | X86_EFER_LMA);
	kvmfs_vcpu_set_sregs(v, s);
	kvmfs_vcpu_set_regs(v, r);
	wreg(v, UC_X86_REG_DR7, X86_DR7_RESET);
	return 0;
}

/*
 * RSM (KVM's emulator_leave_smm), reached as the #UD unicorn raises for RSM
 * outside its own SMM.  Returns 0, KVMFS_RUN_NEED_HVA (nothing changed; RSM
 * runs again), or 1 when the state cannot be entered: KVM then triple-faults.
 */
int leave_smm(kvmfs_vcpu *v)
{
	struct kvmfs_smm_state st;
	uint8_t map[KVMFS_SMRAM_MAP_SIZE];
	struct kvmfs_xlate xl;
	bool lm = guest_has_lm(v);

	int k = gphys(v, SMM_AS_ID, (uint64_t)v->smbase + SMRAM_MAP_OFFSET, map, sizeof map, false, &xl);
	if (k == KVMFS_XL_NEED_HVA)
		return KVMFS_RUN_NEED_HVA;          /* miss_hva set by copy_guest */
	v->in_smm = false;
	v->smm_inside_nmi = false;
	if (k)
		return 1;
	smm_state_now(v, &st);            /* what the map does not hold stays */
	kvmfs_smram_load(map, &st, lm);
	struct kvm_sregs *s = &st.sregs;
	if (lm) {
		s->efer &= ~X86_EFER_LMA;
		if ((s->efer & X86_EFER_LME) && (s->cr0 & X86_CR0_PG))
			s->efer |= X86_EFER_LMA;
	}
	v->smbase = st.smbase;
	if (kvmfs_vcpu_set_sregs(v, s))
		return 1;
	kvmfs_vcpu_set_regs(v, &st.regs);
	wreg(v, UC_X86_REG_DR6, st.dr6);
	wreg(v, UC_X86_REG_DR7, st.dr7);
	return 0;
}

/* Is the instruction at RIP an RSM (0F AA)? */
bool at_rsm(kvmfs_vcpu *v)
{
	uint8_t b[2] = { 0, 0 };
	struct kvmfs_xlate xl;
	return !gmem(v, live_pc(v), b, 2, false, &xl) && b[0] == X86_OP_2BYTE && b[1] == X86_OP2_RSM;
}

KVMFS_API int kvmfs_vcpu_smi(kvmfs_vcpu *v)
{
	v->smi_pending = true;            /* taken at the next KVM_RUN, or after RSM */
	return 0;
}
