# rep_insb — `rep insb` of 4 bytes from port 0x20 into 0x3000.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000).
	.code16
	cld
	mov $0x3000, %di
	mov $4, %cx
	mov $0x20, %dx
	rep insb
	hlt
