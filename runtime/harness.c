/*
 * Generic test harness for one ubpdsl kernel, linked statically (musl) with the kernel's
 * object file and run under qemu-aarch64 (or natively). Built by ubpdsl.runtime.qemu:
 *
 *   zig cc -target aarch64-linux-musl -static -O2 -DUBP_KERNEL=<symbol> harness.c kernel.o
 *
 * Usage: harness INPUT OUTPUT
 *
 * INPUT (little endian):
 *   char[4]  "UBPI"
 *   uint32   version (1, or 2: an epilogue follows x; needs -DUBP_KERNEL_EP=<symbol>_ep)
 *   int64    M, K, n
 *   int64    packed_len   (-1: pass packed_w = NULL; a data-driven kernel then returns 3)
 *   uint8    packed[packed_len]
 *   float    x[K * n]
 *   version 2 only: uint32 ep version, uint32 ep flags, float lo, hi, int64 has_bias,
 *   int64 has_residual, float bias[M] (if has_bias), float residual[M * n] (if has_residual);
 *   the kernel's <symbol>_ep is called with a ubp_epilogue (ubp_epilogue.h, from ubpdsl/abi.py)
 *
 * OUTPUT (little endian):
 *   char[4]  "UBPO"
 *   int32    kernel return code (ubpdsl/abi.py)
 *   uint32   flags (bit 0: a y element was not written; bit 1: a write past the end of y)
 *   uint32   reserved (0)
 *   float    y[M * n]
 *
 * Every buffer is separately allocated, 64-byte aligned. y is pre-filled with a NaN
 * sentinel and followed by guard words, so the harness detects elements the kernel did
 * not write and writes past the end of y. Exit status: 0 if OUTPUT was written (whatever
 * the kernel returned), 3 on a usage or I/O error.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef UBP_KERNEL
#error "compile with -DUBP_KERNEL=<kernel symbol>"
#endif

int32_t UBP_KERNEL(const float *x, float *y, int64_t n, const void *packed_w);
#ifdef UBP_KERNEL_EP
#include "ubp_epilogue.h"
int32_t UBP_KERNEL_EP(const float *x, float *y, int64_t n, const void *packed_w, const ubp_epilogue *ep);
#endif

#define GUARD_WORDS 64
static const uint32_t SENTINEL = 0x7fc0dead; /* a quiet NaN no kernel computes */

static void die(const char *msg) {
    fprintf(stderr, "harness: %s\n", msg);
    exit(3);
}

static void *alloc(size_t bytes) {
    size_t rounded = (bytes + 63) / 64 * 64;
    void *p = aligned_alloc(64, rounded ? rounded : 64);
    if (!p) die("out of memory");
    return p;
}

static void read_exact(FILE *f, void *buf, size_t bytes) {
    if (bytes && fread(buf, 1, bytes, f) != bytes) die("input file truncated");
}

int main(int argc, char **argv) {
    if (argc != 3) die("usage: harness INPUT OUTPUT");
    FILE *in = fopen(argv[1], "rb");
    if (!in) die("cannot open input file");

    char magic[4];
    uint32_t version;
    int64_t dims[4];
    read_exact(in, magic, 4);
    read_exact(in, &version, 4);
    if (memcmp(magic, "UBPI", 4) != 0 || (version != 1 && version != 2)) die("bad input file magic/version");
    read_exact(in, dims, sizeof dims);
    int64_t M = dims[0], K = dims[1], n = dims[2], packed_len = dims[3];
    if (M < 0 || K < 0 || n < 0 || packed_len < -1) die("bad dimensions in input file");

    void *packed = NULL;
    if (packed_len >= 0) {
        packed = alloc((size_t)packed_len);
        read_exact(in, packed, (size_t)packed_len);
    }
    float *x = alloc((size_t)(K * n) * sizeof(float));
    read_exact(in, x, (size_t)(K * n) * sizeof(float));
#ifdef UBP_KERNEL_EP
    ubp_epilogue ep;
    memset(&ep, 0, sizeof ep);
    if (version == 2) {
        uint32_t words[2];
        float bounds[2];
        int64_t has[2];
        read_exact(in, words, sizeof words);
        read_exact(in, bounds, sizeof bounds);
        read_exact(in, has, sizeof has);
        ep.version = words[0];
        ep.flags = words[1];
        ep.lo = bounds[0];
        ep.hi = bounds[1];
        if (has[0]) {
            float *bias = alloc((size_t)M * sizeof(float));
            read_exact(in, bias, (size_t)M * sizeof(float));
            ep.bias = bias;
        }
        if (has[1]) {
            float *res = alloc((size_t)(M * n) * sizeof(float));
            read_exact(in, res, (size_t)(M * n) * sizeof(float));
            ep.residual = res;
        }
    }
#else
    if (version == 2) die("input has an epilogue: build the harness with -DUBP_KERNEL_EP");
#endif
    fclose(in);

    size_t ny = (size_t)(M * n);
    uint32_t *ybits = alloc((ny + GUARD_WORDS) * sizeof(float));
    for (size_t i = 0; i < ny + GUARD_WORDS; i++) ybits[i] = SENTINEL;
    float *y = (float *)ybits;

#ifdef UBP_KERNEL_EP
    int32_t rc = version == 2 ? UBP_KERNEL_EP(x, y, n, packed, &ep) : UBP_KERNEL(x, y, n, packed);
#else
    int32_t rc = UBP_KERNEL(x, y, n, packed);
#endif

    uint32_t flags = 0;
    if (rc == 0)
        for (size_t i = 0; i < ny; i++)
            if (ybits[i] == SENTINEL) { flags |= 1; break; }
    for (size_t i = ny; i < ny + GUARD_WORDS; i++)
        if (ybits[i] != SENTINEL) { flags |= 2; break; }

    FILE *out = fopen(argv[2], "wb");
    if (!out) die("cannot open output file");
    uint32_t reserved = 0;
    if (fwrite("UBPO", 1, 4, out) != 4 || fwrite(&rc, 4, 1, out) != 1 || fwrite(&flags, 4, 1, out) != 1 ||
        fwrite(&reserved, 4, 1, out) != 1 || fwrite(y, sizeof(float), ny, out) != ny)
        die("cannot write output file");
    if (fclose(out) != 0) die("cannot write output file");
    return 0;
}
