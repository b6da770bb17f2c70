/*
 * vcpu_internal.h - what the vCPU-side sources share (engine.c, vcpu.c,
 * vcpu_mem.c, pio.c, mmio.c, events.c, regs.c, cpuid.c, smm.c): the vCPU
 * object, the named view of the CPU state, and the functions one file calls
 * in another.  The MMU side never includes it.
 *
 * Threading (all of it): kvmfs_vcpu_run runs in the caller's thread;
 * everything else but kvmfs_vcpu_kick must not run concurrently with it
 * (Python serialises vCPU ioctls per vCPU), so the object needs no lock.
 * Only `attn` and `running` are touched from other threads (atomics).
 */
#ifndef KVMFS_VCPU_INTERNAL_H
#define KVMFS_VCPU_INTERNAL_H

#include <stdbool.h>
#include <unicorn/unicorn.h>

#include "kvmfs_internal.h"

/* General registers in architectural order (the order QEMU keeps them in). */
enum { GPR_RAX, GPR_RCX, GPR_RDX, GPR_RBX, GPR_RSP, GPR_RBP, GPR_RSI, GPR_RDI };

/* Segment registers in architectural order (ES CS SS DS FS GS). */
enum { R_ES, R_CS, R_SS, R_DS, R_FS, R_GS };

#define DESC_UNUSABLE 1u              /* kvmfs-private bit (QEMU ignores flags[7:0]) */

/* A segment's hidden state: QEMU's SegmentCache (engine.c checks it). */
struct segc { uint32_t selector; uint32_t pad; uint64_t base; uint32_t limit; uint32_t flags; };

/*
 * Named pointers into one copy of QEMU's CPUX86State: either a vCPU's
 * uc_context copy (v->cx, edited between env_load and env_store) or an
 * engine's live state (v->live, read by hooks during emulation).  engine.c
 * fills them; no other file knows an offset.
 */
struct cpu_env {
	uint64_t *regs;               /* GPR_* then R8..R15 */
	uint64_t *rip;
	uint64_t *rflags;             /* full RFLAGS in v->cx after env_load */
	int32_t *df;                  /* +1 / -1 (live: QEMU's DF) */
	struct segc *segs;            /* R_ES..R_GS */
	struct segc *ldt, *tr, *gdt, *idt;
	uint64_t *cr;                 /* cr[0], cr[2], cr[3], cr[4] */
	uint64_t *efer;
	uint32_t *hflags;             /* QEMU's derived mode bits: use env_* below */
	uint64_t *cc_src;
	uint32_t *cc_op;
	uint32_t *error_code;         /* of the exception being raised */
	int32_t *old_exception;       /* exception in flight (QEMU's #DF promotion) */
};

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

struct engine {
	uc_engine *uc;
	uint8_t *cpu;                     /* QEMU's CPUState (for cpu_loop_exit) */
	struct cpu_env env;               /* its live CPU state */
	struct code_page code[CODE_PAGES];
};

/* kvm_run's IO data area: its offset, and how much of it one IN exit fills */
#define PIO_DATA_OFFSET (KVM_PIO_PAGE_OFFSET * PAGE_SIZE)
#define PIO_DATA_MAX 1024u

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
	uc_engine *uc;                    /* the current engine's */
	kvmfs_mmu *mmu;
	uint32_t id;
	struct kvm_run *run;
	struct kvmfs_flush_client fc;
	uc_context *ctx, *ctx_step;
	struct cpu_env cx;                /* view of ctx */
	struct engine eng[2];
	int cur;                          /* engine holding the state: uc/cpu/live are its */
	uint8_t *cpu;
	struct cpu_env *live;             /* the current engine's live state */
	volatile int attn;
	volatile int running;             /* 1 + engine inside uc_emu_start, or 0 */

	/* host ranges mapped into this engine (vcpu_mem.c) */
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

	/* port I/O (pio.c) */
	int pending;
	uint32_t pio_avail, pio_idx, pio_size;
	bool out_pending;                 /* RIP left on an OUT: the next run skips it */
	uint64_t out_rip, out_next;

	/* MMIO single-step (mmio.c) */
	bool mmio_step;
	uint64_t win_gpa[WIN_PAGES];
	int win_next;
	struct mmio_acc reads[MAX_MMIO_ACC];
	int nreads, reads_used;
	uint64_t rd_paddr;                /* the last read as the guest asked (mmio_read_hook) */
	int rd_size;
	bool read_missing;
	struct mmio_acc miss;
	struct mmio_acc writes[MAX_MMIO_ACC];
	int nwrites, writes_reported;

	/* events (events.c, smm.c) */
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
	uint32_t maxphyaddr;              /* guest physical-address width, from the table */
	bool has_run;                     /* KVM_SET_CPUID2 may then only repeat the table */

	/* registers kept outside the engine */
	uint64_t cr8, apic_base, tsc_offset;
	struct kvmfs_vcpu_stats stats;
};

