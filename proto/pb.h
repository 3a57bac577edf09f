/* pb.h: helpers over the protobuf-c code generated from proto/pdserve_*.proto: size-capped unpacking, validation
 * of every field of untrusted messages, error-code conversions and the fingerprint comparison.
 * No I/O, no framing, no logging: callers hand in bytes (and an allocator) and get a status plus a reason.
 *
 * Every function here is pure (no globals) and may be called from any thread. Message types keep their
 * generated names (Pdserve__V1__GenerateRequest, ...); `&msg->base` is the ProtobufCMessage of any of them. */
#ifndef PB_H
#define PB_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

#include "pd_common.h"
#include "pdserve_api.pb-c.h"
#include "pdserve_control.pb-c.h"
#include "pdserve_kv.pb-c.h"

/* ---- caps (bytes of one serialized message; refused before protobuf-c sees it) ----
 * Unpacking allocates more than the wire size (4 bytes per 1-byte varint of a packed int32; per 2-byte
 * empty submessage a struct, a pointer and protobuf-c's scan record: about 50x in all on hostile input,
 * test_pb.c measures it), so pass an allocator with a budget (the request's arena) when the cap alone is
 * too generous. */
#define PB_CAP_GENERATE_REQUEST_BYTES (4u << 20)  /* a 128k-token prompt as text or ids fits */
#define PB_CAP_RESPONSE_CHUNK_BYTES   (1u << 20)  /* one chunk: a few tokens, their text and logprobs */
#define PB_CAP_KV_ENVELOPE_BYTES      (1u << 20)  /* header only; payload frames are separate ZeroMQ frames */
#define PB_CAP_CONTROL_BYTES          (64u << 10) /* WorkerRegister, Heartbeat, Cancel */

/* ---- field limits that do not depend on the model (mirror engine/eng_stop.h and eng_sample.h) ---- */
#define PB_MAX_STOP                8    /* stop strings per request */
#define PB_MAX_SPECULATIVE_TOKENS  64   /* GenerateRequest.speculative_tokens (decode workers cap it to their spec_k) */
#define PB_MAX_STOP_BYTES          256  /* per stop string */
#define PB_MAX_LOGPROBS            20   /* SamplingParams.logprobs, TokenLogprob.top */
#define PB_MAX_ID_BYTES            128  /* model, model_id, worker_id, sender_id, backend */
#define PB_MAX_ENDPOINT_BYTES      256  /* ZeroMQ URIs */
#define PB_MAX_ERROR_BYTES         1024 /* Error.message */
#define PB_MAX_DEVICE_HANDLE_BYTES 256  /* KvHello.device_handle (kvtransfer's KVT_MAX_DEVICE_HANDLE_BYTES) */

/* ---- unpack / pack ----
 * pb_unpack_X: refuses len > cap (cap 0 = the type's PB_CAP_*; PB_CAP_CONTROL_BYTES for a type without
 * one), then protobuf_c_message_unpack with alloc
 * (NULL = malloc/free), then drops any unknown fields (so a re-packed message never forwards bytes nobody
 * validated). On success *out owns the message: free it with pb_free_X and the same alloc. Returns PD_OK,
 * PD_EPROTO (over the cap, truncated, malformed, or the allocator refused) or PD_EINVAL (NULL arguments),
 * with a one-line reason in err (err may be NULL). Structure only: call the matching validator next.
 * C strings end at the first NUL: a string field holding a NUL byte reads as its prefix (protobuf-c). */
