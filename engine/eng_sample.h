/* eng_sample.h: per-request sampling over one row of logits: greedy, temperature, top-k, top-p,
 * min-p, repetition/presence/frequency penalties, a per-request seed, and top-n logprobs.
 * Every request in a batch has its own eng_sampler_t; a sampler is used by one thread at a time.
 *
 * Order of operations (vLLM's), on one row of vocab_size logits:
 *   1. penalties on the raw logits, for each token t seen so far (prompt or generated):
 *        repetition (t in prompt or generated): x = x > 0 ? x / repetition_penalty : x * repetition_penalty
 *        frequency  (t generated n times, n>0): x -= n * frequency_penalty
 *        presence   (t generated at least once): x -= presence_penalty
 *      (in this order, in float; results are clamped to [-FLT_MAX, FLT_MAX] so that a finite logit stays
 *      finite, and a -inf (masked) one stays -inf).
 *   2. temperature == 0: greedy, the argmax of the penalised logits, ties to the lowest id. Done.
 *   3. w_t = exp((x_t - max x) / temperature): the probabilities after temperature, unnormalised
 *      (w = 1 for the most likely token). Tokens with w < e^-87 (p/p_max < 1.6e-38, logit -inf included)
 *      count as 0 and can never be drawn.
 *   4. rank tokens by w descending, equal w by lower id (a strict total order: no sort-algorithm
 *      dependence). Then, each step on what the previous one kept:
 *        top-k: keep the first top_k in that ranking;
 *        top-p: keep the shortest prefix of the ranking whose mass is >= top_p * (mass kept by top-k);
 *        min-p: drop tokens with w < min_p * w_max (ratio to the most likely token, which survives all).
 *   5. draw one uniform u in [0, 1) and take the first token of the ranking of the kept set whose
 *      cumulative mass exceeds u * (kept mass): inverse CDF in descending-probability order.
 *
 * Random numbers: xoshiro256** (Blackman and Vigna), its four state words the first four outputs of
 * splitmix64 started at `seed`; each draw is u = (next() >> 11) * 2^-53. So a seed fixes the token
 * sequence for a given logits sequence, across machines.
 *
 * Cost: a few linear passes over the vocabulary and no sort (the ranking of step 4 is a radix selection
 * over the bits of w, restricted to the tokens that can still matter), nothing allocated per sample. */
#ifndef ENG_SAMPLE_H
#define ENG_SAMPLE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pd_common.h"

#define ENG_MAX_LOGPROBS 20

typedef struct {
    float temperature;        /* 0 = greedy (argmax after penalties); > 0 scales logits; range [0, 100] */
    int32_t top_k;            /* 0 = off; keep the k most likely; >= 0 (>= vocab_size also means off) */
    float top_p;              /* 1 = off; keep the smallest set with cumulative probability >= top_p, (0, 1] */
    float min_p;              /* 0 = off; drop tokens with p < min_p * p_max, [0, 1] */
    float repetition_penalty; /* 1 = off; (0, 10]; HF/CTRL rule over prompt + generated tokens:
                                 positive logits divided, negative multiplied */
    float presence_penalty;   /* 0 = off; [-2, 2]; OpenAI rule over generated tokens: minus once if seen */
    float frequency_penalty;  /* 0 = off; [-2, 2]; minus count * penalty over generated tokens */
    uint64_t seed;            /* same seed + same logits sequence = same tokens */
    bool has_seed;            /* false: seeded from the clock and a process-wide counter at creation */
    int32_t n_logprobs;       /* top-n logprobs reported per token, 0..ENG_MAX_LOGPROBS */
} eng_sampling_t;

/* temperature 1, every filter and penalty off, no seed, no logprobs. */
eng_sampling_t eng_sampling_default(void);
/* PD_OK, or PD_EINVAL with a one-line reason naming the field, its value and its allowed range
 * (e.g. "top_p = nan, must be in (0, 1]"). NaN and infinities are rejected everywhere. err may be NULL.
 * Any thread. */
PD_NODISCARD pd_status eng_sampling_validate(const eng_sampling_t *p, char *err, size_t err_cap);

typedef struct {
    int32_t token;
    float logprob; /* natural log of the model's probability: log_softmax of the raw logits */
} eng_logprob_t;

typedef struct eng_sampler eng_sampler_t;

/* Creates the per-request state (RNG, token counts, scratch of about 32 bytes per vocabulary entry:
 * 1.6 MB at 49152, allocated here once so that sampling never allocates). p must be valid.
 * Returns NULL on bad args (logged) or out of memory. */
