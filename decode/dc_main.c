/* dc_main.c: pd-decode. Parses the config (sections "engine" and "decode"), loads the engine, runs the decode
 * service on one event loop until SIGTERM / SIGINT has drained it. Exit codes: 0 clean shutdown, 1 runtime
 * error (the router refused this worker, the engine or service could not start), 2 bad config. */
#define _POSIX_C_SOURCE 200809L /* access */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "dc_service.h"
#include "eng.h"
#include "pd_config.h"
#include "pd_log.h"
#include "pd_loop.h"

typedef struct {
    /* engine (shared with pd-prefill: same keys) */
    char *model;
    int backend;
    int64_t gpu, threads, kv_mem, max_batch_tokens, max_batch_seqs, gemm_tune_rows;
    /* decode */
    char *router, *id, *kv_bind;
    int64_t max_batch, max_seqs, prefill_chunk_tokens;
    bool kv_cuda_ipc;
    /* speculative decoding */
    int spec;
    char *draft_model;
    int64_t spec_k, ngram_min, ngram_max, ngram_short_k, spec_max_step_drafts, draft_catchup_tokens, draft_kv_mem;
    bool spec_fixed_k;
} dc_config_t;

static const char *const s_spec_modes[] = {"off", "ngram", "draft", NULL}; /* dc_spec_mode_t's order */
static const char *const s_backends[] = {"cpu", "cuda", NULL};             /* eng_backend_kind_t order */

