/* pf_service.c: the prefill worker's control plane (contract in pf_service.h): registration, heartbeats, request
 * and cancel intake, RequestFailed replies, router loss and drain. The work itself is pf_exec's; this file
 * only translates between the wire and it. */
#include "pf_service.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "pb.h"
#include "pd_config.h"
#include "pd_log.h"

#define S_LINGER_MS       200  /* closing never waits long for a router that is gone */
#define S_ZMTP_HB_MS      1000 /* ZMTP pings: a vanished router's TCP connection is noticed and redialled */
#define S_SILENT_REREG    5    /* heartbeats left unanswered before registering again */
#define S_SILENT_LOST     10   /* ... before the router counts as gone: cancel everything */
#define S_DRAIN_TICK_MS   10
#define S_STOP_GRACE_MS   5000 /* after the drain's cancel: a running step and the releases may take this long */
#define S_MAX_RX_BYTES    PB_CAP_GENERATE_REQUEST_BYTES /* a PrefillRequest holds a whole prompt */
#define S_LOG_INTERVAL_US 1000000u

struct pf_service {
    pf_service_params_t p;
    char router[PB_MAX_ENDPOINT_BYTES + 1];
    char id[PB_MAX_ID_BYTES + 1];
    void *sock;
    pf_exec_t *exec;
    kvt_fingerprint_t fp;
    Pdserve__V1__Fingerprint fp_pb; /* points into fp */
    bool is_registered, is_refused, is_draining, is_cancelled_rest;
    int32_t hb_ivl_ms;
    int32_t n_hb_unanswered; /* heartbeats sent (or due) since the router was last heard */
    int64_t hb_timer, drain_timer;
    uint64_t last_heard_us, last_register_us, drain_deadline_us, stop_deadline_us;
    bool is_register_queued; /* the last register went out on a live connection: wait for its answer */
    uint64_t hb_seq;
    uint64_t last_warn_us, n_warn_skipped; /* one line a second for repeated send / receive trouble */
    uint8_t *tx;
    size_t tx_cap;
    pf_service_stats_t st;
};

pf_service_params_t pf_service_params_default(void) {
    pf_service_params_t p = {0};
    p.router_endpoint = "tcp://127.0.0.1:5550";
    p.worker_id = "prefill-0";
    p.step_tokens = 2048;
    p.chunk_tokens = 512;
    p.max_step_seqs = 256;
    p.max_queued = 256;
    p.kv_conns = 1;
    p.is_kv_stream = true;
    p.is_kv_device = true;
    p.heartbeat_ivl_ms = 250;
    p.drain_timeout_ms = 30000;
    return p;
}

/* Rate-limited warning: the first in each second is logged, with how many were skipped before it. */
static void s_warn(pf_service_t *s, const char *what, const char *detail) {
    uint64_t now = pd_now_us();
    if (now - s->last_warn_us < S_LOG_INTERVAL_US) {
        s->n_warn_skipped++;
        return;
    }
    LOG_W("%s: %s (%llu similar lines skipped)", what, detail, (unsigned long long)s->n_warn_skipped);
    s->last_warn_us = now;
    s->n_warn_skipped = 0;
}

/* ---- sending ---- */

/* One envelope, one frame, never blocking: with ZMQ_IMMEDIATE a send without a connection fails at once. */
static bool s_send(pf_service_t *s, const Pdserve__V1__WorkerToRouter *m, bool is_quiet) {
    size_t n = pb_packed_size(&m->base);
    if (n > s->tx_cap) {
        s->tx_cap = n > 2 * s->tx_cap ? n : 2 * s->tx_cap;
        s->tx = pd_xrealloc(s->tx, s->tx_cap);
    }
    int64_t w = pb_pack(&m->base, s->tx, s->tx_cap);
    PD_ASSERT(w >= 0);
    if (zmq_send(s->sock, s->tx, (size_t)w, ZMQ_DONTWAIT) == (int)w) return true;
    s->st.n_send_failed++;
    if (!is_quiet) s_warn(s, "message to the router not sent", zmq_strerror(zmq_errno()));
    return false;
}

