"""A user's own model, from the command line only: prune -> tune -> export -> run on the kernels.

The model files are written outside the package (as a user would keep them), referenced as
``FILE.py:factory`` and ``module:factory``; each layer's n comes from running the example input.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from ubpdsl.masks import load_masks
from ubpdsl.models import apply_masks, gemm_columns, resolve_model

ROOT = Path(__file__).resolve().parents[1]

USER_MODELS = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.nn import functional as F


    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(c, c, 1)

        def forward(self, x):
            return F.relu(x + self.conv2(F.relu(self.conv1(x))))


    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)
            self.block = Block(16)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.block(F.relu(self.stem(x)))
            return self.head(x.mean((2, 3)))


    class Encoder(nn.Module):
        """One pre-norm transformer encoder layer on [batch, tokens, 32] embeddings."""

        def __init__(self, d=32, heads=4):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            h = self.norm1(x)
            q, k, v = (f(h).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = x + self.o(a)
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


    def encoder():
        torch.manual_seed(3)
        return Encoder()
''')


def cli(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    r = subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True, cwd=cwd,
                       env=env, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("user")
    (d / "mymodels.py").write_text(USER_MODELS)
    return d


@pytest.mark.timeout(900)
@pytest.mark.parametrize("spec, shape, batch", [
    ("mymodels.py:TinyResNet", "3,16,16", 2),
    ("mymodels:encoder", "8,32", 1),
])
def test_user_model_from_the_cli(workdir, spec, shape, batch):
    tag = spec.split(":")[1]
    masks, tuned, bundle = (workdir / f"{tag}.npz", workdir / f"{tag}-tuned", workdir / f"{tag}-bundle")
    model_args = ["--model", spec, "--input-shape", shape]
    r = cli("prune", *model_args, "--sparsity", "0.5", "--block", "4", "-o", str(masks), cwd=workdir)
    assert r.returncode == 0, r.stderr
    r = cli("tune", "--mask", str(masks), *model_args, "--batch", str(batch), "--trials", "1", "--no-dense",
            "--no-progress", "--cache", "warm", "-o", str(tuned), cwd=workdir)
    assert r.returncode == 0, r.stderr
    # one trial is the default config: the summary says so and shows it at exactly 1.00x
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| ") and "(= default)" in ln]
    assert rows and all("| 1.00x |" in ln for ln in rows), r.stdout
    r = cli("export", "--mask", str(masks), "--tuned", str(tuned), "--model", spec, "-o", str(bundle), cwd=workdir)
    assert r.returncode == 0, r.stderr

    # every layer was tuned at its own n: pixels (or tokens) x batch, from one run of the example input
    sys.path.insert(0, str(workdir))
    try:
        loaded = resolve_model(spec if not spec.startswith("mymodels.py") else str(workdir / spec),
                               input_shape=tuple(int(d) for d in shape.split(",")), batch=batch)
    finally:
        sys.path.remove(str(workdir))
    want_n = gemm_columns(loaded.model, loaded.example)
    manifest = json.loads((tuned / "manifest.json").read_text())
    layers = load_masks(masks)
    assert set(manifest["layers"]) == set(layers)
    for name, entry in manifest["layers"].items():
        assert entry["n"] == want_n[name], name
    if tag == "encoder":
        assert want_n["q"] == 8 and want_n["fc1"] == 8
    else:
        assert want_n["stem"] == 8 * 8 * batch and want_n["head"] == batch

    # the model on the kernels matches the masked dense model
    from ubpdsl.torch_ops import kernel_layers, swap_to_kernels

    reference = apply_masks(loaded.model, layers)
    fast = swap_to_kernels(copy.deepcopy(reference), bundle)
    assert set(kernel_layers(fast)) == set(layers)
    x = torch.randn(batch, *(int(d) for d in shape.split(",")), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        np.testing.assert_allclose(fast(x).numpy(), reference(x).numpy(), rtol=1e-4, atol=1e-4)


def test_mistakes_are_one_line_errors(workdir):
    masks = workdir / "errs.npz"
    r = cli("prune", "--model", "mymodels.py:TinyResNet", "--input-shape", "3,16,16", "--sparsity", "0.5",
            "-o", str(masks), cwd=workdir)
    assert r.returncode == 0, r.stderr
    cases = {
        "no such factory": (["prune", "--model", "mymodels.py:Nope", "--sparsity", "0.5", "-o", "x.npz"],
                            "has no 'Nope'"),
        "no such file": (["prune", "--model", "nothere.py:F", "--sparsity", "0.5", "-o", "x.npz"], "no such file"),
        "not a module": (["prune", "--model", "mymodels:Block", "--sparsity", "0.5", "-o", "x.npz"], "failed"),
        "wrong model": (["tune", "--mask", str(masks), "--model", "mymodels:encoder", "--input-shape", "8,32"],
                        "the model does not have"),
        "no n": (["tune", "--mask", str(masks)], "has no n"),
        "model fails on input": (["tune", "--mask", str(masks), "--model", "mymodels.py:TinyResNet",
                                  "--input-shape", "5,16,16"], "the model failed on an example input"),
        "bad map key": (["tune", "--mask", str(masks), "--pixels-map", "map.json"], "key 'stme' names no layer"),
        "bad input shape": (["tune", "--mask", str(masks), "--model", "mymodels.py:TinyResNet",
                             "--input-shape", "3,a"], "--input-shape"),
    }
    (workdir / "map.json").write_text(json.dumps({"stme": 64}))
    for what, (args, needle) in cases.items():
        r = cli(*args, "--no-progress" if args[0] == "tune" else "--seed", *([] if args[0] == "tune" else ["0"]),
                cwd=workdir, timeout=300)
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
        assert r.returncode == 1 and len(errors) == 1 and needle in errors[0], (what, r.stderr)


def test_exported_program_gives_model_and_input_shape(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 5 * 5, 4)).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(2, 3, 5, 5),)), str(path))
    loaded = resolve_model(str(path), batch=3)
    assert tuple(loaded.example.shape) == (3, 3, 5, 5)
    assert loaded.columns() == {"0": 25 * 3, "3": 3}
    x = torch.randn(2, 3, 5, 5)  # the program was exported for batch 2
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(x).numpy(), net(x).numpy(), rtol=1e-5, atol=1e-6)
