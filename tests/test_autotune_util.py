"""Helpers shared by the autotuner tests (tiny masks, a private cache, the CLI in a subprocess)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from ubpdsl.compiler import random_problem
from ubpdsl.masks import LayerMask, save_masks

ROOT = Path(__file__).resolve().parents[1]


def make_masks(path: Path, shapes: list[tuple[int, int]], weights: bool = True, block: int = 4) -> Path:
    """A masks.npz with one random unaligned-block layer per (M, K) at 75 % sparsity."""
    layers = []
    for i, (M, K) in enumerate(shapes):
        p = random_problem(M, K, block, 0.75, seed=i)
        layers.append(LayerMask(f"layer{i}", (M, K), block, p.rows, p.cols, p.weight if weights else None))
    save_masks(path, layers)
    return path


def tune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ubpdsl.cli", "tune", "--no-progress", *args]


def run_tune(args: list[str], cache: Path, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, UBPDSL_CACHE_DIR=str(cache))
    return subprocess.run(tune_cmd(*args), capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def sqlite_trials(db: Path) -> list[tuple[int, str, float | None]]:
    """(number, state, value) of every trial in an Optuna SQLite storage, read-only."""
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT t.number, t.state, v.value FROM trials t "
                           "LEFT JOIN trial_values v ON v.trial_id = t.trial_id ORDER BY t.trial_id").fetchall()
    except sqlite3.OperationalError:
        rows = []
    finally:
        con.close()
    return rows
