/*
 * Calling a ubpdsl kernel from plain C: link the kernel's .so, include its header, call it.
 *
 * Build (see README.md):
 *   cc -O2 -DUBP_HEADER='"conv1.h"' -DUBP_KERNEL=ubp_conv1 -DUBP_M=UBP_CONV1_M -DUBP_K=UBP_CONV1_K \
 *      -DUBP_BAKED=UBP_CONV1_BAKED -I build main.c build/conv1.host.so -Wl,-rpath,'$ORIGIN' -o embed
 *   ./embed [PACKED_BLOB] [n]
 *
 * x[k][j] = ((k * 7 + j * 3) % 11 - 5) / 4.0 (exact in fp32), y is printed one row per line
 * with "%.9g", so a test can compare the output with numpy. PACKED_BLOB is the packed
 * weight file of a kernel that needs one; only a kernel with baked weights (UBP_BAKED 1,
 * from the header's UBP_<LAYER>_BAKED) runs without one (packed_w NULL). Exit codes: 0 ok,
 * 1 usage or I/O error, 2 the kernel returned an error code.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef UBP_HEADER
#include UBP_HEADER /* declares UBP_KERNEL and its _M/_K macros */
#else
int32_t UBP_KERNEL(const float *x, float *y, int64_t n, const void *packed_w);
#endif

#if !defined(UBP_KERNEL) || !defined(UBP_M) || !defined(UBP_K)
#error "compile with -DUBP_KERNEL=<symbol> -DUBP_M=<rows of y> -DUBP_K=<rows of x>"
#endif
#ifndef UBP_BAKED
#define UBP_BAKED 0 /* unknown: assume the kernel needs its packed weights */
#endif

/* The whole file, 64-byte aligned (as the packer lays the blob out); NULL if unreadable or empty. */
static void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    void *buf = NULL;
    long size = -1;
    if (fseek(f, 0, SEEK_END) == 0) size = ftell(f);
    if (size > 0 && fseek(f, 0, SEEK_SET) == 0 && posix_memalign(&buf, 64, (size_t)size) == 0 &&
        fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return size > 0 ? buf : NULL;
}

int main(int argc, char **argv) {
    const int64_t M = UBP_M, K = UBP_K;
    char *end = NULL;
    const int64_t n = argc > 2 ? strtoll(argv[2], &end, 10) : 5;
    if (argc > 2 && (*end || n < 1 || n > (1 << 24))) {
        fprintf(stderr, "n must be an integer in 1..%d, got %s\n", 1 << 24, argv[2]);
        return 1;
    }
    void *packed = NULL;
    if (argc > 1 && argv[1][0] != '\0') {
        packed = read_file(argv[1]);
        if (!packed) {
            fprintf(stderr, "cannot read packed weights %s\n", argv[1]);
            return 1;
        }
    } else if (!UBP_BAKED) {
        fprintf(stderr, "usage: %s PACKED_WEIGHTS [n]: this kernel reads its weights from the packed blob "
                        "(<layer>.packed.bin); only a kernel built with --specialize runs without one\n", argv[0]);
        return 1;
    }
    float *x = malloc(sizeof(float) * (size_t)(K * n));
    float *y = malloc(sizeof(float) * (size_t)(M * n));
    if (!x || !y) return 1;
    for (int64_t k = 0; k < K; k++)
        for (int64_t j = 0; j < n; j++)
            x[k * n + j] = (float)((k * 7 + j * 3) % 11 - 5) / 4.0f;

    int32_t rc = UBP_KERNEL(x, y, n, packed);
    if (rc != 0) {
        fprintf(stderr, "kernel returned error code %d\n", (int)rc);
        return 2;
    }
    for (int64_t i = 0; i < M; i++) {
        for (int64_t j = 0; j < n; j++) printf(j ? " %.9g" : "%.9g", y[i * n + j]);
        printf("\n");
    }
    free(x);
    free(y);
    free(packed);
    return 0;
}
