/* test_pb.c: proto/pb_*.c: round trips of every message type with all fields set, size caps, truncated
 * and malformed input, unknown fields, caller-provided allocators (including every allocation failing in
 * turn), every validator rule, the fingerprint comparison and the error-code tables. Interop with the
 * official implementation is test_pb_interop.c. */
#define _POSIX_C_SOURCE 200809L /* strdup */
#include "pb.h"
#include "pd_test.h"

#include <stdint.h>

/* ---- fixtures: messages with every field set (pointers into the struct itself: never copy one) ---- */

typedef struct {
    Pdserve__V1__GenerateRequest req;
    Pdserve__V1__SamplingParams sp;
    Pdserve__V1__ChatMessages chat;
    Pdserve__V1__ChatMessage msg[3];
    Pdserve__V1__ChatMessage *pmsg[3];
    Pdserve__V1__TokenIds tok;
    int32_t ids[4];
    char *stop[2];
    Pdserve__V1__UInt32Value spec;
} t_req_t;

static void t_req_init(t_req_t *t, Pdserve__V1__GenerateRequest__PromptCase pc) {
    memset(t, 0, sizeof *t);
    pdserve__v1__generate_request__init(&t->req);
    pdserve__v1__sampling_params__init(&t->sp);
    pdserve__v1__chat_messages__init(&t->chat);
    pdserve__v1__token_ids__init(&t->tok);
    static const char *roles[3] = {"system", "user", "assistant"};
    static const char *contents[3] = {"Be brief.", "Hi \xf0\x9f\x99\x82", "Hello!"};
    for (int i = 0; i < 3; i++) {
        pdserve__v1__chat_message__init(&t->msg[i]);
        t->msg[i].role = (char *)roles[i];
        t->msg[i].content = (char *)contents[i];
        t->pmsg[i] = &t->msg[i];
    }
    t->chat.n_messages = 3, t->chat.messages = t->pmsg;
    t->ids[0] = 1, t->ids[1] = 0, t->ids[2] = 49151, t->ids[3] = 216;
    t->tok.n_ids = 4, t->tok.ids = t->ids;
    t->sp.temperature = 0.7f, t->sp.top_k = 40, t->sp.top_p = 0.9f, t->sp.min_p = 0.05f;
    t->sp.repetition_penalty = 1.1f, t->sp.presence_penalty = -0.5f, t->sp.frequency_penalty = 0.25f;
    t->sp.seed = 42, t->sp.has_seed = 1, t->sp.logprobs = 5;
    t->stop[0] = "\n\n", t->stop[1] = "</s>";
    Pdserve__V1__GenerateRequest *r = &t->req;
    r->request_id = 0xFEDCBA9876543210ull, r->model = "smol", r->sampling = &t->sp, r->max_tokens = 64;
    r->n_stop = 2, r->stop = t->stop, r->timeout_ms = 5000, r->stream = 1, r->ignore_eos = 1;
    pdserve__v1__uint32_value__init(&t->spec);
    t->spec.value = 3;
    r->speculative_tokens = &t->spec;
    r->prompt_case = pc;
    if (pc == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) r->text = "Once upon a time";
    if (pc == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS) r->token_ids = &t->tok;
    if (pc == PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT) r->chat = &t->chat;
}

typedef struct {
    Pdserve__V1__ResponseChunk c;
    int32_t ids[2];
    Pdserve__V1__TokenLogprob lp[2];
    Pdserve__V1__TokenLogprob *plp[2];
    Pdserve__V1__TopLogprob top[2];
    Pdserve__V1__TopLogprob *ptop[2];
    Pdserve__V1__Usage usage;
    Pdserve__V1__Error error;
} t_chunk_t;

static void t_chunk_init(t_chunk_t *t) {
    memset(t, 0, sizeof *t);
    pdserve__v1__response_chunk__init(&t->c);
    pdserve__v1__usage__init(&t->usage);
    pdserve__v1__error__init(&t->error);
    for (int i = 0; i < 2; i++) {
        pdserve__v1__token_logprob__init(&t->lp[i]);
        pdserve__v1__top_logprob__init(&t->top[i]);
        t->plp[i] = &t->lp[i], t->ptop[i] = &t->top[i];
    }
    t->ids[0] = 9690, t->ids[1] = 28;
    t->top[0].token = 9690, t->top[0].logprob = -0.1f, t->top[0].text = (ProtobufCBinaryData){2, (uint8_t *)"Hi"};
    t->top[1].token = 17, t->top[1].logprob = -INFINITY, t->top[1].text = (ProtobufCBinaryData){1, (uint8_t *)"\xe4"};
    t->lp[0].token = 9690, t->lp[0].logprob = -0.1f, t->lp[0].n_top = 2, t->lp[0].top = t->ptop;
    t->lp[1].token = 28, t->lp[1].logprob = -2.f;
    t->usage.prompt_tokens = 5, t->usage.completion_tokens = 2, t->usage.cached_prompt_tokens = 1;
    t->error.code = PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, t->error.message = "backend failed";
    Pdserve__V1__ResponseChunk *c = &t->c;
    c->request_id = 7, c->n_token_ids = 2, c->token_ids = t->ids, c->text = "Hi,";
    c->n_logprobs = 2, c->logprobs = t->plp, c->finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    c->usage = &t->usage, c->error = &t->error, c->seed = 99;
}

static void t_fp_init(Pdserve__V1__Fingerprint *fp) {
    pdserve__v1__fingerprint__init(fp);
    fp->protocol_version = 1, fp->model_id = "SmolLM2-135M", fp->weights_hash = 0x0123456789abcdefull;
    fp->tokenizer_hash = 0xfedcba9876543210ull, fp->kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16;
    fp->block_size = 16, fp->n_layers = 30, fp->n_kv_heads = 3, fp->head_dim = 64, fp->rope_theta = 100000.f;
    fp->rope_dim = 64;
}

/* One envelope of each body kind, all fields set, valid under t_kv_limits(). */
typedef struct {
    Pdserve__V1__KvEnvelope env;
    Pdserve__V1__Fingerprint fp;
    Pdserve__V1__Error error;
    Pdserve__V1__KvHello hello;
    Pdserve__V1__KvHelloReply hello_reply;
    Pdserve__V1__KvReserve reserve;
    Pdserve__V1__KvReserveReply reserve_reply;
    Pdserve__V1__KvData data;
    uint64_t sums[12], offsets[12];
    uint32_t dev_blocks[3];
    uint32_t runs[2];
    Pdserve__V1__KvCredit credit;
    Pdserve__V1__KvCommit commit;
    Pdserve__V1__KvDone done;
    Pdserve__V1__KvCancel cancel;
} t_kv_t;

static void t_kv_init(t_kv_t *t, Pdserve__V1__KvEnvelope__BodyCase body) {
    memset(t, 0, sizeof *t);
    pdserve__v1__kv_envelope__init(&t->env);
    t_fp_init(&t->fp);
    pdserve__v1__error__init(&t->error);
    t->error.code = PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, t->error.message = "no free blocks";
    Pdserve__V1__KvEnvelope *e = &t->env;
    e->body_case = body;
    switch (body) {
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO:
        pdserve__v1__kv_hello__init(e->hello = &t->hello);
        t->hello.fingerprint = &t->fp, t->hello.sender_id = "prefill-0";
        t->hello.shm_name = "/pdserve-kv-prefill-0", t->hello.shm_bytes = 1u << 30;
        t->hello.conn_group = 0x5eed5eed5eedull, t->hello.conn_index = 1;
        t->hello.device_handle.data = (uint8_t *)"cudaIpcMemHandle_t is 64 bytes long, opaque: any bytes at all..";
        t->hello.device_handle.len = 64, t->hello.device_n_blocks = 4096;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY:
        pdserve__v1__kv_hello_reply__init(e->hello_reply = &t->hello_reply);
        t->error.code = PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE, t->error.message = "block_size: 16 vs 32";
        t->hello_reply.error = &t->error, t->hello_reply.fingerprint = &t->fp;
        t->hello_reply.max_message_bytes = 1u << 26, t->hello_reply.frame_runs = 1, t->hello_reply.shm_mapped = 1;
        t->hello_reply.conn_groups = 1, t->hello_reply.device_mapped = 1;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE:
        pdserve__v1__kv_reserve__init(e->reserve = &t->reserve);
        t->reserve.request_id = 5, t->reserve.transfer_id = 6, t->reserve.epoch = 2, t->reserve.n_tokens = 33;
        t->reserve.n_blocks = 3, t->reserve.timeout_ms = 1000;
        t->dev_blocks[0] = 7, t->dev_blocks[1] = 8, t->dev_blocks[2] = 100;
        t->reserve.n_device_blocks = 3, t->reserve.device_blocks = t->dev_blocks;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY:
        pdserve__v1__kv_reserve_reply__init(e->reserve_reply = &t->reserve_reply);
        t->reserve_reply.transfer_id = 6, t->reserve_reply.epoch = 2, t->reserve_reply.error = &t->error;
        t->reserve_reply.credit_bytes = 1 << 20;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DATA:
        pdserve__v1__kv_data__init(e->data = &t->data);
        for (int i = 0; i < 12; i++) t->sums[i] = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
        for (int i = 0; i < 12; i++) t->offsets[i] = (uint64_t)(i + 1) * 6144; /* one chunk: 16 x 3 x 64 x 2 */
        t->runs[0] = 1, t->runs[1] = 1;
        t->data.transfer_id = 6, t->data.epoch = 2, t->data.seq = 1, t->data.first_layer = 27, t->data.n_layers = 3;
        t->data.first_block = 1, t->data.n_blocks = 2, t->data.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16;
        t->data.block_size = 16, t->data.n_kv_heads = 3, t->data.head_dim = 64;
        t->data.n_checksums = 12, t->data.checksums = t->sums;
        t->data.n_frame_blocks = 2, t->data.frame_blocks = t->runs; /* 2 runs of 1 block: 2 x 3 x 2 frames */
        t->data.n_shm_offsets = 12, t->data.shm_offsets = t->offsets;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CREDIT:
        pdserve__v1__kv_credit__init(e->credit = &t->credit);
        t->credit.transfer_id = 6, t->credit.epoch = 2, t->credit.bytes = 4096;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT:
        pdserve__v1__kv_commit__init(e->commit = &t->commit);
        t->commit.transfer_id = 6, t->commit.epoch = 2, t->commit.n_frames = 4, t->commit.first_token = 9690;
        t->commit.first_token_info.data = (uint8_t *)"\x08\xda\x4b", t->commit.first_token_info.len = 3;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DONE:
        pdserve__v1__kv_done__init(e->done = &t->done);
        t->done.transfer_id = 6, t->done.epoch = 2, t->done.error = &t->error;
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL:
        pdserve__v1__kv_cancel__init(e->cancel = &t->cancel);
        t->cancel.transfer_id = 6, t->cancel.epoch = 2, t->cancel.reason = &t->error;
        break;
    default: break;
    }
}

