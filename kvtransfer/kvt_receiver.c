/* kvt_receiver.c: the decode side of the KV hand-off: one ROUTER for all senders. Reserves blocks through
 * the caller's store, verifies and writes each payload straight into its block (converting dtype), returns
 * credit, and hands the blocks over on commit. Trusts nothing from the wire; a bad message ends only the
 * transfer it names. Does not schedule: what to do with committed blocks is the caller's business. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "kvt_int.h"
#include "pd_log.h"

typedef struct {
    bool in_use, is_ok, is_refused; /* handshake passed / refused (further messages ignored) */
    uint8_t id_len;
    uint8_t id[255];  /* ZeroMQ routing id */
    uint64_t last_us; /* for evicting idle peers when the table is full */
    int32_t n_active; /* transfers in progress */
    char name[64];    /* sender_id from the hello, for logs */
    const void *shm;  /* the sender's pool, mapped read-only (NULL: sockets only) */
    uint64_t shm_bytes;
    void *dev; /* the sender's device pool, mapped by store.peer_open (NULL: none) */
    int32_t dev_n_blocks;
    uint32_t dev_gen;    /* counts the mappings of this peer slot: a transfer copies only from the one it reserved on */
    uint64_t group;      /* KvHello.conn_group: 0, or the sender's connections share it */
    uint32_t conn_index; /* within the group; 0 = the primary, which owns the group's transfers */
} kvt_peer_t;

typedef struct {
    bool in_use;
    int32_t peer;
    uint64_t request_id, transfer_id;
    uint32_t epoch;
    uint32_t next_seq[KVT_MAX_CONNS]; /* per connection of the sender's group */
    uint32_t n_msgs;                  /* KvData messages accepted, all connections */
    int32_t n_tokens, n_blocks;
    int32_t *block_ids; /* (n_blocks) reserved from the store, owned until commit or release */
    int32_t *src_ids;   /* (n_blocks) the sender's, when the blocks are copied device to device; else NULL */
    uint32_t dev_gen;   /* ... and its peer's dev_gen when reserved */
    uint8_t *got;       /* (n_layers * n_blocks) 1 once that block-layer's K and V were written */
    int32_t n_got;
    uint64_t deadline_us;
} kvt_rtx_t;

typedef struct {
    kvt_event_t ev;
    int32_t *ids; /* COMMITTED: owned, freed on the poll after delivery */
} kvt_rev_t;

typedef struct kvt_data_in kvt_data_in_t;

/* Blocks [b, b + n) of layer ly: one K and one V frame of a message. */
typedef struct {
    uint32_t ly, b, n;
} kvt_pair_t;

struct kvt_receiver {
    void *sock;
    kvt_receiver_params_t p;
    char endpoint[256];
    kvt_peer_t peers[KVT_MAX_PEERS];
    kvt_rtx_t *tx; /* (max_transfers) */
    kvt_rev_t *ev; /* ring of ev_cap */
    int ev_cap, ev_head, ev_count;
    int32_t **held_ids; /* delivered on the last poll, freed on the next */
    int n_held;
    zmq_msg_t msgs[KVT_MAX_PAYLOAD_FRAMES + 3]; /* routing id, envelope, payloads, one scratch */
    const void *fptr[KVT_MAX_PAYLOAD_FRAMES + 2];
    size_t fsize[KVT_MAX_PAYLOAD_FRAMES + 2];
    uint8_t envbuf[1024]; /* the receiver sends only small envelopes */
    uint8_t *scratch;     /* one chunk in the widest dtype: a shared-pool chunk is copied here before it is
                             verified and converted, so the sender cannot change it after the check */
    kvt_stats_t st;
    uint64_t log_next_us; /* rate limit for protocol-error lines */
    uint64_t log_suppressed;
    kvt_team_t *team;  /* helpers of copy_threads > 1 */
    kvt_pair_t *pairs; /* of the message in hand (pairs_cap) */
    size_t pairs_cap;
};

kvt_receiver_params_t kvt_receiver_params_default(void) {
    kvt_receiver_params_t p;
    memset(&p, 0, sizeof p);
    p.credit_bytes = 64ull << 20;
    p.max_message_bytes = 256ull << 20;
    p.max_transfers = 256;
    p.default_timeout_ms = 30000;
    p.linger_ms = 0;
    p.heartbeat_ivl_ms = 1000;
    long n_cpu = sysconf(_SC_NPROCESSORS_ONLN);
    p.copy_threads = n_cpu >= 8 ? 4 : 2;
    p.copy_parallel_min_bytes = 1u << 20;
    p.is_shm_enabled = true;
    return p;
}

static void s_log_proto(kvt_receiver_t *r, const kvt_rtx_t *t, const char *msg) {
    uint64_t now = pd_now_us();
    if (now < r->log_next_us) {
        r->log_suppressed++;
        return;
    }
    LOG_W("req=%llx kv transfer %llu from %s failed: %s (%llu similar lines suppressed)",
          (unsigned long long)(t ? t->request_id : 0), (unsigned long long)(t ? t->transfer_id : 0),
          t ? r->peers[t->peer].name : "?", msg, (unsigned long long)r->log_suppressed);
    r->log_suppressed = 0;
    r->log_next_us = now + 1000000u;
}

static kvt_rev_t *s_ev_push(kvt_receiver_t *r, kvt_event_kind_t kind, const kvt_rtx_t *t, pd_status st,
                            const char *err) {
    PD_ASSERT(r->ev_count < r->ev_cap); /* input is read only while kvt_receiver_has_room */
    kvt_rev_t *e = &r->ev[(r->ev_head + r->ev_count) % r->ev_cap];
    memset(e, 0, sizeof *e);
    e->ev.kind = kind;
    e->ev.request_id = t->request_id;
    e->ev.transfer_id = t->transfer_id;
    e->ev.status = st;
    kvt_copy_str(e->ev.err, sizeof e->ev.err, err);
    r->ev_count++;
    return e;
}

bool kvt_receiver_has_room(const kvt_receiver_t *r) {
    return r->ev_count + 4 <= r->ev_cap;
}

