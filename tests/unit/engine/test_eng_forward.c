/* test_eng_forward.c: the forward pass against Hugging Face transformers (golden logits and greedy
 * continuations made by tests/golden/make_logits_golden.py), and batch invariance: a sequence's
 * logits are bit-identical alone, in a batch of 16 mixed sequences, and prefilled in chunks of 7.
 * PD_TEST_BACKEND=cuda (tests/gpu/, label gpu) runs the same checks on the CUDA backend with bf16 tolerances:
 * the CPU backend matches the golden greedy tokens exactly, so agreeing with them is agreeing with the CPU. */
#include <math.h>
#include <stdint.h>

#include "eng.h"
#include "pd_log.h"
#include "pd_test.h"

#define GOLDEN_DIR              PD_SOURCE_DIR "/tests/golden/logits"
/* Logit tolerance against transformers float32: both sides compute in f32 with different summation
 * orders over 30 layers. Observed max |diff| is 3e-5..8e-5 (printed per case); 1e-3 leaves room for
 * other compilers and kernels without hiding a real error (a wrong RoPE layout is off by ~6). */
#define LOGIT_ABS_TOL           1e-3f
/* A greedy divergence is accepted only at a near-tie: top-2 margin in the reference below this. */
#define NEAR_TIE_MARGIN         2e-3f
/* CUDA: bf16 weights, activations into each GEMM and KV (8 significant bits) put logits 0.3-4.3% off in L2 norm
 * on the 11 golden prompts (H100, 2026-11-23; random-weight models in test_cuda_parity: 0.6-1.1%); 6% still fails
 * a real error (one layer's output dropped is > 30%). A greedy divergence is accepted at a reference margin below
 * 0.5 logits (observed: 0.006-0.03). Alone vs batched: not bit for bit, because batch size picks the kernels. Rows
 * of batches of 1-4 go through the f32 CUDA-core matrix-vector kernel, larger batches through cuBLAS's tensor-core
 * GEMMs, whose f32 accumulation rounds differently; SmolLM2's attention sinks amplify it: 1.84e-2 (L2) worst over
 * this test's 16 sequences x 9 steps, 8.8e-3 with cuBLAS for every row (ENG_CUDA_GEMV=0), H100, 2026-11-23. The
 * amplification makes the worst row swing with any rounding change: with the tensor-core decode attention it is
 * 4.05e-2 (one row; 5.3e-2 with its queries in three bf16 terms instead of two), while that kernel's outputs are
 * within 1 bf16 ulp of the CUDA-core kernel's on every attention call of this test (22410 calls, worst rel L2
 * 1.7e-3, median 7e-6; H100, 2026-11-24). With the norm folded into the weights (session 17) the two paths no longer
 * even share their bf16 inputs: cuBLAS's rows take bf16(x / rms), the matrix-vector kernel's bf16(x), scaled by
 * 1 / rms after the product. Worst row 7.59e-2 (H100, 2026-11-25). Each path is within CUDA_REL_TOL of the f32
 * reference, so their difference is within twice that (triangle inequality): the worst row is held to that, and the
 * mean over rows to half of CUDA_REL_TOL, which a real error on a tenth of the rows (over 30% each) exceeds. */
#define CUDA_REL_TOL            6e-2f
#define CUDA_NEAR_TIE_MARGIN    0.5f
#define CUDA_BATCH_REL_TOL      (2 * CUDA_REL_TOL)
#define CUDA_BATCH_MEAN_REL_TOL (CUDA_REL_TOL / 2)
static bool s_is_cuda;

typedef struct {
    char name[64];
    int n_prompt, n_gen, n_extra;
    int32_t *prompt, *greedy, *extra_pos;
    float *margins;
    float *logits; /* (1 + n_extra, vocab) */
} golden_case_t;

static eng_t *s_engine;
static int32_t s_vocab;

static int s_read_ints(FILE *f, int32_t *dst, int n) {
    for (int i = 0; i < n; i++)
        if (fscanf(f, "%d", &dst[i]) != 1) return -1;
    return 0;
}

