/* eng_cuda_ops.cuh: the CUDA backend's kernels behind eng_cuda_* launchers (private to engine/cuda/). Layouts: the
 * residual stream is f32 (T, dim); everything that feeds a GEMM is bf16; the KV pool is f16 (eng_cuda_kv_t) in the
 * eng_kv_layout.h layout, so a block's chunk copies out as is. A "token" is one new token of the batch; per token the
 * launchers get its position and its sequence's block table (flattened, offset per sequence). */
#ifndef ENG_CUDA_OPS_CUH
#define ENG_CUDA_OPS_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

/* The KV pool's element (ENG_KV_F16 in eng_kv_layout.h terms). f16 rather than the weights' bf16: the attention
 * kernels feed keys and values to the tensor cores as they are stored, with queries and probabilities in the same
 * type, and f16's 11 significant bits (bf16: 8) are what lets one f16 term carry Q and P in the prefill kernel
 * where bf16 needed two (a real model's attention sinks make scores of tens, eng_cuda_attn_mma.cu). K and V after
 * RoPE stay far inside f16's range (+-65504), as llama.cpp's default f16 KV cache relies on; stores saturate
 * instead of overflowing to infinity all the same. */
typedef __half eng_cuda_kv_t;
/* SwiGLU of one gate/up pair: silu(g) * u, the one expression every SwiGLU path (kernels, matrix-vector epilogue)
 * evaluates, so that they round alike. */
static __device__ __forceinline__ float s_silu_mul(float g, float u) {
    return g / (1.0f + expf(-g)) * u;
}
static __device__ __forceinline__ eng_cuda_kv_t s_kv_from_f32(float x) {
    return __float2half_rn(fminf(fmaxf(x, -65504.0f), 65504.0f));
}

/* Programmatic dependent launch (PDL, sm_90): a kernel launched by eng_cuda_launch may start while the kernel
 * before it on the stream drains (in a captured graph: a programmatic edge), so that its blocks are resident (and
 * the matrix-vector kernel's first weight loads in flight) when that one ends. Every kernel launched so follows
 * one rule: before s_pdl_begin it reads only what no earlier work of the stream writes (weights and tables
 * written at load) and writes no global memory; every other read and every write comes after. s_pdl_begin
 * returns once the previous grid has completed with its writes visible (all earlier work then has: each kernel
 * completes only after its own wait); without PDL it returns at once. A block may return before it only if it
 * does nothing that depends on earlier work. Right after the wait, s_pdl_begin lets the next kernel be scheduled
 * once every block of this one has got there (or exited; it publishes nothing): at most one kernel waits ahead,
 * not a chain of them, each holding SM slots. */
