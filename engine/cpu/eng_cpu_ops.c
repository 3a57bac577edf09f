/* eng_cpu_ops.c: CPU kernels (matmul over stored weight types, RMSNorm, RoPE, SwiGLU). Plain C plus
 * AVX2 intrinsics where the compiler targets it; the portable path computes the same bits.
 * Deliberately not BLAS: a BLAS GEMM picks its blocking by matrix shape, so results would depend on
 * batch composition, and the CPU backend is the exact reference. */
#include "eng_cpu_ops.h"

#include <math.h>
#include <string.h>

#include "eng_quant.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ENG_CPU_AVX2 1
#endif

/* Fixed reduction of 8 lanes: ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)). */
static inline float s_reduce8(const float l[8]) {
    float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
    float b0 = a0 + a2, b1 = a1 + a3;
    return b0 + b1;
}

#ifdef ENG_CPU_AVX2
static inline float s_hsum(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return s_reduce8(l);
}
#endif

float eng_cpu_dot(const float *a, const float *b, int64_t n) {
#ifdef ENG_CPU_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < n; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc);
    return s_hsum(acc);
#else
    float l[8] = {0};
    for (int64_t k = 0; k < n; k += 8)
        for (int j = 0; j < 8; j++) l[j] = fmaf(a[k + j], b[k + j], l[j]);
    return s_reduce8(l);
#endif
}

#ifdef ENG_CPU_AVX2
/* AVX2 dequantization of whole rows for the two types the default model uses. Same arithmetic as the
 * reference eng_dequant (q * d + m, multiply then add, no fusion), so the bits are identical; the
 * f16 scales convert exactly with F16C. */
static void s_row_q4_1(const uint8_t *src, float *dst, int64_t n) {
    const __m128i lo_mask = _mm_set1_epi8(0x0f);
    for (int64_t i = 0; i < n; i += 32, src += 20, dst += 32) {
        uint16_t dh, mh;
        memcpy(&dh, src, 2), memcpy(&mh, src + 2, 2);
        __m256 d = _mm256_set1_ps(_cvtsh_ss(dh)), m = _mm256_set1_ps(_cvtsh_ss(mh));
        __m128i qs = _mm_loadu_si128((const __m128i *)(src + 4));
        __m128i lo = _mm_and_si128(qs, lo_mask), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), lo_mask);
        __m256 v0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        __m256 v1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        __m256 v2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        __m256 v3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_mul_ps(v0, d), m));
        _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_mul_ps(v1, d), m));
        _mm256_storeu_ps(dst + 16, _mm256_add_ps(_mm256_mul_ps(v2, d), m));
        _mm256_storeu_ps(dst + 24, _mm256_add_ps(_mm256_mul_ps(v3, d), m));
    }
}

static void s_row_q8_0(const uint8_t *src, float *dst, int64_t n) {
    for (int64_t i = 0; i < n; i += 32, src += 34, dst += 32) {
        uint16_t dh;
        memcpy(&dh, src, 2);
        __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
        __m128i q0 = _mm_loadu_si128((const __m128i *)(src + 2)), q1 = _mm_loadu_si128((const __m128i *)(src + 18));
        _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), d));
        _mm256_storeu_ps(dst + 8, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), d));
        _mm256_storeu_ps(dst + 16, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), d));
        _mm256_storeu_ps(dst + 24, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), d));
    }
}
#endif

#ifdef ENG_CPU_AVX2
/* Decode path (fewer than 4 tokens): dequantize in registers and multiply-accumulate at once, never
 * storing the f32 weights. The per-element arithmetic and the k order (32-element blocks as 4 vectors
 * of 8, in element order) are those of the tile path, so both give the same bits. Four rows at a time
 * for four independent accumulator chains. */
static inline void s_q4_1_block(const uint8_t *b, __m256 w[4]) {
    uint16_t dh, mh;
    memcpy(&dh, b, 2), memcpy(&mh, b + 2, 2);
    __m256 d = _mm256_set1_ps(_cvtsh_ss(dh)), m = _mm256_set1_ps(_cvtsh_ss(mh));
    __m128i qs = _mm_loadu_si128((const __m128i *)(b + 4)), mask = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(qs, mask), hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    w[0] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d), m);
    w[1] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d), m);
    w[2] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d), m);
    w[3] = _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d), m);
}

