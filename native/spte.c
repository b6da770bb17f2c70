/*
 * spte.c - sptes and their reverse maps: the TDP-style mapping of one gfn of
 * one slot onto host memory (struct kvmfs_spte, kvmfs_internal.h), its
 * creation and zapping, write protection of a slot, aging (A bits) and the
 * spte list view.
 *
 * Data structures (why they look like this):
 *  - per slot, an array of spte pointers indexed by (gfn - base_gfn),
 *    allocated at the first fill.  It is the gfn rmap: zapping a slot and
 *    aging walk it by page index;
 *  - write permission: per slot, a bitmap (wbits) indexed like the dirty
 *    bitmap, allocated with the spte array, so re-protecting after
 *    KVM_GET_DIRTY_LOG is one AND-NOT per 64 pages, O(dirty words);
 *  - host-page rmap: each host range keeps a doubly linked list of the sptes
 *    pointing into it;
 *  - sptes come from a free list refilled a chunk at a time: a fill that
 *    creates an spte does not call malloc, and a fill that reuses one
 *    allocates nothing.
 *
 * Locking: everything here is guarded by the VM's mmu->lock (KVM's
 * mmu_lock); every exported function takes it; the static helpers expect it
 * held.  Whoever removes a permission or a mapping flushes (flush.c) before
 * releasing the lock for good.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kvmfs_internal.h"

#define SPTE_CHUNK 4096

/* ------------------------------------------------------------ allocation -- */

static struct kvmfs_spte *spte_alloc(kvmfs_mmu *mmu)
{
	struct kvmfs_spte *sp = mmu->spte_free;

	if (!sp) {
		struct spte_chunk *c = malloc(sizeof(*c) + SPTE_CHUNK * sizeof(struct kvmfs_spte));
		if (!c)
			return NULL;
		c->next = mmu->chunks;
		mmu->chunks = c;
		for (int i = SPTE_CHUNK - 1; i >= 0; i--) {
			c->sptes[i].hm_next = mmu->spte_free;
			mmu->spte_free = &c->sptes[i];
		}
		sp = mmu->spte_free;
	}
	mmu->spte_free = sp->hm_next;
	memset(sp, 0, sizeof(*sp));
	return sp;
}

/* ------------------------------------------------------------------ rmap -- */

static void hm_unlink(kvmfs_mmu *mmu, struct kvmfs_spte *sp)
{
	if (sp->hm_prev)
		sp->hm_prev->hm_next = sp->hm_next;
	else
		mmu->hm[sp->hm_idx].sptes = sp->hm_next;
	if (sp->hm_next)
		sp->hm_next->hm_prev = sp->hm_prev;
}

/* Drop the spte of page idx of slot s (the caller flushes). */
void spte_drop(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx)
{
	struct kvmfs_spte *sp = s->sptes[idx];

	hm_unlink(mmu, sp);
	s->sptes[idx] = NULL;
	s->wbits[idx / 64] &= ~(1ull << (idx % 64));
	s->nsptes--;
	sp->hm_next = mmu->spte_free;
	mmu->spte_free = sp;
	mmu->stats.sptes--;
	mmu->stats.zaps++;
}

/* Drop every spte of a slot (the caller flushes). */
void spte_zap_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s)
{
	for (uint64_t i = 0; s->nsptes && i < s->npages; i++)
		if (s->sptes[i])
			spte_drop(mmu, s, i);
	free(s->sptes);
	s->sptes = NULL;
	free(s->wbits);
	s->wbits = NULL;
}

/* Clear W on every spte of a slot: a word of wbits at a time. */
bool kvmfs_mmu_wp_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s)
{
	uint64_t words = (s->npages + 63) / 64;
	uint64_t any = 0;

	(void)mmu;
	if (!s->wbits)
		return false;
	for (uint64_t w = 0; w < words; w++) {
		any |= s->wbits[w];
		s->wbits[w] = 0;
	}
	return any != 0;
}

struct kvmfs_spte *spte_create(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx, int hmi,
				      uint64_t hva)
{
	struct kvmfs_hostmem *h = &mmu->hm[hmi];
	struct kvmfs_spte *sp;

	if (!s->sptes) {
		s->sptes = calloc(s->npages, sizeof(*s->sptes));
		s->wbits = calloc((s->npages + 63) / 64, sizeof(uint64_t));
		if (!s->sptes || !s->wbits) {
			free(s->sptes);
			free(s->wbits);
			s->sptes = NULL;
			s->wbits = NULL;
			return NULL;
		}
	}
	sp = spte_alloc(mmu);
	if (!sp)
		return NULL;
	sp->gfn = s->base_gfn + idx;
	sp->host = (char *)h->ptr + (hva - h->hva);
	sp->uphys = h->uphys + (hva - h->hva);
	sp->hm_idx = hmi;
	sp->slot = s;
	/* W (wbits): the slot lets the guest write this page now.  Invariant
	 * for logging slots: W implies the page's dirty bit is set, so clearing
	 * a bit always goes with clearing W (dirty.c). */
	sp->flags = KVMFS_SPTE_X;
	if (!(s->flags & (KVM_MEM_READONLY | KVM_MEM_LOG_DIRTY_PAGES)))
		s->wbits[idx / 64] |= 1ull << (idx % 64);
	sp->hm_prev = NULL;
	sp->hm_next = h->sptes;
	if (h->sptes)
		h->sptes->hm_prev = sp;
	h->sptes = sp;
	s->sptes[idx] = sp;
	s->nsptes++;
	mmu->stats.sptes++;
	mmu->stats.spte_creates++;
	return sp;
}

