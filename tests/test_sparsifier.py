"""UnalignedBlockSparsifier, the GEMM view, the cubic schedule, the trainer and the model specs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
from torch.nn.utils import parametrize

from ubpdsl.errors import UbpError
from ubpdsl.masks import load_masks
from ubpdsl.models import DigitsCNN, MobileNetV2, build_model, digits_data, load_weights_file
from ubpdsl.prune.gemm import find_prunable_layers, from_gemm, to_gemm
from ubpdsl.prune.schedule import CubicSchedule, cubic_sparsity
from ubpdsl.prune.selectors import bed_select_multi, blocks_to_mask, budget, select_blocks
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.prune.trainer import evaluate, fit


class Tiny(nn.Module):
    """A Linear 24x16, a Conv 12x(4*3*3), a depthwise conv (skipped) and a Linear 8x12."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 12, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.dw(self.conv(x))).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(x)))


def _tiny(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def _gemm_weights(model: nn.Module) -> dict[str, np.ndarray]:
    return {
        n: to_gemm(m.weight.detach()).numpy().copy() for n, m in model.named_modules() if n in ("conv", "fc1", "fc2")
    }


def _mask(sp: UnalignedBlockSparsifier, name: str) -> np.ndarray:
    return to_gemm(sp.state[f"{name}.weight"]["mask"]).numpy().astype(bool)


# ----------------------------------------------------------------------------- GEMM view


def test_gemm_view_shapes_and_skipped_layers():
    model = MobileNetV2()
    prunable, skipped = find_prunable_layers(model, block=4)
    # 17 depthwise 3x3 convs; prunable: stem conv, 16 expand + 17 project 1x1 convs, last conv, classifier.
    assert len(skipped) == 17 and all("depthwise" in s.reason for s in skipped)
    assert len(prunable) == 36
    by_name = {p.name: p for p in prunable}
    assert (by_name["features.0.0"].R, by_name["features.0.0"].C) == (32, 27)
    assert (by_name["features.2.conv.0.0"].R, by_name["features.2.conv.0.0"].C) == (96, 16)
    assert (by_name["classifier.1"].R, by_name["classifier.1"].C) == (1000, 1280)

    grouped = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2), nn.Linear(3, 2))
    _, skipped = find_prunable_layers(grouped, block=4)
    assert {s.name: s.reason for s in skipped} == {
        "0": "grouped convolution (groups=2)",
        "1": "2 rows < block size N=4",
    }


def test_to_gemm_round_trip():
    w = torch.randn(6, 3, 2, 5)
    g = to_gemm(w)
    assert g.shape == (6, 30)
    assert torch.equal(g[4, 7], w[4, 0, 1, 2])  # column = (cin * kh + i) * kw + j
    assert torch.equal(from_gemm(g, w.shape), w)
    with pytest.raises(UbpError):
        from_gemm(g, (6, 31))


# ----------------------------------------------------------------------------- one step


@pytest.mark.parametrize("method", ["bed", "optimal", "aligned"])
def test_step_matches_select_blocks(method):
    model = _tiny()
    weights = _gemm_weights(model)
    sp = UnalignedBlockSparsifier(sparsity_level=0.6, block=4, method=method)
    sp.prepare(model, config=None)
    assert [s.name for s in sp.skipped] == ["dw"]
    sp.step()
    for name, w in weights.items():
        R, C = w.shape
        m = budget(R, C, 4, 0.6)
        rows, cols = select_blocks(np.abs(w), m, 4, method=method)
        expected = blocks_to_mask(rows, cols, R, C, 4)
        got = _mask(sp, name)
        assert np.array_equal(got, expected), name
        assert len(sp.state[f"{name}.weight"]["rows"]) == m  # exact budget per layer
        assert got.sum() == m * 4
        # The effective weight is the original weight on the mask and zero elsewhere.
        eff = to_gemm(getattr(model, name).weight.detach()).numpy()
        assert np.array_equal(eff, np.where(expected, w, 0.0))
    if method == "aligned":
        assert all((sp.state[f"{n}.weight"]["rows"] % 4 == 0).all() for n in weights)


