"""The kernel configuration: one type for the autotuner, ``export``, ``compile`` and the benchmarks.

A :class:`KernelConfig` names a kernel variant (from :mod:`ubpdsl.kernels`), its compile-time
constants, whether the mask is baked in, the vector width to plan for (None: the target's
own) and whether every access is bounds-checked at run time.
Its JSON form (:meth:`KernelConfig.to_json`) is what ``ubpdsl tune`` writes as
``tuned_config`` in its ``ubpdsl.tuned/1`` manifest and what ``ubpdsl export`` reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ubpdsl.errors import UbpError

if TYPE_CHECKING:
    from ubpdsl.language.core import KernelFunction
    from ubpdsl.runtime.targets import Target

__all__ = ["DEFAULT_VARIANT", "KernelConfig"]

#: The variant ``ubpdsl compile`` builds without options (and the tuner's reference).
DEFAULT_VARIANT = "wros"


@dataclass(frozen=True)
class KernelConfig:
    """How to build one layer's kernel.

    ``source`` says where the config came from (``"default"`` or the tuned manifest it was read
    from) and ``tuned_for`` the layer's (M, K, N) when it was tuned, so a stale tune output is
    caught; neither takes part in equality (equal configs compile to the same kernel).
    """

    variant: str = DEFAULT_VARIANT
    constants: Mapping[str, Any] = field(default_factory=dict)
    specialize: bool = False
    vector_bits: int | None = None  # None: the target's own width
    check_bounds: bool = False  # a bounds-checked build (``ubpdsl compile --check-bounds``)
    source: str = field(default="default", compare=False)
    tuned_for: tuple[int, int, int] | None = field(default=None, compare=False)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "default") -> KernelConfig:
        """From :meth:`to_json`'s form; a malformed one is a :class:`UbpError` naming ``source``."""
        if not isinstance(data, Mapping) or not isinstance(data.get("variant"), str):
            raise UbpError(f"{source}: a kernel config needs a 'variant' string, got {data!r}")
        consts = data.get("constants") or {}
        if not isinstance(consts, Mapping):
            raise UbpError(f"{source}: config constants must be an object, got {consts!r}")
        vb = data.get("vector_bits")
        if vb is not None and (not isinstance(vb, int) or isinstance(vb, bool) or vb <= 0 or vb % 128):
            raise UbpError(f"{source}: vector_bits must be a positive multiple of 128, got {vb!r}")
        return cls(data["variant"], dict(consts), bool(data.get("specialize", False)), vb,
                   bool(data.get("check_bounds", False)), source)

    def to_json(self) -> dict[str, Any]:
        out = {"variant": self.variant, "constants": dict(sorted(self.constants.items())),
               "specialize": self.specialize, "vector_bits": self.vector_bits}
        if self.check_bounds:  # only when set: the keys of unchecked configs stay what they were
            out["check_bounds"] = True
        return out

    def key(self) -> str:
        """Canonical text identifying the config (equal keys compile to the same kernel)."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        """``variant[K=V,...,baked,v256]``."""
        consts = ",".join(f"{k}={v}" for k, v in sorted(self.constants.items()))
        extra = ((",baked" if self.specialize else "") + (f",v{self.vector_bits}" if self.vector_bits else "")
                 + (",checked" if self.check_bounds else ""))
        return f"{self.variant}[{consts}{extra}]"

    @property
    def kernel(self) -> KernelFunction:
        """The variant's DSL kernel: shipped, or ``FILE.py:name`` (:class:`UbpError` for an unknown one)."""
        from ubpdsl.kernels import get_variant

        return get_variant(self.variant)

    def target_for(self, target: Target) -> Target:
        """``target`` narrowed to this config's vector width (:meth:`Target.narrowed`, the one rule)."""
        return target.narrowed(self.vector_bits)