static __device__ __forceinline__ void s_pdl_begin(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
/* Whether eng_cuda_launch uses PDL: process-wide (the backend sets it at create from ENG_CUDA_PDL; default on).
 * Any thread may call them. */
void eng_cuda_pdl_set(bool is_on);
bool eng_cuda_pdl_is_on(void);
/* A second rule widens the first: what work two or more kernels back wrote may also be read before s_pdl_begin. When a
 * kernel starts, every block of the kernel just before it has passed its own s_pdl_begin (or returned before it,
 * depending on nothing), so everything before that kernel is complete: the forward's uploaded tables, the K/V of
 * positions earlier forwards wrote. A kernel that uses this rule must only follow kernels that wait in every block
 * (ours, or a library kernel, which completes before the next starts). The decode attention loads its older keys so,
 * and the RMSNorm its weights (by the first rule): their HBM latency overlaps the previous kernel's end. Process-wide
 * A/B switch (the backend sets it from ENG_CUDA_PREWAIT; 0: every such load after the wait). */
void eng_cuda_prewait_set(bool is_on);
bool eng_cuda_prewait_is_on(void);
/* The tensor-core decode attention's inner loop (eng_cuda_attn_decode.cu): true, the default, takes the scores' lo
 * products in accumulators of their own and exponentiates on the SFU alone; false, the loop before (A/B switch, the
 * backend sets it from ENG_CUDA_DEC_ILP). */
void eng_cuda_dec_ilp_set(bool is_on);
bool eng_cuda_dec_ilp_is_on(void);
/* kernel<<<grid, block, smem_bytes, st>>>(args...), with the PDL launch attribute when is_pdl, and with cluster_x > 0
 * as thread-block clusters of cluster_x blocks along x. For kernels that call s_pdl_begin only. A failed launch is
 * reported by cudaGetLastError, as a <<<>>> launch's is. */
template <typename... Params, typename... Args>
static inline void eng_cuda_launch_ex(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                                      cudaStream_t st, unsigned cluster_x, bool is_pdl, Args... args) {
    cudaLaunchAttribute attrs[2];
    unsigned n = 0;
    if (cluster_x > 0) {
        attrs[n].id = cudaLaunchAttributeClusterDimension;
        attrs[n].val.clusterDim.x = cluster_x, attrs[n].val.clusterDim.y = 1, attrs[n].val.clusterDim.z = 1;
        n++;
    }
    if (is_pdl) {
        attrs[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attrs[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid, cfg.blockDim = block, cfg.dynamicSmemBytes = smem_bytes, cfg.stream = st;
    cfg.attrs = attrs, cfg.numAttrs = n;
    (void)cudaLaunchKernelEx(&cfg, kernel, args...); /* the error stays for cudaGetLastError */
}

/* eng_cuda_launch_ex with PDL where eng_cuda_pdl_is_on(). */
template <typename... Params, typename... Args>
static inline void eng_cuda_launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes,
                                           cudaStream_t st, unsigned cluster_x, Args... args) {
    eng_cuda_launch_ex(kernel, grid, block, smem_bytes, st, cluster_x, eng_cuda_pdl_is_on(), args...);
}

template <typename... Params, typename... Args>
static inline void eng_cuda_launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t st,
                                   Args... args) {
    eng_cuda_launch_cluster(kernel, grid, block, smem_bytes, st, 0u, args...);
}

/* Raise kernel's dynamic shared-memory limit to smem_bytes once per device: cudaFuncSetAttribute applies to the
 * calling thread's current device, so a flag per process would leave every other device at the 48 KB default (bit d
 * of *done: device d is done). */
template <typename... Params>
static inline cudaError_t eng_cuda_smem_once(uint64_t *done, void (*kernel)(Params...), size_t smem_bytes) {
    int dev = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err != cudaSuccess) return err;
    const uint64_t bit = 1ull << (dev & 63);
    if (*done & bit) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem_bytes);
    if (err == cudaSuccess) *done |= bit;
    return err;
}

/* What the kernels need to find a token's sequence, position and KV blocks. All device pointers. */
typedef struct {
    int32_t n_tokens;
    const int32_t *tok_pos;       /* (T) position of each token */
    const int32_t *tok_table;     /* (T) offset of its sequence's block table in tables */
    const int32_t *tables;        /* concatenated block tables */
    const float *rope_cs;         /* (T, head_dim) cos, sin of each rotated pair, filled by eng_cuda_rope_table */
    int32_t block_size, n_blocks; /* KV pool geometry (blocks per layer) */
} eng_cuda_tokens_t;

/* An attention tile: up to ENG_CUDA_ATT_ROWS query rows (tokens x the query heads of one KV head) of consecutive
 * tokens of one sequence. */
typedef struct {
    int32_t t0, n; /* first token (batch index) and token count */
} eng_cuda_tile_t;

#define ENG_CUDA_ATT_WARPS 4
#define ENG_CUDA_ATT_RPW   8 /* query rows per warp */
#define ENG_CUDA_ATT_ROWS  (ENG_CUDA_ATT_WARPS * ENG_CUDA_ATT_RPW)
#define ENG_CUDA_ATT_KEYS  32  /* keys per shared-memory tile: one per lane */
#define ENG_CUDA_TC_ROWS   128 /* tokens per tensor-core attention tile (16 per warp, 8 warps) */
#define ENG_CUDA_TC_MIN    32  /* a sequence with at least this many new tokens takes the tensor-core path */

