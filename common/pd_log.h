/* pd_log.h: the one logger. Lines are "time level service[pid:tid] file:line msg" on stderr.
 * The logger is one of the two allowed mutable globals (set once at startup by main). */
#ifndef PD_LOG_H
#define PD_LOG_H

#include "pd_common.h"

typedef enum { PD_LOG_ERROR = 0, PD_LOG_WARN = 1, PD_LOG_INFO = 2, PD_LOG_DEBUG = 3 } pd_log_level_t;

/* Sets the service name printed on each line and the most verbose level printed. Call once from main. */
void pd_log_init(const char *service, pd_log_level_t level);
void pd_log_set_level(pd_log_level_t level);
void pd_log_at(pd_log_level_t level, const char *file, int line, const char *fmt, ...) PD_PRINTF(4, 5);

#define LOG_E(...) pd_log_at(PD_LOG_ERROR, __FILE__, __LINE__, __VA_ARGS__)
#define LOG_W(...) pd_log_at(PD_LOG_WARN, __FILE__, __LINE__, __VA_ARGS__)
#define LOG_I(...) pd_log_at(PD_LOG_INFO, __FILE__, __LINE__, __VA_ARGS__)
#ifdef PD_LOG_DEBUG_ON
#define LOG_D(...) pd_log_at(PD_LOG_DEBUG, __FILE__, __LINE__, __VA_ARGS__)
#else
#define LOG_D(...) ((void)0)
#endif

#endif