static void s_send(kvt_receiver_t *r, int32_t peer, Pdserve__V1__KvEnvelope *env) {
    const kvt_peer_t *pe = &r->peers[peer];
    pd_status st = kvt_send_env(r->sock, pe->id, pe->id_len, env, r->envbuf, sizeof r->envbuf, false);
    /* EAGAIN: the peer stopped reading its replies for KVT_SNDHWM messages; EIO: it is gone. Either way
     * the transfer it concerns ends by timeout on both sides, which is the answer a stuck peer gets. */
    if (st != PD_OK) r->st.frames_dropped_stale++;
}

static void s_send_error(kvt_receiver_t *r, int32_t peer, Pdserve__V1__KvEnvelope__BodyCase kind, uint64_t transfer_id,
                         uint32_t epoch, pd_status status, const char *msg) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = kvt_code_from_status(status);
    e.message = (char *)(msg ? msg : "");
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    Pdserve__V1__KvReserveReply rr = PDSERVE__V1__KV_RESERVE_REPLY__INIT;
    Pdserve__V1__KvDone d = PDSERVE__V1__KV_DONE__INIT;
    env.body_case = kind;
    if (kind == PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY) {
        rr.transfer_id = transfer_id;
        rr.epoch = epoch;
        rr.error = &e;
        rr.credit_bytes = status == PD_OK ? r->p.credit_bytes : 0;
        env.reserve_reply = &rr;
    } else {
        d.transfer_id = transfer_id;
        d.epoch = epoch;
        d.error = &e;
        env.done = &d;
    }
    s_send(r, peer, &env);
}

static void s_store_release(kvt_receiver_t *r, uint64_t request_id, const int32_t *ids, int32_t n) {
    if (r->p.store.release_for)
        r->p.store.release_for(r->p.store.ctx, request_id, ids, n);
    else
        r->p.store.release(r->p.store.ctx, ids, n);
}

/* Frees a transfer's slot; its blocks go back to the store unless they were handed over. */
static void s_tx_free(kvt_receiver_t *r, kvt_rtx_t *t, bool release_blocks) {
    if (release_blocks && t->n_blocks > 0) s_store_release(r, t->request_id, t->block_ids, t->n_blocks);
    r->st.reserved_blocks -= t->n_blocks;
    r->st.active_transfers--;
    r->peers[t->peer].n_active--;
    free(t->block_ids);
    free(t->got);
    free(t->src_ids);
    memset(t, 0, sizeof *t);
}

/* Fails a transfer here (FAILED event, blocks released) and, if tell_peer, there (KvDone with the error). */
static void s_fail(kvt_receiver_t *r, kvt_rtx_t *t, pd_status st, const char *msg, bool tell_peer) {
    if (st != PD_ECLOSED) s_log_proto(r, t, msg);
    if (tell_peer) s_send_error(r, t->peer, PDSERVE__V1__KV_ENVELOPE__BODY_DONE, t->transfer_id, t->epoch, st, msg);
    s_ev_push(r, KVT_EV_FAILED, t, st, msg);
    r->st.transfers_failed++;
    s_tx_free(r, t, true);
}

static kvt_rtx_t *s_find(kvt_receiver_t *r, int32_t peer, uint64_t transfer_id) {
    for (int32_t i = 0; i < r->p.max_transfers; i++)
        if (r->tx[i].in_use && r->tx[i].peer == peer && r->tx[i].transfer_id == transfer_id) return &r->tx[i];
    return NULL;
}

/* The transfer a message names, if it is live and of its current epoch; otherwise counts it stale. */
static kvt_rtx_t *s_live(kvt_receiver_t *r, int32_t peer, uint64_t transfer_id, uint32_t epoch) {
    kvt_rtx_t *t = s_find(r, peer, transfer_id);
    if (!t || t->epoch != epoch) {
        r->st.frames_dropped_stale++;
        return NULL;
    }
    return t;
}

/* ---- messages ---- */

static void s_peer_unmap(kvt_receiver_t *r, kvt_peer_t *pe) {
    if (pe->dev) {
        r->p.store.peer_close(r->p.store.ctx, pe->dev);
        pe->dev = NULL;
        r->st.device_peers--;
    }
    if (!pe->shm) return;
    kvt_shm_unmap(pe->shm, pe->shm_bytes);
    pe->shm = NULL;
    pe->shm_bytes = 0;
    r->st.shm_peers--;
}

static void s_on_hello(kvt_receiver_t *r, int32_t peer, const Pdserve__V1__KvHello *m) {
    kvt_peer_t *pe = &r->peers[peer];
    kvt_fingerprint_t theirs;
    char why[160] = "";
    pd_status st = kvt_fp_from_pb(m->fingerprint, &theirs, why, sizeof why);
    if (st == PD_OK) st = kvt_fingerprint_check(&r->p.fingerprint, &theirs, why, sizeof why);
    kvt_copy_str(pe->name, sizeof pe->name, m->sender_id);
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__Fingerprint fp;
    kvt_fp_to_pb(&r->p.fingerprint, &fp);
    Pdserve__V1__KvHelloReply rep = PDSERVE__V1__KV_HELLO_REPLY__INIT;
    rep.error = &e;
    rep.fingerprint = &fp;
    rep.max_message_bytes = r->p.max_message_bytes;
    rep.frame_runs = true;
    rep.conn_groups = true;
    s_peer_unmap(r, pe); /* a reconnecting sender may offer another pool */
    pe->group = 0;
    if (m->conn_group != 0 && m->conn_index < KVT_MAX_CONNS) {
        /* a newer hello for the same place in the group (a reconnect) supersedes the older connection */
        for (int32_t i = 0; i < KVT_MAX_PEERS; i++)
            if (i != peer && r->peers[i].in_use && r->peers[i].group == m->conn_group &&
                r->peers[i].conn_index == m->conn_index)
                r->peers[i].group = 0;
        pe->group = m->conn_group;
        pe->conn_index = m->conn_index;
    }
    if (st == PD_OK && r->p.is_shm_enabled && m->shm_name && m->shm_name[0] &&
        kvt_shm_map(m->shm_name, m->shm_bytes, &pe->shm) == PD_OK) {
        pe->shm_bytes = m->shm_bytes;
        r->st.shm_peers++;
        rep.shm_mapped = true;
    }
    if (st == PD_OK && r->p.store.peer_open && m->device_handle.len > 0 &&
        m->device_handle.len <= KVT_MAX_DEVICE_HANDLE_BYTES && m->device_n_blocks > 0 &&
        theirs.kv_dtype == r->p.layout.dtype) {
        eng_kv_layout_t src = r->p.layout; /* the fingerprint check made all but the pool's size equal */
        src.n_blocks = (int32_t)(m->device_n_blocks > INT32_MAX ? INT32_MAX : m->device_n_blocks);
        pe->dev = r->p.store.peer_open(r->p.store.ctx, m->device_handle.data, m->device_handle.len, &src);
        if (pe->dev) {
            pe->dev_n_blocks = src.n_blocks;
            pe->dev_gen++;
            r->st.device_peers++;
            rep.device_mapped = true;
        }
    }
    if (st != PD_OK) {
        e.code = PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE;
        e.message = why;
        pe->is_refused = true;
        LOG_E("kv sender %s refused: %s", pe->name, why);
    } else {
        pe->is_ok = true;
    }
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_HELLO_REPLY;
    env.hello_reply = &rep;
    s_send(r, peer, &env);
}

