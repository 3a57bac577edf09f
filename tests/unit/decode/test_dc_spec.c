/* test_dc_spec.c: speculative decoding in the decode batch. The pure parts (n-gram lookup, acceptance, the cost
 * model's allocation) on hand-made inputs; then the real model on the CPU engine: requests decoded together
 * with n-gram drafts, and with a draft model, give exactly the tokens (and logprobs) each gives alone without
 * speculation, greedy and seeded sampling, stop strings included; drafts really were proposed, accepted and
 * rejected (rollback exercised); every block of both pools comes back. The draft model here is the default model
 * itself (a second engine): real catch-up, proposals and rollback, with acceptance near 1 for greedy requests.
 * The integration tests use a truncated draft (deploy/make_draft.py). */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "dc_exec.h"
#include "eng_draft.h"
#include "dc_sched.h"
#include "dc_spec.h"
#include "eng.h"
#include "pd_log.h"
#include "pd_test.h"

#define MAX_GEN  48
#define MAX_REQS 6

/* ---- pure parts ---- */

static void test_ngram(void) {
    int32_t out[8];
    /* "1 2 3 4 5 ... 1 2 3" -> 4 5 6 (the longest suffix n-gram "1 2 3" occurred at 0) */
    int32_t h1[] = {1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3};
    CHECK_EQ_INT(eng_draft_ngram(h1, 11, 1, 3, 3, out), 3);
    CHECK(out[0] == 4 && out[1] == 5 && out[2] == 6);
    /* k larger than what follows the match: only what exists */
    int32_t h2[] = {7, 8, 9, 7, 8};
    CHECK_EQ_INT(eng_draft_ngram(h2, 5, 2, 2, 5, out), 3);
    CHECK(out[0] == 9 && out[1] == 7 && out[2] == 8);
    /* the most recent occurrence wins */
    int32_t h3[] = {5, 1, 5, 2, 5};
    CHECK_EQ_INT(eng_draft_ngram(h3, 5, 1, 1, 1, out), 1);
    CHECK_EQ_INT(out[0], 2);
    /* longer n tried first: "3 5" -> 9, although "5" alone most recently led to 2 */
    int32_t h4[] = {3, 5, 9, 5, 2, 3, 5};
    CHECK_EQ_INT(eng_draft_ngram(h4, 7, 1, 2, 1, out), 1);
    CHECK_EQ_INT(out[0], 9);
    /* no match below n_min, no history, bad args */
    int32_t h5[] = {1, 2, 3, 4};
    CHECK_EQ_INT(eng_draft_ngram(h5, 4, 1, 3, 4, out), 0);
    CHECK_EQ_INT(eng_draft_ngram(h5, 1, 1, 3, 4, out), 0);
    CHECK_EQ_INT(eng_draft_ngram(h5, 4, 0, 3, 4, out), 0);
    CHECK_EQ_INT(eng_draft_ngram(h5, 4, 2, 1, 4, out), 0);
}

/* The incremental index against the scan (the reference: eng_draft_ngram, checked above by hand): histories that
 * grow by 1-5 tokens at a time over small vocabularies (many matches, long and short), every n range and k, the
 * same count and tokens at every length; half of them start with 3000 tokens at once (a prompt: more than the index
 * takes in one call, so lookups also scan the ends it has not reached); then a shorter history (it must notice), a
 * reset with a new history, a range past ENG_NGRAM_INDEX_MAX_N (it scans) and bad arguments. */
static void test_ngram_index(void) {
    enum { LEN = 4000, PROMPT = 3000 };
    int32_t *h = malloc(sizeof *h * LEN), want[16], got[16];
    REQUIRE(h);
    eng_ngram_index_t *ix = eng_ngram_index_create();
    REQUIRE(ix);
    uint32_t rng = 12345u;
    long n_lookups = 0, n_found = 0;
    const int32_t ranges[][2] = {{2, 4}, {1, 1}, {1, 3}, {3, 8}};
    for (int vocab = 2; vocab <= 64; vocab *= 4)
        for (size_t r = 0; r < sizeof ranges / sizeof ranges[0]; r++) {
            eng_ngram_index_reset(ix);
            int32_t n = 0;
            const bool is_prompt = r % 2 == 0;
            while (n < LEN) {
                const int32_t add = is_prompt && n == 0 ? PROMPT : 1 + (int32_t)(rng % 5);
                for (int32_t i = 0; i < add && n < LEN; i++) {
                    rng = rng * 1664525u + 1013904223u;
                    /* stretches copied from earlier in the history: the RAG case, long matches */
                    h[n] = n > 40 && (rng >> 8) % 3 == 0 ? h[(rng >> 12) % (uint32_t)(n - 20)]
                                                         : (int32_t)((rng >> 16) % vocab);
                    n++;
                }
                const int32_t k = 1 + (int32_t)(rng % 11);
                const int32_t nw = eng_draft_ngram(h, n, ranges[r][0], ranges[r][1], k, want);
                const int32_t ng = eng_ngram_index_lookup(ix, h, n, ranges[r][0], ranges[r][1], k, got);
                n_lookups++, n_found += nw > 0;
                if (nw != ng || memcmp(want, got, sizeof *want * (size_t)nw) != 0) {
                    CHECK_MSG(false, "vocab %d n %d..%d k %d length %d: index %d drafts, scan %d", vocab, ranges[r][0],
                              ranges[r][1], k, n, ng, nw);
                    break;
                }
            }
            /* a shorter history than the index has seen */
            const int32_t short_n = 700;
            CHECK_EQ_INT(eng_ngram_index_lookup(ix, h, short_n, ranges[r][0], ranges[r][1], 5, got),
                         eng_draft_ngram(h, short_n, ranges[r][0], ranges[r][1], 5, want));
        }
    CHECK(n_found > n_lookups / 4 && n_found < n_lookups); /* both outcomes were exercised */
    /* a new history after a reset: nothing of the old one may match */
    int32_t a[] = {1, 2, 3, 9, 1, 2, 3}, b[] = {1, 2, 3, 7, 1, 2, 3};
    eng_ngram_index_reset(ix);
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, a, 7, 2, 3, 1, got), 1);
    CHECK_EQ_INT(got[0], 9);
    eng_ngram_index_reset(ix);
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, b, 7, 2, 3, 1, got), 1);
    CHECK_EQ_INT(got[0], 7);
    /* past the index's n: the scan's answer */
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, h, LEN, 1, ENG_NGRAM_INDEX_MAX_N + 2, 4, got),
                 eng_draft_ngram(h, LEN, 1, ENG_NGRAM_INDEX_MAX_N + 2, 4, want));
    /* bad arguments, as the scan */
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, h, LEN, 0, 3, 4, got), 0);
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, h, LEN, 3, 2, 4, got), 0);
    CHECK_EQ_INT(eng_ngram_index_lookup(ix, h, LEN, 1, 3, 0, got), 0);
    CHECK_EQ_INT(eng_ngram_index_lookup(NULL, b, 7, 2, 3, 1, got), 1);
    eng_ngram_index_destroy(&ix);
    CHECK(ix == NULL);
    free(h);
}

