"""The model runtime's depthwise 3x3 (native/dwconv.c, through ubp_dwconv3x3) against torch's
grouped F.conv2d: random shapes (odd and even, 1x1 planes, rows wider than a chunk), stride 1
and 2, batches, with and without the producer's bias + ReLU6 applied while staging, every
output clamp, both input layouts."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from ubpdsl.deploy.native import dw_scratch_floats, dwconv3x3


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, stride: int, pre: torch.Tensor | None,
               clamp: int) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, Ho, Wo] in float64."""
    x, w, b = x.double(), w.double(), b.double()
    C = x.shape[1]
    if pre is not None:
        x = (x + pre.double().view(1, C, 1, 1)).clamp(0, 6)
    y = F.conv2d(x, w.view(C, 1, 3, 3), b, stride=stride, padding=1, groups=C)
    return y.clamp_min(0) if clamp == 1 else y.clamp(0, 6) if clamp == 2 else y


def _check(C: int, B: int, H: int, W: int, stride: int, pre: bool, clamp: int, nchw: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 3  # both sides of the clamps
    w = torch.randn(C, 9, generator=g)
    b = torch.randn(C, generator=g)
    pb = torch.randn(C, generator=g) if pre else None
    src = x if nchw else x.transpose(0, 1).contiguous()  # [C, B, H, W]
    got = dwconv3x3(src, w, b, stride=stride, pre_bias=pb, clamp=clamp, src_nchw=nchw)
    ref = _reference(x, w, b, stride, pb, clamp).transpose(0, 1).float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@settings(max_examples=300, deadline=None)
@given(C=st.integers(1, 4), B=st.integers(1, 3), H=st.integers(1, 20), W=st.integers(1, 20),
       stride=st.sampled_from([1, 2]), pre=st.booleans(), clamp=st.sampled_from([0, 1, 2]), nchw=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_depthwise_matches_torch_small_planes(C, B, H, W, stride, pre, clamp, nchw, seed):
    _check(C, B, H, W, stride, pre, clamp, nchw, seed)


@settings(max_examples=25, deadline=None)
@given(H=st.integers(1, 12), W=st.integers(60, 700), stride=st.sampled_from([1, 2]), pre=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_depthwise_matches_torch_rows_over_several_chunks(H, W, stride, pre, seed):
    """Rows wide enough that a plane runs in several chunks of rows (and a row alone exceeds one)."""
    _check(2, 2, H, W, stride, pre, 2, False, seed)


def test_scratch_size_is_positive_and_rejects_bad_strides():
    import pytest

    from ubpdsl.errors import UbpError

    assert dw_scratch_floats(7, 7, 1) > 0 and dw_scratch_floats(112, 112, 2) > 0
    with pytest.raises(UbpError):
        dw_scratch_floats(7, 7, 3)


@settings(max_examples=40, deadline=None)
@given(H=st.integers(1, 9), half=st.integers(32, 90), B=st.integers(1, 2), pre=st.booleans(),
       clamp=st.sampled_from([0, 1, 2]), nchw=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_depthwise_stride2_wide_even_rows(H, half, B, pre, clamp, nchw, seed):
    """Stride 2 on even rows of 64 floats or more: the unstaged path (whole blocks of output columns,
    the last block overlapping the one before when the row is not a whole number of blocks)."""
    _check(2, B, H, 2 * half, 2, pre, clamp, nchw, seed)
