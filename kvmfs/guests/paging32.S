# paging32 — 32-bit protected mode with paging: stores through 0x800000 (-> gpa 0x5000),
# MMIO through 0x801000 (-> gpa 0xD0000), identity RAM at 0x3000.
# load: 0x1000
# setup: pse32 (CR4.PSE, a 4 MiB page at 0, a page table for 0x800000..) or pae (CR4.PAE,
# a 2 MiB page at 0, a page table for 0x800000..); CS 0x08 flat 32-bit.
	.code32
	movl $0xcafef00d, 0x800000
	mov 0x800004, %eax
	movl $0x12345678, 0x801010
	mov 0x801014, %ebx
	movl $1, 0x3000
	hlt
