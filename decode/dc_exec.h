/* dc_exec.h: the decode service's step executor. Drives dc_sched on the service loop: plans a step, runs it on
 * the engine thread (eng_async, completion fd watched on the loop), feeds the logits back to dc_sched_update
 * and hands every resulting event to a callback, then plans the next step at once while sequences remain.
 * When nothing can run it goes idle until dc_exec_kick. Knows nothing of sockets or the wire.
 * Thread: the loop thread calls everything and runs the callback; nothing here blocks it except
 * dc_exec_destroy (waits for a running step). */
#ifndef DC_EXEC_H
#define DC_EXEC_H

#include <stdbool.h>
#include <stdint.h>

#include "dc_sched.h"
#include "eng.h"
#include "pd_common.h"
#include "pd_loop.h"

typedef struct dc_exec dc_exec_t;

/* One event of the scheduler (a token, a finish), borrowed for the call. The callback may call dc_sched_*
 * (cancel, reserve, admit) and dc_exec_kick (ignored while a step is being handled), but not destroy x. */
typedef void (*dc_exec_event_fn)(void *ud, const dc_event_t *ev);

typedef struct {
    eng_t *eng;        /* borrowed; outlives x */
    dc_sched_t *sched; /* borrowed; outlives x; its max_batch_seqs + max_prefill_seqs <= the engine's */
    pd_loop_t *loop;   /* borrowed: the engine's completion fd is watched here */
    dc_exec_event_fn on_event;
    void *ud;
    eng_t *draft_eng; /* the draft model (borrowed) when the scheduler speculates with one (DC_SPEC_DRAFT), else NULL */
} dc_exec_params_t;

/* Starts the engine thread, sizes the plan and logits buffers, watches the completion fd. With speculation on,
 * first calibrates the cost model (dc_spec.h) by timing a few forwards of one scratch sequence (one KV block of
 * each pool, given back), ~10-20 forwards. NULL with one line in err on failure. */
dc_exec_t *dc_exec_create(const dc_exec_params_t *p, char *err, size_t err_cap);
/* Waits for a running step, ends its rows without events (dc_sched_plan_abort), stops watching, frees.
 * Accepts NULL; sets *x to NULL. */
void dc_exec_destroy(dc_exec_t **x);

/* New work may exist (a request reserved for local prefill, a transfer committed): plans and starts a step
 * if none is running. Events of the planning (deadlines, preemptions) go to the callback. */
void dc_exec_kick(dc_exec_t *x);

/* req_id's KV arrived through kvtransfer into the engine's host KV (eng_kv_host_base): the step that first plans
 * it copies its blocks to the pool first (eng_kv_from_host; nothing to do when the pool is the host memory).
 * Call before admitting it (dc_sched_admit). */
void dc_exec_kv_arrived(dc_exec_t *x, uint64_t req_id);

/* The draft model's part of a planned step (its decode rows' draft work, dc_plan_t): runs d over them and puts
 * the proposals into the plan (dc_plan_set_drafts). Returns the drafts added. Thread: the one that drives d's
 * engine (the engine thread; tests call it directly). */
int32_t dc_exec_draft(eng_drafter_t *d, dc_plan_t *plan);

/* Speculation's cost model (dc_spec.h) for eng (and draft_eng, may be NULL): the best of a few forwards of one
 * scratch sequence with 1 and 1 + k tokens (k and 1 for the draft) give a base and a per-token cost. Uses one KV
 * block of each pool, given back. PD_OK or the forward's / pool's error. Thread: the one that drives the engines,
 * while nothing else runs on them. */
PD_NODISCARD pd_status dc_exec_calibrate(eng_t *eng, eng_t *draft_eng, int32_t k, dc_spec_cost_t *c);

/* A step is running on the engine thread. */
bool dc_exec_is_busy(const dc_exec_t *x);

/* Blocks until the running step (if any) finished and handles it as the completion fd would, without
 * planning another. For tests and shutdown. */
void dc_exec_wait(dc_exec_t *x);

typedef struct {
    uint64_t n_steps, n_rows, n_tokens; /* forwards run, their sequence rows and input tokens */
    uint64_t n_failed_steps;
    uint64_t busy_us;  /* engine time of those steps, as the loop saw it (submit to completion) */
    uint64_t draft_us; /* of which the draft model's forwards */
    uint64_t n_drafted_steps, drafted_busy_us; /* steps that verified drafts, and their share of busy_us */
    uint64_t host_us; /* loop time from a step's completion to the next step's launch (its events, the next plan) */
    uint64_t first_us, last_us; /* the first step's launch and the last one's completion (0: no step yet) */
    dc_spec_cost_t cost;        /* the calibrated cost model (zero without speculation) */
} dc_exec_stats_t;

void dc_exec_stats(const dc_exec_t *x, dc_exec_stats_t *out);

#endif
