/* test_eng_quant.c: GGML type sizes, dequantization bit-exact against gguf-py's (golden files made by
 * tests/golden/make_quant_golden.py), and fp16/bf16 conversions on edge values and exhaustively.
 * Also dequantizes every tensor of the real model once, as the model loader will. */
#include "eng_gguf.h"
#include "eng_quant.h"
#include "pd_test.h"

#include <stdint.h>
#include <time.h>

/* ---- helpers ---- */

static uint32_t s_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float s_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- type table ---- */

static void test_type_sizes(void) {
    /* Values of GGML_QUANT_SIZES in gguf-py 0.19.0 (constants.py), which mirrors ggml's type traits. */
    static const struct {
        int type;
        const char *name;
        uint32_t elems, bytes;
    } want[] = {
        {ENG_GGML_F32, "F32", 1, 4},
        {ENG_GGML_F16, "F16", 1, 2},
        {ENG_GGML_Q4_0, "Q4_0", 32, 18},
        {ENG_GGML_Q4_1, "Q4_1", 32, 20},
        {ENG_GGML_Q5_0, "Q5_0", 32, 22},
        {ENG_GGML_Q5_1, "Q5_1", 32, 24},
        {ENG_GGML_Q8_0, "Q8_0", 32, 34},
        {ENG_GGML_Q8_1, "Q8_1", 32, 36},
        {ENG_GGML_Q2_K, "Q2_K", 256, 84},
        {ENG_GGML_Q3_K, "Q3_K", 256, 110},
        {ENG_GGML_Q4_K, "Q4_K", 256, 144},
        {ENG_GGML_Q5_K, "Q5_K", 256, 176},
        {ENG_GGML_Q6_K, "Q6_K", 256, 210},
        {ENG_GGML_Q8_K, "Q8_K", 256, 292},
        {ENG_GGML_IQ2_XXS, "IQ2_XXS", 256, 66},
        {ENG_GGML_IQ2_XS, "IQ2_XS", 256, 74},
        {ENG_GGML_IQ3_XXS, "IQ3_XXS", 256, 98},
        {ENG_GGML_IQ1_S, "IQ1_S", 256, 50},
        {ENG_GGML_IQ4_NL, "IQ4_NL", 32, 18},
        {ENG_GGML_IQ3_S, "IQ3_S", 256, 110},
        {ENG_GGML_IQ2_S, "IQ2_S", 256, 82},
        {ENG_GGML_IQ4_XS, "IQ4_XS", 256, 136},
        {ENG_GGML_I8, "I8", 1, 1},
        {ENG_GGML_I16, "I16", 1, 2},
        {ENG_GGML_I32, "I32", 1, 4},
        {ENG_GGML_I64, "I64", 1, 8},
        {ENG_GGML_F64, "F64", 1, 8},
        {ENG_GGML_IQ1_M, "IQ1_M", 256, 56},
        {ENG_GGML_BF16, "BF16", 1, 2},
        {ENG_GGML_TQ1_0, "TQ1_0", 256, 54},
        {ENG_GGML_TQ2_0, "TQ2_0", 256, 66},
        {ENG_GGML_MXFP4, "MXFP4", 32, 17},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        CHECK_MSG(strcmp(eng_ggml_type_name(want[i].type), want[i].name) == 0, "type %d", want[i].type);
        CHECK_EQ_INT(eng_ggml_block_elems(want[i].type), want[i].elems);
        CHECK_EQ_INT(eng_ggml_block_bytes(want[i].type), want[i].bytes);
    }
    /* Removed ggml types and numbers outside the enum are unknown. */
    static const int unknown[] = {-1, 4, 5, 31, 32, 33, 36, 37, 38, 40, 41, 99, 1 << 20};
    for (size_t i = 0; i < sizeof unknown / sizeof unknown[0]; i++) {
        CHECK_EQ_INT(eng_ggml_block_elems(unknown[i]), 0);
        CHECK_EQ_INT(eng_ggml_block_bytes(unknown[i]), 0);
        CHECK(strcmp(eng_ggml_type_name(unknown[i]), "?") == 0);
        CHECK(!eng_quant_supported(unknown[i]));
    }
    CHECK_EQ_INT(eng_ggml_row_bytes(ENG_GGML_Q4_K, 512), 288);
    CHECK_EQ_INT(eng_ggml_row_bytes(ENG_GGML_Q4_K, 100), 0);
    CHECK_EQ_INT(eng_ggml_row_bytes(ENG_GGML_F32, 3), 12);
    CHECK_EQ_INT(eng_ggml_row_bytes(ENG_GGML_Q8_0, 576), 612);
    CHECK_EQ_INT(eng_ggml_row_bytes(99, 32), 0);
    CHECK(eng_ggml_row_bytes(ENG_GGML_F64, UINT64_MAX) == 0); /* would overflow */
    CHECK(eng_quant_supported(ENG_GGML_Q6_K) && !eng_quant_supported(ENG_GGML_Q8_1));
}

