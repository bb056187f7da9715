"""Semi-structured activation sparsity: static masks over the output pixels of convolutions.

After Grimaldi et al. (2023): each convolution gets one mask over its output positions
``keep[Ho, Wo]``, the same for every channel and every image. A dropped position is a column of
the layer's im2col GEMM ``Y[Cout, L] = W[Cout, K] @ X[K, L]`` that is never computed: the layer
runs the GEMM on the kept columns only and scatters them back, leaving zeros at the dropped
positions (:class:`PixelMaskConv2d`). Since the layer reads ``conv.weight``, it composes with a
UBP weight mask (a ``FakeSparsity`` parametrization) on the same layer.

Masks are learned by gradual random-mask training (:class:`ActivationSparsifier`): each layer
draws one random order of its positions when prepared; at sparsity ``s`` the first
``round(s * L)`` positions of that order are dropped, so the masks are nested and ``s`` ramps
with the usual cubic schedule while the network trains around the holes. The sparsifier has the
``groups`` / ``sparsity_level`` / ``step()`` / ``state[fqn]["mask"]`` surface the trainer
(:func:`ubpdsl.prune.trainer.fit`) drives, so it ramps the same way as the weight sparsifiers.
Pixel masks are saved in masks.npz (format 2, ``<layer>.pixel_keep``: :mod:`ubpdsl.masks`), beside
the layer's blocks (:func:`attach_pixel_masks`); a layer whose weights stay dense is written with
all its weights as blocks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrize import type_before_parametrizations

from ubpdsl.errors import UbpError
from ubpdsl.masks import LayerMask, load_masks, save_masks, validate_pixel_mask
from ubpdsl.prune.sparsifier import _check_sparsity

__all__ = ["ActivationSparsifier", "PixelMaskConv2d", "apply_pixel_masks", "attach_pixel_masks",
           "random_pixel_masks"]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class PixelMaskConv2d(nn.Module):
    """A ``Conv2d`` that computes only the output positions where ``keep`` is True.

    ``keep`` (``bool[Ho, Wo]``) is a buffer; ``None`` runs the plain convolution. The wrapped
    convolution stays reachable as ``.conv`` (its weight may carry a sparsity parametrization).
    """

    def __init__(self, conv: nn.Module, keep: torch.Tensor | np.ndarray | None = None) -> None:
        super().__init__()
        kind = type_before_parametrizations(conv)
        if not issubclass(kind, nn.Conv2d) or conv.groups != 1:
            raise UbpError(f"activation sparsity needs an ungrouped Conv2d, got {kind.__name__}")
        if isinstance(conv.padding, str) and conv.padding != "valid":
            raise UbpError(f"activation sparsity needs numeric padding, got padding={conv.padding!r}")
        if conv.padding_mode != "zeros":
            raise UbpError(f"activation sparsity needs zero padding, got padding_mode={conv.padding_mode!r}")
        self.conv = conv
        self.register_buffer("keep", None)
        self.register_buffer("kept_index", None, persistent=False)
        if keep is not None:
            self.set_keep(keep)

    def set_keep(self, keep: torch.Tensor | np.ndarray | None) -> None:
        """Install a new pixel mask (``None``: compute every position)."""
        if keep is None:
            self.keep = self.kept_index = None
            return
        k = torch.as_tensor(validate_pixel_mask(np.asarray(keep), "pixel mask"))
        self.keep = k
        self.kept_index = torch.nonzero(k.reshape(-1)).reshape(-1)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """``(Ho, Wo)`` for an ``h x w`` input."""
        c = self.conv
        pad = (0, 0) if isinstance(c.padding, str) else _pair(c.padding)
        k, s, d = _pair(c.kernel_size), _pair(c.stride), _pair(c.dilation)
        return tuple(
            (n + 2 * p - dd * (kk - 1) - 1) // ss + 1 for n, p, kk, ss, dd in zip((h, w), pad, k, s, d, strict=True)
        )

    def gemm_columns(self) -> int | None:
        """Columns of the im2col GEMM computed per image (``None`` before a mask is set)."""
        return None if self.kept_index is None else int(self.kept_index.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.keep is None:
            return c(x)
        ho, wo = self.output_size(x.shape[-2], x.shape[-1])
        if tuple(self.keep.shape) != (ho, wo):
            raise UbpError(f"pixel mask of shape {tuple(self.keep.shape)} does not fit this layer's output {ho}x{wo}")
        pad = (0, 0) if isinstance(c.padding, str) else _pair(c.padding)
        cols = F.unfold(x, c.kernel_size, dilation=c.dilation, padding=pad, stride=c.stride)  # [B, K, L]
        cols = cols[:, :, self.kept_index]  # [B, K, L_kept]: the dropped columns are gone
        w = c.weight.reshape(c.weight.shape[0], -1)
        y = torch.matmul(w, cols)  # [B, Cout, L_kept]
        if c.bias is not None:
            y = y + c.bias[:, None]
        out = y.new_zeros(x.shape[0], w.shape[0], ho * wo)
        out = out.index_copy(2, self.kept_index, y)
        return out.reshape(x.shape[0], w.shape[0], ho, wo)


def _wrap(model: nn.Module, name: str) -> PixelMaskConv2d:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    current = getattr(parent, attr)
    if isinstance(current, PixelMaskConv2d):
        return current
    wrapper = PixelMaskConv2d(current)
    setattr(parent, attr, wrapper)
    return wrapper


def _convs(model: nn.Module) -> list[str]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, PixelMaskConv2d):
            out.append(name)
        elif (
            name
            and issubclass(type_before_parametrizations(m), nn.Conv2d)
            and m.groups == 1
            and not any(isinstance(p, PixelMaskConv2d) and p.conv is m for p in model.modules())
        ):
            out.append(name)
    return out


def apply_pixel_masks(model: nn.Module, masks: Mapping[str, Any] | str | Path) -> dict[str, PixelMaskConv2d]:
    """Wrap the named convolutions of ``model`` with fixed pixel masks.

    ``masks``: ``{layer: bool[Ho, Wo]}``, ``{layer: LayerMask}`` (those with a ``pixel_keep``) or a
    masks.npz path.
    """
    if not isinstance(masks, Mapping):
        masks = load_masks(masks)
    masks = {n: (m.pixel_keep if isinstance(m, LayerMask) else m) for n, m in masks.items()}
    masks = {n: m for n, m in masks.items() if m is not None}
    out = {}
    for name, keep in masks.items():
        try:
            model.get_submodule(name)
        except AttributeError:
            raise UbpError(f"pixel mask for {name!r}: no such layer in the model") from None
        layer = _wrap(model, name)
        layer.set_keep(keep)
        out[name] = layer
    return out


class ActivationSparsifier:
    """Gradual random pixel masks on the ungrouped ``Conv2d`` layers of a model.

    Args:
        sparsity_level: target fraction of dropped output positions per layer, in [0, 1).
        seed: seed of the random position orders.
        skip: layer names / fnmatch patterns left alone.
        layers: only these layers (default: every ungrouped Conv2d).

    :meth:`prepare` wraps the layers in :class:`PixelMaskConv2d` (so module names gain a
    ``.conv``; prepare weight sparsifiers first) and runs ``example_input`` once to learn the
    output sizes. Set ``group["sparsity_level"]`` and call :meth:`step`, or let
    :func:`~ubpdsl.prune.trainer.fit` ramp it.
    """

    def __init__(
        self,
        sparsity_level: float = 0.3,
        seed: int = 0,
        skip: Iterable[str] = (),
        layers: Iterable[str] | None = None,
    ) -> None:
        self.defaults = {"sparsity_level": _check_sparsity(sparsity_level, "activation sparsity")}
        self.seed = int(seed)
        self.skip = tuple(skip)
        self.layers = None if layers is None else tuple(layers)
        self.groups: list[dict[str, Any]] = []
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.enable_mask_update = True
        self.wrappers: dict[str, PixelMaskConv2d] = {}
        self._order: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> None:
        """Wrap the chosen convolutions (all positions kept) and size their masks."""
        names = _convs(model)
        if self.layers is not None:
            missing = [n for n in self.layers if n not in names]
            if missing:
                raise UbpError(f"cannot sparsify activations of {missing[0]!r}: not an ungrouped Conv2d")
            names = list(self.layers)
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in self.skip)]
        if not names:
            raise UbpError("no convolution to sparsify")
        sizes: dict[str, tuple[int, int]] = {}
        hooks = []
        for name in names:
            wrapper = _wrap(model, name)
            self.wrappers[name] = wrapper
            hooks.append(
                wrapper.register_forward_hook(lambda m, i, o, n=name: sizes.__setitem__(n, tuple(o.shape[-2:])))
            )
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(example_input)
        finally:
            for h in hooks:
                h.remove()
            model.train(was_training)
        for k, name in enumerate(names):
            if name not in sizes:
                raise UbpError(f"layer {name!r} did not run on the example input")
            ho, wo = sizes[name]
            gen = torch.Generator().manual_seed(self.seed * 100_003 + k)
            self._order[name] = torch.randperm(ho * wo, generator=gen)
            fqn = f"{name}.pixels"
            self.groups.append(
                {"tensor_fqn": fqn, "module_fqn": name, "importance": "none", **self.defaults, "shape": (ho, wo)}
            )
            self.state[fqn] = {"mask": torch.ones(ho, wo, dtype=torch.bool)}

    def step(self) -> None:
        """Set every layer's mask at its group's current ``sparsity_level``."""
        if not self.enable_mask_update:
            return
        for g in self.groups:
            name = g["module_fqn"]
            level = _check_sparsity(g["sparsity_level"], f"layer {name}")
            ho, wo = g["shape"]
            drop = int(np.floor(round(level * ho * wo, 6) + 0.5))
            drop = min(drop, ho * wo - 1)  # always compute at least one position
            keep = torch.ones(ho * wo, dtype=torch.bool)
            keep[self._order[name][:drop]] = False
            keep = keep.reshape(ho, wo)
            self.state[g["tensor_fqn"]]["mask"] = keep
            self.wrappers[name].set_keep(keep if drop else None)

    def masks(self) -> dict[str, np.ndarray]:
        """``{layer: bool[Ho, Wo]}`` of the current masks."""
        return {g["module_fqn"]: self.state[g["tensor_fqn"]]["mask"].numpy().copy() for g in self.groups}

    def to_layer_masks(self, layers: Mapping[str, LayerMask] | None = None, block: int = 4) -> dict[str, LayerMask]:
        """``layers`` (e.g. a weight sparsifier's) with these pixel masks attached (:func:`attach_pixel_masks`)."""
        weights = {name: w.conv.weight for name, w in self.wrappers.items()}
        return attach_pixel_masks(dict(layers or {}), self.masks(), weights, block)

    def save(self, path: str | Path, layers: Mapping[str, LayerMask] | None = None, block: int = 4) -> None:
        """Write :meth:`to_layer_masks` to a masks.npz."""
        save_masks(path, self.to_layer_masks(layers, block))


def attach_pixel_masks(
    layers: Mapping[str, LayerMask],
    pixels: Mapping[str, Any],
    weights: Mapping[str, Any] | None = None,
    block: int = 4,
) -> dict[str, LayerMask]:
    """A copy of ``layers`` where each layer named in ``pixels`` carries its pixel mask.

    A pixel-masked layer absent from ``layers`` (its weights stay dense) is added with every weight
    kept (:meth:`LayerMask.dense`, N = ``block`` where it divides the rows), from ``weights[name]``.
    """
    import dataclasses

    out = dict(layers)
    for name, keep in pixels.items():
        if name in out:
            out[name] = dataclasses.replace(out[name], pixel_keep=keep)
        elif weights is not None and name in weights:
            out[name] = LayerMask.dense(name, weights[name], block, keep)
        else:
            raise UbpError(f"pixel mask for {name!r}: the layer has no blocks and no weight was given")
    return out


def random_pixel_masks(
    model: nn.Module,
    input_shape: tuple[int, ...],
    sparsity: float,
    seed: int = 0,
    skip: Iterable[str] = (),
) -> dict[str, np.ndarray]:
    """One-shot random pixel masks at ``sparsity`` for the ungrouped Conv2d layers of ``model``.

    ``model`` is left untouched (a copy is wrapped); ``input_shape`` is one example without the
    batch dimension. Without retraining these masks cost accuracy: learn them with
    :class:`ActivationSparsifier` during training where you can.
    """
    import copy

    sparsifier = ActivationSparsifier(sparsity, seed=seed, skip=skip)
    sparsifier.prepare(copy.deepcopy(model), torch.zeros(1, *input_shape))
    sparsifier.step()
    return sparsifier.masks()
