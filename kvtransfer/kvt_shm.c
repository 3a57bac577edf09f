/* kvt_shm.c: the shared-memory side of the same-host data path: a sender's KV pool in a named POSIX
 * shared-memory object, and the receiver's read-only mapping of it. Moves no bytes itself; the receiver
 * copies (kvt_receiver.c) and ZeroMQ still carries every header, credit and reply. */
#define _GNU_SOURCE /* getrandom */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kvt_int.h"

void *kvt_shm_pool_create(size_t bytes, char *name, size_t name_cap) {
    if (!name || name_cap < 64 || bytes == 0) {
        if (name && name_cap) name[0] = '\0';
        return NULL;
    }
    /* a random part in the name: a receiver on another host (or namespace) can never open a same-named
     * object by accident and read someone else's pool */
    uint64_t nonce = 0;
    if (getrandom(&nonce, sizeof nonce, 0) != (ssize_t)sizeof nonce)
        nonce = (uint64_t)pd_now_us() * 0x9e3779b97f4a7c15ull;
    snprintf(name, name_cap, "/pdkv-%d-%016llx", (int)getpid(), (unsigned long long)nonce);
    int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0) {
        snprintf(name, name_cap, "shm_open: %s", strerror(errno));
        return NULL;
    }
    /* the pages are taken now, not at first touch: a /dev/shm smaller than the pool (a container's 64 MiB default)
     * fails here with ENOSPC instead of raising SIGBUS in the middle of a forward */
    void *p = MAP_FAILED;
    int rc = posix_fallocate(fd, 0, (off_t)bytes);
    if (rc == 0) {
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (p == MAP_FAILED) rc = errno;
    }
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        snprintf(name, name_cap, "shm pool of %zu bytes: %s", bytes, strerror(rc));
        return NULL;
    }
    return p;
}

void kvt_shm_pool_destroy(void *base, size_t bytes, const char *name) {
    if (base) munmap(base, bytes);
    if (name && name[0] == '/') shm_unlink(name);
}

void *kvt_shm_alloc(void *ctx, size_t bytes) {
    kvt_shm_alloc_t *a = ctx;
    if (a->base) {
        snprintf(a->err, sizeof a->err, "this shm allocator already holds a pool");
        return NULL;
    }
    a->base = kvt_shm_pool_create(bytes, a->name, sizeof a->name);
    if (!a->base) {
        snprintf(a->err, sizeof a->err, "%s", a->name); /* the reason */
        a->name[0] = '\0';
        return NULL;
    }
    a->bytes = bytes;
    return a->base;
}

void kvt_shm_free(void *ctx, void *p, size_t bytes) {
    kvt_shm_alloc_t *a = ctx;
    if (!p || p != a->base) return;
    kvt_shm_pool_destroy(p, bytes, a->name);
    a->base = NULL, a->bytes = 0, a->name[0] = '\0';
}

/* Our names are "/pdkv-PID-NONCE" (kvt_shm_pool_create); the object lives in /dev/shm on Linux. */
int kvt_shm_sweep_stale(void) {
    DIR *d = opendir("/dev/shm");
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int pid = 0, end = 0;
        unsigned long long nonce = 0;
        if (sscanf(e->d_name, "pdkv-%d-%16llx%n", &pid, &nonce, &end) != 2 || e->d_name[end] != '\0' || pid <= 0)
            continue;
        /* EPERM: alive under another user; only ESRCH says nobody has that pid */
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        char path[300];
        snprintf(path, sizeof path, "/%s", e->d_name);
        if (shm_unlink(path) == 0) n++;
    }
    closedir(d);
    return n;
}

pd_status kvt_shm_map(const char *name, uint64_t bytes, const void **base) {
    *base = NULL;
    if (!name || name[0] != '/' || strlen(name) > 200 || bytes == 0 || bytes > (uint64_t)SIZE_MAX) return PD_EINVAL;
    int fd = shm_open(name, O_RDONLY, 0);
    if (fd < 0) return PD_EIO;
    struct stat st;
    void *p = MAP_FAILED;
    /* never map past the object's end: touching such a page would raise SIGBUS */
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && (uint64_t)st.st_size >= bytes)
        p = mmap(NULL, (size_t)bytes, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) return PD_EIO;
    *base = p;
    return PD_OK;
}

void kvt_shm_unmap(const void *base, uint64_t bytes) {
    if (base) munmap((void *)base, (size_t)bytes);
}
