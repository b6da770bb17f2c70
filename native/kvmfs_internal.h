/*
 * kvmfs_internal.h - what every native source includes (the ABI, the
 * exported API, x86 names, page size), plus the MMU side's internals: the
 * structures shared by mmu.c, memslot.c, hostmem.c, spte.c, flush.c,
 * dirty.c, walk.c and views.c, and the functions one of them calls in
 * another.  The vCPU side uses only the exported API from here (its own
 * internals are in vcpu_internal.h).
 */
#ifndef KVMFS_INTERNAL_H
#define KVMFS_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <errno.h>

#include "kvm_abi.h"
#include "kvmfs_native.h"
#include "x86.h"

#define KVMFS_API __attribute__((visibility("default")))

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096ull
#define KVMFS_ADDRESS_SPACES KVM_ADDRESS_SPACE_NUM
#define KVMFS_USER_MEM_SLOTS KVM_USER_MEM_SLOTS

/* ---------------------------------------------------- mmu internals --
 * Everything below is guarded by mmu->lock: the functions expect it held.
 */
#include <pthread.h>
#include <stdbool.h>

/* Permission bits of kvmfs_xlate.perms: the values of unicorn's UC_PROT_*. */
#define PROT_R 1u
#define PROT_W 2u
#define PROT_X 4u

/* kvmfs_dirty_set_manual_protect() options */
#define KVMFS_MANUAL_ENABLE KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
#define KVMFS_MANUAL_INIT_SET KVM_DIRTY_LOG_INITIALLY_SET

struct kvmfs_slot;

/*
 * One spte: the TDP-style mapping of one gfn of one slot onto host memory.
 * flags are KVMFS_SPTE_* X A D; W is not kept here but in the slot's wbits
 * bitmap (bit gfn - base_gfn), so that re-protecting a word of 64 dirty pages
 * is one AND and never touches the sptes.  Invariants:
 *  - it is reachable from exactly two places: slot->sptes[gfn - base_gfn]
 *    (the gfn rmap) and the list of its host range (hm[hm_idx].sptes, the
 *    host-page rmap);
 *  - W (the wbits bit) is set only for a page that has an spte; clear means
 *    the next guest write must come back to translate (dirty logging write
 *    protection, or a READONLY slot);
 *  - in a logging slot, W set implies the page's dirty bit is set;
 *  - any change that removes a permission or a mapping is followed by a
 *    remote flush before the lock is released for good.
 */
struct kvmfs_spte {
	uint64_t gfn;
	void *host;               /* daemon address of the page */
	uint64_t uphys;           /* unicorn-physical address of the page */
	struct kvmfs_slot *slot;
	struct kvmfs_spte *hm_next, *hm_prev;   /* host range list; hm_next also links the free list */
	uint32_t hm_idx;
	uint32_t flags;
};

struct spte_chunk {
	struct spte_chunk *next;
	struct kvmfs_spte sptes[];
};

struct kvmfs_slot {
	uint32_t as_id, id, flags;
	uint64_t base_gfn, npages, hva;
	uint64_t *dirty;          /* ALIGN(npages, 64) / 64 words while logging, else NULL */
	uint64_t dirty_count;     /* bits set in dirty */
	struct kvmfs_spte **sptes; /* npages entries, allocated at the first fill */
	uint64_t *wbits;          /* writable sptes, indexed as dirty; allocated with sptes */
	uint64_t nsptes;
};

struct kvmfs_aspace {
	struct kvmfs_slot **by_id;      /* KVMFS_USER_MEM_SLOTS entries */
	struct kvmfs_slot **sorted;     /* n live slots by base_gfn, disjoint */
	int n, cap;
	struct kvmfs_slot *last;        /* last lookup hit */
};

struct kvmfs_hostmem {
	uint64_t hva, size, uphys;      /* size 0: removed (index kept) */
	void *ptr;
	struct kvmfs_spte *sptes;       /* sptes mapping pages of this range */
	uint64_t *populated;            /* pages already populated (fault-around), lazy */
	uint32_t populating;            /* madvise() calls in flight without the lock */
	bool readonly;                  /* the VMM maps it without PROT_WRITE: guest writes EFAULT */
};

struct kvmfs_mmu {
	pthread_mutex_t lock;           /* KVM's mmu_lock */
	pthread_cond_t flush_cv;        /* signalled by ack/leave/detach */
	struct kvmfs_aspace as[KVMFS_ADDRESS_SPACES];
	uint64_t generation;
	struct kvmfs_hostmem *hm;       /* append-only, indexed as kvmfs_hostmem_list */
	int hm_n, hm_cap;
	int *hm_sorted;                 /* indexes of live ranges by hva */
	int hm_nsorted;
	uint64_t uphys_next;
	struct kvmfs_spte *spte_free;
	struct spte_chunk *chunks;
	uint32_t manual_protect;        /* KVMFS_MANUAL_* */
	bool no_populate;               /* MADV_POPULATE_READ unsupported (EINVAL) */
	uint64_t flush_gen;
	struct kvmfs_flush_client **clients;
	int nclients, cap_clients;
	struct kvmfs_mmu_stats stats;
	/* MMU-notifier protocol (kvm_main.c's mmu_invalidate_*): begin counts in
	 * progress and widens [inv_start, inv_end); end bumps the sequence.  Host
	 * memory resolved outside the lock is registered only if neither says it
	 * may be stale (kvmfs_hostmem_add's seq). */
	uint64_t inv_seq;
	int inv_in_progress;
	uint64_t inv_start, inv_end;
};

/* What a guest page walk found (walk.c). */
struct kvmfs_walk {
	uint64_t gpa;             /* of the accessed byte */
	uint32_t perms;           /* PROT_* the guest tables allow at this CPL */
	bool dirty;               /* the leaf's D bit is set (after this access) */
};

/* unicorn-physical addresses of host ranges start here (below: the vCPU's
 * MMIO window) */
#define UPHYS_BASE (1ull << 40)

/* memslot.c */
struct kvmfs_slot *kvmfs_mmu_slot_of(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn);
/* Index of the first sorted slot whose base_gfn is > gfn. */
int memslot_upper_bound(const struct kvmfs_aspace *as, uint64_t gfn);
void memslot_free(struct kvmfs_slot *s);

/* hostmem.c */
int hostmem_find(kvmfs_mmu *mmu, uint64_t hva);
int kvmfs_mmu_gpa_host(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, void **host,
		       uint64_t *avail, uint64_t *miss_hva, struct kvmfs_slot **slotp);
bool hostmem_populate_plan(kvmfs_mmu *mmu, struct kvmfs_slot *s, int hi, uint64_t hva,
			   void **p, size_t *len);
void hostmem_populate_run(kvmfs_mmu *mmu, int hi, void *p, size_t len);   /* lock NOT held */

/* spte.c */
struct kvmfs_spte *spte_create(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx, int hmi,
			       uint64_t hva);
void spte_drop(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx);
void spte_zap_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s);
bool kvmfs_mmu_wp_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s);

/* dirty.c */
void kvmfs_mmu_mark_dirty(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx);

/* flush.c */
void kvmfs_mmu_flush_remote(kvmfs_mmu *mmu);

/* walk.c */
/* Walk the guest tables for vaddr: 0 with out->kind OK (and *w), PF,
 * NEED_HVA or EFAULT filled in out; -errno on an internal error. */
int kvmfs_walk_guest(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t vaddr,
		     int access, struct kvmfs_walk *w, struct kvmfs_xlate *out);

#endif
