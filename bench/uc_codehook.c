/*
 * uc_codehook.c - an empty UC_HOOK_CODE callback in C for bench/bench_unicorn.py:
 * what a per-instruction code hook alone costs unicorn (the shape of the vCPU
 * engine's precise-stop hook: store the pc, test a flag).  No unicorn headers
 * needed; loaded with ctypes and registered on the binding's handle.
 */
#include <stdint.h>

volatile uint64_t uc_codehook_pc;
volatile int uc_codehook_attn;

void uc_codehook_empty(void *uc, uint64_t addr, uint32_t size, void *ud)
{
	(void)uc; (void)size; (void)ud;
	uc_codehook_pc = addr;
	if (__builtin_expect(uc_codehook_attn, 0))
		uc_codehook_pc = 0;
}
