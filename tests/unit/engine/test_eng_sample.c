/* test_eng_sample.c: checks eng_sample.c against definitions recomputed here in double precision
 * (argmax, softmax, top-k/top-p/min-p support, penalty formulas, log_softmax, the documented RNG), plus
 * chi-square tests of the draw frequencies. Prints timings at vocab 49152; asserts none of them. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime */
#include "eng_sample.h"
#include "eng_sample_int.h"
#include "pd_test.h"

#include <float.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#define T_VOCAB 49152

/* ---- test-side helpers ---- */

/* Test data generator (independent of the sampler's RNG). */
static uint64_t t_state = 0x1234567887654321ull;
static uint64_t t_next(void) {
    t_state ^= t_state << 13;
    t_state ^= t_state >> 7;
    t_state ^= t_state << 17;
    return t_state;
}
static double t_unif(void) {
    return (double)(t_next() >> 11) * 0x1.0p-53;
}
static double t_normal(void) {
    double u1 = t_unif(), u2 = t_unif();
    if (u1 < 1e-300) u1 = 1e-300;
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}
static int32_t t_randint(int32_t n) {
    return (int32_t)(t_next() % (uint64_t)n);
}

static void t_fill_normal(float *x, int32_t n, double scale) {
    for (int32_t i = 0; i < n; i++) x[i] = (float)(scale * t_normal());
}

