"""Benchmark of the autotuner on the shape suite of BENCHMARKS.md (75 % sparsity, N = 4, host, 1 thread).

For every shape: a BED mask on Gaussian weights, tuned with the default trial budget (a fresh
study, the tuned-config cache bypassed), then default config vs tuned vs dense ``torch.mm``
timed interleaved in one process (medians of thread CPU time over many rounds). Prints the
machine, the versions, the table and the geometric means the issue asks for:

* tuned vs default config over the whole suite (target >= 1.2x);
* useful GFLOP/s (2 x kept weights x n / time) on the ResNet-18 and FC shapes (target >= 60).

Usage: ``python benchmarks/bench_tune.py [--trials 24] [--shapes r18_1,fc_1] [--sparsity 0.75]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

SUITE = [
    ("mbv2_1", 96, 16, 12544), ("mbv2_2", 144, 24, 3136), ("mbv2_3", 192, 32, 784), ("mbv2_4", 384, 64, 196),
    ("mbv2_5", 576, 96, 196), ("mbv2_6", 960, 160, 49), ("mbv2_7", 1280, 320, 49),
    ("r18_1", 64, 576, 3136), ("r18_2", 128, 1152, 784), ("r18_3", 256, 2304, 196), ("r18_4", 512, 4608, 49),
    ("fc_1", 1536, 384, 128), ("fc_2", 384, 1536, 128),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the suite")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary directory")
    ap.add_argument("--cache", choices=("cold", "warm"), default="cold",
                    help="timing mode of tuning and of the final comparison (default: cold, as in a network)")
    args = ap.parse_args()

    import numpy as np
    import optuna
    import torch

    from ubpdsl.autotune import space as sp
    from ubpdsl.autotune.measure import machine_info
    from ubpdsl.autotune.study import Tuner, TuneSettings, geomean
    from ubpdsl.compiler import Problem, random_problem
    from ubpdsl.runtime.toolchain import toolchain_versions

    torch.set_num_threads(1)
    shapes = SUITE
    if args.shapes:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in SUITE if s[0] in wanted]
    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="ubp-bench-tune-"))
    tuner = Tuner(TuneSettings(trials=args.trials, cache_dir=cache, jobs=args.jobs, force=True, cache=args.cache))
    info = machine_info()
    print(f"CPU: {info['cpu']} ({platform.machine()}), target cpu {tuner.target.cpu}, "
          f"{tuner.target.vector_bits}-bit vectors; 1 thread; timer: thread CPU time, medians, interleaved")
    print(f"versions: python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
          f"(MKL {torch.backends.mkl.is_available()}), optuna {optuna.__version__}, {toolchain_versions()}")
    print(f"suite: sparsity {args.sparsity:.0%}, block N={args.block}, {args.trials} trials per shape, "
          f"{args.cache} caches, {time.strftime('%Y-%m-%d')}, tuning cache {cache}\n")
    rows = []
    t_start = time.monotonic()
    header = (f"{'shape':8} {'M':>5} {'K':>5} {'n':>6} | {'default':>9} {'tuned':>9} {'torch.mm':>9} us | "
              f"{'tuned/def':>9} {'tuned/mm':>8} | {'GF/s def':>8} {'GF/s tuned':>10} {'GF/s mm':>8} | "
              f"{'trials':>6} {'s':>5} | config")
    print(header)
    print("-" * len(header))
    try:
        for name, M, K, n in shapes:
            t0 = time.monotonic()
            rp = random_problem(M, K, args.block, args.sparsity, seed=hash(name) % 1000)
            layer = sp.Layer(Problem(name, M, K, args.block, rp.rows, rp.cols, rp.weight), n)
            res = tuner.tune_layer(layer)
            best = tuner.compile(layer, res.best)
            default = tuner.compile(layer, res.default)
            wfile = tuner.workdir / f"bench-{name}.f32"
            layer.problem.weight.astype(np.float32).tofile(wfile)
            entries = [tuner._entry("default", layer, default), tuner._entry("tuned", layer, best),
                       {"name": "torch.mm", "kind": "torch_mm", "M": M, "K": K, "weight": str(wfile)}]
            out = tuner.measure(layer, entries, rounds=31, budget_s=1.5)
            if not out.ok:
                print(f"{name}: final measurement failed: {out.message}")
                continue
            r = out.result["results"]
            t_def = r[0]["median_s"]
            t_tuned = t_def * r[1]["ratio"]
            t_mm = t_def * r[2]["ratio"]
            useful = layer.useful_flops
            row = dict(name=name, default=t_def, tuned=t_tuned, mm=t_mm, gf_def=useful / t_def / 1e9,
                       gf_tuned=useful / t_tuned / 1e9, gf_mm=layer.dense_flops / t_mm / 1e9)
            rows.append(row)
            print(f"{name:8} {M:5} {K:5} {n:6} | {t_def * 1e6:9.1f} {t_tuned * 1e6:9.1f} {t_mm * 1e6:9.1f} us | "
                  f"{t_def / t_tuned:8.2f}x {t_mm / t_tuned:7.2f}x | {row['gf_def']:8.1f} {row['gf_tuned']:10.1f} "
                  f"{row['gf_mm']:8.1f} | {res.trials:6} {time.monotonic() - t0:5.0f} | {res.best.label()}",
                  flush=True)
    finally:
        tuner.close()
    if not rows:
        return 1
    sel = [r for r in rows if r["name"].startswith(("r18", "fc"))]
    print()
    print(f"geomean tuned vs default (all {len(rows)} shapes): {geomean(r['default'] / r['tuned'] for r in rows):.2f}x"
          "   (target >= 1.2x)")
    print(f"geomean tuned vs dense torch.mm (all): {geomean(r['mm'] / r['tuned'] for r in rows):.2f}x")
    if sel:
        print(f"geomean useful GFLOP/s on ResNet-18 + FC ({len(sel)} shapes): tuned "
              f"{geomean(r['gf_tuned'] for r in sel):.1f} (target >= 60), "
              f"default {geomean(r['gf_def'] for r in sel):.1f}, "
              f"dense torch.mm {geomean(r['gf_mm'] for r in sel):.1f} (dense GFLOP/s)")
    print(f"total tuning + measuring time: {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
