/* eng_cuda_ops.cu: the CUDA backend's own kernels (contract in eng_cuda_ops.cuh). The matrix products are
 * cuBLAS's; these are the memory-bound pieces between them, each one pass over its data. */
#include "eng_cuda_ops.cuh"

#include <math.h>

#include <atomic>

/* eng_cuda_pdl_set: one switch for every backend of the process, like the environment it comes from */
static std::atomic<bool> s_is_pdl{true};

void eng_cuda_pdl_set(bool is_on) {
    s_is_pdl.store(is_on, std::memory_order_relaxed);
}

bool eng_cuda_pdl_is_on(void) {
    return s_is_pdl.load(std::memory_order_relaxed);
}

static std::atomic<bool> s_is_prewait{true};

void eng_cuda_prewait_set(bool is_on) {
    s_is_prewait.store(is_on, std::memory_order_relaxed);
}

bool eng_cuda_prewait_is_on(void) {
    return s_is_prewait.load(std::memory_order_relaxed);
}

static std::atomic<bool> s_is_dec_ilp{true};

void eng_cuda_dec_ilp_set(bool is_on) {
    s_is_dec_ilp.store(is_on, std::memory_order_relaxed);
}

bool eng_cuda_dec_ilp_is_on(void) {
    return s_is_dec_ilp.load(std::memory_order_relaxed);
}

static __device__ __forceinline__ float s_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ __forceinline__ float s_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* ---- embedding ---- */

static __global__ void k_embed(float *x, const __nv_bfloat16 *embd, const int32_t *tokens, int32_t dim) {
    s_pdl_begin(); /* x, which earlier kernels read, is written (PDL: eng_cuda_ops.cuh) */
    const int64_t t = blockIdx.x;
    const __nv_bfloat16 *row = embd + (int64_t)tokens[t] * dim;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) x[t * dim + i] = __bfloat162float(row[i]);
}

void eng_cuda_embed(float *x, const __nv_bfloat16 *embd, const int32_t *tokens, int32_t n_tokens, int32_t dim,
                    cudaStream_t st) {
    eng_cuda_launch(k_embed, n_tokens, 256, 0, st, x, embd, tokens, dim);
}

/* ---- RMSNorm: one block per row, the sum of squares reduced in f32 ---- */

/* The sum of v over the block (every thread gets it); part: 32 floats of shared memory. */
static __device__ __forceinline__ float s_block_sum(float v, float *part) {
    v = s_warp_sum(v);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        w = s_warp_sum(w);
        if (threadIdx.x == 0) part[0] = w;
    }
    __syncthreads();
    return part[0];
}

static __global__ void k_rmsnorm(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t dim,
                                 float eps) {
    __shared__ float part[32];
    s_pdl_begin(); /* x is earlier kernels' */
    const int64_t r = blockIdx.x, src = rows ? rows[r] : r;
    const float *xr = x + src * dim;
    float ss = 0.0f;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    const float scale = rsqrtf(s_block_sum(ss, part) / (float)dim + eps);
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) y[r * dim + i] = __float2bfloat16(xr[i] * scale * w[i]);
}

/* The same four elements at a time (16-byte loads, 8-byte stores): the scalar kernel moved prefill rows at about
 * 55% of copy bandwidth. Needs dim % 4 == 0 and x, w 16-byte aligned. A thread's first S_NORM_REGS float4 of w are
 * loaded before the PDL wait (a weight: eng_cuda_ops.cuh's rule) and its first S_NORM_REGS of x are kept in registers
 * between the two passes, so that at one row (decode) the kernel after the wait is one x load, the reduction and the
 * store (same summation order as a plain strided loop). */
