/* pf_sched.c: the prefill scheduler (policy and contracts in pf_sched.h). Request slots and plan arrays
 * are allocated once at create; per request only the prompt copy, its block table and (at completion) its
 * sampler are allocated. Does not run the forward, send KV, or read a clock. */
#include "pf_sched.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd_log.h"

typedef enum { S_FREE = 0, S_QUEUED, S_PREFILLING, S_SENDING } s_state_t;

typedef struct {
    uint64_t req_id;
    s_state_t state;
    bool is_cancelled; /* SENDING or in the running step: free at pf_sched_sent / pf_sched_update */
    bool is_in_step;   /* part of the outstanding plan */
    bool is_pinned;    /* a transfer reads the blocks: every end goes through SENDING (pf_sched_pin) */
    int32_t *tokens;   /* (n_prompt) owned copy */
    int32_t n_prompt;
    int32_t n_done; /* prompt tokens whose KV is written */
    eng_sampling_t sampling;
    uint64_t deadline_us;
    eng_kv_seq_t seq;   /* blocks for the whole prompt, reserved at admission */
    int32_t prev, next; /* FIFO of QUEUED and PREFILLING requests in arrival order, -1 ends */
    int32_t next_free;  /* free-slot stack */
} s_req_t;

struct pf_sched {
    pf_sched_params_t p;
    s_req_t *reqs; /* (n_slots) */
    int32_t n_slots;
    int32_t free_top; /* free-slot stack head, -1 = none */
    int32_t fifo_head, fifo_tail;
    int32_t n_queued, n_prefilling, n_sending;
    bool is_step_out; /* a plan awaits pf_sched_update */
    pf_sched_stats_t st;

    /* the plan and its arrays */
    pf_plan_t plan;
    int32_t *slot_of;        /* (max_step_seqs) request slot of each plan sequence */
    uint64_t *req_ids;       /* (max_step_seqs) */
    int32_t *n_tokens, *pos; /* (max_step_seqs) */
    const int32_t **tables;  /* (max_step_seqs) */
    int32_t *n_blocks;       /* (max_step_seqs) */
    uint8_t *is_final;       /* (max_step_seqs) */
    int32_t *tokens;         /* (step_tokens) */
    uint8_t *want;           /* (step_tokens) */
    uint64_t *expired;       /* (n_slots) */
    char err[192];           /* why the last pf_sched_submit was PD_EINVAL */
};

pf_sched_params_t pf_sched_params_default(void) {
    pf_sched_params_t p = {0};
    p.step_tokens = 8192;
    p.max_chunk_tokens = 2048;
    p.max_step_seqs = 256;
    p.max_queued = 256;
    p.max_active = 1024;
    return p;
}

void pf_sched_params_from_engine(pf_sched_params_t *p, eng_t *e) {
    p->pool = eng_kv_pool(e);
    p->block_size = eng_kv_layout(e)->block_size;
    p->vocab_size = eng_config(e)->vocab_size;
    p->max_prompt_tokens = eng_config(e)->ctx_len;
    if (p->step_tokens > eng_max_batch_tokens(e)) p->step_tokens = eng_max_batch_tokens(e);
}

pf_sched_t *pf_sched_create(const pf_sched_params_t *p) {
    if (!p->pool || p->block_size < 1 || p->vocab_size < 1 || p->max_prompt_tokens < 1 || p->step_tokens < 1 ||
        p->max_chunk_tokens < 1 || p->max_step_seqs < 1 || p->max_queued < 1 || p->max_active < 1) {
        LOG_E("prefill sched: bad params (pool %p block_size %d vocab %d max_prompt %d step_tokens %d chunk %d "
              "seqs %d queued %d active %d)",
              (void *)p->pool, p->block_size, p->vocab_size, p->max_prompt_tokens, p->step_tokens, p->max_chunk_tokens,
              p->max_step_seqs, p->max_queued, p->max_active);
        return NULL;
    }
    pf_sched_t *s = pd_xcalloc(1, sizeof *s);
    s->p = *p;
    /* a request can only be admitted into a step slot it fits, so more seqs than tokens is pointless */
    if (s->p.max_step_seqs > s->p.step_tokens) s->p.max_step_seqs = s->p.step_tokens;
    s->n_slots = p->max_queued + p->max_active;
    s->reqs = pd_xcalloc((size_t)s->n_slots, sizeof *s->reqs);
    for (int32_t i = 0; i < s->n_slots; i++) s->reqs[i].next_free = i + 1 < s->n_slots ? i + 1 : -1;
    s->free_top = 0;
    s->fifo_head = s->fifo_tail = -1;
    size_t ns = (size_t)s->p.max_step_seqs, nt = (size_t)s->p.step_tokens;
    s->slot_of = pd_xmalloc(ns * sizeof *s->slot_of);
    s->req_ids = pd_xmalloc(ns * sizeof *s->req_ids);
    s->n_tokens = pd_xmalloc(ns * sizeof *s->n_tokens);
    s->pos = pd_xmalloc(ns * sizeof *s->pos);
    s->tables = pd_xmalloc(ns * sizeof *s->tables);
    s->n_blocks = pd_xmalloc(ns * sizeof *s->n_blocks);
    s->is_final = pd_xmalloc(ns * sizeof *s->is_final);
    s->tokens = pd_xmalloc(nt * sizeof *s->tokens);
    s->want = pd_xmalloc(nt * sizeof *s->want);
    s->expired = pd_xmalloc((size_t)s->n_slots * sizeof *s->expired);
    return s;
}

