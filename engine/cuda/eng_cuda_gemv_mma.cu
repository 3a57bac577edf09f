/* eng_cuda_gemv_mma.cu: the matrix-vector products (1..8 rows, and up to ENG_CUDA_GEMV_MMA_MAX_TOK with two or four
 * column tiles per weight fragment: eng_cuda_ops.cuh says for which matrices) on tensor cores, with eng_cuda_gemv.cu's
 * epilogues and RMSNorm prologue (eng_cuda_gemv hands them here; the contract is eng_cuda_ops.cuh's). Speculative
 * verification forwards 2..9 tokens per sequence and small decode batches 2..8 rows. On CUDA cores each weight then
 * feeds NT FMAs plus its conversion to f32, and the kernel turns instruction-bound (at 6-8 rows it lost to cuBLAS);
 * here one mma.sync m16n8k16 takes 16 rows x 16 k of weights for all 8 token columns, so the instruction count per
 * weight byte does not grow with the rows. A block is 8 warps sharing k over 16 rows. On the H100 (test_cuda_gemv) it
 * also beats the CUDA-core kernel at one row on the 8B Q/K/V (91% of copy bandwidth against 76%) and O (80% against
 * 73%), and at 8 rows it holds 77-98% where that kernel fell to 58-87% (bench/RESULTS.md, engine_cuda, session 12).
 *
 * Weights are fed to the MMA straight from the streaming loads, without shared memory: a dot product does not care in
 * which order its k terms come, so the fragment's k index is a permutation of the real one, the same for the weights
 * (A) and x (B). Lane (gq, tq) loads 16 bytes (k0 + 8 tq .. + 7) of rows gq and gq + 8 and the same 16 bytes of token
 * gq's x; the first MMA takes elements 0-3 of each as fragment columns (2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9), the
 * second elements 4-7. So a warp reads 64 contiguous bytes of each of 16 rows per step, and x once per block. */
#include "eng_cuda_gemv.cuh"

#define MMA_WARPS 8 /* warps per block: all on the block's rows, k shared out between them (fixed order merge) */
/* ... or twice as many (W = 2 MMA_WARPS, one block per SM) for grids of at most one block per SM: small matrices (the
 * 1B O and down products, 128 blocks; SmolLM2's) otherwise leave every SM half the warps it can hold. On the H100
 * (bench/RESULTS.md, engine_cuda, session 18): 1B batch 1 895-902 -> 913-920 tok/s, SmolLM2 at 1536 keys 0.577-0.584
 * -> 0.569-0.575 ms a step; even at 8 rows. ENG_CUDA_GEMV_MMA_W16=0: 8 warps always (A/B). */
#define MMA_COLS  8 /* the MMA's token columns; NC tiles of them per weight fragment (n_tok <= 8 NC) */

/* Where x comes from: bf16 rows; f32 residual rows normalised in a prologue (X_NORM: every block computes each
 * token's 1 / rms before its loop, then forms bf16(x * scale * w_norm)); or residual rows whose norm weight is folded
 * into the weights, the totals scaled by 1 / rms after the merge so that nothing waits for the norm before the first
 * MMA: X_FOLD takes the f32 rows, converts them in the loop and sums x^2 on the way; X_FOLD16 takes their bf16 copy
 * (xn.xb) like X_BF16 and sums x^2 with one more MMA per x fragment, x against itself (the Gram matrix of the
 * block's tokens, whose diagonal is each token's sum of squares); X_FOLD16F the same sums with FMAs on CUDA cores
 * (A/B: the Gram MMAs form a chain of 2 U dependent MMAs per iteration, issued in order before the product's). */
enum { X_BF16, X_NORM, X_FOLD, X_FOLD16, X_FOLD16F };
/* the variants whose norm weight is folded into the matrix (1 / rms after the loop) */
template <int XIN> static constexpr bool S_IS_FOLD = XIN == X_FOLD || XIN == X_FOLD16 || XIN == X_FOLD16F;

/* One iteration's weights: steps u < U of this warp are the 32-k groups gi + u * W (W warps a block); chunks past the
 * row's end are zeros (and so are x's there). */
