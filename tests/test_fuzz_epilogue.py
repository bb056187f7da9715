"""Fuzz: the ``ubp_epilogue`` struct (ubpdsl.abi owns it) against the real kernels on the host.

Every variant's ``_ep`` entry point gets structs with any version and flag word, NULL or real
bias / residual pointers, and clamp bounds that are infinite, crossed (lo > hi) or NaN. A struct
this version does not know (version != UBP_EPILOGUE_VERSION or an unknown flag bit) must return
ERR_BAD_EPILOGUE (code 6) with y untouched, and so must a clamp with a NaN bound (its compares
would skip it: a silent wrong result, found by this fuzzer); any other must compute torch's
``clamp(W x + bias + residual, lo, hi)`` (the clamp only with UBP_EP_CLAMP) -- no silent wrong
result -- and never write outside y (canaries on both sides).
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from fuzz_support import record, report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_epilogue import torch_reference

from ubpdsl import abi
from ubpdsl.compiler import compile_kernel, random_problem
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime.loader import HostKernel

GUARD = 64  # canary floats on each side of y
CANARY = np.float32(-12345.5)
U32 = st.one_of(st.sampled_from([0, 1, 2, 3, abi.EPILOGUE_VERSION, 0x80000000, 0xFFFFFFFF]),
                st.integers(0, 2**32 - 1))
BOUND = st.sampled_from([float("-inf"), float("inf"), float("nan"), 0.0, 6.0, -0.5, 0.75, -3.0, 1e30])


@pytest.fixture(scope="module")
def kernels(compile_cache):
    """One host kernel per variant (a ragged layer: M, K not multiples of the block)."""
    out = {}
    for name, variant in VARIANTS.items():
        problem = random_problem(20, 12, 4, 0.5, seed=7, aligned=variant.aligned)
        ck = compile_kernel(variant, problem, "host", cache=compile_cache)
        out[name] = (problem, ck, HostKernel(ck.so, ck.symbol, ck.M, ck.K, epilogue=True))
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=U32, flags=U32, use_bias=st.booleans(), use_res=st.booleans(), lo=BOUND, hi=BOUND,
       n=st.sampled_from([1, 3, 8, 17, 33]), seed=st.integers(0, 2**16))
def test_fuzz_epilogue_struct(kernels, variant, version, flags, use_bias, use_res, lo, hi, n, seed):
    problem, ck, host = kernels[variant]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((ck.K, n)).astype(np.float32)
    bias = rng.standard_normal(ck.M).astype(np.float32) if use_bias else None
    res = rng.standard_normal((ck.M, n)).astype(np.float32) if use_res else None
    framed = np.full(ck.M * n + 2 * GUARD, CANARY, np.float32)
    y = framed[GUARD:GUARD + ck.M * n].reshape(ck.M, n)
    y[...] = 7.0
    raw = abi.pack_epilogue(0 if bias is None else bias.ctypes.data, 0 if res is None else res.ctypes.data,
                            lo, hi, version=version, flags=flags)
    ep = ctypes.create_string_buffer(raw, len(raw))
    rc = host.call_ep_raw(x, y, n, ck.packed, ep)
    case = f"{variant} version={version} flags={flags:#x} bias={use_bias} res={use_res} lo={lo} hi={hi} n={n}"
    why = None
    known = version == abi.EPILOGUE_VERSION and not flags & ~abi.EP_KNOWN_FLAGS and not (
        flags & abi.EP_CLAMP and (np.isnan(lo) or np.isnan(hi)))  # a NaN bound is refused
    if (framed[:GUARD] != CANARY).any() or (framed[GUARD + ck.M * n:] != CANARY).any():
        why = "wrote outside y"
    elif not known:
        if rc != abi.ERR_BAD_EPILOGUE:
            why = f"returned {rc} for an unknown struct, not ERR_BAD_EPILOGUE"
        elif (y != 7.0).any():
            why = "refused the struct but wrote y"
    elif rc != abi.OK:
        why = f"returned {rc} ({abi.describe_error(rc)}) for a valid struct"
    else:
        ref = torch_reference(problem.weight, x, bias, res, (lo, hi) if flags & abi.EP_CLAMP else None)
        scale = float((np.abs(problem.weight) @ np.abs(x)).max(initial=1.0)) + 4
        if not np.allclose(y, ref, rtol=1e-5, atol=1e-5 * scale, equal_nan=True):
            bad = ~np.isclose(y, ref, rtol=1e-5, atol=1e-5 * scale, equal_nan=True)
            why = f"wrong result: {int(bad.sum())} of {y.size} values (e.g. {y[bad][0]} vs {ref[bad][0]})"
    record("epilogue struct", case, why)
    assert why is None, f"{case}: {why}"


def test_zz_epilogue_fuzz_summary():
    print(report("epilogue struct"))
