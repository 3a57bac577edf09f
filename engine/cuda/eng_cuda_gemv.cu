/* eng_cuda_gemv.cu: small-batch matrix-vector products (decode, speculative verification; contract in
 * eng_cuda_ops.cuh): the entry points, their shape checks, and the CUDA-core kernel. The row counts that
 * eng_cuda_gemv_mma_takes go to the tensor-core kernel (eng_cuda_gemv_mma.cu; by default all of them), the rest
 * (ENG_CUDA_GEMV_MMA=0 or N) stay here. At 1..8 tokens a GEMM does ~NT FMAs per weight byte, so it is bound by
 * streaming w from HBM once: the kernel is built to keep enough weight bytes in flight per SM to saturate bandwidth,
 * and nothing else (x, partial sums) touches HBM. */
#include "eng_cuda_gemv.cuh"

#include <math.h>

#define GEMV_WARPS 4 /* warps per block: 128 threads, small enough that many blocks fit per SM */
#define GEMV_U     4 /* 16-byte weight chunks per row per lane per iteration, all loaded before any math */

/* Where x comes from: bf16 rows (n_tok, k) as they are, or (NORM) the f32 residual rows, normalised chunk by chunk
 * in the kernel as eng_cuda_rmsnorm would have written them: bf16(x * scale * w) in k_rmsnorm's operation order. */
template <int NT, bool NORM> struct s_x_t {
    const uint4 *b;      /* bf16 x (NT, k) in 16-byte chunks */
    const float4 *f, *w; /* NORM: f32 x (NT, k) and the norm weight (k), 4 floats a load */
    float scale[NT];     /* NORM: each token's 1 / rms (s_norm_scales) */
};

/* x chunk c (8 values) of token t as f32. NORM: the f32 values and the weights wn of chunk c are scaled and rounded
 * to bf16 (two at a time, round to nearest even like __float2bfloat16; no FMA contraction: products only) and used
 * at bf16 precision, exactly what the unfused product would read from eng_cuda_rmsnorm's output. */
template <int NT, bool NORM>
static __device__ __forceinline__ void s_x_chunk(const s_x_t<NT, NORM> &x, const float (&wn)[8], int t, int64_t kc,
                                                 int64_t c, float xf[8]) {
    if constexpr (NORM) {
        const float4 a = __ldg(x.f + (t * kc + c) * 2), b = __ldg(x.f + (t * kc + c) * 2 + 1);
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int j = 0; j < 8; j += 2) {
            const __nv_bfloat162 h =
                __floats2bfloat162_rn(v[j] * x.scale[t] * wn[j], v[j + 1] * x.scale[t] * wn[j + 1]);
            xf[j] = __low2float(h), xf[j + 1] = __high2float(h);
        }
    } else {
        s_bf16x8(__ldg(x.b + t * kc + c), xf);
    }
}

/* acc[r][t] += w chunk of row r . x chunk c of token t; each x chunk is converted once and reused for R rows. */
template <int NT, int R, bool NORM>
static __device__ __forceinline__ void s_fma_chunk(float (&acc)[R][NT], const uint4 (&wv)[R], const s_x_t<NT, NORM> &x,
                                                   int64_t kc, int64_t c) {
    float wn[8]; /* NORM: the norm weight's chunk c, shared by the NT tokens */
    if constexpr (NORM) {
        const float4 a = __ldg(x.w + 2 * c), b = __ldg(x.w + 2 * c + 1);
        wn[0] = a.x, wn[1] = a.y, wn[2] = a.z, wn[3] = a.w, wn[4] = b.x, wn[5] = b.y, wn[6] = b.z, wn[7] = b.w;
    }
#pragma unroll
    for (int t = 0; t < NT; t++) {
        float xf[8];
        s_x_chunk<NT, NORM>(x, wn, t, kc, c, xf);
#pragma unroll
        for (int r = 0; r < R; r++) {
            float wf[8];
            s_bf16x8(wv[r], wf);
#pragma unroll
            for (int j = 0; j < 8; j++) acc[r][t] = fmaf(xf[j], wf[j], acc[r][t]);
        }
    }
}

