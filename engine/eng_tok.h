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
 * Fails (NULL + reason in err) for an unsupported tokenizer.ggml.model (only "gpt2", byte-level BPE) or
 * tokenizer.ggml.pre (smollm, starcoder, refact, gpt-2; see eng_tok_pretok.c), or for inconsistent
 * tables (a merge whose parts or result are not in the vocabulary). Caller destroys. */
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
 * (CONTROL) tokens such as "<|im_start|>" maps to their ids; otherwise it is encoded as plain text (HF's
 * encode_special_tokens=True). USER_DEFINED tokens are always matched (HF's non-special added tokens).
 * Bytes that have no token of their own are dropped, as HF's BPE without unk_token does (SmolLM2 lacks
 * 21 of them: 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, 0xF5..0xFF).
 * No BOS is added (the caller decides). Writes up to cap ids into out (out may be NULL when cap is 0)
 * and returns the total count, which may exceed cap (call again with a larger buffer); PD_EINVAL for
 * bad arguments, PD_ENOMEM. Allocates scratch per call; any thread. */
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
 * (invalid sequences become U+FFFD, one per maximal invalid subpart, as HF decode's from_utf8_lossy).
 * Returns bytes written (0 while a character is incomplete), PD_ERANGE when
 * cap < eng_detok_max_bytes(tok), PD_EINVAL for a bad id. Output is never NUL-terminated. */
PD_NODISCARD int64_t eng_detok_push(eng_detok_t *d, const eng_tok_t *tok, int32_t id, char *out, size_t cap);
/* At end of stream: emits an unfinished sequence as one U+FFFD (3 bytes). Returns bytes written (0 or 3),
 * PD_ERANGE when cap < 3 and something is pending. */
int64_t eng_detok_flush(eng_detok_t *d, char *out, size_t cap);
/* Upper bound on the bytes one eng_detok_push can write for this tokenizer. */
size_t eng_detok_max_bytes(const eng_tok_t *tok);

/* Decodes a whole id sequence (same rules as pushing each then flushing; special tokens give their
 * text, like HF decode with skip_special_tokens=False). Returns bytes needed (writes at most cap, no NUL);
 * PD_EINVAL on a bad id. */
PD_NODISCARD int64_t eng_tok_decode(const eng_tok_t *tok, const int32_t *ids, int64_t n, char *out, size_t cap);

#endif
