/* kvt_int.h: private to kvtransfer/ (and its tests and fuzz target): wire helpers shared by sender and
 * receiver, dtype conversion, and the socket-free entry points the tests and the fuzzer drive. */
#ifndef KVT_INT_H
#define KVT_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kvt.h"
#include "pdserve_kv.pb-c.h"

#define KVT_MAX_PAYLOAD_FRAMES    1024u         /* payload frames in one KvData message (2 per block-layer) */
#define KVT_MAX_ENVELOPE_BYTES    (32u * 1024u) /* one packed KvEnvelope; KvData with 1024 checksums ~ 9 KiB */
#define KVT_MAX_MSG_PAYLOAD_BYTES (16u << 20)   /* the sender's own cap on payload bytes per message */
#ifndef KVT_SOCK_MSG_BYTES
#define KVT_SOCK_MSG_BYTES (1u << 20) /* the sender's target per message over a socket (at least a block-layer) */
#endif
#define KVT_MAX_SHM_MSG_BYTES (1u << 20) /* ... when the payload goes through the shared pool */
#ifndef KVT_SHM_WINDOW_BYTES
#define KVT_SHM_WINDOW_BYTES (4u << 20) /* shared pool: payload bytes the sender runs ahead (cache-sized) */
#endif
#define KVT_MAX_TIMEOUT_MS 600000 /* longest reservation a peer may ask for */
#define KVT_MAX_PEERS      64     /* sender connections a receiver tracks at once */
#define KVT_SNDHWM         100000 /* messages; see README "ZeroMQ options" */
#define KVT_RCVHWM         100000

/* ---- wire (kvt_wire.c) ---- */

/* pb->model_id points into f: f must outlive pb. */
void kvt_fp_to_pb(const kvt_fingerprint_t *f, Pdserve__V1__Fingerprint *pb);
/* PD_EPROTO + reason for an unusable fingerprint (model_id too long, unknown dtype, version). */
PD_NODISCARD pd_status kvt_fp_from_pb(const Pdserve__V1__Fingerprint *pb, kvt_fingerprint_t *f, char *err,
                                      size_t err_cap);
Pdserve__V1__KvDtype kvt_dtype_to_pb(eng_kv_dtype_t dt);
/* false for UNSPECIFIED or an unknown value. */
bool kvt_dtype_from_pb(int pb, eng_kv_dtype_t *out);
pd_status kvt_status_from_code(int code);
int kvt_code_from_status(pd_status st);

/* Bytes of K and V of n_layers layers of n_blocks blocks in layout l: what a device-to-device message moves. */
static inline uint64_t kvt_layers_bytes(const eng_kv_layout_t *l, int32_t n_layers, int32_t n_blocks) {
    return (uint64_t)n_layers * (uint64_t)n_blocks * 2u * eng_kv_chunk_bytes(l);
}

/* Packs env into buf (cap bytes) and sends it non-blocking, after the routing frame id (if id != NULL) and
 * with ZMQ_SNDMORE if has_more. PD_OK, PD_EAGAIN (high-water mark / no peer), PD_EIO otherwise
 * (EHOSTUNREACH: the peer is gone). Nothing is sent unless everything before the payloads went out. */
PD_NODISCARD pd_status kvt_send_env(void *sock, const void *id, size_t id_len, const Pdserve__V1__KvEnvelope *env,
                                    uint8_t *buf, size_t cap, bool has_more);
/* Unpacks an envelope of at most KVT_MAX_ENVELOPE_BYTES with a body set; NULL otherwise. Free with
 * pdserve__v1__kv_envelope__free_unpacked(env, NULL). */
Pdserve__V1__KvEnvelope *kvt_env_unpack(const void *data, size_t len);
/* LINGER, heartbeats and high-water marks common to both sockets. */
PD_NODISCARD pd_status kvt_socket_setup(void *sock, int linger_ms, int heartbeat_ivl_ms, char *err, size_t err_cap);
/* tcp://host:port with a concrete host, ipc://path or inproc://name. */
PD_NODISCARD pd_status kvt_endpoint_check(const char *ep, char *err, size_t err_cap);
/* Copies at most cap-1 bytes of a protobuf string that may be NULL. */
void kvt_copy_str(char *dst, size_t cap, const char *src);

