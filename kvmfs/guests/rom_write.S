# rom_write — a store to a READONLY slot (gpa 0x100000) is an MMIO write and is not stored;
# a load from it reads the slot's memory.
# load: 0x1000
# setup: long64; slot 1 = 64 KiB READONLY at gpa 0x100000, filled by the VMM.
	.code64
	movl $0xdeadbeef, 0x100000
	mov 0x100000, %eax
	hlt
