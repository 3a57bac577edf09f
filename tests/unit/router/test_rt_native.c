/* test_rt_native.c: the native API with real DEALER clients against rt_native + rt_core on a pd_loop, and a
 * scripted decode worker (decode-only cluster: min_prefill_workers 0): streaming and one-shot answers, Cancel,
 * malformed frames, duplicate ids, refusals, a client that goes away, destroy. */
#include "rt_native.h"
#include "unit/router/rt_test_env.h"

#define ROLE_D      PDSERVE__V1__WORKER_ROLE__ROLE_DECODE
#define BODY_DECODE PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE
#define BODY_CANCEL PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL
#define FIN_NONE    PDSERVE__V1__FINISH_REASON__FINISH_NONE
#define FIN_ERROR   PDSERVE__V1__FINISH_REASON__FINISH_ERROR

typedef struct {
    rt_env_t e;
    rt_native_t *n;
    rt_worker_sim_t d;
} rt_nenv_t;

static bool s_init(rt_nenv_t *t) {
    rt_core_params_t p = rt_env_params();
    p.min_prefill_workers = 0;
    if (!rt_env_init(&t->e, &p)) return false;
    rt_native_params_t np = rt_native_params_default();
    np.endpoint = "tcp://127.0.0.1:0";
    char err[256];
    t->n = rt_native_create(t->e.loop, t->e.zmq, t->e.core, &np, err, sizeof err);
    if (!t->n) fprintf(stderr, "rt_native_create: %s\n", err);
    rt_worker_open(&t->e, &t->d, "decode-0");
    return t->n && rt_worker_register(&t->e, &t->d, ROLE_D);
}

static void s_fini(rt_nenv_t *t) {
    rt_native_destroy(&t->n);
    rt_worker_close(&t->d);
    rt_env_fini(&t->e);
}

static void *s_client(rt_nenv_t *t) {
    void *s = zmq_socket(t->e.zmq, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero);
    zmq_connect(s, rt_native_endpoint(t->n));
    return s;
}

static void s_send_msg(void *s, const ProtobufCMessage *m) {
    size_t n = pb_packed_size(m);
    uint8_t *buf = malloc(n ? n : 1);
    CHECK(pb_pack(m, buf, n) == (int64_t)n);
    CHECK(zmq_send(s, buf, n, 0) == (int)n);
    free(buf);
}

/* One ClientMessage{generate} frame. */
static void s_send_generate(void *s, Pdserve__V1__GenerateRequest *req) {
    Pdserve__V1__ClientMessage cm = PDSERVE__V1__CLIENT_MESSAGE__INIT;
    cm.body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY_GENERATE;
    cm.generate = req;
    s_send_msg(s, &cm.base);
}

static void s_generate(void *s, uint64_t id, const char *text, bool stream) {
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    req.request_id = id;
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    req.text = (char *)text;
    req.max_tokens = 8;
    req.stream = stream;
    s_send_generate(s, &req);
}

static void s_cancel(void *s, uint64_t id) {
    Pdserve__V1__CancelRequest c = PDSERVE__V1__CANCEL_REQUEST__INIT;
    c.request_id = id;
    Pdserve__V1__ClientMessage cm = PDSERVE__V1__CLIENT_MESSAGE__INIT;
    cm.body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY_CANCEL;
    cm.cancel = &c;
    s_send_msg(s, &cm.base);
}

/* The next chunk for client s within timeout_ms (the loop runs meanwhile), or NULL. */
static Pdserve__V1__ResponseChunk *s_recv(rt_nenv_t *t, void *s, int timeout_ms) {
    uint64_t end = pd_now_us() + (uint64_t)timeout_ms * 1000u;
    do {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, s, ZMQ_DONTWAIT) >= 0) {
            Pdserve__V1__ResponseChunk *c = NULL;
            CHECK(!zmq_msg_more(&m));
            CHECK(pb_unpack_response_chunk(zmq_msg_data(&m), zmq_msg_size(&m), 1u << 24, NULL, &c, NULL, 0) == PD_OK);
            zmq_msg_close(&m);
            return c;
        }
        zmq_msg_close(&m);
        if (pd_loop_run_once(t->e.loop, 1) != PD_OK) break;
    } while (pd_now_us() < end);
    return NULL;
}

/* The decode worker's DecodeRequest (reserved at once); returns its core request id. */
static uint64_t s_take(rt_nenv_t *t) {
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&t->e, &t->d, BODY_DECODE, 2000);
    uint64_t id = m ? m->decode->request_id : 0;
    CHECK(m && m->decode->prefill_locally);
    pb_free((ProtobufCMessage **)&m, NULL);
    if (id) rt_worker_reserved(&t->d, id, PDSERVE__V1__ERROR_CODE__ERR_NONE);
    return id;
}

static void s_expect_cancel(rt_nenv_t *t, uint64_t id) {
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&t->e, &t->d, BODY_CANCEL, 2000);
    CHECK(m && m->cancel->request_id == id);
    pb_free((ProtobufCMessage **)&m, NULL);
}

