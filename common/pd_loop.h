/* pd_loop.h: the one event loop of a service (STYLE §6): ZeroMQ sockets and plain fds (the HTTP server's
 * epoll fd, the engine thread's completion fd, the signal pipe) in one zmq_poll set, plus timers. Handlers run
 * on the loop thread, one at a time, and must not block. Does not own the sockets or fds it watches.
 * Thread: everything is called from the thread that runs the loop (the creator), except pd_loop_stop from a
 * signal handler through pd_loop_catch_signals. */
#ifndef PD_LOOP_H
#define PD_LOOP_H

#include <stdbool.h>
#include <stdint.h>

#include "pd_common.h"

typedef struct pd_loop pd_loop_t;

/* Called when a watched socket / fd is ready, or a timer fires. */
typedef void (*pd_loop_fn)(pd_loop_t *l, void *ud);

/* NULL when the poller cannot be created (logged). */
pd_loop_t *pd_loop_create(void);
/* Frees the loop (not the sockets or fds it watched); accepts NULL; sets *l to NULL. */
void pd_loop_destroy(pd_loop_t **l);

/* Watches a ZeroMQ socket for input: fn runs while ZMQ_POLLIN holds at a wait. Drain the socket in fn
 * (ZeroMQ's readiness is edge-like: read until EAGAIN). PD_OK, PD_EINVAL (already watched). */
PD_NODISCARD pd_status pd_loop_add_socket(pd_loop_t *l, void *socket, pd_loop_fn fn, void *ud);
/* Watches an fd; events is a mask of ZMQ_POLLIN / ZMQ_POLLOUT. */
PD_NODISCARD pd_status pd_loop_add_fd(pd_loop_t *l, int fd, short events, pd_loop_fn fn, void *ud);
PD_NODISCARD pd_status pd_loop_modify_fd(pd_loop_t *l, int fd, short events);
/* Stop watching (safe from inside a handler, for any socket / fd including its own). */
void pd_loop_remove_socket(pd_loop_t *l, void *socket);
void pd_loop_remove_fd(pd_loop_t *l, int fd);

/* A timer that fires after interval_ms and then every interval_ms (is_repeat) or once. Returns its id (> 0),
 * or a negative status. Resolution ~1 ms; a late loop fires a repeating timer once, not once per period missed. */
int64_t pd_loop_add_timer(pd_loop_t *l, int64_t interval_ms, bool is_repeat, pd_loop_fn fn, void *ud);
/* Cancels a timer (unknown or fired one-shot ids are ignored; safe inside handlers). */
void pd_loop_cancel_timer(pd_loop_t *l, int64_t id);

/* Runs handlers until pd_loop_stop. PD_OK after a stop; PD_EIO if the poller fails. */
PD_NODISCARD pd_status pd_loop_run(pd_loop_t *l);
/* Makes pd_loop_run return after the current handler. */
void pd_loop_stop(pd_loop_t *l);
/* One pass: waits at most timeout_ms (0: only what is ready) and runs what is ready and due. For tests and
 * for callers with their own outer loop. PD_OK or PD_EIO. */
PD_NODISCARD pd_status pd_loop_run_once(pd_loop_t *l, int timeout_ms);

/* SIGTERM and SIGINT call fn on the loop thread (through a self-pipe; the default action is replaced).
 * A service drains in fn (not ready, finish in-flight work) and calls pd_loop_stop when done; a second
 * signal is delivered to fn again. SIGPIPE is ignored. One loop per process may catch signals. */
PD_NODISCARD pd_status pd_loop_catch_signals(pd_loop_t *l, pd_loop_fn fn, void *ud);

#endif