static int s_load_case(golden_case_t *c) {
    char path[1024];
    snprintf(path, sizeof path, GOLDEN_DIR "/%s.tokens.txt", c->name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    c->prompt = pd_xmalloc(sizeof(int32_t) * (size_t)c->n_prompt);
    c->greedy = pd_xmalloc(sizeof(int32_t) * (size_t)c->n_gen);
    c->margins = pd_xmalloc(sizeof(float) * (size_t)c->n_gen);
    c->extra_pos = pd_xmalloc(sizeof(int32_t) * (size_t)(c->n_extra + 1));
    int rc = s_read_ints(f, c->prompt, c->n_prompt) || s_read_ints(f, c->greedy, c->n_gen);
    for (int i = 0; !rc && i < c->n_gen; i++) rc = fscanf(f, "%f", &c->margins[i]) != 1;
    if (!rc) rc = s_read_ints(f, c->extra_pos, c->n_extra);
    fclose(f);
    if (rc) return -1;
    snprintf(path, sizeof path, GOLDEN_DIR "/%s.logits.f32", c->name);
    f = fopen(path, "rb");
    if (!f) return -1;
    size_t n = (size_t)(1 + c->n_extra) * (size_t)s_vocab;
    c->logits = pd_xmalloc(sizeof(float) * n);
    rc = fread(c->logits, sizeof(float), n, f) != n;
    fclose(f);
    return rc ? -1 : 0;
}

static int s_load_index(golden_case_t **out) {
    FILE *f = fopen(GOLDEN_DIR "/index.txt", "r");
    if (!f) return -1;
    golden_case_t *cases = NULL;
    int n = 0;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        golden_case_t c = {0};
        if (sscanf(line, "%63s %d %d %d", c.name, &c.n_prompt, &c.n_gen, &c.n_extra) != 4) continue;
        if (s_load_case(&c)) {
            fprintf(stderr, "cannot load golden case %s\n", c.name);
            fclose(f);
            return -1;
        }
        cases = pd_xrealloc(cases, sizeof *cases * (size_t)(n + 1));
        cases[n++] = c;
    }
    fclose(f);
    *out = cases;
    return n;
}

/* Runs one sequence: tokens [0, n) from position pos in chunks of `chunk` tokens, logits for the
 * positions flagged in want (NULL: last only) written row after row into logits. */
static pd_status s_run_seq(eng_kv_seq_t *seq, const int32_t *tokens, int32_t n, int32_t pos, int32_t chunk,
                           const uint8_t *want, float *logits) {
    pd_status st = eng_kv_seq_reserve(seq, eng_kv_pool(s_engine), eng_kv_layout(s_engine)->block_size, pos + n);
    if (st != PD_OK) return st;
    uint8_t *w = pd_xcalloc((size_t)n, 1);
    if (want)
        memcpy(w, want, (size_t)n);
    else
        w[n - 1] = 1;
    int32_t rows = 0;
    for (int32_t done = 0; done < n && st == PD_OK; done += chunk) {
        int32_t nt = n - done < chunk ? n - done : chunk, p = pos + done;
        const int32_t *table = seq->blocks;
        eng_batch_t b = {.n_seqs = 1,
                         .n_tokens = &nt,
                         .pos = &p,
                         .block_tables = &table,
                         .n_blocks = &seq->n_blocks,
                         .tokens = tokens + done,
                         .want_logits = w + done,
                         .logits = logits + (size_t)rows * s_vocab};
        rows += eng_batch_n_logits(&b);
        st = eng_forward(s_engine, &b);
    }
    free(w);
    return st;
}

