/* test_pf_sched.c: the prefill scheduler driving the real CPU engine on the default model: first tokens of
 * the golden prompts batched and chunked under a 64-token step, the KV each request ends with bit-identical
 * to the same prompt prefilled alone in one piece, fairness, backpressure and refusals, waiting for blocks,
 * and cancel / deadline / failed step in every state, with the pool back to full after each. */
#include <stdint.h>

#include "eng.h"
#include "pd_log.h"
#include "pd_test.h"
#include "pf_sched.h"

#define GOLDEN_DIR      PD_SOURCE_DIR "/tests/golden/logits"
#define STEP_TOKENS     64
#define MAX_EVENTS      64
/* A reference greedy token may differ only where HF's own top-2 margin is a near-tie (as in test_eng_forward). */
#define NEAR_TIE_MARGIN 2e-3f

static eng_t *s_engine;
static int32_t s_vocab;
static float *s_logits; /* (STEP_TOKENS, vocab) */

static bool s_quick(void) {
    const char *q = getenv("PD_TEST_QUICK");
    return q && *q && *q != '0';
}

static pf_sched_params_t s_params(eng_t *e, int32_t step, int32_t chunk) {
    pf_sched_params_t p = pf_sched_params_default();
    pf_sched_params_from_engine(&p, e);
    p.step_tokens = step;
    p.max_chunk_tokens = chunk;
    p.max_step_seqs = step;
    return p;
}

static eng_sampling_t s_greedy(void) {
    eng_sampling_t g = eng_sampling_default();
    g.temperature = 0;
    return g;
}

/* Deterministic prompt from an LCG over the vocabulary. */
static void s_make_prompt(int32_t *dst, int n, uint32_t seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        dst[i] = (int32_t)(seed >> 8) % (s_vocab - 100) + 50;
    }
}

/* One step: plan, forward on e, update. Returns the number of events (negative: a status). */
static int s_step(eng_t *e, pf_sched_t *s, uint64_t now, pf_event_t *ev, const pf_plan_t **out) {
    const pf_plan_t *pl = NULL;
    pd_status st = pf_sched_plan(s, now, &pl);
    if (out) *out = pl;
    if (st != PD_OK) return st;
    if (pl->n_seqs == 0) return 0;
    eng_batch_t b;
    pf_plan_batch(pl, s_logits, &b);
    return pf_sched_update(s, pl, eng_forward(e, &b), s_logits, ev, MAX_EVENTS);
}

static bool s_pool_full(eng_t *e) {
    return eng_kv_pool_n_free(eng_kv_pool(e)) == eng_kv_pool_n_blocks(eng_kv_pool(e));
}

/* ---- golden first tokens, and the KV against a one-piece prefill ---- */

typedef struct {
    char name[64];
    int32_t n_prompt, first;
    int32_t *prompt;
    float margin;
    bool is_ready;
} golden_t;

static int s_load_golden(golden_t *g, int cap) {
    FILE *f = fopen(GOLDEN_DIR "/index.txt", "r");
    if (!f) return -1;
    char line[512];
    int n = 0;
    while (n < cap && fgets(line, sizeof line, f)) {
        golden_t c = {0};
        int n_gen, n_extra;
        if (line[0] == '#' || sscanf(line, "%63s %d %d %d", c.name, &c.n_prompt, &n_gen, &n_extra) != 4) continue;
        if (s_quick() && c.n_prompt > 40) continue; /* the sanitizer run: ~100 ms per token */
        char path[1024];
        snprintf(path, sizeof path, GOLDEN_DIR "/%s.tokens.txt", c.name);
        FILE *t = fopen(path, "r");
        if (!t) break;
        c.prompt = pd_xmalloc(sizeof(int32_t) * (size_t)c.n_prompt);
        int ok = 1;
        for (int i = 0; ok && i < c.n_prompt; i++) ok = fscanf(t, "%d", &c.prompt[i]) == 1;
        ok = ok && fscanf(t, "%d", &c.first) == 1;
        for (int i = 1; ok && i < n_gen; i++) ok = fscanf(t, "%*d") == 0;
        ok = ok && fscanf(t, "%f", &c.margin) == 1;
        fclose(t);
        if (!ok) {
            free(c.prompt);
            break;
        }
        g[n++] = c;
    }
    fclose(f);
    return n;
}

