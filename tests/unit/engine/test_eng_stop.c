/* test_eng_stop.c: stop strings across feed boundaries, checked case by case and against a brute-force
 * reference of the semantics in eng_stop.h (first match by end position, longest on a tie; hold-back of
 * the longest tail that is a proper prefix of a stop string) over random texts and random chunkings. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "eng_stop.h"
#include "pd_test.h"

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

/* ---- helpers ---- */

static uint64_t t_state = 0x9e3779b97f4a7c15ull;
static uint32_t t_rand(uint32_t n) {
    t_state ^= t_state << 13;
    t_state ^= t_state >> 7;
    t_state ^= t_state << 17;
    return (uint32_t)(t_state % n);
}

typedef struct {
    char text[4096];
    size_t n;
    bool is_hit;
} t_out_t;

/* Feeds text whole (chunks NULL) or in chunks of the given sizes, then flushes when flush is set and
 * there was no hit. Checks that nothing arrives after a hit. */
static void t_run(eng_stop_t *st, const char *text, const size_t *chunks, int n_chunks, bool flush, t_out_t *o) {
    const size_t len = strlen(text);
    char buf[4096 + ENG_STOP_MAX_BYTES];
    size_t pos = 0;
    o->n = 0;
    o->is_hit = false;
    for (int c = 0; chunks ? c < n_chunks && pos < len : c < 1; c++) {
        size_t n = chunks ? (chunks[c] < len - pos ? chunks[c] : len - pos) : len;
        bool hit = false;
        int64_t k = eng_stop_feed(st, text + pos, n, buf, sizeof buf, &hit);
        REQUIRE(k >= 0);
        if (o->is_hit) CHECK_MSG(k == 0 && hit, "output after the hit");
        memcpy(o->text + o->n, buf, (size_t)k);
        o->n += (size_t)k;
        o->is_hit = o->is_hit || hit;
        pos += n;
    }
    if (flush && !o->is_hit) {
        int64_t k = eng_stop_flush(st, buf, sizeof buf);
        REQUIRE(k >= 0);
        memcpy(o->text + o->n, buf, (size_t)k);
        o->n += (size_t)k;
    }
    o->text[o->n] = 0;
}

/* Runs text through stops fed as one piece, byte by byte, and in pairs; all must give want. */
static void t_expect(const char *const *stops, int n_stops, const char *text, const char *want, bool want_hit,
                     int want_which) {
    size_t ones[4096];
    size_t twos[4096];
    for (int i = 0; i < 4096; i++) ones[i] = 1, twos[i] = 2;
    size_t len = strlen(text);
    for (int mode = 0; mode < 3; mode++) {
        char err[128];
        eng_stop_t *st = eng_stop_create(stops, n_stops, err, sizeof err);
        REQUIRE(st);
        t_out_t o;
        if (mode == 0) t_run(st, text, NULL, 0, true, &o);
        if (mode == 1) t_run(st, text, ones, (int)len, true, &o);
        if (mode == 2) t_run(st, text, twos, (int)(len + 1) / 2, true, &o);
        CHECK_MSG(strcmp(o.text, want) == 0 && o.is_hit == want_hit,
                  "text \"%s\" mode %d: got \"%s\" hit %d, want \"%s\" hit %d", text, mode, o.text, o.is_hit, want,
                  want_hit);
        CHECK_EQ_INT(eng_stop_which(st), want_which);
        eng_stop_destroy(&st);
        CHECK(st == NULL);
    }
}

/* ---- the reference ---- */

/* Output of the whole text under the documented rule; sets *which (-1 without a match). */
static size_t t_ref_output(const char *text, size_t len, const char *const *stops, int n_stops, int *which) {
    for (size_t e = 0; e < len; e++) {
        int best = -1;
        for (int j = 0; j < n_stops; j++) {
            size_t l = strlen(stops[j]);
            if (l <= e + 1 && memcmp(text + e + 1 - l, stops[j], l) == 0 && (best < 0 || l > strlen(stops[best])))
                best = j;
        }
        if (best >= 0) {
            *which = best;
            return e + 1 - strlen(stops[best]);
        }
    }
    *which = -1;
    return len;
}

