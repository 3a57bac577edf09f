/* test_eng_gguf.c: the GGUF reader on the real model (values checked against gguf-py) and on small files
 * built here in memory: a valid one with every value type, every truncation of it, byte flips, and a table
 * of hostile headers that must fail with a message naming what is wrong. */
#include "eng_gguf.h"
#include "pd_test.h"

#include <stdbool.h>
#include <stdint.h>

/* ---- the real model ---- */

/* Reference facts for SmolLM2-135M-Instruct.Q4_1.gguf, printed by gguf-py 0.19.0 (gguf.GGUFReader):
 * field values, array lengths and elements, tensor names/types/shapes/n_bytes and data offsets relative
 * to the data section. Hardcoded so the test does not trust our own reader. */
static void test_model_metadata(void) {
    char err[512];
    eng_gguf_t *g = eng_gguf_open(pd_test_model_path(), err, sizeof err);
    CHECK_MSG(g, "%s", err);
    REQUIRE(g);
    CHECK_EQ_INT(eng_gguf_version(g), 3);
    CHECK_EQ_INT(eng_gguf_alignment(g), 32);
    CHECK_EQ_INT(eng_gguf_n_kv(g), 33);
    static const struct {
        const char *key;
        uint64_t v;
    } u[] = {
        {"llama.block_count", 30},
        {"llama.context_length", 8192},
        {"llama.embedding_length", 576},
        {"llama.feed_forward_length", 1536},
        {"llama.attention.head_count", 9},
        {"llama.attention.head_count_kv", 3},
        {"llama.rope.dimension_count", 64},
        {"llama.vocab_size", 49152},
        {"general.file_type", 3},
        {"general.quantization_version", 2},
        {"tokenizer.ggml.bos_token_id", 1},
        {"tokenizer.ggml.eos_token_id", 2},
        {"tokenizer.ggml.unknown_token_id", 0},
        {"tokenizer.ggml.padding_token_id", 2},
    };
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++) {
        uint64_t v = 0;
        int64_t s = 0;
        CHECK_MSG(eng_gguf_get_u64(g, u[i].key, &v) && v == u[i].v, "%s = %llu", u[i].key, (unsigned long long)v);
        CHECK_MSG(eng_gguf_get_i64(g, u[i].key, &s) && s == (int64_t)u[i].v, "%s (i64)", u[i].key);
        int64_t k = eng_gguf_find_key(g, u[i].key);
        CHECK(k >= 0 && strcmp(eng_gguf_key_name(g, k), u[i].key) == 0 && eng_gguf_kv_type(g, k) == ENG_GGUF_U32);
    }
    double f = 0;
    CHECK(eng_gguf_get_f64(g, "llama.rope.freq_base", &f) && f == 100000.0);
    CHECK(eng_gguf_get_f64(g, "llama.attention.layer_norm_rms_epsilon", &f) && f == (double)1e-5f);
    CHECK(!eng_gguf_get_f64(g, "llama.block_count", &f)); /* u32 is not a float */
    uint64_t v;
    CHECK(!eng_gguf_get_u64(g, "llama.rope.freq_base", &v) && !eng_gguf_get_u64(g, "general.name", &v));
    CHECK(!eng_gguf_get_u64(g, "no.such.key", &v) && eng_gguf_find_key(g, "no.such.key") == -1);
    CHECK(eng_gguf_find_key(g, "llama.block_coun") == -1 && eng_gguf_find_key(g, "") == -1);
    bool b = true;
    CHECK(eng_gguf_get_bool(g, "tokenizer.ggml.add_bos_token", &b) && !b);
    CHECK(eng_gguf_get_bool(g, "tokenizer.ggml.add_space_prefix", &b) && !b);
    CHECK(!eng_gguf_get_bool(g, "llama.block_count", &b));
    eng_gguf_str_t s;
    CHECK(eng_gguf_get_str(g, "general.architecture", &s) && s.len == 5 && memcmp(s.ptr, "llama", 5) == 0);
    CHECK(eng_gguf_get_str(g, "tokenizer.ggml.model", &s) && s.len == 4 && memcmp(s.ptr, "gpt2", 4) == 0);
    CHECK(eng_gguf_get_str(g, "tokenizer.ggml.pre", &s) && s.len == 6 && memcmp(s.ptr, "smollm", 6) == 0);
    CHECK(eng_gguf_get_str(g, "tokenizer.chat_template", &s) && s.len == 368 && memcmp(s.ptr, "{% for", 6) == 0);
    CHECK(!eng_gguf_get_str(g, "llama.block_count", &s));

    eng_gguf_vtype_t et;
    uint64_t n = 0;
    CHECK(eng_gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) && et == ENG_GGUF_STRING && n == 49152);
    static const struct {
        uint64_t i;
        const char *s;
    } tok[] = {
        {0, "<|endoftext|>"}, {1, "<|im_start|>"}, {2, "<|im_end|>"}, {100, "t"}, {1000, "()"}, {49151, "ectable"},
    };
    for (size_t i = 0; i < sizeof tok / sizeof tok[0]; i++) {
        s = eng_gguf_arr_str(g, "tokenizer.ggml.tokens", tok[i].i);
        CHECK_MSG(s.len == strlen(tok[i].s) && memcmp(s.ptr, tok[i].s, s.len) == 0, "token %llu",
                  (unsigned long long)tok[i].i);
    }
    CHECK(eng_gguf_arr_str(g, "tokenizer.ggml.tokens", 49152).ptr == NULL); /* out of range */
    CHECK(eng_gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n) && et == ENG_GGUF_STRING && n == 48900);
    s = eng_gguf_arr_str(g, "tokenizer.ggml.merges", 0);
    CHECK(s.len == 4 && memcmp(s.ptr, "\xc4\xa0 t", 4) == 0); /* "Ġ t" */
    s = eng_gguf_arr_str(g, "tokenizer.ggml.merges", 48899);
    CHECK(s.len == 8 && memcmp(s.ptr, "ect able", 8) == 0);
    CHECK(eng_gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n) && et == ENG_GGUF_I32 && n == 49152);
    CHECK(eng_gguf_arr_get_i64(g, "tokenizer.ggml.token_type", 0) == 3);
    CHECK(eng_gguf_arr_get_i64(g, "tokenizer.ggml.token_type", 16) == 3);
    CHECK(eng_gguf_arr_get_i64(g, "tokenizer.ggml.token_type", 17) == 1);
    CHECK(eng_gguf_arr_get_i64(g, "tokenizer.ggml.token_type", 49151) == 1);
    CHECK(eng_gguf_arr_get_f64(g, "tokenizer.ggml.token_type", 0) == 3.0);
    CHECK(eng_gguf_arr_get_i64(g, "tokenizer.ggml.tokens", 0) == 0); /* strings are not integers */
    CHECK(eng_gguf_get_arr(g, "general.languages", &et, &n) && et == ENG_GGUF_STRING && n == 1);
    s = eng_gguf_arr_str(g, "general.languages", 0);
    CHECK(s.len == 2 && memcmp(s.ptr, "en", 2) == 0);
    CHECK(!eng_gguf_get_arr(g, "general.architecture", &et, &n));
    eng_gguf_destroy(&g);
    CHECK(g == NULL);
    eng_gguf_destroy(&g); /* NULL is fine */
}