static void s_send_register(pf_service_t *s) {
    Pdserve__V1__WorkerRegister wr = PDSERVE__V1__WORKER_REGISTER__INIT;
    wr.worker_id = s->id;
    wr.role = PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL;
    wr.control_endpoint = s->router; /* requests come back over this connection */
    wr.kv_endpoint = "";             /* a prefill worker only sends KV */
    wr.fingerprint = &s->fp_pb;
    wr.backend = (char *)eng_backend_name(s->p.eng);
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER;
    m.register_ = &wr;
    /* quiet: retrying against a router that is not up yet is the normal start-up */
    s->is_register_queued = s_send(s, &m, true);
    s->last_register_us = pd_now_us();
    s->st.n_registers++;
}

static void s_send_heartbeat(pf_service_t *s) {
    pf_exec_stats_t es;
    pf_exec_stats(s->exec, &es);
    Pdserve__V1__Heartbeat hb = PDSERVE__V1__HEARTBEAT__INIT;
    hb.worker_id = s->id;
    hb.seq = ++s->hb_seq;
    hb.role = PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL;
    hb.queue_depth = (uint32_t)es.sched.n_queued;
    hb.running_seqs = (uint32_t)(es.sched.n_prefilling + es.sched.n_sending);
    hb.free_kv_blocks = (uint32_t)es.sched.n_free_blocks;
    hb.total_kv_blocks = (uint32_t)es.sched.n_blocks;
    hb.kv_bytes_sent = es.kv_bytes_sent;
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT;
    m.heartbeat = &hb;
    /* quiet: a router that went away is reported once, when its silence counts as lost */
    if (s_send(s, &m, true)) s->st.n_heartbeats++;
}

static void s_send_failed(pf_service_t *s, uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    e.code = code;
    e.message = (char *)msg;
    Pdserve__V1__RequestFailed f = PDSERVE__V1__REQUEST_FAILED__INIT;
    f.request_id = req_id;
    f.error = &e;
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_FAILED;
    m.failed = &f;
    if (!s_send(s, &m, false))
        LOG_W("req=%016llx RequestFailed (%s) not sent: the router will time the request out",
              (unsigned long long)req_id, pb_error_code_name(code));
}

static void s_on_exec_fail(void *ud, uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg) {
    s_send_failed(ud, req_id, code, msg);
}

/* ---- timers ---- */

static void s_on_heartbeat(pd_loop_t *l, void *ud);

static void s_set_heartbeat(pf_service_t *s, int32_t ivl_ms) {
    if (s->hb_timer > 0) pd_loop_cancel_timer(s->p.loop, s->hb_timer);
    s->hb_ivl_ms = ivl_ms;
    s->hb_timer = pd_loop_add_timer(s->p.loop, ivl_ms, true, s_on_heartbeat, s);
    if (s->hb_timer <= 0) LOG_E("cannot add the heartbeat timer: %s", pd_strerror((pd_status)s->hb_timer));
}

static void s_on_control(pd_loop_t *l, void *ud);

