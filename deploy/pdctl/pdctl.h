/* pdctl.h: subcommands of the pdctl tool and the flag-parsing helpers they share. */
#ifndef PDCTL_H
#define PDCTL_H

#include <stdbool.h>
#include <stdint.h>

/* Each returns the process exit code: 0 ok, 1 runtime failure, 2 usage error. */
int pdctl_generate(int argc, char **argv);
int pdctl_bench(int argc, char **argv);
int pdctl_up(int argc, char **argv);   /* a router + prefill + decode cluster as child processes */
int pdctl_chat(int argc, char **argv); /* interactive chat over the router's native API */

/* Strict numeric parsing of a flag value: the whole string must be a number within [lo, hi].
 * On failure prints "pdctl: --flag: ..." to stderr and returns false. */
bool pdctl_parse_i64(const char *flag, const char *s, int64_t lo, int64_t hi, int64_t *out);
bool pdctl_parse_f64(const char *flag, const char *s, double lo, double hi, double *out);
/* Default model path: $PDSERVE_MODELS (or ~/.cache/pdserve/models)/SmolLM2-135M-Instruct.Q4_1.gguf. */
const char *pdctl_default_model(void);

#endif
