/* eng_kv.h: the paged KV block pool's bookkeeping: which block ids are free, and a reference count per
 * block so blocks can be shared between sequences (prefix sharing) and pinned while in transit.
 * Pure host-side state: the memory itself belongs to the backend (eng_kv_layout.h says where a block
 * lives). Owned and used by one thread (the service's scheduler); not thread-safe. */
#ifndef ENG_KV_H
#define ENG_KV_H

#include <stdint.h>

#include "pd_common.h"

typedef struct eng_kv_pool eng_kv_pool_t;

/* A pool of n_blocks ids (0..n_blocks-1), all free. NULL on bad n_blocks. */
eng_kv_pool_t *eng_kv_pool_create(int32_t n_blocks);
void eng_kv_pool_destroy(eng_kv_pool_t **pool);

int32_t eng_kv_pool_n_blocks(const eng_kv_pool_t *pool);
int32_t eng_kv_pool_n_free(const eng_kv_pool_t *pool);

/* Takes n free blocks (refcount 1 each) into ids[0..n). All or nothing: PD_EAGAIN when fewer than n are
 * free (nothing taken), PD_EINVAL for n < 0. */
PD_NODISCARD pd_status eng_kv_pool_alloc(eng_kv_pool_t *pool, int32_t n, int32_t *ids);
/* Adds a reference to an allocated block (sharing). PD_EINVAL for a free or out-of-range id. */
PD_NODISCARD pd_status eng_kv_pool_ref(eng_kv_pool_t *pool, int32_t id);
/* Drops one reference from each id; a block whose count reaches 0 is free again. PD_EINVAL (and no
 * change at all) if any id is out of range or already free. */
PD_NODISCARD pd_status eng_kv_pool_release(eng_kv_pool_t *pool, const int32_t *ids, int32_t n);
/* Current reference count (0 = free), or -1 for an out-of-range id. */
int32_t eng_kv_pool_refcount(const eng_kv_pool_t *pool, int32_t id);

/* Blocks needed to hold n_tokens positions. */
static inline int32_t eng_kv_blocks_for(int32_t n_tokens, int32_t block_size) {
    return (n_tokens + block_size - 1) / block_size;
}

/* One sequence's block table, grown as its positions grow. Plain struct; init zeroed. */
typedef struct {
    int32_t *blocks; /* (n_blocks) ids in position order */
    int32_t n_blocks;
    int32_t cap;
} eng_kv_seq_t;

/* Makes the table cover n_tokens positions, allocating the missing blocks from pool (all or nothing:
 * PD_EAGAIN when the pool cannot supply them, and the table is unchanged). */
PD_NODISCARD pd_status eng_kv_seq_reserve(eng_kv_seq_t *seq, eng_kv_pool_t *pool, int32_t block_size, int32_t n_tokens);
/* Gives back the blocks past those covering n_tokens positions (speculative positions that were rejected), keeping
 * the rest; a no-op when the table is not longer than that. */
void eng_kv_seq_truncate(eng_kv_seq_t *seq, eng_kv_pool_t *pool, int32_t block_size, int32_t n_tokens);
/* Returns every block to the pool and empties the table (keeps its buffer until eng_kv_seq_fini). */
void eng_kv_seq_release(eng_kv_seq_t *seq, eng_kv_pool_t *pool);
/* Frees the table's buffer; the blocks must have been released. */
void eng_kv_seq_fini(eng_kv_seq_t *seq);

#endif
