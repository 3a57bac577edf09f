/* rt_registry.c: the router's control socket: worker registration (fingerprint check), heartbeats and
 * liveness, choosing workers, and the request messages of proto/pdserve_control.proto in both directions.
 * It decides where a request goes and what a worker's message means for it; ending requests is rt_core.c's. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "pd_log.h"
#include "rt_core_int.h"

/* ---- sending ---- */

/* One RouterToWorker to a routing id: [routing id][packed envelope], never blocking. PD_OK, PD_EIO (the worker is
 * not connected: EHOSTUNREACH under ROUTER_MANDATORY), PD_EAGAIN (its queue is full). */
static pd_status s_send_to(rt_core_t *c, const void *rid, size_t rid_len, const Pdserve__V1__RouterToWorker *msg) {
    size_t size = pb_packed_size(&msg->base);
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, size) != 0) return PD_ENOMEM;
    if (pb_pack(&msg->base, zmq_msg_data(&m), size) != (int64_t)size) {
        zmq_msg_close(&m);
        return PD_EINVAL;
    }
    pd_status st = PD_OK;
    if (zmq_send(c->sock, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 || zmq_msg_send(&m, c->sock, ZMQ_DONTWAIT) < 0)
        st = errno == EAGAIN ? PD_EAGAIN : PD_EIO;
    zmq_msg_close(&m); /* after a failed send the message is still ours */
    return st;
}

static pd_status s_send(rt_core_t *c, const char *id, const Pdserve__V1__RouterToWorker *msg) {
    return s_send_to(c, id, strlen(id), msg);
}

/* A routing id for logs: printable bytes as they are, others as '?' (ids of strangers may hold anything). */
static const char *s_rid_text(const void *rid, size_t len, char *buf, size_t cap) {
    size_t n = len < cap - 1 ? len : cap - 1;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = ((const unsigned char *)rid)[i];
        buf[i] = ch > 0x20 && ch < 0x7f ? (char)ch : '?';
    }
    buf[n] = '\0';
    return buf;
}

static void s_send_registered(rt_core_t *c, const void *rid, size_t rid_len, Pdserve__V1__ErrorCode code,
                              const char *text) {
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__WorkerRegistered reg = PDSERVE__V1__WORKER_REGISTERED__INIT;
    Pdserve__V1__RouterToWorker msg = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        err.code = code;
        err.message = (char *)text;
        reg.error = &err;
    }
    reg.heartbeat_ivl_ms = (uint32_t)c->p.heartbeat_ivl_ms;
    msg.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_REGISTERED;
    msg.registered = &reg;
    char id[PB_MAX_ID_BYTES + 1];
    if (s_send_to(c, rid, rid_len, &msg) != PD_OK)
        LOG_W("worker %s: cannot send the registration reply", s_rid_text(rid, rid_len, id, sizeof id));
}

static void s_send_cancel(rt_core_t *c, const rt_worker_t *w, uint64_t req_id, Pdserve__V1__ErrorCode reason) {
    Pdserve__V1__Cancel cancel = PDSERVE__V1__CANCEL__INIT;
    Pdserve__V1__RouterToWorker msg = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
    cancel.request_id = req_id;
    cancel.reason = reason;
    msg.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_CANCEL;
    msg.cancel = &cancel;
    /* a worker we cannot reach is being lost: the timeout ends what it held */
    if (s_send(c, w->id, &msg) != PD_OK)
        LOG_D("worker %s: cancel of req=%016llx not sent", w->id, (unsigned long long)req_id);
}

void rt_registry_cancel(rt_core_t *c, rt_req_t *r, Pdserve__V1__ErrorCode reason, const rt_worker_t *skip) {
    if (r->decode && r->decode != skip) s_send_cancel(c, r->decode, r->id, reason);
    if (r->prefill && r->prefill != skip) s_send_cancel(c, r->prefill, r->id, reason);
}

