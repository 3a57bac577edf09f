/* rt_openai.h: the OpenAI-compatible HTTP API of the router as pure functions: JSON request bodies of
 * POST /v1/completions and /v1/chat/completions -> GenerateRequest, and ResponseChunk messages -> JSON
 * response bodies, SSE events, error bodies and the /v1/models list.
 * No sockets, no HTTP framing, no logging, no globals: the HTTP server calls these and writes the bytes.
 * Every function may be called from any thread; an rt_openai_stream_t is used by one thread at a time.
 *
 * Choices where OpenAI, vLLM and our proto differ (each is tested in tests/unit/router/test_rt_openai.c):
 *   - Unknown fields are ignored (clients send many). Known fields that would change the output and that we
 *     do not implement are refused with 400 naming the field: n != 1, best_of != 1, echo, logit_bias,
 *     suffix, tools / tool_choice / functions / function_call, response_format other than text,
 *     prompt_logprobs, min_tokens, stop_token_ids, include_stop_str_in_output, guided_* and
 *     structured_outputs, continue_final_message, add_generation_prompt = false, chat_template,
 *     audio, prediction, modalities other than ["text"]. A JSON null counts as absent everywhere.
 *   - stop: a string or an array of up to PB_MAX_STOP (8) strings (OpenAI allows 4; the engine handles 8).
 *   - Missing temperature means 1 (OpenAI), not the proto's 0 = greedy. top_p = 0 and
 *     repetition_penalty = 0 are refused (on the wire 0 means "unset" = 1, which would silently change
 *     what the client asked for). top_k = -1 means off (vLLM), like 0.
 *   - Completions max_tokens defaults to rt_openai_limits_t.completion_max_tokens (16, as OpenAI);
 *     chat to 0 (up to the context length). Chat prefers max_completion_tokens over max_tokens.
 *   - Chat content given as parts: the text parts are joined with "\n" (as vLLM does); any other part
 *     type (image_url, input_audio, file) is refused. Role "developer" is mapped to "system"; roles
 *     "tool" and "function" are refused.
 *   - Ranges are checked once, by pb_validate_generate_request (proto/pb.h) after the mapping; its
 *     reason is reported with the OpenAI field name as `param`. Values that jansson refuses while parsing
 *     (1e999, integers beyond 64 bits, invalid UTF-8, "\u0000", duplicate keys, nesting deeper than 2048)
 *     are 400 with param null and the parser's reason and position: the field is not known there. */
#ifndef RT_OPENAI_H
#define RT_OPENAI_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pb.h"

#define RT_OPENAI_SSE_DONE      "data: [DONE]\n\n"
#define RT_OPENAI_SSE_KEEPALIVE ": keep-alive\n\n" /* an SSE comment: send every ~15 s of silence */

typedef enum {
    RT_OPENAI_COMPLETIONS = 0, /* POST /v1/completions: object "text_completion", ids "cmpl-<hex>" */
    RT_OPENAI_CHAT = 1,        /* POST /v1/chat/completions: "chat.completion(.chunk)", "chatcmpl-<hex>" */
} rt_openai_endpoint_t;

typedef struct {
    pb_api_limits_t api;       /* ranges of the mapped request, checked by pb_validate_generate_request */
    size_t max_body_bytes;     /* longer bodies are refused before parsing (default 4 MiB) */
    const char *const *models; /* served model ids (borrowed); models[0] is the default for an
                                       empty or missing "model". NULL / 0: any model id is accepted */
    int n_models;
    uint32_t completion_max_tokens; /* completions without max_tokens (default 16, OpenAI's); 0 = up to
                                       the context length */
    uint32_t chat_max_tokens;       /* chat without max_(completion_)tokens (default 0) */
} rt_openai_limits_t;

rt_openai_limits_t rt_openai_limits_default(void);

/* The error to answer with. param is "" when OpenAI's "param" is null. */
typedef struct {
    int http_status;                  /* pb_error_http_status(code): 400, 404, ... */
    Pdserve__V1__ErrorCode code;      /* ERR_INVALID_ARGUMENT, ERR_NOT_FOUND, ... */
    char param[96];                   /* OpenAI field path: "temperature", "messages[1].content[0].type" */
    char message[PB_MAX_ERROR_BYTES]; /* one line */
} rt_openai_error_t;

/* Returns the bytes of a token (not NUL-terminated) in *len, or NULL if unknown. eng_tok_piece fits. */
typedef const char *(*rt_openai_token_text_fn)(void *ud, int32_t token, size_t *len);

/* What a response needs to know about its request. The parsers fill everything above request_id; the
 * caller sets request_id, created and (for logprobs) token_text. Read-only for the response builders. */
typedef struct {
    rt_openai_endpoint_t endpoint;
    char model[PB_MAX_ID_BYTES + 1]; /* the resolved model id (default substituted), echoed as "model" */
    bool is_stream;                  /* "stream": true */
    bool include_usage;              /* stream_options.include_usage: a usage event before [DONE] */
    bool has_logprobs;               /* completions: "logprobs" given (0..5); chat: "logprobs": true */
    int32_t n_top_logprobs;          /* alternatives per token: completions logprobs, chat top_logprobs */
    uint64_t request_id;             /* the response id is "<cmpl|chatcmpl>-<16 hex digits>" */
    int64_t created;                 /* unix seconds */
    /* Text of a sampled token for logprobs (TokenLogprob carries only the id). Tried after the token's own
     * entry among its alternatives, which carries its bytes. NULL, or unknown: "" with "bytes": null. */
    rt_openai_token_text_fn token_text;
    void *token_text_ud;
} rt_openai_ctx_t;

