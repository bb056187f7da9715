"""Loading a kernel ``.so`` and binding its entry point: the one ctypes loader.

The library is loaded from a private copy named by the sha256 of its bytes (in a per-process
temporary directory). The dynamic loader hands back an already-loaded library when the same
path is opened again, even after the file was replaced: rebuilding ``build/fc.host.so`` and
loading it again in one process would otherwise run the old code, and rewriting a file that
is mapped crashes the process. A private, content-named copy can do neither.

Standard library only, and no imports from ubpdsl: the timing worker
(:mod:`ubpdsl.autotune.measure`) runs as a bare ``python -S`` script, here or on a remote
runner, with this file beside it. :class:`ubpdsl.runtime.loader.HostKernel` (numpy) and
:class:`ubpdsl.torch_ops.NativeKernel` (torch) are built on :func:`load_symbol`.
"""

from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import tempfile
from typing import Any

__all__ = ["load_symbol", "KERNEL_ARGTYPES", "EP_ARGTYPES"]

#: ``int32_t <symbol>(const float *x, float *y, int64_t n, const void *packed_w)``
KERNEL_ARGTYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)
#: The ``_ep`` entry point's: the plain ones plus ``const ubp_epilogue *ep`` (ubpdsl.abi).
EP_ARGTYPES = (*KERNEL_ARGTYPES, ctypes.c_void_p)


_private_dir: str | None = None


def _private_copy(path: str) -> str:
    """``path``'s bytes in this process's private directory, named by their sha256."""
    global _private_dir
    with open(path, "rb") as f:
        data = f.read()
    if _private_dir is None:
        _private_dir = tempfile.mkdtemp(prefix="ubp-loaded-")
        atexit.register(shutil.rmtree, _private_dir, True)
    dest = os.path.join(_private_dir, hashlib.sha256(data).hexdigest() + ".so")
    if not os.path.exists(dest):
        tmp = dest + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    return dest


def load_symbol(so: str | os.PathLike[str], symbol: str, *, epilogue: bool = False) -> tuple[ctypes.CDLL, Any]:
    """``(library, function)``: ``so`` loaded with ``RTLD_LOCAL | RTLD_NOW`` and its kernel entry
    point ``symbol`` typed per the kernel C ABI (``epilogue``: an ``_ep`` entry point, one more
    pointer argument). Keep the library alive while calling.

    Raises :class:`OSError` with a one-line message when the file is missing or not loadable
    or lacks the symbol.
    """
    path = os.path.realpath(os.fspath(so))
    if not os.path.isfile(path):
        raise OSError(f"kernel library not found: {os.fspath(so)}")
    mode = getattr(os, "RTLD_LOCAL", 0) | getattr(os, "RTLD_NOW", 2)
    try:
        path = _private_copy(path)
    except OSError:
        pass  # no room for a copy: load the file itself
    try:
        lib = ctypes.CDLL(path, mode=mode)
    except OSError as exc:
        raise OSError(f"cannot load {os.fspath(so)}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    try:
        fn = getattr(lib, symbol)
    except AttributeError:
        raise OSError(f"{os.fspath(so)} has no symbol '{symbol}'") from None
    fn.restype = ctypes.c_int32
    fn.argtypes = list(EP_ARGTYPES if epilogue else KERNEL_ARGTYPES)
    return lib, fn
