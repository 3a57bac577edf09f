/* eng_backend_cuda.cu: the CUDA backend. Weights live on the GPU in bf16 (dequantized at load from any type the
 * CPU backend reads), with Q/K/V and gate/up fused into one matrix each so a layer is four GEMMs (cuBLAS, bf16 in,
 * f32 accumulate; at 1..8 rows our own matrix-vector kernels, eng_cuda_gemv*.cu). The residual stream stays f32 on
 * the GPU and the residual adds ride in the products (beta = 1).
 * The KV pool is f16 on the GPU (eng_cuda_kv_t, eng_cuda_ops.cuh says why) in the eng_kv_layout.h layout, with an
 * optional pinned host mirror for kvtransfer.
 * A forward copies the batch's small tables up once, runs every layer on one stream (replaying a CUDA graph per
 * batch shape for small batches) and copies back only the logits asked for. Prefill chunks of >= 32 tokens take the
 * tensor-core attention (eng_cuda_attn_mma.cu), decode rows and short chunks the tensor-core decode kernel
 * (eng_cuda_attn_decode.cu; ENG_CUDA_DEC_MMA=0: the CUDA-core one in eng_cuda_ops.cu).
 * A batch with sampling requests is sampled on the GPU (eng_cuda_sample.cu): only token ids and logprobs come back.
 *
 * With a host mirror (kvtransfer's source), a forward marked eng_batch_t.is_kv_to_host copies each layer's new K/V
 * there on a side stream while the next layers compute. Not yet here (issue 6): CUDA IPC between workers on one GPU. */
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h> /* sysconf */

extern "C" {
#include "eng_backend.h"
#include "eng_quant.h"
#include "pd_log.h"
}
#include "eng_cuda_ops.cuh"
#include "eng_cuda_sample.cuh"
#include "eng_cuda_lt.cuh"

#define S_LOGIT_ROWS       256 /* logits rows per output-head GEMM: bounds the device logits buffer */
#define S_MAX_SPLITS       32  /* attention key splits (small decode batches) ... */
#define S_SPLIT_MAX_TOKENS 128 /* ... for batches of at most this many tokens: bounds the partials' scratch */
/* default ENG_CUDA_GEMV: own matrix-vector kernels up to this many rows (on tensor cores above 8: cuBLAS ran the 8B
 * products of 16-64 rows at 74-88% of copy bandwidth, bench/gemm_lt) */
#define S_GEMV_MAX_TOK     ENG_CUDA_GEMV_MMA_MAX_TOK
/* ... with RoPE / SwiGLU in their epilogue (and RMSNorm in the prologue) where the tensor-core kernel takes the rows,
 * else up to this many (on CUDA cores at 4 rows 1B lost 3%) */
#define S_FUSE_MAX_TOK     2
/* Batches of at least this many tokens (prefill) take the gate/up products in bf16 instead of f32: half the bytes
 * that GEMM writes and SwiGLU reads (the f32 pair was 940 MB per layer at 8B x 8192 tokens), for one more bf16
 * rounding of each input of SwiGLU, whose output is bf16 anyway (ENG_CUDA_GU_BF16=0: f32 always). */
#define S_GU_BF16_MIN_TOK  512
/* ... and the Q/K/V product in bf16 from as many tokens (ENG_CUDA_QKV_BF16=0: f32 always): the f32 output made it
 * the slowest of the prefill GEMMs (8B x 8192 tokens: 67% of the bf16 peak against 92% for gate/up in bf16); Q and
 * K are rounded to bf16 once more before RoPE, and K and V are stored as f16 after it anyway */

/* ENG_CUDA_PROFILE=1: per-phase GPU times from events around each kernel, summed over forwards and logged at
 * destroy (events do not synchronise, so the forward's own timing barely moves). */
enum { P_EMBED, P_NORM, P_QKV, P_ROPE, P_ATTN, P_WO, P_GATE_UP, P_SWIGLU, P_DOWN, P_HEAD, P_N };
static const char *const s_phase_names[P_N] = {"embed",  "norm",    "qkv gemm", "rope+store", "attention",
                                               "o gemm", "gate_up", "swiglu",   "down gemm",  "head+copy"};
#define S_PROF_EVENTS 2048

/* A captured forward. Every pointer it uses is fixed at create (scratch, the batch tables' device buffer); what
 * varies between batches of one key lives in that buffer, copied up before each launch. */
/* Speculative verification makes many shapes (token, tile and logits-row counts step by step): at 64 slots n-gram
 * drafting on the H100 captured 129 graphs in a run where plain decode captured 44, so shapes were evicted and
 * captured again. */
#define S_MAX_GRAPHS       256
#define S_GRAPH_MAX_ROWS   256 /* logits rows: one output-head slice */
#define S_GRAPH_MAX_TOKENS 512
typedef struct {
    int64_t T, n_tiles, n_tc_tiles, n_logits, split_keys, n_splits, dec_m16; /* the key; T == 0: slot free */
    bool is_logits;                                                          /* ... and whether the logits come back */
    bool is_sample;   /* ... and whether the graph samples them and copies the results out (is_graph_sample) */
    bool is_captured; /* exec holds the graph (the key was seen twice) */
    cudaGraphExec_t exec;
    uint64_t last_used;
    int64_t n_launches; /* since the capture */
    /* ENG_CUDA_STEP_TIMES=1: whole eng_forward wall time vs the graph's own GPU time, summed over its launches but
     * the first after a capture (cudaGraphUpload makes it cheap; timing it anyway would put a one-time cost in a
     * per-step mean); the host's part split at the launch call and at the synchronisation */
    int64_t n_timed;
    double wall_ms, gpu_ms, smp_ms; /* GPU: the graph and, if outside it, the sampling kernel after it (smp_ms) */
    double prep_ms, wait_ms;        /* host: start to the launch call; launch call to the synchronisation's return */
} s_graph_t;

typedef struct {
    float *attn_norm, *ffn_norm; /* (dim) */
    __nv_bfloat16 *wqkv;         /* (q_dim + 2 kv_dim, dim) */
    float *bqkv;                 /* (q_dim + 2 kv_dim) or NULL */
    __nv_bfloat16 *wo;           /* (dim, q_dim) */
    __nv_bfloat16 *w_gate_up;    /* (2 hidden_dim, dim): gate and up rows interleaved (2j gate j, 2j + 1 up j) */
    __nv_bfloat16 *w_down;       /* (dim, hidden_dim) */
} s_layer_t;

/* One eng_batch_t.kv_host_layers store, made by a kv_st callback. */
typedef struct {
    int32_t *dst;
    int32_t n_layers;
} s_kv_note_t;

/* Where the folded norm runs (be->is_fold_norm): every batch of the matrix-vector kernel for models up to this wide,
 * one row for wider ones. Measured on the H100 (bench/RESULTS.md, engine_cuda, session 17): Llama-3.2-1B (2048) +3-4%
 * at batch 1 and +4-5% at 8, SmolLM2's 8-token verification 10% faster, Llama-3.1-8B (4096) +1.5% at batch 1 but 10%
 * slower at 8 rows. Elsewhere the unfolded path runs on the folded weights (norm weights of ones): the same cost. */
#define S_FOLD_ALL_MAX_DIM 2048

struct eng_backend {
    const eng_model_t *m;
    eng_kv_layout_t kv;
    int gpu;
    cudaStream_t st;
    cublasHandle_t blas;
    int32_t max_tokens, max_seqs, max_table; /* scratch limits */
    /* weights */
    __nv_bfloat16 *embd, *output; /* output == embd when tied */
    float *out_norm;
    s_layer_t *layers;
    eng_cuda_kv_t *kv_pool;
    /* scratch, sized for max_tokens */
    float *x, *qkv, *q, *gu, *rope_cs, *logits;
    __nv_bfloat16 *xb, *att, *h;
    /* what a forward uploads, in one copy from a pinned host buffer to a device buffer: a sampling forward's
     * requests (one per logits row, up to max_tokens of them) first, then the batch's int32 tables (meta_cap
     * elements at most); up_h/up_d are both, smp_req_* the first part, meta_* the second (placed per forward) */
    uint8_t *up_d, *up_h;
    int32_t *meta_d, *meta_h;
    size_t meta_cap; /* int32 elements */
    float *logits_h; /* pinned (S_LOGIT_ROWS, vocab) */
    /* sampling on the GPU: one request and one result per logits row, the rows' penalty lists (grown on demand), and
     * scratch rows for the penalised logits / weights */
    eng_cuda_sample_req_t *smp_req_h, *smp_req_d;
    eng_cuda_sample_out_t *smp_out_h, *smp_out_d;
    eng_pen_t *smp_pen_h, *smp_pen_d;
    int64_t smp_pen_cap;
    float *smp_work; /* (S_LOGIT_ROWS, vocab), allocated by the first sampling forward: a prefill worker never
                      * samples on the GPU, and at a 128k vocabulary this is 131 MB */
    /* padding to graph buckets (s_forward): the KV layout's last block takes the pad tokens' K/V; -1: no padding
     * (ENG_CUDA_PAD=0) */
    int32_t pad_block;
    int n_sm;
    float *part_acc, *part_ml; /* attention split partials */
    /* host mirror of the KV pool for kvtransfer (eng_params.kv_host_mirror): mapped pinned memory */
    uint8_t *mirror, *mirror_d;
    /* set when the mirror came from eng_params_t.kv_host_alloc and is pinned by cudaHostRegister (else cudaHostAlloc) */
    void (*mirror_free)(void *ctx, void *p, size_t bytes);
    void *mirror_ctx;
    int32_t *sync_ids, *sync_ids_d; /* the block list of one eng_kv_to_host / eng_kv_from_host (mapped) */
    /* same-GPU hand-off from another process's pool (eng_kv_peer_*), on the one thread that calls those: created with
     * the first peer; (source, destination) block id pairs, mapped */
    cudaStream_t peer_st;
    int32_t *peer_ids, *peer_ids_d;
    /* KV streamed to the mirror during a forward (eng_batch_t.is_kv_to_host; ENG_CUDA_KV_STREAM=0: never): after each
     * layer's K/V store, kv_st copies that layer's chunks of the blocks the batch writes, by the copy engine, one
     * cudaMemcpyAsync per run of consecutive block ids and kind. kv_runs holds the last streamed forward's runs
     * (first block, count), n_kv_runs = 0 when the last forward streamed nothing. */
    cudaStream_t kv_st;
    cudaEvent_t kv_stored, kv_done; /* main stream: a layer's K/V stored; kv_st: the streamed copies done */
    int32_t *kv_runs, n_kv_runs;
    bool is_kv_stream, is_kv_streamed; /* ... the last forward completed with its KV streamed (kv_runs) */
    /* eng_batch_t.kv_host_layers while streaming: after layer l's copies, a kv_st callback stores l + 1 there from
     * kv_notes[l]; the forward drains kv_st before it returns, so no store lands after eng_forward */
    s_kv_note_t *kv_notes; /* (n_layers) */
    bool is_kv_noting;
    bool is_tc;       /* tensor-core attention for prefill chunks (ENG_CUDA_TC=0: CUDA cores for all) */
    bool is_dec_mma;  /* ... and for decode rows and short chunks (ENG_CUDA_DEC_MMA=0 or an unusable head shape: not) */
    int dec_m16_mode; /* its m16 tiles a block (s_forward_run): 0 by the batch, ENG_CUDA_DEC_M16=1 / 2: 1 / 2 (A/B) */
    int32_t mma_terms;    /* prefill attention: Q and P as 1 f16 term, or 2 (hi + lo; ENG_CUDA_ATTN_TERMS=2) */
    int32_t gemv_max_tok; /* products of up to this many rows go to eng_cuda_gemv (ENG_CUDA_GEMV=N, 0: none) */
    bool is_fused;        /* ... with RoPE and SwiGLU in its epilogue (ENG_CUDA_FUSE=0: separate kernels) */
    bool is_gu_bf16;      /* prefill-sized batches take gate/up in bf16 (S_GU_BF16_MIN_TOK; ENG_CUDA_GU_BF16=0: not) */
    bool is_qkv_bf16;     /* ... and Q/K/V (ENG_CUDA_QKV_BF16=0: not) */
    bool is_fused_norm;   /* ... and the RMSNorm before it in its prologue (ENG_CUDA_FUSE_NORM=0: separate kernel) */
    /* the attention and ffn norm weights folded into Q/K/V and gate/up at load (ENG_CUDA_FOLD_NORM=0: not): the
     * tensor-core products then scale by 1 / rms after their loop instead of normalising before it, for every matrix
     * size (where S_FOLD_ALL_MAX_DIM says); attn_norm and ffn_norm hold ones for the norms of the other paths */
    bool is_fold_norm;
    int32_t fold_all_max_dim; /* S_FOLD_ALL_MAX_DIM, or ENG_CUDA_FOLD_ALL_MAX_DIM for A/B */
    /* CUDA graphs of whole forwards, keyed by the shape scalars the kernels take (ENG_CUDA_GRAPHS=0: off) */
    bool is_graphs, is_step_times;
    /* a sampling forward's graph also samples and copies the results out: one launch per decode step
     * (ENG_CUDA_GRAPH_SAMPLE=0: the sampling kernel and the copy are enqueued after the graph) */
    bool is_graph_sample;
    cudaEvent_t step_ev[3]; /* before the graph, after it, after the sampling kernel */
    s_graph_t graphs[S_MAX_GRAPHS];
    uint64_t graph_clock;
    int64_t n_captures, n_graph_launches, n_direct; /* forwards: graphs captured, replayed; launched directly */
    int64_t n_first_sightings;                      /* of n_direct, graph-eligible shapes seen for the first time */
    int64_t n_evicted;                              /* captured graphs dropped for a new shape (least recently used) */
    void *blas_ws;
    eng_cuda_lt_t *lt; /* GEMM algorithms tuned at create (s_tune_gemms), or NULL */
    /* profiling (ENG_CUDA_PROFILE) */
    bool is_prof;
    cudaEvent_t *ev;
    int n_ev, ev_phase[S_PROF_EVENTS / 2];
    double prof_ms[P_N], prof_host_ms, prof_wall_ms;
    int64_t n_prof;
    uint64_t t_launched;
};

