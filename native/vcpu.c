/*
 * vcpu.c - the vCPU object and KVM_RUN: a unicorn x86-64 engine pair in
 * UC_TLB_VIRTUAL mode (engine.c), driven from C in the thread that serves
 * KVM_RUN, and the exit state machine:
 *
 *   ENTRY --immediate_exit--> pending IO completed, EXIT_INTR (-EINTR)
 *   ENTRY --shutdown seen before--> EXIT_SHUTDOWN
 *   ENTRY --IN/MMIO/OUT pending--> completed (pio.c, mmio.c) --> RUNNING
 *   RUNNING: queued exception, interrupt (IF open), SMI delivered first
 *   RUNNING --request_interrupt_window, IF open--> EXIT_IRQ_WINDOW_OPEN
 *   RUNNING --guest debug single-step--> one instruction --> EXIT_DEBUG
 *   RUNNING --OUT/IN--> EXIT_IO            (pio.c)
 *   RUNNING --fill: MMIO--> STEP --> EXIT_MMIO or RUNNING   (mmio.c)
 *   RUNNING --fill: guest #PF / vector--> delivered (events.c) --> RUNNING
 *   RUNNING --delivery of #DF faults--> EXIT_SHUTDOWN
 *   RUNNING --fill: host memory not registered--> KVMFS_RUN_NEED_HVA
 *   RUNNING --fetch from MMIO, unknown stop--> EXIT_INTERNAL_ERROR
 *   RUNNING --HLT--> EXIT_HLT
 *   RUNNING --RSM in SMM--> RUNNING (smm.c)
 *   RUNNING --kick (signal, another thread)--> EXIT_INTR (-EINTR)
 *   RUNNING --TLB flush request--> flushed, RUNNING
 *
 * Threading: kvmfs_vcpu_run runs in the caller's thread; everything else but
 * kvmfs_vcpu_kick must not run concurrently with it (Python serialises vCPU
 * ioctls per vCPU).  kick is async-signal-safe and may come from any thread;
 * so is the interrupt signal's handler (see cur_vcpu).
 * No lock of its own: `attn` and `running` are atomics; the MMU calls take
 * the VM's mmu lock inside mmu.c.
 */
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>

#include "vcpu_internal.h"

/*
 * The vCPU running in this thread, for intr_signal.  initial-exec: the module
 * is dlopen'ed, and a dlopen'ed module's TLS defaults to the dynamic model,
 * whose first access in a thread allocates the block through
 * __tls_get_addr -> malloc; from a signal handler that interrupted malloc
 * that deadlocked (__lll_lock_wait_private).  With initial-exec the variable
 * lives in the static TLS block that glibc reserves for every thread at
 * creation (its surplus for dlopen'ed initial-exec modules; dlopen fails
 * cleanly if it is full), so reading it is one %fs-relative load.
 * kvmfs_vcpu_install_intr_signal checks that this holds before installing.
 */
static __thread kvmfs_vcpu *cur_vcpu __attribute__((tls_model("initial-exec")));

/* ------------------------------------------------------------ flush client -- */

/*
 * Requests to a running vCPU (flush, kick) set a bit and, when the fast
 * engine runs, stop it: it has no mid-block stop checks, so the stop lands on
 * a block start with exact state.  The step engine is never stopped from
 * outside (its memory accesses check the stop request and would restart a
 * half-done instruction): its code hook reads the bit before each
 * instruction.  A stop that lands while uc_emu_start is still starting is
 * lost; the requesters repeat (flush every 2 ms, libfuse's interrupt every
 * second).
 */
static void request(kvmfs_vcpu *v, int bit)
{
	__atomic_or_fetch(&v->attn, bit, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&v->running, __ATOMIC_SEQ_CST) == 1 + ENG_FAST)
		uc_emu_stop(v->eng[ENG_FAST].uc);
}

static void flush_kick(void *opaque)
{
	request(opaque, ATTN_FLUSH);
}

