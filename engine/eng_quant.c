/* eng_quant.c: GGML type size table and reference dequantization to float32, written from the block
 * layouts in ggml-common.h and checked bit for bit against gguf-py (tests/golden/quant/).
 * Plain scalar C on purpose: no SIMD, no quantization (we only read models), no dot products yet. Whole matrices to
 * bf16 (the GPU upload) split their rows over threads instead. */
#include "eng_quant.h"

#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

/* Bit-exactness with ggml needs "x * d + m" to round twice, as ggml's C reference does. GCC keeps
 * products and sums separate in ISO C mode (-std=c11 implies -ffp-contract=off); clang contracts them
 * into FMAs unless told not to. */
#ifdef __clang__
#pragma STDC FP_CONTRACT OFF
#endif

#define S_QK_K 256 /* elements per K-quant super-block */

typedef struct {
    const char *name;
    uint32_t block_elems;
    uint32_t block_bytes;
} s_type_info_t;

/* Indexed by eng_ggml_type_t; sizes as GGML_QUANT_SIZES in gguf-py / ggml_type_traits in ggml.c.
 * Gaps (31-33, 36-38) are removed ggml types: unknown here, so the reader refuses them. */
static const s_type_info_t s_types[ENG_GGML_TYPE_COUNT] = {
    [ENG_GGML_F32] = {"F32", 1, 4},
    [ENG_GGML_F16] = {"F16", 1, 2},
    [ENG_GGML_Q4_0] = {"Q4_0", 32, 2 + 16},
    [ENG_GGML_Q4_1] = {"Q4_1", 32, 2 + 2 + 16},
    [ENG_GGML_Q5_0] = {"Q5_0", 32, 2 + 4 + 16},
    [ENG_GGML_Q5_1] = {"Q5_1", 32, 2 + 2 + 4 + 16},
    [ENG_GGML_Q8_0] = {"Q8_0", 32, 2 + 32},
    [ENG_GGML_Q8_1] = {"Q8_1", 32, 4 + 32},
    [ENG_GGML_Q2_K] = {"Q2_K", S_QK_K, 2 + 2 + S_QK_K / 16 + S_QK_K / 4},
    [ENG_GGML_Q3_K] = {"Q3_K", S_QK_K, 2 + S_QK_K / 4 + S_QK_K / 8 + 12},
    [ENG_GGML_Q4_K] = {"Q4_K", S_QK_K, 2 + 2 + 12 + S_QK_K / 2},
    [ENG_GGML_Q5_K] = {"Q5_K", S_QK_K, 2 + 2 + 12 + S_QK_K / 8 + S_QK_K / 2},
    [ENG_GGML_Q6_K] = {"Q6_K", S_QK_K, S_QK_K / 2 + S_QK_K / 4 + S_QK_K / 16 + 2},
    [ENG_GGML_Q8_K] = {"Q8_K", S_QK_K, 4 + S_QK_K + S_QK_K / 8},
    [ENG_GGML_IQ2_XXS] = {"IQ2_XXS", S_QK_K, 2 + S_QK_K / 4},
    [ENG_GGML_IQ2_XS] = {"IQ2_XS", S_QK_K, 2 + S_QK_K / 4 + S_QK_K / 32},
    [ENG_GGML_IQ3_XXS] = {"IQ3_XXS", S_QK_K, 2 + S_QK_K / 4 + S_QK_K / 8},
    [ENG_GGML_IQ1_S] = {"IQ1_S", S_QK_K, 2 + S_QK_K / 8 + S_QK_K / 16},
    [ENG_GGML_IQ4_NL] = {"IQ4_NL", 32, 2 + 16},
    [ENG_GGML_IQ3_S] = {"IQ3_S", S_QK_K, 2 + S_QK_K / 4 + S_QK_K / 8 + S_QK_K / 32 + 4},
    [ENG_GGML_IQ2_S] = {"IQ2_S", S_QK_K, 2 + S_QK_K / 4 + S_QK_K / 16},
    [ENG_GGML_IQ4_XS] = {"IQ4_XS", S_QK_K, 2 + 2 + S_QK_K / 2 + S_QK_K / 64},
    [ENG_GGML_I8] = {"I8", 1, 1},
    [ENG_GGML_I16] = {"I16", 1, 2},
    [ENG_GGML_I32] = {"I32", 1, 4},
    [ENG_GGML_I64] = {"I64", 1, 8},
    [ENG_GGML_F64] = {"F64", 1, 8},
    [ENG_GGML_IQ1_M] = {"IQ1_M", S_QK_K, S_QK_K / 8 + S_QK_K / 16 + S_QK_K / 32},
    [ENG_GGML_BF16] = {"BF16", 1, 2},
    [ENG_GGML_TQ1_0] = {"TQ1_0", S_QK_K, 2 + 4 * 13},
    [ENG_GGML_TQ2_0] = {"TQ2_0", S_QK_K, 2 + 64},
    [ENG_GGML_MXFP4] = {"MXFP4", 32, 1 + 16},
};

