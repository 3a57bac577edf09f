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
    int32_t *prompt;     /* (n_prompt) PREFILLING only: the input of the local prefill */
    int32_t n_logprobs;  /* top logprobs the client asked for */
    int32_t n_tokens;    /* prompt + generated; the last one is the next step's input */
    int32_t n_generated; /* prefill's first token included */
    int32_t max_tokens;
    int32_t last_token;
    bool is_ignore_eos;
    bool is_in_plan;
    bool is_stop_hit;
    uint64_t deadline_us;
    eng_sampler_t *sampler;
    eng_stop_t *stop;
    eng_detok_t detok;
    char *text; /* (text_cap) this request's latest event text */
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
                               .max_prefill_seqs = 4};
}

dc_req_params_t dc_req_params_default(void) {
    dc_req_params_t r = {.max_tokens = 16, .sampling = eng_sampling_default()};
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
    dc_sched_t *s = pd_xcalloc(1, sizeof *s);
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
    for (int32_t i = 0; i < p->max_seqs; i++) s->slots[i].text = pd_xmalloc(s->text_cap);
    return s;
}

const dc_sched_params_t *dc_sched_params(const dc_sched_t *s) {
    return &s->p;
}

static void s_slot_free(dc_sched_t *s, s_slot_t *sl) {
    eng_kv_seq_release(&sl->kv, s->p.pool);
    eng_sampler_destroy(&sl->sampler);
    eng_stop_destroy(&sl->stop);
    free(sl->prompt);
    sl->prompt = NULL;
    sl->state = S_FREE;
    sl->is_in_plan = false;
}

void dc_sched_destroy(dc_sched_t **sp) {
    if (!sp || !*sp) return;
    dc_sched_t *s = *sp;
    for (int32_t i = 0; i < s->p.max_seqs; i++) {
        if (s->slots[i].state != S_FREE) s_slot_free(s, &s->slots[i]);
        eng_kv_seq_fini(&s->slots[i].kv);
        free(s->slots[i].text);
    }
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

static void s_event_init(dc_event_t *ev, const s_slot_t *sl) {
    memset(ev, 0, offsetof(dc_event_t, err) + 1);
    ev->req_id = sl->req_id;
    ev->token = -1;
    ev->logprob = NAN;
    ev->text = sl->text;
    ev->stop_index = -1;
    ev->n_generated = sl->n_generated;
}

/* Appends n bytes of decoded text to the event through stop matching. */
static void s_feed_text(dc_sched_t *s, s_slot_t *sl, dc_event_t *ev, const char *bytes, size_t n) {
    if (sl->is_stop_hit) return;
    bool is_hit = false;
    int64_t w = eng_stop_feed(sl->stop, bytes, n, sl->text + ev->n_text, s->text_cap - (size_t)ev->n_text, &is_hit);
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
            n = eng_stop_flush(sl->stop, sl->text + ev->n_text, s->text_cap - (size_t)ev->n_text);
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
    eng_sampler_add_generated(sl->sampler, token);
    s->n_tokens_generated++;
    s_event_init(ev, sl);
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
    if (rp->prompt) eng_sampler_add_prompt(sl->sampler, rp->prompt, rp->n_prompt_tokens);
    if (rp->is_prefill_local) {
        sl->prompt = pd_xmalloc(sizeof *sl->prompt * (size_t)rp->n_prompt_tokens);
        memcpy(sl->prompt, rp->prompt, sizeof *sl->prompt * (size_t)rp->n_prompt_tokens);
    }
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
    s_event_init(ev, sl);
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
}

void dc_plan_fini(dc_plan_t *plan) {
    if (!plan) return;
    free(plan->req_ids), free(plan->slots), free(plan->n_tokens), free(plan->pos);
    free((void *)plan->block_tables), free(plan->n_blocks), free(plan->tokens), free(plan->want_logits);
    memset(plan, 0, sizeof *plan);
}

eng_batch_t dc_plan_batch(const dc_plan_t *plan, float *logits) {
    return (eng_batch_t){.n_seqs = plan->n_seqs,
                         .n_tokens = plan->n_tokens,
                         .pos = plan->pos,
                         .block_tables = (const int32_t *const *)plan->block_tables,
                         .n_blocks = plan->n_blocks,
                         .tokens = plan->tokens,
                         .want_logits = plan->want_logits,
                         .logits = logits};
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
            s_event_init(ev, sl);
            s_finish(s, sl, ev, DC_FINISH_ERROR, st, "KV block table", true);
            return false;
        }
        s_slot_t *victim = &s->slots[s->running[s->n_running - 1]];
        s_event_init(ev, victim);
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
        s_event_init(ev, sl);
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
    if (is_logits) {
        plan->want_logits[t + n - 1] = 1;
        plan->n_logits++;
    }
    plan->n_tokens_total += n;
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
    for (int32_t i = 0; i < s->n_running && plan->n_seqs < s->p.max_batch_seqs;) {
        if (!s_grow(s, i, events, cap, &n_ev)) continue; /* running[i] is now the next one */
        int32_t slot = s->running[i++];
        s_slot_t *sl = &s->slots[slot];
        /* TODO: 1 + k drafts per sequence once speculative decoding lands */
        s_plan_row(plan, sl, slot, sl->n_tokens - 1, &sl->last_token, 1, true);
        sl->is_in_plan = true;
    }
    /* local prefill after the decode rows, so that a long prompt only ever takes its budget of a step */
    int32_t budget = s->p.prefill_chunk_tokens;
    for (int32_t i = 0, n_rows = 0; i < s->n_prefilling && budget > 0 && n_rows < s->p.max_prefill_seqs; i++) {
        int32_t slot = s->prefilling[i];
        s_slot_t *sl = &s->slots[slot];
        int32_t n = sl->n_prompt - sl->n_prefilled < budget ? sl->n_prompt - sl->n_prefilled : budget;
        bool is_last = sl->n_prefilled + n == sl->n_prompt;
        s_plan_row(plan, sl, slot, sl->n_prefilled, sl->prompt + sl->n_prefilled, n, is_last);
        sl->is_in_plan = true;
        budget -= n;
        n_rows++;
    }
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
    free(sl->prompt);
    sl->prompt = NULL;
    sl->state = S_RUNNING;
    s->running[s->n_running++] = slot;
}

