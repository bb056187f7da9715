/*
 * Running one layer of a ubpdsl bundle from plain C: no generated header at build time, the
 * kernel library is opened at run time with dlopen.
 *
 *   bundle_main BUNDLE_DIR TARGET LAYER [X_FILE N]
 *
 * It reads BUNDLE_DIR/TARGET/kernels.tsv (written by `ubpdsl export`; one line per layer:
 * layer symbol M K N so packed, tab separated, '#' comments, packed '-' when the weights are
 * baked into the .so), opens the layer's .so, looks up its kernel, loads the packed weights
 * (and checks their header against the index), then computes y[M, n] = W . x[K, n]:
 *   - with X_FILE: x is K*n little-endian float32 values read from that file;
 *   - without: n = 5 and x[k][j] = ((k * 7 + j * 3) % 11 - 5) / 4.0 (as main.c).
 * y is printed one row per line with "%.9g".
 *
 * Exit codes: 0 ok, 1 usage or I/O error, 2 the kernel returned an error, 3 the bundle is
 * inconsistent (unknown layer, missing symbol, packed weights for another shape).
 *
 * Build for AArch64 and run under qemu-user (see bundle.md):
 *   python -m ziglang cc -target aarch64-linux-gnu.2.17 -O2 bundle_main.c -ldl -o bundle_main
 *   qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu ./bundle_main bundle aarch64-neon conv2
 */
#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef int32_t (*ubp_kernel_fn)(const float *x, float *y, int64_t n, const void *packed_w);

struct entry {
    char layer[256], symbol[256], so[512], packed[512];
    long long M, K, N;
};

static void *read_file(const char *path, long *size_out) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    void *buf = NULL;
    /* 64-byte alignment, as the packer lays the blob out */
    if (size >= 0 && posix_memalign(&buf, 64, size > 0 ? (size_t)size : 1) == 0 &&
        fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    if (size_out) *size_out = size;
    return buf;
}

/* Find LAYER in DIR/kernels.tsv; 0 if found. */
static int find_entry(const char *dir, const char *layer, struct entry *e) {
    char path[1024];
    snprintf(path, sizeof path, "%s/kernels.tsv", dir);
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "cannot open %s (not a bundle target directory?)\n", path);
        return 1;
    }
    char line[2048];
    int found = 0;
    while (!found && fgets(line, sizeof line, f)) {
        if (line[0] == '#' || line[0] == '\n') continue;
        if (sscanf(line, "%255[^\t]\t%255[^\t]\t%lld\t%lld\t%lld\t%511[^\t]\t%511[^\t\n]", e->layer, e->symbol,
                   &e->M, &e->K, &e->N, e->so, e->packed) == 7 &&
            strcmp(e->layer, layer) == 0)
            found = 1;
    }
    fclose(f);
    if (!found) fprintf(stderr, "layer %s is not in %s\n", layer, path);
    return !found;
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 6) {
        fprintf(stderr, "usage: %s BUNDLE_DIR TARGET LAYER [X_FILE N]\n", argv[0]);
        return 1;
    }
    char dir[1024], path[1536];
    snprintf(dir, sizeof dir, "%s/%s", argv[1], argv[2]);
    struct entry e;
    if (find_entry(dir, argv[3], &e)) return 3;

    snprintf(path, sizeof path, "%s/%s", dir, e.so);
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "cannot load %s: %s\n", path, dlerror());
        return 3;
    }
    ubp_kernel_fn kernel = (ubp_kernel_fn)dlsym(lib, e.symbol);
    if (!kernel) {
        fprintf(stderr, "%s has no symbol %s\n", path, e.symbol);
        return 3;
    }
    void *packed = NULL;
    if (strcmp(e.packed, "-") != 0) {
        snprintf(path, sizeof path, "%s/%s", dir, e.packed);
        long size = 0;
        packed = read_file(path, &size);
        if (!packed || size < 48) {
            fprintf(stderr, "cannot read packed weights %s\n", path);
            return 1;
        }
        const uint32_t *h = packed; /* magic "UBP1", version, M, K, N, ... */
        if (h[0] != 0x31504255u || h[2] != (uint32_t)e.M || h[3] != (uint32_t)e.K || h[4] != (uint32_t)e.N) {
            fprintf(stderr, "%s does not hold the weights of a %lldx%lld N=%lld layer\n", path, e.M, e.K, e.N);
            return 3;
        }
    }

    int64_t n = 5;
    float *x;
    if (argc == 6) {
        n = atoll(argv[5]);
        long size = 0;
        x = read_file(argv[4], &size);
        if (!x || n < 0 || size != (long)(sizeof(float) * e.K * n)) {
            fprintf(stderr, "%s must hold K*n = %lld*%lld float32 values\n", argv[4], e.K, (long long)n);
            return 1;
        }
    } else {
        x = malloc(sizeof(float) * (size_t)(e.K * n));
        if (!x) return 1;
        for (int64_t k = 0; k < e.K; k++)
            for (int64_t j = 0; j < n; j++) x[k * n + j] = (float)((k * 7 + j * 3) % 11 - 5) / 4.0f;
    }
    float *y = malloc(sizeof(float) * (size_t)(e.M * n > 0 ? e.M * n : 1));
    if (!y) return 1;

    int32_t rc = kernel(x, y, n, packed);
    if (rc != 0) {
        fprintf(stderr, "kernel %s returned error code %d\n", e.symbol, (int)rc);
        return 2;
    }
    for (int64_t i = 0; i < e.M; i++) {
        for (int64_t j = 0; j < n; j++) printf(j ? " %.9g" : "%.9g", y[i * n + j]);
        printf("\n");
    }
    free(x);
    free(y);
    free(packed);
    dlclose(lib);
    return 0;
}
