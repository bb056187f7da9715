"""Pattern and pixel-masked layers through export, layer_columns and the torch integration.

The reference is the masked torch model: the pruned weights, with each pixel-masked conv wrapped in
:class:`~ubpdsl.prune.activation.PixelMaskConv2d` (``conv2d`` with the dropped positions zeroed, which
tests/test_schemes.py checks against ``F.conv2d``).
"""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from test_torch_ops import ATOL, RTOL, pruned_tiny

from ubpdsl.errors import UbpError
from ubpdsl.export import export_bundle, load_bundle
from ubpdsl.masks import LayerMask
from ubpdsl.models import LoadedModel, check_masks_fit_model, layer_columns
from ubpdsl.prune.activation import apply_pixel_masks
from ubpdsl.prune.pattern import PatternSparsifier
from ubpdsl.torch_ops import SparseConv2d, swap_to_kernels


def _keep(shape: tuple[int, int], frac: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = np.zeros(shape[0] * shape[1], bool)
    keep[rng.permutation(keep.size)[: round(frac * keep.size)]] = True
    return keep.reshape(shape)


def _model_and_masks():
    """TinyNet: UBP on stem/pw/fc, the dilated 3x3 of kind pattern; pixel masks (70 %) on stem, dil, pw."""
    model, masks = pruned_tiny()
    sp = PatternSparsifier(0.75)
    sp.prepare(model, config=[{"tensor_fqn": "dil.weight"}])
    sp.step()
    sp.squash_mask()
    masks["dil"] = sp.to_layer_masks()["dil"]
    pixels = {name: _keep((4, 4), 0.7, i) for i, name in enumerate(["stem", "dil", "pw"])}
    masks = {n: dataclasses.replace(m, pixel_keep=pixels.get(n)) for n, m in masks.items()}
    return model, masks, pixels


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    model, masks, pixels = _model_and_masks()
    out = export_bundle(masks, tmp_path_factory.mktemp("px") / "b", targets=["host"], model=model,
                        example=torch.zeros(1, 3, 8, 8))
    return model, masks, pixels, out


@pytest.mark.parametrize("batch", [1, 3])
def test_pixel_masked_and_pattern_layers_match_the_masked_torch_model(bundle, batch):
    model, masks, pixels, out = bundle
    assert masks["dil"].kind == "pattern" and masks["stem"].kind == "blocks"
    reference = copy.deepcopy(model)
    apply_pixel_masks(reference, pixels)
    fast = swap_to_kernels(copy.deepcopy(model), out)
    assert isinstance(fast.stem, SparseConv2d) and fast.stem.kept_index.numel() == int(pixels["stem"].sum()) == 11
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        got, want = fast(x), reference(x)
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
        # the masks matter: without them the output differs
        assert not torch.allclose(swap_to_kernels(copy.deepcopy(model), out, layers=["fc"])(x), want, atol=1e-3)
        # a dropped position of stem is exactly zero before its bias: check on the layer itself
        h = fast.stem(x)
        bias = model.stem.bias.view(1, -1, 1, 1).expand_as(h)
        dropped = ~torch.from_numpy(pixels["stem"]).expand_as(h)
        assert torch.equal(h[dropped], torch.zeros_like(h[dropped]))
        assert not torch.equal(h[~dropped], bias[~dropped])


def test_manifest_records_kind_and_pixel_mask(bundle):
    _, masks, pixels, out = bundle
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["layers"]["dil"]["kind"] == "pattern"
    assert manifest["layers"]["dil"]["pattern"]["kernels_kept"] == int((masks["dil"].pattern.ids >= 0).sum())
    assert manifest["layers"]["stem"]["pixels"] == {"shape": [4, 4], "kept": int(pixels["stem"].sum())}
    assert manifest["layers"]["fc"]["pixels"] is None and manifest["layers"]["fc"]["kind"] == "blocks"
    reread = load_bundle(out).masks()
    assert np.array_equal(reread["pw"].pixel_keep, pixels["pw"]) and reread["dil"].pattern is not None


def test_layer_columns_counts_kept_pixels_and_checks_mask_size():
    model, masks, pixels = _model_and_masks()
    loaded = LoadedModel("tiny", model, torch.zeros(2, 3, 8, 8), batch=2)
    cols = layer_columns(masks, loaded=loaded)
    assert cols["stem"] == 2 * int(pixels["stem"].sum()) and cols["fc"] == 2
    assert layer_columns(masks, pixels=16 * 5)["pw"] == 5 * int(pixels["pw"].sum())
    with pytest.raises(UbpError, match="not a whole number of 4x4 images"):
        layer_columns(masks, pixels=17)
    bad = {**masks, "pw": dataclasses.replace(masks["pw"], pixel_keep=np.ones((3, 5), bool))}
    with pytest.raises(UbpError, match="3x5 pixel mask, but the layer's output is 4x4") as err:
        check_masks_fit_model(model, bad, "m.npz", torch.zeros(1, 3, 8, 8))
    assert "\n" not in str(err.value)
    fc = {"fc": dataclasses.replace(masks["fc"], pixel_keep=np.ones((2, 2), bool))}
    with pytest.raises(UbpError, match="pixel masks apply to ungrouped Conv2d"):
        check_masks_fit_model(model, fc)


def test_dense_layer_with_only_a_pixel_mask_runs_on_kernels(tmp_path):
    model, masks, pixels = _model_and_masks()
    dense = {"pw": LayerMask.dense("pw", model.pw.weight.detach(), 4, pixels["pw"])}
    out = export_bundle(dense, tmp_path / "b", targets=["host"], model=model)
    reference = copy.deepcopy(model)
    apply_pixel_masks(reference, {"pw": pixels["pw"]})
    fast = swap_to_kernels(copy.deepcopy(model), out)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), reference(x), rtol=RTOL, atol=ATOL)


