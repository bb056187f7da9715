"""Loading a host ``.so`` kernel with ctypes and calling it on numpy arrays.

The kernel C ABI and its return codes are owned by :mod:`ubpdsl.abi`::

    int32_t <symbol>(const float *x, float *y, int64_t n, const void *packed_w);

``x`` is [K, n] row-major fp32, ``y`` is [M, n] row-major fp32 (fully overwritten),
``packed_w`` the packed blob (NULL allowed for mask-specialised kernels with baked weights).
Returns 0, or an error code (:data:`ubpdsl.abi.KERNEL_ERRORS`). Any alignment works; 64-byte aligned
x and y rows are faster (a full-width AVX-512 load or store then touches one cache line, not
two: about 25 % on MobileNetV2-sized layers). :func:`aligned_empty` allocates such arrays
(torch tensors already are).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ubpdsl import abi
from ubpdsl.abi import KERNEL_ERRORS, describe_error
from ubpdsl.errors import RunError, UbpError
from ubpdsl.runtime.kernel_so import load_symbol

__all__ = ["KERNEL_ERRORS", "Epilogue", "HostKernel", "aligned_empty", "aligned_copy", "describe_error",
           "check_kernel_args", "epilogue_args"]

#: Alignment in bytes of the arrays :func:`aligned_empty` returns (a cache line).
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: type = np.float32, align: int = ALIGNMENT) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    numpy itself only guarantees 16 bytes; kernels run faster on cache-line-aligned rows.
    """
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    buf = np.empty(count * dt.itemsize + align, np.uint8)
    start = (-buf.ctypes.data) % align
    return buf[start:start + count * dt.itemsize].view(dt).reshape(shape)


