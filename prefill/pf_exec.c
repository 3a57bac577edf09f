/* pf_exec.c: the prefill executor (contract in pf_exec.h): one step at a time on the engine thread, KV hand-off
 * through one cached kvt_sender per decode endpoint, and the bookkeeping that ends every request exactly once.
 * Does not speak to the router (on_fail does) and does not decide what runs (pf_sched does). */
#include "pf_exec.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "eng_async.h"
#include "pd_log.h"

#define S_TICK_MS        1 /* sender polling while transfers are live: release and timers need it */
#define S_HOUSEKEEP_MS   1000
#define S_KVT_EVENTS     64
#define S_INFO_MAX_BYTES 512  /* a packed TokenLogprob with ENG_MAX_LOGPROBS alternatives is ~300 bytes */
#define S_RECENT_TAILS   1024 /* KV tails kept for the exit line's percentiles */

typedef struct s_peer s_peer_t;

typedef enum { R_FREE = 0, R_SCHED, R_SENDING } s_rstate_t;

/* What the executor knows of a request beside pf_sched's view: where its KV goes and how it ends.
 * The transfer starts with the step that runs the prompt's final chunk (streamed: layers go out as the forward
 * stores them, pf_sched_pin keeps the blocks) or, when streaming is off, once the prompt is done. It ends at
 * RELEASED; the blocks go back once both the transfer is over and pf_sched holds the request as SENDING. */
typedef struct {
    uint64_t req_id;
    s_rstate_t state;      /* R_SCHED: pf_sched QUEUED / PREFILLING; R_SENDING: pf_sched SENDING */
    bool is_in_step;       /* part of the running plan */
    bool is_cancelled;     /* the router gave it up: never reported */
    bool is_reported;      /* on_fail was called */
    bool has_transfer;     /* started and not yet RELEASED (peer, transfer_id) */
    bool is_pinned;        /* its transfer started while the final chunk ran (pf_sched_pin) */
    bool is_transfer_over; /* RELEASED arrived, or the start failed: nothing references the blocks */
    bool is_done;          /* DONE arrived (done_status), or the transfer ended otherwise */
    pd_status done_status;
    int32_t n_layers_ready; /* streamed: layers marked ready so far */
    uint64_t kv_ready_us;   /* when the loop saw the whole KV ready (every layer stored, or the step done) */
    uint64_t commit_us;     /* when the commit (with the first token, after the step) was handed to the sender */
    uint64_t deadline_us;   /* 0 = none */
    s_peer_t *peer;         /* has_transfer */
    uint64_t transfer_id;   /* has_transfer, unique per peer */
    int32_t next_free;      /* free-slot stack */
    char decode_id[PB_MAX_ID_BYTES + 1];
    char endpoint[PB_MAX_ENDPOINT_BYTES + 1];
} s_req_t;

/* One decode worker's KV receiver, and our connection to it. */
struct s_peer {
    pf_exec_t *x;
    char endpoint[PB_MAX_ENDPOINT_BYTES + 1];
    kvt_sender_t *kvt;
    uint64_t next_transfer_id;
    int32_t n_live;         /* transfers started and not released */
    uint64_t idle_since_us; /* when n_live last became 0 */
};

struct pf_exec {
    pf_exec_params_t p;
    char worker_id[PB_MAX_ID_BYTES + 1];
    eng_async_t *async;
    pf_sched_t *sched;
    int32_t vocab_size;

    /* the running step: plan, batch and logits stay untouched until its completion is collected */
    const pf_plan_t *plan; /* NULL when the engine is idle */
    eng_batch_t batch;
    float *logits; /* (logits_rows, vocab_size), grown when a plan needs more rows */
    int32_t logits_rows;
    pf_event_t *events; /* (max_step_seqs) */
    /* Layers of the running step's K/V in host memory: written by the engine (its thread or a CUDA callback
     * thread, eng_batch_t.kv_host_layers), read here on the tick; kv_layers_marked is what streams were told. */
    int32_t kv_host_layers;
    int32_t kv_layers_marked;
    int32_t n_layers;
    uint64_t n_streamed, n_layers_early;
    uint64_t n_tails, tail_us_sum, tail_us_max; /* KV ready -> DONE(PD_OK), per delivered transfer */
    uint32_t recent_tails_us[S_RECENT_TAILS];   /* the last ones, for the median at exit */
    uint32_t recent_waits_us[S_RECENT_TAILS];   /* of each, KV ready -> commit: the step's end, not the transport */

    /* requests: slots, a free stack and an open-addressing index req_id -> slot + 1 (0 = empty) */
    s_req_t *reqs;
    int32_t n_slots, free_top, n_reqs, n_transfers;
    int32_t *index;
    uint32_t index_mask;

    s_peer_t **peers;
    int32_t n_peers, cap_peers;
    int64_t tick_id, housekeep_id;
    uint64_t kv_bytes_retired, kv_shm_bytes_retired; /* payload bytes of closed senders (all; through shared memory) */
    uint64_t kv_device_bytes_retired;                /* ... device to device */
    uint8_t device_handle[KVT_MAX_DEVICE_HANDLE_BYTES]; /* eng_kv_export's, offered to every decode peer */
    size_t device_handle_len;                           /* 0: none */
    uint64_t n_failed;
    kvt_event_t kvt_ev[S_KVT_EVENTS];
};

