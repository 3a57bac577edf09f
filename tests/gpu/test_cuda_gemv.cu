/* test_cuda_gemv.cu: eng_cuda_gemv against a double-precision host reference on decode shapes (Llama-3.1-8B,
 * Llama-3.2-1B and odd sizes that hit the remainder loop and the row clamp), overwrite and accumulate, plus the
 * shapes it must refuse. Then, not asserted, its weight bandwidth next to cuBLAS and a device-to-device copy on the
 * 8B shapes, with weights cycling through more memory than L2 holds so the timings measure HBM. */
#include "eng_cuda_ops.cuh"
extern "C" {
#include "eng_quant.h"
}

#include <cublas_v2.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"

static int g_n_checks;

static void s_fail(const char *what) {
    fprintf(stderr, "test_cuda_gemv: FAILED: %s\n", what);
    exit(1);
}

static uint32_t g_lcg = 12345u;
static float s_rand(void) { /* uniform in [-1, 1) */
    g_lcg = g_lcg * 1664525u + 1013904223u;
    return (float)(g_lcg >> 8) * (2.0f / 16777216.0f) - 1.0f;
}

/* Fills n bf16 values in [-1, 1], returning their exact f32 values in f. */
static void s_fill(uint16_t *b, float *f, size_t n) {
    for (size_t i = 0; i < n; i++) b[i] = eng_f32_to_bf16(s_rand()), f[i] = eng_bf16_to_f32(b[i]);
}

/* One (n_out, k): x for ENG_CUDA_GEMV_MAX_TOK tokens and the reference for all of them once; each n_tok uses
 * the first n_tok rows (row t of y depends only on row t of x). */
static void s_check_shape(const int *n_toks, int n_n_toks, int32_t n_out, int32_t k, cudaStream_t st) {
    const int mt = ENG_CUDA_GEMV_MAX_TOK;
    const size_t nx = (size_t)mt * k, nw = (size_t)n_out * k, ny = (size_t)mt * n_out;
    uint16_t *xb = (uint16_t *)malloc(nx * 2), *wb = (uint16_t *)malloc(nw * 2);
    float *xf = (float *)malloc(nx * 4), *wf = (float *)malloc(nw * 4), *y0 = (float *)malloc(ny * 4);
    float *y = (float *)malloc(ny * 4);
    double *ref = (double *)malloc(ny * 8), *mag = (double *)malloc(ny * 8);
    if (!xb || !wb || !xf || !wf || !y0 || !y || !ref || !mag) s_fail("host allocation");
    s_fill(xb, xf, nx);
    s_fill(wb, wf, nw);
    for (size_t i = 0; i < ny; i++) y0[i] = 4.0f * s_rand();
    for (int t = 0; t < mt; t++)
        for (int32_t o = 0; o < n_out; o++) {
            const float *xr = xf + (size_t)t * k, *wr = wf + (size_t)o * k;
            double s = 0.0, a = 0.0;
            for (int32_t i = 0; i < k; i++) {
                const double p = (double)xr[i] * (double)wr[i];
                s += p, a += fabs(p);
            }
            ref[(size_t)t * n_out + o] = s, mag[(size_t)t * n_out + o] = a;
        }
    __nv_bfloat16 *dx, *dw;
    float *dy;
    CK(cudaMalloc(&dx, nx * 2));
    CK(cudaMalloc(&dw, nw * 2));
    CK(cudaMalloc(&dy, ny * 4));
    CK(cudaMemcpy(dx, xb, nx * 2, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(dw, wb, nw * 2, cudaMemcpyHostToDevice));
    for (int ti = 0; ti < n_n_toks; ti++) {
        const int n_tok = n_toks[ti];
        double worst[2] = {0.0, 0.0};
        for (int is_acc = 0; is_acc < 2; is_acc++) {
            /* overwrite: y starts as NaN, so any element not written shows */
            if (is_acc)
                CK(cudaMemcpy(dy, y0, ny * 4, cudaMemcpyHostToDevice));
            else
                CK(cudaMemset(dy, 0xff, ny * 4));
            if (!eng_cuda_gemv(dy, dx, dw, n_tok, n_out, k, is_acc != 0, st)) s_fail("refused a valid shape");
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(st));
            CK(cudaMemcpy(y, dy, ny * 4, cudaMemcpyDeviceToHost));
            for (int t = 0; t < mt; t++)
                for (int32_t o = 0; o < n_out; o++) {
                    const size_t i = (size_t)t * n_out + o;
                    if (t >= n_tok) { /* rows past n_tok stay as they were */
                        const bool same = is_acc ? y[i] == y0[i] : isnan(y[i]);
                        if (!same) {
                            fprintf(stderr, "n_tok=%d n_out=%d k=%d acc=%d: y[%d][%d] written\n", n_tok, n_out, k,
                                    is_acc, t, o);
                            s_fail("wrote past n_tok");
                        }
                        continue;
                    }
                    const double want = ref[i] + (is_acc ? (double)y0[i] : 0.0);
                    const double err = fabs((double)y[i] - want) / (mag[i] + (is_acc ? fabs(y0[i]) : 0.0) + 1e-6);
                    if (!(err <= 1e-5)) {
                        fprintf(stderr, "n_tok=%d n_out=%d k=%d acc=%d: y[%d][%d] = %.9g, want %.9g (rel err %.3g)\n",
                                n_tok, n_out, k, is_acc, t, o, y[i], want, err);
                        s_fail("result off");
                    }
                    if (err > worst[is_acc]) worst[is_acc] = err;
                }
            g_n_checks++;
        }
        printf("n_tok=%d n_out=%5d k=%5d: ok (max rel err %.2e, accumulate %.2e)\n", n_tok, n_out, k, worst[0],
               worst[1]);
    }
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(dy));
    free(xb), free(wb), free(xf), free(wf), free(y0), free(y), free(ref), free(mag);
}

