/* pd_config.c: fills a service's typed config struct from its option table: defaults, one JSON file (jansson),
 * then --section.key=value. Every value, whatever its source, goes through one text parser (s_parse) so the
 * file and the command line accept and refuse the same things. No environment variables, no globals. */
#include "pd_config.h"

#include <ctype.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* A parsed value before it is stored; s points into the caller's text. */
typedef struct {
    bool b;
    int64_t i; /* INT64, SIZE (bytes), DURATION (ms), ENUM (index) */
    double d;
    const char *s;
} cfg_val_t;

typedef struct {
    const char *name;
    int64_t mult;
} cfg_unit_t;

static const cfg_unit_t s_size_units[] = {{"TiB", 1ll << 40}, {"GiB", 1ll << 30}, {"MiB", 1ll << 20},
                                          {"KiB", 1ll << 10}, {"B", 1},           {"", 1}};
static const cfg_unit_t s_dur_units[] = {{"h", 3600000}, {"m", 60000}, {"s", 1000}, {"ms", 1}, {"", 1}};
static const size_t s_n_size_units = sizeof s_size_units / sizeof s_size_units[0];
static const size_t s_n_dur_units = sizeof s_dur_units / sizeof s_dur_units[0];

PD_PRINTF(3, 4) static void s_err(char *err, size_t cap, const char *fmt, ...) {
    if (!err || !cap) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, cap, fmt, ap);
    va_end(ap);
}

static void *s_field(const pd_opt_t *o, void *cfg) {
    return (char *)cfg + o->offset;
}
static const void *s_cfield(const pd_opt_t *o, const void *cfg) {
    return (const char *)cfg + o->offset;
}
static bool s_is_str(const pd_opt_t *o) {
    return o->type == PD_OPT_STRING || o->type == PD_OPT_ENDPOINT;
}
static bool s_has_range(const pd_opt_t *o) {
    return o->min < o->max && (o->type == PD_OPT_INT64 || o->type == PD_OPT_DOUBLE || o->type == PD_OPT_SIZE ||
                               o->type == PD_OPT_DURATION);
}

/* ---- value parsers ---- */

/* Digits then a unit from the table (case-insensitive); overflow-checked. */
static pd_status s_parse_units(const char *s, const cfg_unit_t *units, size_t n_units, int64_t *out) {
    if (!s || !isdigit((unsigned char)*s)) return PD_EINVAL;
    int64_t v = 0;
    for (; isdigit((unsigned char)*s); s++) {
        int d = *s - '0';
        if (v > (INT64_MAX - d) / 10) return PD_EINVAL;
        v = v * 10 + d;
    }
    for (size_t u = 0; u < n_units; u++) {
        if (strcasecmp(s, units[u].name)) continue;
        if (v > INT64_MAX / units[u].mult) return PD_EINVAL;
        *out = v * units[u].mult;
        return PD_OK;
    }
    return PD_EINVAL;
}

pd_status pd_parse_size(const char *s, int64_t *n_bytes) {
    return s_parse_units(s, s_size_units, s_n_size_units, n_bytes);
}

pd_status pd_parse_duration_ms(const char *s, int64_t *ms) {
    return s_parse_units(s, s_dur_units, s_n_dur_units, ms);
}

/* Largest unit that divides v exactly ("2GiB", "1536B", "90s"). */
static void s_format_units(int64_t v, const cfg_unit_t *units, size_t n_units, char *buf, size_t cap) {
    size_t u = 0;
    while (u + 2 < n_units && (v == 0 || v % units[u].mult)) u++;
    snprintf(buf, cap, "%lld%s", (long long)(v / units[u].mult), units[u].name);
}

static bool s_is_wildcard_host(const char *h, size_t n) {
    return (n == 1 && h[0] == '*') || (n == 7 && !memcmp(h, "0.0.0.0", 7)) || (n == 4 && !memcmp(h, "[::]", 4)) ||
           (n == 2 && !memcmp(h, "::", 2));
}

