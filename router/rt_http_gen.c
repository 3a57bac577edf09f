/* rt_http_gen.c: POST /v1/completions and /v1/chat/completions on MHD: the body (capped), the parse
 * (rt_openai), the submit (rt_core), then the core's chunks into one JSON answer or an SSE stream. A waiting
 * connection is suspended in MHD and resumed when there is something to send, so no handler ever blocks.
 * Headers wait for the first chunk (or for the first keep-alive), so a request that fails before its first
 * token gets a real status (429, 503, 504...) instead of a 200 with an error event. Does not route or count
 * anything but its own requests: rt_http.c does that. */
#define _GNU_SOURCE /* POLLRDHUP */
#include "rt_http_int.h"

#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#include "pd_log.h"

#define S_JSON        "application/json"
#define S_MIN_BUF     4096
#define S_READ_BLOCK  (16u << 10) /* MHD's buffer for an SSE body */
#define S_STATUS_GONE 499         /* nginx's "client closed request": only logs and metrics ever see it */

struct rt_http_gen {
    rt_http_t *h;
    struct MHD_Connection *conn;
    rt_http_gen_t *prev, *next;
    /* reading the body */
    char *body;
    size_t n_body, cap_body;
    bool is_too_large; /* past max_body_bytes: the rest is dropped, 413 answered */
    /* running */
    rt_req_t *req; /* the core's handle while it holds the request (NULL before submit, after the end) */
    bool is_submitted;
    bool is_suspended;  /* MHD_suspend_connection is in force */
    bool is_answered;   /* a response is queued (a whole body, or the SSE stream's headers) */
    bool is_streaming;  /* the queued response is the SSE stream */
    bool is_last;       /* the last chunk came (or the stream was ended on our side) */
    bool is_cut;        /* the stream is over on our side: the reader ends it with an error */
    bool needs_abandon; /* cut from inside the core's callback: abandon on the next kick */
    char req_id[48];    /* "cmpl-<hex>" / "chatcmpl-<hex>", sent as X-Request-Id */
    rt_openai_ctx_t ctx;
    rt_openai_stream_t stream;
    /* stream false: every chunk, for rt_openai_response_body */
    Pdserve__V1__ResponseChunk **chunks;
    size_t n_chunks, cap_chunks;
    /* stream true: SSE bytes not yet taken by MHD, sse[sse_off, sse_off + sse_len) */
    char *sse;
    size_t sse_off, sse_len, sse_cap;
    uint64_t last_sent_us; /* last bytes queued into the stream, for keep-alive */
};

static void s_resume(rt_http_gen_t *g) {
    if (!g->is_suspended) return;
    MHD_resume_connection(g->conn);
    g->is_suspended = false;
    rt_http_kick(g->h);
}

/* Gives the core's handle back now (we are outside its callback). */
static void s_abandon(rt_http_gen_t *g) {
    if (!g->req) return;
    rt_core_abandon(g->h->core, g->req);
    g->req = NULL;
    g->needs_abandon = false;
}

/* Answers from inside the access handler. */
static enum MHD_Result s_error(rt_http_gen_t *g, struct MHD_Connection *c, unsigned status, Pdserve__V1__ErrorCode code,
                               const char *msg) {
    rt_openai_error_t e;
    rt_openai_error_set(&e, code, msg);
    enum MHD_Result r = rt_http_reply_error(g->h, c, status, &e, g->req_id);
    g->is_answered = r == MHD_YES;
    return r;
}

/* ---- queued from outside the access handler (core callback, sweep, shutdown) ---- */