/* x[t] = embd[tokens[t]] as f32. */
void eng_cuda_embed(float *x, const __nv_bfloat16 *embd, const int32_t *tokens, int32_t n_tokens, int32_t dim,
                    cudaStream_t st);
/* y[r] = bf16(x[rows[r]] / rms(x[rows[r]]) * w); rows NULL: r itself. */
void eng_cuda_rmsnorm(__nv_bfloat16 *y, const float *x, const int32_t *rows, const float *w, int32_t n_rows,
                      int32_t dim, float eps, cudaStream_t st);
/* cos/sin table per token: angle pos * theta^(-2i/head_dim), in double like the CPU backend. */
void eng_cuda_rope_table(float *cs, const int32_t *tok_pos, int32_t n_tokens, int32_t head_dim, double theta,
                         cudaStream_t st);
/* From the fused projection qkv (T, q_dim + 2 kv_dim), f32 or (is_qkv_bf16) bf16, + bias when not NULL: RoPE'd Q
 * into q (T, q_dim) f32, RoPE'd K and V into the token's slot of layer `layer` of the KV pool. */
void eng_cuda_rope_store(float *q, eng_cuda_kv_t *kv_pool, const void *qkv, bool is_qkv_bf16, const float *bias,
                         const eng_cuda_tokens_t *tk, int32_t layer, int32_t n_heads, int32_t n_kv_heads,
                         int32_t head_dim, cudaStream_t st);
/* Causal attention over the paged cache for every token of the batch. */
typedef struct {
    __nv_bfloat16 *att;           /* out: (T, n_heads * head_dim) */
    const float *q;               /* (T, n_heads * head_dim), RoPE applied */
    const eng_cuda_kv_t *kv_pool; /* the whole pool */
    const eng_cuda_tile_t *tiles; /* (n_tiles) device: CUDA-core tiles (decode, short chunks) */
    int32_t n_tiles, layer, n_heads, n_kv_heads, head_dim;
    int32_t split_keys, n_splits;    /* 0, 1: each (tile, KV head) in one block; else keys per split block */
    float *part_acc, *part_ml;       /* split scratch: (n_splits, T, q_dim) and (n_splits, T, n_heads, 2) */
    const eng_cuda_tile_t *tc_tiles; /* (n_tc_tiles) device: tensor-core tiles of ENG_CUDA_TC_ROWS tokens (prefill) */
    int32_t n_tc_tiles;
    /* true: the CUDA-core tiles go to the tensor-core decode kernel (eng_cuda_attn_decode.cu) instead, which takes
     * tiles of at most eng_cuda_dec_tile_tokens tokens (one or two m16 tiles of query rows); see eng_cuda_dec_usable */
    bool is_dec_mma;
    int32_t dec_m16;   /* the decode kernel's m16 tiles a block: 1 (or 0), or 2 (head_dim 64; tiles of up to 32 rows) */
    int32_t mma_terms; /* prefill tiles: Q and P as 1 f16 term, or 2 (hi + lo; eng_cuda_attn_mma.cu) */
} eng_cuda_att_t;
cudaError_t eng_cuda_attention(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st);
/* The tensor-core tiles of a (eng_cuda_attn_mma.cu); eng_cuda_attention calls it. */
cudaError_t eng_cuda_attention_mma(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st);

/* Decode and short chunks on tensor cores (eng_cuda_attn_decode.cu): one m16 tile of query rows (tokens x the G
 * query heads of one KV head) per block, or two for head_dim 64 (eng_cuda_att_t.dec_m16), keys shared out over the
 * block's warps. Usable for head_dim 64 or 128 and G <= ENG_CUDA_DEC_ROWS; a tile then holds ENG_CUDA_DEC_ROWS / G
 * tokens, twice that for head_dim 64 (a speculative verification of 8 tokens at G = 3 is one tile, so its keys are
 * read once; two m16 tiles at head_dim 128 would spill). */