static void do_flush(kvmfs_vcpu *v)
{
	__atomic_and_fetch(&v->attn, ~ATTN_FLUSH, __ATOMIC_SEQ_CST);
	uint64_t gen = kvmfs_mmu_flush_gen(v->mmu);
	uc_ctl_flush_tlb(v->eng[ENG_FAST].uc);
	uc_ctl_flush_tlb(v->eng[ENG_STEP].uc);
	kvmfs_mmu_ack_flush(v->mmu, &v->fc, gen);
}

/* The step engine's per-instruction hook: kicks, flushes, single-step counts
 * and the wait for IF to open (plus the one-instruction STI shadow). */
void code_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
{
	kvmfs_vcpu *v = ud;

	if (__builtin_expect(!v->attn, 1))
		return;
	int a = v->attn;
	if (a & (ATTN_KICK | ATTN_FLUSH)) {
		uc_emu_stop(uc);
		return;
	}
	if (a & ATTN_STEP) {
		if (v->step_left-- <= 0) {
			if (v->why == WHY_NONE)
				v->why = WHY_STEP;
			uc_emu_stop(uc);
			return;
		}
	}
	if (a & ATTN_WATCH_IF) {
		uint64_t fl = rreg(v, UC_X86_REG_EFLAGS);
		if (fl & X86_RFLAGS_IF) {
			if (!v->shadow) {
				v->shadow = true;   /* one more instruction: STI shadow */
			} else {
				v->why = WHY_IFOPEN;
				uc_emu_stop(uc);
			}
		}
	}
}

/* ------------------------------------------------------------- lifecycle -- */

KVMFS_API kvmfs_vcpu *kvmfs_vcpu_new(kvmfs_mmu *mmu, uint32_t id, struct kvm_run *run)
{
	kvmfs_vcpu *v = calloc(1, sizeof(*v));

	if (!v)
		return NULL;
	v->mmu = mmu;
	v->id = id;
	v->run = run;
	if (engine_open(v, ENG_STEP) || engine_open(v, ENG_FAST))
		goto fail;
	v->cur = ENG_FAST;
	use_engine(v, ENG_FAST);
	v->apic_base = X86_APIC_DEFAULT_PHYS_BASE | X86_APIC_BASE_ENABLE | X86_APIC_BASE_BSP;
	v->smbase = X86_SMBASE_DEFAULT;
	v->maxphyaddr = X86_MAXPHYADDR_DEFAULT;   /* no CPUID table yet */
	reset_state(v);
	if (run)
		run->apic_base = v->apic_base;
	v->fc.kick = flush_kick;
	v->fc.opaque = v;
	kvmfs_mmu_attach(mmu, &v->fc);
	return v;
fail:
	kvmfs_vcpu_free(v);
	return NULL;
}

KVMFS_API void kvmfs_vcpu_free(kvmfs_vcpu *v)
{
	if (!v)
		return;
	if (v->fc.attached)
		kvmfs_mmu_detach(v->mmu, &v->fc);
	if (v->ctx)
		uc_context_free(v->ctx);
	if (v->ctx_step)
		uc_context_free(v->ctx_step);
	for (int i = 0; i < 2; i++) {
		if (v->eng[i].uc)
			uc_close(v->eng[i].uc);
		for (int k = 0; k < CODE_PAGES; k++)
			free(v->eng[i].code[k].copy);
	}
	free(v->hm);
	free(v->hm_mapped);
	free(v->cpuid);
	free(v);
}

KVMFS_API uint64_t kvmfs_vcpu_miss_hva(kvmfs_vcpu *v) { return v->miss_hva; }

/* The daemon stores into kvm_run only from C, with the GIL released: the area is
 * a FUSE file's page cache (runarea.c), and a store after the kernel's writeback
 * waits for the daemon to answer that writeback. */
KVMFS_API void kvmfs_vcpu_set_exit_reason(kvmfs_vcpu *v, uint32_t reason)
{
	v->run->exit_reason = reason;
}

