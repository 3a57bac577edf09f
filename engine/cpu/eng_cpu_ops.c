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
/* s_reduce8 for four accumulators at once: lane i of the result is the reduction of a_i, pair by pair
 * the same additions as s_reduce8 (float addition commutes bit for bit), so the bits are those of
 * s_hsum. Used wherever a kernel ends four dot products at once. */
static inline __m128 s_hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    /* (l0+l4, l1+l5, l2+l6, l3+l7) of a0 | of a2, and of a1 | of a3 */
    __m256 u02 = _mm256_add_ps(_mm256_permute2f128_ps(a0, a2, 0x20), _mm256_permute2f128_ps(a0, a2, 0x31));
    __m256 u13 = _mm256_add_ps(_mm256_permute2f128_ps(a1, a3, 0x20), _mm256_permute2f128_ps(a1, a3, 0x31));
    /* (b0, b1) = (s0+s2, s1+s3) of a0, a1 | of a2, a3 */
    __m256 b = _mm256_add_ps(_mm256_shuffle_ps(u02, u13, _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(u02, u13, _MM_SHUFFLE(3, 2, 3, 2)));
    __m128 lo = _mm256_castps256_ps128(b), hi = _mm256_extractf128_ps(b, 1);
    return _mm_add_ps(_mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)), _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* y[i] = eng_cpu_dot(x, rows + i * stride, n): eight rows at a time (eight accumulator chains, two
 * s_hsum4), then four, then one. */
static void s_dot_rows(float *y, const float *x, const float *rows, int64_t stride, int64_t n_rows, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n_rows; i += 8) {
        const float *r = rows + i * stride;
        __m256 a[8];
        for (int u = 0; u < 8; u++) a[u] = _mm256_setzero_ps();
        for (int64_t k = 0; k < n; k += 8) {
            __m256 xv = _mm256_loadu_ps(x + k);
            for (int u = 0; u < 8; u++) a[u] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(r + u * stride + k), a[u]);
        }
        _mm_storeu_ps(y + i, s_hsum4(a[0], a[1], a[2], a[3]));
        _mm_storeu_ps(y + i + 4, s_hsum4(a[4], a[5], a[6], a[7]));
    }
    for (; i < n_rows; i++) y[i] = eng_cpu_dot(x, rows + i * stride, n);
}
#endif

#ifdef ENG_CPU_AVX2
/* One 32-element block dequantized into four vectors of 8 (elements in order), bit-identical to the
 * reference eng_dequant. Q4_1 is q * d + m rounded twice there; q * d is exact in f32 (a 4-bit q times
 * an 11-bit f16 significand), so one fused multiply-add rounds the same sum once and gives the same
 * bits with one instruction less. The nibbles are spread to 32-bit lanes with two in-lane byte
 * shuffles (bytes 0-3 | 4-7 and 8-11 | 12-15), low nibbles masked, high nibbles shifted down. Q8_0 is
 * q * d, one rounding either way. The f16 scales convert exactly with F16C. */
static inline void s_q4_1_block(const uint8_t *b, __m256 w[4]) {
    const __m256i spread0 = _mm256_setr_epi8(0, -1, -1, -1, 1, -1, -1, -1, 2, -1, -1, -1, 3, -1, -1, -1, 4, -1, -1, -1,
                                             5, -1, -1, -1, 6, -1, -1, -1, 7, -1, -1, -1);
    const __m256i spread1 = _mm256_setr_epi8(8, -1, -1, -1, 9, -1, -1, -1, 10, -1, -1, -1, 11, -1, -1, -1, 12, -1, -1,
                                             -1, 13, -1, -1, -1, 14, -1, -1, -1, 15, -1, -1, -1);
    const __m256i mask = _mm256_set1_epi32(0x0f);
    int32_t dm;
    memcpy(&dm, b, 4);
    __m128 dm_f = _mm_cvtph_ps(_mm_cvtsi32_si128(dm)); /* (d, m, 0, 0) */
    __m256 d = _mm256_broadcastss_ps(dm_f), m = _mm256_broadcastss_ps(_mm_movehdup_ps(dm_f));
    __m256i qs = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(b + 4)));
    __m256i q0 = _mm256_shuffle_epi8(qs, spread0), q1 = _mm256_shuffle_epi8(qs, spread1);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q0, mask)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(q1, mask)), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q0, 4)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(q1, 4)), d, m);
}

