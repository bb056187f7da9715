"""``ubpdsl export --runtime executorch`` end to end: a user's model file through the real CLI, the
written program loaded by ExecuTorch's Python runtime and compared with the masked torch model;
and one bad input per one-line error (executorch missing, untraceable model, unsupported node,
masks of another model).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ubpdsl.cli import main
from ubpdsl.masks import save_masks
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier

try:
    from ubpdsl.deploy import executorch as det

    HAVE_ET = det.et_available()
except ImportError:  # pragma: no cover
    HAVE_ET = False

needs_et = pytest.mark.skipif(not HAVE_ET, reason="executorch (optional extra) is not installed")

MODEL_PY = textwrap.dedent('''
    import torch
    from torch import nn
    from torch.nn import functional as F


    class Net(nn.Module):
        """stem conv + BN + ReLU, an inverted-residual block with a skip, global pool, linear."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.expand = nn.Conv2d(16, 48, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(48)
            self.dw = nn.Conv2d(48, 48, 3, padding=1, groups=48, bias=False)
            self.bn2 = nn.BatchNorm2d(48)
            self.project = nn.Conv2d(48, 16, 1, bias=False)
            self.bn3 = nn.BatchNorm2d(16)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            y = F.relu6(self.bn2(self.dw(F.relu6(self.bn1(self.expand(x))))))
            x = x + self.bn3(self.project(y))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


    class Branchy(Net):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                x = -x
            return super().forward(x)


    class Gelu(Net):
        def forward(self, x):
            return F.gelu(super().forward(x))
