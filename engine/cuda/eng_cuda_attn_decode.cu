/* eng_cuda_attn_decode.cu: attention for decode rows and short chunks (speculative verification) on tensor cores,
 * over the paged f16 KV pool (contract in eng_cuda_ops.cuh).
 *
 * Decode attention is a stream of K/V bytes: each key is read once and serves the G query heads that share its KV
 * head. The CUDA-core kernel (eng_cuda_ops.cu) alternated "load 32 keys, wait, compute", so an SM had little in
 * flight; here keys come through a three-stage cp.async pipeline of 64 keys, two blocks per SM, so the next two
 * stages load while one is computed.
 *
 * One thread block per (tile, KV head, key split). A tile's query rows (its tokens x the G heads, at most 16, or 32
 * at head_dim 64) form MT m16 tiles: row r is token r / G, head g * G + r % G. Every warp holds the whole Q tile in
 * registers and takes a quarter of each stage (16 keys): S = Q K^T and O += P V by mma.sync for each m16 tile, with
 * the flash-attention online softmax per warp; at the end the four warps' (max, sum, O) are merged through shared
 * memory. Padding rows (past the tile's rows) repeat the last row and are never stored. Why two m16 tiles: a
 * speculative verification of 6-10 tokens at G = 3 (SmolLM2) or 5-8 at G = 4 (Llama-3.2-1B) took two tiles, each
 * block streaming the same keys; one block now reads them once (MT = 2 where s_forward_run's rule says it pays).
 *
 * Precision: Q and P enter as hi + lo f16 pairs whatever eng_cuda_att_t.mma_terms says: with one term (156 registers
 * instead of 212, about 1% faster at 8B batch 64-128) SmolLM2's batched-vs-alone check rose to 6.85e-2 against its
 * 6e-2 tolerance, where the prefill kernels pass at one term. K and V enter as stored, sums in f32, the softmax in
 * exp2 with log2(e) / sqrt(head_dim) folded into Q. Split partials are stored with their maxima in natural-log units,
 * as k_attention_combine expects. */
#include "eng_cuda_mma.cuh"
#include "eng_cuda_ops.cuh"

#include <math.h>

#define D_KEYS   64 /* keys per stage: 16 per warp */
#define D_STAGES 3
#define D_WARPS  4

template <int HD> static constexpr __host__ __device__ size_t s_dec_smem(void) {
    return (size_t)D_STAGES * 2u * D_KEYS * (HD + 8) * sizeof(eng_cuda_kv_t);
}

/* 2^x: the SFU alone in the ILP variant (s_exp2), exp2f in the other */
template <bool ILP> static __device__ __forceinline__ float s_dec_exp2(float x) {
    return ILP ? s_exp2(x) : exp2f(x);
}