static void test_acceptance(void) {
    dc_spec_acc_t a = {0};
    CHECK(fabsf(dc_spec_acc_rate(&a) - 0.5f) < 1e-6f);
    for (int i = 0; i < 10; i++) dc_spec_acc_observe(&a, 4, 4);
    CHECK(dc_spec_acc_rate(&a) > 0.9f);
    for (int i = 0; i < 30; i++) dc_spec_acc_observe(&a, 4, 0); /* each round tests one draft: slower to fall */
    CHECK(dc_spec_acc_rate(&a) < 0.2f);
    float low = dc_spec_acc_rate(&a);
    for (int i = 0; i < 200; i++) dc_spec_acc_idle(&a);
    CHECK(dc_spec_acc_rate(&a) > low && fabsf(dc_spec_acc_rate(&a) - 0.5f) < 0.05f); /* back towards the prior */
    dc_spec_acc_observe(&a, 0, 0);                                                   /* nothing tested: no change */
    /* a prior of 0.05 (a draft model that keeps failing on this worker): a new sequence is not worth drafting for
     * under a cost where 0.5 would be, and an idle one decays back to 0.05, not 0.5 */
    dc_spec_acc_t poor = {.prior = 0.05f};
    CHECK(fabsf(dc_spec_acc_rate(&poor) - 0.05f) < 1e-6f);
    dc_spec_cost_t c = {.base_us = 1100, .per_token_us = 20, .draft_base_us = 400, .draft_token_us = 10, .scale = 1};
    int32_t k[1], avail[1] = {4};
    float r_poor = dc_spec_acc_rate(&poor), r_new = dc_spec_acc_rate(&(dc_spec_acc_t){0});
    CHECK_EQ_INT(dc_spec_allocate(&c, true, 1, &r_poor, avail, NULL, 1, 64, k), 0);
    CHECK(dc_spec_allocate(&c, true, 1, &r_new, avail, NULL, 1, 64, k) > 0);
    for (int i = 0; i < 10; i++) dc_spec_acc_observe(&poor, 4, 4);
    for (int i = 0; i < 400; i++) dc_spec_acc_idle(&poor);
    CHECK(fabsf(dc_spec_acc_rate(&poor) - 0.05f) < 0.02f);
}

static void test_allocate(void) {
    int32_t k[4], avail[4] = {5, 5, 5, 5};
    float acc[4] = {0.9f, 0.9f, 0.9f, 0.9f};
    /* weight-bound step (GPU-like: base 10 ms, 0.1 ms per token): every row drafts all it can */
    dc_spec_cost_t gpu = {.base_us = 10000, .per_token_us = 100, .scale = 1};
    CHECK_EQ_INT(dc_spec_allocate(&gpu, false, 4, acc, avail, NULL, 4, 64, k), 20);
    /* the step cap holds */
    CHECK_EQ_INT(dc_spec_allocate(&gpu, false, 4, acc, avail, NULL, 4, 6, k), 6);
    CHECK(k[0] + k[1] + k[2] + k[3] == 6);
    /* compute-bound steps (this CPU: base 3.8 ms + 3.3 ms a token): a batch of 32 gains nothing from drafts even
     * at acceptance 0.9 (0.9 tokens per 3.3 ms < 32 tokens per 109 ms) ... */
    dc_spec_cost_t cpu1 = {.base_us = 3800, .per_token_us = 3300, .scale = 1};
    int32_t k32[32], av32[32];
    float acc32[32];
    for (int i = 0; i < 32; i++) av32[i] = 5, acc32[i] = 0.9f;
    CHECK_EQ_INT(dc_spec_allocate(&cpu1, false, 32, acc32, av32, NULL, 32, 64, k32), 0);
    /* ... but one sequence does: 0.9 / 3.3 ms > 1 / 7.1 ms, and so on down to k = 3 */
    CHECK_EQ_INT(dc_spec_allocate(&cpu1, false, 1, acc, avail, NULL, 1, 64, k), 3);
    /* failing drafts are not proposed; availability bounds each row; the better row drafts deeper */
    float mixed[4] = {0.05f, 0.95f, 0.6f, 0.95f};
    int32_t av2[4] = {5, 2, 5, 0};
    dc_spec_allocate(&gpu, false, 4, mixed, av2, NULL, 4, 64, k);
    CHECK(k[0] <= 1 && k[1] == 2 && k[2] >= 1 && k[3] == 0);
    /* a draft model's cost counts: an expensive one drafts less than free n-gram lookup */
    dc_spec_cost_t dm = {
        .base_us = 3800, .per_token_us = 3300, .draft_base_us = 3000, .draft_token_us = 500, .scale = 1};
    int32_t kd = dc_spec_allocate(&dm, true, 1, acc, avail, NULL, 1, 64, k);
    CHECK(kd < 3);
    /* the measured scale applies to all costs alike: no change in the decision */
    dc_spec_cost_t scaled = cpu1;
    scaled.scale = 2;
    CHECK_EQ_INT(dc_spec_allocate(&scaled, false, 1, acc, avail, NULL, 1, 64, k), 3);
    dc_spec_cost_observe(&scaled, 1, 1e9); /* one absurd step moves the scale by a bounded amount */
    CHECK(scaled.scale <= 4);
    /* a draft model that would first have to read 1.3k tokens of a row's prompt (spread over its 128 tokens to go):
     * that row does not draft, while a caught-up row of equal acceptance in the same step does */
    dc_spec_cost_t dm2 = {
        .base_us = 9700, .per_token_us = 1500, .draft_base_us = 1000, .draft_token_us = 1500, .scale = 1};
    float acc2[2] = {0.9f, 0.9f}, extra[2] = {1300.0f * 1500 / 128, 0};
    int32_t av[2] = {4, 4}, k2[2];
    dc_spec_allocate(&dm2, true, 2, acc2, av, extra, 2, 64, k2);
    CHECK(k2[0] == 0 && k2[1] > 0);
}

