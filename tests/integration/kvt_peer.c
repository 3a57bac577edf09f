/* kvt_peer.c: one party of the KV hand-off in its own process, for tests/integration/test_kvt_faults.c. Plays
 * a kvt sender or receiver (kvt.h only) with a small fixed layout and a pool filled from a seed, a proxy that
 * corrupts or drops one frame in flight, or a "rogue" raw DEALER that sends hand-made envelopes (wrong
 * protocol version, stale epochs, garbage). It prints one line per step, event and counter set on stdout,
 * kills itself with SIGKILL after step --die-after-step K, and never runs longer than --run-ms.
 * Not a service: no config file, no recovery logic beyond what the scenarios need.
 *
 * Steps (the hook fires after step K; the process first sleeps --flush-ms without polling, so the messages
 * step K handed to ZeroMQ are on the wire, then raises SIGKILL):
 *   sender   1 created (nothing sent: kvt does I/O only inside poll)
 *            2 hello exchanged (polled --hello-ms with no transfer; kvt.h does not expose the handshake state)
 *            3 transfers started and one poll(0) made: each KvReserve handed to ZeroMQ
 *            4 RESERVED for every transfer (the receiver holds blocks, no payload yet)
 *            5 layer 0 marked ready and some payload sent (stats.payload_bytes > 0)
 *            6 every layer marked ready and all payload sent (layers follow each other --layer-gap-ms apart)
 *            7 commit called and one poll(0) made: each KvCommit handed to ZeroMQ
 *            8 DONE for every transfer
 *   receiver 1 bound (never polled)
 *            2 a sender connected (socket monitor) and --hello-ms of polls passed: its hello was answered
 *            3 a reservation was made (stats.reserved_blocks > 0)
 *            4 some payload was written (stats.payload_bytes > 0)
 *            5 --expect transfers (at least one) committed and their KvDone sent
 *
 * Output lines: READY <endpoint>, STEP k, EV role=.. kind=.. transfer=.. status=PD_.. t=ms err=..,
 * VERIFY transfer=.. ok=0|1, START/POLL (errors), STATS role=.. (counters), FINAL (after destroy), RAW (rogue),
 * MANGLED (proxy), ROUND/WAIT_GO (sender with --rounds > 1: waits for SIGUSR1 between rounds). */
#define _POSIX_C_SOURCE 200809L /* nanosleep, sigaction */
#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <xxhash.h>
#include <zmq.h>

#include "../kvt_test_store.h"
#include "kvt.h"
#include "pd_log.h"
#include "pdserve_kv.pb-c.h"

enum {
    PEER_N_LAYERS = 4,
    PEER_N_KV_HEADS = 2,
    PEER_HEAD_DIM = 64,
    PEER_BLOCK_SIZE = 16,
    PEER_MAX_TX = 16,    /* transfers per round */
    PEER_MAX_BLOCKS = 4, /* blocks per transfer */
    PEER_RX_BLOCKS = 64, /* receiver pool */
};

typedef struct {
    const char *role, *endpoint, *listen, *variant, *mangle, *rogue;
    eng_kv_dtype_t dtype;
    uint64_t seed;
    int die_after, flush_ms, run_ms, hello_ms, layer_gap_ms, linger_ms;
    int timeout_ms, reply_timeout_ms, handshake_timeout_ms;
    int n_transfers, id_base, rounds, expect, mangle_transfer, mangle_nth;
} peer_opts_t;

static volatile sig_atomic_t g_stop, g_go; /* SIGTERM: report and exit; SIGUSR1: next round */
static uint64_t g_t0_us;

static void s_on_signal(int sig) {
    if (sig == SIGUSR1)
        g_go = 1;
    else
        g_stop = 1;
}

static unsigned long long s_ms(void) {
    return (unsigned long long)((pd_now_us() - g_t0_us) / 1000u);
}