/* The R rows' chunk c, one streaming load each. */
template <int R>
static __device__ __forceinline__ void s_ld_rows(uint4 (&wv)[R], const uint4 *const (&wr)[R], int64_t c) {
#pragma unroll
    for (int r = 0; r < R; r++) wv[r] = s_ld_stream(wr[r] + c);
}

/* A warp's first step of its R rows (the first 32 * GEMV_U chunks of each, contiguous) towards L2: lane r < R sends
 * one bulk request for row row0 + r (clamped like the loads), which holds no registers (sm_90; elsewhere nothing). */
template <int R>
static __device__ __forceinline__ void s_prefetch_first_step(const __nv_bfloat16 *w, int64_t row0, int32_t n_out,
                                                             int32_t k, int lane) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    const int64_t kc = k / 8, row = row0 + lane < n_out ? row0 + lane : n_out - 1;
    const uint32_t n_bytes = (uint32_t)(kc < 32 * GEMV_U ? kc : 32 * GEMV_U) * 16u;
    if (lane < R) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(w + row * k), "r"(n_bytes));
#endif
}

/* NORM: each token's scale = 1 / rms of its f32 row, once per block (s_rows_sumsq: every thread of the block must
 * call it). */
template <int NT>
static __device__ __forceinline__ void s_norm_scales(const eng_cuda_norm_t &xn, int32_t k, float (&scale)[NT]) {
    float total[NT];
    s_rows_sumsq<NT, GEMV_WARPS>(xn.x, NT, k, total);
#pragma unroll
    for (int t = 0; t < NT; t++) scale[t] = rsqrtf(total[t] / (float)k + xn.eps); /* as k_rmsnorm */
}

/* One warp computes R consecutive output rows for all NT tokens. Lanes stride along k in 16-byte chunks, so each
 * row load of the warp is 512 contiguous bytes; per iteration a lane has R * GEMV_U independent 16-byte loads in
 * flight (R * GEMV_U * 512 bytes per warp), which with several warps per SM covers HBM latency. x (NT * k * 2
 * bytes) is re-read by every warp from L1/L2, R rows per load; NORM: the f32 rows and the norm weight instead
 * ((NT + 1) * k * 4 bytes), normalised as they are read, after the block's s_norm_scales. */
