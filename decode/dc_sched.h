/* dc_sched.h: the decode service's scheduler. It owns every decoding request's state (block table,
 * sampler, stop strings, detokenizer, limits) and decides each step: which sequences run, at which
 * positions, with which blocks. It never computes: the executor turns a dc_plan_t into an eng_batch_t,
 * runs eng_forward, and hands the logits (or the rows the engine sampled from the plan's requests) back to
 * dc_sched_update. Pure C: no ZeroMQ, no threads, no clock
 * (callers pass "now"), so tests drive time and steps themselves.
 *
 * Life of a request:
 *   dc_sched_reserve   -> WAITING_KV: the prompt's blocks are taken from the pool now (kvtransfer writes
 *                         the prefill worker's K/V into them); refused early (PD_EAGAIN) when the pool
 *                         could not also keep a watermark of free blocks for the running sequences' growth.
 *   dc_sched_admit     -> RUNNING: the transfer committed; prefill's first token (with its logprobs, when
 *                         prefill sent them) is emitted and becomes the first decode input.
 *   or, with is_prefill_local (no prefill worker: short prompts), dc_sched_reserve -> PREFILLING: the prompt
 *                         runs here in chunks, in the same steps as the decode rows (at most
 *                         prefill_chunk_tokens prompt tokens per step), and the first token is sampled from the
 *                         last prompt row with the request's own sampler -> RUNNING.
 *   dc_sched_plan / dc_sched_update, once per step, until a finish: STOP (EOS or a stop string), LENGTH
 *                         (max_tokens or context length), ERROR (deadline, KV capacity), CANCELLED.
 *   A finished request leaves the scheduler at once: its blocks go back to the pool, its id is forgotten.
 *
 * Policies (deliberately simple; each is one function in dc_sched.c):
 *   admission  reserve only if n_free - prompt_blocks >= watermark_blocks (LESSONS.md: refuse early
 *              instead of thrashing);
 *   batching   running sequences in admission order, oldest first, at most max_batch_seqs per step;
 *   local prefill  after the decode rows, oldest reservation first, within prefill_chunk_tokens tokens and
 *              max_prefill_seqs rows per step (decode rows never wait for a long prompt);
 *   growth     a sequence gets one more block when its next position crosses a block boundary;
 *   preemption when the pool cannot supply that block, the newest-admitted running sequence is finished
 *              with ERROR / PD_EAGAIN "KV capacity exhausted" (its blocks feed the older ones). Requests are
 *              never re-run. TODO: recompute- or swap-preemption, once the router can retry elsewhere.
 *   speculation (spec != DC_SPEC_OFF, dc_spec.h) each decode row may carry drafts after its input: n-gram lookup
 *              over the request's prompt + output, or a draft model's proposals (added by the executor, dc_exec_draft);
 *              how many per row is dc_spec_allocate's call (adaptive k under the cost model), never more than the
 *              blocks a row has or can get without preempting anyone. Verification (dc_sched_update) samples every
 *              position with the request's own sampler and keeps a draft only when it is the sampled token, so the
 *              tokens are those of plain decoding, seeded sampling included; rejected positions are rolled back.
 *
 * Same answer, either path: a seeded request draws one uniform per sampled token from one stream, first
 * token included. Prefill's sampler drew the first; dc_sched_admit skips that draw in the request's own
 * sampler (eng_sampler_skip_draw) and counts the first token as generated (penalties), so remote prefill,
 * local prefill and a single sampler over the whole request (`pdctl generate`) give the same tokens.
 *
 * One thread (the decode service's loop) owns a dc_sched_t and calls everything; not thread-safe. */
#ifndef DC_SCHED_H
#define DC_SCHED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng.h"
#include "eng_draft.h"
#include "eng_kv.h"
#include "eng_sample.h"
#include "eng_stop.h"
#include "eng_tok.h"
#include "dc_spec.h"
#include "pd_common.h"

typedef struct dc_sched dc_sched_t;

