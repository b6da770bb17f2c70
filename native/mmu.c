/*
 * mmu.c - the per-VM memory model: memslots of both address spaces, the host
 * memory the daemon has mapped for them, sptes with reverse maps, the
 * TLB-fill translation, zaps and the remote TLB flush.  Dirty-log ioctls live
 * in dirty.c and the guest page-table walker in walk.c; both work on the
 * structures declared in kvmfs_internal.h ("mmu internals").
 *
 * Locking: one pthread mutex per VM (mmu->lock, KVM's mmu_lock) guards
 * everything here.  Every exported function takes it.  The only place that
 * drops it in the middle of an operation is the remote flush, which waits for
 * vCPU acknowledgements with the lock RELEASED (see flush_remote()), always as
 * the last step of the operation, after which the caller touches nothing it
 * looked up before.  (translate's fault-around madvise() runs after the lock
 * is dropped, on a mapping kvmfs_hostmem_remove() keeps alive for it.)  kick() callbacks are called with the lock held: they
 * must only stop the emulator and never call back into this file.
 *
 * Data structures (why they look like this):
 *  - slots by id: one pointer array per address space, so ioctls that name a
 *    slot are O(1);
 *  - slots by gfn: per address space, an array of slot pointers sorted by
 *    base_gfn.  Lookup and the overlap check are binary searches; insertion
 *    and deletion memmove pointers only, which stays flat up to 32764 slots;
 *  - sptes: per slot, an array of spte pointers indexed by (gfn - base_gfn),
 *    allocated at the first fill.  It is the gfn rmap: zapping a slot and
 *    aging walk it by page index;
 *  - write permission: per slot, a bitmap (wbits) indexed like the dirty
 *    bitmap, allocated with the spte array, so re-protecting after
 *    KVM_GET_DIRTY_LOG is one AND-NOT per 64 pages, O(dirty words);
 *  - host-page rmap: each host range keeps a doubly linked list of the sptes
 *    pointing into it, so an MMU-notifier invalidation finds them without a
 *    scan of all slots;
 *  - sptes come from a free list refilled a chunk at a time: a fill that
 *    creates an spte does not call malloc, and a fill that reuses one
 *    allocates nothing.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "kvmfs_internal.h"

#define SPTE_CHUNK 4096
#define FLUSH_REKICK_NS 2000000     /* 2 ms: re-kick a vCPU that has not acked */
#define UPHYS_BASE (1ull << 40)
#define UPHYS_LIMIT (1ull << 51)
#define MAX_GFN ((1ull << (52 - PAGE_SHIFT)) - 1) /* x86 MAXPHYADDR 52 */
#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22       /* Linux 5.14 */
#endif
/*
 * Fault-around: the first spte in an aligned block of this many bytes of the
 * daemon's mapping populates the whole block (clipped to the slot and the host
 * range) with one madvise(MADV_POPULATE_READ), instead of the daemon taking a
 * host minor fault on each page as the guest first touches it.  Populating
 * allocates memfd pages the VMM may never have touched, so the block stays
 * small: a sparse guest grows by at most 15 pages per page it touches (the
 * kernel's own fault_around_bytes is 64 KiB too).  2 MiB blocks are only
 * ~20 ns/page cheaper (measured) but would commit 2 MiB per touched page.
 */
#define POPULATE_BYTES (64ull << 10)

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

kvmfs_mmu *kvmfs_mmu_new(void)
{
	kvmfs_mmu *mmu = calloc(1, sizeof(*mmu));

	if (!mmu)
		return NULL;
	for (int a = 0; a < KVMFS_ADDRESS_SPACES; a++) {
		mmu->as[a].by_id = calloc(KVMFS_USER_MEM_SLOTS, sizeof(struct kvmfs_slot *));
		if (!mmu->as[a].by_id)
			goto fail;
	}
	mmu->uphys_next = UPHYS_BASE;
	pthread_mutex_init(&mmu->lock, NULL);
	pthread_cond_init(&mmu->flush_cv, NULL);
	return mmu;
fail:
	for (int a = 0; a < KVMFS_ADDRESS_SPACES; a++)
		free(mmu->as[a].by_id);
	free(mmu);
	return NULL;
}

static void slot_free(struct kvmfs_slot *s)
{
	free(s->dirty);
	free(s->sptes);
	free(s->wbits);
	free(s);
}

