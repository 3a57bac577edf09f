/* eng_cuda_lt.cuh: GEMM algorithms picked by timing them (private to engine/cuda/). For the products y (m, n) [+]=
 * x (m, k) . w (n, k)^T the backend hands to cuBLAS (bf16 operands, f32 compute, y f32 or bf16), cuBLAS's default
 * choice (cublasGemmEx, CUBLAS_GEMM_DEFAULT) is not the fastest at every shape: bench/gemm_lt found cuBLASLt
 * algorithms 0-14% faster on most decode-sized products of an 8B model. A tuning pass times the default and the
 * algorithms cuBLASLt's heuristic offers on the model's own weights, each candidate running the product over every
 * layer's matrix in turn (as a forward does: no weight stays in L2 between two runs of one layer), and remembers
 * a cuBLASLt algorithm only where it beat the default. */
#ifndef ENG_CUDA_LT_CUH
#define ENG_CUDA_LT_CUH

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdbool.h>
#include <stdint.h>

typedef struct eng_cuda_lt eng_cuda_lt_t;

/* NULL on failure (the backend then uses cublasGemmEx alone). */
eng_cuda_lt_t *eng_cuda_lt_create(cudaStream_t st);
void eng_cuda_lt_destroy(eng_cuda_lt_t **lt);

/* One product shape to tune: n_w weight matrices (n, k) (a layer each), x (m, k) and y (m, n) scratch. */
typedef struct {
    int64_t m, n, k;
    cudaDataType_t y_type;
    bool is_accumulate; /* beta 1 */
    const __nv_bfloat16 *const *w;
    int32_t n_w;
    const __nv_bfloat16 *x;
    void *y; /* overwritten: never live data */
} eng_cuda_lt_shape_t;

/* What one tuning saw (bench/gemm_lt prints it): the default's mean time per product, the fastest cuBLASLt
 * algorithm's (kept or not; negative: none ran) and its index among the n_offered the heuristic returned. */
typedef struct {
    double default_us, best_lt_us;
    int32_t best_index, n_offered;
} eng_cuda_lt_report_t;

/* Times cublasGemmEx's default and up to n_algos cuBLASLt algorithms on shape s (not while capturing); returns the
 * winner's time over the default's (< 1: a cuBLASLt algorithm is kept for this shape), or a negative value if no
 * timing could be made. blas: the backend's handle, on the same stream. report (NULL: none) gets the timings. */
double eng_cuda_lt_tune(eng_cuda_lt_t *lt, cublasHandle_t blas, const eng_cuda_lt_shape_t *s, int n_algos,
                        eng_cuda_lt_report_t *report);

/* Runs the product with the algorithm tuned for its shape and returns true; false (nothing launched) where none
 * was kept: the caller runs cublasGemmEx. */
bool eng_cuda_lt_gemm(eng_cuda_lt_t *lt, void *y, cudaDataType_t y_type, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                      int64_t m, int64_t n, int64_t k, bool is_accumulate);

/* Shapes tuned and shapes where a cuBLASLt algorithm won. */
void eng_cuda_lt_counts(const eng_cuda_lt_t *lt, int32_t *n_tuned, int32_t *n_kept);

#endif
