"""Guards for what ubpdsl reads and where it writes: bounded JSON, output directories, worker lifetime.

* :func:`read_json` reads a JSON file a user handed us (a manifest, a pixel map) with a size limit
  and a nesting-depth limit, so a hostile file ends in one :class:`~ubpdsl.errors.UbpError` line,
  never a ``RecursionError`` or a ``MemoryError``.
* :func:`ensure_dir` creates an output directory or says in one line why it cannot (a regular file
  in the way, no permission), instead of a ``FileExistsError`` traceback.
* :func:`exclusive_lock` serialises processes on one machine that would change the same thing
  (two ``tune`` runs on one study): the second waits, then finds the first one's result.
* :func:`import_user_file` runs a user's Python file (a model factory, a kernel file) as a module;
  whatever it raises becomes one ``file:line: Type: message`` error.
* :func:`die_with_parent` makes a worker process exit when the process that started it dies, even by
  ``kill -9`` (Linux ``prctl(PR_SET_PDEATHSIG)``, plus a parent-pid watchdog thread elsewhere).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ubpdsl.errors import UbpError

__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "die_with_parent", "ensure_dir", "exclusive_lock",
           "import_user_file", "read_json"]

#: Largest JSON file read (a bundle manifest of a few hundred layers is well under 1 MiB).
MAX_JSON_BYTES = 64 << 20
#: Deepest nesting of arrays/objects accepted (ubpdsl's own files nest 5 levels).
MAX_JSON_DEPTH = 64


def _depth(text: str) -> int:
    """Deepest bracket nesting of a JSON text (brackets inside strings are skipped)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def read_json(path: str | os.PathLike[str], what: str, *, error: type[UbpError] = UbpError,
              max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse the JSON file ``path``; ``error("<what> is ...")`` on any problem (``what`` names the file)."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{what} is not readable ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise error(f"{what} is larger than {max_bytes} bytes: not a ubpdsl JSON file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not readable JSON (not UTF-8: {exc.reason} at byte {exc.start})") from None
    if _depth(text) > max_depth:
        raise error(f"{what} is nested deeper than {max_depth} levels: not a ubpdsl JSON file")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not readable JSON ({exc.msg}, line {exc.lineno})") from None
    except (RecursionError, ValueError) as exc:  # e.g. an integer with too many digits
        raise error(f"{what} is not readable JSON ({exc})") from None


def ensure_dir(path: str | os.PathLike[str], what: str = "output directory") -> Path:
    """Create directory ``path`` (and its parents) unless it exists; :class:`UbpError` if it cannot."""
    p = Path(path)
    for parent in [p, *p.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UbpError(f"{what} {p}: {parent} is a file, not a directory")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UbpError(f"{what} {p}: cannot create it ({exc.strerror or exc})") from None
    return p


def _watch_parent(parent: int) -> None:
    import time

    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(1)


def die_with_parent(parent: int | None = None) -> None:
    """Exit this (worker) process when its parent dies; use it as a pool initializer.

    ``parent``: the pid of the process that started the pool (pass ``os.getpid()`` as ``initargs``):
    a parent that died while this worker was still starting is noticed too. Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` -- the kernel kills us the moment the thread that started us
    goes away. Elsewhere (and as a second line of defence) a daemon thread polls the parent pid.
    """
    parent = os.getppid() if parent is None else parent
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            PR_SET_PDEATHSIG = 1
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="ubpdsl-parent-watch").start()


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike[str], on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the ``with`` block.

    If another process holds it, ``on_wait()`` is called once and this one blocks until it is
    released (the kernel releases it when the holder exits, even by ``kill -9``).
    """
    import fcntl

    p = Path(path)
    ensure_dir(p.parent, "lock directory")
    fd = os.open(p, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def import_user_file(path: str | os.PathLike[str], module_name: str, *,
                     error: type[UbpError] = UbpError) -> Any:
    """Import the Python file ``path`` as module ``module_name`` (registered in ``sys.modules``).

    A syntax error or any exception the file raises while it runs (``SystemExit`` included)
    becomes ``error("<path>:<line>: <Type>: <message>")``, the line being the deepest one in that
    file (an ``error`` it raises passes unchanged); the user's code is run, as importing it asks,
    but never shown as a traceback.
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise error(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        sys.modules.pop(module_name, None)
        raise error(f"{exc.filename}:{exc.lineno}: syntax error: {exc.msg}") from None
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, error):  # already one line naming its place (e.g. a DSLError file:line)
            raise
        tb, line = exc.__traceback__, "?"
        while tb is not None:
            if Path(tb.tb_frame.f_code.co_filename).resolve() == path.resolve():
                line = str(tb.tb_lineno)
            tb = tb.tb_next
        raise error(f"{path}:{line}: {type(exc).__name__}: {exc}") from None
    return module
