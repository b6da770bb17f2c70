/*
 * regs.c - the register ioctls: KVM_GET/SET_REGS, SREGS (segments with their
 * hidden state, descriptor tables, control registers, EFER, APIC base, the
 * pending interrupt), FPU, MSRS, and the state of a vCPU after reset.
 *
 * Locking: none; vCPU ioctls are serialised per vCPU by the caller and never
 * run during KVM_RUN.
 */
#include <string.h>

#include "vcpu_internal.h"

#define CR4_RESERVED (~0x3f7fffull)   /* bits KVM accepts on a modern host, roughly */
#define RESET_RDX 0x600               /* KVM's kvm_vcpu_reset without a CPUID leaf 1 */

/* ----------------------------------------------------------- segments -- */

static uint32_t kseg_to_flags(const struct kvm_segment *s)
{
	return (uint32_t)(s->type & 15) << X86_DESC_TYPE_SHIFT | (s->s ? X86_DESC_S : 0) |
	       (uint32_t)(s->dpl & 3) << X86_DESC_DPL_SHIFT | (s->present ? X86_DESC_P : 0) |
	       (s->avl ? X86_DESC_AVL : 0) | (s->l ? X86_DESC_L : 0) | (s->db ? X86_DESC_B : 0) |
	       (s->g ? X86_DESC_G : 0) | (s->unusable ? DESC_UNUSABLE : 0);
}

static void flags_to_kseg(const struct segc *c, struct kvm_segment *s)
{
	memset(s, 0, sizeof(*s));
	s->base = c->base;
	s->limit = c->limit;
	s->selector = c->selector;
	s->type = (c->flags >> X86_DESC_TYPE_SHIFT) & 15;
	s->s = !!(c->flags & X86_DESC_S);
	s->dpl = (c->flags >> X86_DESC_DPL_SHIFT) & 3;
	s->present = !!(c->flags & X86_DESC_P);
	s->avl = !!(c->flags & X86_DESC_AVL);
	s->l = !!(c->flags & X86_DESC_L);
	s->db = !!(c->flags & X86_DESC_B);
	s->g = !!(c->flags & X86_DESC_G);
	s->unusable = !!(c->flags & DESC_UNUSABLE);
}

static void set_segc(struct segc *c, const struct kvm_segment *s)
{
	c->selector = s->selector;
	c->base = s->base;
	c->limit = s->limit;
	c->flags = kseg_to_flags(s);
}

/* ------------------------------------------------------------- registers -- */

static const int gpr_ids[16] = {
	UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX,
	UC_X86_REG_RSI, UC_X86_REG_RDI, UC_X86_REG_RSP, UC_X86_REG_RBP,
	UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
	UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
};

KVMFS_API int kvmfs_vcpu_get_regs(kvmfs_vcpu *v, struct kvm_regs *out)
{
	uint64_t *r = &out->rax;
	for (int i = 0; i < 16; i++)
		r[i] = rreg(v, gpr_ids[i]);
	out->rip = rreg(v, UC_X86_REG_RIP);
	out->rflags = rreg(v, UC_X86_REG_RFLAGS) | X86_RFLAGS_FIXED;
	return 0;
}

KVMFS_API int kvmfs_vcpu_set_regs(kvmfs_vcpu *v, const struct kvm_regs *in)
{
	const uint64_t *r = &in->rax;
	for (int i = 0; i < 16; i++)
		wreg(v, gpr_ids[i], r[i]);
	/* RIP and RFLAGS through the env: writing RIP through the API in
	 * real mode is fine, but RFLAGS bits like VM must not run helpers */
	env_load(v);
	*v->cx.rip = in->rip;
	*v->cx.rflags = in->rflags | X86_RFLAGS_FIXED;
	env_store(v);
	/* new register state cancels a pending IN/MMIO completion */
	v->pending = PEND_NONE;
	v->nreads = 0;
	return 0;
}

