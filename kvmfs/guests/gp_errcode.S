# gp_errcode — a #GP with an error code, delivered through the guest's own IDT: DS loaded with
# selector 0x1238 (past the GDT's limit) faults with error code 0x1238; the handler sends the
# error code and the faulting RIP to port 0x13, then halts.  The same for #NP: a not-present
# data descriptor (selector 0x20) gives error code 0x20.
# load: 0x1000
# setup: long64
	.code64
	mov %cs, %ax
	lea idt(%rip), %rdi
	lea gp(%rip), %rsi
	mov $13, %ecx
	call setgate
	lea np(%rip), %rsi
	mov $11, %ecx
	call setgate
	mov %rdi, idtr+2(%rip)
	lidt idtr(%rip)
	sgdt gdtr(%rip)
	mov gdtr+2(%rip), %rbx
	mov $0x00cf13000000ffff, %rcx	/* selector 0x20: data, not present */
	mov %rcx, 0x20(%rbx)
fault1:	mov $0x1238, %dx
	mov %dx, %ds
	mov $0x20, %dx
fault2:	mov %dx, %ds
	hlt

/* IDT[ecx] = 64-bit interrupt gate to rsi, selector ax */
setgate:
	shl $4, %ecx
	add %rcx, %rdi
	mov %si, (%rdi)
	mov %ax, 2(%rdi)
	movw $0x8e00, 4(%rdi)
	shr $16, %rsi
	mov %si, 6(%rdi)
	shr $16, %rsi
	mov %esi, 8(%rdi)
	movl $0, 12(%rdi)
	sub %rcx, %rdi
	ret

gp:	pop %rax			/* error code */
	mov $0x13, %dx
	out %eax, %dx
	addq $2, (%rsp)			/* skip the 2-byte mov %dx,%ds: iretq to the next one */
	iretq
np:	pop %rax
	mov $0x13, %dx
	out %eax, %dx
	addq $2, (%rsp)
	iretq

	.p2align 4
idtr:	.word 16 * 14 - 1
	.quad 0
gdtr:	.word 0
	.quad 0
	.p2align 4
idt:	.fill 16 * 14, 1, 0