static void s_out(const char *fmt, ...) PD_PRINTF(1, 2);
static void s_out(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

static void s_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void s_step(const peer_opts_t *o, int k) {
    s_out("STEP %d t=%llu", k, s_ms());
    if (k != o->die_after) return;
    s_sleep_ms(o->flush_ms); /* "after step k" includes the message step k queued */
    s_out("DIE %d t=%llu", k, s_ms());
    raise(SIGKILL);
}

/* ---- layout, fingerprint and the seeded pattern ---- */

static eng_kv_layout_t s_layout(const peer_opts_t *o, int32_t n_blocks) {
    bool other = strcmp(o->variant, "layout") == 0; /* a worker with another KV layout, consistently so */
    eng_kv_layout_t l = {.n_layers = PEER_N_LAYERS,
                         .n_kv_heads = other ? 1 : PEER_N_KV_HEADS,
                         .head_dim = PEER_HEAD_DIM,
                         .block_size = PEER_BLOCK_SIZE,
                         .n_blocks = n_blocks,
                         .dtype = o->dtype};
    return l;
}

static kvt_fingerprint_t s_fingerprint(const peer_opts_t *o, const eng_kv_layout_t *l) {
    kvt_fingerprint_t f;
    memset(&f, 0, sizeof f);
    snprintf(f.model_id, sizeof f.model_id, "%s", strcmp(o->variant, "model") == 0 ? "other-model" : "kvt-peer");
    f.weights_hash = strcmp(o->variant, "weights") == 0 ? 0x1112 : 0x1111;
    f.tokenizer_hash = strcmp(o->variant, "tokenizer") == 0 ? 0x2223 : 0x2222;
    f.kv_dtype = l->dtype;
    f.block_size = l->block_size;
    f.n_layers = l->n_layers;
    f.n_kv_heads = l->n_kv_heads;
    f.head_dim = l->head_dim;
    f.rope_theta = strcmp(o->variant, "rope_theta") == 0 ? 500000.0f : 10000.0f;
    f.rope_dim = l->head_dim;
    return f;
}

static uint64_t s_mix(uint64_t x) { /* splitmix64 */
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/* Element e of (layer, kind) of the transfer's bi-th block: k/32 with |k| <= 127, exact in f32, f16 and bf16,
 * so a receiver of any dtype can check every element exactly. */
static float s_value(uint64_t seed, uint64_t transfer_id, int32_t bi, int32_t layer, int kind, size_t e) {
    uint64_t key = ((((transfer_id * 8u + (uint64_t)bi) * 8u + (uint64_t)layer) * 2u + (uint64_t)kind) << 20) + e;
    return (float)((int)(s_mix(seed ^ s_mix(key)) % 255u) - 127) / 32.0f;
}

static void s_store(void *chunk, eng_kv_dtype_t dt, size_t i, float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if (dt == ENG_KV_F32) {
        ((float *)chunk)[i] = x;
    } else if (dt == ENG_KV_BF16) {
        ((uint16_t *)chunk)[i] = (uint16_t)(u >> 16); /* exact for s_value's values */
    } else {
        uint16_t h = (uint16_t)((u >> 16) & 0x8000u);
        if (u & 0x7fffffffu) h |= (uint16_t)((((u >> 23) & 0xffu) - 127u + 15u) << 10 | ((u >> 13) & 0x3ffu));
        ((uint16_t *)chunk)[i] = h;
    }
}

static float s_load(const void *chunk, eng_kv_dtype_t dt, size_t i) {
    if (dt == ENG_KV_F32) return ((const float *)chunk)[i];
    uint32_t h = ((const uint16_t *)chunk)[i], u;
    if (dt == ENG_KV_BF16) {
        u = h << 16;
    } else {
        uint32_t sign = (h & 0x8000u) << 16, ex = (h >> 10) & 0x1fu, man = h & 0x3ffu;
        if (ex == 0) return (sign ? -1.0f : 1.0f) * ldexpf((float)man, -24);
        if (ex == 31) return man ? NAN : (sign ? -INFINITY : INFINITY);
        u = sign | ((ex - 15u + 127u) << 23) | (man << 13);
    }
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

static void s_fill_chunk(void *chunk, const eng_kv_layout_t *l, uint64_t seed, uint64_t id, int32_t bi, int32_t layer,
                         int kind) {
    size_t n = eng_kv_chunk_elems(l);
    for (size_t e = 0; e < n; e++) s_store(chunk, l->dtype, e, s_value(seed, id, bi, layer, kind, e));
}

/* Transfer i of a round: 40, 28, 16 or 5 tokens (3, 2, 1, 1 blocks), in blocks of its own slot, reversed. */
static int32_t s_tx_tokens(int i) {
    static const int32_t toks[4] = {40, 28, 16, 5};
    return toks[i % 4];
}

/* ---- sender ---- */

typedef struct {
    uint64_t id;
    int32_t n_blocks;
    int32_t blocks[PEER_MAX_BLOCKS];
    bool is_live, is_reserved, is_done, is_released;
    pd_status done_st;
} ptx_t;

typedef struct {
    const peer_opts_t *o;
    kvt_sender_t *s;
    eng_kv_layout_t l;
    uint8_t *pool;
    ptx_t tx[PEER_MAX_TX];
    uint64_t next_id;
    uint64_t payload_base, payload_want; /* this round's payload, for steps 5 and 6 */
    int32_t n_pinned;                    /* blocks handed to kvt and not yet RELEASED */
    int poll_rc;
} psend_t;

static const char *s_kind_name(kvt_event_kind_t k) {
    switch (k) {
    case KVT_EV_RESERVED: return "RESERVED";
    case KVT_EV_DONE: return "DONE";
    case KVT_EV_RELEASED: return "RELEASED";
    case KVT_EV_COMMITTED: return "COMMITTED";
    case KVT_EV_FAILED: return "FAILED";
    }
    return "?";
}

static void s_print_ev(const char *role, const kvt_event_t *e) {
    s_out("EV role=%s kind=%s transfer=%llu status=%s t=%llu err=%s", role, s_kind_name(e->kind),
          (unsigned long long)e->transfer_id, pd_strerror(e->status), s_ms(), e->err);
}

static void s_sender_poll(psend_t *c, int ms) {
    kvt_event_t ev[32];
    int n = kvt_sender_poll(c->s, ms, ev, 32);
    if (n < 0) {
        if (n != c->poll_rc) s_out("POLL rc=%s t=%llu err=%s", pd_strerror(n), s_ms(), kvt_sender_error(c->s));
        c->poll_rc = n;
        return;
    }
    for (int i = 0; i < n; i++) {
        s_print_ev("sender", &ev[i]);
        for (int j = 0; j < c->o->n_transfers; j++) {
            ptx_t *t = &c->tx[j];
            if (!t->is_live || t->id != ev[i].transfer_id) continue;
            if (ev[i].kind == KVT_EV_RESERVED) t->is_reserved = true;
            if (ev[i].kind == KVT_EV_DONE) t->is_done = true, t->done_st = ev[i].status;
            if (ev[i].kind == KVT_EV_RELEASED) {
                t->is_released = true, t->is_live = false;
                c->n_pinned -= t->n_blocks;
            }
        }
    }
}

static bool p_reserved(const psend_t *c) {
    for (int i = 0; i < c->o->n_transfers; i++)
        if (c->tx[i].is_live && !c->tx[i].is_reserved) return false;
    return true;
}

static bool p_any_done(const psend_t *c) {
    for (int i = 0; i < c->o->n_transfers; i++)
        if (c->tx[i].is_done) return true;
    return false;
}

static bool p_payload_some(const psend_t *c) {
    kvt_stats_t st;
    kvt_sender_stats(c->s, &st);
    return st.payload_bytes > c->payload_base;
}

static bool p_payload_all(const psend_t *c) {
    kvt_stats_t st;
    kvt_sender_stats(c->s, &st);
    return st.payload_bytes >= c->payload_base + c->payload_want;
}

static bool p_done(const psend_t *c) {
    for (int i = 0; i < c->o->n_transfers; i++)
        if (c->tx[i].is_live && !c->tx[i].is_done) return false;
    return true;
}

static bool p_released(const psend_t *c) {
    for (int i = 0; i < c->o->n_transfers; i++)
        if (c->tx[i].is_live) return false;
    return true;
}

/* Polls until pred holds (true), every transfer ended early (false, unless pred is about that), or the
 * deadline. */
static bool s_sender_wait(psend_t *c, bool (*pred)(const psend_t *), bool stop_on_failure, uint64_t deadline) {
    while (!pred(c) && !g_stop && pd_now_us() < deadline) {
        if (stop_on_failure && p_any_done(c)) return false;
        s_sender_poll(c, 5);
    }
    return pred(c);
}

static void s_sender_poll_for(psend_t *c, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (pd_now_us() < end && !g_stop) s_sender_poll(c, 5);
}

/* Starts n transfers, streams them layer by layer, commits: one round. true if every one ended PD_OK. The
 * step hook is live in round 0 only. */
static bool s_sender_round(psend_t *c, bool is_hooked, uint64_t deadline) {
    const peer_opts_t *o = c->o;
    const eng_kv_layout_t *l = &c->l;
    kvt_stats_t st;
    kvt_sender_stats(c->s, &st);
    c->payload_base = st.payload_bytes;
    c->payload_want = 0;
    for (int i = 0; i < o->n_transfers; i++) {
        ptx_t *t = &c->tx[i];
        int32_t n_tokens = s_tx_tokens(i);
        memset(t, 0, sizeof *t);
        t->id = c->next_id++;
        t->n_blocks = (n_tokens + l->block_size - 1) / l->block_size;
        for (int32_t bi = 0; bi < t->n_blocks; bi++) {
            t->blocks[bi] = i * PEER_MAX_BLOCKS + (t->n_blocks - 1 - bi);
            for (int32_t ly = 0; ly < l->n_layers; ly++)
                for (int kind = 0; kind < 2; kind++)
                    s_fill_chunk(c->pool + eng_kv_chunk_offset(l, ly, (eng_kv_kind_t)kind, t->blocks[bi]), l, o->seed,
                                 t->id, bi, ly, kind);
        }
        kvt_transfer_t d = {.request_id = 0xfee000u + t->id,
                            .transfer_id = t->id,
                            .epoch = 1,
                            .n_tokens = n_tokens,
                            .block_ids = t->blocks,
                            .timeout_ms = o->timeout_ms};
        pd_status rc = kvt_sender_start(c->s, &d);
        if (rc != PD_OK) {
            s_out("START transfer=%llu rc=%s t=%llu err=%s", (unsigned long long)t->id, pd_strerror(rc), s_ms(),
                  kvt_sender_error(c->s));
            continue;
        }
        t->is_live = true;
        c->n_pinned += t->n_blocks;
        c->payload_want += (uint64_t)t->n_blocks * (uint64_t)l->n_layers * 2u * eng_kv_chunk_bytes(l);
    }
    bool any_live = false;
    for (int i = 0; i < o->n_transfers; i++) any_live = any_live || c->tx[i].is_live;
    if (!any_live) return false; /* refused at start (the handshake failed): nothing to stream */
    s_sender_poll(c, 0);
    if (is_hooked) s_step(o, 3);
    if (s_sender_wait(c, p_reserved, true, deadline) && is_hooked) s_step(o, 4);
    for (int i = 0; i < o->n_transfers; i++)
        if (c->tx[i].is_live && kvt_sender_layers_ready(c->s, c->tx[i].id, 1) != PD_OK)
            s_out("LAYERS transfer=%llu failed", (unsigned long long)c->tx[i].id);
    if (s_sender_wait(c, p_payload_some, true, deadline) && is_hooked) s_step(o, 5);
    for (int32_t ly = 2; ly <= l->n_layers; ly++) {
        s_sender_poll_for(c, o->layer_gap_ms);
        for (int i = 0; i < o->n_transfers; i++)
            if (c->tx[i].is_live && kvt_sender_layers_ready(c->s, c->tx[i].id, ly) != PD_OK)
                s_out("LAYERS transfer=%llu failed", (unsigned long long)c->tx[i].id);
    }
    if (s_sender_wait(c, p_payload_all, true, deadline) && is_hooked) s_step(o, 6);
    for (int i = 0; i < o->n_transfers; i++)
        if (c->tx[i].is_live && kvt_sender_commit(c->s, c->tx[i].id, (int32_t)(1000u + c->tx[i].id)) != PD_OK)
            s_out("COMMIT transfer=%llu failed", (unsigned long long)c->tx[i].id);
    s_sender_poll(c, 0);
    if (is_hooked) s_step(o, 7);
    if (s_sender_wait(c, p_done, false, deadline) && is_hooked) s_step(o, 8);
    s_sender_wait(c, p_released, false, deadline);
    bool ok = true;
    for (int i = 0; i < o->n_transfers; i++) ok = ok && c->tx[i].is_released && c->tx[i].done_st == PD_OK;
    return ok;
}

static int s_run_sender(const peer_opts_t *o, void *zctx) {
    psend_t c;
    memset(&c, 0, sizeof c);
    c.o = o;
    c.next_id = (uint64_t)o->id_base + 1u;
    c.l = s_layout(o, PEER_MAX_TX * PEER_MAX_BLOCKS);
    c.pool = calloc(1, eng_kv_pool_bytes(&c.l));
    char err[256] = "";
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = o->endpoint;
    sp.sender_id = "kvt-peer";
    sp.fingerprint = s_fingerprint(o, &c.l);
    sp.layout = c.l;
    sp.pool_base = c.pool;
    sp.reply_timeout_ms = o->reply_timeout_ms;
    sp.handshake_timeout_ms = o->handshake_timeout_ms;
    c.s = c.pool ? kvt_sender_create(zctx, &sp, err, sizeof err) : NULL;
    if (!c.s) {
        s_out("CREATE failed err=%s", err);
        free(c.pool);
        return 1;
    }
    uint64_t deadline = g_t0_us + (uint64_t)o->run_ms * 1000u;
    s_step(o, 1);
    s_sender_poll_for(&c, o->hello_ms);
    s_step(o, 2);
    for (int round = 0; round < o->rounds && !g_stop && pd_now_us() < deadline; round++) {
        if (round > 0) { /* the test restarts the receiver meanwhile */
            s_out("WAIT_GO round=%d t=%llu", round, s_ms());
            while (!g_go && !g_stop && pd_now_us() < deadline) s_sender_poll(&c, 5);
            g_go = 0;
        }
        bool ok = s_sender_round(&c, round == 0, deadline);
        /* after the first round, retry as a prefill worker would, until the deadline */
        uint64_t attempt_us = (uint64_t)(2 * (o->timeout_ms + o->layer_gap_ms * PEER_N_LAYERS)) * 1000u;
        while (!ok && round > 0 && c.poll_rc == 0 && !g_stop && pd_now_us() + attempt_us < deadline)
            ok = s_sender_round(&c, false, deadline); /* the last attempt ends before the deadline */
        s_out("ROUND %d ok=%d t=%llu", round, ok, s_ms());
    }
    kvt_stats_t st;
    kvt_sender_stats(c.s, &st);
    s_out("STATS role=sender started=%llu done=%llu failed=%llu payload=%llu stale=%llu active=%d pinned=%d",
          (unsigned long long)st.transfers_started, (unsigned long long)st.transfers_done,
          (unsigned long long)st.transfers_failed, (unsigned long long)st.payload_bytes,
          (unsigned long long)st.frames_dropped_stale, st.active_transfers, c.n_pinned);
    kvt_sender_destroy(&c.s);
    free(c.pool);
    s_out("FINAL role=sender t=%llu", s_ms());
    return 0;
}

/* ---- receiver ---- */

/* Every element of every committed block equals the sender's pattern (exact in any dtype). */
static bool s_verify(const kvt_test_store_t *s, uint64_t seed, const kvt_event_t *e) {
    if (e->n_blocks <= 0 || e->n_blocks > PEER_MAX_BLOCKS || e->first_token != (int32_t)(1000u + e->transfer_id))
        return false;
    size_t n = eng_kv_chunk_elems(&s->l);
    for (int32_t bi = 0; bi < e->n_blocks; bi++)
        for (int32_t ly = 0; ly < s->l.n_layers; ly++)
            for (int kind = 0; kind < 2; kind++) {
                const uint8_t *chunk = s->pool + eng_kv_chunk_offset(&s->l, ly, (eng_kv_kind_t)kind, e->block_ids[bi]);
                for (size_t i = 0; i < n; i++)
                    if (s_load(chunk, s->l.dtype, i) != s_value(seed, e->transfer_id, bi, ly, kind, i)) return false;
            }
    return true;
}

typedef struct {
    int reached, n_committed, n_ended;
    bool is_accepted;
    uint64_t accepted_us, last_end_us;
} prx_t;

/* Advances the step counter as far as the receiver's state allows (firing the hook on the way). */
static void s_receiver_steps(const peer_opts_t *o, kvt_receiver_t *r, prx_t *x) {
    for (;;) {
        kvt_stats_t st;
        kvt_receiver_stats(r, &st);
        bool next = false;
        if (x->reached == 1)
            next = x->is_accepted && pd_now_us() >= x->accepted_us + (uint64_t)o->hello_ms * 1000u;
        else if (x->reached == 2)
            next = st.reserved_blocks > 0;
        else if (x->reached == 3)
            next = st.payload_bytes > 0;
        else if (x->reached == 4)
            next = x->n_committed >= (o->expect > 0 ? o->expect : 1);
        if (!next) return;
        s_step(o, ++x->reached);
    }
}

static void s_receiver_events(const peer_opts_t *o, kvt_test_store_t *ps, prx_t *x, const kvt_event_t *ev, int n) {
    for (int i = 0; i < n; i++) {
        s_print_ev("receiver", &ev[i]);
        if (ev[i].kind == KVT_EV_COMMITTED) {
            s_out("VERIFY transfer=%llu ok=%d n_blocks=%d n_tokens=%d", (unsigned long long)ev[i].transfer_id,
                  s_verify(ps, o->seed, &ev[i]), ev[i].n_blocks, ev[i].n_tokens);
            kts_release(ps, ev[i].block_ids, ev[i].n_blocks); /* the decode side would own them now */
            x->n_committed++;
        }
        x->n_ended++;
        x->last_end_us = pd_now_us();
    }
}

static int s_run_receiver(const peer_opts_t *o, void *zctx) {
    kvt_test_store_t ps;
    bool is_store_ok = kts_init(&ps, s_layout(o, PEER_RX_BLOCKS));
    char err[256] = "";
    kvt_receiver_params_t rp = kvt_receiver_params_default();
    rp.endpoint = o->endpoint;
    rp.fingerprint = s_fingerprint(o, &ps.l);
    rp.layout = ps.l;
    rp.store = kts_store(&ps);
    rp.credit_bytes = 1u << 20;
    rp.max_message_bytes = 4u << 20;
    kvt_receiver_t *r = is_store_ok ? kvt_receiver_create(zctx, &rp, err, sizeof err) : NULL;
    if (!r) {
        s_out("CREATE failed err=%s", err);
        kts_fini(&ps);
        return 1;
    }
    /* a socket monitor is the only way to see a sender arrive (step 2); attached before READY, so no
     * connection can precede it */
    void *mon = NULL;
    if (zmq_socket_monitor(kvt_receiver_socket(r), "inproc://kvt-peer-monitor", ZMQ_EVENT_ACCEPTED) == 0) {
        mon = zmq_socket(zctx, ZMQ_PAIR);
        if (mon && zmq_connect(mon, "inproc://kvt-peer-monitor") != 0) zmq_close(mon), mon = NULL;
    }
    s_out("READY %s", kvt_receiver_endpoint(r));
    prx_t x = {.reached = 1};
    s_step(o, 1);
    uint64_t deadline = g_t0_us + (uint64_t)o->run_ms * 1000u;
    kvt_event_t ev[32];
    while (!g_stop && pd_now_us() < deadline) {
        int n = kvt_receiver_poll(r, 5, ev, 32);
        if (n < 0) s_out("POLL rc=%s t=%llu", pd_strerror(n), s_ms());
        if (n > 0) s_receiver_events(o, &ps, &x, ev, n);
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (mon && zmq_msg_recv(&m, mon, ZMQ_DONTWAIT) >= 0)
            if (!x.is_accepted) x.is_accepted = true, x.accepted_us = pd_now_us();
        zmq_msg_close(&m);
        s_receiver_steps(o, r, &x);
        if (o->expect > 0 && x.n_ended >= o->expect && pd_now_us() >= x.last_end_us + (uint64_t)o->linger_ms * 1000u)
            break;
    }
    kvt_stats_t st;
    kvt_receiver_stats(r, &st);
    s_out("STATS role=receiver started=%llu done=%llu failed=%llu payload=%llu stale=%llu active=%d reserved=%d "
          "store_reserved=%d bad_release=%d",
          (unsigned long long)st.transfers_started, (unsigned long long)st.transfers_done,
          (unsigned long long)st.transfers_failed, (unsigned long long)st.payload_bytes,
          (unsigned long long)st.frames_dropped_stale, st.active_transfers, st.reserved_blocks, ps.n_reserved,
          ps.n_bad);
    if (zmq_socket_monitor(kvt_receiver_socket(r), NULL, 0) != 0) s_out("MONITOR stop failed");
    kvt_receiver_destroy(&r);
    zmq_close(mon);
    s_out("FINAL role=receiver store_reserved=%d bad_release=%d t=%llu", ps.n_reserved, ps.n_bad, s_ms());
    kts_fini(&ps);
    return 0;
}

/* ---- raw ZeroMQ helpers (proxy, rogue) ---- */

#define PEER_MAX_FRAMES 1100

static zmq_msg_t g_frames[PEER_MAX_FRAMES];

/* Receives one multipart message into g_frames; the number of frames (0: nothing there). */
static int s_recv_multi(void *sock) {
    int n = 0;
    bool more = true;
    while (more) {
        zmq_msg_t *m = &g_frames[n < PEER_MAX_FRAMES ? n : PEER_MAX_FRAMES - 1];
        if (n >= PEER_MAX_FRAMES) zmq_msg_close(m); /* too many: keep overwriting the last (never in tests) */
        zmq_msg_init(m);
        if (zmq_msg_recv(m, sock, n == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            zmq_msg_close(m);
            return n;
        }
        more = zmq_msg_more(m);
        if (n < PEER_MAX_FRAMES) n++;
    }
    return n;
}

static void s_close_multi(int n) {
    for (int i = 0; i < n; i++) zmq_msg_close(&g_frames[i]);
}

/* ---- proxy: sender -> [ROUTER  proxy  DEALER] -> receiver, mangling one KvData of one transfer ---- */

static bool s_proxy_mangle(const peer_opts_t *o, int n, int *n_seen, bool *drop_msg, int *drop_frame) {
    if (n < 3) return false; /* routing id, envelope, payloads: only KvData carries payload */
    Pdserve__V1__KvEnvelope *env =
        pdserve__v1__kv_envelope__unpack(NULL, zmq_msg_size(&g_frames[1]), zmq_msg_data(&g_frames[1]));
    bool hit = env && env->body_case == PDSERVE__V1__KV_ENVELOPE__BODY_DATA && env->data &&
               env->data->transfer_id == (uint64_t)o->mangle_transfer && (*n_seen)++ == o->mangle_nth;
    if (hit) s_out("MANGLED %s transfer=%d seq=%u t=%llu", o->mangle, o->mangle_transfer, env->data->seq, s_ms());
    if (env) pdserve__v1__kv_envelope__free_unpacked(env, NULL);
    if (!hit) return false;
    if (strcmp(o->mangle, "corrupt") == 0)
        ((uint8_t *)zmq_msg_data(&g_frames[2]))[zmq_msg_size(&g_frames[2]) / 2] ^= 0x40u;
    else if (strcmp(o->mangle, "drop-msg") == 0)
        *drop_msg = true;
    else
        *drop_frame = 2; /* the first payload frame */
    return true;
}

static int s_run_proxy(const peer_opts_t *o, void *zctx) {
    void *front = zmq_socket(zctx, ZMQ_ROUTER), *back = zmq_socket(zctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(front, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(back, ZMQ_LINGER, &zero, sizeof zero);
    if (zmq_bind(front, o->listen) != 0 || zmq_connect(back, o->endpoint) != 0) {
        s_out("CREATE failed err=%s", zmq_strerror(errno));
        zmq_close(front);
        zmq_close(back);
        return 1;
    }
    char ep[256];
    size_t ep_len = sizeof ep;
    if (zmq_getsockopt(front, ZMQ_LAST_ENDPOINT, ep, &ep_len) != 0) snprintf(ep, sizeof ep, "%s", o->listen);
    s_out("READY %s", ep);
    uint8_t id[256];
    size_t id_len = 0;
    int n_seen = 0;
    uint64_t deadline = g_t0_us + (uint64_t)o->run_ms * 1000u;
    while (!g_stop && pd_now_us() < deadline) {
        zmq_pollitem_t it[2] = {{front, 0, ZMQ_POLLIN, 0}, {back, 0, ZMQ_POLLIN, 0}};
        if (zmq_poll(it, 2, 10) <= 0) continue;
        int n;
        while ((n = s_recv_multi(front)) > 0) { /* [id, envelope, payloads...] -> back without the id */
            id_len = zmq_msg_size(&g_frames[0]) < sizeof id ? zmq_msg_size(&g_frames[0]) : sizeof id;
            memcpy(id, zmq_msg_data(&g_frames[0]), id_len);
            bool drop_msg = false;
            int drop_frame = -1;
            s_proxy_mangle(o, n, &n_seen, &drop_msg, &drop_frame);
            int last = n - 1 == drop_frame ? n - 2 : n - 1;
            for (int i = 1; i < n && !drop_msg; i++)
                if (i != drop_frame && zmq_msg_send(&g_frames[i], back, i < last ? ZMQ_SNDMORE : 0) < 0)
                    s_out("PROXY send failed: %s", zmq_strerror(errno));
            s_close_multi(n);
        }
        while ((n = s_recv_multi(back)) > 0) { /* replies: back to the sender */
            if (id_len > 0 && zmq_send(front, id, id_len, ZMQ_SNDMORE) >= 0)
                for (int i = 0; i < n; i++) zmq_msg_send(&g_frames[i], front, i + 1 < n ? ZMQ_SNDMORE : 0);
            s_close_multi(n);
        }
    }
    zmq_close(front);
    zmq_close(back);
    s_out("FINAL role=proxy t=%llu", s_ms());
    return 0;
}

/* ---- rogue: a raw DEALER speaking the wire protocol by hand ---- */

typedef struct {
    void *sock;
    const peer_opts_t *o;
    eng_kv_layout_t l;
    uint8_t buf[32768];
} prog_t;

static bool s_raw_send(prog_t *g, Pdserve__V1__KvEnvelope *env, bool has_more) {
    size_t n = pdserve__v1__kv_envelope__get_packed_size(env);
    if (n > sizeof g->buf) return false;
    pdserve__v1__kv_envelope__pack(env, g->buf);
    return zmq_send(g->sock, g->buf, n, has_more ? ZMQ_SNDMORE : 0) >= 0;
}

/* The next envelope of the wanted kind (others, e.g. credits, are skipped), or NULL at the deadline. */
static Pdserve__V1__KvEnvelope *s_raw_wait(prog_t *g, Pdserve__V1__KvEnvelope__BodyCase want, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (pd_now_us() < end && !g_stop) {
        zmq_pollitem_t it = {g->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 10) <= 0) continue;
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, g->sock, 0) < 0) {
            zmq_msg_close(&m);
            continue;
        }
        Pdserve__V1__KvEnvelope *env = pdserve__v1__kv_envelope__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
        zmq_msg_close(&m);
        if (env && env->body_case == want) return env;
        if (env) pdserve__v1__kv_envelope__free_unpacked(env, NULL);
    }
    return NULL;
}

static int s_raw_code(const Pdserve__V1__Error *e) {
    return e ? (int)e->code : 0;
}

static const char *s_raw_msg(const Pdserve__V1__Error *e) {
    return e && e->message ? e->message : "";
}

static bool s_raw_hello(prog_t *g, uint32_t version) {
    kvt_fingerprint_t f = s_fingerprint(g->o, &g->l);
    Pdserve__V1__Fingerprint fp = PDSERVE__V1__FINGERPRINT__INIT;
    fp.protocol_version = version;
    fp.model_id = f.model_id;
    fp.weights_hash = f.weights_hash;
    fp.tokenizer_hash = f.tokenizer_hash;
    fp.kv_dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    fp.block_size = (uint32_t)f.block_size;
    fp.n_layers = (uint32_t)f.n_layers;
    fp.n_kv_heads = (uint32_t)f.n_kv_heads;
    fp.head_dim = (uint32_t)f.head_dim;
    fp.rope_theta = f.rope_theta;
    fp.rope_dim = (uint32_t)f.rope_dim;
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    h.sender_id = "kvt-peer-rogue";
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    if (!s_raw_send(g, &env, false)) return false;
    Pdserve__V1__KvEnvelope *rep = s_raw_wait(g, PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY, g->o->timeout_ms * 4);
    s_out("RAW hello code=%d t=%llu msg=%s", rep ? s_raw_code(rep->hello_reply->error) : -1, s_ms(),
          rep ? s_raw_msg(rep->hello_reply->error) : "(no reply)");
    bool ok = rep && s_raw_code(rep->hello_reply->error) == 0;
    if (rep) pdserve__v1__kv_envelope__free_unpacked(rep, NULL);
    return ok;
}

/* Sends KvReserve and prints the reply (code -1: none within wait_ms). */
static int s_raw_reserve(prog_t *g, uint64_t id, uint32_t epoch, uint32_t n_tokens, int wait_ms) {
    Pdserve__V1__KvReserve m = PDSERVE__V1__KV_RESERVE__INIT;
    m.request_id = 0xbad000u + id;
    m.transfer_id = id;
    m.epoch = epoch;
    m.n_tokens = n_tokens;
    m.n_blocks = (n_tokens + PEER_BLOCK_SIZE - 1) / PEER_BLOCK_SIZE;
    m.timeout_ms = (uint32_t)g->o->timeout_ms;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &m;
    if (!s_raw_send(g, &env, false)) return -2;
    Pdserve__V1__KvEnvelope *rep = s_raw_wait(g, PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY, wait_ms);
    int code = rep ? s_raw_code(rep->reserve_reply->error) : -1;
    s_out("RAW reserve transfer=%llu epoch=%u code=%d t=%llu", (unsigned long long)id, epoch, code, s_ms());
    if (rep) pdserve__v1__kv_envelope__free_unpacked(rep, NULL);
    return code;
}

/* One KvData for one layer of every block of the transfer, with correct checksums, payload from the pattern
 * of seed. */
static bool s_raw_data(prog_t *g, uint64_t id, uint32_t epoch, uint32_t seq, int32_t layer, int32_t n_blocks,
                       uint64_t seed) {
    size_t cb = eng_kv_chunk_bytes(&g->l);
    uint8_t *pay = malloc(2 * (size_t)n_blocks * cb);
    uint64_t ck[2 * PEER_MAX_BLOCKS];
    if (!pay) return false;
    for (int32_t f = 0; f < 2 * n_blocks; f++) {
        s_fill_chunk(pay + (size_t)f * cb, &g->l, seed, id, f / 2, layer, f % 2);
        ck[f] = XXH3_64bits(pay + (size_t)f * cb, cb);
    }
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = id, d.epoch = epoch, d.seq = seq;
    d.first_layer = (uint32_t)layer, d.n_layers = 1, d.first_block = 0, d.n_blocks = (uint32_t)n_blocks;
    d.dtype = PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    d.block_size = PEER_BLOCK_SIZE, d.n_kv_heads = PEER_N_KV_HEADS, d.head_dim = PEER_HEAD_DIM;
    d.n_checksums = 2 * (size_t)n_blocks, d.checksums = ck;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    bool ok = s_raw_send(g, &env, true);
    for (int32_t f = 0; ok && f < 2 * n_blocks; f++)
        ok = zmq_send(g->sock, pay + (size_t)f * cb, cb, f + 1 < 2 * n_blocks ? ZMQ_SNDMORE : 0) >= 0;
    free(pay);
    return ok;
}

static bool s_raw_commit(prog_t *g, uint64_t id, uint32_t epoch, uint32_t n_frames) {
    Pdserve__V1__KvCommit m = PDSERVE__V1__KV_COMMIT__INIT;
    m.transfer_id = id, m.epoch = epoch, m.n_frames = n_frames, m.first_token = (int32_t)(1000u + id);
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT;
    env.commit = &m;
    return s_raw_send(g, &env, false);
}

/* Reservation at epoch 2, then garbage, KvData of epochs 1 and 3, a commit of epoch 1 (all to be dropped),
 * the real payload and commit of epoch 2 (to be committed), and a late KvData after the commit (dropped). */
static bool s_rogue_stale(prog_t *g) {
    const uint64_t id = 1;
    const int32_t n_tokens = 40, n_blocks = 3;
    if (s_raw_reserve(g, id, 2, n_tokens, g->o->timeout_ms * 4) != 0) return false;
    static const char garbage[] = "\xff\xff\xff not a KvEnvelope";
    bool ok = zmq_send(g->sock, garbage, sizeof garbage, 0) >= 0;
    ok = ok && s_raw_data(g, id, 1, 0, 0, n_blocks, g->o->seed ^ 1u);
    ok = ok && s_raw_data(g, id, 3, 0, 0, n_blocks, g->o->seed ^ 1u);
    ok = ok && s_raw_commit(g, id, 1, 0);
    for (int32_t ly = 0; ok && ly < PEER_N_LAYERS; ly++)
        ok = s_raw_data(g, id, 2, (uint32_t)ly, ly, n_blocks, g->o->seed);
    ok = ok && s_raw_commit(g, id, 2, PEER_N_LAYERS);
    Pdserve__V1__KvEnvelope *rep = ok ? s_raw_wait(g, PDSERVE__V1__KV_ENVELOPE__BODY_DONE, g->o->timeout_ms * 4) : NULL;
    s_out("RAW done transfer=%llu code=%d t=%llu msg=%s", (unsigned long long)id,
          rep ? s_raw_code(rep->done->error) : -1, s_ms(), rep ? s_raw_msg(rep->done->error) : "(none)");
    if (rep) pdserve__v1__kv_envelope__free_unpacked(rep, NULL);
    ok = ok && s_raw_data(g, id, 2, PEER_N_LAYERS, 0, n_blocks, g->o->seed ^ 1u);
    s_sleep_ms(100); /* let the receiver see the late frame while this peer is still connected */
    return ok;
}

static int s_run_rogue(const peer_opts_t *o, void *zctx) {
    prog_t *g = calloc(1, sizeof *g);
    if (!g) return 1;
    g->o = o;
    g->l = s_layout(o, 1);
    g->l.dtype = ENG_KV_F32;
    g->sock = zmq_socket(zctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(g->sock, ZMQ_LINGER, &zero, sizeof zero);
    bool ok = zmq_connect(g->sock, o->endpoint) == 0;
    if (ok && strcmp(o->rogue, "version") == 0) {
        /* refused: and whatever it sends afterwards must be ignored */
        ok = !s_raw_hello(g, KVT_PROTOCOL_VERSION + 1) && s_raw_reserve(g, 1, 1, 16, 300) == -1;
    } else if (ok && strcmp(o->rogue, "stale") == 0) {
        ok = s_raw_hello(g, KVT_PROTOCOL_VERSION) && s_rogue_stale(g);
    } else {
        ok = false;
    }
    s_out("FINAL role=rogue ok=%d t=%llu", ok, s_ms());
    zmq_close(g->sock);
    free(g);
    return ok ? 0 : 1;
}

/* ---- main ---- */

static void s_usage(void) {
    fprintf(stderr,
            "usage: kvt_peer --role sender|receiver|proxy|rogue --endpoint EP [--listen EP] [--seed N]\n"
            "  [--dtype f32|f16|bf16] [--die-after-step K] [--flush-ms 50] [--run-ms 10000] [--hello-ms 150]\n"
            "  [--layer-gap-ms 30] [--timeout-ms 600] [--reply-timeout-ms 400] [--handshake-timeout-ms 400]\n"
            "  [--n-transfers 2] [--id-base 0] [--rounds 1] [--expect 0] [--linger-ms 100]\n"
            "  [--fingerprint-variant none|model|weights|tokenizer|layout|rope_theta]\n"
            "  [--mangle corrupt|drop-msg|drop-frame --mangle-transfer T --mangle-nth N] [--rogue version|stale]\n");
}

static bool s_parse(int argc, char **argv, peer_opts_t *o) {
    *o = (peer_opts_t){.role = "",
                       .endpoint = "",
                       .listen = "",
                       .variant = "none",
                       .mangle = "corrupt",
                       .rogue = "",
                       .dtype = ENG_KV_F32,
                       .seed = 42,
                       .flush_ms = 50,
                       .run_ms = 10000,
                       .hello_ms = 150,
                       .layer_gap_ms = 30,
                       .linger_ms = 100,
                       .timeout_ms = 600,
                       .reply_timeout_ms = 400,
                       .handshake_timeout_ms = 400,
                       .n_transfers = 2,
                       .rounds = 1,
                       .mangle_transfer = 2};
    for (int i = 1; i + 1 < argc; i += 2) {
        const char *k = argv[i], *v = argv[i + 1];
        int n = atoi(v);
        if (!strcmp(k, "--role"))
            o->role = v;
        else if (!strcmp(k, "--endpoint"))
            o->endpoint = v;
        else if (!strcmp(k, "--listen"))
            o->listen = v;
        else if (!strcmp(k, "--fingerprint-variant"))
            o->variant = v;
        else if (!strcmp(k, "--mangle"))
            o->mangle = v;
        else if (!strcmp(k, "--rogue"))
            o->rogue = v;
        else if (!strcmp(k, "--seed"))
            o->seed = strtoull(v, NULL, 0);
        else if (!strcmp(k, "--dtype"))
            o->dtype = !strcmp(v, "bf16") ? ENG_KV_BF16 : !strcmp(v, "f16") ? ENG_KV_F16 : ENG_KV_F32;
        else if (!strcmp(k, "--die-after-step"))
            o->die_after = n;
        else if (!strcmp(k, "--flush-ms"))
            o->flush_ms = n;
        else if (!strcmp(k, "--run-ms"))
            o->run_ms = n;
        else if (!strcmp(k, "--hello-ms"))
            o->hello_ms = n;
        else if (!strcmp(k, "--layer-gap-ms"))
            o->layer_gap_ms = n;
        else if (!strcmp(k, "--linger-ms"))
            o->linger_ms = n;
        else if (!strcmp(k, "--timeout-ms"))
            o->timeout_ms = n;
        else if (!strcmp(k, "--reply-timeout-ms"))
            o->reply_timeout_ms = n;
        else if (!strcmp(k, "--handshake-timeout-ms"))
            o->handshake_timeout_ms = n;
        else if (!strcmp(k, "--n-transfers"))
            o->n_transfers = n;
        else if (!strcmp(k, "--id-base"))
            o->id_base = n;
        else if (!strcmp(k, "--rounds"))
            o->rounds = n;
        else if (!strcmp(k, "--expect"))
            o->expect = n;
        else if (!strcmp(k, "--mangle-transfer"))
            o->mangle_transfer = n;
        else if (!strcmp(k, "--mangle-nth"))
            o->mangle_nth = n;
        else
            return false;
    }
    return (argc % 2) == 1 && *o->endpoint && o->n_transfers >= 1 && o->n_transfers <= PEER_MAX_TX && o->run_ms > 0 &&
           o->rounds >= 1;
}

int main(int argc, char **argv) {
    peer_opts_t o;
    if (!s_parse(argc, argv, &o)) {
        s_usage();
        return 2;
    }
    g_t0_us = pd_now_us();
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGUSR1, &sa, NULL);
    char service[32];
    snprintf(service, sizeof service, "kvt-peer-%s", o.role);
    pd_log_init(service, PD_LOG_INFO);
    void *zctx = zmq_ctx_new();
    int rc = 2;
    if (!strcmp(o.role, "sender"))
        rc = s_run_sender(&o, zctx);
    else if (!strcmp(o.role, "receiver"))
        rc = s_run_receiver(&o, zctx);
    else if (!strcmp(o.role, "proxy"))
        rc = s_run_proxy(&o, zctx);
    else if (!strcmp(o.role, "rogue"))
        rc = s_run_rogue(&o, zctx);
    else
        s_usage();
    zmq_ctx_term(zctx);
    return rc;
}
