/* pd_common.c: status names, fatal errors, allocation helpers, clock and the logger. */
#define _GNU_SOURCE
#include "pd_common.h"
#include "pd_log.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

const char *pd_strerror(pd_status st) {
    switch (st) {
    case PD_OK: return "PD_OK";
    case PD_EINVAL: return "PD_EINVAL";
    case PD_ENOMEM: return "PD_ENOMEM";
    case PD_EAGAIN: return "PD_EAGAIN";
    case PD_ETIMEDOUT: return "PD_ETIMEDOUT";
    case PD_ECLOSED: return "PD_ECLOSED";
    case PD_EPROTO: return "PD_EPROTO";
    case PD_EIO: return "PD_EIO";
    case PD_EBACKEND: return "PD_EBACKEND";
    case PD_ERANGE: return "PD_ERANGE";
    default: return "PD_E?";
    }
}

static char s_service[32] = "pd";
static pd_log_level_t s_level = PD_LOG_INFO;

void pd_log_init(const char *service, pd_log_level_t level) {
    snprintf(s_service, sizeof s_service, "%s", service ? service : "pd");
    s_level = level;
}

void pd_log_set_level(pd_log_level_t level) {
    s_level = level;
}

static void s_log_v(pd_log_level_t level, const char *file, int line, const char *fmt, va_list ap) {
    static const char *names[] = {"E", "W", "I", "D"};
    char msg[1024];
    vsnprintf(msg, sizeof msg, fmt, ap);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    const char *base = strrchr(file, '/');
    fprintf(stderr, "%02d:%02d:%02d.%03ld %s %s[%d:%ld] %s:%d %s\n", tm.tm_hour, tm.tm_min, tm.tm_sec,
            ts.tv_nsec / 1000000, names[level], s_service, (int)getpid(), (long)syscall(SYS_gettid),
            base ? base + 1 : file, line, msg);
}

void pd_log_at(pd_log_level_t level, const char *file, int line, const char *fmt, ...) {
    if (level > s_level) return;
    va_list ap;
    va_start(ap, fmt);
    s_log_v(level, file, line, fmt, ap);
    va_end(ap);
}

void pd_fatal_at(const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    s_log_v(PD_LOG_ERROR, file, line, fmt, ap);
    va_end(ap);
    abort();
}

void *pd_xmalloc(size_t n_bytes) {
    void *p = malloc(n_bytes ? n_bytes : 1);
    if (!p) PD_FATAL("out of memory allocating %zu bytes", n_bytes);
    return p;
}

void *pd_xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) PD_FATAL("out of memory allocating %zu x %zu bytes", n, size);
    return p;
}

void *pd_xrealloc(void *p, size_t n_bytes) {
    void *q = realloc(p, n_bytes ? n_bytes : 1);
    if (!q) PD_FATAL("out of memory reallocating %zu bytes", n_bytes);
    return q;
}

char *pd_xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = pd_xmalloc(n);
    memcpy(d, s, n);
    return d;
}

uint64_t pd_now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
