/*
 * engine.c - the only file that knows unicorn's and QEMU's internals: where
 * the CPU state lives inside a uc_context and inside the engine, the hflags
 * QEMU derives from it, the segment caches, leaving an IO hook through
 * cpu_loop_exit, and opening the two engines of a vCPU.  Everything else
 * reaches the CPU state through struct cpu_env (vcpu_internal.h).
 *
 * Locking: none; it runs in the vCPU's thread (see vcpu_internal.h).
 *
 * What unicorn does and does not do (measured with unicorn 2.1.4, see
 * tests/t3_vcpu.py and the notes below):
 *  - Every vCPU has two engines sharing one register state: the fast engine
 *    runs the guest with no per-instruction hook; the step engine has a code
 *    hook and runs the few instructions that must stop after exactly one
 *    (MMIO replay, KVM_SET_GUEST_DEBUG single-step, waiting for IF to open).
 *    The state moves between them by context copy (~0.2 us).
 *  - uc_emu_stop() from an IN/OUT hook would only take effect at the end of
 *    the translation block.  unicorn puts RIP and the lazy flags on the
 *    instruction before calling an IO hook, so the hook stops precisely by
 *    leaving through QEMU's cpu_loop_exit(): the IO instruction has not run.
 *  - unicorn checks the stop request after every guest memory access and, if
 *    set, restarts the instruction: a stop from another thread landing
 *    between the load and the store of `inc [m]` ran it twice.  The fast
 *    engine has that check turned off (uc->no_exit_request, located and
 *    verified at creation), so a stop from another thread or a signal
 *    handler takes effect at the next block start, where state is exact.
 *  - A TLB-fill hook that returns false raises an exception whose state is
 *    restored to the start of the faulting instruction (UC_ERR_EXCEPTION):
 *    page faults, MMIO, NEED_HVA and EFAULT all use it.
 *  - HLT ends uc_emu_start with UC_ERR_OK and RIP after the HLT.
 *  - Interrupts and exceptions are not delivered through the guest's IVT/IDT:
 *    UC_HOOK_INTR reports the vector (RIP = faulting instruction, or the next
 *    one for INT n) and #UD ends the run with UC_ERR_INSN_INVALID.  Delivery
 *    is done in events.c.
 *  - Segment hidden state (base/limit/flags of CS..GS, hflags) is not exposed
 *    by the API; a uc_context holds a copy of QEMU's CPUX86State at a fixed
 *    offset, so sregs and event delivery edit that copy and restore it.  The
 *    offsets are checked against marker values when the vCPU is created.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>

#include "vcpu_internal.h"

/* QEMU's CPUX86State, as unicorn 2.1.4 builds it */
#define ENV_OFF 40                    /* CPUX86State inside a uc_context */
#define E_RIP 128
#define E_RFLAGS 136
#define E_CC_SRC 152
#define E_CC_OP 168
#define E_DF 172
#define E_HFLAGS 176
#define E_SEGS 184                    /* es cs ss ds fs gs, 24 bytes each */
#define E_LDT 328
#define E_TR 352
#define E_GDT 376
#define E_IDT 400
#define E_CR 424                      /* cr[0..4], 8 bytes each */
#define E_EFER 592
#define E_ERROR_CODE 5384             /* error code of the exception being raised */
#define E_OLD_EXCEPTION 5496          /* exception in flight (QEMU's #DF promotion) */
#define CC_OP_EFLAGS 1                /* QEMU: the flags are all in CC_SRC */

/* QEMU's hflags */
#define HF_CPL_MASK 3u
#define HF_INHIBIT_IRQ (1u << 3)
#define HF_CS32 (1u << 4)
#define HF_SS32 (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_PE (1u << 7)
#define HF_MP_EM_TS_SHIFT 9           /* CR0.MP/EM/TS (bits 1-3) moved up by 8 */
#define HF_MP_EM_TS (7u << HF_MP_EM_TS_SHIFT)
#define HF_LMA (1u << 14)
#define HF_CS64 (1u << 15)
#define HF_OSFXSR (1u << 22)

/* unicorn 2.1.4 internals, verified at vCPU creation (engine_check) */
#define UC_CPU_OFF 440                /* uc_struct.cpu */
#define CPU_UC_OFF 33192              /* CPUState.uc */
#define CPU_ENV_OFF 35408             /* CPUX86State inside X86CPU */
#define UC_CTXCONT_OFF 2012           /* uc_struct.context_content, cpu_context_size */
#define UC_NOEXIT_OFF 2034            /* uc_struct.no_exit_request (init_done follows) */