static int32_t s_argmax(const float *v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Top logit minus the runner-up. */
static float s_top2_margin(const float *v, int32_t n) {
    const int32_t best = s_argmax(v, n);
    float second = -INFINITY;
    for (int32_t i = 0; i < n; i++)
        if (i != best && v[i] > second) second = v[i];
    return v[best] - second;
}

static float s_max_abs_diff(const float *a, const float *b, int32_t n) {
    float m = 0;
    for (int32_t i = 0; i < n; i++) {
        float d = fabsf(a[i] - b[i]);
        if (!(d <= m)) m = d; /* NaN propagates as failure */
    }
    return m;
}

/* PD_TEST_QUICK=1 (the sanitizer run: same code paths, ~30x slower instructions) keeps prompts up to
 * 128 tokens and 8 greedy steps (the Release run covers the 293- and 1044-token ones). */
static bool s_quick(void) {
    const char *q = getenv("PD_TEST_QUICK");
    return q && *q && *q != '0';
}

static void test_golden_logits_and_greedy(void) {
    golden_case_t *cases = NULL;
    int n_cases = s_load_index(&cases);
    REQUIRE(n_cases >= 8);
    float *logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab * 8);
    for (int ci = 0; ci < n_cases; ci++) {
        golden_case_t *c = &cases[ci];
        if (s_quick() && c->n_prompt > 128) {
            fprintf(stderr, "  %-22s skipped (PD_TEST_QUICK)\n", c->name);
            free(c->prompt), free(c->greedy), free(c->margins), free(c->extra_pos), free(c->logits);
            continue;
        }
        if (s_quick() && c->n_gen > 8) c->n_gen = 8;
        eng_kv_seq_t seq = {0};
        uint8_t *want = pd_xcalloc((size_t)c->n_prompt, 1);
        for (int i = 0; i < c->n_extra; i++) want[c->extra_pos[i]] = 1;
        want[c->n_prompt - 1] = 1;
        REQUIRE(c->n_extra < 7);
        CHECK_EQ_INT(s_run_seq(&seq, c->prompt, c->n_prompt, 0, c->n_prompt, want, logits), PD_OK);
        /* rows come back in position order; the golden file has the last position first */
        float worst = s_max_abs_diff(logits + (size_t)c->n_extra * s_vocab, c->logits, s_vocab);
        float worst_rel = pd_test_rel_l2(logits + (size_t)c->n_extra * s_vocab, c->logits, s_vocab);
        for (int i = 0; i < c->n_extra; i++) {
            float d = s_max_abs_diff(logits + (size_t)i * s_vocab, c->logits + (size_t)(1 + i) * s_vocab, s_vocab);
            float r = pd_test_rel_l2(logits + (size_t)i * s_vocab, c->logits + (size_t)(1 + i) * s_vocab, s_vocab);
            if (d > worst || d != d) worst = d;
            if (r > worst_rel || r != r) worst_rel = r;
        }
        if (s_is_cuda)
            CHECK_MSG(worst_rel <= CUDA_REL_TOL, "%s: |logit diff| / |logits| %g", c->name, worst_rel);
        else
            CHECK_MSG(worst <= LOGIT_ABS_TOL, "%s: max |logit diff| %g", c->name, worst);
        free(want);

        /* greedy continuation, one token per forward */
        float *last = logits;
        memcpy(last, logits + (size_t)c->n_extra * s_vocab, sizeof(float) * (size_t)s_vocab);
        int diverged = -1;
        for (int g = 0; g < c->n_gen; g++) {
            int32_t tok = s_argmax(last, s_vocab);
            if (tok != c->greedy[g]) {
                diverged = g;
                break;
            }
            if (g + 1 < c->n_gen) CHECK_EQ_INT(s_run_seq(&seq, &tok, 1, c->n_prompt + g, 1, NULL, last), PD_OK);
        }
        if (diverged >= 0)
            CHECK_MSG(c->margins[diverged] < (s_is_cuda ? CUDA_NEAR_TIE_MARGIN : NEAR_TIE_MARGIN),
                      "%s: greedy diverges at step %d (ref margin %g)", c->name, diverged, c->margins[diverged]);
        char where[64] = "";
        if (diverged >= 0)
            snprintf(where, sizeof where, " at step %d, ref margin %.3g", diverged, c->margins[diverged]);
        fprintf(stderr, "  %-22s prompt %4d  max|dlogit| %.2e  rel L2 %.2e  greedy %s (%d tokens)%s\n", c->name,
                c->n_prompt, worst, worst_rel, diverged < 0 ? "identical" : "diverged", c->n_gen, where);
        eng_kv_seq_release(&seq, eng_kv_pool(s_engine));
        eng_kv_seq_fini(&seq);
        free(c->prompt), free(c->greedy), free(c->margins), free(c->extra_pos), free(c->logits);
    }
    free(cases);
    free(logits);
    CHECK_EQ_INT(eng_kv_pool_n_free(eng_kv_pool(s_engine)), eng_kv_pool_n_blocks(eng_kv_pool(s_engine)));
}

