/*
 * hostmem.c - the host memory the daemon has mapped for the VM's slots:
 * ranges of the VMM's address space (hva) with the daemon address they are
 * mapped at and the unicorn-physical address the engines map them at; their
 * removal by MMU-notifier invalidation; gpa -> host resolution and the
 * host-side copies of MNT/vmN/mem; fault-around population.
 *
 * Each range keeps the list of sptes pointing into it (the host-page rmap,
 * spte.c), so an invalidation finds them without a scan of all slots.  The
 * range array is append-only: a removed range keeps its index with size 0,
 * because the vCPUs key their unicorn mappings by it.
 *
 * Locking: everything here is guarded by the VM's mmu->lock (KVM's
 * mmu_lock); every exported function takes it; the fault-around madvise()
 * runs without it (hostmem_populate_run).
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "kvmfs_internal.h"

#define UPHYS_LIMIT (1ull << 51)
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

/* ---------------------------------------------------------------- ranges -- */

/* Index (into mmu->hm) of the live range holding hva, or -1. */
int hostmem_find(kvmfs_mmu *mmu, uint64_t hva)
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

/*
 * mmu_invalidate_retry_gfn(): a lookup of [start, end) made at sequence seq may
 * be stale if an invalidation has ended since, or one in progress covers it
 * (lock held).
 */
static bool invalidate_stale(kvmfs_mmu *mmu, uint64_t seq, uint64_t start, uint64_t end)
{
	bool stale = seq != mmu->inv_seq ||
		     (mmu->inv_in_progress && start < mmu->inv_end && mmu->inv_start < end);

	if (stale)
		mmu->stats.notifier_retries++;
	return stale;
}

int kvmfs_hostmem_add(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, void *ptr, uint32_t flags,
		      uint64_t seq)
{
	struct kvmfs_hostmem *h;
	uint64_t span;
	int i, rc = 0;

	if (!size || !ptr || (hva | size | (uintptr_t)ptr) & (PAGE_SIZE - 1) || hva + size < hva ||
	    flags & ~KVMFS_HOSTMEM_READONLY)
		return -EINVAL;
	pthread_mutex_lock(&mmu->lock);
	if (invalidate_stale(mmu, seq, hva, hva + size)) {
		rc = -EAGAIN;
		goto out;
	}
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
	h->readonly = flags & KVMFS_HOSTMEM_READONLY;
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

void kvmfs_mmu_invalidate_begin(kvmfs_mmu *mmu, uint64_t start, uint64_t end)
{
	pthread_mutex_lock(&mmu->lock);
	if (!mmu->inv_in_progress++) {
		mmu->inv_start = start;
		mmu->inv_end = end;
	} else {
		if (start < mmu->inv_start)
			mmu->inv_start = start;
		if (end > mmu->inv_end)
			mmu->inv_end = end;
	}
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_invalidate_end(kvmfs_mmu *mmu)
{
	pthread_mutex_lock(&mmu->lock);
	mmu->inv_seq++;              /* before the count drops, as kvm_mmu_invalidate_end */
	if (mmu->inv_in_progress > 0)
		mmu->inv_in_progress--;
	pthread_mutex_unlock(&mmu->lock);
}

/* Whether a lookup of [start, end) made at sequence seq may be stale. */
int kvmfs_mmu_invalidate_retry(kvmfs_mmu *mmu, uint64_t seq, uint64_t start, uint64_t end)
{
	int retry;

	pthread_mutex_lock(&mmu->lock);
	retry = invalidate_stale(mmu, seq, start, end);
	pthread_mutex_unlock(&mmu->lock);
	return retry;
}

uint64_t kvmfs_mmu_invalidate_seq(kvmfs_mmu *mmu)
{
	uint64_t seq;

	pthread_mutex_lock(&mmu->lock);
	seq = mmu->inv_seq;
	pthread_mutex_unlock(&mmu->lock);
	return seq;
}

int kvmfs_hostmem_remove(kvmfs_mmu *mmu, uint64_t hva, uint64_t size, uint64_t *zapped,
			 void **ptrs, uint64_t *sizes, int max)
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
			mmu->stats.notifier_zaps++;
			if (zapped)
				(*zapped)++;
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
	 * still running on a removed range (kvmfs_mmu_translate runs it without the lock)
	 * finish.  No new one can start there, the ranges being gone.
	 */
	for (int i = 0; removed && i < mmu->hm_n; i++) {
		while (!mmu->hm[i].size && mmu->hm[i].populating)
			pthread_cond_wait(&mmu->flush_cv, &mmu->lock);
	}
	pthread_mutex_unlock(&mmu->lock);
	return removed;
}

/* ---------------------------------------------------------- gpa <-> host -- */

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

/* Is the host memory behind gpa mapped read-only by the VMM? (lock held) */
static bool hostmem_readonly_at(kvmfs_mmu *mmu, uint32_t as_id, uint64_t gpa)
{
	struct kvmfs_slot *s = kvmfs_mmu_slot_of(mmu, as_id, gpa >> PAGE_SHIFT);
	int hi = s ? hostmem_find(mmu, s->hva + (gpa - (s->base_gfn << PAGE_SHIFT))) : -1;

	return hi >= 0 && mmu->hm[hi].readonly;
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
		if (write && hostmem_readonly_at(mmu, as_id, gpa + done))
			break;
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

/* ---------------------------------------------------------- fault-around -- */

/*
 * Fault-around (POPULATE_BYTES): plan the populate for a new spte of page
 * hva, in slot s and host range hi (lock held).  The block is clipped to the
 * host range and to the slot, and its pages are marked in h->populated at
 * once, so each page is populated at most once per host range whatever the
 * slots over it.  Returns whether a madvise() is due (then h->populating was
 * raised; hostmem_populate_run() drops it).
 */
bool hostmem_populate_plan(kvmfs_mmu *mmu, struct kvmfs_slot *s, int hi, uint64_t hva,
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
void hostmem_populate_run(kvmfs_mmu *mmu, int hi, void *p, size_t len)
{
	int err = madvise(p, len, MADV_POPULATE_READ) ? errno : 0;

	pthread_mutex_lock(&mmu->lock);
	if (err == EINVAL)
		mmu->no_populate = true;
	if (!--mmu->hm[hi].populating)
		pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}
