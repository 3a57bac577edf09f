/* test_kvt_transfer.c: sender and receiver on real ZeroMQ sockets (tcp and ipc on loopback), driven from
 * one thread by alternating polls (each object is still used only by the thread that created it). Every
 * scenario checks the bytes that landed and that the test store's reserved-block counter is back to zero. */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>
#include <zmq.h>

#include "kvt.h"
#include "kvt_int.h"
#include "pd_test.h"
#include "kvt_test_env.h"

/* ---- scenarios ---- */

static void s_roundtrip(eng_kv_dtype_t sdt, eng_kv_dtype_t rdt, bool ipc) {
    env_t e;
    env_opts_t o = s_opts();
    o.sdt = sdt, o.rdt = rdt, o.ipc = ipc;
    REQUIRE(env_init(&e, o));
    char what[64];
    snprintf(what, sizeof what, "%d->%d ipc=%d", sdt, rdt, ipc);
    env_run_three(&e, what);
    env_fini(&e);
}

static void test_roundtrip_dtypes(void) {
    const eng_kv_dtype_t pairs[7][2] = {{ENG_KV_F32, ENG_KV_F32}, {ENG_KV_F16, ENG_KV_F16},  {ENG_KV_BF16, ENG_KV_BF16},
                                        {ENG_KV_F32, ENG_KV_F16}, {ENG_KV_F32, ENG_KV_BF16}, {ENG_KV_F16, ENG_KV_F32},
                                        {ENG_KV_BF16, ENG_KV_F32}};
    for (int i = 0; i < 7; i++)
        for (int ipc = 0; ipc < 2; ipc++) s_roundtrip(pairs[i][0], pairs[i][1], ipc);
}

static void test_64_concurrent(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.s_blocks = 400, o.r_blocks = 400;
    o.credit_bytes = 3 * 2 * 512; /* three block-layers: forces many credit round trips, interleaved */
    REQUIRE(env_init(&e, o));
    uint64_t ids[64];
    for (int i = 0; i < 64; i++) {
        ids[i] = (uint64_t)i + 10;
        CHECK_EQ_INT(s_start(&e, ids[i], 1, 1 + (int32_t)(s_rand() % 24), 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    }
    CHECK(env_run_until_released(&e, ids, 64, 20000));
    for (int i = 0; i < 64; i++) CHECK_MSG(s_verify(&e, ids[i]), "transfer %d", (int)ids[i]);
    env_fini(&e);
}

static void test_layers_streamed(void) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    uint64_t id = 5;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 0), PD_OK);
    size_t layer_bytes = 4 * 2 * eng_kv_chunk_bytes(&e.sl); /* 4 blocks, K and V */
    for (int32_t ly = 1; ly <= e.sl.n_layers; ly++) {
        CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, ly), PD_OK);
        kvt_stats_t st;
        uint64_t end = pd_now_us() + 2000000;
        do {
            env_step(&e, true, true);
            kvt_receiver_stats(e.r, &st);
        } while (st.payload_bytes < (uint64_t)ly * layer_bytes && pd_now_us() < end);
        for (int k = 0; k < 5; k++) env_step(&e, true, true);
        kvt_receiver_stats(e.r, &st);
        CHECK_EQ_INT(st.payload_bytes, (uint64_t)ly * layer_bytes); /* exactly the ready layers, no more */
        CHECK(!e.rec[id].committed);
    }
    /* the commit hands the receiver the service's opaque first-token info, byte for byte */
    const char info[] = "first token info \x00\x01\xff";
    CHECK_EQ_INT(kvt_sender_commit_info(e.s, id, 105, info, KVT_MAX_COMMIT_INFO_BYTES + 1), PD_EINVAL);
    CHECK_EQ_INT(kvt_sender_commit_info(e.s, id, 105, info, sizeof info), PD_OK);
    CHECK(env_run_until_released(&e, &id, 1, 3000));
    CHECK(s_verify(&e, id));
    CHECK_EQ_INT(e.rec[id].info_len, sizeof info);
    CHECK(memcmp(e.rec[id].info, info, sizeof info) == 0);
    env_fini(&e);
}

