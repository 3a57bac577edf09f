/* rt_core_int.h: what the files of the router's core share (rt_core.c: model, submit, request life;
 * rt_registry.c: control socket, workers, dispatch; rt_core_metrics.c: Prometheus text). Private to
 * router/: never include it from another folder. Thread: the router's loop thread only. */
#ifndef RT_CORE_INT_H
#define RT_CORE_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "rt_core.h"

#define RT_MAX_WORKERS        256 /* registry entries (alive or lost); more registrations are refused */
#define RT_N_TTFT_BUCKETS     14
#define RT_N_ITL_BUCKETS      12
#define RT_WORKER_MSG_CAP     (PB_CAP_RESPONSE_CHUNK_BYTES + 1024u) /* a chunk plus its envelope */
#define RT_DEFAULT_BLOCK_SIZE 16 /* KV block estimate before any worker told us its block size */

/* Outcomes counted in pdserve_requests_total. */
typedef enum {
    RT_OUT_STOP = 0,
    RT_OUT_LENGTH,
    RT_OUT_ERROR,
    RT_OUT_CANCELLED,
    RT_OUT_REJECTED,
    RT_N_OUTCOMES
} rt_outcome_t;

typedef struct rt_worker {
    char id[PB_MAX_ID_BYTES + 1];
    Pdserve__V1__WorkerRole role;
    char kv_endpoint[PB_MAX_ENDPOINT_BYTES + 1];
    char backend[PB_MAX_ID_BYTES + 1];
    bool is_used;  /* the entry holds a worker (alive or lost) */
    bool is_alive; /* registered and heard from within worker_timeout_ms */
    uint64_t last_seen_us;
    /* from the last heartbeat */
    bool has_heartbeat;
    uint32_t queue_depth, running_seqs, free_kv_blocks, total_kv_blocks;
    uint64_t kv_bytes_sent, kv_bytes_received;
    uint64_t decode_steps, decode_rows, decode_tokens, spec_rows, spec_draft_tokens, spec_accepted_tokens;
    /* the router's own load estimate since that heartbeat (reset by each heartbeat) */
    int64_t sent_blocks; /* decode: KV blocks the DecodeRequests sent since may hold (an upper bound) */
    int64_t sent_reqs;   /* prefill: PrefillRequests sent since */
    int32_t n_reqs;      /* requests of ours it holds now */
} rt_worker_t;

typedef enum {
    RT_REQ_RESERVING = 1, /* DecodeRequest sent to r->decode, waiting for DecodeReserved */
    RT_REQ_RUNNING = 2,   /* reserved (and prefill sent unless local): chunks flow from r->decode */
} rt_req_state_t;

struct rt_req {
    rt_core_t *core;
    uint64_t id;
    rt_req_t *hnext; /* hash chain */
    rt_chunk_fn fn;
    void *ud;
    Pdserve__V1__GenerateRequest *gen; /* the client's request (owned): sampling, stop, ignore_eos */
    int32_t *prompt;                   /* (n_prompt) token ids */
    uint32_t n_prompt, max_tokens;     /* max_tokens resolved (>= 1) */
    uint64_t seed;
    uint64_t created_us, deadline_us, last_token_us;
    int64_t timer_id;
    rt_req_state_t state;
    rt_worker_t *decode, *prefill; /* NULL when not (or no longer) involved */
    bool is_local;                 /* prefill_locally: no prefill worker */
    bool has_chunk;                /* a chunk went to the front end (it carried the seed) */
    bool has_token;                /* a chunk with tokens arrived (TTFT taken) */
    bool in_callback, is_abandoned, is_ending;
    bool had_exhausted; /* some decode worker refused for KV capacity */
    uint32_t n_completion;
    int64_t est_blocks;  /* what r->decode's sent_blocks was charged */
    rt_worker_t **tried; /* decode workers asked so far */
    int n_tried, cap_tried;
};