/* Prefills tokens alone in one forward into fresh blocks and compares every (layer, K/V, block) chunk,
 * positions < n only, with the blocks the scheduler produced. Returns the number of differing chunks. */
static int s_compare_kv_alone(const int32_t *tokens, int32_t n, const int32_t *blocks, int32_t n_blocks) {
    const eng_kv_layout_t *l = eng_kv_layout(s_engine);
    eng_kv_seq_t ref = {0};
    if (eng_kv_seq_reserve(&ref, eng_kv_pool(s_engine), l->block_size, n) != PD_OK || ref.n_blocks != n_blocks)
        return -1;
    const int32_t *table = ref.blocks;
    int32_t pos = 0;
    eng_batch_t b = {.n_seqs = 1,
                     .n_tokens = &n,
                     .pos = &pos,
                     .block_tables = &table,
                     .n_blocks = &ref.n_blocks,
                     .tokens = tokens,
                     .logits = s_logits};
    int diff = eng_forward(s_engine, &b) == PD_OK ? 0 : -1;
    size_t chunk = eng_kv_chunk_bytes(l), row = chunk / (size_t)l->block_size;
    uint8_t *a = pd_xmalloc(chunk), *c = pd_xmalloc(chunk);
    for (int32_t layer = 0; diff >= 0 && layer < l->n_layers; layer++)
        for (int kind = 0; kind < 2; kind++)
            for (int32_t k = 0; k < n_blocks; k++) {
                int32_t rows = n - k * l->block_size < l->block_size ? n - k * l->block_size : l->block_size;
                if (eng_kv_read_chunk(s_engine, layer, (eng_kv_kind_t)kind, blocks[k], a) != PD_OK ||
                    eng_kv_read_chunk(s_engine, layer, (eng_kv_kind_t)kind, ref.blocks[k], c) != PD_OK)
                    return -1;
                diff += memcmp(a, c, row * (size_t)rows) != 0;
            }
    free(a), free(c);
    eng_kv_seq_release(&ref, eng_kv_pool(s_engine));
    eng_kv_seq_fini(&ref);
    return diff;
}

