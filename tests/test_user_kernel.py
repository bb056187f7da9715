"""User kernels are first-class: their own knobs, tuned and benchmarked from the CLI, run from Python.

The kernel is written to a file outside the package; results are checked against numpy / torch.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_autotune_util import ROOT, make_masks, run_tune

import ubpdsl
from ubpdsl.autotune import space as sp
from ubpdsl.errors import DSLError, MaskError, UbpError
from ubpdsl.kernels import get_variant, kernel_identity, variant_name
from ubpdsl.runtime import qemu
from ubpdsl.testing import blocks_of, do_bench

KERNEL = '''
import ubpdsl.language as ubl

SCALE = {scale}


@ubl.kernel(layout="plain", tune={{"TILE": [1, 2], "UNROLL": [1, 2]}})
def scaled_stream(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 1,
                  UNROLL: ubl.constexpr = 1, PAD: ubl.constexpr = 0):
    """Block streaming, times SCALE (a module global the compile and tune keys read)."""
    for j in ubl.tiles(X.n, TILE):
        for r in range(W.rows):
            ubl.store(Y, r, j, ubl.zeros(j))
        for r in range(W.rows - W.block + 1):
            lo, hi = W.row_blocks(r)
            for b in ubl.range(lo, hi, unroll=UNROLL):
                x = ubl.load(X, W.block_col(b), j) * SCALE
                for i in ubl.static_range(W.block):
                    ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, ubl.load(Y, r + i, j)))
'''


def _write(tmp_path: Path, scale: float = 2.0) -> Path:
    """The kernel file with ``SCALE = scale`` (the repr, so 1 and 1.0 are different sources of the same result)."""
    path = tmp_path / "mykernels.py"
    path.write_text(KERNEL.format(scale=scale))
    return path


def _sparse(M: int = 13, K: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((M, K)).astype(np.float32)
    w[rng.random((M, K)) < 0.6] = 0.0
    return w, rng.standard_normal((K, 21)).astype(np.float32)


def test_declared_knobs_and_the_derived_table(tmp_path):
    spec = f"{_write(tmp_path)}:scaled_stream"
    k = get_variant(spec)
    assert k.tune == {"TILE": [1, 2], "UNROLL": [1, 2]}
    # the shipped table is the union of the shipped variants' own spaces
    union: dict[str, set] = {}
    for v in ("block_stream", "wros", "wros_unrolled", "aligned_rows"):
        for knob, values in get_variant(v).tune.items():
            union.setdefault(knob, set()).update(values)
    assert {kk: set(vv) for kk, vv in sp.KNOB_CHOICES.items()} == union
    assert sp.knob_choices([variant_name(spec)]) == {"TILE": [1, 2], "UNROLL": [1, 2]}
    # a declared knob must be a constexpr of the kernel
    bad = tmp_path / "bad.py"
    bad.write_text(KERNEL.format(scale=1.0).replace('"UNROLL": [1, 2]', '"UNROL": [1, 2]'))
    with pytest.raises(DSLError, match="tune= names 'UNROL', which is not a constexpr parameter; did you mean "
                                       "'UNROLL'\\?"):
        get_variant(f"{bad}:scaled_stream")
    with pytest.raises(UbpError, match="has no kernel 'scaled_strem'; did you mean 'scaled_stream'\\?"):
        get_variant(f"{tmp_path / 'mykernels.py'}:scaled_strem")


def test_identity_follows_source_and_globals(tmp_path):
    a = kernel_identity(get_variant(str(_write(tmp_path, 2.0))))
    assert kernel_identity(get_variant(str(_write(tmp_path, 2.0)))) == a
    assert kernel_identity(get_variant(str(_write(tmp_path, 3.0)))) != a  # a global it reads changed


@pytest.mark.timeout(900)
def test_tune_and_bench_a_user_kernel_from_the_cli(tmp_path):
    kfile = _write(tmp_path, 1.0)
    spec = f"{kfile}:scaled_stream"
    masks = make_masks(tmp_path / "masks.npz", [(32, 24)])
    cache = tmp_path / "cache"
    out = tmp_path / "tuned"
    args = ["--mask", str(masks), "--trials", "3", "--pixels", "40", "--no-dense", "--cache", "warm", "-j", "0",
            "--variant", spec, "-o", str(out)]
    r = run_tune(args, cache)
    assert r.returncode == 0, r.stderr
    layer = json.loads((out / "manifest.json").read_text())["layers"]["layer0"]
    best = layer["tuned_config"]
    assert best["variant"] == f"{kfile.resolve()}:scaled_stream"  # only the user's kernel was searched
    assert layer["kernel_identity"] == kernel_identity(get_variant(spec))  # export checks it (test below)
    assert set(best["constants"]) == {"TILE", "UNROLL", "PAD"} and best["constants"]["PAD"] == 0
    assert best["constants"]["TILE"] in (1, 2) and best["constants"]["UNROLL"] in (1, 2)
    assert layer["trials"] >= 3
    # the tuned .so computes SCALE * W @ x (checked against numpy through the Python helper)
    from ubpdsl.masks import load_masks

    m = load_masks(masks)["layer0"]
    w = np.asarray(m.weight, np.float32).reshape(m.R, m.C)
    x = np.random.default_rng(1).standard_normal((m.C, 40)).astype(np.float32)
    y = ubpdsl.run_kernel(spec, m, x, constants=best["constants"])
    np.testing.assert_allclose(y, w @ x, rtol=1e-4, atol=1e-4)

    # export builds the bundle from the tuned config: the user's kernel, its tuned constants
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(cache))
    re_ = subprocess.run([sys.executable, "-m", "ubpdsl.cli", "export", "--mask", str(masks), "--tuned", str(out),
                          "-o", str(tmp_path / "bundle")], capture_output=True, text=True, env=env, timeout=300,
                         cwd=ROOT)
    assert re_.returncode == 0, re_.stderr
    bundle = (tmp_path / "bundle" / "manifest.json").read_text()
    assert '"variant": "scaled_stream"' in bundle or "mykernels.py:scaled_stream" in bundle

    # unchanged: from the tuned cache; a changed kernel (a global it reads: 1.0 -> 1) is tuned again
    assert "cached" in run_tune(args, cache).stdout
    _write(tmp_path, 1)  # type: ignore[arg-type]
    r2 = run_tune(args, cache)
    assert r2.returncode == 0, r2.stderr
    assert "cached" not in r2.stdout

    # a misspelt kernel: one line, before any tuning
    r3 = run_tune(["--mask", str(masks), "--pixels", "40", "--variant", f"{kfile}:scaled", "-o",
                   str(tmp_path / "bad")], cache)
    assert r3.returncode == 1 and r3.stderr.startswith("error: ") and "has no kernel 'scaled'" in r3.stderr
    assert "Traceback" not in r3.stderr

    # bench: our runner uses the user's kernel, checked against dense torch before it is timed
    _write(tmp_path, 3.0)
    bout = tmp_path / "bench"

    def bench() -> dict[str, dict[str, str]]:
        rb = subprocess.run([sys.executable, "-m", "ubpdsl.cli", "bench", "--variant", spec, "--quick", "--shapes",
                             "fc_2", "--min-time", "0.02", "--out", str(bout)], capture_output=True, text=True,
                            env=env, timeout=600, cwd=ROOT)
        assert rb.returncode == 0, rb.stderr
        return {row["runner"]: row for row in csv.DictReader(open(bout / "results.csv"))}

    rows = bench()
    # SCALE = 3 now: the reference is W @ x, so the kernel must be reported wrong, not timed
    assert rows["ubp"]["status"] == "wrong" and "scaled_stream" in rows["ubp"]["label"]
    _write(tmp_path, 1.0)
    rows = bench()
    assert rows["ubp"]["status"] == "ok" and "scaled_stream" in rows["ubp"]["label"]
    assert float(rows["ubp"]["speedup"]) > 0


def test_compile_cli_takes_file_and_name(tmp_path):
    kfile = _write(tmp_path, 1.0)
    masks = make_masks(tmp_path / "masks.npz", [(16, 8)])
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-m", "ubpdsl.cli", "compile", "--mask", str(masks), "--variant",
                        f"{kfile}:scaled_stream", "--const", "TILE=2", "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    host = man["layers"]["layer0"]["targets"]["host"]  # compile writes the bundle format
    assert host["kernel"]["variant"] == "scaled_stream"
    assert host["constants"]["TILE"] == 2


def test_run_kernel_host_numpy_and_torch(tmp_path, compile_cache):
    spec = f"{_write(tmp_path, 1.0)}:scaled_stream"
    w, x = _sparse()
    y = ubpdsl.run_kernel(spec, w, x, block=3, constants={"TILE": 2})
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, w @ x, rtol=1e-5, atol=1e-5)
    yt = ubpdsl.run_kernel("wros", torch.from_numpy(w), torch.from_numpy(x), block=3)
    assert isinstance(yt, torch.Tensor)
    torch.testing.assert_close(yt, torch.from_numpy(w) @ torch.from_numpy(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(UbpError, match="needs block=N"):
        ubpdsl.run_kernel("wros", w, x)
    with pytest.raises(UbpError, match="x has 5 rows"):
        ubpdsl.run_kernel("wros", w, x[:5], block=3)


def test_blocks_of_covers_every_nonzero():
    w, _ = _sparse(17, 11, seed=4)
    rows, cols = blocks_of(w, 4)
    from ubpdsl.masks import validate_blocks
    from ubpdsl.prune.selectors import blocks_to_mask

    validate_blocks(rows, cols, 17, 11, 4)
    assert np.all(blocks_to_mask(rows, cols, 17, 11, 4)[w != 0])
    dense = np.zeros((5, 1), np.float32)
    dense[[0, 2, 4], 0] = 1.0  # three 2-row blocks cannot fit in 5 rows without overlap
    with pytest.raises(MaskError, match="column 0"):
        blocks_of(dense, 2)


@pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")
@pytest.mark.parametrize("target", ["aarch64-neon", "aarch64-sve"])
def test_run_kernel_under_qemu(tmp_path, target, compile_cache):
    spec = f"{_write(tmp_path, 1.0)}:scaled_stream"
    w, x = _sparse(seed=2)
    y = ubpdsl.run_kernel(spec, w, x, target, block=3, constants={"TILE": 2}, sve_bits=512)
    np.testing.assert_allclose(y, w @ x, rtol=1e-5, atol=1e-5)


def test_do_bench_uses_the_timing_loop():
    a = np.ones((64, 64), np.float32)
    t = do_bench(lambda: a @ a, min_time=0.02)
    assert isinstance(t, float) and t > 0
    both = do_bench({"small": lambda: a[:8] @ a, "big": lambda: a @ a}, min_time=0.02, cache="cold")
    assert set(both) == {"small", "big"} and all(v > 0 for v in both.values())
    with pytest.raises(UbpError, match="do_bench needs"):
        do_bench({})


def test_doc_example_kernel_compiles(tmp_path):
    """The first example of docs/dsl.md is a real kernel that computes W @ x."""
    text = (ROOT / "docs" / "dsl.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert code.strip() in (ROOT / "examples" / "user_kernel" / "mykernels.py").read_text()  # the same kernel
    (tmp_path / "doc_kernel.py").write_text(code)
    w, x = _sparse(seed=5)
    y = ubpdsl.run_kernel(f"{tmp_path / 'doc_kernel.py'}:my_kernel", w, x, block=2)
    np.testing.assert_allclose(y, w @ x, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not qemu.qemu_available(), reason="qemu-aarch64 not installed (make test installs it)")
def test_doc_python_helper_example_runs(monkeypatch):
    """The run_kernel / do_bench example of docs/dsl.md runs as written (from the repository root)."""
    text = (ROOT / "docs" / "dsl.md").read_text()
    code = text.split("```python\n")[2].split("```", 1)[0]
    monkeypatch.chdir(ROOT)
    ns: dict = {}
    exec(compile(code, "docs/dsl.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert set(ns["times"]) == {"dense", "again"}


def test_export_refuses_a_tuned_config_whose_user_kernel_changed(tmp_path):
    """``tune -o`` records the user kernel's identity; export's loader checks it (one line)."""
    from ubpdsl.export import load_tuned_configs

    kfile = _write(tmp_path, 1.0)
    spec = variant_name(f"{kfile}:scaled_stream")
    entry = {"M": 32, "K": 24, "N": 4, "tuned_config": {"variant": spec, "constants": {"TILE": 2}},
             "kernel_identity": kernel_identity(get_variant(spec))}
    man = tmp_path / "tuned" / "manifest.json"
    man.parent.mkdir()
    man.write_text(json.dumps({"format": "ubpdsl.tuned/1", "target": "host", "layers": {"layer0": entry}}))
    target, cfgs = load_tuned_configs(man.parent)
    assert target == "host" and cfgs["layer0"].variant == spec
    _write(tmp_path, 1)  # a global the kernel reads changed: another kernel
    with pytest.raises(UbpError, match="layer 'layer0' was tuned with the kernel .*mykernels.py:scaled_stream, "
                                       "which has changed since") as err:
        load_tuned_configs(man.parent)
    assert "\n" not in str(err.value)
    _write(tmp_path, 1.0)
    load_tuned_configs(man.parent)  # back to the tuned source: accepted again
    del entry["kernel_identity"]
    man.write_text(json.dumps({"format": "ubpdsl.tuned/1", "target": "host", "layers": {"layer0": entry}}))
    with pytest.raises(UbpError, match="records no kernel_identity"):
        load_tuned_configs(man.parent)
    kfile.unlink()
    entry["kernel_identity"] = "0" * 64
    man.write_text(json.dumps({"format": "ubpdsl.tuned/1", "target": "host", "layers": {"layer0": entry}}))
    with pytest.raises(UbpError, match="layer 'layer0': kernel file .* does not exist"):
        load_tuned_configs(man.parent)


def test_bench_sweep_honours_a_user_kernels_declared_space(tmp_path):
    """The sweep tries only the user's tune= values, including knobs it does not know (PAD)."""
    from ubpdsl import benchsuite as bs
    from ubpdsl.compiler import Problem

    src = KERNEL.format(scale=1.0).replace('tune={"TILE": [1, 2], "UNROLL": [1, 2]}',
                                           'tune={"TILE": [2], "UNROLL": [2], "PAD": [0, 5]}')
    kfile = tmp_path / "declared.py"
    kfile.write_text(src)
    spec = variant_name(f"{kfile}:scaled_stream")
    w, x = _sparse(16, 12, seed=2)
    rows, cols = blocks_of(w, 4)
    problem = Problem("declared", 16, 12, 4, rows, cols, w)
    tuned = bs.sweep_tuner(min_time=0.005, workers=1, cache="warm")(problem, x, spec)
    assert tuned.how == "swept"
    assert tuned.constants["TILE"] == 2 and tuned.constants["UNROLL"] == 2 and tuned.constants["PAD"] in (0, 5)
    y = np.zeros((16, x.shape[1]), np.float32)
    from ubpdsl.runtime.loader import aligned_copy

    xa = aligned_copy(x)
    ya = aligned_copy(y)
    h = tuned.ck._host or bs._load(tuned.ck)
    h.call_raw(xa, ya, x.shape[1], tuned.ck.packed)
    np.testing.assert_allclose(ya, w @ x, rtol=1e-4, atol=1e-4)
