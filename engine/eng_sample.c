/* eng_sample.c: the per-request sampler of eng_sample.h (penalties, greedy, temperature, top-k/top-p/min-p,
 * seeded draws, logprobs). It ranks tokens with a radix selection instead of sorting the vocabulary, so a
 * sample costs a few linear passes. It does not decide when to stop (eng_stop.c, the scheduler do). */
#include "eng_sample.h"
#include "eng_sample_int.h"
#include "pd_log.h"

#include <float.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* One candidate token: its unnormalised probability w = exp((x - x_max) / T), in (0, 1]. */
typedef struct {
    float w;
    int32_t id;
} eng_cand_t;

/* Radix selection over the 30-bit rank key of w, 10 bits per level (3 levels). */
#define S_RADIX_BITS 10
#define S_N_BUCKETS  (1 << S_RADIX_BITS)
#define S_SMALL_SEG  32 /* segments this short are insertion-sorted instead */

struct eng_sampler {
    eng_sampling_t p;
    int32_t vocab_size;
    bool has_penalties;
    uint64_t seed;
    uint64_t rng[4];      /* xoshiro256** state */
    int32_t *counts;      /* (vocab_size) times each token was generated */
    uint8_t *prompt_bits; /* (vocab_size + 7) / 8: bit set = token occurs in the prompt */
    int32_t *seen;        /* (vocab_size) distinct tokens of prompt and output, in order of arrival */
    int32_t n_seen;
    float *pen;                         /* (vocab_size) penalised logits */
    float *work;                        /* (vocab_size) w; scratch for logsumexp (apart from pen: in-place loops
                               do not vectorise with clang) */
    eng_cand_t *cand;                   /* (vocab_size) candidates of the current step */
    eng_cand_t *seg;                    /* (vocab_size) scratch for s_cut */
    uint32_t bucket_count[S_N_BUCKETS]; /* s_cut's histogram: candidates per bucket */
    double bucket_mass[S_N_BUCKETS];    /* and their total w */
};

/* ---- parameters ---- */

eng_sampling_t eng_sampling_default(void) {
    eng_sampling_t p;
    memset(&p, 0, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    p.presence_penalty = 0.0f;
    p.frequency_penalty = 0.0f;
    p.seed = 0;
    p.has_seed = false;
    p.n_logprobs = 0;
    return p;
}

/* Written as "lo <= v && v <= hi" so that NaN fails every range. */
static bool s_in_closed(float v, float lo, float hi) {
    return v >= lo && v <= hi;
}

pd_status eng_sampling_validate(const eng_sampling_t *p, char *err, size_t err_cap) {
    char dummy[1];
    if (!err || err_cap == 0) {
        err = dummy;
        err_cap = sizeof dummy;
    }
    if (!p) {
        snprintf(err, err_cap, "sampling parameters missing");
        return PD_EINVAL;
    }
    if (!s_in_closed(p->temperature, 0.0f, 100.0f)) {
        snprintf(err, err_cap, "temperature = %g, must be in [0, 100]", (double)p->temperature);
        return PD_EINVAL;
    }
    if (p->top_k < 0) {
        snprintf(err, err_cap, "top_k = %d, must be >= 0 (0 = off)", (int)p->top_k);
        return PD_EINVAL;
    }
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f)) {
        snprintf(err, err_cap, "top_p = %g, must be in (0, 1]", (double)p->top_p);
        return PD_EINVAL;
    }
    if (!s_in_closed(p->min_p, 0.0f, 1.0f)) {
        snprintf(err, err_cap, "min_p = %g, must be in [0, 1]", (double)p->min_p);
        return PD_EINVAL;
    }
    if (!(p->repetition_penalty > 0.0f && p->repetition_penalty <= 10.0f)) {
        snprintf(err, err_cap, "repetition_penalty = %g, must be in (0, 10]", (double)p->repetition_penalty);
        return PD_EINVAL;
    }
    if (!s_in_closed(p->presence_penalty, -2.0f, 2.0f)) {
        snprintf(err, err_cap, "presence_penalty = %g, must be in [-2, 2]", (double)p->presence_penalty);
        return PD_EINVAL;
    }
    if (!s_in_closed(p->frequency_penalty, -2.0f, 2.0f)) {
        snprintf(err, err_cap, "frequency_penalty = %g, must be in [-2, 2]", (double)p->frequency_penalty);
        return PD_EINVAL;
    }
    if (p->n_logprobs < 0 || p->n_logprobs > ENG_MAX_LOGPROBS) {
        snprintf(err, err_cap, "n_logprobs = %d, must be in [0, %d]", (int)p->n_logprobs, ENG_MAX_LOGPROBS);
        return PD_EINVAL;
    }
    return PD_OK;
}

