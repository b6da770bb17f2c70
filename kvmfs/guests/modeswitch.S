/*
 * modeswitch.S - starts in real mode at 0x1000 (CS=0) and climbs:
 * real mode (OUT 0x16) -> 32-bit protected mode (OUT 0x32) -> 64-bit long
 * mode with identity-mapped 2 MiB pages (OUT 0x64) -> HLT.
 * Page tables at 0x10000..0x12fff, GDT inline.
 */
	.code16
start:
	cli
	mov $0x16, %dx
	out %al, %dx
	lgdtl gdtr
	mov %cr0, %eax
	or $1, %eax
	mov %eax, %cr0
	ljmpl $0x08, $pm32

	.code32
pm32:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $0x80000, %esp
	mov $0x32, %dx
	out %al, %dx
	/* page tables: PML4[0] -> PDPT, PDPT[0] -> PD, PD = 512 x 2 MiB */
	movl $0x11003, 0x10000
	movl $0, 0x10004
	movl $0x12003, 0x11000
	movl $0, 0x11004
	mov $0x12000, %edi
	mov $0x83, %eax
	mov $512, %ecx
1:	mov %eax, (%edi)
	movl $0, 4(%edi)
	add $0x200000, %eax
	add $8, %edi
	dec %ecx
	jnz 1b
	mov $0x10000, %eax
	mov %eax, %cr3
	mov %cr4, %eax
	or $0x20, %eax
	mov %eax, %cr4
	mov $0xC0000080, %ecx
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000000, %eax
	mov %eax, %cr0
	ljmp $0x18, $lm64

	.code64
lm64:
	mov $0x64, %dx
	out %al, %dx
	hlt

	.p2align 3
gdt:
	.quad 0
	.quad 0x00cf9b000000ffff	/* 0x08 code32 */
	.quad 0x00cf93000000ffff	/* 0x10 data */
	.quad 0x00af9b000000ffff	/* 0x18 code64 */
gdtr:
	.word gdtr - gdt - 1
	.long gdt