static void test_receiver_full(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.r_blocks = 8;
    REQUIRE(env_init(&e, o));
    CHECK_EQ_INT(s_start(&e, 1, 1, 24, 0), PD_OK); /* 6 of 8 blocks, held (not committed) */
    CHECK(env_step_until_reserved(&e, 1, 100));
    uint64_t id2 = 2, id3 = 3, id4 = 4;
    CHECK_EQ_INT(s_start(&e, 2, 1, 16, 0), PD_OK); /* 4 blocks: does not fit now */
    CHECK(env_run_until_released(&e, &id2, 1, 3000));
    CHECK_EQ_INT(e.rec[2].done_st, PD_EAGAIN);
    CHECK(!e.rec[2].reserved);
    CHECK_EQ_INT(s_start(&e, 4, 1, 40, 0), PD_OK); /* 10 blocks: can never fit */
    CHECK(env_run_until_released(&e, &id4, 1, 3000));
    CHECK_EQ_INT(e.rec[4].done_st, PD_EINVAL);
    CHECK_EQ_INT(kvt_sender_commit(e.s, 1, 101), PD_OK);
    CHECK_EQ_INT(s_start(&e, 3, 1, 8, 0), PD_OK); /* 2 blocks: fits */
    CHECK_EQ_INT(kvt_sender_commit(e.s, 3, 103), PD_OK);
    CHECK(env_run_until_released(&e, &id3, 1, 3000));
    CHECK_EQ_INT(e.rec[3].done_st, PD_OK);
    CHECK(s_verify(&e, 3));
    uint64_t id1 = 1;
    CHECK(env_run_until_released(&e, &id1, 1, 3000));
    CHECK(s_verify(&e, 1));
    env_fini(&e);
}

static void test_fingerprint_mismatch(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.fp_mismatch = true;
    REQUIRE(env_init(&e, o));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 8, 0), PD_OK);
    uint64_t end = pd_now_us() + 3000000;
    while (e.sender_rc == 0 && pd_now_us() < end) env_step(&e, true, true);
    CHECK_EQ_INT(e.sender_rc, PD_EPROTO);
    CHECK_MSG(strstr(kvt_sender_error(e.s), "tokenizer_hash") != NULL, "%s", kvt_sender_error(e.s));
    CHECK(e.rec[id].done && e.rec[id].done_st == PD_EPROTO && e.rec[id].released);
    CHECK_EQ_INT(s_start(&e, 2, 1, 8, 0), PD_EPROTO);
    char err[160];
    kvt_fingerprint_t a = s_fp(ENG_KV_F32), b = s_fp(ENG_KV_BF16);
    CHECK_EQ_INT(kvt_fingerprint_check(&a, &b, err, sizeof err), PD_OK); /* dtype may differ */
    b.rope_dim = 8;
    CHECK_EQ_INT(kvt_fingerprint_check(&a, &b, err, sizeof err), PD_EPROTO);
    CHECK(strstr(err, "rope_dim") != NULL);
    env_fini(&e);
}

