/* rt_http.c: libmicrohttpd run inside the router's loop (its epoll fd watched by pd_loop, MHD_run on
 * readiness and at MHD_get_timeout, no MHD thread), routing, the small endpoints (/v1/models, /health,
 * /metrics), connection read deadlines and the HTTP counters. The generation endpoints live in rt_http_gen.c.
 * Error bodies are OpenAI-shaped everywhere we answer; the few answers MHD makes itself (431/414 for an
 * oversized head, 400 for a malformed one) keep MHD's bodies. */
#define _GNU_SOURCE /* open_memstream */
#include "rt_http_int.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <zmq.h>

#include "pd_log.h"

#define RT_HTTP_SNDBUF_BYTES (64 << 10) /* per connection; responses are written in pieces past it */

#define S_JSON "application/json"

rt_http_params_t rt_http_params_default(void) {
    return (rt_http_params_t){
        .bind_addr = "127.0.0.1",
        .port = 8000,
        .max_body_bytes = 4 << 20,
        .max_header_bytes = 32 << 10,
        .connection_timeout_ms = 30000,
        .max_connections = 1024,
        .sse_buffer_bytes = 1 << 20,
        .sse_keepalive_ms = 15000,
        .completion_max_tokens = 16,
    };
}

/* ---- responses ---- */

void rt_http_count(rt_http_t *h, unsigned status, size_t n_body_bytes) {
    h->n_status[status < RT_HTTP_MAX_STATUS ? status : 0]++;
    h->bytes_sent += n_body_bytes;
}

struct MHD_Response *rt_http_response(rt_http_t *h, unsigned status, const char *ctype, char *body, size_t len,
                                      const char *req_id) {
    (void)h;
    struct MHD_Response *r = body ? MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE)
                                  : MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    if (!r) {
        free(body);
        return NULL;
    }
    bool ok = true;
    if (ctype) ok &= MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype) == MHD_YES;
    if (req_id && req_id[0]) ok &= MHD_add_response_header(r, "X-Request-Id", req_id) == MHD_YES;
    /* Both mean "nothing is wrong with your request, try again shortly" (queue full, no worker, draining). */
    if (status == MHD_HTTP_TOO_MANY_REQUESTS || status == MHD_HTTP_SERVICE_UNAVAILABLE)
        ok &= MHD_add_response_header(r, MHD_HTTP_HEADER_RETRY_AFTER, "1") == MHD_YES;
    if (!ok) {
        MHD_destroy_response(r);
        return NULL;
    }
    return r;
}

enum MHD_Result rt_http_reply(rt_http_t *h, struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
                              size_t len, const char *req_id) {
    struct MHD_Response *r = rt_http_response(h, status, ctype, body, len, req_id);
    if (!r) {
        LOG_E("http: out of memory building a %u response", status);
        return MHD_NO;
    }
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r); /* MHD holds its own reference until the response is sent */
    if (ret == MHD_YES) rt_http_count(h, status, len);
    return ret;
}

enum MHD_Result rt_http_reply_error(rt_http_t *h, struct MHD_Connection *c, unsigned http_status,
                                    const rt_openai_error_t *e, const char *req_id) {
    size_t len = 0;
    char *body = rt_openai_error_body(e, &len);
    if (!body) return MHD_NO;
    return rt_http_reply(h, c, http_status, S_JSON, body, len, req_id);
}

/* 404 / 405 and other refusals of ours that have no ErrorCode of their own: shaped as invalid_request_error. */
static enum MHD_Result s_reply_refusal(rt_http_t *h, struct MHD_Connection *c, unsigned status, const char *allow,
                                       const char *fmt, ...) PD_PRINTF(5, 6);
static enum MHD_Result s_reply_refusal(rt_http_t *h, struct MHD_Connection *c, unsigned status, const char *allow,
                                       const char *fmt, ...) {
    rt_openai_error_t e;
    rt_openai_error_set(&e, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    size_t len = 0;
    char *body = rt_openai_error_body(&e, &len);
    struct MHD_Response *r = body ? rt_http_response(h, status, S_JSON, body, len, NULL) : NULL;
    if (!r) return MHD_NO;
    if (allow && MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, allow) != MHD_YES) {
        MHD_destroy_response(r);
        return MHD_NO;
    }
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    if (ret == MHD_YES) rt_http_count(h, status, len);
    return ret;
}

