/* dc_sched.c: decode-side request state and step planning (see dc_sched.h for the contract and the
 * policies). Decides only: it never calls eng_forward, never reads a clock, never touches a socket. */
#include "dc_sched.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd_log.h"

typedef enum {
    S_FREE = 0,
    S_WAITING_KV,
    S_PREFILLING, /* local prefill: prompt chunks still to run */
    S_RUNNING,
    S_FINISHED, /* ended while its row was in an executing plan: blocks released by that plan's update */
} s_state_t;

typedef struct {
    s_state_t state;
    uint64_t req_id;
    eng_kv_seq_t kv;     /* covers positions [0, n_tokens) once planned; [0, n_prompt) while waiting */
    int32_t n_prompt;    /* positions whose K/V came from prefill (or are computed here, PREFILLING) */
    int32_t n_prefilled; /* PREFILLING: prompt positions already run */
    int32_t *hist;       /* (hist_cap) prompt then generated tokens, n_tokens of them; NULL when the caller gave
                            no prompt (no speculation then). PREFILLING reads its prompt from here */
    int32_t hist_cap;
    eng_ngram_index_t *ngram_ix; /* the n-gram lookup's index of hist (made at the first lookup, freed with the slot) */
    int32_t spec_k;              /* most drafts per step for this request (0: none) */
    dc_spec_acc_t acc;           /* its drafts' acceptance */
    dc_spec_acc_t acc_short;     /* ... of drafts from one-token matches (ngram_short_k) */
    bool is_short;               /* this step's drafts come from a one-token match */
    eng_kv_seq_t draft_kv;       /* the draft model's blocks for it (DC_SPEC_DRAFT) */
    int32_t n_draft_cached;      /* positions the draft model holds K/V for */
    int32_t ev_seq;              /* events emitted: picks the text buffer of the next one */
    int32_t n_logprobs;          /* top logprobs the client asked for */
    int32_t n_tokens;            /* prompt + generated; the last one is the next step's input */
    int32_t n_generated;         /* prefill's first token included */
    int32_t max_tokens;
    int32_t last_token;
    bool is_ignore_eos;
    bool is_in_plan;
    bool is_stop_hit;
    uint64_t deadline_us;
    eng_sampler_t *sampler;
    eng_stop_t *stop;
    eng_detok_t detok;
    char *text; /* (DC_MAX_TOKENS_PER_SEQ * text_cap): the latest events' texts, one buffer each, in turn (a
                   verified row emits up to DC_MAX_TOKENS_PER_SEQ events in one call) */
} s_slot_t;

struct dc_sched {
    dc_sched_params_t p;
    s_slot_t *slots;     /* (max_seqs) */
    int32_t *running;    /* (max_seqs) slot indices of RUNNING requests, oldest admission first */
    int32_t *prefilling; /* (max_seqs) slot indices of PREFILLING requests, oldest reservation first */
    int32_t n_running, n_waiting, n_prefilling;
    size_t text_cap;
    char *scratch; /* (text_cap) detokenizer output before stop matching */
    uint64_t n_tokens_generated, n_finished, n_preempted, n_refused;
    uint64_t n_decode_rows, n_spec_rows, n_draft_tokens, n_accepted_tokens;
    dc_spec_cost_t cost, cost_calibrated; /* the refitted model; the startup one, for exploring steps */
    dc_spec_acc_t acc_all;                /* acceptance over all sequences, slow decay: new sequences' prior */
    dc_spec_acc_t acc_all_short;          /* ... of one-token matches' drafts */
    bool has_cost;
    int64_t n_spec_plans;
    dc_spec_guard_t guard; /* what steps with and without drafts delivered (dc_spec.h) */
    bool is_guard_off;     /* DC_SPEC_GUARD=0: adaptive k under the cost model alone, probes as before the guard */
    /* the last updated step's decode rows, draft tokens and accepted drafts, for dc_sched_spec_observe */
    int64_t step_rows, step_drafts, step_accepted;
    /* plan-time scratch for speculation, (max_batch_seqs) and (max_batch_seqs, DC_MAX_TOKENS_PER_SEQ) */
    float *sp_acc, *sp_extra;
    int32_t *sp_avail, *sp_k, *sp_drafts;
    bool *sp_short; /* row i's candidates come from a one-token match */
};

