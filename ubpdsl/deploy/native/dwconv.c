/* dwconv.c: depthwise 3x3 convolution, pad 1, stride 1 or 2, on channel-major planes, with an
 * optional producer epilogue applied while staging (pre-bias: relu6(x + pb)) and bias + clamp
 * (none, ReLU, ReLU6) fused into the store. Included by ubp_model.c (one translation unit, so the
 * model runtime still builds from one source for the host and for AArch64).
 *
 * Layout of the work: a plane is processed in chunks of whole output rows (about DW_CHUNK outputs,
 * so the staged input stays in L1). A chunk's input rows are staged with their zero padding rows,
 * flat: stride 1 as [1 + (rows + 2) * W + 1] floats (rows of W, no padding columns); stride 2 as
 * its four row/column phases (even/odd input row x even/odd input column), each flat with rows of
 * Wo, so every tap reads unit-stride. The 9-tap sum then runs as ONE loop over all the chunk's
 * outputs (rows * Wo, long even for 7x7 planes): every tap is a constant offset from the output
 * index; a tap that would cross into the neighbouring row (the left column, and for stride 1 the
 * right column) is multiplied by a 0/1 column mask built once per plane shape. Outputs are stored
 * in place (whole rows), so there is no compaction pass.
 * Stride 2 on even rows of at least DW_S2_DIRECT outputs skips the staging: it deinterleaves in
 * registers (dw_rows_s2_direct, clang vector extensions).
 *
 * Public symbols (for tests and benchmarks; the model runtime calls the static functions):
 *   int64_t ubp_dwconv3x3_scratch_floats(int64_t H, int64_t W, int64_t stride);
 *   int32_t ubp_dwconv3x3(const float *src, float *dst, int64_t C, int64_t B, int64_t H, int64_t W,
 *                         int64_t stride, const float *weights, const float *bias,
 *                         const float *pre_bias, int64_t clamp, int64_t src_nchw, float *scratch);
 *     src [C, B, H, W] (or [B, C, H, W] when src_nchw), dst [C, B, Ho, Wo], weights [C, 9],
 *     bias [C], pre_bias [C] or NULL, clamp 0 none / 1 ReLU / 2 ReLU6 (on the output).
 */
#include <stdint.h>
#include <string.h>

#define DW_SPLIT 8 /* stride 2: column pairs per block when splitting a row into its phases */
/* AVX-512: the stride-1 tap loop runs 16 lanes wide (clang otherwise prefers 8 on these cores;
 * measured faster for the 14x14..56x56 planes). Not for stride 2, whose staging was slower so. */
#ifndef DW_WIDE_LOOP
#if defined(__AVX512F__) && defined(__clang__)
#define DW_WIDE_LOOP _Pragma("clang loop vectorize_width(16)")
#define DW_WIDE __attribute__((min_vector_width(512)))
#else
#define DW_WIDE_LOOP
#define DW_WIDE
#endif
#endif
#ifndef DW_SKEW
#define DW_SKEW 16
#endif
#ifndef DW_CHUNK
#define DW_CHUNK 1024 /* output elements per chunk */
#endif

typedef struct {
    int64_t H, W, stride, Ho, Wo, rows; /* rows: output rows per chunk */
    float *ml, *mr;                     /* column masks over one chunk (rows * Wo): left tap valid, right tap valid */
    float *stage;
    int64_t q0, q1; /* stride 2: floats per even-row phase and per odd-row phase (aligned) */
} dw_shape;

static inline int64_t dw_al16(int64_t n) { return (n + 15) & ~(int64_t)15; }

static int64_t dw_chunk_rows(int64_t Ho, int64_t Wo) {
    int64_t r = DW_CHUNK / Wo;
    if (r < 1) r = 1;
    return r < Ho ? r : Ho;
}

