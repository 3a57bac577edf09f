/* eng_cuda_attn_mma.cu: causal attention for prefill chunks on tensor cores, flash-attention 2 style with the
 * operands in registers (mma.sync m16n8k16, f16 in, f32 accumulate), over the paged f16 KV pool. Tiles are up to
 * ENG_CUDA_TC_ROWS = 128 consecutive tokens of one sequence; one thread block per (tile, query head). Keys come 64 at
 * a time from the paged cache into shared memory with cp.async, two stages, so the next stage's loads overlap this
 * one's math; each stage serves all 128 rows of the tile (with 64-row tiles the K/V traffic from L2 was twice as
 * large). The scores' accumulator layout is the A-operand layout of the P.V product, so P never touches shared
 * memory. The scale 1/sqrt(head_dim) and log2(e) are folded into Q so the softmax runs on exp2.
 *
 * Two kernels, by precision (eng_cuda_att_t.mma_terms):
 *   - k_attention_fa (mma_terms = 1, the default): Q and P as one f16 term each (11 significant bits, 2^-12
 *     relative rounding). 4 warps of 32 rows (two m16 tiles, so every K or V fragment read from shared memory feeds
 *     two MMAs), Q in shared memory, two blocks per SM.
 *   - k_attention_mma (mma_terms = 2, ENG_CUDA_ATTN_TERMS=2): Q and P as two terms, hi + lo (22 bits, near f32), at
 *     twice the MMAs. 8 warps of 16 rows, Q fragments in registers.
 * A real model's attention sinks make scores of tens, where bf16's 8 bits moved attention weights by tens of
 * percent (SmolLM2: batched vs alone 16% apart); one f16 term errs 8x less, about as much as the f16 rounding of the
 * stored keys themselves, and passes the golden test against HF. K and V enter as stored. */
#include "eng_cuda_mma.cuh"
#include "eng_cuda_ops.cuh"

#include <math.h>

#define S_KEYS    64                           /* keys per shared-memory stage */
#define S_THREADS (ENG_CUDA_TC_ROWS / 16 * 32) /* a warp per 16 rows */

/* Stage it of the two-stage ring, ready to read: loads stage it + 1 into the other half (when there is one), waits
 * for stage it's copies and for every thread's (so also for the previous stage's readers before its refill). */
