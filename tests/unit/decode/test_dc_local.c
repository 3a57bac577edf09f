/* test_dc_local.c: dc_sched's local prefill (a DecodeRequest with prefill_locally), the first token's logprobs
 * on admission, and "same answer, either path": greedy and seeded sampling give the same tokens through local
 * prefill (chunked, batched with decode rows), through a remote prefill (pf_sched on the same engine, its KV
 * chunks copied into the decode scheduler's blocks as kvtransfer would) and through a plain single-sampler
 * loop over eng_forward (what `pdctl generate` does). Real CPU engine, default model. */
#include <stdint.h>

#include "dc_sched.h"
#include "eng.h"
#include "pd_log.h"
#include "pd_test.h"
#include "pf_sched.h"

#define GOLDEN_DIR PD_SOURCE_DIR "/tests/golden/logits"
#define MAX_GEN    64
#define MAX_OUT    8

static eng_t *s_engine;
static int32_t s_vocab;
static float *s_logits; /* (64 rows, vocab) */

static eng_kv_pool_t *s_pool(void) {
    return eng_kv_pool(s_engine);
}

typedef struct {
    uint64_t id;
    int32_t toks[MAX_GEN];
    float lps[MAX_GEN];
    eng_logprob_t top0[ENG_MAX_LOGPROBS]; /* the first token's alternatives */
    int n_top0;
    int n_toks;
    dc_finish_t finish;
    pd_status status;
    int n_events;
} out_t;

static out_t s_outs[MAX_OUT];
static int s_n_outs;

static void s_reset_outs(void) {
    memset(s_outs, 0, sizeof s_outs);
    s_n_outs = 0;
}

static out_t *s_out(uint64_t id) {
    for (int i = 0; i < s_n_outs; i++)
        if (s_outs[i].id == id) return &s_outs[i];
    PD_ASSERT(s_n_outs < MAX_OUT);
    s_outs[s_n_outs].id = id;
    return &s_outs[s_n_outs++];
}

static void s_record(const dc_event_t *ev, int n) {
    for (int i = 0; i < n; i++) {
        out_t *o = s_out(ev[i].req_id);
        CHECK(o->finish == DC_FINISH_NONE);
        o->n_events++;
        if (ev[i].token >= 0 && o->n_toks < MAX_GEN) {
            if (o->n_toks == 0) {
                o->n_top0 = ev[i].n_top;
                memcpy(o->top0, ev[i].top, sizeof ev[i].top);
            }
            o->lps[o->n_toks] = ev[i].logprob;
            o->toks[o->n_toks++] = ev[i].token;
        }
        o->finish = ev[i].finish;
        o->status = ev[i].status;
    }
}

static dc_sched_t *s_sched(int32_t chunk_tokens) {
    dc_sched_params_t p = dc_sched_params_default();
    p.pool = s_pool();
    p.tok = eng_tokenizer(s_engine);
    p.block_size = eng_kv_layout(s_engine)->block_size;
    p.vocab_size = s_vocab;
    p.max_context = eng_config(s_engine)->ctx_len;
    p.max_seqs = 16;
    p.max_batch_seqs = 8;
    p.watermark_blocks = 1;
    p.prefill_chunk_tokens = chunk_tokens;
    p.max_prefill_seqs = 2;
    char err[256];
    dc_sched_t *s = dc_sched_create(&p, err, sizeof err);
    if (!s) fprintf(stderr, "dc_sched_create: %s\n", err);
    return s;
}

static void s_check_idle(dc_sched_t *s) {
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_running, 0);
    CHECK_EQ_INT(st.n_waiting, 0);
    CHECK_EQ_INT(st.n_prefilling, 0);
    CHECK_EQ_INT(st.n_free_blocks, st.n_total_blocks);
}

