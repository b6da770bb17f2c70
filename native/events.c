/*
 * events.c - exception and interrupt delivery, done in C because unicorn
 * reports vectors instead of delivering them: real-mode IVT, protected and
 * long mode IDT gates with the TSS stack switch (and IST), #DF when a
 * delivery itself faults, shutdown (triple fault) when #DF does too; plus the
 * queued events of KVM_INTERRUPT and KVM_GET/SET_VCPU_EVENTS.
 *
 *   exception --delivery faults--> #DF --delivery faults--> SHUTDOWN
 *   any delivery --IVT/IDT/GDT/stack not registered--> NEED_HVA (queued,
 *   nothing changed; delivered on the next pass after the daemon maps it)
 *
 * Locking: none; it runs in the vCPU's thread.
 */
#include <string.h>

#include "vcpu_internal.h"

static bool has_errcode(uint32_t vec)
{
	return vec == X86_VEC_DF || (vec >= X86_VEC_TS && vec <= X86_VEC_PF) ||
	       vec == X86_VEC_AC || vec == X86_VEC_CP;
}

static int push(kvmfs_vcpu *v, uint64_t *sp, uint64_t ssbase, uint64_t mask, uint64_t val, int n)
{
	struct kvmfs_xlate xl;
	*sp = (*sp - n) & mask;
	return gmem(v, ssbase + *sp, &val, n, true, &xl);
}

/* Load a segment cache from a descriptor in the GDT/LDT (protected mode). */
static int load_desc(kvmfs_vcpu *v, uint16_t sel, struct segc *c)
{
	struct segc *tab = (sel & X86_SEL_TI) ? v->cx.ldt : v->cx.gdt;
	struct kvmfs_xlate xl;
	uint32_t d[2];

	if ((sel & ~X86_SEL_RPL) == 0 || (sel | 7u) > tab->limit)
		return -1;
	if (gmem(v, tab->base + (sel & ~7u), d, 8, false, &xl))
		return -1;
	c->selector = sel;
	c->base = (d[0] >> 16) | ((d[1] & 0xff) << 16) | (d[1] & 0xff000000u);
	c->limit = (d[0] & 0xffff) | (d[1] & 0xf0000);
	if (d[1] & X86_DESC_G)
		c->limit = (c->limit << 12) | 0xfff;
	c->flags = d[1] & X86_DESC_ATTR_MASK;
	if (!(c->flags & X86_DESC_P))
		return -1;
	return 0;
}

/*
 * Deliver vector vec as the guest CPU would (env already loaded; stored back
 * on success).  ret_rip is the RIP to push (the faulting instruction for
 * faults, the next one for INT n and external interrupts).  Returns 0, or -1
 * when the delivery itself faults (the caller escalates to #DF / shutdown).
 */
