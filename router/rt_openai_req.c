/* rt_openai_req.c: OpenAI request bodies (completions, chat) -> GenerateRequest. Type checks and the
 * fields we refuse live here; every range lives in pb_validate_generate_request, whose reason is mapped
 * back to the OpenAI field name. Does not tokenize or render chat templates: that is the router's next step. */
#include "rt_openai_int.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

rt_openai_limits_t rt_openai_limits_default(void) {
    return (rt_openai_limits_t){
        .api = pb_api_limits_default(),
        .max_body_bytes = PB_CAP_GENERATE_REQUEST_BYTES,
        .models = NULL,
        .n_models = 0,
        .completion_max_tokens = 16,
        .chat_max_tokens = 0,
    };
}

pd_status rt_err(rt_openai_error_t *err, Pdserve__V1__ErrorCode code, const char *param, const char *fmt, ...) {
    if (err) {
        memset(err, 0, sizeof *err);
        err->code = code;
        err->http_status = pb_error_http_status(code);
        snprintf(err->param, sizeof err->param, "%s", param ? param : "");
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->message, sizeof err->message, fmt, ap);
        va_end(ap);
    }
    return code == PDSERVE__V1__ERROR_CODE__ERR_INTERNAL ? PD_ENOMEM : PD_EINVAL;
}

#define S_BAD(err, param, ...) rt_err(err, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, param, __VA_ARGS__)
#define S_NOMEM(err)           rt_err(err, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, NULL, "out of memory")

/* ---- the request under construction: every string and array is malloc'd by us ---- */

static void s_free_str(char *s) {
    if (s && s != protobuf_c_empty_string) free(s);
}

void rt_openai_request_free(Pdserve__V1__GenerateRequest **preq) {
    Pdserve__V1__GenerateRequest *req = preq ? *preq : NULL;
    if (!req) return;
    s_free_str(req->model);
    if (req->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) s_free_str(req->text);
    if (req->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS && req->token_ids) {
        free(req->token_ids->ids);
        free(req->token_ids);
    }
    if (req->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT && req->chat) {
        for (size_t i = 0; i < req->chat->n_messages; i++) {
            s_free_str(req->chat->messages[i]->role);
            s_free_str(req->chat->messages[i]->content);
            free(req->chat->messages[i]);
        }
        free(req->chat->messages);
        free(req->chat);
    }
    for (size_t i = 0; i < req->n_stop; i++) s_free_str(req->stop[i]);
    free(req->stop);
    free(req->sampling);
    free(req->speculative_tokens);
    free(req);
    *preq = NULL;
}

