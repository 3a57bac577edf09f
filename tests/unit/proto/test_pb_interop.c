/* test_pb_interop.c: proves that protobuf-c speaks the same protobuf as the official implementation.
 * For every message in tests/golden/pb (written by Python's protobuf, make_pb_golden.py): unpack it with
 * pb_unpack, print every set field the way the script printed it (NAME.txt) and compare the text, repack it
 * and compare the bytes, and run its validator. A few messages are also built by hand here from the same
 * values and packed, which must give Python's bytes exactly. */
#define _POSIX_C_SOURCE 200809L /* strdup, getline */
#include "pb.h"
#include "pd_test.h"

#include <stdarg.h>
#include <stdint.h>

#define T_GOLDEN PD_SOURCE_DIR "/tests/golden/pb/"

/* ---- helpers ---- */

static uint8_t *t_read(const char *name, const char *ext, size_t *len) {
    char path[512];
    snprintf(path, sizeof path, T_GOLDEN "%s%s", name, ext);
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s\n", path);
        return NULL;
    }
    uint8_t *buf = NULL;
    size_t n = 0, cap = 0, got;
    do {
        if (n + 4096 > cap) buf = realloc(buf, cap = (cap + 4096) * 2);
        got = fread(buf + n, 1, cap - n - 1, f);
        n += got;
    } while (got);
    fclose(f);
    buf[n] = 0;
    *len = n;
    return buf;
}

typedef struct {
    char *p;
    size_t n, cap;
} t_buf;

static void t_printf(t_buf *b, const char *fmt, ...) PD_PRINTF(2, 3);
static void t_printf(t_buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int need = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (b->n + (size_t)need + 1 > b->cap) b->p = realloc(b->p, b->cap = (b->n + (size_t)need + 1) * 2);
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, b->cap - b->n, fmt, ap);
    va_end(ap);
    b->n += (size_t)need;
}

/* The script's literal: printable ASCII but '"' and '\' as themselves, everything else \xNN. */
static void t_quote(t_buf *b, const uint8_t *s, size_t n) {
    t_printf(b, "\"");
    for (size_t i = 0; i < n; i++) {
        if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '"' && s[i] != '\\')
            t_printf(b, "%c", s[i]);
        else
            t_printf(b, "\\x%02x", s[i]);
    }
    t_printf(b, "\"");
}

static size_t t_elem_size(ProtobufCType t) {
    switch (t) {
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
    case PROTOBUF_C_TYPE_DOUBLE: return 8;
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
    default: return 4;
    }
}

/* Prints " = VALUE" of the scalar at v; returns false (prints nothing) if it is the proto3 default. */
static bool t_scalar(t_buf *b, ProtobufCType t, const void *v, bool force) {
    char tmp[64];
    switch (t) {
    case PROTOBUF_C_TYPE_INT32:
    case PROTOBUF_C_TYPE_SINT32:
    case PROTOBUF_C_TYPE_SFIXED32:
    case PROTOBUF_C_TYPE_ENUM:
        if (!force && !*(const int32_t *)v) return false;
        snprintf(tmp, sizeof tmp, "%d", *(const int32_t *)v);
        break;
    case PROTOBUF_C_TYPE_UINT32:
    case PROTOBUF_C_TYPE_FIXED32:
        if (!force && !*(const uint32_t *)v) return false;
        snprintf(tmp, sizeof tmp, "%u", *(const uint32_t *)v);
        break;
    case PROTOBUF_C_TYPE_INT64:
    case PROTOBUF_C_TYPE_SINT64:
    case PROTOBUF_C_TYPE_SFIXED64:
        if (!force && !*(const int64_t *)v) return false;
        snprintf(tmp, sizeof tmp, "%lld", (long long)*(const int64_t *)v);
        break;
    case PROTOBUF_C_TYPE_UINT64:
    case PROTOBUF_C_TYPE_FIXED64:
        if (!force && !*(const uint64_t *)v) return false;
        snprintf(tmp, sizeof tmp, "%llu", (unsigned long long)*(const uint64_t *)v);
        break;
    case PROTOBUF_C_TYPE_BOOL:
        if (!force && !*(const protobuf_c_boolean *)v) return false;
        snprintf(tmp, sizeof tmp, "%d", *(const protobuf_c_boolean *)v ? 1 : 0);
        break;
    case PROTOBUF_C_TYPE_FLOAT: {
        float f = *(const float *)v;
        if (!force && f == 0.f) return false;
        uint32_t bits;
        memcpy(&bits, &f, 4);
        snprintf(tmp, sizeof tmp, "%.9g (0x%08x)", (double)f, bits);
        break;
    }
    case PROTOBUF_C_TYPE_DOUBLE: {
        double d = *(const double *)v;
        if (!force && d == 0.0) return false;
        uint64_t bits;
        memcpy(&bits, &d, 8);
        snprintf(tmp, sizeof tmp, "%.17g (0x%016llx)", d, (unsigned long long)bits);
        break;
    }
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)v;
        if (!force && (!s || !*s)) return false;
        t_printf(b, " = ");
        t_quote(b, (const uint8_t *)s, s ? strlen(s) : 0);
        return true;
    }
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *bd = v;
        if (!force && !bd->len) return false;
        t_printf(b, " = ");
        t_quote(b, bd->data, bd->len);
        return true;
    }
    default: return false;
    }
    t_printf(b, " = %s", tmp);
    return true;
}

