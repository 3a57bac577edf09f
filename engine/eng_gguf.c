/* eng_gguf.c: GGUF v2/v3 reader over an mmapped file or a caller's buffer. All reads go through one
 * bounds-checked cursor, and every count is checked against the bytes left before anything is allocated.
 * Reads only: never writes GGUF, never interprets tensors, and does not log (the caller logs `err`). */
#define _POSIX_C_SOURCE 200809L
#include "eng_gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "eng_gguf.c reads little-endian GGUF with plain loads: port s_rd_* first"
#endif

#define S_MAGIC             0x46554747u /* "GGUF" read as a little-endian u32 */
#define S_DEFAULT_ALIGNMENT 32
#define S_MAX_KEY_BYTES     65535               /* GGUF spec limit on key length */
#define S_MAX_NAME_BYTES    255                 /* sanity limit on tensor names (ggml itself allows 63) */
#define S_MAX_ELEMS         (UINT64_C(1) << 40) /* per dimension and per tensor */
#define S_MAX_ARRAY_DEPTH   8                   /* arrays of arrays nest at most this deep */
/* Smallest encodings, used to bound counts by the bytes left: a key/value is a key string (8-byte length)
 * + type (4) + a 1-byte value; a tensor info is a name (8) + n_dims (4) + one ne (8) + type (4) + offset (8). */
#define S_MIN_KV_BYTES      13
#define S_MIN_TENSOR_BYTES  32
#define S_MIN_STR_BYTES     8
#define S_MIN_ARR_BYTES     12

typedef struct {
    eng_gguf_str_t key; /* view into the buffer, no NUL bytes */
    const char *key_z;  /* NUL-terminated copy in g->names */
    eng_gguf_vtype_t type;
    eng_gguf_vtype_t elem_type; /* arrays only */
    uint64_t n;                 /* arrays only: element count */
    const uint8_t *val;         /* scalar value, or the first array element */
    eng_gguf_str_t str;         /* STRING only */
    eng_gguf_str_t *strs;       /* arrays of strings only: the n elements, owned */
} s_kv_t;

/* A name and the entry it belongs to; sorted by name for duplicate checks and binary-search lookups. */
typedef struct {
    const char *ptr;
    uint64_t len;
    int64_t i;
} s_name_ref_t;

struct eng_gguf {
    const uint8_t *buf;
    uint64_t n_bytes;
    void *map; /* non-NULL when we own an mmap of n_bytes */
    uint32_t version;
    uint64_t alignment;
    uint64_t data_start; /* file offset of the data section */
    int64_t n_kv;
    s_kv_t *kvs;
    s_name_ref_t *kv_sorted;
    int64_t n_tensors;
    eng_gguf_tensor_t *tensors;
    s_name_ref_t *tensor_sorted;
    char *names; /* NUL-terminated copies of all keys and tensor names */
};

/* Bounded cursor. ctx names what is being read, for error messages ("key 'llama.block_count'"). */
typedef struct {
    const uint8_t *buf;
    uint64_t size;
    uint64_t pos;
    char *err;
    size_t err_cap;
    char ctx[160];
} s_rd_t;

static void s_errf(char *err, size_t err_cap, const char *fmt, ...) PD_PRINTF(3, 4);
static void s_errf(char *err, size_t err_cap, const char *fmt, ...) {
    if (!err || err_cap == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_cap, fmt, ap);
    va_end(ap);
}

/* Writes "<ctx>: <message>" and returns false, so callers can `return s_fail(...)`. */
static bool s_fail(s_rd_t *r, const char *fmt, ...) PD_PRINTF(2, 3);
static bool s_fail(s_rd_t *r, const char *fmt, ...) {
    if (!r->err || r->err_cap == 0) return false;
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    snprintf(r->err, r->err_cap, "%s: %s", r->ctx, msg);
    return false;
}

static void s_set_ctx(s_rd_t *r, const char *fmt, ...) PD_PRINTF(2, 3);
static void s_set_ctx(s_rd_t *r, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->ctx, sizeof r->ctx, fmt, ap);
    va_end(ap);
}

