/* test_dc_service.c: the decode service in-process on a real pd_loop, against a scripted router (a ROUTER
 * socket in the test) and a scripted prefill worker (a second engine that prefills a prompt, samples the first
 * token and sends the KV with a kvt_sender), all on loopback ZeroMQ. Checks registration and heartbeats, local
 * and disaggregated requests (tokens equal either way, greedy and seeded; first-token logprobs through the
 * commit info), refusals, cancel before and during a transfer (blocks held until the receiver lets go), the
 * router going silent, a refused registration and draining. */
#include <stdint.h>
#include <zmq.h>

#include "dc_msg.h"
#include "dc_service.h"
#include "eng.h"
#include "pb.h"
#include "pd_log.h"
#include "pd_loop.h"
#include "pd_test.h"

#define GOLDEN_DIR PD_SOURCE_DIR "/tests/golden/logits"
#define MAX_REQS   16
#define MAX_TOKS   256

static eng_t *s_eng, *s_pf_eng; /* the service's, the scripted prefill worker's */
static void *s_zctx;
static int32_t s_vocab;

/* ---- the scripted router ---- */

typedef struct {
    uint64_t id;
    bool has_reserved;
    int reserved_code;
    char reserved_msg[256];
    int32_t toks[MAX_TOKS];
    float lps[MAX_TOKS];
    int n_top0;
    int n_toks, n_chunks;
    char text[8192];
    size_t n_text;
    int finish, error_code;
    char error_msg[256];
    uint32_t completion_tokens, prompt_tokens;
    bool is_valid; /* every chunk passed pb_validate_response_chunk */
} rq_t;

typedef struct {
    void *sock;
    char endpoint[256];
    char worker[128];
    bool is_answering; /* answers heartbeats and registers */
    int32_t hb_ivl_ms;
    int refuse_code;
    int n_registers, n_heartbeats, n_bad;
    char kv_endpoint[256];
    uint32_t last_free_blocks;
    rq_t reqs[MAX_REQS];
    int n_reqs;
} router_t;

static router_t s_rt;

static rq_t *s_rq(uint64_t id) {
    for (int i = 0; i < s_rt.n_reqs; i++)
        if (s_rt.reqs[i].id == id) return &s_rt.reqs[i];
    PD_ASSERT(s_rt.n_reqs < MAX_REQS);
    rq_t *r = &s_rt.reqs[s_rt.n_reqs++];
    memset(r, 0, sizeof *r);
    r->id = id;
    r->is_valid = true;
    return r;
}

static void s_rt_send(const ProtobufCMessage *m) {
    uint8_t buf[1 << 16];
    int64_t n = pb_pack(m, buf, sizeof buf);
    PD_ASSERT(n >= 0);
    zmq_send(s_rt.sock, s_rt.worker, strlen(s_rt.worker), ZMQ_SNDMORE);
    zmq_send(s_rt.sock, buf, (size_t)n, 0);
}

static void s_rt_registered(int code) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__WorkerRegistered rg = PDSERVE__V1__WORKER_REGISTERED__INIT;
    rg.heartbeat_ivl_ms = (uint32_t)s_rt.hb_ivl_ms;
    if (code) {
        e.code = code;
        e.message = "fingerprint: refused by the test";
        rg.error = &e;
    }
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED;
    m.registered = &rg;
    s_rt_send(&m.base);
}

static void s_rt_chunk(const Pdserve__V1__ResponseChunk *c) {
    rq_t *r = s_rq(c->request_id);
    if (pb_validate_response_chunk(c, s_vocab, NULL, 0) != PD_OK) r->is_valid = false;
    r->n_chunks++;
    for (size_t i = 0; i < c->n_token_ids && r->n_toks < MAX_TOKS; i++) {
        if (r->n_toks == 0 && c->n_logprobs > 0) r->n_top0 = (int)c->logprobs[0]->n_top;
        r->lps[r->n_toks] = c->n_logprobs > i ? c->logprobs[i]->logprob : NAN;
        r->toks[r->n_toks++] = c->token_ids[i];
    }
    size_t n = strlen(c->text);
    if (r->n_text + n < sizeof r->text) memcpy(r->text + r->n_text, c->text, n), r->n_text += n;
    if (c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE) {
        if (r->finish) r->is_valid = false; /* a request ends once */
        r->finish = c->finish_reason;
        r->completion_tokens = c->usage ? c->usage->completion_tokens : 0;
        r->prompt_tokens = c->usage ? c->usage->prompt_tokens : 0;
        if (c->error) {
            r->error_code = c->error->code;
            snprintf(r->error_msg, sizeof r->error_msg, "%s", c->error->message);
        }
    }
}

