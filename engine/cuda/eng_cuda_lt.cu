/* eng_cuda_lt.cu: GEMM algorithms picked by timing them (eng_cuda_lt.cuh). */
#include "eng_cuda_lt.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_SLOTS     1024 /* open addressing; a model tunes a few hundred shapes at most */
#define S_WS_BYTES  (32u << 20)
#define S_MAX_ALGOS 16
#define S_MIN_RUNS  8    /* timed product runs per candidate, at least one pass over the weights */
#define S_MIN_GAIN  0.98 /* a cuBLASLt algorithm is kept only if at least 2% faster than the default */

typedef struct {
    int64_t m, n, k;
    int32_t y_type;
    bool is_accumulate, is_used, is_lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatmulAlgo_t algo;
} s_entry_t;

struct eng_cuda_lt {
    cublasLtHandle_t h;
    cudaStream_t st;
    void *ws;
    cudaEvent_t e0, e1;
    s_entry_t slots[S_SLOTS];
    int32_t n_tuned, n_kept;
};

static uint64_t s_hash(int64_t m, int64_t n, int64_t k, int32_t y_type, bool is_acc) {
    uint64_t h = 1469598103934665603ull;
    const uint64_t v[5] = {(uint64_t)m, (uint64_t)n, (uint64_t)k, (uint64_t)y_type, (uint64_t)is_acc};
    for (int i = 0; i < 5; i++) h = (h ^ v[i]) * 1099511628211ull;
    return h;
}

/* The slot of this shape, or the free slot where it would go (NULL: the table is full). */
static s_entry_t *s_find(eng_cuda_lt_t *lt, int64_t m, int64_t n, int64_t k, int32_t y_type, bool is_acc) {
    for (uint64_t i = s_hash(m, n, k, y_type, is_acc) % S_SLOTS, j = 0; j < S_SLOTS; j++, i = (i + 1) % S_SLOTS) {
        s_entry_t *e = &lt->slots[i];
        if (!e->is_used || (e->m == m && e->n == n && e->k == k && e->y_type == y_type && e->is_accumulate == is_acc))
            return e;
    }
    return NULL;
}

eng_cuda_lt_t *eng_cuda_lt_create(cudaStream_t st) {
    eng_cuda_lt_t *lt = (eng_cuda_lt_t *)calloc(1, sizeof *lt);
    if (!lt) return NULL;
    lt->st = st;
    if (cublasLtCreate(&lt->h) != CUBLAS_STATUS_SUCCESS) {
        free(lt);
        return NULL;
    }
    if (cudaMalloc(&lt->ws, S_WS_BYTES) != cudaSuccess || cudaEventCreate(&lt->e0) != cudaSuccess ||
        cudaEventCreate(&lt->e1) != cudaSuccess) {
        eng_cuda_lt_destroy(&lt);
        return NULL;
    }
    return lt;
}

static void s_entry_fini(s_entry_t *e) {
    if (e->lc) cublasLtMatrixLayoutDestroy(e->lc);
    if (e->lb) cublasLtMatrixLayoutDestroy(e->lb);
    if (e->la) cublasLtMatrixLayoutDestroy(e->la);
    if (e->desc) cublasLtMatmulDescDestroy(e->desc);
    e->lc = e->lb = e->la = NULL, e->desc = NULL;
}

void eng_cuda_lt_destroy(eng_cuda_lt_t **plt) {
    eng_cuda_lt_t *lt = *plt;
    if (!lt) return;
    for (int i = 0; i < S_SLOTS; i++) s_entry_fini(&lt->slots[i]);
    if (lt->e0) cudaEventDestroy(lt->e0);
    if (lt->e1) cudaEventDestroy(lt->e1);
    if (lt->ws) cudaFree(lt->ws);
    if (lt->h) cublasLtDestroy(lt->h);
    free(lt);
    *plt = NULL;
}

/* y (m, n) = w (n, k) . x: column-major, A = w^T (k x n, ld k), B = x (k x m, ld k), C = D = y (n x m, ld n). */
static bool s_entry_init(s_entry_t *e, int64_t m, int64_t n, int64_t k, cudaDataType_t y_type) {
    cublasOperation_t op_t = CUBLAS_OP_T, op_n = CUBLAS_OP_N;
    return cublasLtMatmulDescCreate(&e->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSA, &op_t, sizeof op_t) ==
               CUBLAS_STATUS_SUCCESS &&
           cublasLtMatmulDescSetAttribute(e->desc, CUBLASLT_MATMUL_DESC_TRANSB, &op_n, sizeof op_n) ==
               CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&e->la, CUDA_R_16BF, (uint64_t)k, (uint64_t)n, k) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&e->lb, CUDA_R_16BF, (uint64_t)k, (uint64_t)m, k) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutCreate(&e->lc, y_type, (uint64_t)n, (uint64_t)m, n) == CUBLAS_STATUS_SUCCESS;
}

static bool s_run_lt(eng_cuda_lt_t *lt, const s_entry_t *e, const cublasLtMatmulAlgo_t *algo, void *y,
                     const __nv_bfloat16 *x, const __nv_bfloat16 *w, bool is_acc) {
    const float alpha = 1.0f, beta = is_acc ? 1.0f : 0.0f;
    return cublasLtMatmul(lt->h, e->desc, &alpha, w, e->la, x, e->lb, &beta, y, e->lc, y, e->lc, algo, lt->ws,
                          S_WS_BYTES, lt->st) == CUBLAS_STATUS_SUCCESS;
}

