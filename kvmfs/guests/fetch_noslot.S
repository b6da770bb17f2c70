# fetch_noslot — a far jump to gpa 0xD0000, where no memslot is: the code fetch cannot be
# emulated, KVM_EXIT_INTERNAL_ERROR with suberror 1 (EMULATION).
# load: 0x1000
# setup: real (CS 0, RIP 0x1000).
	.code16
	ljmp $0xD000, $0