/* ----------------------------------------------------------------- aging -- */

/* Count (and with clear, clear) the A bits of the sptes in the gfn range. */
static int64_t age_range(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn, uint64_t npages, bool clear)
{
	struct kvmfs_aspace *as;
	uint64_t end = gfn + npages;
	int64_t young = 0;
	int i;

	if (as_id >= KVMFS_ADDRESS_SPACES)
		return -EINVAL;
	if (end < gfn)
		end = UINT64_MAX;
	as = &mmu->as[as_id];
	pthread_mutex_lock(&mmu->lock);
	i = memslot_upper_bound(as, gfn) - 1;
	if (i < 0)
		i = 0;
	for (; i < as->n && as->sorted[i]->base_gfn < end; i++) {
		struct kvmfs_slot *s = as->sorted[i];
		uint64_t lo = gfn > s->base_gfn ? gfn - s->base_gfn : 0;
		uint64_t hi = end - s->base_gfn < s->npages ? end - s->base_gfn : s->npages;

		if (!s->sptes || s->base_gfn + s->npages <= gfn)
			continue;
		for (uint64_t j = lo; j < hi; j++) {
			struct kvmfs_spte *sp = s->sptes[j];
			if (sp && (sp->flags & KVMFS_SPTE_A)) {
				young++;
				if (clear)
					sp->flags &= ~KVMFS_SPTE_A;
			}
		}
	}
	/* The next access must reach translate to set A again: the cleared pages
	 * must leave every TLB. */
	if (clear && young)
		kvmfs_mmu_flush_remote(mmu);
	pthread_mutex_unlock(&mmu->lock);
	return young;
}

int64_t kvmfs_mmu_test_young(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn, uint64_t npages)
{
	return age_range(mmu, as_id, gfn, npages, false);
}

int64_t kvmfs_mmu_clear_young(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn, uint64_t npages)
{
	return age_range(mmu, as_id, gfn, npages, true);
}

/* ----------------------------------------------------------------- views -- */

/* Fills up to max records (address space, then gfn order); returns the total
 * number of sptes, so a caller can size its buffer and ask again. */
/* What the views show of page j's spte (lock held). */
static void spte_info(struct kvmfs_spte_info *o, uint32_t as_id, const struct kvmfs_slot *s,
		      uint64_t j, const struct kvmfs_spte *sp)
{
	o->as_id = as_id;
	o->flags = sp->flags;
	if (s->wbits[j / 64] & (1ull << (j % 64)))
		o->flags |= KVMFS_SPTE_W;
	o->gfn = sp->gfn;
	o->hva = s->hva + (j << PAGE_SHIFT);
	o->uphys = sp->uphys;
}

int kvmfs_mmu_list_sptes_from(kvmfs_mmu *mmu, uint64_t *pos, struct kvmfs_spte_info *out, int max)
{
	uint32_t start_as = (uint32_t)(*pos >> KVMFS_SPTE_POS_AS_SHIFT);
	uint64_t start_gfn = *pos & ((1ull << KVMFS_SPTE_POS_AS_SHIFT) - 1);
	int n = 0;

	pthread_mutex_lock(&mmu->lock);
	for (uint32_t a = start_as; a < KVMFS_ADDRESS_SPACES; a++) {
		struct kvmfs_aspace *as = &mmu->as[a];
		for (int i = 0; i < as->n; i++) {
			struct kvmfs_slot *s = as->sorted[i];
			uint64_t j = 0;
			if (!s->sptes || !s->nsptes)    /* the array comes with the first spte */
				continue;
			if (a == start_as && start_gfn > s->base_gfn)
				j = start_gfn - s->base_gfn;
			for (; j < s->npages; j++) {
				struct kvmfs_spte *sp = s->sptes[j];
				if (!sp)
					continue;
				if (n == max) {
					*pos = (uint64_t)a << KVMFS_SPTE_POS_AS_SHIFT | (s->base_gfn + j);
					pthread_mutex_unlock(&mmu->lock);
					return n;
				}
				spte_info(&out[n++], a, s, j, sp);
			}
		}
	}
	*pos = (uint64_t)KVMFS_ADDRESS_SPACES << KVMFS_SPTE_POS_AS_SHIFT;
	pthread_mutex_unlock(&mmu->lock);
	return n;
}

int kvmfs_mmu_list_sptes(kvmfs_mmu *mmu, struct kvmfs_spte_info *out, int max)
{
	int n = 0;

	pthread_mutex_lock(&mmu->lock);
	for (int a = 0; a < KVMFS_ADDRESS_SPACES; a++) {
		struct kvmfs_aspace *as = &mmu->as[a];
		for (int i = 0; i < as->n; i++) {
			struct kvmfs_slot *s = as->sorted[i];
			uint64_t left = s->nsptes;
			for (uint64_t j = 0; left && j < s->npages; j++) {
				struct kvmfs_spte *sp = s->sptes[j];
				if (!sp)
					continue;
				left--;
				if (n < max)
					spte_info(&out[n], a, s, j, sp);
				n++;
			}
		}
	}
	pthread_mutex_unlock(&mmu->lock);
	return n;
}
