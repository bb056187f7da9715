"""Run and time a kernel from Python: :func:`run_kernel` and :func:`do_bench` (like ``triton.testing``).

:func:`run_kernel` builds any DSL kernel (a shipped variant, a user's ``@ubl.kernel`` or a
``FILE.py:name`` spec) for one layer and target and runs it on numpy or torch arrays: natively on
the host, under qemu for the AArch64 targets. :func:`do_bench` times functions with the package's
one timing loop (:func:`ubpdsl.autotune.measure.interleaved_samples`, via
:func:`ubpdsl.benchsuite.interleaved_medians`). See docs/dsl.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ubpdsl.errors import MaskError, UbpError

__all__ = ["blocks_of", "do_bench", "run_kernel"]


def _numpy(a: Any, what: str) -> np.ndarray:
    if hasattr(a, "detach") and hasattr(a, "cpu"):  # a torch tensor
        a = a.detach().cpu().numpy()
    arr = np.asarray(a)
    if arr.ndim != 2:
        raise UbpError(f"{what} must be a 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise UbpError(f"{what} must be numeric, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, np.float32)


def blocks_of(weight: Any, block: int) -> tuple[np.ndarray, np.ndarray]:
    """N x 1 blocks (rows, cols) covering every non-zero of a dense [M, K] weight, at any row.

    Per column, a block starts at the first non-zero row not yet covered (moved up where it would
    run past row M - N); a column whose non-zeros no set of non-overlapping blocks covers is a
    :class:`MaskError`.
    """
    w = _numpy(weight, "the weight")
    M, K = w.shape
    if not isinstance(block, int) or isinstance(block, bool) or not 1 <= block <= M:
        raise MaskError(f"block must be an int in 1..{M} (the weight's rows), got {block!r}")
    rows: list[int] = []
    cols: list[int] = []
    for c in range(K):
        nz = np.flatnonzero(w[:, c])
        starts: list[int] = []
        end = 0
        for r in nz:
            if r >= end:
                starts.append(int(r))
                end = int(r) + block
        limit = M - block
        for i in range(len(starts) - 1, -1, -1):  # from the bottom: keep inside the weight, no overlap
            starts[i] = min(starts[i], limit)
            limit = starts[i] - block
        covered = np.zeros(M, bool)
        for s in starts:
            covered[max(s, 0):s + block] = True
        if (starts and starts[0] < 0) or not covered[nz].all():
            raise MaskError(f"column {c}: its non-zeros cannot be covered by non-overlapping {block} x 1 blocks")
        rows += starts
        cols += [c] * len(starts)
    order = np.lexsort((np.asarray(cols), np.asarray(rows)))
    return np.asarray(rows, np.int64)[order], np.asarray(cols, np.int64)[order]


def run_kernel(kernel: Any, weight_or_mask: Any, x: Any, target: str = "host", *, block: int | None = None,
               constants: Mapping[str, Any] | None = None, specialize: bool = False, sve_bits: int | None = None,
               check_bounds: bool = False, name: str = "layer") -> Any:
    """Y = W @ x computed by ``kernel`` built for ``target``; the same array type as ``x``.

    ``kernel``: a ``@ubl.kernel`` function or a variant spec (``"wros"``, ``"FILE.py:name"``).
    ``weight_or_mask``: a :class:`ubpdsl.masks.LayerMask` or :class:`ubpdsl.compiler.Problem`, or a
    dense [M, K] weight (numpy or torch) with ``block=N``: its non-zeros are covered by N x 1 blocks
    (:func:`blocks_of`). ``x``: [K, n] (numpy or torch; a torch result is a CPU float32 tensor).
    ``target``: ``"host"``, ``"aarch64-neon"`` or ``"aarch64-sve"`` (AArch64 runs under qemu;
    ``sve_bits`` is the SVE vector length there, default 256). ``constants`` override the kernel's
    constexpr defaults; ``specialize`` bakes the mask into the code; ``check_bounds`` builds a
    checking kernel. Builds go through the compile cache, so a repeated call is cheap.
    """
    from ubpdsl.compiler import Problem, compile_kernel
    from ubpdsl.kernels import get_variant
    from ubpdsl.language.core import KernelFunction

    kern = kernel if isinstance(kernel, KernelFunction) else get_variant(str(kernel))
    if isinstance(weight_or_mask, Problem):
        problem = weight_or_mask
    elif hasattr(weight_or_mask, "rows") and hasattr(weight_or_mask, "block"):
        problem = Problem.from_mask(weight_or_mask)
    else:
        if block is None:
            raise UbpError("run_kernel: a dense weight needs block=N (the rows of one block)")
        w = _numpy(weight_or_mask, "the weight")
        rows, cols = blocks_of(w, block)
        problem = Problem(name, w.shape[0], w.shape[1], block, rows, cols, w)
    xs = _numpy(x, "x")
    if xs.shape[0] != problem.K:
        raise UbpError(f"x has {xs.shape[0]} rows; the weight has K = {problem.K} columns")
    ck = compile_kernel(kern, problem, target, constants=dict(constants or {}), specialize=specialize,
                        check_bounds=check_bounds)
    bits = sve_bits if sve_bits is not None else (256 if ck.target.scalable else None)
    y = ck(xs, sve_bits=bits)
    if hasattr(x, "detach"):
        import torch

        return torch.from_numpy(np.ascontiguousarray(y))
    return y


def do_bench(fn: Callable[[], Any] | Mapping[str, Callable[[], Any]], *, min_time: float = 0.3,
             cache: str | None = "warm", max_reps: int = 200) -> float | dict[str, float]:
    """Median seconds per call of ``fn`` -- or of each function of a mapping, timed interleaved
    (each round calls them in a fresh random order, so they share the machine's state).

    ``cache``: ``"warm"`` (a call right before each sample), ``"cold"`` (the caches scrubbed
    before every call, as for a layer inside a network) or None. Report ratios between functions
    of the same call, not absolute times.
    """
    from ubpdsl.benchsuite import interleaved_medians

    fns = dict(fn) if isinstance(fn, Mapping) else {"fn": fn}
    if not fns or not all(callable(f) for f in fns.values()):
        raise UbpError("do_bench needs a function or a mapping of name -> function")
    times = interleaved_medians(fns, min_time=min_time, max_reps=max_reps, cache=cache)
    return times if isinstance(fn, Mapping) else times["fn"]
