/*
 * dirty.c - the dirty-log ioctls over the per-slot bitmaps (spec 8).
 *
 * Bitmap encoding (the ioctl's): page i of a slot is bit i % 64 of the u64
 * word i / 64; bits past npages in the last word stay 0.  The bitmap exists
 * exactly while the slot has KVM_MEM_LOG_DIRTY_PAGES (mmu.c allocates and
 * frees it) and slot->dirty_count is its population count.
 *
 * Write-protection protocol (the invariant of kvmfs_internal.h: in a logging
 * slot an spte is writable only if its dirty bit is set):
 *   1. a harvested or cleared bit is reset in the bitmap;
 *   2. the same pages' sptes lose W: W lives in slot->wbits, indexed like
 *      the dirty bitmap, so a word of 64 pages is one AND-NOT and no spte is
 *      touched (the cost is O(words reported), not O(slot size));
 *   3. if any spte lost W, every vCPU's TLB is flushed before returning, so
 *      the next guest write to such a page faults into translate, which sets
 *      the bit again and restores W.
 * Work is a word at a time and skips zero words: an idle 1 GiB slot is 4096
 * word loads.
 *
 * Locking: every exported function takes mmu->lock; kvmfs_mmu_mark_dirty
 * expects it held.
 */
#include <string.h>
#include <pthread.h>

#include "kvmfs_internal.h"

void kvmfs_dirty_set_manual_protect(kvmfs_mmu *mmu, uint32_t options)
{
	pthread_mutex_lock(&mmu->lock);
	mmu->manual_protect = options & (KVMFS_MANUAL_ENABLE | KVMFS_MANUAL_INIT_SET);
	pthread_mutex_unlock(&mmu->lock);
}

/* The logging slot as_id:id with mmu_lock held (0), or -EINVAL / -ENOENT unlocked. */
static int lock_logging_slot(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, struct kvmfs_slot **sp)
{
	if (as_id >= KVMFS_ADDRESS_SPACES || id >= KVMFS_USER_MEM_SLOTS)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	*sp = mmu->as[as_id].by_id[id];
	if (!*sp || !(*sp)->dirty) {
		pthread_mutex_unlock(&mmu->lock);
		return -ENOENT;
	}
	return 0;
}

/* Steps 1-2 for the set bits of `bits` in word w; returns whether an spte lost W. */
static inline bool reprotect_word(struct kvmfs_slot *s, uint64_t w, uint64_t bits)
{
	s->dirty[w] &= ~bits;
	s->dirty_count -= __builtin_popcountll(bits);
	if (!s->wbits || !(s->wbits[w] & bits))
		return false;
	s->wbits[w] &= ~bits;
	return true;
}

/* Copy the slot's bitmap to out; with harvest, also steps 1-3 for every
 * reported page unless manual protection is on (spec 8.1: GET only reports). */
static int copy_log(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, void *out, uint64_t out_size,
		    bool harvest)
{
	struct kvmfs_slot *s;
	bool flush = false;
	int rc = lock_logging_slot(mmu, as_id, id, &s);

	if (rc)
		return rc;
	uint64_t words = (s->npages + 63) / 64;
	if (out_size < words * 8) {
		pthread_mutex_unlock(&mmu->lock);
		return -EINVAL;
	}
	memcpy(out, s->dirty, words * 8);
	if (harvest && !(mmu->manual_protect & KVMFS_MANUAL_ENABLE) && s->dirty_count) {
		for (uint64_t w = 0; w < words; w++)
			if (s->dirty[w])
				flush |= reprotect_word(s, w, s->dirty[w]);
	}
	if (flush)
		kvmfs_mmu_flush_remote(mmu);
	pthread_mutex_unlock(&mmu->lock);
	return 0;
}

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

int kvmfs_dirty_get_log(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, void *out, uint64_t out_size)
{
	return copy_log(mmu, as_id, id, out, out_size, true);
}

int kvmfs_dirty_peek(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, void *out, uint64_t out_size)
{
	return copy_log(mmu, as_id, id, out, out_size, false);
}

int64_t kvmfs_dirty_peek_words(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t first_word,
				uint64_t *out, uint64_t nwords)
{
	struct kvmfs_slot *s;
	int rc = lock_logging_slot(mmu, as_id, id, &s);

	if (rc)
		return rc;
	uint64_t words = (s->npages + 63) / 64;
	uint64_t n = first_word < words ? words - first_word : 0;
	if (n > nwords)
		n = nwords;
	memcpy(out, s->dirty + first_word, n * 8);
	pthread_mutex_unlock(&mmu->lock);
	return (int64_t)n;
}

int kvmfs_dirty_clear_log(kvmfs_mmu *mmu, uint32_t as_id, uint32_t id, uint64_t first_page,
			  uint32_t num_pages, const void *mask)
{
	struct kvmfs_slot *s;
	uint64_t words;
	bool flush = false;
	int rc;

	if (first_page % 64)
		return -EINVAL;
	rc = lock_logging_slot(mmu, as_id, id, &s);
	if (rc)
		return rc;
	if (first_page > s->npages || num_pages > s->npages - first_page) {
		pthread_mutex_unlock(&mmu->lock);
		return -EINVAL;
	}
	words = (num_pages + 63) / 64;
	for (uint64_t j = 0; j < words; j++) {
		uint64_t m, w = first_page / 64 + j;
		memcpy(&m, (const char *)mask + j * 8, 8);   /* mask may be unaligned */
		/* bits past num_pages (and so past the slot's end) are ignored */
		if ((j + 1) * 64 > num_pages)
			m &= (1ull << (num_pages % 64)) - 1;
		/* only pages that were dirty are re-protected (KVM's fetch_andnot) */
		m &= s->dirty[w];
		if (m)
			flush |= reprotect_word(s, w, m);
	}
	if (flush)
		kvmfs_mmu_flush_remote(mmu);
	pthread_mutex_unlock(&mmu->lock);
	return 0;
}