static void s_on_heartbeat(pd_loop_t *l, void *ud) {
    pf_service_t *s = ud;
    /* read what waits first: a loop that was itself late must not take the router's queued answers for
     * silence */
    s_on_control(l, s);
    if (s->is_refused) return;
    uint64_t now = pd_now_us(), ivl_us = (uint64_t)s->hb_ivl_ms * 1000u;
    /* Silence is counted in heartbeats the router left unanswered (it answers each), not in wall time: a loop
     * that could not run for a while (a long handler, a starved CPU) must not take its own pause for the
     * router's, as it once did under full load. A heartbeat that could not even be queued counts too. */
    if (s->is_registered && s->n_hb_unanswered > S_SILENT_LOST) {
        pf_exec_stats_t es;
        pf_exec_stats(s->exec, &es);
        LOG_W("router %s silent for %llu ms (%d heartbeats unanswered): it is gone; cancelling %d requests, "
              "registering again",
              s->router, (unsigned long long)((now - s->last_heard_us) / 1000u), s->n_hb_unanswered, es.n_requests);
        s->is_registered = false;
        pf_exec_cancel_all(s->exec, false, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "router lost");
    }
    /* Not registered: retry every interval while the connection is not up (the send failed), every
     * S_SILENT_REREG intervals once a register went out. Registered but silent (the router answers every
     * heartbeat): it may have restarted and not know us. Only then, because a router that still knows us
     * takes a register as a restart of this worker and ends the requests it routed here. */
    bool is_due = now - s->last_register_us >= S_SILENT_REREG * ivl_us;
    if (!s->is_registered && (!s->is_register_queued || is_due)) s_send_register(s);
    if (s->is_registered && s->n_hb_unanswered > S_SILENT_REREG && is_due) s_send_register(s);
    if (s->is_registered) {
        s->n_hb_unanswered++;
        s_send_heartbeat(s);
    }
}

static void s_on_drain_tick(pd_loop_t *l, void *ud) {
    pf_service_t *s = ud;
    uint64_t now = pd_now_us();
    if (pf_exec_is_idle(s->exec)) {
        LOG_I("drained: stopping");
        pd_loop_stop(l);
        return;
    }
    if (!s->is_cancelled_rest && now >= s->drain_deadline_us) {
        pf_exec_stats_t es;
        pf_exec_stats(s->exec, &es);
        LOG_W("drain: cancelling %d requests still held", es.n_requests);
        s->is_cancelled_rest = true;
        s->stop_deadline_us = now + S_STOP_GRACE_MS * 1000u;
        pf_exec_cancel_all(s->exec, true, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "prefill worker shutting down");
    } else if (s->is_cancelled_rest && now >= s->stop_deadline_us) {
        LOG_W("drain: stopping with transfers unreleased (their senders close now)");
        pd_loop_stop(l);
    }
}

/* ---- incoming ---- */

static void s_on_registered(pf_service_t *s, const Pdserve__V1__WorkerRegistered *rg) {
    if (rg->error && rg->error->code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        LOG_E("router %s refused this worker: %s: %s", s->router, pb_error_code_name(rg->error->code),
              rg->error->message ? rg->error->message : "");
        s->is_refused = true;
        pd_loop_stop(s->p.loop);
        return;
    }
    int32_t ivl = rg->heartbeat_ivl_ms == 0 ? s->hb_ivl_ms
                                            : (int32_t)(rg->heartbeat_ivl_ms > 60000 ? 60000 : rg->heartbeat_ivl_ms);
    if (ivl < 10) ivl = 10;
    if (ivl != s->hb_ivl_ms) s_set_heartbeat(s, ivl);
    if (s->is_registered) return;
    s->is_registered = true;
    LOG_I("registered with router %s as %s (heartbeat every %d ms)", s->router, s->id, s->hb_ivl_ms);
    s_send_heartbeat(s); /* load known at once, not an interval later */
    if (s->p.on_registered) s->p.on_registered(s->p.ud);
}

static void s_to_sampling(const Pdserve__V1__SamplingParams *sp, eng_sampling_t *out) {
    pb_sampling_values_t v;
    pb_sampling_values(sp, &v);
    *out = eng_sampling_default();
    out->temperature = v.temperature;
    out->top_k = v.top_k;
    out->top_p = v.top_p;
    out->min_p = v.min_p;
    out->repetition_penalty = v.repetition_penalty;
    out->presence_penalty = v.presence_penalty;
    out->frequency_penalty = v.frequency_penalty;
    out->seed = v.seed;
    out->has_seed = v.has_seed;
    out->n_logprobs = v.n_logprobs;
}

