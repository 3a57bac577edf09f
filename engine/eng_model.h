/* eng_model.h: a Llama-family model as described by a GGUF file: hyperparameters and the weight
 * tensors, still in their file types (the backend decides how to hold them). Knows nothing about
 * compute, tokens or networking. */
#ifndef ENG_MODEL_H
#define ENG_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "eng_gguf.h"

typedef struct {
    char arch[32];      /* general.architecture: "llama" (also accepted: "mistral", "qwen2") */
    char name[128];     /* general.name, for logs */
    int32_t dim;        /* embedding_length */
    int32_t hidden_dim; /* feed_forward_length */
    int32_t n_layers;   /* block_count */
    int32_t n_heads;
    int32_t n_kv_heads;
    int32_t head_dim; /* dim / n_heads */
    int32_t vocab_size;
    int32_t ctx_len;  /* context_length the model was trained for */
    float rope_theta; /* rope.freq_base */
    int32_t rope_dim; /* rotated dims per head (= head_dim for llama) */
    float rms_eps;
    bool tied_embeddings; /* no output.weight: the head reuses token_embd */
    bool has_qkv_bias;    /* qwen2 */
} eng_model_config_t;

/* A weight matrix as stored: rows x cols, each row of cols elements in `type` (row-major, GGUF order:
 * ne[0] = cols). A vector has rows = 1. data points into the file mapping. */
typedef struct {
    int type;
    int64_t rows;
    int64_t cols;
    const void *data;
    uint64_t row_bytes;
} eng_weight_t;

typedef struct {
    eng_weight_t attn_norm;      /* (dim) f32 */
    eng_weight_t wq, wk, wv, wo; /* (n_heads*head_dim, dim), (n_kv_heads*head_dim, dim) x2, (dim, dim) */
    eng_weight_t bq, bk, bv;     /* biases, qwen2 only (rows = 1) */
    eng_weight_t ffn_norm;       /* (dim) */
    eng_weight_t w_gate, w_up;   /* (hidden_dim, dim) */
    eng_weight_t w_down;         /* (dim, hidden_dim) */
} eng_layer_weights_t;

typedef struct eng_model {
    eng_model_config_t cfg;
    eng_weight_t tok_embd;       /* (vocab_size, dim) */
    eng_weight_t out_norm;       /* (dim) */
    eng_weight_t output;         /* (vocab_size, dim); = tok_embd when tied */
    eng_layer_weights_t *layers; /* (n_layers) */
    eng_gguf_t *gguf;            /* owns the mapping all weights point into */
    uint64_t weight_bytes;       /* bytes of every tensor in file types */
} eng_model_t;

/* Opens the GGUF and checks that every tensor the architecture needs is present with the right shape
 * and a supported type. NULL with a one-line reason in err otherwise. */
eng_model_t *eng_model_load(const char *path, char *err, size_t err_cap);
void eng_model_destroy(eng_model_t **m);

/* A 64-bit identity of the weights for peer fingerprints (kvt_fingerprint_t.weights_hash): FNV-1a over
 * every tensor's name, type, shape and data size, plus the first and last 256 bytes of its data (so two
 * fine-tunes of one architecture differ) — identity, not a checksum of every byte. Same file, same hash. */
uint64_t eng_model_identity_hash(const eng_model_t *m);

/* Bytes one decode step reads from the weights in their stored types: every matrix except the input
 * embedding table (only one row per token is read), plus the output head. Used by benchmarks. */
uint64_t eng_model_step_weight_bytes(const eng_model_t *m);

#endif
