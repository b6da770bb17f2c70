/*
 * vcpu.c - one vCPU: a unicorn x86-64 engine in UC_TLB_VIRTUAL mode driven
 * from C in the thread that serves KVM_RUN.
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
 *    is done here (deliver_event).
 *  - Segment hidden state (base/limit/flags of CS..GS, hflags) is not exposed
 *    by the API; a uc_context holds a copy of QEMU's CPUX86State at a fixed
 *    offset, so sregs and event delivery edit that copy and restore it.  The
 *    offsets are checked against marker values when the vCPU is created.
 *
 * MMIO: a refused fill for an MMIO gpa stops the guest on the instruction;
 * the instruction is then executed alone with the MMIO pages mapped to a
 * window of uc_mmio_map callbacks.  A read whose data the VMM has not given
 * yet aborts the step (context restored, KVM_EXIT_MMIO read); the data given
 * on the next KVM_RUN is replayed when the instruction runs again, so RMW and
 * multi-access forms (push [mmio], add [mmio],eax, movs) complete exactly once.
 *
 * Threading: kvmfs_vcpu_run runs in the caller's thread; everything else but
 * kvmfs_vcpu_kick must not run concurrently with it (Python serialises vCPU
 * ioctls per vCPU).  kick is async-signal-safe and may come from any thread.
 */
#include <pthread.h>
#include <sched.h>
#include <time.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <unicorn/unicorn.h>

#include "kvmfs_internal.h"

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
#define E_CR 424
#define E_EFER 592
#define E_ERROR_CODE 5384             /* error code of the exception being raised */
#define E_OLD_EXCEPTION 5496          /* exception in flight (QEMU's #DF promotion) */

#define R_ES 0
#define R_CS 1
#define R_SS 2
#define R_DS 3
#define R_FS 4
#define R_GS 5

#define HF_CPL_MASK 3u
#define HF_INHIBIT_IRQ (1u << 3)
#define HF_CS32 (1u << 4)
#define HF_SS32 (1u << 5)
#define HF_ADDSEG (1u << 6)
#define HF_PE (1u << 7)
#define HF_MP_EM_TS (7u << 9)
#define HF_LMA (1u << 14)
#define HF_CS64 (1u << 15)
#define HF_OSFXSR (1u << 22)

#define DESC_TYPE_SHIFT 8
#define DESC_S (1u << 12)
#define DESC_DPL_SHIFT 13
#define DESC_P (1u << 15)
#define DESC_AVL (1u << 20)
#define DESC_L (1u << 21)
#define DESC_B (1u << 22)
#define DESC_G (1u << 23)
#define DESC_UNUSABLE 1u              /* kvmfs-private bit (QEMU ignores flags[7:0]) */

#define CR0_PE 1ull
#define CR0_EM (1ull << 2)
#define CR0_TS (1ull << 3)
#define CR0_PG (1ull << 31)
#define CR4_PAE (1ull << 5)
#define EFER_LME (1ull << 8)
#define EFER_LMA (1ull << 10)
#define RF_TF (1ull << 8)
#define RF_IF (1ull << 9)
#define RF_NT (1ull << 14)
#define RF_RF (1ull << 16)
#define RF_VM (1ull << 17)
#define RF_AC (1ull << 18)

/* unicorn 2.1.4 internals, verified at vCPU creation (engine_check) */
#define UC_CPU_OFF 440                /* uc_struct.cpu */
#define CPU_UC_OFF 33192              /* CPUState.uc */
#define CPU_ENV_OFF 35408             /* CPUX86State inside X86CPU */
#define UC_CTXCONT_OFF 2012           /* uc_struct.context_content, cpu_context_size */
#define UC_NOEXIT_OFF 2034            /* uc_struct.no_exit_request (init_done follows) */

extern void cpu_loop_exit_x86_64(void *cpu) __attribute__((noreturn));

enum { ENG_FAST, ENG_STEP };

/*
 * Translated code is only invalidated by QEMU when the engine itself writes
 * the page; the VMM, another vCPU or the other engine writing guest code is
 * not seen.  Each engine keeps a copy of the code pages it fetched from; a
 * page found different (at a fetch fill, or for RIP's page when KVM_RUN
 * enters) has its translations dropped before it runs again.
 */
#define CODE_PAGES 256                /* per engine, direct-mapped by page */
struct code_page { uint64_t uphys; uint8_t *copy; };

#define WIN_BASE (1ull << 39)         /* unicorn-physical MMIO window */
#define WIN_PAGES 16
#define MAX_MMIO_ACC 8
#define UNTIL_NEVER 0xfffffffffffff000ull

/* attention bits: any set makes the code hook look (and usually stop) */
#define ATTN_KICK 1
#define ATTN_FLUSH 2
#define ATTN_STEP 4
#define ATTN_WATCH_IF 8

/* why the last emulation slice ended (set by hooks) */
enum stop_why { WHY_NONE, WHY_OUT, WHY_IN, WHY_FILL, WHY_INTR, WHY_STEP, WHY_IFOPEN };

/* what the next KVM_RUN must complete first */
enum pending { PEND_NONE, PEND_IN, PEND_MMIO_READ };

struct mmio_acc { uint64_t gpa; uint32_t len; uint64_t data; };

/*
 * SMP: the vCPUs of a VM run in parallel, each engine in its own thread on the
 * same host memory.  The fast engine generates code with host atomics for
 * LOCK-prefixed (and implicitly locked) instructions (uc_set_tcg_parallel,
 * patches/unicorn-2.1.4-parallel.patch); without them `lock xadd` from three
 * vCPUs lost half the increments.  An atomic access the host cannot do in one
 * operation (crossing a page) is replayed alone without them on the step
 * engine, which otherwise generates atomics too (but not for MMIO replays).
 */
struct kvmfs_vcpu {
	uc_engine *uc;
	kvmfs_mmu *mmu;
	uint32_t id;
	struct kvm_run *run;
	struct kvmfs_flush_client fc;
	uc_context *ctx, *ctx_step;
	struct engine { uc_engine *uc; uint8_t *cpu, *env; struct code_page code[CODE_PAGES]; } eng[2];
	int cur;                          /* engine holding the state: uc/cpu/live_env are its */
	uint8_t *cpu;
	uint8_t *live_env;                /* the current engine's CPUX86State */
	volatile int attn;
	volatile int running;             /* 1 + engine inside uc_emu_start, or 0 */

	/* host ranges mapped into this engine */
	struct kvmfs_hostmem_info *hm;
	uint64_t *hm_mapped;              /* size mapped per index (0 = none) */
	int hm_cap, hm_n;
	uint64_t uphys_end;               /* end of the highest mapped range */

	/* last slice */
	int why;
	struct kvmfs_xlate fx;            /* refused fill */
	uint64_t fill_vaddr;
	int fill_access;
	bool fill_remap;
	bool code_stale;                  /* a fetch fill found its page rewritten */
	bool no_atomics;                  /* step engine: plain code (MMIO, atomic replay) */
	bool check_rip;                   /* KVM_RUN entry: check RIP's code page */
	uint32_t intno, intr_err;
	uint64_t intr_rip;
	int step_left;

	/* port I/O */
	int pending;
	uint32_t pio_avail, pio_idx, pio_size;
	bool out_pending;                 /* RIP left on an OUT: the next run skips it */
	uint64_t out_rip, out_next;

	/* MMIO single-step */
	bool mmio_step;
	uint64_t win_gpa[WIN_PAGES];
	int win_next;
	struct mmio_acc reads[MAX_MMIO_ACC];
	int nreads, reads_used;
	bool read_missing;
	struct mmio_acc miss;
	struct mmio_acc writes[MAX_MMIO_ACC];
	int nwrites, writes_reported;

	/* events */
	bool irq_pending;
	uint32_t irq;
	bool exc_pending;                 /* injected by KVM_SET_VCPU_EVENTS */
	uint8_t exc_nr, exc_has_err;
	uint32_t exc_err;
	bool smi_pending, in_smm, smm_inside_nmi;
	uint32_t smbase;
	bool shutdown;
	bool shadow;                      /* interrupt shadow after STI seen by the watch */
	uint32_t debug_ctl;
	uint64_t miss_hva;
	bool gmem_miss;                   /* a copy_guest met unregistered host memory */

	/* KVM_SET_CPUID2's table: what CPUID answers (empty: zeros, as KVM) */
	struct kvm_cpuid_entry2 *cpuid;
	uint32_t ncpuid;
	bool has_run;                     /* KVM_SET_CPUID2 may then only repeat the table */

