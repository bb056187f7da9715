"""``make demo``: the whole ubpdsl path on scikit-learn's digits, in a few minutes on 2 cores.

    python -m ubpdsl.demo [--out build/demo] [--trials 6] [--no-tune] [--quick]

1. train the small ``digits-cnn`` densely;
2. prune it gradually with BED (unaligned 4x1 blocks, cubic schedule to 75 % on conv2, conv3 and
   fc; conv1, 1.5 % of the weights, stays dense) and fine-tune;
3. tune the host kernel of every pruned layer (``ubpdsl tune``: Optuna, SQLite study database
   in the output directory, results cached) -- skipped when the autotuner is not installed;
4. export a bundle: host (tuned) + AArch64 NEON and SVE kernels, packed weights, headers, manifest;
5. load the bundle, swap the pruned layers for kernel-backed modules (``torch.library`` op) and
   compare accuracy, outputs and single-thread latency with the dense and the masked dense model;
6. run one layer's AArch64 kernels from the bundle through the C program
   ``examples/embed_c/bundle_main.c`` under qemu and compare with torch;
7. export the pruned model to ExecuTorch as one ``ubpdsl::subgraph`` operator (the whole model
   planned channel-major by :mod:`ubpdsl.deploy.graph`, pruned layers on the tuned kernels) and
   the dense model with the XNNPACK delegate, check both against torch and time them interleaved
   in the same runtime (skipped, in one line, when the optional ``executorch`` is not installed).

Everything runs on one thread (``torch.set_num_threads(1)``); latencies are medians of interleaved
rounds with the dense torch models measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ubpdsl.autotune.measure import interleaved_medians

__all__ = ["main", "run_demo"]

SPARSITY = 0.75
BLOCK = 4
DENSE_LAYERS = ("conv1",)


@dataclass
class Step:
    """Prints numbered steps with their wall time."""

    total: int
    k: int = 0
    t0: float = 0.0

    def start(self, what: str) -> None:
        self.k += 1
        self.t0 = time.perf_counter()
        print(f"[{self.k}/{self.total}] {what}", flush=True)

    def done(self, result: str) -> None:
        print(f"      {result} ({time.perf_counter() - self.t0:.1f} s)", flush=True)


def _sgd(model: nn.Module, lr: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)


def train_dense(epochs: int, seed: int = 0) -> nn.Module:
    """The dense digits CNN after ``epochs`` epochs of SGD with a cosine learning rate."""
    from ubpdsl.models import DigitsCNN, digits_data
    from ubpdsl.prune.trainer import fit

    x, y, _, _ = digits_data()
    torch.manual_seed(seed)
    model = DigitsCNN()
    steps = epochs * (len(y) // 64)
    opt = _sgd(model, 0.05)
    fit(model, x, y, opt, steps, 64, seed=seed, lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))
    return model.eval()


def prune_gradually(dense: nn.Module, updates: int, epochs_per_update: int, finetune_epochs: int,
                    seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """BED pruning along a cubic schedule, then fine-tuning; returns the pruned model and its masks."""
    from ubpdsl.models import digits_data
    from ubpdsl.prune.schedule import CubicSchedule
    from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
    from ubpdsl.prune.trainer import fit

    x, y, _, _ = digits_data()
    model = copy.deepcopy(dense).train()
    spe = len(y) // 64
    schedule = CubicSchedule(SPARSITY, num_updates=updates, update_every=epochs_per_update * spe)
    steps = schedule.end_step + 1 + finetune_epochs * spe
    sparsifier = UnalignedBlockSparsifier(SPARSITY, block=BLOCK, method="bed", skip=DENSE_LAYERS)
    sparsifier.prepare(model, config=None)
    opt = _sgd(model, 0.01)
    fit(model, x, y, opt, steps, 64, seed=1000 + seed, sparsifier=sparsifier, schedule=schedule,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps))
    sparsifier.squash_mask()
    return model.eval(), sparsifier.to_layer_masks()


def tune_host(masks_path: Path, out: Path, pixels: dict[str, int], trials: int) -> tuple[dict[str, Any], str]:
    """Tuned host configs ``{layer: KernelConfig}`` from ``ubpdsl tune`` (SQLite study DB in ``out``).

    Returns ``({}, reason)`` when the autotuner is not available, so the caller falls back to the
    default kernels.
    """
    import json

    from ubpdsl.errors import UbpError
    from ubpdsl.export import load_tuned_configs

    try:
        from ubpdsl.autotune.cli import run_tune
    except ImportError as exc:
        return {}, f"autotuner not available ({exc}); default kernels"
    pixel_file = out / "pixels.json"
    pixel_file.write_text(json.dumps(pixels))
    db = out / "tuning.db"
    try:
        run_tune(str(masks_path), target="host", trials=trials, storage=f"sqlite:///{db.resolve()}",
                 out_dir=str(out / "tuned"), pixels_map=str(pixel_file), jobs=2, progress=False,
                 echo=lambda *a, **k: None)
    except UbpError as exc:  # the demo goes on with the default kernels
        return {}, f"tuning failed ({exc}); default kernels"
    _, configs = load_tuned_configs(out / "tuned")
    return configs, f"{trials} trials per layer, study database {db}"


def tuned_timings(tuned_dir: Path) -> dict[str, tuple[float, float | None]]:
    """``{layer: (tuned kernel s, dense torch.mm s)}`` as measured by ``ubpdsl tune`` (empty if absent)."""
    import json

    try:
        layers = json.loads((tuned_dir / "manifest.json").read_text())["layers"]
        return {name: (float(e["tuned_value"]), e.get("dense_torch_mm_s")) for name, e in layers.items()
                if not e.get("estimate")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def run_demo(out: Path, *, dense_epochs: int = 30, updates: int = 8, epochs_per_update: int = 2,
             finetune_epochs: int = 10, trials: int = 6, tune: bool = True) -> dict[str, Any]:
    """Run the six steps (see the module docstring); print progress and a summary; return the numbers."""
    from ubpdsl.export import export_bundle, load_bundle, run_bundle_main
    from ubpdsl.masks import save_masks
    from ubpdsl.models import digits_data, gemm_columns
    from ubpdsl.runtime.targets import TARGET_NAMES
    from ubpdsl.torch_ops import swap_to_kernels

    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _, _, xt, yt = digits_data()
    step = Step(7)
    print("ubpdsl demo: digits CNN -> BED pruning -> tuning -> bundle -> generated kernels\n", flush=True)

    step.start(f"dense training ({dense_epochs} epochs)")
    dense = train_dense(dense_epochs)
    step.done(f"test accuracy {100 * accuracy(dense, xt, yt):.2f} %")

    step.start(f"gradual BED pruning to {SPARSITY:.0%} ({BLOCK}x1 unaligned blocks; conv2, conv3, fc), fine-tuning")
    pruned, masks = prune_gradually(dense, updates, epochs_per_update, finetune_epochs)
    masks_path = out / "masks.npz"
    save_masks(masks_path, masks)
    step.done(f"test accuracy {100 * accuracy(pruned, xt, yt):.2f} %, masks in {masks_path}")

    step.start("tuning the host kernels" if tune else "tuning skipped (--no-tune): default kernels")
    pixels = gemm_columns(pruned, xt[:1])
    tuned, how = tune_host(masks_path, out, {n: pixels[n] for n in masks}, trials) if tune else ({}, "default wros")
    step.done(how)

    step.start("exporting the bundle (host, aarch64-neon, aarch64-sve)")
    bundle_dir = export_bundle(masks, out / "bundle", targets=list(TARGET_NAMES),
                               tuned={"host": tuned} if tuned else None, model=pruned)
    bundle = load_bundle(bundle_dir, check_host=True)
    step.done(f"{bundle_dir}: {len(bundle.layers)} layers x {len(bundle.targets)} targets")

    step.start("running on the host kernels: accuracy, parity, single-thread latency")
    fast = swap_to_kernels(copy.deepcopy(pruned), bundle)
    with torch.no_grad():
        ref, got = pruned(xt), fast(xt)
    agree = int((ref.argmax(1) == got.argmax(1)).sum())
    max_diff = float((ref - got).abs().max())
    parity = bool(torch.allclose(got, ref, rtol=1e-4, atol=1e-5))
    acc = {"dense torch": accuracy(dense, xt, yt), "pruned, dense torch (masked)": accuracy(pruned, xt, yt),
           "pruned, ubpdsl kernels": float((got.argmax(1) == yt).float().mean())}
    one = xt[:1].clone()
    models = {"dense torch": dense, "pruned, dense torch (masked)": pruned, "pruned, ubpdsl kernels": fast}
    with torch.no_grad():
        lat1 = interleaved_medians({k: (lambda m=m: m(one)) for k, m in models.items()}, min_reps=31, max_reps=31,
                                   sample_s=0.01)
        lat_all = interleaved_medians({k: (lambda m=m: m(xt)) for k, m in models.items()}, min_reps=11, max_reps=11,
                                      sample_s=0.01)
    step.done(f"{len(yt)} test images: predictions agree {agree}/{len(yt)}, max |logit diff| {max_diff:.2e}")

    step.start("AArch64 kernels from the bundle via examples/embed_c/bundle_main.c under qemu")
    phone = _phone_check(bundle, pruned, xt[:1], run_bundle_main)
    step.done("; ".join(f"{k}: {v}" for k, v in phone.items()))

    step.start("ExecuTorch: pruned model on our kernels (one ubpdsl::subgraph op) vs dense model on XNNPACK")
    et = executorch_step(dense, pruned, masks, tuned, out / "executorch", xt)
    step.done(et["line"])

    total = time.perf_counter() - t_start
    kernel_times = tuned_timings(out / "tuned") if tuned else {}
    _summary(masks, bundle, acc, lat1, lat_all, len(yt), agree, max_diff, parity, phone, kernel_times, total)
    _et_summary(et)
    return {"accuracy": acc, "latency_batch1_s": lat1, "latency_test_set_s": lat_all, "agree": agree,
            "max_abs_diff": max_diff, "parity": parity, "aarch64": phone, "executorch": et, "seconds": total}


ET_BATCHES = (1, 32)


def executorch_step(dense: nn.Module, pruned: nn.Module, masks: Mapping[str, Any], tuned: Mapping[str, Any],
                    out: Path, xt: torch.Tensor) -> dict[str, Any]:
    """Both models in ExecuTorch at each of :data:`ET_BATCHES`: parity with torch and interleaved latency.

    Returns ``{"line": one-line result, "batches": {batch: {...}}}``; ``"skipped"`` when executorch
    is not installed or the export fails (the demo goes on).
    """
    from ubpdsl.deploy import executorch as det
    from ubpdsl.deploy.pipeline import prepare_graph
    from ubpdsl.errors import UbpError

    if not det.et_available():
        why = "executorch is not installed (pip install 'ubpdsl[executorch]'): ExecuTorch step skipped"
        return {"line": why, "skipped": why}
    out.mkdir(parents=True, exist_ok=True)
    results: dict[int, dict[str, Any]] = {}
    try:
        for i, batch in enumerate(ET_BATCHES):
            x = xt[:batch].contiguous()
            gdep = prepare_graph(pruned, masks, x, out, tuned=tuned or None)
            plan_id = 60 + i
            det.register_plan(plan_id, gdep.runner(batch))
            ours = det.load_pte(det.export_pte(det.DeployedGraph(None, plan_id, gdep.spec.out_shape), x,
                                               out / f"pruned_ubpdsl_b{batch}.pte"))
            base = det.load_pte(det.export_pte(dense, x, out / f"dense_xnnpack_b{batch}.pte"))
            with torch.no_grad():
                ref_ours, ref_base = pruned(x), dense(x)
            got_ours, got_base = ours(x), base(x)
            ok = bool(torch.allclose(got_ours, ref_ours, rtol=1e-4, atol=1e-5)
                      and torch.allclose(got_base, ref_base, rtol=1e-4, atol=1e-4))
            lat = interleaved_medians({"dense": lambda b=base, x=x: b(x), "ours": lambda o=ours, x=x: o(x)},
                                      min_reps=31, max_reps=61, sample_s=0.01)
            results[batch] = {"dense_executorch_xnnpack_s": lat["dense"], "ubpdsl_executorch_s": lat["ours"],
                              "speedup": lat["dense"] / lat["ours"], "parity": ok,
                              "max_abs_diff": float((got_ours - ref_ours).abs().max())}
    except UbpError as exc:
        why = f"ExecuTorch step failed: {exc}"
        return {"line": why, "skipped": why, "batches": results}
    r1 = results[ET_BATCHES[0]]
    faster = "ours is faster" if r1["speedup"] > 1 else "the dense XNNPACK model is faster"
    line = (f"batch 1: dense+XNNPACK {1e6 * r1['dense_executorch_xnnpack_s']:.1f} us, ours "
            f"{1e6 * r1['ubpdsl_executorch_s']:.1f} us: {faster} ({r1['speedup']:.2f}x); parity "
            f"{'ok' if all(r['parity'] for r in results.values()) else 'FAILED'}")
    return {"line": line, "batches": results}


def _et_summary(et: dict[str, Any]) -> None:
    print("\nExecuTorch 1 thread, same runtime, interleaved medians: pruned model on ubpdsl kernels (one "
          "ubpdsl::subgraph op) vs the dense model on the XNNPACK delegate")
    if "skipped" in et:
        print(et["skipped"])
        return
    print("| batch | dense, ExecuTorch + XNNPACK (us) | pruned, ExecuTorch + ubpdsl (us) | which is faster | parity |")
    print("|---|---|---|---|---|")
    for batch, r in et["batches"].items():
        who = f"ours, {r['speedup']:.2f}x" if r["speedup"] > 1 else f"dense XNNPACK, {1 / r['speedup']:.2f}x"
        print(f"| {batch} | {1e6 * r['dense_executorch_xnnpack_s']:.1f} | {1e6 * r['ubpdsl_executorch_s']:.1f} | "
              f"{who} | {'ok' if r['parity'] else 'FAILED'} (max diff {r['max_abs_diff']:.1e}) |")


def _phone_check(bundle: Any, model: nn.Module, image: torch.Tensor, run: Callable[..., np.ndarray]) -> dict[str, str]:
    """Run conv3 (1x1, on the real activations of one test image) from the bundle's AArch64 kernels."""
    from ubpdsl.errors import UbpError
    from ubpdsl.runtime import qemu

    if not qemu.qemu_available() or qemu.aarch64_sysroot() is None:
        return {"skipped": "needs Debian's qemu-user and libc6-arm64-cross (make demo installs them)"}
    acts: dict[str, torch.Tensor] = {}
    hook = model.conv3.register_forward_hook(lambda m, i, o: acts.update(x=i[0], y=o))
    with torch.no_grad():
        model(image)
    hook.remove()
    x = acts["x"][0].reshape(acts["x"].shape[1], -1).numpy()  # [32 channels, 16 pixels]
    want = acts["y"][0].reshape(acts["y"].shape[1], -1).numpy()
    results = {}
    for target, label in (("aarch64-neon", "NEON"), ("aarch64-sve", "SVE-256")):
        try:
            y = run(bundle, target, "conv3", x, sve_bits=256)
            ok = np.allclose(y, want, rtol=1e-4, atol=1e-5)
            err = float(np.abs(y - want).max())
            results[f"conv3 {label}"] = f"max |diff| vs torch {err:.1e} ({'ok' if ok else 'MISMATCH'})"
        except UbpError as exc:
            results[f"conv3 {label}"] = f"failed: {exc}"
    return results


