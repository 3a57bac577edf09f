/* test_kvt_faults.c: fault tests of the KV hand-off with real processes (tests/integration/kvt_peer.c, one
 * process per party, ipc:// in a temp dir and tcp://127.0.0.1). Kills the sender after each protocol step,
 * then the receiver likewise, corrupts or drops a frame in flight, connects with a wrong fingerprint or
 * protocol version and sends stale epochs. Each scenario must end with the documented error within a bounded
 * time (a hang detector, not a performance assertion) and with the receiver's block counters back to zero.
 * Every wait has a deadline; stragglers are SIGKILLed, so the test itself never hangs. */
#define _POSIX_C_SOURCE 200809L /* kill, nanosleep, mkdtemp */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "pd_common.h"
#include "pd_test.h"

#ifndef KVT_PEER_PATH
#error "KVT_PEER_PATH: path of the kvt_peer binary (tests/CMakeLists.txt sets it)"
#endif

enum {
    TF_TIMEOUT_MS = 600,        /* a transfer's timeout (the receiver frees its blocks after it) */
    TF_REPLY_MS = 400,          /* the sender's reply and handshake timeouts */
    TF_SLACK_MS = 5000,         /* on top of a timeout: a loaded 2-core machine, not a performance bound */
    TF_SCENARIO_MS = 20000,     /* everything of one scenario; past it the test calls it a hang */
    TF_MAX_LINES = 256,         /* kept per child */
    TF_MAX_ARGS = 40,           /* per command line */
    TF_TX_BYTES_2 = 327680,     /* payload of transfers 1 and 2 (3 + 2 blocks, 4 layers, K and V, 8 KiB chunks) */
    TF_TX_BYTES_STALE = 196608, /* the rogue's one transfer: 3 blocks */
};

typedef struct {
    char *text;
    uint64_t t_us;
} tline_t;

typedef struct {
    char name[16];
    pid_t pid; /* 0: not started */
    int fd;    /* its stdout+stderr, -1 once closed */
    bool has_exited;
    int wstatus;
    uint64_t start_us, exit_us;
    char part[2048]; /* the line being read */
    size_t part_len;
    tline_t lines[TF_MAX_LINES];
    int n_lines;
} child_t;

typedef struct {
    char *argv[TF_MAX_ARGS + 1];
    char store[TF_MAX_ARGS][256];
    int n;
} targs_t;

/* A scenario: receiver, sender, second sender and an auxiliary (proxy or rogue) process. */
typedef struct {
    child_t rx, tx, tx2, aux;
    char ep[256]; /* the receiver's bound endpoint */
} scen_t;

static char g_dir[64];
static int g_n_ep;

static void a_add(targs_t *a, const char *fmt, ...) PD_PRINTF(2, 3);
static void a_add(targs_t *a, const char *fmt, ...) {
    PD_ASSERT(a->n < TF_MAX_ARGS);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(a->store[a->n], sizeof a->store[a->n], fmt, ap);
    va_end(ap);
    a->argv[a->n] = a->store[a->n];
    a->argv[++a->n] = NULL;
}

static void s_sleep_ms(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- children ---- */

static bool s_spawn(child_t *c, const char *name, targs_t *a) {
    memset(c, 0, sizeof *c);
    snprintf(c->name, sizeof c->name, "%s", name);
    c->fd = -1;
    int p[2];
    if (pipe(p) != 0) return false;
    fcntl(p[0], F_SETFD, FD_CLOEXEC); /* later children must not hold this one's pipe open */
    pid_t pid = fork();
    if (pid < 0) {
        close(p[0]);
        close(p[1]);
        return false;
    }
    if (pid == 0) {
        dup2(p[1], 1);
        dup2(p[1], 2);
        close(p[0]);
        close(p[1]);
        execv(KVT_PEER_PATH, a->argv);
        _exit(127);
    }
    close(p[1]);
    fcntl(p[0], F_SETFL, O_NONBLOCK);
    c->pid = pid;
    c->fd = p[0];
    c->start_us = pd_now_us();
    return true;
}

static void s_take_line(child_t *c, uint64_t now) {
    c->part[c->part_len] = '\0';
    if (c->n_lines < TF_MAX_LINES) {
        c->lines[c->n_lines].text = pd_xstrdup(c->part);
        c->lines[c->n_lines].t_us = now;
        c->n_lines++;
    }
    c->part_len = 0;
}

static void s_read(child_t *c, uint64_t now) {
    char buf[4096];
    for (;;) {
        ssize_t n = read(c->fd, buf, sizeof buf);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return; /* EAGAIN */
        if (n == 0) {
            if (c->part_len) s_take_line(c, now);
            close(c->fd);
            c->fd = -1;
            return;
        }
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n' || c->part_len + 1 >= sizeof c->part)
                s_take_line(c, now);
            else
                c->part[c->part_len++] = buf[i];
        }
    }
}

