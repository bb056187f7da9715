"""Gradual pruning schedule: the cubic sparsity ramp of Zhu & Gupta (2017).

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3      for t0 <= t <= t0 + n * dt

Masks are re-selected every ``dt`` steps, at ``t = t0, t0 + dt, ..., t0 + n * dt``
(``n + 1`` updates); the sparsity between two updates is the one set at the last
update. Before ``t0`` the model is dense-trained at ``s_i``; after ``t0 + n * dt`` the
masks stay fixed at ``s_f`` and training continues as fine-tuning.

A "step" is whatever unit the caller counts in (optimizer steps or epochs).
Per-layer targets are supported through :meth:`CubicSchedule.sparsity_at`'s
``final`` argument: every layer follows its own cubic from ``s_i`` to its target.
"""

from __future__ import annotations

from dataclasses import dataclass

from ubpdsl.errors import UbpError

__all__ = ["CubicSchedule", "cubic_sparsity"]


def cubic_sparsity(t: float, s_i: float, s_f: float, t0: float, n: int, dt: float) -> float:
    """The raw cubic formula, with ``t`` clamped to ``[t0, t0 + n * dt]``."""
    if n <= 0 or dt <= 0:
        raise UbpError(f"cubic schedule needs n >= 1 and dt > 0, got n={n}, dt={dt}")
    x = (t - t0) / (n * dt)
    x = min(1.0, max(0.0, x))
    return s_f + (s_i - s_f) * (1.0 - x) ** 3


@dataclass(frozen=True)
class CubicSchedule:
    """When to re-select masks and at which sparsity.

    Args:
        final_sparsity: ``s_f``, the target reached at ``end_step``.
        num_updates: ``n``; there are ``n + 1`` mask updates, the first at ``s_i``.
        update_every: ``dt``, steps between two mask updates.
        start_step: ``t0``, the first mask update.
        initial_sparsity: ``s_i`` (usually 0).
    """

    final_sparsity: float
    num_updates: int
    update_every: int = 1
    start_step: int = 0
    initial_sparsity: float = 0.0

    def __post_init__(self) -> None:
        for label, s in (("final", self.final_sparsity), ("initial", self.initial_sparsity)):
            if not 0.0 <= s < 1.0:
                raise UbpError(f"{label} sparsity must be in [0, 1), got {s}")
        if self.num_updates < 1:
            raise UbpError(f"num_updates must be >= 1, got {self.num_updates}")
        if self.update_every < 1:
            raise UbpError(f"update_every must be >= 1, got {self.update_every}")
        if self.start_step < 0:
            raise UbpError(f"start_step must be >= 0, got {self.start_step}")

    @property
    def end_step(self) -> int:
        """The step of the last mask update, where the sparsity reaches ``final_sparsity``."""
        return self.start_step + self.num_updates * self.update_every

    def update_steps(self) -> list[int]:
        """All steps at which the masks are re-selected."""
        return [self.start_step + k * self.update_every for k in range(self.num_updates + 1)]

    def is_update_step(self, step: int) -> bool:
        """Whether masks are re-selected at ``step``."""
        offset = step - self.start_step
        return 0 <= offset <= self.num_updates * self.update_every and offset % self.update_every == 0

    def sparsity_at(self, step: int, final: float | None = None) -> float:
        """Sparsity in force at ``step`` (piecewise constant between updates).

        ``final`` overrides ``final_sparsity`` for one layer with its own target.
        """
        s_f = self.final_sparsity if final is None else final
        if step < self.start_step:
            return self.initial_sparsity
        # The last update at or before `step`.
        k = min(self.num_updates, (step - self.start_step) // self.update_every)
        t = self.start_step + k * self.update_every
        return cubic_sparsity(
            t, self.initial_sparsity, s_f, self.start_step, self.num_updates, self.update_every
        )
