"""Shared harness of the fuzz suite (tests/test_fuzz_*.py): bounded runs, the clean/not-clean verdict, counts.

A case is *clean* when it ends in either

* exit 1 with exactly one ``error:`` line on stderr and no ``Traceback`` (the ubpdsl CLI), or a
  non-zero exit with a message and no signal (the C readers), or a :class:`~ubpdsl.errors.UbpError`
  (in-process library calls); or
* exit 0 with a result the caller checked against an independent reference.

Anything else -- a signal, a timeout, a traceback, a foreign exception, a wrong result -- is *not
clean*. Every subprocess runs with a time limit and ``RLIMIT_AS`` (2 GiB) and no core dumps.
Counts per class are printed and merged into ``$UBPDSL_FUZZ_COUNTS`` (default: a JSON file in the
temp directory) so a whole run can be summarised.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

MEMORY_LIMIT = 2 << 30
COUNTS_FILE = Path(os.environ.get("UBPDSL_FUZZ_COUNTS", Path(tempfile.gettempdir()) / "ubpdsl-fuzz-counts.json"))

_lock = threading.Lock()
COUNTS: dict[str, Counter] = defaultdict(Counter)
FAILURES: dict[str, list[str]] = defaultdict(list)


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


@dataclass
class Run:
    returncode: int | None  # None: timed out
    stdout: str
    stderr: str


def run(argv: Sequence[str], *, timeout: float = 60, env: dict | None = None, cwd: Path | None = None) -> Run:
    """Run ``argv`` bounded in time and memory; a timeout kills it and gives returncode None."""
    try:
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                           preexec_fn=_limits, check=False, errors="replace")
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return Run(None, out, "timeout")
    return Run(p.returncode, p.stdout, p.stderr)


def run_cli(*args: str, **kw) -> Run:
    return run([sys.executable, "-m", "ubpdsl.cli", *args], **kw)


def cli_verdict(r: Run, check_ok: Callable[[Run], bool] | None = None) -> str | None:
    """None if clean, else why not (the ubpdsl CLI contract)."""
    if r.returncode is None:
        return "timeout"
    if r.returncode < 0:
        return f"signal {-r.returncode}"
    if "Traceback" in r.stderr:
        return "traceback: " + r.stderr.strip().splitlines()[-1][:200]
    if r.returncode == 0:
        if check_ok is not None and not check_ok(r):
            return "exit 0 with a wrong result"
        return None
    if r.returncode == 2 and r.stderr.lstrip().startswith("Usage:") and "\nError: " in r.stderr:
        return None  # a click usage error (bad option value, e.g. --mask naming a directory)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    if r.returncode != 1 or len(errors) != 1:
        return f"exit {r.returncode} with {len(errors)} error lines: {r.stderr.strip()[-200:]}"
    return None


def c_verdict(r: Run, check_ok: Callable[[Run], bool] | None = None) -> str | None:
    """None if clean, else why not (a C reader: non-zero exit with a message, never a signal)."""
    if r.returncode is None:
        return "timeout"
    if r.returncode < 0 or r.returncode >= 128:
        return f"signal {r.returncode}"
    if r.returncode == 0:
        return None if check_ok is None or check_ok(r) else "exit 0 with a wrong result"
    return None if r.stderr.strip() else f"exit {r.returncode} without a message"


def record(cls: str, case: str, why: str | None) -> None:
    with _lock:
        COUNTS[cls]["tried"] += 1
        COUNTS[cls]["clean" if why is None else "not clean"] += 1
        if why is not None:
            FAILURES[cls].append(f"{case}: {why}")


def report(cls: str) -> str:
    """Print this class's counts, merge them into COUNTS_FILE, and return a one-line summary."""
    c = COUNTS[cls]
    line = f"fuzz {cls}: {c['tried']} tried, {c['clean']} clean, {c['not clean']} not clean"
    print(line)
    for f in FAILURES[cls][:20]:
        print("   ", f)
    try:
        data = json.loads(COUNTS_FILE.read_text()) if COUNTS_FILE.is_file() else {}
    except (OSError, ValueError):
        data = {}
    data[cls] = {"tried": c["tried"], "clean": c["clean"], "not clean": c["not clean"], "failures": FAILURES[cls][:50]}
    COUNTS_FILE.write_text(json.dumps(data, indent=1, sort_keys=True))
    return line


def assert_all_clean(cls: str) -> None:
    line = report(cls)
    assert COUNTS[cls]["tried"] > 0, f"no {cls} case ran"
    assert not FAILURES[cls], line + "\n" + "\n".join(FAILURES[cls][:20])


# --------------------------------------------------------------------------- hostile file builders

BYTE_DAMAGE = ("flip", "truncate", "append", "zero-run")


def damage_bytes(draw, buf: bytearray, kind: str) -> None:
    """Damage ``buf`` in place: ``kind`` one of :data:`BYTE_DAMAGE`; ``draw`` is hypothesis' ``data.draw``."""
    from hypothesis import strategies as st

    if kind == "flip":
        for pos in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=8)):
            buf[pos] ^= draw(st.integers(1, 255))
    elif kind == "truncate":
        del buf[draw(st.integers(0, len(buf) - 1)):]
    elif kind == "append":
        buf += draw(st.binary(min_size=1, max_size=256))
    else:
        at, n = draw(st.integers(0, len(buf) - 1)), draw(st.integers(1, 64))
        buf[at:at + n] = bytes(len(buf[at:at + n]))


def set_zip_flag(path: Path, bit: int) -> None:
    """Set a general-purpose flag bit (1: encrypted) on every member, in local and central headers."""
    data = bytearray(path.read_bytes())
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        while i >= 0:
            data[i + at] |= bit
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


def npy(arr) -> bytes:
    import io

    import numpy as np

    b = io.BytesIO()
    np.save(b, arr)
    return b.getvalue()


def deflate_bomb(path: Path, side: int = 5120) -> Path:
    """A ~100 KB masks.npz whose [side, side] float32 weight inflates ~1000:1 (a real deflate stream)."""
    import io
    import zipfile

    import numpy as np

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (side, side)})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for key, arr in (("format", np.array("ubpdsl.masks/1")), ("L.shape", np.array([side, side])),
                         ("L.block", np.array([4, 1])), ("L.rows", np.zeros(0, np.int32)),
                         ("L.cols", np.zeros(0, np.int32))):
            z.writestr(key + ".npy", npy(arr))
        with z.open("L.weight.npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(1 << 22)
            for _ in range(side * side * 4 // len(zeros)):
                f.write(zeros)
    return path
