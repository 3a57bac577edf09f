/* test_pd_loop.c: the services' event loop: sockets, fds, timers (one-shot, repeating, cancelled inside a
 * handler), removal of a watch from inside its own handler, stop, and SIGTERM delivered through the self-pipe. */
#define _GNU_SOURCE /* kill */
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "pd_loop.h"
#include "pd_test.h"

typedef struct {
    int n_sock, n_fd, n_once, n_rep, n_sig;
    void *sock;
    int fd;
    int64_t rep_id;
    pd_loop_t *l;
} ctx_t;

static void on_sock(pd_loop_t *l, void *ud) {
    (void)l;
    ctx_t *c = ud;
    char buf[16];
    while (zmq_recv(c->sock, buf, sizeof buf, ZMQ_DONTWAIT) >= 0) c->n_sock++;
}

static void on_fd(pd_loop_t *l, void *ud) {
    ctx_t *c = ud;
    char b;
    if (read(c->fd, &b, 1) == 1) c->n_fd++;
    pd_loop_remove_fd(l, c->fd); /* removing itself from inside its handler */
}

static void on_once(pd_loop_t *l, void *ud) {
    (void)l;
    ((ctx_t *)ud)->n_once++;
}

static void on_rep(pd_loop_t *l, void *ud) {
    ctx_t *c = ud;
    if (++c->n_rep == 3) pd_loop_cancel_timer(l, c->rep_id);
}

static void on_stop(pd_loop_t *l, void *ud) {
    (void)ud;
    pd_loop_stop(l);
}

static void on_sig(pd_loop_t *l, void *ud) {
    ((ctx_t *)ud)->n_sig++;
    pd_loop_stop(l);
}

static void test_sockets_fds_timers(void) {
    ctx_t c = {0};
    pd_loop_t *l = pd_loop_create();
    REQUIRE(l);
    void *zctx = zmq_ctx_new();
    void *a = zmq_socket(zctx, ZMQ_PAIR), *b = zmq_socket(zctx, ZMQ_PAIR);
    REQUIRE(zmq_bind(a, "inproc://pd-loop-test") == 0 && zmq_connect(b, "inproc://pd-loop-test") == 0);
    c.sock = a;
    int p[2];
    REQUIRE(pipe(p) == 0);
    c.fd = p[0];
    CHECK_EQ_INT(pd_loop_add_socket(l, a, on_sock, &c), PD_OK);
    CHECK_EQ_INT(pd_loop_add_socket(l, a, on_sock, &c), PD_EINVAL); /* watched twice */
    CHECK_EQ_INT(pd_loop_add_fd(l, p[0], ZMQ_POLLIN, on_fd, &c), PD_OK);
    CHECK(pd_loop_add_timer(l, 5, false, on_once, &c) > 0);
    c.rep_id = pd_loop_add_timer(l, 2, true, on_rep, &c);
    CHECK(c.rep_id > 0);
    CHECK(pd_loop_add_timer(l, 60, false, on_stop, &c) > 0);
    zmq_send(b, "x", 1, 0);
    zmq_send(b, "y", 1, 0);
    CHECK(write(p[1], "ab", 2) == 2);
    uint64_t t0 = pd_now_us();
    CHECK_EQ_INT(pd_loop_run(l), PD_OK);
    uint64_t ms = (pd_now_us() - t0) / 1000;
    CHECK(ms >= 59 && ms < 1000);
    CHECK_EQ_INT(c.n_sock, 2);
    CHECK_EQ_INT(c.n_fd, 1); /* removed after the first byte: the second never reaches the handler */
    CHECK_EQ_INT(c.n_once, 1);
    CHECK_EQ_INT(c.n_rep, 3); /* cancelled from inside its third run */
    close(p[0]);
    close(p[1]);
    zmq_close(a);
    zmq_close(b);
    zmq_ctx_term(zctx);
    pd_loop_destroy(&l);
    CHECK(l == NULL);
    pd_loop_destroy(&l); /* NULL is fine */
}

static void test_signal(void) {
    ctx_t c = {0};
    pd_loop_t *l = pd_loop_create();
    REQUIRE(l);
    CHECK_EQ_INT(pd_loop_catch_signals(l, on_sig, &c), PD_OK);
    CHECK_EQ_INT(pd_loop_catch_signals(l, on_sig, &c), PD_EINVAL); /* one catcher per process */
    CHECK(pd_loop_add_timer(l, 2000, false, on_stop, &c) > 0);     /* safety net */
    kill(getpid(), SIGTERM);
    uint64_t t0 = pd_now_us();
    CHECK_EQ_INT(pd_loop_run(l), PD_OK);
    CHECK((pd_now_us() - t0) / 1000 < 1000); /* the signal stopped it, not the safety net */
    CHECK_EQ_INT(c.n_sig, 1);
    pd_loop_destroy(&l);
}

int main(void) {
    PD_TEST_RUN(test_sockets_fds_timers);
    PD_TEST_RUN(test_signal);
    return pd_test_finish();
}
