/*
 * BED (Block Expansion and Division, Lee & Shin 2024) as a host shared library.
 *
 * This is the native engine behind ubpdsl.prune.selectors.bed_select / bed_select_multi; the numpy
 * engine in selectors.py is the reference it agrees with bit for bit.  Python validates every input
 * (shapes, finiteness, budget) before calling; this file trusts its arguments.
 *
 * Algorithm
 * ---------
 * Every column is a doubly linked list of its active (not yet selected) rows.  win[r] is the score of
 * the window of N consecutive active rows starting at row r, summed left to right in row order (the
 * order numpy uses, so the sums are bit-identical), or -inf when fewer than N active rows start at r.
 * A column's window slots are cut into chunks of G (about sqrt(R)); each chunk keeps its maximum and
 * the first row holding it, so the column's best window (ties: the lower row) is one scan of the
 * chunk maxima.  A winner tree over all columns of all layers gives the column whose next pick is
 * largest (ties: the lower column, layers in input order, i.e. the lower global column index).
 *
 * Each of the m steps takes the best column, removes its best window's N rows from the column's list
 * (the neighbours close up), rescores the up to N-1 windows that started before the window and
 * overlapped it (each now spans the gap), drops the windows of the removed rows, refreshes the chunks
 * it touched and the column's path in the winner tree: O(N^2 + G + R/G + log C) per pick.  The cost is
 * dominated by cache misses (a pick usually lands in a column untouched for a while), so the lines a
 * pick needs are prefetched together and a row's score and links share one 16-byte record.
 *
 * A column's key is the *running minimum* of its pick values, exactly like the numpy engine: picks
 * never increase in exact arithmetic, and the running minimum keeps that true under float rounding.
 * Merging per-column non-increasing sequences with ties broken by column index yields the picks in the
 * order (-value, column, pick index), which is how the numpy engine ranks them, so both engines select
 * the same rows.
 *
 * Division: every maximal run of selected rows in a column has a length that is a multiple of N (see
 * selectors.py); each run is cut into consecutive N-row blocks from its top.  Blocks are returned per
 * layer sorted by (row, column).
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum {
    BED_OK = 0,
    BED_NO_MEMORY = 1,
    BED_EXHAUSTED = 2, /* fewer windows than m (only possible if a window sum overflows) */
    BED_BAD_RUN = 3,   /* a selected run is not a multiple of N (an internal error) */
    BED_OVERFLOW = 4,  /* |score| too large: a window sum could overflow; use the numpy engine */
    BED_BAD_ARGS = 5,
};

/* Window sums stay finite (and so compare exactly like numpy's) while N * max|score| does. */
#define BED_MAX_ABS_SUM 1e300
/* `pv` of a selected (removed) row */
#define REMOVED (-2)

typedef struct {
    double v;   /* score */
    int32_t nx; /* next active row, R at the end */
    int32_t pv; /* previous active row, -1 at the head, REMOVED once selected */
} Row;

