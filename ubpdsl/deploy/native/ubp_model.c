/* ubp_model: run a planned channel-major subgraph (sparse 1x1 convs on ubpdsl kernels, depthwise
 * 3x3, epilogues, global average pool) with one call and no allocation.
 *
 * A plan is a little-endian blob made by ubpdsl.deploy.plan (the format is documented there):
 *   int64 header[16], int64 ops[n_ops][16], then float/byte payload (biases, depthwise weights,
 *   packed sparse weights), then n_kernels function-pointer slots filled by ubp_model_bind() and
 *   n_kernels more for the kernels' fused-epilogue entry points, filled by ubp_model_bind_ep().
 * Activations inside the subgraph are [C, B, H, W] (channel-major over the batch), so one sparse
 * kernel call covers the whole batch (n = B * H * W). The model input is [B, C, H, W] (NCHW),
 * the output [B, C_out] (pooled).
 *
 * Public symbols (new; the per-layer kernel ABI is unchanged):
 *   int64_t ubp_model_workspace_bytes(const void *plan);
 *   int32_t ubp_model_validate(const void *plan, int64_t nbytes);   every field of a plan of nbytes bytes
 *       in range (below); 0 or an error code. The other entry points run the same check against the
 *       size the header declares, so a forged plan gives an error code, never a wild read or write.
 *   int32_t ubp_model_bind(void *plan, int64_t slot, ubp_kernel_fn fn);
 *   int32_t ubp_model_bind_ep(void *plan, int64_t slot, ubp_kernel_ep_fn fn);   (optional: a sparse
 *       op with a bias then calls the kernel's <symbol>_ep, bias/residual/clamp fused into its stores)
 *   int32_t ubp_model_shape(const void *plan, int64_t shape[5]);   -> B, C_in, H_in, W_in, C_out
 *   int32_t ubp_model_run(const void *plan, const float *x, float *y, void *workspace);
 *   int32_t ubp_model_run_profiled(const void *plan, const float *x, float *y, void *workspace,
 *                                  double *seconds_per_kind);
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "ubp_epilogue.h" /* the ubp_epilogue struct, generated from ubpdsl/abi.py at build time */
#include "ubp_plan.h"     /* the plan format's numbers, generated from ubpdsl/deploy/plan.py */

typedef int32_t (*ubp_kernel_fn)(const float *x, float *y, int64_t n, const void *packed_w);
typedef int32_t (*ubp_kernel_ep_fn)(const float *x, float *y, int64_t n, const void *packed_w,
                                    const ubp_epilogue *ep);

/* ubp_plan.h: H_* header words, F_* op record fields (OP_EXPAND_DW reuses three: F_BAND output rows
 * per band, F_XB / F_EB the workspace offsets of its input and expanded band buffers; OP_DW's
 * F_SRC_NCHW != 0: its source is [B, C, H, W]), OP_* kinds, CLAMP_* codes (0 none, 1 ReLU, 2 ReLU6).
 * Buffer ids: -1 model input, -2 model output, >= 0 byte offset into the workspace. */

/* error codes */
#define E_HEADER 10
#define E_UNBOUND 11
#define E_OP 12
#define E_PLAN 13 /* an offset, size or shape of the plan is out of range */
#define E_KERNEL_BASE 100 /* + the kernel's own return code */

static inline float clampf(float v, int64_t mode) {
    if (mode == 0) return v;
    v = v > 0.0f ? v : 0.0f;
    if (mode == 2) v = v < 6.0f ? v : 6.0f;
    return v;
}

static const int64_t *header(const void *plan) { return (const int64_t *)plan; }

static int32_t plan_check(const void *plan, int64_t nbytes, int deep);

/* 0 if the plan passes plan_check() against the size its header declares (every field in O(n_ops);
 * the packed blobs' content is ubp_model_validate's, once at load time), else the error code */
static int32_t check_plan(const void *plan) {
    if (!plan) return E_HEADER;
    return plan_check(plan, header(plan)[H_TOTAL_BYTES], 0);
}

int64_t ubp_model_workspace_bytes(const void *plan) {
    if (check_plan(plan) != 0) return -1;
    return header(plan)[H_WS_BYTES];
}

