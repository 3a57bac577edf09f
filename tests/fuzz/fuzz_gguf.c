/* fuzz_gguf.c: libFuzzer target for the GGUF reader. Opens the input as a GGUF buffer and, when it opens,
 * touches every key, array element and tensor (first and last data byte, small tensors dequantized), so a
 * handle that validated but lies about its bounds shows up under ASan.
 * Includes the sources under test so they get coverage instrumentation (pd_engine_core is built without). */
#include "../../engine/eng_gguf.c"
#include "../../engine/eng_quant.c"

#include <stdlib.h>

static volatile uint64_t s_sink;

static void s_touch_str(eng_gguf_str_t s) {
    if (s.len == 0) return;
    s_sink += (uint8_t)s.ptr[0] + (uint8_t)s.ptr[s.len - 1];
}

static void s_touch_kv(const eng_gguf_t *g, int64_t i) {
    const char *key = eng_gguf_key_name(g, i);
    PD_ASSERT(eng_gguf_find_key(g, key) == i);
    uint64_t u;
    int64_t v;
    double f;
    bool b;
    eng_gguf_str_t s;
    eng_gguf_vtype_t et;
    uint64_t n;
    s_sink += eng_gguf_kv_type(g, i);
    if (eng_gguf_get_u64(g, key, &u)) s_sink += u;
    if (eng_gguf_get_i64(g, key, &v)) s_sink += (uint64_t)v;
    if (eng_gguf_get_f64(g, key, &f)) s_sink += f == f;
    if (eng_gguf_get_bool(g, key, &b)) s_sink += b;
    if (eng_gguf_get_str(g, key, &s)) s_touch_str(s);
    if (!eng_gguf_get_arr(g, key, &et, &n)) return;
    for (uint64_t j = 0; j < n; j++) {
        if (et == ENG_GGUF_STRING) s_touch_str(eng_gguf_arr_str(g, key, j));
        s_sink += (uint64_t)eng_gguf_arr_get_i64(g, key, j);
        s_sink += eng_gguf_arr_get_f64(g, key, j) > 0;
    }
}

static void s_touch_tensor(const eng_gguf_t *g, int64_t i) {
    const eng_gguf_tensor_t *t = eng_gguf_tensor(g, i);
    PD_ASSERT(t && eng_gguf_find_tensor(g, t->name) == t);
    PD_ASSERT(t->n_elems == t->ne[0] * t->ne[1] * t->ne[2] * t->ne[3]);
    PD_ASSERT(t->n_bytes == eng_ggml_row_bytes(t->type, t->ne[0]) * t->ne[1] * t->ne[2] * t->ne[3]);
    if (t->n_bytes == 0) return;
    const uint8_t *p = t->data;
    s_sink += p[0] + p[t->n_bytes - 1];
    if (eng_quant_supported(t->type) && t->n_elems <= 4096) {
        float *out = malloc(t->n_elems * sizeof(float));
        PD_ASSERT(out && eng_dequant(t->type, t->data, out, (int64_t)t->n_elems) == PD_OK);
        s_sink += out[0] == out[t->n_elems - 1];
        free(out);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    char err[256] = "";
    eng_gguf_t *g = eng_gguf_open_mem(data, size, err, sizeof err);
    if (!g) {
        PD_ASSERT(err[0] != '\0'); /* every failure explains itself */
        return 0;
    }
    for (int64_t i = 0; i < eng_gguf_n_kv(g); i++) s_touch_kv(g, i);
    for (int64_t i = 0; i < eng_gguf_n_tensors(g); i++) s_touch_tensor(g, i);
    eng_gguf_destroy(&g);
    return 0;
}