typedef struct {
    int64_t R, C;
    int64_t L;     /* window starts 0..L-1 can ever hold a window: L = R - N + 1 (may be <= 0) */
    int64_t G;     /* chunk length (a power of two >= 8, about sqrt(L)) */
    int64_t K;     /* chunks per column */
    int64_t W;     /* window slots per column: K * G >= L */
    Row *row;      /* [C][R] column-major */
    double *win;   /* [C][W] window score by start row; -inf = no window */
    double *cmax;  /* [C][K] maximum of each chunk */
    int32_t *carg; /* [C][K] first row of the chunk holding its maximum */
    int32_t *best; /* [C] start row of the column's best window (lowest row among equal ones) */
    double *last;  /* [C] running minimum of the column's pick values (+inf before the first) */
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

static int64_t pow2_at_least(int64_t x) {
    int64_t p = 1;
    while (p < x) p <<= 1;
    return p;
}

/* Winner of two winner-tree entries; `a` is the lower index, so it wins ties. */
static inline int32_t better(const double *key, int32_t a, int32_t b) {
    return key[b] > key[a] ? b : a;
}

/* Maximum of chunk k (and its first row) into cm[k], ca[k]. */
static inline void chunk_update(const double *w, double *cm, int32_t *ca, int64_t k, int64_t G) {
    const double *x = w + k * G;
    double m = x[0];
    for (int64_t j = 1; j < G; j++) m = x[j] > m ? x[j] : m; /* branch-free */
    int64_t a = 0;
    while (x[a] != m) a++;
    cm[k] = m;
    ca[k] = (int32_t)(k * G + a);
}

/* Start row of a column's best window: the first chunk holding the maximum, then its first row. */
static inline int32_t column_best(const double *cm, const int32_t *ca, int64_t K) {
    int64_t k = 0;
    for (int64_t i = 1; i < K; i++)
        if (cm[i] > cm[k]) k = i;
    return ca[k];
}

/* Shape a layer and carve its arrays from the arena. */
static void layer_layout(Layer *ly, Arena *a, int64_t R, int64_t C, int64_t N) {
    const int64_t L = R - N + 1;
    int64_t G = 8;
    while (G < 4096 && G * G < L) G <<= 1;
    const int64_t K = L > 0 ? (L + G - 1) / G : 1, W = K * G;
    ly->R = R;
    ly->C = C;
    ly->L = L;
    ly->G = G;
    ly->K = K;
    ly->W = W;
    ly->row = take(a, R * C, sizeof(Row));
    ly->win = take(a, W * C, sizeof(double));
    ly->cmax = take(a, K * C, sizeof(double));
    ly->carg = take(a, K * C, sizeof(int32_t));
    ly->best = take(a, C, sizeof(int32_t));
    ly->last = take(a, C, sizeof(double));
}

/* Transpose a layer's scores and build its lists, windows and chunk maxima. */
static int layer_init(Layer *ly, const double *scores, int64_t N) {
    const int64_t R = ly->R, C = ly->C, L = ly->L, G = ly->G, K = ly->K, W = ly->W;
    /* transpose in tiles of 32x32, link the rows, check the magnitude of the scores */
    double maxabs = 0.0;
    for (int64_t r0 = 0; r0 < R; r0 += 32) {
        for (int64_t c0 = 0; c0 < C; c0 += 32) {
            const int64_t r1 = r0 + 32 < R ? r0 + 32 : R, c1 = c0 + 32 < C ? c0 + 32 : C;
            for (int64_t c = c0; c < c1; c++) {
                Row *col = ly->row + c * R;
                for (int64_t r = r0; r < r1; r++) {
                    const double x = scores[r * C + c];
                    col[r] = (Row){x, (int32_t)(r + 1), (int32_t)(r - 1)};
                    const double a = fabs(x);
                    maxabs = a > maxabs ? a : maxabs;
                }
            }
        }
    }
    if (!(maxabs * (double)N < BED_MAX_ABS_SUM)) return BED_OVERFLOW;

    for (int64_t c = 0; c < C; c++) {
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
        ly->best[c] = column_best(ly->cmax + c * K, ly->carg + c * K, K);
        ly->last[c] = INFINITY;
    }
    return BED_OK;
}

/* Value of the column's next pick: its best window's score, capped by its previous pick. */
static inline double column_key(const Layer *ly, int64_t c) {
    const double next = ly->win[c * ly->W + ly->best[c]];
    return next < ly->last[c] ? next : ly->last[c];
}

/* Select the best window of column c and update the column.  Returns the column's next key. */
static double column_pick(Layer *ly, int64_t c, int64_t N, int32_t *seq) {
    const int64_t R = ly->R, L = ly->L, G = ly->G, K = ly->K;
    Row *col = ly->row + c * R;
    double *w = ly->win + c * ly->W, *cm = ly->cmax + c * K;
    int32_t *ca = ly->carg + c * K;

    /* the column is cold: fetch the lines the pick will touch together, not one miss at a time */
    const int32_t b0 = ly->best[c];
    __builtin_prefetch(col + b0);
    __builtin_prefetch(col + b0 + 4);
    if (b0 >= 4) __builtin_prefetch(col + b0 - 4);
    __builtin_prefetch(w + b0);
    if (b0 >= 8) __builtin_prefetch(w + b0 - 8);
    for (int64_t k = 0; k < K; k += 8) {
        __builtin_prefetch(cm + k);
        __builtin_prefetch(ca + k);
    }

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
        col[r].pv = REMOVED;
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

    ly->best[c] = column_best(cm, ca, K);
    return column_key(ly, c);
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
        for (int64_t r = 0; r < R;) {
            if (col[r].pv != REMOVED) {
                r++;
                continue;
            }
            int64_t e = r;
            while (e < R && col[e].pv == REMOVED) e++;
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
        if (R[l] < 0 || C[l] < 0 || R[l] >= INT32_MAX || C[l] >= INT32_MAX) return BED_BAD_ARGS;
        ncols += C[l];
        maxR = R[l] > maxR ? R[l] : maxR;
    }
    const int64_t Q = pow2_at_least(ncols > 1 ? ncols : 1); /* leaves of the winner tree */
    if (ncols >= INT32_MAX / 2) return BED_BAD_ARGS;

    /* lay out the workspace: measure it first, then carve it from one block */
    size_t need = 0;
    Block *block = NULL;
    Layer *ly = NULL;
    int64_t *first = NULL, *rowfirst = NULL;
    int32_t *seq = NULL, *gtree = NULL, *owner = NULL, *trow = NULL, *tcol = NULL;
    double *gkey = NULL;
    for (int pass = 0; pass < 2; pass++) {
        if (pass == 1 && !(block = block_get(need))) return BED_NO_MEMORY;
        Arena a = {pass ? (char *)(block + 1) : NULL, 0};
        ly = take(&a, nlayers, sizeof(Layer));
        first = take(&a, nlayers + 1, sizeof(int64_t)); /* global index of each layer's column 0 */
        seq = take(&a, 2 * N, sizeof(int32_t));
        gkey = take(&a, Q, sizeof(double));
        gtree = take(&a, 2 * Q, sizeof(int32_t));
        owner = take(&a, ncols, sizeof(int32_t)); /* layer of each global column */
        trow = take(&a, m, sizeof(int32_t));
        tcol = take(&a, m, sizeof(int32_t));
        rowfirst = take(&a, maxR + 1, sizeof(int64_t));
        for (int64_t l = 0; l < nlayers; l++) {
            Layer shape;
            layer_layout(pass ? &ly[l] : &shape, &a, R[l], C[l], N);
        }
        need = a.used;
    }

    int rc = BED_OK;
    first[0] = 0;
    for (int64_t l = 0; l < nlayers; l++) {
        rc = layer_init(&ly[l], scores[l], N);
        if (rc != BED_OK) goto done;
        first[l + 1] = first[l] + C[l];
    }

    /* winner tree over all columns, keyed by each column's next pick value; leaves past the last
     * column have key -inf */
    for (int64_t g = 0; g < Q; g++) gkey[g] = -INFINITY;
    for (int64_t l = 0; l < nlayers; l++) {
        for (int64_t c = 0; c < C[l]; c++) {
            owner[first[l] + c] = (int32_t)l;
            gkey[first[l] + c] = column_key(&ly[l], c);
        }
    }
    for (int64_t g = 0; g < Q; g++) gtree[Q + g] = (int32_t)g;
    for (int64_t k = Q - 1; k >= 1; k--) gtree[k] = better(gkey, gtree[2 * k], gtree[2 * k + 1]);

    /* the m picks */
    for (int64_t i = 0; i < m; i++) {
        const int32_t g = gtree[1];
        if (!(gkey[g] > -INFINITY)) {
            rc = BED_EXHAUSTED;
            goto done;
        }
        Layer *y = &ly[owner[g]];
        const int64_t c = g - first[owner[g]];
        y->last[c] = gkey[g];
        gkey[g] = column_pick(y, c, N, seq);
        for (int64_t k = (Q + g) >> 1; k >= 1; k >>= 1) gtree[k] = better(gkey, gtree[2 * k], gtree[2 * k + 1]);
    }

    /* division */
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
