"""PatDNN-style pattern + connectivity pruning of 3x3 convolutions.

Every kept 3x3 kernel keeps 4 weights, the centre among them, in one of a small library of
patterns (8 by default); connectivity pruning then removes whole kernels to reach the target
sparsity. Pattern pruning alone gives 5/9 (55.6 %) sparsity; above that, kernels are removed
by the norm of their patterned weights. The library of a layer is chosen by frequency: each
kernel's best-fit pattern (the centre plus the three other weights of highest importance),
counted over the layer, and the most frequent ones kept. Each kernel then takes the library
pattern that keeps the most importance.

:class:`PatternSparsifier` does this through the same ``torch.ao.pruning`` life cycle, schedule
(:mod:`ubpdsl.prune.schedule`) and trainer (:mod:`ubpdsl.prune.trainer`) as
:class:`~ubpdsl.prune.sparsifier.UnalignedBlockSparsifier`, of which it is a subclass: only the
mask selection differs. Gradual pruning below 5/9 pattern-prunes the kernels that lose the least
importance first and leaves the others dense; at and above 5/9 every kernel is patterned and
the weakest are removed. The kept weights export to masks.npz as layers of kind ``pattern``
(:class:`~ubpdsl.masks.PatternMask`: library and ids, plus the kept weights as N = 1 blocks that
every blocks-only consumer runs).

Training is a plain gradual magnitude schedule, not PatDNN's extended ADMM.
"""

from __future__ import annotations

import fnmatch
import itertools
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.parametrize import type_before_parametrizations

from ubpdsl.errors import UbpError
from ubpdsl.masks import PATTERN_SIZE, PatternMask
from ubpdsl.prune.gemm import SkippedLayer, find_prunable_layers
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier, _check_sparsity

__all__ = [
    "PATTERN_SPARSITY",
    "PatternSparsifier",
    "all_patterns",
    "assign_patterns",
    "pattern_masks",
    "select_library",
]

PATTERN_SPARSITY = 1.0 - PATTERN_SIZE / 9.0  # 5/9: every kernel patterned, none removed
_CENTRE = 4


def all_patterns() -> np.ndarray:
    """The 56 candidate patterns ``bool[56, 9]`` (row-major 3x3): the centre and 3 of the other 8."""
    others = [i for i in range(9) if i != _CENTRE]
    out = np.zeros((56, 9), dtype=bool)
    for k, combo in enumerate(itertools.combinations(others, PATTERN_SIZE - 1)):
        out[k, [_CENTRE, *combo]] = True
    return out


