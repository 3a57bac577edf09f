/* kvt_test_env.h: fixtures shared by the kvtransfer tests: a test KV store, sender + receiver on real
 * ZeroMQ sockets driven from one thread by alternating polls, and bit-exact verification of what landed.
 * Included by exactly one .c per test executable. */
#ifndef KVT_TEST_ENV_H
#define KVT_TEST_ENV_H

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "kvt.h"
#include "kvt_int.h"
#include "kvt_test_store.h"
#include "pd_test.h"

/* not every test uses every fixture */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"

/* ---- the test KV store (tests/kvt_test_store.h), optionally through the request-aware callbacks ---- */

/* the request-aware store callbacks: same pool, recording which request each call named */
static uint64_t g_reserve_req, g_release_req;
static int32_t g_reserve_tokens, g_n_release_for;

static pd_status ts_reserve_for(void *ctx, uint64_t request_id, int32_t n_tokens, int32_t n, int32_t *ids) {
    g_reserve_req = request_id, g_reserve_tokens = n_tokens;
    return kts_reserve(ctx, n, ids);
}

static void ts_release_for(void *ctx, uint64_t request_id, const int32_t *ids, int32_t n) {
    g_release_req = request_id, g_n_release_for++;
    kts_release(ctx, ids, n);
}

/* ---- a stand-in for another process's GPU pool (the real one, CUDA IPC, is tested on the GPU) ----
 * The "device handle" is the sender pool's address and layout check word; peer_copy copies chunk by chunk into the
 * receiver store, so the protocol around it (no payload frames, copies layer by layer, DONE after them, failures) runs
 * for real here. */

static int32_t g_peer_opens, g_peer_closes, g_peer_copies;
static int32_t g_peer_fail_copy = -1; /* the g_peer_copies count at which peer_copy fails (-1: never) */
static bool g_peer_refuse;            /* peer_open cannot map (another GPU, the CPU backend) */

typedef struct {
    const uint8_t *base;
    eng_kv_layout_t l;
} ts_peer_t;

static void *ts_peer_open(void *ctx, const void *handle, size_t len, const eng_kv_layout_t *src) {
    (void)ctx;
    if (g_peer_refuse || len != sizeof(uintptr_t)) return NULL;
    ts_peer_t *p = calloc(1, sizeof *p);
    uintptr_t a;
    memcpy(&a, handle, sizeof a);
    p->base = (const uint8_t *)a, p->l = *src;
    g_peer_opens++;
    return p;
}

static pd_status ts_peer_copy(void *ctx, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                              int32_t first_layer, int32_t n_layers) {
    const ts_peer_t *p = peer;
    if (g_peer_copies++ == g_peer_fail_copy) return PD_EBACKEND;
    for (int32_t i = 0; i < n; i++)
        for (int32_t ly = first_layer; ly < first_layer + n_layers; ly++)
            for (int kind = 0; kind < 2; kind++)
                memcpy(kts_chunk(ctx, ly, kind, dst[i]), p->base + eng_kv_chunk_offset(&p->l, ly, kind, src[i]),
                       eng_kv_chunk_bytes(&p->l));
    return PD_OK;
}

static void ts_peer_close(void *ctx, void *peer) {
    (void)ctx;
    g_peer_closes++;
    free(peer);
}

/* ---- fixtures ---- */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;
static uint32_t s_rand(void) {
    g_rng ^= g_rng << 13, g_rng ^= g_rng >> 7, g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 11);
}

/* Random values in [-4, -0.01] u [0.01, 4], in the pool's dtype: never zero. */
static void s_fill_random(void *pool, const eng_kv_layout_t *l) {
    size_t n = eng_kv_pool_bytes(l) / eng_kv_dtype_bytes(l->dtype);
    for (size_t i = 0; i < n; i++) {
        float x = 0.01f + (float)(s_rand() % 1000000) * (3.99f / 1000000.0f);
        if (s_rand() & 1) x = -x;
        if (l->dtype == ENG_KV_F32)
            ((float *)pool)[i] = x;
        else if (l->dtype == ENG_KV_F16)
            ((uint16_t *)pool)[i] = kvt_f32_to_f16(x);
        else
            ((uint16_t *)pool)[i] = kvt_f32_to_bf16(x);
    }
}

static eng_kv_layout_t s_layout(eng_kv_dtype_t dt, int32_t n_blocks) {
    eng_kv_layout_t l = {
        .n_layers = 4, .n_kv_heads = 2, .head_dim = 16, .block_size = 4, .n_blocks = n_blocks, .dtype = dt};
    return l;
}