KVMFS_API void kvmfs_vcpu_kick(kvmfs_vcpu *v)
{
	request(v, ATTN_KICK);
}

/* Async-signal-safe: a static-TLS load, atomics and uc_emu_stop (which only
 * sets flags on an engine that exists). */
static void intr_signal(int sig)
{
	int saved = errno;
	kvmfs_vcpu *v = cur_vcpu;
	if (v)
		kvmfs_vcpu_kick(v);
	errno = saved;
}

/* Distance from the thread pointer to this thread's cur_vcpu. */
static intptr_t tls_offset(void)
{
	uintptr_t tp;

	__asm__("mov %%fs:0, %0" : "=r"(tp));   /* x86-64: the TCB points to itself */
	return (intptr_t)(tp - (uintptr_t)&cur_vcpu);
}

static void *tls_offset_thread(void *out)
{
	*(intptr_t *)out = tls_offset();
	return NULL;
}

/*
 * Is cur_vcpu in static TLS?  Static TLS sits at the same offset below the
 * thread pointer in every thread (variant II); a dynamically allocated block
 * would be somewhere on the heap, at an offset that differs per thread.  The
 * new thread has never touched the variable, as a FUSE worker thread that is
 * signalled before it ever ran a vCPU.
 */
static bool tls_is_static(void)
{
	intptr_t here = tls_offset(), there = 0;
	pthread_t t;

	if (pthread_create(&t, NULL, tls_offset_thread, &there))
		return false;
	pthread_join(t, NULL);
	return here == there && here > 0;
}

KVMFS_API int kvmfs_vcpu_install_intr_signal(int signo)
{
	struct sigaction sa;

	cur_vcpu = NULL;                  /* touched outside signal context first */
	if (!tls_is_static())
		return -ENOTSUP;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = intr_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;                  /* no SA_RESTART: interrupt the FUSE read too */
	return sigaction(signo, &sa, NULL) ? -errno : 0;
}

KVMFS_API int kvmfs_vcpu_set_guest_debug(kvmfs_vcpu *v, uint32_t control)
{
	v->debug_ctl = (control & KVM_GUESTDBG_ENABLE) ? control : 0;
	return 0;
}

KVMFS_API void kvmfs_vcpu_get_stats(kvmfs_vcpu *v, struct kvmfs_vcpu_stats *out)
{
	*out = v->stats;
}

/* -------------------------------------------------------------- the run -- */

static void fill_run_flags(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;
	uint64_t fl = rreg(v, UC_X86_REG_EFLAGS);

	run->if_flag = !!(fl & X86_RFLAGS_IF);
	run->ready_for_interrupt_injection = run->if_flag && !v->irq_pending &&
					     !(v->why == WHY_STEP && v->shadow);
	run->cr8 = v->cr8;
	run->apic_base = v->apic_base;
	run->flags = v->in_smm ? KVM_RUN_X86_SMM : 0;
}

int exit_to(kvmfs_vcpu *v, uint32_t reason)
{
	int n = sizeof(v->stats.exits) / sizeof(v->stats.exits[0]);

	v->run->exit_reason = reason;
	v->stats.exits[reason < (uint32_t)n ? reason : (uint32_t)n - 1]++;
	v->stats.last_exit_reason = reason;
	return 0;
}

/* KVM_EXIT_INTR: not counted as the last exit (the run returns -EINTR). */
static int exit_intr(kvmfs_vcpu *v)
{
	__atomic_and_fetch(&v->attn, ~ATTN_KICK, __ATOMIC_SEQ_CST);
	v->run->exit_reason = KVM_EXIT_INTR;
	v->stats.exits[KVM_EXIT_INTR]++;
	return -EINTR;
}

static int internal_error(kvmfs_vcpu *v, uint32_t sub)
{
	struct kvm_run *run = v->run;
	memset(&run->internal, 0, sizeof(run->internal));
	run->internal.suberror = sub;
	return exit_to(v, KVM_EXIT_INTERNAL_ERROR);
}

