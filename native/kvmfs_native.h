/*
 * kvmfs_native.h - the fast path's exported API (cffi cdef input).
 *
 * Conventions: functions return 0 (or a count) on success and -errno on
 * failure; they never print and never abort.  Exported names are
 * kvmfs_<concept>_<verb>.  One section per .c file, in the order MMU side
 * (mmu.c, memslot.c, hostmem.c, spte.c, flush.c, dirty.c), vCPU side (vcpu.c,
 * regs.c, cpuid.c, events.c, smm.c), views.c.  Each section says who calls
 * it: "Python" is kvmfs/_native.py's users (the daemon), "C" another native
 * file (named); tests (t1_native_mmu, t3_vcpu) may call anything.
 * Internal declarations are in kvmfs_internal.h and vcpu_internal.h, never here.
 *
 * Units: gpa/hva are byte addresses, gfn is a page number, size is in bytes,
 * npages in 4 KiB pages.
 */

/* ------------------------------------------------------------------- mmu.c --
 * One kvmfs_mmu per VM: memslots of both address spaces, the host memory the
 * daemon has mapped for them, sptes with reverse maps, dirty bitmaps.  All of
 * it is guarded by the mmu's own lock; every function below takes it.
 * Python: new, free, get_stats.  C (vcpu_mem.c): translate, on every unicorn
 * TLB miss and for the vCPU's own guest accesses.
 */
typedef struct kvmfs_mmu kvmfs_mmu;

kvmfs_mmu *kvmfs_mmu_new(void);
void kvmfs_mmu_free(kvmfs_mmu *mmu);

struct kvmfs_paging {         /* the guest state a walk depends on */
	uint64_t cr0, cr3, cr4, efer;
	uint32_t cpl;
	uint32_t as_id;           /* 1 while the vCPU is in SMM */
	uint32_t maxphyaddr;      /* the guest's physical-address width (0: 52) */
	uint32_t pad;
};

#define KVMFS_ACC_READ 0
#define KVMFS_ACC_WRITE 1
#define KVMFS_ACC_FETCH 2

#define KVMFS_XL_OK 0         /* host/uphys/perms valid */
#define KVMFS_XL_MMIO 1       /* gpa has no slot, or write to a READONLY slot */
#define KVMFS_XL_PF 2         /* guest page fault: pf_error_code, vaddr -> CR2 */
#define KVMFS_XL_NEED_HVA 3   /* slot's host memory not registered: resolve hva */
#define KVMFS_XL_EFAULT 4     /* host memory cannot back the slot (EFAULT to KVM_RUN) */

struct kvmfs_xlate {
	int32_t kind;             /* KVMFS_XL_* */
	uint32_t perms;           /* UC_PROT_* granted for this page (OK) */
	uint64_t gpa;             /* of vaddr's page (all kinds but PF) */
	uint64_t uphys;           /* unicorn-physical address of the page (OK) */
	void *host;               /* daemon address of the page (OK) */
	uint64_t hva;             /* NEED_HVA / EFAULT: the VMM address */
	uint32_t pf_error_code;   /* PF */
	uint32_t pad;
};

/*
 * Translate one guest-linear page for an access: walk the guest page tables
 * when CR0.PG (32-bit, PSE, PAE, 4-level; U/S, R/W, NX, CR0.WP; guest A/D bits
 * set as hardware does) or take vaddr as the gpa; find the slot; install or
 * reuse the spte (rmap, A/D, write permission; dirty-log write-protect fault
 * sets the bitmap bit).  A write to a clean logged page is granted write and
 * marked dirty; read/fetch of it is granted read/exec only, so the first
 * write comes back here.
 */
int kvmfs_mmu_translate(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t vaddr,
			int access, struct kvmfs_xlate *out);

struct kvmfs_mmu_stats {
	uint64_t fills, walks, walk_faults, mmio_faults, sptes, spte_creates;
	uint64_t zaps, wp_faults, flushes, kicks, notifier_calls, dirty_pages_logged;
	uint64_t notifier_zaps, notifier_retries;
};
void kvmfs_mmu_get_stats(kvmfs_mmu *mmu, struct kvmfs_mmu_stats *out);

/* --------------------------------------------------------------- memslot.c --
 * KVM_SET_USER_MEMORY_REGION and the slot queries.  Python (memslots.py,
 * vm.py, views.py); C (views.c): get.
 */