static kvt_fingerprint_t s_fp(eng_kv_dtype_t dt) {
    kvt_fingerprint_t f;
    memset(&f, 0, sizeof f);
    snprintf(f.model_id, sizeof f.model_id, "test-model");
    f.weights_hash = 0x1234;
    f.tokenizer_hash = 0x5678;
    f.kv_dtype = dt;
    f.block_size = 4, f.n_layers = 4, f.n_kv_heads = 2, f.head_dim = 16;
    f.rope_theta = 10000.0f, f.rope_dim = 16;
    return f;
}

/* what each side reported about transfer id i */
typedef struct {
    bool reserved, done, released, committed, failed;
    bool is_on_device; /* COMMITTED said so */
    pd_status done_st, failed_st;
    int32_t first_token, n_blocks, n_tokens;
    int32_t rblocks[256];
    uint8_t info[64]; /* COMMITTED: the first 64 bytes of first_token_info */
    size_t info_len;
    char err[160];
} trec_t;

typedef struct {
    void *zctx;
    kvt_sender_t *s;
    kvt_receiver_t *r;
    kvt_test_store_t rs; /* receiver store */
    eng_kv_layout_t sl;  /* sender layout */
    uint8_t *spool;
    trec_t rec[128];
    int sender_rc; /* last negative poll result */
    char ep[256];
    char shm_name[128]; /* spool is a shared pool when set */
} env_t;

static int g_ipc_n;
static uint64_t g_copy_parallel_min = 1u << 20; /* the receiver's copy_parallel_min_bytes */
static int32_t g_copy_threads = 2;              /* the receiver's copy_threads */

typedef struct {
    eng_kv_dtype_t sdt, rdt;
    bool ipc;
    int32_t s_blocks, r_blocks;
    uint64_t credit_bytes;
    int32_t reply_timeout_ms;
    bool fp_mismatch;
    bool shm;         /* the sender's pool in shared memory, offered to the receiver */
    bool shm_refused; /* ... and the receiver does not map it (sockets) */
    int32_t n_conns;  /* sender connections (0: the default, 1) */
    bool by_request;  /* the receiver store uses reserve_for / release_for */
    bool device;      /* the sender offers its pool as a "device" pool (ts_peer_*), the receiver's store can map it */
} env_opts_t;

static env_opts_t s_opts(void) {
    env_opts_t o = {.sdt = ENG_KV_F32,
                    .rdt = ENG_KV_F32,
                    .s_blocks = 64,
                    .r_blocks = 64,
                    .credit_bytes = 1 << 20,
                    .reply_timeout_ms = 2000};
    return o;
}

static void env_prepare(env_t *e, env_opts_t o) {
    memset(e, 0, sizeof *e);
    e->zctx = zmq_ctx_new();
    REQUIRE(kts_init(&e->rs, s_layout(o.rdt, o.r_blocks)));
    e->sl = s_layout(o.sdt, o.s_blocks);
    if (o.shm) {
        e->spool = kvt_shm_pool_create(eng_kv_pool_bytes(&e->sl), e->shm_name, sizeof e->shm_name);
        REQUIRE(e->spool != NULL);
    } else {
        e->spool = malloc(eng_kv_pool_bytes(&e->sl));
    }
    s_fill_random(e->spool, &e->sl);
}

static bool env_open_receiver(env_t *e, env_opts_t o) {
    char err[256] = "";
    kvt_receiver_params_t rp = kvt_receiver_params_default();
    if (o.ipc)
        snprintf(e->ep, sizeof e->ep, "ipc:///tmp/kvt_test_%d_%d", (int)getpid(), g_ipc_n++);
    else
        snprintf(e->ep, sizeof e->ep, "tcp://127.0.0.1:0");
    rp.endpoint = e->ep;
    rp.fingerprint = s_fp(o.rdt);
    if (o.fp_mismatch) rp.fingerprint.tokenizer_hash ^= 1;
    rp.layout = e->rs.l;
    rp.store = kts_store(&e->rs);
    if (o.by_request)
        rp.store = (kvt_store_t){
            .ctx = &e->rs, .chunk = kts_chunk, .reserve_for = ts_reserve_for, .release_for = ts_release_for};
    if (o.device)
        rp.store.peer_open = ts_peer_open, rp.store.peer_copy = ts_peer_copy, rp.store.peer_close = ts_peer_close;
    rp.credit_bytes = o.credit_bytes;
    rp.copy_parallel_min_bytes = g_copy_parallel_min; /* 0: every shared-pool message through the copy team */
    rp.copy_threads = g_copy_threads;
    rp.max_message_bytes = 1 << 20;
    rp.is_shm_enabled = !o.shm_refused;
    e->r = kvt_receiver_create(e->zctx, &rp, err, sizeof err);
    if (!e->r) {
        fprintf(stderr, "receiver: %s\n", err);
        return false;
    }
    return true;
}

