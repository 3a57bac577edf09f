/* pdctl_up.c: `pdctl up`: a whole cluster on this machine. Picks free loopback ports, writes one JSON config
 * (a temp file) for every service, starts pd-router, N pd-prefill and M pd-decode as child processes, prefixes
 * their output with their names, waits for their ready lines, then supervises: an unexpected exit is reported
 * and restarted (at most UP_MAX_RESTARTS a minute); SIGINT / SIGTERM stops every child (SIGTERM, then SIGKILL
 * after a timeout). It never talks to the services itself: readiness is their `pd-<service> ready` line. */
#define _GNU_SOURCE /* pipe2, mkstemps, prctl */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <limits.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "eng_gguf.h"
#include "pd_common.h"
#include "pdctl.h"

enum {
    UP_MAX_WORKERS = 64,   /* per pool */
    UP_MAX_PASS = 64,      /* --section.key=value options passed through */
    UP_LINE_BYTES = 4096,  /* a longer child output line is printed in pieces */
    UP_MAX_RESTARTS = 3,   /* unexpected exits of one child per UP_RESTART_WINDOW_US before we give up */
    UP_MAX_ID_BYTES = 128, /* model id */
    UP_EP_BYTES = 256,     /* endpoints and URLs */
    UP_ARGV_FIXED = 8,     /* exe, --config, path, id, threads, gpu, NULL, and slack */
    UP_MAX_GPUS = 64,      /* devices in --gpus */
};
#define UP_RESTART_WINDOW_US (60ull * 1000000)
#define UP_RESTART_DELAY_US  (1000000ull) /* lets a crash loop show in the log at human speed */

typedef enum { UP_ROUTER, UP_PREFILL, UP_DECODE } up_role_t;
typedef enum { UP_STARTING, UP_RUNNING, UP_STOPPING } up_phase_t;

static const char *const s_exe_names[] = {"pd-router", "pd-prefill", "pd-decode"};
static const char *const s_sections[] = {"router", "prefill", "decode"};

typedef struct {
    int fd;     /* read end of the child's stdout or stderr pipe; -1 = closed */
    size_t len; /* bytes of an unfinished line in buf */
    char buf[UP_LINE_BYTES];
} up_stream_t;

typedef struct {
    char name[32]; /* "router", "prefill-0", "decode-1": the prefix of its output lines */
    up_role_t role;
    char *argv[UP_ARGV_FIXED + UP_MAX_PASS]; /* [0] borrowed exe path; the rest owned; NULL-terminated */
    pid_t pid;                               /* 0 = not running */
    bool is_ready;                           /* printed its ready line since it was last started */
    bool has_started;                        /* started at least once (a later ready line is a restart's) */
    up_stream_t out, err;
    uint64_t exits_us[UP_MAX_RESTARTS]; /* times of its recent unexpected exits, oldest first */
    int n_exits;
    uint64_t restart_at_us; /* pending restart; 0 = none */
    char ready_line[512];
} up_child_t;

typedef struct {
    const char *model, *config_path, *bin_dir;
    int64_t n_prefill, n_decode, port, threads, ready_timeout_s, stop_timeout_s;
    bool has_port, has_model;
    char *pass[UP_MAX_PASS]; /* owned "--section.key=value" */
    int n_pass;
    int32_t gpus[UP_MAX_GPUS]; /* --gpus: workers' devices, dealt round robin (prefill workers first) */
    int n_gpus;
    const char *mps; /* --mps auto, on or off */
} up_opts_t;

typedef struct {
    up_opts_t o;
    char exe[3][PATH_MAX]; /* by up_role_t */
    up_child_t *kids;      /* [0] router, then prefill, then decode */
    int n_kids;
    char cfg_path[PATH_MAX];
    char model_id[UP_MAX_ID_BYTES + 1];
    char http_fallback[UP_EP_BYTES]; /* URL from the config, used if the ready line does not say */
    up_phase_t phase;
    int rc;
    uint64_t deadline_us; /* ready deadline while starting, SIGKILL deadline while stopping */
    bool is_killed;
    pdctl_mps_t mps;
} up_t;

/* The signal handler's only way out: the write end of a self-pipe the loop polls. */
static int s_sig_fd = -1;

static void s_on_signal(int sig) {
    int saved = errno;
    char c = sig == SIGCHLD ? 'C' : 'T';
    ssize_t n = write(s_sig_fd, &c, 1);
    (void)n; /* a full pipe already holds a wake-up */
    errno = saved;
}