extern void cpu_loop_exit_x86_64(void *cpu) __attribute__((noreturn));

/*
 * Translation buffers.  unicorn maps 1 GiB per engine by default and asks for
 * transparent huge pages on it, so the first translated block (the TCG
 * prologue, written at engine init) commits a 2 MiB page: 4 MiB per vCPU
 * for a guest that runs a few hundred bytes of code, most of a 32-vCPU VM's
 * memory.  The step engine runs single instructions (the minimum buffer is
 * plenty); the fast engine gets QEMU's 32-bit-host default (a full buffer is
 * flushed and refilled, it does not fail).  Both are kept on small pages:
 * huge pages are off for the process while an engine initialises (the
 * prologue's fault) and MADV_NOHUGEPAGE afterwards (later faults, and
 * khugepaged, which would collapse the range back).
 */
#define STEP_TB_BUFFER (1u << 20)
#define FAST_TB_BUFFER (32u << 20)

static pthread_mutex_t thp_lock = PTHREAD_MUTEX_INITIALIZER;
static int thp_off_users, thp_was_off;

/* Huge pages off for the process from here to thp_restore (nests across threads). */
static void thp_suspend(void)
{
	pthread_mutex_lock(&thp_lock);
	if (!thp_off_users++) {
		thp_was_off = prctl(PR_GET_THP_DISABLE, 0, 0, 0, 0) == 1;
		if (!thp_was_off)
			prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0);
	}
	pthread_mutex_unlock(&thp_lock);
}

static void thp_restore(void)
{
	pthread_mutex_lock(&thp_lock);
	if (!--thp_off_users && !thp_was_off)
		prctl(PR_SET_THP_DISABLE, 0, 0, 0, 0);
	pthread_mutex_unlock(&thp_lock);
}

/* MADV_NOHUGEPAGE on every translation buffer of this size: the private
 * anonymous rwx mappings of exactly that length (unicorn's; idempotent for
 * another engine's). */
static void tb_buffer_small_pages(uint32_t size)
{
	FILE *f = fopen("/proc/self/maps", "re");
	char line[256];

	if (!f)
		return;
	while (fgets(line, sizeof line, f)) {
		unsigned long lo, hi, off;
		char perms[8];
		unsigned int dmaj, dmin;
		unsigned long ino;
		if (sscanf(line, "%lx-%lx %7s %lx %x:%x %lu", &lo, &hi, perms, &off, &dmaj, &dmin,
			   &ino) == 7 && !strcmp(perms, "rwxp") && !ino && hi - lo == size)
			madvise((void *)lo, size, MADV_NOHUGEPAGE);
	}
	fclose(f);
}

static void env_view(struct cpu_env *e, uint8_t *base)
{
	e->regs = (uint64_t *)base;
	e->rip = (uint64_t *)(base + E_RIP);
	e->rflags = (uint64_t *)(base + E_RFLAGS);
	e->df = (int32_t *)(base + E_DF);
	e->segs = (struct segc *)(base + E_SEGS);
	e->ldt = (struct segc *)(base + E_LDT);
	e->tr = (struct segc *)(base + E_TR);
	e->gdt = (struct segc *)(base + E_GDT);
	e->idt = (struct segc *)(base + E_IDT);
	e->cr = (uint64_t *)(base + E_CR);
	e->efer = (uint64_t *)(base + E_EFER);
	e->hflags = (uint32_t *)(base + E_HFLAGS);
	e->cc_src = (uint64_t *)(base + E_CC_SRC);
	e->cc_op = (uint32_t *)(base + E_CC_OP);
	e->error_code = (uint32_t *)(base + E_ERROR_CODE);
	e->old_exception = (int32_t *)(base + E_OLD_EXCEPTION);
}

int env_cpl(const struct cpu_env *e) { return *e->hflags & HF_CPL_MASK; }

int env_code_bits(const struct cpu_env *e)
{
	uint32_t hf = *e->hflags;
	return (hf & HF_CS64) ? 64 : (hf & HF_CS32) ? 32 : 16;
}

bool env_irq_shadow(const struct cpu_env *e) { return *e->hflags & HF_INHIBIT_IRQ; }

void env_set_irq_shadow(struct cpu_env *e, bool on)
{
	*e->hflags = (*e->hflags & ~HF_INHIBIT_IRQ) | (on ? HF_INHIBIT_IRQ : 0);
}

/* The exception QEMU was raising is delivered (by events.c): nothing is in
 * flight any more, else the next contributory fault turns into #DF. */