#define S_NORM_REGS 4
static __device__ __forceinline__ float s_sumsq4(float4 v) {
    return v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
}
/* bf16(v * scale * g), four of them, as one 8-byte store */
static __device__ __forceinline__ uint2 s_norm4_bf16(float4 v, float scale, float4 g) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x * scale * g.x, v.y * scale * g.y);
    const __nv_bfloat162 hi = __floats2bfloat162_rn(v.z * scale * g.z, v.w * scale * g.w);
    return make_uint2(*(const uint32_t *)&lo, *(const uint32_t *)&hi);
}
static __global__ void k_rmsnorm4(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t dim,
                                  float eps, bool is_prewait) {
    __shared__ float part[32];
    const float4 *w4 = (const float4 *)w;
    const int32_t n4 = dim / 4, nt = (int32_t)blockDim.x;
    float4 g[S_NORM_REGS], v[S_NORM_REGS];
    if (!is_prewait) s_pdl_begin();
#pragma unroll
    for (int j = 0; j < S_NORM_REGS; j++) {
        const int32_t i = (int32_t)threadIdx.x + j * nt;
        g[j] = i < n4 ? __ldg(w4 + i) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
    if (is_prewait) s_pdl_begin(); /* x is earlier kernels' */
    const int64_t r = blockIdx.x, src = rows ? rows[r] : r;
    const float4 *xr = (const float4 *)(x + src * dim);
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < S_NORM_REGS; j++) {
        const int32_t i = (int32_t)threadIdx.x + j * nt;
        v[j] = i < n4 ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        ss += s_sumsq4(v[j]);
    }
    for (int32_t i = (int32_t)threadIdx.x + S_NORM_REGS * nt; i < n4; i += nt) ss += s_sumsq4(xr[i]);
    const float scale = rsqrtf(s_block_sum(ss, part) / (float)dim + eps);
    uint2 *yr = (uint2 *)(y + r * dim);
#pragma unroll
    for (int j = 0; j < S_NORM_REGS; j++) {
        const int32_t i = (int32_t)threadIdx.x + j * nt;
        if (i < n4) yr[i] = s_norm4_bf16(v[j], scale, g[j]);
    }
    for (int32_t i = (int32_t)threadIdx.x + S_NORM_REGS * nt; i < n4; i += nt)
        yr[i] = s_norm4_bf16(xr[i], scale, w4[i]);
}

