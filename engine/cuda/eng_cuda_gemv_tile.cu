/* eng_cuda_gemv_tile.cu: the matrix-vector products of 9..ENG_CUDA_GEMV_TILE_MAX_TOK rows (decode batches of 16-64
 * sequences, speculative verification of several sequences) on tensor cores, through shared memory, with
 * eng_cuda_gemv.cu's epilogues (the contract is eng_cuda_ops.cuh's; eng_cuda_gemv hands the row counts here that
 * eng_cuda_gemv_tile_takes).
 *
 * Why a second tensor-core kernel: eng_cuda_gemv_mma.cu feeds the MMAs straight from each warp's streaming loads,
 * which at 1..16 rows keeps 90%+ of copy bandwidth, but each warp reads its own x fragments: at 64 rows one 16-row
 * tile per warp reads x (64 x k bf16) once per 16 weight rows, four times the weight bytes, from L2 (its four-tile
 * version lost to cuBLAS at 24-32 rows on every 1B and 8B matrix). Here a block of 4 warps stages a 64-row x
 * TILE_K slice of the weights and the same slice of every token's x in shared memory (cp.async, STAGES deep, the
 * weight loads of the first stages issued before the PDL wait), so x costs as many L2 bytes as the weights, and the
 * warps read fragments with ldmatrix (32 weight rows x 16 or 32 tokens each). Rows of 128 bytes are stored with
 * their 16-byte chunks XOR-swizzled by row (chunk c of row r at c ^ (r % 8)), so that the 8 rows of each ldmatrix
 * phase hit 8 different bank groups without padding.
 *
 * Matrices of few 64-row tiles (O and down: 64 tiles at 8B) would leave SMs idle, so k is split over n_split blocks
 * (a thread-block cluster of up to 8) chosen so that the grid still fits one wave: each block leaves its partial
 * tile in its shared memory, and after a cluster barrier block q of the cluster sums rows [q, q + 1) * 64 / n_split
 * of all n_split partials in rank order (distributed shared memory: no global scratch, no atomics, deterministic),
 * and runs the epilogue on them. n_split depends on the matrix's shape only, never on the row count, so a token's
 * result does not depend on how many others share the batch.
 *
 * Measured on the H100 (bench/RESULTS.md, engine_cuda, session 15) it loses to cuBLAS in the decode step (8B batch 64
 * 6864-6887 against 7489 tok/s in one call): alone it streams the output head at 88-98% of copy bandwidth (cuBLAS
 * 88-92%) and gate/up at 84-93% (cuBLAS 87-92%), but the products of few row tiles (Q/K/V, O, down) reach 45-76%
 * where cuBLAS reaches 68-85%, even with k split. So it is off unless ENG_CUDA_GEMV_TILE=N asks for it: a base to
 * improve, not a default. */
#include "eng_cuda_gemv.cuh"
#include "eng_cuda_mma.cuh"

#include <cooperative_groups.h>

namespace cg = cooperative_groups;

#define TILE_M 64           /* weight rows per block */
#define TILE_K 64           /* k per stage: 128 bytes of each row (128, 256 bytes: lost, fewer blocks fit an SM) */
#ifndef ENG_CUDA_TILE_WARPS /* a build-time A/B switch: 8 (16 rows a warp) was slower, 8B batch 64 5900 against 6900 */
#define ENG_CUDA_TILE_WARPS 4
#endif
#define TILE_WARPS  ENG_CUDA_TILE_WARPS /* (TILE_WARPS / 2) x 2: each warp TILE_WROWS weight rows x BN / 2 tokens */
#define TILE_WROWS  (TILE_M / (TILE_WARPS / 2))
#define TILE_SPLIT  8                               /* most blocks sharing k (a portable cluster size) */
#define TILE_CHUNKS (TILE_K / 8)                    /* 16-byte chunks per row and stage */
#define TILE_RPP    (TILE_WARPS * 32 / TILE_CHUNKS) /* rows the block copies per pass */

