/* pf_main.c: pd-prefill. Parses the config (sections "engine" and "prefill"), loads the engine, runs the prefill
 * service on one event loop until SIGTERM / SIGINT has drained it. Exit codes: 0 clean shutdown, 1 runtime
 * error (the router refused this worker, the engine or service could not start), 2 bad config. */
#define _POSIX_C_SOURCE 200809L /* access */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "eng.h"
#include "kvt.h"
#include "pb.h"
#include "pd_config.h"
#include "pd_log.h"
#include "pd_loop.h"
#include "pf_service.h"

typedef struct {
    /* engine (shared with pd-decode: same keys) */
    char *model;
    int backend;
    int64_t gpu, threads, kv_mem, max_batch_tokens, max_batch_seqs, gemm_tune_rows;
    /* prefill */
    char *router, *id;
    int64_t step_tokens, chunk_tokens, max_queued, kv_conns;
    bool kv_stream, kv_shm, kv_cuda_ipc;
} pf_config_t;

/* One option of section sec filling field key of pf_config_t. */
#define S_OPT(sec_, key_, type_, def_, lo_, hi_, help_)                                                            \
    {                                                                                                              \
        .section = sec_, .key = #key_, .type = type_, PD_CONFIG_FIELD(pf_config_t, key_), .def = def_, .min = lo_, \
        .max = hi_, .help = help_                                                                                  \
    }
static const char *const s_backends[] = {"cpu", "cuda", NULL}; /* eng_backend_kind_t order */
static const pd_opt_t s_opts[] = {
    S_OPT("engine", model, PD_OPT_STRING, NULL, 0, 0, "GGUF model file (required)"),
    {.section = "engine",
     .key = "backend",
     .type = PD_OPT_ENUM,
     PD_CONFIG_FIELD(pf_config_t, backend),
     .def = "cpu",
     .choices = s_backends,
     .help = "compute backend (cuda: a binary built with -DPDSERVE_CUDA=ON)"},
    S_OPT("engine", gpu, PD_OPT_INT64, "0", 0, 64, "CUDA device index (engine.backend cuda)"),
    S_OPT("engine", threads, PD_OPT_INT64, "0", 0, 1024, "CPU compute threads, 0 = one per core"),
    S_OPT("engine", kv_mem, PD_OPT_SIZE, "512MiB", 1 << 20, 1099511627776.0, "KV block pool size"),
    S_OPT("engine", max_batch_tokens, PD_OPT_INT64, "2048", 1, 1 << 20, "most new tokens in one forward"),
    S_OPT("engine", max_batch_seqs, PD_OPT_INT64, "256", 1, 65536, "most sequences in one forward"),
    S_OPT("engine", gemm_tune_rows, PD_OPT_INT64, "0", 0, 256,
          "cuda: time GEMM algorithms at startup for 16..N-token batches and keep the fastest (0: off)"),
    S_OPT("prefill", router, PD_OPT_ENDPOINT, "tcp://127.0.0.1:5550", 0, 0, "the router's control endpoint"),
    S_OPT("prefill", id, PD_OPT_STRING, "prefill-0", 0, 0, "worker id (unique among workers; printable, no spaces)"),
    S_OPT("prefill", step_tokens, PD_OPT_INT64, "2048", 1, 1 << 20,
          "prompt tokens per step (at most engine.max_batch_tokens)"),
    S_OPT("prefill", chunk_tokens, PD_OPT_INT64, "512", 1, 1 << 20, "a prompt's share of a step before the next's"),
    S_OPT("prefill", max_queued, PD_OPT_INT64, "256", 1, 65536,
          "queued prompts; more are refused (ERR_RESOURCE_EXHAUSTED)"),
    S_OPT("prefill", kv_conns, PD_OPT_INT64, "1", 1, 8, "connections per decode worker for KV"),
    S_OPT("prefill", kv_stream, PD_OPT_BOOL, "true", 0, 0,
          "send each layer's KV while the prompt's last step computes the next (false: after the prompt)"),
    S_OPT("prefill", kv_shm, PD_OPT_BOOL, "true", 0, 0,
          "KV pool (cuda: its host copy) in shared memory: a decode worker on this host copies from it directly"),
    S_OPT("prefill", kv_cuda_ipc, PD_OPT_BOOL, "true", 0, 0,
          "cuda: offer the GPU's KV pool to decode workers that can map it (same GPU or a peer GPU): they copy device "
          "to device"),
};
#undef S_OPT

