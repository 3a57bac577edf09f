/* pd_config.h: table-driven service configuration (STYLE §8). A service describes its options once, in a static
 * table of pd_opt_t; this module fills the service's typed struct from built-in defaults < one JSON file < the
 * command line (--section.key=value), prints --help and --print-config. It never reads the environment. */
#ifndef PD_CONFIG_H
#define PD_CONFIG_H

#include "pd_common.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Option types, and the C type of the struct field each one fills. */
typedef enum {
    PD_OPT_BOOL,     /* bool. CLI: true/false/1/0/yes/no/on/off; a bare --s.k means true. JSON: true/false */
    PD_OPT_INT64,    /* int64_t, decimal. JSON: integer */
    PD_OPT_DOUBLE,   /* double, finite. JSON: number */
    PD_OPT_STRING,   /* char *, owned by the struct (pd_config_free). JSON: string */
    PD_OPT_ENDPOINT, /* char *, owned: a ZeroMQ URI tcp://HOST:PORT (explicit host), ipc://PATH or inproc://NAME */
    PD_OPT_SIZE,     /* int64_t bytes: "4096", "512KiB", "2GiB" (B, KiB, MiB, GiB, TiB). JSON: string or integer */
    PD_OPT_DURATION, /* int64_t ms: "250ms", "5s", "2m", "1h"; a plain number is ms. JSON: string or integer */
    PD_OPT_ENUM,     /* int: index into choices (match a C enum declared in the same order). JSON: string */
} pd_opt_type_t;

/* pd_opt_t.flags */
enum {
    PD_OPT_ALLOW_WILDCARD = 1u << 0, /* endpoint may bind every interface (host "*", 0.0.0.0 or [::]) */
    PD_OPT_ALLOW_EMPTY = 1u << 1,    /* endpoint may be "" (meaning: not configured) */
    PD_OPT_ALLOW_PORT0 = 1u << 2,    /* tcp port may be 0: bind any free port (the service reports the one it got) */
};

/* Field C types, filled by PD_CONFIG_FIELD so pd_config_defaults can refuse a table whose option type does not
 * match the struct field (an int field under PD_OPT_INT64 would otherwise corrupt memory). */
typedef enum { PD_CTYPE_NONE, PD_CTYPE_BOOL, PD_CTYPE_INT64, PD_CTYPE_DOUBLE, PD_CTYPE_STR, PD_CTYPE_INT } pd_ctype_t;

#define PD_CONFIG_FIELD(T, f) \
    .offset = offsetof(T, f), .ctype = _Generic(((T *)0)->f, bool: PD_CTYPE_BOOL, int64_t: PD_CTYPE_INT64,        \
                                                double: PD_CTYPE_DOUBLE, char *: PD_CTYPE_STR, int: PD_CTYPE_INT, \
                                                default: PD_CTYPE_NONE)

/* One option. Services define a static const array of these with designated initializers, e.g.
 *   {.section = "decode", .key = "max_batch", .type = PD_OPT_INT64, PD_CONFIG_FIELD(dc_config_t, max_batch),
 *    .def = "64", .min = 1, .max = 4096, .help = "sequences per decode step"} */
typedef struct {
    const char *section;        /* JSON object / CLI prefix: [a-z][a-z0-9_]* */
    const char *key;            /* [a-z][a-z0-9_]* */
    pd_opt_type_t type;         /* value syntax, and the field type it needs */
    size_t offset;              /* of the field in the service's config struct (PD_CONFIG_FIELD) */
    pd_ctype_t ctype;           /* C type of that field (PD_CONFIG_FIELD) */
    const char *def;            /* default, written as on the command line ("2GiB", "ngram"); NULL means "" */
    double min, max;            /* inclusive range for INT64/DOUBLE/SIZE/DURATION (bytes, ms); unchecked if min>=max */
    const char *const *choices; /* ENUM: NULL-terminated allowed values */
    unsigned flags;             /* PD_OPT_ALLOW_* */
    const char *help;           /* one line for --help */
} pd_opt_t;

/* A service's whole description. other_sections names the sections of the other services that share the config
 * file: they are skipped, while any other unknown section is an error. */
typedef struct {
    const char *program;               /* for --help ("pd-decode") */
    const char *summary;               /* one line for --help, or NULL */
    const pd_opt_t *opts;              /* the option table, grouped by section */
    size_t n_opts;                     /* entries in opts */
    const char *const *other_sections; /* NULL-terminated, or NULL */
} pd_config_spec_t;