/* ---- small endpoints ---- */

static enum MHD_Result s_models(rt_http_t *h, struct MHD_Connection *c) {
    size_t len = 0;
    char *body = rt_openai_models_body(h->models, 1, h->created, "pdserve", &len);
    return body ? rt_http_reply(h, c, MHD_HTTP_OK, S_JSON, body, len, NULL) : MHD_NO;
}

static enum MHD_Result s_health(rt_http_t *h, struct MHD_Connection *c) {
    char buf[128];
    bool is_ready = rt_core_is_ready(h->core);
    int n = is_ready ? snprintf(buf, sizeof buf, "{\"status\":\"ok\"}")
                     : snprintf(buf, sizeof buf, "{\"status\":\"not ready\",\"inflight\":%" PRId32 "}",
                                rt_core_n_inflight(h->core));
    char *body = strdup(buf);
    if (!body) return MHD_NO;
    return rt_http_reply(h, c, is_ready ? MHD_HTTP_OK : MHD_HTTP_SERVICE_UNAVAILABLE, S_JSON, body, (size_t)n, NULL);
}

static enum MHD_Result s_metrics(rt_http_t *h, struct MHD_Connection *c) {
    size_t n_core = 0, n_http = 0;
    char *core = rt_core_metrics(h->core, &n_core), *http = rt_http_metrics(h, &n_http);
    char *body = (core && http) ? malloc(n_core + n_http + 1) : NULL;
    if (body) {
        memcpy(body, core, n_core);
        memcpy(body + n_core, http, n_http);
        body[n_core + n_http] = '\0';
    }
    free(core);
    free(http);
    if (!body) return MHD_NO;
    return rt_http_reply(h, c, MHD_HTTP_OK, "text/plain; version=0.0.4; charset=utf-8", body, n_core + n_http, NULL);
}

char *rt_http_metrics(const rt_http_t *h, size_t *len) {
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    if (!f) return NULL;
    fprintf(f, "# HELP pdserve_router_http_responses_total HTTP responses queued by the router, by status code.\n"
               "# TYPE pdserve_router_http_responses_total counter\n");
    for (unsigned s = 1; s < RT_HTTP_MAX_STATUS; s++)
        if (h->n_status[s])
            fprintf(f, "pdserve_router_http_responses_total{code=\"%u\"} %" PRIu64 "\n", s, h->n_status[s]);
    if (h->n_status[0]) fprintf(f, "pdserve_router_http_responses_total{code=\"other\"} %" PRIu64 "\n", h->n_status[0]);
    fprintf(f,
            "# HELP pdserve_router_http_sse_streams_cut_total SSE streams ended because the client read too slowly.\n"
            "# TYPE pdserve_router_http_sse_streams_cut_total counter\n"
            "pdserve_router_http_sse_streams_cut_total %" PRIu64 "\n"
            "# HELP pdserve_router_http_client_gone_total Requests abandoned because the client went away.\n"
            "# TYPE pdserve_router_http_client_gone_total counter\n"
            "pdserve_router_http_client_gone_total %" PRIu64 "\n"
            "# HELP pdserve_router_http_read_timeouts_total Connections cut for not sending a request in time.\n"
            "# TYPE pdserve_router_http_read_timeouts_total counter\n"
            "pdserve_router_http_read_timeouts_total %" PRIu64 "\n"
            "# HELP pdserve_router_http_sse_keepalives_total SSE keep-alive comments sent on quiet streams.\n"
            "# TYPE pdserve_router_http_sse_keepalives_total counter\n"
            "pdserve_router_http_sse_keepalives_total %" PRIu64 "\n"
            "# HELP pdserve_router_http_body_bytes_sent_total Response body bytes handed to the HTTP server.\n"
            "# TYPE pdserve_router_http_body_bytes_sent_total counter\n"
            "pdserve_router_http_body_bytes_sent_total %" PRIu64 "\n"
            "# HELP pdserve_router_http_requests_active Generation requests whose response is not finished.\n"
            "# TYPE pdserve_router_http_requests_active gauge\n"
            "pdserve_router_http_requests_active %" PRId32 "\n",
            h->n_sse_cut, h->n_client_gone, h->n_read_cut, h->n_keepalive, h->bytes_sent, h->n_gens);
    if (fclose(f) != 0) {
        free(buf);
        return NULL;
    }
    if (len) *len = n;
    return buf;
}

