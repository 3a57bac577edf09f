/* test_pf_service.c: the prefill service in-process on the real model, against a fake router (a ROUTER socket
 * played by this test) and a real kvt_receiver on loopback, all on the service's own pd_loop: registration and
 * heartbeats, the KV that lands bit-identical to an eng_forward of the same prompt alone, the first token and
 * its logprobs in the commit info, every refusal and transfer failure as the right RequestFailed, cancel,
 * deadlines, router loss and re-registration, drain; the engine's pool back to full after each. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

#include "eng.h"
#include "eng_sample.h"
#include "kvt.h"
#include "kvt_test_store.h"
#include "pb.h"
#include "pd_log.h"
#include "pd_loop.h"
#include "pd_test.h"
#include "pf_service.h"

#define WORKER_ID  "prefill-t"
#define MAX_RECS   64
#define MAX_PROMPT 256

static eng_t *s_eng;
static kvt_shm_alloc_t s_shm; /* the engine's KV pool, in shared memory */

typedef struct {
    uint64_t req_id;
    Pdserve__V1__ErrorCode code;
    char msg[256];
} fail_rec_t;

typedef struct {
    uint64_t req_id;
    int32_t first_token, n_tokens, n_blocks;
    int32_t blocks[64];
    uint8_t info[1024];
    size_t info_len;
} commit_rec_t;

/* The fake router, the decode worker's receiver and what each saw. */
typedef struct {
    pd_loop_t *loop;
    void *zctx;
    void *router;
    char router_ep[128];
    pf_service_t *svc;
    kvt_receiver_t *rx;
    kvt_test_store_t store;
    int64_t rx_timer;
    bool is_rx_paused;   /* the decode side stops polling (a stalled peer) */
    bool is_router_mute; /* the router stops answering */
    uint32_t hb_ivl_ms;  /* what the router asks for */
    Pdserve__V1__ErrorCode register_reply;
    int n_register, n_heartbeat, n_on_registered;
    uint32_t hb_total_blocks, hb_free_blocks, hb_queue_depth;
    fail_rec_t fails[MAX_RECS];
    int n_fails;
    commit_rec_t commits[MAX_RECS];
    int n_commits, n_rx_failed;
} fx_t;

/* ---- the fake router ---- */

static void fx_send(fx_t *f, const Pdserve__V1__RouterToWorker *m) {
    uint8_t buf[8192];
    int64_t n = pb_pack(&m->base, buf, sizeof buf);
    REQUIRE(n > 0);
    CHECK(zmq_send(f->router, WORKER_ID, strlen(WORKER_ID), ZMQ_SNDMORE) >= 0);
    CHECK(zmq_send(f->router, buf, (size_t)n, 0) == (int)n);
}

static void fx_send_registered(fx_t *f, Pdserve__V1__ErrorCode code) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = code;
    e.message = code ? "model differs" : "";
    Pdserve__V1__WorkerRegistered rg = PDSERVE__V1__WORKER_REGISTERED__INIT;
    rg.error = code ? &e : NULL;
    rg.heartbeat_ivl_ms = f->hb_ivl_ms;
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED;
    m.registered = &rg;
    fx_send(f, &m);
}

static void fx_on_worker_msg(fx_t *f, const uint8_t *buf, size_t len) {
    char err[256];
    ProtobufCMessage *msg = NULL;
    REQUIRE(pb_unpack(&pdserve__v1__worker_to_router__descriptor, buf, len, 0, NULL, &msg, err, sizeof err) == PD_OK);
    Pdserve__V1__WorkerToRouter *m = (Pdserve__V1__WorkerToRouter *)msg;
    if (m->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER) {
        CHECK_MSG(pb_validate_worker_register(m->register_, err, sizeof err) == PD_OK, "%s", err);
        CHECK(m->register_->role == PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL);
        CHECK(strcmp(m->register_->worker_id, WORKER_ID) == 0);
        CHECK(strcmp(m->register_->backend, "cpu") == 0);
        CHECK(m->register_->kv_endpoint[0] == '\0');
        CHECK(strcmp(m->register_->fingerprint->model_id, eng_config(s_eng)->name) == 0);
        CHECK(m->register_->fingerprint->weights_hash == eng_model_identity_hash(eng_model(s_eng)));
        CHECK(m->register_->fingerprint->tokenizer_hash == eng_tok_hash(eng_tokenizer(s_eng)));
        CHECK(m->register_->fingerprint->n_layers == (uint32_t)eng_config(s_eng)->n_layers);
        f->n_register++;
        if (!f->is_router_mute) fx_send_registered(f, f->register_reply);
    } else if (m->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT) {
        CHECK_MSG(pb_validate_heartbeat(m->heartbeat, err, sizeof err) == PD_OK, "%s", err);
        CHECK(m->heartbeat->role == PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL);
        f->n_heartbeat++;
        f->hb_total_blocks = m->heartbeat->total_kv_blocks;
        f->hb_free_blocks = m->heartbeat->free_kv_blocks;
        f->hb_queue_depth = m->heartbeat->queue_depth;
        if (!f->is_router_mute) fx_send_registered(f, PDSERVE__V1__ERROR_CODE__ERR_NONE); /* as rt_registry does */
    } else if (m->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_FAILED) {
        REQUIRE(f->n_fails < MAX_RECS);
        fail_rec_t *r = &f->fails[f->n_fails++];
        r->req_id = m->failed->request_id;
        CHECK(m->failed->error != NULL);
        r->code = m->failed->error ? m->failed->error->code : 0;
        snprintf(r->msg, sizeof r->msg, "%s", m->failed->error ? m->failed->error->message : "");
    } else {
        CHECK_MSG(false, "unexpected message %d", (int)m->body_case);
    }
    pb_free(&msg, NULL);
}