/* Bytes the matcher must hold after seeing text[0..len) without a match: the longest suffix that is a
 * proper prefix of some stop string. */
static size_t t_ref_held(const char *text, size_t len, const char *const *stops, int n_stops) {
    size_t best = 0;
    for (int j = 0; j < n_stops; j++) {
        size_t l = strlen(stops[j]);
        for (size_t k = l - 1; k > best; k--)
            if (k <= len && memcmp(text + len - k, stops[j], k) == 0) {
                best = k;
                break;
            }
    }
    return best;
}

/* ---- cases ---- */

static void test_basic(void) {
    const char *stop[] = {"STOP"};
    t_expect(stop, 1, "hello STOP world", "hello ", true, 0);
    t_expect(stop, 1, "no stop here", "no stop here", false, -1);
    t_expect(stop, 1, "STOP", "", true, 0);
    t_expect(stop, 1, "STO", "STO", false, -1); /* flushed */
    t_expect(stop, 1, "STSTOP", "ST", true, 0); /* restart inside a partial match */
    t_expect(stop, 1, "SSTOPSTOP", "S", true, 0);
    t_expect(stop, 1, "stop STOp STOP", "stop STOp ", true, 0);
    t_expect(stop, 0, "STOP passes", "STOP passes", false, -1); /* no stop strings */
}

static void test_hold_back(void) {
    const char *stop[] = {"STOP"};
    char err[64], out[512];
    bool hit = false;
    eng_stop_t *st = eng_stop_create(stop, 1, err, sizeof err);
    REQUIRE(st);
    CHECK(eng_stop_feed(st, "abc S", 5, out, sizeof out, &hit) == 4 && !memcmp(out, "abc ", 4) && !hit);
    CHECK(eng_stop_feed(st, "T", 1, out, sizeof out, &hit) == 0 && !hit); /* "ST" held */
    CHECK(eng_stop_feed(st, "", 0, out, sizeof out, &hit) == 0 && !hit);  /* empty feed */
    CHECK(eng_stop_feed(NULL, "", 0, out, sizeof out, &hit) == PD_EINVAL);
    CHECK(eng_stop_feed(st, NULL, 0, out, sizeof out, &hit) == 0); /* NULL text, len 0 */
    CHECK(eng_stop_feed(st, "Ox", 2, out, sizeof out, &hit) == 4 && !memcmp(out, "STOx", 4) && !hit); /* released */
    CHECK(eng_stop_feed(st, "STO", 3, out, sizeof out, &hit) == 0 && !hit);
    CHECK(eng_stop_flush(st, out, sizeof out) == 3 && !memcmp(out, "STO", 3)); /* flush releases */
    CHECK(eng_stop_flush(st, out, sizeof out) == 0);
    /* after a flush the text starts afresh: "P" alone does not complete "STO" + "P" */
    CHECK(eng_stop_feed(st, "P", 1, out, sizeof out, &hit) == 1 && out[0] == 'P' && !hit);
    CHECK(eng_stop_feed(st, "ST", 2, out, sizeof out, &hit) == 0 && !hit);
    CHECK(eng_stop_feed(st, "OP and more", 11, out, sizeof out, &hit) == 0 && hit);
    CHECK(eng_stop_feed(st, "more", 4, out, sizeof out, &hit) == 0 && hit); /* nothing after the hit */
    CHECK(eng_stop_flush(st, out, sizeof out) == 0);                        /* a hit is final */
    CHECK(eng_stop_feed(st, "x", 1, out, sizeof out, &hit) == 0 && hit);
    CHECK_EQ_INT(eng_stop_which(st), 0);
    eng_stop_destroy(&st);

    /* buffer contract */
    st = eng_stop_create(stop, 1, err, sizeof err);
    REQUIRE(st);
    CHECK(eng_stop_feed(st, "abcdef", 6, out, 6 + ENG_STOP_MAX_BYTES - 1, &hit) == PD_ERANGE);
    CHECK(eng_stop_feed(st, "abcdef", 6, out, 6 + ENG_STOP_MAX_BYTES, &hit) == 6);
    CHECK(eng_stop_flush(st, out, ENG_STOP_MAX_BYTES - 1) == PD_ERANGE);
    CHECK(eng_stop_flush(NULL, out, sizeof out) == PD_EINVAL);
    eng_stop_destroy(&st);
}

