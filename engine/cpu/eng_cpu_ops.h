/* eng_cpu_ops.h: the CPU backend's kernels. Every output element is computed by exactly one thread in
 * a fixed order that does not depend on batch size, batch composition or thread count: that is what
 * makes the CPU backend batch-invariant bit for bit (a sequence gets the same logits alone, in a batch,
 * or prefilled in chunks). The one primitive behind all dot products is eng_cpu_dot (8 lanes, fused
 * multiply-add, fixed reduction tree). */
#ifndef ENG_CPU_OPS_H
#define ENG_CPU_OPS_H

#include <stdint.h>

#include "eng_cpu_pool.h"
#include "eng_model.h"

/* sum_k a[k]*b[k] for n a multiple of 8: eight lane accumulators over k, fused multiply-add, then a
 * fixed reduction tree. AVX2 and portable builds give identical bits. */
float eng_cpu_dot(const float *a, const float *b, int64_t n);

/* y[i] = eng_cpu_dot(x, rows + i * stride, n) for i < n_rows, bit for bit (n a multiple of 8). */
void eng_cpu_dot_rows(float *y, const float *x, const float *rows, int64_t stride, int64_t n_rows, int64_t n);

/* y[k] += p[i] * rows[i * stride + k] for i = 0 .. n_rows-1 in that order, product rounded then sum
 * rounded (no fusion), for k < n (a multiple of 8): the attention's P.V, the same bits as the plain loop. */
void eng_cpu_axpy_rows(float *y, const float *p, const float *rows, int64_t stride, int64_t n_rows, int64_t n);

/* y[t*ldy + o] = sum_k x[t*ldx + k] * W[o][k] for t < n_tok, o < w->rows; W in its stored type.
 * scratch: one buffer of ENG_CPU_TILE_ROWS * w->cols floats per pool thread. Parallel over tiles of
 * rows of W on pool (NULL: the calling thread alone). */
#define ENG_CPU_TILE_ROWS 16
void eng_cpu_matmul(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const eng_weight_t *w,
                    float *const *scratch, eng_cpu_pool_t *pool);

/* n matmuls (1..ENG_CPU_MATMUL_MAX) of the same x, all w[i] with the same cols: y[i] as above with
 * ldy[i] and w[i]. One pool job for all (Q, K, V; gate, up): fewer hand-offs, better balance. Each
 * output has the bits eng_cpu_matmul gives it. */
#define ENG_CPU_MATMUL_MAX 4
void eng_cpu_matmul_n(int n, float *const *y, const int64_t *ldy, const eng_weight_t *const *w, const float *x,
                      int64_t ldx, int64_t n_tok, float *const *scratch, eng_cpu_pool_t *pool);

/* y = x / sqrt(mean(x^2) + eps) * w, for n_tok rows of n (w f32 vector). y may alias x. */
void eng_cpu_rmsnorm(float *y, const float *x, const float *w, int64_t n_tok, int64_t n, float eps);

/* Rotates adjacent pairs (v[2i], v[2i+1]) of each head by pos * theta^(-2i/head_dim): llama.cpp's
 * "normal" RoPE, which is what GGUF llama weights (Q/K rows permuted at conversion) expect.
 * cs holds (cos, sin) per pair for this token: head_dim floats. */
void eng_cpu_rope(float *v, int64_t n_heads, int64_t head_dim, const float *cs);
/* Fills cs (head_dim floats) for one position, computed in double. */
void eng_cpu_rope_table(float *cs, int64_t pos, int64_t head_dim, double theta);

/* h[i] = silu(g[i]) * u[i]. */
void eng_cpu_swiglu(float *h, const float *g, const float *u, int64_t n);

/* Dequantizes row `row` of w into dst (w->cols floats). */
void eng_cpu_weight_row(const eng_weight_t *w, int64_t row, float *dst);

#endif
