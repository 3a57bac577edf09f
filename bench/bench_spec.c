/* bench_spec.c: speculative decoding in the decode batch, in-process: the decode service's scheduler and
 * executor pieces (dc_sched, dc_exec_draft, dc_exec_calibrate) over the CPU engine, without sockets, so that the
 * figure is decode throughput and nothing else. For each workload (a JSONL file of chat prompts), speculation
 * mode (off, ngram, draft) and batch size B: B requests (prompts taken in turn, rendered with the model's chat
 * template) are prefilled locally, then decoded greedily to max_tokens (ignore_eos) with the production policy
 * (adaptive k, calibrated cost model). Only steps with no prefill rows in them are timed:
 *   decode tok/s  = tokens emitted in those steps / their time (all sequences together);
 *   tokens/row    = tokens emitted per sequence per verification step (1 without speculation);
 *   acceptance    = drafts accepted / drafts verified.
 * The speed-up column is against mode off at the same workload and B, measured in the same run: the modes run
 * in turn, --reps times (batches of up to 8; once above), and each row shows its median run, because runs of
 * the same work differ by 10-20% on a shared 2-core machine.
 * --dump FILE writes each request's prompt and greedy tokens without speculation (mode off), one JSON line per
 * request ({"workload", "prompt": [ids], "out": [ids]}), for studying proposers offline (bench/ngram_sim.py).
 * Usage: spec --rag FILE --chat FILE [--model GGUF] [--draft GGUF] [--batches 1,8,32] [--max-tokens N]
 *             [--threads N] [--spec-k K] [--reps N] [--dump FILE] */
#define _GNU_SOURCE /* getline */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dc_exec.h"
#include "dc_sched.h"
#include "eng.h"
#include "eng_draft.h"
#include "pd_log.h"

#define MAX_PROMPTS 256
#define MAX_B       64

static FILE *g_dump;            /* --dump: mode off's tokens per request */
static const char *g_dump_name; /* the workload being run */

typedef struct {
    int32_t *ids[MAX_PROMPTS];
    int32_t n[MAX_PROMPTS];
    int count;
} prompts_t;

typedef struct {
    double tok_s, tokens_per_row, acceptance, rows_per_step;
    uint64_t drafts;
} result_t;

static double s_now(void) {
    return (double)pd_now_us() / 1e6;
}

/* Chat prompts of a JSONL file ({"prompt": TEXT, ...} per line), rendered and tokenized. */
static int s_load(eng_t *e, const char *path, prompts_t *p) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    char *line = NULL;
    size_t cap = 0;
    size_t out_cap = 1 << 20;
    char *text = pd_xmalloc(out_cap);
    while (p->count < MAX_PROMPTS && getline(&line, &cap, f) > 0) {
        json_error_t jerr;
        json_t *j = json_loads(line, 0, &jerr);
        const char *prompt = j ? json_string_value(json_object_get(j, "prompt")) : NULL;
        if (!prompt) {
            json_decref(j);
            continue;
        }
        eng_chat_msg_t msg = {.role = "user", .content = prompt};
        int64_t n = eng_chat_render(eng_chat(e), &msg, 1, true, text, out_cap);
        json_decref(j);
        if (n < 0 || (size_t)n >= out_cap) continue;
        int64_t k = eng_tok_encode(eng_tokenizer(e), text, (size_t)n, true, NULL, 0);
        if (k <= 0) continue;
        p->ids[p->count] = pd_xmalloc(sizeof(int32_t) * (size_t)k);
        if (eng_tok_encode(eng_tokenizer(e), text, (size_t)n, true, p->ids[p->count], k) != k) continue;
        p->n[p->count++] = (int32_t)k;
    }
    free(line);
    free(text);
    fclose(f);
    return p->count;
}