static inline void s_q8_0_block(const uint8_t *b, __m256 w[4]) {
    uint16_t dh;
    memcpy(&dh, b, 2);
    __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
    __m128i q0 = _mm_loadu_si128((const __m128i *)(b + 2)), q1 = _mm_loadu_si128((const __m128i *)(b + 18));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q0, 8))), d);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), d);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q1, 8))), d);
}

#define S_FUSED_KERNEL(NAME, BLOCK_FN, BLOCK_BYTES)                                                                    \
    static void NAME(float *y, const float *x, const uint8_t *w0, uint64_t row_bytes, int64_t n_rows, int64_t k_n) {   \
        int64_t r = 0;                                                                                                 \
        for (; r + 4 <= n_rows; r += 4) {                                                                              \
            const uint8_t *b0 = w0 + (uint64_t)r * row_bytes, *b1 = b0 + row_bytes, *b2 = b1 + row_bytes,              \
                          *b3 = b2 + row_bytes;                                                                        \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, w[4];                                          \
            for (int64_t k = 0; k < k_n; k += 32) {                                                                    \
                __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8), x2 = _mm256_loadu_ps(x + k + 16), \
                       x3 = _mm256_loadu_ps(x + k + 24);                                                               \
                BLOCK_FN(b0, w), b0 += BLOCK_BYTES;                                                                    \
                a0 = _mm256_fmadd_ps(x0, w[0], a0), a0 = _mm256_fmadd_ps(x1, w[1], a0);                                \
                a0 = _mm256_fmadd_ps(x2, w[2], a0), a0 = _mm256_fmadd_ps(x3, w[3], a0);                                \
                BLOCK_FN(b1, w), b1 += BLOCK_BYTES;                                                                    \
                a1 = _mm256_fmadd_ps(x0, w[0], a1), a1 = _mm256_fmadd_ps(x1, w[1], a1);                                \
                a1 = _mm256_fmadd_ps(x2, w[2], a1), a1 = _mm256_fmadd_ps(x3, w[3], a1);                                \
                BLOCK_FN(b2, w), b2 += BLOCK_BYTES;                                                                    \
                a2 = _mm256_fmadd_ps(x0, w[0], a2), a2 = _mm256_fmadd_ps(x1, w[1], a2);                                \
                a2 = _mm256_fmadd_ps(x2, w[2], a2), a2 = _mm256_fmadd_ps(x3, w[3], a2);                                \
                BLOCK_FN(b3, w), b3 += BLOCK_BYTES;                                                                    \
                a3 = _mm256_fmadd_ps(x0, w[0], a3), a3 = _mm256_fmadd_ps(x1, w[1], a3);                                \
                a3 = _mm256_fmadd_ps(x2, w[2], a3), a3 = _mm256_fmadd_ps(x3, w[3], a3);                                \
            }                                                                                                          \
            y[r] = s_hsum(a0), y[r + 1] = s_hsum(a1), y[r + 2] = s_hsum(a2), y[r + 3] = s_hsum(a3);                    \
        }                                                                                                              \
        for (; r < n_rows; r++) {                                                                                      \
            const uint8_t *b0 = w0 + (uint64_t)r * row_bytes;                                                          \
            __m256 a0 = _mm256_setzero_ps(), w[4];                                                                     \
            for (int64_t k = 0; k < k_n; k += 32, b0 += BLOCK_BYTES) {                                                 \
                BLOCK_FN(b0, w);                                                                                       \
                for (int j = 0; j < 4; j++) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * j), w[j], a0);            \
            }                                                                                                          \
            y[r] = s_hsum(a0);                                                                                         \
        }                                                                                                              \
    }

S_FUSED_KERNEL(s_fused_q4_1, s_q4_1_block, 20)
S_FUSED_KERNEL(s_fused_q8_0, s_q8_0_block, 34)
#undef S_FUSED_KERNEL
#endif

void eng_cpu_weight_row(const eng_weight_t *w, int64_t row, float *dst) {
    const uint8_t *src = (const uint8_t *)w->data + (uint64_t)row * w->row_bytes;
#ifdef ENG_CPU_AVX2
    if (w->type == ENG_GGML_Q4_1) {
        s_row_q4_1(src, dst, w->cols);
        return;
    }
    if (w->type == ENG_GGML_Q8_0) {
        s_row_q8_0(src, dst, w->cols);
        return;
    }
#endif
    pd_status st = eng_dequant(w->type, src, dst, w->cols);
    PD_ASSERT(st == PD_OK); /* types and shapes were checked at model load */
}