/* ---- request slots and the FIFO ---- */

static int32_t s_find(const pf_sched_t *s, uint64_t req_id) {
    /* TODO: a hash from req_id to slot if this linear scan (~1k slots, per cancel/sent) shows in profiles */
    for (int32_t i = 0; i < s->n_slots; i++)
        if (s->reqs[i].state != S_FREE && s->reqs[i].req_id == req_id) return i;
    return -1;
}

static void s_fifo_push(pf_sched_t *s, int32_t i) {
    s->reqs[i].prev = s->fifo_tail, s->reqs[i].next = -1;
    if (s->fifo_tail >= 0)
        s->reqs[s->fifo_tail].next = i;
    else
        s->fifo_head = i;
    s->fifo_tail = i;
}

static void s_fifo_remove(pf_sched_t *s, int32_t i) {
    s_req_t *r = &s->reqs[i];
    if (r->prev >= 0)
        s->reqs[r->prev].next = r->next;
    else
        s->fifo_head = r->next;
    if (r->next >= 0)
        s->reqs[r->next].prev = r->prev;
    else
        s->fifo_tail = r->prev;
    r->prev = r->next = -1;
}

/* Ends a request however it ends: out of the FIFO, every block back to the pool, slot freed. */
static void s_req_free(pf_sched_t *s, int32_t i) {
    s_req_t *r = &s->reqs[i];
    PD_ASSERT(r->state != S_FREE && !r->is_in_step);
    if (r->state == S_QUEUED || r->state == S_PREFILLING) s_fifo_remove(s, i);
    if (r->state == S_QUEUED) s->n_queued--;
    if (r->state == S_PREFILLING) s->n_prefilling--;
    if (r->state == S_SENDING) s->n_sending--;
    if (r->state != S_SENDING) s->st.queued_tokens -= r->n_prompt - r->n_done;
    eng_kv_seq_release(&r->seq, s->p.pool);
    eng_kv_seq_fini(&r->seq);
    free(r->tokens);
    memset(r, 0, sizeof *r);
    r->next_free = s->free_top;
    s->free_top = i;
}

void pf_sched_destroy(pf_sched_t **sp) {
    if (!sp || !*sp) return;
    pf_sched_t *s = *sp;
    for (int32_t i = 0; i < s->n_slots; i++) {
        s->reqs[i].is_in_step = false;
        if (s->reqs[i].state != S_FREE) s_req_free(s, i);
    }
    free(s->reqs), free(s->slot_of), free(s->req_ids), free(s->n_tokens), free(s->pos), free(s->tables);
    free(s->n_blocks), free(s->is_final), free(s->tokens), free(s->want), free(s->expired);
    free(s);
    *sp = NULL;
}

/* ---- submit ---- */

/* Index of the first token id outside [0, vocab_size), or -1. */
static int32_t s_bad_token(const pf_sched_t *s, const int32_t *tokens, int32_t n) {
    for (int32_t i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= s->p.vocab_size) return i;
    return -1;
}