eng_sampler_t *eng_sampler_create(const eng_sampling_t *p, int32_t vocab_size);
/* Frees s (NULL or *s == NULL is fine) and sets *s to NULL. */
void eng_sampler_destroy(eng_sampler_t **s);
/* The seed actually used (p->seed, or the one drawn when has_seed was false): log it to reproduce a run. */
uint64_t eng_sampler_seed(const eng_sampler_t *s);

/* Registers prompt tokens (they count for the repetition penalty only). Ids must be in
 * [0, vocab_size) (asserted: validate untrusted ids before). */
void eng_sampler_add_prompt(eng_sampler_t *s, const int32_t *tokens, int64_t n);
/* Registers a generated token (counts for all three penalties). Call once per emitted token. */
void eng_sampler_add_generated(eng_sampler_t *s, int32_t token);

typedef struct {
    int32_t token;                       /* chosen token */
    float logprob;                       /* its logprob (raw model distribution) */
    int32_t n_top;                       /* = min(n_logprobs, vocab) */
    eng_logprob_t top[ENG_MAX_LOGPROBS]; /* most likely first, equal logits by lower id */
} eng_sample_result_t;

/* Chooses a token from logits (vocab_size floats, not modified). Consumes exactly one uniform draw
 * from the RNG when temperature > 0 (none when greedy), so runs are reproducible. Does NOT call
 * eng_sampler_add_generated (the caller does, once it keeps the token).
 * Logprobs are log_softmax of the raw logits (before penalties and temperature), the normaliser
 * summed in double: absolute error below 1e-6, under the float result's own resolution.
 * Logits may contain -inf (masked tokens). Returns PD_OK; PD_EINVAL for a NULL argument, a NaN or
 * +inf logit, or no finite logit at all (out is then untouched and no draw is consumed).
 * No allocation, no logging. */
PD_NODISCARD pd_status eng_sampler_sample(eng_sampler_t *s, const float *logits, eng_sample_result_t *out);

/* Index of the largest of n logits, the lowest id among equals (the greedy choice of eng_sampler_sample without
 * penalties); -1 when one is NaN or +inf, or none is finite. Vectorised; any thread. */
int32_t eng_logits_argmax(const float *logits, int32_t n);

/* ---- sampling a row without the request's state (on the device, or on another thread) ----
 * A row request carries everything eng_sampler_sample reads from the request's sampler: the parameters, the
 * uniform draw, and the penalty state as a list. eng_row_sample (and the CUDA backend's kernel) then choose
 * exactly the token eng_sampler_sample would have chosen on the same logits. */

typedef struct {
    int32_t token; /* occurs in the prompt or the output (repetition penalty) */
    int32_t count; /* times generated (frequency and presence penalties when > 0) */
} eng_pen_t;

typedef struct {
    eng_sampling_t p;     /* seed and has_seed unused: the draw is u */
    double u;             /* the uniform draw in [0, 1) (temperature > 0) */
    const eng_pen_t *pen; /* (n_pen) distinct tokens; empty when no penalty is set */
    int32_t n_pen;
} eng_row_sampling_t;

const eng_sampling_t *eng_sampler_params(const eng_sampler_t *s);
/* The next n uniform draws eng_sampler_sample would make (none are consumed); n <= 0 is a no-op. */
void eng_sampler_peek_draws(const eng_sampler_t *s, double *u, int32_t n);
/* The penalty state after registering extra[0..n_extra) as generated on top of what s holds (without changing
 * s): at most eng_sampler_penalties_max(s, n_extra) entries into out. 0 when s has no penalty set. */
int32_t eng_sampler_penalties(const eng_sampler_t *s, const int32_t *extra, int32_t n_extra, eng_pen_t *out);
int32_t eng_sampler_penalties_max(const eng_sampler_t *s, int32_t n_extra);

/* Scratch for eng_row_sample (about 32 bytes per vocabulary entry), one per thread that samples rows. */
typedef struct eng_row_sampler eng_row_sampler_t;
eng_row_sampler_t *eng_row_sampler_create(int32_t vocab_size);
void eng_row_sampler_destroy(eng_row_sampler_t **rs);
/* eng_sampler_sample for a row request: PD_OK, or PD_EINVAL for invalid parameters, a penalty token outside the
 * vocabulary or logits eng_sampler_sample rejects. */
PD_NODISCARD pd_status eng_row_sample(eng_row_sampler_t *rs, const eng_row_sampling_t *row, const float *logits,
                                      eng_sample_result_t *out);

/* Consumes the random draw one eng_sampler_sample would (one uniform when temperature > 0, none when greedy)
 * without sampling anything. For a request whose first token another sampler with the same seed drew (the
 * prefill worker): skipping that draw here keeps the request's random stream the one a single sampler would
 * have used for the whole request. Does not register a token (call eng_sampler_add_generated for it). */
void eng_sampler_skip_draw(eng_sampler_t *s);

#endif
