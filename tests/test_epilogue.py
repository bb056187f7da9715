"""Fused epilogues (``<kernel>_ep``): y = clamp(W x + bias + residual, lo, hi) against torch.

Every shipped variant, for each epilogue (bias only, ReLU, ReLU6, residual, all three), on random
unaligned layers with n not a multiple of the vector width (masked and overlapped tails): on the
host (plain and bounds-checked builds) and under qemu on NEON and SVE. Also: the plain entry
point is unchanged by the epilogue build, a NULL ``ep`` is the plain result, a bad struct is
``UBP_ERR_BAD_EPILOGUE`` with y untouched, a C program built against the generated header calls
``_ep``, and a user kernel that accumulates in Y without marking partial stores gets no ``_ep``.
"""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_kernels import problems

import ubpdsl.language as ubl
from ubpdsl import abi
from ubpdsl.compiler import Problem, compile_kernel, random_problem
from ubpdsl.errors import DSLError, UbpError
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime import qemu

RTOL = 1e-5
#: name -> (use bias, use residual, clamp)
EPILOGUES = {
    "bias": (True, False, None),
    "relu": (False, False, (0.0, None)),
    "relu6": (False, False, (0.0, 6.0)),
    "residual": (False, True, None),
    "all": (True, True, (-0.5, 0.75)),
}
#: Knobs that change where a variant stores (panels carry partial sums through Y; streaming stores).
KNOBS = {"wros": [None, {"PANEL": 4, "PREFETCH": 2, "YPREFETCH": 3}, {"STREAM": True, "TILE": 2}],
         "aligned_rows": [None, {"PANEL": 8}], "block_stream": [None, {"UNROLL": 2}], "wros_unrolled": [None]}


def torch_reference(w: np.ndarray, x: np.ndarray, bias, residual, clamp) -> np.ndarray:
    y = torch.from_numpy(w).double() @ torch.from_numpy(x).double()
    if bias is not None:
        y = y + torch.from_numpy(bias).double()[:, None]
    if residual is not None:
        y = y + torch.from_numpy(residual).double()
    if clamp is not None:
        y = torch.clamp(y, min=clamp[0], max=clamp[1])
    return y.numpy()


def check_all_epilogues(ck, problem: Problem, x: np.ndarray, sve_bits=None, which=EPILOGUES) -> None:
    assert ck.has_epilogue
    rng = np.random.default_rng(x.shape[1])
    M, n = problem.M, x.shape[1]
    scale = (np.abs(problem.weight) @ np.abs(x)).max(initial=1.0)
    for name in which:
        use_bias, use_res, clamp = EPILOGUES[name]
        bias = rng.standard_normal(M).astype(np.float32) if use_bias else None
        residual = rng.standard_normal((M, n)).astype(np.float32) if use_res else None
        y = ck(x, sve_bits=sve_bits, bias=bias, residual=residual, clamp=clamp)
        ref = torch_reference(problem.weight, x, bias, residual, clamp)
        np.testing.assert_allclose(y, ref, rtol=RTOL, atol=RTOL * (scale + 4), err_msg=name)


SETTINGS = settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                            HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("variant", list(VARIANTS))
@SETTINGS
@given(data=st.data())
def test_host_every_epilogue(variant, data, compile_cache):
    small = variant == "wros_unrolled"  # straight-line code: keep the layers small
    problem, x = data.draw(problems(aligned=VARIANTS[variant].aligned, max_m=24 if small else 40,
                                    max_k=12 if small else 24))
    knobs = data.draw(st.sampled_from(KNOBS[variant]))
    check_bounds = data.draw(st.booleans())
    ck = compile_kernel(VARIANTS[variant], problem, "host", cache=compile_cache, constants=knobs,
                        check_bounds=check_bounds)
    check_all_epilogues(ck, problem, x)
    np.testing.assert_allclose(ck(x), torch_reference(problem.weight, x, None, None, None), rtol=RTOL,
                               atol=RTOL * (np.abs(problem.weight) @ np.abs(x)).max(initial=1.0))


