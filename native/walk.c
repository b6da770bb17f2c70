/*
 * walk.c - the guest page-table walker of the TLB-fill path (KVM's
 * paging_tmpl.h, one loop for every mode).
 *
 * Modes, chosen as the CPU does: EFER.LMA -> 4-level (5-level with
 * CR4.LA57), 64-bit entries, 2 MiB and 1 GiB pages; else CR4.PAE -> PAE: the
 * PDPTE picked by vaddr[31:30] from the 32-byte table at CR3[31:5], then a
 * 2-level walk with 64-bit entries and 2 MiB pages; else 32-bit paging:
 * 2 levels of 32-bit entries, 4 MiB pages with CR4.PSE (PSE-36 high bits
 * taken from PDE[20:13]).
 *
 * Rights are the AND of R/W and of U/S over the levels used and the OR of NX
 * (only with EFER.NXE; bit 63 set without NXE is a reserved-bit fault).
 * Supervisor writes ignore R/W unless CR0.WP; CR4.SMEP forbids supervisor
 * fetches from user pages.  SMAP is not modelled (the walker does not see
 * RFLAGS.AC).  Reserved bits, checked as KVM's is_rsvd_bits_set does for
 * 64-bit entries (PAE and long mode, PDPTEs aside: KVM checks those at CR3
 * load): address bits at or above the guest's MAXPHYADDR (pg->maxphyaddr,
 * from its CPUID; 0 = 52), NX without NXE, PS above the 1 GiB level, and the
 * bits between PAT and the frame of a 2 MiB or 1 GiB page.  A set reserved
 * bit is a #PF with P and RSVD in the error code, not an access to the
 * address (32-bit entries have no reserved bits checked).
 * The CPL is the caller's: unicorn's fill hook does not say whether an
 * access is an implicit supervisor one (IDT, GDT, TSS at CPL 3).  PDPTEs are read at each walk (hardware caches them at CR3
 * load) and carry no rights or A bit.
 *
 * Accessed/dirty: after a successful walk, A is set in every entry used and D
 * in the leaf for a write, each with a compare-and-exchange on the host
 * memory of the table (the guest may be editing it on another vCPU); if an
 * entry changed under us the walk starts over, as KVM's walker does.  The
 * update is a write by KVM on the guest's behalf, so it marks the table page
 * dirty in a logging slot.  Tables in READONLY slots are not updated.
 *
 * Table memory comes through the memslots of the vCPU's address space.  An
 * entry in a hole (no memslot) reads as not present, so the access takes a
 * #PF (real hardware would read bus garbage or an MMIO device; a guest that
 * puts its page tables in MMIO is not supported).  An entry whose host memory
 * is not registered yet ends the walk with NEED_HVA (out->hva, and out->gpa =
 * the table page), and the fill is retried after the daemon resolves it.
 *
 * Locking: called by kvmfs_mmu_translate with mmu->lock held; it reads and
 * CASes guest memory, which the guest may change concurrently.
 */
#include "kvmfs_internal.h"

#define PHYS_MASK 0x000ffffffffff000ull
#define PTE_P (1ull << 0)
#define PTE_RW (1ull << 1)
#define PTE_US (1ull << 2)
#define PTE_A (1ull << 5)
#define PTE_D (1ull << 6)
#define PTE_PS (1ull << 7)
#define PTE_NX (1ull << 63)
#define PTE_LARGE_PAT_BIT 12        /* PAT of a large page; reserved above it */
#define WALK_RETRIES 8

struct entry {
	void *host;
	struct kvmfs_slot *slot;
	uint64_t gpa;
	uint64_t val;
};

/* Read the entry at gpa: 1 found, 0 not present (hole), -1 NEED_HVA set. */
static int read_entry(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t gpa, bool wide,
		      struct entry *e, struct kvmfs_xlate *out)
{
	uint64_t avail, miss = 0;
	int rc = kvmfs_mmu_gpa_host(mmu, pg->as_id, gpa, &e->host, &avail, &miss, &e->slot);

	if (rc == -EIO)
		return 0;
	if (rc < 0) {
		out->kind = KVMFS_XL_NEED_HVA;
		out->hva = miss;
		out->gpa = gpa & ~(PAGE_SIZE - 1);
		return -1;
	}
	e->gpa = gpa;
	e->val = wide ? __atomic_load_n((uint64_t *)e->host, __ATOMIC_RELAXED)
		      : __atomic_load_n((uint32_t *)e->host, __ATOMIC_RELAXED);
	return 1;
}

