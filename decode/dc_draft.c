/* dc_draft.c: draft-model proposals for a planned step (see dc_draft.h). */
#include "dc_draft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd_log.h"

struct dc_draft {
    eng_t *e;
    int32_t vocab, max_rows, max_tokens;
    /* one draft forward's batch, (max_rows) rows and (max_tokens) tokens */
    int32_t *row_of; /* plan row of each batch row */
    int32_t *n_tok, *pos, *n_blocks, *tokens;
    const int32_t **tables;
    uint8_t *want;
    float *logits;  /* (max_rows, vocab) */
    int32_t *props; /* (max_rows of the plan, DC_MAX_TOKENS_PER_SEQ) proposals so far */
    uint64_t last_fail_log_us;
};

dc_draft_t *dc_draft_create(eng_t *draft, const eng_t *target, int32_t max_rows, int32_t max_tokens, char *err,
                            size_t err_cap) {
    if (!draft || !target || max_rows < 1 || max_tokens < max_rows) {
        snprintf(err, err_cap, "dc_draft: bad params");
        return NULL;
    }
    const eng_tok_t *dt = eng_tokenizer(draft), *tt = eng_tokenizer(target);
    int32_t dv = eng_config(draft)->vocab_size, tv = eng_config(target)->vocab_size;
    if (dv != tv || eng_tok_hash(dt) != eng_tok_hash(tt)) {
        snprintf(err, err_cap,
                 "draft model's tokenizer differs from the model's (vocabulary %d vs %d, hash %016llx vs %016llx): "
                 "drafts are token ids, so both must use the same tokenizer",
                 dv, tv, (unsigned long long)eng_tok_hash(dt), (unsigned long long)eng_tok_hash(tt));
        return NULL;
    }
    if (eng_max_batch_tokens(draft) < max_tokens) {
        snprintf(err, err_cap, "draft engine: max_batch_tokens %d < %d needed", eng_max_batch_tokens(draft),
                 max_tokens);
        return NULL;
    }
    dc_draft_t *d = pd_xcalloc(1, sizeof *d);
    d->e = draft;
    d->vocab = dv;
    d->max_rows = max_rows;
    d->max_tokens = max_tokens;
    size_t nr = (size_t)max_rows;
    d->row_of = pd_xcalloc(nr, sizeof *d->row_of);
    d->n_tok = pd_xcalloc(nr, sizeof *d->n_tok);
    d->pos = pd_xcalloc(nr, sizeof *d->pos);
    d->n_blocks = pd_xcalloc(nr, sizeof *d->n_blocks);
    d->tables = pd_xcalloc(nr, sizeof *d->tables);
    d->tokens = pd_xcalloc((size_t)max_tokens, sizeof *d->tokens);
    d->want = pd_xcalloc((size_t)max_tokens, 1);
    d->logits = pd_xmalloc(sizeof *d->logits * nr * (size_t)dv);
    d->props = pd_xcalloc(nr * DC_MAX_TOKENS_PER_SEQ, sizeof *d->props);
    return d;
}

void dc_draft_destroy(dc_draft_t **dp) {
    if (!dp || !*dp) return;
    dc_draft_t *d = *dp;
    free(d->row_of), free(d->n_tok), free(d->pos), free(d->n_blocks), free((void *)d->tables);
    free(d->tokens), free(d->want), free(d->logits), free(d->props), free(d);
    *dp = NULL;
}

