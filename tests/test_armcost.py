"""``ubpdsl bench --target aarch64-*``: counts per useful lane from qemu, llvm-mca estimates, CSV/report."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest

from ubpdsl.runtime import qemu

pytestmark = pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True, timeout=900,
                          check=False)


@pytest.mark.parametrize(("target", "vl"), [("aarch64-neon", None), ("aarch64-sve", "512")])
def test_arm_bench_quick(tmp_path, target, vl):
    args = ["bench", "--target", target, "--quick", "--shapes", "mbv2_4", "--const", "TILE=2", "--out", str(tmp_path)]
    if vl:
        args += ["--vl", vl]
    res = _cli(*args)
    assert res.returncode == 0, res.stderr
    stem = f"arm_counts_{target.split('-')[1]}"
    rows = list(csv.DictReader(open(tmp_path / f"{stem}.csv")))
    assert {r["kernel"] for r in rows} == {"ubp", "abp"}
    for r in rows:
        n, N, B, bits = int(r["n"]), int(r["N"]), int(r["blocks"]), int(r["vl_bits"])
        assert int(r["useful_lanes"]) == B * N * n
        # whole tiles of TILE=2 registers, then the tail: on NEON just enough registers (a power of
        # two) ending at n, on SVE a whole tile ending at n (overlapping): the analytical FMA count
        lanes = bits // 32
        full, rem = divmod(n, 2 * lanes)
        tail = (1 if rem <= lanes else 2) if target == "aarch64-neon" and rem else 2 * (rem > 0)
        assert int(r["fma"]) == B * N * (2 * full + tail)
        parts = sum(int(r[c]) for c in ("fma", "load", "store", "prefetch", "other"))
        assert parts == int(r["total"]) > int(r["fma"])
        est = {k[4:-len("_cycles_per_lane_est")]: float(v) for k, v in r.items() if k.endswith("_est") and v}
        floor = {k[4:-len("_floor_cycles_per_lane")]: float(v) for k, v in r.items()
                 if k.endswith("_floor_cycles_per_lane")}
        assert est and set(est) == set(floor)
        # a real kernel's inner loop is at or above the core's FMA-throughput floor (4-digit rounding)
        assert all(0 < floor[c] <= est[c] + 1e-4 for c in est), (est, floor)
    from ubpdsl.armcost import read_csv, write_csv

    write_csv(read_csv(tmp_path / f"{stem}.csv"), tmp_path / "again.csv")  # reports merge from saved runs
    assert (tmp_path / "again.csv").read_text() == (tmp_path / f"{stem}.csv").read_text()
    md = (tmp_path / f"{stem}.md").read_text()
    assert "estimate" in md.lower() and "(floor 0." in md
    assert "(floor 0." in res.stdout


@pytest.mark.parametrize(("cpu", "bits", "scalable"), [("cortex-a76", 128, False), ("cortex-a55", 128, False),
                                                       ("neoverse-v1", 128, False), ("neoverse-v1", 256, True)])
def test_fma_floor_is_llvm_mca_fma_throughput(tmp_path, cpu, bits, scalable):
    """The floor is the core model's FMA throughput: checked against llvm-mca's own IPC of a
    differently written FMA loop (by-element FMAs, rotating sources, 1000 iterations)."""
    import re

    from ubpdsl.autotune.mca import fma_floor
    from ubpdsl.runtime.toolchain import tool

    if scalable:
        body = [f"fmla z{8 + i}.s, z{2 + i % 4}.s, z{i % 2}.s[{i % 4}]" for i in range(20)]  # Zm in z0-z7
    else:
        body = [f"fmla v{i}.4s, v{20 + i % 4}.4s, v{28 + i % 2}.s[{i % 4}]" for i in range(20)]
    src = tmp_path / "fma.s"
    src.write_text("\n".join(body) + "\n")
    out = subprocess.run([str(tool("llvm-mca")), "-mtriple=aarch64", f"-mcpu={cpu}", "-iterations=1000",
                          "-all-views=false", "-summary-view", str(src)], capture_output=True, text=True,
                         check=True).stdout
    ipc = float(re.search(r"IPC:\s+([\d.]+)", out).group(1))
    expected = 1 / (ipc * bits / 32)  # cycles per fp32 lane at the model's FMA issue rate
    assert fma_floor(cpu, bits, scalable) == pytest.approx(expected, rel=0.01)


def test_arm_bench_rejects_vl_on_neon(tmp_path):
    res = _cli("bench", "--target", "aarch64-neon", "--vl", "256", "--out", str(tmp_path))
    assert res.returncode == 1 and "error:" in res.stderr and "Traceback" not in res.stderr


def test_tuner_objective_counts_fewer_instructions_without_prefetch(compile_cache):
    """The AArch64 tuning objective (qemu count x mca CPI) sees the prefetch instructions it costs."""
    import numpy as np

    from ubpdsl.armcost import call_cost
    from ubpdsl.benchsuite import make_case
    from ubpdsl.compiler import compile_kernel, emit
    from ubpdsl.kernels import VARIANTS

    w = np.random.default_rng(5).standard_normal((64, 48)).astype(np.float32)
    case = make_case("t", "t", w, 64, 4, 0.75, "random")
    costs = {}
    for pf in (0, 8):
        consts = {"PREFETCH": pf, "YPREFETCH": 0}
        ck = compile_kernel(VARIANTS["wros"], case.unaligned, "aarch64-neon", constants=consts, cache=compile_cache)
        asm = emit(VARIANTS["wros"], case.unaligned, "aarch64-neon", "asm", constants=consts)
        costs[pf] = call_cost(ck.obj, ck.symbol, case.x, ck.packed, 64, asm, "aarch64-neon", cache=compile_cache)
    tiles = math.ceil(64 / 16)
    # every block of every tile issues one prefetch (PREFETCH=8): at least B*tiles more instructions
    assert costs[8]["insns"] - costs[0]["insns"] >= case.blocks * tiles
    assert all(c["cpi"] > 0 and c["cycles"] == c["insns"] * c["cpi"] for c in costs.values())


def test_scheduling_model_is_named_for_every_reported_core():
    """The report names the llvm-mca model behind each core; LLVM 22 maps cortex-a76 to the A57 model,
    which is why the A76's own core (neoverse-n1) is estimated too."""
    from ubpdsl.armcost import MCA_CPUS
    from ubpdsl.autotune.mca import fma_floor, scheduling_model

    cores = {c for cpus in MCA_CPUS.values() for c, _ in cpus}
    models = {c: scheduling_model(c) for c in cores}
    assert "unknown" not in models.values(), models
    assert "neoverse-n1" in cores and models["neoverse-n1"] != models["cortex-a76"]
    if models["cortex-a76"] == "A57":  # two 128-bit pipes in N1 vs one 128-bit FMLA per cycle in A57
        assert fma_floor("neoverse-n1", 128) < fma_floor("cortex-a76", 128)
