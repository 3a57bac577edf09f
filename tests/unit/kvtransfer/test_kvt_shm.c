/* test_kvt_shm.c: the fast paths of kvtransfer: payload frames that carry runs of consecutive blocks, and
 * the same-host path through the sender's shared pool (round trip bit-exact, fallback to sockets when the
 * receiver does not map it, checksum failure and timeouts on the shared path). Fixtures: kvt_test_env.h. */
#define _POSIX_C_SOURCE 200809L
#include "kvt_test_env.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/wait.h>

/* Three transfers (1, 13 and 40 tokens) committed at once; each must arrive exactly. */
static void s_three(env_opts_t o, uint64_t stride) {
    env_t e;
    g_block_stride = stride;
    REQUIRE(env_init(&e, o));
    char what[96];
    snprintf(what, sizeof what, "%d->%d ipc=%d shm=%d stride=%d", o.sdt, o.rdt, o.ipc, o.shm, (int)stride);
    env_run_three(&e, what);
    kvt_stats_t ss, rs;
    kvt_sender_stats(e.s, &ss);
    kvt_receiver_stats(e.r, &rs);
    bool want_shm = o.shm && !o.shm_refused;
    CHECK_EQ_INT(rs.shm_peers, want_shm ? 1 : 0);
    CHECK_EQ_INT(ss.shm_peers, want_shm ? 1 : 0);
    CHECK(ss.payload_bytes == rs.payload_bytes && ss.payload_bytes > 0);
    CHECK(want_shm ? rs.shm_payload_bytes == rs.payload_bytes : rs.shm_payload_bytes == 0);
    CHECK(ss.shm_payload_bytes == rs.shm_payload_bytes);
    env_fini(&e);
    g_block_stride = 3;
}

static void test_runs_sockets(void) {
    const eng_kv_dtype_t pairs[3][2] = {{ENG_KV_F32, ENG_KV_F32}, {ENG_KV_BF16, ENG_KV_BF16}, {ENG_KV_F32, ENG_KV_F16}};
    for (int i = 0; i < 3; i++)
        for (int ipc = 0; ipc < 2; ipc++) {
            env_opts_t o = s_opts();
            o.sdt = pairs[i][0], o.rdt = pairs[i][1], o.ipc = ipc;
            s_three(o, 1);
        }
}

static void test_shm_roundtrip(void) {
    const eng_kv_dtype_t pairs[4][2] = {
        {ENG_KV_F32, ENG_KV_F32}, {ENG_KV_BF16, ENG_KV_BF16}, {ENG_KV_F16, ENG_KV_F16}, {ENG_KV_F32, ENG_KV_BF16}};
    for (int i = 0; i < 4; i++)
        for (uint64_t stride = 1; stride <= 3; stride += 2) {
            env_opts_t o = s_opts();
            o.sdt = pairs[i][0], o.rdt = pairs[i][1], o.ipc = i % 2, o.shm = true;
            s_three(o, stride);
        }
}

/* A receiver that does not map the pool (another host, or switched off) gets the payload over sockets. */
static void test_shm_fallback(void) {
    env_opts_t o = s_opts();
    o.shm = true, o.shm_refused = true;
    s_three(o, 1);
}

/* A name the receiver cannot open (what another host sees) also falls back to sockets. */
static void test_shm_unknown_name(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.shm = true;
    env_prepare(&e, o);
    REQUIRE(env_open_receiver(&e, o));
    char real[128];
    memcpy(real, e.shm_name, sizeof real);
    snprintf(e.shm_name, sizeof e.shm_name, "/pdkv-does-not-exist-%d", (int)getpid());
    REQUIRE(env_open_sender(&e, o, kvt_receiver_endpoint(e.r)));
    memcpy(e.shm_name, real, sizeof real);
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 33, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_commit(e.s, id, 101), PD_OK);
    CHECK(env_run_until_released(&e, &id, 1, 5000));
    CHECK_MSG(e.rec[id].done_st == PD_OK, "%s", e.rec[id].err);
    CHECK(s_verify(&e, id));
    kvt_stats_t rs;
    kvt_receiver_stats(e.r, &rs);
    CHECK_EQ_INT(rs.shm_peers, 0);
    CHECK(rs.shm_payload_bytes == 0 && rs.payload_bytes > 0);
    env_fini(&e);
}

