# hlt_resume — HLT exits with RIP past it; the next KVM_RUN goes on after it.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000).
	.code16
	hlt
	mov $0x55, %al
	out %al, $0xE9
	hlt