static uint64_t s_left(const s_rd_t *r) {
    return r->size - r->pos;
}

static bool s_take(s_rd_t *r, uint64_t n, const uint8_t **out) {
    if (n > s_left(r))
        return s_fail(r, "truncated: needs %" PRIu64 " bytes at offset %" PRIu64 ", file has %" PRIu64, n, r->pos,
                      r->size);
    *out = r->buf + r->pos;
    r->pos += n;
    return true;
}

static bool s_rd_u32(s_rd_t *r, uint32_t *v) {
    const uint8_t *p = NULL;
    if (!s_take(r, 4, &p)) return false;
    memcpy(v, p, 4);
    return true;
}

static bool s_rd_u64(s_rd_t *r, uint64_t *v) {
    const uint8_t *p = NULL;
    if (!s_take(r, 8, &p)) return false;
    memcpy(v, p, 8);
    return true;
}

static bool s_rd_str(s_rd_t *r, eng_gguf_str_t *s) {
    const uint8_t *p = NULL;
    if (!s_rd_u64(r, &s->len)) return false;
    if (s->len > s_left(r))
        return s_fail(r, "string length %" PRIu64 " at offset %" PRIu64 " exceeds the %" PRIu64 " bytes left", s->len,
                      r->pos - 8, s_left(r));
    if (!s_take(r, s->len, &p)) return false;
    s->ptr = (const char *)p;
    return true;
}

static const char *s_vtype_name(uint32_t t) {
    static const char *names[] = {"u8",   "i8",     "u16",   "i16", "u32", "i32", "f32",
                                  "bool", "string", "array", "u64", "i64", "f64"};
    return t < sizeof names / sizeof names[0] ? names[t] : "?";
}

/* Bytes of a fixed-size value type; 0 for STRING and ARRAY. */
static uint64_t s_vtype_bytes(uint32_t t) {
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_I8:
    case ENG_GGUF_BOOL: return 1;
    case ENG_GGUF_U16:
    case ENG_GGUF_I16: return 2;
    case ENG_GGUF_U32:
    case ENG_GGUF_I32:
    case ENG_GGUF_F32: return 4;
    case ENG_GGUF_U64:
    case ENG_GGUF_I64:
    case ENG_GGUF_F64: return 8;
    default: return 0;
    }
}

static bool s_rd_vtype(s_rd_t *r, const char *what, uint32_t *t) {
    if (!s_rd_u32(r, t)) return false;
    if (*t > ENG_GGUF_F64) return s_fail(r, "unknown %s type %" PRIu32, what, *t);
    return true;
}

/* Reads n fixed-size values; bools must be 0 or 1. */
static bool s_rd_fixed(s_rd_t *r, uint32_t t, uint64_t n, const uint8_t **out) {
    uint64_t size = s_vtype_bytes(t);
    if (n > s_left(r) / size)
        return s_fail(r, "%" PRIu64 " %s values need more than the %" PRIu64 " bytes left", n, s_vtype_name(t),
                      s_left(r));
    if (!s_take(r, n * size, out)) return false;
    if (t == ENG_GGUF_BOOL) {
        for (uint64_t i = 0; i < n; i++)
            if ((*out)[i] > 1) return s_fail(r, "bool value %u is not 0 or 1", (*out)[i]);
    }
    return true;
}

/* Reads an array header (element type, count) and checks the count against the bytes left. */
static bool s_rd_arr_header(s_rd_t *r, uint32_t *elem_type, uint64_t *n) {
    if (!s_rd_vtype(r, "array element", elem_type) || !s_rd_u64(r, n)) return false;
    uint64_t min_bytes = *elem_type == ENG_GGUF_STRING  ? S_MIN_STR_BYTES
                         : *elem_type == ENG_GGUF_ARRAY ? S_MIN_ARR_BYTES
                                                        : s_vtype_bytes(*elem_type);
    if (*n > s_left(r) / min_bytes)
        return s_fail(r, "array of %" PRIu64 " %s elements cannot fit in the %" PRIu64 " bytes left", *n,
                      s_vtype_name(*elem_type), s_left(r));
    return true;
}

