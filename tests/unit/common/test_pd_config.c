/* test_pd_config.c: the config module on a fake two-section table (decode + kv): every type, ranges, units,
 * endpoints, default < file < CLI precedence, JSON refusals, --help, and --print-config round trips. */
#define _GNU_SOURCE
#include "pd_test.h"

#include "pd_config.h"

#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

typedef enum { SPEC_NONE, SPEC_NGRAM, SPEC_DRAFT } spec_method_t;
static const char *const s_spec_choices[] = {"none", "ngram", "draft", NULL};

typedef struct {
    char *listen;            /* endpoint */
    char *metrics;           /* endpoint, may be empty or a wildcard */
    char *model_path;        /* string */
    int64_t max_batch;       /* sequences */
    double temperature_cap;  /* */
    int64_t kv_pool_bytes;   /* bytes */
    int64_t step_timeout_ms; /* ms */
    bool is_verbose;         /* */
    int spec_method;         /* spec_method_t */
    int64_t n_streams;       /* kv section */
} fake_cfg_t;

static const pd_opt_t s_opts[] = {
    {.section = "decode",
     .key = "listen",
     .type = PD_OPT_ENDPOINT,
     PD_CONFIG_FIELD(fake_cfg_t, listen),
     .def = "tcp://127.0.0.1:5601",
     .help = "where the router connects"},
    {.section = "decode",
     .key = "metrics",
     .type = PD_OPT_ENDPOINT,
     PD_CONFIG_FIELD(fake_cfg_t, metrics),
     .def = "",
     .flags = PD_OPT_ALLOW_EMPTY | PD_OPT_ALLOW_WILDCARD,
     .help = "stats PUB socket; empty: off"},
    {.section = "decode",
     .key = "model_path",
     .type = PD_OPT_STRING,
     PD_CONFIG_FIELD(fake_cfg_t, model_path),
     .def = "model.gguf",
     .help = "GGUF file"},
    {.section = "decode",
     .key = "max_batch",
     .type = PD_OPT_INT64,
     PD_CONFIG_FIELD(fake_cfg_t, max_batch),
     .def = "64",
     .min = 1,
     .max = 1024,
     .help = "sequences per step"},
    {.section = "decode",
     .key = "temperature_cap",
     .type = PD_OPT_DOUBLE,
     PD_CONFIG_FIELD(fake_cfg_t, temperature_cap),
     .def = "1.5",
     .min = 0,
     .max = 2,
     .help = "clamp"},
    {.section = "decode",
     .key = "kv_pool_bytes",
     .type = PD_OPT_SIZE,
     PD_CONFIG_FIELD(fake_cfg_t, kv_pool_bytes),
     .def = "2GiB",
     .min = 1 << 20,
     .max = 1ll << 40,
     .help = "KV pool"},
    {.section = "decode",
     .key = "step_timeout_ms",
     .type = PD_OPT_DURATION,
     PD_CONFIG_FIELD(fake_cfg_t, step_timeout_ms),
     .def = "250ms",
     .min = 1,
     .max = 600000,
     .help = "step deadline"},
    {.section = "decode",
     .key = "is_verbose",
     .type = PD_OPT_BOOL,
     PD_CONFIG_FIELD(fake_cfg_t, is_verbose),
     .def = "false",
     .help = "chatty logs"},
    {.section = "decode",
     .key = "spec_method",
     .type = PD_OPT_ENUM,
     PD_CONFIG_FIELD(fake_cfg_t, spec_method),
     .def = "ngram",
     .choices = s_spec_choices,
     .help = "draft proposer"},
    {.section = "kv",
     .key = "n_streams",
     .type = PD_OPT_INT64,
     PD_CONFIG_FIELD(fake_cfg_t, n_streams),
     .def = "4",
     .min = 1,
     .max = 64,
     .help = "parallel KV connections"},
};
static const char *const s_others[] = {"router", "prefill", NULL};
static const pd_config_spec_t s_spec = {.program = "pd-fake",
                                        .summary = "fake decode service for tests",
                                        .opts = s_opts,
                                        .n_opts = sizeof s_opts / sizeof s_opts[0],
                                        .other_sections = s_others};

#define N_ARGS(a) ((int)(sizeof(a) / sizeof((a)[0])))

static char s_tmp_path[64];

