# triple_fault — ud2 with IDT limit 0: #UD, #DF, triple fault -> KVM_EXIT_SHUTDOWN (again on
# the next run).
# load: 0x1000
# setup: long64 with IDT base 0 limit 0.
	.code64
	ud2