static void s_prof_mark(eng_backend_t *be, int phase, bool is_start) {
    if (!be->is_prof || be->n_ev >= S_PROF_EVENTS) return;
    if (is_start) be->ev_phase[be->n_ev / 2] = phase;
    cudaEventRecord(be->ev[be->n_ev++], be->st);
}

/* After the forward's sync: adds each event pair's time to its phase. */
static void s_prof_collect(eng_backend_t *be, double host_ms, double wall_ms) {
    if (!be->is_prof) return;
    for (int i = 0; i + 1 < be->n_ev; i += 2) {
        float ms = 0;
        cudaEventElapsedTime(&ms, be->ev[i], be->ev[i + 1]);
        be->prof_ms[be->ev_phase[i / 2]] += ms;
    }
    be->n_ev = 0, be->n_prof++, be->prof_host_ms += host_ms, be->prof_wall_ms += wall_ms;
}

static void s_prof_report(eng_backend_t *be) {
    if (!be->is_prof || !be->n_prof) return;
    double total = 0;
    for (int p = 0; p < P_N; p++) total += be->prof_ms[p];
    fprintf(stderr,
            "cuda profile over %lld forwards: wall %.3f ms, host (to the last launch) %.3f ms, kernels %.3f ms\n",
            (long long)be->n_prof, be->prof_wall_ms / be->n_prof, be->prof_host_ms / be->n_prof, total / be->n_prof);
    for (int p = 0; p < P_N; p++)
        fprintf(stderr, "  %-11s %8.3f ms %5.1f%%\n", s_phase_names[p], be->prof_ms[p] / be->n_prof,
                100.0 * be->prof_ms[p] / (total > 0 ? total : 1));
}

/* After a launch: a bad launch configuration is reported where it happened, with its kernel named. */
#define S_LAUNCHED(what) S_CUDA(cudaGetLastError(), what)

#define S_CUDA(call, what)                                               \
    do {                                                                 \
        cudaError_t e_ = (call);                                         \
        if (e_ != cudaSuccess) {                                         \
            LOG_E("cuda backend: %s: %s", what, cudaGetErrorString(e_)); \
            return PD_EBACKEND;                                          \
        }                                                                \
    } while (0)

/* The CUDA runtime's current device belongs to the calling thread, and a service creates its backend on one thread
 * and runs forwards and KV copies on others (the engine thread, the loop thread): so every entry point selects
 * be->gpu first. Without it a worker on GPU 1 set its kernels' shared-memory limits on GPU 0 and its first decode step
 * failed ("attention: invalid argument", two H200s). */
static cudaError_t s_bind(const eng_backend_t *be) {
    int dev = -1;
    if (cudaGetDevice(&dev) == cudaSuccess && dev == be->gpu) return cudaSuccess;
    return cudaSetDevice(be->gpu);
}

static void s_free_dev(void *p) {
    if (p) cudaFree(p);
}

static void s_destroy(eng_backend_t **pbe) {
    if (!pbe || !*pbe) return;
    eng_backend_t *be = *pbe;
    s_bind(be);
    if (be->st) cudaStreamSynchronize(be->st);
    s_prof_report(be);
    if (be->n_graph_launches + be->n_direct > 0)
        LOG_I("cuda backend: %lld forwards: %lld from %lld captured graphs (%lld evicted), %lld launched directly",
              (long long)(be->n_graph_launches + be->n_direct), (long long)be->n_graph_launches,
              (long long)be->n_captures, (long long)be->n_evicted, (long long)be->n_direct);
    for (int i = 0; i < S_MAX_GRAPHS; i++) {
        const s_graph_t *g = &be->graphs[i];
        if (be->is_step_times && g->T && g->n_timed) {
            char smp[48] = "sampling in the graph";
            if (!g->is_sample) snprintf(smp, sizeof(smp), "sampling after it %.3f", g->smp_ms / g->n_timed);
            fprintf(stderr,
                    "cuda graph steps of %lld tokens: %lld launches, forward wall %.3f ms, GPU %.3f ms (%s), host "
                    "%.3f ms (%.1f%% of GPU; before the launch %.3f, launch to synchronised %.3f)\n",
                    (long long)g->T, (long long)g->n_timed, g->wall_ms / g->n_timed, g->gpu_ms / g->n_timed, smp,
                    (g->wall_ms - g->gpu_ms) / g->n_timed, 100.0 * (g->wall_ms - g->gpu_ms) / g->gpu_ms,
                    g->prep_ms / g->n_timed, g->wait_ms / g->n_timed);
        }
        if (g->is_captured) cudaGraphExecDestroy(g->exec);
    }
    if (be->is_step_times)
        for (int i = 0; i < 3; i++) cudaEventDestroy(be->step_ev[i]);
    s_free_dev(be->blas_ws);
    eng_cuda_lt_destroy(&be->lt);
    for (int i = 0; be->ev && i < S_PROF_EVENTS; i++) cudaEventDestroy(be->ev[i]);
    free(be->ev);
    s_free_dev(be->part_acc), s_free_dev(be->part_ml);
    if (be->kv_st) cudaStreamSynchronize(be->kv_st), cudaStreamDestroy(be->kv_st);
    if (be->kv_stored) cudaEventDestroy(be->kv_stored);
    if (be->kv_done) cudaEventDestroy(be->kv_done);
    free(be->kv_runs), free(be->kv_notes);
    if (be->mirror && be->mirror_free) {
        cudaHostUnregister(be->mirror);
        be->mirror_free(be->mirror_ctx, be->mirror, eng_kv_pool_bytes(&be->kv));
    } else if (be->mirror) {
        cudaFreeHost(be->mirror);
    }
    if (be->sync_ids) cudaFreeHost(be->sync_ids);
    if (be->peer_st) cudaStreamSynchronize(be->peer_st), cudaStreamDestroy(be->peer_st);
    if (be->peer_ids) cudaFreeHost(be->peer_ids);
    if (be->layers) {
        for (int32_t l = 0; l < be->m->cfg.n_layers; l++) {
            s_layer_t *w = &be->layers[l];
            s_free_dev(w->attn_norm), s_free_dev(w->ffn_norm), s_free_dev(w->wqkv), s_free_dev(w->bqkv);
            s_free_dev(w->wo), s_free_dev(w->w_gate_up), s_free_dev(w->w_down);
        }
        free(be->layers);
    }
    if (be->output != be->embd) s_free_dev(be->output);
    s_free_dev(be->embd), s_free_dev(be->out_norm), s_free_dev(be->kv_pool);
    s_free_dev(be->x), s_free_dev(be->qkv), s_free_dev(be->q), s_free_dev(be->gu), s_free_dev(be->rope_cs);
    s_free_dev(be->logits), s_free_dev(be->xb), s_free_dev(be->att), s_free_dev(be->h), s_free_dev(be->up_d);
    if (be->up_h) cudaFreeHost(be->up_h);
    if (be->logits_h) cudaFreeHost(be->logits_h);
    if (be->smp_out_h) cudaFreeHost(be->smp_out_h);
    if (be->smp_pen_h) cudaFreeHost(be->smp_pen_h);
    s_free_dev(be->smp_out_d), s_free_dev(be->smp_pen_d), s_free_dev(be->smp_work);
    if (be->blas) cublasDestroy(be->blas);
    if (be->st) cudaStreamDestroy(be->st);
    free(be);
    *pbe = NULL;
}

/* ---- weight upload: rows converted on the host into a pinned staging buffer, then copied ---- */

typedef struct {
    void *stage; /* pinned */
    size_t stage_bytes;
    float *row;    /* one dequantized row */
    int n_threads; /* converting rows to bf16 (eng_rows_to_bf16) */
} s_uploader_t;

/* Rows [0, w->rows) of w as bf16 into dst (row-major, cols elements each), row r at dst row r * row_step; col_scale
 * (cols, or NULL): each column multiplied by it before the rounding to bf16 (a norm weight folded in). */
static pd_status s_upload_bf16(s_uploader_t *u, __nv_bfloat16 *dst, const eng_weight_t *w, int32_t row_step,
                               const float *col_scale) {
    const size_t row_out = (size_t)w->cols * sizeof(uint16_t);
    const int64_t rows_per_chunk = (int64_t)(u->stage_bytes / row_out);
    for (int64_t r0 = 0; r0 < w->rows; r0 += rows_per_chunk) {
        const int64_t nr = w->rows - r0 < rows_per_chunk ? w->rows - r0 : rows_per_chunk;
        uint16_t *out = (uint16_t *)u->stage;
        const uint8_t *src = (const uint8_t *)w->data + (uint64_t)r0 * w->row_bytes;
        if (w->type == ENG_GGML_BF16 && !col_scale) {
            memcpy(out, src, (size_t)nr * row_out);
        } else if (eng_rows_to_bf16(w->type, src, w->row_bytes, nr, w->cols, col_scale, out, u->n_threads) != PD_OK) {
            LOG_E("cuda backend: cannot dequantize a %s weight", eng_ggml_type_name(w->type));
            return PD_EINVAL;
        }
        S_CUDA(cudaMemcpy2D(dst + r0 * row_step * w->cols, row_out * row_step, out, row_out, row_out, (size_t)nr,
                            cudaMemcpyHostToDevice),
               "upload weights");
    }
    return PD_OK;
}

/* A vector (norm weight, bias) as f32 into host (w->rows * w->cols floats). */
static pd_status s_dequant_vec(float *host, const eng_weight_t *w) {
    for (int64_t r = 0; r < w->rows; r++)
        if (eng_dequant(w->type, (const uint8_t *)w->data + (uint64_t)r * w->row_bytes, host + r * w->cols, w->cols) !=
            PD_OK)
            return PD_EINVAL;
    return PD_OK;
}

/* ... and on to dst. */
static pd_status s_upload_f32(s_uploader_t *u, float *dst, const eng_weight_t *w) {
    if (s_dequant_vec(u->row, w) != PD_OK) return PD_EINVAL;
    S_CUDA(cudaMemcpy(dst, u->row, (size_t)(w->rows * w->cols) * sizeof(float), cudaMemcpyHostToDevice),
           "upload vector");
    return PD_OK;
}

/* A layer's norm weight: dequantized into g (host: what s_upload_bf16 folds into the matrix after it), and on to dst
 * as it is, or (is_folded) as ones, its values then being in that matrix. */
static pd_status s_upload_norm(s_uploader_t *u, float *dst, float *g, const eng_weight_t *w, bool is_folded) {
    if (s_dequant_vec(g, w) != PD_OK) return PD_EINVAL;
    const int64_t n = w->rows * w->cols;
    if (is_folded)
        for (int64_t i = 0; i < n; i++) u->row[i] = 1.0f;
    S_CUDA(cudaMemcpy(dst, is_folded ? u->row : g, (size_t)n * sizeof(float), cudaMemcpyHostToDevice), "upload norm");
    return PD_OK;
}