pf_exec_params_t pf_exec_params_default(void) {
    pf_exec_params_t p = {0};
    p.sched = pf_sched_params_default();
    p.kv_conns = 1;
    p.idle_sender_ms = 60000;
    p.is_kv_stream = true;
    p.is_kv_device = true;
    return p;
}

static eng_kv_dtype_t s_dtype(eng_t *e) {
    return eng_kv_layout(e)->dtype;
}

void pf_exec_fingerprint(eng_t *e, kvt_fingerprint_t *out) {
    const eng_model_config_t *c = eng_config(e);
    const eng_kv_layout_t *l = eng_kv_layout(e);
    memset(out, 0, sizeof *out);
    snprintf(out->model_id, sizeof out->model_id, "%s", c->name);
    out->weights_hash = eng_model_identity_hash(eng_model(e));
    out->tokenizer_hash = eng_tok_hash(eng_tokenizer(e));
    out->kv_dtype = s_dtype(e);
    out->block_size = l->block_size, out->n_layers = l->n_layers;
    out->n_kv_heads = l->n_kv_heads, out->head_dim = l->head_dim;
    out->rope_theta = c->rope_theta, out->rope_dim = c->rope_dim;
}

/* ---- request slots ---- */

static uint32_t s_hash(uint64_t id) {
    id ^= id >> 33, id *= 0xff51afd7ed558ccdull, id ^= id >> 33; /* murmur3 finaliser: ids may be sequential */
    return (uint32_t)id;
}

static s_req_t *s_req_find(pf_exec_t *x, uint64_t req_id) {
    for (uint32_t h = s_hash(req_id) & x->index_mask;; h = (h + 1) & x->index_mask) {
        int32_t i = x->index[h];
        if (i == 0) return NULL;
        if (x->reqs[i - 1].req_id == req_id) return &x->reqs[i - 1];
    }
}

/* NULL when every slot is taken (cannot happen while pf_sched accepts: it holds as many). */
static s_req_t *s_req_new(pf_exec_t *x, uint64_t req_id) {
    if (x->free_top < 0) return NULL;
    int32_t i = x->free_top;
    s_req_t *r = &x->reqs[i];
    x->free_top = r->next_free;
    memset(r, 0, sizeof *r);
    r->req_id = req_id;
    r->state = R_SCHED;
    uint32_t h = s_hash(req_id) & x->index_mask;
    while (x->index[h] != 0) h = (h + 1) & x->index_mask;
    x->index[h] = i + 1;
    x->n_reqs++;
    return r;
}

/* Forgets r (its blocks are pf_sched's business). Backward-shift deletion keeps every probe chain whole. */
static void s_req_free(pf_exec_t *x, s_req_t *r) {
    int32_t i = (int32_t)(r - x->reqs);
    uint32_t h = s_hash(r->req_id) & x->index_mask;
    while (x->index[h] != i + 1) h = (h + 1) & x->index_mask;
    for (uint32_t j = (h + 1) & x->index_mask; x->index[j] != 0; j = (j + 1) & x->index_mask) {
        uint32_t home = s_hash(x->reqs[x->index[j] - 1].req_id) & x->index_mask;
        /* the entry at j may move to the hole at h if its home is not cyclically in (h, j] */
        if (((j - home) & x->index_mask) >= ((j - h) & x->index_mask)) {
            x->index[h] = x->index[j];
            h = j;
        }
    }
    x->index[h] = 0;
    memset(r, 0, sizeof *r);
    r->next_free = x->free_top;
    x->free_top = i;
    x->n_reqs--;
}

/* Reports r's end to the router side once; cancelled requests are never reported. */
static void s_fail(pf_exec_t *x, s_req_t *r, Pdserve__V1__ErrorCode code, const char *fmt, ...) PD_PRINTF(4, 5);
static void s_fail(pf_exec_t *x, s_req_t *r, Pdserve__V1__ErrorCode code, const char *fmt, ...) {
    if (r->is_reported || r->is_cancelled) return;
    char msg[PB_MAX_ERROR_BYTES / 2];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    LOG_I("req=%016llx failed: %s: %s", (unsigned long long)r->req_id, pb_error_code_name(code), msg);
    r->is_reported = true;
    x->n_failed++;
    if (x->p.on_fail) x->p.on_fail(x->p.ud, r->req_id, code, msg);
}

/* ---- decode peers ---- */

static void s_on_peer(pd_loop_t *l, void *ud);
static void s_kick(pf_exec_t *x);

static void s_tick_update(pf_exec_t *x);
static void s_transfer_over(pf_exec_t *x, s_req_t *r);
static void s_stream_progress(pf_exec_t *x);

/* r's transfer is over and pf_sched holds r as SENDING: its blocks go back and r is forgotten. */
static void s_finish(pf_exec_t *x, s_req_t *r) {
    if (pf_sched_sent(x->sched, r->req_id, r->is_done ? r->done_status : PD_EIO) != PD_OK)
        LOG_E("req=%016llx not SENDING in the scheduler", (unsigned long long)r->req_id);
    s_req_free(x, r);
}

/* RELEASED, or the sender closed: nothing references r's blocks any more. While r's step still runs, s_step_done
 * finishes it. */
