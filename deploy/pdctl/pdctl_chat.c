/* pdctl_chat.c: `pdctl chat`: a REPL over the router's native API (router/rt_native.h: a DEALER socket, one
 * packed ClientMessage per frame out, one packed ResponseChunk per frame back). It keeps the conversation as
 * chat messages and prints each answer as its chunks stream in. It renders no template and tokenizes nothing:
 * the router does. With stdin not a terminal it reads one prompt per line (scripts and tests drive it so). */
#define _GNU_SOURCE /* getline, sigaction */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#include "pb.h"
#include "pd_common.h"
#include "pdctl.h"

enum {
    CHAT_SEND_TIMEOUT_MS = 5000, /* no connection to the router within this: say so instead of hanging */
    CHAT_CANCEL_GRACE_MS = 5000, /* after a cancel, how long to wait for the request's last chunk */
    CHAT_GRACE_MS = 5000,        /* the server ends a request by its deadline; allow this much past it */
    CHAT_MAX_MESSAGES = 1024,    /* pb_api_limits_default's max_chat_messages */
    CHAT_ROLE_SYSTEM = 0,
    CHAT_ROLE_USER = 1,
    CHAT_ROLE_ASSISTANT = 2,
};

static const char *const s_roles[] = {"system", "user", "assistant"};

typedef struct {
    const char *api, *system, *model;
    int64_t max_tokens, timeout_s;
    bool ignore_eos;
    char *stops[PB_MAX_STOP]; /* borrowed from argv */
    int n_stops;
    Pdserve__V1__SamplingParams sp;
} chat_opts_t;

typedef struct {
    int role;      /* CHAT_ROLE_* */
    char *content; /* owned */
} chat_msg_t;

typedef struct {
    chat_opts_t o;
    void *zctx, *sock;
    chat_msg_t msgs[CHAT_MAX_MESSAGES];
    int n_msgs;
    uint64_t next_id;
    bool is_tty;
} chat_t;

/* Set by SIGINT: the loop cancels the request in flight, or leaves at the prompt. */
static volatile sig_atomic_t s_interrupted;

static void s_on_sigint(int sig) {
    (void)sig;
    s_interrupted = 1;
}

static void s_help(void) {
    printf("usage: pdctl chat [options]\n"
           "Chat with a running router over its native API. Commands: /reset (forget the conversation),\n"
           "/quit (or Ctrl-D). Ctrl-C stops the answer being written. With stdin not a terminal, each line\n"
           "is one prompt and each answer one line of output.\n"
           "  --api URI                 the router's native API (default tcp://127.0.0.1:5551)\n"
           "  --system TEXT             system message opening the conversation\n"
           "  --model ID                model id (default: the router's default model)\n"
           "  --max-tokens N            tokens per answer, 1..1048576 (default 512)\n"
           "  --timeout S               seconds per answer, sent as the request's deadline (default 300)\n"
           "  --temperature T           0 = greedy, up to 100 (default 0.8)\n"
           "  --top-k K                 0 = off (default 40)\n"
           "  --top-p P                 (0, 1] (default 0.95)\n"
           "  --min-p P                 [0, 1] (default 0.05)\n"
           "  --repetition-penalty R    (0, 10] (default 1 = off)\n"
           "  --presence-penalty P      [-2, 2] (default 0)\n"
           "  --frequency-penalty F     [-2, 2] (default 0)\n"
           "  --seed S                  sampling seed (default: the server picks one per answer)\n"
           "  --stop TEXT               stop string, repeatable up to %d times\n"
           "  --ignore-eos              keep generating past end-of-turn tokens\n",
           PB_MAX_STOP);
}

/* A float flag into a SamplingParams field. */
static bool s_parse_float(const char *f, const char *v, double lo, double hi, float *out) {
    double d;
    if (!pdctl_parse_f64(f, v, lo, hi, &d)) return false;
    *out = (float)d;
    return true;
}

