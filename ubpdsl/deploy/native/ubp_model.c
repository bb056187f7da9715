/* ubp_model: run a planned channel-major subgraph (sparse 1x1 convs on ubpdsl kernels, depthwise
 * 3x3, epilogues, global average pool) with one call and no allocation.
 *
 * A plan is a little-endian blob made by ubpdsl.deploy.plan (the format is documented there):
 *   int64 header[16], int64 ops[n_ops][16], then float/byte payload (biases, depthwise weights,
 *   packed sparse weights), then n_kernels function-pointer slots filled by ubp_model_bind().
 * Activations inside the subgraph are [C, B, H, W] (channel-major over the batch), so one sparse
 * kernel call covers the whole batch (n = B * H * W). The model input is [B, C, H, W] (NCHW),
 * the output [B, C_out] (pooled).
 *
 * Public symbols (new; the per-layer kernel ABI is unchanged):
 *   int64_t ubp_model_workspace_bytes(const void *plan);
 *   int32_t ubp_model_shape(const void *plan, int64_t *shape) {
    if (!plan || !check_header(plan)) return E_HEADER;
    const int64_t *h = header(plan);
    shape[0] = h[H_BATCH], shape[1] = h[H_CIN], shape[2] = h[H_HIN], shape[3] = h[H_WIN], shape[4] = h[H_COUT];
    return 0;
}

int32_t ubp_model_bind(void *plan, int64_t slot, ubp_kernel_fn fn);
 *   int32_t ubp_model_shape(const void *plan, int64_t shape[5]);   -> B, C_in, H_in, W_in, C_out
 *   int32_t ubp_model_run(const void *plan, const float *x, float *y, void *workspace);
 *   int32_t ubp_model_run_profiled(const void *plan, const float *x, float *y, void *workspace,
 *                                  double *seconds_per_kind);
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef int32_t (*ubp_kernel_fn)(const float *x, float *y, int64_t n, const void *packed_w);

#define UBP_MODEL_MAGIC 0x4d504255LL /* "UBPM" */
#define UBP_MODEL_VERSION 1
#define REC 16

enum { H_MAGIC, H_VERSION, H_NOPS, H_BATCH, H_CIN, H_HIN, H_WIN, H_COUT, H_WS_BYTES, H_NKERNELS,
       H_KERNELS_OFF, H_TOTAL_BYTES, H_SCRATCH_OFF };
enum { OP_PW = 1, OP_DW = 2, OP_POOL = 3, OP_INPUT = 4, OP_EXPAND_DW = 5 };
/* op record fields */
enum { F_KIND, F_SRC, F_DST, F_C, F_M, F_HW, F_KERNEL, F_PACKED, F_BIAS, F_RES, F_H, F_W, F_STRIDE,
       F_WEIGHTS, F_PRE_BIAS, F_CLAMP };
/* OP_EXPAND_DW reuses three fields: output rows per band, and the workspace offsets of its
 * input and expanded band buffers */
enum { F_BAND = F_HW, F_XB = F_RES, F_EB = F_CLAMP };
/* OP_DW: F_CLAMP != 0 means its source is in [B, C, H, W] (the model input) */
enum { F_SRC_NCHW = F_CLAMP };
/* clamp codes: 0 none, 1 ReLU (>= 0), 2 ReLU6 */
/* buffer ids: -1 model input, -2 model output, >= 0 byte offset into the workspace */

/* error codes */
#define E_HEADER 10
#define E_UNBOUND 11
#define E_OP 12
#define E_KERNEL_BASE 100 /* + the kernel's own return code */

static inline float clampf(float v, int64_t mode) {
    if (mode == 0) return v;
    v = v > 0.0f ? v : 0.0f;
    if (mode == 2) v = v < 6.0f ? v : 6.0f;
    return v;
}

static const int64_t *header(const void *plan) { return (const int64_t *)plan; }

static int check_header(const void *plan) {
    const int64_t *h = header(plan);
    return h[H_MAGIC] == UBP_MODEL_MAGIC && h[H_VERSION] == UBP_MODEL_VERSION;
}

int64_t ubp_model_workspace_bytes(const void *plan) {
    if (!plan || !check_header(plan)) return -1;
    return header(plan)[H_WS_BYTES];
}

int32_t ubp_model_shape(const void *plan, int64_t *shape) {
    if (!plan || !check_header(plan)) return E_HEADER;
    const int64_t *h = header(plan);
    shape[0] = h[H_BATCH], shape[1] = h[H_CIN], shape[2] = h[H_HIN], shape[3] = h[H_WIN], shape[4] = h[H_COUT];
    return 0;
}

int32_t ubp_model_bind(void *plan, int64_t slot, ubp_kernel_fn fn) {
    if (!plan || !check_header(plan)) return E_HEADER;
    const int64_t *h = header(plan);
    if (slot < 0 || slot >= h[H_NKERNELS]) return E_OP;
    ubp_kernel_fn *table = (ubp_kernel_fn *)((char *)plan + h[H_KERNELS_OFF]);
    table[slot] = fn;
    return 0;
}

static const float *cbuf(const void *plan, int64_t off) { return (const float *)((const char *)plan + off); }

