"""Block selectors: which Nx1 blocks of a layer's GEMM view W[R, C] to keep.

Every selector keeps exactly ``m`` blocks of ``N`` consecutive rows of one column, never
overlapping, and returns them as two ``int32`` arrays ``(rows, cols)`` (start row and column of each
block, sorted by ``(row, col)``).  The score matrix ``scores[R, C]`` holds the importance of each weight
(see :func:`importance`); the objective is the summed score of the kept weights.

* :func:`bed_select` -- BED (Block Expansion and Division, Lee & Shin 2024): fast and pseudo-optimal;
  blocks may start at any row (unaligned, UBP).
* :func:`optimal_select` -- the exact optimum (per-column dynamic programme + exact merge).
* :func:`aligned_select` -- the exact optimum when blocks must start at multiples of ``N`` (ABP).
* :func:`unstructured_select` -- keep the ``n_keep`` largest single weights (a bool mask).
* :func:`bed_select_multi` -- BED with one budget shared by several layers.

How BED is computed here
------------------------
The textbook BED loop takes the best window (N consecutive *active*, i.e. not yet selected, rows of a
column) over all columns, removes its rows so that the neighbours close up, rescores the windows that
overlapped it, and repeats ``m`` times.  Two facts make a vectorised equivalent possible:

1. The columns do not interact: a pick in column ``c`` changes only column ``c``'s windows.  So the
   global loop is a merge of per-column pick sequences, always taking the column whose current best
   window is largest.
2. Within a column the picked scores never increase.  If the picked window is ``b_0..b_{N-1}``, a new
   window is ``j`` active rows ``P`` before it plus ``N-j`` active rows ``A`` after it.  Before the pick,
   ``P + b_0..b_{N-j-1}`` and ``b_{N-j}..b_{N-1} + A`` were windows no better than ``b``; adding the two
   inequalities gives ``P + A <= b``.

Hence BED keeps, per column, a *prefix* of that column's greedy pick sequence, and the prefixes are the
``m`` largest picks overall (ties: column order, then pick order -- exactly what a heap keyed on
``(-score, column, row)`` does).  :class:`_ColumnGreedy` advances the greedy of all columns in lock-step
rounds with numpy: one pick per live column per round, found by a two-level (chunked) argmax and
applied with O(N) array operations on per-column linked lists.  A column stops as soon as its latest
pick falls below the ``m``-th largest pick gathered so far, which no later pick of that column can
beat.  Cost: O(R*C) set-up plus O(N + G + R/G) work per pick (chunk length G = 16), in (max picks per column) rounds.

The same algorithm also exists in C (``native/bed.c``, built with zig on first use by
:mod:`ubpdsl.prune.bed_native`): each column's greedy runs on its own while the column is in cache,
then a radix select finds the m-th largest pick; about 5x faster than this engine.  :func:`bed_select`
uses it when available; this numpy engine stays as the fallback and the reference (the engines return
identical blocks; ``UBPDSL_BED_ENGINE=numpy|native`` forces one).

Why the selected rows divide into blocks
----------------------------------------
A window's rows are consecutive active rows, so the rows skipped between them are exactly the maximal
runs of already selected rows.  Selecting a window therefore merges itself, the runs inside it and the
runs touching its ends into one run; by induction every maximal run of selected rows has a length that
is a multiple of N, and each column holds ``N * (picks in that column)`` rows.  Cutting every run into
consecutive N-row blocks from its top gives exactly ``m`` valid, non-overlapping blocks with the same
summed score.

Why the exact merge in :func:`optimal_select` can be greedy
-----------------------------------------------------------
For one column, choosing ``k`` non-overlapping length-N intervals is an integer programme whose
constraint matrix (one row per weight row: the intervals covering it are consecutive in start order,
plus the all-ones cardinality row) has the consecutive-ones property, hence is totally unimodular.  The
LP relaxation is therefore integral for every integer ``k``, and an LP optimum is concave in its
right-hand side: the per-column best-score curve ``f_c(k)`` is concave.  The exact allocation of ``m``
blocks across columns (a max-plus knapsack over the curves) is then the ``m`` largest marginal gains.
The code checks concavity numerically; the tests check it on single columns by brute force and
compare :func:`optimal_select` with an exhaustive enumeration of all block sets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ubpdsl.errors import MaskError

__all__ = [
    "BudgetError",
    "aligned_select",
    "bed_select",
    "bed_select_multi",
    "blocks_to_mask",
    "budget",
    "importance",
    "kept_score",
    "optimal_select",
    "select_blocks",
    "unstructured_select",
    "window_scores",
]

METHODS = ("bed", "optimal", "aligned")


class BudgetError(MaskError, ValueError):
    """The requested number of blocks is impossible (negative, or more than fit in the layer)."""


# --------------------------------------------------------------------------------------------------
# Budget, importance, window scores
# --------------------------------------------------------------------------------------------------


def budget(R: int, C: int, N: int, sparsity: float) -> int:
    """Number of N-row blocks kept at ``sparsity``: ``round((1 - sparsity) * R * C / N)``.

    Rounds half up.  ``sparsity`` must lie in [0, 1).  The result may exceed what fits in the layer
    when ``R`` is not a multiple of ``N`` (the selectors then raise :class:`BudgetError`).
    """
    for name, v in (("R", R), ("C", C), ("N", N)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    s = float(sparsity)
    if not (0.0 <= s < 1.0):  # also rejects NaN
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    x = (1.0 - s) * int(R) * int(C) / int(N)
    # drop float noise (0.1 * 384 = 38.400000000000006) before rounding half up
    return int(math.floor(round(x, 6) + 0.5))


def importance(weight, kind: str = "abs", grad=None) -> np.ndarray:
    """Importance of each weight: ``|w|`` (``abs``), ``w**2`` (``sq``) or ``|w * grad|`` (``taylor``).

    Accepts numpy arrays or torch tensors of any shape; returns a float64 array of the same shape.
    """
    w = _to_numpy(weight)
    if kind == "abs":
        return np.abs(w)
    if kind == "sq":
        return np.square(w)
    if kind == "taylor":
        if grad is None:
            raise ValueError("importance kind 'taylor' needs grad")
        g = _to_numpy(grad)
        if g.shape != w.shape:
            raise ValueError(f"grad shape {g.shape} does not match weight shape {w.shape}")
        return np.abs(w * g)
    raise ValueError(f"unknown importance kind {kind!r} (expected 'abs', 'sq' or 'taylor')")


def window_scores(scores, N: int) -> np.ndarray:
    """``S[i, c] = sum(scores[i:i+N, c])`` for ``i = 0..R-N`` (shape ``[R-N+1, C]``, may be empty).

    Summed left to right in row order, the same order BED uses when it rescores windows.
    """
    sc = _as_scores(scores)
    N = _check_n(N)
    R, C = sc.shape
    if R < N:
        return np.zeros((0, C))
    out = sc[0 : R - N + 1].copy()
    for n in range(1, N):
        out += sc[n : R - N + 1 + n]
    return out


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _as_scores(scores) -> np.ndarray:
    sc = _to_numpy(scores)
    if sc.ndim != 2:
        raise ValueError(f"scores must be a 2-D [R, C] matrix, got shape {sc.shape}")
    if not np.all(np.isfinite(sc)):
        raise ValueError("scores contain NaN or infinity")
    return sc


def _check_n(N: int) -> int:
    if int(N) != N or N < 1:
        raise ValueError(f"block size N must be an integer >= 1, got {N!r}")
    return int(N)


def _check_m(m: int, R: int, C: int, N: int, what: str = "layer") -> int:
    if int(m) != m or m < 0:
        raise BudgetError(f"number of blocks m must be a non-negative integer, got {m!r}")
    cap = C * (R // N)
    if m > cap:
        raise BudgetError(
            f"cannot keep {m} blocks of {N} rows in a {R}x{C} {what}: at most {cap} ({R // N} per column)"
        )
    return int(m)


def _sorted_blocks(rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int32)
    cols = np.asarray(cols, dtype=np.int32)
    order = np.lexsort((cols, rows))
    return rows[order], cols[order]


def blocks_to_mask(rows, cols, R: int, C: int, N: int) -> np.ndarray:
    """Dense ``bool[R, C]`` mask of the blocks (no validation; see ``masks.validate_blocks``)."""
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    mask = np.zeros((R, C), dtype=bool)
    for n in range(N):
        mask[rows + n, cols] = True
    return mask


def kept_score(scores, rows, cols, N: int) -> float:
    """Summed score of the weights covered by the blocks (each block counted once)."""
    sc = _to_numpy(scores)
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    total = 0.0
    for n in range(N):
        total += float(sc[rows + n, cols].sum())
    return total


def _divide_runs(selected: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Cut every maximal vertical run of ``selected[R, C]`` into N-row blocks from its top.

    Every run length must be a multiple of N (BED's invariant); raises AssertionError otherwise.
    """
    R, C = selected.shape
    pad = np.zeros((R + 2, C), dtype=bool)
    pad[1:-1] = selected
    # run starts and ends, listed column by column (nonzero of the transpose gives (col, row) pairs
    # sorted by column then row), so the k-th start and the k-th end delimit the same run
    start_col, start_row = np.nonzero((pad[1:-1] & ~pad[:-2]).T)
    _, end_row = np.nonzero((pad[1:-1] & ~pad[2:]).T)
    lengths = end_row - start_row + 1
    if np.any(lengths % N):
        raise AssertionError("BED invariant violated: a run of selected rows is not a multiple of N")
    nblk = lengths // N
    rows = np.repeat(start_row, nblk) + N * _ragged_arange(nblk)
    cols = np.repeat(start_col, nblk)
    return _sorted_blocks(rows, cols)


