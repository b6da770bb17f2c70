/*
 * pio.c - port I/O: the IN/OUT hooks that turn an IO instruction into
 * KVM_EXIT_IO (string and REP forms included) and the completion of that
 * exit on the next KVM_RUN.
 *
 *   OUT:  RUNNING --out_hook--> EXIT_IO (RIP on the OUT) --KVM_RUN--> RIP past it, RUNNING
 *   OUTS: one element per exit, RSI (and RCX for REP) retired in the hook
 *   IN:   RUNNING --in_hook--> EXIT_IO, PEND_IN (the IN has not run)
 *         --KVM_RUN--> the IN runs again and takes the VMM's data (pio_avail)
 *
 * Locking: none; hooks run in the vCPU's thread inside uc_emu_start.
 */
#include <string.h>

#include "vcpu_internal.h"

/* The IO instruction at RIP: string form, REP, address size, length. */
struct io_insn { bool string, rep; int asize; uint32_t len; };

static void decode_io(kvmfs_vcpu *v, struct io_insn *ii)
{
	uint8_t b[X86_MAX_INSN_LEN];
	int bits = env_code_bits(v->live);
	struct kvmfs_xlate xl;
	bool a67 = false;

	memset(ii, 0, sizeof *ii);
	ii->len = 1;
	if (!gmem(v, live_pc(v), b, sizeof b, false, &xl)) {
		for (int i = 0; i < X86_MAX_INSN_LEN; i++) {
			uint8_t c = b[i];
			if (c == X86_PFX_REP || c == X86_PFX_REPNE) { ii->rep = true; continue; }
			if (c == X86_PFX_ADDRSIZE) { a67 = true; continue; }
			if (c == X86_PFX_OPSIZE || c == X86_PFX_ES || c == X86_PFX_CS ||
			    c == X86_PFX_SS || c == X86_PFX_DS || c == X86_PFX_FS || c == X86_PFX_GS ||
			    (bits == 64 && c >= X86_REX_FIRST && c <= X86_REX_LAST))
				continue;
			ii->string = c >= X86_OP_INSB && c <= X86_OP_OUTSD;
			ii->len = i + ((c >= X86_OP_IN_IMM8 && c <= X86_OP_OUT_IMM8_LAST) ? 2 : 1);
			break;
		}
	}
	if (bits == 64)
		ii->asize = a67 ? 4 : 8;
	else if (bits == 32)
		ii->asize = a67 ? 2 : 4;
	else
		ii->asize = a67 ? 4 : 2;
	if (!ii->string)
		ii->rep = false;
}

static uint64_t asize_mask(int asize)
{
	return asize == 8 ? ~0ull : asize == 4 ? 0xffffffffull : 0xffffull;
}

/* A register written with address size asize, as QEMU does: 16-bit keeps the
 * upper bits, 32-bit zero-extends. */
static uint64_t asize_set(uint64_t old, uint64_t val, int asize)
{
	if (asize == 2)
		return (old & ~0xffffull) | (val & 0xffff);
	return val & asize_mask(asize);
}

void out_hook(uc_engine *uc, uint32_t port, int size, uint32_t value, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvm_run *run = v->run;
	uint64_t *regs = v->live->regs, *rip = v->live->rip;
	struct io_insn ii;

	run->io.direction = KVM_EXIT_IO_OUT;
	run->io.size = size;
	run->io.port = port;
	run->io.count = 1;
	run->io.data_offset = PIO_DATA_OFFSET;
	memcpy((uint8_t *)run + PIO_DATA_OFFSET, &value, size);
	decode_io(v, &ii);
	if (ii.string) {
		/* OUTS: one element per exit, retired here (RSI, and RCX for REP).
		 * REP leaves RIP on the instruction even after the last element,
		 * as KVM does; the next run finds RCX = 0 and moves on. */
		int32_t df = *v->live->df;
		regs[GPR_RSI] = asize_set(regs[GPR_RSI], regs[GPR_RSI] + (int64_t)df * size, ii.asize);
		if (ii.rep)
			regs[GPR_RCX] = asize_set(regs[GPR_RCX], regs[GPR_RCX] - 1, ii.asize);
		else
			*rip += ii.len;
	} else {
		/* VMX/SVM fast PIO: RIP stays on the OUT until the next KVM_RUN */
		v->out_rip = *rip;
		v->out_next = *rip + ii.len;
		if (env_code_bits(v->live) == 16)
			v->out_next &= 0xffff;
		v->out_pending = true;
	}
	v->why = WHY_OUT;
	stop_here(v);
}

uint32_t in_hook(uc_engine *uc, uint32_t port, int size, void *ud)
{
	kvmfs_vcpu *v = ud;
	struct kvm_run *run = v->run;
	uint64_t *regs = v->live->regs;
	struct io_insn ii;
	uint32_t val = 0;

	if (v->pio_avail) {
		memcpy(&val, (uint8_t *)run + PIO_DATA_OFFSET + v->pio_idx * size, size);
		v->pio_idx++;
		v->pio_avail--;
		return val;
	}
	decode_io(v, &ii);
	uint32_t count = 1;
	if (ii.rep) {
		/* as many elements as fit the page at RDI and the data area */
		uint64_t rcx = regs[GPR_RCX] & asize_mask(ii.asize);
		uint64_t off = regs[GPR_RDI] & (PAGE_SIZE - 1);
		uint64_t room = *v->live->df < 0 ? off / size + 1 : (PAGE_SIZE - off) / size;
		count = rcx < room ? rcx : room;
		if (count > PIO_DATA_MAX / size)
			count = PIO_DATA_MAX / size;
		if (!count)
			count = 1;
	}
	run->io.direction = KVM_EXIT_IO_IN;
	run->io.size = size;
	run->io.port = port;
	run->io.count = count;
	run->io.data_offset = PIO_DATA_OFFSET;
	v->pio_size = size;
	v->why = WHY_IN;
	stop_here(v);
}

/* The OUT left RIP on itself: as KVM's complete_fast_pio_out, skip it unless
 * userspace moved RIP meanwhile. */
int pio_complete_out(kvmfs_vcpu *v)
{
	v->out_pending = false;
	v->why = WHY_NONE;
	if (rreg(v, UC_X86_REG_RIP) == v->out_rip)
		wreg(v, UC_X86_REG_RIP, v->out_next);
	return 0;
}

/* The IN has not run: it takes the data when it runs again. */
int pio_complete_in(kvmfs_vcpu *v)
{
	v->pending = PEND_NONE;
	v->why = WHY_NONE;
	v->pio_avail = v->run->io.count;
	v->pio_idx = 0;
	return 0;
}