	/* registers kept outside the engine */
	uint64_t cr8, apic_base, tsc_offset;
	struct kvmfs_vcpu_stats stats;
};

static __thread kvmfs_vcpu *cur_vcpu;

/* ----------------------------------------------------------- env access -- */

static inline uint8_t *env(kvmfs_vcpu *v) { return (uint8_t *)v->ctx + ENV_OFF; }
#define ENV64(v, off) (*(uint64_t *)(env(v) + (off)))
#define ENV32(v, off) (*(uint32_t *)(env(v) + (off)))

struct segc { uint32_t selector; uint32_t pad; uint64_t base; uint32_t limit; uint32_t flags; };
static inline struct segc *seg(kvmfs_vcpu *v, int r) { return (struct segc *)(env(v) + E_SEGS + 24 * r); }
static inline struct segc *segat(kvmfs_vcpu *v, int off) { return (struct segc *)(env(v) + off); }

static uint64_t rreg(kvmfs_vcpu *v, int r);

/* The env copy's eflags holds the full RFLAGS (QEMU keeps the arithmetic
 * flags lazily in CC_SRC/CC_OP and DF in df; env_store folds them back). */
static void env_load(kvmfs_vcpu *v)
{
	uint64_t fl = rreg(v, UC_X86_REG_RFLAGS);
	uc_context_save(v->uc, v->ctx);
	ENV64(v, E_RFLAGS) = fl | 2;
}

/* Recompute the hflags QEMU derives from segments and control registers. */
static void env_fix_hflags(kvmfs_vcpu *v)
{
	uint32_t hf = ENV32(v, E_HFLAGS);
	uint64_t cr0 = ENV64(v, E_CR), cr4 = ENV64(v, E_CR + 32), efer = ENV64(v, E_EFER);
	uint64_t rfl = ENV64(v, E_RFLAGS);
	struct segc *cs = seg(v, R_CS), *ss = seg(v, R_SS);

	hf &= ~(HF_CPL_MASK | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | HF_MP_EM_TS | HF_LMA |
		HF_CS64 | HF_OSFXSR);
	if (cr0 & CR0_PE)
		hf |= HF_PE;
	hf |= (uint32_t)(cr0 << 8) & HF_MP_EM_TS;
	if (cr4 & (1u << 9))
		hf |= HF_OSFXSR;
	if (efer & EFER_LMA)
		hf |= HF_LMA;
	if ((cr0 & CR0_PE) && !(rfl & RF_VM))
		hf |= (ss->flags >> DESC_DPL_SHIFT) & 3;
	else if (rfl & RF_VM)
		hf |= 3;
	if ((efer & EFER_LMA) && (cs->flags & DESC_L)) {
		hf |= HF_CS32 | HF_SS32 | HF_CS64;
	} else {
		if (cs->flags & DESC_B)
			hf |= HF_CS32;
		if (ss->flags & DESC_B)
			hf |= HF_SS32;
	}
	if (!(hf & HF_CS64)) {
		if (!(cr0 & CR0_PE) || (rfl & RF_VM) || !(hf & HF_CS32))
			hf |= HF_ADDSEG;
		else if (seg(v, R_DS)->base | seg(v, R_ES)->base | ss->base)
			hf |= HF_ADDSEG;
	}
	ENV32(v, E_HFLAGS) = hf;
}

static void env_store(kvmfs_vcpu *v)
{
	uint64_t fl = ENV64(v, E_RFLAGS);
	ENV64(v, E_CC_SRC) = fl & 0x8d5;              /* O S Z A P C */
	ENV32(v, E_CC_OP) = 1;                        /* CC_OP_EFLAGS */
	ENV32(v, E_DF) = (fl & 0x400) ? -1 : 1;
	env_fix_hflags(v);
	uc_context_restore(v->uc, v->ctx);
	uc_ctl_flush_tlb(v->uc);
}

static uint64_t rreg(kvmfs_vcpu *v, int r) { uint64_t x = 0; uc_reg_read(v->uc, r, &x); return x; }
static void wreg(kvmfs_vcpu *v, int r, uint64_t x) { uc_reg_write(v->uc, r, &x); }

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

	v->uc = e->uc;
	wreg(v, UC_X86_REG_RAX, m1);
	wreg(v, UC_X86_REG_FS_BASE, m2);
	uc_reg_write(v->uc, UC_X86_REG_GDTR, &g);
	env_load(v);
	if (ENV64(v, 0) != m1 || seg(v, R_FS)->base != m2 || segat(v, E_GDT)->base != g.base)
		return -ENOSYS;
	uint8_t *cpu = *(uint8_t **)(u + UC_CPU_OFF);
	uint8_t *live = cpu ? cpu + CPU_ENV_OFF : NULL;
	if (!live || *(uint8_t **)(cpu + CPU_UC_OFF) != u || *(uint64_t *)live != m1 ||
	    ((struct segc *)(live + E_SEGS + 24 * R_FS))->base != m2 ||
	    ((struct segc *)(live + E_GDT))->base != g.base)
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

/* -------------------------------------------------------- guest memory -- */

static void paging_now(kvmfs_vcpu *v, struct kvmfs_paging *pg, int cpl)
{
	uint8_t *e = v->live_env;

	/* Read straight from the CPU state: control registers, EFER and the CPL
	 * (hflags) change only in helpers, so the copy in memory is current even
	 * in the middle of a block, and no API call (MSR reads run QEMU's rdmsr
	 * helper on the live registers) happens inside a fill. */
	pg->cr0 = *(uint64_t *)(e + E_CR);
	pg->cr3 = *(uint64_t *)(e + E_CR + 24);
	pg->cr4 = *(uint64_t *)(e + E_CR + 32);
	pg->efer = *(uint64_t *)(e + E_EFER);
	pg->cpl = cpl < 0 ? (int)(*(uint32_t *)(e + E_HFLAGS) & 3) : cpl;
	pg->as_id = v->in_smm;            /* SMM sees address space 1 */
}

/* The linear address of RIP (CS base + RIP) in the current engine. */
static uint64_t live_pc(kvmfs_vcpu *v)
{
	return ((struct segc *)(v->live_env + E_SEGS + 24 * R_CS))->base +
	       *(uint64_t *)(v->live_env + E_RIP);
}

/* Copy to/from memory through the translation pg describes.  Returns 0, or
 * the KVMFS_XL_* kind that stopped it (xl filled). */
static int copy_guest(kvmfs_vcpu *v, const struct kvmfs_paging *pg, uint64_t la, void *buf,
		      uint32_t len, bool write, struct kvmfs_xlate *xl)
{
	uint8_t *p = buf;

	while (len) {
		uint32_t off = la & 0xfff, n = 4096 - off;
		if (n > len)
			n = len;
		kvmfs_mmu_translate(v->mmu, pg, la & ~0xfffull,
				    write ? KVMFS_ACC_WRITE : KVMFS_ACC_READ, xl);
		if (xl->kind == KVMFS_XL_NEED_HVA) {
			v->gmem_miss = true;      /* see deliver_event */
			v->miss_hva = xl->hva;
		}
		if (xl->kind != KVMFS_XL_OK)
			return xl->kind ? xl->kind : -1;
		if (write)
			memcpy((uint8_t *)xl->host + off, p, n);
		else
			memcpy(p, (uint8_t *)xl->host + off, n);
		la += n;
		p += n;
		len -= n;
	}
	return 0;
}

/* Guest-linear memory, as a supervisor access in the current mode. */
static int gmem(kvmfs_vcpu *v, uint64_t la, void *buf, uint32_t len, bool write,
		struct kvmfs_xlate *xl)
{
	struct kvmfs_paging pg;

	paging_now(v, &pg, 0);
	return copy_guest(v, &pg, la, buf, len, write, xl);
}

/* Guest-physical memory of address space as_id, as KVM's kvm_vcpu_read/
 * write_guest: writes are dirty-logged and a READONLY slot refuses them. */
static int gphys(kvmfs_vcpu *v, uint32_t as_id, uint64_t gpa, void *buf, uint32_t len,
		 bool write, struct kvmfs_xlate *xl)
{
	struct kvmfs_paging pg = { .as_id = as_id };   /* CR0.PG clear: no walk */

	return copy_guest(v, &pg, gpa, buf, len, write, xl);
}

/* ------------------------------------------------------------ host ranges -- */

