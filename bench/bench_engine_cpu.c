/* bench_engine_cpu.c: CPU engine throughput for the default model, each figure next to the limit it
 * is bound by, measured in the same run:
 *   - decode (batch 1, 8, 32): bytes read per step (weights in stored types + KV) / step time, as a
 *     fraction of this machine's memory bandwidth (a multi-threaded memcpy; read+written bytes), and
 *     FLOP/s as a fraction of sgemm (the bound once a batch shares the weight reads);
 *   - prefill (512-token prompts): FLOP/s as a fraction of OpenBLAS sgemm on this machine;
 *   - speculative verification: one sequence's step with 2, 4, 6, 8 tokens next to a 1-token step.
 * Usage: engine_cpu [--model PATH] [--threads N] [--steps N]. Prints one summary line per config. */
#include <cblas.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "pd_log.h"

static double s_now(void) {
    return (double)pd_now_us() / 1e6;
}

/* Copy bandwidth: best of 5 passes of a 512 MiB memcpy split over all threads, counting bytes read
 * plus bytes written. */
static double s_copy_bandwidth(void) {
    size_t n = 512ull << 20;
    char *a = pd_xmalloc(n), *b = pd_xmalloc(n);
    memset(a, 1, n), memset(b, 2, n);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        double t0 = s_now();
#pragma omp parallel
        {
            int nt = omp_get_num_threads(), id = omp_get_thread_num();
            size_t chunk = n / (size_t)nt;
            memcpy(b + chunk * (size_t)id, a + chunk * (size_t)id, chunk);
        }
        double bw = 2.0 * (double)n / (s_now() - t0);
        if (bw > best) best = bw;
    }
    free(a), free(b);
    return best;
}

/* sgemm rate on shapes like the model's (M tokens x K=576 x N=1536). */
static double s_sgemm_flops(void) {
    int m = 512, k = 576, n = 1536;
    float *A = pd_xmalloc(sizeof(float) * (size_t)m * k), *B = pd_xmalloc(sizeof(float) * (size_t)k * n),
          *C = pd_xmalloc(sizeof(float) * (size_t)m * n);
    for (size_t i = 0; i < (size_t)m * k; i++) A[i] = (float)(i % 7) * 0.01f;
    for (size_t i = 0; i < (size_t)k * n; i++) B[i] = (float)(i % 5) * 0.01f;
    double best = 0;
    for (int rep = 0; rep < 20; rep++) {
        double t0 = s_now();
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, A, k, B, k, 0.0f, C, n);
        double r = 2.0 * m * n * k / (s_now() - t0);
        if (r > best) best = r;
    }
    free(A), free(B), free(C);
    return best;
}

typedef struct {
    eng_t *e;
    int32_t vocab;
    float *logits;
} bench_t;

/* Prefills n_seqs prompts of len tokens in one forward each call; returns seconds of the best of reps. */
static double s_prefill(bench_t *bn, int n_seqs, int len, int reps) {
    eng_kv_seq_t seqs[64] = {{0}};
    int32_t *toks = pd_xmalloc(sizeof(int32_t) * (size_t)n_seqs * len);
    for (int i = 0; i < n_seqs * len; i++) toks[i] = 100 + (i * 7919) % 40000;
    int32_t n_tok[64], pos[64], nb[64];
    const int32_t *tables[64];
    double best = 1e30;
    for (int r = 0; r < reps; r++) {
        for (int s = 0; s < n_seqs; s++) {
            if (eng_kv_seq_reserve(&seqs[s], eng_kv_pool(bn->e), eng_kv_layout(bn->e)->block_size, len) != PD_OK)
                PD_FATAL("KV pool too small");
            n_tok[s] = len, pos[s] = 0, tables[s] = seqs[s].blocks, nb[s] = seqs[s].n_blocks;
        }
        eng_batch_t b = {.n_seqs = n_seqs,
                         .n_tokens = n_tok,
                         .pos = pos,
                         .block_tables = tables,
                         .n_blocks = nb,
                         .tokens = toks,
                         .logits = bn->logits};
        double t0 = s_now();
        if (eng_forward(bn->e, &b) != PD_OK) PD_FATAL("forward failed");
        double dt = s_now() - t0;
        if (dt < best) best = dt;
        for (int s = 0; s < n_seqs; s++) eng_kv_seq_release(&seqs[s], eng_kv_pool(bn->e));
    }
    for (int s = 0; s < n_seqs; s++) eng_kv_seq_fini(&seqs[s]);
    free(toks);
    return best;
}