/* The cost model refits itself from measured steps: calibrated as cheap GPU-like verification, it learns from
 * steps of 32-190 tokens that each verified token costs 60 us (host sampling of its logits row included), and
 * a batch of 32 at acceptance 0.5 stops drafting, while at acceptance 0.9 it still drafts. One slow step (a graph
 * capture) moves it a bounded amount. */
static void test_cost_refit(void) {
    dc_spec_cost_t c = {.base_us = 1000, .per_token_us = 2, .scale = 1};
    int32_t k[32], avail[32];
    float acc[32];
    for (int i = 0; i < 32; i++) avail[i] = 5, acc[i] = 0.5f;
    CHECK(dc_spec_allocate(&c, false, 32, acc, avail, NULL, 32, 256, k) >= 64); /* as calibrated: drafts look free */
    dc_spec_cost_observe(&c, 32, 3000); /* one step: no spread in n yet, only the scale moves */
    CHECK(c.per_token_us == 2 && c.scale > 1);
    for (int i = 0; i < 200; i++) { /* each step counts as at most 3x its prediction: it takes a while */
        const int32_t n = 32 + (i * 37) % 159;
        dc_spec_cost_observe(&c, n, 3000 + 60.0 * (n - 32));
    }
    CHECK(fabs(c.per_token_us - 60) < 1 && fabs(c.base_us - (3000 - 60 * 32)) < 30 && c.scale == 1);
    CHECK_EQ_INT(dc_spec_allocate(&c, false, 32, acc, avail, NULL, 32, 256, k), 0);
    for (int i = 0; i < 32; i++) acc[i] = 0.9f;
    CHECK(dc_spec_allocate(&c, false, 32, acc, avail, NULL, 32, 256, k) > 0);
    const double per_token = c.per_token_us;
    dc_spec_cost_observe(&c, 100, 1e7);
    CHECK(c.per_token_us < 3 * per_token);
    /* a noisy, decreasing-looking sample never makes verified tokens negative or free of the base */
    dc_spec_cost_t d = {.base_us = 1000, .per_token_us = 10, .scale = 1};
    for (int i = 0; i < 20; i++) dc_spec_cost_observe(&d, 1 + i % 6, 2000 - 100.0 * (i % 6));
    CHECK(d.per_token_us >= 0 && d.base_us >= 0);
}

/* The guard: drafts are disallowed only in a row-count bucket where both kinds of steps have been seen and the
 * drafted ones took longer per emitted token (medians of the recent steps); it follows a change in either direction
 * and shrugs off a few outliers. */
/* Drafted probes: every 2 * DC_SPEC_EXPLORE-th plan where drafts are allowed; where the guard disallows them, the
 * first at once and then ever further apart (each costs what drafting loses there), back to the short interval once
 * drafts are allowed again. Buckets keep their own schedules. */
static void test_guard_probes(void) {
    dc_spec_guard_t g = {0};
    const int64_t period = 2 * DC_SPEC_EXPLORE, longest = period << DC_SPEC_GUARD_MAX_BACKOFF;
    int n_due = 0;
    for (int64_t plan = 1; plan <= 40 * period; plan++) n_due += dc_spec_guard_probe_due(&g, 32, plan);
    CHECK_EQ_INT(n_due, 40); /* allowed (nothing measured): every period-th plan */
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++)
        dc_spec_guard_observe(&g, 40, 0, 40, 2000), dc_spec_guard_observe(&g, 40, 30, 50, 4000);
    REQUIRE(!dc_spec_guard_allows(&g, 32));
    int64_t due[16], n = 0, plan = 40 * period;
    for (int64_t end = plan + 6 * longest; ++plan <= end;)
        if (dc_spec_guard_probe_due(&g, 32, plan) && n < 16) due[n++] = plan;
    CHECK_MSG(n >= 8 && n <= 11, "%d probes in %lld plans", (int)n, (long long)(6 * longest));
    CHECK_EQ_INT(due[0], 40 * period + 1); /* the first at once */
    for (int i = 1; i < n; i++) {
        const int64_t gap = due[i] - due[i - 1],
                      want = period << (i - 1 < DC_SPEC_GUARD_MAX_BACKOFF ? i - 1 : DC_SPEC_GUARD_MAX_BACKOFF);
        CHECK_MSG(gap == want, "probe %d after %lld plans, want %lld", i, (long long)gap, (long long)want);
    }
    char line[256];
    dc_spec_guard_describe(&g, line, sizeof line);
    CHECK_MSG(strstr(line, "off (probes every 512 steps)") != NULL, "%s", line);
    /* another bucket is unaffected */
    CHECK(dc_spec_guard_probe_due(&g, 4, period * 1000));
    CHECK(!dc_spec_guard_probe_due(&g, 4, period * 1000 + 1));
    /* drafts pay again: the short interval, from the next plan */
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++) dc_spec_guard_observe(&g, 40, 30, 80, 2000);
    REQUIRE(dc_spec_guard_allows(&g, 32));
    n_due = 0;
    for (int64_t end = plan + 10 * period; ++plan <= end;) n_due += dc_spec_guard_probe_due(&g, 32, plan);
    CHECK_EQ_INT(n_due, 10);
}

