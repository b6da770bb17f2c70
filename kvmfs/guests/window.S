# window — runs with IF 1 from the start; a VMM that sets request_interrupt_window gets
# KVM_EXIT_IRQ_WINDOW_OPEN before the first instruction.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000, RFLAGS 0x202).
	.code16
	mov $0x57, %al
	out %al, $0xE9
	hlt