/* One slice of emulation on engine idx from the current RIP.  Returns the uc_err. */
static uc_err slice(kvmfs_vcpu *v, int idx)
{
	uc_err e;

	use_engine(v, idx);
	uint64_t rip = *v->live->rip;
	v->why = WHY_NONE;
	v->fill_remap = false;
	v->code_stale = false;
	if (v->check_rip) {
		/* the VMM may have rewritten the code KVM_RUN enters at */
		v->check_rip = false;
		code_at_refresh(v, idx, live_pc(v));
	}
	if (idx == ENG_STEP)
		uc_set_tcg_parallel(v->uc, !v->no_atomics && !v->mmio_step);
	__atomic_store_n(&v->running, 1 + idx, __ATOMIC_SEQ_CST);
	if (__atomic_load_n(&v->attn, __ATOMIC_SEQ_CST) & (ATTN_KICK | ATTN_FLUSH)) {
		__atomic_store_n(&v->running, 0, __ATOMIC_SEQ_CST);
		return UC_ERR_OK;
	}
	v->has_run = true;
	e = uc_emu_start(v->uc, rip, UNTIL_NEVER, 0, 0);
	__atomic_store_n(&v->running, 0, __ATOMIC_SEQ_CST);
	return e;
}

/*
 * Execute n instructions (n iterations of a REP instruction) on the step
 * engine; returns the uc_err.  The code at RIP is checked first: written since
 * by the fast engine, another vCPU or the VMM, it would not be seen otherwise
 * (each engine only watches its own writes).
 */
static uc_err step_n(kvmfs_vcpu *v, int n)
{
	uc_err e;

	use_engine(v, ENG_STEP);
	code_at_refresh(v, ENG_STEP, live_pc(v));
	__atomic_or_fetch(&v->attn, ATTN_STEP, __ATOMIC_SEQ_CST);
	v->step_left = n;
	e = slice(v, ENG_STEP);
	__atomic_and_fetch(&v->attn, ~ATTN_STEP, __ATOMIC_SEQ_CST);
	if (v->why == WHY_STEP)
		v->why = WHY_NONE;
	return e;
}

uc_err step_one(kvmfs_vcpu *v) { return step_n(v, 1); }

/* Completion of the previous exit (OUT, IN data, MMIO read data, further
 * MMIO writes).  1 = an exit is prepared, 0 = go on, <0 = error. */
static int complete_pending(kvmfs_vcpu *v)
{
	if (v->out_pending)
		return pio_complete_out(v);
	if (v->writes_reported && v->writes_reported < v->nwrites)
		return mmio_next_write(v);
	v->writes_reported = 0;
	if (v->pending == PEND_IN)
		return pio_complete_in(v);
	if (v->pending == PEND_MMIO_READ)
		return mmio_complete_read(v);
	return 0;
}

/* A #UD: RSM inside SMM (unicorn does not know our SMM), else the exception. */
static int handle_ud(kvmfs_vcpu *v, int *rc)
{
	if (v->in_smm && at_rsm(v)) {
		int r = leave_smm(v);
		if (r == KVMFS_RUN_NEED_HVA) {
			*rc = r;
			return 1;
		}
		if (r) {
			v->shutdown = true;   /* a state RSM cannot enter: triple fault */
			*rc = exit_to(v, KVM_EXIT_SHUTDOWN);
			return 1;
		}
		return 0;
	}
	return raise_exception(v, X86_VEC_UD, false, 0, rreg(v, UC_X86_REG_RIP), rc);
}

static int handle_stop(kvmfs_vcpu *v, uc_err e, int *rc);

