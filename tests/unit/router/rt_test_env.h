/* rt_test_env.h: a real rt_core on a pd_loop, scripted DEALER "workers" and a front end that records chunks,
 * for tests/unit/router/test_rt_core*.c and test_rt_native*.c. Real ZeroMQ on loopback (port 0), real model file
 * for the tokenizer; the workers' fingerprint comes from engine/eng_model (what real workers send). */
#ifndef RT_TEST_ENV_H
#define RT_TEST_ENV_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <zmq.h>

#include "eng_model.h"
#include "eng_tok.h"
#include "pb.h"
#include "pd_loop.h"
#include "pd_test.h"
#include "rt_core.h"

typedef struct {
    pd_loop_t *loop;
    void *zmq;
    rt_core_t *core;
    Pdserve__V1__Fingerprint fp; /* a compatible worker's */
    char model_id[128];
} rt_env_t;

typedef struct {
    void *sock;
    char id[64];
    char kv[64];
} rt_worker_sim_t;

#define RT_MAX_CHUNKS 64
typedef struct {
    Pdserve__V1__ResponseChunk *chunks[RT_MAX_CHUNKS];
    int n;
    bool is_done;
    bool abandon_in_callback; /* calls rt_core_abandon from the first non-final chunk */
    rt_core_t *core;
    rt_req_t *req;
} rt_front_t;

/* The fingerprint a real worker of this model sends. */
static inline bool rt_env_fingerprint(rt_env_t *e) {
    char err[256];
    eng_model_t *m = eng_model_load(pd_test_model_path(), err, sizeof err);
    if (!m) {
        fprintf(stderr, "model: %s\n", err);
        return false;
    }
    eng_tok_t *tok = eng_tok_create(m->gguf, err, sizeof err);
    if (!tok) {
        eng_model_destroy(&m);
        return false;
    }
    Pdserve__V1__Fingerprint fp = PDSERVE__V1__FINGERPRINT__INIT;
    snprintf(e->model_id, sizeof e->model_id, "%s", m->cfg.name);
    fp.protocol_version = PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT;
    fp.model_id = e->model_id;
    fp.weights_hash = eng_model_identity_hash(m);
    fp.tokenizer_hash = eng_tok_hash(tok);
    fp.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    fp.block_size = 16;
    fp.n_layers = (uint32_t)m->cfg.n_layers;
    fp.n_kv_heads = (uint32_t)m->cfg.n_kv_heads;
    fp.head_dim = (uint32_t)m->cfg.head_dim;
    fp.rope_theta = m->cfg.rope_theta;
    fp.rope_dim = (uint32_t)m->cfg.rope_dim;
    e->fp = fp;
    eng_tok_destroy(&tok);
    eng_model_destroy(&m);
    return true;
}

static inline rt_core_params_t rt_env_params(void) {
    rt_core_params_t p = rt_core_params_default();
    p.model_path = pd_test_model_path();
    p.control_endpoint = "tcp://127.0.0.1:0";
    p.heartbeat_ivl_ms = 50;
    p.worker_timeout_ms = 5000;
    return p;
}

static inline bool rt_env_init(rt_env_t *e, const rt_core_params_t *p) {
    char err[256];
    memset(e, 0, sizeof *e);
    if (!rt_env_fingerprint(e)) return false;
    e->loop = pd_loop_create();
    e->zmq = zmq_ctx_new();
    e->core = rt_core_create(e->loop, e->zmq, p, err, sizeof err);
    if (!e->core) fprintf(stderr, "rt_core_create: %s\n", err);
    return e->core != NULL;
}

static inline void rt_env_fini(rt_env_t *e) {
    rt_core_destroy(&e->core);
    if (e->zmq) zmq_ctx_term(e->zmq);
    pd_loop_destroy(&e->loop);
}

/* Runs the loop for ms milliseconds. */
static inline void rt_env_pump(rt_env_t *e, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (pd_now_us() < end)
        if (pd_loop_run_once(e->loop, 2) != PD_OK) break;
}

/* ---- scripted workers ---- */

