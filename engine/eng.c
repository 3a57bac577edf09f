/* eng.c: the engine facade: builds model + tokenizer + backend, validates every batch before a
 * backend sees it (batches come from schedulers that took input off the network). */
#include "eng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "eng_backend.h"
#include "pd_log.h"

struct eng {
    eng_params_t params;
    eng_model_t *model;
    eng_tok_t *tok;
    eng_chat_t *chat;
    eng_kv_layout_t kv_layout;
    eng_kv_pool_t *kv_pool;
    const eng_backend_ops_t *ops;
    eng_backend_t *be;
    /* eng_batch_t.sampling: a bit per token marks a row's penalty list while it is checked for repeats; for
     * backends that do not sample, the facade's scratch (logits rows, grown on demand) and host sampler */
    uint8_t *pen_mark;
    float *smp_logits;
    int32_t smp_logits_rows;
    eng_row_sampler_t *row_sampler;
};

eng_params_t eng_params_default(void) {
    eng_params_t p = {0};
    p.backend = ENG_BACKEND_CPU;
    p.kv_block_size = 16;
    p.kv_mem_bytes = 512ull << 20;
    p.max_batch_tokens = 2048;
    p.max_batch_seqs = 256;
    return p;
}

static const eng_backend_ops_t *s_pick_backend(eng_backend_kind_t kind, char *err, size_t cap) {
    if (kind == ENG_BACKEND_CPU) return &eng_backend_cpu;
#ifdef PDSERVE_CUDA
    if (kind == ENG_BACKEND_CUDA) return &eng_backend_cuda;
#endif
    snprintf(err, cap, "engine: the %s backend is not built into this binary (configure with -DPDSERVE_CUDA=ON)",
             kind == ENG_BACKEND_CUDA ? "cuda" : "requested");
    return NULL;
}

eng_t *eng_create(const eng_params_t *p, char *err, size_t err_cap) {
    eng_t *e = pd_xcalloc(1, sizeof *e);
    e->params = *p;
    if (!p->model_path || p->kv_block_size <= 0 || p->kv_block_size > 1024 || p->max_batch_tokens <= 0 ||
        p->max_batch_seqs <= 0 || p->kv_n_blocks < 0 || p->n_threads < 0) {
        snprintf(err, err_cap, "engine: invalid parameters (model path, block size 1..1024, batch limits > 0)");
        goto fail;
    }
    e->ops = s_pick_backend(p->backend, err, err_cap);
    if (!e->ops) goto fail;
    e->model = eng_model_load(p->model_path, err, err_cap);
    if (!e->model) goto fail;
    e->tok = eng_tok_create(e->model->gguf, err, err_cap);
    if (!e->tok) goto fail;
    char chat_err[256];
    e->chat = eng_chat_create(e->model->gguf, NULL, chat_err, sizeof chat_err);
    if (!e->chat) LOG_W("engine: chat disabled: %s", chat_err);

    const eng_model_config_t *c = &e->model->cfg;
    e->kv_layout = (eng_kv_layout_t){.n_layers = c->n_layers,
                                     .n_kv_heads = c->n_kv_heads,
                                     .head_dim = c->head_dim,
                                     .block_size = p->kv_block_size,
                                     .n_blocks = p->kv_n_blocks,
                                     /* the CPU reference keeps f32; the GPU halves KV bytes (decode reads them
                                      * every step); kvtransfer converts between the two on receipt */
                                     .dtype = p->backend == ENG_BACKEND_CUDA ? ENG_KV_F16 : ENG_KV_F32};
    if (e->kv_layout.n_blocks == 0) {
        size_t per_block = eng_kv_token_bytes(&e->kv_layout) * (size_t)p->kv_block_size;
        e->kv_layout.n_blocks = (int32_t)(p->kv_mem_bytes / per_block);
    }
    if (e->kv_layout.n_blocks <= 0) {
        snprintf(err, err_cap, "engine: KV budget %llu bytes holds no block", (unsigned long long)p->kv_mem_bytes);
        goto fail;
    }
    e->kv_pool = eng_kv_pool_create(e->kv_layout.n_blocks);
    if (e->ops->has_pad_block) e->kv_layout.n_blocks++; /* the backend's scratch block, never in the pool */
    e->be = e->ops->create(e->model, &e->kv_layout, &e->params, err, err_cap);
    if (!e->be) goto fail;
    e->pen_mark = pd_xcalloc(((size_t)c->vocab_size + 7) / 8, 1);
    if (!e->ops->is_sampling && !(e->row_sampler = eng_row_sampler_create(c->vocab_size))) {
        snprintf(err, err_cap, "engine: out of memory for the sampler");
        goto fail;
    }
    LOG_I("engine: model '%s' (%s) dim=%d layers=%d heads=%d/%d vocab=%d ctx=%d weights=%.1f MiB; backend=%s; "
          "KV pool %d blocks x %d tokens = %.1f MiB",
          c->name, c->arch, c->dim, c->n_layers, c->n_heads, c->n_kv_heads, c->vocab_size, c->ctx_len,
          (double)e->model->weight_bytes / (1 << 20), e->ops->name, e->kv_layout.n_blocks, e->kv_layout.block_size,
          (double)eng_kv_pool_bytes(&e->kv_layout) / (1 << 20));
    return e;
fail:
    eng_destroy(&e);
    return NULL;
}

