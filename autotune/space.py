"""The per-layer search space of the autotuner, and the rules that reject infeasible points.

A point of the space is a :class:`Config`: kernel variant (from the DSL library), its
compile-time constants (``TILE``: tile width over n in vector registers, ``UNROLL``: unroll
of the block loop, and any other knob the kernel declares in ``@ubl.kernel(tune=...)``;
:data:`KNOB_CHOICES` is their union),
data-driven vs mask-specialised, and the vector width where the target allows a choice
(x86 hosts with AVX-512 can also plan for 256-bit vectors).

The Optuna parameters are the same for every layer (a static space, which multivariate TPE
handles best); a point that does not make sense for one layer is *rejected before
compiling* by :func:`infeasible` with a reason, and points that differ only in knobs a
variant ignores collapse to one canonical config (:meth:`Config.key`), which is measured once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ubpdsl.compiler import Problem
from ubpdsl.config import DEFAULT_VARIANT, KernelConfig
from ubpdsl.errors import UbpError
from ubpdsl.kernels import VARIANTS, get_variant
from ubpdsl.runtime.targets import Target

__all__ = [
    "KNOB_CHOICES",
    "MAX_UNROLLED_BLOCKS",
    "Config",
    "Layer",
    "default_config",
    "seed_configs",
    "infeasible",
    "knob_choices",
    "suggest",
    "vector_bits_choices",
]

def knob_choices(variants: Any = None) -> dict[str, list[Any]]:
    """Values tried per constexpr knob: the union of the ``@ubl.kernel(tune=...)`` spaces the
    variants declare (default: the shipped ones), in a fixed order (Optuna needs the same
    choices in every trial of a study). A kernel's constexpr it does not declare stays at its default."""
    out: dict[str, list[Any]] = {}
    for name in sorted(variants or VARIANTS):
        for knob, values in get_variant(name).tune.items():
            have = out.setdefault(knob, [])
            have += [v for v in values if not any(type(v) is type(h) and v == h for h in have)]
    return out


#: The shipped variants' knobs (see :func:`knob_choices`).
KNOB_CHOICES: dict[str, list[Any]] = knob_choices()

#: Fully unrolled (mask-baked) kernels grow with the number of blocks: compile time is about
#: 20-60 ms per block and TILE (LLVM 22, this machine), and the code leaves the i-cache. Above
#: this many blocks x TILE they are rejected before compiling.
MAX_UNROLLED_BLOCKS = 512

#: Vector registers by architecture and vector width (bits).
_REGISTERS = {("x86_64", 512): 32, ("x86_64", 256): 16, ("x86_64", 128): 16, ("aarch64", 128): 32}



@dataclass(frozen=True)
class Layer:
    """One layer to tune: its compile problem and the number of output pixels n."""

    problem: Problem
    n: int

    @property
    def name(self) -> str:
        return self.problem.name

    @property
    def blocks(self) -> int:
        return int(len(self.problem.rows))

    @property
    def useful_flops(self) -> int:
        """2 x kept weights x n: the work a sparse kernel must do."""
        return 2 * self.blocks * self.problem.N * self.n

    @property
    def dense_flops(self) -> int:
        return 2 * self.problem.M * self.problem.K * self.n

    @property
    def aligned(self) -> bool:
        """True when every block starts at a multiple of N (an ABP mask)."""
        return bool(np.all(np.asarray(self.problem.rows) % self.problem.N == 0))


#: The autotuner's name for :class:`ubpdsl.config.KernelConfig` (one type everywhere).
Config = KernelConfig


def vector_bits_choices(target: Target) -> list[int]:
    """Legal vector widths: AVX-512 hosts may also use 256-bit vectors; others have one width."""
    if target.arch == "x86_64" and target.vector_bits == 512:
        return [512, 256]
    return [target.vector_bits]


def _canonical(variant: str, constants: dict[str, Any], specialize: bool, vector_bits: int | None,
               target: Target) -> Config:
    kernel = get_variant(variant)
    consts = {k: v for k, v in constants.items() if k in kernel.constexprs}
    spec = bool(specialize or kernel.needs_specialized)
    vb = None if vector_bits in (None, target.vector_bits) else vector_bits
    return Config(variant, consts, spec, vb)


