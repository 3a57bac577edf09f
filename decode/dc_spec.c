/* dc_spec.c: n-gram lookup, acceptance tracking, cost model and draft allocation (see dc_spec.h). */
#include "dc_spec.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

const char *dc_spec_mode_name(dc_spec_mode_t m) {
    switch (m) {
    case DC_SPEC_NGRAM: return "ngram";
    case DC_SPEC_DRAFT: return "draft";
    default: return "off";
    }
}

pd_status dc_spec_mode_parse(const char *s, dc_spec_mode_t *out) {
    if (!s || !out) return PD_EINVAL;
    if (!strcmp(s, "off"))
        *out = DC_SPEC_OFF;
    else if (!strcmp(s, "ngram"))
        *out = DC_SPEC_NGRAM;
    else if (!strcmp(s, "draft"))
        *out = DC_SPEC_DRAFT;
    else
        return PD_EINVAL;
    return PD_OK;
}

/* Decay per observation and per idle step: about the last 5 verifications count; an idle sequence is back
 * near the prior after ~100 steps. */
#define ACC_DECAY      0.8f
#define ACC_IDLE_DECAY 0.98f

float dc_spec_acc_rate(const dc_spec_acc_t *a) {
    const float prior = a->prior > 0 ? a->prior : 0.5f;
    return (a->n_ok + 2.0f * prior) / (a->n_tested + 2.0f);
}

void dc_spec_acc_observe(dc_spec_acc_t *a, int32_t proposed, int32_t accepted) {
    if (proposed <= 0) return;
    /* drafts after the first rejected one were never tested: accepted successes, one failure unless all passed */
    int32_t tested = accepted < proposed ? accepted + 1 : accepted;
    a->n_ok = a->n_ok * ACC_DECAY + (float)accepted;
    a->n_tested = a->n_tested * ACC_DECAY + (float)tested;
}

void dc_spec_acc_idle(dc_spec_acc_t *a) {
    a->n_ok *= ACC_IDLE_DECAY;
    a->n_tested *= ACC_IDLE_DECAY;
}

/* The step-cost fit: each observation's weight decays by COST_DECAY per step (~30 steps count); a line is fitted
 * once COST_MIN_STEPS steps are in and their token counts have a variance of at least COST_MIN_VAR. */
#define COST_DECAY     0.97
#define COST_MIN_STEPS 8.0
#define COST_MIN_VAR   1.0

void dc_spec_cost_observe(dc_spec_cost_t *c, int32_t n_tokens, double verify_us) {
    if (n_tokens <= 0 || verify_us <= 0) return;
    const double n = n_tokens, predicted_now = c->scale * (c->base_us + c->per_token_us * n);
    const double y = predicted_now > 0 && verify_us > 3 * predicted_now ? 3 * predicted_now : verify_us;
    c->w = COST_DECAY * c->w + 1, c->s_n = COST_DECAY * c->s_n + n, c->s_nn = COST_DECAY * c->s_nn + n * n;
    c->s_y = COST_DECAY * c->s_y + y, c->s_ny = COST_DECAY * c->s_ny + n * y;
    const double mn = c->s_n / c->w, my = c->s_y / c->w, var = c->s_nn / c->w - mn * mn;
    if (c->w >= COST_MIN_STEPS && var >= COST_MIN_VAR) { /* enough spread in n: fit the line itself */
        double slope = (c->s_ny / c->w - mn * my) / var;
        if (slope < 0) slope = 0;
        double base = my - slope * mn;
        if (base < 0) base = 0, slope = my / mn; /* through the origin: still the measured mean */
        c->base_us = base, c->per_token_us = slope, c->scale = 1;
        return;
    }
    const double predicted = c->base_us + c->per_token_us * n;
    if (predicted <= 0) return;
    double s = 0.9 * c->scale + 0.1 * y / predicted;
    c->scale = s < 0.25 ? 0.25 : s > 4 ? 4 : s;
}

