/*
 * BED (Block Expansion and Division, Lee & Shin 2024) as a host shared library.
 *
 * This is the native engine behind ubpdsl.prune.selectors.bed_select / bed_select_multi; the numpy
 * engine in selectors.py is the reference it agrees with bit for bit.  Python validates every input
 * (shapes, finiteness, budget) before calling; this file trusts its arguments.
 *
 * What is computed
 * ----------------
 * The textbook loop takes, m times, the best window (N consecutive active rows of a column) over all
 * columns and removes its rows.  As selectors.py explains, columns do not interact and a column's
 * pick values never increase, so the loop keeps a prefix of each column's own greedy pick sequence,
 * and the prefixes are the m largest picks overall, ties going to the lower column (layers in input
 * order) and then to the earlier pick.  Like the numpy engine, a pick's value is the running minimum
 * of the column's window scores, which keeps the sequences non-increasing under float rounding too.
 *
 * How
 * ---
 * Columns are processed one at a time, so a column's data stays in cache while its greedy runs:
 *
 *   1. set-up + round 1: per tile of 16 columns, transpose the scores, link the rows, score the
 *      windows, then run each column's greedy for k0 = ceil(m / columns) picks;
 *   2. tau = the m-th largest pick so far, a lower bound of the final m-th largest (those picks are
 *      a subset of all picks); round 2 continues every column while its next pick is >= tau, which
 *      computes every pick that can be among the m largest;
 *   3. T = the exact m-th largest pick (radix select over the picks' order-preserving integer keys);
 *      each column keeps its picks > T, then picks == T are kept in (column, pick) order until m;
 *   4. division: a row is selected iff it was taken by one of its column's kept picks; every maximal
 *      run of selected rows (a multiple of N long) is cut into N-row blocks from its top.
 *
 * A column is a doubly linked list of its active rows (score and links share one 16-byte record).
 * win[r] is the score of the window of N active rows starting at row r, summed left to right in row
 * order (numpy's order, so the sums are bit-identical), or -inf when fewer than N active rows start
 * at r.  The window slots are cut into chunks of G (about sqrt(R)); each chunk keeps its maximum and
 * the first row holding it, so the column's best window (ties: the lower row) is a scan of the chunk
 * maxima.  A pick removes the window's rows from the list (the neighbours close up), rescores the up
 * to N-1 windows that started before it and overlapped it (each now spans the gap), drops the
 * windows of the removed rows and refreshes the chunks it touched: O(N^2 + G + R/G) per pick.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    BED_OK = 0,
    BED_NO_MEMORY = 1,
    BED_EXHAUSTED = 2, /* fewer picks than m (cannot happen for a feasible m) */
    BED_BAD_RUN = 3,   /* a selected run is not a multiple of N (an internal error) */
    BED_OVERFLOW = 4,  /* |score| too large: a window sum could overflow; use the numpy engine */
    BED_BAD_ARGS = 5,
};

/* Window sums stay finite (and so compare exactly like numpy's) while N * max|score| does. */
#define BED_MAX_ABS_SUM 1e300
/* `pv` of a row taken by pick k of its column: PICKED - k */
#define PICKED (-2)
/* columns set up together (whole cache lines of each row of the row-major scores) */
#define TILE 16

typedef struct {
    double v;   /* score */
    int32_t nx; /* next active row, R at the end */
    int32_t pv; /* previous active row, -1 at the head; PICKED - k once taken by pick k */
} Row;

typedef struct {
    int64_t R, C;
    int64_t L;      /* window starts 0..L-1 can ever hold a window: L = R - N + 1 (may be <= 0) */
    int64_t G;      /* chunk length (a power of two >= 8, about sqrt(L)) */
    int64_t K;      /* chunks per column */
    int64_t W;      /* window slots per column: K * G >= L */
    int64_t P;      /* most picks a column can make: R / N */
    Row *row;       /* [C][R] column-major */
    double *win;    /* [C][W] window score by start row; -inf = no window */
    double *cmax;   /* [C][K] maximum of each chunk */
    int32_t *carg;  /* [C][K] first row of the chunk holding its maximum */
    uint64_t *pick; /* [C][P] key (see key_of) of each pick's value, in pick order */
    int32_t *npick; /* [C] picks made */
    uint8_t *done;  /* [C] 1 once the column has no window left */
    int32_t *keep;  /* [C] picks kept in the selection */
} Layer;