static inline uint64_t rreg(kvmfs_vcpu *v, int r) { uint64_t x = 0; uc_reg_read(v->uc, r, &x); return x; }
static inline void wreg(kvmfs_vcpu *v, int r, uint64_t x) { uc_reg_write(v->uc, r, &x); }

/* ---- engine.c: unicorn and QEMU internals ---- */
int engine_open(kvmfs_vcpu *v, int idx);
void use_engine(kvmfs_vcpu *v, int idx);
void env_load(kvmfs_vcpu *v);
void env_store(kvmfs_vcpu *v);
int env_cpl(const struct cpu_env *e);
int env_code_bits(const struct cpu_env *e);  /* 16, 32 or 64: the CS default size */
bool env_irq_shadow(const struct cpu_env *e);
void env_set_irq_shadow(struct cpu_env *e, bool on);
void env_exception_taken(struct cpu_env *e);
void __attribute__((noreturn)) stop_here(kvmfs_vcpu *v);

/* ---- vcpu_mem.c: guest memory as the vCPU sees it ---- */
void paging_now(kvmfs_vcpu *v, struct kvmfs_paging *pg, int cpl);
uint64_t live_pc(kvmfs_vcpu *v);
int gmem(kvmfs_vcpu *v, uint64_t la, void *buf, uint32_t len, bool write, struct kvmfs_xlate *xl);
int gphys(kvmfs_vcpu *v, uint32_t as_id, uint64_t gpa, void *buf, uint32_t len, bool write,
	  struct kvmfs_xlate *xl);
int map_hostmem(kvmfs_vcpu *v);
void code_page_drop(struct engine *e, uint64_t la);
void code_at_refresh(kvmfs_vcpu *v, int idx, uint64_t la);
bool tlb_fill(uc_engine *uc, uint64_t va, uc_mem_type type, uc_tlb_entry *e, void *ud);

/* ---- vcpu.c: the run loop ---- */
int exit_to(kvmfs_vcpu *v, uint32_t reason);
uc_err step_one(kvmfs_vcpu *v);
void code_hook(uc_engine *uc, uint64_t addr, uint32_t size, void *ud);

/* ---- pio.c: port I/O ---- */
void out_hook(uc_engine *uc, uint32_t port, int size, uint32_t value, void *ud);
uint32_t in_hook(uc_engine *uc, uint32_t port, int size, void *ud);
int pio_complete_out(kvmfs_vcpu *v);
int pio_complete_in(kvmfs_vcpu *v);

/* ---- mmio.c: the MMIO window and replay; 1 = exit prepared, 0 = go on, <0 error ---- */
void mmio_read_hook(uc_engine *uc, uc_mem_type type, uint64_t paddr, int size, int64_t value,
		    void *ud);
uint64_t win_read(uc_engine *uc, uint64_t off, unsigned size, void *ud);
void win_write(uc_engine *uc, uint64_t off, unsigned size, uint64_t value, void *ud);
int mmio_instruction(kvmfs_vcpu *v);
int mmio_next_write(kvmfs_vcpu *v);
int mmio_complete_read(kvmfs_vcpu *v);

/* ---- events.c: exception and interrupt delivery ---- */
#define DELIVERED 0
#define DELIVER_SHUTDOWN (-1)
#define DELIVER_NEED_HVA (-2)         /* nothing changed: register the memory, deliver again */
void intr_hook(uc_engine *uc, uint32_t intno, void *ud);
int deliver_event(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip);
int delivery_stops(kvmfs_vcpu *v, int r, int *rc);
int raise_exception(kvmfs_vcpu *v, uint32_t vec, bool errc, uint32_t err, uint64_t ret_rip, int *rc);
int raise_guest_intr(kvmfs_vcpu *v, int *rc);
int raise_page_fault(kvmfs_vcpu *v, int *rc);
bool can_inject(kvmfs_vcpu *v);

/* ---- regs.c: registers, FPU, MSRs, reset ---- */
void reset_state(kvmfs_vcpu *v);

/* ---- cpuid.c ---- */
int cpuid_hook(uc_engine *uc, void *ud);
bool guest_has_lm(kvmfs_vcpu *v);
uint32_t guest_maxphyaddr(kvmfs_vcpu *v);

/* ---- smm.c: SMM entry and RSM ---- */
int enter_smm(kvmfs_vcpu *v);
int leave_smm(kvmfs_vcpu *v);
bool at_rsm(kvmfs_vcpu *v);

#endif
