"""Running pruned PyTorch layers on ubpdsl kernels through a ``torch.library`` custom op.

``torch.ops.ubpdsl.ubp_gemm(x, kernel_id, M, K)`` computes ``Y = W @ X`` with a loaded kernel:
``x`` is ``[K, n]`` or a batch ``[B, K, n]`` (float32, CPU; made contiguous if it is not), the result
``[M, n]`` / ``[B, M, n]``. A batch is one kernel call per item, each reading and writing its slice
in place, so nothing is copied. The op has a fake (meta) implementation, so ``torch.compile`` and
``torch.export`` can trace models that use it; it is inference-only: a backward pass through a
kernel-backed module that needs a gradient (its input requires one) is a one-line :class:`UbpError`.

Modules (built by :func:`swap_to_kernels` from a bundle made by ``ubpdsl export``):

* :class:`SparseConv2d`: a 1x1 convolution is the GEMM itself on the channel-major image
  (``[C, H*W]`` per image, a view); any other ``kxk`` convolution goes through im2col
  (a strided view of the padded input, copied once: columns ordered (channel, ky, kx) like
  ``F.unfold`` and like the weight's GEMM view);
  stride, padding and dilation as in the original layer; bias added afterwards. A pattern layer
  exported with the direct pattern kernel (the manifest's ``"op": "pattern"``: 3x3, stride 1,
  padding 1) runs on the image itself (``[Cin, H*W]``, a view; no im2col) at the image size it
  was compiled for.
* :class:`SparseLinear`: ``x[..., K]`` is transposed to ``[K, n]`` with n the flattened batch.

Depthwise/grouped convolutions and every layer not in the bundle stay dense torch modules.
Each module registers its kernel in a process-local table under a ``kernel_id`` (the op's
argument) and unregisters it when the module is garbage-collected: a traced or exported graph
refers to kernels by id, so keep the swapped model alive while using it. A deep copy of a module
shares the loaded library and registers its own id.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl import abi
from ubpdsl.abi import describe_error
from ubpdsl.errors import RunError, UbpError
from ubpdsl.export import Bundle, BundleError, KernelFiles, load_bundle
from ubpdsl.runtime.kernel_so import load_symbol

__all__ = ["NativeKernel", "SparseConv2d", "SparseLinear", "kernel_layers", "swap_to_kernels", "ubp_gemm"]


class NativeKernel:
    """One kernel ``.so`` loaded with ctypes, with its packed weights; callable on raw pointers.

    Shared, never copied: ``copy.deepcopy`` of a module returns the same object.
    """

    def __init__(self, files: KernelFiles) -> None:
        self.files = files
        self.name = files.layer
        self.M, self.K = int(files.M), int(files.x_rows)  # x rows: Cin for a pattern kernel
        try:
            self._lib, fn = load_symbol(files.so, files.symbol)
        except OSError as exc:
            raise RunError(str(exc)) from None
        self._fn = fn
        try:  # the fused-epilogue entry point (absent from kernels built before it existed)
            self._ep_fn = load_symbol(files.so, abi.ep_symbol(files.symbol), epilogue=True)[1]
        except OSError:
            self._ep_fn = None
        self.packed = files.packed_weights()
        self._packed_ptr = None if self.packed is None else self.packed.ctypes.data

    @property
    def address(self) -> int:
        """The kernel function's address (for C callers such as :mod:`ubpdsl.deploy`)."""
        return int(ctypes.cast(self._fn, ctypes.c_void_p).value)

    @property
    def ep_address(self) -> int | None:
        """The address of the ``_ep`` entry point (:data:`ubpdsl.abi.C_EP_SIGNATURE`), None if absent."""
        return None if self._ep_fn is None else int(ctypes.cast(self._ep_fn, ctypes.c_void_p).value)

    def __repr__(self) -> str:
        return f"NativeKernel({self.name!r}, M={self.M}, K={self.K}, so={self.files.so.name!r})"

    def __deepcopy__(self, memo: dict[int, Any]) -> NativeKernel:
        return self

    def run(self, x: torch.Tensor, y: torch.Tensor, *, bias: torch.Tensor | None = None,
            residual: torch.Tensor | None = None, clamp: tuple[float | None, float | None] | None = None) -> None:
        """``y[b] = W @ x[b]`` for contiguous float32 ``x [B, K, n]`` and ``y [B, M, n]`` (or 2-D, B = 1).

        With ``bias`` [M], ``residual`` (shaped like y, not overlapping it) or ``clamp`` (lo, hi;
        None for an open side): ``y = clamp(W x + bias + residual)``, fused into the kernel's
        stores through its ``_ep`` entry point (applied in torch after the plain kernel when the
        library has none).
        """
        n = x.shape[-1]
        batch = x.shape[0] if x.dim() == 3 else 1
        if n == 0 or batch == 0:
            return
        fused = bias is not None or residual is not None or clamp is not None
        if fused and self._ep_fn is None:
            self.run(x, y)
            _torch_epilogue(y, bias, residual, clamp)
            return
        xp, yp, fn, packed = x.data_ptr(), y.data_ptr(), self._fn, self._packed_ptr
        sx, sy = self.K * n * 4, self.M * n * 4
        if fused:
            bias, residual = self._epilogue_args(y, bias, residual, clamp)
            lo, hi = clamp if clamp is not None else (None, None)
            rp = 0 if residual is None else residual.data_ptr()
        for b in range(batch):
            if fused:
                ep = ctypes.create_string_buffer(abi.pack_epilogue(
                    0 if bias is None else bias.data_ptr(), rp + b * sy if rp else 0, lo, hi), abi.EPILOGUE_BYTES)
                rc = self._ep_fn(xp + b * sx, yp + b * sy, n, packed, ctypes.addressof(ep))
            else:
                rc = fn(xp + b * sx, yp + b * sy, n, packed)
            if rc != 0:
                raise RunError(f"kernel of layer {self.name} returned {rc}: {describe_error(rc)}")

    def _epilogue_args(self, y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None,
                       clamp: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if clamp is not None and (not isinstance(clamp, (tuple, list)) or len(clamp) != 2):
            raise UbpError(f"layer {self.name}: clamp must be (lo, hi), either may be None")
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous()
            if bias.numel() != self.M:
                raise UbpError(f"layer {self.name}: bias must have {self.M} elements, got {bias.numel()}")
        if residual is not None:
            if residual.shape != y.shape or residual.dtype != torch.float32 or not residual.is_contiguous():
                raise UbpError(f"layer {self.name}: residual must be a contiguous float32 tensor shaped like y "
                               f"{list(y.shape)}, got {list(residual.shape)}")
            if residual.untyped_storage().data_ptr() == y.untyped_storage().data_ptr():
                raise UbpError(f"layer {self.name}: residual must not overlap y")
        return bias, residual


def _torch_epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None, clamp: Any) -> None:
    """The epilogue applied in place by torch (kernels without an ``_ep`` entry point)."""
    if bias is not None:
        y.add_(bias.view(-1, 1))
    if residual is not None:
        y.add_(residual)
    if clamp is not None:
        y.clamp_(min=clamp[0], max=clamp[1])