/* Byte offset of chunk c of row r in a stage's tile of 128-byte rows. */
static __device__ __forceinline__ uint32_t s_swz(int r, int c) {
    return (uint32_t)(r * TILE_CHUNKS + (c ^ (r & 7))) * 16u;
}

/* 16 bytes global -> shared, bypassing L1, with a 256-byte L2 prefetch hint (rows are read sequentially); n_src 0
 * writes zeros (k past the row's end, tokens past n_tok). */
static __device__ __forceinline__ void s_cp16(uint32_t dst, const void *src, int n_src) {
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n_src));
}

template <int BN> struct s_tile_cfg {
    static constexpr uint32_t W_BYTES = TILE_M * TILE_K * 2, STAGE_BYTES = (TILE_M + BN) * TILE_K * 2;
    static constexpr int LD = BN + 1; /* the partial tile's row stride in floats: odd, so row-wise reads spread */
};

template <int BN, int STAGES> static constexpr size_t s_smem_bytes(void) {
    return STAGES * s_tile_cfg<BN>::STAGE_BYTES > TILE_M * s_tile_cfg<BN>::LD * 4 ? STAGES * s_tile_cfg<BN>::STAGE_BYTES
                                                                                  : TILE_M * s_tile_cfg<BN>::LD * 4;
}

/* Thread i copies chunk i % 8 of rows i / 8 + 16 j: weights (clamped to n_out - 1: rows past it are never stored)
 * and tokens (zeros past n_tok). */
template <int BN> struct s_loader_t {
    const __nv_bfloat16 *w[TILE_M / TILE_RPP], *x[BN / TILE_RPP];
    bool has_tok[BN / TILE_RPP];
    int r0, c;
};

template <int BN>
static __device__ __forceinline__ void s_load_w(const s_loader_t<BN> &ld, uint32_t stage, int32_t kk, int32_t k) {
    const bool is_in = kk + ld.c * 8 < k;
#pragma unroll
    for (int j = 0; j < TILE_M / TILE_RPP; j++)
        s_cp16(stage + s_swz(ld.r0 + TILE_RPP * j, ld.c), is_in ? ld.w[j] + kk : ld.w[j], is_in ? 16 : 0);
}

template <int BN>
static __device__ __forceinline__ void s_load_x(const s_loader_t<BN> &ld, uint32_t stage, int32_t kk, int32_t k) {
    const bool is_in = kk + ld.c * 8 < k;
#pragma unroll
    for (int j = 0; j < BN / TILE_RPP; j++) {
        const bool is_ok = is_in && ld.has_tok[j];
        s_cp16(stage + s_tile_cfg<BN>::W_BYTES + s_swz(ld.r0 + TILE_RPP * j, ld.c), is_ok ? ld.x[j] + kk : ld.x[j],
               is_ok ? 16 : 0);
    }
}

static __device__ __forceinline__ void s_commit(void) {
    asm volatile("cp.async.commit_group;\n" ::);
}

template <int N> static __device__ __forceinline__ void s_wait_groups(void) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

