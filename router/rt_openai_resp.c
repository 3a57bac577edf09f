/* rt_openai_resp.c: ResponseChunk messages -> OpenAI JSON bodies and SSE events (completions and chat,
 * streaming and not), error bodies and the model list. Builds with jansson and dumps compact JSON; does not
 * write to sockets or keep anything between calls except what rt_openai_stream_t holds. */
#include "rt_openai_int.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Floats are dumped with 16 significant digits after a round trip through their shortest decimal form, so
 * -0.1f prints as -0.1, not -0.10000000149011612. */
#define S_DUMP_FLAGS (JSON_COMPACT | JSON_REAL_PRECISION(16))

#define S_LOGPROB_FLOOR (-9999.0) /* OpenAI's stand-in for -inf, which JSON cannot carry */

/* ---- small builders: *ok turns false on the first failed allocation ---- */

static void s_set(json_t *o, const char *key, json_t *v, bool *ok) {
    if (json_object_set_new(o, key, v)) *ok = false;
}

static void s_push(json_t *a, json_t *v, bool *ok) {
    if (json_array_append_new(a, v)) *ok = false;
}

static json_t *s_logprob(float f) {
    if (!isfinite(f)) return json_real(S_LOGPROB_FLOOR);
    char buf[32];
    for (int p = 1; p <= 9; p++) { /* 9 digits always round-trip a float */
        snprintf(buf, sizeof buf, "%.*g", p, (double)f);
        if ((float)strtod(buf, NULL) == f) break;
    }
    return json_real(strtod(buf, NULL));
}

json_t *rt_json_text(const char *s, size_t n) {
    if (!s) return json_string("");
    if (pb_utf8_valid((const uint8_t *)s, n)) return json_stringn(s, n);
    char *buf = malloc(3 * n + 1), *w = buf; /* each bad byte becomes the 3 bytes of U+FFFD */
    if (!buf) return NULL;
    for (size_t i = 0; i < n;) {
        uint8_t b = (uint8_t)s[i];
        size_t len = b < 0x80                 ? 1
                     : b >= 0xc2 && b <= 0xdf ? 2
                     : b >= 0xe0 && b <= 0xef ? 3
                     : b >= 0xf0 && b <= 0xf4 ? 4
                                              : 0;
        if (len && i + len <= n && pb_utf8_valid((const uint8_t *)s + i, len)) {
            memcpy(w, s + i, len);
            w += len, i += len;
        } else {
            memcpy(w, "\xef\xbf\xbd", 3);
            w += 3, i += 1;
        }
    }
    json_t *j = json_stringn(buf, (size_t)(w - buf));
    free(buf);
    return j;
}

static uint64_t s_n_code_points(const json_t *str) {
    const char *s = json_string_value(str);
    uint64_t n = 0;
    for (size_t i = 0, len = json_string_length(str); i < len; i++) n += ((uint8_t)s[i] & 0xc0) != 0x80;
    return n;
}

static json_t *s_bytes(const char *s, size_t n, bool *ok) {
    if (!s) return json_null();
    json_t *a = json_array();
    if (!a) *ok = false;
    for (size_t i = 0; a && i < n; i++) s_push(a, json_integer((uint8_t)s[i]), ok);
    return a;
}

static const char *s_finish_name(Pdserve__V1__FinishReason r) {
    return r == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH ? "length" : "stop";
}

static bool s_is_last(const Pdserve__V1__ResponseChunk *c) {
    return c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE;
}

static bool s_is_failed(const Pdserve__V1__ResponseChunk *c) {
    return c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE &&
           c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_STOP &&
           c->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_LENGTH;
}

static void s_error_of_chunk(const Pdserve__V1__ResponseChunk *c, rt_openai_error_t *e) {
    if (c->error && c->error->code != PDSERVE__V1__ERROR_CODE__ERR_NONE)
        rt_openai_error_set(e, c->error->code, c->error->message);
    else if (c->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED)
        rt_openai_error_set(e, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, "the request was cancelled");
    else
        rt_openai_error_set(e, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "the request ended without a result");
}

/* ---- the object header every body shares ---- */

static json_t *s_head(const rt_openai_ctx_t *ctx, bool is_chunk, bool *ok) {
    static const char *const objects[2][2] = {{"text_completion", "text_completion"},
                                              {"chat.completion", "chat.completion.chunk"}};
    char id[48];
    bool is_chat = ctx->endpoint == RT_OPENAI_CHAT;
    snprintf(id, sizeof id, "%s-%016" PRIx64, is_chat ? "chatcmpl" : "cmpl", ctx->request_id);
    json_t *o = json_object();
    if (!o) {
        *ok = false;
        return NULL;
    }
    s_set(o, "id", json_string(id), ok);
    s_set(o, "object", json_string(objects[is_chat][is_chunk]), ok);
    s_set(o, "created", json_integer(ctx->created), ok);
    s_set(o, "model", rt_json_text(ctx->model, strlen(ctx->model)), ok);
    return o;
}

