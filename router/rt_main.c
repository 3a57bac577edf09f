/* rt_main.c: pd-router. Parses the config, wires the core, the native API and the HTTP front end on one loop,
 * prints the ready line, and on SIGTERM / SIGINT drains (health and new requests 503, held requests finish,
 * at most router.drain_timeout) before tearing everything down in reverse order.
 * Exit codes: 0 after a signal, 1 runtime failure (a port in use, a loop failure), 2 bad config. */
#define _POSIX_C_SOURCE 200809L /* access */
#include <arpa/inet.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "pd_config.h"
#include "pd_log.h"
#include "pd_loop.h"
#include "rt_core.h"
#include "rt_http.h"
#include "rt_native.h"

#ifndef PD_VERSION
#define PD_VERSION "0.1.0"
#endif

typedef struct {
    char *http_addr, *control, *api, *model, *model_id;
    int64_t http_port, heartbeat_ivl, worker_timeout, request_timeout, max_inflight, local_prefill_tokens;
    int64_t min_prefill, min_decode, max_body, http_timeout, sse_buffer, sse_keepalive, drain_timeout;
} rt_config_t;

#define S_OPT(k, t, d, lo, hi, h)                                                                                   \
    {                                                                                                               \
        .section = "router", .key = #k, .type = t, PD_CONFIG_FIELD(rt_config_t, k), .def = d, .min = lo, .max = hi, \
        .help = h                                                                                                   \
    }
static const pd_opt_t s_opts[] = {
    S_OPT(http_addr, PD_OPT_STRING, "127.0.0.1", 0, 0, "HTTP bind address, an IPv4 or IPv6 literal"),
    S_OPT(http_port, PD_OPT_INT64, "8000", 0, 65535, "HTTP port (0 = any free one, shown in the ready line)"),
    S_OPT(control, PD_OPT_ENDPOINT, "tcp://127.0.0.1:5550", 0, 0, "ROUTER socket the workers connect to"),
    {.section = "router",
     .key = "api",
     .type = PD_OPT_ENDPOINT,
     PD_CONFIG_FIELD(rt_config_t, api),
     .def = "tcp://127.0.0.1:5551",
     .flags = PD_OPT_ALLOW_EMPTY,
     .help = "native protobuf API (empty = off)"},
    S_OPT(model, PD_OPT_STRING, NULL, 0, 0, "GGUF file: tokenizer, chat template, model id, context (required)"),
    S_OPT(model_id, PD_OPT_STRING, "", 0, 0, "served model id (empty = the GGUF's general.name)"),
    S_OPT(heartbeat_ivl, PD_OPT_DURATION, "250ms", 10, 60000, "worker heartbeat interval asked at registration"),
    S_OPT(worker_timeout, PD_OPT_DURATION, "2s", 50, 3600000, "a worker silent this long is out, its requests fail"),
    S_OPT(request_timeout, PD_OPT_DURATION, "10m", 1, 86400000, "deadline of a request that names none"),
    S_OPT(max_inflight, PD_OPT_INT64, "1024", 1, 1048576, "requests held at once; more get 429"),
    S_OPT(local_prefill_tokens, PD_OPT_INT64, "0", 0, 16777216, "prompts up to this many tokens prefill on decode"),
    S_OPT(min_prefill, PD_OPT_INT64, "1", 0, 4096, "prefill workers needed to be ready"),
    S_OPT(min_decode, PD_OPT_INT64, "1", 1, 4096, "decode workers needed to be ready"),
    S_OPT(max_body, PD_OPT_SIZE, "4MiB", 1024, 1073741824, "largest HTTP request body (413 past it)"),
    S_OPT(http_timeout, PD_OPT_DURATION, "30s", 100, 3600000, "a request's head and body must arrive within this"),
    S_OPT(sse_buffer, PD_OPT_SIZE, "1MiB", 4096, 1073741824, "unsent SSE bytes per stream before it is cut"),
    S_OPT(sse_keepalive, PD_OPT_DURATION, "15s", 100, 3600000, "SSE comment after this much silence"),
    S_OPT(drain_timeout, PD_OPT_DURATION, "30s", 0, 3600000, "on SIGTERM, wait this long for held requests"),
};
static const char *const s_other_sections[] = {"engine", "prefill", "decode", NULL};
static const pd_config_spec_t s_spec = {.program = "pd-router",
                                        .summary = "pdserve router: OpenAI HTTP and native API, workers' registry",
                                        .opts = s_opts,
                                        .n_opts = sizeof s_opts / sizeof s_opts[0],
                                        .other_sections = s_other_sections};

/* The service's top-level context (STYLE §3: the one mutable thing main owns). */
typedef struct {
    pd_loop_t *loop;
    rt_core_t *core;
    rt_http_t *http;
    int64_t drain_timeout_ms;
    uint64_t drain_start_us;
    bool is_draining;
} s_router_t;

static void s_on_drain_tick(pd_loop_t *l, void *ud) {
    s_router_t *r = ud;
    bool is_idle = rt_core_n_inflight(r->core) == 0 && rt_http_n_active(r->http) == 0;
    if (is_idle || pd_now_us() - r->drain_start_us >= (uint64_t)r->drain_timeout_ms * 1000u) {
        if (!is_idle) LOG_W("drain timeout: %" PRId32 " request(s) still held are cut", rt_core_n_inflight(r->core));
        pd_loop_stop(l);
    }
}