static pb_kv_limits_t t_kv_limits(void) {
    pb_kv_limits_t lim = pb_kv_limits_default();
    lim.n_layers = 30, lim.block_size = 16, lim.n_kv_heads = 3, lim.head_dim = 64, lim.vocab_size = 49152;
    lim.shm_bytes = 13 * 6144;
    return lim;
}

typedef struct {
    Pdserve__V1__WorkerRegister wr;
    Pdserve__V1__Fingerprint fp;
    Pdserve__V1__Heartbeat hb;
    Pdserve__V1__Cancel cancel;
} t_ctl_t;

static void t_ctl_init(t_ctl_t *t) {
    memset(t, 0, sizeof *t);
    t_fp_init(&t->fp);
    pdserve__v1__worker_register__init(&t->wr);
    t->wr.worker_id = "decode-1", t->wr.role = PDSERVE__V1__WORKER_ROLE__ROLE_DECODE;
    t->wr.control_endpoint = "tcp://127.0.0.1:5601", t->wr.kv_endpoint = "tcp://127.0.0.1:5602";
    t->wr.fingerprint = &t->fp, t->wr.backend = "cpu";
    pdserve__v1__heartbeat__init(&t->hb);
    t->hb.worker_id = "decode-1", t->hb.seq = 12, t->hb.role = PDSERVE__V1__WORKER_ROLE__ROLE_BOTH;
    t->hb.queue_depth = 2, t->hb.running_seqs = 3, t->hb.free_kv_blocks = 10, t->hb.total_kv_blocks = 10;
    t->hb.kv_bytes_sent = 1, t->hb.kv_bytes_received = 2;
    t->hb.decode_steps = 3, t->hb.decode_rows = 4, t->hb.decode_tokens = 5;
    t->hb.spec_rows = 6, t->hb.spec_draft_tokens = 7, t->hb.spec_accepted_tokens = 8;
    pdserve__v1__cancel__init(&t->cancel);
    t->cancel.request_id = 3, t->cancel.reason = PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
}

/* ---- helpers ---- */

/* Every field of m set (scalars non-default, messages present, repeated non-empty; in a oneof, one member). */
static bool t_all_set(const ProtobufCMessage *m, char *why, size_t cap) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[i];
        const void *v = base + fd->offset;
        bool set = true;
        if (fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
            if (*(const uint32_t *)(base + fd->quantifier_offset) != fd->id) continue;
        }
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            set = *(const size_t *)(base + fd->quantifier_offset) > 0;
            if (set && fd->type == PROTOBUF_C_TYPE_MESSAGE) {
                ProtobufCMessage *const *items = *(ProtobufCMessage *const *const *)v;
                if (!t_all_set(items[0], why, cap)) return false;
            }
        } else if (fd->type == PROTOBUF_C_TYPE_MESSAGE) {
            const ProtobufCMessage *sub = *(ProtobufCMessage *const *)v;
            set = sub && t_all_set(sub, why, cap);
            if (sub && !set) return false;
        } else if (fd->type == PROTOBUF_C_TYPE_STRING) {
            set = *(char *const *)v && **(char *const *)v;
        } else if (fd->type == PROTOBUF_C_TYPE_BYTES) {
            set = ((const ProtobufCBinaryData *)v)->len > 0;
        } else if (fd->type == PROTOBUF_C_TYPE_UINT64 || fd->type == PROTOBUF_C_TYPE_FIXED64) {
            set = *(const uint64_t *)v != 0;
        } else {
            set = *(const uint32_t *)v != 0; /* 32-bit ints, enums, bools and floats: any non-zero bits */
        }
        if (!set) {
            snprintf(why, cap, "%s.%s", d->name, fd->name);
            return false;
        }
    }
    return true;
}

/* Packs m, unpacks it with pb_unpack, packs again: the bytes must match. Returns the unpacked copy. */
static ProtobufCMessage *t_roundtrip(const ProtobufCMessage *m) {
    char why[128] = "";
    CHECK_MSG(t_all_set(m, why, sizeof why), "fixture leaves %s unset", why);
    size_t n = pb_packed_size(m);
    uint8_t *a = malloc(n + 1), *b = malloc(n + 1);
    CHECK_EQ_INT(pb_pack(m, a, n), n);
    ProtobufCMessage *u = NULL;
    char err[256];
    pd_status st = pb_unpack(m->descriptor, a, n, n, NULL, &u, err, sizeof err);
    CHECK_MSG(st == PD_OK, "%s: %s", m->descriptor->name, err);
    if (u) {
        CHECK_EQ_INT(pb_pack(u, b, n + 1), n);
        CHECK_MSG(!memcmp(a, b, n), "%s: repacked bytes differ", m->descriptor->name);
    }
    free(a);
    free(b);
    return u;
}

static void t_expect(const char *what, pd_status st, pd_status want, const char *err, const char *substr) {
    CHECK_MSG(st == want && (want == PD_OK || (substr && strstr(err, substr))), "%s: got %s '%s', want %s '%s'", what,
              pd_strerror(st), st ? err : "", pd_strerror(want), substr ? substr : "");
}

/* ---- round trips ---- */

static void test_roundtrip_generate_request(void) {
    const Pdserve__V1__GenerateRequest__PromptCase cases[3] = {PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT,
                                                               PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS,
                                                               PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT};
    for (int k = 0; k < 3; k++) {
        t_req_t t;
        t_req_init(&t, cases[k]);
        Pdserve__V1__GenerateRequest *u = (Pdserve__V1__GenerateRequest *)t_roundtrip(&t.req.base);
        if (!u) continue;
        CHECK_EQ_INT(u->prompt_case, cases[k]);
        CHECK(u->request_id == 0xFEDCBA9876543210ull && u->sampling && u->sampling->top_p == 0.9f);
        CHECK(u->n_stop == 2 && !strcmp(u->stop[0], "\n\n"));
        if (k == 1) CHECK(u->token_ids->n_ids == 4 && u->token_ids->ids[2] == 49151);
        if (k == 2) CHECK(u->chat->n_messages == 3 && !strcmp(u->chat->messages[1]->content, "Hi \xf0\x9f\x99\x82"));
        pb_free_generate_request(&u, NULL);
        CHECK(u == NULL);
    }
}

static void test_roundtrip_response_chunk(void) {
    t_chunk_t t;
    t_chunk_init(&t);
    Pdserve__V1__ResponseChunk *u = (Pdserve__V1__ResponseChunk *)t_roundtrip(&t.c.base);
    if (u) {
        CHECK(u->n_logprobs == 2 && u->logprobs[0]->n_top == 2 && isinf(u->logprobs[0]->top[1]->logprob));
        CHECK(u->logprobs[0]->top[1]->text.len == 1 && u->logprobs[0]->top[1]->text.data[0] == 0xe4);
        CHECK(u->error && u->error->code == PDSERVE__V1__ERROR_CODE__ERR_INTERNAL);
    }
    pb_free_response_chunk(&u, NULL);
}

static void test_roundtrip_kv_envelope(void) {
    for (int body = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO; body <= PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL; body++) {
        t_kv_t t;
        t_kv_init(&t, (Pdserve__V1__KvEnvelope__BodyCase)body);
        Pdserve__V1__KvEnvelope *u = (Pdserve__V1__KvEnvelope *)t_roundtrip(&t.env.base);
        if (u) CHECK_EQ_INT(u->body_case, body);
        if (u && body == PDSERVE__V1__KV_ENVELOPE__BODY_DATA)
            CHECK(u->data->n_checksums == 12 && u->data->checksums[11] == t.sums[11]);
        pb_free_kv_envelope(&u, NULL);
    }
}

static void test_roundtrip_control(void) {
    t_ctl_t t;
    t_ctl_init(&t);
    ProtobufCMessage *u = t_roundtrip(&t.wr.base);
    if (u) CHECK(((Pdserve__V1__WorkerRegister *)u)->fingerprint->rope_theta == 100000.f);
    pb_free(&u, NULL);
    u = t_roundtrip(&t.hb.base);
    pb_free(&u, NULL);
    u = t_roundtrip(&t.cancel.base);
    pb_free(&u, NULL);
    CHECK(u == NULL);
}

/* ---- caps, truncation, malformed input ---- */