static void s_help(void) {
    printf("usage: pdctl up [options] [--section.key=value ...]\n"
           "Runs pd-router, N pd-prefill and M pd-decode on this machine and supervises them.\n"
           "  --model PATH           GGUF model (default %s)\n"
           "  --prefill N            prefill workers, 0..%d (default 1; 0 = decode workers prefill locally)\n"
           "  --decode M             decode workers, 1..%d (default 1)\n"
           "  --port P               HTTP port of the router, 0 = any free one (default 8000)\n"
           "  --threads T            compute threads shared by all workers, at least 1 each (default: cores)\n"
           "  --config FILE          JSON config with router/prefill/decode/engine sections; pdctl up fills in\n"
           "                         only what it leaves out (ports, model), flags above win over it\n"
           "  --bin-dir DIR          where pd-router, pd-prefill, pd-decode are (default: next to pdctl,\n"
           "                         the build tree's router/ prefill/ decode/, then PATH)\n"
           "  --ready-timeout S      seconds to wait for every ready line (default 120)\n"
           "  --stop-timeout S       seconds between SIGTERM and SIGKILL when stopping (default 40)\n"
           "  --spec MODE            speculative decoding on the decode workers: off, ngram or draft\n"
           "                         (= --decode.spec=MODE; see pd-decode --help for decode.spec_k etc.)\n"
           "  --draft-model PATH     the draft model of --spec draft (= --decode.draft_model=PATH)\n"
           "  --backend cpu|cuda     compute backend of every worker (= --engine.backend; cuda needs a build\n"
           "                         with -DPDSERVE_CUDA=ON); --gpu N picks the device (= --engine.gpu=N)\n"
           "  --gpus A,B,...         workers' devices, dealt round robin in start order (prefill-0, prefill-1,\n"
           "                         ..., decode-0, ...): --gpus 0,1 puts 1 prefill + 1 decode on a GPU each;\n"
           "                         overrides --gpu\n"
           "  --mps auto|on|off      a private CUDA MPS daemon for the workers, so that workers sharing a GPU run\n"
           "                         their kernels side by side instead of taking turns; auto (default): with the\n"
           "                         cuda backend when two workers share a device and %s is in\n"
           "                         PATH and CUDA_MPS_PIPE_DIRECTORY is unset (an MPS of your own is used as is)\n"
           "  --section.key=value    passed to the services that own the section (router.* to the router,\n"
           "                         prefill.* / decode.* to that pool, engine.* to both pools)\n",
           pdctl_default_model(), UP_MAX_WORKERS, UP_MAX_WORKERS, PDCTL_MPS_CONTROL);
}

/* "--section.key" with section [a-z_]+: an option for the services. */
static bool s_is_service_opt(const char *f) {
    if (strncmp(f, "--", 2)) return false;
    const char *p = f + 2;
    while ((*p >= 'a' && *p <= 'z') || *p == '_' || (*p >= '0' && *p <= '9')) p++;
    return p > f + 2 && *p == '.';
}

/* Adds "key=value" (or key alone when value is NULL: it holds its "=value") to the options passed to the services.
 * False (message printed) when there are UP_MAX_PASS already. */
static bool s_add_pass(up_opts_t *o, const char *key, const char *value) {
    if (o->n_pass == UP_MAX_PASS) {
        fprintf(stderr, "pdctl up: at most %d --section.key options\n", UP_MAX_PASS);
        return false;
    }
    size_t n = strlen(key) + (value ? strlen(value) + 1 : 0) + 1;
    o->pass[o->n_pass] = pd_xmalloc(n);
    snprintf(o->pass[o->n_pass++], n, "%s%s%s", key, value ? "=" : "", value ? value : "");
    return true;
}

/* "0,1,3": device indices (0..64, at most UP_MAX_GPUS). False (message printed) when malformed. */
static bool s_parse_gpus(const char *v, up_opts_t *o) {
    o->n_gpus = 0;
    for (const char *p = v; *p;) {
        char *end;
        errno = 0;
        long g = strtol(p, &end, 10);
        if (end == p || errno || g < 0 || g > 64 || (*end && *end != ',') || o->n_gpus == UP_MAX_GPUS) {
            fprintf(stderr, "pdctl up: --gpus '%s': comma-separated device indices 0..64, at most %d\n", v,
                    UP_MAX_GPUS);
            return false;
        }
        o->gpus[o->n_gpus++] = (int32_t)g;
        p = *end ? end + 1 : end;
    }
    if (o->n_gpus == 0) fprintf(stderr, "pdctl up: --gpus needs at least one device index\n");
    return o->n_gpus > 0;
}