/* What the command line asked for besides option values. */
typedef struct {
    bool is_help;            /* --help / -h: print pd_config_print_help and exit 0 */
    bool is_print_config;    /* --print-config: print pd_config_to_json and exit 0 */
    const char *config_path; /* --config PATH, borrowed from argv; NULL when absent */
} pd_config_args_t;

enum {
    PD_CONFIG_MAX_FILE_BYTES = 1 << 20, /* a bigger config file is refused before it is parsed */
    PD_CONFIG_MAX_STRING = 4096,        /* longest STRING/ENDPOINT value, bytes */
};

/* Checks the table (names, duplicates, field types, choices, defaults in range) and fills every field of cfg from
 * the defaults. cfg must not hold owned strings yet (zeroed or after pd_config_free). A bad table is a programming
 * error: PD_FATAL naming the option. Any thread. */
void pd_config_defaults(const pd_config_spec_t *spec, void *cfg);

/* Applies one JSON config document (text, n_bytes; need not be NUL-terminated) over cfg. Duplicate keys, unknown
 * sections or keys (with a "did you mean" hint), wrong JSON types and bad values are refused with one line in err
 * naming the option. On error cfg may be partly updated but stays valid for pd_config_free.
 * Returns PD_OK, PD_EINVAL (bad content) or PD_ERANGE (larger than PD_CONFIG_MAX_FILE_BYTES). */
PD_NODISCARD pd_status pd_config_load_buf(const pd_config_spec_t *spec, const char *text, size_t n_bytes,
                                          const char *origin, void *cfg, char *err, size_t err_cap);

/* pd_config_load_buf on the contents of the file at path. Also PD_EIO when it cannot be read. */
PD_NODISCARD pd_status pd_config_load_file(const pd_config_spec_t *spec, const char *path, void *cfg, char *err,
                                           size_t err_cap);

/* Sets one option from its command-line text: name is "section.key". PD_OK or PD_EINVAL (unknown option or bad
 * value; err says which). */
PD_NODISCARD pd_status pd_config_set(const pd_config_spec_t *spec, const char *name, const char *value, void *cfg,
                                     char *err, size_t err_cap);

/* The whole command line: fills defaults, then the --config file, then every --section.key=value (or
 * "--section.key value") in order, so default < file < CLI whatever the order of the arguments. --help is
 * reported in args without loading anything, so it works even when the file is broken. Positional arguments,
 * unknown options and bad values are errors (PD_EINVAL, PD_EIO, PD_ERANGE, one line in err).
 * cfg must be zeroed or freed; after any return it holds owned strings: call pd_config_free. argv is borrowed. */
PD_NODISCARD pd_status pd_config_parse_args(const pd_config_spec_t *spec, int argc, char *const *argv, void *cfg,
                                            pd_config_args_t *args, char *err, size_t err_cap);

/* Writes the usage text: every option with its type, default, range or choices, and help. */
void pd_config_print_help(const pd_config_spec_t *spec, FILE *f);

/* The effective config as JSON, one object per section in table order; sizes and durations as strings in their
 * largest exact unit ("2GiB", "1536B", "250ms"). The output loads back (pd_config_load_buf) to the same values.
 * is_compact: one line (for the startup log) instead of indented. Returns a malloc'ed string the caller free()s,
 * or NULL when out of memory (or when a string field was set by hand to text that is not UTF-8). */
char *pd_config_to_json(const pd_config_spec_t *spec, const void *cfg, bool is_compact);

/* Frees the strings cfg owns and sets those fields to NULL. Safe to call twice. */
void pd_config_free(const pd_config_spec_t *spec, void *cfg);

/* Value parsers, exposed for tests and for callers that take these formats elsewhere. PD_OK or PD_EINVAL. */
PD_NODISCARD pd_status pd_parse_size(const char *s, int64_t *n_bytes);
PD_NODISCARD pd_status pd_parse_duration_ms(const char *s, int64_t *ms);
/* Checks a ZeroMQ URI; flags are PD_OPT_ALLOW_*. On PD_EINVAL, why (a static string) says what is wrong. */
PD_NODISCARD pd_status pd_endpoint_check(const char *uri, unsigned flags, const char **why);

#endif