static void s_transfer_over(pf_exec_t *x, s_req_t *r) {
    if (r->has_transfer) {
        r->has_transfer = false;
        x->n_transfers--;
        if (--r->peer->n_live == 0) r->peer->idle_since_us = pd_now_us();
    }
    r->peer = NULL;
    r->is_transfer_over = true;
    if (!r->is_done) r->is_done = true, r->done_status = PD_EIO;
    if (r->state == R_SENDING) s_finish(x, r);
}

static s_peer_t *s_peer_get(pf_exec_t *x, const char *endpoint, char *err, size_t err_cap) {
    for (int32_t i = 0; i < x->n_peers; i++)
        if (strcmp(x->peers[i]->endpoint, endpoint) == 0) return x->peers[i];
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = endpoint;
    sp.sender_id = x->worker_id;
    sp.fingerprint = x->p.fingerprint;
    sp.layout = *eng_kv_layout(x->p.eng);
    sp.pool_base = eng_kv_host_base(x->p.eng);
    sp.pool_shm_name = x->p.kv_pool_shm_name;
    sp.device_handle = x->device_handle_len > 0 ? x->device_handle : NULL;
    sp.device_handle_len = x->device_handle_len;
    sp.n_conns = x->p.kv_conns;
    sp.max_transfers = x->p.sched.max_active; /* every SENDING request may go to one peer */
    kvt_sender_t *kvt = kvt_sender_create(x->p.zmq_ctx, &sp, err, err_cap);
    if (!kvt) return NULL;
    s_peer_t *p = pd_xcalloc(1, sizeof *p);
    p->x = x;
    p->kvt = kvt;
    p->idle_since_us = pd_now_us();
    snprintf(p->endpoint, sizeof p->endpoint, "%s", endpoint);
    if (pd_loop_add_socket(x->p.loop, kvt_sender_socket(kvt), s_on_peer, p) != PD_OK) {
        snprintf(err, err_cap, "cannot watch the KV socket to %.200s", endpoint);
        kvt_sender_destroy(&p->kvt);
        free(p);
        return NULL;
    }
    if (x->n_peers == x->cap_peers) {
        x->cap_peers = x->cap_peers ? 2 * x->cap_peers : 8;
        x->peers = pd_xrealloc(x->peers, (size_t)x->cap_peers * sizeof *x->peers);
    }
    x->peers[x->n_peers++] = p;
    LOG_I("kv sender to %s opened (%d connection%s)", endpoint, sp.n_conns, sp.n_conns > 1 ? "s" : "");
    return p;
}

/* Closes p: its live transfers fail (reported unless cancelled or already done), the sender is destroyed
 * (which waits until ZeroMQ dropped every frame that points into our pool), then their blocks go back. */
static void s_peer_drop(pf_exec_t *x, s_peer_t *p, pd_status why) {
    const char *kerr = kvt_sender_error(p->kvt);
    bool is_refused = why == PD_EPROTO && kerr && kerr[0];
    if (why != PD_OK) LOG_W("kv sender to %s unusable (%s): dropping it", p->endpoint, pd_strerror(why));
    for (int32_t i = 0; i < x->n_slots; i++) {
        s_req_t *r = &x->reqs[i];
        if (!r->has_transfer || r->peer != p || r->is_done) continue;
        if (is_refused)
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE, "%s", kerr);
        else
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "KV transfer to %s failed: connection %s",
                   r->decode_id, why == PD_OK ? "closed" : pd_strerror(why));
    }
    kvt_stats_t st;
    kvt_sender_stats(p->kvt, &st);
    x->kv_bytes_retired += st.payload_bytes, x->kv_shm_bytes_retired += st.shm_payload_bytes;
    x->kv_device_bytes_retired += st.device_payload_bytes;
    pd_loop_remove_socket(x->p.loop, kvt_sender_socket(p->kvt));
    kvt_sender_destroy(&p->kvt);
    for (int32_t i = 0; i < x->n_slots; i++) {
        s_req_t *r = &x->reqs[i];
        if (r->has_transfer && r->peer == p) s_transfer_over(x, r);
    }
    for (int32_t i = 0; i < x->n_peers; i++)
        if (x->peers[i] == p) x->peers[i] = x->peers[--x->n_peers];
    free(p);
    s_tick_update(x);
}

/* A transfer ended on the wire without success: say why, in the router's terms. */
static void s_fail_transfer(pf_exec_t *x, s_req_t *r, const kvt_event_t *ev) {
    const char *kerr = kvt_sender_error(r->peer->kvt);
    if (ev->status == PD_EAGAIN)
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "decode worker %s has no KV capacity",
               r->decode_id);
    else if (ev->status == PD_ETIMEDOUT)
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, "KV transfer to %s timed out: %s", r->decode_id,
               ev->err);
    else if (ev->status == PD_EPROTO && kerr && kerr[0]) /* the receiver refused the handshake */
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE, "%s", kerr);
    else
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "KV transfer to %s failed: %s %s", r->decode_id,
               pd_strerror(ev->status), ev->err);
}