void kvmfs_mmu_free(kvmfs_mmu *mmu)
{
	if (!mmu)
		return;
	for (int a = 0; a < KVMFS_ADDRESS_SPACES; a++) {
		struct kvmfs_aspace *as = &mmu->as[a];
		for (int i = 0; i < as->n; i++)
			slot_free(as->sorted[i]);
		free(as->sorted);
		free(as->by_id);
	}
	while (mmu->chunks) {
		struct spte_chunk *c = mmu->chunks;
		mmu->chunks = c->next;
		free(c);
	}
	for (int i = 0; i < mmu->hm_n; i++)
		free(mmu->hm[i].populated);
	free(mmu->hm);
	free(mmu->hm_sorted);
	free(mmu->clients);
	pthread_cond_destroy(&mmu->flush_cv);
	pthread_mutex_destroy(&mmu->lock);
	free(mmu);
}

/* ---------------------------------------------------------- slot lookup -- */

/* Index of the first sorted slot whose base_gfn is > gfn. */
static int upper_bound(const struct kvmfs_aspace *as, uint64_t gfn)
{
	int lo = 0, hi = as->n;

	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (as->sorted[mid]->base_gfn <= gfn)
			lo = mid + 1;
		else
			hi = mid;
	}
	return lo;
}

struct kvmfs_slot *kvmfs_mmu_slot_of(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gfn)
{
	struct kvmfs_aspace *as = &mmu->as[as_id];
	struct kvmfs_slot *s = as->last;
	int i;

	/* Most fills hit the slot of the previous fill (KVM's lru_slot). */
	if (s && gfn - s->base_gfn < s->npages)
		return s;
	i = upper_bound(as, gfn) - 1;
	if (i < 0)
		return NULL;
	s = as->sorted[i];
	if (gfn - s->base_gfn >= s->npages)
		return NULL;
	as->last = s;
	return s;
}

/* Does [base, base+npages) overlap a slot other than `self`?  The array holds
 * disjoint ranges in order, so only the neighbours around base can. */
static bool overlaps(const struct kvmfs_aspace *as, uint64_t base, uint64_t npages,
		     const struct kvmfs_slot *self)
{
	int i = upper_bound(as, base);
	int j = i - 1, k = i;

	if (j >= 0 && as->sorted[j] == self)
		j--;
	if (j >= 0 && as->sorted[j]->base_gfn + as->sorted[j]->npages > base)
		return true;
	if (k < as->n && as->sorted[k] == self)
		k++;
	if (k < as->n && as->sorted[k]->base_gfn < base + npages)
		return true;
	return false;
}

/* Room for one more slot in the sorted array (the only failing step). */
static int sorted_reserve(struct kvmfs_aspace *as)
{
	if (as->n == as->cap) {
		int cap = as->cap ? as->cap * 2 : 64;
		struct kvmfs_slot **p = realloc(as->sorted, cap * sizeof(*p));
		if (!p)
			return -ENOMEM;
		as->sorted = p;
		as->cap = cap;
	}
	return 0;
}

/* Insert into the sorted array; sorted_reserve() must have succeeded. */
static void sorted_insert(struct kvmfs_aspace *as, struct kvmfs_slot *s)
{
	int i;

	i = upper_bound(as, s->base_gfn);
	memmove(&as->sorted[i + 1], &as->sorted[i], (as->n - i) * sizeof(*as->sorted));
	as->sorted[i] = s;
	as->n++;
}

static void sorted_remove(struct kvmfs_aspace *as, struct kvmfs_slot *s)
{
	int i = upper_bound(as, s->base_gfn) - 1;

	/* base_gfn is unique among the slots of one address space */
	memmove(&as->sorted[i], &as->sorted[i + 1], (as->n - i - 1) * sizeof(*as->sorted));
	as->n--;
	if (as->last == s)
		as->last = NULL;
}

/* ----------------------------------------------------------- host memory -- */

/* Index (into mmu->hm) of the live range holding hva, or -1. */
static int hostmem_find(kvmfs_mmu *mmu, uint64_t hva)
{
	int lo = 0, hi = mmu->hm_nsorted;

	while (lo < hi) {
		int mid = (lo + hi) / 2;
		if (mmu->hm[mmu->hm_sorted[mid]].hva <= hva)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo == 0)
		return -1;
	lo = mmu->hm_sorted[lo - 1];
	return hva - mmu->hm[lo].hva < mmu->hm[lo].size ? lo : -1;
}