static void test_golden_batched_chunked(void) {
    golden_t g[32];
    int n = s_load_golden(g, 32);
    REQUIRE(n >= (s_quick() ? 6 : 10));
    pf_sched_params_t p = s_params(s_engine, STEP_TOKENS, 24);
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy();
    int64_t total = 0;
    for (int i = 0; i < n; i++) {
        CHECK_EQ_INT(pf_sched_submit(s, 1000 + (uint64_t)i, g[i].prompt, g[i].n_prompt, &greedy, 0), PD_OK);
        total += g[i].n_prompt;
    }
    pf_event_t ev[MAX_EVENTS];
    int n_ready = 0, max_seqs = 0, steps = 0;
    while (n_ready < n && steps < 200) {
        const pf_plan_t *pl;
        int n_ev = s_step(s_engine, s, 0, ev, &pl);
        REQUIRE(n_ev >= 0 && pl->n_seqs > 0);
        CHECK(pl->n_tokens_total <= STEP_TOKENS);
        if (pl->n_seqs > max_seqs) max_seqs = pl->n_seqs;
        steps++;
        for (int e = 0; e < n_ev; e++) {
            REQUIRE(ev[e].kind == PF_EV_READY);
            golden_t *c = &g[ev[e].req_id - 1000];
            CHECK(!c->is_ready);
            c->is_ready = true;
            n_ready++;
            CHECK_EQ_INT(ev[e].n_tokens, c->n_prompt);
            CHECK_EQ_INT(ev[e].n_blocks, eng_kv_blocks_for(c->n_prompt, p.block_size));
            CHECK_MSG(ev[e].first.token == c->first || c->margin < NEAR_TIE_MARGIN, "%s: first token %d, HF %d",
                      c->name, ev[e].first.token, c->first);
            int d = s_compare_kv_alone(c->prompt, c->n_prompt, ev[e].block_ids, ev[e].n_blocks);
            CHECK_MSG(d == 0, "%s: %d KV chunks differ from the one-piece prefill", c->name, d);
            /* the one-piece prefill's last logits give the same greedy token */
            int32_t best = 0;
            for (int32_t v = 1; v < s_vocab; v++)
                if (s_logits[v] > s_logits[best]) best = v;
            CHECK_EQ_INT(best, ev[e].first.token);
            CHECK_EQ_INT(pf_sched_sent(s, ev[e].req_id, PD_OK), PD_OK);
        }
    }
    CHECK_EQ_INT(n_ready, n);
    /* packed: every step but the last is full, several prompts share a step */
    CHECK_EQ_INT(steps, (total + STEP_TOKENS - 1) / STEP_TOKENS);
    CHECK(max_seqs >= 3);
    pf_sched_stats_t st;
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_prefill_tokens, total);
    CHECK_EQ_INT(st.n_queued + st.n_prefilling + st.n_sending, 0);
    CHECK_EQ_INT(st.queued_tokens, 0);
    CHECK_EQ_INT(st.n_sent_ok, n);
    CHECK_EQ_INT(st.n_free_blocks, st.n_blocks);
    fprintf(stderr, "  %d golden prompts (%lld tokens) in %d steps of <= %d tokens, up to %d per step\n", n,
            (long long)total, steps, STEP_TOKENS, max_seqs);
    pf_sched_destroy(&s);
    CHECK(s == NULL);
    for (int i = 0; i < n; i++) free(g[i].prompt);
}

/* ---- fairness ---- */

static void test_short_behind_long(void) {
    enum { LONG = 1000 };
    static const int32_t shorts[3] = {5, 12, 6};
    int32_t *prompt = pd_xmalloc(sizeof(int32_t) * LONG);
    s_make_prompt(prompt, LONG, 7);
    pf_sched_params_t p = s_params(s_engine, STEP_TOKENS, 32);
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy();
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, LONG, &greedy, 0), PD_OK);
    for (int i = 0; i < 3; i++)
        CHECK_EQ_INT(pf_sched_submit(s, 10 + (uint64_t)i, prompt + 100, shorts[i], &greedy, 0), PD_OK);

    /* step 1: the long prompt takes its capped share first, every short one completes in the same step,
     * and the leftover budget goes back to the long one */
    pf_event_t ev[MAX_EVENTS];
    const pf_plan_t *pl;
    int n_ev = s_step(s_engine, s, 0, ev, &pl);
    CHECK_EQ_INT(n_ev, 3);
    CHECK_EQ_INT(pl->n_seqs, 4);
    CHECK_EQ_INT(pl->n_tokens_total, STEP_TOKENS);
    CHECK_EQ_INT(pl->req_ids[0], 1);
    CHECK_EQ_INT(pl->n_tokens[0], STEP_TOKENS - 5 - 12 - 6);
    CHECK_EQ_INT(pl->n_logits, 3);
    CHECK(!pl->is_final[0] && pl->is_final[1] && pl->is_final[2] && pl->is_final[3]);
    for (int e = 0; e < n_ev; e++) CHECK(ev[e].kind == PF_EV_READY && ev[e].req_id >= 10);
    /* step 2: alone, the long one gets the whole budget (work-conserving), from where it stopped */
    n_ev = s_step(s_engine, s, 0, ev + 3, &pl);
    CHECK_EQ_INT(n_ev, 0);
    CHECK_EQ_INT(pl->n_seqs, 1);
    CHECK_EQ_INT(pl->n_tokens[0], STEP_TOKENS);
    CHECK_EQ_INT(pl->pos[0], STEP_TOKENS - 23);
    CHECK_EQ_INT(memcmp(pl->tokens, prompt + STEP_TOKENS - 23, sizeof(int32_t) * STEP_TOKENS), 0);

    /* cancel the long one between steps: its blocks come back at once */
    bool is_sending = true;
    CHECK_EQ_INT(pf_sched_cancel(s, 1, &is_sending), PD_OK);
    CHECK(!is_sending);
    for (int e = 0; e < 3; e++) CHECK_EQ_INT(pf_sched_sent(s, ev[e].req_id, PD_OK), PD_OK);
    CHECK(s_pool_full(s_engine));
    pf_sched_destroy(&s);
    free(prompt);
}