void eng_destroy(eng_t **e) {
    if (!e || !*e) return;
    if ((*e)->be) (*e)->ops->destroy(&(*e)->be);
    free((*e)->pen_mark), free((*e)->smp_logits);
    eng_row_sampler_destroy(&(*e)->row_sampler);
    eng_kv_pool_destroy(&(*e)->kv_pool);
    eng_chat_destroy(&(*e)->chat);
    eng_tok_destroy(&(*e)->tok);
    eng_model_destroy(&(*e)->model);
    free(*e);
    *e = NULL;
}

const eng_model_config_t *eng_config(const eng_t *e) {
    return &e->model->cfg;
}
const eng_model_t *eng_model(const eng_t *e) {
    return e->model;
}
const eng_tok_t *eng_tokenizer(const eng_t *e) {
    return e->tok;
}
const eng_chat_t *eng_chat(const eng_t *e) {
    return e->chat;
}
const eng_kv_layout_t *eng_kv_layout(const eng_t *e) {
    return &e->kv_layout;
}
eng_kv_pool_t *eng_kv_pool(eng_t *e) {
    return e->kv_pool;
}
const char *eng_backend_name(const eng_t *e) {
    return e->ops->name;
}
int32_t eng_max_batch_tokens(const eng_t *e) {
    return e->params.max_batch_tokens;
}

int32_t eng_batch_n_logits(const eng_batch_t *b) {
    if (!b->want_logits) return b->n_seqs;
    int64_t n_tok = 0, n_out = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) n_tok += b->n_tokens[i];
    for (int64_t t = 0; t < n_tok; t++) n_out += b->want_logits[t] != 0;
    return (int32_t)n_out;
}

/* Everything a backend assumes, checked once here. */
static pd_status s_validate(const eng_t *e, const eng_batch_t *b) {
    const eng_model_config_t *c = &e->model->cfg;
    if (b->n_seqs <= 0 || b->n_seqs > e->params.max_batch_seqs) {
        LOG_E("engine: batch of %d sequences (allowed 1..%d)", b->n_seqs, e->params.max_batch_seqs);
        return PD_EINVAL;
    }
    int64_t n_tok = 0;
    for (int32_t i = 0; i < b->n_seqs; i++) {
        int32_t n = b->n_tokens[i], pos = b->pos[i];
        if (n <= 0 || pos < 0 || (int64_t)pos + n > (int64_t)b->n_blocks[i] * e->kv_layout.block_size) {
            LOG_E("engine: sequence %d: %d tokens at pos %d do not fit %d blocks", i, n, pos, b->n_blocks[i]);
            return PD_EINVAL;
        }
        int32_t used = eng_kv_blocks_for(pos + n, e->kv_layout.block_size);
        for (int32_t k = 0; k < used; k++) {
            int32_t id = b->block_tables[i][k];
            if (id < 0 || id >= eng_kv_pool_n_blocks(e->kv_pool)) {
                LOG_E("engine: sequence %d: block id %d out of range (pool of %d)", i, id,
                      eng_kv_pool_n_blocks(e->kv_pool));
                return PD_EINVAL;
            }
        }
        n_tok += n;
    }
    if (n_tok > e->params.max_batch_tokens) {
        LOG_E("engine: batch of %lld tokens exceeds max_batch_tokens %d", (long long)n_tok, e->params.max_batch_tokens);
        return PD_EINVAL;
    }
    for (int64_t t = 0; t < n_tok; t++) {
        if (b->tokens[t] < 0 || b->tokens[t] >= c->vocab_size) {
            LOG_E("engine: token id %d out of range (vocab %d)", b->tokens[t], c->vocab_size);
            return PD_EINVAL;
        }
    }
    return PD_OK;
}

