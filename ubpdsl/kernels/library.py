"""The kernel variants shipped with ubpdsl, written in the DSL.

* :data:`block_stream` - block streaming: every block FMAs its N rows straight into the Y
  tile in memory (simple; accumulates through L1).
* :data:`wros` - weight-rotating output-stationary (WROS): walks the rows once per tile
  keeping N accumulator rows in registers; weights are stored rotated so the FMA code is
  the same for every row phase and nothing is shuffled; row r is complete, stored and its
  register reset as soon as the walk passes it.
* :data:`wros_unrolled` - WROS with the mask baked in: rows and blocks fully unrolled, the
  columns and weights become immediates (only for mask-specialised builds; best on small
  layers).
* :data:`aligned_rows` - the aligned-block (ABP) reference: blocks only at multiples of N,
  one register tile per aligned row group.
* :data:`pattern_direct` - PatDNN's pattern-aware direct 3x3 convolution over a
  ``ubl.PatternSparse`` weight: the library is compiled in, so every pattern's 4 taps are
  constant offsets; edge rows and edge tiles are peeled so the padding costs no test in the
  inner loop.
"""

from __future__ import annotations

import ubpdsl.language as ubl

# The search spaces the variants declare (``@ubl.kernel(tune=...)``); the tuner's knob table
# (ubpdsl.autotune.space.KNOB_CHOICES) is their union.
#: Tile widths in vector registers. Any count on fixed-width targets (a non-power-of-two tile is
#: a 2-D vector, one register per row: TILE=6 is NEON's 24 accumulators at N=4); powers of two
#: only on SVE (the build of 3 or 6 there is a one-line error, a failed trial for the tuner).
TILES = [1, 2, 3, 4, 6, 8]
UNROLLS = [1, 2, 4]
PREFETCHES = [0, 1, 2, 4, 8, 16]  # X look-ahead in blocks (0: off)
PANELS = [0, 8, 16, 32, 64]  # row panel height (0: no panels)
YPREFETCHES = [0, 4, 8, 16]  # prefetch-for-write of the Y row that many rows ahead (0: off)


@ubl.kernel(layout="plain", tune={"TILE": TILES, "UNROLL": UNROLLS})
def block_stream(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2,
                 UNROLL: ubl.constexpr = 1):
    """Block streaming: each block FMAs its N rows into the Y tile held in memory.

    Y holds partial sums (``partial=True``); row r is complete once the blocks starting at r are
    done, and ``ubl.finish`` then applies the epilogue to it (in the ``_ep`` entry point only).
    """
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j), partial=True)
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in ubl.range(lo, hi, unroll=UNROLL):
                x = ubl.load(X, W.block_col(b), j)
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)), partial=True)
            ubl.finish(Y, r, j)
        for r in range(W.rows - W.block + 1, W.rows):
            ubl.finish(Y, r, j)


@ubl.kernel(layout="rotated", tune={"TILE": TILES, "UNROLL": UNROLLS, "PREFETCH": PREFETCHES,
                                     "STREAM": [False, True], "PANEL": PANELS, "YPREFETCH": YPREFETCHES})