/* One step at now: plan, forward, update; events recorded. Returns rows run or -1. */
static int s_step(dc_sched_t *s, dc_plan_t *plan, uint64_t now) {
    static dc_event_t ev[64];
    int n = dc_sched_plan(s, now, plan, ev, 64);
    if (n < 0) return -1;
    s_record(ev, n);
    if (plan->n_seqs == 0) return 0;
    eng_batch_t b = dc_plan_batch(plan, s_logits);
    if (eng_forward(s_engine, &b) != PD_OK) return -1;
    n = dc_sched_update(s, plan, s_logits, now, ev, 64);
    if (n < 0) return -1;
    s_record(ev, n);
    return plan->n_seqs;
}

static int s_run(dc_sched_t *s, dc_plan_t *plan) {
    int steps = 0, n;
    while ((n = s_step(s, plan, 0)) > 0) steps++;
    return n < 0 ? -1 : steps;
}

static int s_read_line_ints(const char *name, int line, int32_t *dst, int cap) {
    char path[1024];
    snprintf(path, sizeof path, GOLDEN_DIR "/%s.tokens.txt", name);
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    static char buf[1 << 16];
    int n = 0;
    for (int l = 0; l <= line && fgets(buf, sizeof buf, f); l++) {
        if (l < line) continue;
        char *p = buf, *end;
        for (long v; n < cap && (v = strtol(p, &end, 10), end != p); p = end) dst[n++] = (int32_t)v;
    }
    fclose(f);
    return n;
}

static void s_make_prompt(int32_t *dst, int n, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        dst[i] = (int32_t)(seed >> 8) % (s_vocab - 100) + 50;
    }
}

/* ---- the three paths ---- */

/* Plain loop, as `pdctl generate` runs a request: one sampler (prompt registered) over the whole request,
 * the prompt in one forward, then one token per forward. Returns tokens written to out. */
static int s_reference(const int32_t *prompt, int32_t n_prompt, const eng_sampling_t *sp, int n_gen, int32_t *out) {
    eng_sampler_t *smp = eng_sampler_create(sp, s_vocab);
    eng_kv_seq_t seq = {0};
    int n_out = 0;
    if (!smp) return -1;
    eng_sampler_add_prompt(smp, prompt, n_prompt);
    const int32_t *tokens = prompt;
    int32_t n = n_prompt, pos = 0, tok;
    while (n_out < n_gen) {
        if (eng_kv_seq_reserve(&seq, s_pool(), eng_kv_layout(s_engine)->block_size, pos + n) != PD_OK) break;
        const int32_t *table = seq.blocks;
        eng_batch_t b = {.n_seqs = 1,
                         .n_tokens = &n,
                         .pos = &pos,
                         .block_tables = &table,
                         .n_blocks = &seq.n_blocks,
                         .tokens = tokens,
                         .logits = s_logits};
        eng_sample_result_t r;
        if (eng_forward(s_engine, &b) != PD_OK || eng_sampler_sample(smp, s_logits, &r) != PD_OK) break;
        eng_sampler_add_generated(smp, r.token);
        out[n_out++] = tok = r.token;
        pos += n, n = 1, tokens = &tok;
    }
    eng_kv_seq_release(&seq, s_pool());
    eng_kv_seq_fini(&seq);
    eng_sampler_destroy(&smp);
    return n_out;
}

/* Copies the K/V of blocks src[0..n) into dst[0..n), every layer: what kvtransfer does between workers. */
static pd_status s_copy_kv(const int32_t *src, const int32_t *dst, int32_t n) {
    const eng_kv_layout_t *l = eng_kv_layout(s_engine);
    void *buf = pd_xmalloc(eng_kv_chunk_bytes(l));
    pd_status st = PD_OK;
    for (int32_t ly = 0; ly < l->n_layers && st == PD_OK; ly++)
        for (int kind = 0; kind < 2 && st == PD_OK; kind++)
            for (int32_t b = 0; b < n && st == PD_OK; b++) {
                st = eng_kv_read_chunk(s_engine, ly, (eng_kv_kind_t)kind, src[b], buf);
                if (st == PD_OK) st = eng_kv_write_chunk(s_engine, ly, (eng_kv_kind_t)kind, dst[b], buf);
            }
    free(buf);
    return st;
}