/* Takes one PrefillRequest; anything refused here is answered at once. */
static void s_on_prefill(pf_service_t *s, const Pdserve__V1__PrefillRequest *pr) {
    char err[256] = "";
    const char *why = NULL;
    Pdserve__V1__ErrorCode code = PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT;
    s->st.n_requests++;
    if (s->is_draining) {
        code = PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE;
        snprintf(err, sizeof err, "draining");
    } else if (pb_validate_sampling(pr->sampling, err, sizeof err) != PD_OK) {
        /* err names the field */
    } else if (pr->n_prompt < 1 || pr->n_prompt > INT32_MAX) {
        snprintf(err, sizeof err, "prompt has %zu tokens, must have at least 1", pr->n_prompt);
    } else if (!pr->decode_kv_endpoint ||
               pd_endpoint_check(pr->decode_kv_endpoint, PD_OPT_ALLOW_WILDCARD, &why) != PD_OK) {
        snprintf(err, sizeof err, "decode_kv_endpoint '%.200s': %s",
                 pr->decode_kv_endpoint ? pr->decode_kv_endpoint : "", why ? why : "missing");
    } else {
        pf_exec_req_t q = {.req_id = pr->request_id,
                           .tokens = pr->prompt,
                           .n_tokens = (int32_t)pr->n_prompt,
                           .timeout_ms = pr->timeout_ms,
                           .decode_id = pr->decode_worker_id,
                           .decode_endpoint = pr->decode_kv_endpoint};
        s_to_sampling(pr->sampling, &q.sampling);
        pd_status st = pf_exec_submit(s->exec, &q, err, sizeof err);
        if (st == PD_OK) {
            LOG_D("req=%016llx queued: %zu tokens for %s", (unsigned long long)pr->request_id, pr->n_prompt,
                  pr->decode_worker_id);
            return;
        }
        if (st == PD_EAGAIN) code = PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
    }
    s->st.n_refused++;
    LOG_I("req=%016llx refused: %s: %s", (unsigned long long)pr->request_id, pb_error_code_name(code), err);
    s_send_failed(s, pr->request_id, code, err);
}

static void s_on_message(pf_service_t *s, const uint8_t *buf, size_t len) {
    char err[256];
    ProtobufCMessage *msg = NULL;
    if (pb_unpack(&pdserve__v1__router_to_worker__descriptor, buf, len, S_MAX_RX_BYTES, NULL, &msg, err, sizeof err) !=
        PD_OK) {
        s_warn(s, "bad message from the router", err);
        return;
    }
    s->last_heard_us = pd_now_us();
    s->n_hb_unanswered = 0;
    Pdserve__V1__RouterToWorker *m = (Pdserve__V1__RouterToWorker *)msg;
    switch (m->body_case) {
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED: s_on_registered(s, m->registered); break;
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_PREFILL: s_on_prefill(s, m->prefill); break;
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL:
        s->st.n_cancels++;
        pf_exec_cancel(s->exec, m->cancel->request_id);
        break;
    case PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE:
        s_send_failed(s, m->decode->request_id, PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL,
                      "DecodeRequest sent to a prefill worker");
        break;
    default: s_warn(s, "message from the router", "no body"); break;
    }
    pb_free(&msg, NULL);
}

static void s_on_control(pd_loop_t *l, void *ud) {
    (void)l;
    pf_service_t *s = ud;
    while (!s->is_refused) {
        zmq_msg_t msg;
        zmq_msg_init(&msg);
        if (zmq_msg_recv(&msg, s->sock, ZMQ_DONTWAIT) < 0) {
            if (zmq_errno() != EAGAIN) s_warn(s, "control socket receive", zmq_strerror(zmq_errno()));
            zmq_msg_close(&msg);
            return;
        }
        bool is_multi = zmq_msg_more(&msg);
        if (!is_multi) s_on_message(s, zmq_msg_data(&msg), zmq_msg_size(&msg));
        while (zmq_msg_more(&msg) && zmq_msg_recv(&msg, s->sock, ZMQ_DONTWAIT) >= 0) {
        }
        if (is_multi) s_warn(s, "bad message from the router", "more than one frame");
        zmq_msg_close(&msg);
    }
}

