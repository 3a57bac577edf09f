/* eng_cuda_gemv_mma.cu: the matrix-vector products of 3..8 rows on tensor cores (eng_cuda_gemv hands them here; the
 * contract is eng_cuda_ops.cuh's). Speculative verification forwards 2..9 tokens per sequence and small decode
 * batches 3..8 rows. On CUDA cores each weight then feeds NT FMAs plus its conversion to f32, and the kernel turns
 * instruction-bound (at 6-8 rows it lost to cuBLAS); here one mma.sync m16n8k16 takes 16 rows x 16 k of weights for
 * all 8 token columns, so the instruction count per weight byte does not grow with the rows.
 *
 * Weights are fed to the MMA straight from the streaming loads, without shared memory: a dot product does not care in
 * which order its k terms come, so the fragment's k index is a permutation of the real one, the same for the weights
 * (A) and x (B). Lane (gq, tq) loads 16 bytes (k0 + 8 tq .. + 7) of rows gq and gq + 8 and the same 16 bytes of token
 * gq's x; the first MMA takes elements 0-3 of each as fragment columns (2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9), the
 * second elements 4-7. So a warp reads 64 contiguous bytes of each of 16 rows per step, and x once per block. */
#include "eng_cuda_ops.cuh"

#define MMA_WARPS 8 /* warps per block: all on the block's rows, k shared out between them (fixed order merge) */
#define MMA_U     4 /* 32-k steps per warp per iteration, every load issued before the first MMA */

static __device__ __forceinline__ void s_mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* Read once: non-coherent, no L1 allocation, 256-byte L2 prefetch (as eng_cuda_gemv.cu's streaming load). */
static __device__ __forceinline__ uint4 s_ld_weights(const uint4 *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

/* One iteration's weights: steps u of this warp are the 32-k groups gi + u * MMA_WARPS; chunks past the row's end
 * are zeros (and so are x's there). */
template <int MT>
static __device__ __forceinline__ void s_ld_step_weights(uint4 (&wv)[MMA_U][MT][2], const uint4 *const (&wr)[MT][2],
                                                         int64_t gi, int tq, int64_t kc) {
#pragma unroll
    for (int u = 0; u < MMA_U; u++) {
        const int64_t c = (gi + (int64_t)u * MMA_WARPS) * 4 + tq;
#pragma unroll
        for (int m = 0; m < MT; m++)
#pragma unroll
            for (int h = 0; h < 2; h++) wv[u][m][h] = c < kc ? s_ld_weights(wr[m][h] + c) : make_uint4(0, 0, 0, 0);
    }
}

/* A block computes MT * 16 consecutive output rows for NT tokens; its MMA_WARPS warps take interleaved 32-k groups
 * and meet in shared memory, summed in warp order (deterministic). Rows past n_out load the last row and are never
 * stored. */
template <int NT, int MT>
static __global__ void __launch_bounds__(MMA_WARPS * 32)
    k_gemv_mma(float *y, bool is_accumulate, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_out, int32_t k) {
    __shared__ float part[MMA_WARPS][MT * 16][8];
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
    const bool has_token = gq < NT; /* fragment column gq is a real token */
    const uint4 *xr = (const uint4 *)(x + (int64_t)(has_token ? gq : 0) * k);
    float acc[MT][4];
#pragma unroll
    for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = 0.0f;

    int64_t gi = warp;
    uint4 wv[MMA_U][MT][2];
    s_ld_step_weights<MT>(wv, wr, gi, tq, kc); /* before the wait: their latency overlaps the previous kernel's end */
    s_pdl_begin();                             /* x and y are earlier kernels' */
    for (;;) {
        uint4 xv[MMA_U];
#pragma unroll
        for (int u = 0; u < MMA_U; u++) {
            const int64_t c = (gi + (int64_t)u * MMA_WARPS) * 4 + tq;
            xv[u] = has_token && c < kc ? __ldg(xr + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < MMA_U; u++)
#pragma unroll
            for (int m = 0; m < MT; m++) {
                const uint4 &a = wv[u][m][0], &b = wv[u][m][1]; /* rows gq and gq + 8 */
                s_mma_bf16(acc[m], a.x, b.x, a.y, b.y, xv[u].x, xv[u].y);
                s_mma_bf16(acc[m], a.z, b.z, a.w, b.w, xv[u].z, xv[u].w);
            }
        gi += (int64_t)MMA_WARPS * MMA_U;
        if (gi >= n_groups) break;
        s_ld_step_weights<MT>(wv, wr, gi, tq, kc);
    }

    /* C fragment: (row gq, tokens 2 tq, 2 tq + 1) and row gq + 8 */
#pragma unroll
    for (int m = 0; m < MT; m++) {
        part[warp][m * 16 + gq][2 * tq] = acc[m][0], part[warp][m * 16 + gq][2 * tq + 1] = acc[m][1];
        part[warp][m * 16 + gq + 8][2 * tq] = acc[m][2], part[warp][m * 16 + gq + 8][2 * tq + 1] = acc[m][3];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < MT * 16 * NT; i += MMA_WARPS * 32) { /* consecutive threads: consecutive rows */
        const int r = i % (MT * 16), t = i / (MT * 16);
        if (row0 + r >= n_out) continue;
        float s = 0.0f;
#pragma unroll
        for (int wp = 0; wp < MMA_WARPS; wp++) s += part[wp][r][t];
        float *dst = y + (int64_t)t * n_out + row0 + r;
        *dst = is_accumulate ? *dst + s : s;
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

template <int NT>
static void s_launch_mma(float *y, bool is_accumulate, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_out,
                         int32_t k, cudaStream_t st) {
    if (n_out >= 32 * 4 * s_n_sm())
        eng_cuda_launch(k_gemv_mma<NT, 2>, (unsigned)((n_out + 31) / 32), MMA_WARPS * 32, 0, st, y, is_accumulate, x, w,
                        n_out, k);
    else
        eng_cuda_launch(k_gemv_mma<NT, 1>, (unsigned)((n_out + 15) / 16), MMA_WARPS * 32, 0, st, y, is_accumulate, x, w,
                        n_out, k);
}

static int32_t g_mma_min_tok = ENG_CUDA_GEMV_MMA_MIN_TOK;

void eng_cuda_gemv_mma_set(int32_t min_tok) {
    g_mma_min_tok = min_tok;
}

bool eng_cuda_gemv_mma(float *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out,
                       int32_t k, bool is_accumulate, cudaStream_t st) {
    if (g_mma_min_tok < 1 || n_tok < g_mma_min_tok || n_tok > ENG_CUDA_GEMV_MAX_TOK) return false;
    switch (n_tok) { /* the shape checks are eng_cuda_gemv's, done before it calls here */
    case 1: s_launch_mma<1>(y, is_accumulate, x, w, n_out, k, st); break;
    case 2: s_launch_mma<2>(y, is_accumulate, x, w, n_out, k, st); break;
    case 3: s_launch_mma<3>(y, is_accumulate, x, w, n_out, k, st); break;
    case 4: s_launch_mma<4>(y, is_accumulate, x, w, n_out, k, st); break;
    case 5: s_launch_mma<5>(y, is_accumulate, x, w, n_out, k, st); break;
    case 6: s_launch_mma<6>(y, is_accumulate, x, w, n_out, k, st); break;
    case 7: s_launch_mma<7>(y, is_accumulate, x, w, n_out, k, st); break;
    default: s_launch_mma<8>(y, is_accumulate, x, w, n_out, k, st); break;
    }
    return true;
}
