/* pdctl.c: entry point of the pdctl tool; dispatches subcommands. Services (up, chat, bench) come
 * with the router; for now `generate` runs the engine in-process. */
#include "pdctl.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pd_log.h"

static void s_usage(FILE *f) {
    fprintf(f, "usage: pdctl <command> [options]\n"
               "commands:\n"
               "  generate   run the engine in this process on one prompt and stream the completion\n"
               "             (pdctl generate --help for its options)\n"
               "  bench      load generator against a running router (pdctl bench --help)\n"
               "  up         run a router, prefill and decode workers on this machine (pdctl up --help)\n"
               "  chat       chat with a running router over its native API (pdctl chat --help)\n");
}

bool pdctl_parse_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out) {
    char *end = NULL;
    errno = 0;
    long long v = s ? strtoll(s, &end, 10) : 0;
    if (!s || !*s || *end || errno) {
        fprintf(stderr, "pdctl: %s: '%s' is not an integer\n", flag, s ? s : "");
        return false;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "pdctl: %s: %lld is out of range [%lld, %lld]\n", flag, v, (long long)lo, (long long)hi);
        return false;
    }
    *out = v;
    return true;
}

bool pdctl_parse_f64(const char *flag, const char *s, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = s ? strtod(s, &end) : 0;
    if (!s || !*s || *end || errno || !isfinite(v)) {
        fprintf(stderr, "pdctl: %s: '%s' is not a finite number\n", flag, s ? s : "");
        return false;
    }
    if (v < lo || v > hi) {
        fprintf(stderr, "pdctl: %s: %g is out of range [%g, %g]\n", flag, v, lo, hi);
        return false;
    }
    *out = v;
    return true;
}

const char *pdctl_default_model(void) {
    static char buf[4096];
    const char *dir = getenv("PDSERVE_MODELS"), *home = getenv("HOME");
    if (dir && *dir)
        snprintf(buf, sizeof buf, "%s/SmolLM2-135M-Instruct.Q4_1.gguf", dir);
    else
        snprintf(buf, sizeof buf, "%s/.cache/pdserve/models/SmolLM2-135M-Instruct.Q4_1.gguf", home ? home : ".");
    return buf;
}

int main(int argc, char **argv) {
    pd_log_init("pdctl", PD_LOG_WARN);
    if (argc < 2) {
        s_usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        s_usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "generate")) return pdctl_generate(argc - 1, argv + 1);
    if (!strcmp(argv[1], "bench")) return pdctl_bench(argc - 1, argv + 1);
    if (!strcmp(argv[1], "up")) return pdctl_up(argc - 1, argv + 1);
    if (!strcmp(argv[1], "chat")) return pdctl_chat(argc - 1, argv + 1);
    fprintf(stderr, "pdctl: unknown command '%s'\n", argv[1]);
    s_usage(stderr);
    return 2;
}
