"""`ubpdsl compile` end to end: masks.npz -> .so + header + packed weights, loaded and run.

Also the bad-input contract: each mistake is one line ``error: ...`` with a non-zero exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ubpdsl.compiler import random_problem
from ubpdsl.kernels import VARIANTS
from ubpdsl.masks import LayerMask, save_masks
from ubpdsl.runtime import build as rt_build
from ubpdsl.runtime.loader import HostKernel


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True,
                          check=False, cwd=cwd)


def _mask_file(tmp_path: Path, with_weights: bool = True) -> tuple[Path, dict]:
    layers = {}
    for i, (M, K) in enumerate([(24, 10), (13, 7)]):
        p = random_problem(M, K, 4, 0.6, seed=i)
        layers[f"features.{i}.conv"] = (p, LayerMask(f"features.{i}.conv", (M, K, 1, 1), 4, p.rows.astype(np.int32),
                                                     p.cols.astype(np.int32), p.weight if with_weights else None))
    path = tmp_path / "masks.npz"
    save_masks(path, [m for _, m in layers.values()])
    return path, layers


def test_compile_host_and_run_from_build_dir(tmp_path):
    masks, layers = _mask_file(tmp_path)
    out = tmp_path / "build"
    proc = _cli("compile", "--mask", str(masks), "--target", "host", "--const", "TILE=2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ubpdsl.bundle/1" and list(manifest["targets"]) == ["host"]
    assert set(manifest["layers"]) == set(layers)
    rng = np.random.default_rng(0)
    for name, (p, _) in layers.items():
        safe = name.replace(".", "_")
        so = out / "host" / f"{safe}.host.so"
        assert rt_build.check_self_contained(so)  # no DT_NEEDED, nothing undefined
        header = (out / "host" / f"{safe}.h").read_text()
        assert f"ubp_{safe}(" in header
        packed = np.fromfile(out / "host" / f"{safe}.packed.bin", dtype=np.uint8)
        x = rng.standard_normal((p.K, 19)).astype(np.float32)
        y = HostKernel(so, f"ubp_{safe}", p.M, p.K)(x, packed)
        np.testing.assert_allclose(y, p.weight @ x, rtol=1e-5, atol=1e-5)
        entry = manifest["layers"][name]["targets"]["host"]
        assert entry["constants"] == VARIANTS["wros"].resolve_constants({"TILE": 2})


BAD_INPUT = [
    (["--target", "riscv"], 2, "Invalid value for '--target'"),
    (["--layer", "nope"], 1, "has no layer 'nope'"),
    (["--variant", "aligned_rows"], 1, "not a multiple of N=4"),
    (["--const", "TILE"], 1, "--const expects NAME=VALUE"),
    (["--const", "BOGUS=1"], 1, "no constexpr parameter(s) BOGUS"),
    (["--variant", "nosuch"], 1, "unknown kernel 'nosuch'"),
]


@pytest.mark.parametrize("extra,code,message", BAD_INPUT)
def test_compile_bad_input_is_one_line(tmp_path, extra, code, message):
    masks, _ = _mask_file(tmp_path)
    proc = _cli("compile", "--mask", str(masks), "-o", str(tmp_path / "b"), *extra)
    assert proc.returncode == code
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr


def test_compile_needs_weights_and_valid_file(tmp_path):
    masks, _ = _mask_file(tmp_path, with_weights=False)
    proc = _cli("compile", "--mask", str(masks), "-o", str(tmp_path / "b"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "has no weights" in proc.stderr and "features.0.conv" in proc.stderr
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    proc = _cli("compile", "--mask", str(corrupt), "-o", str(tmp_path / "b"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and proc.stderr.startswith("error: ")


EMBED_C = Path(__file__).resolve().parents[1] / "examples" / "embed_c" / "main.c"


@pytest.mark.parametrize("target", ["host", "aarch64-neon", "aarch64-sve"])
def test_examples_embed_c_links_a_compiled_kernel(tmp_path, target):
    """examples/embed_c/main.c links a .so made by `ubpdsl compile` and prints y (AArch64: under qemu)."""
    from ubpdsl.runtime import qemu
    from ubpdsl.runtime.toolchain import run_tool, zig_cmd

    if target != "host" and (not qemu.qemu_available() or qemu.aarch64_sysroot() is None):
        pytest.skip("needs Debian's qemu-user and libc6-arm64-cross (make test installs both)")
    masks, layers = _mask_file(tmp_path)
    out = tmp_path / "build"
    proc = _cli("compile", "--mask", str(masks), "--layer", "features.0.conv", "--target", target, "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    triple = [] if target == "host" else ["-target", "aarch64-linux-gnu.2.17"]
    exe = out / target / "embed"  # next to the .so ($ORIGIN)
    run_tool([*zig_cmd(), "cc", *triple, "-O2", '-DUBP_HEADER="features_0_conv.h"',
              "-DUBP_KERNEL=ubp_features_0_conv", "-DUBP_M=UBP_FEATURES_0_CONV_M", "-DUBP_K=UBP_FEATURES_0_CONV_K",
              f"-I{out / target}", str(EMBED_C), str(out / target / f"features_0_conv.{target}.so"),
              "-Wl,-rpath,$ORIGIN", "-o", str(exe)], what="zig cc")
    n = 6
    argv = [str(exe), str(out / target / "features_0_conv.packed.bin"), str(n)]
    if target != "host":
        bits = 256 if target == "aarch64-sve" else None
        argv = [qemu.qemu_binary(), *qemu.qemu_cpu_args(bits), "-L", str(qemu.aarch64_sysroot()), *argv]
    res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    p = layers["features.0.conv"][0]
    k, j = np.meshgrid(np.arange(p.K), np.arange(n), indexing="ij")
    x = (((k * 7 + j * 3) % 11 - 5) / 4.0).astype(np.float32)  # main.c's deterministic input
    y = np.array(res.stdout.split(), dtype=np.float32).reshape(p.M, n)
    np.testing.assert_allclose(y, p.weight @ x, rtol=1e-5, atol=1e-5)