/*
 * Memory.  One call needs about 25 bytes per weight.  Fresh pages cost a page fault each (a large
 * share of a call's time), so all arrays of a call are carved from one workspace block, and the
 * block of the last call (up to WORKSPACE_KEEP bytes) is kept for the next one.  The cached block is
 * taken and returned with atomic exchanges, so concurrent calls are safe (a loser allocates afresh).
 */
#define WORKSPACE_KEEP ((size_t)256 << 20)

typedef struct {
    size_t cap; /* usable bytes after this header */
    size_t pad[7];
} Block;

static Block *cached_block;

static Block *block_get(size_t bytes) {
    Block *b = __atomic_exchange_n(&cached_block, (Block *)NULL, __ATOMIC_ACQ_REL);
    if (b && b->cap >= bytes) return b;
    free(b);
    b = malloc(sizeof(Block) + bytes);
    if (b) b->cap = bytes;
    return b;
}

static void block_put(Block *b) {
    if (b && b->cap > WORKSPACE_KEEP) {
        free(b);
        return;
    }
    free(__atomic_exchange_n(&cached_block, b, __ATOMIC_ACQ_REL));
}

/* Release the cached workspace (exported; the next call allocates again). */
void bed_release(void) {
    free(__atomic_exchange_n(&cached_block, (Block *)NULL, __ATOMIC_ACQ_REL));
}

/* Bump allocator over a workspace block.  With base == NULL it only measures. */
typedef struct {
    char *base;
    size_t used;
} Arena;

static void *take(Arena *a, int64_t n, size_t size) {
    const size_t bytes = (size * (size_t)(n > 0 ? n : 1) + 63) & ~(size_t)63;
    void *p = a->base ? a->base + a->used : NULL;
    a->used += bytes;
    return p;
}

/* Order-preserving integer key of a double (no NaN): x < y iff key(x) < key(y); -0.0 == +0.0. */
static inline uint64_t key_of(double x) {
    const double y = x + 0.0; /* -0.0 -> +0.0 */
    uint64_t u;
    memcpy(&u, &y, sizeof u);
    return (u >> 63) ? ~u : u | ((uint64_t)1 << 63);
}

/* Index of the first maximum of x[0..n-1] (n >= 1), branch-free but for the final search. */
static inline int64_t first_max(const double *x, int64_t n) {
    double m0 = x[0], m1 = x[0], m2 = x[0], m3 = x[0]; /* 4 independent chains */
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        m0 = x[j] > m0 ? x[j] : m0;
        m1 = x[j + 1] > m1 ? x[j + 1] : m1;
        m2 = x[j + 2] > m2 ? x[j + 2] : m2;
        m3 = x[j + 3] > m3 ? x[j + 3] : m3;
    }
    for (; j < n; j++) m0 = x[j] > m0 ? x[j] : m0;
    m0 = m1 > m0 ? m1 : m0;
    m2 = m3 > m2 ? m3 : m2;
    const double m = m2 > m0 ? m2 : m0;
    int64_t a = 0;
    while (x[a] != m) a++;
    return a;
}

/* Maximum of chunk k (and its first row) into cm[k], ca[k]. */
static inline void chunk_update(const double *w, double *cm, int32_t *ca, int64_t k, int64_t G) {
    const int64_t a = k * G + first_max(w + k * G, G);
    cm[k] = w[a];
    ca[k] = (int32_t)a;
}

/* Shape a layer and carve its arrays from the arena. */
static void layer_layout(Layer *ly, Arena *a, int64_t R, int64_t C, int64_t N) {
    const int64_t L = R - N + 1;
    int64_t G = 8;
    while (G < 4096 && G * G < L) G <<= 1;
    const int64_t K = L > 0 ? (L + G - 1) / G : 1;
    ly->R = R;
    ly->C = C;
    ly->L = L;
    ly->G = G;
    ly->K = K;
    ly->W = K * G;
    ly->P = R / N;
    ly->row = take(a, R * C, sizeof(Row));
    ly->win = take(a, ly->W * C, sizeof(double));
    ly->cmax = take(a, K * C, sizeof(double));
    ly->carg = take(a, K * C, sizeof(int32_t));
    ly->pick = take(a, ly->P * C, sizeof(uint64_t));
    ly->npick = take(a, C, sizeof(int32_t));
    ly->done = take(a, C, sizeof(uint8_t));
    ly->keep = take(a, C, sizeof(int32_t));
}