static void s_expect_error(rt_nenv_t *t, void *s, uint64_t id, Pdserve__V1__ErrorCode code, const char *text) {
    Pdserve__V1__ResponseChunk *c = s_recv(t, s, 2000);
    CHECK(c && c->request_id == id && c->finish_reason == FIN_ERROR && c->error);
    if (c && c->error) {
        CHECK_MSG(c->error->code == code, "%s", pb_error_code_name(c->error->code));
        CHECK_MSG(strstr(c->error->message, text), "%s", c->error->message);
    }
    pb_free_response_chunk(&c, NULL);
}

/* A worker chunk with one token and its logprob (two alternatives, with bytes). */
static void s_worker_chunk_lp(rt_worker_sim_t *w, uint64_t id, int32_t token, const char *text,
                              Pdserve__V1__FinishReason finish) {
    Pdserve__V1__TopLogprob top[2] = {PDSERVE__V1__TOP_LOGPROB__INIT, PDSERVE__V1__TOP_LOGPROB__INIT};
    Pdserve__V1__TopLogprob *tops[2] = {&top[0], &top[1]};
    for (int i = 0; i < 2; i++) {
        top[i].token = token + i;
        top[i].logprob = -0.5f * (float)(i + 1);
        top[i].text.data = (uint8_t *)text;
        top[i].text.len = strlen(text);
    }
    Pdserve__V1__TokenLogprob lp = PDSERVE__V1__TOKEN_LOGPROB__INIT, *lps[1] = {&lp};
    lp.token = token;
    lp.logprob = -0.5f;
    lp.n_top = 2;
    lp.top = tops;
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    c.request_id = id;
    c.n_token_ids = 1;
    c.token_ids = &token;
    c.text = (char *)text;
    c.n_logprobs = 1;
    c.logprobs = lps;
    c.finish_reason = finish;
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK;
    msg.chunk = &c;
    rt_worker_send(w, &msg);
}

