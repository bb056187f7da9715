"""AArch64 cost without a device: executed-instruction counts under qemu and llvm-mca estimates.

For each case (shape, block N, sparsity) and kernel (UBP: ``wros`` on the unaligned BED mask;
ABP: ``aligned_rows`` on the aligned mask with the same number of blocks) this builds the kernel
for ``aarch64-neon`` or ``aarch64-sve``, runs one call under qemu with our counting plugin
(:mod:`ubpdsl.runtime.insncount`; SVE at each asked vector length) and reports

* executed instructions per *useful lane* (one kept weight times one pixel: ``B * N * n``),
  in total and by class (FMA, load, store, prefetch, other): **counts**, deterministic;
* kernel constants are the kernel's defaults except TILE, which is chosen per block size from
  the 32 vector registers (:func:`register_tile`), unless given;
* llvm-mca cycles per useful lane of the kernel's inner (block) loop for several cores
  (NEON: Cortex-A76, Cortex-A55, Neoverse-V1; SVE: Neoverse-V1 with its 256-bit vectors):
  **estimates** of steady-state throughput, not times (no caches, no loop overhead outside),
  each beside the model's own floor for that core (:func:`ubpdsl.autotune.mca.fma_floor`: an
  FMA-only loop of the same vector width; one FMA lane per useful lane cannot go under it).

Cycles per useful lane of a loop = llvm-mca cycles per iteration / (FMA instructions in the
body x fp32 lanes per vector), so it needs no knowledge of TILE or UNROLL.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ubpdsl.autotune.mca import block_loops, fma_floor, mca_cycles
from ubpdsl.bench_peers import Case
from ubpdsl.compiler import compile_kernel, emit
from ubpdsl.errors import UbpError
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime.cache import CompileCache
from ubpdsl.runtime.insncount import CLASSES, count_call

__all__ = ["ARM_TARGETS", "MCA_CPUS", "KERNELS", "VECTOR_REGISTERS", "register_tile", "ArmRow", "LoopCost",
           "inner_loop_cost", "call_cost", "mca_text", "measure_case", "run_cases", "write_csv", "read_csv",
           "summary", "render_markdown"]

#: Vector lengths (bits) counted per target (None: NEON, fixed 128-bit).
ARM_TARGETS: dict[str, tuple[int | None, ...]] = {"aarch64-neon": (None,), "aarch64-sve": (128, 256, 512)}
#: llvm-mca cores per target, with the vector length (bits) the core implements.
MCA_CPUS: dict[str, tuple[tuple[str, int], ...]] = {
    # neoverse-n1: the Cortex-A76's core (LLVM 22 schedules -mcpu=cortex-a76 with the Cortex-A57
    # model, one 128-bit FMLA per cycle; its Neoverse-N1 model has the A76's two FP/ASIMD pipes)
    "aarch64-neon": (("cortex-a76", 128), ("neoverse-n1", 128), ("cortex-a55", 128), ("neoverse-v1", 128)),
    "aarch64-sve": (("neoverse-v1", 256),),
}
#: (label, variant, which mask of the case) compared on the same counts.
KERNELS: tuple[tuple[str, str, str], ...] = (("ubp", "wros", "unaligned"), ("abp", "aligned_rows", "aligned"))

_FMA_MNEMONICS = ("fmla", "fmad", "fmadd", "fmls", "fmsb", "fmsub")
#: Vector registers of AArch64 (V0-V31 for NEON, Z0-Z31 for SVE).
VECTOR_REGISTERS = 32


def register_tile(N: int, registers: int = VECTOR_REGISTERS, reserved: int = 1, *, scalable: bool = False,
                  max_tile: int = 8) -> int:
    """The widest TILE whose register tile fits: N x TILE accumulators, TILE X vectors and the
    block's N weights (one register per 4 lanes), ``reserved`` registers left over.

    Any count on fixed-width NEON (a non-power-of-two tile is one register per row), a power of
    two on SVE: N=2 -> 8, N=4 -> 6 (SVE 4), N=8 -> 3 (SVE 2); at most ``max_tile``.
    """
    fits = max(1, min(max_tile, (registers - reserved - -(-N // 4)) // (N + 1)))
    if scalable:
        return 1 << (fits.bit_length() - 1)
    return fits


@dataclass(frozen=True)
class LoopCost:
    """The inner block loop of a kernel: its size and llvm-mca cycles per useful lane per core
    (``floor``: the core's FMA-throughput floor in the same unit, :func:`fma_floor`)."""

    insns: int
    fmas: int
    cycles_per_lane: dict[str, float]
    floor: dict[str, float] = field(default_factory=dict)


def inner_loop_cost(asm: str, target: str, cpus: Sequence[tuple[str, int]]) -> LoopCost | None:
    """Cost of the block loop with the most FMAs in ``asm`` (None when there is no block loop)."""
    loops = block_loops(asm)
    if not loops:
        return None

    def fmas(body: list[str]) -> int:
        return sum(1 for ins in body if ins.split(None, 1)[0] in _FMA_MNEMONICS)

    loop = max(loops, key=lambda lp: fmas(lp.body))
    nf = fmas(loop.body)
    if nf == 0:
        return None
    cyc = {cpu: mca_cycles(loop.body, target, cpu=cpu) / (nf * bits // 32) for cpu, bits in cpus}
    floor = {cpu: fma_floor(cpu, bits, target == "aarch64-sve") for cpu, bits in cpus}
    return LoopCost(len(loop.body), nf, cyc, floor)


def call_cost(obj: Path, symbol: str, x: Any, packed: Any, M: int, asm: str, target: str, *,
              sve_bits: int | None = None, cache: CompileCache | None = None) -> dict[str, float]:
    """The autotuner's AArch64 objective without a device: a *count* scaled by an *estimate*.

    Executed instructions of one call under qemu (:func:`count_call`, SVE at ``sve_bits``) times
    the llvm-mca cycles per instruction of the inner block loop on the target's default core
    (the whole tile loop when the kernel has no block loop): predicted cycles of the call.
    """
    from ubpdsl.autotune.mca import parse_loops, split_tile_loop

    counts, _ = count_call(obj, symbol, x, packed, M, sve_bits=sve_bits, cache=cache)
    main, _tree, blks, _rows = split_tile_loop(parse_loops(asm)[0])
    body = max(blks, key=lambda lp: len(lp.body)).body if blks else main.body
    cpi = mca_cycles(body, target) / max(1, len(body))
    return {"insns": float(counts.total), "cpi": cpi, "cycles": counts.total * cpi}


@dataclass
class ArmRow:
    """One kernel on one case at one vector length."""

    shape: str
    M: int
    K: int
    n: int
    N: int
    sparsity: float
    kernel: str  # "ubp" or "abp"
    variant: str
    target: str
    vl_bits: int
    constants: str
    blocks: int
    useful_lanes: int
    counts: dict[str, int]
    loop_insns: int | None
    loop_fmas: int | None
    mca: dict[str, float] = field(default_factory=dict)  # cycles per useful lane of the inner loop
    mca_floor: dict[str, float] = field(default_factory=dict)  # the core's FMA-throughput floor, same unit

    @property
    def per_lane(self) -> float:
        return self.counts["total"] / self.useful_lanes

    def class_per_lane(self, cls: str) -> float:
        return self.counts[cls] / self.useful_lanes


def measure_case(case: Case, target: str, *, vls: Sequence[int | None] | None = None,
                 constants: dict[str, Any] | None = None, cache: CompileCache | None = None,
                 asm_cache: dict | None = None, kernels: Sequence[tuple[str, str, str]] = KERNELS) -> list[ArmRow]:
    """Count UBP and ABP kernels on one case (every vector length of ``target``); outputs checked."""
    import numpy as np

    if target not in ARM_TARGETS:
        raise UbpError(f"unknown AArch64 target {target!r}: choose one of {', '.join(ARM_TARGETS)}")
    vls = list(ARM_TARGETS[target] if vls is None else vls)
    asm_cache = {} if asm_cache is None else asm_cache
    rows = []
    for label, variant, which in kernels:
        problem = getattr(case, which)
        kernel = VARIANTS[variant]
        tile = register_tile(case.N, scalable=target == "aarch64-sve")
        consts = {"TILE": tile} if "TILE" in kernel.constexprs else {}
        consts.update({k: v for k, v in (constants or {}).items() if k in kernel.constexprs})
        ck = compile_kernel(kernel, problem, target, constants=consts, cache=cache)
        key = (variant, problem.M, problem.K, problem.N, target, tuple(sorted(consts.items())))
        if key not in asm_cache:
            asm = emit(kernel, problem, target, "asm", constants=consts)
            asm_cache[key] = inner_loop_cost(asm, target, MCA_CPUS[target])
        loop = asm_cache[key]
        ref = problem.weight.astype(np.float64) @ case.x.astype(np.float64)
        tol = 1e-4 * (np.abs(problem.weight) @ np.abs(case.x)).max(initial=1.0)
        B = len(problem.rows)
        for vl in vls:
            counts, y = count_call(ck.obj, ck.symbol, case.x, ck.packed, problem.M, sve_bits=vl, cache=cache)
            if not np.allclose(y, ref, rtol=1e-4, atol=tol):
                raise UbpError(f"{case.label}: {variant} on {target} (VL {vl or 128}) computed a wrong result")
            rows.append(ArmRow(case.shape, case.M, case.K, case.n, case.N, case.sparsity, label, variant, target,
                               vl or 128, ",".join(f"{k}={v}" for k, v in sorted(ck.constants.items())), B,
                               B * case.N * case.n, counts.as_dict(),
                               loop.insns if loop else None, loop.fmas if loop else None,
                               dict(loop.cycles_per_lane) if loop else {}, dict(loop.floor) if loop else {}))
    return rows


def run_cases(specs: Iterable[Callable[[], Case]], target: str, *, vls: Sequence[int | None] | None = None,
              constants: dict[str, Any] | None = None, cache: CompileCache | None = None,
              progress: Callable[[Case, list[ArmRow]], None] | None = None) -> list[ArmRow]:
    """:func:`measure_case` over built-on-demand cases."""
    out: list[ArmRow] = []
    asm_cache: dict = {}
    for spec in specs:
        case = spec()
        rows = measure_case(case, target, vls=vls, constants=constants, cache=cache, asm_cache=asm_cache)
        out += rows
        if progress:
            progress(case, rows)
    return out


def _mca_cpus(rows: Sequence[ArmRow]) -> list[str]:
    return sorted({cpu for r in rows for cpu in r.mca})


def write_csv(rows: Sequence[ArmRow], path: Path) -> None:
    """One line per (case, kernel, vector length): counts, per-lane counts and mca estimates."""
    cpus = _mca_cpus(rows)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["shape", "M", "K", "n", "N", "sparsity", "kernel", "variant", "target", "vl_bits", "constants",
                    "blocks", "useful_lanes", *CLASSES, "total", "insns_per_lane",
                    *[f"{c}_per_lane" for c in CLASSES], "loop_insns", "loop_fmas",
                    *[f"mca_{c}_cycles_per_lane_est" for c in cpus],
                    *[f"mca_{c}_floor_cycles_per_lane" for c in cpus]])
        for r in rows:
            d = asdict(r)
            w.writerow([d[k] for k in ("shape", "M", "K", "n", "N", "sparsity", "kernel", "variant", "target",
                                       "vl_bits", "constants", "blocks", "useful_lanes")]
                       + [r.counts[c] for c in (*CLASSES, "total")] + [f"{r.per_lane:.4f}"]
                       + [f"{r.class_per_lane(c):.4f}" for c in CLASSES] + [r.loop_insns, r.loop_fmas]
                       + [f"{r.mca[c]:.4f}" if c in r.mca else "" for c in cpus]
                       + [f"{r.mca_floor[c]:.4f}" if c in r.mca_floor else "" for c in cpus])


def read_csv(path: Path) -> list[ArmRow]:
    """The rows of a CSV written by :func:`write_csv` (to merge runs into one report)."""
    rows = []
    try:
        with open(path, newline="") as f:
            for d in csv.DictReader(f):
                cpus = [k[4:-len("_cycles_per_lane_est")] for k in d if k.startswith("mca_") and k.endswith("_est")]
                rows.append(ArmRow(
                    d["shape"], int(d["M"]), int(d["K"]), int(d["n"]), int(d["N"]), float(d["sparsity"]),
                    d["kernel"], d["variant"], d["target"], int(d["vl_bits"]), d["constants"], int(d["blocks"]),
                    int(d["useful_lanes"]), {c: int(d[c]) for c in (*CLASSES, "total")},
                    int(d["loop_insns"]) if d["loop_insns"] else None,
                    int(d["loop_fmas"]) if d["loop_fmas"] else None,
                    {c: float(d[f"mca_{c}_cycles_per_lane_est"]) for c in cpus if d[f"mca_{c}_cycles_per_lane_est"]},
                    {c: float(d[f"mca_{c}_floor_cycles_per_lane"]) for c in cpus
                     if d.get(f"mca_{c}_floor_cycles_per_lane")}))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise UbpError(f"{path}: not an arm_counts CSV ({type(e).__name__}: {e})") from None
    return rows


def _geo(vals: Iterable[float]) -> float:
    vals = list(vals)
    if not vals:
        return float("nan")
    if min(vals) <= 0:  # a class that never executes (e.g. no prefetch): its geomean is 0
        return 0.0
    return math.exp(sum(map(math.log, vals)) / len(vals))


def summary(rows: Sequence[ArmRow]) -> list[dict[str, Any]]:
    """Geomeans over shapes per (target, VL, N, sparsity, kernel), and UBP / ABP."""
    groups: dict[tuple, list[ArmRow]] = {}
    for r in rows:
        groups.setdefault((r.target, r.vl_bits, r.N, r.sparsity, r.kernel), []).append(r)
    out = []
    for (target, vl, N, s, kernel), rs in sorted(groups.items()):
        item = {"target": target, "vl_bits": vl, "N": N, "sparsity": s, "kernel": kernel, "cases": len(rs),
                "insns_per_lane": _geo(r.per_lane for r in rs)}
        for c in CLASSES:
            item[f"{c}_per_lane"] = _geo(r.class_per_lane(c) for r in rs)
        for cpu in _mca_cpus(rs):
            item[f"mca_{cpu}"] = _geo(r.mca[cpu] for r in rs if cpu in r.mca)
            floors = {r.mca_floor[cpu] for r in rs if cpu in r.mca_floor}
            if floors:
                item[f"mca_floor_{cpu}"] = min(floors)
        item["loop_insns"] = rs[0].loop_insns
        item["loop_fmas"] = rs[0].loop_fmas
        out.append(item)
    return out


def mca_text(est: float | None, floor: float | None) -> str:
    """An estimate beside its floor: ``0.2525 (floor 0.2500)``; ``-`` without an estimate."""
    if est is None:
        return "-"
    return f"{est:.4f}" + (f" (floor {floor:.4f})" if floor is not None else "")


def render_markdown(rows: Sequence[ArmRow], command: str, baseline: Sequence[ArmRow] | None = None) -> str:
    """The report: geomean table (and, if given, the same table for a baseline run), then per case."""
    cpus = _mca_cpus(rows)
    lines = ["# AArch64 instruction counts and llvm-mca estimates", "",
             "Counts: executed instructions of one kernel call under qemu-aarch64 (our TCG plugin, kernel "
             "function only), divided by useful lanes (B x N x n: one kept weight times one pixel). "
             "Estimates: llvm-mca steady-state cycles per useful lane of the inner block loop, beside the "
             "model's floor for that core (a generated loop of independent FMAs of the same vector width: "
             "one FMA lane per useful lane cannot go under it). Neither is a time.", "", f"Command: `{command}`", ""]

    def table(rs: Sequence[ArmRow], title: str) -> None:
        lines.extend([f"## {title}", "",
                      "| target | VL | N | sparsity | kernel | insns/lane | FMA | load | store | prefetch | other "
                      "| loop insns/FMAs | " + " | ".join(f"mca {c} (est.)" for c in cpus) + " |",
                      "|---" * (12 + len(cpus)) + "|"])
        for it in summary(rs):
            loop = f"{it['loop_insns']}/{it['loop_fmas']}" if it["loop_insns"] else "-"
            lines.append(
                f"| {it['target']} | {it['vl_bits']} | {it['N']} | {it['sparsity']:.0%} | {it['kernel']} | "
                f"{it['insns_per_lane']:.3f} | " + " | ".join(f"{it[f'{c}_per_lane']:.3f}" for c in CLASSES)
                + f" | {loop} | " + " | ".join(mca_text(it.get(f"mca_{c}"), it.get(f"mca_floor_{c}")) for c in cpus)
                + " |")
        ratio = {}
        for it in summary(rs):
            ratio.setdefault((it["target"], it["vl_bits"], it["N"], it["sparsity"]), {})[it["kernel"]] = it
        lines.extend(["", "UBP / ABP (geomean instructions per lane):", ""])
        for (t, vl, N, s), d in sorted(ratio.items()):
            if "ubp" in d and "abp" in d:
                ubp_abp = d["ubp"]["insns_per_lane"] / d["abp"]["insns_per_lane"]
                lines.append(f"- {t} VL {vl} N={N} {s:.0%}: {ubp_abp:.3f}")
        lines.append("")

    table(rows, "Geomean over shapes")
    if baseline:
        table(baseline, "Baseline (same shapes, before)")
    lines.extend(["## Per case", "", "| shape | N | sparsity | kernel | VL | insns/lane | FMA/lane | loop insns/FMAs "
                  "| " + " | ".join(f"mca {c}" for c in cpus) + " |", "|---" * (8 + len(cpus)) + "|"])
    for r in rows:
        loop = f"{r.loop_insns}/{r.loop_fmas}" if r.loop_insns else "-"
        lines.append(f"| {r.shape} | {r.N} | {r.sparsity:.0%} | {r.kernel} | {r.vl_bits} | {r.per_lane:.3f} | "
                     f"{r.class_per_lane('fma'):.3f} | {loop} | "
                     + " | ".join(mca_text(r.mca.get(c), r.mca_floor.get(c)) for c in cpus) + " |")
    return "\n".join(lines) + "\n"