static void s_on_kvt_event(pf_exec_t *x, s_peer_t *p, const kvt_event_t *ev) {
    s_req_t *r = s_req_find(x, ev->request_id);
    if (!r || !r->has_transfer || r->peer != p || r->transfer_id != ev->transfer_id) {
        LOG_W("req=%016llx kv event %d for transfer %llu nobody waits for", (unsigned long long)ev->request_id,
              (int)ev->kind, (unsigned long long)ev->transfer_id);
        return;
    }
    if (ev->kind == KVT_EV_DONE) {
        r->is_done = true;
        r->done_status = ev->status;
        if (ev->status != PD_OK) {
            s_fail_transfer(x, r, ev);
        } else if (r->kv_ready_us) {
            uint64_t tail = pd_now_us() - r->kv_ready_us;
            uint64_t wait = r->commit_us > r->kv_ready_us ? r->commit_us - r->kv_ready_us : 0;
            x->recent_tails_us[x->n_tails % S_RECENT_TAILS] = tail > UINT32_MAX ? UINT32_MAX : (uint32_t)tail;
            x->recent_waits_us[x->n_tails % S_RECENT_TAILS] = wait > UINT32_MAX ? UINT32_MAX : (uint32_t)wait;
            x->n_tails++, x->tail_us_sum += tail;
            if (tail > x->tail_us_max) x->tail_us_max = tail;
        }
    } else if (ev->kind == KVT_EV_RELEASED) {
        s_transfer_over(x, r);
    }
}

/* Runs p's I/O without waiting and takes its events. false: p was dropped (unusable connection). */
static bool s_peer_poll(pf_exec_t *x, s_peer_t *p) {
    for (;;) {
        int n = kvt_sender_poll(p->kvt, 0, x->kvt_ev, S_KVT_EVENTS);
        if (n < 0) {
            s_peer_drop(x, p, n);
            return false;
        }
        for (int i = 0; i < n; i++) s_on_kvt_event(x, p, &x->kvt_ev[i]);
        if (n == S_KVT_EVENTS) continue;
        /* refused handshake and every transfer released: drop it now, so the next request handshakes again */
        if (p->n_live == 0 && kvt_sender_error(p->kvt)[0]) {
            s_peer_drop(x, p, PD_EPROTO);
            return false;
        }
        return true;
    }
}

/* Polls every peer (backwards: a poll may drop the peer, moving the last one into its place). */
static void s_poll_peers(pf_exec_t *x) {
    for (int32_t i = x->n_peers - 1; i >= 0; i--)
        if (i < x->n_peers) (void)s_peer_poll(x, x->peers[i]);
}

static void s_on_peer(pd_loop_t *l, void *ud) {
    (void)l;
    s_peer_t *p = ud;
    pf_exec_t *x = p->x;
    if (s_peer_poll(x, p)) s_tick_update(x);
    s_kick(x); /* released blocks may admit queued prompts */
}

static void s_on_tick(pd_loop_t *l, void *ud) {
    (void)l;
    pf_exec_t *x = ud;
    s_stream_progress(x);
    s_poll_peers(x);
    s_tick_update(x);
    s_kick(x);
}

/* The fast tick runs exactly while some transfer is unreleased. */
static void s_tick_update(pf_exec_t *x) {
    if (x->n_transfers > 0 && x->tick_id <= 0) {
        x->tick_id = pd_loop_add_timer(x->p.loop, S_TICK_MS, true, s_on_tick, x);
        if (x->tick_id <= 0) LOG_E("cannot add the kv poll timer: %s", pd_strerror((pd_status)x->tick_id));
    } else if (x->n_transfers == 0 && x->tick_id > 0) {
        pd_loop_cancel_timer(x->p.loop, x->tick_id);
        x->tick_id = 0;
    }
}

/* Closes senders idle for idle_sender_ms (decode workers come and go; a cached sender to a dead one would
 * reconnect forever), and plans (queued prompts' deadlines are checked at plan time). */
static void s_on_housekeep(pd_loop_t *l, void *ud) {
    (void)l;
    pf_exec_t *x = ud;
    uint64_t now = pd_now_us();
    for (int32_t i = x->n_peers - 1; i >= 0; i--) {
        s_peer_t *p = x->peers[i];
        if (p->n_live == 0 && now - p->idle_since_us > (uint64_t)x->p.idle_sender_ms * 1000u) {
            LOG_I("kv sender to %s idle: closed", p->endpoint);
            s_peer_drop(x, p, PD_OK);
        }
    }
    s_kick(x);
}

/* ---- KV hand-off ---- */

/* The first token as a packed pdserve.v1.TokenLogprob (text left empty): the decode worker's logprobs. */
static int64_t s_pack_first(const eng_sample_result_t *f, uint8_t *buf, size_t cap) {
    Pdserve__V1__TokenLogprob tl = PDSERVE__V1__TOKEN_LOGPROB__INIT;
    Pdserve__V1__TopLogprob top[ENG_MAX_LOGPROBS], *ptop[ENG_MAX_LOGPROBS];
    int32_t n_top = f->n_top < ENG_MAX_LOGPROBS ? f->n_top : ENG_MAX_LOGPROBS;
    for (int32_t i = 0; i < n_top; i++) {
        pdserve__v1__top_logprob__init(&top[i]);
        top[i].token = f->top[i].token;
        top[i].logprob = f->top[i].logprob;
        ptop[i] = &top[i];
    }
    tl.token = f->token;
    tl.logprob = f->logprob;
    tl.n_top = (size_t)n_top;
    tl.top = n_top > 0 ? ptop : NULL;
    return pb_pack(&tl.base, buf, cap);
}