/* Writes text to a fresh temp file; returns its path (valid until the next call). */
static const char *s_write_tmp(const char *text) {
    snprintf(s_tmp_path, sizeof s_tmp_path, "/tmp/test_pd_config_XXXXXX");
    int fd = mkstemp(s_tmp_path);
    if (fd < 0) return NULL;
    FILE *f = fdopen(fd, "w");
    fputs(text, f);
    fclose(f);
    return s_tmp_path;
}

static pd_status s_load(const char *json, fake_cfg_t *c, char *err, size_t cap) {
    return pd_config_load_buf(&s_spec, json, strlen(json), "t.json", c, err, cap);
}

static void test_defaults(void) {
    fake_cfg_t c = {0};
    pd_config_defaults(&s_spec, &c);
    CHECK(!strcmp(c.listen, "tcp://127.0.0.1:5601"));
    CHECK(!strcmp(c.metrics, ""));
    CHECK(!strcmp(c.model_path, "model.gguf"));
    CHECK_EQ_INT(c.max_batch, 64);
    CHECK(c.temperature_cap == 1.5);
    CHECK_EQ_INT(c.kv_pool_bytes, 2ll << 30);
    CHECK_EQ_INT(c.step_timeout_ms, 250);
    CHECK(!c.is_verbose);
    CHECK_EQ_INT(c.spec_method, SPEC_NGRAM);
    CHECK_EQ_INT(c.n_streams, 4);
    pd_config_free(&s_spec, &c);
    CHECK(!c.listen && !c.metrics && !c.model_path);
    pd_config_free(&s_spec, &c); /* twice is fine */
}

/* Sets name=value and expects success. */
#define SET_OK(name, value)                                                                                       \
    do {                                                                                                          \
        char e_[256] = "";                                                                                        \
        CHECK_MSG(pd_config_set(&s_spec, name, value, &c, e_, sizeof e_) == PD_OK, "%s=%s: %s", name, value, e_); \
    } while (0)

/* Sets name=value, expects PD_EINVAL and an error naming the option, the value and `frag`. */
#define SET_BAD(name, value, frag)                                                                                     \
    do {                                                                                                               \
        char e_[512] = "";                                                                                             \
        CHECK_MSG(pd_config_set(&s_spec, name, value, &c, e_, sizeof e_) == PD_EINVAL, "%s=%s accepted", name, value); \
        CHECK_MSG(strstr(e_, name) && strstr(e_, value) && strstr(e_, frag), "%s", e_);                                \
        CHECK_MSG(!strchr(e_, '\n'), "multi-line error: %s", e_);                                                      \
    } while (0)