/* Returns 0 to go on, or an exit code (0 for --help, 2 for a usage error). */
static int s_parse(int argc, char **argv, up_opts_t *o, bool *done) {
    *done = false;
    o->model = pdctl_default_model();
    o->n_prefill = 1, o->n_decode = 1, o->port = 8000, o->ready_timeout_s = 120, o->stop_timeout_s = 40;
    o->mps = "auto";
    for (int i = 1; i < argc; i++) {
        const char *f = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        bool ok = true;
        if (!strcmp(f, "--help") || !strcmp(f, "-h")) {
            s_help();
            *done = true;
            return 0;
        }
        if (s_is_service_opt(f)) {
            bool has_value = strchr(f, '=') || !v || !strncmp(v, "--", 2); /* else: "--s.k value" */
            if (!s_add_pass(o, f, has_value ? NULL : v)) return 2;
            i += !has_value;
            continue;
        }
        if (!v) {
            fprintf(stderr, "pdctl up: %s needs a value (see --help)\n", f);
            return 2;
        }
        i++;
        /* shortcuts for decode- and engine-section options: passed through like --section.key=value */
        const char *alias = !strcmp(f, "--spec")          ? "--decode.spec"
                            : !strcmp(f, "--draft-model") ? "--decode.draft_model"
                            : !strcmp(f, "--backend")     ? "--engine.backend"
                            : !strcmp(f, "--gpu")         ? "--engine.gpu"
                                                          : NULL;
        if (alias) {
            if (!s_add_pass(o, alias, v)) return 2;
            continue;
        }
        if (!strcmp(f, "--model"))
            o->model = v, o->has_model = true;
        else if (!strcmp(f, "--gpus"))
            ok = s_parse_gpus(v, o);
        else if (!strcmp(f, "--mps")) {
            o->mps = v;
            ok = !strcmp(v, "auto") || !strcmp(v, "on") || !strcmp(v, "off");
            if (!ok) fprintf(stderr, "pdctl up: --mps '%s': auto, on or off\n", v);
        } else if (!strcmp(f, "--config"))
            o->config_path = v;
        else if (!strcmp(f, "--bin-dir"))
            o->bin_dir = v;
        else if (!strcmp(f, "--prefill"))
            ok = pdctl_parse_i64(f, v, 0, UP_MAX_WORKERS, &o->n_prefill);
        else if (!strcmp(f, "--decode"))
            ok = pdctl_parse_i64(f, v, 1, UP_MAX_WORKERS, &o->n_decode);
        else if (!strcmp(f, "--port"))
            ok = pdctl_parse_i64(f, v, 0, 65535, &o->port), o->has_port = true;
        else if (!strcmp(f, "--threads"))
            ok = pdctl_parse_i64(f, v, 1, 4096, &o->threads);
        else if (!strcmp(f, "--ready-timeout"))
            ok = pdctl_parse_i64(f, v, 1, 86400, &o->ready_timeout_s);
        else if (!strcmp(f, "--stop-timeout"))
            ok = pdctl_parse_i64(f, v, 1, 86400, &o->stop_timeout_s);
        else {
            fprintf(stderr, "pdctl up: unknown option '%s' (see --help)\n", f);
            return 2;
        }
        if (!ok) return 2;
    }
    return 0;
}

/* ---- finding the services, reading the model id, picking ports ---- */

static bool s_try_exe(char *out, const char *dir, const char *sub, const char *name) {
    char path[PATH_MAX];
    int n = snprintf(path, sizeof path, "%s%s%s/%s", dir, sub ? "/" : "", sub ? sub : "", name);
    if (n < 0 || (size_t)n >= sizeof path || access(path, X_OK)) return false;
    if (!realpath(path, out)) snprintf(out, PATH_MAX, "%s", path); /* "build/router/x", not "deploy/../router/x" */
    return true;
}

/* --bin-dir; else next to pdctl; else the build tree (pdctl in build/deploy, services in build/<section>);
 * else PATH. False (message printed) if not found. */
static bool s_find_exe(const up_opts_t *o, up_role_t role, char *out) {
    const char *name = s_exe_names[role];
    if (o->bin_dir) {
        if (s_try_exe(out, o->bin_dir, NULL, name)) return true;
        fprintf(stderr, "pdctl up: no executable %s in --bin-dir %s\n", name, o->bin_dir);
        return false;
    }
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        char *slash = strrchr(self, '/');
        if (slash) *slash = '\0';
        if (s_try_exe(out, self, NULL, name)) return true;
        char up[PATH_MAX];
        snprintf(up, sizeof up, "%.*s/..", (int)(sizeof up - 4), self);
        if (s_try_exe(out, up, s_sections[role], name)) return true;
    }
    if (pdctl_which(name, out)) return true;
    fprintf(stderr, "pdctl up: cannot find %s next to pdctl, in its build tree or in PATH (build it, or --bin-dir)\n",
            name);
    return false;
}

bool pdctl_which(const char *name, char *out) {
    const char *path = getenv("PATH");
    char dir[PATH_MAX];
    for (const char *p = path; p && *p;) {
        size_t len = strcspn(p, ":");
        snprintf(dir, sizeof dir, "%.*s", (int)(len < sizeof dir ? len : sizeof dir - 1), p);
        if (len && s_try_exe(out, dir, NULL, name)) return true;
        p += len + (p[len] == ':');
    }
    return false;
}

/* What the router serves when router.model_id is unset: the file name up to its first dot (router/rt_core.c).
 * Opening the GGUF also proves the file is a readable model before any child starts. */
static bool s_read_model_id(const char *path, char *out, size_t cap) {
    char err[512];
    eng_gguf_t *g = eng_gguf_open(path, err, sizeof err);
    if (!g) {
        fprintf(stderr, "pdctl up: %s (fetch the default model with scripts/fetch_model.sh)\n", err);
        return false;
    }
    eng_gguf_destroy(&g);
    const char *base = strrchr(path, '/');
    base = base ? base + 1 : path;
    size_t n = strcspn(base, ".");
    snprintf(out, cap, "%.*s", (int)(n ? n : strlen(base)), base);
    return true;
}

/* A loopback TCP port nobody listens on now. The socket stays open (returned in *fd) until every port is
 * picked, so two picks never collide; a race with another program remains, as with any such scheme. */
static int s_pick_port(int *fd) {
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    *fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (*fd < 0 || bind(*fd, (struct sockaddr *)&a, sizeof a) || getsockname(*fd, (struct sockaddr *)&a, &len)) {
        fprintf(stderr, "pdctl up: cannot pick a free port: %s\n", strerror(errno));
        return -1;
    }
    return ntohs(a.sin_port);
}

/* ---- the config file ---- */