static void test_corrupt_one(void) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    uint64_t ids[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(s_start(&e, ids[i], 1, 20, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_test_corrupt(e.s, 2), PD_OK);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    CHECK(env_run_until_released(&e, ids, 3, 5000));
    CHECK_EQ_INT(e.rec[2].done_st, PD_EPROTO);
    CHECK_MSG(strstr(e.rec[2].err, "checksum") != NULL, "%s", e.rec[2].err);
    CHECK(e.rec[2].failed && e.rec[2].failed_st == PD_EPROTO && !e.rec[2].committed);
    CHECK(s_verify(&e, 1) && s_verify(&e, 3));
    env_fini(&e);
}

/* One sender over three connections: payload messages dealt over all of them, every byte lands, and a
 * corrupted message (wherever it travels) fails only its own transfer. */
static void test_multi_conn(void) {
    for (int ipc = 0; ipc < 2; ipc++) {
        env_t e;
        env_opts_t o = s_opts();
        o.ipc = ipc, o.n_conns = 3, o.credit_bytes = 64u << 10; /* small window: commits wait on credit */
        REQUIRE(env_init(&e, o));
        uint64_t ids[8] = {1, 2, 3, 4, 5, 6, 7, 8};
        for (int i = 0; i < 8; i++) CHECK_EQ_INT(s_start(&e, ids[i], 1, 4 + 5 * i, 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_test_corrupt(e.s, 5), PD_OK);
        for (int i = 0; i < 8; i++) CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
        CHECK(env_run_until_released(&e, ids, 8, 5000));
        for (int i = 0; i < 8; i++) {
            if (ids[i] == 5) continue;
            CHECK_MSG(e.rec[ids[i]].done_st == PD_OK, "transfer %d: %s", (int)ids[i], e.rec[ids[i]].err);
            CHECK_MSG(s_verify(&e, ids[i]), "transfer %d ipc=%d", (int)ids[i], ipc);
        }
        CHECK(e.rec[5].done_st == PD_EPROTO && e.rec[5].failed && !e.rec[5].committed);
        kvt_stats_t ss, rs;
        kvt_sender_stats(e.s, &ss);
        kvt_receiver_stats(e.r, &rs);
        /* the sender may count messages of the failed transfer that the receiver dropped */
        CHECK_MSG(rs.striped_msgs > 0 && ss.striped_msgs >= rs.striped_msgs, "striped: sent %llu, received %llu",
                  (unsigned long long)ss.striped_msgs, (unsigned long long)rs.striped_msgs);
        env_fini(&e);
    }
}

static void test_receiver_timeout(void) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 300), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, 1), PD_OK);
    for (int i = 0; i < 50 && !e.rec[id].reserved; i++) env_step(&e, true, true);
    for (int i = 0; i < 10; i++) env_step(&e, true, true);
    CHECK(e.rec[id].reserved);
    CHECK(e.rs.n_reserved > 0);
    /* the sender goes silent: only the receiver polls */
    uint64_t t0 = pd_now_us(), end = t0 + 3000000;
    while (!e.rec[id].failed && pd_now_us() < end) env_step(&e, false, true);
    CHECK(e.rec[id].failed && e.rec[id].failed_st == PD_ETIMEDOUT);
    CHECK(pd_now_us() - t0 < 1000000);
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    env_fini(&e);
}

static void test_sender_timeout_receiver_gone(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.reply_timeout_ms = 300;
    REQUIRE(env_init(&e, o));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, 2), PD_OK);
    CHECK(env_step_until_reserved(&e, id, 50));
    kvt_receiver_destroy(&e.r); /* releases its reservation */
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    CHECK_EQ_INT(kvt_sender_commit(e.s, id, 101), PD_OK);
    uint64_t t0 = pd_now_us();
    CHECK(env_run_until_released(&e, &id, 1, 3000));
    CHECK_EQ_INT(e.rec[id].done_st, PD_ETIMEDOUT);
    CHECK(pd_now_us() - t0 < 1500000);
    env_fini(&e);
}

/* A cancel from either side mid-stream: transfer 1 (two layers sent) ends with DONE(PD_ECLOSED) and RELEASED on the
 * sender and FAILED(PD_ECLOSED) on the receiver, whose blocks come back at once (not at a timeout); transfer 2 of
 * the same connection lands intact. From the receiver: the decode worker gave the request up (client gone, prefill
 * worker lost). */
