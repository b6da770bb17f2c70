# counter64 — adds 1 to the u32 at gpa 0x3000 RCX times with lock xadd, then OUT to port
# 0xFF.  Several vCPUs run it at once; the total must be exact.
# load: 0x1000
# setup: user64 (CPL 3, IOPL 3: runs natively on a PVM host); RCX = iterations.
	.code64
1:	mov $1, %eax
	lock xadd %eax, 0x3000
	dec %rcx
	jnz 1b
	out %al, $0xFF
	jmp .