/* ---- backpressure, refusals, waiting for blocks ---- */

static void test_refusals_and_backpressure(void) {
    int32_t prompt[32];
    s_make_prompt(prompt, 32, 3);
    pf_sched_params_t p = s_params(s_engine, STEP_TOKENS, 32);
    p.max_queued = 2;
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy(), bad = greedy;
    bad.top_p = 0;
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_submit(s, 2, prompt, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_submit(s, 3, prompt, 8, &greedy, 0), PD_EAGAIN);
    pf_sched_stats_t st;
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued, 2);
    CHECK_EQ_INT(st.n_rejected_full, 1);

    /* admitted into a step: the queue has room again */
    const pf_plan_t *pl;
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pl->n_seqs, 2);
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_EINVAL); /* one step in flight */
    CHECK_EQ_INT(pf_sched_submit(s, 3, prompt, 8, &greedy, 0), PD_OK);

    /* bad input */
    int32_t big = p.max_prompt_tokens + 1;
    int32_t *huge = pd_xcalloc((size_t)big, sizeof(int32_t));
    CHECK_EQ_INT(pf_sched_submit(s, 4, huge, big, &greedy, 0), PD_EINVAL);
    CHECK(strstr(pf_sched_error(s), "prompt of") != NULL); /* the reason, for the error reply */
    free(huge);
    CHECK_EQ_INT(pf_sched_submit(s, 4, prompt, 0, &greedy, 0), PD_EINVAL);
    int32_t bad_tok[2] = {1, s_vocab};
    CHECK_EQ_INT(pf_sched_submit(s, 4, bad_tok, 2, &greedy, 0), PD_EINVAL);
    CHECK(strstr(pf_sched_error(s), "at 1 out of range") != NULL);
    CHECK_EQ_INT(pf_sched_submit(s, 4, prompt, 2, &bad, 0), PD_EINVAL);
    CHECK(strstr(pf_sched_error(s), "sampling: top_p") != NULL);
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, 2, &greedy, 0), PD_EINVAL); /* duplicate id */
    CHECK(strcmp(pf_sched_error(s), "duplicate request id") == 0);

    /* the step failed in the backend: its requests end with FAILED events and their blocks are freed */
    pf_event_t ev[MAX_EVENTS];
    CHECK_EQ_INT(pf_sched_update(s, pl, PD_EBACKEND, NULL, ev, 1), PD_ERANGE); /* cap < n_seqs */
    CHECK_EQ_INT(pf_sched_update(s, pl, PD_EBACKEND, NULL, ev, MAX_EVENTS), 2);
    CHECK(ev[0].kind == PF_EV_FAILED && ev[0].status == PD_EBACKEND && ev[0].req_id == 1);
    CHECK(ev[1].kind == PF_EV_FAILED && ev[1].req_id == 2);
    CHECK_EQ_INT(pf_sched_cancel(s, 1, NULL), PD_EINVAL); /* gone */
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued, 1);
    CHECK_EQ_INT(st.n_prefilling, 0);
    CHECK_EQ_INT(st.n_failed, 2);
    pf_sched_destroy(&s); /* frees the queued one */
    CHECK(s_pool_full(s_engine));
}

