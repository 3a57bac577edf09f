/* eng_cuda_gemv.cuh: what the two matrix-vector kernels share (private to eng_cuda_gemv.cu and eng_cuda_gemv_mma.cu):
 * the streaming weight load, the epilogues, and the tensor-core launcher the CUDA-core file hands row counts to. */
#ifndef ENG_CUDA_GEMV_CUH
#define ENG_CUDA_GEMV_CUH

#include "eng_cuda_ops.cuh"

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

/* c += A (16 x 16 bf16, rows of weights) . B (16 x 8 bf16, columns of tokens), f32 accumulate: the fragment layouts are
 * eng_cuda_mma.cuh's. */
static __device__ __forceinline__ void s_mma_bf16(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

/* What happens to the totals: stored (or added) as they are, or, for pairs of adjacent rows, fused with the kernel
 * that would otherwise follow (one launch less per layer at batch 1, where a launch costs as much as a small
 * matrix's weights): SwiGLU of an interleaved gate/up pair, or RoPE of a Q/K pair and the store of K and V into the
 * paged pool. */
enum { S_PLAIN, S_SWIGLU, S_QKV };
typedef struct {
    float *y; /* S_PLAIN: (n_tok, n_out) */
    bool is_accumulate;
    __nv_bfloat16 *y_bf16; /* S_PLAIN, or NULL: each stored y also as bf16 (the next product's folded-norm x) */
    __nv_bfloat16 *h;      /* S_SWIGLU: (n_tok, n_out / 2) */
    eng_cuda_qkv_dst_t qkv;
    eng_cuda_tokens_t tk; /* S_QKV */
} s_epilogue_t;

/* Rows o, o + 1 (o even) of token t: the SwiGLU of a gate/up pair, or a RoPE'd Q or K pair / a V pair. */
template <int MODE>
static __device__ __forceinline__ void s_store_pair(const s_epilogue_t &e, int64_t t, int64_t o, int32_t n_out,
                                                    float a0, float a1) {
    if constexpr (MODE == S_SWIGLU) {
        e.h[t * (n_out / 2) + o / 2] = __float2bfloat16(s_silu_mul(a0, a1));
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
                eng_cuda_kv_t *k_dst = d.kv_pool + s_kv_slot(tk, d.layer, 0, block, slot, kv_dim) + (o - q_dim);
                k_dst[0] = s_kv_from_f32(y0), k_dst[1] = s_kv_from_f32(y1);
            }
        } else {
            eng_cuda_kv_t *v_dst = d.kv_pool + s_kv_slot(tk, d.layer, 1, block, slot, kv_dim) + (o - q_dim - kv_dim);
            v_dst[0] = s_kv_from_f32(a0), v_dst[1] = s_kv_from_f32(a1);
        }
    }
}

/* The tensor-core kernels' output items: MODE's rows per item (S_ROWS_PER_ITEM: one, or a pair for SwiGLU and
 * Q/K/V), row o (even for pairs) of token t, totals s, stored (or added) as they are or through s_store_pair. */
template <int MODE> constexpr int S_ROWS_PER_ITEM = MODE == S_PLAIN ? 1 : 2;
template <int MODE>
static __device__ __forceinline__ void s_store_item(const s_epilogue_t &e, int64_t t, int64_t o, int32_t n_out,
                                                    const float (&s)[S_ROWS_PER_ITEM<MODE>]) {
    if constexpr (MODE == S_PLAIN) {
        float *dst = e.y + t * n_out + o;
        const float v = e.is_accumulate ? *dst + s[0] : s[0];
        *dst = v;
        if (e.y_bf16) e.y_bf16[t * n_out + o] = __float2bfloat16(v);
    } else {
        s_store_pair<MODE>(e, t, o, n_out, s[0], s[1]);
    }
}

/* The RMSNorm prologues' reduction: each token's (t < n_tok <= NT) sum of squares of its f32 row of k elements. The
 * block's WARPS warps sum strided shares (the tokens' loads interleaved), their totals meet in shared memory and every
 * thread adds them in warp order, so all threads get the same totals. Every thread of the block must call it (a
 * barrier). The order differs from k_rmsnorm's, so a scale made from it may differ from the separate kernel's in the
 * last ulp or two (and through it, rarely, a bf16 x by one ulp): a fused product matches the unfused one to within
 * rounding, not bit for bit. */
template <int NT, int WARPS>
static __device__ __forceinline__ void s_rows_sumsq(const float *x_rows, int32_t n_tok, int32_t k, float (&total)[NT]) {
    __shared__ float part[NT][WARPS];
    const float4 *x = (const float4 *)x_rows;
    const int32_t k4 = k / 4;
    float ss[NT];
#pragma unroll
    for (int t = 0; t < NT; t++) ss[t] = 0.0f;
#pragma unroll 4
    for (int32_t i = threadIdx.x; i < k4; i += WARPS * 32)
#pragma unroll
        for (int t = 0; t < NT; t++)
            if (t < n_tok) {
                const float4 v = __ldg(x + (int64_t)t * k4 + i);
                ss[t] = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss[t]))));
            }
#pragma unroll
    for (int t = 0; t < NT; t++) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss[t] += __shfl_xor_sync(0xffffffffu, ss[t], o);
        if ((threadIdx.x & 31) == 0) part[t][threadIdx.x >> 5] = ss[t];
    }
    __syncthreads();
#pragma unroll
    for (int t = 0; t < NT; t++) {
        total[t] = 0.0f;
#pragma unroll
        for (int i = 0; i < WARPS; i++) total[t] += part[t][i];
    }
}

/* The tensor-core kernel (eng_cuda_gemv_mma.cu) for a product eng_cuda_gemv_mma_takes(n_tok): x bf16 rows, or xn
 * (not NULL) f32 rows normalised in the kernel; shapes and alignment already checked by the caller. */
void eng_cuda_gemv_mma_launch(int mode, const s_epilogue_t &e, const __nv_bfloat16 *x, const eng_cuda_norm_t *xn,
                              const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st);

/* The tiled tensor-core kernel (eng_cuda_gemv_tile.cu) for a product of eng_cuda_gemv_tile_takes(n_tok) rows of bf16
 * x; shapes and alignment already checked by the caller. */
void eng_cuda_gemv_tile_launch(int mode, const s_epilogue_t &e, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                               int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st);

#endif
