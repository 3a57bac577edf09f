/* dc_exec.c: plan -> eng_async_submit -> (completion fd) -> collect -> dc_sched_update -> events -> plan again.
 * One step in flight at a time: the next step needs the tokens this one samples. */
#include "dc_exec.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "eng_async.h"
#include "pd_log.h"

struct dc_exec {
    dc_exec_params_t p;
    eng_async_t *async;
    dc_plan_t plan;
    eng_batch_t batch;    /* the view of plan the engine thread reads while a step runs; the engine samples it
                             (on the GPU for CUDA: no logits cross to the host) */
    eng_drafter_t *draft; /* DC_SPEC_DRAFT only */
    /* written by the engine thread during a step, read by the loop after collecting it */
    uint64_t job_draft_us, job_verify_us;
    bool is_job_one_time; /* the forward paid a one-time cost (eng_n_one_time): not what its shape costs later */
    dc_event_t *events;
    int cap_events;
    bool is_in_handler; /* inside a step's event callbacks: a kick then would re-enter planning */
    uint64_t step_start_us;
    uint64_t prev_done_us; /* when the previous step's rows were updated (for the guard's step cycle) */
    uint64_t last_fail_log_us;
    dc_exec_stats_t st;
    /* transferred KV not yet copied from the host mirror to the pool (dc_exec_kv_arrived), and the rows of the
     * running step that copy theirs (read by the engine thread) */
    uint64_t *kv_pending;
    int32_t n_kv_pending, cap_kv_pending;
    int32_t *upload_rows, n_upload_rows;
    FILE *step_log; /* DC_STEP_LOG=PREFIX: one CSV line per step to PREFIX.PID (for offline analysis; NULL: off) */
};

static void s_emit(dc_exec_t *x, int n) {
    x->is_in_handler = true;
    for (int i = 0; i < n; i++) x->p.on_event(x->p.ud, &x->events[i]);
    x->is_in_handler = false;
}

#define S_MAX_STEP_GAP_US 5000 /* a step planned longer than this after the previous one's update followed idle time */