static int deliver_once(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip)
{
	struct cpu_env *x = &v->cx;
	uint64_t rfl = *x->rflags | X86_RFLAGS_FIXED;
	uint64_t cr0 = x->cr[0], efer = *x->efer;
	struct segc *idt = x->idt, *cs = &x->segs[R_CS], *ss = &x->segs[R_SS];
	uint64_t *rsp = &x->regs[GPR_RSP];
	struct kvmfs_xlate xl;

	if (!(cr0 & X86_CR0_PE)) {
		uint16_t ivt[2];
		if (vec * X86_IVT_ENTRY + X86_IVT_ENTRY - 1 > idt->limit)
			return -1;
		if (gmem(v, idt->base + vec * X86_IVT_ENTRY, ivt, X86_IVT_ENTRY, false, &xl))
			return -1;
		uint64_t sp = *rsp & 0xffff;
		if (push(v, &sp, ss->base, 0xffff, rfl, 2) || push(v, &sp, ss->base, 0xffff, cs->selector, 2) ||
		    push(v, &sp, ss->base, 0xffff, ret_rip, 2))
			return -1;
		*rsp = (*rsp & ~0xffffull) | sp;
		cs->selector = ivt[1];
		cs->base = (uint64_t)ivt[1] << 4;
		*x->rip = ivt[0];
		*x->rflags = rfl & ~(X86_RFLAGS_IF | X86_RFLAGS_TF | X86_RFLAGS_AC | X86_RFLAGS_RF);
		return 0;
	}

	bool lm = efer & X86_EFER_LMA;
	uint32_t g[4] = { 0 };
	int gsz = lm ? X86_IDT_ENTRY_64 : X86_IDT_ENTRY_32;
	if (vec * gsz + gsz - 1 > idt->limit)
		return -1;
	if (gmem(v, idt->base + vec * gsz, g, gsz, false, &xl))
		return -1;
	uint32_t type = (g[1] >> X86_DESC_TYPE_SHIFT) & 0x1f;   /* type and S */
	if (!(g[1] & X86_DESC_P))
		return -1;
	bool intgate = (type & 7) == X86_GATE_INTR, trapgate = (type & 7) == X86_GATE_TRAP;
	if (!intgate && !trapgate)
		return -1;
	uint16_t sel = g[0] >> 16;
	uint64_t off = (g[0] & 0xffff) | (g[1] & 0xffff0000u);
	if (lm)
		off |= (uint64_t)g[2] << 32;
	struct segc ncs;
	if (load_desc(v, sel, &ncs))
		return -1;
	int cpl = env_cpl(x);
	int dpl = (ncs.flags >> X86_DESC_DPL_SHIFT) & 3;
	if (ncs.flags & X86_DESC_CODE_CONFORMING)   /* keep CPL */
		dpl = cpl;
	struct segc nss = *ss;
	uint64_t osp = *rsp, sp = osp;
	bool stack_switch = dpl < cpl;
	struct segc *tr = x->tr;
	if (lm) {
		int ist = g[1] & 7;
		if (stack_switch || ist) {
			uint64_t nsp;
			uint32_t o = ist ? X86_TSS64_IST1 + 8 * (ist - 1) : X86_TSS64_RSP0 + 8 * dpl;
			if (gmem(v, tr->base + o, &nsp, 8, false, &xl))
				return -1;
			sp = nsp;
		}
		if (stack_switch) {
			nss.selector = dpl;
			nss.base = 0;
			nss.limit = 0xffffffff;
			nss.flags = X86_DESC_P | X86_DESC_S | (X86_DESC_TYPE_RW_DATA << X86_DESC_TYPE_SHIFT) |
				    X86_DESC_B | X86_DESC_G | ((uint32_t)dpl << X86_DESC_DPL_SHIFT) |
				    DESC_UNUSABLE;
		}
		sp &= ~15ull;
		uint64_t m = ~0ull;
		if (push(v, &sp, 0, m, ss->selector, 8) || push(v, &sp, 0, m, osp, 8) ||
		    push(v, &sp, 0, m, rfl, 8) || push(v, &sp, 0, m, cs->selector, 8) ||
		    push(v, &sp, 0, m, ret_rip, 8) || (errc && push(v, &sp, 0, m, err, 8)))
			return -1;
	} else {
		if (stack_switch) {
			uint32_t esp0;
			uint16_t ss0;
			if (gmem(v, tr->base + X86_TSS32_ESP0 + 8 * dpl, &esp0, 4, false, &xl) ||
			    gmem(v, tr->base + X86_TSS32_SS0 + 8 * dpl, &ss0, 2, false, &xl) ||
			    load_desc(v, ss0, &nss))
				return -1;
			sp = esp0;
		}
		bool g32 = type & X86_GATE_32;
		int n = g32 ? 4 : 2;
		uint64_t m = (nss.flags & X86_DESC_B) ? 0xffffffffull : 0xffffull;
		sp &= m;
		if (stack_switch && (push(v, &sp, nss.base, m, ss->selector, n) ||
				     push(v, &sp, nss.base, m, osp, n)))
			return -1;
		if (push(v, &sp, nss.base, m, rfl, n) || push(v, &sp, nss.base, m, cs->selector, n) ||
		    push(v, &sp, nss.base, m, ret_rip, n) || (errc && push(v, &sp, nss.base, m, err, n)))
			return -1;
		if (!g32)
			off &= 0xffff;
	}
	ncs.selector = (sel & ~X86_SEL_RPL) | dpl;
	*cs = ncs;
	*ss = nss;
	*rsp = sp;
	*x->rip = off;
	rfl &= ~(X86_RFLAGS_TF | X86_RFLAGS_NT | X86_RFLAGS_RF | X86_RFLAGS_VM);
	if (intgate)
		rfl &= ~X86_RFLAGS_IF;
	*x->rflags = rfl;
	return 0;
}