pd_status pd_endpoint_check(const char *uri, unsigned flags, const char **why) {
    const char *dummy;
    if (!why) why = &dummy;
    *why = NULL;
    if (!uri) uri = "";
    if (!*uri) {
        if (flags & PD_OPT_ALLOW_EMPTY) return PD_OK;
        *why = "is empty; expected tcp://HOST:PORT, ipc://PATH or inproc://NAME";
        return PD_EINVAL;
    }
    for (const char *p = uri; *p; p++) {
        if ((unsigned char)*p <= ' ' || *p == 0x7f) {
            *why = "contains whitespace or control characters";
            return PD_EINVAL;
        }
    }
    if (!strncmp(uri, "ipc://", 6)) {
        /* sun_path holds 107 bytes plus the NUL. */
        size_t n = strlen(uri + 6);
        *why = n == 0 ? "has an empty ipc path" : n > 107 ? "has an ipc path longer than 107 bytes" : NULL;
        return *why ? PD_EINVAL : PD_OK;
    }
    if (!strncmp(uri, "inproc://", 9)) {
        *why = uri[9] ? NULL : "has an empty inproc name";
        return *why ? PD_EINVAL : PD_OK;
    }
    if (strncmp(uri, "tcp://", 6)) {
        *why = "has an unknown transport; expected tcp://HOST:PORT, ipc://PATH or inproc://NAME";
        return PD_EINVAL;
    }
    const char *host = uri + 6, *colon = strrchr(host, ':');
    if (!colon || colon == host) {
        *why = "needs an explicit host and port: tcp://HOST:PORT";
        return PD_EINVAL;
    }
    size_t n_host = (size_t)(colon - host);
    if (host[0] == '[') {
        if (host[n_host - 1] != ']' || n_host < 3) goto bad_host;
        for (size_t k = 1; k + 1 < n_host; k++)
            if (!isxdigit((unsigned char)host[k]) && host[k] != ':' && host[k] != '.') goto bad_host;
    } else if (!(n_host == 1 && host[0] == '*')) {
        for (size_t k = 0; k < n_host; k++)
            if (!isalnum((unsigned char)host[k]) && !strchr(".-_", host[k])) goto bad_host;
    }
    if (s_is_wildcard_host(host, n_host) && !(flags & PD_OPT_ALLOW_WILDCARD)) {
        *why = "binds every interface; name an explicit address (e.g. tcp://127.0.0.1:PORT)";
        return PD_EINVAL;
    }
    const char *port = colon + 1;
    long p = 0;
    for (const char *c = port; *c; c++) {
        if (!isdigit((unsigned char)*c) || p > 65535) goto bad_port;
        p = p * 10 + (*c - '0');
    }
    if (!*port || p < ((flags & PD_OPT_ALLOW_PORT0) ? 0 : 1) || p > 65535) goto bad_port;
    return PD_OK;
bad_host:
    *why = "has a malformed host (name, IPv4 or [IPv6])";
    return PD_EINVAL;
bad_port:
    *why = (flags & PD_OPT_ALLOW_PORT0) ? "needs a port in [0, 65535] (0: any free one)" : "needs a port in [1, 65535]";
    return PD_EINVAL;
}

static bool s_parse_bool(const char *s, bool *out) {
    static const char *const yes[] = {"true", "1", "yes", "on"}, *const no[] = {"false", "0", "no", "off"};
    for (size_t k = 0; k < 4; k++) {
        if (!strcasecmp(s, yes[k])) return *out = true, true;
        if (!strcasecmp(s, no[k])) return *out = false, true;
    }
    return false;
}

/* Bounds for messages, in the option's own units. Clamped: casting a double past INT64_MAX is undefined. */
static void s_format_bound(const pd_opt_t *o, double v, char *buf, size_t cap) {
    int64_t i = v >= 0x1p63 ? INT64_MAX : v <= -0x1p63 ? INT64_MIN : (int64_t)v;
    if (o->type == PD_OPT_DOUBLE)
        snprintf(buf, cap, "%g", v);
    else if (o->type == PD_OPT_SIZE && i >= 0)
        s_format_units(i, s_size_units, s_n_size_units, buf, cap);
    else if (o->type == PD_OPT_DURATION && i >= 0)
        s_format_units(i, s_dur_units, s_n_dur_units, buf, cap);
    else
        snprintf(buf, cap, "%lld", (long long)i);
}

/* Name of enum value i; "?" if the struct holds an index outside the table. */
static const char *s_choice(const pd_opt_t *o, int64_t i) {
    for (int64_t k = 0; o->choices[k]; k++)
        if (k == i) return o->choices[k];
    return "?";
}

static void s_choices_list(const pd_opt_t *o, const char *sep, char *buf, size_t cap) {
    size_t n = 0;
    buf[0] = '\0';
    for (const char *const *c = o->choices; c && *c && n < cap; c++)
        n += (size_t)snprintf(buf + n, cap - n, "%s%s", c == o->choices ? "" : sep, *c);
}

