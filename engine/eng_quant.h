/* eng_quant.h: GGML tensor types and their dequantization to float32 (reference C, bit-exact with
 * ggml / the gguf Python package), plus row dot products used by the CPU backend. */
#ifndef ENG_QUANT_H
#define ENG_QUANT_H

#include <stddef.h>
#include <stdint.h>

#include "pd_common.h"

/* Numbered as in ggml.h / the GGUF spec. Only the types listed in eng_quant_supported are computed on. */
typedef enum {
    ENG_GGML_F32 = 0,
    ENG_GGML_F16 = 1,
    ENG_GGML_Q4_0 = 2,
    ENG_GGML_Q4_1 = 3,
    ENG_GGML_Q5_0 = 6,
    ENG_GGML_Q5_1 = 7,
    ENG_GGML_Q8_0 = 8,
    ENG_GGML_Q8_1 = 9,
    ENG_GGML_Q2_K = 10,
    ENG_GGML_Q3_K = 11,
    ENG_GGML_Q4_K = 12,
    ENG_GGML_Q5_K = 13,
    ENG_GGML_Q6_K = 14,
    ENG_GGML_Q8_K = 15,
    ENG_GGML_IQ2_XXS = 16,
    ENG_GGML_IQ2_XS = 17,
    ENG_GGML_IQ3_XXS = 18,
    ENG_GGML_IQ1_S = 19,
    ENG_GGML_IQ4_NL = 20,
    ENG_GGML_IQ3_S = 21,
    ENG_GGML_IQ2_S = 22,
    ENG_GGML_IQ4_XS = 23,
    ENG_GGML_I8 = 24,
    ENG_GGML_I16 = 25,
    ENG_GGML_I32 = 26,
    ENG_GGML_I64 = 27,
    ENG_GGML_F64 = 28,
    ENG_GGML_IQ1_M = 29,
    ENG_GGML_BF16 = 30,
    ENG_GGML_TQ1_0 = 34,
    ENG_GGML_TQ2_0 = 35,
    ENG_GGML_MXFP4 = 39,
    ENG_GGML_TYPE_COUNT = 40,
} eng_ggml_type_t;

/* Name ("Q4_K"), or "?" for an unknown number. */
const char *eng_ggml_type_name(int type);
/* Size facts for any type the GGUF reader knows (all of the enum): elements per block and bytes per
 * block. Returns 0 for unknown numbers; the reader rejects those tensors. */
uint32_t eng_ggml_block_elems(int type);
uint32_t eng_ggml_block_bytes(int type);
/* Bytes of a row of n elements, or 0 when n is not a multiple of the block size or type unknown. */
uint64_t eng_ggml_row_bytes(int type, uint64_t n);
/* True for the types we can dequantize: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K. */
int eng_quant_supported(int type);

/* Dequantizes n elements (a multiple of the type's block size) from src into dst.
 * Returns PD_OK, or PD_EINVAL for an unsupported type or a bad n. Thread-safe, no allocation. */
PD_NODISCARD pd_status eng_dequant(int type, const void *src, float *dst, int64_t n);

/* Rows [0, rows) of a matrix of `type` (row r at src + r * row_bytes, cols elements each) as bf16 into out (rows x cols,
 * row-major), each element multiplied by col_scale[column] first when col_scale is not NULL (a norm weight folded into
 * the matrix), on up to n_threads threads (<= 1, or where a thread cannot start: the calling thread). The GPU backend
 * uploads its weights so: on one core of the CI machine it takes 1.6 ns an element, some 7 s for the 8B layout's
 * Q/K/V and gate/up. Returns PD_OK, or PD_EINVAL for a type eng_dequant does not read or cols not a multiple of its
 * block. */
PD_NODISCARD pd_status eng_rows_to_bf16(int type, const void *src, size_t row_bytes, int64_t rows, int64_t cols,
                                        const float *col_scale, uint16_t *out, int n_threads);

/* fp16 / bf16 conversions (round-to-nearest-even on the way down). */
float eng_f16_to_f32(uint16_t h);
uint16_t eng_f32_to_f16(float f);
float eng_bf16_to_f32(uint16_t h);
uint16_t eng_f32_to_bf16(float f);

#endif