/* ---- MHD callbacks ---- */

static bool s_is_get(const char *method) {
    return !strcmp(method, MHD_HTTP_METHOD_GET) || !strcmp(method, MHD_HTTP_METHOD_HEAD);
}

/* The request context of the small GET endpoints: only its address matters (not a generation request). */
static const char s_small = 0;

static enum MHD_Result s_access(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                                const char *version, const char *upload_data, size_t *upload_data_size,
                                void **con_cls) {
    (void)version;
    rt_http_t *h = cls;
    if (*con_cls == &s_small) {
        /* Second call: the head is fully in; answering now rather than on the first call keeps the connection
         * alive (MHD closes one answered before it knew the request had no body). */
        if (*upload_data_size) {
            *upload_data_size = 0; /* a body nobody asked for: dropped */
            return MHD_YES;
        }
        rt_http_conn_read_done(c);
        return !strcmp(url, "/v1/models") ? s_models(h, c) : !strcmp(url, "/health") ? s_health(h, c) : s_metrics(h, c);
    }
    if (*con_cls) return rt_http_gen_access(h, c, RT_OPENAI_COMPLETIONS, upload_data, upload_data_size, con_cls);
    bool is_cmpl = !strcmp(url, "/v1/completions"), is_chat = !strcmp(url, "/v1/chat/completions");
    if ((is_cmpl || is_chat) && !strcmp(method, MHD_HTTP_METHOD_POST))
        return rt_http_gen_access(h, c, is_chat ? RT_OPENAI_CHAT : RT_OPENAI_COMPLETIONS, upload_data, upload_data_size,
                                  con_cls);
    /* Everything else is answered from its head: a body, if any, is never read (MHD then closes). */
    rt_http_conn_read_done(c);
    if (is_cmpl || is_chat)
        return s_reply_refusal(h, c, MHD_HTTP_METHOD_NOT_ALLOWED, "POST", "%s %s: method not allowed (use POST)",
                               method, url);
    bool is_models = !strcmp(url, "/v1/models"), is_health = !strcmp(url, "/health");
    bool is_metrics = !strcmp(url, "/metrics");
    if (!is_models && !is_health && !is_metrics)
        return s_reply_refusal(h, c, MHD_HTTP_NOT_FOUND, NULL, "%s %s: no such endpoint", method, url);
    if (!s_is_get(method))
        return s_reply_refusal(h, c, MHD_HTTP_METHOD_NOT_ALLOWED, "GET, HEAD", "%s %s: method not allowed (use GET)",
                               method, url);
    *con_cls = (void *)&s_small;
    return MHD_YES;
}

static rt_http_conn_t *s_conn_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

int rt_http_conn_fd(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    return ci ? ci->connect_fd : -1;
}

void rt_http_conn_read_done(struct MHD_Connection *c) {
    rt_http_conn_t *hc = s_conn_of(c);
    if (hc) hc->is_reading = false;
}

static void s_completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    rt_http_t *h = cls;
    if (*con_cls && *con_cls != &s_small) rt_http_gen_completed(h, *con_cls, toe);
    *con_cls = NULL;
    rt_http_conn_t *hc = s_conn_of(c);
    if (hc) { /* keep-alive: the next request's head is due within the deadline too */
        hc->is_reading = true;
        hc->read_start_us = pd_now_us();
    }
}