int32_t ubp_model_shape(const void *plan, int64_t *shape) {
    const int32_t bad = check_plan(plan);
    if (bad) return bad;
    const int64_t *h = header(plan);
    shape[0] = h[H_BATCH], shape[1] = h[H_CIN], shape[2] = h[H_HIN], shape[3] = h[H_WIN], shape[4] = h[H_COUT];
    return 0;
}

int32_t ubp_model_bind(void *plan, int64_t slot, ubp_kernel_fn fn) {
    const int32_t bad = check_plan(plan);
    if (bad) return bad;
    const int64_t *h = header(plan);
    if (slot < 0 || slot >= h[H_NKERNELS]) return E_OP;
    ubp_kernel_fn *table = (ubp_kernel_fn *)((char *)plan + h[H_KERNELS_OFF]);
    table[slot] = fn;
    return 0;
}

int32_t ubp_model_bind_ep(void *plan, int64_t slot, ubp_kernel_ep_fn fn) {
    const int32_t bad = check_plan(plan);
    if (bad) return bad;
    const int64_t *h = header(plan);
    if (slot < 0 || slot >= h[H_NKERNELS]) return E_OP;
    ubp_kernel_ep_fn *table = (ubp_kernel_ep_fn *)((char *)plan + h[H_KERNELS_OFF]) + h[H_NKERNELS];
    table[slot] = fn;
    return 0;
}

static const float *cbuf(const void *plan, int64_t off) { return (const float *)((const char *)plan + off); }

static float *buf(int64_t id, const float *x, float *y, void *ws) {
    if (id == -1) return (float *)x;
    if (id == -2) return y;
    return (float *)((char *)ws + id);
}

/* Depthwise 3x3, pad 1, stride 1 or 2, bias + ReLU6 fused, over C channels x B planes: dwconv.c. */
#include "dwconv.c"

static void depthwise(const int64_t *op, const void *plan, const float *src, float *dst, float *scratch) {
    const float *pre = op[F_PRE_BIAS] >= 0 ? cbuf(plan, op[F_PRE_BIAS]) : 0;
    dw_planes(src, dst, op[F_C], header(plan)[H_BATCH], op[F_H], op[F_W], op[F_STRIDE], cbuf(plan, op[F_WEIGHTS]),
              cbuf(plan, op[F_BIAS]), pre, 2, op[F_SRC_NCHW] != 0, scratch);
}

/* Expand (sparse 1x1) + bias + ReLU6 + depthwise, in bands of output rows: per image and band,
 * the input rows the band needs are copied to a small [K, rows * W] buffer, the kernel expands
 * them into [hidden, rows * W] (cache resident), and the depthwise consumes that at once, so
 * the expanded tensor never goes to memory. Halo rows (one above and below) are recomputed. */
static double now(void);

