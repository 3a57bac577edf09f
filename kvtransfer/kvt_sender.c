/* kvt_sender.c: the prefill side of the KV hand-off: one DEALER per decode peer, transfers streamed layer
 * by layer straight from the caller's pool (zero copy) within the receiver's credit. Does not decide what
 * to send or when a block may be reused: the caller marks layers ready and unpins on KVT_EV_RELEASED. */
#define _GNU_SOURCE /* nanosleep, getrandom */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <zmq.h>

#include "kvt_int.h"
#include "pd_log.h"

typedef enum { TX_FREE = 0, TX_QUEUED, TX_RESERVING, TX_STREAMING, TX_COMMITTING, TX_ENDED } kvt_tx_state_t;
typedef enum { HS_NEW = 0, HS_SENT, HS_OK, HS_REFUSED } kvt_hs_t;
#define KVT_WAIT_CREDIT 1 /* s_send_data: nothing sent, the window is full */

/* Payload frames still referenced by ZeroMQ, per transfer slot. ZeroMQ calls s_frame_free on one of its
 * I/O threads (or the thread that closes the message), so this block holds atomics only and is freed by
 * whoever drops the last reference: the sender (destroy) or the last frame. */
typedef struct kvt_relblock kvt_relblock_t;
typedef struct {
    atomic_int n_frames;
    kvt_relblock_t *owner;
} kvt_relslot_t;
struct kvt_relblock {
    atomic_long refs; /* 1 for the sender + 1 per outstanding frame */
    kvt_relslot_t slots[];
};

typedef struct {
    kvt_tx_state_t state;
    uint64_t request_id, transfer_id;
    uint32_t epoch;
    int32_t n_tokens, n_blocks;
    int32_t *block_ids; /* (n_blocks) the sender's blocks, owned */
    int32_t n_layers_ready;
    bool has_commit, is_blocked;
    bool is_device;       /* its blocks go device to device (the reserve names them; KvData without frames) */
    int32_t corrupt_next; /* test hook: 1 + the frame of the next data message whose checksum is spoiled; 0 none */
    int32_t first_token;
    uint8_t *commit_info; /* (commit_info_len) owned; handed over with the commit */
    size_t commit_info_len;
    int32_t cur_layer, cur_block;     /* next chunk pair to send */
    uint32_t next_seq[KVT_MAX_CONNS]; /* per connection */
    uint32_t n_sent;                  /* KvData messages, all connections */
    bool is_striped;                  /* some went on a connection other than the primary */
    uint64_t in_flight_bytes;         /* sent and not yet credited back */
    uint64_t deadline_us;             /* 0 = none */
    uint64_t last_heard_us;           /* last progress with the peer: a send, a reply, a credit */
} kvt_stx_t;

/* One DEALER connection to the receiver; conn[0] is the primary (control messages, every reply). */
typedef struct {
    void *sock;
    kvt_hs_t hs;
    uint64_t hello_sent_us;
} kvt_conn_t;

struct kvt_sender {
    kvt_conn_t conn[KVT_MAX_CONNS];
    int32_t n_conns, next_conn; /* next_conn: round robin for KvData */
    uint64_t conn_group;        /* random, non-zero with several connections */
    kvt_sender_params_t p;
    char endpoint[256], sender_id[64], error[256], shm_name[256];
    kvt_hs_t hs;                        /* the primary's handshake (== conn[0].hs) */
    bool use_runs, use_shm, use_groups; /* what the receiver answered in its hello reply */
    bool use_device;
    uint8_t device_handle[KVT_MAX_DEVICE_HANDLE_BYTES];
    uint64_t window_bytes, in_flight_bytes; /* credit of this connection */
    uint64_t peer_max_msg_bytes;
    uint64_t conn_heard_us; /* last message from the receiver, any transfer */
    kvt_stx_t *tx;
    int32_t rr; /* round-robin start among streaming transfers */
    kvt_relblock_t *rel;
    kvt_event_t *ev; /* ring */
    int ev_cap, ev_head, ev_count;
    kvt_stats_t st;
    uint64_t cksum[KVT_MAX_PAYLOAD_FRAMES];
    uint64_t shm_off[KVT_MAX_PAYLOAD_FRAMES];
    uint32_t runs[KVT_MAX_PAYLOAD_FRAMES / 2];
    uint8_t envbuf[KVT_MAX_ENVELOPE_BYTES];
};

kvt_sender_params_t kvt_sender_params_default(void) {
    kvt_sender_params_t p;
    memset(&p, 0, sizeof p);
    p.sender_id = "kvt-sender";
    p.handshake_timeout_ms = 5000;
    p.reply_timeout_ms = 10000;
    p.linger_ms = 0;
    p.max_transfers = 256;
    p.heartbeat_ivl_ms = 1000;
    p.max_frame_bytes = 1u << 20;
    p.n_conns = 1;
    return p;
}

static void s_frame_free(void *data, void *hint) {
    (void)data;
    kvt_relslot_t *sl = hint;
    kvt_relblock_t *b = sl->owner;
    atomic_fetch_sub(&sl->n_frames, 1);
    if (atomic_fetch_sub(&b->refs, 1) == 1) free(b);
}