/* The RNG as documented in eng_sample.h: splitmix64 seeding, xoshiro256**, u = (next >> 11) * 2^-53. */
typedef struct {
    uint64_t s[4];
} t_rng_t;
static uint64_t t_splitmix(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static t_rng_t t_rng_seed(uint64_t seed) {
    t_rng_t r;
    for (int i = 0; i < 4; i++) r.s[i] = t_splitmix(&seed);
    return r;
}
static double t_rng_uniform(t_rng_t *r) {
    uint64_t *s = r->s;
    uint64_t x = s[1] * 5;
    uint64_t result = ((x << 7) | (x >> 57)) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (double)(result >> 11) * 0x1.0p-53;
}

static eng_sampler_t *t_make(float temperature, int32_t top_k, float top_p, float min_p, uint64_t seed,
                             int32_t n_vocab) {
    eng_sampling_t p = eng_sampling_default();
    p.temperature = temperature;
    p.top_k = top_k;
    p.top_p = top_p;
    p.min_p = min_p;
    p.seed = seed;
    p.has_seed = true;
    return eng_sampler_create(&p, n_vocab);
}

/* Reference ranking: by p descending, equal p by lower id. */
static const double *t_sort_key;
static int t_cmp_rank(const void *a, const void *b) {
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    if (t_sort_key[i] != t_sort_key[j]) return t_sort_key[i] > t_sort_key[j] ? -1 : 1;
    return (i > j) - (i < j);
}
static void t_rank(const double *p, int32_t *order, int32_t n) {
    for (int32_t i = 0; i < n; i++) order[i] = i;
    t_sort_key = p;
    qsort(order, (size_t)n, sizeof *order, t_cmp_rank);
}
static int t_cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Reference for steps 3-4 of eng_sample.h, in double, straight from the definitions. Fills order[0..n)
 * with the kept tokens in rank order and p[] with exp((x - max) / T); returns n, or -1 when a value lies
 * within rel_margin of a decision boundary (the float implementation may then legitimately differ). */
static int32_t t_ref_support(const float *x, int32_t n_vocab, double temperature, int32_t top_k, double top_p,
                             double min_p, double *p, int32_t *order, double rel_margin) {
    double x_max = -INFINITY;
    for (int32_t i = 0; i < n_vocab; i++) x_max = x[i] > x_max ? x[i] : x_max;
    int32_t n = 0; /* tokens with p / p_max under e^-87 are never drawn (eng_sample.h, step 3) */
    for (int32_t i = 0; i < n_vocab; i++) {
        double d = ((double)x[i] - x_max) / temperature;
        if (fabs(d + 87.0) < 1e-4) return -1;
        p[i] = d < -87.0 ? 0.0 : exp(d);
        n += p[i] > 0.0;
    }
    t_rank(p, order, n_vocab); /* the zeros rank last */
    if (top_k > 0 && top_k < n) {
        double a = p[order[top_k - 1]], b = p[order[top_k]];
        if (a != b && a - b < rel_margin * a) return -1;
        n = top_k;
    }
    if (top_p < 1.0) {
        double total = 0.0, cum = 0.0;
        for (int32_t i = 0; i < n; i++) total += p[order[i]];
        int32_t m = n;
        for (int32_t i = 0; i < n; i++) {
            double prev = cum;
            cum += p[order[i]];
            if (cum >= top_p * total) {
                if (top_p - prev / total < rel_margin || cum / total - top_p < rel_margin) return -1;
                m = i + 1;
                break;
            }
        }
        n = m;
    }
    if (min_p > 0.0) {
        int32_t m = 0;
        for (int32_t i = 0; i < n; i++) {
            double ratio = p[order[i]]; /* p_max = 1 */
            if (ratio != min_p && fabs(ratio - min_p) < rel_margin * min_p) return -1;
            if (ratio >= min_p) order[m++] = order[i];
        }
        n = m;
    }
    return n;
}

/* ---- validation ---- */

static void test_validate(void) {
    char err[160];
    eng_sampling_t d = eng_sampling_default();
    CHECK_EQ_INT(eng_sampling_validate(&d, err, sizeof err), PD_OK);
    CHECK(eng_sampling_validate(NULL, err, sizeof err) == PD_EINVAL);
    CHECK(d.temperature == 1.0f && d.top_k == 0 && d.top_p == 1.0f && d.min_p == 0.0f);
    CHECK(d.repetition_penalty == 1.0f && d.presence_penalty == 0.0f && d.frequency_penalty == 0.0f);
    CHECK(!d.has_seed && d.n_logprobs == 0);

    /* boundary values that must pass */
    struct {
        const char *field;
        float v;
    } good[] = {
        {"temperature", 0.0f},
        {"temperature", 100.0f},
        {"top_p", 1.0f},
        {"top_p", 1e-6f},
        {"min_p", 0.0f},
        {"min_p", 1.0f},
        {"repetition_penalty", 10.0f},
        {"repetition_penalty", 1e-3f},
        {"presence_penalty", -2.0f},
        {"presence_penalty", 2.0f},
        {"frequency_penalty", -2.0f},
        {"frequency_penalty", 2.0f},
    };
    /* values that must fail, per float field */
    const float nan_v = NAN, inf_v = INFINITY;
    struct {
        const char *field;
        float v;
    } bad[] = {
        {"temperature", -1e-6f},
        {"temperature", 100.001f},
        {"temperature", nan_v},
        {"temperature", inf_v},
        {"temperature", -inf_v},
        {"top_p", 0.0f},
        {"top_p", -0.5f},
        {"top_p", 1.0001f},
        {"top_p", nan_v},
        {"top_p", inf_v},
        {"min_p", -1e-6f},
        {"min_p", 1.0001f},
        {"min_p", nan_v},
        {"min_p", -inf_v},
        {"repetition_penalty", 0.0f},
        {"repetition_penalty", -1.0f},
        {"repetition_penalty", 10.001f},
        {"repetition_penalty", nan_v},
        {"repetition_penalty", inf_v},
        {"presence_penalty", -2.001f},
        {"presence_penalty", 2.001f},
        {"presence_penalty", nan_v},
        {"presence_penalty", inf_v},
        {"presence_penalty", -inf_v},
        {"frequency_penalty", -2.001f},
        {"frequency_penalty", 2.001f},
        {"frequency_penalty", nan_v},
        {"frequency_penalty", inf_v},
        {"frequency_penalty", -inf_v},
    };
    for (int pass = 0; pass < 2; pass++) {
        int n = pass == 0 ? (int)(sizeof good / sizeof good[0]) : (int)(sizeof bad / sizeof bad[0]);
        for (int i = 0; i < n; i++) {
            const char *field = pass == 0 ? good[i].field : bad[i].field;
            float v = pass == 0 ? good[i].v : bad[i].v;
            eng_sampling_t p = eng_sampling_default();
            if (!strcmp(field, "temperature")) p.temperature = v;
            if (!strcmp(field, "top_p")) p.top_p = v;
            if (!strcmp(field, "min_p")) p.min_p = v;
            if (!strcmp(field, "repetition_penalty")) p.repetition_penalty = v;
            if (!strcmp(field, "presence_penalty")) p.presence_penalty = v;
            if (!strcmp(field, "frequency_penalty")) p.frequency_penalty = v;
            err[0] = 0;
            pd_status st = eng_sampling_validate(&p, err, sizeof err);
            if (pass == 0) {
                CHECK_MSG(st == PD_OK, "%s = %g rejected: %s", field, (double)v, err);
            } else {
                char value[32];
                snprintf(value, sizeof value, "%g", (double)v);
                CHECK_MSG(st == PD_EINVAL, "%s = %g accepted", field, (double)v);
                CHECK_MSG(strstr(err, field) == err && strstr(err, value) && strstr(err, "must be"),
                          "message \"%s\" should name %s, %s and the range", err, field, value);
                CHECK(eng_sampler_create(&p, 100) == NULL);
            }
        }
    }
    /* integer fields */
    eng_sampling_t p = eng_sampling_default();
    p.top_k = -1;
    CHECK(eng_sampling_validate(&p, err, sizeof err) == PD_EINVAL && strstr(err, "top_k = -1"));
    p.top_k = 1 << 30;
    CHECK(eng_sampling_validate(&p, err, sizeof err) == PD_OK);
    p = eng_sampling_default();
    p.n_logprobs = -1;
    CHECK(eng_sampling_validate(&p, err, sizeof err) == PD_EINVAL && strstr(err, "n_logprobs = -1"));
    p.n_logprobs = ENG_MAX_LOGPROBS + 1;
    CHECK(eng_sampling_validate(&p, err, sizeof err) == PD_EINVAL && strstr(err, "n_logprobs = 21"));
    CHECK(eng_sampling_validate(&p, NULL, 0) == PD_EINVAL); /* err is optional */
    p.n_logprobs = ENG_MAX_LOGPROBS;
    CHECK(eng_sampling_validate(&p, err, sizeof err) == PD_OK);
}

static void test_create_destroy(void) {
    eng_sampling_t p = eng_sampling_default();
    CHECK(eng_sampler_create(&p, 0) == NULL);
    CHECK(eng_sampler_create(&p, -5) == NULL);
    CHECK(eng_sampler_create(NULL, 10) == NULL);
    eng_sampler_t *s = eng_sampler_create(&p, 10);
    REQUIRE(s);
    eng_sampler_destroy(&s);
    CHECK(s == NULL);
    eng_sampler_destroy(&s);
    eng_sampler_destroy(NULL);
    /* unseeded samplers get distinct seeds */
    eng_sampler_t *a = eng_sampler_create(&p, 10), *b = eng_sampler_create(&p, 10);
    REQUIRE(a && b);
    CHECK(eng_sampler_seed(a) != eng_sampler_seed(b));
    eng_sampler_destroy(&a);
    eng_sampler_destroy(&b);
    p.has_seed = true;
    p.seed = 42;
    a = eng_sampler_create(&p, 10);
    REQUIRE(a);
    CHECK(eng_sampler_seed(a) == 42);
    eng_sampler_destroy(&a);
}

/* ---- greedy ---- */

static int32_t t_argmax(const float *x, int32_t n) {
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (x[i] != -INFINITY && (best < 0 || x[i] > x[best])) best = i;
    return best;
}

static void test_greedy(void) {
    static float x[T_VOCAB];
    eng_sampler_t *s = t_make(0.0f, 0, 1.0f, 0.0f, 1, T_VOCAB);
    REQUIRE(s);
    eng_sample_result_t r;
    for (int trial = 0; trial < 50; trial++) {
        t_fill_normal(x, T_VOCAB, 3.0);
        if (trial % 5 == 1) { /* several equal maxima: the lowest id wins */
            float m = x[t_argmax(x, T_VOCAB)] + 1.0f;
            for (int k = 0; k < 4; k++) x[t_randint(T_VOCAB)] = m;
        }
        if (trial % 5 == 2) /* masked tokens, including the would-be best */
            for (int k = 0; k < 1000; k++) x[t_randint(T_VOCAB)] = -INFINITY;
        if (trial == 3) x[0] = x[T_VOCAB - 1] = 1e30f; /* ties at the two ends */
        REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
        CHECK_EQ_INT(r.token, t_argmax(x, T_VOCAB));
    }
    /* all-equal row and a single finite value */
    for (int32_t i = 0; i < T_VOCAB; i++) x[i] = 0.5f;
    REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
    CHECK_EQ_INT(r.token, 0);
    for (int32_t i = 0; i < T_VOCAB; i++) x[i] = -INFINITY;
    x[777] = -1e30f;
    REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
    CHECK_EQ_INT(r.token, 777);
    eng_sampler_destroy(&s);

    /* a tiny temperature is greedy in effect when logits differ by more than a few T */
    s = t_make(1e-6f, 0, 1.0f, 0.0f, 7, 100);
    REQUIRE(s);
    for (int trial = 0; trial < 200; trial++) {
        for (int32_t i = 0; i < 100; i++) x[i] = (float)t_randint(1000) * 0.01f;
        int32_t best = t_argmax(x, 100);
        x[best] += 0.001f;
        REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
        CHECK_EQ_INT(r.token, best);
    }
    eng_sampler_destroy(&s);
}

static void test_bad_logits(void) {
    float x[16];
    eng_sample_result_t r;
    for (int greedy = 0; greedy < 2; greedy++) {
        eng_sampler_t *s = t_make(greedy ? 0.0f : 1.0f, 0, 1.0f, 0.0f, 3, 16);
        REQUIRE(s);
        for (int i = 0; i < 16; i++) x[i] = (float)i;
        x[5] = NAN;
        CHECK(eng_sampler_sample(s, x, &r) == PD_EINVAL);
        x[5] = INFINITY;
        CHECK(eng_sampler_sample(s, x, &r) == PD_EINVAL);
        for (int i = 0; i < 16; i++) x[i] = -INFINITY;
        CHECK(eng_sampler_sample(s, x, &r) == PD_EINVAL);
        x[3] = -2.0f; /* one finite token is enough */
        CHECK(eng_sampler_sample(s, x, &r) == PD_OK && r.token == 3);
        CHECK(fabsf(r.logprob) < 1e-6f);
        CHECK(eng_sampler_sample(NULL, x, &r) == PD_EINVAL);
        CHECK(eng_sampler_sample(s, NULL, &r) == PD_EINVAL);
        CHECK(eng_sampler_sample(s, x, NULL) == PD_EINVAL);
        eng_sampler_destroy(&s);
    }
}

/* ---- distribution: chi-square ---- */

/* Upper 0.1% points of chi-square (p = 0.001) for 1..9 degrees of freedom. */
static const double t_chi2_crit[10] = {0, 10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877};

/* Draws n_draws tokens and checks every drawn token is in the support given by expected[] (> 0), and that
 * the frequencies pass a chi-square test at p = 0.001 (fixed seed, so the outcome is deterministic). */
static void t_check_frequencies(eng_sampler_t *s, const float *x, int32_t n_vocab, const double *expected, int n_draws,
                                const char *what) {
    long counts[64] = {0};
    eng_sample_result_t r;
    for (int d = 0; d < n_draws; d++) {
        if (eng_sampler_sample(s, x, &r) != PD_OK || r.token < 0 || r.token >= n_vocab) {
            CHECK_MSG(0, "%s: bad sample", what);
            return;
        }
        counts[r.token]++;
    }
    double chi2 = 0.0;
    int dof = -1;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (expected[i] == 0.0) {
            CHECK_MSG(counts[i] == 0, "%s: token %d outside the support drawn %ld times", what, (int)i, counts[i]);
            continue;
        }
        double e = expected[i] * n_draws;
        chi2 += (counts[i] - e) * (counts[i] - e) / e;
        dof++;
    }
    REQUIRE(dof >= 1 && dof <= 9);
    fprintf(stderr, "     %-34s chi2 = %7.3f, dof %d, critical (p=0.001) %.3f\n", what, chi2, dof, t_chi2_crit[dof]);
    CHECK_MSG(chi2 < t_chi2_crit[dof], "%s: chi2 %.3f >= %.3f", what, chi2, t_chi2_crit[dof]);
}

