/* kvt_hash.c: XXH3-64 for payload checksums, compiled inline here so it uses the vector width this build
 * targets (AVX2 with the project's -march=x86-64-v3: about 3x the SSE2 system libxxhash measured on both
 * benchmark hosts). Every build gives the same values, so peers built differently agree. Hashes only. */
#define XXH_INLINE_ALL
#include <stdalign.h>
#include <xxhash.h>

#include "kvt_int.h"

_Static_assert(sizeof(XXH3_state_t) <= sizeof(kvt_hash_t) && alignof(XXH3_state_t) <= alignof(kvt_hash_t),
               "kvt_hash_t must hold an XXH3_state_t");

uint64_t kvt_hash64(const void *p, size_t n) {
    return XXH3_64bits(p, n);
}
void kvt_hash_reset(kvt_hash_t *h) {
    XXH3_64bits_reset((XXH3_state_t *)h);
}
void kvt_hash_update(kvt_hash_t *h, const void *p, size_t n) {
    XXH3_64bits_update((XXH3_state_t *)h, p, n);
}
uint64_t kvt_hash_digest(const kvt_hash_t *h) {
    return XXH3_64bits_digest((const XXH3_state_t *)h);
}