/* Edit distance for "did you mean"; long names are not worth a suggestion. */
static size_t s_distance(const char *a, const char *b) {
    size_t na = strlen(a), nb = strlen(b), row[65];
    if (na > 64 || nb > 64) return SIZE_MAX;
    for (size_t j = 0; j <= nb; j++) row[j] = j;
    for (size_t i = 1; i <= na; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= nb; j++) {
            size_t up = row[j], best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best) best = up + 1;
            if (row[j - 1] + 1 < best) best = row[j - 1] + 1;
            diag = up;
            row[j] = best;
        }
    }
    return row[nb];
}

/* Tracks the closest candidate; close means at most 2 edits and fewer than half the letters. */
typedef struct {
    const char *best;
    size_t dist;
} cfg_hint_t;

static bool s_is_close(size_t d, const char *cand) {
    return d <= 2 && 2 * d < strlen(cand);
}

static void s_hint_try(cfg_hint_t *h, const char *typed, const char *cand) {
    size_t d = s_distance(typed, cand);
    if (s_is_close(d, cand) && (!h->best || d < h->dist)) h->best = cand, h->dist = d;
}

/* Parses text into *v for option o and checks its range; on failure writes why (no option name) and returns
 * PD_EINVAL. */
static pd_status s_parse(const pd_opt_t *o, const char *text, cfg_val_t *v, char *why, size_t cap) {
    char lo[32], hi[32], *end;
    memset(v, 0, sizeof *v);
    switch (o->type) {
    case PD_OPT_BOOL:
        if (s_parse_bool(text, &v->b)) return PD_OK;
        s_err(why, cap, "is not a boolean (true/false, yes/no, on/off, 1/0)");
        return PD_EINVAL;
    case PD_OPT_INT64:
        errno = 0;
        v->i = strtoll(text, &end, 10);
        if (!*text || isspace((unsigned char)*text) || *end || errno) {
            s_err(why, cap, "is not a 64-bit integer");
            return PD_EINVAL;
        }
        v->d = (double)v->i;
        break;
    case PD_OPT_DOUBLE:
        errno = 0;
        v->d = strtod(text, &end);
        if (!*text || isspace((unsigned char)*text) || *end || errno || !isfinite(v->d)) {
            s_err(why, cap, "is not a finite number");
            return PD_EINVAL;
        }
        break;
    case PD_OPT_SIZE:
        if (pd_parse_size(text, &v->i)) {
            s_err(why, cap, "is not a size (bytes, or a whole number with B, KiB, MiB, GiB or TiB)");
            return PD_EINVAL;
        }
        v->d = (double)v->i;
        break;
    case PD_OPT_DURATION:
        if (pd_parse_duration_ms(text, &v->i)) {
            s_err(why, cap, "is not a duration (a whole number of ms, s, m or h; plain numbers are ms)");
            return PD_EINVAL;
        }
        v->d = (double)v->i;
        break;
    case PD_OPT_ENUM: {
        for (const char *const *c = o->choices; *c; c++)
            if (!strcasecmp(text, *c)) return v->i = c - o->choices, PD_OK;
        char list[256];
        cfg_hint_t h = {0};
        for (const char *const *c = o->choices; *c; c++) s_hint_try(&h, text, *c);
        s_choices_list(o, ", ", list, sizeof list);
        s_err(why, cap, "is not one of: %s%s%s%s", list, h.best ? " (did you mean '" : "", h.best ? h.best : "",
              h.best ? "'?)" : "");
        return PD_EINVAL;
    }
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT: {
        if (strlen(text) > PD_CONFIG_MAX_STRING) {
            s_err(why, cap, "is longer than %d bytes", PD_CONFIG_MAX_STRING);
            return PD_EINVAL;
        }
        json_t *probe = json_string(text); /* NULL when not UTF-8: it could not be printed back as JSON */
        if (!probe) {
            s_err(why, cap, "is not valid UTF-8");
            return PD_EINVAL;
        }
        json_decref(probe);
        const char *ep_why = NULL;
        if (o->type == PD_OPT_ENDPOINT && pd_endpoint_check(text, o->flags, &ep_why)) {
            s_err(why, cap, "%s", ep_why);
            return PD_EINVAL;
        }
        v->s = text;
        return PD_OK;
    }
    }
    if (s_has_range(o) && (v->d < o->min || v->d > o->max)) {
        s_format_bound(o, o->min, lo, sizeof lo);
        s_format_bound(o, o->max, hi, sizeof hi);
        s_err(why, cap, "is out of range [%s, %s]", lo, hi);
        return PD_EINVAL;
    }
    return PD_OK;
}