static bool env_open_sender(env_t *e, env_opts_t o, const char *endpoint) {
    char err[256] = "";
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = endpoint;
    sp.fingerprint = s_fp(o.sdt);
    sp.layout = e->sl;
    sp.pool_base = e->spool;
    sp.reply_timeout_ms = o.reply_timeout_ms;
    sp.handshake_timeout_ms = 500;
    sp.pool_shm_name = e->shm_name[0] ? e->shm_name : NULL;
    sp.max_frame_bytes = 3 * eng_kv_chunk_bytes(&e->sl); /* runs of up to 3 blocks: several per message */
    if (o.n_conns > 0) sp.n_conns = o.n_conns;
    uintptr_t handle = (uintptr_t)e->spool;
    if (o.device) sp.device_handle = &handle, sp.device_handle_len = sizeof handle;
    e->s = kvt_sender_create(e->zctx, &sp, err, sizeof err);
    if (!e->s) fprintf(stderr, "sender: %s\n", err);
    return e->s != NULL;
}

static bool env_init(env_t *e, env_opts_t o) {
    env_prepare(e, o);
    return env_open_receiver(e, o) && env_open_sender(e, o, kvt_receiver_endpoint(e->r));
}

/* Releases what was committed (the decode side would own it), then checks nothing is left reserved. */
static void env_fini(env_t *e) {
    for (int i = 0; i < 128; i++)
        if (e->rec[i].committed) kts_release(&e->rs, e->rec[i].rblocks, e->rec[i].n_blocks);
    kvt_sender_destroy(&e->s);
    if (e->r) {
        kvt_stats_t st;
        kvt_receiver_stats(e->r, &st);
        CHECK_EQ_INT(st.reserved_blocks, 0);
        CHECK_EQ_INT(st.active_transfers, 0);
    }
    kvt_receiver_destroy(&e->r);
    CHECK_EQ_INT(e->rs.n_reserved, 0);
    zmq_ctx_term(e->zctx);
    if (strncmp(e->ep, "ipc://", 6) == 0) unlink(e->ep + 6); /* libzmq 4.3 leaves the socket file */
    CHECK_EQ_INT(e->rs.n_bad, 0);                            /* no double, foreign or out-of-reservation access */
    kts_fini(&e->rs);
    if (e->shm_name[0])
        kvt_shm_pool_destroy(e->spool, eng_kv_pool_bytes(&e->sl), e->shm_name);
    else
        free(e->spool);
}

static void s_take_sender(env_t *e, const kvt_event_t *ev, int n) {
    for (int i = 0; i < n; i++) {
        trec_t *t = &e->rec[ev[i].transfer_id % 128];
        if (ev[i].kind == KVT_EV_RESERVED) t->reserved = true;
        if (ev[i].kind == KVT_EV_DONE) {
            CHECK(!t->done);
            t->done = true;
            t->done_st = ev[i].status;
            memcpy(t->err, ev[i].err, sizeof t->err);
        }
        if (ev[i].kind == KVT_EV_RELEASED) {
            CHECK(t->done && !t->released);
            t->released = true;
        }
    }
}

static void s_take_receiver(env_t *e, const kvt_event_t *ev, int n) {
    for (int i = 0; i < n; i++) {
        trec_t *t = &e->rec[ev[i].transfer_id % 128];
        if (ev[i].kind == KVT_EV_COMMITTED) {
            t->committed = true;
            t->first_token = ev[i].first_token;
            t->n_blocks = ev[i].n_blocks;
            t->n_tokens = ev[i].n_tokens;
            t->is_on_device = ev[i].is_on_device;
            memcpy(t->rblocks, ev[i].block_ids, (size_t)ev[i].n_blocks * sizeof(int32_t));
            t->info_len = ev[i].first_token_info_len;
            if (t->info_len) memcpy(t->info, ev[i].first_token_info, t->info_len < 64 ? t->info_len : 64);
        }
        if (ev[i].kind == KVT_EV_FAILED) {
            t->failed = true;
            t->failed_st = ev[i].status;
        }
    }
}

/* One round: each side polls briefly. */
static void env_step(env_t *e, bool poll_sender, bool poll_receiver) {
    kvt_event_t ev[64];
    if (poll_sender && e->s) {
        int n = kvt_sender_poll(e->s, 1, ev, 64);
        if (n < 0)
            e->sender_rc = n;
        else
            s_take_sender(e, ev, n);
    }
    if (poll_receiver && e->r) {
        int n = kvt_receiver_poll(e->r, 1, ev, 64);
        CHECK(n >= 0);
        if (n > 0) s_take_receiver(e, ev, n);
    }
}

/* Steps both sides until transfer id is reserved, at most max_steps rounds; whether it is. */
static bool env_step_until_reserved(env_t *e, uint64_t id, int max_steps) {
    for (int i = 0; i < max_steps && !e->rec[id % 128].reserved; i++) env_step(e, true, true);
    return e->rec[id % 128].reserved;
}