#define ENG_CUDA_DEC_ROWS 16
static inline bool eng_cuda_dec_usable(int32_t head_dim, int32_t n_heads, int32_t n_kv_heads) {
    return (head_dim == 64 || head_dim == 128) && n_kv_heads > 0 && n_heads % n_kv_heads == 0 &&
           n_heads / n_kv_heads <= ENG_CUDA_DEC_ROWS;
}
static inline int32_t eng_cuda_dec_max_m16(int32_t head_dim) {
    return head_dim == 64 ? 2 : 1;
}
/* Most tokens of a decode-kernel tile at m16 m16 tiles of query rows a block. */
static inline int32_t eng_cuda_dec_tile_tokens(int32_t m16, int32_t n_heads, int32_t n_kv_heads) {
    return (m16 > 1 ? 2 : 1) * ENG_CUDA_DEC_ROWS / (n_heads / n_kv_heads);
}
/* Most tokens of a CUDA-core tile (eng_cuda_att_t.tiles) for the kernel is_dec_mma picks, the decode kernel at m16
 * m16 tiles a block (eng_cuda_att_t.dec_m16): the tiles the caller builds and the split merge's grid both follow it. */
static inline int32_t eng_cuda_att_tile_tokens(bool is_dec_mma, int32_t m16, int32_t n_heads, int32_t n_kv_heads) {
    return is_dec_mma ? eng_cuda_dec_tile_tokens(m16, n_heads, n_kv_heads) : ENG_CUDA_ATT_ROWS / (n_heads / n_kv_heads);
}
/* The m16 tiles the decode kernel gives each tile: 1 while no tile holds more than ENG_CUDA_DEC_ROWS query rows
 * (max_tile_tokens x G), else 2 (head_dim 64 only). */
static inline int32_t eng_cuda_dec_m16(int32_t max_tile_tokens, int32_t n_heads, int32_t n_kv_heads) {
    return max_tile_tokens * (n_heads / n_kv_heads) > ENG_CUDA_DEC_ROWS ? 2 : 1;
}
cudaError_t eng_cuda_attention_dec(const eng_cuda_att_t *a, const eng_cuda_tokens_t *tk, cudaStream_t st);
/* Element offset of (layer, K or V, block, slot) in the pool (eng_kv_layout.h: chunks of block_size x kv_dim). */
static __device__ __forceinline__ size_t s_kv_slot(const eng_cuda_tokens_t tk, int32_t layer, int32_t kind,
                                                   int32_t block, int32_t slot, int32_t kv_dim) {
    size_t chunk = ((size_t)layer * 2u + (size_t)kind) * (size_t)tk.n_blocks + (size_t)block;
    return (chunk * (size_t)tk.block_size + (size_t)slot) * (size_t)kv_dim;
}
/* Matrix-vector products for small batches (decode, speculative verification): y (n_tok, n_out) [+]= x (n_tok, k)
 * . w (n_out, k)^T, bf16 operands, f32 accumulate and output, every weight read once from HBM (streaming loads)
 * for all n_tok rows. cuBLAS reaches ~75% of copy bandwidth on these shapes; this aims at >= 90%. Returns false
 * and launches nothing where the shape is not handled (n_tok < 1 or > ENG_CUDA_GEMV_MAX_TOK, k % 8 != 0, a
 * pointer not 16-byte aligned): the caller then uses cuBLAS. */