int kvmfs_hostmem_add(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, void *ptr)
{
	struct kvmfs_hostmem *h;
	uint64_t span;
	int i, rc = 0;

	if (!size || !ptr || (hva | size | (uintptr_t)ptr) & (PAGE_SIZE - 1) || hva + size < hva)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	/* ranges never overlap: check both neighbours in hva order */
	for (i = 0; i < mmu->hm_nsorted && mmu->hm[mmu->hm_sorted[i]].hva < hva; i++)
		;
	if ((i > 0 && mmu->hm[mmu->hm_sorted[i - 1]].hva + mmu->hm[mmu->hm_sorted[i - 1]].size > hva) ||
	    (i < mmu->hm_nsorted && mmu->hm[mmu->hm_sorted[i]].hva < hva + size)) {
		rc = -EEXIST;
		goto out;
	}
	span = size;
	if (mmu->uphys_next + span > UPHYS_LIMIT || mmu->uphys_next + span < mmu->uphys_next) {
		rc = -ENOSPC;
		goto out;
	}
	if (mmu->hm_n == mmu->hm_cap) {
		int cap = mmu->hm_cap ? mmu->hm_cap * 2 : 16;
		struct kvmfs_hostmem *p = realloc(mmu->hm, cap * sizeof(*p));
		int *q;
		if (!p) {
			rc = -ENOMEM;
			goto out;
		}
		mmu->hm = p;
		q = realloc(mmu->hm_sorted, cap * sizeof(*q));
		if (!q) {
			rc = -ENOMEM;
			goto out;
		}
		mmu->hm_sorted = q;
		mmu->hm_cap = cap;
	}
	h = &mmu->hm[mmu->hm_n];
	h->hva = hva;
	h->size = size;
	h->ptr = ptr;
	h->uphys = mmu->uphys_next;
	h->sptes = NULL;
	h->populated = NULL;
	h->populating = 0;
	mmu->uphys_next += span;
	memmove(&mmu->hm_sorted[i + 1], &mmu->hm_sorted[i], (mmu->hm_nsorted - i) * sizeof(int));
	mmu->hm_sorted[i] = mmu->hm_n;
	mmu->hm_nsorted++;
	mmu->hm_n++;
out:
	pthread_mutex_unlock(&mmu->lock);
	return rc;
}

int kvmfs_hostmem_list(kvmfs_mmu *mmu, struct kvmfs_hostmem_info *out, int max)
{
	int n;

	pthread_mutex_lock(&mmu->lock);
	n = mmu->hm_n;
	for (int i = 0; i < n && i < max; i++) {
		out[i].hva = mmu->hm[i].hva;
		out[i].size = mmu->hm[i].size;
		out[i].uphys = mmu->hm[i].uphys;
		out[i].ptr = mmu->hm[i].ptr;
	}
	pthread_mutex_unlock(&mmu->lock);
	return n;
}

/* ----------------------------------------------------------------- sptes -- */

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
static void spte_drop(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx)
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
static void zap_slot(kvmfs_mmu *mmu, struct kvmfs_slot *s)
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

static struct kvmfs_spte *spte_create(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx, int hmi,
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

/* -------------------------------------------------------- remote flush -- */

/*
 * Make every vCPU forget its cached translations before returning (called
 * with the lock held, returns with it held, after the zap it follows).
 *
 * A vCPU's unicorn TLB can only hold translations while the vCPU is "in the
 * guest" (between kvmfs_mmu_enter and kvmfs_mmu_leave); outside, it must
 * compare kvmfs_mmu_flush_gen() with its acked_gen right after enter and flush
 * first if behind.  So: bump the generation, kick each client inside the guest
 * that has not acked it, and wait until each has acked it or left.  The wait
 * releases the lock so a kicked vCPU that is in the middle of a fill (blocked
 * on the lock) can finish it, reach its run loop, flush and ack: no deadlock.
 * A fill that completes during the wait sees the already-zapped state, so it
 * cannot re-create what was zapped; the TLB entry it installs is dropped by
 * the flush the vCPU does before acking anyway.
 */
void kvmfs_mmu_flush_remote(kvmfs_mmu *mmu)
{
	uint64_t gen = ++mmu->flush_gen;
	bool wait;

	mmu->stats.flushes++;
	for (int i = 0; i < mmu->nclients; i++) {
		struct kvmfs_flush_client *c = mmu->clients[i];
		if (c->in_guest && c->acked_gen < gen && c->kick) {
			mmu->stats.kicks++;
			c->kick(c->opaque);
		}
	}
	for (int rounds = 0;; rounds++) {
		struct timespec ts;

		wait = false;
		for (int i = 0; i < mmu->nclients; i++) {
			struct kvmfs_flush_client *c = mmu->clients[i];
			if (!c->in_guest || c->acked_gen >= gen)
				continue;
			wait = true;
			/*
			 * Still pending after a wait: kick again.  A kick that lands
			 * between the vCPU's last flush check and the start of the
			 * emulator is lost (uc_emu_start clears the stop request),
			 * and without this a guest that never exits would hold the
			 * zapper forever.
			 */
			if (rounds && c->kick) {
				mmu->stats.kicks++;
				c->kick(c->opaque);
			}
		}
		if (!wait)
			break;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += FLUSH_REKICK_NS;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&mmu->flush_cv, &mmu->lock, &ts);
	}
}