/* Returns 0 to go on, or an exit code (0 for --help, 2 for a usage error). */
static int s_parse(int argc, char **argv, chat_opts_t *o, bool *done) {
    static const Pdserve__V1__SamplingParams sp_init = PDSERVE__V1__SAMPLING_PARAMS__INIT;
    *done = false;
    o->api = "tcp://127.0.0.1:5551";
    o->max_tokens = 512, o->timeout_s = 300;
    o->sp = sp_init; /* pdctl generate's defaults, so both commands sample alike */
    o->sp.temperature = 0.8f, o->sp.top_k = 40, o->sp.top_p = 0.95f, o->sp.min_p = 0.05f;
    o->sp.repetition_penalty = 1.f;
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int64_t iv = 0;
        bool ok = true;
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            s_help();
            *done = true;
            return 0;
        }
        if (!strcmp(f, "--ignore-eos")) {
            o->ignore_eos = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "pdctl chat: %s needs a value (see --help)\n", f);
            return 2;
        }
        i++;
        if (!strcmp(f, "--api"))
            o->api = v;
        else if (!strcmp(f, "--system"))
            o->system = v;
        else if (!strcmp(f, "--model"))
            o->model = v;
        else if (!strcmp(f, "--stop")) {
            ok = o->n_stops < PB_MAX_STOP && strlen(v) >= 1 && strlen(v) <= PB_MAX_STOP_BYTES;
            if (!ok)
                fprintf(stderr, "pdctl chat: at most %d --stop strings of 1..%d bytes\n", PB_MAX_STOP,
                        PB_MAX_STOP_BYTES);
            if (ok) o->stops[o->n_stops++] = argv[i];
        } else if (!strcmp(f, "--max-tokens"))
            ok = pdctl_parse_i64(f, v, 1, 1 << 20, &o->max_tokens);
        else if (!strcmp(f, "--timeout"))
            ok = pdctl_parse_i64(f, v, 1, 86400, &o->timeout_s);
        else if (!strcmp(f, "--top-k"))
            ok = pdctl_parse_i64(f, v, 0, 1 << 30, &iv), o->sp.top_k = (int32_t)iv;
        else if (!strcmp(f, "--seed"))
            ok = pdctl_parse_i64(f, v, 0, INT64_MAX, &iv), o->sp.seed = (uint64_t)iv, o->sp.has_seed = true;
        else if (!strcmp(f, "--temperature"))
            ok = s_parse_float(f, v, 0, 100, &o->sp.temperature);
        else if (!strcmp(f, "--top-p"))
            ok = s_parse_float(f, v, 1e-9, 1, &o->sp.top_p);
        else if (!strcmp(f, "--min-p"))
            ok = s_parse_float(f, v, 0, 1, &o->sp.min_p);
        else if (!strcmp(f, "--repetition-penalty"))
            ok = s_parse_float(f, v, 1e-9, 10, &o->sp.repetition_penalty);
        else if (!strcmp(f, "--presence-penalty"))
            ok = s_parse_float(f, v, -2, 2, &o->sp.presence_penalty);
        else if (!strcmp(f, "--frequency-penalty"))
            ok = s_parse_float(f, v, -2, 2, &o->sp.frequency_penalty);
        else {
            fprintf(stderr, "pdctl chat: unknown option '%s' (see --help)\n", f);
            return 2;
        }
        if (!ok) return 2;
    }
    char err[256];
    if (pb_validate_sampling(&o->sp, err, sizeof err) != PD_OK) {
        fprintf(stderr, "pdctl chat: %s\n", err);
        return 2;
    }
    return 0;
}

/* ---- the conversation ---- */

static void s_push(chat_t *c, int role, const char *content, size_t len) {
    c->msgs[c->n_msgs].role = role;
    c->msgs[c->n_msgs].content = pd_xmalloc(len + 1);
    memcpy(c->msgs[c->n_msgs].content, content, len);
    c->msgs[c->n_msgs++].content[len] = '\0';
}