/* A bad checksum on the shared path fails that transfer only. */
static void test_shm_corrupt(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.shm = true;
    g_block_stride = 1;
    REQUIRE(env_init(&e, o));
    uint64_t ids[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(s_start(&e, ids[i], 1, 20, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_test_corrupt(e.s, 2), PD_OK);
    for (int i = 0; i < 3; i++) CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    CHECK(env_run_until_released(&e, ids, 3, 5000));
    CHECK_EQ_INT(e.rec[2].done_st, PD_EPROTO);
    CHECK_MSG(strstr(e.rec[2].err, "checksum") != NULL, "%s", e.rec[2].err);
    CHECK(e.rec[2].failed && !e.rec[2].committed);
    CHECK(s_verify(&e, 1) && s_verify(&e, 3));
    env_fini(&e);
    g_block_stride = 3;
}

/* The sender's pool changes under a transfer that is already announced: caught by the receiver's check of
 * the bytes it copied, never committed. */
static void test_shm_overwritten(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.shm = true;
    REQUIRE(env_init(&e, o));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_commit(e.s, id, 101), PD_OK);
    /* the sender alone: it announces everything its credit allows, nothing is copied yet */
    for (int i = 0; i < 100 && !e.rec[id].reserved; i++) {
        env_step(&e, true, false);
        if (!e.rec[id].reserved) env_step(&e, false, true);
    }
    CHECK(e.rec[id].reserved);
    memset(e.spool, 0x5a, eng_kv_pool_bytes(&e.sl));
    CHECK(env_run_until_released(&e, &id, 1, 5000));
    CHECK_EQ_INT(e.rec[id].done_st, PD_EPROTO);
    CHECK(e.rec[id].failed && !e.rec[id].committed);
    env_fini(&e);
}

/* Shared path, sender goes silent: the receiver frees the reservation at the transfer's timeout. */
static void test_shm_receiver_timeout(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.shm = true;
    REQUIRE(env_init(&e, o));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 300), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, 1), PD_OK);
    for (int i = 0; i < 50 && !e.rec[id].reserved; i++) env_step(&e, true, true);
    for (int i = 0; i < 10; i++) env_step(&e, true, true);
    CHECK(e.rec[id].reserved && e.rs.n_reserved > 0);
    uint64_t t0 = pd_now_us(), end = t0 + 3000000;
    while (!e.rec[id].failed && pd_now_us() < end) env_step(&e, false, true);
    CHECK(e.rec[id].failed && e.rec[id].failed_st == PD_ETIMEDOUT);
    CHECK(pd_now_us() - t0 < 1000000);
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    env_fini(&e);
}

/* Shared path, receiver gone mid-transfer: the sender's transfer ends by timeout and is released. */
static void test_shm_receiver_gone(void) {
    env_t e;
    env_opts_t o = s_opts();
    o.shm = true, o.reply_timeout_ms = 300;
    REQUIRE(env_init(&e, o));
    uint64_t id = 1;
    CHECK_EQ_INT(s_start(&e, id, 1, 16, 0), PD_OK);
    CHECK_EQ_INT(kvt_sender_layers_ready(e.s, id, 2), PD_OK);
    CHECK(env_step_until_reserved(&e, id, 50));
    kvt_receiver_destroy(&e.r);
    CHECK_EQ_INT(e.rs.n_reserved, 0);
    CHECK_EQ_INT(kvt_sender_commit(e.s, id, 101), PD_OK);
    uint64_t t0 = pd_now_us();
    CHECK(env_run_until_released(&e, &id, 1, 3000));
    CHECK_EQ_INT(e.rec[id].done_st, PD_ETIMEDOUT);
    CHECK(pd_now_us() - t0 < 1500000);
    env_fini(&e);
}

