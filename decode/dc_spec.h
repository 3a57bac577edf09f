/* dc_spec.h: the decode service's policy for speculative decoding in its batch: per-sequence acceptance
 * tracking, the step cost model and the allocation of draft tokens across a batch (adaptive k). The proposers
 * themselves (n-gram lookup, draft model) are the engine's (eng_draft.h). No engine, no clock, no allocation:
 * dc_sched calls these while it plans a step, the executor feeds measured step times back.
 *
 * Why drafts never change an answer: verification samples every position of a row from the target model's own
 * logits, in order, with the request's own sampler and random stream, exactly as plain decoding would, and
 * keeps a draft token only when the sampled token equals it (dc_sched.c, s_verify). For a draft that is a
 * point mass (n-gram lookup, a greedy draft model) this is the rejection sampling of Leviathan et al. / Chen et
 * al.: accepted with probability p(d) = min(1, p(d)/q(d)), and after a rejection the token is distributed as p
 * restricted to tokens other than d, i.e. normalize(max(0, p - q)). Realised with the same uniform draw plain
 * decoding would have used, so a seeded request gives the same tokens with and without speculation.
 *
 * Adaptive k (dc_spec_allocate): a draft token at depth j of a sequence whose per-token acceptance is a yields
 * a^j expected extra tokens and costs one more verified token (plus draft-model work). Tokens are added in
 * order of decreasing a^j while they raise the step's expected tokens per second under the cost model, so
 * speculation switches itself off where verifying costs about as much as decoding (large CPU batches) and
 * where drafts keep failing, and grows k where the step is dominated by reading the weights (small batches). */
#ifndef DC_SPEC_H
#define DC_SPEC_H

#include <stdbool.h>
#include <stdint.h>

#include "pd_common.h"

typedef enum { DC_SPEC_OFF = 0, DC_SPEC_NGRAM = 1, DC_SPEC_DRAFT = 2 } dc_spec_mode_t;

/* "off", "ngram", "draft". */
const char *dc_spec_mode_name(dc_spec_mode_t m);
/* PD_OK, or PD_EINVAL for anything but those three names. */
PD_NODISCARD pd_status dc_spec_mode_parse(const char *s, dc_spec_mode_t *out);

/* Per-sequence acceptance: exponentially weighted counts of accepted drafts over drafts that were tested, with
 * a prior worth 2 tests at rate `prior` (0: 0.5). Steps without drafts let the counts decay back towards the
 * prior, so a sequence whose drafts once failed is tried again later. The decode scheduler sets a new sequence's
 * prior to the worker's recent acceptance over all sequences (dc_spec_acc_t of its own), so a draft model that
 * keeps failing is not tried on every new request (each try makes it read the whole prompt first). Plain struct,
 * zero-initialised = prior 0.5. */
typedef struct {
    float n_ok, n_tested;
    float prior;
} dc_spec_acc_t;

float dc_spec_acc_rate(const dc_spec_acc_t *a);
/* proposed drafts were verified and the first accepted of them matched. */
void dc_spec_acc_observe(dc_spec_acc_t *a, int32_t proposed, int32_t accepted);
/* A step in which this sequence had nothing verified. */
void dc_spec_acc_idle(dc_spec_acc_t *a);

/* Step cost, in microseconds: verify step = base_us + per_token_us * tokens in the step; each draft token adds
 * draft_token_us, and each draft-model forward (one per draft depth) draft_base_us. Calibrated once at startup
 * (dc_exec: one sequence, 1 and 1 + k tokens), then refitted from the measured steps: a least-squares line
 * through them (decayed, so it follows the load) once their token counts vary enough, else a measured/predicted
 * scale. Why refit: a batch's extra verified tokens cost what one sequence's calibration cannot show (on the GPU,
 * other kernels and graph shapes at batch 32, and a logits row per token for the host to read and sample). */
typedef struct {
    double base_us, per_token_us;         /* target step */
    double draft_base_us, draft_token_us; /* draft-model forward (0 for n-gram lookup) */
    double scale;                         /* measured / predicted, EMA, while no line is fitted; 1 at calibration */
    double w, s_n, s_nn, s_y, s_ny;       /* decayed sums over observed steps (n tokens, y us) */
} dc_spec_cost_t;

/* dc_sched: every DC_SPEC_EXPLORE-th speculative step is a probe, alternately one that drafts under the startup
 * calibration (so that a model or guard that says drafts do not pay can learn that they pay again) and one without
 * drafts (so that the guard's comparison stays current while drafting pays). */
#define DC_SPEC_EXPLORE 16

/* Feeds one measured step: n_tokens verified in verify_us (forward and the host's work on its logits). A step is
 * counted as at most 3x its prediction (a one-off, such as a CUDA graph captured for a new batch shape, moves the
 * fit a bounded amount). Keeps scale within [0.25, 4] and the fitted costs non-negative. */
void dc_spec_cost_observe(dc_spec_cost_t *c, int32_t n_tokens, double verify_us);