def _defaults(kernel: Any, target: Target) -> dict[str, Any]:
    """A kernel's default constants on ``target`` (the target's :attr:`~Target.kernel_defaults` win)."""
    return {**kernel.defaults, **target.kernel_constants(kernel.constexprs, None)}


def default_config(target: Target, variant: str = DEFAULT_VARIANT) -> Config:
    """What ``ubpdsl compile`` builds without options: wros (or ``variant``) with its default constants."""
    return _canonical(variant, _defaults(get_variant(variant), target), False, None, target)


#: Output size (bytes) above which non-temporal stores of Y are worth seeding.
STREAM_BYTES = 1 << 20


def seed_configs(layer: Layer, target: Target, weights: bool) -> list[Config]:
    """Known-good starting points (enqueued before TPE samples): the default first.

    From the benchmark suite on an AVX-512 host: wros with TILE=4, UNROLL=2-4 and a prefetch
    distance of 4-16 blocks wins on the large-K (ResNet-18, FC) shapes, row panels (PANEL=32) on
    small-K layers with large n, mask-baked variants of it on mid-sized layers, non-temporal Y
    stores when Y is larger than the L2 share (AArch64 only: see :func:`infeasible`), small
    tiles and the fully unrolled kernel on small layers. Timed cold (caches scrubbed before each
    call), row panels with a write-prefetch of Y rows ahead (PANEL=32, YPREFETCH=8) and a long X
    look-ahead are robust where the warm winners lose 2-4x.
    """
    lanes = target.vector_lanes_f32
    need = max(1, math.ceil(layer.n / lanes))  # registers to cover n in one tile
    small_tile = 1 << (min(4, need).bit_length() - 1)  # a power of two (see KNOB_CHOICES)
    wide = {"TILE": small_tile, "UNROLL": 4, "PREFETCH": 4}
    seeds = [
        default_config(target),
        _canonical("wros", wide, False, None, target),
        # large K: a long look-ahead hides the L3 latency of X rows that no hardware prefetcher follows
        _canonical("wros", {"TILE": small_tile, "UNROLL": 2, "PREFETCH": 16}, False, None, target),
        _canonical("wros", {"TILE": 2, "UNROLL": 1}, False, None, target),
    ]
    if layer.problem.M > 32:  # row panels: Y written as a few long streams (small K, large n)
        seeds.append(_canonical("wros", {"TILE": small_tile, "PANEL": 32}, False, None, target))
        # cold-robust: Y rows are fetched for ownership ahead of the stores, X rows ahead of the loads
        seeds.append(_canonical("wros", {"TILE": small_tile, "PANEL": 32, "YPREFETCH": 8, "PREFETCH": 16}, False,
                                None, target))
    if layer.problem.M * layer.n * 4 > STREAM_BYTES:
        seeds.append(_canonical("wros", {**wide, "UNROLL": 1, "STREAM": True}, False, None, target))
    if weights:
        seeds.append(_canonical("wros", wide, True, None, target))
        seeds.append(_canonical("wros_unrolled", {"TILE": min(2, need)}, True, None, target))
    seeds.append(_canonical("wros", {"TILE": small_tile, "UNROLL": 2}, False, None, target))
    if target.is_aarch64:
        # The register tile that fills AArch64's 32 vector registers (TILE=6 at N=4 on NEON), without
        # (the target's default) and with software prefetch: the cost model (instruction count x
        # llvm-mca) ranks them, a device runner times them.
        from ubpdsl.armcost import register_tile

        reg_tile = register_tile(layer.problem.N, scalable=target.scalable)
        seeds.append(_canonical("wros", {"TILE": reg_tile}, False, None, target))
        seeds.append(_canonical("wros", {"TILE": reg_tile, "PREFETCH": 8, "YPREFETCH": 8}, False, None, target))
    out: list[Config] = []
    for c in seeds:
        if c not in out and infeasible(c, layer, target, weights) is None:
            out.append(c)
    return out