static float *buf(int64_t id, const float *x, float *y, void *ws) {
    if (id == -1) return (float *)x;
    if (id == -2) return y;
    return (float *)((char *)ws + id);
}

/* Depthwise 3x3, pad 1, stride 1 or 2, bias + ReLU6 fused, over C channels x B planes.
 *
 * Each plane is first staged into scratch with its zero padding, applying the producer's epilogue
 * (bias + ReLU6 of the expand conv) on the fly: stride 1 as one padded plane [(H+2) x (W+2)];
 * stride 2 as its four row/column phases [(Ho+1) x (Wo+1)] each, so every tap reads unit-stride.
 * The 9-tap sum then runs as one flat loop over the staged width (a few junk columns per row,
 * dropped when the rows are copied out): long vectors even for 7x7 planes. */
/* Staging reads a band: rows y0.. of an H-row plane (``s`` points at row y0); staged row r is
 * input row iy_lo + r, zero outside 0..H-1 (the padding). */
static inline void stage_row_s1(const float *restrict sr, float *restrict r, int64_t W, float pb, int pre) {
    r[0] = 0.0f;
    r[W + 1] = 0.0f;
    if (pre) {
        for (int64_t x = 0; x < W; ++x) {
            float v = sr[x] + pb;
            v = v > 0.0f ? v : 0.0f;
            r[x + 1] = v < 6.0f ? v : 6.0f;
        }
    } else {
        memcpy(r + 1, sr, W * sizeof(float));
    }
}

static void stage_plane_s1(const float *restrict s, int64_t y0, int64_t H, int64_t W, int64_t iy_lo, int64_t rows,
                           float *restrict p, float pb, int pre) {
    const int64_t Wp = W + 2;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t iy = iy_lo + r;
        if (iy < 0 || iy >= H) {
            for (int64_t x = 0; x < Wp; ++x) p[r * Wp + x] = 0.0f;
        } else {
            stage_row_s1(s + (iy - y0) * W, p + r * Wp, W, pb, pre);
        }
    }
}

/* phase (a, b)[i][j] = padded[2i + a][2j + b], padded row pr = iy - iy_lo, padded column
 * px = x + 1: source column x goes to b = (x + 1) & 1, j = (x + 1) >> 1. */
static void stage_plane_s2(const float *restrict s, int64_t y0, int64_t H, int64_t W, int64_t iy_lo, int64_t rows,
                           int64_t Hq, int64_t Wq, float *restrict p, float pb, int pre) {
    const int64_t plane = Hq * Wq;
    for (int64_t k = 0; k < 4 * plane; ++k) p[k] = 0.0f; /* borders; interior overwritten below */
    for (int64_t pr = 0; pr < rows; ++pr) {
        const int64_t iy = iy_lo + pr;
        if (iy < 0 || iy >= H) continue;
        const int64_t a = pr & 1, i = pr >> 1;
        float *restrict e = p + (2 * a + 1) * plane + i * Wq; /* b = 1: s[2j] at j */
        float *restrict o = p + (2 * a) * plane + i * Wq + 1;  /* b = 0: s[2j + 1] at j + 1 */
        const float *restrict sr = s + (iy - y0) * W;
        const int64_t pairs = W / 2;
        if (pre) {
            for (int64_t j = 0; j < pairs; ++j) {
                float v0 = sr[2 * j] + pb, v1 = sr[2 * j + 1] + pb;
                v0 = v0 > 0.0f ? v0 : 0.0f;
                v1 = v1 > 0.0f ? v1 : 0.0f;
                e[j] = v0 < 6.0f ? v0 : 6.0f;
                o[j] = v1 < 6.0f ? v1 : 6.0f;
            }
            if (W & 1) e[pairs] = clampf(sr[W - 1] + pb, 2);
        } else {
            for (int64_t j = 0; j < pairs; ++j) {
                e[j] = sr[2 * j];
                o[j] = sr[2 * j + 1];
            }
            if (W & 1) e[pairs] = sr[W - 1];
        }
    }
}

/* t[i] = relu6(bias + sum_k w[k] * in_k[i]) for i < len, the nine taps given as base pointers. */
static void taps9(float *restrict t, const float *const in[9], const float *w, float bias, int64_t len) {
    const float *restrict i0 = in[0], *restrict i1 = in[1], *restrict i2 = in[2], *restrict i3 = in[3];
    const float *restrict i4 = in[4], *restrict i5 = in[5], *restrict i6 = in[6], *restrict i7 = in[7];
    const float *restrict i8 = in[8];
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
    for (int64_t i = 0; i < len; ++i) {
        float acc = bias + w0 * i0[i] + w1 * i1[i] + w2 * i2[i] + w3 * i3[i] + w4 * i4[i] + w5 * i5[i] +
                    w6 * i6[i] + w7 * i7[i] + w8 * i8[i];
        acc = acc > 0.0f ? acc : 0.0f;
        t[i] = acc < 6.0f ? acc : 6.0f;
    }
}

/* Stride 1, two output rows per pass: the four staged input rows they need are loaded once
 * (12 loads for 18 FMAs instead of 18). */