template <int MT, int U, int W>
static __device__ __forceinline__ void s_ld_step_weights(uint4 (&wv)[U][MT][2], const uint4 *const (&wr)[MT][2],
                                                         int64_t gi, int tq, int64_t kc) {
#pragma unroll
    for (int u = 0; u < U; u++) {
        const int64_t c = (gi + (int64_t)u * W) * 4 + tq;
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) wv[u][m][h] = c < kc ? s_ld_stream(wr[m][h] + c) : make_uint4(0, 0, 0, 0);
    }
}

/* NORM: 1 / rms of token tok's f32 row, as k_rmsnorm computes it (s_rows_sumsq over the tokens < n_tok: every thread
 * of the block must call it). */
template <int W>
static __device__ __forceinline__ float s_norm_scale(const eng_cuda_norm_t &xn, int32_t n_tok, int32_t k, int tok) {
    float total[MMA_COLS];
    s_rows_sumsq<MMA_COLS, W>(xn.x, n_tok, k, total);
    float s = total[0];
#pragma unroll
    for (int t = 1; t < MMA_COLS; t++) s = t == tok ? total[t] : s; /* static register indices */
    return rsqrtf(s / (float)k + xn.eps);
}

/* Token gq's x fragment for chunk c: 8 k values as 4 bf16 pairs. X_NORM: formed from the f32 row as
 * eng_cuda_rmsnorm writes it (bf16(x * scale * w), same operation order and rounding as eng_cuda_gemv.cu's
 * s_x_chunk). X_FOLD: bf16(x), with x^2 added to ss. */
template <int XIN>
static __device__ __forceinline__ uint4 s_x_frag(const __nv_bfloat16 *x, const eng_cuda_norm_t &xn, float scale,
                                                 int64_t row, int64_t kc, int64_t c, float &ss) {
    if constexpr (XIN == X_FOLD16F) {
        const uint4 v = __ldg((const uint4 *)x + row * kc + c);
        float f[8];
        s_bf16x8(v, f);
#pragma unroll
        for (int j = 0; j < 4; j++) ss = fmaf(f[2 * j], f[2 * j], fmaf(f[2 * j + 1], f[2 * j + 1], ss));
        return v;
    } else if constexpr (XIN == X_FOLD) {
        const float4 *xr = (const float4 *)xn.x + (row * kc + c) * 2;
        const float4 a = __ldg(xr), b = __ldg(xr + 1);
        ss = fmaf(a.x, a.x, fmaf(a.y, a.y, fmaf(a.z, a.z, fmaf(a.w, a.w, ss))));
        ss = fmaf(b.x, b.x, fmaf(b.y, b.y, fmaf(b.z, b.z, fmaf(b.w, b.w, ss))));
        const __nv_bfloat162 p0 = __floats2bfloat162_rn(a.x, a.y), p1 = __floats2bfloat162_rn(a.z, a.w),
                             p2 = __floats2bfloat162_rn(b.x, b.y), p3 = __floats2bfloat162_rn(b.z, b.w);
        return make_uint4(*(const uint32_t *)&p0, *(const uint32_t *)&p1, *(const uint32_t *)&p2,
                          *(const uint32_t *)&p3);
    } else if constexpr (XIN == X_NORM) {
        const float4 *xr = (const float4 *)xn.x + (row * kc + c) * 2, *wn = (const float4 *)xn.w + c * 2;
        const float4 a = __ldg(xr), b = __ldg(xr + 1), wa = __ldg(wn), wb = __ldg(wn + 1);
        const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w},
                    g[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
        uint32_t p[4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const __nv_bfloat162 h =
                __floats2bfloat162_rn(v[2 * j] * scale * g[2 * j], v[2 * j + 1] * scale * g[2 * j + 1]);
            p[j] = *(const uint32_t *)&h;
        }
        return make_uint4(p[0], p[1], p[2], p[3]);
    } else {
        return __ldg((const uint4 *)x + row * kc + c);
    }
}

/* A block computes MT * 16 consecutive output rows for n_tok tokens; its W warps take interleaved 32-k groups
 * and meet in shared memory, summed in warp order (deterministic). Rows past n_out load the last row and are never
 * stored. The totals go through MODE's epilogue (eng_cuda_gemv.cuh), pairs of rows for SwiGLU and Q/K/V. NC > 1: each
 * weight fragment meets NC column tiles of 8 tokens (9..8 NC rows of x: every weight byte still read once). */