/* Greedy draft: the most likely token, ties to the lowest id. */
static int32_t s_argmax(const float *x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Runs the batch of n rows; logits for the rows whose last token is wanted. */
static pd_status s_forward(dc_draft_t *d, int32_t n) {
    eng_batch_t b = {.n_seqs = n,
                     .n_tokens = d->n_tok,
                     .pos = d->pos,
                     .block_tables = (const int32_t *const *)d->tables,
                     .n_blocks = d->n_blocks,
                     .tokens = d->tokens,
                     .want_logits = d->want,
                     .logits = d->logits};
    return eng_forward(d->e, &b);
}

static void s_fail(dc_draft_t *d, pd_status st) {
    uint64_t now = pd_now_us();
    if (now - d->last_fail_log_us > 1000000u) { /* one line per second at most */
        LOG_E("draft model forward failed (%s): this step runs without drafts", pd_strerror(st));
        d->last_fail_log_us = now;
    }
}

int32_t dc_draft_run(dc_draft_t *d, dc_plan_t *plan) {
    int32_t n = 0, t = 0, max_k = 0;
    /* depth 1: every row's catch-up, logits on its last token when it drafts */
    for (int32_t i = 0; i < plan->n_decode_rows; i++) {
        int32_t n_in = plan->draft_n_in[i];
        if (n_in <= 0) continue;
        if (n >= d->max_rows || t + n_in > d->max_tokens) break; /* sized by dc_exec: cannot happen */
        d->row_of[n] = i;
        d->n_tok[n] = n_in;
        d->pos[n] = plan->draft_pos[i];
        d->tables[n] = plan->draft_tables[i];
        d->n_blocks[n] = plan->draft_n_blocks[i];
        memcpy(d->tokens + t, plan->hist[i] + plan->draft_pos[i], sizeof *d->tokens * (size_t)n_in);
        memset(d->want + t, 0, (size_t)n_in);
        d->want[t + n_in - 1] = plan->draft_k[i] > 0;
        if (plan->draft_k[i] > max_k) max_k = plan->draft_k[i];
        t += n_in;
        n++;
    }
    if (n == 0) return 0;
    pd_status st = s_forward(d, n);
    if (st != PD_OK) {
        s_fail(d, st);
        return 0;
    }
    int32_t n_rows = n, row = 0;
    for (int32_t r = 0; r < n_rows; r++) {
        int32_t i = d->row_of[r];
        plan->draft_cached_out[i] = d->pos[r] + d->n_tok[r];
        if (plan->draft_k[i] > 0)
            d->props[(size_t)i * DC_MAX_TOKENS_PER_SEQ] =
                s_argmax(d->logits + (size_t)row++ * (size_t)d->vocab, d->vocab);
    }
    /* depths 2..max_k: one token per row still drafting, at the position after its previous draft's input */
    int32_t depth = 1;
    for (; depth < max_k; depth++) {
        n = 0;
        for (int32_t i = 0; i < plan->n_decode_rows; i++) {
            if (plan->draft_k[i] <= depth || plan->draft_n_in[i] <= 0) continue;
            d->row_of[n] = i;
            d->n_tok[n] = 1;
            d->pos[n] = plan->pos[i] + depth; /* plan->pos[i] is the row's next input: its first draft follows */
            d->tables[n] = plan->draft_tables[i];
            d->n_blocks[n] = plan->draft_n_blocks[i];
            d->tokens[n] = d->props[(size_t)i * DC_MAX_TOKENS_PER_SEQ + depth - 1];
            d->want[n] = 1;
            n++;
        }
        if (n == 0) break;
        st = s_forward(d, n);
        if (st != PD_OK) {
            s_fail(d, st);
            break;
        }
        for (int32_t r = 0; r < n; r++) {
            int32_t i = d->row_of[r];
            plan->draft_cached_out[i] = d->pos[r] + 1;
            d->props[(size_t)i * DC_MAX_TOKENS_PER_SEQ + depth] =
                s_argmax(d->logits + (size_t)r * (size_t)d->vocab, d->vocab);
        }
    }
    /* rows get the drafts proposed up to the depth reached (all of them unless a forward failed) */
    int32_t total = 0;
    for (int32_t i = 0; i < plan->n_decode_rows; i++) {
        int32_t k = plan->draft_k[i] < depth ? plan->draft_k[i] : depth;
        if (k <= 0 || plan->draft_n_in[i] <= 0) continue;
        if (dc_plan_set_drafts(plan, i, d->props + (size_t)i * DC_MAX_TOKENS_PER_SEQ, k) == PD_OK) total += k;
    }
    return total;
}