void eng_cuda_rmsnorm(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t n_rows,
                      int32_t dim, float eps, cudaStream_t st) {
    if (dim % 4 == 0 && (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0)
        eng_cuda_launch(k_rmsnorm4, n_rows, dim >= 4096 ? 256 : 128, 0, st, y, x, rows, w, dim, eps,
                        eng_cuda_prewait_is_on());
    else
        eng_cuda_launch(k_rmsnorm, n_rows, dim >= 2048 ? 512 : 256, 0, st, y, x, rows, w, dim, eps);
}

/* ---- RoPE ---- */

static __global__ void k_rope_table(float *cs, const int32_t *tok_pos, int32_t head_dim, double theta) {
    s_pdl_begin(); /* cs, which earlier kernels read, is written */
    const int64_t t = blockIdx.x;
    for (int32_t i = threadIdx.x; i < head_dim / 2; i += blockDim.x) {
        double freq = pow(theta, -2.0 * (double)i / (double)head_dim), s, c;
        sincos((double)tok_pos[t] * freq, &s, &c);
        cs[t * head_dim + 2 * i] = (float)c;
        cs[t * head_dim + 2 * i + 1] = (float)s;
    }
}

void eng_cuda_rope_table(float *cs, const int32_t *tok_pos, int32_t n_tokens, int32_t head_dim, double theta,
                         cudaStream_t st) {
    eng_cuda_launch(k_rope_table, n_tokens, 64, 0, st, cs, tok_pos, head_dim, theta);
}

/* Blocks (token, slice): rotate the (adjacent) pairs of every Q and K head, store K and V in the token's slot; the
 * S_ROPE_SLICES blocks of a token share its pairs and V elements (one block per token left a decode batch's few
 * blocks walking ten dependent load rounds each). */
#define S_ROPE_SLICES 4
static __device__ __forceinline__ float s_ld_f32(const float *p) {
    return *p;
}
static __device__ __forceinline__ float s_ld_f32(const __nv_bfloat16 *p) {
    return __bfloat162float(*p);
}
template <typename TQKV>
static __global__ void k_rope_store(float *__restrict__ q, eng_cuda_kv_t *__restrict__ kv_pool,
                                    const TQKV *__restrict__ qkv, const float *__restrict__ bias,
                                    const eng_cuda_tokens_t tk, int32_t layer, int32_t n_heads, int32_t n_kv_heads,
                                    int32_t head_dim) {
    s_pdl_begin(); /* qkv is earlier kernels' */
    const int64_t t = blockIdx.x;
    const int32_t first = (int32_t)(blockIdx.y * blockDim.x + threadIdx.x), step = (int32_t)(gridDim.y * blockDim.x);
    const int32_t q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = head_dim / 2;
    const TQKV *row = qkv + t * (int64_t)(q_dim + 2 * kv_dim);
    const float *cs = tk.rope_cs + t * head_dim;
    const int32_t pos = tk.tok_pos[t];
    const int32_t block = tk.tables[tk.tok_table[t] + pos / tk.block_size], slot = pos % tk.block_size;
    eng_cuda_kv_t *k_dst = kv_pool + s_kv_slot(tk, layer, 0, block, slot, kv_dim);
    eng_cuda_kv_t *v_dst = kv_pool + s_kv_slot(tk, layer, 1, block, slot, kv_dim);
    for (int32_t p = first; p < (n_heads + n_kv_heads) * half; p += step) {
        const int32_t i = p % half, e = 2 * (p / half) * half + 2 * i; /* element of the pair in [q | k] */
        float x0 = s_ld_f32(row + e), x1 = s_ld_f32(row + e + 1);
        if (bias) x0 += bias[e], x1 += bias[e + 1];
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
        if (e < q_dim) {
            q[t * q_dim + e] = y0, q[t * q_dim + e + 1] = y1;
        } else {
            k_dst[e - q_dim] = s_kv_from_f32(y0), k_dst[e - q_dim + 1] = s_kv_from_f32(y1);
        }
    }
    for (int32_t i = first; i < kv_dim; i += step) {
        float v = s_ld_f32(row + q_dim + kv_dim + i);
        if (bias) v += bias[q_dim + kv_dim + i];
        v_dst[i] = s_kv_from_f32(v);
    }
}

void eng_cuda_rope_store(float *q, eng_cuda_kv_t *kv_pool, const void *qkv, bool is_qkv_bf16, const float *bias,
                         const eng_cuda_tokens_t *tk, int32_t layer, int32_t n_heads, int32_t n_kv_heads,
                         int32_t head_dim, cudaStream_t st) {
    const dim3 grid((unsigned)tk->n_tokens, S_ROPE_SLICES);
    if (is_qkv_bf16)
        eng_cuda_launch(k_rope_store<__nv_bfloat16>, grid, 128, 0, st, q, kv_pool, (const __nv_bfloat16 *)qkv, bias,
                        *tk, layer, n_heads, n_kv_heads, head_dim);
    else
        eng_cuda_launch(k_rope_store<float>, grid, 128, 0, st, q, kv_pool, (const float *)qkv, bias, *tk, layer,
                        n_heads, n_kv_heads, head_dim);
}

/* ---- attention over the paged cache ----
 * One thread block per (tile, KV head, key split). A tile is consecutive tokens of one sequence, times the G query
 * heads that share this KV head: up to ENG_CUDA_ATT_ROWS query rows, so every K/V element read from the pool serves
 * all of them. Keys come in tiles of 32 (one per lane) through shared memory as f32; each warp owns
 * ENG_CUDA_ATT_RPW rows and keeps their output accumulators in registers (lane owns dims lane, lane+32, ...), with
 * the online softmax (running max and sum) of flash attention. K rows are padded by one float so that 32 lanes
 * reading 32 keys at one dim hit 32 banks. CUDA cores, not tensor cores.
 * Splits (flash-decoding): when the batch has too few (tile, KV head) pairs to fill the GPU (small decode
 * batches), each pair's keys are cut into ranges of split_keys, one block each, which write unnormalised partial
 * results (acc, max, sum) that k_attention_combine merges. */
template <int HD>
static __global__ void __launch_bounds__(ENG_CUDA_ATT_WARPS * 32)
    k_attention(const eng_cuda_att_t a, const eng_cuda_tokens_t tk) {
    constexpr int E = HD / 32; /* dims per lane */
    extern __shared__ float smem[];
    float *q_s = smem;                               /* (ROWS, HD) */
    float *k_s = q_s + ENG_CUDA_ATT_ROWS * HD;       /* (KEYS, HD + 1) */
    float *v_s = k_s + ENG_CUDA_ATT_KEYS * (HD + 1); /* (KEYS, HD) */
    __shared__ int32_t row_pos[ENG_CUDA_ATT_ROWS];

    s_pdl_begin(); /* Q and this layer's new K/V are earlier kernels' */
    const eng_cuda_tile_t tile = a.tiles[blockIdx.x];
    if (tile.n == 0) return; /* a pad tile (s_forward buckets the tile count for its graphs) */
    const int32_t g = blockIdx.y, G = a.n_heads / a.n_kv_heads, n_rows = tile.n * G;
    const int32_t q_dim = a.n_heads * HD, kv_dim = a.n_kv_heads * HD;
    const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float scale = rsqrtf((float)HD);
    const int32_t *table = tk.tables + tk.tok_table[tile.t0];
    const int32_t pos_max = tk.tok_pos[tile.t0 + tile.n - 1];
    const int32_t k_begin = a.split_keys ? (int32_t)blockIdx.z * a.split_keys : 0;
    const int32_t k_last = a.split_keys ? min(pos_max, k_begin + a.split_keys - 1) : pos_max;
    if (k_begin > pos_max) return; /* a split past this tile's keys: the combine reads none of it */

    for (int32_t i = threadIdx.x; i < ENG_CUDA_ATT_ROWS * HD; i += blockDim.x) {
        const int32_t r = i / HD, d = i % HD;
        float v = 0.0f;
        if (r < n_rows) v = a.q[(int64_t)(tile.t0 + r / G) * q_dim + (g * G + r % G) * HD + d] * scale;
        q_s[i] = v;
    }
    for (int32_t r = threadIdx.x; r < ENG_CUDA_ATT_ROWS; r += blockDim.x)
        row_pos[r] = r < n_rows ? tk.tok_pos[tile.t0 + r / G] : -1;

    float acc[ENG_CUDA_ATT_RPW][E], m[ENG_CUDA_ATT_RPW], l[ENG_CUDA_ATT_RPW];
#pragma unroll
    for (int i = 0; i < ENG_CUDA_ATT_RPW; i++) {
        m[i] = -INFINITY, l[i] = 0.0f;
#pragma unroll
        for (int e = 0; e < E; e++) acc[i][e] = 0.0f;
    }

    for (int32_t k0 = k_begin; k0 <= k_last; k0 += ENG_CUDA_ATT_KEYS) {
        __syncthreads(); /* the previous tile is consumed (and, the first time, q_s and row_pos are written) */
        constexpr int VEC = HD / 8; /* 16-byte vectors per key row */
        for (int32_t i = threadIdx.x; i < ENG_CUDA_ATT_KEYS * VEC; i += blockDim.x) {
            const int32_t key = i / VEC, vec = i % VEC, j = k0 + key;
            float kf[8], vf[8];
            if (j <= k_last) {
                const int32_t block = table[j / tk.block_size], slot = j % tk.block_size;
                const uint4 kr =
                    *(const uint4 *)(a.kv_pool + s_kv_slot(tk, a.layer, 0, block, slot, kv_dim) + g * HD + vec * 8);
                const uint4 vr =
                    *(const uint4 *)(a.kv_pool + s_kv_slot(tk, a.layer, 1, block, slot, kv_dim) + g * HD + vec * 8);
                const __half2 *kb = (const __half2 *)&kr, *vb = (const __half2 *)&vr;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 kk = __half22float2(kb[e]), vv = __half22float2(vb[e]);
                    kf[2 * e] = kk.x, kf[2 * e + 1] = kk.y, vf[2 * e] = vv.x, vf[2 * e + 1] = vv.y;
                }
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) kf[e] = 0.0f, vf[e] = 0.0f;
            }
#pragma unroll
            for (int e = 0; e < 8; e++) {
                k_s[key * (HD + 1) + vec * 8 + e] = kf[e];
                v_s[key * HD + vec * 8 + e] = vf[e];
            }
        }
        __syncthreads();
#pragma unroll
        for (int i = 0; i < ENG_CUDA_ATT_RPW; i++) {
            const int32_t r = warp + i * ENG_CUDA_ATT_WARPS;
            if (r >= n_rows) break;
            const int32_t pos = min(row_pos[r], k_last);
            if (k0 > pos) continue; /* this row sees none of the tile */
            const float *qr = q_s + r * HD, *kr = k_s + lane * (HD + 1);
            float s = 0.0f;
#pragma unroll 16
            for (int d = 0; d < HD; d++) s += qr[d] * kr[d];
            if (k0 + lane > pos) s = -INFINITY;
            const float m_new = fmaxf(m[i], s_warp_max(s));
            const float corr = expf(m[i] - m_new); /* m[i] = -inf the first time: 0 */
            const float p = expf(s - m_new);
            l[i] = l[i] * corr + s_warp_sum(p);
#pragma unroll
            for (int e = 0; e < E; e++) acc[i][e] *= corr;
            const int32_t n_keys = pos - k0 + 1 < ENG_CUDA_ATT_KEYS ? pos - k0 + 1 : ENG_CUDA_ATT_KEYS;
            for (int32_t jj = 0; jj < n_keys; jj++) {
                const float pj = __shfl_sync(0xffffffffu, p, jj);
#pragma unroll
                for (int e = 0; e < E; e++) acc[i][e] += pj * v_s[jj * HD + lane + 32 * e];
            }
            m[i] = m_new;
        }
    }
