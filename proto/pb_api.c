/* pb_api.c: validation of the client API (GenerateRequest, SamplingParams, ResponseChunk) and the mapping
 * between pd_status, ErrorCode and HTTP status. Model-dependent limits come from the caller. */
#include "pb_int.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

pb_api_limits_t pb_api_limits_default(void) {
    return (pb_api_limits_t){
        .vocab_size = 0,
        .max_prompt_bytes = 1u << 20,
        .max_prompt_tokens = 131072,
        .max_chat_messages = 1024,
        .max_tokens = 0,
        .max_timeout_ms = 0,
    };
}

/* ---- sampling ---- */

static bool s_in(float x, float lo, float hi) {
    return isfinite(x) && x >= lo && x <= hi; /* false for NaN and infinities */
}

pd_status pb_validate_sampling(const Pdserve__V1__SamplingParams *sp, char *err, size_t err_cap) {
    const pd_status st = PD_EINVAL;
    if (!sp) return PD_OK;
    if (!s_in(sp->temperature, 0.f, 100.f))
        return pb_fail(st, err, err_cap, "sampling.temperature = %g, must be in [0, 100]", (double)sp->temperature);
    if (sp->top_k < 0) return pb_fail(st, err, err_cap, "sampling.top_k = %d, must be >= 0 (0 = off)", sp->top_k);
    if (!(sp->top_p == 0.f || (s_in(sp->top_p, 0.f, 1.f) && sp->top_p > 0.f)))
        return pb_fail(st, err, err_cap, "sampling.top_p = %g, must be 0 (unset) or in (0, 1]", (double)sp->top_p);
    if (!s_in(sp->min_p, 0.f, 1.f))
        return pb_fail(st, err, err_cap, "sampling.min_p = %g, must be in [0, 1]", (double)sp->min_p);
    if (!(sp->repetition_penalty == 0.f || (s_in(sp->repetition_penalty, 0.f, 10.f) && sp->repetition_penalty > 0.f)))
        return pb_fail(st, err, err_cap, "sampling.repetition_penalty = %g, must be 0 (unset) or in (0, 10]",
                       (double)sp->repetition_penalty);
    if (!s_in(sp->presence_penalty, -2.f, 2.f))
        return pb_fail(st, err, err_cap, "sampling.presence_penalty = %g, must be in [-2, 2]",
                       (double)sp->presence_penalty);
    if (!s_in(sp->frequency_penalty, -2.f, 2.f))
        return pb_fail(st, err, err_cap, "sampling.frequency_penalty = %g, must be in [-2, 2]",
                       (double)sp->frequency_penalty);
    if (sp->logprobs < 0 || sp->logprobs > PB_MAX_LOGPROBS)
        return pb_fail(st, err, err_cap, "sampling.logprobs = %d, must be in [0, %d]", sp->logprobs, PB_MAX_LOGPROBS);
    return PD_OK;
}

void pb_sampling_values(const Pdserve__V1__SamplingParams *sp, pb_sampling_values_t *out) {
    static const Pdserve__V1__SamplingParams none = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    if (!sp) sp = &none;
    *out = (pb_sampling_values_t){
        .temperature = sp->temperature,
        .top_p = sp->top_p == 0.f ? 1.f : sp->top_p,
        .min_p = sp->min_p,
        .repetition_penalty = sp->repetition_penalty == 0.f ? 1.f : sp->repetition_penalty,
        .presence_penalty = sp->presence_penalty,
        .frequency_penalty = sp->frequency_penalty,
        .top_k = sp->top_k,
        .n_logprobs = sp->logprobs,
        .seed = sp->seed,
        .has_seed = sp->has_seed,
    };
}

/* ---- GenerateRequest ---- */

