/* bench_gemm_lt.c: the engine's GEMM call (cublasGemmEx, CUBLAS_GEMM_DEFAULT) against every algorithm cuBLASLt's
 * heuristic offers for the same product, on the shapes a Llama forward runs: y (m tokens, n) [+]= x (m, k) . w (n, k)^T,
 * bf16 operands, f32 compute, y f32 or bf16 as the engine writes it (beta 1 where it adds to the residual). Decides
 * whether timing the algorithms at startup would pay (issue 6); measures, judges nothing.
 *   gemm_lt [--shape 8b|1b] [--tokens 16,32,64,128,4096] [--algos 16] [--reps 30]
 * Per product: the default's time, the best Lt algorithm's time and index among those offered, and their weight
 * bandwidth (decode sizes) or TFLOP/s (prefill sizes). */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_MAX_ALGOS 32
#define S_WS_BYTES  (64u << 20)

#define S_CHECK(x)                                                         \
    do {                                                                   \
        if (!(x)) {                                                        \
            fprintf(stderr, "%s:%d: %s failed\n", __FILE__, __LINE__, #x); \
            exit(1);                                                       \
        }                                                                  \
    } while (0)

typedef struct {
    const char *name;
    int64_t n, k;
    bool is_accumulate;   /* beta 1: O and down add to the residual */
    bool is_prefill_bf16; /* prefill-sized batches write bf16 (Q/K/V, gate/up: S_GU_BF16_MIN_TOK) */
    bool is_decode_only;  /* the output head: one row per sequence, never a prompt's every token */
} s_prod_t;

static const s_prod_t s_8b[] = {
    {"qkv", 6144, 4096, false, true, false},      {"o", 4096, 4096, true, false, false},
    {"gate_up", 28672, 4096, false, true, false}, {"down", 4096, 14336, true, false, false},
    {"head", 128256, 4096, false, false, true},
};
static const s_prod_t s_1b[] = {
    {"qkv", 3072, 2048, false, true, false},      {"o", 2048, 2048, true, false, false},
    {"gate_up", 16384, 2048, false, true, false}, {"down", 2048, 8192, true, false, false},
    {"head", 128256, 2048, false, false, true},
};

typedef struct {
    cudaStream_t st;
    cudaEvent_t e0, e1;
    int reps;
} s_timer_t;

/* Mean time of one call over t->reps, after three untimed ones; fn returns false if the call failed. */
static double s_time_us(const s_timer_t *t, bool (*fn)(void *), void *ctx) {
    for (int i = 0; i < 3; i++)
        if (!fn(ctx)) return -1.0;
    S_CHECK(cudaStreamSynchronize(t->st) == cudaSuccess);
    cudaEventRecord(t->e0, t->st);
    for (int i = 0; i < t->reps; i++) (void)fn(ctx);
    cudaEventRecord(t->e1, t->st);
    S_CHECK(cudaEventSynchronize(t->e1) == cudaSuccess);
    float ms = 0;
    cudaEventElapsedTime(&ms, t->e0, t->e1);
    return cudaGetLastError() == cudaSuccess ? 1e3 * ms / t->reps : -1.0;
}

typedef struct {
    cublasHandle_t blas;
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    const cublasLtMatmulAlgo_t *algo;
    const void *w, *x;
    void *y, *ws;
    int64_t m, n, k;
    cudaDataType_t y_type;
    float beta;
    cudaStream_t st;
} s_call_t;

static bool s_call_default(void *p) {
    s_call_t *c = p;
    const float alpha = 1.0f;
    return cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)c->n, (int)c->m, (int)c->k, &alpha, c->w, CUDA_R_16BF,
                        (int)c->k, c->x, CUDA_R_16BF, (int)c->k, &c->beta, c->y, c->y_type, (int)c->n,
                        CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
}

static bool s_call_lt(void *p) {
    s_call_t *c = p;
    const float alpha = 1.0f;
    return cublasLtMatmul(c->lt, c->desc, &alpha, c->w, c->la, c->x, c->lb, &c->beta, c->y, c->lc, c->y, c->lc, c->algo,
                          c->ws, S_WS_BYTES, c->st) == CUBLAS_STATUS_SUCCESS;
}

static int s_parse_list(const char *s, int *out, int cap) {
    int n = 0;
    for (const char *p = s; *p && n < cap;) {
        out[n++] = atoi(p);
        const char *comma = strchr(p, ',');
        if (!comma) break;
        p = comma + 1;
    }
    return n;
}