/* Starts r's transfer of positions [0, n_tokens) in block_ids to its decode worker: the receiver reserves blocks
 * now, payload flows as layers are marked ready (or at the commit). On failure r is reported and its transfer is
 * over before it began (no frame references the blocks). */
static pd_status s_transfer_start(pf_exec_t *x, s_req_t *r, int32_t n_tokens, const int32_t *block_ids) {
    char err[256] = "";
    uint64_t now = pd_now_us();
    pd_status st = PD_OK;
    s_peer_t *p = NULL;
    if (r->deadline_us && now >= r->deadline_us) {
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, "deadline passed before the KV transfer");
        st = PD_ETIMEDOUT;
        goto fail;
    }
    p = s_peer_get(x, r->endpoint, err, sizeof err);
    if (!p) {
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "KV connection to %s failed: %s", r->decode_id, err);
        st = PD_EIO;
        goto fail;
    }
    uint64_t left_ms = r->deadline_us ? (r->deadline_us - now + 999) / 1000 : 0;
    kvt_transfer_t t = {.request_id = r->req_id,
                        .transfer_id = ++p->next_transfer_id,
                        .epoch = 1,
                        .n_tokens = n_tokens,
                        .block_ids = block_ids,
                        .timeout_ms = left_ms > INT32_MAX ? INT32_MAX : (int32_t)left_ms};
    st = kvt_sender_start(p->kvt, &t);
    if (st != PD_OK) {
        if (st == PD_EPROTO)
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE, "%s", kvt_sender_error(p->kvt));
        else if (st == PD_EAGAIN)
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "too many KV transfers in flight to %s",
                   r->decode_id);
        else
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "KV transfer to %s refused: %s", r->decode_id,
                   pd_strerror(st));
        goto fail;
    }
    r->has_transfer = true;
    r->peer = p;
    r->transfer_id = t.transfer_id;
    p->n_live++;
    x->n_transfers++;
    return PD_OK;
fail:
    r->is_transfer_over = true, r->is_done = true, r->done_status = st;
    if (p && st == PD_EPROTO) s_peer_drop(x, p, PD_EPROTO); /* refused: a later request reconnects */
    return st;
}

/* Stops r's live transfer unless it is over on the wire already; its blocks stay the transfer's until RELEASED. */
static void s_transfer_cancel(s_req_t *r) {
    if (r->has_transfer && !r->is_done && kvt_sender_cancel(r->peer->kvt, r->transfer_id) != PD_OK)
        LOG_E("req=%016llx kv cancel refused", (unsigned long long)r->req_id);
}

/* READY: the prompt is computed and its first token sampled. Commit the transfer (started now unless it streamed
 * during the step) with that token, or, if it is already over, give the blocks back. */
static void s_on_ready(pf_exec_t *x, s_req_t *r, const pf_event_t *ev) {
    r->state = R_SENDING;
    if (!r->kv_ready_us) r->kv_ready_us = pd_now_us();
    if (!r->has_transfer && !r->is_transfer_over) (void)s_transfer_start(x, r, ev->n_tokens, ev->block_ids);
    if (!r->has_transfer) {
        s_finish(x, r);
        return;
    }
    if (r->is_done) return; /* failed during the step: RELEASED follows */
    r->commit_us = pd_now_us();
    uint8_t info[S_INFO_MAX_BYTES];
    int64_t n_info = s_pack_first(&ev->first, info, sizeof info);
    pd_status st = n_info < 0
                       ? PD_ERANGE
                       : kvt_sender_commit_info(r->peer->kvt, r->transfer_id, ev->first.token, info, (size_t)n_info);
    if (st == PD_OK) return;
    if (n_info < 0)
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "first token info does not fit");
    else
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "KV commit to %s refused: %s", r->decode_id,
               pd_strerror(st));
    s_transfer_cancel(r);
}

/* A request of the finished step ended without READY (failed or cancelled): pinned, pf_sched holds it as SENDING
 * until its transfer is over; otherwise pf_sched has freed it. */
static void s_end_in_step(pf_exec_t *x, s_req_t *r) {
    if (!r->is_pinned) {
        s_req_free(x, r);
        return;
    }
    r->state = R_SENDING;
    if (r->has_transfer)
        s_transfer_cancel(r);
    else
        s_finish(x, r);
}

/* The running step's forward has stored more layers: streamed transfers may send them. */
static void s_stream_progress(pf_exec_t *x) {
    if (!x->plan) return;
    int32_t n = __atomic_load_n(&x->kv_host_layers, __ATOMIC_ACQUIRE);
    if (n <= x->kv_layers_marked) return;
    x->kv_layers_marked = n;
    const pf_plan_t *pl = x->plan;
    for (int32_t k = 0; k < pl->n_seqs; k++) {
        if (!pl->is_final[k]) continue;
        s_req_t *r = s_req_find(x, pl->req_ids[k]);
        if (!r || !r->is_pinned || !r->has_transfer || r->is_done) continue;
        if (kvt_sender_layers_ready(r->peer->kvt, r->transfer_id, n) != PD_OK) continue; /* ended: events follow */
        x->n_layers_early += (uint64_t)(n - r->n_layers_ready);
        r->n_layers_ready = n;
        if (n == x->n_layers) r->kv_ready_us = pd_now_us();
    }
}

