"""One owner per contract (issue 10, classes 1 and 2): tuning never ships stale packed weights,
the compile cache key covers everything that decides the output, and a bad cache entry is
rebuilt, never served. Real toolchain, real CLI, results checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_autotune_util import run_tune

from ubpdsl.compiler import random_problem
from ubpdsl.identity import file_sha256
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


# ------------------------------------------------------------------ compile cache: key and entries

_SCALED = '''
import ubpdsl.language as ubl

SCALE = {scale}
SHIFT = {shift}


@ubl.kernel(layout="plain")
def scaled(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse):
    for j in ubl.tiles(X.n, 1):
        for r in range(W.rows):
            acc = ubl.zeros(j)
            for s in ubl.static_range(W.block):
                if r - s >= 0:
                    lo, hi = W.row_blocks(r - s)
                    for b in ubl.range(lo, hi):
                        acc += W.weight(b, s) * ubl.load(X, W.block_col(b), j)
            ubl.store(Y, r, j, acc * SCALE + SHIFT[0])
'''


def _user_kernel(tmp_path: Path, scale: str, shift: str = "(0.0,)"):
    from ubpdsl.kernels import get_variant as load_kernel

    path = tmp_path / "scaled.py"
    path.write_text(_SCALED.format(scale=scale, shift=shift))
    return load_kernel(str(path)), path


def test_a_changed_module_global_rebuilds(tmp_path):
    """Editing a global the kernel reads (SCALE = 2.0 -> 3.0), kernel body unchanged: a rebuild
    that computes with the new value, not a cache hit with the old one (class 2)."""
    from ubpdsl.compiler import compile_kernel
    from ubpdsl.runtime.cache import CompileCache

    cache = CompileCache(tmp_path / "cache")
    p = random_problem(12, 10, 2, 0.5, seed=5)
    x = np.random.default_rng(1).standard_normal((10, 7)).astype(np.float32)
    results = []
    for scale, shift in (("2.0", "(0.0,)"), ("3.0", "(0.0,)"), ("3.0", "(0.5,)"), ("2.0", "(0.0,)")):
        kernel, _ = _user_kernel(tmp_path, scale, shift)
        ck = compile_kernel(kernel, p, "host", cache=cache)
        np.testing.assert_allclose(ck(x), float(scale) * (p.weight @ x) + eval(shift)[0], rtol=1e-5, atol=1e-5)
        results.append(ck.cache_hit)
    assert results == [False, False, False, True]


def test_an_unkeyable_global_is_a_one_line_dsl_error(tmp_path):
    from ubpdsl.compiler import compile_kernel
    from ubpdsl.errors import DSLError

    kernel, path = _user_kernel(tmp_path, "object()")
    p = random_problem(12, 10, 2, 0.5, seed=5)
    try:
        compile_kernel(kernel, p, "host")
    except DSLError as exc:
        msg = str(exc)
    else:
        raise AssertionError("compiled a kernel whose global cannot be keyed")
    assert msg.startswith(f"{path}:") and "'SCALE'" in msg and "object" in msg and "\n" not in msg


def test_compiler_fingerprint_covers_every_compiler_and_runtime_file():
    """Walked, not listed: every file of language/, dialects/ and runtime/ (incl. the C harness
    and header templates), packing.py and compiler.py."""
    import subprocess

    from ubpdsl.compiler import compiler_sources

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(["git", "ls-files", "ubpdsl/language", "dialects", "runtime", "ubpdsl/packing.py",
                              "ubpdsl/compiler.py", "ubpdsl/abi.py"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    covered = {p.resolve() for _, p in compiler_sources()}
    assert {(root / t).resolve() for t in tracked} <= covered
    assert any(p.suffix == ".c" for p in covered)


def _damage(entry: Path, how: str, other: Path) -> None:
    so = entry / "kernel.so"
    if how == "truncated":
        so.write_bytes(so.read_bytes()[: so.stat().st_size // 2])
    elif how == "emptied":
        so.write_bytes(b"")
    elif how == "swapped":  # a valid .so of another kernel, same file name
        so.write_bytes((other / "kernel.so").read_bytes())
    elif how == "missing file":
        (entry / "kernel.h").unlink()
    elif how == "missing manifest":
        (entry / "entry.json").unlink()
    elif how == "garbled manifest":
        (entry / "entry.json").write_text("{not json")
    elif how == "so is a symlink":
        so.unlink()
        so.symlink_to(other / "kernel.so")
    else:
        raise AssertionError(how)


def test_a_damaged_cache_entry_is_rebuilt_with_a_warning_never_served(tmp_path):
    import pytest

    from ubpdsl.compiler import compile_kernel
    from ubpdsl.kernels import VARIANTS
    from ubpdsl.runtime.cache import CacheWarning, CompileCache, verify_entry

    cache = CompileCache(tmp_path / "cache")
    p = random_problem(16, 12, 4, 0.5, seed=2)
    x = np.random.default_rng(2).standard_normal((12, 9)).astype(np.float32)
    want = p.weight.astype(np.float64) @ x.astype(np.float64)
    other = compile_kernel(VARIANTS["block_stream"], p, "host", cache=cache).so.parent
    first = compile_kernel(VARIANTS["wros"], p, "host", cache=cache)
    entry = first.so.parent
    good = file_sha256(first.so)  # not loaded here: a loaded library must not be damaged under its mapping
    for how in ("truncated", "emptied", "swapped", "missing file", "missing manifest", "garbled manifest",
                "so is a symlink"):
        _damage(entry, how, other)
        assert verify_entry(entry) is not None, how
        with pytest.warns(CacheWarning, match="rebuilding") as rec:
            ck = compile_kernel(VARIANTS["wros"], p, "host", cache=cache)
        assert len(rec) == 1 and "\n" not in str(rec[0].message), how
        assert not ck.cache_hit and ck.so.parent == entry, how
        assert verify_entry(entry) is None and file_sha256(ck.so) == good, how
        again = compile_kernel(VARIANTS["wros"], p, "host", cache=cache)
        assert again.cache_hit
    np.testing.assert_allclose(again(x), want, rtol=1e-4, atol=1e-4)
    assert sorted(q.name for q in entry.parent.iterdir()) == [entry.name]  # nothing left behind


def test_an_unusable_cache_root_is_a_one_line_error(tmp_path):
    import os
    import subprocess
    import sys

    from ubpdsl.compiler import compile_kernel
    from ubpdsl.kernels import VARIANTS
    from ubpdsl.runtime.cache import CacheError, CompileCache

    p = random_problem(8, 8, 2, 0.5, seed=1)
    as_file = tmp_path / "cache-file"
    as_file.write_text("not a directory")
    for root, message in ((as_file, "is not a directory"), (as_file / "sub", "not writable"),
                          (Path("/proc/self/ubpdsl-cache"), "cache")):
        try:
            compile_kernel(VARIANTS["wros"], p, "host", cache=CompileCache(root))
        except CacheError as exc:
            assert message in str(exc) and "\n" not in str(exc), str(exc)
        else:
            raise AssertionError(root)
    assert as_file.read_text() == "not a directory"
    masks = tmp_path / "m.npz"
    save_masks(masks, [LayerMask("fc", (8, 8), 2, p.rows, p.cols, p.weight)])
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(as_file))
    r = subprocess.run([sys.executable, "-m", "ubpdsl.cli", "compile", "--mask", str(masks), "-o",
                        str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: compile cache") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_cli_rebuilds_a_damaged_entry_with_a_one_line_warning(tmp_path):
    import os
    import subprocess
    import sys

    p = random_problem(8, 8, 2, 0.5, seed=1)
    masks = tmp_path / "m.npz"
    save_masks(masks, [LayerMask("fc", (8, 8), 2, p.rows, p.cols, p.weight)])
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "ubpdsl.cli", "compile", "--mask", str(masks), "-o", str(tmp_path / "out")]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0, first.stderr
    shipped = (tmp_path / "out" / "host" / "fc.host.so").read_bytes()
    (so,) = (tmp_path / "cache").glob("*/*/kernel.so")
    so.write_bytes(so.read_bytes()[:100])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("warning: compile cache entry") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert (tmp_path / "out" / "host" / "fc.host.so").read_bytes() == shipped


# ------------------------------------------------------------------ one owner per contract


def test_one_target_registry_feeds_every_cli_and_the_cost_model():
    from ubpdsl.autotune import cli as tune_cli
    from ubpdsl.autotune.mca import estimate_label
    from ubpdsl.compile_cli import compile_cmd
    from ubpdsl.export import export
    from ubpdsl.runtime.targets import TARGET_NAMES, get_target

    for cmd in (compile_cmd, export):
        (opt,) = [o for o in cmd.params if o.name in ("target", "targets")]
        assert tuple(opt.type.choices) == TARGET_NAMES, cmd.name
    (opt,) = [o for o in tune_cli.tune.params if o.name == "target"]  # checked by get_target: one-line error
    assert opt.help == ", ".join(TARGET_NAMES)
    for name in TARGET_NAMES:
        t = get_target(name)
        assert t.name == name and t.runner in ("native", "qemu-aarch64")
        assert set(t.cache_key()) == {"name", "triple", "cpu", "features", "vector_bits", "scalable"}
        if t.runner != "native":
            assert t.mca_cpu in estimate_label(name) and t.mca_lanes >= t.vector_lanes_f32


def test_one_timing_loop_draws_a_fresh_order_every_round():
    """The tuner's worker, the benchmark suite and the demo all time through
    measure.interleaved_samples: a random order each round (a rotating order was biased)."""
    from ubpdsl import benchsuite, demo
    from ubpdsl.autotune import measure

    assert demo.interleaved_medians is measure.interleaved_medians
    calls: list[str] = []
    fns = [lambda c=c: calls.append(c) for c in "abc"]
    samples = measure.interleaved_samples(fns, rounds=30)
    assert [len(s) for s in samples] == [30, 30, 30]
    orders = {tuple(calls[i:i + 3]) for i in range(0, 90, 3)}
    assert all(sorted(o) == ["a", "b", "c"] for o in orders)
    assert len(orders) > 3  # more than the 3 orders of a rotation
    scrub = measure.CacheScrubber(1 << 16)
    calls.clear()
    benchsuite.interleaved_medians({"a": fns[0], "b": fns[1]}, min_time=0.0, min_reps=4, max_reps=4, cache="cold",
                                   scrubber=scrub)
    assert scrub.count == 2 + 2 * 4 and len(calls) == 2 * 2 + 2 + 2 * 4


def test_one_feasibility_rule_for_tuner_and_sweep_on_every_target():
    """The benchmark sweep filters configs with the autotuner's rule, so the two agree by
    construction -- also on AArch64, where the sweep's own rule once assumed 16 vector registers."""
    from ubpdsl import benchsuite
    from ubpdsl.autotune import space as sp
    from ubpdsl.config import KernelConfig
    from ubpdsl.runtime.targets import TARGET_NAMES, get_target

    p = random_problem(64, 48, 4, 0.75, seed=4)
    for name in TARGET_NAMES:
        t = get_target(name)
        for variant in ("wros", "block_stream"):
            for tile in (1, 2, 4, 8):
                for unroll in (1, 2, 4):
                    consts = {"TILE": tile, "UNROLL": unroll}
                    want = sp.infeasible(KernelConfig(variant, consts), sp.Layer(p, 256), t, True) is None
                    assert benchsuite.feasible(p, variant, consts, 256, t) == want, (name, variant, consts)
    neon = get_target("aarch64-neon")
    assert benchsuite.feasible(p, "wros", {"TILE": 4}, 256, neon)  # 4 x 4 + 4 = 20 of NEON's 32 registers
    assert not benchsuite.feasible(p, "wros", {"TILE": 8}, 256, neon)  # 40 > 32: would spill