static void test_types(void) {
    fake_cfg_t c = {0};
    pd_config_defaults(&s_spec, &c);

    SET_OK("decode.max_batch", "1");
    SET_OK("decode.max_batch", "1024");
    CHECK_EQ_INT(c.max_batch, 1024);
    SET_BAD("decode.max_batch", "0", "out of range [1, 1024]");
    SET_BAD("decode.max_batch", "1025", "out of range [1, 1024]");
    SET_BAD("decode.max_batch", "12x", "not a 64-bit integer");
    SET_BAD("decode.max_batch", "99999999999999999999", "not a 64-bit integer");
    SET_BAD("decode.max_batch", "1.0", "not a 64-bit integer");
    CHECK_EQ_INT(c.max_batch, 1024); /* a refused value leaves the field alone */

    SET_OK("decode.temperature_cap", "0.25");
    CHECK(c.temperature_cap == 0.25);
    SET_OK("decode.temperature_cap", "2");
    SET_BAD("decode.temperature_cap", "2.5", "out of range [0, 2]");
    SET_BAD("decode.temperature_cap", "nan", "not a finite number");
    SET_BAD("decode.temperature_cap", "inf", "not a finite number");
    SET_BAD("decode.temperature_cap", "abc", "not a finite number");

    const char *yes[] = {"true", "1", "yes", "on", "TRUE"}, *no[] = {"false", "0", "no", "off", "Off"};
    for (int k = 0; k < 5; k++) {
        SET_OK("decode.is_verbose", yes[k]);
        CHECK(c.is_verbose);
        SET_OK("decode.is_verbose", no[k]);
        CHECK(!c.is_verbose);
    }
    SET_BAD("decode.is_verbose", "maybe", "not a boolean");

    SET_OK("decode.spec_method", "draft");
    CHECK_EQ_INT(c.spec_method, SPEC_DRAFT);
    SET_OK("decode.spec_method", "none");
    CHECK_EQ_INT(c.spec_method, SPEC_NONE);
    SET_BAD("decode.spec_method", "ngramm", "not one of: none, ngram, draft (did you mean 'ngram'?)");

    SET_OK("decode.model_path", "/models/x y.gguf");
    CHECK(!strcmp(c.model_path, "/models/x y.gguf"));
    SET_OK("decode.model_path", "");
    CHECK(!strcmp(c.model_path, ""));
    SET_BAD("decode.model_path", "\xff\xfe", "not valid UTF-8");

    SET_OK("decode.kv_pool_bytes", "512MiB");
    CHECK_EQ_INT(c.kv_pool_bytes, 512ll << 20);
    SET_OK("decode.kv_pool_bytes", "1048576");
    CHECK_EQ_INT(c.kv_pool_bytes, 1 << 20);
    SET_BAD("decode.kv_pool_bytes", "1KiB", "out of range [1MiB, 1TiB]");
    SET_BAD("decode.kv_pool_bytes", "2TiB", "out of range [1MiB, 1TiB]");
    SET_BAD("decode.kv_pool_bytes", "2GB", "not a size");

    SET_OK("decode.step_timeout_ms", "5s");
    CHECK_EQ_INT(c.step_timeout_ms, 5000);
    SET_BAD("decode.step_timeout_ms", "0ms", "out of range [1ms, 10m]");
    SET_BAD("decode.step_timeout_ms", "11m", "out of range [1ms, 10m]");
    SET_BAD("decode.step_timeout_ms", "5us", "not a duration");

    SET_OK("kv.n_streams", "8");
    CHECK_EQ_INT(c.n_streams, 8);

    char e[256] = "";
    CHECK(pd_config_set(&s_spec, "decode.max_bach", "3", &c, e, sizeof e) == PD_EINVAL);
    CHECK_MSG(strstr(e, "unknown option --decode.max_bach (did you mean --decode.max_batch?)"), "%s", e);
    CHECK(pd_config_set(&s_spec, "nosuch", "3", &c, e, sizeof e) == PD_EINVAL);
    CHECK_MSG(strstr(e, "unknown option --nosuch"), "%s", e);
    pd_config_free(&s_spec, &c);
}

static void test_sizes_durations(void) {
    static const struct {
        const char *s;
        int64_t v;
    } sizes[] = {{"0", 0},
                 {"4096", 4096},
                 {"1B", 1},
                 {"512KiB", 512 << 10},
                 {"512MiB", 512ll << 20},
                 {"2GiB", 2ll << 30},
                 {"2gib", 2ll << 30},
                 {"3TiB", 3ll << 40},
                 {"9223372036854775807", INT64_MAX}},
      durs[] = {{"250ms", 250}, {"5s", 5000}, {"2m", 120000}, {"1h", 3600000}, {"100", 100}, {"0", 0}, {"7MS", 7}};
    for (size_t k = 0; k < sizeof sizes / sizeof sizes[0]; k++) {
        int64_t v = -1;
        CHECK_MSG(pd_parse_size(sizes[k].s, &v) == PD_OK && v == sizes[k].v, "%s -> %lld", sizes[k].s, (long long)v);
    }
    for (size_t k = 0; k < sizeof durs / sizeof durs[0]; k++) {
        int64_t v = -1;
        CHECK_MSG(pd_parse_duration_ms(durs[k].s, &v) == PD_OK && v == durs[k].v, "%s -> %lld", durs[k].s,
                  (long long)v);
    }
    const char *bad_sizes[] = {
        "", "GiB", "-1", "1.5GiB", "2 GiB", " 2GiB", "2GB", "2G", "2KB", "9223372036854775808", "8388608TiB", "2GiBs"};
    const char *bad_durs[] = {"", "s", "-5s", "1.5s", "5us", "5 s", "5sec", "99999999999999999999ms"};
    int64_t v;
    for (size_t k = 0; k < sizeof bad_sizes / sizeof bad_sizes[0]; k++)
        CHECK_MSG(pd_parse_size(bad_sizes[k], &v) == PD_EINVAL, "size '%s' accepted", bad_sizes[k]);
    for (size_t k = 0; k < sizeof bad_durs / sizeof bad_durs[0]; k++)
        CHECK_MSG(pd_parse_duration_ms(bad_durs[k], &v) == PD_EINVAL, "duration '%s' accepted", bad_durs[k]);
}

