/*
 * Calling a ubpdsl kernel from plain C: link the kernel's .so, include its header, call it.
 *
 * Build (see README.md):
 *   cc -O2 -DUBP_HEADER='"conv1.h"' -DUBP_KERNEL=ubp_conv1 -DUBP_M=UBP_CONV1_M -DUBP_K=UBP_CONV1_K \
 *      -I build main.c build/conv1.host.so -Wl,-rpath,'$ORIGIN' -o embed
 *   ./embed [PACKED_BLOB] [n]
 *
 * x[k][j] = ((k * 7 + j * 3) % 11 - 5) / 4.0 (exact in fp32), y is printed one row per line
 * with "%.9g", so a test can compare the output with numpy. PACKED_BLOB is the packed
 * weight file of a kernel that needs one; without it, packed_w is NULL (baked kernels).
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

static void *read_file(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = malloc(size > 0 ? (size_t)size : 1);
    if (buf && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    return buf;
}

int main(int argc, char **argv) {
    const int64_t M = UBP_M, K = UBP_K;
    const int64_t n = argc > 2 ? atoll(argv[2]) : 5;
    void *packed = NULL;
    if (argc > 1 && argv[1][0] != '\0') {
        packed = read_file(argv[1]);
        if (!packed) {
            fprintf(stderr, "cannot read packed weights %s\n", argv[1]);
            return 1;
        }
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