static inline void rt_worker_open(rt_env_t *e, rt_worker_sim_t *w, const char *id) {
    memset(w, 0, sizeof *w);
    snprintf(w->id, sizeof w->id, "%s", id);
    unsigned h = 0;
    for (const char *c = id; *c; c++) h = h * 31u + (unsigned char)*c;
    snprintf(w->kv, sizeof w->kv, "tcp://127.0.0.1:7%03u", h % 1000u); /* never bound: only compared */
    w->sock = zmq_socket(e->zmq, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(w->sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(w->sock, ZMQ_ROUTING_ID, id, strlen(id));
    zmq_connect(w->sock, rt_core_control_endpoint(e->core));
}

static inline void rt_worker_close(rt_worker_sim_t *w) {
    if (w->sock) zmq_close(w->sock);
    w->sock = NULL;
}

static inline void rt_worker_send(rt_worker_sim_t *w, const Pdserve__V1__WorkerToRouter *msg) {
    size_t n = pb_packed_size(&msg->base);
    uint8_t *buf = malloc(n ? n : 1);
    CHECK(pb_pack(&msg->base, buf, n) == (int64_t)n);
    CHECK(zmq_send(w->sock, buf, n, 0) == (int)n);
    free(buf);
}

/* The next RouterToWorker for w within timeout_ms (the loop runs meanwhile), or NULL. Free with pb_free. */
static inline Pdserve__V1__RouterToWorker *rt_worker_recv(rt_env_t *e, rt_worker_sim_t *w, int timeout_ms) {
    uint64_t end = pd_now_us() + (uint64_t)timeout_ms * 1000u;
    do {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, w->sock, ZMQ_DONTWAIT) >= 0) {
            ProtobufCMessage *out = NULL;
            pd_status st = pb_unpack(&pdserve__v1__router_to_worker__descriptor, zmq_msg_data(&m), zmq_msg_size(&m),
                                     1u << 24, NULL, &out, NULL, 0);
            zmq_msg_close(&m);
            CHECK(st == PD_OK);
            return (Pdserve__V1__RouterToWorker *)out;
        }
        zmq_msg_close(&m);
        if (pd_loop_run_once(e->loop, 1) != PD_OK) break;
    } while (pd_now_us() < end);
    return NULL;
}

/* The next message of the given body for w, skipping heartbeat acks (registered without error). */
static inline Pdserve__V1__RouterToWorker *
rt_worker_expect(rt_env_t *e, rt_worker_sim_t *w, Pdserve__V1__RouterToWorker__BodyCase body, int timeout_ms) {
    uint64_t end = pd_now_us() + (uint64_t)timeout_ms * 1000u;
    while (pd_now_us() < end) {
        Pdserve__V1__RouterToWorker *m = rt_worker_recv(e, w, (int)((end - pd_now_us()) / 1000u) + 1);
        if (!m) return NULL;
        if (m->body_case == body) return m;
        bool is_ack = m->body_case == PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED && !m->registered->error;
        if (!is_ack) fprintf(stderr, "worker %s: unexpected message body %d\n", w->id, (int)m->body_case);
        pb_free((ProtobufCMessage **)&m, NULL);
    }
    return NULL;
}

static inline void rt_worker_register_fp(rt_worker_sim_t *w, Pdserve__V1__WorkerRole role,
                                         const Pdserve__V1__Fingerprint *fp) {
    Pdserve__V1__Fingerprint f = *fp;
    Pdserve__V1__WorkerRegister reg = PDSERVE__V1__WORKER_REGISTER__INIT;
    reg.worker_id = w->id;
    reg.role = role;
    reg.control_endpoint = "tcp://127.0.0.1:1";
    reg.kv_endpoint = role == PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL ? "" : w->kv;
    reg.fingerprint = &f;
    reg.backend = "cpu";
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER;
    msg.register_ = &reg;
    rt_worker_send(w, &msg);
}

/* Registers with the compatible fingerprint and checks the reply. */
static inline bool rt_worker_register(rt_env_t *e, rt_worker_sim_t *w, Pdserve__V1__WorkerRole role) {
    rt_worker_register_fp(w, role, &e->fp);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(e, w, PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED, 2000);
    bool ok = m && !m->registered->error && m->registered->heartbeat_ivl_ms > 0;
    if (m && m->registered->error) fprintf(stderr, "refused: %s\n", m->registered->error->message);
    pb_free((ProtobufCMessage **)&m, NULL);
    return ok;
}

