"""A static cost model for AArch64 kernels from ``llvm-mca``: an *estimate*, not a measurement.

Without AArch64 hardware the tuner ranks candidates by predicted cycles. The generated
assembly is split into loops using the loop comments ``llc`` writes (``Loop Header: Depth=d``,
``in Loop: Header=BB0_7``, ``Parent Loop ...``); ``llvm-mca`` (``-mcpu=cortex-a76`` for NEON,
``-mcpu=neoverse-v1`` for SVE) gives the steady-state cycles per iteration of each loop body
(child loops excluded), and these are multiplied by the trip counts the kernel structure
implies for the layer:

* the main tile loop (the first depth-1 loop) runs ``ceil(n / (TILE * lanes))`` times
  (SVE: lanes of a 256-bit Neoverse V1 vector);
* its deepest loops are the block loops: ``B / UNROLL`` iterations per tile in total
  (B = kept blocks), spread over the sibling copies (one per row phase);
* shallower leaf loops are row loops (``M`` iterations per tile);
* the non-loop code between (per row group) runs ``M / N`` times per tile for
  output-stationary kernels, ``M`` times otherwise;
* a tile loop with no inner loop (everything unrolled: mask-specialised) costs its whole body.

It ignores caches and remainder tiles: use it to rank configurations, and label every number
from it as an estimate (the CLI and summary do).
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ubpdsl.errors import BuildError, UbpError

__all__ = ["Loop", "parse_loops", "split_tile_loop", "block_loops", "mca_cycles", "fma_floor", "estimate_cycles",
           "estimate_label"]



def _model(target: str) -> tuple[str, int]:
    """(llvm-mca -mcpu, fp32 lanes) of ``target``'s cost model (from the target registry)."""
    from ubpdsl.runtime.targets import get_target

    t = get_target(target)
    if t.mca_cpu is None or t.mca_lanes is None:
        raise BuildError(f"target {target} has no llvm-mca cost model")
    return t.mca_cpu, t.mca_lanes

_LABEL = re.compile(r"^(\.LBB\d+_\d+):|^\s*//\s*%bb\.(\d+):")
_HEADER = re.compile(r"This (?:Inner )?Loop Header: Depth=(\d+)")
_IN_LOOP = re.compile(r"in Loop: Header=(BB\d+_\d+) Depth=(\d+)")
_PARENT = re.compile(r"Parent Loop (BB\d+_\d+) Depth=(\d+)")


@dataclass
class Loop:
    """One natural loop of the assembly: its own instructions (without child loops)."""

    header: str
    depth: int
    parent: str | None
    body: list[str] = field(default_factory=list)
    children: list[str] = field(default_factory=list)
    order: int = 0


def estimate_label(target: str) -> str:
    from ubpdsl.runtime.qemu import qemu_available

    try:
        cpu = _model(target)[0]
    except UbpError:
        cpu = "?"
    if qemu_available():  # the tuner's objective is then ubpdsl.armcost.call_cost
        return f"estimate (qemu instruction count x llvm-mca -mcpu={cpu} cycles/instruction)"
    return f"estimate (llvm-mca -mcpu={cpu})"


def parse_loops(asm: str) -> tuple[dict[str, Loop], list[str]]:
    """The loops of the first function in ``asm`` (by header name) and its non-loop instructions."""
    loops: dict[str, Loop] = {}
    outside: list[str] = []
    current: str | None = None  # loop the current block belongs to
    label: str | None = None
    notes: list[str] | None = None  # comment lines right after a label

    def close_notes() -> str | None:
        text = "\n".join(notes or [])
        h = _HEADER.search(text)
        if h and label:
            depth = int(h.group(1))
            parent = next((p for p, d in _PARENT.findall(text) if int(d) == depth - 1), None)
            loop = loops.setdefault(label, Loop(label, depth, parent))
            loop.depth, loop.parent = depth, parent
            return label
        m = _IN_LOOP.search(text)
        if m:
            loops.setdefault(m.group(1), Loop(m.group(1), int(m.group(2)), None))
            return m.group(1)
        return None

    for raw in asm.splitlines():
        line = raw.rstrip()
        m = _LABEL.match(line)
        if m:
            if notes is not None:
                current = close_notes()
            label = m.group(1)[2:] if m.group(1) else None  # ".LBB0_7" -> "BB0_7", as the comments say
            notes = [line]
            continue
        stripped = line.strip()
        if stripped.startswith("//"):
            if notes is not None:
                notes.append(stripped)
            continue
        code = stripped.split("//", 1)[0].strip()
        if not code or code.startswith(".") or code.endswith(":"):
            continue
        if notes is not None:
            current = close_notes()
            notes = None
        if current is not None:
            loops[current].body.append(code)
        else:
            outside.append(code)
    for i, (name, loop) in enumerate(loops.items()):
        loop.order = i
        if loop.parent in loops:
            loops[loop.parent].children.append(name)
    return loops, outside


def mca_cycles(instructions: list[str], target: str, triple: str = "aarch64", cpu: str | None = None, *,
               iterations: int | None = None) -> float:
    """Steady-state cycles per iteration of ``instructions`` (llvm-mca, 100 iterations unless given).

    ``cpu`` overrides the target's default ``-mcpu`` (e.g. ``cortex-a55`` for a NEON build).
    """
    if not instructions:
        return 0.0
    from ubpdsl.runtime.toolchain import tool

    cpu = cpu or _model(target)[0]
    with tempfile.TemporaryDirectory(prefix="ubp-mca-") as tmp:
        src = Path(tmp) / "body.s"
        src.write_text("\n".join(instructions) + "\n")
        iters = iterations or (100 if len(instructions) < 2000 else 3)
        proc = subprocess.run([str(tool("llvm-mca")), f"-mtriple={triple}", f"-mcpu={cpu}",
                               f"-iterations={iters}", "-all-views=false", "-summary-view", str(src)],
                              capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or ["failed"])[0]
        raise BuildError(f"llvm-mca failed: {first}")
    m = re.search(r"Total Cycles:\s+(\d+)", proc.stdout)
    it = re.search(r"Iterations:\s+(\d+)", proc.stdout)
    if not m or not it:
        raise BuildError("llvm-mca printed no cycle count")
    return int(m.group(1)) / int(it.group(1))


