"""Host execution: the ubpdsl::ubp_gemm custom op and kernel-backed modules vs the masked dense model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import UbpError
from ubpdsl.export import BundleError, export_bundle
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.torch_ops import SparseConv2d, SparseLinear, kernel_layers, swap_to_kernels

RTOL, ATOL = 1e-4, 1e-5


class TinyNet(nn.Module):
    """Every shape the swap handles: strided/padded 3x3, dilated 3x3, 1x1, depthwise (dense), Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=2, padding=1)  # bias, im2col
        self.dil = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)  # 1x1: direct GEMM
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24)  # depthwise: stays dense
        self.bn = nn.BatchNorm2d(24)
        self.fc = nn.Linear(24 * 4 * 4, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.dil(x))
        x = F.relu(self.bn(self.dw(self.pw(x))))
        return self.fc(torch.flatten(x, 1))


def pruned_tiny(seed: int = 0) -> tuple[nn.Module, dict]:
    torch.manual_seed(seed)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 1.5)
    sp = UnalignedBlockSparsifier(0.75, block=4)
    sp.prepare(model, config=None)
    sp.step()
    sp.squash_mask()
    return model, sp.to_layer_masks()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model, masks = pruned_tiny()
    bundle = export_bundle(masks, tmp_path_factory.mktemp("tiny") / "bundle", targets=["host"], model=model)
    return model, masks, bundle


def test_swap_replaces_pruned_layers_and_keeps_depthwise_dense(tiny):
    model, masks, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    assert sorted(kernel_layers(fast)) == sorted(masks) == ["dil", "fc", "pw", "stem"]
    assert isinstance(fast.stem, SparseConv2d) and isinstance(fast.fc, SparseLinear)
    assert type(fast.dw) is nn.Conv2d  # depthwise stays torch
    assert type(model.stem) is nn.Conv2d  # the original is untouched


@pytest.mark.parametrize("batch", [1, 3])
def test_outputs_match_masked_dense_model(tiny, batch):
    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=RTOL, atol=ATOL)


def test_non_contiguous_and_unbatched_inputs(tiny):
    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=RTOL, atol=ATOL)
        img = torch.randn(16, 4, 4)
        torch.testing.assert_close(fast.pw(img), model.pw(img), rtol=RTOL, atol=ATOL)
        v = torch.randn(5, 7, 384)[:, ::2]  # Linear on a non-contiguous [..., K] input
        torch.testing.assert_close(fast.fc(v), model.fc(v), rtol=RTOL, atol=ATOL)


def test_strided_pointwise_conv(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(8, 12, 1, stride=2, bias=True)).eval()
    sp = UnalignedBlockSparsifier(0.5, block=4)
    sp.prepare(model, None)
    sp.step()
    sp.squash_mask()
    bundle = export_bundle(sp.to_layer_masks(), tmp_path / "b", model=model)
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(2, 8, 7, 9)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=RTOL, atol=ATOL)


def test_digits_cnn_parity(tmp_path):
    from ubpdsl.models import build_model, digits_data

    model = build_model("digits-cnn", pretrained=False, seed=3)
    sp = UnalignedBlockSparsifier(0.75, block=4, skip=("conv1",))
    sp.prepare(model, None)
    sp.step()
    sp.squash_mask()
    bundle = export_bundle(sp.to_layer_masks(), tmp_path / "b", model=model)
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    _, _, xt, _ = digits_data()
    with torch.no_grad():
        ref, got = model(xt[:64]), fast(xt[:64])
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_mobilenetv2_layers_parity(tmp_path):
    """Three layers of the real MobileNetV2 (two 1x1 convolutions and the classifier) on kernels."""
    from ubpdsl.models import build_model

    try:
        model = build_model("mobilenetv2")
    except UbpError as exc:  # the weights package is not installed
        pytest.skip(str(exc))
    layers = ["features.2.conv.0.0", "features.2.conv.2", "classifier.1"]
    sp = UnalignedBlockSparsifier(0.75, block=4)
    sp.prepare(model, config=[{"tensor_fqn": f"{n}.weight"} for n in layers])
    sp.step()
    sp.squash_mask()
    bundle = export_bundle(sp.to_layer_masks(), tmp_path / "b", model=model)
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = model(x), fast(x)
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=1e-4)
    assert torch.equal(got.topk(5).indices, ref.topk(5).indices)