static void s_on_signal(pd_loop_t *l, void *ud) {
    s_router_t *r = ud;
    if (r->is_draining) { /* a second signal: stop now */
        pd_loop_stop(l);
        return;
    }
    r->is_draining = true;
    r->drain_start_us = pd_now_us();
    LOG_I("signal: draining (%" PRId32 " request(s) held, up to %" PRId64 " ms)", rt_core_n_inflight(r->core),
          r->drain_timeout_ms);
    rt_core_drain(r->core);
    if (pd_loop_add_timer(l, 20, true, s_on_drain_tick, r) <= 0) pd_loop_stop(l);
}

/* Checks what the table cannot: PD_OK or one line in err. */
static pd_status s_check(const rt_config_t *c, char *err, size_t cap) {
    unsigned char ip[16];
    if (!c->model || !c->model[0]) return snprintf(err, cap, "router.model is required (a GGUF file)"), PD_EINVAL;
    if (access(c->model, R_OK) != 0) return snprintf(err, cap, "router.model: cannot read %s", c->model), PD_EINVAL;
    if (inet_pton(AF_INET, c->http_addr, ip) != 1 && inet_pton(AF_INET6, c->http_addr, ip) != 1)
        return snprintf(err, cap, "router.http_addr: '%s' is not an IP address", c->http_addr), PD_EINVAL;
    return PD_OK;
}

int main(int argc, char **argv) {
    pd_log_init("pd-router", PD_LOG_INFO);
    rt_config_t cfg = {0};
    pd_config_args_t args = {0};
    char err[512] = "";
    int rc = 2;
    s_router_t r = {0};
    void *zctx = NULL;
    rt_native_t *native = NULL;
    if (pd_config_parse_args(&s_spec, argc, argv, &cfg, &args, err, sizeof err) != PD_OK ||
        (!args.is_help && !args.is_print_config && s_check(&cfg, err, sizeof err) != PD_OK))
        goto fail;
    rc = 0;
    if (args.is_help) pd_config_print_help(&s_spec, stdout);
    char *json = pd_config_to_json(&s_spec, &cfg, !args.is_print_config);
    if (args.is_print_config && json) printf("%s\n", json);
    if (!args.is_help && !args.is_print_config) LOG_I("pd-router %s: %s", PD_VERSION, json ? json : "(config)");
    free(json);
    if (args.is_help || args.is_print_config) goto fail;

    rc = 1;
    r.drain_timeout_ms = cfg.drain_timeout;
    zctx = zmq_ctx_new();
    r.loop = pd_loop_create();
    if (!zctx || !r.loop) goto fail;
    rt_core_params_t cp = rt_core_params_default();
    cp.model_path = cfg.model, cp.model_id = cfg.model_id, cp.control_endpoint = cfg.control;
    cp.heartbeat_ivl_ms = cfg.heartbeat_ivl, cp.worker_timeout_ms = cfg.worker_timeout;
    cp.request_timeout_ms = cfg.request_timeout, cp.max_inflight = cfg.max_inflight;
    cp.local_prefill_tokens = cfg.local_prefill_tokens;
    cp.min_prefill_workers = cfg.min_prefill, cp.min_decode_workers = cfg.min_decode;
    if (!(r.core = rt_core_create(r.loop, zctx, &cp, err, sizeof err))) goto fail;
    if (cfg.api[0]) {
        rt_native_params_t np = rt_native_params_default();
        np.endpoint = cfg.api;
        if (!(native = rt_native_create(r.loop, zctx, r.core, &np, err, sizeof err))) goto fail;
    }
    rt_http_params_t hp = rt_http_params_default();
    hp.bind_addr = cfg.http_addr, hp.port = (int32_t)cfg.http_port, hp.max_body_bytes = cfg.max_body;
    hp.connection_timeout_ms = cfg.http_timeout, hp.sse_buffer_bytes = cfg.sse_buffer;
    hp.sse_keepalive_ms = cfg.sse_keepalive;
    if (!(r.http = rt_http_create(r.loop, r.core, &hp, err, sizeof err))) goto fail;
    if (pd_loop_catch_signals(r.loop, s_on_signal, &r) != PD_OK) {
        snprintf(err, sizeof err, "cannot catch signals");
        goto fail;
    }
    bool is_v6 = strchr(cfg.http_addr, ':') != NULL;
    printf("pd-router ready http=http://%s%s%s:%" PRId32 " api=%s control=%s\n", is_v6 ? "[" : "", cfg.http_addr,
           is_v6 ? "]" : "", rt_http_port(r.http), native ? rt_native_endpoint(native) : "off",
           rt_core_control_endpoint(r.core));
    fflush(stdout);
    snprintf(err, sizeof err, "event loop failed");
    if (pd_loop_run(r.loop) == PD_OK) rc = 0;
    LOG_I("pd-router: stopping (exit %d)", rc);
fail: /* also the normal way out: everything below accepts NULL */
    if (rc != 0)
        fprintf(stderr, "pd-router: %s%s\n", err[0] ? err : "out of memory",
                rc == 2 && !strstr(err, "--help") ? " (see --help)" : "");
    rt_http_destroy(&r.http);
    rt_native_destroy(&native);
    rt_core_destroy(&r.core);
    pd_loop_destroy(&r.loop);
    if (zctx) zmq_ctx_term(zctx);
    pd_config_free(&s_spec, &cfg);
    return rc;
}