/* Skips the body of an array whose header was read; arrays of arrays recurse, at most S_MAX_ARRAY_DEPTH. */
static bool s_skip_arr_body(s_rd_t *r, uint32_t elem_type, uint64_t n, int depth) {
    const uint8_t *p = NULL;
    if (depth > S_MAX_ARRAY_DEPTH) return s_fail(r, "arrays nested deeper than %d", S_MAX_ARRAY_DEPTH);
    if (elem_type == ENG_GGUF_STRING) {
        eng_gguf_str_t s = {NULL, 0};
        for (uint64_t i = 0; i < n; i++)
            if (!s_rd_str(r, &s)) return false;
        return true;
    }
    if (elem_type == ENG_GGUF_ARRAY) {
        for (uint64_t i = 0; i < n; i++) {
            uint32_t t = 0;
            uint64_t m = 0;
            if (!s_rd_arr_header(r, &t, &m) || !s_skip_arr_body(r, t, m, depth + 1)) return false;
        }
        return true;
    }
    return s_rd_fixed(r, elem_type, n, &p);
}

static bool s_rd_value(s_rd_t *r, s_kv_t *kv) {
    uint32_t t = 0;
    if (!s_rd_vtype(r, "value", &t)) return false;
    kv->type = (eng_gguf_vtype_t)t;
    if (t == ENG_GGUF_STRING) return s_rd_str(r, &kv->str);
    if (t != ENG_GGUF_ARRAY) return s_rd_fixed(r, t, 1, &kv->val);

    uint32_t et = 0;
    if (!s_rd_arr_header(r, &et, &kv->n)) return false;
    kv->elem_type = (eng_gguf_vtype_t)et;
    kv->val = r->buf + r->pos;
    if (et != ENG_GGUF_STRING) return s_skip_arr_body(r, et, kv->n, 1);
    /* Index string arrays so eng_gguf_arr_str is O(1); n is bounded by the bytes left. */
    kv->strs = calloc(kv->n ? kv->n : 1, sizeof *kv->strs);
    if (!kv->strs) return s_fail(r, "out of memory indexing %" PRIu64 " strings", kv->n);
    for (uint64_t i = 0; i < kv->n; i++)
        if (!s_rd_str(r, &kv->strs[i])) return false;
    return true;
}

/* Views into the file may not contain NUL bytes: we hand out NUL-terminated copies of them. */
static bool s_rd_name(s_rd_t *r, const char *what, uint64_t max_bytes, eng_gguf_str_t *s) {
    if (!s_rd_str(r, s)) return false;
    if (s->len == 0) return s_fail(r, "empty %s", what);
    if (s->len > max_bytes) return s_fail(r, "%s length %" PRIu64 " exceeds %" PRIu64, what, s->len, max_bytes);
    const char *nul = memchr(s->ptr, 0, s->len);
    if (nul) return s_fail(r, "%s '%.*s...' contains a NUL byte", what, (int)(nul - s->ptr), s->ptr);
    return true;
}

static int s_name_cmp(const void *a, const void *b) {
    const s_name_ref_t *x = a, *y = b;
    uint64_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->ptr, y->ptr, n);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->i < y->i ? -1 : x->i > y->i; /* stable order for duplicates */
}

/* Sorts refs by name; returns the index of the first adjacent duplicate pair's first entry, or -1. */
static int64_t s_sort_names(s_name_ref_t *refs, int64_t n) {
    if (n > 1) qsort(refs, (size_t)n, sizeof *refs, s_name_cmp);
    for (int64_t i = 1; i < n; i++)
        if (refs[i].len == refs[i - 1].len && memcmp(refs[i].ptr, refs[i - 1].ptr, refs[i].len) == 0) return i - 1;
    return -1;
}

