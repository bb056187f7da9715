/*
 * Running one layer of a ubpdsl bundle from plain C: no generated header at build time, the
 * kernel library is opened at run time with dlopen.
 *
 *   bundle_main BUNDLE_DIR TARGET LAYER [X_FILE N [BIAS_FILE RES_FILE LO HI]]
 *
 * TARGET "aarch64" picks the variant this CPU runs (ubp_dispatch.h): aarch64-sve where the CPU
 * has SVE, aarch64-neon otherwise; an explicit aarch64-sve on a CPU without SVE is refused
 * (exit 1) instead of dying with SIGILL in the kernel. The chosen target goes to stderr.
 *
 * It reads BUNDLE_DIR/TARGET/kernels.tsv (written by `ubpdsl export`; one line per layer, tab
 * separated: layer symbol M K N so packed so_sha256 packed_sha256, '#' comments, packed '-' when
 * the weights are baked into the .so), checks the layer's files, opens its .so, looks up its
 * kernel, loads and validates the packed weights, then computes y[M, n] = W . x[K, n]:
 *   - with X_FILE: x is K*n little-endian float32 values read from that file;
 *   - without: n = 5 and x[k][j] = ((k * 7 + j * 3) % 11 - 5) / 4.0 (as main.c).
 *   - with BIAS_FILE RES_FILE LO HI: through the kernel's fused-epilogue entry point <symbol>_ep,
 *     y = clamp(W x + bias + residual, LO, HI): BIAS_FILE M float32 values or '-' (none),
 *     RES_FILE M*n float32 values or '-', LO / HI the clamp bounds (-inf inf: no clamp).
 * A pattern layer exported with the direct 3x3 pattern kernel (symbol ubp_pattern_<layer>, a "UBPP"
 * blob) reads the image itself: K is Cin and n must be H*W of the image it was built for (the
 * manifest's "image"; any other n makes the kernel return 7, UBP_ERR_BAD_PIXELS). The blob's magic tells the two apart.
 * y is printed one row per line with "%.9g".
 *
 * Nothing in the bundle is trusted: a malformed index row, a file name that is not a plain name
 * in the target directory, a symbolic link, a file whose sha256 differs from the index, or a
 * packed blob whose header, sizes or block structure are inconsistent is reported on stderr
 * with a non-zero exit code before any kernel code runs.
 *
 * Exit codes: 0 ok, 1 usage or I/O error, 2 the kernel returned an error, 3 the bundle is
 * inconsistent or corrupt (unknown layer, missing symbol, bad file, checksum or blob).
 *
 * Build for AArch64 and run under qemu-user (see bundle.md):
 *   python -m ziglang cc -target aarch64-linux-gnu.2.17 -O2 bundle_main.c -ldl -o bundle_main
 *   qemu-aarch64 -cpu cortex-a76 -L /usr/aarch64-linux-gnu ./bundle_main bundle aarch64-neon conv2
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ubp_dispatch.h"

typedef int32_t (*ubp_kernel_fn)(const float *x, float *y, int64_t n, const void *packed_w);

/* The fused-epilogue entry point <symbol>_ep and its argument (the public ABI of ubpdsl.abi; every
 * generated <layer>.h declares the same struct under the same guard). */
#ifndef UBP_EPILOGUE_DEFINED
#define UBP_EPILOGUE_DEFINED
#define UBP_EPILOGUE_VERSION 1
#define UBP_EP_CLAMP 1u
typedef struct ubp_epilogue {
    uint32_t version;
    uint32_t flags;
    const float *bias;
    const float *residual;
    float lo, hi;
} ubp_epilogue;
#endif
typedef int32_t (*ubp_kernel_ep_fn)(const float *x, float *y, int64_t n, const void *packed_w,
                                    const ubp_epilogue *ep);

