# mmio_rmw — instructions with an MMIO operand besides mov: push [mmio] (read, then a stack
# store to RAM), add [mmio], eax (read exit, then write exit with the sum), movsb from MMIO.
# load: 0x1000
# setup: long64 (as mmio64); RSP 0x8000.
	.code64
	mov $0x8000, %rsp
	pushq 0xD0000
	mov $0x01010101, %eax
	add %eax, 0xD0008
	cld
	mov $0xD0010, %esi
	mov $0x3000, %edi
	movsb
	hlt