static void fx_on_router(pd_loop_t *l, void *ud) {
    (void)l;
    fx_t *f = ud;
    for (;;) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, f->router, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&id);
            return;
        }
        CHECK(zmq_msg_more(&id));
        zmq_msg_init(&body);
        CHECK(zmq_msg_recv(&body, f->router, 0) >= 0);
        CHECK(!zmq_msg_more(&body)); /* one frame per envelope */
        CHECK(zmq_msg_size(&id) == strlen(WORKER_ID) && memcmp(zmq_msg_data(&id), WORKER_ID, strlen(WORKER_ID)) == 0);
        fx_on_worker_msg(f, zmq_msg_data(&body), zmq_msg_size(&body));
        zmq_msg_close(&body);
        zmq_msg_close(&id);
    }
}

/* ---- the decode side ---- */

static void fx_poll_rx(pd_loop_t *l, void *ud) {
    (void)l;
    fx_t *f = ud;
    kvt_event_t ev[16];
    if (!f->rx || f->is_rx_paused) return;
    int n = kvt_receiver_poll(f->rx, 0, ev, 16);
    CHECK(n >= 0);
    for (int i = 0; i < n; i++) {
        if (ev[i].kind == KVT_EV_FAILED) {
            f->n_rx_failed++;
            continue;
        }
        if (ev[i].kind != KVT_EV_COMMITTED || f->n_commits >= MAX_RECS) continue;
        commit_rec_t *c = &f->commits[f->n_commits++];
        c->req_id = ev[i].request_id;
        c->first_token = ev[i].first_token;
        c->n_tokens = ev[i].n_tokens;
        c->n_blocks = ev[i].n_blocks;
        REQUIRE(c->n_blocks <= 64 && ev[i].first_token_info_len <= sizeof c->info);
        memcpy(c->blocks, ev[i].block_ids, (size_t)c->n_blocks * sizeof(int32_t));
        c->info_len = ev[i].first_token_info_len;
        memcpy(c->info, ev[i].first_token_info, c->info_len);
    }
}

/* A receiver in the engine's layout with n_blocks blocks; fp_flip != 0 makes its fingerprint differ. */
static bool fx_open_rx(fx_t *f, int32_t n_blocks, uint64_t fp_flip) {
    char err[256];
    eng_kv_layout_t l = *eng_kv_layout(s_eng);
    l.n_blocks = n_blocks;
    if (!kts_init(&f->store, l)) return false;
    kvt_receiver_params_t rp = kvt_receiver_params_default();
    rp.endpoint = "tcp://127.0.0.1:0";
    pf_exec_fingerprint(s_eng, &rp.fingerprint);
    rp.fingerprint.tokenizer_hash ^= fp_flip;
    rp.layout = l;
    rp.store = kts_store(&f->store);
    f->rx = kvt_receiver_create(f->zctx, &rp, err, sizeof err);
    if (!f->rx) fprintf(stderr, "receiver: %s\n", err);
    return f->rx && pd_loop_add_socket(f->loop, kvt_receiver_socket(f->rx), fx_poll_rx, f) == PD_OK;
}

static pf_service_params_t fx_params(fx_t *f) {
    pf_service_params_t p = pf_service_params_default();
    p.eng = s_eng, p.loop = f->loop, p.zmq_ctx = f->zctx;
    p.router_endpoint = f->router_ep;
    p.worker_id = WORKER_ID;
    p.step_tokens = 32;
    p.chunk_tokens = 16;
    p.heartbeat_ivl_ms = 50;
    return p;
}

static void fx_on_registered(void *ud) {
    ((fx_t *)ud)->n_on_registered++;
}

/* Router, receiver (rx_blocks blocks, 0 = none) and the service with p (NULL: fx_params). */
static bool fx_init(fx_t *f, int32_t rx_blocks, const pf_service_params_t *p) {
    char err[256];
    memset(f, 0, sizeof *f);
    f->hb_ivl_ms = 50;
    f->loop = pd_loop_create();
    f->zctx = zmq_ctx_new();
    f->router = zmq_socket(f->zctx, ZMQ_ROUTER);
    int one = 1, zero = 0;
    zmq_setsockopt(f->router, ZMQ_ROUTER_MANDATORY, &one, sizeof one);
    zmq_setsockopt(f->router, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(f->router, "tcp://127.0.0.1:*") != 0) return false;
    size_t n = sizeof f->router_ep;
    zmq_getsockopt(f->router, ZMQ_LAST_ENDPOINT, f->router_ep, &n);
    if (pd_loop_add_socket(f->loop, f->router, fx_on_router, f) != PD_OK) return false;
    if (rx_blocks > 0 && !fx_open_rx(f, rx_blocks, 0)) return false;
    f->rx_timer = pd_loop_add_timer(f->loop, 1, true, fx_poll_rx, f);
    pf_service_params_t sp = p ? *p : fx_params(f);
    sp.loop = f->loop, sp.zmq_ctx = f->zctx, sp.router_endpoint = f->router_ep;
    sp.on_registered = fx_on_registered, sp.ud = f;
    f->svc = pf_service_create(&sp, err, sizeof err);
    if (!f->svc) fprintf(stderr, "service: %s\n", err);
    return f->svc != NULL;
}

