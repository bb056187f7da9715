"""``UnalignedBlockSparsifier``: UBP masks for a PyTorch model, the ``torch.ao.pruning`` way.

It is a :class:`torch.ao.pruning.BaseSparsifier`, so it follows that life cycle and
plugs into a user's own training loop::

    sparsifier = UnalignedBlockSparsifier(sparsity_level=0.75, block=4, method="bed")
    sparsifier.prepare(model, config=None)   # FakeSparsity parametrization on every prunable layer
    ...                                      # train; set group["sparsity_level"] as you like
    sparsifier.step()                        # re-select the masks (BED, optimal, aligned, ...)
    sparsifier.to_layer_masks()              # {layer: LayerMask} with the pruned weights
    sparsifier.squash_mask()                 # make the zeros permanent, drop the parametrizations

Layers are seen as GEMMs ``W[R, C]`` (:mod:`ubpdsl.prune.gemm`); the mask of a layer is
the union of its kept ``N x 1`` blocks. Options, all of which can also be given per layer
through ``config`` entries as in torch:

* ``method``: ``bed`` (block expansion and division, fast pseudo-optimal unaligned),
  ``optimal`` (the exact DP, slow), ``aligned`` (blocks start at multiples of N) or
  ``unstructured`` (single weights; exported as N = 1 blocks).
* ``importance``: ``abs`` (|w|), ``sq`` (w^2) or ``taylor`` (|w * g|, with g the mean of
  |dL/dw| over the batches seen by :meth:`accumulate_importance` since the last step).
* budgets: each layer keeps ``budget(R, C, N, s)`` blocks (uniform per layer), or with
  ``global_budget=True`` the layers share one pool of blocks, the sum of their uniform
  budgets, spread by importance:

  - ``bed``: ``bed_select_multi`` picks blocks across all layers at once;
  - ``aligned``: aligned tiles never interact, so the pool goes to the globally best
    tiles (exactly optimal for aligned blocks);
  - ``unstructured``: the globally largest scores (global magnitude pruning);
  - ``optimal``: the per-layer counts come from BED's global selection, then each layer
    runs the exact DP with its count (exact per layer, BED's split across layers).

  Layers with a per-layer sparsity override keep their own budget and stay out of the pool.
* ``skip``: layer names (fnmatch patterns) left dense. Depthwise/grouped convolutions and
  layers with fewer rows than N are always left dense and listed in :attr:`skipped`.

Scores are taken on the *effective* (masked) weight, so pruned weights score zero; when
masks are re-selected the stored values of pruned weights are zeroed too, so a weight
that a shifted block brings back starts again from zero. A sparsity of 0 makes a layer
dense without selecting blocks; such layers have no blocks to export.
``torch.ao.pruning``'s schedulers (e.g. ``CubicSL``) work unchanged since they only set
``sparsity_level``; :mod:`ubpdsl.prune.schedule` has our cubic schedule.
"""

from __future__ import annotations

import copy
import fnmatch
from collections import defaultdict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier
from torch.nn.utils import parametrize

from ubpdsl.errors import UbpError
from ubpdsl.prune.gemm import SkippedLayer, find_prunable_layers, from_gemm, to_gemm

__all__ = ["IMPORTANCES", "METHODS", "UnalignedBlockSparsifier"]

METHODS = ("bed", "optimal", "aligned", "unstructured")
IMPORTANCES = ("abs", "sq", "taylor")


def _check_sparsity(s: Any, where: str) -> float:
    try:
        value = float(s)
    except (TypeError, ValueError):
        raise UbpError(f"{where}: sparsity must be a number, got {s!r}") from None
    if not 0.0 <= value < 1.0:
        raise UbpError(f"{where}: sparsity must be in [0, 1), got {value}")
    return value


def _check_options(block: Any, method: Any, importance: Any, where: str) -> None:
    if method not in METHODS:
        raise UbpError(f"{where}: unknown method {method!r} (choose from {', '.join(METHODS)})")
    if importance not in IMPORTANCES:
        raise UbpError(f"{where}: unknown importance {importance!r} (choose from {', '.join(IMPORTANCES)})")
    if not isinstance(block, int) or isinstance(block, bool) or block < 1:
        raise UbpError(f"{where}: block size N must be a positive integer, got {block!r}")