static void test_model_tensors(void) {
    char err[512];
    eng_gguf_t *g = eng_gguf_open(pd_test_model_path(), err, sizeof err);
    CHECK_MSG(g, "%s", err);
    REQUIRE(g);
    REQUIRE(eng_gguf_n_tensors(g) == 272);
    static const struct {
        int64_t i;
        const char *name;
        eng_ggml_type_t type;
        uint32_t n_dims;
        uint64_t ne0, ne1, n_bytes, offset;
    } want[] = {
        {0, "token_embd.weight", ENG_GGML_Q8_0, 2, 576, 49152, 30081024, 0},
        {6, "blk.0.attn_k.weight", ENG_GGML_Q4_1, 2, 576, 192, 69120, 31744512},
        {200, "blk.29.ffn_down.weight", ENG_GGML_Q4_1, 2, 1536, 576, 552960, 78845184},
        {271, "output_norm.weight", ENG_GGML_F32, 1, 576, 1, 2304, 96574464},
    };
    const eng_gguf_tensor_t *first = eng_gguf_tensor(g, 0);
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) {
        const eng_gguf_tensor_t *t = eng_gguf_tensor(g, want[k].i);
        REQUIRE(t);
        CHECK_MSG(strcmp(t->name, want[k].name) == 0, "tensor %lld is %s", (long long)want[k].i, t->name);
        CHECK(eng_gguf_find_tensor(g, want[k].name) == t);
        CHECK_EQ_INT(t->type, want[k].type);
        CHECK_EQ_INT(t->n_dims, want[k].n_dims);
        CHECK_EQ_INT(t->ne[0], want[k].ne0);
        CHECK_EQ_INT(t->ne[1], want[k].ne1);
        CHECK_EQ_INT(t->ne[2], 1);
        CHECK_EQ_INT(t->ne[3], 1);
        CHECK_EQ_INT(t->n_elems, want[k].ne0 * want[k].ne1);
        CHECK_EQ_INT(t->n_bytes, want[k].n_bytes);
        CHECK_EQ_INT(t->offset, want[k].offset);
        CHECK_EQ_INT((const uint8_t *)t->data - (const uint8_t *)first->data, want[k].offset);
    }
    /* Data bytes: output_norm.weight[0] = 1.7578125f; token_embd.weight starts with these 4 bytes. */
    float x;
    memcpy(&x, eng_gguf_find_tensor(g, "output_norm.weight")->data, 4);
    CHECK(x == 1.7578125f);
    CHECK(memcmp(first->data, "\x32\x19\xd6\x0d", 4) == 0);
    /* The last tensor ends exactly at the end of the 98362432-byte file, whose data section starts at 1785664. */
    const eng_gguf_tensor_t *last = eng_gguf_tensor(g, 271);
    CHECK_EQ_INT(1785664 + last->offset + last->n_bytes, 98362432);
    CHECK(eng_gguf_tensor(g, 272) == NULL && eng_gguf_tensor(g, -1) == NULL);
    CHECK(eng_gguf_find_tensor(g, "blk.30.attn_q.weight") == NULL);
    int n_q41 = 0, n_f32 = 0;
    for (int64_t i = 0; i < eng_gguf_n_tensors(g); i++) {
        n_q41 += eng_gguf_tensor(g, i)->type == ENG_GGML_Q4_1;
        n_f32 += eng_gguf_tensor(g, i)->type == ENG_GGML_F32;
    }
    CHECK(n_q41 == 210 && n_f32 == 61);
    eng_gguf_destroy(&g);
}

