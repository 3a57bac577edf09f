/* eng_sample_int.h: sampler internals exposed to tests only (private: never include from another folder).
 * They let tests check each stage against its definition instead of only through random draws. */
#ifndef ENG_SAMPLE_INT_H
#define ENG_SAMPLE_INT_H

#include "eng_sample.h"

/* Writes to out (vocab_size floats) the logits after step 1 (penalties) of eng_sample.h. */
void eng_sampler_penalize(const eng_sampler_t *s, const float *logits, float *out);

/* Runs steps 1-4 of eng_sample.h (temperature > 0 only) and writes to ids the tokens that could be
 * drawn, ascending. ids must hold vocab_size entries. Returns their count (>= 1), or PD_EINVAL for the
 * cases eng_sampler_sample rejects and for a greedy sampler. Consumes no random draw. */
PD_NODISCARD int32_t eng_sampler_support(eng_sampler_t *s, const float *logits, int32_t *ids);

#endif
