/* rt_core.c: the router core's model side (tokenizer, template, context length from the GGUF; never the
 * weights) and the life of a request: admission checks, the table of held requests, relaying chunks, and
 * ending every request exactly once (chunk, error, deadline, abandon). Worker traffic is rt_registry.c's. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <unistd.h>

#include "pd_log.h"
#include "rt_core_int.h"

rt_core_params_t rt_core_params_default(void) {
    return (rt_core_params_t){
        .model_path = NULL,
        .model_id = NULL,
        .control_endpoint = "tcp://127.0.0.1:5550",
        .heartbeat_ivl_ms = 250,
        .worker_timeout_ms = 2000,
        .request_timeout_ms = 600000,
        .max_inflight = 1024,
        .local_prefill_tokens = 0,
        .min_prefill_workers = 1,
        .min_decode_workers = 1,
    };
}

/* ---- ids and seeds ---- */

static uint64_t s_splitmix64(uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

static uint64_t s_random_u64(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, GRND_NONBLOCK) != (ssize_t)sizeof v) v = pd_now_us() ^ ((uint64_t)getpid() << 32);
    return v;
}

/* Request ids are a bijection of a counter from a random start: unique within this router, and unlikely to meet
 * the ids a previous router process left on workers that outlived it. */
static uint64_t s_new_id(rt_core_t *c) {
    for (;;) {
        uint64_t id = s_splitmix64(c->id_base + ++c->id_next);
        if (id != 0 && !rt_core_req_find(c, id)) return id;
    }
}

/* ---- the table of held requests (ids are already well mixed, so the low bits index it) ---- */

rt_req_t *rt_core_req_find(const rt_core_t *c, uint64_t id) {
    for (rt_req_t *r = c->buckets[id & (c->n_buckets - 1)]; r; r = r->hnext)
        if (r->id == id) return r;
    return NULL;
}

static void s_table_insert(rt_core_t *c, rt_req_t *r) {
    rt_req_t **b = &c->buckets[r->id & (c->n_buckets - 1)];
    r->hnext = *b;
    *b = r;
    c->n_inflight++;
}

static void s_table_remove(rt_core_t *c, rt_req_t *r) {
    for (rt_req_t **p = &c->buckets[r->id & (c->n_buckets - 1)]; *p; p = &(*p)->hnext) {
        if (*p == r) {
            *p = r->hnext;
            c->n_inflight--;
            return;
        }
    }
}

uint64_t *rt_core_req_ids(const rt_core_t *c, const rt_worker_t *w, int *n) {
    *n = 0;
    if (c->n_inflight == 0) return NULL;
    uint64_t *ids = pd_xmalloc(sizeof *ids * (size_t)c->n_inflight);
    for (uint64_t b = 0; b < c->n_buckets; b++)
        for (rt_req_t *r = c->buckets[b]; r; r = r->hnext)
            if (!w || r->decode == w || r->prefill == w) ids[(*n)++] = r->id;
    return ids;
}

/* ---- model ---- */

static bool s_get_i32(const eng_gguf_t *g, const char *arch, const char *suffix, int32_t *out) {
    char key[128];
    int64_t v;
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    if (!eng_gguf_get_i64(g, key, &v) || v <= 0 || v > (1 << 24)) return false;
    *out = (int32_t)v;
    return true;
}

/* The hyperparameters a worker's fingerprint must agree with, read as engine/eng_model.c reads them (the router
 * links pd_engine_core only, so it cannot call eng_model_load; tests/unit/router/test_rt_core.c checks the two
 * agree on the real model). */