/* Reads what the children printed (waiting up to ms) and reaps those that exited. */
static void s_pump(scen_t *s, int ms) {
    child_t *cs[4] = {&s->rx, &s->tx, &s->tx2, &s->aux};
    struct pollfd pf[4];
    int map[4], k = 0;
    for (int i = 0; i < 4; i++)
        if (cs[i]->pid && cs[i]->fd >= 0) pf[k] = (struct pollfd){.fd = cs[i]->fd, .events = POLLIN}, map[k++] = i;
    if (k > 0)
        poll(pf, (nfds_t)k, ms);
    else
        s_sleep_ms(ms);
    uint64_t now = pd_now_us();
    for (int j = 0; j < k; j++)
        if (pf[j].revents) s_read(cs[map[j]], now);
    for (int i = 0; i < 4; i++) {
        child_t *c = cs[i];
        if (c->pid && !c->has_exited && waitpid(c->pid, &c->wstatus, WNOHANG) == c->pid)
            c->has_exited = true, c->exit_us = now;
    }
}

static bool s_alive(const child_t *c) {
    return c->pid && !c->has_exited;
}

/* Ends every child still running with SIGKILL (reporting a hang), drains their output, frees it all. */
static void s_finish(scen_t *s, const char *label) {
    child_t *cs[4] = {&s->rx, &s->tx, &s->tx2, &s->aux};
    for (int i = 0; i < 4; i++) {
        child_t *c = cs[i];
        if (!s_alive(c)) continue;
        CHECK_MSG(0, "%s: %s (pid %d) still running: hang, killed", label, c->name, (int)c->pid);
        kill(c->pid, SIGKILL);
        waitpid(c->pid, &c->wstatus, 0);
        c->has_exited = true;
        c->exit_us = pd_now_us();
    }
    for (int i = 0; i < 4; i++)
        while (cs[i]->pid && cs[i]->fd >= 0) s_read(cs[i], pd_now_us()); /* the writers are gone: ends at EOF */
    if (pd_test_cur_failed) { /* the logs of a failed scenario, times from the first start */
        uint64_t t0 = UINT64_MAX;
        for (int i = 0; i < 4; i++)
            if (cs[i]->pid && cs[i]->start_us < t0) t0 = cs[i]->start_us;
        fprintf(stderr, "---- %s: output of the peers\n", label);
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < cs[i]->n_lines; j++)
                fprintf(stderr, "  %-4s %6.3f %s\n", cs[i]->name, (double)(cs[i]->lines[j].t_us - t0) / 1e6,
                        cs[i]->lines[j].text);
    }
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < cs[i]->n_lines; j++) free(cs[i]->lines[j].text);
    char path[300];
    for (int i = 0; i < g_n_ep; i++) { /* libzmq leaves the socket files of killed binders behind */
        snprintf(path, sizeof path, "%s/ep%d", g_dir, i);
        unlink(path);
        snprintf(path, sizeof path, "%s/px%d", g_dir, i);
        unlink(path);
    }
}

/* ---- output ---- */

/* The first line of c that starts with prefix and contains every non-NULL needle. */
static const tline_t *s_line(const child_t *c, const char *prefix, const char *needle1, const char *needle2) {
    for (int i = 0; i < c->n_lines; i++) {
        const char *t = c->lines[i].text;
        if (strncmp(t, prefix, strlen(prefix)) == 0 && (!needle1 || strstr(t, needle1)) &&
            (!needle2 || strstr(t, needle2)))
            return &c->lines[i];
    }
    return NULL;
}

static int s_count(const child_t *c, const char *prefix, const char *needle1, const char *needle2) {
    int n = 0;
    for (int i = 0; i < c->n_lines; i++) {
        const char *t = c->lines[i].text;
        n += strncmp(t, prefix, strlen(prefix)) == 0 && (!needle1 || strstr(t, needle1)) &&
             (!needle2 || strstr(t, needle2));
    }
    return n;
}