static void s_rt_on_msg(const uint8_t *buf, size_t len) {
    ProtobufCMessage *pm = NULL;
    if (pb_unpack(&pdserve__v1__worker_to_router__descriptor, buf, len, 0, NULL, &pm, NULL, 0) != PD_OK) {
        s_rt.n_bad++;
        return;
    }
    const Pdserve__V1__WorkerToRouter *m = (const Pdserve__V1__WorkerToRouter *)pm;
    switch (m->body_case) {
    case PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER:
        s_rt.n_registers++;
        if (pb_validate_worker_register(m->register_, NULL, 0) != PD_OK ||
            m->register_->role != PDSERVE__V1__WORKER_ROLE__ROLE_DECODE)
            s_rt.n_bad++;
        snprintf(s_rt.kv_endpoint, sizeof s_rt.kv_endpoint, "%s", m->register_->kv_endpoint);
        if (s_rt.is_answering) s_rt_registered(s_rt.refuse_code);
        break;
    case PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT:
        s_rt.n_heartbeats++;
        if (pb_validate_heartbeat(m->heartbeat, NULL, 0) != PD_OK) s_rt.n_bad++;
        s_rt.last_free_blocks = m->heartbeat->free_kv_blocks;
        if (s_rt.is_answering) s_rt_registered(0); /* the router answers every heartbeat */
        break;
    case PDSERVE__V1__WORKER_TO_ROUTER__BODY_RESERVED: {
        rq_t *r = s_rq(m->reserved->request_id);
        r->has_reserved = true;
        r->reserved_code = m->reserved->error ? m->reserved->error->code : 0;
        if (m->reserved->error) snprintf(r->reserved_msg, sizeof r->reserved_msg, "%s", m->reserved->error->message);
        break;
    }
    case PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK: s_rt_chunk(m->chunk); break;
    default: s_rt.n_bad++; break;
    }
    pb_free(&pm, NULL);
}

static void s_rt_on_socket(pd_loop_t *l, void *ud) {
    (void)l, (void)ud;
    for (;;) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, s_rt.sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&id);
            return;
        }
        zmq_msg_init(&body);
        if (zmq_msg_recv(&body, s_rt.sock, 0) >= 0) s_rt_on_msg(zmq_msg_data(&body), zmq_msg_size(&body));
        zmq_msg_close(&id);
        zmq_msg_close(&body);
    }
}