static pd_status s_check_reserve(const kvt_receiver_t *r, int32_t peer, const Pdserve__V1__KvReserve *m, char *why,
                                 size_t cap) {
    const eng_kv_layout_t *l = &r->p.layout;
    uint64_t want = ((uint64_t)m->n_tokens + (uint64_t)l->block_size - 1) / (uint64_t)l->block_size;
    if (m->n_tokens == 0 || m->n_blocks != want) {
        snprintf(why, cap, "reserve: n_blocks %u for n_tokens %u (block_size %d)", m->n_blocks, m->n_tokens,
                 l->block_size);
        return PD_EINVAL;
    }
    if (m->n_blocks > (uint32_t)l->n_blocks) {
        snprintf(why, cap, "reserve: n_blocks %u exceeds the pool (%d)", m->n_blocks, l->n_blocks);
        return PD_EINVAL;
    }
    if (m->n_device_blocks == 0) return PD_OK;
    if (!r->peers[peer].dev || m->n_device_blocks != m->n_blocks) {
        snprintf(why, cap, "reserve: %zu device blocks for %u blocks (device pool %s)", m->n_device_blocks, m->n_blocks,
                 r->peers[peer].dev ? "mapped" : "not mapped");
        return PD_EPROTO;
    }
    for (size_t i = 0; i < m->n_device_blocks; i++)
        if (m->device_blocks[i] >= (uint32_t)r->peers[peer].dev_n_blocks) {
            snprintf(why, cap, "reserve: device block %u outside the sender's pool (%d)", m->device_blocks[i],
                     r->peers[peer].dev_n_blocks);
            return PD_EPROTO;
        }
    return PD_OK;
}

static void s_on_reserve(kvt_receiver_t *r, int32_t peer, const Pdserve__V1__KvReserve *m) {
    kvt_rtx_t *old = s_find(r, peer, m->transfer_id);
    if (old && m->epoch <= old->epoch) { /* a repeat or a late one of an abandoned attempt */
        r->st.frames_dropped_stale++;
        return;
    }
    if (old) s_fail(r, old, PD_ECLOSED, "superseded by a newer epoch", false);
    char why[160] = "";
    pd_status st = s_check_reserve(r, peer, m, why, sizeof why);
    kvt_rtx_t *t = NULL;
    for (int32_t i = 0; st == PD_OK && i < r->p.max_transfers && !t; i++)
        if (!r->tx[i].in_use) t = &r->tx[i];
    if (st == PD_OK && !t) {
        snprintf(why, sizeof why, "reserve: %d transfers in progress", r->p.max_transfers);
        st = PD_EAGAIN;
    }
    int32_t *ids = NULL, *src_ids = NULL;
    uint8_t *got = NULL;
    if (st == PD_OK) {
        ids = malloc(m->n_blocks * sizeof *ids);
        got = calloc((size_t)m->n_blocks * (size_t)r->p.layout.n_layers, 1);
        if (m->n_device_blocks > 0 && (src_ids = malloc(m->n_blocks * sizeof *src_ids)) != NULL)
            for (uint32_t i = 0; i < m->n_blocks; i++) src_ids[i] = (int32_t)m->device_blocks[i];
        if (!ids || !got || (m->n_device_blocks > 0 && !src_ids)) {
            snprintf(why, sizeof why, "reserve: out of memory");
            st = PD_ENOMEM;
        }
    }
    if (st == PD_OK) {
        st = r->p.store.reserve_for ? r->p.store.reserve_for(r->p.store.ctx, m->request_id, (int32_t)m->n_tokens,
                                                             (int32_t)m->n_blocks, ids)
                                    : r->p.store.reserve(r->p.store.ctx, (int32_t)m->n_blocks, ids);
        if (st == PD_EAGAIN)
            snprintf(why, sizeof why, "reserve: no room for %u KV blocks", m->n_blocks);
        else if (st != PD_OK)
            snprintf(why, sizeof why, "reserve: store failed (%s)", pd_strerror(st));
    }
    if (st != PD_OK) {
        free(ids);
        free(got);
        free(src_ids);
        s_send_error(r, peer, PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY, m->transfer_id, m->epoch, st, why);
        return;
    }
    uint64_t timeout_ms = m->timeout_ms ? m->timeout_ms : (uint64_t)r->p.default_timeout_ms;
    if (timeout_ms > KVT_MAX_TIMEOUT_MS) timeout_ms = KVT_MAX_TIMEOUT_MS;
    t->in_use = true;
    t->peer = peer;
    t->request_id = m->request_id;
    t->transfer_id = m->transfer_id;
    t->epoch = m->epoch;
    t->n_tokens = (int32_t)m->n_tokens;
    t->n_blocks = (int32_t)m->n_blocks;
    t->block_ids = ids;
    t->got = got;
    t->src_ids = src_ids;
    t->dev_gen = r->peers[peer].dev_gen;
    t->deadline_us = pd_now_us() + timeout_ms * 1000u;
    r->peers[peer].n_active++;
    r->st.active_transfers++;
    r->st.reserved_blocks += t->n_blocks;
    r->st.transfers_started++;
    s_send_error(r, peer, PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE_REPLY, t->transfer_id, t->epoch, PD_OK, NULL);
}