static const s_type_info_t *s_info(int type) {
    if (type < 0 || type >= ENG_GGML_TYPE_COUNT || s_types[type].block_elems == 0) return NULL;
    return &s_types[type];
}

const char *eng_ggml_type_name(int type) {
    const s_type_info_t *t = s_info(type);
    return t ? t->name : "?";
}

uint32_t eng_ggml_block_elems(int type) {
    const s_type_info_t *t = s_info(type);
    return t ? t->block_elems : 0;
}

uint32_t eng_ggml_block_bytes(int type) {
    const s_type_info_t *t = s_info(type);
    return t ? t->block_bytes : 0;
}

uint64_t eng_ggml_row_bytes(int type, uint64_t n) {
    const s_type_info_t *t = s_info(type);
    if (!t || n % t->block_elems != 0) return 0;
    uint64_t n_blocks = n / t->block_elems;
    if (n_blocks > UINT64_MAX / t->block_bytes) return 0;
    return n_blocks * t->block_bytes;
}

int eng_quant_supported(int type) {
    switch (type) {
    case ENG_GGML_F32:
    case ENG_GGML_F16:
    case ENG_GGML_BF16:
    case ENG_GGML_Q8_0:
    case ENG_GGML_Q4_0:
    case ENG_GGML_Q4_1:
    case ENG_GGML_Q5_0:
    case ENG_GGML_Q5_1:
    case ENG_GGML_Q4_K:
    case ENG_GGML_Q5_K:
    case ENG_GGML_Q6_K: return 1;
    default: return 0;
    }
}

/* ---- fp16 / bf16 ---- */

static float s_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t s_bits_from_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

/* Exact: every half is a float. NaN payloads are kept (shifted into the top of the float mantissa). */
float eng_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0x1f) return s_f32_from_bits(sign | 0x7f800000u | (man << 13)); /* inf, nan */
    if (exp != 0) return s_f32_from_bits(sign | ((exp + 127 - 15) << 23) | (man << 13));
    if (man == 0) return s_f32_from_bits(sign); /* +-0 */
    /* Subnormal half (man * 2^-24): normalize so the leading 1 reaches bit 10. */
    uint32_t e = 127 - 15 + 1;
    while (!(man & 0x400)) {
        man <<= 1;
        e--;
    }
    return s_f32_from_bits(sign | (e << 23) | ((man & 0x3ff) << 13));
}

/* Rounds the low `shift` bits of m away, to nearest, ties to even. */
static uint32_t s_round_shift(uint32_t m, uint32_t shift) {
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1))) q++;
    return q;
}

/* Round to nearest even (what F16C's vcvtps2ph and numpy do); overflow gives inf, NaN stays NaN (quieted,
 * top payload bits kept). A carry out of the mantissa correctly bumps the exponent. */