#define F(f) PD_CONFIG_FIELD(dc_config_t, f)
/* One option per two lines reads better than clang-format's one field per line. */
/* clang-format off */
static const pd_opt_t s_opts[] = {
    {.section = "engine", .key = "model", .type = PD_OPT_STRING, F(model), .help = "GGUF model file (required)"},
    {.section = "engine", .key = "backend", .type = PD_OPT_ENUM, F(backend), .def = "cpu", .choices = s_backends,
     .help = "compute backend (cuda: a binary built with -DPDSERVE_CUDA=ON)"},
    {.section = "engine", .key = "gpu", .type = PD_OPT_INT64, F(gpu), .def = "0", .min = 0, .max = 64,
     .help = "CUDA device index (engine.backend cuda)"},
    {.section = "engine", .key = "threads", .type = PD_OPT_INT64, F(threads), .def = "0", .min = 0, .max = 1024,
     .help = "CPU compute threads, 0 = one per core"},
    {.section = "engine", .key = "kv_mem", .type = PD_OPT_SIZE, F(kv_mem), .def = "512MiB", .min = 1 << 20,
     .max = 1099511627776.0, .help = "KV block pool size"},
    {.section = "engine", .key = "max_batch_tokens", .type = PD_OPT_INT64, F(max_batch_tokens), .def = "2048", .min = 1,
     .max = 1 << 20, .help = "most new tokens in one forward"},
    {.section = "engine", .key = "max_batch_seqs", .type = PD_OPT_INT64, F(max_batch_seqs), .def = "256", .min = 1,
     .max = 65536, .help = "most sequences in one forward"},
    {.section = "engine", .key = "gemm_tune_rows", .type = PD_OPT_INT64, F(gemm_tune_rows), .def = "0", .min = 0,
     .max = 256, .help = "cuda: time GEMM algorithms at startup for 16..N-token batches and keep the fastest (0: off)"},
    {.section = "decode", .key = "router", .type = PD_OPT_ENDPOINT, F(router), .def = "tcp://127.0.0.1:5550",
     .help = "the router's control endpoint"},
    {.section = "decode", .key = "id", .type = PD_OPT_STRING, F(id), .def = "decode-0",
     .help = "worker id (unique among workers; printable, no spaces)"},
    {.section = "decode", .key = "kv_bind", .type = PD_OPT_ENDPOINT, F(kv_bind), .def = "tcp://127.0.0.1:0",
     .flags = PD_OPT_ALLOW_PORT0, .help = "KV receiver bind endpoint (tcp port 0 = any free one; the bound one is advertised)"},
    {.section = "decode", .key = "max_batch", .type = PD_OPT_INT64, F(max_batch), .def = "64", .min = 1, .max = 65536,
     .help = "sequences decoded per step"},
    {.section = "decode", .key = "max_seqs", .type = PD_OPT_INT64, F(max_seqs), .def = "256", .min = 1, .max = 65536,
     .help = "requests held at once (waiting for KV, prefilling, decoding)"},
    {.section = "decode", .key = "prefill_chunk_tokens", .type = PD_OPT_INT64, F(prefill_chunk_tokens), .min = 0,
     .def = "256", .max = 1 << 20, .help = "local prefill tokens per step (prefill_locally requests; 0 = refused)"},
    {.section = "decode", .key = "kv_cuda_ipc", .type = PD_OPT_BOOL, F(kv_cuda_ipc), .def = "true",
     .help = "cuda: copy KV device to device from prefill workers on the same GPU (else through host memory)"},
    {.section = "decode", .key = "spec", .type = PD_OPT_ENUM, F(spec), .def = "off", .choices = s_spec_modes,
     .help = "speculative decoding: n-gram prompt lookup or a draft model (decode.draft_model)"},
    {.section = "decode", .key = "spec_k", .type = PD_OPT_INT64, F(spec_k), .def = "7", .min = 1,
     .max = DC_MAX_TOKENS_PER_SEQ - 1, .help = "most drafts per sequence per step (adaptive below that)"},
    {.section = "decode", .key = "spec_fixed_k", .type = PD_OPT_BOOL, F(spec_fixed_k), .def = "false",
     .help = "always draft up to spec_k (no cost model); for tests and comparisons"},
    {.section = "decode", .key = "ngram_min", .type = PD_OPT_INT64, F(ngram_min), .def = "2", .min = 1, .max = 64,
     .help = "n-gram lookup: shortest match used"},
    {.section = "decode", .key = "ngram_short_k", .type = PD_OPT_INT64, F(ngram_short_k), .def = "0", .min = 0,
     .max = DC_MAX_TOKENS_PER_SEQ - 1,
     .help = "n-gram lookup: where no ngram_min+ match is found, up to this many drafts from a one-token match "
             "(their acceptance tracked apart; 0: none)"},
    {.section = "decode", .key = "ngram_max", .type = PD_OPT_INT64, F(ngram_max), .def = "4", .min = 1, .max = 64,
     .help = "n-gram lookup: longest match tried (first)"},
    {.section = "decode", .key = "spec_max_step_drafts", .type = PD_OPT_INT64, F(spec_max_step_drafts), .def = "64",
     .min = 1, .max = 65536, .help = "most draft tokens per step, all sequences together"},
    {.section = "decode", .key = "draft_model", .type = PD_OPT_STRING, F(draft_model), .def = "",
     .help = "GGUF draft model with the model's tokenizer (decode.spec=draft; see deploy/make_draft.py)"},
    {.section = "decode", .key = "draft_kv_mem", .type = PD_OPT_SIZE, F(draft_kv_mem), .def = "128MiB",
     .min = 1 << 20, .max = 1099511627776.0, .help = "the draft model's KV block pool"},
    {.section = "decode", .key = "draft_catchup_tokens", .type = PD_OPT_INT64, F(draft_catchup_tokens), .def = "512",
     .min = 1, .max = 1 << 20, .help = "prompt tokens the draft model may catch up on per step"},
};
/* clang-format on */
#undef F

static const char *const s_other_sections[] = {"router", "prefill", NULL};
static const pd_config_spec_t s_spec = {.program = "pd-decode",
                                        .summary = "decode worker: KV and first token in, token stream out",
                                        .opts = s_opts,
                                        .n_opts = sizeof s_opts / sizeof s_opts[0],
                                        .other_sections = s_other_sections};

typedef struct {
    dc_service_t *svc;
    const dc_config_t *cfg;
    bool is_ready_printed;
} s_main_t;

