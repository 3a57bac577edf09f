/* eng_cuda_ops.cu: the CUDA backend's own kernels (contract in eng_cuda_ops.cuh). The matrix products are
 * cuBLAS's; these are the memory-bound pieces between them, each one pass over its data. */
#include "eng_cuda_ops.cuh"

#include <math.h>
#include <mma.h>

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
    const int64_t t = blockIdx.x;
    const __nv_bfloat16 *row = embd + (int64_t)tokens[t] * dim;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) x[t * dim + i] = __bfloat162float(row[i]);
}

void eng_cuda_embed(float *x, const __nv_bfloat16 *embd, const int32_t *tokens, int32_t n_tokens, int32_t dim,
                    cudaStream_t st) {
    k_embed<<<n_tokens, 256, 0, st>>>(x, embd, tokens, dim);
}

/* ---- RMSNorm: one block per row, the sum of squares reduced in f32 ---- */

static __global__ void k_rmsnorm(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t dim,
                                 float eps) {
    __shared__ float part[32];
    const int64_t r = blockIdx.x, src = rows ? rows[r] : r;
    const float *xr = x + src * dim;
    float ss = 0.0f;
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
    ss = s_warp_sum(ss);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? part[threadIdx.x] : 0.0f;
        v = s_warp_sum(v);
        if (threadIdx.x == 0) part[0] = v;
    }
    __syncthreads();
    const float scale = rsqrtf(part[0] / (float)dim + eps);
    for (int32_t i = threadIdx.x; i < dim; i += blockDim.x) y[r * dim + i] = __float2bfloat16(xr[i] * scale * w[i]);
}

void eng_cuda_rmsnorm(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t n_rows,
                      int32_t dim, float eps, cudaStream_t st) {
    k_rmsnorm<<<n_rows, dim >= 2048 ? 512 : 256, 0, st>>>(y, x, rows, w, dim, eps);
}

/* ---- RoPE ---- */

static __global__ void k_rope_table(float *cs, const int32_t *tok_pos, int32_t head_dim, double theta) {
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
    k_rope_table<<<n_tokens, 64, 0, st>>>(cs, tok_pos, head_dim, theta);
}

static __device__ __forceinline__ size_t s_kv_slot(const eng_cuda_tokens_t tk, int32_t layer, int32_t kind,
                                                   int32_t block, int32_t slot, int32_t kv_dim) {
    size_t chunk = ((size_t)layer * 2u + (size_t)kind) * (size_t)tk.n_blocks + (size_t)block;
    return (chunk * (size_t)tk.block_size + (size_t)slot) * (size_t)kv_dim;
}

/* One block per token: rotate the (adjacent) pairs of every Q and K head, store K and V in the token's slot. */
static __global__ void k_rope_store(float *q, __nv_bfloat16 *kv_pool, const float *qkv, const float *bias,
                                    const eng_cuda_tokens_t tk, int32_t layer, int32_t n_heads, int32_t n_kv_heads,
                                    int32_t head_dim) {
    const int64_t t = blockIdx.x;
    const int32_t q_dim = n_heads * head_dim, kv_dim = n_kv_heads * head_dim, half = head_dim / 2;
    const float *row = qkv + t * (int64_t)(q_dim + 2 * kv_dim);
    const float *cs = tk.rope_cs + t * head_dim;
    const int32_t pos = tk.tok_pos[t];
    const int32_t block = tk.tables[tk.tok_table[t] + pos / tk.block_size], slot = pos % tk.block_size;
    __nv_bfloat16 *k_dst = kv_pool + s_kv_slot(tk, layer, 0, block, slot, kv_dim);
    __nv_bfloat16 *v_dst = kv_pool + s_kv_slot(tk, layer, 1, block, slot, kv_dim);
    for (int32_t p = threadIdx.x; p < (n_heads + n_kv_heads) * half; p += blockDim.x) {
        const int32_t i = p % half, e = 2 * (p / half) * half + 2 * i; /* element of the pair in [q | k] */
        float x0 = row[e], x1 = row[e + 1];
        if (bias) x0 += bias[e], x1 += bias[e + 1];
        const float c = cs[2 * i], s = cs[2 * i + 1];
        const float y0 = x0 * c - x1 * s, y1 = x0 * s + x1 * c;
        if (e < q_dim) {
            q[t * q_dim + e] = y0, q[t * q_dim + e + 1] = y1;
        } else {
            k_dst[e - q_dim] = __float2bfloat16(y0), k_dst[e - q_dim + 1] = __float2bfloat16(y1);
        }
    }
    for (int32_t i = threadIdx.x; i < kv_dim; i += blockDim.x) {
        float v = row[q_dim + kv_dim + i];
        if (bias) v += bias[q_dim + kv_dim + i];
        v_dst[i] = __float2bfloat16(v);
    }
}