static json_t *s_usage(const Pdserve__V1__Usage *u, uint32_t n_tokens_seen, bool *ok) {
    uint32_t prompt = u ? u->prompt_tokens : 0, completion = u ? u->completion_tokens : n_tokens_seen;
    json_t *o = json_object();
    if (!o) {
        *ok = false;
        return NULL;
    }
    s_set(o, "prompt_tokens", json_integer(prompt), ok);
    s_set(o, "completion_tokens", json_integer(completion), ok);
    s_set(o, "total_tokens", json_integer((json_int_t)prompt + completion), ok);
    if (u && u->cached_prompt_tokens) {
        json_t *d = json_object();
        if (d) s_set(d, "cached_tokens", json_integer(u->cached_prompt_tokens), ok);
        s_set(o, "prompt_tokens_details", d, ok);
    }
    return o;
}

/* ---- logprobs ---- */

/* The sampled token's bytes: its own entry among the alternatives, else ctx->token_text, else unknown. */
static const char *s_token_bytes(const rt_openai_ctx_t *ctx, const Pdserve__V1__TokenLogprob *lp, size_t *n) {
    for (size_t k = 0; k < lp->n_top; k++)
        if (lp->top[k]->token == lp->token && lp->top[k]->text.data) {
            *n = lp->top[k]->text.len;
            return (const char *)lp->top[k]->text.data;
        }
    const char *s = ctx->token_text ? ctx->token_text(ctx->token_text_ud, lp->token, n) : NULL;
    if (!s) *n = 0;
    return s;
}

/* Legacy completions: parallel arrays {tokens, token_logprobs, top_logprobs, text_offset}. */
typedef struct {
    json_t *obj, *tokens, *token_logprobs, *top_logprobs, *text_offset;
} s_legacy_t;

static json_t *s_legacy_new(s_legacy_t *l, bool *ok) {
    l->obj = json_object();
    l->tokens = json_array(), l->token_logprobs = json_array(), l->top_logprobs = json_array();
    l->text_offset = json_array();
    if (!l->obj) *ok = false;
    if (l->obj) {
        s_set(l->obj, "tokens", l->tokens, ok);
        s_set(l->obj, "token_logprobs", l->token_logprobs, ok);
        s_set(l->obj, "top_logprobs", l->top_logprobs, ok);
        s_set(l->obj, "text_offset", l->text_offset, ok);
    }
    return l->obj;
}

static void s_legacy_add(s_legacy_t *l, const rt_openai_ctx_t *ctx, const Pdserve__V1__ResponseChunk *c,
                         uint64_t *text_offset, bool *ok) {
    for (size_t i = 0; *ok && i < c->n_logprobs; i++) {
        const Pdserve__V1__TokenLogprob *lp = c->logprobs[i];
        size_t n;
        const char *b = s_token_bytes(ctx, lp, &n);
        json_t *tok = rt_json_text(b, n), *top = json_object();
        if (!tok || !top) *ok = false;
        bool has_self = false;
        size_t n_top = lp->n_top < (size_t)ctx->n_top_logprobs ? lp->n_top : (size_t)ctx->n_top_logprobs;
        for (size_t k = 0; top && k < n_top; k++) {
            json_t *key = rt_json_text((const char *)lp->top[k]->text.data, lp->top[k]->text.len);
            if (key)
                s_set(top, json_string_value(key), s_logprob(lp->top[k]->logprob), ok);
            else
                *ok = false;
            json_decref(key);
            has_self |= lp->top[k]->token == lp->token;
        }
        /* OpenAI: "the API will always return the logprob of the sampled token" (up to logprobs + 1) */
        if (top && tok && !has_self) s_set(top, json_string_value(tok), s_logprob(lp->logprob), ok);
        s_push(l->text_offset, json_integer((json_int_t)*text_offset), ok);
        if (tok) *text_offset += s_n_code_points(tok);
        s_push(l->tokens, tok, ok);
        s_push(l->token_logprobs, s_logprob(lp->logprob), ok);
        s_push(l->top_logprobs, top, ok);
    }
}

