/*
 * cpuid.c - `kvmfs run --cpuid-vmx`: the program's CPUID instruction reports VMX.
 *
 * A workaround for one check only: kvmtool refuses to start unless the host's
 * CPUID shows VMX or SVM, before it opens the device (it never needs VMX from
 * kvmfs).  With KVMFS_CPUID_VMX=1 in the environment, a constructor of the
 * preload library turns on CPUID faulting for the process
 * (arch_prctl(ARCH_SET_CPUID, 0): every later thread inherits it, exec resets
 * it), so each CPUID raises SIGSEGV; the handler below runs the real CPUID with
 * faulting off for that moment, sets CPUID.1:ECX.VMX, and steps over the
 * instruction.  Any other SIGSEGV goes to the action that was there before.
 *
 * Needs a CPU with CPUID faulting (`cpuid_fault` in /proc/cpuinfo); kvmfs run
 * checks before it starts the program.  A program that installs its own
 * SIGSEGV handler replaces this one (and then dies at its next CPUID).
 */
#include <asm/prctl.h>
#include <cpuid.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define CPUID_1_ECX_VMX (1u << 5)

static struct sigaction previous;

static void on_segv(int sig, siginfo_t *si, void *ctx)
{
	ucontext_t *uc = ctx;
	greg_t *g = uc->uc_mcontext.gregs;
	const unsigned char *ip = (const unsigned char *)g[REG_RIP];
	unsigned int a, b, c, d, leaf;

	if (si->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) {
		leaf = (unsigned int)g[REG_RAX];
		syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
		__cpuid_count(leaf, (unsigned int)g[REG_RCX], a, b, c, d);
		syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
		if (leaf == 1)
			c |= CPUID_1_ECX_VMX;
		g[REG_RAX] = a;
		g[REG_RBX] = b;
		g[REG_RCX] = c;
		g[REG_RDX] = d;
		g[REG_RIP] += 2;
		return;
	}
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(sig, si, ctx);
		return;
	}
	if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
		previous.sa_handler(sig);
		return;
	}
	signal(sig, SIG_DFL);            /* returning re-faults: the default action */
}

__attribute__((constructor)) static void cpuid_vmx_init(void)
{
	const char *on = getenv("KVMFS_CPUID_VMX");
	struct sigaction sa;

	if (!on || strcmp(on, "1"))
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = on_segv;
	sa.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGSEGV, &sa, &previous))
		return;
	if (syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0)) {
		static const char msg[] = "kvmfs run --cpuid-vmx: this CPU cannot fault CPUID\n";
		sigaction(SIGSEGV, &previous, NULL);
		if (write(2, msg, sizeof(msg) - 1) < 0)
			_exit(125);
		_exit(125);
	}
}
