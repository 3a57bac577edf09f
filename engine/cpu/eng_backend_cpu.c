/* eng_backend_cpu.c: the reference backend. Weights stay in their GGUF types (Q4_1 is ~5 bits per
 * weight against 32 for f32, and decode is bound by the bytes it reads) and are dequantized inside the
 * matmul. The KV pool is f32 in host memory. The forward reads top to bottom like the math; work is
 * spread over the pool's threads by weight-row tiles (matmuls) and (token, head) pairs (attention). */
#include <math.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_backend.h"
#include "eng_cpu_ops.h"
#include "pd_log.h"

struct eng_backend {
    const eng_model_t *m;
    eng_kv_layout_t kv;
    float *kv_pool; /* eng_kv_pool_bytes(&kv) bytes, layout of eng_kv_layout.h */
    /* set when kv_pool came from eng_params_t.kv_host_alloc (else it is calloc's) */
    void (*kv_pool_free)(void *ctx, void *p, size_t bytes);
    void *kv_pool_ctx;
    int32_t max_tokens;
    int32_t max_ctx; /* longest sequence attention scratch allows */
    int n_threads;
    eng_cpu_pool_t *pool;
    /* per-forward scratch, sized for max_tokens */
    float *x;            /* (T, dim) residual stream */
    float *xb;           /* (T, dim) normed input */
    float *q;            /* (T, n_heads*head_dim) */
    float *k, *v;        /* (T, n_kv_heads*head_dim) */
    float *att;          /* (T, n_heads*head_dim) attention output */
    float *tmp;          /* (T, dim) */
    float *hg, *hu;      /* (T, hidden_dim) */
    float *rope_cs;      /* (T, head_dim) cos/sin per token */
    int32_t *tok_seq;    /* (T) sequence of each token */
    int32_t *tok_pos;    /* (T) position of each token */
    float **mm_scratch;  /* (n_threads) tiles of dequantized weight rows */
    float **att_scratch; /* (n_threads) (max_ctx) attention scores */
    float *out_x;        /* (T, dim) rows that want logits */
};

static void s_destroy(eng_backend_t **pbe) {
    if (!pbe || !*pbe) return;
    eng_backend_t *be = *pbe;
    if (be->kv_pool_free)
        be->kv_pool_free(be->kv_pool_ctx, be->kv_pool, eng_kv_pool_bytes(&be->kv));
    else
        free(be->kv_pool);
    free(be->x), free(be->xb), free(be->q), free(be->k), free(be->v), free(be->att), free(be->tmp);
    free(be->hg), free(be->hu), free(be->rope_cs), free(be->tok_seq), free(be->tok_pos), free(be->out_x);
    for (int i = 0; be->mm_scratch && i < be->n_threads; i++) free(be->mm_scratch[i]);
    for (int i = 0; be->att_scratch && i < be->n_threads; i++) free(be->att_scratch[i]);
    free(be->mm_scratch), free(be->att_scratch);
    eng_cpu_pool_destroy(&be->pool);
    free(be);
    *pbe = NULL;
}

static float *s_alloc_f32(size_t n) {
    return pd_xmalloc(n * sizeof(float));
}