struct kvmfs_slot_info {
	uint32_t as_id;
	uint32_t id;
	uint32_t flags;           /* KVM_MEM_* */
	uint32_t pad;
	uint64_t base_gfn;
	uint64_t npages;
	uint64_t userspace_addr;
	uint64_t dirty_count;     /* pages set in the dirty bitmap (0 when not logging) */
};

/* Change kinds reported by kvmfs_memslot_set (KVM's enum kvm_mr_change). */
#define KVMFS_MR_CREATE 1
#define KVMFS_MR_DELETE 2
#define KVMFS_MR_MOVE 3
#define KVMFS_MR_FLAGS_ONLY 4
#define KVMFS_MR_NONE 5

/*
 * Apply one KVM_SET_USER_MEMORY_REGION after the caller has checked the
 * argument fields (spec 7.2 steps 1-9): decides the change from the slot's
 * current state (spec 7.3: EINVAL / EEXIST rules), then commits it (zapping
 * the old mapping for DELETE/MOVE, allocating or freeing the dirty bitmap,
 * write-protecting when logging turns on).  Returns the KVMFS_MR_* kind or
 * -errno; nothing changes on error, and *why (when why is not NULL) names the
 * rule that refused it, a static string for the log.
 */
int kvmfs_memslot_set(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint32_t flags,
		      uint64_t gpa, uint64_t size, uint64_t hva, const char **why);
int kvmfs_memslot_get(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id,
		      struct kvmfs_slot_info *out);
/* Slots of one address space sorted by gpa, at most max; returns the count. */
int kvmfs_memslot_list(kvmfs_mmu *mmu, uint32_t as_id, struct kvmfs_slot_info *out, int max);
int kvmfs_memslot_count(kvmfs_mmu *mmu, uint32_t as_id);
uint64_t kvmfs_memslot_generation(kvmfs_mmu *mmu);

/* --------------------------------------------------------------- hostmem.c --
 * Ranges of the VMM's address space the daemon has mapped, and copies of
 * guest-physical memory.  Python (hostmem.py, vm.py): add, remove, read_gpa,
 * write_gpa.  C (vcpu_mem.c): list.
 */
/*
 * Register [hva, hva+size) of the VM owner's address space as mapped at
 * daemon address `ptr` (the daemon mmap'ed the same pages).  Ranges do not
 * overlap; Python resolves /proc/PID/maps and calls this once per range.
 */
/* flags: KVMFS_HOSTMEM_READONLY when the VMM's mapping lacks PROT_WRITE (guest
 * reads work, guest writes fail KVM_RUN with EFAULT, as KVM's hva_to_pfn). */
#define KVMFS_HOSTMEM_READONLY 1
int kvmfs_hostmem_add(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, void *ptr, uint32_t flags,
		      uint64_t seq);
/*
 * MMU-notifier invalidation, KVM's protocol: begin (in progress, range widened)
 * before the VMM's address space changes, hostmem_remove to zap and forget what
 * maps the range, end (sequence bumped) after.  A host range resolved outside
 * the lock is registered (hostmem_add) only with the sequence read before the
 * lookup, and -EAGAIN (retry) if it changed or an invalidation in progress
 * covers the range.
 */
void kvmfs_mmu_invalidate_begin(kvmfs_mmu *mmu, uint64_t start, uint64_t end);
void kvmfs_mmu_invalidate_end(kvmfs_mmu *mmu);
uint64_t kvmfs_mmu_invalidate_seq(kvmfs_mmu *mmu);
int kvmfs_mmu_invalidate_retry(kvmfs_mmu *mmu, uint64_t seq, uint64_t start, uint64_t end);
/*
 * MMU-notifier invalidation of [hva, hva+size): zap every spte mapping it
 * (all vCPUs' TLBs flushed before return) and forget the ranges it touches
 * (a range that overlaps it at all goes whole; at most max per call).
 * Returns the number of ranges removed; *ptrs and *sizes (up to max) get
 * their daemon mappings so the caller can munmap them.
 */
int kvmfs_hostmem_remove(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, uint64_t *zapped,
			 void **ptrs, uint64_t *sizes, int max);

/* Host-memory ranges as unicorn sees them: each is uc_mem_map_ptr'ed once per
 * engine at uphys.  Append-only list; removed ranges keep their index with
 * size 0.  Returns the number of ranges (index space), fills up to max. */