/* ---- steps ---- */

/* The step of plan pl finished with status res (or never started): advance the scheduler, report failures,
 * hand ready prompts to decode. */
static void s_step_done(pf_exec_t *x, const pf_plan_t *pl, pd_status res) {
    int n = pf_sched_update(x->sched, pl, res, x->logits, x->events, x->p.sched.max_step_seqs);
    PD_ASSERT(n >= 0); /* pl is the outstanding plan and events hold max_step_seqs */
    for (int32_t k = 0; k < pl->n_seqs; k++) {
        s_req_t *r = s_req_find(x, pl->req_ids[k]);
        if (!r) continue;
        r->is_in_step = false;
        if (r->is_cancelled) s_end_in_step(x, r); /* pf_sched_update ended it, without an event */
    }
    for (int i = 0; i < n; i++) {
        const pf_event_t *ev = &x->events[i];
        s_req_t *r = s_req_find(x, ev->req_id);
        PD_ASSERT(r != NULL);
        if (ev->kind == PF_EV_READY) {
            s_on_ready(x, r, ev);
        } else {
            s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "prefill step failed: %s", pd_strerror(ev->status));
            s_end_in_step(x, r);
        }
    }
    s_poll_peers(x); /* reservations out now, not at the next tick */
    s_tick_update(x);
}

static void s_take_expired(pf_exec_t *x, const pf_plan_t *pl) {
    for (int32_t i = 0; i < pl->n_expired; i++) {
        s_req_t *r = s_req_find(x, pl->expired_ids[i]);
        if (!r) continue;
        s_fail(x, r, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, "deadline passed before the prompt was prefilled");
        s_req_free(x, r);
    }
}

/* The step on the engine thread: the forward, then the KV it wrote to the host mirror kvtransfer sends from
 * (eng_kv_to_host: nothing to do when the pool is the host memory). */
static pd_status s_job(void *ud) {
    pf_exec_t *x = ud;
    pd_status st = eng_forward(x->p.eng, &x->batch);
    for (int32_t i = 0; st == PD_OK && i < x->batch.n_seqs; i++)
        st = eng_kv_to_host(x->p.eng, x->batch.block_tables[i], x->batch.pos[i], x->batch.n_tokens[i]);
    return st;
}

/* Plans and starts the next step when the engine is idle and work is waiting. */
static void s_kick(pf_exec_t *x) {
    if (x->plan || x->n_reqs == 0) return;
    const pf_plan_t *pl = NULL;
    if (pf_sched_plan(x->sched, pd_now_us(), &pl) != PD_OK) return; /* logged; cannot happen with one plan out */
    s_take_expired(x, pl);
    if (pl->n_seqs == 0) return;
    if (pl->n_logits > x->logits_rows) {
        x->logits_rows = pl->n_logits;
        x->logits = pd_xrealloc(x->logits, (size_t)x->logits_rows * (size_t)x->vocab_size * sizeof(float));
    }
    pf_plan_batch(pl, x->logits, &x->batch);
    x->batch.is_kv_to_host = true; /* s_job copies it to the host mirror: the backend may do so during the forward */
    x->kv_host_layers = x->kv_layers_marked = 0;
    x->batch.kv_host_layers = x->p.is_kv_stream ? &x->kv_host_layers : NULL;
    for (int32_t k = 0; k < pl->n_seqs; k++) {
        s_req_t *r = s_req_find(x, pl->req_ids[k]);
        if (!r) continue;
        r->is_in_step = true;
        /* the final chunk: its transfer starts now (the decode worker reserves before the work is done) and its
         * layers go out as the forward stores them */
        if (!x->p.is_kv_stream || !pl->is_final[k] || r->is_cancelled) continue;
        if (s_transfer_start(x, r, pl->pos[k] + pl->n_tokens[k], pl->block_tables[k]) != PD_OK) continue;
        if (pf_sched_pin(x->sched, r->req_id) != PD_OK) PD_ASSERT(!"pf_sched refused to pin a final chunk");
        r->is_pinned = true;
        x->n_streamed++;
    }
    if (x->n_transfers > 0) {
        s_poll_peers(x); /* reservations out before the forward */
        s_tick_update(x);
    }
    pd_status st = eng_async_submit_fn(x->async, s_job, x);
    if (st == PD_OK) {
        x->plan = pl;
        return;
    }
    LOG_E("prefill step %llu not started: %s", (unsigned long long)pl->step, pd_strerror(st));
    s_step_done(x, pl, PD_EBACKEND);
}

static void s_on_engine(pd_loop_t *l, void *ud) {
    (void)l;
    pf_exec_t *x = ud;
    pd_status res = PD_OK;
    if (eng_async_collect(x->async, &res) != PD_OK) return; /* still running (a spurious wake-up) */
    if (!x->plan) {
        LOG_E("engine completion without a step");
        return;
    }
    const pf_plan_t *pl = x->plan;
    x->plan = NULL;
    if (res != PD_OK) LOG_E("prefill step %llu failed: %s", (unsigned long long)pl->step, pd_strerror(res));
    s_step_done(x, pl, res);
    s_kick(x);
}

