"""An on-disk compile cache (in the spirit of Triton's).

Each entry is a directory ``<root>/<key[:2]>/<key>`` holding the artifacts of one build
(``kernel.so``, ``kernel.o``, ``kernel.h``, a manifest ...). The key is a sha256 over a
canonical JSON of everything that determines the output: the caller passes toolchain
versions, the target's ``cache_key()``, the kernel source, constants, the mask hash.

Writes are atomic: an entry is assembled in a temporary directory on the same filesystem
and renamed into place. When two writers race for the same key, the first rename wins and
the loser's copy is discarded, so readers only ever see complete entries.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["CompileCache", "default_cache_dir", "canonical_json"]


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


class CompileCache:
    """Content-addressed directory cache of build artifacts.

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

    def get(self, key: str) -> Path | None:
        """The entry directory for ``key``, or None on a miss."""
        path = self.path(key)
        return path if path.is_dir() else None

    def put(self, key: str, files: Mapping[str, bytes | str | os.PathLike[str]]) -> Path:
        """Store ``files`` (name -> bytes, or a path to copy) under ``key``; return the entry.

        Atomic and safe against concurrent writers: if the entry appears meanwhile (another
        process won the race), the existing entry is kept and returned.
        """
        final = self.path(key)
        if final.is_dir():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        try:
            for name, content in files.items():
                if "/" in name or name in ("", ".", ".."):
                    raise ValueError(f"invalid cache file name {name!r}")
                dest = tmp / name
                if isinstance(content, bytes):
                    dest.write_bytes(content)
                else:
                    shutil.copyfile(os.fspath(content), dest)
                    shutil.copymode(os.fspath(content), dest)
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
