/* dc_service.c: the decode worker's control plane and KV receipt around dc_sched / dc_exec (see dc_service.h).
 * It owns the request table the router's view needs (prompt length, deadline while waiting for KV, whether a
 * transfer holds the blocks) and turns every scheduler event into one ResponseChunk. It never computes and
 * never blocks: the forward runs on dc_exec's engine thread, KV arrives inside kvt_receiver_poll. */
#include "dc_service.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "dc_msg.h"
#include "pb.h"
#include "pd_log.h"

#define S_LINGER_MS         200  /* closing never waits long for a router that is gone */
#define S_ZMTP_HB_MS        1000 /* ZMTP heartbeats on the control connection: a dead TCP peer is noticed */
#define S_SILENT_REREG      5    /* heartbeats left unanswered before registering again */
#define S_SILENT_LOST       10   /* ... before everything held is cancelled */
#define S_KV_POLL_MS        1    /* kvt_receiver_poll while transfers are live (its timers, shared-pool copies) */
#define S_LOG_INTERVAL_US   1000000u
#define S_STATS_INTERVAL_US 10000000u
#define S_MAX_MSGS_PER_WAKE 256 /* control messages handled per wake-up before the loop looks elsewhere */

typedef struct {
    bool in_use;
    bool is_abandoned; /* ended for the router; its blocks wait for the receiver to let go (FAILED / COMMITTED) */
    uint64_t req_id;
    int32_t n_prompt;
    int32_t n_reserved;   /* kvt reservations holding the blocks: 0, or 1 while a transfer writes them */
    uint64_t deadline_us; /* 0 = none; dc_sched enforces it once the request runs, this table while it waits */
} s_req_t;

struct dc_service {
    dc_service_params_t p;
    char *router, *id, *kv_bind;
    void *sock; /* DEALER to the router */
    dc_sched_t *sched;
    dc_exec_t *exec;
    kvt_receiver_t *kvt;
    kvt_fingerprint_t fp;
    Pdserve__V1__Fingerprint fp_pb;
    const eng_kv_layout_t *layout;
    uint8_t *kv_base;
    int32_t vocab_size, max_context;
    s_req_t *reqs; /* (max_seqs): at most one per request dc_sched holds */
    int32_t n_live, n_abandoned;
    uint8_t *tx;
    size_t tx_cap;
    int64_t tick_timer, kv_timer; /* timer ids; kv_timer 0 while no transfer needs polling */
    int64_t tick_ms;
    int32_t hb_ivl_ms;
    int32_t n_hb_unanswered; /* heartbeats sent (or due) since the router was last heard */
    bool is_registered, is_refused, is_draining, is_rest_cancelled;
    bool is_register_queued; /* the last register went out on a live connection: wait for its answer */
    bool is_rereg_pending;   /* a register was sent after a registration was in force */
    bool has_registered;
    uint64_t last_heard_us, last_register_us, last_hb_us, drain_deadline_us, last_stats_us;
    uint64_t hb_seq, last_warn_us, n_warn_skipped, last_stats_steps;
    dc_service_stats_t st;
};

dc_service_params_t dc_service_params_default(void) {
    return (dc_service_params_t){.router_endpoint = "tcp://127.0.0.1:5550",
                                 .worker_id = "decode-0",
                                 .kv_bind = "tcp://127.0.0.1:0",
                                 .max_batch = 64,
                                 .max_seqs = 256,
                                 .prefill_chunk_tokens = 256,
                                 .heartbeat_ivl_ms = 250,
                                 .drain_timeout_ms = 30000,
                                 .is_kv_device = true};
}

/* Rate-limited warning: one line per second, with the count of those skipped. */
static void s_warn(dc_service_t *s, const char *fmt, ...) PD_PRINTF(2, 3);
static void s_warn(dc_service_t *s, const char *fmt, ...) {
    uint64_t now = pd_now_us();
    if (now - s->last_warn_us < S_LOG_INTERVAL_US) {
        s->n_warn_skipped++;
        return;
    }
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    LOG_W("%s (%llu similar lines skipped)", line, (unsigned long long)s->n_warn_skipped);
    s->last_warn_us = now;
    s->n_warn_skipped = 0;
}

/* ---- sending: one envelope, one frame, never blocking (ZMQ_IMMEDIATE: no connection = fails at once) ---- */

static bool s_send_raw(dc_service_t *s, int64_t n, bool is_quiet) {
    PD_ASSERT(n >= 0); /* tx is sized for the largest envelope we build */
    if (zmq_send(s->sock, s->tx, (size_t)n, ZMQ_DONTWAIT) == (int)n) return true;
    s->st.n_send_failed++;
    if (!is_quiet) s_warn(s, "message to the router %s not sent: %s", s->router, zmq_strerror(zmq_errno()));
    return false;
}

static bool s_send(dc_service_t *s, const Pdserve__V1__WorkerToRouter *m, bool is_quiet) {
    size_t n = pb_packed_size(&m->base);
    if (n > s->tx_cap) {
        s->tx_cap = n;
        s->tx = pd_xrealloc(s->tx, s->tx_cap);
    }
    return s_send_raw(s, pb_pack(&m->base, s->tx, s->tx_cap), is_quiet);
}