void env_exception_taken(struct cpu_env *e) { *e->old_exception = -1; }

/* The env copy's eflags holds the full RFLAGS (QEMU keeps the arithmetic
 * flags lazily in CC_SRC/CC_OP and DF in df; env_store folds them back). */
void env_load(kvmfs_vcpu *v)
{
	uint64_t fl = rreg(v, UC_X86_REG_RFLAGS);
	uc_context_save(v->uc, v->ctx);
	*v->cx.rflags = fl | X86_RFLAGS_FIXED;
}

/* Recompute the hflags QEMU derives from segments and control registers. */
static void env_fix_hflags(kvmfs_vcpu *v)
{
	struct cpu_env *x = &v->cx;
	uint32_t hf = *x->hflags;
	uint64_t cr0 = x->cr[0], cr4 = x->cr[4], efer = *x->efer;
	uint64_t rfl = *x->rflags;
	struct segc *cs = &x->segs[R_CS], *ss = &x->segs[R_SS];

	hf &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP_EM_TS | HF_LMA |
		HF_CS64 | HF_OSFXSR);
	if (cr0 & X86_CR0_PE)
		hf |= HF_PE;
	hf |= (uint32_t)(cr0 << (HF_MP_EM_TS_SHIFT - 1)) & HF_MP_EM_TS;
	if (cr4 & X86_CR4_OSFXSR)
		hf |= HF_OSFXSR;
	if (efer & X86_EFER_LMA)
		hf |= HF_LMA;
	if ((cr0 & X86_CR0_PE) && !(rfl & X86_RFLAGS_VM))
		hf |= (ss->flags >> X86_DESC_DPL_SHIFT) & 3;
	else if (rfl & X86_RFLAGS_VM)
		hf |= 3;
	if ((efer & X86_EFER_LMA) && (cs->flags & X86_DESC_L)) {
		hf |= HF_CS32 | HF_SS32 | HF_CS64;
	} else {
		if (cs->flags & X86_DESC_B)
			hf |= HF_CS32;
		if (ss->flags & X86_DESC_B)
			hf |= HF_SS32;
	}
	if (!(hf & HF_CS64)) {
		if (!(cr0 & X86_CR0_PE) || (rfl & X86_RFLAGS_VM) || !(hf & HF_CS32))
			hf |= HF_ADDSEG;
		else if (x->segs[R_DS].base | x->segs[R_ES].base | ss->base)
			hf |= HF_ADDSEG;
	}
	*x->hflags = hf;
}

void env_store(kvmfs_vcpu *v)
{
	uint64_t fl = *v->cx.rflags;
	*v->cx.cc_src = fl & X86_RFLAGS_ARITH;
	*v->cx.cc_op = CC_OP_EFLAGS;
	*v->cx.df = (fl & X86_RFLAGS_DF) ? -1 : 1;
	env_fix_hflags(v);
	uc_context_restore(v->uc, v->ctx);
	uc_ctl_flush_tlb(v->uc);
}

/*
 * Check that the offsets above match the loaded library: the env copy in a
 * context and the live CPU state must show marker register values, the
 * CPUState must point back at the engine, and the context-size field must sit
 * just before no_exit_request.  A mismatch fails vCPU creation (ENOSYS).
 */
static int engine_check(kvmfs_vcpu *v, struct engine *e)
{
	uint64_t m1 = 0x1122334455667788ull, m2 = 0x2132435465768798ull;
	uc_x86_mmr g = { 0, 0x3142536475869700ull, 0x1234, 0 };
	uint8_t *u = (uint8_t *)e->uc;
	struct cpu_env live;

	v->uc = e->uc;
	wreg(v, UC_X86_REG_RAX, m1);
	wreg(v, UC_X86_REG_FS_BASE, m2);
	uc_reg_write(v->uc, UC_X86_REG_GDTR, &g);
	env_load(v);
	if (v->cx.regs[GPR_RAX] != m1 || v->cx.segs[R_FS].base != m2 || v->cx.gdt->base != g.base)
		return -ENOSYS;
	uint8_t *cpu = *(uint8_t **)(u + UC_CPU_OFF);
	if (!cpu || *(uint8_t **)(cpu + CPU_UC_OFF) != u)
		return -ENOSYS;
	env_view(&live, cpu + CPU_ENV_OFF);
	if (live.regs[GPR_RAX] != m1 || live.segs[R_FS].base != m2 || live.gdt->base != g.base)
		return -ENOSYS;
	if (*(int *)(u + UC_CTXCONT_OFF) != UC_CTL_CONTEXT_CPU ||
	    *(int *)(u + UC_CTXCONT_OFF + 4) != (int)*(size_t *)v->ctx ||
	    u[UC_NOEXIT_OFF] > 1 || u[UC_NOEXIT_OFF + 1] != 1)
		return -ENOSYS;
	e->cpu = cpu;
	e->env = live;
	wreg(v, UC_X86_REG_RAX, 0);
	return 0;
}

