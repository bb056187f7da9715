"""The pattern (PatDNN) direct-convolution kernels against torch's conv2d, and the pattern blob format.

Property tests draw random pattern layers (odd and tiny images, rows narrower than one tile,
kernels removed by connectivity pruning, empty filters, random libraries up to all 56 patterns)
and compare ``pattern_direct`` with ``torch.nn.functional.conv2d`` (3x3, stride 1, padding 1)
on the host and under qemu for NEON and SVE (128 and 512 bits). Bad blobs are one-line
``PackError``s from :func:`ubpdsl.packing.unpack_pattern` and error codes from the kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl import abi
from ubpdsl.compiler import PatternProblem, compile_kernel, random_pattern_problem
from ubpdsl.errors import DSLError, MaskError, PackError, RunError
from ubpdsl.kernels import PATTERN_VARIANTS, VARIANTS
from ubpdsl.packing import pack_pattern, pattern_data, unpack_pattern
from ubpdsl.prune.scheme_masks import PatternMask
from ubpdsl.runtime import qemu

KERNEL = PATTERN_VARIANTS["pattern_direct"]
needs_qemu = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")


def _reference(problem: PatternProblem, x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x.reshape(1, problem.K, problem.height, problem.width))
    y = F.conv2d(xt, torch.from_numpy(problem.weight), padding=1)
    return y.numpy().reshape(problem.M, problem.pixels)


def _check(problem: PatternProblem, target: str, cache, constants=None, sve_bits=None, seed=0) -> None:
    k = compile_kernel(KERNEL, problem, target, constants=constants, cache=cache)
    assert k.symbol == abi.pattern_symbol(problem.name)
    x = np.random.default_rng(seed).standard_normal((problem.K, problem.pixels)).astype(np.float32)
    y = k(x, sve_bits=sve_bits)
    np.testing.assert_allclose(y, _reference(problem, x), rtol=1e-4, atol=1e-4)


@st.composite
def pattern_problems(draw):
    cout = draw(st.integers(1, 12))
    cin = draw(st.integers(1, 10))
    h = draw(st.sampled_from([1, 2, 3, 5, 7, 8, 13]))
    w = draw(st.sampled_from([1, 2, 3, 4, 5, 9, 16, 17, 31]))
    removed = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    patterns = draw(st.sampled_from([1, 3, 8, 56]))
    seed = draw(st.integers(0, 2**31 - 1))
    return random_pattern_problem(cout, cin, h, w, removed=removed, num_patterns=patterns, seed=seed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(problem=pattern_problems(), tile=st.sampled_from([1, 2, 4]), unroll=st.sampled_from([1, 2]),
       rows=st.sampled_from([1, 2, 4, 8]), filters_outer=st.booleans())
def test_host_matches_torch(problem, tile, unroll, rows, filters_outer, compile_cache):
    _check(problem, "host", compile_cache,
           {"TILE": tile, "UNROLL": unroll, "ROWS": rows, "FILTERS_OUTER": filters_outer})


@needs_qemu
@pytest.mark.parametrize("target,sve_bits", [("aarch64-neon", None), ("aarch64-sve", 128), ("aarch64-sve", 512)])
@pytest.mark.parametrize("shape,tile,rows", [((6, 5, 7, 9), 1, 4), ((4, 3, 2, 3), 2, 1), ((9, 7, 5, 21), 2, 2)])
def test_aarch64_matches_torch(target, sve_bits, shape, tile, rows, compile_cache):
    problem = random_pattern_problem(*shape, removed=0.3, seed=sum(shape))
    _check(problem, target, compile_cache, {"TILE": tile, "ROWS": rows}, sve_bits=sve_bits)


def test_from_pattern_mask_matches_torch(compile_cache):
    """A PatternMask (the pruner's output type) with its weights: removed kernels and all ids."""
    rng = np.random.default_rng(3)
    from ubpdsl.prune.pattern import pattern_masks

    w = rng.standard_normal((10, 6, 3, 3)).astype(np.float32)
    mask, ids, library = pattern_masks(np.abs(w), 0.8)
    pm = PatternMask("conv1", (10, 6, 3, 3), library, ids)
    problem = PatternProblem.from_mask(pm, w * mask, 6, 11)
    assert (pm.ids == -1).any()
    _check(problem, "host", compile_cache)


def test_pack_roundtrip_and_grouping():
    problem = random_pattern_problem(16, 9, 4, 4, removed=0.4, seed=5)
    data = problem.pattern_data()
    back = unpack_pattern(pack_pattern(data), M=16, K=9, library=problem.taps())
    np.testing.assert_array_equal(back.dense(), problem.weight)
    # filters with the same pattern signature are neighbours, the most kernels first
    P = data.num_patterns
    counts = np.diff(data.group_ptr).reshape(16, P)
    totals = counts.sum(axis=1)
    assert (np.diff(totals) <= 0).all()
    sig = [tuple(c) for c in counts]
    assert all(sig.index(s) == i or sig[i - 1] == s for i, s in enumerate(sig))
    assert sorted(data.filter_order.tolist()) == list(range(16))


def _corrupt(blob: np.ndarray, word: int, value: int) -> np.ndarray:
    bad = blob.copy()
    bad[4 * word: 4 * word + 4] = np.array([value], "<i4").view(np.uint8)
    return bad


@pytest.mark.parametrize("word,value,message", [
    (0, 0x31504255, "magic"), (1, 2, "version"), (2, 99, "M is 99"), (4, 0, "P is 0"), (5, 3, "T is 3"),
    (6, 1 << 30, "NK"), (8, 65, "off_filter_order"), (12, 7, "total_bytes"),
])
def test_bad_blob_header_is_one_line_error(word, value, message):
    problem = random_pattern_problem(5, 4, 3, 3, seed=1)
    blob = pack_pattern(problem.pattern_data())
    with pytest.raises(PackError, match=message) as exc:
        unpack_pattern(_corrupt(blob, word, value), M=5, K=4)
    assert "\n" not in str(exc.value)


def test_bad_blob_content_is_one_line_error():
    problem = random_pattern_problem(5, 4, 3, 3, removed=0.0, seed=1)
    data = problem.pattern_data()
    blob = pack_pattern(data)
    cases = {
        "kernel_chan": (data.num_kernels and 0, 100),
        "filter_order": (0, 3),
        "library": (0, 9),
    }
    from ubpdsl.packing import pattern_section_offsets

    offsets, _ = pattern_section_offsets(5, data.num_patterns, 4, data.num_kernels)
    for field, (index, value) in cases.items():
        bad = blob.copy()
        at = offsets[f"off_{field}"] + 4 * index
        bad[at: at + 4] = np.array([value], "<i4").view(np.uint8)
        with pytest.raises(PackError, match=field) as exc:
            unpack_pattern(bad)
        assert "\n" not in str(exc.value)
    with pytest.raises(PackError, match="truncated"):
        unpack_pattern(blob[:-4])
    with pytest.raises(PackError, match="library differs"):
        unpack_pattern(blob, library=np.roll(problem.taps(), 1, axis=0))


def test_kernel_rejects_bad_blob_and_pixels(compile_cache):
    problem = random_pattern_problem(5, 4, 3, 3, seed=2)
    k = compile_kernel(KERNEL, problem, "host", cache=compile_cache)
    x = np.ones((4, 9), np.float32)
    from ubpdsl.runtime.loader import HostKernel

    host = HostKernel(k.so, k.symbol, 5, 4)
    y = np.full((5, 9), 7.0, np.float32)
    good = k.packed
    other = random_pattern_problem(5, 4, 3, 3, seed=99)  # another library: the kernel's is compiled in
    for blob, n, code in [(None, 9, abi.ERR_NULL_WEIGHTS), (_corrupt(good, 0, 1), 9, abi.ERR_HEADER),
                          (_corrupt(good, 6, 3), 9, abi.ERR_BAD_BLOB), (good, 8, abi.ERR_BAD_PIXELS),
                          (pack_pattern(other.pattern_data()), 9, abi.ERR_HEADER), (good, -1, abi.ERR_BAD_N)]:
        assert host.call_raw(x, y, n, blob) == code
        assert (y == 7.0).all()  # nothing written on a rejected call
    assert host.call_raw(x, y, 9, good) == abi.OK
    with pytest.raises(RunError):
        k(np.ones((4, 8), np.float32))


def test_kernel_kind_mismatch_is_an_error(compile_cache):
    from ubpdsl.compiler import random_problem

    with pytest.raises(DSLError, match="pattern layer"):
        compile_kernel(VARIANTS["wros"], random_pattern_problem(4, 4, 3, 3), "host", cache=compile_cache)
    with pytest.raises(DSLError, match="PatternSparse"):
        compile_kernel(KERNEL, random_problem(8, 8, 2, 0.5), "host", cache=compile_cache)


def test_bad_pattern_input_is_mask_error():
    problem = random_pattern_problem(4, 4, 3, 3)
    with pytest.raises(MaskError, match="pattern id"):
        pattern_data(problem.library, np.full((4, 4), 9, np.int16), problem.weight)
    with pytest.raises(MaskError, match="image height"):
        PatternProblem("c", 4, 4, 0, 3, problem.library, problem.ids, problem.weight).check()


def test_tune_pattern_host_and_neon():
    """The tuner measures every feasible point, checks each output, and picks the cheapest."""
    from ubpdsl.autotune.pattern import pattern_space, tune_pattern

    problem = random_pattern_problem(4, 3, 2, 3, seed=4)
    res = tune_pattern(problem, "host", min_time=0.02)
    bits = max(res.best.target.vector_bits, res.best_vector_bits)
    points, skipped = pattern_space(KERNEL, problem, bits // 32)
    # every feasible point, plus the defaults (the 1.0x reference); wide tiles skipped on a 9-pixel row
    assert {f"pattern_direct {p} {bits}-bit" for p in points} <= set(res.costs) and skipped
    assert res.best_cost == min(res.costs.values()) <= res.default_cost
    if qemu.qemu_available():
        neon = tune_pattern(problem, "aarch64-neon")
        assert neon.unit == "insns" and neon.best_cost == min(neon.costs.values())
