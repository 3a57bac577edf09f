/* test_rt_core.c: rt_core on a real pd_loop against scripted DEALER workers (real ZeroMQ on loopback, the real
 * model file for the tokenizer): registration and fingerprints, dispatch choices, reservation refusals, chunk
 * relay (seed, usage), failures (prefill, deadline, lost worker, the router's own stall), abandon, admission
 * errors, metrics. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <time.h>

#include "rt_openai.h"
#include "unit/router/rt_test_env.h"

#define ROLE_P       PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL
#define ROLE_D       PDSERVE__V1__WORKER_ROLE__ROLE_DECODE
#define BODY_DECODE  PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE
#define BODY_PREFILL PDSERVE__V1__ROUTER_TO_WORKER__BODY_PREFILL
#define BODY_CANCEL  PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL
#define BODY_REG     PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED

static void s_free(Pdserve__V1__RouterToWorker **m) {
    pb_free((ProtobufCMessage **)m, NULL);
}

/* Expects a refusal naming field in its message. */
static void s_expect_refused(rt_env_t *e, const char *id, const Pdserve__V1__Fingerprint *fp, const char *field) {
    rt_worker_sim_t w;
    rt_worker_open(e, &w, id);
    rt_worker_register_fp(&w, ROLE_D, fp);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(e, &w, BODY_REG, 2000);
    CHECK(m && m->registered->error);
    if (m && m->registered->error) {
        CHECK_EQ_INT(m->registered->error->code, PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE);
        CHECK_MSG(strstr(m->registered->error->message, field), "%s", m->registered->error->message);
    }
    s_free(&m);
    rt_worker_close(&w);
}