def test_rebuilding_a_loaded_kernel_in_place_runs_the_new_code(tmp_path):
    """Save a kernel, load it, rebuild it with another global into the same file, load again in the
    same process: the new code runs (the loader opens a content-named private copy; the file is
    replaced, not rewritten under the old mapping, which crashed the process)."""
    from ubpdsl.compiler import compile_kernel
    from ubpdsl.runtime.cache import CompileCache

    cache = CompileCache(tmp_path / "cache")
    p = random_problem(12, 10, 2, 0.5, seed=5)
    x = np.random.default_rng(1).standard_normal((10, 7)).astype(np.float32)
    loaded = []
    for scale in ("2.0", "3.0", "2.0"):
        kernel, _ = _user_kernel(tmp_path, scale)
        ck = compile_kernel(kernel, p, "host", cache=cache)
        files = ck.save(tmp_path / "out")
        k = HostKernel(files["so"], ck.symbol, p.M, p.K)
        loaded.append(k)  # keep every library loaded
        np.testing.assert_allclose(k(x, ck.packed), float(scale) * (p.weight @ x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loaded[0](x, ck.packed), 2.0 * (p.weight @ x), rtol=1e-5, atol=1e-5)


def test_one_vector_width_rule_for_compile_tune_and_export():
    """compile --vector-bits, the tuner and export build the same code for the same width."""
    from ubpdsl.compiler import resolve_target
    from ubpdsl.config import KernelConfig
    from ubpdsl.runtime.targets import get_target

    host = get_target("host")
    if host.arch != "x86_64" or host.vector_bits < 256:
        pytest.skip("needs an AVX2 or AVX-512 x86-64 host")
    via_config = KernelConfig("wros", {}, False, 256).target_for(host)
    assert via_config == resolve_target("host", 256)
    assert via_config.vector_bits == 256 and "+avx512f" not in via_config.features.split(",")
    assert KernelConfig("wros").target_for(host) == host