/* Tears down; checks the engine's pool is full again and the receiver holds nothing it was not handed. */
static void fx_fini(fx_t *f) {
    if (f->svc) {
        pf_service_stats_t st;
        pf_service_stats(f->svc, &st);
        CHECK_EQ_INT(st.exec.n_requests, 0);
        CHECK_EQ_INT(st.exec.sched.n_free_blocks, st.exec.sched.n_blocks);
    }
    pf_service_destroy(&f->svc);
    CHECK_EQ_INT(eng_kv_pool_n_free(eng_kv_pool(s_eng)), eng_kv_pool_n_blocks(eng_kv_pool(s_eng)));
    for (int i = 0; i < f->n_commits; i++) kts_release(&f->store, f->commits[i].blocks, f->commits[i].n_blocks);
    if (f->rx) {
        pd_loop_remove_socket(f->loop, kvt_receiver_socket(f->rx));
        kvt_receiver_destroy(&f->rx);
        CHECK_EQ_INT(f->store.n_reserved, 0);
        CHECK_EQ_INT(f->store.n_bad, 0);
    }
    kts_fini(&f->store);
    pd_loop_remove_socket(f->loop, f->router);
    zmq_close(f->router);
    zmq_ctx_term(f->zctx);
    pd_loop_destroy(&f->loop);
}

static void fx_once(fx_t *f, int ms) {
    CHECK(pd_loop_run_once(f->loop, ms) == PD_OK);
}

/* Runs the loop until *flag counts at least want, or ms pass. */
static bool fx_run_until(fx_t *f, const int *counter, int want, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (*counter < want && pd_now_us() < end)
        if (pd_loop_run_once(f->loop, 5) != PD_OK) return false;
    return *counter >= want;
}

static void fx_run_for(fx_t *f, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (pd_now_us() < end) fx_once(f, 2);
}

/* Runs until the service holds nothing (every request ended, every transfer released). */
static bool fx_run_idle(fx_t *f, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    pf_service_stats_t st;
    do {
        fx_once(f, 2);
        pf_service_stats(f->svc, &st);
    } while ((st.exec.n_requests > 0 || st.exec.n_transfers > 0) && pd_now_us() < end);
    return st.exec.n_requests == 0 && st.exec.n_transfers == 0;
}

typedef struct {
    uint64_t id;
    const int32_t *prompt;
    int32_t n;
    float temperature, top_p;
    uint64_t seed;
    uint32_t logprobs, timeout_ms;
    const char *endpoint; /* NULL: the fixture's receiver */
} req_t;

static void fx_prefill(fx_t *f, const req_t *q) {
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    sp.temperature = q->temperature;
    sp.top_p = q->top_p;
    sp.seed = q->seed, sp.has_seed = true;
    sp.logprobs = q->logprobs;
    Pdserve__V1__PrefillRequest pr = PDSERVE__V1__PREFILL_REQUEST__INIT;
    pr.request_id = q->id;
    pr.prompt = (int32_t *)q->prompt;
    pr.n_prompt = (size_t)q->n;
    pr.sampling = &sp;
    pr.timeout_ms = q->timeout_ms ? q->timeout_ms : 300000; /* ASan on a shared machine is slow */
    pr.decode_worker_id = "decode-t";
    pr.decode_kv_endpoint = (char *)(q->endpoint ? q->endpoint : f->rx ? kvt_receiver_endpoint(f->rx) : "");
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_PREFILL;
    m.prefill = &pr;
    fx_send(f, &m);
}

static void fx_cancel(fx_t *f, uint64_t id) {
    Pdserve__V1__Cancel c = PDSERVE__V1__CANCEL__INIT;
    c.request_id = id;
    c.reason = PDSERVE__V1__ERROR_CODE__ERR_CANCELLED;
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL;
    m.cancel = &c;
    fx_send(f, &m);
}

static const fail_rec_t *fx_fail_of(const fx_t *f, uint64_t id) {
    for (int i = 0; i < f->n_fails; i++)
        if (f->fails[i].req_id == id) return &f->fails[i];
    return NULL;
}

static const commit_rec_t *fx_commit_of(const fx_t *f, uint64_t id) {
    for (int i = 0; i < f->n_commits; i++)
        if (f->commits[i].req_id == id) return &f->commits[i];
    return NULL;
}

static bool fx_register(fx_t *f) {
    return fx_run_until(f, &f->n_on_registered, 1, 5000) && fx_run_until(f, &f->n_heartbeat, 1, 2000);
}

/* Deterministic prompt from an LCG over the vocabulary. */
static void s_make_prompt(int32_t *dst, int n, uint32_t seed) {
    int32_t vocab = eng_config(s_eng)->vocab_size;
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        dst[i] = (int32_t)(seed >> 8) % (vocab - 100) + 50;
    }
}