/* Every set field of m, in field-number order, as make_pb_golden.py's dump() prints it. */
static void t_dump(t_buf *b, const ProtobufCMessage *m, const char *prefix) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    const char *base = (const char *)m;
    for (unsigned i = 0; i < d->n_fields; i++) {
        const ProtobufCFieldDescriptor *fd = &d->fields[i];
        char path[256];
        snprintf(path, sizeof path, "%s%s", prefix, fd->name);
        if (fd->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)(base + fd->quantifier_offset);
            const char *items = *(char *const *)(base + fd->offset);
            for (size_t k = 0; k < n; k++) {
                const void *v = items + k * t_elem_size(fd->type);
                if (fd->type == PROTOBUF_C_TYPE_MESSAGE) {
                    char sub[300];
                    snprintf(sub, sizeof sub, "%s[%zu].", path, k);
                    t_printf(b, "%s[%zu] {}\n", path, k);
                    t_dump(b, *(ProtobufCMessage *const *)v, sub);
                } else {
                    t_printf(b, "%s[%zu]", path, k);
                    t_scalar(b, fd->type, v, true);
                    t_printf(b, "\n");
                }
            }
            continue;
        }
        bool is_oneof = fd->flags & PROTOBUF_C_FIELD_FLAG_ONEOF;
        if (is_oneof && *(const uint32_t *)(base + fd->quantifier_offset) != fd->id) continue;
        const void *v = base + fd->offset;
        if (fd->type == PROTOBUF_C_TYPE_MESSAGE) {
            const ProtobufCMessage *sub = *(ProtobufCMessage *const *)v;
            if (!sub) continue;
            char sp[300];
            snprintf(sp, sizeof sp, "%s.", path);
            t_printf(b, "%s {}\n", path);
            t_dump(b, sub, sp);
            continue;
        }
        size_t mark = b->n;
        t_printf(b, "%s", path);
        if (t_scalar(b, fd->type, v, is_oneof))
            t_printf(b, "\n");
        else
            b->n = mark, b->p[mark] = 0;
    }
}

static const ProtobufCMessageDescriptor *t_descriptor(const char *full_name) {
    static const ProtobufCMessageDescriptor *all[] = {
        &pdserve__v1__generate_request__descriptor, &pdserve__v1__response_chunk__descriptor,
        &pdserve__v1__kv_envelope__descriptor,      &pdserve__v1__worker_register__descriptor,
        &pdserve__v1__heartbeat__descriptor,        &pdserve__v1__cancel__descriptor,
        &pdserve__v1__sampling_params__descriptor,
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!strcmp(all[i]->name, full_name)) return all[i];
    return NULL;
}

static pb_kv_limits_t t_kv_limits(void) {
    pb_kv_limits_t lim = pb_kv_limits_default();
    lim.n_layers = 30, lim.block_size = 16, lim.n_kv_heads = 3, lim.head_dim = 64, lim.vocab_size = 49152;
    lim.shm_bytes = 1ull << 39; /* kv_data_runs reads up to the pool's last byte */
    return lim;
}

