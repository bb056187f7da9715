"""Compilation targets: the host (x86-64), AArch64 NEON and AArch64 SVE.

A :class:`Target` carries everything ``opt``/``llc`` need (triple, ``-mcpu``, ``-mattr``)
plus the vector width the kernel generator should plan for.

Host detection: the CPU name is the one LLVM reports (``Host CPU:`` of ``llc --version``),
and the feature string is derived from ``/proc/cpuinfo`` flags. Features the CPU name would
imply but the (possibly virtualised) CPU does not advertise are explicitly disabled
(``-avx512f`` ...), so code built for ``host`` always runs on this machine.

AArch64 targets are fixed: NEON is ``cortex-a76`` (ARMv8.2-A + NEON, no SVE; run under
``qemu-aarch64 -cpu cortex-a76``), SVE is ``neoverse-v1`` + ``+sve`` with vector-length
agnostic code (``vector_bits`` = 128, the architectural minimum; ``scalable=True``).

A target may also set kernel constants' defaults (:attr:`Target.kernel_defaults`): on AArch64
the kernels ship without software prefetch (``PREFETCH=0``, ``YPREFETCH=0``): the cores' own
prefetchers follow the row streams, and the prefetches are only extra instructions per block and
row in the counts (docs/arm_counts.md). The knobs stay: ``--const`` and the tuner set them.
"""

from __future__ import annotations

import functools
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ubpdsl.errors import TargetError

__all__ = ["Target", "TARGET_NAMES", "get_target", "host_target"]


@dataclass(frozen=True)
class Target:
    """One code-generation target.

    Attributes:
        name: ``"host"``, ``"aarch64-neon"`` or ``"aarch64-sve"``.
        triple: LLVM target triple (``x86_64-unknown-linux-gnu``, ``aarch64-unknown-linux-gnu``).
        cpu: ``-mcpu`` for opt/llc.
        features: ``-mattr`` string for opt/llc (comma separated, ``+f``/``-f``; may be empty).
        vector_bits: SIMD register width in bits (SVE: the 128-bit minimum).
        scalable: True for SVE (vector length known only at run time).
        runner: how kernels run here: ``"native"`` (timed on this machine) or ``"qemu-aarch64"``
            (correctness only; timed by a cost model or a remote runner).
        mca_cpu: ``llvm-mca -mcpu`` of the cost model (None: no estimates for this target).
        mca_lanes: fp32 lanes the cost model assumes per vector (SVE: the modelled CPU's width).
        kernel_defaults: (constexpr, value) pairs replacing a kernel's own default on this target,
            for every kernel that declares that constexpr (given constants still win).
    """

    name: str
    triple: str
    cpu: str
    features: str
    vector_bits: int
    scalable: bool = False
    runner: str = "native"
    mca_cpu: str | None = None
    mca_lanes: int | None = None
    kernel_defaults: tuple[tuple[str, object], ...] = ()

    @property
    def arch(self) -> str:
        """``x86_64`` or ``aarch64`` (first component of the triple)."""
        return self.triple.split("-", 1)[0]

    @property
    def is_aarch64(self) -> bool:
        return self.arch == "aarch64"

    @property
    def vector_lanes_f32(self) -> int:
        """fp32 lanes in one vector register (the minimum for scalable targets)."""
        return self.vector_bits // 32

    def llvm_flags(self) -> list[str]:
        """``-mtriple/-mcpu/-mattr`` flags shared by opt and llc."""
        flags = [f"-mtriple={self.triple}", f"-mcpu={self.cpu}"]
        if self.features:
            flags.append(f"-mattr={self.features}")
        return flags

    def kernel_constants(self, constexprs: list[str], constants: dict[str, object] | None) -> dict[str, object]:
        """``constants`` over this target's :attr:`kernel_defaults` for a kernel's ``constexprs``."""
        return {**{k: v for k, v in self.kernel_defaults if k in constexprs}, **(constants or {})}

    def cache_key(self) -> dict[str, object]:
        """A JSON-serialisable dict identifying the generated code's target (not how it is run)."""
        return {k: v for k, v in asdict(self).items() if k not in _RUN_FIELDS}

    def narrowed(self, vector_bits: int | None) -> Target:
        """This target with ``vector_bits`` wide registers (the one rule, for compile, tune and export).

        On x86-64 a 256-bit build drops the AVX-512 features (AVX2 + FMA code, runs on AVX2-only
        CPUs), a 128-bit build also drops AVX (SSE code); NEON has only 128 bits; SVE's width is
        the hardware's. The name stays, so artifacts keep their file names.
        """
        if vector_bits is None or vector_bits == self.vector_bits:
            return self
        if self.scalable:
            raise TargetError(f"target {self.name}: the vector length is the hardware's (scalable); "
                              "vector_bits cannot be set")
        if vector_bits not in (128, 256) or vector_bits > self.vector_bits or self.arch != "x86_64":
            raise TargetError(f"target {self.name}: vector_bits must be 128 or 256 and at most {self.vector_bits} "
                              f"(x86-64 only), got {vector_bits}")
        drop = ("avx512",) if vector_bits == 256 else ("avx512", "avx", "fma", "f16c", "vaes", "vpclmulqdq")
        feats = [f for f in self.features.split(",") if f and not any(f[1:].startswith(d) for d in drop)]
        feats += [f"-{d}" for d in ("avx512f",) + (("avx", "fma") if vector_bits == 128 else ())]
        return replace(self, features=",".join(feats), vector_bits=vector_bits)