struct kvmfs_hostmem_info {
	uint64_t hva, size, uphys;
	void *ptr;
};
int kvmfs_hostmem_list(kvmfs_mmu *mmu, struct kvmfs_hostmem_info *out, int max);

/*
 * Guest-physical copy for MNT/vmN/mem (host access: no dirty bits, as a VMM
 * write is not a guest write).  Returns bytes copied (stops at a hole or an
 * unresolved page), 0 with *miss_hva set when the first page's host memory is
 * not registered yet (resolve it, then retry), -EIO for a hole at gpa.
 */
int64_t kvmfs_mmu_read_gpa(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa,
			   void *buf, uint64_t len, uint64_t *miss_hva);
int64_t kvmfs_mmu_write_gpa(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa,
			    const void *buf, uint64_t len, uint64_t *miss_hva);

/* ------------------------------------------------------------------ spte.c --
 * Aging and the spte list.  Python (commands.py): test_young, clear_young.
 * C (views.c): list_sptes.
 */
/* KVM's test_young / clear_young over a gfn range: the number of sptes with A set. */
int64_t kvmfs_mmu_test_young(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn, uint64_t npages);
int64_t kvmfs_mmu_clear_young(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn, uint64_t npages);

struct kvmfs_spte_info {
	uint32_t as_id;
	uint32_t flags;           /* KVMFS_SPTE_* */
	uint64_t gfn;
	uint64_t hva;
	uint64_t uphys;
};
#define KVMFS_SPTE_W 1
#define KVMFS_SPTE_X 2
#define KVMFS_SPTE_A 4
#define KVMFS_SPTE_D 8
/* Fills up to max records; returns the total number of sptes. */
/* Sptes in (address space, gfn) order from position *pos on (as << 56 | gfn; 0
 * at first), at most max; *pos moves past them (to the end when all are listed). */
#define KVMFS_SPTE_POS_AS_SHIFT 56
int kvmfs_mmu_list_sptes_from(kvmfs_mmu *mmu, uint64_t *pos, struct kvmfs_spte_info *out, int max);
int kvmfs_mmu_list_sptes(kvmfs_mmu *mmu, struct kvmfs_spte_info *out, int max);

/* ----------------------------------------------------------------- flush.c --
 * The remote TLB flush.  C only (vcpu.c); never Python.
 */
/*
 * A vCPU attaches its flush client; a zap bumps the flush generation, calls
 * kick(opaque) for each attached client whose acked generation is older and
 * which is inside the emulator, and waits until each acknowledges with
 * kvmfs_mmu_ack_flush() (the vCPU flushes its unicorn TLB, then acks).
 * The vCPU's side, in its own thread:
 *   1. kvmfs_mmu_attach() once; kvmfs_mmu_enter() before it may use its TLB;
 *   2. before every uc_emu_start(): g = kvmfs_mmu_flush_gen(); if g >
 *      c->acked_gen, flush the whole unicorn TLB, then kvmfs_mmu_ack_flush(g)
 *      (read g before flushing, so a newer zap is never acked by mistake);
 *   3. kvmfs_mmu_leave() before returning from KVM_RUN (and before anything
 *      that may wait for another thread); kvmfs_mmu_detach() before freeing.
 * kick() is called with the mmu lock held: it must only stop the emulator
 * (uc_emu_stop), never call into the mmu.  A zapper re-kicks every 2 ms while
 * an ack is missing, so a kick lost before uc_emu_start does no harm.
 */
struct kvmfs_flush_client {
	void (*kick)(void *opaque);
	void *opaque;
	uint64_t acked_gen;       /* written by kvmfs_mmu_ack_flush */
	int in_guest;             /* set/cleared by kvmfs_mmu_enter/leave */
	int attached;
};
void kvmfs_mmu_attach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c);
void kvmfs_mmu_detach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c);
uint64_t kvmfs_mmu_flush_gen(kvmfs_mmu *mmu);
void kvmfs_mmu_enter(kvmfs_mmu *mmu, struct kvmfs_flush_client *c);
void kvmfs_mmu_leave(kvmfs_mmu *mmu, struct kvmfs_flush_client *c);
void kvmfs_mmu_ack_flush(kvmfs_mmu *mmu, struct kvmfs_flush_client *c, uint64_t gen);