template <int HD, bool ILP, int MT>
static __global__ void __launch_bounds__(D_WARPS * 32, 2)
    k_attention_dec(const eng_cuda_att_t a, const eng_cuda_tokens_t tk, bool is_prewait) {
    constexpr int LD = HD + 8, STAGE = 2 * D_KEYS * LD, ROWS = 16 * MT; /* MT m16 tiles of query rows */
    static_assert(D_WARPS * 16 == D_KEYS, "each warp takes 16 keys of a stage");
    static_assert((size_t)D_WARPS * ROWS * (HD + 2) * sizeof(float) <= s_dec_smem<HD>(), "the merge fits the stages");
    extern __shared__ __align__(128) unsigned char dec_smem[];
    eng_cuda_kv_t *stages = (eng_cuda_kv_t *)dec_smem;
    const int32_t lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gq = lane >> 2, tq = lane & 3;

    /* the tables and the keys before the tile's first new token are the forward's upload and earlier forwards' K/V:
     * with is_prewait (eng_cuda_prewait_is_on) they are read before the wait, Q and this forward's K/V after it */
    if (!is_prewait) s_pdl_begin(); /* Q and this layer's new K/V are earlier kernels' (PDL: eng_cuda_ops.cuh) */
    const eng_cuda_tile_t tile = a.tiles[blockIdx.x];
    if (tile.n == 0) return; /* a pad tile (s_forward buckets the tile count for its graphs) */
    const int32_t g = blockIdx.y, G = a.n_heads / a.n_kv_heads, n_rows = tile.n * G, q_dim = a.n_heads * HD;
    const int32_t *table = tk.tables + tk.tok_table[tile.t0];
    const int32_t pos_max = tk.tok_pos[tile.t0 + tile.n - 1], pos_new = tk.tok_pos[tile.t0];
    const int32_t k_begin = a.split_keys ? (int32_t)blockIdx.z * a.split_keys : 0;
    const int32_t k_last = a.split_keys ? min(pos_max, k_begin + a.split_keys - 1) : pos_max;
    if (k_begin > pos_max) return; /* a split past this tile's keys: the combine reads none of it */
    const int32_t n_it = (k_last - k_begin) / D_KEYS + 1;

    /* the pipeline's head; empty groups keep the group count uniform. Stages of old keys only go before the wait. */
    int s = 0;
    if (is_prewait) {
        for (; s < D_STAGES - 1 && s < n_it && min(k_begin + (s + 1) * D_KEYS - 1, k_last) < pos_new; s++)
            s_load_keys<HD, D_KEYS>(stages + s * STAGE, a, tk, table, k_begin + s * D_KEYS, k_last, g);
        s_pdl_begin();
    }
    for (; s < D_STAGES - 1; s++) {
        if (s < n_it)
            s_load_keys<HD, D_KEYS>(stages + s * STAGE, a, tk, table, k_begin + s * D_KEYS, k_last, g);
        else
            asm volatile("cp.async.commit_group;\n" ::);
    }

    /* this lane's two rows of each m16 tile (16 mt + gq, + 8): their query rows and last visible key (clamped to the
     * split). A second m16 tile without rows of this tile (n_rows <= 16) is skipped (block-uniform). */
    const int32_t n_mt = MT > 1 && n_rows > 16 ? 2 : 1;
    int32_t pos[MT][2];
    uint32_t q_hi[MT][HD / 16][4], q_lo[MT][HD / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        const int32_t rr0 = min(16 * mt + gq, n_rows - 1), rr1 = min(16 * mt + gq + 8, n_rows - 1);
        pos[mt][0] = min(tk.tok_pos[tile.t0 + rr0 / G], k_last),
        pos[mt][1] = min(tk.tok_pos[tile.t0 + rr1 / G], k_last);
        const float qs = rsqrtf((float)HD) * 1.44269504088896341f;
        const float *q_r0 = a.q + (int64_t)(tile.t0 + rr0 / G) * q_dim + (g * G + rr0 % G) * HD;
        const float *q_r1 = a.q + (int64_t)(tile.t0 + rr1 / G) * q_dim + (g * G + rr1 % G) * HD;
        s_load_q<HD>(q_r0, q_r1, tq, qs, q_hi[mt], q_lo[mt]);
    }

    float o[MT][HD / 8][4];
    float m[MT][2], l[MT][2]; /* running max (log2 units) and partial sums of rows (gq, gq + 8) */
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int n = 0; n < HD / 8; n++) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY, l[mt][0] = l[mt][1] = 0.0f;
    }

    for (int32_t it = 0; it < n_it; it++) {
        asm volatile("cp.async.wait_group %0;\n" ::"n"(D_STAGES - 2)); /* this lane's copies of stage `it` landed */
        __syncthreads(); /* ... everyone's; and stage it - 1 is consumed, so it can be refilled */
        const int32_t nxt = it + D_STAGES - 1;
        if (nxt < n_it)
            s_load_keys<HD, D_KEYS>(stages + (nxt % D_STAGES) * STAGE, a, tk, table, k_begin + nxt * D_KEYS, k_last, g);
        else
            asm volatile("cp.async.commit_group;\n" ::);

        const int32_t kw = k_begin + it * D_KEYS + warp * 16; /* this warp's first key */
        if (kw > k_last) continue;                            /* past every row's keys (warp-uniform) */
        const eng_cuda_kv_t *k_s = stages + (it % D_STAGES) * STAGE + warp * 16 * LD, *v_s = k_s + D_KEYS * LD;

#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            if (mt >= n_mt) break;
            float s[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}}; /* S = Q K^T: 16 rows x 16 keys */
            s_qk16<HD, ILP>(s[0], s[1], q_hi[mt], q_lo[mt], k_s, lane);
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int32_t key = kw + 8 * j + 2 * tq + e;
                    if (key > pos[mt][0]) s[j][e] = -INFINITY;
                    if (key > pos[mt][1]) s[j][2 + e] = -INFINITY;
                }
            float mx0 = fmaxf(m[mt][0], fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1])));
            float mx1 = fmaxf(m[mt][1], fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3])));
#pragma unroll
            for (int x = 1; x <= 2; x <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, x));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, x));
            }
            /* a row can have seen no key yet (a warp's keys all past it, or a split's start): then its max stays -inf
             * and every weight is 0, so the reference point is taken as 0 rather than -inf - -inf */
            const float ref0 = mx0 == -INFINITY ? 0.0f : mx0, ref1 = mx1 == -INFINITY ? 0.0f : mx1;
            const float c0 = s_dec_exp2<ILP>(m[mt][0] - ref0), c1 = s_dec_exp2<ILP>(m[mt][1] - ref1);
            m[mt][0] = mx0, m[mt][1] = mx1, l[mt][0] *= c0, l[mt][1] *= c1;