int dc_sched_update(dc_sched_t *s, dc_plan_t *plan, const float *logits, uint64_t now_us, dc_event_t *events, int cap) {
    if (!s || !plan || (!plan->is_in_flight && plan->n_seqs > 0)) return PD_EINVAL;
    if (!plan->is_in_flight) return 0;
    if (!logits || !events || cap < plan->n_seqs) return PD_EINVAL;
    int n_ev = 0;
    int32_t row = 0, t = 0;
    for (int32_t i = 0; i < plan->n_seqs; i++) {
        /* the sequence's logits row is its last wanted one (its only one until drafts are verified; none for
         * a prompt chunk that is not the last) */
        int32_t last_row = -1;
        for (int32_t k = 0; k < plan->n_tokens[i]; k++, t++)
            if (plan->want_logits[t]) last_row = row++;
        s_slot_t *sl = s_row_done(s, plan, i);
        if (!sl) continue;
        if (sl->state == S_PREFILLING) {
            sl->n_prefilled += plan->n_tokens[i];
            if (sl->n_prefilled < sl->n_prompt) continue;
            s_prefill_done(s, sl);
        }
        PD_ASSERT(last_row >= 0);
        eng_sample_result_t r;
        dc_event_t *ev = &events[n_ev++];
        if (eng_sampler_sample(sl->sampler, logits + (size_t)last_row * (size_t)s->p.vocab_size, &r) != PD_OK) {
            LOG_E("req=%llx logits not finite at position %d", (unsigned long long)sl->req_id, sl->n_tokens - 1);
            s_event_init(ev, sl);
            s_finish(s, sl, ev, DC_FINISH_ERROR, PD_EBACKEND, "logits not finite", true);
            continue;
        }
        s_emit(s, sl, &r, r.token, now_us, ev);
    }
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
        s_event_init(ev, sl);
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
                              .n_refused = s->n_refused};
}
