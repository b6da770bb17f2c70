# rep_outsb — `rep outsb` of 4 bytes to port 0xE9: one exit per element.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000).
	.code16
	cld
	mov $msg, %si
	mov $4, %cx
	mov $0xE9, %dx
	rep outsb
	hlt
msg:	.ascii "abcd"
