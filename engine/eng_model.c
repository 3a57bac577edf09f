/* eng_model.c: maps GGUF tensor names and llama.* metadata onto eng_model_t, checking every shape.
 * It does not convert weights: backends read them through eng_weight_t. */
#include "eng_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_quant.h"
#include "pd_log.h"

static bool s_get_i32(const eng_gguf_t *g, const char *arch, const char *suffix, int32_t *out, char *err, size_t cap,
                      bool required) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int64_t v;
    if (!eng_gguf_get_i64(g, key, &v)) {
        if (required) snprintf(err, cap, "model: missing metadata key '%s'", key);
        return false;
    }
    if (v <= 0 || v > (1 << 24)) {
        snprintf(err, cap, "model: metadata '%s' = %lld out of range", key, (long long)v);
        return false;
    }
    *out = (int32_t)v;
    return true;
}

/* Finds a tensor and checks its shape; cols = ne[0], rows = ne[1] (1 for vectors). */
static bool s_weight(const eng_gguf_t *g, const char *name, int64_t rows, int64_t cols, eng_weight_t *w, char *err,
                     size_t cap) {
    const eng_gguf_tensor_t *t = eng_gguf_find_tensor(g, name);
    if (!t) {
        snprintf(err, cap, "model: missing tensor '%s'", name);
        return false;
    }
    int64_t t_rows = t->n_dims >= 2 ? (int64_t)t->ne[1] : 1;
    if ((int64_t)t->ne[0] != cols || t_rows != rows || t->ne[2] != 1 || t->ne[3] != 1) {
        snprintf(err, cap, "model: tensor '%s' has shape [%llu, %llu], expected [%lld, %lld]", name,
                 (unsigned long long)t->ne[0], (unsigned long long)t->ne[1], (long long)cols, (long long)rows);
        return false;
    }
    if (!eng_quant_supported(t->type)) {
        snprintf(err, cap, "model: tensor '%s' has unsupported type %s", name, eng_ggml_type_name(t->type));
        return false;
    }
    w->type = t->type;
    w->rows = rows;
    w->cols = cols;
    w->data = t->data;
    w->row_bytes = eng_ggml_row_bytes(t->type, (uint64_t)cols);
    return true;
}

static bool s_layer(const eng_gguf_t *g, const eng_model_config_t *c, int l, eng_layer_weights_t *lw, char *err,
                    size_t cap) {
    char n[96];
    int64_t q_rows = (int64_t)c->n_heads * c->head_dim, kv_rows = (int64_t)c->n_kv_heads * c->head_dim;
#define W(field, suffix, rows, cols)               \
    snprintf(n, sizeof n, "blk.%d.%s", l, suffix); \
    if (!s_weight(g, n, rows, cols, &lw->field, err, cap)) return false;
    W(attn_norm, "attn_norm.weight", 1, c->dim)
    W(wq, "attn_q.weight", q_rows, c->dim)
    W(wk, "attn_k.weight", kv_rows, c->dim)
    W(wv, "attn_v.weight", kv_rows, c->dim)
    W(wo, "attn_output.weight", c->dim, q_rows)
    W(ffn_norm, "ffn_norm.weight", 1, c->dim)
    W(w_gate, "ffn_gate.weight", c->hidden_dim, c->dim)
    W(w_up, "ffn_up.weight", c->hidden_dim, c->dim)
    W(w_down, "ffn_down.weight", c->dim, c->hidden_dim)
    if (c->has_qkv_bias) {
        W(bq, "attn_q.bias", 1, q_rows)
        W(bk, "attn_k.bias", 1, kv_rows)
        W(bv, "attn_v.bias", 1, kv_rows)
    }
#undef W
    return true;
}

