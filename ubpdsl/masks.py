"""The masks.npz file format ("ubpdsl.masks/1"): which Nx1 blocks of each layer are kept.

A masks file is a numpy ``.npz`` archive (a zip of ``.npy`` members) holding::

    format            str "ubpdsl.masks/1"
    <layer>.shape     int64[ndim]  original weight shape, e.g. [96, 16, 1, 1]
    <layer>.block     int64[2]     [N, 1]
    <layer>.rows      int32[B]     start row of each block (any row 0..R-N: unaligned)
    <layer>.cols      int32[B]     column of each block
    <layer>.weight    float32[R, C] pruned weights (optional)

The GEMM view of a weight is ``W[R, C]`` with ``R = shape[0]`` and ``C = prod(shape[1:])``.  Layer names
may contain dots (``features.1.conv.0.0``): a key is split on its *last* dot into layer name and field.
Blocks are stored sorted by ``(row, col)``.

Loading never unpickles (``allow_pickle=False``) and never allocates what a header merely claims: each
member's ``.npy`` header is read and checked (dtype, shape, size against the zip entry and against the
layer's declared shape) before its data is read.  Every problem is a :class:`~ubpdsl.errors.MaskError`
whose message names the file, the layer and, where relevant, the block.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ubpdsl.errors import MaskError
from ubpdsl.names import check_layer_name

__all__ = ["FORMAT", "LayerMask", "validate_blocks", "save_masks", "load_masks"]

FORMAT = "ubpdsl.masks/1"
FIELDS = ("shape", "block", "rows", "cols", "weight")
REQUIRED = ("shape", "block", "rows", "cols")
MAX_ELEMENTS = 2**31 - 1  # largest R*C accepted (int32 indexing)
MAX_NDIM = 8
MAX_BLOCK = 64  # tallest block (N) accepted: kernels keep N accumulators per block


# --------------------------------------------------------------------------------------------------
# Block validation
# --------------------------------------------------------------------------------------------------


def validate_blocks(rows, cols, R: int, C: int, N: int, layer: str = "?") -> None:
    """Check that N-row blocks ``(rows[i], cols[i])`` fit in ``[R, C]`` and never overlap.

    Raises :class:`MaskError` naming ``layer`` and the first offending block (its index in the given
    order, its row and column).
    """
    _check_block(N, R, layer)
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if rows.ndim != 1 or cols.ndim != 1:
        raise MaskError(f"layer {layer!r}: rows and cols must be 1-D, got shapes {rows.shape} and {cols.shape}")
    if len(rows) != len(cols):
        raise MaskError(f"layer {layer!r}: {len(rows)} rows but {len(cols)} cols")
    if len(rows) == 0:
        return
    for what, arr in (("rows", rows), ("cols", cols)):
        if arr.dtype.kind not in "iu":
            raise MaskError(f"layer {layer!r}: {what} must be integers, got dtype {arr.dtype}")
    r = rows.astype(np.int64)
    c = cols.astype(np.int64)
    bad = np.nonzero((r < 0) | (r > R - N) | (c < 0) | (c >= C))[0]
    if len(bad):
        i = int(bad[0])
        raise MaskError(
            f"layer {layer!r}: block {i} (row {r[i]}, col {c[i]}) is out of range for a {R}x{C} weight "
            f"with N={N} (rows 0..{R - N}, cols 0..{C - 1})"
        )
    order = np.lexsort((r, c))
    rs, cs = r[order], c[order]
    clash = np.nonzero((cs[1:] == cs[:-1]) & (rs[1:] < rs[:-1] + N))[0]
    if len(clash):
        k = int(clash[0])
        i, j = int(order[k]), int(order[k + 1])
        i, j = min(i, j), max(i, j)
        raise MaskError(
            f"layer {layer!r}: block {j} (row {r[j]}, col {c[j]}) overlaps block {i} "
            f"(row {r[i]}, col {c[i]}) with N={N}"
        )


# --------------------------------------------------------------------------------------------------
# LayerMask
# --------------------------------------------------------------------------------------------------


def _index_array(x, what: str, layer: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int32)
    if a.dtype.kind not in "iu":
        raise MaskError(f"layer {layer!r}: {what} must be integers, got dtype {a.dtype}")
    if a.ndim != 1:
        raise MaskError(f"layer {layer!r}: {what} must be 1-D, got shape {a.shape}")
    lo, hi = int(a.min()), int(a.max())
    if lo < -(2**31) or hi >= 2**31:
        raise MaskError(f"layer {layer!r}: {what} value {hi if hi >= 2**31 else lo} does not fit int32")
    return a.astype(np.int32)


def _check_block(N, R: int, layer: str) -> int:
    """``N`` as an int if it is a usable block height for a layer of ``R`` rows (1 <= N <= min(R, 64))."""
    if isinstance(N, bool) or not isinstance(N, int | np.integer) or not 1 <= N <= min(R, MAX_BLOCK):
        raise MaskError(f"layer {layer!r}: block size N must be an integer >= 1 and <= {min(R, MAX_BLOCK)} "
                        f"(at most the weight's {R} rows and at most {MAX_BLOCK}), got {N!r}")
    return int(N)


def _check_shape(shape, layer: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)
        if any(int(d) != d for d in shape):
            raise ValueError
    except (TypeError, ValueError):
        raise MaskError(f"layer {layer!r}: shape must be a sequence of integers, got {shape!r}") from None
    if not 1 <= len(dims) <= MAX_NDIM:
        raise MaskError(f"layer {layer!r}: shape must have 1..{MAX_NDIM} dimensions, got {dims}")
    if any(d < 1 for d in dims):
        raise MaskError(f"layer {layer!r}: shape dimensions must be >= 1, got {dims}")
    if math.prod(dims) > MAX_ELEMENTS:
        raise MaskError(f"layer {layer!r}: shape {dims} has {math.prod(dims)} elements (limit {MAX_ELEMENTS})")
    return dims


@dataclass
class LayerMask:
    """The kept blocks of one layer (and optionally its pruned weights).

    ``rows``/``cols`` are converted to ``int32``; ``weight`` (if given) to ``float32`` of shape
    ``[R, C]`` (a weight of the original ``shape`` is reshaped).  Call :meth:`validate` to check the
    blocks and the weights against each other.
    """

    name: str
    shape: tuple[int, ...]
    block: int
    rows: np.ndarray
    cols: np.ndarray
    weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        check_layer_name(self.name)
        self.shape = _check_shape(self.shape, self.name)
        self.block = _check_block(self.block, self.R, self.name)
        self.rows = _index_array(self.rows, "rows", self.name)
        self.cols = _index_array(self.cols, "cols", self.name)
        if self.weight is not None:
            w = self.weight
            if hasattr(w, "detach"):  # torch tensor
                w = w.detach().cpu().numpy()
            w = np.asarray(w)
            if w.dtype.kind != "f":
                raise MaskError(f"layer {self.name!r}: weight must be floating point, got dtype {w.dtype}")
            if w.shape == self.shape and w.shape != (self.R, self.C):
                w = w.reshape(self.R, self.C)
            if w.shape != (self.R, self.C):
                raise MaskError(
                    f"layer {self.name!r}: weight shape {w.shape} does not match the GEMM view "
                    f"({self.R}, {self.C}) of shape {self.shape}"
                )
            self.weight = np.array(w, dtype=np.float32, order="C")  # a private, writable copy

    @property
    def R(self) -> int:
        return self.shape[0]

    @property
    def C(self) -> int:
        return math.prod(self.shape[1:])

    @property
    def num_blocks(self) -> int:
        return len(self.rows)

    @property
    def nnz(self) -> int:
        return self.num_blocks * self.block

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / (self.R * self.C)

    def dense_mask(self) -> np.ndarray:
        """``bool[R, C]``, True on the weights covered by a kept block."""
        mask = np.zeros((self.R, self.C), dtype=bool)
        r = self.rows.astype(np.int64)
        c = self.cols.astype(np.int64)
        for n in range(self.block):
            mask[r + n, c] = True
        return mask

    def validate(self) -> None:
        """Raise :class:`MaskError` unless blocks are in range and disjoint and the weight agrees."""
        validate_blocks(self.rows, self.cols, self.R, self.C, self.block, self.name)
        if self.weight is not None:
            w = self.weight
            if not np.all(np.isfinite(w)):
                r, c = np.argwhere(~np.isfinite(w))[0]
                raise MaskError(f"layer {self.name!r}: weight[{r}, {c}] is not finite")
            outside = (w != 0) & ~self.dense_mask()
            if outside.any():
                r, c = np.argwhere(outside)[0]
                raise MaskError(
                    f"layer {self.name!r}: weight[{r}, {c}] = {float(w[r, c])!r} is nonzero but not in any kept "
                    f"block (weights and mask disagree)"
                )

    def sorted(self) -> LayerMask:
        """A copy with blocks sorted by ``(row, col)``."""
        order = np.lexsort((self.cols, self.rows))
        return LayerMask(self.name, self.shape, self.block, self.rows[order], self.cols[order], self.weight)

    def content_hash(self) -> str:
        """SHA-256 hex digest of shape, N, the sorted blocks and the weight bytes (if any).

        Independent of the block order and of the layer name.
        """
        s = self.sorted()
        h = hashlib.sha256()
        h.update(FORMAT.encode() + b"\0")
        h.update(np.asarray(self.shape, dtype="<i8").tobytes())
        h.update(np.asarray([self.block], dtype="<i8").tobytes())
        h.update(np.asarray([self.num_blocks], dtype="<i8").tobytes())
        h.update(s.rows.astype("<i4").tobytes())
        h.update(s.cols.astype("<i4").tobytes())
        if self.weight is None:
            h.update(b"-")
        else:
            h.update(b"W")
            h.update(self.weight.astype("<f4").tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------------


def _as_layer_list(layers: Mapping[str, LayerMask] | Iterable[LayerMask]) -> list[LayerMask]:
    if isinstance(layers, Mapping):
        out = []
        for key, lm in layers.items():
            if not isinstance(lm, LayerMask):
                raise MaskError(f"layer {key!r}: expected a LayerMask, got {type(lm).__name__}")
            if key != lm.name:
                raise MaskError(f"layer {lm.name!r} is stored under the different key {key!r}")
            out.append(lm)
        return out
    out = list(layers)
    for lm in out:
        if not isinstance(lm, LayerMask):
            raise MaskError(f"expected LayerMask objects, got {type(lm).__name__}")
    return out


def save_masks(path: str | os.PathLike, layers: Mapping[str, LayerMask] | Iterable[LayerMask]) -> None:
    """Validate ``layers`` and write them to ``path`` atomically (temp file in the same dir + rename)."""
    lst = _as_layer_list(layers)
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT)}
    seen: set[str] = set()
    for lm in lst:
        if lm.name in seen:
            raise MaskError(f"layer {lm.name!r} appears twice")
        seen.add(lm.name)
        lm.validate()
        s = lm.sorted()
        arrays[f"{lm.name}.shape"] = np.asarray(lm.shape, dtype=np.int64)
        arrays[f"{lm.name}.block"] = np.asarray([lm.block, 1], dtype=np.int64)
        arrays[f"{lm.name}.rows"] = s.rows.astype(np.int32)
        arrays[f"{lm.name}.cols"] = s.cols.astype(np.int32)
        if lm.weight is not None:
            arrays[f"{lm.name}.weight"] = lm.weight.astype(np.float32)
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------------------------------

_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError, RuntimeError,
               struct.error, OverflowError, TypeError, SyntaxError, KeyError, AttributeError)

#: Most uncompressed bytes one masks.npz may declare in total (env ``UBPDSL_MAX_MASK_BYTES`` raises it).
MAX_LOAD_BYTES = 1 << 30
#: A member larger than this whose compression ratio exceeds MAX_RATIO is refused as a deflate bomb (real
#: pruned weights compress far less: 99.9 % zeros compress about 360:1).
BOMB_MIN_BYTES = 64 << 20
MAX_RATIO = 600


def _max_load_bytes() -> int:
    try:
        return max(1, int(os.environ.get("UBPDSL_MAX_MASK_BYTES", MAX_LOAD_BYTES)))
    except ValueError:
        return MAX_LOAD_BYTES


def _check_sizes(zf: zipfile.ZipFile, path: Path) -> None:
    """Refuse encrypted members, unknown compression and declared sizes past the limits, before any read."""
    total, limit = 0, _max_load_bytes()
    for info in zf.infolist():
        if info.flag_bits & 0x1:
            raise MaskError(f"{path}: member {info.filename!r} is encrypted; masks.npz files are never encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise MaskError(f"{path}: member {info.filename!r} uses compression method {info.compress_type}; "
                            "masks.npz uses deflate (np.savez_compressed) or none")
        total += info.file_size
        if total > limit:
            raise MaskError(f"{path}: declares more than {limit} bytes of arrays (limit; set UBPDSL_MAX_MASK_BYTES "
                            "to load larger files)")
        if info.file_size > BOMB_MIN_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise MaskError(f"{path}: member {info.filename!r} inflates {info.compress_size} bytes to "
                            f"{info.file_size} (ratio > {MAX_RATIO}): a deflate bomb, not a masks file")


class _Member:
    """One ``.npy`` member of the archive, with its header already parsed (no data read yet)."""

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str):
        self.zf, self.info, self.where = zf, info, where
        try:
            with zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                elif version == (2, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                else:
                    raise MaskError(f"{where}: unsupported .npy version {version}")
                self.offset = f.tell()
        except MaskError:
            raise
        except _ZIP_ERRORS as e:
            raise MaskError(f"{where}: corrupt array ({e})") from None
        self.shape, self.fortran, self.dtype = shape, fortran, dtype
        if dtype.hasobject:
            raise MaskError(f"{where}: holds Python objects (pickled data); refusing to load it")
        self.count = math.prod(shape)
        self.nbytes = self.count * dtype.itemsize
        if self.nbytes != info.file_size - self.offset:
            raise MaskError(
                f"{where}: header claims {self.count} elements of {dtype} ({self.nbytes} bytes) but the "
                f"member holds {info.file_size - self.offset} bytes (corrupt or hostile file)"
            )

    def read(self) -> np.ndarray:
        """The array, read in bounded chunks into one buffer of the size the header declared."""
        out = np.empty(self.nbytes, np.uint8)
        got = 0
        try:
            with self.zf.open(self.info) as f:
                f.seek(self.offset)
                while got < self.nbytes:
                    chunk = f.read(min(1 << 22, self.nbytes - got))
                    if not chunk:
                        break
                    out[got:got + len(chunk)] = np.frombuffer(chunk, np.uint8)
                    got += len(chunk)
        except _ZIP_ERRORS as e:
            raise MaskError(f"{self.where}: corrupt array ({e})") from None
        if got != self.nbytes:
            raise MaskError(f"{self.where}: truncated data ({got} of {self.nbytes} bytes)")
        arr = out.view(self.dtype)
        return arr.reshape(self.shape, order="F" if self.fortran else "C")


def _split_key(key: str) -> tuple[str, str]:
    layer, dot, field = key.rpartition(".")
    if not dot or not layer:
        raise MaskError(f"unexpected key {key!r} (expected 'format' or '<layer>.<field>')")
    if field not in FIELDS:
        raise MaskError(f"layer {layer!r}: unknown field {field!r} in key {key!r} (expected one of {FIELDS})")
    return layer, field


def load_masks(path: str | os.PathLike) -> dict[str, LayerMask]:
    """Read and fully validate a masks.npz file; returns ``{layer name: LayerMask}`` in file order."""
    path = Path(path)
    if not path.exists():
        raise MaskError(f"{path}: no such masks file")
    if not path.is_file():
        raise MaskError(f"{path}: not a regular file")
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise MaskError(f"{path}: not a masks.npz file (not a valid zip/npz archive: {e})") from None
    with zf:
        _check_sizes(zf, path)
        try:
            return _load_from_zip(zf, path)
        except MemoryError:
            raise MaskError(f"{path}: not enough memory to load it") from None


def _load_from_zip(zf: zipfile.ZipFile, path: Path) -> dict[str, LayerMask]:
    members: dict[str, zipfile.ZipInfo] = {}
    for info in zf.infolist():
        name = info.filename
        if not name.endswith(".npy"):
            raise MaskError(f"{path}: member {name!r} is not a .npy array: not a masks.npz file")
        key = name[: -len(".npy")]
        if key in members:
            raise MaskError(f"{path}: key {key!r} appears twice")
        members[key] = info
    if "format" not in members:
        raise MaskError(f"{path}: missing 'format' key: not a ubpdsl masks file (expected {FORMAT!r})")
    fmt = _Member(zf, members.pop("format"), f"{path}: key 'format'")
    if fmt.dtype.kind not in "US" or fmt.count != 1 or fmt.nbytes > 4096:
        raise MaskError(f"{path}: 'format' must be one string, got {fmt.dtype} of shape {fmt.shape}")
    value = fmt.read().reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if value != FORMAT:
        raise MaskError(f"{path}: unsupported masks format {value!r} (this ubpdsl reads {FORMAT!r})")

    by_layer: dict[str, dict[str, zipfile.ZipInfo]] = {}
    for key, info in members.items():
        layer, field = _split_key(key)
        by_layer.setdefault(layer, {})[field] = info

    out: dict[str, LayerMask] = {}
    for layer, fields in by_layer.items():
        out[layer] = _load_layer(zf, path, layer, fields)
    return out


def _load_layer(zf: zipfile.ZipFile, path: Path, layer: str, fields: dict[str, zipfile.ZipInfo]) -> LayerMask:
    for f in REQUIRED:
        if f not in fields:
            raise MaskError(f"{path}: layer {layer!r}: missing key {layer + '.' + f!r}")
    m = {f: _Member(zf, info, f"{path}: layer {layer!r}: key {layer + '.' + f!r}") for f, info in fields.items()}

    def check(field: str, kinds: str, ndim: int, what: str) -> None:
        mem = m[field]
        if mem.dtype.kind not in kinds:
            raise MaskError(f"{mem.where}: {what}, got dtype {mem.dtype}")
        if len(mem.shape) != ndim:
            raise MaskError(f"{mem.where}: must have {ndim} dimension(s), got shape {mem.shape}")

    check("shape", "iu", 1, "shape must be integers")
    if not 1 <= m["shape"].count <= MAX_NDIM:
        raise MaskError(f"{m['shape'].where}: must have 1..{MAX_NDIM} entries, got {m['shape'].count}")
    shape = _check_shape(m["shape"].read().tolist(), layer)
    R, C = shape[0], math.prod(shape[1:])

    check("block", "iu", 1, "block must be integers [N, 1]")
    if m["block"].count != 2:
        raise MaskError(f"{m['block'].where}: must be [N, 1], got shape {m['block'].shape}")
    N, one = (int(x) for x in m["block"].read())
    if one != 1 or not 1 <= N <= min(R, MAX_BLOCK):
        raise MaskError(f"{path}: layer {layer!r}: block must be [N, 1] with N >= 1 and N <= {min(R, MAX_BLOCK)} "
                        f"(the weight's {R} rows, at most {MAX_BLOCK}), got [{N}, {one}]")

    max_blocks = (R // N) * C
    for f in ("rows", "cols"):
        check(f, "iu", 1, f"{f} must be integers")
        if m[f].count > max_blocks:
            raise MaskError(
                f"{m[f].where}: {m[f].count} blocks cannot fit in a {R}x{C} weight with N={N} (at most {max_blocks})"
            )
    if m["rows"].count != m["cols"].count:
        raise MaskError(f"{path}: layer {layer!r}: {m['rows'].count} rows but {m['cols'].count} cols")
    rows = m["rows"].read()
    cols = m["cols"].read()
    try:
        validate_blocks(rows, cols, R, C, N, layer)
    except MaskError as e:
        raise MaskError(f"{path}: {e}") from None

    weight = None
    if "weight" in m:
        check("weight", "f", 2, "weight must be floating point")
        if m["weight"].shape != (R, C):
            raise MaskError(
                f"{m['weight'].where}: weight shape {m['weight'].shape} does not match the GEMM view "
                f"({R}, {C}) of shape {shape}"
            )
        weight = m["weight"].read()
    lm = LayerMask(layer, shape, N, rows, cols, weight)
    try:
        lm.validate()
    except MaskError as e:
        raise MaskError(f"{path}: {e}") from None
    return lm