static void s_on_registered(void *ud) {
    s_main_t *m = ud;
    if (m->is_ready_printed) return;
    m->is_ready_printed = true;
    printf("pd-decode ready id=%s kv=%s router=%s\n", m->cfg->id, dc_service_kv_endpoint(m->svc), m->cfg->router);
    fflush(stdout);
}

static void s_on_signal(pd_loop_t *l, void *ud) {
    (void)l;
    s_main_t *m = ud;
    if (m->svc) dc_service_drain(m->svc);
}

/* Config problems the table cannot express. 2 = bad config, 0 = fine. */
static int s_check(const dc_config_t *c) {
    if (!c->model || !c->model[0] || access(c->model, R_OK) != 0) {
        fprintf(stderr, "pd-decode: engine.model: %s\n",
                c->model && c->model[0] ? "cannot read the file" : "required (--engine.model=PATH)");
        return 2;
    }
    if (c->spec == DC_SPEC_DRAFT && (!c->draft_model || !c->draft_model[0] || access(c->draft_model, R_OK) != 0)) {
        fprintf(stderr, "pd-decode: decode.draft_model: %s\n",
                c->draft_model && c->draft_model[0] ? "cannot read the file" : "required with decode.spec=draft");
        return 2;
    }
    if (c->ngram_max < c->ngram_min) {
        fprintf(stderr, "pd-decode: decode.ngram_max %lld must be >= decode.ngram_min %lld\n", (long long)c->ngram_max,
                (long long)c->ngram_min);
        return 2;
    }
    int64_t rows = c->max_batch + dc_sched_params_default().max_prefill_seqs;
    int64_t per_row = c->spec == DC_SPEC_OFF ? 1 : 1 + c->spec_k; /* a decode row and its drafts */
    if (rows > c->max_batch_seqs || c->max_batch * per_row + c->prefill_chunk_tokens > c->max_batch_tokens) {
        fprintf(stderr,
                "pd-decode: decode.max_batch %lld (+%lld local-prefill rows) must fit engine.max_batch_seqs %lld, and "
                "with %lld tokens per row and decode.prefill_chunk_tokens %lld engine.max_batch_tokens %lld\n",
                (long long)c->max_batch, (long long)(rows - c->max_batch), (long long)c->max_batch_seqs,
                (long long)per_row, (long long)c->prefill_chunk_tokens, (long long)c->max_batch_tokens);
        return 2;
    }
    return 0;
}

/* The model, or with is_draft the draft model: same backend and threads; the draft has its own (smaller) KV pool
 * and takes a step's catch-up tokens plus one per row in a forward. */
static eng_t *s_engine_create(const dc_config_t *c, bool is_draft, char *err, size_t err_cap) {
    eng_params_t ep = eng_params_default();
    ep.model_path = is_draft ? c->draft_model : c->model;
    ep.backend = (eng_backend_kind_t)c->backend;
    ep.gpu = (int32_t)c->gpu;
    ep.kv_host_mirror = !is_draft; /* kvtransfer writes the target's KV into host memory: the GPU pool's copy */
    ep.n_threads = (int32_t)c->threads;
    ep.kv_mem_bytes = (uint64_t)(is_draft ? c->draft_kv_mem : c->kv_mem);
    ep.max_batch_tokens = (int32_t)(is_draft ? c->draft_catchup_tokens + c->max_batch : c->max_batch_tokens);
    ep.max_batch_seqs = (int32_t)c->max_batch_seqs;
    ep.gemm_tune_rows = is_draft ? 0 : (int32_t)c->gemm_tune_rows;
    char why[400];
    eng_t *e = eng_create(&ep, why, sizeof why); /* it logs the model and KV pool summary */
    if (!e) snprintf(err, err_cap, "%s%s: %s", is_draft ? "draft model " : "", ep.model_path, why);
    return e;
}