static int64_t s_find_name(const s_name_ref_t *refs, int64_t n, const char *name) {
    uint64_t len = strlen(name);
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        uint64_t m = refs[mid].len < len ? refs[mid].len : len;
        int c = memcmp(refs[mid].ptr, name, m);
        if (c == 0) c = refs[mid].len < len ? -1 : refs[mid].len > len;
        if (c == 0) return refs[mid].i;
        if (c < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return -1;
}

static bool s_parse_header(s_rd_t *r, eng_gguf_t *g, uint64_t *n_tensors, uint64_t *n_kv) {
    uint32_t magic = 0;
    s_set_ctx(r, "header");
    if (r->size < 4) return s_fail(r, "file of %" PRIu64 " bytes is too small to be GGUF", r->size);
    if (!s_rd_u32(r, &magic)) return false;
    if (magic != S_MAGIC) return s_fail(r, "bad magic 0x%08" PRIx32 " (expected \"GGUF\")", magic);
    if (!s_rd_u32(r, &g->version)) return false;
    if (g->version == 1) return s_fail(r, "GGUF version 1 is not supported (only v2 and v3)");
    if (g->version != 2 && g->version != 3) {
        if (g->version != 0 && (g->version & 0xffff) == 0)
            return s_fail(r, "GGUF version 0x%08" PRIx32 ": big-endian files are not supported", g->version);
        return s_fail(r, "unsupported GGUF version %" PRIu32 " (only v2 and v3)", g->version);
    }
    if (!s_rd_u64(r, n_tensors) || !s_rd_u64(r, n_kv)) return false;
    if (*n_kv > s_left(r) / S_MIN_KV_BYTES)
        return s_fail(r, "n_kv %" PRIu64 " is more than a %" PRIu64 "-byte file can hold", *n_kv, r->size);
    if (*n_tensors > (s_left(r) - *n_kv * S_MIN_KV_BYTES) / S_MIN_TENSOR_BYTES)
        return s_fail(r, "n_tensors %" PRIu64 " is more than a %" PRIu64 "-byte file can hold", *n_tensors, r->size);
    return true;
}

static bool s_parse_kvs(s_rd_t *r, eng_gguf_t *g) {
    g->kvs = calloc((size_t)g->n_kv + 1, sizeof *g->kvs);
    g->kv_sorted = calloc((size_t)g->n_kv + 1, sizeof *g->kv_sorted);
    if (!g->kvs || !g->kv_sorted) return s_fail(r, "out of memory for %" PRId64 " keys", g->n_kv);
    for (int64_t i = 0; i < g->n_kv; i++) {
        s_kv_t *kv = &g->kvs[i];
        s_set_ctx(r, "key #%" PRId64, i);
        if (!s_rd_name(r, "key", S_MAX_KEY_BYTES, &kv->key)) return false;
        s_set_ctx(r, "key '%.*s'", (int)(kv->key.len < 100 ? kv->key.len : 100), kv->key.ptr);
        if (!s_rd_value(r, kv)) return false;
        g->kv_sorted[i] = (s_name_ref_t){kv->key.ptr, kv->key.len, i};
    }
    int64_t dup = s_sort_names(g->kv_sorted, g->n_kv);
    if (dup >= 0) {
        const s_name_ref_t *a = &g->kv_sorted[dup];
        s_set_ctx(r, "key '%.*s'", (int)(a->len < 100 ? a->len : 100), a->ptr);
        return s_fail(r, "duplicate key (entries #%" PRId64 " and #%" PRId64 ")", a->i, g->kv_sorted[dup + 1].i);
    }
    return true;
}

static bool s_parse_alignment(s_rd_t *r, eng_gguf_t *g) {
    g->alignment = S_DEFAULT_ALIGNMENT;
    int64_t i = s_find_name(g->kv_sorted, g->n_kv, "general.alignment");
    if (i < 0) return true;
    const s_kv_t *kv = &g->kvs[i];
    s_set_ctx(r, "key 'general.alignment'");
    if (kv->type != ENG_GGUF_U32) return s_fail(r, "has type %s, expected u32", s_vtype_name(kv->type));
    uint32_t a;
    memcpy(&a, kv->val, 4);
    if (a == 0 || (a & (a - 1)) != 0) return s_fail(r, "alignment %" PRIu32 " is not a power of two", a);
    g->alignment = a;
    return true;
}

/* One tensor info: name, dims, type, offset; sizes checked, data range checked later. */
static bool s_parse_tensor_info(s_rd_t *r, const eng_gguf_t *g, int64_t i, eng_gguf_tensor_t *t, eng_gguf_str_t *name) {
    uint32_t type = 0;
    s_set_ctx(r, "tensor #%" PRId64, i);
    if (!s_rd_name(r, "tensor name", S_MAX_NAME_BYTES, name)) return false;
    s_set_ctx(r, "tensor '%.*s'", (int)name->len, name->ptr);
    if (!s_rd_u32(r, &t->n_dims)) return false;
    if (t->n_dims < 1 || t->n_dims > 4) return s_fail(r, "n_dims %" PRIu32 " is not in 1..4", t->n_dims);
    t->n_elems = 1;
    for (uint32_t d = 0; d < 4; d++) t->ne[d] = 1;
    for (uint32_t d = 0; d < t->n_dims; d++) {
        if (!s_rd_u64(r, &t->ne[d])) return false;
        if (t->ne[d] == 0) return s_fail(r, "ne[%" PRIu32 "] is 0", d);
        if (t->ne[d] > S_MAX_ELEMS / t->n_elems)
            return s_fail(r, "ne[%" PRIu32 "] = %" PRIu64 " makes the element count exceed 2^40", d, t->ne[d]);
        t->n_elems *= t->ne[d];
    }
    if (!s_rd_u32(r, &type)) return false;
    uint32_t block_elems = eng_ggml_block_elems((int)type);
    if (block_elems == 0) return s_fail(r, "unknown tensor type %" PRIu32, type);
    t->type = (eng_ggml_type_t)type;
    if (t->ne[0] % block_elems != 0)
        return s_fail(r, "row length ne[0] = %" PRIu64 " is not a multiple of the %s block size %" PRIu32, t->ne[0],
                      eng_ggml_type_name((int)type), block_elems);
    t->n_bytes = t->n_elems / block_elems * eng_ggml_block_bytes((int)type); /* < 2^40 * 292: no overflow */
    if (!s_rd_u64(r, &t->offset)) return false;
    if (t->offset % g->alignment != 0)
        return s_fail(r, "data offset %" PRIu64 " is not a multiple of the alignment %" PRIu64, t->offset,
                      g->alignment);
    return true;
}

static bool s_parse_tensors(s_rd_t *r, eng_gguf_t *g) {
    g->tensors = calloc((size_t)g->n_tensors + 1, sizeof *g->tensors);
    g->tensor_sorted = calloc((size_t)g->n_tensors + 1, sizeof *g->tensor_sorted);
    if (!g->tensors || !g->tensor_sorted) return s_fail(r, "out of memory for %" PRId64 " tensors", g->n_tensors);
    for (int64_t i = 0; i < g->n_tensors; i++) {
        eng_gguf_str_t name = {NULL, 0};
        if (!s_parse_tensor_info(r, g, i, &g->tensors[i], &name)) return false;
        g->tensor_sorted[i] = (s_name_ref_t){name.ptr, name.len, i};
    }
    int64_t dup = s_sort_names(g->tensor_sorted, g->n_tensors);
    if (dup >= 0) {
        const s_name_ref_t *a = &g->tensor_sorted[dup];
        s_set_ctx(r, "tensor '%.*s'", (int)a->len, a->ptr);
        return s_fail(r, "duplicate tensor name (tensors #%" PRId64 " and #%" PRId64 ")", a->i,
                      g->tensor_sorted[dup + 1].i);
    }
    return true;
}

/* The data section starts at the next multiple of the alignment after the tensor infos; every tensor's
 * bytes must lie inside it. Runs after s_copy_names so errors can name the tensor. */
static bool s_check_data(s_rd_t *r, eng_gguf_t *g) {
    if (g->n_tensors == 0) return true;
    g->data_start = (r->pos + g->alignment - 1) / g->alignment * g->alignment; /* pos <= size: no overflow */
    s_set_ctx(r, "data section");
    if (g->data_start > r->size)
        return s_fail(r, "starts at offset %" PRIu64 ", past the end of the %" PRIu64 "-byte file", g->data_start,
                      r->size);
    uint64_t data_bytes = r->size - g->data_start;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        eng_gguf_tensor_t *t = &g->tensors[i];
        s_set_ctx(r, "tensor '%s'", t->name);
        if (t->offset > data_bytes || t->n_bytes > data_bytes - t->offset)
            return s_fail(r,
                          "data [offset %" PRIu64 " + %" PRIu64 " bytes] past end of file (data section has %" PRIu64
                          " bytes)",
                          t->offset, t->n_bytes, data_bytes);
        t->data = r->buf + g->data_start + t->offset;
    }
    return true;
}

