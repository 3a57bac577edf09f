/* test_kvt_device.c: kvtransfer's same-GPU path as a protocol: a sender that offers its pool's device handle, a
 * receiver whose store maps it and copies device to device as layers are marked ready. The store's "device" here is
 * host memory (kvt_test_env.h's ts_peer_*: no GPU in CI); the real CUDA IPC copy runs in tests/gpu (run_gpu.sh
 * cluster and kvtail). What is checked: no payload crosses ZeroMQ, the blocks land bit-exact, COMMITTED says so,
 * DONE waits for the copies, a failed copy fails only its transfer with every block released, and a store or dtype
 * that cannot take the device path falls back to the other paths. Fixtures: kvt_test_env.h. */
#include "kvt_test_env.h"

static void s_reset_peer(void) {
    g_peer_opens = g_peer_closes = g_peer_copies = 0;
    g_peer_fail_copy = -1;
    g_peer_refuse = false;
}

/* A sender and receiver on the device path (kvt_test_env.h's stand-in), the stand-in's counters reset. */
static bool s_device_env(env_t *e) {
    s_reset_peer();
    env_opts_t o = s_opts();
    o.device = true;
    return env_init(e, o);
}

/* env_run_three; the sender's and receiver's stats before teardown, and whether every COMMITTED said on-device. */
static void s_three(env_opts_t o, kvt_stats_t *ss, kvt_stats_t *rs, bool *is_on_device) {
    env_t e;
    REQUIRE(env_init(&e, o));
    char what[64];
    snprintf(what, sizeof what, "device dtype %d stride %d", o.sdt, (int)g_block_stride);
    env_run_three(&e, what);
    *is_on_device = e.rec[1].is_on_device && e.rec[2].is_on_device && e.rec[3].is_on_device;
    kvt_sender_stats(e.s, ss);
    kvt_receiver_stats(e.r, rs);
    env_fini(&e);
}

static void test_device_roundtrip(void) {
    const eng_kv_dtype_t dts[3] = {ENG_KV_F32, ENG_KV_F16, ENG_KV_BF16};
    for (int i = 0; i < 3; i++)
        for (uint64_t stride = 1; stride <= 3; stride += 2) {
            s_reset_peer();
            g_block_stride = stride;
            env_opts_t o = s_opts();
            o.sdt = o.rdt = dts[i], o.device = true, o.ipc = i % 2;
            kvt_stats_t ss, rs;
            bool is_on_device;
            s_three(o, &ss, &rs, &is_on_device);
            CHECK(is_on_device);
            CHECK_EQ_INT(rs.device_peers, 1);
            CHECK_EQ_INT(ss.device_peers, 1);
            CHECK_EQ_INT(g_peer_copies, 3); /* one copy per transfer, at its commit */
            CHECK(rs.payload_bytes > 0 && rs.device_payload_bytes == rs.payload_bytes);
            CHECK(ss.payload_bytes == rs.payload_bytes && ss.device_payload_bytes == rs.device_payload_bytes);
            CHECK(rs.shm_payload_bytes == 0);
            CHECK_EQ_INT(g_peer_opens, 1);
            CHECK_EQ_INT(g_peer_closes, 1); /* the receiver's destroy unmapped it */
        }
    g_block_stride = 3;
}

/* Layers marked ready one part at a time are copied as they come, before the commit: 1, then 3, then the last. */
static void test_device_streamed(void) {
    env_t e;
    REQUIRE(s_device_env(&e));
    uint64_t id = 4;
    CHECK_EQ_INT(s_start(&e, id, 1, 37, 0), PD_OK);
    CHECK(env_step_until_reserved(&e, id, 200));
    const int32_t marks[2] = {1, 3};
    for (int m = 0; m < 2; m++) {
        CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, marks[m]), PD_OK);
        for (int i = 0; i < 200 && g_peer_copies < m + 1; i++) env_step(&e, true, true);
        CHECK_EQ_INT(g_peer_copies, m + 1);
        kvt_stats_t rs;
        kvt_receiver_stats(e.r, &rs);
        CHECK(rs.device_payload_bytes == (uint64_t)marks[m] * 10u * 2u * eng_kv_chunk_bytes(&e.sl)); /* 10 blocks */
    }
    CHECK(!e.rec[id].committed);
    CHECK_EQ_INT(kvt_sender_commit(e.s, id, (int32_t)(100 + id)), PD_OK);
    CHECK(env_run_until_released(&e, &id, 1, 5000));
    CHECK_MSG(e.rec[id].done_st == PD_OK, "%s", e.rec[id].err);
    CHECK(s_verify(&e, id) && e.rec[id].is_on_device);
    CHECK_EQ_INT(g_peer_copies, 3); /* the fourth layer came with the commit */
    env_fini(&e);
}