static void test_dequant_bad_args(void) {
    uint8_t blk[256] = {0};
    float out[256];
    CHECK_EQ_INT(eng_dequant(ENG_GGML_Q8_1, blk, out, 32), PD_EINVAL); /* known, not supported */
    CHECK_EQ_INT(eng_dequant(99, blk, out, 32), PD_EINVAL);
    CHECK_EQ_INT(eng_dequant(ENG_GGML_Q4_0, blk, out, 33), PD_EINVAL); /* not a whole block */
    CHECK_EQ_INT(eng_dequant(ENG_GGML_Q4_K, blk, out, 128), PD_EINVAL);
    CHECK_EQ_INT(eng_dequant(ENG_GGML_F32, blk, out, -1), PD_EINVAL);
    CHECK_EQ_INT(eng_dequant(ENG_GGML_Q4_0, blk, out, 0), PD_OK);
    CHECK_EQ_INT(eng_dequant(ENG_GGML_Q4_0, blk, out, 32), PD_OK); /* d = 0: all zeros */
    for (int i = 0; i < 32; i++) CHECK(out[i] == 0.0f);
}

/* ---- golden: our dequantization == gguf.quants.dequantize, bit for bit ---- */

static void s_check_golden(const char *stem, int type) {
    char path[4096];
    size_t n_raw = 0, n_ref = 0;
    snprintf(path, sizeof path, "%s/tests/golden/quant/%s.raw", PD_SOURCE_DIR, stem);
    uint8_t *raw = (uint8_t *)pd_test_read_file(path, &n_raw);
    snprintf(path, sizeof path, "%s/tests/golden/quant/%s.f32", PD_SOURCE_DIR, stem);
    uint8_t *ref_bytes = (uint8_t *)pd_test_read_file(path, &n_ref);
    float *got = NULL;
    CHECK_MSG(raw && ref_bytes, "missing golden files for %s (run tests/golden/make_quant_golden.py)", stem);
    if (!raw || !ref_bytes) goto done;
    int64_t n = (int64_t)(n_ref / sizeof(float));
    CHECK_MSG(n > 0 && n_ref % sizeof(float) == 0, "%s: bad .f32 size %zu", stem, n_ref);
    CHECK_MSG(eng_ggml_row_bytes(type, (uint64_t)n) == n_raw, "%s: %zu raw bytes for %lld values", stem, n_raw,
              (long long)n);
    if (eng_ggml_row_bytes(type, (uint64_t)n) != n_raw) goto done;
    got = malloc((size_t)n * sizeof(float));
    CHECK_EQ_INT(eng_dequant(type, raw, got, n), PD_OK);
    int n_bad = 0, n_nan = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t r, g;
        memcpy(&r, ref_bytes + 4 * i, 4);
        g = s_bits(got[i]);
        if (isnan(s_float(r))) { /* NaN payloads may differ by conversion path; NaN-ness and sign must not */
            n_nan++;
            if (isnan(got[i]) && (r >> 31) == (g >> 31)) continue;
        } else if (r == g) {
            continue;
        }
        if (n_bad++ < 5)
            fprintf(stderr, "%s[%lld]: got %.9g (0x%08x), gguf %.9g (0x%08x)\n", stem, (long long)i, got[i], g,
                    s_float(r), r);
    }
    CHECK_MSG(n_bad == 0, "%s: %d of %lld values differ from gguf-py", stem, n_bad, (long long)n);
    if (type == ENG_GGML_F16 || type == ENG_GGML_BF16) CHECK_MSG(n_nan >= 2, "%s: edge NaNs missing", stem);
done:
    free(raw);
    free(ref_bytes);
    free(got);
}