/* Checks a KvData header and its frames against the transfer and this pool; writes the reason. */
static pd_status s_check_data(const kvt_receiver_t *r, const kvt_rtx_t *t, const Pdserve__V1__KvData *d,
                              size_t n_payload, bool is_truncated, eng_kv_dtype_t *wire_dt, char *why, size_t cap) {
    const eng_kv_layout_t *l = &r->p.layout;
    if (!kvt_dtype_from_pb(d->dtype, wire_dt) || d->block_size != (uint32_t)l->block_size ||
        d->n_kv_heads != (uint32_t)l->n_kv_heads || d->head_dim != (uint32_t)l->head_dim) {
        snprintf(why, cap, "data: layout dtype %d block_size %u n_kv_heads %u head_dim %u does not match the pool",
                 (int)d->dtype, d->block_size, d->n_kv_heads, d->head_dim);
        return PD_EPROTO;
    }
    if (d->n_layers == 0 || d->n_blocks == 0 || (uint64_t)d->first_layer + d->n_layers > (uint64_t)l->n_layers ||
        (uint64_t)d->first_block + d->n_blocks > (uint64_t)t->n_blocks) {
        snprintf(why, cap, "data: layers [%u,+%u) blocks [%u,+%u) out of range", d->first_layer, d->n_layers,
                 d->first_block, d->n_blocks);
        return PD_EPROTO;
    }
    uint64_t run_sum = 0;
    for (size_t i = 0; i < d->n_frame_blocks; i++) {
        if (d->frame_blocks[i] == 0) run_sum = UINT64_MAX; /* caught below */
        run_sum += d->frame_blocks[i];
        if (run_sum > d->n_blocks) break;
    }
    if (d->n_frame_blocks > 0 && run_sum != d->n_blocks) {
        snprintf(why, cap, "data: frame_blocks do not add up to n_blocks %u", d->n_blocks);
        return PD_EPROTO;
    }
    uint64_t n_frames = 2ull * d->n_layers * (d->n_frame_blocks ? d->n_frame_blocks : d->n_blocks);
    bool is_shared = d->n_shm_offsets > 0;
    if (is_shared && (!r->peers[t->peer].shm || n_payload != 0 || d->n_shm_offsets != n_frames)) {
        snprintf(why, cap, "data: %zu shared-pool offsets for %llu frames (%zu payload frames, pool %s)",
                 d->n_shm_offsets, (unsigned long long)n_frames, n_payload,
                 r->peers[t->peer].shm ? "mapped" : "not mapped");
        return PD_EPROTO;
    }
    if (is_truncated || (!is_shared && n_frames != n_payload) || d->n_checksums != n_frames) {
        snprintf(why, cap, "data: %zu payload frames and %zu checksums for %llu frames%s", n_payload, d->n_checksums,
                 (unsigned long long)n_frames, is_truncated ? " (message too large)" : "");
        return PD_EPROTO;
    }
    for (uint32_t b = d->first_block; b < d->first_block + d->n_blocks; b++)
        for (uint32_t ly = d->first_layer; ly < d->first_layer + d->n_layers; ly++)
            if (t->got[(size_t)ly * (size_t)t->n_blocks + b]) {
                snprintf(why, cap, "data: layer %u block %u sent twice", ly, b);
                return PD_EPROTO;
            }
    return PD_OK;
}

#define KVT_COPY_PIECE (16u << 10) /* bytes hashed and stored per step: stays in L1 between the two */

/* What s_on_data needs for each frame. */
struct kvt_data_in {
    const Pdserve__V1__KvData *d;
    const void *const *frames; /* socket payloads, or NULL for the shared pool */
    const size_t *sizes;
    const uint8_t *shm;
    uint64_t shm_bytes;
    eng_kv_dtype_t wire_dt;
    size_t wire_chunk; /* bytes of one chunk on the wire */
    uint64_t total;
};

/* Copies frame f (n chunks of kind, blocks [b, b + n) of layer ly) into the reserved blocks, then checks
 * its checksum over the bytes as they were copied (so a sender that overwrites its shared pool meanwhile
 * is caught, not committed). false + reason: wrong size, out of the pool, or checksum mismatch. */
static bool s_put_frame(kvt_receiver_t *r, kvt_rtx_t *t, const kvt_data_in_t *in, uint8_t *scratch, size_t f,
                        uint32_t ly, int kind, uint32_t b, uint32_t n, char *why, size_t cap) {
    const eng_kv_layout_t *l = &r->p.layout;
    uint64_t bytes = (uint64_t)n * in->wire_chunk;
    const uint8_t *src;
    if (in->shm) {
        uint64_t off = in->d->shm_offsets[f];
        src = off <= in->shm_bytes && bytes <= in->shm_bytes - off ? in->shm + off : NULL;
    } else {
        src = in->sizes[f] == bytes ? in->frames[f] : NULL;
    }
    if (!src) {
        snprintf(why, cap, "data: layer %u blocks [%u,+%u) %c: %s", ly, b, n, kind ? 'V' : 'K',
                 in->shm ? "outside the shared pool" : "wrong size");
        return false;
    }
    kvt_hash_t hs;
    kvt_hash_reset(&hs);
    for (uint32_t i = 0; i < n; i++, src += in->wire_chunk) {
        uint8_t *dst = r->p.store.chunk(r->p.store.ctx, (int32_t)ly, (eng_kv_kind_t)kind, t->block_ids[b + i]);
        if (in->wire_dt == l->dtype) {
            /* in L1-sized pieces: hash, then stream to the block. A shared-pool piece is first copied to
             * scratch (the sender could change it between our hash and our copy); a socket frame is ours. */
            for (size_t o = 0; o < in->wire_chunk; o += KVT_COPY_PIECE) {
                size_t k = in->wire_chunk - o < KVT_COPY_PIECE ? in->wire_chunk - o : KVT_COPY_PIECE;
                const uint8_t *c = in->shm ? memcpy(scratch, src + o, k) : src + o;
                kvt_hash_update(&hs, c, k);
                kvt_copy_stream(dst + o, c, k);
            }
        } else {
            const uint8_t *c = src;
            if (in->shm) c = memcpy(scratch, src, in->wire_chunk);
            kvt_hash_update(&hs, c, in->wire_chunk);
            kvt_convert(dst, l->dtype, c, in->wire_dt, eng_kv_chunk_elems(l));
        }
    }
    if (kvt_hash_digest(&hs) != in->d->checksums[f]) {
        snprintf(why, cap, "data: layer %u blocks [%u,+%u) %c: checksum mismatch", ly, b, n, kind ? 'V' : 'K');
        return false;
    }
    return true;
}