/* Deterministic mixed-length prompts from a simple LCG over the vocabulary. */
static void s_make_prompt(int32_t *dst, int n, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        dst[i] = (int32_t)(seed >> 8) % (s_vocab - 100) + 50;
    }
}

#define N_SEQS  16
#define N_STEPS 6

static void test_batch_invariance(void) {
    static const int lens[N_SEQS] = {1, 5, 17, 33, 2, 64, 7, 16, 100, 3, 48, 9, 31, 15, 70, 12};
    int32_t *prompts[N_SEQS];
    /* reference: each sequence alone, prefilled in one piece; greedy N_STEPS tokens, logits kept */
    float *ref = pd_xmalloc(sizeof(float) * (size_t)s_vocab * N_SEQS * (N_STEPS + 1));
    int32_t ref_tok[N_SEQS][N_STEPS + 1];
    for (int s = 0; s < N_SEQS; s++) {
        prompts[s] = pd_xmalloc(sizeof(int32_t) * (size_t)lens[s]);
        s_make_prompt(prompts[s], lens[s], 1234u + (uint32_t)s);
        eng_kv_seq_t seq = {0};
        float *row = ref + (size_t)s * (N_STEPS + 1) * s_vocab;
        CHECK_EQ_INT(s_run_seq(&seq, prompts[s], lens[s], 0, lens[s], NULL, row), PD_OK);
        for (int g = 0; g < N_STEPS; g++) {
            ref_tok[s][g] = s_argmax(row + (size_t)g * s_vocab, s_vocab);
            CHECK_EQ_INT(s_run_seq(&seq, &ref_tok[s][g], 1, lens[s] + g, 1, NULL, row + (size_t)(g + 1) * s_vocab),
                         PD_OK);
        }
        eng_kv_seq_release(&seq, eng_kv_pool(s_engine));
        eng_kv_seq_fini(&seq);
    }

    /* all 16 together: prefill in chunks of 7 tokens per sequence per forward (sequences finishing
     * their prompt at different steps join decode while others still prefill), then batched decode */
    eng_kv_seq_t seqs[N_SEQS] = {{0}};
    int32_t done[N_SEQS] = {0}, n_gen[N_SEQS] = {0}, next_tok[N_SEQS];
    float *out = pd_xmalloc(sizeof(float) * (size_t)s_vocab * N_SEQS);
    int mismatches = 0;
    float worst_rel = 0;
    double sum_rel = 0;
    int n_rows = 0;
    for (int step = 0; step < 64; step++) {
        int32_t n_tok[N_SEQS], pos[N_SEQS], nb[N_SEQS], toks[N_SEQS * 7], idx[N_SEQS];
        const int32_t *tables[N_SEQS];
        int ns = 0, nt = 0;
        for (int s = 0; s < N_SEQS; s++) {
            if (n_gen[s] > N_STEPS) continue;
            int32_t n, p;
            const int32_t *src;
            if (done[s] < lens[s]) {
                n = lens[s] - done[s] < 7 ? lens[s] - done[s] : 7, p = done[s], src = prompts[s] + done[s];
            } else {
                n = 1, p = lens[s] + n_gen[s] - 1, src = &next_tok[s];
            }
            REQUIRE(eng_kv_seq_reserve(&seqs[s], eng_kv_pool(s_engine), eng_kv_layout(s_engine)->block_size, p + n) ==
                    PD_OK);
            memcpy(toks + nt, src, sizeof(int32_t) * (size_t)n);
            n_tok[ns] = n, pos[ns] = p, tables[ns] = seqs[s].blocks, nb[ns] = seqs[s].n_blocks, idx[ns] = s;
            nt += n, ns++;
        }
        if (ns == 0) break;
        eng_batch_t b = {.n_seqs = ns,
                         .n_tokens = n_tok,
                         .pos = pos,
                         .block_tables = tables,
                         .n_blocks = nb,
                         .tokens = toks,
                         .want_logits = NULL,
                         .logits = out};
        REQUIRE(eng_forward(s_engine, &b) == PD_OK);
        for (int i = 0; i < ns; i++) {
            int s = idx[i];
            const float *row = out + (size_t)i * s_vocab;
            if (done[s] < lens[s]) {
                done[s] += n_tok[i];
                if (done[s] < lens[s]) continue; /* mid-prompt chunk: its logits are not used */
            }
            const float *want = ref + ((size_t)s * (N_STEPS + 1) + (size_t)n_gen[s]) * s_vocab;
            if (s_is_cuda) {
                float r = pd_test_rel_l2(row, want, s_vocab);
                if (r > worst_rel) worst_rel = r;
                sum_rel += r, n_rows++;
                if (!(r <= CUDA_BATCH_REL_TOL)) mismatches++;
            } else if (memcmp(row, want, sizeof(float) * (size_t)s_vocab) != 0) {
                mismatches++;
            }
            next_tok[s] = s_argmax(row, s_vocab);
            if (n_gen[s] < N_STEPS) {
                /* CUDA: the batched argmax may differ only where the reference's top two are within the noise
                 * (as in the golden test); the sequence goes on with the reference's token either way, so its
                 * later rows stay comparable (on the CPU the two are equal, bit for bit) */
                const int32_t want_tok = ref_tok[s][n_gen[s]];
                if (next_tok[s] != want_tok && s_is_cuda) {
                    const float margin = s_top2_margin(want, s_vocab);
                    CHECK_MSG(margin < CUDA_NEAR_TIE_MARGIN,
                              "sequence %d step %d: batched argmax %d, alone %d at a reference margin of %g", s,
                              n_gen[s], next_tok[s], want_tok, margin);
                    fprintf(stderr, "  sequence %d step %d: argmax differs at a near tie (reference margin %.3g)\n", s,
                            n_gen[s], margin);
                } else {
                    CHECK_EQ_INT(next_tok[s], want_tok);
                }
                next_tok[s] = want_tok;
            }
            n_gen[s]++;
        }
    }
    CHECK_MSG(mismatches == 0, "%d logit rows differ between alone and batched+chunked", mismatches);
    if (s_is_cuda) {
        const double mean_rel = n_rows ? sum_rel / n_rows : 0;
        fprintf(stderr, "  batched+chunked vs alone: worst rel L2 %.2e, mean %.2e over %d rows\n", worst_rel, mean_rel,
                n_rows);
        CHECK(n_rows > 0 && mean_rel <= CUDA_BATCH_MEAN_REL_TOL);
    }
    for (int s = 0; s < N_SEQS; s++) {
        CHECK_EQ_INT(n_gen[s], N_STEPS + 1);
        eng_kv_seq_release(&seqs[s], eng_kv_pool(s_engine));
        eng_kv_seq_fini(&seqs[s]);
        free(prompts[s]);
    }
    CHECK_EQ_INT(eng_kv_pool_n_free(eng_kv_pool(s_engine)), eng_kv_pool_n_blocks(eng_kv_pool(s_engine)));
    free(out), free(ref);
}