static pd_status s_alloc(void **p, size_t bytes, const char *what) {
    S_CUDA(cudaMalloc(p, bytes), what);
    return PD_OK;
}

#define S_TRY(x)                     \
    do {                             \
        if ((x) != PD_OK) goto fail; \
    } while (0)

static pd_status s_upload_model(eng_backend_t *be) {
    const eng_model_t *m = be->m;
    const eng_model_config_t *c = &m->cfg;
    const int64_t q_dim = (int64_t)c->n_heads * c->head_dim, kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    const int64_t qkv_dim = q_dim + 2 * kv_dim, bf = sizeof(__nv_bfloat16);
    int64_t widest = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    if (qkv_dim > widest) widest = qkv_dim;
    const long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    s_uploader_t u = {NULL, (size_t)64 << 20, NULL, n_cpu < 1 ? 1 : n_cpu > 16 ? 16 : (int)n_cpu};
    pd_status st = PD_EBACKEND;
    const bool fold = be->is_fold_norm;
    float *g_attn = (float *)malloc(sizeof(float) * (size_t)c->dim),
          *g_ffn = (float *)malloc(sizeof(float) * (size_t)c->dim);
    u.row = (float *)malloc(sizeof(float) * (size_t)widest);
    if (!u.row || !g_attn || !g_ffn || cudaMallocHost(&u.stage, u.stage_bytes) != cudaSuccess) goto fail;

    S_TRY(s_alloc((void **)&be->embd, (size_t)c->vocab_size * c->dim * bf, "embeddings"));
    S_TRY(s_upload_bf16(&u, be->embd, &m->tok_embd, 1, NULL));
    if (c->tied_embeddings) {
        be->output = be->embd;
    } else {
        S_TRY(s_alloc((void **)&be->output, (size_t)c->vocab_size * c->dim * bf, "output head"));
        S_TRY(s_upload_bf16(&u, be->output, &m->output, 1, NULL));
    }
    S_TRY(s_alloc((void **)&be->out_norm, sizeof(float) * c->dim, "norm"));
    S_TRY(s_upload_f32(&u, be->out_norm, &m->out_norm));
    be->layers = (s_layer_t *)calloc((size_t)c->n_layers, sizeof(s_layer_t));
    if (!be->layers) goto fail;
    for (int32_t l = 0; l < c->n_layers; l++) {
        const eng_layer_weights_t *src = &m->layers[l];
        s_layer_t *w = &be->layers[l];
        S_TRY(s_alloc((void **)&w->attn_norm, sizeof(float) * c->dim, "norm"));
        S_TRY(s_alloc((void **)&w->ffn_norm, sizeof(float) * c->dim, "norm"));
        S_TRY(s_upload_norm(&u, w->attn_norm, g_attn, &src->attn_norm, fold));
        S_TRY(s_upload_norm(&u, w->ffn_norm, g_ffn, &src->ffn_norm, fold));
        const float *qkv_scale = fold ? g_attn : NULL, *gu_scale = fold ? g_ffn : NULL;
        S_TRY(s_alloc((void **)&w->wqkv, (size_t)(qkv_dim * c->dim * bf), "wqkv"));
        S_TRY(s_upload_bf16(&u, w->wqkv, &src->wq, 1, qkv_scale));
        S_TRY(s_upload_bf16(&u, w->wqkv + q_dim * c->dim, &src->wk, 1, qkv_scale));
        S_TRY(s_upload_bf16(&u, w->wqkv + (q_dim + kv_dim) * c->dim, &src->wv, 1, qkv_scale));
        if (c->has_qkv_bias) {
            S_TRY(s_alloc((void **)&w->bqkv, sizeof(float) * (size_t)qkv_dim, "bias"));
            S_TRY(s_upload_f32(&u, w->bqkv, &src->bq));
            S_TRY(s_upload_f32(&u, w->bqkv + q_dim, &src->bk));
            S_TRY(s_upload_f32(&u, w->bqkv + q_dim + kv_dim, &src->bv));
        }
        S_TRY(s_alloc((void **)&w->wo, (size_t)(c->dim * q_dim * bf), "wo"));
        S_TRY(s_upload_bf16(&u, w->wo, &src->wo, 1, NULL));
        S_TRY(s_alloc((void **)&w->w_gate_up, (size_t)(2 * (int64_t)c->hidden_dim * c->dim * bf), "w_gate_up"));
        /* interleaved, so that one warp of the matrix-vector kernel holds a gate/up pair (SwiGLU in its epilogue) */
        S_TRY(s_upload_bf16(&u, w->w_gate_up, &src->w_gate, 2, gu_scale));
        S_TRY(s_upload_bf16(&u, w->w_gate_up + c->dim, &src->w_up, 2, gu_scale));
        S_TRY(s_alloc((void **)&w->w_down, (size_t)((int64_t)c->dim * c->hidden_dim * bf), "w_down"));
        S_TRY(s_upload_bf16(&u, w->w_down, &src->w_down, 1, NULL));
    }
    st = PD_OK;
fail:
    if (u.stage) cudaFreeHost(u.stage);
    free(u.row), free(g_attn), free(g_ffn);
    return st;
}

/* The host mirror in the caller's memory (eng_params_t.kv_host_alloc: pd-prefill's shared-memory pool), pinned and
 * mapped in place so the streamed copies run at the copy engine's speed. Leaves be->mirror NULL (the caller then
 * allocates the usual pinned memory) when there is no such memory or CUDA cannot pin it. */
static void s_mirror_place(eng_backend_t *be, const eng_params_t *p) {
    size_t bytes = eng_kv_pool_bytes(&be->kv);
    void *mem = p->kv_host_alloc ? p->kv_host_alloc(p->kv_host_ctx, bytes) : NULL;
    if (!mem) return;
    cudaError_t e = cudaHostRegister(mem, bytes, cudaHostRegisterMapped);
    if (e != cudaSuccess) {
        LOG_W("cuda backend: cannot pin the caller's KV mirror memory (%s); using its own", cudaGetErrorString(e));
        (void)cudaGetLastError();
        p->kv_host_free(p->kv_host_ctx, mem, bytes);
        return;
    }
    be->mirror = (uint8_t *)mem, be->mirror_free = p->kv_host_free, be->mirror_ctx = p->kv_host_ctx;
}

/* The products of decode-sized batches that cuBLAS runs (from the first graph bucket above be->gemv_max_tok, at least
 * 16, to max_rows tokens, in steps of 8), timed with each algorithm on every layer's weights (eng_cuda_lt.cuh); the
 * activations and outputs are scratch that no forward holds yet. A failed tuning leaves cuBLAS's default. */
static void s_tune_gemms(eng_backend_t *be, int64_t max_rows) {
    const eng_model_config_t *c = &be->m->cfg;
    const int64_t dim = c->dim, q_dim = (int64_t)c->n_heads * c->head_dim,
                  kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    const uint64_t t0 = pd_now_us();
    be->lt = eng_cuda_lt_create(be->st);
    const __nv_bfloat16 **w = (const __nv_bfloat16 **)calloc(4 * (size_t)c->n_layers, sizeof *w);
    if (!be->lt || !w) {
        LOG_W("cuda backend: GEMM tuning unavailable; cuBLAS's default algorithms");
        eng_cuda_lt_destroy(&be->lt), free(w);
        return;
    }
    for (int32_t l = 0; l < c->n_layers; l++) {
        const s_layer_t *ly = &be->layers[l];
        w[l] = ly->wqkv, w[c->n_layers + l] = ly->wo, w[2 * c->n_layers + l] = ly->w_gate_up;
        w[3 * c->n_layers + l] = ly->w_down;
    }
    if (max_rows > be->max_tokens) max_rows = be->max_tokens;
    if (max_rows > S_LOGIT_ROWS) max_rows = S_LOGIT_ROWS; /* the output head's scratch */
    double worst = 0.0, best = 1.0;
    const int64_t m0 = be->gemv_max_tok < 16 ? 16 : (be->gemv_max_tok / 8 + 1) * 8; /* the first that cuBLAS runs */
    for (int64_t m = m0; m <= max_rows; m += 8) {
        const eng_cuda_lt_shape_t shapes[5] = {
            {m, q_dim + 2 * kv_dim, dim, CUDA_R_32F, false, w, c->n_layers, be->xb, be->gu},
            {m, dim, q_dim, CUDA_R_32F, true, w + c->n_layers, c->n_layers, be->att, be->gu},
            {m, 2 * (int64_t)c->hidden_dim, dim, CUDA_R_32F, false, w + 2 * c->n_layers, c->n_layers, be->xb, be->gu},
            {m, dim, c->hidden_dim, CUDA_R_32F, true, w + 3 * c->n_layers, c->n_layers, be->h, be->gu},
            {m, c->vocab_size, dim, CUDA_R_32F, false, (const __nv_bfloat16 *const *)&be->output, 1, be->xb,
             be->logits},
        };
        for (int i = 0; i < 5; i++) {
            const double r = eng_cuda_lt_tune(be->lt, be->blas, &shapes[i], 16, NULL);
            if (r > 0) worst = r > worst ? r : worst, best = r < best ? r : best;
        }
    }
    free(w);
    int32_t n_tuned = 0, n_kept = 0;
    eng_cuda_lt_counts(be->lt, &n_tuned, &n_kept);
    LOG_I("cuda backend: GEMMs of %lld..%lld rows tuned in %.2f s: a cuBLASLt algorithm for %d of %d shapes "
          "(time vs cuBLAS's default %.3f..%.3f)",
          (long long)m0, (long long)max_rows, (double)(pd_now_us() - t0) / 1e6, n_kept, n_tuned, best, worst);
}

