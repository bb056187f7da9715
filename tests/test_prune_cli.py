"""``ubpdsl prune`` and ``ubpdsl inspect``: round trip, plot, and one-line errors on bad input."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ubpdsl.cli import main
from ubpdsl.masks import FORMAT, load_masks
from ubpdsl.models import DigitsCNN
from ubpdsl.pretrained import mobilenet_v2_state_dict
from ubpdsl.prune.selectors import budget


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, needle: str = "") -> None:
    assert code == 1
    assert "Traceback" not in out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    assert needle in lines[0]


@pytest.fixture(scope="module")
def digits_masks(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("masks") / "digits.npz"
    assert main(["prune", "--model", "digits-cnn", "--sparsity", "0.75", "--block", "4", "-o", str(path)]) == 0
    return path


def test_prune_then_inspect_round_trip(digits_masks, capsys):
    layers = load_masks(digits_masks)
    assert list(layers) == ["conv1", "conv2", "conv3", "fc"]
    shapes = {n: tuple(m.weight.shape) for n, m in DigitsCNN().named_children() if hasattr(m, "weight")}
    for name, lm in layers.items():
        assert lm.shape == shapes[name] and lm.block == 4
        assert lm.num_blocks == budget(lm.R, lm.C, 4, 0.75)
        assert lm.weight is not None and not np.any(lm.weight[~lm.dense_mask()])
    code, out, err = run(capsys, "inspect", digits_masks)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "shape", "RxC", "N", "blocks", "sparsity", "aligned", "empty_rows",
                                "weights", "kind", "pixels"]
    row = {ln.split()[0]: ln.split() for ln in lines[2:6]}
    for name, lm in layers.items():
        cells = row[name]
        assert cells[2] == f"{lm.R}x{lm.C}" and int(cells[4]) == lm.num_blocks
        assert float(cells[5]) == pytest.approx(lm.sparsity, abs=1e-4)
        assert float(cells[6]) == pytest.approx(np.mean(lm.rows % 4 == 0), abs=1e-3)
        assert int(cells[7]) == int((~lm.dense_mask().any(axis=1)).sum())
    assert "sparsity 0.7500" in lines[-1]


def test_inspect_plot_writes_png(digits_masks, tmp_path, capsys):
    png = tmp_path / "map.png"
    code, out, err = run(capsys, "inspect", digits_masks, "--plot", png, "--layer", "conv2")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_prune_mobilenetv2_keeps_pretrained_weights_on_the_mask(tmp_path, capsys):
    path = tmp_path / "mbv2.npz"
    code, out, err = run(
        capsys, "prune", "--model", "mobilenetv2", "--sparsity", "0.9", "--block", "8",
        "--skip", "features.1.conv.1", "--skip", "features.18.*", "--layer-sparsity", "classifier.1=0.5", "-o", path,
    )  # fmt: skip
    assert code == 0, err
    assert "skipped features.2.conv.1.0: depthwise convolution (groups=96)" in out
    layers = load_masks(path)
    assert len(layers) == 36 - 1 - 1  # features.1.conv.1 and features.18.0 skipped by the pattern
    assert "features.1.conv.1" not in layers and "features.18.0" not in layers
    state = mobilenet_v2_state_dict()
    for name, lm in layers.items():
        target = 0.5 if name == "classifier.1" else 0.9
        assert lm.num_blocks == budget(lm.R, lm.C, 8, target), name
        w = state[f"{name}.weight"].reshape(lm.R, lm.C).numpy()
        mask = lm.dense_mask()
        assert np.array_equal(lm.weight, np.where(mask, w, 0)), name


def test_prune_unstructured_stores_single_weight_blocks(tmp_path, capsys):
    path = tmp_path / "u.npz"
    code, out, err = run(
        capsys, "prune", "--model", "digits-cnn", "--sparsity", "0.5", "--method", "unstructured", "-o", path
    )
    assert code == 0, err
    for lm in load_masks(path).values():
        assert lm.block == 1 and lm.num_blocks == round(0.5 * lm.R * lm.C)


def test_help_has_examples(capsys):
    for cmd in ("prune", "inspect"):
        code, out, _ = run(capsys, cmd, "--help")
        assert code == 0 and "Example" in out and "ubpdsl " + cmd in out


# ----------------------------------------------------------------------------- bad input


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _layer(rows, cols, shape=(8, 3), block=4, weight=None) -> dict[str, np.ndarray]:
    out = {
        "format": np.array(FORMAT),
        "L.shape": np.array(shape, dtype=np.int64),
        "L.block": np.array([block, 1], dtype=np.int64),
        "L.rows": np.array(rows, dtype=np.int32),
        "L.cols": np.array(cols, dtype=np.int32),
    }
    if weight is not None:
        out["L.weight"] = weight
    return out


def test_inspect_rejects_bad_files(digits_masks, tmp_path, capsys):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(digits_masks.read_bytes()[: digits_masks.stat().st_size // 2])
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    pickled = tmp_path / "pickled.npz"
    with zipfile.ZipFile(pickled, "w") as zf:
        zf.writestr("format.npy", pickle.dumps(FORMAT))
    obj = tmp_path / "object.npz"
    np.savez(obj, format=np.array([FORMAT, 1], dtype=object))
    cases = {
        truncated: "",
        garbage: "",
        pickled: "",
        obj: "",
        _write_npz(tmp_path / "overlap.npz", _layer([0, 2], [1, 1])): "L",
        _write_npz(tmp_path / "range.npz", _layer([5], [0])): "L",
        _write_npz(tmp_path / "col.npz", _layer([0], [3])): "L",
        _write_npz(tmp_path / "wshape.npz", _layer([0], [0], weight=np.zeros((3, 8), np.float32))): "L",
        tmp_path / "missing.npz": "does not exist",
    }
    for path, needle in cases.items():
        code, out, err = run(capsys, "inspect", path)
        assert_one_line_error(code, out, err, needle)


def test_prune_rejects_bad_options(tmp_path, capsys):
    out_path = tmp_path / "m.npz"
    base = ["prune", "--model", "digits-cnn", "-o", out_path]
    for args, needle in [
        (["--sparsity", "1.0"], "[0, 1)"),
        (["--sparsity", "-0.1"], "[0, 1)"),
        (["--sparsity", "0.5", "--block", "0"], "--block"),
        (["--sparsity", "0.5", "--layer-sparsity", "fc"], "NAME=S"),
        (["--sparsity", "0.5", "--layer-sparsity", "fc=1.5"], "[0, 1)"),
        (["--sparsity", "0.5", "--skip", "nope"], "matches no layer"),
        (["--sparsity", "0.5", "--block", "128"], "--block must be in 1..64"),
    ]:
        code, out, err = run(capsys, *base, *args)
        assert_one_line_error(code, out, err, needle)
    code, out, err = run(capsys, "prune", "--model", "resnet9000", "--sparsity", "0.5", "-o", out_path)
    assert_one_line_error(code, out, err, "unknown model spec")
    code, out, err = run(capsys, "prune", "--model", "mobilenetv2", "--sparsity", "0.5", "--importance", "taylor",
                         "-o", out_path)  # fmt: skip
    assert_one_line_error(code, out, err, "taylor")
    code, out, err = run(capsys, *base, "--sparsity", "0.5", "--method", "magic")
    assert code == 2 and "Traceback" not in out + err  # click usage error
    assert not out_path.exists()


def test_prune_rejects_unsafe_and_mismatched_weights(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    wrong = tmp_path / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(3, 3)}, wrong)
    for path, needle in [(evil, "weights-only"), (wrong, "do not fit")]:
        code, out, err = run(capsys, "prune", "--model", "digits-cnn", "--weights", path, "--sparsity", "0.5",
                             "-o", tmp_path / "m.npz")  # fmt: skip
        assert_one_line_error(code, out, err, needle)
    assert not marker.exists()


def test_real_process_prints_one_error_line(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "ubpdsl.cli", "inspect", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_global_budget_warns_about_emptied_layers(tmp_path, capsys):
    """MobileNetV2's classifier has small weights next to the convs: --global strips it."""
    path = tmp_path / "g.npz"
    code, out, err = run(capsys, "prune", "--model", "mobilenetv2", "--sparsity", "0.9", "--block", "4", "--global",
                         "-o", path)
    assert code == 0, err
    layers = load_masks(path)
    stripped = {ln.split()[4] for ln in err.splitlines() if ln.startswith("warning: --global left layer")}
    assert stripped, err
    for name in stripped:
        lm = layers[name]
        empty = int((~lm.dense_mask().any(axis=1)).sum())
        assert empty > lm.R // 2 or lm.sparsity > 0.95
