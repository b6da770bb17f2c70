/*
 * abi_dump - the KVM ABI as the C compiler sees it, one "NAME VALUE" a line.
 *
 *   gcc -o abi_dump tools/abi_dump.c                               # the system <linux/kvm.h>
 *   gcc -DWITH_KVMFS_H -I clients -o abi_dump tools/abi_dump.c     # plus clients/kvmfs.h
 *   gcc -DWITH_NATIVE_ABI -I native -o abi_dump tools/abi_dump.c   # the daemon's C headers
 *
 * Lines: "KVM_NAME value" for ioctl numbers and constants, "struct_name size"
 * for sizeof, "struct_name.member offset" and "struct_name.member:size size"
 * for offsetof and sizeof of every member (members of anonymous structs and
 * unions by their path: kvm_run's exit union members appear as kvm_run.io.port,
 * the debug exit and kvm_guest_debug without their ".arch").  Every constant is
 * guarded, so names a header lacks are simply not printed.
 *
 * WITH_NATIVE_ABI prints the constants of native/kvmfs_internal.h (and through
 * it native/kvm_abi.h) instead of the system header's, kvmfs-private names under
 * the ABI name they stand for; no structs (tests/t0_abi.py reads those through
 * the cffi module, which is compiled from the same header).
 * tests/t0_abi.py compiles all three forms and compares each line with kvmfs/abi.py.
 */
#include <stddef.h>
#include <stdio.h>

#ifdef WITH_NATIVE_ABI
#include "kvmfs_internal.h"
#else
#include <linux/kvm.h>

/* Newer than 6.1: struct kvm_userspace_memory_region2 and kvm_run.memory_fault. */
#ifdef KVM_SET_USER_MEMORY_REGION2
#define SYSTEM_HEADER_HAS_6_8 1
#endif

#ifdef WITH_KVMFS_H
#include "kvmfs.h"
#endif
#endif

#define C(name) printf("%s %llu\n", #name, (unsigned long long)(name))
#define A(name, value) printf("%s %llu\n", #name, (unsigned long long)(value))
#define S(type) printf("%s %zu\n", #type, sizeof(struct type))
#define O(type, label, member) printf("%s.%s %zu\n%s.%s:size %zu\n", #type, label, \
	offsetof(struct type, member), #type, label, sizeof(((struct type *)0)->member))