uint16_t eng_f32_to_f16(float f) {
    uint32_t x = s_bits_from_f32(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00 | ((ax & 0x7fffff) >> 13));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* >= 65520 rounds to inf */
    if (ax >= 0x38800000u) {                                 /* normal half: >= 2^-14 */
        uint32_t e = (ax >> 23) - 127 + 15;
        return (uint16_t)(sign | s_round_shift(((e << 23) | (ax & 0x7fffff)), 13));
    }
    if (ax <= 0x33000000u) return sign; /* <= 2^-25: rounds to zero (2^-25 is a tie, 0 is even) */
    /* Subnormal half: value / 2^-24 = m * 2^(e - 126), with the implicit bit in m. */
    uint32_t m = (ax & 0x7fffff) | 0x800000;
    uint32_t e = ax >> 23;
    return (uint16_t)(sign | s_round_shift(m, 126 - e));
}

float eng_bf16_to_f32(uint16_t h) {
    return s_f32_from_bits((uint32_t)h << 16);
}

/* As ggml_compute_fp32_to_bf16 and gguf-py: NaN becomes a quiet NaN, everything else (subnormals
 * included) rounds to nearest even; overflow rounds to inf. */
uint16_t eng_f32_to_bf16(float f) {
    uint32_t u = s_bits_from_f32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* ---- dequantization, one block at a time ---- */

static float s_f16_at(const uint8_t *p) {
    return eng_f16_to_f32((uint16_t)(p[0] | (p[1] << 8)));
}

static uint32_t s_u32_at(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* block_q8_0: f16 d; int8 qs[32]. y = q * d */
static void s_deq_q8_0(const uint8_t *b, float *y) {
    float d = s_f16_at(b);
    const int8_t *qs = (const int8_t *)(b + 2);
    for (int j = 0; j < 32; j++) y[j] = (float)qs[j] * d;
}

/* block_q4_0: f16 d; qs[16] with element j in the low nibble of qs[j], element j+16 in the high one.
 * y = (q - 8) * d */
static void s_deq_q4_0(const uint8_t *b, float *y) {
    float d = s_f16_at(b);
    const uint8_t *qs = b + 2;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)((qs[j] & 0x0f) - 8) * d;
        y[j + 16] = (float)((qs[j] >> 4) - 8) * d;
    }
}

/* block_q4_1: f16 d, f16 m; qs[16] as Q4_0. y = q * d + m */
static void s_deq_q4_1(const uint8_t *b, float *y) {
    float d = s_f16_at(b), m = s_f16_at(b + 2);
    const uint8_t *qs = b + 4;
    for (int j = 0; j < 16; j++) {
        y[j] = (float)(qs[j] & 0x0f) * d + m;
        y[j + 16] = (float)(qs[j] >> 4) * d + m;
    }
}

/* block_q5_0: f16 d; u32 qh (bit j = 5th bit of element j); qs[16] as Q4_0. y = (q - 16) * d */
static void s_deq_q5_0(const uint8_t *b, float *y) {
    float d = s_f16_at(b);
    uint32_t qh = s_u32_at(b + 2);
    const uint8_t *qs = b + 6;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = (float)(lo - 16) * d;
        y[j + 16] = (float)(hi - 16) * d;
    }
}

/* block_q5_1: f16 d, f16 m; u32 qh; qs[16]. y = q * d + m */
static void s_deq_q5_1(const uint8_t *b, float *y) {
    float d = s_f16_at(b), m = s_f16_at(b + 2);
    uint32_t qh = s_u32_at(b + 4);
    const uint8_t *qs = b + 8;
    for (int j = 0; j < 16; j++) {
        int lo = (qs[j] & 0x0f) | (int)(((qh >> j) & 1) << 4);
        int hi = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
        y[j] = (float)lo * d + m;
        y[j + 16] = (float)hi * d + m;
    }
}

/* The 12 scale bytes of Q4_K/Q5_K hold eight 6-bit scales and eight 6-bit mins (get_scale_min_k4 in
 * ggml-quants.c): entries 0-3 in the low 6 bits of bytes 0-3 (scales) and 4-7 (mins); entries 4-7 take
 * their low 4 bits from bytes 8-11 and their top 2 bits from the top of bytes 0-3 / 4-7. */