static void s_ev_push(kvt_sender_t *s, kvt_event_kind_t kind, const kvt_stx_t *t, pd_status st, const char *err) {
    PD_ASSERT(s->ev_count < s->ev_cap); /* kvt_sender_start keeps room for 3 events per transfer */
    kvt_event_t *e = &s->ev[(s->ev_head + s->ev_count) % s->ev_cap];
    memset(e, 0, sizeof *e);
    e->kind = kind;
    e->request_id = t->request_id;
    e->transfer_id = t->transfer_id;
    e->status = st;
    kvt_copy_str(e->err, sizeof e->err, err);
    s->ev_count++;
}

static kvt_stx_t *s_find(kvt_sender_t *s, uint64_t transfer_id) {
    for (int32_t i = 0; i < s->p.max_transfers; i++)
        if (s->tx[i].state != TX_FREE && s->tx[i].transfer_id == transfer_id) return &s->tx[i];
    return NULL;
}

static pd_status s_send_ctrl(kvt_sender_t *s, Pdserve__V1__KvEnvelope *env) {
    return kvt_send_env(s->conn[0].sock, NULL, 0, env, s->envbuf, sizeof s->envbuf, false);
}

static void s_send_cancel(kvt_sender_t *s, const kvt_stx_t *t, pd_status why, const char *msg) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = kvt_code_from_status(why);
    e.message = (char *)msg;
    Pdserve__V1__KvCancel c = PDSERVE__V1__KV_CANCEL__INIT;
    c.transfer_id = t->transfer_id;
    c.epoch = t->epoch;
    c.reason = &e;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL;
    env.cancel = &c;
    /* best effort: if it cannot go out, the receiver's own timeout frees the reservation */
    if (s_send_ctrl(s, &env) != PD_OK) LOG_W("req=%llx kv cancel not sent", (unsigned long long)t->request_id);
}

/* Ends a transfer on this side: DONE now, RELEASED once ZeroMQ dropped its frames. */
static void s_end(kvt_sender_t *s, kvt_stx_t *t, pd_status st, const char *err, bool tell_peer) {
    if (t->state == TX_FREE || t->state == TX_ENDED) return;
    if (tell_peer && t->state != TX_QUEUED) s_send_cancel(s, t, st, err);
    s->in_flight_bytes -= t->in_flight_bytes;
    t->in_flight_bytes = 0;
    t->state = TX_ENDED;
    if (st == PD_OK) {
        s->st.transfers_done++;
    } else {
        s->st.transfers_failed++;
        LOG_I("req=%llx kv transfer %llu to %s ended: %s %s", (unsigned long long)t->request_id,
              (unsigned long long)t->transfer_id, s->endpoint, pd_strerror(st), err ? err : "");
    }
    s_ev_push(s, KVT_EV_DONE, t, st, err);
}

kvt_sender_t *kvt_sender_create(void *zmq_ctx, const kvt_sender_params_t *p, char *err, size_t err_cap) {
    kvt_sender_t *s = NULL;
    const eng_kv_layout_t *l = &p->layout;
    if (kvt_endpoint_check(p->endpoint, err, err_cap) != PD_OK) return NULL;
    if (!zmq_ctx || !p->pool_base || l->n_layers <= 0 || l->n_kv_heads <= 0 || l->head_dim <= 0 || l->block_size <= 0 ||
        l->n_blocks <= 0 || l->dtype > ENG_KV_BF16 || p->max_transfers <= 0 || p->max_transfers > 65536 ||
        p->reply_timeout_ms <= 0 || p->handshake_timeout_ms <= 0 || p->linger_ms < 0 || p->n_conns > KVT_MAX_CONNS ||
        p->device_handle_len > KVT_MAX_DEVICE_HANDLE_BYTES || (p->device_handle_len > 0 && !p->device_handle)) {
        snprintf(err, err_cap, "kvt sender: bad params (zmq_ctx, pool_base, layout, limits, device_handle)");
        return NULL;
    }
    if (2 * eng_kv_chunk_bytes(l) > KVT_MAX_MSG_PAYLOAD_BYTES) {
        snprintf(err, err_cap, "kvt sender: one block-layer (%zu bytes) exceeds the message cap",
                 2 * eng_kv_chunk_bytes(l));
        return NULL;
    }
    s = pd_xcalloc(1, sizeof *s);
    s->p = *p;
    kvt_copy_str(s->endpoint, sizeof s->endpoint, p->endpoint);
    kvt_copy_str(s->sender_id, sizeof s->sender_id, p->sender_id);
    s->p.endpoint = s->endpoint;
    s->p.sender_id = s->sender_id;
    if (p->pool_shm_name) {
        kvt_copy_str(s->shm_name, sizeof s->shm_name, p->pool_shm_name);
        s->p.pool_shm_name = s->shm_name;
    }
    if (p->device_handle_len > 0) memcpy(s->device_handle, p->device_handle, p->device_handle_len);
    s->p.device_handle = p->device_handle_len > 0 ? s->device_handle : NULL;
    s->tx = pd_xcalloc((size_t)p->max_transfers, sizeof *s->tx);
    s->ev_cap = 3 * p->max_transfers + 8;
    s->ev = pd_xcalloc((size_t)s->ev_cap, sizeof *s->ev);
    s->rel = pd_xcalloc(1, sizeof *s->rel + (size_t)p->max_transfers * sizeof(kvt_relslot_t));
    atomic_init(&s->rel->refs, 1);
    for (int32_t i = 0; i < p->max_transfers; i++) {
        atomic_init(&s->rel->slots[i].n_frames, 0);
        s->rel->slots[i].owner = s->rel;
    }
    s->n_conns = p->n_conns > 1 ? p->n_conns : 1;
    while (s->n_conns > 1 && s->conn_group == 0)
        if (getrandom(&s->conn_group, sizeof s->conn_group, 0) != (ssize_t)sizeof s->conn_group)
            s->conn_group = (uint64_t)pd_now_us() * 0x9e3779b97f4a7c15ull;
    for (int32_t c = 0; c < s->n_conns; c++) {
        kvt_conn_t *cn = &s->conn[c];
        cn->sock = zmq_socket(zmq_ctx, ZMQ_DEALER);
        if (!cn->sock) {
            snprintf(err, err_cap, "zmq_socket(DEALER): %s", zmq_strerror(errno));
            goto fail;
        }
        if (kvt_socket_setup(cn->sock, p->linger_ms, p->heartbeat_ivl_ms, err, err_cap) != PD_OK) goto fail;
        /* IMMEDIATE: queue only to a completed connection, so nothing waits in a pipe to a peer that is not
         * there (sends return EAGAIN and the work stays in the transfer's cursor) */
        int one = 1;
        if (zmq_setsockopt(cn->sock, ZMQ_IMMEDIATE, &one, sizeof one) != 0 || zmq_connect(cn->sock, p->endpoint) != 0) {
            snprintf(err, err_cap, "kvt sender: connect %s: %s", p->endpoint, zmq_strerror(errno));
            goto fail;
        }
        cn->hs = HS_NEW;
    }
    s->hs = HS_NEW;
    return s;
fail:
    kvt_sender_destroy(&s);
    return NULL;
}

