/* kvt.h: moving a request's KV blocks from a prefill worker (sender) to a decode worker (receiver) over
 * ZeroMQ (tcp:// or ipc://), per proto/pdserve_kv.proto. Knows block layouts (engine/eng_kv_layout.h),
 * not models. Each kvt object is used by the one thread that created it (its sockets are that thread's);
 * it does I/O only inside kvt_*_poll, which never blocks longer than the timeout given, so a service's
 * event loop drives it next to its other sockets.
 *
 * Sender side (one kvt_sender_t per decode peer): start a transfer (the receiver reserves blocks before any
 * payload moves), mark layers ready as prefill computes them (payload streams as credit allows, straight
 * from the caller's block memory: zero copies), commit with the first sampled token, and learn the outcome
 * from events. The caller keeps every block it handed over pinned until KVT_EV_RELEASED for that transfer.
 * Receiver side (one kvt_receiver_t per decode worker, many senders): reserves blocks through the store
 * callbacks, writes each verified payload straight into its block (converting f32/f16/bf16 if the sender's
 * dtype differs), and hands the sequence over on commit. Every failure ends the transfer on both sides
 * with an error event, frees the receiver's blocks, and never touches another transfer. */
#ifndef KVT_H
#define KVT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "eng_kv_layout.h"
#include "pd_common.h"

#define KVT_PROTOCOL_VERSION 1

/* What two peers must agree on (mirrors pdserve.v1.Fingerprint). */
typedef struct {
    char model_id[128];
    uint64_t weights_hash; /* eng_model_identity_hash */
    uint64_t tokenizer_hash;
    eng_kv_dtype_t kv_dtype; /* the peer's own KV dtype; dtypes may differ (converted on receipt) */
    int32_t block_size, n_layers, n_kv_heads, head_dim;
    float rope_theta;
    int32_t rope_dim;
} kvt_fingerprint_t;

/* Compares everything but kv_dtype. PD_OK, or PD_EPROTO with the first differing field named in err. */
PD_NODISCARD pd_status kvt_fingerprint_check(const kvt_fingerprint_t *mine, const kvt_fingerprint_t *peer, char *err,
                                             size_t err_cap);

typedef enum {
    KVT_EV_RESERVED = 1,  /* sender: the receiver reserved blocks; payload may flow */
    KVT_EV_DONE = 2,      /* sender: the receiver committed the sequence (status PD_OK) or the transfer
                            failed (status < 0, message in err); either way it is over on the wire */
    KVT_EV_RELEASED = 3,  /* sender: ZeroMQ no longer references any payload of the transfer: the caller
                            may unpin its blocks. Always follows DONE. */
    KVT_EV_COMMITTED = 4, /* receiver: every block arrived, verified and was written; the blocks now belong
                             to the caller (store.release will not be called for them) */
    KVT_EV_FAILED = 5,    /* receiver: the transfer failed (status, err); its blocks were released */
} kvt_event_kind_t;

typedef struct {
    kvt_event_kind_t kind;
    uint64_t request_id;
    uint64_t transfer_id;
    pd_status status;    /* PD_OK, PD_EAGAIN (no KV capacity), PD_ETIMEDOUT, PD_ECLOSED (cancelled),
                          PD_EPROTO (bad frame, checksum, sequence), PD_EINVAL */
    int32_t first_token; /* COMMITTED */
    int32_t n_tokens;    /* COMMITTED */
    int32_t n_blocks;    /* COMMITTED: block ids in block_ids (owned by the receiver object until the next
                            poll; copy them) */
    const int32_t *block_ids;
    bool is_on_device; /* COMMITTED: the blocks were copied device to device (a sender on the same GPU), so they are
                          already in the receiver's device pool and its host copy of them is stale */
    /* COMMITTED: the sender's kvt_sender_commit_info bytes (first_token_info_len of them, 0 when none), owned by
     * the receiver object until the next poll */
    const uint8_t *first_token_info;
    size_t first_token_info_len;
    char err[160];
} kvt_event_t;

/* Longest first_token_info a commit may carry. */
#define KVT_MAX_COMMIT_INFO_BYTES 4096

/* ---- sender ---- */

typedef struct kvt_sender kvt_sender_t;

