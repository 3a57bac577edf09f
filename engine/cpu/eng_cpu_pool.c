/* eng_cpu_pool.c: a small fork-join pool (pthreads + C11 atomics). A job is published by bumping a
 * generation counter; workers spin on it for a short while, then wait on a condition variable. Work is
 * claimed in chunks from one atomic word holding (job tag, next index), so a claim can only succeed
 * for the job it was meant for. The owner joins by waiting until every item is done, not until every
 * worker has checked in: a worker descheduled behind another process (2 shared cores) and holding no
 * chunk never delays a job, it simply finds nothing left when it runs. */
#define _GNU_SOURCE
#include "eng_cpu_pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "pd_common.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define S_PAUSE() _mm_pause()
#else
#define S_PAUSE() ((void)0)
#endif

enum { S_SPIN_ITERS = 20000, S_JOIN_SPINS_BEFORE_YIELD = 2000 };

struct eng_cpu_pool {
    int n_threads;
    pthread_t *threads;
    /* the current job; written by the owner before the generation bump, read by workers after it. Atomic
     * (relaxed) because a late worker may read them while the owner publishes the next job; its claims
     * then fail on the tag, so what it read is never used. */
    _Atomic(eng_cpu_task_fn) fn;
    _Atomic(void *) arg;
    _Atomic int64_t n, grain;
    _Atomic uint64_t claim;      /* (job tag << 32) | next unclaimed item */
    _Atomic int64_t done;        /* items finished in the current job */
    _Atomic uint64_t generation; /* bumped once per job; its low 32 bits are the job tag */
    _Atomic int n_sleeping;
    _Atomic int stop;
    pthread_mutex_t mu; /* protects nothing but the condition wait: state is atomic */
    pthread_cond_t cv;
};

/* Claims and runs chunks of job `gen` until none is left or another job has replaced it. */
static void s_work(eng_cpu_pool_t *p, uint64_t gen, int thread) {
    const uint64_t tag = gen & 0xffffffffu;
    /* read after the acquire of gen; if a newer job overwrote them already, every claim below fails */
    eng_cpu_task_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
    void *arg = atomic_load_explicit(&p->arg, memory_order_relaxed);
    const int64_t n = atomic_load_explicit(&p->n, memory_order_relaxed);
    const int64_t grain = atomic_load_explicit(&p->grain, memory_order_relaxed);
    uint64_t v = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if (v >> 32 != tag || (int64_t)(v & 0xffffffffu) >= n) return;
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &v, v + (uint64_t)grain, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        int64_t b = (int64_t)(v & 0xffffffffu), e = b + grain < n ? b + grain : n;
        fn(arg, b, e, thread);
        atomic_fetch_add_explicit(&p->done, e - b, memory_order_release);
        v = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

typedef struct {
    eng_cpu_pool_t *pool;
    int index;
} s_worker_arg_t;

static void *s_worker(void *varg) {
    s_worker_arg_t a = *(s_worker_arg_t *)varg;
    free(varg);
    eng_cpu_pool_t *p = a.pool;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = atomic_load_explicit(&p->generation, memory_order_acquire);
        for (int i = 0; gen == seen && i < S_SPIN_ITERS && !atomic_load(&p->stop); i++) {
            S_PAUSE();
            gen = atomic_load_explicit(&p->generation, memory_order_acquire);
        }
        if (gen == seen && !atomic_load(&p->stop)) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->n_sleeping, 1);
            while ((gen = atomic_load(&p->generation)) == seen && !atomic_load(&p->stop))
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->n_sleeping, 1);
            pthread_mutex_unlock(&p->mu);
        }
        if (atomic_load(&p->stop)) return NULL;
        seen = gen;
        s_work(p, gen, a.index);
    }
}

eng_cpu_pool_t *eng_cpu_pool_create(int n_threads) {
    PD_ASSERT(n_threads >= 1);
    eng_cpu_pool_t *p = pd_xcalloc(1, sizeof *p);
    p->n_threads = n_threads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    p->threads = pd_xcalloc((size_t)n_threads, sizeof(pthread_t));
    for (int i = 1; i < n_threads; i++) {
        s_worker_arg_t *a = pd_xmalloc(sizeof *a);
        a->pool = p, a->index = i;
        if (pthread_create(&p->threads[i], NULL, s_worker, a) != 0) PD_FATAL("cannot start CPU worker thread %d", i);
    }
    return p;
}

void eng_cpu_pool_destroy(eng_cpu_pool_t **pool) {
    if (!pool || !*pool) return;
    eng_cpu_pool_t *p = *pool;
    pthread_mutex_lock(&p->mu);
    atomic_store(&p->stop, 1);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i < p->n_threads; i++) pthread_join(p->threads[i], NULL);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->cv);
    free(p->threads);
    free(p);
    *pool = NULL;
}

int eng_cpu_pool_n_threads(const eng_cpu_pool_t *pool) {
    return pool->n_threads;
}

void eng_cpu_pool_run(eng_cpu_pool_t *p, int64_t n, int64_t grain, eng_cpu_task_fn fn, void *arg) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    /* Small jobs, or one thread: no hand-off at all. */
    if (p->n_threads == 1 || n <= grain) {
        fn(arg, 0, n, 0);
        return;
    }
    PD_ASSERT(n < (int64_t)1 << 31);
    uint64_t gen = atomic_load_explicit(&p->generation, memory_order_relaxed) + 1;
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&p->n, n, memory_order_relaxed);
    atomic_store_explicit(&p->grain, grain, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->claim, (gen & 0xffffffffu) << 32, memory_order_release);
    atomic_store(&p->generation, gen); /* seq_cst: pairs with the sleeper's n_sleeping/generation check */
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    s_work(p, gen, 0);
    for (int i = 0; atomic_load_explicit(&p->done, memory_order_acquire) < n; i++) {
        if (i < S_JOIN_SPINS_BEFORE_YIELD)
            S_PAUSE();
        else
            sched_yield();
    }
}