/* Fills the shape, carves masks and staging out of scratch and builds the masks. */
static void dw_prepare(dw_shape *s, int64_t H, int64_t W, int64_t stride, float *scratch) {
    s->H = H, s->W = W, s->stride = stride;
    s->Ho = (H - 1) / stride + 1, s->Wo = (W - 1) / stride + 1;
    s->rows = dw_chunk_rows(s->Ho, s->Wo);
    const int64_t n = s->rows * s->Wo, Wo = s->Wo;
    s->ml = scratch;
    s->mr = scratch + dw_al16(n);
    s->stage = scratch + 2 * dw_al16(n);
    s->q0 = dw_al16(n + 1 + DW_SPLIT) + DW_SKEW;
    s->q1 = dw_al16(n + Wo + 1 + DW_SPLIT) + DW_SKEW;
    for (int64_t k = 0, x = 0; k < n; ++k, x = x + 1 == Wo ? 0 : x + 1) {
        s->ml[k] = x != 0 ? 1.0f : 0.0f;
        s->mr[k] = (stride == 1 && x == Wo - 1) ? 0.0f : 1.0f;
    }
}

int64_t ubp_dwconv3x3_scratch_floats(int64_t H, int64_t W, int64_t stride) {
    if (H < 1 || W < 1 || (stride != 1 && stride != 2)) return -1;
    const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1, rows = dw_chunk_rows(Ho, Wo);
    const int64_t n = rows * Wo;
    const int64_t staged = stride == 1 ? dw_al16((rows + 2) * W + 2) : 2 * dw_al16(n + 1 + DW_SPLIT) + 2 * dw_al16(n + Wo + 1 + DW_SPLIT) + 4 * DW_SKEW;
    return 2 * dw_al16(n) + staged;
}

static inline float dw_relu6(float v) {
    v = v > 0.0f ? v : 0.0f;
    return v < 6.0f ? v : 6.0f;
}

static inline float dw_clamp(float v, int clamp) {
    if (clamp == 0) return v;
    v = v > 0.0f ? v : 0.0f;
    return clamp == 2 ? (v < 6.0f ? v : 6.0f) : v;
}

/* d[0..n) = pre ? relu6(s + pb) : s */
static inline void dw_copy(float *restrict d, const float *restrict s, int64_t n, float pb, int pre) {
    if (pre) {
        for (int64_t i = 0; i < n; ++i) d[i] = dw_relu6(s[i] + pb);
    } else {
        memcpy(d, s, n * sizeof(float));
    }
}

/* Stride 1: stage input rows oy0 - 1 .. oy1 (band holds plane rows y0.. of W) into st[1..] and run
 * the flat 9-tap loop over outputs oy0..oy1-1 (a chunk of at most s->rows rows). */
static inline __attribute__((always_inline)) void dw_chunk_s1(const dw_shape *s, const float *band, int64_t y0,
                                                              int64_t yend, int64_t oy0, int64_t oy1, const float *w, float bias,
                                                              float pb, int pre, int clamp, float *restrict out) {
    const int64_t H = s->H, W = s->W, r = oy1 - oy0;
    float *restrict st = s->stage;
    int64_t lo = oy0 - 1, hi = oy1 + 1; /* staged input rows [lo, hi) */
    int64_t vlo = lo < 0 ? 0 : lo, vhi = hi > H ? H : hi;
    st[0] = 0.0f;
    st[1 + (r + 2) * W] = 0.0f;
    if (vlo > lo) memset(st + 1, 0, (vlo - lo) * W * sizeof(float));
    dw_copy(st + 1 + (vlo - lo) * W, band + (vlo - y0) * W, (vhi - vlo) * W, pb, pre);
    if (hi > vhi) memset(st + 1 + (vhi - lo) * W, 0, (hi - vhi) * W * sizeof(float));
    const float *restrict c = st + 1 + W; /* input (oy0, 0) */
    const float *restrict ml = s->ml, *restrict mr = s->mr;
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
    const int64_t n = r * W;
    DW_WIDE_LOOP
    for (int64_t k = 0; k < n; ++k) {
        const float left = w0 * c[k - W - 1] + w3 * c[k - 1] + w6 * c[k + W - 1];
        const float mid = w1 * c[k - W] + w4 * c[k] + w7 * c[k + W];
        const float right = w2 * c[k - W + 1] + w5 * c[k + 1] + w8 * c[k + W + 1];
        out[k] = dw_clamp(bias + mid + ml[k] * left + mr[k] * right, clamp);
    }
}

