"""Fuzz: damaged pattern blobs ("UBPP", ubpdsl.packing owns the format) through unpack_pattern and the kernel.

Real blobs (removed kernels, 1..56 patterns) get one header word set to a hostile value, or random
bytes anywhere, or a truncation. ``unpack_pattern`` must answer with a one-line PackError or accept
a blob that is valid (it re-packs to the same header and reads back; damage to weight values or
padding is not an error); the compiled kernel (host, in a bounded
subprocess) must return an error code with y untouched for every header ``unpack_pattern``
refuses, and never crash. Content past the header is ``unpack_pattern``'s to check (the kernel
checks its header in O(1), as for block blobs).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from fuzz_support import c_verdict, record, report, run

from ubpdsl import abi
from ubpdsl.compiler import compile_kernel, random_pattern_problem
from ubpdsl.errors import PackError
from ubpdsl.kernels import PATTERN_VARIANTS
from ubpdsl.packing import PATTERN_HEADER_WORDS, pack_pattern, unpack_pattern

HOSTILE = [0, 1, -1, 2, 3, 4, 7, 8, 9, 52, 56, 57, 63, 64, 65, 4096, 2**31 - 1, -2**31, 2**24, 2**24 + 1]
CASES = 400

_KERNEL_SCRIPT = """
import sys, numpy as np
from ubpdsl.runtime.loader import HostKernel
so, sym, M, K, n, path = sys.argv[1:7]
M, K, n = int(M), int(K), int(n)
host = HostKernel(so, sym, M, K)
blobs = np.load(path, allow_pickle=False)
x = np.ones((K, n), np.float32)
for i in range(blobs.shape[0]):
    print(i, flush=True, end=' ')
    y = np.full((M, n), 7.0, np.float32)
    rc = host.call_raw(x, y, n, np.ascontiguousarray(blobs[i]))
    print(rc, int((y == 7.0).all()), flush=True)
"""


def _damage(rng: np.random.Generator, blob: np.ndarray) -> tuple[np.ndarray, str, bool]:
    """(damaged copy, description, header only)."""
    bad = blob.copy()
    kind = rng.integers(0, 3)
    if kind == 0:
        w = int(rng.integers(PATTERN_HEADER_WORDS))
        v = int(HOSTILE[rng.integers(len(HOSTILE))]) if rng.integers(2) else \
            int(bad[4 * w:4 * w + 4].view("<i4")[0]) + int(rng.choice([-64, -4, -1, 1, 4, 64]))
        bad[4 * w:4 * w + 4] = np.array([v], "<i8").astype("<i4").view(np.uint8)
        return bad, f"header word {w} = {v}", True
    if kind == 1:
        pos = rng.integers(0, bad.size, size=int(rng.integers(1, 5)))
        bad[pos] = rng.integers(0, 256, size=pos.size, dtype=np.uint8)
        return bad, f"bytes at {sorted(int(p) for p in pos)}", bool((pos < 4 * PATTERN_HEADER_WORDS).all())
    cut = int(rng.integers(0, bad.size))
    return bad[:cut].copy(), f"truncated to {cut}", False


@pytest.fixture(scope="module")
def layers(compile_cache):
    out = []
    for cout, cin, h, w, removed, patterns, seed in ((6, 5, 4, 5, 0.3, 8, 1), (3, 7, 3, 3, 0.9, 56, 2),
                                                     (5, 4, 2, 7, 0.0, 1, 3)):
        problem = random_pattern_problem(cout, cin, h, w, removed=removed, num_patterns=patterns, seed=seed)
        k = compile_kernel(PATTERN_VARIANTS["pattern_direct"], problem, "host", cache=compile_cache)
        out.append((problem, k))
    return out


def test_fuzz_pattern_blobs(layers, tmp_path):
    rng = np.random.default_rng(20261201)
    for li, (problem, k) in enumerate(layers):
        blob = pack_pattern(problem.pattern_data())
        header_refused = []
        for i in range(CASES):
            bad, desc, header_only = _damage(rng, blob)
            case = f"layer {li} case {i}: {desc}"
            why = None
            try:
                back = unpack_pattern(bad, M=problem.M, K=problem.K, library=problem.taps())
            except PackError as exc:
                if "\n" in str(exc):
                    why = "multi-line PackError"
                elif header_only and bad.size == blob.size:
                    header_refused.append((bad, desc, str(exc)))
            except Exception as exc:  # noqa: BLE001 - any other exception is the finding
                why = f"{type(exc).__name__}: {exc}"
            else:
                again = pack_pattern(back)  # a valid blob: the same header, content that reads back
                hb = 4 * PATTERN_HEADER_WORDS
                if again.size != bad.size or not np.array_equal(again[:hb], bad[:hb]):
                    why = "accepted a blob whose header does not re-pack to itself"
                else:
                    np.testing.assert_array_equal(unpack_pattern(again).dense(), back.dense())
            record("pattern blob", case, why)
            assert why is None, f"{case}: {why}"
        # every header unpack_pattern refuses, through the kernel: an error code, y untouched
        if not header_refused:
            continue
        path = tmp_path / f"blobs{li}.npy"
        np.save(path, np.stack([b for b, _, _ in header_refused]))
        r = run([sys.executable, "-c", _KERNEL_SCRIPT, str(k.so), k.symbol, str(problem.M), str(problem.K),
                 str(problem.pixels), str(path)], timeout=300)
        rows = [ln.split() for ln in r.stdout.strip().splitlines()]
        done = [row for row in rows if len(row) == 3]
        for i, rc, untouched in ((int(a), int(b), int(c)) for a, b, c in done):
            ok = rc in abi.KERNEL_ERRORS and rc != abi.OK and untouched
            record("pattern blob", f"layer {li} kernel, {header_refused[i][1]} ({header_refused[i][2]})",
                   None if ok else f"kernel returned {rc} (y untouched: {bool(untouched)}) on a refused header")
        if len(done) != len(header_refused):
            why = c_verdict(r) or "exit without finishing"
            record("pattern blob", f"layer {li} kernel header case {len(done)}", why)
    print(report("pattern blob"))
    from fuzz_support import COUNTS

    c = COUNTS["pattern blob"]
    assert c["not clean"] == 0, report("pattern blob")
    assert c["tried"] > CASES * len(layers)  # the kernel saw refused headers too