/* The latest arrival time of the matching lines (0: none). */
static uint64_t s_last_t(const child_t *c, const char *prefix, const char *needle1, const char *needle2) {
    uint64_t t = 0;
    for (int i = 0; i < c->n_lines; i++) {
        const char *x = c->lines[i].text;
        if (strncmp(x, prefix, strlen(prefix)) == 0 && (!needle1 || strstr(x, needle1)) &&
            (!needle2 || strstr(x, needle2)))
            t = c->lines[i].t_us;
    }
    return t;
}

/* The integer after " key=" in the first line starting with prefix; LLONG_MIN if absent. */
static long long s_field(const child_t *c, const char *prefix, const char *key) {
    const tline_t *l = s_line(c, prefix, NULL, NULL);
    char pat[64];
    snprintf(pat, sizeof pat, " %s=", key);
    const char *p = l ? strstr(l->text, pat) : NULL;
    return p ? atoll(p + strlen(pat)) : LLONG_MIN;
}

static bool s_wait_line(scen_t *s, const child_t *c, const char *prefix, int ms) {
    uint64_t end = pd_now_us() + (uint64_t)ms * 1000u;
    while (!s_line(c, prefix, NULL, NULL) && (s_alive(c) || c->fd >= 0) && pd_now_us() < end) s_pump(s, 10);
    return s_line(c, prefix, NULL, NULL) != NULL;
}

/* Pumps until every child exited. Once the senders and rogue are gone, the receiver gets SIGTERM after
 * settle_ms (it reports and exits; with --expect it usually exits by itself first), then the proxy. */
static void s_run(scen_t *s, int settle_ms) {
    uint64_t end = s->rx.start_us + (uint64_t)TF_SCENARIO_MS * 1000u;
    bool rx_termed = false, aux_termed = false;
    child_t *senders[3] = {&s->tx, &s->tx2, &s->aux};
    while (pd_now_us() < end && (s_alive(&s->rx) || s_alive(&s->tx) || s_alive(&s->tx2) || s_alive(&s->aux))) {
        s_pump(s, 10);
        uint64_t last = 0;
        bool busy = false;
        for (int i = 0; i < 3; i++) {
            bool is_proxy = i == 2 && s_line(senders[i], "READY", NULL, NULL); /* the rogue prints none */
            if (is_proxy) continue;
            busy = busy || s_alive(senders[i]);
            if (senders[i]->exit_us > last) last = senders[i]->exit_us;
        }
        if (!busy && !rx_termed && s_alive(&s->rx) && pd_now_us() > last + (uint64_t)settle_ms * 1000u)
            kill(s->rx.pid, SIGTERM), rx_termed = true;
        if (!busy && !s_alive(&s->rx) && !aux_termed && s_alive(&s->aux)) kill(s->aux.pid, SIGTERM), aux_termed = true;
    }
}

/* ---- command lines ---- */

/* A fresh ipc:// endpoint in the test's temp dir (kind "ep" for receivers, "px" for proxies). */
static void s_new_ep(char *ep, size_t cap, const char *kind) {
    snprintf(ep, cap, "ipc://%s/%s%d", g_dir, kind, g_n_ep++);
}

static void s_rx_args(targs_t *a, const char *ep, int expect) {
    a->n = 0;
    a_add(a, "%s", KVT_PEER_PATH);
    a_add(a, "--role"), a_add(a, "receiver");
    a_add(a, "--endpoint"), a_add(a, "%s", ep);
    a_add(a, "--expect"), a_add(a, "%d", expect);
    a_add(a, "--hello-ms"), a_add(a, "60"); /* step 2 inside the sender's 150 ms before its first start */
    a_add(a, "--run-ms"), a_add(a, "%d", TF_SCENARIO_MS - 2000);
}

static void s_tx_args(targs_t *a, const char *ep) {
    a->n = 0;
    a_add(a, "%s", KVT_PEER_PATH);
    a_add(a, "--role"), a_add(a, "sender");
    a_add(a, "--endpoint"), a_add(a, "%s", ep);
    a_add(a, "--timeout-ms"), a_add(a, "%d", TF_TIMEOUT_MS);
    a_add(a, "--reply-timeout-ms"), a_add(a, "%d", TF_REPLY_MS);
    a_add(a, "--handshake-timeout-ms"), a_add(a, "%d", TF_REPLY_MS);
    a_add(a, "--run-ms"), a_add(a, "%d", TF_SCENARIO_MS - 4000);
}

/* Starts the receiver and waits for its READY line (its bound endpoint goes to s->ep). */
static bool s_start_rx(scen_t *s, targs_t *a) {
    if (!s_spawn(&s->rx, "rx", a)) return false;
    if (!s_wait_line(s, &s->rx, "READY ", 5000)) return false;
    snprintf(s->ep, sizeof s->ep, "%s", s_line(&s->rx, "READY ", NULL, NULL)->text + 6);
    return true;
}