def infeasible(config: Config, layer: Layer, target: Target, weights: bool) -> str | None:
    """Why ``config`` cannot (or should not) be built for ``layer``, or None when it is fine."""
    try:
        kernel = config.kernel
    except UbpError as exc:
        return str(exc)
    N = layer.problem.N
    if kernel.aligned and not layer.aligned:
        return f"{config.variant} needs blocks at multiples of N={N}; this mask is unaligned"
    if config.specialize and not weights:
        return "mask-specialised kernels bake the weights, and this masks.npz has none"
    if kernel.needs_specialized:
        size = layer.blocks * max(1, int(config.constants.get("TILE", 1)))
        if size > MAX_UNROLLED_BLOCKS:
            return (f"{config.variant} unrolls every block: {layer.blocks} blocks x TILE > {MAX_UNROLLED_BLOCKS} "
                    "(compile time and code size)")
    vb = config.vector_bits or target.vector_bits
    if vb not in vector_bits_choices(target):
        return f"vector width {vb} is not legal on {target.name}"
    lanes = vb // 32
    tile = int(config.constants.get("TILE", 1))
    if target.scalable and tile & (tile - 1):
        return f"TILE={tile}: tiles of scalable vectors must be a power of two"
    # A tile wider than n (by a whole vector) only adds masked work.
    if tile > 1 and (tile - 1) * lanes >= layer.n:
        return f"TILE={tile} x {lanes} lanes is wider than n={layer.n}"
    regs = _REGISTERS.get((target.arch, vb), 16)
    if target.arch == "x86_64" and target.vector_bits == 512:
        regs = 32  # AVX-512VL: 256-bit code can use ymm16-31 too
    if kernel.layout == "rotated" or kernel.aligned:
        # Output-stationary kernels keep N x TILE accumulators plus TILE loaded x vectors.
        if N * tile + tile > regs:
            return f"N x TILE + TILE = {N * tile + tile} vector registers > {regs}: would spill"
    if config.constants.get("STREAM") and target.arch == "x86_64":
        # x86 non-temporal vector stores need aligned addresses, which Y rows only have when n is
        # a multiple of the vector width on an aligned Y; LLVM cannot assume it and splits them
        # into 8-byte movnti stores (measured 10x slower). AArch64's STNP has no such limit.
        return "STREAM on x86-64 becomes scalar movnti stores (Y alignment is unknown at compile time)"
    unroll = int(config.constants.get("UNROLL", 1))
    per_row = layer.blocks / max(1, layer.problem.M)
    if unroll > 1 and unroll > 2 * per_row:
        return f"UNROLL={unroll} > 2 x the {per_row:.1f} blocks per row: the remainder loop would do the work"
    return None


def suggest(trial: Any, layer: Layer, target: Target, weights: bool, variants: Any = None) -> Config:
    """Sample a config from an Optuna trial (the same parameter names for every layer).

    ``variants``: the variant names searched (default: the shipped ones); a knob value outside
    the sampled kernel's own ``tune=`` space leaves that knob at its default."""
    names = sorted(variants or VARIANTS)
    variant = trial.suggest_categorical("variant", names)
    kernel = get_variant(variant)
    constants = _defaults(kernel, target)  # undeclared knobs: explicit defaults (one canonical key)
    choices = knob_choices(names)
    for name in sorted(choices):
        value = trial.suggest_categorical(name, choices[name])
        if value in kernel.tune.get(name, ()):
            constants[name] = value
    specialize = trial.suggest_categorical("specialize", [False, True])
    vbs = vector_bits_choices(target)
    vector_bits = trial.suggest_categorical("vector_bits", vbs)
    return _canonical(variant, constants, specialize, vector_bits, target)


def trial_params(config: Config, target: Target, variants: Any = None) -> dict[str, Any]:
    """The Optuna parameters that :func:`suggest` maps to ``config`` (for ``enqueue_trial``)."""
    params: dict[str, Any] = {"variant": config.variant, "specialize": config.specialize,
                              "vector_bits": config.vector_bits or target.vector_bits}
    for name, choices in knob_choices(variants).items():
        params[name] = config.constants.get(name, choices[0])
    return params