def aligned_copy(a: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """A C-contiguous, ``ALIGNMENT``-byte aligned copy of ``a`` (as ``dtype``, default a's own)."""
    out = aligned_empty(a.shape, dtype or a.dtype)
    out[...] = a
    return out


def check_kernel_args(
    symbol: str, M: int, K: int, x: np.ndarray, packed: np.ndarray | None, y: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Validate kernel inputs; return ``(x, packed, y)`` with ``y`` allocated when None.

    x must be float32 [K, n] C-contiguous, packed a contiguous uint8 1-D array (or None),
    y float32 [M, n] C-contiguous and writeable. Raises UbpError naming the problem.
    """
    if not isinstance(x, np.ndarray):
        raise UbpError(f"kernel {symbol}: x must be a numpy array, not {type(x).__name__}")
    if x.dtype != np.float32:
        raise UbpError(f"kernel {symbol}: x must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[0] != K:
        raise UbpError(f"kernel {symbol}: x must have shape [K={K}, n], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        raise UbpError(f"kernel {symbol}: x must be C-contiguous (use np.ascontiguousarray)")
    n = x.shape[1]
    if packed is not None:
        if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
            raise UbpError(f"kernel {symbol}: packed weights must be a 1-D uint8 numpy array")
        if not packed.flags.c_contiguous:
            raise UbpError(f"kernel {symbol}: packed weights must be contiguous")
    if y is None:
        y = aligned_empty((M, n))
    else:
        if not isinstance(y, np.ndarray) or y.dtype != np.float32:
            raise UbpError(f"kernel {symbol}: y must be a float32 numpy array")
        if y.shape != (M, n):
            raise UbpError(f"kernel {symbol}: y must have shape [M={M}, n={n}], got {list(y.shape)}")
        if not y.flags.c_contiguous or not y.flags.writeable:
            raise UbpError(f"kernel {symbol}: y must be C-contiguous and writeable")
        if np.shares_memory(x, y):
            raise UbpError(f"kernel {symbol}: y must not overlap x")
    return x, packed, y


@dataclass(frozen=True)
class Epilogue:
    """Validated arguments of a ``_ep`` call: y = clamp(W x + bias + residual, lo, hi)."""

    bias: np.ndarray | None  # float32 [M], contiguous
    residual: np.ndarray | None  # float32 [M, n], C-contiguous
    lo: float | None
    hi: float | None

    def struct(self, version: int = abi.EPILOGUE_VERSION, flags: int | None = None) -> ctypes.Array:
        """The ``ubp_epilogue`` struct (a ctypes buffer pointing at the arrays: keep self alive)."""
        raw = abi.pack_epilogue(0 if self.bias is None else self.bias.ctypes.data,
                                0 if self.residual is None else self.residual.ctypes.data,
                                self.lo, self.hi, version=version, flags=flags)
        return ctypes.create_string_buffer(raw, len(raw))


def epilogue_args(symbol: str, M: int, n: int, bias: Any = None, residual: Any = None,
                  clamp: tuple[float | None, float | None] | None = None,
                  available: bool = True) -> Epilogue | None:
    """Check the epilogue arguments of a kernel call; None when there are none (the plain call).

    ``bias``: [M] (or [M, 1]); ``residual``: [M, n]; ``clamp``: (lo, hi), either None for an
    open side (ReLU: ``(0, None)``, ReLU6: ``(0, 6)``). Numpy arrays or torch tensors; a
    one-line :class:`UbpError` names a wrong shape, or a kernel built without ``_ep``.
    """
    if bias is None and residual is None and clamp is None:
        return None
    if not available:
        raise UbpError(f"kernel {symbol} has no epilogue entry point ({abi.ep_symbol(symbol)}): it was built "
                       "with epilogue=False or its kernel reads Y back without marking partial stores")

    def arr(a: Any, what: str, shape: tuple[int, ...]) -> np.ndarray:
        if hasattr(a, "detach") and hasattr(a, "cpu"):
            a = a.detach().cpu().numpy()
        out = np.ascontiguousarray(np.asarray(a, dtype=np.float32))
        if out.shape != shape and not (what == "bias" and out.size == shape[0] and out.ndim <= 2):
            raise UbpError(f"kernel {symbol}: {what} must have shape {list(shape)}, got {list(out.shape)}")
        return out.reshape(shape)

    lo = hi = None
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise UbpError(f"kernel {symbol}: clamp must be (lo, hi), either may be None")
        lo, hi = (None if v is None else float(v) for v in clamp)
    return Epilogue(None if bias is None else arr(bias, "bias", (M,)),
                    None if residual is None else arr(residual, "residual", (M, n)), lo, hi)


class HostKernel:
    """A kernel in a host ``.so``, callable on numpy arrays.

    >>> k = HostKernel("build/conv1.host.so", "ubp_conv1", M=96, K=16)
    >>> y = k(x, packed)            # x: float32 [16, n], packed: uint8[...] or None

    The library is loaded with ``RTLD_LOCAL`` and kept alive as long as this object.
    """

    def __init__(self, so_path: str | os.PathLike[str], symbol: str, M: int, K: int, *,
                 epilogue: bool = False) -> None:
        self.so_path = Path(so_path)
        self.symbol = symbol
        self.M = int(M)
        self.K = int(K)
        try:
            self._lib, fn = load_symbol(self.so_path, symbol)
            self._ep_fn = load_symbol(self.so_path, abi.ep_symbol(symbol), epilogue=True)[1] if epilogue else None
        except OSError as exc:
            raise RunError(str(exc)) from None
        self._fn = fn

    def __repr__(self) -> str:
        return f"HostKernel({str(self.so_path)!r}, {self.symbol!r}, M={self.M}, K={self.K})"

    def call_raw(self, x: np.ndarray, y: np.ndarray, n: int, packed: np.ndarray | None) -> int:
        """Call the kernel without validation; return its return code."""
        return int(self._fn(x.ctypes.data, y.ctypes.data, n, None if packed is None else packed.ctypes.data))

    def call_ep_raw(self, x: np.ndarray, y: np.ndarray, n: int, packed: np.ndarray | None, ep: Any) -> int:
        """Call the ``_ep`` entry point without validation (``ep``: a ctypes buffer or None)."""
        if self._ep_fn is None:
            raise RunError(f"kernel {self.symbol}: loaded without its epilogue entry point")
        return int(self._ep_fn(x.ctypes.data, y.ctypes.data, n, None if packed is None else packed.ctypes.data,
                               None if ep is None else ctypes.addressof(ep)))

    def __call__(
        self, x: np.ndarray, packed: np.ndarray | None = None, y: np.ndarray | None = None, *,
        epilogue: Epilogue | None = None,
    ) -> np.ndarray:
        """Compute ``y = W @ x`` (``epilogue``: clamp(W x + bias + residual) through ``_ep``);
        returns ``y`` ([M, n] float32, newly allocated when None)."""
        x, packed, y = check_kernel_args(self.symbol, self.M, self.K, x, packed, y)
        if epilogue is None:
            rc = self.call_raw(x, y, x.shape[1], packed)
        else:
            if epilogue.residual is not None and (epilogue.residual.shape != y.shape
                                                  or np.shares_memory(epilogue.residual, y)):
                raise UbpError(f"kernel {self.symbol}: residual must be [M, n] and must not overlap y")
            rc = self.call_ep_raw(x, y, x.shape[1], packed, epilogue.struct())
        if rc != 0:
            raise RunError(f"kernel {self.symbol} returned error code {rc}: {describe_error(rc)}")
        return y