enum { EXIT_IO = 1, EXIT_KERNEL = 2, EXIT_BUNDLE = 3 };
enum { NCOLS = 9, MAX_BLOCK = 64, COL_PAD = 16, HEADER_WORDS = 12 };
#define MAGIC 0x31504255u /* "UBP1" */
#define PATTERN_MAGIC 0x50504255u /* "UBPP" */
enum { PATTERN_HEADER_WORDS = 13, PATTERN_TAPS = 4, MAX_PATTERNS = 56 };
#define MAX_INDEX_BYTES (16L << 20)
#define MAX_FILE_BYTES (4LL << 30)

struct entry {
    char layer[256], symbol[256], so[256], packed[256], so_sha[65], packed_sha[65];
    int64_t M, K, N;
};

/* ------------------------------------------------------------------------------ sha256 (FIPS 180-4) */

struct sha256 {
    uint32_t h[8];
    uint64_t len;
    uint8_t buf[64];
    size_t fill;
};

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, r) (((x) >> (r)) | ((x) << (32 - (r))))

static void sha256_block(struct sha256 *s, const uint8_t *p) {
    uint32_t w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d, s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha256_init(struct sha256 *s) {
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->len = 0;
    s->fill = 0;
}

static void sha256_update(struct sha256 *s, const uint8_t *p, size_t n) {
    s->len += n;
    while (n > 0) {
        size_t take = 64 - s->fill < n ? 64 - s->fill : n;
        memcpy(s->buf + s->fill, p, take);
        s->fill += take, p += take, n -= take;
        if (s->fill == 64) {
            sha256_block(s, s->buf);
            s->fill = 0;
        }
    }
}

static void sha256_hex(struct sha256 *s, char out[65]) {
    uint64_t bits = s->len * 8;
    uint8_t pad = 0x80, zero = 0, lenb[8];
    sha256_update(s, &pad, 1);
    while (s->fill != 56) sha256_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(s, lenb, 8);
    for (int i = 0; i < 8; i++) snprintf(out + 8 * i, 9, "%08x", s->h[i]);
}

/* --------------------------------------------------------------------------------------- files */

/* Read the regular file DIR/NAME (a bundle file: no symbolic link) or, with DIR NULL, the user's file
 * NAME, at most max_bytes, into a 64-byte aligned buffer. */
static void *read_regular(const char *dir, const char *name, long long max_bytes, size_t *size_out, int *why) {
    char path[PATH_MAX];
    *why = EXIT_IO;
    if (snprintf(path, sizeof path, "%s%s%s", dir ? dir : "", dir ? "/" : "", name) >= (int)sizeof path) {
        fprintf(stderr, "path too long: %s\n", name);
        return NULL;
    }
    int fd = open(path, O_RDONLY | O_CLOEXEC | (dir ? O_NOFOLLOW : 0));
    if (fd < 0) {
        if (errno == ELOOP) *why = EXIT_BUNDLE;
        fprintf(stderr, "cannot open %s: %s\n", path, errno == ELOOP ? "a symbolic link (refused)" : strerror(errno));
        return NULL;
    }
    struct stat st;
    void *buf = NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        *why = EXIT_BUNDLE;
        fprintf(stderr, "%s is not a regular file\n", path);
    } else if (st.st_size > max_bytes) {
        *why = EXIT_BUNDLE;
        fprintf(stderr, "%s is %lld bytes, more than the %lld allowed\n", path, (long long)st.st_size, max_bytes);
    } else if (posix_memalign(&buf, 64, st.st_size > 0 ? (size_t)st.st_size : 1) != 0) {
        buf = NULL;
        fprintf(stderr, "out of memory reading %s\n", path);
    } else {
        size_t got = 0, want = (size_t)st.st_size;
        while (got < want) {
            ssize_t r = read(fd, (char *)buf + got, want - got);
            if (r <= 0) break;
            got += (size_t)r;
        }
        if (got != want) {
            fprintf(stderr, "cannot read %s (short read)\n", path);
            free(buf);
            buf = NULL;
        } else {
            *size_out = want;
        }
    }
    close(fd);
    return buf;
}