KVMFS_API int kvmfs_vcpu_get_sregs(kvmfs_vcpu *v, struct kvm_sregs *out)
{
	static const int order[6] = { R_CS, R_DS, R_ES, R_FS, R_GS, R_SS };
	struct kvm_segment *dst[6] = { &out->cs, &out->ds, &out->es, &out->fs, &out->gs, &out->ss };
	struct cpu_env *x = &v->cx;

	memset(out, 0, sizeof(*out));
	env_load(v);
	for (int i = 0; i < 6; i++)
		flags_to_kseg(&x->segs[order[i]], dst[i]);
	flags_to_kseg(x->tr, &out->tr);
	flags_to_kseg(x->ldt, &out->ldt);
	out->gdt.base = x->gdt->base;
	out->gdt.limit = x->gdt->limit;
	out->idt.base = x->idt->base;
	out->idt.limit = x->idt->limit;
	out->cr0 = x->cr[0];
	out->cr2 = x->cr[2];
	out->cr3 = x->cr[3];
	out->cr4 = x->cr[4];
	out->cr8 = v->cr8;
	out->efer = *x->efer;
	out->apic_base = v->apic_base;
	if (v->irq_pending)
		out->interrupt_bitmap[v->irq / 64] = 1ull << (v->irq % 64);
	return 0;
}

