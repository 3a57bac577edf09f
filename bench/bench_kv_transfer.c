/* bench_kv_transfer.c: KV hand-off throughput between two processes on this host, next to the limits it
 * is measured against in the same run: a plain memcpy of the same bytes, and a plain ZeroMQ PUSH/PULL of
 * the same bytes (zero-copy sends, 1 MiB messages) over the same transport and the same number of
 * connections (--conns N: N PUSH sockets dealt round robin vs a kvtransfer sender with n_conns = N; both
 * sides of both get ZMQ_IO_THREADS = N). Paths: ipc and tcp (payload through the socket), shm (the
 * sender's pool in shared memory, the receiver copies from it; ZeroMQ over ipc carries headers and
 * credits; always one connection). Each kvtransfer number is the best of --reps transfers on one sender,
 * after a warm-up transfer (which warms the connection and the receiver's mapping), timed from
 * kvt_sender_start to DONE; plain ZeroMQ is the best of --reps runs too. "stream": the same transfer with
 * layer l marked ready at (l + 1) * layer_ms, as prefill would, the sender blocking in its poll between
 * layers; "tail" is DONE minus the last layer's ready time (best of --reps).
 * KV layout: Llama-3-8B (32 layers, 8 KV heads, head_dim 128, bf16, 16-token blocks = 128 KiB per token).
 * KVT_COPY_THREADS=N sets the receiver's copy team (kvt_receiver_params_t.copy_threads; 1: its poll thread alone).
 * Usage: kv_transfer [--sizes-mib 16,128,512] [--transports ipc,tcp,shm] [--layer-ms 10] [--only-kvt 1]
 *                    [--reps 3] [--conns 1]. */
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

static int g_copy_threads = 0; /* 0: the library's default */

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

/* cheap, non-constant content: checksums read every byte; compressibility does not matter here */
static void s_fill(uint32_t *p, size_t bytes, unsigned seed) {
    for (size_t i = 0; i < bytes / 4; i++) p[i] = (uint32_t)(i * 2654435761u) ^ seed;
}

static void *s_pool(size_t bytes, unsigned seed) {
    uint32_t *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) PD_FATAL("mmap %zu bytes failed", bytes);
    s_fill(p, bytes, seed);
    return p;
}

/* A ZeroMQ context with one I/O thread per connection (both sides, kvtransfer and plain ZeroMQ alike):
 * striping over connections that share one I/O thread would only queue them on one core. */
