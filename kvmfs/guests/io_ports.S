# io_ports — OUT and IN of each size (byte, word, dword); IN data lands in AL/AX/EAX.
# load: 0x1000
# setup: real (CS selector 0 base 0, RIP 0x1000, SP 0x8000).  Ports 0x10 (OUT), 0x11/0x1234 (IN).
	.code16
	mov $0x42, %al
	out %al, $0x10
	mov $0x3412, %ax
	out %ax, $0x10
	mov $0x78563412, %eax
	out %eax, $0x10
	mov $0x11223344, %eax
	in $0x11, %al			# upper bytes of EAX stay
	mov %eax, %ebx
	mov $0x1234, %dx
	in %dx, %ax
	mov %eax, %ecx
	in %dx, %eax
	mov %ebx, 0x3000
	mov %ecx, 0x3004
	mov %eax, 0x3008
	hlt
