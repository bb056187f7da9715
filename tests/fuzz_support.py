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