static void s_send_register(dc_service_t *s) {
    Pdserve__V1__WorkerRegister wr = PDSERVE__V1__WORKER_REGISTER__INIT;
    wr.worker_id = s->id;
    wr.role = PDSERVE__V1__WORKER_ROLE__ROLE_DECODE;
    wr.control_endpoint = s->router; /* requests come back over this connection */
    wr.kv_endpoint = (char *)kvt_receiver_endpoint(s->kvt);
    wr.fingerprint = &s->fp_pb;
    wr.backend = (char *)eng_backend_name(s->p.eng);
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER;
    m.register_ = &wr;
    /* quiet: retrying against a router that is not up yet is the normal start-up */
    s->is_register_queued = s_send(s, &m, true);
    if (s->is_register_queued && s->has_registered) s->is_rereg_pending = true;
    s->last_register_us = pd_now_us();
    s->st.n_registers++;
}

static void s_send_heartbeat(dc_service_t *s) {
    dc_sched_stats_t ss;
    dc_sched_stats(s->sched, &ss);
    kvt_stats_t ks;
    kvt_receiver_stats(s->kvt, &ks);
    Pdserve__V1__Heartbeat hb = PDSERVE__V1__HEARTBEAT__INIT;
    hb.worker_id = s->id;
    hb.seq = ++s->hb_seq;
    hb.role = PDSERVE__V1__WORKER_ROLE__ROLE_DECODE;
    hb.queue_depth = (uint32_t)(ss.n_waiting + ss.n_prefilling);
    hb.running_seqs = (uint32_t)ss.n_running;
    hb.free_kv_blocks = (uint32_t)ss.n_free_blocks;
    hb.total_kv_blocks = (uint32_t)ss.n_total_blocks;
    hb.kv_bytes_received = ks.payload_bytes;
    dc_exec_stats_t xs;
    dc_exec_stats(s->exec, &xs);
    hb.decode_steps = xs.n_steps;
    hb.decode_rows = ss.n_decode_rows;
    hb.decode_tokens = ss.n_decode_rows + ss.n_accepted_tokens; /* each verified row: its own token + accepted drafts */
    hb.spec_rows = ss.n_spec_rows;
    hb.spec_draft_tokens = ss.n_draft_tokens;
    hb.spec_accepted_tokens = ss.n_accepted_tokens;
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT;
    m.heartbeat = &hb;
    if (s_send(s, &m, false)) s->st.n_heartbeats++;
}

static void s_send_reserved(dc_service_t *s, uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg) {
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) s->st.n_refused++;
    s_send_raw(s, dc_msg_pack_reserved(req_id, code, msg, s->tx, s->tx_cap), false);
}

/* ---- requests ---- */

/* Linear: max_seqs is a few hundred and a forward step costs milliseconds. */
static s_req_t *s_req_find(dc_service_t *s, uint64_t req_id) {
    for (int32_t i = 0; i < s->p.max_seqs; i++)
        if (s->reqs[i].in_use && s->reqs[i].req_id == req_id) return &s->reqs[i];
    return NULL;
}

static void s_check_drained(dc_service_t *s);

static void s_req_free(dc_service_t *s, s_req_t *r) {
    if (r->is_abandoned)
        s->n_abandoned--;
    else
        s->n_live--;
    memset(r, 0, sizeof *r);
    s_check_drained(s);
}

/* One chunk for ev to the router. A chunk that cannot be packed (it cannot happen: tx is sized for the
 * largest event) ends the request visibly instead of dropping a token. */
static void s_send_chunk(dc_service_t *s, const s_req_t *r, const dc_event_t *ev) {
    int64_t n = dc_msg_pack_chunk(ev, eng_tokenizer(s->p.eng), r->n_prompt, s->tx, s->tx_cap);
    if (n < 0) {
        LOG_E("req=%llx chunk does not fit %zu bytes: ending it", (unsigned long long)ev->req_id, s->tx_cap);
        dc_event_t last = *ev;
        last.token = -1, last.n_text = 0, last.finish = DC_FINISH_ERROR, last.status = PD_EBACKEND;
        snprintf(last.err, sizeof last.err, "response chunk too large");
        n = dc_msg_pack_chunk(&last, eng_tokenizer(s->p.eng), r->n_prompt, s->tx, s->tx_cap);
    }
    if (s_send_raw(s, n, false)) s->st.n_chunks++;
}

/* A scheduler event becomes one chunk; the request's last one frees its entry. Events of abandoned requests
 * (ended for the router already) are swallowed. */
static void s_on_event(void *ud, const dc_event_t *ev) {
    dc_service_t *s = ud;
    s_req_t *r = s_req_find(s, ev->req_id);
    if (!r) {
        LOG_E("req=%llx event for a request the service does not hold", (unsigned long long)ev->req_id);
        return;
    }
    if (!r->is_abandoned) s_send_chunk(s, r, ev);
    if (ev->finish != DC_FINISH_NONE) s_req_free(s, r);
}

/* Ends a request for the router now: reason PD_ECLOSED = cancelled, anything else an error (msg says what).
 * Its blocks are freed now (or after the executing step), unless a transfer still writes them: then the
 * request is abandoned (last chunk sent, blocks kept) and they go when the receiver lets go of them. */