template <int MT, int MODE, int XIN, int U, int NC, int W>
static __global__ void __launch_bounds__(W * 32, 2 * MMA_WARPS / W) /* 16 warps per SM: <= 128 registers */
    k_gemv_mma(const s_epilogue_t e, const __nv_bfloat16 *x, const eng_cuda_norm_t xn, const __nv_bfloat16 *w,
               int32_t n_tok, int32_t n_out, int32_t k) {
    static_assert(NC == 1 || XIN == X_BF16, "the normalising variants take up to MMA_COLS tokens");
    constexpr bool FOLD = S_IS_FOLD<XIN>;
    constexpr int XLD = XIN == X_FOLD16 ? X_BF16 : XIN; /* how x is loaded */
    __shared__ float part[W][MT * 16][MMA_COLS * NC];
    __shared__ float ss_part[FOLD ? W : 1][MMA_COLS]; /* folded norm: each warp's sum of x^2 per token */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    const int64_t row0 = (int64_t)blockIdx.x * (MT * 16), kc = k / 8, n_groups = (kc + 3) / 4;
    const uint4 *wr[MT][2];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int64_t row = row0 + m * 16 + gq + 8 * h;
            wr[m][h] = (const uint4 *)(w + (row < n_out ? row : n_out - 1) * (int64_t)k);
        }
    bool has_token[NC]; /* fragment column gq of tile j is a real token, gq + 8 j */
#pragma unroll
    for (int j = 0; j < NC; j++) has_token[j] = gq + 8 * j < n_tok;
    float acc[MT][NC][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NC; j++) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;

    int64_t gi = warp;
    uint4 wv[U][MT][2];
    s_ld_step_weights<MT, U, W>(wv, wr, gi, tq,
                                kc); /* before the wait: their latency overlaps the previous kernel's end */
    s_pdl_begin();                   /* x (or the residual rows), the outputs and the tables are earlier kernels' */
    const float scale = XIN == X_NORM ? s_norm_scale<W>(xn, n_tok, k, has_token[0] ? gq : 0) : 1.0f;
    float ss = 0.0f; /* X_FOLD(16F): token gq's x^2 over this lane's chunks (each chunk of the row is one lane's) */
    float gram[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* X_FOLD16: tokens gq x (2 tq, 2 tq + 1); rows gq + 8 stay 0 */
    for (;;) {
        uint4 xv[U][NC];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t c = (gi + (int64_t)u * W) * 4 + tq;
#pragma unroll
            for (int j = 0; j < NC; j++)
                xv[u][j] = has_token[j] && c < kc ? s_x_frag<XLD>(x, xn, scale, gq + 8 * j, kc, c, ss)
                                                  : make_uint4(0, 0, 0, 0);
        }
        if constexpr (XIN == X_FOLD16) { /* A = the tokens' x as rows gq (rows gq + 8 zero), B = the same as columns */
#pragma unroll
            for (int u = 0; u < U; u++) {
                s_mma_bf16(gram, xv[u][0].x, 0u, xv[u][0].y, 0u, xv[u][0].x, xv[u][0].y);
                s_mma_bf16(gram, xv[u][0].z, 0u, xv[u][0].w, 0u, xv[u][0].z, xv[u][0].w);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const uint4 &a = wv[u][m][0], &b = wv[u][m][1]; /* rows gq and gq + 8 */
#pragma unroll
                for (int j = 0; j < NC; j++) {
                    s_mma_bf16(acc[m][j], a.x, b.x, a.y, b.y, xv[u][j].x, xv[u][j].y);
                    s_mma_bf16(acc[m][j], a.z, b.z, a.w, b.w, xv[u][j].z, xv[u][j].w);
                }
            }
        gi += (int64_t)W * U;
        if (gi >= n_groups) break;
        s_ld_step_weights<MT, U, W>(wv, wr, gi, tq, kc);
    }

    /* C fragment of tile j: (row gq, tokens 8 j + 2 tq, + 1) and row gq + 8 */
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NC; j++) {
            float *r0 = part[warp][m * 16 + gq] + 8 * j + 2 * tq, *r1 = part[warp][m * 16 + gq + 8] + 8 * j + 2 * tq;
            r0[0] = acc[m][j][0], r0[1] = acc[m][j][1], r1[0] = acc[m][j][2], r1[1] = acc[m][j][3];
        }
    if constexpr (XIN == X_FOLD || XIN == X_FOLD16F) { /* lanes tq 0..3 hold token gq's chunks of this warp's groups */
        ss += __shfl_xor_sync(0xffffffffu, ss, 1);
        ss += __shfl_xor_sync(0xffffffffu, ss, 2);
        if (tq == 0) ss_part[warp][gq] = ss;
    } else if constexpr (XIN == X_FOLD16) { /* the diagonal (gq, gq): lane tq = gq / 2, element gq % 2 */
        if (tq == gq >> 1) ss_part[warp][gq] = gq & 1 ? gram[1] : gram[0];
    }
    __syncthreads();
    constexpr int RPI = S_ROWS_PER_ITEM<MODE>; /* n_out is even and row0 a multiple of 16: pairs are whole */
    constexpr int N_ITEMS = MT * 16 / RPI;
    for (int i = threadIdx.x; i < N_ITEMS * n_tok; i += W * 32) { /* consecutive threads: consecutive rows */
        const int r = i % N_ITEMS * RPI, t = i / N_ITEMS;
        if (row0 + r >= n_out) continue;
        float s[RPI];
#pragma unroll
        for (int j = 0; j < RPI; j++) {
            s[j] = 0.0f;
#pragma unroll
            for (int wp = 0; wp < W; wp++) s[j] += part[wp][r + j][t];
        }
        if constexpr (FOLD) { /* the norm's 1 / rms, from the warps' sums in warp order */
            float sq = 0.0f;
#pragma unroll
            for (int wp = 0; wp < W; wp++) sq += ss_part[wp][t];
            const float inv_rms = rsqrtf(sq / (float)k + xn.eps);
#pragma unroll
            for (int j = 0; j < RPI; j++) s[j] *= inv_rms;
        }
        s_store_item<MODE>(e, t, row0 + r, n_out, s);
    }
}

