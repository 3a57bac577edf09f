/* eng_draft.h: draft proposers for speculative decoding: n-gram prompt lookup, and a draft model (a second,
 * smaller GGUF with the target's tokenizer) run over a batch of sequences. They only propose token ids; which
 * proposals are verified, and how, is the decode service's business (decode/dc_spec.h, dc_sched.h).
 *
 * A draft model keeps its own paged KV (its own eng_t and pool; the caller owns the block tables, as for the
 * target). Per call, for every row: one batched forward feeds the row's history the draft has not seen yet (its
 * catch-up: a whole prompt the first time, then the tokens accepted since) and proposes the first draft; then one
 * batched forward per further depth, one token per row still drafting. Drafts are greedy (the argmax of the
 * draft's logits, ties to the lowest id): point-mass proposals, which verification by sampling accepts with
 * exactly the target's probability of that token. */
#ifndef ENG_DRAFT_H
#define ENG_DRAFT_H

#include <stddef.h>
#include <stdint.h>

#include "eng.h"
#include "pd_common.h"

#define ENG_DRAFT_MAX 16 /* most proposals per row and call */

/* n-gram prompt lookup: finds the most recent earlier occurrence in hist[0..n_hist) of hist's last n tokens,
 * trying n = n_max down to n_min, and copies up to k tokens that followed it into out. Returns how many (0: no
 * match). The history is the prompt plus the generated tokens, so a document quoted by the answer is found, and
 * so is a loop in the answer itself. O(n_hist * n_max), no allocation. */
int32_t eng_draft_ngram(const int32_t *hist, int32_t n_hist, int32_t n_min, int32_t n_max, int32_t k, int32_t *out);

/* The same lookup for one history that grows between calls (the decode scheduler's row: prompt, then each accepted
 * token), from an index of the n-grams seen so far (eng_draft_ngram.c): amortised O(n) per new token and n asked,
 * instead of a scan of the whole history per call. eng_ngram_index_lookup returns exactly what eng_draft_ngram would
 * for the same arguments, provided hist only grew since the previous call on ix (or since eng_ngram_index_reset);
 * give a new history a reset first. n_max over ENG_NGRAM_INDEX_MAX_N, or ix NULL, or no memory: it scans. */
#define ENG_NGRAM_INDEX_MAX_N 8
typedef struct eng_ngram_index eng_ngram_index_t;
eng_ngram_index_t *eng_ngram_index_create(void); /* NULL when out of memory */
void eng_ngram_index_reset(eng_ngram_index_t *ix);
void eng_ngram_index_destroy(eng_ngram_index_t **ix);
int32_t eng_ngram_index_lookup(eng_ngram_index_t *ix, const int32_t *hist, int32_t n_hist, int32_t n_min, int32_t n_max,
                               int32_t k, int32_t *out);

typedef struct eng_drafter eng_drafter_t;

/* draft and target are borrowed and outlive d. Refused (NULL, one line in err) when the draft's tokenizer is not
 * the target's (vocabulary size and eng_tok_hash: drafts are token ids, so both must mean the same thing by
 * them) or when its batch limits are below max_rows rows / max_tokens tokens per forward. */
eng_drafter_t *eng_drafter_create(eng_t *draft, const eng_t *target, int32_t max_rows, int32_t max_tokens, char *err,
                                  size_t err_cap);
void eng_drafter_destroy(eng_drafter_t **d);

/* One call's rows. Row i's draft KV holds positions [0, pos[i]); the call feeds hist[i][pos[i] .. pos[i]+n_in[i])
 * (n_in >= 1, or 0 to skip the row), then proposes k[i] tokens (0..ENG_DRAFT_MAX; 0 = catch-up only), the first
 * continuing position pos[i]+n_in[i]. The block table must cover pos[i] + n_in[i] + max(k[i] - 1, 0) positions. */
typedef struct {
    int32_t n_rows;
    const int32_t *const *hist;
    const int32_t *pos, *n_in, *k;
    const int32_t *const *block_tables;
    const int32_t *n_blocks;
    int32_t *drafts;     /* out: (n_rows, ENG_DRAFT_MAX), row i's proposals first */
    int32_t *n_drafts;   /* out: (n_rows) proposals made (k[i], fewer only if a forward failed) */
    int32_t *cached_out; /* out: (n_rows) positions the draft KV now holds; pos[i] for a skipped row */
} eng_draft_batch_t;

/* Runs the rows (Thread: the one that drives the draft engine). A forward that fails ends the call there: rows
 * keep what was proposed before it (logged, at most once a second). Returns the proposals made in all. */
int32_t eng_drafter_run(eng_drafter_t *d, const eng_draft_batch_t *b);

#endif