static void s_rt_open(pd_loop_t *loop) {
    memset(&s_rt, 0, sizeof s_rt);
    s_rt.is_answering = true;
    s_rt.hb_ivl_ms = 50;
    s_rt.sock = zmq_socket(s_zctx, ZMQ_ROUTER);
    int one = 1, zero = 0;
    zmq_setsockopt(s_rt.sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(s_rt.sock, ZMQ_ROUTER_HANDOVER, &one, sizeof one); /* a new service with the same id */
    zmq_setsockopt(s_rt.sock, ZMQ_LINGER, &zero, sizeof zero);
    PD_ASSERT(zmq_bind(s_rt.sock, "tcp://127.0.0.1:0") == 0);
    size_t len = sizeof s_rt.endpoint;
    zmq_getsockopt(s_rt.sock, ZMQ_LAST_ENDPOINT, s_rt.endpoint, &len);
    PD_ASSERT(pd_loop_add_socket(loop, s_rt.sock, s_rt_on_socket, NULL) == PD_OK);
}

static void s_rt_close(pd_loop_t *loop) {
    pd_loop_remove_socket(loop, s_rt.sock);
    zmq_close(s_rt.sock);
    s_rt.sock = NULL;
}

static void s_rt_decode(uint64_t id, const int32_t *prompt, int n, int max_tokens, float temperature, uint64_t seed,
                        int n_logprobs, bool is_local, uint32_t timeout_ms) {
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = temperature;
    sp.seed = seed;
    sp.has_seed = true;
    sp.logprobs = n_logprobs;
    Pdserve__V1__DecodeRequest d = PDSERVE__V1__DECODE_REQUEST__INIT;
    d.request_id = id;
    d.n_prompt = (size_t)n;
    d.prompt = (int32_t *)prompt;
    d.sampling = &sp;
    d.max_tokens = (uint32_t)max_tokens;
    d.ignore_eos = true;
    d.timeout_ms = timeout_ms;
    d.prefill_locally = is_local;
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE;
    m.decode = &d;
    s_rq(id); /* known before any answer */
    s_rt_send(&m.base);
}

static void s_rt_cancel(uint64_t id, int reason) {
    Pdserve__V1__Cancel c = PDSERVE__V1__CANCEL__INIT;
    c.request_id = id;
    c.reason = reason;
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL;
    m.cancel = &c;
    s_rt_send(&m.base);
}

/* ---- running the loop until something happened ---- */

typedef bool (*cond_fn)(const void *arg);

/* Runs the loop until cond holds or timeout_ms passed; returns cond's last value. */
static bool s_run_until(pd_loop_t *loop, cond_fn cond, const void *arg, int timeout_ms) {
    uint64_t end = pd_now_us() + (uint64_t)timeout_ms * 1000u;
    while (!cond(arg) && pd_now_us() < end)
        if (pd_loop_run_once(loop, 5) != PD_OK) return false;
    return cond(arg);
}

static bool c_registered(const void *svc) {
    return dc_service_is_registered(svc);
}
static bool c_finished(const void *id) {
    return s_rq(*(const uint64_t *)id)->finish != 0;
}
static bool c_reserved(const void *id) {
    return s_rq(*(const uint64_t *)id)->has_reserved;
}
static bool c_two_tokens(const void *id) {
    return s_rq(*(const uint64_t *)id)->n_toks >= 2;
}
/* Nothing held, no block taken, no transfer: what every path must come back to. */
static bool c_idle(const void *svc) {
    dc_service_stats_t st;
    dc_service_stats(svc, &st);
    return st.n_requests_held == 0 && st.n_abandoned == 0 && st.sched.n_free_blocks == st.sched.n_total_blocks &&
           st.kv.active_transfers == 0;
}
static bool c_never(const void *arg) {
    (void)arg;
    return false;
}

/* ---- the scripted prefill worker ---- */

typedef struct {
    kvt_sender_t *snd;
    eng_kv_seq_t seq;
    uint64_t transfer_id;
    bool is_done, is_released;
    pd_status done_status;
} pf_t;

static void s_fingerprint(eng_t *e, kvt_fingerprint_t *out) {
    const eng_model_config_t *c = eng_config(e);
    const eng_kv_layout_t *l = eng_kv_layout(e);
    memset(out, 0, sizeof *out);
    snprintf(out->model_id, sizeof out->model_id, "%s", c->name);
    out->weights_hash = eng_model_identity_hash(eng_model(e));
    out->tokenizer_hash = eng_tok_hash(eng_tokenizer(e));
    out->kv_dtype = l->dtype;
    out->block_size = l->block_size, out->n_layers = l->n_layers, out->n_kv_heads = l->n_kv_heads;
    out->head_dim = l->head_dim, out->rope_theta = c->rope_theta, out->rope_dim = c->rope_dim;
}

static void s_pf_poll(pd_loop_t *l, void *ud) {
    (void)l;
    pf_t *p = ud;
    kvt_event_t ev[8];
    int n = kvt_sender_poll(p->snd, 0, ev, 8);
    for (int i = 0; i < n; i++) {
        if (ev[i].kind == KVT_EV_DONE) p->is_done = true, p->done_status = ev[i].status;
        if (ev[i].kind == KVT_EV_RELEASED) p->is_released = true;
    }
}

static bool c_pf_released(const void *p) {
    return ((const pf_t *)p)->is_released;
}

/* Prefills prompt on the second engine, samples the first token (its own seeded sampler, one draw), starts the
 * transfer to the service and, unless is_hold, marks every layer ready and commits with the first token's
 * logprobs as info. */
static pd_status s_pf_start(pf_t *p, pd_loop_t *loop, int64_t *timer, uint64_t req_id, const int32_t *prompt, int32_t n,
                            float temperature, uint64_t seed, int n_logprobs, bool is_hold) {
    memset(p, 0, sizeof *p);
    const eng_kv_layout_t *l = eng_kv_layout(s_pf_eng);
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = s_rt.kv_endpoint;
    sp.sender_id = "test-prefill";
    s_fingerprint(s_pf_eng, &sp.fingerprint);
    sp.layout = *l;
    sp.pool_base = eng_kv_host_base(s_pf_eng);
    char err[256];
    p->snd = kvt_sender_create(s_zctx, &sp, err, sizeof err);
    if (!p->snd) return PD_EIO;
    PD_ASSERT(pd_loop_add_socket(loop, kvt_sender_socket(p->snd), s_pf_poll, p) == PD_OK);
    *timer = pd_loop_add_timer(loop, 1, true, s_pf_poll, p);
    if (eng_kv_seq_reserve(&p->seq, eng_kv_pool(s_pf_eng), l->block_size, n) != PD_OK) return PD_EAGAIN;
    float *logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab);
    const int32_t *table = p->seq.blocks;
    int32_t pos = 0;
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &p->seq.n_blocks,
                     .tokens = prompt,
                     .logits = logits};
    eng_sampling_t sa = eng_sampling_default();
    sa.temperature = temperature, sa.seed = seed, sa.has_seed = true, sa.n_logprobs = n_logprobs;
    eng_sampler_t *smp = eng_sampler_create(&sa, s_vocab);
    eng_sampler_add_prompt(smp, prompt, n);
    eng_sample_result_t r;
    pd_status st = eng_forward(s_pf_eng, &b);
    if (st == PD_OK) st = eng_sampler_sample(smp, logits, &r);
    eng_sampler_destroy(&smp);
    free(logits);
    if (st != PD_OK) return st;
    kvt_transfer_t t = {.request_id = req_id,
                        .transfer_id = req_id,
                        .epoch = 1,
                        .n_tokens = n,
                        .block_ids = p->seq.blocks,
                        .timeout_ms = 10000};
    p->transfer_id = req_id;
    if ((st = kvt_sender_start(p->snd, &t)) != PD_OK || is_hold) return st;
    Pdserve__V1__TokenLogprob tl = PDSERVE__V1__TOKEN_LOGPROB__INIT;
    Pdserve__V1__TopLogprob top[ENG_MAX_LOGPROBS], *ptop[ENG_MAX_LOGPROBS];
    tl.token = r.token;
    tl.logprob = r.logprob;
    for (int i = 0; i < r.n_top; i++) {
        top[i] = (Pdserve__V1__TopLogprob)PDSERVE__V1__TOP_LOGPROB__INIT;
        top[i].token = r.top[i].token, top[i].logprob = r.top[i].logprob;
        ptop[i] = &top[i];
    }
    tl.n_top = (size_t)r.n_top, tl.top = ptop;
    uint8_t info[1024];
    int64_t n_info = pb_pack(&tl.base, info, sizeof info);
    if ((st = kvt_sender_layers_ready(p->snd, p->transfer_id, l->n_layers)) != PD_OK) return st;
    return kvt_sender_commit_info(p->snd, p->transfer_id, r.token, info, (size_t)n_info);
}