/* ---- public ---- */

pf_exec_t *pf_exec_create(const pf_exec_params_t *p, char *err, size_t err_cap) {
    pf_exec_t *x = NULL;
    if (!p->eng || !p->loop || !p->zmq_ctx || p->kv_conns < 1 || p->kv_conns > KVT_MAX_CONNS || p->idle_sender_ms < 1) {
        snprintf(err, err_cap, "prefill exec: bad params (engine, loop, zmq context, kv_conns 1..%d)", KVT_MAX_CONNS);
        return NULL;
    }
    if (!eng_kv_host_base(p->eng)) {
        snprintf(err, err_cap, "prefill exec: the %s backend keeps its KV pool off the host (not supported yet)",
                 eng_backend_name(p->eng));
        return NULL;
    }
    x = pd_xcalloc(1, sizeof *x);
    x->p = *p;
    snprintf(x->worker_id, sizeof x->worker_id, "%s", p->worker_id ? p->worker_id : "prefill");
    x->p.worker_id = x->worker_id;
    pf_sched_params_from_engine(&x->p.sched, p->eng);
    x->vocab_size = eng_config(p->eng)->vocab_size;
    x->n_layers = eng_config(p->eng)->n_layers;
    if (p->is_kv_device) x->device_handle_len = eng_kv_export(p->eng, x->device_handle, sizeof x->device_handle);
    x->sched = pf_sched_create(&x->p.sched);
    if (!x->sched) {
        snprintf(err, err_cap, "prefill exec: bad scheduler params (see log)");
        goto fail;
    }
    x->async = eng_async_create(p->eng);
    if (!x->async) {
        snprintf(err, err_cap, "prefill exec: cannot start the engine thread");
        goto fail;
    }
    x->events = pd_xcalloc((size_t)x->p.sched.max_step_seqs, sizeof *x->events);
    x->n_slots = x->p.sched.max_queued + x->p.sched.max_active;
    x->reqs = pd_xcalloc((size_t)x->n_slots, sizeof *x->reqs);
    for (int32_t i = 0; i < x->n_slots; i++) x->reqs[i].next_free = i + 1 < x->n_slots ? i + 1 : -1;
    uint32_t n_index = 16;
    while (n_index < 2u * (uint32_t)x->n_slots) n_index *= 2; /* load <= 1/2: short probe chains */
    x->index = pd_xcalloc(n_index, sizeof *x->index);
    x->index_mask = n_index - 1;
    if (pd_loop_add_fd(p->loop, eng_async_fd(x->async), ZMQ_POLLIN, s_on_engine, x) != PD_OK) {
        snprintf(err, err_cap, "prefill exec: cannot watch the engine fd");
        goto fail;
    }
    x->housekeep_id = pd_loop_add_timer(p->loop, S_HOUSEKEEP_MS, true, s_on_housekeep, x);
    if (x->housekeep_id <= 0) {
        snprintf(err, err_cap, "prefill exec: cannot add a timer");
        goto fail;
    }
    return x;
fail:
    pf_exec_destroy(&x);
    return NULL;
}