/* One input row into its two column phases: e[j] = x[2j], o[j] = x[2j + 1] (0 past the edge).
 * ``over``: the row may be processed in whole blocks of DW_SPLIT pairs, reading up to
 * 2 * DW_SPLIT - 1 floats past its end and writing as far past e and o's rows (the caller makes
 * that room; the next row overwrites it): short rows (7 to 28 pairs) then vectorise with no
 * scalar tail. */
static inline __attribute__((always_inline)) void dw_split(float *restrict e, float *restrict o,
                                                           const float *restrict x, int64_t W, int64_t Wo, float pb,
                                                           int pre, int over) {
    const int64_t pairs = W / 2;
    if (over) {
        for (int64_t j0 = 0; j0 < pairs; j0 += DW_SPLIT) {
            float *restrict eb = e + j0, *restrict ob = o + j0;
            const float *restrict xb = x + 2 * j0;
            for (int l = 0; l < DW_SPLIT; ++l) {
                eb[l] = pre ? dw_relu6(xb[2 * l] + pb) : xb[2 * l];
                ob[l] = pre ? dw_relu6(xb[2 * l + 1] + pb) : xb[2 * l + 1];
            }
        }
    } else {
        for (int64_t j = 0; j < pairs; ++j) {
            e[j] = pre ? dw_relu6(x[2 * j] + pb) : x[2 * j];
            o[j] = pre ? dw_relu6(x[2 * j + 1] + pb) : x[2 * j + 1];
        }
    }
    if (W & 1) {
        e[pairs] = pre ? dw_relu6(x[W - 1] + pb) : x[W - 1];
        o[Wo - 1] = 0.0f;
    }
}

/* Stride 2: phases a (even row, even col), b (even row, odd col) hold input rows 2 oy for
 * oy0 <= oy < oy1; c (odd, even), d (odd, odd) hold input rows 2 i + 1 for oy0 - 1 <= i < oy1.
 * Each phase has one zero float before its first row (the masked left tap of output 0). */
static inline __attribute__((always_inline)) void dw_chunk_s2(const dw_shape *s, const float *band, int64_t y0,
                                                              int64_t yend, int64_t oy0, int64_t oy1, const float *w, float bias,
                                                              float pb, int pre, int clamp, float *restrict out) {
    const int64_t H = s->H, W = s->W, Wo = s->Wo, r = oy1 - oy0;
    float *pa = s->stage + 1, *pb_ = pa + s->q0, *pc = pb_ + s->q0, *pd = pc + s->q1;
    pa[-1] = pb_[-1] = pc[-1] = pd[-1] = 0.0f;
    /* staged input rows lo..hi: t = iy - lo even -> c, d row t / 2; odd -> a, b row (t - 1) / 2 */
    const int64_t lo = 2 * oy0 - 1, hi = 2 * oy1 - 1;
    float *const ph[2][2] = {{pc, pd}, {pa, pb_}};
    if (lo < 0)
        for (int64_t j = 0; j < Wo; ++j) pc[j] = pd[j] = 0.0f;
    const int64_t vlo = lo < 0 ? 0 : lo, vhi = hi < H ? hi + 1 : H;
    /* rows whose block over-read stays inside the band (input rows < safe) */
    const int64_t slack = 2 * (((W / 2 + DW_SPLIT - 1) / DW_SPLIT) * DW_SPLIT) - 2 * (W / 2);
    const int64_t safe = yend - (slack + W - 1) / W;
    const int64_t fast = safe < vhi ? safe : vhi;
    int64_t iy = vlo;
    for (; iy < fast; ++iy) {
        const int64_t t = iy - lo, at = (t >> 1) * Wo;
        dw_split(ph[t & 1][0] + at, ph[t & 1][1] + at, band + (iy - y0) * W, W, Wo, pb, pre, 1);
    }
    for (; iy < vhi; ++iy) {
        const int64_t t = iy - lo, at = (t >> 1) * Wo;
        dw_split(ph[t & 1][0] + at, ph[t & 1][1] + at, band + (iy - y0) * W, W, Wo, pb, pre, 0);
    }
    if (hi >= H) /* after the rows: their block over-write may reach it */
        for (int64_t j = 0; j < Wo; ++j) pc[r * Wo + j] = pd[r * Wo + j] = 0.0f;
    const float *restrict a = pa, *restrict b = pb_, *restrict c = pc, *restrict d = pd;
    const float *restrict ml = s->ml;
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5], w6 = w[6], w7 = w[7], w8 = w[8];
    const int64_t n = r * Wo;
    for (int64_t k = 0; k < n; ++k) {
        const float left = w0 * d[k - 1] + w3 * b[k - 1] + w6 * d[k + Wo - 1];
        const float mid = w1 * c[k] + w4 * a[k] + w7 * c[k + Wo];
        const float right = w2 * d[k] + w5 * b[k] + w8 * d[k + Wo];
        out[k] = dw_clamp(bias + mid + right + ml[k] * left, clamp);
    }
}