static int check_sha(const char *dir, const char *name, const void *data, size_t size, const char *want) {
    struct sha256 s;
    char got[65];
    sha256_init(&s);
    sha256_update(&s, data, size);
    sha256_hex(&s, got);
    if (strcmp(got, want) != 0) {
        fprintf(stderr, "%s/%s: sha256 %s differs from the index's %s (file changed or corrupt)\n", dir, name, got, want);
        return 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------ the index */

static int plain_name(const char *s) { /* a file name inside the target directory: no '/', no leading '.' */
    if (!s[0] || s[0] == '.' || strlen(s) > 200) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || strchr("_.-", *p)))
            return 0;
    return 1;
}

static int c_identifier(const char *s) {
    if (!s[0] || (s[0] >= '0' && s[0] <= '9')) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= 'A' && *p <= 'Z') || (*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return 0;
    return 1;
}

static int sha_hex(const char *s) {
    if (strlen(s) != 64) return 0;
    for (const char *p = s; *p; p++)
        if (!((*p >= '0' && *p <= '9') || (*p >= 'a' && *p <= 'f'))) return 0;
    return 1;
}

static int positive(const char *s, int64_t max, int64_t *out) {
    if (!s[0] || strlen(s) > 10) return 0;
    int64_t v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9') return 0;
        v = v * 10 + (*p - '0');
    }
    if (v < 1 || v > max) return 0;
    *out = v;
    return 1;
}

static int copy_field(char *dst, size_t cap, const char *src) {
    if (strlen(src) >= cap) return 0;
    strcpy(dst, src);
    return 1;
}

/* Split one index line into its NCOLS fields and check each; 0 if well formed. */
static int parse_row(char *line, struct entry *e) {
    char *f[NCOLS];
    int n = 0;
    for (char *p = line;; p++) {
        if (n == NCOLS) return 1; /* too many fields */
        f[n++] = p;
        p = strchr(p, '\t');
        if (!p) break;
        *p = '\0';
    }
    if (n != NCOLS) return 1;
    if (!copy_field(e->layer, sizeof e->layer, f[0]) || !c_identifier(f[1]) ||
        !copy_field(e->symbol, sizeof e->symbol, f[1]) || !positive(f[2], INT32_MAX, &e->M) ||
        !positive(f[3], INT32_MAX, &e->K) || !positive(f[4], MAX_BLOCK, &e->N) || e->N > e->M ||
        !plain_name(f[5]) || !copy_field(e->so, sizeof e->so, f[5]) || !sha_hex(f[7]) ||
        !copy_field(e->so_sha, sizeof e->so_sha, f[7]))
        return 1;
    if (strcmp(f[6], "-") == 0 || strcmp(f[8], "-") == 0) {
        if (strcmp(f[6], "-") != 0 || strcmp(f[8], "-") != 0) return 1;
        strcpy(e->packed, "-");
        strcpy(e->packed_sha, "-");
        return 0;
    }
    if (!plain_name(f[6]) || !sha_hex(f[8])) return 1;
    strcpy(e->packed, f[6]);
    strcpy(e->packed_sha, f[8]);
    return 0;
}