/* Adaptive k for one step. n_rows decode rows; acc[i] the acceptance rate of row i, avail[i] the most drafts row i
 * can take (n-gram: what the lookup found; draft model: the request's k; both capped by the caller for blocks
 * and row capacity). n_step_tokens: tokens of the step without drafts (decode rows + local-prefill chunks).
 * use_draft_model: charge the draft model's cost. first_extra_us (NULL: none): what row i's first draft costs on
 * top (a draft model that must first read the row's history it has not seen; the scheduler spreads that over the
 * row's remaining tokens). Draft tokens go in order of expected tokens per unit cost. max_total: most draft tokens
 * in the step. Writes k[i] in [0, avail[i]]; returns their sum. */
int32_t dc_spec_allocate(const dc_spec_cost_t *c, bool use_draft_model, int32_t n_rows, const float *acc,
                         const int32_t *avail, const float *first_extra_us, int32_t n_step_tokens, int32_t max_total,
                         int32_t *k);

/* The measured backstop of adaptive k. The cost model is a line in the step's token count; on the GPU a step's
 * cost also moves with things it does not see (graph buckets, a sampling row and attention tile per draft), and
 * there it kept drafting where drafts lost 7-9% (chat at concurrency 32). The guard compares what the steps
 * actually delivered: the time per emitted token of the last DC_SPEC_GUARD_STEPS steps with drafts (their time over
 * their tokens, leaving out steps over 3x the median step: a hiccup, not the drafts' cost) against that of the last
 * steps without, for batches of about the same size (row counts in power-of-two buckets), and disallows drafts in a
 * bucket where they deliver less. Time over tokens rather than the median of each step's time per token: drafted
 * steps cost about the same whatever they emit, and at one row most emit one token (all drafts rejected) while the
 * rest emit several, so the median step said drafts lose where they made RAG at batch 1 1.7x faster on the H100.
 * Plain struct, zero-initialised = no measurements (drafts allowed). */
#define DC_SPEC_GUARD_BUCKETS 8 /* rows 1, 2-3, 4-7, ..., 128 and more */
typedef enum { DC_SPEC_GUARD_RATIO, DC_SPEC_GUARD_MEDIAN, DC_SPEC_GUARD_MEAN } dc_spec_guard_stat_t;
#define DC_SPEC_GUARD_STEPS 16
typedef struct {
    /* per kind (0: no drafts, 1: drafts), a ring of recent steps: their time and the tokens they emitted */
    double step_us[2][DC_SPEC_GUARD_STEPS];
    int32_t tokens[2][DC_SPEC_GUARD_STEPS];
    int32_t n[2], next[2];
    /* dc_spec_guard_probe_due while drafts are disallowed here: the plan number of the next drafted probe, and how
     * many probes in a row found them disallowed */
    int64_t next_probe;
    int32_t n_backoff;
} dc_spec_guard_bucket_t;
typedef struct {
    dc_spec_guard_bucket_t b[DC_SPEC_GUARD_BUCKETS];
    /* A/B knobs (zero = the default): the statistic (DC_SPEC_GUARD_STAT=median|mean: the median, or the mean without
     * the largest, of each step's time per token), and allow drafts only where their time per token is at most
     * margin x the plain one (0: 1) */
    dc_spec_guard_stat_t stat;
    double margin;
} dc_spec_guard_t;

/* One pure-decode step of n_rows rows that had n_drafts draft tokens in all and emitted n_emitted tokens (rows
 * plus accepted drafts, fewer where a row finished) in step_us. */
void dc_spec_guard_observe(dc_spec_guard_t *g, int32_t n_rows, int32_t n_drafts, int32_t n_emitted, double step_us);
/* false when both kinds have at least a few steps in n_rows' bucket and drafted steps took longer per emitted token. */
bool dc_spec_guard_allows(const dc_spec_guard_t *g, int32_t n_rows);
/* Whether plan number plan (counting the scheduler's speculative plans, from 1) of n_rows rows is a drafted probe:
 * one step that drafts under the startup calibration whatever the refitted model and the guard say, so that both can
 * learn that drafts pay again. Where the guard allows drafts: every 2 * DC_SPEC_EXPLORE-th plan. Where it does not,
 * probes back off: the first comes at once, then after 2, 4, ... up to 16 times that interval, as each probe costs
 * what drafting loses there (on the H100 a drafted step at 32 rows of chat took 56% longer per emitted token, and the
 * probes alone made n-gram speculation 2-4% slower than none). Back to the short interval once drafts are allowed. */
bool dc_spec_guard_probe_due(dc_spec_guard_t *g, int32_t n_rows, int64_t plan);
#define DC_SPEC_GUARD_MAX_BACKOFF 4 /* longest probe interval: 2 * DC_SPEC_EXPLORE << this */
/* One line on what the guard holds, for the decode worker's exit log: per row-count bucket with measurements, the
 * us per emitted token with drafts and without (time over tokens, then the median step's; steps counted) and the
 * verdict, e.g. "rows 16-31: drafts 9.80/9.75 us/token (time/tokens, median; 16) vs none 9.10/9.12 (16): off". Writes
 * at most cap bytes (NUL included); returns the buckets described. */
int dc_spec_guard_describe(const dc_spec_guard_t *g, char *buf, size_t cap);

#endif