static void rows2_s1(float *restrict o0, float *restrict o1, const float *restrict r0, int64_t Ws, const float *w,
                     float bias, int64_t Wo) {
    const float *restrict r1 = r0 + Ws, *restrict r2 = r1 + Ws, *restrict r3 = r2 + Ws;
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
    for (int64_t x = 0; x < Wo; ++x) {
        const float a0 = r0[x], a1 = r0[x + 1], a2 = r0[x + 2];
        const float b0 = r1[x], b1 = r1[x + 1], b2 = r1[x + 2];
        const float c0 = r2[x], c1 = r2[x + 1], c2 = r2[x + 2];
        const float d0 = r3[x], d1 = r3[x + 1], d2 = r3[x + 2];
        float u = bias + w0 * a0 + w1 * a1 + w2 * a2 + w3 * b0 + w4 * b1 + w5 * b2 + w6 * c0 + w7 * c1 + w8 * c2;
        float v = bias + w0 * b0 + w1 * b1 + w2 * b2 + w3 * c0 + w4 * c1 + w5 * c2 + w6 * d0 + w7 * d1 + w8 * d2;
        u = u > 0.0f ? u : 0.0f;
        v = v > 0.0f ? v : 0.0f;
        o0[x] = u < 6.0f ? u : 6.0f;
        o1[x] = v < 6.0f ? v : 6.0f;
    }
}

/* Output rows oy0..oy1-1 of one channel plane. ``band`` holds input rows y0.. (as many as those
 * output rows need, see band_rows()); ``out`` points at output row oy0. */
static void dw_band(const float *band, int64_t y0, int64_t H, int64_t W, int64_t stride, int64_t oy0, int64_t oy1,
                    const float *w, float bias, float pb, int pre, float *out, float *scratch) {
    const int64_t Ho = oy1 - oy0, Wo = (W - 1) / stride + 1;
    const int64_t Ws = stride == 1 ? W + 2 : Wo + 1, Hq = Ho + 1;
    const int64_t staged = stride == 1 ? (Ho + 2) * Ws : 4 * Hq * Ws;
    float *stage = scratch;
    float *tmp = scratch + ((staged + 15) & ~(int64_t)15);
    const int64_t iy_lo = oy0 * stride - 1;
    const float *in[9];
    if (stride == 1) {
        stage_plane_s1(band, y0, H, W, iy_lo, Ho + 2, stage, pb, pre);
        for (int k = 0; k < 9; ++k) in[k] = stage + (k / 3) * Ws + (k % 3);
    } else {
        stage_plane_s2(band, y0, H, W, iy_lo, 2 * Ho + 1, Hq, Ws, stage, pb, pre);
        for (int k = 0; k < 9; ++k) {
            const int dy = k / 3, dx = k % 3;
            in[k] = stage + (2 * (dy & 1) + (dx & 1)) * Hq * Ws + (dy >> 1) * Ws + (dx >> 1);
        }
    }
    if (stride == 1 && Wo >= 16) { /* wide rows: straight into the output, two rows at a time */
        int64_t y = 0;
        for (; y + 1 < Ho; y += 2) rows2_s1(out + y * Wo, out + (y + 1) * Wo, stage + y * Ws, Ws, w, bias, Wo);
        if (y < Ho) {
            const float *last[9];
            for (int k = 0; k < 9; ++k) last[k] = in[k] + y * Ws;
            taps9(out + y * Wo, last, w, bias, Wo);
        }
    } else if (Wo >= 16) {
        for (int64_t y = 0; y < Ho; ++y) {
            const float *row[9];
            for (int k = 0; k < 9; ++k) row[k] = in[k] + y * Ws;
            taps9(out + y * Wo, row, w, bias, Wo);
        }
    } else {
        taps9(tmp, in, w, bias, (Ho - 1) * Ws + Wo);
        for (int64_t y = 0; y < Ho; ++y) memcpy(out + y * Wo, tmp + y * Ws, Wo * sizeof(float));
    }
}

/* Depthwise 3x3, pad 1, stride 1 or 2, bias + ReLU6 fused, over C channels x B planes. */
static void depthwise(const int64_t *op, const void *plan, const float *src, float *dst, float *scratch) {
    const int64_t C = op[F_C], H = op[F_H], W = op[F_W], stride = op[F_STRIDE], B = header(plan)[H_BATCH];
    const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const float *wts = cbuf(plan, op[F_WEIGHTS]);
    const float *bias = cbuf(plan, op[F_BIAS]);
    const float *pre = op[F_PRE_BIAS] >= 0 ? cbuf(plan, op[F_PRE_BIAS]) : 0;
    const int nchw = op[F_SRC_NCHW] != 0; /* src is the model input [B, C, H, W]: no layout pass needed */
    for (int64_t c = 0; c < C; ++c)
        for (int64_t bi = 0; bi < B; ++bi)
            dw_band(src + (nchw ? bi * C + c : c * B + bi) * H * W, 0, H, W, stride, 0, Ho, wts + 9 * c, bias[c],
                    pre ? pre[c] : 0.0f, pre != 0, dst + (c * B + bi) * Ho * Wo, scratch);
}

/* Expand (sparse 1x1) + bias + ReLU6 + depthwise, in bands of output rows: per image and band,
 * the input rows the band needs are copied to a small [K, rows * W] buffer, the kernel expands
 * them into [hidden, rows * W] (cache resident), and the depthwise consumes that at once, so
 * the expanded tensor never goes to memory. Halo rows (one above and below) are recomputed. */