typedef struct {
    const char *endpoint;  /* the receiver's, e.g. "tcp://127.0.0.1:5601" or "ipc:///tmp/pd-kv" */
    const char *sender_id; /* for logs */
    kvt_fingerprint_t fingerprint;
    eng_kv_layout_t layout;       /* of the sender's pool: payloads are chunks of this layout */
    const void *pool_base;        /* host address of the sender's KV pool (chunk = base + eng_kv_chunk_offset) */
    int32_t handshake_timeout_ms; /* hello reply (default 5000) */
    int32_t reply_timeout_ms;     /* reserve reply and done, after the last frame (default 10000) */
    int32_t linger_ms;            /* ZMQ_LINGER on close (default 0) */
    int32_t max_transfers;        /* started and not yet RELEASED (default 256) */
    int32_t heartbeat_ivl_ms;     /* ZMTP heartbeat interval; a silent peer is dropped after 3x (default 1000) */
    /* Optional same-host path: the POSIX shared-memory object (kvt_shm_pool_create) whose mapping at
     * offset 0 is pool_base, at least eng_kv_pool_bytes(&layout) long. A receiver that can map it copies
     * straight from it (ZeroMQ then carries headers and credits only); others get the socket path.
     * NULL (default): sockets only. */
    const char *pool_shm_name;
    /* Blocks whose chunks are consecutive in the pool travel as one frame of up to this many bytes
     * (default 1 MiB; at least one chunk); fewer, larger frames are what ZeroMQ moves fastest. */
    size_t max_frame_bytes;
    /* Connections (DEALER sockets) to the receiver (default 1, at most KVT_MAX_CONNS). With more than one,
     * a transfer's payload messages are dealt round robin over all of them (reserve, commit and cancel use
     * the first), so one large transfer uses several TCP streams. The shared-pool path uses the first only. */
    int32_t n_conns;
    /* Optional same-GPU path: the pool's device memory exported for other processes (eng_kv_export: a CUDA IPC
     * handle), opaque to kvtransfer, device_handle_len <= KVT_MAX_DEVICE_HANDLE_BYTES, in the same layout as
     * pool_base. A receiver that can map it copies each transfer device to device, layers as they are marked ready
     * (ZeroMQ carries control only, and nothing is checksummed: the bytes stay in GPU memory); others get the
     * shared-pool or socket path. A transfer of more than KVT_MAX_DEVICE_BLOCKS blocks takes the other path.
     * NULL (default): none. */
    const void *device_handle;
    size_t device_handle_len;
} kvt_sender_params_t;

#define KVT_MAX_CONNS               8
#define KVT_MAX_DEVICE_HANDLE_BYTES 256
#define KVT_MAX_DEVICE_BLOCKS       4096 /* its block ids ride in the reserve message (at most ~20 KiB) */

kvt_sender_params_t kvt_sender_params_default(void);

/* Connects (DEALER) and sends the hello; the handshake completes inside kvt_sender_poll. NULL + reason in
 * err on bad params or socket setup failure. */
kvt_sender_t *kvt_sender_create(void *zmq_ctx, const kvt_sender_params_t *p, char *err, size_t err_cap);
/* Closes the socket (LINGER) and waits, at most linger_ms + 1 s, until ZeroMQ has dropped every payload
 * frame that still points into pool_base; unfinished transfers just stop (the receiver times them out). */
void kvt_sender_destroy(kvt_sender_t **s);

typedef struct {
    uint64_t request_id;
    uint64_t transfer_id; /* unique per sender; a retry of the same transfer uses a higher epoch */
    uint32_t epoch;
    int32_t n_tokens;         /* positions 0 .. n_tokens-1 */
    const int32_t *block_ids; /* (ceil(n_tokens / block_size)) the sender's blocks, copied */
    int32_t timeout_ms;       /* the whole transfer, reservation to commit (receiver enforces it too) */
} kvt_transfer_t;

/* Starts a transfer: sends the reservation request (queued until the handshake is done). PD_EINVAL for a
 * bad descriptor or duplicate id, PD_EAGAIN if too many transfers are in flight (or too many undelivered
 * events: poll), PD_EPROTO after the receiver refused the handshake, PD_ENOMEM. */
PD_NODISCARD pd_status kvt_sender_start(kvt_sender_t *s, const kvt_transfer_t *t);
/* Layers [0, n_layers_ready) of the transfer's blocks are computed and may be sent. Monotonic. */
PD_NODISCARD pd_status kvt_sender_layers_ready(kvt_sender_t *s, uint64_t transfer_id, int32_t n_layers_ready);
/* All layers ready; sends the commit (with the first sampled token) after the last payload. */
PD_NODISCARD pd_status kvt_sender_commit(kvt_sender_t *s, uint64_t transfer_id, int32_t first_token);
/* kvt_sender_commit, and hands the receiver info (info_len <= KVT_MAX_COMMIT_INFO_BYTES bytes, copied; opaque to
 * kvtransfer) with the first token: its COMMITTED event carries them. PD_EINVAL for a longer info. */