#pragma unroll
            for (int n = 0; n < HD / 8; n++) o[mt][n][0] *= c0, o[mt][n][1] *= c0, o[mt][n][2] *= c1, o[mt][n][3] *= c1;

            uint32_t p_hi[4], p_lo[4]; /* P's A fragment: the two score n-tiles */
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const float p00 = s_dec_exp2<ILP>(s[j][0] - ref0), p01 = s_dec_exp2<ILP>(s[j][1] - ref0);
                const float p10 = s_dec_exp2<ILP>(s[j][2] - ref1), p11 = s_dec_exp2<ILP>(s[j][3] - ref1);
                l[mt][0] += p00 + p01, l[mt][1] += p10 + p11;
                s_split(p00, p01, &p_hi[2 * j], &p_lo[2 * j]);
                s_split(p10, p11, &p_hi[2 * j + 1], &p_lo[2 * j + 1]);
            }
            s_pv16<HD>(o[mt], p_hi, p_lo, v_s, lane);
        }
    }

    /* merge the warps: each leaves its (max, sum) per row and its unnormalised O in shared memory */
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int x = 1; x <= 2; x <<= 1) {
            l[mt][0] += __shfl_xor_sync(0xffffffffu, l[mt][0], x);
            l[mt][1] += __shfl_xor_sync(0xffffffffu, l[mt][1], x);
        }
    asm volatile("cp.async.wait_group 0;\n" ::); /* only empty groups are left, but the stages get reused */
    __syncthreads();
    float *o_s = (float *)dec_smem;          /* (D_WARPS, ROWS, HD) */
    float *ml_s = o_s + D_WARPS * ROWS * HD; /* (D_WARPS, ROWS, 2) */
    float *ow = o_s + warp * ROWS * HD;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        const int32_t r0 = 16 * mt + gq, r1 = r0 + 8;
#pragma unroll
        for (int n = 0; n < HD / 8; n++) {
            *(float2 *)(ow + r0 * HD + n * 8 + 2 * tq) = make_float2(o[mt][n][0], o[mt][n][1]);
            *(float2 *)(ow + r1 * HD + n * 8 + 2 * tq) = make_float2(o[mt][n][2], o[mt][n][3]);
        }
        if (tq == 0) {
            ml_s[(warp * ROWS + r0) * 2] = m[mt][0], ml_s[(warp * ROWS + r0) * 2 + 1] = l[mt][0];
            ml_s[(warp * ROWS + r1) * 2] = m[mt][1], ml_s[(warp * ROWS + r1) * 2 + 1] = l[mt][1];
        }
    }
    __syncthreads();
    for (int32_t i = threadIdx.x; i < n_rows * HD; i += blockDim.x) {
        const int32_t r = i / HD, d = i % HD;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < D_WARPS; w++) mx = fmaxf(mx, ml_s[(w * ROWS + r) * 2]);
        if (mx == -INFINITY) continue; /* a split that starts after this row's position: no partial */
        float sum = 0.0f, acc = 0.0f;
#pragma unroll
        for (int w = 0; w < D_WARPS; w++) {
            const float wt = exp2f(ml_s[(w * ROWS + r) * 2] - mx); /* a warp that saw no key: exp2(-inf) = 0 */
            sum += wt * ml_s[(w * ROWS + r) * 2 + 1];
            acc += wt * o_s[(w * ROWS + r) * HD + d];
        }
        const int64_t t = tile.t0 + r / G, h = g * G + r % G;
        if (a.split_keys) { /* k_attention_combine's inputs */
            const int64_t slot = (int64_t)blockIdx.z * tk.n_tokens + t;
            a.part_acc[slot * q_dim + h * HD + d] = acc;
            if (d == 0) /* natural-log units for k_attention_combine */
                a.part_ml[(slot * a.n_heads + h) * 2] = mx * 0.69314718055994531f,
                                                   a.part_ml[(slot * a.n_heads + h) * 2 + 1] = sum;
        } else {
            a.att[t * q_dim + h * HD + d] = __float2bfloat16(acc / sum);
        }
    }
}

template <int HD, bool ILP, int MT>
static cudaError_t s_attention_dec(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    static uint64_t configured; /* the engine thread is the only caller */
    const cudaError_t err = eng_cuda_smem_once(&configured, k_attention_dec<HD, ILP, MT>, s_dec_smem<HD>());
    if (err != cudaSuccess) return err;
    const dim3 grid((unsigned)a->n_tiles, (unsigned)a->n_kv_heads, (unsigned)(a->split_keys ? a->n_splits : 1));
    eng_cuda_launch(k_attention_dec<HD, ILP, MT>, grid, D_WARPS * 32, s_dec_smem<HD>(), st, *a, *tk,
                    eng_cuda_prewait_is_on());
    return cudaGetLastError();
}

template <bool ILP>
static cudaError_t s_attention_dec_hd(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    if (a->head_dim == 128) return a->dec_m16 > 1 ? cudaErrorInvalidValue : s_attention_dec<128, ILP, 1>(a, tk, st);
    return a->dec_m16 > 1 ? s_attention_dec<64, ILP, 2>(a, tk, st) : s_attention_dec<64, ILP, 1>(a, tk, st);
}

cudaError_t eng_cuda_attention_dec(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st) {
    if (!eng_cuda_dec_usable(a->head_dim, a->n_heads, a->n_kv_heads) || a->dec_m16 > eng_cuda_dec_max_m16(a->head_dim))
        return cudaErrorInvalidValue;
    return eng_cuda_dec_ilp_is_on() ? s_attention_dec_hd<true>(a, tk, st) : s_attention_dec_hd<false>(a, tk, st);
}