static int map_hostmem(kvmfs_vcpu *v)
{
	int n = kvmfs_hostmem_list(v->mmu, v->hm, v->hm_cap);
	if (n > v->hm_cap) {
		int cap = n * 2;
		void *a = realloc(v->hm, cap * sizeof(*v->hm));
		if (!a)
			return -ENOMEM;
		v->hm = a;
		a = realloc(v->hm_mapped, cap * sizeof(uint64_t));
		if (!a)
			return -ENOMEM;
		v->hm_mapped = a;
		memset(v->hm_mapped + v->hm_cap, 0, (cap - v->hm_cap) * sizeof(uint64_t));
		v->hm_cap = cap;
		n = kvmfs_hostmem_list(v->mmu, v->hm, v->hm_cap);
	}
	for (int i = 0; i < n && i < v->hm_cap; i++) {
		struct kvmfs_hostmem_info *h = &v->hm[i];
		if (h->size && !v->hm_mapped[i]) {
			if (uc_mem_map_ptr(v->eng[ENG_FAST].uc, h->uphys, h->size, UC_PROT_ALL, h->ptr))
				return -ENOMEM;
			if (uc_mem_map_ptr(v->eng[ENG_STEP].uc, h->uphys, h->size, UC_PROT_ALL, h->ptr)) {
				uc_mem_unmap(v->eng[ENG_FAST].uc, h->uphys, h->size);
				return -ENOMEM;
			}
			v->hm_mapped[i] = h->size;
			if (h->uphys + h->size > v->uphys_end)
				v->uphys_end = h->uphys + h->size;
		} else if (!h->size && v->hm_mapped[i]) {
			uc_mem_unmap(v->eng[ENG_FAST].uc, h->uphys, v->hm_mapped[i]);
			uc_mem_unmap(v->eng[ENG_STEP].uc, h->uphys, v->hm_mapped[i]);
			v->hm_mapped[i] = 0;
		}
	}
	v->hm_n = n;
	return 0;
}

/* ------------------------------------------------------------------ hooks -- */

/* 1: the page differs from the copy taken when this engine last fetched
 * from it (copy refreshed); 0: same; -1: not seen before (copy taken). */
static int code_page_check(struct engine *e, uint64_t uphys, const void *host)
{
	struct code_page *c = &e->code[(uphys >> 12) % CODE_PAGES];

	if (c->copy && c->uphys == uphys) {
		if (!memcmp(c->copy, host, 4096))
			return 0;
		memcpy(c->copy, host, 4096);
		return 1;
	}
	if (!c->copy && !(c->copy = malloc(4096)))
		return 0;
	c->uphys = uphys;
	memcpy(c->copy, host, 4096);
	return -1;
}

/* Drop engine e's translations of the code page at linear address la. */
static void code_page_drop(struct engine *e, uint64_t la)
{
	la &= ~0xfffull;
	uc_ctl_remove_cache(e->uc, la, la + 4096);
}

/* Before engine idx runs the instruction at la: drop its translations of the
 * page(s) holding the instruction's 15 bytes if they changed since the engine
 * last looked (or were not tracked). */
static void code_at_refresh(kvmfs_vcpu *v, int idx, uint64_t la)
{
	struct kvmfs_paging pg;
	struct kvmfs_xlate xl;

	paging_now(v, &pg, -1);
	for (uint64_t p = la & ~0xfffull; p <= ((la + 14) & ~0xfffull); p += 4096) {
		kvmfs_mmu_translate(v->mmu, &pg, p, KVMFS_ACC_FETCH, &xl);
		if (xl.kind == KVMFS_XL_OK && xl.uphys < v->uphys_end &&
		    code_page_check(&v->eng[idx], xl.uphys, xl.host))
			code_page_drop(&v->eng[idx], p);
	}
}

static bool tlb_fill(uc_engine *uc, uint64_t va, uc_mem_type type, uc_tlb_entry *e, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvmfs_paging pg;
	int acc = type == UC_MEM_WRITE ? KVMFS_ACC_WRITE :
		  type == UC_MEM_FETCH ? KVMFS_ACC_FETCH : KVMFS_ACC_READ;
	struct kvmfs_xlate xl;

	paging_now(v, &pg, -1);
	kvmfs_mmu_translate(v->mmu, &pg, va, acc, &xl);
	if (xl.kind == KVMFS_XL_OK) {
		if (xl.uphys >= v->uphys_end) {
			v->fill_remap = true;     /* a range added while running */
			goto refuse;
		}
		if (acc == KVMFS_ACC_FETCH && code_page_check(&v->eng[v->cur], xl.uphys, xl.host) > 0) {
			v->code_stale = true;     /* dropped and retried by handle_stop */
			goto refuse;
		}
		e->paddr = xl.uphys;
		e->perms = xl.perms;
		return true;
	}
	if (xl.kind == KVMFS_XL_MMIO && v->mmio_step && acc != KVMFS_ACC_FETCH) {
		int i = v->win_next++ % WIN_PAGES;
		v->win_gpa[i] = xl.gpa & ~0xfffull;
		e->paddr = WIN_BASE + (uint64_t)i * 4096;
		e->perms = UC_PROT_READ | UC_PROT_WRITE;
		return true;
	}
refuse:
	v->fx = xl;
	v->fill_vaddr = va;
	v->fill_access = acc;
	v->why = WHY_FILL;
	return false;
}

static void code_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *ud)
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
		if (fl & RF_IF) {
			if (!v->shadow) {
				v->shadow = true;   /* one more instruction: STI shadow */
			} else {
				v->why = WHY_IFOPEN;
				uc_emu_stop(uc);
			}
		}
	}
}

/* Leave the engine at once from inside an IO hook: unicorn has put RIP and
 * the flags on the IO instruction, which has not run. */
static void __attribute__((noreturn)) stop_here(kvmfs_vcpu *v)
{
	uc_emu_stop(v->uc);
	cpu_loop_exit_x86_64(v->cpu);
}

/* The IO instruction at RIP: string form, REP, address size, length. */
struct io_insn { bool string, rep; int asize; uint32_t len; };

static void decode_io(kvmfs_vcpu *v, struct io_insn *ii)
{
	uint8_t *e = v->live_env, b[15];
	uint32_t hf = *(uint32_t *)(e + E_HFLAGS);
	uint64_t la = live_pc(v);
	struct kvmfs_xlate xl;
	bool a67 = false;

	memset(ii, 0, sizeof *ii);
	ii->len = 1;
	if (!gmem(v, la, b, sizeof b, false, &xl)) {
		for (int i = 0; i < 15; i++) {
			uint8_t c = b[i];
			if (c == 0xf3 || c == 0xf2) { ii->rep = true; continue; }
			if (c == 0x67) { a67 = true; continue; }
			if (c == 0x66 || c == 0x26 || c == 0x2e || c == 0x36 || c == 0x3e ||
			    c == 0x64 || c == 0x65 || ((hf & HF_CS64) && c >= 0x40 && c <= 0x4f))
				continue;
			ii->string = c >= 0x6c && c <= 0x6f;
			ii->len = i + ((c == 0xe4 || c == 0xe5 || c == 0xe6 || c == 0xe7) ? 2 : 1);
			break;
		}
	}
	if (hf & HF_CS64)
		ii->asize = a67 ? 4 : 8;
	else if (hf & HF_CS32)
		ii->asize = a67 ? 2 : 4;
	else
		ii->asize = a67 ? 4 : 2;
	if (!ii->string)
		ii->rep = false;
}

static uint64_t asize_mask(int asize)
{
	return asize == 8 ? ~0ull : asize == 4 ? 0xffffffffull : 0xffffull;
}

/* A register written with address size asize, as QEMU does: 16-bit keeps the
 * upper bits, 32-bit zero-extends. */
static uint64_t asize_set(uint64_t old, uint64_t val, int asize)
{
	if (asize == 2)
		return (old & ~0xffffull) | (val & 0xffff);
	return val & asize_mask(asize);
}