static json_t *s_section(json_t *root, const char *name) {
    json_t *s = json_object_get(root, name);
    if (!json_is_object(s)) {
        s = json_object();
        json_object_set_new(root, name, s);
    }
    return s;
}

static void s_set_default(json_t *sec, const char *key, json_t *v) {
    if (!json_object_get(sec, key))
        json_object_set_new(sec, key, v);
    else
        json_decref(v);
}

/* Value of "--section.key=value" among the passthrough options (the last wins, as in the services), or NULL. */
static const char *s_pass_value(const up_opts_t *o, const char *name) {
    const char *v = NULL;
    size_t n = strlen(name);
    for (int i = 0; i < o->n_pass; i++)
        if (!strncmp(o->pass[i] + 2, name, n) && o->pass[i][2 + n] == '=') v = o->pass[i] + 3 + n;
    return v;
}

/* Builds the JSON: the user's --config file, then what pdctl up chooses where the file is silent (free ports,
 * the model, the workers' router endpoint), then --model / --port / --prefill 0, which win over the file. */
static json_t *s_build_config(up_t *u) {
    const up_opts_t *o = &u->o;
    json_error_t jerr;
    json_t *root = o->config_path ? json_load_file(o->config_path, JSON_REJECT_DUPLICATES, &jerr) : json_object();
    if (!root || !json_is_object(root)) {
        if (!root && jerr.line > 0)
            fprintf(stderr, "pdctl up: --config %s: line %d: %s\n", o->config_path, jerr.line, jerr.text);
        else
            fprintf(stderr, "pdctl up: --config %s: %s\n", o->config_path,
                    root ? "the top level must be an object with one object per section" : jerr.text);
        json_decref(root);
        return NULL;
    }
    json_t *rt = s_section(root, "router"), *eng = s_section(root, "engine");
    int fds[2] = {-1, -1}, ports[2] = {0, 0};
    const char *keys[2] = {"control", "api"};
    for (int i = 0; i < 2; i++)
        if (!json_object_get(rt, keys[i]) && (ports[i] = s_pick_port(&fds[i])) < 0) break;
    for (int i = 0; i < 2; i++)
        if (fds[i] >= 0) close(fds[i]);
    if (ports[0] < 0 || ports[1] < 0) {
        json_decref(root);
        return NULL;
    }
    for (int i = 0; i < 2; i++)
        if (ports[i] > 0) json_object_set_new(rt, keys[i], json_sprintf("tcp://127.0.0.1:%d", ports[i]));
    if (o->has_model || !json_object_get(rt, "model")) json_object_set_new(rt, "model", json_string(o->model));
    if (o->has_model || !json_object_get(eng, "model")) json_object_set_new(eng, "model", json_string(o->model));
    if (o->has_port || !json_object_get(rt, "http_port")) json_object_set_new(rt, "http_port", json_integer(o->port));
    if (o->n_prefill == 0) json_object_set_new(rt, "min_prefill", json_integer(0));
    /* Workers dial the router's control endpoint, whichever source set it. */
    const char *control = s_pass_value(o, "router.control");
    if (!control) control = json_string_value(json_object_get(rt, "control"));
    if (control) {
        s_set_default(s_section(root, "prefill"), "router", json_string(control));
        s_set_default(s_section(root, "decode"), "router", json_string(control));
    }
    /* Port 0: each decode worker binds its own free KV port and advertises it when it registers. */
    s_set_default(s_section(root, "decode"), "kv_bind", json_string("tcp://127.0.0.1:0"));
    const char *addr = json_string_value(json_object_get(rt, "http_addr"));
    const char *pport = s_pass_value(o, "router.http_port");
    char port[32];
    snprintf(port, sizeof port, "%lld", (long long)json_integer_value(json_object_get(rt, "http_port")));
    snprintf(u->http_fallback, sizeof u->http_fallback, "http://%s:%s", addr ? addr : "127.0.0.1",
             pport ? pport : port);
    const char *mid = s_pass_value(o, "router.model_id");
    if (!mid) mid = json_string_value(json_object_get(rt, "model_id"));
    if (mid && *mid) snprintf(u->model_id, sizeof u->model_id, "%s", mid);
    return root;
}

