"""The two planners of the channel-major runtime on the same pruned MobileNetV2 and the same kernels.

    .venv/bin/python benchmarks/bench_planners.py [--sparsity 0.75] [--batch 1 8] [--reps 30]

Pretrained MobileNetV2 (224x224), its 34 1x1 convs pruned with BED (N = 4), default kernels
(wros) built once from the BN-folded weights. Two plans of the subgraph between the stem and the
classifier over the same loaded kernels: the hand-written inverted-residual planner
(``deploy.plan.build_plan``) and the general fx planner (``deploy.graph``, started after the stem,
stopped at the flatten). Checks they agree, then times ``ubp_model_run`` of both interleaved in
one process (``benchsuite.interleaved_medians``, thread CPU time) and prints the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import machine_header  # noqa: E402
from torch import nn  # noqa: E402

from ubpdsl.benchsuite import interleaved_medians  # noqa: E402
from ubpdsl.deploy.graph import build_graph_plan, trace_graph  # noqa: E402
from ubpdsl.deploy.native import ModelRunner  # noqa: E402
from ubpdsl.deploy.pipeline import prepare_subgraph  # noqa: E402
from ubpdsl.deploy.plan import build_plan, split_mobilenet  # noqa: E402
from ubpdsl.models import build_model  # noqa: E402
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=30, help="interleaved rounds per batch")
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
    dep = prepare_subgraph(model, masks, Path(tempfile.mkdtemp(prefix="ubp-planners-")))
    packed = {n: k.packed for n, k in dep.kernels.items()}
    stem, _, _ = split_mobilenet(model)
    spec = trace_graph(model, masks, torch.zeros(1, 3, 224, 224), start="features_0_2", stop="flatten")
    assert set(spec.masks) == set(dep.sub.masks)
    for batch in args.batch:
        runners = {"plan.py (inverted residual)": ModelRunner(build_plan(dep.sub, packed, batch, dep.hw),
                                                              dep.kernels),
                   "graph.py (fx)": ModelRunner(build_graph_plan(spec, packed, batch), dep.kernels)}
        with torch.no_grad():
            s = stem(torch.randn(batch, 3, 224, 224)).contiguous()
        ys = {k: r(s) for k, r in runners.items()}
        a, b = ys.values()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        y = torch.empty(a.shape)
        fns = {k: (lambda r=r, s=s, y=y: r.run_into(s, y)) for k, r in runners.items()}
        med = interleaved_medians(fns, min_reps=args.reps, max_reps=args.reps, clock="thread")
        kinds = {k: sorted({int(v) for v in r.plan.blob[128:128 * (1 + int(r.plan.blob[:128].view("<i8")[2]))]
                            .view("<i8").reshape(-1, 16)[:, 0]}) for k, r in runners.items()}
        print(f"\n# batch {batch}: MobileNetV2 subgraph (after the stem, to the pool), {len(masks)} 1x1 convs at "
              f"{args.sparsity:.0%}, {args.reps} interleaved rounds, thread CPU ms")
        for k, v in med.items():
            ws = runners[k].plan.workspace_bytes >> 10
            print(f"| {k} | {1e3 * v:.2f} ms | op kinds {kinds[k]} | workspace {ws} KiB |")
        t_plan, t_graph = med.values()
        print(f"plan.py / graph.py time ratio, batch {batch}: {t_plan / t_graph:.3f}")


if __name__ == "__main__":
    main()