static char *s_strndup(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (!d) return NULL;
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* ---- typed field access; JSON null counts as absent ---- */

static json_t *s_get(const json_t *obj, const char *key) {
    json_t *v = json_object_get(obj, key);
    return json_is_null(v) ? NULL : v;
}

static pd_status s_get_bool(const json_t *obj, const char *key, bool *out, rt_openai_error_t *err) {
    json_t *v = s_get(obj, key);
    if (!v) return PD_OK;
    if (!json_is_boolean(v)) return S_BAD(err, key, "'%s' must be a boolean", key);
    *out = json_is_true(v);
    return PD_OK;
}

/* A number (integer or real) -> float. Out-of-float-range values become +-inf, which the validator refuses. */
static pd_status s_get_float(const json_t *obj, const char *key, float *out, bool *has, rt_openai_error_t *err) {
    json_t *v = s_get(obj, key);
    if (has) *has = v != NULL;
    if (!v) return PD_OK;
    if (!json_is_number(v)) return S_BAD(err, key, "'%s' must be a number", key);
    *out = (float)json_number_value(v);
    return PD_OK;
}

static pd_status s_get_int(const json_t *obj, const char *key, json_int_t lo, json_int_t hi, json_int_t *out, bool *has,
                           rt_openai_error_t *err) {
    json_t *v = s_get(obj, key);
    if (has) *has = v != NULL;
    if (!v) return PD_OK;
    if (!json_is_integer(v)) return S_BAD(err, key, "'%s' must be an integer", key);
    json_int_t x = json_integer_value(v);
    if (x < lo || x > hi)
        return S_BAD(err, key, "'%s' = %lld, must be in [%lld, %lld]", key, (long long)x, (long long)lo, (long long)hi);
    *out = x;
    return PD_OK;
}

/* ---- fields we refuse rather than ignore: they would change the output ---- */

typedef enum {
    S_OK_NONE,  /* only absent / null */
    S_OK_FALSE, /* absent or false */
    S_OK_TRUE,  /* absent or true */
    S_OK_ONE,   /* absent or the integer 1 */
    S_OK_ZERO,  /* absent or the integer 0 */
    S_OK_EMPTY, /* absent, "", [] or {} */
} s_harmless_t;

static const struct {
    const char *key;
    s_harmless_t ok;
    const char *why;
} s_refused[] = {
    {"n", S_OK_ONE, "only one choice per request is supported (n = 1)"},
    {"best_of", S_OK_ONE, "best_of is not supported (best_of = 1)"},
    {"echo", S_OK_FALSE, "echo is not supported"},
    {"logit_bias", S_OK_EMPTY, "logit_bias is not supported"},
    {"suffix", S_OK_EMPTY, "suffix (insertion) is not supported"},
    {"tools", S_OK_EMPTY, "tools are not supported"},
    {"functions", S_OK_EMPTY, "functions are not supported"},
    {"prompt_logprobs", S_OK_NONE, "prompt_logprobs is not supported"},
    {"min_tokens", S_OK_ZERO, "min_tokens is not supported"},
    {"stop_token_ids", S_OK_EMPTY, "stop_token_ids is not supported"},
    {"include_stop_str_in_output", S_OK_FALSE, "include_stop_str_in_output is not supported"},
    {"skip_special_tokens", S_OK_TRUE, "skip_special_tokens = false is not supported"},
    {"use_beam_search", S_OK_FALSE, "beam search is not supported"},
    {"allowed_token_ids", S_OK_EMPTY, "allowed_token_ids is not supported"},
    {"bad_words", S_OK_EMPTY, "bad_words is not supported"},
    {"truncate_prompt_tokens", S_OK_NONE, "truncate_prompt_tokens is not supported"},
    {"return_tokens_as_token_ids", S_OK_FALSE, "return_tokens_as_token_ids is not supported"},
    {"guided_json", S_OK_NONE, "guided decoding is not supported"},
    {"guided_regex", S_OK_NONE, "guided decoding is not supported"},
    {"guided_choice", S_OK_NONE, "guided decoding is not supported"},
    {"guided_grammar", S_OK_NONE, "guided decoding is not supported"},
    {"structured_outputs", S_OK_NONE, "structured outputs are not supported"},
    {"continue_final_message", S_OK_FALSE, "continue_final_message is not supported"},
    {"add_generation_prompt", S_OK_TRUE, "add_generation_prompt = false is not supported"},
    {"chat_template", S_OK_NONE, "a per-request chat_template is not supported"},
    {"audio", S_OK_NONE, "audio output is not supported"},
    {"prediction", S_OK_NONE, "predicted outputs are not supported"},
};

static bool s_is_harmless(const json_t *v, s_harmless_t ok) {
    switch (ok) {
    case S_OK_NONE: return false;
    case S_OK_FALSE: return json_is_false(v);
    case S_OK_TRUE: return json_is_true(v);
    case S_OK_ONE: return json_is_integer(v) && json_integer_value(v) == 1;
    case S_OK_ZERO: return json_is_integer(v) && json_integer_value(v) == 0;
    case S_OK_EMPTY:
        return (json_is_string(v) && json_string_length(v) == 0) || (json_is_array(v) && json_array_size(v) == 0) ||
               (json_is_object(v) && json_object_size(v) == 0);
    }
    return false;
}

static bool s_is_str(const json_t *v, const char *s) {
    return json_is_string(v) && !strcmp(json_string_value(v), s);
}

static pd_status s_check_refused(const json_t *root, rt_openai_error_t *err) {
    for (size_t i = 0; i < sizeof s_refused / sizeof s_refused[0]; i++) {
        json_t *v = s_get(root, s_refused[i].key);
        if (v && !s_is_harmless(v, s_refused[i].ok)) return S_BAD(err, s_refused[i].key, "%s", s_refused[i].why);
    }
    json_t *v;
    /* "none" and "auto" are harmless without tools; anything else asks for a tool call */
    if ((v = s_get(root, "tool_choice")) && !s_is_str(v, "none") && !s_is_str(v, "auto"))
        return S_BAD(err, "tool_choice", "tool_choice is not supported (tools are not supported)");
    if ((v = s_get(root, "function_call")) && !s_is_str(v, "none") && !s_is_str(v, "auto"))
        return S_BAD(err, "function_call", "function_call is not supported (functions are not supported)");
    if ((v = s_get(root, "response_format")) && !s_is_str(json_object_get(v, "type"), "text"))
        return S_BAD(err, "response_format", "response_format other than {\"type\": \"text\"} is not supported");
    if ((v = s_get(root, "modalities")) &&
        !(json_is_array(v) && json_array_size(v) == 1 && s_is_str(json_array_get(v, 0), "text")))
        return S_BAD(err, "modalities", "modalities other than [\"text\"] are not supported");
    return PD_OK;
}

/* ---- prompt (completions) ---- */

static pd_status s_set_text(Pdserve__V1__GenerateRequest *req, const json_t *s, rt_openai_error_t *err) {
    if (!(req->text = s_strndup(json_string_value(s), json_string_length(s)))) return S_NOMEM(err);
    req->prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
    return PD_OK;
}

static pd_status s_set_token_ids(Pdserve__V1__GenerateRequest *req, const json_t *arr, rt_openai_error_t *err) {
    size_t n = json_array_size(arr);
    Pdserve__V1__TokenIds *t = malloc(sizeof *t);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!t || !ids) {
        free(t);
        free(ids);
        return S_NOMEM(err);
    }
    pdserve__v1__token_ids__init(t);
    t->ids = ids;
    req->token_ids = t;
    req->prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS;
    for (size_t i = 0; i < n; i++) {
        json_t *v = json_array_get(arr, i);
        char param[48];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        if (!json_is_integer(v)) return S_BAD(err, param, "'%s' must be an integer token id", param);
        json_int_t id = json_integer_value(v);
        if (id < 0 || id > INT32_MAX)
            return S_BAD(err, param, "'%s' = %lld, must be a token id in [0, %d]", param, (long long)id, INT32_MAX);
        ids[i] = (int32_t)id;
        t->n_ids = i + 1;
    }
    return PD_OK;
}

