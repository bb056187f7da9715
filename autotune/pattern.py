"""Tuning pattern (direct 3x3 convolution) kernels: each kernel's ``tune=`` space, searched whole.

A pattern kernel's space is small (``pattern_direct``: TILE x UNROLL x ROWS x FILTERS_OUTER,
times the vector widths of the target), so it is searched exhaustively rather than sampled:
every feasible point is compiled, its output checked against torch's conv2d, and then timed --
on the host all points in one interleaved run (:func:`ubpdsl.testing.do_bench`, medians), on AArch64 targets by the
instructions one call executes under qemu (:mod:`ubpdsl.runtime.insncount`; a count, not a
time). The kernel's defaults are the reference (1.0x). ``ubpdsl tune --patterns`` calls
:func:`tune_pattern` for every pattern layer.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ubpdsl.compiler import CompiledKernel, PatternProblem, compile_kernel
from ubpdsl.errors import UbpError
from ubpdsl.kernels import PATTERN_VARIANTS, get_variant
from ubpdsl.runtime.targets import get_target

__all__ = ["PatternTuneResult", "pattern_space", "tune_pattern"]


@dataclass
class PatternTuneResult:
    """The tuned kernel of one pattern layer and every point measured (seconds or instructions)."""

    layer: str
    target: str
    unit: str  # "s" (host median) or "insns" (executed instructions under qemu)
    best: CompiledKernel
    best_constants: dict[str, Any]
    best_vector_bits: int
    default_cost: float
    best_cost: float
    costs: dict[str, float]  # "variant {constants}" -> cost
    skipped: dict[str, str]  # point -> why it was not built


def pattern_space(kernel: Any, problem: PatternProblem, lanes: int) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The feasible points of ``kernel``'s ``tune=`` space for ``problem`` (and why the others are not)."""
    names = sorted(kernel.tune)
    points, skipped = [], {}
    for values in itertools.product(*(kernel.tune[n] for n in names)):
        consts = {**kernel.defaults, **dict(zip(names, values, strict=True))}
        tile = int(consts.get("TILE", 1))
        rows = int(consts.get("ROWS", 1))
        if tile > 1 and (tile - 1) * lanes >= problem.width:
            skipped[f"{kernel.name} {consts}"] = f"TILE={tile} x {lanes} lanes is wider than a row of {problem.width}"
        elif rows > 1 and rows // 2 >= problem.height:
            skipped[f"{kernel.name} {consts}"] = f"ROWS={rows} is over twice the image height {problem.height}"
        elif rows * tile + tile > 32:
            skipped[f"{kernel.name} {consts}"] = f"ROWS x TILE + TILE = {rows * tile + tile} vector registers > 32"
        else:
            points.append(consts)
    return points, skipped


def _reference(problem: PatternProblem, x: np.ndarray) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    xt = torch.from_numpy(x.reshape(1, problem.K, problem.height, problem.width))
    return F.conv2d(xt, torch.from_numpy(problem.weight), padding=1).numpy().reshape(problem.M, problem.pixels)


