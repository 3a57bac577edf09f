/* eng.h: the engine facade. One eng_t holds a model, its tokenizer and chat template, a backend (CPU
 * now, CUDA next) and the backend's paged KV pool. Its one compute call, eng_forward, runs a batch of
 * sequences with n >= 1 new tokens each at their own positions: prefill chunks, single decode tokens
 * and multi-token verification are the same call. The caller (a scheduler) owns block tables and the
 * block pool's bookkeeping; the engine never allocates blocks itself. One thread drives an eng_t. */
#ifndef ENG_H
#define ENG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_chat.h"
#include "eng_kv.h"
#include "eng_kv_layout.h"
#include "eng_model.h"
#include "eng_sample.h"
#include "eng_tok.h"
#include "pd_common.h"

typedef struct eng eng_t;

typedef enum { ENG_BACKEND_CPU = 0, ENG_BACKEND_CUDA = 1 } eng_backend_kind_t;

typedef struct {
    const char *model_path;
    eng_backend_kind_t backend;
    int32_t n_threads;        /* CPU compute threads; 0 = one per core */
    int32_t gpu;              /* CUDA device index */
    int32_t kv_block_size;    /* tokens per KV block (16) */
    int32_t kv_n_blocks;      /* blocks in the pool; 0 = as many as kv_mem_bytes allows */
    uint64_t kv_mem_bytes;    /* KV pool budget when kv_n_blocks is 0 (default 512 MiB) */
    int32_t max_batch_tokens; /* most new tokens in one eng_forward (sizes scratch; default 2048) */
    int32_t max_batch_seqs;   /* most sequences in one eng_forward (default 256) */
    bool kv_host_mirror;      /* CUDA: keep a pinned host copy of the KV pool for kvtransfer (eng_kv_to_host) */
    /* CUDA: time cuBLAS's and cuBLASLt's algorithms at create for the products of 16..gemm_tune_rows-token batches
     * (steps of 8: decode and verification sizes) and keep the fastest per shape; 0 (default): cuBLAS's choice */
    int32_t gemm_tune_rows;
    /* Optional placement of the KV pool's host memory (CPU: the pool; CUDA: the host mirror, which the backend then
     * pins with cudaHostRegister), e.g. a shared-memory object that a kvtransfer receiver on the same host maps
     * (pd-prefill). kv_host_alloc returns bytes of zeroed, page-aligned memory, or NULL to let the backend allocate
     * its own; kv_host_free gets back what it returned (at eng_destroy). NULL (default): the backend's own. */
    void *(*kv_host_alloc)(void *ctx, size_t bytes);
    void (*kv_host_free)(void *ctx, void *p, size_t bytes);
    void *kv_host_ctx;
} eng_params_t;

eng_params_t eng_params_default(void);

/* Loads the model, tokenizer and chat template, creates the backend and its KV pool. NULL with a
 * one-line reason in err on any failure. */
eng_t *eng_create(const eng_params_t *p, char *err, size_t err_cap);
void eng_destroy(eng_t **e);

const eng_model_config_t *eng_config(const eng_t *e);
const eng_model_t *eng_model(const eng_t *e);
const eng_tok_t *eng_tokenizer(const eng_t *e);
/* NULL when the model has no chat template we recognise (chat requests are then refused). */
const eng_chat_t *eng_chat(const eng_t *e);
/* The KV layout; its n_blocks may exceed the pool's by a backend scratch block (CUDA: eng_kv_pool_n_blocks is the
 * number schedulers can use). */
const eng_kv_layout_t *eng_kv_layout(const eng_t *e);
eng_kv_pool_t *eng_kv_pool(eng_t *e);
const char *eng_backend_name(const eng_t *e);
int32_t eng_max_batch_tokens(const eng_t *e);

/* One forward over a batch. Sequence i has n_tokens[i] new tokens at positions pos[i] ..
 * pos[i]+n_tokens[i]-1; its K/V for those positions are written into its blocks, and attention reads
 * positions 0 .. (own position) from them (causal). Blocks covering positions < pos[i] must hold that
 * sequence's earlier K/V (written by an earlier forward here or imported from another worker).
 * Logits are written for the tokens with want_logits set (NULL: the last token of every sequence), one
 * row of vocab_size floats each, in token order. Deterministic and batch-invariant on the CPU backend:
 * a token's logits do not depend on what else is in the batch or on how its prompt was chunked. */
typedef struct {
    int32_t n_seqs;
    const int32_t *n_tokens;            /* (n_seqs) >= 1 */
    const int32_t *pos;                 /* (n_seqs) >= 0 */
    const int32_t *const *block_tables; /* (n_seqs) block ids covering positions [0, pos+n_tokens) */
    const int32_t *n_blocks;            /* (n_seqs) length of each block table */
    const int32_t *tokens;              /* (sum n_tokens) ids, sequence after sequence */
    const uint8_t *want_logits;         /* (sum n_tokens) or NULL */
    float *logits;                      /* out: (rows requested, vocab_size); may be NULL when sampling is set */
    /* Sampling next to the logits (on the GPU with CUDA, so that only tokens and logprobs cross to the host): one
     * request per logits row, in row order, and one result per row out, as eng_sampler_sample would give on the
     * same logits (eng_sample.h). samples[r].token is -1 when row r's logits are not finite. NULL: no sampling. */
    const eng_row_sampling_t *sampling;
    eng_sample_result_t *samples;
    /* The KV this batch writes will be read from the host (eng_kv_to_host right after, as a prefill worker hands it
     * to kvtransfer): a backend with a host mirror may copy it there during the forward, layer by layer (CUDA: on a
     * side stream, each layer's blocks once its K/V are stored, overlapping the next layers), so that
     * eng_kv_to_host only waits for the last layer's copy. An optimisation only: results are the same without. */
    bool is_kv_to_host;
    /* Progress for a reader on another thread (a prefill worker sending the KV while the forward runs), or NULL: the
     * backend stores here, with release ordering (__atomic_store_n), how many leading layers of this batch's K/V are
     * final in host memory (eng_kv_host_base): the CPU backend as it stores each layer's K/V; CUDA with a host mirror
     * and is_kv_to_host as each layer's copy lands (from a CUDA callback thread: read it with __atomic_load_n,
     * acquire). Monotonic, never ahead of the memory; a backend may report less than it could, and reports nothing
     * more once eng_forward has returned an error. eng_kv_to_host remains the end of the story. */
    int32_t *kv_host_layers;
} eng_batch_t;