int main(int argc, char **argv) {
    dc_config_t cfg = {0};
    pd_config_args_t args;
    char err[512] = "";
    int rc = 2;
    eng_t *eng = NULL, *draft = NULL;
    pd_loop_t *loop = NULL;
    void *zctx = NULL;
    s_main_t m = {.cfg = &cfg};

    pd_log_init("pd-decode", PD_LOG_INFO);
    if (pd_config_parse_args(&s_spec, argc, argv, &cfg, &args, err, sizeof err) != PD_OK) {
        fprintf(stderr, "pd-decode: %s\n", err);
        goto fail;
    }
    if (args.is_help || args.is_print_config) {
        if (args.is_help) pd_config_print_help(&s_spec, stdout);
        char *json = args.is_help ? NULL : pd_config_to_json(&s_spec, &cfg, false);
        if (json) printf("%s\n", json);
        free(json);
        rc = 0;
        goto fail;
    }
    if ((rc = s_check(&cfg)) != 0) goto fail;
    rc = 1;
    char *json = pd_config_to_json(&s_spec, &cfg, true);
    LOG_I("pd-decode %s, config %s", PD_VERSION, json ? json : "?");
    free(json);

    eng = s_engine_create(&cfg, false, err, sizeof err);
    if (eng && cfg.spec == DC_SPEC_DRAFT && !(draft = s_engine_create(&cfg, true, err, sizeof err))) {
        LOG_E("%s", err);
        rc = 2;
        goto fail;
    }
    loop = eng ? pd_loop_create() : NULL;
    zctx = loop ? zmq_ctx_new() : NULL;
    if (!zctx) {
        LOG_E("%s", eng ? "cannot create the event loop or the ZeroMQ context" : err);
        goto fail;
    }
    dc_service_params_t sp = dc_service_params_default();
    sp.eng = eng, sp.loop = loop, sp.zmq_ctx = zctx;
    sp.router_endpoint = cfg.router, sp.worker_id = cfg.id, sp.kv_bind = cfg.kv_bind;
    sp.max_batch = (int32_t)cfg.max_batch;
    sp.max_seqs = (int32_t)cfg.max_seqs;
    sp.prefill_chunk_tokens = (int32_t)cfg.prefill_chunk_tokens;
    sp.is_kv_device = cfg.kv_cuda_ipc;
    sp.spec = (dc_spec_mode_t)cfg.spec;
    sp.spec_k = (int32_t)cfg.spec_k, sp.ngram_min = (int32_t)cfg.ngram_min, sp.ngram_max = (int32_t)cfg.ngram_max;
    sp.ngram_short_k = (int32_t)cfg.ngram_short_k;
    sp.spec_max_step_drafts = (int32_t)cfg.spec_max_step_drafts;
    sp.spec_fixed_k = cfg.spec_fixed_k;
    sp.draft_catchup_tokens = (int32_t)cfg.draft_catchup_tokens;
    sp.draft_eng = draft;
    sp.on_registered = s_on_registered, sp.ud = &m;
    m.svc = dc_service_create(&sp, err, sizeof err);
    if (!m.svc) {
        LOG_E("%s", err);
        rc = strncmp(err, "decode", 6) == 0 || strncmp(err, "draft", 5) == 0 ? 2 : 1; /* the config's fault */
        goto fail;
    }
    if (pd_loop_catch_signals(loop, s_on_signal, &m) != PD_OK) {
        LOG_E("cannot catch signals");
        goto fail;
    }
    if (pd_loop_run(loop) != PD_OK) goto fail;
    rc = dc_service_is_refused(m.svc) ? 1 : 0;
fail:
    dc_service_destroy(&m.svc);
    pd_loop_destroy(&loop);
    if (zctx) zmq_ctx_term(zctx);
    eng_destroy(&draft);
    eng_destroy(&eng);
    pd_config_free(&s_spec, &cfg);
    if (rc == 0 && m.is_ready_printed) LOG_I("pd-decode exits cleanly");
    return rc;
}
