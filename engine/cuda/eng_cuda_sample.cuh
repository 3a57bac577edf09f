/* eng_cuda_sample.cuh: sampling on the GPU, one cluster of thread blocks per logits row (private to engine/cuda/).
 * The kernel does what eng_sampler_sample does (eng_sample.h: the order of operations, the exp, the ranking with
 * ties to the lower id, the draw by inverse CDF) with the same float operations in the same order, so on the same
 * logits it picks the same token; only masses are summed in another order (double precision, so a decision can
 * differ only where the draw lies within about 1e-16 of a boundary). Only the token, its logprob and the
 * requested top logprobs go back to the host. */
#ifndef ENG_CUDA_SAMPLE_CUH
#define ENG_CUDA_SAMPLE_CUH

#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "eng_sample.h"
}

#define ENG_CUDA_SAMPLE_MAX_VOCAB (1 << 18) /* token ids take 18 bits of the kernel's 64-bit rank */

/* One row's request, flattened for the device (eng_row_sampling_t, its penalty list at pen_off in one array);
 * n_logprobs < 0: a row to skip (its result is left as it was). */
typedef struct {
    double u;
    float temperature, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty;
    int32_t top_k, n_logprobs, pen_off, n_pen;
} eng_cuda_sample_req_t;

typedef struct {
    int32_t token; /* -1: a NaN or +inf logit, or none finite (eng_sampler_sample's PD_EINVAL) */
    float logprob;
    int32_t n_top;
    int32_t top_token[ENG_MAX_LOGPROBS]; /* most likely first, equal logits by lower id */
    float top_logprob[ENG_MAX_LOGPROBS];
} eng_cuda_sample_out_t;

/* Samples rows [0, n_rows) of logits (n_rows, vocab), leaving them unchanged; work is (n_rows, vocab) floats of
 * scratch. reqs, pen and out are device memory. vocab <= ENG_CUDA_SAMPLE_MAX_VOCAB. */
void eng_cuda_sample(const float *logits, float *work, int32_t n_rows, int32_t vocab, const eng_cuda_sample_req_t *reqs,
                     const eng_pen_t *pen, eng_cuda_sample_out_t *out, cudaStream_t st);

#endif