/* NUL-terminated copies of keys and tensor names in one allocation (total <= file size + counts). */
static bool s_copy_names(s_rd_t *r, eng_gguf_t *g) {
    uint64_t total = 1;
    for (int64_t i = 0; i < g->n_kv; i++) total += g->kvs[i].key.len + 1;
    for (int64_t i = 0; i < g->n_tensors; i++) total += g->tensor_sorted[i].len + 1;
    g->names = malloc(total);
    if (!g->names) return s_fail(r, "out of memory for %" PRIu64 " bytes of names", total);
    char *p = g->names;
    for (int64_t i = 0; i < g->n_kv; i++) {
        s_kv_t *kv = &g->kvs[i];
        memcpy(p, kv->key.ptr, kv->key.len);
        p[kv->key.len] = '\0';
        kv->key_z = p;
        p += kv->key.len + 1;
    }
    for (int64_t i = 0; i < g->n_tensors; i++) {
        const s_name_ref_t *a = &g->tensor_sorted[i];
        memcpy(p, a->ptr, a->len);
        p[a->len] = '\0';
        g->tensors[a->i].name = p;
        p += a->len + 1;
    }
    return true;
}

eng_gguf_t *eng_gguf_open_mem(const void *buf, size_t n_bytes, char *err, size_t err_cap) {
    s_rd_t r = {.buf = buf, .size = n_bytes, .err = err, .err_cap = err_cap};
    uint64_t n_tensors = 0, n_kv = 0;
    if (err && err_cap) err[0] = '\0';
    eng_gguf_t *g = calloc(1, sizeof *g);
    if (!g) {
        s_errf(err, err_cap, "out of memory");
        return NULL;
    }
    g->buf = buf;
    g->n_bytes = n_bytes;
    if (!buf && n_bytes) {
        s_errf(err, err_cap, "NULL buffer");
        goto fail;
    }
    if (!s_parse_header(&r, g, &n_tensors, &n_kv)) goto fail;
    g->n_kv = (int64_t)n_kv; /* both bounded by the file size */
    g->n_tensors = (int64_t)n_tensors;
    if (!s_parse_kvs(&r, g) || !s_parse_alignment(&r, g) || !s_parse_tensors(&r, g) || !s_copy_names(&r, g) ||
        !s_check_data(&r, g))
        goto fail;
    return g;
fail:
    eng_gguf_destroy(&g);
    return NULL;
}