def test_unstructured_keeps_largest_weights():
    model = _tiny()
    weights = _gemm_weights(model)
    sp = UnalignedBlockSparsifier(sparsity_level=0.7, method="unstructured")
    sp.prepare(model)
    sp.step()
    for name, w in weights.items():
        n_keep = round(0.3 * w.size)
        got = _mask(sp, name)
        assert got.sum() == n_keep
        assert np.abs(w[got]).min() >= np.abs(w[~got]).max()
    layers = sp.to_layer_masks()
    assert all(lm.block == 1 for lm in layers.values())


def test_taylor_importance_uses_accumulated_gradients():
    model = _tiny()
    sp = UnalignedBlockSparsifier(sparsity_level=0.5, block=4, importance="taylor")
    sp.prepare(model)
    with pytest.raises(UbpError, match="accumulate_importance"):
        sp.step()
    torch.manual_seed(1)
    grads = {n: [] for n in ("conv", "fc1", "fc2")}
    for _ in range(3):
        model.zero_grad()
        x, y = torch.randn(5, 4, 6, 6), torch.randint(0, 8, (5,))
        nn.functional.cross_entropy(model(x), y).backward()
        for n in grads:
            grads[n].append(getattr(model, n).parametrizations.weight.original.grad.clone())
        assert sp.accumulate_importance() == 3
    weights = _gemm_weights(model)
    sp.step()
    for name, w in weights.items():
        g = to_gemm(torch.stack(grads[name]).abs().mean(0)).numpy()
        scores = np.abs(w * g)
        rows, cols = select_blocks(scores, budget(*w.shape, 4, 0.5), 4)
        assert np.array_equal(_mask(sp, name), blocks_to_mask(rows, cols, *w.shape, 4)), name


# ----------------------------------------------------------------------------- budgets


def test_global_budget_bed_matches_bed_select_multi_and_override_keeps_its_own():
    model = _tiny()
    weights = _gemm_weights(model)
    sp = UnalignedBlockSparsifier(sparsity_level=0.75, block=4, global_budget=True, layer_sparsity={"fc2": 0.5})
    sp.prepare(model)
    sp.step()
    pool = ["conv", "fc1"]
    total = sum(budget(*weights[n].shape, 4, 0.75) for n in pool)
    expected = bed_select_multi([np.abs(weights[n]) for n in pool], total, 4)
    for name, (rows, cols) in zip(pool, expected, strict=True):
        assert np.array_equal(_mask(sp, name), blocks_to_mask(rows, cols, *weights[name].shape, 4))
    assert sum(len(sp.state[f"{n}.weight"]["rows"]) for n in pool) == total
    assert len(sp.state["fc2.weight"]["rows"]) == budget(8, 24, 4, 0.5)