_REGISTRY: dict[int, NativeKernel] = {}
_IDS = itertools.count(1)


def register_kernel(kernel: NativeKernel) -> int:
    """Make ``kernel`` callable through the custom op; returns its ``kernel_id``."""
    kid = next(_IDS)
    _REGISTRY[kid] = kernel
    return kid


def _check_input(x: torch.Tensor, kernel_id: int, K: int) -> None:
    if x.dtype != torch.float32:
        raise UbpError(f"ubp_gemm (kernel {kernel_id}): input must be float32, got {x.dtype}")
    if x.device.type not in ("cpu", "meta"):
        raise UbpError(f"ubp_gemm (kernel {kernel_id}): input must be on the CPU, got {x.device}")
    if x.dim() not in (2, 3) or x.shape[-2] != K:
        raise UbpError(f"ubp_gemm (kernel {kernel_id}): input must be [K={K}, n] or [B, K={K}, n], "
                       f"got {list(x.shape)}")


# The op is defined with the low-level ``torch.library.Library`` API: a CPU kernel plus a fake
# (meta) kernel. ``torch.library.custom_op`` would add an autograd wrapper costing ~3x the
# dispatch time per call, which matters for small layers at batch 1; the op is inference-only.
_LIB = torch.library.Library("ubpdsl", "FRAGMENT")
_LIB.define("ubp_gemm(Tensor x, int kernel_id, int M, int K) -> Tensor")


def ubp_gemm(x: torch.Tensor, kernel_id: int, M: int, K: int) -> torch.Tensor:
    """``W @ x`` with the registered kernel ``kernel_id`` (``x``: [K, n] or [B, K, n]).

    The CPU implementation of ``torch.ops.ubpdsl.ubp_gemm``.
    """
    _check_input(x, kernel_id, K)
    kernel = _REGISTRY.get(kernel_id)
    if kernel is None:
        raise UbpError(f"ubp_gemm: no kernel {kernel_id} is loaded (its module was deleted?)")
    if kernel.M != M or kernel.K != K:
        raise UbpError(f"ubp_gemm: kernel {kernel_id} is {kernel.M}x{kernel.K}, called as {M}x{K}")
    x = x.contiguous()
    y = torch.empty((*x.shape[:-2], M, x.shape[-1]), dtype=torch.float32)
    kernel.run(x, y)
    return y