static int32_t fused_expand_dw(const int64_t *op, const void *plan, ubp_kernel_fn fn, const float *src, float *dst,
                               void *ws, float *scratch) {
    const int64_t hidden = op[F_C], K = op[F_M], band = op[F_BAND], H = op[F_H], W = op[F_W];
    const int64_t stride = op[F_STRIDE], B = header(plan)[H_BATCH];
    const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const float *wts = cbuf(plan, op[F_WEIGHTS]);
    const float *bias = cbuf(plan, op[F_BIAS]);
    const float *pre = cbuf(plan, op[F_PRE_BIAS]);
    const void *packed = op[F_PACKED] >= 0 ? (const char *)plan + op[F_PACKED] : 0;
    float *xb = (float *)((char *)ws + op[F_XB]);
    float *eb = (float *)((char *)ws + op[F_EB]);
    for (int64_t bi = 0; bi < B; ++bi) {
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += band) {
            const int64_t oy1 = oy0 + band < Ho ? oy0 + band : Ho;
            int64_t y0 = oy0 * stride - 1, y1 = (oy1 - 1) * stride + 2;
            if (y0 < 0) y0 = 0;
            if (y1 > H) y1 = H;
            const int64_t n = (y1 - y0) * W;
            for (int64_t k = 0; k < K; ++k)
                memcpy(xb + k * n, src + (k * B + bi) * H * W + y0 * W, n * sizeof(float));
            const int32_t rc = fn(xb, eb, n, packed);
            if (rc != 0) return rc;
            for (int64_t c = 0; c < hidden; ++c)
                dw_band(eb + c * n, y0, H, W, stride, oy0, oy1, wts + 9 * c, bias[c], pre[c], 1,
                        dst + (c * B + bi) * Ho * Wo + oy0 * Wo, scratch);
        }
    }
    return 0;
}

/* y[r, :] = clamp(y[r, :] + bias[r] (+ res[r, :])) over M rows of n. */
static void epilogue(float *y, const float *bias, const float *res, int64_t M, int64_t n, int64_t clamp) {
    for (int64_t r = 0; r < M; ++r) {
        float *yr = y + r * n;
        const float b = bias[r];
        if (res) {
            const float *rr = res + r * n;
            for (int64_t j = 0; j < n; ++j) yr[j] = clampf(yr[j] + b + rr[j], clamp);
        } else if (clamp) {
            for (int64_t j = 0; j < n; ++j) yr[j] = clampf(yr[j] + b, clamp);
        } else {
            for (int64_t j = 0; j < n; ++j) yr[j] += b;
        }
    }
}

/* out[b, c] = mean over the plane of clamp(src[c, b, :] + bias[c]). */
static void pool(const int64_t *op, const void *plan, const float *src, float *out) {
    const int64_t C = op[F_C], HW = op[F_HW], B = header(plan)[H_BATCH], clamp = op[F_CLAMP];
    const float *bias = op[F_BIAS] >= 0 ? cbuf(plan, op[F_BIAS]) : 0;
    const float inv = 1.0f / (float)HW;
    for (int64_t c = 0; c < C; ++c) {
        const float b = bias ? bias[c] : 0.0f;
        for (int64_t bi = 0; bi < B; ++bi) {
            const float *s = src + (c * B + bi) * HW;
            float acc = 0.0f;
            for (int64_t j = 0; j < HW; ++j) acc += clampf(s[j] + b, clamp);
            out[bi * C + c] = acc * inv;
        }
    }
}

/* [B, C, HW] -> [C, B, HW] */
static void to_channel_major(const float *x, float *dst, int64_t B, int64_t C, int64_t HW) {
    for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < B; ++b) memcpy(dst + (c * B + b) * HW, x + (b * C + c) * HW, HW * sizeof(float));
}

static double now(void);

/* ---- general graph ops (kinds 6..13, planned by ubpdsl.deploy.graph) ----------------------------
 * Activations are channel-major [C, B, H, W]; a flattened value [F, B] is the same with H = W = 1
 * (the GEMM columns of a linear layer), so a linear layer is a 1x1 conv on it. */
enum { OP_CONV = 6, OP_MAXPOOL = 7, OP_AVGPOOL = 8, OP_GAP = 9, OP_FLATTEN = 10, OP_ADD = 11, OP_AFFINE = 12,
       OP_OUTPUT = 13 };
/* their record fields: G_C input channels, G_M output channels, G_H / G_W input plane, G_GEOM the
 * payload offset of int64 geom[8] (below), G_TMP a workspace offset for im2col columns (-1 none) */
enum { G_KIND, G_SRC, G_DST, G_C, G_M, G_GEOM, G_KERNEL, G_PACKED, G_BIAS, G_RES, G_H, G_W, G_UNUSED,
       G_WEIGHTS, G_TMP, G_CLAMP };
/* geom: kernel h, w; stride h, w; pad h, w; groups (avg pool: count_include_pad); source is NCHW */
enum { GM_KH, GM_KW, GM_SH, GM_SW, GM_PH, GM_PW, GM_GROUPS, GM_NCHW };