int main(int argc, char **argv) {
    const char *shape = "8b";
    int tokens[16] = {16, 32, 64, 128, 4096}, n_tokens = 5, n_algos = 16, reps = 30;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--shape"))
            shape = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens"))
            n_tokens = s_parse_list(argv[i + 1], tokens, 16);
        else if (!strcmp(argv[i], "--algos"))
            n_algos = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [--shape 8b|1b] [--tokens 16,32,64] [--algos 16] [--reps 30]\n", argv[0]);
            return 2;
        }
    }
    if (n_algos < 1 || n_algos > S_MAX_ALGOS) n_algos = S_MAX_ALGOS;
    const s_prod_t *prods = strcmp(shape, "1b") ? s_8b : s_1b;
    const int n_prods = 5;

    int64_t max_m = 0, max_n = 0, max_k = 0;
    for (int i = 0; i < n_tokens; i++) max_m = tokens[i] > max_m ? tokens[i] : max_m;
    for (int i = 0; i < n_prods; i++) {
        max_n = prods[i].n > max_n ? prods[i].n : max_n;
        max_k = prods[i].k > max_k ? prods[i].k : max_k;
    }
    s_call_t c = {0};
    s_timer_t t = {.reps = reps};
    S_CHECK(cudaStreamCreate(&t.st) == cudaSuccess);
    cudaEventCreate(&t.e0), cudaEventCreate(&t.e1);
    c.st = t.st;
    S_CHECK(cublasCreate(&c.blas) == CUBLAS_STATUS_SUCCESS && cublasLtCreate(&c.lt) == CUBLAS_STATUS_SUCCESS);
    cublasSetStream(c.blas, t.st);
    void *w, *x, *y;
    /* the head at decode sizes only: y is sized for the largest (m, n) actually run */
    int64_t y_elems = 0;
    for (int i = 0; i < n_prods; i++)
        for (int j = 0; j < n_tokens; j++) {
            if (prods[i].is_decode_only && tokens[j] > 256) continue;
            const int64_t e = (int64_t)tokens[j] * prods[i].n;
            y_elems = e > y_elems ? e : y_elems;
        }
    S_CHECK(cudaMalloc(&w, (size_t)max_n * (size_t)max_k * 2) == cudaSuccess);
    S_CHECK(cudaMalloc(&x, (size_t)max_m * (size_t)max_k * 2) == cudaSuccess);
    S_CHECK(cudaMalloc(&y, (size_t)y_elems * 4) == cudaSuccess);
    S_CHECK(cudaMalloc(&c.ws, S_WS_BYTES) == cudaSuccess);
    cudaMemset(w, 0x3c, (size_t)max_n * (size_t)max_k * 2); /* small finite bf16 values */
    cudaMemset(x, 0x3c, (size_t)max_m * (size_t)max_k * 2);
    cudaMemset(y, 0, (size_t)y_elems * 4);
    c.w = w, c.x = x, c.y = y;

    int dev = 0;
    struct cudaDeviceProp prop;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    printf("gpu %s; %s shape; %d reps per timing; up to %d cuBLASLt algorithms per product\n", prop.name, shape, reps,
           n_algos);
    printf("%-8s %6s %6s %6s %4s %10s %10s %6s %8s %12s\n", "product", "m", "n", "k", "out", "default us", "best Lt us",
           "ratio", "algo", "best rate");
    for (int j = 0; j < n_tokens; j++)
        for (int i = 0; i < n_prods; i++) {
            const s_prod_t *p = &prods[i];
            const int64_t m = tokens[j];
            if (p->is_decode_only && m > 256) continue;
            c.m = m, c.n = p->n, c.k = p->k, c.beta = p->is_accumulate ? 1.0f : 0.0f;
            c.y_type = p->is_prefill_bf16 && m >= 512 ? CUDA_R_16BF : CUDA_R_32F;
            const double t_def = s_time_us(&t, s_call_default, &c);

            cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
            S_CHECK(cublasLtMatmulDescCreate(&c.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
            cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof op_t);
            cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof op_n);
            cublasLtMatrixLayoutCreate(&c.la, CUDA_R_16BF, (uint64_t)p->k, (uint64_t)p->n, p->k);
            cublasLtMatrixLayoutCreate(&c.lb, CUDA_R_16BF, (uint64_t)p->k, (uint64_t)m, p->k);
            cublasLtMatrixLayoutCreate(&c.lc, c.y_type, (uint64_t)p->n, (uint64_t)m, p->n);
            cublasLtMatmulPreference_t pref;
            cublasLtMatmulPreferenceCreate(&pref);
            const uint64_t ws = S_WS_BYTES;
            cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
            cublasLtMatmulHeuristicResult_t res[S_MAX_ALGOS];
            int n_res = 0;
            cublasLtMatmulAlgoGetHeuristic(c.lt, c.desc, c.la, c.lb, c.lc, c.lc, pref, n_algos, res, &n_res);
            double best = -1.0;
            int best_i = -1;
            for (int a = 0; a < n_res; a++) {
                if (res[a].state != CUBLAS_STATUS_SUCCESS) continue;
                c.algo = &res[a].algo;
                const double us = s_time_us(&t, s_call_lt, &c);
                if (us > 0 && (best < 0 || us < best)) best = us, best_i = a;
            }
            cublasLtMatmulPreferenceDestroy(pref);
            cublasLtMatrixLayoutDestroy(c.la), cublasLtMatrixLayoutDestroy(c.lb), cublasLtMatrixLayoutDestroy(c.lc);
            cublasLtMatmulDescDestroy(c.desc);

            char rate[32];
            if (m <= 256) /* weight-bound: GB/s of weights */
                snprintf(rate, sizeof rate, "%.0f GB/s", (double)p->n * (double)p->k * 2 / (best * 1e3));
            else
                snprintf(rate, sizeof rate, "%.0f TFLOP/s",
                         2.0 * (double)m * (double)p->n * (double)p->k / (best * 1e6));
            printf("%-8s %6lld %6lld %6lld %4s %10.1f %10.1f %6.3f %3d of %-2d %12s\n", p->name, (long long)m,
                   (long long)p->n, (long long)p->k, c.y_type == CUDA_R_16BF ? "bf16" : "f32", t_def, best,
                   best > 0 && t_def > 0 ? best / t_def : 0.0, best_i, n_res, rate);
            fflush(stdout);
        }
    cublasLtDestroy(c.lt), cublasDestroy(c.blas);
    cudaFree(w), cudaFree(x), cudaFree(y), cudaFree(c.ws);
    return 0;
}