PD_NODISCARD pd_status pb_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *buf, size_t len, size_t cap,
                                 ProtobufCAllocator *alloc, ProtobufCMessage **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_generate_request(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                                  Pdserve__V1__GenerateRequest **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_response_chunk(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                                Pdserve__V1__ResponseChunk **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_kv_envelope(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                             Pdserve__V1__KvEnvelope **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_worker_register(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                                 Pdserve__V1__WorkerRegister **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_heartbeat(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                           Pdserve__V1__Heartbeat **out, char *err, size_t err_cap);
PD_NODISCARD pd_status pb_unpack_cancel(const uint8_t *buf, size_t len, size_t cap, ProtobufCAllocator *alloc,
                                        Pdserve__V1__Cancel **out, char *err, size_t err_cap);

/* Free an unpacked message with the allocator it was unpacked with; NULL or *msg == NULL is fine; sets *msg
 * to NULL. (With an arena allocator whose free is a no-op this only clears the pointer.) */
void pb_free(ProtobufCMessage **msg, ProtobufCAllocator *alloc);
void pb_free_generate_request(Pdserve__V1__GenerateRequest **msg, ProtobufCAllocator *alloc);
void pb_free_response_chunk(Pdserve__V1__ResponseChunk **msg, ProtobufCAllocator *alloc);
void pb_free_kv_envelope(Pdserve__V1__KvEnvelope **msg, ProtobufCAllocator *alloc);
void pb_free_worker_register(Pdserve__V1__WorkerRegister **msg, ProtobufCAllocator *alloc);
void pb_free_heartbeat(Pdserve__V1__Heartbeat **msg, ProtobufCAllocator *alloc);
void pb_free_cancel(Pdserve__V1__Cancel **msg, ProtobufCAllocator *alloc);

/* Serialized size of msg, and serialization into a caller-owned buffer: returns the bytes written, or
 * PD_ERANGE (nothing written) if cap < pb_packed_size(msg). Proto3 encoding in field-number order,
 * byte-identical to the official implementation (tests/unit/proto/test_pb_interop.c) except that a float
 * of -0.0 is omitted as if it were 0, and a oneof string member pointing at protobuf_c_empty_string (the
 * generated default) is omitted, so the receiver sees the oneof unset (point it at a literal "" instead). */
size_t pb_packed_size(const ProtobufCMessage *msg);
int64_t pb_pack(const ProtobufCMessage *msg, uint8_t *dst, size_t cap);

/* ---- validation ----
 * Each validator returns PD_OK, or a negative status with a one-line reason in err (err may be NULL) that
 * names the field path, its value and the allowed range, e.g.
 *   "sampling.top_p = 1.5, must be 0 (unset) or in (0, 1]". NaN and infinities are rejected everywhere.
 * String fields must be valid UTF-8 (the official implementations refuse to parse anything else); ids
 * and endpoints must be printable ASCII without spaces (they go into log lines). */

/* Model-dependent limits of a client request. Start from pb_api_limits_default(). */
typedef struct {
    int32_t vocab_size;         /* token ids must be in [0, vocab_size); 0 = not checked (a router that does
                                   not know the model): whoever feeds the engine must set it */
    uint32_t max_prompt_bytes;  /* text prompt, or the sum of chat contents (default 1 MiB) */
    uint32_t max_prompt_tokens; /* token_ids prompt (default 131072) */
    uint32_t max_chat_messages; /* (default 1024) */
    uint32_t max_tokens;        /* cap on GenerateRequest.max_tokens; 0 = not checked (default 0) */
    uint32_t max_timeout_ms;    /* cap on GenerateRequest.timeout_ms; 0 = not checked (default 0) */
} pb_api_limits_t;

pb_api_limits_t pb_api_limits_default(void);

/* A client's request: prompt set (one of text / token_ids / chat, non-empty, within the caps; chat roles
 * "system", "user" or "assistant" with non-empty content), max_tokens and timeout_ms within the caps, at
 * most PB_MAX_STOP stop strings of 1..PB_MAX_STOP_BYTES bytes, sampling per pb_validate_sampling.
 * PD_EINVAL (the client's fault: ERR_INVALID_ARGUMENT) on any violation. */
PD_NODISCARD pd_status pb_validate_generate_request(const Pdserve__V1__GenerateRequest *req, const pb_api_limits_t *lim,
                                                    char *err, size_t err_cap);
/* temperature [0, 100]; top_k >= 0; top_p 0 (unset) or (0, 1]; min_p [0, 1]; repetition_penalty 0 (unset)
 * or (0, 10]; presence/frequency_penalty [-2, 2]; logprobs 0..PB_MAX_LOGPROBS. NULL (all defaults) is valid.
 * PD_EINVAL. */
PD_NODISCARD pd_status pb_validate_sampling(const Pdserve__V1__SamplingParams *sp, char *err, size_t err_cap);

/* SamplingParams with the wire's "0 = unset" resolved, in plain C (field for field what engine/eng_sample.h's
 * eng_sampling_t means), so services can fill the engine's struct without proto knowing the engine. */
typedef struct {
    float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    int32_t top_k, n_logprobs;
    uint64_t seed;
    bool has_seed;
} pb_sampling_values_t;

/* sp NULL = every default (greedy). top_p and repetition_penalty 0 become 1. Call after pb_validate_sampling. */
void pb_sampling_values(const Pdserve__V1__SamplingParams *sp, pb_sampling_values_t *out);
/* A chunk from a worker: token ids in [0, vocab_size) (0 = not checked), text valid UTF-8, at most
 * PB_MAX_LOGPROBS alternatives per token, logprobs <= 0 (or -inf), finish_reason known, error set exactly
 * when finish_reason is FINISH_ERROR and then with a code other than ERR_NONE. PD_EPROTO. */
PD_NODISCARD pd_status pb_validate_response_chunk(const Pdserve__V1__ResponseChunk *c, int32_t vocab_size, char *err,
                                                  size_t err_cap);

/* What the receiving side of the KV protocol knows about the transfer's shape: set the first two from the
 * handshake's fingerprint. Start from pb_kv_limits_default(). */
typedef struct {
    uint32_t n_layers;        /* required: KvData first_layer + n_layers must be <= this */
    uint32_t block_size;      /* required: KvData.block_size must equal it; KvReserve.n_blocks is checked
                                 against ceil(n_tokens / block_size) */
    uint32_t n_kv_heads;      /* KvData must match; 0 = any (still >= 1) */
    uint32_t head_dim;        /* KvData must match; 0 = any (still >= 1) */
    uint32_t max_blocks;      /* blocks of one transfer: KvReserve.n_blocks, KvData first_block + n_blocks
                                 (default 65536) */
    uint64_t max_frame_bytes; /* one payload frame: block_size * n_kv_heads * head_dim * dtype bytes, times
                                 the blocks of its run with frame_blocks (default 64 MiB) */
    int32_t vocab_size;       /* KvCommit.first_token must be < this; 0 = not checked */
    bool require_checksums;   /* true (default): KvData.checksums has one entry per frame; false: that
                                 many or none */
    bool frame_runs;          /* this receiver answered KvHelloReply.frame_runs: KvData may carry
                                 frame_blocks (default true) */
    uint64_t shm_bytes;       /* the sender's shared pool this receiver mapped (KvHello.shm_bytes, answered
                                 shm_mapped): every KvData.shm_offsets frame must lie inside it; 0 (default)
                                 = none mapped, shm_offsets must be empty */
} pb_kv_limits_t;

pb_kv_limits_t pb_kv_limits_default(void);

/* Exactly one body set, and that body's fields in range (see proto/README.md for the per-body rules).
 * PD_EPROTO for a bad message; PD_EINVAL if lim lacks n_layers or block_size (the caller's bug). */
PD_NODISCARD pd_status pb_validate_kv_envelope(const Pdserve__V1__KvEnvelope *env, const pb_kv_limits_t *lim, char *err,
                                               size_t err_cap);
/* Bytes per element of a KV dtype: 4 (F32), 2 (F16, BF16), 0 for anything else. */
size_t pb_kv_dtype_bytes(int dtype);
/* Bytes of one chunk (one block of one layer, K or V) of a KvData that passed validation: block_size *
 * n_kv_heads * head_dim * dtype bytes (no overflow after validation). A frame is one chunk, or with
 * frame_blocks, frame_blocks[r] chunks. */
uint64_t pb_kv_data_frame_bytes(const Pdserve__V1__KvData *d);
/* Frames a KvData that passed validation describes: 2 * n_layers * (n_frame_blocks, or n_blocks without
 * frame_blocks). */
uint64_t pb_kv_data_n_frames(const Pdserve__V1__KvData *d);

/* protocol_version >= 1, model_id a printable id, kv_dtype known, block_size / n_layers / n_kv_heads /
 * head_dim >= 1, rope_theta finite and > 0, rope_dim in [1, head_dim]. PD_EPROTO. */
PD_NODISCARD pd_status pb_validate_fingerprint(const Pdserve__V1__Fingerprint *fp, char *err, size_t err_cap);
/* worker_id a printable id of 1..PB_MAX_ID_BYTES; role PREFILL, DECODE or BOTH; control_endpoint a printable
 * endpoint; kv_endpoint too for DECODE and BOTH (optional for PREFILL); fingerprint present and valid;
 * backend a printable id. PD_EPROTO. */
PD_NODISCARD pd_status pb_validate_worker_register(const Pdserve__V1__WorkerRegister *wr, char *err, size_t err_cap);
/* worker_id as above; role PREFILL, DECODE or BOTH; free_kv_blocks <= total_kv_blocks. PD_EPROTO. */
PD_NODISCARD pd_status pb_validate_heartbeat(const Pdserve__V1__Heartbeat *hb, char *err, size_t err_cap);
/* reason a known ErrorCode. PD_EPROTO. */
PD_NODISCARD pd_status pb_validate_cancel(const Pdserve__V1__Cancel *c, char *err, size_t err_cap);

/* PD_OK if a and b agree on everything that must match between peers (all fields but kv_dtype: dtypes
 * may differ, the receiver converts), else PD_EPROTO with the first differing field in field-number
 * order, e.g. "block_size: 16 vs 32" (a's value first). A NULL fingerprint differs from everything.
 * The caller replies ERR_INCOMPATIBLE. */
PD_NODISCARD pd_status pb_fingerprint_diff(const Pdserve__V1__Fingerprint *a, const Pdserve__V1__Fingerprint *b,
                                           char *err, size_t err_cap);

/* ---- error codes ----
 * Status -> code: PD_OK -> ERR_NONE, PD_EINVAL -> ERR_INVALID_ARGUMENT, PD_EAGAIN -> ERR_RESOURCE_EXHAUSTED,
 * PD_ETIMEDOUT -> ERR_DEADLINE_EXCEEDED, PD_ECLOSED -> ERR_CANCELLED, PD_EPROTO -> ERR_PROTOCOL,
 * anything else -> ERR_INTERNAL.
 * Code -> status: the inverse where one exists, and ERR_NOT_FOUND -> PD_EINVAL, ERR_UNAVAILABLE -> PD_EIO,
 * ERR_INTERNAL -> PD_EBACKEND, ERR_INCOMPATIBLE and unknown codes -> PD_EPROTO. */
Pdserve__V1__ErrorCode pb_error_code(pd_status st);
pd_status pb_error_status(Pdserve__V1__ErrorCode code);
/* HTTP status for an error reply: ERR_NONE 200, INVALID_ARGUMENT 400, NOT_FOUND 404, RESOURCE_EXHAUSTED
 * 429, DEADLINE_EXCEEDED 504, UNAVAILABLE 503, CANCELLED 499 ("client closed request", as nginx and
 * grpc-gateway log it: the client is gone, so it only reaches logs and metrics; a router that cancels on
 * an operator's behalf while the client waits answers 503 itself), INTERNAL 500, PROTOCOL 502 (a worker
 * misbehaved), INCOMPATIBLE 503 (no compatible worker), unknown 500. Queue-full callers that prefer 503
 * with Retry-After over 429 choose that themselves. */
int pb_error_http_status(Pdserve__V1__ErrorCode code);
/* "ERR_INVALID_ARGUMENT", ...; "ERR_?" for an unknown value. Never NULL. */
const char *pb_error_code_name(Pdserve__V1__ErrorCode code);
/* Name of value in any generated enum (e.g. &pdserve__v1__worker_role__descriptor); "?" if unknown. */
const char *pb_enum_name(const ProtobufCEnumDescriptor *desc, int value);

/* True if s[0..n) is valid UTF-8 (no overlongs, no surrogates, at most U+10FFFF). */
bool pb_utf8_valid(const uint8_t *s, size_t n);

#endif