static eng_backend_t *s_create(const eng_model_t *m, const eng_kv_layout_t *kv, const eng_params_t *p, char *err,
                               size_t err_cap) {
    const eng_model_config_t *c = &m->cfg;
    if (c->dim % 8 || c->hidden_dim % 8 || c->head_dim % 8) {
        snprintf(err, err_cap, "cpu backend: dims must be multiples of 8 (dim %d, hidden %d, head %d)", c->dim,
                 c->hidden_dim, c->head_dim);
        return NULL;
    }
    if (kv->dtype != ENG_KV_F32) {
        snprintf(err, err_cap, "cpu backend: KV dtype must be f32");
        return NULL;
    }
    eng_backend_t *be = pd_xcalloc(1, sizeof *be);
    be->m = m;
    be->kv = *kv;
    be->n_threads = p->n_threads > 0 ? p->n_threads : (int)sysconf(_SC_NPROCESSORS_ONLN);
    if (be->n_threads < 1) be->n_threads = 1;
    be->pool = eng_cpu_pool_create(be->n_threads);
    be->max_tokens = p->max_batch_tokens;
    be->max_ctx = c->ctx_len;
    size_t pool_bytes = eng_kv_pool_bytes(kv);
    be->kv_pool = p->kv_host_alloc ? p->kv_host_alloc(p->kv_host_ctx, pool_bytes) : NULL;
    if (be->kv_pool)
        be->kv_pool_free = p->kv_host_free, be->kv_pool_ctx = p->kv_host_ctx;
    else
        be->kv_pool = calloc(1, pool_bytes);
    if (!be->kv_pool) {
        snprintf(err, err_cap, "cpu backend: cannot allocate KV pool of %zu bytes", pool_bytes);
        s_destroy(&be);
        return NULL;
    }
    size_t T = (size_t)be->max_tokens, q_dim = (size_t)c->n_heads * c->head_dim,
           kv_dim = (size_t)c->n_kv_heads * c->head_dim;
    be->x = s_alloc_f32(T * c->dim), be->xb = s_alloc_f32(T * c->dim), be->tmp = s_alloc_f32(T * c->dim);
    be->out_x = s_alloc_f32(T * c->dim);
    be->q = s_alloc_f32(T * q_dim), be->att = s_alloc_f32(T * q_dim);
    be->k = s_alloc_f32(T * kv_dim), be->v = s_alloc_f32(T * kv_dim);
    be->hg = s_alloc_f32(T * c->hidden_dim), be->hu = s_alloc_f32(T * c->hidden_dim);
    be->rope_cs = s_alloc_f32(T * c->head_dim);
    be->tok_seq = pd_xmalloc(T * sizeof(int32_t)), be->tok_pos = pd_xmalloc(T * sizeof(int32_t));
    int64_t k_max = c->dim > c->hidden_dim ? c->dim : c->hidden_dim;
    if ((int64_t)q_dim > k_max) k_max = (int64_t)q_dim;
    be->mm_scratch = pd_xcalloc((size_t)be->n_threads, sizeof(float *));
    be->att_scratch = pd_xcalloc((size_t)be->n_threads, sizeof(float *));
    for (int i = 0; i < be->n_threads; i++) {
        be->mm_scratch[i] = s_alloc_f32((size_t)ENG_CPU_TILE_ROWS * (size_t)k_max);
        be->att_scratch[i] = s_alloc_f32((size_t)be->max_ctx);
    }
    return be;
}

static float *s_kv_slot(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, int32_t slot) {
    uint8_t *base = (uint8_t *)be->kv_pool + eng_kv_chunk_offset(&be->kv, layer, kind, block);
    return (float *)base + (size_t)slot * be->kv.n_kv_heads * be->kv.head_dim;
}

/* Attention for one token and one query head over positions 0..pos of its sequence, all read from
 * the paged cache (the token's own K/V was written there first), a block of contiguous slots at a
 * time. Fixed order (scores, max, sum and P.V all in position order): batch-invariant. */
static void s_attend(eng_backend_t *be, const eng_batch_t *b, int32_t layer, int64_t t, int32_t h, float *scores) {
    const eng_model_config_t *c = &be->m->cfg;
    const int32_t hd = c->head_dim, bs = be->kv.block_size, seq = be->tok_seq[t], pos = be->tok_pos[t];
    const int32_t g = h / (c->n_heads / c->n_kv_heads);
    const int64_t kv_dim = (int64_t)c->n_kv_heads * hd; /* slot stride */
    const int32_t *table = b->block_tables[seq];
    const float *q = be->q + t * (int64_t)c->n_heads * hd + (int64_t)h * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int32_t j0 = 0; j0 <= pos; j0 += bs) {
        int32_t nj = pos + 1 - j0 < bs ? pos + 1 - j0 : bs;
        eng_cpu_dot_rows(scores + j0, q, s_kv_slot(be, layer, ENG_KV_K, table[j0 / bs], 0) + (int64_t)g * hd, kv_dim,
                         nj, hd);
    }
    float max = -INFINITY;
    for (int32_t j = 0; j <= pos; j++) {
        scores[j] *= scale;
        if (scores[j] > max) max = scores[j];
    }
    float sum = 0.0f;
    for (int32_t j = 0; j <= pos; j++) {
        scores[j] = expf(scores[j] - max);
        sum += scores[j];
    }
    for (int32_t j = 0; j <= pos; j++) scores[j] /= sum;
    float *out = be->att + t * (int64_t)c->n_heads * hd + (int64_t)h * hd;
    memset(out, 0, sizeof(float) * (size_t)hd);
    for (int32_t j0 = 0; j0 <= pos; j0 += bs) {
        int32_t nj = pos + 1 - j0 < bs ? pos + 1 - j0 : bs;
        eng_cpu_axpy_rows(out, scores + j0, s_kv_slot(be, layer, ENG_KV_V, table[j0 / bs], 0) + (int64_t)g * hd, kv_dim,
                          nj, hd);
    }
}