void rt_registry_detach(rt_core_t *c, rt_req_t *r) {
    (void)c;
    if (r->decode) r->decode->n_reqs--;
    if (r->prefill) r->prefill->n_reqs--;
    r->decode = r->prefill = NULL;
}

/* Time left to r's deadline for the wire, at least 1 ms (the router's own timer ends it at 0). */
static uint32_t s_timeout_ms(const rt_req_t *r) {
    uint64_t now = pd_now_us();
    uint64_t left = r->deadline_us > now ? (r->deadline_us - now + 999u) / 1000u : 1u;
    return left > UINT32_MAX ? UINT32_MAX : (uint32_t)(left ? left : 1u);
}

static Pdserve__V1__SamplingParams s_sampling(const rt_req_t *r) {
    Pdserve__V1__SamplingParams sp = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    if (r->gen->sampling) {
        sp = *r->gen->sampling;
        sp.base.n_unknown_fields = 0;
        sp.base.unknown_fields = NULL;
    }
    sp.has_seed = true; /* every worker samples from the same stream */
    sp.seed = r->seed;
    return sp;
}

/* ---- choosing workers ---- */

static bool s_has_role(const rt_worker_t *w, Pdserve__V1__WorkerRole role) {
    return w->role == role || w->role == PDSERVE__V1__WORKER_ROLE__ROLE_BOTH;
}

int rt_registry_n_alive(const rt_core_t *c, Pdserve__V1__WorkerRole role) {
    int n = 0;
    for (int i = 0; i < RT_MAX_WORKERS; i++)
        if (c->workers[i].is_used && c->workers[i].is_alive && s_has_role(&c->workers[i], role)) n++;
    return n;
}

static bool s_tried(const rt_req_t *r, const rt_worker_t *w) {
    for (int i = 0; i < r->n_tried; i++)
        if (r->tried[i] == w) return true;
    return false;
}

/* Free KV blocks as the router believes them: the last heartbeat's count minus what it has sent the worker
 * since, each request charged ceil((prompt + max_tokens) / block_size) blocks. That is an upper bound (a
 * request that stops early never uses it all), so a busy worker looks fuller than it is until its next
 * heartbeat corrects it. A worker that has not sent a heartbeat yet counts as 0 free: still eligible. */
static int64_t s_decode_score(const rt_worker_t *w) {
    return (int64_t)w->free_kv_blocks - w->sent_blocks;
}

static rt_worker_t *s_pick_decode(rt_core_t *c, const rt_req_t *r) {
    rt_worker_t *best = NULL;
    for (int i = 0; i < RT_MAX_WORKERS; i++) {
        rt_worker_t *w = &c->workers[i];
        if (!w->is_used || !w->is_alive || !s_has_role(w, PDSERVE__V1__WORKER_ROLE__ROLE_DECODE) || s_tried(r, w))
            continue;
        if (!best || s_decode_score(w) > s_decode_score(best) ||
            (s_decode_score(w) == s_decode_score(best) && w->n_reqs < best->n_reqs))
            best = w;
    }
    return best;
}

/* The prefill worker with the shortest queue: heartbeat queue depth plus what was sent since. */
static rt_worker_t *s_pick_prefill(rt_core_t *c, rt_worker_t *const *skip, int n_skip) {
    rt_worker_t *best = NULL;
    for (int i = 0; i < RT_MAX_WORKERS; i++) {
        rt_worker_t *w = &c->workers[i];
        bool skipped = false;
        for (int k = 0; k < n_skip; k++) skipped |= skip[k] == w;
        if (skipped || !w->is_used || !w->is_alive || !s_has_role(w, PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL)) continue;
        int64_t load = (int64_t)w->queue_depth + w->sent_reqs,
                best_load = best ? (int64_t)best->queue_depth + best->sent_reqs : 0;
        if (!best || load < best_load || (load == best_load && w->n_reqs < best->n_reqs)) best = w;
    }
    return best;
}