/* The copy team's view of one message: item i is frame i, pair i / 2's K (even) or V (odd). */
typedef struct {
    kvt_receiver_t *r;
    kvt_rtx_t *t;
    const kvt_data_in_t *in;
    const kvt_pair_t *pairs;
} kvt_team_job_t;

static bool s_team_frame(void *ctx, size_t i, uint8_t *scratch, char *why, size_t cap) {
    const kvt_team_job_t *j = ctx;
    const kvt_pair_t *p = &j->pairs[i / 2];
    return s_put_frame(j->r, j->t, j->in, scratch, i, p->ly, (int)(i % 2), p->b, p->n, why, cap);
}

/* The message's (layer, block run) pairs in frame order, into r->pairs; returns how many. */
static size_t s_pairs(kvt_receiver_t *r, const Pdserve__V1__KvData *d) {
    size_t n_runs = d->n_frame_blocks > 0 ? d->n_frame_blocks : d->n_blocks, n = (size_t)d->n_layers * n_runs;
    if (n > r->pairs_cap) {
        free(r->pairs);
        r->pairs = pd_xmalloc(n * sizeof *r->pairs);
        r->pairs_cap = n;
    }
    size_t k = 0;
    uint32_t last_layer = d->first_layer + d->n_layers, last_block = d->first_block + d->n_blocks;
    if (d->n_frame_blocks > 0) { /* for each layer, for each run: K, V */
        for (uint32_t ly = d->first_layer; ly < last_layer; ly++)
            for (size_t i = 0, b = d->first_block; i < d->n_frame_blocks; b += d->frame_blocks[i++])
                r->pairs[k++] = (kvt_pair_t){.ly = ly, .b = (uint32_t)b, .n = d->frame_blocks[i]};
    } else { /* for each block, for each layer: K, V */
        for (uint32_t b = d->first_block; b < last_block; b++)
            for (uint32_t ly = d->first_layer; ly < last_layer; ly++)
                r->pairs[k++] = (kvt_pair_t){.ly = ly, .b = b, .n = 1};
    }
    return k;
}

/* The primary connection of peer's group, which owns the group's transfers (peer itself if it has none). */
static int32_t s_primary(const kvt_receiver_t *r, int32_t peer) {
    const kvt_peer_t *pe = &r->peers[peer];
    if (pe->group == 0 || pe->conn_index == 0) return peer;
    for (int32_t i = 0; i < KVT_MAX_PEERS; i++)
        if (r->peers[i].in_use && r->peers[i].is_ok && r->peers[i].group == pe->group && r->peers[i].conn_index == 0)
            return i;
    return -1;
}

/* A device transfer's KvData: layers [first_layer, + n_layers) of all its blocks are final in the sender's device pool,
 * in order and without frames. Copied now, so that the commit finds little left to wait for. */
static void s_on_device_layers(kvt_receiver_t *r, kvt_rtx_t *t, uint32_t ci, const Pdserve__V1__KvData *d,
                               size_t n_payload) {
    const eng_kv_layout_t *l = &r->p.layout;
    const int32_t n_copied = t->n_got / t->n_blocks; /* leading layers copied so far: whole layers only on this path */
    char why[160];
    eng_kv_dtype_t dt;
    if (ci != 0 || d->seq != t->next_seq[0] || n_payload != 0 || d->n_shm_offsets != 0 || d->n_frame_blocks != 0 ||
        d->first_block != 0 || d->n_blocks != (uint32_t)t->n_blocks || d->first_layer != (uint32_t)n_copied ||
        d->n_layers == 0 || (uint64_t)d->first_layer + d->n_layers > (uint64_t)l->n_layers ||
        !kvt_dtype_from_pb(d->dtype, &dt) || dt != l->dtype) {
        snprintf(why, sizeof why,
                 "data: device layers [%u,+%u) of blocks [%u,+%u), seq %u, %zu frames; expected layer %d, seq %u, "
                 "all %d blocks, no frames",
                 d->first_layer, d->n_layers, d->first_block, d->n_blocks, d->seq, n_payload, n_copied, t->next_seq[0],
                 t->n_blocks);
        s_fail(r, t, PD_EPROTO, why, true);
        return;
    }
    const kvt_peer_t *pe = &r->peers[t->peer];
    if (!pe->dev || pe->dev_gen != t->dev_gen) { /* the sender said hello again since: its pool may be another */
        s_fail(r, t, PD_EPROTO, "data: the device pool this transfer was reserved on is no longer mapped", true);
        return;
    }
    pd_status st = r->p.store.peer_copy(r->p.store.ctx, pe->dev, t->src_ids, t->block_ids, t->n_blocks,
                                        (int32_t)d->first_layer, (int32_t)d->n_layers);
    if (st != PD_OK) {
        snprintf(why, sizeof why, "data: device-to-device copy of layers [%u,+%u) failed (%s)", d->first_layer,
                 d->n_layers, pd_strerror(st));
        s_fail(r, t, PD_EIO, why, true);
        return;
    }
    const uint64_t bytes = kvt_layers_bytes(l, (int32_t)d->n_layers, t->n_blocks);
    r->st.payload_bytes += bytes;
    r->st.device_payload_bytes += bytes;
    t->next_seq[0]++;
    t->n_msgs++;
    t->n_got += (int32_t)d->n_layers * t->n_blocks;
}