eng_gguf_t *eng_gguf_open(const char *path, char *err, size_t err_cap) {
    char msg[512];
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        s_errf(err, err_cap, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) {
        s_errf(err, err_cap, "%s: not a regular non-empty file", path);
        close(fd);
        return NULL;
    }
    size_t n_bytes = (size_t)st.st_size;
    void *map = mmap(NULL, n_bytes, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        s_errf(err, err_cap, "%s: mmap of %zu bytes failed: %s", path, n_bytes, strerror(map_errno));
        return NULL;
    }
    eng_gguf_t *g = eng_gguf_open_mem(map, n_bytes, msg, sizeof msg);
    if (!g) {
        s_errf(err, err_cap, "%s: %s", path, msg);
        munmap(map, n_bytes);
        return NULL;
    }
    g->map = map;
    return g;
}

void eng_gguf_destroy(eng_gguf_t **pg) {
    if (!pg || !*pg) return;
    eng_gguf_t *g = *pg;
    if (g->kvs)
        for (int64_t i = 0; i < g->n_kv; i++) free(g->kvs[i].strs);
    free(g->kvs);
    free(g->kv_sorted);
    free(g->tensors);
    free(g->tensor_sorted);
    free(g->names);
    if (g->map) munmap(g->map, g->n_bytes);
    free(g);
    *pg = NULL;
}

