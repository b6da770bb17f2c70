/*
 * memslot.c - memslots, KVM's kvm_main.c role: the slots of both address
 * spaces, the gfn -> slot lookup, and KVM_SET_USER_MEMORY_REGION's change
 * decision and commit (CREATE / DELETE / MOVE / FLAGS_ONLY).
 *
 * Data structures (why they look like this):
 *  - slots by id: one pointer array per address space, so ioctls that name a
 *    slot are O(1);
 *  - slots by gfn: per address space, an array of slot pointers sorted by
 *    base_gfn.  Lookup and the overlap check are binary searches; insertion
 *    and deletion memmove pointers only, which stays flat up to 32764 slots.
 *
 * Locking: everything here is guarded by the VM's mmu->lock (KVM's
 * mmu_lock); every exported function takes it.  A change that removes
 * mappings ends with the remote flush (flush.c).
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "kvmfs_internal.h"

#define MAX_GFN ((1ull << (X86_MAXPHYADDR_LIMIT - PAGE_SHIFT)) - 1)

/* ----------------------------------------------------------- slot lookup -- */

void memslot_free(struct kvmfs_slot *s)
{
	free(s->dirty);
	free(s->sptes);
	free(s->wbits);
	free(s);
}

/* Index of the first sorted slot whose base_gfn is > gfn. */
int memslot_upper_bound(const struct kvmfs_aspace *as, uint64_t gfn)
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
	i = memslot_upper_bound(as, gfn) - 1;
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
	int i = memslot_upper_bound(as, base);
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

	i = memslot_upper_bound(as, s->base_gfn);
	memmove(&as->sorted[i + 1], &as->sorted[i], (as->n - i) * sizeof(*as->sorted));
	as->sorted[i] = s;
	as->n++;
}

static void sorted_remove(struct kvmfs_aspace *as, struct kvmfs_slot *s)
{
	int i = memslot_upper_bound(as, s->base_gfn) - 1;

	/* base_gfn is unique among the slots of one address space */
	memmove(&as->sorted[i], &as->sorted[i + 1], (as->n - i - 1) * sizeof(*as->sorted));
	as->n--;
	if (as->last == s)
		as->last = NULL;
}

/* -------------------------------------------------------------- memslots -- */

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

/* Which rule refused a change: the one line the daemon logs for it. */
#define REFUSE(err, text) do { rc = -(err); reason = (text); goto out; } while (0)

int kvmfs_memslot_set(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint32_t flags,
		      uint64_t gpa, uint64_t size, uint64_t hva, const char **why)
{
	struct kvmfs_aspace *as;
	struct kvmfs_slot *old, *s = NULL;
	uint64_t base = gpa >> PAGE_SHIFT, npages = size >> PAGE_SHIFT;
	uint64_t *bm = NULL, bm_count = 0;
	bool flush = false, log_on, was_log;
	const char *reason = NULL;
	int change, rc;

	if (why)
		*why = NULL;
	if (as_id >= KVMFS_ADDRESS_SPACES || id >= KVMFS_USER_MEM_SLOTS) {
		if (why)
			*why = "no such address space or slot id";
		return -EINVAL;
	}
	as = &mmu->as[as_id];
	pthread_mutex_lock(&mmu->lock);
	old = as->by_id[id];

	/* 1. decide the change (spec 7.3); nothing is modified until step 2 */
	if (!size) {
		if (!old)
			REFUSE(EINVAL, "no such slot to delete");
		change = KVMFS_MR_DELETE;
	} else if (!old) {
		change = KVMFS_MR_CREATE;
	} else {
		if (old->flags & KVM_MEM_GUEST_MEMFD)
			REFUSE(EINVAL, "a guest_memfd slot can only be deleted");
		if (hva != old->hva)
			REFUSE(EINVAL, "userspace_addr differs from the slot's");
		if (npages != old->npages)
			REFUSE(EINVAL, "memory_size differs from the slot's (no resize)");
		if ((flags ^ old->flags) & (KVM_MEM_READONLY | KVM_MEM_GUEST_MEMFD))
			REFUSE(EINVAL, "READONLY or GUEST_MEMFD cannot be toggled");
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
	    overlaps(as, base, npages, change == KVMFS_MR_MOVE ? old : NULL))
		REFUSE(EEXIST, "the range overlaps another slot");
	if (change != KVMFS_MR_DELETE && (base + npages - 1 > MAX_GFN || base + npages < base))
		REFUSE(EINVAL, "the last gfn is beyond the guest physical address width");

	/* 2. prepare: every allocation happens before the first change */
	log_on = flags & KVM_MEM_LOG_DIRTY_PAGES;
	was_log = old && (old->flags & KVM_MEM_LOG_DIRTY_PAGES);
	if (change != KVMFS_MR_DELETE && log_on && !was_log) {
		bm = bitmap_new(mmu, npages, &bm_count);
		if (!bm)
			REFUSE(ENOMEM, "cannot allocate the dirty bitmap");
	}
	if (change == KVMFS_MR_CREATE) {
		s = calloc(1, sizeof(*s));
		if (!s || sorted_reserve(as) < 0) {
			free(s);
			free(bm);
			REFUSE(ENOMEM, "cannot allocate the slot");
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
		spte_zap_slot(mmu, old);
		flush = true;
		sorted_remove(as, old);
		as->by_id[id] = NULL;
		memslot_free(old);
		break;
	case KVMFS_MR_MOVE:
		spte_zap_slot(mmu, old);
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
	if (why)
		*why = reason;
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