typedef struct {
    eng_backend_t *be;
    const eng_batch_t *b;
    int32_t layer;
} s_attend_job_t;

static void s_attend_items(void *arg, int64_t begin, int64_t end, int thread) {
    const s_attend_job_t *j = arg;
    const int32_t n_heads = j->be->m->cfg.n_heads;
    for (int64_t it = begin; it < end; it++)
        s_attend(j->be, j->b, j->layer, it / n_heads, (int32_t)(it % n_heads), j->be->att_scratch[thread]);
}

static void s_add_bias(float *y, const eng_weight_t *bias, int64_t n_tok, int64_t n, float *row) {
    if (!bias->data) return;
    eng_cpu_weight_row(bias, 0, row);
    for (int64_t t = 0; t < n_tok; t++)
        for (int64_t i = 0; i < n; i++) y[t * n + i] += row[i];
}

static void s_layer(eng_backend_t *be, const eng_batch_t *b, int32_t l, int64_t T) {
    const eng_model_config_t *c = &be->m->cfg;
    const eng_layer_weights_t *w = &be->m->layers[l];
    const int64_t dim = c->dim, hd = c->head_dim, q_dim = (int64_t)c->n_heads * hd,
                  kv_dim = (int64_t)c->n_kv_heads * hd;
    float norm_w[c->dim > c->hidden_dim ? c->dim : c->hidden_dim];

    /* attention norm */
    eng_cpu_weight_row(&w->attn_norm, 0, norm_w);
    eng_cpu_rmsnorm(be->xb, be->x, norm_w, T, dim, c->rms_eps);

    /* Q, K, V projections (+ bias for qwen2), RoPE on Q and K */
    float *qkv[] = {be->q, be->k, be->v};
    const int64_t qkv_ld[] = {q_dim, kv_dim, kv_dim};
    const eng_weight_t *qkv_w[] = {&w->wq, &w->wk, &w->wv};
    eng_cpu_matmul_n(3, qkv, qkv_ld, qkv_w, be->xb, dim, T, be->mm_scratch, be->pool);
    float *bias_row = be->mm_scratch[0];
    s_add_bias(be->q, &w->bq, T, q_dim, bias_row);
    s_add_bias(be->k, &w->bk, T, kv_dim, bias_row);
    s_add_bias(be->v, &w->bv, T, kv_dim, bias_row);
    for (int64_t t = 0; t < T; t++) {
        eng_cpu_rope(be->q + t * q_dim, c->n_heads, hd, be->rope_cs + t * hd);
        eng_cpu_rope(be->k + t * kv_dim, c->n_kv_heads, hd, be->rope_cs + t * hd);
    }

    /* write K/V of the new tokens into their blocks */
    for (int64_t t = 0; t < T; t++) {
        const int32_t *table = b->block_tables[be->tok_seq[t]];
        int32_t pos = be->tok_pos[t], bs = be->kv.block_size;
        memcpy(s_kv_slot(be, l, ENG_KV_K, table[pos / bs], pos % bs), be->k + t * kv_dim, sizeof(float) * kv_dim);
        memcpy(s_kv_slot(be, l, ENG_KV_V, table[pos / bs], pos % bs), be->v + t * kv_dim, sizeof(float) * kv_dim);
    }
    if (b->kv_host_layers) __atomic_store_n(b->kv_host_layers, l + 1, __ATOMIC_RELEASE); /* the pool is host memory */

    /* attention over the paged cache, one (token, head) pair per item */
    s_attend_job_t job = {be, b, l};
    eng_cpu_pool_run(be->pool, T * c->n_heads, 4, s_attend_items, &job);

    /* output projection + residual */
    eng_cpu_matmul(be->tmp, dim, be->att, q_dim, T, &w->wo, be->mm_scratch, be->pool);
    for (int64_t i = 0; i < T * dim; i++) be->x[i] += be->tmp[i];

    /* feed-forward: norm, SwiGLU, down projection + residual */
    eng_cpu_weight_row(&w->ffn_norm, 0, norm_w);
    eng_cpu_rmsnorm(be->xb, be->x, norm_w, T, dim, c->rms_eps);
    float *gate_up[] = {be->hg, be->hu};
    const int64_t gate_up_ld[] = {c->hidden_dim, c->hidden_dim};
    const eng_weight_t *gate_up_w[] = {&w->w_gate, &w->w_up};
    eng_cpu_matmul_n(2, gate_up, gate_up_ld, gate_up_w, be->xb, dim, T, be->mm_scratch, be->pool);
    eng_cpu_swiglu(be->hg, be->hg, be->hu, T * c->hidden_dim);
    eng_cpu_matmul(be->tmp, dim, be->hg, c->hidden_dim, T, &w->w_down, be->mm_scratch, be->pool);
    for (int64_t i = 0; i < T * dim; i++) be->x[i] += be->tmp[i];
}