def tune_pattern(problem: PatternProblem, target: str = "host", *, variants: tuple[str, ...] = (),
                 min_time: float = 0.2, seed: int = 0) -> PatternTuneResult:
    """Search every feasible point of the pattern kernels' spaces for ``problem`` on ``target``."""
    if problem.weight is None:
        raise UbpError(f"layer {problem.name}: tuning a pattern kernel needs the layer's weights")
    from ubpdsl.autotune.space import vector_bits_choices
    from ubpdsl.compiler import resolve_target

    tgt = get_target(target)
    kernels = [get_variant(v) for v in (variants or tuple(PATTERN_VARIANTS))]
    for k in kernels:
        if not k.pattern:
            raise UbpError(f"kernel {k.name!r} is not a pattern kernel (it has no ubl.PatternSparse operand)")
    x = np.random.default_rng(seed).standard_normal((problem.K, problem.pixels)).astype(np.float32)
    want = _reference(problem, x)
    tol = 1e-4 * max(1.0, float(np.abs(want).max(initial=0.0)))
    built: dict[str, tuple[CompiledKernel, dict[str, Any], int]] = {}
    skipped: dict[str, str] = {}
    default_key = None
    for bits in vector_bits_choices(tgt):  # x86 AVX-512 hosts: 256-bit vectors fit small rows better
        vt = resolve_target(tgt, bits)
        for k in kernels:
            points, why = pattern_space(k, problem, vt.vector_lanes_f32)
            skipped.update({f"{key} {bits}-bit": v for key, v in why.items()})
            for consts in ([dict(k.defaults)] if default_key is None else []) + points:
                key = f"{k.name} {consts} {bits}-bit"
                if key in built:
                    continue
                ck = compile_kernel(k, problem, tgt, constants=consts, vector_bits=bits)
                built[key] = (ck, consts, bits)
                default_key = default_key or key
    costs: dict[str, float] = {}
    if tgt.runner == "qemu-aarch64":
        from ubpdsl.runtime.insncount import count_call

        for key, (ck, _, _) in built.items():
            counts, y = count_call(ck.obj, ck.symbol, x, ck.packed, problem.M,
                                   sve_bits=256 if tgt.scalable else None)
            if not np.allclose(y, want, rtol=1e-4, atol=tol):
                raise UbpError(f"layer {problem.name}: {key} computed a wrong result on {target}")
            costs[key] = float(counts.total)
        unit = "insns"
    else:
        from ubpdsl.runtime.loader import HostKernel, aligned_copy, aligned_empty
        from ubpdsl.testing import do_bench

        xs = aligned_copy(x)
        calls = {}
        for key, (ck, _, _) in built.items():
            host = HostKernel(ck.so, ck.symbol, problem.M, problem.K)
            y = aligned_empty((problem.M, problem.pixels))
            if not np.allclose(host(xs, ck.packed, y), want, rtol=1e-4, atol=tol):
                raise UbpError(f"layer {problem.name}: {key} computed a wrong result on {target}")
            calls[key] = (lambda h=host, c=ck, out=y: h(xs, c.packed, out))
        costs = dict(do_bench(calls, min_time=min_time))
        unit = "s"
    best_key = min(costs, key=costs.get)
    ck, consts, bits = built[best_key]
    return PatternTuneResult(problem.name, target, unit, ck, consts, bits, costs[default_key], costs[best_key],
                             costs, skipped)


def tune_pattern_layers(mask_path: str, schemes_path: str, image: tuple[int, int], *, target: str = "host",
                        out_dir: str = "build", layers: tuple[str, ...] = (), variants: tuple[str, ...] = (),
                        min_time: float = 0.2, echo: Any = print) -> list[PatternTuneResult]:
    """``ubpdsl tune --patterns``: tune every pattern layer, write its best kernel to ``out_dir``
    (``<layer>.<target>.so``, ``.h``, ``.packed.bin``) and print default vs tuned."""
    from pathlib import Path

    from ubpdsl.compiler import load_pattern_problems

    problems = load_pattern_problems(mask_path, schemes_path, image, layers)
    results = []
    lines = [f"| layer | shape | default ({'us' if target == 'host' else 'insns'}) | tuned | speedup | config |",
             "|---|---|---|---|---|---|"]
    for problem in problems:
        res = tune_pattern(problem, target, variants=variants, min_time=min_time)
        res.best.save(Path(out_dir))
        scale = 1e6 if res.unit == "s" else 1.0
        lines.append(f"| {problem.name} | {problem.M}x{problem.K} {problem.height}x{problem.width} | "
                     f"{res.default_cost * scale:.0f} | {res.best_cost * scale:.0f} | "
                     f"{res.default_cost / res.best_cost:.2f}x | {res.best.variant} {res.best_constants} "
                     f"{res.best_vector_bits}-bit |")
        results.append(res)
    echo("\n".join(lines))
    return results
