/* eng_async.c: one engine thread per eng_async_t. Hand-off is a mutex + condition for the job (taken once per
 * step, never contended in the loop: the loop submits only when the thread is idle) and an eventfd that turns
 * "done" into something a poll set can watch. */
#include "eng_async.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "pd_log.h"

struct eng_async {
    eng_t *e;
    pthread_t thread;
    int efd;
    /* lock protects: job, has_job, is_quit, result, is_done */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    const eng_batch_t *job;
    eng_async_fn job_fn; /* instead of job: a function run on the engine thread */
    void *job_ud;
    bool has_job, is_quit, is_done;
    pd_status result;
    bool is_busy; /* loop thread only: submitted and not collected */
};

static void *s_main(void *arg) {
    eng_async_t *a = arg;
    pthread_mutex_lock(&a->lock);
    for (;;) {
        while (!a->has_job && !a->is_quit) pthread_cond_wait(&a->cond, &a->lock);
        if (a->is_quit) break;
        const eng_batch_t *b = a->job;
        eng_async_fn fn = a->job_fn;
        void *ud = a->job_ud;
        a->has_job = false;
        pthread_mutex_unlock(&a->lock);
        pd_status st = fn ? fn(ud) : eng_forward(a->e, b);
        pthread_mutex_lock(&a->lock);
        a->result = st;
        a->is_done = true;
        pthread_cond_broadcast(&a->cond);
        uint64_t one = 1;
        ssize_t w = write(a->efd, &one, sizeof one);
        (void)w; /* an eventfd counter cannot overflow at one write per step */
    }
    pthread_mutex_unlock(&a->lock);
    return NULL;
}

eng_async_t *eng_async_create(eng_t *e) {
    eng_async_t *a = calloc(1, sizeof *a);
    if (!a) {
        LOG_E("eng_async: out of memory");
        return NULL;
    }
    a->e = e;
    a->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (a->efd < 0) {
        LOG_E("eng_async: eventfd: errno %d", errno);
        free(a);
        return NULL;
    }
    pthread_mutex_init(&a->lock, NULL);
    pthread_cond_init(&a->cond, NULL);
    if (pthread_create(&a->thread, NULL, s_main, a) != 0) {
        LOG_E("eng_async: cannot start the engine thread");
        close(a->efd);
        pthread_mutex_destroy(&a->lock);
        pthread_cond_destroy(&a->cond);
        free(a);
        return NULL;
    }
    return a;
}

void eng_async_destroy(eng_async_t **ap) {
    if (!ap || !*ap) return;
    eng_async_t *a = *ap;
    pthread_mutex_lock(&a->lock);
    a->is_quit = true; /* a running forward finishes first: the thread checks is_quit between jobs */
    pthread_cond_broadcast(&a->cond);
    pthread_mutex_unlock(&a->lock);
    pthread_join(a->thread, NULL);
    close(a->efd);
    pthread_mutex_destroy(&a->lock);
    pthread_cond_destroy(&a->cond);
    free(a);
    *ap = NULL;
}

static pd_status s_submit(eng_async_t *a, const eng_batch_t *b, eng_async_fn fn, void *ud) {
    if (a->is_busy) return PD_EAGAIN;
    pthread_mutex_lock(&a->lock);
    a->job = b;
    a->job_fn = fn;
    a->job_ud = ud;
    a->has_job = true;
    a->is_done = false;
    pthread_cond_broadcast(&a->cond);
    pthread_mutex_unlock(&a->lock);
    a->is_busy = true;
    return PD_OK;
}

pd_status eng_async_submit(eng_async_t *a, const eng_batch_t *b) {
    if (!b) return PD_EINVAL;
    return s_submit(a, b, NULL, NULL);
}

pd_status eng_async_submit_fn(eng_async_t *a, eng_async_fn fn, void *ud) {
    if (!fn) return PD_EINVAL;
    return s_submit(a, NULL, fn, ud);
}

int eng_async_fd(const eng_async_t *a) {
    return a->efd;
}

static pd_status s_collect(eng_async_t *a, pd_status *result, bool is_blocking) {
    if (!a->is_busy) return PD_EAGAIN;
    pthread_mutex_lock(&a->lock);
    while (is_blocking && !a->is_done) pthread_cond_wait(&a->cond, &a->lock);
    bool done = a->is_done;
    if (done) {
        *result = a->result;
        a->is_done = false;
    }
    pthread_mutex_unlock(&a->lock);
    if (!done) return PD_EAGAIN;
    uint64_t v;
    ssize_t r = read(a->efd, &v, sizeof v); /* drain: the fd is readable only while a result waits */
    (void)r;
    a->is_busy = false;
    return PD_OK;
}

pd_status eng_async_collect(eng_async_t *a, pd_status *result) {
    return s_collect(a, result, false);
}

pd_status eng_async_wait(eng_async_t *a, pd_status *result) {
    return s_collect(a, result, true);
}

bool eng_async_is_busy(const eng_async_t *a) {
    return a->is_busy;
}
