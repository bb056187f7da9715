"""Every shipped kernel variant beside dense torch.mm on the shape suite (host, one thread).

Prints time and useful GFLOP/s (2 * nnz * n / time) per variant at its default constants and
at the best of a small TILE/UNROLL sweep (the autotuner searches much more), and the speedup
over dense torch.mm measured in the same run, interleaved. Warm caches (calls back to back): a
microbenchmark of the kernels' compute; ``ubpdsl bench`` measures cold, as inside a network.
Masks: BED on Gaussian weights, N x 1 blocks, unaligned (ABP variant: aligned_select at the same
number of blocks).

    python benchmarks/bench_kernels.py [--sparsity 0.75] [--block 4] [--shapes r18_2,fc_1] [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import SUITE, geomean, interleaved_medians, machine_header  # noqa: E402

from ubpdsl.compiler import (
    compile_kernel,  # noqa: E402
    random_problem,  # noqa: E402
)
from ubpdsl.kernels import VARIANTS  # noqa: E402
from ubpdsl.runtime.loader import aligned_copy, aligned_empty  # noqa: E402

UNROLL_LIMIT = 3000  # wros_unrolled bakes every block into code: only for small layers
SWEEP = {  # a small per-variant sweep (the autotuner searches much more)
    "wros": [{"TILE": t, "UNROLL": u, "PREFETCH": pf, "PANEL": pn}
             for t in (2, 4) for u in (1, 2) for pf in (0, 16) for pn in (0, 32)],
    "aligned_rows": [{"TILE": t, "UNROLL": u, "PREFETCH": pf, "PANEL": pn}
                     for t in (2, 4) for u in (1, 2) for pf in (0, 16) for pn in (0, 32)],
    "block_stream": [{"TILE": t, "UNROLL": u} for t in (1, 2, 4) for u in (1, 2)],
    "wros_unrolled": [{"TILE": t} for t in (1, 2, 4)],
}


def configs(variant: str, quick: bool) -> list[dict]:
    """The default constants first, then the variant's sweep (unless quick)."""
    out = [{}]
    if not quick:
        out += [c for c in SWEEP.get(variant, []) if c]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--shapes", default=",".join(SUITE))
    ap.add_argument("--quick", action="store_true", help="default constants only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_header())
    print(f"# {time.strftime('%Y-%m-%d')}; warm caches (calls back to back); x and y 64-byte aligned")
    print(f"# sparsity {args.sparsity}, N={args.block}; useful GFLOP/s = 2*nnz*n/time\n")
    print("| shape | M | K | n | dense ms | dense GFLOP/s | variant | config | ms | useful GFLOP/s | vs dense |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    best_speedups: dict[str, list[float]] = {v: [] for v in VARIANTS}
    best_gflops: dict[str, dict[str, float]] = {}
    for shape in args.shapes.split(","):
        M, K, n = SUITE[shape]
        rng = np.random.default_rng(1)
        x = aligned_copy(rng.standard_normal((K, n)), np.float32)  # 64-byte aligned like torch's tensors
        problems = {a: random_problem(M, K, args.block, args.sparsity, aligned=a, name=shape) for a in (False, True)}
        dense_w = torch.from_numpy(problems[False].weight)
        xt = torch.from_numpy(x)
        y = aligned_empty((M, n))
        out_t = torch.empty((M, n))
        fns = {"dense": lambda w=dense_w, a=xt, o=out_t: torch.mm(w, a, out=o)}
        meta = {}
        for variant, kern in VARIANTS.items():
            p = problems[kern.aligned]
            if kern.needs_specialized and len(p.rows) > UNROLL_LIMIT:
                continue
            for cfg in configs(variant, args.quick):
                ck = compile_kernel(kern, p, "host", constants=cfg)
                got = ck(x)
                ref = p.weight.astype(np.float64) @ x.astype(np.float64)
                if not np.allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max()):
                    print(f"| {shape} | {variant} {cfg}: WRONG RESULT, not timed |")
                    continue
                host = ck._host
                key = f"{variant} {ck.constants}"
                fns[key] = (lambda h=host, pk=ck.packed, a=x, b=y, nn=n: h.call_raw(a, b, nn, pk))
                meta[key] = (variant, ck.constants, 2 * len(p.rows) * args.block * n)
        times = interleaved_medians(fns)
        td = times.pop("dense")
        best: dict[str, tuple[float, str]] = {}
        for key, t in times.items():
            variant, consts, flops = meta[key]
            if variant not in best or t < best[variant][0]:
                best[variant] = (t, key)
        for variant, (t, key) in best.items():
            _, consts, flops = meta[key]
            g = flops / t / 1e9
            best_speedups[variant].append(td / t)
            best_gflops.setdefault(variant, {})[shape] = g
            print(f"| {shape} | {M} | {K} | {n} | {td * 1e3:.3f} | {2 * M * K * n / td / 1e9:.1f} | {variant} | "
                  f"{consts} | {t * 1e3:.3f} | {g:.1f} | {td / t:.2f}x |")
        sys.stdout.flush()
    print("\n| variant | geomean speedup over dense torch.mm | shapes |")
    print("|---|---|---|")
    for variant, sp in best_speedups.items():
        if sp:
            print(f"| {variant} | {geomean(sp):.2f}x | {len(sp)} |")
    for shape in ("r18_2", "fc_1"):
        if "wros" in best_gflops and shape in best_gflops["wros"]:
            print(f"# wros on {shape}: {best_gflops['wros'][shape]:.1f} useful GFLOP/s (first bar: 40)")


if __name__ == "__main__":
    main()
