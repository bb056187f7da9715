"""BLK-REW: reweighted group regularisation over block groups, before hard block pruning.

The loss term is ``lam * sum_g P_g * ||W_g||^2`` over groups ``g`` of each layer's GEMM view
``W[R, C]`` (:mod:`ubpdsl.prune.gemm`), with ``P_g = 1 / (||W_g||^2 + eps)`` held constant between
reweightings and recomputed every ``update_every`` calls. A group whose norm is small gets a large
penalty and is driven towards zero; a strong group is barely touched. This approximates a group-L0
penalty (Ma et al., BLK-REW, 2020). Groups:

* ``aligned``: the aligned N x 1 tiles (rows kN..kN+N-1 of a column; a last partial tile when
  ``R % N != 0``);
* ``unaligned``: every N-row window of every column (overlapping groups), so any unaligned block
  selection (BED) can later keep the strong runs wherever they start;
* ``rowcol``: the paper's groups inside blocks of N rows x ``block_cols`` columns: every column
  of a block (an aligned N x 1 tile) and every row of a block (1 x ``block_cols``).

A weight in several groups gets the sum of their weights ``Pmap[r, c]``, so the term equals
``lam * sum(Pmap * W**2)``, which is how it is computed. Use it with any model: add
``regularizer()`` to the loss (:func:`ubpdsl.prune.trainer.fit` takes ``regularizer=``), then
prune once to blocks with :class:`~ubpdsl.prune.sparsifier.UnalignedBlockSparsifier` (BED on the
regularised weights, written to masks.npz) and retrain with the masks fixed.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import torch
from torch import nn

from ubpdsl.errors import UbpError
from ubpdsl.prune.gemm import find_prunable_layers, to_gemm

__all__ = ["GROUPINGS", "ReweightedGroupRegularizer", "group_sq_norms", "penalty_map", "reweighted_train"]

GROUPINGS = ("aligned", "unaligned", "rowcol")


def _check(grouping: str, block: int, block_cols: int) -> None:
    if grouping not in GROUPINGS:
        raise UbpError(f"unknown grouping {grouping!r} (choose from {', '.join(GROUPINGS)})")
    for what, v in (("block", block), ("block_cols", block_cols)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UbpError(f"{what} must be a positive integer, got {v!r}")


def _tile_rows(w2: torch.Tensor, N: int) -> torch.Tensor:
    """Sum of aligned N-row tiles of every column, ``[ceil(R / N), C]`` (last tile may be partial)."""
    R, C = w2.shape
    pad = (-R) % N
    if pad:
        w2 = torch.cat([w2, w2.new_zeros(pad, C)])
    return w2.reshape(-1, N, C).sum(dim=1)


def group_sq_norms(w: torch.Tensor, grouping: str, block: int, block_cols: int = 4) -> list[torch.Tensor]:
    """``||W_g||^2`` of every group of the GEMM matrix ``w[R, C]``, one tensor per group family."""
    _check(grouping, block, block_cols)
    w2 = w * w
    R, C = w2.shape
    N = min(block, R)
    if grouping == "aligned":
        return [_tile_rows(w2, N)]
    if grouping == "unaligned":
        c = torch.cat([w2.new_zeros(1, C), w2.cumsum(dim=0)])
        return [c[N:] - c[:-N]]  # window i covers rows i..i+N-1
    rows = _tile_rows(w2.T, block_cols).T  # [R, ceil(C / Bc)]: row r of column block j
    return [_tile_rows(w2, N), rows]


def penalty_map(
    norms: list[torch.Tensor], grouping: str, shape: tuple[int, int], block: int, block_cols: int = 4, eps: float = 1e-3
) -> torch.Tensor:
    """``Pmap[r, c]``: the sum of ``P_g = 1 / (||W_g||^2 + eps)`` over the groups holding weight (r, c)."""
    R, C = shape
    N = min(block, R)
    P = [1.0 / (n + eps) for n in norms]
    if grouping == "aligned":
        return P[0].repeat_interleave(N, dim=0)[:R]
    if grouping == "unaligned":
        # weight r lies in windows max(0, r-N+1) .. min(r, R-N)
        c = torch.cat([P[0].new_zeros(1, C), P[0].cumsum(dim=0)])
        r = torch.arange(R)
        hi = torch.clamp(r, max=R - N) + 1
        lo = torch.clamp(r - N + 1, min=0)
        return c[hi] - c[lo]
    cols = P[0].repeat_interleave(N, dim=0)[:R]
    rows = P[1].repeat_interleave(block_cols, dim=1)[:, :C]
    return cols + rows


class ReweightedGroupRegularizer:
    """The BLK-REW loss term over the Linear / ungrouped Conv layers of a model.

    Args:
        model: the model; its prunable layers (:func:`~ubpdsl.prune.gemm.find_prunable_layers`)
            are regularised unless named in ``skip`` (fnmatch patterns) or left out of ``layers``.
        lam: ``lambda``.
        block: N, rows of a group.
        grouping: ``aligned``, ``unaligned`` or ``rowcol`` (see the module docstring).
        block_cols: columns of a block for ``rowcol`` row groups.
        eps: ``eps`` of the reweighting.
        update_every: recompute ``P`` every this many calls (the first call computes it).

    Calling the regulariser returns the term for the current weights (with gradient); it reads
    ``module.weight``, so it works on masked (parametrized) layers too.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float = 1e-4,
        block: int = 4,
        grouping: str = "unaligned",
        block_cols: int = 4,
        eps: float = 1e-3,
        update_every: int = 50,
        skip: Iterable[str] = (),
        layers: Iterable[str] | None = None,
    ) -> None:
        _check(grouping, block, block_cols)
        if not lam >= 0 or not eps > 0:
            raise UbpError(f"need lam >= 0 and eps > 0, got lam={lam}, eps={eps}")
        if not isinstance(update_every, int) or update_every < 1:
            raise UbpError(f"update_every must be a positive integer, got {update_every!r}")
        prunable, _ = find_prunable_layers(model, block=1)
        wanted = None if layers is None else set(layers)
        self.modules = {
            p.name: p.module
            for p in prunable
            if (wanted is None or p.name in wanted) and not any(fnmatch.fnmatchcase(p.name, s) for s in skip)
        }
        if wanted is not None and wanted - set(self.modules):
            raise UbpError(f"not a prunable layer: {sorted(wanted - set(self.modules))[0]!r}")
        if not self.modules:
            raise UbpError("no layer to regularise")
        self.lam, self.block, self.grouping = float(lam), block, grouping
        self.block_cols, self.eps, self.update_every = block_cols, float(eps), update_every
        self.calls = 0
        self.pmaps: dict[str, torch.Tensor] = {}

    def _gemm(self, name: str) -> torch.Tensor:
        return to_gemm(self.modules[name].weight)

    @torch.no_grad()
    def reweight(self) -> None:
        """Recompute ``P_g`` from the current weights."""
        for name in self.modules:
            w = self._gemm(name).detach()
            norms = group_sq_norms(w, self.grouping, self.block, self.block_cols)
            self.pmaps[name] = penalty_map(norms, self.grouping, tuple(w.shape), self.block, self.block_cols, self.eps)

    def penalty(self) -> torch.Tensor:
        """``lam * sum_g P_g ||W_g||^2`` with the current ``P`` (reweights first if never done)."""
        if not self.pmaps:
            self.reweight()
        total = None
        for name in self.modules:
            w = self._gemm(name)
            term = (self.pmaps[name].to(w.dtype) * w * w).sum()
            total = term if total is None else total + term
        return self.lam * total

    def __call__(self) -> torch.Tensor:
        """The loss term; reweights every ``update_every`` calls."""
        if self.calls % self.update_every == 0:
            self.reweight()
        self.calls += 1
        return self.penalty()

    @torch.no_grad()
    def group_norms(self, name: str) -> list[torch.Tensor]:
        """``||W_g||^2`` of layer ``name``'s groups (for inspection)."""
        return group_sq_norms(self._gemm(name).detach(), self.grouping, self.block, self.block_cols)


def reweighted_train(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    regularizer: ReweightedGroupRegularizer,
    lr: float = 0.01,
    momentum: float = 0.9,
) -> float:
    """Train ``model`` with cross-entropy plus ``regularizer()`` over ``batches`` (SGD); returns the last loss.

    The short regularised phase before a one-shot block selection (``ubpdsl prune --reweighted``).
    """
    from torch.nn import functional as F

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    was_training = model.training
    model.train()
    loss = None
    for xb, yb in batches:
        loss = F.cross_entropy(model(xb), yb) + regularizer()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.train(was_training)
    if loss is None:
        raise UbpError("reweighted training got no batches")
    return float(loss.detach())