static void test_registration(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    REQUIRE(rt_env_init(&e, &p));
    CHECK(!rt_core_is_ready(e.core));
    CHECK_EQ_INT(rt_core_max_context(e.core), 8192);
    /* served id by default: the model file's name up to its first dot (general.name stays the fingerprint's) */
    const char *base = strrchr(pd_test_model_path(), '/');
    base = base ? base + 1 : pd_test_model_path();
    CHECK(strncmp(rt_core_model_id(e.core), base, strcspn(base, ".")) == 0);
    CHECK_EQ_INT(strlen(rt_core_model_id(e.core)), strcspn(base, "."));
    CHECK(strcmp(rt_core_model_id(e.core), e.model_id) != 0);
    rt_worker_sim_t d, pf;
    rt_worker_open(&e, &d, "decode-0");
    rt_worker_open(&e, &pf, "prefill-0");
    CHECK(rt_worker_register(&e, &d, ROLE_D)); /* the router's GGUF reading agrees with eng_model's */
    CHECK(!rt_core_is_ready(e.core));
    CHECK(rt_worker_register(&e, &pf, ROLE_P));
    CHECK(rt_core_is_ready(e.core));
    /* heartbeats are acknowledged (workers re-register after 5 silent intervals) */
    rt_worker_heartbeat(&d, ROLE_D, 100, 0);
    Pdserve__V1__RouterToWorker *m = rt_worker_recv(&e, &d, 1000);
    CHECK(m && m->body_case == BODY_REG && !m->registered->error && m->registered->heartbeat_ivl_ms == 50);
    s_free(&m);
    Pdserve__V1__Fingerprint fp = e.fp;
    fp.model_id = "another-model";
    s_expect_refused(&e, "bad-model", &fp, "field model_id: yours 'another-model'");
    fp = e.fp;
    fp.tokenizer_hash ^= 1;
    s_expect_refused(&e, "bad-tok", &fp, "field tokenizer_hash");
    fp = e.fp;
    fp.weights_hash ^= 1; /* the first worker's weights are the cluster's */
    s_expect_refused(&e, "bad-weights", &fp, "field weights_hash");
    fp = e.fp;
    fp.block_size = 32;
    s_expect_refused(&e, "bad-block", &fp, "field block_size: yours 32, cluster 16");
    fp = e.fp;
    fp.n_kv_heads += 1;
    s_expect_refused(&e, "bad-heads", &fp, "field n_kv_heads");
    fp = e.fp;
    fp.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16; /* dtypes may differ: converted on receipt */
    rt_worker_sim_t d2;
    rt_worker_open(&e, &d2, "decode-bf16");
    rt_worker_register_fp(&d2, ROLE_D, &fp);
    m = rt_worker_expect(&e, &d2, BODY_REG, 2000);
    CHECK(m && !m->registered->error);
    s_free(&m);
    rt_worker_close(&d2);
    /* a DEALER without ROUTING_ID (ZeroMQ makes one up, binary) is told why it is refused */
    rt_worker_sim_t anon = {.id = "ghost", .kv = "tcp://127.0.0.1:7000"};
    anon.sock = zmq_socket(e.zmq, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(anon.sock, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(anon.sock, rt_core_control_endpoint(e.core));
    rt_worker_register_fp(&anon, ROLE_D, &e.fp);
    m = rt_worker_expect(&e, &anon, BODY_REG, 2000);
    CHECK(m && m->registered->error && m->registered->error->code == PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL);
    CHECK(m && m->registered->error && strstr(m->registered->error->message, "routing id"));
    s_free(&m);
    rt_worker_close(&anon);
    rt_worker_close(&d);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

/* Two decode workers, one prefill: the one with the most free blocks (minus what was sent since) gets it, then
 * the prefill worker gets the prompt with the decode worker's KV endpoint; chunks come back with seed and usage. */
static void test_dispatch_and_relay(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_sim_t d0, d1, pf;
    rt_worker_open(&e, &d0, "decode-0");
    rt_worker_open(&e, &d1, "decode-1");
    rt_worker_open(&e, &pf, "prefill-0");
    REQUIRE(rt_worker_register(&e, &d0, ROLE_D) && rt_worker_register(&e, &d1, ROLE_D) &&
            rt_worker_register(&e, &pf, ROLE_P));
    rt_worker_heartbeat(&d0, ROLE_D, 400, 0);
    rt_worker_heartbeat(&d1, ROLE_D, 900, 0);
    rt_env_pump(&e, 50);
    rt_front_t f = {0};
    REQUIRE(rt_submit(&e, &f, rt_text_request("Hello there", 0, 0)));
    uint64_t id = rt_req_id(f.req);
    uint32_t n_prompt = rt_req_prompt_tokens(f.req);
    CHECK(n_prompt >= 2);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&e, &d1, BODY_DECODE, 2000);
    REQUIRE(m);
    const Pdserve__V1__DecodeRequest *dr = m->decode;
    CHECK(dr->request_id == id);
    CHECK_EQ_INT(dr->n_prompt, n_prompt);
    CHECK_EQ_INT(dr->max_tokens, 8192 - n_prompt); /* 0 = the rest of the context */
    CHECK(dr->sampling && dr->sampling->has_seed && dr->sampling->temperature == 0.7f);
    uint64_t seed = dr->sampling ? dr->sampling->seed : 0;
    CHECK(dr->timeout_ms > 590000 && dr->timeout_ms <= 600000);
    CHECK(!dr->prefill_locally);
    s_free(&m);
    rt_worker_reserved(&d1, id, PDSERVE__V1__ERROR_CODE__ERR_NONE);
    m = rt_worker_expect(&e, &pf, BODY_PREFILL, 2000);
    REQUIRE(m);
    CHECK(m->prefill->request_id == id && m->prefill->n_prompt == n_prompt);
    CHECK(strcmp(m->prefill->decode_kv_endpoint, d1.kv) == 0 && strcmp(m->prefill->decode_worker_id, "decode-1") == 0);
    CHECK(m->prefill->sampling && m->prefill->sampling->seed == seed && m->prefill->sampling->has_seed);
    s_free(&m);
    /* d1 now carries ceil(8192 / 16) = 512 blocks of estimate: 900 - 512 < 400, so the next goes to d0 */
    rt_front_t f2 = {0};
    REQUIRE(rt_submit(&e, &f2, rt_text_request("Another one", 10, 0)));
    m = rt_worker_expect(&e, &d0, BODY_DECODE, 2000);
    CHECK(m && m->decode->request_id == rt_req_id(f2.req) && m->decode->max_tokens == 10);
    s_free(&m);
    rt_core_abandon(e.core, f2.req);
    m = rt_worker_expect(&e, &d0, BODY_CANCEL, 2000);
    CHECK(m && m->cancel->reason == PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    s_free(&m);
    /* chunks: the first gets the seed, the last usage */
    rt_worker_chunk(&d1, id, 42, "Hi", PDSERVE__V1__FINISH_REASON__FINISH_NONE);
    rt_worker_chunk(&d1, id, 43, "!", PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    for (int i = 0; i < 500 && !f.is_done; i++) rt_env_pump(&e, 2);
    REQUIRE(f.is_done && f.n == 2);
    CHECK(f.chunks[0]->request_id == id && f.chunks[0]->seed == seed && f.chunks[0]->token_ids[0] == 42);
    CHECK(strcmp(f.chunks[0]->text, "Hi") == 0);
    const Pdserve__V1__ResponseChunk *last = rt_front_last(&f);
    CHECK(last->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_STOP && last->usage);
    CHECK(last->usage && last->usage->prompt_tokens == n_prompt && last->usage->completion_tokens == 2);
    CHECK_EQ_INT(rt_core_n_inflight(e.core), 0);
    /* a late chunk of the ended request is ignored */
    rt_worker_chunk(&d1, id, 44, "?", PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    rt_env_pump(&e, 30);
    CHECK(f.n == 2);
    size_t len = 0;
    char *text = rt_core_metrics(e.core, &len);
    REQUIRE(text);
    CHECK(strlen(text) == len);
    CHECK(strstr(text, "pdserve_requests_total{outcome=\"stop\"} 1\n"));
    CHECK(strstr(text, "pdserve_requests_total{outcome=\"cancelled\"} 1\n"));
    CHECK(strstr(text, "pdserve_router_late_messages_total 1\n"));
    CHECK(strstr(text, "pdserve_ttft_seconds_count 1\n") && strstr(text, "pdserve_itl_seconds_count 1\n"));
    CHECK(strstr(text, "pdserve_ttft_seconds_bucket{le=\"+Inf\"} 1\n"));
    CHECK(strstr(text, "pdserve_requests_inflight 0\n"));
    CHECK(strstr(text, "pdserve_workers{role=\"decode\",state=\"alive\"} 2\n"));
    CHECK(strstr(text, "pdserve_workers{role=\"prefill\",state=\"alive\"} 1\n"));
    CHECK(strstr(text, "pdserve_worker_kv_blocks_free{worker=\"decode-1\",role=\"decode\"} 900\n"));
    CHECK(strstr(text, "pdserve_worker_kv_blocks_total{worker=\"decode-0\",role=\"decode\"} 1000\n"));
    CHECK(strstr(text, "pdserve_worker_queue_depth{worker=\"prefill-0\",role=\"prefill\"} 0\n"));
    CHECK(strstr(text, "# TYPE pdserve_worker_kv_bytes_sent_total counter\n"));
    CHECK(strstr(text, "pdserve_worker_kv_bytes_received_total{worker=\"decode-0\",role=\"decode\"} 0\n"));
    CHECK(strstr(text, "pdserve_worker_running_seqs{"));
    CHECK(strstr(text, "pdserve_request_errors_total{code=\"ERR_DEADLINE_EXCEEDED\"} 0\n"));
    free(text);
    rt_front_fini(&f);
    rt_front_fini(&f2);
    rt_worker_close(&d0);
    rt_worker_close(&d1);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

/* decode-0 and prefill-0, both registered. */
static bool s_two_workers(rt_env_t *e, rt_worker_sim_t *d, rt_worker_sim_t *pf) {
    rt_worker_open(e, d, "decode-0");
    rt_worker_open(e, pf, "prefill-0");
    return rt_worker_register(e, d, ROLE_D) && rt_worker_register(e, pf, ROLE_P);
}

/* Short prompts stay on the decode worker; so does everything when no prefill worker is wanted. */
static void test_local_prefill(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    p.local_prefill_tokens = 8;
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_sim_t d, pf;
    REQUIRE(s_two_workers(&e, &d, &pf));
    rt_front_t f = {0}, f2 = {0};
    REQUIRE(rt_submit(&e, &f, rt_text_request("Hi", 4, 0)));
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&e, &d, BODY_DECODE, 2000);
    CHECK(m && m->decode->prefill_locally);
    s_free(&m);
    rt_worker_reserved(&d, rt_req_id(f.req), PDSERVE__V1__ERROR_CODE__ERR_NONE);
    CHECK(rt_worker_expect(&e, &pf, BODY_PREFILL, 150) == NULL); /* nothing for the prefill worker */
    rt_worker_chunk(&d, rt_req_id(f.req), 7, "x", PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    for (int i = 0; i < 500 && !f.is_done; i++) rt_env_pump(&e, 2);
    CHECK(f.is_done && rt_front_last(&f)->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    /* a long prompt goes through the prefill worker */
    REQUIRE(rt_submit(&e, &f2, rt_text_request("This prompt is certainly longer than eight tokens, is it not?", 4, 0)));
    m = rt_worker_expect(&e, &d, BODY_DECODE, 2000);
    CHECK(m && !m->decode->prefill_locally);
    s_free(&m);
    rt_core_abandon(e.core, f2.req);
    rt_front_fini(&f);
    rt_front_fini(&f2);
    rt_worker_close(&d);
    rt_worker_close(&pf);
    rt_env_fini(&e);

    p = rt_env_params();
    p.min_prefill_workers = 0;
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_open(&e, &d, "decode-0");
    REQUIRE(rt_worker_register(&e, &d, ROLE_D));
    CHECK(rt_core_is_ready(e.core));
    rt_front_t f3 = {0};
    REQUIRE(
        rt_submit(&e, &f3, rt_text_request("A prompt that is not short at all, but there is no prefill worker", 4, 0)));
    m = rt_worker_expect(&e, &d, BODY_DECODE, 2000);
    CHECK(m && m->decode->prefill_locally);
    s_free(&m);
    rt_core_abandon(e.core, f3.req);
    rt_worker_close(&d);
    rt_env_fini(&e);
}

/* ERR_RESOURCE_EXHAUSTED from every decode worker, each asked once -> the request fails with it. */
static void test_reserve_refused(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_sim_t d0, d1, pf;
    rt_worker_open(&e, &d0, "decode-0");
    rt_worker_open(&e, &d1, "decode-1");
    rt_worker_open(&e, &pf, "prefill-0");
    REQUIRE(rt_worker_register(&e, &d0, ROLE_D) && rt_worker_register(&e, &d1, ROLE_D) &&
            rt_worker_register(&e, &pf, ROLE_P));
    rt_worker_heartbeat(&d0, ROLE_D, 500, 0);
    rt_worker_heartbeat(&d1, ROLE_D, 100, 0);
    rt_env_pump(&e, 50);
    rt_front_t f = {0};
    REQUIRE(rt_submit(&e, &f, rt_text_request("Hello", 16, 0)));
    uint64_t id = rt_req_id(f.req);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&e, &d0, BODY_DECODE, 2000);
    CHECK(m && m->decode->request_id == id);
    s_free(&m);
    rt_worker_reserved(&d0, id, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    m = rt_worker_expect(&e, &d1, BODY_DECODE, 2000);
    CHECK(m && m->decode->request_id == id);
    s_free(&m);
    rt_worker_reserved(&d1, id, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    for (int i = 0; i < 500 && !f.is_done; i++) rt_env_pump(&e, 2);
    REQUIRE(f.is_done && f.n == 1);
    const Pdserve__V1__ResponseChunk *c = rt_front_last(&f);
    CHECK(c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR && c->error);
    CHECK(c->error && c->error->code == PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED);
    CHECK(c->error && strcmp(c->error->message, "no decode worker has KV capacity") == 0);
    CHECK(rt_worker_expect(&e, &d0, BODY_DECODE, 100) == NULL); /* nobody asked twice */
    CHECK(rt_worker_expect(&e, &pf, BODY_PREFILL, 10) == NULL);
    rt_front_fini(&f);
    rt_worker_close(&d0);
    rt_worker_close(&d1);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

/* A running request with decode d and prefill pf; returns its id. */
static uint64_t s_running(rt_env_t *e, rt_worker_sim_t *d, rt_worker_sim_t *pf, rt_front_t *f, uint32_t timeout_ms) {
    rt_worker_heartbeat(d, ROLE_D, 100, 0); /* both stay in rotation (worker_timeout is short here) */
    rt_worker_heartbeat(pf, ROLE_P, 100, 0);
    if (!rt_submit(e, f, rt_text_request("Tell me a story", 32, timeout_ms))) return 0;
    uint64_t id = rt_req_id(f->req);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(e, d, BODY_DECODE, 2000);
    CHECK(m != NULL);
    s_free(&m);
    rt_worker_reserved(d, id, PDSERVE__V1__ERROR_CODE__ERR_NONE);
    m = rt_worker_expect(e, pf, BODY_PREFILL, 2000);
    CHECK(m != NULL);
    s_free(&m);
    return id;
}

static void s_expect_cancel(rt_env_t *e, rt_worker_sim_t *w, uint64_t id, Pdserve__V1__ErrorCode reason) {
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(e, w, BODY_CANCEL, 2000);
    CHECK_MSG(m && m->cancel->request_id == id && m->cancel->reason == reason, "cancel to %s", w->id);
    s_free(&m);
}

static void s_expect_error(rt_env_t *e, rt_front_t *f, Pdserve__V1__ErrorCode code, const char *text) {
    for (int i = 0; i < 1000 && !f->is_done; i++) rt_env_pump(e, 2);
    const Pdserve__V1__ResponseChunk *c = rt_front_last(f);
    CHECK(f->is_done && c && c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR);
    if (!c || !c->error) return;
    CHECK_MSG(c->error->code == code, "%s", pb_error_code_name(c->error->code));
    CHECK_MSG(strstr(c->error->message, text), "%s", c->error->message);
    CHECK(c->usage && c->usage->prompt_tokens > 0);
}

static void test_failures(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    p.worker_timeout_ms = 400;
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_sim_t d, pf;
    REQUIRE(s_two_workers(&e, &d, &pf));

    /* the prefill worker fails it: its error reaches the client, the decode worker frees its blocks */
    rt_front_t f = {0};
    uint64_t id = s_running(&e, &d, &pf, &f, 0);
    rt_worker_failed(&pf, id, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "prefill queue full (256 queued)");
    s_expect_error(&e, &f, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "prefill queue full");
    s_expect_cancel(&e, &d, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    rt_front_fini(&f);

    /* deadline: both workers are told */
    rt_front_t f2 = {0};
    id = s_running(&e, &d, &pf, &f2, 150);
    s_expect_error(&e, &f2, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, "deadline exceeded");
    s_expect_cancel(&e, &d, id, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    s_expect_cancel(&e, &pf, id, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED);
    rt_front_fini(&f2);

    /* abandon: both workers are told; nothing reaches the front end */
    rt_front_t f3 = {0};
    id = s_running(&e, &d, &pf, &f3, 0);
    rt_core_abandon(e.core, f3.req);
    s_expect_cancel(&e, &d, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    s_expect_cancel(&e, &pf, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(f3.n == 0 && rt_core_n_inflight(e.core) == 0);

    /* abandoned from inside its own chunk callback */
    rt_front_t f4 = {.abandon_in_callback = true};
    id = s_running(&e, &d, &pf, &f4, 0);
    rt_worker_chunk(&d, id, 5, "a", PDSERVE__V1__FINISH_REASON__FINISH_NONE);
    s_expect_cancel(&e, &d, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(f4.n == 1 && !f4.is_done && rt_core_n_inflight(e.core) == 0);
    rt_front_fini(&f4);

    /* a restarted decode worker (registers again): its requests end, the prefill worker is told */
    rt_front_t f5 = {0};
    id = s_running(&e, &d, &pf, &f5, 0);
    CHECK(rt_worker_register(&e, &d, ROLE_D));
    s_expect_error(&e, &f5, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "worker decode-0 lost");
    s_expect_cancel(&e, &pf, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    rt_front_fini(&f5);

    /* the decode worker goes silent past worker_timeout while the prefill worker keeps beating */
    rt_front_t f6 = {0};
    id = s_running(&e, &d, &pf, &f6, 0);
    uint64_t end = pd_now_us() + 2000000u;
    while (!f6.is_done && pd_now_us() < end) {
        rt_worker_heartbeat(&pf, ROLE_P, 100, 0);
        rt_env_pump(&e, 40);
    }
    s_expect_error(&e, &f6, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "worker decode-0 lost");
    s_expect_cancel(&e, &pf, id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
    CHECK(!rt_core_is_ready(e.core));
    char *text = rt_core_metrics(e.core, NULL);
    CHECK(text && strstr(text, "pdserve_workers{role=\"decode\",state=\"lost\"} 1\n"));
    CHECK(text && strstr(text, "pdserve_request_errors_total{code=\"ERR_UNAVAILABLE\"} 2\n"));
    CHECK(text && strstr(text, "pdserve_request_errors_total{code=\"ERR_DEADLINE_EXCEEDED\"} 1\n"));
    CHECK(text && strstr(text, "pdserve_requests_total{outcome=\"cancelled\"} 2\n"));
    free(text);
    /* it comes back with a heartbeat */
    rt_worker_heartbeat(&d, ROLE_D, 100, 0);
    rt_env_pump(&e, 30);
    CHECK(rt_core_is_ready(e.core));
    rt_front_fini(&f6);
    rt_worker_close(&d);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

/* The router's own loop held up for 2.5 timeouts with the whole machine (nobody beat meanwhile): no worker is
 * lost for the router's pause; one that then stays silent for a whole timeout is. */
static void test_router_stall(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    p.worker_timeout_ms = 400;
    REQUIRE(rt_env_init(&e, &p));
    rt_worker_sim_t d, pf;
    REQUIRE(s_two_workers(&e, &d, &pf));
    rt_env_pump(&e, 30);
    CHECK(rt_core_is_ready(e.core));
    nanosleep(&(struct timespec){.tv_nsec = 999999999}, NULL);
    rt_env_pump(&e, 50);
    CHECK(rt_core_is_ready(e.core));
    uint64_t end = pd_now_us() + 700000u; /* decode beats, prefill stays silent */
    while (pd_now_us() < end) {
        rt_worker_heartbeat(&d, ROLE_D, 100, 0);
        rt_env_pump(&e, 40);
    }
    CHECK(!rt_core_is_ready(e.core));
    char *text = rt_core_metrics(e.core, NULL);
    CHECK(text && strstr(text, "pdserve_workers{role=\"prefill\",state=\"lost\"} 1\n"));
    CHECK(text && strstr(text, "pdserve_workers{role=\"decode\",state=\"lost\"} 0\n"));
    free(text);
    rt_worker_close(&d);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

static rt_req_t *s_try(rt_env_t *e, Pdserve__V1__GenerateRequest *req, Pdserve__V1__ErrorCode *code, char *msg,
                       size_t cap) {
    rt_front_t f = {0};
    return rt_core_submit(e->core, &req, rt_front_on_chunk, &f, code, msg, cap);
}

static void test_admission(void) {
    rt_env_t e;
    rt_core_params_t p = rt_env_params();
    p.max_inflight = 2;
    REQUIRE(rt_env_init(&e, &p));
    Pdserve__V1__ErrorCode code;
    char msg[512];
    /* the client's own mistakes come first, even with no worker */
    Pdserve__V1__GenerateRequest *req = rt_text_request("Hello", 0, 0);
    req->model = pd_xstrdup("gpt-4");
    CHECK(!s_try(&e, req, &code, msg, sizeof msg) && code == PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND);
    CHECK(strstr(msg, "gpt-4"));
    CHECK(!s_try(&e, rt_text_request("Hello", 8192, 0), &code, msg, sizeof msg));
    CHECK(code == PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT && strstr(msg, "maximum context length is 8192"));
    req = rt_text_request("x", 0, 0);
    free(req->text);
    req->text = malloc(9000 * 2 + 1);
    for (int i = 0; i < 9000; i++) memcpy(req->text + 2 * i, " a", 2);
    req->text[18000] = '\0';
    CHECK(!s_try(&e, req, &code, msg, sizeof msg) && code == PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(msg, "prompt has 9000 tokens, the context length is 8192"), "%s", msg);
    req = rt_text_request("x", 0, 0);
    free(req->text);
    req->prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    req->token_ids = calloc(1, sizeof *req->token_ids);
    pdserve__v1__token_ids__init(req->token_ids);
    req->token_ids->n_ids = 2;
    req->token_ids->ids = malloc(2 * sizeof(int32_t));
    req->token_ids->ids[0] = 1;
    req->token_ids->ids[1] = 49152;
    CHECK(!s_try(&e, req, &code, msg, sizeof msg) && code == PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT);
    CHECK_MSG(strstr(msg, "token_ids[1] = 49152"), "%s", msg);
    CHECK(!s_try(&e, rt_text_request("Hello", 0, 0), &code, msg, sizeof msg));
    CHECK(code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE && strstr(msg, "no decode worker"));
    rt_worker_sim_t d, pf;
    rt_worker_open(&e, &d, "decode-0");
    rt_worker_open(&e, &pf, "prefill-0");
    REQUIRE(rt_worker_register(&e, &d, ROLE_D));
    CHECK(!s_try(&e, rt_text_request("Hello", 0, 0), &code, msg, sizeof msg));
    CHECK(code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE && strstr(msg, "no prefill worker"));
    REQUIRE(rt_worker_register(&e, &pf, ROLE_P));
    /* a chat request as the HTTP front end builds it (rt_openai), rendered with the model's template */
    const char *body =
        "{\"model\":\"x\",\"messages\":[{\"role\":\"user\",\"content\":\"What is 2+2?\"}],\"max_tokens\":5}";
    rt_openai_limits_t lim = rt_openai_limits_default();
    rt_openai_error_t oerr;
    Pdserve__V1__GenerateRequest *chat = NULL;
    REQUIRE(rt_openai_parse_chat(body, strlen(body), &lim, &chat, NULL, &oerr) == PD_OK);
    free(chat->model);
    chat->model = pd_xstrdup(rt_core_model_id(e.core));
    rt_front_t f1 = {0}, f2 = {0};
    REQUIRE(rt_submit(&e, &f1, chat));
    CHECK(rt_req_prompt_tokens(f1.req) > 10); /* the template's system prompt and markers */
    REQUIRE(rt_submit(&e, &f2, rt_text_request("Hello", 0, 0)));
    CHECK(!s_try(&e, rt_text_request("Hello", 0, 0), &code, msg, sizeof msg));
    CHECK(code == PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED && strstr(msg, "too many requests"));
    rt_core_abandon(e.core, f1.req);
    rt_core_drain(e.core);
    CHECK(!rt_core_is_ready(e.core));
    CHECK(!s_try(&e, rt_text_request("Hello", 0, 0), &code, msg, sizeof msg));
    CHECK(code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE && strstr(msg, "shutting down"));
    CHECK_EQ_INT(rt_core_n_inflight(e.core), 1);
    char *text = rt_core_metrics(e.core, NULL);
    CHECK(text && strstr(text, "pdserve_requests_total{outcome=\"rejected\"} 8\n"));
    CHECK(text && strstr(text, "pdserve_request_errors_total{code=\"ERR_INVALID_ARGUMENT\"} 3\n"));
    free(text);
    /* destroy ends what is still held: f2 gets ERR_UNAVAILABLE, the workers a cancel */
    rt_core_destroy(&e.core);
    CHECK(f2.is_done && rt_front_last(&f2)->error &&
          rt_front_last(&f2)->error->code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE);
    rt_front_fini(&f1);
    rt_front_fini(&f2);
    rt_worker_close(&d);
    rt_worker_close(&pf);
    rt_env_fini(&e);
}

int main(void) {
    PD_TEST_RUN(test_registration);
    PD_TEST_RUN(test_dispatch_and_relay);
    PD_TEST_RUN(test_local_prefill);
    PD_TEST_RUN(test_reserve_refused);
    PD_TEST_RUN(test_failures);
    PD_TEST_RUN(test_router_stall);
    PD_TEST_RUN(test_admission);
    return pd_test_finish();
}