static void s_on_data(kvt_receiver_t *r, int32_t conn, const Pdserve__V1__KvData *d, const void *const *frames,
                      const size_t *sizes, size_t n_payload, bool is_truncated) {
    int32_t peer = s_primary(r, conn);
    kvt_rtx_t *t = peer >= 0 ? s_live(r, peer, d->transfer_id, d->epoch) : NULL;
    if (!t) { /* stale: never written */
        if (peer < 0) r->st.frames_dropped_stale++;
        return;
    }
    kvt_data_in_t in = {.d = d, .frames = frames, .sizes = sizes};
    char why[160];
    uint32_t ci = r->peers[conn].group ? r->peers[conn].conn_index : 0;
    if (t->src_ids) {
        s_on_device_layers(r, t, ci, d, n_payload);
        return;
    }
    if (d->seq != t->next_seq[ci]) {
        snprintf(why, sizeof why, "data: seq %u, expected %u (gap or repeat; connection %u)", d->seq, t->next_seq[ci],
                 ci);
        s_fail(r, t, PD_EPROTO, why, true);
        return;
    }
    if (s_check_data(r, t, d, n_payload, is_truncated, &in.wire_dt, why, sizeof why) != PD_OK) {
        s_fail(r, t, PD_EPROTO, why, true);
        return;
    }
    in.wire_chunk = eng_kv_chunk_elems(&r->p.layout) * eng_kv_dtype_bytes(in.wire_dt);
    if (d->n_shm_offsets > 0) {
        in.shm = r->peers[peer].shm;
        in.shm_bytes = r->peers[peer].shm_bytes;
    }
    const size_t n_pairs = s_pairs(r, d);
    uint32_t widest = 0;
    for (size_t i = 0; i < n_pairs; i++) widest = r->pairs[i].n > widest ? r->pairs[i].n : widest;
    kvt_team_job_t job = {.r = r, .t = t, .in = &in, .pairs = r->pairs};
    bool ok = true;
    /* shared-pool frames through the copy team, where the copies are the whole cost; socket payloads stay here: ZeroMQ's
     * I/O thread already runs beside this one, and a third thread on two cores made tcp slower */
    if (r->team && in.shm && (uint64_t)widest * in.wire_chunk >= r->p.copy_parallel_min_bytes)
        ok = kvt_team_run(r->team, s_team_frame, &job, 2 * n_pairs, r->scratch, why, sizeof why);
    else
        for (size_t i = 0; ok && i < 2 * n_pairs; i++) ok = s_team_frame(&job, i, r->scratch, why, sizeof why);
    kvt_copy_fence();
    if (!ok) {
        s_fail(r, t, PD_EPROTO, why, true);
        return;
    }
    for (size_t i = 0; i < n_pairs; i++) {
        const kvt_pair_t *p = &r->pairs[i];
        for (uint32_t k = 0; k < p->n; k++) t->got[(size_t)p->ly * (size_t)t->n_blocks + p->b + k] = 1;
        t->n_got += (int32_t)p->n;
        in.total += 2u * (uint64_t)p->n * in.wire_chunk;
    }
    t->next_seq[ci]++;
    t->n_msgs++;
    r->st.striped_msgs += ci > 0;
    r->st.payload_bytes += in.total;
    if (in.shm) r->st.shm_payload_bytes += in.total;
    Pdserve__V1__KvCredit c = PDSERVE__V1__KV_CREDIT__INIT;
    c.transfer_id = t->transfer_id;
    c.epoch = t->epoch;
    c.bytes = in.total;
    Pdserve__V1__KvEnvelope env = PDSERVE__V1__KV_ENVELOPE__INIT;
    env.body_case = PDSERVE__V1__KV_ENVELOPE__BODY_CREDIT;
    env.credit = &c;
    s_send(r, peer, &env);
}

static void s_on_commit(kvt_receiver_t *r, int32_t peer, const Pdserve__V1__KvCommit *m) {
    kvt_rtx_t *t = s_live(r, peer, m->transfer_id, m->epoch);
    if (!t) return;
    int32_t want = r->p.layout.n_layers * t->n_blocks;
    char why[160];
    size_t info_len = m->first_token_info.len;
    if (m->n_frames != t->n_msgs || t->n_got != want || m->first_token < 0 || info_len > KVT_MAX_COMMIT_INFO_BYTES) {
        snprintf(why, sizeof why,
                 "commit: %u messages sent, %u received; %d of %d block-layers; first_token %d; info %zu bytes",
                 m->n_frames, t->n_msgs, t->n_got, want, m->first_token, info_len);
        s_fail(r, t, PD_EPROTO, why, true);
        return;
    }
    /* the info rides in the same allocation as the block ids, so it is freed with them */
    size_t ids_bytes = (size_t)t->n_blocks * sizeof(int32_t);
    int32_t *ids = realloc(t->block_ids, ids_bytes + info_len);
    if (!ids) {
        s_fail(r, t, PD_ENOMEM, "commit: out of memory", true);
        return;
    }
    t->block_ids = ids;
    if (info_len > 0) memcpy((uint8_t *)ids + ids_bytes, m->first_token_info.data, info_len);
    s_send_error(r, peer, PDSERVE__V1__KV_ENVELOPE__BODY_DONE, t->transfer_id, t->epoch, PD_OK, NULL);
    kvt_rev_t *e = s_ev_push(r, KVT_EV_COMMITTED, t, PD_OK, NULL);
    e->ids = t->block_ids; /* ownership of the blocks and of this array moves to the event */
    e->ev.first_token = m->first_token;
    e->ev.n_tokens = t->n_tokens;
    e->ev.n_blocks = t->n_blocks;
    e->ev.block_ids = e->ids;
    e->ev.is_on_device = t->src_ids != NULL;
    e->ev.first_token_info = info_len > 0 ? (const uint8_t *)ids + ids_bytes : NULL;
    e->ev.first_token_info_len = info_len;
    t->block_ids = NULL;
    r->st.transfers_done++;
    s_tx_free(r, t, false);
}

static void s_on_cancel(kvt_receiver_t *r, int32_t peer, const Pdserve__V1__KvCancel *m) {
    kvt_rtx_t *t = s_live(r, peer, m->transfer_id, m->epoch);
    if (!t) return;
    char why[160];
    snprintf(why, sizeof why, "cancelled by the sender: %s", m->reason && m->reason->message ? m->reason->message : "");
    s_fail(r, t, PD_ECLOSED, why, false);
}

/* The peer with this routing id; a new entry only for a hello (evicting the idlest peer with nothing in
 * progress when the table is full). -1 if none. */