KVMFS_API int kvmfs_vcpu_set_sregs(kvmfs_vcpu *v, const struct kvm_sregs *in)
{
	uint64_t cr0 = in->cr0, cr4 = in->cr4, efer = in->efer;
	struct cpu_env *x = &v->cx;

	/* spec 10.1: reject inconsistent control state */
	if ((cr0 & X86_CR0_PG) && !(cr0 & X86_CR0_PE))
		return -EINVAL;
	if (cr0 >> 32)
		return -EINVAL;
	if (cr4 & CR4_RESERVED)
		return -EINVAL;
	if ((efer & X86_EFER_LME) && (cr0 & X86_CR0_PG)) {
		if (!(cr4 & X86_CR4_PAE) || !(efer & X86_EFER_LMA))
			return -EINVAL;
	} else {
		if ((efer & X86_EFER_LMA) || in->cs.l)
			return -EINVAL;
	}

	env_load(v);
	set_segc(&x->segs[R_CS], &in->cs);
	set_segc(&x->segs[R_DS], &in->ds);
	set_segc(&x->segs[R_ES], &in->es);
	set_segc(&x->segs[R_FS], &in->fs);
	set_segc(&x->segs[R_GS], &in->gs);
	set_segc(&x->segs[R_SS], &in->ss);
	set_segc(x->tr, &in->tr);
	set_segc(x->ldt, &in->ldt);
	x->gdt->base = in->gdt.base;
	x->gdt->limit = in->gdt.limit;
	x->idt->base = in->idt.base;
	x->idt->limit = in->idt.limit;
	x->cr[0] = cr0;
	x->cr[2] = in->cr2;
	x->cr[3] = in->cr3;
	x->cr[4] = cr4;
	*x->efer = efer;
	env_store(v);
	v->cr8 = in->cr8 & X86_CR8_MAX;
	v->apic_base = in->apic_base;
	v->irq_pending = false;
	for (int i = 0; i < X86_NR_VECTORS; i++) {
		if (in->interrupt_bitmap[i / 64] & (1ull << (i % 64))) {
			v->irq_pending = true;
			v->irq = i;
			break;
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ FPU -- */

KVMFS_API int kvmfs_vcpu_get_fpu(kvmfs_vcpu *v, struct kvm_fpu *out)
{
	memset(out, 0, sizeof(*out));
	for (int i = 0; i < 8; i++) {
		uint8_t f[16] = { 0 };   /* 80-bit: mantissa then exponent */
		uc_reg_read(v->uc, UC_X86_REG_FP0 + i, f);
		memcpy(out->fpr[i], f, 10);
	}
	out->fcw = rreg(v, UC_X86_REG_FPCW);
	out->fsw = rreg(v, UC_X86_REG_FPSW);
	out->ftwx = rreg(v, UC_X86_REG_FPTAG);
	out->mxcsr = rreg(v, UC_X86_REG_MXCSR);
	for (int i = 0; i < 16; i++)
		uc_reg_read(v->uc, UC_X86_REG_XMM0 + i, out->xmm[i]);
	return 0;
}

KVMFS_API int kvmfs_vcpu_set_fpu(kvmfs_vcpu *v, const struct kvm_fpu *in)
{
	for (int i = 0; i < 8; i++) {
		uint8_t f[16] = { 0 };
		memcpy(f, in->fpr[i], 10);
		uc_reg_write(v->uc, UC_X86_REG_FP0 + i, f);
	}
	wreg(v, UC_X86_REG_FPCW, in->fcw);
	wreg(v, UC_X86_REG_FPSW, in->fsw);
	wreg(v, UC_X86_REG_FPTAG, in->ftwx);
	wreg(v, UC_X86_REG_MXCSR, in->mxcsr);
	for (int i = 0; i < 16; i++)
		uc_reg_write(v->uc, UC_X86_REG_XMM0 + i, in->xmm[i]);
	return 0;
}

/* ----------------------------------------------------------------- MSRs -- */

static bool msr_known(uint32_t idx)
{
	switch (idx) {
	case MSR_IA32_TSC: case MSR_IA32_APICBASE: case MSR_IA32_SYSENTER_CS:
	case MSR_IA32_SYSENTER_ESP: case MSR_IA32_SYSENTER_EIP: case MSR_IA32_CR_PAT:
	case MSR_EFER: case MSR_STAR: case MSR_LSTAR: case MSR_CSTAR:
	case MSR_SYSCALL_MASK: case MSR_FS_BASE: case MSR_GS_BASE: case MSR_KERNEL_GS_BASE:
	case MSR_IA32_SMBASE:             /* host accesses only */
		return true;
	}
	return false;
}

/* KVM's msr_io refuses nmsrs >= 256 (its MAX_IO_MSRS) before touching an entry. */
KVMFS_API int kvmfs_vcpu_get_msrs(kvmfs_vcpu *v, struct kvm_msr_entry *e, uint32_t n)
{
	if (n >= KVM_MAX_MSR_ENTRIES)
		return -E2BIG;
	for (uint32_t i = 0; i < n; i++) {
		if (!msr_known(e[i].index))
			return i;
		if (e[i].index == MSR_IA32_APICBASE) {
			e[i].data = v->apic_base;
		} else if (e[i].index == MSR_IA32_SMBASE) {
			e[i].data = v->smbase;
		} else if (e[i].index == MSR_EFER) {
			env_load(v);
			e[i].data = *v->cx.efer;
		} else {
			uc_x86_msr m = { e[i].index, 0 };
			if (uc_reg_read(v->uc, UC_X86_REG_MSR, &m))
				return i;
			e[i].data = m.value;
		}
	}
	return n;
}

KVMFS_API int kvmfs_vcpu_set_msrs(kvmfs_vcpu *v, const struct kvm_msr_entry *e, uint32_t n)
{
	if (n >= KVM_MAX_MSR_ENTRIES)
		return -E2BIG;
	for (uint32_t i = 0; i < n; i++) {
		if (!msr_known(e[i].index))
			return i;
		if (e[i].index == MSR_IA32_APICBASE) {
			v->apic_base = e[i].data;
		} else if (e[i].index == MSR_IA32_SMBASE) {
			v->smbase = e[i].data;
		} else if (e[i].index == MSR_EFER) {
			env_load(v);
			*v->cx.efer = e[i].data;
			env_store(v);
		} else {
			uc_x86_msr m = { e[i].index, e[i].data };
			if (uc_reg_write(v->uc, UC_X86_REG_MSR, &m))
				return i;
		}
	}
	return n;
}

/* ---------------------------------------------------------------- reset -- */

void reset_state(kvmfs_vcpu *v)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	memset(&r, 0, sizeof r);
	r.rip = X86_RESET_RIP;
	r.rflags = X86_RFLAGS_FIXED;
	r.rdx = RESET_RDX;
	memset(&s, 0, sizeof s);
	struct kvm_segment data = { .base = 0, .limit = X86_RESET_LIMIT, .selector = 0,
				    .type = X86_DESC_TYPE_RW_DATA, .present = 1, .s = 1 };
	s.cs = data;
	s.cs.selector = X86_RESET_CS_SELECTOR;
	s.cs.base = X86_RESET_CS_BASE;
	s.cs.type = X86_DESC_TYPE_RX_CODE;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.tr = (struct kvm_segment){ .limit = X86_RESET_LIMIT, .type = X86_DESC_TYPE_TSS_BUSY,
				     .present = 1 };
	s.ldt = (struct kvm_segment){ .limit = X86_RESET_LIMIT, .type = X86_DESC_TYPE_LDT,
				      .present = 1 };
	s.gdt.limit = X86_RESET_LIMIT;
	s.idt.limit = X86_RESET_LIMIT;
	s.cr0 = X86_RESET_CR0;
	s.apic_base = v->apic_base;
	kvmfs_vcpu_set_sregs(v, &s);
	kvmfs_vcpu_set_regs(v, &r);
}
