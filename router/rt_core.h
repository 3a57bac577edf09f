/* rt_core.h: the router's core, independent of any front end. It owns the control socket the workers
 * connect to (registry fed by registration and heartbeats, fingerprint check), and the life of every
 * request: tokenize / apply the chat template, check lengths, pick a decode worker (most free KV blocks
 * among healthy ones) and a prefill worker (shortest queue), dispatch (proto/pdserve_control.proto describes
 * the exchange), relay the decode worker's chunks to the front end, cancel on every worker holding a request
 * when its front end goes away or its deadline passes, and end every request exactly once.
 * Front ends (rt_http.c for OpenAI HTTP, rt_native.c for protobuf over ZeroMQ) hand it validated
 * GenerateRequests and get ResponseChunks back through a callback.
 * Thread: everything runs on the router's loop thread (the pd_loop_t given at create). */
#ifndef RT_CORE_H
#define RT_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_chat.h"
#include "eng_tok.h"
#include "pb.h"
#include "pd_loop.h"

typedef struct rt_core rt_core_t;
typedef struct rt_req rt_req_t;

typedef struct {
    const char *model_path;       /* GGUF: tokenizer, chat template, model id, context length */
    const char *model_id;         /* served id; NULL or "" = the GGUF's general.name */
    const char *control_endpoint; /* ROUTER bind for workers, e.g. "tcp://127.0.0.1:5550" */
    int64_t heartbeat_ivl_ms;     /* asked of workers (default 250) */
    int64_t worker_timeout_ms;    /* silent this long = out of rotation, its requests fail (default 2000) */
    int64_t request_timeout_ms;   /* deadline of a request that names none (default 600000) */
    int64_t max_inflight;         /* requests held at once; one more is ERR_RESOURCE_EXHAUSTED (default 1024) */
    int64_t local_prefill_tokens; /* prompts of at most this many tokens are prefilled on the decode worker
                                      (0 = never, unless no prefill worker is registered) */
    int64_t min_prefill_workers;  /* rt_core_is_ready needs this many prefill workers (default 1) */
    int64_t min_decode_workers;   /* ... and this many decode workers (default 1) */
} rt_core_params_t;

rt_core_params_t rt_core_params_default(void);

/* Loads the tokenizer side of the model (pd_engine_core only), binds the control socket, adds it and the
 * core's timers to loop. NULL + one line in err on failure. loop and zmq_ctx are borrowed. */
rt_core_t *rt_core_create(pd_loop_t *loop, void *zmq_ctx, const rt_core_params_t *p, char *err, size_t err_cap);
/* Ends every request still held (a final ERR_UNAVAILABLE chunk to its front end), tells the workers to
 * cancel, closes the socket, frees; accepts NULL; sets *c to NULL. */
void rt_core_destroy(rt_core_t **c);

const char *rt_core_model_id(const rt_core_t *c);
/* The control endpoint as bound (port 0 resolved), e.g. for the ready line. */
const char *rt_core_control_endpoint(const rt_core_t *c);
const eng_tok_t *rt_core_tokenizer(const rt_core_t *c); /* for logprob token text */
int32_t rt_core_max_context(const rt_core_t *c);

/* Chunks of one request, in order, on the loop thread, never from inside rt_core_submit. The first carries
 * the seed in use; the last has finish_reason != FINISH_NONE (FINISH_ERROR with error set for every failure:
 * deadline, worker lost, no KV capacity anywhere) and usage (prompt_tokens, completion_tokens). chunk is
 * borrowed for the call (copy what you keep). request_id in it is the core's id (rt_req_id). After the last
 * chunk the handle is freed: do not use it again. */
typedef void (*rt_chunk_fn)(void *ud, const Pdserve__V1__ResponseChunk *chunk);

/* Takes ownership of *req (sets it to NULL; it must have passed pb_validate_generate_request, and be allocated
 * the way protobuf-c's default allocator does, as rt_openai_parse_* and pb_unpack_* with a NULL or malloc-backed
 * allocator make it: the core frees it with pb_free_generate_request(req, NULL)), tokenizes,
 * checks lengths (prompt < context; prompt + max_tokens <= context, 0 = the rest of the context), picks
 * workers and dispatches. Returns the request's handle, or NULL with *code and msg set (nothing kept):
 * ERR_INVALID_ARGUMENT (prompt too long, empty after templating, chat without a template, token id out of
 * range), ERR_NOT_FOUND (model is not ours), ERR_RESOURCE_EXHAUSTED (max_inflight reached),
 * ERR_UNAVAILABLE (not ready: no decode / prefill worker, or draining). */
rt_req_t *rt_core_submit(rt_core_t *c, Pdserve__V1__GenerateRequest **req, rt_chunk_fn fn, void *ud,
                         Pdserve__V1__ErrorCode *code, char *msg, size_t msg_cap);

uint64_t rt_req_id(const rt_req_t *r);
uint32_t rt_req_prompt_tokens(const rt_req_t *r);

/* The front end is gone (client disconnected, stream cut): the request is cancelled on every worker holding
 * it (their blocks freed within a step), fn is never called again, and the handle is freed now. */
void rt_core_abandon(rt_core_t *c, rt_req_t *r);

/* At least min_prefill_workers prefill and min_decode_workers decode workers are registered and alive, and
 * the core is not draining. */
bool rt_core_is_ready(const rt_core_t *c);
/* From now on new requests are refused (ERR_UNAVAILABLE "shutting down"); held ones go on. */
void rt_core_drain(rt_core_t *c);
int32_t rt_core_n_inflight(const rt_core_t *c);

/* Prometheus text exposition of the core's metrics (requests by outcome, TTFT and inter-token latency
 * histograms, in-flight count, per-worker queue depth / running / KV blocks used and free from heartbeats,
 * KV bytes sent / received, workers by role and state). malloc'd, caller frees; NULL when out of memory. */
char *rt_core_metrics(const rt_core_t *c, size_t *len);

#endif
