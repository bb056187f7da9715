"""Public objects of the kernel language: parameter types, the ``@kernel`` decorator, builtins.

The builtins are markers: calling one outside a kernel raises an error. The front end
(:mod:`ubpdsl.language.frontend`) recognises them by identity when it compiles a kernel body.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ubpdsl.errors import DSLError


class _ParamKind:
    """Base of the annotation markers of kernel parameters."""


class Input(_ParamKind):
    """Dense activations X[K, n] (row-major, read only)."""


class Output(_ParamKind):
    """Dense result Y[M, n] (row-major); a kernel must write every element."""


class BlockSparse(_ParamKind):
    """The block-sparse weight operand W[M, K]: N x 1 blocks starting at any row."""


class constexpr(_ParamKind):  # noqa: N801 - named like Triton's tl.constexpr
    """A compile-time constant parameter (ints, floats, bools, strings)."""


_KINDS = {"Input": Input, "Output": Output, "BlockSparse": BlockSparse, "constexpr": constexpr}


def _builtin(name: str) -> Callable[..., Any]:
    def marker(*args: Any, **kwargs: Any) -> Any:
        raise DSLError(f"ubl.{name}() can only be used inside a @ubl.kernel function")

    marker.__name__ = name
    marker.__qualname__ = name
    marker.__ubp_builtin__ = name  # type: ignore[attr-defined]
    return marker


tiles = _builtin("tiles")
static_range = _builtin("static_range")
range = _builtin("range")  # noqa: A001 - the DSL's unrollable range
zeros = _builtin("zeros")
load = _builtin("load")
store = _builtin("store")
fma = _builtin("fma")
block_fma = _builtin("block_fma")
prefetch = _builtin("prefetch")


@dataclass
class KernelFunction:
    """A parsed DSL kernel: its AST, parameters and compile-time defaults."""

    fn: Callable[..., Any]
    name: str
    tree: ast.FunctionDef
    filename: str
    first_line: int
    source: str
    params: dict[str, type[_ParamKind]]
    defaults: dict[str, Any]
    layout: str = "rotated"
    aligned: bool = False
    needs_specialized: bool = False
    doc: str = ""
    globals: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DSLError(f"kernel {self.name!r} is compiled, not called: use ubpdsl.compile_kernel()")

    @property
    def constexprs(self) -> list[str]:
        return [p for p, k in self.params.items() if k is constexpr]

    def resolve_constants(self, constants: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``constants``; unknown or missing names are errors."""
        constants = dict(constants or {})
        unknown = sorted(set(constants) - set(self.constexprs))
        if unknown:
            raise DSLError(f"kernel {self.name!r} has no constexpr parameter(s) {', '.join(unknown)}; "
                           f"it takes {', '.join(self.constexprs) or 'none'}")
        out = {}
        for p in self.constexprs:
            if p in constants:
                out[p] = constants[p]
            elif p in self.defaults:
                out[p] = self.defaults[p]
            else:
                raise DSLError(f"kernel {self.name!r}: constexpr {p} has no default and no value was given")
        return out


def _where(filename: str, line: int) -> str:
    return f"{filename}:{line}"


def _parse(fn: Callable[..., Any], layout: str, aligned: bool, needs_specialized: bool) -> KernelFunction:
    try:
        lines, first = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or "<kernel>"
    except (OSError, TypeError) as exc:
        raise DSLError(f"cannot read the source of kernel {getattr(fn, '__name__', fn)!r}: {exc}") from None
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    ast.increment_lineno(tree, first - 1)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise DSLError(f"{_where(filename, first)}: @kernel must decorate a plain function")
    params: dict[str, type[_ParamKind]] = {}
    a = fdef.args
    if a.vararg or a.kwarg or a.posonlyargs or a.kwonlyargs:
        raise DSLError(f"{_where(filename, fdef.lineno)}: kernel parameters must be plain positional parameters")
    for arg in a.args:
        ann = arg.annotation
        kind = None
        if isinstance(ann, ast.Attribute):
            kind = _KINDS.get(ann.attr)
        elif isinstance(ann, ast.Name):
            kind = _KINDS.get(ann.id)
        if kind is None:
            raise DSLError(f"{_where(filename, arg.lineno)}: parameter {arg.arg!r} needs an annotation: "
                           "ubl.Input, ubl.Output, ubl.BlockSparse or ubl.constexpr")
        params[arg.arg] = kind
    for kind, label in ((Input, "ubl.Input"), (Output, "ubl.Output"), (BlockSparse, "ubl.BlockSparse")):
        count = sum(1 for k in params.values() if k is kind)
        if count != 1:
            raise DSLError(f"{_where(filename, fdef.lineno)}: kernel {fdef.name!r} needs exactly one {label} "
                           f"parameter, found {count}")
    sig = inspect.signature(fn)
    defaults = {p.name: p.default for p in sig.parameters.values() if p.default is not inspect.Parameter.empty}
    for name in defaults:
        if params[name] is not constexpr:
            raise DSLError(f"{_where(filename, fdef.lineno)}: only constexpr parameters may have defaults ({name})")
    if layout not in ("plain", "rotated"):
        raise DSLError(f"{_where(filename, fdef.lineno)}: layout must be 'plain' or 'rotated', not {layout!r}")
    return KernelFunction(fn=fn, name=fdef.name, tree=fdef, filename=filename, first_line=first,
                          source=source, params=params, defaults=defaults, layout=layout, aligned=aligned,
                          needs_specialized=needs_specialized, doc=inspect.getdoc(fn) or "",
                          globals=fn.__globals__)


def kernel(fn: Callable[..., Any] | None = None, *, layout: str = "rotated", aligned: bool = False,
           specialized: bool = False) -> Any:
    """Declare a DSL kernel.

    ``layout`` is how block weights are stored: ``"plain"`` (lane i = row start + i) or
    ``"rotated"`` (lane i = the row r of the block with r mod N == i, so an output-stationary
    kernel's accumulators never move). ``aligned=True`` declares an ABP kernel (blocks must
    start at multiples of N). ``specialized=True`` declares a kernel that only compiles with
    the mask baked in (it unrolls over the block structure).
    """

    def wrap(f: Callable[..., Any]) -> KernelFunction:
        return _parse(f, layout, aligned, specialized)

    return wrap(fn) if fn is not None else wrap


def is_builtin(obj: Any, name: str | None = None) -> bool:
    tag = getattr(obj, "__ubp_builtin__", None)
    return tag is not None and (name is None or tag == name)


PY_RANGE = builtins.range
