/* rt_native.c: the router's native API, protobuf over ZeroMQ (rt_native.h): one packed ClientMessage per client
 * frame (a GenerateRequest or a CancelRequest), packed ResponseChunks back. Maps client frames to rt_core requests
 * and the core's chunks back to the client's request ids; holds per client only what it must (its routing id and
 * live requests). It does not tokenize, check lengths or choose workers: rt_core does.
 *
 * Gone clients: ZeroMQ's ROUTER does not say which routing id a dropped connection had (the socket monitor gives
 * only the fd, ROUTER_NOTIFY is a draft API this libzmq lacks), so a client is known to be gone when a send to it
 * fails (EHOSTUNREACH under ROUTER_MANDATORY once the connection closed or ZMTP heartbeats dropped it, or EAGAIN
 * past max_client_pending queued chunks): all its requests are abandoned then.
 * TODO: a stream=false request of a vanished client runs to its end before that send notices. */
#include "rt_native.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#include "pd_log.h"

#define RT_N_CLIENT_BUCKETS 1024
#define RT_N_NREQ_BUCKETS   4096

typedef struct rt_nclient rt_nclient_t;

/* One request of one client. */
typedef struct rt_nreq {
    rt_native_t *n;
    rt_nclient_t *cl;
    uint64_t client_id;                  /* the client's request_id */
    rt_req_t *core_req;                  /* NULL once the core has ended it */
    struct rt_nreq *hnext, *prev, *next; /* table chain; the client's list */
    bool is_stream;
    uint32_t n_chunks;
    /* stream = false: everything so far, sent as one chunk at the end */
    int32_t *tokens;
    size_t n_tokens, cap_tokens;
    char *text;
    size_t text_len, text_cap;
    Pdserve__V1__TokenLogprob **lps;
    size_t n_lps, cap_lps;
    uint64_t seed;
} rt_nreq_t;

struct rt_nclient {
    uint8_t rid[256]; /* ZeroMQ routing ids are 1..255 bytes */
    size_t rid_len;
    rt_nclient_t *hnext;
    rt_nreq_t *head;
    int32_t n_reqs;
};

struct rt_native {
    pd_loop_t *loop;
    rt_core_t *core;
    rt_native_params_t p;
    void *sock;
    char endpoint[PB_MAX_ENDPOINT_BYTES + 1];
    rt_nclient_t *clients[RT_N_CLIENT_BUCKETS];
    rt_nreq_t *reqs[RT_N_NREQ_BUCKETS];
    uint64_t n_bad, n_cut_clients, last_bad_log_us;
};

rt_native_params_t rt_native_params_default(void) {
    return (rt_native_params_t){
        .endpoint = "tcp://127.0.0.1:5551",
        .max_message_bytes = PB_CAP_GENERATE_REQUEST_BYTES,
        .heartbeat_ivl_ms = 1000,
        .max_client_pending = 10000,
    };
}

const char *rt_native_endpoint(const rt_native_t *n) {
    return n->endpoint;
}

/* ---- clients and their requests ---- */