#define ENG_CUDA_GEMV_MAX_TOK            8
/* ... except on tensor cores (eng_cuda_gemv_mma_takes), which take up to ENG_CUDA_GEMV_MMA_MAX_TOK rows of bf16 x (not
 * the normalising variants: those stay at ENG_CUDA_GEMV_MAX_TOK): up to ENG_CUDA_GEMV_MMA_ALL_MAX_TOK for every matrix,
 * more only for weights of at most ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES. On the H100 (test_cuda_gemv) 16 rows beat cuBLAS
 * on the 8B and 1B Q/K/V, O and head (8B Q/K/V 85% of copy bandwidth against 74%) but not on 8B gate/up (85% against
 * 92%), and 24-32 rows lost on every 1B and 8B matrix (8B Q/K/V 53-56% against 73%: four column tiles and two steps of
 * loads); on SmolLM2's small, latency-bound matrices they win at every row count (960 x 576 at 32 rows: 4.0 us against
 * 12.2). */
#define ENG_CUDA_GEMV_MMA_ALL_MAX_TOK    16
#define ENG_CUDA_GEMV_MMA_MAX_TOK        32
#define ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES ((int64_t)4 << 20)
bool eng_cuda_gemv(float *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out, int32_t k,
                   bool is_accumulate, cudaStream_t st);
/* y += x . w^T as above (up to ENG_CUDA_GEMV_MAX_TOK rows, else refused), each new y also written to y_bf16 as bf16:
 * the residual's O and down products leave the next product's x ready for its folded norm (eng_cuda_norm_t.xb). */
bool eng_cuda_gemv_acc_copy(float *y, __nv_bfloat16 *y_bf16, const __nv_bfloat16 *x, const __nv_bfloat16 *w,
                            int32_t n_tok, int32_t n_out, int32_t k, cudaStream_t st);
/* Products of at least ENG_CUDA_GEMV_MMA_MIN_TOK rows (every variant below too) run on tensor cores
 * (eng_cuda_gemv_mma.cu): same contract, a different summation order, and the normalising variants take up to
 * ENG_CUDA_GEMV_MAX_TOK rows there. eng_cuda_gemv_mma_set changes the bound process-wide (the backend sets it at create
 * from ENG_CUDA_GEMV_MMA; 0: never, the CUDA-core kernel for every row count); eng_cuda_gemv_mma_takes says whether
 * n_tok rows go to tensor cores. */
#define ENG_CUDA_GEMV_MMA_MIN_TOK 1
void eng_cuda_gemv_mma_set(int32_t min_tok);
bool eng_cuda_gemv_mma_takes(int32_t n_tok);
/* Opt-in: rows 9..ENG_CUDA_GEMV_TILE_MAX_TOK of bf16 x that the kernel above does not take (all above 32, and 17..32
 * of weights over ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES) may go to a tiled tensor-core kernel through shared memory
 * (eng_cuda_gemv_tile.cu) instead of cuBLAS: same contract, another summation order (k split over up to 8 blocks for
 * matrices of few row tiles, by shape alone). It lost to cuBLAS in the H100's decode step, so it is off by default.
 * eng_cuda_gemv_tile_set(max_tok) enables it up to max_tok rows process-wide (<= ENG_CUDA_GEMV_MAX_TOK: off, the
 * default; the backend sets it at create from ENG_CUDA_GEMV_TILE); it prepares the kernels on the current device (call
 * it with that device current, outside stream capture), and leaves the kernel off where that fails.
 * eng_cuda_gemv_tile_takes: whether it takes n_tok rows. */
#define ENG_CUDA_GEMV_TILE_MAX_TOK 64
void eng_cuda_gemv_tile_set(int32_t max_tok);
bool eng_cuda_gemv_tile_takes(int32_t n_tok);
/* A/B switch of its pipeline depth (ENG_CUDA_GEMV_TILE_STAGES): 3 or 4 stages of 64 k, anything else: chosen per
 * product so that the grid fits one wave (the default). */
void eng_cuda_gemv_tile_set_stages(int32_t n_stages);
/* A/B switch of the most blocks that share a product's k (ENG_CUDA_GEMV_TILE_SPLIT): 1, 2, 4 or 8 (the default;
 * anything else: 8). */