static pd_status s_parse_prompt(const json_t *root, Pdserve__V1__GenerateRequest *req, rt_openai_error_t *err) {
    json_t *p = s_get(root, "prompt");
    if (!p) return S_BAD(err, "prompt", "'prompt' is required");
    if (json_is_string(p)) return s_set_text(req, p, err);
    if (!json_is_array(p)) return S_BAD(err, "prompt", "'prompt' must be a string or an array");
    size_t n = json_array_size(p);
    if (n == 0) return S_BAD(err, "prompt", "'prompt' must not be an empty array");
    json_t *first = json_array_get(p, 0);
    if (json_is_integer(first)) return s_set_token_ids(req, p, err);
    if (!json_is_string(first) && !json_is_array(first))
        return S_BAD(err, "prompt", "'prompt' must be a string, an array of token ids, or an array of one of those");
    if (n > 1)
        return S_BAD(err, "prompt",
                     "'prompt' holds %zu prompts: batched prompts are not supported, send one prompt per request", n);
    if (json_is_string(first)) return s_set_text(req, first, err);
    if (json_array_size(first) == 0) return S_BAD(err, "prompt", "'prompt[0]' must not be an empty array");
    return s_set_token_ids(req, first, err);
}

/* ---- messages (chat) ---- */

/* content: a string, or an array of {"type": "text", "text": ...} parts joined with "\n". */
static pd_status s_parse_content(const json_t *c, size_t i, char **out, rt_openai_error_t *err) {
    char param[96];
    snprintf(param, sizeof param, "messages[%zu].content", i);
    if (!c) return S_BAD(err, param, "'%s' is required", param);
    if (json_is_string(c))
        return (*out = s_strndup(json_string_value(c), json_string_length(c))) ? PD_OK : S_NOMEM(err);
    if (!json_is_array(c)) return S_BAD(err, param, "'%s' must be a string or an array of content parts", param);
    size_t n_bytes = 0, n = json_array_size(c);
    for (size_t k = 0; k < n; k++) {
        json_t *part = json_array_get(c, k), *type = json_object_get(part, "type"), *text;
        snprintf(param, sizeof param, "messages[%zu].content[%zu].type", i, k);
        if (!json_is_object(part) || !json_is_string(type))
            return S_BAD(err, param, "'%s' must be given: each content part is an object with a type", param);
        if (strcmp(json_string_value(type), "text"))
            return S_BAD(err, param, "content part type '%.40s' is not supported: only \"text\" parts are",
                         json_string_value(type));
        snprintf(param, sizeof param, "messages[%zu].content[%zu].text", i, k);
        if (!json_is_string(text = json_object_get(part, "text")))
            return S_BAD(err, param, "'%s' must be a string", param);
        n_bytes += json_string_length(text) + (k ? 1 : 0);
    }
    char *s = malloc(n_bytes + 1), *w = s;
    if (!s) return S_NOMEM(err);
    for (size_t k = 0; k < n; k++) {
        json_t *text = json_object_get(json_array_get(c, k), "text");
        if (k) *w++ = '\n';
        memcpy(w, json_string_value(text), json_string_length(text));
        w += json_string_length(text);
    }
    *w = '\0';
    *out = s;
    return PD_OK;
}