static void test_guard(void) {
    dc_spec_guard_t g = {0};
    CHECK(dc_spec_guard_allows(&g, 32)); /* nothing measured */
    /* batch of 32: steps without drafts emit 32 tokens in 2000 us; with drafts, 37 in 2500 us (14.8 vs 16 per ms) */
    for (int i = 0; i < 3; i++) dc_spec_guard_observe(&g, 32, 0, 32, 2000), dc_spec_guard_observe(&g, 33, 20, 37, 2500);
    CHECK(dc_spec_guard_allows(&g, 32)); /* three steps of each: too few for a verdict */
    for (int i = 0; i < 10; i++)
        dc_spec_guard_observe(&g, 40, 0, 40, 2200), dc_spec_guard_observe(&g, 36, 20, 41, 2800);
    CHECK(!dc_spec_guard_allows(&g, 32));
    CHECK(!dc_spec_guard_allows(&g, 63)); /* the same bucket (32-63) */
    char line[512];
    CHECK_EQ_INT(dc_spec_guard_describe(&g, line, sizeof line), 1);
    /* time over tokens: drafted (10 x 2800 + 3 x 2500) / (10 x 41 + 3 x 37), plain (10 x 2200 + 3 x 2000) /
     * (10 x 40 + 3 x 32); the median step's: 2800 / 41 and 2200 / 40 */
    CHECK_MSG(strcmp(line,
                     "rows 32-63: drafts 68.14/68.29 us/token (time/tokens, median; 13) vs none 56.45/55.00 (13): "
                     "off") == 0,
              "%s", line);
    char tiny[8];
    CHECK_EQ_INT(dc_spec_guard_describe(&g, tiny, sizeof tiny), 1); /* cut to fit, NUL-terminated */
    CHECK(strlen(tiny) == sizeof tiny - 1);
    CHECK(dc_spec_guard_allows(&g, 16) && dc_spec_guard_allows(&g, 64) && dc_spec_guard_allows(&g, 1));
    /* the drafts start paying (acceptance rose): 50 tokens in 2400 us against 40 in 2200 */
    int n_steps = 0;
    while (!dc_spec_guard_allows(&g, 32) && n_steps < 200) dc_spec_guard_observe(&g, 40, 30, 50, 2400), n_steps++;
    CHECK(dc_spec_guard_allows(&g, 32));
    CHECK(n_steps > 1 && n_steps < 40); /* a few dozen steps of memory, not all of history */
    /* batch 1, drafts paying from the start: 1.8 tokens in 1100 us against 1 in 1000 */
    for (int i = 0; i < 20; i++) dc_spec_guard_observe(&g, 1, 4, 2, 1100), dc_spec_guard_observe(&g, 1, 0, 1, 1000);
    CHECK(dc_spec_guard_allows(&g, 1));
    /* a few drafted steps that took 50x (CUDA graph captures of new shapes) do not turn it */
    for (int i = 0; i < 5; i++) dc_spec_guard_observe(&g, 1, 4, 2, 55000);
    CHECK(dc_spec_guard_allows(&g, 1));
    /* garbage in changes nothing */
    dc_spec_guard_t h = g;
    dc_spec_guard_observe(&h, 0, 4, 2, 1000), dc_spec_guard_observe(&h, 8, 4, 2, 0),
        dc_spec_guard_observe(&h, 8, 4, -1, 5);
    CHECK(memcmp(&h, &g, sizeof g) == 0);
    CHECK(dc_spec_guard_allows(&g, 0));
}

/* The A/B knobs: a margin that drafts must beat, and the median or trimmed mean of each step's time per token instead of
 * the time over the tokens. */
static void test_guard_margin_mean(void) {
    dc_spec_guard_t g = {0};
    /* drafts 3% cheaper per token: 40 tokens in 1940 us against 40 in 2000 */
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++)
        dc_spec_guard_observe(&g, 40, 0, 40, 2000), dc_spec_guard_observe(&g, 36, 8, 40, 1940);
    CHECK(dc_spec_guard_allows(&g, 32));
    g.margin = 0.95; /* must be 5% cheaper */
    CHECK(!dc_spec_guard_allows(&g, 32));
    g.margin = 0.98;
    CHECK(dc_spec_guard_allows(&g, 32));
    /* a heavy tail in the drafted steps (a quarter at 2.6x, under the outlier cut): the time over the tokens sees it
     * ((4 x 5000 + 12 x 1900) / 704 = 60.8 against 50 us per token), the trimmed mean too, the median does not */
    dc_spec_guard_t h = {0};
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++) dc_spec_guard_observe(&h, 40, 0, 40, 2000);
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++) dc_spec_guard_observe(&h, 40, 8, 44, i % 4 == 0 ? 5000 : 1900);
    CHECK(!dc_spec_guard_allows(&h, 32));
    h.stat = DC_SPEC_GUARD_MEDIAN;
    CHECK(dc_spec_guard_allows(&h, 32));
    h.stat = DC_SPEC_GUARD_MEAN;
    CHECK(!dc_spec_guard_allows(&h, 32));
}