/* PD_OK; PD_EINVAL (with a log line) for a malformed batch: bad token id, too many tokens or
 * sequences, a block table too short for the positions, a block id out of range, neither logits nor samples asked
 * for rows that want them, a sampling request with invalid parameters, a draw u outside [0, 1) or a penalty token
 * outside the vocabulary or listed twice; PD_EBACKEND when
 * the backend fails. Thread: the one thread that owns e. */
PD_NODISCARD pd_status eng_forward(eng_t *e, const eng_batch_t *b);

/* How many forwards so far paid a one-time cost that later forwards of their shape do not (CUDA: the first forward
 * of a shape, launched directly, and the second, which captures its CUDA graph: tens of times a replay), so that a
 * caller timing steps to make decisions (speculation's guard) can leave them out. 0 on the CPU. Thread: the one that
 * owns e. */
uint64_t eng_n_one_time(const eng_t *e);

/* Rows of logits a batch produces. */
int32_t eng_batch_n_logits(const eng_batch_t *b);

/* The KV pool's host address when the backend keeps it in host memory in the eng_kv_layout.h layout (CPU),
 * else NULL (CUDA: use the chunk calls). A chunk is at base + eng_kv_chunk_offset. Another thread (kvtransfer
 * on the service loop) may read or write the chunks of blocks that no running eng_forward uses. */
void *eng_kv_host_base(eng_t *e);

/* The host mirror of a pool that lives off the host (CUDA with kv_host_mirror): eng_kv_host_base is then a pinned
 * host copy in the same layout, and these move whole blocks (every layer, K and V) between it and the GPU pool.
 * to_host: the blocks of table spanning positions [pos, pos + n_tokens), after the forward that wrote them and
 * before kvtransfer sends them; from_host: blocks table[0 .. n_blocks), after kvtransfer wrote them and before a
 * forward reads them. No-ops (PD_OK) when the pool is in host memory (CPU). PD_EINVAL for a block outside the
 * pool, PD_EBACKEND on a device error. Thread: the engine's. */
PD_NODISCARD pd_status eng_kv_to_host(eng_t *e, const int32_t *table, int32_t pos, int32_t n_tokens);
PD_NODISCARD pd_status eng_kv_from_host(eng_t *e, const int32_t *table, int32_t n_blocks);

/* Same-GPU KV hand-off between two processes (CUDA IPC): a prefill worker exports its pool, a decode worker on a GPU
 * that can reach it opens it and copies a request's blocks device to device, with no host memory in the way.
 * eng_kv_export writes an opaque handle (at most cap bytes) and returns its length; 0 when the backend keeps its pool
 * in host memory (CPU) or cannot export it. eng_kv_peer_open maps another process's exported pool (kv: its layout,
 * which must match this pool's but for n_blocks) and returns a token, or NULL with the reason in err: another backend,
 * a GPU this one cannot reach, or a handle of this same process. eng_kv_peer_copy copies layers [first_layer,
 * first_layer + n_layers), K and V, of the peer's blocks src[i] into this pool's dst[i], i < n, and returns once the
 * copy is complete: PD_EINVAL for a block or layer outside either pool, PD_EBACKEND on a device error.
 * eng_kv_peer_close unmaps (NULL: nothing).
 * Thread: unlike the rest of eng_t, the three peer calls may run on one other thread (a decode service's loop) while
 * eng_forward runs, on their own stream, as long as no running forward uses the dst blocks. The exporting process must
 * keep the src blocks unchanged until the copy returns. */
size_t eng_kv_export(eng_t *e, void *handle, size_t cap);
void *eng_kv_peer_open(eng_t *e, const void *handle, size_t len, const eng_kv_layout_t *kv, char *err, size_t err_cap);
PD_NODISCARD pd_status eng_kv_peer_copy(eng_t *e, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                                        int32_t first_layer, int32_t n_layers);
void eng_kv_peer_close(eng_t *e, void *peer);

/* KV block export/import in the pool's layout and dtype (eng_kv_layout.h): one (layer, kind, block)
 * chunk of eng_kv_chunk_bytes. For hand-off between workers and for tests. */
PD_NODISCARD pd_status eng_kv_read_chunk(eng_t *e, int32_t layer, eng_kv_kind_t kind, int32_t block, void *dst);
PD_NODISCARD pd_status eng_kv_write_chunk(eng_t *e, int32_t layer, eng_kv_kind_t kind, int32_t block, const void *src);

#endif