/* A refused TLB fill (v->fx says why). */
static int handle_fill(kvmfs_vcpu *v, int *rc)
{
	if (v->code_stale) {
		code_page_drop(&v->eng[v->cur], v->fill_vaddr);
		return 0;
	}
	if (v->fill_remap) {
		*rc = map_hostmem(v);
		return *rc ? 1 : 0;
	}
	switch (v->fx.kind) {
	case KVMFS_XL_MMIO: {
		if (v->fill_access == KVMFS_ACC_FETCH) {
			*rc = internal_error(v, KVM_INTERNAL_ERROR_EMULATION);
			return 1;
		}
		int r = mmio_instruction(v);
		if (r < 0) { *rc = r; return 1; }
		if (r > 0) { *rc = 0; return 1; }
		if (v->why == WHY_FILL && v->fx.kind != KVMFS_XL_MMIO)
			return handle_stop(v, UC_ERR_OK, rc);
		return 0;
	}
	case KVMFS_XL_PF:
		return raise_page_fault(v, rc);
	case KVMFS_XL_NEED_HVA:
		v->miss_hva = v->fx.hva;
		*rc = KVMFS_RUN_NEED_HVA;
		return 1;
	case KVMFS_XL_EFAULT:
	default:
		v->run->exit_reason = KVM_EXIT_UNKNOWN;
		*rc = -EFAULT;
		return 1;
	}
}

/* Handle the end of a slice; returns 1 = exit prepared (value in *rc), 0 = go on. */
static int handle_stop(kvmfs_vcpu *v, uc_err e, int *rc)
{
	struct kvm_run *run = v->run;

	switch (v->why) {
	case WHY_OUT:                     /* state set by out_hook */
		*rc = exit_to(v, KVM_EXIT_IO);
		return 1;
	case WHY_IN:
		v->pending = PEND_IN;
		*rc = exit_to(v, KVM_EXIT_IO);
		return 1;
	case WHY_IFOPEN:
		return 0;
	case WHY_INTR:
		return raise_guest_intr(v, rc);
	case WHY_FILL:
		return handle_fill(v, rc);
	default:
		break;
	}
	if (e == UC_ERR_INSN_INVALID)
		return handle_ud(v, rc);
	if (v->attn & ATTN_FLUSH) {
		do_flush(v);
		return 0;
	}
	if (v->attn & ATTN_KICK) {
		*rc = exit_intr(v);
		return 1;
	}
	if (e == UC_ERR_RESOURCE) {
		/* an atomic access across a page: once without host atomics */
		v->no_atomics = true;
		uc_err e2 = step_one(v);
		v->no_atomics = false;
		if (v->why != WHY_NONE || e2 != UC_ERR_OK)
			return handle_stop(v, e2, rc);
		return 0;
	}
	if (e == UC_ERR_OK) {
		/* HLT is the only way a slice ends cleanly without a reason */
		uint8_t b = 0;
		struct kvmfs_xlate xl;
		uint64_t rip = rreg(v, UC_X86_REG_RIP);
		env_load(v);
		if (!gmem(v, v->cx.segs[R_CS].base + rip - 1, &b, 1, false, &xl) && b == X86_OP_HLT) {
			if (v->irq_pending && can_inject(v))
				return 0;         /* sti; hlt with an interrupt queued */
			*rc = exit_to(v, KVM_EXIT_HLT);
			return 1;
		}
		return 0;
	}
	*rc = internal_error(v, KVM_INTERNAL_ERROR_EMULATION);
	run->internal.ndata = 3;          /* kvmfs: uc_err, stop cause, pc */
	run->internal.data[0] = e;
	run->internal.data[1] = v->why;
	run->internal.data[2] = rreg(v, UC_X86_REG_RIP);
	return 1;
}