static bool s_write_config(up_t *u, json_t *root) {
    const char *tmp = getenv("TMPDIR");
    snprintf(u->cfg_path, sizeof u->cfg_path, "%s/pdctl-up-XXXXXX.json", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemps(u->cfg_path, 5);
    if (fd < 0) {
        fprintf(stderr, "pdctl up: cannot create %s: %s\n", u->cfg_path, strerror(errno));
        u->cfg_path[0] = '\0';
        return false;
    }
    FILE *f = fdopen(fd, "w");
    bool ok = f && json_dumpf(root, f, JSON_INDENT(2)) == 0;
    ok = (f ? fclose(f) == 0 : close(fd) == 0) && ok;
    if (!ok) fprintf(stderr, "pdctl up: cannot write %s\n", u->cfg_path);
    return ok;
}

/* ---- children ---- */

/* Does "--section.key=value" belong to a service of this role? engine.* goes to both pools; a section no
 * service owns goes to every one of them, which then refuses it by name. */
static bool s_pass_is_for(const char *opt, up_role_t role) {
    const char *sec = opt + 2;
    size_t n = strcspn(sec, ".");
    bool is_known = false;
    for (int r = 0; r < 3; r++) {
        bool match = strlen(s_sections[r]) == n && !strncmp(sec, s_sections[r], n);
        if (match && r == (int)role) return true;
        is_known |= match;
    }
    if (n == 6 && !strncmp(sec, "engine", 6)) return role != UP_ROUTER;
    return !is_known;
}

static void s_kid_init(up_t *u, up_child_t *k, up_role_t role, int index, int64_t threads) {
    char buf[160];
    k->role = role;
    k->out.fd = k->err.fd = -1;
    if (role == UP_ROUTER)
        snprintf(k->name, sizeof k->name, "router");
    else
        snprintf(k->name, sizeof k->name, "%s-%d", s_sections[role], index);
    int a = 0;
    k->argv[a++] = u->exe[role];
    k->argv[a++] = pd_xstrdup("--config");
    k->argv[a++] = pd_xstrdup(u->cfg_path);
    if (role != UP_ROUTER) {
        snprintf(buf, sizeof buf, "--%s.id=%s", s_sections[role], k->name);
        k->argv[a++] = pd_xstrdup(buf);
        snprintf(buf, sizeof buf, "--engine.threads=%lld", (long long)threads);
        k->argv[a++] = pd_xstrdup(buf);
    }
    for (int i = 0; i < u->o.n_pass; i++)
        if (s_pass_is_for(u->o.pass[i], role)) k->argv[a++] = pd_xstrdup(u->o.pass[i]);
    if (role != UP_ROUTER && u->o.n_gpus > 0) { /* after the pass-through options: the services take the last */
        int w = role == UP_PREFILL ? index : (int)u->o.n_prefill + index;
        snprintf(buf, sizeof buf, "--engine.gpu=%d", u->o.gpus[w % u->o.n_gpus]);
        k->argv[a++] = pd_xstrdup(buf);
    }
    k->argv[a] = NULL;
}

static void s_kid_fini(up_child_t *k) {
    for (int a = 1; k->argv[a]; a++) free(k->argv[a]);
    if (k->out.fd >= 0) close(k->out.fd);
    if (k->err.fd >= 0) close(k->err.fd);
}

/* The value of "key=" in a ready line ("pd-router ready http=... api=..."), or "" */
static void s_ready_field(const char *line, const char *key, char *out, size_t cap) {
    size_t n = strlen(key);
    out[0] = '\0';
    for (const char *p = line; (p = strstr(p, key)); p += n) {
        if ((p == line || p[-1] == ' ') && p[n] == '=') {
            size_t len = strcspn(p + n + 1, " \t\r\n");
            snprintf(out, cap, "%.*s", (int)(len < cap ? len : cap - 1), p + n + 1);
            return;
        }
    }
}

static void s_line(up_t *u, up_child_t *k, const char *line, size_t len, bool is_stdout) {
    fprintf(stderr, "[%s] %.*s\n", k->name, (int)len, line);
    char want[32];
    snprintf(want, sizeof want, "%s ready", s_exe_names[k->role]);
    size_t n = strlen(want);
    if (!is_stdout || k->is_ready || len < n || strncmp(line, want, n) || (len > n && line[n] != ' ')) return;
    k->is_ready = true;
    snprintf(k->ready_line, sizeof k->ready_line, "%.*s", (int)len, line);
    if (u->phase == UP_RUNNING) fprintf(stderr, "pdctl up: %s is ready again\n", k->name);
}

/* Reads what the child wrote (non-blocking) and prints it line by line; closes the stream at EOF. */
static void s_stream_read(up_t *u, up_child_t *k, up_stream_t *s, bool is_stdout) {
    while (s->fd >= 0) {
        ssize_t n = read(s->fd, s->buf + s->len, sizeof s->buf - s->len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        if (n <= 0) {
            if (s->len) s_line(u, k, s->buf, s->len, is_stdout);
            s->len = 0;
            close(s->fd);
            s->fd = -1;
            return;
        }
        size_t start = 0, end = s->len + (size_t)n;
        for (size_t i = s->len; i < end; i++) {
            if (s->buf[i] != '\n') continue;
            s_line(u, k, s->buf + start, i - start, is_stdout);
            start = i + 1;
        }
        if (start == 0 && end == sizeof s->buf) start = end, s_line(u, k, s->buf, end, is_stdout); /* too long */
        memmove(s->buf, s->buf + start, end - start);
        s->len = end - start;
    }
}

static void s_child_setup(int out_fd, int err_fd, pid_t parent) {
    /* Own process group: a terminal's Ctrl-C reaches pdctl alone, which then stops the children in order.
     * PDEATHSIG: if pdctl itself is killed, its children do not outlive it. */
    setpgid(0, 0);
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    signal(SIGPIPE, SIG_DFL), signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL), signal(SIGCHLD, SIG_DFL);
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) _exit(126);
}