PD_NODISCARD pd_status kvt_sender_commit_info(kvt_sender_t *s, uint64_t transfer_id, int32_t first_token,
                                              const void *info, size_t info_len);
/* Cancels: the receiver frees its reservation; DONE(PD_ECLOSED) and RELEASED follow. */
PD_NODISCARD pd_status kvt_sender_cancel(kvt_sender_t *s, uint64_t transfer_id);

/* Does socket I/O for up to timeout_ms (0 = only what is ready), sends what credit allows, enforces
 * timeouts, and writes up to cap events. Returns the number of events, or a negative status if the
 * connection is unusable (handshake refused: PD_EPROTO with the reason from kvt_sender_error). */
int kvt_sender_poll(kvt_sender_t *s, int timeout_ms, kvt_event_t *events, int cap);
const char *kvt_sender_error(const kvt_sender_t *s);
/* The DEALER socket, for a caller's zmq_poller (ZMQ_POLLIN means kvt_sender_poll has work). With n_conns > 1
 * it is the first connection's, which carries every reply but the other connections' hello replies:
 * call kvt_sender_poll at least every few ms while transfers are live (as release already needs). */
void *kvt_sender_socket(kvt_sender_t *s);

/* ---- receiver ---- */

/* The receiver's KV memory, supplied by the decode service (or a test). */
typedef struct {
    void *ctx;
    /* Reserve n blocks for a transfer into ids; PD_EAGAIN when the pool cannot. */
    pd_status (*reserve)(void *ctx, int32_t n_blocks, int32_t *ids);
    /* Return blocks of a transfer that failed or was cancelled. */
    void (*release)(void *ctx, const int32_t *ids, int32_t n_blocks);
    /* Host address of one (layer, K or V, block) chunk, in the receiver's layout and dtype. Called from the
     * receiver's copy helpers too (copy_threads > 1) while the poll thread waits for them: a pure address lookup. */
    void *(*chunk)(void *ctx, int32_t layer, eng_kv_kind_t kind, int32_t block_id);
    /* Optional, used instead of reserve / release when set: the same, naming the request (and its token
     * count) the blocks are for, so a decode scheduler can account blocks per request. */
    pd_status (*reserve_for)(void *ctx, uint64_t request_id, int32_t n_tokens, int32_t n_blocks, int32_t *ids);
    void (*release_for)(void *ctx, uint64_t request_id, const int32_t *ids, int32_t n_blocks);
    /* Optional same-GPU path (all three or none). peer_open maps a sender's exported device pool (its
     * kvt_sender_params_t.device_handle; src_layout: that pool's layout, dtype equal to the receiver's) and returns a
     * token, or NULL when this store cannot reach it (another GPU, no GPU, the same process): that sender then uses
     * the other paths. peer_copy copies layers [first_layer, first_layer + n_layers) of the sender's src_blocks, K
     * and V, into dst_blocks (reserved here, in the store's device pool) and returns once the copy is complete;
     * != PD_OK fails the transfer.
     * peer_close unmaps (the sender reconnected or was dropped, or the receiver is destroyed). All on the poll
     * thread. */
    void *(*peer_open)(void *ctx, const void *handle, size_t handle_len, const eng_kv_layout_t *src_layout);
    pd_status (*peer_copy)(void *ctx, void *peer, const int32_t *src_blocks, const int32_t *dst_blocks,
                           int32_t n_blocks, int32_t first_layer, int32_t n_layers);
    void (*peer_close)(void *ctx, void *peer);
} kvt_store_t;

typedef struct kvt_receiver kvt_receiver_t;

typedef struct {
    const char *endpoint; /* bind address: explicit host, never "*" by accident */
    kvt_fingerprint_t fingerprint;
    eng_kv_layout_t layout; /* the receiver's pool */
    kvt_store_t store;
    uint64_t credit_bytes;      /* payload bytes in flight per sender (all its connections; default 64 MiB) */
    uint64_t max_message_bytes; /* ZMQ_MAXMSGSIZE-style cap on one message (default 256 MiB) */
    int32_t max_transfers;      /* concurrent transfers (default 256) */
    int32_t default_timeout_ms; /* when a reservation names none (default 30000) */
    int32_t linger_ms;          /* ZMQ_LINGER on close (default 0) */
    int32_t heartbeat_ivl_ms;   /* ZMTP heartbeat interval; a silent peer is dropped after 3x (default 1000) */
    bool is_shm_enabled;        /* map a same-host sender's shared pool when it offers one (default true) */
    /* Threads that copy a message's shared-pool frames, the poll thread included, each taking the next frame (one core
     * moves about half of memcpy's bandwidth with the checksum). Default 4 on hosts of 8 cores or more, else 2; 1: the
     * poll thread alone. Socket frames stay on the poll thread: there ZeroMQ's I/O thread already runs beside it; a
     * third thread made tcp slower on two cores and made no difference on the 16-core GPU host (bench/RESULTS.md,
     * kv_transfer, session 6). */
    int32_t copy_threads;
    uint64_t copy_parallel_min_bytes; /* ... for frames of at least this many bytes (default 1 MiB: below it the
                                         hand-off costs about what it saves) */
} kvt_receiver_params_t;