template <int HD>
static __device__ __forceinline__ const eng_cuda_kv_t *
s_stage_ready(eng_cuda_kv_t *stages, const eng_cuda_att_t &a, const eng_cuda_tokens_t &tk, const int32_t *table,
              int32_t it, int32_t n_key_tiles, int32_t pos_max, int32_t g) {
    constexpr int STAGE = 2 * S_KEYS * (HD + 8);
    if (it + 1 < n_key_tiles) {
        s_load_keys<HD, S_KEYS>(stages + ((it + 1) & 1) * STAGE, a, tk, table, (it + 1) * S_KEYS, pos_max, g);
        asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
        asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    return stages + (it & 1) * STAGE;
}

/* Fragment layouts: eng_cuda_mma.cuh. */
template <int HD>
static __global__ void __launch_bounds__(S_THREADS)
    k_attention_mma(const eng_cuda_att_t a, const eng_cuda_tokens_t tk) {
    constexpr int LD = HD + 8;
    extern __shared__ __align__(128) unsigned char mma_smem[];
    eng_cuda_kv_t *stages = (eng_cuda_kv_t *)mma_smem;
    const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;

    s_pdl_begin(); /* Q and this layer's new K/V are earlier kernels' (PDL: eng_cuda_ops.cuh) */
    /* the longest tiles (last in a sequence) first, so the short ones fill the tail of the grid */
    const eng_cuda_tile_t tile = a.tc_tiles[gridDim.x - 1 - blockIdx.x];
    const int32_t h = blockIdx.y, g = h / (a.n_heads / a.n_kv_heads), q_dim = a.n_heads * HD;
    const int32_t *table = tk.tables + tk.tok_table[tile.t0];
    const int32_t pos_max = tk.tok_pos[tile.t0 + tile.n - 1], n_key_tiles = pos_max / S_KEYS + 1;

    const int32_t r0 = warp * 16 + gq, r1 = r0 + 8; /* this lane's two rows of the tile */
    const bool is_warp_active = warp * 16 < tile.n;
    const int32_t pos0 = r0 < tile.n ? tk.tok_pos[tile.t0 + r0] : pos_max;
    const int32_t pos1 = r1 < tile.n ? tk.tok_pos[tile.t0 + r1] : pos_max;
    const int32_t warp_pos_min = is_warp_active ? tk.tok_pos[tile.t0 + warp * 16] : 0;
    const int32_t warp_pos_max = is_warp_active ? tk.tok_pos[tile.t0 + min(warp * 16 + 15, tile.n - 1)] : -1;

    s_load_keys<HD, S_KEYS>(stages, a, tk, table, 0, pos_max, g);

    /* Q fragments straight from global memory (f32), scaled, split hi + lo; padding rows repeat the last row */
    uint32_t q_hi[HD / 16][4], q_lo[HD / 16][4];
    {
        const float qs = rsqrtf((float)HD) * 1.44269504088896341f;
        const float *q_r0 = a.q + (int64_t)(tile.t0 + min(r0, tile.n - 1)) * q_dim + h * HD;
        const float *q_r1 = a.q + (int64_t)(tile.t0 + min(r1, tile.n - 1)) * q_dim + h * HD;
        s_load_q<HD>(q_r0, q_r1, tq, qs, q_hi, q_lo);
    }

    float o[HD / 8][4];
#pragma unroll
    for (int n = 0; n < HD / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f; /* running max (log2 units) and partial sums */

    for (int32_t it = 0; it < n_key_tiles; it++) {
        const int32_t k0 = it * S_KEYS;
        const eng_cuda_kv_t *k_s = s_stage_ready<HD>(stages, a, tk, table, it, n_key_tiles, pos_max, g),
                            *v_s = k_s + S_KEYS * LD;
        if (is_warp_active && k0 <= warp_pos_max) {
            /* S = Q K^T: 8 key n-tiles of 8, 16 keys at a time (each score still sums its d steps in order) */
            float s[S_KEYS / 8][4];
#pragma unroll
            for (int j = 0; j < S_KEYS / 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int np = 0; np < S_KEYS / 16; np++)
                s_qk16<HD>(s[2 * np], s[2 * np + 1], q_hi, q_lo, k_s + np * 16 * LD, lane);
            if (k0 + S_KEYS - 1 > warp_pos_min) { /* the causal edge crosses this tile */
#pragma unroll
                for (int j = 0; j < S_KEYS / 8; j++) {
#pragma unroll
                    for (int e = 0; e < 2; e++) {
                        const int32_t key = k0 + 8 * j + 2 * tq + e;
                        if (key > pos0) s[j][e] = -INFINITY;
                        if (key > pos1) s[j][2 + e] = -INFINITY;
                    }
                }
            }
            /* online softmax: the four lanes of a row group hold its 64 scores between them */
            float mx0 = m0, mx1 = m1;
#pragma unroll
            for (int j = 0; j < S_KEYS / 8; j++) {
                mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
                mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
            }
#pragma unroll
            for (int x = 1; x <= 2; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            /* key 0 is in every row's range, so after the first tile the maxima are finite */
            const float c0 = exp2f(m0 - mx0), c1 = exp2f(m1 - mx1);
            m0 = mx0, m1 = mx1, l0 *= c0, l1 *= c1;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) o[n][0] *= c0, o[n][1] *= c0, o[n][2] *= c1, o[n][3] *= c1;

                /* O += P V, 16 keys per step: P's A fragment is two score n-tiles; V's B fragments by ldmatrix.trans */
#pragma unroll
            for (int kk = 0; kk < S_KEYS / 16; kk++) {
                uint32_t p_hi[4], p_lo[4];
#pragma unroll
                for (int jj = 0; jj < 2; jj++) {
                    const float *sv = s[2 * kk + jj];
                    const float p00 = exp2f(sv[0] - m0), p01 = exp2f(sv[1] - m0);
                    const float p10 = exp2f(sv[2] - m1), p11 = exp2f(sv[3] - m1);
                    l0 += p00 + p01, l1 += p10 + p11;
                    s_split(p00, p01, &p_hi[2 * jj], &p_lo[2 * jj]);
                    s_split(p10, p11, &p_hi[2 * jj + 1], &p_lo[2 * jj + 1]);
                }
                s_pv16<HD>(o, p_hi, p_lo, v_s + kk * 16 * LD, lane);
            }
        }
        __syncthreads(); /* this stage is consumed before the next iteration's loads overwrite it */
    }
    if (!is_warp_active) return;
#pragma unroll
    for (int x = 1; x <= 2; x <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, x);
        l1 += __shfl_xor_sync(0xffffffffu, l1, x);
    }
    const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
    __nv_bfloat16 *out0 = a.att + (int64_t)(tile.t0 + r0) * q_dim + h * HD;
    __nv_bfloat16 *out1 = a.att + (int64_t)(tile.t0 + r1) * q_dim + h * HD;
#pragma unroll
    for (int n = 0; n < HD / 8; n++) {
        if (r0 < tile.n)
            *(__nv_bfloat162 *)(out0 + n * 8 + 2 * tq) = __floats2bfloat162_rn(o[n][0] * inv0, o[n][1] * inv0);
        if (r1 < tile.n)
            *(__nv_bfloat162 *)(out1 + n * 8 + 2 * tq) = __floats2bfloat162_rn(o[n][2] * inv1, o[n][3] * inv1);
    }
}

/* One term: each warp on 32 rows (two m16 tiles), flash-attention 2's layout, Q (f16) in shared memory. Every K or
 * V fragment loaded from shared memory feeds two MMAs, half the ldmatrix traffic per product of 16-row warps; the
 * block (128 threads, 104 KB of shared memory at head_dim 128) leaves room for two per SM, so one's softmax and
 * barriers overlap the other's MMAs. It is latency-bound (8 warps per SM, ~255 registers each). */
template <int HD>
static __global__ void __launch_bounds__(128, 2) k_attention_fa(const eng_cuda_att_t a, const eng_cuda_tokens_t tk) {
    constexpr int LD = HD + 8, ROWS = ENG_CUDA_TC_ROWS, RPW = ROWS / 4;
    extern __shared__ __align__(128) unsigned char fa_smem[];
    eng_cuda_kv_t *q_s = (eng_cuda_kv_t *)fa_smem, *stages = q_s + ROWS * LD;
    const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;

    s_pdl_begin();                                                       /* as k_attention_mma */
    const eng_cuda_tile_t tile = a.tc_tiles[gridDim.x - 1 - blockIdx.x]; /* longest first, as above */
    const int32_t h = blockIdx.y, g = h / (a.n_heads / a.n_kv_heads), q_dim = a.n_heads * HD;
    const int32_t *table = tk.tables + tk.tok_table[tile.t0];
    const int32_t pos_max = tk.tok_pos[tile.t0 + tile.n - 1], n_key_tiles = pos_max / S_KEYS + 1;

    /* A tile's tokens sit at consecutive positions, so row r is at pos_first + r (padding rows: as the last). This
     * lane's four rows are warp * 32 + 16 mt + 8 e2 + gq for m16 tile mt and half e2. */
    const int32_t pos_first = pos_max - (tile.n - 1);
    const bool is_warp_active = warp * RPW < tile.n;
    const int32_t warp_pos_min = pos_first + warp * RPW, warp_pos_max = pos_first + min(warp * RPW + RPW, tile.n) - 1;

    s_load_keys<HD, S_KEYS>(stages, a, tk, table, 0, pos_max, g);
    { /* Q (f32) scaled into f16 rows of q_s; padding rows repeat the last row (first iteration's barrier publishes) */
        const float qs = rsqrtf((float)HD) * 1.44269504088896341f;
        for (int32_t i = threadIdx.x; i < ROWS * HD / 2; i += blockDim.x) {
            const int32_t r = i / (HD / 2), c = 2 * (i % (HD / 2));
            const float2 v = *(const float2 *)(a.q + (int64_t)(tile.t0 + min(r, tile.n - 1)) * q_dim + h * HD + c);
            *(__half2 *)(q_s + r * LD + c) = __floats2half2_rn(s_sat(v.x * qs), s_sat(v.y * qs));
        }
    }

    float o[2][HD / 8][4], m[2][2], l[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; mt++) {
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
    }
    const eng_cuda_kv_t *q_w = q_s + (warp * RPW + (lane & 15)) * LD + (lane >> 4) * 8; /* A fragments' rows */

    for (int32_t it = 0; it < n_key_tiles; it++) {
        const int32_t k0 = it * S_KEYS;
        const eng_cuda_kv_t *k_s = s_stage_ready<HD>(stages, a, tk, table, it, n_key_tiles, pos_max, g),
                            *v_s = k_s + S_KEYS * LD;
        if (is_warp_active && k0 <= warp_pos_max) {
            /* S = Q K^T: per 16 dims, both tiles' A fragments, then each 16-key B fragment feeds both */
            float s[2][S_KEYS / 8][4];
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int j = 0; j < S_KEYS / 8; j++) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.0f;
#pragma unroll
            for (int d = 0; d < HD / 16; d++) {
                uint32_t qa[2][4];
                s_ldsm_x4(qa[0], q_w + d * 16);
                s_ldsm_x4(qa[1], q_w + 16 * LD + d * 16);
#pragma unroll
                for (int np = 0; np < S_KEYS / 16; np++) {
                    uint32_t b[4];
                    s_ldsm_k16<LD>(b, k_s + np * 16 * LD, d * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        s_mma(s[mt][2 * np], qa[mt], b[0], b[1]);
                        s_mma(s[mt][2 * np + 1], qa[mt], b[2], b[3]);
                    }
                }
            }
            if (k0 + S_KEYS - 1 > warp_pos_min) { /* the causal edge crosses this stage */
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int j = 0; j < S_KEYS / 8; j++)
#pragma unroll
                        for (int e = 0; e < 4; e++)
                            if (k0 + 8 * j + 2 * tq + (e & 1) >
                                pos_first + min(warp * RPW + mt * 16 + (e >> 1) * 8 + gq, tile.n - 1))
                                s[mt][j][e] = -INFINITY;
            }
            /* online softmax per row; the four lanes of a row group hold its 64 scores between them */
#pragma unroll
            for (int mt = 0; mt < 2; mt++)
#pragma unroll
                for (int e2 = 0; e2 < 2; e2++) {
                    float mx = m[mt][e2];
#pragma unroll
                    for (int j = 0; j < S_KEYS / 8; j++) mx = fmaxf(mx, fmaxf(s[mt][j][2 * e2], s[mt][j][2 * e2 + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                    const float c = s_exp2(m[mt][e2] - mx); /* key 0 is in every row's range: finite after stage 0 */
                    m[mt][e2] = mx, l[mt][e2] *= c;
#pragma unroll
                    for (int n = 0; n < HD / 8; n++) o[mt][n][2 * e2] *= c, o[mt][n][2 * e2 + 1] *= c;
                }
                /* O += P V, 16 keys per step: P's A fragments from two score n-tiles per m16 tile, V's B fragments by
             * ldmatrix.trans, each feeding both tiles */
#pragma unroll
            for (int kk = 0; kk < S_KEYS / 16; kk++) {
                uint32_t pa[2][4];
#pragma unroll
                for (int mt = 0; mt < 2; mt++)
#pragma unroll
                    for (int jj = 0; jj < 2; jj++) {
                        const float *sv = s[mt][2 * kk + jj];
                        const float p00 = s_exp2(sv[0] - m[mt][0]), p01 = s_exp2(sv[1] - m[mt][0]);
                        const float p10 = s_exp2(sv[2] - m[mt][1]), p11 = s_exp2(sv[3] - m[mt][1]);
                        l[mt][0] += p00 + p01, l[mt][1] += p10 + p11;
                        pa[mt][2 * jj] = s_pack(p00, p01), pa[mt][2 * jj + 1] = s_pack(p10, p11);
                    }
#pragma unroll
                for (int np = 0; np < HD / 16; np++) {
                    uint32_t b[4];
                    s_ldsm_v16<LD>(b, v_s + kk * 16 * LD, np * 16, lane);
#pragma unroll
                    for (int mt = 0; mt < 2; mt++) {
                        s_mma(o[mt][2 * np], pa[mt], b[0], b[1]);
                        s_mma(o[mt][2 * np + 1], pa[mt], b[2], b[3]);
                    }
                }
            }
        }
        __syncthreads(); /* this stage is consumed before the next iteration's loads overwrite it */
    }
    if (!is_warp_active) return;
#pragma unroll
    for (int mt = 0; mt < 2; mt++)
#pragma unroll
        for (int e2 = 0; e2 < 2; e2++) {
            float sum = l[mt][e2];
            sum += __shfl_xor_sync(0xffffffffu, sum, 1);
            sum += __shfl_xor_sync(0xffffffffu, sum, 2);
            const float inv = 1.0f / sum;
            const int32_t r = warp * RPW + mt * 16 + e2 * 8 + gq;
            if (r >= tile.n) continue;
            __nv_bfloat16 *out = a.att + (int64_t)(tile.t0 + r) * q_dim + h * HD;
#pragma unroll
            for (int n = 0; n < HD / 8; n++)
                *(__nv_bfloat162 *)(out + n * 8 + 2 * tq) =
                    __floats2bfloat162_rn(o[mt][n][2 * e2] * inv, o[mt][n][2 * e2 + 1] * inv);
        }
}

template <int HD>
static cudaError_t s_attention_fa(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    constexpr size_t SMEM = ((size_t)ENG_CUDA_TC_ROWS + 2u * 2u * S_KEYS) * (HD + 8) * sizeof(eng_cuda_kv_t);
    static uint64_t configured; /* the engine thread is the only caller */
    const cudaError_t err = eng_cuda_smem_once(&configured, k_attention_fa<HD>, SMEM);
    if (err != cudaSuccess) return err;
    eng_cuda_launch(k_attention_fa<HD>, dim3((unsigned)a->n_tc_tiles, (unsigned)a->n_heads), 128, SMEM, st, *a, *tk);
    return cudaGetLastError();
}

template <int HD>
static cudaError_t s_attention_mma(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    constexpr size_t SMEM = 2u * 2u * S_KEYS * (HD + 8) * sizeof(eng_cuda_kv_t);
    static uint64_t configured; /* the engine thread is the only caller */
    const cudaError_t err = eng_cuda_smem_once(&configured, k_attention_mma<HD>, SMEM);
    if (err != cudaSuccess) return err;
    eng_cuda_launch(k_attention_mma<HD>, dim3((unsigned)a->n_tc_tiles, (unsigned)a->n_heads), S_THREADS, SMEM, st, *a,
                    *tk);
    return cudaGetLastError();
}

cudaError_t eng_cuda_attention_mma(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    switch (a->head_dim) {
    case 64: return a->mma_terms == 2 ? s_attention_mma<64>(a, tk, st) : s_attention_fa<64>(a, tk, st);
    case 128: return a->mma_terms == 2 ? s_attention_mma<128>(a, tk, st) : s_attention_fa<128>(a, tk, st);
    default: return cudaErrorInvalidValue;
    }
}