static inline void rt_worker_heartbeat(rt_worker_sim_t *w, Pdserve__V1__WorkerRole role, uint32_t free_blocks,
                                       uint32_t queue) {
    Pdserve__V1__Heartbeat hb = PDSERVE__V1__HEARTBEAT__INIT;
    hb.worker_id = w->id;
    hb.role = role;
    hb.queue_depth = queue;
    hb.free_kv_blocks = free_blocks;
    hb.total_kv_blocks = 1000;
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT;
    msg.heartbeat = &hb;
    rt_worker_send(w, &msg);
}

static inline void rt_worker_reserved(rt_worker_sim_t *w, uint64_t req_id, Pdserve__V1__ErrorCode code) {
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__DecodeReserved dr = PDSERVE__V1__DECODE_RESERVED__INIT;
    dr.request_id = req_id;
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        err.code = code;
        err.message = "no room";
        dr.error = &err;
    }
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_RESERVED;
    msg.reserved = &dr;
    rt_worker_send(w, &msg);
}

static inline void rt_worker_chunk(rt_worker_sim_t *w, uint64_t req_id, int32_t token, const char *text,
                                   Pdserve__V1__FinishReason finish) {
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    c.request_id = req_id;
    c.n_token_ids = 1;
    c.token_ids = &token;
    c.text = (char *)text;
    c.finish_reason = finish;
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK;
    msg.chunk = &c;
    rt_worker_send(w, &msg);
}

static inline void rt_worker_failed(rt_worker_sim_t *w, uint64_t req_id, Pdserve__V1__ErrorCode code,
                                    const char *text) {
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    err.code = code;
    err.message = (char *)text;
    Pdserve__V1__RequestFailed f = PDSERVE__V1__REQUEST_FAILED__INIT;
    f.request_id = req_id;
    f.error = &err;
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_FAILED;
    msg.failed = &f;
    rt_worker_send(w, &msg);
}

/* ---- a front end that records what it gets ---- */

static inline void rt_front_on_chunk(void *ud, const Pdserve__V1__ResponseChunk *c) {
    rt_front_t *f = ud;
    CHECK(!f->is_done);         /* nothing after the last chunk */
    if (f->n < RT_MAX_CHUNKS) { /* a deep copy: the chunk is borrowed */
        size_t n = pb_packed_size(&c->base);
        uint8_t *buf = malloc(n ? n : 1);
        CHECK(pb_pack(&c->base, buf, n) == (int64_t)n);
        CHECK(pb_unpack_response_chunk(buf, n, 0, NULL, &f->chunks[f->n], NULL, 0) == PD_OK);
        free(buf);
        f->n++;
    }
    if (c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE) f->is_done = true;
    if (f->abandon_in_callback && !f->is_done) rt_core_abandon(f->core, f->req);
}

static inline void rt_front_fini(rt_front_t *f) {
    for (int i = 0; i < f->n; i++) pb_free_response_chunk(&f->chunks[i], NULL);
    f->n = 0;
}

static inline const Pdserve__V1__ResponseChunk *rt_front_last(const rt_front_t *f) {
    return f->n ? f->chunks[f->n - 1] : NULL;
}

/* A text GenerateRequest, malloc'd as protobuf-c unpacks one (rt_core_submit frees it that way). */
static inline Pdserve__V1__GenerateRequest *rt_text_request(const char *text, uint32_t max_tokens,
                                                            uint32_t timeout_ms) {
    Pdserve__V1__GenerateRequest tmp = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = 0.7f;
    tmp.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    tmp.text = (char *)text;
    tmp.sampling = &sp;
    tmp.max_tokens = max_tokens;
    tmp.timeout_ms = timeout_ms;
    tmp.stream = true;
    size_t n = pb_packed_size(&tmp.base);
    uint8_t *buf = malloc(n);
    Pdserve__V1__GenerateRequest *req = NULL;
    CHECK(pb_pack(&tmp.base, buf, n) == (int64_t)n);
    CHECK(pb_unpack_generate_request(buf, n, 0, NULL, &req, NULL, 0) == PD_OK);
    free(buf);
    return req;
}

static inline rt_req_t *rt_submit(rt_env_t *e, rt_front_t *f, Pdserve__V1__GenerateRequest *req) {
    Pdserve__V1__ErrorCode code;
    char msg[512];
    f->core = e->core;
    f->req = rt_core_submit(e->core, &req, rt_front_on_chunk, f, &code, msg, sizeof msg);
    if (!f->req) fprintf(stderr, "submit refused: %s %s\n", pb_error_code_name(code), msg);
    CHECK(req == NULL);
    return f->req;
}

#endif
