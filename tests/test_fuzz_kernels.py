"""Fuzz: user kernel files with mistakes, through ``ubpdsl emit FILE.py --stage llvm`` (a bounded subprocess each).

A valid DSL kernel is damaged line by line (deleted lines, swapped tokens, huge constants, Python
errors at import time, infinite loops in module code): each run must end in exit 0 (the kernel is
still valid) or one ``error:`` line (``file:line:`` for DSL mistakes), never a traceback or a hang.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from fuzz_support import assert_all_clean, cli_verdict, record, run_cli

CLASS = "kernel files (emit)"

BASE = '''import ubpdsl.language as ubl


@ubl.kernel(layout="plain")
def mine(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2):
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j))
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in ubl.range(lo, hi):
                x = ubl.load(X, W.block_col(b), j)
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)))
'''

EDITS = {
    "static_range 10**9": ("ubl.static_range(W.block)", "ubl.static_range(1000000000)"),
    "unroll 100000": ("ubl.range(lo, hi)", "ubl.range(lo, hi, unroll=100000)"),
    "unroll 0": ("ubl.range(lo, hi)", "ubl.range(lo, hi, unroll=0)"),
    "TILE 10**6": ("TILE: ubl.constexpr = 2", "TILE: ubl.constexpr = 1000000"),
    "TILE -1": ("TILE: ubl.constexpr = 2", "TILE: ubl.constexpr = -1"),
    "store one row past Y": ("ubl.store(Y, r, j, ubl.zeros(j))", "ubl.store(Y, r + W.rows, j, ubl.zeros(j))"),
    "undefined name": ("x = ubl.load(X, W.block_col(b), j)", "x = ubl.load(X, W.block_col(q), j)"),
    "unknown ubl function": ("ubl.fma(", "ubl.fmaa("),
    "while loop": ("for b in ubl.range(lo, hi):", "while True:"),
    "recursion": ("lo, hi = W.row_blocks(r)", "lo, hi = mine(X, Y, W)"),
    "string arithmetic": ("r + i", "'r' + i"),
    "import error": ("import ubpdsl.language as ubl", "import ubpdsl.no_such_module as ubl"),
    "module raises": ("import ubpdsl.language as ubl", "import ubpdsl.language as ubl\nraise SystemExit(3)"),
    "module recurses": ("import ubpdsl.language as ubl",
                        "import ubpdsl.language as ubl\n\n\ndef f(n):\n    return f(n + 1)\n\n\nf(0)"),
    "syntax error": ("def mine(", "def mine(("),
    "no kernel": ("@ubl.kernel(layout=\"plain\")", ""),
    "bad layout": ('layout="plain"', 'layout="diagonal"'),
    "NUL byte": ("ubl.zeros(j)", "ubl.zeros(j)\0"),
}


def _line_deletions(seed: int, count: int) -> dict[str, str]:
    rng = random.Random(seed)
    lines = BASE.split("\n")
    out = {}
    for _ in range(count):
        k = rng.randrange(len(lines))
        out[f"delete line {k + 1}"] = "\n".join(lines[:k] + lines[k + 1:])
    return out


def test_fuzz_kernel_files_through_emit(tmp_path):
    sources = {name: BASE.replace(a, b, 1) for name, (a, b) in EDITS.items()}
    sources.update(_line_deletions(seed=10, count=4))

    def one(item: tuple[str, str]) -> None:
        name, src = item
        path = tmp_path / f"k{abs(hash(name)) % 10**8}.py"
        path.write_bytes(src.encode("utf-8", "surrogateescape"))
        r = run_cli("emit", str(path), "--stage", "llvm", "--shape", "16,24,4", timeout=30)
        why = cli_verdict(r, lambda r: "llvm.func @ubp_" in r.stdout)  # exit 0: the kernel in the LLVM dialect
        record(CLASS, name, why)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, sources.items()))
    assert_all_clean(CLASS)
