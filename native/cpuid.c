/*
 * cpuid.c - CPUID: the table KVM_SET_CPUID2 gives the vCPU, what the guest's
 * CPUID instruction answers from it (KVM's kvm_cpuid()), and
 * KVM_GET_SUPPORTED_CPUID's list.
 *
 * Locking: none; the table is only changed by a vCPU ioctl, which never runs
 * during KVM_RUN (the hook's reader).
 */
#include <stdlib.h>
#include <string.h>

#include "vcpu_internal.h"

/* CPUID answers from the table the VMM set, as KVM's kvm_cpuid(): an exact
 * match (index only where flagged significant); a leaf above its range's
 * maximum reads as the highest basic leaf (Intel); otherwise zeros.  OSXSAVE
 * follows CR4.OSXSAVE. */
static const struct kvm_cpuid_entry2 *cpuid_find(kvmfs_vcpu *v, uint32_t fn, uint32_t idx)
{
	for (uint32_t i = 0; i < v->ncpuid; i++) {
		const struct kvm_cpuid_entry2 *e = &v->cpuid[i];
		if (e->function == fn &&
		    (!(e->flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) || e->index == idx))
			return e;
	}
	return NULL;
}

int cpuid_hook(uc_engine *uc, void *ud)
{
	kvmfs_vcpu *v = ud;
	uint64_t *regs = v->live->regs;
	uint32_t fn = (uint32_t)regs[GPR_RAX], idx = (uint32_t)regs[GPR_RCX];
	const struct kvm_cpuid_entry2 *e = cpuid_find(v, fn, idx);

	if (!e) {
		const struct kvm_cpuid_entry2 *range = cpuid_find(v, fn & X86_CPUID_EXT_BASE, 0);
		const struct kvm_cpuid_entry2 *basic = cpuid_find(v, X86_CPUID_BASIC, 0);
		if (range && fn > range->eax && basic)
			e = cpuid_find(v, basic->eax, idx);
	}
	uint32_t a = e ? e->eax : 0, b = e ? e->ebx : 0, c = e ? e->ecx : 0, d = e ? e->edx : 0;
	if (e && e->function == X86_CPUID_FEATURES) {
		c &= ~X86_CPUID_1_ECX_OSXSAVE;
		if (v->live->cr[4] & X86_CR4_OSXSAVE)
			c |= X86_CPUID_1_ECX_OSXSAVE;
		d &= ~X86_CPUID_1_EDX_APIC;
		if (v->apic_base & X86_APIC_BASE_ENABLE)
			d |= X86_CPUID_1_EDX_APIC;
	}
	regs[GPR_RAX] = a;                /* 32-bit results zero-extend */
	regs[GPR_RBX] = b;
	regs[GPR_RCX] = c;
	regs[GPR_RDX] = d;
	return 1;                         /* skip unicorn's own CPUID */
}

/* KVM picks the SMRAM state-save layout by the guest's CPUID: long mode or not. */
bool guest_has_lm(kvmfs_vcpu *v)
{
	const struct kvm_cpuid_entry2 *e = cpuid_find(v, X86_CPUID_EXT_FEATURES, 0);
	return e && (e->edx & X86_CPUID_EXT_EDX_LM);
}

/* KVM's cpuid_maxphyaddr(): leaf 0x80000008 EAX[7:0] when the extended range
 * reaches it, else 36. */
uint32_t guest_maxphyaddr(kvmfs_vcpu *v)
{
	const struct kvm_cpuid_entry2 *e = cpuid_find(v, X86_CPUID_EXT_BASE, 0);

	if (e && e->eax >= X86_CPUID_ADDR_SIZES && (e = cpuid_find(v, X86_CPUID_ADDR_SIZES, 0)))
		return e->eax & 0xff;
	return X86_MAXPHYADDR_DEFAULT;
}

KVMFS_API int kvmfs_vcpu_set_cpuid(kvmfs_vcpu *v, const struct kvm_cpuid_entry2 *e, uint32_t n)
{
	if (n > KVM_MAX_CPUID_ENTRIES)
		return -E2BIG;
	if (v->has_run) {
		/* as KVM since 5.16: after KVM_RUN only the same table is accepted */
		if (n != v->ncpuid)
			return -EINVAL;
		for (uint32_t i = 0; i < n; i++)
			if (memcmp(&e[i], &v->cpuid[i], offsetof(struct kvm_cpuid_entry2, padding)))
				return -EINVAL;
		return 0;
	}
	struct kvm_cpuid_entry2 *t = malloc((n ? n : 1) * sizeof(*t));
	if (!t)
		return -ENOMEM;
	memcpy(t, e, n * sizeof(*t));
	free(v->cpuid);
	v->cpuid = t;
	v->ncpuid = n;
	v->maxphyaddr = guest_maxphyaddr(v);
	uc_ctl_flush_tlb(v->uc);          /* translations made with the old width */
	return 0;
}

KVMFS_API int kvmfs_supported_cpuid(struct kvm_cpuid_entry2 *out, uint32_t max)
{
	/* a P6-family "GenuineIntel" with long mode, NX, SYSCALL; 40-bit physical,
	 * 48-bit linear addresses */
	static const struct kvm_cpuid_entry2 list[] = {
		{ .function = X86_CPUID_BASIC, .eax = 0xd,
		  .ebx = 0x756e6547, .ecx = 0x6c65746e, .edx = 0x49656e69 },
		{ .function = X86_CPUID_FEATURES, .eax = 0x663, .ecx = 0x80202001, .edx = 0x0789fbff },
		{ .function = X86_CPUID_STRUCT_EXT, .flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX },
		{ .function = X86_CPUID_EXT_BASE, .eax = X86_CPUID_ADDR_SIZES },
		{ .function = X86_CPUID_EXT_FEATURES, .ecx = 1, .edx = 0x20100800 },
		{ .function = X86_CPUID_ADDR_SIZES, .eax = 0x3028 },
	};
	uint32_t n = sizeof(list) / sizeof(list[0]);
	if (max < n)
		return -E2BIG;
	memcpy(out, list, sizeof(list));
	return n;
}
