/* bench_engine_cuda.c: the CUDA backend against the GPU's own limits, measured in the same run.
 *   limits:  device-to-device copy bandwidth (bytes read + written), and a plain cuBLAS bf16 GEMM (8192^3).
 *   decode:  B sequences with a ctx-token prompt, then `new` steps of one token each, every row sampled (temperature
 *            0.7 unless --temperature says otherwise (0: greedy), top-p 0.9, as a service step does): "gpu" samples on the GPU (only tokens come back), "host"
 *            copies the logits rows out and samples them on the host (eng_row_sample, one thread: the decode service
 *            before GPU sampling); tok/s, step time, and the step as a fraction of the bandwidth limit:
 *            (weight bytes + KV bytes read) / step time / copy bandwidth.
 *   prefill: B prompts of len tokens in forwards of up to max_batch_tokens; tok/s and TFLOP/s over the GEMM
 *            peak, counting 2 x matrix parameters x tokens (the embedding table is a lookup; the output head
 *            is applied to one row per prompt) plus causal attention 2 x 2 x layers x q_dim x len^2 / 2.
 *            --kv-to-host: as a prefill worker does, the engine keeps a pinned host mirror of the KV pool and each
 *            forward's KV goes there (eng_batch_t.is_kv_to_host, then eng_kv_to_host per prompt), inside the time
 *            (ENG_CUDA_KV_STREAM=0: copied after the forward instead of layer by layer during it).
 *            --verify-tokens K: each decode step forwards K tokens per sequence, every one with a logits row and a
 *            sample (as a speculative verification of K - 1 drafts); positions still advance by one per step.
 * Input tokens are fixed, not the sampled ones: the step's cost does not depend on them.
 * Usage: engine_cuda --model PATH [--gpu N] [--ctx 512] [--new 128] [--decode-batches 1,8,32,64,128]
 *                    [--sampling gpu,host] [--temperature 0.7] [--prefill-len 4096] [--prefill-batches 1,8] [--max-batch-tokens 8192]
 *                    [--kv-to-host] [--verify-tokens 1] */
#define _POSIX_C_SOURCE 200809L
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng.h"
#include "eng_quant.h"
#include "pd_log.h"

typedef struct {
    const char *model;
    int gpu, ctx, n_new, prefill_len, max_batch_tokens;
    int verify_tokens; /* tokens per sequence per decode step, every one sampled (speculative verification); 1 */
    int decode_b[16], n_decode_b, prefill_b[8], n_prefill_b;
    bool is_gpu_sampling, is_host_sampling, is_kv_to_host;
    float temperature; /* of every decode row (0: greedy); top-p 0.9 */
} opts_t;

static int s_parse_list(const char *s, int *out, int cap) {
    int n = 0;
    while (*s && n < cap) { /* "0" or "none": an empty list */
        if (atoi(s) > 0) out[n++] = atoi(s);
        const char *c = strchr(s, ',');
        if (!c) break;
        s = c + 1;
    }
    return n;
}