static inline int64_t g_out(int64_t in, int64_t k, int64_t s, int64_t p) { return (in + 2 * p - k) / s + 1; }

/* plane (c, b) of a [C, B, H, W] (or, nchw, [B, C, H, W]) tensor */
static inline const float *g_plane(const float *src, int64_t c, int64_t b, int64_t C, int64_t B, int64_t HW,
                                   int nchw) {
    return src + (nchw ? b * C + c : c * B + b) * HW;
}

/* cols[(ci * kh + ky) * kw + kx][b * Ho * Wo + oy * Wo + ox] = x[c0 + ci, b, oy * sh - ph + ky, ox * sw - pw + kx]
 * (zero outside the plane) for ci < cn: the GEMM operand of a kxk conv, columns = the whole batch. */
static void g_im2col(const float *src, float *cols, int64_t C, int64_t B, int64_t H, int64_t W, const int64_t *g,
                     int64_t c0, int64_t cn) {
    const int64_t kh = g[GM_KH], kw = g[GM_KW], sh = g[GM_SH], sw = g[GM_SW], ph = g[GM_PH], pw = g[GM_PW];
    const int64_t Ho = g_out(H, kh, sh, ph), Wo = g_out(W, kw, sw, pw), N = B * Ho * Wo, HW = H * W;
    if (sh == 1 && sw == 1 && Ho == H && Wo == W && HW <= 4096) {
        /* "same" stride-1 conv: each tap's row is the plane shifted by (dy, dx) = (ky - ph, kx - pw),
         * zero where the source pixel is outside it -- one flat select loop per plane, whatever W is */
        unsigned char valid[4096];
        for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t dy = ky - ph, dx = kx - pw, shift = dy * W + dx;
                for (int64_t p = 0; p < HW; ++p) {
                    const int64_t iy = p / W + dy, ix = p % W + dx;
                    valid[p] = iy >= 0 && iy < H && ix >= 0 && ix < W;
                }
                const int64_t lo = shift < 0 ? -shift : 0, hi = shift > 0 ? HW - shift : HW;
                for (int64_t ci = 0; ci < cn; ++ci) {
                    float *row = cols + ((ci * kh + ky) * kw + kx) * N;
                    for (int64_t b = 0; b < B; ++b) {
                        const float *restrict in = g_plane(src, c0 + ci, b, C, B, HW, (int)g[GM_NCHW]) + shift;
                        float *restrict o = row + b * HW;
                        for (int64_t p = 0; p < lo; ++p) o[p] = 0.0f;
                        for (int64_t p = lo; p < hi; ++p) o[p] = valid[p] ? in[p] : 0.0f;
                        for (int64_t p = hi; p < HW; ++p) o[p] = 0.0f;
                    }
                }
            }
        return;
    }
    for (int64_t ci = 0; ci < cn; ++ci)
        for (int64_t ky = 0; ky < kh; ++ky)
            for (int64_t kx = 0; kx < kw; ++kx) {
                float *row = cols + ((ci * kh + ky) * kw + kx) * N;
                /* ox with 0 <= ox * sw - pw + kx < W */
                int64_t lo = pw - kx > 0 ? (pw - kx + sw - 1) / sw : 0;
                int64_t hi = (W - 1 + pw - kx) >= 0 ? (W - 1 + pw - kx) / sw + 1 : 0;
                if (hi > Wo) hi = Wo;
                if (lo > hi) lo = hi;
                for (int64_t b = 0; b < B; ++b) {
                    const float *plane = g_plane(src, c0 + ci, b, C, B, H * W, (int)g[GM_NCHW]);
                    for (int64_t oy = 0; oy < Ho; ++oy) {
                        float *o = row + (b * Ho + oy) * Wo;
                        const int64_t iy = oy * sh - ph + ky;
                        if (iy < 0 || iy >= H) {
                            for (int64_t ox = 0; ox < Wo; ++ox) o[ox] = 0.0f;
                            continue;
                        }
                        const float *r = plane + iy * W + kx - pw;
                        for (int64_t ox = 0; ox < lo; ++ox) o[ox] = 0.0f;
                        if (sw == 1) {
                            for (int64_t ox = lo; ox < hi; ++ox) o[ox] = r[ox];
                        } else {
                            for (int64_t ox = lo; ox < hi; ++ox) o[ox] = r[ox * sw];
                        }
                        for (int64_t ox = hi; ox < Wo; ++ox) o[ox] = 0.0f;
                    }
                }
            }
}

/* y[M, n] = w[M, K] x[K, n], all row-major: four rows of y per pass over x (n >= 8), or dot
 * products along K (small n, e.g. a linear layer at batch 1). */