static void test_golden_f32(void) {
    s_check_golden("f32", ENG_GGML_F32);
}
static void test_golden_f16(void) {
    s_check_golden("f16", ENG_GGML_F16);
}
static void test_golden_bf16(void) {
    s_check_golden("bf16", ENG_GGML_BF16);
}
static void test_golden_q8_0(void) {
    s_check_golden("q8_0", ENG_GGML_Q8_0);
}
static void test_golden_q4_0(void) {
    s_check_golden("q4_0", ENG_GGML_Q4_0);
}
static void test_golden_q4_1(void) {
    s_check_golden("q4_1", ENG_GGML_Q4_1);
}
static void test_golden_q5_0(void) {
    s_check_golden("q5_0", ENG_GGML_Q5_0);
}
static void test_golden_q5_1(void) {
    s_check_golden("q5_1", ENG_GGML_Q5_1);
}
static void test_golden_q4_k(void) {
    s_check_golden("q4_k", ENG_GGML_Q4_K);
}
static void test_golden_q5_k(void) {
    s_check_golden("q5_k", ENG_GGML_Q5_K);
}
static void test_golden_q6_k(void) {
    s_check_golden("q6_k", ENG_GGML_Q6_K);
}

/* ---- fp16 ---- */

static void test_f16_edges(void) {
    /* f32 -> f16, round to nearest even. Expected values worked out by hand from IEEE 754 binary16. */
    static const struct {
        float f;
        uint16_t h;
    } down[] = {
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},        /* largest half */
        {65519.99609375f, 0x7bff}, /* just below the halfway point to 65536 */
        {65520.0f, 0x7c00},        /* tie, rounds to even = overflow to inf */
        {1e10f, 0x7c00},
        {-1e10f, 0xfc00},
        {INFINITY, 0x7c00},
        {-INFINITY, 0xfc00},
        {0x1p-14f, 0x0400}, /* smallest normal */
        {0x1p-24f, 0x0001},
        {-0x1p-24f, 0x8001},       /* smallest subnormal */
        {0x1p-25f, 0x0000},        /* tie between 0 and 2^-24: even is 0 */
        {0x1.000002p-25f, 0x0001}, /* just above the tie */
        {0x1.8p-24f, 0x0002},      /* 1.5 ulp: tie, to even 2 */
        {0x1.4p-23f, 0x0002},      /* 2.5 ulp: tie, to even 2 */
        {0x1.ff8p-15f, 0x03ff},    /* largest subnormal 1023 * 2^-24 */
        {0x1.ffcp-15f, 0x0400},    /* 1023.5 ulp: tie, rounds up into the normals */
        {1e-30f, 0x0000},
        {0x1p-149f, 0x0000},     /* float subnormal */
        {0x1.002p0f, 0x3c00},    /* 1 + 2^-11: tie, to even 1.0 */
        {0x1.006p0f, 0x3c02},    /* 1 + 3 * 2^-11: tie, to even 1 + 2^-9 */
        {0x1.002002p0f, 0x3c01}, /* just above the tie */
        {2049.0f, 0x6800},
        {2051.0f, 0x6802}, /* ties at ulp 2 */
        {0.1f, 0x2e66},
        {3.14159265f, 0x4248},
    };
    for (size_t i = 0; i < sizeof down / sizeof down[0]; i++)
        CHECK_MSG(eng_f32_to_f16(down[i].f) == down[i].h, "f32_to_f16(%a) = 0x%04x, want 0x%04x", down[i].f,
                  eng_f32_to_f16(down[i].f), down[i].h);
    /* NaN stays NaN, keeps its sign, and is quiet. */
    static const uint32_t nans[] = {0x7fc00000u, 0xffc00000u, 0x7f800001u, 0x7fbfffffu, 0xff812345u};
    for (size_t i = 0; i < sizeof nans / sizeof nans[0]; i++) {
        uint16_t h = eng_f32_to_f16(s_float(nans[i]));
        CHECK_MSG((h & 0x7c00) == 0x7c00 && (h & 0x0200) && (h >> 15) == (nans[i] >> 31), "nan 0x%08x -> 0x%04x",
                  nans[i], h);
    }
    /* f16 -> f32 on edges. */
    CHECK(eng_f16_to_f32(0x0001) == 0x1p-24f);
    CHECK(eng_f16_to_f32(0x03ff) == 0x1.ff8p-15f);
    CHECK(eng_f16_to_f32(0x0400) == 0x1p-14f);
    CHECK(eng_f16_to_f32(0x7bff) == 65504.0f);
    CHECK(eng_f16_to_f32(0x7c00) == INFINITY && eng_f16_to_f32(0xfc00) == -INFINITY);
    CHECK(isnan(eng_f16_to_f32(0x7e00)) && isnan(eng_f16_to_f32(0x7c01)));
    CHECK(s_bits(eng_f16_to_f32(0x8000)) == 0x80000000u);
    CHECK(eng_f16_to_f32(0x3555) == 0x1.554p-2f);
}

