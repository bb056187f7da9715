"""The masks.npz file format ("ubpdsl.masks/2"): the kept weights of each layer, by layer kind.

A masks file is a numpy ``.npz`` archive (a zip of ``.npy`` members) holding::

    format                   str "ubpdsl.masks/2" ("ubpdsl.masks/1" files still load)
    <layer>.shape            int64[ndim]  original weight shape, e.g. [96, 16, 1, 1]
    <layer>.block            int64[2]     [N, 1]
    <layer>.rows             int32[B]     start row of each block (any row 0..R-N: unaligned)
    <layer>.cols             int32[B]     column of each block
    <layer>.weight           float32[R, C] pruned weights (optional)
    -- version 2 only:
    <layer>.kind             str "blocks" (the default when absent) or "pattern"
    <layer>.pattern_library  uint8[P, 3, 3]  kind pattern: the P patterns (4 ones each, centre set)
    <layer>.pattern_ids      int16[Cout, Cin] kind pattern: pattern of each 3x3 kernel, -1 = removed
    <layer>.pixel_keep       uint8[Ho, Wo]  optional, any kind: output positions computed (1) or
                                            dropped (0): semi-structured activation sparsity

The GEMM view of a weight is ``W[R, C]`` with ``R = shape[0]`` and ``C = prod(shape[1:])``.  Layer names
may contain dots (``features.1.conv.0.0``): a key is split on its *last* dot into layer name and field.
Blocks are stored sorted by ``(row, col)``.  A ``pattern`` layer (PatDNN pattern + connectivity pruning
of a ``[Cout, Cin, 3, 3]`` conv, :class:`PatternMask`) also stores its kept weights as N = 1 blocks,
which must be exactly the pattern's weights: every consumer that knows only blocks runs it unchanged.

Loading never unpickles (``allow_pickle=False``) and never allocates what a header merely claims: each
member's ``.npy`` header is read and checked (dtype, shape, size against the zip entry and against the
layer's declared shape) before its data is read.  Every problem is a :class:`~ubpdsl.errors.MaskError`
whose message names the file, the layer and, where relevant, the block.
"""

from __future__ import annotations

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
from ubpdsl.identity import layer_hash
from ubpdsl.names import check_layer_name

__all__ = ["FORMAT", "FORMATS", "KINDS", "LayerMask", "PatternMask", "validate_blocks", "validate_pattern_library",
           "validate_pixel_mask", "save_masks", "load_masks"]

FORMAT = "ubpdsl.masks/2"
FORMAT_V1 = "ubpdsl.masks/1"
FORMATS = (FORMAT_V1, FORMAT)
KINDS = ("blocks", "pattern")
FIELDS_V1 = ("shape", "block", "rows", "cols", "weight")
FIELDS = (*FIELDS_V1, "kind", "pattern_library", "pattern_ids", "pixel_keep")
REQUIRED = ("shape", "block", "rows", "cols")
PATTERN_SIZE = 4  # weights kept per 3x3 kernel, the centre included
MAX_PATTERNS = 56  # C(8, 3): every 4-weight 3x3 pattern with the centre
MAX_PIXELS = 1 << 24  # largest pixel mask (Ho * Wo)
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


def validate_pattern_library(library, layer: str = "?") -> np.ndarray:
    """Check a pattern library ``[P, 3, 3]`` of 0/1 entries: 4 ones per pattern, centre kept, no repeats.

    Returns it as ``bool[P, 3, 3]``; raises :class:`MaskError` naming the layer and pattern.
    """
    lib = np.asarray(library)
    if lib.dtype.kind not in "biu":
        raise MaskError(f"layer {layer!r}: pattern library must be 0/1 integers, got dtype {lib.dtype}")
    if lib.ndim != 3 or lib.shape[1:] != (3, 3):
        raise MaskError(f"layer {layer!r}: patterns must be 3x3 (library shape [P, 3, 3]), got {lib.shape}")
    if not 1 <= lib.shape[0] <= MAX_PATTERNS:
        raise MaskError(f"layer {layer!r}: a library holds 1..{MAX_PATTERNS} patterns, got {lib.shape[0]}")
    if ((lib != 0) & (lib != 1)).any():
        raise MaskError(f"layer {layer!r}: pattern entries must be 0 or 1")
    lib = lib.astype(bool)
    for p, pat in enumerate(lib):
        if int(pat.sum()) != PATTERN_SIZE:
            raise MaskError(
                f"layer {layer!r}: pattern {p} keeps {int(pat.sum())} weights (a pattern keeps {PATTERN_SIZE})"
            )
        if not pat[1, 1]:
            raise MaskError(f"layer {layer!r}: pattern {p} does not keep the kernel centre")
    if len(np.unique(lib.reshape(len(lib), 9), axis=0)) != len(lib):
        raise MaskError(f"layer {layer!r}: the pattern library repeats a pattern")
    return lib


