/* eng_backend.h: the table each backend (cpu/, cuda/) fills, so the facade and every scheduler above
 * it never see which one runs. Private to engine/. */
#ifndef ENG_BACKEND_H
#define ENG_BACKEND_H

#include "eng.h"

typedef struct eng_backend eng_backend_t; /* each backend's own state */

typedef struct {
    const char *name;
    /* Converts/uploads weights and allocates the KV pool (layout fixed by the caller) and all scratch
     * for max_batch_tokens. NULL + reason in err on failure. */
    eng_backend_t *(*create)(const eng_model_t *m, const eng_kv_layout_t *kv, const eng_params_t *p, char *err,
                             size_t err_cap);
    void (*destroy)(eng_backend_t **be);
    /* The batch is already validated by eng_forward. Backends with is_sampling take b->sampling themselves; for
     * the others the facade samples the logits on the host (b->sampling is then NULL here). */
    pd_status (*forward)(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits);
    pd_status (*kv_read)(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, void *dst);
    pd_status (*kv_write)(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, const void *src);
    /* The KV pool's host address when it lives in host memory in the eng_kv_layout.h layout (or its host mirror),
     * else NULL. */
    void *(*kv_host_base)(eng_backend_t *be);
    /* Copies whole blocks between the pool and its host mirror; NULL when the pool is the host memory itself. */
    pd_status (*kv_sync)(eng_backend_t *be, const int32_t *blocks, int32_t n_blocks, bool is_to_host);
    bool is_sampling;   /* forward samples b->sampling itself, next to the logits */
    bool has_pad_block; /* the layout's last block is the backend's scratch (padding tokens write their K/V there):
                           the facade's pool, and so every scheduler, has one block less */
    /* Forwards so far that paid a one-time cost (CUDA: captured a graph); NULL: never. */
    uint64_t (*n_one_time)(const eng_backend_t *be);
    /* Same-GPU hand-off between processes (eng_kv_export, eng_kv_peer_*); NULL: not supported. */
    size_t (*kv_export)(eng_backend_t *be, void *handle, size_t cap);
    void *(*kv_peer_open)(eng_backend_t *be, const void *handle, size_t len, const eng_kv_layout_t *kv, char *err,
                          size_t err_cap);
    pd_status (*kv_peer_copy)(eng_backend_t *be, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                              int32_t first_layer, int32_t n_layers);
    void (*kv_peer_close)(eng_backend_t *be, void *peer);
} eng_backend_ops_t;

extern const eng_backend_ops_t eng_backend_cpu;
#ifdef PDSERVE_CUDA
extern const eng_backend_ops_t eng_backend_cuda;
#endif

#endif