/* Chat: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}] appended to content. */
static json_t *s_chat_entry(const char *b, size_t n, float logprob, bool *ok) {
    json_t *e = json_object();
    if (!e) {
        *ok = false;
        return NULL;
    }
    s_set(e, "token", rt_json_text(b, n), ok);
    s_set(e, "logprob", s_logprob(logprob), ok);
    s_set(e, "bytes", s_bytes(b, n, ok), ok);
    return e;
}

static void s_chat_add(json_t *content, const rt_openai_ctx_t *ctx, const Pdserve__V1__ResponseChunk *c, bool *ok) {
    for (size_t i = 0; *ok && i < c->n_logprobs; i++) {
        const Pdserve__V1__TokenLogprob *lp = c->logprobs[i];
        size_t n;
        const char *b = s_token_bytes(ctx, lp, &n);
        json_t *e = s_chat_entry(b, n, lp->logprob, ok), *top = json_array();
        if (!top) *ok = false;
        size_t n_top = lp->n_top < (size_t)ctx->n_top_logprobs ? lp->n_top : (size_t)ctx->n_top_logprobs;
        for (size_t k = 0; top && k < n_top; k++) {
            const Pdserve__V1__TopLogprob *t = lp->top[k];
            s_push(top, s_chat_entry((const char *)t->text.data, t->text.len, t->logprob, ok), ok);
        }
        if (e)
            s_set(e, "top_logprobs", top, ok);
        else
            json_decref(top);
        s_push(content, e, ok);
    }
}

/* A choice's "logprobs" for the chunks [c, c + n): null unless requested. */
static json_t *s_logprobs(const rt_openai_ctx_t *ctx, const Pdserve__V1__ResponseChunk *const *c, size_t n,
                          uint64_t *text_offset, bool *ok) {
    if (!ctx->has_logprobs) return json_null();
    if (ctx->endpoint == RT_OPENAI_COMPLETIONS) {
        s_legacy_t l;
        json_t *o = s_legacy_new(&l, ok);
        for (size_t i = 0; o && i < n; i++) s_legacy_add(&l, ctx, c[i], text_offset, ok);
        return o;
    }
    json_t *o = json_object(), *content = json_array();
    if (!o || !content) *ok = false;
    for (size_t i = 0; content && i < n; i++) s_chat_add(content, ctx, c[i], ok);
    if (o)
        s_set(o, "content", content, ok);
    else
        json_decref(content);
    return o;
}

/* ---- output buffer of one call ---- */

typedef struct {
    char *p;
    size_t n, cap;
    bool ok;
} s_buf_t;

static void s_buf_add(s_buf_t *b, const char *s, size_t n) {
    if (!b->ok) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->ok = false;
            return;
        }
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

/* Appends the dump of j (consumed), as an SSE event when is_sse. */
static void s_buf_json(s_buf_t *b, json_t *j, bool is_sse, bool ok) {
    char *s = ok && j ? json_dumps(j, S_DUMP_FLAGS) : NULL;
    json_decref(j);
    if (!s) {
        b->ok = false;
        return;
    }
    if (is_sse) s_buf_add(b, "data: ", 6);
    s_buf_add(b, s, strlen(s));
    if (is_sse) s_buf_add(b, "\n\n", 2);
    free(s);
}

static char *s_buf_finish(s_buf_t *b, size_t *len) {
    if (b->ok && !b->p) s_buf_add(b, "", 0);
    if (!b->ok) {
        free(b->p);
        if (len) *len = 0;
        return NULL;
    }
    if (len) *len = b->n;
    return b->p;
}

/* ---- errors ---- */

rt_openai_error_t *rt_openai_error_set(rt_openai_error_t *e, Pdserve__V1__ErrorCode code, const char *message) {
    (void)rt_err(e, code, NULL, "%s", message ? message : "");
    return e;
}

static json_t *s_error_json(const rt_openai_error_t *e, bool *ok) {
    const char *type, *code;
    switch (e->code) {
    case PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT: type = "invalid_request_error", code = NULL; break;
    case PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND: type = "invalid_request_error", code = "model_not_found"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED: type = "rate_limit_error", code = "resource_exhausted"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED: type = "timeout_error", code = "deadline_exceeded"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE: type = "server_error", code = "unavailable"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_CANCELLED: type = "cancelled_error", code = "cancelled"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_PROTOCOL: type = "server_error", code = "bad_gateway"; break;
    case PDSERVE__V1__ERROR_CODE__ERR_INCOMPATIBLE: type = "server_error", code = "incompatible_worker"; break;
    default: type = "server_error", code = "internal_error"; break;
    }
    json_t *root = json_object(), *o = json_object();
    if (!root || !o) *ok = false;
    if (o) {
        s_set(o, "message", rt_json_text(e->message, strlen(e->message)), ok);
        s_set(o, "type", json_string(type), ok);
        s_set(o, "param", e->param[0] ? rt_json_text(e->param, strlen(e->param)) : json_null(), ok);
        s_set(o, "code", code ? json_string(code) : json_null(), ok);
    }
    if (root)
        s_set(root, "error", o, ok);
    else
        json_decref(o);
    return root;
}