/* ---- checks ---- */

/* The receiver ended its run with nothing reserved (kvt's counters and the store's) and no double release. */
static void s_check_rx_clean(const char *label, const child_t *rx) {
    CHECK_MSG(rx->has_exited && WIFEXITED(rx->wstatus) && WEXITSTATUS(rx->wstatus) == 0, "%s: receiver exit", label);
    CHECK_MSG(s_field(rx, "STATS", "active") == 0, "%s: receiver active_transfers", label);
    CHECK_MSG(s_field(rx, "STATS", "reserved") == 0, "%s: receiver reserved_blocks", label);
    CHECK_MSG(s_field(rx, "STATS", "store_reserved") == 0, "%s: receiver store blocks still reserved", label);
    CHECK_MSG(s_field(rx, "FINAL", "store_reserved") == 0, "%s: store blocks after destroy", label);
    CHECK_MSG(s_field(rx, "FINAL", "bad_release") == 0, "%s: a block was released twice", label);
}

/* The sender ended its run with every transfer released (nothing pinned) and exited normally. */
static void s_check_tx_clean(const char *label, const child_t *tx) {
    CHECK_MSG(tx->has_exited && WIFEXITED(tx->wstatus) && WEXITSTATUS(tx->wstatus) == 0, "%s: %s exit", label,
              tx->name);
    CHECK_MSG(s_field(tx, "STATS", "active") == 0, "%s: %s active transfers", label, tx->name);
    CHECK_MSG(s_field(tx, "STATS", "pinned") == 0, "%s: %s blocks still pinned", label, tx->name);
}

static void s_check_killed(const char *label, const child_t *c, int step) {
    char die[32];
    snprintf(die, sizeof die, "DIE %d", step);
    CHECK_MSG(s_line(c, die, NULL, NULL) != NULL, "%s: %s never reached step %d", label, c->name, step);
    CHECK_MSG(c->has_exited && WIFSIGNALED(c->wstatus) && WTERMSIG(c->wstatus) == SIGKILL, "%s: %s not killed", label,
              c->name);
}

static char *s_tid(char *buf, size_t cap, long long id) {
    snprintf(buf, cap, " transfer=%lld ", id);
    return buf;
}

/* Transfer id ended at the receiver with COMMITTED and every byte as the sender's pattern. */
static void s_check_committed(const char *label, const child_t *rx, long long id) {
    char t[48], v[48];
    s_tid(t, sizeof t, id);
    snprintf(v, sizeof v, "VERIFY transfer=%lld ", id);
    CHECK_MSG(s_line(rx, "EV role=receiver kind=COMMITTED", t, NULL), "%s: transfer %lld not committed", label, id);
    CHECK_MSG(s_line(rx, v, "ok=1", NULL), "%s: transfer %lld: bytes differ", label, id);
}

static void s_check_done(const char *label, const child_t *tx, long long id, const char *status, const char *err) {
    char t[48];
    s_tid(t, sizeof t, id);
    const tline_t *l = s_line(tx, "EV role=sender kind=DONE", t, NULL);
    CHECK_MSG(l && strstr(l->text, status) && (!err || strstr(l->text, err)), "%s: %s transfer %lld: want DONE(%s%s%s)",
              label, tx->name, id, status, err ? ", " : "", err ? err : "");
    CHECK_MSG(s_line(tx, "EV role=sender kind=RELEASED", t, NULL), "%s: %s transfer %lld not released", label, tx->name,
              id);
}

static double s_sec(uint64_t a_us, uint64_t b_us) {
    return a_us > b_us ? (double)(a_us - b_us) / 1e6 : 0.0;
}

/* ---- scenarios ---- */

static void s_baseline(const char *label, const char *rx_ep, const char *tx_dtype) {
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, rx_ep, 3);
    a_add(&a, "--dtype"), a_add(&a, "f32");
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--n-transfers"), a_add(&a, "3");
    a_add(&a, "--dtype"), a_add(&a, "%s", tx_dtype);
    ok = ok && s_spawn(&s.tx, "tx", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, 2000);
    for (long long id = 1; id <= 3; id++) {
        s_check_committed(label, &s.rx, id);
        s_check_done(label, &s.tx, id, "status=PD_OK", NULL);
    }
    s_check_rx_clean(label, &s.rx);
    s_check_tx_clean(label, &s.tx);
    printf("%-28s 3 committed and verified in %.2f s\n", label, s_sec(s.tx.exit_us, s.tx.start_us));
    s_finish(&s, label);
}

