/* eng_tok.c: builds the byte-level BPE tokenizer from GGUF metadata (vocabulary, merge and special-token
 * tables, decoded pieces, hash) and turns ids back into text, whole or streamed. Encoding itself is in
 * eng_tok_bpe.c and eng_tok_pretok.c. Only tokenizer.ggml.model "gpt2" (byte-level BPE) is supported. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_tok_int.h"
#include "pd_log.h"

/* ---- byte-level alphabet (GPT-2's bytes_to_unicode) ---- */

/* Code point that stands for byte b in vocabulary strings: printable Latin-1 maps to itself, the other 68
 * bytes to U+0100.. in byte order. */
static uint32_t s_byte_to_cp(int b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
    if (printable) return (uint32_t)b;
    uint32_t n = 0;
    for (int i = 0; i < b; i++) n += !((i >= '!' && i <= '~') || (i >= 0xA1 && i <= 0xAC) || (i >= 0xAE));
    return 256 + n;
}

static size_t s_put_utf8(char *dst, uint32_t cp) {
    if (cp < 0x80) {
        dst[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        dst[0] = (char)(0xC0 | (cp >> 6));
        dst[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        dst[0] = (char)(0xE0 | (cp >> 12));
        dst[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        dst[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    dst[0] = (char)(0xF0 | (cp >> 18));
    dst[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    dst[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    dst[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

/* ---- hashing ---- */

static uint64_t s_fnv(uint64_t h, const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001B3ull;
    }
    return h;
}

/* FNV-1a's last bytes reach only its low bits, so bits 16.. alone collided for short tokens that differ in
 * their last byte (a 128k vocabulary of such tokens took 45 s to load): mix the whole word (splitmix64's). */
static uint32_t s_str_hash(const char *p, size_t n) {
    uint64_t h = s_fnv(0xCBF29CE484222325ull, p, n);
    h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9ull;
    return (uint32_t)(h ^ (h >> 31));
}

static uint32_t s_pow2_at_least(uint64_t n) {
    uint32_t c = 16;
    while (c < n) c <<= 1;
    return c;
}

/* ---- vocabulary map ---- */

int32_t eng_tok_lookup(const eng_tok_t *tok, const char *text, size_t len) {
    uint32_t i = s_str_hash(text, len) & tok->vocab_mask;
    for (;;) {
        uint32_t v = tok->vocab_slots[i];
        if (v == 0) return -1;
        int32_t id = (int32_t)v - 1;
        size_t n = tok->text_off[id + 1] - tok->text_off[id];
        if (n == len && memcmp(tok->text_blob + tok->text_off[id], text, len) == 0) return id;
        i = (i + 1) & tok->vocab_mask;
    }
}

/* A duplicate string keeps its first id. */
static void s_vocab_insert(eng_tok_t *tok, int32_t id) {
    const char *text = tok->text_blob + tok->text_off[id];
    size_t len = tok->text_off[id + 1] - tok->text_off[id];
    if (eng_tok_lookup(tok, text, len) >= 0) return;
    uint32_t i = s_str_hash(text, len) & tok->vocab_mask;
    while (tok->vocab_slots[i] != 0) i = (i + 1) & tok->vocab_mask;
    tok->vocab_slots[i] = (uint32_t)id + 1;
}

/* A repeated pair takes the later rank, as HF's merge map (a HashMap filled in file order). */
static void s_merge_insert(eng_tok_t *tok, int32_t a, int32_t b, uint32_t rank, int32_t new_id) {
    uint64_t key = (uint64_t)(uint32_t)a << 32 | (uint32_t)b;
    uint32_t i = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & tok->merge_mask;
    while (tok->merge_slots[i].key != UINT64_MAX && tok->merge_slots[i].key != key) i = (i + 1) & tok->merge_mask;
    tok->merge_slots[i] = (eng_tok_merge_slot_t){key, rank, new_id};
}

/* ---- creation ---- */

static bool s_load_vocab(eng_tok_t *tok, const eng_gguf_t *g, char *err, size_t err_cap) {
    eng_gguf_vtype_t et;
    uint64_t n;
    if (!eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) || et != ENG_GGUF_STRING || n == 0 || n > (1u << 24)) {
        snprintf(err, err_cap, "tokenizer.ggml.tokens: missing, not strings, or bad count");
        return false;
    }
    tok->vocab_size = (int32_t)n;
    uint64_t total = 0;
    for (uint64_t i = 0; i < n; i++) total += eng_gguf_arr_str(g, "tokenizer.ggml.tokens", i).len;
    if (total > UINT32_MAX / 2) {
        snprintf(err, err_cap, "tokenizer.ggml.tokens: %llu bytes of text is too much", (unsigned long long)total);
        return false;
    }
    tok->text_blob = pd_xmalloc(total + 1);
    tok->text_off = pd_xmalloc((n + 1) * sizeof(uint32_t));
    tok->types = pd_xmalloc(n);
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        eng_gguf_str_t s = eng_gguf_arr_str(g, "tokenizer.ggml.tokens", i);
        tok->text_off[i] = off;
        memcpy(tok->text_blob + off, s.ptr, s.len);
        off += (uint32_t)s.len;
        tok->types[i] = ENG_TOK_TYPE_NORMAL;
    }
    tok->text_off[n] = off;

    uint64_t n_types;
    if (eng_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n_types)) {
        if (n_types != n || et == ENG_GGUF_STRING || et == ENG_GGUF_ARRAY) {
            snprintf(err, err_cap, "tokenizer.ggml.token_type: %llu entries for %llu tokens",
                     (unsigned long long)n_types, (unsigned long long)n);
            return false;
        }
        for (uint64_t i = 0; i < n; i++) {
            int64_t t = eng_gguf_arr_get_i64(g, "tokenizer.ggml.token_type", i);
            tok->types[i] = (uint8_t)(t >= 1 && t <= 6 ? t : ENG_TOK_TYPE_NORMAL);
        }
    }

    tok->vocab_mask = s_pow2_at_least(2 * n) - 1;
    tok->vocab_slots = pd_xcalloc((size_t)tok->vocab_mask + 1, sizeof(uint32_t));
    for (int32_t i = 0; i < tok->vocab_size; i++) s_vocab_insert(tok, i);
    return true;
}

static bool s_load_merges(eng_tok_t *tok, const eng_gguf_t *g, char *err, size_t err_cap) {
    eng_gguf_vtype_t et;
    uint64_t n;
    if (!eng_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n) || et != ENG_GGUF_STRING || n > (1u << 24)) {
        snprintf(err, err_cap, "tokenizer.ggml.merges: missing or not strings");
        return false;
    }
    tok->merge_mask = s_pow2_at_least(2 * n + 1) - 1;
    tok->merge_slots = pd_xmalloc(((size_t)tok->merge_mask + 1) * sizeof(eng_tok_merge_slot_t));
    memset(tok->merge_slots, 0xFF, ((size_t)tok->merge_mask + 1) * sizeof(eng_tok_merge_slot_t));
    char *joined = NULL;
    size_t joined_cap = 0;
    bool ok = true;
    for (uint64_t r = 0; r < n && ok; r++) {
        eng_gguf_str_t s = eng_gguf_arr_str(g, "tokenizer.ggml.merges", r);
        tok->hash = s_fnv(tok->hash, s.ptr, s.len);
        tok->hash = s_fnv(tok->hash, "\n", 1);
        /* "left right"; the separator is the first space after the first byte (as llama.cpp) */
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        if (!sp) {
            snprintf(err, err_cap, "tokenizer.ggml.merges[%llu]: no space separator", (unsigned long long)r);
            ok = false;
            break;
        }
        size_t la = (size_t)(sp - s.ptr), lb = s.len - la - 1;
        if (la + lb > joined_cap) {
            joined_cap = 2 * (la + lb);
            joined = pd_xrealloc(joined, joined_cap);
        }
        memcpy(joined, s.ptr, la);
        memcpy(joined + la, sp + 1, lb);
        int32_t a = eng_tok_lookup(tok, s.ptr, la), b = eng_tok_lookup(tok, sp + 1, lb);
        int32_t ab = eng_tok_lookup(tok, joined, la + lb);
        if (a < 0 || b < 0 || ab < 0) {
            snprintf(err, err_cap, "tokenizer.ggml.merges[%llu] '%.*s': a part or the result is not in the vocabulary",
                     (unsigned long long)r, (int)(s.len < 64 ? s.len : 64), s.ptr);
            ok = false;
            break;
        }
        s_merge_insert(tok, a, b, (uint32_t)r, ab);
    }
    free(joined);
    return ok;
}

/* What a token decodes to, as HF's ByteLevel decoder: each character mapped back to its byte, unless some
 * character is outside the byte alphabet, in which case the token's own UTF-8 is used. */
static void s_build_pieces(eng_tok_t *tok, const int16_t *cp_to_byte) {
    tok->piece_off = pd_xmalloc(((size_t)tok->vocab_size + 1) * sizeof(uint32_t));
    tok->piece_blob = pd_xmalloc(tok->text_off[tok->vocab_size] + 1);
    uint32_t off = 0;
    for (int32_t id = 0; id < tok->vocab_size; id++) {
        const unsigned char *t = (const unsigned char *)tok->text_blob + tok->text_off[id];
        size_t len = tok->text_off[id + 1] - tok->text_off[id], i = 0;
        tok->piece_off[id] = off;
        uint32_t o = off;
        while (i < len) {
            uint32_t cp;
            int k = eng_tok_utf8_scan(t + i, len - i, &cp);
            if (k <= 0 || cp >= 512 || cp_to_byte[cp] < 0) break;
            tok->piece_blob[o++] = (char)cp_to_byte[cp];
            i += (size_t)k;
        }
        if (i < len) { /* not all byte-level: raw text */
            memcpy(tok->piece_blob + off, t, len);
            o = off + (uint32_t)len;
        }
        off = o;
        if (off - tok->piece_off[id] > tok->max_piece_bytes) tok->max_piece_bytes = off - tok->piece_off[id];
    }
    tok->piece_off[tok->vocab_size] = off;
}

static void s_build_specials(eng_tok_t *tok) {
    tok->special_ids = pd_xmalloc(((size_t)tok->vocab_size + 1) * sizeof(int32_t));
    for (int32_t id = 0; id < tok->vocab_size; id++) {
        uint8_t t = tok->types[id];
        size_t len = tok->text_off[id + 1] - tok->text_off[id];
        if ((t != ENG_TOK_TYPE_CONTROL && t != ENG_TOK_TYPE_USER) || len == 0) continue;
        /* insertion sort, longest first, ties by id (specials are few) */
        int32_t k = tok->n_special++;
        while (k > 0) {
            int32_t prev = tok->special_ids[k - 1];
            if (tok->text_off[prev + 1] - tok->text_off[prev] >= len) break;
            tok->special_ids[k] = prev;
            k--;
        }
        tok->special_ids[k] = id;
        tok->special_first[(unsigned char)tok->text_blob[tok->text_off[id]]] = 1;
    }
}

static int32_t s_get_id(const eng_gguf_t *g, const char *key, int32_t vocab_size) {
    int64_t v;
    if (!eng_gguf_get_i64(g, key, &v) || v < 0 || v >= vocab_size) return -1;
    return (int32_t)v;
}

static void s_build_eog(eng_tok_t *tok) {
    static const char *const names[] = {"<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"};
    if (tok->eos >= 0) tok->eog_ids[tok->n_eog++] = tok->eos;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        int32_t id = eng_tok_find(tok, names[i]);
        if (id >= 0 && id != tok->eos) tok->eog_ids[tok->n_eog++] = id;
    }
}

eng_tok_t *eng_tok_create(const eng_gguf_t *g, char *err, size_t err_cap) {
    char dummy[8];
    if (!err || err_cap == 0) {
        err = dummy;
        err_cap = sizeof dummy;
    }
    err[0] = '\0';
    eng_gguf_str_t model = {0}, pre = {0};
    if (!g || !eng_gguf_get_str(g, "tokenizer.ggml.model", &model) || model.len != 4 ||
        memcmp(model.ptr, "gpt2", 4) != 0) {
        snprintf(err, err_cap, "tokenizer.ggml.model '%.*s' is not supported (only byte-level BPE 'gpt2')",
                 (int)(model.len < 64 ? model.len : 64), model.ptr ? model.ptr : "");
        return NULL;
    }
    const eng_tok_pre_t *pt = NULL;
    if (eng_gguf_get_str(g, "tokenizer.ggml.pre", &pre)) pt = eng_tok_pre_find(pre.ptr, pre.len);
    if (!pt) {
        snprintf(err, err_cap, "tokenizer.ggml.pre '%.*s' is not supported (known: smollm, starcoder, refact, gpt-2)",
                 (int)(pre.len < 64 ? pre.len : 64), pre.ptr ? pre.ptr : "");
        return NULL;
    }
    eng_tok_t *tok = pd_xcalloc(1, sizeof *tok);
    tok->pre = pt;
    tok->hash = s_fnv(0xCBF29CE484222325ull, pt->name, strlen(pt->name) + 1);
    if (!s_load_vocab(tok, g, err, err_cap)) goto fail;
    for (int32_t i = 0; i < tok->vocab_size; i++) {
        tok->hash = s_fnv(tok->hash, tok->text_blob + tok->text_off[i], tok->text_off[i + 1] - tok->text_off[i]);
        unsigned char sep[2] = {0, tok->types[i]};
        tok->hash = s_fnv(tok->hash, sep, 2);
    }
    if (!s_load_merges(tok, g, err, err_cap)) goto fail;

    int16_t cp_to_byte[512];
    memset(cp_to_byte, 0xFF, sizeof cp_to_byte);
    for (int b = 0; b < 256; b++) {
        uint32_t cp = s_byte_to_cp(b);
        char u[4];
        size_t n = s_put_utf8(u, cp);
        cp_to_byte[cp] = (int16_t)b;
        tok->byte_id[b] = eng_tok_lookup(tok, u, n);
    }
    s_build_pieces(tok, cp_to_byte);
    s_build_specials(tok);
    tok->bos = s_get_id(g, "tokenizer.ggml.bos_token_id", tok->vocab_size);
    tok->eos = s_get_id(g, "tokenizer.ggml.eos_token_id", tok->vocab_size);
    if (!eng_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &tok->add_bos)) tok->add_bos = false;
    s_build_eog(tok);
    LOG_D("tokenizer: %d tokens, pre '%s', %d special", tok->vocab_size, pt->name, tok->n_special);
    return tok;
fail:
    eng_tok_destroy(&tok);
    return NULL;
}

void eng_tok_destroy(eng_tok_t **ptok) {
    if (!ptok || !*ptok) return;
    eng_tok_t *tok = *ptok;
    free(tok->text_blob);
    free(tok->text_off);
    free(tok->piece_blob);
    free(tok->piece_off);
    free(tok->types);
    free(tok->vocab_slots);
    free(tok->merge_slots);
    free(tok->special_ids);
    free(tok);
    *ptok = NULL;
}

/* ---- queries ---- */

int32_t eng_tok_vocab_size(const eng_tok_t *tok) {
    return tok->vocab_size;
}
int32_t eng_tok_bos(const eng_tok_t *tok) {
    return tok->bos;
}
int32_t eng_tok_eos(const eng_tok_t *tok) {
    return tok->eos;
}
bool eng_tok_add_bos(const eng_tok_t *tok) {
    return tok->add_bos;
}
uint64_t eng_tok_hash(const eng_tok_t *tok) {
    return tok->hash;
}

bool eng_tok_is_eog(const eng_tok_t *tok, int32_t id) {
    for (int32_t i = 0; i < tok->n_eog; i++)
        if (tok->eog_ids[i] == id) return true;
    return false;
}

int32_t eng_tok_find(const eng_tok_t *tok, const char *text) {
    return text ? eng_tok_lookup(tok, text, strlen(text)) : -1;
}

const char *eng_tok_piece(const eng_tok_t *tok, int32_t id, size_t *len) {
    if (!tok || id < 0 || id >= tok->vocab_size) return NULL;
    if (len) *len = tok->piece_off[id + 1] - tok->piece_off[id];
    return tok->piece_blob + tok->piece_off[id];
}

/* ---- decoding ---- */

/* Output that counts every byte and stores those that fit. */
typedef struct {
    char *out;
    size_t cap, n;
} s_sink_t;

static inline void s_emit(s_sink_t *s, const void *p, size_t n) {
    if (s->n < s->cap) memcpy(s->out + s->n, p, n <= s->cap - s->n ? n : s->cap - s->n);
    s->n += n;
}

/* Appends src[0..n) to the stream whose incomplete tail is d->pending: complete characters go out,
 * invalid maximal subparts become one U+FFFD each, a valid but unfinished tail stays pending. */
static void s_detok_feed(eng_detok_t *d, const unsigned char *src, size_t n, s_sink_t *sink) {
    size_t i = 0;
    if (d->n_pending > 0) { /* finish the carried sequence with up to 3 new bytes */
        unsigned char tmp[8];
        size_t np = (size_t)d->n_pending, take = n < 4 ? n : 4;
        memcpy(tmp, d->pending, np);
        memcpy(tmp + np, src, take);
        uint32_t cp;
        int k = eng_tok_utf8_scan(tmp, np + take, &cp);
        if (k == 0) { /* still unfinished: all of src fit in tmp */
            memcpy(d->pending, tmp, np + take);
            d->n_pending = (int)(np + take);
            return;
        }
        if (k > 0)
            s_emit(sink, tmp, (size_t)k);
        else
            s_emit(sink, "\xEF\xBF\xBD", 3);
        size_t used = k > 0 ? (size_t)k : (size_t)-k; /* an invalid subpart is exactly the pending bytes */
        i = used > np ? used - np : 0;
        d->n_pending = 0;
    }
    size_t run = i; /* start of a stretch of valid bytes not yet emitted */
    while (i < n) {
        if (src[i] < 0x80) {
            i++;
            continue;
        }
        uint32_t cp;
        int k = eng_tok_utf8_scan(src + i, n - i, &cp);
        if (k > 0) {
            i += (size_t)k;
            continue;
        }
        s_emit(sink, src + run, i - run);
        if (k == 0) {
            memcpy(d->pending, src + i, n - i);
            d->n_pending = (int)(n - i);
            return;
        }
        s_emit(sink, "\xEF\xBF\xBD", 3);
        i += (size_t)-k;
        run = i;
    }
    s_emit(sink, src + run, n - run);
}

void eng_detok_init(eng_detok_t *d) {
    memset(d, 0, sizeof *d);
}

size_t eng_detok_max_bytes(const eng_tok_t *tok) {
    return 3 * (tok->max_piece_bytes + 4);
}

int64_t eng_detok_push(eng_detok_t *d, const eng_tok_t *tok, int32_t id, char *out, size_t cap) {
    if (cap < eng_detok_max_bytes(tok)) return PD_ERANGE;
    size_t len;
    const char *p = eng_tok_piece(tok, id, &len);
    if (!p) return PD_EINVAL;
    s_sink_t sink = {out, cap, 0};
    s_detok_feed(d, (const unsigned char *)p, len, &sink);
    return (int64_t)sink.n;
}

int64_t eng_detok_flush(eng_detok_t *d, char *out, size_t cap) {
    if (d->n_pending == 0) return 0;
    if (cap < 3) return PD_ERANGE;
    memcpy(out, "\xEF\xBF\xBD", 3); /* an unfinished sequence is one maximal subpart */
    d->n_pending = 0;
    return 3;
}

int64_t eng_tok_decode(const eng_tok_t *tok, const int32_t *ids, int64_t n, char *out, size_t cap) {
    if (!tok || n < 0 || (n > 0 && !ids) || (cap > 0 && !out)) return PD_EINVAL;
    eng_detok_t d;
    eng_detok_init(&d);
    s_sink_t sink = {out, cap, 0};
    for (int64_t i = 0; i < n; i++) {
        size_t len;
        const char *p = eng_tok_piece(tok, ids[i], &len);
        if (!p) return PD_EINVAL;
        s_detok_feed(&d, (const unsigned char *)p, len, &sink);
    }
    if (d.n_pending > 0) s_emit(&sink, "\xEF\xBF\xBD", 3);
    return (int64_t)sink.n;
}