/* A prompt prefilled in chunks, whose first chunks ask for no logits at all (the prefill worker's mid-prompt
 * steps): every forward succeeds and the last chunk's logits are the one-piece prefill's. */
static void test_chunks_without_logits(void) {
    int32_t prompt[40];
    s_make_prompt(prompt, 40, 99u);
    float *whole = pd_xmalloc(sizeof(float) * (size_t)s_vocab), *chunked = pd_xmalloc(sizeof(float) * (size_t)s_vocab);
    eng_kv_seq_t a = {0}, b = {0};
    CHECK_EQ_INT(s_run_seq(&a, prompt, 40, 0, 40, NULL, whole), PD_OK);
    CHECK_EQ_INT(s_run_seq(&b, prompt, 40, 0, 16, NULL, chunked), PD_OK); /* 16 + 16 (no logits) + 8 */
    if (s_is_cuda)
        CHECK(pd_test_rel_l2(chunked, whole, s_vocab) <= CUDA_BATCH_REL_TOL);
    else
        CHECK(memcmp(chunked, whole, sizeof(float) * (size_t)s_vocab) == 0);
    eng_kv_seq_release(&a, eng_kv_pool(s_engine)), eng_kv_seq_release(&b, eng_kv_pool(s_engine));
    eng_kv_seq_fini(&a), eng_kv_seq_fini(&b);
    free(whole), free(chunked);
}