static void s_cancel_mid_stream(bool is_from_receiver) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    uint64_t ids[2] = {1, 2};
    CHECK_EQ_INT(s_start(&e, 1, 1, 16, 0), PD_OK);
    CHECK_EQ_INT(s_start(&e, 2, 1, 16, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, 1, 2), PD_OK);
    for (int i = 0; i < 100 && !(e.rec[1].reserved && e.rec[2].reserved); i++) env_step(&e, true, true);
    for (int i = 0; i < 10; i++) env_step(&e, true, true);
    if (is_from_receiver) {
        int32_t held = e.rs.n_reserved;
        CHECK_EQ_INT(kvt_receiver_cancel(e.r, 0xabc000 + 1), 1);
        CHECK_EQ_INT(kvt_receiver_cancel(e.r, 0xabc000 + 1), 0); /* over already */
        CHECK_EQ_INT(kvt_receiver_cancel(e.r, 0xabcfff), 0);     /* unknown */
        CHECK(e.rs.n_reserved < held);                           /* released now */
    } else {
        CHECK_EQ_INT(kvt_sender_cancel(e.s, 1), PD_OK);
    }
    CHECK_EQ_INT(kvt_sender_commit(e.s, 2, 102), PD_OK);
    CHECK(env_run_until_released(&e, ids, 2, 3000));
    uint64_t end = pd_now_us() + 2000000;
    while (!e.rec[1].failed && pd_now_us() < end) env_step(&e, true, true);
    CHECK_EQ_INT(e.rec[1].done_st, PD_ECLOSED);
    CHECK(e.rec[1].failed && e.rec[1].failed_st == PD_ECLOSED);
    CHECK(s_verify(&e, 2));
    env_fini(&e);
}

static void test_cancel_from_sender(void) {
    s_cancel_mid_stream(false);
}

static void test_cancel_from_receiver(void) {
    s_cancel_mid_stream(true);
}

/* A store that accounts per request sees each reservation and release with the request it is for. */
static void test_store_by_request(void) {
    env_opts_t o = s_opts();
    o.by_request = true;
    env_t e;
    REQUIRE(env_init(&e, o));
    uint64_t ids[2] = {1, 2};
    g_n_release_for = 0;
    CHECK_EQ_INT(s_start(&e, 1, 1, 32, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, 1, e.sl.n_layers), PD_OK);
    CHECK_EQ_INT(kvt_sender_commit(e.s, 1, 101), PD_OK);
    CHECK(env_run_until_released(&e, ids, 1, 3000));
    CHECK_MSG(e.rec[1].done_st == PD_OK, "%s: %s", pd_strerror(e.rec[1].done_st), e.rec[1].err);
    CHECK(s_verify(&e, 1));
    CHECK_EQ_INT(g_reserve_req, 0xabc000 + 1);
    CHECK_EQ_INT(g_reserve_tokens, 32);
    CHECK_EQ_INT(g_n_release_for, 0); /* committed blocks belong to the caller */
    CHECK_EQ_INT(s_start(&e, 2, 1, 16, 0), PD_OK);
    for (int i = 0; i < 100 && !e.rec[2].reserved; i++) env_step(&e, true, true);
    CHECK_EQ_INT(g_reserve_req, 0xabc000 + 2);
    CHECK_EQ_INT(kvt_sender_cancel(e.s, 2), PD_OK);
    CHECK(env_run_until_released(&e, ids + 1, 1, 3000));
    uint64_t end = pd_now_us() + 2000000;
    while (!e.rec[2].failed && pd_now_us() < end) env_step(&e, true, true);
    CHECK_EQ_INT(g_n_release_for, 1);
    CHECK_EQ_INT(g_release_req, 0xabc000 + 2);
    env_fini(&e);
}

/* The receiver lives on its own thread (its socket belongs to that thread), as in the decode service. */
typedef struct {
    env_t *e;
    env_opts_t o;
    atomic_int ready, stop;
    kvt_stats_t final;
} rthread_t;

static void *s_receiver_thread(void *arg) {
    rthread_t *t = arg;
    if (!env_open_receiver(t->e, t->o)) {
        atomic_store(&t->ready, -1);
        return NULL;
    }
    atomic_store(&t->ready, 1);
    kvt_event_t ev[64];
    while (!atomic_load(&t->stop)) {
        int n = kvt_receiver_poll(t->e->r, 5, ev, 64);
        if (n > 0) s_take_receiver(t->e, ev, n);
    }
    kvt_receiver_stats(t->e->r, &t->final);
    kvt_receiver_destroy(&t->e->r);
    return NULL;
}

