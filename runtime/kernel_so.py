"""Loading a kernel ``.so`` and binding its entry point: the one ctypes loader.

Standard library only, and no imports from ubpdsl: the timing worker
(:mod:`ubpdsl.autotune.measure`) runs as a bare ``python -S`` script, here or on a remote
runner, with this file beside it. :class:`ubpdsl.runtime.loader.HostKernel` (numpy) and
:class:`ubpdsl.torch_ops.NativeKernel` (torch) are built on :func:`load_symbol`.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

__all__ = ["load_symbol", "KERNEL_ARGTYPES"]

#: ``int32_t <symbol>(const float *x, float *y, int64_t n, const void *packed_w)``
KERNEL_ARGTYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)


def load_symbol(so: str | os.PathLike[str], symbol: str) -> tuple[ctypes.CDLL, Any]:
    """``(library, function)``: ``so`` loaded with ``RTLD_LOCAL | RTLD_NOW`` and its kernel entry
    point ``symbol`` typed per the kernel C ABI. Keep the library alive while calling.

    Raises :class:`OSError` with a one-line message when the file is missing or not loadable
    or lacks the symbol.
    """
    path = os.path.realpath(os.fspath(so))
    if not os.path.isfile(path):
        raise OSError(f"kernel library not found: {os.fspath(so)}")
    mode = getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2)
    try:
        lib = ctypes.CDLL(path, mode=mode)
    except OSError as exc:
        raise OSError(f"cannot load {os.fspath(so)}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    try:
        fn = getattr(lib, symbol)
    except AttributeError:
        raise OSError(f"{os.fspath(so)} has no symbol '{symbol}'") from None
    fn.restype = ctypes.c_int32
    fn.argtypes = list(KERNEL_ARGTYPES)
    return lib, fn