/* Decode: n_seqs sequences with ctx tokens of context each, steps batched decode steps of t_per tokens per
 * sequence (1, or 1 + drafts: a speculative verification row, logits for every token); returns the median step
 * time. */
static double s_decode(bench_t *bn, int n_seqs, int ctx, int steps, int t_per) {
    eng_kv_seq_t seqs[64] = {{0}};
    int32_t n_tok[64], pos[64], nb[64], toks[64];
    uint8_t want[64];
    memset(want, 1, sizeof want);
    PD_ASSERT(n_seqs * t_per <= 64);
    const int32_t *tables[64];
    double *dts = pd_xmalloc(sizeof(double) * (size_t)steps);
    /* real context: prefill ctx tokens per sequence (so attention reads written KV, not zeros) */
    int32_t *ctx_toks = pd_xmalloc(sizeof(int32_t) * (size_t)ctx);
    for (int s = 0; s < n_seqs; s++) {
        if (eng_kv_seq_reserve(&seqs[s], eng_kv_pool(bn->e), eng_kv_layout(bn->e)->block_size, ctx + steps * t_per) !=
            PD_OK)
            PD_FATAL("KV pool too small");
        for (int i = 0; i < ctx; i++) ctx_toks[i] = 100 + (s * 131 + i * 7919) % 40000;
        int32_t n = ctx, p0 = 0;
        const int32_t *table = seqs[s].blocks;
        eng_batch_t b = {.n_seqs = 1,
                         .n_tokens = &n,
                         .pos = &p0,
                         .block_tables = &table,
                         .n_blocks = &seqs[s].n_blocks,
                         .tokens = ctx_toks,
                         .logits = bn->logits};
        if (eng_forward(bn->e, &b) != PD_OK) PD_FATAL("forward failed");
    }
    free(ctx_toks);
    for (int i = 0; i < steps; i++) {
        for (int s = 0; s < n_seqs; s++) {
            n_tok[s] = t_per, pos[s] = ctx + i * t_per, tables[s] = seqs[s].blocks, nb[s] = seqs[s].n_blocks;
            for (int t = 0; t < t_per; t++) toks[s * t_per + t] = 200 + s + i + t;
        }
        eng_batch_t b = {.n_seqs = n_seqs,
                         .n_tokens = n_tok,
                         .pos = pos,
                         .block_tables = tables,
                         .n_blocks = nb,
                         .tokens = toks,
                         .want_logits = t_per > 1 ? want : NULL,
                         .logits = bn->logits};
        double t0 = s_now();
        if (eng_forward(bn->e, &b) != PD_OK) PD_FATAL("forward failed");
        dts[i] = s_now() - t0;
    }
    for (int s = 0; s < n_seqs; s++) eng_kv_seq_release(&seqs[s], eng_kv_pool(bn->e)), eng_kv_seq_fini(&seqs[s]);
    /* median */
    for (int i = 1; i < steps; i++)
        for (int j = i; j > 0 && dts[j] < dts[j - 1]; j--) {
            double t = dts[j];
            dts[j] = dts[j - 1], dts[j - 1] = t;
        }
    double med = dts[steps / 2];
    free(dts);
    return med;
}