#pragma unroll
    for (int i = 0; i < ENG_CUDA_ATT_RPW; i++) {
        const int32_t r = warp + i * ENG_CUDA_ATT_WARPS;
        if (r >= n_rows) break;
        const int64_t t = tile.t0 + r / G, h = g * G + r % G;
        if (a.split_keys) {
            if (k_begin > row_pos[r]) continue; /* this row's keys end before the split */
            const int64_t slot = (int64_t)blockIdx.z * tk.n_tokens + t;
            float *out = a.part_acc + slot * q_dim + h * HD;
#pragma unroll
            for (int e = 0; e < E; e++) out[lane + 32 * e] = acc[i][e];
            if (lane == 0)
                a.part_ml[(slot * a.n_heads + h) * 2] = m[i], a.part_ml[(slot * a.n_heads + h) * 2 + 1] = l[i];
        } else {
            __nv_bfloat16 *out = a.att + t * q_dim + h * HD;
            const float inv = 1.0f / l[i];
#pragma unroll
            for (int e = 0; e < E; e++) out[lane + 32 * e] = __float2bfloat16(acc[i][e] * inv);
        }
    }
}

/* Merges the key splits of the CUDA-core tiles: block (tile, head, token of the tile), one thread per dim. The first
 * warp turns the token's split maxima and sums into weights (one split a lane: at most 32, s_forward's bound), so
 * that every dim's loop over the splits is independent loads. One block per token rather than the tile's tokens in
 * turn: a verification chunk of 5 tokens over 24 splits was a chain of dependent loads that grew with the tokens.
 * Only those tiles: tokens of tensor-core tiles in the same batch have no partials. */