static void test_two_threads(void) {
    env_t e;
    rthread_t t = {.e = &e, .o = s_opts()};
    t.o.credit_bytes = 8 * 1024;
    t.o.s_blocks = 256, t.o.r_blocks = 256; /* room for all 16 at once */
    env_prepare(&e, t.o);
    pthread_t th;
    REQUIRE(pthread_create(&th, NULL, s_receiver_thread, &t) == 0);
    while (atomic_load(&t.ready) == 0) nanosleep(&(struct timespec){0, 1000000}, NULL);
    bool ok = atomic_load(&t.ready) == 1 && env_open_sender(&e, t.o, kvt_receiver_endpoint(e.r));
    uint64_t ids[16];
    for (int i = 0; i < 16 && ok; i++) {
        ids[i] = (uint64_t)i + 1;
        CHECK_EQ_INT(s_start(&e, ids[i], 1, 1 + (int32_t)(s_rand() % 40), 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    }
    uint64_t end = pd_now_us() + 10000000;
    bool all = false;
    while (ok && !all && pd_now_us() < end) {
        env_step(&e, true, false);
        all = true;
        for (int i = 0; i < 16; i++) all = all && e.rec[ids[i]].released;
    }
    atomic_store(&t.stop, 1);
    pthread_join(th, NULL);
    CHECK(ok && all);
    for (int i = 0; i < 16 && ok; i++) {
        CHECK_EQ_INT(e.rec[ids[i]].done_st, PD_OK);
        CHECK_MSG(s_verify(&e, ids[i]), "transfer %d", (int)ids[i]);
    }
    CHECK_EQ_INT(t.final.transfers_done, ok ? 16 : 0);
    CHECK_EQ_INT(t.final.reserved_blocks, 0);
    env_fini(&e);
}

/* ---- socket-free: hand-made messages through kvt_receiver_handle_frames ---- */

static size_t s_pack(const Pdserve__V1__KvEnvelope *env, uint8_t *buf) {
    size_t n = pdserve__v1__kv_envelope__get_packed_size(env);
    pdserve__v1__kv_envelope__pack(env, buf);
    return n;
}

static void s_feed_as(kvt_receiver_t *r, const char *peer, const Pdserve__V1__KvEnvelope *env, const void *const *pay,
                      const size_t *psz, size_t n_pay) {
    static uint8_t buf[KVT_MAX_ENVELOPE_BYTES];
    const void *frames[16];
    size_t sizes[16];
    sizes[0] = s_pack(env, buf);
    frames[0] = buf;
    for (size_t i = 0; i < n_pay; i++) frames[1 + i] = pay[i], sizes[1 + i] = psz[i];
    kvt_receiver_handle_frames(r, peer, strlen(peer), frames, sizes, 1 + n_pay);
}

static void s_feed(kvt_receiver_t *r, const Pdserve__V1__KvEnvelope *env, const void *const *pay, const size_t *psz,
                   size_t n_pay) {
    s_feed_as(r, "peer1", env, pay, psz, n_pay);
}

static void test_stale_epoch_dropped(void) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    kvt_fingerprint_t fpr = s_fp(ENG_KV_F32);
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&fpr, &fp);
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    s_feed(e.r, &env, NULL, NULL, 0);
    Pdserve__V1__KvReserve rs = PDSERVE__V1__KV_RESERVE__INIT;
    rs.transfer_id = 7, rs.epoch = 2, rs.n_tokens = 4, rs.n_blocks = 1;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &rs;
    s_feed(e.r, &env, NULL, NULL, 0);
    CHECK_EQ_INT(e.rs.n_reserved, 1);
    /* a well-formed KvData for layer 0, block 0, but of epoch 1 */
    size_t cb = eng_kv_chunk_bytes(&e.sl);
    const void *pay[2] = {e.spool, e.spool + cb};
    size_t psz[2] = {cb, cb};
    uint64_t ck[2] = {XXH3_64bits(pay[0], cb), XXH3_64bits(pay[1], cb)};
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = 7, d.epoch = 1, d.seq = 0, d.first_layer = 0, d.n_layers = 1, d.first_block = 0, d.n_blocks = 1;
    d.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32, d.block_size = 4, d.n_kv_heads = 2, d.head_dim = 16;
    d.n_checksums = 2, d.checksums = ck;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    kvt_stats_t st0, st1;
    kvt_receiver_stats(e.r, &st0);
    s_feed(e.r, &env, pay, psz, 2);
    d.epoch = 3; /* from the future: no reservation for it either */
    s_feed(e.r, &env, pay, psz, 2);
    kvt_receiver_stats(e.r, &st1);
    CHECK_EQ_INT(st1.frames_dropped_stale, st0.frames_dropped_stale + 2);
    CHECK_EQ_INT(st1.payload_bytes, 0);
    size_t zero = 0;
    for (size_t i = 0; i < eng_kv_pool_bytes(&e.rs.l); i++) zero |= e.rs.pool[i];
    CHECK_EQ_INT(zero, 0); /* nothing written anywhere */
    /* the current epoch is written */
    d.epoch = 2;
    s_feed(e.r, &env, pay, psz, 2);
    kvt_receiver_stats(e.r, &st1);
    CHECK_EQ_INT(st1.payload_bytes, 2 * cb);
    /* a repeat of seq 0 fails the transfer and frees its block */
    s_feed(e.r, &env, pay, psz, 2);
    kvt_event_t ev[8];
    int n = kvt_receiver_poll(e.r, 0, ev, 8);
    CHECK_EQ_INT(n, 1);
    CHECK(n == 1 && ev[0].kind == KVT_EV_FAILED && ev[0].status == PD_EPROTO && strstr(ev[0].err, "seq") != NULL);
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    env_fini(&e);
}

