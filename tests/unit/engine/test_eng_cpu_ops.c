/* test_eng_cpu_ops.c: CPU kernels against plain references: the fixed-order dot product against
 * double precision, the AVX2 row dequantizers against the reference eng_dequant (bit-exact), and the
 * matmul's every path (fused decode kernels, register-blocked tiles, leftovers) against each other
 * bit for bit and against a double-precision product; the attention's row kernels against one-row
 * definitions. Weights are real tensors of the default model. */
#include "cpu/eng_cpu_ops.h"
#include "eng_model.h"
#include "eng_quant.h"
#include "pd_test.h"

static eng_model_t *s_model;

static float s_frand(uint32_t *st) {
    *st = *st * 1664525u + 1013904223u;
    return (float)((*st >> 8) & 0xffff) / 32768.0f - 1.0f;
}

static void test_dot_vs_double(void) {
    uint32_t st = 7;
    float a[1536], b[1536];
    for (int i = 0; i < 1536; i++) a[i] = s_frand(&st), b[i] = s_frand(&st);
    double ref = 0, mag = 0;
    for (int i = 0; i < 1536; i++) ref += (double)a[i] * b[i], mag += fabs((double)a[i] * b[i]);
    float got = eng_cpu_dot(a, b, 1536);
    CHECK_MSG(fabs(got - ref) <= 1e-6 * mag, "dot %g vs %g", got, ref);
}

/* The attention's row kernels against their one-row definitions, bit for bit: groups of 8 rows and
 * leftovers for the dots, 32-wide strips and an 8-wide leftover for P.V. */
static void test_dot_rows_and_axpy_rows(void) {
    enum { N_ROWS = 13, N = 72, STRIDE = 200 };
    uint32_t st = 11;
    float rows[N_ROWS * STRIDE], x[N], p[N_ROWS], y[N_ROWS], y_ref[N], y_got[N];
    for (int i = 0; i < N_ROWS * STRIDE; i++) rows[i] = s_frand(&st);
    for (int i = 0; i < N; i++) x[i] = s_frand(&st), y_ref[i] = y_got[i] = s_frand(&st);
    for (int i = 0; i < N_ROWS; i++) p[i] = s_frand(&st);
    eng_cpu_dot_rows(y, x, rows, STRIDE, N_ROWS, N);
    int bad = 0;
    for (int i = 0; i < N_ROWS; i++) {
        float want = eng_cpu_dot(x, rows + i * STRIDE, N);
        bad += memcmp(&want, &y[i], sizeof want) != 0;
    }
    CHECK_EQ_INT(bad, 0);
    eng_cpu_axpy_rows(y_got, p, rows, STRIDE, N_ROWS, N);
    for (int i = 0; i < N_ROWS; i++)
        for (int k = 0; k < N; k++) {
            float prod = p[i] * rows[i * STRIDE + k];
            y_ref[k] = y_ref[k] + prod;
        }
    CHECK(memcmp(y_ref, y_got, sizeof y_ref) == 0);
}

static void test_row_dequant_matches_reference(void) {
    REQUIRE(s_model);
    const eng_weight_t *ws[] = {&s_model->tok_embd, &s_model->layers[0].wq, &s_model->layers[29].w_down,
                                &s_model->layers[7].w_gate};
    float fast[1536], ref[1536];
    for (size_t i = 0; i < sizeof ws / sizeof *ws; i++) {
        const eng_weight_t *w = ws[i];
        for (int64_t r = 0; r < w->rows; r += w->rows / 37 + 1) {
            eng_cpu_weight_row(w, r, fast);
            CHECK_EQ_INT(eng_dequant(w->type, (const uint8_t *)w->data + r * w->row_bytes, ref, w->cols), PD_OK);
            CHECK_MSG(memcmp(fast, ref, sizeof(float) * (size_t)w->cols) == 0, "%s row %lld differs",
                      eng_ggml_type_name(w->type), (long long)r);
        }
    }
}

/* y for n_tok tokens computed one token at a time must equal the batched result bitwise, and both
 * must be close to a double-precision product over the dequantized weights. */
