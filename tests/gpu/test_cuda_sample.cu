/* test_cuda_sample.cu: the GPU sampler (eng_cuda_sample) against the host's eng_row_sample on the same logits, row
 * for row: the token must be the same, logprobs within 2e-6 (the log-sum-exp is summed in another order). Logits
 * are made to be hard: ties (rounded to a coarse grid, so many tokens share a weight and the id breaks them), masked
 * (-inf) entries, flat and peaked rows, a row with NaN and one with nothing finite (both must come back as -1), at
 * the vocabularies of SmolLM2 (49152) and Llama 3 (128256); parameters cover every filter and penalty. Then, not
 * asserted, the kernel's time for 64 and 256 rows next to copying those logits rows to the host. */
#include "eng_cuda_sample.cuh"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

static uint64_t g_state = 0x9e3779b97f4a7c15ull;
static uint64_t s_next(void) {
    g_state ^= g_state << 13;
    g_state ^= g_state >> 7;
    g_state ^= g_state << 17;
    return g_state;
}
static double s_unif(void) {
    return (double)(s_next() >> 11) * 0x1.0p-53;
}
static int32_t s_int(int32_t n) {
    return (int32_t)(s_next() % (uint64_t)n);
}

/* Row r of a test batch: its kind decides the logits' shape. */
static void s_fill_row(float *x, int32_t v, int kind) {
    const double scale = kind == 0 ? 1.0 : kind == 1 ? 4.0 : 12.0; /* flat, typical, peaked */
    for (int32_t i = 0; i < v; i++) {
        const double g = sqrt(-2.0 * log(s_unif() + 1e-300)) * cos(6.283185307179586 * s_unif());
        x[i] = (float)(scale * g);
    }
    if (kind == 3) /* coarse grid: thousands of exact ties, broken by id */
        for (int32_t i = 0; i < v; i++) x[i] = roundf(x[i] * 2.0f) * 0.5f;
    if (kind == 4) /* a masked vocabulary */
        for (int32_t i = 0; i < v; i++)
            if (s_int(3)) x[i] = -INFINITY;
}

