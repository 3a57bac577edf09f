/* rt_openai_int.h: helpers shared by rt_openai_req.c and rt_openai_resp.c. Private to router/. */
#ifndef RT_OPENAI_INT_H
#define RT_OPENAI_INT_H

#include "rt_openai.h"

#include <jansson.h>

/* Fills err (may be NULL) and returns PD_EINVAL for ERR_INVALID_ARGUMENT / ERR_NOT_FOUND, else PD_ENOMEM for
 * ERR_INTERNAL. param may be NULL (= null). */
pd_status rt_err(rt_openai_error_t *err, Pdserve__V1__ErrorCode code, const char *param, const char *fmt, ...)
    PD_PRINTF(4, 5);

/* A JSON string of s[0..n), invalid UTF-8 sequences replaced by U+FFFD. NULL only when out of memory. */
json_t *rt_json_text(const char *s, size_t n);

#endif
