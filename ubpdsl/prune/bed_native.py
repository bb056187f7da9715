"""The native BED engine: build ``native/bed.c`` with zig on first use, load it with ctypes, call it.

:func:`ubpdsl.prune.selectors.bed_select` and :func:`~ubpdsl.prune.selectors.bed_select_multi` use this
engine when it is available and the numpy engine in ``selectors.py`` otherwise.  Both select exactly
the same blocks (the C file's header explains why); the numpy engine is the reference.

* Build: ``python -m ziglang cc -O2 -shared -fPIC`` for the baseline CPU of the host architecture,
  cached in :class:`~ubpdsl.runtime.cache.CompileCache` under a key of the source hash, the zig
  version, the flags and the host platform, so only the first use on a machine pays for it (~1 s).
* Fallback: if zig is missing, the build fails or the library does not load, :data:`ENGINE` becomes
  ``"numpy"``, the reason is kept in :data:`LOAD_ERROR` and logged at debug level, and BED runs on
  numpy.  Nothing is retried in the same process.
* ``UBPDSL_BED_ENGINE=numpy`` forces the numpy engine; ``UBPDSL_BED_ENGINE=native`` forces the native
  one and raises :class:`~ubpdsl.errors.BuildError` when it cannot be built.  The variable is read at
  every call.
* Memory: a call needs about 25 bytes per weight.  The C side keeps the workspace of its last call (up
  to 256 MiB) to skip the page faults of fresh memory next time; :func:`release_workspace` frees it.
* Inputs are validated by the callers; :func:`bed_native` expects float64 score matrices and a
  feasible budget.  It returns ``None`` for inputs the C engine declines (scores so large that a
  window sum could overflow), which the caller then hands to the numpy engine.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.metadata
import logging
import os
import platform
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ubpdsl.errors import BuildError

__all__ = ["ENGINE", "LOAD_ERROR", "SOURCE", "bed_native", "engine", "forced_engine", "load", "release_workspace"]

log = logging.getLogger(__name__)

#: The C source of the engine.
SOURCE = Path(__file__).with_name("native") / "bed.c"
#: Compiler flags (part of the cache key).  Baseline CPU: a shared cache never holds code the host
#: cannot run, and the engine is bound by memory latency, not by vector width.
CFLAGS = ("-O2", "-mcpu=baseline", "-ffp-contract=off", "-shared", "-fPIC")

#: ``"unbuilt"`` until the first BED call, then ``"native"`` (library loaded) or ``"numpy"`` (fallback).
ENGINE = "unbuilt"
#: Why the native engine is unavailable (``None`` when it loaded or was not tried yet).
LOAD_ERROR: str | None = None

_lib: ctypes.CDLL | None = None
_lock = threading.Lock()

# return codes of bed_select() in bed.c
_OK, _NO_MEMORY, _EXHAUSTED, _BAD_RUN, _OVERFLOW, _BAD_ARGS = range(6)


def forced_engine() -> str | None:
    """The engine forced by ``UBPDSL_BED_ENGINE`` (``"numpy"`` or ``"native"``), or None."""
    val = os.environ.get("UBPDSL_BED_ENGINE", "").strip().lower()
    if val in ("", "auto"):
        return None
    if val not in ("numpy", "native"):
        raise ValueError(f"UBPDSL_BED_ENGINE must be 'numpy', 'native' or 'auto', got {val!r}")
    return val


def _zig_version() -> str:
    try:
        return importlib.metadata.version("ziglang")
    except importlib.metadata.PackageNotFoundError as exc:
        raise BuildError("zig not found: install the Python package 'ziglang' (pip install ziglang)") from exc


def _build() -> Path:
    """Path of the compiled library, built and cached on a miss."""
    from ubpdsl.runtime.cache import CompileCache
    from ubpdsl.runtime.toolchain import run_tool, zig_cmd

    source = SOURCE.read_bytes()
    cache = CompileCache()
    key = cache.key(
        what="bed-native",
        source=hashlib.sha256(source).hexdigest(),
        zig=_zig_version(),
        flags=list(CFLAGS),
        host=[platform.system(), platform.machine()],
    )
    entry = cache.get(key)
    if entry is None or not (entry / "bed.so").is_file():
        with tempfile.TemporaryDirectory(prefix="ubpdsl-bed-") as tmp:
            out = Path(tmp) / "bed.so"
            run_tool([*zig_cmd(), "cc", *CFLAGS, "-o", out, SOURCE], what="zig cc (BED engine)", timeout=300)
            entry = cache.put(key, {"bed.so": out})
    return entry / "bed.so"


def load() -> ctypes.CDLL:
    """The loaded engine library; builds it on first use.  Raises BuildError (or OSError) on failure."""
    global _lib
    with _lock:
        if _lib is None:
            lib = ctypes.CDLL(os.fspath(_build()))
            fn = lib.bed_select
            p = ctypes.c_void_p
            fn.argtypes = [ctypes.c_int64, p, p, p, ctypes.c_int64, ctypes.c_int64, p, p, p]
            fn.restype = ctypes.c_int
            lib.bed_release.argtypes = []
            lib.bed_release.restype = None
            _lib = lib
    return _lib


def engine() -> str:
    """The engine BED uses now: ``"native"`` or ``"numpy"`` (tries the build once if needed)."""
    global ENGINE, LOAD_ERROR
    forced = forced_engine()
    if forced == "numpy":
        return "numpy"
    if ENGINE == "unbuilt":
        try:
            load()
            ENGINE, LOAD_ERROR = "native", None
        except Exception as exc:  # no zig, failed build, unloadable library: fall back, never crash
            ENGINE, LOAD_ERROR = "numpy", f"{type(exc).__name__}: {exc}"
            log.debug("native BED engine unavailable, using numpy: %s", LOAD_ERROR)
    if forced == "native" and ENGINE != "native":
        raise BuildError(f"UBPDSL_BED_ENGINE=native but the native BED engine is unavailable: {LOAD_ERROR}")
    return ENGINE


def bed_native(score_list: Sequence[np.ndarray], m: int, N: int) -> list[tuple[np.ndarray, np.ndarray]] | None:
    """BED on the native engine: one ``(rows, cols)`` per layer (int32, sorted by ``(row, col)``).

    ``score_list`` holds validated finite 2-D score matrices sharing a budget of ``m`` blocks (``m`` no
    more than fit).  Returns None when the engine declines the input (a window sum could overflow).
    """
    lib = load()
    mats = [np.ascontiguousarray(s, dtype=np.float64) for s in score_list]
    L = len(mats)
    Rs = np.array([a.shape[0] for a in mats], dtype=np.int64)
    Cs = np.array([a.shape[1] for a in mats], dtype=np.int64)
    ptrs = np.array([a.ctypes.data for a in mats], dtype=np.uintp)
    rows = np.empty(max(m, 1), dtype=np.int32)
    cols = np.empty(max(m, 1), dtype=np.int32)
    counts = np.zeros(L, dtype=np.int64)
    rc = lib.bed_select(
        L, Rs.ctypes.data, Cs.ctypes.data, ptrs.ctypes.data, int(N), int(m),
        rows.ctypes.data, cols.ctypes.data, counts.ctypes.data,
    )  # fmt: skip
    if rc == _OVERFLOW:
        log.debug("native BED declined scores this large; using numpy")
        return None
    if rc == _NO_MEMORY:
        raise MemoryError("native BED engine: out of memory")
    if rc != _OK:
        raise RuntimeError(f"native BED engine failed with code {rc} (R={Rs.tolist()}, C={Cs.tolist()}, N={N}, m={m})")
    out = []
    start = 0
    for k in counts.tolist():
        out.append((rows[start : start + k].copy(), cols[start : start + k].copy()))
        start += k
    return out


def release_workspace() -> None:
    """Free the workspace the native engine keeps between calls (no-op if it was never loaded)."""
    if _lib is not None:
        _lib.bed_release()