/* On refusal the reason goes to s->err (pf_sched_error) and to one log line. */
static pd_status s_check_prompt(pf_sched_t *s, uint64_t req_id, const int32_t *tokens, int32_t n,
                                const eng_sampling_t *sampling) {
    char why[160];
    int32_t bad = -1;
    if (!tokens || n < 1 || n > s->p.max_prompt_tokens)
        snprintf(s->err, sizeof s->err, "prompt of %d tokens (allowed 1..%d)", n, s->p.max_prompt_tokens);
    else if (eng_kv_blocks_for(n, s->p.block_size) > eng_kv_pool_n_blocks(s->p.pool))
        snprintf(s->err, sizeof s->err, "%d tokens need %d KV blocks, the pool has %d", n,
                 eng_kv_blocks_for(n, s->p.block_size), eng_kv_pool_n_blocks(s->p.pool));
    else if ((bad = s_bad_token(s, tokens, n)) >= 0)
        snprintf(s->err, sizeof s->err, "token %d at %d out of range [0, %d)", tokens[bad], bad, s->p.vocab_size);
    else if (!sampling || eng_sampling_validate(sampling, why, sizeof why) != PD_OK)
        snprintf(s->err, sizeof s->err, "sampling: %s", sampling ? why : "missing");
    else if (s_find(s, req_id) >= 0)
        snprintf(s->err, sizeof s->err, "duplicate request id");
    if (!s->err[0]) return PD_OK;
    LOG_W("req=%016llx refused: %s", (unsigned long long)req_id, s->err);
    return PD_EINVAL;
}

pd_status pf_sched_submit(pf_sched_t *s, uint64_t req_id, const int32_t *tokens, int32_t n_tokens,
                          const eng_sampling_t *sampling, uint64_t deadline_us) {
    s->err[0] = '\0';
    if (s->n_queued >= s->p.max_queued) {
        s->st.n_rejected_full++;
        return PD_EAGAIN;
    }
    if (s_check_prompt(s, req_id, tokens, n_tokens, sampling) != PD_OK) {
        s->st.n_rejected_invalid++;
        return PD_EINVAL;
    }
    /* n_queued < max_queued and active <= max_active leave a slot */
    int32_t i = s->free_top;
    PD_ASSERT(i >= 0);
    s_req_t *r = &s->reqs[i];
    s->free_top = r->next_free;
    memset(r, 0, sizeof *r);
    r->req_id = req_id;
    r->state = S_QUEUED;
    r->tokens = pd_xmalloc(sizeof(int32_t) * (size_t)n_tokens);
    memcpy(r->tokens, tokens, sizeof(int32_t) * (size_t)n_tokens);
    r->n_prompt = n_tokens;
    r->sampling = *sampling;
    r->deadline_us = deadline_us;
    s_fifo_push(s, i);
    s->n_queued++;
    s->st.queued_tokens += n_tokens;
    s->st.n_submitted++;
    return PD_OK;
}

/* ---- plan ---- */

static void s_expire(pf_sched_t *s, uint64_t now_us) {
    s->plan.n_expired = 0;
    for (int32_t i = s->fifo_head, next; i >= 0; i = next) {
        next = s->reqs[i].next;
        if (s->reqs[i].deadline_us == 0 || now_us < s->reqs[i].deadline_us) continue;
        LOG_I("req=%016llx deadline passed after %d of %d prompt tokens", (unsigned long long)s->reqs[i].req_id,
              s->reqs[i].n_done, s->reqs[i].n_prompt);
        s->expired[s->plan.n_expired++] = s->reqs[i].req_id;
        s->st.n_expired++;
        s_req_free(s, i);
    }
}

/* Admits the QUEUED request i (its whole prompt's blocks, all or nothing). false: it waits, and by
 * strict FCFS so does everyone behind it. */
static bool s_admit(pf_sched_t *s, int32_t i) {
    s_req_t *r = &s->reqs[i];
    if (s->n_prefilling + s->n_sending >= s->p.max_active) return false;
    if (eng_kv_seq_reserve(&r->seq, s->p.pool, s->p.block_size, r->n_prompt) != PD_OK) return false;
    r->state = S_PREFILLING;
    s->n_queued--, s->n_prefilling++;
    return true;
}

static int32_t s_min(int32_t a, int32_t b) {
    return a < b ? a : b;
}

/* Lays out the token, position and logits arrays once the chunk sizes are final. */
static void s_plan_fill(pf_sched_t *s) {
    pf_plan_t *pl = &s->plan;
    int32_t nt = 0, nl = 0;
    for (int32_t k = 0; k < pl->n_seqs; k++) {
        s_req_t *r = &s->reqs[s->slot_of[k]];
        int32_t n = s->n_tokens[k];
        s->req_ids[k] = r->req_id;
        s->pos[k] = r->n_done;
        s->tables[k] = r->seq.blocks;
        s->n_blocks[k] = r->seq.n_blocks;
        s->is_final[k] = r->n_done + n == r->n_prompt;
        memcpy(s->tokens + nt, r->tokens + r->n_done, sizeof(int32_t) * (size_t)n);
        memset(s->want + nt, 0, (size_t)n);
        if (s->is_final[k]) s->want[nt + n - 1] = 1, nl++;
        r->is_in_step = true;
        nt += n;
    }
    pl->n_tokens_total = nt;
    pl->n_logits = nl;
}

