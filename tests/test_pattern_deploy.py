"""Pattern layers in bundles: the direct pattern kernel where it applies (3x3, stride 1, padding 1,
known image), N = 1 blocks otherwise; torch integration, C reader and damaged pattern blobs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import UbpError
from ubpdsl.export import BundleError, export_bundle, load_bundle, pattern_layer_images, run_bundle_main
from ubpdsl.identity import file_sha256
from ubpdsl.packing import PATTERN_HEADER_WORDS, unpack_pattern
from ubpdsl.prune.pattern import PatternSparsifier
from ubpdsl.torch_ops import SparseConv2d, swap_to_kernels

H, W = 9, 7


def pattern_model(seed: int = 0) -> tuple[nn.Module, dict, torch.Tensor]:
    """conv 3x3 s1 p1 (bias) -> conv 3x3 s2 p1 -> 1x1 conv, the 3x3 convs pattern-pruned one-shot."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(5, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(8, 6, 1)).eval()
    sp = PatternSparsifier(sparsity_level=0.8)
    sp.prepare(model, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sp.step()
    sp.squash_mask()
    return model, sp.to_layer_masks(), torch.randn(2, 5, H, W)


@pytest.fixture(scope="module")
def pm():
    return pattern_model()


@pytest.fixture(scope="module")
def bundle(pm, tmp_path_factory):
    model, masks, example = pm
    return export_bundle(masks, tmp_path_factory.mktemp("pb") / "bundle", targets=["host", "aarch64-neon"],
                         model=model, example=example)


def test_pattern_kernel_where_it_applies(pm, bundle):
    _, masks, _ = pm
    assert {n: m.kind for n, m in masks.items()} == {"0": "pattern", "2": "pattern"}
    b = load_bundle(bundle)
    for t in ("host", "aarch64-neon"):
        te0, te2 = (b.manifest["layers"][n]["targets"][t] for n in ("0", "2"))
        assert (te0["op"], te0["image"], te0["symbol"], te0["config"]["variant"]) == (
            "pattern", [H, W], "ubp_pattern_0", "pattern_direct")
        assert (te2["op"], te2["symbol"]) == ("gemm", "ubp_2")  # stride 2: N = 1 blocks on the block kernel
        assert "image" not in te2
        k0 = b.kernel("0", t)
        assert (k0.op, k0.image, k0.K, k0.x_rows) == ("pattern", (H, W), 45, 5)
        rows = [r.split("\t") for r in (bundle / t / "kernels.tsv").read_text().splitlines() if r[0] != "#"]
        assert [r[:5] for r in rows] == [["0", "ubp_pattern_0", "12", "5", "1"], ["2", "ubp_2", "8", "108", "1"]]
    blob = np.fromfile(bundle / "host" / "0.packed.bin", np.uint8)
    np.testing.assert_array_equal(unpack_pattern(blob, M=12, K=5).dense(), masks["0"].weight.reshape(12, 5, 3, 3))


def test_images_option_and_fallbacks(pm):
    model, masks, example = pm
    assert pattern_layer_images(masks) == {}  # no image size known: blocks
    assert pattern_layer_images(masks, images=(4, 6)) == {"0": (4, 6), "2": (4, 6)}  # no model: trusted
    assert pattern_layer_images(masks, model=model, images=(4, 6)) == {"0": (4, 6)}  # the model says stride 2
    assert pattern_layer_images(masks, model=model, example=example) == {"0": (H, W)}
    import dataclasses

    px = {**masks, "0": dataclasses.replace(masks["0"], pixel_keep=np.ones((H, W), bool))}
    assert pattern_layer_images(px, model=model, example=example) == {}  # a pixel mask: blocks


def test_swapped_model_matches_torch(pm, bundle):
    model, _, example = pm
    want = model(example)
    import copy

    swapped = swap_to_kernels(copy.deepcopy(model), bundle)
    assert isinstance(swapped[0], SparseConv2d) and swapped[0].image == (H, W)
    assert swapped[2].image is None
    with torch.no_grad():
        got = swapped(example)
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), rtol=1e-4, atol=1e-4)
        # the layer alone against conv2d, unbatched too
        x = example[0]
        np.testing.assert_allclose(swapped[0](x).numpy(), F.conv2d(x, model[0].weight, model[0].bias, padding=1)
                                   .detach().numpy(), rtol=1e-4, atol=1e-4)
        with pytest.raises(UbpError, match=r"layer 0: its pattern kernel was built for 9x7 images, got input"):
            swapped(torch.randn(1, 5, H + 1, W))


def _layer_ref(model, x):
    y = F.conv2d(torch.from_numpy(x).view(1, 5, H, W), model[0].weight, padding=1)
    return y.detach().numpy().reshape(12, H * W)


def test_c_reader_runs_the_pattern_kernel(pm, bundle):
    model, _, _ = pm
    x = np.random.default_rng(1).standard_normal((5, H * W)).astype(np.float32)
    np.testing.assert_allclose(run_bundle_main(bundle, "host", "0", x), _layer_ref(model, x), rtol=1e-4, atol=1e-4)


