/* eng_kv_layout.h: the one definition of how KV-cache blocks sit in memory. Both backends and
 * kvtransfer/ include it; nothing else about the engine leaks through it.
 *
 * The pool is n_blocks fixed-size pages per layer. A sequence owns a list of block ids; block b of a
 * sequence holds positions [b*block_size, (b+1)*block_size) for every layer. For one (layer, K or V,
 * block) the memory is one contiguous chunk laid out (block_size, n_kv_heads, head_dim), row-major, so a
 * block of one layer travels as two contiguous chunks (K then V). Chunk order in the pool:
 *   chunk_index = (layer * 2 + kind) * n_blocks + block        (kind 0 = K, 1 = V) */
#ifndef ENG_KV_LAYOUT_H
#define ENG_KV_LAYOUT_H

#include <stddef.h>
#include <stdint.h>

typedef enum { ENG_KV_F32 = 0, ENG_KV_F16 = 1, ENG_KV_BF16 = 2 } eng_kv_dtype_t;
typedef enum { ENG_KV_K = 0, ENG_KV_V = 1 } eng_kv_kind_t;

typedef struct {
    int32_t n_layers;
    int32_t n_kv_heads;
    int32_t head_dim;
    int32_t block_size; /* tokens per block */
    int32_t n_blocks;   /* blocks per layer in the pool */
    eng_kv_dtype_t dtype;
} eng_kv_layout_t;

static inline size_t eng_kv_dtype_bytes(eng_kv_dtype_t dt) {
    return dt == ENG_KV_F32 ? 4u : 2u;
}

/* Elements and bytes of one (layer, kind, block) chunk. */
static inline size_t eng_kv_chunk_elems(const eng_kv_layout_t *l) {
    return (size_t)l->block_size * (size_t)l->n_kv_heads * (size_t)l->head_dim;
}
static inline size_t eng_kv_chunk_bytes(const eng_kv_layout_t *l) {
    return eng_kv_chunk_elems(l) * eng_kv_dtype_bytes(l->dtype);
}
/* Byte offset of a chunk from the start of the pool. */
static inline size_t eng_kv_chunk_offset(const eng_kv_layout_t *l, int32_t layer, eng_kv_kind_t kind, int32_t block) {
    size_t idx = ((size_t)layer * 2u + (size_t)kind) * (size_t)l->n_blocks + (size_t)block;
    return idx * eng_kv_chunk_bytes(l);
}
static inline size_t eng_kv_pool_bytes(const eng_kv_layout_t *l) {
    return (size_t)l->n_layers * 2u * (size_t)l->n_blocks * eng_kv_chunk_bytes(l);
}
/* KV bytes one token occupies across all layers (K and V). */
static inline size_t eng_kv_token_bytes(const eng_kv_layout_t *l) {
    return 2u * (size_t)l->n_layers * (size_t)l->n_kv_heads * (size_t)l->head_dim * eng_kv_dtype_bytes(l->dtype);
}

#endif