def _ubp_gemm_fake(x: torch.Tensor, kernel_id: int, M: int, K: int) -> torch.Tensor:
    _check_input(x, kernel_id, K)
    return x.new_empty((*x.shape[:-2], M, x.shape[-1]))


_LIB.impl("ubp_gemm", ubp_gemm, "CPU")
torch.library.register_fake("ubpdsl::ubp_gemm", _ubp_gemm_fake, lib=_LIB)


class _KernelModule(nn.Module):
    """Shared part of the kernel-backed modules: the registered kernel and an optional bias."""

    def __init__(self, layer: str, kernel: NativeKernel, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layer = layer
        self.kernel = kernel
        self.kernel_id = register_kernel(kernel)
        self.M, self.K = kernel.M, kernel.K
        if bias is not None:
            self.register_buffer("bias", bias.detach().to(torch.float32).clone())
        else:
            self.bias = None
        weakref.finalize(self, _REGISTRY.pop, self.kernel_id, None)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy: the copy shares the NativeKernel but needs an id of its own, since the
        # original's id is unregistered when the original is collected.
        super().__setstate__(state)
        self.kernel_id = register_kernel(self.kernel)
        weakref.finalize(self, _REGISTRY.pop, self.kernel_id, None)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # a gradient may be asked for: fail then, loudly
            return _NoBackward.apply(x, self)
        return torch.ops.ubpdsl.ubp_gemm(x, self.kernel_id, self.M, self.K)


class _NoBackward(torch.autograd.Function):
    """The kernel's forward; its backward raises instead of silently dropping the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: _KernelModule) -> torch.Tensor:
        ctx.layer = module.layer
        return torch.ops.ubpdsl.ubp_gemm(x, module.kernel_id, module.M, module.K)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        raise UbpError(f"layer {ctx.layer} runs on a ubpdsl kernel, which has no backward: train the dense model "
                       "and swap_to_kernels afterwards (or run it under torch.no_grad())")


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class SparseConv2d(_KernelModule):
    """An ungrouped ``nn.Conv2d`` whose GEMM runs on a ubpdsl kernel (1x1 direct, kxk via im2col),
    or a pattern layer on its direct 3x3 pattern kernel (``kernel.files.op == "pattern"``)."""

    def __init__(self, conv: nn.Conv2d, kernel: NativeKernel, layer: str = "",
                 pixel_keep: np.ndarray | torch.Tensor | None = None) -> None:
        if conv.groups != 1:
            raise BundleError(f"layer {layer}: grouped/depthwise convolutions stay dense (groups={conv.groups})")
        if conv.padding_mode != "zeros":
            raise BundleError(f"layer {layer}: padding_mode {conv.padding_mode!r} is not supported (only 'zeros')")
        super().__init__(layer, kernel, conv.bias)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride = _pair(conv.stride)
        self.dilation = _pair(conv.dilation)
        self.padding = self._resolve_padding(conv.padding, layer)
        gemm_k = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        if (self.out_channels, gemm_k) != (self.M, kernel.files.K):
            raise BundleError(f"layer {layer}: the kernel is {self.M}x{kernel.files.K}, the convolution's GEMM view "
                              f"is {self.out_channels}x{gemm_k}")
        self.pointwise = self.kernel_size == (1, 1) and self.padding == (0, 0)
        # The direct pattern kernel: x is the image [Cin, H*W] itself, compiled for one H x W.
        self.image = kernel.files.image if kernel.files.op == "pattern" else None
        if self.image is not None and ((self.kernel_size, self.stride, self.padding, self.dilation) != (
                (3, 3), (1, 1), (1, 1), (1, 1)) or pixel_keep is not None):
            raise BundleError(f"layer {layer}: its pattern kernel computes a 3x3 convolution with stride 1, padding 1 "
                              f"and no pixel mask; the layer has stride {self.stride}, padding {self.padding}"
                              f"{'' if pixel_keep is None else ' and a pixel mask'}")
        # Semi-structured activation sparsity: only the kept output positions are computed (the kernel
        # runs on n = kept pixels per image); the others are zero.
        self.register_buffer("pixel_keep", None)
        self.register_buffer("kept_index", None, persistent=False)
        if pixel_keep is not None:
            from ubpdsl.masks import validate_pixel_mask

            keep = torch.from_numpy(validate_pixel_mask(pixel_keep, layer))
            self.pixel_keep = keep
            self.kept_index = torch.nonzero(keep.reshape(-1)).reshape(-1)

    def _resolve_padding(self, padding: Any, layer: str) -> tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            total = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if any(t % 2 for t in total) or self.stride != (1, 1):
                raise BundleError(f"layer {layer}: padding='same' with an asymmetric pad is not supported")
            return (total[0] // 2, total[1] // 2)
        return _pair(padding)

    def extra_repr(self) -> str:
        px = "" if self.kept_index is None else f", kept_pixels={self.kept_index.numel()}/{self.pixel_keep.numel()}"
        if self.image is not None:
            px += f", pattern_kernel={self.image[0]}x{self.image[1]}"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, layer={self.layer!r}{px}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unbatched = x.dim() == 3
        if unbatched:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise UbpError(f"layer {self.layer}: expected input [B, {self.in_channels}, H, W], got {list(x.shape)}")
        if self.kept_index is not None:
            return self._forward_kept(x, unbatched)
        if self.image is not None:
            if tuple(x.shape[2:]) != self.image:
                raise UbpError(f"layer {self.layer}: its pattern kernel was built for {self.image[0]}x{self.image[1]} "
                               f"images, got input {list(x.shape)} (export the bundle for this image size)")
            ho, wo = self.image
            cols = x.reshape(x.shape[0], self.in_channels, ho * wo)
        elif self.pointwise:
            if self.stride != (1, 1):
                x = x[:, :, :: self.stride[0], :: self.stride[1]]
            ho, wo = x.shape[2], x.shape[3]
            cols = x.reshape(x.shape[0], self.in_channels, ho * wo)
        else:
            cols, ho, wo = self._im2col(x)
        y = self.gemm(cols)
        if self.bias is not None:
            y = y.add_(self.bias.view(1, -1, 1))
        y = y.view(y.shape[0], self.out_channels, ho, wo)
        return y[0] if unbatched else y

    def _forward_kept(self, x: torch.Tensor, unbatched: bool) -> torch.Tensor:
        """Only the kept output positions: their im2col columns gathered straight from the padded input
        (one pass, no full im2col), the kernel on n = kept pixels per image, then scattered back."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        xp = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()
        b, c, hp, wp = xp.shape
        ho, wo = (hp - dh * (kh - 1) - 1) // sh + 1, (wp - dw * (kw - 1) - 1) // sw + 1
        if tuple(self.pixel_keep.shape) != (ho, wo):
            raise UbpError(f"layer {self.layer}: its pixel mask is {tuple(self.pixel_keep.shape)}, the output is "
                           f"{ho}x{wo} for input {list(x.shape)}")
        key = (hp, wp)
        if getattr(self, "_gather_key", None) != key:  # flat offsets [K * kept] into one padded image
            oy, ox = self.kept_index // wo, self.kept_index % wo
            base = (torch.arange(c).view(c, 1, 1) * (hp * wp) + torch.arange(kh).view(1, kh, 1) * (dh * wp)
                    + torch.arange(kw).view(1, 1, kw) * dw).reshape(-1, 1)
            self._gather, self._gather_key = (base + (oy * (sh * wp) + ox * sw).view(1, -1)).reshape(-1), key
        kept = self.kept_index.numel()
        cols = xp.reshape(b, -1).index_select(1, self._gather).view(b, self.K, kept)
        y = self.gemm(cols)  # [B, M, kept]: the dropped columns are never computed
        if self.bias is not None:
            y = y.add_(self.bias.view(1, -1, 1))
        out = y.new_zeros(b, self.out_channels, ho * wo).index_copy_(2, self.kept_index, y)
        out = out.view(b, self.out_channels, ho, wo)
        return out[0] if unbatched else out

    def _im2col(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """``[B, C*kh*kw, Ho*Wo]`` with columns in (channel, ky, kx) order, as ``F.unfold`` (but faster)."""
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        xp = (F.pad(x, (pw, pw, ph, ph)) if ph or pw else x).contiguous()  # as_strided needs NCHW
        b, c, hp, wp = xp.shape
        ho = (hp - dh * (kh - 1) - 1) // sh + 1
        wo = (wp - dw * (kw - 1) - 1) // sw + 1
        if ho < 1 or wo < 1:
            raise UbpError(f"layer {self.layer}: input {list(x.shape)} is smaller than the {kh}x{kw} kernel")
        patches = xp.as_strided((b, c, kh, kw, ho, wo), (c * hp * wp, hp * wp, dh * wp, dw, sh * wp, sw))
        return patches.reshape(b, c * kh * kw, ho * wo), ho, wo


class SparseLinear(_KernelModule):
    """An ``nn.Linear`` whose GEMM runs on a ubpdsl kernel (n = the flattened batch)."""

    def __init__(self, linear: nn.Linear, kernel: NativeKernel, layer: str = "") -> None:
        super().__init__(layer, kernel, linear.bias)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if (self.out_features, self.in_features) != (self.M, self.K):
            raise BundleError(f"layer {layer}: the kernel is {self.M}x{self.K}, the Linear is "
                              f"{self.out_features}x{self.in_features}")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layer={self.layer!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise UbpError(f"layer {self.layer}: expected input [..., {self.in_features}], got {list(x.shape)}")
        if x.dim() == 2:
            y = self.gemm(x.t()).t()
        else:
            y = self.gemm(x.reshape(-1, self.in_features).t()).t().reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y.add_(self.bias)


@dataclass(frozen=True)
class _Plan:
    name: str
    parent: nn.Module
    attr: str
    module: nn.Module
    files: KernelFiles


def _plan(model: nn.Module, bundle: Bundle, name: str, target: str, check_weights: bool) -> _Plan:
    files = bundle.kernel(name, target)  # BundleError for a missing layer or target
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise BundleError(f"the model has no layer {name!r} (the bundle has kernels for it)") from None
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise BundleError(f"layer {name}: a grouped convolution (groups={module.groups}) cannot run on a kernel")
    elif not isinstance(module, nn.Linear):
        raise BundleError(f"layer {name} is a {type(module).__name__}: only Conv2d and Linear run on kernels")
    weight = module.weight.detach()
    if weight.shape[0] != files.M or weight[0].numel() != files.K:
        raise BundleError(f"layer {name}: the model's weight {tuple(weight.shape)} does not fit the bundle's "
                          f"{files.M}x{files.K} kernel")
    if check_weights:
        want = bundle.masks()[name].weight
        got = weight.float().reshape(files.M, files.K).cpu().numpy()
        if want is not None and not np.array_equal(got, want):
            diff = float(np.abs(got - want).max())
            raise BundleError(f"layer {name}: the model's weights differ from the bundle's (max |diff| {diff:.3g}); "
                              "export the bundle from this model, or pass check_weights=False")
    return _Plan(name, parent, attr, module, files)


def swap_to_kernels(model: nn.Module, bundle: str | os.PathLike[str] | Bundle, *, target: str = "host",
                    layers: list[str] | None = None, check_weights: bool = True) -> nn.Module:
    """Replace the model's pruned layers by kernel-backed modules (in place); returns ``model``.

    Every layer of the bundle (or of ``layers``) is swapped; a layer with a pixel mask computes only
    its kept output positions (:class:`SparseConv2d`). Everything is checked before the first
    module changes: the bundle itself (:func:`~ubpdsl.export.load_bundle`), that its kernels run on
    this machine, that each layer exists in the model with the bundle's shape and (``check_weights``)
    exactly the bundle's weights, and that every library loads.
    """
    bundle = load_bundle(bundle)
    bundle.check_runs_here(target)
    names = list(layers) if layers is not None else bundle.layers
    plans = [_plan(model, bundle, name, target, check_weights) for name in names]
    masks = bundle.masks()
    for plan in plans:
        if masks[plan.name].pixel_keep is not None and not isinstance(plan.module, nn.Conv2d):
            raise BundleError(f"layer {plan.name}: the bundle gives it a pixel mask, but it is a "
                              f"{type(plan.module).__name__} (pixel masks apply to Conv2d layers)")
    kernels = [NativeKernel(p.files) for p in plans]
    for plan, kernel in zip(plans, kernels, strict=True):
        if isinstance(plan.module, nn.Conv2d):
            new: nn.Module = SparseConv2d(plan.module, kernel, plan.name, masks[plan.name].pixel_keep)
        else:
            new = SparseLinear(plan.module, kernel, plan.name)
        new.train(plan.module.training)
        setattr(plan.parent, plan.attr, new)
    return model


def kernel_layers(model: nn.Module) -> list[str]:
    """Names of the model's layers that run on ubpdsl kernels."""
    return [name for name, m in model.named_modules() if isinstance(m, _KernelModule)]
