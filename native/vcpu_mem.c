/*
 * vcpu_mem.c - guest memory as one vCPU sees it: the TLB-fill hook (the MMU's
 * kvmfs_mmu_translate behind unicorn's soft TLB), the host ranges mapped into
 * the vCPU's engines, the code-page copies that catch code rewritten behind
 * an engine's back, and guest-linear / guest-physical copies for the
 * emulation done in C (event delivery, IO decoding, SMM).
 *
 * Locking: none of its own; it runs in the vCPU's thread.  Every MMU call
 * takes the VM's mmu lock inside mmu.c.
 */
#include <stdlib.h>
#include <string.h>

#include "vcpu_internal.h"

void paging_now(kvmfs_vcpu *v, struct kvmfs_paging *pg, int cpl)
{
	struct cpu_env *e = v->live;

	/* Read straight from the CPU state: control registers, EFER and the CPL
	 * (hflags) change only in helpers, so the copy in memory is current even
	 * in the middle of a block, and no API call (MSR reads run QEMU's rdmsr
	 * helper on the live registers) happens inside a fill. */
	pg->cr0 = e->cr[0];
	pg->cr3 = e->cr[3];
	pg->cr4 = e->cr[4];
	pg->efer = *e->efer;
	pg->cpl = cpl < 0 ? env_cpl(e) : cpl;
	pg->as_id = v->in_smm;            /* SMM sees address space 1 */
	pg->maxphyaddr = v->maxphyaddr;
}

/* The linear address of RIP (CS base + RIP) in the current engine. */
uint64_t live_pc(kvmfs_vcpu *v)
{
	return v->live->segs[R_CS].base + *v->live->rip;
}

/* Copy to/from memory through the translation pg describes.  Returns 0, or
 * the KVMFS_XL_* kind that stopped it (xl filled). */
static int copy_guest(kvmfs_vcpu *v, const struct kvmfs_paging *pg, uint64_t la, void *buf,
		      uint32_t len, bool write, struct kvmfs_xlate *xl)
{
	uint8_t *p = buf;

	while (len) {
		uint32_t off = la & (PAGE_SIZE - 1), n = PAGE_SIZE - off;
		if (n > len)
			n = len;
		kvmfs_mmu_translate(v->mmu, pg, la & ~(PAGE_SIZE - 1),
				    write ? KVMFS_ACC_WRITE : KVMFS_ACC_READ, xl);
		if (xl->kind == KVMFS_XL_NEED_HVA) {
			v->gmem_miss = true;      /* see deliver_event */
			v->miss_hva = xl->hva;
		}
		if (xl->kind != KVMFS_XL_OK)
			return xl->kind ? xl->kind : -1;
		if (write)
			memcpy((uint8_t *)xl->host + off, p, n);
		else
			memcpy(p, (uint8_t *)xl->host + off, n);
		la += n;
		p += n;
		len -= n;
	}
	return 0;
}

/* Guest-linear memory, as a supervisor access in the current mode. */
int gmem(kvmfs_vcpu *v, uint64_t la, void *buf, uint32_t len, bool write, struct kvmfs_xlate *xl)
{
	struct kvmfs_paging pg;

	paging_now(v, &pg, 0);
	return copy_guest(v, &pg, la, buf, len, write, xl);
}

/* Guest-physical memory of address space as_id, as KVM's kvm_vcpu_read/
 * write_guest: writes are dirty-logged and a READONLY slot refuses them. */
int gphys(kvmfs_vcpu *v, uint32_t as_id, uint64_t gpa, void *buf, uint32_t len, bool write,
	  struct kvmfs_xlate *xl)
{
	struct kvmfs_paging pg = { .as_id = as_id };   /* CR0.PG clear: no walk */

	return copy_guest(v, &pg, gpa, buf, len, write, xl);
}

/* ------------------------------------------------------------ host ranges -- */

/* Map every host range the MMU has (and unmap the removed ones) into both
 * engines, at the unicorn-physical address the MMU gave it. */