static void s_err(char *err, size_t cap, const char *fmt, ...) PD_PRINTF(3, 4);
static void s_err(char *err, size_t cap, const char *fmt, ...) {
    if (!err || cap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

dc_sched_params_t dc_sched_params_default(void) {
    return (dc_sched_params_t){.block_size = 16,
                               .max_seqs = 256,
                               .max_batch_seqs = 64,
                               .watermark_blocks = -1,
                               .prefill_chunk_tokens = 256,
                               .max_prefill_seqs = 4,
                               .spec = DC_SPEC_OFF,
                               .spec_k = 7, /* RAG on the H100: 2.28 tokens a step against 2.18 at 5 */
                               .ngram_min = 2,
                               .ngram_max = 4,
                               .spec_max_step_drafts = 64,
                               .draft_catchup_tokens = 512};
}

dc_req_params_t dc_req_params_default(void) {
    dc_req_params_t r = {.max_tokens = 16, .sampling = eng_sampling_default(), .spec_k = -1};
    r.sampling.temperature = 0;
    return r;
}

const char *dc_finish_name(dc_finish_t f) {
    switch (f) {
    case DC_FINISH_STOP: return "stop";
    case DC_FINISH_LENGTH: return "length";
    case DC_FINISH_ERROR: return "error";
    case DC_FINISH_CANCELLED: return "cancelled";
    default: return "";
    }
}

dc_sched_t *dc_sched_create(const dc_sched_params_t *p, char *err, size_t err_cap) {
    if (!p || !p->pool || !p->tok || p->block_size < 1 || p->vocab_size < 1 || p->max_context < 2 || p->max_seqs < 1 ||
        p->max_batch_seqs < 1 || p->watermark_blocks < -1 || p->prefill_chunk_tokens < 0 || p->max_prefill_seqs < 1) {
        s_err(err, err_cap,
              "dc_sched: bad params (pool, tok, block_size, vocab_size, max_context, max_seqs, "
              "max_batch_seqs, watermark_blocks, prefill_chunk_tokens, max_prefill_seqs)");
        return NULL;
    }
    if (p->spec != DC_SPEC_OFF &&
        (p->spec_k < 1 || p->spec_k > DC_MAX_TOKENS_PER_SEQ - 1 || p->spec_max_step_drafts < 0 ||
         (p->spec == DC_SPEC_NGRAM && (p->ngram_min < 1 || p->ngram_max < p->ngram_min || p->ngram_short_k < 0 ||
                                       p->ngram_short_k > DC_MAX_TOKENS_PER_SEQ - 1)) ||
         (p->spec == DC_SPEC_DRAFT && (!p->draft_pool || p->draft_block_size < 1 || p->draft_catchup_tokens < 1)))) {
        s_err(err, err_cap,
              "dc_sched: bad speculation params (spec_k in [1, %d], ngram_min >= 1, ngram_max >= ngram_min, "
              "ngram_short_k in [0, %d], spec_max_step_drafts >= 0; a draft model needs draft_pool, draft_block_size, "
              "draft_catchup_tokens)",
              DC_MAX_TOKENS_PER_SEQ - 1, DC_MAX_TOKENS_PER_SEQ - 1);
        return NULL;
    }
    dc_sched_t *s = pd_xcalloc(1, sizeof *s);
    const char *guard = getenv("DC_SPEC_GUARD"); /* 0: no measured guard (for A/B measurements) */
    s->is_guard_off = guard && *guard == '0';
    /* A/B: median or mean, 0.95 */
    const char *stat = getenv("DC_SPEC_GUARD_STAT"), *margin = getenv("DC_SPEC_GUARD_MARGIN");
    s->guard.stat = !stat                     ? DC_SPEC_GUARD_RATIO
                    : !strcmp(stat, "median") ? DC_SPEC_GUARD_MEDIAN
                    : !strcmp(stat, "mean")   ? DC_SPEC_GUARD_MEAN
                                              : DC_SPEC_GUARD_RATIO;
    s->guard.margin = margin ? strtod(margin, NULL) : 0;
    if (!(s->guard.margin > 0 && s->guard.margin <= 2)) s->guard.margin = 0;
    s->p = *p;
    if (s->p.watermark_blocks < 0) {
        int32_t n = eng_kv_pool_n_blocks(p->pool) / 25;
        s->p.watermark_blocks = n > 1 ? n : 1;
    }
    /* one event's text: a token's bytes plus what stop matching held back, plus the flushes at the end */
    s->text_cap = eng_detok_max_bytes(p->tok) + 4 * ENG_STOP_MAX_BYTES + 16;
    s->scratch = pd_xmalloc(s->text_cap);
    s->slots = pd_xcalloc((size_t)p->max_seqs, sizeof *s->slots);
    s->running = pd_xcalloc((size_t)p->max_seqs, sizeof *s->running);
    s->prefilling = pd_xcalloc((size_t)p->max_seqs, sizeof *s->prefilling);
    for (int32_t i = 0; i < p->max_seqs; i++) s->slots[i].text = pd_xmalloc(s->text_cap * DC_MAX_TOKENS_PER_SEQ);
    size_t nb = (size_t)p->max_batch_seqs;
    s->sp_acc = pd_xcalloc(nb, sizeof *s->sp_acc);
    s->sp_extra = pd_xcalloc(nb, sizeof *s->sp_extra);
    s->sp_avail = pd_xcalloc(nb, sizeof *s->sp_avail);
    s->sp_k = pd_xcalloc(nb, sizeof *s->sp_k);
    s->sp_short = pd_xcalloc(nb, sizeof *s->sp_short);
    s->sp_drafts = pd_xcalloc(nb * DC_MAX_TOKENS_PER_SEQ, sizeof *s->sp_drafts);
    return s;
}

const dc_sched_params_t *dc_sched_params(const dc_sched_t *s) {
    return &s->p;
}

static void s_slot_free(dc_sched_t *s, s_slot_t *sl) {
    eng_kv_seq_release(&sl->kv, s->p.pool);
    if (s->p.draft_pool) eng_kv_seq_release(&sl->draft_kv, s->p.draft_pool);
    eng_sampler_destroy(&sl->sampler);
    eng_stop_destroy(&sl->stop);
    free(sl->hist);
    sl->hist = NULL;
    eng_ngram_index_destroy(&sl->ngram_ix); /* its tables grew with this history: a few hundred KB for a long one */
    sl->state = S_FREE;
    sl->is_in_plan = false;
}

void dc_sched_destroy(dc_sched_t **sp) {
    if (!sp || !*sp) return;
    dc_sched_t *s = *sp;
    char guard[1024];
    if (s->p.spec != DC_SPEC_OFF && !s->is_guard_off && dc_spec_guard_describe(&s->guard, guard, sizeof guard) > 0)
        LOG_I("speculation guard at exit: %s", guard);
    for (int32_t i = 0; i < s->p.max_seqs; i++) {
        if (s->slots[i].state != S_FREE) s_slot_free(s, &s->slots[i]);
        eng_kv_seq_fini(&s->slots[i].kv);
        eng_kv_seq_fini(&s->slots[i].draft_kv);
        eng_ngram_index_destroy(&s->slots[i].ngram_ix);
        free(s->slots[i].text);
    }
    free(s->sp_acc), free(s->sp_extra), free(s->sp_avail), free(s->sp_k), free(s->sp_drafts), free(s->sp_short);
    free(s->slots), free(s->running), free(s->prefilling), free(s->scratch), free(s);
    *sp = NULL;
}

/* Linear scan: max_seqs is a few hundred and lookups happen per request event, not per token. */
static s_slot_t *s_find(const dc_sched_t *s, uint64_t req_id) {
    for (int32_t i = 0; i < s->p.max_seqs; i++) {
        s_slot_t *sl = &s->slots[i];
        if ((sl->state == S_WAITING_KV || sl->state == S_PREFILLING || sl->state == S_RUNNING) && sl->req_id == req_id)
            return sl;
    }
    return NULL;
}

/* Removes slot from an ordered list (running or prefilling) of *n entries. */
static void s_list_remove(int32_t *list, int32_t *n, int32_t slot) {
    for (int32_t i = 0; i < *n; i++) {
        if (list[i] != slot) continue;
        memmove(&list[i], &list[i + 1], sizeof *list * (size_t)(*n - i - 1));
        (*n)--;
        return;
    }
    PD_ASSERT(!"slot not in its state's list");
}

static void s_event_init(dc_event_t *ev, s_slot_t *sl, const dc_sched_t *s) {
    memset(ev, 0, offsetof(dc_event_t, err) + 1);
    ev->req_id = sl->req_id;
    ev->token = -1;
    ev->logprob = NAN;
    ev->text = sl->text + (size_t)(sl->ev_seq++ % DC_MAX_TOKENS_PER_SEQ) * s->text_cap;
    ev->stop_index = -1;
    ev->n_generated = sl->n_generated;
}

/* Appends n bytes of decoded text to the event through stop matching. */
static void s_feed_text(dc_sched_t *s, s_slot_t *sl, dc_event_t *ev, const char *bytes, size_t n) {
    if (sl->is_stop_hit) return;
    bool is_hit = false;
    int64_t w =
        eng_stop_feed(sl->stop, bytes, n, (char *)ev->text + ev->n_text, s->text_cap - (size_t)ev->n_text, &is_hit);
    PD_ASSERT(w >= 0); /* text_cap covers a token plus everything stop matching can hold back */
    ev->n_text += (int32_t)w;
    if (is_hit) {
        sl->is_stop_hit = true;
        ev->stop_index = eng_stop_which(sl->stop);
    }
}

/* Ends a request: fills the event's finish, releases (or, while its row executes, defers) its blocks.
 * is_flush: emit text held back by the detokenizer and stop matching (normal ends; not cancellation). */
static void s_finish(dc_sched_t *s, s_slot_t *sl, dc_event_t *ev, dc_finish_t finish, pd_status status, const char *why,
                     bool is_flush) {
    if (is_flush && !sl->is_stop_hit) {
        int64_t n = eng_detok_flush(&sl->detok, s->scratch, s->text_cap);
        if (n > 0) s_feed_text(s, sl, ev, s->scratch, (size_t)n);
        if (!sl->is_stop_hit) {
            n = eng_stop_flush(sl->stop, (char *)ev->text + ev->n_text, s->text_cap - (size_t)ev->n_text);
            PD_ASSERT(n >= 0);
            ev->n_text += (int32_t)n;
        }
    }
    ev->finish = finish;
    ev->status = status;
    if (why) snprintf(ev->err, sizeof ev->err, "%s", why);
    if (sl->state == S_RUNNING) s_list_remove(s->running, &s->n_running, (int32_t)(sl - s->slots));
    if (sl->state == S_PREFILLING) s_list_remove(s->prefilling, &s->n_prefilling, (int32_t)(sl - s->slots));
    if (sl->state == S_WAITING_KV) s->n_waiting--;
    s->n_finished++;
    if (sl->is_in_plan)
        sl->state = S_FINISHED;
    else
        s_slot_free(s, sl);
}

/* A token joins the sequence: stream its text, then decide whether the request ends here. */
static void s_emit(dc_sched_t *s, s_slot_t *sl, const eng_sample_result_t *r, int32_t token, uint64_t now_us,
                   dc_event_t *ev) {
    sl->n_tokens++, sl->n_generated++;
    sl->last_token = token;
    if (sl->hist) {
        PD_ASSERT(sl->n_tokens <= sl->hist_cap); /* hist_cap = prompt + max_tokens, the most a request reaches */
        sl->hist[sl->n_tokens - 1] = token;
    }
    eng_sampler_add_generated(sl->sampler, token);
    s->n_tokens_generated++;
    s_event_init(ev, sl, s);
    ev->token = token;
    if (r) {
        ev->logprob = r->logprob;
        ev->n_top = r->n_top < sl->n_logprobs ? r->n_top : sl->n_logprobs;
        memcpy(ev->top, r->top, sizeof r->top[0] * (size_t)ev->n_top);
    }
    bool is_eog = !sl->is_ignore_eos && eng_tok_is_eog(s->p.tok, token);
    if (!is_eog) {
        int64_t n = eng_detok_push(&sl->detok, s->p.tok, token, s->scratch, s->text_cap);
        PD_ASSERT(n >= 0); /* ids are checked against the vocabulary before they get here */
        s_feed_text(s, sl, ev, s->scratch, (size_t)n);
    }
    if (is_eog || sl->is_stop_hit)
        s_finish(s, sl, ev, DC_FINISH_STOP, PD_OK, NULL, true);
    else if (sl->n_generated >= sl->max_tokens || sl->n_tokens >= s->p.max_context)
        s_finish(s, sl, ev, DC_FINISH_LENGTH, PD_OK, NULL, true);
    else if (sl->deadline_us && now_us >= sl->deadline_us)
        s_finish(s, sl, ev, DC_FINISH_ERROR, PD_ETIMEDOUT, "deadline passed", true);
}

/* ---- requests ---- */

static pd_status s_check_req(const dc_sched_t *s, const dc_req_params_t *rp, char *err, size_t err_cap) {
    char why[160];
    if (rp->req_id == 0 || s_find(s, rp->req_id)) {
        s_err(err, err_cap, "req_id %llx is zero or already held", (unsigned long long)rp->req_id);
        return PD_EINVAL;
    }
    if (rp->n_prompt_tokens < 1 || rp->n_prompt_tokens >= s->p.max_context) {
        s_err(err, err_cap, "prompt of %d tokens: must be in [1, %d)", rp->n_prompt_tokens, s->p.max_context);
        return PD_EINVAL;
    }
    if (rp->spec_k < -1) {
        s_err(err, err_cap, "spec_k %d must be >= -1", rp->spec_k);
        return PD_EINVAL;
    }
    if (rp->max_tokens < 1 || rp->n_stops < 0 || rp->n_stops > ENG_STOP_MAX || (rp->n_stops > 0 && !rp->stops)) {
        s_err(err, err_cap, "max_tokens %d must be >= 1, stops %d in [0, %d]", rp->max_tokens, rp->n_stops,
              ENG_STOP_MAX);
        return PD_EINVAL;
    }
    if (eng_sampling_validate(&rp->sampling, why, sizeof why) != PD_OK) {
        s_err(err, err_cap, "sampling: %s", why);
        return PD_EINVAL;
    }
    int32_t need = eng_kv_blocks_for(rp->n_prompt_tokens, s->p.block_size);
    if (need > eng_kv_pool_n_blocks(s->p.pool)) {
        s_err(err, err_cap, "prompt of %d tokens needs %d blocks, the pool has %d", rp->n_prompt_tokens, need,
              eng_kv_pool_n_blocks(s->p.pool));
        return PD_EINVAL;
    }
    if (rp->is_prefill_local && (!rp->prompt || s->p.prefill_chunk_tokens == 0)) {
        s_err(err, err_cap, "local prefill needs the prompt%s",
              rp->prompt ? " (disabled: prefill_chunk_tokens 0)" : "");
        return PD_EINVAL;
    }
    if (rp->prompt)
        for (int32_t i = 0; i < rp->n_prompt_tokens; i++)
            if (rp->prompt[i] < 0 || rp->prompt[i] >= s->p.vocab_size) {
                s_err(err, err_cap, "prompt token %d out of range", rp->prompt[i]);
                return PD_EINVAL;
            }
    return PD_OK;
}

/* A new sequence's acceptance: the worker's recent acceptance (all) as its prior, kept within [0.02, 0.98] so it can
 * move. */
static dc_spec_acc_t s_acc_new(const dc_spec_acc_t *all) {
    const float prior = dc_spec_acc_rate(all);
    return (dc_spec_acc_t){.prior = prior < 0.02f ? 0.02f : prior > 0.98f ? 0.98f : prior};
}

pd_status dc_sched_reserve(dc_sched_t *s, const dc_req_params_t *rp, char *err, size_t err_cap) {
    if (!s || !rp) return PD_EINVAL;
    pd_status st = s_check_req(s, rp, err, err_cap);
    if (st != PD_OK) return st;
    s_slot_t *sl = NULL;
    for (int32_t i = 0; i < s->p.max_seqs && !sl; i++)
        if (s->slots[i].state == S_FREE) sl = &s->slots[i];
    /* admission: keep watermark_blocks free for the running sequences' next blocks */
    int32_t need = eng_kv_blocks_for(rp->n_prompt_tokens, s->p.block_size);
    if (!sl || eng_kv_pool_n_free(s->p.pool) - need < s->p.watermark_blocks) {
        s->n_refused++;
        s_err(err, err_cap,
              sl ? "KV capacity: %d blocks wanted, %d free, %d kept for running sequences"
                 : "too many requests (%d wanted, %d free, %d kept)",
              need, eng_kv_pool_n_free(s->p.pool), s->p.watermark_blocks);
        return PD_EAGAIN;
    }
    char why[160] = "";
    sl->stop = eng_stop_create(rp->stops, rp->n_stops, why, sizeof why);
    sl->sampler = sl->stop ? eng_sampler_create(&rp->sampling, s->p.vocab_size) : NULL;
    if (!sl->stop || !sl->sampler) {
        s_err(err, err_cap, "%s", sl->stop ? "sampler: out of memory" : why);
        st = sl->stop ? PD_ENOMEM : PD_EINVAL;
        goto fail;
    }
    st = eng_kv_seq_reserve(&sl->kv, s->p.pool, s->p.block_size, rp->n_prompt_tokens);
    if (st != PD_OK) {
        s_err(err, err_cap, "KV blocks: %s", pd_strerror(st));
        goto fail;
    }
    if (rp->prompt) {
        eng_sampler_add_prompt(sl->sampler, rp->prompt, rp->n_prompt_tokens);
        /* the history holds what a request can reach: its prompt plus max_tokens (or the context) */
        int64_t cap = (int64_t)rp->n_prompt_tokens + rp->max_tokens;
        sl->hist_cap = (int32_t)(cap < s->p.max_context ? cap : s->p.max_context);
        sl->hist = pd_xmalloc(sizeof *sl->hist * (size_t)sl->hist_cap);
        memcpy(sl->hist, rp->prompt, sizeof *sl->hist * (size_t)rp->n_prompt_tokens);
    }
    sl->spec_k = s->p.spec == DC_SPEC_OFF || !rp->prompt      ? 0
                 : rp->spec_k < 0 || rp->spec_k > s->p.spec_k ? s->p.spec_k
                                                              : rp->spec_k;
    sl->acc = s_acc_new(&s->acc_all);
    sl->acc_short = s_acc_new(&s->acc_all_short);
    sl->is_short = false;
    sl->n_draft_cached = 0;
    sl->ev_seq = 0;
    eng_detok_init(&sl->detok);
    sl->req_id = rp->req_id;
    sl->n_prompt = sl->n_tokens = rp->n_prompt_tokens;
    sl->n_prefilled = 0;
    sl->n_logprobs = rp->sampling.n_logprobs;
    sl->n_generated = 0;
    sl->max_tokens = rp->max_tokens;
    sl->last_token = -1;
    sl->is_ignore_eos = rp->ignore_eos;
    sl->is_in_plan = sl->is_stop_hit = false;
    sl->deadline_us = rp->deadline_us;
    if (rp->is_prefill_local) {
        sl->state = S_PREFILLING;
        s->prefilling[s->n_prefilling++] = (int32_t)(sl - s->slots);
    } else {
        sl->state = S_WAITING_KV;
        s->n_waiting++;
    }
    return PD_OK;
fail:
    s_slot_free(s, sl);
    return st;
}

const int32_t *dc_sched_blocks(const dc_sched_t *s, uint64_t req_id, int32_t *n_blocks) {
    const s_slot_t *sl = s ? s_find(s, req_id) : NULL;
    if (n_blocks) *n_blocks = sl ? sl->kv.n_blocks : 0;
    return sl ? sl->kv.blocks : NULL;
}

dc_req_state_t dc_sched_req_state(const dc_sched_t *s, uint64_t req_id) {
    const s_slot_t *sl = s ? s_find(s, req_id) : NULL;
    if (!sl) return DC_REQ_NONE;
    return sl->state == S_WAITING_KV   ? DC_REQ_WAITING_KV
           : sl->state == S_PREFILLING ? DC_REQ_PREFILLING
                                       : DC_REQ_RUNNING;
}

static bool s_first_ok(const dc_sched_t *s, const eng_sample_result_t *first) {
    if (first->token < 0 || first->token >= s->p.vocab_size || first->n_top < 0 || first->n_top > ENG_MAX_LOGPROBS)
        return false;
    for (int32_t i = 0; i < first->n_top; i++)
        if (first->top[i].token < 0 || first->top[i].token >= s->p.vocab_size) return false;
    return true;
}

pd_status dc_sched_admit(dc_sched_t *s, uint64_t req_id, const eng_sample_result_t *first, uint64_t now_us,
                         dc_event_t *ev) {
    s_slot_t *sl = s && ev && first ? s_find(s, req_id) : NULL;
    if (!sl || sl->state != S_WAITING_KV || !s_first_ok(s, first)) return PD_EINVAL;
    sl->state = S_RUNNING;
    s->n_waiting--;
    s->running[s->n_running++] = (int32_t)(sl - s->slots);
    /* prefill's sampler (same seed) drew the first token: continue its random stream, not restart it */
    eng_sampler_skip_draw(sl->sampler);
    s_emit(s, sl, first, first->token, now_us, ev);
    return PD_OK;
}

pd_status dc_sched_cancel(dc_sched_t *s, uint64_t req_id, pd_status reason, dc_event_t *ev) {
    s_slot_t *sl = s && ev ? s_find(s, req_id) : NULL;
    if (!sl) return PD_EINVAL;
    s_event_init(ev, sl, s);
    char why[96];
    snprintf(why, sizeof why, "cancelled (%s)", pd_strerror(reason));
    bool is_cancel = reason == PD_ECLOSED || reason == PD_OK;
    s_finish(s, sl, ev, is_cancel ? DC_FINISH_CANCELLED : DC_FINISH_ERROR, is_cancel ? PD_ECLOSED : reason, why, false);
    return PD_OK;
}

/* ---- steps ---- */

void dc_plan_init(dc_plan_t *plan, const dc_sched_t *s) {
    memset(plan, 0, sizeof *plan);
    plan->cap_seqs = s->p.max_batch_seqs + s->p.max_prefill_seqs;
    plan->cap_tokens = s->p.max_batch_seqs * DC_MAX_TOKENS_PER_SEQ + s->p.prefill_chunk_tokens;
    size_t ns = (size_t)plan->cap_seqs, nt = (size_t)plan->cap_tokens;
    plan->req_ids = pd_xcalloc(ns, sizeof *plan->req_ids);
    plan->slots = pd_xcalloc(ns, sizeof *plan->slots);
    plan->n_tokens = pd_xcalloc(ns, sizeof *plan->n_tokens);
    plan->pos = pd_xcalloc(ns, sizeof *plan->pos);
    plan->block_tables = pd_xcalloc(ns, sizeof *plan->block_tables);
    plan->n_blocks = pd_xcalloc(ns, sizeof *plan->n_blocks);
    plan->tokens = pd_xcalloc(nt, sizeof *plan->tokens);
    plan->want_logits = pd_xcalloc(nt, sizeof *plan->want_logits);
    plan->n_draft = pd_xcalloc(ns, sizeof *plan->n_draft);
    plan->draft_k = pd_xcalloc(ns, sizeof *plan->draft_k);
    plan->draft_n_in = pd_xcalloc(ns, sizeof *plan->draft_n_in);
    plan->draft_pos = pd_xcalloc(ns, sizeof *plan->draft_pos);
    plan->hist = pd_xcalloc(ns, sizeof *plan->hist);
    plan->draft_tables = pd_xcalloc(ns, sizeof *plan->draft_tables);
    plan->draft_n_blocks = pd_xcalloc(ns, sizeof *plan->draft_n_blocks);
    plan->draft_cached_out = pd_xcalloc(ns, sizeof *plan->draft_cached_out);
    plan->draft_props = pd_xcalloc(ns * ENG_DRAFT_MAX, sizeof *plan->draft_props);
    plan->draft_n_props = pd_xcalloc(ns, sizeof *plan->draft_n_props);
    plan->samplers = pd_xcalloc(ns, sizeof *plan->samplers);
    plan->smp_rows = pd_xcalloc(nt, sizeof *plan->smp_rows);
    plan->samples = pd_xcalloc(nt, sizeof *plan->samples);
}

void dc_plan_fini(dc_plan_t *plan) {
    if (!plan) return;
    free(plan->req_ids), free(plan->slots), free(plan->n_tokens), free(plan->pos);
    free((void *)plan->block_tables), free(plan->n_blocks), free(plan->tokens), free(plan->want_logits);
    free(plan->n_draft), free(plan->draft_k), free(plan->draft_n_in), free(plan->draft_pos), free((void *)plan->hist);
    free((void *)plan->draft_tables), free(plan->draft_n_blocks), free(plan->draft_cached_out);
    free(plan->draft_props), free(plan->draft_n_props);
    free((void *)plan->samplers), free(plan->smp_rows), free(plan->samples), free(plan->smp_pen);
    memset(plan, 0, sizeof *plan);
}

pd_status dc_plan_set_drafts(dc_plan_t *plan, int32_t row, const int32_t *drafts, int32_t n) {
    if (!plan || row < 0 || row >= plan->n_decode_rows || plan->n_draft[row] != 0 || n < 0 || (n > 0 && !drafts) ||
        1 + n > DC_MAX_TOKENS_PER_SEQ || plan->n_tokens[row] != 1 || plan->n_tokens_total + n > plan->cap_tokens)
        return PD_EINVAL;
    if (n == 0) return PD_OK;
    int32_t t0 = 0;
    for (int32_t i = 0; i < row; i++) t0 += plan->n_tokens[i];
    /* the row's first token stays at t0 (its logits were wanted already); everything after moves right by n */
    int32_t tail = plan->n_tokens_total - (t0 + 1);
    memmove(plan->tokens + t0 + 1 + n, plan->tokens + t0 + 1, sizeof *plan->tokens * (size_t)tail);
    memmove(plan->want_logits + t0 + 1 + n, plan->want_logits + t0 + 1, (size_t)tail);
    memcpy(plan->tokens + t0 + 1, drafts, sizeof *drafts * (size_t)n);
    memset(plan->want_logits + t0 + 1, 1, (size_t)n);
    plan->n_tokens[row] += n;
    plan->n_draft[row] = n;
    plan->n_tokens_total += n;
    plan->n_logits += n;
    return PD_OK;
}

/* One request per logits row (dc_plan_batch without logits). */
static void s_plan_sampling(dc_plan_t *plan) {
    int64_t need = 0;
    for (int32_t i = 0, t = 0; i < plan->n_seqs; t += plan->n_tokens[i++])
        for (int32_t j = 0; j < plan->n_tokens[i]; j++)
            if (plan->want_logits[t + j]) need += eng_sampler_penalties_max(plan->samplers[i], j);
    if (need > plan->smp_pen_cap) {
        plan->smp_pen_cap = need * 2;
        free(plan->smp_pen);
        plan->smp_pen = pd_xmalloc(sizeof *plan->smp_pen * (size_t)plan->smp_pen_cap);
    }
    int32_t r = 0;
    int64_t off = 0;
    double u[DC_MAX_TOKENS_PER_SEQ];
    for (int32_t i = 0, t = 0; i < plan->n_seqs; t += plan->n_tokens[i++]) {
        const eng_sampler_t *smp = plan->samplers[i];
        /* a decode row's position j follows drafts 0..j-1 (tokens t+1 ..) and takes the sampler's draw j; a
         * prefill row wants at most its last token, the sampler's first draw */
        const bool is_decode = i < plan->n_decode_rows;
        if (is_decode) eng_sampler_peek_draws(smp, u, plan->n_tokens[i]);
        for (int32_t j = 0; j < plan->n_tokens[i]; j++) {
            if (!plan->want_logits[t + j]) continue;
            eng_row_sampling_t *q = &plan->smp_rows[r++];
            const int32_t n_extra = is_decode ? j : 0;
            if (!is_decode) eng_sampler_peek_draws(smp, u, 1);
            q->p = *eng_sampler_params(smp);
            q->u = is_decode ? u[j] : u[0];
            q->pen = plan->smp_pen + off;
            q->n_pen = eng_sampler_penalties(smp, plan->tokens + t + 1, n_extra, plan->smp_pen + off);
            off += q->n_pen;
        }
    }
    PD_ASSERT(r == plan->n_logits && off <= need);
}

eng_batch_t dc_plan_batch(dc_plan_t *plan, float *logits) {
    eng_batch_t b = {.n_seqs = plan->n_seqs,
                     .n_tokens = plan->n_tokens,
                     .pos = plan->pos,
                     .block_tables = (const int32_t *const *)plan->block_tables,
                     .n_blocks = plan->n_blocks,
                     .tokens = plan->tokens,
                     .want_logits = plan->want_logits,
                     .logits = logits};
    plan->is_sampled = !logits;
    if (!logits) {
        s_plan_sampling(plan);
        b.sampling = plan->smp_rows;
        b.samples = plan->samples;
    }
    return b;
}

/* Makes running[i]'s table cover its next input. When the pool is dry, the newest-admitted running
 * sequence gives its blocks up (finishes with an error), down to running[i] itself. Returns whether
 * running[i] survived (else it has been removed from the list). */
static bool s_grow(dc_sched_t *s, int32_t i, dc_event_t *events, int cap, int *n_ev) {
    s_slot_t *sl = &s->slots[s->running[i]];
    for (;;) {
        pd_status st = eng_kv_seq_reserve(&sl->kv, s->p.pool, s->p.block_size, sl->n_tokens);
        if (st == PD_OK) return true;
        PD_ASSERT(*n_ev < cap);
        dc_event_t *ev = &events[(*n_ev)++];
        if (st != PD_EAGAIN) {
            LOG_E("req=%llx KV table: %s", (unsigned long long)sl->req_id, pd_strerror(st));
            s_event_init(ev, sl, s);
            s_finish(s, sl, ev, DC_FINISH_ERROR, st, "KV block table", true);
            return false;
        }
        s_slot_t *victim = &s->slots[s->running[s->n_running - 1]];
        s_event_init(ev, victim, s);
        s->n_preempted++;
        LOG_W("req=%llx preempted at %d tokens: KV capacity exhausted (%d running)", (unsigned long long)victim->req_id,
              victim->n_tokens, s->n_running);
        bool is_self = victim == sl;
        s_finish(s, victim, ev, DC_FINISH_ERROR, PD_EAGAIN, "KV capacity exhausted", true);
        if (is_self) return false;
    }
}

/* Finishes, with an ERROR PD_ETIMEDOUT event each, the requests of list (running or prefilling) whose
 * deadline passed. */
static int s_expire(dc_sched_t *s, const int32_t *list, int32_t *n, uint64_t now_us, dc_event_t *events) {
    int n_ev = 0;
    for (int32_t i = 0; i < *n;) {
        s_slot_t *sl = &s->slots[list[i]];
        if (!sl->deadline_us || now_us < sl->deadline_us) {
            i++;
            continue;
        }
        dc_event_t *ev = &events[n_ev++];
        s_event_init(ev, sl, s);
        s_finish(s, sl, ev, DC_FINISH_ERROR, PD_ETIMEDOUT, "deadline passed", true); /* removes list[i] */
    }
    return n_ev;
}

/* Appends a row of n tokens at pos for slot to the plan (tokens copied; want_logits on the last one only
 * when is_logits). */
static void s_plan_row(dc_plan_t *plan, const s_slot_t *sl, int32_t slot, int32_t pos, const int32_t *tokens, int32_t n,
                       bool is_logits) {
    int32_t r = plan->n_seqs++, t = plan->n_tokens_total;
    PD_ASSERT(r < plan->cap_seqs && t + n <= plan->cap_tokens);
    plan->req_ids[r] = sl->req_id;
    plan->slots[r] = slot;
    plan->n_tokens[r] = n;
    plan->pos[r] = pos;
    plan->block_tables[r] = sl->kv.blocks;
    plan->n_blocks[r] = sl->kv.n_blocks;
    memcpy(plan->tokens + t, tokens, sizeof *tokens * (size_t)n);
    memset(plan->want_logits + t, 0, (size_t)n);
    plan->n_draft[r] = plan->draft_k[r] = plan->draft_n_in[r] = plan->draft_pos[r] = plan->draft_n_blocks[r] = 0;
    plan->draft_cached_out[r] = -1;
    plan->draft_tables[r] = NULL;
    plan->hist[r] = sl->hist;
    plan->samplers[r] = sl->sampler;
    if (is_logits) {
        plan->want_logits[t + n - 1] = 1;
        plan->n_logits++;
    }
    plan->n_tokens_total += n;
}

/* Most drafts row sl can use this step: its own k, and no draft past the context or past max_tokens (a row emits
 * at most 1 + drafts tokens). */
static int32_t s_row_k_max(const dc_sched_t *s, const s_slot_t *sl) {
    int32_t k = sl->spec_k;
    int32_t by_len = sl->max_tokens - sl->n_generated - 1, by_ctx = s->p.max_context - sl->n_tokens;
    k = k < by_len ? k : by_len;
    return k < by_ctx ? k : by_ctx;
}

/* Draft candidates of decode row i: what the n-gram lookup finds, or for a draft model the row's k (it proposes
 * as many as asked). */
static int32_t s_spec_candidates(dc_sched_t *s, int32_t i, const dc_plan_t *plan) {
    s_slot_t *sl = &s->slots[plan->slots[i]];
    int32_t k = s_row_k_max(s, sl);
    s->sp_short[i] = false;
    if (k <= 0 || s->p.spec == DC_SPEC_DRAFT) return k > 0 ? k : 0;
    int32_t *out = s->sp_drafts + (size_t)i * DC_MAX_TOKENS_PER_SEQ;
    if (!sl->ngram_ix) sl->ngram_ix = eng_ngram_index_create(); /* NULL (no memory): the lookups scan */
    const int32_t n =
        eng_ngram_index_lookup(sl->ngram_ix, sl->hist, sl->n_tokens, s->p.ngram_min, s->p.ngram_max, k, out);
    if (n > 0 || s->p.ngram_short_k <= 0 || s->p.ngram_min <= 1) return n;
    s->sp_short[i] = true;
    return eng_ngram_index_lookup(sl->ngram_ix, sl->hist, sl->n_tokens, 1, 1,
                                  k < s->p.ngram_short_k ? k : s->p.ngram_short_k, out);
}

/* A drafting row's draft-model catch-up: the history it has not seen, within what is left of this step's budget.
 * Only rows the allocation gave drafts catch up (a draft model that does not pay never reads the prompts). Returns
 * the drafts the row keeps: k once it has seen the whole history, 0 while it is still catching up (a long prompt
 * takes a few steps) or when its draft blocks cannot be had. */
static int32_t s_draft_catchup(dc_sched_t *s, dc_plan_t *plan, int32_t i, int32_t k, int32_t *budget) {
    s_slot_t *sl = &s->slots[plan->slots[i]];
    int32_t need = sl->n_tokens - sl->n_draft_cached, n_in = need < *budget ? need : *budget;
    if (n_in <= 0 ||
        eng_kv_seq_reserve(&sl->draft_kv, s->p.draft_pool, s->p.draft_block_size, sl->n_draft_cached + n_in) != PD_OK)
        return 0;
    plan->draft_n_in[i] = n_in;
    plan->draft_pos[i] = sl->n_draft_cached;
    *budget -= n_in;
    return n_in == need ? k : 0;
}

/* Speculation for the decode rows of a planned step: candidates per row, adaptive k over the batch
 * (dc_spec_allocate), blocks for the drafted positions (never preempting anyone for a draft: a row gets fewer
 * drafts instead), then the n-gram drafts go into the plan; a draft model's are the executor's to add. Whether the
 * step drafts at all (the guard, the probes) is settled first: a step without drafts looks nothing up. The lookups
 * (an n-gram search of each row's history) are host time between two steps, while the GPU waits: over a spec bench
 * run on the H100, a decode worker with n-gram drafting spent 68 us between steps against 38 without. */
static void s_plan_spec(dc_sched_t *s, dc_plan_t *plan) {
    int32_t n = plan->n_decode_rows, budget = s->p.draft_catchup_tokens;
    bool is_draft = s->p.spec == DC_SPEC_DRAFT;
    if (s->p.spec == DC_SPEC_OFF || n == 0 || (!s->has_cost && !s->p.spec_fixed_k)) return;
    /* probes (DC_SPEC_EXPLORE): one step drafts as the startup calibration would, whatever the refitted model and
     * the guard say (once they say drafts do not pay, the steps stop varying and neither could learn that drafts pay
     * again); another has no drafts, so the guard's comparison stays current */
    bool is_explore = false, is_off = false;
    if (!s->p.spec_fixed_k) {
        const int64_t plan_no = ++s->n_spec_plans, phase = plan_no % (2 * DC_SPEC_EXPLORE);
        is_explore = s->is_guard_off ? phase % DC_SPEC_EXPLORE == 0 : dc_spec_guard_probe_due(&s->guard, n, plan_no);
        const bool is_probe_off = phase == DC_SPEC_EXPLORE && !s->is_guard_off;
        is_off = is_probe_off || (!is_explore && !s->is_guard_off && !dc_spec_guard_allows(&s->guard, n));
    }
    for (int32_t i = 0; i < n; i++) {
        if (is_off) {
            s->sp_k[i] = 0, s->sp_short[i] = false;
            continue;
        }
        const s_slot_t *sl = &s->slots[plan->slots[i]];
        s->sp_avail[i] = s_spec_candidates(s, i, plan);
        s->sp_acc[i] = dc_spec_acc_rate(s->sp_short[i] ? &sl->acc_short : &sl->acc);
        if (is_draft) { /* history the draft model has not read yet, spread over the tokens the row has left */
            const int32_t lag = sl->n_tokens - sl->n_draft_cached - 1, left = sl->max_tokens - sl->n_generated;
            s->sp_extra[i] = lag > 0 ? (float)(lag * s->cost.draft_token_us / (left > 1 ? left : 1)) : 0.0f;
        }
    }
    if (s->p.spec_fixed_k) {
        for (int32_t i = 0, left = s->p.spec_max_step_drafts; i < n; i++) {
            s->sp_k[i] = s->sp_avail[i] < left ? s->sp_avail[i] : left;
            left -= s->sp_k[i];
        }
    } else if (!is_off) {
        dc_spec_allocate(is_explore ? &s->cost_calibrated : &s->cost, is_draft, n, s->sp_acc, s->sp_avail,
                         is_draft ? s->sp_extra : NULL, plan->n_tokens_total, s->p.spec_max_step_drafts, s->sp_k);
    }
    int32_t bs = s->p.block_size;
    for (int32_t i = 0; i < n; i++) {
        s_slot_t *sl = &s->slots[plan->slots[i]];
        int32_t k = s->sp_k[i];
        if (is_draft && k > 0) k = s_draft_catchup(s, plan, i, k, &budget);
        if (k > 0 && eng_kv_seq_reserve(&sl->kv, s->p.pool, bs, sl->n_tokens + k) != PD_OK) {
            int32_t room = sl->kv.n_blocks * bs - sl->n_tokens; /* drafts that fit the blocks it has */
            k = room < k ? room : k;
        }
        if (is_draft && k > 1 &&
            eng_kv_seq_reserve(&sl->draft_kv, s->p.draft_pool, s->p.draft_block_size, sl->n_tokens + k - 1) != PD_OK) {
            int32_t room = sl->draft_kv.n_blocks * s->p.draft_block_size - sl->n_tokens + 1;
            k = room < k ? room : k;
        }
        sl->is_short = s->sp_short[i];
        if (k <= 0) dc_spec_acc_idle(&sl->acc), dc_spec_acc_idle(&sl->acc_short);
        plan->block_tables[i] = sl->kv.blocks; /* the table may have grown (and moved) */
        plan->n_blocks[i] = sl->kv.n_blocks;
        if (is_draft) {
            plan->draft_k[i] = k > 0 ? k : 0;
            plan->draft_tables[i] = sl->draft_kv.blocks;
            plan->draft_n_blocks[i] = sl->draft_kv.n_blocks;
        } else if (k > 0) {
            pd_status st = dc_plan_set_drafts(plan, i, s->sp_drafts + (size_t)i * DC_MAX_TOKENS_PER_SEQ, k);
            PD_ASSERT(st == PD_OK); /* a decode row of one token, k < DC_MAX_TOKENS_PER_SEQ, capacity planned */
        }
    }
}

int dc_sched_plan(dc_sched_t *s, uint64_t now_us, dc_plan_t *plan, dc_event_t *events, int cap) {
    if (!s || !plan || !events || plan->is_in_flight || cap < s->p.max_seqs ||
        plan->cap_seqs < s->p.max_batch_seqs + s->p.max_prefill_seqs ||
        plan->cap_tokens < s->p.max_batch_seqs * DC_MAX_TOKENS_PER_SEQ + s->p.prefill_chunk_tokens)
        return PD_EINVAL;
    /* deadlines of running and prefilling requests (waiting ones are bounded by kvtransfer's own timeout) */
    int n_ev = s_expire(s, s->running, &s->n_running, now_us, events);
    n_ev += s_expire(s, s->prefilling, &s->n_prefilling, now_us, events + n_ev);
    plan->n_seqs = plan->n_tokens_total = plan->n_logits = 0;
    plan->is_sampled = false;
    for (int32_t i = 0; i < s->n_running && plan->n_seqs < s->p.max_batch_seqs;) {
        if (!s_grow(s, i, events, cap, &n_ev)) continue; /* running[i] is now the next one */
        int32_t slot = s->running[i++];
        s_slot_t *sl = &s->slots[slot];
        s_plan_row(plan, sl, slot, sl->n_tokens - 1, &sl->last_token, 1, true);
        sl->is_in_plan = true;
    }
    plan->n_decode_rows = plan->n_seqs;
    /* local prefill after the decode rows, so that a long prompt only ever takes its budget of a step */
    int32_t budget = s->p.prefill_chunk_tokens;
    for (int32_t i = 0, n_rows = 0; i < s->n_prefilling && budget > 0 && n_rows < s->p.max_prefill_seqs; i++) {
        int32_t slot = s->prefilling[i];
        s_slot_t *sl = &s->slots[slot];
        int32_t n = sl->n_prompt - sl->n_prefilled < budget ? sl->n_prompt - sl->n_prefilled : budget;
        bool is_last = sl->n_prefilled + n == sl->n_prompt;
        s_plan_row(plan, sl, slot, sl->n_prefilled, sl->hist + sl->n_prefilled, n, is_last);
        sl->is_in_plan = true;
        budget -= n;
        n_rows++;
    }
    s_plan_spec(s, plan);
    plan->is_in_flight = plan->n_seqs > 0;
    return n_ev;
}

/* Ends the plan's execution for row i's request; returns it if it is still alive, else NULL (a request
 * finished while its row ran gets its blocks back only now). */
static s_slot_t *s_row_done(dc_sched_t *s, const dc_plan_t *plan, int32_t i) {
    s_slot_t *sl = &s->slots[plan->slots[i]];
    PD_ASSERT(sl->is_in_plan && sl->req_id == plan->req_ids[i]);
    sl->is_in_plan = false;
    if (sl->state == S_RUNNING || sl->state == S_PREFILLING) return sl;
    PD_ASSERT(sl->state == S_FINISHED);
    s_slot_free(s, sl);
    return NULL;
}

/* A local prefill ran its last chunk: the request decodes from now on, newest admission. */
static void s_prefill_done(dc_sched_t *s, s_slot_t *sl) {
    int32_t slot = (int32_t)(sl - s->slots);
    s_list_remove(s->prefilling, &s->n_prefilling, slot);
    sl->state = S_RUNNING;
    s->running[s->n_running++] = slot;
}

/* Samples logits row `row` of the step for sl (or takes the engine's sample of it, consuming the same draw) and
 * emits the token (then sl->last_token); false when the request ended with it (sl is then gone). */
static bool s_sample_emit(dc_sched_t *s, s_slot_t *sl, const dc_plan_t *plan, const float *logits, int32_t row,
                          uint64_t now_us, dc_event_t *ev) {
    eng_sample_result_t r;
    pd_status st = PD_EINVAL;
    if (!logits) {
        r = plan->samples[row];
        if (r.token >= 0 && r.token < s->p.vocab_size) st = PD_OK, eng_sampler_skip_draw(sl->sampler);
    } else {
        st = eng_sampler_sample(sl->sampler, logits + (size_t)row * (size_t)s->p.vocab_size, &r);
    }
    if (st != PD_OK) {
        LOG_E("req=%llx logits not finite at position %d", (unsigned long long)sl->req_id, sl->n_tokens - 1);
        s_event_init(ev, sl, s);
        s_finish(s, sl, ev, DC_FINISH_ERROR, PD_EBACKEND, "logits not finite", true);
        return false;
    }
    s_emit(s, sl, &r, r.token, now_us, ev);
    return sl->state == S_RUNNING;
}

/* The worker-wide acceptance (new sequences' prior): counted like dc_spec_acc_observe, decaying slowly (about the
 * last 200 verified rows count). */
static void s_observe_all(dc_spec_acc_t *all, int32_t proposed, int32_t accepted) {
    const int32_t tested = accepted < proposed ? accepted + 1 : accepted;
    all->n_ok = all->n_ok * 0.995f + (float)accepted;
    all->n_tested = all->n_tested * 0.995f + (float)tested;
}

/* Verifies decode row i: position j's token is sampled from the target's logits row j with the request's own
 * sampler (penalties see the tokens accepted before it), exactly as plain decoding would; draft j is kept only
 * when it is that token, and the first token that differs ends the row (dc_spec.h: why this is lossless).
 * Every kept token is emitted as its own event, with stop strings, EOS and max_tokens checked in order. Then the
 * rejected positions are rolled back: blocks past the new length go back to the pool, and the draft model
 * keeps only the positions that were accepted. Returns the events written. */
static int s_verify(dc_sched_t *s, s_slot_t *sl, const dc_plan_t *plan, int32_t i, const int32_t *drafts,
                    const float *logits, int32_t first_row, uint64_t now_us, dc_event_t *events) {
    int32_t n_draft = plan->n_draft[i], n_old = sl->n_tokens, accepted = 0;
    int n_ev = 0;
    s->n_decode_rows++;
    if (n_draft > 0) s->n_spec_rows++, s->n_draft_tokens += (uint64_t)n_draft;
    for (int32_t j = 0; j <= n_draft; j++) {
        if (!s_sample_emit(s, sl, plan, logits, first_row + j, now_us, &events[n_ev++]))
            return n_ev; /* finished: blocks and draft state are gone with it */
        if (j == n_draft || sl->last_token != drafts[j]) break;
        accepted++;
        s->n_accepted_tokens++;
    }
    dc_spec_acc_observe(sl->is_short ? &sl->acc_short : &sl->acc, n_draft, accepted);
    if (n_draft > 0) s_observe_all(sl->is_short ? &s->acc_all_short : &s->acc_all, n_draft, accepted);
    eng_kv_seq_truncate(&sl->kv, s->p.pool, s->p.block_size, sl->n_tokens);
    if (s->p.draft_pool) {
        int32_t out = plan->draft_cached_out[i], valid = n_old + accepted;
        if (out >= 0) sl->n_draft_cached = out < valid ? out : valid;
        eng_kv_seq_truncate(&sl->draft_kv, s->p.draft_pool, s->p.draft_block_size, sl->n_tokens);
    }
    return n_ev;
}

int dc_sched_update(dc_sched_t *s, dc_plan_t *plan, const float *logits, uint64_t now_us, dc_event_t *events, int cap) {
    if (!s || !plan || (!plan->is_in_flight && plan->n_seqs > 0)) return PD_EINVAL;
    if (!plan->is_in_flight) return 0;
    int32_t max_events = plan->n_seqs; /* one per row, plus one per draft */
    for (int32_t i = 0; i < plan->n_decode_rows; i++) max_events += plan->n_draft[i];
    if ((!logits && !plan->is_sampled) || !events || cap < max_events) return PD_EINVAL;
    if (plan->is_sampled) logits = NULL; /* the engine sampled: plan->samples */
    const uint64_t rows0 = s->n_decode_rows, drafts0 = s->n_draft_tokens, accepted0 = s->n_accepted_tokens;
    int n_ev = 0;
    int32_t row = 0, t = 0;
    for (int32_t i = 0; i < plan->n_seqs; i++) {
        /* the row's logits rows: one per draft plus one for a decode row, the last token's for the last chunk
         * of a local prefill, none for its other chunks */
        int32_t first_row = row, t0 = t;
        for (int32_t k = 0; k < plan->n_tokens[i]; k++, t++)
            if (plan->want_logits[t]) row++;
        s_slot_t *sl = s_row_done(s, plan, i);
        if (!sl) continue;
        if (i < plan->n_decode_rows) {
            n_ev += s_verify(s, sl, plan, i, plan->tokens + t0 + 1, logits, first_row, now_us, events + n_ev);
            continue;
        }
        PD_ASSERT(sl->state == S_PREFILLING);
        sl->n_prefilled += plan->n_tokens[i];
        if (sl->n_prefilled < sl->n_prompt) continue;
        s_prefill_done(s, sl);
        PD_ASSERT(row > first_row);
        (void)s_sample_emit(s, sl, plan, logits, row - 1, now_us, &events[n_ev++]);
    }
    s->step_rows = (int64_t)(s->n_decode_rows - rows0), s->step_drafts = (int64_t)(s->n_draft_tokens - drafts0);
    s->step_accepted = (int64_t)(s->n_accepted_tokens - accepted0);
    plan->is_in_flight = false;
    return n_ev;
}

int dc_sched_plan_abort(dc_sched_t *s, dc_plan_t *plan, pd_status status, dc_event_t *events, int cap) {
    if (!s || !plan || (plan->is_in_flight && (!events || cap < plan->n_seqs))) return PD_EINVAL;
    if (!plan->is_in_flight) return 0;
    int n_ev = 0;
    for (int32_t i = 0; i < plan->n_seqs; i++) {
        s_slot_t *sl = s_row_done(s, plan, i);
        if (!sl) continue;
        dc_event_t *ev = &events[n_ev++];
        s_event_init(ev, sl, s);
        s_finish(s, sl, ev, DC_FINISH_ERROR, status, "forward failed", true);
    }
    plan->is_in_flight = false;
    return n_ev;
}

void dc_sched_stats(const dc_sched_t *s, dc_sched_stats_t *out) {
    *out = (dc_sched_stats_t){.n_waiting = s->n_waiting,
                              .n_running = s->n_running,
                              .n_prefilling = s->n_prefilling,
                              .n_free_blocks = eng_kv_pool_n_free(s->p.pool),
                              .n_total_blocks = eng_kv_pool_n_blocks(s->p.pool),
                              .n_tokens_generated = s->n_tokens_generated,
                              .n_finished = s->n_finished,
                              .n_preempted = s->n_preempted,
                              .n_refused = s->n_refused,
                              .n_decode_rows = s->n_decode_rows,
                              .n_spec_rows = s->n_spec_rows,
                              .n_draft_tokens = s->n_draft_tokens,
                              .n_accepted_tokens = s->n_accepted_tokens};
}

void dc_sched_spec_set_cost(dc_sched_t *s, const dc_spec_cost_t *c) {
    s->cost = *c;
    if (s->cost.scale <= 0) s->cost.scale = 1;
    s->cost_calibrated = s->cost;
    s->has_cost = true;
}

void dc_sched_spec_observe(dc_sched_t *s, int32_t n_tokens, double verify_us, double cycle_us) {
    if (s->has_cost) dc_spec_cost_observe(&s->cost, n_tokens, verify_us);
    if (s->p.spec != DC_SPEC_OFF && s->step_rows > 0 && cycle_us > 0)
        dc_spec_guard_observe(&s->guard, (int32_t)s->step_rows, (int32_t)s->step_drafts,
                              (int32_t)(s->step_rows + s->step_accepted), cycle_us);
}