/* The validator that applies to m; PD_OK for types without one. */
static pd_status t_validate(const ProtobufCMessage *m, char *err, size_t cap) {
    const ProtobufCMessageDescriptor *d = m->descriptor;
    if (d == &pdserve__v1__generate_request__descriptor) {
        pb_api_limits_t lim = pb_api_limits_default();
        lim.vocab_size = 49152;
        return pb_validate_generate_request((const Pdserve__V1__GenerateRequest *)m, &lim, err, cap);
    }
    if (d == &pdserve__v1__response_chunk__descriptor)
        return pb_validate_response_chunk((const Pdserve__V1__ResponseChunk *)m, 49152, err, cap);
    if (d == &pdserve__v1__kv_envelope__descriptor) {
        pb_kv_limits_t lim = t_kv_limits();
        return pb_validate_kv_envelope((const Pdserve__V1__KvEnvelope *)m, &lim, err, cap);
    }
    if (d == &pdserve__v1__worker_register__descriptor)
        return pb_validate_worker_register((const Pdserve__V1__WorkerRegister *)m, err, cap);
    if (d == &pdserve__v1__heartbeat__descriptor)
        return pb_validate_heartbeat((const Pdserve__V1__Heartbeat *)m, err, cap);
    if (d == &pdserve__v1__cancel__descriptor) return pb_validate_cancel((const Pdserve__V1__Cancel *)m, err, cap);
    return PD_OK;
}

/* Reports the first line where the two dumps differ. */
static void t_compare_text(const char *name, const char *want, const char *got) {
    if (!strcmp(want, got)) return;
    int line = 1;
    size_t i = 0, start = 0;
    for (; want[i] && want[i] == got[i]; i++)
        if (want[i] == '\n') line++, start = i + 1;
    want += start, got += start;
    const char *we = strchr(want, '\n'), *ge = strchr(got, '\n');
    CHECK_MSG(0, "%s.txt line %d: python '%.*s' vs C '%.*s'", name, line, we ? (int)(we - want) : (int)strlen(want),
              want, ge ? (int)(ge - got) : (int)strlen(got), got);
}

/* ---- the golden cases ---- */

static int t_n_cases;

static void t_one_case(const char *name, const char *type, const char *flags) {
    const ProtobufCMessageDescriptor *desc = t_descriptor(type);
    CHECK_MSG(desc, "%s: unknown type %s", name, type);
    size_t len = 0, tlen = 0;
    uint8_t *bin = t_read(name, ".bin", &len);
    char *want = (char *)t_read(name, ".txt", &tlen);
    ProtobufCMessage *m = NULL;
    char err[256] = "";
    if (!desc || !bin || !want) goto done;
    pd_status st = pb_unpack(desc, bin, len, 1u << 20, NULL, &m, err, sizeof err);
    CHECK_MSG(st == PD_OK, "%s: %s", name, err);
    if (st) goto done;

    t_buf got = {0};
    t_dump(&got, m, "");
    t_compare_text(name, want, got.p ? got.p : "");
    free(got.p);

    uint8_t *out = malloc(len + 16);
    int64_t n = pb_pack(m, out, len + 16);
    if (!strcmp(flags, "pack-differs")) {
        /* the one documented difference: upb sends temperature = -0.0 (5 bytes up front), protobuf-c omits it */
        const Pdserve__V1__SamplingParams *sp = (const Pdserve__V1__SamplingParams *)m;
        CHECK(sp->temperature == 0.f && signbit(sp->temperature));
        CHECK(n == (int64_t)len - 5 && len > 5 && !memcmp(bin, "\x0d\x00\x00\x00\x80", 5) &&
              !memcmp(out, bin + 5, (size_t)n));
    } else {
        CHECK_MSG(n == (int64_t)len && !memcmp(out, bin, len),
                  "%s: protobuf-c packs %lld bytes, python %zu, or they differ", name, (long long)n, len);
    }
    free(out);

    st = t_validate(m, err, sizeof err);
    CHECK_MSG(st == PD_OK, "%s: validator refuses the golden message: %s", name, err);
    t_n_cases++;
done:
    pb_free(&m, NULL);
    free(bin);
    free(want);
}