void eng_cuda_gemv_tile_set_split(int32_t n_split);
/* A/B switch of the tensor-core kernel's loads in flight (ENG_CUDA_GEMV_MMA_U): 4 (the default) or 8 steps. */
void eng_cuda_gemv_mma_set_steps(int32_t steps);
/* A/B switch of how the folded norm's products sum x^2 from the bf16 copy (ENG_CUDA_FOLD_SS): false (the default), one
 * more MMA per x fragment; true, FMAs on CUDA cores. Process-wide. */
void eng_cuda_gemv_mma_set_fold_ss(bool is_fma);
/* A/B switch (ENG_CUDA_FOLD_PDL=0): the folded variants launched without PDL, after the previous kernel completes. */
void eng_cuda_gemv_mma_set_fold_pdl(bool is_on);
/* A/B switch (ENG_CUDA_GEMV_MMA_W16=0): grids of at most one block per SM keep 8-warp blocks instead of 16. */
void eng_cuda_gemv_mma_set_wide(bool is_on);
/* The normalising variants on tensor cores refuse weights of more than this many bytes: each block computes its
 * tokens' 1 / rms before its first MMA, which on the H100 cost more than the separate norm's launch saved (8B decode
 * 153 against 171 tok/s at batch 1, 1B 2-4% slower) and less only on SmolLM2-135M's small matrices (batch 1 0.745
 * against 0.793 ms a step; its Q/K/V and gate/up are 1.1 and 3.5 MB). */
#define ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES ((int64_t)8 << 20)
/* A/B switch of that bound (ENG_CUDA_GEMV_MMA_NORM_MB), process-wide, and the bound in force. */
void eng_cuda_gemv_mma_set_norm_max(int64_t bytes);
int64_t eng_cuda_gemv_mma_norm_max(void);
/* The same product fused with what follows it, for weights whose rows come in pairs:
 *   _swiglu: w_gate_up (2 hidden, k) with gate and up rows interleaved (row 2j gate j, 2j + 1 up j); writes
 *            h (n_tok, hidden) = bf16(silu(gate) * up) instead of the products;
 *   _qkv:    the fused Q/K/V projection of tk's tokens (n_tok = tk->n_tokens): adds the bias, RoPEs Q and K with
 *            tk->rope_cs like eng_cuda_rope_store, writes Q to q (f32) and K, V into the tokens' pool slots.
 * Same refusals as eng_cuda_gemv (false: nothing launched; the caller runs the product and the next kernel). */
typedef struct {
    float *q;               /* (n_tok, n_heads * head_dim) */
    eng_cuda_kv_t *kv_pool; /* the whole pool */
    const float *bias;      /* (q_dim + 2 kv_dim) or NULL */
    int32_t layer, n_heads, n_kv_heads, head_dim;
} eng_cuda_qkv_dst_t;
bool eng_cuda_gemv_swiglu(__nv_bfloat16 *h, const __nv_bfloat16 *x, const __nv_bfloat16 *w_gate_up, int32_t n_tok,
                          int32_t hidden, int32_t k, cudaStream_t st);
bool eng_cuda_gemv_qkv(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const __nv_bfloat16 *x,
                       const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st);
