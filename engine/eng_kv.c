/* eng_kv.c: free list + reference counts for KV block ids. O(1) alloc and release per block; no
 * allocation after create. Does not touch KV memory. */
#include "eng_kv.h"

#include <stdlib.h>

struct eng_kv_pool {
    int32_t n_blocks;
    int32_t n_free;
    int32_t *free_ids; /* stack of free ids, n_free valid */
    int32_t *refcount; /* (n_blocks) */
};

eng_kv_pool_t *eng_kv_pool_create(int32_t n_blocks) {
    if (n_blocks <= 0) return NULL;
    eng_kv_pool_t *p = pd_xcalloc(1, sizeof *p);
    p->n_blocks = n_blocks;
    p->free_ids = pd_xmalloc(sizeof(int32_t) * (size_t)n_blocks);
    p->refcount = pd_xcalloc((size_t)n_blocks, sizeof(int32_t));
    /* Lowest ids on top of the stack: allocation order is deterministic and easy to read in logs. */
    for (int32_t i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i;
    p->n_free = n_blocks;
    return p;
}

void eng_kv_pool_destroy(eng_kv_pool_t **pool) {
    if (!pool || !*pool) return;
    free((*pool)->free_ids);
    free((*pool)->refcount);
    free(*pool);
    *pool = NULL;
}

int32_t eng_kv_pool_n_blocks(const eng_kv_pool_t *pool) {
    return pool->n_blocks;
}
int32_t eng_kv_pool_n_free(const eng_kv_pool_t *pool) {
    return pool->n_free;
}

pd_status eng_kv_pool_alloc(eng_kv_pool_t *pool, int32_t n, int32_t *ids) {
    if (n < 0) return PD_EINVAL;
    if (n > pool->n_free) return PD_EAGAIN;
    for (int32_t i = 0; i < n; i++) {
        int32_t id = pool->free_ids[--pool->n_free];
        PD_ASSERT(pool->refcount[id] == 0);
        pool->refcount[id] = 1;
        ids[i] = id;
    }
    return PD_OK;
}

pd_status eng_kv_pool_ref(eng_kv_pool_t *pool, int32_t id) {
    if (id < 0 || id >= pool->n_blocks || pool->refcount[id] == 0) return PD_EINVAL;
    pool->refcount[id]++;
    return PD_OK;
}

pd_status eng_kv_pool_release(eng_kv_pool_t *pool, const int32_t *ids, int32_t n) {
    if (n < 0) return PD_EINVAL;
    /* Decrement all first, undoing everything if one id is bad, so a bad list (a double release is a
     * caller bug) changes nothing. Then push ids that reached 0; -1 marks "pushed" so an id listed
     * twice is pushed once. */
    for (int32_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= pool->n_blocks || pool->refcount[id] == 0) {
            for (int32_t j = 0; j < i; j++) pool->refcount[ids[j]]++;
            return PD_EINVAL;
        }
        pool->refcount[id]--;
    }
    /* pushed last to first, so the next allocation pops them in their order: a sequence's blocks then stay runs of
     * ascending ids, which kvtransfer sends as one frame per run (descending ids went out one ~32 KiB chunk per
     * frame: half the KV hand-off's speed between two services) */
    for (int32_t i = n - 1; i >= 0; i--) {
        if (pool->refcount[ids[i]] == 0) {
            pool->free_ids[pool->n_free++] = ids[i];
            pool->refcount[ids[i]] = -1;
        }
    }
    for (int32_t i = 0; i < n; i++)
        if (pool->refcount[ids[i]] == -1) pool->refcount[ids[i]] = 0;
    return PD_OK;
}

int32_t eng_kv_pool_refcount(const eng_kv_pool_t *pool, int32_t id) {
    if (id < 0 || id >= pool->n_blocks) return -1;
    return pool->refcount[id];
}

pd_status eng_kv_seq_reserve(eng_kv_seq_t *seq, eng_kv_pool_t *pool, int32_t block_size, int32_t n_tokens) {
    if (block_size <= 0 || n_tokens < 0) return PD_EINVAL;
    int32_t need = eng_kv_blocks_for(n_tokens, block_size) - seq->n_blocks;
    if (need <= 0) return PD_OK;
    if (seq->n_blocks + need > seq->cap) {
        int32_t cap = seq->cap ? seq->cap : 8;
        while (cap < seq->n_blocks + need) cap *= 2;
        seq->blocks = pd_xrealloc(seq->blocks, sizeof(int32_t) * (size_t)cap);
        seq->cap = cap;
    }
    pd_status st = eng_kv_pool_alloc(pool, need, seq->blocks + seq->n_blocks);
    if (st != PD_OK) return st;
    seq->n_blocks += need;
    return PD_OK;
}

void eng_kv_seq_truncate(eng_kv_seq_t *seq, eng_kv_pool_t *pool, int32_t block_size, int32_t n_tokens) {
    int32_t keep = eng_kv_blocks_for(n_tokens > 0 ? n_tokens : 0, block_size);
    if (keep >= seq->n_blocks) return;
    pd_status st = eng_kv_pool_release(pool, seq->blocks + keep, seq->n_blocks - keep);
    PD_ASSERT(st == PD_OK); /* a sequence's own blocks are always allocated */
    seq->n_blocks = keep;
}

void eng_kv_seq_release(eng_kv_seq_t *seq, eng_kv_pool_t *pool) {
    pd_status st = eng_kv_pool_release(pool, seq->blocks, seq->n_blocks);
    PD_ASSERT(st == PD_OK); /* a sequence's own blocks are always allocated */
    seq->n_blocks = 0;
}

void eng_kv_seq_fini(eng_kv_seq_t *seq) {
    PD_ASSERT(seq->n_blocks == 0);
    free(seq->blocks);
    seq->blocks = NULL;
    seq->cap = 0;
}