static void s_pop(chat_t *c) {
    free(c->msgs[--c->n_msgs].content);
}

static void s_reset(chat_t *c) {
    while (c->n_msgs > 0) s_pop(c);
    if (c->o.system) s_push(c, CHAT_ROLE_SYSTEM, c->o.system, strlen(c->o.system));
}

/* ---- the wire ---- */

static bool s_send_msg(chat_t *c, const Pdserve__V1__ClientMessage *cm) {
    size_t n = pb_packed_size(&cm->base);
    uint8_t *buf = pd_xmalloc(n ? n : 1);
    bool ok = pb_pack(&cm->base, buf, n) == (int64_t)n && zmq_send(c->sock, buf, n, 0) == (int)n;
    if (!ok)
        fprintf(stderr, "pdctl chat: cannot send to %s: %s\n", c->o.api,
                zmq_errno() == EAGAIN ? "no connection (is the router running?)" : zmq_strerror(zmq_errno()));
    free(buf);
    return ok;
}

/* The whole conversation so far (ending with the user's new message) as one streaming request. */
static bool s_send_request(chat_t *c, uint64_t id) {
    Pdserve__V1__GenerateRequest g = PDSERVE__V1__GENERATE_REQUEST__INIT;
    Pdserve__V1__ChatMessages chat = PDSERVE__V1__CHAT_MESSAGES__INIT;
    Pdserve__V1__ChatMessage m[CHAT_MAX_MESSAGES], *pm[CHAT_MAX_MESSAGES];
    for (int i = 0; i < c->n_msgs; i++) {
        m[i] = (Pdserve__V1__ChatMessage)PDSERVE__V1__CHAT_MESSAGE__INIT;
        m[i].role = (char *)s_roles[c->msgs[i].role];
        m[i].content = c->msgs[i].content;
        pm[i] = &m[i];
    }
    chat.n_messages = (size_t)c->n_msgs;
    chat.messages = pm;
    g.request_id = id;
    g.model = (char *)(c->o.model ? c->o.model : "");
    g.prompt_case = PDSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT;
    g.chat = &chat;
    g.sampling = &c->o.sp;
    g.max_tokens = (uint32_t)c->o.max_tokens;
    g.n_stop = (size_t)c->o.n_stops;
    g.stop = c->o.stops;
    g.timeout_ms = (uint32_t)(c->o.timeout_s * 1000);
    g.stream = true;
    g.ignore_eos = c->o.ignore_eos;
    Pdserve__V1__ClientMessage cm = PDSERVE__V1__CLIENT_MESSAGE__INIT;
    cm.body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY_GENERATE;
    cm.generate = &g;
    return s_send_msg(c, &cm);
}

static void s_send_cancel(chat_t *c, uint64_t id) {
    Pdserve__V1__CancelRequest cr = PDSERVE__V1__CANCEL_REQUEST__INIT;
    Pdserve__V1__ClientMessage cm = PDSERVE__V1__CLIENT_MESSAGE__INIT;
    cr.request_id = id;
    cm.body_case = PDSERVE__V1__CLIENT_MESSAGE__BODY_CANCEL;
    cm.cancel = &cr;
    (void)s_send_msg(c, &cm); /* a failure is printed; the answer's deadline still ends the wait */
}

/* Outcome of one answer. */
typedef struct {
    char *text; /* what was printed, owned */
    size_t len, cap;
    int finish; /* Pdserve__V1__FinishReason; FINISH_NONE = no last chunk came */
    char error[PB_MAX_ERROR_BYTES + 64];
} chat_answer_t;

/* One chunk of request id: print its text, keep it, note the end. Chunks of other ids (a cancelled earlier
 * answer) are dropped; request_id 0 is the router's answer to a frame it could not read: ours. */