static void test_waits_for_blocks(void) {
    /* an engine whose pool holds 8 blocks (128 tokens) */
    eng_params_t ep = eng_params_default();
    ep.model_path = pd_test_model_path();
    ep.kv_n_blocks = 8;
    ep.max_batch_tokens = STEP_TOKENS;
    char err[512];
    eng_t *e = eng_create(&ep, err, sizeof err);
    REQUIRE(e);
    int32_t prompt[200];
    s_make_prompt(prompt, 200, 11);
    pf_sched_params_t p = s_params(e, STEP_TOKENS, 32);
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy();
    CHECK_EQ_INT(pf_sched_submit(s, 9, prompt, 129, &greedy, 0), PD_EINVAL); /* 9 blocks: could never run */
    CHECK(strstr(pf_sched_error(s), "need 9 KV blocks, the pool has 8") != NULL);
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, 80, &greedy, 0), PD_OK); /* 5 blocks */
    CHECK(pf_sched_error(s)[0] == '\0');
    CHECK_EQ_INT(pf_sched_submit(s, 2, prompt + 80, 64, &greedy, 0), PD_OK); /* 4 blocks: waits */
    CHECK_EQ_INT(pf_sched_submit(s, 3, prompt + 150, 1, &greedy, 0), PD_OK); /* would fit, but FCFS */

    pf_event_t ev[MAX_EVENTS];
    const pf_plan_t *pl;
    int n_ev = 0, steps = 0;
    while (n_ev == 0 && steps++ < 4) {
        n_ev = s_step(e, s, 0, ev, &pl);
        CHECK_EQ_INT(pl->n_seqs, 1);
    }
    REQUIRE(n_ev == 1 && ev[0].req_id == 1 && ev[0].kind == PF_EV_READY);
    /* 1 is pinned while it is sent: the others still wait, and an empty plan is fine */
    CHECK_EQ_INT(s_step(e, s, 0, ev + 1, &pl), 0);
    CHECK_EQ_INT(pl->n_seqs, 0);
    pf_sched_stats_t st;
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued, 2);
    CHECK_EQ_INT(st.n_sending, 1);
    CHECK_EQ_INT(st.n_free_blocks, 3);
    CHECK_EQ_INT(pf_sched_sent(s, 1, PD_ETIMEDOUT), PD_OK); /* a failed transfer frees the blocks too */
    CHECK_EQ_INT(pf_sched_sent(s, 1, PD_OK), PD_EINVAL);

    /* now 2 and 3 run, in one step each of 64 + 1 tokens would exceed it: 2 gets 32+31, 3 gets 1 */
    int got = 0;
    for (steps = 0; got < 2 && steps < 4; steps++) {
        n_ev = s_step(e, s, 0, ev, &pl);
        CHECK(n_ev >= 0);
        for (int i = 0; i < n_ev; i++) {
            CHECK(ev[i].kind == PF_EV_READY);
            CHECK_EQ_INT(pf_sched_sent(s, ev[i].req_id, PD_OK), PD_OK);
            got++;
        }
    }
    CHECK_EQ_INT(got, 2);
    CHECK(s_pool_full(e));
    pf_sched_destroy(&s);
    eng_destroy(&e);
}

/* ---- cancel in every state, deadlines ---- */