static result_t s_run(eng_t *e, eng_t *draft, eng_drafter_t *drafter, dc_spec_mode_t mode, const prompts_t *p, int b,
                      int max_tokens, int spec_k, const dc_spec_cost_t *cost) {
    dc_sched_params_t sp = dc_sched_params_default();
    sp.pool = eng_kv_pool(e);
    sp.tok = eng_tokenizer(e);
    sp.block_size = eng_kv_layout(e)->block_size;
    sp.vocab_size = eng_config(e)->vocab_size;
    sp.max_context = eng_config(e)->ctx_len;
    sp.max_seqs = MAX_B;
    sp.max_batch_seqs = MAX_B;
    sp.watermark_blocks = 1;
    sp.prefill_chunk_tokens = 1024;
    sp.max_prefill_seqs = 4;
    sp.spec = mode;
    sp.spec_k = spec_k;
    if (mode == DC_SPEC_DRAFT) {
        sp.draft_pool = eng_kv_pool(draft);
        sp.draft_block_size = eng_kv_layout(draft)->block_size;
    }
    char err[256];
    dc_sched_t *s = dc_sched_create(&sp, err, sizeof err);
    if (!s) PD_FATAL("dc_sched_create: %s", err);
    if (mode != DC_SPEC_OFF) dc_sched_spec_set_cost(s, cost);
    for (int i = 0; i < b; i++) {
        dc_req_params_t r = dc_req_params_default();
        r.req_id = (uint64_t)i + 1;
        r.prompt = p->ids[i % p->count];
        r.n_prompt_tokens = p->n[i % p->count];
        r.is_prefill_local = true;
        r.max_tokens = max_tokens;
        r.ignore_eos = true;
        if (dc_sched_reserve(s, &r, err, sizeof err) != PD_OK) PD_FATAL("reserve: %s", err);
    }
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    size_t rows = (size_t)MAX_B * DC_MAX_TOKENS_PER_SEQ + (size_t)sp.max_prefill_seqs;
    float *logits = pd_xmalloc(sizeof(float) * rows * (size_t)sp.vocab_size);
    static dc_event_t ev[MAX_B * DC_MAX_TOKENS_PER_SEQ + 64];
    double dec_time = 0;
    uint64_t dec_tokens = 0, dec_steps = 0, dec_rows = 0;
    dc_sched_stats_t st0 = {0}, st1;
    bool is_decoding = false;
    double prev_done = -1; /* when the previous step was updated */
    const bool is_dump = g_dump && mode == DC_SPEC_OFF;
    int32_t *dumped = is_dump ? pd_xmalloc(sizeof(int32_t) * (size_t)b * (size_t)max_tokens) : NULL;
    int32_t n_dumped[MAX_B] = {0};
    for (;;) {
        int n = dc_sched_plan(s, 0, &plan, ev, (int)(sizeof ev / sizeof *ev));
        if (n < 0 || plan.n_seqs == 0) break;
        bool is_pure = plan.n_decode_rows == plan.n_seqs; /* no prefill rows: a decode step */
        if (is_pure && !is_decoding) dc_sched_stats(s, &st0), is_decoding = true;
        double t0 = s_now();
        if (drafter) dc_exec_draft(drafter, &plan);
        double t1 = s_now();
        eng_batch_t bt = dc_plan_batch(&plan, logits);
        if (eng_forward(e, &bt) != PD_OK) PD_FATAL("forward failed");
        double t2 = s_now();
        int32_t n_rows = plan.n_decode_rows, n_tokens = plan.n_tokens_total;
        n = dc_sched_update(s, &plan, logits, 0, ev, (int)(sizeof ev / sizeof *ev));
        if (n < 0) PD_FATAL("update failed");
        for (int i = 0; is_dump && i < n; i++) { /* req_id i + 1 is request i */
            const int r = (int)ev[i].req_id - 1;
            if (ev[i].token >= 0 && r >= 0 && r < b && n_dumped[r] < max_tokens)
                dumped[(size_t)r * (size_t)max_tokens + (size_t)n_dumped[r]++] = ev[i].token;
        }
        /* as dc_exec does: decode steps only, the forward plus the update (sampling, verification); the guard
         * the whole cycle since the previous update */
        const double t3 = s_now(), cycle_us = prev_done > 0 ? (t3 - prev_done) * 1e6 : -1.0;
        prev_done = t3;
        if (mode != DC_SPEC_OFF && is_pure) dc_sched_spec_observe(s, n_tokens, (t3 - t1) * 1e6, cycle_us);
        if (is_pure) {
            dec_time += t2 - t0;
            dec_steps++;
            dec_rows += (uint64_t)n_rows;
            for (int i = 0; i < n; i++) dec_tokens += ev[i].token >= 0;
        }
    }
    dc_sched_stats(s, &st1);
    for (int r = 0; is_dump && r < b; r++) {
        fprintf(g_dump, "{\"workload\": \"%s\", \"prompt\": [", g_dump_name);
        for (int32_t j = 0; j < p->n[r % p->count]; j++)
            fprintf(g_dump, "%s%d", j ? ", " : "", p->ids[r % p->count][j]);
        fprintf(g_dump, "], \"out\": [");
        for (int32_t j = 0; j < n_dumped[r]; j++)
            fprintf(g_dump, "%s%d", j ? ", " : "", dumped[(size_t)r * (size_t)max_tokens + (size_t)j]);
        fprintf(g_dump, "]}\n");
    }
    free(dumped);
    free(logits);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    uint64_t drafts = st1.n_draft_tokens - st0.n_draft_tokens, acc = st1.n_accepted_tokens - st0.n_accepted_tokens;
    return (result_t){.tok_s = dec_time > 0 ? (double)dec_tokens / dec_time : 0,
                      .tokens_per_row = dec_rows ? (double)dec_tokens / (double)dec_rows : 0,
                      .acceptance = drafts ? (double)acc / (double)drafts : 0,
                      .rows_per_step = dec_steps ? (double)dec_rows / (double)dec_steps : 0,
                      .drafts = drafts};
}

static eng_t *s_engine(const char *path, int threads, uint64_t kv_mem) {
    eng_params_t ep = eng_params_default();
    ep.model_path = path;
    ep.n_threads = threads;
    ep.kv_mem_bytes = kv_mem;
    ep.max_batch_tokens = 2048;
    ep.max_batch_seqs = 256;
    char err[512];
    eng_t *e = eng_create(&ep, err, sizeof err);
    if (!e) PD_FATAL("%s: %s", path, err);
    return e;
}

