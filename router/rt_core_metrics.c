/* rt_core_metrics.c: the core's counters as Prometheus text exposition (format 0.0.4). Only formatting: the
 * counters are kept where things happen (rt_core.c, rt_registry.c). */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "rt_core_int.h"

/* TTFT spans queueing + prefill + transfer (ms to tens of s); inter-token gaps are one decode step (ms). */
const double rt_ttft_bounds[RT_N_TTFT_BUCKETS] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120};
const double rt_itl_bounds[RT_N_ITL_BUCKETS] = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5};

typedef struct {
    char *p;
    size_t len, cap;
    bool is_oom;
} s_buf_t;

static void PD_PRINTF(2, 3) s_put(s_buf_t *b, const char *fmt, ...) {
    if (b->is_oom) return;
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
        if (n < 0) {
            b->is_oom = true;
            return;
        }
        if ((size_t)n < b->cap - b->len) {
            b->len += (size_t)n;
            return;
        }
        size_t cap = 2 * b->cap + (size_t)n;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->is_oom = true;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
}

static void s_head(s_buf_t *b, const char *name, const char *type, const char *help) {
    s_put(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void s_histogram(s_buf_t *b, const char *name, const char *help, const double *bounds, int n_bounds,
                        const uint64_t *buckets, uint64_t count, double sum) {
    s_head(b, name, "histogram", help);
    uint64_t cum = 0;
    for (int i = 0; i < n_bounds; i++) {
        cum += buckets[i];
        s_put(b, "%s_bucket{le=\"%g\"} %llu\n", name, bounds[i], (unsigned long long)cum);
    }
    s_put(b, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.6f\n%s_count %llu\n", name, (unsigned long long)count, name, sum,
          name, (unsigned long long)count);
}

static const char *s_role_name(Pdserve__V1__WorkerRole role) {
    switch (role) {
    case PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL: return "prefill";
    case PDSERVE__V1__WORKER_ROLE__ROLE_DECODE: return "decode";
    case PDSERVE__V1__WORKER_ROLE__ROLE_BOTH: return "both";
    default: return "unknown";
    }
}

/* Worker ids are printable ASCII (pb_validate_worker_register); a label value still escapes \ and ". */
static void s_label(char *dst, size_t cap, const char *s) {
    size_t n = 0;
    for (; *s && n + 3 < cap; s++) {
        if (*s == '\\' || *s == '"') dst[n++] = '\\';
        dst[n++] = *s;
    }
    dst[n] = '\0';
}

static void s_workers(s_buf_t *b, const rt_core_t *c) {
    static const Pdserve__V1__WorkerRole roles[] = {PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL,
                                                    PDSERVE__V1__WORKER_ROLE__ROLE_DECODE,
                                                    PDSERVE__V1__WORKER_ROLE__ROLE_BOTH};
    s_head(b, "pdserve_workers", "gauge", "Registered workers by role and state (lost: silent past worker_timeout).");
    for (int k = 0; k < 3; k++) {
        int n_alive = 0, n_lost = 0;
        for (int i = 0; i < RT_MAX_WORKERS; i++) {
            const rt_worker_t *w = &c->workers[i];
            if (!w->is_used || w->role != roles[k]) continue;
            if (w->is_alive)
                n_alive++;
            else
                n_lost++;
        }
        s_put(b, "pdserve_workers{role=\"%s\",state=\"alive\"} %d\n", s_role_name(roles[k]), n_alive);
        s_put(b, "pdserve_workers{role=\"%s\",state=\"lost\"} %d\n", s_role_name(roles[k]), n_lost);
    }
    static const struct {
        const char *name, *type, *help;
    } series[] = {
        {"pdserve_worker_up", "gauge", "1 while the worker is in rotation."},
        {"pdserve_worker_queue_depth", "gauge", "Requests waiting on the worker (last heartbeat)."},
        {"pdserve_worker_running_seqs", "gauge", "Sequences the worker is running (last heartbeat)."},
        {"pdserve_worker_kv_blocks_free", "gauge", "Free KV blocks (last heartbeat)."},
        {"pdserve_worker_kv_blocks_total", "gauge", "KV blocks of the worker's pool (last heartbeat)."},
        {"pdserve_worker_kv_bytes_sent_total", "counter", "KV bytes the worker sent (last heartbeat)."},
        {"pdserve_worker_kv_bytes_received_total", "counter", "KV bytes the worker received (last heartbeat)."},
        {"pdserve_worker_requests", "gauge", "Requests of this router the worker holds."},
        {"pdserve_decode_steps_total", "counter", "Decode forwards run (decode workers; last heartbeat)."},
        {"pdserve_decode_rows_total", "counter", "Sequence rows those forwards verified (one per sequence and step)."},
        {"pdserve_decode_tokens_total", "counter", "Tokens those rows emitted (1 per row + accepted drafts)."},
        {"pdserve_spec_rows_total", "counter", "Decode rows that carried speculative drafts."},
        {"pdserve_spec_draft_tokens_total", "counter", "Draft tokens verified (n-gram lookup or draft model)."},
        {"pdserve_spec_accepted_tokens_total", "counter", "Draft tokens accepted by verification."},
    };
    for (size_t s = 0; s < sizeof series / sizeof *series; s++) {
        s_head(b, series[s].name, series[s].type, series[s].help);
        for (int i = 0; i < RT_MAX_WORKERS; i++) {
            const rt_worker_t *w = &c->workers[i];
            if (!w->is_used) continue;
            uint64_t v[] = {w->is_alive,          w->queue_depth,         w->running_seqs,      w->free_kv_blocks,
                            w->total_kv_blocks,   w->kv_bytes_sent,       w->kv_bytes_received, (uint64_t)w->n_reqs,
                            w->decode_steps,      w->decode_rows,         w->decode_tokens,     w->spec_rows,
                            w->spec_draft_tokens, w->spec_accepted_tokens};
            _Static_assert(sizeof v / sizeof *v == sizeof series / sizeof *series, "one value per series");
            char id[2 * PB_MAX_ID_BYTES + 1];
            s_label(id, sizeof id, w->id);
            s_put(b, "%s{worker=\"%s\",role=\"%s\"} %llu\n", series[s].name, id, s_role_name(w->role),
                  (unsigned long long)v[s]);
        }
    }
}

char *rt_core_metrics(const rt_core_t *c, size_t *len) {
    static const char *outcomes[RT_N_OUTCOMES] = {"stop", "length", "error", "cancelled", "rejected"};
    s_buf_t b = {.cap = 8192};
    if (!(b.p = malloc(b.cap))) return NULL;
    b.p[0] = '\0';
    s_head(&b, "pdserve_requests_total", "counter",
           "Requests by outcome (rejected: refused at admission; error: failed after admission).");
    for (int i = 0; i < RT_N_OUTCOMES; i++)
        s_put(&b, "pdserve_requests_total{outcome=\"%s\"} %llu\n", outcomes[i], (unsigned long long)c->n_outcome[i]);
    s_head(&b, "pdserve_request_errors_total", "counter", "Failed or refused requests by error code.");
    for (int code = PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT; code <= PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE;
         code++)
        s_put(&b, "pdserve_request_errors_total{code=\"%s\"} %llu\n", pb_error_code_name((Pdserve__V1__ErrorCode)code),
              (unsigned long long)c->n_errors[code]);
    s_histogram(&b, "pdserve_ttft_seconds", "Time from admission to the first token relayed.", rt_ttft_bounds,
                RT_N_TTFT_BUCKETS, c->ttft_buckets, c->ttft_count, c->ttft_sum);
    s_histogram(&b, "pdserve_itl_seconds", "Gaps between consecutive chunks carrying tokens.", rt_itl_bounds,
                RT_N_ITL_BUCKETS, c->itl_buckets, c->itl_count, c->itl_sum);
    s_head(&b, "pdserve_requests_inflight", "gauge", "Requests held by the router.");
    s_put(&b, "pdserve_requests_inflight %d\n", c->n_inflight);
    s_head(&b, "pdserve_router_late_messages_total", "counter",
           "Worker messages about requests that had already ended (ignored).");
    s_put(&b, "pdserve_router_late_messages_total %llu\n", (unsigned long long)c->n_late_msgs);
    s_head(&b, "pdserve_router_bad_messages_total", "counter", "Malformed or unexpected worker messages (dropped).");
    s_put(&b, "pdserve_router_bad_messages_total %llu\n", (unsigned long long)c->n_bad_msgs);
    s_workers(&b, c);
    if (b.is_oom) {
        free(b.p);
        return NULL;
    }
    if (len) *len = b.len;
    return b.p;
}