/* Deliver with the double-fault / triple-fault rules: DELIVERED,
 * DELIVER_SHUTDOWN or DELIVER_NEED_HVA. */
int deliver_event(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip)
{
	v->gmem_miss = false;
	env_load(v);
	if (deliver_once(v, vec, errc, err, ret_rip) == 0) {
		env_store(v);
		return DELIVERED;
	}
	if (v->gmem_miss)
		return DELIVER_NEED_HVA;  /* the IVT/IDT, GDT or stack is not mapped yet */
	if (vec != X86_VEC_DF) {
		env_load(v);
		if (deliver_once(v, X86_VEC_DF, true, 0, ret_rip) == 0) {
			env_store(v);
			return DELIVERED;
		}
		if (v->gmem_miss)
			return DELIVER_NEED_HVA;
	}
	v->shutdown = true;
	return DELIVER_SHUTDOWN;
}

/* deliver_event's answer for a caller that stops the run: 1 with *rc set. */
int delivery_stops(kvmfs_vcpu *v, int r, int *rc)
{
	if (r == DELIVER_SHUTDOWN) {
		*rc = exit_to(v, KVM_EXIT_SHUTDOWN);
		return 1;
	}
	if (r == DELIVER_NEED_HVA) {
		*rc = KVMFS_RUN_NEED_HVA;
		return 1;
	}
	return 0;
}

/* An exception the guest raised (ret_rip: what its frame holds).  When its
 * delivery needs host memory registered first, it is queued with RIP there and
 * the next pass of KVM_RUN delivers it. */
int raise_exception(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip, int *rc)
{
	int r = deliver_event(v, vec, errc, err, ret_rip);
	if (r == DELIVER_NEED_HVA) {
		wreg(v, UC_X86_REG_RIP, ret_rip);
		v->exc_pending = true;
		v->exc_nr = vec;
		v->exc_has_err = errc;
		v->exc_err = err;
	}
	return delivery_stops(v, r, rc);
}

/* The refused fill was a guest page fault: CR2, then #PF. */
int raise_page_fault(kvmfs_vcpu *v, int *rc)
{
	wreg(v, UC_X86_REG_CR2, v->fill_vaddr);
	return raise_exception(v, X86_VEC_PF, true, v->fx.pf_error_code, rreg(v, UC_X86_REG_RIP), rc);
}

void intr_hook(uc_engine *uc, uint32_t intno, void *ud)
{
	kvmfs_vcpu *v = ud;

	if (v->why == WHY_NONE || v->why == WHY_STEP) {
		v->why = WHY_INTR;
		v->intno = intno;
		v->intr_err = *v->live->error_code;
		env_exception_taken(v->live);  /* delivered here, not by QEMU */
		v->intr_rip = rreg(v, UC_X86_REG_RIP);
	}
	uc_emu_stop(uc);
}

/* The vector intr_hook saw: a software interrupt (INT n, INT3, INTO: no
 * error code, RIP past it) or an exception. */
int raise_guest_intr(kvmfs_vcpu *v, int *rc)
{
	uint32_t vec = v->intno;
	bool soft = false;
	uint8_t b[2] = { 0, 0 };
	struct kvmfs_xlate xl;
	uint64_t csb;

	env_load(v);
	csb = v->cx.segs[R_CS].base;
	if (v->intr_rip >= 2 && !gmem(v, csb + v->intr_rip - 2, b, 2, false, &xl) &&
	    b[0] == X86_OP_INT && b[1] == vec)
		soft = true;
	if (!soft && (vec == X86_VEC_BP || vec == X86_VEC_OF) &&
	    !gmem(v, csb + v->intr_rip - 1, b, 1, false, &xl) &&
	    (b[0] == X86_OP_INT3 || b[0] == X86_OP_INTO))
		soft = true;
	return raise_exception(v, vec, !soft && has_errcode(vec), soft ? 0 : v->intr_err,
			       v->intr_rip, rc);
}