/* Set up columns c0..c1-1: transpose, link, score the windows, chunk maxima.  Returns BED_OVERFLOW
 * when a window sum could overflow. */
static int columns_init(Layer *ly, const double *scores, int64_t N, int64_t c0, int64_t c1) {
    const int64_t R = ly->R, C = ly->C, L = ly->L, G = ly->G, K = ly->K, W = ly->W;
    double maxabs = 0.0;
    for (int64_t r = 0; r < R; r++) {
        const double *src = scores + r * C;
        __builtin_prefetch(src + 8 * C + c0); /* rows are C * 8 bytes apart: beyond the prefetchers */
        for (int64_t c = c0; c < c1; c++) {
            const double x = src[c];
            ly->row[c * R + r] = (Row){x, (int32_t)(r + 1), (int32_t)(r - 1)};
            const double a = fabs(x);
            maxabs = a > maxabs ? a : maxabs;
        }
    }
    if (!(maxabs * (double)N < BED_MAX_ABS_SUM)) return BED_OVERFLOW;
    for (int64_t c = c0; c < c1; c++) {
        const Row *col = ly->row + c * R;
        double *w = ly->win + c * W;
        for (int64_t r = 0; r < W; r++) {
            if (r < L) { /* summed left to right, like numpy */
                double s = col[r].v;
                for (int64_t n = 1; n < N; n++) s += col[r + n].v;
                w[r] = s;
            } else {
                w[r] = -INFINITY;
            }
        }
        for (int64_t k = 0; k < K; k++) chunk_update(w, ly->cmax + c * K, ly->carg + c * K, k, G);
        ly->npick[c] = 0;
        ly->done[c] = L <= 0;
        ly->keep[c] = 0;
    }
    return BED_OK;
}

/* Remove window b0 (pick number k) from column c: unlink its rows, rescore and drop windows. */
static void take_window(Layer *ly, int64_t c, int64_t N, int32_t b0, int32_t k, int32_t *seq) {
    const int64_t R = ly->R, L = ly->L, G = ly->G, K = ly->K;
    Row *col = ly->row + c * R;
    double *w = ly->win + c * ly->W, *cm = ly->cmax + c * K;
    int32_t *ca = ly->carg + c * K;

    /* the window's rows b_0..b_{N-1} and its neighbours */
    int32_t bl = b0;
    for (int64_t n = 1; n < N; n++) bl = col[bl].nx;
    const int32_t before = col[b0].pv, after = col[bl].nx;
    /* seq = up to N-1 active rows before the window, then up to N-1 after it, in row order */
    int np = 0, ns = 0;
    for (int32_t r = before; r >= 0 && np < N - 1; r = col[r].pv) seq[N - 2 - np++] = r;
    int32_t *pre = seq + (N - 1 - np);
    for (int32_t r = after; r < R && ns < N - 1; r = col[r].nx) pre[np + ns++] = r;
    /* splice the window out of the list */
    if (before >= 0) col[before].nx = after;
    if (after < R) col[after].pv = before;

    /* rescore the predecessors' windows (j rows before the gap and N - j after it), then drop the
     * window's own (rows >= L never start one).  Rows are visited in ascending order, so each
     * touched chunk is refreshed once, when the visit moves past it. */
    int64_t chunk = -1;
    for (int j = 0; j < np; j++) {
        double s = -INFINITY;
        if (j + N <= np + ns) {
            s = col[pre[j]].v;
            for (int64_t n = 1; n < N; n++) s += col[pre[j + n]].v;
        }
        w[pre[j]] = s;
        if (pre[j] / G != chunk) {
            if (chunk >= 0) chunk_update(w, cm, ca, chunk, G);
            chunk = pre[j] / G;
        }
    }
    int32_t r = b0;
    for (int64_t n = 0; n < N; n++) {
        const int32_t nxt = col[r].nx;
        col[r].pv = PICKED - k;
        if (r < L) {
            w[r] = -INFINITY;
            if (r / G != chunk) {
                if (chunk >= 0) chunk_update(w, cm, ca, chunk, G);
                chunk = r / G;
            }
        }
        r = nxt;
    }
    chunk_update(w, cm, ca, chunk, G); /* chunk >= 0 since b0 < L */
}