static pd_status s_model_config(rt_core_t *c, const eng_gguf_t *g, char *err, size_t err_cap) {
    eng_gguf_str_t s;
    char arch[32];
    int32_t dim = 0, n_heads = 0;
    if (!eng_gguf_get_str(g, "general.architecture", &s)) {
        snprintf(err, err_cap, "model %s: missing 'general.architecture'", c->model_path);
        return PD_EINVAL;
    }
    snprintf(arch, sizeof arch, "%.*s", (int)(s.len < 31 ? s.len : 31), s.ptr);
    if (eng_gguf_get_str(g, "general.name", &s))
        snprintf(c->gguf_name, sizeof c->gguf_name, "%.*s", (int)(s.len < 127 ? s.len : 127), s.ptr);
    if (!s_get_i32(g, arch, "embedding_length", &dim) || !s_get_i32(g, arch, "block_count", &c->n_layers) ||
        !s_get_i32(g, arch, "attention.head_count", &n_heads) || dim % n_heads) {
        snprintf(err, err_cap, "model %s: missing or bad %s.embedding_length / block_count / head_count", c->model_path,
                 arch);
        return PD_EINVAL;
    }
    c->n_kv_heads = n_heads;
    s_get_i32(g, arch, "attention.head_count_kv", &c->n_kv_heads);
    c->ctx_len = 2048;
    s_get_i32(g, arch, "context_length", &c->ctx_len);
    c->head_dim = dim / n_heads;
    c->rope_dim = c->head_dim;
    s_get_i32(g, arch, "rope.dimension_count", &c->rope_dim);
    char key[128];
    double d;
    snprintf(key, sizeof key, "%s.rope.freq_base", arch);
    c->rope_theta = eng_gguf_get_f64(g, key, &d) ? (float)d : 10000.0f;
    const eng_gguf_tensor_t *emb = eng_gguf_find_tensor(g, "token_embd.weight");
    c->vocab_size = emb && emb->n_dims == 2 ? (int32_t)emb->ne[1] : 0;
    return PD_OK;
}

static pd_status s_model_load(rt_core_t *c, char *err, size_t err_cap) {
    pd_status st = PD_EINVAL;
    eng_gguf_t *g = eng_gguf_open(c->model_path, err, err_cap);
    if (!g) goto fail;
    if ((st = s_model_config(c, g, err, err_cap)) != PD_OK) goto fail;
    st = PD_EINVAL;
    if (!(c->tok = eng_tok_create(g, err, err_cap))) goto fail;
    if (c->vocab_size <= 0) c->vocab_size = eng_tok_vocab_size(c->tok);
    /* a model without a template we render still serves text and token prompts */
    c->chat = eng_chat_create(g, NULL, c->chat_err, sizeof c->chat_err);
    if (!c->chat) LOG_W("model %s: chat requests will be refused: %s", c->model_path, c->chat_err);
    /* The served id defaults to the file name up to its first dot ("SmolLM2-135M-Instruct" for
     * SmolLM2-135M-Instruct.Q4_1.gguf), as users name models; general.name is often a training-run label
     * ("Smollm2 135M 8k Lc100K Mix1 Ep2") and stays the fingerprint's model_id. */
    if (c->p.model_id && c->p.model_id[0]) {
        snprintf(c->model_id, sizeof c->model_id, "%s", c->p.model_id);
    } else {
        const char *base = strrchr(c->model_path, '/');
        base = base ? base + 1 : c->model_path;
        size_t n = strcspn(base, ".");
        snprintf(c->model_id, sizeof c->model_id, "%.*s", (int)(n ? n : strlen(base)), base);
    }
    st = PD_OK;
fail:
    eng_gguf_destroy(&g); /* the tokenizer and the template copied what they need */
    return st;
}

/* ---- create / destroy ---- */