#if defined(__clang__)
/* Stride 2 on even-width planes at least DW_S2_DIRECT outputs wide, without staging (clang vector extensions,
 * so x86 and AArch64 alike): per output row and block of DW_V output columns j0.., each of the
 * three input rows is loaded as 2 * DW_V consecutive floats x[2 j0 ..], the producer epilogue
 * applied in registers and split into even and odd columns by two shuffles (vpermt2ps; uzp1/uzp2
 * on NEON). The left tap x[2 j - 1] is the odd vector shifted by one lane, its first lane carried
 * from the previous block (0 at the left edge). A row's last block overlaps the one before it
 * (starts at Wo - DW_V), so no block reads past its row and there are no tails; its first left
 * lane is x[2 j0 - 1], activated alone. A padding row reads a real row with zero weights. */
#define DW_V 8
#ifndef DW_S2_DIRECT
#define DW_S2_DIRECT 32 /* measured: faster than staging from 56 output columns on, even below */
#endif
typedef float dw_vf __attribute__((vector_size(4 * DW_V)));

static inline dw_vf dw_vld(const float *p) {
    dw_vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) dw_vf dw_vact(dw_vf v, dw_vf pbv, dw_vf zero, dw_vf six, int pre) {
    return pre ? __builtin_elementwise_min(__builtin_elementwise_max(v + pbv, zero), six) : v;
}

/* acc + the taps of one input row x for output columns j0 .. j0 + DW_V - 1; *p: the odd columns of
 * the previous block (lane DW_V - 1 is x[2 j0 - 1]), replaced by this block's. */
static inline __attribute__((always_inline)) dw_vf dw_s2_row(dw_vf acc, const float *x, int64_t j0, const dw_vf *w,
                                                             dw_vf *p, dw_vf pbv, dw_vf zero, dw_vf six, int pre) {
    const dw_vf lo = dw_vact(dw_vld(x + 2 * j0), pbv, zero, six, pre);
    const dw_vf hi = dw_vact(dw_vld(x + 2 * j0 + DW_V), pbv, zero, six, pre);
    const dw_vf e = __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
    const dw_vf o = __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15);
    const dw_vf left = __builtin_shufflevector(*p, o, 7, 8, 9, 10, 11, 12, 13, 14);
    *p = o;
    return acc + w[0] * left + w[1] * e + w[2] * o;
}

