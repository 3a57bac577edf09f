/* eng_cpu_pool.c: a small fork-join pool (pthreads + C11 atomics). A job is published by bumping a
 * generation counter; workers spin on it for a short while, then wait on a condition variable. The
 * owner joins by spinning on a completion count, yielding the core if a worker is slow to finish
 * (it may be descheduled behind another process: spinning would only delay it). */
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
    /* the current job; written by the owner before the generation bump, read by workers after it */
    eng_cpu_task_fn fn;
    void *arg;
    int64_t n, grain;
    _Atomic int64_t next;        /* next unclaimed item */
    _Atomic uint64_t generation; /* bumped once per job; 0 = none yet */
    _Atomic int pending;         /* workers that have not finished the current job */
    _Atomic int n_sleeping;
    _Atomic int stop;
    pthread_mutex_t mu; /* protects nothing but the condition wait: state is atomic */
    pthread_cond_t cv;
};

static void s_work(eng_cpu_pool_t *p, int thread) {
    for (;;) {
        int64_t b = atomic_fetch_add_explicit(&p->next, p->grain, memory_order_relaxed);
        if (b >= p->n) break;
        int64_t e = b + p->grain < p->n ? b + p->grain : p->n;
        p->fn(p->arg, b, e, thread);
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
        s_work(p, a.index);
        atomic_fetch_sub_explicit(&p->pending, 1, memory_order_release);
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
    p->fn = fn, p->arg = arg, p->n = n, p->grain = grain;
    atomic_store_explicit(&p->next, 0, memory_order_relaxed);
    atomic_store_explicit(&p->pending, p->n_threads - 1, memory_order_relaxed);
    atomic_fetch_add(&p->generation, 1); /* seq_cst: pairs with the sleeper's n_sleeping/generation check */
    if (atomic_load(&p->n_sleeping) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    s_work(p, 0);
    for (int i = 0; atomic_load_explicit(&p->pending, memory_order_acquire) > 0; i++) {
        if (i < S_JOIN_SPINS_BEFORE_YIELD)
            S_PAUSE();
        else
            sched_yield();
    }
}