rt_core_t *rt_core_create(pd_loop_t *loop, void *zmq_ctx, const rt_core_params_t *p, char *err, size_t err_cap) {
    char scratch[8];
    if (!err) {
        err = scratch;
        err_cap = sizeof scratch;
    }
    if (!loop || !zmq_ctx || !p || !p->model_path || !p->control_endpoint || p->heartbeat_ivl_ms <= 0 ||
        p->heartbeat_ivl_ms > UINT32_MAX || p->worker_timeout_ms <= 0 || p->request_timeout_ms <= 0 ||
        p->max_inflight <= 0 || p->max_inflight > (1 << 20) || p->local_prefill_tokens < 0 ||
        p->min_prefill_workers < 0 || p->min_decode_workers < 0) {
        snprintf(err, err_cap, "router core: bad parameters (model, endpoint, timeouts, max_inflight)");
        return NULL;
    }
    rt_core_t *c = pd_xcalloc(1, sizeof *c);
    c->loop = loop;
    c->zmq_ctx = zmq_ctx;
    c->p = *p;
    c->model_path = pd_xstrdup(p->model_path);
    c->p.model_path = c->model_path;
    c->p.model_id = NULL; /* resolved into c->model_id */
    c->p.control_endpoint = NULL;
    c->n_buckets = 64;
    while (c->n_buckets < 2 * (uint64_t)p->max_inflight) c->n_buckets *= 2;
    c->buckets = pd_xcalloc(c->n_buckets, sizeof *c->buckets);
    c->workers = pd_xcalloc(RT_MAX_WORKERS, sizeof *c->workers);
    c->id_base = s_random_u64();
    c->seed_state = s_random_u64();
    if (s_model_load(c, err, err_cap) != PD_OK) goto fail;
    snprintf(c->endpoint, sizeof c->endpoint, "%s", p->control_endpoint);
    if (rt_registry_open(c, err, err_cap) != PD_OK) goto fail;
    LOG_I("router core: model %s (id '%s', context %d, vocab %d, %d layers, %d kv heads x %d), control %s, "
          "max_inflight %lld, local_prefill_tokens %lld",
          c->model_path, c->model_id, c->ctx_len, c->vocab_size, c->n_layers, c->n_kv_heads, c->head_dim, c->endpoint,
          (long long)p->max_inflight, (long long)p->local_prefill_tokens);
    return c;
fail:
    rt_core_destroy(&c);
    return NULL;
}

void rt_core_destroy(rt_core_t **cp) {
    rt_core_t *c = cp ? *cp : NULL;
    if (!c) return;
    int n = 0;
    uint64_t *ids = c->buckets ? rt_core_req_ids(c, NULL, &n) : NULL;
    for (int i = 0; i < n; i++) {
        rt_req_t *r = rt_core_req_find(c, ids[i]);
        if (!r) continue;
        rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, NULL);
        rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE, "router shutting down");
    }
    free(ids);
    rt_registry_close(c);
    eng_chat_destroy(&c->chat);
    eng_tok_destroy(&c->tok);
    free(c->buckets);
    free(c->workers);
    free(c->model_path);
    free(c);
    *cp = NULL;
}

const char *rt_core_model_id(const rt_core_t *c) {
    return c->model_id;
}

const char *rt_core_control_endpoint(const rt_core_t *c) {
    return c->endpoint;
}

const eng_tok_t *rt_core_tokenizer(const rt_core_t *c) {
    return c->tok;
}

int32_t rt_core_max_context(const rt_core_t *c) {
    return c->ctx_len;
}

uint64_t rt_req_id(const rt_req_t *r) {
    return r->id;
}

uint32_t rt_req_prompt_tokens(const rt_req_t *r) {
    return r->n_prompt;
}

bool rt_core_is_ready(const rt_core_t *c) {
    return !c->is_draining &&
           rt_registry_n_alive(c, PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL) >= c->p.min_prefill_workers &&
           rt_registry_n_alive(c, PDSERVE__V1__WORKER_ROLE__ROLE_DECODE) >= c->p.min_decode_workers;
}

void rt_core_drain(rt_core_t *c) {
    if (!c->is_draining) LOG_I("router core: draining (%d requests in flight)", c->n_inflight);
    c->is_draining = true;
}

int32_t rt_core_n_inflight(const rt_core_t *c) {
    return c->n_inflight;
}

void rt_core_count_error(rt_core_t *c, Pdserve__V1__ErrorCode code) {
    c->n_errors[(unsigned)code < 16 ? (unsigned)code : (unsigned)PDSERVE__V1__ERROR_CODE__ERR_INTERNAL]++;
}

/* ---- admission ---- */

/* Encodes text (BOS first when the model asks for it), as pdctl generate does: special-token text is parsed
 * only in rendered chat prompts, so a completion prompt cannot smuggle control tokens in. */
