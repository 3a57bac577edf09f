/* pdctl_mps.c: a private CUDA MPS control daemon for `pdctl up` (pdctl.h). Without MPS, two processes on one GPU
 * time-slice it: a prefill forward and a decode step never run together, and each switch between them costs the
 * decode step its turn. Under MPS their kernels share the GPU like two streams of one process. The daemon gets its
 * own pipe and log folders (CUDA_MPS_PIPE_DIRECTORY / CUDA_MPS_LOG_DIRECTORY, set in this process's environment so
 * the workers started after it inherit them), so it neither joins nor disturbs a system-wide MPS. */
#define _GNU_SOURCE /* mkdtemp, setenv */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "pd_common.h"
#include "pdctl.h"

#define MPS_WAIT_US (10ull * 1000000) /* for the control program to return (-d daemonises; quit waits) */
#define MPS_POLL_US 20000u

/* Runs the control program (with -d, or reading `input` on its stdin), waits for it; its exit status, or -1. */
static int s_run_control(const char *exe, const char *arg, const char *input) {
    int in[2] = {-1, -1};
    if (input && pipe(in)) return -1;
    pid_t pid = fork();
    if (pid == 0) {
        /* not pdctl's own stdout / stderr: a daemon holding them would keep pdctl's readers from seeing their end */
        const int null = open("/dev/null", O_RDWR);
        if (null >= 0) dup2(null, 0), dup2(null, 1), dup2(null, 2);
        if (null > 2) close(null);
        if (input) dup2(in[0], 0), close(in[0]), close(in[1]);
        signal(SIGPIPE, SIG_DFL), signal(SIGINT, SIG_DFL), signal(SIGTERM, SIG_DFL), signal(SIGCHLD, SIG_DFL);
        execl(exe, exe, arg, (char *)NULL);
        _exit(127);
    }
    if (input) {
        close(in[0]);
        if (pid > 0) {
            ssize_t n = write(in[1], input, strlen(input));
            (void)n; /* a control program that did not read it fails the wait below */
        }
        close(in[1]);
    }
    if (pid < 0) return -1;
    int status = 0;
    for (uint64_t t0 = pd_now_us(); waitpid(pid, &status, WNOHANG) == 0;) {
        if (pd_now_us() - t0 > MPS_WAIT_US) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        usleep(MPS_POLL_US);
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* Removes dir's plain entries (the daemon's pipes and logs), then dir. */
static void s_rm_flat(const char *dir) {
    DIR *d = opendir(dir);
    if (d) {
        char path[PDCTL_MPS_PATH + 64];
        for (struct dirent *e; (e = readdir(d));)
            if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                unlink(path);
            }
        closedir(d);
    }
    rmdir(dir);
}

bool pdctl_mps_start(pdctl_mps_t *m, const char *exe) {
    const char *tmp = getenv("TMPDIR");
    snprintf(m->dir, sizeof m->dir, "%s/pdctl-mps-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    snprintf(m->exe, sizeof m->exe, "%s", exe);
    if (!mkdtemp(m->dir)) {
        fprintf(stderr, "pdctl up: MPS: cannot create %s: %s\n", m->dir, strerror(errno));
        m->dir[0] = '\0';
        return false;
    }
    char pipe_dir[PDCTL_MPS_PATH + 8], log_dir[PDCTL_MPS_PATH + 8];
    snprintf(pipe_dir, sizeof pipe_dir, "%s/pipe", m->dir);
    snprintf(log_dir, sizeof log_dir, "%s/log", m->dir);
    if (mkdir(pipe_dir, 0700) || mkdir(log_dir, 0700) || setenv("CUDA_MPS_PIPE_DIRECTORY", pipe_dir, 1) ||
        setenv("CUDA_MPS_LOG_DIRECTORY", log_dir, 1)) {
        fprintf(stderr, "pdctl up: MPS: cannot prepare %s: %s\n", m->dir, strerror(errno));
        pdctl_mps_stop(m);
        return false;
    }
    const int rc = s_run_control(m->exe, "-d", NULL);
    if (rc != 0) {
        fprintf(stderr, "pdctl up: MPS: %s -d failed (%s %d)\n", m->exe, rc < 0 ? "no exit status," : "status", rc);
        pdctl_mps_stop(m);
        return false;
    }
    m->is_running = true;
    fprintf(stderr, "pdctl up: MPS control daemon started (CUDA_MPS_PIPE_DIRECTORY=%s)\n", pipe_dir);
    return true;
}

void pdctl_mps_stop(pdctl_mps_t *m) {
    if (m->is_running) { /* the workers are gone, so the daemon and its server have no client left */
        if (s_run_control(m->exe, NULL, "quit\n") != 0)
            fprintf(stderr, "pdctl up: MPS: '%s quit' failed; the daemon may still run\n", m->exe);
        else
            fprintf(stderr, "pdctl up: MPS control daemon stopped\n");
        m->is_running = false;
    }
    if (!m->dir[0]) return;
    char sub[PDCTL_MPS_PATH + 8];
    snprintf(sub, sizeof sub, "%s/pipe", m->dir);
    s_rm_flat(sub);
    snprintf(sub, sizeof sub, "%s/log", m->dir);
    s_rm_flat(sub);
    rmdir(m->dir);
    m->dir[0] = '\0';
    unsetenv("CUDA_MPS_PIPE_DIRECTORY"), unsetenv("CUDA_MPS_LOG_DIRECTORY");
}