/* The disaggregated path up to admission: prefill on pf_sched (its own sampler samples the first token),
 * KV copied into the blocks dc_sched reserved, admitted with the first token and its logprobs. The
 * request is then RUNNING in s. */
static pd_status s_remote_prefill(dc_sched_t *s, const dc_req_params_t *rp) {
    pf_sched_params_t pp = pf_sched_params_default();
    pf_sched_params_from_engine(&pp, s_engine);
    pf_sched_t *pf = pf_sched_create(&pp);
    if (!pf) return PD_EINVAL;
    pd_status st = dc_sched_reserve(s, rp, NULL, 0);
    if (st == PD_OK) st = pf_sched_submit(pf, rp->req_id, rp->prompt, rp->n_prompt_tokens, &rp->sampling, 0);
    pf_event_t ev[4];
    int n_ev = 0;
    while (st == PD_OK && n_ev == 0) {
        const pf_plan_t *plan;
        st = pf_sched_plan(pf, 0, &plan);
        if (st != PD_OK || plan->n_seqs == 0) {
            st = st == PD_OK ? PD_EINVAL : st;
            break;
        }
        eng_batch_t b;
        pf_plan_batch(plan, s_logits, &b);
        n_ev = pf_sched_update(pf, plan, eng_forward(s_engine, &b), s_logits, ev, 4);
        if (n_ev < 0) st = n_ev;
    }
    if (st == PD_OK && (n_ev != 1 || ev[0].kind != PF_EV_READY)) st = PD_EBACKEND;
    if (st == PD_OK) {
        int32_t nb = 0;
        const int32_t *dst = dc_sched_blocks(s, rp->req_id, &nb);
        st = dst && nb == ev[0].n_blocks ? s_copy_kv(ev[0].block_ids, dst, nb) : PD_EINVAL;
        if (pf_sched_sent(pf, rp->req_id, st) != PD_OK) st = PD_EINVAL;
    }
    if (st == PD_OK) {
        dc_event_t de;
        st = dc_sched_admit(s, rp->req_id, &ev[0].first, 0, &de);
        if (st == PD_OK) s_record(&de, 1);
    }
    pf_sched_destroy(&pf);
    return st;
}

/* (1) greedy local prefill in chunks of 16 = the HF reference; batched next to a decoding request and next
 * to another local prefill (the step budget split between them), each decodes exactly as alone. */