pd_status pf_sched_plan(pf_sched_t *s, uint64_t now_us, const pf_plan_t **out) {
    if (s->is_step_out) {
        LOG_E("prefill sched: plan %llu still awaits pf_sched_update", (unsigned long long)s->plan.step);
        return PD_EINVAL;
    }
    pf_plan_t *pl = &s->plan;
    pl->n_seqs = pl->n_tokens_total = pl->n_logits = 0;
    s_expire(s, now_us);

    /* pass 1, admission order: each request its first share, capped so later ones get a chunk too */
    int32_t budget = s->p.step_tokens;
    for (int32_t i = s->fifo_head; i >= 0 && budget > 0 && pl->n_seqs < s->p.max_step_seqs; i = s->reqs[i].next) {
        s_req_t *r = &s->reqs[i];
        if (r->state == S_QUEUED && !s_admit(s, i)) break;
        int32_t n = s_min(s_min(r->n_prompt - r->n_done, s->p.max_chunk_tokens), budget);
        s->slot_of[pl->n_seqs] = i;
        s->n_tokens[pl->n_seqs++] = n;
        budget -= n;
    }
    /* pass 2: budget nobody claimed goes back in the same order, so the step stays full */
    for (int32_t k = 0; k < pl->n_seqs && budget > 0; k++) {
        s_req_t *r = &s->reqs[s->slot_of[k]];
        int32_t more = s_min(r->n_prompt - r->n_done - s->n_tokens[k], budget);
        s->n_tokens[k] += more;
        budget -= more;
    }
    s_plan_fill(s);

    pl->req_ids = s->req_ids, pl->n_tokens = s->n_tokens, pl->pos = s->pos, pl->block_tables = s->tables;
    pl->n_blocks = s->n_blocks, pl->is_final = s->is_final, pl->tokens = s->tokens, pl->want_logits = s->want;
    pl->expired_ids = s->expired;
    if (pl->n_seqs > 0) {
        pl->step++;
        s->st.n_steps++;
        s->is_step_out = true;
    }
    *out = pl;
    return PD_OK;
}

void pf_plan_batch(const pf_plan_t *plan, float *logits, eng_batch_t *out) {
    memset(out, 0, sizeof *out);
    out->n_seqs = plan->n_seqs;
    out->n_tokens = plan->n_tokens;
    out->pos = plan->pos;
    out->block_tables = plan->block_tables;
    out->n_blocks = plan->n_blocks;
    out->tokens = plan->tokens;
    out->want_logits = plan->want_logits;
    out->logits = logits;
}

/* ---- update, sent, cancel ---- */

static pf_event_t *s_event(pf_event_t *ev, int *n_ev, pf_event_kind_t kind, uint64_t req_id, pd_status st) {
    pf_event_t *e = &ev[(*n_ev)++];
    memset(e, 0, sizeof *e);
    e->kind = kind, e->req_id = req_id, e->status = st;
    return e;
}

/* The prompt of slot i is complete: sample its first token with its own sampler. */
static pd_status s_sample_first(pf_sched_t *s, s_req_t *r, const float *row, eng_sample_result_t *res) {
    eng_sampler_t *smp = eng_sampler_create(&r->sampling, s->p.vocab_size);
    if (!smp) return PD_ENOMEM;
    eng_sampler_add_prompt(smp, r->tokens, r->n_prompt);
    pd_status st = eng_sampler_sample(smp, row, res);
    eng_sampler_destroy(&smp);
    return st;
}

/* PREFILLING slot i leaves the FIFO for SENDING: its blocks stay until pf_sched_sent. */
static void s_to_sending(pf_sched_t *s, int32_t i) {
    s_req_t *r = &s->reqs[i];
    s_fifo_remove(s, i);
    s->st.queued_tokens -= r->n_prompt - r->n_done; /* SENDING holds no queued tokens */
    r->state = S_SENDING;
    s->n_prefilling--, s->n_sending++;
}