def _effective_block(group: Mapping[str, Any]) -> int:
    return 1 if group["method"] == "unstructured" else int(group["block"])


def _layer_budget(R: int, C: int, N: int, sparsity: float) -> int:
    """Blocks kept at ``sparsity``: ``budget(R, C, N, s)``, capped at the ``C * (R // N)`` that fit.

    The cap only bites when ``R`` is not a multiple of ``N`` and the sparsity is below
    ``1 - N * (R // N) / R``: such a layer cannot be denser than its whole blocks allow.
    """
    from ubpdsl.prune.selectors import budget

    return min(budget(R, C, N, sparsity), C * (R // N))


class UnalignedBlockSparsifier(BaseSparsifier):
    """Unaligned (or aligned / unstructured) N x 1 block sparsifier; see the module docstring.

    Args:
        sparsity_level: default target fraction of zero weights per layer, in [0, 1).
        block: N, rows per block.
        method: ``bed``, ``optimal``, ``aligned`` or ``unstructured``.
        importance: ``abs``, ``sq`` or ``taylor``.
        global_budget: share one block budget across layers (see module docstring).
        skip: names or fnmatch patterns of layers to leave dense (``prepare`` with
            ``config=None`` only).
        layer_sparsity: per-layer sparsity overrides ``{name: s}`` (``config=None`` only).
        progress: show a tqdm progress bar over layers in :meth:`step`.
    """

    def __init__(
        self,
        sparsity_level: float = 0.5,
        block: int = 4,
        method: str = "bed",
        importance: str = "abs",
        global_budget: bool = False,
        skip: Iterable[str] = (),
        layer_sparsity: Mapping[str, float] | None = None,
        progress: bool = False,
    ) -> None:
        _check_options(block, method, importance, "sparsifier")
        defaults = {
            "sparsity_level": _check_sparsity(sparsity_level, "sparsifier"),
            "block": block,
            "method": method,
            "importance": importance,
        }
        super().__init__(defaults=defaults)
        self.global_budget = bool(global_budget)
        self.skip = tuple(skip)
        self.layer_sparsity = {
            name: _check_sparsity(s, f"layer {name}") for name, s in (layer_sparsity or {}).items()
        }
        self.progress = progress
        self.skipped: list[SkippedLayer] = []
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_batches: dict[str, int] = {}

    # ------------------------------------------------------------------ preparation

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None = None) -> None:
        """Attach a :class:`FakeSparsity` mask (all ones) to every layer to prune.

        With ``config=None`` every prunable layer is taken, minus ``skip``, with the
        ``layer_sparsity`` overrides. An explicit ``config`` is a torch-style list of
        ``{"tensor_fqn": "<layer>.weight", ...}`` entries whose keys override the defaults.
        """
        min_rows = 1 if self.defaults["method"] == "unstructured" else self.defaults["block"]
        prunable, skipped = find_prunable_layers(model, block=min_rows)
        by_name = {p.name: p for p in prunable}
        skipped_by_name = {s.name: s for s in skipped}
        known = list(by_name) + list(skipped_by_name)
        self.skipped = list(skipped)

        if config is None:
            for pattern in self.skip:
                if not any(fnmatch.fnmatchcase(n, pattern) for n in known):
                    raise UbpError(f"--skip {pattern!r} matches no layer of the model")
            for name in self.layer_sparsity:
                if name not in by_name:
                    why = f" ({skipped_by_name[name].reason})" if name in skipped_by_name else ""
                    raise UbpError(f"per-layer sparsity for {name!r}: not a prunable layer{why}")
            config = []
            for p in prunable:
                if any(fnmatch.fnmatchcase(p.name, pat) for pat in self.skip):
                    self.skipped.append(SkippedLayer(p.name, type(p.module).__name__, "skipped by request"))
                    continue
                entry: dict[str, Any] = {"tensor_fqn": f"{p.name}.weight"}
                if p.name in self.layer_sparsity:
                    entry["sparsity_level"] = self.layer_sparsity[p.name]
                config.append(entry)
        else:
            config = [dict(entry) for entry in config]

        for entry in config:
            fqn = entry.get("tensor_fqn")
            if not isinstance(fqn, str) or not fqn.endswith(".weight"):
                raise UbpError(f"config entry {entry!r}: needs 'tensor_fqn': '<layer>.weight'")
            name = fqn[: -len(".weight")]
            if name not in by_name:
                why = skipped_by_name[name].reason if name in skipped_by_name else "no such Linear/Conv layer"
                raise UbpError(f"cannot prune {name!r}: {why}")
            merged = {**self.defaults, **entry}
            _check_options(merged["block"], merged["method"], merged["importance"], f"layer {name}")
            _check_sparsity(merged["sparsity_level"], f"layer {name}")
            layer = by_name[name]
            if layer.R < _effective_block(merged):
                raise UbpError(f"cannot prune {name!r}: {layer.R} rows < block size N={merged['block']}")
            entry["R"], entry["C"] = layer.R, layer.C
            own_level = "sparsity_level" in entry
            entry["budget"] = "global" if self.global_budget and not own_level else "layer"
        if not config:
            raise UbpError("no layer to prune (all layers skipped or not prunable)")
        super().prepare(model, config)

    # ------------------------------------------------------------------ importance

    def accumulate_importance(self) -> int:
        """Add this batch's gradients to the Taylor importance of every ``taylor`` layer.

        Call after ``loss.backward()`` (before ``optimizer.zero_grad()``), once per batch
        you want to count. Returns the number of layers updated. The accumulated mean of
        |grad| is used by the next :meth:`step` and then reset.
        """
        count = 0
        for group in self.groups:
            if group["importance"] != "taylor":
                continue
            param = self._original(group)
            if param.grad is None:
                raise UbpError(
                    f"layer {group['module_fqn']!r} has no gradient: call accumulate_importance() "
                    "after loss.backward()"
                )
            fqn = group["tensor_fqn"]
            g = param.grad.detach().abs().to(torch.float64)
            if fqn in self._grad_sum:
                self._grad_sum[fqn] += g
            else:
                self._grad_sum[fqn] = g.clone()
            self._grad_batches[fqn] = self._grad_batches.get(fqn, 0) + 1
            count += 1
        return count

    def _original(self, group: Mapping[str, Any]) -> torch.Tensor:
        module, name = group["module"], group["tensor_name"]
        if not parametrize.is_parametrized(module, name):
            raise UbpError(f"layer {group['module_fqn']!r} has no mask any more (squash_mask() was called)")
        return getattr(module.parametrizations, name).original

    def _mask(self, group: Mapping[str, Any]) -> torch.Tensor:
        self._original(group)  # checks the parametrization is still there
        for p in getattr(group["module"].parametrizations, group["tensor_name"]):
            if hasattr(p, "mask"):
                return p.mask
        raise UbpError(f"layer {group['module_fqn']!r} has no FakeSparsity parametrization")

    def _scores(self, group: Mapping[str, Any]) -> np.ndarray:
        from ubpdsl.prune.selectors import importance

        weight = getattr(group["module"], group["tensor_name"]).detach()
        w = to_gemm(weight).to(torch.float32).cpu().numpy()
        grad = None
        if group["importance"] == "taylor":
            fqn = group["tensor_fqn"]
            if fqn not in self._grad_sum:
                raise UbpError(
                    f"layer {group['module_fqn']!r}: taylor importance needs gradients; call "
                    "sparsifier.accumulate_importance() after loss.backward() before step()"
                )
            mean = self._grad_sum[fqn] / self._grad_batches[fqn]
            grad = to_gemm(mean).to(torch.float32).cpu().numpy()
        return np.asarray(importance(w, kind=group["importance"], grad=grad), dtype=np.float64)

    # ------------------------------------------------------------------ mask updates

    def step(self, use_path: bool = True) -> None:
        """Re-select the masks of all layers at their current ``sparsity_level``."""
        if not self.enable_mask_update:
            return
        from tqdm import tqdm

        own = [g for g in self.groups if g.get("budget") != "global"]
        pool = [g for g in self.groups if g.get("budget") == "global"]
        with torch.no_grad():
            bar = tqdm(
                total=len(own) + len(pool),
                desc="selecting blocks",
                unit="layer",
                disable=not self.progress,
                leave=False,
            )
            with bar:
                for group in own:
                    self.update_mask(**group)
                    bar.update(1)
                if pool:
                    self._update_global(pool)
                    bar.update(len(pool))
        self._grad_sum.clear()
        self._grad_batches.clear()

    def update_mask(  # type: ignore[override]
        self,
        module: nn.Module,
        tensor_name: str,
        sparsity_level: float,
        block: int,
        method: str,
        importance: str,
        **kwargs: Any,
    ) -> None:
        """Select the blocks of one layer with its own budget and install the mask."""
        from ubpdsl.prune.selectors import select_blocks, unstructured_select

        group = {
            "module": module,
            "tensor_name": tensor_name,
            "sparsity_level": sparsity_level,
            "block": block,
            "method": method,
            "importance": importance,
            **kwargs,
        }
        level = _check_sparsity(sparsity_level, f"layer {kwargs.get('module_fqn', tensor_name)}")
        if level <= 0.0:
            self._set_dense(group)
            return
        scores = self._scores(group)
        R, C = scores.shape
        if method == "unstructured":
            keep = np.asarray(unstructured_select(scores, _layer_budget(R, C, 1, level)), dtype=bool)
            rows, cols = np.nonzero(keep)
            self._install(group, rows, cols, 1)
        else:
            rows, cols = select_blocks(scores, _layer_budget(R, C, block, level), block, method=method)
            self._install(group, rows, cols, block)

    def _update_global(self, groups: list[dict[str, Any]]) -> None:
        """One block budget shared by ``groups`` (see the module docstring)."""
        from ubpdsl.prune.selectors import bed_select_multi, select_blocks, unstructured_select

        methods = {g["method"] for g in groups}
        blocks = {_effective_block(g) for g in groups}
        if len(methods) != 1 or len(blocks) != 1:
            raise UbpError("a global budget needs one method and one block size for all pooled layers")
        method, N = methods.pop(), blocks.pop()
        levels = [_check_sparsity(g["sparsity_level"], f"layer {g['module_fqn']}") for g in groups]
        if all(s <= 0.0 for s in levels):
            for g in groups:
                self._set_dense(g)
            return
        scores = [self._scores(g) for g in groups]
        total = sum(_layer_budget(*sc.shape, N, s) for sc, s in zip(scores, levels, strict=True))

        if method == "bed":
            for g, (rows, cols) in zip(groups, bed_select_multi(scores, total, N), strict=True):
                self._install(g, rows, cols, N)
            return
        if method == "unstructured":
            counts = _topk_counts([sc.ravel() for sc in scores], total)
            for g, sc, n in zip(groups, scores, counts, strict=True):
                rows, cols = np.nonzero(np.asarray(unstructured_select(sc, n), dtype=bool))
                self._install(g, rows, cols, 1)
            return
        if method == "aligned":
            counts = _topk_counts([_aligned_tile_scores(sc, N) for sc in scores], total)
        else:  # optimal: BED's split of the pool, exact selection inside each layer
            counts = [len(rows) for rows, _ in bed_select_multi(scores, total, N)]
        for g, sc, m in zip(groups, scores, counts, strict=True):
            rows, cols = select_blocks(sc, m, N, method=method)
            self._install(g, rows, cols, N)

    def _install(self, group: Mapping[str, Any], rows: Any, cols: Any, N: int) -> None:
        from ubpdsl.prune.selectors import blocks_to_mask

        rows = np.asarray(rows, dtype=np.int32)
        cols = np.asarray(cols, dtype=np.int32)
        mask = self._mask(group)
        R, C = group["R"], group["C"]
        dense = torch.from_numpy(np.asarray(blocks_to_mask(rows, cols, R, C, N), dtype=bool))
        mask.copy_(from_gemm(dense, mask.shape).to(mask.dtype))
        self._original(group).mul_(mask)  # pruned weights restart from 0 if a block revives them
        state = self.state[group["tensor_fqn"]]
        state["mask"] = mask
        state["rows"] = torch.from_numpy(rows)
        state["cols"] = torch.from_numpy(cols)
        state["block"] = N

    def _set_dense(self, group: Mapping[str, Any]) -> None:
        mask = self._mask(group)
        mask.fill_(1)
        state = self.state[group["tensor_fqn"]]
        state["mask"] = mask
        for key in ("rows", "cols", "block"):
            state.pop(key, None)

    # ------------------------------------------------------------------ inspection / export

    def layer_sparsity_achieved(self) -> dict[str, float]:
        """Fraction of zeros in each layer's current mask."""
        out = {}
        for g in self.groups:
            mask = self.state[g["tensor_fqn"]].get("mask")
            if mask is None:
                mask = self._mask(g)
            out[g["module_fqn"]] = 1.0 - float(mask.count_nonzero()) / mask.numel()
        return out

    def to_layer_masks(self, include_weights: bool = True) -> dict[str, Any]:
        """``{layer name: LayerMask}`` of every layer with a block selection.

        Works before and after :meth:`squash_mask`. Layers left dense (sparsity 0, or
        :meth:`step` never called) have no blocks and are not included.
        """
        from ubpdsl.masks import LayerMask

        out: dict[str, Any] = {}
        for g in self.groups:
            state = self.state.get(g["tensor_fqn"], {})
            if "rows" not in state:
                continue
            weight = getattr(g["module"], g["tensor_name"]).detach()
            w = to_gemm(weight).to(torch.float32).cpu().numpy().copy() if include_weights else None
            name = g["module_fqn"]
            layer = LayerMask(
                name=name,
                shape=tuple(int(s) for s in weight.shape),
                block=int(state["block"]),
                rows=np.asarray(state["rows"], dtype=np.int32),
                cols=np.asarray(state["cols"], dtype=np.int32),
                weight=w,
            )
            layer.validate()
            out[name] = layer
        return out

    def save_masks(self, path: str | Path, include_weights: bool = True) -> dict[str, Any]:
        """Write :meth:`to_layer_masks` to ``path`` (masks.npz); returns the layers written."""
        from ubpdsl.masks import save_masks

        layers = self.to_layer_masks(include_weights=include_weights)
        if not layers:
            raise UbpError("no layer has a block selection to save: call step() at a sparsity > 0 first")
        save_masks(path, layers)
        return layers

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """Plain-dict state (loads with ``torch.load(..., weights_only=True)``)."""
        sd = super().state_dict()
        sd["state"] = {fqn: dict(s) for fqn, s in sd["state"].items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Restore masks and groups into the model given to :meth:`prepare` (or set ``.model``)."""
        if getattr(self, "model", None) is None:
            raise UbpError("call prepare(model, ...) (or set sparsifier.model) before load_state_dict()")
        state_dict = copy.deepcopy(state_dict)  # torch's loader pops the masks out of its input
        super().load_state_dict(state_dict, strict=strict)
        # torch's loader installs each saved mask as the parametrization's buffer but drops it
        # from `state`; put it back so state_dict() after a load still has the masks.
        self.state = defaultdict(dict, self.state)
        for g in self.groups:
            self.state[g["tensor_fqn"]]["mask"] = self._mask(g)


def _topk_counts(score_lists: list[np.ndarray], k: int) -> list[int]:
    """How many of the ``k`` globally largest scores fall in each list (ties broken by position)."""
    sizes = [len(s) for s in score_lists]
    if k <= 0:
        return [0] * len(sizes)
    flat = np.concatenate(score_lists)
    k = min(k, len(flat))
    top = np.argpartition(-flat, k - 1)[:k]
    owner = np.searchsorted(np.cumsum(sizes), top, side="right")
    return np.bincount(owner, minlength=len(sizes)).tolist()


def _aligned_tile_scores(scores: np.ndarray, N: int) -> np.ndarray:
    """Scores of the aligned N x 1 tiles (rows kN..kN+N-1) of every column, flattened."""
    R, C = scores.shape
    tiles = R // N
    return scores[: tiles * N].reshape(tiles, N, C).sum(axis=1).ravel()
