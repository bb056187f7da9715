"""Check and time every peer runtime on one shape (a quick look without our kernels' tuning).

The peers live in :mod:`ubpdsl.bench_peers` (dense torch.mm, numpy, scipy CSR/BSR, torch
CSR/BSR) and :mod:`ubpdsl.bench_mlir` (MLIR sparse_tensor CSR/BSR through the sparsifier):

    python benchmarks/peers.py --shape r18_2 --sparsity 0.9 --block 4 [--threads 1,2]
"""

from __future__ import annotations

import argparse
import sys

from ubpdsl.bench_mlir import build_mlir_spmm  # noqa: F401 - re-exported for scripts
from ubpdsl.bench_peers import PEERS, Case, Peer, Prepared  # noqa: F401
from ubpdsl.benchsuite import SUITE, copy_bandwidth, make_case, run_case, setup_process


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="r18_2", choices=list(SUITE))
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--block", type=int, default=4)
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    import numpy as np

    setup_process()
    M, K, n = SUITE[args.shape]
    w = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
    case = make_case("shapes", args.shape, w, n, args.block, args.sparsity, "random")
    threads = [int(t) for t in args.threads.split(",")]
    bw = copy_bandwidth()
    print(f"# {case.label}; copy bandwidth {bw:.1f} GB/s")
    print("| threads | peer | status | ms | speedup over dense | useful GFLOP/s | note |")
    print("|---|---|---|---|---|---|---|")
    for r in run_case(case, PEERS, threads, bandwidth=bw):
        print(f"| {r.threads} | {r.label} | {r.status} | {r.seconds * 1e3:.3f} | {r.speedup:.2f} | "
              f"{r.useful_gflops:.1f} | {r.detail} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