/* Batch 1, drafts all or nothing: every drafted step takes 800 us, 10 of 16 emit one token (all drafts rejected)
 * and 6 emit six; plain steps emit one in 650 us. Over the tokens drafts cost 12800 / 46 = 278 us each: they pay,
 * 2.3x. The median step's time per token (800) said they lose, which kept n-gram drafting off for RAG at batch 1 on
 * the H100 (1.03-1.26x of no speculation where drafting every step gave 1.7x). */
static void test_guard_all_or_nothing(void) {
    dc_spec_guard_t g = {0};
    for (int i = 0; i < DC_SPEC_GUARD_STEPS; i++)
        dc_spec_guard_observe(&g, 1, 0, 1, 650), dc_spec_guard_observe(&g, 1, 5, i % 8 < 3 ? 6 : 1, 800);
    CHECK(dc_spec_guard_allows(&g, 1));
    char line[256];
    dc_spec_guard_describe(&g, line, sizeof line);
    CHECK_MSG(strcmp(line,
                     "rows 1: drafts 278.26/800.00 us/token (time/tokens, median; 16) vs none 650.00/650.00 (16): "
                     "on") == 0,
              "%s", line);
    g.stat = DC_SPEC_GUARD_MEDIAN;
    CHECK(!dc_spec_guard_allows(&g, 1));
}

/* ---- the real model ---- */

static eng_t *s_engine, *s_draft_engine;
static int32_t s_vocab;
static float *s_logits;

typedef struct {
    uint64_t id;
    int32_t toks[MAX_GEN];
    float lps[MAX_GEN];
    int n_toks;
    char text[4096];
    size_t n_text;
    dc_finish_t finish;
} out_t;

static out_t s_outs[MAX_REQS];

static out_t *s_out(uint64_t id) {
    PD_ASSERT(id >= 1 && id <= MAX_REQS);
    return &s_outs[id - 1];
}

static void s_record(const dc_event_t *ev, int n) {
    for (int i = 0; i < n; i++) {
        out_t *o = s_out(ev[i].req_id);
        CHECK(o->finish == DC_FINISH_NONE);
        if (ev[i].token >= 0 && o->n_toks < MAX_GEN) {
            o->lps[o->n_toks] = ev[i].logprob;
            o->toks[o->n_toks++] = ev[i].token;
        }
        if (o->n_text + (size_t)ev[i].n_text < sizeof o->text) {
            memcpy(o->text + o->n_text, ev[i].text, (size_t)ev[i].n_text);
            o->n_text += (size_t)ev[i].n_text;
        }
        o->finish = ev[i].finish;
    }
}

/* A variant of the harness: the engine samples the rows (dc_plan_batch without logits, as dc_exec does) instead of
 * dc_sched_update sampling logits. */
static bool s_is_engine_sampling;
/* Another: n-gram lookup from s_ngram_min tokens, and one-token matches as their own class (s_short_k drafts,
 * dc_sched_params_t.ngram_short_k). */
static int32_t s_ngram_min = 1, s_short_k;
/* And the most drafts a row may take per step (dc_sched_params_t.spec_k): the default, or the cap. */
static int32_t s_spec_k = 7;

static dc_sched_t *s_sched(dc_spec_mode_t spec) {
    dc_sched_params_t p = dc_sched_params_default();
    p.pool = eng_kv_pool(s_engine);
    p.tok = eng_tokenizer(s_engine);
    p.block_size = eng_kv_layout(s_engine)->block_size;
    p.vocab_size = s_vocab;
    p.max_context = eng_config(s_engine)->ctx_len;
    p.max_seqs = 16;
    p.max_batch_seqs = 8;
    p.watermark_blocks = 1;
    p.prefill_chunk_tokens = 64;
    p.max_prefill_seqs = 2;
    p.spec = spec;
    p.spec_k = s_spec_k;
    p.ngram_min = s_ngram_min;
    p.ngram_max = 3;
    p.ngram_short_k = s_short_k;
    if (spec == DC_SPEC_DRAFT) {
        p.draft_pool = eng_kv_pool(s_draft_engine);
        p.draft_block_size = eng_kv_layout(s_draft_engine)->block_size;
        p.draft_catchup_tokens = 48; /* below the prompts' length: catch-up spreads over steps */
    }
    char err[256];
    dc_sched_t *s = dc_sched_create(&p, err, sizeof err);
    if (!s) fprintf(stderr, "dc_sched_create: %s\n", err);
    if (s && spec != DC_SPEC_OFF) {
        /* a weight-bound cost model, so that every available draft is proposed: the test is about correctness */
        dc_spec_cost_t c = {.base_us = 1e6, .per_token_us = 1, .draft_base_us = 1, .draft_token_us = 1, .scale = 1};
        dc_sched_spec_set_cost(s, &c);
    }
    return s;
}

/* Runs every request to its end: plan, draft model, forward, update. Returns steps, or -1. */
static int s_run(dc_sched_t *s, eng_drafter_t *d) {
    static dc_event_t ev[8 * DC_MAX_TOKENS_PER_SEQ + 16];
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    int steps = 0;
    for (;;) {
        int n = dc_sched_plan(s, 0, &plan, ev, (int)(sizeof ev / sizeof *ev));
        if (n < 0) break;
        s_record(ev, n);
        if (plan.n_seqs == 0) break;
        if (d) dc_exec_draft(d, &plan);
        float *logits = s_is_engine_sampling ? NULL : s_logits;
        eng_batch_t b = dc_plan_batch(&plan, logits);
        if (eng_forward(s_engine, &b) != PD_OK) break;
        n = dc_sched_update(s, &plan, logits, 0, ev, (int)(sizeof ev / sizeof *ev));
        if (n < 0) break;
        s_record(ev, n);
        steps++;
    }
    dc_plan_fini(&plan);
    return steps;
}

