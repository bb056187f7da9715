"""Layer names: which are accepted, and how one becomes a file name and a C symbol.

A layer name comes from a masks.npz, a model or a tune/export manifest and ends up in file names
(``<stem>.<target>.so``, ``<stem>.h``, ``<stem>.packed.bin``), in the kernel symbol ``ubp_<stem>``
and in the tab-separated ``kernels.tsv`` of a bundle. This module is the one owner of that rule:

* :func:`check_layer_name` refuses names that cannot be carried safely: empty, longer than
  :data:`MAX_NAME_CHARS`, starting with ``#`` (a comment in ``kernels.tsv``), or holding a control
  character (newline, tab, NUL, ...), ``/`` or ``\\``.
* :func:`file_stem` maps every character outside ``[A-Za-z0-9_]`` (dots, dashes, non-ASCII
  letters) to ``_``: ``features.1.conv`` -> ``features_1_conv``, ``schicht.ä`` -> ``schicht__``.
  The mapping is ASCII-only and the same everywhere (compile, tune, export, the compile cache).
* :func:`check_unique_stems` refuses a set of layers in which two names map to one stem
  (``a.b`` and ``a_b``): they would overwrite each other's files.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from ubpdsl.errors import MaskError

__all__ = ["MAX_NAME_CHARS", "check_layer_name", "check_unique_stems", "file_stem", "kernel_symbol"]

#: Longest accepted layer name: ``<stem>.aarch64-neon.so`` must stay under the 255-byte file name limit.
MAX_NAME_CHARS = 200

_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def check_layer_name(name: object) -> str:
    """Return ``name`` if it can be a layer name; :class:`MaskError` saying why not otherwise."""
    if not isinstance(name, str) or not name:
        raise MaskError(f"a layer name must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_CHARS:
        raise MaskError(f"layer name {name[:40]!r}... is {len(name)} characters long (limit {MAX_NAME_CHARS})")
    if name.startswith("#"):
        raise MaskError(f"layer name {name!r} starts with '#', which marks a comment in a bundle's kernels.tsv")
    for ch in name:
        if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") or ch in "/\\":
            raise MaskError(f"layer name {name!r} contains {ch!r}: control characters, line breaks, tabs, "
                            "'/' and '\\' are not allowed in layer names")
    return name


def file_stem(name: str) -> str:
    """The file-name / C-identifier form of a (valid) layer name: ``features.1.conv`` -> ``features_1_conv``."""
    return _UNSAFE.sub("_", check_layer_name(name))


def kernel_symbol(name: str) -> str:
    """The kernel's C symbol for layer ``name``: ``ubp_<file_stem(name)>``."""
    return "ubp_" + file_stem(name)


def check_unique_stems(names: Iterable[str]) -> dict[str, str]:
    """``{stem: name}`` for ``names``; :class:`MaskError` if two of them map to the same file stem."""
    seen: dict[str, str] = {}
    for name in names:
        stem = file_stem(name)
        if stem in seen and seen[stem] != name:
            raise MaskError(f"layers {seen[stem]!r} and {name!r} map to the same file name {stem!r}: "
                            "rename one of them (or select one with --layer)")
        seen[stem] = name
    return seen
