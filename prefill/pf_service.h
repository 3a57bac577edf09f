/* pf_service.h: the prefill worker's control plane around pf_exec. A DEALER socket (routing id = worker id) to
 * the router's control ROUTER: WorkerRegister with this worker's fingerprint, heartbeats with load, then
 * PrefillRequest (queued into pf_exec) and Cancel; every request that ends here without reaching decode is
 * answered with one RequestFailed. Re-registers when the router is silent (it may have restarted), cancels
 * everything when it is gone, and drains on request (pf_service_drain, from the signal handler).
 * Protocol: proto/pdserve_control.proto (end of file). Does not parse config or print (main does).
 * Thread: everything runs on the loop thread; pf_service_* are called from it (main, loop handlers). */
#ifndef PF_SERVICE_H
#define PF_SERVICE_H

#include <stdbool.h>
#include <stdint.h>

#include "eng.h"
#include "pd_common.h"
#include "pd_loop.h"
#include "pf_exec.h"

typedef struct pf_service pf_service_t;

typedef struct {
    eng_t *eng;                   /* borrowed, outlives the service */
    pd_loop_t *loop;              /* borrowed: sockets, timers */
    void *zmq_ctx;                /* borrowed */
    const char *router_endpoint;  /* the router's control socket (default "tcp://127.0.0.1:5550") */
    const char *worker_id;        /* routing id, WorkerRegister.worker_id: 1..PB_MAX_ID_BYTES printable ASCII, no
                                    spaces (default "prefill-0") */
    int32_t step_tokens;          /* tokens per step (default 2048; lowered to the engine's max_batch_tokens) */
    int32_t chunk_tokens;         /* a prompt's share of a step before the next prompt's (default 512) */
    int32_t max_step_seqs;        /* prompts per step (default 256; at most the engine's max_batch_seqs) */
    int32_t max_queued;           /* queued prompts; one more is ERR_RESOURCE_EXHAUSTED (default 256) */
    int32_t kv_conns;             /* connections per decode worker (default 1) */
    bool is_kv_stream;            /* KV layers sent as the prompt's last step stores them (default true) */
    const char *kv_pool_shm_name; /* pf_exec_params_t.kv_pool_shm_name (default NULL) */
    bool is_kv_device;            /* pf_exec_params_t.is_kv_device (default true) */
    int32_t heartbeat_ivl_ms;     /* until the router's WorkerRegistered names one (default 250) */
    int64_t drain_timeout_ms;     /* pf_service_drain: in-flight work may finish this long (default 30000) */
    /* Called on the loop thread each time the router accepts a registration that was not in force. */
    void (*on_registered)(void *ud);
    void *ud;
} pf_service_params_t;

pf_service_params_t pf_service_params_default(void);

/* Creates the executor (scheduler, engine thread), connects the control socket and sends the first
 * WorkerRegister (retried until the router answers). NULL with one line in err on failure. */
pf_service_t *pf_service_create(const pf_service_params_t *p, char *err, size_t err_cap);
/* Closes the control socket (bounded linger) and destroys the executor (waits for a running step, frees
 * every block). Sends nothing. Accepts NULL; sets *s to NULL. */
void pf_service_destroy(pf_service_t **s);

/* First call: new PrefillRequests are refused (ERR_UNAVAILABLE "draining"), held ones go on for up to
 * drain_timeout_ms, then the rest are cancelled with ERR_UNAVAILABLE; pd_loop_stop once nothing is held (or
 * a few seconds after the cancel). A second call cancels the rest at once. */
void pf_service_drain(pf_service_t *s);

/* The router answered a registration with an error (logged): the loop was stopped; main exits 1. */
bool pf_service_is_refused(const pf_service_t *s);
bool pf_service_is_registered(const pf_service_t *s);

typedef struct {
    pf_exec_stats_t exec;
    uint64_t n_registers, n_heartbeats, n_requests, n_refused, n_cancels;
    uint64_t n_send_failed; /* messages to the router that could not be queued (no connection, full pipe) */
} pf_service_stats_t;

void pf_service_stats(const pf_service_t *s, pf_service_stats_t *out);

#endif
