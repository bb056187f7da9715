"""The identity of a layer and of files: the one place that hashes them.

* :func:`blocks_hash` -- the block structure only (shape, block height N, block rows and
  columns, in their order): what a tuned config and a data-driven build depend on. Stored in
  bundles as ``blocks_sha256`` and keys the autotuner's tuned-config cache.
* :func:`layer_hash` -- blocks **and** weights (independent of block order and layer name): what
  a baked kernel or a packed weight blob depends on. Stored in bundles as ``mask_sha256``
  (:meth:`ubpdsl.masks.LayerMask.content_hash`).
* :func:`bytes_sha256` / :func:`file_sha256` -- raw content digests.
* :func:`content_file` -- a content-addressed file in a work directory (its name is the sha256 of
  its bytes), so two different blobs can never share one file and a damaged file is rewritten.
* :func:`atomic_write` / :func:`atomic_copy` -- replace a file as a whole: readers (and processes
  that have it mapped, such as a loaded ``.so``) see the old file or the new one, never a mix.

Both layer hashes are persisted in manifests written by older versions: their definitions are
frozen (a change would make every stored bundle look stale).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["blocks_hash", "layer_hash", "weights_hash", "bytes_sha256", "file_sha256", "content_file", "atomic_write",
           "atomic_copy"]

#: First bytes hashed by :func:`layer_hash` (the masks.npz format it was defined with; frozen).
_LAYER_TAG = b"ubpdsl.masks/1\0"


def blocks_hash(M: int, K: int, N: int, rows: np.ndarray, cols: np.ndarray) -> str:
    """sha256 of a layer's block structure: GEMM shape [M, K], block height N, rows, cols."""
    h = hashlib.sha256(f"{int(M)},{int(K)},{int(N)}".encode())
    h.update(np.ascontiguousarray(rows, np.int64).tobytes())
    h.update(np.ascontiguousarray(cols, np.int64).tobytes())
    return h.hexdigest()


def layer_hash(shape: tuple[int, ...], N: int, rows: np.ndarray, cols: np.ndarray,
               weight: np.ndarray | None, *, pattern: tuple[np.ndarray, np.ndarray] | None = None,
               pixel_keep: np.ndarray | None = None) -> str:
    """sha256 of a layer's content: weight shape, N, the blocks sorted by (row, col), the weights.

    ``shape`` is the weight's own shape (a conv layer's 4-D shape, or [M, K]); ``weight`` None
    (a mask without weights) hashes differently from any weights. ``pattern`` (library, ids) and
    ``pixel_keep`` (masks format 2) are hashed after them; without both the digest is the frozen
    format-1 one.
    """
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    order = np.lexsort((cols, rows))
    h = hashlib.sha256(_LAYER_TAG)
    h.update(np.asarray(shape, dtype="<i8").tobytes())
    h.update(np.asarray([N], dtype="<i8").tobytes())
    h.update(np.asarray([len(rows)], dtype="<i8").tobytes())
    h.update(rows[order].astype("<i4").tobytes())
    h.update(cols[order].astype("<i4").tobytes())
    if weight is None:
        h.update(b"-")
    else:
        h.update(b"W")
        h.update(np.ascontiguousarray(weight).astype("<f4").tobytes())
    if pattern is not None:
        library, ids = (np.asarray(a) for a in pattern)
        h.update(b"P")
        h.update(np.asarray(library.shape, dtype="<i8").tobytes())
        h.update(library.astype(np.uint8).tobytes())
        h.update(ids.astype("<i2").tobytes())
    if pixel_keep is not None:
        keep = np.asarray(pixel_keep)
        h.update(b"X")
        h.update(np.asarray(keep.shape, dtype="<i8").tobytes())
        h.update(keep.astype(np.uint8).tobytes())
    return h.hexdigest()


def weights_hash(weight: np.ndarray | None) -> str | None:
    """sha256 of the float32 weight bytes alone (None without weights)."""
    if weight is None:
        return None
    return bytes_sha256(np.ascontiguousarray(weight, "<f4").tobytes())


def bytes_sha256(data: bytes | bytearray | memoryview | np.ndarray) -> str:
    """sha256 hex digest of a buffer (a numpy array: its bytes)."""
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data).tobytes()
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex digest of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_file(directory: str | os.PathLike[str], data: bytes | np.ndarray, suffix: str) -> Path:
    """``<directory>/<sha256 of data><suffix>``, written atomically unless an intact copy exists.

    Safe for concurrent writers (each writes its own temporary file, then renames).
    """
    raw = np.ascontiguousarray(data).tobytes() if isinstance(data, np.ndarray) else bytes(data)
    path = Path(directory) / f"{bytes_sha256(raw)}{suffix}"
    if path.is_file() and path.stat().st_size == len(raw) and file_sha256(path) == path.name[:64]:
        return path
    atomic_write(path, raw)
    return path


def atomic_write(path: str | os.PathLike[str], data: bytes | str) -> Path:
    """Write ``data`` (str: UTF-8) to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Copy ``src`` to ``dst`` with :func:`atomic_write` (never rewrites ``dst`` in place)."""
    return atomic_write(dst, Path(src).read_bytes())
