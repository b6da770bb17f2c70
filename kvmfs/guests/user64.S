# user64 — 64-bit code at CPL 3 with IOPL 3 (runs natively on a PVM host): port I/O,
# MMIO write and read, a store to a READONLY slot, RAM stores (identity and through
# 0x800000 -> 0x5000); ends with OUT to port 0xFF (no HLT at CPL 3).
# load: 0x1000
# setup: user64 (page tables as long64 with U bits; CS 0x2b, SS/DS 0x33, RFLAGS 0x3202);
# slot 1 = 64 KiB READONLY at gpa 0x100000.
	.code64
	mov $0x42, %al
	out %al, $0x10
	in $0x11, %al
	mov %eax, %ebx
	movl $0x55667788, 0xD0000
	mov 0xD0004, %ecx
	movl $0xdeadbeef, 0x100000
	mov 0x100000, %edx
	movl $0x12345678, 0x3000
	movl $0xcafef00d, 0x800000
	out %al, $0xFF
	jmp .