pd_status rt_registry_dispatch_decode(rt_core_t *c, rt_req_t *r) {
    uint32_t block = c->has_cluster ? c->cluster_block_size : RT_DEFAULT_BLOCK_SIZE;
    int64_t est = ((int64_t)r->n_prompt + r->max_tokens + block - 1) / block;
    for (;;) {
        rt_worker_t *w = s_pick_decode(c, r);
        if (!w) return PD_EAGAIN;
        if (r->n_tried == r->cap_tried) {
            r->cap_tried = r->cap_tried ? 2 * r->cap_tried : 4;
            r->tried = pd_xrealloc(r->tried, sizeof *r->tried * (size_t)r->cap_tried);
        }
        r->tried[r->n_tried++] = w;
        Pdserve__V1__SamplingParams sp = s_sampling(r);
        Pdserve__V1__DecodeRequest dr = PDSERVE__V1__DECODE_REQUEST__INIT;
        dr.request_id = r->id;
        dr.n_prompt = r->n_prompt;
        dr.prompt = r->prompt;
        dr.sampling = &sp;
        dr.max_tokens = r->max_tokens;
        dr.n_stop = r->gen->n_stop;
        dr.stop = r->gen->stop;
        dr.ignore_eos = r->gen->ignore_eos;
        dr.timeout_ms = s_timeout_ms(r);
        dr.prefill_locally = r->is_local;
        dr.speculative_tokens = r->gen->speculative_tokens; /* borrowed from the request, like its stops */
        Pdserve__V1__RouterToWorker msg = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
        msg.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_DECODE;
        msg.decode = &dr;
        pd_status st = s_send(c, w->id, &msg);
        if (st != PD_OK) {
            LOG_W("req=%016llx: DecodeRequest to %s not sent (%s)", (unsigned long long)r->id, w->id, pd_strerror(st));
            continue;
        }
        r->decode = w;
        r->state = RT_REQ_RESERVING;
        r->est_blocks = est;
        w->n_reqs++;
        w->sent_blocks += est;
        return PD_OK;
    }
}

static pd_status s_dispatch_prefill(rt_core_t *c, rt_req_t *r) {
    rt_worker_t *skip[8];
    int n_skip = 0;
    for (;;) {
        rt_worker_t *w = s_pick_prefill(c, skip, n_skip);
        if (!w) return PD_EAGAIN;
        Pdserve__V1__SamplingParams sp = s_sampling(r);
        Pdserve__V1__PrefillRequest pr = PDSERVE__V1__PREFILL_REQUEST__INIT;
        pr.request_id = r->id;
        pr.n_prompt = r->n_prompt;
        pr.prompt = r->prompt;
        pr.sampling = &sp;
        pr.timeout_ms = s_timeout_ms(r);
        pr.decode_worker_id = r->decode->id;
        pr.decode_kv_endpoint = r->decode->kv_endpoint;
        Pdserve__V1__RouterToWorker msg = PDSERVE__V1__ROUTER_TO_WORKER__INIT;
        msg.body_case = PDSERVE__V1__ROUTER_TO_WORKER__BODY_PREFILL;
        msg.prefill = &pr;
        pd_status st = s_send(c, w->id, &msg);
        if (st == PD_OK) {
            r->prefill = w;
            w->n_reqs++;
            w->sent_reqs++;
            return PD_OK;
        }
        LOG_W("req=%016llx: PrefillRequest to %s not sent (%s)", (unsigned long long)r->id, w->id, pd_strerror(st));
        if (n_skip == (int)(sizeof skip / sizeof *skip)) return PD_EAGAIN;
        skip[n_skip++] = w;
    }
}

/* ---- workers coming and going ---- */

static rt_worker_t *s_find_worker(rt_core_t *c, const void *id, size_t len) {
    if (len == 0 || len > PB_MAX_ID_BYTES) return NULL;
    for (int i = 0; i < RT_MAX_WORKERS; i++) {
        rt_worker_t *w = &c->workers[i];
        if (w->is_used && strlen(w->id) == len && memcmp(w->id, id, len) == 0) return w;
    }
    return NULL;
}