static int s_cmp_u32(const void *a, const void *b) {
    const uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

void pf_exec_destroy(pf_exec_t **xp) {
    if (!xp || !*xp) return;
    pf_exec_t *x = *xp;
    if (x->n_tails > 0) {
        int32_t n = x->n_tails < S_RECENT_TAILS ? (int32_t)x->n_tails : S_RECENT_TAILS, p90 = (n * 9) / 10;
        /* split: KV ready -> commit is the rest of the step (logits, first token), commit -> DONE the hand-off
         * still open once the first token is known */
        uint32_t after[S_RECENT_TAILS];
        for (int32_t i = 0; i < n; i++) after[i] = x->recent_tails_us[i] - x->recent_waits_us[i];
        qsort(x->recent_tails_us, (size_t)n, sizeof *x->recent_tails_us, s_cmp_u32);
        qsort(x->recent_waits_us, (size_t)n, sizeof *x->recent_waits_us, s_cmp_u32);
        qsort(after, (size_t)n, sizeof *after, s_cmp_u32);
        pf_exec_stats_t st;
        pf_exec_stats(x, &st);
        LOG_I("kv hand-off: %llu delivered (%llu streamed, %llu layers sent during their step, %.0f of %.0f MiB "
              "through shared memory, %.0f device to device); KV ready -> committed: mean %.2f ms, max %.2f ms; of the "
              "last %d: median %.2f "
              "ms, 90%% under %.2f ms; of that, until the step's end (commit sent): median %.2f ms, 90%% %.2f ms, "
              "then to DONE: median %.2f ms, 90%% %.2f ms",
              (unsigned long long)x->n_tails, (unsigned long long)x->n_streamed, (unsigned long long)x->n_layers_early,
              (double)st.kv_bytes_shm / (1 << 20), (double)st.kv_bytes_sent / (1 << 20),
              (double)st.kv_bytes_device / (1 << 20), (double)x->tail_us_sum / (double)x->n_tails / 1e3,
              (double)x->tail_us_max / 1e3, n, x->recent_tails_us[n / 2] / 1e3, x->recent_tails_us[p90] / 1e3,
              x->recent_waits_us[n / 2] / 1e3, x->recent_waits_us[p90] / 1e3, after[n / 2] / 1e3, after[p90] / 1e3);
    }
    if (x->async) {
        pd_loop_remove_fd(x->p.loop, eng_async_fd(x->async));
        eng_async_destroy(&x->async); /* waits for a running step: its blocks are being written */
    }
    x->p.on_fail = NULL; /* nobody to tell any more */
    while (x->n_peers > 0) s_peer_drop(x, x->peers[x->n_peers - 1], PD_OK);
    if (x->tick_id > 0) pd_loop_cancel_timer(x->p.loop, x->tick_id);
    if (x->housekeep_id > 0) pd_loop_cancel_timer(x->p.loop, x->housekeep_id);
    pf_sched_destroy(&x->sched); /* every block still held goes back to the pool */
    free(x->peers), free(x->logits), free(x->events), free(x->reqs), free(x->index);
    free(x);
    *xp = NULL;
}

pd_status pf_exec_submit(pf_exec_t *x, const pf_exec_req_t *q, char *err, size_t err_cap) {
    uint64_t deadline_us = q->timeout_ms ? pd_now_us() + (uint64_t)q->timeout_ms * 1000u : 0;
    if (s_req_find(x, q->req_id)) {
        snprintf(err, err_cap, "duplicate request id %016llx", (unsigned long long)q->req_id);
        return PD_EINVAL;
    }
    if (!q->decode_endpoint || !q->decode_endpoint[0] || strlen(q->decode_endpoint) > PB_MAX_ENDPOINT_BYTES) {
        snprintf(err, err_cap, "decode_kv_endpoint must be 1..%d bytes", PB_MAX_ENDPOINT_BYTES);
        return PD_EINVAL;
    }
    pd_status st = pf_sched_submit(x->sched, q->req_id, q->tokens, q->n_tokens, &q->sampling, deadline_us);
    if (st == PD_EAGAIN) {
        pf_sched_stats_t ss;
        pf_sched_stats(x->sched, &ss);
        snprintf(err, err_cap, "prefill queue full (%d queued)", ss.n_queued);
        return st;
    }
    if (st != PD_OK) {
        snprintf(err, err_cap, "%s", pf_sched_error(x->sched));
        return st;
    }
    s_req_t *r = s_req_new(x, q->req_id);
    PD_ASSERT(r != NULL); /* as many slots as pf_sched holds requests */
    r->deadline_us = deadline_us;
    snprintf(r->decode_id, sizeof r->decode_id, "%s", q->decode_id ? q->decode_id : "?");
    snprintf(r->endpoint, sizeof r->endpoint, "%s", q->decode_endpoint);
    s_kick(x);
    return PD_OK;
}

void pf_exec_cancel(pf_exec_t *x, uint64_t req_id) {
    s_req_t *r = s_req_find(x, req_id);
    if (!r || r->is_cancelled) return;
    bool is_sending = false;
    r->is_cancelled = true;
    if (pf_sched_cancel(x->sched, req_id, &is_sending) != PD_OK)
        LOG_E("req=%016llx unknown to the scheduler", (unsigned long long)req_id);
    if (r->has_transfer) {
        s_transfer_cancel(r);
    } else if (r->state == R_SCHED && !r->is_in_step) {
        s_req_free(x, r); /* freed by pf_sched_cancel already */
    }
    LOG_I("req=%016llx cancelled", (unsigned long long)req_id);
}

void pf_exec_cancel_all(pf_exec_t *x, bool is_notify, Pdserve__V1__ErrorCode code, const char *msg) {
    for (int32_t i = 0; i < x->n_slots; i++) {
        s_req_t *r = &x->reqs[i];
        if (r->state == R_FREE || r->is_cancelled) continue;
        if (is_notify) s_fail(x, r, code, "%s", msg);
        pf_exec_cancel(x, r->req_id);
    }
    s_poll_peers(x); /* cancels out now */
}

bool pf_exec_is_idle(const pf_exec_t *x) {
    return x->n_reqs == 0 && !x->plan && x->n_transfers == 0;
}

void pf_exec_stats(const pf_exec_t *x, pf_exec_stats_t *out) {
    memset(out, 0, sizeof *out);
    pf_sched_stats(x->sched, &out->sched);
    out->n_requests = x->n_reqs;
    out->n_senders = x->n_peers;
    out->n_transfers = x->n_transfers;
    out->kv_bytes_sent = x->kv_bytes_retired, out->kv_bytes_shm = x->kv_shm_bytes_retired;
    out->kv_bytes_device = x->kv_device_bytes_retired;
    for (int32_t i = 0; i < x->n_peers; i++) {
        kvt_stats_t st;
        kvt_sender_stats(x->peers[i]->kvt, &st);
        out->kv_bytes_sent += st.payload_bytes, out->kv_bytes_shm += st.shm_payload_bytes;
        out->kv_bytes_device += st.device_payload_bytes;
    }
    out->n_failed = x->n_failed;
    out->n_streamed = x->n_streamed;
    out->n_layers_early = x->n_layers_early;
    out->n_kv_tails = x->n_tails, out->kv_tail_us_sum = x->tail_us_sum, out->kv_tail_us_max = x->tail_us_max;
}
