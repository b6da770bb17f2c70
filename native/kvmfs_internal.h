/*
 * kvmfs_internal.h - what the native sources share: the public API plus the
 * helpers and internal structs that more than one .c file needs.
 */
#ifndef KVMFS_INTERNAL_H
#define KVMFS_INTERNAL_H

#include <stdint.h>
#include <stddef.h>
#include <errno.h>

#include "kvm_abi.h"
#include "kvmfs_native.h"

#define KVMFS_API __attribute__((visibility("default")))

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096ull
#define KVM_MEM_LOG_DIRTY_PAGES 1u
#define KVM_MEM_READONLY 2u
#define KVM_MEM_GUEST_MEMFD 4u
#define KVMFS_ADDRESS_SPACES 2
#define KVMFS_USER_MEM_SLOTS 32764

/* ----------------------------------------------- mmu internals (mmu.c) --
 * Shared by mmu.c, walk.c and dirty.c; everything is guarded by mmu->lock.
 * vcpu.c only needs the public API (kvmfs_native.h).
 */
#include <pthread.h>
#include <stdbool.h>

#define X86_CR0_WP (1ull << 16)
#define X86_CR0_PG (1ull << 31)
#define X86_CR4_PSE (1ull << 4)
#define X86_CR4_PAE (1ull << 5)
#define X86_CR4_LA57 (1ull << 12)
#define X86_CR4_SMEP (1ull << 20)
#define X86_EFER_LMA (1ull << 10)
#define X86_EFER_NXE (1ull << 11)
#define X86_PF_PRESENT 1u
#define X86_PF_WRITE 2u
#define X86_PF_USER 4u
#define X86_PF_RSVD 8u
#define X86_PF_FETCH 16u

/* Permission bits of kvmfs_xlate.perms: the values of unicorn's UC_PROT_*. */
#define PROT_R 1u
#define PROT_W 2u
#define PROT_X 4u

/* kvmfs_dirty_set_manual_protect() options (KVM_DIRTY_LOG_MANUAL_PROTECT_*) */
#define KVMFS_MANUAL_ENABLE 1u
#define KVMFS_MANUAL_INIT_SET 2u

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
};

/* What a guest page walk found (walk.c). */
struct kvmfs_walk {
	uint64_t gpa;             /* of the accessed byte */
	uint32_t perms;           /* PROT_* the guest tables allow at this CPL */
	bool dirty;               /* the leaf's D bit is set (after this access) */
};

struct kvmfs_slot *kvmfs_mmu_slot_of(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn);
int kvmfs_mmu_gpa_host(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, void **host,
		       uint64_t *avail, uint64_t *miss_hva, struct kvmfs_slot **slotp);
void kvmfs_mmu_mark_dirty(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx);
bool kvmfs_mmu_wp_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s);
void kvmfs_mmu_flush_remote(kvmfs_mmu *mmu);
/* Walk the guest tables for vaddr: 0 with out->kind OK (and *w), PF,
 * NEED_HVA or EFAULT filled in out; -errno on an internal error. */
int kvmfs_walk_guest(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t vaddr,
		     int access, struct kvmfs_walk *w, struct kvmfs_xlate *out);

#endif