void kvt_sender_destroy(kvt_sender_t **sp) {
    if (!sp || !*sp) return;
    kvt_sender_t *s = *sp;
    for (int32_t c = 0; c < KVT_MAX_CONNS; c++)
        if (s->conn[c].sock) zmq_close(s->conn[c].sock);
    /* wait (bounded) until ZeroMQ dropped every frame pointing into the caller's pool */
    uint64_t give_up = pd_now_us() + (uint64_t)s->p.linger_ms * 1000u + 1000000u;
    while (atomic_load(&s->rel->refs) > 1 && pd_now_us() < give_up) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (atomic_load(&s->rel->refs) > 1) LOG_W("kvt sender %s: payload frames still held by ZeroMQ", s->endpoint);
    for (int32_t i = 0; i < s->p.max_transfers; i++) {
        free(s->tx[i].block_ids);
        free(s->tx[i].commit_info);
    }
    if (atomic_fetch_sub(&s->rel->refs, 1) == 1) free(s->rel);
    free(s->tx);
    free(s->ev);
    free(s);
    *sp = NULL;
}

pd_status kvt_sender_start(kvt_sender_t *s, const kvt_transfer_t *t) {
    if (s->hs == HS_REFUSED) return PD_EPROTO;
    if (!t || t->n_tokens <= 0 || !t->block_ids || t->timeout_ms < 0 || s_find(s, t->transfer_id)) return PD_EINVAL;
    int64_t n_blocks = ((int64_t)t->n_tokens + s->p.layout.block_size - 1) / s->p.layout.block_size;
    if (n_blocks > s->p.layout.n_blocks) return PD_EINVAL;
    for (int64_t i = 0; i < n_blocks; i++)
        if (t->block_ids[i] < 0 || t->block_ids[i] >= s->p.layout.n_blocks) return PD_EINVAL;
    kvt_stx_t *x = NULL;
    int32_t n_active = 0;
    for (int32_t i = 0; i < s->p.max_transfers; i++) {
        if (s->tx[i].state != TX_FREE)
            n_active++;
        else if (!x)
            x = &s->tx[i];
    }
    /* every active transfer may still queue RESERVED, DONE and RELEASED */
    if (!x || s->ev_count + 3 * (n_active + 1) > s->ev_cap) return PD_EAGAIN;
    int32_t *ids = malloc((size_t)n_blocks * sizeof *ids);
    if (!ids) return PD_ENOMEM;
    memcpy(ids, t->block_ids, (size_t)n_blocks * sizeof *ids);
    memset(x, 0, sizeof *x);
    x->state = TX_QUEUED;
    x->request_id = t->request_id;
    x->transfer_id = t->transfer_id;
    x->epoch = t->epoch;
    x->n_tokens = t->n_tokens;
    x->n_blocks = (int32_t)n_blocks;
    x->block_ids = ids;
    x->last_heard_us = pd_now_us();
    x->deadline_us = t->timeout_ms > 0 ? x->last_heard_us + (uint64_t)t->timeout_ms * 1000u : 0;
    s->st.transfers_started++;
    return PD_OK;
}

pd_status kvt_sender_layers_ready(kvt_sender_t *s, uint64_t transfer_id, int32_t n_layers_ready) {
    kvt_stx_t *t = s_find(s, transfer_id);
    if (!t || n_layers_ready < 0 || n_layers_ready > s->p.layout.n_layers) return PD_EINVAL;
    if (n_layers_ready > t->n_layers_ready) t->n_layers_ready = n_layers_ready;
    return PD_OK;
}