static eng_backend_t *s_create(const eng_model_t *m, const eng_kv_layout_t *kv, const eng_params_t *p, char *err,
                               size_t err_cap) {
    const eng_model_config_t *c = &m->cfg;
    if (kv->dtype != ENG_KV_F16) {
        snprintf(err, err_cap, "cuda backend: KV dtype must be f16");
        return NULL;
    }
    if (c->head_dim != 64 && c->head_dim != 128) {
        snprintf(err, err_cap, "cuda backend: head_dim %d not supported (64 or 128)", c->head_dim);
        return NULL;
    }
    if (c->n_heads % c->n_kv_heads || c->n_heads / c->n_kv_heads > ENG_CUDA_ATT_ROWS || c->rope_dim != c->head_dim) {
        snprintf(err, err_cap, "cuda backend: head layout %d/%d (rope %d) not supported", c->n_heads, c->n_kv_heads,
                 c->rope_dim);
        return NULL;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || p->gpu < 0 || p->gpu >= n_dev) {
        snprintf(err, err_cap, "cuda backend: GPU %d not available (%d visible)", p->gpu, n_dev);
        return NULL;
    }
    eng_backend_t *be = (eng_backend_t *)calloc(1, sizeof *be);
    if (!be) return NULL;
    be->m = m, be->kv = *kv, be->gpu = p->gpu;
    be->max_tokens = p->max_batch_tokens, be->max_seqs = p->max_batch_seqs;
    const int64_t T = be->max_tokens, q_dim = (int64_t)c->n_heads * c->head_dim,
                  kv_dim = (int64_t)c->n_kv_heads * c->head_dim;
    /* every sequence's table can cover the whole context */
    be->max_table = be->max_seqs * ((c->ctx_len + kv->block_size - 1) / kv->block_size);
    if (cudaSetDevice(be->gpu) != cudaSuccess || cudaStreamCreateWithFlags(&be->st, cudaStreamNonBlocking) ||
        cublasCreate(&be->blas) != CUBLAS_STATUS_SUCCESS ||
        cublasSetStream(be->blas, be->st) != CUBLAS_STATUS_SUCCESS) {
        snprintf(err, err_cap, "cuda backend: cannot set up GPU %d (stream, cuBLAS)", be->gpu);
        goto fail;
    }
    {
        const char *fold_norm = getenv("ENG_CUDA_FOLD_NORM"); /* read before the upload, which folds */
        be->is_fold_norm = !(fold_norm && *fold_norm == '0');
    }
    if (s_upload_model(be) != PD_OK) {
        snprintf(err, err_cap, "cuda backend: cannot upload the weights (see the log)");
        goto fail;
    }
    if (s_alloc((void **)&be->kv_pool, eng_kv_pool_bytes(kv), "KV pool") != PD_OK) {
        snprintf(err, err_cap, "cuda backend: cannot allocate a KV pool of %zu bytes", eng_kv_pool_bytes(kv));
        goto fail;
    }
    be->meta_cap = (size_t)(6 * T + be->max_table + 64); /* tokens, positions, table offsets, rows, tiles */
    if (s_alloc((void **)&be->x, sizeof(float) * T * c->dim, "scratch") ||
        s_alloc((void **)&be->qkv, sizeof(float) * T * (q_dim + 2 * kv_dim), "scratch") ||
        s_alloc((void **)&be->q, sizeof(float) * T * q_dim, "scratch") ||
        s_alloc((void **)&be->gu, sizeof(float) * T * 2 * c->hidden_dim, "scratch") ||
        s_alloc((void **)&be->rope_cs, sizeof(float) * T * c->head_dim, "scratch") ||
        s_alloc((void **)&be->logits, sizeof(float) * S_LOGIT_ROWS * c->vocab_size, "scratch") ||
        s_alloc((void **)&be->xb, sizeof(__nv_bfloat16) * T * c->dim, "scratch") ||
        s_alloc((void **)&be->att, sizeof(__nv_bfloat16) * T * q_dim, "scratch") ||
        s_alloc((void **)&be->h, sizeof(__nv_bfloat16) * T * c->hidden_dim, "scratch") ||
        s_alloc((void **)&be->up_d, sizeof(eng_cuda_sample_req_t) * T + sizeof(int32_t) * be->meta_cap, "scratch") ||
        cudaMallocHost(&be->up_h, sizeof(eng_cuda_sample_req_t) * T + sizeof(int32_t) * be->meta_cap) != cudaSuccess ||
        cudaMallocHost(&be->logits_h, sizeof(float) * S_LOGIT_ROWS * c->vocab_size) != cudaSuccess ||
        s_alloc((void **)&be->smp_out_d, sizeof(eng_cuda_sample_out_t) * T, "scratch") ||
        cudaMallocHost(&be->smp_out_h, sizeof(eng_cuda_sample_out_t) * T) != cudaSuccess) {
        snprintf(err, err_cap, "cuda backend: cannot allocate scratch for %lld tokens", (long long)T);
        goto fail;
    }
    be->smp_req_h = (eng_cuda_sample_req_t *)be->up_h, be->smp_req_d = (eng_cuda_sample_req_t *)be->up_d;
    cudaDeviceGetAttribute(&be->n_sm, cudaDevAttrMultiProcessorCount, be->gpu);
    if (p->kv_host_mirror) {
        s_mirror_place(be, p);
        bool is_ok = be->mirror ||
                     cudaHostAlloc((void **)&be->mirror, eng_kv_pool_bytes(kv), cudaHostAllocMapped) == cudaSuccess;
        is_ok = is_ok && cudaHostGetDevicePointer((void **)&be->mirror_d, be->mirror, 0) == cudaSuccess &&
                cudaHostAlloc((void **)&be->sync_ids, sizeof(int32_t) * (size_t)kv->n_blocks, cudaHostAllocMapped) ==
                    cudaSuccess &&
                cudaHostGetDevicePointer((void **)&be->sync_ids_d, be->sync_ids, 0) == cudaSuccess;
        if (!is_ok) {
            snprintf(err, err_cap, "cuda backend: cannot allocate a pinned host mirror of the KV pool (%zu bytes)",
                     eng_kv_pool_bytes(kv));
            goto fail;
        }
    }
    if (be->mirror) {
        const char *kv_stream = getenv("ENG_CUDA_KV_STREAM");
        be->is_kv_stream = !(kv_stream && *kv_stream == '0');
        be->kv_runs = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)kv->n_blocks);
        be->kv_notes = (s_kv_note_t *)calloc((size_t)kv->n_layers, sizeof *be->kv_notes);
        if (!be->kv_runs || !be->kv_notes ||
            cudaStreamCreateWithFlags(&be->kv_st, cudaStreamNonBlocking) != cudaSuccess ||
            cudaEventCreateWithFlags(&be->kv_stored, cudaEventDisableTiming) != cudaSuccess ||
            cudaEventCreateWithFlags(&be->kv_done, cudaEventDisableTiming) != cudaSuccess) {
            snprintf(err, err_cap, "cuda backend: cannot create the KV copy stream");
            goto fail;
        }
    }
    if (s_alloc((void **)&be->part_acc, sizeof(float) * S_MAX_SPLITS * S_SPLIT_MAX_TOKENS * q_dim, "scratch") ||
        s_alloc((void **)&be->part_ml, sizeof(float) * S_MAX_SPLITS * S_SPLIT_MAX_TOKENS * c->n_heads * 2, "scratch")) {
        snprintf(err, err_cap, "cuda backend: cannot allocate attention scratch");
        goto fail;
    }
    {
        const char *prof = getenv("ENG_CUDA_PROFILE"), *graphs = getenv("ENG_CUDA_GRAPHS");
        be->is_prof = prof && *prof && *prof != '0';
        const char *tc = getenv("ENG_CUDA_TC");
        be->is_tc = !(tc && *tc == '0');
        const char *dec_mma = getenv("ENG_CUDA_DEC_MMA");
        be->is_dec_mma = !(dec_mma && *dec_mma == '0') && eng_cuda_dec_usable(c->head_dim, c->n_heads, c->n_kv_heads);
        const char *dec_m16 = getenv("ENG_CUDA_DEC_M16");
        be->dec_m16_mode = dec_m16 && (*dec_m16 == '1' || *dec_m16 == '2') ? *dec_m16 - '0' : 0;
        const char *terms = getenv("ENG_CUDA_ATTN_TERMS");
        be->mma_terms = terms && *terms == '2' ? 2 : 1;
        /* the tiled kernel up to this many rows (default 0: off; it lost to cuBLAS in the decode step, RESULTS) */
        const char *gemv_tile = getenv("ENG_CUDA_GEMV_TILE");
        const int32_t tile_max = gemv_tile && *gemv_tile ? atoi(gemv_tile) : 0;
        eng_cuda_gemv_tile_set(tile_max);
        const bool is_tile_wider = eng_cuda_gemv_tile_takes(tile_max) && tile_max > S_GEMV_MAX_TOK;
        const char *gemv = getenv("ENG_CUDA_GEMV");
        be->gemv_max_tok = gemv && *gemv ? atoi(gemv) : is_tile_wider ? tile_max : S_GEMV_MAX_TOK;
        const char *gemv_mma = getenv("ENG_CUDA_GEMV_MMA"); /* tensor cores from this many rows (0: never) */
        eng_cuda_gemv_mma_set(gemv_mma && *gemv_mma ? atoi(gemv_mma) : ENG_CUDA_GEMV_MMA_MIN_TOK);
        const char *tile_stages = getenv("ENG_CUDA_GEMV_TILE_STAGES");
        eng_cuda_gemv_tile_set_stages(tile_stages && *tile_stages ? atoi(tile_stages) : 0);
        const char *tile_split = getenv("ENG_CUDA_GEMV_TILE_SPLIT");
        eng_cuda_gemv_tile_set_split(tile_split && *tile_split ? atoi(tile_split) : 0);
        const char *norm_mb = getenv("ENG_CUDA_GEMV_MMA_NORM_MB");
        eng_cuda_gemv_mma_set_norm_max(norm_mb && *norm_mb ? (int64_t)atoi(norm_mb) << 20
                                                           : ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES);
        const char *mma_u = getenv("ENG_CUDA_GEMV_MMA_U");
        eng_cuda_gemv_mma_set_steps(mma_u && *mma_u ? atoi(mma_u) : 4);
        const char *fold_ss = getenv("ENG_CUDA_FOLD_SS"); /* "fma": the folded norm's x^2 on CUDA cores */
        eng_cuda_gemv_mma_set_fold_ss(fold_ss && strcmp(fold_ss, "fma") == 0);
        const char *w16 = getenv("ENG_CUDA_GEMV_MMA_W16");
        eng_cuda_gemv_mma_set_wide(!(w16 && *w16 == '0'));
        const char *fold_pdl = getenv("ENG_CUDA_FOLD_PDL");
        eng_cuda_gemv_mma_set_fold_pdl(!(fold_pdl && *fold_pdl == '0'));
        const char *fold_dim = getenv("ENG_CUDA_FOLD_ALL_MAX_DIM"); /* A/B of S_FOLD_ALL_MAX_DIM */
        be->fold_all_max_dim = fold_dim && *fold_dim ? atoi(fold_dim) : S_FOLD_ALL_MAX_DIM;
        const char *fuse = getenv("ENG_CUDA_FUSE");
        be->is_fused = !(fuse && *fuse == '0');
        const char *gu_bf16 = getenv("ENG_CUDA_GU_BF16");
        be->is_gu_bf16 = !(gu_bf16 && *gu_bf16 == '0');
        const char *qkv_bf16 = getenv("ENG_CUDA_QKV_BF16");
        be->is_qkv_bf16 = !(qkv_bf16 && *qkv_bf16 == '0');
        const char *fuse_norm = getenv("ENG_CUDA_FUSE_NORM");
        be->is_fused_norm = !(fuse_norm && *fuse_norm == '0');
        /* our kernels start while the one before drains (PDL, eng_cuda_ops.cuh; sm_90 on); ENG_CUDA_PDL=0: not */
        const char *pdl = getenv("ENG_CUDA_PDL");
        int cc_major = 0;
        cudaDeviceGetAttribute(&cc_major, cudaDevAttrComputeCapabilityMajor, be->gpu);
        eng_cuda_pdl_set(!(pdl && *pdl == '0') && cc_major >= 9);
        const char *prewait = getenv("ENG_CUDA_PREWAIT"); /* older data before the PDL wait (eng_cuda_ops.cuh) */
        eng_cuda_prewait_set(!(prewait && *prewait == '0'));
        const char *dec_ilp = getenv("ENG_CUDA_DEC_ILP"); /* the decode attention's loop (eng_cuda_ops.cuh) */
        eng_cuda_dec_ilp_set(!(dec_ilp && *dec_ilp == '0'));
        be->is_graphs = !(graphs && *graphs == '0') && !be->is_prof; /* events in a capture would time nothing */
        const char *graph_sample = getenv("ENG_CUDA_GRAPH_SAMPLE");
        be->is_graph_sample = !(graph_sample && *graph_sample == '0');
        const char *pad = getenv("ENG_CUDA_PAD");
        be->pad_block = pad && *pad == '0' ? -1 : kv->n_blocks - 1; /* eng_backend.h: has_pad_block */
        const char *step_times = getenv("ENG_CUDA_STEP_TIMES");
        be->is_step_times =
            step_times && *step_times && *step_times != '0' && cudaEventCreate(&be->step_ev[0]) == cudaSuccess &&
            cudaEventCreate(&be->step_ev[1]) == cudaSuccess && cudaEventCreate(&be->step_ev[2]) == cudaSuccess;
        if (be->is_prof) {
            be->ev = (cudaEvent_t *)calloc(S_PROF_EVENTS, sizeof(cudaEvent_t));
            for (int i = 0; be->ev && i < S_PROF_EVENTS; i++) cudaEventCreate(&be->ev[i]);
        }
    }
    {
        const char *tune = getenv("ENG_CUDA_LT_TUNE");
        const int64_t rows = tune && *tune ? atoi(tune) : p->gemm_tune_rows;
        if (rows >= 16) s_tune_gemms(be, rows);
    }
    {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        LOG_I("cuda backend: GPU %d, weights bf16 uploaded%s; %.1f of %.1f GiB free; PDL %s", be->gpu,
              be->is_fold_norm ? " (norms folded into Q/K/V and gate/up)" : "", free_b / 1073741824.0,
              total_b / 1073741824.0, eng_cuda_pdl_is_on() ? "on" : "off");
    }
    return be;
fail:
    s_destroy(&be);
    return NULL;
}

/* Y (n_tok, n_out) [+]= X (n_tok, k) . W (n_out, k)^T: bf16 operands, f32 accumulate and output (y_type
 * CUDA_R_16BF: rounded to bf16 on output; cuBLAS only). */