static inline __attribute__((always_inline)) void dw_rows_s2_direct(const dw_shape *s, const float *band, int64_t y0,
                                                                    int64_t oy0, int64_t oy1, const float *w,
                                                                    float bias, float pb, int pre, int clamp,
                                                                    float *restrict out) {
    const int64_t H = s->H, W = s->W, Wo = s->Wo, last = Wo - DW_V;
    const dw_vf zero = {0}, six = zero + 6.0f, pbv = zero + pb, bv = zero + bias;
    dw_vf wv[9], wz[3] = {zero, zero, zero};
    for (int t = 0; t < 9; ++t) wv[t] = zero + w[t];
    for (int64_t oy = oy0; oy < oy1; ++oy, out += Wo) {
        const int64_t iy = 2 * oy, top = iy > 0 ? iy - 1 : iy, bot = iy + 1 < H ? iy + 1 : iy;
        const float *r0 = band + (top - y0) * W, *r1 = band + (iy - y0) * W, *r2 = band + (bot - y0) * W;
        const dw_vf *w0 = iy > 0 ? wv : wz, *w1 = wv + 3, *w2 = iy + 1 < H ? wv + 6 : wz;
        dw_vf p0 = zero, p1 = zero, p2 = zero;
        for (int64_t j0 = 0;; j0 += DW_V) {
            if (j0 > last) { /* the overlapping last block: carry x[2 j0 - 1] alone */
                if (j0 == last + DW_V) break;
                j0 = last;
                p0[DW_V - 1] = dw_vact(zero + r0[2 * j0 - 1], pbv, zero, six, pre)[0];
                p1[DW_V - 1] = dw_vact(zero + r1[2 * j0 - 1], pbv, zero, six, pre)[0];
                p2[DW_V - 1] = dw_vact(zero + r2[2 * j0 - 1], pbv, zero, six, pre)[0];
            }
            dw_vf acc = dw_s2_row(bv, r0, j0, w0, &p0, pbv, zero, six, pre);
            acc = dw_s2_row(acc, r1, j0, w1, &p1, pbv, zero, six, pre);
            acc = dw_s2_row(acc, r2, j0, w2, &p2, pbv, zero, six, pre);
            if (clamp) acc = __builtin_elementwise_max(acc, zero);
            if (clamp == 2) acc = __builtin_elementwise_min(acc, six);
            memcpy(out + j0, &acc, sizeof acc);
            if (j0 == last) break;
        }
    }
}

/* Stride 2 rows: the direct path where it applies, else the staged phases. */
static inline __attribute__((always_inline)) void dw_chunk_s2_any(const dw_shape *s, const float *band, int64_t y0,
                                                                  int64_t yend, int64_t oy0, int64_t oy1,
                                                                  const float *w, float bias, float pb, int pre,
                                                                  int clamp, float *restrict out) {
    if (!(s->W & 1) && s->Wo >= DW_S2_DIRECT && s->Wo >= DW_V)
        dw_rows_s2_direct(s, band, y0, oy0, oy1, w, bias, pb, pre, clamp, out);
    else
        dw_chunk_s2(s, band, y0, yend, oy0, oy1, w, bias, pb, pre, clamp, out);
}
#else
#define dw_chunk_s2_any dw_chunk_s2
#endif

/* Output rows oy0..oy1-1 of one plane, in chunks; ``band`` holds input rows y0..yend-1 of the
 * plane (at least those the outputs need), ``out`` points at output row oy0. Specialised for
 * stride, pre-bias and clamp. */
#define DW_ROWS(name, chunk, PRE, CLAMP, ATTR)                                                                     \
    static ATTR void name(const dw_shape *s, const float *band, int64_t y0, int64_t yend, int64_t oy0, int64_t oy1,     \
                     const float *w, float bias, float pb, float *out) {                                           \
        for (int64_t o = oy0; o < oy1; o += s->rows) {                                                             \
            const int64_t e = o + s->rows < oy1 ? o + s->rows : oy1;                                               \
            chunk(s, band, y0, yend, o, e, w, bias, pb, PRE, CLAMP, out + (o - oy0) * s->Wo);                      \
        }                                                                                                          \
    }
DW_ROWS(dw_rows_s1_pre, dw_chunk_s1, 1, 2, DW_WIDE)
DW_ROWS(dw_rows_s1_relu6, dw_chunk_s1, 0, 2, DW_WIDE)
DW_ROWS(dw_rows_s1_relu, dw_chunk_s1, 0, 1, DW_WIDE)
DW_ROWS(dw_rows_s1_none, dw_chunk_s1, 0, 0, DW_WIDE)
DW_ROWS(dw_rows_s2_pre, dw_chunk_s2_any, 1, 2, )
DW_ROWS(dw_rows_s2_relu6, dw_chunk_s2_any, 0, 2, )
DW_ROWS(dw_rows_s2_relu, dw_chunk_s2_any, 0, 1, )
DW_ROWS(dw_rows_s2_none, dw_chunk_s2_any, 0, 0, )
#undef DW_ROWS

