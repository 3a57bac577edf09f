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
    s_reset_peer();
    env_t e;
    env_opts_t o = s_opts();
    o.device = true;
    REQUIRE(env_init(&e, o));
    uint64_t id = 4;
    CHECK_EQ_INT(s_start(&e, id, 1, 37, 0), PD_OK);
    for (int i = 0; i < 200 && !e.rec[id].reserved; i++) env_step(&e, true, true);
    CHECK(e.rec[id].reserved);
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
    s_reset_peer();
    g_peer_fail_copy = 1;
    env_t e;
    env_opts_t o = s_opts();
    o.device = true;
    REQUIRE(env_init(&e, o));
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
    s_reset_peer();
    env_t e;
    env_opts_t o = s_opts();
    o.device = true;
    REQUIRE(env_init(&e, o));
    uint64_t id = 9;
    CHECK_EQ_INT(s_start(&e, id, 1, 30, 300), PD_OK);
    for (int i = 0; i < 200 && !e.rec[id].reserved; i++) env_step(&e, true, true);
    CHECK(e.rec[id].reserved);
    kvt_sender_destroy(&e.s); /* gone before its commit */
    uint64_t end = pd_now_us() + 3000000u;
    while (pd_now_us() < end && !e.rec[id].failed) env_step(&e, false, true);
    CHECK(e.rec[id].failed);
    CHECK_EQ_INT(e.rec[id].failed_st, PD_ETIMEDOUT);
    CHECK_EQ_INT(g_peer_copies, 0);
    env_fini(&e);
}

int main(void) {
    PD_TEST_RUN(test_device_roundtrip);
    PD_TEST_RUN(test_device_streamed);
    PD_TEST_RUN(test_device_fallback);
    PD_TEST_RUN(test_device_copy_fails);
    PD_TEST_RUN(test_device_sender_silent);
    return pd_test_finish();
}