int main(int argc, char **argv) {
    pd_log_init("bench_spec", PD_LOG_WARN);
    const char *model = getenv("PDSERVE_MODEL"), *draft_path = NULL, *files[2] = {NULL, NULL};
    const char *names[2] = {"rag", "chat"};
    int batches[8] = {1, 8, 32}, n_batches = 3, max_tokens = 128, threads = 2, spec_k = 7, reps = 3;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--model"))
            model = argv[i + 1];
        else if (!strcmp(argv[i], "--draft"))
            draft_path = argv[i + 1];
        else if (!strcmp(argv[i], "--rag"))
            files[0] = argv[i + 1];
        else if (!strcmp(argv[i], "--chat"))
            files[1] = argv[i + 1];
        else if (!strcmp(argv[i], "--max-tokens"))
            max_tokens = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads"))
            threads = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--spec-k"))
            spec_k = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--dump")) {
            if (!(g_dump = fopen(argv[i + 1], "w"))) PD_FATAL("--dump %s: cannot open", argv[i + 1]);
        } else if (!strcmp(argv[i], "--batches")) {
            n_batches = 0;
            for (char *t = strtok(argv[i + 1], ","); t && n_batches < 8; t = strtok(NULL, ","))
                batches[n_batches++] = atoi(t);
        } else {
            fprintf(stderr, "usage: spec --rag FILE --chat FILE [--model GGUF] [--draft GGUF] [--batches 1,8,32] "
                            "[--max-tokens N] [--threads N] [--spec-k K] [--reps N] [--dump FILE]\n");
            return 2;
        }
    }
    if (!model) model = "/root/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf";
    eng_t *e = s_engine(model, threads, 4ull << 30);
    eng_t *draft = draft_path ? s_engine(draft_path, threads, 1ull << 30) : NULL;
    char err[512];
    eng_drafter_t *drafter = draft ? eng_drafter_create(draft, e, MAX_B, 512 + MAX_B, err, sizeof err) : NULL;
    if (draft && !drafter) PD_FATAL("%s", err);
    dc_spec_cost_t cost;
    if (dc_exec_calibrate(e, draft, spec_k, &cost) != PD_OK) PD_FATAL("calibration failed");
    printf("machine: %d threads; cost model: forward %.0f us + %.0f us per token", threads, cost.base_us,
           cost.per_token_us);
    if (draft) printf("; draft model %.0f us + %.0f us per token", cost.draft_base_us, cost.draft_token_us);
    printf("; spec_k %d, max_tokens %d, greedy, median of %d runs at batch <= 8\n", spec_k, max_tokens, reps);
    printf("| workload | batch | mode | decode tok/s | vs off | tokens/row/step | acceptance | rows/step |\n");
    printf("| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for (int w = 0; w < 2; w++) {
        if (!files[w]) continue;
        prompts_t p = {0};
        if (s_load(e, files[w], &p) <= 0) PD_FATAL("%s: no prompts", files[w]);
        g_dump_name = names[w];
        for (int bi = 0; bi < n_batches; bi++) {
            int b = batches[bi] > MAX_B ? MAX_B : batches[bi], n_reps = b <= 8 ? (reps < 1   ? 1
                                                                                  : reps > 9 ? 9
                                                                                             : reps)
                                                                               : 1;
            result_t runs[3][9];
            for (int k = 0; k < n_reps; k++)
                for (int m = 0; m < 3; m++)
                    if (m != DC_SPEC_DRAFT || drafter)
                        runs[m][k] = s_run(e, draft, m == DC_SPEC_DRAFT ? drafter : NULL, (dc_spec_mode_t)m, &p, b,
                                           max_tokens, spec_k, &cost);
            double off = 0;
            for (int m = 0; m < 3; m++) {
                if (m == DC_SPEC_DRAFT && !drafter) continue;
                /* the median run by decode tok/s */
                for (int x = 1; x < n_reps; x++)
                    for (int y = x; y > 0 && runs[m][y].tok_s < runs[m][y - 1].tok_s; y--) {
                        result_t t = runs[m][y];
                        runs[m][y] = runs[m][y - 1], runs[m][y - 1] = t;
                    }
                result_t r = runs[m][n_reps / 2];
                if (m == DC_SPEC_OFF) off = r.tok_s;
                printf("| %s | %d | %s | %.1f | %.2fx | %.2f | %s%.0f%% | %.1f |\n", names[w], b,
                       dc_spec_mode_name((dc_spec_mode_t)m), r.tok_s, off > 0 ? r.tok_s / off : 0, r.tokens_per_row,
                       r.drafts ? "" : "(no drafts) ", 100 * r.acceptance, r.rows_per_step);
                fflush(stdout);
            }
        }
        for (int i = 0; i < p.count; i++) free(p.ids[i]);
    }
    if (g_dump) fclose(g_dump);
    eng_drafter_destroy(&drafter);
    eng_destroy(&draft);
    eng_destroy(&e);
    return 0;
}