static void s_req_end(dc_service_t *s, s_req_t *r, pd_status reason, const char *msg) {
    dc_event_t ev;
    if (r->is_abandoned) return;
    if (r->n_reserved > 0 && dc_sched_req_state(s->sched, r->req_id) == DC_REQ_WAITING_KV) {
        memset(&ev, 0, sizeof ev);
        ev.req_id = r->req_id;
        ev.token = -1;
        ev.text = "";
        ev.stop_index = -1;
        ev.finish = reason == PD_ECLOSED ? DC_FINISH_CANCELLED : DC_FINISH_ERROR;
        ev.status = reason;
        snprintf(ev.err, sizeof ev.err, "%s", msg ? msg : pd_strerror(reason));
        s_send_chunk(s, r, &ev);
        r->is_abandoned = true;
        s->n_live--, s->n_abandoned++;
        /* the receiver lets go now (its FAILED event releases r), rather than when the transfer times out: the
         * prefill worker may be dead, or streaming a prompt whose answer nobody waits for */
        (void)kvt_receiver_cancel(s->kvt, r->req_id);
        s_check_drained(s);
        return;
    }
    if (dc_sched_cancel(s->sched, r->req_id, reason, &ev) != PD_OK) { /* not held: cannot happen */
        LOG_E("req=%llx held by the service, not by the scheduler", (unsigned long long)r->req_id);
        s_req_free(s, r);
        return;
    }
    if (msg) snprintf(ev.err, sizeof ev.err, "%s", msg);
    s_on_event(s, &ev);
}

static void s_end_all(dc_service_t *s, pd_status reason, const char *msg) {
    for (int32_t i = 0; i < s->p.max_seqs; i++)
        if (s->reqs[i].in_use && !s->reqs[i].is_abandoned) s_req_end(s, &s->reqs[i], reason, msg);
}

/* The transfer's blocks are free of the receiver: an abandoned request leaves the scheduler quietly. */
static void s_req_release_abandoned(dc_service_t *s, s_req_t *r) {
    dc_event_t ignored;
    if (dc_sched_cancel(s->sched, r->req_id, PD_ECLOSED, &ignored) != PD_OK)
        LOG_E("req=%llx abandoned request not held by the scheduler", (unsigned long long)r->req_id);
    s_req_free(s, r);
}

/* ---- KV receipt ---- */

static pd_status s_kv_reserve_for(void *ctx, uint64_t req_id, int32_t n_tokens, int32_t n_blocks, int32_t *ids) {
    dc_service_t *s = ctx;
    s_req_t *r = s_req_find(s, req_id);
    int32_t nb = 0;
    const int32_t *blocks = r ? dc_sched_blocks(s->sched, req_id, &nb) : NULL;
    const char *why = !r                                                          ? "unknown or ended request"
                      : r->is_abandoned                                           ? "request ended"
                      : dc_sched_req_state(s->sched, req_id) != DC_REQ_WAITING_KV ? "request not waiting for KV"
                      : r->n_reserved > 0                                         ? "another transfer holds its blocks"
                      : n_tokens != r->n_prompt || nb != n_blocks ? "token count differs from the prompt"
                                                                  : NULL;
    if (why) {
        s_warn(s, "req=%llx KV reservation for %d tokens refused: %s", (unsigned long long)req_id, n_tokens, why);
        return PD_EINVAL;
    }
    memcpy(ids, blocks, sizeof *ids * (size_t)n_blocks);
    r->n_reserved++;
    return PD_OK;
}

/* The blocks stay with dc_sched: the FAILED event that follows ends the request (or a newer transfer of the
 * same request took them over). */
static void s_kv_release_for(void *ctx, uint64_t req_id, const int32_t *ids, int32_t n_blocks) {
    (void)ids, (void)n_blocks;
    dc_service_t *s = ctx;
    s_req_t *r = s_req_find(s, req_id);
    if (r && r->n_reserved > 0) r->n_reserved--;
}

static void *s_kv_chunk(void *ctx, int32_t layer, eng_kv_kind_t kind, int32_t block) {
    dc_service_t *s = ctx;
    return s->kv_base + eng_kv_chunk_offset(s->layout, layer, kind, block);
}

/* The device-to-device path (the same GPU, or another one this GPU can reach): the engine maps a prefill worker's
 * device pool and copies from it on this (the loop) thread while a step may run on the engine thread; the blocks it
 * writes are reserved for the transfer, so no step reads them. */
static void *s_kv_peer_open(void *ctx, const void *handle, size_t len, const eng_kv_layout_t *src) {
    dc_service_t *s = ctx;
    char why[160] = "";
    void *peer = eng_kv_peer_open(s->p.eng, handle, len, src, why, sizeof why);
    if (peer)
        LOG_I("KV from a prefill worker's GPU pool, mapped here (CUDA IPC): copied device to device");
    else
        LOG_I("KV from a prefill worker whose GPU pool cannot be mapped here (%s): through host memory", why);
    return peer;
}

static pd_status s_kv_peer_copy(void *ctx, void *peer, const int32_t *src, const int32_t *dst, int32_t n,
                                int32_t first_layer, int32_t n_layers) {
    dc_service_t *s = ctx;
    return eng_kv_peer_copy(s->p.eng, peer, src, dst, n, first_layer, n_layers);
}

static void s_kv_peer_close(void *ctx, void *peer) {
    dc_service_t *s = ctx;
    eng_kv_peer_close(s->p.eng, peer);
}