typedef struct {
    eng_kv_pool_t *pool;          /* borrowed: the engine's block pool (eng_kv_pool); outlives the scheduler */
    const eng_tok_t *tok;         /* borrowed: detokenizer and EOS */
    int32_t block_size;           /* tokens per KV block (eng_kv_layout()->block_size) */
    int32_t vocab_size;           /* logits row length */
    int32_t max_context;          /* positions per sequence: prompt + generated <= max_context (model ctx_len) */
    int32_t max_seqs;             /* requests held at once, any state (default 256) */
    int32_t max_batch_seqs;       /* sequences in one step (default 64); <= the engine's max_batch_seqs */
    int32_t watermark_blocks;     /* free blocks admission leaves for growth; -1 (default) = max(1, 4% of pool) */
    int32_t prefill_chunk_tokens; /* local-prefill prompt tokens per step, all requests together (default 256);
                                     0 = local prefill refused. A step holds at most
                                     max_batch_seqs * DC_MAX_TOKENS_PER_SEQ + prefill_chunk_tokens tokens */
    int32_t max_prefill_seqs;     /* local-prefill rows per step, besides the max_batch_seqs decode rows (default 4) */
    /* speculative decoding (dc_spec.h): drafts proposed per decode row, verified in the same forward */
    dc_spec_mode_t spec;          /* DC_SPEC_OFF (default), DC_SPEC_NGRAM, DC_SPEC_DRAFT (needs draft_pool) */
    int32_t spec_k;               /* most drafts per sequence per step, 1..DC_MAX_TOKENS_PER_SEQ-1 (default 7) */
    int32_t ngram_min, ngram_max; /* n-gram lookup: longest match tried first (defaults 2 and 4) */
    int32_t ngram_short_k;        /* where no n-gram of ngram_min+ tokens matches, up to this many drafts from a
                                     one-token match, their acceptance tracked apart from the longer matches' (which
                                     they would otherwise drag down); 0: none (default) */
    int32_t spec_max_step_drafts; /* most draft tokens in one step, all sequences together (default 64) */
    bool spec_fixed_k;            /* true: every row drafts as much as it can (up to spec_k), no cost model (for
                                     tests and comparisons); false (default): adaptive k */
    eng_kv_pool_t *draft_pool;    /* DC_SPEC_DRAFT: the draft model's block pool (borrowed) */
    int32_t draft_block_size;     /* its tokens per block */
    int32_t draft_catchup_tokens; /* most tokens the draft model may catch up on per step (prompts it has not
                                     seen yet), all sequences together (default 512) */
} dc_sched_params_t;

dc_sched_params_t dc_sched_params_default(void);

/* NULL (reason in err, which may be NULL) on bad params. The scheduler allocates its slots and per-slot
 * text buffers here; per request it allocates only the sampler (at reserve). Caller destroys. */
dc_sched_t *dc_sched_create(const dc_sched_params_t *p, char *err, size_t err_cap);
/* The parameters s runs with (watermark_blocks resolved). */
const dc_sched_params_t *dc_sched_params(const dc_sched_t *s);
/* Releases every block still held (any state) and frees s; accepts NULL or *s == NULL; sets *s to NULL.
 * Must not be called while a plan is being executed (the blocks would be reused under the forward). */
void dc_sched_destroy(dc_sched_t **s);

/* ---- requests ---- */

typedef struct {
    uint64_t req_id;          /* unique among the requests the scheduler holds */
    int32_t n_prompt_tokens;  /* positions prefill computed (K/V arriving through kvtransfer), >= 1 */
    const int32_t *prompt;    /* (n_prompt_tokens) or NULL: only for the repetition penalty; copied */
    int32_t max_tokens;       /* generated tokens, prefill's first one included, >= 1 */
    bool ignore_eos;          /* keep going through end-of-generation tokens */
    eng_sampling_t sampling;  /* validated here */
    const char *const *stops; /* (n_stops) stop strings, copied; OpenAI semantics (eng_stop.h) */
    int32_t n_stops;          /* 0..ENG_STOP_MAX */
    uint64_t deadline_us;     /* in the caller's clock (the one passed as now_us); 0 = none */
    bool is_prefill_local;    /* the prompt (required) runs here instead of arriving through kvtransfer */
    int32_t spec_k;           /* most drafts per step for this request: -1 = the deployment's spec_k, 0 = no
                                 speculation, else capped by spec_k. Needs the prompt (drafts look it up) */
} dc_req_params_t;

/* max_tokens 16, greedy (temperature 0), no stops, no deadline; the caller sets req_id and
 * n_prompt_tokens. */
dc_req_params_t dc_req_params_default(void);

typedef enum {
    DC_FINISH_NONE = 0,
    DC_FINISH_STOP = 1,      /* end-of-generation token (unless ignore_eos) or a stop string */
    DC_FINISH_LENGTH = 2,    /* max_tokens, or the context is full */
    DC_FINISH_ERROR = 3,     /* status says why: PD_ETIMEDOUT (deadline), PD_EAGAIN (KV capacity), ... */
    DC_FINISH_CANCELLED = 4, /* dc_sched_cancel with PD_ECLOSED */
} dc_finish_t;