/* The step finished with status: events for its rows. */
static void s_finish_step(dc_exec_t *x, pd_status result) {
    int n;
    const uint64_t done = pd_now_us(), busy = done - x->step_start_us;
    const bool is_pure_decode = x->plan.n_decode_rows == x->plan.n_seqs;
    x->st.busy_us += busy;
    x->st.last_us = done;
    if (is_pure_decode && x->plan.n_tokens_total > x->plan.n_seqs)
        x->st.n_drafted_steps++, x->st.drafted_busy_us += busy;
    x->st.draft_us += x->job_draft_us;
    if (result == PD_OK) {
        /* the step's cost for speculation's model: the forward and the host's sampling / verification of its rows;
         * steps with local-prefill chunks are left out (hundreds of prompt tokens would set the fitted line) */
        const uint64_t t0 = pd_now_us();
        const int32_t n_tokens = x->plan.n_tokens_total;
        dc_sched_stats_t before;
        if (x->step_log) dc_sched_stats(x->p.sched, &before);
        n = dc_sched_update(x->p.sched, &x->plan, NULL, t0, x->events, x->cap_events);
        if (x->step_log) {
            dc_sched_stats_t after;
            dc_sched_stats(x->p.sched, &after);
            fprintf(x->step_log, "%llu,%llu,%llu,%d,%d,%d,%d,%llu\n", (unsigned long long)x->step_start_us,
                    (unsigned long long)busy, (unsigned long long)x->job_verify_us, x->plan.n_seqs,
                    x->plan.n_decode_rows, n_tokens, x->is_job_one_time ? 1 : 0,
                    (unsigned long long)(after.n_tokens_generated - before.n_tokens_generated));
        }
        /* speculation's guard takes the whole cycle since the previous step was updated: the events, the next
         * plan (n-gram lookups included) and the launch are per-step costs that drafting saves or adds; a step
         * that followed an idle gap has no such cycle */
        const uint64_t t1 = pd_now_us();
        const double cycle_us = x->prev_done_us && x->step_start_us - x->prev_done_us < S_MAX_STEP_GAP_US
                                    ? (double)(t1 - x->prev_done_us)
                                    : -1.0;
        x->prev_done_us = t1;
        /* a shape's first launch or its graph's capture costs up to tens of steps once: on the H100, where drafted
         * shapes come back rarely (probes), such steps made up most of the guard's drafted samples and kept drafts off
         * where they pay */
        if (is_pure_decode && !x->is_job_one_time)
            dc_sched_spec_observe(x->p.sched, n_tokens, (double)(x->job_verify_us + (t1 - t0)), cycle_us);
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

int32_t dc_exec_draft(eng_drafter_t *d, dc_plan_t *plan) {
    eng_draft_batch_t b = {.n_rows = plan->n_decode_rows,
                           .hist = plan->hist,
                           .pos = plan->draft_pos,
                           .n_in = plan->draft_n_in,
                           .k = plan->draft_k,
                           .block_tables = plan->draft_tables,
                           .n_blocks = plan->draft_n_blocks,
                           .drafts = plan->draft_props,
                           .n_drafts = plan->draft_n_props,
                           .cached_out = plan->draft_cached_out};
    if (b.n_rows == 0 || eng_drafter_run(d, &b) == 0) return 0;
    int32_t total = 0;
    for (int32_t i = 0; i < b.n_rows; i++) {
        int32_t n = b.n_drafts[i];
        if (n > 0 && dc_plan_set_drafts(plan, i, b.drafts + (size_t)i * ENG_DRAFT_MAX, n) == PD_OK) total += n;
    }
    return total;
}

/* The step on the engine thread: the draft model's proposals (they go into the plan), then the forward that
 * verifies them. */
static pd_status s_job(void *ud) {
    dc_exec_t *x = ud;
    const int32_t bs = eng_kv_layout(x->p.eng)->block_size;
    for (int32_t i = 0; i < x->n_upload_rows; i++) { /* KV that came through kvtransfer: positions [0, pos) */
        const int32_t r = x->upload_rows[i];
        pd_status st = eng_kv_from_host(x->p.eng, x->plan.block_tables[r], (x->plan.pos[r] + bs - 1) / bs);
        if (st != PD_OK) return st;
    }
    uint64_t t0 = pd_now_us();
    if (x->draft) dc_exec_draft(x->draft, &x->plan);
    uint64_t t1 = pd_now_us();
    x->batch = dc_plan_batch(&x->plan, NULL);
    const uint64_t n_one_time = eng_n_one_time(x->p.eng);
    pd_status st = eng_forward(x->p.eng, &x->batch);
    x->is_job_one_time = eng_n_one_time(x->p.eng) != n_one_time;
    x->job_draft_us = t1 - t0;
    x->job_verify_us = pd_now_us() - t1;
    return st;
}

/* Moves the pending transfers this plan runs into upload_rows; forgets those whose request is gone. */
static void s_take_uploads(dc_exec_t *x) {
    x->n_upload_rows = 0;
    for (int32_t i = 0; i < x->n_kv_pending;) {
        const uint64_t id = x->kv_pending[i];
        int32_t row = -1, n_blocks;
        for (int32_t r = 0; r < x->plan.n_seqs && row < 0; r++)
            if (x->plan.req_ids[r] == id) row = r;
        if (row >= 0) x->upload_rows[x->n_upload_rows++] = row;
        if (row >= 0 || !dc_sched_blocks(x->p.sched, id, &n_blocks))
            x->kv_pending[i] = x->kv_pending[--x->n_kv_pending];
        else
            i++;
    }
}

void dc_exec_kv_arrived(dc_exec_t *x, uint64_t req_id) {
    if (x->n_kv_pending == x->cap_kv_pending) {
        x->cap_kv_pending = x->cap_kv_pending ? 2 * x->cap_kv_pending : 16;
        x->kv_pending = pd_xrealloc(x->kv_pending, sizeof(uint64_t) * (size_t)x->cap_kv_pending);
    }
    x->kv_pending[x->n_kv_pending++] = req_id;
}

void dc_exec_kick(dc_exec_t *x) {
    if (x->is_in_handler || eng_async_is_busy(x->async)) return;
    int n = dc_sched_plan(x->p.sched, pd_now_us(), &x->plan, x->events, x->cap_events);
    PD_ASSERT(n >= 0);
    s_emit(x, n);
    if (x->plan.n_seqs == 0) return; /* idle until the next kick */
    s_take_uploads(x);
    const uint64_t prev_start = x->step_start_us;
    x->step_start_us = pd_now_us();
    if (!x->st.first_us) x->st.first_us = x->step_start_us;
    /* back to back: this launch follows the last step's completion with no idle wait in between */
    if (prev_start && x->st.last_us >= prev_start && x->step_start_us - x->st.last_us < S_MAX_STEP_GAP_US)
        x->st.host_us += x->step_start_us - x->st.last_us;
    pd_status st = eng_async_submit_fn(x->async, s_job, x);
    if (st != PD_OK) { /* cannot happen while not busy; end the rows rather than leave them planned */
        s_finish_step(x, st);
        return;
    }
    x->st.n_steps++;
    x->st.n_rows += (uint64_t)x->plan.n_seqs;
    x->st.n_tokens += (uint64_t)x->plan.n_tokens_total; /* before drafts a draft model adds */
}

/* Best-of-reps time of one forward of one sequence with n tokens at position 0, in microseconds (one scratch
 * block of e's pool, given back). */
static pd_status s_time_forward(eng_t *e, int32_t n, int reps, double *us) {
    eng_kv_pool_t *pool = eng_kv_pool(e);
    int32_t block;
    int32_t tokens[DC_MAX_TOKENS_PER_SEQ] = {0};
    if (n > eng_kv_layout(e)->block_size || n > DC_MAX_TOKENS_PER_SEQ) return PD_EINVAL;
    pd_status st = eng_kv_pool_alloc(pool, 1, &block);
    if (st != PD_OK) return st;
    float *logits = pd_xmalloc(sizeof *logits * (size_t)n * (size_t)eng_config(e)->vocab_size);
    const int32_t *table = &block;
    int32_t pos = 0, one = 1;
    for (int32_t i = 0; i < n; i++) tokens[i] = 1 + i; /* any ids: the time does not depend on them */
    uint8_t want[DC_MAX_TOKENS_PER_SEQ];
    memset(want, 1, sizeof want);
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &one,
                     .tokens = tokens,
                     .want_logits = want,
                     .logits = logits};
    *us = 1e30;
    for (int r = 0; r < reps + 1 && st == PD_OK; r++) { /* the first run warms caches and is not counted */
        uint64_t t0 = pd_now_us();
        st = eng_forward(e, &b);
        double dt = (double)(pd_now_us() - t0);
        if (r > 0 && dt < *us) *us = dt;
    }
    free(logits);
    pd_status rs = eng_kv_pool_release(pool, &block, 1);
    return st != PD_OK ? st : rs;
}

/* The cost model of speculation: a forward of 1 and of 1 + spec_k tokens for the target (and of 1 and spec_k for
 * the draft model) give a base and a per-token cost; dc_sched_spec_observe then tracks drift. */
/* base + per_token * tokens through the times of a forward of 1 and of n tokens. */
static pd_status s_fit(eng_t *e, int32_t n, double *base_us, double *per_token_us) {
    double t1, tn;
    pd_status st = s_time_forward(e, 1, 3, &t1);
    if (st == PD_OK && n > 1) st = s_time_forward(e, n, 3, &tn);
    if (st != PD_OK) return st;
    *per_token_us = n > 1 && tn > t1 ? (tn - t1) / (n - 1) : t1 * 0.01; /* noise can invert them: ~free then */
    *base_us = t1 - *per_token_us > 0 ? t1 - *per_token_us : 0;
    return PD_OK;
}

pd_status dc_exec_calibrate(eng_t *eng, eng_t *draft_eng, int32_t k, dc_spec_cost_t *c) {
    *c = (dc_spec_cost_t){.scale = 1};
    if (k < 1 || k >= DC_MAX_TOKENS_PER_SEQ) return PD_EINVAL;
    pd_status st = s_fit(eng, 1 + k, &c->base_us, &c->per_token_us);
    if (st == PD_OK && draft_eng) st = s_fit(draft_eng, k, &c->draft_base_us, &c->draft_token_us);
    return st;
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
    x->upload_rows = pd_xmalloc(sizeof(int32_t) * (size_t)x->plan.cap_seqs);
    x->cap_events = sp->max_seqs > x->plan.cap_tokens ? sp->max_seqs : x->plan.cap_tokens;
    x->events = pd_xcalloc((size_t)x->cap_events, sizeof *x->events);
    if (sp->spec == DC_SPEC_DRAFT) {
        if (!p->draft_eng) {
            snprintf(err, err_cap, "dc_exec: speculation with a draft model needs draft_eng");
            goto fail;
        }
        x->draft = eng_drafter_create(p->draft_eng, p->eng, sp->max_batch_seqs,
                                      sp->draft_catchup_tokens + sp->max_batch_seqs, err, err_cap);
        if (!x->draft) goto fail;
    }
    if (sp->spec != DC_SPEC_OFF) {
        pd_status st = dc_exec_calibrate(p->eng, x->draft ? p->draft_eng : NULL, sp->spec_k, &x->st.cost);
        if (st != PD_OK) {
            snprintf(err, err_cap, "dc_exec: calibrating speculation: %s", pd_strerror(st));
            goto fail;
        }
        dc_sched_spec_set_cost(p->sched, &x->st.cost);
        LOG_I("speculation %s, k <= %d: forward %.0f us + %.0f us/token; draft model %.0f us + %.0f us/token",
              dc_spec_mode_name(sp->spec), sp->spec_k, x->st.cost.base_us, x->st.cost.per_token_us,
              x->st.cost.draft_base_us, x->st.cost.draft_token_us);
    }
    const char *step_log = getenv("DC_STEP_LOG");
    if (step_log && *step_log) {
        char path[512];
        snprintf(path, sizeof path, "%s.%d", step_log, (int)getpid());
        x->step_log = fopen(path, "w");
        if (x->step_log)
            fprintf(x->step_log, "start_us,busy_us,verify_us,rows,decode_rows,tokens,one_time,emitted\n");
        else
            LOG_W("DC_STEP_LOG: cannot open %s", path);
    }
    x->async = eng_async_create(p->eng);
    if (!x->async) {
        snprintf(err, err_cap, "dc_exec: cannot start the engine thread");
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
    eng_drafter_destroy(&x->draft);
    free(x->kv_pending), free(x->upload_rows);
    if (x->step_log) fclose(x->step_log);
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
