"""The qemu counting plugin: hand-written AArch64 functions with known counts, and kernels'
FMA counts against the analytical count (blocks x N x vector registers per row of n)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ubpdsl.benchsuite import make_case
from ubpdsl.compiler import compile_kernel
from ubpdsl.errors import BuildError
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime import qemu
from ubpdsl.runtime.insncount import count_call
from ubpdsl.runtime.toolchain import run_tool, zig_cmd

pytestmark = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed")

# A loop of ITER iterations; per iteration: 3 loads, 2 FMAs, 1 store, 1 prefetch, 2 other.
# Outside the loop: 1 other before, 2 after (mov, ret).
NEON_SRC = """
    .text
    .globl ubp_t
    .type ubp_t, %function
ubp_t:
    mov x4, #{iters}
1:  ldr q0, [x0]
    ldp q1, q2, [x0]
    ld1 {{v5.4s}}, [x0]
    fmla v1.4s, v0.4s, v0.4s
    fmadd s3, s0, s0, s3
    prfm pldl1keep, [x0, #64]
    str q1, [x1]
    subs x4, x4, #1
    b.ne 1b
    mov w0, #0
    ret
    .size ubp_t, .-ubp_t
"""

# SVE: per iteration 2 loads (ld1w, ld1rw), 2 FMAs (fmla, fmad), 2 stores (st1w, stp), 2 prefetches
# (prfw, prfm), 3 other (ptrue, subs, b.ne); 1 other before, 2 after.
SVE_SRC = """
    .arch armv8.2-a+sve
    .text
    .globl ubp_t
    .type ubp_t, %function
ubp_t:
    mov x4, #{iters}
1:  ptrue p0.s, vl4
    ld1w {{z0.s}}, p0/z, [x0]
    ld1rw {{z1.s}}, p0/z, [x0]
    fmla z1.s, p0/m, z0.s, z0.s
    fmad z1.s, p0/m, z0.s, z0.s
    prfw pldl1keep, p0, [x0, #1, mul vl]
    prfm pstl1keep, [x1]
    st1w {{z1.s}}, p0, [x1]
    stp xzr, xzr, [sp, #-16]
    subs x4, x4, #1
    b.ne 1b
    mov w0, #0
    ret
    .size ubp_t, .-ubp_t
"""


def _object(tmp_path, src: str) -> str:
    path = tmp_path / "t.S"
    path.write_text(src)
    obj = tmp_path / "t.o"
    run_tool([*zig_cmd(), "cc", "-target", "aarch64-linux-musl", "-c", "-o", str(obj), str(path)], what="zig cc")
    return obj


@pytest.mark.parametrize("iters", [1, 7, 300])
def test_neon_hand_written_counts(tmp_path, iters, compile_cache):
    obj = _object(tmp_path, NEON_SRC.format(iters=iters))
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    counts, y = count_call(obj, "ubp_t", x, None, 1, cache=compile_cache)
    assert (counts.fma, counts.load, counts.store, counts.prefetch) == (2 * iters, 3 * iters, iters, iters)
    assert counts.other == 2 * iters + 3
    assert counts.total == 9 * iters + 3
    np.testing.assert_array_equal(y[0], x[0] * x[0] + x[0])  # v1 = x + x*x (fmla onto the x that ldp loaded)


@pytest.mark.parametrize("bits", [128, 512])
def test_sve_hand_written_counts(tmp_path, bits, compile_cache):
    iters = 5
    obj = _object(tmp_path, SVE_SRC.format(iters=iters))
    x = np.ones((1, 4), np.float32)
    counts, _ = count_call(obj, "ubp_t", x, None, 1, sve_bits=bits, cache=compile_cache)
    assert (counts.fma, counts.load, counts.store, counts.prefetch, counts.other) == (
        2 * iters, 2 * iters, 2 * iters, 2 * iters, 3 * iters + 3)


def test_unknown_symbol_is_an_error(tmp_path, compile_cache):
    obj = _object(tmp_path, NEON_SRC.format(iters=1))
    with pytest.raises(BuildError):
        count_call(obj, "ubp_nope", np.ones((1, 4), np.float32), None, 1, cache=compile_cache)


@pytest.mark.parametrize(("variant", "target", "bits"), [
    ("wros", "aarch64-neon", None), ("aligned_rows", "aarch64-neon", None),
    ("wros", "aarch64-sve", 128), ("wros", "aarch64-sve", 512),
])
def test_kernel_fma_count_is_analytical(variant, target, bits, compile_cache):
    M, K, n, N, tile = 48, 24, 100, 4, 2
    w = np.random.default_rng(3).standard_normal((M, K)).astype(np.float32)
    case = make_case("t", "t", w, n, N, 0.75, "random")
    problem = case.aligned if variant == "aligned_rows" else case.unaligned
    ck = compile_kernel(VARIANTS[variant], problem, target, constants={"TILE": tile}, cache=compile_cache)
    counts, y = count_call(ck.obj, ck.symbol, case.x, ck.packed, M, sve_bits=bits, cache=compile_cache)
    lanes = (bits or 128) // 32
    # n is covered by whole tiles of TILE registers, then the tail: on NEON just enough registers
    # (a power of two) ending at n, on SVE a whole tile ending at n (overlapping the previous one)
    full, rem = divmod(n, tile * lanes)
    if target == "aarch64-neon" and rem:
        tail = 1 << max(0, math.ceil(math.log2(math.ceil(rem / lanes))))
    else:
        tail = tile * (rem > 0)
    registers = full * tile + tail
    assert counts.fma == len(problem.rows) * N * registers
    np.testing.assert_allclose(y, problem.weight @ case.x, rtol=1e-4, atol=1e-4)