static void test_overlap(void) {
    const char *abab[] = {"abab"};
    t_expect(abab, 1, "ababab", "", true, 0);
    t_expect(abab, 1, "aababab", "a", true, 0);
    t_expect(abab, 1, "abaabab", "aba", true, 0);
    t_expect(abab, 1, "abaaba", "abaaba", false, -1);
    const char *aab[] = {"aab"};
    t_expect(aab, 1, "aaab", "a", true, 0);
    t_expect(aab, 1, "aaaaaaab", "aaaaa", true, 0);
    const char *kmp[] = {"abcabd"};
    t_expect(kmp, 1, "abcabcabd", "abc", true, 0);
    t_expect(kmp, 1, "abcababcabd", "abcab", true, 0);
}

static void test_multiple(void) {
    /* the first to complete wins, even if another would have started earlier */
    const char *s1[] = {"abcd", "bc"};
    t_expect(s1, 2, "xabcd", "xa", true, 1);
    /* both complete at the same byte: the longest wins */
    const char *s2[] = {"bc", "abc"};
    t_expect(s2, 2, "xabc", "x", true, 1);
    const char *s3[] = {"abc", "bc"};
    t_expect(s3, 2, "xabc", "x", true, 0);
    /* duplicates: the lowest index */
    const char *s4[] = {"zz", "end", "end"};
    t_expect(s4, 3, "the end.", "the ", true, 1);
    /* the held tail is the longest over all stops */
    const char *s5[] = {"</s>", "<|im_end|>"};
    t_expect(s5, 2, "reply<|im_e", "reply<|im_e", false, -1);
    t_expect(s5, 2, "reply<|im_end|> more", "reply", true, 1);
    t_expect(s5, 2, "a</b></s>", "a</b>", true, 0);
    /* eight stop strings */
    const char *s6[] = {"q1", "q2", "q3", "q4", "q5", "q6", "q7", "x"};
    t_expect(s6, 8, "aq3q7", "a", true, 2);
}

static void test_utf8(void) {
    const char *ja[] = {"。"}; /* E3 80 82 */
    t_expect(ja, 1, "こんにちは。世界", "こんにちは", true, 0);
    /* "€" (E2 82 AC) shares two leading bytes with "₂" (E2 82 82): held, then released whole */
    const char *euro[] = {"€"};
    t_expect(euro, 1, "H₂O costs 5€!", "H₂O costs 5", true, 0);
    t_expect(euro, 1, "H₂O", "H₂O", false, -1);
    const char *multi[] = {"終わり", "🛑"}; /* 4-byte emoji */
    t_expect(multi, 2, "ok 🛑 then 終わり", "ok ", true, 1);
    t_expect(multi, 2, "物語の終わり。", "物語の", true, 0);
    /* the held bytes never split a character: emitted text stays valid UTF-8 per feed */
    char err[64], out[512];
    bool hit = false;
    eng_stop_t *st = eng_stop_create(euro, 1, err, sizeof err);
    REQUIRE(st);
    const char *t = "a₂";                                                        /* 61 E2 82 82 */
    CHECK(eng_stop_feed(st, t, 3, out, sizeof out, &hit) == 1 && out[0] == 'a'); /* E2 82 held */
    CHECK(eng_stop_feed(st, t + 3, 1, out, sizeof out, &hit) == 3 && !memcmp(out, "₂", 3));
    eng_stop_destroy(&st);
}