#define S_COMBINE_MAX_SPLITS 32
static __global__ void k_attention_combine(const eng_cuda_att_t a, const eng_cuda_tokens_t tk, int32_t head_dim) {
    __shared__ float w_s[S_COMBINE_MAX_SPLITS];
    s_pdl_begin(); /* the partials are earlier kernels' */
    const eng_cuda_tile_t tile = a.tiles[blockIdx.x];
    if ((int32_t)blockIdx.z >= tile.n) return; /* the tile has fewer tokens (or is a pad tile) */
    const int64_t t = tile.t0 + blockIdx.z, h = blockIdx.y, q_dim = (int64_t)a.n_heads * head_dim;
    const int32_t n = min(tk.tok_pos[t] / a.split_keys + 1, S_COMBINE_MAX_SPLITS);
    if (threadIdx.x < 32) {
        const int32_t z = threadIdx.x;
        const int64_t ml = (((int64_t)z * tk.n_tokens + t) * a.n_heads + h) * 2;
        const float m = z < n ? a.part_ml[ml] : -INFINITY, l = z < n ? a.part_ml[ml + 1] : 0.0f;
        float mx = m;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        const float w = z < n ? expf(m - mx) : 0.0f;
        float sum = w * l;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        w_s[z] = w / sum;
    }
    __syncthreads();
    float acc = 0.0f;
    for (int32_t z = 0; z < n; z++)
        acc += w_s[z] * a.part_acc[((int64_t)z * tk.n_tokens + t) * q_dim + h * head_dim + threadIdx.x];
    a.att[t * q_dim + h * head_dim + threadIdx.x] = __float2bfloat16(acc);
}