static const char *s_prompts[MAX_REQS] = {
    "Repeat exactly: the red fox runs, the red fox jumps, the red fox runs, the red fox jumps, the red fox",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
    "Document: Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.\n"
    "Question: what is the capital of Germany? Quote the document.\nAnswer:",
    "Count: one, two, three, four, five, six, seven, eight, nine, ten, one, two, three, four,",
    "Once upon a time",
    "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
};

static int32_t s_prompt_ids[MAX_REQS][256];
static int32_t s_n_prompt[MAX_REQS];
static bool s_quick; /* PD_TEST_QUICK=1 (the sanitizer run, ~40x slower forwards): short answers */

static dc_req_params_t s_req(int i, bool is_sampled) {
    static const char *stops[] = {"seven"};
    dc_req_params_t r = dc_req_params_default();
    r.req_id = (uint64_t)i + 1;
    r.n_prompt_tokens = s_n_prompt[i];
    r.prompt = s_prompt_ids[i];
    r.is_prefill_local = true;
    r.max_tokens = s_quick ? 4 : i == 4 ? 8 : 32;
    r.ignore_eos = i != 2;
    if (i == 3) r.stops = stops, r.n_stops = 1; /* a stop string that an accepted run may contain */
    if (is_sampled) {
        r.sampling.temperature = 0.8f;
        r.sampling.top_p = 0.95f;
        r.sampling.repetition_penalty = i == 1 ? 1.1f : 1.0f; /* penalties see the accepted drafts */
        r.sampling.seed = 1234 + (uint64_t)i;
        r.sampling.has_seed = true;
    }
    r.sampling.n_logprobs = 2;
    return r;
}

/* All requests through one scheduler in mode spec, in one batch (or one at a time): outputs into s_outs. */
static void s_decode(dc_spec_mode_t spec, bool is_sampled, bool is_batched, dc_sched_stats_t *st) {
    memset(s_outs, 0, sizeof s_outs);
    dc_sched_t *s = s_sched(spec);
    REQUIRE(s);
    eng_drafter_t *d = NULL;
    char err[256] = "";
    if (spec == DC_SPEC_DRAFT) {
        d = eng_drafter_create(s_draft_engine, s_engine, 8, 48 + 8, err, sizeof err);
        REQUIRE(d);
    }
    for (int i = 0; i < MAX_REQS; i++) {
        dc_req_params_t r = s_req(i, is_sampled);
        CHECK_EQ_INT(dc_sched_reserve(s, &r, err, sizeof err), PD_OK);
        if (!is_batched) CHECK(s_run(s, d) > 0);
    }
    if (is_batched) CHECK(s_run(s, d) > 0);
    dc_sched_stats(s, st);
    CHECK_EQ_INT(st->n_running + st->n_prefilling + st->n_waiting, 0);
    CHECK_EQ_INT(st->n_free_blocks, st->n_total_blocks);
    eng_drafter_destroy(&d);
    dc_sched_destroy(&s);
    if (s_draft_engine)
        CHECK_EQ_INT(eng_kv_pool_n_free(eng_kv_pool(s_draft_engine)),
                     eng_kv_pool_n_blocks(eng_kv_pool(s_draft_engine)));
}

static void s_check_same(const out_t *ref, const char *what) {
    for (int i = 0; i < MAX_REQS; i++) {
        const out_t *a = &ref[i], *b = &s_outs[i];
        bool same = a->n_toks == b->n_toks && !memcmp(a->toks, b->toks, sizeof a->toks[0] * (size_t)a->n_toks) &&
                    a->finish == b->finish && a->n_text == b->n_text && !memcmp(a->text, b->text, a->n_text);
        for (int t = 0; same && t < a->n_toks; t++) same = a->lps[t] == b->lps[t];
        if (!same) {
            int t = 0;
            while (t < a->n_toks && t < b->n_toks && a->toks[t] == b->toks[t]) t++;
            fprintf(stderr, "%s: request %d differs (tokens %d vs %d, first difference at %d)\n", what, i, a->n_toks,
                    b->n_toks, t);
        }
        CHECK(same);
    }
}

static void s_lossless(bool is_sampled) {
    static out_t ref[MAX_REQS];
    dc_sched_stats_t st;
    s_decode(DC_SPEC_OFF, is_sampled, false, &st); /* the reference: alone, no speculation */
    memcpy(ref, s_outs, sizeof ref);
    CHECK_EQ_INT(st.n_draft_tokens, 0);
    if (!s_quick) CHECK_EQ_INT(ref[3].finish, DC_FINISH_STOP); /* the stop string is reached */

    s_decode(DC_SPEC_NGRAM, is_sampled, true, &st);
    s_check_same(ref, is_sampled ? "ngram, sampled, batch" : "ngram, greedy, batch");
    fprintf(stderr, "ngram %s: %llu drafts, %llu accepted, %llu of %llu rows drafted\n",
            is_sampled ? "sampled" : "greedy", (unsigned long long)st.n_draft_tokens,
            (unsigned long long)st.n_accepted_tokens, (unsigned long long)st.n_spec_rows,
            (unsigned long long)st.n_decode_rows);
    CHECK(st.n_accepted_tokens > 0);                 /* drafts were used ... */
    CHECK(st.n_draft_tokens > st.n_accepted_tokens); /* ... and some rejected: rollback ran */
    if (!s_quick) {
        s_decode(DC_SPEC_NGRAM, is_sampled, false, &st);
        s_check_same(ref, "ngram, alone");
    }
    /* as the decode service runs: the rows sampled by the engine (on the GPU with CUDA), from row requests */
    s_is_engine_sampling = true;
    s_decode(DC_SPEC_NGRAM, is_sampled, true, &st);
    s_is_engine_sampling = false;
    s_check_same(ref, "ngram, engine sampling");
    CHECK(st.n_accepted_tokens > 0);

    s_decode(DC_SPEC_DRAFT, is_sampled, true, &st);
    s_check_same(ref, is_sampled ? "draft model, sampled, batch" : "draft model, greedy, batch");
    fprintf(stderr, "draft %s: %llu drafts, %llu accepted\n", is_sampled ? "sampled" : "greedy",
            (unsigned long long)st.n_draft_tokens, (unsigned long long)st.n_accepted_tokens);
    CHECK(st.n_accepted_tokens > 0);
    if (!is_sampled) CHECK(st.n_accepted_tokens * 10 >= st.n_draft_tokens * 9); /* the draft is the model itself */
    if (is_sampled) CHECK(st.n_draft_tokens > st.n_accepted_tokens);
}