/* Shapes it must refuse: returns false and leaves y alone. */
static void s_check_refusals(cudaStream_t st) {
    const int32_t n = 64;
    __nv_bfloat16 *dx, *dw;
    float *dy, y[64];
    CK(cudaMalloc(&dx, 16 * 64 * 2));
    CK(cudaMalloc(&dw, 64 * 64 * 2));
    CK(cudaMalloc(&dy, 16 * 64 * 4));
    CK(cudaMemset(dx, 0, 16 * 64 * 2));
    CK(cudaMemset(dw, 0, 64 * 64 * 2));
    struct {
        const char *what;
        const __nv_bfloat16 *x, *w;
        int32_t n_tok, n_out, k;
    } cases[] = {
        {"n_tok = 0", dx, dw, 0, 4, 16}, {"n_tok = 9", dx, dw, 9, 4, 16},        {"k = 12", dx, dw, 1, 4, 12},
        {"n_out = 0", dx, dw, 1, 0, 16}, {"misaligned x", dx + 1, dw, 1, 4, 16}, {"misaligned w", dx, dw + 1, 1, 4, 16},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        CK(cudaMemset(dy, 0x7f, n * 4));
        CK(cudaDeviceSynchronize());
        if (eng_cuda_gemv(dy, cases[c].x, cases[c].w, cases[c].n_tok, cases[c].n_out, cases[c].k, false, st)) {
            fprintf(stderr, "accepted %s\n", cases[c].what);
            s_fail("accepted a shape it must refuse");
        }
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(y, dy, n * 4, cudaMemcpyDeviceToHost));
        for (int32_t i = 0; i < n; i++) {
            uint32_t u;
            memcpy(&u, &y[i], 4);
            if (u != 0x7f7f7f7fu) s_fail("touched y on a refused shape");
        }
        printf("refuses %s: ok\n", cases[c].what);
        g_n_checks++;
    }
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(dy));
}

/* ---- timing (printed, not asserted) ---- */

#define BENCH_ITERS 20