pd_status kvt_sender_commit(kvt_sender_t *s, uint64_t transfer_id, int32_t first_token) {
    return kvt_sender_commit_info(s, transfer_id, first_token, NULL, 0);
}

pd_status kvt_sender_commit_info(kvt_sender_t *s, uint64_t transfer_id, int32_t first_token, const void *info,
                                 size_t info_len) {
    kvt_stx_t *t = s_find(s, transfer_id);
    if (!t || first_token < 0 || info_len > KVT_MAX_COMMIT_INFO_BYTES || (info_len > 0 && !info)) return PD_EINVAL;
    if (t->state == TX_ENDED || t->has_commit) return PD_OK; /* already over (its DONE says how) or committed */
    if (info_len > 0) {
        t->commit_info = malloc(info_len);
        if (!t->commit_info) return PD_ENOMEM;
        memcpy(t->commit_info, info, info_len);
        t->commit_info_len = info_len;
    }
    t->n_layers_ready = s->p.layout.n_layers;
    t->has_commit = true;
    t->first_token = first_token;
    return PD_OK;
}

pd_status kvt_sender_cancel(kvt_sender_t *s, uint64_t transfer_id) {
    kvt_stx_t *t = s_find(s, transfer_id);
    if (!t) return PD_EINVAL;
    s_end(s, t, PD_ECLOSED, "cancelled by the sender", true);
    return PD_OK;
}

pd_status kvt_sender_test_corrupt(kvt_sender_t *s, uint64_t transfer_id) {
    return kvt_sender_test_corrupt_frame(s, transfer_id, 0);
}

pd_status kvt_sender_test_corrupt_frame(kvt_sender_t *s, uint64_t transfer_id, int32_t frame) {
    kvt_stx_t *t = s_find(s, transfer_id);
    if (!t || frame < 0 || frame > 1) return PD_EINVAL;
    t->corrupt_next = 1 + frame;
    return PD_OK;
}

/* ---- incoming ---- */

static void s_on_hello_reply(kvt_sender_t *s, int32_t c, const Pdserve__V1__KvHelloReply *m) {
    if (s->hs == HS_REFUSED || s->conn[c].hs == HS_OK) return;
    int code = m->error ? (int)m->error->code : 0;
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        snprintf(s->error, sizeof s->error, "receiver %.60s refused the handshake: %.160s", s->endpoint,
                 m->error && m->error->message ? m->error->message : "(no reason)");
        LOG_E("%s", s->error);
        s->hs = s->conn[0].hs = HS_REFUSED; /* any connection refused: the whole sender is */
        for (int32_t i = 0; i < s->p.max_transfers; i++) s_end(s, &s->tx[i], PD_EPROTO, s->error, false);
        return;
    }
    s->conn[c].hs = HS_OK;
    if (c > 0) return;
    s->hs = HS_OK;
    s->peer_max_msg_bytes = m->max_message_bytes;
    s->use_runs = m->frame_runs;
    s->use_shm = m->shm_mapped && s->p.pool_shm_name;
    s->use_device = m->device_mapped && s->p.device_handle;
    s->use_groups = m->conn_groups && s->n_conns > 1 && !s->use_shm; /* the shared pool needs no striping */
}

static void s_on_reserve_reply(kvt_sender_t *s, const Pdserve__V1__KvReserveReply *m) {
    kvt_stx_t *t = s_find(s, m->transfer_id);
    if (!t || t->epoch != m->epoch || t->state != TX_RESERVING) {
        s->st.frames_dropped_stale++;
        return;
    }
    int code = m->error ? (int)m->error->code : 0;
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        char why[160];
        snprintf(why, sizeof why, "reserve refused: %s", m->error->message ? m->error->message : "");
        s_end(s, t, kvt_status_from_code(code), why, false);
        return;
    }
    /* the window is per connection; the latest grant wins */
    s->window_bytes = m->credit_bytes;
    uint64_t pair = 2 * eng_kv_chunk_bytes(&s->p.layout);
    if (s->peer_max_msg_bytes < pair + KVT_MAX_ENVELOPE_BYTES) {
        s_end(s, t, PD_EINVAL, "receiver's max_message_bytes is below one block-layer", true);
        return;
    }
    t->state = TX_STREAMING;
    t->last_heard_us = pd_now_us();
    s_ev_push(s, KVT_EV_RESERVED, t, PD_OK, NULL);
}

static void s_on_credit(kvt_sender_t *s, const Pdserve__V1__KvCredit *m) {
    kvt_stx_t *t = s_find(s, m->transfer_id);
    if (!t || t->epoch != m->epoch || t->state == TX_ENDED) {
        s->st.frames_dropped_stale++; /* its bytes left the window when it ended */
        return;
    }
    uint64_t b = m->bytes < t->in_flight_bytes ? m->bytes : t->in_flight_bytes;
    t->in_flight_bytes -= b;
    s->in_flight_bytes -= b;
    t->last_heard_us = pd_now_us();
}

