# in_echo — IN from port 0x20, echo the byte to port 0xE9, HLT (immediate_exit case).
# load: 0x1000
# setup: real (CS 0, RIP 0x1000).
	.code16
	in $0x20, %al
	out %al, $0xE9
	hlt