static void s_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                         enum MHD_ConnectionNotificationCode toe) {
    rt_http_t *h = cls;
    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        /* A fixed kernel send buffer: Linux autotuning lets an unread socket absorb megabytes, which would hide
         * a stalled SSE reader from the sse_buffer cap for minutes (and hold that memory per connection). */
        int fd = rt_http_conn_fd(c), sndbuf = RT_HTTP_SNDBUF_BYTES;
        if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
        rt_http_conn_t *hc = calloc(1, sizeof *hc);
        if (!hc) return; /* no read deadline for this one; MHD's idle timeout still applies */
        *hc = (rt_http_conn_t){.conn = c, .read_start_us = pd_now_us(), .is_reading = true, .next = h->conns};
        if (h->conns) h->conns->prev = hc;
        h->conns = hc;
        *socket_context = hc;
        return;
    }
    rt_http_conn_t *hc = *socket_context;
    if (!hc) return;
    if (hc->prev) hc->prev->next = hc->next;
    if (hc->next) hc->next->prev = hc->prev;
    if (h->conns == hc) h->conns = hc->next;
    free(hc);
    *socket_context = NULL;
}

/* MHD's own messages (bind failures, connection limit reached, malformed heads): kept for create's error and
 * logged at most once a second, since a flood of bad clients would otherwise flood the log. */
static void s_mhd_log(void *cls, const char *fmt, va_list ap) {
    rt_http_t *h = cls;
    vsnprintf(h->mhd_err, sizeof h->mhd_err, fmt, ap);
    size_t n = strlen(h->mhd_err);
    while (n && (h->mhd_err[n - 1] == '\n' || h->mhd_err[n - 1] == '\r')) h->mhd_err[--n] = '\0';
    if (!h->d) return; /* starting: a failure is reported once, by rt_http_create's err */
    uint64_t now = pd_now_us();
    if (h->log_last_us && now - h->log_last_us < 1000000) {
        h->log_n_quiet++;
        return;
    }
    LOG_I("http: libmicrohttpd: %s (%" PRIu64 " similar lines skipped)", h->mhd_err, h->log_n_quiet);
    h->log_last_us = now, h->log_n_quiet = 0;
}

/* ---- the loop side ---- */

static void s_on_mhd_timer(pd_loop_t *l, void *ud);

/* MHD_run, then the timer at MHD's next deadline. A connection with buffered work makes MHD ask for an
 * immediate run (timeout 0): a few passes here save a round through the loop. */
static void s_run(rt_http_t *h) {
    if (h->is_in_mhd || !h->d) return;
    h->is_in_mhd = true;
    MHD_UNSIGNED_LONG_LONG t = 0;
    bool has_t = false;
    for (int i = 0; i < 4; i++) {
        MHD_run(h->d);
        has_t = MHD_get_timeout(h->d, &t) == MHD_YES;
        if (!has_t || t > 0) break;
    }
    h->is_in_mhd = false;
    if (h->mhd_timer) pd_loop_cancel_timer(h->loop, h->mhd_timer);
    h->mhd_timer = 0;
    if (has_t) {
        int64_t id = pd_loop_add_timer(h->loop, (int64_t)(t > 3600000 ? 3600000 : t), false, s_on_mhd_timer, h);
        h->mhd_timer = id > 0 ? id : 0;
    }
}

static void s_on_mhd_timer(pd_loop_t *l, void *ud) {
    (void)l;
    rt_http_t *h = ud;
    h->mhd_timer = 0;
    s_run(h);
}

static void s_on_epoll(pd_loop_t *l, void *ud) {
    (void)l;
    s_run(ud);
}

static void s_on_kick(pd_loop_t *l, void *ud) {
    (void)l;
    rt_http_t *h = ud;
    h->kick_timer = 0;
    rt_http_gen_deferred(h);
    s_run(h);
}

void rt_http_kick(rt_http_t *h) {
    if (h->kick_timer || h->is_destroying) return;
    int64_t id = pd_loop_add_timer(h->loop, 0, false, s_on_kick, h);
    h->kick_timer = id > 0 ? id : 0;
}

/* Read deadline: a request's head and body must arrive within connection_timeout_ms of the connection
 * starting to wait for it, however steadily the bytes trickle in. Shutting the socket down (not closing it:
 * MHD owns the fd) makes MHD see EOF and close the connection on its next run. */