static pd_status s_gemm_as(eng_backend_t *be, void *y, cudaDataType_t y_type, const __nv_bfloat16 *x,
                           const __nv_bfloat16 *w, int64_t n_tok, int64_t n_out, int64_t k, bool is_accumulate) {
    if (y_type == CUDA_R_32F && n_tok <= be->gemv_max_tok &&
        eng_cuda_gemv((float *)y, x, w, (int32_t)n_tok, (int32_t)n_out, (int32_t)k, is_accumulate, be->st)) {
        S_LAUNCHED("matrix-vector product");
        return PD_OK;
    }
    if (be->lt && eng_cuda_lt_gemm(be->lt, y, y_type, x, w, n_tok, n_out, k, is_accumulate)) return PD_OK;
    const float alpha = 1.0f, beta = is_accumulate ? 1.0f : 0.0f;
    cublasStatus_t s =
        cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, (int)n_tok, (int)k, &alpha, w, CUDA_R_16BF, (int)k,
                     x, CUDA_R_16BF, (int)k, &beta, y, y_type, (int)n_out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) {
        LOG_E("cuda backend: cublasGemmEx (%lld x %lld x %lld): status %d", (long long)n_tok, (long long)n_out,
              (long long)k, (int)s);
        return PD_EBACKEND;
    }
    return PD_OK;
}

static pd_status s_gemm(eng_backend_t *be, float *y, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int64_t n_tok,
                        int64_t n_out, int64_t k, bool is_accumulate) {
    return s_gemm_as(be, y, CUDA_R_32F, x, w, n_tok, n_out, k, is_accumulate);
}

/* The residual's update be->x += x . w^T (O, down). is_copy: the next product folds its norm, so the matrix-vector
 * kernel also leaves bf16(be->x) in be->xb; *is_xb says whether it did (else that product converts be->x itself). */
static pd_status s_gemm_residual(eng_backend_t *be, const __nv_bfloat16 *x, const __nv_bfloat16 *w, int64_t n_tok,
                                 int64_t n_out, int64_t k, bool is_copy, bool *is_xb) {
    *is_xb = is_copy && n_tok <= be->gemv_max_tok &&
             eng_cuda_gemv_acc_copy(be->x, be->xb, x, w, (int32_t)n_tok, (int32_t)n_out, (int32_t)k, be->st);
    if (*is_xb) {
        S_LAUNCHED("matrix-vector product");
        return PD_OK;
    }
    return s_gemm(be, be->x, x, w, n_tok, n_out, k, true);
}

/* The runs of consecutive block ids among the blocks b writes (positions [pos, pos + n_tokens) of each sequence) into
 * be->kv_runs; false (nothing to stream) when there are more than S_KV_STREAM_MAX_RUNS: each costs two copy calls
 * per layer, and a pool that fragmented is better served by one kernel after the forward (eng_kv_to_host). */
#define S_KV_STREAM_MAX_RUNS 64
static int s_cmp_i32(const void *a, const void *b) {
    const int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}
static bool s_kv_stream_plan(eng_backend_t *be, const eng_batch_t *b) {
    const int32_t bs = be->kv.block_size;
    int32_t n = 0, *ids = be->sync_ids; /* host scratch here: nothing reads it until the next eng_kv_to_host */
    for (int32_t s = 0; s < b->n_seqs; s++)
        for (int32_t i = b->pos[s] / bs; i <= (b->pos[s] + b->n_tokens[s] - 1) / bs; i++) {
            if (n == be->kv.n_blocks) return false;
            ids[n++] = b->block_tables[s][i];
        }
    qsort(ids, (size_t)n, sizeof *ids, s_cmp_i32);
    int32_t n_runs = 0;
    for (int32_t i = 0; i < n; i++) {
        int32_t *last = n_runs > 0 ? be->kv_runs + 2 * (n_runs - 1) : NULL;
        if (last && ids[i] <= last[0] + last[1]) { /* extends the run, or repeats a block of it */
            if (ids[i] == last[0] + last[1]) last[1]++;
            continue;
        }
        if (n_runs == S_KV_STREAM_MAX_RUNS) return false;
        be->kv_runs[2 * n_runs] = ids[i], be->kv_runs[2 * n_runs + 1] = 1, n_runs++;
    }
    be->n_kv_runs = n_runs;
    return n_runs > 0;
}

/* On a CUDA callback thread, in kv_st order: that many layers are in the mirror. */
static void CUDART_CB s_kv_note(void *ud) {
    const s_kv_note_t *note = (const s_kv_note_t *)ud;
    __atomic_store_n(note->dst, note->n_layers, __ATOMIC_RELEASE);
}

/* Layer l's K/V are stored (enqueued on be->st): kv_st copies its chunks of the streamed runs to the mirror (and,
 * is_kv_noting, then reports the layer). */
static pd_status s_kv_stream_layer(eng_backend_t *be, int32_t l) {
    S_CUDA(cudaEventRecord(be->kv_stored, be->st), "KV stream");
    S_CUDA(cudaStreamWaitEvent(be->kv_st, be->kv_stored, 0), "KV stream");
    const size_t chunk = eng_kv_chunk_bytes(&be->kv);
    for (int32_t r = 0; r < be->n_kv_runs; r++)
        for (int kind = 0; kind < 2; kind++) {
            const size_t off = eng_kv_chunk_offset(&be->kv, l, (eng_kv_kind_t)kind, be->kv_runs[2 * r]);
            S_CUDA(cudaMemcpyAsync(be->mirror + off, (const uint8_t *)be->kv_pool + off,
                                   chunk * (size_t)be->kv_runs[2 * r + 1], cudaMemcpyDeviceToHost, be->kv_st),
                   "KV stream");
        }
    if (be->is_kv_noting) S_CUDA(cudaLaunchHostFunc(be->kv_st, s_kv_note, &be->kv_notes[l]), "KV stream");
    if (l == be->m->cfg.n_layers - 1) S_CUDA(cudaEventRecord(be->kv_done, be->kv_st), "KV stream");
    return PD_OK;
}

/* On be->st: samples rows [r0, r0 + n) (their logits: the output head's current slice in be->logits), then, with
 * is_copy, copies the first n_copy results to be->smp_out_h (s_sample_collect reads them after a synchronisation). */
static pd_status s_sample_enqueue(eng_backend_t *be, int32_t r0, int32_t n, bool is_copy, int32_t n_copy) {
    eng_cuda_sample(be->logits, be->smp_work, n, be->m->cfg.vocab_size, be->smp_req_d + r0, be->smp_pen_d,
                    be->smp_out_d + r0, be->st);
    S_LAUNCHED("sampling");
    if (is_copy)
        S_CUDA(cudaMemcpyAsync(be->smp_out_h, be->smp_out_d, sizeof(eng_cuda_sample_out_t) * (size_t)n_copy,
                               cudaMemcpyDeviceToHost, be->st),
               "samples");
    return PD_OK;
}

/* Everything a forward runs after its tables are on the GPU, on be->st. is_logits: the logits rows go to the pinned
 * buffer, a slice at a time; when capturing (one slice) they stay there, else each slice is synchronised and its
 * rows among the caller's first n_out copied to out. is_sample: the first n_out rows are sampled (a capture's
 * n_out is every row: the pad rows' requests say skip) and the results copied to be->smp_out_h; the caller
 * synchronises. */
static pd_status s_enqueue(eng_backend_t *be, const eng_cuda_tokens_t *tkp, eng_cuda_att_t *attp, const int32_t *d_tok,
                           const int32_t *d_rows, int32_t n_logits, bool is_capture, bool is_logits, bool is_sample,
                           float *out, int32_t n_out) {
    const eng_model_config_t *c = &be->m->cfg;
    const int64_t dim = c->dim, hd = c->head_dim, q_dim = (int64_t)c->n_heads * hd,
                  kv_dim = (int64_t)c->n_kv_heads * hd, T = tkp->n_tokens;
    const eng_cuda_tokens_t tk = *tkp;
    eng_cuda_att_t att = *attp;
    const int32_t *d_pos = tk.tok_pos;
    /* batches the matrix-vector kernel takes: RoPE + KV store and SwiGLU ride in its epilogue (ENG_CUDA_FUSE=0: off) */
    const bool is_fused =
        T <= be->gemv_max_tok &&
        (T <= S_FUSE_MAX_TOK || eng_cuda_gemv_mma_takes((int32_t)T) || eng_cuda_gemv_tile_takes((int32_t)T)) &&
        be->is_fused;
    /* ... and the RMSNorm before it in its prologue, one launch less per norm (ENG_CUDA_FUSE_NORM=0: off); folded
     * into the weights, the O and down products leave the residual's bf16 copy in xb for it (is_xb: they did) */
    const bool is_fused_norm = is_fused && be->is_fused_norm;
    const bool is_fold = is_fused_norm && be->is_fold_norm && (T == 1 || dim <= be->fold_all_max_dim);
    bool is_xb = false;
    const bool is_gu_bf16 = T >= S_GU_BF16_MIN_TOK && c->hidden_dim % 4 == 0 && be->is_gu_bf16;
    const bool is_qkv_bf16 = T >= S_GU_BF16_MIN_TOK && be->is_qkv_bf16;
    s_prof_mark(be, P_EMBED, true);
    eng_cuda_embed(be->x, be->embd, d_tok, (int32_t)T, (int32_t)dim, be->st);
    eng_cuda_rope_table(be->rope_cs, d_pos, (int32_t)T, (int32_t)hd, c->rope_theta, be->st);
    S_LAUNCHED("embed, rope table");
    s_prof_mark(be, P_EMBED, false);
    for (int32_t l = 0; l < c->n_layers; l++) {
        const s_layer_t *w = &be->layers[l];
        /* attention norm and Q/K/V: one kernel where the fused one takes the batch (the norm phase is then inside
         * qkv's time), else the norm into xb and the product of xb */
        const eng_cuda_qkv_dst_t qkv_dst = {be->q, be->kv_pool, w->bqkv, l, c->n_heads, c->n_kv_heads, (int32_t)hd};
        const eng_cuda_norm_t attn_in = {be->x, is_fold ? NULL : w->attn_norm, c->rms_eps,
                                         is_fold && is_xb ? be->xb : NULL};
        bool is_qkv_fused = false;
        if (is_fused_norm) {
            s_prof_mark(be, P_QKV, true);
            is_qkv_fused = eng_cuda_gemv_qkv_norm(&qkv_dst, &tk, &attn_in, w->wqkv, (int32_t)dim, be->st);
            if (!is_qkv_fused) s_prof_mark(be, P_QKV, false); /* refused: nothing launched */
        }
        if (!is_qkv_fused) {
            s_prof_mark(be, P_NORM, true);
            eng_cuda_rmsnorm(be->xb, be->x, NULL, w->attn_norm, (int32_t)T, (int32_t)dim, c->rms_eps, be->st);
            S_LAUNCHED("attention norm");
            s_prof_mark(be, P_NORM, false), s_prof_mark(be, P_QKV, true);
            is_qkv_fused = is_fused && eng_cuda_gemv_qkv(&qkv_dst, &tk, be->xb, w->wqkv, (int32_t)dim, be->st);
            if (!is_qkv_fused && s_gemm_as(be, be->qkv, is_qkv_bf16 ? CUDA_R_16BF : CUDA_R_32F, be->xb, w->wqkv, T,
                                           q_dim + 2 * kv_dim, dim, false) != PD_OK)
                return PD_EBACKEND;
        }
        S_LAUNCHED("Q/K/V");
        s_prof_mark(be, P_QKV, false);
        if (!is_qkv_fused) {
            s_prof_mark(be, P_ROPE, true);
            eng_cuda_rope_store(be->q, be->kv_pool, be->qkv, is_qkv_bf16, w->bqkv, &tk, l, c->n_heads, c->n_kv_heads,
                                (int32_t)hd, be->st);
            S_LAUNCHED("rope + KV store");
            s_prof_mark(be, P_ROPE, false);
        }
        if (be->n_kv_runs > 0 && !is_capture && s_kv_stream_layer(be, l) != PD_OK) return PD_EBACKEND;
        s_prof_mark(be, P_ATTN, true);
        att.layer = l;
        S_CUDA(eng_cuda_attention(&att, &tk, be->st), "attention");
        s_prof_mark(be, P_ATTN, false), s_prof_mark(be, P_WO, true);
        if (s_gemm_residual(be, be->att, w->wo, T, dim, q_dim, is_fold, &is_xb) != PD_OK) return PD_EBACKEND;
        s_prof_mark(be, P_WO, false);
        /* ffn norm and gate/up: likewise */
        const eng_cuda_norm_t ffn_in = {be->x, is_fold ? NULL : w->ffn_norm, c->rms_eps,
                                        is_fold && is_xb ? be->xb : NULL};
        bool is_gu_fused = false;
        if (is_fused_norm) {
            s_prof_mark(be, P_GATE_UP, true);
            is_gu_fused = eng_cuda_gemv_swiglu_norm(be->h, &ffn_in, w->w_gate_up, (int32_t)T, c->hidden_dim,
                                                    (int32_t)dim, be->st);
            if (!is_gu_fused) s_prof_mark(be, P_GATE_UP, false); /* refused: nothing launched */
        }
        if (!is_gu_fused) {
            s_prof_mark(be, P_NORM, true);
            eng_cuda_rmsnorm(be->xb, be->x, NULL, w->ffn_norm, (int32_t)T, (int32_t)dim, c->rms_eps, be->st);
            S_LAUNCHED("ffn norm");
            s_prof_mark(be, P_NORM, false), s_prof_mark(be, P_GATE_UP, true);
            is_gu_fused = is_fused && eng_cuda_gemv_swiglu(be->h, be->xb, w->w_gate_up, (int32_t)T, c->hidden_dim,
                                                           (int32_t)dim, be->st);
            if (!is_gu_fused && s_gemm_as(be, be->gu, is_gu_bf16 ? CUDA_R_16BF : CUDA_R_32F, be->xb, w->w_gate_up, T,
                                          2 * (int64_t)c->hidden_dim, dim, false) != PD_OK)
                return PD_EBACKEND;
        }
        S_LAUNCHED("gate/up");
        s_prof_mark(be, P_GATE_UP, false);
        if (!is_gu_fused) {
            s_prof_mark(be, P_SWIGLU, true);
            if (is_gu_bf16)
                eng_cuda_swiglu_bf16(be->h, (const __nv_bfloat16 *)be->gu, (int32_t)T, c->hidden_dim, be->st);
            else
                eng_cuda_swiglu(be->h, be->gu, (int32_t)T, c->hidden_dim, be->st);
            S_LAUNCHED("swiglu");
            s_prof_mark(be, P_SWIGLU, false);
        }
        s_prof_mark(be, P_DOWN, true);
        if (s_gemm_residual(be, be->h, w->w_down, T, dim, c->hidden_dim, is_fold, &is_xb) != PD_OK) return PD_EBACKEND;
        s_prof_mark(be, P_DOWN, false);
    }
    /* final norm of the rows asked for, output head in slices of S_LOGIT_ROWS rows; none for a mid-prompt chunk */
    if (n_logits == 0) { /* the forward is still complete when eng_forward returns */
        if (!is_capture) S_CUDA(cudaStreamSynchronize(be->st), "forward");
        return PD_OK;
    }
    s_prof_mark(be, P_HEAD, true);
    be->t_launched = be->is_prof ? pd_now_us() : 0;
    eng_cuda_rmsnorm(be->xb, be->x, d_rows, be->out_norm, n_logits, (int32_t)dim, c->rms_eps, be->st);
    S_LAUNCHED("output norm");
    for (int32_t r0 = 0; r0 < n_logits; r0 += S_LOGIT_ROWS) {
        const int32_t nr = n_logits - r0 < S_LOGIT_ROWS ? n_logits - r0 : S_LOGIT_ROWS;
        const size_t row_bytes = sizeof(float) * (size_t)c->vocab_size;
        if (s_gemm(be, be->logits, be->xb + (int64_t)r0 * dim, be->output, nr, c->vocab_size, dim, false) != PD_OK)
            return PD_EBACKEND;
        if (is_logits)
            S_CUDA(cudaMemcpyAsync(be->logits_h, be->logits, row_bytes * nr, cudaMemcpyDeviceToHost, be->st), "logits");
        if (is_sample && r0 < n_out && /* the caller's rows only (pad rows come last) */
            s_sample_enqueue(be, r0, n_out - r0 < nr ? n_out - r0 : nr, r0 + nr >= n_out || is_capture, n_out) != PD_OK)
            return PD_EBACKEND;
        if (r0 + nr >= n_logits) s_prof_mark(be, P_HEAD, false);
        if (is_capture) break;         /* the caller copies after the launch */
        if (is_logits && r0 < n_out) { /* the caller's rows only (pad rows come last) */
            S_CUDA(cudaStreamSynchronize(be->st), "forward");
            memcpy(out + (size_t)r0 * c->vocab_size, be->logits_h,
                   row_bytes * (size_t)(n_out - r0 < nr ? n_out - r0 : nr));
        }
    }
    if (!is_capture && !is_logits) S_CUDA(cudaStreamSynchronize(be->st), "forward");
    return PD_OK;
}