static void test_f16_exhaustive(void) {
    /* Every half converts up exactly and back to itself; NaNs stay NaNs of the same sign. */
    int n_bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = eng_f16_to_f32((uint16_t)h);
        uint16_t back = eng_f32_to_f16(f);
        bool is_nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff);
        bool ok =
            is_nan ? isnan(f) && (back & 0x7c00) == 0x7c00 && (back & 0x3ff) && (back >> 15) == (h >> 15) : back == h;
        if (!ok && n_bad++ < 5) fprintf(stderr, "half 0x%04x -> %a -> 0x%04x\n", h, f, back);
    }
    CHECK_EQ_INT(n_bad, 0);
    /* Every float between two adjacent positive halves rounds to the nearer one (ties to even): checked on
     * the midpoints and their float neighbours, for all finite halves. */
    n_bad = 0;
    for (uint32_t h = 0; h < 0x7bff; h++) {
        float lo = eng_f16_to_f32((uint16_t)h), hi = eng_f16_to_f32((uint16_t)(h + 1));
        float mid = lo + (hi - lo) / 2; /* exact: halves have 11 significant bits */
        uint16_t even = (h & 1) ? (uint16_t)(h + 1) : (uint16_t)h;
        if (eng_f32_to_f16(mid) != even || eng_f32_to_f16(nextafterf(mid, 0.0f)) != h ||
            eng_f32_to_f16(nextafterf(mid, INFINITY)) != h + 1)
            if (n_bad++ < 5) fprintf(stderr, "rounding between halves 0x%04x and 0x%04x\n", h, h + 1);
    }
    CHECK_EQ_INT(n_bad, 0);
#if defined(__FLT16_MANT_DIG__) && !defined(__clang__)
    /* Cross-check against the compiler's own _Float16 conversion on a sweep of float bit patterns. */
    n_bad = 0;
    for (uint64_t u = 0; u < 0x100000000ull; u += 4099) {
        float f = s_float((uint32_t)u);
        if (isnan(f)) continue;
        _Float16 c = (_Float16)f;
        uint16_t want;
        memcpy(&want, &c, 2);
        if (eng_f32_to_f16(f) != want && n_bad++ < 5)
            fprintf(stderr, "f32_to_f16(%a) = 0x%04x, _Float16 says 0x%04x\n", f, eng_f32_to_f16(f), want);
    }
    CHECK_EQ_INT(n_bad, 0);
#endif
}

/* ---- bf16 ---- */

static void test_bf16(void) {
    static const struct {
        uint32_t f;
        uint16_t h;
    } down[] = {
        {0x3f800000u, 0x3f80}, {0x80000000u, 0x8000}, {0x00000000u, 0x0000},
        {0x3f808000u, 0x3f80},                                               /* tie, lsb 0: down */
        {0x3f818000u, 0x3f82},                                               /* tie, lsb 1: up */
        {0x3f808001u, 0x3f81}, {0x3f807fffu, 0x3f80}, {0x7f7fffffu, 0x7f80}, /* FLT_MAX rounds to inf */
        {0x7f800000u, 0x7f80}, {0xff800000u, 0xff80}, {0x00008000u, 0x0000},
        {0x00018000u, 0x0002}, {0x00000001u, 0x0000},                        /* subnormals round, no flush */
        {0x7f800001u, 0x7fc0}, {0xffc00000u, 0xffc0}, {0x7fffffffu, 0x7fff}, /* NaN: quiet, payload top */
    };
    for (size_t i = 0; i < sizeof down / sizeof down[0]; i++)
        CHECK_MSG(eng_f32_to_bf16(s_float(down[i].f)) == down[i].h, "f32_to_bf16(0x%08x) = 0x%04x, want 0x%04x",
                  down[i].f, eng_f32_to_bf16(s_float(down[i].f)), down[i].h);
    int n_bad = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = eng_bf16_to_f32((uint16_t)h);
        if (s_bits(f) != h << 16) n_bad++;
        bool is_nan = (h & 0x7f80) == 0x7f80 && (h & 0x7f);
        uint16_t back = eng_f32_to_bf16(f);
        if (is_nan ? !(isnan(eng_bf16_to_f32(back)) && (back & 0x40)) : back != h) n_bad++;
    }
    CHECK_EQ_INT(n_bad, 0);
}