#ifdef ENG_CPU_AVX2
/* 4 tokens x 2 rows: the register-blocked core of the matmul. Each output uses the same lane order as
 * eng_cpu_dot, so blocking changes speed, never bits. */
static void s_kernel_4x2(float *y, int64_t ldy, const float *x, int64_t ldx, const float *w0, const float *w1,
                         int64_t k_n) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    for (int64_t k = 0; k < k_n; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        __m256 t = _mm256_loadu_ps(x0 + k);
        a00 = _mm256_fmadd_ps(t, v0, a00);
        a01 = _mm256_fmadd_ps(t, v1, a01);
        t = _mm256_loadu_ps(x1 + k);
        a10 = _mm256_fmadd_ps(t, v0, a10);
        a11 = _mm256_fmadd_ps(t, v1, a11);
        t = _mm256_loadu_ps(x2 + k);
        a20 = _mm256_fmadd_ps(t, v0, a20);
        a21 = _mm256_fmadd_ps(t, v1, a21);
        t = _mm256_loadu_ps(x3 + k);
        a30 = _mm256_fmadd_ps(t, v0, a30);
        a31 = _mm256_fmadd_ps(t, v1, a31);
    }
    y[0] = s_hsum(a00), y[1] = s_hsum(a01);
    y[ldy] = s_hsum(a10), y[ldy + 1] = s_hsum(a11);
    y[2 * ldy] = s_hsum(a20), y[2 * ldy + 1] = s_hsum(a21);
    y[3 * ldy] = s_hsum(a30), y[3 * ldy + 1] = s_hsum(a31);
}

/* 1 token x 4 rows (decode: one activation row against many weight rows). */
static void s_kernel_1x4(float *y, const float *x, const float *w, int64_t ldw, int64_t k_n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t k = 0; k < k_n; k += 8) {
        __m256 t = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w + ldw + k), a1);
        a2 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w + 2 * ldw + k), a2);
        a3 = _mm256_fmadd_ps(t, _mm256_loadu_ps(w + 3 * ldw + k), a3);
    }
    y[0] = s_hsum(a0), y[1] = s_hsum(a1), y[2] = s_hsum(a2), y[3] = s_hsum(a3);
}
#endif

/* y (n_tok x n_rows block) = x (n_tok x k_n) . wt (n_rows x k_n, f32)^T. */
static void s_tile(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const float *wt, int64_t n_rows,
                   int64_t k_n) {
    int64_t t = 0;
#ifdef ENG_CPU_AVX2
    for (; t + 4 <= n_tok; t += 4) {
        int64_t r = 0;
        for (; r + 2 <= n_rows; r += 2)
            s_kernel_4x2(y + t * ldy + r, ldy, x + t * ldx, ldx, wt + r * k_n, wt + (r + 1) * k_n, k_n);
        for (; r < n_rows; r++)
            for (int64_t tt = t; tt < t + 4; tt++) y[tt * ldy + r] = eng_cpu_dot(x + tt * ldx, wt + r * k_n, k_n);
    }
    for (; t < n_tok; t++) {
        int64_t r = 0;
        for (; r + 4 <= n_rows; r += 4) s_kernel_1x4(y + t * ldy + r, x + t * ldx, wt + r * k_n, k_n, k_n);
        for (; r < n_rows; r++) y[t * ldy + r] = eng_cpu_dot(x + t * ldx, wt + r * k_n, k_n);
    }
#else
    for (; t < n_tok; t++)
        for (int64_t r = 0; r < n_rows; r++) y[t * ldy + r] = eng_cpu_dot(x + t * ldx, wt + r * k_n, k_n);
#endif
}

typedef struct {
    float *y;
    int64_t ldy;
    const float *x;
    int64_t ldx, n_tok;
    const eng_weight_t *w;
    float *const *scratch;
} s_matmul_job_t;

