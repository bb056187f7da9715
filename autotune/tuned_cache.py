"""The tuned-config cache: re-tuning an unchanged layer is instant.

An entry maps a key over everything the best config depends on (the mask's block structure,
the GEMM shape and n, the target with its CPU name and features, the toolchain versions, the
compiler and kernel-library sources, where and how it was timed (runner; cold or warm caches),
the search-space version) to the best config found and its measurements. Entries are JSON files under
``<cache dir>/autotune/tuned/<key[:2]>/<key>.json``, written atomically (temp file + rename),
so an interrupted run never leaves a half-written entry.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ubpdsl.identity import atomic_write
from ubpdsl.runtime.cache import CompileCache, default_cache_dir

__all__ = ["SPACE_VERSION", "TunedCache", "tuned_key"]

#: Bumped whenever the search space or the objective changes meaning.
#: 2: the timing mode (``cache``: cold / warm) is part of the key, the YPREFETCH knob is searched,
#: PANEL=8 is a choice.
SPACE_VERSION = "ubpdsl.tune/2"


def tuned_key(**parts: Any) -> str:
    """sha256 over the canonical JSON of the key parts and the space version (as the compile cache keys)."""
    return CompileCache.key(**{"space": SPACE_VERSION, **parts})


class TunedCache:
    """Directory of best-config entries keyed by :func:`tuned_key`."""

    def __init__(self, root: Path | str | None = None) -> None:
        base = Path(root) if root is not None else default_cache_dir()
        self.root = base / "autotune" / "tuned"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def put(self, key: str, entry: dict[str, Any]) -> Path:
        """Write ``entry`` atomically (readers see the old entry or the new one, never half)."""
        final = self.path(key)
        atomic_write(final, json.dumps(entry, indent=2, sort_keys=True))
        return final