template <int NT, int R, int MODE, bool NORM>
static __global__ void __launch_bounds__(GEMV_WARPS * 32)
    k_gemv(const s_epilogue_t e, const __nv_bfloat16 *x, const eng_cuda_norm_t xn, const __nv_bfloat16 *w,
           int32_t n_out, int32_t k) {
    const int lane = threadIdx.x & 31;
    const int64_t row0 = ((int64_t)blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5)) * R;
    /* the whole warp: no shuffle partner is left behind (NORM: after the block's norm, which needs every warp) */
    if (!NORM && row0 >= n_out) return;
    const int64_t kc = k / 8; /* 16-byte chunks per row */
    s_x_t<NT, NORM> xs;
    xs.b = (const uint4 *)x;
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
    uint4 wv[GEMV_U][R];
    bool is_loaded = false; /* NORM: wv already holds the first step's chunks */
    /* The first step's weights (the first iteration's, or the rest's when a row has fewer than 32 * GEMV_U chunks)
     * are requested before anything that depends on earlier kernels, so that with PDL their HBM latency overlaps
     * the previous kernel's drain (eng_cuda_ops.cuh). NORM: into registers, where the norm's L1/L2 reads overlap
     * them too. Else into L2 only: held in registers across the loop's first iteration they cost ptxas 20-60
     * registers more per thread (fewer blocks per SM). */
    if constexpr (NORM) {
        if (row0 < n_out) {
#pragma unroll
            for (int u = 0; u < GEMV_U; u++)
                if (c + 32 * u < kc) s_ld_rows<R>(wv[u], wr, c + 32 * u);
        }
    } else {
        s_prefetch_first_step<R>(w, row0, n_out, k, lane);
    }
    s_pdl_begin(); /* x (or the residual rows), the outputs and the QKV epilogue's tables are earlier kernels' */
    if constexpr (NORM) {
        s_norm_scales<NT>(xn, k, xs.scale);
        if (row0 >= n_out) return;
        xs.f = (const float4 *)xn.x, xs.w = (const float4 *)xn.w;
        is_loaded = true;
    }
    for (; c - lane + 32 * GEMV_U <= kc; c += 32 * GEMV_U) {
        if (!is_loaded) {
#pragma unroll
            for (int u = 0; u < GEMV_U; u++) s_ld_rows<R>(wv[u], wr, c + 32 * u);
        }
        is_loaded = false;
#pragma unroll
        for (int u = 0; u < GEMV_U; u++) s_fma_chunk<NT, R, NORM>(acc, wv[u], xs, kc, c + 32 * u);
    }
    if constexpr (NORM) { /* the rest (up to GEMV_U chunks a lane), all requested at once */
#pragma unroll
        for (int u = 0; u < GEMV_U; u++)
            if (!is_loaded && c + 32 * u < kc) s_ld_rows<R>(wv[u], wr, c + 32 * u);
#pragma unroll
        for (int u = 0; u < GEMV_U; u++)
            if (c + 32 * u < kc) s_fma_chunk<NT, R, NORM>(acc, wv[u], xs, kc, c + 32 * u);
    } else {
        for (; c < kc; c += 32) { /* the rest: fewer than 32 * GEMV_U chunks */
            s_ld_rows<R>(wv[0], wr, c);
            s_fma_chunk<NT, R, NORM>(acc, wv[0], xs, kc, c);
        }
    }

    /* Butterfly sums leave every lane with every total; lane i stores total i (register indices stay static). */
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < NT; t++) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[r][t] += __shfl_xor_sync(0xffffffffu, acc[r][t], o);
            if (MODE == S_PLAIN && lane == r * NT + t && row0 + r < n_out) {
                const float s[1] = {acc[r][t]};
                s_store_item<S_PLAIN>(e, t, row0 + r, n_out, s);
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
template <int NT, int MODE, bool NORM>
static void s_launch(const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t &xn, const __nv_bfloat16 *w,
                     int32_t n_out, int32_t k, cudaStream_t st) {
    constexpr int R = NT <= 2 ? 2 : 4;
    const unsigned n_blocks = (unsigned)((n_out + GEMV_WARPS * R - 1) / (GEMV_WARPS * R));
    eng_cuda_launch(k_gemv<NT, R, MODE, NORM>, n_blocks, GEMV_WARPS * 32, 0, st, e, x, xn, w, n_out, k);
}

/* x: bf16 rows; or xn (not NULL): f32 rows normalised in the kernel, up to ENG_CUDA_GEMV_NORM_MAX_TOK of them on CUDA
 * cores (xn->w NULL: norm weight folded into w, tensor cores only). */
template <int MODE>
static bool s_gemv(const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w,
                   int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    if (n_tok < 1 || n_tok > ENG_CUDA_GEMV_TILE_MAX_TOK || n_out < 1 || k < 8 || k % 8 != 0) return false;
    if ((uintptr_t)w % 16 != 0 || (MODE != S_PLAIN && n_out % 2 != 0)) return false;
    if (xn && ((uintptr_t)xn->x | (uintptr_t)xn->w | (uintptr_t)xn->xb) % 16 != 0) return false;
    if (!xn && (uintptr_t)x % 16 != 0) return false;
    if (n_tok > ENG_CUDA_GEMV_MAX_TOK) { /* tensor cores, bf16 x only: the streaming kernel where it takes the rows */
        if (xn) return false;
        const bool is_wide =
            n_tok > ENG_CUDA_GEMV_MMA_ALL_MAX_TOK && (int64_t)n_out * k * 2 > ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES;
        if (n_tok <= ENG_CUDA_GEMV_MMA_MAX_TOK && !is_wide && eng_cuda_gemv_mma_takes(n_tok)) {
            eng_cuda_gemv_mma_launch(MODE, e, x, NULL, w, n_tok, n_out, k, st);
            return true;
        }
        if (!eng_cuda_gemv_tile_takes(n_tok)) return false;
        eng_cuda_gemv_tile_launch(MODE, e, x, w, n_tok, n_out, k, st);
        return true;
    }
    if (eng_cuda_gemv_mma_takes(n_tok)) {
        if (xn && xn->w && (int64_t)n_out * k * 2 > eng_cuda_gemv_mma_norm_max()) return false;
        eng_cuda_gemv_mma_launch(MODE, e, x, xn, w, n_tok, n_out, k, st);
        return true;
    }
    if (xn) { /* a folded norm weight (xn->w NULL) only on tensor cores */
        if (!xn->w || n_tok > ENG_CUDA_GEMV_NORM_MAX_TOK) return false;
        if (n_tok == 1)
            s_launch<1, MODE, true>(e, NULL, *xn, w, n_out, k, st);
        else
            s_launch<2, MODE, true>(e, NULL, *xn, w, n_out, k, st);
        return true;
    }
    const eng_cuda_norm_t none = {};
    switch (n_tok) {
    case 1: s_launch<1, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 2: s_launch<2, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 3: s_launch<3, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 4: s_launch<4, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 5: s_launch<5, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 6: s_launch<6, MODE, false>(e, x, none, w, n_out, k, st); break;
    case 7: s_launch<7, MODE, false>(e, x, none, w, n_out, k, st); break;
    default: s_launch<8, MODE, false>(e, x, none, w, n_out, k, st); break;
    }
    return true;
}

static bool s_gemv_plain(float *y, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w,
                         int32_t n_tok, int32_t n_out, int32_t k, bool is_accumulate, cudaStream_t st) {
    s_epilogue_t e = {};
    e.y = y, e.is_accumulate = is_accumulate;
    return s_gemv<S_PLAIN>(e, x, xn, w, n_tok, n_out, k, st);
}

static bool s_gemv_swiglu(__nv_bfloat16 *h, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn,
                          const __nv_bfloat16 *w_gate_up, int32_t n_tok, int32_t hidden, int32_t k, cudaStream_t st) {
    s_epilogue_t e = {};
    e.h = h;
    return s_gemv<S_SWIGLU>(e, x, xn, w_gate_up, n_tok, 2 * hidden, k, st);
}

static bool s_gemv_qkv(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const __nv_bfloat16 *x,
                       const eng_cuda_norm_t *xn, const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st) {
    if (d->head_dim % 2 != 0) return false;
    s_epilogue_t e = {};
    e.qkv = *d, e.tk = *tk;
    return s_gemv<S_QKV>(e, x, xn, wqkv, tk->n_tokens, (d->n_heads + 2 * d->n_kv_heads) * d->head_dim, k, st);
}

bool eng_cuda_gemv(float *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k,
                   bool is_accumulate, cudaStream_t st) {
    return s_gemv_plain(y, x, NULL, w, n_tok, n_out, k, is_accumulate, st);
}

bool eng_cuda_gemv_acc_copy(float *y, __nv_bfloat16 *y_bf16, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                            int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    if (n_tok > ENG_CUDA_GEMV_MAX_TOK) return false; /* the tiled kernel has its own store */
    s_epilogue_t e = {};
    e.y = y, e.is_accumulate = true, e.y_bf16 = y_bf16;
    return s_gemv<S_PLAIN>(e, x, NULL, w, n_tok, n_out, k, st);
}

bool eng_cuda_gemv_swiglu(__nv_bfloat16 *h, const __nv_bfloat16 *x, const __nv_bfloat16 *w_gate_up, int32_t n_tok,
                          int32_t hidden, int32_t k, cudaStream_t st) {
    return s_gemv_swiglu(h, x, NULL, w_gate_up, n_tok, hidden, k, st);
}

bool eng_cuda_gemv_qkv(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const __nv_bfloat16 *x,
                       const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st) {
    return s_gemv_qkv(d, tk, x, NULL, wqkv, k, st);
}

bool eng_cuda_gemv_norm(float *y, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out,
                        int32_t k, bool is_accumulate, cudaStream_t st) {
    return s_gemv_plain(y, NULL, xn, w, n_tok, n_out, k, is_accumulate, st);
}

bool eng_cuda_gemv_swiglu_norm(__nv_bfloat16 *h, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w_gate_up,
                               int32_t n_tok, int32_t hidden, int32_t k, cudaStream_t st) {
    return s_gemv_swiglu(h, NULL, xn, w_gate_up, n_tok, hidden, k, st);
}

bool eng_cuda_gemv_qkv_norm(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const eng_cuda_norm_t *xn,
                            const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st) {
    return s_gemv_qkv(d, tk, NULL, xn, wqkv, k, st);
}