static void s_store(const pd_opt_t *o, void *cfg, const cfg_val_t *v) {
    void *f = s_field(o, cfg);
    switch (o->type) {
    case PD_OPT_BOOL: *(bool *)f = v->b; break;
    case PD_OPT_DOUBLE: *(double *)f = v->d; break;
    case PD_OPT_ENUM: *(int *)f = (int)v->i; break;
    case PD_OPT_INT64:
    case PD_OPT_SIZE:
    case PD_OPT_DURATION: *(int64_t *)f = v->i; break;
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT:
        free(*(char **)f);
        *(char **)f = pd_xstrdup(v->s);
        break;
    }
}

/* Reads the field back into a value (the inverse of s_store). */
static void s_get(const pd_opt_t *o, const void *cfg, cfg_val_t *v) {
    const void *f = s_cfield(o, cfg);
    memset(v, 0, sizeof *v);
    switch (o->type) {
    case PD_OPT_BOOL: v->b = *(const bool *)f; break;
    case PD_OPT_DOUBLE: v->d = *(const double *)f; break;
    case PD_OPT_ENUM: v->i = *(const int *)f; break;
    case PD_OPT_INT64:
    case PD_OPT_SIZE:
    case PD_OPT_DURATION: v->i = *(const int64_t *)f; break;
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT: v->s = *(char *const *)f ? *(char *const *)f : ""; break;
    }
}

/* The value as it would be typed on the command line (what --help shows as the default). */
static void s_format(const pd_opt_t *o, const cfg_val_t *v, char *buf, size_t cap) {
    switch (o->type) {
    case PD_OPT_BOOL: snprintf(buf, cap, "%s", v->b ? "true" : "false"); break;
    case PD_OPT_INT64: snprintf(buf, cap, "%lld", (long long)v->i); break;
    case PD_OPT_DOUBLE:
        /* Shortest of %.15g / %.17g that reads back exactly: 0.8 rather than 0.80000000000000004. */
        snprintf(buf, cap, "%.15g", v->d);
        if (strtod(buf, NULL) != v->d) snprintf(buf, cap, "%.17g", v->d);
        break;
    case PD_OPT_SIZE: s_format_units(v->i, s_size_units, s_n_size_units, buf, cap); break;
    case PD_OPT_DURATION: s_format_units(v->i, s_dur_units, s_n_dur_units, buf, cap); break;
    case PD_OPT_ENUM: snprintf(buf, cap, "%s", s_choice(o, v->i)); break;
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT: snprintf(buf, cap, "\"%s\"", v->s); break;
    }
}

/* ---- table ---- */

static const pd_opt_t *s_find(const pd_config_spec_t *spec, const char *section, size_t n_section, const char *key) {
    for (size_t k = 0; k < spec->n_opts; k++) {
        const pd_opt_t *o = &spec->opts[k];
        if (strlen(o->section) == n_section && !strncmp(o->section, section, n_section) && !strcmp(o->key, key))
            return o;
    }
    return NULL;
}

static bool s_is_name(const char *s) {
    if (!s || !islower((unsigned char)*s)) return false;
    for (; *s; s++)
        if (!islower((unsigned char)*s) && !isdigit((unsigned char)*s) && *s != '_') return false;
    return true;
}

static pd_ctype_t s_ctype_of(pd_opt_type_t t) {
    switch (t) {
    case PD_OPT_BOOL: return PD_CTYPE_BOOL;
    case PD_OPT_DOUBLE: return PD_CTYPE_DOUBLE;
    case PD_OPT_ENUM: return PD_CTYPE_INT;
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT: return PD_CTYPE_STR;
    case PD_OPT_INT64:
    case PD_OPT_SIZE:
    case PD_OPT_DURATION: return PD_CTYPE_INT64;
    }
    return PD_CTYPE_NONE;
}

