/* pd_loop.c: a small event loop over zmq_poll (the stable API: zmq_poller is still a draft in libzmq 4.3) with
 * timers and a signal self-pipe. The watch list is rebuilt into a pollitem array per wait; services watch a
 * handful of sockets, so that costs nothing next to a forward step. Removals inside handlers are marked and
 * compacted after dispatch, so handlers may remove anything, themselves included. */
#define _GNU_SOURCE /* sigaction, pipe2 */
#include "pd_loop.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "pd_log.h"

typedef struct {
    void *socket; /* NULL for an fd */
    int fd;
    short events;
    pd_loop_fn fn;
    void *ud;
    bool is_removed;
} pd_watch_t;

typedef struct {
    int64_t id;
    uint64_t due_us;
    int64_t interval_ms;
    bool is_repeat, is_cancelled;
    pd_loop_fn fn;
    void *ud;
} pd_timer_t;

struct pd_loop {
    pd_watch_t *w;
    int n_w, cap_w;
    zmq_pollitem_t *items; /* (cap_w) rebuilt per wait */
    int *item_watch;       /* (cap_w) which watch each item is */
    pd_timer_t *t;
    int n_t, cap_t;
    int64_t next_timer_id;
    bool is_stopped;
    int sig_pipe[2]; /* -1 until pd_loop_catch_signals */
    pd_loop_fn sig_fn;
    void *sig_ud;
};

/* The one process-wide mutable global besides the logger: the write end of the signal self-pipe, which a
 * signal handler can reach only through a global. */
static volatile int s_sig_write_fd = -1;

pd_loop_t *pd_loop_create(void) {
    pd_loop_t *l = calloc(1, sizeof *l);
    if (!l) {
        LOG_E("pd_loop: out of memory");
        return NULL;
    }
    l->sig_pipe[0] = l->sig_pipe[1] = -1;
    l->next_timer_id = 1;
    return l;
}

void pd_loop_destroy(pd_loop_t **lp) {
    if (!lp || !*lp) return;
    pd_loop_t *l = *lp;
    if (l->sig_pipe[0] >= 0) {
        s_sig_write_fd = -1;
        signal(SIGTERM, SIG_DFL);
        signal(SIGINT, SIG_DFL);
        close(l->sig_pipe[0]);
        close(l->sig_pipe[1]);
    }
    free(l->w);
    free(l->items);
    free(l->item_watch);
    free(l->t);
    free(l);
    *lp = NULL;
}

static pd_watch_t *s_find(pd_loop_t *l, void *socket, int fd) {
    for (int i = 0; i < l->n_w; i++) {
        pd_watch_t *w = &l->w[i];
        if (w->is_removed) continue;
        if (socket ? w->socket == socket : (!w->socket && w->fd == fd)) return w;
    }
    return NULL;
}

static pd_status s_add(pd_loop_t *l, void *socket, int fd, short events, pd_loop_fn fn, void *ud) {
    if (!fn || (!socket && fd < 0) || s_find(l, socket, fd)) return PD_EINVAL;
    if (l->n_w == l->cap_w) {
        int cap = l->cap_w ? 2 * l->cap_w : 16;
        pd_watch_t *w = realloc(l->w, (size_t)cap * sizeof *w);
        if (w) l->w = w;
        zmq_pollitem_t *it = realloc(l->items, (size_t)cap * sizeof *it);
        if (it) l->items = it;
        int *iw = realloc(l->item_watch, (size_t)cap * sizeof *iw);
        if (iw) l->item_watch = iw;
        if (!w || !it || !iw) return PD_ENOMEM;
        l->cap_w = cap;
    }
    l->w[l->n_w++] = (pd_watch_t){.socket = socket, .fd = fd, .events = events, .fn = fn, .ud = ud};
    return PD_OK;
}

pd_status pd_loop_add_socket(pd_loop_t *l, void *socket, pd_loop_fn fn, void *ud) {
    if (!socket) return PD_EINVAL;
    return s_add(l, socket, -1, ZMQ_POLLIN, fn, ud);
}

pd_status pd_loop_add_fd(pd_loop_t *l, int fd, short events, pd_loop_fn fn, void *ud) {
    if (fd < 0) return PD_EINVAL;
    return s_add(l, NULL, fd, events, fn, ud);
}

pd_status pd_loop_modify_fd(pd_loop_t *l, int fd, short events) {
    pd_watch_t *w = s_find(l, NULL, fd);
    if (!w) return PD_EINVAL;
    w->events = events;
    return PD_OK;
}

void pd_loop_remove_socket(pd_loop_t *l, void *socket) {
    pd_watch_t *w = socket ? s_find(l, socket, -1) : NULL;
    if (w) w->is_removed = true;
}

void pd_loop_remove_fd(pd_loop_t *l, int fd) {
    pd_watch_t *w = s_find(l, NULL, fd);
    if (w) w->is_removed = true;
}

int64_t pd_loop_add_timer(pd_loop_t *l, int64_t interval_ms, bool is_repeat, pd_loop_fn fn, void *ud) {
    if (!fn || interval_ms < 0) return PD_EINVAL;
    if (l->n_t == l->cap_t) {
        int cap = l->cap_t ? 2 * l->cap_t : 16;
        pd_timer_t *t = realloc(l->t, (size_t)cap * sizeof *t);
        if (!t) return PD_ENOMEM;
        l->t = t;
        l->cap_t = cap;
    }
    int64_t id = l->next_timer_id++;
    l->t[l->n_t++] = (pd_timer_t){.id = id,
                                  .due_us = pd_now_us() + (uint64_t)interval_ms * 1000u,
                                  .interval_ms = interval_ms,
                                  .is_repeat = is_repeat,
                                  .fn = fn,
                                  .ud = ud};
    return id;
}