static inline void s_q8_0_block(const uint8_t *b, __m256 w[4]) {
    uint16_t dh;
    memcpy(&dh, b, 2);
    __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
    for (int j = 0; j < 4; j++) /* sign-extending loads of 8 bytes each */
        w[j] = _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * j)))), d);
}

#define S_ROW_FN(NAME, BLOCK_FN, BLOCK_BYTES)                                \
    static void NAME(const uint8_t *src, float *dst, int64_t n) {            \
        __m256 w[4];                                                         \
        for (int64_t i = 0; i < n; i += 32, src += BLOCK_BYTES, dst += 32) { \
            BLOCK_FN(src, w);                                                \
            for (int j = 0; j < 4; j++) _mm256_storeu_ps(dst + 8 * j, w[j]); \
        }                                                                    \
    }
S_ROW_FN(s_row_q4_1, s_q4_1_block, 20)
S_ROW_FN(s_row_q8_0, s_q8_0_block, 34)
#undef S_ROW_FN

/* Decode path (fewer than 3 tokens): dequantize in registers and multiply-accumulate at once, never
 * storing the f32 weights. The per-element arithmetic and the k order (32-element blocks as 4 vectors
 * of 8, in element order) are those of the tile path, so both give the same bits. Four rows at a time
 * for four independent accumulator chains, ended by one s_hsum4. */
#define S_PF_GROUPS 2
#define S_FUSED_KERNEL(NAME, BLOCK_FN, BLOCK_BYTES)                                                                   \
    static void NAME(float *y, const float *x, const uint8_t *w0, uint64_t row_bytes, int64_t n_rows, int64_t k_n) {  \
        int64_t r = 0;                                                                                                \
        for (; r + 4 <= n_rows; r += 4) {                                                                             \
            const uint8_t *b = w0 + (uint64_t)r * row_bytes, *pf = b + S_PF_GROUPS * 4 * row_bytes;                   \
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()}, w[4]; \
            for (int64_t k = 0; k < k_n; k += 32, b += BLOCK_BYTES) {                                                 \
                for (int i = 0; i < 4; i++) {                                                                         \
                    _mm_prefetch((const char *)pf + (k / 32 * 4 + i) * BLOCK_BYTES, _MM_HINT_T0);                     \
                    BLOCK_FN(b + i * row_bytes, w);                                                                   \
                    for (int j = 0; j < 4; j++) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * j), w[j], a[i]);   \
                }                                                                                                     \
            }                                                                                                         \
            _mm_storeu_ps(y + r, s_hsum4(a[0], a[1], a[2], a[3]));                                                    \
        }                                                                                                             \
        for (; r < n_rows; r++) {                                                                                     \
            const uint8_t *b = w0 + (uint64_t)r * row_bytes;                                                          \
            __m256 a0 = _mm256_setzero_ps(), w[4];                                                                    \
            for (int64_t k = 0; k < k_n; k += 32, b += BLOCK_BYTES) {                                                 \
                BLOCK_FN(b, w);                                                                                       \
                for (int j = 0; j < 4; j++) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8 * j), w[j], a0);           \
            }                                                                                                         \
            y[r] = s_hsum(a0);                                                                                        \
        }                                                                                                             \
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
/* n_t tokens (1..3) x 4 rows: the register-blocked core of the matmul. 3 x 4 keeps 12 accumulators,
 * 3 token vectors and one weight vector in the 16 registers: 12 fused multiply-adds per 7 loads, and
 * 12 independent chains, enough to cover the FMA latency. Each output uses the lane order of
 * eng_cpu_dot and ends in s_hsum4, so blocking changes speed, never bits. Inlined with a constant n_t. */