const char *dc_finish_name(dc_finish_t f); /* "stop", "length", "error", "cancelled", "" */

/* One request's output for one step. Text is the newly safe text: complete UTF-8 only, with stop
 * strings (and anything held back as a possible start of one) withheld; end-of-generation tokens give no
 * text unless ignore_eos. A request's deltas concatenate to its full output. */
typedef struct {
    uint64_t req_id;
    int32_t token; /* the new token, or -1 when the event only finishes (cancel, preemption, deadline) */
    float logprob; /* of token under the raw model distribution; NAN when unknown (prefill's token) */
    int32_t n_top; /* top logprobs (sampling.n_logprobs, 0 for prefill's token) */
    eng_logprob_t top[ENG_MAX_LOGPROBS];
    const char *text; /* (n_text) bytes, not NUL-terminated; owned by s, valid until the next call on s */
    int32_t n_text;
    dc_finish_t finish;  /* DC_FINISH_NONE while the request goes on */
    pd_status status;    /* PD_OK, or the error of DC_FINISH_ERROR / PD_ECLOSED for CANCELLED */
    int32_t stop_index;  /* the stop string that matched (index into dc_req_params_t.stops), or -1 */
    int32_t n_generated; /* tokens generated so far, this one included */
    char err[96];        /* one-line reason for ERROR ("KV capacity exhausted", "deadline passed") */
} dc_event_t;

/* Reserves the blocks for positions [0, n_prompt_tokens) and creates the request's state (WAITING_KV).
 * The blocks are dc_sched_blocks(s, req_id): hand them to kvtransfer through the receiver store's
 * reserve_for(request_id, n_tokens, ...) callback (kvt.h), which names the request.
 * With is_prefill_local the request is PREFILLING instead: the next plans run its prompt (copied here).
 * Returns PD_OK; PD_EAGAIN when the pool cannot spare them above the watermark or max_seqs requests are
 * held (retry later or elsewhere; nothing taken); PD_EINVAL for bad params (a duplicate or zero req_id,
 * invalid sampling or stops, a prompt that leaves no room for one token in max_context, or needs more blocks
 * than the pool has; is_prefill_local without a prompt or with prefill_chunk_tokens 0); PD_ENOMEM.
 * A one-line reason goes to err (may be NULL). */
PD_NODISCARD pd_status dc_sched_reserve(dc_sched_t *s, const dc_req_params_t *rp, char *err, size_t err_cap);

/* The block ids of a held request (position order), n in *n_blocks; NULL for an unknown id. Valid until
 * the next call on s. */
const int32_t *dc_sched_blocks(const dc_sched_t *s, uint64_t req_id, int32_t *n_blocks);

typedef enum {
    DC_REQ_NONE = 0,       /* not held (never reserved, or finished) */
    DC_REQ_WAITING_KV = 1, /* reserved; its blocks are kvtransfer's to fill */
    DC_REQ_PREFILLING = 2, /* is_prefill_local: prompt chunks still to run */
    DC_REQ_RUNNING = 3,
} dc_req_state_t;

/* Where a request stands (DC_REQ_NONE for an unknown or finished id). */
dc_req_state_t dc_sched_req_state(const dc_sched_t *s, uint64_t req_id);

/* The transfer of a WAITING_KV request committed: every prompt position has its K/V. first (sampled by
 * prefill; borrowed) is emitted into *ev like a decoded token (text, stop strings, EOS, max_tokens) and its
 * token becomes the next step's input; the request is RUNNING unless that token already finished it (then
 * ev->finish is set and its blocks are free). first->logprob may be NAN (unknown); first->top[0..n_top) are
 * reported up to the request's n_logprobs. The request's sampler skips the draw prefill's sampler used
 * (eng_sampler_skip_draw) and counts the token as generated. PD_OK; PD_EINVAL (ev untouched) for an unknown
 * id, a request not WAITING_KV, a token id outside the vocabulary, n_top outside [0, ENG_MAX_LOGPROBS] or a
 * top token outside the vocabulary. */
PD_NODISCARD pd_status dc_sched_admit(dc_sched_t *s, uint64_t req_id, const eng_sample_result_t *first, uint64_t now_us,
                                      dc_event_t *ev);

