/* dc_msg.c: DecodeRequest -> dc_req_params_t, commit info -> first token, dc_event_t -> ResponseChunk (see
 * dc_msg.h). Everything from the wire is checked here before the scheduler or the engine sees it; packing
 * goes into caller-owned buffers. */
#include "dc_msg.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static pd_status s_fail(pd_status st, char *err, size_t cap, const char *fmt, ...) PD_PRINTF(4, 5);
static pd_status s_fail(pd_status st, char *err, size_t cap, const char *fmt, ...) {
    if (err && cap > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, cap, fmt, ap);
        va_end(ap);
    }
    return st;
}

pd_status dc_msg_decode_request(const Pdserve__V1__DecodeRequest *m, int32_t vocab_size, int32_t max_context,
                                uint64_t now_us, const char **stops, dc_req_params_t *rp, char *err, size_t err_cap) {
    if (!m || !rp || !stops) return s_fail(PD_EINVAL, err, err_cap, "decode request: NULL argument");
    if (m->request_id == 0) return s_fail(PD_EINVAL, err, err_cap, "request_id = 0, must be non-zero");
    if (m->n_prompt < 1 || m->n_prompt >= (size_t)max_context)
        return s_fail(PD_EINVAL, err, err_cap, "prompt has %zu tokens, must have 1..%d", m->n_prompt, max_context - 1);
    for (size_t i = 0; i < m->n_prompt; i++)
        if (m->prompt[i] < 0 || m->prompt[i] >= vocab_size)
            return s_fail(PD_EINVAL, err, err_cap, "prompt[%zu] = %d, must be in [0, %d)", i, m->prompt[i], vocab_size);
    if (m->max_tokens < 1 || m->max_tokens > INT32_MAX)
        return s_fail(PD_EINVAL, err, err_cap, "max_tokens = %u, must be >= 1", m->max_tokens);
    if (m->n_stop > PB_MAX_STOP || m->n_stop > ENG_STOP_MAX)
        return s_fail(PD_EINVAL, err, err_cap, "%zu stop strings, at most %d", m->n_stop, PB_MAX_STOP);
    for (size_t i = 0; i < m->n_stop; i++) {
        size_t n = m->stop[i] ? strlen(m->stop[i]) : 0;
        if (n < 1 || n > PB_MAX_STOP_BYTES || !pb_utf8_valid((const uint8_t *)m->stop[i], n))
            return s_fail(PD_EINVAL, err, err_cap, "stop[%zu] has %zu bytes, must be 1..%d bytes of UTF-8", i, n,
                          PB_MAX_STOP_BYTES);
        stops[i] = m->stop[i];
    }
    char why[192];
    if (pb_validate_sampling(m->sampling, why, sizeof why) != PD_OK) return s_fail(PD_EINVAL, err, err_cap, "%s", why);
    pb_sampling_values_t v;
    pb_sampling_values(m->sampling, &v);
    *rp = dc_req_params_default();
    rp->req_id = m->request_id;
    rp->n_prompt_tokens = (int32_t)m->n_prompt;
    rp->prompt = m->prompt;
    rp->max_tokens = (int32_t)m->max_tokens;
    rp->ignore_eos = m->ignore_eos;
    rp->stops = stops;
    rp->n_stops = (int32_t)m->n_stop;
    rp->deadline_us = m->timeout_ms ? now_us + (uint64_t)m->timeout_ms * 1000u : 0;
    rp->is_prefill_local = m->prefill_locally;
    if (m->speculative_tokens) /* dc_sched caps it to the deployment's spec_k */
        rp->spec_k = m->speculative_tokens->value > INT32_MAX ? INT32_MAX : (int32_t)m->speculative_tokens->value;
    eng_sampling_t *sp = &rp->sampling;
    sp->temperature = v.temperature, sp->top_k = v.top_k, sp->top_p = v.top_p, sp->min_p = v.min_p;
    sp->repetition_penalty = v.repetition_penalty, sp->presence_penalty = v.presence_penalty;
    sp->frequency_penalty = v.frequency_penalty, sp->seed = v.seed, sp->has_seed = v.has_seed;
    sp->n_logprobs = v.n_logprobs;
    /* the wire's ranges are the engine's; a mismatch would be a contract bug, still refused here */
    if (eng_sampling_validate(sp, why, sizeof why) != PD_OK) return s_fail(PD_EINVAL, err, err_cap, "%s", why);
    return PD_OK;
}

/* A logprob as the wire allows it: <= 0 or -inf, never NaN. */
static bool s_logprob_ok(float lp) {
    return lp <= 0.0f;
}