static void test_unpack_caps(void) {
    t_ctl_t t;
    t_ctl_init(&t);
    uint8_t buf[256];
    int64_t n = pb_pack(&t.hb.base, buf, sizeof buf);
    REQUIRE(n > 0);
    char err[256];
    Pdserve__V1__Heartbeat *hb = NULL;
    t_expect("at the cap", pb_unpack_heartbeat(buf, (size_t)n, (size_t)n, NULL, &hb, err, sizeof err), PD_OK, err,
             NULL);
    pb_free_heartbeat(&hb, NULL);
    t_expect("one over the cap", pb_unpack_heartbeat(buf, (size_t)n, (size_t)n - 1, NULL, &hb, err, sizeof err),
             PD_EPROTO, err, "over the cap");
    CHECK(hb == NULL);

    /* cap 0 = the type's default; the refusal happens before protobuf-c reads a byte */
    size_t big = PB_CAP_CONTROL_BYTES + 1;
    uint8_t *zeros = calloc(1, PB_CAP_GENERATE_REQUEST_BYTES + 1);
    t_expect("heartbeat default cap", pb_unpack_heartbeat(zeros, big, 0, NULL, &hb, err, sizeof err), PD_EPROTO, err,
             "over the cap of 65536 bytes");
    Pdserve__V1__Cancel *c = NULL;
    t_expect("cancel default cap", pb_unpack_cancel(zeros, big, 0, NULL, &c, err, sizeof err), PD_EPROTO, err,
             "over the cap");
    Pdserve__V1__WorkerRegister *wr = NULL;
    t_expect("register default cap", pb_unpack_worker_register(zeros, big, 0, NULL, &wr, err, sizeof err), PD_EPROTO,
             err, "over the cap");
    Pdserve__V1__KvEnvelope *env = NULL;
    t_expect("kv default cap",
             pb_unpack_kv_envelope(zeros, PB_CAP_KV_ENVELOPE_BYTES + 1, 0, NULL, &env, err, sizeof err), PD_EPROTO, err,
             "over the cap");
    Pdserve__V1__ResponseChunk *rc = NULL;
    t_expect("chunk default cap",
             pb_unpack_response_chunk(zeros, PB_CAP_RESPONSE_CHUNK_BYTES + 1, 0, NULL, &rc, err, sizeof err), PD_EPROTO,
             err, "over the cap");
    Pdserve__V1__GenerateRequest *req = NULL;
    t_expect("request default cap",
             pb_unpack_generate_request(zeros, PB_CAP_GENERATE_REQUEST_BYTES + 1, 0, NULL, &req, err, sizeof err),
             PD_EPROTO, err, "pdserve.v1.GenerateRequest: message of 4194305 bytes is over the cap of 4194304 bytes");
    free(zeros);

    t_expect("NULL out", pb_unpack_heartbeat(buf, (size_t)n, 0, NULL, NULL, err, sizeof err), PD_EINVAL, err, "NULL");
    t_expect("NULL buf", pb_unpack_heartbeat(NULL, 3, 0, NULL, &hb, err, sizeof err), PD_EINVAL, err, "NULL");
    /* an empty buffer is an all-default message: structurally fine, the validator refuses it */
    t_expect("empty", pb_unpack_heartbeat(NULL, 0, 0, NULL, &hb, err, sizeof err), PD_OK, err, NULL);
    t_expect("empty heartbeat", pb_validate_heartbeat(hb, err, sizeof err), PD_EPROTO, err, "worker_id is empty");
    pb_free_heartbeat(&hb, NULL);
    pb_free_heartbeat(&hb, NULL); /* NULL is fine */
    pb_free_heartbeat(NULL, NULL);
}

static void test_unpack_truncated(void) {
    /* Every prefix of every message: either a clean failure or a (shorter) valid message, never a crash
     * or a leak (the ASan build checks). Cutting inside a length-delimited field must fail. */
    t_req_t t;
    t_req_init(&t, PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT);
    uint8_t buf[512];
    int64_t n = pb_pack(&t.req.base, buf, sizeof buf);
    REQUIRE(n > 20);
    int n_fail = 0;
    for (int64_t k = 0; k < n; k++) {
        Pdserve__V1__GenerateRequest *u = NULL;
        char err[256] = "";
        pd_status st = pb_unpack_generate_request(buf, (size_t)k, 0, NULL, &u, err, sizeof err);
        CHECK((st == PD_OK) == (u != NULL));
        if (st) {
            n_fail++;
            CHECK_MSG(strstr(err, "cannot unpack"), "prefix %lld: %s", (long long)k, err);
        }
        pb_free_generate_request(&u, NULL);
    }
    /* field 1 is a 1 + 10-byte varint, then model (2 + 4 bytes): cuts at 5 and 12 fall inside a field */
    CHECK(n_fail > n / 2);
    Pdserve__V1__GenerateRequest *u = NULL;
    CHECK(pb_unpack_generate_request(buf, 5, 0, NULL, &u, NULL, 0) == PD_EPROTO && !u);
    CHECK(pb_unpack_generate_request(buf, 12, 0, NULL, &u, NULL, 0) == PD_EPROTO && !u);
}

static void test_unpack_malformed(void) {
    static const struct {
        const char *what;
        uint8_t bytes[16];
        size_t len;
    } bad[] = {
        {"varint of 11 bytes", {0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01}, 12},
        {"length past the end", {0x12, 0x7f, 'a'}, 3},
        {"length of 2^32", {0x12, 0x80, 0x80, 0x80, 0x80, 0x10, 'a'}, 7},
        {"wire type 6", {0x0e, 0x00}, 2},
        {"wire type 3 (group start)", {0x0b, 0x0c}, 2},
        {"field number 0", {0x00, 0x01}, 2},
        {"fixed64 cut short", {0x19, 1, 2, 3}, 4},
        {"string field as varint", {0x0a, 0x05}, 2}, /* worker_id (1) with wire type 0 */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        Pdserve__V1__Heartbeat *hb = NULL;
        char err[256] = "";
        pd_status st = pb_unpack_heartbeat(bad[i].bytes, bad[i].len, 0, NULL, &hb, err, sizeof err);
        CHECK_MSG(st == PD_EPROTO && !hb, "%s: accepted", bad[i].what);
        pb_free_heartbeat(&hb, NULL);
    }
}

/* Unknown fields (a newer peer's) are accepted, ignored, and not kept: a repack gives the known fields only. */
static void test_unknown_fields(void) {
    t_ctl_t t;
    t_ctl_init(&t);
    uint8_t clean[256], buf[512];
    int64_t n = pb_pack(&t.hb.base, clean, sizeof clean);
    REQUIRE(n > 0);
    static const uint8_t unknown[] = {
        0xa0, 0x06, 0x96, 0x01,                         /* field 100 varint 150 */
        0xaa, 0x06, 0x03, 'x',  'y',  'z',              /* field 101 length-delimited "xyz" */
        0xb5, 0x06, 1,    2,    3,    4,                /* field 102 fixed32 */
        0xb9, 0x06, 1,    2,    3,    4,    5, 6, 7, 8, /* field 103 fixed64 */
        0xf8, 0xff, 0xff, 0xff, 0x0f, 0x01,             /* field 2^29-1 (the largest) varint 1 */
        0x10, 0x05,                                     /* and seq = 5 again, after them: last one wins */
    };
    memcpy(buf, unknown, sizeof unknown);
    memcpy(buf + sizeof unknown, clean, (size_t)n);
    Pdserve__V1__Heartbeat *hb = NULL;
    char err[256];
    pd_status st = pb_unpack_heartbeat(buf, sizeof unknown + (size_t)n, 0, NULL, &hb, err, sizeof err);
    CHECK_MSG(st == PD_OK, "%s", err);
    REQUIRE(hb);
    CHECK(hb->seq == 12 && !strcmp(hb->worker_id, "decode-1") && hb->base.n_unknown_fields == 0);
    uint8_t out[256];
    CHECK(pb_pack(&hb->base, out, sizeof out) == n && !memcmp(out, clean, (size_t)n));
    pb_free_heartbeat(&hb, NULL);

    /* nested: an unknown field inside KvEnvelope.hello.fingerprint, and one in the envelope itself */
    t_kv_t k;
    t_kv_init(&k, PDSERVE__V1__KV_ENVELOPE__BODY_HELLO);
    uint8_t fp[128], hello[256], env[300];
    size_t nfp = (size_t)pb_pack(&k.fp.base, fp, sizeof fp);
    memcpy(fp + nfp, "\xa0\x06\x01", 3); /* field 100 = 1 */
    nfp += 3;
    size_t nh = 0;
    hello[nh++] = 0x0a, hello[nh++] = (uint8_t)nfp; /* fingerprint (1), short enough for a 1-byte length */
    memcpy(hello + nh, fp, nfp), nh += nfp;
    hello[nh++] = 0x12, hello[nh++] = 1, hello[nh++] = 'p'; /* sender_id "p" */
    size_t ne = 0;
    env[ne++] = 0x0a, env[ne++] = (uint8_t)nh; /* hello (1) */
    memcpy(env + ne, hello, nh), ne += nh;
    memcpy(env + ne, "\xf8\x07\x07", 3), ne += 3; /* field 127 = 7 */
    REQUIRE(nfp < 128 && nh < 128);
    Pdserve__V1__KvEnvelope *e = NULL;
    st = pb_unpack_kv_envelope(env, ne, 0, NULL, &e, err, sizeof err);
    CHECK_MSG(st == PD_OK, "%s", err);
    REQUIRE(e && e->hello && e->hello->fingerprint);
    CHECK(e->base.n_unknown_fields == 0 && e->hello->base.n_unknown_fields == 0);
    CHECK(e->hello->fingerprint->base.n_unknown_fields == 0 && e->hello->fingerprint->rope_dim == 64);
    pb_kv_limits_t lim = t_kv_limits();
    t_expect("nested unknown", pb_validate_kv_envelope(e, &lim, err, sizeof err), PD_OK, err, NULL);
    CHECK(pb_packed_size(&e->base) == ne - 6);
    pb_free_kv_envelope(&e, NULL);
}

/* ---- allocators ---- */

typedef struct {
    size_t n_alloc, budget;
    long live;
    size_t bytes;
} t_alloc_t;

static void *t_alloc(void *data, size_t n) {
    t_alloc_t *a = data;
    if (a->n_alloc >= a->budget) return NULL;
    a->n_alloc++, a->live++, a->bytes += n;
    return malloc(n ? n : 1);
}
static void t_free(void *data, void *p) {
    t_alloc_t *a = data;
    if (!p) return;
    a->live--;
    free(p);
}

