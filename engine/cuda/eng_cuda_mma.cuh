/* eng_cuda_mma.cuh: the tensor-core building blocks the attention kernels share (private to engine/cuda/):
 * mma.sync m16n8k16 on f16 (the KV pool's eng_cuda_kv_t) with f32 accumulation, ldmatrix, cp.async and hi + lo f16
 * splitting.
 *
 * Fragment layouts (PTX ISA, mma.m16n8k16): lane = 4 * gq + tq. A (16 x 16): reg 0 = (row gq, cols 2tq, 2tq + 1),
 * reg 1 = row gq + 8, reg 2 = cols + 8, reg 3 = both. B (16 x 8): reg 0 = (rows 2tq, 2tq + 1, col gq), reg 1 =
 * rows + 8. C (16 x 8, f32): c0, c1 = (row gq, cols 2tq, 2tq + 1), c2, c3 = row gq + 8. */
#ifndef ENG_CUDA_MMA_CUH
#define ENG_CUDA_MMA_CUH

#include <cuda_fp16.h>
#include <stdint.h>

#include "eng_cuda_ops.cuh"

static __device__ __forceinline__ void s_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Four 8x8 b16 matrices from shared memory at byte address addr (a shared-window address). */
static __device__ __forceinline__ void s_ldsm_x4_at(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

static __device__ __forceinline__ void s_ldsm_x4(uint32_t r[4], const eng_cuda_kv_t *p) {
    s_ldsm_x4_at(r, (uint32_t)__cvta_generic_to_shared(p));
}

static __device__ __forceinline__ void s_ldsm_x4_trans(uint32_t r[4], const eng_cuda_kv_t *p) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

/* The B fragments of 16 keys (K rows at k_rows, LD elements apart) over dims [d0, d0 + 16): b[0], b[1] for keys 0-7,
 * b[2], b[3] for keys 8-15 (S = Q K^T). */
template <int LD>
static __device__ __forceinline__ void s_ldsm_k16(uint32_t b[4], const eng_cuda_kv_t *k_rows, int d0, int lane) {
    s_ldsm_x4(b, k_rows + ((lane & 7) + ((lane >> 4) & 1) * 8) * LD + d0 + ((lane >> 3) & 1) * 8);
}

/* The B fragments of 16 keys' V rows (at v_rows) over output dims [n0, n0 + 16), transposed: b[0], b[1] for dims
 * n0..n0 + 7, b[2], b[3] for the next 8 (O += P V). */
template <int LD>
static __device__ __forceinline__ void s_ldsm_v16(uint32_t b[4], const eng_cuda_kv_t *v_rows, int n0, int lane) {
    s_ldsm_x4_trans(b, v_rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * LD + n0 + ((lane >> 4) & 1) * 8);
}

/* 16 bytes global -> shared, asynchronously; n_src 0 writes zeros (keys past the sequence's end). */
static __device__ __forceinline__ void s_cp_async16(eng_cuda_kv_t *dst, const eng_cuda_kv_t *src, int n_src) {
    const uint32_t addr = (uint32_t)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(addr), "l"(src), "r"(n_src));
}

static __device__ __forceinline__ uint32_t s_pack(float lo_col, float hi_col) {
    __half2 v = __floats2half2_rn(lo_col, hi_col); /* .x (low half) = the lower column */
    return *(uint32_t *)&v;
}

static __device__ __forceinline__ float s_sat(float x) {
    return fminf(fmaxf(x, -65504.0f), 65504.0f);
}

/* x as hi + lo f16 pairs: hi = f16(x), lo = f16(x - hi): 22 significant bits, about f32's 24 (a lo under f16's
 * normal range, 6e-5, keeps an absolute error of 3e-8). |x| must be finite and under 65504. */
static __device__ __forceinline__ void s_split(float x0, float x1, uint32_t *hi, uint32_t *lo) {
    __half2 h = __floats2half2_rn(x0, x1);
    *hi = *(uint32_t *)&h;
    *lo = s_pack(x0 - __half2float(h.x), x1 - __half2float(h.y));
}

/* This lane's two query rows (f32, rows gq and gq + 8 of an m16 tile; tq = lane % 4) as A fragments over HD
 * dims, scaled by qs and split hi + lo (saturated to f16's range first: a query that large is broken anyway, and
 * an infinity would turn every score of its row into NaN). */
template <int HD>
static __device__ __forceinline__ void s_load_q(const float *q_r0, const float *q_r1, int tq, float qs,
                                                uint32_t (&q_hi)[HD / 16][4], uint32_t (&q_lo)[HD / 16][4]) {
#pragma unroll
    for (int d = 0; d < HD / 16; d++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int col = d * 16 + half * 8 + 2 * tq;
            const float2 v0 = *(const float2 *)(q_r0 + col), v1 = *(const float2 *)(q_r1 + col);
            s_split(s_sat(v0.x * qs), s_sat(v0.y * qs), &q_hi[d][2 * half], &q_lo[d][2 * half]);
            s_split(s_sat(v1.x * qs), s_sat(v1.y * qs), &q_hi[d][2 * half + 1], &q_lo[d][2 * half + 1]);
        }
    }
}

