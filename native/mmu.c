/*
 * mmu.c - the per-VM MMU object and the TLB-fill path: kvmfs_mmu_new/free,
 * kvmfs_mmu_translate (KVM's page-fault handler for the TDP model: walk the
 * guest tables (walk.c), find the memslot (memslot.c), install or reuse the
 * spte (spte.c) on host memory (hostmem.c), dirty-log write protection
 * (dirty.c)), and the counters.
 *
 * The MMU side is memslot.c (kvm_main.c's role), hostmem.c, spte.c, flush.c,
 * dirty.c, walk.c and this file; they share the structures of
 * kvmfs_internal.h ("mmu internals") and never include vCPU headers.
 *
 * Locking: one pthread mutex per VM (mmu->lock, KVM's mmu_lock) guards every
 * structure of the MMU side; every exported function takes it.  The only
 * place that drops it in the middle of an operation is the remote flush
 * (flush.c), which waits for vCPU acknowledgements with the lock RELEASED,
 * always as the last step of the operation, after which the caller touches
 * nothing it looked up before.  (translate's fault-around madvise() runs
 * after the lock is dropped, on a mapping kvmfs_hostmem_remove() keeps alive
 * for it.)  kick() callbacks are called with the lock held: they must only
 * stop the emulator and never call back into the MMU.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <malloc.h>
#include <string.h>

#include "kvmfs_internal.h"

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

void kvmfs_mmu_free(kvmfs_mmu *mmu)
{
	if (!mmu)
		return;
	for (int a = 0; a < KVMFS_ADDRESS_SPACES; a++) {
		struct kvmfs_aspace *as = &mmu->as[a];
		for (int i = 0; i < as->n; i++)
			memslot_free(as->sorted[i]);
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
	/* A VM's vCPU engines (freed before the mmu) leave megabytes of freed
	 * heap behind; give it back to the host now the whole VM is gone. */
	malloc_trim(0);
}

/* ------------------------------------------------------------- translate -- */

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
		if (hostmem_populate_plan(mmu, s, hi, hva, &pop_ptr, &pop_len))
			pop_hi = hi;
	}
	if (write && mmu->hm[sp->hm_idx].readonly) {
		out->kind = KVMFS_XL_EFAULT;       /* hva_to_pfn: the VMM's page is not writable */
		goto out;
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
	if ((w.perms & PROT_W) && (*wword & wbit) && !mmu->hm[sp->hm_idx].readonly &&
	    (write || ((sp->flags & KVMFS_SPTE_D) && w.dirty)))
		out->perms |= PROT_W;
	out->uphys = sp->uphys;
	out->host = sp->host;
out:
	pthread_mutex_unlock(&mmu->lock);
	if (pop_hi >= 0)
		hostmem_populate_run(mmu, pop_hi, pop_ptr, pop_len);
	return rc;
}

void kvmfs_mmu_get_stats(kvmfs_mmu *mmu, struct kvmfs_mmu_stats *out)
{
	pthread_mutex_lock(&mmu->lock);
	*out = mmu->stats;
	pthread_mutex_unlock(&mmu->lock);
}