uint32_t eng_gguf_version(const eng_gguf_t *g) {
    return g->version;
}
uint64_t eng_gguf_alignment(const eng_gguf_t *g) {
    return g->alignment;
}
int64_t eng_gguf_n_kv(const eng_gguf_t *g) {
    return g->n_kv;
}

int64_t eng_gguf_find_key(const eng_gguf_t *g, const char *key) {
    return s_find_name(g->kv_sorted, g->n_kv, key);
}

const char *eng_gguf_key_name(const eng_gguf_t *g, int64_t i) {
    PD_ASSERT(i >= 0 && i < g->n_kv);
    return g->kvs[i].key_z;
}

eng_gguf_vtype_t eng_gguf_kv_type(const eng_gguf_t *g, int64_t i) {
    PD_ASSERT(i >= 0 && i < g->n_kv);
    return g->kvs[i].type;
}

static const s_kv_t *s_kv(const eng_gguf_t *g, const char *key) {
    int64_t i = eng_gguf_find_key(g, key);
    return i < 0 ? NULL : &g->kvs[i];
}

/* Integer value of any width at p: the raw 64-bit pattern and whether it is negative. */
static bool s_int_at(uint32_t t, const uint8_t *p, uint64_t *bits, bool *is_neg) {
    int64_t s;
    switch (t) {
    case ENG_GGUF_U8:
    case ENG_GGUF_BOOL:
        *bits = p[0];
        *is_neg = false;
        return true;
    case ENG_GGUF_U16: {
        uint16_t v;
        memcpy(&v, p, 2);
        *bits = v;
        *is_neg = false;
        return true;
    }
    case ENG_GGUF_U32: {
        uint32_t v;
        memcpy(&v, p, 4);
        *bits = v;
        *is_neg = false;
        return true;
    }
    case ENG_GGUF_U64:
        memcpy(bits, p, 8);
        *is_neg = false;
        return true;
    case ENG_GGUF_I8: s = (int8_t)p[0]; break;
    case ENG_GGUF_I16: {
        int16_t v;
        memcpy(&v, p, 2);
        s = v;
        break;
    }
    case ENG_GGUF_I32: {
        int32_t v;
        memcpy(&v, p, 4);
        s = v;
        break;
    }
    case ENG_GGUF_I64: memcpy(&s, p, 8); break;
    default: return false;
    }
    *bits = (uint64_t)s;
    *is_neg = s < 0;
    return true;
}

static bool s_float_at(uint32_t t, const uint8_t *p, double *out) {
    if (t == ENG_GGUF_F32) {
        float f;
        memcpy(&f, p, 4);
        *out = f;
        return true;
    }
    if (t == ENG_GGUF_F64) {
        memcpy(out, p, 8);
        return true;
    }
    return false;
}

bool eng_gguf_get_u64(const eng_gguf_t *g, const char *key, uint64_t *out) {
    const s_kv_t *kv = s_kv(g, key);
    uint64_t bits = 0;
    bool is_neg = false;
    if (!kv || kv->type == ENG_GGUF_BOOL || !s_int_at(kv->type, kv->val, &bits, &is_neg) || is_neg) return false;
    *out = bits;
    return true;
}