static void test_endpoints(void) {
    const char *good[] = {"tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:65535", "tcp://pd-decode-0:7000",
                          "ipc:///tmp/pd.sock",   "ipc://@abstract",   "inproc://engine"};
    const char *bad[] = {"",
                         "tcp://*:5555",
                         "tcp://0.0.0.0:5555",
                         "tcp://[::]:5555",
                         "tcp://127.0.0.1",
                         "tcp://:5555",
                         "tcp://127.0.0.1:0",
                         "tcp://127.0.0.1:65536",
                         "tcp://127.0.0.1:*",
                         "tcp://127.0.0.1:55a",
                         "tcp://a b:1",
                         "tcp://a/b:1",
                         "tcp://[zz]:1",
                         "udp://127.0.0.1:1",
                         "127.0.0.1:5555",
                         "ipc://",
                         "inproc://"};
    const char *why;
    for (size_t k = 0; k < sizeof good / sizeof good[0]; k++) {
        pd_status st = pd_endpoint_check(good[k], 0, &why);
        CHECK_MSG(st == PD_OK, "%s: %s", good[k], why);
    }
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        why = NULL;
        CHECK_MSG(pd_endpoint_check(bad[k], 0, &why) == PD_EINVAL && why, "'%s' accepted", bad[k]);
    }
    char long_ipc[160] = "ipc:///tmp/";
    memset(long_ipc + 11, 'x', 110);
    CHECK(pd_endpoint_check(long_ipc, 0, &why) == PD_EINVAL && strstr(why, "107"));
    CHECK(pd_endpoint_check("tcp://*:5555", PD_OPT_ALLOW_WILDCARD, &why) == PD_OK);
    CHECK(pd_endpoint_check("tcp://127.0.0.1:0", 0, &why) == PD_EINVAL && strstr(why, "[1, 65535]"));
    CHECK(pd_endpoint_check("tcp://127.0.0.1:0", PD_OPT_ALLOW_PORT0, &why) == PD_OK);
    CHECK(pd_endpoint_check("tcp://127.0.0.1:65536", PD_OPT_ALLOW_PORT0, &why) == PD_EINVAL && strstr(why, "[0, "));
    CHECK(pd_endpoint_check("tcp://0.0.0.0:5555", PD_OPT_ALLOW_WILDCARD, &why) == PD_OK);
    CHECK(pd_endpoint_check("", PD_OPT_ALLOW_EMPTY, &why) == PD_OK);
    CHECK(pd_endpoint_check("tcp://*:5555", 0, &why) == PD_EINVAL && strstr(why, "every interface"));

    /* Through the table: the option's flags decide. */
    fake_cfg_t c = {0};
    pd_config_defaults(&s_spec, &c);
    SET_BAD("decode.listen", "tcp://*:5601", "every interface");
    SET_BAD("decode.listen", "", "empty");
    SET_BAD("decode.listen", "tcp://127.0.0.1", "explicit host and port");
    SET_OK("decode.listen", "ipc:///tmp/x");
    SET_OK("decode.metrics", "tcp://*:9100");
    SET_OK("decode.metrics", "");
    pd_config_free(&s_spec, &c);
}