static pd_status s_encode(rt_core_t *c, rt_req_t *r, const char *text, bool parse_special, char *msg, size_t cap) {
    size_t len = strlen(text);
    int64_t bos = eng_tok_add_bos(c->tok) && eng_tok_bos(c->tok) >= 0;
    int64_t guess = (int64_t)len + 16; /* BPE gives at most one token per byte (after U+FFFD repair, 3) */
    for (int pass = 0; pass < 2; pass++) {
        free(r->prompt);
        r->prompt = pd_xmalloc(sizeof *r->prompt * (size_t)(guess + bos));
        int64_t n = eng_tok_encode(c->tok, text, len, parse_special, r->prompt + bos, guess);
        if (n < 0) {
            snprintf(msg, cap, "tokenization failed (%s)", pd_strerror((pd_status)n));
            return PD_EINVAL;
        }
        if (n <= guess) {
            if (bos) r->prompt[0] = eng_tok_bos(c->tok);
            if (n + bos > (int64_t)UINT32_MAX) break;
            r->n_prompt = (uint32_t)(n + bos);
            return PD_OK;
        }
        guess = n;
    }
    snprintf(msg, cap, "prompt too long");
    return PD_EINVAL;
}

/* Encoding runs on the loop thread. The largest prompt the door lets in (1 MiB of text, 236k tokens of SmolLM2's
 * vocabulary) took 80-90 ms on this 2-core machine (session 4), a third of a heartbeat interval: move encoding to a
 * helper thread if that shows in other requests' inter-token latency. */
static pd_status s_tokenize(rt_core_t *c, rt_req_t *r, char *msg, size_t cap) {
    const Pdserve__V1__GenerateRequest *g = r->gen;
    switch (g->prompt_case) {
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT: return s_encode(c, r, g->text, false, msg, cap);
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_TOKEN_IDS: {
        const Pdserve__V1__TokenIds *t = g->token_ids;
        if (!t || t->n_ids > UINT32_MAX) break;
        for (size_t i = 0; i < t->n_ids; i++) {
            if (t->ids[i] < 0 || t->ids[i] >= c->vocab_size) {
                snprintf(msg, cap, "token_ids[%zu] = %d, must be in [0, %d)", i, t->ids[i], c->vocab_size);
                return PD_EINVAL;
            }
        }
        r->prompt = pd_xmalloc(sizeof *r->prompt * (t->n_ids ? t->n_ids : 1));
        if (t->n_ids) memcpy(r->prompt, t->ids, sizeof *r->prompt * t->n_ids);
        r->n_prompt = (uint32_t)t->n_ids;
        return PD_OK;
    }
    case PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT: {
        const Pdserve__V1__ChatMessages *m = g->chat;
        if (!c->chat) {
            snprintf(msg, cap, "model '%s' has no chat template the router can render: %s", c->model_id, c->chat_err);
            return PD_EINVAL;
        }
        if (!m || m->n_messages == 0 || m->n_messages > INT32_MAX) break;
        eng_chat_msg_t *msgs = pd_xmalloc(sizeof *msgs * m->n_messages);
        for (size_t i = 0; i < m->n_messages; i++)
            msgs[i] = (eng_chat_msg_t){m->messages[i]->role, m->messages[i]->content};
        int64_t len = eng_chat_render(c->chat, msgs, (int)m->n_messages, true, NULL, 0);
        char *text = len >= 0 ? pd_xmalloc((size_t)len + 1) : NULL;
        if (text && eng_chat_render(c->chat, msgs, (int)m->n_messages, true, text, (size_t)len + 1) != len) len = -1;
        free(msgs);
        pd_status st = PD_EINVAL;
        if (len < 0)
            snprintf(msg, cap, "the chat template could not render these messages");
        else
            st = s_encode(c, r, text, true, msg, cap);
        free(text);
        return st;
    }
    default: break;
    }
    snprintf(msg, cap, "prompt: one of text, token_ids or chat must be set");
    return PD_EINVAL;
}