static void test_convert(void) {
    /* round to nearest even at the f16 and bf16 boundaries, exact up-conversion, specials */
    CHECK_EQ_INT(kvt_f32_to_f16(1.0f), 0x3c00);
    CHECK_EQ_INT(kvt_f32_to_f16(1.0f + 1.0f / 2048), 0x3c00); /* tie -> even (down) */
    CHECK_EQ_INT(kvt_f32_to_f16(1.0f + 3.0f / 2048), 0x3c02); /* tie -> even (up) */
    CHECK_EQ_INT(kvt_f32_to_f16(65520.0f), 0x7c00);           /* overflows to inf */
    CHECK_EQ_INT(kvt_f32_to_f16(65504.0f), 0x7bff);
    CHECK_EQ_INT(kvt_f32_to_f16(5.9604645e-8f), 0x0001); /* smallest subnormal */
    CHECK_EQ_INT(kvt_f32_to_f16(2.9802322e-8f), 0x0000); /* half of it: tie -> 0 */
    CHECK_EQ_INT(kvt_f32_to_f16(-0.0f), 0x8000);
    CHECK_EQ_INT(kvt_f32_to_bf16(1.0f + 1.0f / 256), 0x3f80); /* tie -> even */
    CHECK_EQ_INT(kvt_f32_to_bf16(1.0f + 3.0f / 256), 0x3f82);
    CHECK(isnan(kvt_bf16_to_f32(kvt_f32_to_bf16(NAN))) && isnan(kvt_f16_to_f32(kvt_f32_to_f16(NAN))));
    for (uint32_t h = 0; h < 0x10000; h++) { /* f16 -> f32 -> f16 is the identity for non-NaN */
        if ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) continue;
        if (kvt_f32_to_f16(kvt_f16_to_f32((uint16_t)h)) != h) {
            CHECK_MSG(0, "f16 %04x does not round-trip", h);
            break;
        }
        if (kvt_f32_to_bf16(kvt_bf16_to_f32((uint16_t)h)) != h) {
            CHECK_MSG(0, "bf16 %04x does not round-trip", h);
            break;
        }
    }
}

