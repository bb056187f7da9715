"""Kernel variants: the ones shipped with ubpdsl (see library.py) and users' kernels from files.

A variant is named either by a shipped name (``wros``) or by a kernel file, ``FILE.py:name``
(``FILE.py`` alone when the file defines one kernel). :func:`get_variant` resolves both (the
one loader of kernel files: ``compile``, ``tune``, ``bench`` and compile workers use it), and
:func:`variant_name` gives the canonical name configs carry (the file's absolute path, so a
worker process or a later ``export`` loads the same file). :func:`kernel_identity` hashes what
decides a kernel's code -- its source, the globals it reads, its flags and declared knobs --
so tuned results of a changed kernel are never reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from ubpdsl.errors import DSLError, UbpError, did_you_mean
from ubpdsl.guard import import_user_file
from ubpdsl.kernels.library import (
    PATTERN_VARIANTS,
    VARIANTS,
    aligned_rows,
    block_stream,
    pattern_direct,
    wros,
    wros_unrolled,
)
from ubpdsl.language.core import KernelFunction

__all__ = ["PATTERN_VARIANTS", "VARIANTS", "aligned_rows", "block_stream", "get_variant",
           "pattern_direct", "kernel_identity", "load_kernel_file",
           "variant_identities", "variant_name", "wros", "wros_unrolled"]

_LOADED: dict[tuple[str, str], dict[str, KernelFunction]] = {}  # (path, content sha256) -> kernels


def _split(spec: str) -> tuple[Path, str | None]:
    """``"dir/k.py:name"`` -> (dir/k.py, "name"); ``"dir/k.py"`` -> (dir/k.py, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head.endswith(".py") and tail.isidentifier():
        return Path(head), tail
    return Path(spec), None


def _kernels_of_file(path: Path) -> dict[str, KernelFunction]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UbpError(f"kernel file {path}: {exc.strerror or exc}") from None
    key = (str(path.resolve()), hashlib.sha256(data).hexdigest())
    if key in _LOADED:
        return _LOADED[key]
    module = import_user_file(path, f"ubpdsl_user_kernel_{key[1][:16]}", error=DSLError)
    kernels = {k: v for k, v in vars(module).items() if isinstance(v, KernelFunction)}
    if not kernels:
        raise DSLError(f"{path}:1: no @ubl.kernel function found")
    _LOADED[key] = kernels
    return kernels


def load_kernel_file(path: str | Path, name: str | None = None) -> KernelFunction:
    """The ``@ubl.kernel`` function ``name`` of a Python file (the only one when ``name`` is None)."""
    path = Path(path)
    if path.suffix != ".py":
        raise UbpError(f"kernel file {path} must be a .py file")
    if not path.is_file():
        raise UbpError(f"kernel file {path} does not exist")
    kernels = _kernels_of_file(path)
    if name is None:
        if len(kernels) > 1:
            raise UbpError(f"{path} defines several kernels ({', '.join(kernels)}); name one: {path}:NAME")
        return next(iter(kernels.values()))
    if name not in kernels:
        raise UbpError(f"{path} has no kernel {name!r}{did_you_mean(name, kernels)} (it defines "
                       f"{', '.join(kernels)})")
    return kernels[name]


def get_variant(spec: str, name: str | None = None) -> KernelFunction:
    """A shipped variant by name, or a user kernel: ``FILE.py:name`` (or ``FILE.py`` and ``name``)."""
    if spec in VARIANTS and name is None:
        return VARIANTS[spec]
    if spec in PATTERN_VARIANTS and name is None:
        return PATTERN_VARIANTS[spec]
    path, inner = _split(spec)
    if path.suffix != ".py":
        known = [*VARIANTS, *PATTERN_VARIANTS]
        raise UbpError(f"unknown kernel {spec!r}{did_you_mean(spec, known)} (shipped variants: "
                       f"{', '.join(known)}; or a kernel file FILE.py:NAME)")
    return load_kernel_file(path, name or inner)


def variant_name(spec: str) -> str:
    """The canonical name of a variant spec: a shipped name, or ``/abs/FILE.py:name``."""
    if spec in VARIANTS or spec in PATTERN_VARIANTS:
        return spec
    kernel = get_variant(spec)
    return f"{_split(spec)[0].resolve()}:{kernel.name}"


def kernel_identity(kernel: KernelFunction) -> str:
    """sha256 of what decides the kernel's code and search space: source, read globals, flags, knobs."""
    from ubpdsl.compiler import kernel_globals

    text = json.dumps({"source": kernel.source, "globals": kernel_globals(kernel), "tune": kernel.tune,
                       "flags": [kernel.layout, kernel.aligned, kernel.needs_specialized]},
                      sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def variant_identities(names: Iterable[str]) -> dict[str, str]:
    """{variant name: :func:`kernel_identity`} (a tuned-config key part)."""
    return {n: kernel_identity(get_variant(n)) for n in sorted(names)}