/* A whole body for a suspended connection, then resume it. */
static void s_answer(rt_http_gen_t *g, unsigned status, char *body, size_t len) {
    struct MHD_Response *r = rt_http_response(g->h, status, S_JSON, body, len, g->req_id);
    if (r && MHD_queue_response(g->conn, status, r) == MHD_YES) {
        rt_http_count(g->h, status, len);
        g->is_answered = true;
    } else {
        /* Nothing can be said: end the connection so the client does not wait forever. */
        int fd = rt_http_conn_fd(g->conn);
        if (fd >= 0) shutdown(fd, SHUT_RDWR);
        LOG_E("req=%016" PRIx64 " http: cannot queue the %u answer", g->ctx.request_id, status);
    }
    if (r) MHD_destroy_response(r);
    s_resume(g);
}

static void s_answer_error(rt_http_gen_t *g, unsigned status, Pdserve__V1__ErrorCode code, const char *msg) {
    rt_openai_error_t e;
    rt_openai_error_set(&e, code, msg);
    size_t len = 0;
    char *body = rt_openai_error_body(&e, &len);
    s_answer(g, status, body, len);
}

static void s_answer_chunks(rt_http_gen_t *g) {
    int status = 500;
    size_t len = 0;
    char *body = rt_openai_response_body(&g->ctx, (const Pdserve__V1__ResponseChunk *const *)g->chunks, g->n_chunks,
                                         &status, &len);
    if (!body) {
        s_answer_error(g, 500, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "out of memory building the response");
        return;
    }
    s_answer(g, (unsigned)status, body, len);
}

/* ---- SSE ---- */

static ssize_t s_sse_read(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    rt_http_gen_t *g = cls;
    if (g->is_cut) return MHD_CONTENT_READER_END_WITH_ERROR; /* the client must not take a cut stream as whole */
    if (g->sse_len) {
        size_t n = g->sse_len < max ? g->sse_len : max;
        memcpy(buf, g->sse + g->sse_off, n);
        g->sse_off += n, g->sse_len -= n;
        if (!g->sse_len) g->sse_off = 0;
        g->h->bytes_sent += n;
        return (ssize_t)n;
    }
    if (g->is_last) return MHD_CONTENT_READER_END_OF_STREAM;
    /* Nothing to send until the next chunk or keep-alive: park the connection instead of letting MHD poll us. */
    MHD_suspend_connection(g->conn);
    g->is_suspended = true;
    return 0;
}

/* Queues 200 with the SSE stream's headers. False when MHD will not take it (the caller answers otherwise). */
static bool s_stream_start(rt_http_gen_t *g) {
    struct MHD_Response *r = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, S_READ_BLOCK, s_sse_read, g, NULL);
    bool ok = r != NULL;
    if (ok)
        ok = MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream") == MHD_YES &&
             MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-cache") == MHD_YES &&
             MHD_add_response_header(r, "X-Accel-Buffering", "no") == MHD_YES && /* nginx: do not buffer */
             MHD_add_response_header(r, "X-Request-Id", g->req_id) == MHD_YES &&
             MHD_queue_response(g->conn, MHD_HTTP_OK, r) == MHD_YES;
    if (r) MHD_destroy_response(r);
    if (!ok) return false;
    rt_http_count(g->h, MHD_HTTP_OK, 0);
    g->is_answered = g->is_streaming = true;
    g->last_sent_us = pd_now_us();
    return true;
}

/* Ends a stream on our side: the core lets the request go (now, or on the next kick when we are inside its
 * callback), the client sees the connection end without [DONE]. */
static void s_stream_cut(rt_http_gen_t *g, bool is_in_core) {
    g->is_cut = true;
    free(g->sse);
    g->sse = NULL;
    g->sse_off = g->sse_len = g->sse_cap = 0;
    if (is_in_core && g->req) {
        g->needs_abandon = true;
        rt_http_kick(g->h);
    } else {
        s_abandon(g);
    }
    /* A reader that has stopped reading never lets MHD call s_sse_read again: end the socket ourselves. */
    int fd = rt_http_conn_fd(g->conn);
    if (fd >= 0) shutdown(fd, SHUT_RDWR);
    s_resume(g);
}

