/*
 * flush.c - the remote TLB flush: every zap makes every vCPU forget its
 * cached translations before it returns.  vCPUs attach a flush client
 * (kvmfs_native.h describes the protocol from the vCPU's side); a zapper bumps
 * the flush generation, kicks the clients inside the guest and waits for
 * their acknowledgements.
 *
 * Locking: guarded by mmu->lock; flush_remote is called with it held and
 * returns with it held, but releases it while waiting (see below).  kick()
 * callbacks run with the lock held.
 */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <time.h>

#include "kvmfs_internal.h"

#define FLUSH_REKICK_NS 2000000     /* 2 ms: re-kick a vCPU that has not acked */

/*
 * Make every vCPU forget its cached translations before returning (called
 * with the lock held, returns with it held, after the zap it follows).
 *
 * A vCPU's unicorn TLB can only hold translations while the vCPU is "in the
 * guest" (between kvmfs_mmu_enter and kvmfs_mmu_leave); outside, it must
 * compare kvmfs_mmu_flush_gen() with its acked_gen right after enter and flush
 * first if behind.  So: bump the generation, kick each client inside the guest
 * that has not acked it, and wait until each has acked it or left.  The wait
 * releases the lock so a kicked vCPU that is in the middle of a fill (blocked
 * on the lock) can finish it, reach its run loop, flush and ack: no deadlock.
 * A fill that completes during the wait sees the already-zapped state, so it
 * cannot re-create what was zapped; the TLB entry it installs is dropped by
 * the flush the vCPU does before acking anyway.
 */
void kvmfs_mmu_flush_remote(kvmfs_mmu *mmu)
{
	uint64_t gen = ++mmu->flush_gen;
	bool wait;

	mmu->stats.flushes++;
	for (int i = 0; i < mmu->nclients; i++) {
		struct kvmfs_flush_client *c = mmu->clients[i];
		if (c->in_guest && c->acked_gen < gen && c->kick) {
			mmu->stats.kicks++;
			c->kick(c->opaque);
		}
	}
	for (int rounds = 0;; rounds++) {
		struct timespec ts;

		wait = false;
		for (int i = 0; i < mmu->nclients; i++) {
			struct kvmfs_flush_client *c = mmu->clients[i];
			if (!c->in_guest || c->acked_gen >= gen)
				continue;
			wait = true;
			/*
			 * Still pending after a wait: kick again.  A kick that lands
			 * between the vCPU's last flush check and the start of the
			 * emulator is lost (uc_emu_start clears the stop request),
			 * and without this a guest that never exits would hold the
			 * zapper forever.
			 */
			if (rounds && c->kick) {
				mmu->stats.kicks++;
				c->kick(c->opaque);
			}
		}
		if (!wait)
			break;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_nsec += FLUSH_REKICK_NS;
		if (ts.tv_nsec >= 1000000000) {
			ts.tv_sec++;
			ts.tv_nsec -= 1000000000;
		}
		pthread_cond_timedwait(&mmu->flush_cv, &mmu->lock, &ts);
	}
}

void kvmfs_mmu_attach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	if (!c->attached) {
		if (mmu->nclients == mmu->cap_clients) {
			int cap = mmu->cap_clients ? mmu->cap_clients * 2 : 8;
			struct kvmfs_flush_client **p = realloc(mmu->clients, cap * sizeof(*p));
			if (!p)
				goto out;   /* left detached: the vCPU sees attached == 0 */
			mmu->clients = p;
			mmu->cap_clients = cap;
		}
		mmu->clients[mmu->nclients++] = c;
		c->attached = 1;
		c->in_guest = 0;
		/* nothing is cached yet: the client starts up to date */
		c->acked_gen = mmu->flush_gen;
	}
out:
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_detach(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	for (int i = 0; i < mmu->nclients; i++) {
		if (mmu->clients[i] == c) {
			mmu->clients[i] = mmu->clients[--mmu->nclients];
			break;
		}
	}
	c->attached = 0;
	c->in_guest = 0;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

uint64_t kvmfs_mmu_flush_gen(kvmfs_mmu *mmu)
{
	uint64_t g;

	pthread_mutex_lock(&mmu->lock);
	g = mmu->flush_gen;
	pthread_mutex_unlock(&mmu->lock);
	return g;
}

void kvmfs_mmu_enter(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	c->in_guest = 1;
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_leave(kvmfs_mmu *mmu, struct kvmfs_flush_client *c)
{
	pthread_mutex_lock(&mmu->lock);
	c->in_guest = 0;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}

void kvmfs_mmu_ack_flush(kvmfs_mmu *mmu, struct kvmfs_flush_client *c, uint64_t gen)
{
	pthread_mutex_lock(&mmu->lock);
	if (gen > c->acked_gen)
		c->acked_gen = gen;
	pthread_cond_broadcast(&mmu->flush_cv);
	pthread_mutex_unlock(&mmu->lock);
}
