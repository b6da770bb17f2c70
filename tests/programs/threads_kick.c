/*
 * threads_kick: two threads, each with its own vCPU of one VM, kicked out of KVM_RUN.
 *
 * Each thread creates its vCPU (ids 0 and 1), maps its kvm_run area and runs a real-mode
 * guest that loops forever (`jmp .`).  The main thread waits about 100 ms and sends
 * SIGUSR1 (handler installed without SA_RESTART) to each thread with pthread_kill,
 * again every 20 ms until that thread's KVM_RUN has returned (a signal that lands just
 * before the thread enters KVM_RUN is not lost that way).  KVM_RUN returns -1/EINTR with
 * exit_reason KVM_EXIT_INTR.  Then each thread sets immediate_exit = 1 and calls
 * KVM_RUN again: -1/EINTR at once, exit_reason left as it was.  The lines are printed
 * after both threads are joined, in vCPU order.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>

#define RAM_SIZE 0x10000
#define CODE_GPA 0x1000
#define NTHREADS 2

GUEST(guest_code,
	".code16\n"
	"1: jmp 1b\n");

struct worker {
	int id, vm, kvm;
	pthread_t thread;
	atomic_int state;        /* 0 starting, 1 about to run, 2 first run returned, 3 done */
	int ret1, err1, ret2, err2;
	uint32_t reason1, reason2;
};

static void on_sigusr1(int sig)
{
	(void)sig;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct kvm_run *run;
	int vcpu;

	vcpu = XIOCTLV(w->vm, KVM_CREATE_VCPU, w->id);
	run = map_run(w->kvm, vcpu);
	setup_real(vcpu, CODE_GPA);

	atomic_store(&w->state, 1);
	w->ret1 = ioctl(vcpu, KVM_RUN, 0);
	w->err1 = errno;
	w->reason1 = run->exit_reason;
	atomic_store(&w->state, 2);

	run->immediate_exit = 1;
	w->ret2 = ioctl(vcpu, KVM_RUN, 0);
	w->err2 = errno;
	w->reason2 = run->exit_reason;
	run->immediate_exit = 0;
	atomic_store(&w->state, 3);
	return NULL;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000 };

	while (nanosleep(&ts, &ts) < 0 && errno == EINTR)
		;
}

int main(void)
{
	struct worker w[NTHREADS];
	struct sigaction sa;
	void *ram;
	int kvm, vm, i, waited;

	prog_name = "threads_kick";
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_sigusr1;      /* no SA_RESTART */
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL) < 0)
		die("sigaction: %s", strerror(errno));

	kvm = kvm_open();
	vm = create_vm(kvm);
	ram = memfd_ram(RAM_SIZE);
	memcpy((char *)ram + CODE_GPA, guest_code, guest_code_end - guest_code);
	set_region(vm, 0, 0, RAM_SIZE, ram);

	memset(w, 0, sizeof(w));
	for (i = 0; i < NTHREADS; i++) {
		w[i].id = i;
		w[i].vm = vm;
		w[i].kvm = kvm;
		atomic_init(&w[i].state, 0);
		if (pthread_create(&w[i].thread, NULL, worker_main, &w[i]))
			die("pthread_create failed");
	}
	for (waited = 0;; waited++) {
		for (i = 0; i < NTHREADS && atomic_load(&w[i].state) >= 1; i++)
			;
		if (i == NTHREADS)
			break;
		if (waited > 60000)
			die("the threads did not reach KVM_RUN within 60 s");
		sleep_ms(1);
	}
	sleep_ms(100);
	for (waited = 0;; waited++) {
		int running = 0;

		for (i = 0; i < NTHREADS; i++) {
			if (atomic_load(&w[i].state) == 1) {
				running++;
				if (pthread_kill(w[i].thread, SIGUSR1))
					die("pthread_kill failed");
			}
		}
		if (!running)
			break;
		if (waited > 3000)
			die("a thread's KVM_RUN did not return within 60 s of SIGUSR1");
		sleep_ms(20);
	}
	for (i = 0; i < NTHREADS; i++)
		if (pthread_join(w[i].thread, NULL))
			die("pthread_join failed");

	for (i = 0; i < NTHREADS; i++) {
		printf("vcpu%d: KVM_RUN after SIGUSR1 -> %s, exit_reason %s\n",
		       i, result_str(w[i].ret1, w[i].err1), exit_name(w[i].reason1));
		printf("vcpu%d: KVM_RUN with immediate_exit -> %s, exit_reason %s\n",
		       i, result_str(w[i].ret2, w[i].err2), exit_name(w[i].reason2));
	}
	return 0;
}
