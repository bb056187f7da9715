"""Cost of a bounds-checked build: wros with and without ``check_bounds``, same layer, same run.

    .venv/bin/python benchmarks/bench_check_bounds.py [--n 196]

Prints the median time per call of each build (interleaved, warm caches) and the ratio
checked / unchecked, per layer, after checking both builds give the same Y.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from common import interleaved_medians, machine_header  # noqa: E402

from ubpdsl.compiler import (
    compile_kernel,  # noqa: E402
    random_problem,  # noqa: E402
)
from ubpdsl.kernels import VARIANTS  # noqa: E402
from ubpdsl.runtime.loader import HostKernel, aligned_copy, aligned_empty  # noqa: E402

LAYERS = [(64, 32, 4), (576, 96, 4), (320, 1280, 4)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=196)
    ap.add_argument("--sparsity", type=float, default=0.75)
    args = ap.parse_args()
    print(machine_header())
    print(f"# wros (default knobs), host, n={args.n}, sparsity {args.sparsity}")
    print(f"{'layer':>12} {'unchecked us':>13} {'checked us':>11} {'ratio':>6}")
    for M, K, N in LAYERS:
        p = random_problem(M, K, N, args.sparsity, seed=1)
        x = aligned_copy(np.random.default_rng(0).standard_normal((K, args.n)).astype(np.float32))
        runs = {}
        outs = {}
        for label, cb in (("unchecked", False), ("checked", True)):
            ck = compile_kernel(VARIANTS["wros"], p, "host", check_bounds=cb)
            y = aligned_empty((M, args.n))
            kern = HostKernel(ck.so, ck.symbol, M, K)
            kern(x, ck.packed, y)
            outs[label] = y.copy()
            runs[label] = (lambda k=kern, x=x, y=y, w=ck.packed: k.call_raw(x, y, args.n, w))
        np.testing.assert_array_equal(outs["checked"], outs["unchecked"])
        t = interleaved_medians(runs, cache="warm")
        print(f"{f'{M}x{K}':>12} {t['unchecked'] * 1e6:13.2f} {t['checked'] * 1e6:11.2f} "
              f"{t['checked'] / t['unchecked']:6.2f}")


if __name__ == "__main__":
    main()
