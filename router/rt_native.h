/* rt_native.h: the router's native API: protobuf over ZeroMQ. A ROUTER socket for DEALER clients; each
 * client message is one frame, a packed pdserve.v1.ClientMessage (proto/pdserve_api.proto) holding either a
 * GenerateRequest (request_id chosen by the client, unique per connection) or a CancelRequest (the client's
 * request_id); the router answers with frames of one packed ResponseChunk each, carrying the client's
 * request_id: one per decode step when stream is true, one at the end otherwise. Every failure, including a
 * malformed message, is a ResponseChunk with FINISH_ERROR and error set (request_id 0 when it could not be
 * read). A client that goes away (a send to it fails) has its requests cancelled.
 * Thread: the router's loop thread. */
#ifndef RT_NATIVE_H
#define RT_NATIVE_H

#include <stdint.h>

#include "pd_loop.h"
#include "rt_core.h"

typedef struct rt_native rt_native_t;

typedef struct {
    const char *endpoint;       /* bind address, e.g. "tcp://127.0.0.1:5551" */
    int64_t max_message_bytes;  /* ZMQ_MAXMSGSIZE (default PB_CAP_REQUEST_BYTES-ish, 4 MiB) */
    int64_t heartbeat_ivl_ms;   /* ZMTP heartbeats; a silent client is dropped after 3x (default 1000) */
    int64_t max_client_pending; /* undelivered chunks per client before its requests are cut (default 10000) */
} rt_native_params_t;

rt_native_params_t rt_native_params_default(void);

/* Binds and watches the socket on loop. NULL + reason in err. core, loop, zmq_ctx borrowed. */
rt_native_t *rt_native_create(pd_loop_t *loop, void *zmq_ctx, rt_core_t *core, const rt_native_params_t *p, char *err,
                              size_t err_cap);
/* Abandons its requests in core, closes the socket; accepts NULL; sets *n to NULL. */
void rt_native_destroy(rt_native_t **n);
const char *rt_native_endpoint(const rt_native_t *n); /* as bound (port 0 resolved) */

#endif