char *rt_openai_error_body(const rt_openai_error_t *e, size_t *len) {
    s_buf_t b = {.ok = true};
    bool ok = true;
    json_t *j = s_error_json(e, &ok);
    s_buf_json(&b, j, false, ok);
    return s_buf_finish(&b, len);
}

char *rt_openai_error_sse(const rt_openai_error_t *e, size_t *len) {
    s_buf_t b = {.ok = true};
    bool ok = true;
    json_t *j = s_error_json(e, &ok);
    s_buf_json(&b, j, true, ok);
    return s_buf_finish(&b, len);
}

/* ---- non-streaming ---- */

char *rt_openai_response_body(const rt_openai_ctx_t *ctx, const Pdserve__V1__ResponseChunk *const *chunks,
                              size_t n_chunks, int *http_status, size_t *len) {
    const Pdserve__V1__ResponseChunk *last = n_chunks ? chunks[n_chunks - 1] : NULL;
    if (!last || !s_is_last(last) || s_is_failed(last)) {
        rt_openai_error_t e;
        if (last && s_is_last(last))
            s_error_of_chunk(last, &e);
        else
            rt_openai_error_set(&e, PDSERVE__V1__ERROR_CODE__ERR_INTERNAL, "the request ended without a result");
        *http_status = e.http_status;
        return rt_openai_error_body(&e, len);
    }
    *http_status = 200;
    bool ok = true;
    s_buf_t text = {.ok = true};
    const Pdserve__V1__Usage *usage = NULL;
    uint32_t n_tokens = 0;
    for (size_t i = 0; i < n_chunks; i++) {
        s_buf_add(&text, chunks[i]->text ? chunks[i]->text : "", chunks[i]->text ? strlen(chunks[i]->text) : 0);
        n_tokens += (uint32_t)chunks[i]->n_token_ids;
        if (chunks[i]->usage) usage = chunks[i]->usage;
    }
    char *all = s_buf_finish(&text, NULL);
    if (!all) ok = false;
    json_t *root = s_head(ctx, false, &ok), *choices = json_array(), *choice = json_object();
    if (!choices || !choice) ok = false;
    if (choice) {
        json_t *t = rt_json_text(all, all ? strlen(all) : 0);
        s_set(choice, "index", json_integer(0), &ok);
        if (ctx->endpoint == RT_OPENAI_CHAT) {
            json_t *msg = json_object();
            if (msg) {
                s_set(msg, "role", json_string("assistant"), &ok);
                s_set(msg, "content", t, &ok);
            } else
                json_decref(t);
            s_set(choice, "message", msg, &ok);
        } else {
            s_set(choice, "text", t, &ok);
        }
        uint64_t text_offset = 0;
        s_set(choice, "logprobs", s_logprobs(ctx, chunks, n_chunks, &text_offset, &ok), &ok);
        s_set(choice, "finish_reason", json_string(s_finish_name(last->finish_reason)), &ok);
    }
    free(all);
    if (choices)
        s_push(choices, choice, &ok);
    else
        json_decref(choice);
    if (root) {
        s_set(root, "choices", choices, &ok);
        s_set(root, "usage", s_usage(usage, n_tokens, &ok), &ok);
    } else
        json_decref(choices);
    s_buf_t b = {.ok = true};
    s_buf_json(&b, root, false, ok);
    return s_buf_finish(&b, len);
}

/* ---- streaming ---- */

void rt_openai_stream_init(rt_openai_stream_t *s, const rt_openai_ctx_t *ctx) {
    *s = (rt_openai_stream_t){.ctx = ctx};
}

/* One event with a single choice: delta (chat, consumed) or text (completions), logprobs, finish_reason. */
static void s_event_choice(s_buf_t *b, const rt_openai_ctx_t *ctx, json_t *delta_or_text, json_t *logprobs,
                           const char *finish) {
    bool ok = true;
    json_t *root = s_head(ctx, true, &ok), *choices = json_array(), *choice = json_object();
    if (!choices || !choice) ok = false;
    if (choice) {
        s_set(choice, "index", json_integer(0), &ok);
        s_set(choice, ctx->endpoint == RT_OPENAI_CHAT ? "delta" : "text", delta_or_text, &ok);
        s_set(choice, "logprobs", logprobs, &ok);
        s_set(choice, "finish_reason", finish ? json_string(finish) : json_null(), &ok);
    } else {
        json_decref(delta_or_text);
        json_decref(logprobs);
    }
    if (choices)
        s_push(choices, choice, &ok);
    else
        json_decref(choice);
    if (root)
        s_set(root, "choices", choices, &ok);
    else
        json_decref(choices);
    s_buf_json(b, root, true, ok);
}