static void test_baseline(void) {
    char ep[256];
    s_new_ep(ep, sizeof ep, "ep");
    s_baseline("baseline ipc f32->f32", ep, "f32");
    s_baseline("baseline tcp bf16->f32", "tcp://127.0.0.1:0", "bf16");
}

/* The sender SIGKILLs itself after step k; the receiver must time out what it reserved. */
static void s_sender_killed(int k, const char *rx_ep) {
    char label[64];
    snprintf(label, sizeof label, "sender killed after %d%s", k, strncmp(rx_ep, "tcp", 3) ? "" : " (tcp)");
    scen_t s = {0};
    targs_t a;
    bool reserved = k >= 3, committed = k >= 7;
    s_rx_args(&a, rx_ep, reserved ? 2 : 0);
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--die-after-step"), a_add(&a, "%d", k);
    ok = ok && s_spawn(&s.tx, "tx", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, TF_TIMEOUT_MS + 300);
    s_check_killed(label, &s.tx, k);
    const char *outcome = "nothing reserved, nothing to report";
    double dt = 0;
    if (!reserved) {
        CHECK_MSG(s_count(&s.rx, "EV ", NULL, NULL) == 0, "%s: receiver reported events", label);
        CHECK_MSG(s_field(&s.rx, "STATS", "started") == 0, "%s: receiver started a transfer", label);
    } else if (!committed) {
        outcome = "FAILED(PD_ETIMEDOUT) x2";
        CHECK_MSG(s_count(&s.rx, "EV role=receiver kind=FAILED", "status=PD_ETIMEDOUT", NULL) == 2,
                  "%s: want FAILED(PD_ETIMEDOUT) for both transfers", label);
        uint64_t t = s_last_t(&s.rx, "EV role=receiver kind=FAILED", NULL, NULL);
        dt = s_sec(t, s.tx.exit_us);
        CHECK_MSG(t && t < s.tx.exit_us + (uint64_t)(TF_TIMEOUT_MS + TF_SLACK_MS) * 1000u,
                  "%s: FAILED %.2f s after the sender died", label, dt);
        long long payload = s_field(&s.rx, "STATS", "payload");
        if (k <= 4) CHECK_MSG(payload == 0, "%s: payload %lld before any layer was ready", label, payload);
        if (k == 5) CHECK_MSG(payload > 0 && payload < TF_TX_BYTES_2, "%s: payload %lld", label, payload);
        if (k == 6) CHECK_MSG(payload == TF_TX_BYTES_2, "%s: payload %lld", label, payload);
    } else {
        outcome = "COMMITTED x2, verified";
        s_check_committed(label, &s.rx, 1);
        s_check_committed(label, &s.rx, 2);
    }
    s_check_rx_clean(label, &s.rx);
    printf("%-28s receiver: %s%s", label, outcome, dt > 0 ? "" : "\n");
    if (dt > 0) printf(", %.2f s after the kill\n", dt);
    s_finish(&s, label);
}

static void test_sender_killed(void) {
    for (int k = 1; k <= 8; k++) {
        char ep[256];
        s_new_ep(ep, sizeof ep, "ep");
        s_sender_killed(k, ep);
    }
    s_sender_killed(5, "tcp://127.0.0.1:0");
}

/* The receiver SIGKILLs itself after step k; the sender must end every transfer and unpin its blocks. */
static void s_receiver_killed(int k) {
    char label[64], ep[256];
    snprintf(label, sizeof label, "receiver killed after %d", k);
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 2);
    a_add(&a, "--die-after-step"), a_add(&a, "%d", k);
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    ok = ok && s_spawn(&s.tx, "tx", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, 300);
    s_check_killed(label, &s.rx, k);
    const char *want = k < 5 ? "status=PD_ETIMEDOUT" : "status=PD_OK";
    s_check_done(label, &s.tx, 1, want, NULL);
    s_check_done(label, &s.tx, 2, want, NULL);
    uint64_t t = s_last_t(&s.tx, "EV role=sender kind=DONE", NULL, NULL);
    CHECK_MSG(t && t < s.rx.exit_us + (uint64_t)(TF_TIMEOUT_MS + TF_SLACK_MS) * 1000u,
              "%s: DONE %.2f s after the receiver died", label, s_sec(t, s.rx.exit_us));
    s_check_tx_clean(label, &s.tx);
    if (t > s.rx.exit_us)
        printf("%-28s sender: DONE(%s) x2, %.2f s after the kill, blocks unpinned\n", label, want + 7,
               s_sec(t, s.rx.exit_us));
    else
        printf("%-28s sender: DONE(%s) x2 before the kill, blocks unpinned\n", label, want + 7);
    s_finish(&s, label);
}

