"""Every shipped kernel variant against a numpy reference: host natively, NEON and SVE under qemu.

Property tests draw random shapes and random *unaligned* block sets (M not a multiple of N,
blocks touching the last row, empty rows and columns, all-zero and fully dense W, n not a
multiple of the vector width, n = 1) and compare Y = W @ X with numpy at rtol 1e-5. Each
variant also runs as a bounds-checked build (check_bounds=True): same results, no false alarm.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl.compiler import Problem, compile_kernel
from ubpdsl.errors import MaskError, RunError
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime import qemu

RTOL = 1e-5


@st.composite
def problems(draw, aligned: bool = False, max_m: int = 40, max_k: int = 24):
    """A random layer with non-overlapping N x 1 blocks at arbitrary (or aligned) rows."""
    N = draw(st.sampled_from([1, 2, 4, 8]))
    M = draw(st.integers(N, max(N, max_m)))
    K = draw(st.integers(1, max_k))
    kind = draw(st.sampled_from(["random", "random", "random", "empty", "dense", "last_row"]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rows, cols = [], []
    for c in range(K):
        if kind == "empty":
            continue
        if kind == "dense":
            starts = list(range(0, M - N + 1, N))
        elif kind == "last_row":
            starts = [M - N] if not aligned or (M - N) % N == 0 else []
        else:
            density = rng.random()
            starts, r = [], 0
            while r <= M - N:
                if rng.random() < density and (not aligned or r % N == 0):
                    starts.append(r)
                    r += N
                else:
                    r += 1
        rows += starts
        cols += [c] * len(starts)
    w = np.zeros((M, K), np.float32)
    for r, c in zip(rows, cols, strict=True):
        w[r:r + N, c] = rng.standard_normal(N).astype(np.float32)
    n = draw(st.sampled_from([1, 2, 3, 15, 16, 17, 33, 64, 65, 100, 129]))
    x = rng.standard_normal((K, n)).astype(np.float32)
    return Problem(f"p{M}x{K}", M, K, N, np.array(rows, np.int32), np.array(cols, np.int32), w), x


def _check(variant: str, problem: Problem, x: np.ndarray, target: str, cache, sve_bits=None, **kw) -> None:
    ck = compile_kernel(VARIANTS[variant], problem, target, cache=cache, **kw)
    y = ck(x, sve_bits=sve_bits)
    ref = problem.weight.astype(np.float64) @ x.astype(np.float64)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * (np.abs(problem.weight) @ np.abs(x)).max(initial=1.0))


SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                             HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("check_bounds", [False, True])
@pytest.mark.parametrize("variant", ["block_stream", "wros", "wros_unrolled"])
@SETTINGS
@given(case=problems())
def test_host_unaligned(variant, check_bounds, case, compile_cache):
    problem, x = case
    _check(variant, problem, x, "host", compile_cache, check_bounds=check_bounds)


@pytest.mark.parametrize("check_bounds", [False, True])
@SETTINGS
@given(case=problems(aligned=True), knobs=st.sampled_from([{}, {"PANEL": 8, "PREFETCH": 3}, {"PANEL": 5},
                                                                 {"PANEL": 8, "YPREFETCH": 3}, {"YPREFETCH": 16}]))
def test_host_aligned_kernel(case, knobs, check_bounds, compile_cache):
    problem, x = case
    _check("aligned_rows", problem, x, "host", compile_cache, constants=knobs, check_bounds=check_bounds)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(case=problems())
def test_host_mask_specialised_wros(case, compile_cache):
    """The data-driven variants compiled with the mask baked in (constant globals)."""
    problem, x = case
    _check("wros", problem, x, "host", compile_cache, specialize=True)


AARCH64 = [("aarch64-neon", None), ("aarch64-sve", 128), ("aarch64-sve", 256), ("aarch64-sve", 512)]
needs_qemu = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")


@needs_qemu
@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_aarch64_under_qemu(variant, data, compile_cache):
    problem, x = data.draw(problems(aligned=VARIANTS[variant].aligned, max_m=24, max_k=12))
    for target, bits in AARCH64:
        knobs = {"PANEL": 4, "PREFETCH": 2, "YPREFETCH": 3} if variant == "wros" and bits in (256, 512) else None
        _check(variant, problem, x, target, compile_cache, sve_bits=bits, constants=knobs)


@needs_qemu
@pytest.mark.parametrize("variant,knobs", [("block_stream", None), ("wros", None),
                                           ("wros", {"PANEL": 4, "PREFETCH": 2, "YPREFETCH": 3}),
                                           ("wros_unrolled", None), ("aligned_rows", {"PANEL": 8})])
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_aarch64_bounds_checked_under_qemu(variant, knobs, data, compile_cache):
    """Every shipped variant built with check_bounds gives exact results on NEON and SVE (256 bits)."""
    problem, x = data.draw(problems(aligned=VARIANTS[variant].aligned, max_m=24, max_k=12))
    for target, bits in (("aarch64-neon", None), ("aarch64-sve", 256)):
        _check(variant, problem, x, target, compile_cache, sve_bits=bits, constants=knobs, check_bounds=True)


def test_edge_cases_host(compile_cache):
    """Named corner cases, deterministic: M < vector width, N = M, a single block at the last row."""
    rng = np.random.default_rng(7)
    for M, K, N, rows, cols in [(4, 1, 4, [0], [0]), (9, 3, 8, [1], [2]), (5, 2, 2, [3, 0], [0, 1]),
                                (3, 2, 1, [0, 1, 2], [1, 1, 1])]:
        w = np.zeros((M, K), np.float32)
        for r, c in zip(rows, cols, strict=True):
            w[r:r + N, c] = rng.standard_normal(N)
        p = Problem("edge", M, K, N, np.array(rows), np.array(cols), w)
        for n in (1, 16, 17):
            x = rng.standard_normal((K, n)).astype(np.float32)
            for v in ("block_stream", "wros", "wros_unrolled"):
                _check(v, p, x, "host", compile_cache)


def test_invalid_blocks_are_rejected(compile_cache):
    w = np.zeros((8, 4), np.float32)
    outside = Problem("bad", 8, 4, 4, np.array([6]), np.array([0]), w)
    with pytest.raises(MaskError, match="block 0 .*outside"):
        compile_kernel(VARIANTS["wros"], outside, "host", cache=compile_cache)
    overlap = Problem("bad", 8, 4, 4, np.array([0, 2]), np.array([1, 1]), w)
    with pytest.raises(MaskError, match="overlap"):
        compile_kernel(VARIANTS["wros"], overlap, "host", cache=compile_cache)
    unaligned = Problem("bad", 8, 4, 4, np.array([1]), np.array([1]), w)
    with pytest.raises(MaskError, match="not a multiple of N=4"):
        compile_kernel(VARIANTS["aligned_rows"], unaligned, "host", cache=compile_cache)
    wrong_dtype = Problem("bad", 8, 4, 4, np.array([0]), np.array([1]), w.astype(np.float64))
    with pytest.raises(MaskError, match="float32"):
        compile_kernel(VARIANTS["wros"], wrong_dtype, "host", cache=compile_cache)


def test_kernel_checks_packed_header(compile_cache):
    """A blob packed for another shape makes the kernel return error 1, reported as RunError."""
    rng = np.random.default_rng(3)
    w = np.zeros((8, 4), np.float32)
    w[0:4, 1] = rng.standard_normal(4)
    ck = compile_kernel(VARIANTS["wros"], Problem("a", 8, 4, 4, np.array([0]), np.array([1]), w), "host",
                        cache=compile_cache)
    other = compile_kernel(VARIANTS["block_stream"], Problem("a", 8, 4, 4, np.array([0]), np.array([1]), w),
                           "host", cache=compile_cache)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    ck.packed = other.packed  # plain layout where the kernel expects rotated
    with pytest.raises(RunError, match="error code 1"):
        ck(x)


def test_cache_hit_and_data_driven_reuse(compile_cache):
    """A data-driven kernel depends on the shape only: a new mask of the same shape is a cache hit."""
    rng = np.random.default_rng(5)
    w1 = np.zeros((8, 4), np.float32)
    w1[0:4, 0] = rng.standard_normal(4)
    w2 = np.zeros((8, 4), np.float32)
    w2[3:7, 2] = rng.standard_normal(4)
    a = compile_kernel(VARIANTS["wros"], Problem("c", 8, 4, 4, np.array([0]), np.array([0]), w1), "host",
                       constants={"TILE": 3}, cache=compile_cache)
    b = compile_kernel(VARIANTS["wros"], Problem("c", 8, 4, 4, np.array([3]), np.array([2]), w2), "host",
                       constants={"TILE": 3}, cache=compile_cache)
    assert b.cache_hit and a.so == b.so
    x = rng.standard_normal((4, 9)).astype(np.float32)
    np.testing.assert_allclose(b(x), w2 @ x, rtol=RTOL, atol=1e-6)


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=problems(), pf=st.sampled_from([0, 1, 5, 16]), stream=st.booleans(), unroll=st.sampled_from([1, 3]),
       panel=st.sampled_from([0, 1, 4, 8, 13]), ypf=st.sampled_from([0, 1, 4, 40]), check_bounds=st.booleans())
def test_host_wros_knobs(case, pf, stream, unroll, panel, ypf, check_bounds, compile_cache):
    """Every wros knob keeps results exact: look-ahead prefetch (padded block_cols), streaming
    stores, unroll, row panels (the walk restarts N rows early at every panel) and write-prefetch
    of Y rows ahead (clamped to the last row, also past M)."""
    problem, x = case
    _check("wros", problem, x, "host", compile_cache,
           constants={"PREFETCH": pf, "STREAM": stream, "UNROLL": unroll, "TILE": 2, "PANEL": panel,
                      "YPREFETCH": ypf}, check_bounds=check_bounds)


@pytest.mark.parametrize("variant", ["wros", "aligned_rows"])
def test_prefetch_beyond_the_padding_stays_in_bounds(variant, compile_cache):
    """PREFETCH larger than the block_cols padding looks only W.lookahead blocks ahead: a
    bounds-checked build finds no access past the blob and the result is exact."""
    rng = np.random.default_rng(11)
    M, K, N = 16, 6, 4
    w = np.zeros((M, K), np.float32)
    rows, cols = np.array([0, 4, 8, 12, 0, 12]), np.array([0, 1, 2, 3, 4, 5])
    for r, c in zip(rows, cols, strict=True):
        w[r:r + N, c] = rng.standard_normal(N)
    x = rng.standard_normal((K, 33)).astype(np.float32)
    _check(variant, Problem("pf", M, K, N, rows, cols, w), x, "host", compile_cache,
           constants={"PREFETCH": 40}, check_bounds=True)


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(case=problems(), bits=st.sampled_from([128, 256]))
def test_host_narrower_vectors(case, bits, compile_cache):
    """vector_bits=128/256 on an AVX-512 host: SSE/AVX2-width code, same results."""
    problem, x = case
    _check("wros", problem, x, "host", compile_cache, vector_bits=bits)


def test_vector_bits_rejected_where_illegal(compile_cache):
    from ubpdsl.errors import TargetError

    p = Problem("v", 8, 4, 4, np.array([0]), np.array([1]), np.eye(8, 4, dtype=np.float32) * 0)
    for target, bits in (("aarch64-sve", 256), ("aarch64-neon", 256), ("host", 96), ("host", 4096)):
        with pytest.raises(TargetError, match="vector"):
            compile_kernel(VARIANTS["wros"], p, target, vector_bits=bits, cache=compile_cache)


@needs_qemu
@pytest.mark.parametrize("tile", [3, 6])
def test_non_power_of_two_tiles_and_narrow_tails(tile, compile_cache):
    """TILE=3/6 (2-D vector tiles) on the host and NEON, with n hitting every tail width (masked
    below one tile, narrow overlapped tails above); on SVE a non-power-of-two tile is a DSLError."""
    from ubpdsl.errors import DSLError

    rng = np.random.default_rng(tile)
    M, K, N = 37, 13, 4
    w = rng.standard_normal((M, K)).astype(np.float32)
    rows, cols = [], []
    for c in range(K):
        r = int(rng.integers(0, 3))
        while r <= M - N:
            rows.append(r)
            cols.append(c)
            r += N + int(rng.integers(0, 4))
    wm = np.zeros_like(w)
    for r, c in zip(rows, cols, strict=True):
        wm[r:r + N, c] = w[r:r + N, c]
    problem = Problem("p", M, K, N, np.array(rows, np.int32), np.array(cols, np.int32), wm)
    for n in (3, 4 * tile - 1, 4 * tile + 1, 4 * tile + 5, 8 * tile + 9, 49):
        x = rng.standard_normal((K, n)).astype(np.float32)
        for target in ("host", "aarch64-neon"):
            _check("wros", problem, x, target, compile_cache, constants={"TILE": tile, "PREFETCH": 2})
    with pytest.raises(DSLError, match="power of two"):
        compile_kernel(VARIANTS["wros"], problem, "aarch64-sve", cache=compile_cache, constants={"TILE": tile})