static pd_status s_parse_message(const json_t *m, size_t i, Pdserve__V1__ChatMessage *msg, rt_openai_error_t *err) {
    char param[96];
    snprintf(param, sizeof param, "messages[%zu]", i);
    if (!json_is_object(m)) return S_BAD(err, param, "'%s' must be an object with role and content", param);
    json_t *role = json_object_get(m, "role"), *v;
    snprintf(param, sizeof param, "messages[%zu].role", i);
    if (!json_is_string(role)) return S_BAD(err, param, "'%s' must be a string", param);
    const char *r = json_string_value(role);
    if (!strcmp(r, "developer")) r = "system"; /* OpenAI's newer name for the system role */
    if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant"))
        return S_BAD(err, param,
                     "'%s' = '%.40s' is not supported: must be \"system\", \"developer\", \"user\" or "
                     "\"assistant\"",
                     param, json_string_value(role));
    snprintf(param, sizeof param, "messages[%zu].tool_calls", i);
    if ((v = s_get(m, "tool_calls")) && !s_is_harmless(v, S_OK_EMPTY))
        return S_BAD(err, param, "tool calls are not supported");
    snprintf(param, sizeof param, "messages[%zu].function_call", i);
    if (s_get(m, "function_call")) return S_BAD(err, param, "function calls are not supported");
    if (!(msg->role = s_strndup(r, strlen(r)))) return S_NOMEM(err);
    return s_parse_content(s_get(m, "content"), i, &msg->content, err);
}

static pd_status s_parse_messages(const json_t *root, Pdserve__V1__GenerateRequest *req, rt_openai_error_t *err) {
    json_t *ms = s_get(root, "messages");
    if (!ms) return S_BAD(err, "messages", "'messages' is required");
    if (!json_is_array(ms)) return S_BAD(err, "messages", "'messages' must be an array");
    size_t n = json_array_size(ms);
    if (n == 0) return S_BAD(err, "messages", "'messages' must not be empty");
    Pdserve__V1__ChatMessages *chat = malloc(sizeof *chat);
    Pdserve__V1__ChatMessage **arr = calloc(n, sizeof *arr);
    if (!chat || !arr) {
        free(chat);
        free(arr);
        return S_NOMEM(err);
    }
    pdserve__v1__chat_messages__init(chat);
    chat->messages = arr;
    req->chat = chat;
    req->prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT;
    for (size_t i = 0; i < n; i++) {
        Pdserve__V1__ChatMessage *msg = malloc(sizeof *msg);
        if (!msg) return S_NOMEM(err);
        pdserve__v1__chat_message__init(msg);
        arr[i] = msg; /* owned from here on, so rt_openai_request_free frees what a failure leaves */
        chat->n_messages = i + 1;
        pd_status st = s_parse_message(json_array_get(ms, i), i, msg, err);
        if (st) return st;
    }
    return PD_OK;
}

/* ---- fields shared by both endpoints ---- */

