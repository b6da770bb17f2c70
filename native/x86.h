/*
 * x86.h - architectural x86 names the native sources use: control-register,
 * EFER and RFLAGS bits, page-fault error-code bits, descriptor attribute bits.
 * Facts of the Intel SDM / AMD APM, declared once; KVM's own ABI numbers are
 * in kvm_abi.h.
 */
#ifndef KVMFS_X86_H
#define KVMFS_X86_H

#define X86_MAX_INSN_LEN 15           /* bytes */

/* exception vectors */
#define X86_VEC_DE 0
#define X86_VEC_DB 1
#define X86_VEC_NMI 2
#define X86_VEC_BP 3
#define X86_VEC_OF 4
#define X86_VEC_UD 6
#define X86_VEC_DF 8
#define X86_VEC_TS 10
#define X86_VEC_NP 11
#define X86_VEC_SS 12
#define X86_VEC_GP 13
#define X86_VEC_PF 14
#define X86_VEC_AC 17
#define X86_VEC_CP 21
#define X86_VEC_LAST_EXCEPTION 31      /* 32 and up are interrupts */
#define X86_NR_VECTORS 256

/* opcodes the emulation looks at */
#define X86_OP_INT3 0xcc
#define X86_OP_INT 0xcd                /* INT imm8 */
#define X86_OP_INTO 0xce
#define X86_OP_HLT 0xf4
#define X86_OP_2BYTE 0x0f
#define X86_OP2_RSM 0xaa               /* 0F AA */

/* instruction prefixes and the IO opcodes (decode_io) */
#define X86_PFX_REPNE 0xf2
#define X86_PFX_REP 0xf3
#define X86_PFX_OPSIZE 0x66
#define X86_PFX_ADDRSIZE 0x67
#define X86_PFX_ES 0x26
#define X86_PFX_CS 0x2e
#define X86_PFX_SS 0x36
#define X86_PFX_DS 0x3e
#define X86_PFX_FS 0x64
#define X86_PFX_GS 0x65
#define X86_REX_FIRST 0x40             /* 64-bit mode: 0x40-0x4f */
#define X86_REX_LAST 0x4f
#define X86_OP_INSB 0x6c               /* INSB INSW/D OUTSB OUTSW/D: 0x6c-0x6f */
#define X86_OP_OUTSD 0x6f
#define X86_OP_IN_IMM8 0xe4            /* IN/OUT with an imm8 port: 0xe4-0xe7 */
#define X86_OP_OUT_IMM8_LAST 0xe7

#define X86_CR8_MAX 15                 /* CR8 holds TPR[7:4] */
#define X86_MAXPHYADDR_LIMIT 52        /* the architecture's widest physical address */
#define X86_MAXPHYADDR_DEFAULT 36      /* without CPUID leaf 0x80000008 (KVM's default) */

/* CR0 */
#define X86_CR0_PE (1ull << 0)
#define X86_CR0_EM (1ull << 2)
#define X86_CR0_TS (1ull << 3)
#define X86_CR0_ET (1ull << 4)
#define X86_CR0_WP (1ull << 16)
#define X86_CR0_NW (1ull << 29)
#define X86_CR0_CD (1ull << 30)
#define X86_CR0_PG (1ull << 31)

/* CR4 */
#define X86_CR4_PSE (1ull << 4)
#define X86_CR4_PAE (1ull << 5)
#define X86_CR4_OSFXSR (1ull << 9)
#define X86_CR4_LA57 (1ull << 12)
#define X86_CR4_OSXSAVE (1ull << 18)
#define X86_CR4_SMEP (1ull << 20)

/* EFER */
#define X86_EFER_LME (1ull << 8)
#define X86_EFER_LMA (1ull << 10)
#define X86_EFER_NXE (1ull << 11)

/* CPUID leaves and the bits the emulation looks at */
#define X86_CPUID_BASIC 0
#define X86_CPUID_FEATURES 1
#define X86_CPUID_STRUCT_EXT 7
#define X86_CPUID_EXT_BASE 0x80000000u
#define X86_CPUID_EXT_FEATURES 0x80000001u
#define X86_CPUID_ADDR_SIZES 0x80000008u  /* EAX[7:0]: MAXPHYADDR */
#define X86_CPUID_1_ECX_OSXSAVE (1u << 27)
#define X86_CPUID_1_EDX_APIC (1u << 9)
#define X86_CPUID_EXT_EDX_LM (1u << 29)