static bool s_config(const eng_gguf_t *g, eng_model_config_t *c, char *err, size_t cap) {
    eng_gguf_str_t s;
    if (!eng_gguf_get_str(g, "general.architecture", &s)) {
        snprintf(err, cap, "model: missing 'general.architecture'");
        return false;
    }
    snprintf(c->arch, sizeof c->arch, "%.*s", (int)(s.len < 31 ? s.len : 31), s.ptr);
    if (strcmp(c->arch, "llama") && strcmp(c->arch, "mistral") && strcmp(c->arch, "qwen2")) {
        snprintf(err, cap, "model: architecture '%s' not supported (llama, mistral, qwen2)", c->arch);
        return false;
    }
    c->has_qkv_bias = strcmp(c->arch, "qwen2") == 0;
    if (eng_gguf_get_str(g, "general.name", &s))
        snprintf(c->name, sizeof c->name, "%.*s", (int)(s.len < 127 ? s.len : 127), s.ptr);
    const char *a = c->arch;
    if (!s_get_i32(g, a, "embedding_length", &c->dim, err, cap, true) ||
        !s_get_i32(g, a, "feed_forward_length", &c->hidden_dim, err, cap, true) ||
        !s_get_i32(g, a, "block_count", &c->n_layers, err, cap, true) ||
        !s_get_i32(g, a, "attention.head_count", &c->n_heads, err, cap, true))
        return false;
    c->n_kv_heads = c->n_heads;
    s_get_i32(g, a, "attention.head_count_kv", &c->n_kv_heads, err, cap, false);
    c->ctx_len = 2048;
    s_get_i32(g, a, "context_length", &c->ctx_len, err, cap, false);
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads) {
        snprintf(err, cap, "model: dim %d / heads %d / kv heads %d do not divide", c->dim, c->n_heads, c->n_kv_heads);
        return false;
    }
    c->head_dim = c->dim / c->n_heads;
    c->rope_dim = c->head_dim;
    s_get_i32(g, a, "rope.dimension_count", &c->rope_dim, err, cap, false);
    if (c->rope_dim != c->head_dim) {
        snprintf(err, cap, "model: partial RoPE (%d of %d dims) not supported", c->rope_dim, c->head_dim);
        return false;
    }
    char key[128];
    double d;
    snprintf(key, sizeof key, "%s.rope.freq_base", a);
    c->rope_theta = eng_gguf_get_f64(g, key, &d) ? (float)d : 10000.0f;
    snprintf(key, sizeof key, "%s.attention.layer_norm_rms_epsilon", a);
    c->rms_eps = eng_gguf_get_f64(g, key, &d) ? (float)d : 1e-5f;
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    if (eng_gguf_get_str(g, key, &s) && !(s.len == 4 && memcmp(s.ptr, "none", 4) == 0)) {
        snprintf(err, cap, "model: RoPE scaling '%.*s' not supported yet", (int)(s.len < 32 ? s.len : 32), s.ptr);
        return false;
    }
    const eng_gguf_tensor_t *emb = eng_gguf_find_tensor(g, "token_embd.weight");
    if (!emb || emb->n_dims != 2) {
        snprintf(err, cap, "model: missing 2-d tensor 'token_embd.weight'");
        return false;
    }
    c->vocab_size = (int32_t)emb->ne[1];
    return true;
}

eng_model_t *eng_model_load(const char *path, char *err, size_t err_cap) {
    eng_model_t *m = pd_xcalloc(1, sizeof *m);
    m->gguf = eng_gguf_open(path, err, err_cap);
    if (!m->gguf) goto fail;
    if (!s_config(m->gguf, &m->cfg, err, err_cap)) goto fail;
    const eng_model_config_t *c = &m->cfg;
    if (!s_weight(m->gguf, "token_embd.weight", c->vocab_size, c->dim, &m->tok_embd, err, err_cap)) goto fail;
    if (!s_weight(m->gguf, "output_norm.weight", 1, c->dim, &m->out_norm, err, err_cap)) goto fail;
    m->cfg.tied_embeddings = eng_gguf_find_tensor(m->gguf, "output.weight") == NULL;
    if (m->cfg.tied_embeddings)
        m->output = m->tok_embd;
    else if (!s_weight(m->gguf, "output.weight", c->vocab_size, c->dim, &m->output, err, err_cap))
        goto fail;
    m->layers = pd_xcalloc((size_t)c->n_layers, sizeof *m->layers);
    for (int l = 0; l < c->n_layers; l++)
        if (!s_layer(m->gguf, c, l, &m->layers[l], err, err_cap)) goto fail;
    for (int64_t i = 0; i < eng_gguf_n_tensors(m->gguf); i++) m->weight_bytes += eng_gguf_tensor(m->gguf, i)->n_bytes;
    return m;
fail:
    eng_model_destroy(&m);
    return NULL;
}

void eng_model_destroy(eng_model_t **m) {
    if (!m || !*m) return;
    eng_gguf_destroy(&(*m)->gguf);
    free((*m)->layers);
    free(*m);
    *m = NULL;
}

static uint64_t s_bytes(const eng_weight_t *w) {
    return w->data ? (uint64_t)w->rows * w->row_bytes : 0;
}

uint64_t eng_model_step_weight_bytes(const eng_model_t *m) {
    uint64_t b = s_bytes(&m->out_norm) + s_bytes(&m->output);
    for (int l = 0; l < m->cfg.n_layers; l++) {
        const eng_layer_weights_t *w = &m->layers[l];
        b += s_bytes(&w->attn_norm) + s_bytes(&w->wq) + s_bytes(&w->wk) + s_bytes(&w->wv) + s_bytes(&w->wo) +
             s_bytes(&w->bq) + s_bytes(&w->bk) + s_bytes(&w->bv) + s_bytes(&w->ffn_norm) + s_bytes(&w->w_gate) +
             s_bytes(&w->w_up) + s_bytes(&w->w_down);
    }
    return b;
}

static uint64_t s_fnv1a(uint64_t h, const void *data, size_t n) {
    const uint8_t *p = data;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

uint64_t eng_model_identity_hash(const eng_model_t *m) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int64_t i = 0; i < eng_gguf_n_tensors(m->gguf); i++) {
        const eng_gguf_tensor_t *t = eng_gguf_tensor(m->gguf, i);
        uint64_t facts[7] = {(uint64_t)t->type, t->n_dims, t->ne[0], t->ne[1], t->ne[2], t->ne[3], t->n_bytes};
        h = s_fnv1a(h, t->name, strlen(t->name) + 1);
        h = s_fnv1a(h, facts, sizeof facts);
        size_t head = t->n_bytes < 256 ? (size_t)t->n_bytes : 256;
        h = s_fnv1a(h, t->data, head);
        h = s_fnv1a(h, (const uint8_t *)t->data + t->n_bytes - head, head);
    }
    return h;
}
