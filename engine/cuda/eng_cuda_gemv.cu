/* eng_cuda_gemv.cu: small-batch matrix-vector products (decode, speculative verification; contract in
 * eng_cuda_ops.cuh). At 1..8 tokens a GEMM does ~NT FMAs per weight byte, so it is bound by streaming w from HBM
 * once: the kernel is built to keep enough weight bytes in flight per SM to saturate bandwidth, and nothing else
 * (x, partial sums) touches HBM. */
#include "eng_cuda_ops.cuh"

#include <math.h>

#define GEMV_WARPS 4 /* warps per block: 128 threads, small enough that many blocks fit per SM */
#define GEMV_U     4 /* 16-byte weight chunks per row per lane per iteration, all loaded before any math */

/* A weight chunk: read once, so it goes through the non-coherent path without allocating in L1 (x's lines stay
 * there), with a 256-byte L2 prefetch hint since each warp walks its rows sequentially. */
static __device__ __forceinline__ uint4 s_ld_stream(const uint4 *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* 8 bf16 (little endian: element 2i is the low half of word i) to f32: a bf16 is the top half of an f32. */
static __device__ __forceinline__ void s_bf16x8(uint4 v, float f[8]) {
    f[0] = __uint_as_float(v.x << 16), f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16), f[3] = __uint_as_float(v.y & 0xffff0000u);
    f[4] = __uint_as_float(v.z << 16), f[5] = __uint_as_float(v.z & 0xffff0000u);
    f[6] = __uint_as_float(v.w << 16), f[7] = __uint_as_float(v.w & 0xffff0000u);
}

/* acc[r][t] += w chunk of row r . x chunk c of token t; each x chunk is converted once and reused for R rows. */
template <int NT, int R>
static __device__ __forceinline__ void s_fma_chunk(float (&acc)[R][NT], const uint4 (&wv)[R], const uint4 *x,
                                                   int64_t kc, int64_t c) {
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float xf[8];
        s_bf16x8(__ldg(x + t * kc + c), xf);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float wf[8];
            s_bf16x8(wv[r], wf);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[r][t] = fmaf(xf[j], wf[j], acc[r][t]);
        }
    }
}

/* One warp computes R consecutive output rows for all NT tokens. Lanes stride along k in 16-byte chunks, so each
 * row load of the warp is 512 contiguous bytes; per iteration a lane has R * GEMV_U independent 16-byte loads in
 * flight (R * GEMV_U * 512 bytes per warp), which with several warps per SM covers HBM latency. x (NT * k * 2
 * bytes) is re-read by every warp from L1/L2, R rows per load. */
/* What happens to the totals: stored (or added) as they are, or, for pairs of adjacent rows, fused with the kernel
 * that would otherwise follow (one launch less per layer at batch 1, where a launch costs as much as a small
 * matrix's weights): SwiGLU of an interleaved gate/up pair, or RoPE of a Q/K pair and the store of K and V into the
 * paged pool. */
enum { S_PLAIN, S_SWIGLU, S_QKV };
typedef struct {
    float *y; /* S_PLAIN: (n_tok, n_out) */
    bool is_accumulate;
    __nv_bfloat16 *h; /* S_SWIGLU: (n_tok, n_out / 2) */
    eng_cuda_qkv_dst_t qkv;
    eng_cuda_tokens_t tk; /* S_QKV */
} s_epilogue_t;

/* Rows o, o + 1 (o even) of token t: the SwiGLU of a gate/up pair, or a RoPE'd Q or K pair / a V pair. */
template <int MODE>
static __device__ __forceinline__ void s_store_pair(const s_epilogue_t &e, int64_t t, int64_t o, int32_t n_out,
                                                    float a0, float a1) {
    if constexpr (MODE == S_SWIGLU) {
        e.h[t * (n_out / 2) + o / 2] = __float2bfloat16(a0 / (1.0f + expf(-a0)) * a1);
    } else {
        const eng_cuda_qkv_dst_t &d = e.qkv;
        const eng_cuda_tokens_t &tk = e.tk;
        const int32_t hd = d.head_dim, q_dim = d.n_heads * hd, kv_dim = d.n_kv_heads * hd;
        if (d.bias) a0 += d.bias[o], a1 += d.bias[o + 1];
        const int32_t pos = tk.tok_pos[t];
        const int32_t block = tk.tables[tk.tok_table[t] + pos / tk.block_size], slot = pos % tk.block_size;
        if (o < q_dim + kv_dim) { /* Q or K: rotate the pair like k_rope_store */
            const int32_t i = (int32_t)(o % hd) / 2;
            const float c = tk.rope_cs[t * hd + 2 * i], sn = tk.rope_cs[t * hd + 2 * i + 1];
            const float y0 = a0 * c - a1 * sn, y1 = a0 * sn + a1 * c;
            if (o < q_dim) {
                d.q[t * q_dim + o] = y0, d.q[t * q_dim + o + 1] = y1;
            } else {
                __nv_bfloat16 *k_dst = d.kv_pool + s_kv_slot(tk, d.layer, 0, block, slot, kv_dim) + (o - q_dim);
                k_dst[0] = __float2bfloat16(y0), k_dst[1] = __float2bfloat16(y1);
            }
        } else {
            __nv_bfloat16 *v_dst = d.kv_pool + s_kv_slot(tk, d.layer, 1, block, slot, kv_dim) + (o - q_dim - kv_dim);
            v_dst[0] = __float2bfloat16(a0), v_dst[1] = __float2bfloat16(a1);
        }
    }
}