static void test_precedence(void) {
    const char *path = s_write_tmp("{\"decode\": {\"max_batch\": 128, \"kv_pool_bytes\": \"4GiB\", \"spec_method\": "
                                   "\"none\", \"temperature_cap\": 1},\n \"kv\": {\"n_streams\": 2},\n"
                                   " \"router\": {\"anything\": [1, 2]}}\n");
    REQUIRE(path);
    /* The override comes before --config on purpose: the file still loads first. */
    char *argv[] = {"pd-fake", "--decode.max_batch=7", "--config",       (char *)path, "--decode.spec_method",
                    "draft",   "--decode.is_verbose",  "--kv.n_streams", "16",         "--decode.max_batch",
                    "9"};
    fake_cfg_t c = {0};
    pd_config_args_t a;
    char e[256] = "";
    pd_status st = pd_config_parse_args(&s_spec, N_ARGS(argv), argv, &c, &a, e, sizeof e);
    CHECK_MSG(st == PD_OK, "%s", e);
    CHECK(a.config_path == path && !a.is_help && !a.is_print_config);
    CHECK_EQ_INT(c.max_batch, 9);             /* CLI, last one wins */
    CHECK_EQ_INT(c.kv_pool_bytes, 4ll << 30); /* file */
    CHECK(c.temperature_cap == 1.0);          /* file, integer JSON into a double */
    CHECK_EQ_INT(c.spec_method, SPEC_DRAFT);  /* CLI over file */
    CHECK(c.is_verbose);                      /* bare bool */
    CHECK_EQ_INT(c.n_streams, 16);            /* CLI, "--k v" form */
    CHECK_EQ_INT(c.step_timeout_ms, 250);     /* default */
    CHECK(!strcmp(c.listen, "tcp://127.0.0.1:5601"));
    pd_config_free(&s_spec, &c);

    /* "--bool false" consumes the literal; a bare bool before another option does not eat it. */
    char *argv2[] = {"pd-fake", "--decode.is_verbose", "false", "--kv.n_streams=3", "--decode.is_verbose"};
    CHECK(pd_config_parse_args(&s_spec, 3, argv2, &c, &a, e, sizeof e) == PD_OK && !c.is_verbose);
    pd_config_free(&s_spec, &c);
    CHECK(pd_config_parse_args(&s_spec, N_ARGS(argv2), argv2, &c, &a, e, sizeof e) == PD_OK && c.is_verbose &&
          c.n_streams == 3);
    pd_config_free(&s_spec, &c);
    unlink(path);
}

/* Loads json into a default config and expects status st with every fragment in the error. */
static void s_expect_load_err(const char *json, pd_status want, const char *frag1, const char *frag2) {
    fake_cfg_t c = {0};
    char e[512] = "";
    pd_config_defaults(&s_spec, &c);
    pd_status st = s_load(json, &c, e, sizeof e);
    CHECK_MSG(st == want, "%s -> %s (%s)", json, pd_strerror(st), e);
    CHECK_MSG(strstr(e, frag1) && (!frag2 || strstr(e, frag2)), "%s -> '%s'", json, e);
    CHECK_MSG(!strchr(e, '\n'), "multi-line error: %s", e);
    pd_config_free(&s_spec, &c);
}

static void test_json_refusals(void) {
    s_expect_load_err("{\"decode\": {\"max_batch\": 1, \"max_batch\": 2}}", PD_EINVAL, "duplicate", "max_batch");
    s_expect_load_err("{\"kv\": {}, \"kv\": {}}", PD_EINVAL, "duplicate", "kv");
    s_expect_load_err("{\"decode\": {\"max_bach\": 1}}", PD_EINVAL, "unknown key 'decode.max_bach'",
                      "did you mean 'max_batch'");
    s_expect_load_err("{\"decode\": {\"zzzzzz\": 1}}", PD_EINVAL, "unknown key 'decode.zzzzzz'", NULL);
    s_expect_load_err("{\"decod\": {}}", PD_EINVAL, "unknown section 'decod'", "did you mean 'decode'");
    s_expect_load_err("{\"prefil\": {}}", PD_EINVAL, "unknown section 'prefil'", "did you mean 'prefill'");
    s_expect_load_err("{\"decode\": {\"max_batch\": \"64\"}}", PD_EINVAL, "t.json: decode.max_batch",
                      "expected an integer, got a string");
    s_expect_load_err("{\"decode\": {\"is_verbose\": 1}}", PD_EINVAL, "decode.is_verbose", "expected true or false");
    s_expect_load_err("{\"decode\": {\"kv_pool_bytes\": 1.5}}", PD_EINVAL, "decode.kv_pool_bytes", "a real number");
    s_expect_load_err("{\"decode\": {\"max_batch\": 5000}}", PD_EINVAL, "t.json: decode.max_batch: '5000'",
                      "out of range [1, 1024]");
    s_expect_load_err("{\"decode\": {\"listen\": \"tcp://0.0.0.0:1\"}}", PD_EINVAL, "decode.listen", "every interface");
    s_expect_load_err("{\"decode\": 3}", PD_EINVAL, "section 'decode' must be an object", NULL);
    s_expect_load_err("[1, 2]", PD_EINVAL, "top level must be an object", NULL);
    s_expect_load_err("{\"decode\": {\n\"max_batch\": }}", PD_EINVAL, "t.json:2:", NULL);
    s_expect_load_err("{\"decode\": {\"model_path\": \"a\\u0000b\"}}", PD_EINVAL, "t.json", NULL);

    /* Over the cap: refused before parsing. */
    size_t n = PD_CONFIG_MAX_FILE_BYTES + 1;
    char *big = pd_xmalloc(n);
    memset(big, ' ', n);
    big[0] = '{', big[n - 1] = '}';
    fake_cfg_t c = {0};
    char e[256] = "";
    pd_config_defaults(&s_spec, &c);
    CHECK(pd_config_load_buf(&s_spec, big, n, "big.json", &c, e, sizeof e) == PD_ERANGE && strstr(e, "big.json"));
    CHECK(pd_config_load_buf(&s_spec, big, n - 1, "ok.json", &c, e, sizeof e) == PD_EINVAL); /* cut: bad JSON */
    free(big);

    /* Other services' sections are skipped whatever they hold; sizes and durations also take integers. */
    CHECK(s_load("{\"router\": {\"x\": 1}, \"prefill\": 7, \"decode\": {\"kv_pool_bytes\": 1048576, "
                 "\"step_timeout_ms\": 40}}",
                 &c, e, sizeof e) == PD_OK);
    CHECK_EQ_INT(c.kv_pool_bytes, 1 << 20);
    CHECK_EQ_INT(c.step_timeout_ms, 40);
    CHECK(pd_config_load_file(&s_spec, "/nonexistent/pd.json", &c, e, sizeof e) == PD_EIO &&
          strstr(e, "/nonexistent/pd.json"));
    pd_config_free(&s_spec, &c);
}

