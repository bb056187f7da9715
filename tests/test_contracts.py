"""One owner per contract (issue 10, classes 1 and 2): tuning never ships stale packed weights,
the compile cache key covers everything that decides the output, and a bad cache entry is
rebuilt, never served. Real toolchain, real CLI, results checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from test_autotune_util import run_tune

from ubpdsl.compile_cli import random_problem
from ubpdsl.masks import LayerMask, save_masks
from ubpdsl.runtime.loader import HostKernel


def _tuned_y(out: Path, layer: str, x: np.ndarray) -> np.ndarray:
    """Y of the tuned kernel in ``out`` (with its packed weights when it has them)."""
    manifest = json.loads((out / "manifest.json").read_text())
    so = out / f"{layer}.host.so"
    M, K = x.shape[0], x.shape[0]
    del M, K
    packed_file = out / f"{layer}.packed.bin"
    packed = np.fromfile(packed_file, np.uint8) if packed_file.exists() else None
    entry = manifest["layers"][layer]
    return HostKernel(so, f"ubp_{layer}", entry["M"], entry["K"])(x, packed)


def test_tune_twice_with_different_weights_ships_each_layers_own_weights(tmp_path):
    """Same shape and blocks, different weights, tuned one after the other into two folders
    through one cache: each kernel computes with its own weights (class 1)."""
    p = random_problem(32, 24, 4, 0.75, seed=3)
    w2 = (p.weight * -1.75 + np.sign(p.weight) * 0.5).astype(np.float32)  # same zero pattern
    zero = LayerMask("layer0", (32, 24), 4, np.zeros(0, np.int32), np.zeros(0, np.int32),
                     np.zeros((32, 24), np.float32))
    cache = tmp_path / "cache"
    runs = {"a": p.weight, "b": w2}
    x = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
    for tag, w in [*runs.items(), ("zero", None)]:
        masks = tmp_path / f"{tag}.npz"
        layer = zero if w is None else LayerMask("layer0", (32, 24), 4, p.rows, p.cols, w)
        save_masks(masks, [layer])
        out = tmp_path / f"out_{tag}"
        r = run_tune(["--mask", str(masks), "--trials", "2", "-o", str(out), "--pixels", "40", "--no-dense",
                      "--cache", "warm"], cache)
        assert r.returncode == 0, r.stderr
        want = (np.zeros((32, 24)) if w is None else w.astype(np.float64)) @ x.astype(np.float64)
        got = _tuned_y(out, "layer0", x)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * (np.abs(want).max() + 1))