/* Run column c's greedy while it has fewer than kmax picks and its next pick's key is >= tau. */
static void column_run(Layer *ly, int64_t c, int64_t N, int64_t kmax, uint64_t tau, int32_t *seq) {
    const int64_t K = ly->K;
    const double *w = ly->win + c * ly->W, *cm = ly->cmax + c * K;
    const int32_t *ca = ly->carg + c * K;
    uint64_t *pick = ly->pick + c * ly->P;
    int32_t k = ly->npick[c];
    while (k < kmax && !ly->done[c]) {
        const int32_t b0 = ca[first_max(cm, K)]; /* first chunk holding the maximum, its first row */
        if (w[b0] == -INFINITY) {
            ly->done[c] = 1;
            break;
        }
        uint64_t key = key_of(w[b0]);
        if (k > 0 && pick[k - 1] < key) key = pick[k - 1]; /* running minimum */
        if (key < tau) break;
        pick[k] = key;
        take_window(ly, c, N, b0, k, seq);
        k++;
    }
    ly->npick[c] = k;
}

/* Key of the k-th largest (k >= 1) of all picks made: 8 rounds of byte histograms (radix select). */
static uint64_t kth_largest(const Layer *ly, int64_t nlayers, int64_t k) {
    uint64_t prefix = 0, mask = 0;
    for (int shift = 56; shift >= 0; shift -= 8) {
        int64_t hist[256] = {0};
        for (int64_t l = 0; l < nlayers; l++) {
            for (int64_t c = 0; c < ly[l].C; c++) {
                const uint64_t *pick = ly[l].pick + c * ly[l].P;
                for (int32_t i = 0; i < ly[l].npick[c]; i++)
                    if ((pick[i] & mask) == prefix) hist[(pick[i] >> shift) & 255]++;
            }
        }
        int b = 255;
        while (b > 0 && hist[b] < k) k -= hist[b--];
        prefix |= (uint64_t)b << shift;
        mask |= (uint64_t)255 << shift;
    }
    return prefix;
}

/* Cut every run of selected rows of layer `ly` into N-row blocks; write them sorted by (row, column)
 * to out_rows / out_cols (room for `room` blocks).  trow / tcol (room entries) and first (R + 1) are
 * scratch.  Returns the number of blocks, or -1 if a run is not a multiple of N or there is no room. */
static int64_t divide_runs(const Layer *ly, int64_t N, int32_t *out_rows, int32_t *out_cols, int64_t room,
                           int32_t *trow, int32_t *tcol, int64_t *first) {
    const int64_t R = ly->R, C = ly->C;
    int64_t nb = 0;
    memset(first, 0, sizeof(int64_t) * (size_t)(R + 1)); /* first[r + 1]: blocks at row r */
    for (int64_t c = 0; c < C; c++) {
        const Row *col = ly->row + c * R;
        /* selected iff taken by pick k = PICKED - pv with 0 <= k < keep (active rows: k < 0) */
        const uint32_t keep = (uint32_t)ly->keep[c];
#define SELECTED(r) ((uint32_t)(PICKED - col[r].pv) < keep)
        for (int64_t r = 0; r < R;) {
            if (!SELECTED(r)) {
                r++;
                continue;
            }
            int64_t e = r;
            while (e < R && SELECTED(e)) e++;
#undef SELECTED
            if ((e - r) % N || nb + (e - r) / N > room) return -1;
            for (; r < e; r += N) {
                trow[nb] = (int32_t)r;
                tcol[nb] = (int32_t)c;
                first[r + 1]++;
                nb++;
            }
        }
    }
    /* stable counting sort by row (columns were visited in order) */
    for (int64_t r = 0; r < R; r++) first[r + 1] += first[r];
    for (int64_t k = 0; k < nb; k++) {
        const int64_t slot = first[trow[k]]++;
        out_rows[slot] = trow[k];
        out_cols[slot] = tcol[k];
    }
    return nb;
}

/*
 * bed_select: BED over `nlayers` layers sharing one budget of m blocks.
 *
 * scores[l] points to layer l's row-major float64 [R[l], C[l]] matrix.  out_rows / out_cols (length
 * m) receive the blocks' start rows and columns, layer after layer, each layer sorted by (row,
 * column); out_counts[l] receives layer l's number of blocks.  Returns a BED_* code.
 */