/* prompt < context, prompt + max_tokens <= context (max_tokens 0 = the rest of the context). */
static pd_status s_check_lengths(const rt_core_t *c, rt_req_t *r, char *msg, size_t cap) {
    uint64_t n = r->n_prompt, ctx = (uint64_t)c->ctx_len, want = r->gen->max_tokens;
    if (n == 0) {
        snprintf(msg, cap, "prompt is empty after tokenization");
        return PD_EINVAL;
    }
    if (n >= ctx) {
        snprintf(msg, cap, "prompt has %llu tokens, the context length is %llu", (unsigned long long)n,
                 (unsigned long long)ctx);
        return PD_EINVAL;
    }
    if (want == 0) want = ctx - n;
    if (n + want > ctx) { /* vLLM's wording, which clients already parse */
        snprintf(msg, cap,
                 "This model's maximum context length is %llu tokens. However, you requested %llu tokens (%llu in "
                 "the %s, %llu in the completion). Please reduce the length of the %s or completion.",
                 (unsigned long long)ctx, (unsigned long long)(n + want), (unsigned long long)n,
                 r->gen->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT ? "messages" : "prompt",
                 (unsigned long long)want,
                 r->gen->prompt_case == PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT ? "messages" : "prompt");
        return PD_EINVAL;
    }
    r->max_tokens = (uint32_t)want;
    return PD_OK;
}

static void s_req_free(rt_req_t *r) {
    if (!r) return;
    if (r->gen) pb_free_generate_request(&r->gen, NULL);
    free(r->prompt);
    free(r->tried);
    free(r);
}

static void s_on_deadline(pd_loop_t *l, void *ud);

rt_req_t *rt_core_submit(rt_core_t *c, Pdserve__V1__GenerateRequest **req, rt_chunk_fn fn, void *ud,
                         Pdserve__V1__ErrorCode *code, char *msg, size_t msg_cap) {
    Pdserve__V1__ErrorCode scratch_code;
    char scratch[8];
    if (!code) code = &scratch_code;
    if (!msg) {
        msg = scratch;
        msg_cap = sizeof scratch;
    }
    *code = PDSERVE__V1__ERROR_CODE__ERR_INVALID_ARGUMENT;
    rt_req_t *r = pd_xcalloc(1, sizeof *r);
    r->gen = req ? *req : NULL;
    if (req) *req = NULL;
    if (!c || !r->gen || !fn) {
        snprintf(msg, msg_cap, "bad arguments");
        goto fail;
    }
    r->core = c;
    r->fn = fn;
    r->ud = ud;
    r->created_us = pd_now_us();
    const Pdserve__V1__GenerateRequest *g = r->gen;
    if (g->model && g->model[0] && strcmp(g->model, c->model_id) != 0) {
        *code = PDSERVE__V1__ERROR_CODE__ERR_NOT_FOUND;
        snprintf(msg, msg_cap, "The model `%.*s` does not exist.", PB_MAX_ID_BYTES, g->model);
        goto fail;
    }
    /* the client's mistakes first, so they are reported even while no worker is up */
    if (s_tokenize(c, r, msg, msg_cap) != PD_OK || s_check_lengths(c, r, msg, msg_cap) != PD_OK) goto fail;
    *code = PDSERVE__V1__ERROR_CODE__ERR_UNAVAILABLE;
    if (c->is_draining) {
        snprintf(msg, msg_cap, "shutting down");
        goto fail;
    }
    if (c->n_inflight >= c->p.max_inflight) {
        *code = PDSERVE__V1__ERROR_CODE__ERR_RESOURCE_EXHAUSTED;
        snprintf(msg, msg_cap, "too many requests in flight (%lld)", (long long)c->p.max_inflight);
        goto fail;
    }
    if (rt_registry_n_alive(c, PDSERVE__V1__WORKER_ROLE__ROLE_DECODE) == 0) {
        snprintf(msg, msg_cap, "no decode worker available");
        goto fail;
    }
    int n_prefill = rt_registry_n_alive(c, PDSERVE__V1__WORKER_ROLE__ROLE_PREFILL);
    r->is_local =
        (int64_t)r->n_prompt <= c->p.local_prefill_tokens || (n_prefill == 0 && c->p.min_prefill_workers == 0);
    if (!r->is_local && n_prefill == 0) {
        snprintf(msg, msg_cap, "no prefill worker available");
        goto fail;
    }
    r->seed =
        g->sampling && g->sampling->has_seed ? g->sampling->seed : s_splitmix64(c->seed_state++) & (uint64_t)INT64_MAX;
    int64_t timeout_ms = g->timeout_ms ? (int64_t)g->timeout_ms : c->p.request_timeout_ms;
    r->deadline_us = r->created_us + (uint64_t)timeout_ms * 1000u;
    r->id = s_new_id(c);
    s_table_insert(c, r);
    if (rt_registry_dispatch_decode(c, r) != PD_OK) {
        s_table_remove(c, r);
        snprintf(msg, msg_cap, "no decode worker reachable");
        goto fail;
    }
    r->timer_id = pd_loop_add_timer(c->loop, timeout_ms, false, s_on_deadline, r);
    if (r->timer_id < 0) PD_FATAL("router core: cannot add a timer (%s)", pd_strerror((pd_status)r->timer_id));
    LOG_D("req=%016llx admitted: %u prompt tokens, max_tokens %u, %s, decode %s", (unsigned long long)r->id,
          r->n_prompt, r->max_tokens, r->is_local ? "local prefill" : "remote prefill", r->decode->id);
    *code = PDSERVE__V1__ERROR_CODE__ERR_NONE;
    msg[0] = '\0';
    return r;
fail:
    if (c) {
        c->n_outcome[RT_OUT_REJECTED]++;
        rt_core_count_error(c, *code);
        if (r->decode) rt_registry_detach(c, r);
    }
    s_req_free(r);
    return NULL;
}

