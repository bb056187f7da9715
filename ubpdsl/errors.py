"""Error types shared by every part of ubpdsl.

Every error a user can cause (bad masks.npz, invalid blocks, DSL mistakes, unsupported
targets, failing toolchain steps) is a subclass of :class:`UbpError`; the CLI prints it
as one line ``error: ...`` and exits non-zero, never with a traceback.
"""

from __future__ import annotations


class UbpError(Exception):
    """Base class of all user-facing ubpdsl errors."""


class MaskError(UbpError):
    """A masks.npz file or a block set is invalid (names the layer and block)."""


class PackError(UbpError):
    """A packed weight blob is malformed or inconsistent (names the field)."""


class DSLError(UbpError):
    """A kernel written in the DSL is invalid; the message starts with ``file:line:``."""


class TargetError(UbpError):
    """An unknown or unsupported compilation target."""


class BuildError(UbpError):
    """A toolchain step (MLIR lowering, opt, llc, lld, zig) failed."""


class RunError(UbpError):
    """Running a compiled kernel failed (non-zero return code, crash, qemu failure)."""


class UbpWarning(UserWarning):
    """Something was wrong but has been repaired (a damaged cache entry rebuilt); the CLI prints
    it as one line ``warning: ...``."""


def did_you_mean(word: str, choices: object) -> str:
    """``"; did you mean 'load'?"`` for the closest of ``choices`` to ``word`` (difflib), or ``""``.

    The one owner of "did you mean" suggestions (DSL names, ``ubl.*``, ``--const`` names).
    """
    import difflib

    names = sorted({str(c) for c in choices})  # type: ignore[attr-defined]
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    if not close:
        close = [c for c in names if c.lower() == word.lower()]
    return f"; did you mean {close[0]!r}?" if close else ""