static void s_on_done(kvt_sender_t *s, const Pdserve__V1__KvDone *m) {
    kvt_stx_t *t = s_find(s, m->transfer_id);
    if (!t || t->epoch != m->epoch || t->state == TX_ENDED || t->state == TX_QUEUED) {
        s->st.frames_dropped_stale++;
        return;
    }
    int code = m->error ? (int)m->error->code : 0;
    if (code == PDSERVE__V1__ERROR_CODE__ERR_NONE && t->state != TX_COMMITTING) {
        s_end(s, t, PD_EPROTO, "receiver reported done before the commit", true);
        return;
    }
    char why[160] = "";
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE)
        snprintf(why, sizeof why, "receiver: %s", m->error->message ? m->error->message : "");
    s_end(s, t, kvt_status_from_code(code), why, false);
}

static void s_on_cancel(kvt_sender_t *s, const Pdserve__V1__KvCancel *m) {
    kvt_stx_t *t = s_find(s, m->transfer_id);
    if (!t || t->epoch != m->epoch || t->state == TX_ENDED) {
        s->st.frames_dropped_stale++;
        return;
    }
    int code = m->reason ? (int)m->reason->code : PDSERVE__V1__ERROR_CODE__ERR_CANCELLED;
    pd_status st = kvt_status_from_code(code);
    char why[160];
    snprintf(why, sizeof why, "cancelled by the receiver: %s",
             m->reason && m->reason->message ? m->reason->message : "");
    s_end(s, t, st == PD_OK ? PD_ECLOSED : st, why, false);
}

/* Reads what is there on connection c, at most a bounded number of messages per call. */
static void s_recv_conn(kvt_sender_t *s, int32_t c) {
    void *sock = s->conn[c].sock;
    for (int i = 0; i < 4096; i++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        bool more = zmq_msg_more(&m);
        Pdserve__V1__KvEnvelope *env = more ? NULL : kvt_env_unpack(zmq_msg_data(&m), zmq_msg_size(&m));
        zmq_msg_close(&m);
        while (more) { /* the receiver never sends multipart: drain and drop */
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, sock, ZMQ_DONTWAIT) < 0)
                more = false;
            else
                more = zmq_msg_more(&m);
            zmq_msg_close(&m);
        }
        if (!env) {
            s->st.frames_dropped_stale++;
            continue;
        }
        if (s->hs == HS_REFUSED) {
            pdserve__v1__kv_envelope__free_unpacked(env, NULL);
            continue;
        }
        s->conn_heard_us = pd_now_us();
        switch (env->body_case) {
        case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY: s_on_hello_reply(s, c, env->hello_reply); break;
        case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY: s_on_reserve_reply(s, env->reserve_reply); break;
        case PDSERVE__V1__KV_ENVELOPE__BODY_CREDIT: s_on_credit(s, env->credit); break;
        case PDSERVE__V1__KV_ENVELOPE__BODY_DONE: s_on_done(s, env->done); break;
        case PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL: s_on_cancel(s, env->cancel); break;
        default: s->st.frames_dropped_stale++; break;
        }
        pdserve__v1__kv_envelope__free_unpacked(env, NULL);
    }
}

static void s_recv_all(kvt_sender_t *s) {
    for (int32_t c = 0; c < s->n_conns; c++) s_recv_conn(s, c);
}

/* ---- outgoing ---- */

static void s_send_hello(kvt_sender_t *s, int32_t c, uint64_t now) {
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&s->p.fingerprint, &fp);
    Pdserve__V1__KvHello h = PDSERVE__V1__KV_HELLO__INIT;
    h.fingerprint = &fp;
    h.sender_id = s->sender_id;
    if (s->p.pool_shm_name && c == 0) { /* one mapping per sender: the primary's */
        h.shm_name = s->shm_name;
        h.shm_bytes = eng_kv_pool_bytes(&s->p.layout);
    }
    if (s->p.device_handle && c == 0) {
        h.device_handle.data = s->device_handle;
        h.device_handle.len = s->p.device_handle_len;
        h.device_n_blocks = (uint32_t)s->p.layout.n_blocks;
    }
    h.conn_group = s->conn_group;
    h.conn_index = (uint32_t)c;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    env.hello = &h;
    if (kvt_send_env(s->conn[c].sock, NULL, 0, &env, s->envbuf, sizeof s->envbuf, false) == PD_OK) {
        s->conn[c].hs = HS_SENT;
        s->conn[c].hello_sent_us = now;
        if (c == 0) s->hs = HS_SENT;
    }
}

static pd_status s_send_reserve(kvt_sender_t *s, kvt_stx_t *t, uint64_t now) {
    Pdserve__V1__KvReserve m = PDSERVE__V1__KV_RESERVE__INIT;
    m.request_id = t->request_id;
    m.transfer_id = t->transfer_id;
    m.epoch = t->epoch;
    m.n_tokens = (uint32_t)t->n_tokens;
    m.n_blocks = (uint32_t)t->n_blocks;
    m.timeout_ms = t->deadline_us ? (uint32_t)((t->deadline_us > now ? t->deadline_us - now : 1000) / 1000u) : 0;
    if (t->deadline_us && m.timeout_ms == 0) m.timeout_ms = 1;
    t->is_device = s->use_device && t->n_blocks <= KVT_MAX_DEVICE_BLOCKS;
    if (t->is_device) { /* ids are non-negative: the same bits as uint32 */
        m.n_device_blocks = (size_t)t->n_blocks;
        m.device_blocks = (uint32_t *)t->block_ids;
    }
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE;
    env.reserve = &m;
    pd_status st = s_send_ctrl(s, &env);
    if (st == PD_OK) {
        t->state = TX_RESERVING;
        t->last_heard_us = now;
    }
    return st;
}