int bed_select(int64_t nlayers, const int64_t *R, const int64_t *C, const double *const *scores, int64_t N,
               int64_t m, int32_t *out_rows, int32_t *out_cols, int64_t *out_counts) {
    if (nlayers < 1 || N < 1 || m < 0) return BED_BAD_ARGS;
    int64_t ncols = 0, maxR = 0;
    for (int64_t l = 0; l < nlayers; l++) {
        if (R[l] < 0 || C[l] < 0 || R[l] >= INT32_MAX - 2 || C[l] >= INT32_MAX) return BED_BAD_ARGS;
        ncols += C[l];
        maxR = R[l] > maxR ? R[l] : maxR;
        out_counts[l] = 0;
    }
    if (m == 0) return BED_OK;
    if (ncols == 0) return BED_EXHAUSTED;

    /* lay out the workspace: measure it first, then carve it from one block */
    size_t need = 0;
    Block *block = NULL;
    Layer *ly = NULL;
    int64_t *rowfirst = NULL;
    int32_t *seq = NULL, *trow = NULL, *tcol = NULL;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !(block = block_get(need))) return BED_NO_MEMORY;
        Arena a = {pass ? (char *)(block + 1) : NULL, 0};
        ly = take(&a, nlayers, sizeof(Layer));
        seq = take(&a, 2 * N, sizeof(int32_t));
        trow = take(&a, m, sizeof(int32_t));
        tcol = take(&a, m, sizeof(int32_t));
        rowfirst = take(&a, maxR + 1, sizeof(int64_t));
        for (int64_t l = 0; l < nlayers; l++) {
            Layer shape;
            layer_layout(pass ? &ly[l] : &shape, &a, R[l], C[l], N);
        }
        need = a.used;
    }

    /* 1. set-up and round 1, a tile of columns at a time */
    int rc = BED_OK;
    const int64_t k0 = (m + ncols - 1) / ncols;
    int64_t made = 0;
    for (int64_t l = 0; l < nlayers; l++) {
        for (int64_t c0 = 0; c0 < C[l]; c0 += TILE) {
            const int64_t c1 = c0 + TILE < C[l] ? c0 + TILE : C[l];
            rc = columns_init(&ly[l], scores[l], N, c0, c1);
            if (rc != BED_OK) goto done;
            for (int64_t c = c0; c < c1; c++) {
                column_run(&ly[l], c, N, k0, 0, seq);
                made += ly[l].npick[c];
            }
        }
    }

    /* 2. round 2: every pick >= tau (a lower bound of the final m-th largest) */
    const uint64_t tau = made >= m ? kth_largest(ly, nlayers, m) : 0;
    made = 0;
    for (int64_t l = 0; l < nlayers; l++) {
        for (int64_t c = 0; c < C[l]; c++) {
            column_run(&ly[l], c, N, ly[l].P, tau, seq);
            made += ly[l].npick[c];
        }
    }
    if (made < m) {
        rc = BED_EXHAUSTED;
        goto done;
    }

    /* 3. the m largest picks: all above the m-th largest T, ties at T in (column, pick) order */
    const uint64_t T = kth_largest(ly, nlayers, m);
    int64_t ties = m;
    for (int64_t l = 0; l < nlayers; l++)
        for (int64_t c = 0; c < C[l]; c++)
            for (int32_t i = 0; i < ly[l].npick[c] && ly[l].pick[c * ly[l].P + i] > T; i++) ties--;
    for (int64_t l = 0; l < nlayers; l++) {
        for (int64_t c = 0; c < C[l]; c++) {
            const uint64_t *pick = ly[l].pick + c * ly[l].P;
            int32_t i = 0;
            while (i < ly[l].npick[c] && pick[i] > T) i++;
            while (ties > 0 && i < ly[l].npick[c] && pick[i] == T) {
                i++;
                ties--;
            }
            ly[l].keep[c] = i;
        }
    }

    /* 4. division */
    int64_t out = 0;
    for (int64_t l = 0; l < nlayers; l++) {
        const int64_t nb = divide_runs(&ly[l], N, out_rows + out, out_cols + out, m - out, trow, tcol, rowfirst);
        if (nb < 0) {
            rc = BED_BAD_RUN;
            goto done;
        }
        out_counts[l] = nb;
        out += nb;
    }
    if (out != m) rc = BED_BAD_RUN;

done:
    block_put(block);
    return rc;
}