/* eng_n_one_time counts forwards that paid a one-time cost: none on the CPU; on CUDA a shape run three times is first
 * seen (launched directly) and captured at most once each (earlier tests may have done either), then replayed: the
 * third run is never one. */
static void test_one_time(void) {
    int32_t prompt[20];
    s_make_prompt(prompt, 20, 7u);
    float *logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab);
    eng_kv_seq_t seq = {0};
    CHECK_EQ_INT(s_run_seq(&seq, prompt, 20, 0, 20, NULL, logits), PD_OK);
    uint64_t n[4];
    n[0] = eng_n_one_time(s_engine);
    for (int i = 1; i <= 3; i++) {
        CHECK_EQ_INT(s_run_seq(&seq, prompt + 5, 1, 20, 1, NULL, logits), PD_OK); /* the same step again */
        n[i] = eng_n_one_time(s_engine);
    }
    if (s_is_cuda) {
        CHECK_MSG(n[3] - n[0] <= 2 && n[3] == n[2], "one-time forwards %llu -> %llu, %llu, %llu",
                  (unsigned long long)n[0], (unsigned long long)n[1], (unsigned long long)n[2],
                  (unsigned long long)n[3]);
        for (int32_t shape = 0; shape < 2; shape++) { /* 7 and 5 new tokens: first seen, captured, replayed */
            const int32_t nt = shape ? 5 : 7, pos = shape ? 28 : 21;
            uint64_t m[4] = {eng_n_one_time(s_engine)};
            for (int i = 1; i <= 3; i++) {
                CHECK_EQ_INT(s_run_seq(&seq, prompt, nt, pos, nt, NULL, logits), PD_OK);
                m[i] = eng_n_one_time(s_engine);
            }
            CHECK_MSG(m[3] - m[0] <= 2 && m[3] == m[2], "%d tokens: one-time forwards %llu -> %llu, %llu, %llu", nt,
                      (unsigned long long)m[0], (unsigned long long)m[1], (unsigned long long)m[2],
                      (unsigned long long)m[3]);
        }
        CHECK(eng_n_one_time(s_engine) > 0);
    } else {
        CHECK_EQ_INT(n[3], 0);
    }
    eng_kv_seq_release(&seq, eng_kv_pool(s_engine));
    eng_kv_seq_fini(&seq);
    free(logits);
}

/* Sampling in the engine (eng_batch_t.sampling) on real model logits: one forward returns logits and samples for
 * 48 rows, each with its own parameters, penalty list and draw; every sample must be what the host's eng_row_sample
 * picks on the returned logits. On the CPU backend that is the same code; on CUDA it is the GPU kernel against the
 * host sampler, token for token (logprobs within 2e-6: the log-sum-exp is summed in another order). A second forward
 * without logits gives the same tokens; malformed requests are refused. */