/* ----------------------------------------------------------------- dirty.c --
 * The dirty log (spec 8).  Python (vm.py); C (views.c): peek.
 */
/* Enable/disable KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options (ENABLE=1, INITIALLY_SET=2). */
void kvmfs_dirty_set_manual_protect(kvmfs_mmu *mmu, uint32_t options);
/* KVM_GET_DIRTY_LOG: copy ALIGN(npages,64)/8 bytes into out; without manual
 * protect, clear the reported bits and write-protect those pages.  -ENOENT
 * when the slot is absent or not logging. */
int kvmfs_dirty_get_log(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, void *out, uint64_t out_size);
/* KVM_CLEAR_DIRTY_LOG after the caller's argument checks: clear and re-protect
 * pages first_page + j for each set bit j of mask (num_pages bits). */
int kvmfs_dirty_clear_log(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t first_page,
			  uint32_t num_pages, const void *mask);
/* Copy the bitmap without clearing (for info/dirty views). */
int kvmfs_dirty_peek(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, void *out, uint64_t out_size);
/* The same for at most nwords 64-page words from first_word on: the count
 * copied (0 past the end). */
int64_t kvmfs_dirty_peek_words(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t first_word,
			       uint64_t *out, uint64_t nwords);

/* ------------------------------------------------------------------ vcpu.c --
 * One kvmfs_vcpu per vCPU: a unicorn x86 engine in UC_TLB_VIRTUAL mode whose
 * TLB-fill hook is kvmfs_mmu_translate, entered and left from C in the thread
 * that serves KVM_RUN (cffi releases the GIL around the call).  Python
 * (vcpu.py, vm.py, cli.py).
 */
typedef struct kvmfs_vcpu kvmfs_vcpu;

/* run: the vCPU's kvm_run area (KVM_GET_VCPU_MMAP_SIZE bytes, shared with the
 * client); owned by the caller and must outlive the vcpu. */
kvmfs_vcpu *kvmfs_vcpu_new(kvmfs_mmu *mmu, uint32_t id, struct kvm_run *run);
void kvmfs_vcpu_free(kvmfs_vcpu *v);

#define KVMFS_RUN_NEED_HVA 1  /* resolve kvmfs_vcpu_miss_hva(), register it, call again */
#define KVMFS_RUN_VM_DEAD 2   /* the SMRAM state save had nowhere to go: KVM kills the VM */
/* KVM_RUN: 0 with run->exit_reason set, -errno (-EINTR, -EFAULT, -EINVAL), or
 * KVMFS_RUN_NEED_HVA / KVMFS_RUN_VM_DEAD. */
int kvmfs_vcpu_run(kvmfs_vcpu *v);
uint64_t kvmfs_vcpu_miss_hva(kvmfs_vcpu *v);
/* From any thread or a signal handler: end the current or next KVM_RUN with
 * -EINTR and KVM_EXIT_INTR. */
void kvmfs_vcpu_kick(kvmfs_vcpu *v);
void kvmfs_vcpu_set_exit_reason(kvmfs_vcpu *v, uint32_t reason);
/* Install a handler for signo that kicks the vCPU running in the signalled
 * thread (libfuse's "intr" option signals the thread serving an interrupted
 * request). */
int kvmfs_vcpu_install_intr_signal(int signo);
int kvmfs_vcpu_set_guest_debug(kvmfs_vcpu *v, uint32_t control);

struct kvmfs_vcpu_stats {
	uint64_t runs;
	uint64_t exits[64];       /* by KVM_EXIT_* reason */
	uint64_t last_exit_reason;
	uint64_t insns_hint;      /* guest instructions, when counted */
	uint64_t smis;            /* SMM entries */
};
void kvmfs_vcpu_get_stats(kvmfs_vcpu *v, struct kvmfs_vcpu_stats *out);

/* ------------------------------------------------------------------ regs.c --
 * KVM_GET/SET_REGS, SREGS, FPU, MSRS.  Python (vcpu.py, views.py); C (smm.c).
 */