void kvmfs_mmu_attach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	if (!c->attached) {
		if (mmu->nclients == mmu->cap_clients) {
			int cap = mmu->cap_clients ? mmu->cap_clients * 2 : 8;
			struct kvmfs_flush_client **p = realloc(mmu->clients, cap * sizeof(*p));
			if (!p)
				goto out;   /* left detached: the vCPU sees attached == 0 */
			mmu->clients = p;
			mmu->cap_clients = cap;
		}
		mmu->clients[mmu->nclients++] = c;
		c->attached = 1;
		c->in_guest = 0;
		/* nothing is cached yet: the client starts up to date */
		c->acked_gen = mmu->flush_gen;
	}
out:
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_detach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	for (int i = 0; i < mmu->nclients; i++) {
		if (mmu->clients[i] == c) {
			mmu->clients[i] = mmu->clients[--mmu->nclients];
			break;
		}
	}
	c->attached = 0;
	c->in_guest = 0;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

uint64_t kvmfs_mmu_flush_gen(kvmfs_mmu *mmu)
{
	uint64_t g;

	pthread_mutex_lock(&mmu->lock);
	g = mmu->flush_gen;
	pthread_mutex_unlock(&mmu->lock);
	return g;
}

void kvmfs_mmu_enter(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	c->in_guest = 1;
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_leave(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	c->in_guest = 0;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_ack_flush(kvmfs_mmu *mmu, struct kvmfs_flush_client *c, uint64_t gen)
{
	pthread_mutex_lock(&mmu->lock);
	if (gen > c->acked_gen)
		c->acked_gen = gen;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

/* ------------------------------------------------------------- memslots -- */

static void slot_info(const struct kvmfs_slot *s, struct kvmfs_slot_info *o)
{
	o->as_id = s->as_id;
	o->id = s->id;
	o->flags = s->flags;
	o->pad = 0;
	o->base_gfn = s->base_gfn;
	o->npages = s->npages;
	o->userspace_addr = s->hva;
	o->dirty_count = s->dirty ? s->dirty_count : 0;
}

/* A fresh bitmap for a slot that starts logging: zeros, or all ones (only the
 * slot's own pages) with manual protect's INITIALLY_SET (spec 8.2). */
static uint64_t *bitmap_new(kvmfs_mmu *mmu, uint64_t npages, uint64_t *count)
{
	uint64_t words = (npages + 63) / 64;
	uint64_t *bm = calloc(words ? words : 1, sizeof(uint64_t));

	*count = 0;
	if (bm && mmu->manual_protect & KVMFS_MANUAL_INIT_SET) {
		memset(bm, 0xff, words * 8);
		if (npages % 64)
			bm[words - 1] = (1ull << (npages % 64)) - 1;
		*count = npages;
	}
	return bm;
}

int kvmfs_memslot_set(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint32_t flags,
		      uint64_t gpa, uint64_t size, uint64_t hva)
{
	struct kvmfs_aspace *as;
	struct kvmfs_slot *old, *s = NULL;
	uint64_t base = gpa >> PAGE_SHIFT, npages = size >> PAGE_SHIFT;
	uint64_t *bm = NULL, bm_count = 0;
	bool flush = false, log_on, was_log;
	int change, rc;

	if (as_id >= KVMFS_ADDRESS_SPACES || id >= KVMFS_USER_MEM_SLOTS)
		return -EINVAL;
	as = &mmu->as[as_id];
	pthread_mutex_lock(&mmu->lock);
	old = as->by_id[id];

	/* 1. decide the change (spec 7.3); nothing is modified until step 2 */
	if (!size) {
		if (!old) {
			rc = -EINVAL;
			goto out;
		}
		change = KVMFS_MR_DELETE;
	} else if (!old) {
		change = KVMFS_MR_CREATE;
	} else {
		if ((old->flags & KVM_MEM_GUEST_MEMFD) || hva != old->hva || npages != old->npages ||
		    ((flags ^ old->flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD))) {
			rc = -EINVAL;
			goto out;
		}
		if (base != old->base_gfn)
			change = KVMFS_MR_MOVE;
		else if (flags != old->flags)
			change = KVMFS_MR_FLAGS_ONLY;
		else {
			rc = KVMFS_MR_NONE;
			goto out;
		}
	}
	if ((change == KVMFS_MR_CREATE || change == KVMFS_MR_MOVE) &&
	    overlaps(as, base, npages, change == KVMFS_MR_MOVE ? old : NULL)) {
		rc = -EEXIST;
		goto out;
	}
	if (change != KVMFS_MR_DELETE && (base + npages - 1 > MAX_GFN || base + npages < base)) {
		rc = -EINVAL;
		goto out;
	}

	/* 2. prepare: every allocation happens before the first change */
	log_on = flags & KVM_MEM_LOG_DIRTY_PAGES;
	was_log = old && (old->flags & KVM_MEM_LOG_DIRTY_PAGES);
	if (change != KVMFS_MR_DELETE && log_on && !was_log) {
		bm = bitmap_new(mmu, npages, &bm_count);
		if (!bm) {
			rc = -ENOMEM;
			goto out;
		}
	}
	if (change == KVMFS_MR_CREATE) {
		s = calloc(1, sizeof(*s));
		if (!s || sorted_reserve(as) < 0) {
			free(s);
			free(bm);
			rc = -ENOMEM;
			goto out;
		}
	}

	/* 3. commit */
	switch (change) {
	case KVMFS_MR_CREATE:
		s->as_id = as_id;
		s->id = id;
		s->flags = flags;
		s->base_gfn = base;
		s->npages = npages;
		s->hva = hva;
		s->dirty = bm;
		s->dirty_count = bm_count;
		sorted_insert(as, s);
		as->by_id[id] = s;
		break;
	case KVMFS_MR_DELETE:
		/*
		 * Invalidate first: a later access to the gpa becomes MMIO.  The
		 * flush is unconditional: a TLB entry may come from a guest walk
		 * through page tables in this slot, which left no spte here (on
		 * hardware the walk would have needed an EPT entry that the zap
		 * removes).
		 */
		zap_slot(mmu, old);
		flush = true;
		sorted_remove(as, old);
		as->by_id[id] = NULL;
		slot_free(old);
		break;
	case KVMFS_MR_MOVE:
		zap_slot(mmu, old);
		flush = true;           /* as for DELETE */
		sorted_remove(as, old);
		old->base_gfn = base;
		sorted_insert(as, old); /* it just left the array: room is there */
		/* the logging part is the same as FLAGS_ONLY */
		__attribute__((fallthrough));
	case KVMFS_MR_FLAGS_ONLY:
		if (log_on && !was_log) {
			old->dirty = bm;
			old->dirty_count = bm_count;
			/* Write-protect so the first later write to each page is
			 * caught; with INITIALLY_SET every bit is already set, so
			 * (as KVM) the sptes stay writable until CLEAR_DIRTY_LOG. */
			if (!(mmu->manual_protect & KVMFS_MANUAL_INIT_SET) && old->sptes)
				flush |= kvmfs_mmu_wp_slot(mmu, old);
		} else if (!log_on && was_log) {
			free(old->dirty);
			old->dirty = NULL;
			old->dirty_count = 0;
		}
		old->flags = flags;
		break;
	}
	mmu->generation++;
	rc = change;
	if (flush)
		kvmfs_mmu_flush_remote(mmu);
out:
	pthread_mutex_unlock(&mmu->lock);
	return rc;
}

int kvmfs_memslot_get(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, struct kvmfs_slot_info *out)
{
	int rc = -ENOENT;

	if (as_id >= KVMFS_ADDRESS_SPACES || id >= KVMFS_USER_MEM_SLOTS)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	if (mmu->as[as_id].by_id[id]) {
		slot_info(mmu->as[as_id].by_id[id], out);
		rc = 0;
	}
	pthread_mutex_unlock(&mmu->lock);
	return rc;
}

/* Fills at most max records in gpa order; returns how many it filled
 * (kvmfs_memslot_count gives the total). */
int kvmfs_memslot_list(kvmfs_mmu *mmu, uint32_t as_id, struct kvmfs_slot_info *out, int max)
{
	int n = 0;

	if (as_id >= KVMFS_ADDRESS_SPACES)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	for (; n < mmu->as[as_id].n && n < max; n++)
		slot_info(mmu->as[as_id].sorted[n], &out[n]);
	pthread_mutex_unlock(&mmu->lock);
	return n;
}

int kvmfs_memslot_count(kvmfs_mmu *mmu, uint32_t as_id)
{
	int n;

	if (as_id >= KVMFS_ADDRESS_SPACES)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	n = mmu->as[as_id].n;
	pthread_mutex_unlock(&mmu->lock);
	return n;
}

uint64_t kvmfs_memslot_generation(kvmfs_mmu *mmu)
{
	uint64_t g;

	pthread_mutex_lock(&mmu->lock);
	g = mmu->generation;
	pthread_mutex_unlock(&mmu->lock);
	return g;
}

/* ------------------------------------------------ host memory removal -- */

int kvmfs_hostmem_remove(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, void **ptrs,
			 uint64_t *sizes, int max)
{
	bool flush = false;
	int removed = 0;

	if (hva + size < hva)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	mmu->stats.notifier_calls++;
	/*
	 * A range that overlaps the invalidation at all is forgotten whole (and
	 * all its sptes zapped): the daemon's mapping of it may no longer match
	 * what the VMM has there, and the next fault re-resolves the hva.
	 * At most max ranges go per call; the caller repeats while it gets max.
	 */
	for (int i = 0; i < mmu->hm_nsorted && removed < max;) {
		int hi = mmu->hm_sorted[i];
		struct kvmfs_hostmem *h = &mmu->hm[hi];

		if (h->hva >= hva + size || h->hva + h->size <= hva) {
			i++;
			continue;
		}
		while (h->sptes) {
			struct kvmfs_spte *sp = h->sptes;
			spte_drop(mmu, sp->slot, sp->gfn - sp->slot->base_gfn);
		}
		/* unconditional, as for a slot DELETE: guest walks read page
		 * tables here without leaving sptes */
		flush = true;
		ptrs[removed] = h->ptr;
		sizes[removed] = h->size;
		removed++;
		h->size = 0;    /* the index stays: vcpu.c keys its unicorn mappings by it */
		free(h->populated);
		h->populated = NULL;
		memmove(&mmu->hm_sorted[i], &mmu->hm_sorted[i + 1],
			(mmu->hm_nsorted - i - 1) * sizeof(int));
		mmu->hm_nsorted--;
	}
	if (flush)
		kvmfs_mmu_flush_remote(mmu);
	/*
	 * The caller munmaps what we return: first let a fault-around madvise()
	 * still running on a removed range (translate runs it without the lock)
	 * finish.  No new one can start there, the ranges being gone.
	 */
	for (int i = 0; removed && i < mmu->hm_n; i++) {
		while (!mmu->hm[i].size && mmu->hm[i].populating)
			pthread_cond_wait(&mmu->flush_cv, &mmu->lock);
	}
	pthread_mutex_unlock(&mmu->lock);
	return removed;
}

/* ------------------------------------------------------ gpa <-> host -- */

/*
 * Host address of gpa in as_id for an access of the page, without an spte.
 * Returns 0 and *host, -EIO for a hole, -EFAULT with *miss_hva for host
 * memory not registered.  *avail receives how many bytes from gpa stay in the
 * same slot and host range.
 */
int kvmfs_mmu_gpa_host(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, void **host,
		       uint64_t *avail, uint64_t *miss_hva, struct kvmfs_slot **slotp)
{
	uint64_t gfn = gpa >> PAGE_SHIFT, hva, off;
	struct kvmfs_slot *s = kvmfs_mmu_slot_of(mmu, as_id, gfn);
	int hi;

	if (!s)
		return -EIO;
	off = gpa - (s->base_gfn << PAGE_SHIFT);
	if (slotp)
		*slotp = s;
	/* fast path: the page already has an spte */
	if (s->sptes && s->sptes[gfn - s->base_gfn]) {
		struct kvmfs_spte *sp = s->sptes[gfn - s->base_gfn];
		struct kvmfs_hostmem *h = &mmu->hm[sp->hm_idx];
		*host = (char *)sp->host + (gpa & (PAGE_SIZE - 1));
		hva = s->hva + off;
		*avail = h->hva + h->size - hva;
		if (*avail > (s->npages << PAGE_SHIFT) - off)
			*avail = (s->npages << PAGE_SHIFT) - off;
		return 0;
	}
	hva = s->hva + off;
	hi = hostmem_find(mmu, hva);
	if (hi < 0) {
		*miss_hva = hva & ~(PAGE_SIZE - 1);
		return -EFAULT;
	}
	*host = (char *)mmu->hm[hi].ptr + (hva - mmu->hm[hi].hva);
	*avail = mmu->hm[hi].hva + mmu->hm[hi].size - hva;
	if (*avail > (s->npages << PAGE_SHIFT) - off)
		*avail = (s->npages << PAGE_SHIFT) - off;
	return 0;
}

static int64_t copy_gpa(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, void *buf, uint64_t len,
			uint64_t *miss_hva, bool write)
{
	uint64_t done = 0;

	if (as_id >= KVMFS_ADDRESS_SPACES)
		return -EINVAL;
	if (miss_hva)
		*miss_hva = 0;
	pthread_mutex_lock(&mmu->lock);
	while (done < len) {
		uint64_t avail, miss = 0;
		void *host;
		int rc = kvmfs_mmu_gpa_host(mmu, as_id, gpa + done, &host, &avail, &miss, NULL);

		if (rc < 0) {
			if (!done && rc == -EFAULT && miss_hva)
				*miss_hva = miss;
			if (!done && rc == -EIO) {
				pthread_mutex_unlock(&mmu->lock);
				return -EIO;
			}
			break;
		}
		if (avail > len - done)
			avail = len - done;
		if (write)
			memcpy(host, (char *)buf + done, avail);
		else
			memcpy((char *)buf + done, host, avail);
		done += avail;
	}
	pthread_mutex_unlock(&mmu->lock);
	return done;
}

int64_t kvmfs_mmu_read_gpa(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, void *buf, uint64_t len,
			   uint64_t *miss_hva)
{
	return copy_gpa(mmu, as_id, gpa, buf, len, miss_hva, false);
}

int64_t kvmfs_mmu_write_gpa(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa, const void *buf,
			    uint64_t len, uint64_t *miss_hva)
{
	return copy_gpa(mmu, as_id, gpa, (void *)buf, len, miss_hva, true);
}

/* ----------------------------------------------------------- translate -- */

/* Set page idx's dirty bit in a logging slot (lock held). */
void kvmfs_mmu_mark_dirty(kvmfs_mmu *mmu, struct kvmfs_slot *s, uint64_t idx)
{
	uint64_t bit = 1ull << (idx % 64);

	if (s->dirty && !(s->dirty[idx / 64] & bit)) {
		s->dirty[idx / 64] |= bit;
		s->dirty_count++;
		mmu->stats.dirty_pages_logged++;
	}
}

/*
 * Fault-around (POPULATE_BYTES): plan the populate for a new spte of page
 * hva, in slot s and host range hi (lock held).  The block is clipped to the
 * host range and to the slot, and its pages are marked in h->populated at
 * once, so each page is populated at most once per host range whatever the
 * slots over it.  Returns whether a madvise() is due (then h->populating was
 * raised; populate_run() drops it).
 */
static bool populate_plan(kvmfs_mmu *mmu, struct kvmfs_slot *s, int hi, uint64_t hva,
			  void **p, size_t *len)
{
	struct kvmfs_hostmem *h = &mmu->hm[hi];
	uint64_t pg = (hva - h->hva) >> PAGE_SHIFT, d, lo, end, slot_end;

	if (mmu->no_populate)
		return false;
	if (!h->populated) {
		h->populated = calloc((h->size / PAGE_SIZE + 63) / 64, sizeof(uint64_t));
		if (!h->populated)
			return false;
	}
	if (h->populated[pg / 64] & (1ull << (pg % 64)))
		return false;
	/* align in the daemon's address space (its page tables), clip in hva */
	d = (uint64_t)(uintptr_t)h->ptr + (hva - h->hva);
	lo = hva - (d & (POPULATE_BYTES - 1));
	end = lo + POPULATE_BYTES;
	slot_end = s->hva + (s->npages << PAGE_SHIFT);
	if (lo < h->hva)
		lo = h->hva;
	if (lo < s->hva)
		lo = s->hva;
	if (end > h->hva + h->size)
		end = h->hva + h->size;
	if (end > slot_end)
		end = slot_end;
	for (uint64_t i = (lo - h->hva) >> PAGE_SHIFT; i < (end - h->hva) >> PAGE_SHIFT; i++)
		h->populated[i / 64] |= 1ull << (i % 64);
	if (end - lo <= PAGE_SIZE)
		return false;   /* just this page: the access itself faults it in */
	*p = (char *)h->ptr + (lo - h->hva);
	*len = end - lo;
	h->populating++;
	return true;
}

/*
 * Run a planned populate WITHOUT the lock (a 64 KiB block costs a few us; other
 * vCPUs' fills need not wait).  The mapping cannot go away meanwhile:
 * kvmfs_hostmem_remove() waits for h->populating to drop before its caller
 * munmaps.  MADV_POPULATE_READ rather than _WRITE even for a write: on the
 * shared memfd (shmem) mappings the daemon uses, a read fault maps the page
 * writable and maps up to 16 neighbours at once (the kernel's fault-around),
 * measured 2.5x cheaper per page than POPULATE_WRITE, and the later write
 * takes no fault.  Errors only cost speed: the access then faults as before;
 * EINVAL (kernel < 5.14, or a mapping that cannot be populated) turns it off.
 */
static void populate_run(kvmfs_mmu *mmu, int hi, void *p, size_t len)
{
	int err = madvise(p, len, MADV_POPULATE_READ) ? errno : 0;

	pthread_mutex_lock(&mmu->lock);
	if (err == EINVAL)
		mmu->no_populate = true;
	if (!--mmu->hm[hi].populating)
		pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

int kvmfs_mmu_translate(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t vaddr,
			int access, struct kvmfs_xlate *out)
{
	struct kvmfs_walk w;
	struct kvmfs_slot *s;
	struct kvmfs_spte *sp;
	uint64_t gfn, idx, wbit, *wword;
	uint32_t as_id = pg->as_id;
	bool write = access == KVMFS_ACC_WRITE;
	void *pop_ptr = NULL;
	size_t pop_len = 0;
	int rc = 0, pop_hi = -1;

	if (as_id >= KVMFS_ADDRESS_SPACES)
		return -EINVAL;
	out->kind = KVMFS_XL_OK;
	out->perms = 0;
	out->gpa = out->hva = 0;
	pthread_mutex_lock(&mmu->lock);
	mmu->stats.fills++;

	if (pg->cr0 & X86_CR0_PG) {
		mmu->stats.walks++;
		rc = kvmfs_walk_guest(mmu, pg, vaddr, access, &w, out);
		if (rc < 0 || out->kind != KVMFS_XL_OK) {
			if (out->kind == KVMFS_XL_PF)
				mmu->stats.walk_faults++;
			goto out;
		}
	} else {
		/* paging off is never long mode: linear addresses are 32 bits */
		w.gpa = vaddr & 0xffffffffull;
		w.perms = PROT_R | PROT_W | PROT_X;
		w.dirty = true;
	}
	gfn = w.gpa >> PAGE_SHIFT;
	out->gpa = gfn << PAGE_SHIFT;

	s = kvmfs_mmu_slot_of(mmu, as_id, gfn);
	if (!s || (write && (s->flags & KVM_MEM_READONLY))) {
		out->kind = KVMFS_XL_MMIO;
		mmu->stats.mmio_faults++;
		goto out;
	}
	idx = gfn - s->base_gfn;
	sp = s->sptes ? s->sptes[idx] : NULL;
	if (!sp) {
		uint64_t hva = s->hva + (idx << PAGE_SHIFT);
		int hi = hostmem_find(mmu, hva);
		if (hi < 0) {
			out->kind = KVMFS_XL_NEED_HVA;
			out->hva = hva;
			goto out;
		}
		sp = spte_create(mmu, s, idx, hi, hva);
		if (!sp) {
			rc = -ENOMEM;
			goto out;
		}
		if (populate_plan(mmu, s, hi, hva, &pop_ptr, &pop_len))
			pop_hi = hi;
	}
	wword = &s->wbits[idx / 64];
	wbit = 1ull << (idx % 64);
	if (write) {
		if (!(*wword & wbit)) {
			/*
			 * Write-protect fault.  In a logging slot the page was
			 * clean: log it and let writes through until the next
			 * harvest.  (Outside logging W is only missing after
			 * logging was turned off; just restore it.)
			 */
			if (s->dirty) {
				kvmfs_mmu_mark_dirty(mmu, s, idx);
				mmu->stats.wp_faults++;
			}
			*wword |= wbit;
		}
		sp->flags |= KVMFS_SPTE_D;
	}
	/*
	 * Reads and fetches never mark a page dirty, even in a logging slot: as
	 * on VMX/SVM, only a write makes the page dirty.  A read of a clean
	 * logged page therefore gets no write permission, and the first write
	 * comes back here.  Even outside logging, write permission is granted
	 * on a read only when both the spte and the guest PTE are already
	 * dirty, so that the first write sets the D bits (as a TLB entry
	 * created by a read does on hardware).
	 */
	sp->flags |= KVMFS_SPTE_A;
	out->perms = w.perms & (PROT_R | PROT_X);
	if ((w.perms & PROT_W) && (*wword & wbit) &&
	    (write || ((sp->flags & KVMFS_SPTE_D) && w.dirty)))
		out->perms |= PROT_W;
	out->uphys = sp->uphys;
	out->host = sp->host;
out:
	pthread_mutex_unlock(&mmu->lock);
	if (pop_hi >= 0)
		populate_run(mmu, pop_hi, pop_ptr, pop_len);
	return rc;
}

/* --------------------------------------------------------------- aging -- */

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
	i = upper_bound(as, gfn) - 1;
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

/* --------------------------------------------------------------- views -- */

/* Fills up to max records (address space, then gfn order); returns the total
 * number of sptes, so a caller can size its buffer and ask again. */
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
				if (n < max) {
					out[n].as_id = a;
					out[n].flags = sp->flags;
					if (s->wbits[j / 64] & (1ull << (j % 64)))
						out[n].flags |= KVMFS_SPTE_W;
					out[n].gfn = sp->gfn;
					out[n].hva = s->hva + (j << PAGE_SHIFT);
					out[n].uphys = sp->uphys;
				}
				n++;
			}
		}
	}
	pthread_mutex_unlock(&mmu->lock);
	return n;
}

void kvmfs_mmu_get_stats(kvmfs_mmu *mmu, struct kvmfs_mmu_stats *out)
{
	pthread_mutex_lock(&mmu->lock);
	*out = mmu->stats;
	pthread_mutex_unlock(&mmu->lock);
}