static void s_on_committed(dc_service_t *s, const kvt_event_t *kev) {
    s_req_t *r = s_req_find(s, kev->request_id);
    if (!r) {
        LOG_E("req=%llx KV committed for a request the service does not hold", (unsigned long long)kev->request_id);
        return;
    }
    if (r->n_reserved > 0) r->n_reserved--;
    if (r->is_abandoned) {
        s_req_release_abandoned(s, r);
        return;
    }
    eng_sample_result_t first;
    char why[192] = "", msg[96];
    pd_status st = dc_msg_first_token(kev->first_token_info, kev->first_token_info_len, kev->first_token, s->vocab_size,
                                      &first, why, sizeof why);
    dc_event_t ev;
    if (st == PD_OK && !kev->is_on_device) dc_exec_kv_arrived(s->exec, r->req_id); /* host copy into the GPU pool */
    if (st == PD_OK && dc_sched_admit(s->sched, r->req_id, &first, pd_now_us(), &ev) != PD_OK) {
        st = PD_EPROTO;
        snprintf(why, sizeof why, "first token %d outside the vocabulary", kev->first_token);
    }
    if (st != PD_OK) {
        LOG_W("req=%llx KV committed but: %s", (unsigned long long)r->req_id, why);
        snprintf(msg, sizeof msg, "bad first token from prefill: %s", why);
        s_req_end(s, r, PD_EPROTO, msg);
        return;
    }
    s_on_event(s, &ev);
    dc_exec_kick(s->exec);
}

static void s_on_failed(dc_service_t *s, const kvt_event_t *kev) {
    s_req_t *r = s_req_find(s, kev->request_id);
    /* a newer transfer of the request holds its blocks (this was a superseded epoch), or it is no longer
     * waiting: nothing to end */
    if (!r || r->n_reserved > 0 || dc_sched_req_state(s->sched, r->req_id) != DC_REQ_WAITING_KV) return;
    if (r->is_abandoned) {
        s_req_release_abandoned(s, r);
        return;
    }
    char msg[96];
    snprintf(msg, sizeof msg, "KV transfer failed: %s", kev->err[0] ? kev->err : pd_strerror(kev->status));
    s_req_end(s, r, kev->status == PD_OK ? PD_EPROTO : kev->status, msg);
}

static void s_kv_timer_update(dc_service_t *s);

static void s_kv_poll(dc_service_t *s) {
    kvt_event_t evs[16];
    for (int round = 0; round < 64; round++) {
        int n = kvt_receiver_poll(s->kvt, 0, evs, 16);
        for (int i = 0; i < n; i++) {
            if (evs[i].kind == KVT_EV_COMMITTED) s_on_committed(s, &evs[i]);
            if (evs[i].kind == KVT_EV_FAILED) s_on_failed(s, &evs[i]);
        }
        if (n < 16) break;
    }
    s_kv_timer_update(s);
}

static void s_on_kv_socket(pd_loop_t *l, void *ud) {
    (void)l;
    s_kv_poll(ud);
}

static void s_on_kv_timer(pd_loop_t *l, void *ud) {
    (void)l;
    s_kv_poll(ud);
}

/* Poll the receiver every S_KV_POLL_MS while a request waits for KV (transfer timers, shared-pool copies). */
static void s_kv_timer_update(dc_service_t *s) {
    dc_sched_stats_t ss;
    dc_sched_stats(s->sched, &ss);
    bool is_wanted = ss.n_waiting > 0;
    if (is_wanted && !s->kv_timer) {
        int64_t id = pd_loop_add_timer(s->p.loop, S_KV_POLL_MS, true, s_on_kv_timer, s);
        s->kv_timer = id > 0 ? id : 0;
    } else if (!is_wanted && s->kv_timer) {
        pd_loop_cancel_timer(s->p.loop, s->kv_timer);
        s->kv_timer = 0;
    }
}

/* ---- messages from the router ---- */

static void s_on_decode(dc_service_t *s, const Pdserve__V1__DecodeRequest *m) {
    char why[256];
    const char *stops[PB_MAX_STOP];
    dc_req_params_t rp;
    s->st.n_requests++;
    if (s->is_draining) {
        s_send_reserved(s, m->request_id, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "draining");
        return;
    }
    if (dc_msg_decode_request(m, s->vocab_size, s->max_context, pd_now_us(), stops, &rp, why, sizeof why) != PD_OK) {
        s_warn(s, "req=%llx decode request refused: %s", (unsigned long long)m->request_id, why);
        s_send_reserved(s, m->request_id, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, why);
        return;
    }
    s_req_t *r = NULL;
    for (int32_t i = 0; i < s->p.max_seqs && !r; i++)
        if (!s->reqs[i].in_use) r = &s->reqs[i];
    pd_status st = s_req_find(s, rp.req_id) ? PD_EINVAL : r ? PD_OK : PD_EAGAIN;
    if (st == PD_EINVAL) snprintf(why, sizeof why, "request %llx is already held", (unsigned long long)rp.req_id);
    if (st == PD_EAGAIN) snprintf(why, sizeof why, "too many requests (%d held)", s->p.max_seqs);
    if (st == PD_OK) st = dc_sched_reserve(s->sched, &rp, why, sizeof why);
    if (st != PD_OK) {
        Pdserve__V1__ErrorCode code = st == PD_EAGAIN   ? PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED
                                      : st == PD_EINVAL ? PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT
                                                        : PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
        if (st != PD_EAGAIN) s_warn(s, "req=%llx decode request refused: %s", (unsigned long long)rp.req_id, why);
        s_send_reserved(s, rp.req_id, code, why);
        return;
    }
    *r = (s_req_t){.in_use = true, .req_id = rp.req_id, .n_prompt = rp.n_prompt_tokens, .deadline_us = rp.deadline_us};
    s->n_live++;
    s_send_reserved(s, rp.req_id, PDSERVE__V1__ERROR_CODE__ERR_NONE, NULL);
    if (rp.is_prefill_local)
        dc_exec_kick(s->exec);
    else
        s_kv_timer_update(s);
}