def _check_scores(scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 4 or s.shape[2:] != (3, 3):
        raise UbpError(f"pattern pruning needs [Cout, Cin, 3, 3] scores, got shape {s.shape}")
    return s.reshape(s.shape[0] * s.shape[1], 9)


def select_library(scores: np.ndarray, num_patterns: int = 8) -> np.ndarray:
    """The ``num_patterns`` most frequent best-fit patterns of a layer, ``bool[P, 3, 3]``.

    ``scores`` (importance, ``[Cout, Cin, 3, 3]``) picks each kernel's best-fit pattern; ties in
    frequency go to the pattern whose kernels hold more importance. Kernels with no importance
    at all (removed ones) do not vote.
    """
    if not 1 <= num_patterns <= 56:
        raise UbpError(f"the pattern library holds 1..56 patterns, got {num_patterns}")
    s = _check_scores(scores)
    cands = all_patterns()
    fit = s @ cands.T  # [K, 56] importance kept by each candidate
    voters = s.sum(axis=1) > 0
    best = fit[voters].argmax(axis=1)
    counts = np.bincount(best, minlength=len(cands)).astype(np.float64)
    mass = np.bincount(best, weights=fit[voters].max(axis=1), minlength=len(cands))
    order = np.lexsort((-mass, -counts))  # frequency first, then importance
    return cands[order[:num_patterns]].reshape(num_patterns, 3, 3)


def assign_patterns(scores: np.ndarray, library: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each kernel's library pattern keeping the most importance: ``(ids[Cout, Cin], kept score)``."""
    s = _check_scores(scores)
    lib = np.asarray(library, dtype=bool).reshape(len(library), 9)
    fit = s @ lib.T
    ids = fit.argmax(axis=1)
    shape = np.asarray(scores).shape[:2]
    return ids.reshape(shape).astype(np.int16), fit.max(axis=1).reshape(shape)


def pattern_masks(
    scores: np.ndarray, sparsity: float, num_patterns: int = 8, library: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pattern + connectivity mask of one layer at ``sparsity``: ``(mask, ids, library)``.

    ``mask`` is ``bool[Cout, Cin, 3, 3]``; ``ids[o, i]`` is the kernel's pattern, -1 if the kernel is
    removed, -2 if it is still dense (only below :data:`PATTERN_SPARSITY`). The number of kept
    weights is the nearest reachable to ``(1 - sparsity) * weights``: below 5/9 a patterned kernel
    removes 5 weights, above it a removed kernel removes 4.
    """
    sparsity = _check_sparsity(sparsity, "pattern pruning")
    s = np.asarray(scores, dtype=np.float64)
    if library is None:
        library = select_library(s, num_patterns)
    lib = np.asarray(library, dtype=bool)
    ids, kept = assign_patterns(s, lib)
    flat_ids = ids.ravel().astype(np.int16)
    kept = kept.ravel()
    K = flat_ids.size
    if sparsity < PATTERN_SPARSITY:
        # pattern-prune the kernels that lose the least importance, leave the rest dense
        n_pat = _round_half_up(sparsity * 9 * K / (9 - PATTERN_SIZE))
        loss = s.reshape(K, 9).sum(axis=1) - kept
        dense = np.argsort(loss, kind="stable")[n_pat:]
        flat_ids[dense] = -2
    else:
        n_keep = _round_half_up((1.0 - sparsity) * 9 * K / PATTERN_SIZE)
        removed = np.argsort(-kept, kind="stable")[n_keep:]  # connectivity: weakest kernels go
        flat_ids[removed] = -1
    table = np.concatenate([lib.reshape(len(lib), 9), np.ones((1, 9), bool), np.zeros((1, 9), bool)])
    mask = table[flat_ids.astype(np.int64)]  # id -2 -> all ones, -1 -> all zeros
    shape = s.shape
    return mask.reshape(shape), flat_ids.reshape(shape[:2]), lib


def _round_half_up(x: float) -> int:
    return int(np.floor(round(x, 6) + 0.5))  # drop float noise first, as selectors.budget does


def _is_3x3_conv(module: nn.Module) -> bool:
    kind = type_before_parametrizations(module)
    return issubclass(kind, nn.Conv2d) and tuple(module.kernel_size) == (3, 3) and module.groups == 1


class PatternSparsifier(UnalignedBlockSparsifier):
    """Pattern + connectivity sparsifier for the 3x3 convolutions of a model.

    Args:
        sparsity_level: default target fraction of zero weights per layer, in [0, 1).
        num_patterns: patterns in each layer's library.
        importance: ``abs``, ``sq`` or ``taylor`` (as :class:`UnalignedBlockSparsifier`).
        fixed_library: choose each layer's library at its first mask update and keep it; by
            default it is re-chosen at every update.
        skip, layer_sparsity, progress: as :class:`UnalignedBlockSparsifier`.

    Layers other than ungrouped 3x3 ``Conv2d`` are left dense and listed in :attr:`skipped`.
    ``global_budget`` is not supported.
    """

    def __init__(
        self,
        sparsity_level: float = 0.75,
        num_patterns: int = 8,
        importance: str = "abs",
        fixed_library: bool = False,
        skip: Iterable[str] = (),
        layer_sparsity: Mapping[str, float] | None = None,
        progress: bool = False,
    ) -> None:
        if not isinstance(num_patterns, int) or not 1 <= num_patterns <= 56:
            raise UbpError(f"num_patterns must be an integer in 1..56, got {num_patterns!r}")
        super().__init__(
            sparsity_level=sparsity_level,
            block=1,
            method="unstructured",
            importance=importance,
            skip=skip,
            layer_sparsity=layer_sparsity,
            progress=progress,
        )
        self.num_patterns = num_patterns
        self.fixed_library = fixed_library

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None = None) -> None:
        """Attach masks to the 3x3 convolutions (``config=None``) or to the ``config`` entries."""
        if config is None:
            prunable, _ = find_prunable_layers(model, block=1)
            others = [p for p in prunable if not _is_3x3_conv(p.module)]
            convs = [p for p in prunable if _is_3x3_conv(p.module)]
            for pattern in self.skip:
                if not any(fnmatch.fnmatchcase(p.name, pattern) for p in prunable):
                    raise UbpError(f"--skip {pattern!r} matches no layer of the model")
            for name in self.layer_sparsity:
                if name not in {p.name for p in convs}:
                    raise UbpError(f"per-layer sparsity for {name!r}: not a 3x3 convolution")
            config = []
            for p in convs:
                if any(fnmatch.fnmatchcase(p.name, pat) for pat in self.skip):
                    continue
                entry: dict[str, Any] = {"tensor_fqn": f"{p.name}.weight"}
                if p.name in self.layer_sparsity:
                    entry["sparsity_level"] = self.layer_sparsity[p.name]
                config.append(entry)
            if not config:
                raise UbpError("no 3x3 convolution to pattern-prune")
            skip, self.skip = self.skip, ()
            try:
                super().prepare(model, config)
            finally:
                self.skip = skip
            self.skipped += [
                SkippedLayer(p.name, type_before_parametrizations(p.module).__name__, "not a 3x3 convolution")
                for p in others
            ]
            self.skipped += [
                SkippedLayer(p.name, "Conv2d", "skipped by request")
                for p in convs
                if any(fnmatch.fnmatchcase(p.name, pat) for pat in skip)
            ]
            return
        super().prepare(model, config)
        for g in self.groups:
            if not _is_3x3_conv(g["module"]):
                raise UbpError(f"cannot pattern-prune {g['module_fqn']!r}: not an ungrouped 3x3 Conv2d")

    def update_mask(  # type: ignore[override]
        self, module: nn.Module, tensor_name: str, sparsity_level: float, **kwargs: Any
    ) -> None:
        """Select the pattern + connectivity mask of one layer and install it."""
        group = {"module": module, "tensor_name": tensor_name, "sparsity_level": sparsity_level, **kwargs}
        level = _check_sparsity(sparsity_level, f"layer {kwargs.get('module_fqn', tensor_name)}")
        state = self.state[group["tensor_fqn"]]
        if level <= 0.0:
            self._set_dense(group)
            state.pop("pattern_ids", None)
            return
        scores = self._scores(group).reshape(getattr(module, tensor_name).shape)
        library = state.get("pattern_library") if self.fixed_library else None
        mask, ids, lib = pattern_masks(scores, level, self.num_patterns, library=library)
        rows, cols = np.nonzero(mask.reshape(mask.shape[0], -1))
        self._install(group, rows, cols, 1)
        state["pattern_ids"] = torch.from_numpy(ids.astype(np.int16))
        state["pattern_library"] = torch.from_numpy(lib.astype(np.uint8))

    def _update_global(self, groups: list[dict[str, Any]]) -> None:
        raise UbpError("pattern pruning has no global budget")

    def to_layer_masks(self, include_weights: bool = True) -> dict[str, Any]:
        """``{layer: LayerMask}``; fully patterned layers are of kind ``pattern`` (their :class:`PatternMask`)."""
        import dataclasses

        out = super().to_layer_masks(include_weights)
        for name, pm in self.to_pattern_masks(partial_ok=True).items():
            if name in out:
                out[name] = dataclasses.replace(out[name], pattern=pm)
                out[name].validate()
        return out

    def to_pattern_masks(self, partial_ok: bool = False) -> dict[str, PatternMask]:
        """``{layer: PatternMask}`` of every layer whose kernels are all patterned or removed.

        A layer that still has dense kernels (sparsity below 5/9) is an error, or left out with
        ``partial_ok``.
        """
        out = {}
        for g in self.groups:
            state = self.state.get(g["tensor_fqn"], {})
            if "pattern_ids" not in state:
                continue
            ids = np.asarray(state["pattern_ids"])
            if (ids == -2).any():
                if partial_ok:
                    continue
                raise UbpError(
                    f"layer {g['module_fqn']!r} still has dense kernels (sparsity below "
                    f"{PATTERN_SPARSITY:.3f}): not a pattern mask yet"
                )
            shape = tuple(int(s) for s in getattr(g["module"], g["tensor_name"]).shape)
            out[g["module_fqn"]] = PatternMask(g["module_fqn"], shape, np.asarray(state["pattern_library"]), ids)
        return out