def test_custom_op_checks_inputs(tiny):
    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    kid, M, K = fast.pw.kernel_id, fast.pw.M, fast.pw.K
    with pytest.raises(UbpError, match="float32"):
        torch.ops.ubpdsl.ubp_gemm(torch.zeros(K, 4, dtype=torch.float64), kid, M, K)
    with pytest.raises(UbpError, match=r"\[K=16, n\]"):
        torch.ops.ubpdsl.ubp_gemm(torch.zeros(K + 1, 4), kid, M, K)
    with pytest.raises(UbpError, match="no kernel"):
        torch.ops.ubpdsl.ubp_gemm(torch.zeros(K, 4), 10**9, M, K)
    x = torch.randn(K, 33)
    np.testing.assert_allclose(torch.ops.ubpdsl.ubp_gemm(x, kid, M, K).numpy(),
                               model.pw.weight.detach().reshape(M, K).numpy() @ x.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.ops.ubpdsl.ubp_gemm(torch.zeros(K, 0), kid, M, K).shape == (M, 0)


def test_custom_op_passes_opcheck_and_traces(tiny):
    """Fake impl + schema are consistent, and torch.export / torch.compile trace through the op."""
    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(2, 16, 4, 4)
    cols = x.reshape(2, 16, 16)
    torch.library.opcheck(torch.ops.ubpdsl.ubp_gemm.default, (cols, fast.pw.kernel_id, 24, 16))
    img = torch.randn(2, 3, 8, 8)
    exported = torch.export.export(fast, (img,))
    assert any("ubp_gemm" in str(n.target) for n in exported.graph.nodes)
    compiled = torch.compile(fast, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(img), model(img), rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(compiled(img), model(img), rtol=RTOL, atol=ATOL)


def test_swap_errors_before_changing_anything(tiny):
    model, _, bundle = tiny
    victim = copy.deepcopy(model)
    with pytest.raises(BundleError, match="has no layer 'nope'"):
        swap_to_kernels(victim, bundle, layers=["pw", "nope"])
    assert kernel_layers(victim) == []  # nothing was swapped
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.pw.weight.add_(1e-3)
    with pytest.raises(BundleError, match="pw: the model's weights differ"):
        swap_to_kernels(other, bundle)
    assert kernel_layers(other) == []

    class Renamed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = model.stem

    with pytest.raises(BundleError, match="the model has no layer 'dil'"):
        swap_to_kernels(Renamed(), bundle)
    with pytest.raises(BundleError, match="not exported for aarch64-neon|has no aarch64-neon kernels"):
        swap_to_kernels(copy.deepcopy(model), bundle, target="aarch64-neon")


def test_deep_copy_survives_the_original(tiny):
    import gc

    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    twin = copy.deepcopy(fast)
    assert twin.pw.kernel_id != fast.pw.kernel_id and twin.pw.kernel is fast.pw.kernel
    del fast
    gc.collect()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), model(x), rtol=RTOL, atol=ATOL)


def test_backward_through_a_kernel_is_a_clear_error(tiny):
    """A gradient that would have to pass through a kernel: one-line UbpError, not a silent zero."""
    model, _, bundle = tiny
    fast = swap_to_kernels(copy.deepcopy(model), bundle)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = fast(x)
    torch.testing.assert_close(out.detach(), model(x).detach(), rtol=RTOL, atol=ATOL)  # forward unchanged
    with pytest.raises(UbpError, match="layer fc runs on a ubpdsl kernel, which has no backward") as err:
        out.sum().backward()
    assert "\n" not in str(err.value)
    assert x.grad is None
    with torch.no_grad():  # inference with grad-requiring inputs stays on the fast path
        torch.testing.assert_close(fast(x), model(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("batch", [1, 3])
def test_native_kernel_fused_epilogue(tiny, batch):
    """NativeKernel.run with bias, residual and ReLU6 (the kernel's _ep entry point) vs torch."""
    model, _, bundle = tiny
    swapped = swap_to_kernels(copy.deepcopy(model), bundle)
    module = swapped.pw
    kernel = module.kernel
    assert kernel.ep_address is not None
    torch.manual_seed(1)
    x = torch.randn(batch, kernel.K, 37)
    bias = torch.randn(kernel.M)
    residual = torch.randn(batch, kernel.M, 37)
    dense = model.pw.weight.detach().reshape(kernel.M, kernel.K)
    for kw, ref in [({"bias": bias}, dense @ x + bias.view(-1, 1)),
                    ({"clamp": (0.0, None)}, torch.relu(dense @ x)),
                    ({"bias": bias, "residual": residual, "clamp": (0.0, 6.0)},
                     torch.clamp(dense @ x + bias.view(-1, 1) + residual, 0.0, 6.0))]:
        y = torch.empty(batch, kernel.M, 37)
        kernel.run(x, y, **kw)
        torch.testing.assert_close(y, ref, rtol=RTOL, atol=ATOL)
    with pytest.raises(UbpError, match="residual must"):
        kernel.run(x, residual, residual=residual)