void pd_config_defaults(const pd_config_spec_t *spec, void *cfg) {
    PD_ASSERT(spec && cfg && (spec->opts || !spec->n_opts));
    for (size_t k = 0; k < spec->n_opts; k++) {
        const pd_opt_t *o = &spec->opts[k];
        if (!s_is_name(o->section) || !s_is_name(o->key))
            PD_FATAL("config table: option %zu has a bad section or key name (want [a-z][a-z0-9_]*)", k);
        if (s_find(spec, o->section, strlen(o->section), o->key) != o)
            PD_FATAL("config table: %s.%s is defined twice", o->section, o->key);
        if (o->ctype != s_ctype_of(o->type))
            PD_FATAL("config table: %s.%s: field type does not match option type (use PD_CONFIG_FIELD)", o->section,
                     o->key);
        if (o->type == PD_OPT_ENUM && (!o->choices || !o->choices[0]))
            PD_FATAL("config table: %s.%s: enum without choices", o->section, o->key);
        cfg_val_t v;
        char why[256];
        if (s_parse(o, o->def ? o->def : "", &v, why, sizeof why))
            PD_FATAL("config table: %s.%s: default '%s' %s", o->section, o->key, o->def ? o->def : "", why);
        if (s_is_str(o)) *(char **)s_field(o, cfg) = NULL; /* contract: cfg holds no owned strings yet */
        s_store(o, cfg, &v);
    }
}

void pd_config_free(const pd_config_spec_t *spec, void *cfg) {
    if (!spec || !cfg) return;
    for (size_t k = 0; k < spec->n_opts; k++) {
        if (!s_is_str(&spec->opts[k])) continue;
        char **p = s_field(&spec->opts[k], cfg);
        free(*p);
        *p = NULL;
    }
}

static void s_unknown_option(const pd_config_spec_t *spec, const char *name, char *err, size_t cap) {
    size_t best = SIZE_MAX, best_d = SIZE_MAX;
    char cand[160];
    for (size_t k = 0; k < spec->n_opts; k++) {
        snprintf(cand, sizeof cand, "%s.%s", spec->opts[k].section, spec->opts[k].key);
        size_t d = s_distance(name, cand);
        if (s_is_close(d, cand) && d < best_d) best = k, best_d = d;
    }
    if (best == SIZE_MAX)
        s_err(err, cap, "unknown option --%s (see --help)", name);
    else
        s_err(err, cap, "unknown option --%s (did you mean --%s.%s?)", name, spec->opts[best].section,
              spec->opts[best].key);
}

static const pd_opt_t *s_lookup(const pd_config_spec_t *spec, const char *name) {
    const char *dot = strchr(name, '.');
    return dot ? s_find(spec, name, (size_t)(dot - name), dot + 1) : NULL;
}

/* Parses text into option o and stores it; prefix says where the value came from ("--" or "file.json: "). */
static pd_status s_apply(const pd_opt_t *o, const char *prefix, const char *text, void *cfg, char *err, size_t cap) {
    cfg_val_t v;
    char why[512];
    if (s_parse(o, text, &v, why, sizeof why)) {
        s_err(err, cap, "%s%s.%s: '%s' %s", prefix, o->section, o->key, text, why);
        return PD_EINVAL;
    }
    s_store(o, cfg, &v);
    return PD_OK;
}

pd_status pd_config_set(const pd_config_spec_t *spec, const char *name, const char *value, void *cfg, char *err,
                        size_t err_cap) {
    const pd_opt_t *o = s_lookup(spec, name);
    if (!o) {
        s_unknown_option(spec, name, err, err_cap);
        return PD_EINVAL;
    }
    return s_apply(o, "--", value, cfg, err, err_cap);
}

/* ---- JSON file ---- */