typedef void (*dw_rows_fn)(const dw_shape *, const float *, int64_t, int64_t, int64_t, int64_t, const float *, float,
                           float, float *);

/* The specialised row function: pre-bias implies a ReLU6 output (the MobileNetV2 case); other
 * pre-bias + clamp pairs go through the generic path below. */
static dw_rows_fn dw_pick(int64_t stride, int pre, int64_t clamp) {
    if (pre) return clamp == 2 ? (stride == 1 ? dw_rows_s1_pre : dw_rows_s2_pre) : 0;
    if (clamp == 2) return stride == 1 ? dw_rows_s1_relu6 : dw_rows_s2_relu6;
    if (clamp == 1) return stride == 1 ? dw_rows_s1_relu : dw_rows_s2_relu;
    return stride == 1 ? dw_rows_s1_none : dw_rows_s2_none;
}

static void dw_rows_generic(const dw_shape *s, const float *band, int64_t y0, int64_t yend, int64_t oy0,
                            int64_t oy1, const float *w, float bias, float pb, int pre, int clamp, float *restrict out) {
    for (int64_t o = oy0; o < oy1; o += s->rows) {
        const int64_t e = o + s->rows < oy1 ? o + s->rows : oy1;
        if (s->stride == 1)
            dw_chunk_s1(s, band, y0, yend, o, e, w, bias, pb, pre, clamp, out + (o - oy0) * s->Wo);
        else
            dw_chunk_s2_any(s, band, y0, yend, o, e, w, bias, pb, pre, clamp, out + (o - oy0) * s->Wo);
    }
}

/* Output rows oy0..oy1-1 of one plane (see DW_ROWS); ``pb``: the pre-bias or NULL. */
static void dw_rows(const dw_shape *s, const float *band, int64_t y0, int64_t yend, int64_t oy0, int64_t oy1,
                    const float *w, float bias, const float *pb, int64_t clamp, float *out) {
    dw_rows_fn fn = dw_pick(s->stride, pb != 0, clamp);
    if (fn)
        fn(s, band, y0, yend, oy0, oy1, w, bias, pb ? *pb : 0.0f, out);
    else
        dw_rows_generic(s, band, y0, yend, oy0, oy1, w, bias, pb ? *pb : 0.0f, pb != 0, (int)clamp, out);
}

/* All C x B planes; see the header comment for the layouts. */
static void dw_planes(const float *src, float *dst, int64_t C, int64_t B, int64_t H, int64_t W, int64_t stride,
                      const float *wts, const float *bias, const float *pre, int64_t clamp, int nchw,
                      float *scratch) {
    dw_shape s;
    dw_prepare(&s, H, W, stride, scratch);
    for (int64_t c = 0; c < C; ++c)
        for (int64_t bi = 0; bi < B; ++bi)
            dw_rows(&s, src + (nchw ? bi * C + c : c * B + bi) * H * W, 0, H, 0, s.Ho, wts + 9 * c, bias[c],
                    pre ? pre + c : 0, clamp, dst + (c * B + bi) * s.Ho * s.Wo);
}

int32_t ubp_dwconv3x3(const float *src, float *dst, int64_t C, int64_t B, int64_t H, int64_t W, int64_t stride,
                      const float *weights, const float *bias, const float *pre_bias, int64_t clamp, int64_t src_nchw,
                      float *scratch) {
    if (!src || !dst || !weights || !bias || !scratch || C < 1 || B < 1 || H < 1 || W < 1 ||
        (stride != 1 && stride != 2) || clamp < 0 || clamp > 2)
        return 12;
    dw_planes(src, dst, C, B, H, W, stride, weights, bias, pre_bias, clamp, src_nchw != 0, scratch);
    return 0;
}