void pd_loop_cancel_timer(pd_loop_t *l, int64_t id) {
    for (int i = 0; i < l->n_t; i++)
        if (l->t[i].id == id) l->t[i].is_cancelled = true;
}

void pd_loop_stop(pd_loop_t *l) {
    l->is_stopped = true;
}

static void s_compact(pd_loop_t *l) {
    int n = 0;
    for (int i = 0; i < l->n_w; i++)
        if (!l->w[i].is_removed) l->w[n++] = l->w[i];
    l->n_w = n;
    n = 0;
    for (int i = 0; i < l->n_t; i++)
        if (!l->t[i].is_cancelled) l->t[n++] = l->t[i];
    l->n_t = n;
}

/* A callback that holds the loop this long delays every other socket and timer on it: say so, with its
 * address (addr2line -f -e BINARY turns it into a name), so a stalled loop is found, not guessed at. */
#define S_SLOW_CALLBACK_US 500000u

static void s_check_slow(const char *kind, pd_loop_fn fn, uint64_t t0) {
    uint64_t took = pd_now_us() - t0;
    if (took >= S_SLOW_CALLBACK_US)
        LOG_W("pd_loop: a %s callback (%#llx) held the loop for %llu ms", kind, (unsigned long long)(uintptr_t)fn,
              (unsigned long long)(took / 1000u));
}

/* Fires the timers due at now; a handler may add or cancel timers (added ones wait for the next pass). */
static void s_fire_timers(pd_loop_t *l) {
    uint64_t now = pd_now_us();
    int n = l->n_t;
    for (int i = 0; i < n && !l->is_stopped; i++) {
        pd_timer_t *t = &l->t[i];
        if (t->is_cancelled || t->due_us > now) continue;
        if (t->is_repeat) {
            t->due_us = now + (uint64_t)t->interval_ms * 1000u;
        } else {
            t->is_cancelled = true;
        }
        pd_loop_fn fn = t->fn;
        void *ud = t->ud;
        uint64_t t0 = pd_now_us();
        fn(l, ud); /* may realloc l->t: do not touch t after this */
        s_check_slow("timer", fn, t0);
    }
}

pd_status pd_loop_run_once(pd_loop_t *l, int timeout_ms) {
    s_compact(l);
    long wait_ms = timeout_ms < 0 ? -1 : timeout_ms;
    uint64_t now = pd_now_us();
    for (int i = 0; i < l->n_t; i++) {
        long due_ms = l->t[i].due_us <= now ? 0 : (long)((l->t[i].due_us - now + 999) / 1000);
        if (wait_ms < 0 || due_ms < wait_ms) wait_ms = due_ms;
    }
    int n_items = 0;
    for (int i = 0; i < l->n_w; i++) {
        pd_watch_t *w = &l->w[i];
        l->items[n_items] = (zmq_pollitem_t){.socket = w->socket, .fd = w->fd, .events = w->events};
        l->item_watch[n_items++] = i;
    }
    int rc = zmq_poll(l->items, n_items, wait_ms);
    if (rc < 0 && zmq_errno() != EINTR) {
        LOG_E("pd_loop: zmq_poll: %s", zmq_strerror(zmq_errno()));
        return PD_EIO;
    }
    for (int k = 0; rc > 0 && k < n_items && !l->is_stopped; k++) {
        if (!l->items[k].revents) continue;
        pd_watch_t *w = &l->w[l->item_watch[k]];
        if (w->is_removed) continue;
        pd_loop_fn fn = w->fn;
        uint64_t t0 = pd_now_us();
        fn(l, w->ud); /* may add watches (realloc): re-read through l->w next time */
        s_check_slow("socket", fn, t0);
    }
    if (!l->is_stopped) s_fire_timers(l);
    return PD_OK;
}

pd_status pd_loop_run(pd_loop_t *l) {
    l->is_stopped = false;
    while (!l->is_stopped) {
        pd_status st = pd_loop_run_once(l, -1);
        if (st != PD_OK) return st;
    }
    return PD_OK;
}

static void s_on_signal(int sig) {
    int saved = errno;
    unsigned char b = (unsigned char)sig;
    if (s_sig_write_fd >= 0) {
        ssize_t r = write(s_sig_write_fd, &b, 1); /* full pipe: a signal is already pending */
        (void)r;
    }
    errno = saved;
}

static void s_on_sig_pipe(pd_loop_t *l, void *ud) {
    (void)ud;
    unsigned char buf[64];
    bool got = false;
    while (read(l->sig_pipe[0], buf, sizeof buf) > 0) got = true;
    if (got && l->sig_fn) l->sig_fn(l, l->sig_ud);
}

pd_status pd_loop_catch_signals(pd_loop_t *l, pd_loop_fn fn, void *ud) {
    if (!fn || l->sig_pipe[0] >= 0 || s_sig_write_fd >= 0) return PD_EINVAL;
    if (pipe(l->sig_pipe) != 0) return PD_EIO;
    for (int i = 0; i < 2; i++) {
        fcntl(l->sig_pipe[i], F_SETFL, fcntl(l->sig_pipe[i], F_GETFL) | O_NONBLOCK);
        fcntl(l->sig_pipe[i], F_SETFD, FD_CLOEXEC);
    }
    l->sig_fn = fn;
    l->sig_ud = ud;
    s_sig_write_fd = l->sig_pipe[1];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = s_on_signal;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    return pd_loop_add_fd(l, l->sig_pipe[0], ZMQ_POLLIN, s_on_sig_pipe, NULL);
}