static void s_on_sweep(pd_loop_t *l, void *ud) {
    (void)l;
    rt_http_t *h = ud;
    uint64_t now = pd_now_us(), limit_us = (uint64_t)h->p.connection_timeout_ms * 1000u;
    int n_cut = 0;
    for (rt_http_conn_t *hc = h->conns; hc; hc = hc->next) {
        if (!hc->is_reading || hc->is_cut || now - hc->read_start_us <= limit_us) continue;
        int fd = rt_http_conn_fd(hc->conn);
        if (fd >= 0) shutdown(fd, SHUT_RDWR);
        hc->is_cut = true;
        h->n_read_cut++;
        n_cut++;
    }
    if (n_cut) {
        LOG_I("http: cut %d connection(s) that sent no complete request within %" PRId64 " ms", n_cut,
              h->p.connection_timeout_ms);
        rt_http_kick(h);
    }
    rt_http_gen_sweep(h, now);
}

/* ---- create / destroy ---- */

static pd_status s_check_params(const rt_http_params_t *p, char *err, size_t err_cap) {
    const char *bad = !p->bind_addr || strlen(p->bind_addr) >= 64 ? "bind_addr"
                      : p->port < 0 || p->port > 65535            ? "port"
                      : p->max_body_bytes < 1                     ? "max_body_bytes"
                      : p->max_header_bytes < 1024                ? "max_header_bytes"
                      : p->connection_timeout_ms < 1              ? "connection_timeout_ms"
                      : p->max_connections < 1                    ? "max_connections"
                      : p->sse_buffer_bytes < 1                   ? "sse_buffer_bytes"
                      : p->sse_keepalive_ms < 1                   ? "sse_keepalive_ms"
                                                                  : NULL;
    if (bad) snprintf(err, err_cap, "http: bad parameter %s", bad);
    return bad ? PD_EINVAL : PD_OK;
}

static pd_status s_start(rt_http_t *h, char *err, size_t err_cap) {
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *v4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&ss;
    unsigned flags = MHD_USE_EPOLL | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
    if (inet_pton(AF_INET, h->bind_addr, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons((uint16_t)h->p.port);
    } else if (inet_pton(AF_INET6, h->bind_addr, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons((uint16_t)h->p.port);
        flags |= MHD_USE_IPv6;
    } else {
        snprintf(err, err_cap, "http: bind address '%s' is not an IPv4 or IPv6 address", h->bind_addr);
        return PD_EINVAL;
    }
    /* MHD's timeout is in whole seconds of inactivity; the read deadline (s_on_sweep) is the precise one. */
    unsigned timeout_s = (unsigned)((h->p.connection_timeout_ms + 999) / 1000);
    h->mhd_err[0] = '\0';
    h->d = MHD_start_daemon(flags, (uint16_t)h->p.port, NULL, NULL, s_access, h,               //
                            MHD_OPTION_EXTERNAL_LOGGER, s_mhd_log, h,                          //
                            MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,                      //
                            MHD_OPTION_CONNECTION_MEMORY_LIMIT, (size_t)h->p.max_header_bytes, //
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)h->p.max_connections,       //
                            MHD_OPTION_CONNECTION_TIMEOUT, timeout_s,                          //
                            MHD_OPTION_NOTIFY_COMPLETED, s_completed, h,                       //
                            MHD_OPTION_NOTIFY_CONNECTION, s_connection, h,                     //
                            MHD_OPTION_END);
    if (!h->d) {
        snprintf(err, err_cap, "http: cannot listen on %s:%" PRId32 ": %s", h->bind_addr, h->p.port,
                 h->mhd_err[0] ? h->mhd_err : "libmicrohttpd refused to start");
        return PD_EIO;
    }
    const union MHD_DaemonInfo *port = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_BIND_PORT);
    const union MHD_DaemonInfo *efd = MHD_get_daemon_info(h->d, MHD_DAEMON_INFO_EPOLL_FD);
    if (!port || !efd || efd->epoll_fd < 0) {
        snprintf(err, err_cap, "http: libmicrohttpd gives no port or epoll fd");
        return PD_EIO;
    }
    h->port = port->port;
    h->epoll_fd = efd->epoll_fd;
    return PD_OK;
}

