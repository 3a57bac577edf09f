/* pdctl.h: subcommands of the pdctl tool and the flag-parsing helpers they share. */
#ifndef PDCTL_H
#define PDCTL_H

#include <stdbool.h>
#include <stddef.h>
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

/* The first executable `name` in PATH, its real path into out (PDCTL_PATH_MAX bytes); false if there is none. */
#define PDCTL_PATH_MAX 4096 /* PATH_MAX on Linux */
bool pdctl_which(const char *name, char *out);

/* A private CUDA MPS control daemon for the workers `pdctl up` starts (pdctl_mps.c). */
#define PDCTL_MPS_PATH PDCTL_PATH_MAX
typedef struct {
    char dir[PDCTL_MPS_PATH]; /* its pipe/ and log/ folders; "" = none */
    char exe[PDCTL_MPS_PATH]; /* nvidia-cuda-mps-control */
    bool is_running;
} pdctl_mps_t;
#define PDCTL_MPS_CONTROL "nvidia-cuda-mps-control" /* found with pdctl_which */
/* Creates the folders, points CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY of this process (and so of the
 * children it starts next) at them and starts the daemon; false (message printed, nothing left) on failure. */
bool pdctl_mps_start(pdctl_mps_t *m, const char *exe);
/* Quits the daemon (call when no worker is left), removes the folders, unsets the variables. */
void pdctl_mps_stop(pdctl_mps_t *m);

#endif