int main(void)
{
	/* ioctl numbers */
#ifdef KVM_GET_API_VERSION
	C(KVM_GET_API_VERSION);
#endif
#ifdef KVM_CREATE_VM
	C(KVM_CREATE_VM);
#endif
#ifdef KVM_CHECK_EXTENSION
	C(KVM_CHECK_EXTENSION);
#endif
#ifdef KVM_GET_VCPU_MMAP_SIZE
	C(KVM_GET_VCPU_MMAP_SIZE);
#endif
#ifdef KVM_GET_SUPPORTED_CPUID
	C(KVM_GET_SUPPORTED_CPUID);
#endif
#ifdef KVM_GET_MSR_INDEX_LIST
	C(KVM_GET_MSR_INDEX_LIST);
#endif
#ifdef KVM_CREATE_VCPU
	C(KVM_CREATE_VCPU);
#endif
#ifdef KVM_GET_DIRTY_LOG
	C(KVM_GET_DIRTY_LOG);
#endif
#ifdef KVM_SET_USER_MEMORY_REGION
	C(KVM_SET_USER_MEMORY_REGION);
#endif
#ifdef KVM_SET_TSS_ADDR
	C(KVM_SET_TSS_ADDR);
#endif
#ifdef KVM_SET_IDENTITY_MAP_ADDR
	C(KVM_SET_IDENTITY_MAP_ADDR);
#endif
#ifdef KVM_SET_USER_MEMORY_REGION2
	C(KVM_SET_USER_MEMORY_REGION2);
#endif
#ifdef KVM_CREATE_IRQCHIP
	C(KVM_CREATE_IRQCHIP);
#endif
#ifdef KVM_SET_GSI_ROUTING
	C(KVM_SET_GSI_ROUTING);
#endif
#ifdef KVM_IRQFD
	C(KVM_IRQFD);
#endif
#ifdef KVM_IOEVENTFD
	C(KVM_IOEVENTFD);
#endif
#ifdef KVM_ENABLE_CAP
	C(KVM_ENABLE_CAP);
#endif
#ifdef KVM_CLEAR_DIRTY_LOG
	C(KVM_CLEAR_DIRTY_LOG);
#endif
#ifdef KVM_SET_MEMORY_ATTRIBUTES
	C(KVM_SET_MEMORY_ATTRIBUTES);
#endif
#ifdef KVM_CREATE_GUEST_MEMFD
	C(KVM_CREATE_GUEST_MEMFD);
#endif
#ifdef KVM_RUN
	C(KVM_RUN);
#endif
#ifdef KVM_GET_REGS
	C(KVM_GET_REGS);
#endif
#ifdef KVM_SET_REGS
	C(KVM_SET_REGS);
#endif
#ifdef KVM_GET_SREGS
	C(KVM_GET_SREGS);
#endif
#ifdef KVM_SET_SREGS
	C(KVM_SET_SREGS);
#endif
#ifdef KVM_INTERRUPT
	C(KVM_INTERRUPT);
#endif
#ifdef KVM_GET_MSRS
	C(KVM_GET_MSRS);
#endif
#ifdef KVM_SET_MSRS
	C(KVM_SET_MSRS);
#endif
#ifdef KVM_GET_FPU
	C(KVM_GET_FPU);
#endif
#ifdef KVM_SET_FPU
	C(KVM_SET_FPU);
#endif
#ifdef KVM_SET_CPUID2
	C(KVM_SET_CPUID2);
#endif
#ifdef KVM_GET_CPUID2
	C(KVM_GET_CPUID2);
#endif
#ifdef KVM_GET_MP_STATE
	C(KVM_GET_MP_STATE);
#endif
#ifdef KVM_SET_MP_STATE
	C(KVM_SET_MP_STATE);
#endif
#ifdef KVM_SET_GUEST_DEBUG
	C(KVM_SET_GUEST_DEBUG);
#endif
#ifdef KVM_GET_VCPU_EVENTS
	C(KVM_GET_VCPU_EVENTS);
#endif
#ifdef KVM_SET_VCPU_EVENTS
	C(KVM_SET_VCPU_EVENTS);
#endif
#ifdef KVM_SMI
	C(KVM_SMI);
#endif

	/* constants */
#ifdef KVMIO
	C(KVMIO);
#endif
#ifdef KVM_API_VERSION
	C(KVM_API_VERSION);
#endif
#ifdef KVM_VCPUEVENT_VALID_NMI_PENDING
	C(KVM_VCPUEVENT_VALID_NMI_PENDING);
#endif
#ifdef KVM_VCPUEVENT_VALID_SIPI_VECTOR
	C(KVM_VCPUEVENT_VALID_SIPI_VECTOR);
#endif
#ifdef KVM_VCPUEVENT_VALID_SHADOW
	C(KVM_VCPUEVENT_VALID_SHADOW);
#endif
#ifdef KVM_VCPUEVENT_VALID_SMM
	C(KVM_VCPUEVENT_VALID_SMM);
#endif
#ifdef KVM_VCPUEVENT_VALID_PAYLOAD
	C(KVM_VCPUEVENT_VALID_PAYLOAD);
#endif
#ifdef KVM_VCPUEVENT_VALID_TRIPLE_FAULT
	C(KVM_VCPUEVENT_VALID_TRIPLE_FAULT);
#endif
#ifdef KVM_RUN_X86_SMM
	C(KVM_RUN_X86_SMM);
#endif
#ifdef KVM_RUN_X86_BUS_LOCK
	C(KVM_RUN_X86_BUS_LOCK);
#endif
#ifdef KVM_RUN_X86_GUEST_MODE
	C(KVM_RUN_X86_GUEST_MODE);
#endif
#ifdef KVM_GUESTDBG_ENABLE
	C(KVM_GUESTDBG_ENABLE);
#endif
#ifdef KVM_GUESTDBG_SINGLESTEP
	C(KVM_GUESTDBG_SINGLESTEP);
#endif
#ifdef KVM_GUESTDBG_USE_SW_BP
	C(KVM_GUESTDBG_USE_SW_BP);
#endif
#ifdef KVM_GUESTDBG_USE_HW_BP
	C(KVM_GUESTDBG_USE_HW_BP);
#endif
#ifdef KVM_GUESTDBG_INJECT_DB
	C(KVM_GUESTDBG_INJECT_DB);
#endif
#ifdef KVM_GUESTDBG_INJECT_BP
	C(KVM_GUESTDBG_INJECT_BP);
#endif
#ifdef KVM_CPUID_FLAG_SIGNIFCANT_INDEX
	C(KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
#endif
#ifdef KVM_CPUID_FLAG_STATEFUL_FUNC
	C(KVM_CPUID_FLAG_STATEFUL_FUNC);
#endif
#ifdef KVM_CPUID_FLAG_STATE_READ_NEXT
	C(KVM_CPUID_FLAG_STATE_READ_NEXT);
#endif
#ifdef KVM_IRQFD_FLAG_DEASSIGN
	C(KVM_IRQFD_FLAG_DEASSIGN);
#endif
#ifdef KVM_IRQFD_FLAG_RESAMPLE
	C(KVM_IRQFD_FLAG_RESAMPLE);
#endif
#ifdef KVM_IOEVENTFD_FLAG_DATAMATCH
	C(KVM_IOEVENTFD_FLAG_DATAMATCH);
#endif
#ifdef KVM_IOEVENTFD_FLAG_PIO
	C(KVM_IOEVENTFD_FLAG_PIO);
#endif
#ifdef KVM_IOEVENTFD_FLAG_DEASSIGN
	C(KVM_IOEVENTFD_FLAG_DEASSIGN);
#endif
#ifdef KVM_MP_STATE_RUNNABLE
	C(KVM_MP_STATE_RUNNABLE);
#endif
#ifdef KVM_MP_STATE_UNINITIALIZED
	C(KVM_MP_STATE_UNINITIALIZED);
#endif
#ifdef KVM_MP_STATE_INIT_RECEIVED
	C(KVM_MP_STATE_INIT_RECEIVED);
#endif
#ifdef KVM_MP_STATE_HALTED
	C(KVM_MP_STATE_HALTED);
#endif
#ifdef KVM_MP_STATE_SIPI_RECEIVED
	C(KVM_MP_STATE_SIPI_RECEIVED);
#endif
#ifdef MSR_IA32_SMBASE
	C(MSR_IA32_SMBASE);
#endif
#ifdef API_VERSION
	C(API_VERSION);
#endif
#ifdef VCPU_MMAP_SIZE
	C(VCPU_MMAP_SIZE);
#endif
#ifdef KVM_USER_MEM_SLOTS
	C(KVM_USER_MEM_SLOTS);
#endif
#ifdef KVM_ADDRESS_SPACE_NUM
	C(KVM_ADDRESS_SPACE_NUM);
#endif
#ifdef KVM_MAX_VCPUS
	C(KVM_MAX_VCPUS);
#endif
#ifdef KVM_MAX_VCPU_ID
	C(KVM_MAX_VCPU_ID);
#endif
#ifdef KVM_MAX_CPUID_ENTRIES
	C(KVM_MAX_CPUID_ENTRIES);
#endif
#ifdef KVM_MEM_LOG_DIRTY_PAGES
	C(KVM_MEM_LOG_DIRTY_PAGES);
#endif
#ifdef KVM_MEM_READONLY
	C(KVM_MEM_READONLY);
#endif
#ifdef KVM_MEM_GUEST_MEMFD
	C(KVM_MEM_GUEST_MEMFD);
#endif
#ifdef KVM_MEM_FLAGS_V1
	C(KVM_MEM_FLAGS_V1);
#endif
#ifdef KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
	C(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
#endif
#ifdef KVM_DIRTY_LOG_INITIALLY_SET
	C(KVM_DIRTY_LOG_INITIALLY_SET);
#endif
#ifdef KVM_X86_DEFAULT_VM
	C(KVM_X86_DEFAULT_VM);
#endif
#ifdef KVM_X86_SW_PROTECTED_VM
	C(KVM_X86_SW_PROTECTED_VM);
#endif
#ifdef GUEST_MEMFD_FLAG_MMAP
	C(GUEST_MEMFD_FLAG_MMAP);
#endif
#ifdef GUEST_MEMFD_FLAG_INIT_SHARED
	C(GUEST_MEMFD_FLAG_INIT_SHARED);
#endif
#ifdef KVM_MEMORY_ATTRIBUTE_PRIVATE
	C(KVM_MEMORY_ATTRIBUTE_PRIVATE);
#endif
#ifdef PAGE_SIZE
	C(PAGE_SIZE);
#endif
#ifdef PAGE_SHIFT
	C(PAGE_SHIFT);
#endif
#ifdef TASK_SIZE_MAX
	C(TASK_SIZE_MAX);
#endif
#ifdef GUEST_PHYS_BITS
	C(GUEST_PHYS_BITS);
#endif
#ifdef KVM_EXIT_UNKNOWN
	C(KVM_EXIT_UNKNOWN);
#endif
#ifdef KVM_EXIT_EXCEPTION
	C(KVM_EXIT_EXCEPTION);
#endif
#ifdef KVM_EXIT_IO
	C(KVM_EXIT_IO);
#endif
#ifdef KVM_EXIT_HYPERCALL
	C(KVM_EXIT_HYPERCALL);
#endif
#ifdef KVM_EXIT_DEBUG
	C(KVM_EXIT_DEBUG);
#endif
#ifdef KVM_EXIT_HLT
	C(KVM_EXIT_HLT);
#endif
#ifdef KVM_EXIT_MMIO
	C(KVM_EXIT_MMIO);
#endif
#ifdef KVM_EXIT_IRQ_WINDOW_OPEN
	C(KVM_EXIT_IRQ_WINDOW_OPEN);
#endif
#ifdef KVM_EXIT_SHUTDOWN
	C(KVM_EXIT_SHUTDOWN);
#endif
#ifdef KVM_EXIT_FAIL_ENTRY
	C(KVM_EXIT_FAIL_ENTRY);
#endif
#ifdef KVM_EXIT_INTR
	C(KVM_EXIT_INTR);
#endif
#ifdef KVM_EXIT_SET_TPR
	C(KVM_EXIT_SET_TPR);
#endif
#ifdef KVM_EXIT_TPR_ACCESS
	C(KVM_EXIT_TPR_ACCESS);
#endif
#ifdef KVM_EXIT_NMI
	C(KVM_EXIT_NMI);
#endif
#ifdef KVM_EXIT_INTERNAL_ERROR
	C(KVM_EXIT_INTERNAL_ERROR);
#endif
#ifdef KVM_EXIT_SYSTEM_EVENT
	C(KVM_EXIT_SYSTEM_EVENT);
#endif
#ifdef KVM_EXIT_IOAPIC_EOI
	C(KVM_EXIT_IOAPIC_EOI);
#endif
#ifdef KVM_EXIT_X86_RDMSR
	C(KVM_EXIT_X86_RDMSR);
#endif
#ifdef KVM_EXIT_X86_WRMSR
	C(KVM_EXIT_X86_WRMSR);
#endif
#ifdef KVM_EXIT_DIRTY_RING_FULL
	C(KVM_EXIT_DIRTY_RING_FULL);
#endif
#ifdef KVM_EXIT_X86_BUS_LOCK
	C(KVM_EXIT_X86_BUS_LOCK);
#endif
#ifdef KVM_EXIT_NOTIFY
	C(KVM_EXIT_NOTIFY);
#endif
#ifdef KVM_EXIT_MEMORY_FAULT
	C(KVM_EXIT_MEMORY_FAULT);
#endif
#ifdef KVM_EXIT_TDX
	C(KVM_EXIT_TDX);
#endif
#ifdef KVM_EXIT_IO_IN
	C(KVM_EXIT_IO_IN);
#endif
#ifdef KVM_EXIT_IO_OUT
	C(KVM_EXIT_IO_OUT);
#endif
#ifdef KVM_PIO_PAGE_OFFSET
	C(KVM_PIO_PAGE_OFFSET);
#endif
#ifdef KVM_COALESCED_MMIO_PAGE_OFFSET
	C(KVM_COALESCED_MMIO_PAGE_OFFSET);
#endif
#ifdef KVM_INTERNAL_ERROR_EMULATION
	C(KVM_INTERNAL_ERROR_EMULATION);
#endif
#ifdef KVM_INTERNAL_ERROR_SIMUL_EX
	C(KVM_INTERNAL_ERROR_SIMUL_EX);
#endif
#ifdef KVM_INTERNAL_ERROR_DELIVERY_EV
	C(KVM_INTERNAL_ERROR_DELIVERY_EV);
#endif
#ifdef KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
	C(KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON);
#endif
#ifdef KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES
	C(KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES);
#endif
#ifdef KVM_SYSTEM_EVENT_SHUTDOWN
	C(KVM_SYSTEM_EVENT_SHUTDOWN);
#endif
#ifdef KVM_SYSTEM_EVENT_RESET
	C(KVM_SYSTEM_EVENT_RESET);
#endif
#ifdef KVM_SYSTEM_EVENT_CRASH
	C(KVM_SYSTEM_EVENT_CRASH);
#endif
#ifdef KVM_SYSTEM_EVENT_WAKEUP
	C(KVM_SYSTEM_EVENT_WAKEUP);
#endif
#ifdef KVM_SYSTEM_EVENT_SUSPEND
	C(KVM_SYSTEM_EVENT_SUSPEND);
#endif
#ifdef KVM_SYSTEM_EVENT_SEV_TERM
	C(KVM_SYSTEM_EVENT_SEV_TERM);
#endif
#ifdef KVM_SYSTEM_EVENT_TDX_FATAL
	C(KVM_SYSTEM_EVENT_TDX_FATAL);
#endif
#ifdef KVM_MEMORY_EXIT_FLAG_PRIVATE
	C(KVM_MEMORY_EXIT_FLAG_PRIVATE);
#endif

	/* capabilities */
#ifdef KVM_CAP_IRQCHIP
	C(KVM_CAP_IRQCHIP);
#endif
#ifdef KVM_CAP_HLT
	C(KVM_CAP_HLT);
#endif
#ifdef KVM_CAP_USER_MEMORY
	C(KVM_CAP_USER_MEMORY);
#endif
#ifdef KVM_CAP_SET_TSS_ADDR
	C(KVM_CAP_SET_TSS_ADDR);
#endif
#ifdef KVM_CAP_EXT_CPUID
	C(KVM_CAP_EXT_CPUID);
#endif
#ifdef KVM_CAP_NR_VCPUS
	C(KVM_CAP_NR_VCPUS);
#endif
#ifdef KVM_CAP_NR_MEMSLOTS
	C(KVM_CAP_NR_MEMSLOTS);
#endif
#ifdef KVM_CAP_MP_STATE
	C(KVM_CAP_MP_STATE);
#endif
#ifdef KVM_CAP_COALESCED_MMIO
	C(KVM_CAP_COALESCED_MMIO);
#endif
#ifdef KVM_CAP_SYNC_MMU
	C(KVM_CAP_SYNC_MMU);
#endif
#ifdef KVM_CAP_DESTROY_MEMORY_REGION_WORKS
	C(KVM_CAP_DESTROY_MEMORY_REGION_WORKS);
#endif
#ifdef KVM_CAP_USER_NMI
	C(KVM_CAP_USER_NMI);
#endif
#ifdef KVM_CAP_SET_GUEST_DEBUG
	C(KVM_CAP_SET_GUEST_DEBUG);
#endif
#ifdef KVM_CAP_IRQ_ROUTING
	C(KVM_CAP_IRQ_ROUTING);
#endif
#ifdef KVM_CAP_JOIN_MEMORY_REGIONS_WORKS
	C(KVM_CAP_JOIN_MEMORY_REGIONS_WORKS);
#endif
#ifdef KVM_CAP_IRQFD
	C(KVM_CAP_IRQFD);
#endif
#ifdef KVM_CAP_IOEVENTFD
	C(KVM_CAP_IOEVENTFD);
#endif
#ifdef KVM_CAP_SET_IDENTITY_MAP_ADDR
	C(KVM_CAP_SET_IDENTITY_MAP_ADDR);
#endif
#ifdef KVM_CAP_INTERNAL_ERROR_DATA
	C(KVM_CAP_INTERNAL_ERROR_DATA);
#endif
#ifdef KVM_CAP_VCPU_EVENTS
	C(KVM_CAP_VCPU_EVENTS);
#endif
#ifdef KVM_CAP_MAX_VCPUS
	C(KVM_CAP_MAX_VCPUS);
#endif
#ifdef KVM_CAP_SYNC_REGS
	C(KVM_CAP_SYNC_REGS);
#endif
#ifdef KVM_CAP_READONLY_MEM
	C(KVM_CAP_READONLY_MEM);
#endif
#ifdef KVM_CAP_ENABLE_CAP_VM
	C(KVM_CAP_ENABLE_CAP_VM);
#endif
#ifdef KVM_CAP_CHECK_EXTENSION_VM
	C(KVM_CAP_CHECK_EXTENSION_VM);
#endif
#ifdef KVM_CAP_X86_SMM
	C(KVM_CAP_X86_SMM);
#endif
#ifdef KVM_CAP_MULTI_ADDRESS_SPACE
	C(KVM_CAP_MULTI_ADDRESS_SPACE);
#endif
#ifdef KVM_CAP_SPLIT_IRQCHIP
	C(KVM_CAP_SPLIT_IRQCHIP);
#endif
#ifdef KVM_CAP_MAX_VCPU_ID
	C(KVM_CAP_MAX_VCPU_ID);
#endif
#ifdef KVM_CAP_IMMEDIATE_EXIT
	C(KVM_CAP_IMMEDIATE_EXIT);
#endif
#ifdef KVM_CAP_X86_DISABLE_EXITS
	C(KVM_CAP_X86_DISABLE_EXITS);
#endif
#ifdef KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
	C(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
#endif
#ifdef KVM_CAP_DIRTY_LOG_RING
	C(KVM_CAP_DIRTY_LOG_RING);
#endif
#ifdef KVM_CAP_BINARY_STATS_FD
	C(KVM_CAP_BINARY_STATS_FD);
#endif
#ifdef KVM_CAP_SYSTEM_EVENT_DATA
	C(KVM_CAP_SYSTEM_EVENT_DATA);
#endif
#ifdef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
	C(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
#endif
#ifdef KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP
	C(KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP);
#endif
#ifdef KVM_CAP_USER_MEMORY2
	C(KVM_CAP_USER_MEMORY2);
#endif
#ifdef KVM_CAP_MEMORY_FAULT_INFO
	C(KVM_CAP_MEMORY_FAULT_INFO);
#endif
#ifdef KVM_CAP_MEMORY_ATTRIBUTES
	C(KVM_CAP_MEMORY_ATTRIBUTES);
#endif
#ifdef KVM_CAP_GUEST_MEMFD
	C(KVM_CAP_GUEST_MEMFD);
#endif
#ifdef KVM_CAP_VM_TYPES
	C(KVM_CAP_VM_TYPES);
#endif
#ifdef KVM_CAP_PRE_FAULT_MEMORY
	C(KVM_CAP_PRE_FAULT_MEMORY);
#endif
#ifdef KVM_CAP_GUEST_MEMFD_FLAGS
	C(KVM_CAP_GUEST_MEMFD_FLAGS);
#endif

#ifdef WITH_NATIVE_ABI
	/* kvmfs-private names of ABI values */
#if defined(KVMFS_ADDRESS_SPACES) && !defined(KVM_ADDRESS_SPACE_NUM)   /* else printed above */
	A(KVM_ADDRESS_SPACE_NUM, KVMFS_ADDRESS_SPACES);
#endif
#if defined(KVMFS_USER_MEM_SLOTS) && !defined(KVM_USER_MEM_SLOTS)   /* else printed above */
	A(KVM_USER_MEM_SLOTS, KVMFS_USER_MEM_SLOTS);
#endif
#if defined(KVMFS_MANUAL_ENABLE) && !defined(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)   /* else printed above */
	A(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVMFS_MANUAL_ENABLE);
#endif
#if defined(KVMFS_MANUAL_INIT_SET) && !defined(KVM_DIRTY_LOG_INITIALLY_SET)   /* else printed above */
	A(KVM_DIRTY_LOG_INITIALLY_SET, KVMFS_MANUAL_INIT_SET);
#endif
#else
	/* struct sizes and member offsets */
	S(kvm_userspace_memory_region);
	O(kvm_userspace_memory_region, "slot", slot);
	O(kvm_userspace_memory_region, "flags", flags);
	O(kvm_userspace_memory_region, "guest_phys_addr", guest_phys_addr);
	O(kvm_userspace_memory_region, "memory_size", memory_size);
	O(kvm_userspace_memory_region, "userspace_addr", userspace_addr);
#ifdef KVM_SET_USER_MEMORY_REGION2
	S(kvm_userspace_memory_region2);
	O(kvm_userspace_memory_region2, "slot", slot);
	O(kvm_userspace_memory_region2, "flags", flags);
	O(kvm_userspace_memory_region2, "guest_phys_addr", guest_phys_addr);
	O(kvm_userspace_memory_region2, "memory_size", memory_size);
	O(kvm_userspace_memory_region2, "userspace_addr", userspace_addr);
	O(kvm_userspace_memory_region2, "guest_memfd_offset", guest_memfd_offset);
	O(kvm_userspace_memory_region2, "guest_memfd", guest_memfd);
	O(kvm_userspace_memory_region2, "pad1", pad1);
	O(kvm_userspace_memory_region2, "pad2", pad2);
#endif
	S(kvm_dirty_log);
	O(kvm_dirty_log, "slot", slot);
	O(kvm_dirty_log, "padding1", padding1);
	O(kvm_dirty_log, "dirty_bitmap", dirty_bitmap);
	S(kvm_clear_dirty_log);
	O(kvm_clear_dirty_log, "slot", slot);
	O(kvm_clear_dirty_log, "num_pages", num_pages);
	O(kvm_clear_dirty_log, "first_page", first_page);
	O(kvm_clear_dirty_log, "dirty_bitmap", dirty_bitmap);
	S(kvm_enable_cap);
	O(kvm_enable_cap, "cap", cap);
	O(kvm_enable_cap, "flags", flags);
	O(kvm_enable_cap, "args", args);
	O(kvm_enable_cap, "pad", pad);
#ifdef KVMFS_ACT_FOR
	/* kvmfs's own ioctls (clients/kvmfs.h) */
	C(KVMFS_IOCTL_TYPE);
	C(KVMFS_ACT_FOR);
	C(KVMFS_MMU_NOTIFY);
	C(KVMFS_NOTIFY_START);
	C(KVMFS_NOTIFY_END);
	C(KVMFS_MMU_EVENT_UNMAP);
	C(KVMFS_MMU_EVENT_CLEAR);
	C(KVMFS_MMU_EVENT_PROTECTION_VMA);
	C(KVMFS_CAUSE_MUNMAP);
	C(KVMFS_CAUSE_MREMAP);
	C(KVMFS_CAUSE_MMAP_FIXED);
	C(KVMFS_CAUSE_MPROTECT);
	C(KVMFS_CAUSE_MADV_DONTNEED);
	C(KVMFS_CAUSE_MADV_REMOVE);
	C(KVMFS_CAUSE_MADV_FREE);
	C(KVMFS_CAUSE_PUNCH_HOLE);
	S(kvmfs_act_for);
	O(kvmfs_act_for, "tid", tid);
	O(kvmfs_act_for, "flags", flags);
	S(kvmfs_mmu_notify);
	O(kvmfs_mmu_notify, "start", start);
	O(kvmfs_mmu_notify, "end", end);
	O(kvmfs_mmu_notify, "phase", phase);
	O(kvmfs_mmu_notify, "event", event);
	O(kvmfs_mmu_notify, "cause", cause);
#endif
#ifdef KVM_CREATE_GUEST_MEMFD
	S(kvm_create_guest_memfd);
	O(kvm_create_guest_memfd, "size", size);
	O(kvm_create_guest_memfd, "flags", flags);
	O(kvm_create_guest_memfd, "reserved", reserved);
#endif
#ifdef KVM_SET_MEMORY_ATTRIBUTES
	S(kvm_memory_attributes);
	O(kvm_memory_attributes, "address", address);
	O(kvm_memory_attributes, "size", size);
	O(kvm_memory_attributes, "attributes", attributes);
	O(kvm_memory_attributes, "flags", flags);
#endif
	S(kvm_regs);
	O(kvm_regs, "rax", rax);
	O(kvm_regs, "rbx", rbx);
	O(kvm_regs, "rcx", rcx);
	O(kvm_regs, "rdx", rdx);
	O(kvm_regs, "rsi", rsi);
	O(kvm_regs, "rdi", rdi);
	O(kvm_regs, "rsp", rsp);
	O(kvm_regs, "rbp", rbp);
	O(kvm_regs, "r8", r8);
	O(kvm_regs, "r9", r9);
	O(kvm_regs, "r10", r10);
	O(kvm_regs, "r11", r11);
	O(kvm_regs, "r12", r12);
	O(kvm_regs, "r13", r13);
	O(kvm_regs, "r14", r14);
	O(kvm_regs, "r15", r15);
	O(kvm_regs, "rip", rip);
	O(kvm_regs, "rflags", rflags);
	S(kvm_segment);
	O(kvm_segment, "base", base);
	O(kvm_segment, "limit", limit);
	O(kvm_segment, "selector", selector);
	O(kvm_segment, "type", type);
	O(kvm_segment, "present", present);
	O(kvm_segment, "dpl", dpl);
	O(kvm_segment, "db", db);
	O(kvm_segment, "s", s);
	O(kvm_segment, "l", l);
	O(kvm_segment, "g", g);
	O(kvm_segment, "avl", avl);
	O(kvm_segment, "unusable", unusable);
	O(kvm_segment, "padding", padding);
	S(kvm_dtable);
	O(kvm_dtable, "base", base);
	O(kvm_dtable, "limit", limit);
	O(kvm_dtable, "padding", padding);
	S(kvm_sregs);
	O(kvm_sregs, "cs", cs);
	O(kvm_sregs, "ds", ds);
	O(kvm_sregs, "es", es);
	O(kvm_sregs, "fs", fs);
	O(kvm_sregs, "gs", gs);
	O(kvm_sregs, "ss", ss);
	O(kvm_sregs, "tr", tr);
	O(kvm_sregs, "ldt", ldt);
	O(kvm_sregs, "gdt", gdt);
	O(kvm_sregs, "idt", idt);
	O(kvm_sregs, "cr0", cr0);
	O(kvm_sregs, "cr2", cr2);
	O(kvm_sregs, "cr3", cr3);
	O(kvm_sregs, "cr4", cr4);
	O(kvm_sregs, "cr8", cr8);
	O(kvm_sregs, "efer", efer);
	O(kvm_sregs, "apic_base", apic_base);
	O(kvm_sregs, "interrupt_bitmap", interrupt_bitmap);
	S(kvm_fpu);
	O(kvm_fpu, "fpr", fpr);
	O(kvm_fpu, "fcw", fcw);
	O(kvm_fpu, "fsw", fsw);
	O(kvm_fpu, "ftwx", ftwx);
	O(kvm_fpu, "pad1", pad1);
	O(kvm_fpu, "last_opcode", last_opcode);
	O(kvm_fpu, "last_ip", last_ip);
	O(kvm_fpu, "last_dp", last_dp);
	O(kvm_fpu, "xmm", xmm);
	O(kvm_fpu, "mxcsr", mxcsr);
	O(kvm_fpu, "pad2", pad2);
	S(kvm_interrupt);
	O(kvm_interrupt, "irq", irq);
	S(kvm_msr_entry);
	O(kvm_msr_entry, "index", index);
	O(kvm_msr_entry, "reserved", reserved);
	O(kvm_msr_entry, "data", data);
	S(kvm_msrs);
	O(kvm_msrs, "nmsrs", nmsrs);
	O(kvm_msrs, "pad", pad);
	S(kvm_msr_list);
	O(kvm_msr_list, "nmsrs", nmsrs);
	S(kvm_cpuid_entry2);
	O(kvm_cpuid_entry2, "function", function);
	O(kvm_cpuid_entry2, "index", index);
	O(kvm_cpuid_entry2, "flags", flags);
	O(kvm_cpuid_entry2, "eax", eax);
	O(kvm_cpuid_entry2, "ebx", ebx);
	O(kvm_cpuid_entry2, "ecx", ecx);
	O(kvm_cpuid_entry2, "edx", edx);
	O(kvm_cpuid_entry2, "padding", padding);
	S(kvm_cpuid2);
	O(kvm_cpuid2, "nent", nent);
	O(kvm_cpuid2, "padding", padding);
	S(kvm_guest_debug);
	O(kvm_guest_debug, "control", control);
	O(kvm_guest_debug, "pad", pad);
	O(kvm_guest_debug, "debugreg", arch.debugreg);
	S(kvm_vcpu_events);
	O(kvm_vcpu_events, "exception", exception);
	O(kvm_vcpu_events, "exception.injected", exception.injected);
	O(kvm_vcpu_events, "exception.nr", exception.nr);
	O(kvm_vcpu_events, "exception.has_error_code", exception.has_error_code);
	O(kvm_vcpu_events, "exception.pending", exception.pending);
	O(kvm_vcpu_events, "exception.error_code", exception.error_code);
	O(kvm_vcpu_events, "interrupt", interrupt);
	O(kvm_vcpu_events, "interrupt.injected", interrupt.injected);
	O(kvm_vcpu_events, "interrupt.nr", interrupt.nr);
	O(kvm_vcpu_events, "interrupt.soft", interrupt.soft);
	O(kvm_vcpu_events, "interrupt.shadow", interrupt.shadow);
	O(kvm_vcpu_events, "nmi", nmi);
	O(kvm_vcpu_events, "nmi.injected", nmi.injected);
	O(kvm_vcpu_events, "nmi.pending", nmi.pending);
	O(kvm_vcpu_events, "nmi.masked", nmi.masked);
	O(kvm_vcpu_events, "nmi.pad", nmi.pad);
	O(kvm_vcpu_events, "sipi_vector", sipi_vector);
	O(kvm_vcpu_events, "flags", flags);
	O(kvm_vcpu_events, "smi", smi);
	O(kvm_vcpu_events, "smi.smm", smi.smm);
	O(kvm_vcpu_events, "smi.pending", smi.pending);
	O(kvm_vcpu_events, "smi.smm_inside_nmi", smi.smm_inside_nmi);
	O(kvm_vcpu_events, "smi.latched_init", smi.latched_init);
	O(kvm_vcpu_events, "triple_fault", triple_fault);
	O(kvm_vcpu_events, "triple_fault.pending", triple_fault.pending);
	O(kvm_vcpu_events, "reserved", reserved);
	O(kvm_vcpu_events, "exception_has_payload", exception_has_payload);
	O(kvm_vcpu_events, "exception_payload", exception_payload);
	S(kvm_irqfd);
	O(kvm_irqfd, "fd", fd);
	O(kvm_irqfd, "gsi", gsi);
	O(kvm_irqfd, "flags", flags);
	O(kvm_irqfd, "resamplefd", resamplefd);
	O(kvm_irqfd, "pad", pad);
	S(kvm_ioeventfd);
	O(kvm_ioeventfd, "datamatch", datamatch);
	O(kvm_ioeventfd, "addr", addr);
	O(kvm_ioeventfd, "len", len);
	O(kvm_ioeventfd, "fd", fd);
	O(kvm_ioeventfd, "flags", flags);
	O(kvm_ioeventfd, "pad", pad);
	S(kvm_irq_routing);
	O(kvm_irq_routing, "nr", nr);
	O(kvm_irq_routing, "flags", flags);
	S(kvm_mp_state);
	O(kvm_mp_state, "mp_state", mp_state);
	S(kvm_run);
	O(kvm_run, "request_interrupt_window", request_interrupt_window);
	O(kvm_run, "immediate_exit", immediate_exit);
	O(kvm_run, "padding1", padding1);
	O(kvm_run, "exit_reason", exit_reason);
	O(kvm_run, "ready_for_interrupt_injection", ready_for_interrupt_injection);
	O(kvm_run, "if_flag", if_flag);
	O(kvm_run, "flags", flags);
	O(kvm_run, "cr8", cr8);
	O(kvm_run, "apic_base", apic_base);
	O(kvm_run, "hw", hw);
	O(kvm_run, "hw.hardware_exit_reason", hw.hardware_exit_reason);
	O(kvm_run, "fail_entry", fail_entry);
	O(kvm_run, "fail_entry.hardware_entry_failure_reason", fail_entry.hardware_entry_failure_reason);
	O(kvm_run, "fail_entry.cpu", fail_entry.cpu);
	O(kvm_run, "ex", ex);
	O(kvm_run, "ex.exception", ex.exception);
	O(kvm_run, "ex.error_code", ex.error_code);
	O(kvm_run, "io", io);
	O(kvm_run, "io.direction", io.direction);
	O(kvm_run, "io.size", io.size);
	O(kvm_run, "io.port", io.port);
	O(kvm_run, "io.count", io.count);
	O(kvm_run, "io.data_offset", io.data_offset);
	O(kvm_run, "debug", debug);
	O(kvm_run, "debug.exception", debug.arch.exception);
	O(kvm_run, "debug.pad", debug.arch.pad);
	O(kvm_run, "debug.pc", debug.arch.pc);
	O(kvm_run, "debug.dr6", debug.arch.dr6);
	O(kvm_run, "debug.dr7", debug.arch.dr7);
	O(kvm_run, "mmio", mmio);
	O(kvm_run, "mmio.phys_addr", mmio.phys_addr);
	O(kvm_run, "mmio.data", mmio.data);
	O(kvm_run, "mmio.len", mmio.len);
	O(kvm_run, "mmio.is_write", mmio.is_write);
	O(kvm_run, "internal", internal);
	O(kvm_run, "internal.suberror", internal.suberror);
	O(kvm_run, "internal.ndata", internal.ndata);
	O(kvm_run, "internal.data", internal.data);
	O(kvm_run, "emulation_failure", emulation_failure);
	O(kvm_run, "emulation_failure.suberror", emulation_failure.suberror);
	O(kvm_run, "emulation_failure.ndata", emulation_failure.ndata);
	O(kvm_run, "emulation_failure.flags", emulation_failure.flags);
	O(kvm_run, "emulation_failure.insn_size", emulation_failure.insn_size);
	O(kvm_run, "emulation_failure.insn_bytes", emulation_failure.insn_bytes);
	O(kvm_run, "system_event", system_event);
	O(kvm_run, "system_event.type", system_event.type);
	O(kvm_run, "system_event.ndata", system_event.ndata);
	O(kvm_run, "system_event.data", system_event.data);
#ifdef SYSTEM_HEADER_HAS_6_8
	O(kvm_run, "memory_fault", memory_fault);
#endif
#ifdef SYSTEM_HEADER_HAS_6_8
	O(kvm_run, "memory_fault.flags", memory_fault.flags);
#endif
#ifdef SYSTEM_HEADER_HAS_6_8
	O(kvm_run, "memory_fault.gpa", memory_fault.gpa);
#endif
#ifdef SYSTEM_HEADER_HAS_6_8
	O(kvm_run, "memory_fault.size", memory_fault.size);
#endif
	O(kvm_run, "padding", padding);
	O(kvm_run, "kvm_valid_regs", kvm_valid_regs);
	O(kvm_run, "kvm_dirty_regs", kvm_dirty_regs);
	O(kvm_run, "s", s);
#endif
	return 0;
}