/* ---- references ---- */

static eng_sampling_t s_sampling(const req_t *q) {
    eng_sampling_t sp = eng_sampling_default();
    sp.temperature = q->temperature;
    sp.top_p = q->top_p > 0 ? q->top_p : 1.0f;
    sp.seed = q->seed, sp.has_seed = true;
    sp.n_logprobs = (int32_t)q->logprobs;
    return sp;
}

/* The KV that landed for c equals, row for row, the engine's own for the prompt prefilled alone in one piece
 * (the CPU backend is batch- and chunk-invariant), and the first token and its logprobs in the commit info
 * are what the request's sampler draws from those logits. Call with the service idle. */
static void s_check_reference(fx_t *f, const commit_rec_t *c, const req_t *q) {
    eng_kv_pool_t *pool = eng_kv_pool(s_eng);
    const eng_kv_layout_t *l = eng_kv_layout(s_eng);
    int32_t vocab = eng_config(s_eng)->vocab_size, n = q->n, pos = 0;
    eng_kv_seq_t seq = {0};
    REQUIRE(eng_kv_seq_reserve(&seq, pool, l->block_size, n) == PD_OK);
    CHECK_EQ_INT(c->n_tokens, n);
    CHECK_EQ_INT(c->n_blocks, seq.n_blocks);
    float *logits = malloc((size_t)vocab * sizeof(float));
    uint8_t *ref = malloc(eng_kv_chunk_bytes(l));
    const int32_t *tables[1] = {seq.blocks};
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = tables,
                     .n_blocks = &seq.n_blocks,
                     .tokens = q->prompt,
                     .logits = logits};
    CHECK(eng_forward(s_eng, &b) == PD_OK);
    size_t row_bytes = (size_t)l->n_kv_heads * (size_t)l->head_dim * eng_kv_dtype_bytes(l->dtype);
    int n_diff = 0;
    for (int32_t blk = 0; blk < seq.n_blocks && blk < c->n_blocks; blk++) {
        int32_t rows = n - blk * l->block_size < l->block_size ? n - blk * l->block_size : l->block_size;
        for (int32_t layer = 0; layer < l->n_layers; layer++)
            for (int kind = 0; kind < 2; kind++) {
                CHECK(eng_kv_read_chunk(s_eng, layer, (eng_kv_kind_t)kind, seq.blocks[blk], ref) == PD_OK);
                const void *got = kts_chunk(&f->store, layer, (eng_kv_kind_t)kind, c->blocks[blk]);
                n_diff += memcmp(ref, got, (size_t)rows * row_bytes) != 0;
            }
    }
    CHECK_MSG(n_diff == 0, "req %llx: %d chunks differ from the reference", (unsigned long long)q->id, n_diff);

    eng_sampling_t sp = s_sampling(q);
    eng_sampler_t *smp = eng_sampler_create(&sp, vocab);
    eng_sample_result_t res;
    eng_sampler_add_prompt(smp, q->prompt, n);
    CHECK(eng_sampler_sample(smp, logits, &res) == PD_OK);
    CHECK_EQ_INT(c->first_token, res.token);
    Pdserve__V1__TokenLogprob *tl = pdserve__v1__token_logprob__unpack(NULL, c->info_len, c->info);
    CHECK(tl != NULL);
    if (tl) {
        CHECK_EQ_INT(tl->token, res.token);
        CHECK(tl->logprob == res.logprob);
        CHECK_EQ_INT(tl->n_top, res.n_top);
        for (size_t i = 0; i < tl->n_top && i < (size_t)res.n_top; i++) {
            CHECK_EQ_INT(tl->top[i]->token, res.top[i].token);
            CHECK(tl->top[i]->logprob == res.top[i].logprob);
        }
        pdserve__v1__token_logprob__free_unpacked(tl, NULL);
    }
    eng_sampler_destroy(&smp);
    eng_kv_seq_release(&seq, pool);
    eng_kv_seq_fini(&seq);
    free(logits);
    free(ref);
}

static void s_guard(pd_loop_t *l, void *ud) {
    *(bool *)ud = true;
    pd_loop_stop(l);
}

/* ---- cases ---- */

static void test_register_heartbeat(void) {
    fx_t f;
    REQUIRE(fx_init(&f, 0, NULL));
    CHECK(fx_register(&f));
    CHECK(pf_service_is_registered(f.svc));
    CHECK(fx_run_until(&f, &f.n_heartbeat, 5, 2000));
    CHECK_EQ_INT(f.hb_total_blocks, eng_kv_pool_n_blocks(eng_kv_pool(s_eng)));
    CHECK_EQ_INT(f.hb_free_blocks, f.hb_total_blocks);
    CHECK_EQ_INT(f.n_register, 1); /* answered heartbeats: no re-registration */
    CHECK_EQ_INT(f.n_on_registered, 1);
    fx_fini(&f);
}

static void test_register_refused(void) {
    fx_t f;
    bool is_guard = false;
    REQUIRE(fx_init(&f, 0, NULL));
    f.register_reply = PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE;
    int64_t g = pd_loop_add_timer(f.loop, 5000, false, s_guard, &is_guard);
    CHECK(pd_loop_run(f.loop) == PD_OK); /* the service stops it */
    pd_loop_cancel_timer(f.loop, g);
    CHECK(!is_guard);
    CHECK(pf_service_is_refused(f.svc));
    CHECK(!pf_service_is_registered(f.svc));
    CHECK_EQ_INT(f.n_on_registered, 0);
    fx_fini(&f);
}

