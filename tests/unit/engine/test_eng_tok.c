/* test_eng_tok.c: the byte-level BPE tokenizer against the Hugging Face tokenizers golden data
 * (tests/golden/tok, made by tests/golden/make_tok_golden.py) on the real SmolLM2 GGUF: exact ids with
 * and without special-token parsing, decode, round trips, streaming detokenization that never emits broken
 * UTF-8, edge cases of the API, and encode speed. */
#include "eng_gguf.h"
#include "eng_tok.h"
#include "pd_common.h"
#include "pd_test.h"

#include <stdint.h>
#include <time.h>

#define S_MAX_IDS 65536

static eng_gguf_t *s_gguf;
static eng_tok_t *s_tok;

/* ---- helpers ---- */

static int s_hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* Decodes hex text[0..n) into dst (n/2 bytes); returns the byte count or -1. */
static long s_unhex(const char *text, size_t n, char *dst) {
    if (n % 2) return -1;
    for (size_t i = 0; i < n; i += 2) {
        int hi = s_hexval(text[i]), lo = s_hexval(text[i + 1]);
        if (hi < 0 || lo < 0) return -1;
        dst[i / 2] = (char)(hi << 4 | lo);
    }
    return (long)(n / 2);
}

/* Parses space-separated ids of text[0..n) into ids; returns the count or -1. */
static long s_parse_ids(const char *text, size_t n, int32_t *ids, long cap) {
    long k = 0;
    size_t i = 0;
    while (i < n) {
        if (text[i] == ' ') {
            i++;
            continue;
        }
        long v = 0;
        if (text[i] < '0' || text[i] > '9') return -1;
        while (i < n && text[i] >= '0' && text[i] <= '9') v = v * 10 + (text[i++] - '0');
        if (k >= cap) return -1;
        ids[k++] = (int32_t)v;
    }
    return k;
}

static void s_print_ids(const char *label, const int32_t *ids, long n) {
    fprintf(stderr, "    %s (%ld):", label, n);
    for (long i = 0; i < n && i < 64; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 64 ? " ...\n" : "\n");
}

static void s_print_hex(const char *label, const char *p, size_t n) {
    fprintf(stderr, "    %s (%zu bytes): ", label, n);
    for (size_t i = 0; i < n && i < 96; i++) fprintf(stderr, "%02x", (unsigned char)p[i]);
    fprintf(stderr, n > 96 ? "...\n" : "\n");
}

/* Strict UTF-8 check (no surrogates, no overlongs, <= U+10FFFF). */
static bool s_valid_utf8(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        unsigned c = p[i];
        int need;
        unsigned lo = 0x80, hi = 0xBF;
        if (c < 0x80) {
            i++;
            continue;
        } else if (c >= 0xC2 && c <= 0xDF) {
            need = 1;
        } else if (c >= 0xE0 && c <= 0xEF) {
            need = 2;
            if (c == 0xE0) lo = 0xA0;
            if (c == 0xED) hi = 0x9F;
        } else if (c >= 0xF0 && c <= 0xF4) {
            need = 3;
            if (c == 0xF0) lo = 0x90;
            if (c == 0xF4) hi = 0x8F;
        } else {
            return false;
        }
        if (i + (size_t)need >= n) return false;
        for (int k = 1; k <= need; k++) {
            unsigned b = p[i + (size_t)k];
            if (b < (k == 1 ? lo : 0x80) || b > (k == 1 ? hi : 0xBF)) return false;
        }
        i += (size_t)need + 1;
    }
    return true;
}

/* One golden line split at tabs into at most 3 fields. */
typedef struct {
    const char *f[3];
    size_t n[3];
    int n_fields;
} s_fields_t;

static s_fields_t s_split_tabs(const char *line, size_t len) {
    s_fields_t r = {{0}, {0}, 0};
    size_t start = 0;
    for (size_t i = 0; i <= len && r.n_fields < 3; i++) {
        if (i == len || line[i] == '\t') {
            r.f[r.n_fields] = line + start;
            r.n[r.n_fields] = i - start;
            r.n_fields++;
            start = i + 1;
        }
    }
    return r;
}

