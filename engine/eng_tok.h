/* eng_tok.h: byte-level BPE tokenizer built from GGUF metadata (tokenizer.ggml.*), exact with the
 * Hugging Face `tokenizers` library for the GPT-2-style vocabularies (SmolLM2 first), and a streaming
 * detokenizer that never emits a broken UTF-8 sequence. Read-only after creation: any thread may use
 * one tokenizer concurrently. */
#ifndef ENG_TOK_H
#define ENG_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_gguf.h"
#include "pd_common.h"

typedef struct eng_tok eng_tok_t;

/* Builds the tokenizer from the GGUF's metadata (copies all it needs: g may be closed afterwards).
 * Fails (NULL + reason in err) for an unsupported tokenizer.ggml.model or tokenizer.ggml.pre. */
eng_tok_t *eng_tok_create(const eng_gguf_t *g, char *err, size_t err_cap);
void eng_tok_destroy(eng_tok_t **tok);

int32_t eng_tok_vocab_size(const eng_tok_t *tok);
int32_t eng_tok_bos(const eng_tok_t *tok); /* -1 when none */
int32_t eng_tok_eos(const eng_tok_t *tok);
/* End-of-generation: EOS, and special tokens that end a turn (<|im_end|>, <|endoftext|>, <|eot_id|>). */
bool eng_tok_is_eog(const eng_tok_t *tok, int32_t id);
/* Whether the GGUF asks for BOS to be prepended (tokenizer.ggml.add_bos_token). */
bool eng_tok_add_bos(const eng_tok_t *tok);
/* Id of a token by its exact vocabulary string (e.g. "<|im_end|>"), or -1. */
int32_t eng_tok_find(const eng_tok_t *tok, const char *text);
/* A 64-bit hash of vocabulary, merges and pre-tokenizer: two tokenizers with the same hash agree. */
uint64_t eng_tok_hash(const eng_tok_t *tok);

/* Encodes len bytes of text. Invalid UTF-8 is replaced by U+FFFD first (what Python's
 * bytes.decode('utf-8', 'replace') gives the HF tokenizer). With parse_special, the text of special
 * (control) tokens such as "<|im_start|>" maps to their ids; otherwise it is encoded as plain text.
 * No BOS is added (the caller decides). Writes up to cap ids into out and returns the total count,
 * which may exceed cap (call again with a larger buffer); negative pd_status on error. */
PD_NODISCARD int64_t eng_tok_encode(const eng_tok_t *tok, const char *text, size_t len, bool parse_special,
                                    int32_t *out, int64_t cap);

/* The bytes a token decodes to (byte-level decoding applied: "Ġ" -> ' '), not NUL-terminated;
 * special tokens give their text. Pointer valid for the tokenizer's lifetime. NULL for a bad id. */
const char *eng_tok_piece(const eng_tok_t *tok, int32_t id, size_t *len);

/* Streaming detokenizer: push ids one at a time, get text out only when it forms complete UTF-8
 * characters. Plain struct embedded in a request; init/flush, no allocation. */
typedef struct {
    unsigned char pending[8]; /* bytes of an incomplete UTF-8 sequence carried to the next token */
    int n_pending;
} eng_detok_t;

void eng_detok_init(eng_detok_t *d);
/* Appends the token's bytes to the pending ones and writes every complete, valid UTF-8 prefix to out
 * (invalid sequences become U+FFFD, as HF decode does). Returns bytes written, or PD_ERANGE when
 * cap < eng_detok_max_bytes(tok). */
PD_NODISCARD int64_t eng_detok_push(eng_detok_t *d, const eng_tok_t *tok, int32_t id, char *out, size_t cap);
/* At end of stream: emits pending bytes as U+FFFD replacement(s). Returns bytes written. */
int64_t eng_detok_flush(eng_detok_t *d, char *out, size_t cap);
/* Upper bound on the bytes one eng_detok_push can write for this tokenizer. */
size_t eng_detok_max_bytes(const eng_tok_t *tok);

/* Decodes a whole id sequence (same rules as pushing each then flushing). Returns bytes needed
 * (write at most cap); negative pd_status on a bad id. */
PD_NODISCARD int64_t eng_tok_decode(const eng_tok_t *tok, const int32_t *ids, int64_t n, char *out, size_t cap);

#endif