static void test_kv_path(void) {
    fx_t f;
    int32_t a[37], b[70], c[5];
    s_make_prompt(a, 37, 1), s_make_prompt(b, 70, 2), s_make_prompt(c, 5, 3);
    req_t q[3] = {{.id = 0xa1, .prompt = a, .n = 37, .logprobs = 3},
                  {.id = 0xb2, .prompt = b, .n = 70, .temperature = 0.8f, .top_p = 0.9f, .seed = 7, .logprobs = 5},
                  {.id = 0xc3, .prompt = c, .n = 5}};
    REQUIRE(fx_init(&f, 32, NULL));
    REQUIRE(fx_register(&f));
    for (int i = 0; i < 3; i++) fx_prefill(&f, &q[i]);
    CHECK(fx_run_until(&f, &f.n_commits, 3, 120000));
    CHECK(fx_run_idle(&f, 30000));
    CHECK_EQ_INT(f.n_fails, 0);
    uint64_t bytes = 0;
    const eng_kv_layout_t *l = eng_kv_layout(s_eng);
    for (int i = 0; i < 3; i++) {
        const commit_rec_t *cr = fx_commit_of(&f, q[i].id);
        CHECK_MSG(cr != NULL, "req %llx not committed", (unsigned long long)q[i].id);
        if (cr) s_check_reference(&f, cr, &q[i]);
        bytes +=
            (uint64_t)eng_kv_blocks_for(q[i].n, l->block_size) * 2u * (uint64_t)l->n_layers * eng_kv_chunk_bytes(l);
    }
    pf_service_stats_t st;
    pf_service_stats(f.svc, &st);
    CHECK_EQ_INT(st.exec.kv_bytes_sent, bytes);
    CHECK_EQ_INT(st.exec.sched.n_sent_ok, 3);
    CHECK_EQ_INT(st.exec.n_senders, 1); /* one cached sender for the one decode endpoint */
    fx_fini(&f);
}

/* A prompt run in one long step streams: its transfer starts with the step and layers are marked ready while the
 * forward runs; what lands is still the reference. Cancelled in the middle of such a step, it ends with nothing
 * committed and every block back on both sides. With is_kv_stream off, the transfer starts after the step. Run
 * three ways: streamed through the shared pool (the receiver copies from the engine's own KV memory, which
 * main() put in shared memory), streamed over sockets, and unstreamed over sockets. */
static void test_kv_stream(void) {
    static int32_t a[200];
    s_make_prompt(a, 200, 8);
    const eng_kv_layout_t *l = eng_kv_layout(s_eng);
    REQUIRE(s_shm.base && s_shm.base == eng_kv_host_base(s_eng)); /* the engine took kv_host_alloc's memory */
    for (int run = 0; run < 3; run++) {
        bool is_stream = run < 2, is_shm = run == 0;
        fx_t f;
        memset(&f, 0, sizeof f);
        pf_service_params_t sp = fx_params(&f);
        sp.step_tokens = sp.chunk_tokens = 256; /* one step: long enough on the CPU for layers to stream */
        sp.is_kv_stream = is_stream;
        sp.kv_pool_shm_name = is_shm ? s_shm.name : NULL;
        REQUIRE(fx_init(&f, 32, &sp));
        REQUIRE(fx_register(&f));
        req_t q = {.id = 0x5a, .prompt = a, .n = 200, .logprobs = 2};
        fx_prefill(&f, &q);
        CHECK(fx_run_until(&f, &f.n_commits, 1, 120000));
        CHECK(fx_run_idle(&f, 30000));
        const commit_rec_t *cr = fx_commit_of(&f, q.id);
        CHECK(cr != NULL);
        if (cr) s_check_reference(&f, cr, &q);
        pf_service_stats_t st;
        pf_service_stats(f.svc, &st);
        CHECK_EQ_INT(st.exec.n_streamed, is_stream ? 1 : 0);
        if (is_stream)
            CHECK_MSG(st.exec.n_layers_early > 0, "no layer was marked ready during the step");
        else
            CHECK_EQ_INT(st.exec.n_layers_early, 0);
        CHECK_EQ_INT(st.exec.kv_bytes_sent, (uint64_t)eng_kv_blocks_for(200, l->block_size) * 2u *
                                                (uint64_t)l->n_layers * eng_kv_chunk_bytes(l));
        CHECK_EQ_INT(st.exec.sched.n_sent_ok, 1);
        CHECK_EQ_INT(st.exec.n_kv_tails, 1);
        kvt_stats_t rs;
        kvt_receiver_stats(f.rx, &rs);
        CHECK_EQ_INT(rs.shm_payload_bytes, is_shm ? rs.payload_bytes : 0);
        CHECK_EQ_INT(st.exec.kv_bytes_shm, rs.shm_payload_bytes);
        CHECK(rs.payload_bytes > 0);

        /* cancelled while its step runs, with its transfer live */
        req_t q2 = {.id = 0x5b, .prompt = a, .n = 200};
        fx_prefill(&f, &q2);
        uint64_t end = pd_now_us() + 60000000u;
        do {
            fx_once(&f, 1);
            pf_service_stats(f.svc, &st);
        } while (!(st.exec.sched.n_prefilling == 1 && st.exec.n_transfers == (is_stream ? 1 : 0)) && pd_now_us() < end);
        CHECK_EQ_INT(st.exec.sched.n_prefilling, 1);
        fx_cancel(&f, q2.id);
        CHECK(fx_run_idle(&f, 30000));
        fx_run_for(&f, 300); /* the receiver learns of the cancel and frees its reservation */
        CHECK_EQ_INT(f.n_commits, 1);
        CHECK_EQ_INT(f.n_fails, 0);
        CHECK_EQ_INT(f.store.n_reserved, cr ? cr->n_blocks : 0); /* only the committed request's */
        pf_service_stats(f.svc, &st);
        CHECK_EQ_INT(st.exec.sched.n_cancelled, 1);
        fx_fini(&f);
    }
}