/* Offered but not taken: a store that cannot map the pool, a receiver without the callbacks, a dtype that needs
 * converting. The KV goes over sockets, exactly as without the offer. */
static void test_device_fallback(void) {
    for (int way = 0; way < 3; way++) {
        s_reset_peer();
        env_opts_t o = s_opts();
        o.device = true;
        if (way == 0) g_peer_refuse = true;
        if (way == 1) o.sdt = ENG_KV_F32, o.rdt = ENG_KV_F16;
        env_t e;
        env_prepare(&e, o);
        if (way == 2) o.device = false; /* the receiver has no peer callbacks; the sender still offers */
        REQUIRE(env_open_receiver(&e, o));
        o.device = true;
        REQUIRE(env_open_sender(&e, o, kvt_receiver_endpoint(e.r)));
        uint64_t id = 5;
        CHECK_EQ_INT(s_start(&e, id, 1, 21, 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_commit(e.s, id, 105), PD_OK);
        CHECK(env_run_until_released(&e, &id, 1, 5000));
        CHECK_MSG(e.rec[id].done_st == PD_OK, "way %d: %s", way, e.rec[id].err);
        CHECK_MSG(s_verify(&e, id), "way %d", way);
        CHECK(!e.rec[id].is_on_device);
        kvt_stats_t ss, rs;
        kvt_sender_stats(e.s, &ss);
        kvt_receiver_stats(e.r, &rs);
        CHECK_EQ_INT(rs.device_peers, 0);
        CHECK_EQ_INT(ss.device_peers, 0);
        CHECK(rs.payload_bytes > 0 && rs.device_payload_bytes == 0);
        CHECK_EQ_INT(g_peer_opens, 0); /* never mapped: refused, wrong dtype, or no callbacks */
        env_fini(&e);
    }
}

/* The copy of the second of three transfers fails: that one ends with an error on both sides and its blocks go back;
 * the others land. */
static void test_device_copy_fails(void) {
    env_t e;
    REQUIRE(s_device_env(&e));
    g_peer_fail_copy = 1;
    uint64_t ids[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        CHECK_EQ_INT(s_start(&e, ids[i], 1, 17, 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    }
    CHECK(env_run_until_released(&e, ids, 3, 5000));
    int n_ok = 0, n_failed = 0;
    for (int i = 0; i < 3; i++) {
        const trec_t *t = &e.rec[ids[i]];
        if (t->done_st == PD_OK) {
            n_ok++;
            CHECK(s_verify(&e, ids[i]) && t->is_on_device);
        } else {
            n_failed++;
            CHECK(t->failed && !t->committed);
            CHECK_MSG(strstr(t->err, "device-to-device copy") != NULL, "%s", t->err);
        }
    }
    CHECK_EQ_INT(n_ok, 2);
    CHECK_EQ_INT(n_failed, 1);
    kvt_stats_t rs;
    kvt_receiver_stats(e.r, &rs);
    CHECK_EQ_INT(rs.reserved_blocks, 0);
    CHECK(rs.transfers_failed == 1 && rs.transfers_done == 2);
    env_fini(&e); /* checks the store got every block back */
}

/* A sender that reserves on the device path and then goes silent: the receiver's timeout frees the reservation and
 * nothing is copied. */
static void test_device_sender_silent(void) {
    env_t e;
    REQUIRE(s_device_env(&e));
    uint64_t id = 9;
    CHECK_EQ_INT(s_start(&e, id, 1, 30, 300), PD_OK);
    CHECK(env_step_until_reserved(&e, id, 200));
    kvt_sender_destroy(&e.s); /* gone before its commit */
    uint64_t end = pd_now_us() + 3000000u;
    while (pd_now_us() < end && !e.rec[id].failed) env_step(&e, false, true);
    CHECK(e.rec[id].failed);
    CHECK_EQ_INT(e.rec[id].failed_st, PD_ETIMEDOUT);
    CHECK_EQ_INT(g_peer_copies, 0);
    env_fini(&e);
}

/* One envelope from peer id "px", straight into the receiver (kvt_receiver_handle_frames: no sockets). */
static void s_feed(kvt_receiver_t *r, Pdserve__V1__KvEnvelope *env) {
    static uint8_t buf[4096];
    const void *fr[1] = {buf};
    size_t sz[1] = {pdserve__v1__kv_envelope__pack(env, buf)};
    kvt_receiver_handle_frames(r, "px", 2, fr, sz, 1);
}

static void s_feed_hello(kvt_receiver_t *r, bool has_device) {
    kvt_fingerprint_t f = s_fp(ENG_KV_F32);
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&f, &fp);
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    h.sender_id = "px";
    static uint8_t pool[4 * 2 * 64 * 4 * 2 * 16 * 4]; /* s_layout(F32, 64) */
    uintptr_t handle = (uintptr_t)pool;
    if (has_device) h.device_handle.data = (uint8_t *)&handle, h.device_handle.len = sizeof handle;
    h.device_n_blocks = has_device ? 64 : 0;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO, env.hello = &h;
    s_feed(r, &env);
}

/* A sender that says hello again (a reconnect, or a restarted process with another pool) while a device transfer of its
 * is live: that transfer's next layers must not be copied from whatever is mapped now (found by fuzz_kvt: the copy ran
 * on a pool that was no longer mapped). It fails; the receiver gets its blocks back. */
static void test_device_rehello(void) {
    for (int again_with_device = 0; again_with_device < 2; again_with_device++) {
        s_reset_peer();
        env_t e;
        env_opts_t o = s_opts();
        o.device = true;
        env_prepare(&e, o);
        REQUIRE(env_open_receiver(&e, o));
        s_feed_hello(e.r, true);
        CHECK_EQ_INT(g_peer_opens, 1);
        uint32_t src[2] = {3, 9};
        Pdserve__V1__KvReserve rs = PDSERVE__V1__KV_RESERVE__INIT;
        rs.request_id = 77, rs.transfer_id = 7, rs.epoch = 1, rs.n_tokens = 5, rs.n_blocks = 2;
        rs.n_device_blocks = 2, rs.device_blocks = src;
        Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
        env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE, env.reserve = &rs;
        s_feed(e.r, &env);
        CHECK_EQ_INT(e.rs.n_reserved, 2);
        s_feed_hello(e.r, again_with_device); /* unmaps the first pool (and maybe maps a second) */
        CHECK_EQ_INT(g_peer_closes, 1);
        Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
        d.transfer_id = 7, d.epoch = 1, d.seq = 0, d.first_layer = 0, d.n_layers = 1, d.first_block = 0, d.n_blocks = 2;
        d.dtype = kvt_dtype_to_pb(ENG_KV_F32), d.block_size = 4, d.n_kv_heads = 2, d.head_dim = 16;
        env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA, env.data = &d;
        s_feed(e.r, &env);
        CHECK_EQ_INT(g_peer_copies, 0); /* never copied from the new mapping or from none */
        kvt_event_t ev[8];
        int n = kvt_receiver_poll(e.r, 0, ev, 8);
        CHECK(n == 1 && ev[0].kind == KVT_EV_FAILED && ev[0].transfer_id == 7);
        CHECK_MSG(n == 1 && strstr(ev[0].err, "no longer mapped") != NULL, "%s", n == 1 ? ev[0].err : "");
        CHECK_EQ_INT(e.rs.n_reserved, 0);
        env_fini(&e);
        CHECK_EQ_INT(g_peer_opens, 1 + again_with_device);
        CHECK_EQ_INT(g_peer_closes, g_peer_opens); /* the second mapping went with the receiver */
    }
}

int main(void) {
    PD_TEST_RUN(test_device_roundtrip);
    PD_TEST_RUN(test_device_streamed);
    PD_TEST_RUN(test_device_fallback);
    PD_TEST_RUN(test_device_copy_fails);
    PD_TEST_RUN(test_device_sender_silent);
    PD_TEST_RUN(test_device_rehello);
    return pd_test_finish();
}