static void g_gemm(const float *restrict w, const float *restrict x, float *restrict y, int64_t M, int64_t K,
                   int64_t n) {
    if (n < 8) {
        for (int64_t m = 0; m < M; ++m)
            for (int64_t j = 0; j < n; ++j) {
                const float *restrict wr = w + m * K;
                float acc = 0.0f;
                for (int64_t k = 0; k < K; ++k) acc += wr[k] * x[k * n + j];
                y[m * n + j] = acc;
            }
        return;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
        float *restrict y0 = y + m * n, *restrict y1 = y0 + n, *restrict y2 = y1 + n, *restrict y3 = y2 + n;
        memset(y0, 0, 4 * n * sizeof(float));
        for (int64_t k = 0; k < K; ++k) {
            const float a0 = w[m * K + k], a1 = w[(m + 1) * K + k], a2 = w[(m + 2) * K + k], a3 = w[(m + 3) * K + k];
            const float *restrict xk = x + k * n;
            for (int64_t j = 0; j < n; ++j) {
                const float v = xk[j];
                y0[j] += a0 * v;
                y1[j] += a1 * v;
                y2[j] += a2 * v;
                y3[j] += a3 * v;
            }
        }
    }
    for (; m < M; ++m) {
        float *restrict yr = y + m * n;
        memset(yr, 0, n * sizeof(float));
        for (int64_t k = 0; k < K; ++k) {
            const float a = w[m * K + k];
            const float *restrict xk = x + k * n;
            for (int64_t j = 0; j < n; ++j) yr[j] += a * xk[j];
        }
    }
}

/* rows [M, n]: y = clamp(y + bias[r] (+ res)); branch-free inner loops so they vectorise */
static void g_bias_res_clamp(float *y, const float *bias, const float *res, int64_t M, int64_t n, int64_t clamp) {
    const float lo = clamp ? 0.0f : -__builtin_inff(), hi = clamp == 2 ? 6.0f : __builtin_inff();
    for (int64_t r = 0; r < M; ++r) {
        float *restrict yr = y + r * n;
        const float b = bias ? bias[r] : 0.0f;
        if (res) {
            const float *restrict rr = res + r * n;
            for (int64_t j = 0; j < n; ++j) {
                float v = yr[j] + b + rr[j];
                v = v > lo ? v : lo;
                yr[j] = v < hi ? v : hi;
            }
        } else if (bias || clamp) {
            for (int64_t j = 0; j < n; ++j) {
                float v = yr[j] + b;
                v = v > lo ? v : lo;
                yr[j] = v < hi ? v : hi;
            }
        }
    }
}

/* kxk conv (any stride / padding / groups) or linear: im2col into G_TMP unless the source is the
 * GEMM operand already (1x1, stride 1, no padding, channel-major), then the bound sparse kernel
 * (groups 1) or a dense GEMM on the folded weights, then bias (+ residual) + clamp. *kernel_s gets
 * the sparse kernel's time when profiling. */
static int32_t g_conv(const int64_t *op, const void *plan, const ubp_kernel_fn *table, const float *x, float *y,
                      void *ws, double *kernel_s) {
    const int64_t *g = (const int64_t *)((const char *)plan + op[G_GEOM]);
    const int64_t C = op[G_C], M = op[G_M], H = op[G_H], W = op[G_W], B = header(plan)[H_BATCH];
    const int64_t Ho = g_out(H, g[GM_KH], g[GM_SH], g[GM_PH]), Wo = g_out(W, g[GM_KW], g[GM_SW], g[GM_PW]);
    const int64_t N = B * Ho * Wo, groups = g[GM_GROUPS], Cg = C / groups, Mg = M / groups;
    const int64_t Kg = Cg * g[GM_KH] * g[GM_KW];
    const float *src = buf(op[G_SRC], x, y, ws);
    float *dst = buf(op[G_DST], x, y, ws);
    float *cols = op[G_TMP] >= 0 ? buf(op[G_TMP], x, y, ws) : 0;
    if (op[G_KERNEL] >= 0) {
        ubp_kernel_fn fn = table[op[G_KERNEL]];
        if (!fn) return E_UNBOUND;
        if (cols) g_im2col(src, cols, C, B, H, W, g, 0, C);
        const void *packed = op[G_PACKED] >= 0 ? (const char *)plan + op[G_PACKED] : 0;
        double t0 = kernel_s ? now() : 0.0;
        const int32_t rc = fn(cols ? cols : src, dst, N, packed);
        if (kernel_s) *kernel_s += now() - t0;
        if (rc != 0) return E_KERNEL_BASE + rc;
    } else {
        const float *w = cbuf(plan, op[G_WEIGHTS]);
        for (int64_t gi = 0; gi < groups; ++gi) {
            if (cols) g_im2col(src, cols, C, B, H, W, g, gi * Cg, Cg);
            g_gemm(w + gi * Mg * Kg, cols ? cols : src + gi * Cg * N, dst + gi * Mg * N, Mg, Kg, N);
        }
    }
    g_bias_res_clamp(dst, op[G_BIAS] >= 0 ? cbuf(plan, op[G_BIAS]) : 0,
                     op[G_RES] != -3 ? buf(op[G_RES], x, y, ws) : 0, M, N, op[G_CLAMP]);
    return 0;
}

