/* test_dc_sched.c: the decode scheduler driven with the real CPU engine on the default model. A "local
 * prefill" stands in for kvtransfer: it fills a reserved sequence's blocks with eng_forward over the
 * prompt and takes the argmax as prefill's first token. Checks the HF greedy reference, batch invariance
 * through the scheduler, every finish reason, cancellation in every state, KV exhaustion (early refusal,
 * preemption, no leaked block) and seeded sampling. */
#include <stdint.h>

#include "dc_sched.h"
#include "eng.h"
#include "pd_log.h"
#include "pd_test.h"

#define GOLDEN_DIR PD_SOURCE_DIR "/tests/golden/logits"
#define MAX_OUT    8
#define MAX_GEN    64

static eng_t *s_engine;
static int32_t s_vocab;
static float *s_logits; /* (max_batch_seqs or a prompt's rows, vocab) */

static bool s_quick(void) {
    const char *q = getenv("PD_TEST_QUICK");
    return q && *q && *q != '0';
}

static eng_kv_pool_t *s_pool(void) {
    return eng_kv_pool(s_engine);
}

/* What the client would see of one request. */
typedef struct {
    uint64_t id;
    int32_t toks[MAX_GEN];
    int n_toks;
    char text[4096];
    int n_text;
    dc_finish_t finish;
    pd_status status;
    int stop_index;
    int n_events;
    char err[96];
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
        CHECK(o->finish == DC_FINISH_NONE); /* nothing after the last event */
        o->n_events++;
        if (ev[i].token >= 0 && o->n_toks < MAX_GEN) o->toks[o->n_toks++] = ev[i].token;
        CHECK(o->n_text + ev[i].n_text < (int)sizeof o->text);
        memcpy(o->text + o->n_text, ev[i].text, (size_t)ev[i].n_text);
        o->n_text += ev[i].n_text;
        o->finish = ev[i].finish;
        o->status = ev[i].status;
        o->stop_index = ev[i].stop_index;
        snprintf(o->err, sizeof o->err, "%s", ev[i].err);
    }
}

static dc_sched_t *s_sched(int32_t max_batch_seqs, int32_t watermark) {
    dc_sched_params_t p = dc_sched_params_default();
    p.pool = s_pool();
    p.tok = eng_tokenizer(s_engine);
    p.block_size = eng_kv_layout(s_engine)->block_size;
    p.vocab_size = s_vocab;
    p.max_context = eng_config(s_engine)->ctx_len;
    p.max_seqs = 16;
    p.max_batch_seqs = max_batch_seqs;
    p.watermark_blocks = watermark;
    char err[256];
    dc_sched_t *s = dc_sched_create(&p, err, sizeof err);
    if (!s) fprintf(stderr, "dc_sched_create: %s\n", err);
    return s;
}

static int32_t s_argmax(const float *v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; i++)
        if (v[i] > v[best]) best = i;
    return best;
}

/* Stands in for prefill + kvtransfer: computes the prompt's K/V into the reserved blocks, returns the
 * argmax of the last position (prefill's greedy first token), or -1. */
static int32_t s_local_prefill(dc_sched_t *s, uint64_t id, const int32_t *prompt, int32_t n) {
    int32_t nb = 0, pos = 0;
    const int32_t *table = dc_sched_blocks(s, id, &nb);
    if (!table) return -1;
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &nb,
                     .tokens = prompt,
                     .logits = s_logits};
    if (eng_forward(s_engine, &b) != PD_OK) return -1;
    return s_argmax(s_logits, s_vocab);
}

/* reserve + local prefill + admit; the admit event is recorded. */
static pd_status s_start(dc_sched_t *s, const dc_req_params_t *rp, const int32_t *prompt, uint64_t now) {
    char err[256];
    pd_status st = dc_sched_reserve(s, rp, err, sizeof err);
    if (st != PD_OK) return st;
    int32_t first = s_local_prefill(s, rp->req_id, prompt, rp->n_prompt_tokens);
    if (first < 0) return PD_EBACKEND;
    dc_event_t ev;
    eng_sample_result_t r = {.token = first, .logprob = NAN};
    st = dc_sched_admit(s, rp->req_id, &r, now, &ev);
    if (st == PD_OK) s_record(&ev, 1);
    return st;
}

