"""Host benchmark: one activation-sparse conv (70 % of output pixels kept, UBP weights) vs dense.

A MobileNetV2-sized 3x3 convolution (64 -> 64 channels on 28 x 28, batch 1) is pruned to 75 %
UBP weights (N = 4 blocks, BED) and given a random static pixel mask keeping 70 % of its output
positions. Four runners, timed interleaved in one run (median of thread-CPU-free wall time per call,
``ubpdsl.autotune.measure.interleaved_medians``, warm caches):

* ``dense``: ``torch.nn.functional.conv2d`` with the dense weights (the baseline);
* ``pixels torch``: :class:`~ubpdsl.prune.activation.PixelMaskConv2d` (torch matmul on the kept columns);
* ``ubp``: the layer on our default kernel, every pixel (``swap_to_kernels``);
* ``ubp + pixels``: our kernel on the kept im2col columns only (n = kept pixels), scattered back.

Every runner's output is checked against the masked torch model first. Usage::

    .venv/bin/python examples/activation_sparsity/bench.py [--threads 1] [--min-time 0.5]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ubpdsl.autotune.measure import interleaved_medians, machine_info
from ubpdsl.export import export_bundle
from ubpdsl.prune.activation import apply_pixel_masks
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.torch_ops import swap_to_kernels


class OneConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--keep", type=float, default=0.7)
    ap.add_argument("--sparsity", type=float, default=0.75)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-time", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = OneConv(args.channels).eval()
    model = copy.deepcopy(dense)
    sp = UnalignedBlockSparsifier(args.sparsity, block=4)
    sp.prepare(model, config=None)
    sp.step()
    sp.squash_mask()
    masks = sp.to_layer_masks()
    hw = args.size
    keep = np.zeros(hw * hw, bool)
    keep[np.random.default_rng(0).permutation(hw * hw)[: round(args.keep * hw * hw)]] = True
    keep = keep.reshape(hw, hw)
    import dataclasses

    with tempfile.TemporaryDirectory() as tmp:
        plain = export_bundle(masks, Path(tmp) / "ubp", model=model)
        px = export_bundle({"conv": dataclasses.replace(masks["conv"], pixel_keep=keep)}, Path(tmp) / "px",
                           model=model)
        ubp = swap_to_kernels(copy.deepcopy(model), plain)
        ubp_px = swap_to_kernels(copy.deepcopy(model), px)
        ref_px = copy.deepcopy(model)
        apply_pixel_masks(ref_px, {"conv": keep})
        x = torch.randn(1, args.channels, hw, hw)
        with torch.no_grad():
            want = ref_px(x)
            torch.testing.assert_close(ubp_px(x), want, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ubp(x), model(x), rtol=1e-4, atol=1e-4)
            fns = {"dense": lambda: dense(x), "pixels torch": lambda: ref_px(x), "ubp": lambda: ubp(x),
                   "ubp + pixels": lambda: ubp_px(x)}
            times = interleaved_medians(fns, min_time=args.min_time, cache="warm")
    info = machine_info()
    print(f"# {info['cpu']}, {args.threads} thread(s), conv {args.channels}->{args.channels} 3x3 on {hw}x{hw}, "
          f"UBP {args.sparsity:.0%} N=4, {int(keep.sum())}/{hw * hw} pixels kept")
    print("| runner | median us | speedup vs dense |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e6:.1f} | {times['dense'] / t:.2f}x |")


if __name__ == "__main__":
    main()