static pd_status s_send_commit(kvt_sender_t *s, kvt_stx_t *t, uint64_t now) {
    Pdserve__V1__KvCommit m = PDSERVE__V1__KV_COMMIT__INIT;
    m.transfer_id = t->transfer_id;
    m.epoch = t->epoch;
    m.n_frames = t->n_sent;
    m.first_token = t->first_token;
    m.first_token_info.data = t->commit_info;
    m.first_token_info.len = t->commit_info_len;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT;
    env.commit = &m;
    pd_status st = s_send_ctrl(s, &env);
    if (st == PD_OK) {
        t->state = TX_COMMITTING;
        t->last_heard_us = now;
    }
    return st;
}

/* Splits blocks [b0, b0 + k) of t into frame runs: consecutive pool blocks, at most max_run per run
 * (or one block each for a receiver that does not know runs). Returns the number of runs. */
static uint32_t s_plan_runs(kvt_sender_t *s, const kvt_stx_t *t, int32_t b0, int32_t k) {
    size_t chunk = eng_kv_chunk_bytes(&s->p.layout);
    uint32_t max_run = s->use_runs && s->p.max_frame_bytes > chunk ? (uint32_t)(s->p.max_frame_bytes / chunk) : 1u;
    uint32_t n = 0;
    for (int32_t i = 0; i < k; i++) {
        if (i > 0 && s->runs[n - 1] < max_run && t->block_ids[b0 + i] == t->block_ids[b0 + i - 1] + 1)
            s->runs[n - 1]++;
        else
            s->runs[n++] = 1;
    }
    return n;
}

/* One KvData message: blocks [cur_block, cur_block + k) of layer cur_layer as K and V frame runs, as many
 * as the message cap and the connection's credit allow; the payload goes as ZeroMQ frames pointing into
 * the pool, or (shared pool) as offsets the receiver copies from. PD_OK sent, KVT_WAIT_CREDIT, PD_EAGAIN
 * (socket full), PD_EIO. */
/* The connection for the next KvData: round robin over those whose handshake passed (the primary when the
 * receiver does not know connection groups). */
static int32_t s_pick_conn(kvt_sender_t *s) {
    if (!s->use_groups) return 0;
    for (int32_t k = 0; k < s->n_conns; k++) {
        int32_t c = (s->next_conn + k) % s->n_conns;
        if (s->conn[c].hs == HS_OK) {
            s->next_conn = (c + 1) % s->n_conns;
            return c;
        }
    }
    return 0;
}

/* Device path: tells the receiver that layers [cur_layer, n_layers_ready) of every block are final in our device pool,
 * for it to copy now (a KvData of the whole block range with no frames, on the primary). No credit: nothing is in
 * flight on our side. */
static pd_status s_send_device_layers(kvt_sender_t *s, kvt_stx_t *t, uint64_t now) {
    const eng_kv_layout_t *l = &s->p.layout;
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = t->transfer_id;
    d.epoch = t->epoch;
    d.seq = t->next_seq[0];
    d.first_layer = (uint32_t)t->cur_layer;
    d.n_layers = (uint32_t)(t->n_layers_ready - t->cur_layer);
    d.first_block = 0;
    d.n_blocks = (uint32_t)t->n_blocks;
    d.dtype = kvt_dtype_to_pb(l->dtype);
    d.block_size = (uint32_t)l->block_size;
    d.n_kv_heads = (uint32_t)l->n_kv_heads;
    d.head_dim = (uint32_t)l->head_dim;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    pd_status st = s_send_ctrl(s, &env);
    if (st != PD_OK) return st == PD_EAGAIN ? PD_EAGAIN : PD_EIO;
    const uint64_t bytes = kvt_layers_bytes(l, (int32_t)d.n_layers, t->n_blocks);
    t->next_seq[0]++;
    t->n_sent++;
    s->st.payload_bytes += bytes;
    s->st.device_payload_bytes += bytes;
    t->last_heard_us = now;
    t->cur_layer = t->n_layers_ready;
    return PD_OK;
}