int map_hostmem(kvmfs_vcpu *v)
{
	int n = kvmfs_hostmem_list(v->mmu, v->hm, v->hm_cap);
	if (n > v->hm_cap) {
		int cap = n * 2;
		void *a = realloc(v->hm, cap * sizeof(*v->hm));
		if (!a)
			return -ENOMEM;
		v->hm = a;
		a = realloc(v->hm_mapped, cap * sizeof(uint64_t));
		if (!a)
			return -ENOMEM;
		v->hm_mapped = a;
		memset(v->hm_mapped + v->hm_cap, 0, (cap - v->hm_cap) * sizeof(uint64_t));
		v->hm_cap = cap;
		n = kvmfs_hostmem_list(v->mmu, v->hm, v->hm_cap);
	}
	for (int i = 0; i < n && i < v->hm_cap; i++) {
		struct kvmfs_hostmem_info *h = &v->hm[i];
		if (h->size && !v->hm_mapped[i]) {
			if (uc_mem_map_ptr(v->eng[ENG_FAST].uc, h->uphys, h->size, UC_PROT_ALL, h->ptr))
				return -ENOMEM;
			if (uc_mem_map_ptr(v->eng[ENG_STEP].uc, h->uphys, h->size, UC_PROT_ALL, h->ptr)) {
				uc_mem_unmap(v->eng[ENG_FAST].uc, h->uphys, h->size);
				return -ENOMEM;
			}
			v->hm_mapped[i] = h->size;
			if (h->uphys + h->size > v->uphys_end)
				v->uphys_end = h->uphys + h->size;
		} else if (!h->size && v->hm_mapped[i]) {
			uc_mem_unmap(v->eng[ENG_FAST].uc, h->uphys, v->hm_mapped[i]);
			uc_mem_unmap(v->eng[ENG_STEP].uc, h->uphys, v->hm_mapped[i]);
			v->hm_mapped[i] = 0;
		}
	}
	v->hm_n = n;
	return 0;
}

/* ------------------------------------------------------------- code pages -- */

/* 1: the page differs from the copy taken when this engine last fetched
 * from it (copy refreshed); 0: same; -1: not seen before (copy taken). */
static int code_page_check(struct engine *e, uint64_t uphys, const void *host)
{
	struct code_page *c = &e->code[(uphys >> PAGE_SHIFT) % CODE_PAGES];

	if (c->copy && c->uphys == uphys) {
		if (!memcmp(c->copy, host, PAGE_SIZE))
			return 0;
		memcpy(c->copy, host, PAGE_SIZE);
		return 1;
	}
	if (!c->copy && !(c->copy = malloc(PAGE_SIZE)))
		return 0;
	c->uphys = uphys;
	memcpy(c->copy, host, PAGE_SIZE);
	return -1;
}

/* Drop engine e's translations of the code page at linear address la. */
void code_page_drop(struct engine *e, uint64_t la)
{
	la &= ~(PAGE_SIZE - 1);
	uc_ctl_remove_cache(e->uc, la, la + PAGE_SIZE);
}

/* Before engine idx runs the instruction at la: drop its translations of the
 * page(s) holding the instruction's 15 bytes if they changed since the engine
 * last looked (or were not tracked). */
void code_at_refresh(kvmfs_vcpu *v, int idx, uint64_t la)
{
	struct kvmfs_paging pg;
	struct kvmfs_xlate xl;

	paging_now(v, &pg, -1);
	for (uint64_t p = la & ~(PAGE_SIZE - 1); p <= ((la + X86_MAX_INSN_LEN - 1) & ~(PAGE_SIZE - 1));
	     p += PAGE_SIZE) {
		kvmfs_mmu_translate(v->mmu, &pg, p, KVMFS_ACC_FETCH, &xl);
		if (xl.kind == KVMFS_XL_OK && xl.uphys < v->uphys_end &&
		    code_page_check(&v->eng[idx], xl.uphys, xl.host))
			code_page_drop(&v->eng[idx], p);
	}
}

/* ---------------------------------------------------------------- TLB fill -- */

bool tlb_fill(uc_engine *uc, uint64_t va, uc_mem_type type, uc_tlb_entry *e, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvmfs_paging pg;
	int acc = type == UC_MEM_WRITE ? KVMFS_ACC_WRITE :
		  type == UC_MEM_FETCH ? KVMFS_ACC_FETCH : KVMFS_ACC_READ;
	struct kvmfs_xlate xl;

	paging_now(v, &pg, -1);
	kvmfs_mmu_translate(v->mmu, &pg, va, acc, &xl);
	if (xl.kind == KVMFS_XL_OK) {
		if (xl.uphys >= v->uphys_end) {
			v->fill_remap = true;     /* a range added while running */
			goto refuse;
		}
		if (acc == KVMFS_ACC_FETCH && code_page_check(&v->eng[v->cur], xl.uphys, xl.host) > 0) {
			v->code_stale = true;     /* dropped and retried by handle_stop */
			goto refuse;
		}
		e->paddr = xl.uphys;
		e->perms = xl.perms;
		return true;
	}
	if (xl.kind == KVMFS_XL_MMIO && v->mmio_step && acc != KVMFS_ACC_FETCH) {
		int i = v->win_next++ % WIN_PAGES;
		v->win_gpa[i] = xl.gpa & ~(PAGE_SIZE - 1);
		e->paddr = WIN_BASE + (uint64_t)i * PAGE_SIZE;
		e->perms = UC_PROT_READ | UC_PROT_WRITE;
		return true;
	}
refuse:
	v->fx = xl;
	v->fill_vaddr = va;
	v->fill_access = acc;
	v->why = WHY_FILL;
	return false;
}