pd_status dc_msg_first_token(const uint8_t *info, size_t len, int32_t first_token, int32_t vocab_size,
                             eng_sample_result_t *out, char *err, size_t err_cap) {
    memset(out, 0, sizeof *out);
    out->token = first_token;
    out->logprob = NAN;
    if (len == 0) return PD_OK;
    if (len > KVT_MAX_COMMIT_INFO_BYTES)
        return s_fail(PD_EPROTO, err, err_cap, "first-token info of %zu bytes, at most %d", len,
                      KVT_MAX_COMMIT_INFO_BYTES);
    ProtobufCMessage *pm = NULL;
    char why[160];
    if (pb_unpack(&pdserve__v1__token_logprob__descriptor, info, len, KVT_MAX_COMMIT_INFO_BYTES, NULL, &pm, why,
                  sizeof why) != PD_OK)
        return s_fail(PD_EPROTO, err, err_cap, "first-token info: %s", why);
    const Pdserve__V1__TokenLogprob *tl = (const Pdserve__V1__TokenLogprob *)pm;
    pd_status st = PD_OK;
    if (tl->token != first_token)
        st = s_fail(PD_EPROTO, err, err_cap, "first-token info names token %d, the commit %d", tl->token, first_token);
    else if (!s_logprob_ok(tl->logprob))
        st = s_fail(PD_EPROTO, err, err_cap, "first-token logprob = %g, must be <= 0", (double)tl->logprob);
    else if (tl->n_top > ENG_MAX_LOGPROBS)
        st = s_fail(PD_EPROTO, err, err_cap, "first token has %zu alternatives, at most %d", tl->n_top,
                    ENG_MAX_LOGPROBS);
    for (size_t i = 0; st == PD_OK && i < tl->n_top; i++) {
        const Pdserve__V1__TopLogprob *t = tl->top[i];
        if (t->token < 0 || t->token >= vocab_size || !s_logprob_ok(t->logprob))
            st = s_fail(PD_EPROTO, err, err_cap,
                        "first token's top[%zu] = (%d, %g): token must be in [0, %d), logprob <= 0", i, t->token,
                        (double)t->logprob, vocab_size);
        out->top[i] = (eng_logprob_t){.token = t->token, .logprob = t->logprob};
    }
    if (st == PD_OK) {
        out->logprob = tl->logprob;
        out->n_top = (int32_t)tl->n_top;
    } else {
        out->n_top = 0;
    }
    pb_free(&pm, NULL);
    return st;
}

Pdserve__V1__ErrorCode dc_msg_error_code(pd_status st) {
    switch (st) {
    case PD_OK: return PDSERVE__V1__ERROR_CODE__ERR_NONE;
    case PD_ETIMEDOUT: return PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED;
    case PD_EAGAIN: return PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
    case PD_ECLOSED: return PDSERVE__V1__ERROR_CODE__ERR_CANCELLED;
    case PD_EIO: return PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE;
    case PD_EINVAL: return PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT;
    default: return PDSERVE__V1__ERROR_CODE__ERR_INTERNAL;
    }
}

size_t dc_msg_chunk_max_bytes(size_t max_text_bytes, size_t max_token_bytes) {
    /* per alternative: tag + length + bytes, token and logprob varints; per message: ids, usage, error text */
    return 256 + max_text_bytes + (ENG_MAX_LOGPROBS + 1) * (max_token_bytes + 32) + sizeof(((dc_event_t *)0)->err);
}

static Pdserve__V1__FinishReason s_finish(dc_finish_t f) {
    switch (f) {
    case DC_FINISH_STOP: return PDSERVE__V1__FINISH_REASON__FINISH_STOP;
    case DC_FINISH_LENGTH: return PDSERVE__V1__FINISH_REASON__FINISH_LENGTH;
    case DC_FINISH_CANCELLED: return PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED;
    case DC_FINISH_ERROR: return PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    default: return PDSERVE__V1__FINISH_REASON__FINISH_NONE;
    }
}