static void s_on_cancel(dc_service_t *s, const Pdserve__V1__Cancel *c) {
    if (pb_validate_cancel(c, NULL, 0) != PD_OK) {
        s->st.n_bad_messages++;
        return;
    }
    s->st.n_cancels++;
    s_req_t *r = s_req_find(s, c->request_id);
    if (!r || r->is_abandoned) return; /* ended already: its last chunk is on its way */
    bool is_deadline = c->reason == PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
    s_req_end(s, r, is_deadline ? PD_ETIMEDOUT : PD_ECLOSED, is_deadline ? "deadline passed" : NULL);
}

static void s_on_registered(dc_service_t *s, const Pdserve__V1__WorkerRegistered *rg) {
    if (rg->error && rg->error->code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        LOG_E("router %s refused this worker (%s): %s", s->router, pb_error_code_name(rg->error->code),
              rg->error->message ? rg->error->message : "");
        s->is_refused = true;
        pd_loop_stop(s->p.loop);
        return;
    }
    if (rg->heartbeat_ivl_ms > 0) {
        int32_t ivl = rg->heartbeat_ivl_ms < 10      ? 10
                      : rg->heartbeat_ivl_ms > 60000 ? 60000
                                                     : (int32_t)rg->heartbeat_ivl_ms;
        s->hb_ivl_ms = ivl;
    }
    if (s->is_rereg_pending) {
        /* the router took our register again: it no longer knows the requests it gave us before */
        s->is_rereg_pending = false;
        if (s->n_live > 0) {
            LOG_W("registered again with router %s: ending the %d requests it no longer knows", s->router, s->n_live);
            s_end_all(s, PD_EIO, "decode worker re-registered with the router");
        }
    }
    if (s->is_registered) return; /* a heartbeat's answer */
    s->is_registered = s->has_registered = true;
    LOG_I("registered with router %s as %s (heartbeat every %d ms, KV at %s)", s->router, s->id, s->hb_ivl_ms,
          kvt_receiver_endpoint(s->kvt));
    if (s->p.on_registered) s->p.on_registered(s->p.ud);
}

static void s_handle(dc_service_t *s, const uint8_t *buf, size_t len) {
    ProtobufCMessage *pm = NULL;
    char why[192];
    s->last_heard_us = pd_now_us();
    s->n_hb_unanswered = 0;
    if (pb_unpack(&pdserve__v1__router_to_worker__descriptor, buf, len, PB_CAP_GENERATE_REQUEST_BYTES, NULL, &pm, why,
                  sizeof why) != PD_OK) {
        s->st.n_bad_messages++;
        s_warn(s, "bad message from the router: %s", why);
        return;
    }
    const Pdserve__V1__RouterToWorker *m = (const Pdserve__V1__RouterToWorker *)pm;
    switch (m->body_case) {
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED: s_on_registered(s, m->registered); break;
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE: s_on_decode(s, m->decode); break;
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL: s_on_cancel(s, m->cancel); break;
    default:
        s->st.n_bad_messages++;
        s_warn(s, "unexpected message from the router (body %d): a decode worker takes decode and cancel",
               (int)m->body_case);
        break;
    }
    pb_free(&pm, NULL);
}

static void s_on_control(pd_loop_t *l, void *ud) {
    (void)l;
    dc_service_t *s = ud;
    for (int i = 0; i < S_MAX_MSGS_PER_WAKE && !s->is_refused; i++) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, s->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&msg);
            break;
        }
        bool is_more = zmq_msg_more(&msg);
        if (!is_more) s_handle(s, zmq_msg_data(&msg), zmq_msg_size(&msg));
        zmq_msg_close(&msg);
        while (is_more) { /* the protocol is one frame per message: drop the rest */
            zmq_msg_init(&msg);
            is_more = zmq_msg_recv(&msg, s->sock, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&msg);
            zmq_msg_close(&msg);
            s->st.n_bad_messages++;
        }
    }
    s_kv_timer_update(s);
}

/* ---- timers ---- */

static void s_check_drained(dc_service_t *s) {
    if (!s->is_draining) return;
    if (!s->is_rest_cancelled && pd_now_us() >= s->drain_deadline_us) {
        LOG_W("drain timeout: ending the %d requests still held", s->n_live);
        s->is_rest_cancelled = true;
        s_end_all(s, PD_EIO, "decode worker shutting down");
    }
    /* abandoned requests need nothing more from anyone: destroy frees their blocks with the receiver */
    if (s->n_live == 0) pd_loop_stop(s->p.loop);
}

/* Requests waiting for KV past their deadline (running ones are dc_sched's). */
static void s_expire_waiting(dc_service_t *s, uint64_t now) {
    for (int32_t i = 0; i < s->p.max_seqs; i++) {
        s_req_t *r = &s->reqs[i];
        if (r->in_use && !r->is_abandoned && r->deadline_us && now >= r->deadline_us &&
            dc_sched_req_state(s->sched, r->req_id) == DC_REQ_WAITING_KV)
            s_req_end(s, r, PD_ETIMEDOUT, "deadline passed while waiting for the KV transfer");
    }
}

