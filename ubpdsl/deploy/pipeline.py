"""From a pruned model to a runnable channel-major plan: trace, fold, (tune), export kernels, plan.

>>> gdep = prepare_graph(pruned_cnn, masks, example, "build/cnn")   # any traced CNN (deploy.graph)
>>> gdep.runner(batch=3)(x)                                          # [3, features]
>>> mb = prepare_graph(pruned_mbv2, masks, x, "build/mbv2", **MOBILENET_V2)  # stem / classifier stay dense
>>> mb.spec.tail(mb(mb.spec.head(x)))                                # the whole model
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ubpdsl.deploy.graph import GraphSpec, build_graph_plan, trace_graph
from ubpdsl.deploy.native import ModelRunner
from ubpdsl.masks import LayerMask

__all__ = ["GraphDeployment", "MOBILENET_V2", "prepare_graph"]

#: where a MobileNetV2 (ubpdsl.models / torchvision names) is cut: the stem and the classifier stay
#: dense (XNNPACK), everything between them (blocks, final 1x1 conv, pool) is one plan
MOBILENET_V2 = {"start": "features_0_2", "stop": "flatten"}


def _host_kernels(folded: Mapping[str, LayerMask], out_dir: str | os.PathLike[str],
                  tuned: Mapping[str, Any] | None) -> tuple[Any, dict[str, Any]]:
    """Export host kernels for the folded masks to ``out_dir/bundle`` and load them."""
    from ubpdsl.export import export_bundle, load_bundle
    from ubpdsl.torch_ops import NativeKernel

    if not folded:
        return None, {}
    root = export_bundle(folded, Path(out_dir) / "bundle", targets=["host"],
                         tuned={"host": dict(tuned)} if tuned else None)
    bundle = load_bundle(root, check_host=True)
    return bundle, {n: NativeKernel(bundle.kernel(n)) for n in folded}


@dataclass
class GraphDeployment:
    """A traced model's plan (:mod:`ubpdsl.deploy.graph`), its kernel bundle and the loaded kernels."""

    spec: GraphSpec
    bundle: Any
    kernels: dict[str, Any]
    runners: dict[int, ModelRunner] = field(default_factory=dict)

    def runner(self, batch: int) -> ModelRunner:
        """The plan for ``batch`` (built once per batch size, bound to the loaded kernels)."""
        if batch not in self.runners:
            plan = build_graph_plan(self.spec, {n: k.packed for n, k in self.kernels.items()}, batch)
            self.runners[batch] = ModelRunner(plan, self.kernels)
        return self.runners[batch]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The planned part on ``x`` (the head's output when the model was split), shaped as torch's."""
        y = self.runner(int(x.shape[0]))(x.contiguous())
        return y.reshape(x.shape[0], *self.spec.out_shape)


def prepare_graph(model: nn.Module, masks: Mapping[str, LayerMask], example: torch.Tensor,
                  out_dir: str | os.PathLike[str], *, tuned: Mapping[str, Any] | None = None,
                  start: str | None = None, stop: str | None = None, **plan_options: Any) -> GraphDeployment:
    """Trace ``model`` on ``example``, fold BN, export host kernels for its pruned layers (the
    folded weights) to ``out_dir/bundle`` and load them (``start``, ``stop``, ``plan_options``:
    see :func:`trace_graph`)."""
    spec = trace_graph(model, masks, example, start=start, stop=stop, **plan_options)
    bundle, kernels = _host_kernels(spec.masks, out_dir, tuned)
    return GraphDeployment(spec, bundle, kernels)