static pd_status s_forward(eng_backend_t *be, const eng_batch_t *b, int32_t n_logits) {
    const eng_model_config_t *c = &be->m->cfg;
    const int64_t dim = c->dim;
    int64_t T = 0;
    for (int32_t s = 0; s < b->n_seqs; s++) {
        if (b->pos[s] + b->n_tokens[s] > be->max_ctx) {
            LOG_E("cpu backend: sequence %d reaches position %d, beyond the context of %d", s,
                  b->pos[s] + b->n_tokens[s], be->max_ctx);
            return PD_EINVAL;
        }
        for (int32_t i = 0; i < b->n_tokens[s]; i++, T++) be->tok_seq[T] = s, be->tok_pos[T] = b->pos[s] + i;
    }

    /* token embeddings and RoPE angles */
    for (int64_t t = 0; t < T; t++) {
        eng_cpu_weight_row(&be->m->tok_embd, b->tokens[t], be->x + t * dim);
        eng_cpu_rope_table(be->rope_cs + t * c->head_dim, be->tok_pos[t], c->head_dim, c->rope_theta);
    }

    for (int32_t l = 0; l < c->n_layers; l++) s_layer(be, b, l, T);

    /* final norm and output head, only for the rows asked for */
    int64_t n_out = 0;
    for (int64_t t = 0, seq_end = 0, s = 0; t < T; t++) {
        if (t == seq_end) seq_end += b->n_tokens[s++];
        bool want = b->want_logits ? b->want_logits[t] != 0 : t == seq_end - 1;
        if (want) memcpy(be->out_x + n_out++ * dim, be->x + t * dim, sizeof(float) * (size_t)dim);
    }
    PD_ASSERT(n_out == n_logits);
    float norm_w[c->dim];
    eng_cpu_weight_row(&be->m->out_norm, 0, norm_w);
    eng_cpu_rmsnorm(be->out_x, be->out_x, norm_w, n_out, dim, c->rms_eps);
    eng_cpu_matmul(b->logits, c->vocab_size, be->out_x, dim, n_out, &be->m->output, be->mm_scratch, be->pool);
    return PD_OK;
}

static void *s_kv_host_base(eng_backend_t *be) {
    return be->kv_pool;
}

static pd_status s_kv_read(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, void *dst) {
    memcpy(dst, (uint8_t *)be->kv_pool + eng_kv_chunk_offset(&be->kv, layer, kind, block), eng_kv_chunk_bytes(&be->kv));
    return PD_OK;
}

static pd_status s_kv_write(eng_backend_t *be, int32_t layer, eng_kv_kind_t kind, int32_t block, const void *src) {
    memcpy((uint8_t *)be->kv_pool + eng_kv_chunk_offset(&be->kv, layer, kind, block), src, eng_kv_chunk_bytes(&be->kv));
    return PD_OK;
}

const eng_backend_ops_t eng_backend_cpu = {
    .name = "cpu",
    .create = s_create,
    .destroy = s_destroy,
    .forward = s_forward,
    .kv_read = s_kv_read,
    .kv_write = s_kv_write,
    .kv_host_base = s_kv_host_base,
};
