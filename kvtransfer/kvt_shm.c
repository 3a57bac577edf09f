/* kvt_shm.c: the shared-memory side of the same-host data path: a sender's KV pool in a named POSIX
 * shared-memory object, and the receiver's read-only mapping of it. Moves no bytes itself; the receiver
 * copies (kvt_receiver.c) and ZeroMQ still carries every header, credit and reply. */
#define _GNU_SOURCE /* getrandom */
#include <errno.h>
#include <fcntl.h>
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
    void *p = MAP_FAILED;
    if (ftruncate(fd, (off_t)bytes) == 0) p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    int saved = errno;
    close(fd);
    if (p == MAP_FAILED) {
        shm_unlink(name);
        snprintf(name, name_cap, "shm pool of %zu bytes: %s", bytes, strerror(saved));
        return NULL;
    }
    return p;
}

void kvt_shm_pool_destroy(void *base, size_t bytes, const char *name) {
    if (base) munmap(base, bytes);
    if (name && name[0] == '/') shm_unlink(name);
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