static void test_receiver_killed(void) {
    for (int k = 1; k <= 5; k++) s_receiver_killed(k);
}

/* Two senders on one receiver; one dies mid-stream: only its transfers fail. */
static void test_two_senders_one_killed(void) {
    const char *label = "two senders, one killed";
    char ep[256];
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 4);
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--die-after-step"), a_add(&a, "5");
    ok = ok && s_spawn(&s.tx, "tx", &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--id-base"), a_add(&a, "10");
    ok = ok && s_spawn(&s.tx2, "tx2", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, 2000);
    s_check_killed(label, &s.tx, 5);
    for (long long id = 1; id <= 2; id++) {
        char t[48];
        CHECK_MSG(s_line(&s.rx, "EV role=receiver kind=FAILED", s_tid(t, sizeof t, id), "PD_ETIMEDOUT"),
                  "%s: transfer %lld", label, id);
    }
    for (long long id = 11; id <= 12; id++) {
        s_check_committed(label, &s.rx, id);
        s_check_done(label, &s.tx2, id, "status=PD_OK", NULL);
    }
    s_check_rx_clean(label, &s.rx);
    s_check_tx_clean(label, &s.tx2);
    printf("%-28s receiver: killed one's 2 FAILED(PD_ETIMEDOUT), other's 2 COMMITTED\n", label);
    s_finish(&s, label);
}

/* A sender whose fingerprint differs in one field: refused at the handshake, the field named, nothing
 * reserved. */
static void s_mismatch(const char *variant, const char *field) {
    char label[64], ep[256];
    snprintf(label, sizeof label, "fingerprint %s", variant);
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 0);
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--fingerprint-variant"), a_add(&a, "%s", variant);
    ok = ok && s_spawn(&s.tx, "tx", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, 200);
    const tline_t *l = s_line(&s.tx, "POLL rc=PD_EPROTO", field, NULL);
    CHECK_MSG(l != NULL, "%s: sender: want PD_EPROTO naming %s", label, field);
    CHECK_MSG(l && l->t_us < s.tx.start_us + (uint64_t)(TF_REPLY_MS + TF_SLACK_MS) * 1000u, "%s: late", label);
    /* each transfer is refused: at start (the refusal came first) or by DONE(PD_EPROTO) */
    int n =
        s_count(&s.tx, "START", "rc=PD_EPROTO", NULL) + s_count(&s.tx, "EV role=sender kind=DONE", "PD_EPROTO", NULL);
    CHECK_MSG(n == 2, "%s: %d of 2 transfers refused with PD_EPROTO", label, n);
    CHECK_MSG(s_field(&s.rx, "STATS", "started") == 0, "%s: receiver started a transfer", label);
    s_check_rx_clean(label, &s.rx);
    s_check_tx_clean(label, &s.tx);
    printf("%-28s sender: PD_EPROTO in %.2f s: %s\n", label, l ? s_sec(l->t_us, s.tx.start_us) : -1.0,
           l ? strstr(l->text, "err=") + 4 : "?");
    s_finish(&s, label);
}

static void test_fingerprint_mismatch(void) {
    s_mismatch("model", "model_id");
    s_mismatch("tokenizer", "tokenizer_hash");
    s_mismatch("layout", "n_kv_heads");
    s_mismatch("rope_theta", "rope_theta");
}

static void s_rogue(scen_t *s, const char *ep, const char *what) {
    targs_t a;
    a.n = 0;
    a_add(&a, "%s", KVT_PEER_PATH);
    a_add(&a, "--role"), a_add(&a, "rogue");
    a_add(&a, "--rogue"), a_add(&a, "%s", what);
    a_add(&a, "--endpoint"), a_add(&a, "%s", ep);
    a_add(&a, "--timeout-ms"), a_add(&a, "%d", TF_TIMEOUT_MS);
    CHECK(s_spawn(&s->aux, "rog", &a));
}