def validate_pixel_mask(keep, layer: str = "?") -> np.ndarray:
    """Check a pixel mask ``[Ho, Wo]`` of 0/1 entries with at least one kept position; returns bool."""
    k = keep.detach().cpu().numpy() if hasattr(keep, "detach") else np.asarray(keep)
    if k.dtype.kind not in "biu":
        raise MaskError(f"layer {layer!r}: pixel mask must be 0/1 integers, got dtype {k.dtype}")
    if k.ndim != 2 or min(k.shape) < 1 or k.size > MAX_PIXELS:
        raise MaskError(f"layer {layer!r}: pixel mask must be a non-empty [Ho, Wo] array of at most {MAX_PIXELS} "
                        f"positions, got shape {k.shape}")
    if ((k != 0) & (k != 1)).any():
        raise MaskError(f"layer {layer!r}: pixel mask entries must be 0 or 1")
    if not k.any():
        raise MaskError(f"layer {layer!r}: pixel mask keeps no output position")
    return np.array(k, dtype=bool)


@dataclass
class PatternMask:
    """A pattern + connectivity pruned 3x3 conv: ``ids[o, i]`` indexes ``library`` (-1 = kernel removed).

    ``shape`` is the weight shape ``[Cout, Cin, 3, 3]``; ``library`` becomes ``bool[P, 3, 3]`` and
    ``ids`` ``int16[Cout, Cin]``. Construction validates (one-line :class:`MaskError`).
    """

    name: str
    shape: tuple[int, int, int, int]
    library: np.ndarray
    ids: np.ndarray

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`MaskError` unless shape, library and ids agree."""
        try:
            shape = tuple(int(s) for s in self.shape)
        except (TypeError, ValueError):
            raise MaskError(f"layer {self.name!r}: pattern shape must be integers, got {self.shape!r}") from None
        if len(shape) != 4 or shape[2:] != (3, 3) or min(shape) < 1:
            raise MaskError(f"layer {self.name!r}: pattern pruning needs 3x3 kernels [Cout, Cin, 3, 3], got {shape}")
        if math.prod(shape) > MAX_ELEMENTS:
            raise MaskError(f"layer {self.name!r}: shape {shape} has {math.prod(shape)} elements "
                            f"(limit {MAX_ELEMENTS})")
        self.shape = shape  # type: ignore[assignment]
        self.library = validate_pattern_library(self.library, self.name)
        ids = np.asarray(self.ids)
        if ids.dtype.kind not in "iu" or ids.shape != shape[:2]:
            raise MaskError(
                f"layer {self.name!r}: pattern ids must be integers of shape {shape[:2]}, got {ids.dtype} {ids.shape}"
            )
        bad = np.argwhere((ids < -1) | (ids >= len(self.library)))
        if len(bad):
            o, i = (int(v) for v in bad[0])
            raise MaskError(
                f"layer {self.name!r}: kernel ({o}, {i}) has pattern id {int(ids[o, i])} "
                f"(library has {len(self.library)}; -1 = removed)"
            )
        self.ids = ids.astype(np.int16)

    def dense_mask(self) -> np.ndarray:
        """``bool[Cout, Cin, 3, 3]``: True on the kept weights."""
        lib = np.concatenate([self.library, np.zeros((1, 3, 3), dtype=bool)])  # id -1 -> all zero
        return lib[self.ids.astype(np.int64)]

    def kept(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` of the kept weights in the GEMM view ``[Cout, Cin * 9]``, sorted by (row, col)."""
        o, i = np.nonzero(self.ids >= 0)
        pos = np.flatnonzero(self.library.reshape(len(self.library), 9).ravel()).reshape(-1, PATTERN_SIZE) % 9
        k = pos[self.ids[o, i].astype(np.int64)]  # [kept kernels, 4], ascending within a kernel
        rows = np.repeat(o, PATTERN_SIZE).astype(np.int64)
        cols = (i[:, None].astype(np.int64) * 9 + k).ravel()
        return rows, cols  # np.nonzero is row-major, so (o, i, k) order is (row, col) order

    @property
    def sparsity(self) -> float:
        return 1.0 - PATTERN_SIZE * int((self.ids >= 0).sum()) / float(math.prod(self.shape))