/* ---- requests ----
 * Parse a body of POST /v1/completions (prompt: a string, an array of one string, an array of token ids
 * or an array of one such array) or POST /v1/chat/completions (messages). On PD_OK *out is a new
 * GenerateRequest with request_id 0 (the caller assigns it) that passed pb_validate_generate_request with
 * lim->api; free it with rt_openai_request_free. ctx (may be NULL) gets the response settings; the caller
 * then sets ctx->request_id, created and token_text. On failure *out is NULL, err (may be NULL) says what
 * to answer, and the status is PD_EINVAL (the client's fault, 400 or 404) or PD_ENOMEM (500).
 * PD_EINVAL also for NULL body / lim / out. */
PD_NODISCARD pd_status rt_openai_parse_completion(const char *body, size_t len, const rt_openai_limits_t *lim,
                                                  Pdserve__V1__GenerateRequest **out, rt_openai_ctx_t *ctx,
                                                  rt_openai_error_t *err);
PD_NODISCARD pd_status rt_openai_parse_chat(const char *body, size_t len, const rt_openai_limits_t *lim,
                                            Pdserve__V1__GenerateRequest **out, rt_openai_ctx_t *ctx,
                                            rt_openai_error_t *err);
/* Frees a request made by the parsers (NULL or *req == NULL is fine) and sets *req to NULL. */
void rt_openai_request_free(Pdserve__V1__GenerateRequest **req);

/* ---- responses ----
 * Every builder returns a malloc'd NUL-terminated string the caller frees with free(), its length (without
 * the NUL) in *len (len may be NULL); NULL only when out of memory. Chunks are borrowed and must have
 * passed pb_validate_response_chunk; text that is nevertheless not UTF-8 is repaired with U+FFFD. */

/* The whole non-streaming answer from all chunks of a request in order. *http_status gets 200 and a
 * completion object ("text_completion" / "chat.completion") when the last chunk ends with FINISH_STOP or
 * FINISH_LENGTH; otherwise the error status and an error body (FINISH_ERROR: its code and message;
 * FINISH_CANCELLED without an error: ERR_CANCELLED; no final chunk: ERR_INTERNAL). Usage comes from the
 * last chunk that has one (completion_tokens falls back to the number of token ids). */
char *rt_openai_response_body(const rt_openai_ctx_t *ctx, const Pdserve__V1__ResponseChunk *const *chunks,
                              size_t n_chunks, int *http_status, size_t *len);

/* Streaming: one rt_openai_stream_t per request, borrowing ctx (which must outlive it). */
typedef struct {
    const rt_openai_ctx_t *ctx;
    bool is_started;      /* the chat role event went out */
    bool is_done;         /* [DONE] went out: later chunks produce nothing */
    uint64_t text_offset; /* completions logprobs: code points of the token strings so far */
    uint32_t n_tokens;    /* token ids seen, for usage when the worker sent none */
} rt_openai_stream_t;

void rt_openai_stream_init(rt_openai_stream_t *s, const rt_openai_ctx_t *ctx);
/* The events to send before any token: for chat the {"role": "assistant", "content": ""} delta (OpenAI
 * sends it first), for completions "" (*len 0). Call it at admission to start the stream early;
 * rt_openai_stream_chunk calls it itself if not done yet. Only the first call returns events. */
char *rt_openai_stream_begin(rt_openai_stream_t *s, size_t *len);
/* The SSE events for one chunk, in order: the role event if not sent yet; a content event if the chunk has
 * text or logprobs, carrying finish_reason when the chunk is the last ("stop" / "length"; a last chunk
 * without text gets an empty delta); then, on the last chunk, a usage event (choices []) when
 * include_usage, and RT_OPENAI_SSE_DONE. A FINISH_ERROR or FINISH_CANCELLED chunk gives
 * "data: {"error": {...}}\n\n" and [DONE] (vLLM's convention). Returns "" (*len 0) when there is nothing to
 * send (no text, no logprobs, not last) and after [DONE]. */
char *rt_openai_stream_chunk(rt_openai_stream_t *s, const Pdserve__V1__ResponseChunk *c, size_t *len);

/* {"error": {"message", "type", "param", "code"}}: type "invalid_request_error" for 400 and 404, else a
 * name for the class ("rate_limit_error", "timeout_error", "server_error", ...); code null for 400,
 * "model_not_found" for 404, else a short snake_case name of the ErrorCode. param null when "". */
char *rt_openai_error_body(const rt_openai_error_t *e, size_t *len);
/* The same as an SSE event: "data: {"error": ...}\n\n" (then send RT_OPENAI_SSE_DONE). */
char *rt_openai_error_sse(const rt_openai_error_t *e, size_t *len);
/* Fills e from a code and a message (param ""): for errors that do not come from parsing (queue full, worker
 * lost, deadline). Returns e. */
rt_openai_error_t *rt_openai_error_set(rt_openai_error_t *e, Pdserve__V1__ErrorCode code, const char *message);

/* GET /v1/models: {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}. */
char *rt_openai_models_body(const char *const *models, int n_models, int64_t created, const char *owned_by,
                            size_t *len);

#endif