/* A hand-made hello of another protocol version: refused naming the field; later messages ignored. */
static void test_version_mismatch(void) {
    const char *label = "protocol version";
    char ep[256];
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 0);
    if (s_start_rx(&s, &a)) {
        s_rogue(&s, s.ep, "version");
        s_run(&s, 200);
    }
    const tline_t *l = s_line(&s.aux, "RAW hello code=9", "protocol_version", NULL);
    CHECK_MSG(l != NULL, "%s: want ERR_INCOMPATIBLE naming protocol_version", label);
    CHECK_MSG(s_line(&s.aux, "RAW reserve", "code=-1", NULL), "%s: a refused peer's reserve was answered", label);
    CHECK_MSG(s_field(&s.rx, "STATS", "started") == 0, "%s: receiver started a transfer", label);
    CHECK_MSG(s.aux.has_exited && WIFEXITED(s.aux.wstatus) && WEXITSTATUS(s.aux.wstatus) == 0, "%s: rogue", label);
    s_check_rx_clean(label, &s.rx);
    printf("%-28s rogue: ERR_INCOMPATIBLE in %.2f s: %s\n", label, l ? s_sec(l->t_us, s.aux.start_us) : -1.0,
           l ? strstr(l->text, "msg=") + 4 : "?");
    s_finish(&s, label);
}

/* Stale epochs, garbage and a late frame from a hand-made peer: dropped and never written; the live epoch
 * commits. */
static void test_stale_epoch(void) {
    const char *label = "stale epoch";
    char ep[256];
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 1);
    a_add(&a, "--linger-ms"), a_add(&a, "300");
    if (s_start_rx(&s, &a)) {
        s_rogue(&s, s.ep, "stale");
        s_run(&s, 1000);
    }
    CHECK_MSG(s_line(&s.aux, "RAW done transfer=1 code=0", NULL, NULL), "%s: rogue: want KvDone OK", label);
    CHECK_MSG(s.aux.has_exited && WIFEXITED(s.aux.wstatus) && WEXITSTATUS(s.aux.wstatus) == 0, "%s: rogue", label);
    s_check_committed(label, &s.rx, 1);
    long long stale = s_field(&s.rx, "STATS", "stale"), payload = s_field(&s.rx, "STATS", "payload");
    CHECK_MSG(stale >= 5, "%s: %lld messages dropped as stale, want >= 5", label, stale);
    CHECK_MSG(payload == TF_TX_BYTES_STALE, "%s: %lld payload bytes written, want only the live epoch's", label,
              payload);
    CHECK_MSG(s_field(&s.rx, "STATS", "failed") == 0, "%s: the transfer failed", label);
    s_check_rx_clean(label, &s.rx);
    printf("%-28s receiver: %lld dropped (garbage, epochs 1 and 3, late), epoch 2 COMMITTED and verified\n", label,
           stale);
    s_finish(&s, label);
}

/* sender -> proxy -> receiver; the proxy corrupts or drops one KvData of transfer 2 of 3. */
static void s_mangle(const char *mangle, const char *err) {
    char label[64], ep[256], px[256];
    snprintf(label, sizeof label, "proxy %s", mangle);
    s_new_ep(ep, sizeof ep, "ep");
    s_new_ep(px, sizeof px, "px");
    scen_t s = {0};
    targs_t a;
    s_rx_args(&a, ep, 3);
    bool ok = s_start_rx(&s, &a);
    a.n = 0;
    a_add(&a, "%s", KVT_PEER_PATH);
    a_add(&a, "--role"), a_add(&a, "proxy");
    a_add(&a, "--endpoint"), a_add(&a, "%s", s.ep);
    a_add(&a, "--listen"), a_add(&a, "%s", px);
    a_add(&a, "--mangle"), a_add(&a, "%s", mangle);
    a_add(&a, "--mangle-transfer"), a_add(&a, "2");
    a_add(&a, "--mangle-nth"), a_add(&a, "0");
    ok = ok && s_spawn(&s.aux, "px", &a) && s_wait_line(&s, &s.aux, "READY", 5000);
    s_tx_args(&a, px);
    a_add(&a, "--n-transfers"), a_add(&a, "3");
    ok = ok && s_spawn(&s.tx, "tx", &a);
    CHECK_MSG(ok, "%s: start", label);
    if (ok) s_run(&s, 2000);
    const tline_t *m = s_line(&s.aux, "MANGLED", NULL, NULL);
    CHECK_MSG(m != NULL, "%s: the proxy never saw transfer 2's data", label);
    CHECK_MSG(s.aux.has_exited && WIFEXITED(s.aux.wstatus) && WEXITSTATUS(s.aux.wstatus) == 0, "%s: proxy", label);
    s_check_done(label, &s.tx, 2, "status=PD_EPROTO", err);
    const tline_t *f = s_line(&s.rx, "EV role=receiver kind=FAILED", " transfer=2 ", "PD_EPROTO");
    CHECK_MSG(f && strstr(f->text, err), "%s: receiver: want FAILED(PD_EPROTO, %s)", label, err);
    for (long long id = 1; id <= 3; id += 2) {
        s_check_committed(label, &s.rx, id);
        s_check_done(label, &s.tx, id, "status=PD_OK", NULL);
    }
    uint64_t t = s_last_t(&s.tx, "EV role=sender kind=DONE", " transfer=2 ", NULL);
    CHECK_MSG(m && t && t < m->t_us + (uint64_t)TF_SLACK_MS * 1000u, "%s: late", label);
    s_check_rx_clean(label, &s.rx);
    s_check_tx_clean(label, &s.tx);
    printf("%-28s both: PD_EPROTO for transfer 2 only (%.2f s): %s\n", label, m && t ? s_sec(t, m->t_us) : -1.0,
           f ? strstr(f->text, "err=") + 4 : "?");
    s_finish(&s, label);
}