static int engine_init(kvmfs_vcpu *v, int idx, uint32_t tb_size);

/* Open engine idx of v with its hooks, checked against the offsets above. */
int engine_open(kvmfs_vcpu *v, int idx)
{
	uint32_t tb_size = idx == ENG_STEP ? STEP_TB_BUFFER : FAST_TB_BUFFER;
	int rc;

	thp_suspend();
	rc = engine_init(v, idx, tb_size);
	thp_restore();
	if (!rc)
		tb_buffer_small_pages(tb_size);
	return rc;
}

static int engine_init(kvmfs_vcpu *v, int idx, uint32_t tb_size)
{
	struct engine *e = &v->eng[idx];
	uc_hook h;

	if (uc_open(UC_ARCH_X86, UC_MODE_64, &e->uc))
		return -ENOMEM;
	uc_ctl_set_tcg_buffer_size(e->uc, tb_size);   /* before the engine initialises */
	/* exits mode with no exits: uc_emu_start's `until` is ignored (otherwise
	 * unicorn translates the until page at the end of every run, which
	 * reaches the TLB-fill hook with a bogus fetch) */
	if (uc_ctl_exits_enable(e->uc) ||
	    uc_ctl_tlb_mode(e->uc, UC_TLB_VIRTUAL) ||
	    uc_hook_add(e->uc, &h, UC_HOOK_TLB_FILL, (void *)tlb_fill, v, 1, 0) ||
	    uc_hook_add(e->uc, &h, UC_HOOK_INSN, (void *)out_hook, v, 1, 0, UC_X86_INS_OUT) ||
	    uc_hook_add(e->uc, &h, UC_HOOK_INSN, (void *)in_hook, v, 1, 0, UC_X86_INS_IN) ||
	    uc_hook_add(e->uc, &h, UC_HOOK_INSN, (void *)cpuid_hook, v, 1, 0, UC_X86_INS_CPUID) ||
	    uc_hook_add(e->uc, &h, UC_HOOK_INTR, (void *)intr_hook, v, 1, 0))
		return -ENOMEM;
	if (idx == ENG_STEP &&
	    (uc_hook_add(e->uc, &h, UC_HOOK_CODE, (void *)code_hook, v, 1, 0) ||
	     uc_hook_add(e->uc, &h, UC_HOOK_MEM_READ, (void *)mmio_read_hook, v, 1, 0) ||
	     uc_mmio_map(e->uc, WIN_BASE, WIN_PAGES * PAGE_SIZE, win_read, v, win_write, v)))
		return -ENOMEM;
	if (!v->ctx) {
		if (uc_context_alloc(e->uc, &v->ctx) || uc_context_alloc(e->uc, &v->ctx_step))
			return -ENOMEM;
		env_view(&v->cx, (uint8_t *)v->ctx + ENV_OFF);
	}
	if (engine_check(v, e))
		return -ENOSYS;
	if (idx == ENG_FAST) {
		((uint8_t *)e->uc)[UC_NOEXIT_OFF] = 1;   /* see the top of this file */
		uc_set_tcg_parallel(e->uc, 1);
	}
	return 0;
}

/* Move the register state to engine idx and make it current.  Its TLB is
 * flushed: it may hold translations from before the other engine ran. */
void use_engine(kvmfs_vcpu *v, int idx)
{
	struct engine *e = &v->eng[idx];

	if (v->cur != idx) {
		uc_context_save(v->uc, v->ctx);
		uc_context_restore(e->uc, v->ctx);
		uc_ctl_flush_tlb(e->uc);
	}
	v->cur = idx;
	v->uc = e->uc;
	v->cpu = e->cpu;
	v->live = &e->env;
}

/* Leave the engine at once from inside an IO hook: unicorn has put RIP and
 * the flags on the IO instruction, which has not run. */
void __attribute__((noreturn)) stop_here(kvmfs_vcpu *v)
{
	uc_emu_stop(v->uc);
	cpu_loop_exit_x86_64(v->cpu);
}