int32_t dc_spec_allocate(const dc_spec_cost_t *c, bool use_draft_model, int32_t n_rows, const float *acc,
                         const int32_t *avail, const float *first_extra_us, int32_t n_step_tokens, int32_t max_total,
                         int32_t *k) {
    enum { MAX_DEPTH = 64 };
    int32_t depth_rows[MAX_DEPTH + 1] = {0};
    for (int32_t i = 0; i < n_rows; i++) k[i] = 0;
    if (n_rows <= 0 || max_total <= 0) return 0;
    double sc = c->scale > 0 ? c->scale : 1;
    /* expected tokens of the step and its predicted time; every decode row yields at least one token */
    double gain = n_rows, t = sc * (c->base_us + c->per_token_us * (double)n_step_tokens);
    int32_t total = 0;
    while (total < max_total) {
        /* the draft token with the most expected tokens per unit of cost */
        int32_t best = -1;
        double best_g = 0, best_cost = 1;
        for (int32_t i = 0; i < n_rows; i++) {
            if (k[i] >= avail[i] || k[i] >= MAX_DEPTH) continue;
            const int32_t depth = k[i] + 1;
            double g = pow(acc[i], depth), cost = sc * c->per_token_us;
            if (use_draft_model) cost += sc * (c->draft_token_us + (depth_rows[depth] == 0 ? c->draft_base_us : 0));
            if (depth == 1 && first_extra_us) cost += sc * first_extra_us[i];
            if (cost > 0 && (best < 0 || g * best_cost > best_g * cost)) best_g = g, best_cost = cost, best = i;
        }
        if (best < 0) break;
        int32_t depth = k[best] + 1;
        double cost = best_cost;
        /* adding it must raise tokens per unit time: best_g / cost > gain / t (no other candidate could) */
        if (best_g * t <= gain * cost) break;
        k[best] = depth;
        depth_rows[depth]++;
        gain += best_g;
        t += cost;
        total++;
    }
    return total;
}

/* A verdict needs GUARD_MIN_STEPS steps of each kind in the bucket. Steps over GUARD_OUTLIER x the kind's median step
 * are left out of its time per token: a CUDA graph's capture makes one step tens of times its usual length (with
 * decayed means a few captures decided the verdict on the H100: RAG at batch 1 lost its 1.2-1.3x; the backend's
 * one-time forwards are no longer fed to the guard, but other hiccups are). */
#define GUARD_MIN_STEPS 5
#define GUARD_OUTLIER   3.0

static int s_guard_bucket(int32_t n_rows) {
    int b = 0;
    while (b < DC_SPEC_GUARD_BUCKETS - 1 && n_rows >= (2 << b)) b++;
    return b;
}

void dc_spec_guard_observe(dc_spec_guard_t *g, int32_t n_rows, int32_t n_drafts, int32_t n_emitted, double step_us) {
    if (n_rows <= 0 || n_emitted <= 0 || !(step_us > 0)) return;
    dc_spec_guard_bucket_t *b = &g->b[s_guard_bucket(n_rows)];
    const int kind = n_drafts > 0;
    b->step_us[kind][b->next[kind]] = step_us, b->tokens[kind][b->next[kind]] = n_emitted;
    b->next[kind] = (b->next[kind] + 1) % DC_SPEC_GUARD_STEPS;
    if (b->n[kind] < DC_SPEC_GUARD_STEPS) b->n[kind]++;
}

static double s_median(const double *v, int n) {
    double t[DC_SPEC_GUARD_STEPS];
    for (int i = 0; i < n; i++) { /* insertion sort: n <= 16 */
        int j = i;
        for (; j > 0 && t[j - 1] > v[i]; j--) t[j] = t[j - 1];
        t[j] = v[i];
    }
    return n % 2 ? t[n / 2] : 0.5 * (t[n / 2 - 1] + t[n / 2]);
}

/* Mean of the n samples without the largest (one hiccup of a step does not decide), or the only one. */
static double s_trimmed_mean(const double *v, int n) {
    double sum = 0, hi = v[0];
    for (int i = 0; i < n; i++) sum += v[i], hi = v[i] > hi ? v[i] : hi;
    return n > 1 ? (sum - hi) / (n - 1) : sum;
}

/* Each step's time per token (the A/B statistics' input). */
static void s_per_token(const dc_spec_guard_bucket_t *b, int kind, double *out) {
    for (int i = 0; i < b->n[kind]; i++) out[i] = b->step_us[kind][i] / b->tokens[kind][i];
}

/* The kind's time over its tokens, without the steps over GUARD_OUTLIER x its median step. */
static double s_time_per_token(const dc_spec_guard_bucket_t *b, int kind) {
    const double cap = GUARD_OUTLIER * s_median(b->step_us[kind], b->n[kind]);
    double us = 0;
    int64_t tokens = 0;
    for (int i = 0; i < b->n[kind]; i++)
        if (b->step_us[kind][i] <= cap) us += b->step_us[kind][i], tokens += b->tokens[kind][i];
    return tokens > 0 ? us / (double)tokens : 0; /* the median step is always kept: tokens > 0 */
}