/* ---- lifecycle ---- */

static void s_fp_to_pb(const kvt_fingerprint_t *f, Pdserve__V1__Fingerprint *pb) {
    static const Pdserve__V1__KvDtype dt[] = {PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32, PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16,
                                              PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16};
    pdserve__v1__fingerprint__init(pb);
    pb->protocol_version = PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT;
    pb->model_id = (char *)f->model_id;
    pb->weights_hash = f->weights_hash;
    pb->tokenizer_hash = f->tokenizer_hash;
    pb->kv_dtype = (unsigned)f->kv_dtype < 3 ? dt[f->kv_dtype] : PDSERVE__V1__KV_DTYPE__KV_DTYPE_UNSPECIFIED;
    pb->block_size = (uint32_t)f->block_size;
    pb->n_layers = (uint32_t)f->n_layers;
    pb->n_kv_heads = (uint32_t)f->n_kv_heads;
    pb->head_dim = (uint32_t)f->head_dim;
    pb->rope_theta = f->rope_theta;
    pb->rope_dim = (uint32_t)f->rope_dim;
}

static bool s_id_ok(const char *id) {
    size_t n = id ? strlen(id) : 0;
    if (n < 1 || n > PB_MAX_ID_BYTES) return false;
    for (size_t i = 0; i < n; i++)
        if (id[i] <= ' ' || id[i] > '~') return false;
    return true;
}

static pd_status s_socket_open(pf_service_t *s, char *err, size_t err_cap) {
    s->sock = zmq_socket(s->p.zmq_ctx, ZMQ_DEALER);
    if (!s->sock) {
        snprintf(err, err_cap, "zmq_socket(DEALER): %s", zmq_strerror(zmq_errno()));
        return PD_EIO;
    }
    int linger = S_LINGER_MS, one = 1, hb = S_ZMTP_HB_MS, hb_timeout = 3 * S_ZMTP_HB_MS, rc_ivl = 100, rc_max = 1000;
    int64_t max_msg = S_MAX_RX_BYTES;
    if (zmq_setsockopt(s->sock, ZMQ_ROUTING_ID, s->id, strlen(s->id)) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_IMMEDIATE, &one, sizeof one) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_IVL, &hb, sizeof hb) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_HEARTBEAT_TTL, &hb_timeout, sizeof hb_timeout) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_RECONNECT_IVL, &rc_ivl, sizeof rc_ivl) != 0 ||
        zmq_setsockopt(s->sock, ZMQ_RECONNECT_IVL_MAX, &rc_max, sizeof rc_max) != 0) {
        snprintf(err, err_cap, "control socket options: %s", zmq_strerror(zmq_errno()));
        return PD_EIO;
    }
    if (zmq_connect(s->sock, s->router) != 0) {
        snprintf(err, err_cap, "connect %s: %s", s->router, zmq_strerror(zmq_errno()));
        return PD_EIO;
    }
    if (pd_loop_add_socket(s->p.loop, s->sock, s_on_control, s) != PD_OK) {
        snprintf(err, err_cap, "cannot watch the control socket");
        return PD_EIO;
    }
    return PD_OK;
}