static void test_allocator(void) {
    t_chunk_t t;
    t_chunk_init(&t);
    uint8_t buf[512];
    int64_t n = pb_pack(&t.c.base, buf, sizeof buf);
    REQUIRE(n > 0);
    t_alloc_t a = {.budget = SIZE_MAX};
    ProtobufCAllocator alloc = {t_alloc, t_free, &a};
    Pdserve__V1__ResponseChunk *c = NULL;
    char err[256];
    CHECK(pb_unpack_response_chunk(buf, (size_t)n, 0, &alloc, &c, err, sizeof err) == PD_OK);
    size_t total = a.n_alloc;
    CHECK(total > 5 && a.live == (long)total);
    pb_free_response_chunk(&c, &alloc);
    CHECK(a.live == 0 && c == NULL);

    /* every allocation failing in turn: a clean PD_EPROTO, nothing left allocated */
    for (size_t k = 0; k < total; k++) {
        a = (t_alloc_t){.budget = k};
        pd_status st = pb_unpack_response_chunk(buf, (size_t)n, 0, &alloc, &c, err, sizeof err);
        CHECK_MSG(st == PD_EPROTO && !c && a.live == 0, "budget %zu: %s, %ld blocks left", k, pd_strerror(st), a.live);
        pb_free_response_chunk(&c, &alloc);
    }

    /* unknown fields are freed through the allocator too */
    uint8_t ubuf[600];
    memcpy(ubuf, "\xaa\x06\x03xyz", 6);
    memcpy(ubuf + 6, buf, (size_t)n);
    a = (t_alloc_t){.budget = SIZE_MAX};
    CHECK(pb_unpack_response_chunk(ubuf, (size_t)n + 6, 0, &alloc, &c, err, sizeof err) == PD_OK);
    CHECK(a.n_alloc > total && a.live == (long)total);
    pb_free_response_chunk(&c, &alloc);
    CHECK(a.live == 0);
}

/* Worst case memory per wire byte: empty chat messages, 2 bytes each on the wire. Documents the number
 * behind pb.h's advice to unpack into a budgeted arena. */
static void test_amplification(void) {
    enum { N = 10000 };
    size_t len = 2 + 3 + 2 * N; /* chat (5), 3-byte length, N x "0a 00" */
    uint8_t *buf = malloc(len);
    buf[0] = 0x2a;
    size_t body = 2 * N;
    buf[1] = (uint8_t)(0x80 | (body & 0x7f)), buf[2] = (uint8_t)(0x80 | ((body >> 7) & 0x7f));
    buf[3] = (uint8_t)(body >> 14);
    for (size_t i = 0; i < N; i++) buf[4 + 2 * i] = 0x0a, buf[5 + 2 * i] = 0x00;
    len = 4 + body;
    t_alloc_t a = {.budget = SIZE_MAX};
    ProtobufCAllocator alloc = {t_alloc, t_free, &a};
    Pdserve__V1__GenerateRequest *r = NULL;
    char err[256];
    CHECK(pb_unpack_generate_request(buf, len, 0, &alloc, &r, err, sizeof err) == PD_OK);
    CHECK(r && r->chat && r->chat->n_messages == N);
    double ratio = (double)a.bytes / (double)len;
    fprintf(stderr, "     empty chat messages: %zu wire bytes -> %zu bytes in %zu allocations (%.1fx)\n", len, a.bytes,
            a.n_alloc, ratio);
    CHECK(ratio < 64.0); /* pb.h says "about 50x" */
    pb_api_limits_t lim = pb_api_limits_default();
    t_expect("empty chat messages", pb_validate_generate_request(r, &lim, err, sizeof err), PD_EINVAL, err,
             "chat.messages has 10000 messages, must be at most 1024");
    pb_free_generate_request(&r, &alloc);
    free(buf);
}

static void test_pack(void) {
    t_ctl_t t;
    t_ctl_init(&t);
    size_t n = pb_packed_size(&t.cancel.base);
    uint8_t buf[64];
    memset(buf, 0xee, sizeof buf);
    CHECK(pb_pack(&t.cancel.base, buf, n - 1) == PD_ERANGE && buf[0] == 0xee);
    CHECK(pb_pack(&t.cancel.base, NULL, 0) == PD_ERANGE);
    CHECK(pb_pack(&t.cancel.base, buf, n) == (int64_t)n);
    Pdserve__V1__Cancel empty = PDSERVE__V1__CANCEL__INIT;
    CHECK(pb_pack(&empty.base, NULL, 0) == 0);
}

/* The two places protobuf-c's encoding differs from upb's (pb.h, README): kept visible here so that a
 * protobuf-c upgrade that changes them is noticed. */
static void test_protobuf_c_quirks(void) {
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = -0.0f;
    CHECK(pb_packed_size(&sp.base) == 0); /* upb sends 5 bytes */
    Pdserve__V1__GenerateRequest r = PDSERVE__V1__GENERATE_REQUEST__INIT;
    r.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    r.text = (char *)protobuf_c_empty_string;
    CHECK(pb_packed_size(&r.base) == 0); /* the oneof is lost */
    r.text = "";
    CHECK(pb_packed_size(&r.base) == 2); /* a literal "" is sent */
    /* a string with a NUL reads as its prefix */
    Pdserve__V1__GenerateRequest *u = NULL;
    CHECK(pb_unpack_generate_request((const uint8_t *)"\x1a\x03"
                                                      "a\0b",
                                     5, 0, NULL, &u, NULL, 0) == PD_OK);
    CHECK(u && !strcmp(u->text, "a"));
    pb_free_generate_request(&u, NULL);
    /* protobuf-c does not check UTF-8: the validators do */
    CHECK(pb_unpack_generate_request((const uint8_t *)"\x1a\x02\xff\xfe", 4, 0, NULL, &u, NULL, 0) == PD_OK);
    pb_api_limits_t lim = pb_api_limits_default();
    char err[256];
    t_expect("invalid UTF-8 text", pb_validate_generate_request(u, &lim, err, sizeof err), PD_EINVAL, err,
             "text = \"\\xff\\xfe\" is not valid UTF-8");
    pb_free_generate_request(&u, NULL);
}

/* ---- validators ---- */