static bool s_run_default(cublasHandle_t blas, const eng_cuda_lt_shape_t *s, const __nv_bfloat16 *w) {
    const float alpha = 1.0f, beta = s->is_accumulate ? 1.0f : 0.0f;
    return cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)s->n, (int)s->m, (int)s->k, &alpha, w, CUDA_R_16BF,
                        (int)s->k, s->x, CUDA_R_16BF, (int)s->k, &beta, s->y, s->y_type, (int)s->n, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS;
}

/* Mean time of one product run over `runs` runs cycling through the weights, after one untimed pass; algo NULL:
 * the default. Negative if a run failed. */
static double s_time(eng_cuda_lt_t *lt, cublasHandle_t blas, const eng_cuda_lt_shape_t *s, const s_entry_t *e,
                     const cublasLtMatmulAlgo_t *algo, int32_t runs) {
    bool is_ok = true;
    for (int32_t r = -s->n_w; r < runs && is_ok; r++) {
        if (r == 0) is_ok = cudaEventRecord(lt->e0, lt->st) == cudaSuccess;
        const __nv_bfloat16 *w = s->w[(r + s->n_w) % s->n_w];
        is_ok = is_ok && (algo ? s_run_lt(lt, e, algo, s->y, s->x, w, s->is_accumulate) : s_run_default(blas, s, w));
    }
    float ms = 0.0f;
    is_ok = is_ok && cudaEventRecord(lt->e1, lt->st) == cudaSuccess && cudaEventSynchronize(lt->e1) == cudaSuccess &&
            cudaEventElapsedTime(&ms, lt->e0, lt->e1) == cudaSuccess;
    (void)cudaGetLastError(); /* an algorithm that failed to launch is just not a candidate */
    return is_ok ? 1e3 * (double)ms / runs : -1.0;
}

double eng_cuda_lt_tune(eng_cuda_lt_t *lt, cublasHandle_t blas, const eng_cuda_lt_shape_t *s, int n_algos,
                        eng_cuda_lt_report_t *report) {
    eng_cuda_lt_report_t r = {-1.0, -1.0, -1, 0};
    if (report) *report = r;
    s_entry_t *e = s_find(lt, s->m, s->n, s->k, (int32_t)s->y_type, s->is_accumulate);
    if (!e || s->n_w < 1) return -1.0;
    if (e->is_used) s_entry_fini(e);
    memset(e, 0, sizeof *e);
    if (!s_entry_init(e, s->m, s->n, s->k, s->y_type)) {
        s_entry_fini(e);
        return -1.0;
    }
    e->m = s->m, e->n = s->n, e->k = s->k, e->y_type = (int32_t)s->y_type, e->is_accumulate = s->is_accumulate;
    e->is_used = true, lt->n_tuned++;
    const int32_t runs = s->n_w > S_MIN_RUNS ? s->n_w : S_MIN_RUNS;
    const double t_default = s_time(lt, blas, s, e, NULL, runs);
    if (t_default <= 0) return -1.0;
    r.default_us = t_default;
    if (report) *report = r;

    cublasLtMatmulPreference_t pref;
    if (cublasLtMatmulPreferenceCreate(&pref) != CUBLAS_STATUS_SUCCESS) return 1.0;
    const uint64_t ws = S_WS_BYTES;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    cublasLtMatmulHeuristicResult_t res[S_MAX_ALGOS];
    int n_res = 0;
    if (n_algos > S_MAX_ALGOS) n_algos = S_MAX_ALGOS;
    if (cublasLtMatmulAlgoGetHeuristic(lt->h, e->desc, e->la, e->lb, e->lc, e->lc, pref, n_algos, res, &n_res) !=
        CUBLAS_STATUS_SUCCESS)
        n_res = 0;
    cublasLtMatmulPreferenceDestroy(pref);
    double best = t_default;
    r.n_offered = n_res;
    for (int i = 0; i < n_res; i++) {
        if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const double t = s_time(lt, blas, s, e, &res[i].algo, runs);
        if (t > 0 && (r.best_lt_us < 0 || t < r.best_lt_us)) r.best_lt_us = t, r.best_index = i;
        if (t > 0 && t < best * (best == t_default ? S_MIN_GAIN : 1.0))
            best = t, e->algo = res[i].algo, e->is_lt = true;
    }
    lt->n_kept += e->is_lt;
    if (report) *report = r;
    return best / t_default;
}

bool eng_cuda_lt_gemm(eng_cuda_lt_t *lt, void *y, cudaDataType_t y_type, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                      int64_t m, int64_t n, int64_t k, bool is_accumulate) {
    if (!lt) return false;
    const s_entry_t *e = s_find(lt, m, n, k, (int32_t)y_type, is_accumulate);
    return e && e->is_used && e->is_lt && s_run_lt(lt, e, &e->algo, y, x, w, is_accumulate);
}

void eng_cuda_lt_counts(const eng_cuda_lt_t *lt, int32_t *n_tuned, int32_t *n_kept) {
    *n_tuned = lt ? lt->n_tuned : 0, *n_kept = lt ? lt->n_kept : 0;
}