static void s_log_stats(dc_service_t *s, uint64_t now) {
    if (now - s->last_stats_us < S_STATS_INTERVAL_US) return;
    dc_service_stats_t st;
    dc_service_stats(s, &st);
    s->last_stats_us = now;
    if (st.exec.n_steps == s->last_stats_steps && st.n_requests_held == 0) return; /* idle: nothing to say */
    s->last_stats_steps = st.exec.n_steps;
    LOG_I("held %d (waiting %d, prefilling %d, running %d), KV blocks free %d/%d, steps %llu, tokens %llu, "
          "requests %llu (refused %llu), KV received %.1f MiB (%.1f device to device)",
          st.n_requests_held, st.sched.n_waiting, st.sched.n_prefilling, st.sched.n_running, st.sched.n_free_blocks,
          st.sched.n_total_blocks, (unsigned long long)st.exec.n_steps, (unsigned long long)st.sched.n_tokens_generated,
          (unsigned long long)st.n_requests, (unsigned long long)st.n_refused, (double)st.kv.payload_bytes / (1 << 20),
          (double)st.kv.device_payload_bytes / (1 << 20));
}

static void s_on_tick(pd_loop_t *l, void *ud) {
    (void)l;
    dc_service_t *s = ud;
    uint64_t now = pd_now_us(), ivl_us = (uint64_t)s->hb_ivl_ms * 1000u;
    /* Silence is counted in heartbeats the router left unanswered (it answers each), not in wall time: a loop
     * that could not run for a while (a long handler) must not mistake its own pause for the router's. A
     * heartbeat that could not even be queued (no connection) counts too. */
    if (s->is_registered && s->n_hb_unanswered > S_SILENT_LOST) {
        LOG_W("router %s silent for %llu ms (%d heartbeats unanswered): it is gone; ending %d requests, registering "
              "again",
              s->router, (unsigned long long)((now - s->last_heard_us) / 1000u), s->n_hb_unanswered, s->n_live);
        s->is_registered = false;
        s_end_all(s, PD_EIO, "router lost");
    }
    /* Not registered: retry every interval while the connection is not up (the send failed), every
     * S_SILENT_REREG intervals once a register went out. Registered but silent: the router may have
     * restarted and not know us. */
    bool is_due = now - s->last_register_us >= S_SILENT_REREG * ivl_us;
    if (!s->is_registered && (!s->is_register_queued || is_due) && now - s->last_register_us >= ivl_us)
        s_send_register(s);
    if (s->is_registered && s->n_hb_unanswered > S_SILENT_REREG && is_due) s_send_register(s);
    if (s->is_registered && now - s->last_hb_us >= ivl_us) {
        s->last_hb_us = now;
        s->n_hb_unanswered++;
        s_send_heartbeat(s);
    }
    s_expire_waiting(s, now);
    s_kv_timer_update(s);
    s_check_drained(s);
    s_log_stats(s, now);
}

/* ---- lifecycle ---- */

static pd_status s_socket(dc_service_t *s, char *err, size_t err_cap) {
    s->sock = zmq_socket(s->p.zmq_ctx, ZMQ_DEALER);
    if (!s->sock) {
        snprintf(err, err_cap, "zmq_socket(DEALER): %s", zmq_strerror(errno));
        return PD_EIO;
    }
    int linger = S_LINGER_MS, one = 1, hb = S_ZMTP_HB_MS, hb_timeout = 3 * S_ZMTP_HB_MS, rc_ivl = 100, rc_max = 1000,
        hwm = 100000;
    int64_t max_msg = PB_CAP_GENERATE_REQUEST_BYTES + 4096;
    if (zmq_setsockopt(s->sock, ZMQ_ROUTING_ID, s->id, strlen(s->id)) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_IMMEDIATE, &one, sizeof one) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_IVL, &hb, sizeof hb) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_TTL, &hb_timeout, sizeof hb_timeout) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_RECONNECT_IVL, &rc_ivl, sizeof rc_ivl) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_RECONNECT_IVL_MAX, &rc_max, sizeof rc_max) != 0 ||
        /* a chunk that cannot be queued is a token lost: queue deep rather than drop under a slow router */
        zmq_setsockopt(s->sock, ZMQ_SNDHWM, &hwm, sizeof hwm) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_RCVHWM, &hwm, sizeof hwm) != 0) {
        snprintf(err, err_cap, "control socket options: %s", zmq_strerror(errno));
        return PD_EIO;
    }
    if (zmq_connect(s->sock, s->router) != 0) {
        snprintf(err, err_cap, "connect %s: %s", s->router, zmq_strerror(errno));
        return PD_EIO;
    }
    return PD_OK;
}

static void s_fingerprint(eng_t *e, kvt_fingerprint_t *out) {
    const eng_model_config_t *c = eng_config(e);
    const eng_kv_layout_t *l = eng_kv_layout(e);
    memset(out, 0, sizeof *out);
    snprintf(out->model_id, sizeof out->model_id, "%s", c->name);
    out->weights_hash = eng_model_identity_hash(eng_model(e));
    out->tokenizer_hash = eng_tok_hash(eng_tokenizer(e));
    out->kv_dtype = l->dtype;
    out->block_size = l->block_size, out->n_layers = l->n_layers;
    out->n_kv_heads = l->n_kv_heads, out->head_dim = l->head_dim;
    out->rope_theta = c->rope_theta, out->rope_dim = c->rope_dim;
}