needs_qemu = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")


@needs_qemu
@pytest.mark.parametrize("target,bits", [("aarch64-neon", None), ("aarch64-sve", 256)])
@pytest.mark.parametrize("variant", list(VARIANTS))
@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_aarch64_every_epilogue_under_qemu(variant, target, bits, data, compile_cache):
    problem, x = data.draw(problems(aligned=VARIANTS[variant].aligned, max_m=24, max_k=12))
    knobs = KNOBS[variant][-1] if bits else None  # SVE: the panel / streaming / unrolled form
    ck = compile_kernel(VARIANTS[variant], problem, target, cache=compile_cache, constants=knobs)
    check_all_epilogues(ck, problem, x, sve_bits=bits)


@needs_qemu
def test_sve_512_bit_masked_tail(compile_cache):
    """SVE at 512 bits: n = 17 is a masked tail of one 16-lane register; all epilogues at once."""
    problem = random_problem(24, 12, 4, 0.5, seed=3)
    x = np.random.default_rng(5).standard_normal((12, 17)).astype(np.float32)
    ck = compile_kernel(VARIANTS["wros"], problem, "aarch64-sve", cache=compile_cache)
    check_all_epilogues(ck, problem, x, sve_bits=512, which=["all"])


def _host_kernel(compile_cache, **kw):
    problem = random_problem(20, 16, 4, 0.5, seed=2)
    ck = compile_kernel(VARIANTS["wros"], problem, "host", cache=compile_cache, **kw)
    x = np.random.default_rng(1).standard_normal((16, 33)).astype(np.float32)
    return problem, ck, x


def test_null_epilogue_and_bad_struct(compile_cache):
    """ep == NULL is the plain result; an unknown version or flag bit is code 6 and y is untouched."""
    from ubpdsl.runtime.loader import Epilogue, HostKernel

    problem, ck, x = _host_kernel(compile_cache)
    host = HostKernel(ck.so, ck.symbol, ck.M, ck.K, epilogue=True)
    y = np.full((ck.M, x.shape[1]), 7.0, np.float32)
    assert host.call_ep_raw(x, y, x.shape[1], ck.packed, None) == abi.OK
    np.testing.assert_allclose(y, problem.weight @ x, rtol=1e-5, atol=1e-5)
    ep = Epilogue(None, None, 0.0, None)
    for version, flags in ((abi.EPILOGUE_VERSION + 1, abi.EP_CLAMP), (0, 0), (abi.EPILOGUE_VERSION, 1 << 7)):
        y[...] = 7.0
        assert host.call_ep_raw(x, y, x.shape[1], ck.packed, ep.struct(version, flags)) == abi.ERR_BAD_EPILOGUE
        assert (y == 7.0).all()
    assert "UBP_ERR_BAD_EPILOGUE" in ck.header.read_text()


def test_epilogue_argument_errors(compile_cache):
    _, ck, x = _host_kernel(compile_cache)
    with pytest.raises(UbpError, match="bias must have shape"):
        ck(x, bias=np.zeros(3, np.float32))
    with pytest.raises(UbpError, match="residual must have shape"):
        ck(x, residual=np.zeros((ck.M, 2), np.float32))
    with pytest.raises(UbpError, match="clamp must be"):
        ck(x, clamp=0.0)
    _, plain, _ = _host_kernel(compile_cache, epilogue=False)
    assert not plain.has_epilogue and "_ep(" not in plain.header.read_text()
    with pytest.raises(UbpError, match="no epilogue entry point"):
        plain(x, bias=np.zeros(plain.M, np.float32))