static void s_matmul_tiles(void *arg, int64_t tile_begin, int64_t tile_end, int thread) {
    const s_matmul_job_t *j = arg;
    float *y = j->y;
    const float *x = j->x;
    const int64_t ldy = j->ldy, ldx = j->ldx, n_tok = j->n_tok, k_n = j->w->cols;
    const eng_weight_t *w = j->w;
    /* Tokens in chunks that stay in L2 while a tile of dequantized rows is reused across them. */
    const int64_t tok_chunk = 64;
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        float *wt = j->scratch[thread];
        int64_t r0 = tile * ENG_CPU_TILE_ROWS;
        int64_t n_rows = w->rows - r0 < ENG_CPU_TILE_ROWS ? w->rows - r0 : ENG_CPU_TILE_ROWS;
#ifdef ENG_CPU_AVX2
        if (n_tok < 4 && (w->type == ENG_GGML_Q4_1 || w->type == ENG_GGML_Q8_0)) {
            const uint8_t *w0 = (const uint8_t *)w->data + (uint64_t)r0 * w->row_bytes;
            for (int64_t t = 0; t < n_tok; t++) {
                if (w->type == ENG_GGML_Q4_1)
                    s_fused_q4_1(y + t * ldy + r0, x + t * ldx, w0, w->row_bytes, n_rows, k_n);
                else
                    s_fused_q8_0(y + t * ldy + r0, x + t * ldx, w0, w->row_bytes, n_rows, k_n);
            }
            continue;
        }
#endif
        if (w->type == ENG_GGML_F32) {
            wt = (float *)((const uint8_t *)w->data + (uint64_t)r0 * w->row_bytes);
        } else {
            for (int64_t r = 0; r < n_rows; r++) eng_cpu_weight_row(w, r0 + r, wt + r * k_n);
        }
        for (int64_t t0 = 0; t0 < n_tok; t0 += tok_chunk) {
            int64_t nt = n_tok - t0 < tok_chunk ? n_tok - t0 : tok_chunk;
            s_tile(y + t0 * ldy + r0, ldy, x + t0 * ldx, ldx, nt, wt, n_rows, k_n);
        }
    }
}

void eng_cpu_matmul(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const eng_weight_t *w,
                    float *const *scratch, eng_cpu_pool_t *pool) {
    s_matmul_job_t j = {y, ldy, x, ldx, n_tok, w, scratch};
    int64_t n_tiles = (w->rows + ENG_CPU_TILE_ROWS - 1) / ENG_CPU_TILE_ROWS;
    if (!pool) {
        s_matmul_tiles(&j, 0, n_tiles, 0);
        return;
    }
    /* about 4 chunks per thread: enough to balance, few enough to keep hand-offs cheap */
    int64_t grain = n_tiles / (4 * eng_cpu_pool_n_threads(pool));
    eng_cpu_pool_run(pool, n_tiles, grain > 0 ? grain : 1, s_matmul_tiles, &j);
}

void eng_cpu_rmsnorm(float *y, const float *x, const float *w, int64_t n_tok, int64_t n, float eps) {
    for (int64_t t = 0; t < n_tok; t++) {
        const float *xt = x + t * n;
        float *yt = y + t * n;
        float ss = eng_cpu_dot(xt, xt, n);
        float scale = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) yt[i] = xt[i] * scale * w[i];
    }
}

void eng_cpu_rope_table(float *cs, int64_t pos, int64_t head_dim, double theta) {
    for (int64_t i = 0; i < head_dim / 2; i++) {
        double freq = pow(theta, -2.0 * (double)i / (double)head_dim);
        double ang = (double)pos * freq;
        cs[2 * i] = (float)cos(ang);
        cs[2 * i + 1] = (float)sin(ang);
    }
}

void eng_cpu_rope(float *v, int64_t n_heads, int64_t head_dim, const float *cs) {
    for (int64_t h = 0; h < n_heads; h++) {
        float *vh = v + h * head_dim;
        for (int64_t i = 0; i < head_dim / 2; i++) {
            float c = cs[2 * i], s = cs[2 * i + 1];
            float x0 = vh[2 * i], x1 = vh[2 * i + 1];
            vh[2 * i] = x0 * c - x1 * s;
            vh[2 * i + 1] = x0 * s + x1 * c;
        }
    }
}

void eng_cpu_swiglu(float *h, const float *g, const float *u, int64_t n) {
    for (int64_t i = 0; i < n; i++) h[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
