/* bench_gemm_lt.cu: the engine's GEMM call (cublasGemmEx, CUBLAS_GEMM_DEFAULT) against every algorithm cuBLASLt's
 * heuristic offers for the same product, on the shapes a Llama forward runs: y (m tokens, n) [+]= x (m, k) . w (n, k)^T,
 * bf16 operands, f32 compute, y f32 or bf16 as the engine writes it (beta 1 where it adds to the residual). Decides
 * whether timing the algorithms at startup would pay (issue 6); measures, judges nothing. The timing is the engine's
 * own tuner (eng_cuda_lt_tune, as --engine.gemm_tune_rows runs it): each candidate runs the product over enough copies
 * of the weights that none stays in L2 between two runs of one copy, as a forward streams its layers.
 *   gemm_lt [--shape 8b|1b] [--tokens 16,32,64,128,4096] [--algos 16]
 * Per product: the default's time, the best Lt algorithm's time and index among those offered, and their weight
 * bandwidth (decode sizes) or TFLOP/s (prefill sizes). */
#include "eng_cuda_lt.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_L2_PASS_BYTES ((int64_t)256 << 20) /* weight copies per product: at least this much, several times L2 */
#define S_MAX_COPIES    32

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

/* Copies of a (n, k) weight matrix that together pass S_L2_PASS_BYTES (at least 1, at most S_MAX_COPIES). */
static int32_t s_copies(int64_t n, int64_t k) {
    const int64_t bytes = n * k * 2, c = (S_L2_PASS_BYTES + bytes - 1) / bytes;
    return (int32_t)(c < 1 ? 1 : c > S_MAX_COPIES ? S_MAX_COPIES : c);
}

int main(int argc, char **argv) {
    const char *shape = "8b";
    int tokens[16] = {16, 32, 64, 128, 4096}, n_tokens = 5, n_algos = 16;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--shape"))
            shape = argv[i + 1];
        else if (!strcmp(argv[i], "--tokens"))
            n_tokens = s_parse_list(argv[i + 1], tokens, 16);
        else if (!strcmp(argv[i], "--algos"))
            n_algos = atoi(argv[i + 1]);
        else {
            fprintf(stderr, "usage: %s [--shape 8b|1b] [--tokens 16,32,64] [--algos 16]\n", argv[0]);
            return 2;
        }
    }
    const s_prod_t *prods = strcmp(shape, "1b") ? s_8b : s_1b;
    const int n_prods = 5;

    int64_t max_m = 0, max_k = 0, w_elems = 0, y_elems = 0;
    for (int i = 0; i < n_tokens; i++) max_m = tokens[i] > max_m ? tokens[i] : max_m;
    for (int i = 0; i < n_prods; i++) {
        const int64_t e = prods[i].n * prods[i].k * s_copies(prods[i].n, prods[i].k);
        w_elems = e > w_elems ? e : w_elems;
        max_k = prods[i].k > max_k ? prods[i].k : max_k;
        for (int j = 0; j < n_tokens; j++) { /* the head at decode sizes only */
            if (prods[i].is_decode_only && tokens[j] > 256) continue;
            y_elems = (int64_t)tokens[j] * prods[i].n > y_elems ? (int64_t)tokens[j] * prods[i].n : y_elems;
        }
    }
    cudaStream_t st;
    cublasHandle_t blas;
    S_CHECK(cudaStreamCreate(&st) == cudaSuccess);
    S_CHECK(cublasCreate(&blas) == CUBLAS_STATUS_SUCCESS && cublasSetStream(blas, st) == CUBLAS_STATUS_SUCCESS);
    eng_cuda_lt_t *lt = eng_cuda_lt_create(st);
    S_CHECK(lt != NULL);
    __nv_bfloat16 *w, *x;
    void *y;
    S_CHECK(cudaMalloc(&w, (size_t)w_elems * 2) == cudaSuccess);
    S_CHECK(cudaMalloc(&x, (size_t)max_m * (size_t)max_k * 2) == cudaSuccess);
    S_CHECK(cudaMalloc(&y, (size_t)y_elems * 4) == cudaSuccess);
    cudaMemset(w, 0x3c, (size_t)w_elems * 2); /* small finite bf16 values */
    cudaMemset(x, 0x3c, (size_t)max_m * (size_t)max_k * 2);
    cudaMemset(y, 0, (size_t)y_elems * 4);

    int dev = 0;
    cudaDeviceProp prop;
    cudaGetDevice(&dev);
    cudaGetDeviceProperties(&prop, dev);
    printf("gpu %s; %s shape; the engine's tuner (each candidate over >= %d MiB of weight copies); up to %d cuBLASLt "
           "algorithms per product\n",
           prop.name, shape, (int)(S_L2_PASS_BYTES >> 20), n_algos);
    printf("%-8s %6s %6s %6s %6s %4s %10s %10s %6s %8s %12s\n", "product", "m", "n", "k", "copies", "out", "default us",
           "best Lt us", "ratio", "algo", "best rate");
    const __nv_bfloat16 *copies[S_MAX_COPIES];
    for (int j = 0; j < n_tokens; j++)
        for (int i = 0; i < n_prods; i++) {
            const s_prod_t *p = &prods[i];
            const int64_t m = tokens[j];
            if (p->is_decode_only && m > 256) continue;
            const int32_t n_w = s_copies(p->n, p->k);
            for (int32_t c = 0; c < n_w; c++) copies[c] = w + (int64_t)c * p->n * p->k;
            eng_cuda_lt_shape_t s = {
                m,   p->n, p->k, p->is_prefill_bf16 && m >= 512 ? CUDA_R_16BF : CUDA_R_32F, p->is_accumulate, copies,
                n_w, x,    y};
            eng_cuda_lt_report_t r;
            (void)eng_cuda_lt_tune(lt, blas, &s, n_algos, &r);
            const double best = r.best_lt_us;
            char rate[32];
            if (best <= 0)
                snprintf(rate, sizeof rate, "-");
            else if (m <= 256) /* weight-bound: GB/s of weights */
                snprintf(rate, sizeof rate, "%.0f GB/s", (double)p->n * (double)p->k * 2 / (best * 1e3));
            else
                snprintf(rate, sizeof rate, "%.0f TFLOP/s",
                         2.0 * (double)m * (double)p->n * (double)p->k / (best * 1e6));
            printf("%-8s %6lld %6lld %6lld %6d %4s %10.1f %10.1f %6.3f %3d of %-2d %12s\n", p->name, (long long)m,
                   (long long)p->n, (long long)p->k, n_w, s.y_type == CUDA_R_16BF ? "bf16" : "f32", r.default_us, best,
                   best > 0 && r.default_us > 0 ? best / r.default_us : 0.0, r.best_index, r.n_offered, rate);
            fflush(stdout);
        }
    eng_cuda_lt_destroy(&lt);
    cublasDestroy(blas);
    cudaFree(w), cudaFree(x), cudaFree(y);
    cudaStreamDestroy(st);
    return 0;
}