@dataclass
class LayerMask:
    """The kept blocks of one layer (and optionally its pruned weights, pattern and pixel mask).

    ``rows``/``cols`` are converted to ``int32``; ``weight`` (if given) to ``float32`` of shape
    ``[R, C]`` (a weight of the original ``shape`` is reshaped).  ``pattern`` makes the layer of kind
    ``"pattern"`` (its blocks must then be exactly the pattern's kept weights, N = 1: see
    :meth:`from_pattern`); ``pixel_keep`` (``bool[Ho, Wo]``) is the layer's static output-pixel mask.
    Call :meth:`validate` to check blocks, weights and pattern against each other.
    """

    name: str
    shape: tuple[int, ...]
    block: int
    rows: np.ndarray
    cols: np.ndarray
    weight: np.ndarray | None = None
    pattern: PatternMask | None = None
    pixel_keep: np.ndarray | None = None

    @classmethod
    def from_pattern(cls, pattern: PatternMask, weight=None, pixel_keep=None, name: str | None = None) -> LayerMask:
        """The ``pattern`` layer whose N = 1 blocks are ``pattern``'s kept weights."""
        rows, cols = pattern.kept()
        return cls(name or pattern.name, pattern.shape, 1, rows, cols, weight, pattern, pixel_keep)

    @classmethod
    def dense(cls, name: str, weight, block: int = 1, pixel_keep=None) -> LayerMask:
        """Every weight of ``weight`` kept, as aligned N x 1 blocks (N = ``block`` if it divides R, else 1)."""
        w = weight.detach().cpu().numpy() if hasattr(weight, "detach") else np.asarray(weight)
        shape = tuple(int(d) for d in w.shape)
        R, C = shape[0], math.prod(shape[1:])
        N = block if 1 <= block <= MAX_BLOCK and R % block == 0 else 1
        rows, cols = np.meshgrid(np.arange(0, R, N, dtype=np.int32), np.arange(C, dtype=np.int32), indexing="ij")
        return cls(name, shape, N, rows.ravel(), cols.ravel(), w, None, pixel_keep)

    @property
    def kind(self) -> str:
        """``"pattern"`` with a :class:`PatternMask`, else ``"blocks"``."""
        return "blocks" if self.pattern is None else "pattern"

    @property
    def kept_pixels(self) -> int | None:
        """Output positions computed per image (``None``: no pixel mask, all of them)."""
        return None if self.pixel_keep is None else int(self.pixel_keep.sum())

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
        if self.pattern is not None:
            if not isinstance(self.pattern, PatternMask):
                raise MaskError(f"layer {self.name!r}: pattern must be a PatternMask, "
                                f"got {type(self.pattern).__name__}")
            if tuple(self.pattern.shape) != self.shape:
                raise MaskError(f"layer {self.name!r}: pattern shape {tuple(self.pattern.shape)} is not the layer's "
                                f"weight shape {self.shape}")
        if self.pixel_keep is not None:
            self.pixel_keep = validate_pixel_mask(self.pixel_keep, self.name)

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
        """Raise :class:`MaskError` unless blocks are in range and disjoint, and weight and pattern agree."""
        validate_blocks(self.rows, self.cols, self.R, self.C, self.block, self.name)
        if self.pattern is not None:
            self.pattern.validate()
            if self.block != 1:
                raise MaskError(f"layer {self.name!r}: a pattern layer stores its kept weights as N = 1 blocks, "
                                f"got N={self.block}")
            pr, pc = self.pattern.kept()
            order = np.lexsort((self.cols, self.rows))
            br, bc = self.rows[order].astype(np.int64), self.cols[order].astype(np.int64)
            if len(pr) != len(br) or not (np.array_equal(pr, br) and np.array_equal(pc, bc)):
                diff = np.nonzero((pr[:len(br)] != br[:len(pr)]) | (pc[:len(br)] != bc[:len(pr)]))[0]
                k = int(diff[0]) if len(diff) else min(len(pr), len(br))
                where = (f"pattern keeps ({pr[k]}, {pc[k]})" if k < len(pr) else "pattern keeps no more") + ", " + (
                    f"blocks keep ({br[k]}, {bc[k]})" if k < len(br) else "blocks keep no more")
                raise MaskError(f"layer {self.name!r}: the blocks are not the pattern's kept weights "
                                f"({len(br)} blocks, pattern keeps {len(pr)}; first difference: {where})")
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
        return LayerMask(self.name, self.shape, self.block, self.rows[order], self.cols[order], self.weight,
                         self.pattern, self.pixel_keep)

    def content_hash(self) -> str:
        """SHA-256 hex digest of shape, N, the sorted blocks, the weight bytes (if any), pattern and pixel mask.

        Independent of the block order and of the layer name (:func:`ubpdsl.identity.layer_hash`); a
        ``blocks`` layer without pixel mask hashes as in format version 1.
        """
        pat = self.pattern
        return layer_hash(self.shape, self.block, self.rows, self.cols, self.weight,
                          pattern=None if pat is None else (pat.library, pat.ids), pixel_keep=self.pixel_keep)


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
        arrays[f"{lm.name}.kind"] = np.array(lm.kind)
        if lm.pattern is not None:
            arrays[f"{lm.name}.pattern_library"] = lm.pattern.library.astype(np.uint8)
            arrays[f"{lm.name}.pattern_ids"] = lm.pattern.ids.astype(np.int16)
        if lm.pixel_keep is not None:
            arrays[f"{lm.name}.pixel_keep"] = lm.pixel_keep.astype(np.uint8)
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