void eng_cuda_rope_store(float *q, __nv_bfloat16 *kv_pool, const float *qkv, const float *bias,
                         const eng_cuda_tokens_t *tk, int32_t layer, int32_t n_heads, int32_t n_kv_heads,
                         int32_t head_dim, cudaStream_t st) {
    k_rope_store<<<tk->n_tokens, 256, 0, st>>>(q, kv_pool, qkv, bias, *tk, layer, n_heads, n_kv_heads, head_dim);
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

    const eng_cuda_tile_t tile = a.tiles[blockIdx.x];
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
                const __nv_bfloat162 *kb = (const __nv_bfloat162 *)&kr, *vb = (const __nv_bfloat162 *)&vr;
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const float2 kk = __bfloat1622float2(kb[e]), vv = __bfloat1622float2(vb[e]);
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

/* Merges the splits of one (token, head): block (token, head), one thread per dim. */
static __global__ void k_attention_combine(const eng_cuda_att_t a, const eng_cuda_tokens_t tk, int32_t head_dim) {
    const int64_t t = blockIdx.x, h = blockIdx.y, q_dim = (int64_t)a.n_heads * head_dim;
    const int32_t n = tk.tok_pos[t] / a.split_keys + 1;
    float mx = -INFINITY;
    for (int32_t z = 0; z < n; z++) mx = fmaxf(mx, a.part_ml[(((int64_t)z * tk.n_tokens + t) * a.n_heads + h) * 2]);
    float sum = 0.0f, acc = 0.0f;
    for (int32_t z = 0; z < n; z++) {
        const int64_t slot = (int64_t)z * tk.n_tokens + t;
        const float w = expf(a.part_ml[(slot * a.n_heads + h) * 2] - mx);
        sum += w * a.part_ml[(slot * a.n_heads + h) * 2 + 1];
        acc += w * a.part_acc[slot * q_dim + h * head_dim + threadIdx.x];
    }
    a.att[t * q_dim + h * head_dim + threadIdx.x] = __float2bfloat16(acc / sum);
}

template <int HD>
static cudaError_t s_attention(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    const size_t smem = sizeof(float) * ((size_t)ENG_CUDA_ATT_ROWS * HD + (size_t)ENG_CUDA_ATT_KEYS * (HD + 1) +
                                         (size_t)ENG_CUDA_ATT_KEYS * HD);
    static bool is_configured = false; /* the engine thread is the only caller */
    if (!is_configured) {
        cudaError_t err = cudaFuncSetAttribute(k_attention<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
        is_configured = true;
    }
    dim3 grid((unsigned)a->n_tiles, (unsigned)a->n_kv_heads, (unsigned)(a->split_keys ? a->n_splits : 1));
    k_attention<HD><<<grid, ENG_CUDA_ATT_WARPS * 32, smem, st>>>(*a, *tk);
    if (a->split_keys)
        k_attention_combine<<<dim3((unsigned)tk->n_tokens, (unsigned)a->n_heads), HD, 0, st>>>(*a, *tk, HD);
    return cudaGetLastError();
}

/* ---- attention on tensor cores (prefill chunks) ----
 * One thread block per (tile of 64 consecutive tokens of one sequence, query head); 4 warps of 16 query rows.
 * Keys come 64 at a time from the paged cache into shared memory (bf16). Each warp computes its 16 x 64 scores
 * with WMMA (bf16 in, f32 accumulate), does the online softmax on them in shared memory (two lanes per row), and
 * accumulates P.V with WMMA into an f32 output tile it keeps in shared memory (WMMA's register layout is opaque,
 * so the per-row rescale happens there). Flash attention's structure on the simplest tensor-core API; the next
 * step is register-resident mma.sync fragments. */
namespace wmma = nvcuda::wmma;
#define S_TC_KEYS 64

template <int HD> struct s_tc_layout {
    static constexpr int LDQ = HD + 8, LDS = S_TC_KEYS + 4, LDP = S_TC_KEYS + 8, LDO = HD + 4; /* padded strides */
    static constexpr size_t K = 0, V = K + S_TC_KEYS * LDQ * 2, W = V + S_TC_KEYS * LDQ * 2;
    static constexpr size_t W_S = 0, W_P = W_S + 16 * LDS * 4, W_PL = W_P + 16 * LDP * 2, W_O = W_PL + 16 * LDP * 2,
                            W_BYTES = W_O + 16 * LDO * 4;
    static constexpr size_t BYTES = W + 4 * W_BYTES;
};

template <int HD>
static __global__ void __launch_bounds__(128) k_attention_tc(const eng_cuda_att_t a, const eng_cuda_tokens_t tk) {
    typedef s_tc_layout<HD> L;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    __nv_bfloat16 *k_s = (__nv_bfloat16 *)(tc_smem + L::K), *v_s = (__nv_bfloat16 *)(tc_smem + L::V);
    const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned char *ws = tc_smem + L::W + warp * L::W_BYTES;
    float *s_w = (float *)(ws + L::W_S), *o_w = (float *)(ws + L::W_O);
    __nv_bfloat16 *p_w = (__nv_bfloat16 *)(ws + L::W_P), *pl_w = (__nv_bfloat16 *)(ws + L::W_PL);

    const eng_cuda_tile_t tile = a.tc_tiles[blockIdx.x];
    const int32_t h = blockIdx.y, g = h / (a.n_heads / a.n_kv_heads);
    const int32_t q_dim = a.n_heads * HD, kv_dim = a.n_kv_heads * HD;
    const int32_t *table = tk.tables + tk.tok_table[tile.t0];
    const int32_t pos_max = tk.tok_pos[tile.t0 + tile.n - 1];
    const float scale = rsqrtf((float)HD);

    /* Q as two bf16 terms, hi + lo (16 significant bits, near the f32 of the CUDA-core path): a real model's
     * attention sinks make scores of tens, where bf16's 8 bits alone moved attention weights by tens of percent.
     * Staged through the K and V buffers (rows past the tile's end are zero), then kept in registers. */
    for (int32_t i = threadIdx.x; i < 64 * HD; i += blockDim.x) {
        const int32_t r = i / HD, d = i % HD;
        const float v = r < tile.n ? a.q[(int64_t)(tile.t0 + r) * q_dim + h * HD + d] : 0.0f;
        const __nv_bfloat16 hi = __float2bfloat16(v);
        k_s[r * L::LDQ + d] = hi;
        v_s[r * L::LDQ + d] = __float2bfloat16(v - __bfloat162float(hi));
    }
    __syncthreads();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> q_hi[HD / 16], q_lo[HD / 16];
#pragma unroll
    for (int d = 0; d < HD / 16; d++) {
        wmma::load_matrix_sync(q_hi[d], k_s + warp * 16 * L::LDQ + d * 16, L::LDQ);
        wmma::load_matrix_sync(q_lo[d], v_s + warp * 16 * L::LDQ + d * 16, L::LDQ);
    }
    for (int32_t i = lane; i < 16 * HD; i += 32) o_w[(i / HD) * L::LDO + i % HD] = 0.0f;
    /* lane owns row r = lane / 2 of its warp, columns half * 32 .. + 31 (scores) and half * HD / 2 .. (output) */
    const int32_t r = lane >> 1, half = lane & 1, row = warp * 16 + r;
    const int32_t pos = row < tile.n ? tk.tok_pos[tile.t0 + row] : pos_max; /* padding rows: harmless, unwritten */
    const int32_t warp_pos_max = tk.tok_pos[tile.t0 + min(warp * 16 + 15, tile.n - 1)];
    float m = -INFINITY, l = 0.0f;

    for (int32_t k0 = 0; k0 <= pos_max; k0 += S_TC_KEYS) {
        __syncthreads(); /* previous K/V consumed (the first time: the Q fragments are loaded) */
        constexpr int VEC = HD / 8;
        for (int32_t i = threadIdx.x; i < S_TC_KEYS * VEC; i += blockDim.x) {
            const int32_t key = i / VEC, vec = i % VEC, j = k0 + key;
            uint4 kr = make_uint4(0, 0, 0, 0), vr = kr;
            if (j <= pos_max) {
                const int32_t block = table[j / tk.block_size], slot = j % tk.block_size;
                kr = *(const uint4 *)(a.kv_pool + s_kv_slot(tk, a.layer, 0, block, slot, kv_dim) + g * HD + vec * 8);
                vr = *(const uint4 *)(a.kv_pool + s_kv_slot(tk, a.layer, 1, block, slot, kv_dim) + g * HD + vec * 8);
            }
            *(uint4 *)(k_s + key * L::LDQ + vec * 8) = kr;
            *(uint4 *)(v_s + key * L::LDQ + vec * 8) = vr;
        }
        __syncthreads();
        if (k0 > warp_pos_max || warp * 16 >= tile.n) continue; /* every row of this warp is before these keys */

        /* S = Q K^T for this warp's 16 rows and the 64 keys */
        for (int kf = 0; kf < S_TC_KEYS / 16; kf++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::fill_fragment(acc, 0.0f);
#pragma unroll
            for (int d = 0; d < HD / 16; d++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb;
                wmma::load_matrix_sync(fb, k_s + kf * 16 * L::LDQ + d * 16, L::LDQ);
                wmma::mma_sync(acc, q_lo[d], fb, acc);
                wmma::mma_sync(acc, q_hi[d], fb, acc);
            }
            wmma::store_matrix_sync(s_w + kf * 16, acc, L::LDS, wmma::mem_row_major);
        }
        __syncwarp();

        /* online softmax: two lanes per row, 32 scores each */
        float sv[32], mx = -INFINITY;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const int32_t j = k0 + half * 32 + c;
            sv[c] = j <= pos ? s_w[r * L::LDS + half * 32 + c] * scale : -INFINITY;
            mx = fmaxf(mx, sv[c]);
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        const float m_new = fmaxf(m, mx), corr = expf(m - m_new); /* the row's key 0 is always valid */
        float sum = 0.0f;
#pragma unroll
        for (int c = 0; c < 32; c++) {
            const float p = expf(sv[c] - m_new);
            const __nv_bfloat16 p_hi = __float2bfloat16(p);
            sum += p;
            p_w[r * L::LDP + half * 32 + c] = p_hi; /* P too as hi + lo: within 1e-2 of the CUDA-core path */
            pl_w[r * L::LDP + half * 32 + c] = __float2bfloat16(p - __bfloat162float(p_hi));
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        l = l * corr + sum, m = m_new;
        for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); d++) o_w[r * L::LDO + d] *= corr;
        __syncwarp();

        /* O += P V */
#pragma unroll
        for (int nf = 0; nf < HD / 16; nf++) {
            wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
            wmma::load_matrix_sync(acc, o_w + nf * 16, L::LDO, wmma::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < S_TC_KEYS / 16; kk++) {
                wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa, fl;
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> fb;
                wmma::load_matrix_sync(fa, p_w + kk * 16, L::LDP);
                wmma::load_matrix_sync(fl, pl_w + kk * 16, L::LDP);
                wmma::load_matrix_sync(fb, v_s + kk * 16 * L::LDQ + nf * 16, L::LDQ);
                wmma::mma_sync(acc, fl, fb, acc);
                wmma::mma_sync(acc, fa, fb, acc);
            }
            wmma::store_matrix_sync(o_w + nf * 16, acc, L::LDO, wmma::mem_row_major);
        }
        __syncwarp();
    }
    if (row < tile.n) {
        const float inv = 1.0f / l;
        __nv_bfloat16 *out = a.att + (int64_t)(tile.t0 + row) * q_dim + h * HD;
        for (int d = half * (HD / 2); d < (half + 1) * (HD / 2); d++)
            out[d] = __float2bfloat16(o_w[r * L::LDO + d] * inv);
    }
}

template <int HD>
static cudaError_t s_attention_tc(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    static bool is_configured = false; /* the engine thread is the only caller */
    if (!is_configured) {
        cudaError_t err = cudaFuncSetAttribute(k_attention_tc<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               (int)s_tc_layout<HD>::BYTES);
        if (err != cudaSuccess) return err;
        is_configured = true;
    }
    k_attention_tc<HD>
        <<<dim3((unsigned)a->n_tc_tiles, (unsigned)a->n_heads), 128, s_tc_layout<HD>::BYTES, st>>>(*a, *tk);
    return cudaGetLastError();
}

cudaError_t eng_cuda_attention(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    cudaError_t err = cudaSuccess;
    if (a->n_tc_tiles > 0) {
        err = a->head_dim == 64    ? s_attention_tc<64>(a, tk, st)
              : a->head_dim == 128 ? s_attention_tc<128>(a, tk, st)
                                   : cudaErrorInvalidValue;
        if (err != cudaSuccess) return err;
    }
    if (a->n_tiles == 0) return cudaSuccess;
    switch (a->head_dim) {
    case 64: return s_attention<64>(a, tk, st);
    case 128: return s_attention<128>(a, tk, st);
    default: return cudaErrorInvalidValue;
    }
}

/* ---- SwiGLU ---- */

static __global__ void k_swiglu(__nv_bfloat16 *h, const float *gu, int64_t n, int32_t hidden) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / hidden, j = i % hidden;
        const float g = gu[t * 2 * hidden + j], u = gu[t * 2 * hidden + hidden + j];
        h[i] = __float2bfloat16(g / (1.0f + expf(-g)) * u);
    }
}

void eng_cuda_swiglu(__nv_bfloat16 *h, const float *gu, int32_t n_tokens, int32_t hidden, cudaStream_t st) {
    const int64_t n = (int64_t)n_tokens * hidden;
    int64_t blocks = (n + 255) / 256;
    if (blocks > 65535) blocks = 65535;
    k_swiglu<<<(unsigned)blocks, 256, 0, st>>>(h, gu, n, hidden);
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
