/* eng_cpu_pool.h: the CPU backend's worker threads. One parallel-for primitive: the calling thread and
 * n_threads-1 workers pull chunks of an index range from a shared counter until it is exhausted.
 * Workers spin briefly between jobs (a forward issues hundreds of jobs) and then sleep, so an idle
 * engine, or one sharing its cores with other processes, does not burn CPU waiting. Results never
 * depend on which thread ran which chunk: every kernel computes each output from its inputs alone. */
#ifndef ENG_CPU_POOL_H
#define ENG_CPU_POOL_H

#include <stdint.h>

typedef struct eng_cpu_pool eng_cpu_pool_t;

/* Runs items [begin, end) on thread `thread` (0 .. n_threads-1, for per-thread scratch). */
typedef void (*eng_cpu_task_fn)(void *arg, int64_t begin, int64_t end, int thread);

/* Starts n_threads-1 workers (n_threads >= 1). Aborts if threads cannot be created (startup only). */
eng_cpu_pool_t *eng_cpu_pool_create(int n_threads);
void eng_cpu_pool_destroy(eng_cpu_pool_t **pool);
int eng_cpu_pool_n_threads(const eng_cpu_pool_t *pool);

/* Runs fn over [0, n) in chunks of `grain` items and returns when all are done. Called by the one
 * thread that owns the pool; not reentrant. */
void eng_cpu_pool_run(eng_cpu_pool_t *pool, int64_t n, int64_t grain, eng_cpu_task_fn fn, void *arg);

#endif