/* Two m16 tiles per warp share each x fragment (half the x traffic per weight byte) where that still leaves every SM
 * a few blocks; small matrices keep one tile per warp for more blocks. */
static int32_t s_n_sm(void) {
    static int32_t n_sm; /* benign race: every thread writes the same value */
    if (n_sm == 0) {
        int dev = 0, n = 0;
        if (cudaGetDevice(&dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess)
            n_sm = n > 0 ? n : 1;
    }
    return n_sm > 0 ? n_sm : 132;
}

/* 32-k steps per warp per iteration, every load issued before the first MMA: 4, or (one tile a warp) 8 with
 * ENG_CUDA_GEMV_MMA_U=8 (eng_cuda_gemv_mma_set_steps). Alone, 8 steps took the H100's 8B O and down products from
 * 77% / 85% to 84% / 94% of copy bandwidth, but in the decode step they were slower at every size (8B batch 1 168.4
 * against 170.3 tok/s, 1B batch 8 5825-5946 against 5946-5994), so 4 it is. */
static int32_t g_steps = 4;
static bool g_fold_ss_fma; /* eng_cuda_gemv_mma_set_fold_ss */

static bool g_fold_pdl = true; /* eng_cuda_gemv_mma_set_fold_pdl */

static bool g_wide_blocks = true; /* eng_cuda_gemv_mma_set_wide */

/* k<<<n_blocks, W * 32>>>(...) with PDL where it is on, but for the folded variants only while g_fold_pdl */
template <int XIN, int W, typename... Params, typename... Args>
static void s_launch_k(void (*kernel)(Params...), unsigned n_blocks, cudaStream_t st, Args... args) {
    constexpr bool FOLD = S_IS_FOLD<XIN>;
    eng_cuda_launch_ex(kernel, n_blocks, W * 32, 0, st, 0u, eng_cuda_pdl_is_on() && (!FOLD || g_fold_pdl), args...);
}

template <int MT, int MODE, int XIN>
static void s_launch_steps(const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t &xn,
                           const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    const unsigned n_blocks = (unsigned)((n_out + MT * 16 - 1) / (MT * 16));
    /* 9..32 rows (bf16 x only): 2 or 4 column tiles, 2 steps of loads (x fragments take the registers) */
    if constexpr (XIN == X_BF16) {
        if (n_tok > 2 * MMA_COLS) {
            s_launch_k<XIN, MMA_WARPS>(k_gemv_mma<MT, MODE, XIN, 2, 4, MMA_WARPS>, n_blocks, st, e, x, xn, w, n_tok,
                                       n_out, k);
            return;
        }
        if (n_tok > MMA_COLS) {
            s_launch_k<XIN, MMA_WARPS>(k_gemv_mma<MT, MODE, XIN, 2, 2, MMA_WARPS>, n_blocks, st, e, x, xn, w, n_tok,
                                       n_out, k);
            return;
        }
    }
    if constexpr (MT == 1) { /* two tiles a warp hold twice the weights a step: 8 steps would spill */
        if (g_steps == 8) {
            s_launch_k<XIN, MMA_WARPS>(k_gemv_mma<MT, MODE, XIN, 8, 1, MMA_WARPS>, n_blocks, st, e, x, xn, w, n_tok,
                                       n_out, k);
            return;
        }
    }
    if (g_wide_blocks && n_blocks <= (unsigned)s_n_sm()) {
        constexpr int W = 2 * MMA_WARPS;
        s_launch_k<XIN, W>(k_gemv_mma<MT, MODE, XIN, 4, 1, W>, n_blocks, st, e, x, xn, w, n_tok, n_out, k);
        return;
    }
    s_launch_k<XIN, MMA_WARPS>(k_gemv_mma<MT, MODE, XIN, 4, 1, MMA_WARPS>, n_blocks, st, e, x, xn, w, n_tok, n_out, k);
}

template <int MODE, int XIN>
static void s_launch_mma(const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t &xn,
                         const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    if (n_out >= 32 * 4 * s_n_sm())
        s_launch_steps<2, MODE, XIN>(e, x, xn, w, n_tok, n_out, k, st);
    else
        s_launch_steps<1, MODE, XIN>(e, x, xn, w, n_tok, n_out, k, st);
}

template <int MODE>
static void s_launch_mode(const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn,
                          const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    const eng_cuda_norm_t none = {};
    if (xn && !xn->w && xn->xb && g_fold_ss_fma)
        s_launch_mma<MODE, X_FOLD16F>(e, xn->xb, *xn, w, n_tok, n_out, k, st);
    else if (xn && !xn->w && xn->xb)
        s_launch_mma<MODE, X_FOLD16>(e, xn->xb, *xn, w, n_tok, n_out, k, st);
    else if (xn && !xn->w)
        s_launch_mma<MODE, X_FOLD>(e, NULL, *xn, w, n_tok, n_out, k, st);
    else if (xn)
        s_launch_mma<MODE, X_NORM>(e, NULL, *xn, w, n_tok, n_out, k, st);
    else
        s_launch_mma<MODE, X_BF16>(e, x, none, w, n_tok, n_out, k, st);
}

void eng_cuda_gemv_mma_launch(int mode, const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn,
                              const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    if (mode == S_SWIGLU)
        s_launch_mode<S_SWIGLU>(e, x, xn, w, n_tok, n_out, k, st);
    else if (mode == S_QKV)
        s_launch_mode<S_QKV>(e, x, xn, w, n_tok, n_out, k, st);
    else
        s_launch_mode<S_PLAIN>(e, x, xn, w, n_tok, n_out, k, st);
}

static int32_t g_mma_min_tok = ENG_CUDA_GEMV_MMA_MIN_TOK;

void eng_cuda_gemv_mma_set_fold_ss(bool is_fma) {
    g_fold_ss_fma = is_fma;
}

void eng_cuda_gemv_mma_set_fold_pdl(bool is_on) {
    g_fold_pdl = is_on;
}

void eng_cuda_gemv_mma_set_wide(bool is_on) {
    g_wide_blocks = is_on;
}

void eng_cuda_gemv_mma_set(int32_t min_tok) {
    g_mma_min_tok = min_tok;
}

void eng_cuda_gemv_mma_set_steps(int32_t steps) {
    g_steps = steps;
}

static int64_t g_norm_max = ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES;

void eng_cuda_gemv_mma_set_norm_max(int64_t bytes) {
    g_norm_max = bytes;
}

int64_t eng_cuda_gemv_mma_norm_max(void) {
    return g_norm_max;
}

bool eng_cuda_gemv_mma_takes(int32_t n_tok) {
    return g_mma_min_tok >= 1 && n_tok >= g_mma_min_tok && n_tok >= 1 && n_tok <= ENG_CUDA_GEMV_MMA_MAX_TOK;
}