@functools.cache
def scheduling_model(cpu: str, triple: str = "aarch64") -> str:
    """The scheduling model llvm-mca uses for ``-mcpu=cpu``, from its resource names (``A57Unit*`` ->
    ``A57``): LLVM maps several cores onto another core's model (LLVM 22: cortex-a76 -> A57)."""
    from ubpdsl.runtime.toolchain import tool

    with tempfile.TemporaryDirectory(prefix="ubp-mca-") as tmp:
        src = Path(tmp) / "body.s"
        src.write_text("fmla v0.4s, v1.4s, v2.4s\n")
        proc = subprocess.run([str(tool("llvm-mca")), f"-mtriple={triple}", f"-mcpu={cpu}", "-iterations=1",
                               "-all-views=false", "-resource-pressure", str(src)],
                              capture_output=True, text=True, timeout=300)
    m = re.search(r"^\[[\d.]+\]\s+-\s+([A-Za-z0-9]+?)Unit", proc.stdout, re.M)
    return m.group(1) if m else "unknown"


#: Independent accumulators of the FMA-only loop: enough to hide any modelled FMA latency at full issue.
_FLOOR_ACCUMULATORS = 24


@functools.cache
def fma_floor(cpu: str, vector_bits: int, scalable: bool = False) -> float:
    """llvm-mca's throughput floor, cycles per fp32 lane, of ``cpu`` for a kernel needing one FMA lane per lane.

    A generated loop of independent vector FMAs only (NEON ``fmla v.4s``; SVE predicated
    ``fmla z.s`` when ``scalable``, ``vector_bits`` wide as the core implements it), run at two
    iteration counts so that the pipeline's fill cancels: the model's own bound, which no FMA
    kernel's inner loop can go under. Computed once per process and core.
    """
    acc = _FLOOR_ACCUMULATORS
    if scalable:
        body = [f"fmla z{i}.s, p0/m, z{acc}.s, z{acc + 1}.s" for i in range(acc)]
    else:
        body = [f"fmla v{i}.4s, v{acc}.4s, v{acc + 1}.4s" for i in range(acc)]
    lo, hi = 100, 300
    c_lo = mca_cycles(body, "", cpu=cpu, iterations=lo) * lo
    c_hi = mca_cycles(body, "", cpu=cpu, iterations=hi) * hi
    return round((c_hi - c_lo) / (hi - lo) / (acc * vector_bits // 32), 6)  # 0.0625, not 0.06249999


def split_tile_loop(loops: dict[str, Loop]) -> tuple[Loop, list[Loop], list[Loop], list[Loop]]:
    """The main tile loop, its loop tree, its block loops (deepest leaves) and row loops (other leaves)."""
    tops = [lp for lp in loops.values() if lp.depth == 1]
    if not tops:
        raise BuildError("no tile loop found in the kernel assembly")

    def subtree(lp: Loop) -> list[Loop]:
        out = [lp]
        for c in lp.children:
            out += subtree(loops[c])
        return out

    main = min(tops, key=lambda lp: lp.order)  # llc lays the main tile loop out first; remainders follow
    tree = subtree(main)
    leaves = [lp for lp in tree if not lp.children and lp is not main]
    if not leaves:
        return main, tree, [], []
    deepest = max(lp.depth for lp in leaves)
    return main, tree, [lp for lp in leaves if lp.depth == deepest], [lp for lp in leaves if lp.depth < deepest]


def block_loops(asm: str) -> list[Loop]:
    """The block loops (innermost loops of the main tile loop) of a kernel's assembly; [] if unrolled."""
    return split_tile_loop(parse_loops(asm)[0])[2]


def estimate_cycles(asm: str, target: str, *, M: int, N: int, blocks: int, n: int, tile: int, unroll: int,
                    output_stationary: bool) -> dict[str, float]:
    """Predicted cycles of one kernel call on ``target`` for a layer (see the module docstring)."""
    loops, _ = parse_loops(asm)
    lanes = _model(target)[1]
    tiles = math.ceil(n / (max(1, tile) * lanes))
    main, tree, blks, row_loops = split_tile_loop(loops)
    if not blks:
        per_tile = mca_cycles(main.body, target)
        return {"cycles": tiles * per_tile, "tiles": tiles, "per_tile": per_tile}
    mids = [lp for lp in tree if lp.children and lp is not main]
    c_blk = sum(mca_cycles(lp.body, target) for lp in blks) / len(blks)
    c_rows = sum(mca_cycles(lp.body, target) for lp in row_loops)
    c_mid = sum(mca_cycles(lp.body, target) for lp in mids)
    c_tile = mca_cycles(main.body, target)
    row_groups = math.ceil(M / N) if output_stationary else M
    per_tile = blocks / max(1, unroll) * c_blk + M * c_rows + row_groups * c_mid + c_tile
    return {"cycles": tiles * per_tile, "tiles": tiles, "per_tile": per_tile, "per_block": c_blk / max(1, unroll)}