def _split_key(key: str, fields: tuple[str, ...], fmt: str) -> tuple[str, str]:
    layer, dot, field = key.rpartition(".")
    if not dot or not layer:
        raise MaskError(f"unexpected key {key!r} (expected 'format' or '<layer>.<field>')")
    if field not in fields:
        raise MaskError(f"layer {layer!r}: unknown field {field!r} in key {key!r} (format {fmt} has "
                        f"{', '.join(fields)})")
    return layer, field


def _read_string(member: _Member, what: str) -> str:
    """A one-string member (``format``, ``kind``): at most 4 KiB, never an object array."""
    if member.dtype.kind not in "US" or member.count != 1 or member.nbytes > 4096:
        raise MaskError(f"{member.where}: {what} must be one string, got {member.dtype} of shape {member.shape}")
    value = member.read().reshape(()).item()
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


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
    value = _read_string(_Member(zf, members.pop("format"), f"{path}: key 'format'"), "'format'")
    if value not in FORMATS:
        hint = (": a schemes.npz sidecar of an earlier ubpdsl; re-run `ubpdsl prune`, whose masks.npz now holds "
                "the pattern ids and pixel masks" if value == "ubpdsl.schemes/1" else "")
        raise MaskError(f"{path}: unsupported masks format {value[:80]!r} (this ubpdsl reads "
                        f"{', '.join(FORMATS)}){hint}")
    fields = FIELDS_V1 if value == FORMAT_V1 else FIELDS

    by_layer: dict[str, dict[str, zipfile.ZipInfo]] = {}
    for key, info in members.items():
        layer, field = _split_key(key, fields, value)
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

    kind = _read_string(m["kind"], "kind") if "kind" in m else "blocks"
    if kind not in KINDS:
        raise MaskError(f"{m['kind'].where}: unknown layer kind {kind[:80]!r} (this ubpdsl knows "
                        f"{', '.join(KINDS)})")
    pat_keys = [f for f in ("pattern_library", "pattern_ids") if f in m]
    pattern = None
    if kind != "pattern" and pat_keys:
        raise MaskError(f"{path}: layer {layer!r}: key {layer + '.' + pat_keys[0]!r} belongs to kind 'pattern', "
                        f"but the layer is of kind {kind!r}")
    if kind == "pattern":
        if len(pat_keys) != 2:
            raise MaskError(f"{path}: layer {layer!r}: kind 'pattern' needs keys {layer + '.pattern_library'!r} and "
                            f"{layer + '.pattern_ids'!r}")
        check("pattern_library", "biu", 3, "pattern library must be 0/1 integers")
        if m["pattern_library"].count > 9 * MAX_PATTERNS:
            raise MaskError(f"{m['pattern_library'].where}: at most {MAX_PATTERNS} 3x3 patterns, got shape "
                            f"{m['pattern_library'].shape}")
        check("pattern_ids", "iu", 2, "pattern ids must be integers")
        if len(shape) != 4 or m["pattern_ids"].shape != shape[:2]:
            raise MaskError(f"{m['pattern_ids'].where}: pattern ids must have shape [Cout, Cin] of a "
                            f"[Cout, Cin, 3, 3] weight, got {m['pattern_ids'].shape} for weight shape {shape}")
        try:
            pattern = PatternMask(layer, shape, m["pattern_library"].read(), m["pattern_ids"].read())
        except MaskError as e:
            raise MaskError(f"{path}: {e}") from None
    keep = None
    if "pixel_keep" in m:
        check("pixel_keep", "biu", 2, "pixel mask must be 0/1 integers")
        if m["pixel_keep"].count > MAX_PIXELS:
            raise MaskError(f"{m['pixel_keep'].where}: pixel mask of shape {m['pixel_keep'].shape} has more than "
                            f"{MAX_PIXELS} positions")
        keep = m["pixel_keep"].read()
    try:
        lm = LayerMask(layer, shape, N, rows, cols, weight, pattern, keep)
        lm.validate()
    except MaskError as e:
        raise MaskError(f"{path}: {e}") from None
    return lm