/* Calls fn(line, len, ctx) for each non-comment line of a golden file; returns the line count or -1. */
static long s_for_lines(const char *name, void (*fn)(const char *, size_t, void *), void *ctx) {
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/golden/tok/%s", PD_SOURCE_DIR, name);
    size_t n;
    char *buf = pd_test_read_file(path, &n);
    if (!buf) {
        fprintf(stderr, "cannot read %s\n", path);
        return -1;
    }
    long count = 0;
    size_t i = 0;
    while (i < n) {
        size_t e = i;
        while (e < n && buf[e] != '\n') e++;
        if (e > i && buf[i] != '#') {
            fn(buf + i, e - i, ctx);
            count++;
        }
        i = e + 1;
    }
    free(buf);
    return count;
}

/* ---- setup ---- */

static void test_load(void) {
    char err[256] = "";
    const char *path = pd_test_model_path();
    s_gguf = eng_gguf_open(path, err, sizeof err);
    if (!s_gguf) fprintf(stderr, "model %s: %s\n", path, err);
    REQUIRE(s_gguf != NULL);
    s_tok = eng_tok_create(s_gguf, err, sizeof err);
    if (!s_tok) fprintf(stderr, "tokenizer: %s\n", err);
    REQUIRE(s_tok != NULL);
}

static void test_meta(void) {
    REQUIRE(s_tok);
    CHECK_EQ_INT(eng_tok_vocab_size(s_tok), 49152);
    CHECK_EQ_INT(eng_tok_bos(s_tok), 1);
    CHECK_EQ_INT(eng_tok_eos(s_tok), 2);
    CHECK(!eng_tok_add_bos(s_tok));
    CHECK_EQ_INT(eng_tok_find(s_tok, "<|im_end|>"), 2);
    CHECK_EQ_INT(eng_tok_find(s_tok, "<|im_start|>"), 1);
    CHECK_EQ_INT(eng_tok_find(s_tok, "no such token here"), -1);
    CHECK(eng_tok_is_eog(s_tok, 2));
    CHECK(eng_tok_is_eog(s_tok, 0)); /* <|endoftext|> */
    CHECK(!eng_tok_is_eog(s_tok, 1));
    CHECK(!eng_tok_is_eog(s_tok, 100));
    size_t len = 0;
    const char *p = eng_tok_piece(s_tok, eng_tok_find(s_tok, "\xC4\xA0the"), &len); /* "Ġthe" */
    CHECK(p && len == 4 && memcmp(p, " the", 4) == 0);
    p = eng_tok_piece(s_tok, 1, &len);
    CHECK(p && len == 12 && memcmp(p, "<|im_start|>", 12) == 0);
    CHECK(eng_tok_piece(s_tok, -1, &len) == NULL);
    CHECK(eng_tok_piece(s_tok, 49152, &len) == NULL);

    /* the hash is a pure function of the tables */
    char err[256];
    eng_tok_t *again = eng_tok_create(s_gguf, err, sizeof err);
    REQUIRE(again);
    CHECK(eng_tok_hash(again) == eng_tok_hash(s_tok));
    CHECK(eng_tok_hash(s_tok) != 0);
    eng_tok_destroy(&again);
    CHECK(again == NULL);
    eng_tok_destroy(&again); /* NULL is fine */
}

/* ---- golden encode ---- */

typedef struct {
    int32_t *got, *want;
    char *text;
    long n_cases, n_bad, n_roundtrip, n_roundtrip_skipped;
    bool representable[256]; /* bytes that have a token of their own */
    char *dec;
} s_enc_ctx_t;

static void s_check_encode(s_enc_ctx_t *c, const char *text, long len, bool parse_special, const int32_t *want,
                           long n_want) {
    int64_t n = eng_tok_encode(s_tok, text, (size_t)len, parse_special, c->got, S_MAX_IDS);
    bool ok = n == n_want && memcmp(c->got, want, (size_t)n_want * sizeof(int32_t)) == 0;
    int64_t n_count = eng_tok_encode(s_tok, text, (size_t)len, parse_special, NULL, 0); /* size query */
    ok = ok && n_count == n;
    if (!ok) {
        if (++c->n_bad <= 5) {
            fprintf(stderr, "  encode mismatch (parse_special=%d):\n", parse_special);
            s_print_hex("input", text, (size_t)len);
            s_print_ids("want", want, n_want);
            s_print_ids("got ", c->got, (long)n);
        }
    }
}

