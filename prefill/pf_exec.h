/* pf_exec.h: the prefill service's executor. Drives pf_sched on the service loop: runs each step plan on the
 * engine thread (eng_async), hands every prefilled prompt's KV blocks and first token to the decode worker the
 * request names (kvtransfer, one cached kvt_sender per decode endpoint), and keeps the blocks pinned until the
 * transfer is released. Knows nothing of the router: every request that ends without reaching decode is
 * reported once through the on_fail callback (the service turns it into RequestFailed); success is silent
 * (the decode worker streams the tokens).
 *
 * Request life here: submitted (pf_sched QUEUED / PREFILLING) -> the step with the prompt's final chunk:
 * transfer started (the decode worker reserves its blocks) and each layer sent as the forward stores it (streamed;
 * is_kv_stream) -> READY: committed with the first token (packed pdserve.v1.TokenLogprob as commit info) -> DONE
 * -> RELEASED: blocks back to the pool. Every path out (cancel, deadline, failed step, failed transfer, lost
 * connection, destroy) frees the request's blocks exactly once and calls on_fail at most once.
 *
 * Thread: one thread (the loop's) calls everything and runs every callback; nothing here blocks it, except
 * pf_exec_destroy (waits for a running step and for ZeroMQ to drop in-flight KV frames). */
#ifndef PF_EXEC_H
#define PF_EXEC_H

#include <stdbool.h>
#include <stdint.h>

#include "eng.h"
#include "eng_sample.h"
#include "kvt.h"
#include "pb.h"
#include "pd_common.h"
#include "pd_loop.h"
#include "pf_sched.h"

typedef struct pf_exec pf_exec_t;

/* A request ended on this worker without reaching decode. msg is one line, borrowed for the call. Called on
 * the loop thread, from loop handlers and from inside pf_exec_submit / pf_exec_cancel_all (a submit may run a
 * plan that expires others); it may only send a message: no pf_exec_* call from inside. */
typedef void (*pf_exec_fail_fn)(void *ud, uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg);

typedef struct {
    eng_t *eng;                    /* borrowed; its KV pool must be in host memory (eng_kv_host_base, CPU backend) */
    pd_loop_t *loop;               /* borrowed: the engine fd, sender sockets and timers are watched here */
    void *zmq_ctx;                 /* borrowed: kvt senders' sockets */
    pf_sched_params_t sched;       /* step_tokens, max_chunk_tokens, max_step_seqs, max_queued, max_active; the
                                engine fields (pool, sizes) are filled from eng */
    const char *worker_id;         /* for logs and as the kvt sender id (copied) */
    int32_t kv_conns;              /* connections per decode peer (1..KVT_MAX_CONNS, default 1) */
    kvt_fingerprint_t fingerprint; /* this worker's (pf_exec_fingerprint) */
    int32_t idle_sender_ms;        /* a sender without transfers this long is closed (default 60000) */
    bool is_kv_stream; /* start a prompt's transfer with its final chunk's step and send each layer's KV as the
                          forward stores it (default true); false: start it once the prompt is done */
    /* The shared-memory object that holds eng_kv_host_base (kvt_shm_alloc as the engine's kv_host_alloc), offered to
     * decode workers on this host so they copy the KV straight from it (borrowed; NULL: sockets carry the KV) */
    const char *kv_pool_shm_name;
    /* Offer decode workers on the same GPU the pool's device memory (eng_kv_export: CUDA IPC), so they copy the KV
     * device to device as layers are ready (default true; nothing to offer on the CPU backend) */
    bool is_kv_device;
    pf_exec_fail_fn on_fail;
    void *ud;
} pf_exec_params_t;

pf_exec_params_t pf_exec_params_default(void);

/* This worker's fingerprint from the engine: model_id = general.name, weights_hash = eng_model_identity_hash,
 * tokenizer_hash = eng_tok_hash, the KV layout (dtype, block_size, n_layers, n_kv_heads, head_dim) and RoPE.
 * Any thread that may use e. */
void pf_exec_fingerprint(eng_t *e, kvt_fingerprint_t *out);

/* Creates the scheduler and the engine thread and watches the engine's completion fd on loop. NULL with one
 * line in err on bad params (or a backend without a host KV pool). */
pf_exec_t *pf_exec_create(const pf_exec_params_t *p, char *err, size_t err_cap);
/* Waits for a running step, closes every sender (bounded wait for in-flight frames), frees every block
 * still held, stops watching; no callbacks. Accepts NULL; sets *x to NULL. */
void pf_exec_destroy(pf_exec_t **x);

typedef struct {
    uint64_t req_id;
    const int32_t *tokens; /* (n_tokens) borrowed for the call */
    int32_t n_tokens;
    eng_sampling_t sampling;     /* for the first token */
    uint32_t timeout_ms;         /* time left until the deadline; 0 = none */
    const char *decode_id;       /* the decode worker's id, for logs and messages (copied) */
    const char *decode_endpoint; /* its KV receiver (copied) */
} pf_exec_req_t;

/* Queues a prompt (a step starts at once when the engine is idle). PD_OK; PD_EAGAIN: the queue is full
 * (nothing kept; err says "prefill queue full (N queued)"); PD_EINVAL: bad request, err says why. on_fail is
 * never called for r itself: on error the caller answers. */
PD_NODISCARD pd_status pf_exec_submit(pf_exec_t *x, const pf_exec_req_t *r, char *err, size_t err_cap);

/* The router gave req_id up: it ends without a callback, in whatever state (its blocks are freed now, at
 * the end of the running step, or when its cancelled transfer is released). Unknown ids are ignored. */
void pf_exec_cancel(pf_exec_t *x, uint64_t req_id);
/* Cancels every request. is_notify: on_fail(code, msg) for each first (the router still waits for them);
 * false when the router is gone. */
void pf_exec_cancel_all(pf_exec_t *x, bool is_notify, Pdserve__V1__ErrorCode code, const char *msg);

/* No request held, no step running, no transfer unreleased. */
bool pf_exec_is_idle(const pf_exec_t *x);

typedef struct {
    pf_sched_stats_t sched;
    int32_t n_requests;       /* held in any state */
    int32_t n_senders;        /* open decode connections */
    int32_t n_transfers;      /* started, not yet released */
    uint64_t kv_bytes_sent;   /* payload bytes over every sender, closed ones included */
    uint64_t kv_bytes_shm;    /* of kv_bytes_sent, those a same-host receiver copied from the shared pool */
    uint64_t kv_bytes_device; /* ... and those a receiver on the same GPU copied device to device */
    uint64_t n_failed;        /* on_fail calls */
    uint64_t n_streamed;      /* transfers started with their final chunk's step */
    uint64_t n_layers_early;  /* layers of streamed transfers marked ready before their step ended */
    /* Delivered transfers' tail: from the moment the loop saw their whole KV ready (the forward's last layer stored,
     * seen on the 1 ms tick; else the step's end) to the decode worker's commit (DONE). */
    uint64_t n_kv_tails, kv_tail_us_sum, kv_tail_us_max;
} pf_exec_stats_t;

void pf_exec_stats(const pf_exec_t *x, pf_exec_stats_t *out);

#endif