kvt_receiver_params_t kvt_receiver_params_default(void);

/* Binds a ROUTER socket. NULL + reason in err on failure (address in use, bad endpoint). */
kvt_receiver_t *kvt_receiver_create(void *zmq_ctx, const kvt_receiver_params_t *p, char *err, size_t err_cap);
/* Releases every block of every unfinished transfer through the store. */
void kvt_receiver_destroy(kvt_receiver_t **r);
int kvt_receiver_poll(kvt_receiver_t *r, int timeout_ms, kvt_event_t *events, int cap);
/* The decode side gave request_id up: every live transfer of it ends now, here and at its sender (which gets DONE with
 * PD_ECLOSED), its blocks released through the store at once and a FAILED event (PD_ECLOSED) at the next poll, so
 * that neither side waits for a timeout (a streamed transfer may be live long before its commit; a dead sender
 * never commits). Returns how many transfers it ended. */
int kvt_receiver_cancel(kvt_receiver_t *r, uint64_t request_id);
void *kvt_receiver_socket(kvt_receiver_t *r);
/* The endpoint actually bound (resolves tcp port 0 / wildcard ports). */
const char *kvt_receiver_endpoint(const kvt_receiver_t *r);

/* ---- shared-memory pools (same-host data path) ---- */

/* Creates a KV pool of bytes (zeroed, page aligned) in a new POSIX shared-memory object with an
 * unguessable name, written to name (give it to kvt_sender_params_t.pool_shm_name). Returns the mapping, or
 * NULL (reason in name) on failure. The caller owns both: kvt_shm_pool_destroy unmaps and unlinks.
 * Any thread. */
void *kvt_shm_pool_create(size_t bytes, char *name, size_t name_cap);
/* Unmaps the pool and removes its name; receivers that mapped it keep their mapping until they drop the
 * peer. Accepts NULL. */
void kvt_shm_pool_destroy(void *base, size_t bytes, const char *name);
/* Removes the pools that processes which no longer exist left behind (killed before kvt_shm_pool_destroy: each
 * holds its whole size of RAM until removed). Call at startup of a process that creates pools. Returns how many it
 * removed. Names whose process is alive, or cannot be told (another user's), are left alone. */
int kvt_shm_sweep_stale(void);

/* One pool as an allocator with the signatures of eng_params_t.kv_host_alloc / kv_host_free (ctx = this struct), so an
 * engine puts its KV pool (or host mirror) straight into shared memory. One allocation per struct. */
typedef struct {
    char name[96]; /* the pool's name once allocated: kvt_sender_params_t.pool_shm_name */
    void *base;
    size_t bytes;
    char err[160]; /* why kvt_shm_alloc returned NULL */
} kvt_shm_alloc_t;
void *kvt_shm_alloc(void *ctx, size_t bytes);
void kvt_shm_free(void *ctx, void *p, size_t bytes);

/* Counters for tests and /metrics. */
typedef struct {
    uint64_t transfers_started, transfers_done, transfers_failed;
    uint64_t payload_bytes, frames_dropped_stale;
    int32_t active_transfers;
    int32_t reserved_blocks;       /* blocks currently held for unfinished transfers */
    uint64_t shm_payload_bytes;    /* of payload_bytes, those copied through the shared pool */
    int32_t shm_peers;             /* receiver: peers whose pool is mapped; sender: 1 while the peer maps ours */
    uint64_t striped_msgs;         /* payload messages sent / received on a connection other than a sender's first */
    uint64_t device_payload_bytes; /* of payload_bytes, those copied device to device (counted as if they were sent) */
    int32_t device_peers;          /* receiver: peers whose device pool is mapped; sender: 1 while the peer maps ours */
} kvt_stats_t;

void kvt_sender_stats(const kvt_sender_t *s, kvt_stats_t *out);
void kvt_receiver_stats(const kvt_receiver_t *r, kvt_stats_t *out);

#endif