static void s_scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* block_q4_K: f16 d, f16 dmin; scales[12]; qs[128]. Eight sub-blocks of 32; each 64-element chunk
 * uses 32 bytes of qs, low nibbles for its first sub-block, high nibbles for its second.
 * y = (d * sc) * q - (dmin * m) */
static void s_deq_q4_k(const uint8_t *b, float *y) {
    float d = s_f16_at(b), dmin = s_f16_at(b + 2);
    const uint8_t *scales = b + 4;
    const uint8_t *qs = b + 16;
    for (int chunk = 0; chunk < 4; chunk++) {
        uint8_t sc, m;
        s_scale_min_k4(2 * chunk, scales, &sc, &m);
        float d1 = d * sc, m1 = dmin * m;
        s_scale_min_k4(2 * chunk + 1, scales, &sc, &m);
        float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; l++) y[l] = d1 * (float)(qs[l] & 0x0f) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)(qs[l] >> 4) - m2;
        qs += 32;
        y += 64;
    }
}

/* block_q5_K: f16 d, f16 dmin; scales[12]; qh[32]; qs[128]. As Q4_K, plus a 5th bit: bit (2*chunk) of
 * qh[l] for the chunk's first sub-block, bit (2*chunk + 1) for its second. */
static void s_deq_q5_k(const uint8_t *b, float *y) {
    float d = s_f16_at(b), dmin = s_f16_at(b + 2);
    const uint8_t *scales = b + 4;
    const uint8_t *qh = b + 16;
    const uint8_t *qs = b + 48;
    for (int chunk = 0; chunk < 4; chunk++) {
        uint8_t sc, m;
        s_scale_min_k4(2 * chunk, scales, &sc, &m);
        float d1 = d * sc, m1 = dmin * m;
        s_scale_min_k4(2 * chunk + 1, scales, &sc, &m);
        float d2 = d * sc, m2 = dmin * m;
        uint8_t u1 = (uint8_t)(1u << (2 * chunk)), u2 = (uint8_t)(2u << (2 * chunk));
        for (int l = 0; l < 32; l++) y[l] = d1 * (float)((qs[l] & 0x0f) + ((qh[l] & u1) ? 16 : 0)) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)((qs[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
        qs += 32;
        y += 64;
    }
}

/* block_q6_K: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], f16 d. Two halves of 128;
 * in each, element l + 32k (k = 0..3) takes nibble (k / 2) of ql[l + 32 (k % 2)] and bits 2k..2k+1 of
 * qh[l], and uses scale l / 16 + 2k. y = (d * sc) * (q - 32) */
static void s_deq_q6_k(const uint8_t *b, float *y) {
    const uint8_t *ql = b;
    const uint8_t *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = s_f16_at(b + 208);
    for (int half = 0; half < 2; half++) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = (int)((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = (int)((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * (float)sc[is] * (float)q1;
            y[l + 32] = d * (float)sc[is + 2] * (float)q2;
            y[l + 64] = d * (float)sc[is + 4] * (float)q3;
            y[l + 96] = d * (float)sc[is + 6] * (float)q4;
        }
        ql += 64;
        qh += 32;
        sc += 8;
        y += 128;
    }
}

typedef void (*s_deq_block_fn)(const uint8_t *block, float *y);

static s_deq_block_fn s_block_fn(int type) {
    switch (type) {
    case ENG_GGML_Q8_0: return s_deq_q8_0;
    case ENG_GGML_Q4_0: return s_deq_q4_0;
    case ENG_GGML_Q4_1: return s_deq_q4_1;
    case ENG_GGML_Q5_0: return s_deq_q5_0;
    case ENG_GGML_Q5_1: return s_deq_q5_1;
    case ENG_GGML_Q4_K: return s_deq_q4_k;
    case ENG_GGML_Q5_K: return s_deq_q5_k;
    case ENG_GGML_Q6_K: return s_deq_q6_k;
    default: return NULL;
    }
}

pd_status eng_dequant(int type, const void *src, float *dst, int64_t n) {
    if (!eng_quant_supported(type) || n < 0 || (uint64_t)n % eng_ggml_block_elems(type) != 0) return PD_EINVAL;
    const uint8_t *p = src;
    switch (type) {
    case ENG_GGML_F32: memcpy(dst, src, (size_t)n * sizeof(float)); return PD_OK;
    case ENG_GGML_F16:
        for (int64_t i = 0; i < n; i++) dst[i] = s_f16_at(p + 2 * i);
        return PD_OK;
    case ENG_GGML_BF16:
        for (int64_t i = 0; i < n; i++) dst[i] = eng_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return PD_OK;
    default: break;
    }
    s_deq_block_fn fn = s_block_fn(type);
    uint32_t block_elems = eng_ggml_block_elems(type), block_bytes = eng_ggml_block_bytes(type);
    int64_t n_blocks = n / block_elems;
    for (int64_t i = 0; i < n_blocks; i++) fn(p + i * block_bytes, dst + i * block_elems);
    return PD_OK;
}

/* ---- rows to bf16, on several threads ---- */

typedef struct {
    int type;
    const uint8_t *src;
    size_t row_bytes;
    int64_t r0, r1, cols;
    const float *col_scale;
    uint16_t *out;
    pd_status st;
} s_rows_job_t;

static void *s_rows_run(void *arg) {
    s_rows_job_t *j = arg;
    float *row = malloc(sizeof(float) * (size_t)j->cols);
    j->st = row ? PD_OK : PD_ENOMEM;
    for (int64_t r = j->r0; r < j->r1 && j->st == PD_OK; r++) {
        j->st = eng_dequant(j->type, j->src + (size_t)r * j->row_bytes, row, j->cols);
        if (j->st != PD_OK) break;
        uint16_t *o = j->out + r * j->cols;
        if (j->col_scale)
            for (int64_t c = 0; c < j->cols; c++) o[c] = eng_f32_to_bf16(row[c] * j->col_scale[c]);
        else
            for (int64_t c = 0; c < j->cols; c++) o[c] = eng_f32_to_bf16(row[c]);
    }
    free(row);
    return NULL;
}

#define S_ROWS_MAX_THREADS 64

pd_status eng_rows_to_bf16(int type, const void *src, size_t row_bytes, int64_t rows, int64_t cols,
                           const float *col_scale, uint16_t *out, int n_threads) {
    if (!eng_quant_supported(type) || rows < 0 || cols < 0 || (uint64_t)cols % eng_ggml_block_elems(type) != 0)
        return PD_EINVAL;
    if (n_threads > S_ROWS_MAX_THREADS) n_threads = S_ROWS_MAX_THREADS;
    if (n_threads > rows) n_threads = (int)rows;
    if (n_threads < 1) n_threads = 1;
    s_rows_job_t jobs[S_ROWS_MAX_THREADS];
    pthread_t tid[S_ROWS_MAX_THREADS];
    bool is_started[S_ROWS_MAX_THREADS] = {false};
    for (int i = 0; i < n_threads; i++) {
        jobs[i] = (s_rows_job_t){.type = type,
                                 .src = src,
                                 .row_bytes = row_bytes,
                                 .r0 = rows * i / n_threads,
                                 .r1 = rows * (i + 1) / n_threads,
                                 .cols = cols,
                                 .col_scale = col_scale,
                                 .out = out,
                                 .st = PD_OK};
        /* job 0 runs on the calling thread, as does any whose thread does not start */
        if (i > 0) is_started[i] = pthread_create(&tid[i], NULL, s_rows_run, &jobs[i]) == 0;
    }
    for (int i = 0; i < n_threads; i++)
        if (!is_started[i]) s_rows_run(&jobs[i]);
    pd_status st = PD_OK;
    for (int i = 0; i < n_threads; i++) {
        if (is_started[i]) pthread_join(tid[i], NULL);
        if (jobs[i].st != PD_OK && st == PD_OK) st = jobs[i].st;
    }
    return st;
}
