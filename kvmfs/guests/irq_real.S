# irq_real — KVM_INTERRUPT in real mode: IVT[0x20] -> handler; the guest does sti; hlt and the
# VMM queues vector 0x20 while it sits after the HLT exit.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000, SP 0x8000, IF 0).
	.code16
	xor %ax, %ax
	mov %ax, %ds
	movw $handler, 0x80		# IVT[0x20] = 0000:handler
	movw $0, 0x82
	mov $0x61, %al
	out %al, $0xE9			# IF 0: not ready
	sti
	hlt				# IF 1: ready
	mov $0x62, %al
	out %al, $0xE9			# after the handler's iret
	hlt
handler:
	mov $0x49, %al
	out %al, $0xE9			# in the handler: IF 0
	iret
