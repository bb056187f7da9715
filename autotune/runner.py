"""Where candidates are timed: a local subprocess, or a remote machine (:mod:`.remote`).

A runner takes a timing request for :mod:`ubpdsl.autotune.measure` whose entries name local
files (``so``, ``packed``, ``weight``), runs the worker on those files in a separate process
with a time limit, and returns a :class:`Outcome`: the worker's result, or why it failed
(crashed with a signal, did not return in time, returned an error). A failing candidate is
never an exception: the tuner records it as a failed trial and goes on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ubpdsl.errors import UbpError

__all__ = ["Outcome", "Runner", "LocalRunner", "WORKER", "WORKER_FILES", "get_runner", "classify_exit"]

#: The worker script, shipped as is to remote machines.
WORKER = Path(__file__).with_name("measure.py")
#: What a remote runner needs beside it: the worker and the kernel loader it imports (name there -> file).
WORKER_FILES = {"measure.py": WORKER, "kernel_so.py": Path(__file__).parent.parent / "runtime" / "kernel_so.py"}


@dataclass
class Outcome:
    """What happened to one timing request."""

    status: str  # "ok", "crash", "timeout", "error"
    result: dict[str, Any] | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Runner(Protocol):
    """Runs the timing worker on a request (entries name local files)."""

    name: str
    estimate: bool

    def run(self, request: dict[str, Any], timeout: float) -> Outcome: ...

    def close(self) -> None: ...


def classify_exit(returncode: int, stdout: str, stderr: str) -> Outcome:
    """Turn the worker's exit status and output into an Outcome."""
    if returncode < 0 or returncode > 128:
        sig = -returncode if returncode < 0 else returncode - 128
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return Outcome("crash", message=f"the kernel crashed the timing process ({name})")
    try:
        result = json.loads(stdout)
    except json.JSONDecodeError:
        tail = (stderr.strip().splitlines() or ["no output"])[-1][:300]
        return Outcome("error", message=f"timing worker exited with status {returncode}: {tail}")
    if not result.get("ok"):
        return Outcome("error", result, message=str(result.get("error", "unknown error")))
    return Outcome("ok", result)


class LocalRunner:
    """Times on this machine, one fresh ``python measure.py`` process per request."""

    name = "local"
    estimate = False

    def __init__(self, python: str | None = None) -> None:
        self.python = python or sys.executable

    def run(self, request: dict[str, Any], timeout: float) -> Outcome:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                   MALLOC_MMAP_THRESHOLD_="1073741824")
        proc = subprocess.Popen([self.python, "-S" if not _needs_site(request) else "-B", str(WORKER)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, start_new_session=True)
        try:
            out, err = proc.communicate(json.dumps(request), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return Outcome("timeout", message=f"the kernel did not return within {timeout:.0f} s")
        return classify_exit(proc.returncode, out, err)

    def close(self) -> None:
        pass


def _needs_site(request: dict[str, Any]) -> bool:
    """torch lives in site-packages: only dense entries need the site machinery."""
    return any(e.get("kind") == "torch_mm" for e in request["entries"])


def _kill_group(proc: subprocess.Popen[str]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def get_runner(spec: str | None, ssh_options: tuple[str, ...] = ()) -> Runner:
    """``None``/``local`` -> :class:`LocalRunner`; ``ssh://user@host[:port]`` -> a remote runner."""
    if spec in (None, "", "local"):
        return LocalRunner()
    if spec.startswith("ssh://"):
        from ubpdsl.autotune.remote import SshRunner

        return SshRunner.from_url(spec, ssh_options)
    raise UbpError(f"unknown runner {spec!r}: use ssh://user@host[:port] (or leave it out to time locally)")
