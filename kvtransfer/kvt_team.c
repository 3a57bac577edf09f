/* kvt_team.c: the receiver's copy team: the poll thread and a few helpers share the frames of one message from a
 * shared pool. One core moves about 3 GB/s of KV through copy, checksum and store, so one KV layer of a long prompt
 * (16 MiB for Llama-3-8B at 4096 tokens) takes ~2.7 ms on one pair of threads: the time a streamed transfer needs
 * after the prefill's last layer. Frames are independent (a checksum each), so they are dealt one at a time to
 * whichever thread is free. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvt_int.h"
#include "pd_log.h"

struct kvt_team {
    pthread_t *threads;
    uint8_t **scratch; /* (n_helpers) */
    int n_helpers;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    /* the job in progress: generation counts posted jobs so that a helper joins each exactly once */
    uint64_t generation;
    kvt_team_fn fn;
    void *ctx;
    size_t n, next; /* items, and the next one to take (under mu) */
    int n_busy;     /* helpers inside the current job */
    bool is_failed, is_stopping;
    char why[160]; /* the first failure's */
};

typedef struct {
    kvt_team_t *t;
    int index;
} s_helper_arg_t;

/* Takes items of the current job until none is left (or one failed), on any thread; mu is held on entry and exit. */
static void s_work(kvt_team_t *t, uint8_t *scratch) {
    while (t->next < t->n && !t->is_failed) {
        size_t i = t->next++;
        pthread_mutex_unlock(&t->mu);
        char why[160];
        bool ok = t->fn(t->ctx, i, scratch, why, sizeof why);
        pthread_mutex_lock(&t->mu);
        if (!ok && !t->is_failed) {
            t->is_failed = true;
            snprintf(t->why, sizeof t->why, "%s", why);
        }
    }
}

static void *s_helper_main(void *arg) {
    kvt_team_t *t = ((s_helper_arg_t *)arg)->t;
    uint8_t *scratch = t->scratch[((s_helper_arg_t *)arg)->index];
    free(arg);
    uint64_t seen = 0;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (t->generation == seen && !t->is_stopping) pthread_cond_wait(&t->cv, &t->mu);
        if (t->is_stopping) break;
        seen = t->generation;
        t->n_busy++;
        s_work(t, scratch);
        kvt_copy_fence(); /* this thread's non-temporal stores land before the caller reports the frames written */
        if (--t->n_busy == 0) pthread_cond_broadcast(&t->cv);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

kvt_team_t *kvt_team_create(int n_helpers, size_t scratch_bytes) {
    if (n_helpers < 1) return NULL;
    kvt_team_t *t = pd_xcalloc(1, sizeof *t);
    t->threads = pd_xcalloc((size_t)n_helpers, sizeof *t->threads);
    t->scratch = pd_xcalloc((size_t)n_helpers, sizeof *t->scratch);
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    for (int i = 0; i < n_helpers; i++) {
        t->scratch[i] = pd_xmalloc(scratch_bytes);
        s_helper_arg_t *a = pd_xmalloc(sizeof *a);
        a->t = t, a->index = i;
        if (pthread_create(&t->threads[i], NULL, s_helper_main, a) != 0) {
            free(a), free(t->scratch[i]);
            LOG_W("kvt receiver: %d of %d copy helpers started", i, n_helpers);
            break;
        }
        t->n_helpers++;
    }
    if (t->n_helpers == 0) kvt_team_destroy(&t);
    return t;
}

void kvt_team_destroy(kvt_team_t **tp) {
    kvt_team_t *t = *tp;
    if (!t) return;
    pthread_mutex_lock(&t->mu);
    t->is_stopping = true;
    pthread_cond_broadcast(&t->cv);
    pthread_mutex_unlock(&t->mu);
    for (int i = 0; i < t->n_helpers; i++) pthread_join(t->threads[i], NULL), free(t->scratch[i]);
    pthread_cond_destroy(&t->cv), pthread_mutex_destroy(&t->mu);
    free(t->threads), free(t->scratch), free(t);
    *tp = NULL;
}

bool kvt_team_run(kvt_team_t *t, kvt_team_fn fn, void *ctx, size_t n, uint8_t *scratch, char *why, size_t cap) {
    pthread_mutex_lock(&t->mu);
    t->fn = fn, t->ctx = ctx, t->n = n, t->next = 0, t->is_failed = false, t->why[0] = '\0';
    t->generation++;
    pthread_cond_broadcast(&t->cv);
    s_work(t, scratch);
    /* a helper that woke late finds nothing left and leaves at once; one still copying is waited for, as the
     * caller's buffers (and this job's fields) must outlive it */
    while (t->n_busy > 0) pthread_cond_wait(&t->cv, &t->mu);
    bool ok = !t->is_failed;
    if (!ok) snprintf(why, cap, "%s", t->why);
    t->fn = NULL, t->ctx = NULL, t->n = 0, t->next = 0;
    pthread_mutex_unlock(&t->mu);
    return ok;
}