static inline __attribute__((always_inline)) void s_kernel_x4(float *y, int64_t ldy, const float *x, int64_t ldx,
                                                              const float *w, int64_t k_n, int n_t) {
    __m256 a[3][4];
    for (int t = 0; t < n_t; t++)
        for (int r = 0; r < 4; r++) a[t][r] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_n; k += 8) {
        __m256 xv[3];
        for (int t = 0; t < n_t; t++) xv[t] = _mm256_loadu_ps(x + t * ldx + k);
        for (int r = 0; r < 4; r++) {
            __m256 v = _mm256_loadu_ps(w + r * k_n + k);
            for (int t = 0; t < n_t; t++) a[t][r] = _mm256_fmadd_ps(xv[t], v, a[t][r]);
        }
    }
    for (int t = 0; t < n_t; t++) _mm_storeu_ps(y + t * ldy, s_hsum4(a[t][0], a[t][1], a[t][2], a[t][3]));
}
#endif

/* y (n_tok x n_rows block) = x (n_tok x k_n) . wt (n_rows x k_n, f32)^T. */
static void s_tile(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const float *wt, int64_t n_rows,
                   int64_t k_n) {
    int64_t r4 = 0;
#ifdef ENG_CPU_AVX2
    r4 = n_rows & ~(int64_t)3;
    int64_t t = 0;
    for (; t + 3 <= n_tok; t += 3)
        for (int64_t r = 0; r < r4; r += 4) s_kernel_x4(y + t * ldy + r, ldy, x + t * ldx, ldx, wt + r * k_n, k_n, 3);
    for (int64_t r = 0; r < r4 && t < n_tok; r += 4) {
        if (n_tok - t == 2)
            s_kernel_x4(y + t * ldy + r, ldy, x + t * ldx, ldx, wt + r * k_n, k_n, 2);
        else
            s_kernel_x4(y + t * ldy + r, ldy, x + t * ldx, ldx, wt + r * k_n, k_n, 1);
    }
#endif
    for (int64_t tt = 0; tt < n_tok; tt++)
        for (int64_t r = r4; r < n_rows; r++) y[tt * ldy + r] = eng_cpu_dot(x + tt * ldx, wt + r * k_n, k_n);
}

typedef struct {
    int n;                                /* weights in this job (1..ENG_CPU_MATMUL_MAX) */
    int64_t tile_end[ENG_CPU_MATMUL_MAX]; /* tiles of weights 0..i, summed */
    float *const *y;
    const int64_t *ldy;
    const eng_weight_t *const *w;
    const float *x;
    int64_t ldx, n_tok;
    float *const *scratch;
} s_matmul_job_t;