@pytest.mark.skipif(shutil.which("cc") is None, reason="no host C compiler")
def test_c_program_calls_ep_through_the_header(compile_cache, tmp_path):
    """The generated header's ubp_epilogue and _ep prototype, used from C: ReLU6 + bias + residual."""
    problem, ck, x = _host_kernel(compile_cache)
    files = ck.save(tmp_path)
    n = x.shape[1]
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(ck.M).astype(np.float32)
    res = rng.standard_normal((ck.M, n)).astype(np.float32)
    for name, arr in (("x", x), ("bias", bias), ("res", res), ("w", ck.packed)):
        arr.tofile(tmp_path / f"{name}.bin")
    header = files["header"].name
    src = tmp_path / "main.c"
    src.write_text(textwrap.dedent(f"""
        #include <stdio.h>
        #include <stdlib.h>
        #include "{header}"
        static void *slurp(const char *p) {{
            FILE *f = fopen(p, "rb"); fseek(f, 0, SEEK_END); long s = ftell(f); rewind(f);
            void *b = malloc(s); if (fread(b, 1, s, f) != (size_t)s) exit(2); fclose(f); return b;
        }}
        int main(void) {{
            float *x = slurp("x.bin"), *bias = slurp("bias.bin"), *res = slurp("res.bin");
            void *w = slurp("w.bin");
            float *y = malloc(sizeof(float) * {ck.M} * {n});
            ubp_epilogue ep = {{0}};
            ep.version = UBP_EPILOGUE_VERSION; ep.flags = UBP_EP_CLAMP; ep.lo = 0.0f; ep.hi = 6.0f;
            ep.bias = bias; ep.residual = res;
            int rc = {abi.ep_symbol(ck.symbol)}(x, y, {n}, w, &ep);
            fwrite(y, sizeof(float), {ck.M} * {n}, stdout);
            return rc;
        }}
    """))
    exe = tmp_path / "main"
    subprocess.run(["cc", "-O1", "-o", str(exe), str(src), str(files["so"]), f"-Wl,-rpath,{tmp_path}"],
                   check=True, cwd=tmp_path)
    out = subprocess.run([str(exe)], cwd=tmp_path, capture_output=True, check=True).stdout
    y = np.frombuffer(out, np.float32).reshape(ck.M, n)
    np.testing.assert_allclose(y, torch_reference(problem.weight, x, bias, res, (0.0, 6.0)), rtol=1e-5, atol=1e-5)


@ubl.kernel(layout="plain")
def accumulate_in_y(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse):
    for j in ubl.tiles(X.n, 1):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j))
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in range(lo, hi):
                x = ubl.load(X, W.block_col(b), j)
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)))


@ubl.kernel(layout="plain")
def accumulate_marked(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse):
    for j in ubl.tiles(X.n, 1):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j), partial=True)
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in range(lo, hi):
                x = ubl.load(X, W.block_col(b), j)
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)), partial=True)
        for r in range(W.rows):
            ubl.finish(Y, r, j)


def test_user_kernels(compile_cache):
    """A user kernel that accumulates in Y unmarked gets no _ep (and a one-line error when asked);
    marked with partial=True and ubl.finish it gets a correct one."""
    problem = random_problem(12, 8, 2, 0.5, seed=4)
    x = np.random.default_rng(2).standard_normal((8, 19)).astype(np.float32)
    ck = compile_kernel(accumulate_in_y, problem, "host", cache=compile_cache)
    assert not ck.has_epilogue
    np.testing.assert_allclose(ck(x), problem.weight @ x, rtol=1e-5, atol=1e-5)
    with pytest.raises(DSLError, match="reads Y back") as err:
        compile_kernel(accumulate_in_y, problem, "host", cache=compile_cache, epilogue=True)
    assert "\n" not in str(err.value)
    check_all_epilogues(compile_kernel(accumulate_marked, problem, "host", cache=compile_cache), problem, x)
    with pytest.raises(DSLError, match="partial= must be a compile-time bool"):
        compile_kernel(partial_not_constant, problem, "host", cache=compile_cache)


@ubl.kernel
def partial_not_constant(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse):
    for j in ubl.tiles(X.n, 1):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j), partial=X.n)