static bool s_spawn(up_t *u, up_child_t *k) {
    int po[2] = {-1, -1}, pe[2] = {-1, -1};
    /* The previous run's pipes: what is left in them was written before it died. */
    s_stream_read(u, k, &k->out, true);
    s_stream_read(u, k, &k->err, false);
    if (k->out.fd >= 0) close(k->out.fd), k->out.fd = -1;
    if (k->err.fd >= 0) close(k->err.fd), k->err.fd = -1;
    pid_t parent = getpid(), pid = -1;
    if (pipe2(po, O_CLOEXEC) == 0 && pipe2(pe, O_CLOEXEC) == 0) pid = fork();
    if (pid == 0) {
        s_child_setup(po[1], pe[1], parent);
        execv(k->argv[0], k->argv);
        dprintf(2, "exec %s: %s\n", k->argv[0], strerror(errno));
        _exit(127);
    }
    int saved = errno;
    if (po[1] >= 0) close(po[1]); /* the write ends are the child's now */
    if (pe[1] >= 0) close(pe[1]);
    if (pid < 0 && po[0] >= 0) close(po[0]);
    if (pid < 0 && pe[0] >= 0) close(pe[0]);
    if (pid < 0) {
        fprintf(stderr, "pdctl up: cannot start %s: %s\n", k->name, strerror(saved));
        return false;
    }
    fcntl(po[0], F_SETFL, O_NONBLOCK);
    fcntl(pe[0], F_SETFL, O_NONBLOCK);
    k->out = (up_stream_t){.fd = po[0]};
    k->err = (up_stream_t){.fd = pe[0]};
    k->pid = pid;
    k->is_ready = false;
    k->has_started = true;
    return true;
}

/* ---- supervision ---- */

static int s_n_alive(const up_t *u) {
    int n = 0;
    for (int i = 0; i < u->n_kids; i++) n += u->kids[i].pid > 0;
    return n;
}

static void s_describe(int status, char *buf, size_t cap) {
    if (WIFEXITED(status))
        snprintf(buf, cap, "exited with status %d", WEXITSTATUS(status));
    else if (WIFSIGNALED(status))
        snprintf(buf, cap, "was killed by signal %d (%s)", WTERMSIG(status), strsignal(WTERMSIG(status)));
    else
        snprintf(buf, cap, "stopped (status 0x%x)", (unsigned)status);
}

/* From now on: no restarts, every child gets SIGTERM, and SIGKILL at the deadline. rc 1 marks a failure. */
static void s_stop(up_t *u, int rc) {
    if (rc) u->rc = rc;
    if (u->phase == UP_STOPPING) return;
    u->phase = UP_STOPPING;
    u->deadline_us = pd_now_us() + (uint64_t)u->o.stop_timeout_s * 1000000;
    for (int i = 0; i < u->n_kids; i++) {
        u->kids[i].restart_at_us = 0;
        if (u->kids[i].pid > 0) kill(u->kids[i].pid, SIGTERM);
    }
}

static void s_kill_all(up_t *u, const char *why) {
    for (int i = 0; i < u->n_kids; i++) {
        if (u->kids[i].pid <= 0) continue;
        fprintf(stderr, "pdctl up: %s (pid %d) %s: SIGKILL\n", u->kids[i].name, (int)u->kids[i].pid, why);
        kill(u->kids[i].pid, SIGKILL);
    }
    u->is_killed = true;
    u->rc = 1;
}

/* k has exited (pid, already reaped and cleared in k) with status. */
static void s_on_exit(up_t *u, up_child_t *k, pid_t pid, int status) {
    char how[96];
    s_describe(status, how, sizeof how);
    s_stream_read(u, k, &k->out, true); /* its last words first */
    s_stream_read(u, k, &k->err, false);
    bool is_clean = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (u->phase == UP_STOPPING) {
        if (!is_clean) fprintf(stderr, "pdctl up: %s %s while stopping\n", k->name, how);
        if (!is_clean) u->rc = 1;
        return;
    }
    if (u->phase == UP_STARTING) {
        fprintf(stderr, "pdctl up: %s %s before it was ready (its output is above)\n", k->name, how);
        s_stop(u, 1);
        return;
    }
    uint64_t now = pd_now_us();
    int keep = 0;
    for (int i = 0; i < k->n_exits; i++)
        if (now - k->exits_us[i] < UP_RESTART_WINDOW_US) k->exits_us[keep++] = k->exits_us[i];
    k->n_exits = keep;
    if (k->n_exits == UP_MAX_RESTARTS) {
        fprintf(stderr, "pdctl up: %s %s, %d times within a minute: giving up, stopping the cluster\n", k->name, how,
                UP_MAX_RESTARTS + 1);
        s_stop(u, 1);
        return;
    }
    k->exits_us[k->n_exits++] = now;
    k->is_ready = false;
    k->restart_at_us = now + UP_RESTART_DELAY_US;
    fprintf(stderr, "pdctl up: %s (pid %d) %s unexpectedly; restarting it (%d of %d a minute)\n", k->name, (int)pid,
            how, k->n_exits, UP_MAX_RESTARTS);
}

static void s_reap(up_t *u) {
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < u->n_kids; i++) {
            if (u->kids[i].pid != pid) continue;
            u->kids[i].pid = 0;
            s_on_exit(u, &u->kids[i], pid, status);
            break;
        }
    }
}