/* One tile of ENG_CPU_TILE_ROWS rows of w. */
static void s_matmul_tile(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const eng_weight_t *w,
                          int64_t tile, float *wt) {
    const int64_t k_n = w->cols, r0 = tile * ENG_CPU_TILE_ROWS;
    const int64_t n_rows = w->rows - r0 < ENG_CPU_TILE_ROWS ? w->rows - r0 : ENG_CPU_TILE_ROWS;
    /* Tokens in chunks that stay in L2 while a tile of dequantized rows is reused across them. */
    const int64_t tok_chunk = 63; /* a multiple of the 3-token kernel */
#ifdef ENG_CPU_AVX2
    if (n_tok < 4 && (w->type == ENG_GGML_Q4_1 || w->type == ENG_GGML_Q8_0)) {
        const uint8_t *w0 = (const uint8_t *)w->data + (uint64_t)r0 * w->row_bytes;
        for (int64_t t = 0; t < n_tok; t++) {
            if (w->type == ENG_GGML_Q4_1)
                s_fused_q4_1(y + t * ldy + r0, x + t * ldx, w0, w->row_bytes, n_rows, k_n);
            else
                s_fused_q8_0(y + t * ldy + r0, x + t * ldx, w0, w->row_bytes, n_rows, k_n);
        }
        return;
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

static void s_matmul_tiles(void *arg, int64_t tile_begin, int64_t tile_end, int thread) {
    const s_matmul_job_t *j = arg;
    int i = 0;
    for (int64_t tile = tile_begin; tile < tile_end; tile++) {
        while (tile >= j->tile_end[i]) i++;
        int64_t first = i ? j->tile_end[i - 1] : 0;
        s_matmul_tile(j->y[i], j->ldy[i], j->x, j->ldx, j->n_tok, j->w[i], tile - first, j->scratch[thread]);
    }
}

void eng_cpu_matmul_n(int n, float *const *y, const int64_t *ldy, const eng_weight_t *const *w, const float *x,
                      int64_t ldx, int64_t n_tok, float *const *scratch, eng_cpu_pool_t *pool) {
    PD_ASSERT(n >= 1 && n <= ENG_CPU_MATMUL_MAX);
    s_matmul_job_t j = {.n = n, .y = y, .ldy = ldy, .w = w, .x = x, .ldx = ldx, .n_tok = n_tok, .scratch = scratch};
    int64_t n_tiles = 0;
    for (int i = 0; i < n; i++) {
        PD_ASSERT(w[i]->cols == w[0]->cols);
        n_tiles += (w[i]->rows + ENG_CPU_TILE_ROWS - 1) / ENG_CPU_TILE_ROWS;
        j.tile_end[i] = n_tiles;
    }
    if (!pool) {
        s_matmul_tiles(&j, 0, n_tiles, 0);
        return;
    }
    /* about 4 chunks per thread: enough to balance, few enough to keep hand-offs cheap */
    int64_t grain = n_tiles / (4 * eng_cpu_pool_n_threads(pool));
    eng_cpu_pool_run(pool, n_tiles, grain > 0 ? grain : 1, s_matmul_tiles, &j);
}

void eng_cpu_matmul(float *y, int64_t ldy, const float *x, int64_t ldx, int64_t n_tok, const eng_weight_t *w,
                    float *const *scratch, eng_cpu_pool_t *pool) {
    eng_cpu_matmul_n(1, &y, &ldy, &w, x, ldx, n_tok, scratch, pool);
}

void eng_cpu_dot_rows(float *y, const float *x, const float *rows, int64_t stride, int64_t n_rows, int64_t n) {
#ifdef ENG_CPU_AVX2
    s_dot_rows(y, x, rows, stride, n_rows, n);
#else
    for (int64_t i = 0; i < n_rows; i++) y[i] = eng_cpu_dot(x, rows + i * stride, n);
#endif
}

void eng_cpu_axpy_rows(float *y, const float *p, const float *rows, int64_t stride, int64_t n_rows, int64_t n) {
    int64_t k = 0;
#ifdef ENG_CPU_AVX2
    for (; k + 32 <= n; k += 32) { /* four independent add chains */
        __m256 a[4];
        for (int u = 0; u < 4; u++) a[u] = _mm256_loadu_ps(y + k + 8 * u);
        for (int64_t i = 0; i < n_rows; i++) {
            __m256 pi = _mm256_set1_ps(p[i]);
            for (int u = 0; u < 4; u++)
                a[u] = _mm256_add_ps(a[u], _mm256_mul_ps(pi, _mm256_loadu_ps(rows + i * stride + k + 8 * u)));
        }
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(y + k + 8 * u, a[u]);
    }
#endif
    for (; k < n; k += 8) {
#ifdef ENG_CPU_AVX2
        __m256 acc = _mm256_loadu_ps(y + k);
        for (int64_t i = 0; i < n_rows; i++)
            acc = _mm256_add_ps(acc, _mm256_mul_ps(_mm256_set1_ps(p[i]), _mm256_loadu_ps(rows + i * stride + k)));
        _mm256_storeu_ps(y + k, acc);
#else
        for (int64_t i = 0; i < n_rows; i++)
            for (int64_t j = k; j < k + 8; j++) y[j] += p[i] * rows[i * stride + j];
#endif
    }
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