struct rt_core {
    pd_loop_t *loop;
    void *zmq_ctx;
    rt_core_params_t p;
    char *model_path;
    char model_id[PB_MAX_ID_BYTES + 1];
    /* from the GGUF: what workers' fingerprints must match */
    char gguf_name[128];
    int32_t ctx_len, vocab_size, n_layers, n_kv_heads, head_dim, rope_dim;
    float rope_theta;
    eng_tok_t *tok;
    eng_chat_t *chat; /* NULL: the model has no template we render; chat requests are refused */
    char chat_err[160];
    /* the cluster's: set by the first accepted worker, matched by every later one */
    bool has_cluster;
    uint64_t cluster_weights_hash;
    uint32_t cluster_block_size;
    /* control socket and registry */
    void *sock;
    char endpoint[PB_MAX_ENDPOINT_BYTES + 1];
    rt_worker_t *workers; /* (RT_MAX_WORKERS) */
    int64_t check_timer_id;
    uint64_t last_check_us, resumed_us; /* the worker check's last run; when the loop last came back from a stall */
    /* requests by id */
    rt_req_t **buckets;
    uint64_t n_buckets; /* power of two */
    int32_t n_inflight;
    uint64_t id_base, id_next, seed_state;
    bool is_draining;
    /* metrics */
    uint64_t n_outcome[RT_N_OUTCOMES];
    uint64_t n_errors[16]; /* by Pdserve__V1__ErrorCode (0..15) */
    uint64_t ttft_buckets[RT_N_TTFT_BUCKETS + 1], ttft_count;
    double ttft_sum;
    uint64_t itl_buckets[RT_N_ITL_BUCKETS + 1], itl_count;
    double itl_sum;
    uint64_t n_late_msgs, n_bad_msgs;
};

extern const double rt_ttft_bounds[RT_N_TTFT_BUCKETS];
extern const double rt_itl_bounds[RT_N_ITL_BUCKETS];

/* ---- rt_core.c ---- */
rt_req_t *rt_core_req_find(const rt_core_t *c, uint64_t id);
/* Ends r with a FINISH_ERROR chunk (code, message) to its front end and frees it. Does not send cancels. */
void rt_core_req_fail(rt_core_t *c, rt_req_t *r, Pdserve__V1__ErrorCode code, const char *fmt, ...) PD_PRINTF(4, 5);
/* Relays a (validated) chunk of r's decode worker to the front end; a final one ends and frees r. */
void rt_core_req_relay(rt_core_t *c, rt_req_t *r, Pdserve__V1__ResponseChunk *chunk);
/* Ids of every held request involving w (any w when w is NULL): malloc'd, *n set; NULL when none. Callers look
 * each id up again before acting, since ending one request runs front-end code that may end others. */
uint64_t *rt_core_req_ids(const rt_core_t *c, const rt_worker_t *w, int *n);
void rt_core_count_error(rt_core_t *c, Pdserve__V1__ErrorCode code);

/* ---- rt_registry.c ---- */
PD_NODISCARD pd_status rt_registry_open(rt_core_t *c, char *err, size_t err_cap);
void rt_registry_close(rt_core_t *c);
int rt_registry_n_alive(const rt_core_t *c, Pdserve__V1__WorkerRole role);
/* Sends the DecodeRequest of r to the best decode worker it has not tried yet. PD_OK (r is RESERVING on it),
 * PD_EAGAIN (no decode worker left to try). */
PD_NODISCARD pd_status rt_registry_dispatch_decode(rt_core_t *c, rt_req_t *r);
/* Cancel{request_id, reason} to r's workers, except skip; clears r->decode / r->prefill. */
void rt_registry_cancel(rt_core_t *c, rt_req_t *r, Pdserve__V1__ErrorCode reason, const rt_worker_t *skip);
/* Drops r's charge on its workers' load estimates and request counts (the request is ending). */
void rt_registry_detach(rt_core_t *c, rt_req_t *r);

#endif