static uint64_t s_hash_bytes(const uint8_t *p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

static size_t s_nreq_bucket(const rt_nclient_t *cl, uint64_t id) {
    uint64_t h = ((uint64_t)(uintptr_t)cl ^ (id * 0x9e3779b97f4a7c15ull)) * 0xbf58476d1ce4e5b9ull;
    return (size_t)(h >> 32) % RT_N_NREQ_BUCKETS;
}

static rt_nclient_t *s_client_find(rt_native_t *n, const uint8_t *rid, size_t len) {
    for (rt_nclient_t *cl = n->clients[s_hash_bytes(rid, len) % RT_N_CLIENT_BUCKETS]; cl; cl = cl->hnext)
        if (cl->rid_len == len && memcmp(cl->rid, rid, len) == 0) return cl;
    return NULL;
}

static rt_nclient_t *s_client_get(rt_native_t *n, const uint8_t *rid, size_t len) {
    rt_nclient_t *cl = s_client_find(n, rid, len);
    if (cl) return cl;
    cl = pd_xcalloc(1, sizeof *cl);
    memcpy(cl->rid, rid, len);
    cl->rid_len = len;
    rt_nclient_t **b = &n->clients[s_hash_bytes(rid, len) % RT_N_CLIENT_BUCKETS];
    cl->hnext = *b;
    *b = cl;
    return cl;
}

/* A client is kept only while it has requests. */
static void s_client_gc(rt_native_t *n, rt_nclient_t *cl) {
    if (cl->n_reqs > 0) return;
    for (rt_nclient_t **p = &n->clients[s_hash_bytes(cl->rid, cl->rid_len) % RT_N_CLIENT_BUCKETS]; *p;
         p = &(*p)->hnext) {
        if (*p == cl) {
            *p = cl->hnext;
            free(cl);
            return;
        }
    }
}

static rt_nreq_t *s_nreq_find(rt_native_t *n, const rt_nclient_t *cl, uint64_t id) {
    for (rt_nreq_t *q = n->reqs[s_nreq_bucket(cl, id)]; q; q = q->hnext)
        if (q->cl == cl && q->client_id == id) return q;
    return NULL;
}

static rt_nreq_t *s_nreq_add(rt_native_t *n, rt_nclient_t *cl, uint64_t id, bool is_stream) {
    rt_nreq_t *q = pd_xcalloc(1, sizeof *q);
    q->n = n;
    q->cl = cl;
    q->client_id = id;
    q->is_stream = is_stream;
    rt_nreq_t **b = &n->reqs[s_nreq_bucket(cl, id)];
    q->hnext = *b;
    *b = q;
    q->next = cl->head;
    if (cl->head) cl->head->prev = q;
    cl->head = q;
    cl->n_reqs++;
    return q;
}

static void s_lp_free(Pdserve__V1__TokenLogprob *lp) {
    for (size_t i = 0; i < lp->n_top; i++) {
        free(lp->top[i]->text.data);
        free(lp->top[i]);
    }
    free(lp->top);
    free(lp);
}

/* Unlinks and frees q (not its core request: the caller abandoned it, or the core ended it). */
static void s_nreq_drop(rt_native_t *n, rt_nreq_t *q) {
    for (rt_nreq_t **p = &n->reqs[s_nreq_bucket(q->cl, q->client_id)]; *p; p = &(*p)->hnext) {
        if (*p == q) {
            *p = q->hnext;
            break;
        }
    }
    if (q->prev) q->prev->next = q->next;
    if (q->next) q->next->prev = q->prev;
    if (q->cl->head == q) q->cl->head = q->next;
    q->cl->n_reqs--;
    for (size_t i = 0; i < q->n_lps; i++) s_lp_free(q->lps[i]);
    free(q->lps);
    free(q->tokens);
    free(q->text);
    free(q);
}

/* ---- sending ---- */

/* [routing id][packed chunk], never blocking. PD_OK, or PD_EIO when the client is gone or its queue is full. */
static pd_status s_send(rt_native_t *n, const uint8_t *rid, size_t rid_len, const Pdserve__V1__ResponseChunk *c) {
    size_t size = pb_packed_size(&c->base);
    zmq_msg_t m;
    if (zmq_msg_init_size(&m, size) != 0) return PD_ENOMEM;
    if (pb_pack(&c->base, zmq_msg_data(&m), size) != (int64_t)size) {
        zmq_msg_close(&m);
        return PD_EINVAL;
    }
    pd_status st = PD_OK;
    if (zmq_send(n->sock, rid, rid_len, ZMQ_SNDMORE | ZMQ_DONTWAIT) < 0 || zmq_msg_send(&m, n->sock, ZMQ_DONTWAIT) < 0)
        st = PD_EIO;
    zmq_msg_close(&m);
    return st;
}

static pd_status s_send_error(rt_native_t *n, const uint8_t *rid, size_t rid_len, uint64_t id,
                              Pdserve__V1__ErrorCode code, const char *text) {
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    err.code = code;
    err.message = (char *)text;
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    c.request_id = id;
    c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    c.error = &err;
    return s_send(n, rid, rid_len, &c);
}

/* The client is gone or too slow: every request of it is abandoned (except `keep`, which the core is ending). */
static void s_client_cut(rt_native_t *n, rt_nclient_t *cl, const rt_nreq_t *keep) {
    n->n_cut_clients++;
    LOG_W("native client (%d requests) unreachable or too slow: its requests are abandoned", cl->n_reqs);
    for (rt_nreq_t *q = cl->head, *next; q; q = next) {
        next = q->next;
        if (q == keep) continue;
        if (q->core_req) rt_core_abandon(n->core, q->core_req);
        s_nreq_drop(n, q);
    }
}

static void PD_PRINTF(2, 3) s_log_bad(rt_native_t *n, const char *fmt, ...) {
    n->n_bad++;
    uint64_t now = pd_now_us();
    if (now - n->last_bad_log_us < 1000000u) return; /* one line a second */
    n->last_bad_log_us = now;
    char text[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    LOG_W("native API: %s (%llu bad messages so far)", text, (unsigned long long)n->n_bad);
}

/* ---- chunks from the core ---- */

static Pdserve__V1__TokenLogprob *s_lp_copy(const Pdserve__V1__TokenLogprob *src) {
    Pdserve__V1__TokenLogprob *d = pd_xmalloc(sizeof *d);
    pdserve__v1__token_logprob__init(d);
    d->token = src->token;
    d->logprob = src->logprob;
    d->n_top = src->n_top;
    d->top = src->n_top ? pd_xcalloc(src->n_top, sizeof *d->top) : NULL;
    for (size_t i = 0; i < src->n_top; i++) {
        Pdserve__V1__TopLogprob *t = pd_xmalloc(sizeof *t);
        pdserve__v1__top_logprob__init(t);
        t->token = src->top[i]->token;
        t->logprob = src->top[i]->logprob;
        t->text.len = src->top[i]->text.len;
        t->text.data = pd_xmalloc(t->text.len ? t->text.len : 1);
        if (t->text.len) memcpy(t->text.data, src->top[i]->text.data, t->text.len);
        d->top[i] = t;
    }
    return d;
}

static void s_accumulate(rt_nreq_t *q, const Pdserve__V1__ResponseChunk *c) {
    if (c->n_token_ids) {
        if (q->n_tokens + c->n_token_ids > q->cap_tokens) {
            q->cap_tokens = 2 * (q->n_tokens + c->n_token_ids) + 16;
            q->tokens = pd_xrealloc(q->tokens, sizeof *q->tokens * q->cap_tokens);
        }
        memcpy(q->tokens + q->n_tokens, c->token_ids, sizeof *q->tokens * c->n_token_ids);
        q->n_tokens += c->n_token_ids;
    }
    size_t len = c->text ? strlen(c->text) : 0;
    if (q->text_len + len + 1 > q->text_cap) {
        q->text_cap = 2 * (q->text_len + len + 1) + 64;
        q->text = pd_xrealloc(q->text, q->text_cap);
    }
    memcpy(q->text + q->text_len, c->text ? c->text : "", len);
    q->text_len += len;
    q->text[q->text_len] = '\0';
    if (c->n_logprobs) {
        if (q->n_lps + c->n_logprobs > q->cap_lps) {
            q->cap_lps = 2 * (q->n_lps + c->n_logprobs) + 16;
            q->lps = pd_xrealloc(q->lps, sizeof *q->lps * q->cap_lps);
        }
        for (size_t i = 0; i < c->n_logprobs; i++) q->lps[q->n_lps++] = s_lp_copy(c->logprobs[i]);
    }
}

static void s_on_chunk(void *ud, const Pdserve__V1__ResponseChunk *c) {
    rt_nreq_t *q = ud;
    rt_native_t *n = q->n;
    rt_nclient_t *cl = q->cl;
    bool is_last = c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE;
    if (q->n_chunks++ == 0) q->seed = c->seed;
    pd_status st = PD_OK;
    Pdserve__V1__ResponseChunk out = *c;
    out.request_id = q->client_id;
    if (q->is_stream) {
        st = s_send(n, cl->rid, cl->rid_len, &out);
    } else {
        s_accumulate(q, c);
        if (is_last) { /* one chunk: every token, the whole text and every logprob; the last chunk's end */
            out.n_token_ids = q->n_tokens;
            out.token_ids = q->tokens;
            out.text = q->text;
            out.n_logprobs = q->n_lps;
            out.logprobs = q->lps;
            out.seed = q->seed;
            st = s_send(n, cl->rid, cl->rid_len, &out);
        }
    }
    if (is_last) q->core_req = NULL; /* the core frees it after this call */
    if (st != PD_OK) s_client_cut(n, cl, is_last ? q : NULL);
    if (is_last) s_nreq_drop(n, q);
    s_client_gc(n, cl);
}

/* ---- frames from clients ---- */

static void s_on_cancel(rt_native_t *n, const uint8_t *rid, size_t rid_len, uint64_t id) {
    rt_nclient_t *cl = s_client_find(n, rid, rid_len);
    rt_nreq_t *q = cl ? s_nreq_find(n, cl, id) : NULL;
    if (!q) return; /* it ended already (a race the client cannot avoid): nothing to do */
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT; /* the client may reuse the id now */
    c.request_id = q->client_id;
    c.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED;
    rt_core_abandon(n->core, q->core_req);
    s_nreq_drop(n, q);
    if (s_send(n, rid, rid_len, &c) != PD_OK) s_client_cut(n, cl, NULL);
    s_client_gc(n, cl);
}

/* Unpacking can allocate ~50x the wire size on hostile input (proto/pb.h): a budget of 8x plus 1 MiB covers
 * honest requests (packed token ids take 4x) and refuses the rest. Blocks are plain malloc ones, so the request
 * is freed later with the default allocator (rt_core frees it that way). */
typedef struct {
    size_t used, budget;
} s_budget_t;

static void *s_budget_alloc(void *data, size_t size) {
    s_budget_t *b = data;
    if (size > b->budget - b->used) return NULL;
    b->used += size;
    return malloc(size);
}

static void s_budget_free(void *data, void *p) {
    (void)data;
    free(p);
}

/* Takes ownership of req. */
static void s_on_generate(rt_native_t *n, const uint8_t *rid, size_t rid_len, Pdserve__V1__GenerateRequest *req) {
    char err[PB_MAX_ERROR_BYTES];
    uint64_t id = req->request_id;
    pb_api_limits_t lim = pb_api_limits_default();
    lim.vocab_size = eng_tok_vocab_size(rt_core_tokenizer(n->core));
    rt_nclient_t *cl = s_client_find(n, rid, rid_len);
    if (pb_validate_generate_request(req, &lim, err, sizeof err) != PD_OK) {
        s_send_error(n, rid, rid_len, id, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, err);
    } else if (cl && s_nreq_find(n, cl, id)) {
        snprintf(err, sizeof err, "request_id %llu is already in use on this connection", (unsigned long long)id);
        s_send_error(n, rid, rid_len, id, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, err);
    } else {
        cl = s_client_get(n, rid, rid_len);
        rt_nreq_t *q = s_nreq_add(n, cl, id, req->stream);
        Pdserve__V1__ErrorCode code;
        q->core_req = rt_core_submit(n->core, &req, s_on_chunk, q, &code, err, sizeof err);
        if (!q->core_req) {
            s_nreq_drop(n, q);
            if (s_send_error(n, rid, rid_len, id, code, err) != PD_OK) s_client_cut(n, cl, NULL);
        }
        s_client_gc(n, cl);
    }
    pb_free_generate_request(&req, NULL); /* NULL when the core took it */
}

static void s_on_frame(rt_native_t *n, const uint8_t *rid, size_t rid_len, const uint8_t *buf, size_t len) {
    char err[PB_MAX_ERROR_BYTES];
    ProtobufCMessage *m = NULL;
    s_budget_t budget = {.used = 0, .budget = 8 * len + (1u << 20)};
    ProtobufCAllocator alloc = {.alloc = s_budget_alloc, .free = s_budget_free, .allocator_data = &budget};
    if (pb_unpack(&pdserve__v1__client_message__descriptor, buf, len, (size_t)n->p.max_message_bytes, &alloc, &m, err,
                  sizeof err) != PD_OK) {
        s_log_bad(n, "unreadable ClientMessage: %s", err);
        s_send_error(n, rid, rid_len, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, err);
        return;
    }
    Pdserve__V1__ClientMessage *cm = (Pdserve__V1__ClientMessage *)m;
    if (cm->body_case == PDSERVE__V1__CLIENT_MESSAGE__BODY_GENERATE && cm->generate) {
        Pdserve__V1__GenerateRequest *req = cm->generate; /* malloc'd blocks: the core frees it its way */
        cm->generate = NULL;
        cm->body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY__NOT_SET;
        s_on_generate(n, rid, rid_len, req);
    } else if (cm->body_case == PDSERVE__V1__CLIENT_MESSAGE__BODY_CANCEL && cm->cancel) {
        s_on_cancel(n, rid, rid_len, cm->cancel->request_id);
    } else {
        s_log_bad(n, "a ClientMessage without a body");
        s_send_error(n, rid, rid_len, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT,
                     "ClientMessage: set generate or cancel");
    }
    pb_free(&m, &alloc);
}

static void s_on_readable(pd_loop_t *l, void *ud) {
    (void)l;
    rt_native_t *n = ud;
    for (;;) {
        zmq_msg_t id, body;
        zmq_msg_init(&id);
        if (zmq_msg_recv(&id, n->sock, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&id);
            return; /* EAGAIN: drained */
        }
        bool ok = zmq_msg_more(&id);
        zmq_msg_init(&body);
        if (ok && zmq_msg_recv(&body, n->sock, ZMQ_DONTWAIT) < 0) ok = false;
        bool extra = ok && zmq_msg_more(&body);
        for (bool more = extra; more;) {
            zmq_msg_t x;
            zmq_msg_init(&x);
            more = zmq_msg_recv(&x, n->sock, ZMQ_DONTWAIT) >= 0 && zmq_msg_more(&x);
            zmq_msg_close(&x);
        }
        const uint8_t *rid = zmq_msg_data(&id), *buf = zmq_msg_data(&body);
        size_t rid_len = zmq_msg_size(&id), len = zmq_msg_size(&body);
        if (!ok || extra) {
            s_log_bad(n, "a message of more than one frame");
            s_send_error(n, rid, rid_len, 0, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT,
                         "one frame per message: a packed ClientMessage");
        } else {
            s_on_frame(n, rid, rid_len, buf, len);
        }
        zmq_msg_close(&body);
        zmq_msg_close(&id);
    }
}

/* ---- create / destroy ---- */

static bool s_setopt(void *sock, int opt, int v) {
    return zmq_setsockopt(sock, opt, &v, sizeof v) == 0;
}

rt_native_t *rt_native_create(pd_loop_t *loop, void *zmq_ctx, rt_core_t *core, const rt_native_params_t *p, char *err,
                              size_t err_cap) {
    char scratch[8];
    if (!err) {
        err = scratch;
        err_cap = sizeof scratch;
    }
    if (!loop || !zmq_ctx || !core || !p || !p->endpoint || p->max_message_bytes <= 0 || p->heartbeat_ivl_ms <= 0 ||
        p->heartbeat_ivl_ms > 600000 || p->max_client_pending <= 0 || p->max_client_pending > INT32_MAX) {
        snprintf(err, err_cap, "native API: bad parameters");
        return NULL;
    }
    rt_native_t *n = pd_xcalloc(1, sizeof *n);
    n->loop = loop;
    n->core = core;
    n->p = *p;
    n->sock = zmq_socket(zmq_ctx, ZMQ_ROUTER);
    int64_t max_msg = p->max_message_bytes;
    int hb = (int)p->heartbeat_ivl_ms;
    /* MANDATORY: a send to a gone client fails (that is how we learn it is gone); SNDHWM: a client that does not
     * read is cut after max_client_pending chunks instead of growing our memory */
    if (!n->sock || !s_setopt(n->sock, ZMQ_LINGER, 0) || !s_setopt(n->sock, ZMQ_ROUTER_MANDATORY, 1) ||
        !s_setopt(n->sock, ZMQ_SNDHWM, (int)p->max_client_pending) || !s_setopt(n->sock, ZMQ_HEARTBEAT_IVL, hb) ||
        !s_setopt(n->sock, ZMQ_HEARTBEAT_TIMEOUT, 3 * hb) || !s_setopt(n->sock, ZMQ_HEARTBEAT_TTL, 3 * hb) ||
        zmq_setsockopt(n->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg) != 0) {
        snprintf(err, err_cap, "native API: socket: %s", zmq_strerror(errno));
        goto fail;
    }
    if (zmq_bind(n->sock, p->endpoint) != 0) {
        snprintf(err, err_cap, "native API: bind %s: %s", p->endpoint, zmq_strerror(errno));
        goto fail;
    }
    size_t len = sizeof n->endpoint;
    if (zmq_getsockopt(n->sock, ZMQ_LAST_ENDPOINT, n->endpoint, &len) != 0)
        snprintf(n->endpoint, sizeof n->endpoint, "%s", p->endpoint);
    n->p.endpoint = n->endpoint;
    if (pd_loop_add_socket(loop, n->sock, s_on_readable, n) != PD_OK) {
        snprintf(err, err_cap, "native API: cannot watch the socket");
        goto fail;
    }
    LOG_I("native API on %s", n->endpoint);
    return n;
fail:
    rt_native_destroy(&n);
    return NULL;
}

void rt_native_destroy(rt_native_t **np) {
    rt_native_t *n = np ? *np : NULL;
    if (!n) return;
    for (int b = 0; b < RT_N_CLIENT_BUCKETS; b++) {
        while (n->clients[b]) {
            rt_nclient_t *cl = n->clients[b];
            while (cl->head) {
                rt_nreq_t *q = cl->head;
                if (q->core_req) rt_core_abandon(n->core, q->core_req);
                s_nreq_drop(n, q);
            }
            n->clients[b] = cl->hnext;
            free(cl);
        }
    }
    if (n->sock) {
        pd_loop_remove_socket(n->loop, n->sock);
        zmq_close(n->sock);
    }
    free(n);
    *np = NULL;
}