static const char *s_json_type_name(const json_t *j) {
    switch (json_typeof(j)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "?";
}

/* Turns a JSON scalar into the text the command line would carry, refusing the wrong JSON type. */
static pd_status s_load_value(const pd_opt_t *o, const char *origin, json_t *jv, void *cfg, char *err, size_t cap) {
    char text[64], prefix[512];
    const char *t = text, *want = NULL;
    switch (o->type) {
    case PD_OPT_BOOL:
        if (json_is_boolean(jv))
            t = json_is_true(jv) ? "true" : "false";
        else
            want = "true or false";
        break;
    case PD_OPT_INT64:
        if (json_is_integer(jv))
            snprintf(text, sizeof text, "%" JSON_INTEGER_FORMAT, json_integer_value(jv));
        else
            want = "an integer";
        break;
    case PD_OPT_DOUBLE:
        if (json_is_number(jv))
            snprintf(text, sizeof text, "%.17g", json_number_value(jv));
        else
            want = "a number";
        break;
    case PD_OPT_SIZE:
    case PD_OPT_DURATION:
        if (json_is_integer(jv))
            snprintf(text, sizeof text, "%" JSON_INTEGER_FORMAT, json_integer_value(jv));
        else if (json_is_string(jv))
            t = json_string_value(jv);
        else
            want = o->type == PD_OPT_SIZE ? "a string like \"2GiB\" or an integer (bytes)"
                                          : "a string like \"250ms\" or an integer (ms)";
        break;
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT:
    case PD_OPT_ENUM:
        if (json_is_string(jv))
            t = json_string_value(jv);
        else
            want = "a string";
        break;
    }
    if (want) {
        s_err(err, cap, "%s: %s.%s: expected %s, got %s", origin, o->section, o->key, want, s_json_type_name(jv));
        return PD_EINVAL;
    }
    snprintf(prefix, sizeof prefix, "%s: ", origin);
    return s_apply(o, prefix, t, cfg, err, cap);
}

static bool s_in_list(const char *const *list, const char *s) {
    for (; list && *list; list++)
        if (!strcmp(*list, s)) return true;
    return false;
}

static pd_status s_load_section(const pd_config_spec_t *spec, const char *origin, const char *sec, json_t *sval,
                                void *cfg, char *err, size_t cap) {
    cfg_hint_t h = {0};
    bool is_ours = false;
    for (size_t k = 0; k < spec->n_opts; k++) {
        is_ours |= !strcmp(spec->opts[k].section, sec);
        s_hint_try(&h, sec, spec->opts[k].section);
    }
    if (!is_ours) {
        if (s_in_list(spec->other_sections, sec)) return PD_OK; /* another service's section */
        for (const char *const *o = spec->other_sections; o && *o; o++) s_hint_try(&h, sec, *o);
        s_err(err, cap, "%s: unknown section '%s'%s%s%s", origin, sec, h.best ? " (did you mean '" : "",
              h.best ? h.best : "", h.best ? "'?)" : "");
        return PD_EINVAL;
    }
    if (!json_is_object(sval)) {
        s_err(err, cap, "%s: section '%s' must be an object, got %s", origin, sec, s_json_type_name(sval));
        return PD_EINVAL;
    }
    const char *key;
    json_t *jv;
    json_object_foreach(sval, key, jv) {
        const pd_opt_t *o = s_find(spec, sec, strlen(sec), key);
        if (!o) {
            h.best = NULL;
            for (size_t k = 0; k < spec->n_opts; k++)
                if (!strcmp(spec->opts[k].section, sec)) s_hint_try(&h, key, spec->opts[k].key);
            s_err(err, cap, "%s: unknown key '%s.%s'%s%s%s", origin, sec, key, h.best ? " (did you mean '" : "",
                  h.best ? h.best : "", h.best ? "'?)" : "");
            return PD_EINVAL;
        }
        pd_status st = s_load_value(o, origin, jv, cfg, err, cap);
        if (st) return st;
    }
    return PD_OK;
}

pd_status pd_config_load_buf(const pd_config_spec_t *spec, const char *text, size_t n_bytes, const char *origin,
                             void *cfg, char *err, size_t err_cap) {
    if (!origin) origin = "config";
    if (n_bytes > PD_CONFIG_MAX_FILE_BYTES) {
        s_err(err, err_cap, "%s: larger than %d bytes", origin, PD_CONFIG_MAX_FILE_BYTES);
        return PD_ERANGE;
    }
    json_error_t jerr;
    json_t *root = json_loadb(text, n_bytes, JSON_REJECT_DUPLICATES, &jerr), *sval;
    if (!root) {
        s_err(err, err_cap, "%s:%d:%d: %s", origin, jerr.line, jerr.column, jerr.text);
        return PD_EINVAL;
    }
    pd_status st = PD_EINVAL;
    const char *sec;
    if (!json_is_object(root)) {
        s_err(err, err_cap, "%s: top level must be an object with one object per section", origin);
        goto fail;
    }
    json_object_foreach(root, sec, sval) {
        st = s_load_section(spec, origin, sec, sval, cfg, err, err_cap);
        if (st) goto fail;
    }
    st = PD_OK;
fail:
    json_decref(root);
    return st;
}

pd_status pd_config_load_file(const pd_config_spec_t *spec, const char *path, void *cfg, char *err, size_t err_cap) {
    pd_status st = PD_EIO;
    char *buf = pd_xmalloc(PD_CONFIG_MAX_FILE_BYTES + 1);
    FILE *f = fopen(path, "rb");
    if (!f) {
        s_err(err, err_cap, "%s: cannot open: %s", path, strerror(errno));
        goto fail;
    }
    /* Read one byte past the cap so an oversized file is refused before jansson sees it. */
    size_t n = fread(buf, 1, PD_CONFIG_MAX_FILE_BYTES + 1, f);
    if (ferror(f)) {
        s_err(err, err_cap, "%s: cannot read: %s", path, strerror(errno));
        goto fail;
    }
    st = pd_config_load_buf(spec, buf, n, path, cfg, err, err_cap);
fail:
    if (f) fclose(f);
    free(buf);
    return st;
}

/* ---- command line ---- */

typedef enum { ARG_OPT, ARG_CONFIG, ARG_PRINT } cfg_arg_kind_t;

/* Classifies argv[*i], consuming a following value argument if it takes one. */
static pd_status s_next_arg(const pd_config_spec_t *spec, int argc, char *const *argv, int *i, cfg_arg_kind_t *kind,
                            const pd_opt_t **opt, const char **value, char *err, size_t cap) {
    const char *arg = argv[*i], *eq = strchr(arg, '=');
    bool has_next = *i + 1 < argc && strncmp(argv[*i + 1], "--", 2);
    char name[160];
    if (!strcmp(arg, "--print-config")) return *kind = ARG_PRINT, PD_OK;
    if (!strcmp(arg, "--config") || !strncmp(arg, "--config=", 9)) {
        *kind = ARG_CONFIG;
        *value = eq ? eq + 1 : has_next ? argv[++*i] : "";
        if (**value) return PD_OK;
        s_err(err, cap, "--config needs a PATH");
        return PD_EINVAL;
    }
    if (strncmp(arg, "--", 2) || !arg[2]) {
        s_err(err, cap, "unexpected argument '%s' (options look like --section.key=value; see --help)", arg);
        return PD_EINVAL;
    }
    size_t n = eq ? (size_t)(eq - arg - 2) : strlen(arg + 2);
    snprintf(name, sizeof name, "%.*s", (int)(n < sizeof name ? n : sizeof name - 1), arg + 2);
    *kind = ARG_OPT;
    *opt = s_lookup(spec, name);
    if (!*opt) {
        s_unknown_option(spec, name, err, cap);
        return PD_EINVAL;
    }
    bool b;
    if (eq)
        *value = eq + 1;
    else if ((*opt)->type == PD_OPT_BOOL)
        *value = has_next && s_parse_bool(argv[*i + 1], &b) ? argv[++*i] : "true";
    else if (has_next)
        *value = argv[++*i];
    else {
        s_err(err, cap, "--%s needs a value", name);
        return PD_EINVAL;
    }
    return PD_OK;
}

pd_status pd_config_parse_args(const pd_config_spec_t *spec, int argc, char *const *argv, void *cfg,
                               pd_config_args_t *args, char *err, size_t err_cap) {
    pd_config_args_t unused;
    if (!args) args = &unused;
    memset(args, 0, sizeof *args);
    pd_config_defaults(spec, cfg);
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) return args->is_help = true, PD_OK;

    /* Pass 1: syntax, unknown options, --config, so the file is loaded before any override. */
    cfg_arg_kind_t kind;
    const pd_opt_t *o = NULL;
    const char *value = NULL;
    for (int i = 1; i < argc; i++) {
        pd_status st = s_next_arg(spec, argc, argv, &i, &kind, &o, &value, err, err_cap);
        if (st) return st;
        if (kind == ARG_PRINT) args->is_print_config = true;
        if (kind == ARG_CONFIG && args->config_path) {
            s_err(err, err_cap, "--config given twice ('%s', '%s')", args->config_path, value);
            return PD_EINVAL;
        }
        if (kind == ARG_CONFIG) args->config_path = value;
    }
    if (args->config_path) {
        pd_status st = pd_config_load_file(spec, args->config_path, cfg, err, err_cap);
        if (st) return st;
    }
    /* Pass 2: overrides, left to right (a later one wins). */
    for (int i = 1; i < argc; i++) {
        pd_status st = s_next_arg(spec, argc, argv, &i, &kind, &o, &value, err, err_cap);
        if (!st && kind == ARG_OPT) st = s_apply(o, "--", value, cfg, err, err_cap);
        if (st) return st;
    }
    return PD_OK;
}

