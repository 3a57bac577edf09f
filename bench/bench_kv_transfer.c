/* bench_kv_transfer.c: KV hand-off throughput between two processes on this host, next to the limits it
 * is measured against in the same run: a plain memcpy of the same bytes, and a plain single-socket
 * ZeroMQ PUSH/PULL of the same bytes (zero-copy sends, 1 MiB messages) over the same transport.
 * KV layout: Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks = 128 KiB per token).
 * Usage: kv_transfer [--sizes-mib 16,128,512] [--transports ipc,tcp]. One line per (size, transport). */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

#include "eng_kv.h"
#include "kvt.h"
#include "pd_log.h"

#define MIB (1024.0 * 1024.0)

static double s_now(void) {
    return (double)pd_now_us() / 1e6;
}

static eng_kv_layout_t s_layout(int32_t n_tokens) {
    eng_kv_layout_t l = {.n_layers = 32, .n_kv_heads = 8, .head_dim = 128, .block_size = 16, .dtype = ENG_KV_BF16};
    l.n_blocks = eng_kv_blocks_for(n_tokens, l.block_size);
    return l;
}

static kvt_fingerprint_t s_fingerprint(const eng_kv_layout_t *l) {
    kvt_fingerprint_t f = {.weights_hash = 0x1234,
                           .tokenizer_hash = 0x5678,
                           .kv_dtype = l->dtype,
                           .block_size = l->block_size,
                           .n_layers = l->n_layers,
                           .n_kv_heads = l->n_kv_heads,
                           .head_dim = l->head_dim,
                           .rope_theta = 500000.0f,
                           .rope_dim = l->head_dim};
    snprintf(f.model_id, sizeof f.model_id, "bench-llama3-8b-shape");
    return f;
}

static void *s_pool(size_t bytes, unsigned seed) {
    uint32_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) PD_FATAL("mmap %zu bytes failed", bytes);
    uint32_t x = seed | 1;
    for (size_t i = 0; i < bytes / 4; i++) x ^= x << 13, x ^= x >> 17, x ^= x << 5, p[i] = x;
    return p;
}

/* ---- memcpy ---- */
static double s_memcpy_gbps(size_t bytes) {
    void *a = s_pool(bytes, 1), *b = s_pool(bytes, 2);
    double best = 1e30;
    for (int r = 0; r < 3; r++) {
        double t0 = s_now();
        memcpy(b, a, bytes);
        double dt = s_now() - t0;
        if (dt < best) best = dt;
    }
    munmap(a, bytes), munmap(b, bytes);
    return (double)bytes / best / 1e9;
}

/* ---- plain ZeroMQ PUSH/PULL, receiver in a child process ---- */
static double s_zmq_gbps(const char *endpoint, size_t bytes) {
    const size_t msg = 1u << 20;
    int ready[2];
    if (pipe(ready)) PD_FATAL("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        void *ctx = zmq_ctx_new(), *pull = zmq_socket(ctx, ZMQ_PULL);
        if (zmq_bind(pull, endpoint)) _exit(2);
        char c = 1;
        if (write(ready[1], &c, 1) != 1) _exit(3);
        size_t got = 0;
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (got < bytes && zmq_msg_recv(&m, pull, 0) >= 0) got += zmq_msg_size(&m);
        zmq_msg_close(&m);
        zmq_close(pull), zmq_ctx_term(ctx);
        _exit(got == bytes ? 0 : 4);
    }
    char c;
    if (read(ready[0], &c, 1) != 1) PD_FATAL("child did not start");
    void *src = s_pool(bytes, 3);
    void *ctx = zmq_ctx_new(), *push = zmq_socket(ctx, ZMQ_PUSH);
    int linger = -1;
    zmq_setsockopt(push, ZMQ_LINGER, &linger, sizeof linger);
    if (zmq_connect(push, endpoint)) PD_FATAL("connect %s", endpoint);
    double t0 = s_now();
    for (size_t off = 0; off < bytes; off += msg) {
        zmq_msg_t m;
        size_t n = bytes - off < msg ? bytes - off : msg;
        zmq_msg_init_data(&m, (char *)src + off, n, NULL, NULL);
        if (zmq_msg_send(&m, push, 0) < 0) PD_FATAL("send");
    }
    int status = 0;
    waitpid(pid, &status, 0); /* the child exits once it has every byte */
    double dt = s_now() - t0;
    zmq_close(push), zmq_ctx_term(ctx);
    munmap(src, bytes);
    close(ready[0]), close(ready[1]);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) PD_FATAL("zmq receiver failed (%d)", status);
    return (double)bytes / dt / 1e9;
}