static void test_local_greedy(void) {
    int32_t prompt[64], ref[64], other[24];
    int n_prompt = s_read_line_ints("chat_default_sys", 0, prompt, 64);
    REQUIRE(n_prompt == 37);
    REQUIRE(s_read_line_ints("chat_default_sys", 1, ref, 64) == 64);
    s_make_prompt(other, 24, 9);
    dc_sched_t *s = s_sched(16);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    s_reset_outs();
    dc_req_params_t rp = dc_req_params_default();
    rp.req_id = 1, rp.n_prompt_tokens = n_prompt, rp.prompt = prompt, rp.max_tokens = 12, rp.ignore_eos = true;
    rp.is_prefill_local = true;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_req_state(s, 1), DC_REQ_PREFILLING);
    dc_event_t evs[16];
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0); /* chunk 0..16 */
    CHECK_EQ_INT(plan.n_seqs, 1);
    CHECK_EQ_INT(plan.n_tokens[0], 16);
    CHECK_EQ_INT(plan.pos[0], 0);
    CHECK_EQ_INT(plan.n_logits, 0);
    CHECK_EQ_INT(dc_sched_plan_abort(s, &plan, PD_EBACKEND, evs, 16), 1); /* a failed step ends it */
    CHECK_EQ_INT(evs[0].finish, DC_FINISH_ERROR);
    s_check_idle(s);

    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    int steps = s_run(s, &plan);
    CHECK_EQ_INT(steps, 3 + 11); /* 16 + 16 + 5 prompt tokens, then 11 decode steps */
    out_t *o = s_out(1);
    CHECK_EQ_INT(o->n_toks, 12);
    for (int i = 0; i < o->n_toks && i < 12; i++) CHECK_EQ_INT(o->toks[i], ref[i]);
    CHECK_EQ_INT(o->finish, DC_FINISH_LENGTH);
    CHECK(!isnan(o->lps[0]) && o->lps[0] <= 0); /* sampled here: its logprob is known */
    s_check_idle(s);

    /* the same prompt next to a decoding request (admitted first) and a second local prefill: the 16-token
     * budget goes to the older prompt first, the rest to the newer one */
    int32_t alone_other[MAX_GEN];
    s_reset_outs();
    dc_req_params_t ro = dc_req_params_default();
    ro.req_id = 2, ro.n_prompt_tokens = 24, ro.prompt = other, ro.max_tokens = 20, ro.ignore_eos = true;
    ro.is_prefill_local = true;
    CHECK_EQ_INT(dc_sched_reserve(s, &ro, NULL, 0), PD_OK);
    CHECK(s_run(s, &plan) > 0);
    memcpy(alone_other, s_out(2)->toks, sizeof alone_other);
    CHECK_EQ_INT(s_out(2)->n_toks, 20);

    s_reset_outs();
    CHECK_EQ_INT(dc_sched_reserve(s, &ro, NULL, 0), PD_OK);
    CHECK_EQ_INT(s_step(s, &plan, 0), 1); /* other: 16 */
    CHECK_EQ_INT(s_step(s, &plan, 0), 1); /* other: 8 + first token */
    CHECK_EQ_INT(s_out(2)->n_toks, 1);
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    dc_req_params_t r3 = rp;
    r3.req_id = 3, r3.n_prompt_tokens = 5;
    CHECK_EQ_INT(dc_sched_reserve(s, &r3, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    CHECK_EQ_INT(plan.n_seqs, 2); /* the decode row of 2 first, then 16 of 1's 37 prompt tokens */
    CHECK(plan.req_ids[0] == 2 && plan.n_tokens[0] == 1 && plan.want_logits[0] == 1);
    CHECK(plan.req_ids[1] == 1 && plan.n_tokens[1] == 16 && plan.pos[1] == 0);
    CHECK_EQ_INT(plan.n_logits, 1);
    CHECK_EQ_INT(plan.n_tokens_total, 17);
    eng_batch_t b = dc_plan_batch(&plan, s_logits);
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_OK);
    int n = dc_sched_update(s, &plan, s_logits, 0, evs, 16);
    CHECK_EQ_INT(n, 1);
    s_record(evs, n > 0 ? n : 0);
    CHECK_EQ_INT(s_step(s, &plan, 0), 2); /* 1: 16 more */
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    CHECK_EQ_INT(plan.n_seqs, 3); /* 1's last 5 and 3's whole 5 share the budget; both sample */
    CHECK(plan.req_ids[1] == 1 && plan.n_tokens[1] == 5 && plan.pos[1] == 32);
    CHECK(plan.req_ids[2] == 3 && plan.n_tokens[2] == 5 && plan.pos[2] == 0);
    CHECK_EQ_INT(plan.n_logits, 3);
    b = dc_plan_batch(&plan, s_logits);
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_OK);
    n = dc_sched_update(s, &plan, s_logits, 0, evs, 16);
    CHECK_EQ_INT(n, 3);
    s_record(evs, n > 0 ? n : 0);
    CHECK_EQ_INT(dc_sched_req_state(s, 1), DC_REQ_RUNNING);
    CHECK(s_run(s, &plan) > 0);
    CHECK_EQ_INT(s_out(2)->n_toks, 20);
    CHECK(memcmp(s_out(2)->toks, alone_other, sizeof(int32_t) * 20) == 0);
    CHECK_EQ_INT(s_out(1)->n_toks, 12);
    CHECK(memcmp(s_out(1)->toks, ref, sizeof(int32_t) * 12) == 0);
    CHECK_EQ_INT(s_out(3)->n_toks, 12);
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