static void test_temperature_chi_square(void) {
    const float x[8] = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 2.5f, 0.0f, 1.5f};
    const float temps[3] = {1.0f, 0.7f, 2.0f};
    for (int k = 0; k < 3; k++) {
        double expected[8], z = 0.0;
        for (int i = 0; i < 8; i++) z += expected[i] = exp(x[i] / (double)temps[k]);
        for (int i = 0; i < 8; i++) expected[i] /= z;
        eng_sampler_t *s = t_make(temps[k], 0, 1.0f, 0.0f, 1000 + (uint64_t)k, 8);
        REQUIRE(s);
        char what[64];
        snprintf(what, sizeof what, "softmax(x / %.1f), 200k draws", (double)temps[k]);
        t_check_frequencies(s, x, 8, expected, 200000, what);
        eng_sampler_destroy(&s);
    }
}

/* Filters change the support and renormalise: frequencies must follow the renormalised probabilities. */
static void test_filtered_chi_square(void) {
    const float x[10] = {1.0f, 2.0f, 0.5f, -1.0f, 3.0f, 2.5f, 0.0f, 1.5f, 2.2f, -0.5f};
    struct {
        float t;
        int32_t top_k;
        float top_p, min_p;
    } cfg[] = {{1.0f, 5, 1.0f, 0.0f}, {1.0f, 0, 0.8f, 0.0f}, {0.8f, 0, 1.0f, 0.2f}, {1.5f, 6, 0.9f, 0.1f}};
    for (int c = 0; c < (int)(sizeof cfg / sizeof cfg[0]); c++) {
        double p[10], expected[10] = {0}, z = 0.0;
        int32_t order[10];
        int32_t n = t_ref_support(x, 10, cfg[c].t, cfg[c].top_k, cfg[c].top_p, cfg[c].min_p, p, order, 1e-6);
        REQUIRE(n > 1);
        for (int32_t i = 0; i < n; i++) z += p[order[i]];
        for (int32_t i = 0; i < n; i++) expected[order[i]] = p[order[i]] / z;
        eng_sampler_t *s = t_make(cfg[c].t, cfg[c].top_k, cfg[c].top_p, cfg[c].min_p, 77 + (uint64_t)c, 10);
        REQUIRE(s);
        char what[64];
        snprintf(what, sizeof what, "T %.1f k %d p %.2f min_p %.2f", (double)cfg[c].t, (int)cfg[c].top_k,
                 (double)cfg[c].top_p, (double)cfg[c].min_p);
        t_check_frequencies(s, x, 10, expected, 100000, what);
        eng_sampler_destroy(&s);
    }
    /* top_k 3 where exactly 3 tokens have p / p_max >= 2^-4: the sampler's candidate floor then leaves
     * exactly the top-k set, whose mass (not the whole vocabulary's) must normalise the draw */
    const float y[8] = {0.0f, -0.5f, -1.0f, -2.8f, -2.8f, -2.8f, -2.8f, -2.8f}; /* e^-2.8 = 0.061 < 2^-4 */
    double expected[8] = {0}, z = 1.0 + exp(-0.5) + exp(-1.0);
    for (int i = 0; i < 3; i++) expected[i] = exp(y[i]) / z;
    eng_sampler_t *s = t_make(1.0f, 3, 1.0f, 0.0f, 31, 8);
    REQUIRE(s);
    t_check_frequencies(s, y, 8, expected, 100000, "top_k 3 = tokens above the floor");
    eng_sampler_destroy(&s);
}