/* Runs parse_args on argv and expects status want with frag in the error. */
static void s_expect_args_err(int argc, char **argv, pd_status want, const char *frag) {
    fake_cfg_t c = {0};
    pd_config_args_t a;
    char e[512] = "";
    pd_status st = pd_config_parse_args(&s_spec, argc, argv, &c, &a, e, sizeof e);
    CHECK_MSG(st == want && strstr(e, frag), "%s ... -> %s '%s'", argv[1], pd_strerror(st), e);
    pd_config_free(&s_spec, &c);
}

static void test_args(void) {
    char *pos[] = {"p", "--decode.max_batch=3", "extra"};
    s_expect_args_err(3, pos, PD_EINVAL, "unexpected argument 'extra'");
    char *unk[] = {"p", "--decode.spec-method=none"};
    s_expect_args_err(2, unk, PD_EINVAL, "unknown option --decode.spec-method (did you mean --decode.spec_method?)");
    char *miss[] = {"p", "--decode.max_batch"};
    s_expect_args_err(2, miss, PD_EINVAL, "--decode.max_batch needs a value");
    char *miss2[] = {"p", "--decode.model_path", "--kv.n_streams=2"};
    s_expect_args_err(3, miss2, PD_EINVAL, "--decode.model_path needs a value");
    char *bad[] = {"p", "--kv.n_streams", "0"};
    s_expect_args_err(3, bad, PD_EINVAL, "--kv.n_streams: '0' is out of range [1, 64]");
    char *nofile[] = {"p", "--config=/nonexistent/x.json"};
    s_expect_args_err(2, nofile, PD_EIO, "/nonexistent/x.json");
    char *twice[] = {"p", "--config", "a.json", "--config", "b.json"};
    s_expect_args_err(5, twice, PD_EINVAL, "--config given twice");
    char *nopath[] = {"p", "--config"};
    s_expect_args_err(2, nopath, PD_EINVAL, "--config needs a PATH");
    char *single[] = {"p", "-x"};
    s_expect_args_err(2, single, PD_EINVAL, "unexpected argument '-x'");

    /* --help wins over anything else, even a broken config path; --print-config is reported. */
    fake_cfg_t c = {0};
    pd_config_args_t a;
    char e[256] = "";
    char *help[] = {"p", "--config=/nonexistent", "bogus", "--help"};
    CHECK(pd_config_parse_args(&s_spec, 4, help, &c, &a, e, sizeof e) == PD_OK && a.is_help);
    pd_config_free(&s_spec, &c);
    char *pc[] = {"p", "--print-config", "--decode.max_batch=5"};
    CHECK(pd_config_parse_args(&s_spec, 3, pc, &c, &a, e, sizeof e) == PD_OK && a.is_print_config && !a.is_help &&
          c.max_batch == 5);
    pd_config_free(&s_spec, &c);
    char *none[] = {"p"};
    CHECK(pd_config_parse_args(&s_spec, 1, none, &c, NULL, e, sizeof e) == PD_OK && c.max_batch == 64);
    pd_config_free(&s_spec, &c);
}