/* _norm: the same three with the RMSNorm that produces x folded into the kernel (one launch less per norm): x is
 * formed from the f32 residual rows as eng_cuda_rmsnorm(x, xn->x, NULL, xn->w, n_tok, k, xn->eps) would write
 * it, each token's 1 / rms computed in every block. Its summation order differs from eng_cuda_rmsnorm's, so the
 * scale may differ in the last ulp and, rarely, an element of x by one bf16 ulp: equal to the unfused sequence to
 * within rounding, not bit for bit. The outputs (y, h, q, the pool) must not overlap xn->x. Refuses, besides
 * eng_cuda_gemv's shapes, weights over eng_cuda_gemv_mma_norm_max() on tensor cores, n_tok > ENG_CUDA_GEMV_NORM_MAX_TOK
 * on CUDA cores (each block re-reads its tokens' rows, a cost that grows with n_tok while the launch saved does not)
 * and xn->x or xn->w not 16-byte aligned; the caller then runs eng_cuda_rmsnorm and the unfused call.
 * xn->w NULL: the norm weight is folded into w (w[o][i] = W[o][i] * w_norm[i], done at load), so the product is
 * (w . bf16(x)) / rms(x): the kernel takes the residual rows as they are and scales the totals after its merge (before
 * the epilogue: bias, RoPE, SwiGLU), nothing waits for the norm. x comes as bf16 from xn->xb where that holds bf16(x)
 * (eng_cuda_gemv_acc_copy wrote it), and 1 / rms then from those bf16 values (one more MMA per x fragment: the rows'
 * Gram diagonal); else from the f32 rows, converted in the loop (twice the bytes of x per block: the H100's 8B step
 * lost 1% at batch 1 so, and gains 1.5% with the copy). Tensor cores only (up to ENG_CUDA_GEMV_MAX_TOK rows, no
 * weight-size bound); elsewhere refused, and the caller's eng_cuda_rmsnorm then takes a weight of ones. Within
 * rounding of the unfolded sequence: x and the folded weights each rounded to bf16 once. */
#define ENG_CUDA_GEMV_NORM_MAX_TOK 2
typedef struct {
    const float *x; /* (n_tok, k) f32 residual rows */
    const float *w; /* (k) norm weight, or NULL: folded into the matrix */
    float eps;
    const __nv_bfloat16 *xb; /* w NULL: bf16(x) (n_tok, k), or NULL: convert x in the kernel */
} eng_cuda_norm_t;
bool eng_cuda_gemv_norm(float *y, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w, int32_t n_tok, int32_t n_out,
                        int32_t k, bool is_accumulate, cudaStream_t st);
bool eng_cuda_gemv_swiglu_norm(__nv_bfloat16 *h, const eng_cuda_norm_t *xn, const __nv_bfloat16 *w_gate_up,
                               int32_t n_tok, int32_t hidden, int32_t k, cudaStream_t st);
bool eng_cuda_gemv_qkv_norm(const eng_cuda_qkv_dst_t *d, const eng_cuda_tokens_t *tk, const eng_cuda_norm_t *xn,
                            const __nv_bfloat16 *wqkv, int32_t k, cudaStream_t st);
/* h = bf16(silu(gate) * up) for gu (T, 2 hidden) f32 with gate and up interleaved (column 2j gate j, 2j + 1 up j). */
void eng_cuda_swiglu(__nv_bfloat16 *h, const float *gu, int32_t n_tokens, int32_t hidden, cudaStream_t st);
/* The same from gu in bf16 (prefill: half the bytes); hidden % 4 == 0, h and gu 16-byte aligned. */
void eng_cuda_swiglu_bf16(__nv_bfloat16 *h, const __nv_bfloat16 *gu, int32_t n_tokens, int32_t hidden, cudaStream_t st);
/* Copies every chunk (n_chunks_per_block = layers x 2) of the n listed blocks from src to dst, two pools of one
 * layout (device pointers; mapped host memory included); chunk_bytes a multiple of 16. */
void eng_cuda_kv_copy(void *dst, const void *src, const int32_t *blocks, int32_t n, int32_t n_chunks_per_block,
                      int32_t n_blocks_pool, size_t chunk_bytes, cudaStream_t st);
/* Copies chunks [first_chunk, first_chunk + n_chunks) (layer * 2 + kind) of blocks pairs[i] of src (n_blocks_src per
 * layer and kind) to blocks pairs[n + i] of dst (n_blocks_dst), i < n: two pools of one chunk size and different sizes
 * (another process's, through CUDA IPC). */
void eng_cuda_kv_copy_pairs(void *dst, const void *src, const int32_t *pairs, int32_t n, int32_t first_chunk,
                            int32_t n_chunks, int32_t n_blocks_dst, int32_t n_blocks_src, size_t chunk_bytes,
                            cudaStream_t st);

#endif