/* max / average pool kxk over every plane: channel-major (or NCHW) in, channel-major out */
static void g_pool(const int64_t *op, const void *plan, const float *src, float *dst, int is_max) {
    const int64_t *g = (const int64_t *)((const char *)plan + op[G_GEOM]);
    const int64_t C = op[G_C], H = op[G_H], W = op[G_W], B = header(plan)[H_BATCH];
    const int64_t kh = g[GM_KH], kw = g[GM_KW], sh = g[GM_SH], sw = g[GM_SW], ph = g[GM_PH], pw = g[GM_PW];
    const int64_t Ho = g_out(H, kh, sh, ph), Wo = g_out(W, kw, sw, pw);
    const float lo = op[G_CLAMP] ? 0.0f : -__builtin_inff(), hi = op[G_CLAMP] == 2 ? 6.0f : __builtin_inff();
    for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < B; ++b) {
            const float *p = g_plane(src, c, b, C, B, H * W, (int)g[GM_NCHW]);
            float *o = dst + (c * B + b) * Ho * Wo;
            if (ph == 0 && pw == 0) { /* every window inside the plane: no bounds checks, rows vectorise */
                const float inv = 1.0f / (float)(kh * kw);
                for (int64_t oy = 0; oy < Ho; ++oy) {
                    float *restrict orow = o + oy * Wo;
                    for (int64_t dy = 0; dy < kh; ++dy) {
                        const float *restrict r = p + (oy * sh + dy) * W;
                        for (int64_t dx = 0; dx < kw; ++dx) {
                            if (dy == 0 && dx == 0) {
                                for (int64_t ox = 0; ox < Wo; ++ox) orow[ox] = r[ox * sw];
                            } else if (is_max) {
                                for (int64_t ox = 0; ox < Wo; ++ox) {
                                    const float v = r[ox * sw + dx];
                                    orow[ox] = v > orow[ox] ? v : orow[ox];
                                }
                            } else {
                                for (int64_t ox = 0; ox < Wo; ++ox) orow[ox] += r[ox * sw + dx];
                            }
                        }
                    }
                    for (int64_t ox = 0; ox < Wo; ++ox) {
                        float v = is_max ? orow[ox] : orow[ox] * inv;
                        v = v > lo ? v : lo;
                        orow[ox] = v < hi ? v : hi;
                    }
                }
                continue;
            }
            for (int64_t oy = 0; oy < Ho; ++oy)
                for (int64_t ox = 0; ox < Wo; ++ox) {
                    const int64_t y0 = oy * sh - ph, x0 = ox * sw - pw;
                    float acc = is_max ? -__builtin_inff() : 0.0f;
                    int64_t count = 0;
                    for (int64_t dy = 0; dy < kh; ++dy) {
                        const int64_t iy = y0 + dy;
                        if (iy < 0 || iy >= H) continue;
                        for (int64_t dx = 0; dx < kw; ++dx) {
                            const int64_t ix = x0 + dx;
                            if (ix < 0 || ix >= W) continue;
                            const float v = p[iy * W + ix];
                            acc = is_max ? (v > acc ? v : acc) : acc + v;
                            ++count;
                        }
                    }
                    if (!is_max) acc /= (float)(g[GM_GROUPS] ? kh * kw : (count ? count : 1));
                    o[oy * Wo + ox] = clampf(acc, op[G_CLAMP]);
                }
        }
}

/* global average pool: [C, B, H, W] -> [C, B] (the columns of a following linear layer) */
static void g_gap(const int64_t *op, const void *plan, const float *src, float *dst) {
    const int64_t C = op[G_C], HW = op[G_H] * op[G_W], B = header(plan)[H_BATCH];
    const float inv = 1.0f / (float)HW;
    for (int64_t p = 0; p < C * B; ++p) {
        const float *s = src + p * HW;
        float acc = 0.0f;
        for (int64_t j = 0; j < HW; ++j) acc += s[j];
        dst[p] = clampf(acc * inv, op[G_CLAMP]);
    }
}

/* [C, B, HW] -> [C * HW, B] (flatten: GEMM columns) or -> [B, C * HW] (the model output) */
static void g_layout(const int64_t *op, const void *plan, const float *src, float *dst, int to_output) {
    const int64_t C = op[G_C], HW = op[G_H] * op[G_W], B = header(plan)[H_BATCH];
    for (int64_t c = 0; c < C; ++c)
        for (int64_t b = 0; b < B; ++b) {
            const float *s = src + (c * B + b) * HW;
            if (to_output) {
                memcpy(dst + (b * C + c) * HW, s, HW * sizeof(float));
            } else {
                for (int64_t p = 0; p < HW; ++p) dst[(c * HW + p) * B + b] = s[p];
            }
        }
}

/* per channel: dst = clamp(src * scale[c] + shift[c] (+ res)); no scale: 1, no shift: 0 */
static void g_affine(const int64_t *op, const void *plan, const float *src, const float *res, float *dst) {
    const int64_t C = op[G_C], n = header(plan)[H_BATCH] * op[G_H] * op[G_W];
    const float *scale = op[G_WEIGHTS] >= 0 ? cbuf(plan, op[G_WEIGHTS]) : 0;
    const float *shift = op[G_BIAS] >= 0 ? cbuf(plan, op[G_BIAS]) : 0;
    for (int64_t c = 0; c < C; ++c) {
        const float a = scale ? scale[c] : 1.0f, s = shift ? shift[c] : 0.0f;
        const float *sr = src + c * n, *rr = res ? res + c * n : 0;
        float *o = dst + c * n;
        for (int64_t j = 0; j < n; ++j) o[j] = clampf(sr[j] * a + s + (rr ? rr[j] : 0.0f), op[G_CLAMP]);
    }
}

