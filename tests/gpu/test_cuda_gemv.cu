/* test_cuda_gemv.cu: eng_cuda_gemv against a double-precision host reference on decode shapes (Llama-3.1-8B,
 * Llama-3.2-1B and odd sizes that hit the remainder loop and the row clamp), overwrite and accumulate, plus the
 * shapes it must refuse; the same for the variants that normalise their input (eng_cuda_gemv_norm, _swiglu_norm,
 * _qkv_norm) on the Llama-3.1-8B and SmolLM2-135M layers, and the opt-in tiled kernel (eng_cuda_gemv_tile.cu) at 9-64
 * rows, plain and with its SwiGLU epilogue. Then, not asserted, each kernel's weight bandwidth next to cuBLAS and a
 * device-to-device copy on the 8B, 1B and SmolLM2 shapes, with weights cycling through more memory than L2 holds so the
 * timings measure HBM. */
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

/* After a refused call: y (n floats, filled with 0x7f bytes before it) must be as it was. */
static void s_expect_untouched(const float *dy, float *y, int32_t n, cudaStream_t st) {
    CK(cudaStreamSynchronize(st));
    CK(cudaMemcpy(y, dy, (size_t)n * 4, cudaMemcpyDeviceToHost));
    for (int32_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &y[i], 4);
        if (u != 0x7f7f7f7fu) s_fail("touched y on a refused shape");
    }
}

/* Whether eng_cuda_gemv must take n_tok rows of this shape (the rule of eng_cuda_ops.cuh, restated): up to 8 always,
 * above on the streaming tensor-core kernel (up to 16 rows, or 32 of small weights) when it is on, else on the tiled
 * one when that is on. */
static bool s_must_take(int n_tok, int32_t n_out, int32_t k) {
    if (n_tok <= ENG_CUDA_GEMV_MAX_TOK) return true;
    const bool is_wide =
        n_tok > ENG_CUDA_GEMV_MMA_ALL_MAX_TOK && (int64_t)n_out * k * 2 > ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES;
    if (n_tok <= ENG_CUDA_GEMV_MMA_MAX_TOK && !is_wide && eng_cuda_gemv_mma_takes(n_tok)) return true;
    return eng_cuda_gemv_tile_takes(n_tok);
}

/* One (n_out, k): x for the most tokens of n_toks (the last) and the reference for all of them once; each n_tok uses
 * the first n_tok rows (row t of y depends only on row t of x). Rows that neither tensor-core kernel takes (above
 * ENG_CUDA_GEMV_MAX_TOK) must be refused. */
