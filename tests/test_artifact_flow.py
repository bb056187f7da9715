"""One artifact flow: `compile` and `export` write the same bundle, and later runs extend it.

Three compile runs (three targets) into one folder give one manifest listing all three, each target
with its own header; `export` adds to a `compile` bundle; only the targets asked for are built; an
old `ubpdsl.build/1` folder and a bundle a request would leave incomplete are one-line errors.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ubpdsl.compiler import random_problem
from ubpdsl.export import BundleError, export_bundle, load_bundle, run_bundle_main
from ubpdsl.masks import LayerMask, save_masks
from ubpdsl.runtime.loader import HostKernel

TARGETS = ("host", "aarch64-neon", "aarch64-sve")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True,
                          check=False, timeout=600)


def _masks(path: Path, seed: int = 0) -> dict[str, LayerMask]:
    layers = {}
    for i, (M, K) in enumerate([(24, 10), (13, 7)]):
        p = random_problem(M, K, 4, 0.6, seed=seed + i)
        layers[f"l{i}.fc"] = LayerMask(f"l{i}.fc", (M, K), 4, p.rows.astype(np.int32), p.cols.astype(np.int32),
                                       p.weight)
    save_masks(path, list(layers.values()))
    return layers


def _qemu_ready() -> bool:
    from ubpdsl.runtime import qemu

    return qemu.qemu_available() and qemu.aarch64_sysroot() is not None


def _check_host_runs(out: Path, layers: dict[str, LayerMask]) -> None:
    bundle = load_bundle(out, check_host=True)
    rng = np.random.default_rng(1)
    for name, lm in layers.items():
        files = bundle.kernel(name, "host")
        x = rng.standard_normal((lm.C, 9)).astype(np.float32)
        y = HostKernel(files.so, files.symbol, lm.R, lm.C)(x, files.packed_weights())
        np.testing.assert_allclose(y, lm.weight @ x, rtol=1e-5, atol=1e-5)


def test_three_compile_runs_make_one_bundle_of_three_targets(tmp_path):
    layers = _masks(tmp_path / "masks.npz")
    out = tmp_path / "build"
    for t in TARGETS:
        proc = _cli("compile", "--mask", str(tmp_path / "masks.npz"), "--target", t, "-o", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "ubpdsl.bundle/1"
    assert sorted(manifest["targets"]) == sorted(TARGETS)
    bundle = load_bundle(out)
    for name in layers:
        assert sorted(manifest["layers"][name]["targets"]) == sorted(TARGETS)
        for t in TARGETS:
            header = bundle.kernel(name, t).header.read_text()
            assert f"target {t}," in header  # each header names its own target, and only it
            assert not any(f"target {o}," in header for o in TARGETS if o != t)
            assert bundle.kernel(name, t).header.parent.name == t
    _check_host_runs(out, layers)  # the host kernels survived the two later runs
    if _qemu_ready():
        lm = layers["l0.fc"]
        x = np.random.default_rng(2).standard_normal((lm.C, 5)).astype(np.float32)
        y = run_bundle_main(out, "aarch64-sve", "l0.fc", x)
        np.testing.assert_allclose(y, lm.weight @ x, rtol=1e-5, atol=1e-5)


def test_export_for_sve_with_host_tuned_configs_builds_only_sve(tmp_path):
    layers = _masks(tmp_path / "masks.npz")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    lm = layers["l0.fc"]
    (tuned / "manifest.json").write_text(json.dumps({"format": "ubpdsl.tuned/1", "target": "host", "layers": {
        "l0.fc": {"M": lm.R, "K": lm.C, "N": lm.block,
                  "tuned_config": {"variant": "wros", "constants": {"TILE": 2}, "specialize": False}}}}))
    out = tmp_path / "bundle"
    proc = _cli("export", "--mask", str(tmp_path / "masks.npz"), "--tuned", str(tuned), "--target", "aarch64-sve",
                "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tuned configurations for host are not used" in proc.stderr
    bundle = load_bundle(out)
    assert bundle.targets == ["aarch64-sve"]
    assert sorted(p.name for p in out.iterdir()) == ["aarch64-sve", "manifest.json", "masks.npz"]
    entry = bundle.manifest["layers"]["l0.fc"]["targets"]["aarch64-sve"]
    assert entry["config_source"] == "default"  # a host tuning says nothing about SVE


def test_compile_then_export_into_the_same_folder(tmp_path):
    layers = _masks(tmp_path / "masks.npz")
    out = tmp_path / "b"
    proc = _cli("compile", "--mask", str(tmp_path / "masks.npz"), "--const", "TILE=2", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    host_so = (out / "host" / "l0_fc.host.so").read_bytes()
    proc = _cli("export", "--mask", str(tmp_path / "masks.npz"), "--target", "aarch64-neon", "-o", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kept 2 kernel(s)" in proc.stdout
    bundle = load_bundle(out)
    assert sorted(bundle.targets) == ["aarch64-neon", "host"]
    assert (out / "host" / "l0_fc.host.so").read_bytes() == host_so  # kept, not rebuilt
    host = bundle.manifest["layers"]["l0.fc"]["targets"]["host"]
    assert host["constants"]["TILE"] == 2 and host["config_source"] == "command-line"
    _check_host_runs(out, layers)
    # rebuilding one target replaces its kernels and keeps the other target's
    export_bundle(tmp_path / "masks.npz", out, targets=["host"])
    bundle = load_bundle(out)
    assert sorted(bundle.targets) == ["aarch64-neon", "host"]
    assert bundle.manifest["layers"]["l0.fc"]["targets"]["host"]["constants"]["TILE"] != 2
    _check_host_runs(out, layers)
    for t in bundle.targets:
        rows = [ln.split("\t")[0] for ln in (out / t / "kernels.tsv").read_text().splitlines() if ln[:1] != "#"]
        assert rows == list(layers)


def test_an_incomplete_or_foreign_bundle_is_not_half_extended(tmp_path):
    layers = _masks(tmp_path / "masks.npz")
    out = tmp_path / "b"
    export_bundle(tmp_path / "masks.npz", out, targets=["host"])
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="would leave layer 'l1.fc' without a aarch64-neon kernel"):
        export_bundle(tmp_path / "masks.npz", out, targets=["aarch64-neon"], layers=["l0.fc"])
    assert (out / "manifest.json").read_bytes() == before and load_bundle(out).targets == ["host"]
    # a bundle made from other masks is replaced, not mixed
    other = _masks(tmp_path / "other.npz", seed=7)
    said = []
    export_bundle(tmp_path / "other.npz", out, targets=["aarch64-neon"], echo=said.append)
    assert any("built from other masks" in s for s in said)
    assert load_bundle(out).targets == ["aarch64-neon"] and not (out / "host").exists()
    assert load_bundle(out).masks()["l0.fc"].content_hash() == other["l0.fc"].content_hash()
    del layers


def test_old_build_folders_are_one_line_errors(tmp_path):
    _masks(tmp_path / "masks.npz")
    old = tmp_path / "build"
    old.mkdir()
    (old / "manifest.json").write_text(json.dumps({"format": "ubpdsl.build/1", "target": "host", "layers": {}}))
    (old / "mine.txt").write_text("the user's file")
    proc = _cli("compile", "--mask", str(tmp_path / "masks.npz"), "-o", str(old))
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "older `ubpdsl compile` output (ubpdsl.build/1)" in proc.stderr
    assert (old / "mine.txt").read_text() == "the user's file"
    with pytest.raises(BundleError, match="re-run `ubpdsl compile`"):
        load_bundle(old)