/* Find LAYER in DIR/kernels.tsv; 0 if found, else an exit code. Every row must be well formed. */
static int find_entry(const char *dir, const char *layer, struct entry *e) {
    size_t size = 0;
    int why;
    char *text = read_regular(dir, "kernels.tsv", MAX_INDEX_BYTES, &size, &why);
    if (!text) {
        fprintf(stderr, "(%s/kernels.tsv: not a bundle target directory?)\n", dir);
        return why;
    }
    if (memchr(text, '\0', size)) {
        fprintf(stderr, "%s/kernels.tsv holds a NUL byte: corrupt\n", dir);
        free(text);
        return EXIT_BUNDLE;
    }
    char *copy = realloc(text, size + 1);
    if (!copy) {
        free(text);
        return EXIT_IO;
    }
    text = copy;
    text[size] = '\0';
    int found = 0, lineno = 0, rc = 0;
    for (char *line = text; line && *line && !rc; lineno++) {
        char *next = strchr(line, '\n');
        if (next) *next++ = '\0';
        if (line[0] != '#' && line[0] != '\0') {
            struct entry row;
            if (parse_row(line, &row)) {
                fprintf(stderr, "%s/kernels.tsv:%d: malformed row (need %d valid tab-separated fields)\n", dir,
                        lineno + 1, NCOLS);
                rc = EXIT_BUNDLE;
            } else if (strcmp(row.layer, layer) == 0) {
                if (found) {
                    fprintf(stderr, "%s/kernels.tsv: layer %s appears twice\n", dir, layer);
                    rc = EXIT_BUNDLE;
                }
                *e = row;
                found = 1;
            }
        }
        line = next;
    }
    free(text);
    if (!rc && !found) {
        fprintf(stderr, "layer %s is not in %s/kernels.tsv\n", layer, dir);
        rc = EXIT_BUNDLE;
    }
    return rc;
}

/* ------------------------------------------------------------------------------ the packed blob */

/* Every section starts after the header on a 64-byte boundary and ends inside the blob. */
static int check_sections(const char *name, const int64_t *off, const int64_t *len, int n, int64_t header,
                          int64_t total) {
    for (int i = 0; i < n; i++)
        if (off[i] < header || off[i] % 64 || off[i] + len[i] > total) {
            fprintf(stderr, "%s: section %d [%lld, +%lld) lies outside the %lld-byte blob\n", name, i,
                    (long long)off[i], (long long)len[i], (long long)total);
            return 1;
        }
    return 0;
}

/* The same checks as ubpdsl.packing's validator: header, sizes and the block structure. */
static int check_blob(const char *name, const void *blob, size_t size, const struct entry *e) {
    const int32_t *h = blob;
    if (size < HEADER_WORDS * 4 || (uint32_t)h[0] != MAGIC || h[1] != 1) {
        fprintf(stderr, "%s is not a packed weight blob (too short, bad magic or version)\n", name);
        return 1;
    }
    if (h[2] != e->M || h[3] != e->K || h[4] != e->N) {
        fprintf(stderr, "%s does not hold the weights of a %lldx%lld N=%lld layer\n", name, (long long)e->M,
                (long long)e->K, (long long)e->N);
        return 1;
    }
    int64_t B = h[5], layout = h[6], total = h[11];
    if (B < 0 || B > total / 4 || B > e->K * (e->M / e->N) || (layout != 0 && layout != 1) ||
        total != (int64_t)size) {
        fprintf(stderr, "%s: inconsistent header (B=%lld, layout %lld, total %lld bytes, file %zu bytes)\n", name,
                (long long)B, (long long)layout, (long long)total, size);
        return 1;
    }
    int64_t off[4] = {h[7], h[8], h[9], h[10]};
    int64_t len[4] = {4 * (e->M + e->N + 1), 4 * B, 4 * (B + COL_PAD), 4 * B * e->N};
    if (check_sections(name, off, len, 4, HEADER_WORDS * 4, total)) return 1;
    const char *base = blob;
    const int32_t *row_ptr = (const int32_t *)(base + off[0]);
    const int32_t *rows = (const int32_t *)(base + off[1]);
    const int32_t *cols = (const int32_t *)(base + off[2]);
    if (row_ptr[0] != 0 || row_ptr[e->M + e->N] != B) {
        fprintf(stderr, "%s: row_ptr does not run from 0 to B=%lld\n", name, (long long)B);
        return 1;
    }
    for (int64_t r = 0; r < e->M + e->N; r++) {
        if (row_ptr[r + 1] < row_ptr[r] || row_ptr[r + 1] > B) {
            fprintf(stderr, "%s: row_ptr decreases at row %lld\n", name, (long long)r);
            return 1;
        }
        for (int64_t b = row_ptr[r]; b < row_ptr[r + 1]; b++)
            if (rows[b] != r || r > e->M - e->N) {
                fprintf(stderr, "%s: block %lld starts at row %d, outside 0..%lld or not where row_ptr puts it\n",
                        name, (long long)b, rows[b], (long long)(e->M - e->N));
                return 1;
            }
    }
    for (int64_t b = 0; b < B + COL_PAD; b++)
        if (cols[b] < 0 || cols[b] >= e->K) {
            fprintf(stderr, "%s: block %lld has column %d, outside 0..%lld\n", name, (long long)b, cols[b],
                    (long long)(e->K - 1));
            return 1;
        }
    return 0;
}

