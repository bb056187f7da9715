"""The native BED engine (``ubpdsl/prune/native/bed.c``) against the numpy engine and the textbook loop.

Both engines must return identical blocks (same tie-breaks, bit-identical window sums), and on
integer-valued scores (exact arithmetic, many ties) both must match the paper's loop row for row.
Also: the fallback to numpy when the native build is unavailable, and ``UBPDSL_BED_ENGINE``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_selectors import assert_valid, textbook_bed

from ubpdsl.errors import BuildError
from ubpdsl.prune import bed_native
from ubpdsl.prune.selectors import (
    BudgetError,
    _bed_engine_numpy,
    bed_select,
    bed_select_multi,
    blocks_to_mask,
    budget,
)


def _native_or_skip() -> None:
    if bed_native.forced_engine() == "numpy":
        pytest.skip("UBPDSL_BED_ENGINE=numpy")
    if bed_native.engine() != "native":
        pytest.skip(f"native BED engine unavailable: {bed_native.LOAD_ERROR}")


@pytest.fixture(scope="module")
def native():
    """The native engine, built (skip the test if it cannot be)."""
    _native_or_skip()


def _matrix(rng: np.random.Generator, shape: tuple[int, int], dist: str) -> np.ndarray:
    if dist == "ints":  # exact arithmetic and plenty of ties
        return rng.integers(0, 4, shape).astype(float)
    if dist == "gauss":
        return np.abs(rng.standard_normal(shape))
    if dist == "signed":  # any finite scores work, not only importances
        return rng.standard_normal(shape)
    if dist == "tiny":  # subnormal-sized sums and exact zeros
        return rng.integers(0, 3, shape) * 1e-310
    raise AssertionError(dist)


def _expected_mask(chosen: list[list[int]], R: int, C: int) -> np.ndarray:
    mask = np.zeros((R, C), bool)
    for c in range(C):
        mask[chosen[c], c] = True
    return mask


def _assert_same(got: list[tuple[np.ndarray, np.ndarray]], ref: list[tuple[np.ndarray, np.ndarray]]) -> None:
    assert len(got) == len(ref)
    for (gr, gc), (rr, rc) in zip(got, ref, strict=True):
        assert gr.dtype == np.int32 and gc.dtype == np.int32
        np.testing.assert_array_equal(gr, rr)
        np.testing.assert_array_equal(gc, rc)


single_cases = st.tuples(st.integers(1, 24), st.integers(1, 6), st.sampled_from([1, 2, 3, 4, 8])).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, t[1] * (t[0] // t[2])), st.integers(0, 2**32 - 1))
)


@settings(max_examples=300, deadline=None)
@given(single_cases, st.sampled_from(["ints", "gauss", "signed", "tiny"]))
def test_native_equals_numpy_and_textbook(native, case, dist):
    """R not a multiple of N, R < N, N = 1..8, m from 0 to the capacity."""
    (R, C, N), m, seed = case
    a = _matrix(np.random.default_rng(seed), (R, C), dist)
    got = bed_native.bed_native([a], m, N)
    assert got is not None
    _assert_same(got, _bed_engine_numpy([a], m, N))
    rows, cols = got[0]
    assert_valid(rows, cols, R, C, N, m)
    if dist in ("ints", "tiny"):  # exact sums: the paper's loop picks exactly these rows
        chosen = textbook_bed([a], m, N)[0]
        np.testing.assert_array_equal(blocks_to_mask(rows, cols, R, C, N), _expected_mask(chosen, R, C))


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 14), st.integers(1, 5)), min_size=1, max_size=4),
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 2**32 - 1),
    st.floats(0, 1),
    st.sampled_from(["ints", "gauss"]),
)
def test_native_multi_equals_numpy_and_textbook(native, dims, N, seed, frac, dist):
    """One budget shared by several layers (ties: earlier layer first)."""
    rng = np.random.default_rng(seed)
    mats = [_matrix(rng, d, dist) for d in dims]
    m = int(frac * sum(c * (r // N) for r, c in dims))
    got = bed_native.bed_native(mats, m, N)
    assert got is not None
    _assert_same(got, _bed_engine_numpy(mats, m, N))
    assert sum(len(r) for r, _ in got) == m
    if dist == "ints":
        chosen = textbook_bed(mats, m, N)
        for a, ch, (rows, cols) in zip(mats, chosen, got, strict=True):
            R, C = a.shape
            np.testing.assert_array_equal(blocks_to_mask(rows, cols, R, C, N), _expected_mask(ch, R, C))


@pytest.mark.parametrize("N", [1, 2, 4, 8])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_native_equals_numpy_on_larger_layers(native, N, sparsity):
    """Sizes where columns hold many chunks and picks land far apart."""
    rng = np.random.default_rng(N)
    a = np.abs(rng.standard_normal((301, 97)))
    b = np.round(np.abs(rng.laplace(size=(160, 40))), 1)  # some exact ties
    for sc in (a, b):
        m = budget(*sc.shape, N, sparsity)
        _assert_same(bed_native.bed_native([sc], m, N), _bed_engine_numpy([sc], m, N))
    m = budget(301, 97 + 40, N, sparsity) // 2
    _assert_same(bed_native.bed_native([a, b], m, N), _bed_engine_numpy([a, b], m, N))


def test_public_functions_dispatch_to_native(native):
    rng = np.random.default_rng(3)
    a = np.abs(rng.standard_normal((64, 20)))
    m = budget(64, 20, 4, 0.75)
    assert bed_native.engine() == "native"
    _assert_same([bed_select(a, m, 4)], _bed_engine_numpy([a], m, 4))
    b = np.abs(rng.standard_normal((32, 9)))
    _assert_same(bed_select_multi([a, b], 100, 4), _bed_engine_numpy([a, b], 100, 4))
    # validation is unchanged
    with pytest.raises(ValueError, match="NaN"):
        bed_select(np.full((8, 2), np.nan), 1, 2)
    with pytest.raises(BudgetError):
        bed_select(a, 20 * 16 + 1, 4)
    with pytest.raises(BudgetError):
        bed_select(np.ones((3, 4)), 1, 4)
    assert bed_select(np.ones((3, 4)), 0, 4)[0].size == 0
    assert bed_select(np.ones((0, 4)), 0, 2)[0].size == 0
    # the cached workspace can be dropped at any time; the next call allocates again
    bed_native.release_workspace()
    _assert_same([bed_select(a, m, 4)], _bed_engine_numpy([a], m, 4))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
def test_huge_scores_fall_back_to_numpy(native):
    """Scores whose window sums could overflow are declined by C and handled by numpy."""
    a = np.full((6, 2), 1e308)
    a[2, 1] = 0.0
    assert bed_native.bed_native([a], 2, 2) is None
    _assert_same([bed_select(a, 2, 2)], _bed_engine_numpy([a], 2, 2))


@pytest.fixture
def fresh_engine(monkeypatch):
    """Forget the loaded library for one test (monkeypatch restores it afterwards)."""
    monkeypatch.setattr(bed_native, "ENGINE", "unbuilt")
    monkeypatch.setattr(bed_native, "LOAD_ERROR", None)
    monkeypatch.setattr(bed_native, "_lib", None)
    monkeypatch.delenv("UBPDSL_BED_ENGINE", raising=False)


def test_fallback_when_the_build_fails(fresh_engine, monkeypatch, caplog):
    def no_zig():
        raise BuildError("zig not found: install the Python package 'ziglang'")

    monkeypatch.setattr(bed_native, "_build", no_zig)
    a = np.random.default_rng(5).integers(0, 4, (20, 7)).astype(float)
    with caplog.at_level("DEBUG", logger="ubpdsl.prune.bed_native"):
        rows, cols = bed_select(a, 12, 4)
    assert bed_native.ENGINE == "numpy"
    assert "zig not found" in bed_native.LOAD_ERROR
    assert "native BED engine unavailable" in caplog.text
    _assert_same([(rows, cols)], _bed_engine_numpy([a], 12, 4))
    # forcing the native engine now fails loudly instead of falling back
    monkeypatch.setenv("UBPDSL_BED_ENGINE", "native")
    with pytest.raises(BuildError, match="unavailable"):
        bed_select(a, 12, 4)


def test_fallback_when_the_library_does_not_load(fresh_engine, monkeypatch, tmp_path):
    bogus = tmp_path / "bed.so"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setattr(bed_native, "_build", lambda: bogus)
    assert bed_native.engine() == "numpy"
    assert "OSError" in bed_native.LOAD_ERROR


def test_engine_env_var(monkeypatch):
    monkeypatch.setenv("UBPDSL_BED_ENGINE", "numpy")
    assert bed_native.engine() == "numpy"
    a = np.random.default_rng(6).random((16, 5))
    _assert_same([bed_select(a, 10, 2)], _bed_engine_numpy([a], 10, 2))
    monkeypatch.setenv("UBPDSL_BED_ENGINE", "fast")
    with pytest.raises(ValueError, match="UBPDSL_BED_ENGINE"):
        bed_native.engine()
    monkeypatch.delenv("UBPDSL_BED_ENGINE")
    _native_or_skip()
    monkeypatch.setenv("UBPDSL_BED_ENGINE", "native")
    assert bed_native.engine() == "native"