bool eng_gguf_get_i64(const eng_gguf_t *g, const char *key, int64_t *out) {
    const s_kv_t *kv = s_kv(g, key);
    uint64_t bits = 0;
    bool is_neg = false;
    if (!kv || kv->type == ENG_GGUF_BOOL || !s_int_at(kv->type, kv->val, &bits, &is_neg)) return false;
    if (!is_neg && bits > INT64_MAX) return false;
    *out = (int64_t)bits;
    return true;
}

bool eng_gguf_get_f64(const eng_gguf_t *g, const char *key, double *out) {
    const s_kv_t *kv = s_kv(g, key);
    return kv && s_float_at(kv->type, kv->val, out);
}

bool eng_gguf_get_bool(const eng_gguf_t *g, const char *key, bool *out) {
    const s_kv_t *kv = s_kv(g, key);
    if (!kv || kv->type != ENG_GGUF_BOOL) return false;
    *out = kv->val[0] != 0;
    return true;
}

bool eng_gguf_get_str(const eng_gguf_t *g, const char *key, eng_gguf_str_t *out) {
    const s_kv_t *kv = s_kv(g, key);
    if (!kv || kv->type != ENG_GGUF_STRING) return false;
    *out = kv->str;
    return true;
}

bool eng_gguf_get_arr(const eng_gguf_t *g, const char *key, eng_gguf_vtype_t *elem_type, uint64_t *n) {
    const s_kv_t *kv = s_kv(g, key);
    if (!kv || kv->type != ENG_GGUF_ARRAY) return false;
    *elem_type = kv->elem_type;
    *n = kv->n;
    return true;
}

eng_gguf_str_t eng_gguf_arr_str(const eng_gguf_t *g, const char *key, uint64_t i) {
    const s_kv_t *kv = s_kv(g, key);
    if (!kv || kv->type != ENG_GGUF_ARRAY || kv->elem_type != ENG_GGUF_STRING || i >= kv->n)
        return (eng_gguf_str_t){NULL, 0};
    return kv->strs[i];
}

/* Fixed-size element i of an array, or NULL. */
static const uint8_t *s_arr_elem(const eng_gguf_t *g, const char *key, uint64_t i, uint32_t *type) {
    const s_kv_t *kv = s_kv(g, key);
    if (!kv || kv->type != ENG_GGUF_ARRAY || i >= kv->n) return NULL;
    uint64_t size = s_vtype_bytes(kv->elem_type);
    if (size == 0) return NULL;
    *type = kv->elem_type;
    return kv->val + i * size;
}

int64_t eng_gguf_arr_get_i64(const eng_gguf_t *g, const char *key, uint64_t i) {
    uint32_t t = 0;
    uint64_t bits = 0;
    bool is_neg = false;
    const uint8_t *p = s_arr_elem(g, key, i, &t);
    if (!p || !s_int_at(t, p, &bits, &is_neg)) return 0;
    if (!is_neg && bits > INT64_MAX) return INT64_MAX;
    return (int64_t)bits;
}

double eng_gguf_arr_get_f64(const eng_gguf_t *g, const char *key, uint64_t i) {
    uint32_t t = 0;
    uint64_t bits = 0;
    bool is_neg = false;
    double v;
    const uint8_t *p = s_arr_elem(g, key, i, &t);
    if (!p) return 0.0;
    if (s_float_at(t, p, &v)) return v;
    if (!s_int_at(t, p, &bits, &is_neg)) return 0.0;
    return is_neg ? (double)(int64_t)bits : (double)bits;
}

int64_t eng_gguf_n_tensors(const eng_gguf_t *g) {
    return g->n_tensors;
}

const eng_gguf_tensor_t *eng_gguf_tensor(const eng_gguf_t *g, int64_t i) {
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const eng_gguf_tensor_t *eng_gguf_find_tensor(const eng_gguf_t *g, const char *name) {
    int64_t i = s_find_name(g->tensor_sorted, g->n_tensors, name);
    return i < 0 ? NULL : &g->tensors[i];
}