/* Set bits in an entry if it still holds e->val; false if it changed. */
static bool set_bits(kvmfs_mmu *mmu, struct entry *e, bool wide, uint64_t bits)
{
	bool ok;

	if ((e->val & bits) == bits || (e->slot->flags & KVM_MEM_READONLY))
		return true;
	if (wide) {
		uint64_t old = e->val;
		ok = __atomic_compare_exchange_n((uint64_t *)e->host, &old, old | bits, false,
						 __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
	} else {
		uint32_t old = (uint32_t)e->val;
		ok = __atomic_compare_exchange_n((uint32_t *)e->host, &old, old | (uint32_t)bits,
						 false, __ATOMIC_SEQ_CST, __ATOMIC_RELAXED);
	}
	if (ok) {
		e->val |= bits;
		kvmfs_mmu_mark_dirty(mmu, e->slot, (e->gpa >> PAGE_SHIFT) - e->slot->base_gfn);
	}
	return ok;
}

static int fault(struct kvmfs_xlate *out, uint32_t code)
{
	out->kind = KVMFS_XL_PF;
	out->pf_error_code = code;
	return 0;
}

int kvmfs_walk_guest(kvmfs_mmu *mmu, const struct kvmfs_paging *pg, uint64_t vaddr, int access,
		     struct kvmfs_walk *w, struct kvmfs_xlate *out)
{
	bool user = pg->cpl == 3, write = access == KVMFS_ACC_WRITE, fetch = access == KVMFS_ACC_FETCH;
	bool nxe = pg->efer & X86_EFER_NXE, smep = pg->cr4 & X86_CR4_SMEP;
	bool wp = pg->cr0 & X86_CR0_WP;
	/* the error code's access bits; P or RSVD are added by the kind of fault */
	uint32_t code = (write ? X86_PF_WRITE : 0) | (user ? X86_PF_USER : 0) |
			(fetch && (nxe || smep) ? X86_PF_FETCH : 0);

	unsigned mpa = pg->maxphyaddr && pg->maxphyaddr < X86_MAXPHYADDR_LIMIT ?
		       pg->maxphyaddr : X86_MAXPHYADDR_LIMIT;
	/* address bits the guest's physical-address width does not have */
	uint64_t rsvd_addr = PHYS_MASK & ~((1ull << mpa) - 1);

	for (int attempt = 0;; attempt++) {
		struct entry ents[5];
		int n = 0, levels, level, r;
		bool wide, rw = true, us = true, nx = false;
		uint64_t table, pte = 0, page_mask = PAGE_SIZE - 1, base;

		if (pg->efer & X86_EFER_LMA) {
			wide = true;
			levels = (pg->cr4 & X86_CR4_LA57) ? 5 : 4;
			table = pg->cr3 & PHYS_MASK;
		} else if (pg->cr4 & X86_CR4_PAE) {
			struct entry pdpte;
			wide = true;
			levels = 2;
			vaddr &= 0xffffffffull;
			r = read_entry(mmu, pg, (pg->cr3 & 0xffffffe0ull) + ((vaddr >> 30) & 3) * 8,
				       true, &pdpte, out);
			if (r < 0)
				return 0;
			if (!r || !(pdpte.val & PTE_P))
				return fault(out, code);
			table = pdpte.val & PHYS_MASK;
		} else {
			wide = false;
			levels = 2;
			vaddr &= 0xffffffffull;
			table = pg->cr3 & 0xfffff000ull;
		}

		for (level = levels;; level--) {
			unsigned shift = wide ? 12 + 9 * (level - 1) : 12 + 10 * (level - 1);
			uint64_t index = (vaddr >> shift) & (wide ? 511 : 1023);
			struct entry *e = &ents[n];

			r = read_entry(mmu, pg, table + index * (wide ? 8 : 4), wide, e, out);
			if (r < 0)
				return 0;
			if (!r || !(e->val & PTE_P))
				return fault(out, code);
			pte = e->val;
			n++;
			if (wide && ((!nxe && (pte & PTE_NX)) || (pte & rsvd_addr)))
				return fault(out, code | X86_PF_PRESENT | X86_PF_RSVD);
			rw &= !!(pte & PTE_RW);
			us &= !!(pte & PTE_US);
			nx |= nxe && (pte & PTE_NX);
			if (level == 1) {
				base = pte & (wide ? PHYS_MASK : 0xfffff000ull);
				break;
			}
			if (pte & PTE_PS) {
				if (wide) {
					/* PS is reserved above the 1 GiB level */
					if (level > 3)
						return fault(out, code | X86_PF_PRESENT | X86_PF_RSVD);
					page_mask = (1ull << shift) - 1;
					if (pte & page_mask & ~((2ull << PTE_LARGE_PAT_BIT) - 1))
						return fault(out, code | X86_PF_PRESENT | X86_PF_RSVD);
					base = pte & PHYS_MASK & ~page_mask;
					break;
				}
				if (pg->cr4 & X86_CR4_PSE) {
					page_mask = (1ull << 22) - 1;
					base = (pte & 0xffc00000ull) | (((pte >> 13) & 0xff) << 32);
					break;
				}
				/* without CR4.PSE the PS bit is ignored */
			}
			table = pte & (wide ? PHYS_MASK : 0xfffff000ull);
		}

		/* rights at this CPL */
		if (user) {
			if (!us || (write && !rw))
				return fault(out, code | X86_PF_PRESENT);
		} else {
			if (write && !rw && wp)
				return fault(out, code | X86_PF_PRESENT);
			if (fetch && us && smep)
				return fault(out, code | X86_PF_PRESENT);
		}
		if (fetch && nx)
			return fault(out, code | X86_PF_PRESENT);

		/* A on every level, D on the leaf for a write */
		bool changed = false;
		for (int i = 0; i < n && !changed; i++) {
			uint64_t bits = PTE_A | (i == n - 1 && write ? PTE_D : 0);
			changed = !set_bits(mmu, &ents[i], wide, bits);
		}
		if (changed && attempt < WALK_RETRIES)
			continue;

		w->gpa = base + (vaddr & page_mask);
		w->perms = PROT_R;
		if (user ? rw : (rw || !wp))
			w->perms |= PROT_W;
		if (!nx && !(!user && us && smep))
			w->perms |= PROT_X;
		w->dirty = !!(ents[n - 1].val & PTE_D);
		out->kind = KVMFS_XL_OK;
		return 0;
	}
}
