/* fuzz_pb.c: libFuzzer target for proto/pb_*.c. The first input byte picks the message type (low 3 bits,
 * modulo 6: GenerateRequest, ResponseChunk, KvEnvelope, WorkerRegister, Heartbeat, Cancel) and whether to
 * unpack through an allocator that fails after (second byte) allocations (bit 3); the rest is the message.
 * A message that unpacks goes through its validators, and must survive pack -> unpack -> pack with the
 * same bytes and the same verdicts; every allocation must be returned. Seeds: tests/fuzz/corpus_pb. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pb.h"

typedef struct {
    size_t n_alloc, budget;
    long live;
} s_alloc_t;

static void *s_alloc(void *data, size_t n) {
    s_alloc_t *a = data;
    if (a->n_alloc >= a->budget) return NULL;
    a->n_alloc++, a->live++;
    return malloc(n ? n : 1);
}

static void s_free(void *data, void *p) {
    s_alloc_t *a = data;
    if (!p) return;
    a->live--;
    free(p);
}

static const ProtobufCMessageDescriptor *const s_types[6] = {
    &pdserve__v1__generate_request__descriptor, &pdserve__v1__response_chunk__descriptor,
    &pdserve__v1__kv_envelope__descriptor,      &pdserve__v1__worker_register__descriptor,
    &pdserve__v1__heartbeat__descriptor,        &pdserve__v1__cancel__descriptor,
};

/* Every validator that applies to m, folded into one verdict word (so two runs can be compared). */
static unsigned s_validate(const ProtobufCMessage *m) {
    char err[256];
    unsigned v = 0;
    const ProtobufCMessageDescriptor *d = m->descriptor;
    Pdserve__V1__Fingerprint ref = PDSERVE__V1__FINGERPRINT__INIT;
    ref.protocol_version = 1, ref.model_id = "SmolLM2-135M-Instruct", ref.block_size = 16, ref.n_layers = 30;
    ref.n_kv_heads = 3, ref.head_dim = 64, ref.rope_theta = 100000.f, ref.rope_dim = 64;
    if (d == &pdserve__v1__generate_request__descriptor) {
        const Pdserve__V1__GenerateRequest *r = (const Pdserve__V1__GenerateRequest *)m;
        pb_api_limits_t lim = pb_api_limits_default();
        v = (unsigned)-pb_validate_generate_request(r, &lim, err, sizeof err);
        lim.vocab_size = 49152, lim.max_tokens = 4096, lim.max_timeout_ms = 600000, lim.max_prompt_bytes = 64;
        lim.max_prompt_tokens = 16, lim.max_chat_messages = 4;
        v = v << 4 | (unsigned)-pb_validate_generate_request(r, &lim, err, sizeof err);
        v = v << 4 | (unsigned)-pb_validate_sampling(r->sampling, err, sizeof err);
    } else if (d == &pdserve__v1__response_chunk__descriptor) {
        const Pdserve__V1__ResponseChunk *c = (const Pdserve__V1__ResponseChunk *)m;
        v = (unsigned)-pb_validate_response_chunk(c, 0, err, sizeof err);
        v = v << 4 | (unsigned)-pb_validate_response_chunk(c, 49152, err, sizeof err);
    } else if (d == &pdserve__v1__kv_envelope__descriptor) {
        const Pdserve__V1__KvEnvelope *e = (const Pdserve__V1__KvEnvelope *)m;
        pb_kv_limits_t lim = pb_kv_limits_default();
        lim.n_layers = 30, lim.block_size = 16, lim.n_kv_heads = 3, lim.head_dim = 64, lim.vocab_size = 49152;
        v = (unsigned)-pb_validate_kv_envelope(e, &lim, err, sizeof err);
        lim.n_kv_heads = 0, lim.head_dim = 0, lim.vocab_size = 0, lim.require_checksums = false, lim.max_blocks = 1;
        v = v << 4 | (unsigned)-pb_validate_kv_envelope(e, &lim, err, sizeof err);
        if (e->body_case == PDSERVE__V1__KV_ENVELOPE__BODY_HELLO && e->hello) {
            v = v << 4 | (unsigned)-pb_fingerprint_diff(e->hello->fingerprint, &ref, err, sizeof err);
        }
        if (e->body_case == PDSERVE__V1__KV_ENVELOPE__BODY_DATA && e->data && !(v >> 4)) {
            /* validated under lim: the frame size must not have overflowed */
            if (pb_kv_data_frame_bytes(e->data) > lim.max_frame_bytes) abort();
        }
    } else if (d == &pdserve__v1__worker_register__descriptor) {
        const Pdserve__V1__WorkerRegister *w = (const Pdserve__V1__WorkerRegister *)m;
        v = (unsigned)-pb_validate_worker_register(w, err, sizeof err);
        v = v << 4 | (unsigned)-pb_fingerprint_diff(w->fingerprint, &ref, err, sizeof err);
        v = v << 4 | (unsigned)-pb_fingerprint_diff(w->fingerprint, w->fingerprint, err, sizeof err);
    } else if (d == &pdserve__v1__heartbeat__descriptor) {
        v = (unsigned)-pb_validate_heartbeat((const Pdserve__V1__Heartbeat *)m, err, sizeof err);
    } else {
        const Pdserve__V1__Cancel *c = (const Pdserve__V1__Cancel *)m;
        v = (unsigned)-pb_validate_cancel(c, err, sizeof err);
        (void)pb_error_code_name(c->reason);
        (void)pb_error_http_status(c->reason);
        (void)pb_error_code(pb_error_status(c->reason));
    }
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const ProtobufCMessageDescriptor *desc = s_types[(data[0] & 7) % 6];
    bool limited = data[0] & 8;
    const uint8_t *msg = data + 1;
    size_t len = size - 1;
    s_alloc_t a = {.budget = SIZE_MAX};
    if (limited && len) a.budget = msg[0], msg++, len--;
    ProtobufCAllocator alloc = {s_alloc, s_free, &a};
    ProtobufCAllocator *al = limited ? &alloc : NULL;

    ProtobufCMessage *m = NULL;
    char err[256];
    pd_status st = pb_unpack(desc, msg, len, 0, al, &m, err, sizeof err);
    if (st != PD_OK) {
        if (m || st != PD_EPROTO || a.live != 0) abort();
        return 0;
    }
    unsigned verdict = s_validate(m);

    /* pack -> unpack -> pack: same bytes, same verdicts */
    size_t n = pb_packed_size(m);
    uint8_t *p1 = malloc(n + 1), *p2 = malloc(n + 1);
    if (pb_pack(m, p1, n) != (int64_t)n) abort();
    ProtobufCMessage *m2 = NULL;
    if (pb_unpack(desc, p1, n, n, NULL, &m2, err, sizeof err) != PD_OK) {
        fprintf(stderr, "fuzz_pb: repacked %s does not unpack: %s\n", desc->name, err);
        abort();
    }
    if (pb_pack(m2, p2, n + 1) != (int64_t)n || memcmp(p1, p2, n)) abort();
    if (s_validate(m2) != verdict) abort();

    pb_free(&m2, NULL);
    pb_free(&m, al);
    if (a.live != 0) abort();
    free(p1);
    free(p2);
    return 0;
}