template <int HD>
static cudaError_t s_attention(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    const size_t smem = sizeof(float) * ((size_t)ENG_CUDA_ATT_ROWS * HD + (size_t)ENG_CUDA_ATT_KEYS * (HD + 1) +
                                         (size_t)ENG_CUDA_ATT_KEYS * HD);
    static uint64_t configured; /* the engine thread is the only caller */
    const cudaError_t err = eng_cuda_smem_once(&configured, k_attention<HD>, smem);
    if (err != cudaSuccess) return err;
    dim3 grid((unsigned)a->n_tiles, (unsigned)a->n_kv_heads, (unsigned)(a->split_keys ? a->n_splits : 1));
    eng_cuda_launch(k_attention<HD>, grid, ENG_CUDA_ATT_WARPS * 32, smem, st, *a, *tk);
    return cudaGetLastError();
}

cudaError_t eng_cuda_attention(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    if (a->n_tc_tiles > 0) {
        cudaError_t err = eng_cuda_attention_mma(a, tk, st);
        if (err != cudaSuccess) return err;
    }
    if (a->n_tiles == 0) return cudaSuccess;
    cudaError_t err = cudaErrorInvalidValue;
    if (a->is_dec_mma)
        err = eng_cuda_attention_dec(a, tk, st);
    else if (a->head_dim == 64)
        err = s_attention<64>(a, tk, st);
    else if (a->head_dim == 128)
        err = s_attention<128>(a, tk, st);
    if (err == cudaSuccess && a->split_keys) { /* merge the key splits' partials */
        const int32_t tile_tokens = eng_cuda_att_tile_tokens(a->is_dec_mma, a->dec_m16, a->n_heads, a->n_kv_heads);
        eng_cuda_launch(k_attention_combine, dim3((unsigned)a->n_tiles, (unsigned)a->n_heads, (unsigned)tile_tokens),
                        a->head_dim, 0, st, *a, *tk, a->head_dim);
        err = cudaGetLastError();
    }
    return err;
}

/* ---- SwiGLU ---- */

/* Output i of the flat (T, hidden) h reads gu pair i (row t's pairs start at 2 t hidden: no index division), two
 * pairs per 16-byte load (k_swiglu1: one, for an odd total). */
static __global__ void k_swiglu1(__nv_bfloat16 *h, const float2 *gu, int64_t n) {
    s_pdl_begin(); /* gu is earlier kernels' */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float2 p = gu[i];
        h[i] = __float2bfloat16(s_silu_mul(p.x, p.y));
    }
}
static __global__ void k_swiglu(__nv_bfloat162 *h, const float4 *gu, int64_t n2) {
    s_pdl_begin(); /* gu is earlier kernels' */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n2; i += (int64_t)gridDim.x * blockDim.x) {
        const float4 p = gu[i]; /* (gate, up) of outputs 2i and 2i + 1 */
        h[i] = __floats2bfloat162_rn(s_silu_mul(p.x, p.y), s_silu_mul(p.z, p.w));
    }
}

void eng_cuda_swiglu(__nv_bfloat16 *h, const float *gu, int32_t n_tokens, int32_t hidden, cudaStream_t st) {
    const int64_t n = (int64_t)n_tokens * hidden, n_per = n % 2 ? n : n / 2;
    int64_t blocks = (n_per + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    if (n % 2)
        eng_cuda_launch(k_swiglu1, (unsigned)blocks, 256, 0, st, h, (const float2 *)gu, n);
    else
        eng_cuda_launch(k_swiglu, (unsigned)blocks, 256, 0, st, (__nv_bfloat162 *)h, (const float4 *)gu, n / 2);
}

/* Output i of the flat (T, hidden) h reads gu pair i: row t's pairs start at 2 t hidden, so no index division. Four
 * outputs per step (a 16-byte load of four pairs, an 8-byte store); n % 4 == 0. */
static __global__ void k_swiglu_bf16(uint2 *h, const uint4 *gu, int64_t n4) {
    s_pdl_begin(); /* gu is earlier kernels' */
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        const uint4 v = gu[i];
        const uint32_t pairs[4] = {v.x, v.y, v.z, v.w};
        float o[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float2 p = __bfloat1622float2(*(const __nv_bfloat162 *)&pairs[k]);
            o[k] = s_silu_mul(p.x, p.y);
        }
        __nv_bfloat162 lo = __floats2bfloat162_rn(o[0], o[1]), hi = __floats2bfloat162_rn(o[2], o[3]);
        h[i] = make_uint2(*(uint32_t *)&lo, *(uint32_t *)&hi);
    }
}