static double s_guard_stat(const dc_spec_guard_t *g, const dc_spec_guard_bucket_t *b, int kind) {
    if (g->stat == DC_SPEC_GUARD_RATIO) return s_time_per_token(b, kind);
    double v[DC_SPEC_GUARD_STEPS];
    s_per_token(b, kind, v);
    return g->stat == DC_SPEC_GUARD_MEAN ? s_trimmed_mean(v, b->n[kind]) : s_median(v, b->n[kind]);
}

/* Plans between drafted probes after n_backoff probes that found drafts disallowed (dc_spec_guard_probe_due). */
static int64_t s_probe_interval(int32_t n_backoff) {
    return (int64_t)(2 * DC_SPEC_EXPLORE)
           << (n_backoff < DC_SPEC_GUARD_MAX_BACKOFF ? n_backoff : DC_SPEC_GUARD_MAX_BACKOFF);
}

/* "time over tokens/median step's" of one kind's samples in a bucket, or "-" without any. */
static void s_describe_kind(const dc_spec_guard_bucket_t *b, int kind, char *out, size_t cap) {
    if (b->n[kind] == 0) {
        snprintf(out, cap, "-");
        return;
    }
    double v[DC_SPEC_GUARD_STEPS];
    s_per_token(b, kind, v);
    snprintf(out, cap, "%.2f/%.2f", s_time_per_token(b, kind), s_median(v, b->n[kind]));
}

int dc_spec_guard_describe(const dc_spec_guard_t *g, char *buf, size_t cap) {
    size_t at = 0;
    int n = 0;
    if (cap > 0) buf[0] = '\0';
    for (int b = 0; b < DC_SPEC_GUARD_BUCKETS; b++) {
        const dc_spec_guard_bucket_t *k = &g->b[b];
        if (k->n[0] + k->n[1] == 0) continue;
        const int32_t lo = b == 0 ? 1 : 1 << b, hi = (2 << b) - 1;
        char drafted[32], plain[32], range[24];
        s_describe_kind(k, 1, drafted, sizeof drafted);
        s_describe_kind(k, 0, plain, sizeof plain);
        if (b == DC_SPEC_GUARD_BUCKETS - 1)
            snprintf(range, sizeof range, "%d+", lo);
        else if (lo == hi)
            snprintf(range, sizeof range, "%d", lo);
        else
            snprintf(range, sizeof range, "%d-%d", lo, hi);
        if (at >= cap) break;
        const bool is_on = dc_spec_guard_allows(g, lo);
        char probes[48] = "";
        if (!is_on && k->n_backoff > 0) /* the interval the last probe set */
            snprintf(probes, sizeof probes, " (probes every %lld steps)",
                     (long long)s_probe_interval(k->n_backoff - 1));
        int w = snprintf(buf + at, cap > at ? cap - at : 0,
                         "%srows %s: drafts %s us/token (time/tokens, median; %d) vs none %s (%d): %s%s", n ? "; " : "",
                         range, drafted, k->n[1], plain, k->n[0], is_on ? "on" : "off", probes);
        if (w > 0) at += (size_t)w;
        n++;
    }
    return n;
}

bool dc_spec_guard_probe_due(dc_spec_guard_t *g, int32_t n_rows, int64_t plan) {
    dc_spec_guard_bucket_t *b = &g->b[s_guard_bucket(n_rows > 0 ? n_rows : 1)];
    if (dc_spec_guard_allows(g, n_rows)) {
        b->n_backoff = 0, b->next_probe = 0;
        return plan % s_probe_interval(0) == 0;
    }
    if (plan < b->next_probe) return false;
    b->next_probe = plan + s_probe_interval(b->n_backoff);
    b->n_backoff++;
    return true;
}

bool dc_spec_guard_allows(const dc_spec_guard_t *g, int32_t n_rows) {
    if (n_rows <= 0) return true;
    const dc_spec_guard_bucket_t *b = &g->b[s_guard_bucket(n_rows)];
    if (b->n[0] < GUARD_MIN_STEPS || b->n[1] < GUARD_MIN_STEPS) return true;
    return s_guard_stat(g, b, 1) <= (g->margin > 0 ? g->margin : 1.0) * s_guard_stat(g, b, 0);
}