#define SMP_SEQS 12
#define SMP_TOK  4
#define SMP_ROWS (SMP_SEQS * SMP_TOK)
static void test_sampling_rows(void) {
    static eng_pen_t pen[SMP_ROWS][24];
    eng_row_sampling_t rows[SMP_ROWS];
    eng_sample_result_t got[SMP_ROWS], again[SMP_ROWS];
    eng_kv_seq_t seqs[SMP_SEQS] = {0};
    int32_t tokens[SMP_ROWS], n_tok[SMP_SEQS], pos[SMP_SEQS], n_blocks[SMP_SEQS];
    const int32_t *tables[SMP_SEQS];
    uint8_t want[SMP_ROWS];
    s_make_prompt(tokens, SMP_ROWS, 7u);
    memset(want, 1, sizeof want);
    for (int i = 0; i < SMP_SEQS; i++) {
        REQUIRE(eng_kv_seq_reserve(&seqs[i], eng_kv_pool(s_engine), eng_kv_layout(s_engine)->block_size, SMP_TOK) ==
                PD_OK);
        n_tok[i] = SMP_TOK, pos[i] = 0, tables[i] = seqs[i].blocks, n_blocks[i] = seqs[i].n_blocks;
    }
    const float temps[] = {0.0f, 0.7f, 1.0f, 1.5f}, top_ps[] = {1.0f, 0.9f, 0.6f};
    const int32_t top_ks[] = {0, 1, 20, 200};
    for (int r = 0; r < SMP_ROWS; r++) {
        eng_sampling_t p = eng_sampling_default();
        p.temperature = temps[r % 4], p.top_k = top_ks[(r / 4) % 4], p.top_p = top_ps[(r / 2) % 3];
        p.min_p = r % 5 == 0 ? 0.02f : 0.0f, p.n_logprobs = r % 3 == 0 ? 8 : 0;
        p.repetition_penalty = r % 2 ? 1.3f : 1.0f, p.presence_penalty = r % 6 == 1 ? 0.4f : 0.0f;
        p.frequency_penalty = r % 7 == 3 ? 0.25f : 0.0f;
        rows[r] = (eng_row_sampling_t){.p = p, .u = (r + 0.5) / SMP_ROWS, .pen = pen[r], .n_pen = r % 2 ? 24 : 0};
        for (int i = 0; i < 24; i++) /* distinct (101 is prime to 2000), some the prompt's own tokens */
            pen[r][i] = (eng_pen_t){i < 4 ? tokens[(r + i) % SMP_ROWS] : (r * 37 + i * 101) % 2000, i % 4};
        for (int i = 4; i < 24; i++) /* keep the list distinct from the four prompt tokens */
            for (int j = 0; j < 4; j++)
                if (pen[r][i].token == pen[r][j].token) pen[r][i].token = 2000 + i;
    }
    float *logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab * SMP_ROWS);
    eng_batch_t b = {.n_seqs = SMP_SEQS,
                     .n_tokens = n_tok,
                     .pos = pos,
                     .block_tables = tables,
                     .n_blocks = n_blocks,
                     .tokens = tokens,
                     .want_logits = want,
                     .logits = logits,
                     .sampling = rows,
                     .samples = got};
    REQUIRE(eng_forward(s_engine, &b) == PD_OK);
    eng_row_sampler_t *rs = eng_row_sampler_create(s_vocab);
    REQUIRE(rs);
    int n_same = 0, n_sampled = 0;
    for (int r = 0; r < SMP_ROWS; r++) {
        eng_sample_result_t w;
        REQUIRE(eng_row_sample(rs, &rows[r], logits + (size_t)r * s_vocab, &w) == PD_OK);
        n_same += got[r].token == w.token;
        n_sampled += rows[r].p.temperature > 0.0f;
        CHECK_EQ_INT(got[r].token, w.token);
        CHECK(fabsf(got[r].logprob - w.logprob) <= 2e-6f);
        CHECK_EQ_INT(got[r].n_top, w.n_top);
        for (int i = 0; i < w.n_top && i < got[r].n_top; i++) {
            CHECK_EQ_INT(got[r].top[i].token, w.top[i].token);
            CHECK(fabsf(got[r].top[i].logprob - w.top[i].logprob) <= 2e-6f);
        }
    }
    fprintf(stderr, "     %d of %d rows (%d sampled, the rest greedy) sampled by the %s backend as by the host\n",
            n_same, SMP_ROWS, n_sampled, eng_backend_name(s_engine));
    b.logits = NULL, b.samples = again; /* samples only */
    REQUIRE(eng_forward(s_engine, &b) == PD_OK);
    for (int r = 0; r < SMP_ROWS; r++) CHECK_EQ_INT(again[r].token, got[r].token);
    /* one sequence fewer, three times: on CUDA a batch shape's first forward runs directly, its second is captured
     * as a graph that samples too, its third replays it; 44 rows fill a bucket of 48, the pad rows unsampled */
    b.n_seqs = SMP_SEQS - 1;
    for (int rep = 0; rep < 3; rep++) {
        memset(again, 0, sizeof again);
        REQUIRE(eng_forward(s_engine, &b) == PD_OK);
        for (int r = 0; r < SMP_ROWS - SMP_TOK; r++) {
            CHECK_EQ_INT(again[r].token, got[r].token);
            CHECK(fabsf(again[r].logprob - got[r].logprob) <= 2e-6f);
            CHECK_EQ_INT(again[r].n_top, got[r].n_top);
        }
    }
    b.n_seqs = SMP_SEQS;
    /* refused: nowhere to put the rows, a draw outside [0, 1), a penalty token twice or outside the vocabulary */
    b.samples = NULL;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b.samples = again, b.sampling = NULL;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b.sampling = rows;
    rows[5].u = 1.0;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    rows[5].u = 0.5, pen[5][7].token = pen[5][3].token;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    pen[5][7].token = s_vocab;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    pen[5][7].token = 2007; /* and a good batch still runs after the refusals (the marks were cleared) */
    for (int i = 0; i < 24; i++)
        for (int j = 0; j < i; j++) REQUIRE(pen[5][i].token != pen[5][j].token);
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_OK);
    eng_row_sampler_destroy(&rs);
    for (int i = 0; i < SMP_SEQS; i++) eng_kv_seq_release(&seqs[i], eng_kv_pool(s_engine)), eng_kv_seq_fini(&seqs[i]);
    free(logits);
}