/* Steps until every listed transfer was released by the sender (or the time runs out). */
static bool env_run_until_released(env_t *e, const uint64_t *ids, int n, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (pd_now_us() < end) {
        env_step(e, true, true);
        bool all = true;
        for (int i = 0; i < n; i++) all = all && e->rec[ids[i] % 128].released;
        if (all) {
            for (int k = 0; k < 5; k++) env_step(e, true, true); /* let the receiver's events land too */
            return true;
        }
    }
    return false;
}

static int32_t g_sblocks[128][64];
/* sender block i of a transfer is (id * 7 + i * stride) mod n_blocks: 1 gives runs of consecutive blocks
 * (broken where it wraps), 3 gives no two consecutive */
static uint64_t g_block_stride = 3;

static pd_status s_start(env_t *e, uint64_t id, uint32_t epoch, int32_t n_tokens, int32_t timeout_ms) {
    int32_t nb = (n_tokens + e->sl.block_size - 1) / e->sl.block_size;
    for (int32_t i = 0; i < nb; i++)
        g_sblocks[id % 128][i] = (int32_t)((id * 7 + (uint64_t)i * g_block_stride) % (uint64_t)e->sl.n_blocks);
    kvt_transfer_t t = {.request_id = 0xabc000 + id,
                        .transfer_id = id,
                        .epoch = epoch,
                        .n_tokens = n_tokens,
                        .block_ids = g_sblocks[id % 128],
                        .timeout_ms = timeout_ms};
    return kvt_sender_start(e->s, &t);
}

/* Every chunk of transfer id arrived as sent: bit-exact for equal dtypes, else exactly the conversion. */
static bool s_verify(env_t *e, uint64_t id) {
    trec_t *t = &e->rec[id % 128];
    if (!t->committed) return false;
    const eng_kv_layout_t *sl = &e->sl, *rl = &e->rs.l;
    size_t elems = eng_kv_chunk_elems(sl);
    float *a = malloc(elems * sizeof(float)), *b = malloc(elems * sizeof(float));
    bool ok = true;
    for (int32_t bi = 0; bi < t->n_blocks && ok; bi++)
        for (int32_t ly = 0; ly < sl->n_layers && ok; ly++)
            for (int kind = 0; kind < 2 && ok; kind++) {
                const uint8_t *src = e->spool + eng_kv_chunk_offset(sl, ly, kind, g_sblocks[id % 128][bi]);
                const uint8_t *dst = kts_chunk(&e->rs, ly, kind, t->rblocks[bi]);
                if (sl->dtype == rl->dtype) {
                    ok = memcmp(src, dst, eng_kv_chunk_bytes(sl)) == 0;
                    continue;
                }
                /* expected: the sender's values through our f32 path; within relative rounding error too */
                kvt_convert(a, ENG_KV_F32, src, sl->dtype, elems);
                kvt_convert(b, ENG_KV_F32, dst, rl->dtype, elems);
                float tol = rl->dtype == ENG_KV_F16 ? 1.0f / 2048 : rl->dtype == ENG_KV_BF16 ? 1.0f / 256 : 0.0f;
                for (size_t i = 0; i < elems && ok; i++) {
                    ok = fabsf(a[i] - b[i]) <= tol * fabsf(a[i]) && b[i] != 0.0f;
                    if (!ok) fprintf(stderr, "elem %zu: sent %g got %g\n", i, (double)a[i], (double)b[i]);
                }
            }
    free(a);
    free(b);
    return ok && t->first_token == (int32_t)(100 + id);
}

/* Transfers 1, 2 and 3 (1, 13 and 40 tokens) started and committed at once; each must land exactly (what, in the
 * messages, names the case). */
static void env_run_three(env_t *e, const char *what) {
    const int32_t toks[3] = {1, 13, 40};
    uint64_t ids[3] = {1, 2, 3};
    for (int i = 0; i < 3; i++) {
        CHECK_EQ_INT(s_start(e, ids[i], 1, toks[i], 0), PD_OK);
        CHECK_EQ_INT(kvt_sender_commit(e->s, ids[i], (int32_t)(100 + ids[i])), PD_OK);
    }
    CHECK(env_run_until_released(e, ids, 3, 5000));
    for (int i = 0; i < 3; i++) {
        CHECK_MSG(e->rec[ids[i]].done_st == PD_OK, "transfer %d (%s): %s", (int)ids[i], what, e->rec[ids[i]].err);
        CHECK_MSG(s_verify(e, ids[i]), "transfer %d (%s)", (int)ids[i], what);
        CHECK_EQ_INT(e->rec[ids[i]].n_tokens, toks[i]);
    }
}

#pragma GCC diagnostic pop

#endif