static pd_status s_parse_model(const json_t *root, const rt_openai_limits_t *lim, Pdserve__V1__GenerateRequest *req,
                               rt_openai_error_t *err) {
    json_t *v = s_get(root, "model");
    if (v && !json_is_string(v)) return S_BAD(err, "model", "'model' must be a string");
    const char *m = v ? json_string_value(v) : ""; /* jansson refuses "\u0000": no NUL inside */
    if (!*m && lim->n_models > 0) m = lim->models[0];
    if (lim->n_models > 0) {
        int k = 0;
        while (k < lim->n_models && strcmp(lim->models[k], m)) k++;
        if (k == lim->n_models)
            return rt_err(err, PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND, "model",
                          "The model '%.64s' does not exist: GET /v1/models lists the served models", m);
    }
    return (req->model = s_strndup(m, strlen(m))) ? PD_OK : S_NOMEM(err);
}

static pd_status s_parse_stop(const json_t *root, Pdserve__V1__GenerateRequest *req, rt_openai_error_t *err) {
    json_t *v = s_get(root, "stop");
    if (!v) return PD_OK;
    size_t n = json_is_array(v) ? json_array_size(v) : 1;
    if (!json_is_string(v) && !json_is_array(v))
        return S_BAD(err, "stop", "'stop' must be a string or an array of strings");
    if (n > PB_MAX_STOP) /* OpenAI allows 4; the engine handles PB_MAX_STOP */
        return S_BAD(err, "stop", "'stop' has %zu strings, must be at most %d", n, PB_MAX_STOP);
    if (n == 0) return PD_OK;
    if (!(req->stop = calloc(n, sizeof *req->stop))) return S_NOMEM(err);
    for (size_t i = 0; i < n; i++) {
        json_t *s = json_is_array(v) ? json_array_get(v, i) : v;
        if (!json_is_string(s)) return S_BAD(err, "stop", "'stop[%zu]' must be a string", i);
        if (!(req->stop[i] = s_strndup(json_string_value(s), json_string_length(s)))) return S_NOMEM(err);
        req->n_stop = i + 1;
    }
    return PD_OK;
}

static pd_status s_parse_sampling(const json_t *root, Pdserve__V1__SamplingParams *sp, rt_openai_error_t *err) {
    pd_status st;
    bool has;
    json_int_t x = 0;
    sp->temperature = 1.f; /* OpenAI's default; the wire's 0 would mean greedy */
    sp->top_p = 1.f;
    sp->repetition_penalty = 1.f;
    if ((st = s_get_float(root, "temperature", &sp->temperature, NULL, err))) return st;
    if ((st = s_get_float(root, "top_p", &sp->top_p, NULL, err))) return st;
    if (sp->top_p == 0.f) return S_BAD(err, "top_p", "'top_p' = 0, must be in (0, 1]");
    if ((st = s_get_float(root, "min_p", &sp->min_p, NULL, err))) return st;
    if ((st = s_get_float(root, "repetition_penalty", &sp->repetition_penalty, NULL, err))) return st;
    if (sp->repetition_penalty == 0.f)
        return S_BAD(err, "repetition_penalty", "'repetition_penalty' = 0, must be in (0, 10]");
    if ((st = s_get_float(root, "presence_penalty", &sp->presence_penalty, NULL, err))) return st;
    if ((st = s_get_float(root, "frequency_penalty", &sp->frequency_penalty, NULL, err))) return st;
    if ((st = s_get_int(root, "top_k", -1, INT32_MAX, &x, &has, err))) return st;
    sp->top_k = has && x > 0 ? (int32_t)x : 0; /* -1 and 0 both mean off */
    if ((st = s_get_int(root, "seed", INT64_MIN, INT64_MAX, &x, &has, err))) return st;
    sp->has_seed = has;
    sp->seed = (uint64_t)x; /* negative seeds (accepted by OpenAI) wrap: still one seed per value */
    return PD_OK;
}

static pd_status s_parse_max_tokens(const json_t *root, rt_openai_endpoint_t ep, const rt_openai_limits_t *lim,
                                    Pdserve__V1__GenerateRequest *req, rt_openai_error_t *err) {
    json_int_t x = 0;
    bool has = false;
    /* 0 on the wire means "up to the context length": a client's 0 is refused rather than widened */
    pd_status st;
    if (ep == RT_OPENAI_CHAT && (st = s_get_int(root, "max_completion_tokens", 1, UINT32_MAX, &x, &has, err)))
        return st;
    if (!has && (st = s_get_int(root, "max_tokens", 1, UINT32_MAX, &x, &has, err))) return st;
    req->max_tokens = has ? (uint32_t)x : ep == RT_OPENAI_CHAT ? lim->chat_max_tokens : lim->completion_max_tokens;
    return PD_OK;
}