static void s_pf_stop(pf_t *p, pd_loop_t *loop, int64_t timer) {
    pd_loop_cancel_timer(loop, timer);
    if (p->snd) pd_loop_remove_socket(loop, kvt_sender_socket(p->snd));
    kvt_sender_destroy(&p->snd);
    eng_kv_seq_release(&p->seq, eng_kv_pool(s_pf_eng));
    eng_kv_seq_fini(&p->seq);
}

/* ---- fixtures ---- */

static int s_read_line_ints(const char *name, int line, int32_t *dst, int cap) {
    char path[1024];
    snprintf(path, sizeof path, GOLDEN_DIR "/%s.tokens.txt", name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    static char buf[1 << 16];
    int n = 0;
    for (int l = 0; l <= line && fgets(buf, sizeof buf, f); l++) {
        if (l < line) continue;
        char *p = buf, *end;
        for (long v; n < cap && (v = strtol(p, &end, 10), end != p); p = end) dst[n++] = (int32_t)v;
    }
    fclose(f);
    return n;
}

static bool s_registered_ok;
static void s_on_registered(void *ud) {
    (void)ud;
    s_registered_ok = true;
}

static dc_service_t *s_service(pd_loop_t *loop, int32_t max_seqs) {
    dc_service_params_t p = dc_service_params_default();
    p.eng = s_eng, p.loop = loop, p.zmq_ctx = s_zctx;
    p.router_endpoint = s_rt.endpoint;
    p.worker_id = "decode-test";
    p.max_batch = 8, p.max_seqs = max_seqs, p.prefill_chunk_tokens = 16;
    p.drain_timeout_ms = 30000;
    p.on_registered = s_on_registered;
    snprintf(s_rt.worker, sizeof s_rt.worker, "%s", p.worker_id);
    char err[256];
    dc_service_t *s = dc_service_create(&p, err, sizeof err);
    if (!s) fprintf(stderr, "dc_service_create: %s\n", err);
    return s;
}

static void s_check_idle(const dc_service_t *svc) {
    dc_service_stats_t st;
    dc_service_stats(svc, &st);
    CHECK_EQ_INT(st.n_requests_held, 0);
    CHECK_EQ_INT(st.n_abandoned, 0);
    CHECK_EQ_INT(st.sched.n_free_blocks, st.sched.n_total_blocks);
    CHECK_EQ_INT(st.kv.active_transfers, 0);
}

/* ---- tests ---- */

/* Registration, heartbeats, then the same request local and disaggregated: greedy = the HF reference, seeded
 * (temperature 0.8) equal either way, logprobs through the commit info. */
static void test_requests(void) {
    int32_t prompt[16], ref[64];
    REQUIRE(s_read_line_ints("capital_france", 0, prompt, 16) == 5);
    REQUIRE(s_read_line_ints("capital_france", 1, ref, 64) == 64);
    pd_loop_t *loop = pd_loop_create();
    s_rt_open(loop);
    dc_service_t *svc = s_service(loop, 16);
    REQUIRE(svc);
    s_registered_ok = false;
    CHECK(s_run_until(loop, c_registered, svc, 5000));
    CHECK(s_registered_ok);
    CHECK_EQ_INT(s_rt.n_registers, 1);
    CHECK(strcmp(s_rt.kv_endpoint, dc_service_kv_endpoint(svc)) == 0);
    s_run_until(loop, c_never, NULL, 200);
    CHECK(s_rt.n_heartbeats >= 2);
    CHECK_EQ_INT(s_rt.n_registers, 1); /* answered heartbeats: no re-registration */

    uint64_t id = 1; /* local, greedy */
    s_rt_decode(id, prompt, 5, 12, 0.0f, 0, 2, true, 10000);
    CHECK(s_run_until(loop, c_finished, &id, 20000));
    rq_t *r = s_rq(id);
    CHECK(r->has_reserved && r->reserved_code == 0);
    CHECK_EQ_INT(r->n_toks, 12);
    CHECK(memcmp(r->toks, ref, sizeof(int32_t) * 12) == 0);
    CHECK_EQ_INT(r->finish, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    CHECK_EQ_INT(r->completion_tokens, 12);
    CHECK_EQ_INT(r->prompt_tokens, 5);
    CHECK_EQ_INT(r->n_chunks, 12);
    CHECK(r->is_valid);
    CHECK_EQ_INT(r->n_top0, 2);
    char full[1024];
    int64_t n_full = eng_tok_decode(eng_tokenizer(s_eng), ref, 12, full, sizeof full);
    CHECK(n_full == (int64_t)r->n_text && memcmp(full, r->text, r->n_text) == 0);

    for (int seeded = 0; seeded < 2; seeded++) { /* disaggregated, compared with local */
        float t = seeded ? 0.8f : 0.0f;
        uint64_t local = 10 + (uint64_t)seeded * 2, remote = local + 1;
        s_rt_decode(local, prompt, 5, 24, t, 777, 3, true, 10000);
        CHECK(s_run_until(loop, c_finished, &local, 20000));
        s_rt_decode(remote, prompt, 5, 24, t, 777, 3, false, 10000);
        CHECK(s_run_until(loop, c_reserved, &remote, 5000));
        CHECK_EQ_INT(s_rq(remote)->reserved_code, 0);
        pf_t pf;
        int64_t timer = 0;
        CHECK_EQ_INT(s_pf_start(&pf, loop, &timer, remote, prompt, 5, t, 777, 3, false), PD_OK);
        CHECK(s_run_until(loop, c_finished, &remote, 20000));
        CHECK(s_run_until(loop, c_pf_released, &pf, 5000));
        CHECK_EQ_INT(pf.done_status, PD_OK);
        s_pf_stop(&pf, loop, timer);
        rq_t *a = s_rq(local), *b = s_rq(remote);
        CHECK_EQ_INT(b->n_toks, 24);
        CHECK_MSG(a->n_toks == b->n_toks && memcmp(a->toks, b->toks, sizeof(int32_t) * 24) == 0,
                  "temperature %.1f: local and disaggregated differ", (double)t);
        CHECK_MSG(b->is_valid && b->finish == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH, "finish %d: %s", b->finish,
                  b->error_msg);
        CHECK_EQ_INT(b->n_top0, 3);
        CHECK(a->lps[0] == b->lps[0]); /* prefill's logprob arrived, bit-identical */
        if (!seeded) CHECK(memcmp(b->toks, ref, sizeof(int32_t) * 24) == 0);
    }
    CHECK(s_run_until(loop, c_idle, svc, 5000));
    s_check_idle(svc);
    dc_service_destroy(&svc);
    s_rt_close(loop);
    pd_loop_destroy(&loop);
}

/* Refusals: a bad request, a duplicate id, a full worker; cancel while waiting, during a transfer (the chunk
 * at once, the blocks once the sender gave up), while running; a deadline while waiting for KV. */
static void test_refusals_and_cancel(void) {
    int32_t prompt[40];
    for (int i = 0; i < 40; i++) prompt[i] = 100 + i * 7;
    pd_loop_t *loop = pd_loop_create();
    s_rt_open(loop);
    dc_service_t *svc = s_service(loop, 3);
    REQUIRE(svc);
    CHECK(s_run_until(loop, c_registered, svc, 5000));
    dc_service_stats_t st;

    int32_t bad[2] = {5, s_vocab};
    uint64_t id = 20;
    s_rt_decode(id, bad, 2, 4, 0, 0, 0, false, 0);
    CHECK(s_run_until(loop, c_reserved, &id, 5000));
    CHECK_EQ_INT(s_rq(id)->reserved_code, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT);
    CHECK(strstr(s_rq(id)->reserved_msg, "prompt[1]") != NULL);

    uint64_t w = 21, x = 22, y = 23, z = 24;
    s_rt_decode(w, prompt, 40, 4, 0, 0, 0, false, 0);   /* waits for KV, cancelled before any transfer */
    s_rt_decode(x, prompt, 40, 4, 0, 0, 0, false, 0);   /* its transfer starts and stalls */
    s_rt_decode(y, prompt, 40, 4, 0, 0, 0, false, 150); /* deadline while waiting */
    CHECK(s_run_until(loop, c_reserved, &y, 5000));
    s_rt_decode(z, prompt, 10, 4, 0, 0, 0, false, 0); /* the fourth: max_seqs is 3 */
    s_rt_decode(x, prompt, 40, 4, 0, 0, 0, false, 0); /* a duplicate */
    CHECK(s_run_until(loop, c_reserved, &z, 5000));
    CHECK_EQ_INT(s_rq(z)->reserved_code, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    CHECK(s_run_until(loop, c_finished, &y, 5000)); /* deadline */
    CHECK_EQ_INT(s_rq(y)->finish, PDSERVE__V1__FINISH_REASON__FINISH_ERROR);
    CHECK_EQ_INT(s_rq(y)->error_code, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    CHECK_EQ_INT(s_rq(x)->finish, 0); /* the duplicate did not end the original */

    s_rt_cancel(w, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(s_run_until(loop, c_finished, &w, 5000));
    CHECK_EQ_INT(s_rq(w)->finish, PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED);
    CHECK(s_rq(w)->is_valid);

    pf_t pf;
    int64_t timer = 0;
    CHECK_EQ_INT(s_pf_start(&pf, loop, &timer, x, prompt, 40, 0.0f, 0, 0, true), PD_OK);
    s_run_until(loop, c_never, NULL, 200); /* the reservation went through; no payload yet */
    dc_service_stats(svc, &st);
    CHECK_EQ_INT(st.kv.active_transfers, 1);
    s_rt_cancel(x, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(s_run_until(loop, c_finished, &x, 5000));
    CHECK_MSG(s_rq(x)->finish == PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED, "x: %s", s_rq(x)->error_msg);
    dc_service_stats(svc, &st);
    CHECK_EQ_INT(st.n_abandoned, 1); /* the chunk went out; the blocks wait for the receiver's FAILED event */
    /* the receiver let go at once and told the prefill side, which never committed: no timeout on either side */
    CHECK(s_run_until(loop, c_pf_released, &pf, 5000));
    CHECK_EQ_INT(pf.done_status, PD_ECLOSED);
    CHECK(s_run_until(loop, c_idle, svc, 5000)); /* the receiver's FAILED frees the abandoned request's blocks */
    s_pf_stop(&pf, loop, timer);
    s_check_idle(svc);

    uint64_t run = 25; /* cancelled while running: one CANCELLED chunk after its tokens */
    s_rt_decode(run, prompt, 5, 200, 0, 0, 0, true, 0);
    CHECK(s_run_until(loop, c_two_tokens, &run, 5000));
    s_rt_cancel(run, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(s_run_until(loop, c_finished, &run, 5000));
    CHECK_EQ_INT(s_rq(run)->finish, PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED);
    CHECK(s_rq(run)->n_toks < 200 && s_rq(run)->is_valid);
    CHECK(s_run_until(loop, c_idle, svc, 5000)); /* the step that ran its last row gives its blocks back */
    s_check_idle(svc);
    CHECK_EQ_INT(s_rt.n_bad, 0);
    dc_service_destroy(&svc);
    s_rt_close(loop);
    pd_loop_destroy(&loop);
}

/* The router stops answering: a register again after 5 intervals, everything ended after 10, registered again
 * once it answers. */
static void test_router_silent(void) {
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    pd_loop_t *loop = pd_loop_create();
    s_rt_open(loop);
    dc_service_t *svc = s_service(loop, 8);
    REQUIRE(svc);
    CHECK(s_run_until(loop, c_registered, svc, 5000));
    uint64_t id = 30;
    s_rt_decode(id, prompt, 5, 100000, 0, 0, 0, true, 0);
    CHECK(s_run_until(loop, c_two_tokens, &id, 5000));
    s_rt.is_answering = false;
    CHECK(s_run_until(loop, c_finished, &id, 5000));
    CHECK_EQ_INT(s_rq(id)->error_code, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE);
    CHECK(s_rt.n_registers >= 2); /* registered again at 5 intervals of silence */
    CHECK(!dc_service_is_registered(svc));
    s_rt.is_answering = true;
    CHECK(s_run_until(loop, c_registered, svc, 5000));
    CHECK(s_run_until(loop, c_idle, svc, 5000));
    s_check_idle(svc);
    dc_service_destroy(&svc);
    s_rt_close(loop);
    pd_loop_destroy(&loop);
}

static void s_on_stop_timer(pd_loop_t *l, void *ud) {
    (void)ud;
    pd_loop_stop(l);
}

/* SIGTERM once or twice, as the signal handler delivers it: from inside the loop. */
static void s_on_drain_once(pd_loop_t *l, void *ud) {
    (void)l;
    dc_service_drain(ud);
}

static void s_on_drain_twice(pd_loop_t *l, void *ud) {
    (void)l;
    dc_service_drain(ud);
    dc_service_drain(ud);
}

static void s_on_late_request(pd_loop_t *l, void *ud) {
    (void)l;
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    s_rt_decode(*(const uint64_t *)ud, prompt, 5, 20, 0, 0, 0, true, 0);
}

/* After pd_loop_run returned (the loop stays stopped), the router's socket is read on its own until cond. */
static bool s_rt_read_until(cond_fn cond, const void *arg, int timeout_ms) {
    uint64_t end = pd_now_us() + (uint64_t)timeout_ms * 1000u;
    while (!cond(arg) && pd_now_us() < end) {
        zmq_pollitem_t it = {s_rt.sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 5) > 0) s_rt_on_socket(NULL, NULL);
    }
    return cond(arg);
}

/* A refused registration stops the loop (main then exits 1). */
static void test_refused(void) {
    pd_loop_t *loop = pd_loop_create();
    s_rt_open(loop);
    s_rt.refuse_code = PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE;
    dc_service_t *svc = s_service(loop, 8);
    REQUIRE(svc);
    int64_t guard = pd_loop_add_timer(loop, 5000, false, s_on_stop_timer, NULL);
    uint64_t t0 = pd_now_us();
    CHECK(pd_loop_run(loop) == PD_OK);
    CHECK(pd_now_us() - t0 < 4000000u); /* stopped by the refusal, not by the guard */
    CHECK(dc_service_is_refused(svc));
    CHECK(!dc_service_is_registered(svc));
    pd_loop_cancel_timer(loop, guard);
    dc_service_destroy(&svc);
    s_rt_close(loop);
    pd_loop_destroy(&loop);
}

/* Draining refuses new requests and lets held ones finish, then stops the loop; a second drain (signal) ends
 * the rest at once. */
static void test_drain(void) {
    int32_t prompt[5] = {1, 2, 3, 4, 5};
    for (int twice = 0; twice < 2; twice++) {
        pd_loop_t *loop = pd_loop_create();
        s_rt_open(loop);
        dc_service_t *svc = s_service(loop, 8);
        REQUIRE(svc);
        CHECK(s_run_until(loop, c_registered, svc, 5000));
        uint64_t held = 40, late = 41;
        s_rt_decode(held, prompt, 5, twice ? 100000 : 20, 0, 0, 0, true, 0);
        CHECK(s_run_until(loop, c_two_tokens, &held, 5000));
        pd_loop_add_timer(loop, 0, false, twice ? s_on_drain_twice : s_on_drain_once, svc);
        pd_loop_add_timer(loop, 20, false, s_on_late_request, &late);
        int64_t guard = pd_loop_add_timer(loop, 10000, false, s_on_stop_timer, NULL);
        uint64_t t0 = pd_now_us();
        CHECK(pd_loop_run(loop) == PD_OK);  /* returns once drained */
        CHECK(pd_now_us() - t0 < 5000000u); /* stopped by the drain, not by the guard */
        pd_loop_cancel_timer(loop, guard);
        CHECK(s_rt_read_until(c_finished, &held, 2000)); /* its last chunk went out just before the stop */
        if (!twice) {
            CHECK_EQ_INT(s_rq(held)->finish, PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
            CHECK_EQ_INT(s_rq(held)->n_toks, 20);
            CHECK(s_rt_read_until(c_reserved, &late, 2000));
            CHECK_EQ_INT(s_rq(late)->reserved_code, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE);
            CHECK(strstr(s_rq(late)->reserved_msg, "draining") != NULL);
        } else {
            CHECK_EQ_INT(s_rq(held)->finish, PDSERVE__V1__FINISH_REASON__FINISH_ERROR);
            CHECK_EQ_INT(s_rq(held)->error_code, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE);
        }
        CHECK(!dc_service_is_refused(svc));
        dc_service_destroy(&svc); /* waits for a step still running */
        CHECK_EQ_INT(eng_kv_pool_n_free(eng_kv_pool(s_eng)), eng_kv_pool_n_blocks(eng_kv_pool(s_eng)));
        s_rt_close(loop);
        pd_loop_destroy(&loop);
    }
}

/* dc_msg: DecodeRequest checks and the first-token info. */
static void test_msg(void) {
    int32_t prompt[3] = {1, 2, 3};
    const char *stops[PB_MAX_STOP];
    char *stop_strs[2] = {"ab", ""};
    Pdserve__V1__DecodeRequest d = PDSERVE__V1__DECODE_REQUEST__INIT;
    d.request_id = 7, d.n_prompt = 3, d.prompt = prompt, d.max_tokens = 4, d.timeout_ms = 250;
    dc_req_params_t rp;
    char err[256];
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 1000, stops, &rp, err, sizeof err), PD_OK);
    CHECK(rp.req_id == 7 && rp.n_prompt_tokens == 3 && rp.max_tokens == 4 && rp.deadline_us == 251000);
    CHECK(rp.sampling.temperature == 0.0f && rp.sampling.top_p == 1.0f && rp.sampling.repetition_penalty == 1.0f);
    d.n_stop = 2, d.stop = stop_strs;
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 0, stops, &rp, err, sizeof err), PD_EINVAL);
    CHECK(strstr(err, "stop[1]") != NULL);
    d.n_stop = 1;
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 0, stops, &rp, err, sizeof err), PD_OK);
    CHECK(rp.n_stops == 1 && strcmp(rp.stops[0], "ab") == 0);
    d.max_tokens = 0;
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 0, stops, &rp, err, sizeof err), PD_EINVAL);
    d.max_tokens = 4, d.n_prompt = 0;
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 0, stops, &rp, err, sizeof err), PD_EINVAL);
    d.n_prompt = 3, d.request_id = 0;
    CHECK_EQ_INT(dc_msg_decode_request(&d, s_vocab, 8192, 0, stops, &rp, err, sizeof err), PD_EINVAL);

    eng_sample_result_t r;
    CHECK_EQ_INT(dc_msg_first_token(NULL, 0, 42, s_vocab, &r, err, sizeof err), PD_OK);
    CHECK(r.token == 42 && isnan(r.logprob) && r.n_top == 0);
    Pdserve__V1__TokenLogprob tl = PDSERVE__V1__TOKEN_LOGPROB__INIT;
    Pdserve__V1__TopLogprob t0 = PDSERVE__V1__TOP_LOGPROB__INIT, *pt = &t0;
    tl.token = 42, tl.logprob = -0.5f, tl.n_top = 1, tl.top = &pt;
    t0.token = 43, t0.logprob = -0.25f;
    uint8_t buf[256];
    int64_t n = pb_pack(&tl.base, buf, sizeof buf);
    CHECK_EQ_INT(dc_msg_first_token(buf, (size_t)n, 42, s_vocab, &r, err, sizeof err), PD_OK);
    CHECK(r.logprob == -0.5f && r.n_top == 1 && r.top[0].token == 43 && r.top[0].logprob == -0.25f);
    CHECK_EQ_INT(dc_msg_first_token(buf, (size_t)n, 41, s_vocab, &r, err, sizeof err), PD_EPROTO);
    t0.token = s_vocab;
    n = pb_pack(&tl.base, buf, sizeof buf);
    CHECK_EQ_INT(dc_msg_first_token(buf, (size_t)n, 42, s_vocab, &r, err, sizeof err), PD_EPROTO);
    t0.token = 43, tl.logprob = 0.5f;
    n = pb_pack(&tl.base, buf, sizeof buf);
    CHECK_EQ_INT(dc_msg_first_token(buf, (size_t)n, 42, s_vocab, &r, err, sizeof err), PD_EPROTO);
    buf[0] = 0xff;
    CHECK_EQ_INT(dc_msg_first_token(buf, 3, 42, s_vocab, &r, err, sizeof err), PD_EPROTO);
    CHECK_EQ_INT(dc_msg_error_code(PD_ETIMEDOUT), PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    CHECK_EQ_INT(dc_msg_error_code(PD_EAGAIN), PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    CHECK_EQ_INT(dc_msg_error_code(PD_EBACKEND), PDSERVE__V1__ERROR_CODE__ERR_INTERNAL);
}

int main(void) {
    pd_log_init("test", PD_LOG_ERROR);
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.kv_n_blocks = 64;
    p.n_threads = 1;
    char err[512];
    s_eng = eng_create(&p, err, sizeof err);
    s_pf_eng = s_eng ? eng_create(&p, err, sizeof err) : NULL;
    if (!s_pf_eng) {
        fprintf(stderr, "cannot create engine: %s\n", err);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    s_vocab = eng_config(s_eng)->vocab_size;
    s_zctx = zmq_ctx_new();
    PD_TEST_RUN(test_msg);
    PD_TEST_RUN(test_requests);
    PD_TEST_RUN(test_refusals_and_cancel);
    PD_TEST_RUN(test_router_silent);
    PD_TEST_RUN(test_refused);
    PD_TEST_RUN(test_drain);
    zmq_ctx_term(s_zctx);
    eng_destroy(&s_pf_eng);
    eng_destroy(&s_eng);
    return pd_test_finish();
}