int kvmfs_vcpu_get_regs(kvmfs_vcpu *v, struct kvm_regs *out);
int kvmfs_vcpu_set_regs(kvmfs_vcpu *v, const struct kvm_regs *in);
int kvmfs_vcpu_get_sregs(kvmfs_vcpu *v, struct kvm_sregs *out);
int kvmfs_vcpu_set_sregs(kvmfs_vcpu *v, const struct kvm_sregs *in);
int kvmfs_vcpu_get_fpu(kvmfs_vcpu *v, struct kvm_fpu *out);
int kvmfs_vcpu_set_fpu(kvmfs_vcpu *v, const struct kvm_fpu *in);
/* Returns the number of entries processed (KVM_GET/SET_MSRS semantics), or
 * -E2BIG for n >= KVM_MAX_MSR_ENTRIES. */
int kvmfs_vcpu_get_msrs(kvmfs_vcpu *v, struct kvm_msr_entry *e, uint32_t n);
int kvmfs_vcpu_set_msrs(kvmfs_vcpu *v, const struct kvm_msr_entry *e, uint32_t n);

/* ----------------------------------------------------------------- cpuid.c --
 * KVM_SET_CPUID2 and KVM_GET_SUPPORTED_CPUID.  Python (vcpu.py).
 */
int kvmfs_vcpu_set_cpuid(kvmfs_vcpu *v, const struct kvm_cpuid_entry2 *e, uint32_t n);
/* KVM_GET_SUPPORTED_CPUID's list; returns the count or -E2BIG when max is short. */
int kvmfs_supported_cpuid(struct kvm_cpuid_entry2 *out, uint32_t max);

/* ---------------------------------------------------------------- events.c --
 * KVM_INTERRUPT and KVM_GET/SET_VCPU_EVENTS.  Python (vcpu.py, views.py).
 */
int kvmfs_vcpu_interrupt(kvmfs_vcpu *v, uint32_t irq);
/* KVM_GET/SET_VCPU_EVENTS: 0 or -EINVAL (flags or values KVM refuses). */
int kvmfs_vcpu_get_events(kvmfs_vcpu *v, struct kvm_vcpu_events *out);
int kvmfs_vcpu_set_events(kvmfs_vcpu *v, const struct kvm_vcpu_events *in);

/* ------------------------------------------------------------------- smm.c --
 * KVM_SMI; the SMRAM state-save map (512 bytes at SMBASE + 0xFE00), in
 * KVM's 64-bit layout (lm: the guest's CPUID has long mode) or its 32-bit one.
 * Python (vcpu.py): smi.  C (smm.c itself): smram_save/load (tests compare
 * them with KVM's layout).
 */
int kvmfs_vcpu_smi(kvmfs_vcpu *v);
#define KVMFS_SMRAM_MAP_SIZE 512
struct kvmfs_smm_state {
	struct kvm_regs regs;
	struct kvm_sregs sregs;
	uint64_t dr6, dr7;
	uint32_t smbase;
	uint8_t int_shadow;
};
void kvmfs_smram_save(uint8_t *map, const struct kvmfs_smm_state *st, int lm);
void kvmfs_smram_load(const uint8_t *map, struct kvmfs_smm_state *st, int lm);

/* -------------------------------------------------------------- runarea.c --
 * kvm_run areas (shared with the VMM, which may truncate them) and the SIGBUS
 * guard that replaces a truncated one with private pages instead of dying.
 * Python (vcpu.py: add/remove, cli.py: install_guard, system.py: replaced).
 */
int kvmfs_runarea_add(void *start, uint64_t size);
void kvmfs_runarea_remove(void *start);
uint64_t kvmfs_runarea_replaced(void);
int kvmfs_runarea_install_guard(void);
int kvmfs_runarea_map(const char *path, uint64_t size, void **out);
void kvmfs_runarea_unmap(void *p, uint64_t size);

/* ---------------------------------------------------------------- views.c --
 * The per-page text views, formatted in C and streamed from a cursor (whole
 * lines, at most size bytes a call, 0 at the end), or -errno.
 * Python (views.py).
 */
int64_t kvmfs_view_sptes(kvmfs_mmu *mmu, uint64_t *cursor, char *buf, uint64_t size);
/*
 * info/dirty/A.S in pieces, so that a view of a huge logged slot is streamed:
 * the lines from *cursor on (0: the header first; c > 0: pages from c - 1),
 * whole lines only, at most size bytes (size >= 64).  Returns the bytes
 * written, 0 at the end, and moves *cursor past them.
 */
int64_t kvmfs_view_dirty(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t *cursor,
			 char *buf, uint64_t size);
