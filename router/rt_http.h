/* rt_http.h: the router's OpenAI-compatible HTTP front end on libmicrohttpd, run inside the router's loop
 * (MHD's epoll fd watched by pd_loop; no MHD threads): POST /v1/completions, POST /v1/chat/completions
 * (stream true: SSE; false: one JSON body), GET /v1/models, GET /health, GET /metrics. Request bodies are
 * mapped by rt_openai.h, run by rt_core.h. Limits at the door: body cap (413), header memory, connection
 * and read timeouts (slow clients), a bounded SSE buffer per stream (a slow reader is cut off without slowing
 * the others), SSE keep-alive comments. Thread: the router's loop thread.
 *
 * Choices (tests/integration/test_router_http.py checks them):
 *   - A POST body whose Content-Type is not application/json (parameters allowed) is refused with 415 and an
 *     OpenAI error body (vLLM answers 400; 415 names the fix). Content-Length over max_body_bytes: 413 from
 *     the head, before any body byte is read. A chunked body has no length up front and MHD takes no
 *     response mid-body: the rest is read and dropped (not kept) and 413 goes out at its end, or the read
 *     deadline below ends the connection first.
 *   - An oversized request head is answered by MHD itself: 431 (headers) or 414 (request line), with MHD's
 *     HTML body, then the connection is closed.
 *   - connection_timeout_ms is a read deadline, not only an idle timeout: a request's head and body must
 *     arrive within it of the connection starting to wait for that request (slow loris), and an idle
 *     keep-alive connection is closed after it. Waiting for the answer does not count.
 *   - Headers of a generation request wait for its first chunk: a request that fails before its first token
 *     gets its real status (429 / 503 with Retry-After: 1, 504, ...) even when stream is true. A stream whose
 *     first token takes longer than sse_keepalive_ms gets 200 and a keep-alive comment at that point.
 *   - A stream cut for a slow reader, or a client gone, is abandoned in the core at once (the workers free
 *     its blocks); the cut stream ends without [DONE], so the client cannot take it as complete.
 *   - Responses carry X-Request-Id (cmpl-<hex> / chatcmpl-<hex>, the response's id) once the core took the
 *     request. Counters: responses by status, streams cut, clients gone, read deadlines hit, bytes. */
#ifndef RT_HTTP_H
#define RT_HTTP_H

#include <stdbool.h>
#include <stdint.h>

#include "pd_loop.h"
#include "rt_core.h"

typedef struct rt_http rt_http_t;

typedef struct {
    const char *bind_addr;          /* "127.0.0.1" (explicit; "0.0.0.0" only when asked) */
    int32_t port;                   /* 0 = pick a free one (rt_http_port tells which) */
    int64_t max_body_bytes;         /* larger bodies get 413 before parsing (default 4 MiB) */
    int64_t max_header_bytes;       /* per-connection memory for the request line and headers (default 32 KiB) */
    int64_t connection_timeout_ms;  /* idle / slow-loris cut-off (default 30000) */
    int64_t max_connections;        /* (default 1024) */
    int64_t sse_buffer_bytes;       /* unsent SSE bytes per stream before the stream is cut (default 1 MiB) */
    int64_t sse_keepalive_ms;       /* ": keep-alive" comment after this much silence (default 15000) */
    uint32_t completion_max_tokens; /* completions without max_tokens (default 16, OpenAI's) */
} rt_http_params_t;

rt_http_params_t rt_http_params_default(void);

/* Starts the daemon (MHD_USE_EPOLL, external polling) and watches it on loop. NULL + reason in err. */
rt_http_t *rt_http_create(pd_loop_t *loop, rt_core_t *core, const rt_http_params_t *p, char *err, size_t err_cap);
/* Stops accepting, abandons its requests in core, stops the daemon; accepts NULL; sets *h to NULL. */
void rt_http_destroy(rt_http_t **h);
int32_t rt_http_port(const rt_http_t *h);
/* Requests whose response is not finished (for draining). */
int32_t rt_http_n_active(const rt_http_t *h);
/* HTTP-level counters (responses by status, bytes, cut streams) in Prometheus text, malloc'd. */
char *rt_http_metrics(const rt_http_t *h, size_t *len);

#endif
