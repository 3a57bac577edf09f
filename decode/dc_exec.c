/* dc_exec.c: plan -> eng_async_submit -> (completion fd) -> collect -> dc_sched_update -> events -> plan again.
 * One step in flight at a time: the next step needs the tokens this one samples. */
#include "dc_exec.h"

#include <stdlib.h>
#include <zmq.h>

#include "eng_async.h"
#include "pd_log.h"

struct dc_exec {
    dc_exec_params_t p;
    eng_async_t *async;
    dc_plan_t plan;
    eng_batch_t batch; /* the view of plan the engine thread reads while a step runs */
    float *logits;     /* (plan.cap_seqs, vocab_size) */
    dc_event_t *events;
    int cap_events;
    bool is_in_handler; /* inside a step's event callbacks: a kick then would re-enter planning */
    uint64_t step_start_us;
    uint64_t last_fail_log_us;
    dc_exec_stats_t st;
};

static void s_emit(dc_exec_t *x, int n) {
    x->is_in_handler = true;
    for (int i = 0; i < n; i++) x->p.on_event(x->p.ud, &x->events[i]);
    x->is_in_handler = false;
}

/* The step finished with status: events for its rows. */
static void s_finish_step(dc_exec_t *x, pd_status result) {
    int n;
    x->st.busy_us += pd_now_us() - x->step_start_us;
    if (result == PD_OK) {
        n = dc_sched_update(x->p.sched, &x->plan, x->logits, pd_now_us(), x->events, x->cap_events);
    } else {
        x->st.n_failed_steps++;
        uint64_t now = pd_now_us();
        if (now - x->last_fail_log_us > 1000000u) { /* one line per second at most */
            LOG_E("decode step of %d rows failed: %s", x->plan.n_seqs, pd_strerror(result));
            x->last_fail_log_us = now;
        }
        n = dc_sched_plan_abort(x->p.sched, &x->plan, PD_EBACKEND, x->events, x->cap_events);
    }
    PD_ASSERT(n >= 0); /* the plan is the one in flight and the buffers fit it */
    s_emit(x, n);
}

static void s_on_done(pd_loop_t *l, void *ud) {
    (void)l;
    dc_exec_t *x = ud;
    pd_status result;
    if (eng_async_collect(x->async, &result) != PD_OK) return; /* spurious wake-up: still running */
    s_finish_step(x, result);
    dc_exec_kick(x);
}

void dc_exec_kick(dc_exec_t *x) {
    if (x->is_in_handler || eng_async_is_busy(x->async)) return;
    int n = dc_sched_plan(x->p.sched, pd_now_us(), &x->plan, x->events, x->cap_events);
    PD_ASSERT(n >= 0);
    s_emit(x, n);
    if (x->plan.n_seqs == 0) return; /* idle until the next kick */
    x->batch = dc_plan_batch(&x->plan, x->logits);
    x->step_start_us = pd_now_us();
    pd_status st = eng_async_submit(x->async, &x->batch);
    if (st != PD_OK) { /* cannot happen while not busy; end the rows rather than leave them planned */
        s_finish_step(x, st);
        return;
    }
    x->st.n_steps++;
    x->st.n_rows += (uint64_t)x->plan.n_seqs;
    x->st.n_tokens += (uint64_t)x->plan.n_tokens_total;
}

dc_exec_t *dc_exec_create(const dc_exec_params_t *p, char *err, size_t err_cap) {
    if (!p || !p->eng || !p->sched || !p->loop || !p->on_event) {
        snprintf(err, err_cap, "dc_exec: bad params (eng, sched, loop, on_event)");
        return NULL;
    }
    const dc_sched_params_t *sp = dc_sched_params(p->sched);
    dc_exec_t *x = pd_xcalloc(1, sizeof *x);
    x->p = *p;
    dc_plan_init(&x->plan, p->sched);
    x->logits = malloc(sizeof(float) * (size_t)x->plan.cap_seqs * (size_t)sp->vocab_size);
    x->cap_events = sp->max_seqs > x->plan.cap_seqs ? sp->max_seqs : x->plan.cap_seqs;
    x->events = pd_xcalloc((size_t)x->cap_events, sizeof *x->events);
    x->async = eng_async_create(p->eng);
    if (!x->logits || !x->async) {
        snprintf(err, err_cap, "dc_exec: %s", x->logits ? "cannot start the engine thread" : "out of memory");
        goto fail;
    }
    if (pd_loop_add_fd(p->loop, eng_async_fd(x->async), ZMQ_POLLIN, s_on_done, x) != PD_OK) {
        snprintf(err, err_cap, "dc_exec: cannot watch the engine fd");
        goto fail;
    }
    return x;
fail:
    dc_exec_destroy(&x);
    return NULL;
}

void dc_exec_wait(dc_exec_t *x) {
    pd_status result;
    if (!eng_async_is_busy(x->async) || eng_async_wait(x->async, &result) != PD_OK) return;
    s_finish_step(x, result);
}

void dc_exec_destroy(dc_exec_t **xp) {
    if (!xp || !*xp) return;
    dc_exec_t *x = *xp;
    if (x->async) {
        pd_status result;
        if (eng_async_is_busy(x->async) && eng_async_wait(x->async, &result) == PD_OK) {
            int n = dc_sched_plan_abort(x->p.sched, &x->plan, PD_ECLOSED, x->events, x->cap_events);
            (void)n; /* nobody listens any more: the rows' blocks go back to the pool, that is all */
        }
        pd_loop_remove_fd(x->p.loop, eng_async_fd(x->async));
        eng_async_destroy(&x->async);
    }
    dc_plan_fini(&x->plan);
    free(x->logits);
    free(x->events);
    free(x);
    *xp = NULL;
}

bool dc_exec_is_busy(const dc_exec_t *x) {
    return eng_async_is_busy(x->async);
}

void dc_exec_stats(const dc_exec_t *x, dc_exec_stats_t *out) {
    *out = x->st;
}