/* The pattern blob (ubpdsl.packing.unpack_pattern's checks the kernel relies on): header, sections,
 * filter_order a permutation, group_ptr from 0 to NK never decreasing, channels in 0..K-1. The
 * library itself is compared with the compiled-in one by the kernel (it returns 1 otherwise). */
static int check_pattern_blob(const char *name, const void *blob, size_t size, const struct entry *e) {
    const int32_t *h = blob;
    if (size < PATTERN_HEADER_WORDS * 4 || (uint32_t)h[0] != PATTERN_MAGIC || h[1] != 1 || e->N != 1) {
        fprintf(stderr, "%s is not a packed pattern blob (too short, bad magic or version)\n", name);
        return 1;
    }
    if (h[2] != e->M || h[3] != e->K) {
        fprintf(stderr, "%s does not hold the pattern weights of a %lldx%lld layer\n", name, (long long)e->M,
                (long long)e->K);
        return 1;
    }
    int64_t P = h[4], T = h[5], NK = h[6], total = h[12];
    if (P < 1 || P > MAX_PATTERNS || T != PATTERN_TAPS || NK < 0 || NK > e->M * e->K || total != (int64_t)size) {
        fprintf(stderr, "%s: inconsistent header (P=%lld, T=%lld, NK=%lld, total %lld bytes, file %zu bytes)\n", name,
                (long long)P, (long long)T, (long long)NK, (long long)total, size);
        return 1;
    }
    int64_t off[5] = {h[7], h[8], h[9], h[10], h[11]};
    int64_t len[5] = {4 * P * T, 4 * e->M, 4 * (e->M * P + 1), 4 * NK, 4 * NK * T};
    if (check_sections(name, off, len, 5, PATTERN_HEADER_WORDS * 4, total)) return 1;
    const char *base = blob;
    const int32_t *order = (const int32_t *)(base + off[1]), *gptr = (const int32_t *)(base + off[2]);
    const int32_t *chan = (const int32_t *)(base + off[3]);
    char *seen = calloc((size_t)e->M, 1);
    if (!seen) return 1;
    for (int64_t f = 0; f < e->M; f++) {
        if (order[f] < 0 || order[f] >= e->M || seen[order[f]]) {
            fprintf(stderr, "%s: filter_order is not a permutation of 0..%lld\n", name, (long long)(e->M - 1));
            free(seen);
            return 1;
        }
        seen[order[f]] = 1;
    }
    free(seen);
    if (gptr[0] != 0 || gptr[e->M * P] != NK) {
        fprintf(stderr, "%s: group_ptr does not run from 0 to NK=%lld\n", name, (long long)NK);
        return 1;
    }
    for (int64_t g = 0; g < e->M * P; g++)
        if (gptr[g + 1] < gptr[g] || gptr[g + 1] > NK) {
            fprintf(stderr, "%s: group_ptr decreases at %lld\n", name, (long long)(g + 1));
            return 1;
        }
    for (int64_t k = 0; k < NK; k++)
        if (chan[k] < 0 || chan[k] >= e->K) {
            fprintf(stderr, "%s: kernel %lld reads input channel %d, outside 0..%lld\n", name, (long long)k, chan[k],
                    (long long)(e->K - 1));
            return 1;
        }
    return 0;
}