static void test_cancel_and_deadlines(void) {
    int32_t prompt[40];
    s_make_prompt(prompt, 40, 5);
    pf_sched_params_t p = s_params(s_engine, 16, 16); /* small steps: few tokens in the sanitizer run */
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy();
    pf_event_t ev[MAX_EVENTS];
    const pf_plan_t *pl;
    bool is_sending;
    pf_sched_stats_t st;

    /* QUEUED */
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, 10, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_cancel(s, 1, &is_sending), PD_OK);
    CHECK_EQ_INT(pf_sched_cancel(s, 1, NULL), PD_EINVAL);
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued, 0);

    /* PREFILLING between steps */
    CHECK_EQ_INT(pf_sched_submit(s, 2, prompt, 40, &greedy, 0), PD_OK);
    CHECK_EQ_INT(s_step(s_engine, s, 0, ev, NULL), 0);
    CHECK(!s_pool_full(s_engine));
    CHECK_EQ_INT(pf_sched_cancel(s, 2, NULL), PD_OK);
    CHECK(s_pool_full(s_engine));

    /* in the running step: blocks stay until the update (the engine writes them), no event */
    CHECK_EQ_INT(pf_sched_submit(s, 3, prompt, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_submit(s, 4, prompt + 8, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pl->n_seqs, 2);
    CHECK_EQ_INT(pf_sched_cancel(s, 3, &is_sending), PD_OK);
    CHECK_EQ_INT(pf_sched_cancel(s, 3, &is_sending), PD_OK); /* twice */
    CHECK(!is_sending);
    CHECK(!s_pool_full(s_engine));
    eng_batch_t b;
    pf_plan_batch(pl, s_logits, &b);
    int n_ev = pf_sched_update(s, pl, eng_forward(s_engine, &b), s_logits, ev, MAX_EVENTS);
    CHECK_EQ_INT(n_ev, 1);
    CHECK(ev[0].req_id == 4 && ev[0].kind == PF_EV_READY);

    /* SENDING: marked, blocks pinned until the transfer is released */
    CHECK_EQ_INT(pf_sched_cancel(s, 4, &is_sending), PD_OK);
    CHECK(is_sending);
    CHECK(!s_pool_full(s_engine));
    CHECK_EQ_INT(pf_sched_sent(s, 4, PD_ECLOSED), PD_OK);
    CHECK(s_pool_full(s_engine));

    /* deadlines: 5 expires while PREFILLING, 6 while QUEUED (behind 5) */
    CHECK_EQ_INT(pf_sched_submit(s, 5, prompt, 40, &greedy, 2000), PD_OK);
    CHECK_EQ_INT(s_step(s_engine, s, 0, ev, &pl), 0);
    CHECK_EQ_INT(pl->n_expired, 0);
    CHECK_EQ_INT(pf_sched_submit(s, 6, prompt, 30, &greedy, 1000), PD_OK);
    CHECK_EQ_INT(s_step(s_engine, s, 1000, ev, &pl), 0);
    CHECK_EQ_INT(pl->n_expired, 1);
    CHECK_EQ_INT(pl->expired_ids[0], 6);
    CHECK_EQ_INT(pl->n_seqs, 1);
    CHECK_EQ_INT(s_step(s_engine, s, 2000, ev, &pl), 0);
    CHECK_EQ_INT(pl->n_expired, 1);
    CHECK_EQ_INT(pl->expired_ids[0], 5);
    CHECK_EQ_INT(pl->n_seqs, 0);
    CHECK(s_pool_full(s_engine));

    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued + st.n_prefilling + st.n_sending, 0);
    CHECK_EQ_INT(st.queued_tokens, 0);
    CHECK_EQ_INT(st.n_expired, 2);
    CHECK_EQ_INT(st.n_cancelled, 4);

    /* destroy with a request mid-prompt gives its blocks back */
    CHECK_EQ_INT(pf_sched_submit(s, 7, prompt, 40, &greedy, 0), PD_OK);
    CHECK_EQ_INT(s_step(s_engine, s, 0, ev, NULL), 0);
    CHECK(!s_pool_full(s_engine));
    pf_sched_destroy(&s);
    CHECK(s_pool_full(s_engine));
}

/* Pinned (a transfer streams the KV while the final chunk runs): a failed step, a cancel in the step and READY all
 * leave the request SENDING with its blocks until pf_sched_sent; only a final chunk in the running step pins. */