static void s_encode_line(const char *line, size_t len, void *ctx) {
    s_enc_ctx_t *c = ctx;
    s_fields_t f = s_split_tabs(line, len);
    long n_text = f.n_fields == 3 ? s_unhex(f.f[0], f.n[0], c->text) : -1;
    long n_special = n_text >= 0 ? s_parse_ids(f.f[1], f.n[1], c->want, S_MAX_IDS) : -1;
    if (n_special < 0) {
        c->n_bad++;
        fprintf(stderr, "  malformed golden line: %.60s\n", line);
        return;
    }
    c->n_cases++;
    s_check_encode(c, c->text, n_text, true, c->want, n_special);
    if (!(f.n[2] == 1 && f.f[2][0] == '=')) {
        int32_t *want_text = c->want + n_special;
        long n_as_text = s_parse_ids(f.f[2], f.n[2], want_text, S_MAX_IDS - n_special);
        s_check_encode(c, c->text, n_text, false, want_text, n_as_text);
    } else {
        s_check_encode(c, c->text, n_text, false, c->want, n_special);
    }

    /* round trip for valid UTF-8 whose bytes all have tokens */
    bool representable = s_valid_utf8(c->text, (size_t)n_text);
    for (long i = 0; i < n_text && representable; i++) representable = c->representable[(unsigned char)c->text[i]];
    if (!representable) {
        c->n_roundtrip_skipped++;
        return;
    }
    int64_t n = eng_tok_encode(s_tok, c->text, (size_t)n_text, true, c->got, S_MAX_IDS);
    int64_t m = eng_tok_decode(s_tok, c->got, n, c->dec, 1 << 20);
    c->n_roundtrip++;
    if (m != n_text || memcmp(c->dec, c->text, (size_t)n_text) != 0) {
        if (++c->n_bad <= 5) {
            fprintf(stderr, "  round trip mismatch:\n");
            s_print_hex("input", c->text, (size_t)n_text);
            s_print_hex("decoded", c->dec, m > 0 ? (size_t)m : 0);
        }
    }
}

static void test_encode_golden(void) {
    REQUIRE(s_tok);
    s_enc_ctx_t c = {0};
    c.got = malloc(S_MAX_IDS * sizeof(int32_t));
    c.want = malloc(S_MAX_IDS * sizeof(int32_t));
    c.text = malloc(1 << 20);
    c.dec = malloc(1 << 20);
    for (int32_t id = 0; id < eng_tok_vocab_size(s_tok); id++) {
        size_t len;
        const char *p = eng_tok_piece(s_tok, id, &len);
        if (len == 1) c.representable[(unsigned char)p[0]] = true;
    }
    long n_lines = s_for_lines("encode.tsv", s_encode_line, &c);
    fprintf(stderr,
            "  %ld encode cases, %ld mismatches; %ld round trips (%ld skipped: invalid UTF-8 or bytes "
            "without a token)\n",
            c.n_cases, c.n_bad, c.n_roundtrip, c.n_roundtrip_skipped);
    CHECK(n_lines >= 500);
    CHECK_EQ_INT(c.n_bad, 0);
    free(c.got);
    free(c.want);
    free(c.text);
    free(c.dec);
}

/* ---- golden decode and streaming ---- */

typedef struct {
    int32_t *ids;
    char *want, *got, *chunk;
    long n_cases, n_bad;
} s_dec_ctx_t;

static void s_decode_line(const char *line, size_t len, void *ctx) {
    s_dec_ctx_t *c = ctx;
    s_fields_t f = s_split_tabs(line, len);
    long n_ids = f.n_fields == 2 ? s_parse_ids(f.f[0], f.n[0], c->ids, S_MAX_IDS) : -1;
    long n_want = n_ids >= 0 ? s_unhex(f.f[1], f.n[1], c->want) : -1;
    if (n_want < 0) {
        c->n_bad++;
        fprintf(stderr, "  malformed golden line: %.60s\n", line);
        return;
    }
    c->n_cases++;
    int64_t n = eng_tok_decode(s_tok, c->ids, n_ids, c->got, 1 << 20);
    bool ok = n == n_want && memcmp(c->got, c->want, (size_t)n_want) == 0;

    /* streaming: every chunk is valid UTF-8 and the chunks add up to the whole decode */
    eng_detok_t d;
    eng_detok_init(&d);
    size_t total = 0, cap = eng_detok_max_bytes(s_tok);
    bool chunks_valid = true;
    for (long i = 0; i < n_ids; i++) {
        int64_t k = eng_detok_push(&d, s_tok, c->ids[i], c->chunk, cap);
        if (k < 0) {
            chunks_valid = false;
            break;
        }
        chunks_valid = chunks_valid && s_valid_utf8(c->chunk, (size_t)k);
        memcpy(c->got + total, c->chunk, (size_t)k);
        total += (size_t)k;
    }
    int64_t k = eng_detok_flush(&d, c->chunk, cap);
    if (k > 0) {
        chunks_valid = chunks_valid && s_valid_utf8(c->chunk, (size_t)k);
        memcpy(c->got + total, c->chunk, (size_t)k);
        total += (size_t)k;
    }
    ok = ok && chunks_valid && total == (size_t)n_want && memcmp(c->got, c->want, total) == 0;
    if (!ok && ++c->n_bad <= 5) {
        fprintf(stderr, "  decode mismatch (whole %lld bytes, streamed %zu bytes, chunks valid %d):\n", (long long)n,
                total, chunks_valid);
        s_print_ids("ids", c->ids, n_ids);
        s_print_hex("want", c->want, (size_t)n_want);
    }
}

