"""From a pruned MobileNetV2 to a runnable channel-major subgraph: fold, (tune), export kernels, plan.

>>> dep = prepare_subgraph(pruned_model, masks, "build/mbv2")      # kernels built from folded weights
>>> runner = dep.runner(batch=1)                                     # ubp_model_run with its workspace
>>> y = runner(stem_output)                                          # [1, 1280], pooled
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ubpdsl.deploy.native import ModelRunner
from ubpdsl.deploy.plan import Subgraph, build_plan, extract_subgraph
from ubpdsl.masks import LayerMask

__all__ = ["Deployment", "prepare_subgraph"]


@dataclass
class Deployment:
    """The folded subgraph, its kernel bundle and the loaded kernels."""

    sub: Subgraph
    bundle: Any
    kernels: dict[str, Any]
    hw: tuple[int, int]
    runners: dict[int, ModelRunner] = field(default_factory=dict)

    def runner(self, batch: int) -> ModelRunner:
        """The plan for ``batch`` (built once per batch size, bound to the loaded kernels)."""
        if batch not in self.runners:
            plan = build_plan(self.sub, {n: k.packed for n, k in self.kernels.items()}, batch, self.hw)
            self.runners[batch] = ModelRunner(plan, self.kernels)
        return self.runners[batch]


def prepare_subgraph(model: nn.Module, masks: Mapping[str, LayerMask], out_dir: str | os.PathLike[str], *,
                     tuned: Mapping[str, Any] | None = None, hw: tuple[int, int] = (112, 112)) -> Deployment:
    """Fold BN into ``model``'s pruned convs, export host kernels for the folded weights to
    ``out_dir/bundle`` (``tuned``: ``{layer: KernelConfig}``) and load them."""
    from ubpdsl.export import export_bundle, load_bundle
    from ubpdsl.torch_ops import NativeKernel

    sub = extract_subgraph(model, masks)
    root = export_bundle(sub.masks, Path(out_dir) / "bundle", targets=["host"],
                         tuned={"host": dict(tuned)} if tuned else None)
    bundle = load_bundle(root, check_host=True)
    kernels = {n: NativeKernel(bundle.kernel(n)) for n in sub.masks}
    return Deployment(sub, bundle, kernels, hw)