/* Ends PREFILLING slot i after its step: freed, or SENDING when a transfer may still read its blocks. */
static void s_end_in_step(pf_sched_t *s, int32_t i) {
    if (s->reqs[i].is_pinned)
        s_to_sending(s, i);
    else
        s_req_free(s, i);
}

pd_status pf_sched_pin(pf_sched_t *s, uint64_t req_id) {
    int32_t i = s_find(s, req_id);
    if (i < 0 || !s->is_step_out || !s->reqs[i].is_in_step) return PD_EINVAL;
    for (int32_t k = 0; k < s->plan.n_seqs; k++)
        if (s->slot_of[k] == i) {
            if (!s->is_final[k]) return PD_EINVAL;
            s->reqs[i].is_pinned = true;
            return PD_OK;
        }
    return PD_EINVAL;
}

int pf_sched_update(pf_sched_t *s, const pf_plan_t *plan, pd_status step_status, const float *logits,
                    pf_event_t *events, int cap) {
    if (plan != &s->plan) return PD_EINVAL;
    if (!s->is_step_out) return plan->n_seqs == 0 ? 0 : PD_EINVAL;
    if (cap < plan->n_seqs || (step_status == PD_OK && plan->n_logits > 0 && !logits)) return PD_ERANGE;
    s->is_step_out = false;
    int n_ev = 0, row = 0;
    for (int32_t k = 0; k < plan->n_seqs; k++) {
        int32_t i = s->slot_of[k];
        s_req_t *r = &s->reqs[i];
        const float *lg = plan->is_final[k] ? logits + (size_t)row++ * (size_t)s->p.vocab_size : NULL;
        r->is_in_step = false;
        if (r->is_cancelled) {
            s_end_in_step(s, i);
            continue;
        }
        if (step_status != PD_OK) {
            s_event(events, &n_ev, PF_EV_FAILED, r->req_id, step_status);
            s->st.n_failed++;
            s_end_in_step(s, i);
            continue;
        }
        r->n_done += plan->n_tokens[k];
        s->st.queued_tokens -= plan->n_tokens[k];
        s->st.n_prefill_tokens += (uint64_t)plan->n_tokens[k];
        if (!lg) continue;
        eng_sample_result_t res;
        pd_status st = s_sample_first(s, r, lg, &res);
        if (st != PD_OK) {
            LOG_E("req=%016llx first token: %s (bad logits?)", (unsigned long long)r->req_id, pd_strerror(st));
            s_event(events, &n_ev, PF_EV_FAILED, r->req_id, PD_EBACKEND);
            s->st.n_failed++;
            s_end_in_step(s, i);
            continue;
        }
        s_to_sending(s, i);
        s->st.n_ready++;
        pf_event_t *e = s_event(events, &n_ev, PF_EV_READY, r->req_id, PD_OK);
        e->n_tokens = r->n_prompt;
        e->n_blocks = r->seq.n_blocks;
        e->block_ids = r->seq.blocks;
        e->first = res;
    }
    return n_ev;
}

pd_status pf_sched_sent(pf_sched_t *s, uint64_t req_id, pd_status status) {
    int32_t i = s_find(s, req_id);
    if (i < 0 || s->reqs[i].state != S_SENDING) return PD_EINVAL;
    if (status == PD_OK)
        s->st.n_sent_ok++;
    else
        s->st.n_sent_failed++;
    s_req_free(s, i);
    return PD_OK;
}

pd_status pf_sched_cancel(pf_sched_t *s, uint64_t req_id, bool *is_sending) {
    int32_t i = s_find(s, req_id);
    if (is_sending) *is_sending = false;
    if (i < 0) return PD_EINVAL;
    s_req_t *r = &s->reqs[i];
    if ((r->state == S_SENDING || r->is_pinned) && is_sending) *is_sending = true;
    if (r->is_cancelled) return PD_OK;
    s->st.n_cancelled++;
    if (r->state == S_SENDING || r->is_in_step)
        r->is_cancelled = true; /* someone still reads or writes its blocks */
    else
        s_req_free(s, i);
    return PD_OK;
}

const char *pf_sched_error(const pf_sched_t *s) {
    return s->err;
}

void pf_sched_stats(const pf_sched_t *s, pf_sched_stats_t *out) {
    *out = s->st;
    out->n_queued = s->n_queued;
    out->n_prefilling = s->n_prefilling;
    out->n_sending = s->n_sending;
    out->n_free_blocks = eng_kv_pool_n_free(s->p.pool);
    out->n_blocks = eng_kv_pool_n_blocks(s->p.pool);
}
