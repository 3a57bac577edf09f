/* eng_draft_ngram.c: an incremental index for the n-gram lookup (see eng_draft.h).
 *
 * eng_draft_ngram scans the whole history for every lookup: a few microseconds for a 2k-token RAG prompt, paid per
 * drafting row and step, on the host, between two GPU steps. The index keeps, for each n it has been asked about,
 * a hash table from n-gram to the end position of its latest occurrence, over the ends the history has reached.
 * A lookup indexes up to S_STEP more ends (up to the one before the tail: an occurrence needs a follower), scans the
 * ends not indexed yet (the most recent ones) for the tail's n-gram, and only where none matches reads the index:
 * the latest earlier occurrence either way, as the scan finds it. Bounding the ends indexed per call spreads a long
 * prompt's indexing over its first calls (16k tokens at once took 1 ms) instead of stalling one step.
 *
 * A table is open addressing with linear probing over end positions (-1: empty), compared against the history
 * itself, so there are no false matches; it doubles past half full. */
#include <stdlib.h>
#include <string.h>

#include "eng_draft.h"

typedef struct {
    int32_t *slot;    /* (cap) end positions, -1 empty */
    int32_t cap, n;   /* cap a power of two; n entries */
    int32_t next_end; /* the next end position to index (ends n - 1 .. next_end - 1 are in) */
} s_table_t;

#define S_STEP 1024 /* most ends a table indexes per call */

struct eng_ngram_index {
    s_table_t t[ENG_NGRAM_INDEX_MAX_N + 1]; /* t[n] for n-grams of n tokens; slot NULL until first asked */
};

static uint32_t s_hash(const int32_t *g, int32_t n) {
    uint32_t h = 0x811c9dc5u; /* multiply-rotate per token id, a final mix: the table takes the low bits */
    for (int32_t i = 0; i < n; i++) {
        const uint32_t m = (h ^ (uint32_t)g[i]) * 0x9e3779b1u;
        h = m << 5 | m >> 27;
    }
    h ^= h >> 16, h *= 0x85ebca6bu, h ^= h >> 13;
    return h;
}

/* The slot holding the n-gram that ends at `end`, or the empty slot where it would go. */
static int32_t s_find(const s_table_t *t, const int32_t *hist, int32_t n, int32_t end) {
    const int32_t *g = hist + end - n + 1;
    uint32_t i = s_hash(g, n) & (uint32_t)(t->cap - 1);
    for (;; i = (i + 1) & (uint32_t)(t->cap - 1)) {
        const int32_t e = t->slot[i];
        if (e < 0 || memcmp(hist + e - n + 1, g, sizeof *g * (size_t)n) == 0) return (int32_t)i;
    }
}

static bool s_grow(s_table_t *t, const int32_t *hist, int32_t n, int32_t cap) {
    int32_t *old = t->slot, old_cap = t->cap;
    t->slot = malloc(sizeof *t->slot * (size_t)cap);
    if (!t->slot) {
        t->slot = old;
        return false;
    }
    memset(t->slot, 0xff, sizeof *t->slot * (size_t)cap);
    t->cap = cap;
    for (int32_t i = 0; i < old_cap; i++) /* each key once (its latest end): order does not matter */
        if (old[i] >= 0) t->slot[s_find(t, hist, n, old[i])] = old[i];
    free(old);
    return true;
}

/* Indexes ends next_end .. last of table n; false (the table dropped) when memory runs out. The table is sized at
 * once for the history so far and half as much again (n_hist: no rehash while an answer grows, each of which would
 * cost a step some hundreds of microseconds at 8k tokens), then doubles. */
static bool s_extend(s_table_t *t, const int32_t *hist, int32_t n, int32_t last, int32_t n_hist) {
    int32_t want = 64;
    while (want < 2 * (n_hist + n_hist / 2) + 2) want *= 2;
    if (want > t->cap && !s_grow(t, hist, n, want)) return false;
    for (int32_t e = t->next_end; e <= last; e++) {
        if (2 * (t->n + 1) > t->cap && !s_grow(t, hist, n, 2 * t->cap)) return false;
        const int32_t i = s_find(t, hist, n, e);
        t->n += t->slot[i] < 0;
        t->slot[i] = e;
    }
    if (last >= t->next_end) t->next_end = last + 1;
    return true;
}

static void s_table_reset(s_table_t *t, int32_t n) {
    if (t->slot) memset(t->slot, 0xff, sizeof *t->slot * (size_t)t->cap);
    t->n = 0, t->next_end = n - 1;
}

void eng_ngram_index_reset(eng_ngram_index_t *ix) {
    if (!ix) return;
    for (int32_t n = 1; n <= ENG_NGRAM_INDEX_MAX_N; n++) s_table_reset(&ix->t[n], n);
}

eng_ngram_index_t *eng_ngram_index_create(void) {
    eng_ngram_index_t *ix = calloc(1, sizeof *ix);
    eng_ngram_index_reset(ix); /* each table's first end: n - 1 */
    return ix;
}

void eng_ngram_index_destroy(eng_ngram_index_t **ixp) {
    if (!ixp || !*ixp) return;
    for (int32_t n = 1; n <= ENG_NGRAM_INDEX_MAX_N; n++) free((*ixp)->t[n].slot);
    free(*ixp);
    *ixp = NULL;
}

int32_t eng_ngram_index_lookup(eng_ngram_index_t *ix, const int32_t *hist, int32_t n_hist, int32_t n_min, int32_t n_max,
                               int32_t k, int32_t *out) {
    if (!ix || n_max > ENG_NGRAM_INDEX_MAX_N) return eng_draft_ngram(hist, n_hist, n_min, n_max, k, out);
    if (!hist || !out || k < 1 || n_min < 1 || n_max < n_min) return 0;
    for (int32_t n = n_max < n_hist - 1 ? n_max : n_hist - 1; n >= n_min; n--) {
        s_table_t *t = &ix->t[n];
        if (t->next_end > n_hist - 1) s_table_reset(t, n); /* a shorter history than last time: not the same one */
        const int32_t last = n_hist - 2, upto = t->next_end + S_STEP - 1 < last ? t->next_end + S_STEP - 1 : last;
        if (!s_extend(t, hist, n, upto, n_hist)) { /* out of memory: this lookup scans */
            free(t->slot);
            t->slot = NULL, t->cap = 0;
            s_table_reset(t, n);
            return eng_draft_ngram(hist, n_hist, n_min, n, k, out);
        }
        const int32_t *tail = hist + n_hist - n;
        int32_t e = last;
        for (; e >= t->next_end; e--) /* the ends not indexed yet, latest first */
            if (hist[e] == tail[n - 1] && memcmp(hist + e - n + 1, tail, sizeof *tail * (size_t)n) == 0) break;
        if (e < t->next_end) e = t->n > 0 ? t->slot[s_find(t, hist, n, n_hist - 1)] : -1;
        if (e < 0) continue;
        const int32_t from = e + 1, m = n_hist - from < k ? n_hist - from : k;
        memcpy(out, hist + from, sizeof *out * (size_t)m);
        return m;
    }
    return 0;
}