/* ---- output ---- */

static const char *s_placeholder(const pd_opt_t *o, char *buf, size_t cap) {
    switch (o->type) {
    case PD_OPT_BOOL: return "BOOL";
    case PD_OPT_INT64: return "INT";
    case PD_OPT_DOUBLE: return "NUM";
    case PD_OPT_STRING: return "STR";
    case PD_OPT_ENDPOINT: return "URI";
    case PD_OPT_SIZE: return "SIZE";
    case PD_OPT_DURATION: return "DURATION";
    case PD_OPT_ENUM: s_choices_list(o, "|", buf, cap); return buf;
    }
    return "?";
}

void pd_config_print_help(const pd_config_spec_t *spec, FILE *f) {
    fprintf(f, "usage: %s [--config PATH] [--SECTION.KEY=VALUE ...] [--print-config] [--help]\n",
            spec->program ? spec->program : "pd");
    if (spec->summary) fprintf(f, "%s\n", spec->summary);
    fprintf(f,
            "\nPrecedence: built-in default < --config file < command line. \"--SECTION.KEY VALUE\" works too;\n"
            "a bare boolean option means true. SIZE: bytes or 512KiB/2GiB; DURATION: ms or 250ms/5s/2m/1h.\n\n"
            "  --config PATH\n      JSON file with one object per section, e.g. {\"%s\": {\"%s\": ...}}\n"
            "  --print-config\n      print the effective config as JSON and exit\n"
            "  --help, -h\n      print this text and exit\n",
            spec->n_opts ? spec->opts[0].section : "section", spec->n_opts ? spec->opts[0].key : "key");
    for (size_t k = 0; k < spec->n_opts; k++) {
        const pd_opt_t *o = &spec->opts[k];
        char ph[256], def[PD_CONFIG_MAX_STRING + 8], range[80] = "", lo[32], hi[32];
        cfg_val_t v;
        if (!k || strcmp(o->section, spec->opts[k - 1].section)) fprintf(f, "\n[%s]\n", o->section);
        if (s_parse(o, o->def ? o->def : "", &v, ph, sizeof ph))
            snprintf(def, sizeof def, "?");
        else
            s_format(o, &v, def, sizeof def);
        if (s_has_range(o)) {
            s_format_bound(o, o->min, lo, sizeof lo);
            s_format_bound(o, o->max, hi, sizeof hi);
            snprintf(range, sizeof range, "; range [%s, %s]", lo, hi);
        }
        fprintf(f, "  --%s.%s=%s  (default: %s%s)\n      %s\n", o->section, o->key, s_placeholder(o, ph, sizeof ph),
                def, range, o->help ? o->help : "");
    }
}