/* ---- support sets against the definitions ---- */

static void test_support_sets(void) {
    static float x[T_VOCAB];
    static double p[T_VOCAB];
    static int32_t order[T_VOCAB], ids[T_VOCAB];
    const int32_t vocabs[3] = {50, 1000, T_VOCAB};
    int n_checked = 0, n_skipped = 0;
    for (int trial = 0; trial < 300; trial++) {
        int32_t n_vocab = vocabs[trial % 3];
        bool is_grid = trial % 4 == 0;  /* many exact ties */
        bool is_wide = trial % 10 == 7; /* most of the vocabulary under p / p_max = 2^-124 */
        for (int32_t i = 0; i < n_vocab; i++)
            x[i] = is_grid ? (float)(t_randint(40) - 20) * 0.5f
                           : (float)(is_wide ? 300.0 * t_unif() - 290.0 : 20.0 * t_unif() - 10.0);
        float t = is_wide ? 1.0f : (float)(0.3 + 1.7 * t_unif());
        int32_t top_k = trial % 5 == 0 ? 0 : 1 + t_randint(trial % 3 == 0 ? 60 : 300);
        if (is_wide) top_k = n_vocab / 4 + t_randint(n_vocab / 2); /* more than the tokens above 2^-124 */
        float top_p = trial % 3 == 1 ? 1.0f : (float)(0.05 + 0.95 * t_unif());
        float min_p = trial % 4 == 2 ? 0.0f : (float)(0.3 * t_unif() * t_unif());
        int32_t n_ref = t_ref_support(x, n_vocab, t, top_k, top_p, min_p, p, order, 1e-6);
        if (n_ref < 0) {
            n_skipped++;
            continue;
        }
        eng_sampler_t *s = t_make(t, top_k, top_p, min_p, 5, n_vocab);
        REQUIRE(s);
        int32_t n = eng_sampler_support(s, x, ids);
        eng_sampler_destroy(&s);
        qsort(order, (size_t)n_ref, sizeof *order, t_cmp_i32);
        bool is_same = n == n_ref;
        for (int32_t i = 0; is_same && i < n; i++) is_same = ids[i] == order[i];
        CHECK_MSG(is_same, "trial %d: vocab %d T %g k %d p %g min_p %g: support %d tokens, expected %d", trial,
                  (int)n_vocab, (double)t, (int)top_k, (double)top_p, (double)min_p, (int)n, (int)n_ref);
        n_checked++;
    }
    fprintf(stderr, "     support sets: %d compared, %d skipped (a value within 1e-6 of a boundary)\n", n_checked,
            n_skipped);
    CHECK(n_checked >= 250);
}

static void test_ties(void) {
    float x[8];
    int32_t ids[8];
    for (int i = 0; i < 8; i++) x[i] = 1.0f;
    x[7] = 0.0f;
    eng_sampler_t *s = t_make(1.0f, 3, 1.0f, 0.0f, 1, 8);
    REQUIRE(s);
    CHECK(eng_sampler_support(s, x, ids) == 3 && ids[0] == 0 && ids[1] == 1 && ids[2] == 2);
    eng_sampler_destroy(&s);
    /* 4 equal tokens, top_p 0.5: cumulative 0.25, 0.5 >= 0.5 -> the two lowest ids */
    for (int i = 4; i < 8; i++) x[i] = -INFINITY;
    s = t_make(1.0f, 0, 0.5f, 0.0f, 1, 8);
    REQUIRE(s);
    CHECK(eng_sampler_support(s, x, ids) == 2 && ids[0] == 0 && ids[1] == 1);
    eng_sampler_destroy(&s);
    /* min_p 1: only the tokens tied with the best */
    x[5] = 1.0f;
    x[2] = 0.5f;
    s = t_make(1.0f, 0, 1.0f, 1.0f, 1, 8);
    REQUIRE(s);
    CHECK(eng_sampler_support(s, x, ids) == 4 && ids[0] == 0 && ids[1] == 1 && ids[2] == 3 && ids[3] == 5);
    eng_sampler_destroy(&s);
    /* equal probabilities: inverse CDF in id order, so u in [j/4, (j+1)/4) picks the j-th lowest id */
    for (int i = 0; i < 8; i++) x[i] = i % 2 ? 2.0f : -INFINITY; /* tokens 1, 3, 5, 7 */
    s = t_make(1.0f, 0, 1.0f, 0.0f, 99, 8);
    REQUIRE(s);
    t_rng_t rng = t_rng_seed(99);
    eng_sample_result_t r;
    for (int d = 0; d < 1000; d++) {
        double u = t_rng_uniform(&rng);
        REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
        CHECK_EQ_INT(r.token, 1 + 2 * (int)(u * 4.0));
    }
    eng_sampler_destroy(&s);
}

/* ---- the exact draw: documented RNG + inverse CDF in rank order ---- */