static void test_refusals(void) {
    fx_t f;
    int32_t p[40], bad[3] = {1, 70000, 2};
    static int32_t big[1100];
    s_make_prompt(p, 40, 4), s_make_prompt(big, 1100, 5);
    REQUIRE(fx_init(&f, 32, NULL));
    REQUIRE(fx_register(&f));
    req_t q_sampling = {.id = 1, .prompt = p, .n = 40, .top_p = 1.5f};
    req_t q_token = {.id = 2, .prompt = bad, .n = 3};
    req_t q_endpoint = {.id = 3, .prompt = p, .n = 40, .endpoint = "nonsense"};
    req_t q_empty = {.id = 4, .prompt = p, .n = 0};
    req_t q_big = {.id = 5, .prompt = big, .n = 1100}; /* more blocks than the whole pool */
    req_t q_ok = {.id = 6, .prompt = p, .n = 40}, q_dup = q_ok;
    fx_prefill(&f, &q_sampling), fx_prefill(&f, &q_token), fx_prefill(&f, &q_endpoint);
    fx_prefill(&f, &q_empty), fx_prefill(&f, &q_big), fx_prefill(&f, &q_ok), fx_prefill(&f, &q_dup);
    Pdserve__V1__DecodeRequest dr = PDSERVE__V1__DECODE_REQUEST__INIT;
    dr.request_id = 7;
    Pdserve__V1__RouterToWorker m = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    m.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE;
    m.decode = &dr;
    fx_send(&f, &m);
    CHECK(fx_run_until(&f, &f.n_fails, 7, 5000));
    CHECK(fx_run_until(&f, &f.n_commits, 1, 120000));
    CHECK(fx_run_idle(&f, 30000));
    const struct {
        uint64_t id;
        Pdserve__V1__ErrorCode code;
        const char *text;
    } want[] = {{1, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "top_p"},
                {2, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "70000 at 1 out of range"},
                {3, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "decode_kv_endpoint"},
                {4, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "prompt"},
                {5, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "KV blocks"},
                {6, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "duplicate"},
                {7, PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL, "DecodeRequest"}};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        const fail_rec_t *r = fx_fail_of(&f, want[i].id);
        CHECK_MSG(r && r->code == want[i].code && strstr(r->msg, want[i].text), "req %llu: %s %s",
                  (unsigned long long)want[i].id, r ? pb_error_code_name(r->code) : "no reply", r ? r->msg : "");
    }
    CHECK_EQ_INT(f.n_fails, 7);
    CHECK(fx_commit_of(&f, 6) != NULL); /* the first of the duplicates went through */
    fx_fini(&f);
}

