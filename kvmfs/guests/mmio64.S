# mmio64 — 64-bit MMIO writes and reads of 1/2/4/8 bytes at gpa 0xD0000 (no memslot),
# also through the page mapping 0x801000 -> 0xD0000, and a RAM store through 0x800000 -> 0x5000.
# load: 0x1000
# setup: long64 (test-built page tables: identity 1 GiB in 2 MiB pages, 4 KiB pages
# 0x800000 -> 0x5000 and 0x801000 -> 0xD0000; CS 0x18 64-bit, CPL 0).
	.code64
	movb $0x11, 0xD0000
	movw $0x3322, 0xD0002
	movl $0x77665544, 0xD0004
	movabs $0x0f0e0d0c0b0a0908, %rax
	mov %rax, 0xD0008
	mov 0xD0010, %al
	mov 0xD0012, %bx
	mov 0xD0014, %ecx
	mov 0xD0018, %rdx
	movl $0xabcdef01, 0x801020
	mov 0x801024, %esi
	movl $0xfeedface, 0x800000
	hlt