/* Out of rotation: every request it holds ends with ERR_UNAVAILABLE and is cancelled on the other workers
 * involved (and on this one, in case it is only slow: it then frees the blocks). */
static void s_worker_lost(rt_core_t *c, rt_worker_t *w, const char *why) {
    LOG_W("worker %s lost (%s): %d requests end", w->id, why, w->n_reqs);
    w->is_alive = false;
    int n = 0;
    uint64_t *ids = rt_core_req_ids(c, w, &n);
    for (int i = 0; i < n; i++) {
        rt_req_t *r = rt_core_req_find(c, ids[i]);
        if (!r || (r->decode != w && r->prefill != w)) continue;
        rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, NULL);
        rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "worker %s lost", w->id);
    }
    free(ids);
}

static void s_on_check(pd_loop_t *l, void *ud) {
    (void)l;
    rt_core_t *c = ud;
    uint64_t now = pd_now_us(), limit = (uint64_t)c->p.worker_timeout_ms * 1000u;
    /* This loop itself held up for half the timeout (a long handler, a starved CPU): the workers' silence since
     * then is ours, not theirs. Each gets a whole timeout from now, as the prefill and decode workers count the
     * router's silence in unanswered heartbeats rather than wall time. */
    if (now - c->last_check_us > limit / 2) {
        LOG_W("router loop held up for %llu ms: worker silence counts from now",
              (unsigned long long)((now - c->last_check_us) / 1000u));
        c->resumed_us = now;
    }
    c->last_check_us = now;
    for (int i = 0; i < RT_MAX_WORKERS; i++) {
        rt_worker_t *w = &c->workers[i];
        uint64_t seen = w->last_seen_us > c->resumed_us ? w->last_seen_us : c->resumed_us;
        if (w->is_used && w->is_alive && now - seen > limit) {
            char why[64];
            snprintf(why, sizeof why, "silent for %llu ms", (unsigned long long)((now - w->last_seen_us) / 1000u));
            s_worker_lost(c, w, why);
        }
    }
}

/* The fields every worker must share: the model's with the router's GGUF, block size and weights with the
 * first worker accepted (the router cannot hash the weights cheaply; a cluster is one set of weights). */
static bool s_fingerprint_ok(const rt_core_t *c, const Pdserve__V1__Fingerprint *fp, char *err, size_t cap) {
#define RT_DIFF_U(field, mine)                                                                            \
    if ((uint64_t)(fp->field) != (uint64_t)(mine)) {                                                      \
        snprintf(err, cap, "field %s: yours %llu, cluster %llu", #field, (unsigned long long)(fp->field), \
                 (unsigned long long)(mine));                                                             \
        return false;                                                                                     \
    }
    RT_DIFF_U(protocol_version, PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT)
    if (strcmp(fp->model_id, c->gguf_name) != 0) {
        snprintf(err, cap, "field model_id: yours '%.128s', cluster '%s'", fp->model_id, c->gguf_name);
        return false;
    }
#define RT_DIFF_H(field, mine)                                                                                  \
    if (fp->field != (mine)) {                                                                                  \
        snprintf(err, cap, "field %s: yours %016llx, cluster %016llx", #field, (unsigned long long)(fp->field), \
                 (unsigned long long)(mine));                                                                   \
        return false;                                                                                           \
    }
    if (c->has_cluster) RT_DIFF_H(weights_hash, c->cluster_weights_hash)
    RT_DIFF_H(tokenizer_hash, eng_tok_hash(c->tok))
    if (c->has_cluster) RT_DIFF_U(block_size, c->cluster_block_size)
    RT_DIFF_U(n_layers, c->n_layers)
    RT_DIFF_U(n_kv_heads, c->n_kv_heads)
    RT_DIFF_U(head_dim, c->head_dim)
    if (fp->rope_theta != c->rope_theta) {
        snprintf(err, cap, "field rope_theta: yours %g, cluster %g", (double)fp->rope_theta, (double)c->rope_theta);
        return false;
    }
    RT_DIFF_U(rope_dim, c->rope_dim)
#undef RT_DIFF_U
#undef RT_DIFF_H
    return true;
}

