/* pb_int.h: helpers shared by the pb_*.c files (formatting a reason, checking strings). Private to proto/. */
#ifndef PB_INT_H
#define PB_INT_H

#include "pb.h"

/* Writes the reason into err (if err and err_cap) and returns st. */
pd_status pb_fail(pd_status st, char *err, size_t err_cap, const char *fmt, ...) PD_PRINTF(4, 5);

/* Writes s into dst (cap bytes) as a quoted C literal, escaping non-printable bytes and cutting it after
 * 40 bytes with "...": safe to put in a log line whatever the peer sent. Returns dst. */
const char *pb_quote(char *dst, size_t cap, const char *s);

typedef enum {
    PB_STR_TEXT, /* any valid UTF-8 (prompts, stop strings, error messages) */
    PB_STR_NAME, /* valid UTF-8 without control characters (model names) */
    PB_STR_ID,   /* printable ASCII without spaces: 0x21..0x7e (ids, endpoints, backend names) */
} pb_str_kind_t;

/* Checks that s (NULL reads as "") has min_bytes..max_bytes bytes and is of the given kind; on failure
 * returns st with a reason naming field. */
pd_status pb_check_str(pd_status st, const char *field, const char *s, size_t min_bytes, size_t max_bytes,
                       pb_str_kind_t kind, char *err, size_t err_cap);

/* Checks an Error (NULL is fine): code a value of ErrorCode, message text of at most PB_MAX_ERROR_BYTES;
 * on failure returns st with a reason naming field. */
pd_status pb_check_error(pd_status st, const char *field, const Pdserve__V1__Error *e, char *err, size_t err_cap);

#endif
