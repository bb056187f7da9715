"""Running AArch64 kernels under qemu-user, for correctness only (never for timing).

:func:`run_aarch64` links the kernel object with the generic static harness
(``harness.c``, musl, via ``zig cc -target aarch64-linux-musl -static``), caches the
executable by content hash, writes the inputs to a file, runs the harness under
``qemu-aarch64`` and returns ``y``.

CPU models:

* NEON (``sve_bits=None``): ``-cpu cortex-a76``, a CPU *without* SVE, so a NEON kernel that
  accidentally uses SVE dies with SIGILL instead of passing;
* SVE (``sve_bits=b``, a multiple of 128 up to 2048): ``-cpu max,sve<b>=on,
  sve-default-vector-length=<b/8>``, i.e. the vector length is exactly ``b`` bits (the
  ``sve<b>=on`` property alone only caps it; qemu-user's default length is 512 bits).

A crash (signal), a timeout, a non-zero kernel return code, a y element left unwritten or
a write past the end of y all raise :class:`~ubpdsl.errors.RunError` with the details.
qemu-aarch64 comes from Debian's ``qemu-user`` package.
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import signal
import struct
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np

from ubpdsl import abi
from ubpdsl.abi import describe_error
from ubpdsl.errors import RunError

from .cache import CompileCache
from .loader import Epilogue, check_kernel_args
from .toolchain import run_tool, toolchain_versions, zig_cmd

__all__ = [
    "qemu_available",
    "qemu_binary",
    "qemu_cpu_args",
    "aarch64_sysroot",
    "harness_source",
    "build_harness",
    "run_aarch64",
    "run_qemu",
    "write_input",
    "read_output",
]

SVE_MAX_BITS = 2048
#: Where Debian's ``libc6-arm64-cross`` puts the AArch64 glibc (for dynamic executables).
DEBIAN_ARM64_SYSROOT = Path("/usr/aarch64-linux-gnu")

_OUT_HEADER = struct.Struct("<4siII")


def qemu_binary() -> str:
    """Path of ``qemu-aarch64``; RunError telling how to install it when missing."""
    found = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not found:
        raise RunError("qemu-aarch64 not found: install Debian's qemu-user (apt-get install qemu-user)")
    return found


def qemu_available() -> bool:
    """True if ``qemu-aarch64`` is on PATH."""
    try:
        qemu_binary()
    except RunError:
        return False
    return True


def aarch64_sysroot() -> Path | None:
    """An AArch64 glibc sysroot for dynamically linked executables (``qemu -L``), or None.

    Debian's ``libc6-arm64-cross`` installs it at /usr/aarch64-linux-gnu.
    """
    if (DEBIAN_ARM64_SYSROOT / "lib" / "ld-linux-aarch64.so.1").exists():
        return DEBIAN_ARM64_SYSROOT
    return None


def qemu_cpu_args(sve_bits: int | None) -> list[str]:
    """``-cpu`` arguments: a NEON-only CPU for None, else SVE with exactly ``sve_bits``."""
    if sve_bits is None:
        return ["-cpu", "cortex-a76"]
    if not isinstance(sve_bits, int) or sve_bits % 128 or not 128 <= sve_bits <= SVE_MAX_BITS:
        raise RunError(f"invalid SVE vector length {sve_bits!r}: use a multiple of 128 in 128..{SVE_MAX_BITS}")
    return ["-cpu", f"max,sve{sve_bits}=on,sve-default-vector-length={sve_bits // 8}"]


def _no_core_dumps() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_qemu(
    argv: Sequence[str | os.PathLike[str]],
    *,
    sve_bits: int | None = None,
    timeout: float = 60,
    sysroot: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    qemu_args: Sequence[str] = (),
) -> subprocess.CompletedProcess:
    """Run an AArch64 executable (``argv[0]``) under qemu-aarch64; return the finished process.

    ``sysroot`` is passed as ``-L`` (the ELF interpreter and libraries of a dynamically linked
    executable); ``env`` entries are set in the guest with ``-E``; ``qemu_args`` go to qemu
    before the program (e.g. ``-plugin``). Raises RunError on a
    timeout or when the guest was killed by a signal (a crash), never hangs. A non-zero
    exit status is returned to the caller, not raised.
    """
    cmd: list[str] = [qemu_binary(), *qemu_cpu_args(sve_bits), *qemu_args]
    if sysroot is not None:
        cmd += ["-L", str(sysroot)]
    for key, value in (env or {}).items():
        cmd += ["-E", f"{key}={value}"]
    cmd += [os.fspath(a) for a in argv]
    cpu = cmd[cmd.index("-cpu") + 1]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, timeout=timeout, cwd=cwd, preexec_fn=_no_core_dumps, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RunError(
            f"{Path(os.fspath(argv[0])).name} timed out after {timeout:g} s under qemu-aarch64 (-cpu {cpu})"
        ) from exc
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        stderr = proc.stderr.decode(errors="replace").strip()
        raise RunError(
            f"{Path(os.fspath(argv[0])).name} crashed under qemu-aarch64 (-cpu {cpu}) with {sig}"
            + (f": {stderr[-2000:]}" if stderr else "")
        )
    return proc


def harness_source() -> str:
    """Text of the shipped ``harness.c``."""
    return resources.files("ubpdsl.runtime").joinpath("harness.c").read_text()


def build_harness(obj: Path, symbol: str, *, cache: CompileCache | None = None, epilogue: bool = False) -> Path:
    """Link ``obj`` (an AArch64 kernel object) with the harness; return the static executable.

    ``epilogue``: the harness can also call ``<symbol>_ep`` (input version 2).
    Cached by the content of the object and harness, the symbol and the zig version.
    """
    obj = Path(obj)
    if not obj.is_file():
        raise RunError(f"kernel object not found: {obj}")
    cache = cache or CompileCache()
    source = harness_source()
    key = cache.key(
        kind="aarch64-harness",
        obj_sha256=hashlib.sha256(obj.read_bytes()).hexdigest(),
        harness_sha256=hashlib.sha256(source.encode()).hexdigest(),
        symbol=symbol,
        epilogue=abi.c_epilogue_struct() if epilogue else None,
        zig=toolchain_versions().get("zig", "unknown"),
    )
    hit = cache.get(key)
    if hit is not None and (hit / "harness").is_file():
        return hit / "harness"
    with tempfile.TemporaryDirectory(prefix="ubpdsl-harness-") as tmp:
        src = Path(tmp) / "harness.c"
        src.write_text(source)
        (Path(tmp) / "ubp_epilogue.h").write_text("#include <stdint.h>\n" + abi.c_epilogue_struct() + "\n")
        ep_flags = [f"-DUBP_KERNEL_EP={abi.ep_symbol(symbol)}"] if epilogue else []
        exe = Path(tmp) / "harness"
        run_tool(
            [
                *zig_cmd(), "cc", "-target", "aarch64-linux-musl", "-static", "-O2",
                f"-DUBP_KERNEL={symbol}", *ep_flags, "-o", str(exe), str(src), str(obj.resolve()),
            ],
            what="zig cc (aarch64 harness)",
        )
        return cache.put(key, {"harness": exe}) / "harness"


def write_input(path: Path, M: int, K: int, x: np.ndarray, packed: np.ndarray | None,
                epilogue: Epilogue | None = None) -> None:
    n = x.shape[1]
    packed_bytes = b"" if packed is None else packed.tobytes()
    packed_len = -1 if packed is None else len(packed_bytes)
    with open(path, "wb") as f:
        f.write(b"UBPI" + struct.pack("<I4q", 1 if epilogue is None else 2, M, K, n, packed_len))
        f.write(packed_bytes)
        f.write(np.ascontiguousarray(x, dtype="<f4").tobytes())
        if epilogue is not None:
            ep = epilogue
            raw = abi.pack_epilogue(0, 0, ep.lo, ep.hi)
            version, flags, _, _, lo, hi = struct.unpack("<IIQQff", raw)
            f.write(struct.pack("<IIff2q", version, flags, lo, hi, ep.bias is not None, ep.residual is not None))
            for a in (ep.bias, ep.residual):
                if a is not None:
                    f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def run_aarch64(
    obj: Path,
    symbol: str,
    x: np.ndarray,
    packed: np.ndarray | None,
    M: int,
    *,
    sve_bits: int | None = None,
    timeout: float = 60,
    cache: CompileCache | None = None,
    epilogue: Epilogue | None = None,
) -> np.ndarray:
    """Run the kernel ``symbol`` of AArch64 object ``obj`` under qemu; return ``y`` [M, n].

    ``x`` is float32 [K, n] (K is taken from it), ``packed`` the uint8 blob or None.
    ``sve_bits=None`` runs on a NEON-only CPU, otherwise on an SVE CPU with that vector
    length. ``epilogue`` calls ``<symbol>_ep`` instead. Raises RunError on a crash, timeout,
    kernel error code or a y element left unwritten / written out of bounds.
    """
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise RunError(f"kernel {symbol}: x must be a 2-D float32 numpy array")
    K = x.shape[0]
    x, packed, _ = check_kernel_args(symbol, M, K, x, packed, None)
    qemu_cpu_args(sve_bits)  # validate before building
    exe = build_harness(Path(obj), symbol, cache=cache, epilogue=epilogue is not None)
    with tempfile.TemporaryDirectory(prefix="ubpdsl-qemu-") as tmp:
        inp, out = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        write_input(inp, M, K, x, packed, epilogue)
        proc = run_qemu([exe, inp, out], sve_bits=sve_bits, timeout=timeout, cwd=tmp)
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise RunError(f"kernel {symbol}: harness exited with status {proc.returncode}: {detail}")
        data = out.read_bytes()
    return read_output(data, symbol, M, x.shape[1], sve_bits)


def read_output(data: bytes, symbol: str, M: int, n: int, sve_bits: int | None) -> np.ndarray:
    """``y`` [M, n] from the harness's output file; RunError on a kernel error or bad y writes."""
    if len(data) < _OUT_HEADER.size:
        raise RunError(f"kernel {symbol}: harness wrote a malformed output file")
    magic, rc, flags, _ = _OUT_HEADER.unpack_from(data)
    if magic != b"UBPO":
        raise RunError(f"kernel {symbol}: harness wrote a malformed output file")
    where = "NEON" if sve_bits is None else f"SVE {sve_bits}-bit"
    if rc != 0:
        raise RunError(f"kernel {symbol} returned error code {rc}: {describe_error(rc)} (qemu, {where})")
    if flags & 2:
        raise RunError(f"kernel {symbol} wrote past the end of y (qemu, {where})")
    if flags & 1:
        raise RunError(f"kernel {symbol} left elements of y unwritten (qemu, {where})")
    y = np.frombuffer(data, dtype="<f4", count=M * n, offset=_OUT_HEADER.size)
    return y.astype(np.float32).reshape(M, n)