/* (2) local prefill, KV copied in (greedy first token computed by hand) and the single-sequence loop agree. */
static void test_local_vs_copied_kv(void) {
    int32_t prompt[40], ref[MAX_GEN];
    s_make_prompt(prompt, 40, 31);
    dc_sched_t *s = s_sched(7); /* odd chunks: 7 7 7 7 7 5 */
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    eng_sampling_t greedy = dc_req_params_default().sampling;
    REQUIRE(s_reference(prompt, 40, &greedy, 16, ref) == 16);
    s_reset_outs();
    dc_req_params_t rp = dc_req_params_default();
    rp.req_id = 7, rp.n_prompt_tokens = 40, rp.prompt = prompt, rp.max_tokens = 16, rp.ignore_eos = true;
    rp.is_prefill_local = true;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(s_run(s, &plan), 6 + 15);
    CHECK(s_out(7)->n_toks == 16 && memcmp(s_out(7)->toks, ref, sizeof(int32_t) * 16) == 0);
    rp.req_id = 8, rp.is_prefill_local = false;
    CHECK_EQ_INT(s_remote_prefill(s, &rp), PD_OK);
    CHECK(s_run(s, &plan) > 0);
    CHECK(s_out(8)->n_toks == 16 && memcmp(s_out(8)->toks, ref, sizeof(int32_t) * 16) == 0);
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

/* (3) seeded sampling, temperature 0.8, 24 tokens: local prefill = remote prefill (pf_sched's sampler drew
 * the first token; dc_sched skips that draw) = one sampler over the whole request. Pure temperature, and
 * pdctl's defaults with penalties (the first token counts as generated for them), alone and in a batch. */
static void test_rng_continuity(void) {
    enum { N_GEN = 24 };
    int32_t prompt[16];
    REQUIRE(s_read_line_ints("capital_france", 0, prompt, 16) == 5);
    eng_sampling_t cfg[2] = {eng_sampling_default(), eng_sampling_default()};
    cfg[0].temperature = 0.8f, cfg[0].seed = 1234, cfg[0].has_seed = true, cfg[0].n_logprobs = 3;
    cfg[1] = cfg[0];
    cfg[1].top_k = 40, cfg[1].top_p = 0.95f, cfg[1].min_p = 0.05f, cfg[1].seed = 99;
    cfg[1].presence_penalty = 0.5f, cfg[1].frequency_penalty = 0.3f, cfg[1].repetition_penalty = 1.1f;
    dc_sched_t *s = s_sched(4);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    for (int c = 0; c < 2; c++) {
        int32_t ref[N_GEN];
        REQUIRE(s_reference(prompt, 5, &cfg[c], N_GEN, ref) == N_GEN);
        dc_req_params_t rp = dc_req_params_default();
        rp.n_prompt_tokens = 5, rp.prompt = prompt, rp.max_tokens = N_GEN, rp.ignore_eos = true;
        rp.sampling = cfg[c];
        s_reset_outs();
        rp.req_id = 1, rp.is_prefill_local = true; /* local, alone */
        CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
        CHECK(s_run(s, &plan) > 0);
        rp.req_id = 2, rp.is_prefill_local = false; /* remote, alone */
        CHECK_EQ_INT(s_remote_prefill(s, &rp), PD_OK);
        CHECK(s_run(s, &plan) > 0);
        rp.req_id = 3; /* remote and local together, with another seed beside them */
        CHECK_EQ_INT(s_remote_prefill(s, &rp), PD_OK);
        rp.req_id = 4, rp.is_prefill_local = true;
        CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
        rp.req_id = 5, rp.sampling.seed += 1;
        CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
        CHECK(s_run(s, &plan) > 0);
        for (uint64_t id = 1; id <= 4; id++) {
            out_t *o = s_out(id);
            CHECK_EQ_INT(o->n_toks, N_GEN);
            CHECK_MSG(memcmp(o->toks, ref, sizeof ref) == 0, "config %d request %d differs from the reference", c,
                      (int)id);
            CHECK_EQ_INT(o->finish, DC_FINISH_LENGTH);
            /* the first token's logprobs arrive either way, bit-identical (batch-invariant forward) */
            CHECK_EQ_INT(o->n_top0, 3);
            CHECK(o->lps[0] == s_out(1)->lps[0] && memcmp(o->top0, s_out(1)->top0, sizeof o->top0) == 0);
            for (int i = 1; i < N_GEN; i++) CHECK(o->lps[i] == s_out(1)->lps[i]);
        }
        CHECK(memcmp(s_out(5)->toks, ref, sizeof ref) != 0); /* the seed matters */
        s_check_idle(s);
    }
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

/* (4) admission with prefill's logprob info: the first event carries it, cut to the request's n_logprobs;
 * an unknown logprob stays NAN; bad info is refused and leaves the request waiting. */
static void test_admit_logprobs(void) {
    dc_sched_t *s = s_sched(16);
    REQUIRE(s);
    dc_req_params_t rp = dc_req_params_default();
    rp.req_id = 1, rp.n_prompt_tokens = 3, rp.max_tokens = 1;
    rp.sampling.n_logprobs = 2;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    eng_sample_result_t first = {.token = 42, .logprob = -0.25f, .n_top = 3};
    for (int i = 0; i < 3; i++) first.top[i] = (eng_logprob_t){.token = 40 + i, .logprob = -0.1f * (float)(i + 1)};
    first.top[2].token = s_vocab; /* beyond what the request asked for: still checked */
    dc_event_t ev;
    CHECK_EQ_INT(dc_sched_admit(s, 1, &first, 0, &ev), PD_EINVAL);
    CHECK_EQ_INT(dc_sched_req_state(s, 1), DC_REQ_WAITING_KV);
    first.top[2].token = 44;
    CHECK_EQ_INT(dc_sched_admit(s, 1, &first, 0, &ev), PD_OK);
    CHECK_EQ_INT(ev.token, 42);
    CHECK(ev.logprob == -0.25f);
    CHECK_EQ_INT(ev.n_top, 2);
    CHECK(ev.top[0].token == 40 && ev.top[1].token == 41 && ev.top[1].logprob == -0.2f);
    CHECK_EQ_INT(ev.finish, DC_FINISH_LENGTH); /* max_tokens 1: ends at admission */
    CHECK_EQ_INT(ev.n_generated, 1);
    CHECK_EQ_INT(dc_sched_req_state(s, 1), DC_REQ_NONE);
    CHECK_EQ_INT(dc_sched_admit(s, 1, &first, 0, &ev), PD_EINVAL); /* gone */

    rp.req_id = 2, rp.sampling.n_logprobs = 5;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    eng_sample_result_t bare = {.token = 42, .logprob = NAN};
    CHECK_EQ_INT(dc_sched_admit(s, 2, &bare, 0, &ev), PD_OK);
    CHECK(isnan(ev.logprob));
    CHECK_EQ_INT(ev.n_top, 0);
    s_check_idle(s);
    dc_sched_destroy(&s);
}

/* (5) a local-prefilling request ends cleanly in every way: cancel between steps, cancel while its chunk is
 * in the executing plan (blocks kept until the update, which emits nothing for it), deadline, a failed
 * step; bad requests; destroy while prefilling. Pool counters back to idle. */
static void test_local_cancel(void) {
    int32_t prompt[40];
    s_make_prompt(prompt, 40, 3);
    int32_t total = eng_kv_pool_n_blocks(s_pool());
    dc_sched_t *s = s_sched(8);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    s_reset_outs();
    dc_req_params_t rp = dc_req_params_default();
    rp.n_prompt_tokens = 40, rp.prompt = prompt, rp.max_tokens = 8, rp.is_prefill_local = true;
    dc_event_t ev, evs[16];

    rp.req_id = 1; /* between steps */
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total - 3);
    CHECK_EQ_INT(s_step(s, &plan, 0), 1);
    CHECK_EQ_INT(dc_sched_cancel(s, 1, PD_ECLOSED, &ev), PD_OK);
    CHECK_EQ_INT(ev.finish, DC_FINISH_CANCELLED);
    CHECK_EQ_INT(ev.token, -1);
    CHECK_EQ_INT(ev.n_generated, 0);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);

    rp.req_id = 2; /* in the executing plan */
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    CHECK_EQ_INT(plan.n_seqs, 1);
    CHECK_EQ_INT(dc_sched_cancel(s, 2, PD_ECLOSED, &ev), PD_OK);
    CHECK_EQ_INT(dc_sched_req_state(s, 2), DC_REQ_NONE);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total - 3); /* the forward may still write them */
    eng_batch_t b = dc_plan_batch(&plan, s_logits);
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_OK);
    CHECK_EQ_INT(dc_sched_update(s, &plan, s_logits, 0, evs, 16), 0);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);

    rp.req_id = 3, rp.deadline_us = 100; /* deadline while prefilling */
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(s_step(s, &plan, 50), 1);
    CHECK_EQ_INT(s_step(s, &plan, 100), 0);
    CHECK_EQ_INT(s_out(3)->finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(s_out(3)->status, PD_ETIMEDOUT);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);

    rp.req_id = 4, rp.deadline_us = 0; /* the last chunk's step fails */
    rp.n_prompt_tokens = 5;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    CHECK_EQ_INT(plan.n_logits, 1);
    CHECK_EQ_INT(dc_sched_plan_abort(s, &plan, PD_EBACKEND, evs, 16), 1);
    CHECK(evs[0].req_id == 4 && evs[0].finish == DC_FINISH_ERROR && evs[0].status == PD_EBACKEND);

    /* bad requests */
    dc_req_params_t bad = rp;
    bad.req_id = 5, bad.prompt = NULL;
    char err[160] = "";
    CHECK_EQ_INT(dc_sched_reserve(s, &bad, err, sizeof err), PD_EINVAL);
    CHECK(strstr(err, "prompt") != NULL);
    dc_sched_t *off = s_sched(0);
    REQUIRE(off);
    bad.prompt = prompt;
    CHECK_EQ_INT(dc_sched_reserve(off, &bad, NULL, 0), PD_EINVAL);
    bad.is_prefill_local = false; /* the remote path still works without local prefill */
    CHECK_EQ_INT(dc_sched_reserve(off, &bad, NULL, 0), PD_OK);
    dc_sched_destroy(&off);

    /* destroy while one is prefilling and one is waiting */
    rp.req_id = 6;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(s_step(s, &plan, 0), 1);
    rp.req_id = 7, rp.n_prompt_tokens = 40;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_prefilling, 1);
    CHECK_EQ_INT(st.n_running, 1);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);
}

int main(void) {
    pd_log_init("test", PD_LOG_ERROR);
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.kv_n_blocks = 64;
    char err[512];
    s_engine = eng_create(&p, err, sizeof err);
    if (!s_engine) {
        fprintf(stderr, "cannot create engine: %s\n", err);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    s_vocab = eng_config(s_engine)->vocab_size;
    s_logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab * 64);
    PD_TEST_RUN(test_admit_logprobs);
    PD_TEST_RUN(test_local_cancel);
    PD_TEST_RUN(test_local_greedy);
    PD_TEST_RUN(test_local_vs_copied_kv);
    PD_TEST_RUN(test_rng_continuity);
    free(s_logits);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
