# mmio_real — MMIO writes and reads of 1/2/4 bytes at gpa 0xD0000 (no memslot) in real mode.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000); slot 0 covers gpa 0..0x7ffff only.
	.code16
	mov $0xD000, %ax
	mov %ax, %ds
	movb $0x11, 0x0
	movw $0x3322, 0x2
	movl $0x77665544, 0x4
	mov 0x10, %al
	mov 0x12, %bx
	mov 0x14, %ecx
	hlt