def _ragged_arange(counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(k)`` for each k in counts."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total, dtype=np.int64) - offsets


# --------------------------------------------------------------------------------------------------
# BED
# --------------------------------------------------------------------------------------------------


class _ColumnGreedy:
    """The per-column BED greedy of one layer, advanced one pick per live column per round.

    Column ``c`` is row ``c`` of the ``[C, W]`` arrays ``vals`` (the scores), ``win`` (the current score
    of the window starting at each active row; -inf when the row is selected or fewer than N active
    rows follow) and the doubly linked list ``nxt``/``prv`` of its active rows.  Index ``R`` is the end
    sentinel and ``R+1`` the head sentinel; both have value -inf, so a window touching them scores
    -inf; ``W`` pads ``R+2`` to whole chunks of ``G`` entries.  Links hold *flat* indices into the
    raveled arrays, so walking a list is one ``take`` for all columns at once.  ``cmax[c, k]`` is the
    maximum of chunk ``k`` of ``win[c]``: finding a column's best window reads ``W/G + G`` entries
    instead of ``W``.
    """

    G = 16  # chunk length of the two-level argmax

    def __init__(self, scores: np.ndarray, N: int):
        assert N >= 2, "N = 1 is plain top-m (see _top_single)"
        R, C = scores.shape
        G = self.G
        W = -(-(R + 2) // G) * G  # R rows + 2 sentinels, padded to whole chunks
        self.R, self.C, self.N, self.W, self.nch = R, C, N, W, W // G
        END, HEAD = R, R + 1
        self.vals = np.empty((C, W))
        self.vals[:, :R] = scores.T
        self.vals[:, R:] = -np.inf
        self.win = np.full((C, W), -np.inf)
        L = R - N + 1
        if L > 0:  # summed left to right, like window_scores
            self.win[:, :L] = self.vals[:, :L]
            for n in range(1, N):
                self.win[:, :L] += self.vals[:, n : L + n]
        self.cmax = self.win.reshape(C, self.nch, G).max(axis=2)
        itype = np.int32 if C * W < 2**31 else np.int64
        nxt = np.arange(1, W + 1, dtype=itype)
        nxt[R - 1] = END
        nxt[END] = END
        nxt[HEAD] = 0
        prv = np.arange(-1, W - 1, dtype=itype)
        prv[0] = HEAD
        prv[END] = R - 1
        prv[HEAD] = HEAD
        base = np.arange(C, dtype=itype)[:, None] * itype(W)
        self.nxt = nxt[None, :] + base
        self.prv = prv[None, :] + base
        self.last = np.full(C, np.inf)  # running minimum of each column's picks
        self.alive = np.ones(C, dtype=bool)
        self.live = np.arange(C)
        self.round = 0
        self._g = np.arange(G)
        # rescoring: in step()'s seq (N-1 predecessors, the window, N-1 successors), the window
        # starting at predecessor column c takes columns c..N-2 and then the first c+1 successors
        self._rescore = np.array(
            [list(range(c, N - 1)) + list(range(2 * N - 1, 2 * N + c)) for c in range(N - 1)]
        ).reshape(N - 1, N)

    @property
    def n_alive(self) -> int:
        return len(self.live)

    def step(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One pick in every live column.

        Returns ``(cols, values, blockrows)``: the columns that picked, their pick values (running
        minimum along the column, so sequences are non-increasing even under float rounding) and the
        N original row indices of each picked window (``[k, N]``).  Exhausted columns die.
        """
        N, W, G = self.N, self.W, self.G
        wf, nf, pf, vf = self.win.ravel(), self.nxt.ravel(), self.prv.ravel(), self.vals.ravel()
        cols = self.live
        # two-level argmax: the first chunk holding the column maximum, then the first entry in it,
        # i.e. the lowest row among equal best windows
        if 2 * len(cols) > self.C:  # dead columns have cmax -inf and are filtered out below
            cols = np.arange(self.C)
            chunk = cols * self.nch + self.cmax.argmax(axis=1)
        else:
            chunk = cols * self.nch + self.cmax[cols].argmax(axis=1)
        sub = wf.take(chunk[:, None] * G + self._g)  # 1-D takes beat row gathers of a 2-D array
        q = sub.argmax(axis=1)
        v = sub[np.arange(len(cols)), q]
        ok = v > -np.inf  # exhausted (or dead) columns have no window left
        if not ok.all():
            self.kill(cols[~ok])
            cols, chunk, q, v = cols[ok], chunk[ok], q[ok], v[ok]
        # seq = flat indices of the N-1 active rows before the picked window, the window b_0..b_{N-1}
        # and the N-1 active rows after it, in row order
        seq = np.empty((len(cols), 3 * N - 2), dtype=self.nxt.dtype)
        seq[:, N - 1] = chunk * G + q
        for t in range(N, 3 * N - 2):
            seq[:, t] = nf.take(seq[:, t - 1])
        for t in range(N - 2, -1, -1):
            seq[:, t] = pf.take(seq[:, t + 1])
        # splice the window out: its predecessor and successor become neighbours
        nf[seq[:, N - 2]] = seq[:, 2 * N - 1]
        pf[seq[:, 2 * N - 1]] = seq[:, N - 2]
        # rescore the windows starting at the N-1 predecessors (j rows before + N-j after, summed left
        # to right); a head sentinel's window includes its -inf and stays -inf.  The picked window's
        # own rows get -inf.
        wv = vf.take(seq)[:, self._rescore]  # [k, N-1, N]
        new = np.full((len(cols), 2 * N - 1), -np.inf)
        s = new[:, : N - 1]
        s[:] = wv[:, :, 0]
        for t in range(1, N):
            s += wv[:, :, t]
        pos = seq[:, : 2 * N - 1]  # predecessors and the window: the windows that change
        old = wf.take(pos)
        wf[pos] = new
        # chunk maxima: a chunk whose maximum went down is recomputed (always the picked window's
        # chunk); otherwise the maximum can only rise to one of the new values
        chg = pos // G
        cmf = self.cmax.ravel()
        stale = chg[(old >= cmf.take(chg)) & (new < old)]
        np.maximum.at(cmf, chg[:, : N - 1].ravel(), s.ravel())
        cmf[stale] = _rowmax(wf.take(stale[:, None] * G + self._g))

        vmin = np.minimum(v, self.last[cols])
        self.last[cols] = vmin
        self.round += 1
        return cols, vmin, seq[:, N - 1 : 2 * N - 1] - (cols * W)[:, None]

    def kill(self, cols: np.ndarray) -> None:
        """Stop columns ``cols`` (no more picks)."""
        cols = cols[self.alive[cols]]
        if not len(cols):
            return
        self.alive[cols] = False
        self.cmax[cols] = -np.inf
        self.live = np.nonzero(self.alive)[0]

    def kill_below(self, tau: float) -> None:
        """Stop every live column whose latest pick is below ``tau``."""
        below = self.live[self.last[self.live] < tau]
        if len(below):
            self.kill(below)


def _rowmax(x: np.ndarray) -> np.ndarray:
    """Maximum over the last axis (length a power of two) by halving: much faster than ``max(-1)``
    for short rows, where numpy's reduction pays a per-row overhead."""
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = np.maximum(x[..., :h], x[..., h:])
    return x[..., 0]


def _top_m(top: np.ndarray, fresh: list[np.ndarray], m: int) -> np.ndarray:
    """The m largest of ``top`` and the arrays in ``fresh`` (all of them if fewer)."""
    top = np.concatenate([top, *fresh])
    if len(top) > m:
        top = np.partition(top, len(top) - m)[len(top) - m :]
    return top


def _bed_engine(score_list: Sequence[np.ndarray], m: int, N: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BED with one budget ``m`` shared by the layers in ``score_list`` (scores already validated).

    Runs the native engine (:mod:`ubpdsl.prune.bed_native`) when it is available and accepts the
    input, else :func:`_bed_engine_numpy`; both return the same blocks.
    """
    from ubpdsl.prune import bed_native

    if bed_native.engine() == "native":
        out = bed_native.bed_native(score_list, m, N)
        if out is not None:
            return out
    return _bed_engine_numpy(score_list, m, N)


def _bed_engine_numpy(score_list: Sequence[np.ndarray], m: int, N: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The numpy BED engine (the reference; see the module docstring)."""
    if N == 1:
        return _top_single(score_list, m)
    engines = [_ColumnGreedy(sc, N) for sc in score_list]
    picks: list[tuple[int, np.ndarray, np.ndarray, int, np.ndarray]] = []
    top = np.zeros(0)  # the largest m pick values gathered so far (once there are m)
    tau = -np.inf
    fresh: list[np.ndarray] = []
    total = 0
    rounds = 0
    while m > 0 and any(e.n_alive for e in engines):
        rounds += 1
        for li, e in enumerate(engines):
            if e.n_alive:
                t = e.round
                cols, vals, brows = e.step()
                if len(cols):
                    picks.append((li, cols, vals, t, brows))
                    fresh.append(vals)
                    total += len(cols)
        if total >= m and (rounds % 4 == 0 or len(top) < m):
            # the m-th largest pick so far bounds the final m-th largest from below: a column whose
            # latest pick is below it can never contribute again (its picks do not increase).
            # Refreshed every few rounds only: a stale bound is still a bound.
            top, fresh = _top_m(top, fresh, m), []
            tau = float(top.min())
            for e in engines:
                e.kill_below(tau)
    if m > 0:
        tau = float(_top_m(top, fresh, m).min())  # exact m-th largest of all picks
    masks = [np.zeros(sc.shape, dtype=bool) for sc in score_list]
    if m > 0:
        lay = np.concatenate([np.full(len(c), li) for li, c, _, _, _ in picks])
        col = np.concatenate([c for _, c, _, _, _ in picks])
        val = np.concatenate([v for _, _, v, _, _ in picks])
        rnd = np.concatenate([np.full(len(c), t) for _, c, _, t, _ in picks])
        brw = np.concatenate([b for _, _, _, _, b in picks])
        # heap order (-score, layer, column, pick): everything above tau is in, and only the picks
        # tied at tau need the tie-break
        above = np.nonzero(val > tau)[0]
        tied = np.nonzero(val == tau)[0]
        tied = tied[np.lexsort((rnd[tied], col[tied], lay[tied]))][: m - len(above)]
        order = np.concatenate([above, tied])
        assert len(order) == m
        for li, mk in enumerate(masks):
            sel = order[lay[order] == li]
            mk[brw[sel].ravel(), np.repeat(col[sel], N)] = True
    return [_divide_runs(mk, N) for mk in masks]


def _top_single(score_list: Sequence[np.ndarray], m: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BED for N = 1: the m largest weights (ties: layer, column, row)."""
    vals, lay, col, row = [], [], [], []
    for li, sc in enumerate(score_list):
        R, C = sc.shape
        rr, cc = np.meshgrid(np.arange(R), np.arange(C), indexing="ij")
        vals.append(sc.ravel())
        lay.append(np.full(R * C, li))
        col.append(cc.ravel())
        row.append(rr.ravel())
    v, la, co, ro = (np.concatenate(x) for x in (vals, lay, col, row))
    order = np.lexsort((ro, co, la, -v))[:m]
    out = []
    for li in range(len(score_list)):
        sel = order[la[order] == li]
        out.append(_sorted_blocks(ro[sel], co[sel]))
    return out


def bed_select(scores, m: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """BED: ``m`` unaligned N-row blocks with (pseudo-)maximal summed score; returns ``(rows, cols)``.

    Deterministic: ties between equal windows go to the lower column, then the lower row.
    """
    sc = _as_scores(scores)
    N = _check_n(N)
    R, C = sc.shape
    m = _check_m(m, R, C, N)
    return _bed_engine([sc], m, N)[0]


def bed_select_multi(score_list: Sequence, m_total: int, N: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """BED with one budget of ``m_total`` blocks shared by several layers.

    The layers' picks compete in one ranking (ties: earlier layer first), so layers whose weights
    matter more keep more blocks.  Returns one ``(rows, cols)`` per layer, in input order.
    """
    scs = [_as_scores(s) for s in score_list]
    N = _check_n(N)
    if int(m_total) != m_total or m_total < 0:
        raise BudgetError(f"number of blocks must be a non-negative integer, got {m_total!r}")
    cap = sum(s.shape[1] * (s.shape[0] // N) for s in scs)
    if m_total > cap:
        raise BudgetError(f"cannot keep {m_total} blocks of {N} rows in these layers: at most {cap}")
    return _bed_engine(scs, int(m_total), N)


# --------------------------------------------------------------------------------------------------
# Exact optimum
# --------------------------------------------------------------------------------------------------


def _column_curves(sc: np.ndarray, N: int, K: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-column DP.  Returns ``(f, took)``.

    ``f[k, c]`` = best score with k blocks in column c (``-inf`` if infeasible), ``k = 0..K``;
    ``took[i, k]`` = bit-packed (over columns) decision "a block ends at row i-1" for prefix length i.
    """
    R, C = sc.shape
    win = window_scores(sc, N)  # [R-N+1, C]
    ring = np.full((N + 1, K + 1, C), -np.inf)
    ring[:, 0, :] = 0.0  # zero blocks score 0 for any prefix
    took = np.zeros((R + 1, K + 1, (C + 7) // 8), dtype=np.uint8)
    for i in range(N, R + 1):
        cur = ring[i % (N + 1)]
        prev = ring[(i - 1) % (N + 1)]
        back = ring[(i - N) % (N + 1)]
        kmax = min(K, i // N)
        cand = back[:kmax] + win[i - N]  # k-1 blocks among the first i-N rows + block at i-N
        cur[:] = prev
        better = cand > prev[1 : kmax + 1]
        np.copyto(cur[1 : kmax + 1], cand, where=better)
        took[i, 1 : kmax + 1] = np.packbits(better, axis=1)
    return ring[R % (N + 1)].copy(), took


def _reconstruct(took: np.ndarray, kcol: np.ndarray, R: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of the DP solution using ``kcol[c]`` blocks in column c."""
    C = len(kcol)
    cols = np.arange(C)
    i = np.full(C, R, dtype=np.int64)
    k = kcol.astype(np.int64).copy()
    out_r, out_c = [], []
    byte, bit = cols >> 3, 7 - (cols & 7)
    while True:
        act = k > 0
        if not act.any():
            break
        ia, ka, ca = i[act], k[act], cols[act]
        t = (took[ia, ka, byte[act]] >> bit[act]) & 1
        tk = t.astype(bool)
        out_r.append(ia[tk] - N)
        out_c.append(ca[tk])
        i[act] = np.where(tk, ia - N, ia - 1)
        k[act] = np.where(tk, ka - 1, ka)
    if not out_r:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return _sorted_blocks(np.concatenate(out_r), np.concatenate(out_c))


def optimal_select(scores, m: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact maximum-score set of ``m`` non-overlapping unaligned N-row blocks.

    Per-column DP (vectorised over columns) gives each column's best score ``f_c(k)`` for every
    ``k``; the curves are concave (see the module docstring), so the exact allocation of ``m`` blocks
    is the ``m`` largest marginal gains ``f_c(k) - f_c(k-1)``.  Cost ``O(R * C * min(m, R/N))`` time
    and ``R * C * min(m, R/N) / 8`` bytes of decision bits.
    """
    sc = _as_scores(scores)
    N = _check_n(N)
    R, C = sc.shape
    m = _check_m(m, R, C, N)
    if m == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    K = min(m, R // N)
    f, took = _column_curves(sc, N, K)
    gains = np.diff(f, axis=0)  # [K, C]; all finite since K <= R // N
    _check_concave(gains, f)
    # running minimum makes the kept set a prefix per column even under float rounding
    gains = np.minimum.accumulate(gains, axis=0)
    kk, cc = np.meshgrid(np.arange(K), np.arange(C), indexing="ij")
    order = np.lexsort((kk.ravel(), cc.ravel(), -gains.ravel()))[:m]
    kcol = np.bincount(cc.ravel()[order], minlength=C)
    return _reconstruct(took, kcol, R, N)


def _check_concave(gains: np.ndarray, f: np.ndarray) -> None:
    scale = max(float(np.max(np.abs(f))), 1.0)
    if np.any(np.diff(gains, axis=0) > 1e-9 * scale):  # pragma: no cover - excluded by total unimodularity
        raise AssertionError("per-column optimum curve is not concave; exact merge assumption broken")


# --------------------------------------------------------------------------------------------------
# Aligned blocks and unstructured
# --------------------------------------------------------------------------------------------------


def aligned_select(scores, m: int, N: int) -> tuple[np.ndarray, np.ndarray]:
    """ABP: the ``m`` best blocks among those starting at rows ``0, N, 2N, ...`` (exact)."""
    sc = _as_scores(scores)
    N = _check_n(N)
    R, C = sc.shape
    m = _check_m(m, R, C, N)
    nb = R // N
    if m == 0 or nb == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    blk = sc[: nb * N].reshape(nb, N, C)
    s = blk[:, 0, :].copy()
    for n in range(1, N):
        s += blk[:, n, :]
    rr, cc = np.meshgrid(np.arange(nb) * N, np.arange(C), indexing="ij")
    order = np.lexsort((rr.ravel(), cc.ravel(), -s.ravel()))[:m]
    return _sorted_blocks(rr.ravel()[order], cc.ravel()[order])


def unstructured_select(scores, n_keep: int) -> np.ndarray:
    """Bool mask keeping the ``n_keep`` largest scores (ties: row-major order)."""
    sc = _to_numpy(scores)
    if int(n_keep) != n_keep or not (0 <= n_keep <= sc.size):
        raise BudgetError(f"n_keep must be an integer in [0, {sc.size}], got {n_keep!r}")
    flat = sc.ravel()
    order = np.argsort(-flat, kind="stable")[: int(n_keep)]
    mask = np.zeros(sc.size, dtype=bool)
    mask[order] = True
    return mask.reshape(sc.shape)


def select_blocks(scores, m: int, N: int, method: str = "bed") -> tuple[np.ndarray, np.ndarray]:
    """Dispatch to :func:`bed_select`, :func:`optimal_select` or :func:`aligned_select`."""
    if method == "bed":
        return bed_select(scores, m, N)
    if method == "optimal":
        return optimal_select(scores, m, N)
    if method == "aligned":
        return aligned_select(scores, m, N)
    raise ValueError(f"unknown block selection method {method!r} (expected one of {', '.join(METHODS)})")
