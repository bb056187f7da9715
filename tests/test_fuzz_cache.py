"""Fuzz: a damaged compile cache directory under ``ubpdsl compile`` (a bounded subprocess each).

A cache filled by one ``ubpdsl compile`` is damaged (entry files truncated, emptied, flipped,
deleted, swapped between entries or replaced by directories; the root itself a file) and the same
compile runs again. It must exit 0 with kernels that compute ``W @ x`` (checked in a separate,
bounded process, so a corrupt ``.so`` cannot take the test down) or fail with one ``error:`` line.
"""

from __future__ import annotations

import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fuzz_support import assert_all_clean, cli_verdict, record, run, run_cli

from ubpdsl.compiler import random_problem
from ubpdsl.masks import LayerMask, save_masks

CLASS = "compile cache"

CHECK = r"""
import json, sys
import numpy as np
from ubpdsl.masks import load_masks
from ubpdsl.runtime.loader import HostKernel
out, masks = sys.argv[1], load_masks(sys.argv[2])
manifest = json.load(open(out + "/manifest.json"))
for name, m in masks.items():
    entry = manifest["layers"][name]["targets"]["host"]
    files = entry["files"]
    blob = np.fromfile(out + "/" + files["packed"], np.uint8) if "packed" in files else None
    x = np.random.default_rng(0).standard_normal((m.C, 7)).astype(np.float32)
    y = HostKernel(out + "/" + files["so"], entry["symbol"], m.R, m.C)(x, blob)
    np.testing.assert_allclose(y, m.weight @ x, rtol=1e-5, atol=1e-5)
print("ok")
"""


def _entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.glob("??/*") if p.is_dir())


def _damage(cache: Path, how: str) -> None:
    entries = _entries(cache)
    files = sorted(f for e in entries for f in e.iterdir() if f.is_file())
    sos = [f for f in files if f.suffix == ".so"]
    if how == "cache root is a file":
        shutil.rmtree(cache)
        cache.write_text("not a directory")
    elif how == "entry is a file":
        shutil.rmtree(entries[0])
        entries[0].write_text("x")
    elif how == "so truncated":
        for f in sos:
            f.write_bytes(f.read_bytes()[:200])
    elif how == "so emptied":
        for f in sos:
            f.write_bytes(b"")
    elif how == "so flipped":
        for f in sos:
            data = bytearray(f.read_bytes())
            for i in range(0x400, len(data), 97):
                data[i] ^= 0xA5
            f.write_bytes(bytes(data))
    elif how == "so swapped between entries":
        a, b = sos[0], sos[-1]
        tmp = a.read_bytes()
        a.write_bytes(b.read_bytes())
        b.write_bytes(tmp)
    elif how == "so is a directory":
        for f in sos:
            f.unlink()
            f.mkdir()
    elif how == "every file deleted":
        for f in files:
            f.unlink()
    elif how == "json garbage":
        for f in files:
            if f.suffix == ".json":
                f.write_text("{" * 10_000)
    elif how == "headers deleted":
        for f in files:
            if f.suffix == ".h":
                f.unlink()
    else:
        raise AssertionError(how)


HOW = ["cache root is a file", "entry is a file", "so truncated", "so emptied", "so flipped",
       "so swapped between entries", "so is a directory", "every file deleted", "json garbage", "headers deleted"]


def test_fuzz_damaged_compile_cache(tmp_path):
    layers = []
    for i, (M, K) in enumerate([(16, 12), (12, 20)]):
        p = random_problem(M, K, 4, 0.5, seed=i)
        layers.append(LayerMask(f"l{i}", (M, K), 4, p.rows.astype(np.int32), p.cols.astype(np.int32), p.weight))
    masks = tmp_path / "m.npz"
    save_masks(masks, layers)
    pristine = tmp_path / "cache0"
    r = run_cli("compile", "--mask", str(masks), "-o", str(tmp_path / "out0"), timeout=300,
                env={**os.environ, "UBPDSL_CACHE_DIR": str(pristine)})
    assert r.returncode == 0, r.stderr
    assert _entries(pristine)

    def one(how: str) -> None:
        case = tmp_path / how.replace(" ", "_")
        cache = case / "cache"
        shutil.copytree(pristine, cache)
        _damage(cache, how)
        out = case / "out"
        r = run_cli("compile", "--mask", str(masks), "-o", str(out), timeout=300,
                    env={**os.environ, "UBPDSL_CACHE_DIR": str(cache)})

        def ok(_r) -> bool:
            check = run([sys.executable, "-c", CHECK, str(out), str(masks)], timeout=120)
            return check.returncode == 0 and "ok" in check.stdout

        record(CLASS, how, cli_verdict(r, ok))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, HOW))
    assert_all_clean(CLASS)