/* one general op; profile slots as ubp_model_run_profiled documents */
static int32_t g_run(const int64_t *op, const void *plan, const ubp_kernel_fn *table, const float *x, float *y,
                     void *ws, double *prof) {
    const float *src = buf(op[G_SRC], x, y, ws);
    float *dst = buf(op[G_DST], x, y, ws);
    const float *res = op[G_RES] != -3 ? buf(op[G_RES], x, y, ws) : 0;
    switch (op[G_KIND]) {
    case OP_CONV: return g_conv(op, plan, table, x, y, ws, prof ? prof + 1 : 0);
    case OP_MAXPOOL: g_pool(op, plan, src, dst, 1); return 0;
    case OP_AVGPOOL: g_pool(op, plan, src, dst, 0); return 0;
    case OP_GAP: g_gap(op, plan, src, dst); return 0;
    case OP_FLATTEN: g_layout(op, plan, src, dst, 0); return 0;
    case OP_OUTPUT: g_layout(op, plan, src, dst, 1); return 0;
    case OP_ADD: /* fallthrough: an affine op without scale or shift */
    case OP_AFFINE: g_affine(op, plan, src, res, dst); return 0;
    default: return E_OP;
    }
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* robust to other processes sharing the core */
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* seconds_per_kind (optional, 6 doubles, accumulated): input, sparse kernels, epilogues,
 * depthwise, pool, fused expand + depthwise. The general ops (kinds 6..13) count their sparse
 * kernel calls as sparse kernels and everything else (im2col, dense GEMMs, pools, layout, adds)
 * as epilogues. */
int32_t ubp_model_run_profiled(const void *plan, const float *x, float *y, void *workspace, double *prof) {
    if (!plan || !check_header(plan)) return E_HEADER;

    const int64_t *h = header(plan);
    const int64_t *ops = h + REC;
    const ubp_kernel_fn *table = (const ubp_kernel_fn *)((const char *)plan + h[H_KERNELS_OFF]);
    const int64_t B = h[H_BATCH];
    float *scratch = (float *)((char *)workspace + h[H_SCRATCH_OFF]);
    for (int64_t i = 0; i < h[H_NOPS]; ++i) {
        const int64_t *op = ops + REC * i;
        double t0 = prof ? now() : 0.0;
        int kind = 0;
        switch (op[F_KIND]) {
        case OP_INPUT:
            to_channel_major(x, buf(op[F_DST], x, y, workspace), B, op[F_C], op[F_HW]);
            kind = 0;
            break;
        case OP_PW: {
            ubp_kernel_fn fn = table[op[F_KERNEL]];
            if (!fn) return E_UNBOUND;
            const void *packed = op[F_PACKED] >= 0 ? (const char *)plan + op[F_PACKED] : 0;
            float *dst = buf(op[F_DST], x, y, workspace);
            int64_t n = B * op[F_HW];
            int32_t rc = fn(buf(op[F_SRC], x, y, workspace), dst, n, packed);
            if (rc != 0) return E_KERNEL_BASE + rc;
            if (prof) {
                double t1 = now();
                prof[1] += t1 - t0;
                t0 = t1;
            }
            if (op[F_BIAS] >= 0)
                epilogue(dst, cbuf(plan, op[F_BIAS]), op[F_RES] != -3 ? buf(op[F_RES], x, y, workspace) : 0,
                         op[F_M], n, op[F_CLAMP]);
            kind = 2;
            break;
        }
        case OP_EXPAND_DW: {
            ubp_kernel_fn fn = table[op[F_KERNEL]];
            if (!fn) return E_UNBOUND;
            int32_t rc = fused_expand_dw(op, plan, fn, buf(op[F_SRC], x, y, workspace),
                                         buf(op[F_DST], x, y, workspace), workspace, scratch);
            if (rc != 0) return E_KERNEL_BASE + rc;
            kind = 5;
            break;
        }
        case OP_DW:
            depthwise(op, plan, buf(op[F_SRC], x, y, workspace), buf(op[F_DST], x, y, workspace), scratch);
            kind = 3;
            break;
        case OP_POOL:
            pool(op, plan, buf(op[F_SRC], x, y, workspace), buf(op[F_DST], x, y, workspace));
            kind = 4;
            break;
        case OP_CONV: case OP_MAXPOOL: case OP_AVGPOOL: case OP_GAP: case OP_FLATTEN: case OP_ADD:
        case OP_AFFINE: case OP_OUTPUT: {
            /* general graph ops: the sparse kernel time goes to slot 1, the rest of a conv (im2col,
             * dense GEMM, epilogue) and every other kind to slot 2 */
            double k0 = prof ? prof[1] : 0.0;
            const int32_t rc = g_run(op, plan, table, x, y, workspace, prof);
            if (rc != 0) return rc;
            if (prof) t0 += prof[1] - k0;
            kind = 2;
            break;
        }
        default:
            return E_OP;
        }
        if (prof) prof[kind] += now() - t0;
    }
    return 0;
}

int32_t ubp_model_run(const void *plan, const float *x, float *y, void *workspace) {
    return ubp_model_run_profiled(plan, x, y, workspace, 0);
}