static void s_on_register(rt_core_t *c, const char *rid, size_t rid_len, const Pdserve__V1__WorkerRegister *wr) {
    char err[PB_MAX_ERROR_BYTES], id[PB_MAX_ID_BYTES + 1];
    s_rid_text(rid, rid_len, id, sizeof id);
    Pdserve__V1__ErrorCode code = PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL;
    if (pb_validate_worker_register(wr, err, sizeof err) != PD_OK) goto refuse;
    if (strlen(wr->worker_id) != rid_len || memcmp(wr->worker_id, rid, rid_len) != 0) {
        snprintf(err, sizeof err, "worker_id '%s' differs from the connection's routing id '%s'", wr->worker_id, id);
        goto refuse;
    }
    code = PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE;
    if (!s_fingerprint_ok(c, wr->fingerprint, err, sizeof err)) goto refuse;
    rt_worker_t *w = s_find_worker(c, rid, rid_len);
    if (w && w->is_alive) s_worker_lost(c, w, "registered again: restarted"); /* its old requests are gone */
    for (int i = 0; !w && i < RT_MAX_WORKERS; i++)
        if (!c->workers[i].is_used) w = &c->workers[i];
    for (int i = 0; !w && i < RT_MAX_WORKERS; i++) /* full: forget a lost one */
        if (!c->workers[i].is_alive && c->workers[i].n_reqs == 0) w = &c->workers[i];
    if (!w) {
        code = PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
        snprintf(err, sizeof err, "the router already has %d workers", RT_MAX_WORKERS);
        goto refuse;
    }
    *w = (rt_worker_t){.role = wr->role, .is_used = true, .is_alive = true, .last_seen_us = pd_now_us()};
    snprintf(w->id, sizeof w->id, "%s", id);
    snprintf(w->kv_endpoint, sizeof w->kv_endpoint, "%s", wr->kv_endpoint ? wr->kv_endpoint : "");
    snprintf(w->backend, sizeof w->backend, "%s", wr->backend ? wr->backend : "");
    if (!c->has_cluster) {
        c->has_cluster = true;
        c->cluster_weights_hash = wr->fingerprint->weights_hash;
        c->cluster_block_size = wr->fingerprint->block_size;
    }
    s_send_registered(c, rid, rid_len, PDSERVE__V1__ERROR_CODE__ERR_NONE, NULL);
    LOG_I("worker %s registered: %s, backend %s%s%s", id, pb_enum_name(&pdserve__v1__worker_role__descriptor, wr->role),
          w->backend, w->kv_endpoint[0] ? ", kv " : "", w->kv_endpoint);
    return;
refuse:
    LOG_W("worker %s refused: %s %s", id, pb_error_code_name(code), err);
    s_send_registered(c, rid, rid_len, code, err);
}

/* A heartbeat refreshes the load figures and is answered with WorkerRegistered{ok}: workers re-register after
 * 5 silent heartbeat intervals, and a decode worker streaming a long answer hears nothing else from us. A
 * worker we do not know (this router restarted) gets no answer, so it registers again. */