def test_global_budget_aligned_takes_globally_best_tiles():
    model = _tiny()
    weights = _gemm_weights(model)
    sp = UnalignedBlockSparsifier(sparsity_level=0.8, block=4, method="aligned", global_budget=True)
    sp.prepare(model)
    sp.step()
    total = sum(budget(*w.shape, 4, 0.8) for w in weights.values())
    tiles = np.concatenate([np.abs(w).reshape(w.shape[0] // 4, 4, w.shape[1]).sum(1).ravel() for w in weights.values()])
    kept = sum((np.abs(w) * _mask(sp, n)).sum() for n, w in weights.items())
    assert sum(_mask(sp, n).sum() for n in weights) == 4 * total
    assert kept == pytest.approx(np.sort(tiles)[::-1][:total].sum())


def test_global_budget_unstructured_is_global_magnitude_pruning():
    model = _tiny()
    weights = _gemm_weights(model)
    sp = UnalignedBlockSparsifier(sparsity_level=0.6, method="unstructured", global_budget=True)
    sp.prepare(model)
    sp.step()
    kept = np.concatenate([np.abs(w)[_mask(sp, n)] for n, w in weights.items()])
    dropped = np.concatenate([np.abs(w)[~_mask(sp, n)] for n, w in weights.items()])
    assert len(kept) == sum(round(0.4 * w.size) for w in weights.values())
    assert kept.min() >= dropped.max()


def test_bad_options_raise_ubp_error():
    with pytest.raises(UbpError, match=r"\[0, 1\)"):
        UnalignedBlockSparsifier(sparsity_level=1.0)
    with pytest.raises(UbpError, match="method"):
        UnalignedBlockSparsifier(method="magic")
    with pytest.raises(UbpError, match="matches no layer"):
        UnalignedBlockSparsifier(skip=["nope"]).prepare(_tiny())
    with pytest.raises(UbpError, match="depthwise"):
        UnalignedBlockSparsifier(layer_sparsity={"dw": 0.5}).prepare(_tiny())
    with pytest.raises(UbpError, match="depthwise"):
        UnalignedBlockSparsifier().prepare(_tiny(), config=[{"tensor_fqn": "dw.weight"}])


# ----------------------------------------------------------------------------- life cycle


def test_state_dict_round_trip_and_squash():
    model = _tiny()
    sp = UnalignedBlockSparsifier(sparsity_level=0.5, block=4)
    sp.prepare(model)
    sp.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "sparsifier": sp.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    model2 = _tiny(seed=5)
    sp2 = UnalignedBlockSparsifier(sparsity_level=0.5, block=4)
    sp2.prepare(model2)
    sp2.load_state_dict(saved["sparsifier"])
    # torch's FakeSparsity keeps its mask out of the model's state dict: masks travel in the
    # sparsifier's state dict, so the model's own load reports exactly those keys as missing.
    missing, unexpected = model2.load_state_dict(saved["model"], strict=False)
    assert sorted(missing) == [f"{n}.parametrizations.weight.0.mask" for n in ("conv", "fc1", "fc2")]
    assert unexpected == []
    for name in ("conv", "fc1", "fc2"):
        assert np.array_equal(_mask(sp2, name), _mask(sp, name))
        assert torch.equal(getattr(model2, name).weight, getattr(model, name).weight)
    assert sp2.state_dict()["state"].keys() == sp.state_dict()["state"].keys()
    x = torch.randn(2, 4, 5, 5)
    assert torch.equal(model2(x), model(x))

    expected = {n: getattr(model, n).weight.detach().clone() for n in ("conv", "fc1", "fc2")}
    sp.squash_mask()
    for name, w in expected.items():
        module = getattr(model, name)
        assert not parametrize.is_parametrized(module)
        assert torch.equal(module.weight.detach(), w)
    layers = sp.to_layer_masks()
    assert set(layers) == {"conv", "fc1", "fc2"}
    for name, lm in layers.items():
        assert np.array_equal(lm.dense_mask(), _mask(sp, name))
        assert np.array_equal(lm.weight, to_gemm(expected[name]).numpy())


def test_save_masks_round_trip(tmp_path):
    model = _tiny()
    sp = UnalignedBlockSparsifier(sparsity_level=0.75, block=2, method="optimal")
    sp.prepare(model)
    sp.step()
    path = tmp_path / "masks.npz"
    written = sp.save_masks(path)
    loaded = load_masks(path)
    assert set(loaded) == set(written)
    for name, lm in loaded.items():
        assert lm.block == 2 and lm.shape == tuple(getattr(model, name).weight.shape)
        assert lm.content_hash() == written[name].content_hash()


# ----------------------------------------------------------------------------- schedule


def test_cubic_schedule_matches_formula_and_torch():
    sched = CubicSchedule(final_sparsity=0.9, num_updates=5, update_every=4, start_step=3, initial_sparsity=0.1)
    assert sched.update_steps() == [3, 7, 11, 15, 19, 23] and sched.end_step == 23
    for t in range(0, 40):
        got = sched.sparsity_at(t)
        if t < 3:
            assert got == 0.1
            continue
        t_upd = 3 + min(5, (t - 3) // 4) * 4  # last update at or before t
        formula = 0.9 + (0.1 - 0.9) * (1 - (t_upd - 3) / (5 * 4)) ** 3
        assert got == pytest.approx(formula, abs=1e-12)
        reference = CubicSL.sparsity_compute_fn(0.1, 0.9, t_upd, 3, 4, 5)
        assert got == pytest.approx(reference, abs=1e-12)
        assert sched.is_update_step(t) == (t in sched.update_steps())
    assert sched.sparsity_at(23) == pytest.approx(0.9)
    assert sched.sparsity_at(10**6, final=0.5) == pytest.approx(0.5)
    assert cubic_sparsity(13, 0.0, 0.8, 3, 5, 4) == pytest.approx(0.8 * (1 - 0.5**3))
    with pytest.raises(UbpError):
        CubicSchedule(final_sparsity=1.0, num_updates=3)


def test_gradual_training_reaches_target_and_freezes_masks():
    x, y, xt, yt = digits_data()
    x, y = x[:320], y[:320]
    torch.manual_seed(0)
    model = DigitsCNN()
    sp = UnalignedBlockSparsifier(sparsity_level=0.75, block=4, method="bed", layer_sparsity={"conv1": 0.5})
    sp.prepare(model)
    sched = CubicSchedule(final_sparsity=0.75, num_updates=3, update_every=5, start_step=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    updates = fit(model, x, y, opt, steps=30, batch_size=32, sparsifier=sp, schedule=sched)
    assert [u.step for u in updates] == sched.update_steps()
    assert [u.sparsity for u in updates] == pytest.approx([sched.sparsity_at(t) for t in sched.update_steps()])
    assert updates[0].achieved == 0.0  # s_i = 0: dense
    achieved = sp.layer_sparsity_achieved()
    for g in sp.groups:
        name = g["module_fqn"]
        target = 0.5 if name == "conv1" else 0.75
        assert len(sp.state[g["tensor_fqn"]]["rows"]) == budget(g["R"], g["C"], 4, target)
        assert achieved[name] == pytest.approx(1 - budget(g["R"], g["C"], 4, target) * 4 / (g["R"] * g["C"]))
    # Fine-tuning after the last update kept the masks: weights are zero exactly off-mask.
    for g in sp.groups:
        w = to_gemm(g["module"].weight.detach()).numpy()
        assert not np.any(w[~_mask(sp, g["module_fqn"])])
    assert evaluate(model, xt, yt) > 0.3  # learned something in 30 steps (chance is 0.1)


def test_fit_rejects_schedule_longer_than_training():
    model = DigitsCNN()
    sp = UnalignedBlockSparsifier(sparsity_level=0.5)
    sp.prepare(model)
    sched = CubicSchedule(final_sparsity=0.5, num_updates=10, update_every=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    with pytest.raises(UbpError, match="last mask update"):
        fit(model, x, y, opt, steps=50, sparsifier=sp, schedule=sched)


# ----------------------------------------------------------------------------- models


def test_mobilenetv2_loads_pretrained_strictly_and_classifies_a_photo():
    from sklearn.datasets import load_sample_image

    model = build_model("mobilenetv2")  # strict load of torchvision's state dict
    img = torch.tensor(load_sample_image("china.jpg"), dtype=torch.float32).permute(2, 0, 1)[None] / 255
    x = nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (x - mean) / std
    with torch.no_grad():
        logits = model(x)
        again = model(x)
    assert logits.shape == (1, 1000) and torch.equal(logits, again)
    top5 = logits.topk(5).indices[0].tolist()
    # ImageNet classes 663 "monastery" and 698 "palace": the photo shows a Chinese temple.
    assert {663, 698} <= set(top5)


def test_weights_file_is_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(UbpError, match="weights-only"):
        load_weights_file(bad)
    assert not marker.exists()

    good = tmp_path / "cnn.pt"
    torch.save(DigitsCNN().state_dict(), good)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UbpError):
        load_weights_file(truncated)
    with pytest.raises(UbpError, match="do not fit"):
        build_model("mobilenetv2", weights=good)