static pd_status s_send_data(kvt_sender_t *s, kvt_stx_t *t, int32_t slot, uint64_t now) {
    const eng_kv_layout_t *l = &s->p.layout;
    size_t chunk = eng_kv_chunk_bytes(l), pair = 2 * chunk;
    /* messages of a few MiB: the receiver starts on one while the next is checksummed and in transit, and
     * the last one (the tail after the last layer) is short */
    uint64_t msg_cap = s->use_shm ? KVT_MAX_SHM_MSG_BYTES : KVT_SOCK_MSG_BYTES;
    if (!s->use_shm && s->peer_max_msg_bytes - KVT_MAX_ENVELOPE_BYTES < msg_cap)
        msg_cap = s->peer_max_msg_bytes - KVT_MAX_ENVELOPE_BYTES;
    if (msg_cap < pair) msg_cap = pair; /* one block-layer always fits (checked at create and in the reply) */
    uint64_t k = (uint64_t)(t->n_blocks - t->cur_block);
    if (k > KVT_MAX_PAYLOAD_FRAMES / 2) k = KVT_MAX_PAYLOAD_FRAMES / 2;
    if (k > msg_cap / pair) k = msg_cap / pair;
    /* shared pool: run at most a few MiB ahead of the receiver, so the blocks just hashed here are still in
     * the last-level cache when the receiver copies them (a full window ahead, both read them from DRAM) */
    uint64_t window = s->use_shm && s->window_bytes > KVT_SHM_WINDOW_BYTES ? KVT_SHM_WINDOW_BYTES : s->window_bytes;
    uint64_t avail = window > s->in_flight_bytes ? window - s->in_flight_bytes : 0;
    if (k * pair > avail) k = avail / pair;
    if (k == 0) {
        if (s->in_flight_bytes > 0) return KVT_WAIT_CREDIT;
        k = 1; /* a window below one block-layer still moves one at a time */
    }
    int32_t layer = t->cur_layer, c = s_pick_conn(s);
    void *sock = s->conn[c].sock;
    uint32_t n_runs = s_plan_runs(s, t, t->cur_block, (int32_t)k);
    size_t n_frames = 2u * n_runs;
    /* frame f: run f/2, kind f%2; a run's chunks are consecutive in the pool */
    for (size_t f = 0, b = (size_t)t->cur_block; f < n_frames; f++) {
        size_t off = eng_kv_chunk_offset(l, layer, (eng_kv_kind_t)(f % 2), t->block_ids[b]);
        s->shm_off[f] = off;
        s->cksum[f] = kvt_hash64((const uint8_t *)s->p.pool_base + off, s->runs[f / 2] * chunk);
        if (f % 2) b += s->runs[f / 2];
    }
    if (t->corrupt_next) s->cksum[t->corrupt_next - 1] ^= 1u;
    Pdserve__V1__KvData d = PDSERVE__V1__KV_DATA__INIT;
    d.transfer_id = t->transfer_id;
    d.epoch = t->epoch;
    d.seq = t->next_seq[c];
    d.first_layer = (uint32_t)layer;
    d.n_layers = 1;
    d.first_block = (uint32_t)t->cur_block;
    d.n_blocks = (uint32_t)k;
    d.dtype = kvt_dtype_to_pb(l->dtype);
    d.block_size = (uint32_t)l->block_size;
    d.n_kv_heads = (uint32_t)l->n_kv_heads;
    d.head_dim = (uint32_t)l->head_dim;
    d.n_checksums = n_frames;
    d.checksums = s->cksum;
    if (s->use_runs) {
        d.n_frame_blocks = n_runs;
        d.frame_blocks = s->runs;
    }
    if (s->use_shm) {
        d.n_shm_offsets = n_frames;
        d.shm_offsets = s->shm_off;
    }
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_DATA;
    env.data = &d;
    pd_status st = kvt_send_env(sock, NULL, 0, &env, s->envbuf, sizeof s->envbuf, !s->use_shm);
    if (st != PD_OK) return st == PD_EAGAIN ? PD_EAGAIN : PD_EIO;
    /* once the first frame is queued, ZeroMQ accepts the rest of the message (HWM counts messages) */
    kvt_relslot_t *rs = &s->rel->slots[slot];
    for (size_t f = 0; !s->use_shm && f < n_frames; f++) {
        zmq_msg_t m;
        atomic_fetch_add(&rs->n_frames, 1);
        atomic_fetch_add(&s->rel->refs, 1);
        uint8_t *p = (uint8_t *)s->p.pool_base + s->shm_off[f];
        if (zmq_msg_init_data(&m, p, s->runs[f / 2] * chunk, s_frame_free, rs) != 0) { /* leaves the counts */
            atomic_fetch_sub(&rs->n_frames, 1);
            atomic_fetch_sub(&s->rel->refs, 1);
            return PD_EIO;
        }
        if (zmq_msg_send(&m, sock, ZMQ_DONTWAIT | (f + 1 < n_frames ? ZMQ_SNDMORE : 0)) < 0) {
            zmq_msg_close(&m); /* runs s_frame_free */
            return PD_EIO;
        }
    }
    t->corrupt_next = 0;
    t->next_seq[c]++;
    t->n_sent++;
    t->is_striped |= c > 0;
    s->st.striped_msgs += c > 0;
    t->in_flight_bytes += k * pair;
    s->in_flight_bytes += k * pair;
    s->st.payload_bytes += k * pair;
    if (s->use_shm) s->st.shm_payload_bytes += k * pair;
    t->last_heard_us = now;
    t->cur_block += (int32_t)k;
    if (t->cur_block == t->n_blocks) {
        t->cur_block = 0;
        t->cur_layer++;
    }
    return PD_OK;
}