static void s_check_matmul(const eng_weight_t *w, int n_tok) {
    int nth = 2;
    eng_cpu_pool_t *pool = eng_cpu_pool_create(nth);
    float **scratch = pd_xcalloc((size_t)nth, sizeof(float *));
    for (int i = 0; i < nth; i++) scratch[i] = pd_xmalloc(sizeof(float) * ENG_CPU_TILE_ROWS * (size_t)w->cols);
    uint32_t st = 99;
    float *x = pd_xmalloc(sizeof(float) * (size_t)(n_tok * w->cols));
    for (int64_t i = 0; i < n_tok * w->cols; i++) x[i] = s_frand(&st);
    float *y = pd_xmalloc(sizeof(float) * (size_t)(n_tok * w->rows)), *y1 = pd_xmalloc(sizeof(float) * (size_t)w->rows);
    eng_cpu_matmul(y, w->rows, x, w->cols, n_tok, w, scratch, pool);
    float *row = pd_xmalloc(sizeof(float) * (size_t)w->cols);
    int bit_mismatch = 0, far = 0;
    for (int t = 0; t < n_tok; t++) {
        eng_cpu_matmul(y1, w->rows, x + t * w->cols, w->cols, 1, w, scratch, NULL);
        bit_mismatch += memcmp(y1, y + t * w->rows, sizeof(float) * (size_t)w->rows) != 0;
        for (int64_t r = 0; r < w->rows; r += 7) {
            eng_cpu_weight_row(w, r, row);
            double ref = 0, mag = 0;
            for (int64_t k = 0; k < w->cols; k++)
                ref += (double)x[t * w->cols + k] * row[k], mag += fabs((double)x[t * w->cols + k] * row[k]);
            far += fabs(y[t * w->rows + r] - ref) > 1e-5 * mag + 1e-6;
        }
    }
    CHECK_MSG(bit_mismatch == 0, "%s: %d of %d token rows differ between batched and single",
              eng_ggml_type_name(w->type), bit_mismatch, n_tok);
    CHECK_EQ_INT(far, 0);
    for (int i = 0; i < nth; i++) free(scratch[i]);
    free(scratch), free(x), free(y), free(y1), free(row);
    eng_cpu_pool_destroy(&pool);
}

static void test_matmul_paths_agree(void) {
    REQUIRE(s_model);
    s_check_matmul(&s_model->layers[3].wk, 9); /* Q4_1, 192 rows: tiles of 3 tokens x 4 rows */
    for (int n = 2; n <= 7; n++) s_check_matmul(&s_model->layers[3].wv, n); /* fused per token (< 4), tiles (>= 4) */
    s_check_matmul(&s_model->layers[3].wq, 4);                              /* 3 tokens + 1 leftover */
    s_check_matmul(&s_model->layers[3].w_down, 8);                          /* Q4_1, K = 1536, 3 + 3 + 2 tokens */
    s_check_matmul(&s_model->layers[3].attn_norm, 5);                       /* F32 vector: 1 row, leftover paths */
}

static void test_matmul_q8_0_head(void) {
    REQUIRE(s_model);
    /* the tied output head (Q8_0, 49152 rows): decode kernel vs tile kernel */
    s_check_matmul(&s_model->tok_embd, 5);
    s_check_matmul(&s_model->tok_embd, 10);
}

/* The identity hash is stable across loads and moves when one weight byte differs. */
static void test_identity_hash(void) {
    REQUIRE(s_model);
    char err[256];
    eng_model_t *again = eng_model_load(pd_test_model_path(), err, sizeof err);
    REQUIRE(again);
    uint64_t h = eng_model_identity_hash(s_model);
    CHECK(h != 0);
    CHECK(h == eng_model_identity_hash(again));
    /* a copy of the model with one byte of the first tensor's data flipped */
    size_t n = 0;
    char *bytes = pd_test_read_file(pd_test_model_path(), &n);
    REQUIRE(bytes);
    eng_gguf_t *g = eng_gguf_open_mem(bytes, n, err, sizeof err);
    REQUIRE(g);
    const eng_gguf_tensor_t *tm = eng_gguf_tensor(g, 0);
    ((char *)tm->data)[0] ^= 1; /* our own buffer */
    eng_model_t fake = *s_model;
    fake.gguf = g;
    CHECK(eng_model_identity_hash(&fake) != h);
    eng_gguf_destroy(&g);
    free(bytes);
    eng_model_destroy(&again);
}

int main(void) {
    char err[256];
    s_model = eng_model_load(pd_test_model_path(), err, sizeof err);
    if (!s_model) fprintf(stderr, "model: %s\n", err);
    PD_TEST_RUN(test_dot_vs_double);
    PD_TEST_RUN(test_dot_rows_and_axpy_rows);
    PD_TEST_RUN(test_row_dequant_matches_reference);
    PD_TEST_RUN(test_matmul_paths_agree);
    PD_TEST_RUN(test_matmul_q8_0_head);
    PD_TEST_RUN(test_identity_hash);
    eng_model_destroy(&s_model);
    return pd_test_finish();
}
