/* pd_test.h: a tiny assert/report header for unit tests (no framework). Each test executable calls
 * PD_TEST_RUN(fn) per case and returns pd_test_finish(), which prints "N passed, N failed". */
#ifndef PD_TEST_H
#define PD_TEST_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int pd_test_n_pass, pd_test_n_fail, pd_test_cur_failed;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            pd_test_cur_failed = 1;                                                  \
        }                                                                            \
    } while (0)

#define CHECK_MSG(cond, ...)                                                         \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fputc('\n', stderr);                                                     \
            pd_test_cur_failed = 1;                                                  \
        }                                                                            \
    } while (0)

#define CHECK_EQ_INT(a, b)                                                                                           \
    do {                                                                                                             \
        long long pd_a_ = (long long)(a), pd_b_ = (long long)(b);                                                    \
        if (pd_a_ != pd_b_) {                                                                                        \
            fprintf(stderr, "%s:%d: CHECK_EQ_INT failed: %s = %lld, %s = %lld\n", __FILE__, __LINE__, #a, pd_a_, #b, \
                    pd_b_);                                                                                          \
            pd_test_cur_failed = 1;                                                                                  \
        }                                                                                                            \
    } while (0)

/* Required: a test that cannot find its inputs fails loudly instead of silently skipping. */
#define REQUIRE(cond)                                                                  \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            fprintf(stderr, "%s:%d: REQUIRE failed: %s\n", __FILE__, __LINE__, #cond); \
            pd_test_cur_failed = 1;                                                    \
            return;                                                                    \
        }                                                                              \
    } while (0)

#define PD_TEST_RUN(fn)                        \
    do {                                       \
        pd_test_cur_failed = 0;                \
        fn();                                  \
        if (pd_test_cur_failed) {              \
            pd_test_n_fail++;                  \
            fprintf(stderr, "FAIL %s\n", #fn); \
        } else {                               \
            pd_test_n_pass++;                  \
            fprintf(stderr, "ok   %s\n", #fn); \
        }                                      \
    } while (0)

static inline int pd_test_finish(void) {
    printf("%d passed, %d failed\n", pd_test_n_pass, pd_test_n_fail);
    return pd_test_n_fail ? 1 : 0;
}

/* Reads a whole file into a malloc'd, NUL-terminated buffer (caller frees); NULL when it cannot. */
static inline char *pd_test_read_file(const char *path, size_t *n_bytes) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    char *buf = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0) size = ftell(f);
    if (size >= 0 && fseek(f, 0, SEEK_SET) == 0) {
        buf = malloc((size_t)size + 1);
        if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
            free(buf);
            buf = NULL;
        }
        if (buf) buf[size] = '\0';
    }
    fclose(f);
    *n_bytes = size >= 0 ? (size_t)size : 0;
    return buf;
}

/* Path of the default model (PDSERVE_MODEL or $PDSERVE_MODELS/<default>), or NULL. Tests that need it
 * fail when it is missing: the test command fetches it first. */
static inline const char *pd_test_model_path(void) {
    static char buf[4096];
    const char *p = getenv("PDSERVE_MODEL");
    if (p && *p) return p;
    const char *dir = getenv("PDSERVE_MODELS");
    const char *home = getenv("HOME");
    if (dir && *dir)
        snprintf(buf, sizeof buf, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(buf, sizeof buf, "%s/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf", home ? home : ".");
    return buf;
}

/* ||a - ref|| / ||ref|| in L2 norm, in double; INFINITY when either holds a NaN. For tolerances of backends that
 * round differently (CUDA's bf16 against the CPU's f32 or a golden file). */
static inline float pd_test_rel_l2(const float *a, const float *ref, int32_t n) {
    double num = 0, den = 0;
    for (int32_t i = 0; i < n; i++) num += (double)(a[i] - ref[i]) * (a[i] - ref[i]), den += (double)ref[i] * ref[i];
    double r = sqrt(num / (den > 0 ? den : 1));
    return r == r ? (float)r : INFINITY;
}

#endif