static void test_frame_mangled(void) {
    s_mangle("corrupt", "checksum mismatch");
    s_mangle("drop-msg", "seq 1, expected 0");
    s_mangle("drop-frame", "payload frames");
}

/* The receiver dies after committing and a new one binds the same endpoint: the surviving sender must be
 * able to hand off to it (README: a reply timeout drops the sender back to a fresh handshake). */
static void test_receiver_restart(void) {
    const char *label = "receiver restarted";
    char ep[256];
    s_new_ep(ep, sizeof ep, "ep");
    scen_t s = {0}, s2 = {0};
    targs_t a;
    s_rx_args(&a, ep, 2);
    a_add(&a, "--die-after-step"), a_add(&a, "5");
    bool ok = s_start_rx(&s, &a);
    s_tx_args(&a, s.ep);
    a_add(&a, "--rounds"), a_add(&a, "2");
    a_add(&a, "--run-ms"), a_add(&a, "3500"); /* overrides the default: the retries stop here */
    ok = ok && s_spawn(&s.tx, "tx", &a);
    ok = ok && s_wait_line(&s, &s.tx, "WAIT_GO", 10000);
    while (ok && s_alive(&s.rx) && pd_now_us() < s.rx.start_us + 10000000u) s_pump(&s, 10);
    s_rx_args(&a, ep, 2);
    ok = ok && s_start_rx(&s2, &a); /* same endpoint, new process */
    uint64_t go_us = pd_now_us();
    ok = ok && kill(s.tx.pid, SIGUSR1) == 0;
    CHECK_MSG(ok, "%s: start", label);
    s2.tx = s.tx; /* one pump for the sender and the new receiver */
    memset(&s.tx, 0, sizeof s.tx);
    if (ok) s_run(&s2, 300);
    s_check_killed(label, &s.rx, 5);
    const tline_t *r1 = s_line(&s2.tx, "ROUND 1", NULL, NULL);
    bool recovered = r1 && strstr(r1->text, "ok=1");
    CHECK_MSG(recovered, "%s: the sender never handed off to the new receiver", label);
    if (recovered) /* ids differ by attempt: count them */
        CHECK_MSG(s_count(&s2.rx, "VERIFY", "ok=1", NULL) >= 2 && s_count(&s2.rx, "VERIFY", "ok=0", NULL) == 0,
                  "%s: the new receiver's committed bytes", label);
    s_check_rx_clean(label, &s2.rx);
    s_check_tx_clean(label, &s2.tx);
    printf("%-28s sender %s the new receiver (%.2f s after go)\n", label, recovered ? "reached" : "NEVER reached",
           r1 ? s_sec(r1->t_us, go_us) : -1.0);
    s_finish(&s, label);
    s_finish(&s2, label);
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/kvtf-XXXXXX");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    setvbuf(stdout, NULL, _IOLBF, 0); /* progress lines interleave with the failure dumps on stderr */
    uint64_t t0 = pd_now_us();
    PD_TEST_RUN(test_baseline);
    PD_TEST_RUN(test_sender_killed);
    PD_TEST_RUN(test_receiver_killed);
    PD_TEST_RUN(test_two_senders_one_killed);
    PD_TEST_RUN(test_fingerprint_mismatch);
    PD_TEST_RUN(test_version_mismatch);
    PD_TEST_RUN(test_stale_epoch);
    PD_TEST_RUN(test_frame_mangled);
    PD_TEST_RUN(test_receiver_restart);
    rmdir(g_dir);
    printf("total %.1f s\n", (double)(pd_now_us() - t0) / 1e6);
    return pd_test_finish();
}