/* Connection groups: data of the primary's transfer is accepted on a secondary that said hello with the
 * same group, with its own seq; a connection that never said hello, or a group without a primary, writes
 * nothing; a gap on the secondary fails the transfer; commit counts messages over all connections. */
static void test_conn_group_seq(void) {
    env_t e;
    REQUIRE(env_init(&e, s_opts()));
    kvt_fingerprint_t fpr = s_fp(ENG_KV_F32);
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&fpr, &fp);
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    h.conn_group = 0x5eed;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    s_feed_as(e.r, "pA", &env, NULL, NULL, 0);
    h.conn_index = 1;
    s_feed_as(e.r, "pB", &env, NULL, NULL, 0);
    h.conn_group = 0xbad, h.conn_index = 1; /* a secondary whose group has no primary */
    s_feed_as(e.r, "pD", &env, NULL, NULL, 0);
    Pdserve__V1__KvReserve rs = PDSERVE__V1__KV_RESERVE__INIT;
    rs.transfer_id = 9, rs.epoch = 1, rs.n_tokens = 8, rs.n_blocks = 2;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &rs;
    s_feed_as(e.r, "pA", &env, NULL, NULL, 0);
    CHECK_EQ_INT(e.rs.n_reserved, 2);
    size_t cb = eng_kv_chunk_bytes(&e.sl);
    const void *pay[2] = {e.spool, e.spool + cb};
    size_t psz[2] = {cb, cb};
    uint64_t ck[2] = {XXH3_64bits(pay[0], cb), XXH3_64bits(pay[1], cb)};
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = 9, d.epoch = 1, d.seq = 0, d.first_layer = 0, d.n_layers = 1, d.first_block = 0, d.n_blocks = 1;
    d.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32, d.block_size = 4, d.n_kv_heads = 2, d.head_dim = 16;
    d.n_checksums = 2, d.checksums = ck;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    kvt_stats_t st;
    s_feed_as(e.r, "pC", &env, pay, psz, 2); /* no hello: dropped */
    s_feed_as(e.r, "pD", &env, pay, psz, 2); /* no primary: dropped */
    kvt_receiver_stats(e.r, &st);
    CHECK_EQ_INT(st.payload_bytes, 0);
    s_feed_as(e.r, "pB", &env, pay, psz, 2); /* seq 0 on the secondary */
    d.first_block = 1;
    s_feed_as(e.r, "pA", &env, pay, psz, 2); /* seq 0 on the primary */
    kvt_receiver_stats(e.r, &st);
    CHECK_EQ_INT(st.payload_bytes, 4 * cb);
    CHECK_EQ_INT(st.striped_msgs, 1);
    d.first_layer = 1, d.seq = 2; /* seq 1 on the secondary went missing */
    s_feed_as(e.r, "pB", &env, pay, psz, 2);
    kvt_event_t ev[8];
    int n = kvt_receiver_poll(e.r, 0, ev, 8);
    CHECK(n == 1 && ev[0].kind == KVT_EV_FAILED && ev[0].status == PD_EPROTO && strstr(ev[0].err, "seq") != NULL);
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    env_fini(&e);
}

int main(void) {
    PD_TEST_RUN(test_convert);
    PD_TEST_RUN(test_roundtrip_dtypes);
    PD_TEST_RUN(test_64_concurrent);
    PD_TEST_RUN(test_two_threads);
    PD_TEST_RUN(test_layers_streamed);
    PD_TEST_RUN(test_receiver_full);
    PD_TEST_RUN(test_fingerprint_mismatch);
    PD_TEST_RUN(test_corrupt_one);
    PD_TEST_RUN(test_multi_conn);
    PD_TEST_RUN(test_conn_group_seq);
    PD_TEST_RUN(test_stale_epoch_dropped);
    PD_TEST_RUN(test_receiver_timeout);
    PD_TEST_RUN(test_sender_timeout_receiver_gone);
    PD_TEST_RUN(test_cancel_from_sender);
    PD_TEST_RUN(test_cancel_from_receiver);
    PD_TEST_RUN(test_store_by_request);
    return pd_test_finish();
}
