/*
 * mmio.c - MMIO: the window of uc_mmio_map callbacks an MMIO instruction
 * runs against, and the replay that completes it exactly once.
 *
 * A refused fill for an MMIO gpa stops the guest on the instruction; the
 * instruction is then executed alone on the step engine with the MMIO pages
 * mapped to the window (tlb_fill maps them while mmio_step is set):
 *
 *   RUNNING --fill: MMIO--> STEP (window mapped)
 *   STEP --read, no data yet--> EXIT_MMIO read, PEND_MMIO_READ (context restored)
 *   PEND_MMIO_READ --KVM_RUN with data--> STEP again (the data is replayed)
 *   STEP --writes--> EXIT_MMIO write, one exit per write (writes_reported)
 *   STEP --done--> RUNNING
 *
 * So RMW and multi-access forms (push [mmio], add [mmio],eax, movs) complete
 * exactly once with the data the VMM gave.  An access that straddles the end
 * of a slot (or starts in RAM and ends in a hole) exits with only the part
 * outside memory, at the first gpa past it, as KVM's emulator does
 * (emulator_read_write_onepage per page); an unaligned one inside an MMIO
 * page exits with its own address and length.
 *
 * Locking: none; it runs in the vCPU's thread.
 */
#include <string.h>

#include "vcpu_internal.h"

/*
 * UC_HOOK_MEM_READ (step engine): the guest's read as the instruction asked for
 * it, before QEMU splits it.  QEMU does a read it cannot do in one piece (one
 * that crosses a page, or an unaligned one on an MMIO page) as two reads of
 * the same size at addr & ~(size - 1) and the next, and combines them; the
 * window only sees those.  paddr is unicorn-physical: the window page's, or a
 * RAM page's when the read starts in the page before the window.
 */
void mmio_read_hook(uc_engine *uc, uc_mem_type type, uint64_t paddr, int size, int64_t value,
		    void *ud)
{
	kvmfs_vcpu *v = ud;

	v->rd_paddr = paddr;
	v->rd_size = size;
}

/*
 * The part of a window read at off (size bytes) that the guest's read uses:
 * its page offset *u0 and length (0: none of it).  As KVM, the VMM sees only
 * the bytes outside memory; those in the RAM page before are read from it.
 */
static uint32_t win_used(kvmfs_vcpu *v, uint64_t off, unsigned size, int64_t *u0)
{
	int64_t lo = off & (PAGE_SIZE - 1), hi = lo + size;
	int64_t a0 = v->rd_paddr & (PAGE_SIZE - 1), a1;

	*u0 = lo;
	if (!v->rd_size)
		return size;
	if ((v->rd_paddr >> PAGE_SHIFT) != ((WIN_BASE + off) >> PAGE_SHIFT))
		a0 -= PAGE_SIZE;          /* it starts in the page before */
	a1 = a0 + v->rd_size;
	if (a1 <= 0)
		return size;              /* not this read's access: take it whole */
	if (a0 > lo)
		*u0 = a0;
	if (a1 < hi)
		hi = a1;
	return hi > *u0 ? (uint32_t)(hi - *u0) : 0;
}

/*
 * unicorn splits an 8-byte access to an MMIO region into two 4-byte ones (low
 * half first); accesses that continue the previous one are merged back, so
 * the VMM sees the guest's access size.
 */
uint64_t win_read(uc_engine *uc, uint64_t off, unsigned size, void *ud)
{
	kvmfs_vcpu *v = ud;
	int64_t u0;
	uint32_t len = win_used(v, off, size, &u0);
	uint64_t gpa = v->win_gpa[off >> PAGE_SHIFT] + u0;
	unsigned shift = 8 * (unsigned)(u0 - (int64_t)(off & (PAGE_SIZE - 1)));

	if (!len)
		return 0;
	for (int i = 0; i < v->nreads; i++) {
		struct mmio_acc *a = &v->reads[i];
		if (gpa >= a->gpa && gpa + len <= a->gpa + a->len) {
			uint64_t x = 0;
			memcpy(&x, (uint8_t *)&a->data + (gpa - a->gpa), len);
			v->reads_used = i + 1;
			return shift < 64 ? x << shift : 0;
		}
	}
	if (!v->read_missing) {
		v->read_missing = true;
		v->miss.gpa = gpa;
		v->miss.len = len;
	} else if (gpa == v->miss.gpa + v->miss.len && v->miss.len + len <= sizeof(v->miss.data)) {
		v->miss.len += len;
	}
	return 0;
}

