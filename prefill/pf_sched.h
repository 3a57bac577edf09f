/* pf_sched.h: the prefill service's scheduler. Admits prompts into a bounded queue, packs them into
 * steps of at most step_tokens (long prompts split into chunks), reserves each request's KV blocks in the
 * engine's pool, samples the first token when a prompt completes, and keeps the blocks pinned until the
 * KV hand-off reports RELEASED. Pure bookkeeping: it never runs the forward, touches a socket or a thread
 * (the executor turns a plan into eng_forward; the service drives kvtransfer).
 *
 * Request states: QUEUED -> PREFILLING (one chunk per step) -> SENDING (blocks pinned) -> gone.
 * Every path out frees every block the request holds, exactly once:
 *   READY + pf_sched_sent (any status), pf_sched_cancel, deadline expiry, a failed step.
 *
 * Policy (why each rule):
 * - Admission is strict FCFS: the oldest QUEUED request is admitted when its WHOLE prompt's blocks can be
 *   reserved; requests behind it wait even if they would fit, so a long prompt is never starved by a
 *   stream of short ones. Reserving the whole prompt up front (not chunk by chunk) is what makes the
 *   scheduler deadlock-free without preemption: an admitted request never needs another block, so every
 *   admitted request finishes, and the blocks come back at pf_sched_sent. A prompt that needs more blocks
 *   than the whole pool is refused at submit (it could never run).
 * - Step packing, in admission order: pass 1 gives each PREFILLING request a chunk of
 *   min(remaining prompt, max_chunk_tokens, budget left); pass 2 hands any budget still left back in the
 *   same order (a chunk grows, capped by its remaining prompt). So one 16k-token prompt takes at most
 *   max_chunk_tokens of a step while others wait for their first chunk, and a step is never left short
 *   when only one long prompt is running (work-conserving).
 * - Deadlines are checked at plan time for QUEUED and PREFILLING requests. In SENDING the transfer's own
 *   timeout governs (the service derives it from the deadline); the scheduler only waits for RELEASED.
 *
 * Layer-by-layer KV streaming is the executor's business: an is_final sequence of a plan already has its
 * whole block table, so its transfer can start (and layers be marked ready) while the step runs; the
 * commit needs the first token, which pf_sched_update's READY event carries.
 *
 * One step is in flight at a time: pf_sched_plan, then (after the executor ran it) pf_sched_update with
 * the same plan. The plan's arrays, and the block ids they point to, stay valid and unchanged until that
 * update, even if a request in it is cancelled meanwhile (the engine may still be writing its blocks).
 *
 * Thread: one thread (the service loop) calls every function of one pf_sched_t. The plan may be read by
 * the engine thread while the step runs; the scheduler does not modify it until pf_sched_update. */
#ifndef PF_SCHED_H
#define PF_SCHED_H

#include <stdbool.h>
#include <stdint.h>

#include "eng.h"
#include "eng_kv.h"
#include "eng_sample.h"
#include "pd_common.h"

typedef struct pf_sched pf_sched_t;

typedef struct {
    eng_kv_pool_t *pool;       /* borrowed, outlives the scheduler: prompt blocks come from and go back here */
    int32_t block_size;        /* tokens per KV block (the pool's) */
    int32_t vocab_size;        /* token ids must be in [0, vocab_size); logits rows are this long */
    int32_t max_prompt_tokens; /* longest prompt accepted (the model's ctx_len) */
    int32_t step_tokens;       /* token budget of one step (default 8192; at most the engine's max_batch_tokens) */
    int32_t max_chunk_tokens;  /* a request's share of a step before later requests get theirs (default 2048) */
    int32_t max_step_seqs;     /* requests in one step (default 256; at most the engine's max_batch_seqs) */
    int32_t max_queued;        /* QUEUED requests; one more is refused with PD_EAGAIN (default 256) */
    int32_t max_active;        /* PREFILLING + SENDING requests; admission waits beyond it (default 1024) */
} pf_sched_params_t;

/* Defaults above; pool, block_size, vocab_size and max_prompt_tokens are 0 (fill them, or call
 * pf_sched_params_from_engine). */
pf_sched_params_t pf_sched_params_default(void);
/* Sets pool, block_size, vocab_size and max_prompt_tokens from e, and lowers step_tokens to the engine's
 * max_batch_tokens. Any thread that may use e. */