static void out_hook(uc_engine *uc, uint32_t port, int size, uint32_t value, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvm_run *run = v->run;
	uint8_t *e = v->live_env;
	uint64_t *regs = (uint64_t *)e, *rip = (uint64_t *)(e + E_RIP);
	struct io_insn ii;

	run->io.direction = 1;
	run->io.size = size;
	run->io.port = port;
	run->io.count = 1;
	run->io.data_offset = 4096;
	memcpy((uint8_t *)run + 4096, &value, size);
	decode_io(v, &ii);
	if (ii.string) {
		/* OUTS: one element per exit, retired here (RSI, and RCX for REP).
		 * REP leaves RIP on the instruction even after the last element,
		 * as KVM does; the next run finds RCX = 0 and moves on. */
		int32_t df = *(int32_t *)(e + E_DF);
		regs[6] = asize_set(regs[6], regs[6] + (int64_t)df * size, ii.asize);
		if (ii.rep)
			regs[1] = asize_set(regs[1], regs[1] - 1, ii.asize);
		else
			*rip += ii.len;
	} else {
		/* VMX/SVM fast PIO: RIP stays on the OUT until the next KVM_RUN */
		v->out_rip = *rip;
		v->out_next = *rip + ii.len;
		if (!(*(uint32_t *)(e + E_HFLAGS) & HF_CS32))
			v->out_next &= 0xffff;
		v->out_pending = true;
	}
	v->why = WHY_OUT;
	stop_here(v);
}

static uint32_t in_hook(uc_engine *uc, uint32_t port, int size, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvm_run *run = v->run;
	uint64_t *regs = (uint64_t *)v->live_env;
	struct io_insn ii;
	uint32_t val = 0;

	if (v->pio_avail) {
		memcpy(&val, (uint8_t *)run + 4096 + v->pio_idx * size, size);
		v->pio_idx++;
		v->pio_avail--;
		return val;
	}
	decode_io(v, &ii);
	uint32_t count = 1;
	if (ii.rep) {
		/* as many elements as fit the page at RDI and the data area */
		uint64_t rcx = regs[1] & asize_mask(ii.asize);
		uint64_t room = *(int32_t *)(v->live_env + E_DF) < 0 ?
				(regs[7] & 0xfff) / size + 1 : (4096 - (regs[7] & 0xfff)) / size;
		count = rcx < room ? rcx : room;
		if (count > 1024u / size)
			count = 1024u / size;
		if (!count)
			count = 1;
	}
	run->io.direction = 0;
	run->io.size = size;
	run->io.port = port;
	run->io.count = count;
	run->io.data_offset = 4096;
	v->pio_size = size;
	v->why = WHY_IN;
	stop_here(v);
}

/* CPUID answers from the table the VMM set, as KVM's kvm_cpuid(): an exact
 * match (index only where flagged significant); a leaf above its range's
 * maximum reads as the highest basic leaf (Intel); otherwise zeros.  OSXSAVE
 * follows CR4.OSXSAVE. */
static const struct kvm_cpuid_entry2 *cpuid_find(kvmfs_vcpu *v, uint32_t fn, uint32_t idx)
{
	for (uint32_t i = 0; i < v->ncpuid; i++) {
		const struct kvm_cpuid_entry2 *e = &v->cpuid[i];
		if (e->function == fn && (!(e->flags & 1) || e->index == idx))
			return e;
	}
	return NULL;
}

static int cpuid_hook(uc_engine *uc, void *ud)
{
	kvmfs_vcpu *v = ud;
	uint64_t *regs = (uint64_t *)v->live_env;
	uint32_t fn = (uint32_t)regs[0], idx = (uint32_t)regs[1];
	const struct kvm_cpuid_entry2 *e = cpuid_find(v, fn, idx);

	if (!e) {
		const struct kvm_cpuid_entry2 *range = cpuid_find(v, fn & 0x80000000u, 0);
		const struct kvm_cpuid_entry2 *basic = cpuid_find(v, 0, 0);
		if (range && fn > range->eax && basic)
			e = cpuid_find(v, basic->eax, idx);
	}
	uint32_t a = e ? e->eax : 0, b = e ? e->ebx : 0, c = e ? e->ecx : 0, d = e ? e->edx : 0;
	if (e && e->function == 1) {
		c &= ~(1u << 27);
		if (*(uint64_t *)(v->live_env + E_CR + 32) & (1ull << 18))
			c |= 1u << 27;
		d &= ~(1u << 9);
		if (v->apic_base & (1u << 11))
			d |= 1u << 9;
	}
	regs[0] = a;                      /* 32-bit results zero-extend */
	regs[3] = b;
	regs[1] = c;
	regs[2] = d;
	return 1;                         /* skip unicorn's own CPUID */
}

static void intr_hook(uc_engine *uc, uint32_t intno, void *ud)
{
	kvmfs_vcpu *v = ud;

	if (v->why == WHY_NONE || v->why == WHY_STEP) {
		v->why = WHY_INTR;
		v->intno = intno;
		v->intr_err = *(uint32_t *)(v->live_env + E_ERROR_CODE);
		/* delivered here, not by QEMU: nothing is in flight any more
		 * (else the next contributory fault turns into #DF) */
		*(int32_t *)(v->live_env + E_OLD_EXCEPTION) = -1;
		v->intr_rip = rreg(v, UC_X86_REG_RIP);
	}
	uc_emu_stop(uc);
}

/*
 * unicorn splits an 8-byte access to an MMIO region into two 4-byte ones (low
 * half first); accesses that continue the previous one are merged back, so
 * the VMM sees the guest's access size.
 */
static uint64_t win_read(uc_engine *uc, uint64_t off, unsigned size, void *ud)
{
	kvmfs_vcpu *v = ud;
	uint64_t gpa = v->win_gpa[off >> 12] + (off & 0xfff);

	for (int i = 0; i < v->nreads; i++) {
		struct mmio_acc *a = &v->reads[i];
		if (gpa >= a->gpa && gpa + size <= a->gpa + a->len) {
			uint64_t x = 0;
			memcpy(&x, (uint8_t *)&a->data + (gpa - a->gpa), size);
			v->reads_used = i + 1;
			return x;
		}
	}
	if (!v->read_missing) {
		v->read_missing = true;
		v->miss.gpa = gpa;
		v->miss.len = size;
	} else if (gpa == v->miss.gpa + v->miss.len && v->miss.len + size <= 8) {
		v->miss.len += size;
	}
	return 0;
}

static void win_write(uc_engine *uc, uint64_t off, unsigned size, uint64_t value, void *ud)
{
	kvmfs_vcpu *v = ud;
	uint64_t gpa = v->win_gpa[off >> 12] + (off & 0xfff);

	if (v->read_missing)
		return;
	if (v->nwrites) {
		struct mmio_acc *p = &v->writes[v->nwrites - 1];
		if (gpa == p->gpa + p->len && p->len + size <= 8) {
			memcpy((uint8_t *)&p->data + p->len, &value, size);
			p->len += size;
			return;
		}
	}
	if (v->nwrites >= MAX_MMIO_ACC)
		return;
	struct mmio_acc *a = &v->writes[v->nwrites++];
	a->gpa = gpa;
	a->len = size;
	a->data = value;
}

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

/* ----------------------------------------------------------- segments -- */

static uint32_t kseg_to_flags(const struct kvm_segment *s)
{
	return (uint32_t)(s->type & 15) << DESC_TYPE_SHIFT | (s->s ? DESC_S : 0) |
	       (uint32_t)(s->dpl & 3) << DESC_DPL_SHIFT | (s->present ? DESC_P : 0) |
	       (s->avl ? DESC_AVL : 0) | (s->l ? DESC_L : 0) | (s->db ? DESC_B : 0) |
	       (s->g ? DESC_G : 0) | (s->unusable ? DESC_UNUSABLE : 0);
}

static void flags_to_kseg(const struct segc *c, struct kvm_segment *s)
{
	memset(s, 0, sizeof(*s));
	s->base = c->base;
	s->limit = c->limit;
	s->selector = c->selector;
	s->type = (c->flags >> DESC_TYPE_SHIFT) & 15;
	s->s = !!(c->flags & DESC_S);
	s->dpl = (c->flags >> DESC_DPL_SHIFT) & 3;
	s->present = !!(c->flags & DESC_P);
	s->avl = !!(c->flags & DESC_AVL);
	s->l = !!(c->flags & DESC_L);
	s->db = !!(c->flags & DESC_B);
	s->g = !!(c->flags & DESC_G);
	s->unusable = !!(c->flags & DESC_UNUSABLE);
}

static void set_segc(struct segc *c, const struct kvm_segment *s)
{
	c->selector = s->selector;
	c->base = s->base;
	c->limit = s->limit;
	c->flags = kseg_to_flags(s);
}