/* ---- kvtransfer, receiver in a child process ---- */
typedef struct {
    eng_kv_layout_t l;
    uint8_t *base;
    int32_t next;
} s_store_t;

static pd_status s_reserve(void *ctx, int32_t n, int32_t *ids) {
    s_store_t *s = ctx;
    if (s->next + n > s->l.n_blocks) return PD_EAGAIN;
    for (int32_t i = 0; i < n; i++) ids[i] = s->next++;
    return PD_OK;
}
static void s_release(void *ctx, const int32_t *ids, int32_t n) {
    (void)ctx, (void)ids, (void)n;
}
static void *s_chunk(void *ctx, int32_t layer, eng_kv_kind_t kind, int32_t block) {
    s_store_t *s = ctx;
    return s->base + eng_kv_chunk_offset(&s->l, layer, kind, block);
}

static double s_kvt_gbps(const char *endpoint, int32_t n_tokens) {
    eng_kv_layout_t l = s_layout(n_tokens);
    size_t bytes = eng_kv_pool_bytes(&l);
    int ready[2];
    if (pipe(ready)) PD_FATAL("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        s_store_t st = {.l = l, .base = s_pool(bytes, 4)};
        kvt_receiver_params_t rp = kvt_receiver_params_default();
        rp.endpoint = endpoint, rp.fingerprint = s_fingerprint(&l), rp.layout = l;
        rp.store = (kvt_store_t){&st, s_reserve, s_release, s_chunk};
        rp.max_message_bytes = 1ull << 30;
        void *ctx = zmq_ctx_new();
        char err[256];
        kvt_receiver_t *r = kvt_receiver_create(ctx, &rp, err, sizeof err);
        if (!r) {
            fprintf(stderr, "receiver: %s\n", err);
            _exit(2);
        }
        char c = 1;
        if (write(ready[1], &c, 1) != 1) _exit(3);
        kvt_event_t ev[8];
        int done = 0;
        double t_end = s_now() + 60;
        while (!done && s_now() < t_end) {
            int n = kvt_receiver_poll(r, 100, ev, 8);
            for (int i = 0; i < n; i++) done |= ev[i].kind == KVT_EV_COMMITTED || ev[i].kind == KVT_EV_FAILED;
        }
        for (int i = 0; i < 20; i++) kvt_receiver_poll(r, 10, ev, 8); /* let the KvDone leave */
        kvt_receiver_destroy(&r);
        zmq_ctx_term(ctx);
        _exit(done ? 0 : 4);
    }
    char c;
    if (read(ready[0], &c, 1) != 1) PD_FATAL("child did not start");
    void *pool = s_pool(bytes, 5);
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = endpoint, sp.sender_id = "bench", sp.fingerprint = s_fingerprint(&l), sp.layout = l;
    sp.pool_base = pool;
    void *ctx = zmq_ctx_new();
    char err[256];
    kvt_sender_t *s = kvt_sender_create(ctx, &sp, err, sizeof err);
    if (!s) PD_FATAL("sender: %s", err);
    int32_t *ids = pd_xmalloc(sizeof(int32_t) * (size_t)l.n_blocks);
    for (int32_t i = 0; i < l.n_blocks; i++) ids[i] = i;
    kvt_transfer_t t = {
        .request_id = 1, .transfer_id = 1, .epoch = 1, .n_tokens = n_tokens, .block_ids = ids, .timeout_ms = 60000};
    double t0 = s_now();
    if (kvt_sender_start(s, &t) != PD_OK || kvt_sender_layers_ready(s, 1, l.n_layers) != PD_OK ||
        kvt_sender_commit(s, 1, 42) != PD_OK)
        PD_FATAL("sender: start failed");
    kvt_event_t ev[8];
    pd_status result = PD_ETIMEDOUT;
    double dt = 0;
    while (result == PD_ETIMEDOUT && s_now() - t0 < 60) {
        int n = kvt_sender_poll(s, 100, ev, 8);
        if (n < 0) PD_FATAL("sender: %s", kvt_sender_error(s));
        for (int i = 0; i < n; i++)
            if (ev[i].kind == KVT_EV_DONE) result = ev[i].status, dt = s_now() - t0;
    }
    int status = 0;
    waitpid(pid, &status, 0);
    kvt_sender_destroy(&s);
    zmq_ctx_term(ctx);
    munmap(pool, bytes), free(ids);
    close(ready[0]), close(ready[1]);
    if (result != PD_OK || !WIFEXITED(status) || WEXITSTATUS(status))
        PD_FATAL("kv transfer failed: %s (receiver %d)", pd_strerror(result), status);
    return (double)bytes / dt / 1e9;
}