void pf_sched_params_from_engine(pf_sched_params_t *p, eng_t *e);

/* NULL (logged) on bad params. The scheduler allocates its plan arrays and request slots here, once. */
pf_sched_t *pf_sched_create(const pf_sched_params_t *p);
/* Frees every request still held (their blocks go back to the pool: call it only when no step is running
 * and no transfer still reads the blocks) and the scheduler; sets *s to NULL. Accepts NULL. */
void pf_sched_destroy(pf_sched_t **s);

/* Queues a prompt. tokens are copied. deadline_us: absolute time on the clock later passed to
 * pf_sched_plan (pd_now_us in the service), 0 = none. sampling is copied; it is used for the first token.
 * PD_OK; PD_EAGAIN when max_queued requests are already queued (backpressure: nothing is kept, retry
 * later or answer 503); PD_EINVAL (logged with req) for n_tokens < 1 or > max_prompt_tokens, a prompt
 * needing more blocks than the whole pool, a token id out of range, invalid sampling, or a req_id the
 * scheduler already holds. */
PD_NODISCARD pd_status pf_sched_submit(pf_sched_t *s, uint64_t req_id, const int32_t *tokens, int32_t n_tokens,
                                       const eng_sampling_t *sampling, uint64_t deadline_us);
/* Why the last pf_sched_submit returned PD_EINVAL, one line without the request id (e.g. "token 70000 at 3
 * out of range [0, 49152)"), for the error reply; "" after a submit that was not refused as invalid. Owned by s. */
const char *pf_sched_error(const pf_sched_t *s);

/* One step's work, ready for eng_forward (pf_plan_batch). Arrays are owned by the scheduler.
 * Sequences appear in admission order; logits rows come back in that order, one per is_final sequence. */
typedef struct {
    uint64_t step;                      /* serial number of the step */
    int32_t n_seqs;                     /* 0: nothing to run (call pf_sched_update anyway, or plan again) */
    int32_t n_tokens_total;             /* sum of n_tokens */
    int32_t n_logits;                   /* rows of logits the step produces = number of is_final sequences */
    const uint64_t *req_ids;            /* (n_seqs) */
    const int32_t *n_tokens;            /* (n_seqs) chunk length, >= 1 */
    const int32_t *pos;                 /* (n_seqs) position of the chunk's first token */
    const int32_t *const *block_tables; /* (n_seqs) the request's blocks, covering its whole prompt */
    const int32_t *n_blocks;            /* (n_seqs) */
    const uint8_t *is_final;            /* (n_seqs) 1: the chunk ends the prompt (its last token wants logits) */
    const int32_t *tokens;              /* (n_tokens_total) chunk after chunk */
    const uint8_t *want_logits;         /* (n_tokens_total) 1 only on the last token of a final chunk */
    int32_t n_expired;                  /* requests whose deadline passed at this plan: finished with
                                          PD_ETIMEDOUT, their blocks freed; tell their clients */
    const uint64_t *expired_ids;        /* (n_expired) */
} pf_plan_t;

/* Expires overdue requests, admits queued ones whose blocks can be reserved, and packs the step.
 * *out points to the scheduler's plan: its arrays stay unchanged until the next pf_sched_plan, the block
 * tables they point to until pf_sched_update. PD_OK (the plan may be empty; a non-empty plan must be
 * passed to pf_sched_update before the next plan); PD_EINVAL (logged) if the previous one was not. */
PD_NODISCARD pd_status pf_sched_plan(pf_sched_t *s, uint64_t now_us, const pf_plan_t **out);

/* The plan as an engine batch, logits written to `logits` ((n_logits, vocab_size) floats, caller's).
 * Only valid with n_seqs > 0. */
void pf_plan_batch(const pf_plan_t *plan, float *logits, eng_batch_t *out);

typedef enum {
    PF_EV_READY = 1,  /* the prompt is prefilled and its first token sampled: hand the KV to decode
                         (kvt_sender_start with block_ids), then call pf_sched_sent on RELEASED */
    PF_EV_FAILED = 2, /* the request ended with status (its blocks are already freed, unless pinned: then it is
                         SENDING until pf_sched_sent); tell the client */
} pf_event_kind_t;

