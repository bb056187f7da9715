"""Pattern ids and pixel masks of a masks.npz, by layer: a compatibility view of :mod:`ubpdsl.masks`.

The pattern + pixel structure used to live in a ``schemes.npz`` sidecar beside masks.npz; it is
now part of masks.npz itself (format ``ubpdsl.masks/2``: a layer of kind ``pattern`` and an
optional ``pixel_keep`` per layer), and :mod:`ubpdsl.masks` owns the format, :class:`PatternMask`
and all validation. This module re-exports them for older imports and keeps :func:`load_schemes`,
which reads a masks.npz and returns the two per-layer maps the sidecar used to hold.
"""

from __future__ import annotations

import os

import numpy as np

from ubpdsl.masks import (
    MAX_PATTERNS,
    MAX_PIXELS,
    PATTERN_SIZE,
    PatternMask,
    load_masks,
    validate_pattern_library,
    validate_pixel_mask,
)

__all__ = [
    "MAX_PATTERNS",
    "MAX_PIXELS",
    "PATTERN_SIZE",
    "PatternMask",
    "load_schemes",
    "validate_pattern_library",
    "validate_pixel_mask",
]


def load_schemes(path: str | os.PathLike) -> tuple[dict[str, PatternMask], dict[str, np.ndarray]]:
    """``(pattern masks by layer, pixel masks by layer)`` of the masks.npz at ``path``, fully validated."""
    layers = load_masks(path)
    patterns = {name: lm.pattern for name, lm in layers.items() if lm.pattern is not None}
    pixels = {name: lm.pixel_keep for name, lm in layers.items() if lm.pixel_keep is not None}
    return patterns, pixels
