"""Timing on another machine over ssh: ``--runner ssh://user@host[:port]``.

Protocol (plain OpenSSH client, no agent on the far side beyond ``python3`` and coreutils):

1. on first use: ``ssh host 'uname -m; mkdir -p ~/.cache/ubpdsl-runner/<session>'`` (also checks
   that the host answers and gives its architecture), then ``scp`` the worker
   (:mod:`ubpdsl.autotune.measure`, stdlib only) into that directory;
2. per request: every file an entry names (``.so``, packed weights, dense weights) is shipped
   once, under a content-hash name, with one ``scp`` for all new files; the entries are
   rewritten to those names;
3. ``ssh host 'cd <dir> && timeout -k 2 <T> python3 measure.py; echo __ubp_rc=$? >&2'``
   with the JSON request on stdin: the JSON result comes back on stdout, the worker's exit
   status on stderr (124: timed out; 128+s: killed by signal s, e.g. a segfaulting kernel);
4. on close: ``ssh host rm -rf <dir>``.

Authentication, host keys and jump hosts are ssh's business: pass options with
``--ssh-option`` (each one argument for ssh and scp, e.g. ``-oIdentityFile=~/.ssh/tuner``).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ubpdsl.autotune.runner import WORKER_FILES, Outcome, classify_exit
from ubpdsl.errors import UbpError
from ubpdsl.identity import file_sha256

__all__ = ["SshRunner", "RunnerError"]

_RC = re.compile(r"__ubp_rc=(\d+)")


class RunnerError(UbpError):
    """The remote runner cannot be reached or used."""


class SshRunner:
    """Runs the timing worker on ``user@host`` over ssh (see the module docstring)."""

    estimate = False

    def __init__(self, host: str, user: str | None = None, port: int | None = None,
                 options: tuple[str, ...] = (), connect_timeout: int = 10) -> None:
        self.host = host
        self.user = user
        self.port = port
        self.options = ["-oBatchMode=yes", f"-oConnectTimeout={connect_timeout}", *options]
        self.dest = f"{user}@{host}" if user else host
        self.name = f"ssh://{self.dest}" + (f":{port}" if port else "")
        self._dir: str | None = None
        self._shipped: dict[tuple[str, int, int], str] = {}
        self.arch: str | None = None

    @classmethod
    def from_url(cls, url: str, options: tuple[str, ...] = ()) -> SshRunner:
        parsed = urlparse(url)
        if parsed.scheme != "ssh" or not parsed.hostname:
            raise RunnerError(f"runner URL {url!r} must look like ssh://user@host[:port]")
        try:
            port = parsed.port
        except ValueError:
            raise RunnerError(f"runner URL {url!r} has an invalid port") from None
        return cls(parsed.hostname, parsed.username, port, tuple(options))

    def _ssh(self, command: str, *, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        argv = ["ssh", *self.options, *(["-p", str(self.port)] if self.port else []), self.dest, command]
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)

    def _scp(self, files: list[tuple[Path, str]], timeout: float = 300) -> None:
        if not files:
            return
        # scp names files by their basename: stage content-hash names through one temp dir
        import tempfile

        with tempfile.TemporaryDirectory(prefix="ubp-ship-") as tmp:
            staged = []
            for src, name in files:
                link = Path(tmp) / name
                link.symlink_to(Path(src).resolve())
                staged.append(str(link))
            argv = ["scp", "-q", *self.options, *(["-P", str(self.port)] if self.port else []), *staged,
                    f"{self.dest}:{self._dir}/"]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RunnerError(f"cannot copy files to {self.name}: {_first(proc.stderr)}")

    def connect(self) -> None:
        """Check the host, create the session directory and ship the worker (once)."""
        if self._dir is not None:
            return
        session = f".cache/ubpdsl-runner/{uuid.uuid4().hex[:12]}"
        try:
            proc = self._ssh(f"uname -m && command -v python3 >/dev/null && mkdir -p {session} && echo {session}")
        except subprocess.TimeoutExpired:
            raise RunnerError(f"cannot reach runner {self.name}: ssh timed out") from None
        except FileNotFoundError:
            raise RunnerError("the ssh client is not installed (Debian: openssh-client)") from None
        if proc.returncode != 0:
            raise RunnerError(f"cannot reach runner {self.name} (or it has no python3): {_first(proc.stderr)}")
        lines = proc.stdout.split()
        self.arch, self._dir = lines[0], lines[-1]
        self._scp([(path, name) for name, path in WORKER_FILES.items()])

    def _ship(self, path: str) -> str:
        p = Path(path)
        st = p.stat()
        key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if key not in self._shipped:
            digest = file_sha256(p)[:20]
            name = f"{digest}{''.join(p.suffixes[-1:])}"
            if name not in self._shipped.values() and name not in {n for _, n in self._pending}:
                self._pending.append((p, name))
            self._shipped[key] = name
        return self._shipped[key]

    def run(self, request: dict[str, Any], timeout: float) -> Outcome:
        self.connect()
        self._pending: list[tuple[Path, str]] = []
        entries = []
        for e in request["entries"]:
            e = dict(e)
            for field in ("so", "packed", "weight"):
                if e.get(field):
                    e[field] = self._ship(e[field])
            entries.append(e)
        try:
            self._scp(self._pending)
        except RunnerError as exc:
            failed = {n for _, n in self._pending}
            self._shipped = {k: v for k, v in self._shipped.items() if v not in failed}
            return Outcome("error", message=str(exc))
        remote = (f"cd {shlex.quote(self._dir)} && timeout -k 2 {max(1, int(timeout))} python3 measure.py; "
                  f"echo __ubp_rc=$? >&2")
        try:
            proc = self._ssh(remote, stdin=json.dumps(dict(request, entries=entries)), timeout=timeout + 30)
        except subprocess.TimeoutExpired:
            return Outcome("timeout", message=f"the runner {self.name} did not answer within {timeout + 30:.0f} s")
        m = _RC.search(proc.stderr)
        if m is None:
            return Outcome("error", message=f"ssh to {self.name} failed: {_first(proc.stderr)}")
        rc = int(m.group(1))
        if rc == 124:
            return Outcome("timeout", message=f"the kernel did not return within {timeout:.0f} s (on {self.name})")
        return classify_exit(-(rc - 128) if rc > 128 else rc, proc.stdout, proc.stderr)

    def close(self) -> None:
        if self._dir is not None:
            try:
                self._ssh(f"rm -rf {shlex.quote(self._dir)}", timeout=30)
            except (subprocess.TimeoutExpired, OSError):
                pass
            self._dir = None


def _first(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip() and "__ubp_rc" not in ln]
    return lines[-1][:300] if lines else "no output"
