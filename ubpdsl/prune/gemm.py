"""The GEMM view of prunable layers.

Block pruning works on a layer's weight seen as a matrix ``W[R, C]``:

* ``nn.Linear``: ``W[out_features, in_features]`` as stored;
* ``nn.Conv1d/2d/3d`` with ``groups == 1``: ``W[Cout, Cin * prod(kernel)]``, i.e. the
  weight reshaped so that row ``r`` is output channel ``r`` and the columns run over
  (input channel, kernel position) in PyTorch's memory order.

Depthwise and other grouped convolutions, transposed convolutions and layers with too
few rows to hold a block are not pruned; :func:`find_prunable_layers` reports them as
:class:`SkippedLayer` with a reason instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from ubpdsl.errors import UbpError

__all__ = [
    "PrunableLayer",
    "SkippedLayer",
    "find_prunable_layers",
    "from_gemm",
    "gemm_shape",
    "skip_reason",
    "to_gemm",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass(frozen=True)
class PrunableLayer:
    """A layer whose weight can be block-pruned, with its GEMM shape ``R x C``."""

    name: str
    module: nn.Module
    R: int
    C: int

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(_weight(self.module).shape)


@dataclass(frozen=True)
class SkippedLayer:
    """A layer with a weight that is left dense, and why."""

    name: str
    kind: str
    reason: str


def _weight(module: nn.Module) -> torch.Tensor:
    # Works before and after a parametrization (FakeSparsity) was registered.
    return module.weight


def skip_reason(module: nn.Module, block: int | None = None) -> str | None:
    """Why ``module`` cannot be block-pruned, or ``None`` when it can.

    Modules without a weight are not layers at all and also give ``None`` from
    :func:`gemm_shape`'s point of view; callers only ask about weighted layers.
    """
    kind = type_before_parametrizations(module)
    if issubclass(kind, _TRANSPOSED):
        return "transposed convolution (not supported)"
    if issubclass(kind, _CONVS):
        if module.groups != 1:
            if module.groups == module.in_channels and module.out_channels % module.in_channels == 0:
                return f"depthwise convolution (groups={module.groups})"
            return f"grouped convolution (groups={module.groups})"
    elif not issubclass(kind, nn.Linear):
        return f"unsupported layer type {kind.__name__}"
    if block is not None:
        rows = _weight(module).shape[0]
        if rows < block:
            return f"{rows} rows < block size N={block}"
    return None


def gemm_shape(module: nn.Module) -> tuple[int, int]:
    """``(R, C)`` of the module's GEMM view; :class:`UbpError` if it has none."""
    reason = skip_reason(module)
    if reason is not None:
        raise UbpError(f"cannot view {type_before_parametrizations(module).__name__} as a GEMM: {reason}")
    w = _weight(module)
    rows = int(w.shape[0])
    return rows, int(w.numel() // rows) if rows else 0


def to_gemm(weight: torch.Tensor) -> torch.Tensor:
    """The ``[R, C]`` view of a Linear or (ungrouped) Conv weight (no copy)."""
    if weight.dim() < 2:
        raise UbpError(f"a weight needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.reshape(weight.shape[0], -1)


def from_gemm(matrix: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_gemm`: the ``[R, C]`` matrix back in the weight's own shape."""
    shape = tuple(int(s) for s in shape)
    rows = shape[0]
    cols = 1
    for s in shape[1:]:
        cols *= s
    if tuple(matrix.shape) != (rows, cols):
        raise UbpError(f"GEMM matrix of shape {tuple(matrix.shape)} does not match weight shape {shape}")
    return matrix.reshape(shape)


def find_prunable_layers(
    model: nn.Module, block: int | None = None
) -> tuple[list[PrunableLayer], list[SkippedLayer]]:
    """All layers of ``model`` with a weight, split into prunable and skipped ones.

    Layers are listed in ``named_modules()`` order (definition order). With ``block``
    given, layers with fewer than ``block`` rows are skipped too.
    """
    prunable: list[PrunableLayer] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        if not name or not _has_weight(module):
            continue
        kind = type_before_parametrizations(module)
        if not issubclass(kind, (nn.Linear, *_CONVS, *_TRANSPOSED)):
            # Norm layers, embeddings, ...: weights that are not GEMM operands.
            continue
        reason = skip_reason(module, block)
        if reason is not None:
            skipped.append(SkippedLayer(name, kind.__name__, reason))
            continue
        rows, cols = gemm_shape(module)
        prunable.append(PrunableLayer(name, module, rows, cols))
    return prunable, skipped


def _has_weight(module: nn.Module) -> bool:
    try:
        w = module.weight
    except AttributeError:
        return False
    return isinstance(w, torch.Tensor)