static void test_inverse_cdf_exact(void) {
    static float x[T_VOCAB];
    static double p[T_VOCAB];
    static int32_t order[T_VOCAB];
    struct {
        int32_t n_vocab;
        float t;
        int32_t top_k;
        float top_p, min_p;
    } cfg[] = {{T_VOCAB, 1.0f, 0, 1.0f, 0.0f},  {T_VOCAB, 0.7f, 50, 1.0f, 0.0f}, {T_VOCAB, 1.2f, 0, 0.9f, 0.0f},
               {T_VOCAB, 1.0f, 0, 1.0f, 0.05f}, {1000, 0.8f, 40, 0.95f, 0.01f},  {20, 2.0f, 0, 1.0f, 0.0f}};
    int n_checked = 0, n_skipped = 0;
    for (int c = 0; c < (int)(sizeof cfg / sizeof cfg[0]); c++) {
        const int32_t n_vocab = cfg[c].n_vocab;
        const uint64_t seed = 0xabcdef + (uint64_t)c;
        eng_sampler_t *s = t_make(cfg[c].t, cfg[c].top_k, cfg[c].top_p, cfg[c].min_p, seed, n_vocab);
        REQUIRE(s);
        t_rng_t rng = t_rng_seed(seed);
        for (int d = 0; d < 60; d++) {
            t_fill_normal(x, n_vocab, 2.5);
            double u = t_rng_uniform(&rng); /* the sampler draws exactly one u per sample */
            eng_sample_result_t r;
            REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
            int32_t n = t_ref_support(x, n_vocab, cfg[c].t, cfg[c].top_k, cfg[c].top_p, cfg[c].min_p, p, order, 1e-6);
            if (n < 0) {
                n_skipped++;
                continue;
            }
            /* the float implementation's cumulative sums are within ~1e-7 * z of these */
            double z = 0.0, cum = 0.0;
            for (int32_t i = 0; i < n; i++) z += p[order[i]];
            int32_t expected = order[n - 1];
            bool is_near = false;
            for (int32_t i = 0; i < n; i++) {
                double prev = cum;
                cum += p[order[i]];
                if (cum > u * z) {
                    expected = order[i];
                    is_near = u * z - prev < 1e-6 * z || cum - u * z < 1e-6 * z;
                    break;
                }
            }
            if (is_near) {
                n_skipped++;
                continue;
            }
            CHECK_MSG(r.token == expected, "config %d draw %d: token %d, expected %d (u = %.9f)", c, d, (int)r.token,
                      (int)expected, u);
            n_checked++;
        }
        eng_sampler_destroy(&s);
    }
    fprintf(stderr, "     exact draws: %d compared, %d skipped (near a boundary)\n", n_checked, n_skipped);
    CHECK(n_checked >= 300);
}

/* ---- seeds ---- */

static void test_seed(void) {
    enum { N = 500, V = 64 };
    static float rows[N][V];
    for (int i = 0; i < N; i++) t_fill_normal(rows[i], V, 1.0);
    int32_t seq[3][N];
    const uint64_t seeds[3] = {123, 123, 124};
    for (int k = 0; k < 3; k++) {
        eng_sampler_t *s = t_make(1.0f, 0, 0.95f, 0.0f, seeds[k], V);
        REQUIRE(s);
        eng_sample_result_t r;
        for (int i = 0; i < N; i++) {
            REQUIRE(eng_sampler_sample(s, rows[i], &r) == PD_OK);
            seq[k][i] = r.token;
            eng_sampler_add_generated(s, r.token);
        }
        eng_sampler_destroy(&s);
    }
    CHECK(memcmp(seq[0], seq[1], sizeof seq[0]) == 0);
    int n_diff = 0;
    for (int i = 0; i < N; i++) n_diff += seq[0][i] != seq[2][i];
    CHECK_MSG(n_diff > N / 4, "seeds 123 and 124 differ at only %d of %d positions", n_diff, N);

    /* one draw per sample whatever the logits: step i of two samplers with one seed sees the same u */
    eng_sampler_t *a = t_make(1.0f, 0, 1.0f, 0.0f, 9, V), *b = t_make(1.0f, 0, 1.0f, 0.0f, 9, V);
    REQUIRE(a && b);
    eng_sample_result_t ra, rb;
    for (int i = 0; i + 1 < N; i += 2) {
        REQUIRE(eng_sampler_sample(a, rows[i], &ra) == PD_OK);
        REQUIRE(eng_sampler_sample(b, rows[i + 1], &rb) == PD_OK); /* different logits, same draw */
        REQUIRE(eng_sampler_sample(a, rows[0], &ra) == PD_OK);
        REQUIRE(eng_sampler_sample(b, rows[0], &rb) == PD_OK);
        CHECK_EQ_INT(ra.token, rb.token);
    }
    eng_sampler_destroy(&a);
    eng_sampler_destroy(&b);
}

/* Skipping a draw = the draw a sample would have used: a sampler that skips the first token's draw (another
 * sampler with the seed drew it) continues exactly as one sampler that sampled every token; greedy skips
 * nothing. */
static void test_skip_draw(void) {
    enum { N = 64, V = 64 };
    static float rows[N][V];
    for (int i = 0; i < N; i++) t_fill_normal(rows[i], V, 1.0);
    for (int greedy = 0; greedy < 2; greedy++) {
        float t = greedy ? 0.0f : 0.8f;
        eng_sampler_t *one = t_make(t, 0, 0.95f, 0.0f, 77, V), *first = t_make(t, 0, 0.95f, 0.0f, 77, V);
        eng_sampler_t *rest = t_make(t, 0, 0.95f, 0.0f, 77, V);
        REQUIRE(one && first && rest);
        eng_sample_result_t a, b;
        REQUIRE(eng_sampler_sample(one, rows[0], &a) == PD_OK);
        REQUIRE(eng_sampler_sample(first, rows[0], &b) == PD_OK);
        CHECK_EQ_INT(a.token, b.token);
        eng_sampler_skip_draw(rest);
        int n_same = 0;
        for (int i = 1; i < N; i++) {
            REQUIRE(eng_sampler_sample(one, rows[i], &a) == PD_OK);
            REQUIRE(eng_sampler_sample(rest, rows[i], &b) == PD_OK);
            CHECK_EQ_INT(a.token, b.token);
            n_same += a.token == b.token;
        }
        CHECK_EQ_INT(n_same, N - 1);
        eng_sampler_destroy(&one), eng_sampler_destroy(&first), eng_sampler_destroy(&rest);
    }
    /* without the skip the stream is shifted: the tokens differ somewhere */
    eng_sampler_t *a = t_make(1.0f, 0, 1.0f, 0.0f, 5, V), *b = t_make(1.0f, 0, 1.0f, 0.0f, 5, V);
    REQUIRE(a && b);
    eng_sample_result_t ra, rb;
    REQUIRE(eng_sampler_sample(a, rows[0], &ra) == PD_OK);
    int n_diff = 0;
    for (int i = 1; i < N; i++) {
        REQUIRE(eng_sampler_sample(a, rows[i], &ra) == PD_OK);
        REQUIRE(eng_sampler_sample(b, rows[i], &rb) == PD_OK);
        n_diff += ra.token != rb.token;
    }
    CHECK(n_diff > 0);
    eng_sampler_destroy(&a), eng_sampler_destroy(&b);
}

/* ---- penalties ---- */