static void test_long_stop(void) {
    static char stop[ENG_STOP_MAX_BYTES + 2], text[2100], want[2100];
    memset(stop, 'a', ENG_STOP_MAX_BYTES - 1);
    stop[ENG_STOP_MAX_BYTES - 1] = 'b';
    stop[ENG_STOP_MAX_BYTES] = 0;
    const char *stops[] = {stop};
    memset(text, 'a', 1000);
    strcpy(text + 1000, "b tail");
    memset(want, 'a', 1000 - (ENG_STOP_MAX_BYTES - 1));
    want[1000 - (ENG_STOP_MAX_BYTES - 1)] = 0;
    t_expect(stops, 1, text, want, true, 0);
    /* the whole run of a's except the last 255 is emitted before the b arrives */
    char err[64];
    static char out[2100 + ENG_STOP_MAX_BYTES];
    bool hit = false;
    eng_stop_t *st = eng_stop_create(stops, 1, err, sizeof err);
    REQUIRE(st);
    CHECK_EQ_INT(eng_stop_feed(st, text, 1000, out, sizeof out, &hit), 1000 - (ENG_STOP_MAX_BYTES - 1));
    CHECK_EQ_INT(eng_stop_flush(st, out, sizeof out), ENG_STOP_MAX_BYTES - 1);
    eng_stop_destroy(&st);
}

static void test_create_errors(void) {
    char err[128];
    static char big[ENG_STOP_MAX_BYTES + 2];
    memset(big, 'x', ENG_STOP_MAX_BYTES + 1);
    const char *nine[] = {"1", "2", "3", "4", "5", "6", "7", "8", "9"};
    CHECK(eng_stop_create(nine, 9, err, sizeof err) == NULL && strstr(err, "at most 8"));
    CHECK(eng_stop_create(nine, -1, err, sizeof err) == NULL);
    const char *empty[] = {"ok", ""};
    CHECK(eng_stop_create(empty, 2, err, sizeof err) == NULL && strstr(err, "stop string 1"));
    const char *null[] = {NULL};
    CHECK(eng_stop_create(null, 1, err, sizeof err) == NULL && strstr(err, "missing"));
    CHECK(eng_stop_create(NULL, 1, err, sizeof err) == NULL);
    const char *toolong[] = {big};
    CHECK(eng_stop_create(toolong, 1, err, sizeof err) == NULL && strstr(err, "257 bytes"));
    CHECK(eng_stop_create(toolong, 1, NULL, 0) == NULL); /* err is optional */
    big[ENG_STOP_MAX_BYTES] = 0;
    eng_stop_t *st = eng_stop_create(toolong, 1, err, sizeof err); /* exactly the maximum */
    CHECK(st != NULL);
    eng_stop_destroy(&st);
    eng_stop_destroy(&st);
    eng_stop_destroy(NULL);
    st = eng_stop_create(NULL, 0, err, sizeof err);
    CHECK(st != NULL);
    eng_stop_destroy(&st);
}

/* Random texts over {a, b, c}, random stop strings, random chunkings (empty chunks included): after every
 * feed the output so far must be exactly the reference's, hold-back included. */