static void s_on_chunk(chat_answer_t *a, uint64_t id, const Pdserve__V1__ResponseChunk *ch) {
    if (ch->request_id != id && ch->request_id != 0) return;
    size_t n = ch->text ? strlen(ch->text) : 0;
    if (n) {
        fwrite(ch->text, 1, n, stdout);
        fflush(stdout);
        if (a->len + n + 1 > a->cap) {
            a->cap = (a->len + n + 1) * 2;
            a->text = pd_xrealloc(a->text, a->cap);
        }
        memcpy(a->text + a->len, ch->text, n);
        a->len += n;
    }
    a->finish = ch->finish_reason;
    if (ch->finish_reason == PDSERVE__V1__FINISH_REASON__FINISH_ERROR)
        snprintf(a->error, sizeof a->error, "%s: %s", pb_error_code_name(ch->error ? ch->error->code : 0),
                 ch->error && ch->error->message ? ch->error->message : "(no message)");
}

/* Waits for the chunks of request id until its last one, the deadline, or Ctrl-C (which cancels it). */
static void s_receive(chat_t *c, uint64_t id, chat_answer_t *a) {
    uint64_t deadline = pd_now_us() + (uint64_t)(c->o.timeout_s * 1000 + CHAT_GRACE_MS) * 1000;
    bool is_cancelled = false;
    while (a->finish == PDSERVE__V1__FINISH_REASON__FINISH_NONE) {
        if (s_interrupted && !is_cancelled) {
            s_interrupted = 0;
            is_cancelled = true;
            s_send_cancel(c, id);
            deadline = pd_now_us() + CHAT_CANCEL_GRACE_MS * 1000ull;
        }
        if (pd_now_us() >= deadline) {
            if (!is_cancelled) s_send_cancel(c, id);
            snprintf(a->error, sizeof a->error, "no answer from %s within %lld s", c->o.api,
                     (long long)(is_cancelled ? CHAT_CANCEL_GRACE_MS / 1000 : c->o.timeout_s));
            a->finish = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
            return;
        }
        zmq_pollitem_t it = {c->sock, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&it, 1, 100) <= 0) continue; /* EINTR from Ctrl-C included: the loop top handles it */
        zmq_msg_t m;
        zmq_msg_init(&m);
        while (a->finish == PDSERVE__V1__FINISH_REASON__FINISH_NONE && zmq_msg_recv(&m, c->sock, ZMQ_DONTWAIT) >= 0) {
            Pdserve__V1__ResponseChunk *ch = NULL;
            char err[256];
            if (pb_unpack_response_chunk(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL, &ch, err, sizeof err) == PD_OK &&
                pb_validate_response_chunk(ch, 0, err, sizeof err) == PD_OK)
                s_on_chunk(a, id, ch);
            else
                fprintf(stderr, "pdctl chat: dropped a bad chunk from the router: %s\n", err);
            pb_free_response_chunk(&ch, NULL);
        }
        zmq_msg_close(&m);
    }
}

/* One exchange: the user's line out, the answer streamed to stdout. False when it ended in an error (printed
 * as one line on stderr); the conversation then stays as it was before the line. */
static bool s_turn(chat_t *c, const char *line) {
    if (c->n_msgs + 2 > CHAT_MAX_MESSAGES) {
        fprintf(stderr, "pdctl chat: the conversation has %d messages, the most one request holds; /reset\n",
                c->n_msgs);
        return false;
    }
    s_push(c, CHAT_ROLE_USER, line, strlen(line));
    uint64_t id = ++c->next_id;
    chat_answer_t a = {.finish = PDSERVE__V1__FINISH_REASON__FINISH_NONE};
    s_interrupted = 0;
    if (s_send_request(c, id))
        s_receive(c, id, &a);
    else
        a.finish = PDSERVE__V1__FINISH_REASON__FINISH_ERROR;
    printf("\n");
    fflush(stdout);
    bool ok =
        a.finish == PDSERVE__V1__FINISH_REASON__FINISH_STOP || a.finish == PDSERVE__V1__FINISH_REASON__FINISH_LENGTH;
    if (ok)
        s_push(c, CHAT_ROLE_ASSISTANT, a.text ? a.text : "", a.len);
    else
        s_pop(c);
    if (a.finish == PDSERVE__V1__FINISH_REASON__FINISH_CANCELLED) fprintf(stderr, "pdctl chat: (cancelled)\n");
    if (a.finish == PDSERVE__V1__FINISH_REASON__FINISH_ERROR && a.error[0])
        fprintf(stderr, "pdctl chat: %s\n", a.error);
    free(a.text);
    return ok;
}

