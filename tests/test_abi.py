"""The packed weight format (pack/unpack round trip, every corruption rejected) and the kernel
ABI (return codes from C via ctypes and under qemu: NULL blob, inconsistent header)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ubpdsl.language as ubl
from ubpdsl import abi
from ubpdsl import packing as pk
from ubpdsl.compiler import Problem, compile_kernel
from ubpdsl.errors import MaskError, PackError, RunError
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime import qemu
from ubpdsl.runtime.loader import HostKernel, aligned_empty

needs_qemu = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")
SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def layers(draw, max_m: int = 24, max_k: int = 10):
    """(M, K, N, rows, cols, weight, layout): a random valid unaligned block set."""
    N = draw(st.sampled_from([1, 2, 3, 4, 8]))
    M = draw(st.integers(N, max(N, max_m)))
    K = draw(st.integers(1, max_k))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    density = draw(st.sampled_from([0.0, 0.3, 1.0]))
    rows, cols = [], []
    for c in range(K):
        r = 0
        while r <= M - N:
            if rng.random() < density:
                rows.append(r)
                cols.append(c)
                r += N
            else:
                r += 1
    w = rng.standard_normal((M, K)).astype(np.float32)
    layout = draw(st.sampled_from(["plain", "rotated"]))
    return M, K, N, np.array(rows, np.int64), np.array(cols, np.int64), w, layout


def _same(a: pk.BlockData, b: pk.BlockData) -> None:
    assert (a.M, a.K, a.N, a.layout) == (b.M, b.K, b.N, b.layout)
    for f in ("row_ptr", "block_rows", "block_cols", "values"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))


@SETTINGS
@given(layer=layers())
def test_unpack_inverts_pack(layer):
    M, K, N, rows, cols, w, layout = layer
    data = pk.block_data(M, K, N, rows, cols, w, layout)
    blob = pk.pack(data)
    _same(pk.unpack(blob, M=M, K=K, N=N, layout=layout), data)
    _same(pk.unpack(blob.tobytes()), data)


def _fields(data: pk.BlockData) -> list[tuple[str, int]]:
    """(name, byte offset) of every int32 word of a blob whose corruption must be caught: the
    header, row_ptr, block_rows and the padding of block_cols."""
    offsets, _ = pk.section_offsets(data.M, data.N, data.num_blocks)
    B = data.num_blocks
    out = [(f, 4 * i) for i, f in enumerate(pk.HEADER_FIELDS)]
    out += [(f"row_ptr[{i}]", offsets["off_row_ptr"] + 4 * i) for i in range(data.M + data.N + 1)]
    out += [(f"block_rows[{i}]", offsets["off_block_rows"] + 4 * i) for i in range(B)]
    out += [(f"block_cols[{B + i}]", offsets["off_block_cols"] + 4 * (B + i)) for i in range(pk.COL_PAD)]
    return out


@SETTINGS
@given(layer=layers(), data=st.data())
def test_every_single_field_corruption_is_rejected(layer, data):
    """Any change of one header word, row_ptr or block_rows entry or padding column, and any
    block column moved outside [0, K), makes unpack raise PackError (never pass, never crash)."""
    M, K, N, rows, cols, w, layout = layer
    bd = pk.block_data(M, K, N, rows, cols, w, layout)
    blob = pk.pack(bd)
    _, off = data.draw(st.sampled_from(_fields(bd)), label="field")
    old = int(blob[off:off + 4].view("<i4")[0])
    delta = data.draw(st.sampled_from([1, -1, 64, -64, 1 << 20, -(1 << 31) - old]).filter(
        lambda d: -(1 << 31) <= old + d < (1 << 31) and d != 0), label="delta")
    bad = blob.copy()
    bad[off:off + 4] = np.array([old + delta], "<i4").view(np.uint8)
    with pytest.raises(PackError):
        pk.unpack(bad, M=M, K=K, N=N, layout=layout)
    if bd.num_blocks:
        b = data.draw(st.integers(0, bd.num_blocks - 1), label="block")
        col = data.draw(st.sampled_from([-1, K, K + 7, -(1 << 31)]), label="col")
        bad = blob.copy()
        o = pk.section_offsets(M, N, bd.num_blocks)[0]["off_block_cols"] + 4 * b
        bad[o:o + 4] = np.array([col], "<i4").view(np.uint8)
        with pytest.raises(PackError, match="block_cols"):
            pk.unpack(bad, M=M, K=K, N=N, layout=layout)


@pytest.mark.parametrize("cut", [0, 1, 47, 48, -1, -64])
def test_truncated_or_padded_blob_rejected(cut):
    w = np.ones((8, 4), np.float32)
    blob = pk.pack(pk.block_data(8, 4, 4, np.array([0, 3]), np.array([1, 2]), w, "plain"))
    bad = np.concatenate([blob, np.zeros(64, np.uint8)]) if cut == 0 else blob[:cut]
    with pytest.raises(PackError):
        pk.unpack(bad)


def test_unpack_messages_name_the_field():
    w = np.ones((8, 4), np.float32)
    blob = pk.pack(pk.block_data(8, 4, 4, np.array([0, 3]), np.array([1, 2]), w, "plain"))
    with pytest.raises(PackError, match="^w.bin: M is 8, expected 9$"):
        pk.unpack(blob, M=9, what="w.bin")
    with pytest.raises(PackError, match="layout is plain, expected rotated"):
        pk.unpack(blob, layout="rotated")
    with pytest.raises(PackError, match="1-D uint8"):
        pk.unpack(blob.view(np.int32))


@pytest.mark.parametrize("N", [0, 65, 9, 10**9])
def test_block_height_limits_checked_first(N, compile_cache):
    """N must be in 1..min(64, M): a 2x8 layer with N=10**9 fails at once, nothing is allocated."""
    M = 8
    w = np.zeros((M, 8), np.float32)
    with pytest.raises(MaskError, match="block height"):
        pk.block_data(M, 8, N, np.array([0]), np.array([0]), w, "plain")
    with pytest.raises(MaskError, match="block height"):
        compile_kernel(VARIANTS["wros"], Problem("big", M, 8, N, np.array([0]), np.array([0]), w), "host",
                       cache=compile_cache)


def test_abi_codes_are_public_and_stable():
    assert (abi.OK, abi.ERR_HEADER, abi.ERR_BAD_N, abi.ERR_NULL_WEIGHTS, abi.ERR_OUT_OF_BOUNDS,
            abi.ERR_BAD_BLOB, abi.ERR_BAD_EPILOGUE, abi.ERR_BAD_PIXELS) == (0, 1, 2, 3, 4, 5, 6, 7)
    assert set(abi.KERNEL_ERRORS) == {0, 1, 2, 3, 4, 5, 6, 7}
    assert abi.describe_error(99) == "unknown error code"
    defines = abi.c_return_code_defines()
    for code in abi.KERNEL_ERRORS:
        assert f" {code}  /* {abi.KERNEL_ERRORS[code]} */" in defines


# -- the kernels --------------------------------------------------------------------------------------

def _layer(seed: int = 3) -> Problem:
    rng = np.random.default_rng(seed)
    w = np.zeros((9, 5), np.float32)
    rows, cols = [0, 5, 2, 1], [0, 0, 3, 4]
    for r, c in zip(rows, cols, strict=True):
        w[r:r + 4, c] = rng.standard_normal(4)
    return Problem("abi", 9, 5, 4, np.array(rows), np.array(cols), w)


@pytest.mark.parametrize("variant", ["wros", "block_stream", "aligned_rows"])
def test_null_blob_returns_error_code_from_c(variant, compile_cache):
    """A data-driven kernel called with packed_w = NULL returns 3 (it used to segfault)."""
    p = _layer()
    if VARIANTS[variant].aligned:
        w = np.zeros((8, 5), np.float32)
        w[0:4, 1], w[4:8, 2] = 2.0, -3.0
        p = Problem("abi", 8, 5, 4, np.array([0, 4]), np.array([1, 2]), w)
    ck = compile_kernel(VARIANTS[variant], p, "host", cache=compile_cache)
    k = HostKernel(ck.so, ck.symbol, p.M, p.K)
    x = np.ones((p.K, 7), np.float32)
    y = aligned_empty((p.M, 7))
    assert k.call_raw(x, y, 7, None) == abi.ERR_NULL_WEIGHTS
    assert k.call_raw(x, y, -1, None) == abi.ERR_BAD_N
    assert k.call_raw(x, y, 7, ck.packed) == abi.OK
    np.testing.assert_allclose(y, p.weight @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(RunError, match="error code 3: packed_w is NULL"):
        k(x, None)


def test_baked_kernel_accepts_null(compile_cache):
    p = _layer()
    ck = compile_kernel(VARIANTS["wros_unrolled"], p, "host", cache=compile_cache)
    assert ck.packed is None
    x = np.arange(p.K * 3, dtype=np.float32).reshape(p.K, 3)
    np.testing.assert_allclose(ck(x), p.weight @ x, rtol=1e-5, atol=1e-5)


def test_kernel_checks_header_consistency(compile_cache):
    """Each header word changed: magic/version/M/K/N/layout give 1, B/offsets/total give 5."""
    p = _layer()
    ck = compile_kernel(VARIANTS["wros"], p, "host", cache=compile_cache)
    k = HostKernel(ck.so, ck.symbol, p.M, p.K)
    x = np.ones((p.K, 5), np.float32)
    y = aligned_empty((p.M, 5))
    want = {"magic": 1, "version": 1, "M": 1, "K": 1, "N": 1, "layout": 1}
    for i, field in enumerate(pk.HEADER_FIELDS):
        for delta in (64, -64, 1 << 24):
            bad = ck.packed.copy()
            words = bad[:pk.HEADER_BYTES].view("<i4")
            words[i] += delta
            rc = k.call_raw(x, y, 5, bad)
            assert rc == want.get(field, abi.ERR_BAD_BLOB), (field, delta, rc)


@needs_qemu
@pytest.mark.parametrize("target,bits", [("aarch64-neon", None), ("aarch64-sve", 256)])
def test_null_blob_under_qemu(target, bits, compile_cache):
    """The harness passes NULL for packed_len -1: the kernel returns 3, no crash."""
    p = _layer()
    ck = compile_kernel(VARIANTS["wros"], p, target, cache=compile_cache)
    x = np.ones((p.K, 17), np.float32)
    with pytest.raises(RunError, match="error code 3"):
        qemu.run_aarch64(ck.obj, ck.symbol, x, None, p.M, sve_bits=bits, cache=compile_cache)
    bad = ck.packed.copy()
    bad[pk.H_TOTAL_BYTES * 4] ^= 64
    with pytest.raises(RunError, match="error code 5"):
        qemu.run_aarch64(ck.obj, ck.symbol, x, bad, p.M, sve_bits=bits, cache=compile_cache)


# -- bounds-checked builds --------------------------------------------------------------------------

@ubl.kernel(layout="plain")
def one_row_past(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1):
    """A user mistake: the row loop runs one row past Y (the row is only known at run time)."""
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows + 1):
            ubl.store(Y, r, j, ubl.zeros(j))


@ubl.kernel(layout="plain")
def column_past(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1):
    """Reads X one row past each block's column (past X for a block in the last column)."""
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            lo, hi = W.row_blocks(r)
            acc = ubl.zeros(j)
            for b in range(lo, hi):
                acc += ubl.load(X, W.block_col(b) + 1, j)
            ubl.store(Y, r, j, acc)