def test_c_reader_runs_the_pattern_kernel_on_neon(pm, bundle):
    from ubpdsl.runtime import qemu

    if not (qemu.qemu_available() and qemu.aarch64_sysroot() is not None):
        pytest.skip("needs qemu-aarch64 and libc6-arm64-cross")
    model, _, _ = pm
    x = np.random.default_rng(2).standard_normal((5, H * W)).astype(np.float32)
    np.testing.assert_allclose(run_bundle_main(bundle, "aarch64-neon", "0", x), _layer_ref(model, x),
                               rtol=1e-4, atol=1e-4)


def _damage(bundle, tmp_path, word: int, value: int):
    """A copy of the bundle whose host pattern blob has header/content word ``word`` set to ``value``,
    with the manifest and kernels.tsv re-signed (so only the blob's own validation can catch it)."""
    root = tmp_path / "copy"
    shutil.copytree(bundle, root)
    path = root / "host" / "0.packed.bin"
    blob = bytearray(path.read_bytes())
    blob[4 * word: 4 * word + 4] = np.array([value], "<i4").tobytes()
    path.write_bytes(bytes(blob))
    old = file_sha256(bundle / "host" / "0.packed.bin")
    new = file_sha256(path)
    tsv = root / "host" / "kernels.tsv"
    tsv.write_text(tsv.read_text().replace(old, new))
    m = json.loads((root / "manifest.json").read_text())
    m["layers"]["0"]["targets"]["host"]["sha256"]["packed"] = new
    m["indexes"]["host"]["sha256"] = file_sha256(tsv)
    (root / "manifest.json").write_text(json.dumps(m))
    return root


def _chan_word(bundle) -> int:
    """Index of the first kernel_chan word of the host pattern blob."""
    h = np.fromfile(bundle / "host" / "0.packed.bin", np.uint8)[:4 * PATTERN_HEADER_WORDS].view("<i4")
    return int(h[10]) // 4


@pytest.mark.parametrize("which,value,message,c_message", [
    ("magic", 0x31504255, "host/0.packed.bin: magic is 0x31504255, not 0x50504255",
     "does not hold the weights of a 12x5"),
    ("M", 11, "host/0.packed.bin: M is 11, expected 12", "does not hold the pattern weights of a 12x5 layer"),
    ("chan", 99, r"host/0.packed.bin: kernel_chan\[0\] is 99, outside 0..4", "reads input channel 99, outside 0..4"),
])
def test_damaged_pattern_blob_is_one_line_error(pm, bundle, tmp_path, which, value, message, c_message):
    word = {"magic": 0, "M": 2, "chan": _chan_word(bundle)}[which]
    root = _damage(bundle, tmp_path, word, value)
    with pytest.raises(BundleError, match=message) as exc:
        load_bundle(root)
    assert "\n" not in str(exc.value)
    # the C reader refuses it too, before any kernel code runs (exit 3)
    import subprocess

    from ubpdsl.export import build_bundle_main

    x = tmp_path / "x.f32"
    np.zeros((5, H * W), np.float32).tofile(x)
    exe = build_bundle_main("host", tmp_path / "bundle_main")
    res = subprocess.run([str(exe), str(root), "host", "0", str(x), str(H * W)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 3 and res.stderr.count("\n") == 1, res.stderr
    assert c_message in res.stderr


def test_manifest_op_is_checked(bundle, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(bundle, root)
    m = json.loads((root / "manifest.json").read_text())
    m["layers"]["0"]["targets"]["host"]["op"] = "winograd"
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"layer '0' \(host\): op 'winograd' is not one of gemm, pattern"):
        load_bundle(root)
    m["layers"]["0"]["targets"]["host"]["op"] = "pattern"
    del m["layers"]["0"]["targets"]["host"]["image"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"a pattern kernel needs an image \[H, W\]"):
        load_bundle(root)


def test_export_cli_image_option(pm, tmp_path, capsys):
    from ubpdsl import cli
    from ubpdsl.masks import save_masks

    _, masks, _ = pm
    save_masks(tmp_path / "m.npz", masks)
    assert cli.main(["export", "--mask", str(tmp_path / "m.npz"), "--layer", "0", "--image", "9,7",
                     "-o", str(tmp_path / "b")]) == 0
    b = load_bundle(tmp_path / "b")
    assert b.kernel("0").op == "pattern" and b.kernel("0").image == (9, 7)
    capsys.readouterr()
    assert cli.main(["export", "--mask", str(tmp_path / "m.npz"), "--image", "9", "-o", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --image must be H,W") and err.count("\n") == 1


def test_pattern_kernel_refuses_other_geometry(pm, bundle):
    from ubpdsl.torch_ops import NativeKernel

    model, _, _ = pm
    kernel = NativeKernel(load_bundle(bundle).kernel("0"))
    assert (kernel.M, kernel.K) == (12, 5)
    strided = nn.Conv2d(5, 12, 3, stride=2, padding=1)
    with pytest.raises(BundleError, match=r"layer 0: its pattern kernel computes a 3x3 convolution with stride 1"):
        SparseConv2d(strided, kernel, "0")
    with pytest.raises(BundleError, match="and a pixel mask"):
        SparseConv2d(model[0], kernel, "0", pixel_keep=np.ones((H, W), bool))