static pd_status s_parse_logprobs(const json_t *root, rt_openai_endpoint_t ep, Pdserve__V1__SamplingParams *sp,
                                  rt_openai_ctx_t *ctx, rt_openai_error_t *err) {
    json_int_t x = 0;
    bool has = false;
    pd_status st;
    if (ep == RT_OPENAI_COMPLETIONS) { /* legacy: an integer 0..5, the number of alternatives */
        if ((st = s_get_int(root, "logprobs", 0, 5, &x, &has, err))) return st;
        ctx->has_logprobs = has;
    } else { /* chat: a boolean, and top_logprobs 0..20 (the range is the validator's) */
        if ((st = s_get_bool(root, "logprobs", &ctx->has_logprobs, err))) return st;
        if ((st = s_get_int(root, "top_logprobs", INT32_MIN, INT32_MAX, &x, &has, err))) return st;
        if (x > 0 && !ctx->has_logprobs) return S_BAD(err, "top_logprobs", "'top_logprobs' needs 'logprobs': true");
    }
    sp->logprobs = (int32_t)x;
    ctx->n_top_logprobs = (int32_t)x;
    return PD_OK;
}

static pd_status s_parse_stream(const json_t *root, rt_openai_ctx_t *ctx, Pdserve__V1__GenerateRequest *req,
                                rt_openai_error_t *err) {
    pd_status st = s_get_bool(root, "stream", &ctx->is_stream, err);
    if (st) return st;
    req->stream = ctx->is_stream;
    json_t *so = s_get(root, "stream_options");
    if (!so) return PD_OK;
    if (!json_is_object(so)) return S_BAD(err, "stream_options", "'stream_options' must be an object");
    json_t *v = s_get(so, "include_usage");
    if (v && !json_is_boolean(v))
        return S_BAD(err, "stream_options.include_usage", "'stream_options.include_usage' must be a boolean");
    ctx->include_usage = json_is_true(v);
    return PD_OK;
}

/* ---- validator reason -> OpenAI param ---- */

/* Rewrites the validator's field path at the start of msg into the OpenAI name; the param is that path. */
static void s_map_validator_error(const char *msg, rt_openai_endpoint_t ep, bool has_mct, rt_openai_error_t *err) {
    static const struct {
        const char *from, *to_completions, *to_chat;
    } map[] = {
        {"sampling.logprobs", "logprobs", "top_logprobs"},
        {"sampling.", "", ""},
        {"token_ids.ids", "prompt", "prompt"},
        {"text", "prompt", "prompt"},
        {"chat.messages", "messages", "messages"},
        {"prompt is not set", "prompt is not set", "messages are not set"},
        {"max_tokens", "max_tokens", "max_tokens"},
    };
    const char *rest = msg, *to = "";
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        size_t n = strlen(map[i].from);
        if (strncmp(msg, map[i].from, n)) continue;
        rest = msg + n;
        to = ep == RT_OPENAI_CHAT ? map[i].to_chat : map[i].to_completions;
        if (!strcmp(map[i].from, "max_tokens") && has_mct) to = "max_completion_tokens";
        break;
    }
    char buf[PB_MAX_ERROR_BYTES + 64]; /* to is a short name, rest fits PB_MAX_ERROR_BYTES */
    snprintf(buf, sizeof buf, "%s%s", to, rest);
    /* we refuse a client's 0 for top_p and repetition_penalty ourselves: don't advertise the wire's "unset" */
    char *unset = strstr(buf, "0 (unset) or ");
    if (unset) memmove(unset, unset + 13, strlen(unset + 13) + 1);
    rt_err(err, PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT, NULL, "%s", buf);
    if (!err) return;
    /* the param is the path: up to the first space or ':' ("messages[2].content", "top_p", "stop[1]") */
    size_t n = strcspn(buf, " :");
    if (n >= sizeof err->param) n = sizeof err->param - 1;
    memcpy(err->param, buf, n);
    err->param[n] = '\0';
}