/* ---- shared memory (kvt_shm.c) ---- */

/* Maps the shared pool a sender offered, read-only: *base and *bytes on PD_OK. PD_EIO when it cannot be
 * opened or is smaller than bytes (another host or IPC namespace): the peer then uses sockets. */
PD_NODISCARD pd_status kvt_shm_map(const char *name, uint64_t bytes, const void **base);
void kvt_shm_unmap(const void *base, uint64_t bytes);

/* ---- checksums (kvt_hash.c): XXH3-64 built for this target's vector width; any thread ---- */

typedef struct {
    _Alignas(64) unsigned char opaque[768]; /* an XXH3_state_t (checked in kvt_hash.c) */
} kvt_hash_t;

uint64_t kvt_hash64(const void *p, size_t n);
void kvt_hash_reset(kvt_hash_t *h);
void kvt_hash_update(kvt_hash_t *h, const void *p, size_t n);
uint64_t kvt_hash_digest(const kvt_hash_t *h);

/* ---- dtype conversion (kvt_convert.c): exact up-conversion, round-to-nearest-even down-conversion ---- */

uint16_t kvt_f32_to_f16(float x);
float kvt_f16_to_f32(uint16_t h);
uint16_t kvt_f32_to_bf16(float x);
float kvt_bf16_to_f32(uint16_t b);
/* n elements from src (src_dt) to dst (dst_dt); memcpy when the dtypes are equal. */
void kvt_convert(void *dst, eng_kv_dtype_t dst_dt, const void *src, eng_kv_dtype_t src_dt, size_t n);
/* memcpy with non-temporal stores where the CPU has them (x86 SSE2); call kvt_copy_fence before another
 * thread may read dst. */
void kvt_copy_stream(void *dst, const void *src, size_t n);
void kvt_copy_fence(void);

/* ---- the receiver's copy team (kvt_team.c) ---- */

/* One item of a job: false + reason in why on failure. scratch: the running thread's own (scratch_bytes). */
typedef bool (*kvt_team_fn)(void *ctx, size_t i, uint8_t *scratch, char *why, size_t cap);
typedef struct kvt_team kvt_team_t;
/* n_helpers threads that join the thread calling kvt_team_run; NULL if none could start. */
kvt_team_t *kvt_team_create(int n_helpers, size_t scratch_bytes);
void kvt_team_destroy(kvt_team_t **t);
/* fn(ctx, i, ...) for every i in [0, n), dealt one at a time to the caller (with its scratch) and the helpers; returns
 * once every started item is done (their non-temporal stores fenced). After a failure no more items start: false with
 * the first failure's reason in why. One job at a time (the receiver's poll thread). */
bool kvt_team_run(kvt_team_t *t, kvt_team_fn fn, void *ctx, size_t n, uint8_t *scratch, char *why, size_t cap);

/* ---- entry points for tests and the fuzzer ---- */

/* Processes one multipart message as if it arrived from the peer with routing id peer_id: frames[0] is the
 * envelope, frames[1..n) the payloads. Replies go to the ROUTER socket (dropped if no such peer). Events
 * queue inside r (kvt_receiver_poll(r, 0, ...) delivers them); call it only with room for 4 more events
 * (kvt_receiver_has_room). Never trusts anything in the frames. */
void kvt_receiver_handle_frames(kvt_receiver_t *r, const void *peer_id, size_t peer_len, const void *const *frames,
                                const size_t *sizes, size_t n);
bool kvt_receiver_has_room(const kvt_receiver_t *r);
/* Ends every transfer (releasing its blocks), forgets every peer and zeroes the stats: the fuzzer reuses one
 * receiver (and its socket) for all inputs. */
void kvt_receiver_reset(kvt_receiver_t *r);
/* Test hook: the next KvData of this transfer goes out with a wrong checksum for its first frame. */
PD_NODISCARD pd_status kvt_sender_test_corrupt(kvt_sender_t *s, uint64_t transfer_id);
/* ... for its frame 0 (K) or 1 (V). */
PD_NODISCARD pd_status kvt_sender_test_corrupt_frame(kvt_sender_t *s, uint64_t transfer_id, int32_t frame);

#endif
