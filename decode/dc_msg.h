/* dc_msg.h: the decode worker's side of the wire contract (proto/pdserve_control.proto, pdserve_api.proto) as
 * pure functions: a DecodeRequest checked and turned into scheduler params, prefill's first-token info (the
 * kvtransfer commit info) into a sample result, scheduler events into ResponseChunks, and the other envelopes
 * the worker sends. No sockets, no state, no logging: the service decides what to do with a refusal.
 * Any thread. */
#ifndef DC_MSG_H
#define DC_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "dc_sched.h"
#include "eng_sample.h"
#include "eng_tok.h"
#include "kvt.h"
#include "pb.h"
#include "pd_common.h"

/* Checks an untrusted DecodeRequest (request_id != 0; prompt of 1 .. max_context - 1 ids in [0, vocab_size);
 * max_tokens >= 1; at most PB_MAX_STOP stop strings of 1..PB_MAX_STOP_BYTES bytes; sampling per
 * pb_validate_sampling) and fills rp from it: sampling through pb_sampling_values, deadline_us = now_us +
 * timeout_ms * 1000 (timeout_ms 0 = none), is_prefill_local from prefill_locally. rp->prompt and rp->stops
 * point into m and stops (stops must hold PB_MAX_STOP entries): keep both until dc_sched_reserve returned.
 * PD_OK, or PD_EINVAL with a one-line reason in err (err may be NULL). */
PD_NODISCARD pd_status dc_msg_decode_request(const Pdserve__V1__DecodeRequest *m, int32_t vocab_size,
                                             int32_t max_context, uint64_t now_us, const char **stops,
                                             dc_req_params_t *rp, char *err, size_t err_cap);

/* Prefill's commit info: a packed pdserve.v1.TokenLogprob (token, logprob, top[] with token and logprob) of
 * at most KVT_MAX_COMMIT_INFO_BYTES, unpacked into out. len 0 (a sender without info): out has first_token,
 * logprob NAN and no alternatives. PD_OK; PD_EPROTO with the reason in err for a malformed message, a token
 * other than first_token, a logprob that is NaN or > 0, more than ENG_MAX_LOGPROBS alternatives, or an
 * alternative outside [0, vocab_size). */
PD_NODISCARD pd_status dc_msg_first_token(const uint8_t *info, size_t len, int32_t first_token, int32_t vocab_size,
                                          eng_sample_result_t *out, char *err, size_t err_cap);

/* The ErrorCode a finished request's status becomes: PD_ETIMEDOUT -> ERR_DEADLINE_EXCEEDED, PD_EAGAIN ->
 * ERR_RESOURCE_EXHAUSTED, PD_ECLOSED -> ERR_CANCELLED, PD_EIO (this worker or the router going away) ->
 * ERR_UNAVAILABLE, PD_EINVAL -> ERR_INVALID_ARGUMENT, anything else -> ERR_INTERNAL. */
Pdserve__V1__ErrorCode dc_msg_error_code(pd_status st);

/* A chunk's worst size: the event's text plus ENG_MAX_LOGPROBS + 1 token texts of at most max_token_bytes
 * (eng_detok_max_bytes) each, and the fields around them. */
size_t dc_msg_chunk_max_bytes(size_t max_text_bytes, size_t max_token_bytes);

/* WorkerToRouter{chunk} for one event into dst: request_id; token_ids [token] (none when token is -1); text
 * (the event's delta); logprobs [TokenLogprob] when the token's logprob is known, its top[] with each
 * alternative's bytes (eng_tok_piece) as text; finish_reason; error {dc_msg_error_code, ev->err} when it
 * finished ERROR; usage (prompt_tokens n_prompt, completion_tokens n_generated) on the last chunk. Returns the
 * bytes written, or PD_ERANGE (nothing usable written) when cap is too small. */
PD_NODISCARD int64_t dc_msg_pack_chunk(const dc_event_t *ev, const eng_tok_t *tok, int32_t n_prompt, uint8_t *dst,
                                       size_t cap);

/* WorkerToRouter{reserved}: code ERR_NONE (blocks reserved) or the refusal with msg. Bytes or PD_ERANGE. */
PD_NODISCARD int64_t dc_msg_pack_reserved(uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg, uint8_t *dst,
                                          size_t cap);

/* Fingerprint message of fp (protocol_version current). The strings point into fp. */
void dc_msg_fingerprint(const kvt_fingerprint_t *fp, Pdserve__V1__Fingerprint *out);

#endif