static int32_t s_peer(kvt_receiver_t *r, const void *id, size_t id_len, bool may_add) {
    int32_t free_i = -1, idle_i = -1;
    for (int32_t i = 0; i < KVT_MAX_PEERS; i++) {
        kvt_peer_t *pe = &r->peers[i];
        if (!pe->in_use) {
            if (free_i < 0) free_i = i;
        } else if (pe->id_len == id_len && memcmp(pe->id, id, id_len) == 0) {
            return i;
        } else if (pe->n_active == 0 && (idle_i < 0 || pe->last_us < r->peers[idle_i].last_us)) {
            idle_i = i;
        }
    }
    if (!may_add || id_len == 0 || id_len > sizeof r->peers[0].id) return -1;
    int32_t i = free_i >= 0 ? free_i : idle_i;
    if (i < 0) return -1;
    s_peer_unmap(r, &r->peers[i]);
    memset(&r->peers[i], 0, sizeof r->peers[i]);
    r->peers[i].in_use = true;
    r->peers[i].id_len = (uint8_t)id_len;
    memcpy(r->peers[i].id, id, id_len);
    return i;
}

static void s_handle(kvt_receiver_t *r, const void *peer_id, size_t peer_len, const void *const *frames,
                     const size_t *sizes, size_t n, bool is_truncated) {
    Pdserve__V1__KvEnvelope *env = n > 0 ? kvt_env_unpack(frames[0], sizes[0]) : NULL;
    if (!env) {
        r->st.frames_dropped_stale++;
        return;
    }
    bool is_hello = env->body_case == PDSERVE__V1__KV_ENVELOPE__BODY_HELLO;
    int32_t peer = s_peer(r, peer_id, peer_len, is_hello);
    if (peer < 0 || r->peers[peer].is_refused || (!is_hello && !r->peers[peer].is_ok)) {
        r->st.frames_dropped_stale++; /* unknown, refused, or not yet shaken hands */
        goto done;
    }
    r->peers[peer].last_us = pd_now_us();
    if (!is_hello && env->body_case != PDSERVE__V1__KV_ENVELOPE__BODY_DATA && n > 1) {
        r->st.frames_dropped_stale++; /* control messages carry no payload */
        goto done;
    }
    switch (env->body_case) {
    case PDSERVE__V1__KV_ENVELOPE__BODY_HELLO:
        if (n == 1) s_on_hello(r, peer, env->hello);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_RESERVE: s_on_reserve(r, peer, env->reserve); break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_DATA:
        s_on_data(r, peer, env->data, frames + 1, sizes + 1, n - 1, is_truncated);
        break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_COMMIT: s_on_commit(r, peer, env->commit); break;
    case PDSERVE__V1__KV_ENVELOPE__BODY_CANCEL: s_on_cancel(r, peer, env->cancel); break;
    default: r->st.frames_dropped_stale++; break; /* replies are the sender's to receive */
    }
done:
    pdserve__v1__kv_envelope__free_unpacked(env, NULL);
}

void kvt_receiver_handle_frames(kvt_receiver_t *r, const void *peer_id, size_t peer_len, const void *const *frames,
                                const size_t *sizes, size_t n) {
    size_t total = 0;
    for (size_t i = 0; i < n; i++) total += sizes[i];
    bool is_truncated = n > KVT_MAX_PAYLOAD_FRAMES + 1 || total > r->p.max_message_bytes;
    s_handle(r, peer_id, peer_len, frames, sizes, n, is_truncated);
}

/* ---- socket ---- */

