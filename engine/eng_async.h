/* eng_async.h: runs eng_forward on an engine thread of its own, so that a service's event loop stays
 * responsive (heartbeats, KV receipt, cancels, streaming) while a step computes (STYLE §6: the engine thread
 * as an actor). The loop submits one batch at a time and learns of completion through a file descriptor it
 * watches (pd_loop_add_fd, ZMQ_POLLIN): no locks in the loop, no ZeroMQ in the engine.
 * While a batch runs, the engine thread is the only one that drives e; the batch's arrays, block tables and
 * logits buffer must stay untouched until eng_async_collect returns its result. */
#ifndef ENG_ASYNC_H
#define ENG_ASYNC_H

#include <stdbool.h>

#include "eng.h"
#include "pd_common.h"

typedef struct eng_async eng_async_t;

/* Starts the engine thread for e (borrowed; outlives the object). NULL (logged) on failure. */
eng_async_t *eng_async_create(eng_t *e);
/* Waits for a running batch to finish, stops the thread, frees; accepts NULL; sets *a to NULL. */
void eng_async_destroy(eng_async_t **a);

/* Starts eng_forward(e, b) on the engine thread. b (and everything it points to) is borrowed until
 * eng_async_collect returns PD_OK for it. PD_OK; PD_EAGAIN if a batch is still running. */
PD_NODISCARD pd_status eng_async_submit(eng_async_t *a, const eng_batch_t *b);

/* A job that is more than one forward (a draft model's proposals, then the verification forward): fn(ud) runs on
 * the engine thread, and its status is the result eng_async_collect returns. fn may drive any engine that only
 * this thread uses while the job runs. PD_OK; PD_EAGAIN if a job is still running; PD_EINVAL for a NULL fn. */
typedef pd_status (*eng_async_fn)(void *ud);
PD_NODISCARD pd_status eng_async_submit_fn(eng_async_t *a, eng_async_fn fn, void *ud);

/* Readable (POLLIN) when a submitted batch has finished and not been collected yet. */
int eng_async_fd(const eng_async_t *a);

/* Non-blocking: PD_OK with *result = eng_forward's status once the batch finished (the fd is drained);
 * PD_EAGAIN while it still runs or when nothing was submitted. */
PD_NODISCARD pd_status eng_async_collect(eng_async_t *a, pd_status *result);

/* Blocks until the running batch (if any) finished, then behaves as eng_async_collect. For tests and
 * shutdown. */
PD_NODISCARD pd_status eng_async_wait(eng_async_t *a, pd_status *result);

bool eng_async_is_busy(const eng_async_t *a);

#endif
