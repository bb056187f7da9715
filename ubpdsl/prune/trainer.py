"""A small built-in trainer: dense training and gradual prune-and-fine-tune.

For the examples and tests (in-memory tensors, cross-entropy, any torch optimizer).
Real projects call :class:`~ubpdsl.prune.sparsifier.UnalignedBlockSparsifier` from
their own loop; :func:`fit` shows the protocol::

    for step in range(total_steps):
        loss = loss_fn(model(x), y); loss.backward()
        sparsifier.accumulate_importance()           # only needed for importance="taylor"
        optimizer.step(); optimizer.zero_grad()
        if schedule.is_update_step(step):
            for g in sparsifier.groups:               # every layer ramps to its own target
                g["sparsity_level"] = schedule.sparsity_at(step, final=target[g])
            sparsifier.step()                         # re-select the masks

Steps are optimizer steps. After the schedule's last update (``schedule.end_step``) the
masks stay fixed and the remaining steps fine-tune the kept weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import UbpError
from ubpdsl.prune.schedule import CubicSchedule
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier

__all__ = ["MaskUpdate", "evaluate", "fit", "minibatches"]


@dataclass(frozen=True)
class MaskUpdate:
    """One mask re-selection during :func:`fit`."""

    step: int
    sparsity: float  # the default-target layers' sparsity level set at this update
    achieved: float  # fraction of zeros over all pruned layers after the update
    loss: float  # training loss of the step's batch


def minibatches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled mini-batches (a new permutation each epoch; the last partial batch is dropped)."""
    n = len(y)
    if n == 0:
        raise UbpError("no training data")
    batch_size = min(batch_size, n)
    while True:
        perm = torch.randperm(n, generator=generator)
        for lo in range(0, n - batch_size + 1, batch_size):
            idx = perm[lo : lo + batch_size]
            yield x[idx], y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    was_training = model.training
    model.eval()
    correct = 0
    for lo in range(0, len(y), batch_size):
        correct += int((model(x[lo : lo + batch_size]).argmax(1) == y[lo : lo + batch_size]).sum())
    model.train(was_training)
    return correct / max(1, len(y))


def _zero_fraction(sparsifier: UnalignedBlockSparsifier) -> float:
    zeros = total = 0
    for g in sparsifier.groups:
        mask = sparsifier.state[g["tensor_fqn"]]["mask"]
        zeros += mask.numel() - int(mask.count_nonzero())
        total += mask.numel()
    return zeros / max(1, total)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    steps: int,
    batch_size: int = 64,
    seed: int = 0,
    sparsifier: UnalignedBlockSparsifier | None = None,
    schedule: CubicSchedule | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    progress: bool = False,
    regularizer: Callable[[], torch.Tensor] | None = None,
    also: Sequence[Any] = (),
) -> list[MaskUpdate]:
    """Train ``model`` for ``steps`` optimizer steps; with a sparsifier, prune gradually.

    ``sparsifier`` must already be prepared on ``model``. Each layer ramps along
    ``schedule`` to the ``sparsity_level`` it had when :func:`fit` was called (its
    target), so per-layer overrides keep their own targets; ``schedule.final_sparsity``
    must equal the sparsifier's default level. ``regularizer()``, if given, is added to every
    step's loss (e.g. :class:`~ubpdsl.prune.reweighted.ReweightedGroupRegularizer`). Returns the
    mask updates made. ``also`` holds further prepared sparsifiers (e.g. an
    :class:`~ubpdsl.prune.activation.ActivationSparsifier`) whose layers ramp along the same
    schedule to their own targets; ``achieved`` in the updates counts ``sparsifier`` only.
    """
    if also and sparsifier is None:
        raise UbpError("fit(also=...) needs a sparsifier and a schedule")
    if (sparsifier is None) != (schedule is None):
        raise UbpError("fit() needs both a sparsifier and a schedule, or neither")
    if steps < 1:
        raise UbpError(f"steps must be >= 1, got {steps}")
    targets: dict[str, float] = {}
    if sparsifier is not None and schedule is not None:
        default = sparsifier.defaults["sparsity_level"]
        if abs(schedule.final_sparsity - default) > 1e-9:
            raise UbpError(f"schedule ends at sparsity {schedule.final_sparsity} but the sparsifier targets {default}")
        if schedule.end_step >= steps:
            raise UbpError(
                f"the schedule's last mask update is at step {schedule.end_step}, but training has only {steps} steps"
            )
        targets = {g["tensor_fqn"]: float(g["sparsity_level"]) for sp in (sparsifier, *also) for g in sp.groups}
        taylor = any(g["importance"] == "taylor" for g in sparsifier.groups)
    else:
        taylor = False

    from tqdm import tqdm

    generator = torch.Generator().manual_seed(seed)
    batches = minibatches(x, y, batch_size, generator)
    updates: list[MaskUpdate] = []
    model.train()
    with tqdm(range(steps), desc="training", unit="step", disable=not progress, leave=False) as bar:
        for step in bar:
            xb, yb = next(batches)
            loss = loss_fn(model(xb), yb)
            if regularizer is not None:
                loss = loss + regularizer()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if taylor:
                sparsifier.accumulate_importance()
            optimizer.step()
            if lr_scheduler is not None:
                lr_scheduler.step()
            if sparsifier is not None and schedule.is_update_step(step):
                level = schedule.sparsity_at(step)
                for sp in (sparsifier, *also):
                    for g in sp.groups:
                        g["sparsity_level"] = schedule.sparsity_at(step, final=targets[g["tensor_fqn"]])
                    sp.step()
                updates.append(MaskUpdate(step, level, _zero_fraction(sparsifier), float(loss.detach())))
                bar.set_postfix(sparsity=f"{updates[-1].achieved:.3f}")
    model.eval()
    return updates