static void test_stream_and_oneshot(void) {
    rt_nenv_t t;
    REQUIRE(s_init(&t));
    void *cl = s_client(&t);
    /* stream: one chunk per worker chunk, the client's id, seed first, usage last */
    s_generate(cl, 7, "Hello", true);
    uint64_t id = s_take(&t);
    REQUIRE(id);
    rt_worker_chunk(&t.d, id, 11, "He", FIN_NONE);
    rt_worker_chunk(&t.d, id, 12, "y", PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    Pdserve__V1__ResponseChunk *a = s_recv(&t, cl, 2000), *b = s_recv(&t, cl, 2000);
    REQUIRE(a && b);
    CHECK(a->request_id == 7 && a->n_token_ids == 1 && a->token_ids[0] == 11 && strcmp(a->text, "He") == 0);
    CHECK(a->seed != 0 && a->finish_reason == FIN_NONE);
    CHECK(b->request_id == 7 && b->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_STOP && b->usage);
    CHECK(b->usage && b->usage->completion_tokens == 2 && b->usage->prompt_tokens >= 1);
    pb_free_response_chunk(&a, NULL);
    pb_free_response_chunk(&b, NULL);
    /* one-shot: everything in one chunk at the end */
    s_generate(cl, 8, "Hello", false);
    id = s_take(&t);
    REQUIRE(id);
    s_worker_chunk_lp(&t.d, id, 20, "Hel", FIN_NONE);
    s_worker_chunk_lp(&t.d, id, 21, "lo", FIN_NONE);
    s_worker_chunk_lp(&t.d, id, 22, "!", PDSERVE__V1__FINISH_REASON__FINISH_LENGTH);
    a = s_recv(&t, cl, 2000);
    REQUIRE(a);
    CHECK(a->request_id == 8 && a->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH && a->seed != 0);
    CHECK(a->n_token_ids == 3 && a->token_ids[0] == 20 && a->token_ids[2] == 22);
    CHECK(strcmp(a->text, "Hello!") == 0);
    CHECK(a->n_logprobs == 3 && a->logprobs[1]->token == 21 && a->logprobs[1]->n_top == 2);
    CHECK(a->n_logprobs == 3 && a->logprobs[2]->top[1]->token == 23 && a->logprobs[2]->top[1]->text.len == 1);
    CHECK(a->usage && a->usage->completion_tokens == 3);
    CHECK(s_recv(&t, cl, 50) == NULL); /* nothing more */
    pb_free_response_chunk(&a, NULL);
    zmq_close(cl);
    s_fini(&t);
}

static void test_cancel_and_errors(void) {
    rt_nenv_t t;
    REQUIRE(s_init(&t));
    void *cl = s_client(&t), *cl2 = s_client(&t);
    s_generate(cl, 9, "Hello", true);
    uint64_t id = s_take(&t);
    REQUIRE(id);
    /* the same id on another connection is another request */
    s_generate(cl2, 9, "Hello", true);
    uint64_t id2 = s_take(&t);
    CHECK(id2 && id2 != id);
    /* a duplicate id on one connection is refused; the first request goes on */
    s_generate(cl, 9, "Hello", true);
    s_expect_error(&t, cl, 9, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "already in use");
    s_cancel(cl, 9);
    s_expect_cancel(&t, id);
    Pdserve__V1__ResponseChunk *c = s_recv(&t, cl, 2000);
    CHECK(c && c->request_id == 9 && c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED);
    pb_free_response_chunk(&c, NULL);
    rt_worker_chunk(&t.d, id, 5, "late", FIN_NONE); /* after the cancel: dropped by the core */
    CHECK(s_recv(&t, cl, 50) == NULL);
    s_cancel(cl, 12345); /* unknown: ignored */
    CHECK(s_recv(&t, cl, 50) == NULL);
    /* garbage, then the connection still works */
    CHECK(zmq_send(cl, "\xff\xff\xff\xff", 4, 0) == 4);
    s_expect_error(&t, cl, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "");
    CHECK(zmq_send(cl, "a", 1, ZMQ_SNDMORE) == 1 && zmq_send(cl, "b", 1, 0) == 1);
    s_expect_error(&t, cl, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "one frame per message");
    Pdserve__V1__GenerateRequest req = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    req.request_id = 10;
    req.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    req.text = "Hi";
    sp.temperature = 500.0f;
    req.sampling = &sp;
    s_send_generate(cl, &req);
    s_expect_error(&t, cl, 10, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "temperature");
    req.sampling = NULL;
    req.model = "not-this-one";
    s_send_generate(cl, &req);
    s_expect_error(&t, cl, 10, PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND, "not-this-one");
    Pdserve__V1__ClientMessage empty = PDSERVE__V1__CLIENT_MESSAGE__INIT; /* no body */
    s_send_msg(cl, &empty.base);
    s_expect_error(&t, cl, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "set generate or cancel");
    s_generate(cl, 11, "Hello", true);
    id = s_take(&t);
    CHECK(id != 0);
    rt_worker_chunk(&t.d, id, 5, "x", PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    c = s_recv(&t, cl, 2000);
    CHECK(c && c->request_id == 11 && c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_STOP);
    pb_free_response_chunk(&c, NULL);
    /* the worker fails the other client's request: an error chunk with that client's id */
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    err.code = PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
    err.message = "backend failed";
    Pdserve__V1__ResponseChunk wc = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    wc.request_id = id2;
    wc.finish_reason = FIN_ERROR;
    wc.error = &err;
    Pdserve__V1__WorkerToRouter msg = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    msg.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK;
    msg.chunk = &wc;
    rt_worker_send(&t.d, &msg);
    s_expect_error(&t, cl2, 9, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "backend failed");
    CHECK_EQ_INT(rt_core_n_inflight(t.e.core), 0);
    zmq_close(cl);
    zmq_close(cl2);
    s_fini(&t);
}

/* A client that goes away: the next chunk for it cannot be delivered and its requests are cancelled. Destroy
 * abandons what is left. */
static void test_client_gone(void) {
    rt_nenv_t t;
    REQUIRE(s_init(&t));
    void *cl = s_client(&t), *cl2 = s_client(&t);
    s_generate(cl, 1, "Hello", true);
    uint64_t id = s_take(&t);
    s_generate(cl, 2, "Hello", false);
    uint64_t id_b = s_take(&t);
    REQUIRE(id && id_b);
    zmq_close(cl);
    rt_env_pump(&t.e, 100); /* the ROUTER notices the closed connection and forgets its routing id */
    rt_worker_chunk(&t.d, id, 5, "x", FIN_NONE);
    Pdserve__V1__RouterToWorker *m = rt_worker_expect(&t.e, &t.d, BODY_CANCEL, 2000);
    Pdserve__V1__RouterToWorker *m2 = rt_worker_expect(&t.e, &t.d, BODY_CANCEL, 2000);
    REQUIRE(m && m2);
    CHECK((m->cancel->request_id == id && m2->cancel->request_id == id_b) ||
          (m->cancel->request_id == id_b && m2->cancel->request_id == id));
    pb_free((ProtobufCMessage **)&m, NULL);
    pb_free((ProtobufCMessage **)&m2, NULL);
    CHECK_EQ_INT(rt_core_n_inflight(t.e.core), 0);
    s_generate(cl2, 3, "Hello", true);
    id = s_take(&t);
    REQUIRE(id);
    rt_native_destroy(&t.n);
    s_expect_cancel(&t, id);
    CHECK_EQ_INT(rt_core_n_inflight(t.e.core), 0);
    zmq_close(cl2);
    s_fini(&t);
}

int main(void) {
    PD_TEST_RUN(test_stream_and_oneshot);
    PD_TEST_RUN(test_cancel_and_errors);
    PD_TEST_RUN(test_client_gone);
    return pd_test_finish();
}