rt_http_t *rt_http_create(pd_loop_t *loop, rt_core_t *core, const rt_http_params_t *p, char *err, size_t err_cap) {
    char dummy[8];
    if (!err || !err_cap) err = dummy, err_cap = sizeof dummy;
    err[0] = '\0';
    if (!loop || !core || !p) {
        snprintf(err, err_cap, "http: NULL argument");
        return NULL;
    }
    if (s_check_params(p, err, err_cap) != PD_OK) return NULL;
    rt_http_t *h = calloc(1, sizeof *h);
    if (!h) {
        snprintf(err, err_cap, "http: out of memory");
        return NULL;
    }
    h->loop = loop;
    h->core = core;
    h->p = *p;
    snprintf(h->bind_addr, sizeof h->bind_addr, "%s", p->bind_addr);
    h->p.bind_addr = h->bind_addr;
    h->epoll_fd = -1;
    h->created = (int64_t)time(NULL);
    h->models[0] = rt_core_model_id(core);
    /* Limits the parser checks before the core sees anything: lengths against the model's context. */
    h->lim = rt_openai_limits_default();
    h->lim.max_body_bytes = (size_t)p->max_body_bytes;
    h->lim.models = h->models;
    h->lim.n_models = 1;
    h->lim.completion_max_tokens = p->completion_max_tokens;
    const eng_tok_t *tok = rt_core_tokenizer(core);
    h->lim.api.vocab_size = tok ? eng_tok_vocab_size(tok) : 0;
    int32_t n_ctx = rt_core_max_context(core);
    if (n_ctx > 0) h->lim.api.max_prompt_tokens = h->lim.api.max_tokens = (uint32_t)n_ctx;
    if (s_start(h, err, err_cap) != PD_OK) goto fail;
    if (pd_loop_add_fd(loop, h->epoll_fd, ZMQ_POLLIN, s_on_epoll, h) != PD_OK) {
        snprintf(err, err_cap, "http: cannot watch the epoll fd");
        h->epoll_fd = -1;
        goto fail;
    }
    int64_t tick =
        h->p.connection_timeout_ms < h->p.sse_keepalive_ms ? h->p.connection_timeout_ms : h->p.sse_keepalive_ms;
    tick = tick / 4 < 20 ? 20 : tick / 4 > 1000 ? 1000 : tick / 4;
    h->sweep_timer = pd_loop_add_timer(loop, tick, true, s_on_sweep, h);
    if (h->sweep_timer <= 0) {
        snprintf(err, err_cap, "http: cannot add a timer");
        h->sweep_timer = 0;
        goto fail;
    }
    s_run(h);
    LOG_I("http: listening on %s:%" PRId32 " (max body %" PRId64 " B, head %" PRId64 " B, %" PRId64
          " connections, read timeout %" PRId64 " ms, SSE buffer %" PRId64 " B, keep-alive %" PRId64 " ms)",
          h->bind_addr, h->port, p->max_body_bytes, p->max_header_bytes, p->max_connections, p->connection_timeout_ms,
          p->sse_buffer_bytes, p->sse_keepalive_ms);
    return h;
fail:
    rt_http_destroy(&h);
    return NULL;
}

void rt_http_destroy(rt_http_t **hp) {
    if (!hp || !*hp) return;
    rt_http_t *h = *hp;
    h->is_destroying = true;
    if (h->epoll_fd >= 0) pd_loop_remove_fd(h->loop, h->epoll_fd);
    pd_loop_cancel_timer(h->loop, h->mhd_timer);
    pd_loop_cancel_timer(h->loop, h->sweep_timer);
    pd_loop_cancel_timer(h->loop, h->kick_timer);
    if (h->d) {
        /* MHD must not be stopped with suspended connections: answer and resume them all first, let MHD take
         * the resumes in, then stop (which completes every request and closes every connection). */
        rt_http_gen_shutdown(h);
        h->is_in_mhd = true;
        MHD_run(h->d);
        MHD_stop_daemon(h->d);
        h->d = NULL;
    }
    PD_ASSERT(!h->gens); /* MHD completed every request it had */
    while (h->conns) {
        rt_http_conn_t *next = h->conns->next;
        free(h->conns);
        h->conns = next;
    }
    free(h);
    *hp = NULL;
}

int32_t rt_http_port(const rt_http_t *h) {
    return h ? h->port : -1;
}

int32_t rt_http_n_active(const rt_http_t *h) {
    return h ? h->n_gens : 0;
}