static pd_status s_check_params(const dc_service_params_t *p, char *err, size_t err_cap) {
    if (!p->eng || !p->loop || !p->zmq_ctx || !p->router_endpoint || !p->worker_id || !p->kv_bind) {
        snprintf(err, err_cap, "dc_service: eng, loop, zmq_ctx, router_endpoint, worker_id and kv_bind are required");
        return PD_EINVAL;
    }
    size_t n = strlen(p->worker_id);
    bool is_id_ok = n >= 1 && n <= PB_MAX_ID_BYTES;
    for (size_t i = 0; i < n; i++) is_id_ok = is_id_ok && p->worker_id[i] > ' ' && p->worker_id[i] <= '~';
    if (!is_id_ok) {
        snprintf(err, err_cap, "decode.id '%s': 1..%d printable ASCII characters, no spaces", p->worker_id,
                 PB_MAX_ID_BYTES);
        return PD_EINVAL;
    }
    /* a step holds one token per decode row and the local-prefill budget */
    int64_t tokens = (int64_t)p->max_batch + p->prefill_chunk_tokens;
    if (p->max_batch < 1 || p->max_seqs < 1 || p->prefill_chunk_tokens < 0 || p->heartbeat_ivl_ms < 1 ||
        p->drain_timeout_ms < 0 || tokens > eng_max_batch_tokens(p->eng)) {
        snprintf(err, err_cap,
                 "decode: max_batch %d + prefill_chunk_tokens %d must fit engine.max_batch_tokens %d; max_batch, "
                 "max_seqs >= 1",
                 p->max_batch, p->prefill_chunk_tokens, eng_max_batch_tokens(p->eng));
        return PD_EINVAL;
    }
    if (!eng_kv_host_base(p->eng)) {
        snprintf(err, err_cap, "decode: the %s backend keeps no host KV pool (kvtransfer needs one)",
                 eng_backend_name(p->eng));
        return PD_EINVAL;
    }
    return PD_OK;
}

dc_service_t *dc_service_create(const dc_service_params_t *p, char *err, size_t err_cap) {
    if (!p || s_check_params(p, err, err_cap) != PD_OK) return NULL;
    dc_service_t *s = pd_xcalloc(1, sizeof *s);
    s->p = *p;
    s->router = pd_xstrdup(p->router_endpoint), s->id = pd_xstrdup(p->worker_id);
    s->kv_bind = pd_xstrdup(p->kv_bind);
    s->p.router_endpoint = s->router, s->p.worker_id = s->id, s->p.kv_bind = s->kv_bind;
    s->hb_ivl_ms = p->heartbeat_ivl_ms;
    const eng_model_config_t *mc = eng_config(p->eng);
    s->vocab_size = mc->vocab_size;
    s->max_context = mc->ctx_len;
    s->layout = eng_kv_layout(p->eng);
    s->kv_base = eng_kv_host_base(p->eng);
    s->reqs = pd_xcalloc((size_t)p->max_seqs, sizeof *s->reqs);
    s->tx_cap = dc_msg_chunk_max_bytes(8192, eng_detok_max_bytes(eng_tokenizer(p->eng)));
    if (s->tx_cap < (64u << 10)) s->tx_cap = 64u << 10;
    s->tx = pd_xmalloc(s->tx_cap);
    s_fingerprint(p->eng, &s->fp);
    dc_msg_fingerprint(&s->fp, &s->fp_pb);

    dc_sched_params_t sp = dc_sched_params_default();
    sp.pool = eng_kv_pool(p->eng);
    sp.tok = eng_tokenizer(p->eng);
    sp.block_size = s->layout->block_size;
    sp.vocab_size = s->vocab_size;
    sp.max_context = s->max_context;
    sp.max_seqs = p->max_seqs;
    sp.max_batch_seqs = p->max_batch;
    sp.prefill_chunk_tokens = p->prefill_chunk_tokens;
    sp.spec = p->spec;
    sp.spec_fixed_k = p->spec_fixed_k;
    if (p->spec_k > 0) sp.spec_k = p->spec_k;
    if (p->ngram_min > 0) sp.ngram_min = p->ngram_min;
    if (p->ngram_max > 0) sp.ngram_max = p->ngram_max;
    if (p->ngram_short_k > 0) sp.ngram_short_k = p->ngram_short_k;
    if (p->spec_max_step_drafts > 0) sp.spec_max_step_drafts = p->spec_max_step_drafts;
    if (p->draft_catchup_tokens > 0) sp.draft_catchup_tokens = p->draft_catchup_tokens;
    if (p->spec == DC_SPEC_DRAFT && p->draft_eng) {
        sp.draft_pool = eng_kv_pool(p->draft_eng);
        sp.draft_block_size = eng_kv_layout(p->draft_eng)->block_size;
    }
    s->sched = dc_sched_create(&sp, err, err_cap);
    if (!s->sched) goto fail;
    dc_exec_params_t xp = {.eng = p->eng,
                           .sched = s->sched,
                           .loop = p->loop,
                           .on_event = s_on_event,
                           .ud = s,
                           .draft_eng = p->spec == DC_SPEC_DRAFT ? p->draft_eng : NULL};
    s->exec = dc_exec_create(&xp, err, err_cap);
    if (!s->exec) goto fail;

    kvt_receiver_params_t kp = kvt_receiver_params_default();
    kp.endpoint = s->kv_bind;
    kp.fingerprint = s->fp;
    kp.layout = *s->layout;
    kp.store =
        (kvt_store_t){.ctx = s, .chunk = s_kv_chunk, .reserve_for = s_kv_reserve_for, .release_for = s_kv_release_for};
    if (p->is_kv_device) {
        kp.store.peer_open = s_kv_peer_open;
        kp.store.peer_copy = s_kv_peer_copy;
        kp.store.peer_close = s_kv_peer_close;
    }
    kp.max_transfers = p->max_seqs;
    s->kvt = kvt_receiver_create(p->zmq_ctx, &kp, err, err_cap);
    if (!s->kvt) goto fail;
    if (s_socket(s, err, err_cap) != PD_OK) goto fail;
    if (pd_loop_add_socket(p->loop, s->sock, s_on_control, s) != PD_OK ||
        pd_loop_add_socket(p->loop, kvt_receiver_socket(s->kvt), s_on_kv_socket, s) != PD_OK) {
        snprintf(err, err_cap, "dc_service: cannot watch the sockets");
        goto fail;
    }
    s->tick_ms = s->hb_ivl_ms < 100 ? (s->hb_ivl_ms + 1) / 2 : 50;
    s->tick_timer = pd_loop_add_timer(p->loop, s->tick_ms, true, s_on_tick, s);
    if (s->tick_timer <= 0) {
        snprintf(err, err_cap, "dc_service: cannot add a timer");
        goto fail;
    }
    s->last_heard_us = s->last_stats_us = pd_now_us();
    s_send_register(s);
    LOG_I("decode worker %s: KV receiver at %s, router %s, max_batch %d, max_seqs %d, prefill_chunk_tokens %d", s->id,
          kvt_receiver_endpoint(s->kvt), s->router, p->max_batch, p->max_seqs, p->prefill_chunk_tokens);
    return s;
fail:
    dc_service_destroy(&s);
    return NULL;
}