int main(int argc, char **argv) {
    pd_log_init("bench", PD_LOG_WARN);
    const char *sizes = "16,128,512", *transports = "ipc,tcp";
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--sizes-mib"))
            sizes = argv[i + 1];
        else if (!strcmp(argv[i], "--transports"))
            transports = argv[i + 1];
    }
    signal(SIGPIPE, SIG_IGN);
    printf("kv_transfer: layout llama3-8b bf16, %.0f KiB per token; one process per side\n",
           (double)eng_kv_token_bytes(
               &(eng_kv_layout_t){.n_layers = 32, .n_kv_heads = 8, .head_dim = 128, .dtype = ENG_KV_BF16}) /
               1024.0);
    char sz_buf[128];
    snprintf(sz_buf, sizeof sz_buf, "%s", sizes);
    for (char *tok = strtok(sz_buf, ","); tok; tok = strtok(NULL, ",")) {
        int mib = atoi(tok);
        int32_t n_tokens = (int32_t)((double)mib * MIB / (128.0 * 1024.0));
        size_t bytes = eng_kv_pool_bytes(&(eng_kv_layout_t){.n_layers = 32,
                                                            .n_kv_heads = 8,
                                                            .head_dim = 128,
                                                            .block_size = 16,
                                                            .n_blocks = eng_kv_blocks_for(n_tokens, 16),
                                                            .dtype = ENG_KV_BF16});
        double mc = s_memcpy_gbps(bytes);
        char tr_buf[64];
        snprintf(tr_buf, sizeof tr_buf, "%s", transports);
        char *save = NULL;
        for (char *tr = strtok_r(tr_buf, ",", &save); tr; tr = strtok_r(NULL, ",", &save)) {
            char ep[128];
            if (!strcmp(tr, "ipc"))
                snprintf(ep, sizeof ep, "ipc:///tmp/pd-bench-kv-%d", (int)getpid());
            else
                snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d", 20000 + (int)(getpid() % 20000));
            double z = s_zmq_gbps(ep, bytes);
            double k = s_kvt_gbps(ep, n_tokens);
            printf("size %4d MiB %s: kvtransfer %.2f GB/s = %.0f%% of plain zmq (%.2f GB/s), %.0f%% of memcpy "
                   "(%.2f GB/s)\n",
                   mib, tr, k, 100 * k / z, z, 100 * k / mc, mc);
            fflush(stdout);
        }
    }
    return 0;
}