static void test_decode_golden(void) {
    REQUIRE(s_tok);
    s_dec_ctx_t c = {0};
    c.ids = malloc(S_MAX_IDS * sizeof(int32_t));
    c.want = malloc(1 << 20);
    c.got = malloc(1 << 20);
    c.chunk = malloc(eng_detok_max_bytes(s_tok));
    long n_lines = s_for_lines("decode.tsv", s_decode_line, &c);
    fprintf(stderr, "  %ld decode cases (whole and streamed), %ld mismatches\n", c.n_cases, c.n_bad);
    CHECK(n_lines >= 500);
    CHECK_EQ_INT(c.n_bad, 0);
    free(c.ids);
    free(c.want);
    free(c.got);
    free(c.chunk);
}

/* An emoji split over byte tokens comes out only when complete; a broken one as U+FFFD. */
static void test_detok_partial(void) {
    REQUIRE(s_tok);
    static const unsigned char emoji[4] = {0xF0, 0x9F, 0x98, 0x80};
    int32_t byte_tok[4];
    for (int i = 0; i < 4; i++) {
        byte_tok[i] = -1; /* the token whose piece is this one byte */
        for (int32_t id = 0; id < eng_tok_vocab_size(s_tok) && byte_tok[i] < 0; id++) {
            size_t len;
            const char *p = eng_tok_piece(s_tok, id, &len);
            if (len == 1 && (unsigned char)p[0] == emoji[i]) byte_tok[i] = id;
        }
        REQUIRE(byte_tok[i] >= 0);
    }
    size_t cap = eng_detok_max_bytes(s_tok);
    char *out = malloc(cap);
    eng_detok_t d;
    eng_detok_init(&d);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[i], out, cap), 0);
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[3], out, cap), 4);
    CHECK(memcmp(out, emoji, 4) == 0);
    CHECK_EQ_INT(eng_detok_flush(&d, out, cap), 0);

    /* cut short, then plain text: one U+FFFD, then the text */
    eng_detok_init(&d);
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[0], out, cap), 0);
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[1], out, cap), 0);
    int64_t n = eng_detok_push(&d, s_tok, eng_tok_find(s_tok, "a"), out, cap);
    CHECK(n == 4 && memcmp(out,
                           "\xEF\xBF\xBD"
                           "a",
                           4) == 0);
    /* cut short at the end of the stream: flush gives one U+FFFD */
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[0], out, cap), 0);
    n = eng_detok_flush(&d, out, cap);
    CHECK(n == 3 && memcmp(out, "\xEF\xBF\xBD", 3) == 0);
    CHECK_EQ_INT(eng_detok_flush(&d, out, cap), 0);

    /* buffer contract */
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, byte_tok[0], out, cap - 1), PD_ERANGE);
    CHECK_EQ_INT(eng_detok_push(&d, s_tok, -5, out, cap), PD_EINVAL);
    free(out);
}

