"""llvm-mca estimates of our NEON inner block loop under every core model the AArch64 report uses.

    .venv/bin/python benchmarks/arm_mca_models.py [--shape r18_4] [--blocks 2 4 8]

For UBP (``wros``) and ABP (``aligned_rows``) at N = 2 / 4 / 8 with the NEON target's shipped
constants and the register tile of :func:`ubpdsl.armcost.register_tile`: cycles per useful lane of
the inner block loop beside the model's FMA floor, and which scheduling model llvm-mca really
uses for each ``-mcpu`` (LLVM maps some cores onto another core's model). Estimates, not times;
no qemu run (the loop does not depend on the weights), so it takes a minute.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_header  # noqa: E402

from ubpdsl import armcost  # noqa: E402
from ubpdsl.autotune.mca import scheduling_model  # noqa: E402
from ubpdsl.benchsuite import SUITE, shape_cases  # noqa: E402
from ubpdsl.compiler import emit  # noqa: E402
from ubpdsl.kernels import VARIANTS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default=next(iter(SUITE)), choices=list(SUITE))
    ap.add_argument("--blocks", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    target = "aarch64-neon"
    cpus = armcost.MCA_CPUS[target]
    print(machine_header())
    print("llvm-mca cycles per useful lane of the NEON inner block loop (estimate (floor)); model used:")
    print("| N | kernel | loop | " + " | ".join(f"{c} ({scheduling_model(c)} model)" for c, _ in cpus) + " |")
    print("|---|---|---|" + "---|" * len(cpus))
    for N in args.blocks:
        case = shape_cases([args.shape], [0.75], [N], pretrained=False)[0]()
        for label, variant, which in armcost.KERNELS:
            kernel = VARIANTS[variant]
            consts = {"TILE": armcost.register_tile(N)} if "TILE" in kernel.constexprs else {}
            asm = emit(kernel, getattr(case, which), target, "asm", constants=consts)
            cost = armcost.inner_loop_cost(asm, target, cpus)
            if cost is None:
                print(f"| {N} | {label} | no block loop found | " + " | " * len(cpus))
                continue
            cells = [armcost.mca_text(cost.cycles_per_lane.get(c), cost.floor.get(c)) for c, _ in cpus]
            print(f"| {N} | {label} | {cost.insns}/{cost.fmas} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