static void test_help(void) {
    char *text = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&text, &n);
    REQUIRE(f);
    pd_config_print_help(&s_spec, f);
    fclose(f);
    static const char *want[] = {
        "usage: pd-fake",
        "--config PATH",
        "--print-config",
        "--help",
        "[decode]",
        "[kv]",
        "--decode.listen=URI  (default: \"tcp://127.0.0.1:5601\")",
        "--decode.metrics=URI  (default: \"\")",
        "--decode.model_path=STR  (default: \"model.gguf\")",
        "--decode.max_batch=INT  (default: 64; range [1, 1024])",
        "--decode.temperature_cap=NUM  (default: 1.5; range [0, 2])",
        "--decode.kv_pool_bytes=SIZE  (default: 2GiB; range [1MiB, 1TiB])",
        "--decode.step_timeout_ms=DURATION  (default: 250ms; range [1ms, 10m])",
        "--decode.is_verbose=BOOL  (default: false)",
        "--decode.spec_method=none|ngram|draft  (default: ngram)",
        "--kv.n_streams=INT  (default: 4; range [1, 64])",
        "parallel KV connections",
    };
    for (size_t k = 0; k < sizeof want / sizeof want[0]; k++) CHECK_MSG(strstr(text, want[k]), "missing: %s", want[k]);
    for (size_t k = 0; k < s_spec.n_opts; k++) {
        char opt[128];
        snprintf(opt, sizeof opt, "--%s.%s=", s_opts[k].section, s_opts[k].key);
        CHECK_MSG(strstr(text, opt), "help lacks %s", opt);
    }
    free(text);
}

static void s_check_same(const fake_cfg_t *x, const fake_cfg_t *y) {
    CHECK(!strcmp(x->listen, y->listen) && !strcmp(x->metrics, y->metrics) && !strcmp(x->model_path, y->model_path));
    CHECK_EQ_INT(x->max_batch, y->max_batch);
    CHECK(x->temperature_cap == y->temperature_cap);
    CHECK_EQ_INT(x->kv_pool_bytes, y->kv_pool_bytes);
    CHECK_EQ_INT(x->step_timeout_ms, y->step_timeout_ms);
    CHECK_EQ_INT(x->is_verbose, y->is_verbose);
    CHECK_EQ_INT(x->spec_method, y->spec_method);
    CHECK_EQ_INT(x->n_streams, y->n_streams);
}

