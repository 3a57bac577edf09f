/* eng_draft.c: n-gram lookup and draft-model proposals (see eng_draft.h). */
#include "eng_draft.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_sample.h"
#include "pd_log.h"

int32_t eng_draft_ngram(const int32_t *hist, int32_t n_hist, int32_t n_min, int32_t n_max, int32_t k, int32_t *out) {
    if (!hist || !out || k < 1 || n_min < 1 || n_max < n_min) return 0;
    for (int32_t n = n_max < n_hist - 1 ? n_max : n_hist - 1; n >= n_min; n--) {
        const int32_t *tail = hist + n_hist - n;
        /* the most recent occurrence that ends before the tail itself does, and has at least one follower */
        for (int32_t start = n_hist - n - 1; start >= 0; start--) {
            if (hist[start] != tail[0] || memcmp(hist + start, tail, sizeof *tail * (size_t)n)) continue;
            int32_t from = start + n, m = n_hist - from < k ? n_hist - from : k;
            memcpy(out, hist + from, sizeof *out * (size_t)m);
            return m;
        }
    }
    return 0;
}

struct eng_drafter {
    eng_t *e;
    int32_t max_rows, max_tokens;
    /* one draft forward's batch: (max_rows) rows, (max_tokens) tokens */
    int32_t *row_of; /* the call's row of each batch row */
    int32_t *n_tok, *pos, *n_blocks, *tokens;
    const int32_t **tables;
    uint8_t *want;
    /* greedy, sampled by the engine (on the GPU for CUDA: no logits rows cross to the host) */
    eng_row_sampling_t *greedy; /* (max_rows) */
    eng_sample_result_t *picks; /* (max_rows) */
    uint64_t last_fail_log_us;
};

eng_drafter_t *eng_drafter_create(eng_t *draft, const eng_t *target, int32_t max_rows, int32_t max_tokens, char *err,
                                  size_t err_cap) {
    if (!draft || !target || max_rows < 1 || max_tokens < max_rows) {
        snprintf(err, err_cap, "eng_drafter: bad params");
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
    eng_drafter_t *d = pd_xcalloc(1, sizeof *d);
    d->e = draft;
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
    d->greedy = pd_xcalloc(nr, sizeof *d->greedy);
    d->picks = pd_xcalloc(nr, sizeof *d->picks);
    for (size_t r = 0; r < nr; r++) {
        d->greedy[r].p = eng_sampling_default();
        d->greedy[r].p.temperature = 0.0f;
    }
    return d;
}

void eng_drafter_destroy(eng_drafter_t **dp) {
    if (!dp || !*dp) return;
    eng_drafter_t *d = *dp;
    free(d->row_of), free(d->n_tok), free(d->pos), free(d->n_blocks), free((void *)d->tables);
    free(d->tokens), free(d->want), free(d->greedy), free(d->picks), free(d);
    *dp = NULL;
}

/* Runs the n batch rows; false (logged at most once a second) when the forward fails. */
static bool s_forward(eng_drafter_t *d, int32_t n) {
    eng_batch_t b = {.n_seqs = n,
                     .n_tokens = d->n_tok,
                     .pos = d->pos,
                     .block_tables = (const int32_t *const *)d->tables,
                     .n_blocks = d->n_blocks,
                     .tokens = d->tokens,
                     .want_logits = d->want,
                     .sampling = d->greedy,
                     .samples = d->picks};
    pd_status st = eng_forward(d->e, &b);
    if (st == PD_OK) return true;
    uint64_t now = pd_now_us();
    if (now - d->last_fail_log_us > 1000000u) {
        LOG_E("draft model forward failed (%s): no more drafts this step", pd_strerror(st));
        d->last_fail_log_us = now;
    }
    return false;
}

int32_t eng_drafter_run(eng_drafter_t *d, const eng_draft_batch_t *b) {
    int32_t n = 0, t = 0, max_k = 0, total = 0;
    for (int32_t i = 0; i < b->n_rows; i++) {
        b->n_drafts[i] = 0;
        b->cached_out[i] = b->pos[i];
    }
    /* depth 1: every row's catch-up, logits on its last token when it drafts */
    for (int32_t i = 0; i < b->n_rows; i++) {
        int32_t n_in = b->n_in[i], k = b->k[i] < ENG_DRAFT_MAX ? b->k[i] : ENG_DRAFT_MAX;
        if (n_in <= 0) continue;
        if (n >= d->max_rows || t + n_in > d->max_tokens) break; /* sized by the caller: cannot happen */
        d->row_of[n] = i;
        d->n_tok[n] = n_in;
        d->pos[n] = b->pos[i];
        d->tables[n] = b->block_tables[i];
        d->n_blocks[n] = b->n_blocks[i];
        memcpy(d->tokens + t, b->hist[i] + b->pos[i], sizeof *d->tokens * (size_t)n_in);
        memset(d->want + t, 0, (size_t)n_in);
        d->want[t + n_in - 1] = k > 0;
        if (k > max_k) max_k = k;
        t += n_in;
        n++;
    }
    if (n == 0 || !s_forward(d, n)) return 0;
    for (int32_t r = 0, row = 0; r < n; r++) {
        int32_t i = d->row_of[r];
        b->cached_out[i] = d->pos[r] + d->n_tok[r];
        if (b->k[i] <= 0) continue;
        int32_t tok = d->picks[row++].token;
        if (tok < 0) continue; /* logits not finite: no draft for this row */
        b->drafts[(size_t)i * ENG_DRAFT_MAX] = tok;
        b->n_drafts[i] = 1;
        total++;
    }
    /* further depths: each row still drafting feeds its previous draft at the position after it */
    for (int32_t depth = 1; depth < max_k; depth++) {
        n = 0;
        for (int32_t i = 0; i < b->n_rows; i++) {
            if (b->n_drafts[i] != depth || b->k[i] <= depth) continue;
            d->row_of[n] = i;
            d->n_tok[n] = 1;
            d->pos[n] = b->cached_out[i];
            d->tables[n] = b->block_tables[i];
            d->n_blocks[n] = b->n_blocks[i];
            d->tokens[n] = b->drafts[(size_t)i * ENG_DRAFT_MAX + depth - 1];
            d->want[n] = 1;
            n++;
        }
        if (n == 0 || !s_forward(d, n)) break;
        for (int32_t r = 0; r < n; r++) {
            int32_t i = d->row_of[r], tok = d->picks[r].token;
            b->cached_out[i] = d->pos[r] + 1;
            if (tok < 0) continue; /* logits not finite: the row stops drafting here */
            b->drafts[(size_t)i * ENG_DRAFT_MAX + depth] = tok;
            b->n_drafts[i] = depth + 1;
            total++;
        }
    }
    return total;
}