/* One step: plan (at now), forward, update (at now + dt_us). Returns the rows run, or -1 on a failure. */
static int s_step_at(dc_sched_t *s, dc_plan_t *plan, uint64_t now, uint64_t dt_us) {
    static dc_event_t ev[64];
    int n = dc_sched_plan(s, now, plan, ev, 64);
    if (n < 0) return -1;
    s_record(ev, n);
    if (plan->n_seqs == 0) return 0;
    eng_batch_t b = dc_plan_batch(plan, s_logits);
    if (eng_forward(s_engine, &b) != PD_OK) return -1;
    n = dc_sched_update(s, plan, s_logits, now + dt_us, ev, 64);
    if (n < 0) return -1;
    s_record(ev, n);
    return plan->n_seqs;
}

static int s_step(dc_sched_t *s, dc_plan_t *plan, uint64_t now) {
    return s_step_at(s, plan, now, 0);
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

static void s_check_idle(dc_sched_t *s) {
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_running, 0);
    CHECK_EQ_INT(st.n_waiting, 0);
    CHECK_EQ_INT(st.n_free_blocks, st.n_total_blocks);
}

/* (1) greedy through the scheduler = the HF reference (EOS at step 29 ignored). */
static void test_golden_greedy(void) {
    int32_t prompt[16], ref[64];
    REQUIRE(s_read_line_ints("capital_france", 0, prompt, 16) == 5);
    REQUIRE(s_read_line_ints("capital_france", 1, ref, 64) == 64);
    int n_gen = s_quick() ? 8 : 32;
    dc_sched_t *s = s_sched(8, 1);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    s_reset_outs();
    dc_req_params_t rp = dc_req_params_default();
    rp.req_id = 0xc0ffee, rp.n_prompt_tokens = 5, rp.prompt = prompt, rp.max_tokens = n_gen, rp.ignore_eos = true;
    CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
    CHECK_EQ_INT(s_run(s, &plan), n_gen - 1);
    out_t *o = s_out(rp.req_id);
    CHECK_EQ_INT(o->n_toks, n_gen);
    for (int i = 0; i < o->n_toks && i < n_gen; i++) CHECK_EQ_INT(o->toks[i], ref[i]);
    CHECK_EQ_INT(o->finish, DC_FINISH_LENGTH);
    CHECK_EQ_INT(o->n_events, n_gen);
    /* the deltas are the whole text (an ignored EOS token gives its text) */
    char full[4096];
    int64_t n = eng_tok_decode(eng_tokenizer(s_engine), o->toks, o->n_toks, full, sizeof full);
    CHECK(n == o->n_text && memcmp(full, o->text, (size_t)n) == 0);
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_tokens_generated, n_gen);
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    CHECK(s == NULL);
}

/* (2) 8 sequences of different lengths, admitted at different steps, decode exactly as each alone
 * (PD_TEST_QUICK: 4 short ones). */
