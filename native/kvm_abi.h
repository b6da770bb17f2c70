/*
 * kvm_abi.h - the uapi structs kvmfs emulates (x86-64), declared once for C.
 *
 * Fed to cffi's cdef (so it must stay plain C declarations: no macros with
 * expressions, no includes) and included by the native sources.  Layouts are
 * those of linux/kvm.h; kvmfs/abi.py declares the same structs for Python and
 * tests/t0_abi.py checks the two against each other.
 *
 * The constants below are the values of linux/kvm.h (and arch/x86's uapi
 * headers) the native code needs, under KVM's names; each number is written
 * here and nowhere else in native/.
 */

/* kvm_run.exit_reason */
#define KVM_EXIT_UNKNOWN 0
#define KVM_EXIT_IO 2
#define KVM_EXIT_DEBUG 4
#define KVM_EXIT_HLT 5
#define KVM_EXIT_MMIO 6
#define KVM_EXIT_IRQ_WINDOW_OPEN 7
#define KVM_EXIT_SHUTDOWN 8
#define KVM_EXIT_FAIL_ENTRY 9
#define KVM_EXIT_INTR 10
#define KVM_EXIT_INTERNAL_ERROR 17

/* kvm_run.io.direction */
#define KVM_EXIT_IO_IN 0
#define KVM_EXIT_IO_OUT 1

/* kvm_run.internal.suberror */
#define KVM_INTERNAL_ERROR_EMULATION 1

/* kvm_run.flags */
#define KVM_RUN_X86_SMM 1

/* the IO data area: page KVM_PIO_PAGE_OFFSET of the vCPU mapping */
#define KVM_PIO_PAGE_OFFSET 1

/* kvm_run.kvm_valid_regs / kvm_dirty_regs (KVM_CAP_SYNC_REGS) */
#define KVM_SYNC_X86_REGS 1
#define KVM_SYNC_X86_SREGS 2
#define KVM_SYNC_X86_EVENTS 4

/* kvm_userspace_memory_region.flags */
#define KVM_MEM_LOG_DIRTY_PAGES 1
#define KVM_MEM_READONLY 2
#define KVM_MEM_GUEST_MEMFD 4

/* KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 options */
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE 1
#define KVM_DIRTY_LOG_INITIALLY_SET 2

/* memslots: KVM_USER_MEM_SLOTS on x86 and the address spaces (normal, SMM) */
#define KVM_USER_MEM_SLOTS 32764
#define KVM_ADDRESS_SPACE_NUM 2

/* kvm_guest_debug.control */
#define KVM_GUESTDBG_ENABLE 1
#define KVM_GUESTDBG_SINGLESTEP 2

/* kvm_vcpu_events.flags */
#define KVM_VCPUEVENT_VALID_NMI_PENDING 1
#define KVM_VCPUEVENT_VALID_SIPI_VECTOR 2
#define KVM_VCPUEVENT_VALID_SHADOW 4
#define KVM_VCPUEVENT_VALID_SMM 8
#define KVM_VCPUEVENT_VALID_PAYLOAD 16
#define KVM_VCPUEVENT_VALID_TRIPLE_FAULT 32

/* kvm_vcpu_events.interrupt.shadow */
#define KVM_X86_SHADOW_INT_MOV_SS 1
#define KVM_X86_SHADOW_INT_STI 2

/* kvm_cpuid_entry2.flags (the kernel's spelling) */
#define KVM_CPUID_FLAG_SIGNIFCANT_INDEX 1

/* array limits of KVM_SET_CPUID2 and KVM_GET/SET_MSRS (the kernel's
 * MAX_IO_MSRS: nmsrs must be below it) */
#define KVM_MAX_CPUID_ENTRIES 256
#define KVM_MAX_MSR_ENTRIES 256

struct kvm_regs {
	uint64_t rax, rbx, rcx, rdx;
	uint64_t rsi, rdi, rsp, rbp;
	uint64_t r8, r9, r10, r11;
	uint64_t r12, r13, r14, r15;
	uint64_t rip, rflags;
};

