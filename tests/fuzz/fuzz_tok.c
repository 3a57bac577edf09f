/* fuzz_tok.c: libFuzzer target for the tokenizer and the chat-template recogniser, built from the
 * default model's GGUF (PDSERVE_MODEL, else the model cache). The first input byte picks the mode:
 * encode arbitrary bytes (with and without special-token parsing, checking the count contract),
 * decode arbitrary id sequences whole and streamed (output must be valid UTF-8), or recognise and
 * render arbitrary template text. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "eng_chat.h"
#include "eng_gguf.h"
#include "eng_tok.h"

static eng_gguf_t *s_gguf;
static eng_tok_t *s_tok;

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc, (void)argv;
    static char path[4096];
    const char *p = getenv("PDSERVE_MODEL");
    if (!p || !*p) {
        snprintf(path, sizeof path, "%s/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf", getenv("HOME"));
        p = path;
    }
    char err[256];
    s_gguf = eng_gguf_open(p, err, sizeof err);
    if (s_gguf) s_tok = eng_tok_create(s_gguf, err, sizeof err);
    if (!s_tok) {
        fprintf(stderr, "fuzz_tok: cannot load tokenizer from %s: %s\n", p, err);
        abort();
    }
    return 0;
}

/* Strict UTF-8 validation (no overlongs, no surrogates, max U+10FFFF). */
static int s_valid_utf8(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        unsigned c = s[i];
        size_t len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!len || i + len > n) return 0;
        unsigned cp = len == 1 ? c : len == 2 ? c & 31 : len == 3 ? c & 15 : c & 7;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) return 0;
            cp = cp << 6 | (s[i + k] & 63);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
            (cp >= 0xd800 && cp <= 0xdfff))
            return 0;
        i += len;
    }
    return 1;
}

static void s_encode(const uint8_t *d, size_t n, bool special) {
    int64_t total = eng_tok_encode(s_tok, (const char *)d, n, special, NULL, 0);
    if (total < 0) abort();
    int32_t *ids = malloc(sizeof(int32_t) * (size_t)(total + 1));
    if (eng_tok_encode(s_tok, (const char *)d, n, special, ids, total) != total) abort();
    for (int64_t i = 0; i < total; i++)
        if (ids[i] < 0 || ids[i] >= eng_tok_vocab_size(s_tok)) abort();
    /* a short buffer gets a prefix and the same total */
    if (total > 1 && eng_tok_encode(s_tok, (const char *)d, n, special, ids, total / 2) != total) abort();
    free(ids);
}

static void s_decode(const uint8_t *d, size_t n) {
    size_t n_ids = n / 2;
    int32_t *ids = malloc(sizeof(int32_t) * (n_ids + 1));
    for (size_t i = 0; i < n_ids; i++) ids[i] = (int32_t)(d[2 * i] | d[2 * i + 1] << 8) % eng_tok_vocab_size(s_tok);
    int64_t need = eng_tok_decode(s_tok, ids, (int64_t)n_ids, NULL, 0);
    if (need < 0) abort();
    char *out = malloc((size_t)need + 1);
    if (eng_tok_decode(s_tok, ids, (int64_t)n_ids, out, (size_t)need + 1) != need) abort();
    if (!s_valid_utf8((unsigned char *)out, (size_t)need)) abort();
    /* streamed: every chunk valid UTF-8 on its own */
    size_t cap = eng_detok_max_bytes(s_tok);
    char *chunk = malloc(cap);
    eng_detok_t dt;
    eng_detok_init(&dt);
    for (size_t i = 0; i < n_ids; i++) {
        int64_t k = eng_detok_push(&dt, s_tok, ids[i], chunk, cap);
        if (k < 0 || !s_valid_utf8((unsigned char *)chunk, (size_t)k)) abort();
    }
    int64_t k = eng_detok_flush(&dt, chunk, cap);
    if (k < 0 || !s_valid_utf8((unsigned char *)chunk, (size_t)k)) abort();
    free(chunk), free(out), free(ids);
}

static void s_chat(const uint8_t *d, size_t n) {
    char *tmpl = malloc(n + 1);
    memcpy(tmpl, d, n);
    tmpl[n] = 0;
    char err[256];
    eng_chat_t *chat = eng_chat_create(s_gguf, tmpl, err, sizeof err);
    if (chat) {
        eng_chat_msg_t msgs[2] = {{"user", "hi"}, {"assistant", "hello"}};
        int64_t len = eng_chat_render(chat, msgs, 2, true, NULL, 0);
        if (len < 0) abort();
        char *out = malloc((size_t)len + 1);
        if (eng_chat_render(chat, msgs, 2, true, out, (size_t)len + 1) != len) abort();
        free(out);
        eng_chat_destroy(&chat);
    }
    free(tmpl);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    switch (data[0] % 4) {
    case 0: s_encode(data + 1, size - 1, false); break;
    case 1: s_encode(data + 1, size - 1, true); break;
    case 2: s_decode(data + 1, size - 1); break;
    default: s_chat(data + 1, size - 1); break;
    }
    return 0;
}
