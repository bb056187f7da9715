"""The DSL front end: user-written kernels compile and run; mistakes name file:line and the problem."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ubpdsl.language as ubl
from ubpdsl.compile_cli import random_problem
from ubpdsl.compiler import compile_kernel, emit
from ubpdsl.errors import DSLError


@ubl.kernel(layout="plain")
def scaled_rows(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1,
                SCALE: ubl.constexpr = 2.0):
    """A user kernel exercising if/else, augmented assignment and carried scalars."""
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            acc = ubl.zeros(j)
            count = 0
            for s in ubl.static_range(W.block):
                if r - s >= 0:
                    lo, hi = W.row_blocks(r - s)
                    for b in ubl.range(lo, hi, unroll=2):
                        acc += W.weight(b, s) * ubl.load(X, W.block_col(b), j)
                        count += 1
            if count > 0:
                ubl.store(Y, r, j, acc * SCALE)
            else:
                ubl.store(Y, r, j, 0.0)


def test_user_kernel_with_control_flow(compile_cache):
    p = random_problem(11, 9, 2, 0.5, seed=3)
    x = np.random.default_rng(0).standard_normal((9, 21)).astype(np.float32)
    ck = compile_kernel(scaled_rows, p, "host", constants={"SCALE": 3.0}, cache=compile_cache)
    np.testing.assert_allclose(ck(x), 3.0 * (p.weight @ x), rtol=1e-5, atol=1e-5)


def _kernel_from_source(tmp_path, body: str, name: str = "k") -> tuple[object, str]:
    src = textwrap.dedent(body)
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    from ubpdsl.compile_cli import load_kernel

    return load_kernel(str(path)), str(path)


def _line_of(path: str, needle: str) -> int:
    for i, line in enumerate(open(path).read().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(needle)


BAD = {
    "undefined name": ("        y = nothere + 1\n", "name 'nothere' is not defined", "nothere"),
    "while loop": ("        while True:\n            pass\n", "unsupported statement in a kernel: While", "while"),
    "store to input": ("        ubl.store(X, 0, j, ubl.zeros(j))\n", "only the ubl.Output operand can be written",
                       "ubl.store(X"),
    "dynamic static_range": ("        lo, hi = W.row_blocks(0)\n        for b in ubl.static_range(lo, hi):\n"
                             "            pass\n", "ubl.static_range bounds must be a compile-time integer",
                             "static_range(lo"),
    "register tile index": ("        acc = ubl.zeros(W.block, j)\n        acc[9] = 0.0\n",
                            "register tile index 9 out of range", "acc[9]"),
    "block_fma accumulator": ("        acc = ubl.zeros(j)\n        acc = ubl.block_fma(W, 0, acc, acc)\n",
                              "accumulator must be a register tile of N=4 rows", "block_fma"),
    "type mismatch": ("        acc = ubl.zeros(j)\n        for b in range(3):\n            acc = 1 + b\n",
                      "type mismatch: 'acc' is vector<16xf32> before the loop/if but index", "for b in range(3)"),
    "row out of range": ("        ubl.store(Y, 99, j, ubl.zeros(j))\n", "row 99 is outside Y", "Y, 99"),
    "bad tiles tail": ("        for i in ubl.tiles(X.n, 2, tail='wrap'):\n            pass\n",
                       "tail= must be 'overlap' or 'mask', got 'wrap'", "tail='wrap'"),
    "write prefetch of input": ("        ubl.prefetch(X, 0, j, write=True)\n",
                                "write=True needs the ubl.Output operand, X is an input", "ubl.prefetch(X"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_dsl_errors_name_file_and_line(tmp_path, case):
    stmt, message, needle = BAD[case]
    kernel, path = _kernel_from_source(tmp_path, (
        "import ubpdsl.language as ubl\n\n\n"
        "@ubl.kernel\n"
        "def k(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1):\n"
        "    for j in ubl.tiles(X.n, TILE):\n" + stmt))
    with pytest.raises(DSLError) as err:
        emit(kernel, random_problem(16, 8, 4, 0.5), "host", "ubp")
    text = str(err.value)
    assert text.startswith(f"{path}:{_line_of(path, needle)}: "), text
    assert message in text
    assert "\n" not in text


def test_signature_errors(tmp_path):
    with pytest.raises(DSLError, match=r"k\.py:\d+: parameter 'Z' needs an annotation"):
        _kernel_from_source(tmp_path, """
            import ubpdsl.language as ubl

            @ubl.kernel
            def k(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, Z):
                pass
            """)
    with pytest.raises(DSLError, match="needs exactly one ubl.Output"):
        _kernel_from_source(tmp_path, """
            import ubpdsl.language as ubl

            @ubl.kernel
            def k(X: ubl.Input, W: ubl.BlockSparse):
                pass
            """, name="k2")


def test_unknown_constexpr_and_builtin_outside_kernel():
    p = random_problem(8, 8, 4, 0.5)
    with pytest.raises(DSLError, match="no constexpr parameter"):
        emit(scaled_rows, p, "host", "ubp", constants={"TILES": 2})
    with pytest.raises(DSLError, match="only be used inside"):
        ubl.zeros(3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True, check=False)


def test_cli_dsl_error_is_one_line(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("import ubpdsl.language as ubl\n\n@ubl.kernel\n"
                    "def k(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse):\n"
                    "    for j in ubl.tiles(X.n, 1):\n        x = ubl.load(Y, 0)\n")
    proc = _cli("emit", str(path), "--shape", "8,8,4")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: {path}:6: ")
    assert len(proc.stderr.strip().splitlines()) == 1
    syntax = tmp_path / "syntax.py"
    syntax.write_text("def (:\n")
    proc = _cli("emit", str(syntax))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "syntax.py:1" in proc.stderr