/* ---- ending ---- */

/* The one exit of every request: out of the table, timer and worker charges dropped, the last chunk (if any) to
 * the front end, freed. */
static void s_req_finish(rt_core_t *c, rt_req_t *r, const Pdserve__V1__ResponseChunk *last) {
    r->is_ending = true;
    s_table_remove(c, r);
    if (r->timer_id > 0) pd_loop_cancel_timer(c->loop, r->timer_id);
    rt_registry_detach(c, r);
    if (last) {
        r->in_callback = true;
        r->fn(r->ud, last);
    }
    s_req_free(r);
}

void rt_core_req_fail(rt_core_t *c, rt_req_t *r, Pdserve__V1__ErrorCode code, const char *fmt, ...) {
    char text[PB_MAX_ERROR_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    Pdserve__V1__Error err = PDSERVE__V1__ERROR__INIT;
    err.code = code;
    err.message = text;
    Pdserve__V1__Usage usage = PDSERVE__V1__USAGE__INIT;
    usage.prompt_tokens = r->n_prompt;
    usage.completion_tokens = r->n_completion;
    Pdserve__V1__ResponseChunk chunk = PDSERVE__V1__RESPONSE_CHUNK__INIT;
    chunk.request_id = r->id;
    chunk.finish_reason = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    chunk.error = &err;
    chunk.usage = &usage;
    if (!r->has_chunk) chunk.seed = r->seed;
    c->n_outcome[RT_OUT_ERROR]++;
    rt_core_count_error(c, code);
    LOG_I("req=%016llx failed: %s %s", (unsigned long long)r->id, pb_error_code_name(code), text);
    s_req_finish(c, r, &chunk);
}

static void s_abandon_now(rt_core_t *c, rt_req_t *r) {
    rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, NULL);
    c->n_outcome[RT_OUT_CANCELLED]++;
    LOG_D("req=%016llx abandoned by its front end", (unsigned long long)r->id);
    s_req_finish(c, r, NULL);
}

void rt_core_abandon(rt_core_t *c, rt_req_t *r) {
    if (!c || !r || r->is_ending) return; /* inside its last chunk's callback: it is ending anyway */
    if (r->in_callback) {                 /* freed when the callback returns */
        r->is_abandoned = true;
        return;
    }
    s_abandon_now(c, r);
}

