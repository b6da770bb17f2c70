/*
 * signal_race - one signal, sent at a random moment around KVM_RUN, always ends it.
 *
 *   gcc -Wall -I clients -pthread -o signal_race tests/helpers/signal_race.c
 *   KVMFS_MNT=mnt ./signal_race [ROUNDS]     # on kvmfs; unset: on /dev/kvm
 *
 * The vCPU spins (`jmp $`).  Each round a second thread sends the vCPU thread
 * one SIGUSR1 0-200 us after it was told the round started, while the vCPU
 * thread enters KVM_RUN.  The handler sets kvm_run.immediate_exit, as VMMs do,
 * so a signal that comes before the ioctl still ends it; one that comes while
 * the request is on its way must end it too (KVM checks for a pending signal
 * before entering the guest).  Every round must return EINTR with
 * KVM_EXIT_INTR; a round that hangs is killed by alarm() (exit by SIGALRM).
 */
#include "kvmfs.h"
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

static struct kvm_run *run;
static pthread_t vcpu_thread;
static atomic_int round_started, round_signalled;

static void on_signal(int sig)
{
	(void)sig;
	run->immediate_exit = 1;
}

static void spin_us(unsigned us)
{
	struct timespec a, b;

	clock_gettime(CLOCK_MONOTONIC, &a);
	do
		clock_gettime(CLOCK_MONOTONIC, &b);
	while ((b.tv_sec - a.tv_sec) * 1000000000L + (b.tv_nsec - a.tv_nsec) < us * 1000L);
}

static void *kicker(void *arg)
{
	int rounds = *(int *)arg;

	for (int i = 1; i <= rounds; i++) {
		while (atomic_load(&round_started) < i)
			;
		spin_us((unsigned)rand() % 200);
		pthread_kill(vcpu_thread, SIGUSR1);
		atomic_store(&round_signalled, i);
	}
	return NULL;
}

static int fail(const char *what)
{
	fprintf(stderr, "signal_race: %s: %s\n", what, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 200;
	struct sigaction sa = { .sa_handler = on_signal };   /* no SA_RESTART */
	struct kvm_sregs sregs;
	struct kvm_regs regs = { .rip = 0x1000, .rflags = 2 };
	pthread_t k;
	unsigned char *mem;
	int sys, vm, vcpu, size;

	sys = kvmfs_open_system(NULL);
	if (sys < 0)
		return fail("open the system fd");
	vm = kvmfs_create_vm(sys, 0);
	if (vm < 0)
		return fail("KVM_CREATE_VM");
	mem = kvmfs_alloc_guest_memory(0x10000);
	if (!mem)
		return fail("guest memory");
	mem[0x1000] = 0xeb;                         /* jmp $ */
	mem[0x1001] = 0xfe;
	if (kvmfs_set_memslot(vm, 0, 0, 0, 0, 0x10000, mem) < 0)
		return fail("KVM_SET_USER_MEMORY_REGION");
	vcpu = kvmfs_create_vcpu(vm, 0);
	size = ioctl(sys, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (vcpu < 0 || size < 0)
		return fail("KVM_CREATE_VCPU");
	run = kvmfs_map_run(vcpu, (size_t)size);
	if (!run)
		return fail("map kvm_run");
	if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
		return fail("KVM_GET_SREGS");
	sregs.cs.selector = 0;
	sregs.cs.base = 0;
	if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0 || ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
		return fail("KVM_SET_SREGS/REGS");
	sigaction(SIGUSR1, &sa, NULL);
	vcpu_thread = pthread_self();
	srand(1);
	pthread_create(&k, NULL, kicker, &rounds);
	for (int i = 1; i <= rounds; i++) {
		run->immediate_exit = 0;
		alarm(10);
		atomic_store(&round_started, i);
		int rc = ioctl(vcpu, KVM_RUN, 0);
		int err = errno;
		while (atomic_load(&round_signalled) < i)    /* the round's one signal was sent */
			;
		if (rc != -1 || err != EINTR || run->exit_reason != KVM_EXIT_INTR) {
			fprintf(stderr, "signal_race: round %d: rc %d errno %d exit_reason %u\n",
				i, rc, err, run->exit_reason);
			return 1;
		}
	}
	alarm(0);
	pthread_join(k, NULL);
	printf("%d rounds, every one ended by its signal\n", rounds);
	return 0;
}