pf_service_t *pf_service_create(const pf_service_params_t *p, char *err, size_t err_cap) {
    const char *why = NULL;
    if (!p->eng || !p->loop || !p->zmq_ctx || !s_id_ok(p->worker_id) || p->heartbeat_ivl_ms < 10 ||
        p->drain_timeout_ms < 0) {
        snprintf(err, err_cap, "prefill service: bad params (engine, loop, zmq context, worker id '%s', heartbeat)",
                 p->worker_id ? p->worker_id : "");
        return NULL;
    }
    if (!p->router_endpoint || pd_endpoint_check(p->router_endpoint, 0, &why) != PD_OK) {
        snprintf(err, err_cap, "prefill service: router endpoint '%s': %s",
                 p->router_endpoint ? p->router_endpoint : "", why ? why : "missing");
        return NULL;
    }
    pf_service_t *s = pd_xcalloc(1, sizeof *s);
    s->p = *p;
    snprintf(s->router, sizeof s->router, "%s", p->router_endpoint);
    snprintf(s->id, sizeof s->id, "%s", p->worker_id);
    s->p.router_endpoint = s->router, s->p.worker_id = s->id;
    pf_exec_fingerprint(p->eng, &s->fp);
    s_fp_to_pb(&s->fp, &s->fp_pb);

    pf_exec_params_t xp = pf_exec_params_default();
    xp.eng = p->eng, xp.loop = p->loop, xp.zmq_ctx = p->zmq_ctx;
    xp.sched.step_tokens = p->step_tokens;
    xp.sched.max_chunk_tokens = p->chunk_tokens;
    xp.sched.max_step_seqs = p->max_step_seqs;
    xp.sched.max_queued = p->max_queued;
    xp.worker_id = s->id;
    xp.kv_conns = p->kv_conns;
    xp.is_kv_stream = p->is_kv_stream;
    xp.kv_pool_shm_name = p->kv_pool_shm_name;
    xp.is_kv_device = p->is_kv_device;
    xp.fingerprint = s->fp;
    xp.on_fail = s_on_exec_fail, xp.ud = s;
    s->exec = pf_exec_create(&xp, err, err_cap);
    if (!s->exec) goto fail;
    if (s_socket_open(s, err, err_cap) != PD_OK) goto fail;
    s->last_heard_us = pd_now_us();
    s_set_heartbeat(s, p->heartbeat_ivl_ms);
    if (s->hb_timer <= 0) {
        snprintf(err, err_cap, "prefill service: cannot add a timer");
        goto fail;
    }
    s_send_register(s);
    LOG_I("prefill worker %s: router %s, model %s, fingerprint weights %016llx tokenizer %016llx", s->id, s->router,
          s->fp.model_id, (unsigned long long)s->fp.weights_hash, (unsigned long long)s->fp.tokenizer_hash);
    return s;
fail:
    pf_service_destroy(&s);
    return NULL;
}

void pf_service_destroy(pf_service_t **sp) {
    if (!sp || !*sp) return;
    pf_service_t *s = *sp;
    if (s->hb_timer > 0) pd_loop_cancel_timer(s->p.loop, s->hb_timer);
    if (s->drain_timer > 0) pd_loop_cancel_timer(s->p.loop, s->drain_timer);
    if (s->sock) {
        pd_loop_remove_socket(s->p.loop, s->sock);
        zmq_close(s->sock);
    }
    pf_exec_destroy(&s->exec);
    free(s->tx);
    free(s);
    *sp = NULL;
}

void pf_service_drain(pf_service_t *s) {
    uint64_t now = pd_now_us();
    if (s->is_draining) {
        LOG_I("drain: second signal, cancelling the rest now");
        s->drain_deadline_us = now;
        return;
    }
    pf_exec_stats_t es;
    pf_exec_stats(s->exec, &es);
    LOG_I("draining: %d requests held, up to %lld ms", es.n_requests, (long long)s->p.drain_timeout_ms);
    s->is_draining = true;
    s->drain_deadline_us = now + (uint64_t)s->p.drain_timeout_ms * 1000u;
    s->drain_timer = pd_loop_add_timer(s->p.loop, S_DRAIN_TICK_MS, true, s_on_drain_tick, s);
    if (s->drain_timer <= 0) {
        LOG_E("drain: cannot add a timer: stopping now");
        pd_loop_stop(s->p.loop);
    }
}

bool pf_service_is_refused(const pf_service_t *s) {
    return s->is_refused;
}

bool pf_service_is_registered(const pf_service_t *s) {
    return s->is_registered;
}

void pf_service_stats(const pf_service_t *s, pf_service_stats_t *out) {
    *out = s->st;
    pf_exec_stats(s->exec, &out->exec);
}