bool can_inject(kvmfs_vcpu *v)
{
	return (rreg(v, UC_X86_REG_EFLAGS) & X86_RFLAGS_IF) != 0;
}

/* ---------------------------------------------------------- vCPU ioctls -- */

KVMFS_API int kvmfs_vcpu_interrupt(kvmfs_vcpu *v, uint32_t irq)
{
	if (irq >= X86_NR_VECTORS)
		return -EINVAL;
	v->irq = irq;
	v->irq_pending = true;
	return 0;
}

KVMFS_API int kvmfs_vcpu_get_events(kvmfs_vcpu *v, struct kvm_vcpu_events *out)
{
	memset(out, 0, sizeof(*out));
	/* as KVM, the vectors stay readable after the event is gone */
	out->exception.injected = v->exc_pending;
	out->exception.nr = v->exc_nr;
	out->exception.has_error_code = v->exc_has_err;
	out->exception.error_code = v->exc_err;
	out->interrupt.injected = v->irq_pending;
	out->interrupt.nr = v->irq;
	env_load(v);
	out->interrupt.shadow = env_irq_shadow(&v->cx) ? KVM_X86_SHADOW_INT_MOV_SS : 0;
	out->smi.smm = v->in_smm;
	out->smi.pending = v->smi_pending;
	out->smi.smm_inside_nmi = v->smm_inside_nmi;
	out->flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SHADOW |
		     KVM_VCPUEVENT_VALID_SMM;
	return 0;
}

/* As KVM's kvm_vcpu_ioctl_x86_set_vcpu_events without an in-kernel LAPIC, with
 * exception payloads and triple-fault events not enabled.  NMIs are not
 * modelled: a pending or injected NMI is refused (EINVAL). */
KVMFS_API int kvmfs_vcpu_set_events(kvmfs_vcpu *v, const struct kvm_vcpu_events *in)
{
	if (in->flags & ~(KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR |
			  KVM_VCPUEVENT_VALID_SHADOW | KVM_VCPUEVENT_VALID_SMM |
			  KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT))
		return -EINVAL;
	if (in->flags & (KVM_VCPUEVENT_VALID_PAYLOAD | KVM_VCPUEVENT_VALID_TRIPLE_FAULT))
		return -EINVAL;           /* their capabilities are not enabled */
	if (in->exception.injected &&
	    (in->exception.nr > X86_VEC_LAST_EXCEPTION || in->exception.nr == X86_VEC_NMI))
		return -EINVAL;
	if (in->nmi.injected || ((in->flags & KVM_VCPUEVENT_VALID_NMI_PENDING) && in->nmi.pending))
		return -EINVAL;

	v->exc_pending = in->exception.injected;
	v->exc_nr = in->exception.nr;
	v->exc_has_err = in->exception.has_error_code;
	v->exc_err = in->exception.error_code;
	v->irq_pending = in->interrupt.injected;
	v->irq = in->interrupt.nr;
	if (in->flags & KVM_VCPUEVENT_VALID_SHADOW) {
		env_load(v);
		env_set_irq_shadow(&v->cx, in->interrupt.shadow &
				   (KVM_X86_SHADOW_INT_MOV_SS | KVM_X86_SHADOW_INT_STI));
		env_store(v);
	}
	if (in->flags & KVM_VCPUEVENT_VALID_SMM) {
		v->in_smm = in->smi.smm;
		v->smi_pending = in->smi.pending;
		v->smm_inside_nmi = in->smi.smm && in->smi.smm_inside_nmi;
		uc_ctl_flush_tlb(v->uc);  /* a different address space from the next access on */
	}
	return 0;
}