static void test_golden_all(void) {
    size_t len;
    char *index = (char *)t_read("index", ".txt", &len);
    REQUIRE(index);
    t_n_cases = 0;
    int n_lines = 0;
    for (char *save = NULL, *line = strtok_r(index, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (line[0] == '#' || !line[0]) continue;
        char name[64], type[96], flags[32];
        CHECK_MSG(sscanf(line, "%63s %95s %31s", name, type, flags) == 3, "index.txt: bad line '%s'", line);
        n_lines++;
        t_one_case(name, type, flags);
    }
    free(index);
    CHECK(n_lines >= 19);
    CHECK_EQ_INT(t_n_cases, n_lines);
    fprintf(stderr, "     %d golden messages checked\n", t_n_cases);
}

/* ---- messages built by hand from the script's values ---- */

static void t_compare_packed(const char *name, const ProtobufCMessage *m) {
    size_t len;
    uint8_t *bin = t_read(name, ".bin", &len);
    CHECK(bin);
    if (!bin) return;
    uint8_t buf[1024];
    int64_t n = pb_pack(m, buf, sizeof buf);
    CHECK_MSG(n == (int64_t)len && !memcmp(buf, bin, len), "%s: hand-built message packs to %lld bytes, python %zu",
              name, (long long)n, len);
    free(bin);
}

static void test_build_generate_chat(void) {
    Pdserve__V1__ChatMessage msgs[4];
    Pdserve__V1__ChatMessage *pm[4];
    const char *roles[4] = {"system", "user", "assistant", "user"};
    const char *contents[4] = {
        "You are a helpful assistant.",
        ("Gr\xc3\xbc\xc3\x9f" /* split: \x9f would swallow the "e" */
         "e! Translate \xc2\xabhello\xc2\xbb to \xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e "
         "\xf0\x9f\x99\x82\nThanks."),
        "\xe3\x81\x93\xe3\x82\x93\xe3\x81\xab\xe3\x81\xa1\xe3\x81\xaf",
        "And in \xce\x95\xce\xbb\xce\xbb\xce\xb7\xce\xbd\xce\xb9\xce\xba\xce\xac?\t\"quoted\" \\ backslash"};
    for (int i = 0; i < 4; i++) {
        pdserve__v1__chat_message__init(&msgs[i]);
        msgs[i].role = (char *)roles[i];
        msgs[i].content = (char *)contents[i];
        pm[i] = &msgs[i];
    }
    Pdserve__V1__ChatMessages chat = PDSERVE__V1__CHAT_MESSAGES__INIT;
    chat.n_messages = 4;
    chat.messages = pm;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = 0.7f, sp.top_k = 40, sp.top_p = 0.9f, sp.min_p = 0.05f, sp.repetition_penalty = 1.1f;
    sp.presence_penalty = -0.5f, sp.frequency_penalty = 0.25f, sp.seed = UINT64_MAX, sp.has_seed = 1;
    sp.logprobs = 5;
    char *stop[4] = {"\n\n", "</s>", "\xe3\x80\x82", "\xf0\x9f\x9b\x91"};
    Pdserve__V1__GenerateRequest r = PDSERVE__V1__GENERATE_REQUEST__INIT;
    r.request_id = 0xFEDCBA9876543210ull;
    r.model = "SmolLM2-135M-Instruct";
    r.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT;
    r.chat = &chat;
    r.sampling = &sp;
    r.max_tokens = 128, r.n_stop = 4, r.stop = stop, r.timeout_ms = 30000, r.stream = 1, r.ignore_eos = 1;
    t_compare_packed("generate_chat", &r.base);
}

static void test_build_response_chunk(void) {
    Pdserve__V1__TopLogprob top0[3], top1[1];
    Pdserve__V1__TopLogprob *ptop0[3] = {&top0[0], &top0[1], &top0[2]}, *ptop1[1] = {&top1[0]};
    for (int i = 0; i < 3; i++) pdserve__v1__top_logprob__init(&top0[i]);
    pdserve__v1__top_logprob__init(&top1[0]);
    top0[0].token = 9690, top0[0].logprob = -0.125f, top0[0].text = (ProtobufCBinaryData){5, (uint8_t *)"Hello"};
    top0[1].token = 28, top0[1].logprob = -2.5f, top0[1].text = (ProtobufCBinaryData){2, (uint8_t *)"\xe4\xb8"};
    top0[2].token = 0, top0[2].logprob = -INFINITY;
    top1[0].token = 28, top1[0].logprob = -3.0e-7f, top1[0].text = (ProtobufCBinaryData){1, (uint8_t *)","};
    Pdserve__V1__TokenLogprob lp[3];
    Pdserve__V1__TokenLogprob *plp[3] = {&lp[0], &lp[1], &lp[2]};
    for (int i = 0; i < 3; i++) pdserve__v1__token_logprob__init(&lp[i]);
    lp[0].token = 9690, lp[0].logprob = -0.125f, lp[0].n_top = 3, lp[0].top = ptop0;
    lp[1].token = 28, lp[1].logprob = -3.0e-7f, lp[1].n_top = 1, lp[1].top = ptop1;
    lp[2].token = 2, lp[2].logprob = -1.f;
    Pdserve__V1__Usage usage = PDSERVE__V1__USAGE__INIT;
    usage.prompt_tokens = 37, usage.completion_tokens = 3, usage.cached_prompt_tokens = 16;
    int32_t ids[3] = {9690, 28, 2};
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    c.request_id = 0xFEDCBA9876543210ull, c.n_token_ids = 3, c.token_ids = ids;
    c.text = "Hello, \xe4\xb8\x96\xe7\x95\x8c";
    c.n_logprobs = 3, c.logprobs = plp, c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_STOP;
    c.usage = &usage, c.seed = 12345;
    t_compare_packed("response_chunk", &c.base);
}

static void test_build_kv_data(void) {
    uint64_t sums[8] = {
        0, 1, UINT64_MAX, 1ull << 63, 0x0123456789ABCDEFull, 0xFEDCBA9876543210ull, 0xDEADBEEFull, 1ull << 32};
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = 42, d.epoch = 1, d.seq = 5, d.first_layer = 2, d.n_layers = 2, d.first_block = 1, d.n_blocks = 2;
    d.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16, d.block_size = 16, d.n_kv_heads = 3, d.head_dim = 64;
    d.n_checksums = 8, d.checksums = sums;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    t_compare_packed("kv_data", &env.base);
    CHECK_EQ_INT(pb_kv_data_frame_bytes(&d), 16 * 3 * 64 * 2);
}

static void test_build_kv_hello_reply(void) {
    /* an empty Error that is present (upb sends "error {}" as two bytes): protobuf-c does the same */
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__Fingerprint fp = PDSERVE__V1__FINGERPRINT__INIT;
    fp.protocol_version = PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT;
    fp.model_id = "SmolLM2-135M-Instruct", fp.weights_hash = 0x0123456789ABCDEFull;
    fp.tokenizer_hash = 0xFEDCBA9876543210ull, fp.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    fp.block_size = 16, fp.n_layers = 30, fp.n_kv_heads = 3, fp.head_dim = 64, fp.rope_theta = 100000.f;
    fp.rope_dim = 64;
    Pdserve__V1__KvHelloReply r = PDSERVE__V1__KV_HELLO_REPLY__INIT;
    r.error = &e, r.fingerprint = &fp, r.max_message_bytes = 64u << 20, r.frame_runs = 1, r.shm_mapped = 1;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY;
    env.hello_reply = &r;
    t_compare_packed("kv_hello_reply", &env.base);
}

static void test_build_heartbeat(void) {
    Pdserve__V1__Heartbeat hb = PDSERVE__V1__HEARTBEAT__INIT;
    hb.worker_id = "decode-1", hb.seq = (1ull << 40) + 1, hb.role = PDSERVE__V1__WORKER_ROLE__ROLE_DECODE;
    hb.queue_depth = 3, hb.running_seqs = 17, hb.free_kv_blocks = 1000, hb.total_kv_blocks = 4096;
    hb.kv_bytes_sent = 1, hb.kv_bytes_received = (1ull << 33) + 5;
    t_compare_packed("heartbeat", &hb.base);
}

int main(void) {
    PD_TEST_RUN(test_golden_all);
    PD_TEST_RUN(test_build_generate_chat);
    PD_TEST_RUN(test_build_response_chunk);
    PD_TEST_RUN(test_build_kv_data);
    PD_TEST_RUN(test_build_kv_hello_reply);
    PD_TEST_RUN(test_build_heartbeat);
    return pd_test_finish();
}