static void s_on_deadline(pd_loop_t *l, void *ud) {
    (void)l;
    rt_req_t *r = ud;
    rt_core_t *c = r->core;
    r->timer_id = 0; /* fired: nothing to cancel */
    rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, NULL);
    rt_core_req_fail(c, r, PDSERVE__V1__ERROR_CODE__ERR_DEADLINE_EXCEEDED, "deadline exceeded after %llu ms",
                     (unsigned long long)((pd_now_us() - r->created_us) / 1000u));
}

static void s_observe(uint64_t *buckets, const double *bounds, int n_bounds, uint64_t *count, double *sum, double v) {
    int i = 0;
    while (i < n_bounds && v > bounds[i]) i++;
    buckets[i]++; /* non-cumulative here; rt_core_metrics sums them */
    (*count)++;
    *sum += v;
}

void rt_core_req_relay(rt_core_t *c, rt_req_t *r, Pdserve__V1__ResponseChunk *chunk) {
    bool is_last = chunk->finish_reason != PDSERVE__V1__FINISH_REASON__FINISH_NONE;
    bool is_first = !r->has_chunk;
    uint64_t now = pd_now_us();
    if (chunk->n_token_ids > 0) {
        if (!r->has_token)
            s_observe(c->ttft_buckets, rt_ttft_bounds, RT_N_TTFT_BUCKETS, &c->ttft_count, &c->ttft_sum,
                      (double)(now - r->created_us) * 1e-6);
        else
            s_observe(c->itl_buckets, rt_itl_bounds, RT_N_ITL_BUCKETS, &c->itl_count, &c->itl_sum,
                      (double)(now - r->last_token_us) * 1e-6);
        r->has_token = true;
        r->last_token_us = now;
        r->n_completion += (uint32_t)chunk->n_token_ids;
    }
    r->state = RT_REQ_RUNNING;
    /* the KV reached the decode worker: the prefill worker is done with it, and losing it no longer matters */
    if (r->prefill && !(is_last && is_first && chunk->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR)) {
        r->prefill->n_reqs--;
        r->prefill = NULL;
    }
    chunk->request_id = r->id;
    if (is_first) chunk->seed = r->seed;
    r->has_chunk = true;
    Pdserve__V1__Usage *worker_usage = chunk->usage, usage = PDSERVE__V1__USAGE__INIT;
    if (!is_last) {
        r->in_callback = true;
        r->fn(r->ud, chunk);
        r->in_callback = false;
        if (r->is_abandoned) s_abandon_now(c, r);
        return;
    }
    usage.prompt_tokens = r->n_prompt;
    usage.completion_tokens = r->n_completion;
    if (worker_usage) {
        if (worker_usage->completion_tokens) usage.completion_tokens = worker_usage->completion_tokens;
        usage.cached_prompt_tokens = worker_usage->cached_prompt_tokens;
    }
    chunk->usage = &usage;
    switch (chunk->finish_reason) {
    case PDSERVE__V1__FINISH_REASON__FINISH_STOP: c->n_outcome[RT_OUT_STOP]++; break;
    case PDSERVE__V1__FINISH_REASON__FINISH_LENGTH: c->n_outcome[RT_OUT_LENGTH]++; break;
    case PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED: c->n_outcome[RT_OUT_CANCELLED]++; break;
    default:
        c->n_outcome[RT_OUT_ERROR]++;
        rt_core_count_error(c, chunk->error ? chunk->error->code : PDSERVE__V1__ERROR_CODE__ERR_INTERNAL);
        /* the decode worker gave up before any token: the prefill worker may still be working on it */
        if (r->prefill) rt_registry_cancel(c, r, PDSERVE__V1__ERROR_CODE__ERR_CANCELLED, r->decode);
        break;
    }
    LOG_D("req=%016llx finished: %s, %u tokens", (unsigned long long)r->id,
          pb_enum_name(&pdserve__v1__finish_reason__descriptor, chunk->finish_reason), usage.completion_tokens);
    s_req_finish(c, r, chunk);
    chunk->usage = worker_usage; /* the caller frees the message it unpacked */
}
