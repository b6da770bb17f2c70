# demo — the bundled guest of `make demo` (tools/demo.py runs it).
# load: 0x1000
# VMM set-up: one 2 MiB slot at gpa 0; real mode as at reset but CS selector 0,
# base 0, RIP 0x1000.  The guest prints lines on port 0xE9 (one byte per OUT),
# goes real -> 32-bit protected (its own GDT) -> long mode (its own identity
# page tables at 0x10000, one 2 MiB page), does one OUT to port 0xEA (the VMM
# turns dirty logging on), writes one word into each of the 8 pages from
# 0x100000, prints "wrote 8 pages" and halts.  No stack is used after the OUT
# to 0xEA and every A/D and accessed bit is preset, so the only pages dirtied
# while logging are the 8 data pages.

	.set PML4, 0x10000
	.set PDPT, 0x11000
	.set PD,   0x12000
	.set DATA, 0x100000

	.macro PRINT msg
	mov $\msg, %esi
1:	lodsb
	test %al, %al
	jz 2f
	out %al, $0xE9
	jmp 1b
2:
	.endm

	.text
	.code16
start:
	cli
	xor %ax, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $0x8000, %sp
	mov $msg16, %si
1:	lodsb
	test %al, %al
	jz 2f
	out %al, $0xE9
	jmp 1b
2:
	lgdtl gdt_desc
	mov %cr0, %eax
	or $1, %eax			# CR0.PE
	mov %eax, %cr0
	ljmpl $0x08, $pm32

	.code32
pm32:
	mov $0x10, %ax
	mov %ax, %ds
	mov %ax, %es
	mov %ax, %ss
	mov $0x8000, %esp
	PRINT msg32
	# identity page tables: PML4[0] -> PDPT[0] -> PD[0] = 2 MiB page at 0
	mov $PML4, %edi
	xor %eax, %eax
	mov $(3 * 4096 / 4), %ecx
	rep stosl
	movl $(PDPT | 0x23), PML4	# P|RW|A
	movl $(PD | 0x23), PDPT
	movl $0xE3, PD			# P|RW|A|D|PS
	mov %cr4, %eax
	or $0x20, %eax			# CR4.PAE
	mov %eax, %cr4
	mov $PML4, %eax
	mov %eax, %cr3
	mov $0xC0000080, %ecx		# EFER.LME
	rdmsr
	or $0x100, %eax
	wrmsr
	mov %cr0, %eax
	or $0x80000000, %eax		# CR0.PG
	mov %eax, %cr0
	ljmp $0x18, $lm64

	.code64
lm64:
	PRINT msg64
	out %al, $0xEA			# VMM: dirty logging on
	mov $DATA, %edi
	mov $8, %ecx
3:	mov %ecx, (%rdi)
	add $0x1000, %rdi
	loop 3b
	PRINT msgdone
	hlt
	jmp lm64

	.p2align 3
gdt:
	.quad 0
	.quad 0x00CF9B000000FFFF		# 0x08 code32, accessed
	.quad 0x00CF93000000FFFF		# 0x10 data, accessed
	.quad 0x00AF9B000000FFFF		# 0x18 code64, accessed
gdt_desc:
	.word gdt_desc - gdt - 1
	.long gdt

msg16:	.asciz "hello from real mode\n"
msg32:	.asciz "hello from 32-bit protected mode\n"
msg64:	.asciz "hello from 64-bit long mode\n"
msgdone: .asciz "wrote 8 pages\n"