#define S_CK(call)                                                      \
    do {                                                                \
        cudaError_t e_ = (call);                                        \
        if (e_ != cudaSuccess) {                                        \
            fprintf(stderr, "%s: %s\n", #call, cudaGetErrorString(e_)); \
            exit(1);                                                    \
        }                                                               \
    } while (0)

/* The median of 9 timings (sorts them). */
static float s_median9(float ms[9]) {
    for (int i = 1; i < 9; i++)
        for (int j = i; j > 0 && ms[j] < ms[j - 1]; j--) {
            float t = ms[j];
            ms[j] = ms[j - 1], ms[j - 1] = t;
        }
    return ms[4];
}

/* Bytes read + written per second by a device-to-device copy of 1 GiB, median of 9. */
static double s_copy_bw(void) {
    const size_t n = (size_t)1 << 30;
    void *a, *b;
    S_CK(cudaMalloc(&a, n));
    S_CK(cudaMalloc(&b, n));
    S_CK(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float ms[9];
    for (int r = -1; r < 9; r++) {
        cudaEventRecord(e0, 0);
        S_CK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        if (r >= 0) cudaEventElapsedTime(&ms[r], e0, e1);
    }
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    cudaFree(a), cudaFree(b);
    return 2.0 * (double)n / (s_median9(ms) * 1e-3);
}

/* FLOP/s of a bf16 GEMM 8192^3 (f32 accumulate, bf16 out) on random data, median of 9. */
static double s_gemm_peak(void) {
    const int n = 8192;
    const size_t elems = (size_t)n * n;
    uint16_t *h = malloc(elems * 2);
    uint32_t x = 12345;
    for (size_t i = 0; i < elems; i++) {
        x = x * 1664525u + 1013904223u;
        h[i] = eng_f32_to_bf16((float)(x >> 8) / 16777216.0f - 0.5f);
    }
    void *a, *b, *c;
    S_CK(cudaMalloc(&a, elems * 2));
    S_CK(cudaMalloc(&b, elems * 2));
    S_CK(cudaMalloc(&c, elems * 2));
    S_CK(cudaMemcpy(a, h, elems * 2, cudaMemcpyHostToDevice));
    S_CK(cudaMemcpy(b, h, elems * 2, cudaMemcpyHostToDevice));
    free(h);
    cublasHandle_t blas;
    cublasCreate(&blas);
    const float alpha = 1.0f, beta = 0.0f;
    cudaEvent_t e0, e1;
    cudaEventCreate(&e0), cudaEventCreate(&e1);
    float ms[9];
    for (int r = -2; r < 9; r++) {
        cudaEventRecord(e0, 0);
        cublasStatus_t st =
            cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF, n, b, CUDA_R_16BF, n, &beta,
                         c, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
        cudaEventRecord(e1, 0);
        cudaEventSynchronize(e1);
        if (st != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "cublasGemmEx: %d\n", (int)st);
            exit(1);
        }
        if (r >= 0) cudaEventElapsedTime(&ms[r], e0, e1);
    }
    cudaEventDestroy(e0), cudaEventDestroy(e1);
    cublasDestroy(blas);
    cudaFree(a), cudaFree(b), cudaFree(c);
    return 2.0 * n * (double)n * n / (s_median9(ms) * 1e-3);
}

typedef struct {
    eng_t *e;
    int32_t vocab;
    eng_kv_seq_t *seqs;
    float *logits;
    /* decode steps: one sampling request and result per row; host: the logits come out and are sampled here */
    eng_row_sampling_t *rows;
    eng_sample_result_t *samples;
    eng_row_sampler_t *host;
    bool is_decode_on_host, is_decode_on_gpu;
    bool is_kv_to_host;      /* each forward's KV to the host mirror (--kv-to-host) */
    const uint8_t *want_all; /* verification steps: every token a logits row (NULL: each sequence's last) */
} run_t;

/* One eng_forward of m sequences of sequences seqs[0..m) (n_tokens[i] tokens at pos[i], tokens in order), logits
 * of each last token into r->logits; exits on failure. */
static void s_forward(run_t *r, const eng_kv_seq_t *seqs, int m, const int32_t *n_tokens, const int32_t *pos,
                      const int32_t *tokens, const char *what) {
    int32_t nb[256];
    const int32_t *tables[256];
    for (int i = 0; i < m; i++) tables[i] = seqs[i].blocks, nb[i] = seqs[i].n_blocks;
    eng_batch_t b = {.n_seqs = m,
                     .n_tokens = n_tokens,
                     .pos = pos,
                     .block_tables = tables,
                     .n_blocks = nb,
                     .tokens = tokens,
                     .want_logits = r->want_all,
                     .logits = r->logits};
    if (r->is_decode_on_gpu) b.logits = NULL, b.sampling = r->rows, b.samples = r->samples;
    b.is_kv_to_host = r->is_kv_to_host;
    if (eng_forward(r->e, &b) != PD_OK) {
        fprintf(stderr, "%s forward failed\n", what);
        exit(1);
    }
    for (int i = 0; r->is_kv_to_host && i < m; i++)
        if (eng_kv_to_host(r->e, seqs[i].blocks, pos[i], n_tokens[i]) != PD_OK) {
            fprintf(stderr, "%s: KV of sequence %d not copied to the host\n", what, i);
            exit(1);
        }
    for (int i = 0, n_rows = eng_batch_n_logits(&b); r->is_decode_on_host && i < n_rows; i++)
        if (eng_row_sample(r->host, &r->rows[i], r->logits + (size_t)i * r->vocab, &r->samples[i]) != PD_OK) {
            fprintf(stderr, "%s: row %d not sampled\n", what, i);
            exit(1);
        }
}

/* Forwards the prompts [pos0, pos0 + len) of sequences s0..s0+n in batches of up to max_tokens tokens; returns
 * seconds. */
static double s_prefill(run_t *r, int s0, int n, int len, int max_tokens) {
    int per = max_tokens / len > 0 ? max_tokens / len : 1, chunk = len < max_tokens ? len : max_tokens;
    int32_t *toks = malloc(sizeof(int32_t) * (size_t)max_tokens), nt[256], pos[256];
    uint64_t t0 = pd_now_us();
    for (int a = 0; a < n; a += per) {
        int m = n - a < per ? n - a : per;
        for (int done = 0; done < len; done += chunk) {
            int c = len - done < chunk ? len - done : chunk;
            for (int i = 0; i < m; i++) {
                for (int k = 0; k < c; k++)
                    toks[i * c + k] = (int32_t)((done + k) * 7919 + (s0 + a + i) * 31) % r->vocab;
                nt[i] = c, pos[i] = done;
            }
            s_forward(r, r->seqs + s0 + a, m, nt, pos, toks, "prefill");
        }
    }
    free(toks);
    return (double)(pd_now_us() - t0) / 1e6;
}

int main(int argc, char **argv) {
    opts_t o = {.gpu = 0,
                .ctx = 512,
                .n_new = 128,
                .prefill_len = 4096,
                .max_batch_tokens = 8192,
                .verify_tokens = 1,
                .is_gpu_sampling = true,
                .is_host_sampling = true,
                .temperature = 0.7f};
    o.n_decode_b = s_parse_list("1,8,32,64,128", o.decode_b, 16);
    o.n_prefill_b = s_parse_list("1,8", o.prefill_b, 8);
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : "";
        if (!strcmp(f, "--kv-to-host")) { /* the one flag without a value */
            o.is_kv_to_host = true;
            continue;
        }
        i++;
        if (!strcmp(f, "--model"))
            o.model = v;
        else if (!strcmp(f, "--gpu"))
            o.gpu = atoi(v);
        else if (!strcmp(f, "--ctx"))
            o.ctx = atoi(v);
        else if (!strcmp(f, "--new"))
            o.n_new = atoi(v);
        else if (!strcmp(f, "--prefill-len"))
            o.prefill_len = atoi(v);
        else if (!strcmp(f, "--max-batch-tokens"))
            o.max_batch_tokens = atoi(v);
        else if (!strcmp(f, "--decode-batches"))
            o.n_decode_b = s_parse_list(v, o.decode_b, 16);
        else if (!strcmp(f, "--prefill-batches"))
            o.n_prefill_b = s_parse_list(v, o.prefill_b, 8);
        else if (!strcmp(f, "--verify-tokens"))
            o.verify_tokens = atoi(v);
        else if (!strcmp(f, "--temperature"))
            o.temperature = (float)atof(v);
        else if (!strcmp(f, "--sampling"))
            o.is_gpu_sampling = strstr(v, "gpu") != NULL, o.is_host_sampling = strstr(v, "host") != NULL;
        else {
            fprintf(stderr, "unknown flag %s\n", f);
            return 2;
        }
    }
    if (!o.model) {
        fprintf(stderr, "usage: engine_cuda --model PATH [options]\n");
        return 2;
    }
    pd_log_init("bench", PD_LOG_WARN);
    S_CK(cudaSetDevice(o.gpu));
    struct cudaDeviceProp prop;
    cudaGetDeviceProperties(&prop, o.gpu);
    int driver = 0;
    cudaDriverGetVersion(&driver);
    double bw = s_copy_bw(), peak = s_gemm_peak();
    printf("gpu %s, driver API %d; copy %.0f GB/s (read+write); bf16 GEMM 8192^3 %.0f TFLOP/s\n", prop.name, driver,
           bw / 1e9, peak / 1e12);

    int max_b = 1, max_pb = 1;
    for (int i = 0; i < o.n_decode_b; i++) max_b = o.decode_b[i] > max_b ? o.decode_b[i] : max_b;
    for (int i = 0; i < o.n_prefill_b; i++) max_pb = o.prefill_b[i] > max_pb ? o.prefill_b[i] : max_pb;
    eng_params_t p = eng_params_default();
    p.model_path = o.model, p.backend = ENG_BACKEND_CUDA, p.gpu = o.gpu;
    p.max_batch_tokens = o.max_batch_tokens, p.max_batch_seqs = 256, p.kv_host_mirror = o.is_kv_to_host;
    /* KV for the largest decode batch or prefill batch, whichever needs more */
    uint64_t kv_tokens = (uint64_t)max_b * (uint64_t)(o.ctx + o.n_new + 16);
    if ((uint64_t)max_pb * (uint64_t)(o.prefill_len + 16) > kv_tokens)
        kv_tokens = (uint64_t)max_pb * (uint64_t)(o.prefill_len + 16);
    char err[512];
    uint64_t t_load = pd_now_us();
    /* KV bytes per token from the model file alone (the CUDA pool is f16), to size the pool before the engine */
    eng_model_t *mf = eng_model_load(o.model, err, sizeof err);
    if (!mf) {
        fprintf(stderr, "%s: %s\n", o.model, err);
        return 1;
    }
    const eng_kv_layout_t f16_kv = {.n_layers = mf->cfg.n_layers,
                                    .n_kv_heads = mf->cfg.n_kv_heads,
                                    .head_dim = mf->cfg.head_dim,
                                    .block_size = p.kv_block_size,
                                    .dtype = ENG_KV_F16};
    const size_t kv_token_bytes = eng_kv_token_bytes(&f16_kv);
    eng_model_destroy(&mf);
    p.kv_n_blocks = (int32_t)((kv_tokens + (uint64_t)p.kv_block_size - 1) / (uint64_t)p.kv_block_size + 2 * max_b);
    eng_t *e = eng_create(&p, err, sizeof err);
    if (!e) {
        fprintf(stderr, "eng_create: %s\n", err);
        return 1;
    }
    if (eng_kv_token_bytes(eng_kv_layout(e)) != kv_token_bytes) {
        fprintf(stderr, "engine KV layout differs from the f16 one this bench sized the pool for\n");
        return 1;
    }
    const eng_model_config_t *c = eng_config(e);
    const uint64_t w_bytes = eng_model_step_weight_bytes(eng_model(e));
    const double q_dim = (double)c->n_heads * c->head_dim, kv_dim = (double)c->n_kv_heads * c->head_dim;
    const double mat_params =
        (double)c->n_layers * ((double)c->dim * (q_dim + 2 * kv_dim) + q_dim * c->dim + 3.0 * c->dim * c->hidden_dim);
    printf("model %s: %d layers, dim %d, %d/%d heads x %d, ffn %d, vocab %d; %.2f GB read per decode step "
           "(weights but the embedding table); KV %zu B/token; loaded in %.1f s\n",
           o.model, c->n_layers, c->dim, c->n_heads, c->n_kv_heads, c->head_dim, c->hidden_dim, c->vocab_size,
           (double)w_bytes / 1e9, kv_token_bytes, (double)(pd_now_us() - t_load) / 1e6);

    run_t r = {.e = e, .vocab = c->vocab_size};
    r.seqs = calloc(256, sizeof(eng_kv_seq_t));
    r.logits = malloc(sizeof(float) * (size_t)c->vocab_size * 256);
    r.rows = calloc(256, sizeof *r.rows), r.samples = calloc(256, sizeof *r.samples);
    r.host = eng_row_sampler_create(c->vocab_size);
    for (int i = 0; i < 256; i++) {
        r.rows[i].p = eng_sampling_default();
        r.rows[i].p.temperature = o.temperature, r.rows[i].p.top_p = 0.9f, r.rows[i].u = (i + 0.5) / 256.0;
    }
    eng_kv_pool_t *pool = eng_kv_pool(e);

    printf("\n%-8s %6s %10s %10s %12s %10s %9s\n", "decode", "batch", "tok/s", "step ms", "GB/step", "of copy bw",
           "sampling");
    for (int run = 0; run < o.n_decode_b * 2; run++) {
        const int B = o.decode_b[run / 2], K = o.verify_tokens;
        const bool is_gpu = run % 2 == 0;
        if ((is_gpu && !o.is_gpu_sampling) || (!is_gpu && !o.is_host_sampling)) continue;
        if (B * K > 256) {
            fprintf(stderr, "batch %d x %d verified tokens: more than 256 rows\n", B, K);
            continue;
        }
        r.is_decode_on_gpu = r.is_decode_on_host = false; /* the prompts: logits only */
        for (int s = 0; s < B; s++)
            if (eng_kv_seq_reserve(&r.seqs[s], pool, p.kv_block_size, o.ctx + o.n_new + 2 + K) != PD_OK) {
                fprintf(stderr, "KV pool too small for batch %d\n", B);
                return 1;
            }
        (void)s_prefill(&r, 0, B, o.ctx, o.max_batch_tokens);
        r.is_decode_on_gpu = is_gpu, r.is_decode_on_host = !is_gpu;
        static uint8_t want_all[256];
        memset(want_all, 1, sizeof want_all);
        r.want_all = K > 1 ? want_all : NULL;
        int32_t nt[256], pos[256], toks[256];
        for (int s = 0; s < B; s++) nt[s] = K;
        uint64_t t0 = 0;
        for (int step = -2; step < o.n_new; step++) { /* two warm-up steps */
            if (step == 0) t0 = pd_now_us();
            for (int s = 0; s < B; s++) {
                pos[s] = o.ctx + 2 + step;
                for (int k = 0; k < K; k++) toks[s * K + k] = (step * 131 + s * 17 + k * 7 + 1000) % r.vocab;
            }
            s_forward(&r, r.seqs, B, nt, pos, toks, "decode");
        }
        r.want_all = NULL;
        const double step_s = (double)(pd_now_us() - t0) / 1e6 / o.n_new;
        /* KV read per step: every sequence's context, mid-run */
        const double kv_read = (double)B * (o.ctx + 2 + o.n_new / 2) * (double)kv_token_bytes;
        const double bytes = (double)w_bytes + kv_read;
        printf("%-8s %6d %10.1f %10.3f %12.3f %9.1f%% %9s", "decode", B, B / step_s, step_s * 1e3, bytes / 1e9,
               100.0 * bytes / step_s / bw, r.is_decode_on_gpu ? "gpu" : "host");
        if (K > 1) printf(" (steps of %d tokens per sequence, all sampled: tok/s counts steps x batch)", K);
        printf("\n");
        for (int s = 0; s < B; s++) eng_kv_seq_release(&r.seqs[s], pool);
    }
    r.is_decode_on_gpu = r.is_decode_on_host = false;

    r.is_kv_to_host = o.is_kv_to_host; /* prefill only: decode steps leave their KV on the GPU */
    if (o.is_kv_to_host) {
        const char *stream = getenv("ENG_CUDA_KV_STREAM");
        printf("\nprefill times include each forward's KV to the host mirror, %s\n",
               stream && *stream == '0' ? "copied after the forward" : "streamed layer by layer");
    }
    printf("\n%-8s %6s %10s %10s %12s %12s %12s\n", "prefill", "batch", "tok/s", "ms", "TFLOP/s", "of peak",
           "matmul only");
    for (int bi = 0; bi < o.n_prefill_b; bi++) {
        const int B = o.prefill_b[bi];
        for (int s = 0; s < B; s++)
            if (eng_kv_seq_reserve(&r.seqs[s], pool, p.kv_block_size, o.prefill_len) != PD_OK) {
                fprintf(stderr, "KV pool too small for prefill batch %d\n", B);
                return 1;
            }
        (void)s_prefill(&r, 0, B < 2 ? B : 2, o.prefill_len < 512 ? o.prefill_len : 512, o.max_batch_tokens);
        double best = 1e30;
        for (int rep = 0; rep < 3; rep++) {
            double t = s_prefill(&r, 0, B, o.prefill_len, o.max_batch_tokens);
            if (t < best) best = t;
        }
        const double tokens = (double)B * o.prefill_len;
        const double mm = 2.0 * mat_params * tokens + 2.0 * (double)c->vocab_size * c->dim * B;
        const double attn = 2.0 * 2.0 * c->n_layers * q_dim * (double)o.prefill_len * o.prefill_len / 2.0 * B;
        printf("%-8s %6d %10.0f %10.1f %12.1f %11.1f%% %11.1f%%\n", "prefill", B, tokens / best, best * 1e3,
               (mm + attn) / best / 1e12, 100.0 * (mm + attn) / best / peak, 100.0 * mm / best / peak);
        for (int s = 0; s < B; s++) eng_kv_seq_release(&r.seqs[s], pool);
    }
    for (int s = 0; s < 256; s++) eng_kv_seq_fini(&r.seqs[s]);
    r.is_decode_on_gpu = r.is_decode_on_host = false;
    free(r.seqs), free(r.logits), free(r.rows), free(r.samples);
    eng_row_sampler_destroy(&r.host);
    eng_destroy(&e);
    return 0;
}
