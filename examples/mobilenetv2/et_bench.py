"""``run.py --runtime executorch``: the pruned MobileNetV2 in ExecuTorch against dense ExecuTorch + XNNPACK.

Ours: the stem and the classifier on ExecuTorch's XNNPACK delegate, everything between them (17
inverted-residual blocks, the final 1x1 conv, the pool) one ``ubpdsl::subgraph`` operator running
channel-major in ``ubp_model_run`` (sparse kernels, depthwise, epilogues; BN folded). All runners
are timed by the one timing loop (``benchsuite.interleaved_medians``: medians of interleaved rounds in
this process), one thread, twice: wall clock, and thread CPU time (``clock="thread"``, the work done,
robust to the other jobs of a shared machine). The per-kind breakdown is the median over runs of
``ubp_model_run_profiled``'s thread CPU times.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import torch
from run import pointwise_layers, prune_one_shot, sample_photos

from ubpdsl.autotune.measure import machine_info
from ubpdsl.benchsuite import interleaved_medians
from ubpdsl.deploy import executorch as det
from ubpdsl.deploy.native import PROFILE_KINDS
from ubpdsl.deploy.pipeline import MOBILENET_V2, prepare_graph
from ubpdsl.masks import save_masks
from ubpdsl.models import build_model


def _profile(runner, x: torch.Tensor, reps: int) -> dict[str, float]:
    """Median thread CPU time per op kind over ``reps`` runs of the subgraph, in seconds (measured
    inside ``ubp_model_run_profiled``)."""
    y = torch.empty(runner.plan.out_shape)
    runner.run_into(x, y)
    runs = np.zeros((reps, len(PROFILE_KINDS)))
    for i in range(reps):
        runner.run_into(x, y, runs[i])
    return {k: float(v) for k, v in zip(PROFILE_KINDS, np.median(runs, axis=0), strict=True)}


def _compiled_dense(dense: torch.nn.Module, x: torch.Tensor):
    """``torch.compile(dense)`` compiled for ``x`` (one warm-up call), or None when inductor fails
    here (printed, the row is then left out)."""
    t = time.perf_counter()
    try:
        compiled = torch.compile(dense, dynamic=False)
        with torch.no_grad():
            y = compiled(x)
            torch.testing.assert_close(y, dense(x), rtol=1e-3, atol=1e-3)
    except Exception as exc:  # noqa: BLE001 -- any inductor/toolchain failure just drops the row
        print(f"torch.compile of the dense model failed, no such row: {type(exc).__name__}: {exc}"[:300])
        return None
    print(f"torch.compile (dense, batch {x.shape[0]}): {time.perf_counter() - t:.0f} s", flush=True)
    return compiled


def main_executorch(args, argv: list[str]) -> int:
    from ubpdsl.demo import tune_host
    from ubpdsl.models import gemm_columns

    if not det.et_available():
        print("error: executorch is not installed (pip install 'ubpdsl[executorch]')")
        return 1
    t0 = time.perf_counter()
    out: Path = args.out
    min_time = 0.15 if args.quick else 0.5
    dense = build_model("mobilenetv2")
    pruned = copy.deepcopy(dense)
    masks = prune_one_shot(pruned, pointwise_layers(pruned), args.sparsity)
    kept = sum(m.nnz for m in masks.values())
    total = sum(m.R * m.C for m in masks.values())
    print(f"pruned {len(masks)} 1x1 convolutions with BED to {1 - kept / total:.1%} "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)

    tuned: dict = {}
    how = "default kernels (wros)"
    args.trials = 3 if args.trials is None else args.trials
    if not args.no_tune:
        from ubpdsl.deploy.graph import trace_graph

        t = time.perf_counter()
        folded = trace_graph(pruned, masks, torch.zeros(1, 3, 224, 224), **MOBILENET_V2).masks  # BN folded
        save_masks(out / "folded_masks.npz", folded)
        pixels = gemm_columns(pruned, torch.zeros(1, 3, 224, 224))
        tuned, how = tune_host(out / "folded_masks.npz", out, {n: pixels[n] for n in folded}, args.trials)
        print(f"tuning: {how} ({time.perf_counter() - t:.0f} s)", flush=True)
    t = time.perf_counter()
    dep = prepare_graph(pruned, masks, torch.zeros(1, 3, 224, 224), out, tuned=tuned, **MOBILENET_V2)
    print(f"kernels for the folded weights: {dep.bundle.root} ({time.perf_counter() - t:.0f} s)", flush=True)

    stem = dep.spec.head
    photos = sample_photos()
    latency: dict[str, float] = {}
    batches: dict[str, dict] = {}
    photo_results: dict[str, dict] = {}
    breakdown: dict[str, dict] = {}
    for batch in args.batch:
        t = time.perf_counter()
        runner = dep.runner(batch)
        det.register_plan(batch, runner)  # plan id = batch size
        ours = det.DeployedGraph(stem, batch, dep.spec.out_shape, dep.spec.tail).eval()
        x = torch.cat([photos["china.jpg"], photos["flower.jpg"]] * batch)[:batch].contiguous()
        dense_pte = det.export_pte(dense, x, out / f"dense_b{batch}.pte")
        ours_pte = det.export_pte(ours, x, out / f"ubpdsl_b{batch}.pte")
        dense_et, ours_et = det.load_pte(dense_pte), det.load_pte(ours_pte)
        print(f"batch {batch}: exported and loaded both .pte ({time.perf_counter() - t:.0f} s)", flush=True)

        with torch.no_grad():
            ref, masked = dense(x), pruned(x)
            got = ours_et(x)
            dense_et_out = dense_et(x)
            stem_out = stem(x).contiguous()
        if not torch.allclose(got, masked, rtol=1e-4, atol=1e-4):
            raise AssertionError(f"batch {batch}: ExecuTorch (ours) != masked dense torch, max abs diff "
                                 f"{float((got - masked).abs().max()):.2e}")
        for name in photos:  # each photo through a program of this batch size
            xp = photos[name].expand(batch, -1, -1, -1).contiguous()
            with torch.no_grad():
                r, mk, g = dense(xp)[0], pruned(xp)[0], ours_et(xp)[0]
            top_d, top_k, top_m = (v.topk(5).indices.tolist() for v in (r, g, mk))
            photo_results.setdefault(name, {
                "dense_top5": top_d, "ubpdsl_executorch_top5": top_k, "masked_top5": top_m,
                "top5_agreement_vs_dense": len(set(top_d) & set(top_k)) / 5, "top5_same_as_masked": top_m == top_k,
                "max_abs_diff_vs_masked": float((g - mk).abs().max())})

        compiled = _compiled_dense(dense, x) if args.torch_compile else None
        with torch.no_grad():
            fns = {
                "dense_torch": lambda x=x: dense(x),
                **({"dense_torch_compile": lambda c=compiled, x=x: c(x)} if compiled is not None else {}),
                "dense_executorch_xnnpack": lambda p=dense_et, x=x: p(x),
                "ubpdsl_executorch": lambda p=ours_et, x=x: p(x),
                "ubpdsl_subgraph_standalone_c": lambda r=runner, s=stem_out: r(s),
            }
            med = interleaved_medians(fns, min_time=min_time)
        reps = 30 if args.quick else 100
        prof = _profile(runner, stem_out, reps)
        with torch.no_grad():
            cpu_fns = {k: fns[k] for k in ("dense_torch_compile", "dense_executorch_xnnpack", "ubpdsl_executorch",
                                           "ubpdsl_subgraph_standalone_c") if k in fns}
            cpu = {k: 1e3 * v for k, v in
                   interleaved_medians(cpu_fns, min_reps=reps, max_reps=reps, clock="thread").items()}
        breakdown[f"b{batch}"] = {
            **{f"subgraph: {k}": 1e3 * v for k, v in prof.items() if v > 0},
            "rest in ExecuTorch (stem + classifier on XNNPACK, layout at the op boundary, op and program "
            "call overhead)": cpu["ubpdsl_executorch"] - cpu["ubpdsl_subgraph_standalone_c"],
            **{f"total: {k}": v for k, v in cpu.items()},
        }
        batches[f"b{batch}"] = {k: 1e3 * v for k, v in med.items()}
        batches[f"b{batch}"]["cpu_ms"] = cpu
        batches[f"b{batch}"]["cpu_ratio_dense_et_over_ubpdsl_et"] = (cpu["dense_executorch_xnnpack"]
                                                                      / cpu["ubpdsl_executorch"])
        batches[f"b{batch}"]["max_abs_diff_vs_masked"] = float((got - masked).abs().max())
        batches[f"b{batch}"]["dense_et_max_abs_diff_vs_dense_torch"] = float((dense_et_out - ref).abs().max())
        if batch == 1:
            latency = {k: 1e3 * v for k, v in med.items()}
        print(f"\n| MobileNetV2 {args.sparsity:.0%}, batch {batch}, 1 thread | ms | dense ExecuTorch+XNNPACK / this |")
        print("|---|---|---|")
        for k, v in med.items():
            print(f"| {k} | {1e3 * v:.2f} | {med['dense_executorch_xnnpack'] / v:.2f}x |")
        print(f"\nthread CPU time (ms per inference, batch {batch}; medians of {reps} interleaved rounds):")
        for k, v in breakdown[f"b{batch}"].items():
            print(f"  {k}: {v:.2f}")

    print("\n| photo | dense top-5 | ours (ExecuTorch) top-5 | agreement with dense | same as masked dense |")
    print("|---|---|---|---|---|")
    for name, r in photo_results.items():
        print(f"| {name} | {r['dense_top5']} | {r['ubpdsl_executorch_top5']} | "
              f"{r['top5_agreement_vs_dense']:.0%} | {r['top5_same_as_masked']} |")
    ratio = latency.get("dense_executorch_xnnpack", float("nan")) / latency.get("ubpdsl_executorch", float("nan"))
    for b, r in batches.items():
        wall = r["dense_executorch_xnnpack"] / r["ubpdsl_executorch"]
        print(f"dense ExecuTorch+XNNPACK / ubpdsl in ExecuTorch, {b}: {wall:.2f}x wall, "
              f"{r['cpu_ratio_dense_et_over_ubpdsl_et']:.2f}x thread CPU time")
    print(f"total {time.perf_counter() - t0:.0f} s")
    (out / "results.json").write_text(json.dumps({
        "command": "python examples/mobilenetv2/run.py " + " ".join(argv),
        "cpu": machine_info()["cpu"], "threads": 1, "sparsity": args.sparsity, "layers": len(masks),
        "kernels": how, "latency_ms": latency, "batches": batches, "breakdown_ms": breakdown,
        "photos": photo_results, "torch": torch.__version__,
        "speedup_dense_executorch_over_ubpdsl_executorch_b1": ratio}, indent=2) + "\n")
    return 0
