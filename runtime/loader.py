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

import os
from pathlib import Path

import numpy as np

from ubpdsl.abi import KERNEL_ERRORS, describe_error
from ubpdsl.errors import RunError, UbpError
from ubpdsl.runtime.kernel_so import load_symbol

__all__ = ["KERNEL_ERRORS", "HostKernel", "aligned_empty", "aligned_copy", "describe_error", "check_kernel_args"]

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


class HostKernel:
    """A kernel in a host ``.so``, callable on numpy arrays.

    >>> k = HostKernel("build/conv1.host.so", "ubp_conv1", M=96, K=16)
    >>> y = k(x, packed)            # x: float32 [16, n], packed: uint8[...] or None

    The library is loaded with ``RTLD_LOCAL`` and kept alive as long as this object.
    """

    def __init__(self, so_path: str | os.PathLike[str], symbol: str, M: int, K: int) -> None:
        self.so_path = Path(so_path)
        self.symbol = symbol
        self.M = int(M)
        self.K = int(K)
        try:
            self._lib, fn = load_symbol(self.so_path, symbol)
        except OSError as exc:
            raise RunError(str(exc)) from None
        self._fn = fn

    def __repr__(self) -> str:
        return f"HostKernel({str(self.so_path)!r}, {self.symbol!r}, M={self.M}, K={self.K})"

    def call_raw(self, x: np.ndarray, y: np.ndarray, n: int, packed: np.ndarray | None) -> int:
        """Call the kernel without validation; return its return code."""
        return int(self._fn(x.ctypes.data, y.ctypes.data, n, None if packed is None else packed.ctypes.data))

    def __call__(
        self, x: np.ndarray, packed: np.ndarray | None = None, y: np.ndarray | None = None
    ) -> np.ndarray:
        """Compute ``y = W @ x``; returns ``y`` ([M, n] float32, newly allocated when None)."""
        x, packed, y = check_kernel_args(self.symbol, self.M, self.K, x, packed, y)
        rc = self.call_raw(x, y, x.shape[1], packed)
        if rc != 0:
            raise RunError(f"kernel {self.symbol} returned error code {rc}: {describe_error(rc)}")
        return y