static void *s_ctx(int n_conns) {
    void *ctx = zmq_ctx_new();
    if (!ctx || zmq_ctx_set(ctx, ZMQ_IO_THREADS, n_conns) != 0) PD_FATAL("zmq context");
    return ctx;
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
static double s_zmq_gbps(const char *endpoint, size_t bytes, int n_conns) {
    const size_t msg = 1u << 20;
    int ready[2];
    if (pipe(ready)) PD_FATAL("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        void *ctx = s_ctx(n_conns), *pull = zmq_socket(ctx, ZMQ_PULL);
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
    void *ctx = s_ctx(n_conns), *push[16];
    /* n_conns PUSH sockets (each its own connection), messages dealt round robin: the baseline for a
     * kvtransfer sender striping over the same number of connections */
    for (int i = 0; i < n_conns; i++) {
        push[i] = zmq_socket(ctx, ZMQ_PUSH);
        int linger = -1;
        zmq_setsockopt(push[i], ZMQ_LINGER, &linger, sizeof linger);
        if (zmq_connect(push[i], endpoint)) PD_FATAL("connect %s", endpoint);
    }
    double t0 = s_now();
    for (size_t off = 0, k = 0; off < bytes; off += msg, k++) {
        zmq_msg_t m;
        size_t n = bytes - off < msg ? bytes - off : msg;
        zmq_msg_init_data(&m, (char *)src + off, n, NULL, NULL);
        if (zmq_msg_send(&m, push[k % (size_t)n_conns], 0) < 0) PD_FATAL("send");
    }
    int status = 0;
    waitpid(pid, &status, 0); /* the child exits once it has every byte */
    double dt = s_now() - t0;
    for (int i = 0; i < n_conns; i++) zmq_close(push[i]);
    zmq_ctx_term(ctx);
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
    if (n > s->l.n_blocks) return PD_EAGAIN;
    if (s->next + n > s->l.n_blocks) s->next = 0; /* the bench reuses blocks of committed transfers */
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

/* One transfer of every block; layer_ms > 0: layers become ready one by one. Returns seconds from start
 * to DONE; *tail_s: DONE minus the last layer's ready time. */
static double s_kvt_one(kvt_sender_t *s, const eng_kv_layout_t *l, uint64_t id, const int32_t *ids, int32_t n_tokens,
                        double layer_ms, double *tail_s) {
    kvt_transfer_t t = {
        .request_id = id, .transfer_id = id, .epoch = 1, .n_tokens = n_tokens, .block_ids = ids, .timeout_ms = 60000};
    double t0 = s_now(), t_last = t0;
    if (kvt_sender_start(s, &t) != PD_OK) PD_FATAL("sender: start failed");
    int32_t ready = 0;
    kvt_event_t ev[8];
    pd_status result = PD_ETIMEDOUT;
    double t_done = 0;
    while (result == PD_ETIMEDOUT && s_now() - t0 < 60) {
        int32_t want = layer_ms > 0 ? (int32_t)((s_now() - t0) * 1000.0 / layer_ms) : l->n_layers;
        if (want > l->n_layers) want = l->n_layers;
        if (want > ready) {
            ready = want;
            if (kvt_sender_layers_ready(s, id, ready) != PD_OK) PD_FATAL("sender: layers_ready");
            if (ready == l->n_layers) {
                t_last = s_now();
                if (kvt_sender_commit(s, id, 42) != PD_OK) PD_FATAL("sender: commit");
            }
        }
        /* block in poll until the next layer is due, as a prefill loop would (it sleeps in its poller):
         * spinning here would take a core from the receiver on a small host */
        int wait_ms = 100;
        if (layer_ms > 0 && ready < l->n_layers) {
            double due_ms = (ready + 1) * layer_ms - (s_now() - t0) * 1000.0;
            wait_ms = due_ms < 0 ? 0 : (int)due_ms;
        }
        int n = kvt_sender_poll(s, wait_ms, ev, 8);
        if (n < 0) PD_FATAL("sender: %s", kvt_sender_error(s));
        for (int i = 0; i < n; i++)
            if (ev[i].kind == KVT_EV_DONE && ev[i].transfer_id == id) result = ev[i].status, t_done = s_now();
    }
    if (result != PD_OK) PD_FATAL("kv transfer failed: %s", pd_strerror(result));
    *tail_s = t_done - t_last;
    return t_done - t0;
}

typedef struct {
    double gbps, stream_tail_ms;
} s_kvt_result_t;

/* Receiver in a child process; the sender's pool in shared memory when use_shm. Three transfers: warm-up,
 * timed, streamed (layer_ms). */
static s_kvt_result_t s_kvt_run(const char *endpoint, int32_t n_tokens, bool use_shm, double layer_ms, int reps,
                                int n_conns) {
    eng_kv_layout_t l = s_layout(n_tokens);
    size_t bytes = eng_kv_pool_bytes(&l);
    const int n_transfers = 1 + 2 * reps;
    int ready[2];
    if (pipe(ready)) PD_FATAL("pipe");
    pid_t pid = fork();
    if (pid == 0) {
        s_store_t st = {.l = l, .base = s_pool(bytes, 4)};
        kvt_receiver_params_t rp = kvt_receiver_params_default();
        rp.endpoint = endpoint, rp.fingerprint = s_fingerprint(&l), rp.layout = l;
        rp.store = (kvt_store_t){.ctx = &st, .reserve = s_reserve, .release = s_release, .chunk = s_chunk};
        rp.max_message_bytes = 1ull << 30;
        rp.is_shm_enabled = use_shm;
        if (g_copy_threads > 0) rp.copy_threads = g_copy_threads;
        void *ctx = s_ctx(n_conns);
        char err[256];
        kvt_receiver_t *r = kvt_receiver_create(ctx, &rp, err, sizeof err);
        if (!r) {
            fprintf(stderr, "receiver: %s\n", err);
            _exit(2);
        }
        char c = 1;
        if (write(ready[1], &c, 1) != 1) _exit(3);
        kvt_event_t ev[8];
        int n_ok = 0, n_bad = 0;
        double t_end = s_now() + 120;
        while (n_ok + n_bad < n_transfers && s_now() < t_end) {
            int n = kvt_receiver_poll(r, 100, ev, 8);
            for (int i = 0; i < n; i++) n_ok += ev[i].kind == KVT_EV_COMMITTED, n_bad += ev[i].kind == KVT_EV_FAILED;
        }
        for (int i = 0; i < 20; i++) kvt_receiver_poll(r, 10, ev, 8); /* let the KvDone leave */
        kvt_receiver_destroy(&r);
        zmq_ctx_term(ctx);
        _exit(n_ok == n_transfers ? 0 : 4);
    }
    char c;
    if (read(ready[0], &c, 1) != 1) PD_FATAL("child did not start");
    char shm_name[128] = "";
    void *pool = use_shm ? kvt_shm_pool_create(bytes, shm_name, sizeof shm_name) : s_pool(bytes, 5);
    if (!pool) PD_FATAL("shm pool: %s", shm_name);
    if (use_shm) s_fill(pool, bytes, 5);
    kvt_sender_params_t sp = kvt_sender_params_default();
    sp.endpoint = endpoint, sp.sender_id = "bench", sp.fingerprint = s_fingerprint(&l), sp.layout = l;
    sp.pool_base = pool;
    sp.pool_shm_name = use_shm ? shm_name : NULL;
    sp.n_conns = n_conns;
    void *ctx = s_ctx(n_conns);
    char err[256];
    kvt_sender_t *s = kvt_sender_create(ctx, &sp, err, sizeof err);
    if (!s) PD_FATAL("sender: %s", err);
    int32_t *ids = pd_xmalloc(sizeof(int32_t) * (size_t)l.n_blocks);
    for (int32_t i = 0; i < l.n_blocks; i++) ids[i] = i;
    double tail;
    s_kvt_result_t res = {0, 0};
    s_kvt_one(s, &l, 1, ids, n_tokens, 0, &tail); /* warm-up */
    res.stream_tail_ms = 1e30;
    for (int i = 0; i < reps; i++) { /* best of reps: the host is shared */
        double g = (double)bytes / s_kvt_one(s, &l, 2 + 2 * (uint64_t)i, ids, n_tokens, 0, &tail) / 1e9;
        if (g > res.gbps) res.gbps = g;
        if (layer_ms > 0) {
            s_kvt_one(s, &l, 3 + 2 * (uint64_t)i, ids, n_tokens, layer_ms, &tail);
            if (tail * 1000.0 < res.stream_tail_ms) res.stream_tail_ms = tail * 1000.0;
        } else {
            s_kvt_one(s, &l, 3 + 2 * (uint64_t)i, ids, n_tokens, 0, &tail); /* keeps the count fixed */
        }
    }
    kvt_stats_t kst;
    kvt_sender_stats(s, &kst);
    if (use_shm != (kst.shm_payload_bytes > 0))
        PD_FATAL("kv transfer: shared-memory path %s", use_shm ? "not used" : "used");
    int status = 0;
    waitpid(pid, &status, 0);
    kvt_sender_destroy(&s);
    zmq_ctx_term(ctx);
    if (use_shm)
        kvt_shm_pool_destroy(pool, bytes, shm_name);
    else
        munmap(pool, bytes);
    free(ids);
    close(ready[0]), close(ready[1]);
    if (!WIFEXITED(status) || WEXITSTATUS(status)) PD_FATAL("kv receiver failed (%d)", status);
    return res;
}

int main(int argc, char **argv) {
    pd_log_init("bench", PD_LOG_WARN);
    const char *sizes = "16,128,512", *transports = "ipc,tcp,shm";
    double layer_ms = 10;
    int only_kvt = 0, reps = 3, n_conns = 1;
    const char *ct = getenv("KVT_COPY_THREADS"); /* the receiver's copy_threads (default: the library's) */
    if (ct && *ct) g_copy_threads = atoi(ct);
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--sizes-mib"))
            sizes = argv[i + 1];
        else if (!strcmp(argv[i], "--transports"))
            transports = argv[i + 1];
        else if (!strcmp(argv[i], "--layer-ms"))
            layer_ms = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--only-kvt"))
            only_kvt = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--reps"))
            reps = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--conns"))
            n_conns = atoi(argv[i + 1]);
    }
    if (reps < 1) reps = 1;
    if (n_conns < 1 || n_conns > 8) PD_FATAL("--conns: 1 to 8");
    signal(SIGPIPE, SIG_IGN);
    printf("kv_transfer: layout llama3-8b bf16, %.0f KiB per token; one process per side; stream: %.1f ms per layer; "
           "best of %d; connections per sender (and plain zmq sockets): %d\n",
           (double)eng_kv_token_bytes(
               &(eng_kv_layout_t){.n_layers = 32, .n_kv_heads = 8, .head_dim = 128, .dtype = ENG_KV_BF16}) /
               1024.0,
           layer_ms, reps, n_conns);
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
        double mc = only_kvt ? 0 : s_memcpy_gbps(bytes);
        char tr_buf[64];
        snprintf(tr_buf, sizeof tr_buf, "%s", transports);
        char *save = NULL;
        for (char *tr = strtok_r(tr_buf, ",", &save); tr; tr = strtok_r(NULL, ",", &save)) {
            char ep[128];
            bool use_shm = !strcmp(tr, "shm");
            if (!strcmp(tr, "tcp"))
                snprintf(ep, sizeof ep, "tcp://127.0.0.1:%d", 20000 + (int)(getpid() % 20000));
            else
                snprintf(ep, sizeof ep, "ipc:///tmp/pd-bench-kv-%d", (int)getpid());
            /* shm: the data path is not a socket, so its sender uses one connection */
            int nc = use_shm ? 1 : n_conns;
            double z = 0;
            for (int i = 0; !only_kvt && i < reps; i++) {
                double zi = s_zmq_gbps(ep, bytes, nc);
                if (zi > z) z = zi;
            }
            s_kvt_result_t k = s_kvt_run(ep, n_tokens, use_shm, layer_ms, reps, nc);
            printf(
                "size %4d MiB %s x%d: kvtransfer %.2f GB/s = %.0f%% of plain zmq %s x%d (%.2f GB/s), %.0f%% of memcpy "
                "(%.2f GB/s); stream tail %.1f ms\n",
                mib, tr, nc, k.gbps, z > 0 ? 100 * k.gbps / z : 0, use_shm ? "ipc" : tr, nc, z,
                mc > 0 ? 100 * k.gbps / mc : 0, mc, k.stream_tail_ms);
            fflush(stdout);
        }
    }
    return 0;
}