int main(int argc, char **argv) {
    pd_log_init("bench", PD_LOG_WARN);
    const char *model = NULL;
    int threads = 0, steps = 24;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            model = argv[i + 1];
        else if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--steps"))
            steps = atoi(argv[i + 1]);
    }
    static char def[4096];
    if (!model) {
        const char *home = getenv("HOME"), *dir = getenv("PDSERVE_MODELS");
        if (dir)
            snprintf(def, sizeof def, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
        else
            snprintf(def, sizeof def, "%s/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf", home);
        model = def;
    }
    eng_params_t p = eng_params_default();
    p.model_path = model;
    p.n_threads = threads;
    p.kv_mem_bytes = 1ull << 30;
    p.max_batch_seqs = 64;
    char err[512];
    bench_t bn = {0};
    bn.e = eng_create(&p, err, sizeof err);
    if (!bn.e) {
        fprintf(stderr, "engine_cpu: %s\n", err);
        return 1;
    }
    const eng_model_config_t *c = eng_config(bn.e);
    bn.vocab = c->vocab_size;
    bn.logits = pd_xmalloc(sizeof(float) * (size_t)bn.vocab * 64);
    int nth = threads > 0 ? threads : omp_get_num_procs();
    omp_set_num_threads(nth);
    openblas_set_num_threads(nth);

    double bw = s_copy_bandwidth();
    double peak = s_sgemm_flops();
    uint64_t wbytes = eng_model_step_weight_bytes(eng_model(bn.e));
    double params = 0; /* multiply-adds per token in the matrices (embedding lookup excluded) */
    params += (double)c->n_layers * ((double)c->dim * c->n_heads * c->head_dim * 2 +
                                     (double)c->dim * c->n_kv_heads * c->head_dim * 2 + 3.0 * c->dim * c->hidden_dim);
    params += (double)c->dim * c->vocab_size;
    printf("machine: %d threads, copy bandwidth %.2f GB/s (read+write), OpenBLAS sgemm %.1f GFLOP/s; model %s, "
           "step weight bytes %.1f MB\n",
           nth, bw / 1e9, peak / 1e9, c->name, (double)wbytes / 1e6);

    /* prefill: 512-token prompts; logits only for the last token of each (as a server does) */
    int pf_batches[] = {1, 2};
    for (size_t i = 0; i < sizeof pf_batches / sizeof *pf_batches; i++) {
        int nb = pf_batches[i], len = 512;
        double dt = s_prefill(&bn, nb, len, 3);
        double n_tok = (double)nb * len;
        /* matrix FLOPs (the head only for the last token) + attention (QK and PV over the causal half) */
        double flops = 2.0 * (params - (double)c->dim * c->vocab_size) * n_tok + 2.0 * c->dim * c->vocab_size * nb +
                       nb * 2.0 * 2.0 * c->n_layers * c->n_heads * c->head_dim * (double)len * len / 2;
        printf("prefill batch=%d len=%d: %.0f tok/s, %.1f GFLOP/s = %.0f%% of sgemm peak\n", nb, len, n_tok / dt,
               flops / dt / 1e9, 100.0 * flops / dt / peak);
    }
    /* decode at 3 batch sizes, 128 tokens of context per sequence */
    int dec_batches[] = {1, 8, 32};
    int ctx = 128;
    for (size_t i = 0; i < sizeof dec_batches / sizeof *dec_batches; i++) {
        int nb = dec_batches[i];
        double dt = s_decode(&bn, nb, ctx, steps, 1);
        double kv_bytes = (double)nb * (ctx + steps / 2) * eng_kv_token_bytes(eng_kv_layout(bn.e));
        double bytes = (double)wbytes + kv_bytes;
        /* compute side, for the batches where weight reads are shared: matrices + attention over the context */
        double flops = nb * (2.0 * params + 2.0 * 2.0 * c->n_layers * c->n_heads * c->head_dim * (ctx + steps / 2.0));
        printf("decode batch=%d ctx=%d: %.1f tok/s, step %.2f ms, reads %.1f MB/step (weights %.1f + KV %.1f) = "
               "%.2f GB/s = %.0f%% of copy bandwidth; %.1f GFLOP/s = %.0f%% of sgemm peak\n",
               nb, ctx, nb / dt, dt * 1e3, bytes / 1e6, (double)wbytes / 1e6, kv_bytes / 1e6, bytes / dt / 1e9,
               100.0 * bytes / dt / bw, flops / dt / 1e9, 100.0 * flops / dt / peak);
    }
    /* speculative verification: one sequence, its next token plus 1..7 drafts in one forward. What a verified
     * token costs next to a plain decode step decides whether drafting pays (decode/dc_spec.h) */
    double t1 = s_decode(&bn, 1, 512, steps, 1);
    printf("verify ctx=512: 1 token %.2f ms", t1 * 1e3);
    for (int t_per = 2; t_per <= 8; t_per += 2) {
        double dt = s_decode(&bn, 1, 512, steps, t_per);
        printf("; %d tokens %.2f ms (%.2fx)", t_per, dt * 1e3, dt / t1);
    }
    printf("\n");
    free(bn.logits);
    eng_destroy(&bn.e);
    return 0;
}