static void test_open_errors(void) {
    char err[512] = "";
    CHECK(eng_gguf_open("/nonexistent/model.gguf", err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "/nonexistent/model.gguf") && strstr(err, "cannot open"), "%s", err);
    CHECK(eng_gguf_open("/", err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "not a regular"), "%s", err);
    CHECK(eng_gguf_open(PD_SOURCE_DIR "/tests/golden/quant/f32.f32", err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "f32.f32") && strstr(err, "bad magic"), "%s", err);
    CHECK(eng_gguf_open("/nonexistent", NULL, 0) == NULL); /* no error buffer is fine */
}

/* ---- a small GGUF writer for building valid and hostile files ---- */

typedef struct {
    uint8_t *p;
    size_t n, cap;
} s_buf_t;

static void s_put(s_buf_t *b, const void *src, size_t n) {
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        if (!b->p) abort();
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static void s_u8(s_buf_t *b, uint8_t v) {
    s_put(b, &v, 1);
}
static void s_u32(s_buf_t *b, uint32_t v) {
    s_put(b, &v, 4);
}
static void s_u64(s_buf_t *b, uint64_t v) {
    s_put(b, &v, 8);
}
static void s_str(s_buf_t *b, const char *s) {
    s_u64(b, strlen(s));
    s_put(b, s, strlen(s));
}
/* Key and value type; the value follows. */
static void s_key(s_buf_t *b, const char *key, uint32_t type) {
    s_str(b, key);
    s_u32(b, type);
}

typedef struct {
    const char *name;
    uint32_t n_dims;
    uint64_t ne[4];
    uint32_t type;
    uint64_t offset;
} s_tinfo_t;

/* What the builder writes; s_spec_default() is a valid file, hostile cases change one thing. */
typedef struct {
    uint32_t magic, version;
    bool has_n_kv, has_n_tensors; /* header counts overridden */
    uint64_t n_kv, n_tensors;
    bool has_alignment;
    uint32_t alignment_type;
    uint64_t alignment;
    uint64_t arch_key_len;        /* nonzero: lie about the first key's length */
    bool with_all_kvs;            /* one key per value type, arrays, nested arrays */
    int (*extra_kvs)(s_buf_t *b); /* writes more key/values, returns how many */
    int n_tinfo;
    s_tinfo_t t[4];
    uint64_t data_bytes;
} s_spec_t;

static s_spec_t s_spec_default(void) {
    return (s_spec_t){
        .magic = 0x46554747u,
        .version = 3,
        .has_alignment = true,
        .alignment_type = ENG_GGUF_U32,
        .alignment = 32,
        .with_all_kvs = true,
        .n_tinfo = 3,
        .t = {{"w0", 2, {4, 2, 1, 1}, ENG_GGML_F32, 0},    /* 32 bytes */
              {"w1", 1, {64, 1, 1, 1}, ENG_GGML_Q8_0, 32}, /* 68 bytes */
              {"w2", 1, {3, 1, 1, 1}, ENG_GGML_F16, 128}}, /* 6 bytes, ends the file */
        .data_bytes = 134,
    };
}

static int s_write_all_kvs(s_buf_t *b) {
    s_key(b, "t.u8", ENG_GGUF_U8);
    s_u8(b, 200);
    s_key(b, "t.i8", ENG_GGUF_I8);
    s_u8(b, (uint8_t)-5);
    s_key(b, "t.u16", ENG_GGUF_U16);
    s_put(b, &(uint16_t){65535}, 2);
    s_key(b, "t.i16", ENG_GGUF_I16);
    s_put(b, &(int16_t){-300}, 2);
    s_key(b, "t.u32", ENG_GGUF_U32);
    s_u32(b, 4000000000u);
    s_key(b, "t.i32", ENG_GGUF_I32);
    s_put(b, &(int32_t){-2000000000}, 4);
    s_key(b, "t.f32", ENG_GGUF_F32);
    s_put(b, &(float){1.5f}, 4);
    s_key(b, "t.bool", ENG_GGUF_BOOL);
    s_u8(b, 1);
    s_key(b, "t.str", ENG_GGUF_STRING);
    s_str(b, "hello");
    s_key(b, "t.u64", ENG_GGUF_U64);
    s_u64(b, (UINT64_C(1) << 63) + 1);
    s_key(b, "t.i64", ENG_GGUF_I64);
    s_u64(b, (uint64_t)INT64_C(-7));
    s_key(b, "t.f64", ENG_GGUF_F64);
    s_put(b, &(double){-0.25}, 8);
    s_key(b, "t.empty", ENG_GGUF_STRING);
    s_str(b, "");
    /* ["a", "", "xyz"] */
    s_key(b, "t.arr_str", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_STRING);
    s_u64(b, 3);
    s_str(b, "a");
    s_str(b, "");
    s_str(b, "xyz");
    /* [10, -20, 30] as i32, [0.5, 2] as f32, [] as u8, [1, 0] as bool, [2^64 - 1] as u64 */
    s_key(b, "t.arr_i32", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_I32);
    s_u64(b, 3);
    s_u32(b, 10);
    s_u32(b, (uint32_t)-20);
    s_u32(b, 30);
    s_key(b, "t.arr_f32", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_F32);
    s_u64(b, 2);
    s_put(b, &(float){0.5f}, 4);
    s_put(b, &(float){2.0f}, 4);
    s_key(b, "t.arr_empty", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_U8);
    s_u64(b, 0);
    s_key(b, "t.arr_bool", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_BOOL);
    s_u64(b, 2);
    s_u8(b, 1);
    s_u8(b, 0);
    s_key(b, "t.arr_u64", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_U64);
    s_u64(b, 1);
    s_u64(b, UINT64_MAX);
    /* [[1, 2], [["x"], []], []]: arrays of arrays, three deep, mixed element types */
    s_key(b, "t.nested", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_ARRAY);
    s_u64(b, 3);
    s_u32(b, ENG_GGUF_I16);
    s_u64(b, 2);
    s_put(b, &(int16_t){1}, 2);
    s_put(b, &(int16_t){2}, 2);
    s_u32(b, ENG_GGUF_ARRAY);
    s_u64(b, 2);
    s_u32(b, ENG_GGUF_STRING);
    s_u64(b, 1);
    s_str(b, "x");
    s_u32(b, ENG_GGUF_F64);
    s_u64(b, 0);
    s_u32(b, ENG_GGUF_STRING);
    s_u64(b, 0);
    return 20;
}

/* Builds the file described by spec; caller frees out->p. */
static void s_build(const s_spec_t *spec, s_buf_t *out) {
    s_buf_t kv = {0};
    int n_kv = 1;
    s_u64(&kv, spec->arch_key_len ? spec->arch_key_len : strlen("general.architecture"));
    s_put(&kv, "general.architecture", strlen("general.architecture"));
    s_u32(&kv, ENG_GGUF_STRING), s_str(&kv, "test");
    if (spec->has_alignment) {
        n_kv++;
        s_key(&kv, "general.alignment", spec->alignment_type);
        if (spec->alignment_type == ENG_GGUF_U64)
            s_u64(&kv, spec->alignment);
        else
            s_u32(&kv, (uint32_t)spec->alignment);
    }
    if (spec->with_all_kvs) n_kv += s_write_all_kvs(&kv);
    if (spec->extra_kvs) n_kv += spec->extra_kvs(&kv);

    *out = (s_buf_t){0};
    s_u32(out, spec->magic);
    s_u32(out, spec->version);
    s_u64(out, spec->has_n_tensors ? spec->n_tensors : (uint64_t)spec->n_tinfo);
    s_u64(out, spec->has_n_kv ? spec->n_kv : (uint64_t)n_kv);
    s_put(out, kv.p, kv.n);
    free(kv.p);
    for (int i = 0; i < spec->n_tinfo; i++) {
        const s_tinfo_t *t = &spec->t[i];
        s_str(out, t->name);
        s_u32(out, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++) s_u64(out, d < 4 ? t->ne[d] : 1);
        s_u32(out, t->type);
        s_u64(out, t->offset);
    }
    uint64_t align = 32; /* hostile alignments are refused before the padding matters */
    if (spec->has_alignment && spec->alignment && spec->alignment <= 4096 && !(spec->alignment & (spec->alignment - 1)))
        align = spec->alignment;
    while (out->n % align) s_u8(out, 0);
    for (uint64_t i = 0; i < spec->data_bytes; i++) s_u8(out, (uint8_t)(i * 7 + 1));
}

/* Opens a copy of buf in an allocation of exactly n bytes, so ASan catches any read past the end. */
static eng_gguf_t *s_open_exact(const uint8_t *buf, size_t n, uint8_t **copy, char *err, size_t err_cap) {
    *copy = malloc(n ? n : 1);
    if (n) memcpy(*copy, buf, n);
    return eng_gguf_open_mem(*copy, n, err, err_cap);
}

static void test_small_valid(void) {
    s_spec_t spec = s_spec_default();
    s_buf_t b;
    s_build(&spec, &b);
    char err[512] = "";
    uint8_t *copy;
    eng_gguf_t *g = s_open_exact(b.p, b.n, &copy, err, sizeof err);
    CHECK_MSG(g, "%s", err);
    if (!g) goto done;
    CHECK_EQ_INT(eng_gguf_n_kv(g), 22);
    CHECK_EQ_INT(eng_gguf_version(g), 3);
    uint64_t u = 0;
    int64_t i = 0;
    double f = 0;
    bool bo = false;
    eng_gguf_str_t s;
    /* integer conversions: any width and signedness when the value fits */
    CHECK(eng_gguf_get_u64(g, "t.u8", &u) && u == 200 && eng_gguf_get_i64(g, "t.u8", &i) && i == 200);
    CHECK(!eng_gguf_get_u64(g, "t.i8", &u) && eng_gguf_get_i64(g, "t.i8", &i) && i == -5);
    CHECK(eng_gguf_get_u64(g, "t.u16", &u) && u == 65535);
    CHECK(eng_gguf_get_i64(g, "t.i16", &i) && i == -300);
    CHECK(eng_gguf_get_u64(g, "t.u32", &u) && u == 4000000000u);
    CHECK(eng_gguf_get_i64(g, "t.i32", &i) && i == -2000000000);
    CHECK(eng_gguf_get_u64(g, "t.u64", &u) && u == (UINT64_C(1) << 63) + 1 && !eng_gguf_get_i64(g, "t.u64", &i));
    CHECK(eng_gguf_get_i64(g, "t.i64", &i) && i == -7 && !eng_gguf_get_u64(g, "t.i64", &u));
    CHECK(eng_gguf_get_f64(g, "t.f32", &f) && f == 1.5 && eng_gguf_get_f64(g, "t.f64", &f) && f == -0.25);
    CHECK(!eng_gguf_get_f64(g, "t.i32", &f) && !eng_gguf_get_u64(g, "t.f32", &u));
    CHECK(eng_gguf_get_bool(g, "t.bool", &bo) && bo && !eng_gguf_get_u64(g, "t.bool", &u));
    CHECK(eng_gguf_get_str(g, "t.str", &s) && s.len == 5 && memcmp(s.ptr, "hello", 5) == 0);
    CHECK(eng_gguf_get_str(g, "t.empty", &s) && s.len == 0);
    CHECK(eng_gguf_kv_type(g, eng_gguf_find_key(g, "t.f64")) == ENG_GGUF_F64);
    /* arrays */
    eng_gguf_vtype_t et;
    uint64_t n;
    CHECK(eng_gguf_get_arr(g, "t.arr_str", &et, &n) && et == ENG_GGUF_STRING && n == 3);
    s = eng_gguf_arr_str(g, "t.arr_str", 2);
    CHECK(s.len == 3 && memcmp(s.ptr, "xyz", 3) == 0 && eng_gguf_arr_str(g, "t.arr_str", 1).len == 0);
    CHECK(eng_gguf_arr_get_i64(g, "t.arr_i32", 1) == -20 && eng_gguf_arr_get_f64(g, "t.arr_i32", 2) == 30.0);
    CHECK(eng_gguf_arr_get_i64(g, "t.arr_i32", 3) == 0); /* out of range */
    CHECK(eng_gguf_arr_get_f64(g, "t.arr_f32", 0) == 0.5 && eng_gguf_arr_get_f64(g, "t.arr_f32", 1) == 2.0);
    CHECK(eng_gguf_get_arr(g, "t.arr_empty", &et, &n) && et == ENG_GGUF_U8 && n == 0);
    CHECK(eng_gguf_arr_get_i64(g, "t.arr_bool", 0) == 1 && eng_gguf_arr_get_i64(g, "t.arr_bool", 1) == 0);
    CHECK(eng_gguf_arr_get_i64(g, "t.arr_u64", 0) == INT64_MAX); /* clamped */
    CHECK(eng_gguf_get_arr(g, "t.nested", &et, &n) && et == ENG_GGUF_ARRAY && n == 3);
    CHECK(eng_gguf_arr_get_i64(g, "t.nested", 0) == 0 && eng_gguf_arr_str(g, "t.nested", 0).ptr == NULL);
    /* tensors */
    CHECK_EQ_INT(eng_gguf_n_tensors(g), 3);
    const eng_gguf_tensor_t *w0 = eng_gguf_find_tensor(g, "w0"), *w1 = eng_gguf_find_tensor(g, "w1"),
                            *w2 = eng_gguf_find_tensor(g, "w2");
    REQUIRE(w0 && w1 && w2);
    CHECK(w0->n_elems == 8 && w0->n_bytes == 32 && w0->ne[1] == 2 && w0->ne[2] == 1 && w0->n_dims == 2);
    CHECK(w1->n_elems == 64 && w1->n_bytes == 68 && w1->type == ENG_GGML_Q8_0);
    CHECK(w2->n_bytes == 6 && (const uint8_t *)w2->data + 6 == copy + b.n); /* ends the file */
    CHECK((const uint8_t *)w0->data == copy + b.n - 134);
    CHECK(((const uint8_t *)w1->data)[0] == (uint8_t)(32 * 7 + 1));
    CHECK(eng_gguf_find_tensor(g, "w") == NULL && eng_gguf_find_tensor(g, "w00") == NULL);
    eng_gguf_destroy(&g);
done:
    free(copy);
    free(b.p);
}

static void test_small_variants(void) {
    char err[512] = "";
    s_buf_t b;
    uint8_t *copy;
    /* GGUF v2, alignment 64, no optional keys, no tensors at all. */
    s_spec_t spec = s_spec_default();
    spec.version = 2;
    spec.alignment = 64;
    spec.t[1].offset = 64;
    spec.t[2].offset = 192;
    spec.data_bytes = 198;
    s_build(&spec, &b);
    eng_gguf_t *g = s_open_exact(b.p, b.n, &copy, err, sizeof err);
    CHECK_MSG(g, "%s", err);
    if (g) CHECK(eng_gguf_version(g) == 2 && eng_gguf_alignment(g) == 64);
    eng_gguf_destroy(&g);
    free(copy);
    free(b.p);

    spec = s_spec_default();
    spec.has_alignment = false;
    spec.with_all_kvs = false;
    spec.n_tinfo = 0;
    spec.data_bytes = 0;
    s_build(&spec, &b);
    g = s_open_exact(b.p, b.n, &copy, err, sizeof err);
    CHECK_MSG(g, "%s", err);
    if (g) CHECK(eng_gguf_alignment(g) == 32 && eng_gguf_n_tensors(g) == 0 && eng_gguf_n_kv(g) == 1);
    eng_gguf_destroy(&g);
    free(copy);
    free(b.p);
}

/* Every prefix of a valid file must fail cleanly (the last tensor ends the file), with a message. */
static void test_truncated(void) {
    s_spec_t spec = s_spec_default();
    s_buf_t b;
    s_build(&spec, &b);
    int n_bad = 0;
    for (size_t n = 0; n < b.n; n++) {
        char err[512] = "";
        uint8_t *copy;
        eng_gguf_t *g = s_open_exact(b.p, n, &copy, err, sizeof err);
        if (g || err[0] == '\0') {
            if (n_bad++ < 5) fprintf(stderr, "prefix of %zu bytes: %s\n", n, g ? "opened" : "no message");
        }
        eng_gguf_destroy(&g);
        free(copy);
    }
    CHECK_MSG(n_bad == 0, "%d of %zu prefixes misbehaved", n_bad, b.n);
    char err[512];
    CHECK(eng_gguf_open_mem(b.p, b.n - 1, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "tensor 'w2'") && strstr(err, "past end"), "%s", err);
    CHECK(eng_gguf_open_mem(b.p, 2, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "too small"), "%s", err);
    CHECK(eng_gguf_open_mem(b.p, 60, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "n_kv 22 is more than a 60-byte file can hold"), "%s", err);
    /* Cut inside the last tensor info, just after its name. */
    const uint8_t *w2 = NULL;
    for (size_t i = 0; i + 10 <= b.n && !w2; i++)
        if (memcmp(b.p + i, "\x02\0\0\0\0\0\0\0w2", 10) == 0) w2 = b.p + i;
    REQUIRE(w2);
    CHECK(eng_gguf_open_mem(b.p, (size_t)(w2 - b.p) + 12, err, sizeof err) == NULL);
    CHECK_MSG(strstr(err, "tensor 'w2': truncated: needs 4 bytes"), "%s", err);
    CHECK(eng_gguf_open_mem(NULL, 0, err, sizeof err) == NULL);
    free(b.p);
}

/* Each byte set to 0x00, 0xff and +1 in turn: must open or fail cleanly; never crash or over-read. */
static void test_byte_flips(void) {
    s_spec_t spec = s_spec_default();
    s_buf_t b;
    s_build(&spec, &b);
    int n_open = 0, n_fail = 0;
    for (size_t i = 0; i < b.n; i++) {
        for (int k = 0; k < 3; k++) {
            char err[128] = "";
            uint8_t *copy = malloc(b.n);
            memcpy(copy, b.p, b.n);
            copy[i] = k == 0 ? 0x00 : k == 1 ? 0xff : (uint8_t)(copy[i] + 1);
            eng_gguf_t *g = eng_gguf_open_mem(copy, b.n, err, sizeof err);
            if (g) {
                n_open++;
                for (int64_t j = 0; j < eng_gguf_n_tensors(g); j++) {
                    const eng_gguf_tensor_t *t = eng_gguf_tensor(g, j);
                    CHECK((const uint8_t *)t->data >= copy && (const uint8_t *)t->data + t->n_bytes <= copy + b.n);
                }
            } else {
                n_fail++;
                CHECK(err[0] != '\0');
            }
            eng_gguf_destroy(&g);
            free(copy);
        }
    }
    CHECK(n_open > 0 && n_fail > 0);
    free(b.p);
}

/* ---- hostile inputs ---- */

static int s_kv_dup(s_buf_t *b) {
    s_key(b, "general.architecture", ENG_GGUF_STRING);
    s_str(b, "x");
    return 1;
}
static int s_kv_bad_vtype(s_buf_t *b) {
    s_key(b, "t.bad", 13);
    s_u32(b, 0);
    return 1;
}
static int s_kv_bad_etype(s_buf_t *b) {
    s_key(b, "t.bad", ENG_GGUF_ARRAY);
    s_u32(b, 13);
    s_u64(b, 0);
    return 1;
}
static int s_kv_bool2(s_buf_t *b) {
    s_key(b, "t.flag", ENG_GGUF_BOOL);
    s_u8(b, 2);
    return 1;
}
static int s_kv_nul_key(s_buf_t *b) {
    s_u64(b, 3);
    s_put(b, "a\0b", 3);
    s_u32(b, ENG_GGUF_U8);
    s_u8(b, 0);
    return 1;
}
static int s_kv_empty_key(s_buf_t *b) {
    s_key(b, "", ENG_GGUF_U8);
    s_u8(b, 0);
    return 1;
}
static int s_kv_huge_str(s_buf_t *b) {
    s_key(b, "t.s", ENG_GGUF_STRING);
    s_u64(b, UINT64_MAX - 3);
    return 1;
}
static int s_kv_huge_arr(s_buf_t *b) {
    s_key(b, "t.a", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_U64);
    s_u64(b, UINT64_C(1) << 61);
    return 1;
}
static int s_kv_huge_str_arr(s_buf_t *b) {
    s_key(b, "t.v", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_STRING);
    s_u64(b, UINT64_C(1) << 40);
    return 1;
}
static int s_kv_huge_inner(s_buf_t *b) { /* [[u32 x 2^62]] */
    s_key(b, "t.n", ENG_GGUF_ARRAY);
    s_u32(b, ENG_GGUF_ARRAY);
    s_u64(b, 1);
    s_u32(b, ENG_GGUF_U32);
    s_u64(b, UINT64_C(1) << 62);
    return 1;
}
static int s_kv_deep(s_buf_t *b) { /* [[[[[[[[[[]]]]]]]]]]: 10 deep */
    s_key(b, "t.deep", ENG_GGUF_ARRAY);
    for (int d = 0; d < 9; d++) {
        s_u32(b, ENG_GGUF_ARRAY);
        s_u64(b, 1);
    }
    s_u32(b, ENG_GGUF_U8);
    s_u64(b, 0);
    return 1;
}
static int s_kv_long_key(s_buf_t *b) {
    static char key[70001];
    memset(key, 'k', 70000);
    s_key(b, key, ENG_GGUF_U8);
    s_u8(b, 0);
    return 1;
}
static int s_kv_str_past_end(s_buf_t *b) {
    s_key(b, "t.s", ENG_GGUF_STRING);
    s_u64(b, 100000);
    return 1;
}

static void m_magic(s_spec_t *s) {
    s->magic = 0x47475546u;
}
static void m_v1(s_spec_t *s) {
    s->version = 1;
}
static void m_v4(s_spec_t *s) {
    s->version = 4;
}
static void m_v0(s_spec_t *s) {
    s->version = 0;
}
static void m_big_endian(s_spec_t *s) {
    s->version = 0x03000000u;
}
static void m_huge_n_tensors(s_spec_t *s) {
    s->has_n_tensors = true, s->n_tensors = UINT64_C(1) << 60;
}
static void m_huge_n_kv(s_spec_t *s) {
    s->has_n_kv = true, s->n_kv = UINT64_MAX;
}
static void m_more_kv(s_spec_t *s) {
    s->has_n_kv = true, s->n_kv = 25;
}
static void m_huge_key_len(s_spec_t *s) {
    s->arch_key_len = UINT64_C(1) << 62;
}
static void m_key_too_long(s_spec_t *s) {
    s->extra_kvs = s_kv_long_key;
}
static void m_ndims0(s_spec_t *s) {
    s->t[0].n_dims = 0;
}
static void m_ndims5(s_spec_t *s) {
    s->t[1].n_dims = 5;
}
static void m_ne0(s_spec_t *s) {
    s->t[0].ne[1] = 0;
}
static void m_ne_overflow(s_spec_t *s) {
    s->t[0] = (s_tinfo_t){"big", 4, {1 << 16, 1 << 16, 1 << 16, 1 << 16}, 0, 0};
}
static void m_ne_huge(s_spec_t *s) {
    s->t[0] = (s_tinfo_t){"big", 1, {UINT64_MAX}, 0, 0};
}
static void m_ne_2p40(s_spec_t *s) {
    s->t[0] = (s_tinfo_t){"big", 2, {UINT64_C(1) << 20, (UINT64_C(1) << 20) + 1}, 0, 0};
}
static void m_type99(s_spec_t *s) {
    s->t[1].type = 99;
}
static void m_type31(s_spec_t *s) {
    s->t[1].type = 31;
}
static void m_block(s_spec_t *s) {
    s->t[1].ne[0] = 48;
}
static void m_misaligned(s_spec_t *s) {
    s->t[1].offset = 36;
}
static void m_past_end(s_spec_t *s) {
    s->t[2].offset = UINT64_C(1) << 20;
}
static void m_offset_huge(s_spec_t *s) {
    s->t[2].offset = UINT64_MAX - 31;
}
static void m_size_past_end(s_spec_t *s) {
    s->t[2].ne[0] = 4;
}
static void m_dup_tensor(s_spec_t *s) {
    s->t[2].name = "w0";
}
static void m_empty_name(s_spec_t *s) {
    s->t[1].name = "";
}
static void m_no_data(s_spec_t *s) {
    s->data_bytes = 0;
}
static void m_align0(s_spec_t *s) {
    s->alignment = 0;
}
static void m_align3(s_spec_t *s) {
    s->alignment = 3;
}
static void m_align_u64(s_spec_t *s) {
    s->alignment_type = ENG_GGUF_U64;
}
static void m_align_i32(s_spec_t *s) {
    s->alignment_type = ENG_GGUF_I32;
}
static void m_align_2g(s_spec_t *s) {
    s->alignment = UINT64_C(1) << 31;
}
static void m_dup_key(s_spec_t *s) {
    s->extra_kvs = s_kv_dup;
}
static void m_bad_vtype(s_spec_t *s) {
    s->extra_kvs = s_kv_bad_vtype;
}
static void m_bad_etype(s_spec_t *s) {
    s->extra_kvs = s_kv_bad_etype;
}
static void m_bool2(s_spec_t *s) {
    s->extra_kvs = s_kv_bool2;
}
static void m_nul_key(s_spec_t *s) {
    s->extra_kvs = s_kv_nul_key;
}
static void m_empty_key(s_spec_t *s) {
    s->extra_kvs = s_kv_empty_key;
}
static void m_huge_str(s_spec_t *s) {
    s->extra_kvs = s_kv_huge_str;
}
static void m_huge_arr(s_spec_t *s) {
    s->extra_kvs = s_kv_huge_arr;
}
static void m_huge_str_arr(s_spec_t *s) {
    s->extra_kvs = s_kv_huge_str_arr;
}
static void m_huge_inner(s_spec_t *s) {
    s->extra_kvs = s_kv_huge_inner;
}
static void m_deep(s_spec_t *s) {
    s->extra_kvs = s_kv_deep;
}
static void m_str_past_end(s_spec_t *s) {
    s->extra_kvs = s_kv_str_past_end;
}

static void test_hostile(void) {
    static const struct {
        const char *name;
        void (*mutate)(s_spec_t *);
        const char *want[3]; /* substrings the error message must contain */
    } cases[] = {
        {"bad magic", m_magic, {"header", "bad magic 0x47475546"}},
        {"version 1", m_v1, {"version 1 is not supported"}},
        {"version 4", m_v4, {"unsupported GGUF version 4"}},
        {"version 0", m_v0, {"unsupported GGUF version 0"}},
        {"big-endian", m_big_endian, {"big-endian"}},
        {"huge n_tensors", m_huge_n_tensors, {"n_tensors 1152921504606846976", "file can hold"}},
        {"huge n_kv", m_huge_n_kv, {"n_kv 18446744073709551615"}},
        {"n_kv too big by a little", m_more_kv, {"key #23", "string length"}}, /* tensor infos read as keys */
        {"huge key length", m_huge_key_len, {"key #0", "string length 4611686018427387904"}},
        {"key too long", m_key_too_long, {"key #22", "key length 70000 exceeds 65535"}},
        {"n_dims 0", m_ndims0, {"tensor 'w0'", "n_dims 0"}},
        {"n_dims 5", m_ndims5, {"tensor 'w1'", "n_dims 5"}},
        {"ne 0", m_ne0, {"tensor 'w0'", "ne[1] is 0"}},
        {"dims overflow", m_ne_overflow, {"tensor 'big'", "ne[2] = 65536", "2^40"}},
        {"ne huge", m_ne_huge, {"tensor 'big'", "ne[0] = 18446744073709551615"}},
        {"elements > 2^40", m_ne_2p40, {"tensor 'big'", "ne[1] = 1048577", "2^40"}},
        {"type 99", m_type99, {"tensor 'w1'", "unknown tensor type 99"}},
        {"type 31 (removed)", m_type31, {"tensor 'w1'", "unknown tensor type 31"}},
        {"row not whole blocks", m_block, {"tensor 'w1'", "ne[0] = 48", "Q8_0 block size 32"}},
        {"misaligned offset", m_misaligned, {"tensor 'w1'", "offset 36", "alignment 32"}},
        {"offset past end", m_past_end, {"tensor 'w2'", "offset 1048576", "past end"}},
        {"offset near 2^64", m_offset_huge, {"tensor 'w2'", "past end"}},
        {"size past end", m_size_past_end, {"tensor 'w2'", "+ 8 bytes", "past end"}},
        {"duplicate tensor", m_dup_tensor, {"tensor 'w0'", "duplicate tensor name", "#0 and #2"}},
        {"empty tensor name", m_empty_name, {"tensor #1", "empty tensor name"}},
        {"no data section", m_no_data, {"tensor 'w0'", "past end"}},
        {"alignment 0", m_align0, {"general.alignment", "alignment 0 is not a power of two"}},
        {"alignment 3", m_align3, {"general.alignment", "alignment 3 is not a power of two"}},
        {"alignment u64", m_align_u64, {"general.alignment", "type u64, expected u32"}},
        {"alignment i32", m_align_i32, {"general.alignment", "type i32"}},
        {"alignment 2^31", m_align_2g, {"tensor 'w1'", "offset 32", "alignment 2147483648"}},
        {"duplicate key", m_dup_key, {"key 'general.architecture'", "duplicate key", "#0 and #22"}},
        {"value type 13", m_bad_vtype, {"key 't.bad'", "unknown value type 13"}},
        {"array element type 13", m_bad_etype, {"key 't.bad'", "unknown array element type 13"}},
        {"bool 2", m_bool2, {"key 't.flag'", "bool value 2"}},
        {"NUL in key", m_nul_key, {"key #22", "NUL"}},
        {"empty key", m_empty_key, {"key #22", "empty key"}},
        {"huge string", m_huge_str, {"key 't.s'", "string length 18446744073709551612"}},
        {"string past end", m_str_past_end, {"key 't.s'", "string length 100000"}},
        {"huge array", m_huge_arr, {"key 't.a'", "array of 2305843009213693952 u64"}},
        {"huge string array", m_huge_str_arr, {"key 't.v'", "array of 1099511627776 string"}},
        {"huge inner array", m_huge_inner, {"key 't.n'", "array of 4611686018427387904 u32"}},
        {"arrays nested too deep", m_deep, {"key 't.deep'", "nested deeper than 8"}},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        s_spec_t spec = s_spec_default();
        cases[c].mutate(&spec);
        s_buf_t b;
        s_build(&spec, &b);
        char err[512] = "";
        uint8_t *copy;
        eng_gguf_t *g = s_open_exact(b.p, b.n, &copy, err, sizeof err);
        CHECK_MSG(g == NULL, "case '%s' opened", cases[c].name);
        for (int k = 0; k < 3 && cases[c].want[k]; k++)
            CHECK_MSG(strstr(err, cases[c].want[k]), "case '%s': error \"%s\" lacks \"%s\"", cases[c].name, err,
                      cases[c].want[k]);
        /* A tiny or missing error buffer is fine. */
        char tiny[8];
        eng_gguf_t *g2 = eng_gguf_open_mem(copy, b.n, tiny, sizeof tiny);
        CHECK(g2 == NULL && strlen(tiny) < sizeof tiny);
        CHECK(eng_gguf_open_mem(copy, b.n, NULL, 0) == NULL);
        eng_gguf_destroy(&g);
        free(copy);
        free(b.p);
    }
}

int main(void) {
    PD_TEST_RUN(test_model_metadata);
    PD_TEST_RUN(test_model_tensors);
    PD_TEST_RUN(test_open_errors);
    PD_TEST_RUN(test_small_valid);
    PD_TEST_RUN(test_small_variants);
    PD_TEST_RUN(test_truncated);
    PD_TEST_RUN(test_byte_flips);
    PD_TEST_RUN(test_hostile);
    return pd_test_finish();
}