static int32_t fused_expand_dw(const int64_t *op, const void *plan, ubp_kernel_fn fn, const float *src, float *dst,
                               void *ws, float *scratch, double *prof) {
    const int64_t hidden = op[F_C], K = op[F_M], band = op[F_BAND], H = op[F_H], W = op[F_W];
    const int64_t stride = op[F_STRIDE], B = header(plan)[H_BATCH];
    const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const float *wts = cbuf(plan, op[F_WEIGHTS]);
    const float *bias = cbuf(plan, op[F_BIAS]);
    const float *pre = cbuf(plan, op[F_PRE_BIAS]);
    const void *packed = op[F_PACKED] >= 0 ? (const char *)plan + op[F_PACKED] : 0;
    float *xb = (float *)((char *)ws + op[F_XB]);
    float *eb = (float *)((char *)ws + op[F_EB]);
    dw_shape shape;
    dw_prepare(&shape, H, W, stride, scratch);
    for (int64_t bi = 0; bi < B; ++bi) {
        for (int64_t oy0 = 0; oy0 < Ho; oy0 += band) {
            const int64_t oy1 = oy0 + band < Ho ? oy0 + band : Ho;
            int64_t y0 = oy0 * stride - 1, y1 = (oy1 - 1) * stride + 2;
            if (y0 < 0) y0 = 0;
            if (y1 > H) y1 = H;
            const int64_t n = (y1 - y0) * W;
            const double t0 = prof ? now() : 0.0;
            for (int64_t k = 0; k < K; ++k)
                memcpy(xb + k * n, src + (k * B + bi) * H * W + y0 * W, n * sizeof(float));
            const int32_t rc = fn(xb, eb, n, packed);
            if (rc != 0) return rc;
            if (prof) { /* the band copy + kernel part, moved from kind 5 to kind 6 */
                const double dt = now() - t0;
                prof[6] += dt;
                prof[5] -= dt;
            }
            for (int64_t c = 0; c < hidden; ++c)
                dw_rows(&shape, eb + c * n, y0, y1, oy0, oy1, wts + 9 * c, bias[c], pre + c, 2,
                        dst + (c * B + bi) * Ho * Wo + oy0 * Wo);
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
/* their record fields (G_* in ubp_plan.h): G_C input channels, G_M output channels, G_H / G_W input
 * plane, G_GEOM the payload offset of int64 geom[8] (GM_*: kernel h, w; stride h, w; pad h, w; groups
 * (avg pool: count_include_pad); source is NCHW), G_TMP a workspace offset for im2col columns (-1 none) */

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

/* ---- plan validation ------------------------------------------------------------------------------
 * plan_check() proves, in O(n_ops), that running the plan stays inside its buffers: every op kind is
 * known, every shape is positive and every product of shapes fits (no overflow), every workspace
 * buffer [offset, offset + size) lies in the workspace the header declares, model input / output
 * accesses fit their shapes (the input is never written), every payload item (biases, weights,
 * geometry, packed blobs -- their size from their own header) lies between the op records and the
 * kernel table, kernel slots are < n_kernels, clamp codes and flags are known, and the depthwise
 * scratch fits. Kernel shapes: a packed blob's M and K must be the op's (the kernel checks the blob
 * against itself); a mask-specialised kernel's shape is the binder's to check (ubpdsl.deploy.native). */
#define V_LIMIT ((int64_t)1 << 40) /* largest element count or byte size of anything in a plan */

typedef struct {
    const char *plan;
    int64_t nbytes, pay_lo, pay_hi, ws, in_f, out_f, nk, B, scratch_off;
    int deep; /* also the packed blobs' content (ubp_model_validate), not only their headers */
} vplan;

/* a * b, or -1 if either is negative or the product exceeds V_LIMIT */
static int64_t v_mul(int64_t a, int64_t b) {
    int64_t r;
    if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r) || r > V_LIMIT) return -1;
    return r;
}

static int64_t v_mul3(int64_t a, int64_t b, int64_t c) { return v_mul(v_mul(a, b), c); }

static int v_dim(int64_t v) { return v >= 1 && v <= V_LIMIT; }

/* buffer `id` holds nfloats floats (written when `write`) */
static int v_buf(const vplan *v, int64_t id, int64_t nfloats, int write) {
    if (nfloats < 0) return 0;
    if (id == UBP_BUF_INPUT) return !write && nfloats <= v->in_f;
    if (id == UBP_BUF_OUTPUT) return nfloats <= v->out_f;
    if (id < 0 || id % 4 != 0 || id > v->ws) return 0;
    return nfloats <= (v->ws - id) / 4;
}

/* a payload item of nbytes at off, aligned to `align` */
static int v_pay(const vplan *v, int64_t off, int64_t nbytes, int64_t align) {
    return nbytes >= 0 && off >= v->pay_lo && off % align == 0 && off <= v->pay_hi && nbytes <= v->pay_hi - off;
}

/* optional float vector: -1 (none) or n floats in the payload */
static int v_floats_opt(const vplan *v, int64_t off, int64_t n) { return off == -1 || v_pay(v, off, 4 * n, 4); }

static int64_t v_pk_pad(int64_t n) { return (n + UBP_PACK_ALIGN - 1) / UBP_PACK_ALIGN * UBP_PACK_ALIGN; }

/* a packed blob (ubpdsl.packing's data-driven format) at off, or -1: none, for a kernel of M rows and
 * K inputs. Its header must describe the one layout pack() writes, inside the payload; with `deep`
 * (ubp_model_validate), also its content in O(M + B): row_ptr from 0 to B, never decreasing, no
 * block starting past row M - N, block_rows agreeing, columns in [0, K) and sorted per row, the
 * padding repeating the last column -- everything a kernel indexes with. (Overlapping blocks of
 * one column are memory safe; ubpdsl.packing.unpack refuses them when a blob is read from a file.) */
static int v_packed(const vplan *v, int64_t off, int64_t M, int64_t K, int deep) {
    if (off == -1) return 1;
    if (!v_pay(v, off, 4 * UBP_PACK_HEADER_WORDS, UBP_PLAN_ALIGN)) return 0;
    const int32_t *p = (const int32_t *)(v->plan + off);
    const int64_t m = p[PK_M], k = p[PK_K], n = p[PK_N], nb = p[PK_B];
    if ((uint32_t)p[PK_MAGIC] != UBP_PACK_MAGIC || p[PK_VERSION] != UBP_PACK_VERSION || m != M || k != K ||
        m < 1 || m > UBP_PACK_MAX_DIM || k < 1 || k > UBP_PACK_MAX_DIM || n < 1 || n > UBP_PACK_MAX_BLOCK ||
        n > m || (p[PK_LAYOUT] != 0 && p[PK_LAYOUT] != 1) || nb < 0 || nb > k * (m / n))
        return 0;
    int64_t pos = v_pk_pad(4 * UBP_PACK_HEADER_WORDS);
    const int64_t o_rp = pos;
    pos += v_pk_pad(4 * (m + n + 1));
    const int64_t o_br = pos;
    pos += v_pk_pad(4 * nb);
    const int64_t o_bc = pos;
    pos += v_pk_pad(4 * (nb + UBP_PACK_COL_PAD));
    const int64_t o_v = pos;
    pos += v_pk_pad(4 * nb * n);
    if (p[PK_OFF_ROW_PTR] != o_rp || p[PK_OFF_BLOCK_ROWS] != o_br || p[PK_OFF_BLOCK_COLS] != o_bc ||
        p[PK_OFF_VALUES] != o_v || p[PK_TOTAL_BYTES] != pos || !v_pay(v, off, pos, UBP_PLAN_ALIGN))
        return 0;
    if (!deep) return 1;
    const int32_t *rp = (const int32_t *)(v->plan + off + o_rp), *br = (const int32_t *)(v->plan + off + o_br);
    const int32_t *bc = (const int32_t *)(v->plan + off + o_bc);
    if (rp[0] != 0 || rp[m + n] != nb || rp[m - n + 1] != nb) return 0;
    for (int64_t r = 0; r < m + n; ++r) {
        if (rp[r + 1] < rp[r]) return 0;
        for (int64_t i = rp[r]; i < rp[r + 1]; ++i)
            if (br[i] != r || bc[i] < 0 || bc[i] >= k || (i > rp[r] && bc[i] <= bc[i - 1])) return 0;
    }
    for (int64_t i = nb; i < nb + UBP_PACK_COL_PAD; ++i)
        if (bc[i] != (nb ? bc[nb - 1] : 0)) return 0;
    return 1;
}

static int v_slot(const vplan *v, int64_t slot) { return slot >= 0 && slot < v->nk; }

static int v_clamp(int64_t c) { return c == CLAMP_NONE || c == CLAMP_RELU || c == CLAMP_RELU6; }

static int v_res(const vplan *v, int64_t id, int64_t nfloats) {
    return id == UBP_NO_RES || v_buf(v, id, nfloats, 0);
}

/* the depthwise of an H x W plane at `stride` finds its scratch in the workspace */
static int v_scratch(const vplan *v, int64_t H, int64_t W, int64_t stride) {
    if (!v_dim(H) || !v_dim(W) || (stride != 1 && stride != 2)) return 0;
    const int64_t need = ubp_dwconv3x3_scratch_floats(H, W, stride);
    return need >= 0 && v->scratch_off >= 0 && v->scratch_off % 4 == 0 && v->scratch_off <= v->ws &&
           need <= (v->ws - v->scratch_off) / 4;
}

static int v_op_mobilenet(const vplan *v, const int64_t *op) {
    const int64_t B = v->B;
    switch (op[F_KIND]) {
    case OP_INPUT:
        return v_dim(op[F_C]) && v_dim(op[F_HW]) && v_buf(v, UBP_BUF_INPUT, v_mul3(B, op[F_C], op[F_HW]), 0) &&
               v_buf(v, op[F_DST], v_mul3(B, op[F_C], op[F_HW]), 1);
    case OP_PW: { /* y[M, n] = W[M, K] x[K, n], K = F_C, n = B * HW */
        const int64_t K = op[F_C], M = op[F_M], n = v_mul(B, op[F_HW]);
        return v_dim(K) && v_dim(M) && v_dim(op[F_HW]) && v_slot(v, op[F_KERNEL]) &&
               v_packed(v, op[F_PACKED], M, K, v->deep) && v_buf(v, op[F_SRC], v_mul(K, n), 0) &&
               v_buf(v, op[F_DST], v_mul(M, n), 1) && v_floats_opt(v, op[F_BIAS], M) &&
               v_res(v, op[F_RES], v_mul(M, n)) && v_clamp(op[F_CLAMP]);
    }
    case OP_DW: {
        const int64_t C = op[F_C], H = op[F_H], W = op[F_W], s = op[F_STRIDE];
        if (!v_dim(C) || !v_scratch(v, H, W, s)) return 0;
        const int64_t Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
        return v_buf(v, op[F_SRC], v_mul3(C, B, v_mul(H, W)), 0) && v_buf(v, op[F_DST], v_mul3(C, B, v_mul(Ho, Wo)), 1) &&
               v_pay(v, op[F_WEIGHTS], v_mul(36, C), 4) && v_pay(v, op[F_BIAS], v_mul(4, C), 4) &&
               v_floats_opt(v, op[F_PRE_BIAS], C) && (op[F_SRC_NCHW] == 0 || op[F_SRC_NCHW] == 1);
    }
    case OP_POOL:
        return v_dim(op[F_C]) && v_dim(op[F_HW]) && v_buf(v, op[F_SRC], v_mul3(op[F_C], B, op[F_HW]), 0) &&
               v_buf(v, op[F_DST], v_mul(B, op[F_C]), 1) && v_floats_opt(v, op[F_BIAS], op[F_C]) &&
               v_clamp(op[F_CLAMP]);
    case OP_EXPAND_DW: { /* hidden = F_C, K = F_M; bands of F_BAND output rows through F_XB / F_EB */
        const int64_t hidden = op[F_C], K = op[F_M], band = op[F_BAND], H = op[F_H], W = op[F_W], s = op[F_STRIDE];
        if (!v_dim(hidden) || !v_dim(K) || !v_scratch(v, H, W, s)) return 0;
        const int64_t Ho = (H - 1) / s + 1, Wo = (W - 1) / s + 1;
        if (band < 1 || band > Ho) return 0;
        int64_t rows = (band - 1) * s + 3;
        if (rows > H) rows = H;
        return v_slot(v, op[F_KERNEL]) && v_packed(v, op[F_PACKED], hidden, K, v->deep) &&
               v_buf(v, op[F_SRC], v_mul3(K, B, v_mul(H, W)), 0) &&
               v_buf(v, op[F_DST], v_mul3(hidden, B, v_mul(Ho, Wo)), 1) && v_buf(v, op[F_XB], v_mul3(K, rows, W), 1) &&
               v_buf(v, op[F_EB], v_mul3(hidden, rows, W), 1) && v_pay(v, op[F_WEIGHTS], v_mul(36, hidden), 4) &&
               v_pay(v, op[F_BIAS], v_mul(4, hidden), 4) && v_pay(v, op[F_PRE_BIAS], v_mul(4, hidden), 4);
    }
    default:
        return 0;
    }
}

static int v_op_general(const vplan *v, const int64_t *op) {
    const int64_t B = v->B, C = op[G_C], H = op[G_H], W = op[G_W], kind = op[G_KIND];
    if (!v_dim(C) || !v_dim(H) || !v_dim(W) || !v_clamp(op[G_CLAMP])) return 0;
    const int64_t plane = v_mul(H, W), n = v_mul(B, plane), in = v_mul(C, n);
    if (kind == OP_GAP)
        return v_buf(v, op[G_SRC], in, 0) && v_buf(v, op[G_DST], v_mul(C, B), 1);
    if (kind == OP_FLATTEN || kind == OP_OUTPUT)
        return v_buf(v, op[G_SRC], in, 0) && v_buf(v, op[G_DST], in, 1);
    if (kind == OP_ADD || kind == OP_AFFINE)
        return v_buf(v, op[G_SRC], in, 0) && v_buf(v, op[G_DST], in, 1) && v_res(v, op[G_RES], in) &&
               v_floats_opt(v, op[G_WEIGHTS], C) && v_floats_opt(v, op[G_BIAS], C);
    /* conv / linear and the kxk pools: their geometry */
    if (!v_pay(v, op[G_GEOM], 8 * 8, 8)) return 0;
    const int64_t *g = (const int64_t *)(v->plan + op[G_GEOM]);
    const int64_t kh = g[GM_KH], kw = g[GM_KW], sh = g[GM_SH], sw = g[GM_SW], ph = g[GM_PH], pw = g[GM_PW];
    if (kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || kh > 4096 || kw > 4096 || sh > 4096 ||
        sw > 4096 || ph > 4096 || pw > 4096 || H + 2 * ph < kh || W + 2 * pw < kw ||
        (g[GM_NCHW] != 0 && g[GM_NCHW] != 1))
        return 0;
    const int64_t Ho = g_out(H, kh, sh, ph), Wo = g_out(W, kw, sw, pw), N = v_mul3(B, Ho, Wo);
    if (kind == OP_MAXPOOL || kind == OP_AVGPOOL)
        return v_buf(v, op[G_SRC], in, 0) && v_buf(v, op[G_DST], v_mul(C, N), 1);
    if (kind != OP_CONV) return 0;
    const int64_t M = op[G_M], groups = g[GM_GROUPS];
    if (!v_dim(M) || groups < 1 || C % groups != 0 || M % groups != 0) return 0;
    const int64_t Kg = v_mul3(C / groups, kh, kw), taps = v_mul(kh, kw);
    /* no im2col buffer: the source is the GEMM operand itself (1x1, stride 1, no padding) */
    if (op[G_TMP] == -1 && (taps != 1 || sh != 1 || sw != 1 || ph != 0 || pw != 0 || g[GM_NCHW] != 0)) return 0;
    if (op[G_TMP] != -1 && (op[G_TMP] < 0 || !v_buf(v, op[G_TMP], v_mul(op[G_KERNEL] >= 0 ? v_mul(C, taps) : Kg, N), 1)))
        return 0;
    if (!v_buf(v, op[G_SRC], in, 0) || !v_buf(v, op[G_DST], v_mul(M, N), 1) || !v_floats_opt(v, op[G_BIAS], M) ||
        !v_res(v, op[G_RES], v_mul(M, N)))
        return 0;
    if (op[G_KERNEL] >= 0) /* the sparse kernel: groups 1, K = C * kh * kw */
        return groups == 1 && v_slot(v, op[G_KERNEL]) && v_packed(v, op[G_PACKED], M, v_mul(C, taps), v->deep);
    return op[G_KERNEL] == -1 && v_pay(v, op[G_WEIGHTS], v_mul3(4, M, Kg), 4);
}

static int32_t plan_check(const void *plan, int64_t nbytes, int deep) {
    if (!plan || nbytes < 8 * REC) return E_HEADER;
    const int64_t *h = header(plan);
    if (h[H_MAGIC] != UBP_MODEL_MAGIC || h[H_VERSION] != UBP_MODEL_VERSION || h[H_TOTAL_BYTES] != nbytes)
        return E_HEADER;
    const int64_t n_ops = h[H_NOPS], nk = h[H_NKERNELS], kt = h[H_KERNELS_OFF];
    if (n_ops < 0 || n_ops > (nbytes / (8 * REC)) - 1 || nk < 0 || nk > (1 << 20)) return E_PLAN;
    vplan v = {(const char *)plan, nbytes, 8 * REC * (1 + n_ops), kt, h[H_WS_BYTES], 0, 0, nk, h[H_BATCH],
               h[H_SCRATCH_OFF], deep};
    /* the kernel table: 2 * n_kernels pointers after the payload, inside the blob */
    if (kt < v.pay_lo || kt % 8 != 0 || kt > nbytes || 2 * 8 * nk > nbytes - kt) return E_PLAN;
    if (!v_dim(v.B) || v.ws < 0 || v.ws > V_LIMIT || !v_dim(h[H_CIN]) || !v_dim(h[H_HIN]) || !v_dim(h[H_WIN]) ||
        !v_dim(h[H_COUT]))
        return E_PLAN;
    v.in_f = v_mul(v_mul(v.B, h[H_CIN]), v_mul(h[H_HIN], h[H_WIN]));
    v.out_f = v_mul(v.B, h[H_COUT]);
    if (v.in_f < 0 || v.out_f < 0) return E_PLAN;
    const int64_t *ops = h + REC;
    for (int64_t i = 0; i < n_ops; ++i) {
        const int64_t *op = ops + REC * i;
        const int64_t kind = op[F_KIND];
        if (kind < OP_PW || kind > OP_OUTPUT) return E_OP;
        if (!(kind < OP_CONV ? v_op_mobilenet(&v, op) : v_op_general(&v, op))) return E_PLAN;
    }
    return 0;
}

int32_t ubp_model_validate(const void *plan, int64_t nbytes) { return plan_check(plan, nbytes, 1); }

/* 0 if every op that calls kernel `slot` has M output rows and K inputs (the kernel's shape), else
 * E_PLAN: the binder's check for kernels whose shape is not in a packed blob. */
int32_t ubp_model_check_slot(const void *plan, int64_t slot, int64_t M, int64_t K) {
    const int32_t bad = check_plan(plan);
    if (bad) return bad;
    const int64_t *h = header(plan);
    if (slot < 0 || slot >= h[H_NKERNELS]) return E_OP;
    for (int64_t i = 0; i < h[H_NOPS]; ++i) {
        const int64_t *op = h + REC * (1 + i);
        int64_t m = -1, k = -1;
        if (op[F_KIND] == OP_PW && op[F_KERNEL] == slot) m = op[F_M], k = op[F_C];
        else if (op[F_KIND] == OP_EXPAND_DW && op[F_KERNEL] == slot) m = op[F_C], k = op[F_M];
        else if (op[G_KIND] == OP_CONV && op[G_KERNEL] == slot) {
            const int64_t *g = (const int64_t *)((const char *)plan + op[G_GEOM]);
            m = op[G_M], k = op[G_C] * g[GM_KH] * g[GM_KW];
        } else continue;
        if (m != M || k != K) return E_PLAN;
    }
    return 0;
}

/* seconds_per_kind (optional, 7 doubles, accumulated): input, sparse kernels, epilogues,
 * depthwise, pool, fused expand + depthwise: its depthwise, fused: its band copies + kernel.
 * The general ops (kinds 6..13) count their sparse kernel calls as sparse kernels and everything
 * else (im2col, dense GEMMs, pools, layout, adds) as epilogues. */
int32_t ubp_model_run_profiled(const void *plan, const float *x, float *y, void *workspace, double *prof) {
    const int32_t bad = check_plan(plan);
    if (bad) return bad;

    const int64_t *h = header(plan);
    const int64_t *ops = h + REC;
    const ubp_kernel_fn *table = (const ubp_kernel_fn *)((const char *)plan + h[H_KERNELS_OFF]);
    const ubp_kernel_ep_fn *ep_table = (const ubp_kernel_ep_fn *)(table + h[H_NKERNELS]);
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
            ubp_kernel_ep_fn efn = ep_table[op[F_KERNEL]];
            if (efn && op[F_BIAS] >= 0) { /* bias (+ residual, clamp) fused into the kernel's stores */
                const int64_t clamp = op[F_CLAMP];
                ubp_epilogue ep = {UBP_EPILOGUE_VERSION, clamp ? UBP_EP_CLAMP : 0u, cbuf(plan, op[F_BIAS]),
                                   op[F_RES] != -3 ? buf(op[F_RES], x, y, workspace) : 0, 0.0f,
                                   clamp == 2 ? 6.0f : INFINITY};
                int32_t rc = efn(buf(op[F_SRC], x, y, workspace), dst, n, packed, &ep);
                if (rc != 0) return E_KERNEL_BASE + rc;
                kind = 1;
                break;
            }
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
                                         buf(op[F_DST], x, y, workspace), workspace, scratch, prof);
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