/* The graph for this batch's key, captured the second time the key is seen (NULL with PD_OK the first time: run
 * the forward directly). Why not on first use: speculative verification makes batch shapes vary step to step, and
 * a capture + instantiate costs several directly launched forwards; a shape that comes back pays for it. The least
 * recently used slot makes room. */
static s_graph_t *s_graph_get(eng_backend_t *be, int64_t T, int64_t n_tiles, int64_t n_logits, bool is_logits,
                              bool is_sample, const eng_cuda_tokens_t *tk, eng_cuda_att_t *att, const int32_t *d_tok,
                              const int32_t *d_rows, pd_status *status) {
    *status = PD_OK;
    s_graph_t *g = NULL, *lru = &be->graphs[0];
    for (int i = 0; i < S_MAX_GRAPHS && !g; i++) {
        s_graph_t *c = &be->graphs[i];
        if (c->T == T && c->n_tiles == n_tiles && c->n_tc_tiles == att->n_tc_tiles && c->n_logits == n_logits &&
            c->split_keys == att->split_keys && c->n_splits == att->n_splits && c->dec_m16 == att->dec_m16 &&
            c->is_logits == is_logits && c->is_sample == is_sample)
            g = c;
        if (c->last_used < lru->last_used) lru = c;
    }
    if (!g) { /* first sighting: remember the key only */
        g = lru;
        if (g->is_captured) cudaGraphExecDestroy(g->exec), g->is_captured = false, be->n_evicted++;
        g->T = T, g->n_tiles = n_tiles, g->n_tc_tiles = att->n_tc_tiles, g->n_logits = n_logits,
        g->is_logits = is_logits, g->is_sample = is_sample;
        g->split_keys = att->split_keys, g->n_splits = att->n_splits, g->dec_m16 = att->dec_m16;
        g->last_used = ++be->graph_clock;
        be->n_first_sightings++;
        return NULL;
    }
    if (!g->is_captured) {
        *status = PD_EBACKEND;
        cudaGraph_t graph;
        cudaError_t e = cudaStreamBeginCapture(be->st, cudaStreamCaptureModeThreadLocal);
        if (e != cudaSuccess) {
            LOG_E("cuda backend: begin capture: %s", cudaGetErrorString(e));
            return NULL;
        }
        pd_status st = s_enqueue(be, tk, att, d_tok, d_rows, (int32_t)n_logits, true, is_logits, is_sample, NULL,
                                 (int32_t)n_logits);
        e = cudaStreamEndCapture(be->st, &graph);
        if (st != PD_OK || e != cudaSuccess) {
            LOG_E("cuda backend: capture failed: %s", cudaGetErrorString(e));
            if (e == cudaSuccess) cudaGraphDestroy(graph);
            return NULL;
        }
        e = cudaGraphInstantiate(&g->exec, graph, 0);
        cudaGraphDestroy(graph);
        if (e != cudaSuccess) {
            LOG_E("cuda backend: graph instantiate: %s", cudaGetErrorString(e));
            return NULL;
        }
        g->is_captured = true, g->n_launches = 0, be->n_captures++;
        /* the graph's first launch would otherwise upload it: a one-time cost, paid here with the capture's */
        e = cudaGraphUpload(g->exec, be->st);
        if (e != cudaSuccess) {
            LOG_E("cuda backend: graph upload: %s", cudaGetErrorString(e));
            return NULL;
        }
        *status = PD_OK;
    }
    g->last_used = ++be->graph_clock;
    return g;
}

/* Graph buckets of token and tile counts: exact up to 8, then multiples of 8. */
static int64_t s_bucket(int64_t n) {
    return n <= 8 ? n : (n + 7) / 8 * 8;
}

/* How many key splits the attention of `pairs` (tile, KV head) pairs wants: about one wave of resident blocks.
 * The CUDA-core kernel (4 blocks per multiprocessor) rounds up; the tensor-core decode kernel (2 per
 * multiprocessor) rounds down and splits only below half a wave, because each split costs it a pipeline fill
 * and a merge: on the H100 (test_cuda_attn, 8B, 640 keys) batch 32 took 43 us unsplit against 56 us in 3 splits,
 * batch 64 82 against 97 us in 2, while batch 8 took 20 us in 4 splits against 34 us unsplit. */
static int64_t s_att_splits(int64_t pairs, int n_sm, bool is_dec_mma) {
    if (pairs <= 0) return 1;
    return is_dec_mma ? 2 * (int64_t)n_sm / pairs : (4 * (int64_t)n_sm + pairs - 1) / pairs;
}

/* The keys a batch's splits are sized from: its longest sequence rounded up to 256 tokens, so that a captured graph
 * serves 256 decode steps before the split key changes. */
static int64_t s_split_len(int64_t max_len) {
    return (max_len + 255) / 256 * 256;
}

/* The most key splits a batch of T tokens whose longest sequence is max_len can take: at least 64 keys each, at most
 * S_MAX_SPLITS; 1 (none) over S_SPLIT_MAX_TOKENS tokens or at up to 64 keys. */
static int64_t s_max_splits(int64_t T, int64_t max_len) {
    if (T > S_SPLIT_MAX_TOKENS || max_len <= 64) return 1;
    const int64_t n = s_split_len(max_len) / 64;
    return n < S_MAX_SPLITS ? n : S_MAX_SPLITS;
}

/* The batch's sampling requests into the front of the pinned upload buffer (s_forward_run copies it up), rows
 * [n_logits, n_rows) as pad rows the kernel skips; the penalty lists, if any, up to the GPU on the stream. */
static pd_status s_sample_fill(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits, int32_t n_rows) {
    if (be->m->cfg.vocab_size > ENG_CUDA_SAMPLE_MAX_VOCAB) {
        LOG_E("cuda backend: sampling on the GPU takes vocabularies up to %d tokens", ENG_CUDA_SAMPLE_MAX_VOCAB);
        return PD_EINVAL;
    }
    if (!be->smp_work && s_alloc((void **)&be->smp_work, sizeof(float) * S_LOGIT_ROWS * be->m->cfg.vocab_size,
                                 "sampling scratch") != PD_OK)
        return PD_EBACKEND;
    int64_t n_pen = 0;
    for (int32_t r = 0; r < n_logits; r++) n_pen += b->sampling[r].n_pen;
    if (n_pen > be->smp_pen_cap) { /* the previous forward was waited for: nothing reads the old buffers */
        const int64_t cap = n_pen * 2 > 4096 ? n_pen * 2 : 4096;
        for (int i = 0; i < S_MAX_GRAPHS; i++) { /* graphs that sample hold the old address: capture them again */
            s_graph_t *g = &be->graphs[i];
            if (g->is_captured && g->is_sample) cudaGraphExecDestroy(g->exec), g->is_captured = false;
        }
        if (be->smp_pen_h) cudaFreeHost(be->smp_pen_h), be->smp_pen_h = NULL;
        s_free_dev(be->smp_pen_d), be->smp_pen_d = NULL, be->smp_pen_cap = 0;
        if (cudaMallocHost(&be->smp_pen_h, sizeof(eng_pen_t) * cap) != cudaSuccess ||
            s_alloc((void **)&be->smp_pen_d, sizeof(eng_pen_t) * cap, "penalty lists") != PD_OK)
            return PD_EBACKEND;
        be->smp_pen_cap = cap;
    }
    int32_t off = 0;
    for (int32_t r = 0; r < n_logits; r++) {
        const eng_row_sampling_t *rs = &b->sampling[r];
        eng_cuda_sample_req_t *q = &be->smp_req_h[r];
        q->u = rs->u, q->temperature = rs->p.temperature, q->top_p = rs->p.top_p, q->min_p = rs->p.min_p;
        q->repetition_penalty = rs->p.repetition_penalty, q->presence_penalty = rs->p.presence_penalty;
        q->frequency_penalty = rs->p.frequency_penalty, q->top_k = rs->p.top_k, q->n_logprobs = rs->p.n_logprobs;
        q->pen_off = off, q->n_pen = rs->n_pen;
        if (rs->n_pen > 0) memcpy(be->smp_pen_h + off, rs->pen, sizeof(eng_pen_t) * (size_t)rs->n_pen);
        off += rs->n_pen;
    }
    for (int32_t r = n_logits; r < n_rows; r++) {
        memset(&be->smp_req_h[r], 0, sizeof(eng_cuda_sample_req_t));
        be->smp_req_h[r].n_logprobs = -1;
    }
    if (off > 0)
        S_CUDA(cudaMemcpyAsync(be->smp_pen_d, be->smp_pen_h, sizeof(eng_pen_t) * (size_t)off, cudaMemcpyHostToDevice,
                               be->st),
               "penalty lists");
    return PD_OK;
}