def _summary(masks: Mapping[str, Any], bundle: Any, acc: dict[str, float], lat1: dict[str, float],
             lat_all: dict[str, float], n_test: int, agree: int, max_diff: float, parity: bool,
             phone: dict[str, str], kernel_times: dict[str, tuple[float, float | None]], total: float) -> None:
    print("\n" + "=" * 100)
    print("Summary (single thread; latency = median of interleaved rounds, all models in the same run)\n")
    base1, base_all = lat1["dense torch"], lat_all["dense torch"]
    print(f"| model | test accuracy | batch 1 latency (us) | vs dense | {n_test} images (ms) | vs dense |")
    print("|---|---|---|---|---|---|")
    for name in acc:
        print(f"| {name} | {100 * acc[name]:.2f} % | {1e6 * lat1[name]:.1f} | {base1 / lat1[name]:.2f}x | "
              f"{1e3 * lat_all[name]:.2f} | {base_all / lat_all[name]:.2f}x |")
    print(f"\nparity, kernels vs masked dense model: {'PASS' if parity else 'FAIL'} (rtol 1e-4), "
          f"max |logit diff| {max_diff:.2e}, predictions agree on {agree}/{n_test} test images")
    print("\n| layer | GEMM M x K | blocks (N=4) | sparsity | host kernel | config | kernel alone (us) "
          "| dense torch.mm (us) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, m in masks.items():
        te = bundle.manifest["layers"][name]["targets"]["host"]
        consts = ",".join(f"{k}={v}" for k, v in sorted(te["constants"].items()))
        baked = ", baked" if te["specialized"] else ""
        k_s, mm_s = kernel_times.get(name, (None, None))
        k_txt = f"{1e6 * k_s:.2f}" if k_s else "-"
        mm_txt = f"{1e6 * mm_s:.2f}" if mm_s else "-"
        source = "tuned" if te["config_source"] != "default" else "default"
        print(f"| {name} | {m.R} x {m.C} | {m.num_blocks} | {m.sparsity:.0%} | {te['config']['variant']}"
              f"[{consts}{baked}] | {source} | {k_txt} | {mm_txt} |")
    if kernel_times:
        print("(kernel alone / torch.mm: per call at the layer's n for one image, measured by `ubpdsl tune`;"
              " the gap to the model latency is the per-layer framework glue: module, dispatch, im2col)")
    print("\nAArch64 (qemu, correctness only): " + "; ".join(f"{k}: {v}" for k, v in phone.items()))
    print(f"bundle: {bundle.root} (manifest.json, masks.npz, host/ aarch64-neon/ aarch64-sve/)")
    print(f"total time {total:.0f} s")


def main(argv: list[str] | None = None) -> int:
    from ubpdsl.errors import UbpError

    ap = argparse.ArgumentParser(prog="python -m ubpdsl.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/demo"), help="output directory (default build/demo)")
    ap.add_argument("--trials", type=int, default=6, help="tuning trials per layer (default 6)")
    ap.add_argument("--no-tune", action="store_true", help="skip tuning: default kernels")
    ap.add_argument("--quick", action="store_true", help="short training (a smoke run)")
    args = ap.parse_args(argv)
    schedule = dict(dense_epochs=4, updates=2, epochs_per_update=1, finetune_epochs=1) if args.quick else {}
    try:
        run_demo(args.out, trials=args.trials, tune=not args.no_tune, **schedule)
    except UbpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