/* Scores of 16 keys: s0 (keys 0-7) and s1 (keys 8-15) += Q K^T, K the 16 rows at k_rows of a stage ((HD + 8)
 * elements apart), one ldmatrix.x4 per 16 dims giving both n-tiles' B fragments; Q as hi + lo, two MMAs a product.
 * LO_APART: the lo products go to accumulators of their own, added at the end: four chains of HD / 16 dependent MMAs
 * instead of two of HD / 8. The decode kernel (two blocks of four warps per SM: two warps per scheduler) cannot hide
 * the longer chains; Nsight Compute put a third of its stall cycles on fixed-latency dependencies (8B, batch 64). */
template <int HD, bool LO_APART = false>
static __device__ __forceinline__ void s_qk16(float s0[4], float s1[4], const uint32_t (&q_hi)[HD / 16][4],
                                              const uint32_t (&q_lo)[HD / 16][4], const eng_cuda_kv_t *k_rows,
                                              int lane) {
    constexpr int LD = HD + 8;
    float t0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, t1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float *lo0 = LO_APART ? t0 : s0, *lo1 = LO_APART ? t1 : s1;
#pragma unroll
    for (int d = 0; d < HD / 16; d++) {
        uint32_t b[4];
        s_ldsm_k16<LD>(b, k_rows, d * 16, lane);
        s_mma(lo0, q_lo[d], b[0], b[1]);
        s_mma(s0, q_hi[d], b[0], b[1]);
        s_mma(lo1, q_lo[d], b[2], b[3]);
        s_mma(s1, q_hi[d], b[2], b[3]);
    }
    if (LO_APART)
#pragma unroll
        for (int e = 0; e < 4; e++) s0[e] += t0[e], s1[e] += t1[e];
}

/* O += P V over 16 keys: P's A fragment (hi + lo) from two score n-tiles, V the 16 rows at
 * v_rows of a stage, its B fragments by ldmatrix.trans. */
template <int HD>
static __device__ __forceinline__ void s_pv16(float (&o)[HD / 8][4], const uint32_t p_hi[4], const uint32_t p_lo[4],
                                              const eng_cuda_kv_t *v_rows, int lane) {
    constexpr int LD = HD + 8;
#pragma unroll
    for (int np = 0; np < HD / 16; np++) {
        uint32_t b[4];
        s_ldsm_v16<LD>(b, v_rows, np * 16, lane);
        s_mma(o[2 * np], p_lo, b[0], b[1]);
        s_mma(o[2 * np], p_hi, b[0], b[1]);
        s_mma(o[2 * np + 1], p_lo, b[2], b[3]);
        s_mma(o[2 * np + 1], p_hi, b[2], b[3]);
    }
}

/* KEYS keys of KV head g from k0 on (of the sequence whose block table is `table`) into one shared-memory stage: K
 * then V, (KEYS, HD + 8) f16 each (the 8 padding elements put the 8 rows of each ldmatrix on distinct banks). Keys
 * past pos_max are zeros. One cp.async group. Each thread copies one 16-byte column of every (blockDim.x / (HD / 8))-th
 * key, tracking block and slot incrementally: one division per call, not one per copy (address arithmetic was
 * about half the prefill kernel's instructions). */
template <int HD, int KEYS>
static __device__ __forceinline__ void s_load_keys(eng_cuda_kv_t *stage, const eng_cuda_att_t &a,
                                                   const eng_cuda_tokens_t &tk, const int32_t *table, int32_t k0,
                                                   int32_t pos_max, int32_t g) {
    constexpr int LD = HD + 8, VEC = HD / 8;
    const int32_t vec = threadIdx.x % VEC, step = blockDim.x / VEC, bs = tk.block_size;
    const size_t kv_dim = (size_t)a.n_kv_heads * HD, chunk = (size_t)bs * kv_dim;
    const eng_cuda_kv_t *k_base = a.kv_pool + (size_t)a.layer * 2u * tk.n_blocks * chunk + g * HD + vec * 8;
    const eng_cuda_kv_t *v_base = k_base + (size_t)tk.n_blocks * chunk;
    int32_t key = threadIdx.x / VEC, bi = (k0 + key) / bs, slot = (k0 + key) - bi * bs;
    for (; key < KEYS; key += step) {
        const bool is_valid = k0 + key <= pos_max;
        const size_t off = is_valid ? (size_t)table[bi] * chunk + (size_t)slot * kv_dim : 0;
        s_cp_async16(stage + key * LD + vec * 8, k_base + off, is_valid ? 16 : 0);
        s_cp_async16(stage + KEYS * LD + key * LD + vec * 8, v_base + off, is_valid ? 16 : 0);
        for (slot += step; slot >= bs; slot -= bs) bi++;
    }
    asm volatile("cp.async.commit_group;\n" ::);
}

/* 2^x by the SFU alone (ex2.approx.ftz: exp2f adds range handling for results under f32's normal range, which only
 * ever meet softmax weights that are 0 to f32 anyway). */
static __device__ __forceinline__ float s_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#endif
