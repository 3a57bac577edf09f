/* eng_tok_bpe.c: text -> token ids. Replaces invalid UTF-8, splits out special tokens, pre-tokenizes
 * (eng_tok_pretok.c) and runs byte-level BPE merges by rank on each pre-token, in the order HF's
 * tokenizers applies them. Does not build the tables it reads (eng_tok.c does). */
#include <stdlib.h>
#include <string.h>

#include "eng_tok_int.h"

typedef struct {
    int32_t id;
    int32_t prev, next; /* neighbours in the live list, -1 at the ends */
} s_sym_t;

/* A candidate merge of symbol pos with its right neighbour. */
typedef struct {
    uint32_t rank;
    int32_t pos;
    int32_t left_id, right_id; /* the pair when queued: a candidate whose pair changed is stale */
} s_cand_t;

static inline const eng_tok_merge_slot_t *s_merge_find(const eng_tok_t *tok, int32_t a, int32_t b) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & tok->merge_mask;
    for (;;) {
        const eng_tok_merge_slot_t *s = &tok->merge_slots[i];
        if (s->key == key) return s;
        if (s->key == UINT64_MAX) return NULL;
        i = (i + 1) & tok->merge_mask;
    }
}

/* Min-heap on (rank, pos): the lowest rank first, the leftmost among equal ranks, as HF's Word::merge_all. */
static inline bool s_less(const s_cand_t *a, const s_cand_t *b) {
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void s_heap_push(s_cand_t *h, size_t *n, s_cand_t c) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!s_less(&c, &h[parent])) break;
        h[i] = h[parent];
        i = parent;
    }
    h[i] = c;
}

static s_cand_t s_heap_pop(s_cand_t *h, size_t *n) {
    s_cand_t top = h[0], last = h[--*n];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        const s_cand_t *best = &last;
        if (l < *n && s_less(&h[l], best)) {
            m = l;
            best = &h[l];
        }
        if (r < *n && s_less(&h[r], best)) m = r;
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n > 0) h[i] = last;
    return top;
}

static void s_try_queue(const eng_tok_t *tok, const s_sym_t *sym, int32_t pos, s_cand_t *heap, size_t *n_heap) {
    int32_t next = sym[pos].next;
    if (next < 0) return;
    const eng_tok_merge_slot_t *m = s_merge_find(tok, sym[pos].id, sym[next].id);
    if (!m) return;
    s_cand_t c = {m->rank, pos, sym[pos].id, sym[next].id};
    s_heap_push(heap, n_heap, c);
}

static pd_status s_scratch_reserve(eng_tok_scratch_t *s, size_t n_bytes) {
    if (s->n_bytes >= n_bytes) return PD_OK;
    void *p = realloc(s->buf, n_bytes);
    if (!p) return PD_ENOMEM;
    s->buf = p;
    s->n_bytes = n_bytes;
    return PD_OK;
}

pd_status eng_tok_bpe(const eng_tok_t *tok, const unsigned char *piece, size_t len, eng_tok_scratch_t *scratch,
                      int32_t *out, int64_t cap, int64_t *n_out) {
    if (len == 1) { /* most punctuation and spaces: no merge can apply */
        int32_t id = tok->byte_id[piece[0]];
        if (id >= 0) {
            if (*n_out < cap) out[*n_out] = id;
            (*n_out)++;
        }
        return PD_OK;
    }
    /* Each merge queues at most two candidates: n - 1 initial ones plus 2 per merge. */
    size_t need = len * sizeof(s_sym_t) + 3 * len * sizeof(s_cand_t);
    if (s_scratch_reserve(scratch, need) != PD_OK) return PD_ENOMEM;
    s_sym_t *sym = scratch->buf;
    s_cand_t *heap = (s_cand_t *)(sym + len);
    size_t n_heap = 0;

    /* one symbol per byte; a byte missing from the vocabulary is dropped (HF BPE without unk_token) */
    int32_t n_sym = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = tok->byte_id[piece[i]];
        if (id < 0) continue;
        sym[n_sym] = (s_sym_t){id, n_sym - 1, -1};
        if (n_sym > 0) sym[n_sym - 1].next = n_sym;
        n_sym++;
    }
    for (int32_t i = 0; i + 1 < n_sym; i++) s_try_queue(tok, sym, i, heap, &n_heap);

    /* merge the best pair until none is left; symbol pos absorbs its right neighbour */
    while (n_heap > 0) {
        s_cand_t c = s_heap_pop(heap, &n_heap);
        int32_t right = sym[c.pos].next;
        if (sym[c.pos].id != c.left_id || right < 0 || sym[right].id != c.right_id) continue;
        const eng_tok_merge_slot_t *m = s_merge_find(tok, c.left_id, c.right_id);
        sym[c.pos].id = m->new_id;
        sym[c.pos].next = sym[right].next;
        if (sym[right].next >= 0) sym[sym[right].next].prev = c.pos;
        sym[right].id = -1;
        if (sym[c.pos].prev >= 0) s_try_queue(tok, sym, sym[c.pos].prev, heap, &n_heap);
        s_try_queue(tok, sym, c.pos, heap, &n_heap);
    }
    for (int32_t i = n_sym > 0 ? 0 : -1; i >= 0; i = sym[i].next) {
        if (*n_out < cap) out[*n_out] = sym[i].id;
        (*n_out)++;
    }
    return PD_OK;
}

