"""An on-disk compile cache (in the spirit of Triton's).

Each entry is a directory ``<root>/<key[:2]>/<key>`` holding the artifacts of one build
(``kernel.so``, ``kernel.o``, ``kernel.h``, a manifest ...). The key is a sha256 over a
canonical JSON of everything that determines the output: the caller passes toolchain
versions, the target's ``cache_key()``, the kernel source, constants, the mask hash.

Writes are atomic: an entry is assembled in a temporary directory on the same filesystem
and renamed into place. When two writers race for the same key, the first rename wins and
the loser's copy is discarded, so readers only ever see complete entries. Each entry lists
the sha256 and size of its files in ``entry.json``; :meth:`CompileCache.get` checks them on
every read, and a damaged entry (truncated, emptied or swapped file, missing file) is removed
with a :class:`CacheWarning` and rebuilt, never served.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

from ubpdsl.errors import UbpError, UbpWarning
from ubpdsl.identity import file_sha256

__all__ = ["CompileCache", "CacheError", "CacheWarning", "default_cache_dir", "canonical_json", "verify_entry"]

#: The file in each entry that records the sha256 and size of the others.
ENTRY_MANIFEST = "entry.json"
ENTRY_FORMAT = "ubpdsl.cache-entry/1"


class CacheWarning(UbpWarning):
    """A damaged cache entry was found and is being rebuilt."""


def default_cache_dir() -> Path:
    """``$UBPDSL_CACHE_DIR`` if set, else ``~/.cache/ubpdsl``."""
    env = os.environ.get("UBPDSL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ubpdsl"


def _jsonable(obj: object) -> object:
    if isinstance(obj, bytes):
        return {"__bytes_sha256__": hashlib.sha256(obj).hexdigest()}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(_jsonable(v) for v in obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    raise TypeError(f"cache key part of type {type(obj).__name__} is not JSON-serialisable")


def canonical_json(obj: object) -> str:
    """Deterministic JSON (sorted keys, no whitespace); bytes hash, numpy -> lists."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable, ensure_ascii=True)


class CacheError(UbpError):
    """The compile cache directory cannot be used (a regular file, or not writable)."""


class CompileCache:
    """Content-addressed directory cache of build artifacts, verified on every read.

    >>> cache = CompileCache()
    >>> key = cache.key(toolchain=toolchain_versions(), target=t.cache_key(), source=ir)
    >>> entry = cache.get(key) or cache.put(key, {"kernel.so": so_path, "meta.json": b"{}"})
    """

    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"CompileCache({str(self.root)!r})"

    @staticmethod
    def key(**parts: object) -> str:
        """sha256 hex digest of the canonical JSON of ``parts``."""
        return hashlib.sha256(canonical_json(parts).encode()).hexdigest()

    def path(self, key: str) -> Path:
        """Directory where the entry for ``key`` lives (whether or not it exists)."""
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"invalid cache key {key!r}")
        return self.root / key[:2] / key

    def _check_root(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise CacheError(f"compile cache {root} is not a directory; remove it or set UBPDSL_CACHE_DIR")
        probe = root
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
            raise CacheError(f"compile cache {root} is not writable ({probe} is not a writable directory); "
                             "set UBPDSL_CACHE_DIR to a writable directory")

    def get(self, key: str) -> Path | None:
        """The entry directory for ``key``, or None on a miss.

        Every file of the entry is checked against the sha256 recorded when it was stored; a
        damaged or incomplete entry is removed with a warning and reported as a miss.
        """
        self._check_root()
        path = self.path(key)
        if not path.is_dir():
            if path.exists() or path.is_symlink():
                self._discard(path, "is not a directory")
            return None
        problem = verify_entry(path)
        if problem is None:
            return path
        self._discard(path, problem)
        return None

    def _discard(self, path: Path, problem: str) -> None:
        warnings.warn(f"compile cache entry {path} {problem}; rebuilding it", CacheWarning, stacklevel=3)
        trash = path.with_name(f".bad-{path.name[:16]}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, trash)  # atomic: other readers never see a half-deleted entry
        except FileNotFoundError:
            return  # another process discarded it first
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)

    def put(self, key: str, files: Mapping[str, bytes | str | os.PathLike[str]]) -> Path:
        """Store ``files`` (name -> bytes, or a path to copy) under ``key``; return the entry.

        Atomic and safe against concurrent writers: if the entry appears meanwhile (another
        process won the race), the existing entry is kept and returned. The entry records the
        sha256 of every file in ``entry.json`` (written last), which :meth:`get` verifies.
        """
        hit = self.get(key)
        if hit is not None:
            return hit
        final = self.path(key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        except OSError as exc:
            raise CacheError(f"compile cache {self.root}: cannot create an entry: {exc.strerror or exc}") from None
        try:
            record = {}
            for name, content in files.items():
                if "/" in name or name in ("", ".", "..", ENTRY_MANIFEST):
                    raise ValueError(f"invalid cache file name {name!r}")
                dest = tmp / name
                if isinstance(content, bytes):
                    dest.write_bytes(content)
                else:
                    shutil.copyfile(os.fspath(content), dest)
                    shutil.copymode(os.fspath(content), dest)
                record[name] = {"sha256": file_sha256(dest), "size": dest.stat().st_size}
            (tmp / ENTRY_MANIFEST).write_text(json.dumps({"format": ENTRY_FORMAT, "key": key, "files": record},
                                                         indent=1, sort_keys=True))
            try:
                os.rename(tmp, final)  # atomic; fails if `final` exists and is non-empty
            except OSError:
                if not final.is_dir():
                    raise
                # lost the race: keep the winner's entry
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return final

    def clear(self) -> None:
        """Delete every entry."""
        shutil.rmtree(self.root, ignore_errors=True)


def verify_entry(path: Path) -> str | None:
    """None when every file listed in the entry's manifest is a regular file with its recorded
    size and sha256; else what is wrong (a short phrase)."""
    try:
        meta = json.loads((path / ENTRY_MANIFEST).read_text())
        files = meta["files"]
        if meta.get("format") != ENTRY_FORMAT or meta.get("key") != path.name or not isinstance(files, dict):
            return "has a manifest of another format or key"
    except FileNotFoundError:
        return f"has no {ENTRY_MANIFEST} (incomplete, or written by an older ubpdsl)"
    except (OSError, ValueError, KeyError, TypeError):
        return f"has an unreadable {ENTRY_MANIFEST}"
    for name, rec in files.items():
        f = path / name
        try:
            if "/" in name or f.is_symlink() or not f.is_file():
                return f"lacks its file {name}"
            if f.stat().st_size != rec["size"] or file_sha256(f) != rec["sha256"]:
                return f"has a damaged {name} (sha256 mismatch)"
        except (OSError, KeyError, TypeError):
            return f"has an unreadable {name}"
    return None