/* Ends a request in any state: reason PD_ECLOSED finishes it CANCELLED, any other status finishes it ERROR
 * with that status (e.g. the transfer failed). *ev gets its last event (no token; held text is dropped).
 * Blocks go back to the pool now, unless the request is in the plan being executed: then they are
 * released by the dc_sched_update (or dc_sched_plan_abort) of that plan, so the forward never writes into a
 * block someone else got; update emits nothing more for it. In WAITING_KV the caller must make sure
 * kvtransfer no longer writes the blocks (cancel only on the receiver's FAILED event, or after it
 * dropped the transfer). PD_OK; PD_EINVAL for an unknown (or already finished) id, ev untouched. */
PD_NODISCARD pd_status dc_sched_cancel(dc_sched_t *s, uint64_t req_id, pd_status reason, dc_event_t *ev);

/* ---- steps ---- */

/* A step: parallel arrays, ready to become an eng_batch_t (dc_plan_batch). Row i is sequence req_ids[i]
 * with n_tokens[i] inputs at positions pos[i]..; decode rows first (n_decode_rows of them: the sequence's next
 * input, then n_draft[i] draft tokens, logits wanted for each), then local-prefill chunks (want_logits only on
 * the last token of a prompt's last chunk). Capacities are fixed by dc_plan_init.
 * With a draft model, a decode row may also carry draft work that the executor does before the forward
 * (eng_draft.h, dc_exec_draft): draft_n_in[i] tokens of the row's history from draft_pos[i] on to feed the draft model (its
 * catch-up, the row's next input included), then draft_k[i] proposals to add with dc_plan_set_drafts. */
typedef struct {
    int32_t n_seqs;
    int32_t n_tokens_total;       /* sum of n_tokens */
    int32_t n_logits;             /* rows of logits the forward returns (count of want_logits) */
    uint64_t *req_ids;            /* (n_seqs) */
    int32_t *slots;               /* (n_seqs) scheduler-private: where each row's request lives */
    int32_t *n_tokens;            /* (n_seqs) >= 1 */
    int32_t *pos;                 /* (n_seqs) position of each row's first token */
    const int32_t **block_tables; /* (n_seqs) point into the scheduler; valid until the matching update */
    int32_t *n_blocks;            /* (n_seqs) */
    int32_t *tokens;              /* (n_tokens_total) sequence after sequence */
    uint8_t *want_logits;         /* (n_tokens_total) */
    int32_t n_decode_rows;        /* rows [0, n_decode_rows) are decode rows */
    int32_t *n_draft;             /* (n_seqs) draft tokens in the row after its first token */
    /* draft-model work, per decode row (draft_k[i] == 0 and draft_n_in[i] == 0: none) */
    int32_t *draft_k;             /* (n_seqs) proposals wanted */
    int32_t *draft_n_in;          /* (n_seqs) history tokens to feed first, from position draft_pos[i] */
    int32_t *draft_pos;           /* (n_seqs) positions the draft model holds K/V for */
    const int32_t **hist;         /* (n_seqs) the row's history (prompt + generated); valid until update */
    const int32_t **draft_tables; /* (n_seqs) the draft model's block table of the row */
    int32_t *draft_n_blocks;      /* (n_seqs) */
    int32_t *draft_cached_out;    /* (n_seqs) out, executor: positions the draft model now holds, -1 = none */
    int32_t *draft_props;         /* (cap_seqs, ENG_DRAFT_MAX) executor scratch: the draft model's proposals */
    int32_t *draft_n_props;       /* (cap_seqs) executor scratch */
    int32_t cap_seqs, cap_tokens;
    bool is_in_flight; /* between dc_sched_plan and dc_sched_update / dc_sched_plan_abort */
    /* sampling in the engine (dc_plan_batch without logits): each row's sampler (read-only, valid until update),
     * and one request and one result per logits row */
    const eng_sampler_t **samplers; /* (cap_seqs) */
    eng_row_sampling_t *smp_rows;   /* (cap_tokens) */
    eng_sample_result_t *samples;   /* (cap_tokens) */
    eng_pen_t *smp_pen;             /* the requests' penalty lists, grown on demand */
    int64_t smp_pen_cap;
    bool is_sampled; /* the step's batch samples: update reads samples instead of logits */
} dc_plan_t;

/* Sizes a plan for s (max_batch_seqs + max_prefill_seqs rows, max_batch_seqs * DC_MAX_TOKENS_PER_SEQ +
 * prefill_chunk_tokens tokens). */
/* (decode.spec_k's cap: 11 drafts. The default stays 7: on the H100, RAG at concurrency 1 ran no faster at 9 or 11,
 * bench/RESULTS.md, spec, session 16.) */
