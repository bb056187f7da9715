"""Autotuner: search space, cost model, timing worker, CLI outputs, cache, bad input."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from test_autotune_util import make_masks, run_tune, sqlite_trials

from ubpdsl.autotune import space as sp
from ubpdsl.autotune.mca import estimate_cycles, parse_loops
from ubpdsl.autotune.measure import check_positions, make_x
from ubpdsl.autotune.runner import LocalRunner
from ubpdsl.compiler import random_problem
from ubpdsl.runtime.targets import get_target


def _layer(M: int = 64, K: int = 48, n: int = 64) -> sp.Layer:
    return sp.Layer(random_problem(M, K, 4, 0.75), n)


def test_space_rejects_infeasible_configs():
    host = get_target("host")
    layer = _layer()
    assert sp.infeasible(sp.default_config(host), layer, host, True) is None
    assert "unaligned" in sp.infeasible(sp.Config("aligned_rows", {"TILE": 1, "UNROLL": 1}), layer, host, True)
    assert "weights" in sp.infeasible(sp.Config("wros", {"TILE": 1}, specialize=True), layer, host, False)
    big = sp.Layer(random_problem(512, 1024, 4, 0.75), 49)
    assert "blocks" in sp.infeasible(sp.Config("wros_unrolled", {"TILE": 1}, True), big, host, True)
    wide = sp.infeasible(sp.Config("wros", {"TILE": 8, "UNROLL": 1}), _layer(n=16), host, True)
    assert "wider than n" in wide
    neon = get_target("aarch64-neon")
    assert "legal" in sp.infeasible(sp.Config("wros", {"TILE": 1}, vector_bits=512), layer, neon, True)
    # x86 non-temporal stores of unknown alignment become scalar movnti: ruled out there, not on AArch64
    assert "movnti" in sp.infeasible(sp.Config("wros", {"TILE": 2, "STREAM": True}), layer, host, True)
    assert sp.infeasible(sp.Config("wros", {"TILE": 1, "STREAM": True}), layer, neon, True) is None
    for c in sp.seed_configs(layer, host, True):
        assert sp.infeasible(c, layer, host, True) is None
    assert sp.seed_configs(layer, host, True)[0] == sp.default_config(host)
    # YPREFETCH is searched, seeded (cold-robust row panels) and only given to kernels that declare it
    assert any(c.constants.get("YPREFETCH") == 8 and c.constants.get("PANEL") == 32
               for c in sp.seed_configs(layer, host, True))
    import optuna

    for variant, has in (("wros", True), ("aligned_rows", True), ("block_stream", False)):
        c = sp.suggest(optuna.trial.FixedTrial(sp.trial_params(sp.Config(variant, {"YPREFETCH": 8}), host)),
                       layer, host, True)
        assert (c.constants.get("YPREFETCH") == 8) == has, variant


def test_mca_parser_and_estimate():
    from ubpdsl.compiler import emit
    from ubpdsl.kernels import VARIANTS

    layer = _layer(32, 32, 49)
    asm = emit(VARIANTS["wros"], layer.problem, "aarch64-neon", "asm", constants={"TILE": 1})
    loops, _ = parse_loops(asm)
    depths = sorted({lp.depth for lp in loops.values()})
    assert depths[:3] == [1, 2, 3]
    inner = [lp for lp in loops.values() if lp.depth == 3]
    assert inner and all(any("fmla" in i for i in lp.body) for lp in inner)
    est = estimate_cycles(asm, "aarch64-neon", M=32, N=4, blocks=layer.blocks, n=49, tile=1, unroll=1,
                          output_stationary=True)
    assert est["cycles"] > 0 and est["tiles"] == 13


def test_worker_times_and_checks(tmp_path):
    from ubpdsl.autotune.study import Tuner, TuneSettings

    layer = _layer()
    tuner = Tuner(TuneSettings(cache_dir=tmp_path, jobs=0))
    built = tuner.compile(layer, sp.default_config(tuner.target))
    out = LocalRunner().run({"n": layer.n, "rounds": 5, "budget_s": 0.05,
                             "entries": [tuner._entry("a", layer, built), tuner._entry("b", layer, built)]}, 30)
    assert out.ok, out.message
    a, b = out.result["results"]
    assert a["ratio"] == 1.0 and 0.5 < b["ratio"] < 2.0 and a["median_s"] > 0
    assert tuner._check(layer, tuner._reference_y(layer), b) is None
    x = np.frombuffer(make_x(3, 5), np.float32)
    assert x.shape == (15,) and np.all((x >= 0.5) & (x < 1.5))
    assert max(check_positions(4, 5)) == 19


def test_worker_cold_scrubs_before_every_call(tmp_path):
    from ubpdsl.autotune.measure import SCRUB_BYTES
    from ubpdsl.autotune.study import Tuner, TuneSettings

    layer = _layer(384, 32, 784)  # Y is 1.2 MB
    tuner = Tuner(TuneSettings(cache_dir=tmp_path, jobs=0))
    assert tuner.settings.cache == "cold" and tuner.cache_mode == "cold"
    built = tuner.compile(layer, sp.default_config(tuner.target))
    entries = [tuner._entry("a", layer, built), tuner._entry("b", layer, built)]
    request = {"n": layer.n, "rounds": 5, "budget_s": 0.05, "entries": entries}
    cold = LocalRunner().run({**request, "cache": "cold"}, 30)
    assert cold.ok, cold.message
    res = cold.result
    assert res["cache"] == "cold" and res["scrub_bytes"] == SCRUB_BYTES
    for r in res["results"]:
        assert r["inner"] == 1 and r["rounds"] >= 5 and r["scrubs"] == r["rounds"]
        assert tuner._check(layer, tuner._reference_y(layer), r) is None
    assert res["scrubs"] == sum(r["scrubs"] for r in res["results"])
    warm = LocalRunner().run(request, 30)  # no "cache" field: warm, as before
    assert warm.ok, warm.message
    assert warm.result["cache"] == "warm" and warm.result["scrubs"] == 0
    assert all(r["scrubs"] == 0 for r in warm.result["results"])
    # cold is ~5x slower here; only a generous sanity bound, not a benchmark
    assert res["results"][0]["median_s"] > 0.5 * warm.result["results"][0]["median_s"]
    # the tuner's own requests carry the mode; a bad mode is an error result, not a crash
    assert tuner.measure(layer, entries[:1]).result["cache"] == "cold"
    bad = LocalRunner().run({**request, "cache": "hot"}, 30)
    assert bad.status == "error" and "cache must be" in bad.message


def test_cache_mode_is_part_of_the_key(tmp_path):
    from ubpdsl.autotune.study import TuneError, Tuner, TuneSettings, study_name

    layer = _layer()
    cold = Tuner(TuneSettings(cache_dir=tmp_path, jobs=0, trials=3))
    warm = Tuner(TuneSettings(cache_dir=tmp_path, jobs=0, trials=3, cache="warm"))
    k_cold, k_warm = cold.key(layer), warm.key(layer)
    assert k_cold != k_warm
    assert ":cold:" in study_name(layer, cold.target, k_cold, cold.cache_mode)
    assert ":warm:" in study_name(layer, warm.target, k_warm, warm.cache_mode)
    with pytest.raises(TuneError, match="--cache must be"):
        Tuner(TuneSettings(cache_dir=tmp_path, cache="hot"))
    # an entry without a timing mode (written before cold timing existed) counts as warm, never as cold
    entry = {"best": sp.default_config(cold.target).to_json(), "best_value": 1.0, "trials": 5}
    cold.tuned.put(k_cold, entry)
    warm.tuned.put(k_warm, entry)
    assert cold.cached_result(layer) is None
    hit = warm.cached_result(layer)
    assert hit is not None and hit.from_cache and hit.cache == "warm"
    cold.tuned.put(k_cold, {**entry, "cache": "cold"})
    assert cold.cached_result(layer).cache == "cold"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_tunes_caches_and_refuses_bad_input(tmp_path):
    masks = make_masks(tmp_path / "masks.npz", [(32, 16), (48, 32)])
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    pix = tmp_path / "pixels.json"
    pix.write_text(json.dumps({"layer1": 40}))
    args = ["--mask", str(masks), "--trials", "5", "-o", str(out), "--pixels", "64", "--pixels-map", str(pix),
            "--cache", "cold"]
    r = run_tune(args, cache)
    assert r.returncode == 0, r.stderr
    assert "geometric means: tuned vs default" in r.stdout and "torch.mm" in r.stdout
    for name in ("layer0.host.so", "layer0.h", "layer1.host.so", "layer1.h", "manifest.json",
                 "summary.md", "tuning_history.png"):
        assert (out / name).is_file(), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["layer1"]["n"] == 40
    assert manifest["layers"]["layer0"]["trials"] >= 5
    assert manifest["cache"] == "cold" and manifest["layers"]["layer0"]["cache"] == "cold"
    assert "cold caches" in r.stdout
    db = cache / "autotune" / "studies.db"
    trials_before = sqlite_trials(db)
    assert len([t for t in trials_before if t[1] == "COMPLETE"]) >= 10

    # rerun: every layer comes from the tuned-config cache, the study is not touched
    t0 = time.monotonic()
    r2 = run_tune(args, cache)
    assert r2.returncode == 0, r2.stderr
    assert "cached" in r2.stdout
    assert time.monotonic() - t0 < 60
    assert sqlite_trials(db) == trials_before
    before = _digest(db)

    # bad input: one-line error, exit 1, the existing study untouched
    no_w = make_masks(tmp_path / "noweights.npz", [(32, 16)], weights=False)
    bad = {
        "unknown target": (["--mask", str(masks), "--target", "riscv"], "unknown target"),
        "unreachable storage": (["--mask", str(masks), "--pixels", "64", "--storage",
                                 "postgresql://nobody:pw@127.0.0.1:1/none"], "cannot reach storage"),
        "no weights": (["--mask", str(no_w)], "has no weights"),
        "missing mask": (["--mask", str(tmp_path / "nope.npz")], "does not exist"),
        "bad cache mode": (["--mask", str(masks), "--cache", "hot"], "--cache must be one of cold, warm"),
    }
    for what, (bad_args, message) in bad.items():
        r3 = run_tune(bad_args + ["-o", str(tmp_path / "bad")], cache, timeout=60)
        assert r3.returncode == 1, what
        assert r3.stderr.strip().startswith("error:") and message in r3.stderr, (what, r3.stderr)
        assert "Traceback" not in r3.stderr and "pw@" not in r3.stderr
    assert _digest(db) == before
    assert sqlite_trials(db) == trials_before

    # warm timing never answers from the cold results (a cold hit would say "cached": 5 >= 2 trials)
    out_w = tmp_path / "out_warm"
    r4 = run_tune(["--mask", str(masks), "--layer", "layer0", "--trials", "2", "--pixels", "64", "--no-dense",
                   "-o", str(out_w), "--cache", "warm"], cache)
    assert r4.returncode == 0, r4.stderr
    assert "cached" not in r4.stdout and "warm caches" in r4.stdout
    warm_manifest = json.loads((out_w / "manifest.json").read_text())
    assert warm_manifest["cache"] == "warm" and ":warm:" in warm_manifest["layers"]["layer0"]["study"]
    assert ":cold:" in manifest["layers"]["layer0"]["study"]


def test_synthetic_weights_and_estimate_target(tmp_path):
    masks = make_masks(tmp_path / "masks.npz", [(32, 24)], weights=False)
    r = run_tune(["--mask", str(masks), "--trials", "4", "--synthetic-weights", "--target", "aarch64-neon",
                  "-o", str(tmp_path / "out"), "--pixels", "49"], tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert "estimate (" in r.stdout and "llvm-mca -mcpu=cortex-a76" in r.stdout
    assert (tmp_path / "out" / "layer0.aarch64-neon.so").is_file()
    assert not (tmp_path / "out" / "layer0.packed.bin").exists()


@pytest.mark.parametrize("batch", [1, 3])
def test_gemm_columns_mobilenetv2(batch):
    from ubpdsl.models import gemm_columns, resolve_model

    loaded = resolve_model("mobilenetv2", pretrained=False, batch=batch)
    px = gemm_columns(loaded.model, loaded.example)
    assert px["features.0.0"] == 112 * 112 * batch
    assert px["features.18.0"] == 49 * batch
    assert px["classifier.1"] == batch
