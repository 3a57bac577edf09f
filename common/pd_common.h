/* pd_common.h: status codes, assertions and small-allocation helpers shared by every module.
 * Deliberately tiny: no config, no networking (those get their own headers when a service needs them). */
#ifndef PD_COMMON_H
#define PD_COMMON_H

#include <stddef.h>
#include <stdint.h>

typedef int pd_status;

enum {
    PD_OK = 0,
    PD_EINVAL = -1, /* invalid argument or malformed input */
    PD_ENOMEM = -2, /* allocation failed */
    PD_EAGAIN = -3, /* no capacity now (e.g. no free KV blocks); retry later */
    PD_ETIMEDOUT = -4,
    PD_ECLOSED = -5,
    PD_EPROTO = -6,   /* bad message from a peer */
    PD_EIO = -7,      /* file or socket I/O failed */
    PD_EBACKEND = -8, /* compute backend failed */
    PD_ERANGE = -9,   /* output buffer too small / value out of range */
};

#if defined(__GNUC__) || defined(__clang__)
#define PD_NODISCARD    __attribute__((warn_unused_result))
#define PD_PRINTF(a, b) __attribute__((format(printf, a, b)))
#define PD_NORETURN     __attribute__((noreturn))
#else
#define PD_NODISCARD
#define PD_PRINTF(a, b)
#define PD_NORETURN
#endif

/* Name of a status code ("PD_EINVAL", ...); never NULL. */
const char *pd_strerror(pd_status st);

/* Logs "file:line: msg" at error level and aborts. For startup misconfiguration and broken invariants. */
PD_NORETURN void pd_fatal_at(const char *file, int line, const char *fmt, ...) PD_PRINTF(3, 4);
#define PD_FATAL(...) pd_fatal_at(__FILE__, __LINE__, __VA_ARGS__)

/* Stays on in release builds: invariants, never input validation. */
#define PD_ASSERT(cond)                                                    \
    do {                                                                   \
        if (!(cond)) pd_fatal_at(__FILE__, __LINE__, "assert: %s", #cond); \
    } while (0)

/* malloc/calloc/realloc that abort on failure: for small or startup allocations only. */
void *pd_xmalloc(size_t n_bytes);
void *pd_xcalloc(size_t n, size_t size);
void *pd_xrealloc(void *p, size_t n_bytes);
char *pd_xstrdup(const char *s);

/* Monotonic clock. */
uint64_t pd_now_us(void);

#endif