static void s_on_heartbeat(rt_core_t *c, rt_worker_t *w, const Pdserve__V1__Heartbeat *hb) {
    char err[256];
    if (pb_validate_heartbeat(hb, err, sizeof err) != PD_OK || strcmp(hb->worker_id, w->id) != 0) {
        c->n_bad_msgs++;
        LOG_W("worker %s: bad heartbeat: %s", w->id, strcmp(hb->worker_id, w->id) ? "worker_id differs" : err);
        return;
    }
    if (!w->is_alive) LOG_I("worker %s is back", w->id);
    w->is_alive = true;
    w->has_heartbeat = true;
    w->queue_depth = hb->queue_depth;
    w->running_seqs = hb->running_seqs;
    w->free_kv_blocks = hb->free_kv_blocks;
    w->total_kv_blocks = hb->total_kv_blocks;
    w->kv_bytes_sent = hb->kv_bytes_sent;
    w->kv_bytes_received = hb->kv_bytes_received;
    w->decode_steps = hb->decode_steps, w->decode_rows = hb->decode_rows, w->decode_tokens = hb->decode_tokens;
    w->spec_rows = hb->spec_rows, w->spec_draft_tokens = hb->spec_draft_tokens;
    w->spec_accepted_tokens = hb->spec_accepted_tokens;
    w->sent_blocks = 0;
    w->sent_reqs = 0;
    s_send_registered(c, w->id, strlen(w->id), PDSERVE__V1__ERROR_CODE__ERR_NONE, NULL);
}

/* ---- a request's messages ---- */

/* A worker's Error as (code, one printable line). */
static Pdserve__V1__ErrorCode s_error_of(const Pdserve__V1__Error *e, Pdserve__V1__ErrorCode dflt, const char **text) {
    *text = e && e->message && pb_utf8_valid((const uint8_t *)e->message, strlen(e->message)) ? e->message : "";
    if (!e || e->code == PDSERVE__V1__ERROR_CODE__ERR_NONE) return dflt;
    if ((unsigned)e->code > (unsigned)PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE)
        return PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL;
    return e->code;
}

static void s_on_reserved(rt_core_t *c, rt_worker_t *w, const Pdserve__V1__DecodeReserved *dr) {
    rt_req_t *r = rt_core_req_find(c, dr->request_id);
    const char *text;
    Pdserve__V1__ErrorCode code = s_error_of(dr->error, PDSERVE__V1__ERROR_CODE__ERR_NONE, &text);
    if (!r || r->decode != w || r->state != RT_REQ_RESERVING) {
        c->n_late_msgs++;
        /* blocks held for a request we no longer have: make sure they are freed (cancel is idempotent) */
        if (!r && code == PDSERVE__V1__ERROR_CODE__ERR_NONE)
            s_send_cancel(c, w, dr->request_id, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED);
        return;
    }
    if (code == PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        r->state = RT_REQ_RUNNING;
        if (r->is_local || s_dispatch_prefill(c, r) == PD_OK) return;
        rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, NULL);
        rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "no prefill worker available");
        return;
    }
    /* refused: it holds nothing for r; another decode worker may have room (or not be draining) */
    w->sent_blocks -= r->est_blocks;
    w->n_reqs--;
    r->decode = NULL;
    LOG_D("req=%016llx: decode worker %s refused: %s %s", (unsigned long long)r->id, w->id, pb_error_code_name(code),
          text);
    if (code == PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED || code == PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE) {
        r->had_exhausted |= code == PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
        if (rt_registry_dispatch_decode(c, r) == PD_OK) return;
        if (r->had_exhausted)
            rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED, "no decode worker has KV capacity");
        else
            rt_core_req_fail(c, r, code, "decode worker %s: %s", w->id, text);
        return;
    }
    rt_core_req_fail(c, r, code, "%s", text[0] ? text : "refused by the decode worker");
}

static void s_on_chunk(rt_core_t *c, rt_worker_t *w, Pdserve__V1__ResponseChunk *chunk) {
    char err[256];
    rt_req_t *r = rt_core_req_find(c, chunk->request_id);
    if (!r || r->decode != w) {
        c->n_late_msgs++;
        return;
    }
    pd_status st = pb_validate_response_chunk(chunk, c->vocab_size, err, sizeof err);
    if (st == PD_OK && r->state == RT_REQ_RESERVING && !r->is_local) {
        st = PD_EPROTO; /* output before any KV could have arrived */
        snprintf(err, sizeof err, "a chunk before its reservation");
    }
    if (st != PD_OK) {
        c->n_bad_msgs++;
        rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, NULL);
        rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL, "decode worker %s sent a bad chunk: %s", w->id,
                         err);
        return;
    }
    rt_core_req_relay(c, r, chunk);
}