void win_write(uc_engine *uc, uint64_t off, unsigned size, uint64_t value, void *ud)
{
	kvmfs_vcpu *v = ud;
	uint64_t gpa = v->win_gpa[off >> PAGE_SHIFT] + (off & (PAGE_SIZE - 1));

	if (v->read_missing)
		return;
	if (v->nwrites) {
		struct mmio_acc *p = &v->writes[v->nwrites - 1];
		if (gpa == p->gpa + p->len && p->len + size <= sizeof(p->data)) {
			memcpy((uint8_t *)&p->data + p->len, &value, size);
			p->len += size;
			return;
		}
	}
	if (v->nwrites >= MAX_MMIO_ACC)
		return;
	struct mmio_acc *a = &v->writes[v->nwrites++];
	a->gpa = gpa;
	a->len = size;
	a->data = value;
}

/* Report the write a as KVM_EXIT_MMIO. */
static int exit_mmio_write(kvmfs_vcpu *v, const struct mmio_acc *a)
{
	struct kvm_run *run = v->run;

	run->mmio.phys_addr = a->gpa;
	run->mmio.len = a->len;
	run->mmio.is_write = 1;
	memcpy(run->mmio.data, &a->data, sizeof(run->mmio.data));
	return exit_to(v, KVM_EXIT_MMIO) + 1;
}

/*
 * Run the MMIO instruction at RIP alone with the MMIO window mapped.  Returns
 * 1 when an exit to userspace was prepared, 0 to continue, <0 on error.
 */
int mmio_instruction(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;
	uc_err e;

	uc_context_save(v->uc, v->ctx_step);
	v->mmio_step = true;
	v->reads_used = 0;
	v->read_missing = false;
	v->nwrites = 0;
	v->writes_reported = 0;
	v->rd_size = 0;
	e = step_one(v);
	v->mmio_step = false;
	uc_ctl_flush_tlb(v->uc);          /* drop the window mappings */
	if (v->read_missing) {
		uc_context_restore(v->uc, v->ctx_step);
		uc_ctl_flush_tlb(v->uc);
		v->pending = PEND_MMIO_READ;
		run->mmio.phys_addr = v->miss.gpa;
		run->mmio.len = v->miss.len;
		run->mmio.is_write = 0;
		memset(run->mmio.data, 0, sizeof(run->mmio.data));
		return exit_to(v, KVM_EXIT_MMIO) + 1;
	}
	v->nreads = 0;
	v->pending = PEND_NONE;
	if (e != UC_ERR_OK && v->why == WHY_NONE)
		v->why = WHY_FILL;        /* handled by the caller as a fault */
	if (v->nwrites) {
		v->writes_reported = 1;
		return exit_mmio_write(v, &v->writes[0]);
	}
	return 0;
}

/* The next write of a replayed instruction that did several. */
int mmio_next_write(kvmfs_vcpu *v)
{
	return exit_mmio_write(v, &v->writes[v->writes_reported++]);
}

/* KVM_RUN after an MMIO read exit: keep the VMM's data, replay the instruction. */
int mmio_complete_read(kvmfs_vcpu *v)
{
	struct kvm_run *run = v->run;

	if (v->nreads < MAX_MMIO_ACC) {
		struct mmio_acc *a = &v->reads[v->nreads++];
		a->gpa = run->mmio.phys_addr;
		a->len = run->mmio.len;
		a->data = 0;
		memcpy(&a->data, run->mmio.data, a->len > sizeof(a->data) ? sizeof(a->data) : a->len);
	}
	return mmio_instruction(v);
}