void eng_cuda_swiglu_bf16(__nv_bfloat16 *h, const __nv_bfloat16 *gu, int32_t n_tokens, int32_t hidden,
                          cudaStream_t st) {
    const int64_t n4 = (int64_t)n_tokens * hidden / 4;
    int64_t blocks = (n4 + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    eng_cuda_launch(k_swiglu_bf16, (unsigned)blocks, 256, 0, st, (uint2 *)h, (const uint4 *)gu, n4);
}

/* ---- KV blocks between the pool and its host mirror ----
 * One thread block per (listed block, layer x kind chunk), 16-byte copies. The mirror is mapped pinned host memory,
 * so the kernel's loads or stores cross PCIe directly: one launch moves any set of scattered blocks. */
static __global__ void k_kv_copy(uint8_t *dst, const uint8_t *src, const int32_t *blocks, int32_t n_blocks_pool,
                                 size_t chunk_bytes) {
    const size_t off = ((size_t)blockIdx.y * (size_t)n_blocks_pool + (size_t)blocks[blockIdx.x]) * chunk_bytes;
    const uint4 *s = (const uint4 *)(src + off);
    uint4 *d = (uint4 *)(dst + off);
    for (size_t i = threadIdx.x; i < chunk_bytes / 16; i += blockDim.x) d[i] = s[i];
}

void eng_cuda_kv_copy(void *dst, const void *src, const int32_t *blocks, int32_t n, int32_t n_chunks_per_block,
                      int32_t n_blocks_pool, size_t chunk_bytes, cudaStream_t st) {
    k_kv_copy<<<dim3((unsigned)n, (unsigned)n_chunks_per_block), 256, 0, st>>>((uint8_t *)dst, (const uint8_t *)src,
                                                                               blocks, n_blocks_pool, chunk_bytes);
}

/* The same between two pools of different sizes (another process's, mapped through CUDA IPC, and ours), from block
 * pairs[i] of src to block pairs[n + i] of dst. */
static __global__ void k_kv_copy_pairs(uint8_t *dst, const uint8_t *src, const int32_t *pairs, int32_t n,
                                       int32_t first_chunk, int32_t n_blocks_dst, int32_t n_blocks_src,
                                       size_t chunk_bytes) {
    const size_t c = (size_t)first_chunk + blockIdx.y; /* layer * 2 + kind */
    const size_t so = (c * (size_t)n_blocks_src + (size_t)pairs[blockIdx.x]) * chunk_bytes;
    const size_t d_o = (c * (size_t)n_blocks_dst + (size_t)pairs[n + blockIdx.x]) * chunk_bytes;
    const uint4 *s = (const uint4 *)(src + so);
    uint4 *d = (uint4 *)(dst + d_o);
    for (size_t i = threadIdx.x; i < chunk_bytes / 16; i += blockDim.x) d[i] = s[i];
}

void eng_cuda_kv_copy_pairs(void *dst, const void *src, const int32_t *pairs, int32_t n, int32_t first_chunk,
                            int32_t n_chunks, int32_t n_blocks_dst, int32_t n_blocks_src, size_t chunk_bytes,
                            cudaStream_t st) {
    k_kv_copy_pairs<<<dim3((unsigned)n, (unsigned)n_chunks), 256, 0, st>>>(
        (uint8_t *)dst, (const uint8_t *)src, pairs, n, first_chunk, n_blocks_dst, n_blocks_src, chunk_bytes);
}