static void test_bad_batches(void) {
    eng_kv_seq_t seq = {0};
    REQUIRE(eng_kv_seq_reserve(&seq, eng_kv_pool(s_engine), 16, 16) == PD_OK);
    float *logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab);
    int32_t tok = 100, n = 1, pos = 0, bad_tok = s_vocab, bad_pos = 16, zero = 0;
    const int32_t *table = seq.blocks;
    int32_t bad_block = 1 << 30;
    const int32_t *bad_table = &bad_block;
    eng_batch_t ok = {.n_seqs = 1,
                      .n_tokens = &n,
                      .pos = &pos,
                      .block_tables = &table,
                      .n_blocks = &seq.n_blocks,
                      .tokens = &tok,
                      .logits = logits};
    eng_batch_t b = ok;
    b.tokens = &bad_tok;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b = ok, b.pos = &bad_pos; /* needs a second block the table lacks */
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b = ok, b.n_tokens = &zero;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b = ok, b.block_tables = &bad_table;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    b = ok, b.n_seqs = 0;
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_EINVAL);
    CHECK_EQ_INT(eng_forward(s_engine, &ok), PD_OK);
    /* host-mirror syncs: no-ops on the CPU pool, refused by a CUDA engine made without a mirror (test_cuda_parity
     * checks one with a mirror); block ids are checked first either way */
    const pd_status sync_st = s_is_cuda ? PD_EINVAL : PD_OK;
    CHECK_EQ_INT(eng_kv_to_host(s_engine, seq.blocks, 0, 1), sync_st);
    CHECK_EQ_INT(eng_kv_from_host(s_engine, seq.blocks, seq.n_blocks), sync_st);
    CHECK_EQ_INT(eng_kv_from_host(s_engine, &bad_block, 1), PD_EINVAL);
    CHECK_EQ_INT(eng_kv_to_host(s_engine, seq.blocks, -1, 1), PD_EINVAL);
    eng_kv_seq_release(&seq, eng_kv_pool(s_engine));
    eng_kv_seq_fini(&seq);
    free(logits);
}

int main(void) {
    pd_log_init("test", PD_LOG_ERROR);
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.kv_mem_bytes = 160ull << 20;
    const char *backend = getenv("PD_TEST_BACKEND");
    s_is_cuda = backend && !strcmp(backend, "cuda");
    if (s_is_cuda) p.backend = ENG_BACKEND_CUDA;
    char err[512];
    s_engine = eng_create(&p, err, sizeof err);
    if (!s_engine) {
        fprintf(stderr, "cannot create engine: %s\n", err);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    s_vocab = eng_config(s_engine)->vocab_size;
    PD_TEST_RUN(test_bad_batches);
    PD_TEST_RUN(test_chunks_without_logits);
    PD_TEST_RUN(test_one_time);
    PD_TEST_RUN(test_sampling_rows);
    PD_TEST_RUN(test_batch_invariance);
    PD_TEST_RUN(test_golden_logits_and_greedy);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