/* MSRs */
#define MSR_IA32_TSC 0x10
#define MSR_IA32_APICBASE 0x1b
#define MSR_IA32_SMBASE 0x9e
#define MSR_IA32_SYSENTER_CS 0x174
#define MSR_IA32_SYSENTER_ESP 0x175
#define MSR_IA32_SYSENTER_EIP 0x176
#define MSR_IA32_CR_PAT 0x277
#define MSR_EFER 0xc0000080
#define MSR_STAR 0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_CSTAR 0xc0000083
#define MSR_SYSCALL_MASK 0xc0000084
#define MSR_FS_BASE 0xc0000100
#define MSR_GS_BASE 0xc0000101
#define MSR_KERNEL_GS_BASE 0xc0000102

/* IA32_APIC_BASE */
#define X86_APIC_BASE_BSP (1ull << 8)
#define X86_APIC_BASE_ENABLE (1ull << 11)
#define X86_APIC_DEFAULT_PHYS_BASE 0xfee00000ull

/* state after RESET/INIT (SDM vol. 3 "Processor state after reset") */
#define X86_RESET_RIP 0xfff0
#define X86_RESET_CS_SELECTOR 0xf000
#define X86_RESET_CS_BASE 0xffff0000ull
#define X86_RESET_CR0 (X86_CR0_CD | X86_CR0_NW | X86_CR0_ET)
#define X86_RESET_LIMIT 0xffff
#define X86_SMBASE_DEFAULT 0x30000

/* debug registers */
#define X86_DR7_RESET 0x400ull

/* RFLAGS */
#define X86_RFLAGS_FIXED (1ull << 1)  /* reads as 1 */
#define X86_RFLAGS_TF (1ull << 8)
#define X86_RFLAGS_IF (1ull << 9)
#define X86_RFLAGS_DF (1ull << 10)
#define X86_RFLAGS_NT (1ull << 14)
#define X86_RFLAGS_RF (1ull << 16)
#define X86_RFLAGS_VM (1ull << 17)
#define X86_RFLAGS_AC (1ull << 18)
#define X86_RFLAGS_ARITH 0x8d5ull     /* O S Z A P C */

/* page-fault error code */
#define X86_PF_PRESENT 1u
#define X86_PF_WRITE 2u
#define X86_PF_USER 4u
#define X86_PF_RSVD 8u
#define X86_PF_FETCH 16u

/* gates (descriptor type, low 3 bits) and IVT/IDT entries */
#define X86_GATE_INTR 6
#define X86_GATE_TRAP 7
#define X86_GATE_32 8                  /* type bit: 32-bit gate (else 16-bit) */
#define X86_IVT_ENTRY 4                /* real mode: offset16, segment16 */
#define X86_IDT_ENTRY_32 8
#define X86_IDT_ENTRY_64 16

/* TSS fields */
#define X86_TSS32_ESP0 4               /* ESPn at 4 + 8n, SSn at 8 + 8n */
#define X86_TSS32_SS0 8
#define X86_TSS64_RSP0 4               /* RSPn at 4 + 8n */
#define X86_TSS64_IST1 0x24            /* ISTn at 0x24 + 8(n-1) */

/* segment selector */
#define X86_SEL_RPL 3u
#define X86_SEL_TI 4u                  /* LDT */

/* segment descriptor attributes, as in the descriptor's high dword */
#define X86_DESC_TYPE_SHIFT 8
#define X86_DESC_S (1u << 12)
#define X86_DESC_DPL_SHIFT 13
#define X86_DESC_P (1u << 15)
#define X86_DESC_AVL (1u << 20)
#define X86_DESC_L (1u << 21)
#define X86_DESC_B (1u << 22)
#define X86_DESC_G (1u << 23)
#define X86_DESC_ATTR_MASK 0x00f0ff00u   /* type S DPL P AVL L D/B G */
#define X86_DESC_CODE_CONFORMING (1u << 10)   /* type bit 2 of a code segment */
#define X86_DESC_TYPE_RW_DATA 3        /* read/write data, accessed */
#define X86_DESC_TYPE_RX_CODE 11       /* execute/read code, accessed */
#define X86_DESC_TYPE_LDT 2
#define X86_DESC_TYPE_TSS_BUSY 11

#endif