/* ---- the real model: every tensor dequantizes; spot values from gguf-py ---- */

static void test_model_dequant_all(void) {
    char err[512];
    eng_gguf_t *g = eng_gguf_open(pd_test_model_path(), err, sizeof err);
    CHECK_MSG(g, "%s", err);
    REQUIRE(g);
    uint64_t max_elems = 0, total = 0;
    for (int64_t i = 0; i < eng_gguf_n_tensors(g); i++)
        if (eng_gguf_tensor(g, i)->n_elems > max_elems) max_elems = eng_gguf_tensor(g, i)->n_elems;
    float *buf = malloc(max_elems * sizeof(float));
    REQUIRE(buf);
    uint64_t t0 = pd_now_us();
    int n_nonfinite = 0;
    for (int64_t i = 0; i < eng_gguf_n_tensors(g); i++) {
        const eng_gguf_tensor_t *t = eng_gguf_tensor(g, i);
        CHECK_MSG(eng_quant_supported(t->type), "%s has type %s", t->name, eng_ggml_type_name(t->type));
        CHECK_EQ_INT(eng_dequant(t->type, t->data, buf, (int64_t)t->n_elems), PD_OK);
        for (uint64_t j = 0; j < t->n_elems; j++) n_nonfinite += !isfinite(buf[j]);
        total += t->n_elems;
        if (strcmp(t->name, "token_embd.weight") == 0) {
            /* gguf.quants.dequantize(row 0)[0:2] bits, from gguf-py 0.19.0. */
            CHECK_EQ_INT(s_bits(buf[0]), 3185193984u);
            CHECK_EQ_INT(s_bits(buf[1]), 1023874048u);
        }
        if (strcmp(t->name, "output_norm.weight") == 0) {
            CHECK(buf[0] == 1.7578125f && buf[1] == 1.8203125f && buf[2] == 1.78125f);
        }
    }
    uint64_t dt_us = pd_now_us() - t0;
    fprintf(stderr, "dequantized %llu weights of %lld tensors in %.1f ms\n", (unsigned long long)total,
            (long long)eng_gguf_n_tensors(g), dt_us / 1e3);
    CHECK_EQ_INT(total, 134515008); /* sum of n_elements over the model's tensors, from gguf-py */
    CHECK_EQ_INT(n_nonfinite, 0);
    free(buf);
    eng_gguf_destroy(&g);
    CHECK(g == NULL);
}

/* ---- eng_rows_to_bf16: every row split over threads gives what one row at a time gives ---- */

/* The reference: row by row, eng_dequant then (x * scale) rounded to bf16, on this thread. */
static void s_rows_ref(int type, const uint8_t *src, size_t row_bytes, int64_t rows, int64_t cols, const float *scale,
                       uint16_t *out) {
    float *row = malloc(sizeof(float) * (size_t)cols);
    REQUIRE(row);
    for (int64_t r = 0; r < rows; r++) {
        CHECK_EQ_INT(eng_dequant(type, src + (size_t)r * row_bytes, row, cols), PD_OK);
        for (int64_t c = 0; c < cols; c++) out[r * cols + c] = eng_f32_to_bf16(scale ? row[c] * scale[c] : row[c]);
    }
    free(row);
}