static void test_queue_full(void) {
    fx_t f;
    static int32_t p[5][48];
    pf_service_params_t sp;
    memset(&f, 0, sizeof f);
    sp = fx_params(&f); /* loop and endpoints are filled by fx_init */
    sp.max_queued = 1;
    REQUIRE(fx_init(&f, 48, &sp));
    REQUIRE(fx_register(&f));
    for (int i = 0; i < 5; i++) {
        s_make_prompt(p[i], 48, 10 + (uint32_t)i);
        req_t q = {.id = 100 + (uint64_t)i, .prompt = p[i], .n = 48};
        fx_prefill(&f, &q);
    }
    int done = 0;
    uint64_t end = pd_now_us() + 120000000u;
    while ((done = f.n_fails + f.n_commits) < 5 && pd_now_us() < end) fx_once(&f, 5);
    CHECK_EQ_INT(done, 5);
    CHECK(f.n_fails >= 1 && f.n_commits >= 2);
    for (int i = 0; i < f.n_fails; i++) {
        CHECK_EQ_INT(f.fails[i].code, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
        CHECK_MSG(strcmp(f.fails[i].msg, "prefill queue full (1 queued)") == 0, "%s", f.fails[i].msg);
    }
    CHECK(fx_run_idle(&f, 30000));
    fx_fini(&f);
}

static void test_decode_full(void) {
    fx_t f;
    int32_t p[40], held[6];
    s_make_prompt(p, 40, 20);
    REQUIRE(fx_init(&f, 8, NULL));
    REQUIRE(fx_register(&f));
    REQUIRE(kts_reserve(&f.store, 6, held) == PD_OK); /* 2 of 8 blocks left: 40 tokens need 3 */
    req_t q = {.id = 0xf1, .prompt = p, .n = 40};
    fx_prefill(&f, &q);
    CHECK(fx_run_until(&f, &f.n_fails, 1, 60000));
    CHECK(fx_run_idle(&f, 30000));
    CHECK_EQ_INT(f.fails[0].code, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    CHECK_MSG(strstr(f.fails[0].msg, "decode worker decode-t has no KV capacity") != NULL, "%s", f.fails[0].msg);
    kts_release(&f.store, held, 6);
    fx_fini(&f);
}

static void test_incompatible_decode(void) {
    fx_t f;
    int32_t p[20];
    s_make_prompt(p, 20, 30);
    REQUIRE(fx_init(&f, 0, NULL));
    REQUIRE(fx_open_rx(&f, 16, 1)); /* another tokenizer */
    REQUIRE(fx_register(&f));
    for (uint64_t i = 0; i < 2; i++) {
        req_t q = {.id = 0x1c0 + i, .prompt = p, .n = 20};
        fx_prefill(&f, &q);
    }
    CHECK(fx_run_until(&f, &f.n_fails, 2, 60000));
    CHECK(fx_run_idle(&f, 30000));
    for (int i = 0; i < f.n_fails; i++) {
        CHECK_EQ_INT(f.fails[i].code, PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE);
        CHECK_MSG(strstr(f.fails[i].msg, "refused the handshake") && strstr(f.fails[i].msg, "tokenizer_hash"), "%s",
                  f.fails[i].msg);
    }
    pf_service_stats_t st;
    pf_service_stats(f.svc, &st);
    CHECK_EQ_INT(st.exec.n_senders, 0); /* dropped: a later request handshakes again */
    CHECK_EQ_INT(f.n_commits, 0);
    fx_fini(&f);
}

static void test_dead_decode(void) {
    fx_t f;
    int32_t p[20];
    s_make_prompt(p, 20, 40);
    REQUIRE(fx_init(&f, 0, NULL));
    REQUIRE(fx_register(&f));
    req_t q = {.id = 0xdead, .prompt = p, .n = 20, .timeout_ms = 600, .endpoint = "tcp://127.0.0.1:1"};
    fx_prefill(&f, &q);
    CHECK(fx_run_until(&f, &f.n_fails, 1, 60000));
    CHECK(fx_run_idle(&f, 30000));
    CHECK_EQ_INT(f.fails[0].code, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    fx_fini(&f);
}

/* Runs until the service has a transfer out and nothing left to prefill. */
static bool fx_run_until_sending(fx_t *f, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    pf_service_stats_t st;
    do {
        fx_once(f, 2);
        pf_service_stats(f->svc, &st);
    } while (!(st.exec.n_transfers > 0 && st.exec.sched.n_queued + st.exec.sched.n_prefilling == 0) &&
             pd_now_us() < end);
    return st.exec.n_transfers > 0;
}

static void test_cancel(void) {
    fx_t f;
    int32_t p[60];
    s_make_prompt(p, 60, 50);
    REQUIRE(fx_init(&f, 16, NULL));
    REQUIRE(fx_register(&f));
    /* queued or in the running step */
    req_t q1 = {.id = 0xc1, .prompt = p, .n = 60};
    fx_prefill(&f, &q1);
    fx_cancel(&f, 0xc1);
    fx_cancel(&f, 0x999); /* unknown: ignored */
    CHECK(fx_run_idle(&f, 30000));
    /* sending, the decode side stalled: the transfer is cancelled and its blocks come back at RELEASED */
    f.is_rx_paused = true;
    req_t q2 = {.id = 0xc2, .prompt = p, .n = 60};
    fx_prefill(&f, &q2);
    CHECK(fx_run_until_sending(&f, 60000));
    fx_cancel(&f, 0xc2);
    CHECK(fx_run_idle(&f, 30000));
    f.is_rx_paused = false;
    fx_run_for(&f, 300); /* the receiver learns of the cancel and frees its reservation */
    CHECK_EQ_INT(f.n_fails, 0);
    CHECK_EQ_INT(f.n_commits, 0);
    pf_service_stats_t st;
    pf_service_stats(f.svc, &st);
    CHECK_EQ_INT(st.exec.sched.n_cancelled, 2);
    fx_fini(&f);
}

static void test_deadline_in_queue(void) {
    fx_t f;
    static int32_t a[96], b[40];
    s_make_prompt(a, 96, 60), s_make_prompt(b, 40, 61);
    REQUIRE(fx_init(&f, 32, NULL));
    REQUIRE(fx_register(&f));
    req_t qa = {.id = 0xa, .prompt = a, .n = 96}, qb = {.id = 0xb, .prompt = b, .n = 40, .timeout_ms = 1};
    fx_prefill(&f, &qa);
    fx_prefill(&f, &qb);
    CHECK(fx_run_until(&f, &f.n_commits, 1, 120000));
    CHECK(fx_run_idle(&f, 30000));
    const fail_rec_t *r = fx_fail_of(&f, 0xb);
    CHECK(r && r->code == PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    CHECK(fx_commit_of(&f, 0xa) != NULL);
    fx_fini(&f);
}

static void test_router_lost(void) {
    fx_t f;
    int32_t p[30];
    s_make_prompt(p, 30, 70);
    REQUIRE(fx_init(&f, 16, NULL));
    REQUIRE(fx_register(&f));
    f.is_rx_paused = true; /* the request sits in SENDING */
    req_t q = {.id = 0x10, .prompt = p, .n = 30};
    fx_prefill(&f, &q);
    CHECK(fx_run_until_sending(&f, 60000));
    f.is_router_mute = true;
    CHECK(fx_run_until(&f, &f.n_register, 2, 2000)); /* silent 5 intervals: registers again */
    CHECK(pf_service_is_registered(f.svc));
    fx_run_for(&f, 600); /* silent 10 intervals: gone, everything cancelled */
    CHECK(!pf_service_is_registered(f.svc));
    CHECK(fx_run_idle(&f, 5000));
    CHECK_EQ_INT(f.n_fails, 0); /* nobody to tell */
    f.is_router_mute = false;
    CHECK(fx_run_until(&f, &f.n_on_registered, 2, 5000)); /* back: registered again */
    CHECK(pf_service_is_registered(f.svc));
    f.is_rx_paused = false;
    fx_run_for(&f, 300);
    CHECK_EQ_INT(f.n_commits, 0);
    fx_fini(&f);
}

/* The worker's own loop held up for 20 heartbeat intervals (a long handler, a starved CPU) is not the router's
 * silence: the router answers once heartbeats flow again, and nothing is cancelled. */
static void test_stalled_loop_keeps_router(void) {
    fx_t f;
    int32_t p[30];
    s_make_prompt(p, 30, 71);
    REQUIRE(fx_init(&f, 16, NULL));
    REQUIRE(fx_register(&f));
    f.is_rx_paused = true; /* the request sits in SENDING */
    req_t q = {.id = 0x11, .prompt = p, .n = 30};
    fx_prefill(&f, &q);
    CHECK(fx_run_until_sending(&f, 60000));
    nanosleep(&(struct timespec){.tv_sec = 1}, NULL); /* 20 intervals of 50 ms */
    fx_run_for(&f, 300);
    CHECK(pf_service_is_registered(f.svc));
    CHECK_EQ_INT(f.n_register, 1);
    CHECK_EQ_INT(f.n_fails, 0);
    f.is_rx_paused = false;
    CHECK(fx_run_until(&f, &f.n_commits, 1, 60000)); /* the transfer went on */
    CHECK(fx_run_idle(&f, 5000));
    fx_fini(&f);
}

static void test_drain(void) {
    fx_t f;
    int32_t p[100];
    bool is_guard = false;
    s_make_prompt(p, 100, 80);
    REQUIRE(fx_init(&f, 16, NULL));
    REQUIRE(fx_register(&f));
    req_t qa = {.id = 0xd1, .prompt = p, .n = 100}, qb = {.id = 0xd2, .prompt = p, .n = 100};
    fx_prefill(&f, &qa);
    pf_service_stats_t st;
    uint64_t end = pd_now_us() + 5000000u;
    do {
        fx_once(&f, 2);
        pf_service_stats(f.svc, &st);
    } while (st.n_requests < 1 && pd_now_us() < end);
    pf_service_drain(f.svc);
    fx_prefill(&f, &qb);
    int64_t g = pd_loop_add_timer(f.loop, 120000, false, s_guard, &is_guard);
    CHECK(pd_loop_run(f.loop) == PD_OK); /* returns once drained */
    pd_loop_cancel_timer(f.loop, g);
    CHECK(!is_guard);
    CHECK(fx_commit_of(&f, 0xd1) != NULL); /* in flight: finished */
    const fail_rec_t *r = fx_fail_of(&f, 0xd2);
    CHECK(r && r->code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE && strcmp(r->msg, "draining") == 0);
    fx_fini(&f);
}

int main(void) {
    pd_log_init("test_pf_service", PD_LOG_WARN);
    char err[256];
    eng_params_t ep = eng_params_default();
    ep.model_path = pd_test_model_path();
    ep.n_threads = 2;
    ep.kv_n_blocks = 64;
    ep.kv_host_alloc = kvt_shm_alloc, ep.kv_host_free = kvt_shm_free, ep.kv_host_ctx = &s_shm;
    s_eng = eng_create(&ep, err, sizeof err);
    if (!s_eng) {
        fprintf(stderr, "engine: %s\n", err);
        return 1;
    }
    PD_TEST_RUN(test_register_heartbeat);
    PD_TEST_RUN(test_register_refused);
    PD_TEST_RUN(test_kv_path);
    PD_TEST_RUN(test_kv_stream);
    PD_TEST_RUN(test_refusals);
    PD_TEST_RUN(test_queue_full);
    PD_TEST_RUN(test_decode_full);
    PD_TEST_RUN(test_incompatible_decode);
    PD_TEST_RUN(test_dead_decode);
    PD_TEST_RUN(test_cancel);
    PD_TEST_RUN(test_deadline_in_queue);
    PD_TEST_RUN(test_router_lost);
    PD_TEST_RUN(test_stalled_loop_keeps_router);
    PD_TEST_RUN(test_drain);
    eng_destroy(&s_eng);
    return pd_test_finish();
}