static const char *const s_other_sections[] = {"router", "decode", NULL};
static const pd_config_spec_t s_spec = {.program = "pd-prefill",
                                        .summary = "prefill worker: prompts in, KV and first token out to decode",
                                        .opts = s_opts,
                                        .n_opts = sizeof s_opts / sizeof s_opts[0],
                                        .other_sections = s_other_sections};

typedef struct {
    pf_service_t *svc;
    const pf_config_t *cfg;
    bool is_ready_printed;
} s_main_t;

static void s_on_registered(void *ud) {
    s_main_t *m = ud;
    if (m->is_ready_printed) return;
    m->is_ready_printed = true;
    printf("pd-prefill ready id=%s router=%s\n", m->cfg->id, m->cfg->router);
    fflush(stdout);
}

static void s_on_signal(pd_loop_t *l, void *ud) {
    (void)l;
    s_main_t *m = ud;
    if (m->svc) pf_service_drain(m->svc);
}

/* Config problems the table cannot express. 2 = bad config, 0 = fine. */
static int s_check(const pf_config_t *c) {
    if (!c->model || !c->model[0]) {
        fprintf(stderr, "pd-prefill: engine.model is required (--engine.model=PATH)\n");
        return 2;
    }
    if (access(c->model, R_OK) != 0) {
        fprintf(stderr, "pd-prefill: engine.model: cannot read %s\n", c->model);
        return 2;
    }
    size_t n = c->id ? strlen(c->id) : 0;
    bool is_id_ok = n >= 1 && n <= PB_MAX_ID_BYTES;
    for (size_t i = 0; i < n; i++) is_id_ok = is_id_ok && c->id[i] > ' ' && c->id[i] <= '~';
    if (!is_id_ok) {
        fprintf(stderr, "pd-prefill: prefill.id '%s' must be 1..%d printable ASCII characters, no spaces\n",
                c->id ? c->id : "", PB_MAX_ID_BYTES);
        return 2;
    }
    return 0;
}

/* With prefill.kv_shm the engine's host KV memory is a shared-memory object (kvt_shm_alloc): same-host decode
 * workers map it and copy from it, and ZeroMQ carries only headers and credits (bench/RESULTS.md, kv_transfer).
 * Without room in /dev/shm the engine keeps its own memory and sockets carry the KV. */
static eng_t *s_engine_create(const pf_config_t *c, kvt_shm_alloc_t *shm, char *err, size_t err_cap) {
    eng_params_t ep = eng_params_default();
    if (c->kv_shm) {
        int n_swept = kvt_shm_sweep_stale();
        if (n_swept > 0) LOG_I("removed %d KV pool(s) in /dev/shm left by workers that died", n_swept);
        ep.kv_host_alloc = kvt_shm_alloc, ep.kv_host_free = kvt_shm_free, ep.kv_host_ctx = shm;
    }
    ep.model_path = c->model;
    ep.backend = (eng_backend_kind_t)c->backend;
    ep.gpu = (int32_t)c->gpu;
    ep.kv_host_mirror = true; /* kvtransfer sends from host memory: the GPU pool's pinned copy */
    ep.n_threads = (int32_t)c->threads;
    ep.kv_mem_bytes = (uint64_t)c->kv_mem;
    ep.max_batch_tokens = (int32_t)c->max_batch_tokens;
    ep.max_batch_seqs = (int32_t)c->max_batch_seqs;
    ep.gemm_tune_rows = (int32_t)c->gemm_tune_rows;
    return eng_create(&ep, err, err_cap); /* logs the model, backend and KV pool */
}