/* Appends n bytes of events (data is borrowed). Past sse_buffer_bytes unsent, the client is not keeping up:
 * the stream is cut rather than buffered without bound or slowing the others down. */
static void s_sse_push(rt_http_gen_t *g, const char *data, size_t n, bool is_in_core) {
    if (!n || g->is_cut) return;
    if (g->sse_len + n > (size_t)g->h->p.sse_buffer_bytes) {
        g->h->n_sse_cut++;
        LOG_W("req=%016" PRIx64 " http: SSE stream cut: %zu bytes unsent, over the %" PRId64 " B buffer",
              g->ctx.request_id, g->sse_len + n, g->h->p.sse_buffer_bytes);
        s_stream_cut(g, is_in_core);
        return;
    }
    if (g->sse_off + g->sse_len + n > g->sse_cap) {
        if (g->sse_off) { /* slide the unsent bytes down before growing */
            memmove(g->sse, g->sse + g->sse_off, g->sse_len);
            g->sse_off = 0;
        }
        size_t cap = g->sse_cap ? g->sse_cap : S_MIN_BUF;
        while (cap < g->sse_len + n) cap *= 2;
        if (cap != g->sse_cap) {
            char *p = realloc(g->sse, cap);
            if (!p) {
                LOG_E("req=%016" PRIx64 " http: out of memory for the SSE buffer", g->ctx.request_id);
                s_stream_cut(g, is_in_core);
                return;
            }
            g->sse = p, g->sse_cap = cap;
        }
    }
    memcpy(g->sse + g->sse_off + g->sse_len, data, n);
    g->sse_len += n;
    g->last_sent_us = pd_now_us();
    s_resume(g);
}

/* ---- the core's chunks ---- */

static Pdserve__V1__ResponseChunk *s_chunk_copy(const Pdserve__V1__ResponseChunk *c) {
    size_t n = pb_packed_size(&c->base);
    uint8_t *buf = malloc(n ? n : 1);
    Pdserve__V1__ResponseChunk *out = NULL;
    if (buf && pb_pack(&c->base, buf, n) == (int64_t)n &&
        pb_unpack_response_chunk(buf, n, n ? n : 1, NULL, &out, NULL, 0) != PD_OK)
        out = NULL;
    free(buf);
    return out;
}

static void s_on_chunk_whole(rt_http_gen_t *g, const Pdserve__V1__ResponseChunk *c) {
    if (g->n_chunks == g->cap_chunks) {
        size_t cap = g->cap_chunks ? 2 * g->cap_chunks : 8;
        Pdserve__V1__ResponseChunk **p = realloc(g->chunks, cap * sizeof *p);
        if (p) g->chunks = p, g->cap_chunks = cap;
    }
    Pdserve__V1__ResponseChunk *copy = g->n_chunks < g->cap_chunks ? s_chunk_copy(c) : NULL;
    if (!copy) {
        LOG_E("req=%016" PRIx64 " http: out of memory keeping a chunk", g->ctx.request_id);
        if (g->req) g->needs_abandon = true, rt_http_kick(g->h);
        g->is_last = true;
        s_answer_error(g, 500, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "out of memory keeping the response");
        return;
    }
    g->chunks[g->n_chunks++] = copy;
    if (g->is_last) s_answer_chunks(g);
}

static void s_on_chunk_stream(rt_http_gen_t *g, const Pdserve__V1__ResponseChunk *c) {
    if (!g->is_streaming) {
        /* Failed before anything was sent: a real status (with Retry-After where it applies) beats a 200. */
        bool is_failed = c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR ||
                         c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED;
        if (g->is_last && is_failed) {
            s_on_chunk_whole(g, c);
            return;
        }
        if (!s_stream_start(g)) {
            if (g->req) g->needs_abandon = true, rt_http_kick(g->h);
            g->is_last = true;
            s_answer_error(g, 500, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "cannot start the event stream");
            return;
        }
    }
    size_t n = 0;
    char *ev = rt_openai_stream_chunk(&g->stream, c, &n);
    if (!ev) {
        LOG_E("req=%016" PRIx64 " http: out of memory building an SSE event", g->ctx.request_id);
        s_stream_cut(g, true);
        return;
    }
    s_sse_push(g, ev, n, true);
    free(ev);
    s_resume(g); /* the last chunk may add nothing, but the reader must run to end the stream */
}