static void s_check_shape(const int *n_toks, int n_n_toks, int32_t n_out, int32_t k, cudaStream_t st) {
    const int mt = n_toks[n_n_toks - 1];
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
    __nv_bfloat16 *dx, *dw, *dyb;
    float *dy;
    uint16_t *yb = (uint16_t *)malloc(ny * 2);
    if (!yb) s_fail("host allocation");
    CK(cudaMalloc(&dx, nx * 2));
    CK(cudaMalloc(&dw, nw * 2));
    CK(cudaMalloc(&dy, ny * 4));
    CK(cudaMalloc(&dyb, ny * 2));
    CK(cudaMemcpyAsync(dx, xb, nx * 2, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dw, wb, nw * 2, cudaMemcpyHostToDevice, st));
    /* the kernels read weights before their PDL wait: they must have been written "at load", not just before */
    CK(cudaStreamSynchronize(st));
    for (int ti = 0; ti < n_n_toks; ti++) {
        const int n_tok = n_toks[ti];
        double worst[2] = {0.0, 0.0};
        if (!s_must_take(n_tok, n_out, k)) {
            if (eng_cuda_gemv(dy, dx, dw, n_tok, n_out, k, false, st)) s_fail("took more rows than it may");
            g_n_checks++;
            continue;
        }
        for (int mode = 0; mode < 3; mode++) { /* overwrite, accumulate, accumulate with the bf16 copy */
            const int is_acc = mode > 0;
            if (mode == 2 && n_tok > ENG_CUDA_GEMV_MAX_TOK) {
                if (eng_cuda_gemv_acc_copy(dy, dyb, dx, dw, n_tok, n_out, k, st)) s_fail("copy took too many rows");
                continue;
            }
            /* overwrite: y starts as NaN, so any element not written shows */
            if (is_acc)
                CK(cudaMemcpyAsync(dy, y0, ny * 4, cudaMemcpyHostToDevice, st));
            else
                CK(cudaMemsetAsync(dy, 0xff, ny * 4, st));
            CK(cudaMemsetAsync(dyb, 0xff, ny * 2, st));
            if (!(mode == 2 ? eng_cuda_gemv_acc_copy(dy, dyb, dx, dw, n_tok, n_out, k, st)
                            : eng_cuda_gemv(dy, dx, dw, n_tok, n_out, k, is_acc != 0, st)))
                s_fail("refused a valid shape");
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(st));
            CK(cudaMemcpy(y, dy, ny * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(yb, dyb, ny * 2, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < ny; i++) /* the copy: bf16(y) of the rows written, nothing elsewhere */
                if (yb[i] != (mode == 2 && i < (size_t)n_tok * n_out ? eng_f32_to_bf16(y[i]) : 0xffffu))
                    s_fail(mode == 2 ? "bf16 copy of y off" : "bf16 copy written without being asked");
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
    CK(cudaFree(dyb));
    free(xb), free(wb), free(xf), free(wf), free(y0), free(y), free(ref), free(mag), free(yb);
}

/* Shapes it must refuse: returns false and leaves y alone. */
static void s_check_refusals(cudaStream_t st) {
    const int32_t n = 64;
    __nv_bfloat16 *dx, *dw;
    float *dy, y[64];
    CK(cudaMalloc(&dx, 16 * 64 * 2));
    CK(cudaMalloc(&dw, 64 * 64 * 2));
    CK(cudaMalloc(&dy, 16 * 64 * 4));
    CK(cudaMemsetAsync(dx, 0, 16 * 64 * 2, st));
    CK(cudaMemsetAsync(dw, 0, 64 * 64 * 2, st));
    struct {
        const char *what;
        const __nv_bfloat16 *x, *w;
        int32_t n_tok, n_out, k;
    } cases[] = {
        {"n_tok = 0", dx, dw, 0, 4, 16}, {"n_tok = 65", dx, dw, 65, 4, 16},      {"k = 12", dx, dw, 1, 4, 12},
        {"n_out = 0", dx, dw, 1, 0, 16}, {"misaligned x", dx + 1, dw, 1, 4, 16}, {"misaligned w", dx, dw + 1, 1, 4, 16},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        CK(cudaMemsetAsync(dy, 0x7f, n * 4, st));
        CK(cudaDeviceSynchronize());
        if (eng_cuda_gemv(dy, cases[c].x, cases[c].w, cases[c].n_tok, cases[c].n_out, cases[c].k, false, st)) {
            fprintf(stderr, "accepted %s\n", cases[c].what);
            s_fail("accepted a shape it must refuse");
        }
        s_expect_untouched(dy, y, n, st);
        printf("refuses %s: ok\n", cases[c].what);
        g_n_checks++;
    }
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(dy));
}

/* The SwiGLU rows h (n_rows, hidden) of a product whose gate/up totals are ref (n_rows, 2 hidden; gate j at 2 j), each
 * within tol_scale * tol[i] of its reference: rows past n_tok must still be 0xffff, the rest within the SwiGLU error
 * bound of s_check_norm_swiglu's comment. Returns the worst error as a fraction of its tolerance. */
static double s_check_swiglu_rows(const uint16_t *h, int n_rows, int n_tok, int32_t hidden, int32_t k,
                                  const double *ref, const double *tol_of, double tol_scale, const char *what) {
    double worst = 0.0;
    for (int t = 0; t < n_rows; t++)
        for (int32_t j = 0; j < hidden; j++) {
            const uint16_t v = h[(size_t)t * hidden + j];
            if (t >= n_tok) {
                if (v != 0xffffu) {
                    fprintf(stderr, "%s: wrote h[%d] past n_tok %d\n", what, t, n_tok);
                    s_fail("SwiGLU wrote past n_tok");
                }
                continue;
            }
            const size_t g_at = (size_t)t * 2 * hidden + 2 * (size_t)j;
            const double g = ref[g_at], u = ref[g_at + 1], tg = tol_scale * tol_of[g_at],
                         tu = tol_scale * tol_of[g_at + 1];
            const double silu = g / (1.0 + exp(-g)), want = silu * u;
            const double dh_max = (fabs(silu) + 1.1 * tg) * tu + 1.1 * fabs(u) * tg;
            const double tol = dh_max + 0x1p-8 * (fabs(want) + dh_max) + 2e-6 * fabs(want) + 1e-30;
            const double err = fabs((double)eng_bf16_to_f32(v) - want);
            if (!(err <= tol)) {
                fprintf(stderr, "%s n_tok=%d hidden=%d k=%d: h[%d][%d] = %.6g, want %.6g (tol %.3g)\n", what, n_tok,
                        hidden, k, t, j, eng_bf16_to_f32(v), want, tol);
                s_fail("SwiGLU off");
            }
            if (err / tol > worst) worst = err / tol;
        }
    return worst;
}

/* h = bf16(silu(gate) * up) through eng_cuda_gemv_swiglu at the tiled kernel's row counts, against the double
 * products: each product within 1e-5 of its sum of |terms| (t), then the error carried through SwiGLU as in
 * s_check_norm_swiglu below. */
static void s_check_tile_swiglu(int32_t hidden, int32_t k, cudaStream_t st) {
    const int mt = ENG_CUDA_GEMV_TILE_MAX_TOK, n_toks[] = {17, 33, 64};
    const int32_t n_out = 2 * hidden;
    const size_t nx = (size_t)mt * k, nw = (size_t)n_out * k, nh = (size_t)mt * hidden;
    uint16_t *xb = (uint16_t *)malloc(nx * 2), *wb = (uint16_t *)malloc(nw * 2), *h = (uint16_t *)malloc(nh * 2);
    float *xf = (float *)malloc(nx * 4), *wf = (float *)malloc(nw * 4);
    double *ref = (double *)malloc((size_t)mt * n_out * 8), *mag = (double *)malloc((size_t)mt * n_out * 8);
    if (!xb || !wb || !h || !xf || !wf || !ref || !mag) s_fail("host allocation");
    s_fill(xb, xf, nx);
    s_fill(wb, wf, nw);
    for (int t = 0; t < mt; t++)
        for (int32_t o = 0; o < n_out; o++) {
            double sum = 0.0, a = 0.0;
            for (int32_t i = 0; i < k; i++) {
                const double p = (double)xf[(size_t)t * k + i] * (double)wf[(size_t)o * k + i];
                sum += p, a += fabs(p);
            }
            ref[(size_t)t * n_out + o] = sum, mag[(size_t)t * n_out + o] = a;
        }
    __nv_bfloat16 *dx, *dw, *dh;
    CK(cudaMalloc(&dx, nx * 2));
    CK(cudaMalloc(&dw, nw * 2));
    CK(cudaMalloc(&dh, nh * 2));
    CK(cudaMemcpyAsync(dx, xb, nx * 2, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dw, wb, nw * 2, cudaMemcpyHostToDevice, st));
    for (size_t ti = 0; ti < sizeof n_toks / sizeof n_toks[0]; ti++) {
        const int n_tok = n_toks[ti];
        CK(cudaMemsetAsync(dh, 0xff, nh * 2, st));
        if (!eng_cuda_gemv_swiglu(dh, dx, dw, n_tok, hidden, k, st)) s_fail("refused a valid shape");
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(h, dh, nh * 2, cudaMemcpyDeviceToHost));
        const double worst = s_check_swiglu_rows(h, mt, n_tok, hidden, k, ref, mag, 1e-5, "tiled swiglu");
        g_n_checks++;
        printf("tiled swiglu n_tok=%d hidden=%5d k=%5d: ok (max err %.2f of tol)\n", n_tok, hidden, k, worst);
    }
    CK(cudaFree(dx));
    CK(cudaFree(dw));
    CK(cudaFree(dh));
    free(xb), free(wb), free(h), free(xf), free(wf), free(ref), free(mag);
}

/* ---- the normalising variants (eng_cuda_gemv_norm, _swiglu_norm, _qkv_norm) ----
 * The kernel forms x = bf16(x_f32 * scale * w_norm) itself. The host mirrors it: scale in double, rounded to float,
 * then (x * scale) * w in float and rounded to bf16 as k_rmsnorm does. The kernel's own scale is a float sum of
 * squares in another order and rsqrtf: about k / 128 + 10 roundings (2^-24 each, halved by the square root) and
 * rsqrtf's 2 ulp, under 5e-6 relative for k <= 16384; S_SCALE_REL allows twice that. Every step of
 * forming x is monotonic in the scale, so the kernel's bf16 x[i] lies between bf16(x * lo * w) and bf16(x * hi * w)
 * formed with the scale's extremes; amb[i] is the larger distance of those from the host's x[i] (0 for almost every
 * element, else one bf16 ulp: a flipped rounding). A product's tolerance is then the unnormalised check's 1e-5 of
 * the sum of |terms| (f32 accumulation) plus sum amb[i] |w[i]| (the flips, at most). */
#define S_SCALE_REL 1e-5
#define S_EPS       1e-5f
#define S_NT        ENG_CUDA_GEMV_MAX_TOK /* residual rows held; the normalising variants take s_norm_max_tok() */

static void *g_dummy; /* 256 device bytes: aligned pointers for calls that must refuse before they read anything */
/* The variants' folded form (eng_cuda_norm_t.w NULL, the norm weight already in the matrix): the kernel takes bf16(x)
 * and scales each total by its token's 1 / rms, so the host's x is bf16(x) (exact) and a total's tolerance is the
 * product's 1e-5 plus the scale's S_SCALE_REL, both of scale * sum |terms|. Tensor cores only: refused elsewhere.
 * g_fold 1: from the f32 rows (1 / rms of the f32 values); 2: also given bf16(x) (eng_cuda_norm_t.xb), 1 / rms of
 * those bf16 values; 3: the same, x^2 summed with FMAs instead of MMAs (eng_cuda_gemv_mma_set_fold_ss). */
static int g_fold;

static const float *s_norm_w(const float *wn) {
    return g_fold ? NULL : wn;
}

/* Tensor cores refuse to normalise weights over ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES: whether this shape is one, and the
 * check that the variant (called with g_dummy pointers, only then) said false, as it must. */
static bool s_norm_must_refuse(int32_t n_out, int32_t k) {
    if (g_fold) return !eng_cuda_gemv_mma_takes(1);
    return eng_cuda_gemv_mma_takes(1) && (int64_t)n_out * k * 2 > eng_cuda_gemv_mma_norm_max();
}
static void s_norm_refusal_ok(const char *what, int32_t n_out, int32_t k, bool is_accepted) {
    if (is_accepted) s_fail(g_fold ? "folded norm on CUDA cores" : "normalised weights over the bound on tensor cores");
    if (g_fold)
        printf("%s n_out=%5d k=%5d: folded norm refused on CUDA cores: ok\n", what, n_out, k);
    else
        printf("%s n_out=%5d k=%5d: refused on tensor cores (weights over %lld bytes): ok\n", what, n_out, k,
               (long long)eng_cuda_gemv_mma_norm_max());
    g_n_checks++;
}

/* The most rows the normalising variants take as the kernels are set now: all on tensor cores, fewer on CUDA cores. */
static int s_norm_max_tok(void) {
    return eng_cuda_gemv_mma_takes(ENG_CUDA_GEMV_MAX_TOK) ? ENG_CUDA_GEMV_MAX_TOK : ENG_CUDA_GEMV_NORM_MAX_TOK;
}

static float s_bf16_round(float f) {
    return eng_bf16_to_f32(eng_f32_to_bf16(f));
}

/* One token: x as the kernel forms it (xq) and how far each element may be off (amb). Returns the factor the kernel
 * applies to its totals: 1, or (g_fold) the token's 1 / rms (then xq = bf16(x), amb 0). */
static double s_norm_ref(const float *x, const float *wn, int32_t k, float *xq, double *amb) {
    double ss = 0.0;
    for (int32_t i = 0; i < k; i++) ss += (double)x[i] * (double)x[i];
    const double scale_d = 1.0 / sqrt(ss / k + (double)S_EPS);
    if (g_fold) {
        double ssb = 0.0;
        for (int32_t i = 0; i < k; i++) xq[i] = s_bf16_round(x[i]), amb[i] = 0.0, ssb += (double)xq[i] * xq[i];
        return g_fold >= 2 ? 1.0 / sqrt(ssb / k + (double)S_EPS) : scale_d;
    }
    const float scale = (float)scale_d, lo = (float)(scale_d * (1.0 - S_SCALE_REL)),
                hi = (float)(scale_d * (1.0 + S_SCALE_REL));
    for (int32_t i = 0; i < k; i++) {
        xq[i] = s_bf16_round(x[i] * scale * wn[i]);
        const float a = s_bf16_round(x[i] * lo * wn[i]), b = s_bf16_round(x[i] * hi * wn[i]);
        amb[i] = fmax(fabs((double)a - xq[i]), fabs((double)b - xq[i]));
    }
    return 1.0;
}

/* One weight shape: S_NT residual rows, a norm weight, the weights, and per token and row the product of the
 * host's x with its tolerance. */
typedef struct {
    int32_t n_out, k;
    float *x, *wn, *xq; /* host: residual rows (S_NT, k), norm weight (k), x as formed (S_NT, k) */
    double *ref, *tol;  /* (S_NT, n_out): sum xq w, and how far the kernel's may be from it */
    float *dx, *dwn;    /* device copies of x, wn */
    __nv_bfloat16 *dxb; /* device bf16(x) */
    __nv_bfloat16 *dw;  /* device weights (n_out, k) */
} s_norm_case_t;

static void s_norm_case_init(s_norm_case_t *nc, int32_t n_out, int32_t k) {
    const size_t nx = (size_t)S_NT * k, nw = (size_t)n_out * k, ny = (size_t)S_NT * n_out;
    nc->n_out = n_out, nc->k = k;
    nc->x = (float *)malloc(nx * 4), nc->wn = (float *)malloc((size_t)k * 4), nc->xq = (float *)malloc(nx * 4);
    nc->ref = (double *)malloc(ny * 8), nc->tol = (double *)malloc(ny * 8);
    uint16_t *wb = (uint16_t *)malloc(nw * 2);
    float *wf = (float *)malloc(nw * 4);
    double *amb = (double *)malloc(nx * 8);
    int32_t *amb_at = (int32_t *)malloc((size_t)k * 4);
    if (!nc->x || !nc->wn || !nc->xq || !nc->ref || !nc->tol || !wb || !wf || !amb || !amb_at)
        s_fail("host allocation");
    for (size_t i = 0; i < nx; i++) nc->x[i] = s_rand() * (i % 61 == 0 ? 16.0f : 2.0f); /* a few outliers */
    for (int32_t i = 0; i < k; i++) nc->wn[i] = 0.75f + 0.5f * s_rand();
    for (size_t i = 0; i < nw; i++) wb[i] = eng_f32_to_bf16(s_rand() * 0.0625f), wf[i] = eng_bf16_to_f32(wb[i]);
    for (int t = 0; t < S_NT; t++) {
        const float *xq = nc->xq + (size_t)t * k;
        const double *am = amb + (size_t)t * k;
        const double f = s_norm_ref(nc->x + (size_t)t * k, nc->wn, k, nc->xq + (size_t)t * k, amb + (size_t)t * k);
        int32_t n_amb = 0;
        for (int32_t i = 0; i < k; i++)
            if (am[i] > 0.0) amb_at[n_amb++] = i;
        for (int32_t o = 0; o < n_out; o++) {
            const float *wr = wf + (size_t)o * k;
            double s = 0.0, a = 0.0, flips = 0.0;
            for (int32_t i = 0; i < k; i++) {
                const double p = (double)xq[i] * (double)wr[i];
                s += p, a += fabs(p);
            }
            for (int32_t j = 0; j < n_amb; j++) flips += am[amb_at[j]] * fabs((double)wr[amb_at[j]]);
            nc->ref[(size_t)t * n_out + o] = s * f;
            nc->tol[(size_t)t * n_out + o] = (1e-5 + (g_fold ? S_SCALE_REL : 0.0)) * a * f + flips;
        }
    }
    CK(cudaMalloc(&nc->dx, nx * 4));
    CK(cudaMalloc(&nc->dwn, (size_t)k * 4));
    CK(cudaMalloc(&nc->dw, nw * 2));
    CK(cudaMemcpy(nc->dx, nc->x, nx * 4, cudaMemcpyHostToDevice));
    {
        uint16_t *xb16 = (uint16_t *)malloc(nx * 2);
        if (!xb16) s_fail("host allocation");
        for (size_t i = 0; i < nx; i++) xb16[i] = eng_f32_to_bf16(nc->x[i]);
        CK(cudaMalloc(&nc->dxb, nx * 2));
        CK(cudaMemcpy(nc->dxb, xb16, nx * 2, cudaMemcpyHostToDevice));
        free(xb16);
    }
    CK(cudaMemcpy(nc->dwn, nc->wn, (size_t)k * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(nc->dw, wb, nw * 2, cudaMemcpyHostToDevice));
    CK(cudaDeviceSynchronize()); /* a copy from pageable memory may return before its DMA lands (no stream orders it) */
    free(wb), free(wf), free(amb), free(amb_at);
}

static void s_norm_case_fini(s_norm_case_t *nc) {
    CK(cudaFree(nc->dx));
    CK(cudaFree(nc->dxb));
    CK(cudaFree(nc->dwn));
    CK(cudaFree(nc->dw));
    free(nc->x), free(nc->wn), free(nc->xq), free(nc->ref), free(nc->tol);
}

/* y [+]= norm(x) . w^T against the reference, and (printed) how many totals equal bit for bit those of eng_cuda_gemv
 * on the host's x: all of a token's, unless the kernel's scale flipped the rounding of some element of x. */
static void s_check_norm_plain(int32_t n_out, int32_t k, cudaStream_t st) {
    const eng_cuda_norm_t dn = {(const float *)g_dummy, s_norm_w((const float *)g_dummy), S_EPS};
    if (s_norm_must_refuse(n_out, k)) {
        s_norm_refusal_ok(
            "norm  ", n_out, k,
            eng_cuda_gemv_norm((float *)g_dummy, &dn, (const __nv_bfloat16 *)g_dummy, 1, n_out, k, false, st));
        return;
    }
    s_norm_case_t nc;
    s_norm_case_init(&nc, n_out, k);
    const size_t nx = (size_t)S_NT * k, ny = (size_t)S_NT * n_out;
    float *y0 = (float *)malloc(ny * 4), *y = (float *)malloc(ny * 4), *yu = (float *)malloc(ny * 4);
    uint16_t *xqb = (uint16_t *)malloc(nx * 2);
    if (!y0 || !y || !yu || !xqb) s_fail("host allocation");
    for (size_t i = 0; i < ny; i++) y0[i] = 4.0f * s_rand();
    for (size_t i = 0; i < nx; i++) xqb[i] = eng_f32_to_bf16(nc.xq[i]); /* exact: xq holds bf16 values */
    float *dy, *dyu;
    __nv_bfloat16 *dxq;
    CK(cudaMalloc(&dy, ny * 4));
    CK(cudaMalloc(&dyu, ny * 4));
    CK(cudaMalloc(&dxq, nx * 2));
    CK(cudaMemcpyAsync(dxq, xqb, nx * 2, cudaMemcpyHostToDevice, st));
    const eng_cuda_norm_t xn = {nc.dx, s_norm_w(nc.dwn), S_EPS, g_fold >= 2 ? nc.dxb : NULL};
    for (int n_tok = 1; n_tok <= s_norm_max_tok(); n_tok++) {
        double worst = 0.0; /* error / tolerance */
        long n_same = 0, n_all = 0;
        for (int is_acc = 0; is_acc < 2; is_acc++) {
            if (is_acc) {
                CK(cudaMemcpyAsync(dy, y0, ny * 4, cudaMemcpyHostToDevice, st));
                CK(cudaMemcpyAsync(dyu, y0, ny * 4, cudaMemcpyHostToDevice, st));
            } else {
                CK(cudaMemsetAsync(dy, 0xff, ny * 4, st));
                CK(cudaMemsetAsync(dyu, 0xff, ny * 4, st));
            }
            if (!eng_cuda_gemv_norm(dy, &xn, nc.dw, n_tok, n_out, k, is_acc != 0, st) ||
                !eng_cuda_gemv(dyu, dxq, nc.dw, n_tok, n_out, k, is_acc != 0, st))
                s_fail("refused a valid shape");
            CK(cudaGetLastError());
            CK(cudaStreamSynchronize(st));
            CK(cudaMemcpy(y, dy, ny * 4, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(yu, dyu, ny * 4, cudaMemcpyDeviceToHost));
            for (int t = 0; t < S_NT; t++)
                for (int32_t o = 0; o < n_out; o++) {
                    const size_t i = (size_t)t * n_out + o;
                    if (t >= n_tok) {
                        if (!(is_acc ? y[i] == y0[i] : isnan(y[i]))) s_fail("normalising product wrote past n_tok");
                        continue;
                    }
                    const double want = nc.ref[i] + (is_acc ? (double)y0[i] : 0.0);
                    const double tol = nc.tol[i] + (is_acc ? 1e-5 * fabs(y0[i]) : 0.0), err = fabs(y[i] - want);
                    if (!(err <= tol)) {
                        fprintf(stderr, "norm n_tok=%d n_out=%d k=%d acc=%d: y[%d][%d] = %.9g, want %.9g (tol %.3g)\n",
                                n_tok, n_out, k, is_acc, t, o, y[i], want, tol);
                        s_fail("normalising product off");
                    }
                    if (err / tol > worst) worst = err / tol;
                    n_same += memcmp(&y[i], &yu[i], 4) == 0, n_all++;
                }
            g_n_checks++;
        }
        if (g_fold)
            printf("norm   n_tok=%d n_out=%5d k=%5d: ok (max err %.2f of tol)\n", n_tok, n_out, k, worst);
        else
            printf(
                "norm   n_tok=%d n_out=%5d k=%5d: ok (max err %.2f of tol; %ld of %ld as eng_cuda_gemv on the host's "
                "x)\n",
                n_tok, n_out, k, worst, n_same, n_all);
    }
    CK(cudaFree(dy));
    CK(cudaFree(dyu));
    CK(cudaFree(dxq));
    free(y0), free(y), free(yu), free(xqb);
    s_norm_case_fini(&nc);
}

/* h = bf16(silu(gate) * up) from the normalising kernel. With |gate - g|, |up - u| within their tolerances tg, tu:
 * |silu(gate) up - silu(g) u| <= (|silu(g)| + 1.1 tg) tu + 1.1 |u| tg (|silu'| < 1.1), plus the kernel's float
 * silu and product (a few ulp: 2e-6 relative) and the bf16 rounding of h (2^-8 relative). */
static void s_check_norm_swiglu(int32_t hidden, int32_t k, cudaStream_t st) {
    const eng_cuda_norm_t dn = {(const float *)g_dummy, s_norm_w((const float *)g_dummy), S_EPS};
    if (s_norm_must_refuse(2 * hidden, k)) {
        s_norm_refusal_ok(
            "swiglu", 2 * hidden, k,
            eng_cuda_gemv_swiglu_norm((__nv_bfloat16 *)g_dummy, &dn, (const __nv_bfloat16 *)g_dummy, 1, hidden, k, st));
        return;
    }
    s_norm_case_t nc;
    s_norm_case_init(&nc, 2 * hidden, k);
    const size_t nh = (size_t)S_NT * hidden;
    uint16_t *h = (uint16_t *)malloc(nh * 2);
    if (!h) s_fail("host allocation");
    __nv_bfloat16 *dh;
    CK(cudaMalloc(&dh, nh * 2));
    const eng_cuda_norm_t xn = {nc.dx, s_norm_w(nc.dwn), S_EPS, g_fold >= 2 ? nc.dxb : NULL};
    for (int n_tok = 1; n_tok <= s_norm_max_tok(); n_tok++) {
        CK(cudaMemsetAsync(dh, 0xff, nh * 2, st));
        if (!eng_cuda_gemv_swiglu_norm(dh, &xn, nc.dw, n_tok, hidden, k, st)) s_fail("refused a valid shape");
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(h, dh, nh * 2, cudaMemcpyDeviceToHost));
        const double worst = s_check_swiglu_rows(h, S_NT, n_tok, hidden, k, nc.ref, nc.tol, 1.0, "swiglu norm");
        g_n_checks++;
        printf("swiglu n_tok=%d hidden=%5d k=%5d: ok (max err %.2f of tol)\n", n_tok, hidden, k, worst);
    }
    CK(cudaFree(dh));
    free(h);
    s_norm_case_fini(&nc);
}

/* The fused Q/K/V projection: Q (f32) and K, V in a small pool (layer 1 of 2), each token in its own block (of its
 * own sequence) at slot 5 + t; every other pool element must stay as it was. The RoPE'd pair y0 = a0 c - a1 s,
 * y1 = a0 s + a1 c carries |c| t0 + |s| t1 of the products' tolerances (plus a float bias add and rotation: 1e-6
 * relative); K and V add the f16 rounding of the pool (2^-11 relative, 2^-25 absolute below f16's normal range). */
static void s_check_norm_qkv(int32_t n_heads, int32_t n_kv_heads, int32_t hd, int32_t k, bool has_bias,
                             cudaStream_t st) {
    {
        const eng_cuda_norm_t dn = {(const float *)g_dummy, s_norm_w((const float *)g_dummy), S_EPS};
        const eng_cuda_tokens_t tk1 = {1, NULL, NULL, NULL, NULL, 16, 1};
        const eng_cuda_qkv_dst_t d1 = {NULL, NULL, NULL, 0, n_heads, n_kv_heads, hd};
        if (s_norm_must_refuse((n_heads + 2 * n_kv_heads) * hd, k)) {
            s_norm_refusal_ok("qkv   ", (n_heads + 2 * n_kv_heads) * hd, k,
                              eng_cuda_gemv_qkv_norm(&d1, &tk1, &dn, (const __nv_bfloat16 *)g_dummy, k, st));
            return;
        }
    }
    const int32_t q_dim = n_heads * hd, kv_dim = n_kv_heads * hd, n_out = q_dim + 2 * kv_dim;
    const int32_t layer = 1, n_layers = 2, block_size = 16, n_blocks = 2 * S_NT + 2, n_tables = 2 * S_NT;
    s_norm_case_t nc;
    s_norm_case_init(&nc, n_out, k);
    int32_t pos[S_NT], tok_table[S_NT], tables[2 * S_NT], block[S_NT], slot[S_NT];
    for (int32_t i = 0; i < n_tables; i++) tables[i] = n_blocks - 1 - i;
    for (int t = 0; t < S_NT; t++) { /* position block_size + 5 + t: the second block of its table */
        tok_table[t] = 2 * t, pos[t] = block_size + 5 + t;
        block[t] = tables[2 * t + 1], slot[t] = 5 + t;
    }
    float *bias = (float *)malloc((size_t)n_out * 4), *cs = (float *)malloc((size_t)S_NT * hd * 4);
    float *q = (float *)malloc((size_t)S_NT * q_dim * 4);
    const size_t n_pool = (size_t)n_layers * 2 * n_blocks * block_size * kv_dim;
    uint16_t *pool = (uint16_t *)malloc(n_pool * 2);
    bool *is_written = (bool *)calloc(n_pool, 1);
    if (!bias || !cs || !q || !pool || !is_written) s_fail("host allocation");
    for (int32_t o = 0; o < n_out; o++) bias[o] = has_bias ? 0.5f * s_rand() : 0.0f;
    for (int t = 0; t < S_NT; t++)
        for (int32_t i = 0; i < hd / 2; i++) {
            const double a = (double)pos[t] * pow(500000.0, -2.0 * i / hd);
            cs[t * hd + 2 * i] = (float)cos(a), cs[t * hd + 2 * i + 1] = (float)sin(a);
        }
    float *dq, *dbias, *dcs;
    eng_cuda_kv_t *dpool;
    int32_t *dpos, *dtt, *dtables;
    CK(cudaMalloc(&dq, (size_t)S_NT * q_dim * 4));
    CK(cudaMalloc(&dbias, (size_t)n_out * 4));
    CK(cudaMalloc(&dcs, (size_t)S_NT * hd * 4));
    CK(cudaMalloc(&dpool, n_pool * 2));
    CK(cudaMalloc(&dpos, sizeof pos));
    CK(cudaMalloc(&dtt, sizeof tok_table));
    CK(cudaMalloc(&dtables, sizeof tables));
    CK(cudaMemcpyAsync(dbias, bias, (size_t)n_out * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dcs, cs, (size_t)S_NT * hd * 4, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dpos, pos, sizeof pos, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dtt, tok_table, sizeof tok_table, cudaMemcpyHostToDevice, st));
    CK(cudaMemcpyAsync(dtables, tables, sizeof tables, cudaMemcpyHostToDevice, st));
    eng_cuda_tokens_t tk = {0, dpos, dtt, dtables, dcs, block_size, n_blocks};
    const eng_cuda_qkv_dst_t d = {dq, dpool, has_bias ? dbias : NULL, layer, n_heads, n_kv_heads, hd};
    const eng_cuda_norm_t xn = {nc.dx, s_norm_w(nc.dwn), S_EPS, g_fold >= 2 ? nc.dxb : NULL};
    for (int n_tok = 1; n_tok <= s_norm_max_tok(); n_tok++) {
        double worst = 0.0;
        CK(cudaMemsetAsync(dq, 0xff, (size_t)S_NT * q_dim * 4, st));
        CK(cudaMemsetAsync(dpool, 0xff, n_pool * 2, st));
        tk.n_tokens = n_tok;
        if (!eng_cuda_gemv_qkv_norm(&d, &tk, &xn, nc.dw, k, st)) s_fail("refused a valid shape");
        CK(cudaGetLastError());
        CK(cudaStreamSynchronize(st));
        CK(cudaMemcpy(q, dq, (size_t)S_NT * q_dim * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(pool, dpool, n_pool * 2, cudaMemcpyDeviceToHost));
        memset(is_written, 0, n_pool);
        for (int t = 0; t < S_NT; t++) {
            if (t >= n_tok) {
                for (int32_t e = 0; e < q_dim; e++)
                    if (!isnan(q[(size_t)t * q_dim + e])) s_fail("normalising Q/K/V wrote Q past n_tok");
                continue;
            }
            const size_t k_at = (((size_t)(layer * 2 + 0) * n_blocks + block[t]) * block_size + slot[t]) * kv_dim;
            const size_t v_at = (((size_t)(layer * 2 + 1) * n_blocks + block[t]) * block_size + slot[t]) * kv_dim;
            for (int32_t o = 0; o < n_out; o += 2) {
                const size_t r = (size_t)t * n_out + o;
                const double a0 = nc.ref[r] + bias[o], a1 = nc.ref[r + 1] + bias[o + 1];
                const double t0 = nc.tol[r] + 1e-6 * fabs(a0), t1 = nc.tol[r + 1] + 1e-6 * fabs(a1);
                double want[2], tol[2], got[2];
                if (o < q_dim + kv_dim) { /* Q or K: rotated */
                    const int32_t i = (o % hd) / 2;
                    const double c = cs[t * hd + 2 * i], s = cs[t * hd + 2 * i + 1];
                    want[0] = a0 * c - a1 * s, want[1] = a0 * s + a1 * c;
                    tol[0] = fabs(c) * t0 + fabs(s) * t1 + 1e-6 * (fabs(a0 * c) + fabs(a1 * s));
                    tol[1] = fabs(s) * t0 + fabs(c) * t1 + 1e-6 * (fabs(a0 * s) + fabs(a1 * c));
                } else {
                    want[0] = a0, want[1] = a1, tol[0] = t0, tol[1] = t1;
                }
                for (int j = 0; j < 2; j++) {
                    if (o < q_dim) {
                        got[j] = q[(size_t)t * q_dim + o + j];
                    } else {
                        const size_t at = o < q_dim + kv_dim ? k_at + (o - q_dim) : v_at + (o - q_dim - kv_dim);
                        got[j] = eng_f16_to_f32(pool[at + j]), is_written[at + j] = true;
                        tol[j] += 0x1p-11 * (fabs(want[j]) + tol[j]) + 0x1p-25;
                    }
                    const double err = fabs(got[j] - want[j]);
                    if (!(err <= tol[j])) {
                        fprintf(stderr,
                                "qkv norm n_tok=%d heads %d/%d x %d k=%d: row %d of token %d = %.9g, want %.9g "
                                "(tol %.3g)\n",
                                n_tok, n_heads, n_kv_heads, hd, k, o + j, t, got[j], want[j], tol[j]);
                        s_fail("normalising Q/K/V off");
                    }
                    if (err / tol[j] > worst) worst = err / tol[j];
                }
            }
        }
        for (size_t i = 0; i < n_pool; i++)
            if (!is_written[i] && pool[i] != 0xffffu) s_fail("normalising Q/K/V wrote outside its tokens' slots");
        g_n_checks++;
        printf("qkv    n_tok=%d heads %2d/%d x %3d k=%5d%s: ok (max err %.2f of tol)\n", n_tok, n_heads, n_kv_heads, hd,
               k, has_bias ? " bias" : "", worst);
    }
    CK(cudaFree(dq));
    CK(cudaFree(dbias));
    CK(cudaFree(dcs));
    CK(cudaFree(dpool));
    CK(cudaFree(dpos));
    CK(cudaFree(dtt));
    CK(cudaFree(dtables));
    free(bias), free(cs), free(q), free(pool), free(is_written);
    s_norm_case_fini(&nc);
}

/* What the normalising variants must refuse: false, y left alone. */
static void s_check_norm_refusals(cudaStream_t st) {
    const int32_t n = 64;
    float *dx, *dwn, *dy, y[64];
    __nv_bfloat16 *dw;
    CK(cudaMalloc(&dx, (S_NT + 1) * 64 * 4));
    CK(cudaMalloc(&dwn, 64 * 4));
    CK(cudaMalloc(&dw, 64 * 64 * 2));
    CK(cudaMalloc(&dy, (S_NT + 1) * 64 * 4));
    CK(cudaMemsetAsync(dx, 0, (S_NT + 1) * 64 * 4, st));
    CK(cudaMemsetAsync(dwn, 0, 64 * 4, st));
    CK(cudaMemsetAsync(dw, 0, 64 * 64 * 2, st));
    const __nv_bfloat16 *xb = g_fold >= 2 ? (const __nv_bfloat16 *)dx : NULL; /* any aligned device memory */
    struct {
        const char *what;
        const float *x, *wn;
        int32_t n_tok, k;
        const __nv_bfloat16 *xb;
    } cases[] = {
        {"more rows than it takes", dx, dwn, s_norm_max_tok() + 1, 16, xb},
        {"k = 12", dx, dwn, 1, 12, xb},
        {"misaligned residual", dx + 1, dwn, 1, 16, xb},
        {"misaligned norm weight", dx, dwn + 1, 1, 16, xb},
        {"misaligned bf16 copy", dx, dwn, 1, 16, (const __nv_bfloat16 *)dx + 1},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        if (g_fold && cases[c].x == dx && cases[c].wn != dwn) continue; /* no norm weight to misalign */
        if (g_fold < 2 && cases[c].xb != xb) continue;                  /* no copy to misalign */
        const eng_cuda_norm_t xn = {cases[c].x, s_norm_w(cases[c].wn), S_EPS, cases[c].xb};
        CK(cudaMemsetAsync(dy, 0x7f, n * 4, st));
        CK(cudaDeviceSynchronize());
        if (eng_cuda_gemv_norm(dy, &xn, dw, cases[c].n_tok, 4, cases[c].k, false, st) ||
            eng_cuda_gemv_swiglu_norm((__nv_bfloat16 *)dy, &xn, dw, cases[c].n_tok, 2, cases[c].k, st)) {
            fprintf(stderr, "accepted %s\n", cases[c].what);
            s_fail("normalising product accepted a shape it must refuse");
        }
        s_expect_untouched(dy, y, n, st);
        printf("norm refuses %s: ok\n", cases[c].what);
        g_n_checks++;
    }
    /* Q/K/V: the batch and head_dim checks come before any device pointer is used */
    const eng_cuda_norm_t xn = {dx, s_norm_w(dwn), S_EPS};
    eng_cuda_tokens_t tk = {s_norm_max_tok() + 1, NULL, NULL, NULL, NULL, 16, 1};
    eng_cuda_qkv_dst_t d = {NULL, NULL, NULL, 0, 1, 1, 8};
    if (eng_cuda_gemv_qkv_norm(&d, &tk, &xn, dw, 16, st)) s_fail("normalising Q/K/V accepted too many tokens");
    tk.n_tokens = 1, d.head_dim = 7;
    if (eng_cuda_gemv_qkv_norm(&d, &tk, &xn, dw, 16, st)) s_fail("normalising Q/K/V accepted an odd head_dim");
    printf("norm qkv refuses more rows than it takes (%d), odd head_dim: ok\n", s_norm_max_tok() + 1);
    g_n_checks++;
    CK(cudaFree(dx));
    CK(cudaFree(dwn));
    CK(cudaFree(dw));
    CK(cudaFree(dy));
}

/* ---- timing (printed, not asserted) ---- */

#define BENCH_ITERS 20

/* Mean GPU time in us of launch(w) over BENCH_ITERS calls after 3 untimed ones, w cycling through the n_copies copies
 * of the weights w_stride apart in wbuf (together more than L2, so that each call streams its weights from HBM). */
template <typename F>
static double s_time_cycled(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, const char *wbuf, size_t w_stride,
                            int n_copies, F launch) {
    for (int i = -3; i < BENCH_ITERS; i++) {
        if (i == 0) CK(cudaEventRecord(e0, st));
        const int c = ((i % n_copies) + n_copies) % n_copies;
        launch((const __nv_bfloat16 *)(wbuf + (size_t)c * w_stride));
    }
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    CK(cudaGetLastError());
    float ms = 0.0f;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    return ms * 1e3 / BENCH_ITERS;
}

/* w_bytes streamed in us, as a percentage of the copy bandwidth. */
static double s_pct_copy(size_t w_bytes, double us, double copy_gbs) {
    return 100.0 * (double)w_bytes / (us * 1e-6) / 1e9 / copy_gbs;
}

static void s_bench(cudaStream_t st) {
    const size_t buf_bytes = (size_t)1280 << 20, copy_bytes = (size_t)1 << 30;
    /* Llama-3.1-8B's Q/K/V, O, gate/up, output head and down; Llama-3.2-1B's Q/K/V, O, gate/up, down; SmolLM2-135M's
     * Q/K/V, O, gate/up, down */
    const int32_t shapes[][2] = {{6144, 4096}, {4096, 4096}, {28672, 4096}, {128256, 4096}, {4096, 14336},
                                 {3072, 2048}, {2048, 2048}, {16384, 2048}, {2048, 8192},   {960, 576},
                                 {576, 576},   {3072, 576},  {576, 1536}};
    const int n_toks[] = {1, 2, 4, 6, 8, 16, 24, 32, 40, 48, 64};
    const int mt = ENG_CUDA_GEMV_TILE_MAX_TOK;
    char *wbuf, *dst;
    __nv_bfloat16 *dx;
    float *dy;
    CK(cudaMalloc(&wbuf, buf_bytes));
    CK(cudaMalloc(&dst, copy_bytes));
    CK(cudaMalloc(&dx, (size_t)mt * 14336 * 2));
    CK(cudaMalloc(&dy, (size_t)mt * 128256 * 4));
    CK(cudaMemsetAsync(wbuf, 0x3c, buf_bytes, st)); /* bf16 0x3c3c ~ 0.0115: finite, nonzero */
    CK(cudaMemsetAsync(dx, 0x3c, (size_t)mt * 14336 * 2, st));
    cublasHandle_t cb;
    if (cublasCreate(&cb) != CUBLAS_STATUS_SUCCESS) s_fail("cublasCreate");
    cublasSetStream(cb, st);
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const double copy_gbs = cuda_copy_gbs(dst, wbuf, copy_bytes, st);
    printf("copy D2D 1 GiB: %.0f GB/s (read + written)\n", copy_gbs);

    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int32_t n_out = shapes[s][0], k = shapes[s][1];
        const size_t w_bytes = (size_t)n_out * k * 2, w_stride = (w_bytes + 255) / 256 * 256;
        const int n_copies = (int)(buf_bytes / w_stride); /* >= 1; together > L2 */
        for (size_t ti = 0; ti < sizeof n_toks / sizeof n_toks[0]; ti++) {
            const int n_tok = n_toks[ti];
            double us[6]; /* CUDA cores; tensor cores (4 steps, 8 steps); cuBLAS; tiled (stages chosen, 3) */
            for (int impl = 0; impl < 6; impl++) {
                us[impl] = NAN; /* above 8 rows: tensor cores (4 steps), cuBLAS and tiled only */
                if (n_tok > ENG_CUDA_GEMV_MAX_TOK && (impl == 0 || impl == 2)) continue;
                if (impl == 1 && (n_tok > ENG_CUDA_GEMV_MMA_MAX_TOK || (n_tok > ENG_CUDA_GEMV_MMA_ALL_MAX_TOK &&
                                                                        w_bytes > ENG_CUDA_GEMV_MMA_WIDE_MAX_BYTES)))
                    continue;
                if (impl >= 4 && n_tok <= ENG_CUDA_GEMV_MAX_TOK) continue;
                eng_cuda_gemv_mma_set(impl == 1 || impl == 2 ? 1 : 0);
                eng_cuda_gemv_mma_set_steps(impl == 2 ? 8 : 4);
                eng_cuda_gemv_tile_set(impl >= 4 ? ENG_CUDA_GEMV_TILE_MAX_TOK : 0);
                eng_cuda_gemv_tile_set_stages(impl == 5 ? 3 : 0);
                us[impl] = s_time_cycled(st, e0, e1, wbuf, w_stride, n_copies, [&](const __nv_bfloat16 *w) {
                    if (impl != 3) {
                        if (!eng_cuda_gemv(dy, dx, w, n_tok, n_out, k, false, st)) s_fail("bench shape refused");
                        return;
                    }
                    const float alpha = 1.0f, beta = 0.0f;
                    if (cublasGemmEx(cb, CUBLAS_OP_T, CUBLAS_OP_N, n_out, n_tok, k, &alpha, w, CUDA_R_16BF, k, dx,
                                     CUDA_R_16BF, k, &beta, dy, CUDA_R_32F, n_out, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS)
                        s_fail("cublasGemmEx");
                });
            }
            double pct[6];
            for (int i = 0; i < 6; i++) pct[i] = s_pct_copy(w_bytes, us[i], copy_gbs);
            printf("n_tok=%d n_out=%6d k=%5d: cuda cores %6.1f us (%3.0f%% of copy), tensor cores %6.1f us (%3.0f%%; 8 "
                   "steps %3.0f%%), tiled %6.1f us (%3.0f%%; 3 stages %3.0f%%), cublas %6.1f us (%3.0f%%)\n",
                   n_tok, n_out, k, us[0], pct[0], us[1], pct[1], pct[2], us[4], pct[4], pct[5], us[3], pct[3]);
        }
    }
    eng_cuda_gemv_mma_set(ENG_CUDA_GEMV_MMA_MIN_TOK);
    eng_cuda_gemv_mma_set_steps(4);
    eng_cuda_gemv_tile_set(ENG_CUDA_GEMV_TILE_MAX_TOK);
    eng_cuda_gemv_tile_set_stages(0);
    cublasDestroy(cb);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(wbuf));
    CK(cudaFree(dst));
    CK(cudaFree(dx));
    CK(cudaFree(dy));
}

/* The RMSNorm before a product, five ways, at 1 and 8 rows on the 8B, 1B and SmolLM2 Q/K/V and gate/up shapes
 * (plain epilogue): the norm kernel then the product (the unfolded decode step), the norm in the product's prologue
 * (refused over ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES: "-"), and the norm weight folded (x converted from f32 in the loop,
 * or taken from its bf16 copy, x^2 summed by MMAs or by FMAs). Weights cycled through more than L2; launches back
 * to back under PDL as in a forward.
 * Session 17's decode step lost 10% at 8B batch 8 with the bf16 fold and gained at 1B: these times say which
 * matrices. */
static void s_bench_norm(cudaStream_t st) {
    const size_t buf_bytes = (size_t)1280 << 20, copy_bytes = (size_t)1 << 30;
    const int32_t shapes[][2] = {{6144, 4096}, {28672, 4096}, {3072, 2048}, {16384, 2048}, {960, 576}, {3072, 576}};
    const int n_toks[] = {1, 8};
    const int mt = ENG_CUDA_GEMV_MAX_TOK, k_max = 4096;
    char *wbuf, *dst;
    float *dx, *dwn, *dy;
    __nv_bfloat16 *dxb;
    CK(cudaMalloc(&wbuf, buf_bytes));
    CK(cudaMalloc(&dst, copy_bytes));
    CK(cudaMalloc(&dx, (size_t)mt * k_max * 4));
    CK(cudaMalloc(&dwn, (size_t)k_max * 4));
    CK(cudaMalloc(&dxb, (size_t)mt * k_max * 2));
    CK(cudaMalloc(&dy, (size_t)mt * 28672 * 4));
    CK(cudaMemsetAsync(wbuf, 0x3c, buf_bytes, st));
    CK(cudaMemsetAsync(dx, 0x3c, (size_t)mt * k_max * 4, st)); /* f32 0x3c3c3c3c ~ 0.0115 */
    CK(cudaMemsetAsync(dwn, 0x3f, (size_t)k_max * 4, st));
    CK(cudaMemsetAsync(dxb, 0x3c, (size_t)mt * k_max * 2, st));
    CK(cudaStreamSynchronize(st));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    const double copy_gbs = cuda_copy_gbs(dst, wbuf, copy_bytes, st);
    eng_cuda_gemv_mma_set(ENG_CUDA_GEMV_MMA_MIN_TOK);
    static const char *const names[5] = {"norm kernel + product", "prologue", "folded, f32 x", "folded, bf16 x",
                                         "folded, bf16 x, FMA sums"};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        const int32_t n_out = shapes[s][0], k = shapes[s][1];
        const size_t w_bytes = (size_t)n_out * k * 2, w_stride = (w_bytes + 255) / 256 * 256;
        const int n_copies = (int)(buf_bytes / w_stride);
        for (size_t ti = 0; ti < sizeof n_toks / sizeof n_toks[0]; ti++) {
            const int n_tok = n_toks[ti];
            printf("norm bench n_tok=%d n_out=%5d k=%4d:", n_tok, n_out, k);
            for (int impl = 0; impl < 5; impl++) {
                const eng_cuda_norm_t xn = {dx, impl == 1 ? dwn : NULL, S_EPS, impl >= 3 ? dxb : NULL};
                eng_cuda_gemv_mma_set_fold_ss(impl == 4);
                if (impl == 1 && (int64_t)w_bytes > eng_cuda_gemv_mma_norm_max()) {
                    printf(" %s -;", names[impl]);
                    continue;
                }
                const double us = s_time_cycled(st, e0, e1, wbuf, w_stride, n_copies, [&](const __nv_bfloat16 *w) {
                    if (impl == 0) eng_cuda_rmsnorm(dxb, dx, NULL, dwn, n_tok, k, S_EPS, st);
                    if (!(impl == 0 ? eng_cuda_gemv(dy, dxb, w, n_tok, n_out, k, false, st)
                                    : eng_cuda_gemv_norm(dy, &xn, w, n_tok, n_out, k, false, st)))
                        s_fail("norm bench shape refused");
                });
                printf(" %s %.1f us (%.0f%%);", names[impl], us, s_pct_copy(w_bytes, us, copy_gbs));
            }
            printf("\n");
        }
    }
    eng_cuda_gemv_mma_set_fold_ss(false);
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(wbuf));
    CK(cudaFree(dst));
    CK(cudaFree(dx));
    CK(cudaFree(dwn));
    CK(cudaFree(dxb));
    CK(cudaFree(dy));
}