/* Length of the valid UTF-8 prefix of text. */
static size_t s_valid_prefix(const unsigned char *t, size_t len) {
    size_t i = 0;
    while (i < len) {
        if (t[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        int k = eng_tok_utf8_scan(t + i, len - i, &cp);
        if (k <= 0) return i;
        i += (size_t)k;
    }
    return len;
}

/* Copy of text with each invalid maximal subpart replaced by U+FFFD (caller frees), or NULL. */
static char *s_sanitize(const unsigned char *t, size_t len, size_t *out_len) {
    char *dst = malloc(len * 3 + 1); /* one U+FFFD (3 bytes) per input byte at worst */
    if (!dst) return NULL;
    size_t i = 0, o = 0;
    while (i < len) {
        uint32_t cp;
        int k = eng_tok_utf8_scan(t + i, len - i, &cp);
        if (k > 0) {
            memcpy(dst + o, t + i, (size_t)k);
            o += (size_t)k;
            i += (size_t)k;
            continue;
        }
        memcpy(dst + o, "\xEF\xBF\xBD", 3);
        o += 3;
        i += k < 0 ? (size_t)-k : len - i; /* a truncated tail is one maximal subpart */
    }
    *out_len = o;
    return dst;
}

/* Leftmost-longest special token at or after pos (as HF's added-vocabulary matcher): its id and start in
 * *start, or -1 when none. CONTROL tokens match only with parse_special; USER_DEFINED ones always do
 * (HF's non-special added tokens). */
static int32_t s_find_special(const eng_tok_t *tok, const unsigned char *t, size_t len, size_t pos, bool parse_special,
                              size_t *start) {
    for (size_t i = pos; i < len; i++) {
        if (!tok->special_first[t[i]]) continue;
        for (int32_t k = 0; k < tok->n_special; k++) { /* longest first */
            int32_t id = tok->special_ids[k];
            if (!parse_special && tok->types[id] == ENG_TOK_TYPE_CONTROL) continue;
            size_t n = tok->text_off[id + 1] - tok->text_off[id];
            if (n <= len - i && memcmp(t + i, tok->text_blob + tok->text_off[id], n) == 0) {
                *start = i;
                return id;
            }
        }
    }
    return -1;
}

int64_t eng_tok_encode(const eng_tok_t *tok, const char *text, size_t len, bool parse_special, int32_t *out,
                       int64_t cap) {
    if (!tok || (!text && len > 0) || cap < 0 || (!out && cap > 0)) return PD_EINVAL;
    const unsigned char *t = (const unsigned char *)text;
    char *owned = NULL;
    eng_tok_scratch_t scratch = {NULL, 0};
    int64_t n_out = 0;
    if (s_valid_prefix(t, len) != len) {
        owned = s_sanitize(t, len, &len);
        if (!owned) return PD_ENOMEM;
        t = (const unsigned char *)owned;
    }
    bool any_special = tok->n_special > 0;
    size_t pos = 0;
    while (pos < len) {
        size_t sp_start = len;
        int32_t sp = any_special ? s_find_special(tok, t, len, pos, parse_special, &sp_start) : -1;
        if (sp < 0) any_special = false; /* none further on: stop looking */
        eng_tok_pretok_it_t it;
        eng_tok_pretok_init(&it, tok->pre, (const char *)t + pos, sp_start - pos);
        size_t a, b;
        while (eng_tok_pretok_next(&it, &a, &b)) {
            if (eng_tok_bpe(tok, t + pos + a, b - a, &scratch, out, cap, &n_out) != PD_OK) {
                n_out = PD_ENOMEM;
                goto fail;
            }
        }
        pos = sp_start;
        if (sp >= 0) {
            if (n_out < cap) out[n_out] = sp;
            n_out++;
            pos += tok->text_off[sp + 1] - tok->text_off[sp];
        }
    }
fail:
    free(scratch.buf);
    free(owned);
    return n_out;
}