static void s_on_chunk(void *ud, const Pdserve__V1__ResponseChunk *c) {
    rt_http_gen_t *g = ud;
    if (c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE) {
        g->req = NULL; /* the core frees its handle after this call */
        g->needs_abandon = false;
    }
    if (g->is_cut || g->is_last) return; /* over on our side already */
    g->is_last = c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE;
    if (g->ctx.is_stream)
        s_on_chunk_stream(g, c);
    else
        s_on_chunk_whole(g, c);
}

/* ---- the access handler ---- */

static bool s_is_json(const char *ct) {
    static const char json[] = "application/json";
    if (!ct) return false;
    while (*ct == ' ' || *ct == '\t') ct++;
    if (strncasecmp(ct, json, sizeof json - 1)) return false;
    char e = ct[sizeof json - 1];
    return e == '\0' || e == ';' || e == ' ' || e == '\t';
}

static enum MHD_Result s_too_large(rt_http_gen_t *g, struct MHD_Connection *c, rt_http_t *h) {
    char msg[160];
    snprintf(msg, sizeof msg, "request body is larger than %" PRId64 " bytes (router.max_body)", h->p.max_body_bytes);
    rt_openai_error_t e;
    rt_openai_error_set(&e, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, msg);
    enum MHD_Result r = rt_http_reply_error(h, c, MHD_HTTP_CONTENT_TOO_LARGE, &e, NULL);
    if (g) g->is_answered = r == MHD_YES;
    return r;
}

/* First call (head only): refuse what the head already tells us is wrong, else start reading the body.
 * 415 for another Content-Type: the body would be read as JSON whatever it claims, and 415 names the fix
 * (vLLM answers 400 here; the OpenAI clients always send application/json, so only hand-made requests differ). */
static enum MHD_Result s_begin(rt_http_t *h, struct MHD_Connection *c, rt_openai_endpoint_t ep, void **con_cls) {
    const char *ct = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_TYPE);
    if (!s_is_json(ct)) {
        rt_http_conn_read_done(c);
        char msg[200];
        snprintf(msg, sizeof msg, "Content-Type must be application/json (got %s%.64s%s)", ct ? "'" : "",
                 ct ? ct : "none", ct ? "'" : "");
        rt_openai_error_t e;
        rt_openai_error_set(&e, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, msg);
        return rt_http_reply_error(h, c, MHD_HTTP_UNSUPPORTED_MEDIA_TYPE, &e, NULL);
    }
    const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (cl && strtoull(cl, NULL, 10) > (unsigned long long)h->p.max_body_bytes) {
        rt_http_conn_read_done(c);
        return s_too_large(NULL, c, h); /* before a byte of it is read: MHD then closes the connection */
    }
    rt_http_gen_t *g = calloc(1, sizeof *g);
    if (!g) return MHD_NO;
    g->h = h;
    g->conn = c;
    g->ctx.endpoint = ep;
    g->next = h->gens;
    if (h->gens) h->gens->prev = g;
    h->gens = g;
    h->n_gens++;
    *con_cls = g;
    return MHD_YES;
}