static void s_banner(const up_t *u) {
    char url[UP_EP_BYTES], api[UP_EP_BYTES];
    s_ready_field(u->kids[0].ready_line, "http", url, sizeof url);
    s_ready_field(u->kids[0].ready_line, "api", api, sizeof api);
    if (!url[0]) snprintf(url, sizeof url, "%s", u->http_fallback);
    printf("pdserve up: %s (model %s, %lld prefill, %lld decode)\n", url, u->model_id, (long long)u->o.n_prefill,
           (long long)u->o.n_decode);
    printf("  try: curl -s %s/v1/chat/completions -H 'Content-Type: application/json' \\\n"
           "         -d '{\"model\": \"%s\", \"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], "
           "\"max_tokens\": 64}'\n",
           url, u->model_id);
    if (api[0] && strcmp(api, "off")) printf("  chat: pdctl chat --api %s\n", api);
    printf("  Ctrl-C stops the cluster.\n");
    fflush(stdout);
}

/* Phase changes and deadlines; runs after every wake-up. */
static void s_tick(up_t *u) {
    uint64_t now = pd_now_us();
    if (u->phase == UP_STARTING) {
        if (u->kids[0].is_ready && !u->kids[u->n_kids - 1].has_started)
            for (int i = 1; i < u->n_kids && u->phase == UP_STARTING; i++)
                if (!s_spawn(u, &u->kids[i])) s_stop(u, 1);
        bool all = u->phase == UP_STARTING;
        for (int i = 0; i < u->n_kids; i++) all = all && u->kids[i].is_ready;
        if (all) {
            u->phase = UP_RUNNING;
            s_banner(u);
        } else if (u->phase == UP_STARTING && now >= u->deadline_us) {
            fprintf(stderr, "pdctl up: not ready after %lld s:", (long long)u->o.ready_timeout_s);
            for (int i = 0; i < u->n_kids; i++)
                if (!u->kids[i].is_ready) fprintf(stderr, " %s", u->kids[i].name);
            fprintf(stderr, " (no ready line; their output is above)\n");
            s_stop(u, 1);
        }
    } else if (u->phase == UP_RUNNING) {
        for (int i = 0; i < u->n_kids && u->phase == UP_RUNNING; i++) {
            up_child_t *k = &u->kids[i];
            if (!k->restart_at_us || now < k->restart_at_us) continue;
            k->restart_at_us = 0;
            if (!s_spawn(u, k)) s_stop(u, 1);
        }
    } else if (!u->is_killed && now >= u->deadline_us) {
        char why[64];
        snprintf(why, sizeof why, "did not stop within %lld s", (long long)u->o.stop_timeout_s);
        s_kill_all(u, why);
    }
}

static int s_timeout_ms(const up_t *u) {
    uint64_t now = pd_now_us(), next = now + 1000000;
    if (u->phase != UP_RUNNING && u->deadline_us < next) next = u->deadline_us;
    for (int i = 0; u->phase == UP_RUNNING && i < u->n_kids; i++)
        if (u->kids[i].restart_at_us && u->kids[i].restart_at_us < next) next = u->kids[i].restart_at_us;
    return next <= now ? 0 : (int)((next - now + 999) / 1000);
}

/* Reads the signal pipe: SIGCHLD reaps; the first SIGINT / SIGTERM stops gently, a second one kills. */
static void s_on_signals(up_t *u, int fd) {
    char buf[64];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0) {
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] != 'T') continue;
            if (u->phase == UP_STOPPING && !u->is_killed) {
                s_kill_all(u, "still running at the second signal");
            } else if (u->phase != UP_STOPPING) {
                fprintf(stderr, "pdctl up: stopping (SIGTERM to %d services; again to kill them)\n", s_n_alive(u));
                s_stop(u, 0);
            }
        }
    }
    s_reap(u);
}

/* Until every child is gone after a stop. */
static void s_loop(up_t *u, int sig_fd) {
    struct pollfd *pfd = pd_xcalloc((size_t)(1 + 2 * u->n_kids), sizeof *pfd);
    up_stream_t **streams = pd_xcalloc((size_t)(1 + 2 * u->n_kids), sizeof *streams);
    while (u->phase != UP_STOPPING || s_n_alive(u) > 0) {
        int n = 0;
        pfd[n++] = (struct pollfd){.fd = sig_fd, .events = POLLIN};
        for (int i = 0; i < u->n_kids; i++) {
            up_stream_t *s[2] = {&u->kids[i].out, &u->kids[i].err};
            for (int j = 0; j < 2; j++)
                if (s[j]->fd >= 0) streams[n] = s[j], pfd[n++] = (struct pollfd){.fd = s[j]->fd, .events = POLLIN};
        }
        if (poll(pfd, (nfds_t)n, s_timeout_ms(u)) < 0 && errno != EINTR) {
            fprintf(stderr, "pdctl up: poll: %s\n", strerror(errno));
            s_stop(u, 1);
        }
        for (int i = 1; i < n; i++) {
            if (!pfd[i].revents) continue;
            up_child_t *k = NULL;
            for (int j = 0; j < u->n_kids && !k; j++)
                if (streams[i] == &u->kids[j].out || streams[i] == &u->kids[j].err) k = &u->kids[j];
            s_stream_read(u, k, streams[i], streams[i] == &k->out);
        }
        s_on_signals(u, sig_fd);
        s_tick(u);
    }
    for (int i = 0; i < u->n_kids; i++) { /* the last lines of the last exits */
        s_stream_read(u, &u->kids[i], &u->kids[i].out, true);
        s_stream_read(u, &u->kids[i], &u->kids[i].err, false);
    }
    free(pfd);
    free(streams);
}