static void s_on_failed(rt_core_t *c, rt_worker_t *w, const Pdserve__V1__RequestFailed *f) {
    rt_req_t *r = rt_core_req_find(c, f->request_id);
    if (!r || (r->prefill != w && r->decode != w)) {
        c->n_late_msgs++;
        return;
    }
    const char *text;
    Pdserve__V1__ErrorCode code = s_error_of(f->error, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, &text);
    rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, w); /* w dropped it already */
    rt_core_req_fail(c, r, code, "%s", text[0] ? text : "the prefill worker failed");
}

/* ---- the socket ---- */

static void s_on_message(rt_core_t *c, const char *rid, size_t rid_len, const uint8_t *buf, size_t len) {
    char err[256];
    ProtobufCMessage *m = NULL;
    if (pb_unpack(&pdserve__v1__worker_to_router__descriptor, buf, len, RT_WORKER_MSG_CAP, NULL, &m, err, sizeof err) !=
        PD_OK) {
        c->n_bad_msgs++;
        char id[PB_MAX_ID_BYTES + 1];
        LOG_W("worker %s: malformed message: %s", s_rid_text(rid, rid_len, id, sizeof id), err);
        return;
    }
    Pdserve__V1__WorkerToRouter *msg = (Pdserve__V1__WorkerToRouter *)m;
    rt_worker_t *w = s_find_worker(c, rid, rid_len);
    if (w) w->last_seen_us = pd_now_us();
    if (msg->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_REGISTER) {
        s_on_register(c, rid, rid_len, msg->register_);
    } else if (!w) {
        c->n_late_msgs++; /* from before this router knew it: it registers once it hears nothing back */
    } else if (msg->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_HEARTBEAT) {
        s_on_heartbeat(c, w, msg->heartbeat);
    } else if (!w->is_alive) {
        c->n_late_msgs++; /* its requests were ended when it was lost */
    } else if (msg->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_RESERVED) {
        s_on_reserved(c, w, msg->reserved);
    } else if (msg->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK) {
        s_on_chunk(c, w, msg->chunk);
    } else if (msg->body_case == PDSERVE__V1__WORKER_TO_ROUTER__BODY_FAILED) {
        s_on_failed(c, w, msg->failed);
    } else {
        c->n_bad_msgs++;
    }
    pb_free(&m, NULL);
}

static void s_on_readable(pd_loop_t *l, void *ud) {
    (void)l;
    rt_core_t *c = ud;
    for (;;) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, c->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&id);
            return; /* EAGAIN: drained */
        }
        bool ok = zmq_msg_more(&id);
        zmq_msg_init(&body);
        if (ok && zmq_msg_recv(&body, c->sock, ZMQ_DONTWAIT) < 0) ok = false;
        bool extra = ok && zmq_msg_more(&body);
        for (bool more = extra; more;) { /* one frame per message: drop the rest */
            zmq_msg_t x;
            zmq_msg_init(&x);
            more = zmq_msg_recv(&x, c->sock, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&x);
            zmq_msg_close(&x);
        }
        if (ok && !extra)
            s_on_message(c, zmq_msg_data(&id), zmq_msg_size(&id), zmq_msg_data(&body), zmq_msg_size(&body));
        else
            c->n_bad_msgs++;
        zmq_msg_close(&body);
        zmq_msg_close(&id);
    }
}

