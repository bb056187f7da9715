"""The ``schemes.npz`` sidecar ("ubpdsl.schemes/1"): pattern ids and pixel masks beside masks.npz.

masks.npz (:mod:`ubpdsl.masks`) holds N x 1 blocks and rejects keys it does not know, so the
structure of the other sparsity schemes goes to a second file that the masks loader never
opens. A pattern-pruned layer's kept weights are *also* written to masks.npz as N = 1 blocks,
so every existing consumer (``compile``, ``tune``, ``export``) already runs it; the sidecar
adds what a pattern kernel or an activation-sparse layer needs on top::

    format                     str "ubpdsl.schemes/1"
    <layer>.pattern_shape      int64[4]        weight shape [Cout, Cin, 3, 3]
    <layer>.pattern_library    uint8[P, 3, 3]  the P patterns (1 = kept), 4 ones each, centre set
    <layer>.pattern_ids        int16[Cout, Cin] pattern of each kernel; -1 = kernel removed
    <layer>.pixel_keep         uint8[Ho, Wo]   1 = output position computed, 0 = dropped

A layer may have pattern keys, a pixel mask, or both. Loading never unpickles, reads
each member through the masks loader's header check (dtype, shape, size) before its data, and
every problem is a one-line :class:`~ubpdsl.errors.MaskError` naming the file and the layer.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ubpdsl.errors import MaskError
from ubpdsl.masks import _ZIP_ERRORS, _Member

__all__ = [
    "FORMAT",
    "PatternMask",
    "load_schemes",
    "save_schemes",
    "validate_pattern_library",
    "validate_pixel_mask",
]

FORMAT = "ubpdsl.schemes/1"
PATTERN_SIZE = 4  # weights kept per 3x3 kernel, the centre included
MAX_PATTERNS = 56  # C(8, 3): every 4-weight 3x3 pattern with the centre
MAX_PIXELS = 1 << 24
_FIELDS = ("pattern_shape", "pattern_library", "pattern_ids", "pixel_keep")


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
    flat = lib.reshape(len(lib), 9)
    if len(np.unique(flat, axis=0)) != len(lib):
        raise MaskError(f"layer {layer!r}: the pattern library repeats a pattern")
    return lib


@dataclass
class PatternMask:
    """A pattern + connectivity pruned 3x3 conv: ``ids[o, i]`` indexes ``library`` (-1 = removed)."""

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

    @property
    def sparsity(self) -> float:
        return 1.0 - float(self.dense_mask().sum()) / float(np.prod(self.shape))


def validate_pixel_mask(keep, layer: str = "?") -> np.ndarray:
    """Check a pixel mask ``[Ho, Wo]`` of 0/1 entries with at least one kept position; returns bool."""
    k = np.asarray(keep)
    if k.dtype.kind not in "biu":
        raise MaskError(f"layer {layer!r}: pixel mask must be 0/1 integers, got dtype {k.dtype}")
    if k.ndim != 2 or min(k.shape) < 1 or k.size > MAX_PIXELS:
        raise MaskError(f"layer {layer!r}: pixel mask must be a non-empty [Ho, Wo] array, got shape {k.shape}")
    if ((k != 0) & (k != 1)).any():
        raise MaskError(f"layer {layer!r}: pixel mask entries must be 0 or 1")
    if not k.any():
        raise MaskError(f"layer {layer!r}: pixel mask keeps no output position")
    return k.astype(bool)


def save_schemes(
    path: str | os.PathLike,
    patterns: Mapping[str, PatternMask] | None = None,
    pixels: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Validate and write pattern masks and pixel masks to ``path`` atomically."""
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT)}
    for name, pm in (patterns or {}).items():
        if name != pm.name:
            raise MaskError(f"layer {pm.name!r} is stored under the different key {name!r}")
        pm.validate()
        arrays[f"{name}.pattern_shape"] = np.asarray(pm.shape, dtype=np.int64)
        arrays[f"{name}.pattern_library"] = pm.library.astype(np.uint8)
        arrays[f"{name}.pattern_ids"] = pm.ids.astype(np.int16)
    for name, keep in (pixels or {}).items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise MaskError(f"layer name must be a non-empty string, got {name!r}")
        arrays[f"{name}.pixel_keep"] = validate_pixel_mask(keep, name).astype(np.uint8)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str, kinds: str, ndim: int, max_items: int) -> np.ndarray:
    """One member, its header checked (by the masks loader's :class:`_Member`) before its data is read."""
    member = _Member(zf, info, where)
    if member.dtype.kind not in kinds:
        raise MaskError(f"{where}: unexpected dtype {member.dtype}")
    if len(member.shape) != ndim or member.count > max_items:
        raise MaskError(f"{where}: unexpected shape {member.shape}")
    return member.read()


def load_schemes(path: str | os.PathLike) -> tuple[dict[str, PatternMask], dict[str, np.ndarray]]:
    """Read a schemes.npz: ``(pattern masks by layer, pixel masks by layer)``, fully validated."""
    path = Path(path)
    if not path.is_file():
        raise MaskError(f"{path}: no such schemes file")
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise MaskError(f"{path}: not a schemes.npz file (not a valid zip/npz archive: {e})") from None
    with zf:
        members: dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy") or info.filename[:-4] in members:
                raise MaskError(f"{path}: unexpected member {info.filename!r}: not a schemes.npz file")
            members[info.filename[:-4]] = info
        if "format" not in members:
            raise MaskError(f"{path}: missing 'format' key (expected {FORMAT!r})")
        fmt = _read(zf, members.pop("format"), f"{path}: key 'format'", "US", 0, 1).reshape(()).item()
        if fmt != FORMAT:
            raise MaskError(f"{path}: unsupported schemes format {fmt!r} (this ubpdsl reads {FORMAT!r})")
        fields: dict[str, dict[str, zipfile.ZipInfo]] = {}
        for key, info in members.items():
            layer, dot, field = key.rpartition(".")
            if not dot or not layer or field not in _FIELDS:
                raise MaskError(f"{path}: unexpected key {key!r} (fields: {', '.join(_FIELDS)})")
            fields.setdefault(layer, {})[field] = info
        patterns: dict[str, PatternMask] = {}
        pixels: dict[str, np.ndarray] = {}
        for layer, f in fields.items():
            where = f"{path}: layer {layer!r}"
            pat = [k for k in ("pattern_shape", "pattern_library", "pattern_ids") if k in f]
            if pat and len(pat) != 3:
                raise MaskError(f"{where}: pattern keys need shape, library and ids together, got {pat}")
            try:
                if pat:
                    shape = _read(zf, f["pattern_shape"], where, "iu", 1, 4).tolist()
                    lib = _read(zf, f["pattern_library"], where, "biu", 3, 9 * MAX_PATTERNS)
                    ids = _read(zf, f["pattern_ids"], where, "iu", 2, MAX_PIXELS)
                    patterns[layer] = PatternMask(layer, tuple(shape), lib, ids)
                if "pixel_keep" in f:
                    pixels[layer] = validate_pixel_mask(_read(zf, f["pixel_keep"], where, "biu", 2, MAX_PIXELS), layer)
            except MaskError as e:
                msg = str(e)
                raise MaskError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    return patterns, pixels