def wros(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 4,
         UNROLL: ubl.constexpr = 1, PREFETCH: ubl.constexpr = 8, STREAM: ubl.constexpr = False,
         PANEL: ubl.constexpr = 0, YPREFETCH: ubl.constexpr = 8):
    """Weight-rotating output-stationary: N accumulator rows stay in registers.

    PREFETCH > 0 prefetches the X tile of the block that many blocks ahead (at most W.lookahead,
    the padding of block_cols: larger values act as W.lookahead; costs the column load and the
    row address besides the prefetch);
    YPREFETCH > 0 prefetches, with intent to write, the Y tile of the row that many rows ahead
    (when Y is not in cache, as for a layer inside a network, the stores otherwise stall on
    one read-for-ownership miss after another); STREAM writes Y with non-temporal stores.
    PANEL > 0 changes the loop order: rows are processed in panels of PANEL rows (rounded down
    to a multiple of N), tiles inside a panel, so Y is written as a few long row streams instead
    of one short piece per row per tile (small-K layers with large n). The blocks that reach
    from one panel into the next are not walked twice: a panel leaves their partial sums in the
    first N-1 rows of Y below it and the next panel starts its accumulators from there (so the
    tail of a panel's tiles is masked, not overlapped: its columns must not be summed twice).
    """
    N = W.block
    P = max(PANEL // N * N, N) if PANEL > 0 else W.rows + N
    for p0 in range(0, W.rows, P):
        for j in ubl.tiles(X.n, TILE, tail="mask" if PANEL > 0 else "overlap"):
            acc = ubl.zeros(N, j)
            if PANEL > 0:
                if p0 > 0:  # carry in the partial sums the previous panel left in Y
                    for q in ubl.static_range(N - 1):
                        acc[q] = ubl.load(Y, min(p0 + q, W.rows - 1), j)
            for r0 in range(p0, min(p0 + P, W.rows), N):
                for p in ubl.static_range(N):
                    lo, hi = W.row_blocks(r0 + p)
                    for b in ubl.range(lo, hi, unroll=UNROLL):
                        if PREFETCH > 0:
                            ubl.prefetch(X, W.block_col(b + min(PREFETCH, W.lookahead)), j)
                        acc = ubl.block_fma(W, b, ubl.load(X, W.block_col(b), j), acc)
                    if YPREFETCH > 0:
                        ubl.prefetch(Y, min(r0 + p + YPREFETCH, W.rows - 1), j, write=True)
                    if r0 + p < W.rows:
                        ubl.store(Y, r0 + p, j, acc[p], streaming=STREAM)
                    acc[p] = 0.0
            if PANEL > 0:  # carry out: rows below the panel already hold these blocks' sums
                for q in ubl.static_range(N - 1):
                    if p0 + P + q < W.rows:
                        ubl.store(Y, p0 + P + q, j, acc[q], partial=True)


@ubl.kernel(layout="rotated", specialized=True, tune={"TILE": TILES})
def wros_unrolled(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 4):
    """WROS with the block structure baked into straight-line code."""
    N = W.block
    for j in ubl.tiles(X.n, TILE):
        acc = ubl.zeros(N, j)
        for r in ubl.static_range(W.rows):
            lo, hi = W.row_blocks(r)
            for b in ubl.static_range(lo, hi):
                acc = ubl.block_fma(W, b, ubl.load(X, W.block_col(b), j), acc)
            ubl.store(Y, r, j, acc[r % N])
            acc[r % N] = 0.0


@ubl.kernel(layout="plain", aligned=True, tune={"TILE": TILES, "UNROLL": UNROLLS, "PREFETCH": PREFETCHES,
                                                "PANEL": PANELS, "YPREFETCH": YPREFETCHES})
def aligned_rows(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 4,
                 UNROLL: ubl.constexpr = 1, PREFETCH: ubl.constexpr = 8, PANEL: ubl.constexpr = 0,
                 YPREFETCH: ubl.constexpr = 8):
    """Aligned block pruning (ABP): one register tile per aligned group of N rows.

    PREFETCH, PANEL and YPREFETCH as in wros (look-ahead prefetch of X; row panels outside the
    tiles; write-prefetch of Y rows ahead), so that aligned and unaligned masks are compared
    with equally tuned kernels.
    """
    N = W.block
    P = max(PANEL // N * N, N) if PANEL > 0 else W.rows + N
    for p0 in range(0, W.rows, P):
        for j in ubl.tiles(X.n, TILE):
            for r0 in range(p0, min(p0 + P, W.rows), N):
                acc = ubl.zeros(N, j)
                lo, hi = W.row_blocks(r0)
                for b in ubl.range(lo, hi, unroll=UNROLL):
                    if PREFETCH > 0:
                        ubl.prefetch(X, W.block_col(b + min(PREFETCH, W.lookahead)), j)
                    acc = ubl.block_fma(W, b, ubl.load(X, W.block_col(b), j), acc)
                if YPREFETCH > 0:
                    for i in ubl.static_range(N):
                        ubl.prefetch(Y, min(r0 + i + YPREFETCH, W.rows - 1), j, write=True)
                for i in ubl.static_range(N):
                    if r0 + i < W.rows:
                        ubl.store(Y, r0 + i, j, acc[i])


@ubl.func
def filter_rows(X, W, f, r0, j, ROWS: ubl.constexpr, UNROLL: ubl.constexpr):
    """The output rows r0 .. r0 + ROWS - 1 of filter f over tile j: a register tile of ROWS rows.

    The kernels of f are summed pattern by pattern: the kernels of one pattern share its 4
    constant tap offsets (dy, dx), so the loop over them (unrolled UNROLL times) is shifted
    loads of the input channel's rows and 4 x ROWS FMAs.
    """
    acc = ubl.zeros(ROWS, j)
    for p in ubl.static_range(W.num_patterns):
        lo, hi = W.pattern_kernels(f, p)
        for k in ubl.range(lo, hi, unroll=UNROLL):
            c = W.kernel_channel(k)
            for t in ubl.static_range(W.taps):
                dy, dx = W.tap(p, t)
                w = W.tap_weight(k, t)
                for i in ubl.static_range(ROWS):
                    acc[i] = ubl.fma(w, ubl.load_pixels(X, c, r0 + i + dy, j, dx), acc[i])
    return acc


@ubl.func
def store_rows(Y, W, o, r0, j, acc, ROWS: ubl.constexpr):
    """Store the ROWS rows of acc to the rows r0.. of output channel o (rows past the image skipped)."""
    for i in ubl.static_range(ROWS):
        if r0 + i < W.height:
            ubl.store_pixels(Y, o, r0 + i, j, acc[i])


@ubl.kernel(tune={"TILE": TILES, "UNROLL": UNROLLS, "ROWS": [1, 2, 4, 8], "FILTERS_OUTER": [False, True]})
def pattern_direct(X: ubl.Input, Y: ubl.Output, W: ubl.PatternSparse, TILE: ubl.constexpr = 2,
                   UNROLL: ubl.constexpr = 1, ROWS: ubl.constexpr = 4, FILTERS_OUTER: ubl.constexpr = False):
    """Direct 3x3 convolution over patterns (PatDNN): ROWS output row tiles in registers.

    For each block of ROWS output rows and tile j of their pixels, each filter f (in grouped
    order) sums its kernels pattern by pattern: the kernels of one pattern share their 4
    constant tap offsets (dy, dx), so their loop body is shifted loads of the input channel's
    rows and 4 x ROWS FMAs; a row two output rows need (tap dy of row i, tap dy - 1 of row
    i + 1) is loaded once (CSE), and the kernel's channel and weights are read once for ROWS
    rows. The first and last row blocks are peeled (their taps above/below the image fold
    away, rows past the image are skipped at compile time), as are the first and last tile of
    a row (their taps left/right of the image shift a zero in).
    FILTERS_OUTER walks filters outside the rows (each filter's output plane at once) instead
    of inside the tiles (each input tile reused by every filter while it is in L1).
    UNROLL unrolls the loop over the kernels of one pattern. Both loop orders share the
    reduction (:data:`filter_rows`) and the stores (:data:`store_rows`), ``@ubl.func`` helpers
    inlined by the front end.
    """
    H = W.height
    if FILTERS_OUTER:
        for f in range(W.rows):
            o = W.filter_channel(f)
            for r0 in ubl.range(0, H, ROWS, peel=1):
                for j in ubl.tiles(W.width, TILE, edges=True):
                    acc = filter_rows(X, W, f, r0, j, ROWS=ROWS, UNROLL=UNROLL)
                    store_rows(Y, W, o, r0, j, acc, ROWS=ROWS)
    else:
        for r0 in ubl.range(0, H, ROWS, peel=1):
            for j in ubl.tiles(W.width, TILE, edges=True):
                for f in range(W.rows):
                    acc = filter_rows(X, W, f, r0, j, ROWS=ROWS, UNROLL=UNROLL)
                    o = W.filter_channel(f)
                    store_rows(Y, W, o, r0, j, acc, ROWS=ROWS)


VARIANTS = {
    "block_stream": block_stream,
    "wros": wros,
    "wros_unrolled": wros_unrolled,
    "aligned_rows": aligned_rows,
}
"""The block (GEMM) variants: every consumer of a block mask (compile, tune, bench) picks from these."""

PATTERN_VARIANTS = {
    "pattern_direct": pattern_direct,
}
"""Direct 3x3 convolution variants over a ``ubl.PatternSparse`` weight (pattern layers)."""