static bool s_connect(chat_t *c) {
    int linger = 500, immediate = 1, send_ms = CHAT_SEND_TIMEOUT_MS, hb_ivl = 1000, hb_timeout = 3000;
    int64_t max_msg = PB_CAP_RESPONSE_CHUNK_BYTES;
    c->zctx = zmq_ctx_new();
    c->sock = c->zctx ? zmq_socket(c->zctx, ZMQ_DEALER) : NULL;
    if (!c->sock) {
        fprintf(stderr, "pdctl chat: zmq: %s\n", zmq_strerror(zmq_errno()));
        return false;
    }
    /* IMMEDIATE + a send timeout: a router that is not there is reported, not queued for forever. */
    zmq_setsockopt(c->sock, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(c->sock, ZMQ_IMMEDIATE, &immediate, sizeof immediate);
    zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &send_ms, sizeof send_ms);
    zmq_setsockopt(c->sock, ZMQ_MAXMSGSIZE, &max_msg, sizeof max_msg);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_IVL, &hb_ivl, sizeof hb_ivl);
    zmq_setsockopt(c->sock, ZMQ_HEARTBEAT_TIMEOUT, &hb_timeout, sizeof hb_timeout);
    if (zmq_connect(c->sock, c->o.api) != 0) {
        fprintf(stderr, "pdctl chat: cannot connect to %s: %s\n", c->o.api, zmq_strerror(zmq_errno()));
        return false;
    }
    return true;
}

/* Reads lines until EOF, /quit or Ctrl-C at the prompt. Returns the exit code. */
static int s_repl(chat_t *c) {
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    bool any_failed = false;
    if (c->is_tty)
        fprintf(stderr, "pdctl chat: %s; /reset clears the conversation, /quit or Ctrl-D leaves\n", c->o.api);
    for (;;) {
        if (c->is_tty) {
            printf("> ");
            fflush(stdout);
        }
        s_interrupted = 0;
        errno = 0;
        if ((len = getline(&line, &cap, stdin)) < 0) {
            if (c->is_tty) printf("\n");
            break; /* EOF, or Ctrl-C at the prompt (EINTR) */
        }
        while (len > 0 && (line[len - 1] == '\n' || line[len - 1] == '\r')) line[--len] = '\0';
        if (len == 0) continue;
        if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
        if (!strcmp(line, "/reset")) {
            s_reset(c);
            if (c->is_tty) fprintf(stderr, "pdctl chat: (conversation cleared)\n");
            continue;
        }
        if (!s_turn(c, line)) any_failed = true;
    }
    free(line);
    return !c->is_tty && any_failed ? 1 : 0;
}

int pdctl_chat(int argc, char **argv) {
    chat_t *c = pd_xcalloc(1, sizeof *c);
    struct sigaction sa = {.sa_handler = s_on_sigint}, old;
    bool done, has_handler = false;
    int rc = s_parse(argc, argv, &c->o, &done);
    if (rc || done) goto fail;
    rc = 1;
    c->is_tty = isatty(0);
    if (!s_connect(c)) goto fail;
    /* No SA_RESTART: Ctrl-C must interrupt getline at the prompt and zmq_poll during an answer. */
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    has_handler = true;
    s_reset(c);
    rc = s_repl(c);
fail:
    if (has_handler) sigaction(SIGINT, &old, NULL);
    while (c->n_msgs > 0) s_pop(c);
    if (c->sock) zmq_close(c->sock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    free(c);
    return rc;
}