@pytest.mark.parametrize("kernel", [one_row_past, column_past])
def test_out_of_bounds_returns_4_on_host(kernel, compile_cache):
    p = _layer()
    ck = compile_kernel(kernel, p, "host", check_bounds=True, cache=compile_cache)
    assert ck.manifest["check_bounds"] and "#define UBP_ABI_CHECK_BOUNDS 1" in ck.header.read_text()
    k = HostKernel(ck.so, ck.symbol, p.M, p.K)
    x = np.ones((p.K, 17), np.float32)
    guard = aligned_empty((p.M + 4, 17))  # y followed by 4 more rows that must stay untouched
    guard[...] = 7.0
    assert k.call_raw(x, guard[:p.M], 17, ck.packed) == abi.ERR_OUT_OF_BOUNDS
    assert (guard[p.M:] == 7.0).all()
    with pytest.raises(RunError, match="error code 4: out-of-bounds access"):
        ck(x)
    plain = compile_kernel(kernel, p, "host", cache=compile_cache)
    assert plain.so != ck.so and not plain.manifest["check_bounds"]


def test_corrupt_block_columns_caught_by_checked_build(compile_cache):
    """A blob whose block_cols point outside X: the checked kernel returns 4 (unpack rejects it too)."""
    p = _layer()
    ck = compile_kernel(VARIANTS["wros"], p, "host", check_bounds=True, constants={"PREFETCH": 0},
                        cache=compile_cache)
    bad = ck.packed.copy()
    off = pk.section_offsets(p.M, p.N, 4)[0]["off_block_cols"]
    bad[off:off + 4] = np.array([1 << 28], "<i4").view(np.uint8)
    with pytest.raises(PackError, match=r"block_cols\[0\]"):
        pk.unpack(bad)
    k = HostKernel(ck.so, ck.symbol, p.M, p.K)
    x = np.ones((p.K, 9), np.float32)
    assert k.call_raw(x, aligned_empty((p.M, 9)), 9, bad) == abi.ERR_OUT_OF_BOUNDS


@needs_qemu
@pytest.mark.parametrize("target,bits", [("aarch64-neon", None), ("aarch64-sve", 256)])
def test_out_of_bounds_under_qemu(target, bits, compile_cache):
    """Unchecked, the harness sees the write past y; checked, the kernel returns 4 and y's guard is intact."""
    p = _layer()
    x = np.ones((p.K, 17), np.float32)
    plain = compile_kernel(one_row_past, p, target, cache=compile_cache)
    with pytest.raises(RunError, match="wrote past the end of y"):
        plain(x, sve_bits=bits)
    checked = compile_kernel(one_row_past, p, target, check_bounds=True, cache=compile_cache)
    with pytest.raises(RunError, match="error code 4"):
        checked(x, sve_bits=bits)