static void test_batch_invariance(void) {
    enum { N = 8 };
    static const int lens_full[N] = {3, 17, 40, 1, 64, 9, 33, 16}, lens_quick[N] = {3, 17, 1, 9};
    const int *lens = s_quick() ? lens_quick : lens_full;
    int n_seqs = s_quick() ? 4 : N, n_gen = s_quick() ? 4 : 12;
    int32_t prompts[N][64], ref[N][MAX_GEN];
    dc_plan_t plan;
    dc_sched_t *s = s_sched(N, 1);
    REQUIRE(s);
    dc_plan_init(&plan, s);
    for (int k = 0; k < n_seqs; k++) {
        s_make_prompt(prompts[k], lens[k], 77u + (uint32_t)k);
        s_reset_outs();
        dc_req_params_t rp = dc_req_params_default();
        rp.req_id = 100 + (uint64_t)k, rp.n_prompt_tokens = lens[k], rp.max_tokens = n_gen, rp.ignore_eos = true;
        CHECK_EQ_INT(s_start(s, &rp, prompts[k], 0), PD_OK);
        CHECK(s_run(s, &plan) >= 0);
        CHECK_EQ_INT(s_outs[0].n_toks, n_gen);
        memcpy(ref[k], s_outs[0].toks, sizeof ref[k]);
    }
    s_reset_outs();
    int rows = 0;
    for (int step = 0; step < 64; step++) {
        if (step < n_seqs) { /* one more joins the running batch each step */
            dc_req_params_t rp = dc_req_params_default();
            rp.req_id = 100 + (uint64_t)step, rp.n_prompt_tokens = lens[step], rp.max_tokens = n_gen;
            rp.ignore_eos = true;
            CHECK_EQ_INT(s_start(s, &rp, prompts[step], 0), PD_OK);
        }
        int n = s_step(s, &plan, 0);
        REQUIRE(n >= 0);
        rows += n;
        if (n == 0 && step >= n_seqs) break;
    }
    CHECK_EQ_INT(rows, n_seqs * (n_gen - 1));
    for (int k = 0; k < n_seqs; k++) {
        out_t *o = s_out(100 + (uint64_t)k);
        CHECK_EQ_INT(o->n_toks, n_gen);
        CHECK_MSG(memcmp(o->toks, ref[k], sizeof(int32_t) * (size_t)n_gen) == 0, "seq %d differs batched", k);
        CHECK_EQ_INT(o->finish, DC_FINISH_LENGTH);
    }
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

/* (3) finish reasons: EOS, stop string across tokens, max_tokens at admission, deadline. */
static void test_finish_reasons(void) {
    int32_t prompt[64], ref[64], cf[16];
    int n_prompt = s_read_line_ints("chat_default_sys", 0, prompt, 64);
    REQUIRE(n_prompt == 37);
    REQUIRE(s_read_line_ints("chat_default_sys", 1, ref, 64) == 64);
    REQUIRE(ref[7] == 2);                                        /* "The capital of France is Paris." <|im_end|> */
    REQUIRE(s_read_line_ints("capital_france", 0, cf, 16) == 5); /* greedy: " Paris" "." "\n" "\n" "The" */
    dc_sched_t *s = s_sched(8, 1);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    s_reset_outs();
    const char *stops[] = {"zzz", "s.\n\nThe"}; /* spans five tokens, starting inside " Paris" */
    dc_req_params_t eos = dc_req_params_default(), stop = eos, one = eos;
    eos.req_id = 1, eos.n_prompt_tokens = n_prompt, eos.max_tokens = 64;
    stop.req_id = 2, stop.n_prompt_tokens = 5, stop.max_tokens = 64, stop.stops = stops, stop.n_stops = 2;
    one.req_id = 3, one.n_prompt_tokens = 5, one.max_tokens = 1;
    CHECK_EQ_INT(s_start(s, &eos, prompt, 0), PD_OK);
    CHECK_EQ_INT(s_start(s, &stop, cf, 0), PD_OK);
    CHECK_EQ_INT(s_start(s, &one, cf, 0), PD_OK);
    CHECK_EQ_INT(s_out(3)->finish, DC_FINISH_LENGTH); /* ended at admission, its blocks already free */
    CHECK_EQ_INT(s_out(3)->n_toks, 1);
    CHECK(s_run(s, &plan) >= 0);

    char full[512];
    int64_t n_full = eng_tok_decode(eng_tokenizer(s_engine), ref, 7, full, sizeof full - 1);
    REQUIRE(n_full > 0);
    out_t *o = s_out(1);
    CHECK_EQ_INT(o->finish, DC_FINISH_STOP);
    CHECK_EQ_INT(o->n_toks, 8);
    for (int i = 0; i < 8; i++) CHECK_EQ_INT(o->toks[i], ref[i]);
    CHECK(o->n_text == n_full && memcmp(o->text, full, (size_t)n_full) == 0); /* no "<|im_end|>" */
    CHECK_EQ_INT(o->stop_index, -1);
    o = s_out(2);
    CHECK_EQ_INT(o->finish, DC_FINISH_STOP);
    CHECK_EQ_INT(o->stop_index, 1);
    CHECK_MSG(o->n_text == 5 && memcmp(o->text, " Pari", 5) == 0, "stop text '%.*s'", o->n_text, o->text);
    CHECK_EQ_INT(o->n_toks, 5);

    /* deadline: expires in update (on the token it emits) and in plan (before running a row) */
    s_reset_outs();
    dc_req_params_t d1 = dc_req_params_default(), d2 = d1;
    d1.req_id = 11, d1.n_prompt_tokens = 5, d1.max_tokens = 64, d1.deadline_us = 1000;
    d2.req_id = 12, d2.n_prompt_tokens = 5, d2.max_tokens = 64, d2.deadline_us = 1500;
    CHECK_EQ_INT(s_start(s, &d1, cf, 0), PD_OK);
    CHECK_EQ_INT(s_start(s, &d2, cf, 0), PD_OK);
    CHECK_EQ_INT(s_step(s, &plan, 500), 2);
    CHECK_EQ_INT(s_out(11)->finish, DC_FINISH_NONE);
    CHECK_EQ_INT(s_step_at(s, &plan, 999, 1), 2); /* d1 emits its token and ends */
    CHECK_EQ_INT(s_out(11)->finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(s_out(11)->status, PD_ETIMEDOUT);
    CHECK_EQ_INT(s_out(11)->n_toks, 3);
    CHECK_EQ_INT(s_step(s, &plan, 2000), 0); /* d2 ends in plan: no row */
    CHECK_EQ_INT(s_out(12)->finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(s_out(12)->status, PD_ETIMEDOUT);
    CHECK_EQ_INT(s_out(12)->n_toks, 3);
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

/* (3) cancel while waiting for KV, while running, while its row is being executed; unknown ids. */
static void test_cancel(void) {
    int32_t prompt[3];
    s_make_prompt(prompt, 3, 5);
    dc_sched_t *s = s_sched(8, 1);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    s_reset_outs();
    int32_t total = eng_kv_pool_n_blocks(s_pool());
    dc_event_t ev;
    dc_req_params_t rp = dc_req_params_default();
    rp.n_prompt_tokens = 3, rp.max_tokens = 50; /* one block each */

    rp.req_id = 1; /* waiting for KV */
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_EINVAL); /* duplicate id */
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total - 1);
    CHECK_EQ_INT(dc_sched_cancel(s, 1, PD_ECLOSED, &ev), PD_OK);
    CHECK_EQ_INT(ev.finish, DC_FINISH_CANCELLED);
    CHECK_EQ_INT(ev.token, -1);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);
    CHECK_EQ_INT(dc_sched_cancel(s, 1, PD_ECLOSED, &ev), PD_EINVAL); /* gone */
    eng_sample_result_t five = {.token = 5, .logprob = NAN};
    CHECK_EQ_INT(dc_sched_admit(s, 1, &five, 0, &ev), PD_EINVAL);

    rp.req_id = 2; /* a failed transfer ends the request as an error */
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    CHECK_EQ_INT(dc_sched_cancel(s, 2, PD_EPROTO, &ev), PD_OK);
    CHECK_EQ_INT(ev.finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(ev.status, PD_EPROTO);

    rp.req_id = 3; /* running, between steps */
    CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
    CHECK_EQ_INT(s_step(s, &plan, 0), 1);
    CHECK_EQ_INT(dc_sched_cancel(s, 3, PD_ECLOSED, &ev), PD_OK);
    CHECK_EQ_INT(ev.finish, DC_FINISH_CANCELLED);
    CHECK_EQ_INT(ev.n_generated, 2);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);

    /* in the executing plan: the blocks stay until update, which emits nothing for it */
    rp.req_id = 4;
    CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
    rp.req_id = 5;
    CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
    dc_event_t evs[16];
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    CHECK_EQ_INT(plan.n_seqs, 2);
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), PD_EINVAL); /* still in flight */
    CHECK_EQ_INT(dc_sched_cancel(s, 4, PD_ECLOSED, &ev), PD_OK);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total - 2);
    eng_batch_t b = dc_plan_batch(&plan, s_logits);
    CHECK_EQ_INT(eng_forward(s_engine, &b), PD_OK);
    int n = dc_sched_update(s, &plan, s_logits, 0, evs, 16);
    CHECK_EQ_INT(n, 1);
    CHECK(n == 1 && evs[0].req_id == 5 && evs[0].token >= 0);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total - 1);

    /* a failed forward ends every row of its plan */
    CHECK_EQ_INT(dc_sched_plan(s, 0, &plan, evs, 16), 0);
    n = dc_sched_plan_abort(s, &plan, PD_EBACKEND, evs, 16);
    CHECK_EQ_INT(n, 1);
    CHECK(n == 1 && evs[0].req_id == 5 && evs[0].finish == DC_FINISH_ERROR && evs[0].status == PD_EBACKEND);
    CHECK_EQ_INT(dc_sched_cancel(s, 5, PD_ECLOSED, &ev), PD_EINVAL);
    CHECK_EQ_INT(dc_sched_cancel(s, 999, PD_ECLOSED, &ev), PD_EINVAL);

    /* destroy with requests still held frees their blocks */
    rp.req_id = 6;
    CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
    rp.req_id = 7;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);
}