/* Where the decode worker's time went, for comparing runs (speculation on and off): steps, how full, and busy
 * (a step in flight), host (between steps that follow each other) and idle time from the first step to the last. */
static void s_log_exit_stats(dc_service_t *s) {
    dc_service_stats_t st;
    if (!s->exec || !s->sched || !s->kvt) return;
    dc_service_stats(s, &st);
    const dc_exec_stats_t *x = &st.exec;
    if (x->n_steps == 0 || x->last_us <= x->first_us) return;
    const double wall = (double)(x->last_us - x->first_us) / 1e6, busy = (double)x->busy_us / 1e6;
    const double host = (double)x->host_us / 1e6;
    LOG_I("decode time: %llu steps of %.1f rows (%llu with drafts: %.2f s); from the first step to the last %.2f s: "
          "busy %.2f s (%.0f%%), between steps %.2f s (%.0f%%), idle %.2f s; %llu tokens emitted, %.0f per second "
          "from the first step to the last, %.1f us of busy time each",
          (unsigned long long)x->n_steps, (double)x->n_rows / (double)x->n_steps,
          (unsigned long long)x->n_drafted_steps, (double)x->drafted_busy_us / 1e6, wall, busy, 100 * busy / wall, host,
          100 * host / wall, wall > busy + host ? wall - busy - host : 0.0,
          (unsigned long long)st.sched.n_tokens_generated, (double)st.sched.n_tokens_generated / wall,
          1e6 * busy / (double)st.sched.n_tokens_generated);
}

void dc_service_destroy(dc_service_t **sp) {
    if (!sp || !*sp) return;
    dc_service_t *s = *sp;
    s_log_exit_stats(s); /* while the receiver, executor and scheduler it asks are all there */
    if (s->tick_timer > 0) pd_loop_cancel_timer(s->p.loop, s->tick_timer);
    if (s->kv_timer > 0) pd_loop_cancel_timer(s->p.loop, s->kv_timer);
    if (s->sock) pd_loop_remove_socket(s->p.loop, s->sock);
    /* the receiver first: no transfer may write a block once the scheduler gives it back to the pool */
    if (s->kvt) {
        pd_loop_remove_socket(s->p.loop, kvt_receiver_socket(s->kvt));
        kvt_receiver_destroy(&s->kvt);
    }
    dc_exec_destroy(&s->exec); /* waits for a running step */
    dc_sched_destroy(&s->sched);
    if (s->sock) zmq_close(s->sock);
    free(s->reqs), free(s->tx), free(s->router), free(s->id), free(s->kv_bind);
    free(s);
    *sp = NULL;
}

void dc_service_drain(dc_service_t *s) {
    if (!s->is_draining) {
        s->is_draining = true;
        s->drain_deadline_us = pd_now_us() + (uint64_t)s->p.drain_timeout_ms * 1000u;
        LOG_I("draining: refusing new requests, %d held may finish within %lld ms", s->n_live,
              (long long)s->p.drain_timeout_ms);
    } else if (!s->is_rest_cancelled) {
        LOG_W("second signal: ending the %d requests still held", s->n_live);
        s->is_rest_cancelled = true;
        s_end_all(s, PD_EIO, "decode worker shutting down");
    }
    s_check_drained(s);
}

bool dc_service_is_refused(const dc_service_t *s) {
    return s->is_refused;
}

bool dc_service_is_registered(const dc_service_t *s) {
    return s->is_registered;
}

const char *dc_service_kv_endpoint(const dc_service_t *s) {
    return kvt_receiver_endpoint(s->kvt);
}

void dc_service_stats(const dc_service_t *s, dc_service_stats_t *out) {
    *out = s->st;
    dc_sched_stats(s->sched, &out->sched);
    dc_exec_stats(s->exec, &out->exec);
    kvt_receiver_stats(s->kvt, &out->kv);
    out->n_requests_held = s->n_live;
    out->n_abandoned = s->n_abandoned;
}
