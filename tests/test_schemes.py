"""Pattern + connectivity pruning, BLK-REW regularisation, semi-structured activation sparsity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import MaskError, UbpError
from ubpdsl.masks import LayerMask, PatternMask, load_masks, save_masks
from ubpdsl.prune.activation import ActivationSparsifier, PixelMaskConv2d, apply_pixel_masks
from ubpdsl.prune.pattern import PATTERN_SPARSITY, PatternSparsifier, pattern_masks, select_library
from ubpdsl.prune.reweighted import ReweightedGroupRegularizer
from ubpdsl.prune.schedule import CubicSchedule
from ubpdsl.prune.scheme_masks import load_schemes
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.prune.trainer import fit


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# ------------------------------------------------------------------ pattern pruning


@pytest.mark.parametrize("sparsity", [0.6, 0.75, 0.9])
def test_pattern_masks_keep_four_with_centre_and_reach_sparsity(sparsity: float) -> None:
    torch.manual_seed(0)
    model = TwoConv()
    sp = PatternSparsifier(sparsity_level=sparsity, num_patterns=8)
    sp.prepare(model, config=None)
    assert {s.name for s in sp.skipped} == {"fc"}
    sp.step()
    for name, pm in sp.to_pattern_masks().items():
        w = getattr(model, name).weight.detach().numpy()
        kernels = (w != 0).reshape(-1, 9)
        count = kernels.sum(axis=1)
        alive = count > 0
        # random init has no exact zeros: a kept kernel keeps exactly its 4 pattern weights
        assert set(count[alive].tolist()) == {4}
        assert kernels[alive, 4].all()  # centre
        used = {tuple(k) for k in kernels[alive]}
        assert len(used) <= 8
        assert np.array_equal((w != 0), pm.dense_mask())
        K = kernels.shape[0]
        expected_kept = int(np.floor(round((1 - sparsity) * 9 * K / 4, 6) + 0.5))
        assert int(alive.sum()) == expected_kept  # connectivity pruning count
        assert abs((1 - (w != 0).mean()) - sparsity) <= 4 / w.size


def test_connectivity_removes_weakest_kernels_and_library_is_most_frequent() -> None:
    rng = np.random.default_rng(1)
    scores = rng.random((6, 5, 3, 3)) * 0.1
    favourite = np.zeros(9, bool)
    favourite[[0, 2, 4, 7]] = True
    scores.reshape(-1, 9)[:20, favourite] += 1.0  # 20 of the 30 kernels prefer one pattern
    scores[0, 0] *= 0.01  # a weak kernel
    lib = select_library(scores, num_patterns=3)
    assert lib.shape == (3, 3, 3)
    assert np.array_equal(lib[0].ravel(), favourite)
    mask, ids, _ = pattern_masks(scores, 0.8, num_patterns=3)
    assert ids[0, 0] == -1
    assert not mask[0, 0].any()
    kept = 14  # 0.2 * 9 * 30 / 4 = 13.5 weights-worth of kernels, rounded half up
    assert int((ids >= 0).sum()) == kept


def test_gradual_pattern_below_five_ninths_leaves_dense_kernels() -> None:
    rng = np.random.default_rng(2)
    scores = rng.random((8, 4, 3, 3))
    mask, ids, _ = pattern_masks(scores, 0.3)
    assert (ids == -2).any() and (ids >= 0).any() and not (ids == -1).any()
    assert abs(1 - mask.mean() - 0.3) < 5 / mask.size
    mask, ids, _ = pattern_masks(scores, PATTERN_SPARSITY)
    assert (ids >= 0).all()


def test_pattern_and_pixel_layers_roundtrip_through_masks_v2(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoConv()
    sp = PatternSparsifier(sparsity_level=0.75)
    sp.prepare(model, config=None)
    sp.step()
    pms = sp.to_pattern_masks()
    layers = sp.to_layer_masks()
    assert {n: lm.kind for n, lm in layers.items()} == {"conv1": "pattern", "conv2": "pattern"}
    keep = np.random.default_rng(0).random((7, 5)) > 0.3
    layers["conv2"] = LayerMask.from_pattern(pms["conv2"], layers["conv2"].weight, keep)
    save_masks(tmp_path / "m.npz", layers)
    got = load_masks(tmp_path / "m.npz")
    for name, lm in got.items():
        assert lm.kind == "pattern" and lm.block == 1
        assert np.array_equal(lm.pattern.dense_mask(), pms[name].dense_mask())
        # the N = 1 blocks are exactly the pattern's weights, and so are the stored weights' nonzeros
        assert np.array_equal(lm.dense_mask(), pms[name].dense_mask().reshape(lm.R, lm.C))
        assert np.array_equal(lm.weight != 0, lm.dense_mask())
        assert lm.content_hash() == layers[name].content_hash()
    assert np.array_equal(got["conv2"].pixel_keep, keep) and got["conv1"].pixel_keep is None
    pats, pixels = load_schemes(tmp_path / "m.npz")  # the compatibility view
    assert set(pats) == {"conv1", "conv2"} and set(pixels) == {"conv2"}


def _library(*patterns) -> np.ndarray:
    lib = np.zeros((len(patterns), 3, 3), dtype=np.uint8)
    for p, idx in enumerate(patterns):
        lib[p].flat[list(idx)] = 1
    return lib


@pytest.mark.parametrize(
    ("shape", "library", "message"),
    [
        ((4, 2, 5, 5), _library((0, 1, 4, 8)), "3x3"),
        ((4, 2, 3, 3), _library((0, 4, 8)), "keeps 3 weights"),
        ((4, 2, 3, 3), _library((0, 1, 4, 7, 8)), "keeps 5 weights"),
        ((4, 2, 3, 3), _library((0, 1, 2, 3)), "centre"),
        ((4, 2, 3, 3), np.ones((1, 2, 2), np.uint8), "3x3"),
        ((4, 2, 3, 3), _library((0, 1, 4, 8), (0, 1, 4, 8)), "repeats"),
    ],
)
def test_bad_pattern_masks_rejected(shape, library, message) -> None:
    ids = np.zeros(shape[:2], dtype=np.int16)
    with pytest.raises(MaskError, match=message) as err:
        PatternMask("conv", shape, library, ids)
    assert "\n" not in str(err.value)


def test_bad_pattern_ids_and_file_rejected(tmp_path) -> None:
    lib = _library((0, 1, 4, 8))
    with pytest.raises(MaskError, match="pattern id 1"):
        PatternMask("conv", (2, 2, 3, 3), lib, np.array([[0, 1], [0, -1]]))
    # a hand-written file with a 3-weight pattern: rejected on load, one line naming the file
    base = {"format": np.array("ubpdsl.masks/2"), "c.shape": np.array([2, 2, 3, 3]), "c.block": np.array([1, 1]),
            "c.rows": np.array([0, 0, 0], np.int32), "c.cols": np.array([0, 4, 8], np.int32)}
    np.savez(
        tmp_path / "bad.npz",
        **base,
        **{"c.kind": np.array("pattern"), "c.pattern_library": _library((0, 4, 8)),
           "c.pattern_ids": np.array([[0, -1], [-1, -1]], np.int16)},
    )
    with pytest.raises(MaskError, match=r"bad\.npz.*keeps 3 weights") as err:
        load_masks(tmp_path / "bad.npz")
    assert "\n" not in str(err.value)
    np.savez(tmp_path / "obj.npz", **base, **{"c.pixel_keep": np.array([[1]], object)})
    with pytest.raises(MaskError, match="Python objects"):
        load_masks(tmp_path / "obj.npz")
    np.savez(tmp_path / "two.npz", **base, **{"c.pixel_keep": np.array([[2, 1]])})
    with pytest.raises(MaskError, match="0 or 1"):
        load_masks(tmp_path / "two.npz")
    # blocks that are not the pattern's weights
    np.savez(tmp_path / "off.npz", **{**base, "c.cols": np.array([0, 4, 7], np.int32)},
             **{"c.kind": np.array("pattern"), "c.pattern_library": _library((0, 1, 4, 8)),
                "c.pattern_ids": np.array([[0, -1], [-1, -1]], np.int16)})
    with pytest.raises(MaskError, match="not the pattern's kept weights"):
        load_masks(tmp_path / "off.npz")


def test_pattern_sparsifier_rejects_non_3x3_config() -> None:
    model = TwoConv()
    with pytest.raises(UbpError, match="3x3"):
        PatternSparsifier().prepare(model, config=[{"tensor_fqn": "fc.weight"}])


# ------------------------------------------------------------------ BLK-REW


def _naive_penalty(w: torch.Tensor, grouping: str, N: int, Bc: int, eps: float, lam: float) -> torch.Tensor:
    """The formula, one group at a time, with P_g from the detached weight."""
    R, C = w.shape
    groups: list[tuple[slice, slice]] = []
    if grouping in ("aligned", "rowcol"):
        groups += [(slice(r, min(r + N, R)), slice(c, c + 1)) for c in range(C) for r in range(0, R, N)]
    if grouping == "unaligned":
        groups += [(slice(r, r + N), slice(c, c + 1)) for c in range(C) for r in range(R - N + 1)]
    if grouping == "rowcol":
        groups += [(slice(r, r + 1), slice(c, min(c + Bc, C))) for r in range(R) for c in range(0, C, Bc)]
    total = torch.zeros((), dtype=w.dtype)
    for rs, cs in groups:
        n2 = (w[rs, cs] ** 2).sum()
        total = total + n2 / (n2.detach() + eps)
    return lam * total


@pytest.mark.parametrize("grouping", ["aligned", "unaligned", "rowcol"])
def test_regulariser_value_and_gradient_match_formula(grouping: str) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(7, 10), nn.ReLU(), nn.Conv1d(1, 6, 3))  # R=10 not a multiple of 4
    model = model.double()
    reg = ReweightedGroupRegularizer(model, lam=0.3, block=4, grouping=grouping, block_cols=3, eps=1e-2)
    value = reg()
    value.backward()
    for name, module in reg.modules.items():
        w = module.weight.detach().reshape(module.weight.shape[0], -1).clone().requires_grad_(True)
        ref = _naive_penalty(w, grouping, 4, 3, 1e-2, 0.3)
        (ref_grad,) = torch.autograd.grad(ref, w)
        assert torch.allclose(module.weight.grad.reshape(w.shape), ref_grad, rtol=1e-10, atol=1e-12), name
    ref_total = sum(
        _naive_penalty(m.weight.detach().reshape(m.weight.shape[0], -1), grouping, 4, 3, 1e-2, 0.3)
        for m in reg.modules.values()
    )
    assert torch.allclose(value.detach(), ref_total)


def test_reweighting_drives_small_groups_to_zero() -> None:
    torch.manual_seed(0)
    # a toy least-squares problem whose solution has strong and weak aligned 4x1 groups
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    lin = model[0]
    target = torch.zeros(8, 8)
    target[:4, ::2] = 1.0  # strong groups: rows 0-3 of even columns
    target[4:, :] = 0.05  # weak groups everywhere else
    target[:4, 1::2] = 0.05
    x = torch.randn(256, 8)
    y = x @ target.T
    reg = ReweightedGroupRegularizer(model, lam=2e-3, block=4, grouping="aligned", eps=1e-4, update_every=20)
    opt = torch.optim.SGD(lin.parameters(), lr=0.05)
    for _ in range(300):
        loss = F.mse_loss(lin(x), y) + reg()
        opt.zero_grad()
        loss.backward()
        opt.step()
    norms = reg.group_norms("0")[0]
    w = lin.weight.detach()
    strong = w[:4, ::2].norm(dim=0)
    weak = torch.cat([w[4:, :].norm(dim=0), w[:4, 1::2].norm(dim=0)])
    assert norms.shape == (2, 8)
    assert (strong > 0.9).all()
    assert weak.max() < 0.02  # the weak groups (norm 0.1 without the term) collapse
    plain = torch.linalg.lstsq(x, y).solution.T
    assert torch.cat([plain[4:, :].norm(dim=0), plain[:4, 1::2].norm(dim=0)]).min() > 0.09


# ------------------------------------------------------------------ activation sparsity


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "bias"),
    [(1, 1, 1, True), (2, 1, 1, False), (1, 0, 2, True), (2, 2, 1, True)],
)
def test_pixel_masked_conv_equals_conv2d_with_dropped_positions_zeroed(stride, padding, dilation, bias) -> None:
    torch.manual_seed(5)
    conv = nn.Conv2d(5, 7, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).double()
    x = torch.randn(3, 5, 11, 9, dtype=torch.float64)
    ref = F.conv2d(x, conv.weight, conv.bias, stride=stride, padding=padding, dilation=dilation)
    keep = torch.rand(ref.shape[-2:], generator=torch.Generator().manual_seed(1)) > 0.4
    layer = PixelMaskConv2d(conv, keep)
    out = layer(x)
    assert torch.allclose(out, ref * keep, atol=1e-12)
    assert layer.gemm_columns() == int(keep.sum()) < keep.numel()


def test_activation_sparsity_combines_with_ubp_weights_and_ramps(tmp_path) -> None:
    torch.manual_seed(0)
    model = TwoConv()
    x = torch.randn(4, 3, 8, 8)
    ubp = UnalignedBlockSparsifier(sparsity_level=0.75, block=4, skip=["conv1"])
    ubp.prepare(model, config=None)
    ubp.step()
    act = ActivationSparsifier(sparsity_level=0.3, layers=["conv2"], seed=1)
    act.prepare(model, x)
    assert isinstance(model.conv2, PixelMaskConv2d)
    previous = torch.ones(8, 8, dtype=torch.bool)
    for level in (0.1, 0.2, 0.3):
        act.groups[0]["sparsity_level"] = level
        act.step()
        keep = act.masks()["conv2"]
        assert int((~keep).sum()) == round(level * 64)
        assert not (torch.from_numpy(keep) & ~previous).any()  # nested: a dropped position stays dropped
        previous = torch.from_numpy(keep)
    w = model.conv2.conv.weight  # the UBP-masked weight
    assert float((w == 0).float().mean()) == pytest.approx(0.75, abs=0.01)
    h = F.relu(model.conv1(x))
    ref = F.conv2d(h, w, None, padding=1) * previous
    assert torch.allclose(model.conv2(h), ref, atol=1e-6)
    act.save(tmp_path / "px.npz", ubp.to_layer_masks())
    saved = load_masks(tmp_path / "px.npz")
    assert saved["conv2"].kind == "blocks" and saved["conv2"].block == 4 and saved["conv2"].sparsity > 0.7
    fresh = TwoConv()
    apply_pixel_masks(fresh, tmp_path / "px.npz")
    assert torch.equal(fresh.conv2.keep, previous)


def test_activation_sparsifier_ramps_through_fit() -> None:
    torch.manual_seed(0)
    model = TwoConv()
    x, y = torch.randn(64, 3, 6, 6), torch.randint(0, 10, (64,))
    act = ActivationSparsifier(sparsity_level=0.5, skip=["conv1"])
    act.prepare(model, x[:1])
    sched = CubicSchedule(final_sparsity=0.5, num_updates=3, update_every=2)
    updates = fit(
        model,
        x,
        y,
        torch.optim.SGD(model.parameters(), lr=0.01),
        steps=8,
        batch_size=16,
        sparsifier=act,
        schedule=sched,
    )
    assert updates[-1].achieved == pytest.approx(0.5)
    assert [u.achieved for u in updates] == sorted(u.achieved for u in updates)


# ------------------------------------------------------------------ CLI


def test_cli_pattern_reweighted_and_activation(tmp_path, capsys) -> None:
    from ubpdsl.cli import main
    from ubpdsl.masks import load_masks

    out = tmp_path / "m.npz"
    assert main(["prune", "--model", "digits-cnn", "--method", "pattern", "--sparsity", "0.75", "-o", str(out)]) == 0
    layers = load_masks(out)
    assert {n: lm.kind for n, lm in layers.items()} == {"conv1": "pattern", "conv2": "pattern"}
    for lm in layers.values():
        assert lm.pixel_keep is None
        assert np.array_equal(lm.dense_mask(), lm.pattern.dense_mask().reshape(lm.R, -1))
    args = ["prune", "--model", "digits-cnn", "--reweighted", "--reweighted-steps", "5", "--sparsity", "0.5"]
    args += ["--activation-sparsity", "0.25", "--skip", "conv2", "-o", str(tmp_path / "r.npz")]
    assert main(args) == 0
    layers = load_masks(tmp_path / "r.npz")
    keep = layers["conv1"].pixel_keep
    assert keep.shape == (8, 8) and int((~keep).sum()) == 16
    assert layers["conv1"].sparsity == pytest.approx(0.5, abs=0.02) and "conv2" not in layers
    capsys.readouterr()
    code = main(["prune", "--model", "mobilenetv2", "--reweighted", "--sparsity", "0.5", "-o", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 1 and "error: --reweighted needs data" in err and "Traceback" not in err


def test_fixed_library_is_kept_across_updates() -> None:
    torch.manual_seed(1)
    model = TwoConv()
    sp = PatternSparsifier(sparsity_level=0.8, fixed_library=True, skip=["conv1"])
    sp.prepare(model, config=None)
    libs = []
    for level in (0.3, 0.6, 0.8):
        sp.groups[0]["sparsity_level"] = level
        with torch.no_grad():
            model.conv2.parametrizations.weight.original.add_(0.3 * torch.randn(24, 16, 3, 3))
        sp.step()
        libs.append(sp.state["conv2.weight"]["pattern_library"].clone())
    assert all(torch.equal(libs[0], lib) for lib in libs)
    used = set(sp.to_pattern_masks()["conv2"].ids[sp.to_pattern_masks()["conv2"].ids >= 0].tolist())
    assert used <= set(range(8))