/* Block (q, tile): weight rows [tile * 64, + 64) for every token, k steps [q, q + 1) * n_steps / n_split. */
template <int BN, int STAGES, int MODE>
static __global__ void __launch_bounds__(TILE_WARPS * 32)
    k_gemv_tile(const s_epilogue_t e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out,
                int32_t k, int32_t n_split) {
    using cfg = s_tile_cfg<BN>;
    constexpr int NJ = BN / 16; /* 8-token MMA columns per warp (a warp takes BN / 2 tokens) */
    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;
    constexpr int MT = TILE_WROWS / 16; /* m16 tiles per warp */
    const int wm = (warp >> 1) * TILE_WROWS, wn = (warp & 1) * (BN / 2);
    const int q = blockIdx.x;
    const int64_t row0 = (int64_t)blockIdx.y * TILE_M;
    const int32_t n_steps_all = (k + TILE_K - 1) / TILE_K;
    const int32_t s0 = (int32_t)((int64_t)n_steps_all * q / n_split);
    const int32_t n_steps = (int32_t)((int64_t)n_steps_all * (q + 1) / n_split) - s0;

    s_loader_t<BN> ld;
    ld.r0 = threadIdx.x / TILE_CHUNKS, ld.c = threadIdx.x % TILE_CHUNKS;
#pragma unroll
    for (int j = 0; j < TILE_M / TILE_RPP; j++) {
        const int64_t row = row0 + ld.r0 + TILE_RPP * j;
        ld.w[j] = w + (row < n_out ? row : n_out - 1) * (int64_t)k + (int64_t)s0 * TILE_K + ld.c * 8;
    }
#pragma unroll
    for (int j = 0; j < BN / TILE_RPP; j++) {
        const int t = ld.r0 + TILE_RPP * j;
        ld.has_tok[j] = t < n_tok;
        ld.x[j] = x + (int64_t)(t < n_tok ? t : 0) * k + (int64_t)s0 * TILE_K + ld.c * 8;
    }
    const int32_t k_rest = k - s0 * TILE_K; /* k relative to this block's first step */

    /* The first stages' weights before the wait (they are written at load only), in the first group with x's. */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++)
        if (s < n_steps) s_load_w<BN>(ld, base + s * cfg::STAGE_BYTES, s * TILE_K, k_rest);
    s_pdl_begin(); /* x and the outputs are earlier kernels' */
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < n_steps) s_load_x<BN>(ld, base + s * cfg::STAGE_BYTES, s * TILE_K, k_rest);
        s_commit();
    }

    float acc[MT][NJ][4];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NJ; j++) acc[m][j][0] = acc[m][j][1] = acc[m][j][2] = acc[m][j][3] = 0.0f;
    for (int32_t i = 0; i < n_steps; i++) {
        s_wait_groups<STAGES - 2>(); /* step i's group has landed (for this thread) ... */
        __syncthreads();             /* ... for every thread, and step i - 1's stage is free */
        const int32_t nx = i + STAGES - 1;
        if (nx < n_steps) {
            const uint32_t st = base + (nx % STAGES) * cfg::STAGE_BYTES;
            s_load_w<BN>(ld, st, nx * TILE_K, k_rest);
            s_load_x<BN>(ld, st, nx * TILE_K, k_rest);
        }
        s_commit(); /* empty groups too: the count behind s_wait_groups stays one per step */
        const uint32_t sw = base + (i % STAGES) * cfg::STAGE_BYTES, sx = sw + cfg::W_BYTES;
#pragma unroll
        for (int kk = 0; kk < TILE_K / 16; kk++) {
            uint32_t a[MT][4], b[NJ / 2][4];
#pragma unroll
            for (int m = 0; m < MT; m++)
                s_ldsm_x4_at(a[m], sw + s_swz(wm + m * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
            for (int j = 0; j < NJ / 2; j++)
                s_ldsm_x4_at(b[j],
                             sx + s_swz(wn + j * 16 + (lane & 7) + ((lane >> 4) & 1) * 8, kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
            for (int m = 0; m < MT; m++)
#pragma unroll
                for (int j = 0; j < NJ; j++)
                    s_mma_bf16(acc[m][j], a[m][0], a[m][1], a[m][2], a[m][3], b[j / 2][(j & 1) * 2],
                               b[j / 2][(j & 1) * 2 + 1]);
        }
    }
    s_wait_groups<0>();
    __syncthreads(); /* every warp is done with the stages: the partial tile takes their place */

    float *part = (float *)smem; /* (TILE_M, LD): rows of weights, columns of tokens */
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            float *r0 = part + (wm + m * 16 + gq) * cfg::LD + wn + j * 8 + 2 * tq, *r1 = r0 + 8 * cfg::LD;
            r0[0] = acc[m][j][0], r0[1] = acc[m][j][1], r1[0] = acc[m][j][2], r1[1] = acc[m][j][3];
        }
    cg::cluster_group cluster = cg::this_cluster();
    if (n_split > 1)
        cluster.sync(); /* every block's partial tile is written (and visible to the cluster) */
    else
        __syncthreads();

    constexpr int RPI = S_ROWS_PER_ITEM<MODE>; /* n_out is even and tiles start at multiples of 64: pairs are whole */
    const int rows = TILE_M / n_split, n_items = rows / RPI, r_first = q * rows;
    for (int i = threadIdx.x; i < n_items * n_tok; i += TILE_WARPS * 32) { /* consecutive threads: consecutive rows */
        const int r = r_first + i % n_items * RPI, t = i / n_items;
        if (row0 + r >= n_out) continue;
        float s[RPI];
#pragma unroll
        for (int j = 0; j < RPI; j++) s[j] = 0.0f;
        for (int p = 0; p < n_split; p++) { /* rank order: the same sum whichever block does it */
            const float *src = n_split > 1 ? cluster.map_shared_rank(part, (unsigned)p) : part;
#pragma unroll
            for (int j = 0; j < RPI; j++) s[j] += src[(r + j) * cfg::LD + t];
        }
        s_store_item<MODE>(e, t, row0 + r, n_out, s);
    }
    if (n_split > 1) cluster.sync(); /* no block leaves while another may still read its partial tile */
}

/* Clusters of 1, 2, 4 and 8 blocks of one instantiation that the GPU holds at once (cudaOccupancyMaxActiveClusters:
 * a cluster's blocks must fit the SMs of one GPC together, so this is less than blocks per SM x SMs / size). */
static int32_t g_max_clusters[2][2][3][4]; /* [3 / 4 stages][BN 32 / 64][mode][log2 cluster size] */
static int32_t g_max_tok;                  /* 0: the kernel takes nothing */
static int32_t g_stages;                   /* 0: chosen per product (s_pick); 3 or 4: ENG_CUDA_GEMV_TILE_STAGES */
static int32_t g_split_max = TILE_SPLIT;   /* at most this many blocks share k (eng_cuda_gemv_tile_set_split) */

/* With the largest shared-memory carveout: left to the driver, it may pick a smaller one than the occupancy queries
 * assume. */
template <int BN, int STAGES, int MODE> static bool s_prepare_one(void) {
    const size_t smem = s_smem_bytes<BN, STAGES>();
    auto kern = k_gemv_tile<BN, STAGES, MODE>;
    if (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess ||
        cudaFuncSetAttribute(kern, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared) !=
            cudaSuccess)
        return false;
    for (int c = 0; c < 4; c++) {
        cudaLaunchAttribute a;
        a.id = cudaLaunchAttributeClusterDimension;
        a.val.clusterDim.x = 1u << c, a.val.clusterDim.y = 1, a.val.clusterDim.z = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3(1u << c), cfg.blockDim = dim3(TILE_WARPS * 32), cfg.dynamicSmemBytes = smem;
        cfg.attrs = &a, cfg.numAttrs = 1;
        int n = 0;
        if (cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess || n < 1) return false;
        g_max_clusters[STAGES == 4][BN == 64][MODE][c] = n;
    }
    return true;
}

template <int BN, int MODE> static bool s_prepare(void) {
    return s_prepare_one<BN, 3, MODE>() && s_prepare_one<BN, 4, MODE>();
}

void eng_cuda_gemv_tile_set_stages(int32_t n_stages) {
    g_stages = n_stages == 3 || n_stages == 4 ? n_stages : 0;
}

void eng_cuda_gemv_tile_set_split(int32_t n_split) {
    g_split_max = n_split == 1 || n_split == 2 || n_split == 4 ? n_split : TILE_SPLIT;
}

void eng_cuda_gemv_tile_set(int32_t max_tok) {
    g_max_tok = 0;
    if (max_tok <= ENG_CUDA_GEMV_MAX_TOK) return;
    if (!s_prepare<32, S_PLAIN>() || !s_prepare<32, S_SWIGLU>() || !s_prepare<32, S_QKV>() ||
        !s_prepare<64, S_PLAIN>() || !s_prepare<64, S_SWIGLU>() || !s_prepare<64, S_QKV>()) {
        (void)cudaGetLastError(); /* not sticky: the caller's next check must not see it */
        return;
    }
    g_max_tok = max_tok < ENG_CUDA_GEMV_TILE_MAX_TOK ? max_tok : ENG_CUDA_GEMV_TILE_MAX_TOK;
}

bool eng_cuda_gemv_tile_takes(int32_t n_tok) {
    return n_tok > ENG_CUDA_GEMV_MAX_TOK && n_tok <= g_max_tok;
}

typedef struct {
    int32_t n_stages, n_split;
} s_pick_t;

/* How n_tiles row tiles over k run: the largest split (a power of two up to g_split_max, each block at least 4 k
 * steps) whose grid the GPU holds in one wave, with 4 stages where those fit and else 3 (more blocks per SM). Under
 * Nsight Compute a second, partial wave cost up to half the kernel (8B gate/up: 448 blocks, 396 at 4 stages; Q/K/V
 * split 4: 96 clusters of 4, 92 held). A grid no split fits in one wave (the output head) runs unsplit, 4 stages. */
template <int BN, int MODE> static s_pick_t s_pick(int32_t n_tiles, int32_t k) {
    const int32_t n_steps = (k + TILE_K - 1) / TILE_K;
    s_pick_t pick = {g_stages ? g_stages : 4, 1};
    for (int c = 0; c < 4; c++) {
        const int32_t split = 1 << c;
        if (split > g_split_max || (split > 1 && n_steps / split < 4)) break;
        for (int32_t st = 4; st >= 3; st--)
            if ((!g_stages || st == g_stages) && n_tiles <= g_max_clusters[st == 4][BN == 64][MODE][c]) {
                pick.n_stages = st, pick.n_split = split;
                break;
            }
    }
    return pick;
}

template <int BN, int STAGES, int MODE>
static void s_launch(const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok,
                     int32_t n_out, int32_t k, int32_t n_split, cudaStream_t st) {
    /* clusters of n_split blocks, of 1 for an unsplit product (as measured) */
    const dim3 grid((unsigned)n_split, (unsigned)((n_out + TILE_M - 1) / TILE_M));
    eng_cuda_launch_cluster(k_gemv_tile<BN, STAGES, MODE>, grid, dim3(TILE_WARPS * 32), s_smem_bytes<BN, STAGES>(), st,
                            (unsigned)n_split, e, x, w, n_tok, n_out, k, n_split);
}

template <int BN, int MODE>
static void s_launch_bn(const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok,
                        int32_t n_out, int32_t k, cudaStream_t st) {
    const s_pick_t p = s_pick<BN, MODE>((n_out + TILE_M - 1) / TILE_M, k);
    if (p.n_stages == 3)
        s_launch<BN, 3, MODE>(e, x, w, n_tok, n_out, k, p.n_split, st);
    else
        s_launch<BN, 4, MODE>(e, x, w, n_tok, n_out, k, p.n_split, st);
}

template <int MODE>
static void s_launch_mode(const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok,
                          int32_t n_out, int32_t k, cudaStream_t st) {
    if (n_tok <= 32)
        s_launch_bn<32, MODE>(e, x, w, n_tok, n_out, k, st);
    else
        s_launch_bn<64, MODE>(e, x, w, n_tok, n_out, k, st);
}

void eng_cuda_gemv_tile_launch(int mode, const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                               int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st) {
    if (mode == S_SWIGLU)
        s_launch_mode<S_SWIGLU>(e, x, w, n_tok, n_out, k, st);
    else if (mode == S_QKV)
        s_launch_mode<S_QKV>(e, x, w, n_tok, n_out, k, st);
    else
        s_launch_mode<S_PLAIN>(e, x, w, n_tok, n_out, k, st);
}