#define DC_MAX_TOKENS_PER_SEQ 12
void dc_plan_init(dc_plan_t *plan, const dc_sched_t *s);
void dc_plan_fini(dc_plan_t *plan);

/* Builds the next step into plan: checks deadlines (RUNNING and PREFILLING requests), grows block tables at
 * block boundaries (preempting as the header comment says), and picks the rows. Requests finished on the way (deadline, preemption)
 * get an event in events (cap must be >= max_seqs); returns how many, or PD_EINVAL (bad args, or the
 * previous plan is still in flight). plan->n_seqs may be 0: nothing to run. */
PD_NODISCARD int dc_sched_plan(dc_sched_t *s, uint64_t now_us, dc_plan_t *plan, dc_event_t *events, int cap);

/* Puts n drafts (after the row's first token, logits wanted for each) into decode row `row`, which must have
 * none yet; shifts the later rows. For the executor's draft model and for the n-gram lookup. PD_EINVAL when the
 * row is not a decode row, already has drafts, or the row or plan capacity would be exceeded. */
PD_NODISCARD pd_status dc_plan_set_drafts(dc_plan_t *plan, int32_t row, const int32_t *drafts, int32_t n);

/* The plan's view as an engine batch. With logits (plan->n_logits rows of vocab_size floats) the engine returns
 * logits and dc_sched_update samples them; with logits NULL the engine samples (eng_batch_t.sampling: on the GPU for
 * CUDA) from requests built here out of each row's sampler: its parameters, its next draws, and its penalty state
 * with the row's earlier drafts counted as generated (position j is only used if drafts 0..j-1 are accepted, and
 * then they are exactly the tokens the sampler will have been given). Call after the drafts are in, on the thread
 * that runs the forward; the samplers are not changed. */
eng_batch_t dc_plan_batch(dc_plan_t *plan, float *logits);

/* After eng_forward(plan) succeeded: samples each decode row's logits with its request's sampler (logits NULL: takes
 * the samples the engine drew, plan->samples, consuming the same draws from the sampler), appends
 * the token and emits one event per row still alive, and for a row with drafts one more per accepted draft
 * (events, cap >= plan->n_seqs + the plan's drafts; plan->n_tokens_total always suffices). A local-prefill row
 * advances its prompt; the last chunk's row samples the first token (the request is then RUNNING) and emits
 * it like a decoded one. Checks, in this order: stop
 * string / EOS -> STOP, max_tokens / context -> LENGTH, now_us past the deadline -> ERROR PD_ETIMEDOUT.
 * Returns the number of events, or PD_EINVAL (plan not in flight, bad args). A row whose logits cannot be
 * sampled (NaN) finishes ERROR PD_EBACKEND. */
PD_NODISCARD int dc_sched_update(dc_sched_t *s, dc_plan_t *plan, const float *logits, uint64_t now_us,
                                 dc_event_t *events, int cap);

/* The forward failed: every row of the plan finishes ERROR with status (e.g. PD_EBACKEND), events as for
 * update. Returns the number of events or PD_EINVAL. */
PD_NODISCARD int dc_sched_plan_abort(dc_sched_t *s, dc_plan_t *plan, pd_status status, dc_event_t *events, int cap);

/* ---- counters ---- */

typedef struct {
    int32_t n_waiting, n_running, n_prefilling; /* WAITING_KV, RUNNING, PREFILLING requests */
    int32_t n_free_blocks, n_total_blocks;      /* of the pool (shared with anyone else using it) */
    uint64_t n_tokens_generated;                /* emitted tokens, prefill's first ones included */
    uint64_t n_finished, n_preempted, n_refused;
    uint64_t n_decode_rows;                     /* decode rows verified (a sequence's step) */
    uint64_t n_spec_rows;                       /* of those, rows that carried at least one draft */
    uint64_t n_draft_tokens, n_accepted_tokens; /* drafts verified, drafts accepted */
} dc_sched_stats_t;

/* Speculation's cost model (dc_spec.h), set by the executor after calibrating the engine; until then drafts
 * are not proposed. dc_sched_spec_observe feeds each step's measured verify time (the cost model's) and its whole
 * cycle since the previous step's update (the guard's; negative: none, the step followed idle time). */
void dc_sched_spec_set_cost(dc_sched_t *s, const dc_spec_cost_t *c);
void dc_sched_spec_observe(dc_sched_t *s, int32_t n_tokens, double verify_us, double cycle_us);

void dc_sched_stats(const dc_sched_t *s, dc_sched_stats_t *out);

#endif