static void s_stream_begin(rt_openai_stream_t *s, s_buf_t *b) {
    if (s->is_started) return;
    s->is_started = true;
    if (s->ctx->endpoint != RT_OPENAI_CHAT) return;
    json_t *delta = json_object();
    if (delta) {
        json_object_set_new(delta, "role", json_string("assistant"));
        json_object_set_new(delta, "content", json_string(""));
    }
    if (!delta || json_object_size(delta) != 2) b->ok = false;
    s_event_choice(b, s->ctx, delta, json_null(), NULL);
}

char *rt_openai_stream_begin(rt_openai_stream_t *s, size_t *len) {
    s_buf_t b = {.ok = true};
    if (!s->is_done) s_stream_begin(s, &b);
    return s_buf_finish(&b, len);
}

char *rt_openai_stream_chunk(rt_openai_stream_t *s, const Pdserve__V1__ResponseChunk *c, size_t *len) {
    s_buf_t b = {.ok = true};
    const rt_openai_ctx_t *ctx = s->ctx;
    if (s->is_done) return s_buf_finish(&b, len);
    s_stream_begin(s, &b);
    s->n_tokens += (uint32_t)c->n_token_ids;
    if (s_is_failed(c)) {
        rt_openai_error_t e;
        s_error_of_chunk(c, &e);
        bool ok = true;
        json_t *j = s_error_json(&e, &ok);
        s_buf_json(&b, j, true, ok);
        s_buf_add(&b, RT_OPENAI_SSE_DONE, sizeof RT_OPENAI_SSE_DONE - 1);
        s->is_done = true;
        return s_buf_finish(&b, len);
    }
    size_t n_text = c->text ? strlen(c->text) : 0;
    bool has_lp = ctx->has_logprobs && c->n_logprobs > 0;
    if (n_text || has_lp || s_is_last(c)) {
        bool ok = true;
        json_t *text = rt_json_text(c->text, n_text), *payload = text;
        if (ctx->endpoint == RT_OPENAI_CHAT) {
            payload = json_object(); /* the last event may carry no text: an empty delta, as OpenAI sends */
            if (payload && (n_text || !s_is_last(c)))
                s_set(payload, "content", text, &ok);
            else
                json_decref(text);
        }
        json_t *lp = s_logprobs(ctx, &c, 1, &s->text_offset, &ok);
        if (!ok || !payload) b.ok = false;
        s_event_choice(&b, ctx, payload, lp, s_is_last(c) ? s_finish_name(c->finish_reason) : NULL);
    }
    if (s_is_last(c)) {
        if (ctx->include_usage) {
            bool ok = true;
            json_t *root = s_head(ctx, true, &ok);
            if (root) {
                s_set(root, "choices", json_array(), &ok);
                s_set(root, "usage", s_usage(c->usage, s->n_tokens, &ok), &ok);
            }
            s_buf_json(&b, root, true, ok);
        }
        s_buf_add(&b, RT_OPENAI_SSE_DONE, sizeof RT_OPENAI_SSE_DONE - 1);
        s->is_done = true;
    }
    return s_buf_finish(&b, len);
}

/* ---- /v1/models ---- */

char *rt_openai_models_body(const char *const *models, int n_models, int64_t created, const char *owned_by,
                            size_t *len) {
    bool ok = true;
    json_t *root = json_object(), *data = json_array();
    if (!root || !data) ok = false;
    for (int i = 0; data && i < n_models; i++) {
        json_t *m = json_object();
        if (m) {
            s_set(m, "id", rt_json_text(models[i], strlen(models[i])), &ok);
            s_set(m, "object", json_string("model"), &ok);
            s_set(m, "created", json_integer(created), &ok);
            s_set(m, "owned_by", rt_json_text(owned_by, owned_by ? strlen(owned_by) : 0), &ok);
        }
        s_push(data, m, &ok);
    }
    if (root) {
        s_set(root, "object", json_string("list"), &ok);
        s_set(root, "data", data, &ok);
    } else
        json_decref(data);
    s_buf_t b = {.ok = true};
    s_buf_json(&b, root, false, ok);
    return s_buf_finish(&b, len);
}