typedef struct {
    pf_event_kind_t kind;
    uint64_t req_id;
    pd_status status;          /* READY: PD_OK. FAILED: the step's status (PD_EBACKEND, PD_EINVAL) or
                                  PD_EBACKEND when the logits could not be sampled (NaN) */
    int32_t n_tokens;          /* READY: prompt positions 0..n_tokens-1 held in the blocks */
    int32_t n_blocks;          /* READY */
    const int32_t *block_ids;  /* READY: (n_blocks) owned by the scheduler, valid until pf_sched_sent for
                                  this request (a cancel in SENDING does not free them) */
    eng_sample_result_t first; /* READY: the first generated token, its logprob and top-n if asked */
} pf_event_t;

/* Advances the requests of plan after the executor ran it. step_status is eng_forward's result: on
 * PD_OK, chunks count as done and every request whose prompt completed gets its first token sampled from
 * its row of logits (its own seeded sampler, prompt registered for penalties) and a READY event (state
 * SENDING); on failure every request of the plan ends with a FAILED event carrying step_status and its
 * blocks freed (logits unused, may be NULL). Requests cancelled during the step are freed here, without
 * an event. Pinned requests (pf_sched_pin) keep their blocks: SENDING whichever way they end. Writes at most
 * cap events; cap must be >= plan->n_seqs.
 * Returns the number of events, PD_EINVAL if plan is not the outstanding plan, PD_ERANGE if cap is too
 * small (nothing changed). */
PD_NODISCARD int pf_sched_update(pf_sched_t *s, const pf_plan_t *plan, pd_status step_status, const float *logits,
                                 pf_event_t *events, int cap);

/* The KV hand-off of req_id ended (kvtransfer's RELEASED: nothing references the blocks any more):
 * frees its blocks and forgets it, whatever status says (PD_OK delivered, anything else failed; counted
 * in stats). PD_OK; PD_EINVAL if req_id is not SENDING. */
PD_NODISCARD pd_status pf_sched_sent(pf_sched_t *s, uint64_t req_id, pd_status status);

/* A transfer reads req_id's blocks from now on, while its final chunk still runs (the executor streams the KV
 * layer by layer): until pf_sched_sent, no path frees them. The request's end is then always SENDING: READY as
 * usual; a failed step gives its FAILED event but leaves the request SENDING with its blocks; a cancel in the
 * step moves it to SENDING at pf_sched_update (no event). Each way pf_sched_sent frees the blocks once the
 * transfer is released. PD_OK; PD_EINVAL unless req_id is in the outstanding plan with its final chunk. */
PD_NODISCARD pd_status pf_sched_pin(pf_sched_t *s, uint64_t req_id);

/* Cancels req_id in any state. QUEUED, or PREFILLING between steps: freed now (blocks back in the pool).
 * In the running step: freed by pf_sched_update (pinned: SENDING then, and *is_sending set). SENDING: marked
 * cancelled and *is_sending set: the caller cancels the transfer (kvt_sender_cancel), and the blocks are freed
 * at pf_sched_sent, because the transfer may still read them. Cancelling twice is PD_OK. PD_EINVAL for an
 * unknown req_id. is_sending may be NULL. */
PD_NODISCARD pd_status pf_sched_cancel(pf_sched_t *s, uint64_t req_id, bool *is_sending);

/* For heartbeats and /metrics. */
typedef struct {
    int32_t n_queued;      /* admission queue depth */
    int32_t n_prefilling;  /* admitted, prompt not complete (cancelled ones in the running step included) */
    int32_t n_sending;     /* first token out, blocks pinned until RELEASED */
    int64_t queued_tokens; /* prompt tokens not yet prefilled (QUEUED + PREFILLING) */
    int32_t n_free_blocks; /* in the pool */
    int32_t n_blocks;      /* pool total */
    uint64_t n_steps;      /* non-empty plans */
    uint64_t n_submitted, n_rejected_full, n_rejected_invalid;
    uint64_t n_ready, n_failed, n_expired, n_cancelled;
    uint64_t n_sent_ok, n_sent_failed;
    uint64_t n_prefill_tokens; /* tokens run through forward steps */
} pf_sched_stats_t;

void pf_sched_stats(const pf_sched_t *s, pf_sched_stats_t *out);

#endif