/* (4) a nearly full pool: reserve refuses early (watermark), growth preempts the newest sequence with a
 * clear error while the older one decodes exactly as alone, a lone sequence that cannot grow ends itself,
 * and every block comes back. "hog" stands for other tenants of the pool. */
static void test_kv_exhaustion(void) {
    int32_t total = eng_kv_pool_n_blocks(s_pool()), n_hog = 0;
    int32_t pa[16], pb[16];
    s_make_prompt(pa, 16, 11);
    s_make_prompt(pb, 16, 12);
    dc_plan_t plan;
    dc_req_params_t a = dc_req_params_default(), b = a, c = a, l = a;
    a.req_id = 0xa, a.n_prompt_tokens = 15, a.max_tokens = 4, a.ignore_eos = true; /* 1 block, full at 16 */
    b.req_id = 0xb, b.n_prompt_tokens = 1, b.max_tokens = 10, b.ignore_eos = true; /* 1 block, room to 16 */
    c.req_id = 0xc, c.n_prompt_tokens = 16;                                        /* 1 block */
    l.req_id = 0x1, l.n_prompt_tokens = 16, l.max_tokens = 10;                     /* 1 block, full at 16 */

    dc_sched_t *s = s_sched(8, 1);
    REQUIRE(s);
    dc_plan_init(&plan, s);
    s_reset_outs(); /* reference: A alone */
    CHECK_EQ_INT(s_start(s, &a, pa, 0), PD_OK);
    CHECK(s_run(s, &plan) >= 0);
    int32_t ref[MAX_GEN];
    memcpy(ref, s_out(0xa)->toks, sizeof ref);
    CHECK_EQ_INT(s_out(0xa)->n_toks, 4);

    int32_t *hog = pd_xmalloc(sizeof(int32_t) * (size_t)total);
    REQUIRE(eng_kv_pool_alloc(s_pool(), total - 3, hog) == PD_OK);
    n_hog = total - 3;
    s_reset_outs();
    char err[256] = "";
    CHECK_EQ_INT(s_start(s, &a, pa, 0), PD_OK);                        /* 3 free - 1 >= 1 */
    CHECK_EQ_INT(s_start(s, &b, pb, 0), PD_OK);                        /* 2 free - 1 >= 1 */
    CHECK_EQ_INT(dc_sched_reserve(s, &c, err, sizeof err), PD_EAGAIN); /* 1 free - 1 < 1: refused early */
    CHECK_MSG(strstr(err, "KV capacity") != NULL, "err '%s'", err);
    REQUIRE(eng_kv_pool_alloc(s_pool(), 1, hog + n_hog) == PD_OK); /* someone takes the last block */
    n_hog++;
    CHECK(s_run(s, &plan) >= 0);
    out_t *oa = s_out(0xa), *ob = s_out(0xb);
    CHECK_EQ_INT(oa->finish, DC_FINISH_LENGTH);
    CHECK_EQ_INT(oa->n_toks, 4);
    CHECK(memcmp(oa->toks, ref, sizeof(int32_t) * 4) == 0);
    /* A needed a second block for position 16 at its second step: B, the newest, gave its blocks up */
    CHECK_EQ_INT(ob->finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(ob->status, PD_EAGAIN);
    CHECK_MSG(strstr(ob->err, "KV capacity exhausted") != NULL, "err '%s'", ob->err);
    CHECK_EQ_INT(ob->n_toks, 2);

    /* a lone sequence that cannot grow ends itself */
    CHECK_EQ_INT(s_start(s, &l, pb, 0), PD_OK);
    int32_t n_free = eng_kv_pool_n_free(s_pool());
    REQUIRE(eng_kv_pool_alloc(s_pool(), n_free, hog + n_hog) == PD_OK);
    n_hog += n_free;
    CHECK_EQ_INT(s_step(s, &plan, 0), 0); /* position 16 needs a second block */
    CHECK_EQ_INT(s_out(0x1)->finish, DC_FINISH_ERROR);
    CHECK_EQ_INT(s_out(0x1)->status, PD_EAGAIN);
    dc_sched_stats_t st;
    dc_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_preempted, 2);
    CHECK_EQ_INT(st.n_refused, 1);
    CHECK(eng_kv_pool_release(s_pool(), hog, n_hog) == PD_OK);
    s_check_idle(s);
    free(hog);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
    CHECK_EQ_INT(eng_kv_pool_n_free(s_pool()), total);
}