static void test_validate_generate_request(void) {
    pb_api_limits_t lim = pb_api_limits_default();
    lim.vocab_size = 49152, lim.max_tokens = 1000, lim.max_timeout_ms = 60000, lim.max_prompt_bytes = 64;
    lim.max_prompt_tokens = 8, lim.max_chat_messages = 4;
    char err[256];
    for (int pc = 3; pc <= 5; pc++) {
        t_req_t t;
        t_req_init(&t, (Pdserve__V1__GenerateRequest__PromptCase)pc);
        t_expect("valid", pb_validate_generate_request(&t.req, &lim, err, sizeof err), PD_OK, err, NULL);
        t.req.sampling = NULL; /* all defaults */
        t_expect("no sampling", pb_validate_generate_request(&t.req, &lim, err, sizeof err), PD_OK, err, NULL);
    }

#define T_BAD(pc, mutation, substr)                                                                               \
    do {                                                                                                          \
        t_req_t t;                                                                                                \
        t_req_init(&t, PDSERVE__V1__GENERATE_REQUEST__PROMPT_##pc);                                               \
        mutation;                                                                                                 \
        err[0] = 0;                                                                                               \
        t_expect(#mutation, pb_validate_generate_request(&t.req, &lim, err, sizeof err), PD_EINVAL, err, substr); \
    } while (0)
#define T_OK(pc, mutation)                                                                                  \
    do {                                                                                                    \
        t_req_t t;                                                                                          \
        t_req_init(&t, PDSERVE__V1__GENERATE_REQUEST__PROMPT_##pc);                                         \
        mutation;                                                                                           \
        t_expect(#mutation, pb_validate_generate_request(&t.req, &lim, err, sizeof err), PD_OK, err, NULL); \
    } while (0)

    /* prompt */
    T_BAD(TEXT, t.req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT__NOT_SET,
          "prompt is not set, must be one of text, token_ids, chat");
    T_BAD(TEXT, t.req.prompt_case = 9, "prompt case = 9");
    T_BAD(TEXT, t.req.text = "", "text is empty");
    T_BAD(TEXT, t.req.text = NULL, "text is empty");
    T_BAD(TEXT, t.req.text = "0123456789012345678901234567890123456789012345678901234567890123456789",
          "text has 70 bytes, must be 1..64");
    T_BAD(TEXT, t.req.text = "caf\xc3", "text = \"caf\\xc3\" is not valid UTF-8");
    T_OK(TEXT, t.req.text = "a\x01\x7f\n\t");
    T_BAD(TOKEN_IDS, t.tok.n_ids = 0, "token_ids.ids is empty");
    T_BAD(TOKEN_IDS, t.req.token_ids = NULL, "token_ids.ids is empty");
    T_BAD(TOKEN_IDS, t.tok.n_ids = 9, "token_ids.ids has 9 ids, must be at most 8");
    T_BAD(TOKEN_IDS, t.ids[1] = -1, "token_ids.ids[1] = -1, must be in [0, 49152)");
    T_BAD(TOKEN_IDS, t.ids[3] = 49152, "token_ids.ids[3] = 49152, must be in [0, 49152)");
    T_OK(TOKEN_IDS, t.ids[3] = 49151);
    T_BAD(CHAT, t.chat.n_messages = 0, "chat.messages is empty");
    T_BAD(CHAT, t.req.chat = NULL, "chat.messages is empty");
    T_BAD(CHAT, t.chat.n_messages = 5, "chat.messages has 5 messages, must be at most 4");
    T_BAD(CHAT, t.msg[1].role = "tool",
          "chat.messages[1].role = \"tool\", must be \"system\", \"user\" or \"assistant\"");
    T_BAD(CHAT, t.msg[1].role = "User", "chat.messages[1].role = \"User\"");
    T_BAD(CHAT, t.msg[0].role = "", "chat.messages[0].role = \"\"");
    T_BAD(CHAT, t.msg[0].role = "sys\ntem", "chat.messages[0].role = \"sys\\x0atem\"");
    T_BAD(CHAT, t.pmsg[2] = NULL, "chat.messages[2].role");
    T_BAD(CHAT, t.msg[2].content = "", "chat.messages[2].content is empty");
    T_BAD(CHAT, t.msg[2].content = "\xed\xa0\x80", "chat.messages[2].content = \"\\xed\\xa0\\x80\" is not valid UTF-8");
    T_BAD(CHAT, t.msg[0].content = "0123456789012345678901234567890123456789012345678901234567",
          "chat.messages: contents total 71 bytes, must be at most 64");
    /* model */
    T_OK(TEXT, t.req.model = "");
    T_BAD(TEXT, t.req.model = "smol\n", "model = \"smol\\x0a\" has byte 0x0a at 4, must be free of control characters");
    T_BAD(TEXT,
          t.req.model = "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123"
                        "45678901234567890123456789012345678",
          "model has 129 bytes, must be 0..128");
    /* lengths, stops, timeout */
    T_BAD(TEXT, t.req.max_tokens = 1001, "max_tokens = 1001, must be at most 1000");
    T_OK(TEXT, t.req.max_tokens = 1000);
    T_OK(TEXT, t.req.max_tokens = 0);
    T_BAD(TEXT, t.req.timeout_ms = 60001, "timeout_ms = 60001, must be at most 60000");
    T_BAD(TEXT, t.req.n_stop = 9, "stop has 9 strings, must be at most 8");
    T_BAD(TEXT, t.stop[1] = "", "stop[1] is empty, must be 1..256 bytes");
    T_BAD(TEXT, t.stop[0] = "\xc0\x80", "stop[0] = \"\\xc0\\x80\" is not valid UTF-8");
    char long_stop[258];
    memset(long_stop, 'x', 257), long_stop[257] = 0;
    T_BAD(TEXT, t.stop[0] = long_stop, "stop[0] has 257 bytes, must be 1..256");
    long_stop[256] = 0;
    T_OK(TEXT, t.stop[0] = long_stop);
    /* sampling goes through pb_validate_sampling */
    T_BAD(TEXT, t.sp.top_p = 1.5f, "sampling.top_p = 1.5, must be 0 (unset) or in (0, 1]");

    /* limits left at their defaults do not check vocab, max_tokens or timeout */
    lim = pb_api_limits_default();
    T_OK(TOKEN_IDS, t.ids[0] = 1 << 30; t.req.max_tokens = UINT32_MAX; t.req.timeout_ms = UINT32_MAX);
    T_BAD(TOKEN_IDS, t.ids[0] = -5, "token_ids.ids[0] = -5, must be >= 0");
    t_expect("NULL", pb_validate_generate_request(NULL, &lim, err, sizeof err), PD_EINVAL, err, "NULL");
    /* err may be NULL */
    CHECK(pb_validate_generate_request(NULL, &lim, NULL, 0) == PD_EINVAL);
#undef T_BAD
#undef T_OK
}

static void test_validate_sampling(void) {
    char err[256];
    const float nan = NAN, inf = INFINITY;
    CHECK(pb_validate_sampling(NULL, err, sizeof err) == PD_OK);
    Pdserve__V1__SamplingParams sp0 = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    t_expect("all zero", pb_validate_sampling(&sp0, err, sizeof err), PD_OK, err, NULL);
    static const struct {
        int field; /* 0 temperature, 1 top_p, 2 min_p, 3 repetition, 4 presence, 5 frequency */
        float value;
        bool ok;
    } cases[] = {
        {0, 0.f, true},    {0, 100.f, true}, {0, -0.f, true},   {0, 100.01f, false}, {0, -1e-9f, false},
        {1, 1.f, true},    {1, 1e-9f, true}, {1, 0.f, true},    {1, -0.f, true},     {1, 1.0001f, false},
        {1, -0.5f, false}, {2, 0.f, true},   {2, 1.f, true},    {2, 1.01f, false},   {2, -0.01f, false},
        {3, 10.f, true},   {3, 0.f, true},   {3, 1e-6f, true},  {3, 10.5f, false},   {3, -1.f, false},
        {4, -2.f, true},   {4, 2.f, true},   {4, 2.01f, false}, {4, -2.01f, false},  {5, -2.f, true},
        {5, 2.f, true},    {5, 2.5f, false}, {5, -3.f, false},
    };
    static const char *names[6] = {"temperature",      "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty"};
    const size_t n_cases = sizeof cases / sizeof cases[0];
    for (size_t i = 0; i < n_cases + 18; i++) {
        Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
        int field;
        float v;
        bool ok;
        if (i < n_cases) {
            field = cases[i].field, v = cases[i].value, ok = cases[i].ok;
        } else { /* NaN, inf and -inf, for each field */
            size_t j = i - n_cases;
            field = (int)(j % 6), v = j / 6 == 0 ? nan : j / 6 == 1 ? inf : -inf, ok = false;
        }
        float *f[6] = {&sp.temperature,      &sp.top_p, &sp.min_p, &sp.repetition_penalty, &sp.presence_penalty,
                       &sp.frequency_penalty};
        *f[field] = v;
        char want[64];
        snprintf(want, sizeof want, "sampling.%s = ", names[field]);
        err[0] = 0;
        pd_status st = pb_validate_sampling(&sp, err, sizeof err);
        CHECK_MSG(ok ? st == PD_OK : (st == PD_EINVAL && strstr(err, want)), "%s = %g: %s '%s'", names[field],
                  (double)v, pd_strerror(st), err);
    }
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.top_k = -1;
    t_expect("top_k", pb_validate_sampling(&sp, err, sizeof err), PD_EINVAL, err, "sampling.top_k = -1, must be >= 0");
    sp.top_k = INT32_MAX;
    t_expect("top_k max", pb_validate_sampling(&sp, err, sizeof err), PD_OK, err, NULL);
    sp.logprobs = 21;
    t_expect("logprobs", pb_validate_sampling(&sp, err, sizeof err), PD_EINVAL, err,
             "sampling.logprobs = 21, must be in [0, 20]");
    sp.logprobs = -1;
    t_expect("logprobs<0", pb_validate_sampling(&sp, err, sizeof err), PD_EINVAL, err, "sampling.logprobs = -1");
    sp.logprobs = 20;
    t_expect("logprobs 20", pb_validate_sampling(&sp, err, sizeof err), PD_OK, err, NULL);
    sp.temperature = NAN;
    t_expect("nan message", pb_validate_sampling(&sp, err, sizeof err), PD_EINVAL, err,
             "sampling.temperature = nan, must be in [0, 100]");
}

static void test_validate_response_chunk(void) {
    char err[256];
#define T_CHUNK(mutation, want, substr)                                                                   \
    do {                                                                                                  \
        t_chunk_t t;                                                                                      \
        t_chunk_init(&t);                                                                                 \
        mutation;                                                                                         \
        err[0] = 0;                                                                                       \
        t_expect(#mutation, pb_validate_response_chunk(&t.c, 49152, err, sizeof err), want, err, substr); \
    } while (0)
    T_CHUNK((void)0, PD_OK, NULL);
    T_CHUNK(t.c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_STOP; t.c.error = NULL, PD_OK, NULL);
    T_CHUNK(t.c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_NONE; t.error.code = 0, PD_OK, NULL);
    T_CHUNK(t.ids[1] = 49152, PD_EPROTO, "token_ids[1] = 49152, must be in [0, 49152)");
    T_CHUNK(t.ids[0] = -1, PD_EPROTO, "token_ids[0] = -1");
    T_CHUNK(t.c.text = "\x80", PD_EPROTO, "text = \"\\x80\" is not valid UTF-8");
    T_CHUNK(t.lp[1].token = -3, PD_EPROTO, "logprobs[1].token = -3");
    T_CHUNK(t.lp[0].logprob = 0.5f, PD_EPROTO, "logprobs[0].logprob = 0.5, must be <= 0");
    T_CHUNK(t.lp[0].logprob = NAN, PD_EPROTO, "logprobs[0].logprob = nan");
    T_CHUNK(t.top[1].token = 50000, PD_EPROTO, "logprobs[0].top[1].token = 50000");
    T_CHUNK(t.top[0].logprob = INFINITY, PD_EPROTO, "logprobs[0].top[0].logprob = inf");
    T_CHUNK(t.lp[0].n_top = 21, PD_EPROTO, "logprobs[0].top has 21 entries, must be at most 20");
    T_CHUNK(t.plp[1] = NULL, PD_EPROTO, "logprobs[1] is NULL");
    T_CHUNK(t.c.finish_reason = 5, PD_EPROTO, "finish_reason = 5, must be a known FinishReason");
    T_CHUNK(t.c.error = NULL, PD_EPROTO, "error.code = (unset) with finish_reason = FINISH_ERROR");
    T_CHUNK(t.error.code = 0, PD_EPROTO, "error.code = ERR_NONE with finish_reason = FINISH_ERROR");
    T_CHUNK(t.c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_LENGTH, PD_EPROTO,
            "error.code = ERR_INTERNAL with finish_reason = FINISH_LENGTH");
    T_CHUNK(t.error.code = 77, PD_EPROTO, "error.code = 77, must be a known ErrorCode");
    T_CHUNK(t.error.message = "\xff", PD_EPROTO, "error.message = \"\\xff\" is not valid UTF-8");
#undef T_CHUNK
    t_chunk_t t;
    t_chunk_init(&t);
    t.ids[1] = 1 << 30;
    CHECK(pb_validate_response_chunk(&t.c, 0, err, sizeof err) == PD_OK); /* vocab not checked */
}

static void test_validate_kv_envelope(void) {
    pb_kv_limits_t lim = t_kv_limits();
    char err[256];
    for (int body = 1; body <= 9; body++) {
        t_kv_t t;
        t_kv_init(&t, (Pdserve__V1__KvEnvelope__BodyCase)body);
        char what[32];
        snprintf(what, sizeof what, "valid body %d", body);
        t_expect(what, pb_validate_kv_envelope(&t.env, &lim, err, sizeof err), PD_OK, err, NULL);
    }
#define T_KV(body, mutation, want, substr)                                                                         \
    do {                                                                                                           \
        t_kv_t t;                                                                                                  \
        t_kv_init(&t, PDSERVE__V1__KV_ENVELOPE__BODY_##body);                                                      \
        mutation;                                                                                                  \
        err[0] = 0;                                                                                                \
        t_expect(#body ": " #mutation, pb_validate_kv_envelope(&t.env, &lim, err, sizeof err), want, err, substr); \
    } while (0)
    /* the envelope */
    T_KV(_NOT_SET, (void)0, PD_EPROTO, "kv envelope: body is not set");
    T_KV(DATA, t.env.data = NULL, PD_EPROTO, "body case = 5 with no body");
    T_KV(DATA, t.env.body_case = 10, PD_EPROTO, "body case = 10");
    /* hello */
    T_KV(HELLO, t.hello.fingerprint = NULL, PD_EPROTO, "hello.fingerprint is not set");
    T_KV(HELLO, t.fp.block_size = 0, PD_EPROTO, "fingerprint.block_size = 0, must be >= 1");
    T_KV(HELLO, t.hello.sender_id = "", PD_EPROTO, "hello.sender_id is empty");
    T_KV(HELLO, t.hello.sender_id = "pre fill", PD_EPROTO,
         "hello.sender_id = \"pre fill\" has byte 0x20 at 3, must be printable ASCII without spaces");
    T_KV(HELLO, t.hello.shm_name = ""; t.hello.shm_bytes = 0, PD_OK, NULL);
    T_KV(HELLO, t.hello.shm_bytes = 0, PD_EPROTO, "hello.shm_bytes = 0, must be >= 1 with shm_name");
    T_KV(HELLO, t.hello.shm_name = "pdserve", PD_EPROTO, "hello.shm_name = \"pdserve\", must be \"/\" then a name");
    T_KV(HELLO, t.hello.shm_name = "/a/b", PD_EPROTO, "hello.shm_name = \"/a/b\"");
    T_KV(HELLO, t.hello.shm_name = "/", PD_EPROTO, "hello.shm_name has 1 bytes, must be 2..255");
    T_KV(HELLO, t.hello.shm_name = "/a b", PD_EPROTO, "hello.shm_name = \"/a b\" has byte 0x20");
    T_KV(HELLO, t.hello.device_handle.len = 0; t.hello.device_n_blocks = 0, PD_OK, NULL);
    T_KV(HELLO, t.hello.device_n_blocks = 0, PD_EPROTO, "hello.device_n_blocks = 0, must be >= 1 with device_handle");
    T_KV(HELLO, t.hello.device_handle.len = 257, PD_EPROTO, "hello.device_handle has 257 bytes, must be at most 256");
    /* hello reply */
    T_KV(HELLO_REPLY, t.hello_reply.error = NULL, PD_OK, NULL);
    T_KV(HELLO_REPLY, t.error.code = 0; t.hello_reply.max_message_bytes = 0, PD_EPROTO,
                                        "hello_reply.max_message_bytes = 0, must be >= 1 when accepted");
    T_KV(HELLO_REPLY, t.hello_reply.max_message_bytes = 0, PD_OK, NULL); /* refused: no cap needed */
    T_KV(HELLO_REPLY, t.error.code = 10, PD_EPROTO, "hello_reply.error.code = 10, must be a known ErrorCode (0..9)");
    T_KV(HELLO_REPLY, t.fp.kv_dtype = 0, PD_EPROTO, "fingerprint.kv_dtype = 0");
    T_KV(HELLO_REPLY, t.hello_reply.fingerprint = NULL, PD_OK, NULL);
    /* reserve */
    T_KV(RESERVE, t.reserve.n_tokens = 0, PD_EPROTO, "reserve.n_tokens = 0, must be in [1, 1048576]");
    T_KV(RESERVE, t.reserve.n_tokens = 1048577, PD_EPROTO, "reserve.n_tokens = 1048577");
    T_KV(RESERVE, t.reserve.n_blocks = 4, PD_EPROTO,
         "reserve.n_blocks = 4, must be 3 (ceil(n_tokens 33 / block_size 16))");
    T_KV(RESERVE, t.reserve.n_tokens = 32, PD_EPROTO, "reserve.n_blocks = 3, must be 2");
    T_KV(RESERVE, t.reserve.n_tokens = 48, PD_OK, NULL);
    T_KV(RESERVE, t.reserve.n_device_blocks = 0, PD_OK, NULL);
    T_KV(RESERVE, t.reserve.n_device_blocks = 2, PD_EPROTO,
         "reserve.device_blocks has 2 entries, must be 0 or n_blocks 3");
    T_KV(RESERVE, t.reserve.n_tokens = 1; t.reserve.n_blocks = 1; t.reserve.n_device_blocks = 0, PD_OK, NULL);
    T_KV(RESERVE, t.reserve.n_tokens = 1048576; t.reserve.n_blocks = 65536; t.reserve.n_device_blocks = 0, PD_OK, NULL);
    T_KV(RESERVE, t.reserve.n_tokens = UINT32_MAX; t.reserve.n_blocks = 268435456, PD_EPROTO, "reserve.n_tokens");
    /* reserve reply */
    T_KV(RESERVE_REPLY, t.reserve_reply.error = NULL;
         t.reserve_reply.credit_bytes = 0, PD_EPROTO, "reserve_reply.credit_bytes = 0, must be >= 1 when accepted");
    T_KV(RESERVE_REPLY, t.reserve_reply.credit_bytes = 0, PD_OK, NULL);
    T_KV(RESERVE_REPLY, t.error.code = -1, PD_EPROTO, "reserve_reply.error.code = -1");
    /* data */
    T_KV(DATA, t.data.n_layers = 0, PD_EPROTO, "data.n_layers = 0, must be >= 1");
    T_KV(DATA, t.data.n_blocks = 0, PD_EPROTO, "data.n_blocks = 0, must be >= 1");
    T_KV(DATA, t.data.first_layer = 28, PD_EPROTO, "data: first_layer 28 + n_layers 3 = 31, must be <= 30");
    T_KV(DATA, t.data.first_layer = UINT32_MAX, PD_EPROTO, "first_layer 4294967295 + n_layers 3 = 4294967298");
    T_KV(DATA, t.data.first_block = 65535, PD_EPROTO, "data: first_block 65535 + n_blocks 2 = 65537, must be <= 65536");
    T_KV(DATA, t.data.first_block = UINT32_MAX, PD_EPROTO, "data: first_block 4294967295");
    T_KV(DATA, t.data.dtype = 0, PD_EPROTO, "data.dtype = 0, must be KV_DTYPE_F32 (1), F16 (2) or BF16 (3)");
    T_KV(DATA, t.data.dtype = 4, PD_EPROTO, "data.dtype = 4");
    T_KV(DATA, t.data.block_size = 32, PD_EPROTO, "data.block_size = 32, must be 16 (the handshake's)");
    T_KV(DATA, t.data.block_size = 0, PD_EPROTO, "data.block_size = 0, must be 16");
    T_KV(DATA, t.data.n_kv_heads = 0, PD_EPROTO, "data.n_kv_heads = 0, must be >= 1");
    T_KV(DATA, t.data.n_kv_heads = 4, PD_EPROTO, "data.n_kv_heads = 4, must be 3 (the handshake's)");
    T_KV(DATA, t.data.head_dim = 0, PD_EPROTO, "data.head_dim = 0, must be >= 1");
    T_KV(DATA, t.data.head_dim = 128, PD_EPROTO, "data.head_dim = 128, must be 64");
    T_KV(DATA, t.data.n_checksums = 11, PD_EPROTO,
         "data.checksums has 11 entries, must be 12 (2 x n_layers 3 x runs 2)");
    T_KV(DATA, t.data.n_frame_blocks = 0; t.data.n_checksums = 11;
         t.data.n_shm_offsets = 0, PD_EPROTO,
         "data.checksums has 11 entries, must be 12 (2 x n_layers 3 x n_blocks 2)");
    T_KV(DATA, t.data.n_checksums = 0, PD_EPROTO, "data.checksums has 0 entries, must be 12");
    T_KV(DATA, t.data.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32; t.data.n_shm_offsets = 0, PD_OK, NULL);
    T_KV(DATA, t.data.first_layer = 0; t.data.n_layers = 30; t.data.n_checksums = 0; t.data.n_shm_offsets = 0;
         lim.require_checksums = false, PD_OK, NULL);
    lim = t_kv_limits();
    T_KV(DATA, t.data.n_checksums = 5;
         lim.require_checksums = false, PD_EPROTO, "must be 12 (2 x n_layers 3 x runs 2) or 0");
    lim = t_kv_limits();
    /* frame runs: sum to n_blocks, checksums and offsets one per frame */
    T_KV(DATA, t.data.n_frame_blocks = 0; t.data.n_shm_offsets = 0, PD_OK, NULL);
    T_KV(DATA, t.runs[0] = 2; t.data.n_frame_blocks = 1; t.data.n_checksums = 6; t.data.n_shm_offsets = 6, PD_OK, NULL);
    T_KV(DATA, t.runs[0] = 2; t.data.n_frame_blocks = 1;
         t.data.n_shm_offsets = 6, PD_EPROTO, "data.checksums has 12 entries, must be 6 (2 x n_layers 3 x runs 1)");
    T_KV(DATA, t.runs[1] = 0, PD_EPROTO, "data.frame_blocks[1] = 0, must be in [1, n_blocks 2]");
    T_KV(DATA, t.runs[1] = UINT32_MAX, PD_EPROTO, "data.frame_blocks[1] = 4294967295, must be in [1, n_blocks 2]");
    T_KV(DATA, t.runs[1] = 2, PD_EPROTO, "data.frame_blocks sum to 3, must be n_blocks 2");
    T_KV(DATA, t.data.n_frame_blocks = 1, PD_EPROTO, "data.frame_blocks sum to 1, must be n_blocks 2");
    T_KV(DATA, lim.frame_runs = false, PD_EPROTO, "data.frame_blocks has 2 runs, but frame_runs was not offered");
    lim = t_kv_limits();
    T_KV(DATA, t.runs[0] = 2; t.data.n_frame_blocks = 1; t.data.n_checksums = 6; t.data.n_shm_offsets = 6;
         lim.max_frame_bytes = 6144 * 2 - 1, PD_EPROTO,
         "data.frame_blocks[0] = 2: frame of 2 x 6144 bytes is over 12287 bytes");
    lim = t_kv_limits();
    T_KV(DATA, t.data.n_shm_offsets = 11, PD_EPROTO, "data.shm_offsets has 11 entries, must be 12 (one per frame)");
    T_KV(DATA, lim.shm_bytes = 0, PD_EPROTO, "data.shm_offsets has 12 entries, but no shared pool is mapped");
    lim = t_kv_limits();
    T_KV(DATA, t.offsets[11] = 12 * 6144 + 1, PD_EPROTO,
         "data.shm_offsets[11] = 73729: frame of 6144 bytes ends past the shared pool of 79872 bytes");
    T_KV(DATA, t.offsets[5] = UINT64_MAX, PD_EPROTO, "data.shm_offsets[5] = 18446744073709551615");
    T_KV(DATA, t.offsets[0] = 0; t.offsets[11] = 12 * 6144, PD_OK, NULL);
    /* with runs, frame i belongs to run (i / 2) % runs: a 2-block run at the pool's end must fit whole */
    T_KV(DATA, t.runs[0] = 2; t.data.n_frame_blocks = 1; t.data.n_checksums = 6; t.data.n_shm_offsets = 6;
         t.offsets[5] = 11 * 6144 + 1, PD_EPROTO, "data.shm_offsets[5] = 67585: frame of 12288 bytes ends past");
    T_KV(DATA, t.runs[0] = 2; t.data.n_frame_blocks = 1; t.data.n_checksums = 6; t.data.n_shm_offsets = 6;
         t.offsets[5] = 11 * 6144, PD_OK, NULL);
    /* frame size: huge dims overflow nothing and are refused */
    lim = t_kv_limits();
    lim.n_kv_heads = 0, lim.head_dim = 0, lim.block_size = UINT32_MAX;
    T_KV(DATA, t.data.block_size = UINT32_MAX; t.data.n_kv_heads = UINT32_MAX;
         t.data.head_dim = UINT32_MAX, PD_EPROTO,
         "data: frame of block_size 4294967295 x n_kv_heads 4294967295 x head_dim 4294967295 x 2 bytes is over "
         "67108864 bytes");
    lim.block_size = 16, lim.max_frame_bytes = 16 * 8 * 128 * 4;
    T_KV(DATA, t.data.n_shm_offsets = 0; t.data.n_kv_heads = 8; t.data.head_dim = 128;
         t.data.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32, PD_OK, NULL);
    T_KV(DATA, t.data.n_kv_heads = 8; t.data.head_dim = 129;
         t.data.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32, PD_EPROTO, "is over 65536 bytes");
    T_KV(DATA, t.data.n_shm_offsets = 0; t.data.n_kv_heads = 16; t.data.head_dim = 128;
         t.data.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16, PD_OK, NULL);
    lim = t_kv_limits();
    /* commit, done, cancel */
    T_KV(COMMIT, t.commit.n_frames = 0, PD_EPROTO, "commit.n_frames = 0, must be >= 1");
    T_KV(COMMIT, t.commit.first_token = -1, PD_EPROTO, "commit.first_token = -1, must be in [0, 49152)");
    T_KV(COMMIT, t.commit.first_token = 49152, PD_EPROTO, "commit.first_token = 49152");
    T_KV(COMMIT, t.commit.first_token = 0, PD_OK, NULL);
    T_KV(DONE, t.done.error = NULL, PD_OK, NULL);
    T_KV(DONE, t.error.code = 99, PD_EPROTO, "done.error.code = 99");
    T_KV(CANCEL, t.error.message = "\xc3\x28", PD_EPROTO, "cancel.reason.message = \"\\xc3(\" is not valid UTF-8");
    T_KV(CREDIT, t.credit.bytes = 0, PD_OK, NULL);
    /* bad limits are the caller's bug */
    lim.block_size = 0;
    T_KV(CREDIT, (void)0, PD_EINVAL, "kv limits: n_layers = 30, block_size = 0, both must be set");
    lim = t_kv_limits();
#undef T_KV
    CHECK(pb_kv_dtype_bytes(PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32) == 4 && pb_kv_dtype_bytes(0) == 0);
    CHECK(pb_kv_dtype_bytes(PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16) == 2 && pb_kv_dtype_bytes(7) == 0);
    t_kv_t t;
    t_kv_init(&t, PDSERVE__V1__KV_ENVELOPE__BODY_DATA);
    CHECK_EQ_INT(pb_kv_data_frame_bytes(&t.data), 16 * 3 * 64 * 2);
    CHECK_EQ_INT(pb_kv_data_n_frames(&t.data), 12);
    t.data.n_frame_blocks = 1, t.runs[0] = 2;
    CHECK_EQ_INT(pb_kv_data_n_frames(&t.data), 6);
    CHECK(pb_validate_kv_envelope(NULL, &lim, err, sizeof err) == PD_EINVAL);
}

static void test_validate_control(void) {
    char err[256];
#define T_CTL(fn, obj, mutation, want, substr)                                        \
    do {                                                                              \
        t_ctl_t t;                                                                    \
        t_ctl_init(&t);                                                               \
        mutation;                                                                     \
        err[0] = 0;                                                                   \
        t_expect(#fn ": " #mutation, fn(&t.obj, err, sizeof err), want, err, substr); \
    } while (0)
    T_CTL(pb_validate_worker_register, wr, (void)0, PD_OK, NULL);
    T_CTL(pb_validate_worker_register, wr, t.wr.worker_id = "", PD_EPROTO, "worker_id is empty, must be 1..128 bytes");
    T_CTL(pb_validate_worker_register, wr, t.wr.worker_id = "d\x7f", PD_EPROTO,
          "worker_id = \"d\\x7f\" has byte 0x7f at 1");
    T_CTL(pb_validate_worker_register, wr, t.wr.role = 0, PD_EPROTO,
          "role = 0, must be ROLE_PREFILL (1), ROLE_DECODE (2) or ROLE_BOTH (3)");
    T_CTL(pb_validate_worker_register, wr, t.wr.role = 4, PD_EPROTO, "role = 4");
    T_CTL(pb_validate_worker_register, wr, t.wr.control_endpoint = "", PD_EPROTO, "control_endpoint is empty");
    T_CTL(pb_validate_worker_register, wr, t.wr.kv_endpoint = "", PD_EPROTO, "kv_endpoint is empty");
    T_CTL(pb_validate_worker_register, wr, t.wr.kv_endpoint = "";
          t.wr.role = PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL, PD_OK, NULL);
    T_CTL(pb_validate_worker_register, wr, t.wr.kv_endpoint = "tcp://a b", PD_EPROTO, "kv_endpoint = \"tcp://a b\"");
    T_CTL(pb_validate_worker_register, wr, t.wr.fingerprint = NULL, PD_EPROTO, "fingerprint is not set");
    T_CTL(pb_validate_worker_register, wr, t.wr.backend = NULL, PD_EPROTO, "backend is empty");
    T_CTL(pb_validate_worker_register, wr, t.fp.protocol_version = 0, PD_EPROTO,
          "fingerprint.protocol_version = 0, must be >= 1");
    T_CTL(pb_validate_worker_register, wr, t.fp.model_id = "", PD_EPROTO, "fingerprint.model_id is empty");
    T_CTL(pb_validate_worker_register, wr, t.fp.kv_dtype = 9, PD_EPROTO, "fingerprint.kv_dtype = 9");
    T_CTL(pb_validate_worker_register, wr, t.fp.n_layers = 0, PD_EPROTO, "fingerprint.n_layers = 0");
    T_CTL(pb_validate_worker_register, wr, t.fp.n_kv_heads = 0, PD_EPROTO, "fingerprint.n_kv_heads = 0");
    T_CTL(pb_validate_worker_register, wr, t.fp.head_dim = 0, PD_EPROTO, "fingerprint.head_dim = 0");
    T_CTL(pb_validate_worker_register, wr, t.fp.rope_theta = 0.f, PD_EPROTO,
          "fingerprint.rope_theta = 0, must be finite and > 0");
    T_CTL(pb_validate_worker_register, wr, t.fp.rope_theta = INFINITY, PD_EPROTO, "fingerprint.rope_theta = inf");
    T_CTL(pb_validate_worker_register, wr, t.fp.rope_theta = NAN, PD_EPROTO, "fingerprint.rope_theta = nan");
    T_CTL(pb_validate_worker_register, wr, t.fp.rope_dim = 65, PD_EPROTO,
          "fingerprint.rope_dim = 65, must be in [1, head_dim 64]");
    T_CTL(pb_validate_worker_register, wr, t.fp.rope_dim = 0, PD_EPROTO, "fingerprint.rope_dim = 0");
    T_CTL(pb_validate_heartbeat, hb, (void)0, PD_OK, NULL);
    T_CTL(pb_validate_heartbeat, hb, t.hb.free_kv_blocks = 11, PD_EPROTO,
          "free_kv_blocks = 11, must be <= total_kv_blocks 10");
    T_CTL(pb_validate_heartbeat, hb, t.hb.role = 0, PD_EPROTO, "role = 0");
    T_CTL(pb_validate_heartbeat, hb, t.hb.worker_id = NULL, PD_EPROTO, "worker_id is empty");
    char long_id[130];
    memset(long_id, 'w', 129), long_id[129] = 0;
    T_CTL(pb_validate_heartbeat, hb, t.hb.worker_id = long_id, PD_EPROTO, "worker_id has 129 bytes, must be 1..128");
    long_id[128] = 0;
    T_CTL(pb_validate_heartbeat, hb, t.hb.worker_id = long_id, PD_OK, NULL);
    T_CTL(pb_validate_cancel, cancel, (void)0, PD_OK, NULL);
    T_CTL(pb_validate_cancel, cancel, t.cancel.reason = 10, PD_EPROTO, "reason = 10, must be a known ErrorCode");
#undef T_CTL
    CHECK(pb_validate_heartbeat(NULL, err, sizeof err) == PD_EINVAL);
    CHECK(pb_validate_worker_register(NULL, err, sizeof err) == PD_EINVAL);
    CHECK(pb_validate_cancel(NULL, err, sizeof err) == PD_EINVAL);
    CHECK(pb_validate_fingerprint(NULL, err, sizeof err) == PD_EPROTO);
}

static void test_fingerprint_diff(void) {
    Pdserve__V1__Fingerprint a, b;
    t_fp_init(&a);
    t_fp_init(&b);
    char err[256] = "";
    t_expect("same", pb_fingerprint_diff(&a, &b, err, sizeof err), PD_OK, err, NULL);
    b.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    b.model_id = strdup("SmolLM2-135M"); /* another pointer, same text */
    t_expect("dtype differs", pb_fingerprint_diff(&a, &b, err, sizeof err), PD_OK, err, NULL);
    free(b.model_id);
#define T_DIFF(mutation, substr)                                                                   \
    do {                                                                                           \
        t_fp_init(&b);                                                                             \
        mutation;                                                                                  \
        t_expect(#mutation, pb_fingerprint_diff(&a, &b, err, sizeof err), PD_EPROTO, err, substr); \
    } while (0)
    T_DIFF(b.protocol_version = 2, "protocol_version: 1 vs 2");
    T_DIFF(b.model_id = "SmolLM2-360M", "model_id: \"SmolLM2-135M\" vs \"SmolLM2-360M\"");
    T_DIFF(b.model_id = NULL, "model_id: \"SmolLM2-135M\" vs \"\"");
    T_DIFF(b.weights_hash ^= 1, "weights_hash: 0123456789abcdef vs 0123456789abcdee");
    T_DIFF(b.tokenizer_hash = 0, "tokenizer_hash: fedcba9876543210 vs 0000000000000000");
    T_DIFF(b.block_size = 32, "block_size: 16 vs 32");
    T_DIFF(b.n_layers = 32, "n_layers: 30 vs 32");
    T_DIFF(b.n_kv_heads = 8, "n_kv_heads: 3 vs 8");
    T_DIFF(b.head_dim = 128, "head_dim: 64 vs 128");
    T_DIFF(b.rope_theta = 500000.f, "rope_theta: 100000 vs 500000");
    T_DIFF(b.rope_theta = nextafterf(100000.f, 1e9f), "rope_theta: 100000 vs 100000.008");
    T_DIFF(b.rope_dim = 32, "rope_dim: 64 vs 32");
    /* the first differing field in field-number order is named */
    T_DIFF(b.rope_dim = 32; b.block_size = 8; b.model_id = "x", "model_id:");
#undef T_DIFF
    t_expect("missing", pb_fingerprint_diff(&a, NULL, err, sizeof err), PD_EPROTO, err, "fingerprint: set vs missing");
}

static void test_error_codes(void) {
    static const struct {
        pd_status st;
        Pdserve__V1__ErrorCode code;
        pd_status back;
    } map[] = {
        {PD_OK, PDSERVE__V1__ERROR_CODE__ERR_NONE, PD_OK},
        {PD_EINVAL, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, PD_EINVAL},
        {PD_EAGAIN, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, PD_EAGAIN},
        {PD_ETIMEDOUT, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, PD_ETIMEDOUT},
        {PD_ECLOSED, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, PD_ECLOSED},
        {PD_EPROTO, PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL, PD_EPROTO},
        {PD_ENOMEM, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, PD_EBACKEND},
        {PD_EIO, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, PD_EBACKEND},
        {PD_EBACKEND, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, PD_EBACKEND},
        {PD_ERANGE, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, PD_EBACKEND},
        {-1000, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, PD_EBACKEND},
    };
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        CHECK_EQ_INT(pb_error_code(map[i].st), map[i].code);
        CHECK_EQ_INT(pb_error_status(pb_error_code(map[i].st)), map[i].back);
    }
    CHECK_EQ_INT(pb_error_status(PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND), PD_EINVAL);
    CHECK_EQ_INT(pb_error_status(PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE), PD_EIO);
    CHECK_EQ_INT(pb_error_status(PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE), PD_EPROTO);
    CHECK_EQ_INT(pb_error_status((Pdserve__V1__ErrorCode)42), PD_EPROTO);
    static const int http[10] = {200, 400, 404, 429, 504, 503, 499, 500, 502, 503};
    static const char *names[10] = {
        "ERR_NONE",        "ERR_INVALID_ARGUMENT", "ERR_NOT_FOUND", "ERR_RESOURCE_EXHAUSTED", "ERR_DEADLINE_EXCEEDED",
        "ERR_UNAVAILABLE", "ERR_CANCELLED",        "ERR_INTERNAL",  "ERR_PROTOCOL",           "ERR_INCOMPATIBLE"};
    for (int c = 0; c < 10; c++) {
        CHECK_EQ_INT(pb_error_http_status((Pdserve__V1__ErrorCode)c), http[c]);
        CHECK_MSG(!strcmp(pb_error_code_name((Pdserve__V1__ErrorCode)c), names[c]), "%d: %s", c,
                  pb_error_code_name((Pdserve__V1__ErrorCode)c));
    }
    CHECK_EQ_INT(pb_error_http_status((Pdserve__V1__ErrorCode)10), 500);
    CHECK(!strcmp(pb_error_code_name((Pdserve__V1__ErrorCode)10), "ERR_?"));
    CHECK(!strcmp(pb_enum_name(&pdserve__v1__worker_role__descriptor, 2), "ROLE_DECODE"));
    CHECK(!strcmp(pb_enum_name(&pdserve__v1__kv_dtype__descriptor, 3), "KV_DTYPE_BF16"));
    CHECK(!strcmp(pb_enum_name(&pdserve__v1__finish_reason__descriptor, -1), "?"));
    CHECK(!strcmp(pb_enum_name(NULL, 0), "?"));
}

static void test_utf8(void) {
    static const struct {
        const char *s;
        bool ok;
    } cases[] = {
        {"", true},
        {"plain ASCII \x01\x7f", true},
        {"\xc2\x80\xdf\xbf", true},                 /* U+0080, U+07FF */
        {"\xe0\xa0\x80\xef\xbf\xbf", true},         /* U+0800, U+FFFF */
        {"\xf0\x90\x80\x80\xf4\x8f\xbf\xbf", true}, /* U+10000, U+10FFFF */
        {"\xc0\x80", false},                        /* overlong NUL */
        {"\xc1\xbf", false},                        /* overlong */
        {"\xe0\x9f\xbf", false},                    /* overlong 3-byte */
        {"\xf0\x8f\xbf\xbf", false},                /* overlong 4-byte */
        {"\xed\xa0\x80", false},                    /* surrogate U+D800 */
        {"\xed\xbf\xbf", false},                    /* surrogate U+DFFF */
        {"\xf4\x90\x80\x80", false},                /* U+110000 */
        {"\xf8\x88\x80\x80\x80", false},            /* 5-byte form */
        {"\x80", false},                            /* lone continuation */
        {"\xe4\xb8", false},                        /* cut short */
        {"a\xe4\xb8z", false},                      /* bad continuation */
        {"\xff", false},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        CHECK_MSG(pb_utf8_valid((const uint8_t *)cases[i].s, strlen(cases[i].s)) == cases[i].ok, "case %zu", i);
    /* a long hostile value is quoted, escaped and cut in the reason */
    t_req_t t;
    t_req_init(&t, PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT);
    t.msg[0].role = "\x1b[31mred\x1b[0m and then a very long role name that goes on";
    pb_api_limits_t lim = pb_api_limits_default();
    char err[256];
    CHECK(pb_validate_generate_request(&t.req, &lim, err, sizeof err) == PD_EINVAL);
    CHECK_MSG(strstr(err, "chat.messages[0].role = \"\\x1b[31mred\\x1b[0m and then") && strstr(err, "...\", must be"),
              "%s", err);
    char small[24];
    CHECK(pb_validate_generate_request(&t.req, &lim, small, sizeof small) == PD_EINVAL);
    CHECK(strlen(small) == sizeof small - 1); /* truncated, terminated */
}

int main(void) {
    PD_TEST_RUN(test_roundtrip_generate_request);
    PD_TEST_RUN(test_roundtrip_response_chunk);
    PD_TEST_RUN(test_roundtrip_kv_envelope);
    PD_TEST_RUN(test_roundtrip_control);
    PD_TEST_RUN(test_unpack_caps);
    PD_TEST_RUN(test_unpack_truncated);
    PD_TEST_RUN(test_unpack_malformed);
    PD_TEST_RUN(test_unknown_fields);
    PD_TEST_RUN(test_allocator);
    PD_TEST_RUN(test_amplification);
    PD_TEST_RUN(test_pack);
    PD_TEST_RUN(test_protobuf_c_quirks);
    PD_TEST_RUN(test_validate_generate_request);
    PD_TEST_RUN(test_validate_sampling);
    PD_TEST_RUN(test_validate_response_chunk);
    PD_TEST_RUN(test_validate_kv_envelope);
    PD_TEST_RUN(test_validate_control);
    PD_TEST_RUN(test_fingerprint_diff);
    PD_TEST_RUN(test_error_codes);
    PD_TEST_RUN(test_utf8);
    return pd_test_finish();
}