KVMFS_API int kvmfs_vcpu_run(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;
	int rc = 0;

	if (run->kvm_valid_regs & ~(uint64_t)(KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS |
					      KVM_SYNC_X86_EVENTS))
		return -EINVAL;
	if (run->cr8 > X86_CR8_MAX)
		return -EINVAL;
	v->cr8 = run->cr8;
	v->stats.runs++;
	v->check_rip = true;
	cur_vcpu = v;
	kvmfs_mmu_enter(v->mmu, &v->fc);
	if (kvmfs_mmu_flush_gen(v->mmu) > v->fc.acked_gen)
		do_flush(v);
	if ((rc = map_hostmem(v)))
		goto out;

	if (run->immediate_exit) {
		/* as KVM: the userspace IO is completed first, then EINTR */
		bool in = v->pending == PEND_IN;
		if (v->pending != PEND_NONE || v->out_pending)
			complete_pending(v);
		if (in && v->pio_avail) {
			step_n(v, v->pio_avail);
			v->why = WHY_NONE;
		}
		rc = -EINTR;
		goto out;
	}
	run->exit_reason = KVM_EXIT_UNKNOWN;
	if (v->shutdown) {
		rc = exit_to(v, KVM_EXIT_SHUTDOWN);
		goto out;
	}
	if (v->pending != PEND_NONE || v->writes_reported || v->out_pending) {
		int r = complete_pending(v);
		if (r < 0) { rc = r; goto out; }
		if (r > 0) { rc = 0; goto out; }
		if (v->why != WHY_NONE && v->why != WHY_STEP) {
			if (handle_stop(v, UC_ERR_OK, &rc))
				goto out;
		}
	}
	for (;;) {
		if (v->attn & ATTN_FLUSH)
			do_flush(v);
		if (v->attn & ATTN_KICK) {
			rc = exit_intr(v);
			goto out;
		}
		/* as KVM: an injected exception first, then the interrupt; each
		 * stays queued if its delivery must wait for host memory */
		if (v->exc_pending) {
			int r = deliver_event(v, v->exc_nr, v->exc_has_err, v->exc_err,
					      rreg(v, UC_X86_REG_RIP));
			if (r != DELIVER_NEED_HVA)
				v->exc_pending = false;
			if (delivery_stops(v, r, &rc))
				goto out;
		}
		if (v->irq_pending && can_inject(v)) {
			int r = deliver_event(v, v->irq, false, 0, rreg(v, UC_X86_REG_RIP));
			if (r != DELIVER_NEED_HVA)
				v->irq_pending = false;
			if (delivery_stops(v, r, &rc))
				goto out;
		}
		if (v->smi_pending && !v->in_smm) {
			if ((rc = enter_smm(v)))
				goto out;
		}
		if (run->request_interrupt_window && !v->irq_pending && can_inject(v)) {
			rc = exit_to(v, KVM_EXIT_IRQ_WINDOW_OPEN);
			goto out;
		}
		bool watch = (v->irq_pending || run->request_interrupt_window) && !can_inject(v);
		v->shadow = false;
		if (watch)
			__atomic_or_fetch(&v->attn, ATTN_WATCH_IF, __ATOMIC_SEQ_CST);
		else
			__atomic_and_fetch(&v->attn, ~ATTN_WATCH_IF, __ATOMIC_SEQ_CST);
		if (v->debug_ctl & KVM_GUESTDBG_SINGLESTEP) {
			v->run->debug.exception = X86_VEC_DB;
			uc_err e = step_one(v);
			if (v->why != WHY_NONE || e != UC_ERR_OK) {
				if (handle_stop(v, e, &rc))
					goto out;
			}
			memset(&run->debug, 0, sizeof(run->debug));
			run->debug.exception = X86_VEC_DB;
			env_load(v);
			run->debug.pc = v->cx.segs[R_CS].base + rreg(v, UC_X86_REG_RIP);
			rc = exit_to(v, KVM_EXIT_DEBUG);
			goto out;
		}
		/* waiting for IF to open needs the per-instruction hook */
		uc_err e = slice(v, watch ? ENG_STEP : ENG_FAST);
		if (handle_stop(v, e, &rc))
			goto out;
	}
out:
	__atomic_and_fetch(&v->attn, ~ATTN_WATCH_IF, __ATOMIC_SEQ_CST);
	kvmfs_mmu_leave(v->mmu, &v->fc);
	cur_vcpu = NULL;
	if (rc == 0 || rc == -EINTR)
		fill_run_flags(v);
	return rc;
}