/* The sampled rows in be->smp_out_h as eng_sample_result_t; the caller has synchronised the stream after their copy
 * (s_enqueue does at its end, the graph path after the launch). */
static pd_status s_sample_collect(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits) {
    for (int32_t r = 0; r < n_logits; r++) {
        const eng_cuda_sample_out_t *o = &be->smp_out_h[r];
        eng_sample_result_t *res = &b->samples[r];
        res->token = o->token, res->logprob = o->logprob, res->n_top = o->token < 0 ? 0 : o->n_top;
        for (int32_t j = 0; j < res->n_top; j++)
            res->top[j].token = o->top_token[j], res->top[j].logprob = o->top_logprob[j];
    }
    return PD_OK;
}

static pd_status s_forward_run(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits);

/* s_forward_run, and then no eng_batch_t.kv_host_layers store may follow (the caller reuses its counter for the next
 * step): the copy stream's callbacks run out here. A prefill worker waits for these copies right after anyway. */
static pd_status s_forward(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits) {
    S_CUDA(s_bind(be), "select the GPU");
    pd_status st = s_forward_run(be, b, n_logits);
    if (be->is_kv_noting) {
        be->is_kv_noting = false;
        cudaError_t e = cudaStreamSynchronize(be->kv_st);
        if (e != cudaSuccess) {
            LOG_E("cuda backend: KV copy stream: %s", cudaGetErrorString(e));
            if (st == PD_OK) st = PD_EBACKEND;
        }
    }
    return st;
}

static pd_status s_forward_run(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits) {
    const uint64_t t_start = be->is_prof || be->is_step_times ? pd_now_us() : 0;
    const eng_model_config_t *c = &be->m->cfg;
    const int64_t hd = c->head_dim;
    /* CUDA-core tiles of tile_1 tokens (the decode kernel: one m16 tile of query rows), or of tile_2 (two; head_dim 64) */
    const int32_t tile_1 = eng_cuda_att_tile_tokens(be->is_dec_mma, 1, c->n_heads, c->n_kv_heads),
                  tile_2 = eng_cuda_att_tile_tokens(be->is_dec_mma, eng_cuda_dec_max_m16((int32_t)hd), c->n_heads,
                                                    c->n_kv_heads);

    /* KV to the mirror during the forward: a previous streamed forward's copies end before this one's stores (only
     * then: a decode worker's mirror never streams, and its steps skip the wait) */
    if (be->n_kv_runs > 0) S_CUDA(cudaStreamWaitEvent(be->st, be->kv_done, 0), "KV stream");
    be->is_kv_streamed = false, be->n_kv_runs = 0;
    if (b->is_kv_to_host && be->is_kv_stream && be->mirror) (void)s_kv_stream_plan(be, b); /* sets n_kv_runs */
    be->is_kv_noting = be->n_kv_runs > 0 && b->kv_host_layers;
    for (int32_t l = 0; be->is_kv_noting && l < c->n_layers; l++)
        be->kv_notes[l].dst = b->kv_host_layers, be->kv_notes[l].n_layers = l + 1;

    /* host tables: tokens, positions, table offsets, logit rows, tiles, block tables; one copy up */
    int64_t T = 0, n_table = 0, n_tiles_1 = 0, n_tiles_2 = 0, n_tc_tiles = 0, max_len = 0;
    bool is_long = false; /* a sequence of more than tile_1 tokens in CUDA-core tiles */
    for (int32_t s = 0; s < b->n_seqs; s++) {
        if (b->pos[s] + b->n_tokens[s] > max_len) max_len = b->pos[s] + b->n_tokens[s];
        if (b->pos[s] + b->n_tokens[s] > c->ctx_len) {
            LOG_E("cuda backend: sequence %d reaches position %d, beyond the context of %d", s,
                  b->pos[s] + b->n_tokens[s], c->ctx_len);
            return PD_EINVAL;
        }
        T += b->n_tokens[s], n_table += b->n_blocks[s];
        if (be->is_tc && b->n_tokens[s] >= ENG_CUDA_TC_MIN)
            n_tc_tiles += (b->n_tokens[s] + ENG_CUDA_TC_ROWS - 1) / ENG_CUDA_TC_ROWS;
        else {
            n_tiles_1 += (b->n_tokens[s] + tile_1 - 1) / tile_1, n_tiles_2 += (b->n_tokens[s] + tile_2 - 1) / tile_2;
            is_long = is_long || b->n_tokens[s] > tile_1;
        }
    }
    /* Two m16 tiles a decode block where tiles of one would split a sequence's tokens, and where the tiles of two,
     * split along the keys as far as they go (64 keys a split), still make two waves of blocks (two per SM): each
     * block then streams its keys once for twice the rows, but takes twice as long per key. With few blocks that
     * latency is the step's. On the H100 (bench/RESULTS.md, engine_cuda, session 18), SmolLM2's verification of 8
     * tokens at 1536 keys: 1 sequence 0.682-0.690 ms with one m16 tile a block, 0.719-0.740 with two; 4 sequences
     * (one wave) 1.117-1.131 against 1.142-1.149; 8 (two waves) 1.353-1.369 against 1.315-1.319; 6 tokens at 8
     * sequences 1.340-1.358 against 1.277. ENG_CUDA_DEC_M16=1 / 2: never / always (A/B). */
    const int64_t max_splits = s_max_splits(T, max_len);
    const bool is_m16x2 = tile_2 > tile_1 && is_long && be->dec_m16_mode != 1 &&
                          (be->dec_m16_mode == 2 || n_tiles_2 * c->n_kv_heads * max_splits >= 4 * (int64_t)be->n_sm);
    const int32_t tile_tokens = is_m16x2 ? tile_2 : tile_1;
    int64_t n_tiles = is_m16x2 ? n_tiles_2 : n_tiles_1;
    if ((size_t)(3 * T + n_logits + 2 * (n_tiles + n_tc_tiles) + n_table) > be->meta_cap || T > be->max_tokens) {
        LOG_E("cuda backend: batch of %lld tokens, %lld table entries exceeds the scratch", (long long)T,
              (long long)n_table);
        return PD_EINVAL;
    }
    /* CUDA graphs are per shape (s_graph_get), and continuous batching and speculative drafts move the token and
     * tile counts step by step: a batch of CUDA-core tiles is padded to a bucket of each, so that nearby batches
     * share a graph. Pad tokens are token 0 at position 0 of the scratch block; they get no attention tile (their
     * rows carry garbage through the layers, which is harmless: every other op is row-local and nothing reads
     * them), and get logits rows when every real token does (decode: so the logits count is bucketed too). Pad
     * tiles are empty. */
    const int64_t n_real = T, n_real_logits = n_logits;
    if (be->pad_block >= 0 && be->is_graphs && n_tc_tiles == 0) {
        const int64_t T_b = s_bucket(T), n_logits_b = n_logits == T ? T_b : n_logits, tiles_b = s_bucket(n_tiles);
        if (T_b <= S_GRAPH_MAX_TOKENS && T_b <= be->max_tokens && n_logits_b <= S_GRAPH_MAX_ROWS &&
            (size_t)(3 * T_b + n_logits_b + 2 * tiles_b + n_table + 1) <= be->meta_cap)
            T = T_b, n_logits = (int32_t)n_logits_b, n_tiles = tiles_b;
    }
    const size_t need = (size_t)(3 * T + n_logits + 2 * (n_tiles + n_tc_tiles) + n_table + (T > n_real));
    /* the sampling requests first (a row each, pad rows too), then the tables; one copy up */
    const bool is_logits = b->logits != NULL, is_sample = b->sampling != NULL && n_logits > 0;
    const size_t req_bytes = is_sample ? sizeof(eng_cuda_sample_req_t) * (size_t)n_logits : 0;
    be->meta_h = (int32_t *)(be->up_h + req_bytes), be->meta_d = (int32_t *)(be->up_d + req_bytes);
    int32_t *tok = be->meta_h, *tok_pos = tok + T, *tok_table = tok_pos + T, *rows = tok_table + T;
    eng_cuda_tile_t *tiles = (eng_cuda_tile_t *)(rows + n_logits), *tc_tiles = tiles + n_tiles;
    int32_t *tables = (int32_t *)(tc_tiles + n_tc_tiles);
    memcpy(tok, b->tokens, sizeof(int32_t) * (size_t)n_real);
    int64_t t = 0, off = 0, n_rows = 0, ti = 0, tci = 0;
    for (int32_t s = 0; s < b->n_seqs; s++) {
        memcpy(tables + off, b->block_tables[s], sizeof(int32_t) * (size_t)b->n_blocks[s]);
        const bool is_tc = be->is_tc && b->n_tokens[s] >= ENG_CUDA_TC_MIN;
        const int32_t per = is_tc ? ENG_CUDA_TC_ROWS : tile_tokens;
        for (int32_t i = 0; i < b->n_tokens[s]; i += per) {
            eng_cuda_tile_t *tl = is_tc ? &tc_tiles[tci++] : &tiles[ti++];
            tl->t0 = (int32_t)(t + i), tl->n = b->n_tokens[s] - i < per ? b->n_tokens[s] - i : per;
        }
        for (int32_t i = 0; i < b->n_tokens[s]; i++, t++) {
            tok_pos[t] = b->pos[s] + i, tok_table[t] = (int32_t)off;
            bool want = b->want_logits ? b->want_logits[t] != 0 : i == b->n_tokens[s] - 1;
            if (want) rows[n_rows++] = (int32_t)t;
        }
        off += b->n_blocks[s];
    }
    for (; t < T; t++) { /* pad tokens */
        tok[t] = 0, tok_pos[t] = 0, tok_table[t] = (int32_t)off;
        if (n_logits > n_real_logits) rows[n_rows++] = (int32_t)t;
    }
    if (T > n_real) tables[off] = be->pad_block;
    for (; ti < n_tiles; ti++) tiles[ti].t0 = 0, tiles[ti].n = 0; /* pad tiles */
    PD_ASSERT(n_rows == n_logits);
    if (is_sample) {
        const pd_status st = s_sample_fill(be, b, (int32_t)n_real_logits, n_logits);
        if (st != PD_OK) return st;
    }
    S_CUDA(cudaMemcpyAsync(be->up_d, be->up_h, req_bytes + sizeof(int32_t) * need, cudaMemcpyHostToDevice, be->st),
           "copy the batch");
    const int32_t *d_tok = be->meta_d, *d_pos = d_tok + T, *d_table = d_pos + T, *d_rows = d_table + T;
    const eng_cuda_tile_t *d_tiles = (const eng_cuda_tile_t *)(d_rows + n_logits);
    const eng_cuda_tokens_t tk = {
        (int32_t)T,        d_pos,          d_table, (const int32_t *)(d_tiles + n_tiles + n_tc_tiles), be->rope_cs,
        be->kv.block_size, be->kv.n_blocks};

    /* Too few (tile, KV head) pairs to fill the GPU (small decode batches): split every sequence's keys into
     * ranges (s_att_splits), at least 64 keys each. Sized from the longest sequence rounded up to 256 tokens, so
     * that a captured graph serves 256 decode steps before the key changes. */
    eng_cuda_att_t att = {};
    att.att = be->att, att.q = be->q, att.kv_pool = be->kv_pool;
    att.tiles = d_tiles, att.n_tiles = (int32_t)n_tiles, att.is_dec_mma = be->is_dec_mma;
    att.dec_m16 = is_m16x2 ? 2 : 1;
    att.mma_terms = be->mma_terms;
    att.tc_tiles = d_tiles + n_tiles, att.n_tc_tiles = (int32_t)n_tc_tiles;
    att.n_heads = c->n_heads, att.n_kv_heads = c->n_kv_heads, att.head_dim = (int32_t)hd;
    att.split_keys = 0, att.n_splits = 1, att.part_acc = be->part_acc, att.part_ml = be->part_ml;
    const int64_t pairs = n_tiles * c->n_kv_heads, len = s_split_len(max_len);
    const int64_t want = s_att_splits(pairs, be->n_sm, be->is_dec_mma), align = be->is_dec_mma ? 64 : 32;
    if (want > 1 && s_max_splits(T, max_len) > 1) {
        int64_t keys = ((len + want - 1) / want + align - 1) / align * align;
        if (keys < 64) keys = 64;
        if ((len + keys - 1) / keys > S_MAX_SPLITS) keys = ((len + S_MAX_SPLITS - 1) / S_MAX_SPLITS + 31) / 32 * 32;
        if ((len + keys - 1) / keys > 1)
            att.split_keys = (int32_t)keys, att.n_splits = (int32_t)((len + keys - 1) / keys);
    }

    s_graph_t *g = NULL;
    if (n_logits <= S_GRAPH_MAX_ROWS && T <= S_GRAPH_MAX_TOKENS && be->is_graphs && be->n_kv_runs == 0) {
        pd_status gst;
        g = s_graph_get(be, T, n_tiles, n_logits, is_logits, is_sample && be->is_graph_sample, &tk, &att, d_tok, d_rows,
                        &gst);
        if (gst != PD_OK) return gst;
    }
    if (!g) {
        be->n_direct++;
        if (s_enqueue(be, &tk, &att, d_tok, d_rows, n_logits, false, is_logits, is_sample, b->logits,
                      (int32_t)n_real_logits) != PD_OK)
            return PD_EBACKEND;
        if (is_sample && s_sample_collect(be, b, (int32_t)n_real_logits) != PD_OK) return PD_EBACKEND;
    } else {
        be->n_graph_launches++, g->n_launches++;
        const uint64_t t_launch = be->is_step_times ? pd_now_us() : 0;
        if (be->is_step_times) cudaEventRecord(be->step_ev[0], be->st);
        S_CUDA(cudaGraphLaunch(g->exec, be->st), "graph launch");
        if (be->is_step_times) cudaEventRecord(be->step_ev[1], be->st);
        if (is_sample && !g->is_sample && /* ENG_CUDA_GRAPH_SAMPLE=0 */
            s_sample_enqueue(be, 0, (int32_t)n_real_logits, true, (int32_t)n_real_logits) != PD_OK)
            return PD_EBACKEND;
        if (be->is_step_times) cudaEventRecord(be->step_ev[2], be->st);
        S_CUDA(cudaStreamSynchronize(be->st), "forward");
        const uint64_t t_synced = be->is_step_times ? pd_now_us() : 0;
        if (is_sample && s_sample_collect(be, b, (int32_t)n_real_logits) != PD_OK) return PD_EBACKEND;
        if (is_logits) memcpy(b->logits, be->logits_h, sizeof(float) * (size_t)c->vocab_size * (size_t)n_real_logits);
        if (be->is_step_times && g->n_launches > 1) { /* the whole call against the GPU's work (s_graph_t) */
            float gpu_ms = 0, smp_ms = 0;
            cudaEventElapsedTime(&gpu_ms, be->step_ev[0], be->step_ev[2]);
            cudaEventElapsedTime(&smp_ms, be->step_ev[1], be->step_ev[2]);
            g->n_timed++, g->gpu_ms += gpu_ms, g->smp_ms += smp_ms;
            g->wall_ms += (double)(pd_now_us() - t_start) / 1e3;
            g->prep_ms += (double)(t_launch - t_start) / 1e3, g->wait_ms += (double)(t_synced - t_launch) / 1e3;
        }
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) {
        LOG_E("cuda backend: forward kernels (%lld tokens of %d sequences, %lld + %lld tensor-core tiles, %d logits, "
              "%d key splits): %s",
              (long long)T, b->n_seqs, (long long)n_tiles, (long long)n_tc_tiles, n_logits, att.n_splits,
              cudaGetErrorString(err));
        return PD_EBACKEND;
    }
    if (be->is_prof)
        s_prof_collect(be, (double)(be->t_launched - t_start) / 1e3, (double)(pd_now_us() - t_start) / 1e3);
    be->is_kv_streamed = be->n_kv_runs > 0;
    return PD_OK;
}