struct kvm_segment {
	uint64_t base;
	uint32_t limit;
	uint16_t selector;
	uint8_t type;
	uint8_t present, dpl, db, s, l, g, avl;
	uint8_t unusable;
	uint8_t padding;
};

struct kvm_dtable {
	uint64_t base;
	uint16_t limit;
	uint16_t padding[3];
};

struct kvm_sregs {
	struct kvm_segment cs, ds, es, fs, gs, ss;
	struct kvm_segment tr, ldt;
	struct kvm_dtable gdt, idt;
	uint64_t cr0, cr2, cr3, cr4, cr8;
	uint64_t efer;
	uint64_t apic_base;
	uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
	uint8_t fpr[8][16];
	uint16_t fcw;
	uint16_t fsw;
	uint8_t ftwx;
	uint8_t pad1;
	uint16_t last_opcode;
	uint64_t last_ip;
	uint64_t last_dp;
	uint8_t xmm[16][16];
	uint32_t mxcsr;
	uint32_t pad2;
};

struct kvm_msr_entry {
	uint32_t index;
	uint32_t reserved;
	uint64_t data;
};

struct kvm_cpuid_entry2 {
	uint32_t function;
	uint32_t index;
	uint32_t flags;
	uint32_t eax, ebx, ecx, edx;
	uint32_t padding[3];
};

struct kvm_vcpu_events {
	struct {
		uint8_t injected;
		uint8_t nr;
		uint8_t has_error_code;
		uint8_t pending;
		uint32_t error_code;
	} exception;
	struct {
		uint8_t injected;
		uint8_t nr;
		uint8_t soft;
		uint8_t shadow;
	} interrupt;
	struct {
		uint8_t injected;
		uint8_t pending;
		uint8_t masked;
		uint8_t pad;
	} nmi;
	uint32_t sipi_vector;
	uint32_t flags;
	struct {
		uint8_t smm;
		uint8_t pending;
		uint8_t smm_inside_nmi;
		uint8_t latched_init;
	} smi;
	struct {
		uint8_t pending;
	} triple_fault;
	uint8_t reserved[26];
	uint8_t exception_has_payload;
	uint64_t exception_payload;
};

struct kvm_run_io {
	uint8_t direction;
	uint8_t size;
	uint16_t port;
	uint32_t count;
	uint64_t data_offset;
};

struct kvm_run_mmio {
	uint64_t phys_addr;
	uint8_t data[8];
	uint32_t len;
	uint8_t is_write;
};

struct kvm_run_internal {
	uint32_t suberror;
	uint32_t ndata;
	uint64_t data[16];
};

struct kvm_run_emulation_failure {
	uint32_t suberror;
	uint32_t ndata;
	uint64_t flags;
	uint8_t insn_size;
	uint8_t insn_bytes[15];
};

struct kvm_run_fail_entry {
	uint64_t hardware_entry_failure_reason;
	uint32_t cpu;
};

struct kvm_run_debug {
	uint32_t exception;
	uint32_t pad;
	uint64_t pc;
	uint64_t dr6;
	uint64_t dr7;
};

struct kvm_run_memory_fault {
	uint64_t flags;
	uint64_t gpa;
	uint64_t size;
};

struct kvm_run {
	uint8_t request_interrupt_window;
	uint8_t immediate_exit;
	uint8_t padding1[6];
	uint32_t exit_reason;
	uint8_t ready_for_interrupt_injection;
	uint8_t if_flag;
	uint16_t flags;
	uint64_t cr8;
	uint64_t apic_base;
	union {
		struct { uint64_t hardware_exit_reason; } hw;
		struct kvm_run_fail_entry fail_entry;
		struct kvm_run_io io;
		struct kvm_run_debug debug;
		struct kvm_run_mmio mmio;
		struct kvm_run_internal internal;
		struct kvm_run_emulation_failure emulation_failure;
		struct kvm_run_memory_fault memory_fault;
		char padding[256];
	};
	uint64_t kvm_valid_regs;
	uint64_t kvm_dirty_regs;
	char s[2048];
};