static enum MHD_Result s_take_body(rt_http_gen_t *g, const char *data, size_t *size) {
    size_t n = *size, max = (size_t)g->h->p.max_body_bytes;
    *size = 0;
    if (g->is_too_large || g->is_answered) return MHD_YES; /* dropped: the answer is decided */
    if (n > max - g->n_body) {                             /* chunked bodies announce no length */
        g->is_too_large = true;
        free(g->body);
        g->body = NULL;
        g->n_body = g->cap_body = 0;
        /* MHD takes a response mid-body in some states only; otherwise 413 goes out after the body. */
        (void)s_too_large(g, g->conn, g->h);
        return MHD_YES;
    }
    if (g->n_body + n > g->cap_body) {
        size_t cap = g->cap_body ? g->cap_body : S_MIN_BUF;
        while (cap < g->n_body + n) cap *= 2;
        char *p = realloc(g->body, cap < max ? cap : max);
        if (!p) return MHD_NO;
        g->body = p, g->cap_body = cap < max ? cap : max;
    }
    memcpy(g->body + g->n_body, data, n);
    g->n_body += n;
    return MHD_YES;
}

static const char *s_token_text(void *ud, int32_t token, size_t *len) {
    return eng_tok_piece(ud, token, len);
}

/* Last call (the body is in): parse, submit, and park the connection until the core's first chunk. */
static enum MHD_Result s_submit(rt_http_gen_t *g, struct MHD_Connection *c) {
    rt_http_t *h = g->h;
    rt_http_conn_read_done(c);
    if (g->is_answered) return MHD_YES;
    if (g->is_too_large) return s_too_large(g, c, h);
    Pdserve__V1__GenerateRequest *req = NULL;
    rt_openai_error_t e;
    const char *body = g->body ? g->body : "";
    pd_status st = g->ctx.endpoint == RT_OPENAI_CHAT
                       ? rt_openai_parse_chat(body, g->n_body, &h->lim, &req, &g->ctx, &e)
                       : rt_openai_parse_completion(body, g->n_body, &h->lim, &req, &g->ctx, &e);
    free(g->body);
    g->body = NULL;
    g->n_body = g->cap_body = 0;
    if (st != PD_OK) {
        enum MHD_Result r = rt_http_reply_error(h, c, (unsigned)e.http_status, &e, NULL);
        g->is_answered = r == MHD_YES;
        return r;
    }
    Pdserve__V1__ErrorCode code = PDSERVE__V1__ERROR_CODE__ERR_NONE;
    char msg[PB_MAX_ERROR_BYTES];
    msg[0] = '\0';
    g->req = rt_core_submit(h->core, &req, s_on_chunk, g, &code, msg, sizeof msg);
    rt_openai_request_free(&req); /* NULL after a submit that took it */
    if (!g->req) {
        if (code == PDSERVE__V1__ERROR_CODE__ERR_NONE) code = PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
        return s_error(g, c, (unsigned)pb_error_http_status(code), code, msg[0] ? msg : "the request was refused");
    }
    g->is_submitted = true;
    g->ctx.request_id = rt_req_id(g->req);
    g->ctx.created = (int64_t)time(NULL);
    g->ctx.token_text = s_token_text;
    g->ctx.token_text_ud = (void *)rt_core_tokenizer(h->core);
    snprintf(g->req_id, sizeof g->req_id, "%s-%016" PRIx64, g->ctx.endpoint == RT_OPENAI_CHAT ? "chatcmpl" : "cmpl",
             g->ctx.request_id);
    rt_openai_stream_init(&g->stream, &g->ctx);
    g->last_sent_us = pd_now_us();
    MHD_suspend_connection(c);
    g->is_suspended = true;
    return MHD_YES;
}

enum MHD_Result rt_http_gen_access(rt_http_t *h, struct MHD_Connection *c, rt_openai_endpoint_t ep,
                                   const char *upload_data, size_t *upload_data_size, void **con_cls) {
    rt_http_gen_t *g = *con_cls;
    if (!g) return s_begin(h, c, ep, con_cls);
    if (*upload_data_size) return s_take_body(g, upload_data, upload_data_size);
    if (!g->is_submitted) return s_submit(g, c);
    /* Called again after a resume: every path queues its answer before resuming, so this is a bug; answer
     * rather than leave the client hanging. */
    if (g->is_answered) return MHD_YES;
    s_abandon(g);
    return s_error(g, c, 500, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "internal error: resumed without an answer");
}