def test_prune_compile_tune_export_cli_take_pattern_and_pixel_layers(tmp_path, monkeypatch, capsys):
    from ubpdsl.cli import main
    from ubpdsl.masks import load_masks

    monkeypatch.setenv("UBPDSL_CACHE_DIR", str(tmp_path / "cache"))
    m = tmp_path / "m.npz"
    assert main(["prune", "--model", "digits-cnn", "--method", "pattern", "--sparsity", "0.75",
                 "--activation-sparsity", "0.25", "-o", str(m)]) == 0
    masks = load_masks(m)
    assert masks["conv2"].kind == "pattern" and masks["conv2"].pixel_keep is not None
    assert main(["compile", "--mask", str(m), "-o", str(tmp_path / "c")]) == 0
    built = json.loads((tmp_path / "c" / "manifest.json").read_text())["layers"]
    assert built["conv2"]["kind"] == "pattern" and built["conv2"]["pixels"]["kept"] == masks["conv2"].kept_pixels
    assert main(["tune", "--mask", str(m), "--model", "digits-cnn", "--trials", "1", "--no-dense", "--layer", "conv2",
                 "-o", str(tmp_path / "t")]) == 0
    tuned = json.loads((tmp_path / "t" / "manifest.json").read_text())["layers"]["conv2"]
    assert tuned["n"] == masks["conv2"].kept_pixels  # batch 1: n = kept output pixels, not 8 x 8
    assert main(["export", "--mask", str(m), "--tuned", str(tmp_path / "t"), "--layer", "conv2",
                 "-o", str(tmp_path / "e")]) == 0
    capsys.readouterr()


def test_inspect_shows_kind_and_kept_pixels(tmp_path, capsys):
    from ubpdsl.cli import main
    from ubpdsl.masks import save_masks

    _, masks, pixels = _model_and_masks()
    save_masks(tmp_path / "m.npz", masks)
    assert main(["inspect", str(tmp_path / "m.npz")]) == 0
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[2:]}
    assert rows["dil"][-2:] == ["pattern", f"{int(pixels['dil'].sum())}/16"]
    assert rows["fc"][-2:] == ["blocks", "-"]