/* The batch's sampling requests (n_logits of them), checked as eng.h promises. */
static pd_status s_validate_sampling(eng_t *e, const eng_batch_t *b, int32_t n_logits) {
    const int32_t n_vocab = e->model->cfg.vocab_size;
    for (int32_t r = 0; r < n_logits; r++) {
        const eng_row_sampling_t *q = &b->sampling[r];
        char why[128];
        if (eng_sampling_validate(&q->p, why, sizeof why) != PD_OK) {
            LOG_E("engine: sampling row %d: %s", r, why);
            return PD_EINVAL;
        }
        if (!(q->u >= 0.0 && q->u < 1.0) || q->n_pen < 0 || (q->n_pen > 0 && !q->pen)) {
            LOG_E("engine: sampling row %d: draw %g (must be in [0, 1)) or %d penalty entries", r, q->u, q->n_pen);
            return PD_EINVAL;
        }
        int32_t n_marked = 0; /* entries [0, n_marked) are valid, distinct and marked */
        for (; n_marked < q->n_pen; n_marked++) {
            const int32_t t = q->pen[n_marked].token;
            if (t < 0 || t >= n_vocab || q->pen[n_marked].count < 0 || (e->pen_mark[t >> 3] & (1u << (t & 7)))) break;
            e->pen_mark[t >> 3] |= (uint8_t)(1u << (t & 7));
        }
        for (int32_t i = 0; i < n_marked; i++) e->pen_mark[q->pen[i].token >> 3] = 0; /* every set bit is this row's */
        if (n_marked < q->n_pen) {
            LOG_E("engine: sampling row %d: penalty entry %d (token %d, count %d) outside the vocabulary or repeated",
                  r, n_marked, q->pen[n_marked].token, q->pen[n_marked].count);
            return PD_EINVAL;
        }
    }
    return PD_OK;
}

pd_status eng_forward(eng_t *e, const eng_batch_t *b) {
    pd_status st = s_validate(e, b);
    if (st != PD_OK) return st;
    const int32_t n_logits = eng_batch_n_logits(b);
    if (n_logits > 0 && !b->logits && !b->sampling) {
        LOG_E("engine: %d logits rows asked for, with neither logits nor sampling to put them in", n_logits);
        return PD_EINVAL;
    }
    if (!b->sampling || n_logits == 0) {
        eng_batch_t plain = *b;
        plain.sampling = NULL;
        return e->ops->forward(e->be, &plain, n_logits);
    }
    if (!b->samples) {
        LOG_E("engine: sampling requests without room for the samples");
        return PD_EINVAL;
    }
    if ((st = s_validate_sampling(e, b, n_logits)) != PD_OK) return st;
    if (e->ops->is_sampling) return e->ops->forward(e->be, b, n_logits);

    /* on the host: the logits into the caller's buffer or the scratch, then each row */
    const size_t n_vocab = (size_t)e->model->cfg.vocab_size;
    eng_batch_t plain = *b;
    plain.sampling = NULL;
    if (!plain.logits) {
        if (n_logits > e->smp_logits_rows) {
            free(e->smp_logits);
            e->smp_logits = pd_xmalloc(sizeof(float) * n_vocab * (size_t)n_logits);
            e->smp_logits_rows = n_logits;
        }
        plain.logits = e->smp_logits;
    }
    if ((st = e->ops->forward(e->be, &plain, n_logits)) != PD_OK) return st;
    for (int32_t r = 0; r < n_logits; r++) {
        eng_sample_result_t *out = &b->samples[r];
        if (eng_row_sample(e->row_sampler, &b->sampling[r], plain.logits + (size_t)r * n_vocab, out) != PD_OK)
            out->token = -1, out->n_top = 0; /* the requests were checked: the logits are not finite */
    }
    return PD_OK;
}