/* ---- entry points ---- */

static pd_status s_parse(rt_openai_endpoint_t ep, const char *body, size_t len, const rt_openai_limits_t *lim,
                         Pdserve__V1__GenerateRequest **out, rt_openai_ctx_t *ctx_out, rt_openai_error_t *err) {
    if (out) *out = NULL;
    if (!body || !lim || !out) return S_BAD(err, NULL, "internal error: NULL argument");
    if (len > lim->max_body_bytes)
        return S_BAD(err, NULL, "request body has %zu bytes, must be at most %zu", len, lim->max_body_bytes);
    json_error_t jerr;
    json_t *root = json_loadb(body, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return S_BAD(err, NULL, "invalid JSON in request body at line %d column %d: %s", jerr.line, jerr.column,
                     jerr.text);
    rt_openai_ctx_t ctx = {.endpoint = ep};
    Pdserve__V1__GenerateRequest *req = calloc(1, sizeof *req);
    Pdserve__V1__SamplingParams *sp = calloc(1, sizeof *sp);
    pd_status st = PD_OK;
    if (!req || !sp) {
        free(req);
        free(sp);
        req = NULL;
        st = S_NOMEM(err);
        goto fail;
    }
    pdserve__v1__generate_request__init(req);
    pdserve__v1__sampling_params__init(sp);
    req->sampling = sp;
    if (!json_is_object(root)) {
        st = S_BAD(err, NULL, "request body must be a JSON object");
        goto fail;
    }
    if ((st = s_check_refused(root, err)) || (st = s_parse_model(root, lim, req, err))) goto fail;
    st = ep == RT_OPENAI_CHAT ? s_parse_messages(root, req, err) : s_parse_prompt(root, req, err);
    if (st || (st = s_parse_sampling(root, sp, err)) || (st = s_parse_logprobs(root, ep, sp, &ctx, err))) goto fail;
    if ((st = s_parse_max_tokens(root, ep, lim, req, err)) || (st = s_parse_stop(root, req, err))) goto fail;
    if ((st = s_parse_stream(root, &ctx, req, err))) goto fail;
    bool ignore_eos = false;
    if ((st = s_get_bool(root, "ignore_eos", &ignore_eos, err))) goto fail;
    req->ignore_eos = ignore_eos;
    json_int_t spec_tokens = 0;
    bool has_spec = false;
    if ((st = s_get_int(root, "speculative_tokens", 0, PB_MAX_SPECULATIVE_TOKENS, &spec_tokens, &has_spec, err)))
        goto fail;
    if (has_spec) {
        req->speculative_tokens = calloc(1, sizeof *req->speculative_tokens);
        if (!req->speculative_tokens) {
            st = S_NOMEM(err);
            goto fail;
        }
        pdserve__v1__uint32_value__init(req->speculative_tokens);
        req->speculative_tokens->value = (uint32_t)spec_tokens;
    }

    char why[PB_MAX_ERROR_BYTES];
    if (pb_validate_generate_request(req, &lim->api, why, sizeof why)) {
        s_map_validator_error(why, ep, s_get(root, "max_completion_tokens") != NULL, err);
        st = PD_EINVAL;
        goto fail;
    }
    snprintf(ctx.model, sizeof ctx.model, "%s", req->model);
    if (ctx_out) *ctx_out = ctx;
    json_decref(root);
    *out = req;
    return PD_OK;
fail:
    rt_openai_request_free(&req);
    json_decref(root);
    return st;
}

pd_status rt_openai_parse_completion(const char *body, size_t len, const rt_openai_limits_t *lim,
                                     Pdserve__V1__GenerateRequest **out, rt_openai_ctx_t *ctx, rt_openai_error_t *err) {
    return s_parse(RT_OPENAI_COMPLETIONS, body, len, lim, out, ctx, err);
}

pd_status rt_openai_parse_chat(const char *body, size_t len, const rt_openai_limits_t *lim,
                               Pdserve__V1__GenerateRequest **out, rt_openai_ctx_t *ctx, rt_openai_error_t *err) {
    return s_parse(RT_OPENAI_CHAT, body, len, lim, out, ctx, err);
}