static int s_run(int32_t v, int32_t n_rows, int *n_checked) {
    float *x = (float *)malloc(sizeof(float) * (size_t)v * n_rows);
    eng_row_sampling_t *rows = (eng_row_sampling_t *)calloc((size_t)n_rows, sizeof *rows);
    eng_cuda_sample_req_t *req = (eng_cuda_sample_req_t *)calloc((size_t)n_rows, sizeof *req);
    eng_pen_t *pen = (eng_pen_t *)malloc(sizeof(eng_pen_t) * (size_t)n_rows * 64);
    eng_cuda_sample_out_t *out = (eng_cuda_sample_out_t *)calloc((size_t)n_rows, sizeof *out);
    const float temps[] = {0.0f, 0.3f, 1.0f, 2.0f}, top_ps[] = {1.0f, 0.95f, 0.5f, 0.05f};
    const int32_t top_ks[] = {0, 1, 3, 40, 1000};
    for (int32_t r = 0; r < n_rows; r++) {
        float *xr = x + (size_t)r * v;
        s_fill_row(xr, v, r % 5);
        if (r == n_rows - 2) xr[s_int(v)] = NAN;
        if (r == n_rows - 1)
            for (int32_t i = 0; i < v; i++) xr[i] = -INFINITY;
        eng_sampling_t p = eng_sampling_default();
        p.temperature = temps[s_int(4)], p.top_k = top_ks[s_int(5)], p.top_p = top_ps[s_int(4)];
        p.min_p = s_int(3) == 0 ? 0.1f : 0.0f, p.n_logprobs = s_int(2) ? s_int(ENG_MAX_LOGPROBS + 1) : 0;
        p.repetition_penalty = s_int(2) ? 1.25f : 1.0f, p.presence_penalty = s_int(3) == 0 ? -0.5f : 0.0f;
        p.frequency_penalty = s_int(3) == 0 ? 0.7f : 0.0f;
        const int32_t n_pen = s_int(2) ? 64 : 0, base = s_int(v - 64 * 7);
        for (int32_t j = 0; j < n_pen; j++) pen[(size_t)r * 64 + j] = (eng_pen_t){base + 7 * j, s_int(4)};
        rows[r] = (eng_row_sampling_t){p, s_unif(), pen + (size_t)r * 64, n_pen};
        req[r] = (eng_cuda_sample_req_t){
            rows[r].u, p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.top_k,   p.n_logprobs,  r * 64,  n_pen};
    }
    float *d_x, *d_work;
    eng_cuda_sample_req_t *d_req;
    eng_pen_t *d_pen;
    eng_cuda_sample_out_t *d_out;
    CK(cudaMalloc(&d_x, sizeof(float) * (size_t)v * n_rows));
    CK(cudaMalloc(&d_work, sizeof(float) * (size_t)v * n_rows));
    CK(cudaMalloc(&d_req, sizeof *d_req * n_rows));
    CK(cudaMalloc(&d_pen, sizeof *d_pen * (size_t)n_rows * 64));
    CK(cudaMalloc(&d_out, sizeof *d_out * n_rows));
    CK(cudaMemcpy(d_x, x, sizeof(float) * (size_t)v * n_rows, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_req, req, sizeof *d_req * n_rows, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(d_pen, pen, sizeof *d_pen * (size_t)n_rows * 64, cudaMemcpyHostToDevice));
    eng_cuda_sample(d_x, d_work, n_rows, v, d_req, d_pen, d_out, 0);
    CK(cudaGetLastError());
    CK(cudaMemcpy(out, d_out, sizeof *d_out * n_rows, cudaMemcpyDeviceToHost));

    eng_row_sampler_t *rs = eng_row_sampler_create(v);
    int n_bad = 0;
    for (int32_t r = 0; r < n_rows; r++) {
        eng_sample_result_t w;
        const pd_status st = eng_row_sample(rs, &rows[r], x + (size_t)r * v, &w);
        const int32_t want = st == PD_OK ? w.token : -1;
        bool is_ok = out[r].token == want;
        if (is_ok && want >= 0) {
            is_ok = fabsf(out[r].logprob - w.logprob) <= 2e-6f && out[r].n_top == w.n_top;
            for (int32_t i = 0; is_ok && i < w.n_top; i++)
                is_ok =
                    out[r].top_token[i] == w.top[i].token && fabsf(out[r].top_logprob[i] - w.top[i].logprob) <= 2e-6f;
        }
        if (!is_ok && n_bad++ < 10)
            fprintf(stderr,
                    "  MISMATCH vocab %d row %d (kind %d, T %g top_k %d top_p %g min_p %g rep %g pen %d, u %.17g): "
                    "gpu %d (%.7g) host %d (%.7g)\n",
                    v, r, r % 5, rows[r].p.temperature, rows[r].p.top_k, rows[r].p.top_p, rows[r].p.min_p,
                    rows[r].p.repetition_penalty, rows[r].n_pen, rows[r].u, out[r].token, out[r].logprob, want,
                    w.logprob);
        (*n_checked)++;
    }
    eng_row_sampler_destroy(&rs);

    /* timing, not asserted: the kernel vs the logits copy it saves (pageable host memory, as a service would copy into
     * its own buffer; pinned staging makes the copy about 2x faster) */
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float ms_smp = 0, ms_copy = 0;
    CK(cudaEventRecord(e0));
    for (int i = 0; i < 10; i++) eng_cuda_sample(d_x, d_work, n_rows - 2, v, d_req, d_pen, d_out, 0);
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms_smp, e0, e1));
    CK(cudaEventRecord(e0));
    for (int i = 0; i < 10; i++) CK(cudaMemcpy(x, d_x, sizeof(float) * (size_t)v * n_rows, cudaMemcpyDeviceToHost));
    CK(cudaEventRecord(e1));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms_copy, e0, e1));
    fprintf(stderr, "  vocab %6d, %3d rows: GPU sampling %.3f ms per batch; copying the logits out %.3f ms\n", v,
            n_rows, ms_smp / 10, ms_copy / 10);
    cudaFree(d_x), cudaFree(d_work), cudaFree(d_req), cudaFree(d_pen), cudaFree(d_out);
    free(x), free(rows), free(req), free(pen), free(out);
    return n_bad;
}

int main(void) {
    int n_bad = 0, n_checked = 0;
    const int32_t vocabs[] = {49152, 128256};
    for (int i = 0; i < 2; i++)
        for (int rep = 0; rep < 4; rep++) n_bad += s_run(vocabs[i], rep == 3 ? 256 : 64, &n_checked);
    if (n_bad) {
        fprintf(stderr, "test_cuda_sample: FAILED: %d of %d rows differ from the host sampler\n", n_bad, n_checked);
        return 1;
    }
    fprintf(stderr, "test_cuda_sample: %d rows sampled on the GPU exactly as on the host\n", n_checked);
    return 0;
}