#: Fields of :class:`Target` that say how kernels are run or costed, not how code is generated
#: (kernel_defaults only fills in constants, which key every build themselves).
_RUN_FIELDS = ("runner", "mca_cpu", "mca_lanes", "kernel_defaults")

#: AArch64 kernels' defaults: no software prefetch (see the module docstring).
_AARCH64_DEFAULTS: tuple[tuple[str, object], ...] = (("PREFETCH", 0), ("YPREFETCH", 0))


# /proc/cpuinfo flag -> LLVM x86 feature name, for the features that matter to fp32 GEMM
# code generation. Flags absent from cpuinfo are disabled explicitly.
_X86_FEATURES: dict[str, str] = {
    "sse2": "sse2",
    "pni": "sse3",
    "ssse3": "ssse3",
    "sse4_1": "sse4.1",
    "sse4_2": "sse4.2",
    "popcnt": "popcnt",
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi1": "bmi",
    "bmi2": "bmi2",
    "abm": "lzcnt",
    "movbe": "movbe",
    "avx512f": "avx512f",
    "avx512dq": "avx512dq",
    "avx512cd": "avx512cd",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx512_bf16": "avx512bf16",
    "avx512_fp16": "avx512fp16",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
}


def _cpuinfo_flags(path: Path = Path("/proc/cpuinfo")) -> set[str]:
    try:
        text = path.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def x86_features_from_flags(flags: set[str]) -> str:
    """LLVM ``-mattr`` string enabling the listed features present in ``flags``, disabling the rest."""
    feats = [("+" if flag in flags else "-") + feat for flag, feat in _X86_FEATURES.items()]
    if "avx512f" in flags:
        # LLVM tunes AVX-512 CPUs to prefer 256-bit vectors: it would split the 512-bit vector
        # types the kernel generator emits (vector_bits = 512) unless this tuning is turned off.
        feats.append("-prefer-256-bit")
    return ",".join(feats)


def _x86_vector_bits(flags: set[str]) -> int:
    if "avx512f" in flags:
        return 512
    if "avx2" in flags:
        return 256
    return 128


@functools.cache
def host_target() -> Target:
    """The target describing this machine (detected once per process)."""
    from .toolchain import llc_host_cpu

    machine = platform.machine().lower()
    cpu = llc_host_cpu()
    flags = _cpuinfo_flags()
    if machine in ("x86_64", "amd64"):
        return Target(
            name="host",
            triple="x86_64-unknown-linux-gnu",
            cpu=cpu,
            features=x86_features_from_flags(flags),
            vector_bits=_x86_vector_bits(flags),
        )
    if machine in ("aarch64", "arm64"):
        return Target(
            name="host",
            triple="aarch64-unknown-linux-gnu",
            cpu=cpu,
            features="+neon",
            vector_bits=128,
        )
    raise TargetError(f"unsupported host architecture '{machine}': ubpdsl supports x86-64 and AArch64")


_AARCH64_NEON = Target(
    name="aarch64-neon",
    triple="aarch64-unknown-linux-gnu",
    cpu="cortex-a76",
    features="+neon",
    vector_bits=128,
    runner="qemu-aarch64",
    mca_cpu="cortex-a76",
    mca_lanes=4,
    kernel_defaults=_AARCH64_DEFAULTS,
)

_AARCH64_SVE = Target(
    name="aarch64-sve",
    triple="aarch64-unknown-linux-gnu",
    cpu="neoverse-v1",
    features="+neon,+sve",
    vector_bits=128,
    scalable=True,
    runner="qemu-aarch64",
    mca_cpu="neoverse-v1",
    mca_lanes=8,  # Neoverse V1 implements 256-bit SVE
    kernel_defaults=_AARCH64_DEFAULTS,
)

#: The target registry: every target, by name (the host's is detected on first use).
_REGISTRY: dict[str, Callable[[], Target]] = {
    "host": lambda: host_target(),
    "aarch64-neon": lambda: _AARCH64_NEON,
    "aarch64-sve": lambda: _AARCH64_SVE,
}

#: Every target name, in the order CLIs list them.
TARGET_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def get_target(name: str) -> Target:
    """The Target called ``name`` (one of :data:`TARGET_NAMES`); :class:`TargetError` otherwise."""
    make = _REGISTRY.get(name) if isinstance(name, str) else None
    if make is None:
        raise TargetError(f"unknown target {name!r}; choose one of {', '.join(TARGET_NAMES)}")
    return make()