/* Every shared-pool message's frames dealt over the receiver's copy team (2 and 4 threads; whole runs and single
 * blocks): round trips stay exact (and over sockets, which keep one thread), and a bad checksum in a V frame fails
 * only its transfer. */
static void test_parallel_copy(void) {
    g_copy_parallel_min = 0;
    for (int32_t threads = 2; threads <= 4; threads += 2) {
        g_copy_threads = threads;
        env_opts_t o = s_opts();
        s_three(o, 1);
        o.shm = true;
        s_three(o, 1);
        s_three(o, 3);
        env_t e;
        g_block_stride = 1;
        REQUIRE(env_init(&e, o));
        uint64_t ids[3] = {1, 2, 3};
        for (int i = 0; i < 3; i++) CHECK_EQ_INT(s_start(&e, ids[i], 1, 20, 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_test_corrupt_frame(e.s, 2, 1), PD_OK);
        for (int i = 0; i < 3; i++) CHECK_EQ_INT(kvt_sender_commit(e.s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
        CHECK(env_run_until_released(&e, ids, 3, 5000));
        CHECK_EQ_INT(e.rec[2].done_st, PD_EPROTO);
        CHECK_MSG(strstr(e.rec[2].err, "V: checksum") != NULL, "%s", e.rec[2].err);
        CHECK(s_verify(&e, 1) && s_verify(&e, 3));
        env_fini(&e);
        g_block_stride = 3;
    }
    g_copy_threads = 2;
    g_copy_parallel_min = 1u << 20;
}

static bool s_shm_exists(const char *name) {
    int fd = shm_open(name, O_RDONLY, 0);
    if (fd >= 0) close(fd);
    return fd >= 0;
}

/* A pool whose creator died without destroying it (kill -9) is removed by the next sweep; a live process's stays. */
static void test_shm_sweep_stale(void) {
    char live[128], dead[128] = "";
    void *mine = kvt_shm_pool_create(1 << 16, live, sizeof live);
    REQUIRE(mine != NULL);
    int fds[2];
    REQUIRE(pipe(fds) == 0);
    pid_t child = fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        char name[128];
        void *p = kvt_shm_pool_create(1 << 16, name, sizeof name);
        ssize_t n = write(fds[1], name, strlen(name) + 1);
        _exit(p && n > 0 ? 0 : 1); /* no destroy: the object outlives its creator */
    }
    close(fds[1]);
    ssize_t n = read(fds[0], dead, sizeof dead - 1);
    close(fds[0]);
    int status = 0;
    REQUIRE(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0 && n > 0);
    CHECK(s_shm_exists(dead));
    CHECK(kvt_shm_sweep_stale() >= 1);
    CHECK_MSG(!s_shm_exists(dead), "%s survived the sweep", dead);
    CHECK_MSG(s_shm_exists(live), "the live process's %s was swept", live);
    kvt_shm_pool_destroy(mine, 1 << 16, live);
    CHECK(!s_shm_exists(live));
    if (s_shm_exists(dead)) shm_unlink(dead);
}

int main(void) {
    PD_TEST_RUN(test_shm_sweep_stale);
    PD_TEST_RUN(test_runs_sockets);
    PD_TEST_RUN(test_shm_roundtrip);
    PD_TEST_RUN(test_shm_fallback);
    PD_TEST_RUN(test_shm_unknown_name);
    PD_TEST_RUN(test_shm_corrupt);
    PD_TEST_RUN(test_shm_overwritten);
    PD_TEST_RUN(test_shm_receiver_timeout);
    PD_TEST_RUN(test_shm_receiver_gone);
    PD_TEST_RUN(test_parallel_copy);
    return pd_test_finish();
}