static void test_penalties_exact(void) {
    enum { V = 2000 };
    static float x[V], y[V];
    static int32_t n_gen[V];
    static bool in_prompt[V];
    const float reps[3] = {1.3f, 0.7f, 1.0f};
    for (int c = 0; c < 3; c++) {
        eng_sampling_t p = eng_sampling_default();
        p.repetition_penalty = reps[c];
        p.presence_penalty = c == 1 ? -0.75f : 0.4f;
        p.frequency_penalty = c == 2 ? -1.5f : 0.25f;
        eng_sampler_t *s = eng_sampler_create(&p, V);
        REQUIRE(s);
        memset(n_gen, 0, sizeof n_gen);
        memset(in_prompt, 0, sizeof in_prompt);
        int32_t prompt[300];
        for (int i = 0; i < 300; i++) in_prompt[prompt[i] = t_randint(V / 2)] = true;
        eng_sampler_add_prompt(s, prompt, 300);
        for (int i = 0; i < 400; i++) {
            int32_t t = V / 4 + t_randint(V / 2); /* overlaps the prompt range */
            n_gen[t]++;
            eng_sampler_add_generated(s, t);
        }
        t_fill_normal(x, V, 3.0);
        x[0] = 0.0f;
        x[1] = -INFINITY;
        in_prompt[0] = in_prompt[1] = true;
        eng_sampler_add_prompt(s, (const int32_t[]){0, 1}, 2);
        eng_sampler_penalize(s, x, y);
        for (int32_t i = 0; i < V; i++) {
            double e = x[i];
            if (in_prompt[i] || n_gen[i]) e = e > 0 ? e / reps[c] : e * reps[c];
            if (n_gen[i]) e -= n_gen[i] * (double)p.frequency_penalty + (double)p.presence_penalty;
            bool is_ok = isinf(e) ? y[i] == e : fabs(y[i] - e) <= 1e-5 * (1.0 + fabs(e));
            CHECK_MSG(is_ok, "c %d token %d (prompt %d, generated %d): %.9g, expected %.9g", c, (int)i, in_prompt[i],
                      (int)n_gen[i], (double)y[i], e);
            if (!in_prompt[i] && !n_gen[i]) CHECK(y[i] == x[i]); /* untouched bit for bit */
        }
        eng_sampler_destroy(&s);
    }
}

/* Observed through the greedy choice: the penalised token wins until its rival passes the value the
 * formula gives, then loses. */
static void test_penalties_greedy_flip(void) {
    float x[4];
    eng_sample_result_t r;
    struct {
        float rep, presence, frequency;
        float x0;
        int n_gen0;
        bool is_prompt0;
        double expected0; /* formula, computed by hand */
    } cases[] = {
        {2.0f, 0.0f, 0.0f, 3.0f, 0, true, 1.5f},    /* positive: divided */
        {2.0f, 0.0f, 0.0f, -1.0f, 0, true, -2.0f},  /* negative: multiplied */
        {0.5f, 0.0f, 0.0f, 1.0f, 0, true, 2.0f},    /* penalty < 1 rewards */
        {1.0f, 0.5f, 0.0f, 1.0f, 3, false, 0.5f},   /* presence once, not per occurrence */
        {1.0f, 0.0f, 0.5f, 1.0f, 3, false, -0.5f},  /* frequency per occurrence */
        {1.0f, 0.5f, 0.25f, 2.0f, 2, false, 1.0f},  /* both */
        {1.5f, 0.3f, 0.2f, 3.0f, 2, false, 1.3f},   /* repetition first: 3/1.5 - 2*0.2 - 0.3 */
        {1.0f, 1.0f, 1.0f, 1.0f, 0, true, 1.0f},    /* prompt tokens: repetition only */
        {1.0f, -1.0f, -0.5f, 0.0f, 2, false, 2.0f}, /* negative presence/frequency reward */
    };
    for (int c = 0; c < (int)(sizeof cases / sizeof cases[0]); c++) {
        for (int side = 0; side < 2; side++) {
            eng_sampling_t p = eng_sampling_default();
            p.temperature = 0.0f;
            p.repetition_penalty = cases[c].rep;
            p.presence_penalty = cases[c].presence;
            p.frequency_penalty = cases[c].frequency;
            eng_sampler_t *s = eng_sampler_create(&p, 4);
            REQUIRE(s);
            if (cases[c].is_prompt0) eng_sampler_add_prompt(s, (const int32_t[]){0}, 1);
            for (int g = 0; g < cases[c].n_gen0; g++) eng_sampler_add_generated(s, 0);
            x[0] = cases[c].x0;
            x[1] = (float)(cases[c].expected0 + (side ? 1e-3 : -1e-3)); /* rival just above / below */
            x[2] = x[3] = -100.0f;
            REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
            CHECK_MSG(r.token == (side ? 1 : 0), "case %d side %d: token %d", c, side, (int)r.token);
            eng_sampler_destroy(&s);
        }
    }
    /* a prompt token that is also generated gets the repetition penalty once, not twice */
    eng_sampling_t p = eng_sampling_default();
    p.temperature = 0.0f;
    p.repetition_penalty = 2.0f;
    eng_sampler_t *s = eng_sampler_create(&p, 4);
    REQUIRE(s);
    eng_sampler_add_prompt(s, (const int32_t[]){0, 0, 0}, 3);
    eng_sampler_add_generated(s, 0);
    eng_sampler_add_generated(s, 0);
    float y[4];
    x[0] = 4.0f;
    eng_sampler_penalize(s, x, y);
    CHECK(y[0] == 2.0f);
    eng_sampler_destroy(&s);
}

/* ---- logprobs ---- */

