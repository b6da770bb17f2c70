# spin — `jmp .` forever: only a signal (or a killed client) ends its KVM_RUN.
# load: 0x1000
# setup: real (CS 0, RIP 0x1000), or long64 / user64: the bytes EB FE mean the same there.
	.code16
	jmp .
