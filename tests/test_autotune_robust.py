"""Autotuner robustness: crashing and hanging candidates, and a tune killed midway then resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_autotune_util import ROOT, make_masks, sqlite_trials, tune_cmd

from ubpdsl.autotune import space as sp
from ubpdsl.autotune.study import TUNE_SYMBOL, Tuner, TuneSettings, compile_job
from ubpdsl.compiler import random_problem
from ubpdsl.runtime.toolchain import zig_cmd

_BAD_C = {
    "segfault": "int SYM(const float *x, float *y, long n, const void *w) { return *(volatile int *)0; }",
    "hang": "int SYM(const float *x, float *y, long n, const void *w) { for (;;) { __asm__ volatile(\"\"); } }",
}


def _bad_so(tmp: Path, kind: str, symbol: str) -> Path:
    src = tmp / f"{kind}.c"
    so = tmp / f"{kind}.so"
    src.write_text(_BAD_C[kind].replace("SYM", symbol))
    subprocess.run([*zig_cmd(), "cc", "-shared", "-fPIC", "-O1", "-o", str(so), str(src)], check=True,
                   capture_output=True)
    return so


def test_crashing_and_hanging_candidates_do_not_stop_tuning(tmp_path):
    layer = sp.Layer(random_problem(48, 32, 4, 0.75), 32)
    symbol = TUNE_SYMBOL
    bad = [_bad_so(tmp_path, "segfault", symbol), _bad_so(tmp_path, "hang", symbol)]
    calls = []

    def compile_fn(job):  # the first two candidates are sabotaged, the rest compile for real
        res = compile_job(job)
        calls.append(job["config"])
        if len(calls) <= 2 and "error" not in res:
            res = dict(res, so=str(bad[len(calls) - 1]))
        return res

    tuner = Tuner(TuneSettings(cache_dir=tmp_path / "cache", trials=6, jobs=0, timeout=4.0), compile_fn=compile_fn)
    t0 = time.monotonic()
    try:
        result = tuner.tune_layer(layer)
    finally:
        tuner.close()
    assert time.monotonic() - t0 < 90
    import optuna

    study = optuna.load_study(study_name=result.study, storage=tuner.storage)
    reasons = [t.user_attrs.get("fail_reason", "") for t in study.trials if t.state.name == "FAIL"]
    assert any(r.startswith("crash:") and "SIGSEGV" in r for r in reasons), reasons
    assert any(r.startswith("timeout:") for r in reasons), reasons
    assert result.failed == 2 and result.trials >= 6
    assert sum(t.state.name == "COMPLETE" for t in study.trials) >= 4
    assert result.best_value <= 1.0


def _completed(db: Path) -> dict[int, float]:
    return {n: v for n, s, v in sqlite_trials(db) if s == "COMPLETE"}


@pytest.mark.timeout(170)
def test_killed_tune_resumes_without_losing_trials(tmp_path):
    masks = make_masks(tmp_path / "masks.npz", [(64, 48)])
    cache = tmp_path / "cache"
    db = cache / "autotune" / "studies.db"
    args = tune_cmd("--mask", str(masks), "--trials", "10", "-o", str(tmp_path / "out"), "--pixels", "48",
                    "--no-dense")
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(cache))
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    try:
        while len(_completed(db)) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, "tune finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    done_before = _completed(db)
    assert 3 <= len(done_before) < 10
    r = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert r.returncode == 0, r.stderr
    after = sqlite_trials(db)
    done_after = {n: v for n, s, v in after if s == "COMPLETE"}
    for number, value in done_before.items():  # nothing finished was lost or changed
        assert done_after.get(number) == value
    assert len(done_after) >= 10 - sum(s == "FAIL" for _, s, _ in after)
    assert not [n for n, s, _ in after if s == "RUNNING"], (after, r.stderr[-2000:])
    numbers = [n for n, _, _ in after]
    assert sorted(numbers) == list(range(len(numbers)))