static void test_random_vs_reference(void) {
    char text[80], stop_buf[ENG_STOP_MAX][8], out[80 + ENG_STOP_MAX_BYTES], got[200];
    const char *stops[ENG_STOP_MAX];
    int n_trials = 0, n_hits = 0;
    for (int trial = 0; trial < 20000; trial++) {
        int n_stops = 1 + (int)t_rand(trial % 4 == 0 ? ENG_STOP_MAX : 3);
        for (int j = 0; j < n_stops; j++) {
            int l = 1 + (int)t_rand(5);
            for (int k = 0; k < l; k++) stop_buf[j][k] = (char)('a' + t_rand(3));
            stop_buf[j][l] = 0;
            stops[j] = stop_buf[j];
        }
        size_t len = t_rand(60);
        for (size_t k = 0; k < len; k++) text[k] = (char)('a' + t_rand(3));
        text[len] = 0;
        int ref_which;
        size_t ref_n = t_ref_output(text, len, stops, n_stops, &ref_which);

        char err[64];
        eng_stop_t *st = eng_stop_create(stops, n_stops, err, sizeof err);
        REQUIRE(st);
        size_t pos = 0, n_got = 0;
        bool is_hit = false;
        while (pos < len || pos == 0) {
            size_t n = t_rand(8);
            if (n > len - pos) n = len - pos;
            bool hit = false;
            int64_t k = eng_stop_feed(st, text + pos, n, out, sizeof out, &hit);
            REQUIRE(k >= 0);
            memcpy(got + n_got, out, (size_t)k);
            n_got += (size_t)k;
            pos += n;
            /* expected so far: the reference on the prefix fed */
            int w;
            size_t ref_prefix = t_ref_output(text, pos, stops, n_stops, &w);
            size_t want = w >= 0 ? ref_prefix : pos - t_ref_held(text, pos, stops, n_stops);
            CHECK_MSG(hit == (w >= 0) && n_got == want && memcmp(got, text, n_got) == 0,
                      "trial %d text \"%s\" after %zu bytes: %zu out, want %zu, hit %d", trial, text, pos, n_got, want,
                      hit);
            if (pd_test_cur_failed) break;
            is_hit = hit;
            if (len == 0 || hit) break;
        }
        if (!is_hit) {
            int64_t k = eng_stop_flush(st, out, sizeof out);
            REQUIRE(k >= 0);
            memcpy(got + n_got, out, (size_t)k);
            n_got += (size_t)k;
        }
        CHECK_MSG(n_got == ref_n && memcmp(got, text, n_got) == 0 && is_hit == (ref_which >= 0),
                  "trial %d: text \"%s\": got %zu bytes, want %zu", trial, text, n_got, ref_n);
        CHECK_EQ_INT(eng_stop_which(st), ref_which);
        eng_stop_destroy(&st);
        n_trials++;
        n_hits += ref_which >= 0;
        if (pd_test_cur_failed) break;
    }
    fprintf(stderr, "     %d random texts, %d with a match\n", n_trials, n_hits);
}

static void test_timing(void) {
    enum { N = 1 << 20 };
    static char text[N], out[64 + ENG_STOP_MAX_BYTES];
    for (int i = 0; i < N; i++) text[i] = (char)('a' + t_rand(4));
    /* none can match (each ends in a byte the text lacks), so every byte goes through all 8 automata */
    const char *stops[ENG_STOP_MAX] = {"abcdabcdX",
                                       "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaX",
                                       "dddd dd",
                                       "<|im_end|>",
                                       "ababababababababababababababababX",
                                       "cccccccccccccX",
                                       "x",
                                       "abcaX"};
    char err[64];
    eng_stop_t *st = eng_stop_create(stops, ENG_STOP_MAX, err, sizeof err);
    REQUIRE(st);
    struct timespec t0, t1;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t0);
    size_t n_out = 0;
    bool hit = false;
    for (int i = 0; i < N && !hit; i += 4) { /* 4-byte "tokens" */
        int64_t k = eng_stop_feed(st, text + i, 4, out, sizeof out, &hit);
        REQUIRE(k >= 0);
        n_out += (size_t)k;
    }
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t1);
    double ns = (double)(t1.tv_sec - t0.tv_sec) * 1e9 + (double)(t1.tv_nsec - t0.tv_nsec);
    fprintf(stderr, "     timing: 8 stop strings, 1 MiB in 4-byte feeds: %.1f ns/byte (%zu bytes out, hit %d)\n",
            ns / N, n_out, hit);
    eng_stop_destroy(&st);
}

int main(void) {
    PD_TEST_RUN(test_basic);
    PD_TEST_RUN(test_hold_back);
    PD_TEST_RUN(test_overlap);
    PD_TEST_RUN(test_multiple);
    PD_TEST_RUN(test_utf8);
    PD_TEST_RUN(test_long_stop);
    PD_TEST_RUN(test_create_errors);
    PD_TEST_RUN(test_random_vs_reference);
    PD_TEST_RUN(test_timing);
    return pd_test_finish();
}