uint64_t eng_n_one_time(const eng_t *e) {
    return e->ops->n_one_time ? e->ops->n_one_time(e->be) : 0;
}

void *eng_kv_host_base(eng_t *e) {
    return e->ops->kv_host_base ? e->ops->kv_host_base(e->be) : NULL;
}

static pd_status s_kv_sync(eng_t *e, const int32_t *blocks, int32_t n, bool is_to_host) {
    if (n < 0) return PD_EINVAL;
    for (int32_t i = 0; i < n; i++)
        if (blocks[i] < 0 || blocks[i] >= eng_kv_pool_n_blocks(e->kv_pool)) {
            LOG_E("engine: KV sync of block id %d outside the pool of %d", blocks[i], eng_kv_pool_n_blocks(e->kv_pool));
            return PD_EINVAL;
        }
    if (!e->ops->kv_sync || n == 0) return PD_OK;
    return e->ops->kv_sync(e->be, blocks, n, is_to_host);
}

pd_status eng_kv_to_host(eng_t *e, const int32_t *table, int32_t pos, int32_t n_tokens) {
    if (pos < 0 || n_tokens < 0) return PD_EINVAL;
    if (n_tokens == 0) return PD_OK;
    const int32_t bs = e->kv_layout.block_size, first = pos / bs, last = (pos + n_tokens - 1) / bs;
    return s_kv_sync(e, table + first, last - first + 1, true);
}

pd_status eng_kv_from_host(eng_t *e, const int32_t *table, int32_t n_blocks) {
    return s_kv_sync(e, table, n_blocks, false);
}

size_t eng_kv_export(eng_t *e, void *handle, size_t cap) {
    return e->ops->kv_export ? e->ops->kv_export(e->be, handle, cap) : 0;
}

void *eng_kv_peer_open(eng_t *e, const void *handle, size_t len, const eng_kv_layout_t *kv, char *err, size_t err_cap) {
    if (!e->ops->kv_peer_open) {
        snprintf(err, err_cap, "the %s backend has no device pool to copy into", e->ops->name);
        return NULL;
    }
    return e->ops->kv_peer_open(e->be, handle, len, kv, err, err_cap);
}

pd_status eng_kv_peer_copy(eng_t *e, void *peer, const int32_t *src, const int32_t *dst, int32_t n, int32_t first_layer,
                           int32_t n_layers) {
    if (!peer || !e->ops->kv_peer_copy || n < 0 || n > eng_kv_pool_n_blocks(e->kv_pool) || first_layer < 0 ||
        n_layers < 0 || first_layer + n_layers > e->kv_layout.n_layers)
        return PD_EINVAL;
    for (int32_t i = 0; i < n; i++)
        if (dst[i] < 0 || dst[i] >= eng_kv_pool_n_blocks(e->kv_pool)) {
            LOG_E("engine: peer KV copy into block id %d outside the pool of %d", dst[i],
                  eng_kv_pool_n_blocks(e->kv_pool));
            return PD_EINVAL;
        }
    return n == 0 || n_layers == 0 ? PD_OK : e->ops->kv_peer_copy(e->be, peer, src, dst, n, first_layer, n_layers);
}

void eng_kv_peer_close(eng_t *e, void *peer) {
    if (peer && e->ops->kv_peer_close) e->ops->kv_peer_close(e->be, peer);
}

pd_status eng_kv_read_chunk(eng_t *e, int32_t layer, eng_kv_kind_t kind, int32_t block, void *dst) {
    if (layer < 0 || layer >= e->kv_layout.n_layers || block < 0 || block >= eng_kv_pool_n_blocks(e->kv_pool) ||
        (kind != ENG_KV_K && kind != ENG_KV_V))
        return PD_EINVAL;
    return e->ops->kv_read(e->be, layer, kind, block, dst);
}

pd_status eng_kv_write_chunk(eng_t *e, int32_t layer, eng_kv_kind_t kind, int32_t block, const void *src) {
    if (layer < 0 || layer >= e->kv_layout.n_layers || block < 0 || block >= eng_kv_pool_n_blocks(e->kv_pool) ||
        (kind != ENG_KV_K && kind != ENG_KV_V))
        return PD_EINVAL;
    return e->ops->kv_write(e->be, layer, kind, block, src);
}