static void test_lossless_greedy(void) {
    s_lossless(false);
}

static void test_lossless_sampled(void) {
    s_lossless(true);
}

/* At the cap (DC_MAX_TOKENS_PER_SEQ - 1 drafts a row): verification rows of 12 tokens, still the same tokens. */
static void test_lossless_most_drafts(void) {
    s_spec_k = DC_MAX_TOKENS_PER_SEQ - 1;
    s_lossless(false);
    s_spec_k = 7;
}

/* One-token matches drafting apart (ngram_short_k) with lookups from 2 tokens: still the same tokens, greedy and
 * sampled, and more drafts than the lookups from 2 tokens propose alone (the one-token class is used). */
static void test_lossless_short_matches(void) {
    for (int is_sampled = 0; is_sampled < 2; is_sampled++) {
        static out_t ref[MAX_REQS];
        dc_sched_stats_t st, st_long;
        s_decode(DC_SPEC_OFF, is_sampled != 0, false, &st);
        memcpy(ref, s_outs, sizeof ref);
        s_ngram_min = 2;
        s_decode(DC_SPEC_NGRAM, is_sampled != 0, true, &st_long);
        s_check_same(ref, is_sampled ? "ngram from 2 tokens, sampled" : "ngram from 2 tokens");
        s_short_k = 3;
        s_decode(DC_SPEC_NGRAM, is_sampled != 0, true, &st);
        s_check_same(ref, is_sampled ? "ngram with one-token matches, sampled" : "ngram with one-token matches");
        s_ngram_min = 1, s_short_k = 0;
        fprintf(stderr, "one-token class %s: %llu drafts (%llu from 2 tokens alone), %llu accepted\n",
                is_sampled ? "sampled" : "greedy", (unsigned long long)st.n_draft_tokens,
                (unsigned long long)st_long.n_draft_tokens, (unsigned long long)st.n_accepted_tokens);
        CHECK(st.n_accepted_tokens > 0);
        CHECK(st.n_draft_tokens > st.n_accepted_tokens);
        CHECK(st.n_draft_tokens > st_long.n_draft_tokens);
    }
}

/* A request that asks for no speculation gets none; spec_k above the deployment's is capped. */
static void test_per_request(void) {
    dc_sched_t *s = s_sched(DC_SPEC_NGRAM);
    REQUIRE(s);
    memset(s_outs, 0, sizeof s_outs);
    dc_req_params_t r = s_req(0, false);
    r.spec_k = 0;
    CHECK_EQ_INT(dc_sched_reserve(s, &r, NULL, 0), PD_OK);
    CHECK(s_run(s, NULL) > 0);
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_draft_tokens, 0);
    r.req_id = 2, r.spec_k = 100;
    CHECK_EQ_INT(dc_sched_reserve(s, &r, NULL, 0), PD_OK);
    CHECK(s_run(s, NULL) > 0);
    dc_sched_stats(s, &st);
    CHECK(st.n_draft_tokens > 0 && st.n_draft_tokens <= 7 * st.n_spec_rows);
    r.req_id = 3, r.spec_k = -2;
    CHECK_EQ_INT(dc_sched_reserve(s, &r, NULL, 0), PD_EINVAL);
    dc_sched_destroy(&s);
}

/* ---- the distribution of sampled tokens under speculation ----
 * Synthetic logits (a 5-token slice of the vocabulary, the rest -inf) replace the model, so that the target
 * distribution p is known exactly. The n-gram lookup proposes token D at the step under test; over many seeds the
 * emitted token must follow p (chi-square), not favour the draft, and when D was accepted the next token must
 * follow the next row's distribution. The same seeds without speculation give the same tokens. */
#define SLICE 5
static const int32_t s_slice[SLICE] = {300, 301, 302, 303, 304};
static const float s_p0[SLICE] = {0.10f, 0.30f, 0.25f, 0.20f, 0.15f}; /* D = 301 has p = 0.3 */
static const float s_p1[SLICE] = {0.40f, 0.05f, 0.05f, 0.20f, 0.30f};

static void s_fill_row(float *row, const float *p) {
    for (int32_t v = 0; v < s_vocab; v++) row[v] = -INFINITY;
    for (int i = 0; i < SLICE; i++) row[s_slice[i]] = logf(p[i]);
}

