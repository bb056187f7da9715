"""Executed-instruction counts of one AArch64 kernel call under qemu, by class: *counts*, not times.

``insn_count.c`` is a qemu TCG plugin of our own (Debian's qemu-user loads plugins but ships
none). It decodes every translated instruction word inside the kernel function's address
range and counts, per executed instruction, one of: FMA (AdvSIMD/scalar/SVE fused
multiply-add), load, store, prefetch, other. The range comes from the harness executable's
symbol table, so the harness's file I/O and set-up are not counted.

:func:`plugin_path` builds the plugin once with the host C compiler (``gcc -shared -fPIC``,
cached like other build artifacts); :func:`count_call` links the kernel object with the
generic harness (:func:`ubpdsl.runtime.qemu.build_harness`), runs it once under
``qemu-aarch64 -plugin`` and returns an :class:`InsnCounts`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ubpdsl.errors import BuildError, RunError

from . import qemu
from .build import read_elf
from .cache import CompileCache
from .loader import check_kernel_args
from .toolchain import run_tool

__all__ = ["CLASSES", "InsnCounts", "plugin_source", "host_cc", "plugin_path", "count_call", "count_program"]

#: Instruction classes, in the order the plugin reports them (then the total).
CLASSES = ("fma", "load", "store", "prefetch", "other")


@dataclass(frozen=True)
class InsnCounts:
    """Executed instructions of one run inside the counted address range."""

    fma: int
    load: int
    store: int
    prefetch: int
    other: int
    total: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def plugin_source() -> str:
    """Text of the shipped ``insn_count.c``."""
    return resources.files("ubpdsl.runtime").joinpath("insn_count.c").read_text()


def host_cc() -> str:
    """The host C compiler (``$CC``, else cc/gcc/clang on PATH); RunError when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise RunError("no host C compiler found (set CC or install gcc): it builds the qemu counting plugin")


def _cc_version(cc: str) -> str:
    proc = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False)
    return (proc.stdout.splitlines() or ["unknown"])[0]


def plugin_path(cache: CompileCache | None = None) -> Path:
    """The built counting plugin (``insn_count.so`` for the host), from the compile cache."""
    cache = cache or CompileCache()
    source = plugin_source()
    cc = host_cc()
    key = cache.key(kind="qemu-insn-count-plugin", source_sha256=hashlib.sha256(source.encode()).hexdigest(),
                    cc=_cc_version(cc))
    hit = cache.get(key)
    if hit is not None and (hit / "insn_count.so").is_file():
        return hit / "insn_count.so"
    with tempfile.TemporaryDirectory(prefix="ubpdsl-plugin-") as tmp:
        src, so = Path(tmp) / "insn_count.c", Path(tmp) / "insn_count.so"
        src.write_text(source)
        run_tool([cc, "-shared", "-fPIC", "-O2", "-fvisibility=hidden", "-o", str(so), str(src)],
                 what="host C compiler (qemu counting plugin)")
        return cache.put(key, {"insn_count.so": so}) / "insn_count.so"


def _function_range(exe: Path, symbol: str) -> tuple[int, int]:
    addresses = read_elf(exe, symtab=True).addresses
    if symbol not in addresses:
        raise BuildError(f"{exe}: no symbol {symbol} to count instructions in")
    start, size = addresses[symbol]
    if size <= 0:
        raise BuildError(f"{exe}: symbol {symbol} has no size")
    return start, start + size


def count_program(argv: list[str | os.PathLike[str]], lo: int, hi: int, *, sve_bits: int | None = None,
                  timeout: float = 300, cache: CompileCache | None = None,
                  cwd: str | os.PathLike[str] | None = None) -> tuple[InsnCounts, subprocess.CompletedProcess]:
    """Run a static AArch64 program under qemu with the plugin counting in [lo, hi)."""
    plugin = plugin_path(cache)
    with tempfile.TemporaryDirectory(prefix="ubpdsl-count-") as tmp:
        out = Path(tmp) / "counts.txt"
        proc = qemu.run_qemu(argv, sve_bits=sve_bits, timeout=timeout, cwd=cwd or tmp,
                             qemu_args=["-plugin", f"{plugin},lo={lo:#x},hi={hi:#x},out={out}"])
        if not out.is_file():
            detail = proc.stderr.decode(errors="replace").strip()
            raise RunError(f"qemu counting plugin wrote no counts (status {proc.returncode}): {detail[-500:]}")
        fields = [int(v) for v in out.read_text().split()]
    if len(fields) != len(CLASSES) + 1:
        raise RunError(f"qemu counting plugin wrote a malformed line: {fields}")
    return InsnCounts(*fields), proc


def count_call(obj: Path, symbol: str, x: np.ndarray, packed: np.ndarray | None, M: int, *,
               sve_bits: int | None = None, timeout: float = 300,
               cache: CompileCache | None = None) -> tuple[InsnCounts, np.ndarray]:
    """Instructions one call of kernel ``symbol`` (in AArch64 object ``obj``) executes, and its y.

    Same inputs as :func:`ubpdsl.runtime.qemu.run_aarch64`; RunError on a crash or kernel error.
    """
    K = x.shape[0]
    x, packed, _ = check_kernel_args(symbol, M, K, x, packed, None)
    exe = qemu.build_harness(Path(obj), symbol, cache=cache)
    lo, hi = _function_range(exe, symbol)
    with tempfile.TemporaryDirectory(prefix="ubpdsl-qemu-") as tmp:
        inp, outp = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        qemu.write_input(inp, M, K, x, packed)
        counts, proc = count_program([exe, inp, outp], lo, hi, sve_bits=sve_bits, timeout=timeout, cache=cache,
                                     cwd=tmp)
        if proc.returncode != 0:
            raise RunError(f"kernel {symbol}: harness exited with status {proc.returncode}")
        y = qemu.read_output(outp.read_bytes(), symbol, M, x.shape[1], sve_bits)
    return counts, y