static pd_status s_check_token_ids(const Pdserve__V1__TokenIds *t, const pb_api_limits_t *lim, char *err,
                                   size_t err_cap) {
    if (!t || t->n_ids == 0) return pb_fail(PD_EINVAL, err, err_cap, "token_ids.ids is empty, must have >= 1 id");
    if (t->n_ids > lim->max_prompt_tokens)
        return pb_fail(PD_EINVAL, err, err_cap, "token_ids.ids has %zu ids, must be at most %u", t->n_ids,
                       lim->max_prompt_tokens);
    for (size_t i = 0; i < t->n_ids; i++) {
        int32_t id = t->ids[i];
        if (id < 0 || (lim->vocab_size > 0 && id >= lim->vocab_size)) {
            if (lim->vocab_size > 0)
                return pb_fail(PD_EINVAL, err, err_cap, "token_ids.ids[%zu] = %d, must be in [0, %d)", i, id,
                               lim->vocab_size);
            return pb_fail(PD_EINVAL, err, err_cap, "token_ids.ids[%zu] = %d, must be >= 0", i, id);
        }
    }
    return PD_OK;
}

static pd_status s_check_chat(const Pdserve__V1__ChatMessages *c, const pb_api_limits_t *lim, char *err,
                              size_t err_cap) {
    if (!c || c->n_messages == 0)
        return pb_fail(PD_EINVAL, err, err_cap, "chat.messages is empty, must have >= 1 message");
    if (c->n_messages > lim->max_chat_messages)
        return pb_fail(PD_EINVAL, err, err_cap, "chat.messages has %zu messages, must be at most %u", c->n_messages,
                       lim->max_chat_messages);
    uint64_t total = 0;
    for (size_t i = 0; i < c->n_messages; i++) {
        const Pdserve__V1__ChatMessage *m = c->messages[i];
        const char *role = m ? m->role : NULL;
        if (!role || (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant"))) {
            char q[64];
            return pb_fail(PD_EINVAL, err, err_cap,
                           "chat.messages[%zu].role = %s, must be \"system\", \"user\" or \"assistant\"", i,
                           pb_quote(q, sizeof q, role));
        }
        char f[96];
        snprintf(f, sizeof f, "chat.messages[%zu].content", i);
        pd_status st = pb_check_str(PD_EINVAL, f, m->content, 1, lim->max_prompt_bytes, PB_STR_TEXT, err, err_cap);
        if (st) return st;
        total += strlen(m->content);
    }
    if (total > lim->max_prompt_bytes)
        return pb_fail(PD_EINVAL, err, err_cap, "chat.messages: contents total %llu bytes, must be at most %u",
                       (unsigned long long)total, lim->max_prompt_bytes);
    return PD_OK;
}

static pd_status s_check_prompt(const Pdserve__V1__GenerateRequest *req, const pb_api_limits_t *lim, char *err,
                                size_t err_cap) {
    switch (req->prompt_case) {
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT:
        return pb_check_str(PD_EINVAL, "text", req->text, 1, lim->max_prompt_bytes, PB_STR_TEXT, err, err_cap);
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS: return s_check_token_ids(req->token_ids, lim, err, err_cap);
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT: return s_check_chat(req->chat, lim, err, err_cap);
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT__NOT_SET:
        return pb_fail(PD_EINVAL, err, err_cap, "prompt is not set, must be one of text, token_ids, chat");
    default:
        return pb_fail(PD_EINVAL, err, err_cap, "prompt case = %d, must be one of text (3), token_ids (4), chat (5)",
                       (int)req->prompt_case);
    }
}

pd_status pb_validate_generate_request(const Pdserve__V1__GenerateRequest *req, const pb_api_limits_t *lim, char *err,
                                       size_t err_cap) {
    if (!req || !lim) return pb_fail(PD_EINVAL, err, err_cap, "generate request: NULL argument");
    pd_status st = pb_check_str(PD_EINVAL, "model", req->model, 0, PB_MAX_ID_BYTES, PB_STR_NAME, err, err_cap);
    if (st) return st;
    if ((st = s_check_prompt(req, lim, err, err_cap))) return st;
    if ((st = pb_validate_sampling(req->sampling, err, err_cap))) return st;
    if (lim->max_tokens && req->max_tokens > lim->max_tokens)
        return pb_fail(PD_EINVAL, err, err_cap, "max_tokens = %u, must be at most %u (0 = up to the context length)",
                       req->max_tokens, lim->max_tokens);
    if (req->n_stop > PB_MAX_STOP)
        return pb_fail(PD_EINVAL, err, err_cap, "stop has %zu strings, must be at most %d", req->n_stop, PB_MAX_STOP);
    for (size_t i = 0; i < req->n_stop; i++) {
        char f[48];
        snprintf(f, sizeof f, "stop[%zu]", i);
        if ((st = pb_check_str(PD_EINVAL, f, req->stop[i], 1, PB_MAX_STOP_BYTES, PB_STR_TEXT, err, err_cap))) return st;
    }
    if (lim->max_timeout_ms && req->timeout_ms > lim->max_timeout_ms)
        return pb_fail(PD_EINVAL, err, err_cap, "timeout_ms = %u, must be at most %u (0 = the server's default)",
                       req->timeout_ms, lim->max_timeout_ms);
    if (req->speculative_tokens && req->speculative_tokens->value > PB_MAX_SPECULATIVE_TOKENS)
        return pb_fail(PD_EINVAL, err, err_cap, "speculative_tokens = %u, must be in [0, %d] (0 = off)",
                       req->speculative_tokens->value, PB_MAX_SPECULATIVE_TOKENS);
    return PD_OK;
}

/* ---- ResponseChunk ---- */

static pd_status s_check_token(const char *field, int32_t id, int32_t vocab_size, char *err, size_t err_cap) {
    if (id >= 0 && (vocab_size <= 0 || id < vocab_size)) return PD_OK;
    if (vocab_size > 0) return pb_fail(PD_EPROTO, err, err_cap, "%s = %d, must be in [0, %d)", field, id, vocab_size);
    return pb_fail(PD_EPROTO, err, err_cap, "%s = %d, must be >= 0", field, id);
}

static pd_status s_check_logprob(const char *field, float lp, char *err, size_t err_cap) {
    if (lp <= 0.f) return PD_OK; /* -inf (probability 0) is allowed; NaN fails the comparison */
    return pb_fail(PD_EPROTO, err, err_cap, "%s = %g, must be <= 0 (a log probability)", field, (double)lp);
}

static pd_status s_check_token_logprob(size_t i, const Pdserve__V1__TokenLogprob *lp, int32_t vocab_size, char *err,
                                       size_t err_cap) {
    char f[96];
    if (!lp) return pb_fail(PD_EPROTO, err, err_cap, "logprobs[%zu] is NULL", i);
    snprintf(f, sizeof f, "logprobs[%zu].token", i);
    pd_status st = s_check_token(f, lp->token, vocab_size, err, err_cap);
    snprintf(f, sizeof f, "logprobs[%zu].logprob", i);
    if (st || (st = s_check_logprob(f, lp->logprob, err, err_cap))) return st;
    if (lp->n_top > PB_MAX_LOGPROBS)
        return pb_fail(PD_EPROTO, err, err_cap, "logprobs[%zu].top has %zu entries, must be at most %d", i, lp->n_top,
                       PB_MAX_LOGPROBS);
    for (size_t k = 0; k < lp->n_top; k++) {
        if (!lp->top[k]) return pb_fail(PD_EPROTO, err, err_cap, "logprobs[%zu].top[%zu] is NULL", i, k);
        snprintf(f, sizeof f, "logprobs[%zu].top[%zu].token", i, k);
        if ((st = s_check_token(f, lp->top[k]->token, vocab_size, err, err_cap))) return st;
        snprintf(f, sizeof f, "logprobs[%zu].top[%zu].logprob", i, k);
        if ((st = s_check_logprob(f, lp->top[k]->logprob, err, err_cap))) return st;
    }
    return PD_OK;
}

pd_status pb_validate_response_chunk(const Pdserve__V1__ResponseChunk *c, int32_t vocab_size, char *err,
                                     size_t err_cap) {
    if (!c) return pb_fail(PD_EINVAL, err, err_cap, "response chunk: NULL argument");
    char f[96];
    pd_status st;
    for (size_t i = 0; i < c->n_token_ids; i++) {
        snprintf(f, sizeof f, "token_ids[%zu]", i);
        if ((st = s_check_token(f, c->token_ids[i], vocab_size, err, err_cap))) return st;
    }
    if ((st = pb_check_str(PD_EPROTO, "text", c->text, 0, PB_CAP_RESPONSE_CHUNK_BYTES, PB_STR_TEXT, err, err_cap)))
        return st;
    for (size_t i = 0; i < c->n_logprobs; i++)
        if ((st = s_check_token_logprob(i, c->logprobs[i], vocab_size, err, err_cap))) return st;
    if (!protobuf_c_enum_descriptor_get_value(&pdserve__v1__finish_reason__descriptor, (int)c->finish_reason))
        return pb_fail(PD_EPROTO, err, err_cap, "finish_reason = %d, must be a known FinishReason",
                       (int)c->finish_reason);
    bool is_error = c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    bool has_error = c->error && c->error->code != PDSERVE__V1__ERROR_CODE__ERR_NONE;
    if (is_error != has_error)
        return pb_fail(PD_EPROTO, err, err_cap,
                       "error.code = %s with finish_reason = %s, must be set exactly when "
                       "finish_reason is FINISH_ERROR",
                       c->error ? pb_error_code_name(c->error->code) : "(unset)",
                       pb_enum_name(&pdserve__v1__finish_reason__descriptor, (int)c->finish_reason));
    return pb_check_error(PD_EPROTO, "error", c->error, err, err_cap);
}

/* ---- error codes ---- */

Pdserve__V1__ErrorCode pb_error_code(pd_status st) {
    switch (st) {
    case PD_OK: return PDSERVE__V1__ERROR_CODE__ERR_NONE;
    case PD_EINVAL: return PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT;
    case PD_EAGAIN: return PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
    case PD_ETIMEDOUT: return PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
    case PD_ECLOSED: return PDSERVE__V1__ERROR_CODE__ERR_CANCELLED;
    case PD_EPROTO: return PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL;
    default: return PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
    }
}

pd_status pb_error_status(Pdserve__V1__ErrorCode code) {
    switch (code) {
    case PDSERVE__V1__ERROR_CODE__ERR_NONE: return PD_OK;
    case PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT:
    case PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND: return PD_EINVAL;
    case PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED: return PD_EAGAIN;
    case PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED: return PD_ETIMEDOUT;
    case PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE: return PD_EIO;
    case PDSERVE__V1__ERROR_CODE__ERR_CANCELLED: return PD_ECLOSED;
    case PDSERVE__V1__ERROR_CODE__ERR_INTERNAL: return PD_EBACKEND;
    case PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL:
    case PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE:
    default: return PD_EPROTO;
    }
}

int pb_error_http_status(Pdserve__V1__ErrorCode code) {
    switch (code) {
    case PDSERVE__V1__ERROR_CODE__ERR_NONE: return 200;
    case PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT: return 400;
    case PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND: return 404;
    case PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED: return 429;
    case PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED: return 504;
    case PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE: return 503;
    case PDSERVE__V1__ERROR_CODE__ERR_CANCELLED: return 499;
    case PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL: return 502;
    case PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE: return 503;
    case PDSERVE__V1__ERROR_CODE__ERR_INTERNAL:
    default: return 500;
    }
}

const char *pb_enum_name(const ProtobufCEnumDescriptor *desc, int value) {
    const ProtobufCEnumValue *v = desc ? protobuf_c_enum_descriptor_get_value(desc, value) : NULL;
    return v ? v->name : "?";
}

const char *pb_error_code_name(Pdserve__V1__ErrorCode code) {
    const ProtobufCEnumValue *v = protobuf_c_enum_descriptor_get_value(&pdserve__v1__error_code__descriptor, (int)code);
    return v ? v->name : "ERR_?";
}