static void test_api_edges(void) {
    REQUIRE(s_tok);
    int32_t ids[8];
    CHECK_EQ_INT(eng_tok_encode(s_tok, "", 0, true, ids, 8), 0);
    CHECK_EQ_INT(eng_tok_encode(s_tok, NULL, 0, true, ids, 8), 0);
    CHECK_EQ_INT(eng_tok_encode(s_tok, NULL, 3, true, ids, 8), PD_EINVAL);
    CHECK_EQ_INT(eng_tok_encode(s_tok, "abc", 3, true, NULL, 4), PD_EINVAL);
    /* more ids than room: the full count comes back, the first cap are written */
    const char *text = "Hello world, how are you?";
    int64_t n = eng_tok_encode(s_tok, text, strlen(text), true, ids, 2);
    int32_t all[32];
    CHECK_EQ_INT(eng_tok_encode(s_tok, text, strlen(text), true, all, 32), n);
    CHECK(n > 2 && ids[0] == all[0] && ids[1] == all[1]);
    /* parse_special only changes special tokens */
    n = eng_tok_encode(s_tok, "<|im_end|>", 10, true, ids, 8);
    CHECK(n == 1 && ids[0] == 2);
    CHECK(eng_tok_encode(s_tok, "<|im_end|>", 10, false, ids, 8) > 1);
    /* decode: size query, bad id, partial buffer */
    char out[64];
    CHECK_EQ_INT(eng_tok_decode(s_tok, all, 3, NULL, 0), 12); /* "Hello world," */
    CHECK_EQ_INT(eng_tok_decode(s_tok, (int32_t[]){5, 999999}, 2, out, sizeof out), PD_EINVAL);
    CHECK_EQ_INT(eng_tok_decode(s_tok, all, 3, out, 4), 12);
    CHECK(memcmp(out, "Hell", 4) == 0);
}

/* ---- speed ---- */

static double s_encode_mb_per_s(const char *text, size_t len, int32_t *ids, int64_t cap) {
    uint64_t t0 = pd_now_us();
    int64_t n = eng_tok_encode(s_tok, text, len, true, ids, cap);
    uint64_t dt = pd_now_us() - t0;
    CHECK(n > 0);
    return (double)len / (dt ? (double)dt : 1.0);
}

static void test_encode_speed(void) {
    REQUIRE(s_tok);
    static const char *para =
        "The history of natural language processing generally started in the 1950s, although work can be found "
        "from earlier periods. In 1950, Alan Turing published an article titled \"Computing Machinery and "
        "Intelligence\" which proposed what is now called the Turing test as a criterion of intelligence. "
        "Up to the 1980s, most natural language processing systems were based on complex sets of hand-written "
        "rules; starting in the late 1980s, however, there was a revolution with the introduction of machine "
        "learning algorithms for language processing. Today's models don't just count words -- they're trained "
        "on trillions of tokens, and we'll see where it goes.\n\n";
    size_t plen = strlen(para), len = 0, cap_bytes = 4u << 20;
    char *text = malloc(cap_bytes);
    while (len + plen < cap_bytes) {
        memcpy(text + len, para, plen);
        len += plen;
    }
    int32_t *ids = malloc(len * sizeof(int32_t));
    double best = 0;
    for (int rep = 0; rep < 3; rep++) {
        double r = s_encode_mb_per_s(text, len, ids, (int64_t)len);
        if (r > best) best = r;
    }
    fprintf(stderr, "  encode speed, English prose: %.1f MB/s (%zu bytes, best of 3)\n", best, len);

    /* mixed scripts (report only): the range-table lookups and multi-byte pieces cost more */
    static const char *mixed = "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C\xEF\xBC\x81 "
                               "\xD0\x9F\xD1\x80\xD0\xB8\xD0\xB2\xD0\xB5\xD1\x82, \xD0\xBC\xD0\xB8\xD1\x80! "
                               "caf\xC3\xA9 \xF0\x9F\x98\x80 x = 12345; ";
    size_t mlen = strlen(mixed), n_mixed = 0;
    while (n_mixed + mlen < len) {
        memcpy(text + n_mixed, mixed, mlen);
        n_mixed += mlen;
    }
    fprintf(stderr, "  encode speed, mixed scripts: %.1f MB/s (%zu bytes)\n",
            s_encode_mb_per_s(text, n_mixed, ids, (int64_t)len), n_mixed);
#if defined(__SANITIZE_ADDRESS__)
    (void)best; /* sanitizers slow everything: report only */
#else
    CHECK(best > 1.0);
#endif
    free(ids);
    free(text);
}

int main(void) {
    PD_TEST_RUN(test_load);
    PD_TEST_RUN(test_meta);
    PD_TEST_RUN(test_encode_golden);
    PD_TEST_RUN(test_decode_golden);
    PD_TEST_RUN(test_detok_partial);
    PD_TEST_RUN(test_api_edges);
    PD_TEST_RUN(test_encode_speed);
    eng_tok_destroy(&s_tok);
    eng_gguf_destroy(&s_gguf);
    return pd_test_finish();
}
