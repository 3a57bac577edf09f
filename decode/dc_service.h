/* dc_service.h: the decode worker's service around dc_sched and dc_exec. A DEALER socket (routing id = worker
 * id) to the router's control ROUTER: WorkerRegister (role DECODE, fingerprint, the KV receiver's endpoint),
 * heartbeats with load, then DecodeRequest (reserve blocks -> DecodeReserved), Cancel, and one ResponseChunk
 * per scheduler event back. A kvtransfer receiver fills the reserved blocks (prefill's KV) and commits each
 * request with its first token; local-prefill requests go straight to the scheduler.
 *
 * Every request ends exactly once for the router (one chunk with a finish reason), and every block is freed
 * however it ends. A request cancelled (or past its deadline) while its transfer is in progress gets its last
 * chunk at once, but its blocks stay reserved until the receiver lets go of them (FAILED or COMMITTED), so a
 * late payload can never land in a block that already belongs to another request.
 *
 * Router liveness: the router answers every heartbeat. 5 heartbeats unanswered (5 intervals of silence,
 * counted in heartbeats so that a pause of this loop is not taken for the router's): register again (it may
 * have restarted; a router that re-registers us forgets our requests, so the ones held then end). 10
 * unanswered: cancel everything (nobody listens). Protocol: proto/pdserve_control.proto (end of file).
 * Does not parse config or print (main does). Thread: everything runs on the loop thread. */
#ifndef DC_SERVICE_H
#define DC_SERVICE_H

#include <stdbool.h>
#include <stdint.h>

#include "dc_exec.h"
#include "dc_sched.h"
#include "eng.h"
#include "kvt.h"
#include "pd_common.h"
#include "pd_loop.h"

typedef struct dc_service dc_service_t;

typedef struct {
    eng_t *eng;                   /* borrowed, outlives the service; KV pool in host memory (CPU backend) */
    pd_loop_t *loop;              /* borrowed: sockets, the engine fd, timers */
    void *zmq_ctx;                /* borrowed */
    const char *router_endpoint;  /* the router's control socket (default "tcp://127.0.0.1:5550") */
    const char *worker_id;        /* routing id, WorkerRegister.worker_id: 1..PB_MAX_ID_BYTES printable ASCII, no
                                     spaces (default "decode-0") */
    const char *kv_bind;          /* the KV receiver's bind endpoint (default "tcp://127.0.0.1:0": any free port;
                                     the one bound is advertised) */
    int32_t max_batch;            /* decode rows per step (default 64) */
    int32_t max_seqs;             /* requests held at once, any state (default 256) */
    int32_t prefill_chunk_tokens; /* local-prefill tokens per step (default 256; 0 = local prefill refused) */
    int32_t heartbeat_ivl_ms;     /* until the router's WorkerRegistered names one (default 250) */
    int64_t drain_timeout_ms;     /* dc_service_drain: held requests may finish this long (default 30000) */
    bool is_kv_device;            /* copy KV device to device from prefill workers whose GPU pool the engine can map
                                     (eng_kv_peer_open: CUDA IPC, same GPU), instead of through host memory
                                     (default true) */
    /* speculative decoding (dc_spec.h); spec_k etc. as in dc_sched_params_t (0 = that default) */
    dc_spec_mode_t spec; /* DC_SPEC_OFF (default) */
    int32_t spec_k, ngram_min, ngram_max, spec_max_step_drafts, draft_catchup_tokens;
    int32_t ngram_short_k; /* as dc_sched_params_t's (0: none, its default) */
    bool spec_fixed_k;
    eng_t *draft_eng; /* DC_SPEC_DRAFT: the draft model (borrowed, outlives the service) */
    /* Called on the loop thread each time the router accepts a registration that was not in force. */
    void (*on_registered)(void *ud);
    void *ud;
} dc_service_params_t;

dc_service_params_t dc_service_params_default(void);

/* Checks params against the engine (max_batch + prefill_chunk_tokens <= its max_batch_tokens; the caller
 * keeps max_batch + dc_sched_params_default().max_prefill_seqs within the engine's max_batch_seqs), creates the scheduler, the executor (engine thread) and the
 * KV receiver (bound), connects the control socket and sends the first WorkerRegister (retried until the
 * router answers). NULL with one line in err on failure (bad params, address in use, ...). */
dc_service_t *dc_service_create(const dc_service_params_t *p, char *err, size_t err_cap);
/* Closes the KV receiver (its transfers end), waits for a running step, frees every block, closes the control
 * socket (bounded linger). Sends nothing. Accepts NULL; sets *s to NULL. */
void dc_service_destroy(dc_service_t **s);

/* First call: new DecodeRequests are refused (ERR_UNAVAILABLE "draining"), held ones go on for up to
 * drain_timeout_ms, then the rest end with ERR_UNAVAILABLE; pd_loop_stop once nothing is held. A second call
 * ends the rest at once. */
void dc_service_drain(dc_service_t *s);

/* The router answered a registration with an error (logged): the loop was stopped; main exits 1. */
bool dc_service_is_refused(const dc_service_t *s);
bool dc_service_is_registered(const dc_service_t *s);
/* The KV receiver's bound endpoint (what WorkerRegister.kv_endpoint advertises). */
const char *dc_service_kv_endpoint(const dc_service_t *s);

typedef struct {
    dc_sched_stats_t sched;
    dc_exec_stats_t exec;
    kvt_stats_t kv;
    int32_t n_requests_held; /* requests the router still waits on */
    int32_t n_abandoned;     /* ended for the router, blocks still with an unfinished transfer */
    uint64_t n_registers, n_heartbeats, n_requests, n_refused, n_cancels, n_chunks;
    uint64_t n_bad_messages; /* from the router: malformed or unexpected */
    uint64_t n_send_failed;  /* messages to the router that could not be queued (no connection, full pipe) */
} dc_service_stats_t;

void dc_service_stats(const dc_service_t *s, dc_service_stats_t *out);

#endif