static void test_print_config_roundtrip(void) {
    char *argv[] = {"p",
                    "--decode.listen=tcp://[::1]:7001",
                    "--decode.metrics=tcp://*:9100",
                    "--decode.model_path=/m/\"quoted\" \xc3\xa9.gguf",
                    "--decode.max_batch=1000",
                    "--decode.temperature_cap=0.1",
                    "--decode.kv_pool_bytes=1536KiB",
                    "--decode.step_timeout_ms=90s",
                    "--decode.is_verbose=on",
                    "--decode.spec_method=DRAFT",
                    "--kv.n_streams=64",
                    "--print-config"};
    fake_cfg_t a = {0}, b = {0}, d = {0};
    pd_config_args_t args;
    char e[256] = "";
    CHECK_MSG(pd_config_parse_args(&s_spec, N_ARGS(argv), argv, &a, &args, e, sizeof e) == PD_OK, "%s", e);
    CHECK(args.is_print_config);
    char *json = pd_config_to_json(&s_spec, &a, false);
    REQUIRE(json);
    CHECK_MSG(strstr(json, "\"kv_pool_bytes\": \"1536KiB\"") && strstr(json, "\"step_timeout_ms\": \"90s\"") &&
                  strstr(json, "\"spec_method\": \"draft\"") && strstr(json, "\"is_verbose\": true"),
              "%s", json);
    CHECK_MSG(strstr(json, "\"decode\"") < strstr(json, "\"kv\""), "sections out of table order: %s", json);

    /* Through the file path, as --config would read it. */
    const char *path = s_write_tmp(json);
    REQUIRE(path);
    char *argv2[] = {"p", "--config", (char *)path};
    CHECK_MSG(pd_config_parse_args(&s_spec, 3, argv2, &b, &args, e, sizeof e) == PD_OK, "%s", e);
    s_check_same(&a, &b);
    unlink(path);

    /* Compact form: one line, same values; and a default config round trips too. */
    char *line = pd_config_to_json(&s_spec, &b, true);
    REQUIRE(line);
    CHECK(!strchr(line, '\n'));
    pd_config_defaults(&s_spec, &d);
    CHECK_MSG(s_load(line, &d, e, sizeof e) == PD_OK, "%s", e);
    s_check_same(&a, &d);
    pd_config_free(&s_spec, &d);
    pd_config_free(&s_spec, &b);
    pd_config_defaults(&s_spec, &b);
    char *def_json = pd_config_to_json(&s_spec, &b, false);
    pd_config_defaults(&s_spec, &d);
    CHECK(def_json && s_load(def_json, &d, e, sizeof e) == PD_OK);
    s_check_same(&b, &d);
    /* A double that needs all 17 digits survives. */
    b.temperature_cap = 0.1 + 0.2;
    char *dbl = pd_config_to_json(&s_spec, &b, true);
    CHECK(dbl && s_load(dbl, &d, e, sizeof e) == PD_OK && d.temperature_cap == b.temperature_cap);
    free(dbl);
    free(def_json);
    free(line);
    free(json);
    pd_config_free(&s_spec, &a);
    pd_config_free(&s_spec, &b);
    pd_config_free(&s_spec, &d);
}

/* A broken table is a programming error: pd_config_defaults aborts (checked in a child). */
typedef struct {
    int n;
    int64_t m;
} bad_cfg_t;
static const pd_opt_t s_bad_type[] = {
    {.section = "x", .key = "n", .type = PD_OPT_INT64, PD_CONFIG_FIELD(bad_cfg_t, n), .def = "1"}};
static const pd_opt_t s_bad_default[] = {
    {.section = "x", .key = "m", .type = PD_OPT_INT64, PD_CONFIG_FIELD(bad_cfg_t, m), .def = "9", .min = 1, .max = 5}};
static const pd_opt_t s_bad_dup[] = {
    {.section = "x", .key = "m", .type = PD_OPT_INT64, PD_CONFIG_FIELD(bad_cfg_t, m), .def = "1"},
    {.section = "x", .key = "m", .type = PD_OPT_INT64, PD_CONFIG_FIELD(bad_cfg_t, m), .def = "1"}};
static const pd_opt_t s_bad_name[] = {
    {.section = "X", .key = "m", .type = PD_OPT_INT64, PD_CONFIG_FIELD(bad_cfg_t, m), .def = "1"}};

static bool s_aborts(const pd_opt_t *opts, size_t n) {
    pid_t pid = fork();
    if (pid == 0) {
        if (!freopen("/dev/null", "w", stderr)) _exit(2);
        pd_config_spec_t spec = {.opts = opts, .n_opts = n};
        bad_cfg_t c = {0};
        pd_config_defaults(&spec, &c);
        _exit(0);
    }
    int ws = 0;
    waitpid(pid, &ws, 0);
    return WIFSIGNALED(ws) && WTERMSIG(ws) == SIGABRT;
}

static void test_bad_tables(void) {
    CHECK(s_aborts(s_bad_type, 1));
    CHECK(s_aborts(s_bad_default, 1));
    CHECK(s_aborts(s_bad_dup, 2));
    CHECK(s_aborts(s_bad_name, 1));
    CHECK(!s_aborts(s_bad_dup, 1));
}

int main(void) {
    PD_TEST_RUN(test_defaults);
    PD_TEST_RUN(test_types);
    PD_TEST_RUN(test_sizes_durations);
    PD_TEST_RUN(test_endpoints);
    PD_TEST_RUN(test_precedence);
    PD_TEST_RUN(test_json_refusals);
    PD_TEST_RUN(test_args);
    PD_TEST_RUN(test_help);
    PD_TEST_RUN(test_print_config_roundtrip);
    PD_TEST_RUN(test_bad_tables);
    return pd_test_finish();
}
