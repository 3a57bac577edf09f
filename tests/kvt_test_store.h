/* kvt_test_store.h: the KV store that kvtransfer's unit tests, its fuzz target and the fault-test peer
 * give a receiver: a host pool in the receiver's layout plus a used[] map. It counts reserved blocks and
 * catches a double or foreign release, or a chunk asked for outside a reservation (a kvtransfer bug):
 * counted, or an immediate abort when is_abort_on_bad is set (the fuzzer: the stack names the culprit). */
#ifndef KVT_TEST_STORE_H
#define KVT_TEST_STORE_H

#include <stdbool.h>
#include <stdlib.h>

#include "kvt.h"

typedef struct {
    eng_kv_layout_t l;
    uint8_t *pool;      /* eng_kv_pool_bytes(&l) */
    uint8_t *used;      /* (l.n_blocks) */
    int32_t n_reserved; /* blocks reserved and not yet released */
    int32_t n_bad;      /* bad releases or chunk requests */
    bool is_abort_on_bad;
} kvt_test_store_t;

/* Allocates the pool and the map; false when it cannot. */
static inline bool kts_init(kvt_test_store_t *s, eng_kv_layout_t l) {
    *s = (kvt_test_store_t){.l = l};
    s->pool = calloc(1, eng_kv_pool_bytes(&l));
    s->used = calloc((size_t)l.n_blocks, 1);
    return s->pool && s->used;
}

static inline void kts_fini(kvt_test_store_t *s) {
    free(s->pool);
    free(s->used);
    s->pool = s->used = NULL;
}

static inline void kts_bad(kvt_test_store_t *s) {
    if (s->is_abort_on_bad) abort();
    s->n_bad++;
}

static inline pd_status kts_reserve(void *ctx, int32_t n, int32_t *ids) {
    kvt_test_store_t *s = ctx;
    int32_t got = 0;
    for (int32_t b = 0; b < s->l.n_blocks && got < n; b++)
        if (!s->used[b]) ids[got++] = b;
    if (got < n) return PD_EAGAIN;
    for (int32_t i = 0; i < n; i++) s->used[ids[i]] = 1;
    s->n_reserved += n;
    return PD_OK;
}

static inline void kts_release(void *ctx, const int32_t *ids, int32_t n) {
    kvt_test_store_t *s = ctx;
    for (int32_t i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= s->l.n_blocks || !s->used[ids[i]]) {
            kts_bad(s);
            continue;
        }
        s->used[ids[i]] = 0;
        s->n_reserved--;
    }
}

static inline void *kts_chunk(void *ctx, int32_t layer, eng_kv_kind_t kind, int32_t block) {
    kvt_test_store_t *s = ctx;
    if (layer < 0 || layer >= s->l.n_layers || block < 0 || block >= s->l.n_blocks || !s->used[block]) {
        kts_bad(s);
        block = 0; /* valid memory, so the bug is reported rather than turned into a crash */
    }
    return s->pool + eng_kv_chunk_offset(&s->l, layer, kind, block);
}

static inline kvt_store_t kts_store(kvt_test_store_t *s) {
    return (kvt_store_t){.ctx = s, .reserve = kts_reserve, .release = kts_release, .chunk = kts_chunk};
}

#endif