/* Emitted tokens of one request's first decode step (seed), with or without n-gram drafting. */
static int s_one_step(dc_spec_mode_t spec, uint64_t seed, int32_t *out) {
    dc_sched_t *s = s_sched(spec);
    if (!s) return -1;
    /* prompt "a b c D a b" and prefill's first token c: the lookup finds "a b c" and proposes D a b c */
    int32_t prompt[] = {200, 201, 202, 301, 200, 201};
    dc_req_params_t r = dc_req_params_default();
    r.req_id = 1, r.n_prompt_tokens = 6, r.prompt = prompt, r.max_tokens = 8, r.ignore_eos = true;
    r.sampling.temperature = 1, r.sampling.seed = seed, r.sampling.has_seed = true;
    CHECK_EQ_INT(dc_sched_reserve(s, &r, NULL, 0), PD_OK);
    eng_sample_result_t first = {.token = 202, .logprob = NAN};
    dc_event_t ev[16];
    CHECK_EQ_INT(dc_sched_admit(s, 1, &first, 0, &ev[0]), PD_OK);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, ev, 16), 0);
    CHECK_EQ_INT(plan.n_draft[0], spec == DC_SPEC_OFF ? 0 : 4);
    CHECK(spec == DC_SPEC_OFF || plan.tokens[1] == 301);
    for (int32_t row = 0; row < plan.n_logits; row++)
        s_fill_row(s_logits + (size_t)row * (size_t)s_vocab, row == 0 ? s_p0 : s_p1);
    int n = dc_sched_update(s, &plan, s_logits, 0, ev, 16);
    for (int i = 0; i < n; i++) out[i] = ev[i].token;
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    return n;
}

static double s_chi2(const int *count, const float *p, int n) {
    double x = 0;
    for (int i = 0; i < SLICE; i++) {
        double e = p[i] * n;
        x += (count[i] - e) * (count[i] - e) / e;
    }
    return x;
}

static int s_slot_of(int32_t token) {
    for (int i = 0; i < SLICE; i++)
        if (s_slice[i] == token) return i;
    return -1;
}

static void test_distribution(void) {
    int n_seeds = s_quick ? 500 : 4000;
    int c0[SLICE] = {0}, c1[SLICE] = {0}, n_accepted = 0, n_same = 0;
    for (int seed = 0; seed < n_seeds; seed++) {
        int32_t with[8], without[8];
        int n = s_one_step(DC_SPEC_NGRAM, 7000 + (uint64_t)seed, with);
        REQUIRE(n >= 1);
        REQUIRE(s_one_step(DC_SPEC_OFF, 7000 + (uint64_t)seed, without) == 1);
        n_same += with[0] == without[0];
        int k0 = s_slot_of(with[0]);
        REQUIRE(k0 >= 0);
        c0[k0]++;
        /* D accepted: the next row is sampled too (from p1, which cannot give the second draft, 200: the run ends) */
        CHECK_EQ_INT(n, with[0] == 301 ? 2 : 1);
        if (n == 2) {
            n_accepted++;
            int k1 = s_slot_of(with[1]);
            REQUIRE(k1 >= 0);
            c1[k1]++;
        }
    }
    /* chi-square, 4 degrees of freedom: 18.47 is the 0.1% critical value (seeds are fixed: no flakiness) */
    double x0 = s_chi2(c0, s_p0, n_seeds), x1 = s_chi2(c1, s_p1, n_accepted);
    fprintf(stderr,
            "  first token: chi2 = %.2f over %d seeds (accepted the draft %d times, p = 0.30); "
            "after an accepted draft: chi2 = %.2f over %d\n",
            x0, n_seeds, n_accepted, x1, n_accepted);
    CHECK(x0 < 18.47);
    CHECK(x1 < 18.47);
    CHECK_EQ_INT(n_same, n_seeds); /* and token for token what plain decoding draws with the same seed */
}

int main(void) {
    pd_log_init("test_dc_spec", PD_LOG_WARN);
    const char *q = getenv("PD_TEST_QUICK");
    s_quick = q && !strcmp(q, "1");
    PD_TEST_RUN(test_ngram);
    PD_TEST_RUN(test_ngram_index);
    PD_TEST_RUN(test_acceptance);
    PD_TEST_RUN(test_allocate);
    PD_TEST_RUN(test_cost_refit);
    PD_TEST_RUN(test_guard);
    PD_TEST_RUN(test_guard_margin_mean);
    PD_TEST_RUN(test_guard_all_or_nothing);
    PD_TEST_RUN(test_guard_probes);
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.n_threads = 2;
    p.kv_n_blocks = 96;
    p.max_batch_seqs = 16;
    char err[512];
    s_engine = eng_create(&p, err, sizeof err);
    p.kv_n_blocks = 64;
    s_draft_engine = s_engine ? eng_create(&p, err, sizeof err) : NULL;
    if (!s_engine || !s_draft_engine) {
        fprintf(stderr, "eng_create: %s\n", err);
        return 1;
    }
    s_vocab = eng_config(s_engine)->vocab_size;
    s_logits = pd_xmalloc(sizeof(float) * (8 * DC_MAX_TOKENS_PER_SEQ + 2) * (size_t)s_vocab);
    for (int i = 0; i < MAX_REQS; i++) {
        int64_t n =
            eng_tok_encode(eng_tokenizer(s_engine), s_prompts[i], strlen(s_prompts[i]), false, s_prompt_ids[i], 256);
        if (n <= 0 || n > 256) {
            fprintf(stderr, "prompt %d: %lld tokens\n", i, (long long)n);
            return 1;
        }
        s_n_prompt[i] = s_quick && n > 24 ? 24 : (int32_t)n; /* quick: shorter prompts, still self-repeating */
    }
    PD_TEST_RUN(test_lossless_greedy);
    PD_TEST_RUN(test_lossless_most_drafts);
    PD_TEST_RUN(test_lossless_short_matches);
    PD_TEST_RUN(test_lossless_sampled);
    PD_TEST_RUN(test_per_request);
    PD_TEST_RUN(test_distribution);
    free(s_logits);
    eng_destroy(&s_draft_engine);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