int64_t dc_msg_pack_chunk(const dc_event_t *ev, const eng_tok_t *tok, int32_t n_prompt, uint8_t *dst, size_t cap) {
    Pdserve__V1__ResponseChunk c = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    Pdserve__V1__TokenLogprob tl = PDSERVE__V1__TOKEN_LOGPROB__INIT, *ptl = &tl;
    Pdserve__V1__TopLogprob top[ENG_MAX_LOGPROBS], *ptop[ENG_MAX_LOGPROBS];
    Pdserve__V1__Usage usage = PDSERVE__V1__USAGE__INIT;
    Pdserve__V1__Error error = PDSERVE__V1__ERROR__INIT;
    int32_t token = ev->token;
    /* the text is not NUL-terminated in the event; protobuf-c strings are */
    char text[8192];
    if ((size_t)ev->n_text >= sizeof text) return PD_ERANGE;
    memcpy(text, ev->text, (size_t)ev->n_text);
    text[ev->n_text] = '\0';
    c.request_id = ev->req_id;
    c.text = text;
    if (token >= 0) {
        c.n_token_ids = 1;
        c.token_ids = &token;
        if (s_logprob_ok(ev->logprob)) { /* NAN: prefill sent no logprob for its token */
            tl.token = token;
            tl.logprob = ev->logprob;
            for (int32_t i = 0; i < ev->n_top; i++) {
                size_t n = 0;
                const char *piece = eng_tok_piece(tok, ev->top[i].token, &n);
                top[i] = (Pdserve__V1__TopLogprob)PDSERVE__V1__TOP_LOGPROB__INIT;
                top[i].token = ev->top[i].token;
                top[i].logprob = ev->top[i].logprob;
                top[i].text = (ProtobufCBinaryData){.len = piece ? n : 0, .data = (uint8_t *)piece};
                ptop[i] = &top[i];
            }
            tl.n_top = (size_t)ev->n_top;
            tl.top = ptop;
            c.n_logprobs = 1;
            c.logprobs = &ptl;
        }
    }
    c.finish_reason = s_finish(ev->finish);
    if (ev->finish != DC_FINISH_NONE) {
        usage.prompt_tokens = n_prompt > 0 ? (uint32_t)n_prompt : 0;
        usage.completion_tokens = ev->n_generated > 0 ? (uint32_t)ev->n_generated : 0;
        c.usage = &usage;
    }
    if (ev->finish == DC_FINISH_ERROR) {
        error.code = dc_msg_error_code(ev->status);
        if (error.code == PDSERVE__V1__ERROR_CODE__ERR_NONE || error.code == PDSERVE__V1__ERROR_CODE__ERR_CANCELLED)
            error.code = PDSERVE__V1__ERROR_CODE__ERR_INTERNAL; /* an error chunk always says what went wrong */
        error.message = (char *)(ev->err[0] ? ev->err : pd_strerror(ev->status));
        c.error = &error;
    }
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_CHUNK;
    m.chunk = &c;
    return pb_pack(&m.base, dst, cap);
}

int64_t dc_msg_pack_reserved(uint64_t req_id, Pdserve__V1__ErrorCode code, const char *msg, uint8_t *dst, size_t cap) {
    Pdserve__V1__Error e = PDSERVE__V1__ERROR__INIT;
    Pdserve__V1__DecodeReserved r = PDSERVE__V1__DECODE_RESERVED__INIT;
    r.request_id = req_id;
    if (code != PDSERVE__V1__ERROR_CODE__ERR_NONE) {
        e.code = code;
        e.message = (char *)(msg ? msg : "");
        r.error = &e;
    }
    Pdserve__V1__WorkerToRouter m = PDSERVE__V1__WORKER_TO_ROUTER__INIT;
    m.body_case = PDSERVE__V1__WORKER_TO_ROUTER__BODY_RESERVED;
    m.reserved = &r;
    return pb_pack(&m.base, dst, cap);
}

void dc_msg_fingerprint(const kvt_fingerprint_t *fp, Pdserve__V1__Fingerprint *out) {
    *out = (Pdserve__V1__Fingerprint)PDSERVE__V1__FINGERPRINT__INIT;
    out->protocol_version = PDSERVE__V1__PROTOCOL_VERSION__PROTOCOL_VERSION_CURRENT;
    out->model_id = (char *)fp->model_id;
    out->weights_hash = fp->weights_hash;
    out->tokenizer_hash = fp->tokenizer_hash;
    out->kv_dtype = fp->kv_dtype == ENG_KV_F16    ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_F16
                    : fp->kv_dtype == ENG_KV_BF16 ? PDSERVE__V1__KV_DTYPE__KV_DTYPE_BF16
                                                  : PDSERVE__V1__KV_DTYPE__KV_DTYPE_F32;
    out->block_size = (uint32_t)fp->block_size;
    out->n_layers = (uint32_t)fp->n_layers;
    out->n_kv_heads = (uint32_t)fp->n_kv_heads;
    out->head_dim = (uint32_t)fp->head_dim;
    out->rope_theta = fp->rope_theta;
    out->rope_dim = (uint32_t)fp->rope_dim;
}
