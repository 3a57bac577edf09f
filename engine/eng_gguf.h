/* eng_gguf.h: read-only GGUF (v2/v3) model files: metadata key/values and the tensor table.
 * The file is mmapped; every count, length, offset and dimension is bounds-checked before use, so a
 * truncated or hostile file yields an error message, never an out-of-bounds read. Knows nothing about
 * what the tensors mean (that is eng_model.c). */
#ifndef ENG_GGUF_H
#define ENG_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_quant.h"

typedef struct eng_gguf eng_gguf_t;

/* Metadata value types, numbered as in the GGUF spec. */
typedef enum {
    ENG_GGUF_U8 = 0,
    ENG_GGUF_I8 = 1,
    ENG_GGUF_U16 = 2,
    ENG_GGUF_I16 = 3,
    ENG_GGUF_U32 = 4,
    ENG_GGUF_I32 = 5,
    ENG_GGUF_F32 = 6,
    ENG_GGUF_BOOL = 7,
    ENG_GGUF_STRING = 8,
    ENG_GGUF_ARRAY = 9,
    ENG_GGUF_U64 = 10,
    ENG_GGUF_I64 = 11,
    ENG_GGUF_F64 = 12,
} eng_gguf_vtype_t;

/* A string inside the mapped file: not NUL-terminated. */
typedef struct {
    const char *ptr;
    uint64_t len;
} eng_gguf_str_t;

typedef struct {
    const char *name; /* NUL-terminated copy owned by the eng_gguf_t */
    uint32_t n_dims;  /* 1..4 */
    uint64_t ne[4];   /* elements per dimension, ne[0] fastest-varying (the row length); unused = 1 */
    eng_ggml_type_t type;
    uint64_t offset;  /* from the start of the data section */
    const void *data; /* points into the mapping; n_bytes readable bytes */
    uint64_t n_bytes;
    uint64_t n_elems;
} eng_gguf_tensor_t;

/* Opens and validates a GGUF file. On failure returns NULL and writes a one-line reason into err
 * (e.g. "tensor 'blk.3.ffn_up.weight': data [offset+size] past end of file"); err may be NULL. Does not
 * log: the caller logs err. Caller destroys. A handle is read-only after open: any thread may query it. */
eng_gguf_t *eng_gguf_open(const char *path, char *err, size_t err_cap);
/* Same, over a caller-owned buffer that must outlive the handle (used by the fuzzer and tests). */
eng_gguf_t *eng_gguf_open_mem(const void *buf, size_t n_bytes, char *err, size_t err_cap);
void eng_gguf_destroy(eng_gguf_t **g);

uint32_t eng_gguf_version(const eng_gguf_t *g);
uint64_t eng_gguf_alignment(const eng_gguf_t *g);

/* Metadata. Index of a key, or -1. Keys are exact strings ("llama.block_count"). key_name and kv_type
 * take i in [0, n_kv) (asserted); key_name's string is owned by the handle. */
int64_t eng_gguf_n_kv(const eng_gguf_t *g);
int64_t eng_gguf_find_key(const eng_gguf_t *g, const char *key);
const char *eng_gguf_key_name(const eng_gguf_t *g, int64_t i);
eng_gguf_vtype_t eng_gguf_kv_type(const eng_gguf_t *g, int64_t i);

/* Typed getters: return false when the key is missing or has another type (integers of any width
 * and signedness convert when the value fits; F32/F64 convert to each other; BOOL is not an integer). */
bool eng_gguf_get_u64(const eng_gguf_t *g, const char *key, uint64_t *out);
bool eng_gguf_get_i64(const eng_gguf_t *g, const char *key, int64_t *out);
bool eng_gguf_get_f64(const eng_gguf_t *g, const char *key, double *out);
bool eng_gguf_get_bool(const eng_gguf_t *g, const char *key, bool *out);
bool eng_gguf_get_str(const eng_gguf_t *g, const char *key, eng_gguf_str_t *out);

/* Arrays: element type and count. Elements of fixed size are read with eng_gguf_arr_get_*; string
 * elements with eng_gguf_arr_str (O(1): the reader indexes string arrays at open). Index must be < n:
 * an index out of range, a missing key or another element type gives {NULL, 0} / 0 / 0.0.
 * arr_get_i64 reads integer and bool elements (u64 above INT64_MAX reads as INT64_MAX); arr_get_f64
 * reads float and integer elements. Arrays of arrays (elem_type ENG_GGUF_ARRAY) are validated at open,
 * but their elements cannot be read. */
bool eng_gguf_get_arr(const eng_gguf_t *g, const char *key, eng_gguf_vtype_t *elem_type, uint64_t *n);
eng_gguf_str_t eng_gguf_arr_str(const eng_gguf_t *g, const char *key, uint64_t i);
int64_t eng_gguf_arr_get_i64(const eng_gguf_t *g, const char *key, uint64_t i);
double eng_gguf_arr_get_f64(const eng_gguf_t *g, const char *key, uint64_t i);

/* Tensors. eng_gguf_tensor returns NULL for i outside [0, n_tensors); find returns NULL if absent. */
int64_t eng_gguf_n_tensors(const eng_gguf_t *g);
const eng_gguf_tensor_t *eng_gguf_tensor(const eng_gguf_t *g, int64_t i);
const eng_gguf_tensor_t *eng_gguf_find_tensor(const eng_gguf_t *g, const char *name);

#endif