/* ---- life and death ---- */

static void s_free(rt_http_gen_t *g) {
    for (size_t i = 0; i < g->n_chunks; i++) pb_free_response_chunk(&g->chunks[i], NULL);
    free(g->chunks);
    free(g->sse);
    free(g->body);
    free(g);
}

void rt_http_gen_completed(rt_http_t *h, rt_http_gen_t *g, enum MHD_RequestTerminationCode toe) {
    if (g->req) { /* MHD is done with a request the core still holds: the client is gone (or we stop) */
        s_abandon(g);
        if (!h->is_destroying && !g->is_cut) { /* a cut stream is counted as cut */
            h->n_client_gone++;
            LOG_I("req=%016" PRIx64 " http: client went away (termination %d): request abandoned", g->ctx.request_id,
                  (int)toe);
        }
    }
    if (g->prev) g->prev->next = g->next;
    if (g->next) g->next->prev = g->prev;
    if (h->gens == g) h->gens = g->next;
    h->n_gens--;
    s_free(g);
}

/* While suspended MHD does not watch the socket, so a client that hangs up would go unnoticed until its answer:
 * look for the hang-up ourselves (POLLRDHUP: the peer closed its side). */
static bool s_is_gone(rt_http_gen_t *g) {
    int fd = rt_http_conn_fd(g->conn);
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) == 1 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

void rt_http_gen_sweep(rt_http_t *h, uint64_t now_us) {
    uint64_t keepalive_us = (uint64_t)h->p.sse_keepalive_ms * 1000u;
    for (rt_http_gen_t *g = h->gens; g; g = g->next) {
        if (!g->is_submitted || g->is_last || g->is_cut) continue;
        if (g->is_suspended && s_is_gone(g)) {
            h->n_client_gone++;
            LOG_I("req=%016" PRIx64 " http: client closed the connection: request abandoned", g->ctx.request_id);
            s_abandon(g);
            g->is_last = true;
            if (g->is_streaming)
                s_stream_cut(g, false);
            else
                s_answer_error(g, S_STATUS_GONE, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED,
                               "client closed the connection");
            continue;
        }
        /* A quiet stream gets a comment so that proxies with idle timeouts keep it; a stream still waiting for its
         * first token gets its headers now for the same reason. */
        if (!g->ctx.is_stream || g->sse_len || now_us - g->last_sent_us < keepalive_us) continue;
        if (!g->is_streaming && !s_stream_start(g)) continue;
        h->n_keepalive++;
        s_sse_push(g, RT_OPENAI_SSE_KEEPALIVE, sizeof RT_OPENAI_SSE_KEEPALIVE - 1, false);
    }
}

void rt_http_gen_deferred(rt_http_t *h) {
    for (rt_http_gen_t *g = h->gens; g; g = g->next)
        if (g->needs_abandon) s_abandon(g);
}

void rt_http_gen_shutdown(rt_http_t *h) {
    static const char msg[] = "the router is shutting down";
    for (rt_http_gen_t *g = h->gens; g; g = g->next) {
        s_abandon(g);
        if (!g->is_submitted || g->is_last || g->is_cut) {
            s_resume(g);
            continue;
        }
        g->is_last = true;
        if (!g->is_answered) {
            s_answer_error(g, MHD_HTTP_SERVICE_UNAVAILABLE, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, msg);
            continue;
        }
        rt_openai_error_t e;
        rt_openai_error_set(&e, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, msg);
        size_t n = 0;
        char *ev = rt_openai_error_sse(&e, &n);
        if (ev) s_sse_push(g, ev, n, false);
        free(ev);
        s_sse_push(g, RT_OPENAI_SSE_DONE, sizeof RT_OPENAI_SSE_DONE - 1, false);
        s_resume(g);
    }
}