/* Receives one multipart message (routing id + envelope + payloads) and handles it. false: nothing there. */
static bool s_recv_one(kvt_receiver_t *r) {
    size_t n = 0, total = 0;
    bool more = true, is_truncated = false;
    const size_t cap = KVT_MAX_PAYLOAD_FRAMES + 2;
    while (more) {
        zmq_msg_t *m = &r->msgs[n < cap ? n : cap];
        zmq_msg_init(m);
        if (zmq_msg_recv(m, r->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(m);
            if (n == 0) return false;
            is_truncated = true; /* parts of one message arrive together: not reached in practice */
            break;
        }
        more = zmq_msg_more(m);
        total += zmq_msg_size(m);
        if (n < cap) {
            r->fptr[n] = zmq_msg_data(m);
            r->fsize[n] = zmq_msg_size(m);
            n++;
        } else { /* too many frames: drain through the scratch slot, then fail the transfer */
            zmq_msg_close(m);
            is_truncated = true;
        }
    }
    if (total > r->p.max_message_bytes) is_truncated = true;
    if (n >= 2) s_handle(r, r->fptr[0], r->fsize[0], r->fptr + 1, r->fsize + 1, n - 1, is_truncated);
    for (size_t i = 0; i < n; i++) zmq_msg_close(&r->msgs[i]);
    return true;
}

static void s_check_timers(kvt_receiver_t *r, uint64_t now) {
    for (int32_t i = 0; i < r->p.max_transfers && kvt_receiver_has_room(r); i++) {
        kvt_rtx_t *t = &r->tx[i];
        if (t->in_use && now >= t->deadline_us)
            s_fail(r, t, PD_ETIMEDOUT, "transfer not committed before its timeout", true);
    }
}

kvt_receiver_t *kvt_receiver_create(void *zmq_ctx, const kvt_receiver_params_t *p, char *err, size_t err_cap) {
    kvt_receiver_t *r = NULL;
    const eng_kv_layout_t *l = &p->layout;
    if (kvt_endpoint_check(p->endpoint, err, err_cap) != PD_OK) return NULL;
    if (!zmq_ctx || !(p->store.reserve || p->store.reserve_for) || !(p->store.release || p->store.release_for) ||
        !p->store.chunk || l->n_layers <= 0 || l->n_kv_heads <= 0 || l->head_dim <= 0 || l->block_size <= 0 ||
        l->n_blocks <= 0 || l->dtype > ENG_KV_BF16 || p->max_transfers <= 0 || p->max_transfers > 65536 ||
        p->default_timeout_ms <= 0 || p->linger_ms < 0 ||
        p->max_message_bytes < 2 * eng_kv_chunk_bytes(l) + KVT_MAX_ENVELOPE_BYTES ||
        p->max_message_bytes > (uint64_t)INT64_MAX ||
        !(p->store.peer_open ? p->store.peer_copy && p->store.peer_close
                             : !p->store.peer_copy && !p->store.peer_close)) {
        snprintf(err, err_cap, "kvt receiver: bad params (store, layout, limits, max_message_bytes)");
        return NULL;
    }
    r = pd_xcalloc(1, sizeof *r);
    r->p = *p;
    r->tx = pd_xcalloc((size_t)p->max_transfers, sizeof *r->tx);
    r->ev_cap = 2 * p->max_transfers + 16;
    r->ev = pd_xcalloc((size_t)r->ev_cap, sizeof *r->ev);
    r->held_ids = pd_xcalloc((size_t)r->ev_cap, sizeof *r->held_ids);
    r->scratch = pd_xmalloc(eng_kv_chunk_elems(l) * 4u);
    if (p->copy_threads >= 2) r->team = kvt_team_create(p->copy_threads - 1, eng_kv_chunk_elems(l) * 4u);
    r->sock = zmq_socket(zmq_ctx, ZMQ_ROUTER);
    if (!r->sock) {
        snprintf(err, err_cap, "zmq_socket(ROUTER): %s", zmq_strerror(errno));
        goto fail;
    }
    if (kvt_socket_setup(r->sock, p->linger_ms, p->heartbeat_ivl_ms, err, err_cap) != PD_OK) goto fail;
    int one = 1;
    int64_t max_msg = (int64_t)p->max_message_bytes; /* per frame in libzmq; the whole message is checked here */
    /* ROUTER_MANDATORY: a reply to a vanished peer fails (EHOSTUNREACH) instead of vanishing silently */
    if (zmq_setsockopt(r->sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one) != 0 ||
        zmq_setsockopt(r->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg) != 0) {
        snprintf(err, err_cap, "kvt receiver: setsockopt: %s", zmq_strerror(errno));
        goto fail;
    }
    if (zmq_bind(r->sock, p->endpoint) != 0) {
        snprintf(err, err_cap, "kvt receiver: bind %s: %s", p->endpoint, zmq_strerror(errno));
        goto fail;
    }
    size_t len = sizeof r->endpoint;
    if (zmq_getsockopt(r->sock, ZMQ_LAST_ENDPOINT, r->endpoint, &len) != 0)
        kvt_copy_str(r->endpoint, sizeof r->endpoint, p->endpoint);
    r->p.endpoint = r->endpoint;
    return r;
fail:
    kvt_receiver_destroy(&r);
    return NULL;
}

/* Ends every transfer (blocks back to the store, undelivered commits included) and forgets every peer. */
static void s_drop_all(kvt_receiver_t *r) {
    for (int32_t i = 0; i < r->p.max_transfers; i++)
        if (r->tx[i].in_use) s_tx_free(r, &r->tx[i], true);
    for (int i = 0; i < r->n_held; i++) free(r->held_ids[i]);
    r->n_held = 0;
    for (int i = 0; i < r->ev_count; i++) { /* committed but never delivered: nobody else will free them */
        kvt_rev_t *e = &r->ev[(r->ev_head + i) % r->ev_cap];
        if (e->ids) s_store_release(r, e->ev.request_id, e->ids, e->ev.n_blocks);
        free(e->ids);
    }
    r->ev_head = r->ev_count = 0;
    for (int i = 0; i < KVT_MAX_PEERS; i++) s_peer_unmap(r, &r->peers[i]);
    memset(r->peers, 0, sizeof r->peers);
}

void kvt_receiver_reset(kvt_receiver_t *r) {
    s_drop_all(r);
    memset(&r->st, 0, sizeof r->st);
}

void kvt_receiver_destroy(kvt_receiver_t **rp) {
    if (!rp || !*rp) return;
    kvt_receiver_t *r = *rp;
    kvt_team_destroy(&r->team);
    free(r->pairs);
    s_drop_all(r);
    if (r->sock) zmq_close(r->sock);
    free(r->held_ids);
    free(r->scratch);
    free(r->ev);
    free(r->tx);
    free(r);
    *rp = NULL;
}

int kvt_receiver_poll(kvt_receiver_t *r, int timeout_ms, kvt_event_t *events, int cap) {
    for (int i = 0; i < r->n_held; i++) free(r->held_ids[i]);
    r->n_held = 0;
    uint64_t deadline = pd_now_us() + (uint64_t)(timeout_ms > 0 ? timeout_ms : 0) * 1000u;
    for (;;) {
        /* read while there is room for what a message may produce (backpressure when events pile up) */
        for (int i = 0; i < 4096 && kvt_receiver_has_room(r); i++)
            if (!s_recv_one(r)) break;
        uint64_t now = pd_now_us();
        s_check_timers(r, now);
        if (r->ev_count > 0 || now >= deadline) break;
        long wait_ms = (long)((deadline - now + 999) / 1000);
        if (r->st.active_transfers > 0 && wait_ms > 10) wait_ms = 10; /* timers */
        zmq_pollitem_t it = {r->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, wait_ms) < 0 && zmq_errno() != EINTR) break;
    }
    int n = 0;
    while (n < cap && r->ev_count > 0) {
        kvt_rev_t *e = &r->ev[r->ev_head];
        events[n++] = e->ev;
        if (e->ids) r->held_ids[r->n_held++] = e->ids;
        r->ev_head = (r->ev_head + 1) % r->ev_cap;
        r->ev_count--;
    }
    return n;
}

int kvt_receiver_cancel(kvt_receiver_t *r, uint64_t request_id) {
    int n = 0;
    for (int32_t i = 0; i < r->p.max_transfers; i++)
        if (r->tx[i].in_use && r->tx[i].request_id == request_id) {
            s_fail(r, &r->tx[i], PD_ECLOSED, "cancelled by the receiver", true);
            n++;
        }
    return n;
}

void *kvt_receiver_socket(kvt_receiver_t *r) {
    return r->sock;
}

const char *kvt_receiver_endpoint(const kvt_receiver_t *r) {
    return r->endpoint;
}

void kvt_receiver_stats(const kvt_receiver_t *r, kvt_stats_t *out) {
    *out = r->st;
}