static pd_status s_setopt(void *sock, int opt, int v, const char *name, char *err, size_t cap) {
    if (zmq_setsockopt(sock, opt, &v, sizeof v) == 0) return PD_OK;
    snprintf(err, cap, "router control socket: %s: %s", name, zmq_strerror(errno));
    return PD_EIO;
}

pd_status rt_registry_open(rt_core_t *c, char *err, size_t cap) {
    c->sock = zmq_socket(c->zmq_ctx, ZMQ_ROUTER);
    if (!c->sock) {
        snprintf(err, cap, "router control socket: %s", zmq_strerror(errno));
        return PD_EIO;
    }
    int64_t max_msg = RT_WORKER_MSG_CAP;
    int hb = c->p.heartbeat_ivl_ms < 60000 ? (int)c->p.heartbeat_ivl_ms : 60000;
    int hb_timeout = c->p.worker_timeout_ms < 600000 ? (int)c->p.worker_timeout_ms : 600000;
    int hwm = c->p.max_inflight * 4 > 1000 ? (int)(c->p.max_inflight * 4) : 1000;
    /* MANDATORY: a message to a gone worker fails instead of vanishing; HANDOVER: a restarted worker with the
     * same id takes its routing id over from the dead connection; LINGER 0: closing never waits */
    if (s_setopt(c->sock, ZMQ_LINGER, 0, "LINGER", err, cap) ||
        s_setopt(c->sock, ZMQ_ROUTER_MANDATORY, 1, "MANDATORY", err, cap) ||
        s_setopt(c->sock, ZMQ_ROUTER_HANDOVER, 1, "HANDOVER", err, cap) ||
        s_setopt(c->sock, ZMQ_SNDHWM, hwm, "SNDHWM", err, cap) ||
        s_setopt(c->sock, ZMQ_HEARTBEAT_IVL, hb, "HEARTBEAT_IVL", err, cap) ||
        s_setopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, hb_timeout, "HEARTBEAT_TIMEOUT", err, cap) ||
        s_setopt(c->sock, ZMQ_HEARTBEAT_TTL, hb_timeout, "HEARTBEAT_TTL", err, cap))
        return PD_EIO;
    if (zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg) != 0) {
        snprintf(err, cap, "router control socket: MAXMSGSIZE: %s", zmq_strerror(errno));
        return PD_EIO;
    }
    if (zmq_bind(c->sock, c->endpoint) != 0) {
        snprintf(err, cap, "router control socket: bind %s: %s", c->endpoint, zmq_strerror(errno));
        return PD_EIO;
    }
    size_t len = sizeof c->endpoint;
    if (zmq_getsockopt(c->sock, ZMQ_LAST_ENDPOINT, c->endpoint, &len) != 0) c->endpoint[sizeof c->endpoint - 1] = '\0';
    if (pd_loop_add_socket(c->loop, c->sock, s_on_readable, c) != PD_OK) {
        snprintf(err, cap, "router control socket: cannot watch it");
        return PD_EIO;
    }
    int64_t ivl =
        c->p.heartbeat_ivl_ms < c->p.worker_timeout_ms / 4 ? c->p.heartbeat_ivl_ms : c->p.worker_timeout_ms / 4;
    c->check_timer_id = pd_loop_add_timer(c->loop, ivl > 5 ? ivl : 5, true, s_on_check, c);
    c->last_check_us = pd_now_us();
    if (c->check_timer_id < 0) {
        snprintf(err, cap, "router control socket: cannot add its timer");
        return PD_EIO;
    }
    return PD_OK;
}

void rt_registry_close(rt_core_t *c) {
    if (c->check_timer_id > 0) pd_loop_cancel_timer(c->loop, c->check_timer_id);
    c->check_timer_id = 0;
    if (c->sock) {
        /* bounded linger for the last cancels only: zmq_ctx_term waits at most this long for them */
        int linger = 100;
        zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
        pd_loop_remove_socket(c->loop, c->sock);
        zmq_close(c->sock);
        c->sock = NULL;
    }
}