/* Load a segment cache from a descriptor in the GDT/LDT (protected mode). */
static int load_desc(kvmfs_vcpu *v, uint16_t sel, struct segc *c)
{
	struct segc *tab = (sel & 4) ? segat(v, E_LDT) : segat(v, E_GDT);
	struct kvmfs_xlate xl;
	uint32_t d[2];

	if ((sel & ~3u) == 0 || (sel | 7u) > tab->limit)
		return -1;
	if (gmem(v, tab->base + (sel & ~7u), d, 8, false, &xl))
		return -1;
	c->selector = sel;
	c->base = (d[0] >> 16) | ((d[1] & 0xff) << 16) | (d[1] & 0xff000000u);
	c->limit = (d[0] & 0xffff) | (d[1] & 0xf0000);
	if (d[1] & DESC_G)
		c->limit = (c->limit << 12) | 0xfff;
	c->flags = d[1] & 0x00f0ff00u;
	if (!(c->flags & DESC_P))
		return -1;
	return 0;
}

/* ------------------------------------------------------ event delivery -- */

static bool has_errcode(uint32_t vec)
{
	return vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21;
}

static int push(kvmfs_vcpu *v, uint64_t *sp, uint64_t ssbase, uint64_t mask, uint64_t val, int n)
{
	struct kvmfs_xlate xl;
	*sp = (*sp - n) & mask;
	return gmem(v, ssbase + *sp, &val, n, true, &xl);
}

/*
 * Deliver vector vec as the guest CPU would (env already loaded; stored back
 * on success).  ret_rip is the RIP to push (the faulting instruction for
 * faults, the next one for INT n and external interrupts).  Returns 0, or -1
 * when the delivery itself faults (the caller escalates to #DF / shutdown).
 */
static int deliver_once(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip)
{
	uint64_t rfl = ENV64(v, E_RFLAGS) | 2;
	uint64_t cr0 = ENV64(v, E_CR), efer = ENV64(v, E_EFER);
	struct segc *idt = segat(v, E_IDT), *cs = seg(v, R_CS), *ss = seg(v, R_SS);
	struct kvmfs_xlate xl;

	if (!(cr0 & CR0_PE)) {
		uint16_t ivt[2];
		if (vec * 4 + 3 > idt->limit)
			return -1;
		if (gmem(v, idt->base + vec * 4, ivt, 4, false, &xl))
			return -1;
		uint64_t sp = ENV64(v, 4 * 8) & 0xffff;
		if (push(v, &sp, ss->base, 0xffff, rfl, 2) || push(v, &sp, ss->base, 0xffff, cs->selector, 2) ||
		    push(v, &sp, ss->base, 0xffff, ret_rip, 2))
			return -1;
		ENV64(v, 4 * 8) = (ENV64(v, 4 * 8) & ~0xffffull) | sp;
		cs->selector = ivt[1];
		cs->base = (uint64_t)ivt[1] << 4;
		ENV64(v, E_RIP) = ivt[0];
		ENV64(v, E_RFLAGS) = rfl & ~(RF_IF | RF_TF | RF_AC | RF_RF);
		return 0;
	}

	bool lm = efer & EFER_LMA;
	uint32_t g[4] = { 0 };
	int gsz = lm ? 16 : 8;
	if (vec * gsz + gsz - 1 > idt->limit)
		return -1;
	if (gmem(v, idt->base + vec * gsz, g, gsz, false, &xl))
		return -1;
	uint32_t type = (g[1] >> 8) & 0x1f;
	if (!(g[1] & (1u << 15)))
		return -1;
	bool intgate = (type & 7) == 6, trapgate = (type & 7) == 7;
	if (!intgate && !trapgate)
		return -1;
	uint16_t sel = g[0] >> 16;
	uint64_t off = (g[0] & 0xffff) | (g[1] & 0xffff0000u);
	if (lm)
		off |= (uint64_t)g[2] << 32;
	struct segc ncs;
	if (load_desc(v, sel, &ncs))
		return -1;
	int cpl = ENV32(v, E_HFLAGS) & 3;
	int dpl = (ncs.flags >> DESC_DPL_SHIFT) & 3;
	if (ncs.flags & (1u << 10))          /* conforming: keep CPL */
		dpl = cpl;
	struct segc nss = *ss;
	uint64_t osp = ENV64(v, 4 * 8), sp = osp;
	bool stack_switch = dpl < cpl;
	struct segc *tr = segat(v, E_TR);
	if (lm) {
		int ist = g[1] & 7;
		if (stack_switch || ist) {
			uint64_t nsp;
			uint32_t o = ist ? 0x24 + 8 * (ist - 1) : 4 + 8 * dpl;
			if (gmem(v, tr->base + o, &nsp, 8, false, &xl))
				return -1;
			sp = nsp;
		}
		if (stack_switch) {
			nss.selector = dpl;
			nss.base = 0;
			nss.limit = 0xffffffff;
			nss.flags = DESC_P | DESC_S | (3u << DESC_TYPE_SHIFT) | DESC_B | DESC_G |
				    ((uint32_t)dpl << DESC_DPL_SHIFT) | DESC_UNUSABLE;
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
			if (gmem(v, tr->base + 4 + 8 * dpl, &esp0, 4, false, &xl) ||
			    gmem(v, tr->base + 8 + 8 * dpl, &ss0, 2, false, &xl) ||
			    load_desc(v, ss0, &nss))
				return -1;
			sp = esp0;
		}
		bool g32 = type & 8;
		int n = g32 ? 4 : 2;
		uint64_t m = (nss.flags & DESC_B) ? 0xffffffffull : 0xffffull;
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
	ncs.selector = (sel & ~3u) | dpl;
	*cs = ncs;
	*ss = nss;
	ENV64(v, 4 * 8) = sp;
	ENV64(v, E_RIP) = off;
	rfl &= ~(RF_TF | RF_NT | RF_RF | RF_VM);
	if (intgate)
		rfl &= ~RF_IF;
	ENV64(v, E_RFLAGS) = rfl;
	return 0;
}

/* Deliver with the double-fault / triple-fault rules.  Returns 0 or 1 = shutdown. */
#define DELIVERED 0
#define DELIVER_SHUTDOWN (-1)
#define DELIVER_NEED_HVA (-2)         /* nothing changed: register the memory, deliver again */

static int deliver_event(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip)
{
	v->gmem_miss = false;
	env_load(v);
	if (deliver_once(v, vec, errc, err, ret_rip) == 0) {
		env_store(v);
		return DELIVERED;
	}
	if (v->gmem_miss)
		return DELIVER_NEED_HVA;  /* the IVT/IDT, GDT or stack is not mapped yet */
	if (vec != 8) {
		env_load(v);
		if (deliver_once(v, 8, true, 0, ret_rip) == 0) {
			env_store(v);
			return DELIVERED;
		}
		if (v->gmem_miss)
			return DELIVER_NEED_HVA;
	}
	v->shutdown = true;
	return DELIVER_SHUTDOWN;
}

static void set_cr2(kvmfs_vcpu *v, uint64_t va) { wreg(v, UC_X86_REG_CR2, va); }

/* ------------------------------------------------------------------ SMM -- */

/* KVM picks the state-save layout by the guest's CPUID: long mode or not. */
static bool guest_has_lm(kvmfs_vcpu *v)
{
	const struct kvm_cpuid_entry2 *e = cpuid_find(v, 0x80000001, 0);
	return e && (e->edx & (1u << 29));
}

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
static int enter_smm(kvmfs_vcpu *v)
{
	struct kvmfs_smm_state st;
	uint8_t map[KVMFS_SMRAM_MAP_SIZE];
	struct kvmfs_xlate xl;
	bool lm = guest_has_lm(v);

	smm_state_now(v, &st);
	kvmfs_smram_save(map, &st, lm);
	int k = gphys(v, 1, (uint64_t)v->smbase + 0xfe00, map, sizeof map, true, &xl);
	if (k == KVMFS_XL_NEED_HVA)
		return KVMFS_RUN_NEED_HVA;          /* miss_hva set by copy_guest */
	if (k) {
		v->miss_hva = (uint64_t)v->smbase + 0xfe00;   /* reported by the caller */
		return KVMFS_RUN_VM_DEAD;
	}
	v->smi_pending = false;
	v->in_smm = true;
	v->stats.smis++;

	struct kvm_regs *r = &st.regs;
	struct kvm_sregs *s = &st.sregs;
	r->rflags = 2;
	r->rip = 0x8000;
	s->cr0 &= ~(CR0_PE | CR0_EM | CR0_TS | CR0_PG);
	s->cr4 = 0;
	s->idt.base = 0;
	s->idt.limit = 0;                 /* undocumented, as KVM */
	struct kvm_segment data = { .base = 0, .limit = 0xffffffff, .selector = 0, .type = 3,
				    .present = 1, .s = 1, .g = 1 };
	s->ds = s->es = s->fs = s->gs = s->ss = data;
	s->cs = data;
	s->cs.selector = (v->smbase >> 4) & 0xffff;
	s->cs.base = v->smbase;
	s->efer = lm ? 0 : s->efer & ~(EFER_LME | EFER_LMA);
	kvmfs_vcpu_set_sregs(v, s);
	kvmfs_vcpu_set_regs(v, r);
	wreg(v, UC_X86_REG_DR7, 0x400);
	return 0;
}

/*
 * RSM (KVM's emulator_leave_smm), reached as the #UD unicorn raises for RSM
 * outside its own SMM.  Returns 0, KVMFS_RUN_NEED_HVA (nothing changed; RSM
 * runs again), or 1 when the state cannot be entered: KVM then triple-faults.
 */
static int leave_smm(kvmfs_vcpu *v)
{
	struct kvmfs_smm_state st;
	uint8_t map[KVMFS_SMRAM_MAP_SIZE];
	struct kvmfs_xlate xl;
	bool lm = guest_has_lm(v);

	int k = gphys(v, 1, (uint64_t)v->smbase + 0xfe00, map, sizeof map, false, &xl);
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
		s->efer &= ~EFER_LMA;
		if ((s->efer & EFER_LME) && (s->cr0 & CR0_PG))
			s->efer |= EFER_LMA;
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
static bool at_rsm(kvmfs_vcpu *v)
{
	uint8_t b[2] = { 0, 0 };
	struct kvmfs_xlate xl;
	return !gmem(v, live_pc(v), b, 2, false, &xl) && b[0] == 0x0f && b[1] == 0xaa;
}

/* ------------------------------------------------------------- lifecycle -- */

static void reset_state(kvmfs_vcpu *v)
{
	struct kvm_sregs s;
	struct kvm_regs r;

	memset(&r, 0, sizeof r);
	r.rip = 0xfff0;
	r.rflags = 2;
	r.rdx = 0x600;
	memset(&s, 0, sizeof s);
	struct kvm_segment data = { .base = 0, .limit = 0xffff, .selector = 0, .type = 3,
				    .present = 1, .s = 1 };
	s.cs = data;
	s.cs.selector = 0xf000;
	s.cs.base = 0xffff0000;
	s.cs.type = 11;
	s.ds = s.es = s.fs = s.gs = s.ss = data;
	s.tr = (struct kvm_segment){ .limit = 0xffff, .type = 11, .present = 1 };
	s.ldt = (struct kvm_segment){ .limit = 0xffff, .type = 2, .present = 1 };
	s.gdt.limit = 0xffff;
	s.idt.limit = 0xffff;
	s.cr0 = 0x60000010;
	s.apic_base = 0xfee00900;
	kvmfs_vcpu_set_sregs(v, &s);
	kvmfs_vcpu_set_regs(v, &r);
}

static int engine_open(kvmfs_vcpu *v, int idx)
{
	struct engine *e = &v->eng[idx];
	uc_hook h;

	if (uc_open(UC_ARCH_X86, UC_MODE_64, &e->uc))
		return -ENOMEM;
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
	     uc_mmio_map(e->uc, WIN_BASE, WIN_PAGES * 4096, win_read, v, win_write, v)))
		return -ENOMEM;
	if (!v->ctx && (uc_context_alloc(e->uc, &v->ctx) || uc_context_alloc(e->uc, &v->ctx_step)))
		return -ENOMEM;
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
static void use_engine(kvmfs_vcpu *v, int idx)
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
	v->live_env = e->env;
}

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
	v->apic_base = 0xfee00900;
	v->smbase = 0x30000;
	reset_state(v);
	if (run) {
		run->apic_base = v->apic_base;
	}
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

