/* rt_http_int.h: what the two halves of the HTTP front end share. rt_http.c runs the daemon inside the loop
 * (epoll fd, timers, connections and their read deadlines), routes, answers the small endpoints and keeps the
 * counters; rt_http_gen.c runs the two generation endpoints (body, submit, chunks, SSE). Private to router/.
 * Thread: the router's loop thread, like everything in rt_http. */
#ifndef RT_HTTP_INT_H
#define RT_HTTP_INT_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <microhttpd.h>

#include "rt_http.h"
#include "rt_openai.h"

#define RT_HTTP_MAX_STATUS 600 /* responses are counted per status code below this */

typedef struct rt_http_conn rt_http_conn_t;
typedef struct rt_http_gen rt_http_gen_t;

/* One TCP connection, for the read deadline (MHD only knows idle timeouts, which a client sending one byte
 * per second never trips). MHD's socket context points at it from connect to close. */
struct rt_http_conn {
    struct MHD_Connection *conn;
    uint64_t read_start_us; /* when the connection began waiting for the current request's head and body */
    bool is_reading;        /* between requests, or reading one: the read deadline applies */
    bool is_cut;            /* the deadline passed and its socket was shut down */
    rt_http_conn_t *prev, *next;
};

struct rt_http {
    pd_loop_t *loop;    /* borrowed */
    rt_core_t *core;    /* borrowed */
    rt_http_params_t p; /* p.bind_addr points at bind_addr */
    char bind_addr[64];
    struct MHD_Daemon *d;
    int epoll_fd;        /* MHD's, watched on loop */
    int32_t port;        /* as bound */
    int64_t mhd_timer;   /* one-shot at MHD_get_timeout, 0 when none */
    int64_t sweep_timer; /* read deadlines, SSE keep-alive, vanished clients */
    int64_t kick_timer;  /* one-shot "run MHD now" after resumes from outside MHD_run, 0 when none */
    bool is_in_mhd;      /* inside MHD_run: MHD calls us back, we do not call it again */
    bool is_destroying;
    rt_openai_limits_t lim;
    const char *models[1]; /* rt_core_model_id, borrowed */
    int64_t created;       /* unix seconds at create: "created" of the model list */
    rt_http_conn_t *conns;
    rt_http_gen_t *gens; /* generation requests alive (rt_http_gen.c) */
    int32_t n_gens;
    char mhd_err[256];    /* MHD's last log line (the reason a start failed) */
    uint64_t log_last_us; /* MHD's lines are logged at most once a second ... */
    uint64_t log_n_quiet; /* ... and the ones skipped are counted */
    /* counters */
    uint64_t n_status[RT_HTTP_MAX_STATUS];
    uint64_t n_sse_cut;     /* streams cut because their client read too slowly */
    uint64_t n_client_gone; /* requests abandoned because their client went away */
    uint64_t n_read_cut;    /* connections cut at the read deadline (slow loris) */
    uint64_t n_keepalive;   /* SSE keep-alive comments queued */
    uint64_t bytes_sent;    /* response body bytes handed to MHD */
};

/* ---- rt_http.c, for rt_http_gen.c ---- */

/* A response over body (malloc'd, taken; NULL with len 0 for none) with Content-Type ctype, the request id
 * header when req_id is not 0, and Retry-After: 1 for 429 and 503. NULL when out of memory (body freed). */
struct MHD_Response *rt_http_response(rt_http_t *h, unsigned status, const char *ctype, char *body, size_t len,
                                      const char *req_id);
/* Queues rt_http_response on c and counts it. MHD_NO when MHD refuses (the connection is then closed). */
enum MHD_Result rt_http_reply(rt_http_t *h, struct MHD_Connection *c, unsigned status, const char *ctype, char *body,
                              size_t len, const char *req_id);
/* An OpenAI error body: e's message and code, sent with http_status (which may differ from e->http_status: 413,
 * 415, 405 use ERR_INVALID_ARGUMENT's shape). */
enum MHD_Result rt_http_reply_error(rt_http_t *h, struct MHD_Connection *c, unsigned http_status,
                                    const rt_openai_error_t *e, const char *req_id);
/* Counts a response queued outside rt_http_reply. */
void rt_http_count(rt_http_t *h, unsigned status, size_t n_body_bytes);
/* Makes the loop run MHD on its next pass: after a resume or a queued response from outside MHD_run. */
void rt_http_kick(rt_http_t *h);
/* The connection's socket, -1 if MHD does not say. */
int rt_http_conn_fd(struct MHD_Connection *c);
/* The read deadline of the request on c is over (its head and body are in). */
void rt_http_conn_read_done(struct MHD_Connection *c);

/* ---- rt_http_gen.c ---- */

/* The access handler of POST /v1/completions and /v1/chat/completions, from its first call (*con_cls NULL)
 * to its last. */
enum MHD_Result rt_http_gen_access(rt_http_t *h, struct MHD_Connection *c, rt_openai_endpoint_t ep,
                                   const char *upload_data, size_t *upload_data_size, void **con_cls);
/* MHD is done with the request (answered, failed, client gone, shutdown): abandon it in core if still held,
 * free it. */
void rt_http_gen_completed(rt_http_t *h, rt_http_gen_t *g, enum MHD_RequestTerminationCode toe);
/* Periodic: SSE keep-alive comments, clients that vanished while their connection was suspended. */
void rt_http_gen_sweep(rt_http_t *h, uint64_t now_us);
/* Work deferred out of the core's callback (abandoning a cut stream), run from the kick timer. */
void rt_http_gen_deferred(rt_http_t *h);
/* For destroy: abandons every request in core, answers those still waiting and resumes every connection so
 * that MHD may be stopped. */
void rt_http_gen_shutdown(rt_http_t *h);

#endif