static json_t *s_to_json_value(const pd_opt_t *o, const void *cfg) {
    cfg_val_t v;
    char buf[64];
    s_get(o, cfg, &v);
    switch (o->type) {
    case PD_OPT_BOOL: return json_boolean(v.b);
    case PD_OPT_INT64: return json_integer(v.i);
    case PD_OPT_DOUBLE: return json_real(v.d);
    case PD_OPT_ENUM: return json_string(s_choice(o, v.i));
    case PD_OPT_STRING:
    case PD_OPT_ENDPOINT: return json_string(v.s);
    case PD_OPT_SIZE:
    case PD_OPT_DURATION: s_format(o, &v, buf, sizeof buf); return json_string(buf);
    }
    return NULL;
}

char *pd_config_to_json(const pd_config_spec_t *spec, const void *cfg, bool is_compact) {
    char *out = NULL;
    json_t *root = json_object();
    if (!root) return NULL;
    for (size_t k = 0; k < spec->n_opts; k++) {
        const pd_opt_t *o = &spec->opts[k];
        json_t *sec = json_object_get(root, o->section);
        if (!sec && json_object_set_new(root, o->section, sec = json_object())) goto fail;
        if (json_object_set_new(sec, o->key, s_to_json_value(o, cfg))) goto fail;
    }
    /* jansson prints every real with one precision; use the smallest that reads all of ours back exactly, so
     * 0.8 prints as 0.8, not 0.80000000000000004. */
    int precision = 15;
    for (size_t k = 0; k < spec->n_opts; k++) {
        if (spec->opts[k].type != PD_OPT_DOUBLE) continue;
        double d = *(const double *)s_cfield(&spec->opts[k], cfg);
        char buf[40];
        for (; precision < 17; precision++) {
            snprintf(buf, sizeof buf, "%.*g", precision, d);
            if (strtod(buf, NULL) == d) break;
        }
    }
    out = json_dumps(root, (is_compact ? JSON_COMPACT : JSON_INDENT(2)) | JSON_REAL_PRECISION(precision));
fail:
    json_decref(root);
    return out;
}