static void test_logprobs(void) {
    enum { V = 1000 };
    static float x[V];
    static double lp[V];
    static int32_t order[V];
    for (int c = 0; c < 4; c++) {
        t_fill_normal(x, V, 4.0);
        for (int i = 0; i < 50; i++) x[t_randint(V)] = -INFINITY;
        for (int i = 0; i < 6; i++) x[100 + 37 * i] = 9.0f; /* ties near the top: ordered by id */
        double m = -INFINITY, z = 0.0;
        for (int32_t i = 0; i < V; i++) m = x[i] > m ? x[i] : m;
        for (int32_t i = 0; i < V; i++) z += exp((double)x[i] - m);
        for (int32_t i = 0; i < V; i++) lp[i] = (double)x[i] - m - log(z);
        t_rank(lp, order, V);

        /* penalties and temperature must not move the reported logprobs */
        eng_sampling_t p = eng_sampling_default();
        p.temperature = c == 0 ? 0.0f : 0.5f * (float)c;
        p.repetition_penalty = c == 3 ? 1.7f : 1.0f;
        p.frequency_penalty = c == 3 ? 0.9f : 0.0f;
        p.n_logprobs = c == 2 ? 5 : ENG_MAX_LOGPROBS;
        p.has_seed = true;
        eng_sampler_t *s = eng_sampler_create(&p, V);
        REQUIRE(s);
        eng_sampler_add_prompt(s, order, 10);
        eng_sampler_add_generated(s, order[0]);
        for (int d = 0; d < 20; d++) {
            eng_sample_result_t r;
            REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
            CHECK_EQ_INT(r.n_top, p.n_logprobs);
            CHECK_MSG(fabs(r.logprob - lp[r.token]) < 1e-5, "token %d: %.8f vs %.8f", (int)r.token, (double)r.logprob,
                      lp[r.token]);
            for (int j = 0; j < r.n_top; j++) {
                CHECK_EQ_INT(r.top[j].token, order[j]);
                CHECK_MSG(fabs(r.top[j].logprob - lp[order[j]]) < 1e-5, "top %d: %.8f vs %.8f", j,
                          (double)r.top[j].logprob, lp[order[j]]);
            }
        }
        eng_sampler_destroy(&s);
    }
    /* vocab smaller than n_logprobs: every token, masked ones last with -inf */
    float xs[5] = {0.0f, -INFINITY, 1.0f, 1.0f, -3.0f};
    eng_sampling_t p = eng_sampling_default();
    p.n_logprobs = ENG_MAX_LOGPROBS;
    eng_sampler_t *s = eng_sampler_create(&p, 5);
    REQUIRE(s);
    eng_sample_result_t r;
    REQUIRE(eng_sampler_sample(s, xs, &r) == PD_OK);
    CHECK_EQ_INT(r.n_top, 5);
    const int32_t want[5] = {2, 3, 0, 4, 1};
    double z = 2 * exp(1.0) + 1.0 + exp(-3.0);
    for (int j = 0; j < 5; j++) {
        CHECK_EQ_INT(r.top[j].token, want[j]);
        double e = xs[want[j]] - log(z);
        CHECK(want[j] == 1 ? r.top[j].logprob == -INFINITY : fabs(r.top[j].logprob - e) < 1e-6);
    }
    CHECK(r.token != 1);
    eng_sampler_destroy(&s);
    /* n_logprobs 0: no top list */
    p.n_logprobs = 0;
    s = eng_sampler_create(&p, 5);
    REQUIRE(s);
    REQUIRE(eng_sampler_sample(s, xs, &r) == PD_OK);
    CHECK_EQ_INT(r.n_top, 0);
    eng_sampler_destroy(&s);
}

/* Penalties, filters and extreme values together must stay valid: a drawn token always has a finite
 * logit, even with masked rows and huge magnitudes. */
static void test_extremes(void) {
    enum { V = 300 };
    static float x[V];
    eng_sampling_t p = eng_sampling_default();
    p.repetition_penalty = 1e-3f; /* divides positive logits by 1e-3 */
    p.frequency_penalty = -2.0f;
    p.top_p = 0.3f;
    p.has_seed = true;
    eng_sampler_t *s = eng_sampler_create(&p, V);
    REQUIRE(s);
    for (int32_t i = 0; i < V; i++) x[i] = (i % 3 == 0) ? -INFINITY : (float)(t_normal() * 1e37);
    int32_t all[V];
    for (int32_t i = 0; i < V; i++) all[i] = i;
    eng_sampler_add_prompt(s, all, V);
    for (int d = 0; d < 200; d++) {
        eng_sample_result_t r;
        REQUIRE(eng_sampler_sample(s, x, &r) == PD_OK);
        CHECK(r.token >= 0 && r.token < V && x[r.token] != -INFINITY);
        eng_sampler_add_generated(s, r.token);
    }
    eng_sampler_destroy(&s);
}

/* ---- timing (printed, not asserted) ---- */

/* Per-sample cost in thread CPU time (steadier than wall time on a shared machine). */
static double t_cpu_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static double t_time_us(eng_sampler_t *s, const float *x, int n_iter) {
    eng_sample_result_t r;
    pd_status st = eng_sampler_sample(s, x, &r); /* warm up */
    double t0 = t_cpu_us();
    for (int i = 0; i < n_iter; i++) st |= eng_sampler_sample(s, x, &r);
    double t1 = t_cpu_us();
    CHECK(st == PD_OK);
    return (t1 - t0) / n_iter;
}

/* Row 0 of a golden logits file of the default model (a real next-token distribution), or false. */
static bool t_load_real_logits(float *x) {
#ifdef PD_SOURCE_DIR
    FILE *f = fopen(PD_SOURCE_DIR "/tests/golden/logits/chat_default_sys.logits.f32", "rb");
    if (!f) return false;
    bool is_ok = fread(x, sizeof *x, T_VOCAB, f) == T_VOCAB;
    fclose(f);
    return is_ok;
#else
    (void)x;
    return false;
#endif
}

static void test_timing(void) {
    static float x[2][T_VOCAB];
    t_fill_normal(x[0], T_VOCAB, 2.0); /* flat: half the vocabulary within 10 nats of the best */
    const bool has_real = t_load_real_logits(x[1]);
    struct {
        const char *what;
        float t;
        int32_t top_k;
        float top_p, min_p, rep;
        int32_t n_logprobs;
    } cfg[] = {
        {"greedy", 0.0f, 0, 1.0f, 0.0f, 1.0f, 0},
        {"default (T 1, no filters)", 1.0f, 0, 1.0f, 0.0f, 1.0f, 0},
        {"top_k 50", 0.8f, 50, 1.0f, 0.0f, 1.0f, 0},
        {"top_p 0.9", 0.8f, 0, 0.9f, 0.0f, 1.0f, 0},
        {"top_k 40 top_p 0.95 min_p 0.05", 0.7f, 40, 0.95f, 0.05f, 1.0f, 0},
        {"default + 20 logprobs + rep 1.1", 1.0f, 0, 1.0f, 0.0f, 1.1f, 20},
    };
    int32_t prompt[512];
    for (int i = 0; i < 512; i++) prompt[i] = t_randint(T_VOCAB);
    fprintf(stderr, "     timing, vocab %d, thread CPU time per sample: synthetic N(0, 2^2) logits | %s\n", T_VOCAB,
            has_real ? "real logits (golden chat_default_sys)" : "no golden logits (PD_SOURCE_DIR unset)");
    for (int c = 0; c < (int)(sizeof cfg / sizeof cfg[0]); c++) {
        double us[2] = {0, 0};
        for (int k = 0; k < 1 + has_real; k++) {
            eng_sampling_t p = eng_sampling_default();
            p.temperature = cfg[c].t;
            p.top_k = cfg[c].top_k;
            p.top_p = cfg[c].top_p;
            p.min_p = cfg[c].min_p;
            p.repetition_penalty = cfg[c].rep;
            p.n_logprobs = cfg[c].n_logprobs;
            eng_sampler_t *s = eng_sampler_create(&p, T_VOCAB);
            REQUIRE(s);
            eng_sampler_add_prompt(s, prompt, 512);
            us[k] = t_time_us(s, x[k], 300);
            eng_sampler_destroy(&s);
        }
        fprintf(stderr, "       %-32s %8.1f us | %8.1f us\n", cfg[c].what, us[0], us[1]);
    }
}