''')

PRUNED = ["expand", "project", "fc"]


def _pruned_files(tmp: Path) -> tuple[Path, Path, Path]:
    """net.py, the pruned state dict and masks.npz of Net (random BN statistics, BED 75 %)."""
    (tmp / "net.py").write_text(MODEL_PY)
    sys.path.insert(0, str(tmp))
    try:
        import importlib

        net = importlib.import_module("net")
        torch.manual_seed(0)
        model = net.Net()
    finally:
        sys.path.remove(str(tmp))
        sys.modules.pop("net", None)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    sp = UnalignedBlockSparsifier(0.75, block=4, method="bed")
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in PRUNED])
    sp.step()
    sp.squash_mask()
    save_masks(tmp / "masks.npz", sp.to_layer_masks())
    torch.save(model.state_dict(), tmp / "pruned.pt")
    return tmp / "net.py", tmp / "pruned.pt", tmp / "masks.npz"


def _export_args(py: Path, weights: Path, masks: Path, out: Path, cls: str = "Net", batch: int = 2) -> list[str]:
    return ["export", "--runtime", "executorch", "--model", f"{py}:{cls}", "--weights", str(weights),
            "--input-shape", "3,12,12", "--batch", str(batch), "--mask", str(masks), "-o", str(out)]


def _one_line_error(capsys, rc: int) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 1 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@needs_et
@pytest.mark.parametrize("batch", [1, 2])
def test_export_executorch_cli_end_to_end(tmp_path, capsys, batch):
    from ubpdsl.deploy.et_export import load_executorch
    from ubpdsl.models import resolve_model

    py, weights, masks = _pruned_files(tmp_path)
    out = tmp_path / "net_et"
    assert main(_export_args(py, weights, masks, out, batch=batch)) == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    for f in ("model.pte", "plan.bin", "libubp_et.so", "manifest.json", "README.md", "src/et_shim.cpp",
              "src/ubp_model.c", "bundle/manifest.json"):
        assert (out / f).is_file(), f
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["layer"] for s in manifest["kernel_slots"]) == sorted(PRUNED)
    assert manifest["input_shape"] == [batch, 3, 12, 12] and manifest["output_shape"] == [batch, 10]

    # the masked torch model, resolved independently from the same files
    ref_model = resolve_model(f"{py}:Net", weights=weights, input_shape=(3, 12, 12)).model
    prog = load_executorch(out)
    torch.manual_seed(1)
    for _ in range(2):
        x = torch.randn(batch, 3, 12, 12)
        with torch.no_grad():
            ref = ref_model(x)
        torch.testing.assert_close(prog(x), ref, rtol=1e-4, atol=1e-5)
    # the same directory from C++ without Python (README steps): examples/executorch_cpp/et_main.cpp
    from ubpdsl.deploy.et_export import build_cpp_example, cpp_example_args

    exe = build_cpp_example(out, tmp_path / "et_main")
    x.numpy().astype("<f4").tofile(tmp_path / "x.f32")
    r = subprocess.run([str(exe), str(out), str(tmp_path / "x.f32"), *cpp_example_args(out)], capture_output=True,
                       text=True, timeout=120, env=dict(os.environ, PLAN_ID=str(manifest["plan_id"])))
    assert r.returncode == 0, r.stderr
    got = torch.tensor([float(v) for v in r.stdout.split()]).reshape(ref.shape)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # a forged plan.bin (the first op writes 1 TiB past its workspace) is refused before it runs
    forged = out.parent / "forged"
    shutil.copytree(out, forged)
    words = np.fromfile(forged / "plan.bin", "<i8")
    words[16 + 2] = 1 << 40  # op 0, dst
    words.tofile(forged / "plan.bin")
    r = subprocess.run([str(exe), str(forged), str(tmp_path / "x.f32"), *cpp_example_args(out)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PLAN_ID=str(manifest["plan_id"])))
    assert r.returncode == 1 and "plan.bin is not a valid plan" in r.stderr, (r.returncode, r.stderr)
    # the pruned part runs on our operator: without its plan registered the program fails
    det.register_plan(manifest["plan_id"], None)
    with pytest.raises(Exception):  # noqa: B017 - ExecuTorch raises its own RuntimeError
        prog.program(x)


@needs_et
def test_export_executorch_refuses_a_modified_file(tmp_path, capsys):
    from ubpdsl.deploy.et_export import load_executorch
    from ubpdsl.errors import UbpError

    py, weights, masks = _pruned_files(tmp_path)
    out = tmp_path / "et"
    assert main(_export_args(py, weights, masks, out, batch=1)) == 0
    raw = bytearray((out / "plan.bin").read_bytes())
    raw[200] ^= 0xFF
    (out / "plan.bin").write_bytes(bytes(raw))
    with pytest.raises(UbpError, match="sha256"):
        load_executorch(out)


@needs_et
@pytest.mark.parametrize("cls, what", [("Branchy", "torch.fx cannot trace Branchy"), ("Gelu", "node gelu")])
def test_export_executorch_names_what_it_cannot_plan(tmp_path, capsys, cls, what):
    py, weights, masks = _pruned_files(tmp_path)
    err = _one_line_error(capsys, main(_export_args(py, weights, masks, tmp_path / "o", cls=cls)))
    assert what in err, err
    assert not (tmp_path / "o").exists()


@needs_et
def test_export_executorch_masks_of_another_model(tmp_path, capsys):
    py, weights, _ = _pruned_files(tmp_path)
    other = nn.Sequential()
    other.add_module("expand", nn.Conv2d(16, 32, 1, bias=False))  # 32 outputs, Net's expand has 48
    sp = UnalignedBlockSparsifier(0.5, block=4, method="bed")
    sp.prepare(other, config=[{"tensor_fqn": "expand.weight"}])
    sp.step()
    sp.squash_mask()
    save_masks(tmp_path / "other.npz", sp.to_layer_masks())
    err = _one_line_error(capsys, main(_export_args(py, weights, tmp_path / "other.npz", tmp_path / "o")))
    assert "layer expand" in err and "masks were made from" in err, err


def test_export_executorch_without_executorch(tmp_path):
    """A Python where `executorch` has no exir (as if the extra were not installed): one line, exit 1."""
    fake = tmp_path / "fake" / "executorch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    py, weights, masks = _pruned_files(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", "import sys; from ubpdsl.cli import main; sys.exit(main(sys.argv[1:]))",
                        *_export_args(py, weights, masks, tmp_path / "o")], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == "error: executorch is not installed: pip install 'ubpdsl[executorch]' " \
                               "(executorch==1.5.1)", r.stderr