/* (5) seeded sampling: the same seed gives the same tokens, alone or batched with another request. */
static void test_seeded_sampling(void) {
    int32_t prompt[16];
    REQUIRE(s_read_line_ints("capital_france", 0, prompt, 16) == 5);
    int n_gen = s_quick() ? 6 : 16;
    dc_sched_t *s = s_sched(8, 1);
    REQUIRE(s);
    dc_plan_t plan;
    dc_plan_init(&plan, s);
    dc_req_params_t rp = dc_req_params_default();
    rp.n_prompt_tokens = 5, rp.prompt = prompt, rp.max_tokens = n_gen, rp.ignore_eos = true;
    rp.sampling.temperature = 1.0f, rp.sampling.top_k = 100, rp.sampling.seed = 1234, rp.sampling.has_seed = true;
    rp.sampling.n_logprobs = 3;
    int32_t runs[3][MAX_GEN];
    for (int r = 0; r < 3; r++) {
        s_reset_outs();
        rp.req_id = 50 + (uint64_t)r;
        CHECK_EQ_INT(s_start(s, &rp, prompt, 0), PD_OK);
        if (r == 2) { /* next to another seed */
            dc_req_params_t other = rp;
            other.req_id = 99, other.sampling.seed = 4321;
            CHECK_EQ_INT(s_start(s, &other, prompt, 0), PD_OK);
        }
        dc_event_t ev[16];
        for (;;) {
            int n = dc_sched_plan(s, 0, &plan, ev, 16);
            REQUIRE(n >= 0);
            if (plan.n_seqs == 0) break;
            eng_batch_t b = dc_plan_batch(&plan, s_logits);
            REQUIRE(eng_forward(s_engine, &b) == PD_OK);
            n = dc_sched_update(s, &plan, s_logits, 0, ev, 16);
            REQUIRE(n >= 0);
            for (int i = 0; i < n; i++) {
                CHECK_EQ_INT(ev[i].n_top, 3);
                CHECK(ev[i].logprob <= 0 && ev[i].top[0].logprob >= ev[i].top[1].logprob &&
                      ev[i].top[1].logprob >= ev[i].top[2].logprob && ev[i].logprob <= ev[i].top[0].logprob);
            }
            s_record(ev, n);
        }
        out_t *o = s_out(rp.req_id);
        CHECK_EQ_INT(o->n_toks, n_gen);
        memcpy(runs[r], o->toks, sizeof runs[r]);
        if (r == 2 && !s_quick())
            CHECK(memcmp(s_out(99)->toks, o->toks, sizeof(int32_t) * (size_t)n_gen) != 0); /* the seed matters */
    }
    CHECK(memcmp(runs[0], runs[1], sizeof(int32_t) * (size_t)n_gen) == 0);
    CHECK(memcmp(runs[0], runs[2], sizeof(int32_t) * (size_t)n_gen) == 0);
    s_check_idle(s);
    dc_plan_fini(&plan);
    dc_sched_destroy(&s);
}

