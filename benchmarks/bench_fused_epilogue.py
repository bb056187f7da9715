"""Fused epilogues in the C runtime: MobileNetV2's subgraph with and without the kernels' ``_ep``.

    .venv/bin/python benchmarks/bench_fused_epilogue.py [--sparsity 0.75] [--batch 1] [--rounds 40]

Builds the pruned (BED, N = 4), BN-folded MobileNetV2 subgraph at 224x224 with default kernels
(wros), two plans over the same loaded kernels: ``fused`` (project convs store
clamp(W x + bias + residual) through ``<kernel>_ep``) and ``separate`` (the plain kernel, then
ubp_model.c's own epilogue pass over y). Checks both give the same output, then times
``ubp_model_run_profiled`` interleaved in random order per round, in thread CPU time (robust to
other jobs on the machine), and prints per-round-minimum medians per op kind and the ratio.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from common import machine_header  # noqa: E402
from torch import nn  # noqa: E402

from ubpdsl.deploy.graph import build_graph_plan  # noqa: E402
from ubpdsl.deploy.native import PROFILE_KINDS, ModelRunner  # noqa: E402
from ubpdsl.deploy.pipeline import MOBILENET_V2, prepare_graph  # noqa: E402
from ubpdsl.models import build_model  # noqa: E402
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5, help="runs per runner per round (the round keeps the minimum)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(machine_header())
    model = build_model("mobilenetv2").eval()
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    sp = UnalignedBlockSparsifier(args.sparsity, block=4, method="bed")
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in layers])
    sp.step()
    sp.squash_mask()
    masks = sp.to_layer_masks()
    out = Path(tempfile.mkdtemp(prefix="ubp-fused-ep-"))
    dep = prepare_graph(model, masks, torch.zeros(1, 3, 224, 224), out, **MOBILENET_V2)
    packed = {n: k.packed for n, k in dep.kernels.items()}
    runners = {mode: ModelRunner(build_graph_plan(dep.spec, packed, args.batch), dep.kernels,
                                 fused_epilogues=mode == "fused") for mode in ("fused", "separate")}
    with torch.no_grad():
        s = dep.spec.head(torch.randn(args.batch, 3, 224, 224)).contiguous()
    ys = {m: r(s) for m, r in runners.items()}
    torch.testing.assert_close(ys["fused"], ys["separate"], rtol=1e-4, atol=1e-5)
    print(f"# MobileNetV2 subgraph, {len(masks)} 1x1 convs at {args.sparsity:.0%} (BED, N=4, default wros), "
          f"batch {args.batch}, 224x224; {args.rounds} interleaved rounds x {args.reps} runs, thread CPU time")
    y = torch.empty(runners["fused"].plan.out_shape)
    per: dict[str, list[np.ndarray]] = {m: [] for m in runners}
    order = list(runners)
    for _ in range(args.rounds):
        random.shuffle(order)
        for m in order:
            best = None
            for _ in range(args.reps):
                prof = np.zeros(len(PROFILE_KINDS))
                t = time.thread_time()
                runners[m].run_into(s, y, prof)
                row = np.append(prof, time.thread_time() - t)
                best = row if best is None else np.minimum(best, row)
            per[m].append(best)
    med = {m: 1e3 * np.median(np.array(v), axis=0) for m, v in per.items()}
    kinds = [*PROFILE_KINDS, "total"]
    print(f"{'ms (median of round minima)':>32} {'separate':>9} {'fused':>9}")
    for i, k in enumerate(kinds):
        if med["separate"][i] > 0 or med["fused"][i] > 0:
            print(f"{k:>32} {med['separate'][i]:9.3f} {med['fused'][i]:9.3f}")
    kern_ep = [med[m][1] + med[m][2] for m in ("separate", "fused")]
    print(f"{'sparse kernels + epilogues':>32} {kern_ep[0]:9.3f} {kern_ep[1]:9.3f}")
    print(f"separate / fused: total {med['separate'][-1] / med['fused'][-1]:.3f}, "
          f"kernels + epilogues {kern_ep[0] / kern_ep[1]:.3f}")


if __name__ == "__main__":
    main()
