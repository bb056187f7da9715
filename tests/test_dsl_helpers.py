"""``@ubl.func`` helpers: kernels calling helpers compute what numpy does, emit the same code as
the inline kernel, refuse mistakes with the helper's file:line, and rebuild when a helper changes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest

import ubpdsl.language as ubl
from ubpdsl.compiler import compile_kernel, emit, kernel_globals, random_pattern_problem, random_problem
from ubpdsl.errors import DSLError
from ubpdsl.kernels import get_variant, kernel_identity
from ubpdsl.runtime.cache import CompileCache

ROOT = Path(__file__).resolve().parents[1]
SCALE = 2.0


@ubl.func
def scale(v, s=SCALE):
    """A default argument (a compile-time constant)."""
    return v * s


@ubl.func
def row_sum(X, W, r, j, UNROLL: ubl.constexpr = 1):
    """Row r of W @ X over tile j (plain layout: lane s of a block starting at r - s is row r), and
    how many blocks touched it: a tuple, values carried through a run-time if and a loop."""
    acc = ubl.zeros(j)
    count = 0
    for s in ubl.static_range(W.block):
        if r - s >= 0:
            lo, hi = W.row_blocks(r - s)
            for b in ubl.range(lo, hi, unroll=UNROLL):
                acc = ubl.fma(W.weight(b, s), ubl.load(X, W.block_col(b), j), acc)
                count += 1
    return acc, count


@ubl.func
def store_scaled(Y, r, j, v, *, factor=SCALE):
    """No return value; calls another helper with a keyword argument."""
    ubl.store(Y, r, j, scale(v, s=factor))
    return


@ubl.kernel(layout="plain")
def helper_rows(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2,
                UNROLL: ubl.constexpr = 2):
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            acc, count = lib.row_sum(X, W, r, j, UNROLL=UNROLL)
            if count > 0:
                store_scaled(Y, r, j, acc)
            else:
                ubl.store(Y, r, j, 0.0)


lib = types.ModuleType("lib")  # a helper reached as a module attribute, as from ``import mylib``
lib.row_sum = row_sum


def test_helpers_compute_what_numpy_does(compile_cache):
    p = random_problem(13, 9, 4, 0.5, seed=5)
    x = np.random.default_rng(0).standard_normal((9, 37)).astype(np.float32)
    ck = compile_kernel(helper_rows, p, "host", cache=compile_cache)
    np.testing.assert_allclose(ck(x), SCALE * (p.weight @ x), rtol=1e-5, atol=1e-5)


def _doc_helper_kernel(tmp_path):
    """The @ubl.func example of docs/dsl.md: examples/user_kernel/mykernels.py's kernel with its
    block loop in a helper."""
    text = (ROOT / "docs" / "dsl.md").read_text()
    code = next(b.split("```", 1)[0] for b in text.split("```python\n")[1:] if "@ubl.func" in b.split("```", 1)[0])
    (tmp_path / "doc_helper.py").write_text(code)
    return get_variant(f"{tmp_path / 'doc_helper.py'}:my_kernel")


@pytest.mark.parametrize("target", ["host", "aarch64-neon", "aarch64-sve"])
def test_inlined_helper_emits_the_inline_kernels_code(tmp_path, target):
    """The helper version of the example kernel is the same ubp module, op for op."""
    p = random_problem(12, 10, 4, 0.5, seed=1)
    inline = get_variant(str(ROOT / "examples/user_kernel/mykernels.py:my_kernel"))
    helper = _doc_helper_kernel(tmp_path)
    for consts in ({"TILE": 1, "UNROLL": 1}, {"TILE": 4, "UNROLL": 2}):
        assert emit(inline, p, target, "ubp", constants=consts) == emit(helper, p, target, "ubp", constants=consts)


def test_pattern_direct_shares_its_reduction_through_a_helper():
    """Both loop orders of the shipped pattern kernel call one helper, and emit the same loads and FMAs."""
    k = get_variant("pattern_direct")
    calls = re.findall(r"= (\w+)\(X, W,", k.source)
    assert len(calls) == 2 and len(set(calls)) == 1
    p = random_pattern_problem(4, 3, 6, 9, num_patterns=4, seed=2)
    counts = []
    for fo in (False, True):
        ubp = emit(k, p, "aarch64-neon", "ubp", constants={"FILTERS_OUTER": fo, "ROWS": 2})
        counts.append((ubp.count("vector.fma"), ubp.count("ubp.load_tile")))
    assert counts[0] == counts[1] and counts[0][0] > 0


# -- mistakes: one DSLError naming the file:line in the helper ---------------------------------

HEADER = '''
import ubpdsl.language as ubl


'''
KERNEL = '''

@ubl.kernel(layout="plain")
def k(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1):
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            {call}
'''


def _compile_error(tmp_path, helpers: str, call: str) -> tuple[str, str]:
    path = tmp_path / "userk.py"
    path.write_text(HEADER + textwrap.dedent(helpers) + KERNEL.format(call=call))
    kernel = get_variant(str(path))
    with pytest.raises(DSLError) as exc:
        emit(kernel, random_problem(8, 6, 4, 0.5, seed=0), "host", "ubp")
    return str(exc.value), str(path)


def _line(path: str, needle: str, after: int = 0) -> int:
    return next(i for i, text in enumerate(Path(path).read_text().splitlines(), 1) if needle in text and i > after)


GOOD = '''
@ubl.func
def zero_row(Y, r, j):
    ubl.store(Y, r, j, ubl.zeros(j))
'''

ERRORS = {
    "unknown helper": (GOOD, "zero_rwo(Y, r, j)", "name 'zero_rwo' is not defined; did you mean 'zero_row'?",
                       "zero_rwo("),
    "too many arguments": (GOOD, "zero_row(Y, r, j, 1)", "helper zero_row() (", "zero_row(Y, r, j, 1)"),
    "missing argument": (GOOD, "zero_row(Y, r)", "missing a required argument: 'j'", "zero_row(Y, r)"),
    "unknown keyword": (GOOD, "zero_row(Y, r, j, tile=2)", "unexpected keyword argument 'tile'", "tile=2"),
    "recursion": ('''
        @ubl.func
        def down(Y, r, j, depth):
            if depth > 0:
                down(Y, r, j, depth - 1)
        ''', "down(Y, r, j, 3)", "helper 'down' is recursive (down -> down)", "down(Y, r, j, depth - 1)"),
    "mutual recursion": ('''
        @ubl.func
        def ping(Y, r, j):
            pong(Y, r, j)


        @ubl.func
        def pong(Y, r, j):
            ping(Y, r, j)
        ''', "ping(Y, r, j)", "helper 'ping' is recursive (ping -> pong -> ping)", "    ping(Y, r, j)"),
    "python-only construct": ('''
        @ubl.func
        def spin(Y, r, j):
            while True:
                pass
        ''', "spin(Y, r, j)", "unsupported statement in a kernel: While", "while True"),
    "python-only expression": ('''
        @ubl.func
        def listy(Y, r, j):
            v = [ubl.zeros(j) for _ in range(2)]
        ''', "listy(Y, r, j)", "unsupported expression in a kernel: ListComp", "v = ["),
    "constexpr gets a run-time value": ('''
        @ubl.func
        def fixed(Y, r, j, ROW: ubl.constexpr):
            ubl.store(Y, ROW, j, ubl.zeros(j))
        ''', "fixed(Y, r, j, r)", "ROW is ubl.constexpr, so it needs a compile-time constant", "fixed(Y, r, j, r)"),
    "return in a generated loop": ('''
        @ubl.func
        def first(Y, r, j):
            for b in range(3):
                return b
        ''', "first(Y, r, j)", "'return' inside a generated loop or a run-time if", "return b"),
    "plain python function": ('''
        def plain(Y, r, j):
            pass
        ''', "plain(Y, r, j)", "cannot call function 'plain' in a kernel", "    plain(Y, r, j)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_helper_mistakes_name_file_and_line(tmp_path, case):
    helpers, call, message, needle = ERRORS[case]
    msg, path = _compile_error(tmp_path, helpers, call)
    assert message in msg
    assert msg.startswith(f"{path}:{_line(path, needle)}: "), msg
    assert "\n" not in msg
    kernel_line = _line(path, "@ubl.kernel")
    if _line(path, needle) < kernel_line:  # inside a helper: the kernel's call site is named too
        assert f"called at {path}:{_line(path, call, after=kernel_line)})" in msg


def test_helper_from_another_file_names_that_file(tmp_path, monkeypatch):
    """``import mylib`` + ``mylib.helper(...)``: found through the module, its errors name mylib.py."""
    lib_path = tmp_path / "dsl_helper_lib.py"
    lib_path.write_text(HEADER + textwrap.dedent(ERRORS["python-only construct"][0]) + GOOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "dsl_helper_lib", raising=False)
    path = tmp_path / "userk2.py"
    path.write_text("import dsl_helper_lib\n" + HEADER + KERNEL.format(call="dsl_helper_lib.zero_row(Y, r, j)"))
    emit(get_variant(str(path)), random_problem(8, 6, 4, 0.5, seed=0), "host", "ubp")  # compiles
    path.write_text("import dsl_helper_lib\n" + HEADER + KERNEL.format(call="dsl_helper_lib.spin(Y, r, j)"))
    with pytest.raises(DSLError) as exc:
        emit(get_variant(str(path)), random_problem(8, 6, 4, 0.5, seed=0), "host", "ubp")
    call_line = _line(str(path), "dsl_helper_lib.spin(")
    assert str(exc.value).startswith(f"{lib_path}:{_line(str(lib_path), 'while True')}: unsupported statement")
    assert str(exc.value).endswith(f"(in helper 'spin' called at {path}:{call_line})")


def test_bad_helper_definitions():
    with pytest.raises(DSLError, match="default of s must be a compile-time constant"):
        @ubl.func
        def bad_default(v, s=[1]):  # noqa: B006
            return v
    with pytest.raises(DSLError, match=r"\*args and \*\*kwargs are not supported"):
        @ubl.func
        def bad_varargs(*vs):
            return vs
    with pytest.raises(DSLError, match="only be used inside a @ubl.kernel"):
        scale(1.0)


# -- the compile cache key follows the helper's source and the globals it reads ----------------

USER = '''
import ubpdsl.language as ubl

FACTOR = {factor}


@ubl.func
def scaled(v):
    return v * {literal} * FACTOR


@ubl.kernel(layout="plain")
def stream(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1):
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j), partial=True)
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in range(lo, hi):
                x = scaled(ubl.load(X, W.block_col(b), j))
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)), partial=True)
            ubl.finish(Y, r, j)
        for r in range(W.rows - W.block + 1, W.rows):
            ubl.finish(Y, r, j)
'''


def _user_kernel(tmp_path, factor: float, literal: float):
    path = tmp_path / "scaledk.py"
    path.write_text(USER.format(factor=factor, literal=literal))
    return get_variant(f"{path}:stream"), path


def test_changing_a_helper_rebuilds_the_kernel(tmp_path):
    cache = CompileCache(tmp_path / "cache")
    p = random_problem(10, 7, 4, 0.5, seed=2)
    x = np.random.default_rng(3).standard_normal((7, 21)).astype(np.float32)
    seen = set()
    for factor, literal in ((1.0, 2.0), (1.0, 2.0), (1.0, 3.0), (2.0, 3.0)):
        kernel, _ = _user_kernel(tmp_path, factor, literal)
        ck = compile_kernel(kernel, p, "host", cache=cache)
        assert ck.cache_hit == ((factor, literal) in seen)  # rebuilt whenever the helper changed
        seen.add((factor, literal))
        np.testing.assert_allclose(ck(x), factor * literal * (p.weight @ x), rtol=1e-5, atol=1e-5)
    keys = {json.dumps(kernel_globals(_user_kernel(tmp_path, f, lit)[0]), sort_keys=True)
            for f, lit in ((1.0, 2.0), (1.0, 3.0), (2.0, 3.0))}
    ids = {kernel_identity(_user_kernel(tmp_path, f, lit)[0]) for f, lit in ((1.0, 2.0), (1.0, 3.0), (2.0, 3.0))}
    assert len(keys) == 3 and len(ids) == 3  # the tuned-config key follows the helper too
    assert kernel_globals(helper_rows)["lib.row_sum"][2] == row_sum.source  # via a module attribute


def test_compile_cli_builds_a_user_kernel_with_a_helper(tmp_path):
    from ubpdsl.masks import LayerMask, save_masks
    from ubpdsl.runtime.loader import HostKernel

    _, kfile = _user_kernel(tmp_path, 1.0, 2.0)
    p = random_problem(12, 8, 4, 0.5, seed=4)
    save_masks(tmp_path / "masks.npz", [LayerMask("fc", (12, 8, 1, 1), 4, p.rows.astype(np.int32),
                                                  p.cols.astype(np.int32), p.weight)])
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "ubpdsl.cli", "compile", "--mask", str(tmp_path / "masks.npz"),
                        "--variant", str(kfile), "--kernel", "stream", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    host = tmp_path / "out" / "host"
    packed = np.fromfile(host / "fc.packed.bin", dtype=np.uint8)
    x = np.random.default_rng(5).standard_normal((8, 23)).astype(np.float32)
    y = HostKernel(host / "fc.host.so", "ubp_fc", 12, 8)(x, packed)
    np.testing.assert_allclose(y, 2.0 * (p.weight @ x), rtol=1e-5, atol=1e-5)


def test_doc_helper_example_runs(tmp_path, compile_cache):
    """The @ubl.func example of docs/dsl.md computes W @ x."""
    p = random_problem(14, 11, 4, 0.5, seed=6)
    x = np.random.default_rng(7).standard_normal((11, 29)).astype(np.float32)
    ck = compile_kernel(_doc_helper_kernel(tmp_path), p, "host", constants={"UNROLL": 2}, cache=compile_cache)
    np.testing.assert_allclose(ck(x), p.weight @ x, rtol=1e-5, atol=1e-5)
