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
        # whole tiles of TILE=2 registers cover n (the tail tile overlaps): the analytical FMA count
        assert int(r["fma"]) == B * N * math.ceil(n / (2 * bits // 32)) * 2
        parts = sum(int(r[c]) for c in ("fma", "load", "store", "prefetch", "other"))
        assert parts == int(r["total"]) > int(r["fma"])
        mca = [float(v) for k, v in r.items() if k.startswith("mca_") and v]
        assert mca and all(v > 0 for v in mca)
    assert "estimate" in (tmp_path / f"{stem}.md").read_text().lower()


def test_arm_bench_rejects_vl_on_neon(tmp_path):
    res = _cli("bench", "--target", "aarch64-neon", "--vl", "256", "--out", str(tmp_path))
    assert res.returncode == 1 and "error:" in res.stderr and "Traceback" not in res.stderr
