/* eng_tok_pretok.c: the pre-tokenizers of the byte-level BPE (HF Digits + ByteLevel regex), written by
 * hand against the Unicode classes of eng_tok_unicode.c instead of using a regex library. Splits only:
 * byte-level mapping and merges are eng_tok_bpe.c's. */
#include <string.h>

#include "eng_tok_int.h"

/* tokenizer.ggml.pre values (llama.cpp's names) whose HF tokenizer.json uses the chain given here. Only
 * "smollm" is checked against a real tokenizer by the golden test; the others are here because their
 * published tokenizer.json has the same chain (Digits for starcoder/refact, plain ByteLevel for gpt-2). */
static const eng_tok_pre_t s_pres[] = {
    {"smollm", true, ENG_TOK_RE_GPT2},
    {"starcoder", true, ENG_TOK_RE_GPT2},
    {"refact", true, ENG_TOK_RE_GPT2},
    {"gpt-2", false, ENG_TOK_RE_GPT2},
};

const eng_tok_pre_t *eng_tok_pre_find(const char *name, size_t len) {
    for (size_t i = 0; i < sizeof s_pres / sizeof s_pres[0]; i++)
        if (strlen(s_pres[i].name) == len && memcmp(s_pres[i].name, name, len) == 0) return &s_pres[i];
    return NULL;
}

/* Code point at p (the text is valid UTF-8: encode sanitises it first) and its length in *n. */
static inline uint32_t s_cp(const unsigned char *p, size_t avail, int *n) {
    if (p[0] < 0x80) {
        *n = 1;
        return p[0];
    }
    uint32_t cp = 0;
    int k = eng_tok_utf8_scan(p, avail, &cp);
    if (k <= 0) { /* cannot happen on sanitised text; treat as one opaque byte */
        *n = 1;
        return 0xFFFD;
    }
    *n = k;
    return cp;
}

/* ASCII classes, so the common case skips the range table. */
static uint8_t s_class(uint32_t cp) {
    if (cp < 0x80) {
        if ((cp | 0x20) >= 'a' && (cp | 0x20) <= 'z') return ENG_TOK_UC_L;
        if (cp >= '0' && cp <= '9') return ENG_TOK_UC_N | ENG_TOK_UC_D;
        if (cp == ' ' || (cp >= 0x09 && cp <= 0x0D)) return ENG_TOK_UC_S;
        return 0;
    }
    return eng_tok_uc_class(cp);
}

/* Extends a run of characters whose class satisfies (cls & mask) == want, from pos to at most end. */
static size_t s_run(const unsigned char *t, size_t pos, size_t end, uint8_t mask, uint8_t want) {
    while (pos < end) {
        int n;
        uint32_t cp = s_cp(t + pos, end - pos, &n);
        if ((s_class(cp) & mask) != want) break;
        pos += (size_t)n;
    }
    return pos;
}

#define S_LNS (ENG_TOK_UC_L | ENG_TOK_UC_N | ENG_TOK_UC_S)

/* End of the GPT-2 regex match that starts at pos in [pos, end). The alternatives are tried in the
 * regex's order; each one is a greedy run that never needs backtracking, except \s+(?!\S), which gives
 * back the last whitespace character when a non-space follows. */
static size_t s_match_gpt2(const unsigned char *t, size_t pos, size_t end) {
    int n0;
    uint32_t c0 = s_cp(t + pos, end - pos, &n0);
    size_t p1 = pos + (size_t)n0;

    /* 's|'t|'re|'ve|'m|'ll|'d (lower case only, as the pattern has no (?i)) */
    if (c0 == '\'' && p1 < end) {
        unsigned char a = t[p1], b = p1 + 1 < end ? t[p1 + 1] : 0;
        if (a == 's' || a == 't' || a == 'm' || a == 'd') return p1 + 1;
        if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return p1 + 2;
    }

    /* ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+' with the optional leading space */
    size_t q = pos;
    uint8_t cls = s_class(c0) & S_LNS;
    if (c0 == ' ' && p1 < end) {
        int n1;
        uint8_t cls1 = s_class(s_cp(t + p1, end - p1, &n1)) & S_LNS;
        if (!(cls1 & ENG_TOK_UC_S)) {
            q = p1;
            cls = cls1;
        }
    }
    if (cls & ENG_TOK_UC_L) return s_run(t, q, end, ENG_TOK_UC_L, ENG_TOK_UC_L);
    if (cls & ENG_TOK_UC_N) return s_run(t, q, end, ENG_TOK_UC_N, ENG_TOK_UC_N);
    if (cls == 0) return s_run(t, q, end, S_LNS, 0);

    /* \s+(?!\S) | \s+ : a whitespace run ending at the segment end is taken whole; before a non-space
     * it keeps its last character back (for ' ?\p{L}+' and friends), unless it is that one character. */
    size_t last = pos, r = pos;
    while (r < end) {
        int n;
        uint32_t cp = s_cp(t + r, end - r, &n);
        if (!(s_class(cp) & ENG_TOK_UC_S)) break;
        last = r;
        r += (size_t)n;
    }
    if (r == end || last == pos) return r;
    return last;
}

/* End of the Digits segment that starts at pos: one numeric character, or the stretch up to the next. */
static size_t s_segment_end(const eng_tok_pretok_it_t *it, size_t pos) {
    if (!it->pre->is_digits_split) return it->len;
    int n;
    uint32_t cp = s_cp(it->text + pos, it->len - pos, &n);
    if (s_class(cp) & ENG_TOK_UC_D) return pos + (size_t)n;
    return s_run(it->text, pos, it->len, ENG_TOK_UC_D, 0);
}

void eng_tok_pretok_init(eng_tok_pretok_it_t *it, const eng_tok_pre_t *pre, const char *text, size_t len) {
    it->pre = pre;
    it->text = (const unsigned char *)text;
    it->len = len;
    it->pos = 0;
    it->seg_end = 0;
}

bool eng_tok_pretok_next(eng_tok_pretok_it_t *it, size_t *start, size_t *end) {
    if (it->pos >= it->len) return false;
    if (it->pos >= it->seg_end) it->seg_end = s_segment_end(it, it->pos);
    size_t e = s_match_gpt2(it->text, it->pos, it->seg_end);
    *start = it->pos;
    *end = e;
    it->pos = e;
    return true;
}