template <int NT, int R, int MODE>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    k_gemv(const s_epilogue_t e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_out, int32_t k) {
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * R;
    if (row0 >= n_out) return; /* the whole warp: no shuffle partner is left behind */
    const int64_t kc = k / 8;  /* 16-byte chunks per row */
    const uint4 *xv = (const uint4 *)x;
    const uint4 *wr[R];
#pragma unroll
    for (int r = 0; r < R; r++) { /* rows past n_out load the last row (in bounds) and are never stored */
        const int64_t row = row0 + r < n_out ? row0 + r : n_out - 1;
        wr[r] = (const uint4 *)(w + row * k);
    }
    float acc[R][NT];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) acc[r][t] = 0.0f;

    int64_t c = lane; /* the loop bound is the same for every lane: no divergence before the shuffles */
    for (; c - lane + 32 * GEMV_U <= kc; c += 32 * GEMV_U) {
        uint4 wv[GEMV_U][R];
#pragma unroll
        for (int u = 0; u < GEMV_U; u++)
#pragma unroll
            for (int r = 0; r < R; r++) wv[u][r] = s_ld_stream(wr[r] + c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_U; u++) s_fma_chunk<NT, R>(acc, wv[u], xv, kc, c + 32 * u);
    }
    for (; c < kc; c += 32) { /* the rest: fewer than 32 * GEMV_U chunks */
        uint4 wv[R];
#pragma unroll
        for (int r = 0; r < R; r++) wv[r] = s_ld_stream(wr[r] + c);
        s_fma_chunk<NT, R>(acc, wv, xv, kc, c);
    }

    /* Butterfly sums leave every lane with every total; lane i stores total i (register indices stay static). */
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
            if (MODE == S_PLAIN && lane == r * NT + t && row0 + r < n_out) {
                float *dst = e.y + (int64_t)t * n_out + row0 + r;
                *dst = e.is_accumulate ? *dst + acc[r][t] : acc[r][t];
            }
        }
    if constexpr (MODE != S_PLAIN) { /* R is even and n_out too: rows come in whole pairs */
#pragma unroll
        for (int p = 0; p < R / 2; p++)
#pragma unroll
            for (int t = 0; t < NT; t++)
                if (lane == p * NT + t && row0 + 2 * p < n_out)
                    s_store_pair<MODE>(e, t, row0 + 2 * p, n_out, acc[2 * p][t], acc[2 * p + 1][t]);
    }
}

/* Fewer rows per warp at 1..2 tokens keeps more warps in flight for small n_out; more at 3..8 reuses each x load
 * for 4 rows, keeping L1 traffic and instruction count per weight byte down. */
template <int NT, int MODE>
static void s_launch(const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_out, int32_t k,
                     cudaStream_t st) {
    constexpr int R = NT <= 2 ? 2 : 4;
    const unsigned n_blocks = (unsigned)((n_out + GEMV_WARPS * R - 1) / (GEMV_WARPS * R));
    k_gemv<NT, R, MODE><<<n_blocks, GEMV_WARPS * 32, 0, st>>>(e, x, w, n_out, k);
}

template <int MODE>
static bool s_gemv(const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out,
                   int32_t k, cudaStream_t st) {
    if (n_tok < 1 || n_tok > ENG_CUDA_GEMV_MAX_TOK || n_out < 1 || k < 8 || k % 8 != 0) return false;
    if (((uintptr_t)x | (uintptr_t)w) % 16 != 0 || (MODE != S_PLAIN && n_out % 2 != 0)) return false;
    switch (n_tok) {
    case 1: s_launch<1, MODE>(e, x, w, n_out, k, st); break;
    case 2: s_launch<2, MODE>(e, x, w, n_out, k, st); break;
    case 3: s_launch<3, MODE>(e, x, w, n_out, k, st); break;
    case 4: s_launch<4, MODE>(e, x, w, n_out, k, st); break;
    case 5: s_launch<5, MODE>(e, x, w, n_out, k, st); break;
    case 6: s_launch<6, MODE>(e, x, w, n_out, k, st); break;
    case 7: s_launch<7, MODE>(e, x, w, n_out, k, st); break;
    default: s_launch<8, MODE>(e, x, w, n_out, k, st); break;
    }
    return true;
}

bool eng_cuda_gemv(float *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k,
                   bool is_accumulate, cudaStream_t st) {
    s_epilogue_t e = {};
    e.y = y, e.is_accumulate = is_accumulate;
    return s_gemv<S_PLAIN>(e, x, w, n_tok, n_out, k, st);
}

bool eng_cuda_gemv_swiglu(__nv_bfloat16 *h, const __nv_bfloat16 *x, const __nv_bfloat16 *w_gate_up, int32_t n_tok,
                          int32_t hidden, int32_t k, cudaStream_t st) {
    s_epilogue_t e = {};
    e.h = h;
    return s_gemv<S_SWIGLU>(e, x, w_gate_up, n_tok, 2 * hidden, k, st);
}

bool eng_cuda_gemv_qkv(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const __nv_bfloat16 *x,
                       const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st) {
    if (d->head_dim % 2 != 0) return false;
    s_epilogue_t e = {};
    e.qkv = *d, e.tk = *tk;
    return s_gemv<S_QKV>(e, x, wqkv, tk->n_tokens, (d->n_heads + 2 * d->n_kv_heads) * d->head_dim, k, st);
}