static void test_pinned(void) {
    int32_t prompt[24];
    s_make_prompt(prompt, 24, 9);
    pf_sched_params_t p = s_params(s_engine, 16, 16);
    pf_sched_t *s = pf_sched_create(&p);
    REQUIRE(s);
    eng_sampling_t greedy = s_greedy();
    pf_event_t ev[MAX_EVENTS];
    const pf_plan_t *pl;
    eng_batch_t b;
    pf_sched_stats_t st;
    bool is_sending = false;

    /* 24 tokens in steps of 16: two chunks, the second final */
    CHECK_EQ_INT(pf_sched_submit(s, 1, prompt, 24, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 1), PD_EINVAL); /* no step out */
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 1), PD_EINVAL); /* not its final chunk */
    pf_plan_batch(pl, s_logits, &b);
    CHECK_EQ_INT(pf_sched_update(s, pl, eng_forward(s_engine, &b), s_logits, ev, MAX_EVENTS), 0);

    /* the final chunk fails while pinned: FAILED, but the blocks stay until pf_sched_sent */
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 1), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 99), PD_EINVAL);
    CHECK_EQ_INT(pf_sched_update(s, pl, PD_EBACKEND, NULL, ev, MAX_EVENTS), 1);
    CHECK(ev[0].kind == PF_EV_FAILED && ev[0].req_id == 1 && ev[0].status == PD_EBACKEND);
    CHECK(!s_pool_full(s_engine));
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_sending, 1);
    CHECK_EQ_INT(st.n_prefilling, 0);
    CHECK_EQ_INT(st.queued_tokens, 0);
    CHECK_EQ_INT(pf_sched_sent(s, 1, PD_ECLOSED), PD_OK);
    CHECK(s_pool_full(s_engine));

    /* cancelled in the step while pinned: no event, SENDING until pf_sched_sent */
    CHECK_EQ_INT(pf_sched_submit(s, 2, prompt, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 2), PD_OK);
    CHECK_EQ_INT(pf_sched_cancel(s, 2, &is_sending), PD_OK);
    CHECK(is_sending);
    pf_plan_batch(pl, s_logits, &b);
    CHECK_EQ_INT(pf_sched_update(s, pl, eng_forward(s_engine, &b), s_logits, ev, MAX_EVENTS), 0);
    CHECK(!s_pool_full(s_engine));
    CHECK_EQ_INT(pf_sched_sent(s, 2, PD_ECLOSED), PD_OK);
    CHECK(s_pool_full(s_engine));

    /* pinned and READY: as unpinned */
    CHECK_EQ_INT(pf_sched_submit(s, 3, prompt, 8, &greedy, 0), PD_OK);
    CHECK_EQ_INT(pf_sched_plan(s, 0, &pl), PD_OK);
    CHECK_EQ_INT(pf_sched_pin(s, 3), PD_OK);
    pf_plan_batch(pl, s_logits, &b);
    CHECK_EQ_INT(pf_sched_update(s, pl, eng_forward(s_engine, &b), s_logits, ev, MAX_EVENTS), 1);
    CHECK(ev[0].kind == PF_EV_READY && ev[0].req_id == 3);
    CHECK_EQ_INT(pf_sched_sent(s, 3, PD_OK), PD_OK);
    CHECK(s_pool_full(s_engine));
    pf_sched_stats(s, &st);
    CHECK_EQ_INT(st.n_queued + st.n_prefilling + st.n_sending, 0);
    CHECK_EQ_INT(st.n_sent_ok, 1);
    CHECK_EQ_INT(st.n_sent_failed, 2);
    pf_sched_destroy(&s);
}

int main(void) {
    pd_log_init("test", PD_LOG_ERROR);
    eng_params_t p = eng_params_default();
    p.model_path = pd_test_model_path();
    p.kv_mem_bytes = 160ull << 20;
    char err[512];
    s_engine = eng_create(&p, err, sizeof err);
    if (!s_engine) {
        fprintf(stderr, "cannot create engine: %s\n", err);
        printf("0 passed, 1 failed\n");
        return 1;
    }
    s_vocab = eng_config(s_engine)->vocab_size;
    s_logits = pd_xmalloc(sizeof(float) * (size_t)s_vocab * STEP_TOKENS);
    PD_TEST_RUN(test_refusals_and_backpressure);
    PD_TEST_RUN(test_cancel_and_deadlines);
    PD_TEST_RUN(test_pinned);
    PD_TEST_RUN(test_short_behind_long);
    PD_TEST_RUN(test_waits_for_blocks);
    PD_TEST_RUN(test_golden_batched_chunked);
    free(s_logits);
    eng_destroy(&s_engine);
    return pd_test_finish();
}