KVMFS_API void kvmfs_vcpu_kick(kvmfs_vcpu *v)
{
	request(v, ATTN_KICK);
}

static void intr_signal(int sig)
{
	kvmfs_vcpu *v = cur_vcpu;
	if (v)
		kvmfs_vcpu_kick(v);
}

KVMFS_API int kvmfs_vcpu_install_intr_signal(int signo)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = intr_signal;
	sigemptyset(&sa.sa_mask);
	sa.sa_flags = 0;                  /* no SA_RESTART: interrupt the FUSE read too */
	return sigaction(signo, &sa, NULL) ? -errno : 0;
}

/* -------------------------------------------------------------- the run -- */

static void fill_run_flags(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;
	uint64_t fl = rreg(v, UC_X86_REG_EFLAGS);

	run->if_flag = !!(fl & RF_IF);
	run->ready_for_interrupt_injection = run->if_flag && !v->irq_pending &&
					     !(v->why == WHY_STEP && v->shadow);
	run->cr8 = v->cr8;
	run->apic_base = v->apic_base;
	run->flags = v->in_smm ? 1 : 0;   /* KVM_RUN_X86_SMM */
}

static int exit_to(kvmfs_vcpu *v, uint32_t reason)
{
	v->run->exit_reason = reason;
	v->stats.exits[reason < 64 ? reason : 63]++;
	v->stats.last_exit_reason = reason;
	return 0;
}

static int internal_error(kvmfs_vcpu *v, uint32_t sub)
{
	struct kvm_run *run = v->run;
	memset(&run->internal, 0, sizeof(run->internal));
	run->internal.suberror = sub;
	return exit_to(v, 17);
}