/* ------------------------------------------------------------------------------------------ main */

int main(int argc, char **argv) {
    if (argc != 4 && argc != 6 && argc != 10) {
        fprintf(stderr, "usage: %s BUNDLE_DIR TARGET LAYER [X_FILE N [BIAS_FILE RES_FILE LO HI]]\n", argv[0]);
        return EXIT_IO;
    }
    const char *target = argv[2];
    if (!plain_name(target)) {
        fprintf(stderr, "TARGET must be a target name such as host or aarch64-neon, got %s\n", target);
        return EXIT_IO;
    }
    if (strcmp(target, "aarch64") == 0) {
        target = ubp_aarch64_target();
        fprintf(stderr, "bundle_main: target %s (%s)\n", target, ubp_cpu_has_sve() ? "the CPU has SVE" : "no SVE");
    } else if (strcmp(target, "aarch64-sve") == 0 && !ubp_cpu_has_sve()) {
        fprintf(stderr, "this CPU has no SVE: the aarch64-sve kernels would die with SIGILL; use TARGET aarch64-neon "
                        "or aarch64 (picks NEON here)\n");
        return EXIT_IO;
    }
    char dir[PATH_MAX], path[PATH_MAX], real_dir[PATH_MAX], real_so[PATH_MAX];
    if (snprintf(dir, sizeof dir, "%s/%s", argv[1], target) >= (int)sizeof dir) return EXIT_IO;
    struct entry e;
    int rc = find_entry(dir, argv[3], &e);
    if (rc) return rc;

    /* The .so: a regular file in the target directory whose sha256 matches the index. */
    size_t so_size = 0;
    int why;
    void *so_bytes = read_regular(dir, e.so, MAX_FILE_BYTES, &so_size, &why);
    if (!so_bytes) return why;
    if (check_sha(dir, e.so, so_bytes, so_size, e.so_sha)) return EXIT_BUNDLE;
    free(so_bytes);
    snprintf(path, sizeof path, "%s/%s", dir, e.so);
    if (!realpath(dir, real_dir) || !realpath(path, real_so) || strncmp(real_so, real_dir, strlen(real_dir)) != 0 ||
        real_so[strlen(real_dir)] != '/') {
        fprintf(stderr, "%s lies outside the bundle directory %s\n", path, dir);
        return EXIT_BUNDLE;
    }

    /* The packed weights: checked completely before the kernel sees them. */
    void *packed = NULL;
    if (strcmp(e.packed, "-") != 0) {
        size_t size = 0;
        packed = read_regular(dir, e.packed, MAX_FILE_BYTES, &size, &why);
        if (!packed) return why;
        snprintf(path, sizeof path, "%s/%s", dir, e.packed);
        if (check_sha(dir, e.packed, packed, size, e.packed_sha))
            return EXIT_BUNDLE;
        int pattern = size >= 4 && *(const uint32_t *)packed == PATTERN_MAGIC;
        if (pattern ? check_pattern_blob(path, packed, size, &e) : check_blob(path, packed, size, &e))
            return EXIT_BUNDLE;
    }

    void *lib = dlopen(real_so, RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        fprintf(stderr, "cannot load %s: %s\n", real_so, dlerror());
        return EXIT_BUNDLE;
    }
    ubp_kernel_fn kernel = (ubp_kernel_fn)dlsym(lib, e.symbol);
    if (!kernel) {
        fprintf(stderr, "%s has no symbol %s\n", real_so, e.symbol);
        return EXIT_BUNDLE;
    }

    int64_t n = 5;
    float *x;
    if (argc >= 6) {
        char *end = NULL;
        errno = 0;
        long long v = strtoll(argv[5], &end, 10);
        if (errno || !end || *end || v < 1 || v > (1LL << 24) || e.K > (INT64_MAX / 4) / v) {
            fprintf(stderr, "N must be an integer in 1..%lld, got %s\n", 1LL << 24, argv[5]);
            return EXIT_IO;
        }
        n = v;
        size_t size = 0;
        x = read_regular(NULL, argv[4], (long long)(sizeof(float) * e.K * n), &size, &why);
        if (!x || size != sizeof(float) * (size_t)(e.K * n)) {
            fprintf(stderr, "%s must hold K*n = %lld*%lld float32 values\n", argv[4], (long long)e.K, (long long)n);
            return EXIT_IO;
        }
    } else {
        x = malloc(sizeof(float) * (size_t)(e.K * n));
        if (!x) return EXIT_IO;
        for (int64_t k = 0; k < e.K; k++)
            for (int64_t j = 0; j < n; j++) x[k * n + j] = (float)((k * 7 + j * 3) % 11 - 5) / 4.0f;
    }
    if (e.M > (INT64_MAX / 4) / n) return EXIT_IO;
    float *y = malloc(sizeof(float) * (size_t)(e.M * n));
    if (!y) return EXIT_IO;

    int32_t krc;
    float *bias = NULL, *res = NULL;
    if (argc == 10) { /* the fused epilogue: y = clamp(W x + bias + residual, LO, HI) in <symbol>_ep */
        char ep_symbol[300];
        snprintf(ep_symbol, sizeof ep_symbol, "%s_ep", e.symbol);
        ubp_kernel_ep_fn kernel_ep = (ubp_kernel_ep_fn)dlsym(lib, ep_symbol);
        if (!kernel_ep) {
            fprintf(stderr, "%s has no symbol %s\n", real_so, ep_symbol);
            return EXIT_BUNDLE;
        }
        size_t size = 0;
        if (strcmp(argv[6], "-") != 0) {
            bias = read_regular(NULL, argv[6], (long long)(sizeof(float) * e.M), &size, &why);
            if (!bias || size != sizeof(float) * (size_t)e.M) {
                fprintf(stderr, "%s must hold M = %lld float32 values\n", argv[6], (long long)e.M);
                return EXIT_IO;
            }
        }
        if (strcmp(argv[7], "-") != 0) {
            res = read_regular(NULL, argv[7], (long long)(sizeof(float) * e.M * n), &size, &why);
            if (!res || size != sizeof(float) * (size_t)(e.M * n)) {
                fprintf(stderr, "%s must hold M*n = %lld*%lld float32 values\n", argv[7], (long long)e.M, (long long)n);
                return EXIT_IO;
            }
        }
        char *end_lo = NULL, *end_hi = NULL;
        const float lo = strtof(argv[8], &end_lo), hi = strtof(argv[9], &end_hi);
        if (!end_lo || *end_lo || !end_hi || *end_hi || !(lo <= hi)) {
            fprintf(stderr, "LO and HI must be numbers (inf, -inf allowed) with LO <= HI, got %s %s\n", argv[8],
                    argv[9]);
            return EXIT_IO;
        }
        ubp_epilogue ep = {UBP_EPILOGUE_VERSION, (isinf(lo) && isinf(hi)) ? 0u : UBP_EP_CLAMP, bias, res, lo, hi};
        krc = kernel_ep(x, y, n, packed, &ep);
    } else {
        krc = kernel(x, y, n, packed);
    }
    if (krc != 0) {
        fprintf(stderr, "kernel %s returned error code %d\n", e.symbol, (int)krc);
        return EXIT_KERNEL;
    }
    for (int64_t i = 0; i < e.M; i++) {
        for (int64_t j = 0; j < n; j++) printf(j ? " %.9g" : "%.9g", y[i * n + j]);
        printf("\n");
    }
    free(x);
    free(y);
    free(bias);
    free(res);
    free(packed);
    dlclose(lib);
    return 0;
}