static void *s_kv_host_base(eng_backend_t *be) {
    return be->mirror;
}

/* Every one of the n blocks is in a run the last forward streamed. */
static bool s_kv_streamed_covers(const eng_backend_t *be, const int32_t *blocks, int32_t n) {
    for (int32_t i = 0; i < n; i++) {
        bool is_in = false;
        for (int32_t r = 0; r < be->n_kv_runs && !is_in; r++)
            is_in = blocks[i] >= be->kv_runs[2 * r] && blocks[i] < be->kv_runs[2 * r] + be->kv_runs[2 * r + 1];
        if (!is_in) return false;
    }
    return true;
}

static pd_status s_kv_sync(eng_backend_t *be, const int32_t *blocks, int32_t n, bool is_to_host) {
    if (!be->mirror) {
        LOG_E("cuda backend: KV sync without a host mirror (eng_params.kv_host_mirror)");
        return PD_EINVAL;
    }
    S_CUDA(s_bind(be), "select the GPU");
    S_CUDA(cudaEventSynchronize(be->kv_done), "KV stream"); /* no streamed copy in flight from here on */
    if (is_to_host && be->is_kv_streamed && s_kv_streamed_covers(be, blocks, n)) return PD_OK;
    memcpy(be->sync_ids, blocks, sizeof(int32_t) * (size_t)n); /* the last kernel reading it was waited for */
    eng_cuda_kv_copy(is_to_host ? (void *)be->mirror_d : (void *)be->kv_pool,
                     is_to_host ? (const void *)be->kv_pool : (const void *)be->mirror_d, be->sync_ids_d, n,
                     be->kv.n_layers * 2, be->kv.n_blocks, eng_kv_chunk_bytes(&be->kv), be->st);
    S_CUDA(cudaGetLastError(), "KV sync");
    S_CUDA(cudaStreamSynchronize(be->st), "KV sync");
    return PD_OK;
}

static pd_status s_kv_read(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, void *dst) {
    S_CUDA(s_bind(be), "select the GPU");
    S_CUDA(cudaMemcpyAsync(dst, (uint8_t *)be->kv_pool + eng_kv_chunk_offset(&be->kv, layer, kind, block),
                           eng_kv_chunk_bytes(&be->kv), cudaMemcpyDeviceToHost, be->st),
           "KV read");
    S_CUDA(cudaStreamSynchronize(be->st), "KV read");
    return PD_OK;
}

static pd_status s_kv_write(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, const void *src) {
    S_CUDA(s_bind(be), "select the GPU");
    S_CUDA(cudaMemcpyAsync((uint8_t *)be->kv_pool + eng_kv_chunk_offset(&be->kv, layer, kind, block), src,
                           eng_kv_chunk_bytes(&be->kv), cudaMemcpyHostToDevice, be->st),
           "KV write");
    S_CUDA(cudaStreamSynchronize(be->st), "KV write");
    return PD_OK;
}

/* ---- same-GPU KV hand-off between processes (CUDA IPC) ---- */

typedef struct {
    void *base; /* the other process's pool, mapped into this one */
    eng_kv_layout_t kv;
} s_peer_t;

static size_t s_kv_export(eng_backend_t *be, void *handle, size_t cap) {
    cudaIpcMemHandle_t h;
    if (cap < sizeof h || s_bind(be) != cudaSuccess) return 0;
    cudaError_t e = cudaIpcGetMemHandle(&h, be->kv_pool); /* kv_pool is the start of its own cudaMalloc */
    if (e != cudaSuccess) {
        LOG_W("cuda backend: cannot export the KV pool (cudaIpcGetMemHandle: %s)", cudaGetErrorString(e));
        return 0;
    }
    memcpy(handle, &h, sizeof h);
    return sizeof h;
}

static void *s_kv_peer_open(eng_backend_t *be, const void *handle, size_t len, const eng_kv_layout_t *kv, char *err,
                            size_t err_cap) {
    cudaIpcMemHandle_t h;
    if (len != sizeof h || kv->dtype != be->kv.dtype || eng_kv_chunk_bytes(kv) != eng_kv_chunk_bytes(&be->kv) ||
        kv->n_layers != be->kv.n_layers || kv->n_blocks <= 0) {
        snprintf(err, err_cap, "not a CUDA IPC handle of a pool in this layout and dtype");
        return NULL;
    }
    if (s_bind(be) != cudaSuccess) return NULL;
    if (!be->peer_st && (cudaStreamCreateWithFlags(&be->peer_st, cudaStreamNonBlocking) != cudaSuccess ||
                         cudaHostAlloc((void **)&be->peer_ids, sizeof(int32_t) * 2 * (size_t)be->kv.n_blocks,
                                       cudaHostAllocMapped) != cudaSuccess ||
                         cudaHostGetDevicePointer((void **)&be->peer_ids_d, be->peer_ids, 0) != cudaSuccess)) {
        snprintf(err, err_cap, "cannot create the copy stream: %s", cudaGetErrorString(cudaGetLastError()));
        return NULL;
    }
    memcpy(&h, handle, sizeof h);
    void *base = NULL;
    /* fails for a pool of this very process, or of a GPU this one cannot reach: the caller uses another path */
    cudaError_t e = cudaIpcOpenMemHandle(&base, h, cudaIpcMemLazyEnablePeerAccess);
    if (e != cudaSuccess) {
        snprintf(err, err_cap, "cudaIpcOpenMemHandle: %s", cudaGetErrorString(e));
        cudaGetLastError();
        return NULL;
    }
    s_peer_t *p = (s_peer_t *)calloc(1, sizeof *p);
    if (!p) {
        cudaIpcCloseMemHandle(base);
        snprintf(err, err_cap, "out of memory");
        return NULL;
    }
    p->base = base, p->kv = *kv;
    return p;
}

static pd_status s_kv_peer_copy(eng_backend_t *be, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                                int32_t first_layer, int32_t n_layers) {
    const s_peer_t *p = (const s_peer_t *)peer;
    for (int32_t i = 0; i < n; i++)
        if (src[i] < 0 || src[i] >= p->kv.n_blocks) {
            LOG_E("cuda backend: peer KV block %d outside the peer's pool of %d", src[i], p->kv.n_blocks);
            return PD_EINVAL;
        }
    S_CUDA(s_bind(be), "peer KV copy");
    S_CUDA(cudaStreamSynchronize(be->peer_st), "peer KV copy"); /* the last copy's kernel no longer reads the ids */
    memcpy(be->peer_ids, src, sizeof(int32_t) * (size_t)n);
    memcpy(be->peer_ids + n, dst, sizeof(int32_t) * (size_t)n);
    eng_cuda_kv_copy_pairs(be->kv_pool, p->base, be->peer_ids_d, n, 2 * first_layer, 2 * n_layers, be->kv.n_blocks,
                           p->kv.n_blocks, eng_kv_chunk_bytes(&be->kv), be->peer_st);
    S_CUDA(cudaGetLastError(), "peer KV copy");
    S_CUDA(cudaStreamSynchronize(be->peer_st), "peer KV copy");
    return PD_OK;
}

static void s_kv_peer_close(eng_backend_t *be, void *peer) {
    s_peer_t *p = (s_peer_t *)peer;
    if (!p) return;
    s_bind(be);
    cudaIpcCloseMemHandle(p->base);
    free(p);
}

/* A graph-eligible shape's first forward (launched directly, its key remembered) and its second (captured): both are
 * paid once per shape while it stays among the S_MAX_GRAPHS most recently used, and a replay costs far less. */
static uint64_t s_n_one_time(const eng_backend_t *be) {
    return (uint64_t)(be->n_captures + be->n_first_sightings);
}

extern "C" const eng_backend_ops_t eng_backend_cuda = {
    "cuda", s_create, s_destroy,    s_forward,   s_kv_read,      s_kv_write,     s_kv_host_base,  s_kv_sync,
    true,   true,     s_n_one_time, s_kv_export, s_kv_peer_open, s_kv_peer_copy, s_kv_peer_close,
};