/* deliver_event's answer for a caller that stops the run: 1 with *rc set. */
static int delivery_stops(kvmfs_vcpu *v, int r, int *rc)
{
	if (r == DELIVER_SHUTDOWN) {
		*rc = exit_to(v, 8);
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
static int raise_exception(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip,
			   int *rc)
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

/* One slice of emulation on engine idx from the current RIP.  Returns the uc_err. */
static uc_err slice(kvmfs_vcpu *v, int idx)
{
	uc_err e;

	use_engine(v, idx);
	uint64_t rip = *(uint64_t *)(v->live_env + E_RIP);
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

static uc_err step_one(kvmfs_vcpu *v) { return step_n(v, 1); }

/*
 * Run the MMIO instruction at RIP alone with the MMIO window mapped.  Returns
 * 1 when an exit to userspace was prepared, 0 to continue, <0 on error.
 */
static int mmio_instruction(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;
	uc_err e;

	uc_context_save(v->uc, v->ctx_step);
	v->mmio_step = true;
	v->reads_used = 0;
	v->read_missing = false;
	v->nwrites = 0;
	v->writes_reported = 0;
	e = step_one(v);
	v->mmio_step = false;
	uc_ctl_flush_tlb(v->uc);          /* drop the window mappings */
	if (v->read_missing) {
		uc_context_restore(v->uc, v->ctx_step);
		uc_ctl_flush_tlb(v->uc);
		v->pending = PEND_MMIO_READ;
		run->mmio.phys_addr = v->miss.gpa;
		run->mmio.len = v->miss.len;
		run->mmio.is_write = 0;
		memset(run->mmio.data, 0, 8);
		return exit_to(v, 6) + 1;
	}
	v->nreads = 0;
	v->pending = PEND_NONE;
	if (e != UC_ERR_OK && v->why == WHY_NONE)
		v->why = WHY_FILL;        /* handled by the caller as a fault */
	if (v->nwrites) {
		struct mmio_acc *a = &v->writes[0];
		run->mmio.phys_addr = a->gpa;
		run->mmio.len = a->len;
		run->mmio.is_write = 1;
		memcpy(run->mmio.data, &a->data, 8);
		v->writes_reported = 1;
		return exit_to(v, 6) + 1;
	}
	return 0;
}

/* Completion of the previous exit (OUT, IN data, MMIO read data). */
static int complete_pending(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;

	if (v->out_pending) {
		/* as KVM's complete_fast_pio_out: skip the OUT unless userspace
		 * moved RIP meanwhile */
		v->out_pending = false;
		v->why = WHY_NONE;
		if (rreg(v, UC_X86_REG_RIP) == v->out_rip)
			wreg(v, UC_X86_REG_RIP, v->out_next);
		return 0;
	}

	if (v->writes_reported && v->writes_reported < v->nwrites) {
		struct mmio_acc *a = &v->writes[v->writes_reported++];
		run->mmio.phys_addr = a->gpa;
		run->mmio.len = a->len;
		run->mmio.is_write = 1;
		memcpy(run->mmio.data, &a->data, 8);
		return exit_to(v, 6) + 1;
	}
	v->writes_reported = 0;
	if (v->pending == PEND_IN) {
		/* the IN has not run: it takes the data when it runs again */
		v->pending = PEND_NONE;
		v->why = WHY_NONE;
		v->pio_avail = run->io.count;
		v->pio_idx = 0;
		return 0;
	}
	if (v->pending == PEND_MMIO_READ) {
		if (v->nreads < MAX_MMIO_ACC) {
			struct mmio_acc *a = &v->reads[v->nreads++];
			a->gpa = run->mmio.phys_addr;
			a->len = run->mmio.len;
			a->data = 0;
			memcpy(&a->data, run->mmio.data, a->len > 8 ? 8 : a->len);
		}
		return mmio_instruction(v);
	}
	return 0;
}

static bool can_inject(kvmfs_vcpu *v)
{
	return (rreg(v, UC_X86_REG_EFLAGS) & RF_IF) != 0;
}

/* Handle the end of a slice; returns 1 = exit prepared (value in *rc), 0 = go on. */
static int handle_stop(kvmfs_vcpu *v, uc_err e, int *rc)
{
	struct kvm_run *run = v->run;

	switch (v->why) {
	case WHY_OUT:                     /* state set by out_hook */
		*rc = exit_to(v, 2);
		return 1;
	case WHY_IN:
		v->pending = PEND_IN;
		*rc = exit_to(v, 2);
		return 1;
	case WHY_IFOPEN:
		return 0;
	case WHY_INTR: {
		uint32_t vec = v->intno;
		uint64_t rip = rreg(v, UC_X86_REG_RIP);
		bool soft = false;
		uint8_t b[2] = { 0, 0 };
		struct kvmfs_xlate xl;
		uint64_t csb = 0;
		env_load(v);
		csb = seg(v, R_CS)->base;
		if (v->intr_rip >= 2 && !gmem(v, csb + v->intr_rip - 2, b, 2, false, &xl) &&
		    b[0] == 0xcd && b[1] == vec)
			soft = true;
		if (!soft && (vec == 3 || vec == 4) && !gmem(v, csb + v->intr_rip - 1, b, 1, false, &xl) &&
		    (b[0] == 0xcc || b[0] == 0xce))
			soft = true;
		(void)rip;
		return raise_exception(v, vec, !soft && has_errcode(vec), soft ? 0 : v->intr_err,
				       v->intr_rip, rc);
	}
	case WHY_FILL:
		if (v->code_stale) {
			code_page_drop(&v->eng[v->cur], v->fill_vaddr);
			return 0;
		}
		if (v->fill_remap) {
			*rc = map_hostmem(v);
			return *rc ? 1 : 0;
		}
		switch (v->fx.kind) {
		case KVMFS_XL_MMIO:
			if (v->fill_access == KVMFS_ACC_FETCH) {
				*rc = internal_error(v, 1);
				return 1;
			}
			{
				int r = mmio_instruction(v);
				if (r < 0) { *rc = r; return 1; }
				if (r > 0) { *rc = 0; return 1; }
				if (v->why == WHY_FILL && v->fx.kind != KVMFS_XL_MMIO)
					return handle_stop(v, UC_ERR_OK, rc);
				return 0;
			}
		case KVMFS_XL_PF:
			set_cr2(v, v->fill_vaddr);
			return raise_exception(v, 14, true, v->fx.pf_error_code,
					       rreg(v, UC_X86_REG_RIP), rc);
		case KVMFS_XL_NEED_HVA:
			v->miss_hva = v->fx.hva;
			*rc = KVMFS_RUN_NEED_HVA;
			return 1;
		case KVMFS_XL_EFAULT:
		default:
			run->exit_reason = 0;
			*rc = -EFAULT;
			return 1;
		}
	default:
		break;
	}
	if (e == UC_ERR_INSN_INVALID) {
		if (v->in_smm && at_rsm(v)) {
			int r = leave_smm(v);
			if (r == KVMFS_RUN_NEED_HVA) {
				*rc = r;
				return 1;
			}
			if (r) {
				v->shutdown = true;   /* a state RSM cannot enter: triple fault */
				*rc = exit_to(v, 8);
				return 1;
			}
			return 0;
		}
		return raise_exception(v, 6, false, 0, rreg(v, UC_X86_REG_RIP), rc);
	}
	if (v->attn & ATTN_FLUSH) {
		do_flush(v);
		return 0;
	}
	if (v->attn & ATTN_KICK) {
		__atomic_and_fetch(&v->attn, ~ATTN_KICK, __ATOMIC_SEQ_CST);
		run->exit_reason = 10;
		v->stats.exits[10]++;
		*rc = -EINTR;
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
		if (!gmem(v, seg(v, R_CS)->base + rip - 1, &b, 1, false, &xl) && b == 0xf4) {
			if (v->irq_pending && can_inject(v))
				return 0;         /* sti; hlt with an interrupt queued */
			*rc = exit_to(v, 5);
			return 1;
		}
		return 0;
	}
	*rc = internal_error(v, 1);
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

	if (run->kvm_valid_regs & ~7ull)
		return -EINVAL;
	if (run->cr8 > 15)
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
	run->exit_reason = 0;
	if (v->shutdown) {
		rc = exit_to(v, 8);
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
			__atomic_and_fetch(&v->attn, ~ATTN_KICK, __ATOMIC_SEQ_CST);
			run->exit_reason = 10;
			v->stats.exits[10]++;
			rc = -EINTR;
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
			rc = exit_to(v, 7);
			goto out;
		}
		bool watch = (v->irq_pending || run->request_interrupt_window) && !can_inject(v);
		v->shadow = false;
		if (watch)
			__atomic_or_fetch(&v->attn, ATTN_WATCH_IF, __ATOMIC_SEQ_CST);
		else
			__atomic_and_fetch(&v->attn, ~ATTN_WATCH_IF, __ATOMIC_SEQ_CST);
		if (v->debug_ctl & 2) {
			v->run->debug.exception = 1;
			uc_err e = step_one(v);
			if (v->why != WHY_NONE || e != UC_ERR_OK) {
				if (handle_stop(v, e, &rc))
					goto out;
			}
			memset(&run->debug, 0, sizeof(run->debug));
			run->debug.exception = 1;
			env_load(v);
			run->debug.pc = seg(v, R_CS)->base + rreg(v, UC_X86_REG_RIP);
			rc = exit_to(v, 4);
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
	out->rflags = rreg(v, UC_X86_REG_RFLAGS) | 2;
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
	ENV64(v, E_RIP) = in->rip;
	ENV64(v, E_RFLAGS) = in->rflags | 2;
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

	memset(out, 0, sizeof(*out));
	env_load(v);
	for (int i = 0; i < 6; i++)
		flags_to_kseg(seg(v, order[i]), dst[i]);
	flags_to_kseg(segat(v, E_TR), &out->tr);
	flags_to_kseg(segat(v, E_LDT), &out->ldt);
	out->gdt.base = segat(v, E_GDT)->base;
	out->gdt.limit = segat(v, E_GDT)->limit;
	out->idt.base = segat(v, E_IDT)->base;
	out->idt.limit = segat(v, E_IDT)->limit;
	out->cr0 = ENV64(v, E_CR);
	out->cr2 = ENV64(v, E_CR + 16);
	out->cr3 = ENV64(v, E_CR + 24);
	out->cr4 = ENV64(v, E_CR + 32);
	out->cr8 = v->cr8;
	out->efer = ENV64(v, E_EFER);
	out->apic_base = v->apic_base;
	if (v->irq_pending)
		out->interrupt_bitmap[v->irq / 64] = 1ull << (v->irq % 64);
	return 0;
}

#define CR4_RESERVED (~0x3f7fffull)   /* bits KVM accepts on a modern host, roughly */

KVMFS_API int kvmfs_vcpu_set_sregs(kvmfs_vcpu *v, const struct kvm_sregs *in)
{
	uint64_t cr0 = in->cr0, cr4 = in->cr4, efer = in->efer;

	/* spec 10.1: reject inconsistent control state */
	if ((cr0 & CR0_PG) && !(cr0 & CR0_PE))
		return -EINVAL;
	if (cr0 >> 32)
		return -EINVAL;
	if (cr4 & CR4_RESERVED)
		return -EINVAL;
	if ((efer & EFER_LME) && (cr0 & CR0_PG)) {
		if (!(cr4 & CR4_PAE) || !(efer & EFER_LMA))
			return -EINVAL;
	} else {
		if ((efer & EFER_LMA) || in->cs.l)
			return -EINVAL;
	}

	env_load(v);
	set_segc(seg(v, R_CS), &in->cs);
	set_segc(seg(v, R_DS), &in->ds);
	set_segc(seg(v, R_ES), &in->es);
	set_segc(seg(v, R_FS), &in->fs);
	set_segc(seg(v, R_GS), &in->gs);
	set_segc(seg(v, R_SS), &in->ss);
	set_segc(segat(v, E_TR), &in->tr);
	set_segc(segat(v, E_LDT), &in->ldt);
	segat(v, E_GDT)->base = in->gdt.base;
	segat(v, E_GDT)->limit = in->gdt.limit;
	segat(v, E_IDT)->base = in->idt.base;
	segat(v, E_IDT)->limit = in->idt.limit;
	ENV64(v, E_CR) = cr0;
	ENV64(v, E_CR + 16) = in->cr2;
	ENV64(v, E_CR + 24) = in->cr3;
	ENV64(v, E_CR + 32) = cr4;
	ENV64(v, E_EFER) = efer;
	env_store(v);
	v->cr8 = in->cr8 & 15;
	v->apic_base = in->apic_base;
	v->irq_pending = false;
	for (int i = 0; i < 256; i++) {
		if (in->interrupt_bitmap[i / 64] & (1ull << (i % 64))) {
			v->irq_pending = true;
			v->irq = i;
			break;
		}
	}
	return 0;
}

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

static bool msr_known(uint32_t idx)
{
	switch (idx) {
	case 0x10: case 0x1b: case 0x174: case 0x175: case 0x176: case 0x277:
	case 0xc0000080: case 0xc0000081: case 0xc0000082: case 0xc0000083:
	case 0xc0000084: case 0xc0000100: case 0xc0000101: case 0xc0000102:
	case 0x9e:                        /* MSR_IA32_SMBASE: host accesses only */
		return true;
	}
	return false;
}

KVMFS_API int kvmfs_vcpu_get_msrs(kvmfs_vcpu *v, struct kvm_msr_entry *e, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		if (!msr_known(e[i].index))
			return i;
		if (e[i].index == 0x1b) {
			e[i].data = v->apic_base;
		} else if (e[i].index == 0x9e) {
			e[i].data = v->smbase;
		} else if (e[i].index == 0xc0000080) {
			env_load(v);
			e[i].data = ENV64(v, E_EFER);
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
	for (uint32_t i = 0; i < n; i++) {
		if (!msr_known(e[i].index))
			return i;
		if (e[i].index == 0x1b) {
			v->apic_base = e[i].data;
		} else if (e[i].index == 0x9e) {
			v->smbase = e[i].data;
		} else if (e[i].index == 0xc0000080) {
			env_load(v);
			ENV64(v, E_EFER) = e[i].data;
			env_store(v);
		} else {
			uc_x86_msr m = { e[i].index, e[i].data };
			if (uc_reg_write(v->uc, UC_X86_REG_MSR, &m))
				return i;
		}
	}
	return n;
}

KVMFS_API int kvmfs_vcpu_set_cpuid(kvmfs_vcpu *v, const struct kvm_cpuid_entry2 *e, uint32_t n)
{
	if (n > 256)
		return -E2BIG;
	if (v->has_run) {
		/* as KVM since 5.16: after KVM_RUN only the same table is accepted */
		if (n != v->ncpuid)
			return -EINVAL;
		for (uint32_t i = 0; i < n; i++)
			if (memcmp(&e[i], &v->cpuid[i], offsetof(struct kvm_cpuid_entry2, padding)))
				return -EINVAL;
		return 0;
	}
	struct kvm_cpuid_entry2 *t = malloc((n ? n : 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	memcpy(t, e, n * sizeof(*t));
	free(v->cpuid);
	v->cpuid = t;
	v->ncpuid = n;
	return 0;
}

KVMFS_API int kvmfs_supported_cpuid(struct kvm_cpuid_entry2 *out, uint32_t max)
{
	static const struct kvm_cpuid_entry2 list[] = {
		{ .function = 0, .eax = 0xd, .ebx = 0x756e6547, .ecx = 0x6c65746e, .edx = 0x49656e69 },
		{ .function = 1, .eax = 0x663, .ecx = 0x80202001, .edx = 0x0789fbff },
		{ .function = 7, .flags = 1 },
		{ .function = 0x80000000, .eax = 0x80000008 },
		{ .function = 0x80000001, .ecx = 1, .edx = 0x20100800 },
		{ .function = 0x80000008, .eax = 0x3028 },
	};
	uint32_t n = sizeof(list) / sizeof(list[0]);
	if (max < n)
		return -E2BIG;
	memcpy(out, list, sizeof(list));
	return n;
}

KVMFS_API int kvmfs_vcpu_interrupt(kvmfs_vcpu *v, uint32_t irq)
{
	if (irq >= 256)
		return -EINVAL;
	v->irq = irq;
	v->irq_pending = true;
	return 0;
}

KVMFS_API int kvmfs_vcpu_smi(kvmfs_vcpu *v)
{
	v->smi_pending = true;            /* taken at the next KVM_RUN, or after RSM */
	return 0;
}

#define EV_VALID_NMI_PENDING 1u
#define EV_VALID_SIPI_VECTOR 2u
#define EV_VALID_SHADOW 4u
#define EV_VALID_SMM 8u
#define EV_VALID_PAYLOAD 16u
#define EV_VALID_TRIPLE_FAULT 32u

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
	out->interrupt.shadow = (ENV32(v, E_HFLAGS) & HF_INHIBIT_IRQ) ? 1 : 0;   /* STI */
	out->smi.smm = v->in_smm;
	out->smi.pending = v->smi_pending;
	out->smi.smm_inside_nmi = v->smm_inside_nmi;
	out->flags = EV_VALID_NMI_PENDING | EV_VALID_SHADOW | EV_VALID_SMM;
	return 0;
}

/* As KVM's kvm_vcpu_ioctl_x86_set_vcpu_events without an in-kernel LAPIC, with
 * exception payloads and triple-fault events not enabled.  NMIs are not
 * modelled: a pending or injected NMI is refused (EINVAL). */
KVMFS_API int kvmfs_vcpu_set_events(kvmfs_vcpu *v, const struct kvm_vcpu_events *in)
{
	if (in->flags & ~(EV_VALID_NMI_PENDING | EV_VALID_SIPI_VECTOR | EV_VALID_SHADOW |
			  EV_VALID_SMM | EV_VALID_PAYLOAD | EV_VALID_TRIPLE_FAULT))
		return -EINVAL;
	if (in->flags & (EV_VALID_PAYLOAD | EV_VALID_TRIPLE_FAULT))
		return -EINVAL;           /* their capabilities are not enabled */
	if (in->exception.injected && (in->exception.nr > 31 || in->exception.nr == 2))
		return -EINVAL;
	if (in->nmi.injected || ((in->flags & EV_VALID_NMI_PENDING) && in->nmi.pending))
		return -EINVAL;

	v->exc_pending = in->exception.injected;
	v->exc_nr = in->exception.nr;
	v->exc_has_err = in->exception.has_error_code;
	v->exc_err = in->exception.error_code;
	v->irq_pending = in->interrupt.injected;
	v->irq = in->interrupt.nr;
	if (in->flags & EV_VALID_SHADOW) {
		env_load(v);
		ENV32(v, E_HFLAGS) &= ~HF_INHIBIT_IRQ;
		if (in->interrupt.shadow & 3)
			ENV32(v, E_HFLAGS) |= HF_INHIBIT_IRQ;
		env_store(v);
	}
	if (in->flags & EV_VALID_SMM) {
		v->in_smm = in->smi.smm;
		v->smi_pending = in->smi.pending;
		v->smm_inside_nmi = in->smi.smm && in->smi.smm_inside_nmi;
		uc_ctl_flush_tlb(v->uc);  /* a different address space from the next access on */
	}
	return 0;
}

KVMFS_API int kvmfs_vcpu_set_guest_debug(kvmfs_vcpu *v, uint32_t control)
{
	v->debug_ctl = (control & 1) ? control : 0;
	return 0;
}

KVMFS_API void kvmfs_vcpu_get_stats(kvmfs_vcpu *v, struct kvmfs_vcpu_stats *out)
{
	*out = v->stats;
}