/* Moves each transfer one step, round robin, until nothing more can go out now. */
static void s_pump(kvt_sender_t *s, uint64_t now) {
    for (int32_t c = 0; c < s->n_conns; c++) {
        kvt_conn_t *cn = &s->conn[c];
        if (cn->hs == HS_NEW ||
            (cn->hs == HS_SENT && now - cn->hello_sent_us > (uint64_t)s->p.handshake_timeout_ms * 1000u))
            s_send_hello(s, c, now); /* resent after a silent timeout: the receiver may have restarted */
    }
    if (s->hs != HS_OK) return;
    int32_t n = s->p.max_transfers;
    for (int round = 0; round < 64; round++) {
        bool progress = false, socket_full = false;
        for (int32_t j = 0; j < n && !socket_full; j++) {
            int32_t i = (s->rr + j) % n;
            kvt_stx_t *t = &s->tx[i];
            pd_status st;
            if (t->state == TX_QUEUED)
                st = s_send_reserve(s, t, now);
            else if (t->state == TX_STREAMING && t->cur_layer < t->n_layers_ready)
                st = t->is_device ? s_send_device_layers(s, t, now) : s_send_data(s, t, i, now);
            else if (t->state == TX_STREAMING && t->has_commit && t->cur_layer == s->p.layout.n_layers &&
                     (!t->is_striped || t->in_flight_bytes == 0)) /* striped: the commit must not overtake */
                st = s_send_commit(s, t, now);
            else
                continue;
            t->is_blocked = st == PD_EAGAIN || st == KVT_WAIT_CREDIT;
            if (st == PD_OK)
                progress = true;
            else if (st == PD_EAGAIN)
                socket_full = true;
            else if (st != KVT_WAIT_CREDIT)
                s_end(s, t, st, "send failed", true);
        }
        s->rr = (s->rr + 1) % n;
        if (!progress || socket_full) break;
    }
}

static void s_check_timers(kvt_sender_t *s, uint64_t now) {
    uint64_t reply_us = (uint64_t)s->p.reply_timeout_ms * 1000u;
    for (int32_t i = 0; i < s->p.max_transfers; i++) {
        kvt_stx_t *t = &s->tx[i];
        if (t->state == TX_FREE) continue;
        if (t->state == TX_ENDED) {
            if (atomic_load(&s->rel->slots[i].n_frames) == 0) {
                s_ev_push(s, KVT_EV_RELEASED, t, PD_OK, NULL);
                free(t->block_ids);
                free(t->commit_info);
                memset(t, 0, sizeof *t);
            }
            continue;
        }
        bool waiting = t->state == TX_QUEUED || t->state == TX_RESERVING || t->state == TX_COMMITTING ||
                       t->in_flight_bytes > 0 || t->is_blocked;
        /* a transfer queued behind others' credit or a full socket waits on the connection, not itself */
        uint64_t heard = t->last_heard_us;
        if (t->is_blocked && s->conn_heard_us > heard) heard = s->conn_heard_us;
        if (t->deadline_us && now >= t->deadline_us)
            s_end(s, t, PD_ETIMEDOUT, "transfer deadline passed", true);
        else if (waiting && now > heard + reply_us) {
            s_end(s, t, PD_ETIMEDOUT,
                  s->hs != HS_OK ? "no handshake reply from the receiver" : "no reply from the receiver", true);
            /* A receiver that went silent may have restarted: a new one ignores peers that have not said
             * hello, so the next transfer starts with a fresh handshake. */
            if (s->hs == HS_OK)
                for (int32_t c = 0; c < s->n_conns; c++) s->hs = s->conn[c].hs = HS_NEW;
        }
    }
}

static bool s_has_unreleased(const kvt_sender_t *s) {
    for (int32_t i = 0; i < s->p.max_transfers; i++)
        if (s->tx[i].state != TX_FREE) return true;
    return false;
}

int kvt_sender_poll(kvt_sender_t *s, int timeout_ms, kvt_event_t *events, int cap) {
    uint64_t deadline = pd_now_us() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000u;
    for (;;) {
        s_recv_all(s);
        uint64_t now = pd_now_us();
        if (s->hs != HS_REFUSED) s_pump(s, now);
        s_check_timers(s, now);
        now = pd_now_us();
        if (s->ev_count > 0 || now >= deadline) break;
        /* short slices while anything is live: release counts change on ZeroMQ's threads without waking
         * this socket, and timers need checking */
        long wait_ms = (long)((deadline - now + 999) / 1000);
        if (s_has_unreleased(s) && wait_ms > 5) wait_ms = 5;
        zmq_pollitem_t it[KVT_MAX_CONNS];
        for (int32_t c = 0; c < s->n_conns; c++) it[c] = (zmq_pollitem_t){s->conn[c].sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(it, s->n_conns, wait_ms) < 0 && zmq_errno() != EINTR) break;
    }
    int n = 0;
    while (n < cap && s->ev_count > 0) {
        events[n++] = s->ev[s->ev_head];
        s->ev_head = (s->ev_head + 1) % s->ev_cap;
        s->ev_count--;
    }
    if (n == 0 && s->hs == HS_REFUSED) return PD_EPROTO;
    return n;
}

const char *kvt_sender_error(const kvt_sender_t *s) {
    return s->error;
}

void *kvt_sender_socket(kvt_sender_t *s) {
    return s->conn[0].sock;
}

void kvt_sender_stats(const kvt_sender_t *s, kvt_stats_t *out) {
    *out = s->st;
    out->active_transfers = 0;
    for (int32_t i = 0; i < s->p.max_transfers; i++)
        if (s->tx[i].state != TX_FREE && s->tx[i].state != TX_ENDED) out->active_transfers++;
    out->reserved_blocks = 0;
    out->shm_peers = s->hs == HS_OK && s->use_shm ? 1 : 0;
    out->device_peers = s->hs == HS_OK && s->use_device ? 1 : 0;
}