static void s_bench(cudaStream_t st) {
    const size_t buf_bytes = (size_t)1280 << 20, copy_bytes = (size_t)1 << 30;
    const int32_t shapes[][2] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {128256, 4096}, {4096, 14336}};
    const int n_toks[] = {1, 2, 4, 8};
    char *wbuf, *dst;
    __nv_bfloat16 *dx;
    float *dy;
    CK(cudaMalloc(&wbuf, buf_bytes));
    CK(cudaMalloc(&dst, copy_bytes));
    CK(cudaMalloc(&dx, (size_t)ENG_CUDA_GEMV_MAX_TOK * 14336 * 2));
    CK(cudaMalloc(&dy, (size_t)ENG_CUDA_GEMV_MAX_TOK * 128256 * 4));
    CK(cudaMemset(wbuf, 0x3c, buf_bytes)); /* bf16 0x3c3c ~ 0.0115: finite, nonzero */
    CK(cudaMemset(dx, 0x3c, (size_t)ENG_CUDA_GEMV_MAX_TOK * 14336 * 2));
    cublasHandle_t cb;
    if (cublasCreate(&cb) != CUBLAS_STATUS_SUCCESS) s_fail("cublasCreate");
    cublasSetStream(cb, st);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    float ms;

    CK(cudaMemcpyAsync(dst, wbuf, copy_bytes, cudaMemcpyDeviceToDevice, st));
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < 5; i++) CK(cudaMemcpyAsync(dst, wbuf, copy_bytes, cudaMemcpyDeviceToDevice, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    const double copy_gbs = 2.0 * (double)copy_bytes * 5 / (ms * 1e-3) / 1e9;
    printf("copy D2D 1 GiB: %.0f GB/s (read + written)\n", copy_gbs);

    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int32_t n_out = shapes[s][0], k = shapes[s][1];
        const size_t w_bytes = (size_t)n_out * k * 2, w_stride = (w_bytes + 255) / 256 * 256;
        const int n_copies = (int)(buf_bytes / w_stride); /* >= 1; together > L2 */
        for (size_t ti = 0; ti < sizeof n_toks / sizeof n_toks[0]; ti++) {
            const int n_tok = n_toks[ti];
            double us[2];
            for (int impl = 0; impl < 2; impl++) {
                for (int i = -3; i < BENCH_ITERS; i++) {
                    if (i == 0) CK(cudaEventRecord(e0, st));
                    const int c = ((i % n_copies) + n_copies) % n_copies;
                    const __nv_bfloat16 *w = (const __nv_bfloat16 *)(wbuf + (size_t)c * w_stride);
                    if (impl == 0) {
                        if (!eng_cuda_gemv(dy, dx, w, n_tok, n_out, k, false, st)) s_fail("bench shape refused");
                    } else {
                        const float alpha = 1.0f, beta = 0.0f;
                        if (cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tok, k, &alpha, w, CUDA_R_16BF, k, dx,
                                         CUDA_R_16BF, k, &beta, dy, CUDA_R_32F, n_out, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
                            s_fail("cublasGemmEx");
                    }
                }
                CK(cudaEventRecord(e1, st));
                CK(cudaEventSynchronize(e1));
                CK(cudaGetLastError());
                CK(cudaEventElapsedTime(&ms, e0, e1));
                us[impl] = ms * 1e3 / BENCH_ITERS;
            }
            const double gbs = (double)w_bytes / (us[0] * 1e-6) / 1e9, cb_gbs = (double)w_bytes / (us[1] * 1e-6) / 1e9;
            printf("n_tok=%d n_out=%6d k=%5d: gemv %7.1f us %5.0f GB/s (%3.0f%% of copy), cublas %7.1f us %5.0f GB/s "
                   "(%3.0f%%)\n",
                   n_tok, n_out, k, us[0], gbs, 100.0 * gbs / copy_gbs, us[1], cb_gbs, 100.0 * cb_gbs / copy_gbs);
        }
    }
    cublasDestroy(cb);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(wbuf));
    CK(cudaFree(dst));
    CK(cudaFree(dx));
    CK(cudaFree(dy));
}

int main(void) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    const int n_toks[] = {1, 2, 3, 4, 5, 8};
    /* (n_out, k): tiny, Llama-3.1-8B, Llama-3.2-1B down projection, k/8 not a multiple of 32 * 4, and n_out not a
     * multiple of the rows per block (8 at n_tok <= 2, 16 above) with a remainder in k */
    const int32_t shapes[][2] = {{1, 8},        {7, 64},      {4096, 4096}, {6144, 4096},
                                 {4096, 14336}, {2048, 8192}, {1000, 2056}, {37, 1032}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        s_check_shape(n_toks, (int)(sizeof n_toks / sizeof n_toks[0]), shapes[s][0], shapes[s][1], st);
    s_check_refusals(st);
    printf("test_cuda_gemv: %d checks, all passed\n", g_n_checks);
    fflush(stdout);
    s_bench(st);
    CK(cudaStreamDestroy(st));
    return 0;
}