int main(int argc, char **argv) {
    pf_config_t cfg = {0};
    pd_config_args_t args;
    char err[512] = "";
    int rc = 1;
    eng_t *eng = NULL;
    pd_loop_t *loop = NULL;
    void *zctx = NULL;
    s_main_t m = {.cfg = &cfg};
    kvt_shm_alloc_t shm = {0}; /* outlives the engine, which frees the pool through it */

    pd_log_init("pd-prefill", PD_LOG_INFO);
    if (pd_config_parse_args(&s_spec, argc, argv, &cfg, &args, err, sizeof err) != PD_OK) {
        fprintf(stderr, "pd-prefill: %s\n", err);
        pd_config_free(&s_spec, &cfg);
        return 2;
    }
    if (args.is_help || args.is_print_config) {
        if (args.is_help) pd_config_print_help(&s_spec, stdout);
        char *json = args.is_help ? NULL : pd_config_to_json(&s_spec, &cfg, false);
        if (json) printf("%s\n", json);
        free(json);
        pd_config_free(&s_spec, &cfg);
        return 0;
    }
    if ((rc = s_check(&cfg)) != 0) goto fail;
    rc = 1;
    char *json = pd_config_to_json(&s_spec, &cfg, true);
    LOG_I("pd-prefill %s, config %s", PD_VERSION, json ? json : "?");
    free(json);

    eng = s_engine_create(&cfg, &shm, err, sizeof err);
    if (!eng) {
        LOG_E("engine: %s", err);
        goto fail;
    }
    bool is_shm = shm.base && shm.base == eng_kv_host_base(eng);
    if (is_shm)
        LOG_I("KV pool in shared memory %s (%.0f MiB): decode workers on this host copy from it", shm.name,
              (double)shm.bytes / (1 << 20));
    else if (cfg.kv_shm)
        LOG_W("KV pool not in shared memory (%s): the KV goes over sockets", shm.err[0] ? shm.err : "not placed");
    loop = pd_loop_create();
    zctx = zmq_ctx_new();
    if (!loop || !zctx) {
        LOG_E("cannot create the event loop or the ZeroMQ context");
        goto fail;
    }
    pf_service_params_t sp = pf_service_params_default();
    sp.eng = eng, sp.loop = loop, sp.zmq_ctx = zctx;
    sp.router_endpoint = cfg.router;
    sp.worker_id = cfg.id;
    sp.step_tokens = (int32_t)cfg.step_tokens;
    sp.chunk_tokens = (int32_t)cfg.chunk_tokens;
    sp.max_step_seqs = (int32_t)cfg.max_batch_seqs;
    sp.max_queued = (int32_t)cfg.max_queued;
    sp.kv_conns = (int32_t)cfg.kv_conns;
    sp.is_kv_stream = cfg.kv_stream;
    sp.is_kv_device = cfg.kv_cuda_ipc;
    sp.kv_pool_shm_name = is_shm ? shm.name : NULL;
    sp.on_registered = s_on_registered, sp.ud = &m;
    m.svc = pf_service_create(&sp, err, sizeof err);
    if (!m.svc) {
        LOG_E("%s", err);
        goto fail;
    }
    if (pd_loop_catch_signals(loop, s_on_signal, &m) != PD_OK) {
        LOG_E("cannot catch signals");
        goto fail;
    }
    if (pd_loop_run(loop) != PD_OK) goto fail;
    rc = pf_service_is_refused(m.svc) ? 1 : 0;
fail:
    pf_service_destroy(&m.svc);
    pd_loop_destroy(&loop);
    if (zctx) zmq_ctx_term(zctx);
    eng_destroy(&eng);
    pd_config_free(&s_spec, &cfg);
    if (rc == 0) LOG_I("pd-prefill exits cleanly");
    return rc;
}