static void s_check_rows(int type, const uint8_t *src, size_t row_bytes, int64_t rows, int64_t cols,
                         const float *scale) {
    uint16_t *want = malloc(2 * (size_t)(rows * cols) + 2), *got = malloc(2 * (size_t)(rows * cols) + 2);
    REQUIRE(want && got);
    s_rows_ref(type, src, row_bytes, rows, cols, scale, want);
    const int threads[] = {0, 1, 3, 8, 1000};
    for (size_t i = 0; i < sizeof threads / sizeof threads[0]; i++) {
        memset(got, 0xa5, 2 * (size_t)(rows * cols) + 2);
        CHECK_EQ_INT(eng_rows_to_bf16(type, src, row_bytes, rows, cols, scale, got, threads[i]), PD_OK);
        CHECK_MSG(memcmp(got, want, 2 * (size_t)(rows * cols)) == 0, "%s %lld x %lld on %d threads differs",
                  eng_ggml_type_name(type), (long long)rows, (long long)cols, threads[i]);
        CHECK_EQ_INT(got[rows * cols], 0xa5a5); /* nothing written past the matrix */
    }
    free(want), free(got);
}

static void test_rows_to_bf16(void) {
    /* the real model's matrices (Q4_1 and whatever else it holds), with and without a column scale */
    char err[512];
    eng_gguf_t *g = eng_gguf_open(pd_test_model_path(), err, sizeof err);
    CHECK_MSG(g, "%s", err);
    REQUIRE(g);
    int n_checked = 0;
    for (int64_t i = 0; i < eng_gguf_n_tensors(g) && n_checked < 6; i++) {
        const eng_gguf_tensor_t *t = eng_gguf_tensor(g, i);
        if (t->n_dims != 2 || t->ne[1] > 2048) continue; /* not the embedding table: seconds for nothing new */
        const int64_t cols = (int64_t)t->ne[0], rows = (int64_t)t->ne[1];
        float *scale = malloc(sizeof(float) * (size_t)cols);
        REQUIRE(scale);
        for (int64_t c = 0; c < cols; c++) scale[c] = 0.5f + (float)(c % 7) * 0.25f;
        const size_t rb = (size_t)eng_ggml_row_bytes(t->type, (uint64_t)cols);
        s_check_rows(t->type, t->data, rb, rows, cols, NULL);
        s_check_rows(t->type, t->data, rb, rows, cols, scale);
        free(scale);
        n_checked++;
    }
    CHECK_EQ_INT(n_checked, 6);
    eng_gguf_destroy(&g);
    /* bf16 rows (the random-weight GGUFs' type), rows fewer than threads, no rows */
    enum { R = 5, C = 40 };
    uint8_t bf[R * C * 2];
    for (int i = 0; i < R * C; i++) {
        const uint16_t h = eng_f32_to_bf16((float)(i % 13) * 0.37f - 2.0f);
        bf[2 * i] = (uint8_t)(h & 0xff), bf[2 * i + 1] = (uint8_t)(h >> 8);
    }
    float scale[C];
    for (int c = 0; c < C; c++) scale[c] = 1.0f + 0.01f * (float)c;
    s_check_rows(ENG_GGML_BF16, bf, 2 * C, R, C, scale);
    s_check_rows(ENG_GGML_BF16, bf, 2 * C, 0, C, scale);
    /* refusals: a type not read, a row length not a whole number of blocks */
    uint16_t out[64];
    CHECK_EQ_INT(eng_rows_to_bf16(ENG_GGML_IQ2_XXS, bf, 66, 1, 256, NULL, out, 2), PD_EINVAL);
    CHECK_EQ_INT(eng_rows_to_bf16(ENG_GGML_Q4_1, bf, 20, 1, 33, NULL, out, 2), PD_EINVAL);
}

int main(void) {
    PD_TEST_RUN(test_type_sizes);
    PD_TEST_RUN(test_dequant_bad_args);
    PD_TEST_RUN(test_golden_f32);
    PD_TEST_RUN(test_golden_f16);
    PD_TEST_RUN(test_golden_bf16);
    PD_TEST_RUN(test_golden_q8_0);
    PD_TEST_RUN(test_golden_q4_0);
    PD_TEST_RUN(test_golden_q4_1);
    PD_TEST_RUN(test_golden_q5_0);
    PD_TEST_RUN(test_golden_q5_1);
    PD_TEST_RUN(test_golden_q4_k);
    PD_TEST_RUN(test_golden_q5_k);
    PD_TEST_RUN(test_golden_q6_k);
    PD_TEST_RUN(test_f16_edges);
    PD_TEST_RUN(test_f16_exhaustive);
    PD_TEST_RUN(test_bf16);
    PD_TEST_RUN(test_model_dequant_all);
    PD_TEST_RUN(test_rows_to_bf16);
    return pd_test_finish();
}