/* --mps: whether to start a private MPS daemon before the workers (engine: the config's engine section, for the
 * backend where no --engine.backend says it). False only where --mps on cannot be honoured (message printed). */
static bool s_mps_begin(up_t *u, const json_t *engine) {
    const up_opts_t *o = &u->o;
    if (!strcmp(o->mps, "off")) return true;
    const bool is_on = !strcmp(o->mps, "on");
    const char *backend = s_pass_value(o, "engine.backend");
    if (!backend) backend = json_string_value(json_object_get(engine, "backend"));
    const int64_t n_workers = o->n_prefill + o->n_decode;
    bool is_shared = o->n_gpus == 0 && n_workers > 1; /* all on engine.gpu */
    for (int64_t i = 0; o->n_gpus > 0 && i < n_workers && !is_shared; i++)
        for (int64_t j = 0; j < i && !is_shared; j++) is_shared = o->gpus[i % o->n_gpus] == o->gpus[j % o->n_gpus];
    const char *own = getenv("CUDA_MPS_PIPE_DIRECTORY");
    if (!is_on && (!backend || strcmp(backend, "cuda") || !is_shared || (own && *own))) return true;
    char exe[PDCTL_MPS_PATH];
    if (!pdctl_which(PDCTL_MPS_CONTROL, exe)) {
        if (is_on) fprintf(stderr, "pdctl up: --mps on: no %s in PATH\n", PDCTL_MPS_CONTROL);
        return !is_on;
    }
    return pdctl_mps_start(&u->mps, exe) || !is_on; /* auto: without MPS, as before */
}

static bool s_prepare(up_t *u) {
    const up_opts_t *o = &u->o;
    if (!s_read_model_id(o->model, u->model_id, sizeof u->model_id)) return false;
    for (int r = 0; r < 3; r++)
        if ((r != UP_PREFILL || o->n_prefill > 0) && !s_find_exe(o, (up_role_t)r, u->exe[r])) return false;
    json_t *cfg = s_build_config(u);
    bool ok = cfg && s_write_config(u, cfg) && s_mps_begin(u, json_object_get(cfg, "engine"));
    json_decref(cfg);
    if (!ok) return false;
    int64_t n_workers = o->n_prefill + o->n_decode;
    int64_t total = o->threads ? o->threads : sysconf(_SC_NPROCESSORS_ONLN);
    if (total < 1) total = 1;
    u->n_kids = (int)(1 + n_workers);
    u->kids = pd_xcalloc((size_t)u->n_kids, sizeof *u->kids);
    s_kid_init(u, &u->kids[0], UP_ROUTER, 0, 0);
    for (int64_t i = 0; i < n_workers; i++) {
        /* Split the cores so the pools do not fight over them: at least one thread each. */
        int64_t t = total / n_workers + (i < total % n_workers);
        bool is_prefill = i < o->n_prefill;
        s_kid_init(u, &u->kids[1 + i], is_prefill ? UP_PREFILL : UP_DECODE, (int)(is_prefill ? i : i - o->n_prefill),
                   t < 1 ? 1 : t);
    }
    return true;
}

int pdctl_up(int argc, char **argv) {
    up_t u = {.phase = UP_STARTING};
    int sig_pipe[2] = {-1, -1};
    struct sigaction sa = {.sa_handler = s_on_signal}, old[3];
    const int sigs[3] = {SIGINT, SIGTERM, SIGCHLD};
    bool done, has_handlers = false;
    int rc = s_parse(argc, argv, &u.o, &done);
    if (rc || done) goto fail;
    rc = 1;
    if (!s_prepare(&u)) goto fail;
    if (pipe2(sig_pipe, O_CLOEXEC | O_NONBLOCK)) {
        fprintf(stderr, "pdctl up: pipe: %s\n", strerror(errno));
        goto fail;
    }
    s_sig_fd = sig_pipe[1];
    sigemptyset(&sa.sa_mask);
    for (int i = 0; i < 3; i++) sigaction(sigs[i], &sa, &old[i]);
    has_handlers = true;
    signal(SIGPIPE, SIG_IGN); /* a closed terminal must not kill the supervisor before its children */
    fprintf(stderr, "pdctl up: config %s; starting %s\n", u.cfg_path, u.exe[UP_ROUTER]);
    u.deadline_us = pd_now_us() + (uint64_t)u.o.ready_timeout_s * 1000000;
    if (!s_spawn(&u, &u.kids[0])) goto fail;
    s_loop(&u, sig_pipe[0]);
    fprintf(stderr, "pdctl up: stopped%s\n", u.rc ? " (with errors, see above)" : "");
    rc = u.rc;
fail:
    if (has_handlers)
        for (int i = 0; i < 3; i++) sigaction(sigs[i], &old[i], NULL);
    s_sig_fd = -1;
    for (int i = 0; i < 2; i++)
        if (sig_pipe[i] >= 0) close(sig_pipe[i]);
    if (u.cfg_path[0]) unlink(u.cfg_path);
    pdctl_mps_stop(&u.mps); /* every worker has exited (s_loop) or none was started */
    for (int i = 0; i < u.n_kids; i++) s_kid_fini(&u.kids[i]);
    free(u.kids);
    for (int i = 0; i < u.o.n_pass; i++) free(u.o.pass[i]);
    return rc;
}