/* ---- random numbers: splitmix64 seeding, xoshiro256** (https://prng.di.unimi.it/) ---- */

static uint64_t s_splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t s_rotl(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

static uint64_t s_rng_next(uint64_t st[4]) {
    const uint64_t result = s_rotl(st[1] * 5, 7) * 9;
    const uint64_t t = st[1] << 17;
    st[2] ^= st[0];
    st[3] ^= st[1];
    st[1] ^= st[2];
    st[0] ^= st[3];
    st[2] ^= t;
    st[3] = s_rotl(st[3], 45);
    return result;
}

/* Uniform in [0, 1) with 53 random bits. */
static double s_rng_uniform(uint64_t st[4]) {
    return (double)(s_rng_next(st) >> 11) * 0x1.0p-53;
}

/* Unseeded samplers need distinct seeds even when created in the same microsecond. This counter is
 * the file's one mutable global: it holds no setting, only uniqueness. */
static _Atomic uint64_t s_n_unseeded;

static uint64_t s_clock_seed(const void *salt) {
    uint64_t x = pd_now_us() ^ (uint64_t)(uintptr_t)salt;
    x ^= s_splitmix64(&x) + atomic_fetch_add(&s_n_unseeded, 1) * 0xd1b54a32d192ed03ull;
    return s_splitmix64(&x);
}

/* ---- numerics ---- */

static inline uint32_t s_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float s_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* exp(x) for x <= 0 in float (Cephes expf: range reduction by ln 2, degree-6 polynomial; max relative
 * error 8e-8, monotone). Exactly 1 at 0, never above 1, and 0 below -87 (where expf would leave the normal
 * range: such tokens are 1e-38 times less likely than the best) and at -inf.
 * Branch-free on purpose, selects done on the bits: with float compares GCC keeps a branch (they may trap)
 * and the loops calling this would not vectorise, which costs 5x. */
static inline float s_exp_neg(float x) {
    const uint32_t lo_bits = 0xC2AE0000u;                /* -87.0f */
    const uint32_t xb = s_bits(x) | 0x80000000u;         /* x <= 0, so this only turns +0 into -0 */
    const uint32_t is_low = 0u - ((lo_bits - xb) >> 31); /* all ones when x < -87 (and for -inf) */
    const float xc = s_float(xb < lo_bits ? xb : lo_bits);
    const float shifted = xc * 1.44269504088896341f + 12582912.0f; /* + 1.5 * 2^23 rounds to an integer n */
    const float n = shifted - 12582912.0f;
    const uint32_t biased_n = s_bits(shifted) - 0x4B400000u + 127u; /* n + 127, read off the mantissa */
    float r = xc - n * 0.693359375f; /* ln 2 in two parts: the high one times n is exact */
    r = r - n * -2.12194440e-4f;
    float poly = 1.9875691500e-4f;
    poly = poly * r + 1.3981999507e-3f;
    poly = poly * r + 8.3334519073e-3f;
    poly = poly * r + 4.1665795894e-2f;
    poly = poly * r + 1.6666665459e-1f;
    poly = poly * r + 5.0000001201e-1f;
    float y = poly * r * r + r + 1.0f;
    y *= s_float(biased_n << 23); /* 2^n, n in [-126, 0] */
    uint32_t yb = s_bits(y);
    yb = yb > 0x3F800000u ? 0x3F800000u : yb; /* <= 1.0f */
    return s_float(yb & ~is_low);
}

/* Unsigned integer whose order is the float order (NaN aside), with -0 equal to +0: the sign bit set for
 * positives, all bits flipped for negatives. Integer compares keep the argmax loops vectorisable. */
static inline uint32_t s_order_key(float v) {
    uint32_t b = s_bits(v);
    b = b == 0x80000000u ? 0u : b;
    return b ^ ((0u - (b >> 31)) | 0x80000000u);
}

#define S_KEY_NEG_INF 0x007FFFFFu /* s_order_key(-INFINITY) */
#define S_KEY_POS_INF 0xFF800000u /* s_order_key(+INFINITY); NaNs map above it or below S_KEY_NEG_INF */

/* Index of the largest logit (lowest id among equals); -1 when one is NaN or +inf, or none is finite.
 * Two passes, both vectorised at -O3: the max with a bad-value flag, then the lowest index holding it. */
static int32_t s_argmax(const float *x, int32_t n) {
    uint32_t key_max = 0, is_bad = 0;
    for (int32_t i = 0; i < n; i++) {
        uint32_t k = s_order_key(x[i]);
        key_max = k > key_max ? k : key_max;
        is_bad |= (uint32_t)(k - S_KEY_NEG_INF >= S_KEY_POS_INF - S_KEY_NEG_INF); /* not in [-inf, +inf) */
    }
    if (is_bad || key_max == S_KEY_NEG_INF) return -1;
    int32_t arg = n;
    for (int32_t i = 0; i < n; i++) {
        int32_t j = s_order_key(x[i]) == key_max ? i : n;
        arg = j < arg ? j : arg;
    }
    return arg;
}

int32_t eng_logits_argmax(const float *logits, int32_t n) {
    return logits && n > 0 ? s_argmax(logits, n) : -1;
}

/* Sum in double over 8 independent accumulators: no float accumulation error over the vocabulary, and
 * the loop vectorises without reassociating anything. */
static double s_sum(const float *w, int32_t n) {
    double acc[8] = {0};
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += (double)w[i + j];
    for (; i < n; i++) acc[0] += (double)w[i];
    return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

/* w[i] = exp((x[i] - x_max) / t) for all i; w may be x. */
static void s_exp_all(const float *x, float x_max, float t, float *w, int32_t n) {
    for (int32_t i = 0; i < n; i++) w[i] = s_exp_neg((x[i] - x_max) / t);
}

/* log(sum_i exp(x_i)) with x_max = max x: terms in float (relative error < 1e-7 each, so the result is
 * within 1e-7 absolute), written to tmp, then summed in double. */
static double s_logsumexp(const float *x, int32_t n, float x_max, float *tmp) {
    s_exp_all(x, x_max, 1.0f, tmp, n);
    return (double)x_max + log(s_sum(tmp, n));
}

/* The n_top largest logits, largest first, equal logits by lower id (ids are scanned upwards and only
 * a strictly larger value overtakes). */
static void s_top_logprobs(const float *x, int32_t n, int32_t n_top, double lse, eng_logprob_t *top) {
    float val[ENG_MAX_LOGPROBS];
    int32_t id[ENG_MAX_LOGPROBS];
    int32_t n_have = 0;
    for (int32_t i = 0; i < n; i++) {
        float v = x[i];
        if (n_have == n_top && !(v > val[n_have - 1])) continue;
        int32_t j = n_have < n_top ? n_have++ : n_top - 1;
        while (j > 0 && v > val[j - 1]) {
            val[j] = val[j - 1];
            id[j] = id[j - 1];
            j--;
        }
        val[j] = v;
        id[j] = i;
    }
    for (int32_t j = 0; j < n_have; j++) {
        top[j].token = id[j];
        top[j].logprob = (float)((double)val[j] - lse);
    }
}

/* ---- ranking without sorting ---- */

/* Rank key of w in (0, 1]: 0 for w = 1, growing as w shrinks (the float bits of positive numbers are
 * ordered like the numbers). Below 2^30, so three 10-bit radix levels cover it. */
static inline uint32_t s_key(float w) {
    return 0x3F800000u - s_bits(w);
}

static inline bool s_ranks_before(eng_cand_t a, eng_cand_t b) {
    return a.w > b.w || (a.w == b.w && a.id < b.id);
}

typedef enum {
    S_CUT_COUNT,   /* the first k candidates (top-k) */
    S_CUT_MASS_GE, /* the shortest prefix with mass >= target (top-p) */
    S_CUT_MASS_GT, /* up to the first candidate whose cumulative mass > target (inverse CDF) */
} s_cut_mode_t;

static inline bool s_cut_passes(s_cut_mode_t mode, double cum, double target) {
    return mode == S_CUT_MASS_GE ? cum >= target : cum > target;
}

/* Cuts the ranking (w desc, id asc) of cand[0..n) after its m-th element and returns m: arg is k for
 * S_CUT_COUNT (1 <= k <= n), the target mass otherwise. Afterwards cand[0..m) holds that prefix, in no
 * particular order except that cand[m-1] is its last-ranked element.
 * Radix selection, most significant bits first: a histogram of the segment still in question (count and
 * mass per bucket) tells which bucket the cut falls in; the buckets before it are kept whole, those after
 * it dropped, and the next level looks only inside it. Candidates keep their relative order throughout,
 * and cand[] starts in id order, so equal weights already rank by id once the bits are exhausted. If
 * rounding makes the target unreachable, the cut is after the last candidate. O(n) per level. */
static int32_t s_cut(eng_sampler_t *s, int32_t n, s_cut_mode_t mode, double arg) {
    eng_cand_t *c = s->cand, *seg = s->seg;
    uint32_t *count = s->bucket_count;
    double *mass = s->bucket_mass;
    const int32_t k = mode == S_CUT_COUNT ? (int32_t)arg : 0;
    const double target = arg;
    int32_t lo = 0, hi = n; /* c[0..lo) ranks before all of c[lo..hi); c[hi..n) after */
    double acc = 0.0;       /* mass of c[0..lo) */

    for (int shift = 2 * S_RADIX_BITS; shift >= 0 && hi - lo > S_SMALL_SEG; shift -= S_RADIX_BITS) {
        /* histogram of the segment */
        memset(count, 0, sizeof s->bucket_count);
        memset(mass, 0, sizeof s->bucket_mass);
        for (int32_t i = lo; i < hi; i++) {
            uint32_t b = (s_key(c[i].w) >> shift) & (S_N_BUCKETS - 1);
            count[b]++;
            mass[b] += c[i].w;
        }
        /* the bucket the cut falls in */
        int32_t cut_b = -1, n_before = 0;
        double mass_before = 0.0;
        bool is_found = false;
        for (int32_t b = 0; b < S_N_BUCKETS && !is_found; b++) {
            if (!count[b]) continue;
            cut_b = b;
            is_found = mode == S_CUT_COUNT ? lo + n_before + (int32_t)count[b] >= k
                                           : s_cut_passes(mode, acc + mass_before + mass[b], target);
            if (!is_found) {
                n_before += (int32_t)count[b];
                mass_before += mass[b];
            }
        }
        if (!is_found) { /* target unreachable by rounding: look inside the last nonempty bucket */
            n_before -= (int32_t)count[cut_b];
            mass_before -= mass[cut_b];
        }
        /* keep the buckets before the cut in place, move the cut bucket right after them, drop the rest */
        int32_t n_kept = 0, n_in = 0;
        for (int32_t i = lo; i < hi; i++) {
            eng_cand_t e = c[i];
            int32_t b = (int32_t)((s_key(e.w) >> shift) & (S_N_BUCKETS - 1));
            if (b < cut_b)
                c[lo + n_kept++] = e;
            else if (b == cut_b)
                seg[n_in++] = e;
        }
        memcpy(c + lo + n_kept, seg, (size_t)n_in * sizeof *c);
        lo += n_kept;
        hi = lo + n_in;
        acc += mass_before;
    }

    /* the remaining segment: short, or all equal weights (then already in id order, which insertion
     * sort confirms in one pass) */
    for (int32_t i = lo + 1; i < hi; i++) {
        eng_cand_t e = c[i];
        int32_t j = i;
        while (j > lo && s_ranks_before(e, c[j - 1])) {
            c[j] = c[j - 1];
            j--;
        }
        c[j] = e;
    }
    if (mode == S_CUT_COUNT) return k;
    for (int32_t i = lo; i < hi; i++) {
        acc += c[i].w;
        if (s_cut_passes(mode, acc, target)) return i + 1;
    }
    return hi;
}

static double s_cand_mass(const eng_cand_t *c, int32_t n) {
    double sum = 0.0;
    for (int32_t i = 0; i < n; i++) sum += c[i].w;
    return sum;
}

/* The largest 2^(-4j) with at least k weights at or above it: then so are the k most likely tokens.
 * Each probe is one vectorised counting pass; a real model's distribution needs two or three. */
static float s_count_floor(const float *w, int32_t n, int32_t k) {
    for (uint32_t e = 4; e < 127; e += 4) {
        const uint32_t floor_bits = (127u - e) << 23; /* 2^-e */
        int32_t n_above = 0;
        for (int32_t i = 0; i < n; i++) n_above += s_bits(w[i]) >= floor_bits;
        if (n_above >= k) return s_float(floor_bits);
    }
    return 0.0f;
}

/* A weight below which no token can be kept by the first filter, so the candidate list may skip it:
 * building and ranking that list is where the time goes, and a real model's distribution has a tail of
 * tens of thousands of tokens holding a few percent of the mass.
 *   top-k first: s_count_floor.
 *   else a cut by mass, keeping the fraction frac (top_p, or u for the draw itself): the tokens under
 *     floor = (1 - frac) * mass / (2 n_vocab) hold less than (1 - frac) * mass / 2, so those above it hold
 *     more than frac * mass and, ranking first, contain the cut. The factor 2 leaves a margin far above
 *     rounding; no floor for frac within 1e-6 of 1.
 *   min-p alone: min_p, as min-p drops those tokens anyway.
 * u < 0 (no draw to come) gives no floor for the draw. */
static float s_floor(const eng_sampling_t *p, const float *w, int32_t n_vocab, double mass, double u) {
    if (p->top_k > 0 && p->top_k < n_vocab) return s_count_floor(w, n_vocab, p->top_k);
    if (p->top_p >= 1.0f && p->min_p > 0.0f) return p->min_p;
    const double frac = p->top_p < 1.0f ? (double)p->top_p : u;
    if (!(frac >= 0.0 && frac < 1.0 - 1e-6)) return 0.0f;
    return (float)(0.5 * (1.0 - frac) * mass / n_vocab);
}

/* ---- the sampler ---- */

static bool s_has_penalties(const eng_sampling_t *p) {
    return p->repetition_penalty != 1.0f || p->presence_penalty != 0.0f || p->frequency_penalty != 0.0f;
}

eng_sampler_t *eng_sampler_create(const eng_sampling_t *p, int32_t vocab_size) {
    char err[128];
    if (!p) {
        LOG_E("sampler: no sampling parameters");
        return NULL;
    }
    if (eng_sampling_validate(p, err, sizeof err) != PD_OK) {
        LOG_E("sampler: %s", err);
        return NULL;
    }
    if (vocab_size <= 0) {
        LOG_E("sampler: vocab_size = %d, must be > 0", (int)vocab_size);
        return NULL;
    }
    const size_t n_vocab = (size_t)vocab_size;
    eng_sampler_t *s = calloc(1, sizeof *s);
    if (!s) goto fail;
    s->p = *p;
    s->vocab_size = vocab_size;
    s->has_penalties = s_has_penalties(p);
    s->counts = calloc(n_vocab, sizeof *s->counts);
    s->prompt_bits = calloc((n_vocab + 7) / 8, 1);
    s->seen = malloc(n_vocab * sizeof *s->seen);
    s->pen = malloc(n_vocab * sizeof *s->pen);
    s->work = malloc(n_vocab * sizeof *s->work);
    s->cand = malloc(n_vocab * sizeof *s->cand);
    s->seg = malloc(n_vocab * sizeof *s->seg);
    if (!s->counts || !s->prompt_bits || !s->seen || !s->pen || !s->work || !s->cand || !s->seg) goto fail;
    s->seed = p->has_seed ? p->seed : s_clock_seed(s);
    uint64_t x = s->seed;
    for (int i = 0; i < 4; i++) s->rng[i] = s_splitmix64(&x);
    return s;
fail:
    LOG_E("sampler: out of memory (vocab_size %d)", (int)vocab_size);
    eng_sampler_destroy(&s);
    return NULL;
}

void eng_sampler_destroy(eng_sampler_t **s) {
    if (!s || !*s) return;
    eng_sampler_t *t = *s;
    free(t->counts);
    free(t->prompt_bits);
    free(t->seen);
    free(t->pen);
    free(t->work);
    free(t->cand);
    free(t->seg);
    free(t);
    *s = NULL;
}

uint64_t eng_sampler_seed(const eng_sampler_t *s) {
    return s->seed;
}

static bool s_in_prompt(const eng_sampler_t *s, int32_t t) {
    return (s->prompt_bits[t >> 3] >> (t & 7)) & 1u;
}

void eng_sampler_add_prompt(eng_sampler_t *s, const int32_t *tokens, int64_t n) {
    PD_ASSERT(s && (tokens || n == 0));
    for (int64_t i = 0; i < n; i++) {
        int32_t t = tokens[i];
        PD_ASSERT(t >= 0 && t < s->vocab_size);
        if (s_in_prompt(s, t)) continue;
        if (s->counts[t] == 0) s->seen[s->n_seen++] = t;
        s->prompt_bits[t >> 3] |= (uint8_t)(1u << (t & 7));
    }
}

void eng_sampler_add_generated(eng_sampler_t *s, int32_t token) {
    PD_ASSERT(s && token >= 0 && token < s->vocab_size);
    if (s->counts[token] == 0 && !s_in_prompt(s, token)) s->seen[s->n_seen++] = token;
    if (s->counts[token] < INT32_MAX) s->counts[token]++;
}

void eng_sampler_penalize(const eng_sampler_t *s, const float *logits, float *out) {
    const eng_sampling_t *p = &s->p;
    if (out != logits) memcpy(out, logits, (size_t)s->vocab_size * sizeof *out);
    for (int32_t j = 0; j < s->n_seen; j++) {
        const int32_t id = s->seen[j];
        const float x = out[id];
        float v = x > 0.0f ? x / p->repetition_penalty : x * p->repetition_penalty;
        const int32_t n = s->counts[id];
        if (n > 0) {
            v -= (float)n * p->frequency_penalty;
            v -= p->presence_penalty;
        }
        /* keep finite logits finite (a masked -inf stays masked), so some token always remains */
        if (v > FLT_MAX) v = FLT_MAX;
        if (v < -FLT_MAX && x != -INFINITY) v = -FLT_MAX;
        out[id] = v;
    }
}

/* Step 1: the logits themselves when no penalty applies, else the penalised copy in s->pen. */
static const float *s_penalized(eng_sampler_t *s, const float *logits) {
    if (!s->has_penalties || s->n_seen == 0) return logits;
    eng_sampler_penalize(s, logits, s->pen);
    return s->pen;
}

/* Steps 3-4 (temperature > 0): fills s->cand with the tokens that may be drawn and returns their count
 * (>= 1: the most likely token survives every filter); *mass is the mass of the kept set and *mass_all
 * that of all tokens. u is the draw to come, letting the candidate list skip tokens it cannot reach
 * (s_floor); pass u < 0 for the whole kept set. */
static int32_t s_filter(eng_sampler_t *s, const float *x, float x_max, double u, double *mass, double *mass_all) {
    const eng_sampling_t *p = &s->p;
    const int32_t n_vocab = s->vocab_size;
    const float t = p->temperature;
    float *w = s->work;
    eng_cand_t *cand = s->cand;

    /* probabilities after temperature, unnormalised (w = 1 at the max) */
    s_exp_all(x, x_max, t, w, n_vocab);
    *mass_all = s_sum(w, n_vocab);
    double m = *mass_all;

    /* candidates in id order; branch-free, as whether a token passes the floor is a coin toss for the
     * branch predictor */
    const float w_floor = s_floor(p, w, n_vocab, m, u);
    const uint32_t floor_bits = s_bits(w_floor > 0.0f ? w_floor : FLT_TRUE_MIN); /* w >= w_floor, w > 0 */
    int32_t n = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        cand[n].w = w[i];
        cand[n].id = i;
        n += s_bits(w[i]) >= floor_bits; /* both non-negative: bits compare like values */
    }

    /* top-k, top-p, min-p, each on what the previous kept */
    if (p->top_k > 0 && p->top_k < n_vocab) { /* the floor may have left exactly top_k */
        if (p->top_k < n) n = s_cut(s, n, S_CUT_COUNT, (double)p->top_k);
        m = s_cand_mass(cand, n);
    }
    if (p->top_p < 1.0f) {
        n = s_cut(s, n, S_CUT_MASS_GE, (double)p->top_p * m);
        m = s_cand_mass(cand, n);
    }
    if (p->min_p > 0.0f) {
        int32_t n_kept = 0;
        for (int32_t i = 0; i < n; i++)
            if (cand[i].w >= p->min_p) cand[n_kept++] = cand[i];
        n = n_kept;
        m = s_cand_mass(cand, n);
    }
    PD_ASSERT(n >= 1);
    *mass = m;
    return n;
}

/* eng_sampler_sample with the draw taken from rng, or u given when rng is NULL (used when temperature > 0). */
static pd_status s_sample_u(eng_sampler_t *s, const float *logits, uint64_t *rng, double u, eng_sample_result_t *out) {
    const int32_t n_vocab = s->vocab_size;
    const int32_t raw_arg = s_argmax(logits, n_vocab);
    if (raw_arg < 0) return PD_EINVAL;

    const float *x = s_penalized(s, logits);
    const int32_t arg = x == logits ? raw_arg : s_argmax(x, n_vocab);
    PD_ASSERT(arg >= 0);
    int32_t token = arg;
    double mass_all = 0.0;
    if (s->p.temperature > 0.0f) {
        double mass;
        if (rng) u = s_rng_uniform(rng);
        const int32_t n = s_filter(s, x, x[arg], u, &mass, &mass_all);
        const int32_t m = s_cut(s, n, S_CUT_MASS_GT, u * mass);
        token = s->cand[m - 1].id;
    }

    /* logprobs of the raw model distribution; at temperature 1 without penalties s_filter has summed
     * exactly the terms needed */
    const double lse = s->p.temperature == 1.0f && x == logits ? (double)logits[raw_arg] + log(mass_all)
                                                               : s_logsumexp(logits, n_vocab, logits[raw_arg], s->work);
    out->token = token;
    out->logprob = (float)((double)logits[token] - lse);
    out->n_top = s->p.n_logprobs < n_vocab ? s->p.n_logprobs : n_vocab;
    if (out->n_top > 0) s_top_logprobs(logits, n_vocab, out->n_top, lse, out->top);
    return PD_OK;
}

pd_status eng_sampler_sample(eng_sampler_t *s, const float *logits, eng_sample_result_t *out) {
    if (!s || !logits || !out) return PD_EINVAL;
    return s_sample_u(s, logits, s->rng, 0.0, out);
}

const eng_sampling_t *eng_sampler_params(const eng_sampler_t *s) {
    return &s->p;
}

void eng_sampler_peek_draws(const eng_sampler_t *s, double *u, int32_t n) {
    uint64_t st[4];
    memcpy(st, s->rng, sizeof st);
    for (int32_t i = 0; i < n; i++) u[i] = s_rng_uniform(st);
}

int32_t eng_sampler_penalties_max(const eng_sampler_t *s, int32_t n_extra) {
    return s->has_penalties ? s->n_seen + n_extra : 0;
}

int32_t eng_sampler_penalties(const eng_sampler_t *s, const int32_t *extra, int32_t n_extra, eng_pen_t *out) {
    if (!s->has_penalties) return 0;
    int32_t n = s->n_seen;
    for (int32_t j = 0; j < n; j++) out[j] = (eng_pen_t){s->seen[j], s->counts[s->seen[j]]};
    for (int32_t i = 0; i < n_extra; i++) {
        const int32_t t = extra[i];
        PD_ASSERT(t >= 0 && t < s->vocab_size);
        int32_t j = -1;
        if (s->counts[t] > 0 || s_in_prompt(s, t)) { /* already listed: find it (a short scan per draft) */
            for (j = 0; out[j].token != t; j++) {
            }
        } else {
            for (int32_t k = s->n_seen; k < n && j < 0; k++)
                if (out[k].token == t) j = k;
        }
        if (j < 0) out[j = n++] = (eng_pen_t){t, 0};
        if (out[j].count < INT32_MAX) out[j].count++;
    }
    return n;
}

struct eng_row_sampler {
    eng_sampler_t *s; /* its scratch, parameters and penalty state are loaded per row and cleared after */
};

eng_row_sampler_t *eng_row_sampler_create(int32_t vocab_size) {
    eng_sampling_t p = eng_sampling_default();
    p.has_seed = true; /* no clock read: this sampler never draws */
    eng_row_sampler_t *rs = calloc(1, sizeof *rs);
    if (!rs || !(rs->s = eng_sampler_create(&p, vocab_size))) {
        free(rs);
        return NULL;
    }
    return rs;
}

void eng_row_sampler_destroy(eng_row_sampler_t **rs) {
    if (!rs || !*rs) return;
    eng_sampler_destroy(&(*rs)->s);
    free(*rs);
    *rs = NULL;
}

pd_status eng_row_sample(eng_row_sampler_t *rs, const eng_row_sampling_t *row, const float *logits,
                         eng_sample_result_t *out) {
    if (!rs || !row || !logits || !out || (row->n_pen > 0 && !row->pen) || row->n_pen < 0 ||
        eng_sampling_validate(&row->p, NULL, 0) != PD_OK || !(row->u >= 0.0 && row->u < 1.0))
        return PD_EINVAL;
    eng_sampler_t *s = rs->s;
    for (int32_t j = 0; j < row->n_pen; j++)
        if (row->pen[j].token < 0 || row->pen[j].token >= s->vocab_size || row->pen[j].count < 0) return PD_EINVAL;
    s->p = row->p;
    s->has_penalties = s_has_penalties(&row->p);
    /* the list as the sampler's own state: every token seen (repetition), counts for the generated ones */
    const int32_t n_pen = s->has_penalties ? row->n_pen : 0;
    s->n_seen = 0;
    for (int32_t j = 0; j < n_pen; j++) {
        const int32_t t = row->pen[j].token;
        if (s->counts[t] > 0 || s_in_prompt(s, t)) continue; /* listed twice: the first entry holds */
        s->seen[s->n_seen++] = t;
        s->counts[t] = row->pen[j].count;
        if (row->pen[j].count == 0) s->prompt_bits[t >> 3] |= (uint8_t)(1u << (t & 7));
    }
    pd_status st = s_sample_u(s, logits, NULL, row->u, out);
    for (int32_t j = 0; j < s->n_seen; j++) { /* clear only what was set */
        const int32_t t = s->seen[j];
        s->counts[t] = 0;
        s->prompt_bits[t >> 3] = 0;
    }
    s->n_seen = 0;
    return st;
}

void eng_sampler_skip_draw(eng_sampler_t *s) {
    PD_ASSERT(s);
    if (s->p.temperature > 0.0f) (void)s_rng_uniform(s->rng);
}

static int s_cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

int32_t eng_sampler_support(eng_sampler_t *s, const float *logits, int32_t *ids) {
    if (!s || !logits || !ids || s->p.temperature == 0.0f) return PD_EINVAL;
    const int32_t raw_arg = s_argmax(logits, s->vocab_size);
    if (raw_arg < 0) return PD_EINVAL;
    const float *x = s_penalized(s, logits);
    const int32_t arg = x == logits ? raw_arg : s_argmax(x, s->vocab_size);
    PD_ASSERT(arg >= 0);
    double mass, mass_all;
    const int32_t n = s_filter(s, x, x[arg], -1.0, &mass, &mass_all);
    for (int32_t i = 0; i < n; i++) ids[i] = s->cand[i].id;
    qsort(ids, (size_t)n, sizeof *ids, s_cmp_i32);
    return n;
}