/* A row request built from a sampler (eng_sampler_penalties, eng_sampler_peek_draws) and sampled statelessly
 * (eng_row_sample) gives exactly what the sampler itself gives, with a verification row's earlier drafts counted as
 * generated: the reference is a second sampler with the same history that was given those drafts and has made as
 * many draws. Parameter mixes cover every filter and penalty; drafts repeat and overlap the prompt. */
static void test_row_requests(void) {
    enum { N_CASES = 300, MAX_DRAFTS = 5 };
    static float x[T_VOCAB];
    static eng_pen_t pen[T_VOCAB];
    eng_row_sampler_t *rs = eng_row_sampler_create(T_VOCAB);
    REQUIRE(rs);
    const float temps[] = {0.0f, 0.5f, 1.0f, 1.3f}, top_ps[] = {1.0f, 0.9f, 0.5f}, min_ps[] = {0.0f, 0.05f},
                reps[] = {1.0f, 1.2f, 0.8f}, pres[] = {0.0f, 0.5f, -0.5f}, freqs[] = {0.0f, 0.3f};
    const int32_t top_ks[] = {0, 1, 5, 50};
    int n_rows = 0, n_penalised = 0;
    for (int c = 0; c < N_CASES; c++) {
        eng_sampling_t p = eng_sampling_default();
        p.temperature = temps[t_randint(4)], p.top_k = top_ks[t_randint(4)], p.top_p = top_ps[t_randint(3)];
        p.min_p = min_ps[t_randint(2)], p.repetition_penalty = reps[t_randint(3)];
        p.presence_penalty = pres[t_randint(3)], p.frequency_penalty = freqs[t_randint(2)];
        p.n_logprobs = t_randint(2) ? 5 : 0, p.seed = (uint64_t)c, p.has_seed = true;
        eng_sampler_t *a = eng_sampler_create(&p, T_VOCAB), *b = eng_sampler_create(&p, T_VOCAB);
        REQUIRE(a && b);
        int32_t prompt[64], drafts[MAX_DRAFTS];
        for (int i = 0; i < 64; i++) prompt[i] = t_randint(300); /* small id range: repeats and overlaps */
        eng_sampler_add_prompt(a, prompt, 64), eng_sampler_add_prompt(b, prompt, 64);
        for (int i = 0, n = t_randint(12); i < n; i++) {
            const int32_t t = t_randint(300);
            eng_sampler_add_generated(a, t), eng_sampler_add_generated(b, t);
            eng_sampler_skip_draw(a), eng_sampler_skip_draw(b);
        }
        const int32_t k = t_randint(MAX_DRAFTS + 1);
        for (int32_t j = 0; j < k; j++) drafts[j] = t_randint(300);
        double u[MAX_DRAFTS + 1];
        eng_sampler_peek_draws(a, u, k + 1);
        for (int32_t j = 0; j <= k; j++) {
            t_fill_normal(x, T_VOCAB, 3.0);
            for (int i = 0; i < 300; i += 7) x[i] += 8.0f; /* make the penalised ids matter */
            eng_row_sampling_t row = {.p = p, .u = u[j], .pen = pen};
            row.n_pen = eng_sampler_penalties(a, drafts, j, pen);
            n_penalised += row.n_pen > 0;
            eng_sample_result_t got, want;
            REQUIRE(eng_row_sample(rs, &row, x, &got) == PD_OK);
            REQUIRE(eng_sampler_sample(b, x, &want) == PD_OK);
            CHECK_EQ_INT(got.token, want.token);
            CHECK(memcmp(&got.logprob, &want.logprob, sizeof got.logprob) == 0);
            CHECK_EQ_INT(got.n_top, want.n_top);
            for (int32_t i = 0; i < want.n_top; i++)
                CHECK(got.top[i].token == want.top[i].token && got.top[i].logprob == want.top[i].logprob);
            if (j < k) eng_sampler_add_generated(b, drafts[j]); /* as if draft j was accepted */
            n_rows++;
        }
        eng_sampler_destroy(&a), eng_sampler_destroy(&b);
    }
    CHECK(n_penalised > n_rows / 4);
    /* bad requests */
    eng_row_sampling_t row = {.p = eng_sampling_default(), .u = 1.0};
    eng_sample_result_t r;
    CHECK_EQ_INT(eng_row_sample(rs, &row, x, &r), PD_EINVAL); /* u must be in [0, 1) */
    row.u = 0.5, row.p.repetition_penalty = 1.5f, row.n_pen = 1, row.pen = &(eng_pen_t){T_VOCAB, 1};
    CHECK_EQ_INT(eng_row_sample(rs, &row, x, &r), PD_EINVAL); /* penalty token outside the vocabulary */
    row.p.top_p = 0.0f, row.n_pen = 0;
    CHECK_EQ_INT(eng_row_sample(rs, &row, x, &r), PD_EINVAL);
    eng_row_sampler_destroy(&rs);
}

int main(void) {
    PD_TEST_RUN(test_validate);
    PD_TEST_RUN(test_create_destroy);
    PD_TEST_RUN(test_greedy);
    PD_TEST_RUN(test_bad_logits);
    PD_TEST_RUN(test_temperature_chi_square);
    PD_TEST_RUN(test_filtered_chi_square);
    PD_TEST_RUN(test_support_sets);
    PD_TEST_RUN(test_ties);
    PD_TEST_RUN(test_inverse_cdf_exact);
    PD_TEST_RUN(test_seed);
    PD_TEST_RUN(test_skip_draw);
    PD_TEST_RUN(test_penalties_exact);
    PD_TEST_RUN(test_penalties_greedy_flip);
    PD_TEST_RUN(test_logprobs);
    PD_TEST_RUN(test_extremes);
    PD_TEST_RUN(test_row_requests);
    PD_TEST_RUN(test_timing);
    return pd_test_finish();
}
