/* cuda_check.h: CK(call), for the GPU tests' own CUDA calls: a failure ends the test with the call, where it was
 * made and CUDA's reason; and the copy bandwidth the benchmarks in those tests are measured against. */
#ifndef CUDA_CHECK_H
#define CUDA_CHECK_H

#include <cuda_runtime.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(call)                                                                                  \
    do {                                                                                          \
        cudaError_t e_ = (call);                                                                  \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

/* Device-to-device copy bandwidth, bytes read + written per second / 1e9: the best a memory-bound kernel can do,
 * measured in the same run as the kernel it is set against (one warm-up copy, then five timed). */
static inline double cuda_copy_gbs(void *dst, const void *src, size_t bytes, cudaStream_t st) {
    cudaEvent_t e0, e1;
    float ms;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st));
    CK(cudaEventRecord(e0, st));
    for (int i = 0; i < 5; i++) CK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    CK(cudaEventElapsedTime(&ms, e0, e1));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    return 2.0 * (double)bytes * 5 / (ms * 1e-3) / 1e9;
}

#endif