int main(void) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    CK(cudaMalloc(&g_dummy, 256));
    const char *tile_split = getenv("ENG_CUDA_GEMV_TILE_SPLIT"); /* A/B, as the backend reads it */
    eng_cuda_gemv_tile_set_split(tile_split && *tile_split ? atoi(tile_split) : 0);
    eng_cuda_gemv_tile_set(ENG_CUDA_GEMV_TILE_MAX_TOK);
    if (!eng_cuda_gemv_tile_takes(ENG_CUDA_GEMV_TILE_MAX_TOK)) s_fail("the tiled kernel could not be prepared");
    /* rows past 32 (the tiled kernel) in the default setting only: the reference of 64 rows costs seconds a shape */
    const int n_toks[] = {1, 2, 3, 4, 5, 6, 8, 9, 16, 17, 24, 32, 33, 40, 48, 57, 64};
    const int n_n_toks_short = 12;
    /* (n_out, k): tiny, Llama-3.1-8B, Llama-3.2-1B down projection, k/8 not a multiple of 32 * 4, and n_out not a
     * multiple of the rows per block (8 at n_tok <= 2, 16 above) with a remainder in k */
    const int32_t shapes[][2] = {{1, 8},       {7, 64},      {4096, 4096}, {6144, 4096}, {4096, 14336},
                                 {2048, 8192}, {1000, 2056}, {37, 1032},   {960, 576},   {576, 576},
                                 {576, 1536},  {16900, 136}, {16912, 1032}};
    /* each row count on CUDA cores (tensor cores never), on tensor cores (from 1 row; 4 steps of loads in flight, then
     * 8), and mixed (tensor cores from 5 rows); the last two shapes take two m16 tiles per warp on the H100 */
    const int32_t mma_settings[][2] = {{0, 4}, {1, 4}, {1, 8}, {5, 4}};
    for (size_t m = 0; m < sizeof mma_settings / sizeof mma_settings[0]; m++) {
        printf("-- tensor cores from %d rows (0: never), %d steps\n", mma_settings[m][0], mma_settings[m][1]);
        eng_cuda_gemv_mma_set(mma_settings[m][0]);
        eng_cuda_gemv_mma_set_steps(mma_settings[m][1]);
        const int n = m == 1 ? (int)(sizeof n_toks / sizeof n_toks[0]) : n_n_toks_short;
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            s_check_shape(n_toks, n, shapes[s][0], shapes[s][1], st);
    }
    eng_cuda_gemv_mma_set_steps(4);
    eng_cuda_gemv_mma_set(ENG_CUDA_GEMV_MMA_MIN_TOK);
    /* the tiled kernel's SwiGLU epilogue: a wide MLP (one block a 64-row tile), SmolLM2's (k split over blocks), a
     * hidden size that ends inside a tile; then with the tiled kernel off, rows above 32 (and 17..32 of wide
     * weights) must be refused */
    s_check_tile_swiglu(8704, 1024, st);
    s_check_tile_swiglu(1536, 576, st);
    s_check_tile_swiglu(100, 1032, st);
    eng_cuda_gemv_tile_set(0);
    {
        const int off_toks[] = {24, 33, 64};
        s_check_shape(off_toks, 3, 4096, 1032, st);
        s_check_shape(off_toks, 3, 960, 576, st);
    }
    eng_cuda_gemv_tile_set(ENG_CUDA_GEMV_TILE_MAX_TOK);
    s_check_refusals(st);
    /* normalising variants: plain on the 8B Q/K/V and SmolLM2-135M shapes and odd ones (a rest after the main
     * loop; 3 rows, so that warps past n_out still join the block's norm), SwiGLU on the 8B and SmolLM2 MLPs and 5
     * pairs, the Q/K/V projection of Llama-3.1-8B (32/8 heads of 128) and SmolLM2-135M (9/3 of 64, with a bias); on
     * tensor cores the 8B shapes are refused (ENG_CUDA_GEMV_MMA_NORM_MAX_BYTES) and 17000 x 136 takes two tiles a
     * warp */
    for (int run = 0; run < 8; run++) { /* CUDA cores (up to ENG_CUDA_GEMV_NORM_MAX_TOK rows), tensor cores; folded */
        const int mma = run & 1;
        g_fold = run / 2;
        eng_cuda_gemv_mma_set(mma);
        eng_cuda_gemv_mma_set_fold_ss(g_fold == 3);
        static const char *const what[4] = {"", ", norm weight folded", ", norm weight folded, x also bf16",
                                            ", norm weight folded, x also bf16, x^2 by FMAs"};
        printf("-- normalising variants on %s cores%s\n", mma ? "tensor" : "CUDA", what[g_fold]);
        const int32_t norm_shapes[][2] = {{6144, 4096}, {960, 576}, {37, 1032}, {3, 520}, {7, 64}, {17000, 136}};
        for (size_t s = 0; s < sizeof norm_shapes / sizeof norm_shapes[0]; s++)
            s_check_norm_plain(norm_shapes[s][0], norm_shapes[s][1], st);
        s_check_norm_swiglu(14336, 4096, st);
        s_check_norm_swiglu(1536, 576, st);
        s_check_norm_swiglu(5, 1032, st);
        s_check_norm_qkv(32, 8, 128, 4096, false, st);
        s_check_norm_qkv(9, 3, 64, 576, true, st);
        s_check_norm_refusals(st);
    }
    g_fold = 0;
    eng_cuda_gemv_mma_set_fold_ss(false);
    eng_cuda_gemv_mma_set(ENG_CUDA_GEMV_MMA_MIN_TOK);
    printf("test_cuda_gemv: %d checks, all passed\n", g_n_checks);
    fflush(stdout);
    s_bench(st);
    s_bench_norm(st);
    CK(cudaFree(g_dummy));
    CK(cudaStreamDestroy(st));
    return 0;
}