static void test_bad_args(void) {
    dc_sched_params_t p = dc_sched_params_default();
    CHECK(dc_sched_create(&p, NULL, 0) == NULL);
    dc_sched_t *s = s_sched(4, 1);
    REQUIRE(s);
    dc_req_params_t rp = dc_req_params_default();
    rp.req_id = 1, rp.n_prompt_tokens = 0;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_EINVAL);
    rp.n_prompt_tokens = eng_config(s_engine)->ctx_len;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_EINVAL);
    rp.n_prompt_tokens = 4, rp.sampling.top_p = 0;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_EINVAL);
    rp = dc_req_params_default(), rp.req_id = 2, rp.n_prompt_tokens = 4;
    const char *empty[] = {""};
    rp.stops = empty, rp.n_stops = 1;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_EINVAL);
    rp.n_stops = 0;
    CHECK_EQ_INT(dc_sched_reserve(s, &rp, NULL, 0), PD_OK);
    dc_event_t ev;
    eng_sample_result_t bad = {.token = s_vocab, .logprob = NAN};
    CHECK_EQ_INT(dc_sched_admit(s, 2, &bad, 0, &ev), PD_EINVAL);
    bad.token = 5, bad.n_top = 1, bad.top[0].token = -1;
    CHECK_EQ_INT(dc_sched_admit(s, 2, &bad, 0, &ev), PD_EINVAL);
    bad.top[0].token = 6, bad.n_top = ENG_MAX_LOGPROBS + 1;
    CHECK_EQ_INT(dc_sched_admit(s, 2, &bad, 0, &ev), PD_EINVAL);
    CHECK(dc_sched_admit(s, 2, NULL, 0, &ev) == PD_EINVAL);
    CHECK_EQ_INT(dc_sched_req_state(s, 2), DC_REQ_WAITING_KV);
    CHECK_EQ_INT(dc_sched_cancel(s, 2, PD_ECLOSED, &ev), PD_OK);
    s_check_idle(s);
    dc_sched_destroy(&s);
    dc_sched_destroy(&s);
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
    PD_TEST_RUN(test_bad_args);
    PD_TEST_RUN(test_golden_greedy);
    PD_TEST_RUN(test_finish_reasons);
    PD_TEST_RUN(test_cancel);
    PD_TEST_RUN(test_kv_exhaustion);
    PD_TEST_RUN(test_seeded_sampling);
    PD_TEST_RUN(test_batch_invariance);
    free(s_logits);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
