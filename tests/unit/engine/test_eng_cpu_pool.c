/* test_eng_cpu_pool.c: the CPU worker pool runs every item of every job exactly once, for many small
 * jobs in a row (the pattern of a forward pass), with more threads than cores, and with uneven items. */
#include <stdatomic.h>

#include "cpu/eng_cpu_pool.h"
#include "pd_test.h"

typedef struct {
    _Atomic int *hits; /* (n) times each item ran */
    _Atomic int bad_thread;
    int n_threads;
} job_t;

static void s_task(void *arg, int64_t b, int64_t e, int thread) {
    job_t *j = arg;
    if (thread < 0 || thread >= j->n_threads) atomic_fetch_add(&j->bad_thread, 1);
    for (int64_t i = b; i < e; i++) atomic_fetch_add(&j->hits[i], 1);
}

static void s_check_pool(int n_threads, int n_jobs) {
    eng_cpu_pool_t *p = eng_cpu_pool_create(n_threads);
    REQUIRE(p);
    CHECK_EQ_INT(eng_cpu_pool_n_threads(p), n_threads);
    enum { N_MAX = 5000 };
    static _Atomic int hits[N_MAX];
    int errors = 0;
    for (int k = 0; k < n_jobs; k++) {
        int n = 1 + (k * 7919) % N_MAX, grain = 1 + k % 13;
        for (int i = 0; i < n; i++) atomic_store(&hits[i], 0);
        job_t j = {.hits = hits, .n_threads = n_threads};
        eng_cpu_pool_run(p, n, grain, s_task, &j);
        for (int i = 0; i < n; i++) errors += atomic_load(&hits[i]) != 1;
        errors += atomic_load(&j.bad_thread);
    }
    CHECK_MSG(errors == 0, "%d threads: %d items not run exactly once", n_threads, errors);
    eng_cpu_pool_destroy(&p);
    CHECK(p == NULL);
}

static void test_one_thread(void) {
    s_check_pool(1, 200);
}
static void test_two_threads(void) {
    s_check_pool(2, 3000);
}
static void test_oversubscribed(void) {
    s_check_pool(8, 1000);
} /* more threads than this machine's cores */

int main(void) {
    PD_TEST_RUN(test_one_thread);
    PD_TEST_RUN(test_two_threads);
    PD_TEST_RUN(test_oversubscribed);
    return pd_test_finish();
}
