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

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts); /* robust to other processes sharing the core */
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

/* seconds_per_kind (optional, 7 doubles, accumulated): input, sparse kernels, epilogues,
 * depthwise, pool, fused expand + depthwise: its depthwise, fused: its band copies + kernel. */
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
