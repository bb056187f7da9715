"""Public objects of the kernel language: parameter types, the ``@kernel`` decorator, builtins.

The builtins are markers: calling one outside a kernel raises an error. The front end
(:mod:`ubpdsl.language.frontend`) recognises them by identity when it compiles a kernel body.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ubpdsl.errors import DSLError, did_you_mean


class _ParamKind:
    """Base of the annotation markers of kernel parameters."""


def _outside(what: str) -> DSLError:
    return DSLError(f"{what} can only be used inside a @ubl.kernel function (the body is compiled, not run)")


def _attr(name: str, doc: str) -> property:
    """A documented attribute of a kernel operand (read by the front end; raises if read in Python)."""

    def get(self: Any) -> Any:
        raise _outside(f"{type(self).__name__}.{name}")

    return property(get, doc=doc)


class Input(_ParamKind):
    """Dense activations X[K, n] (row-major, read only): ``X: ubl.Input``.

    In a kernel: ``X.n`` is the number of columns n (a run-time value, the ``n`` argument of the
    C function), ``X.rows`` is K (a compile-time int); tiles of X are read with
    ``ubl.load(X, row, j)`` and prefetched with ``ubl.prefetch(X, row, j)``.
    """

    n = _attr("n", "int (run time): the number of columns n of X and Y.")
    rows = _attr("rows", "int (compile time): the rows of the operand (K for X, M for Y).")


class Output(_ParamKind):
    """Dense result Y[M, n] (row-major): ``Y: ubl.Output``; a kernel must write every element.

    ``Y.rows`` is M and ``Y.n`` is n; tiles are written with ``ubl.store(Y, row, j, v)``. A body
    that also reads Y (``ubl.load(Y, ...)``) gets a masked tail (see :func:`tiles`).
    """

    n = _attr("n", "int (run time): the number of columns n of X and Y.")
    rows = _attr("rows", "int (compile time): the rows of the operand (K for X, M for Y).")


class BlockSparse(_ParamKind):
    """The block-sparse weight operand W[M, K]: ``W: ubl.BlockSparse``.

    W is made of N x 1 blocks (N = ``W.block`` rows, one column) that may start at any row. The
    blocks are sorted by their first row: ``W.row_blocks(r)`` is the range [lo, hi) of the blocks
    starting at row r; block b covers rows ``W.block_row(b) .. + N - 1`` of column
    ``W.block_col(b)`` with the weights ``W.weight(b, 0..N-1)``. Lane i of a block is row
    start + i (``layout="plain"``) or the row r of the block with r mod N == i
    (``layout="rotated"``). When the kernel is compiled mask-specialised, calls with
    compile-time arguments return compile-time constants.
    """

    rows = _attr("rows", "int (compile time): M, the output rows.")
    cols = _attr("cols", "int (compile time): K, the input rows (columns of W).")
    block = _attr("block", "int (compile time): N, the rows of one block.")
    lookahead = _attr("lookahead", "int (compile time): how far past the last block W.block_col(b) may look "
                                   "(the padding of the packed block columns; for prefetching ahead).")
    num_blocks = _attr("num_blocks", "int (compile time, mask-specialised kernels only): the number of blocks.")

    def row_blocks(self, r: int) -> tuple[int, int]:
        """``lo, hi = W.row_blocks(r)``: the blocks starting at row r are lo .. hi - 1 (0 <= r < M + N)."""
        raise _outside("W.row_blocks()")

    def block_row(self, b: int) -> int:
        """The first row of block b."""
        raise _outside("W.block_row()")

    def block_col(self, b: int) -> int:
        """The column (row of X) of block b; valid up to ``b + W.lookahead`` for prefetching."""
        raise _outside("W.block_col()")

    def weight(self, b: int, lane: int) -> float:
        """The weight of lane ``lane`` (0 .. N-1, a compile-time int) of block b (a scalar f32)."""
        raise _outside("W.weight()")


class PatternSparse(_ParamKind):
    """The pattern-sparse weight of a 3x3 convolution (PatDNN): ``W: ubl.PatternSparse``.

    Every kept kernel W[o, c] keeps 4 weights, the centre among them, at the taps of one of
    ``W.num_patterns`` library patterns; removed kernels are absent (connectivity pruning).
    Filters (output channels) are walked in grouped order f = 0 .. ``W.rows`` - 1: filters
    with the same pattern signature are neighbours, and ``W.filter_channel(f)`` is the output
    channel of filter f. ``lo, hi = W.pattern_kernels(f, p)`` are the kernels of filter f with
    pattern p; kernel k reads input channel ``W.kernel_channel(k)`` and keeps the weight
    ``W.tap_weight(k, t)`` at tap t (0..3) of its pattern. The library is compiled into the
    kernel (pattern-aware code generation): ``dy, dx = W.tap(p, t)`` are compile-time ints in
    -1..1 for compile-time p and t. The image is ``W.height`` x ``W.width`` (compile time; the
    kernel's n is their product): X is [Cin, H, W], Y is [Cout, H, W], stride 1, padding 1.
    """

    rows = _attr("rows", "int (compile time): Cout, the filters (output channels).")
    cols = _attr("cols", "int (compile time): Cin, the input channels.")
    height = _attr("height", "int (compile time): H, the image height.")
    width = _attr("width", "int (compile time): W, the image width (pixels per row).")
    num_patterns = _attr("num_patterns", "int (compile time): P, the patterns of the library.")
    taps = _attr("taps", "int (compile time): the weights each pattern keeps (4).")

    def filter_channel(self, f: int) -> int:
        """The output channel of the f-th filter of the grouped order."""
        raise _outside("W.filter_channel()")

    def pattern_kernels(self, f: int, p: int) -> tuple[int, int]:
        """``lo, hi = W.pattern_kernels(f, p)``: the kernels of filter f with pattern p (p compile-time)."""
        raise _outside("W.pattern_kernels()")

    def kernel_channel(self, k: int) -> int:
        """The input channel kernel k reads."""
        raise _outside("W.kernel_channel()")

    def tap_weight(self, k: int, t: int) -> float:
        """The weight of kernel k at tap t (0..3, a compile-time int) of its pattern (a scalar f32)."""
        raise _outside("W.tap_weight()")

    def tap(self, p: int, t: int) -> tuple[int, int]:
        """``dy, dx = W.tap(p, t)``: the offsets (-1..1) of tap t of pattern p (compile-time ints)."""
        raise _outside("W.tap()")


class constexpr(_ParamKind):  # noqa: N801 - named like Triton's tl.constexpr
    """A compile-time constant parameter: ``TILE: ubl.constexpr = 4``.

    Ints, floats, bools or strings; folded by the front end (``if TILE > 1:`` picks a branch at
    compile time). Set per build with ``constants={"TILE": 2}`` or ``--const TILE=2``; the tuner
    searches the values the kernel declares in ``@ubl.kernel(tune={...})``.
    """


class Tile(_ParamKind):
    """A tile over n, the loop variable of ``for j in ubl.tiles(X.n, TILE)`` (not a parameter type).

    It covers TILE vector registers of columns, starting at ``j.start``; ``j.width`` is its width in
    f32 lanes (a run-time value on SVE). Pass it to :func:`load`, :func:`store`, :func:`prefetch`
    and :func:`zeros`.
    """

    start = _attr("start", "index (run time): the first column of the tile.")
    width = _attr("width", "int or index: the number of columns (TILE x the vector lanes).")


#: Public members of the operand types, for "did you mean" on unknown attributes (front end).
OPERAND_ATTRS = {
    "Input": ("n", "rows"),
    "Output": ("n", "rows"),
    "BlockSparse": ("rows", "cols", "block", "lookahead", "num_blocks", "row_blocks", "block_row",
                    "block_col", "weight"),
    "PatternSparse": ("rows", "cols", "height", "width", "num_patterns", "taps", "filter_channel",
                      "pattern_kernels", "kernel_channel", "tap_weight", "tap"),
    "Tile": ("start", "width"),
}

_KINDS = {"Input": Input, "Output": Output, "BlockSparse": BlockSparse, "PatternSparse": PatternSparse,
          "constexpr": constexpr}

_F = TypeVar("_F", bound=Callable[..., Any])


def _builtin(fn: _F) -> _F:
    """Mark ``fn`` as a DSL builtin: the front end recognises it by ``__ubp_builtin__``."""
    fn.__ubp_builtin__ = fn.__name__  # type: ignore[attr-defined]
    return fn


@_builtin
def tiles(n: Any, tile: int, *, tail: str = "overlap", edges: bool = False) -> Iterator[Tile]:
    """``for j in ubl.tiles(X.n, TILE):`` walk the n columns in tiles of ``tile`` vector registers.

    ``tile`` must be a compile-time int >= 1. The tail (n not a multiple of the tile width) gives
    the same result on every target: if the loop body loads from the ``ubl.Output`` (a
    read-modify-write of Y), the tail always runs masked on the leftover columns; otherwise, with
    ``tail="overlap"`` (the default), it may rerun the body on the last whole tile ending at n
    (masked only when n is smaller than one tile). ``tail="mask"`` asks for the masked tail in
    any case. On x86-64 the tail is always masked (cheap masked loads and stores).

    ``edges=True`` (n a compile-time int: the pixels of an image row) walks the row as a left
    edge tile (start 0), whole interior tiles, and a right edge tile ending at n (overlapping,
    so the body must write its Y tile from registers); a row narrower than one tile is one
    masked tile that is both. The body is emitted once per kind, and :func:`load_pixels` knows
    at compile time which shifted loads would leave the row (it shifts a zero in instead).
    """
    raise _outside("ubl.tiles()")


@_builtin
def range(*bounds: int, unroll: int = 1, peel: int = 0) -> Iterator[int]:  # noqa: A001 - the DSL's range
    """``for b in ubl.range(lo, hi[, step], unroll=U):`` a loop in the generated code, unrolled U times.

    Like Python's ``range`` (``scf.for``), with an unrolled main loop of U copies and a
    remainder loop; U is a compile-time int in 1..``frontend.MAX_UNROLL``. Plain ``range()`` in a
    kernel is the same with U = 1. ``peel=E`` (compile-time bounds, step 1) emits the first and
    the last E iterations separately with a compile-time loop variable (image edges), and the
    front end knows the loop variable of the loop in between lies in [lo + E, hi - E) (so
    :func:`load_pixels` needs no row check there).
    """
    raise _outside("ubl.range()")


@_builtin
def static_range(*bounds: int) -> Iterator[int]:
    """``for i in ubl.static_range(lo, hi[, step]):`` unrolled fully by the front end.

    The bounds must be compile-time ints; the loop variable is a compile-time int in every copy
    (so ``acc[i]``, ``W.weight(b, i)`` work). At most ``frontend.MAX_STATIC_TRIPS`` iterations.
    """
    raise _outside("ubl.static_range()")


@_builtin
def zeros(*shape: Any) -> Any:
    """``ubl.zeros(j)``: a zero vector tile over tile j; ``ubl.zeros(R, j)``: a register tile of R of them.

    A register tile (R a compile-time int in 1..64) is indexed with compile-time ints:
    ``acc[p]`` reads row p, ``acc[p] = 0.0`` resets it; it lives in R x TILE vector registers.
    """
    raise _outside("ubl.zeros()")


@_builtin
def load(operand: Any, row: Any, tile: Tile) -> Any:
    """``x = ubl.load(X, row, j)``: the vector tile of ``operand`` (X or Y) at ``row``, columns of j.

    ``row`` is an int or an index value; a compile-time row outside the operand is a compile-time
    error, a run-time one is only checked in ``check_bounds`` builds.
    """
    raise _outside("ubl.load()")


@_builtin
def store(operand: Any, row: Any, tile: Tile, value: Any, *, streaming: bool = False,
          partial: bool = False) -> None:
    """``ubl.store(Y, row, j, v)``: write the vector tile v to the ``ubl.Output`` at ``row``, columns of j.

    A scalar ``value`` is broadcast. ``streaming=True`` (compile-time) writes full tiles with
    non-temporal (cache-bypassing) stores. A store is *final* by default: in the kernel's
    ``_ep`` entry point the epilogue (bias, residual, clamp) is applied to ``v`` on its way to
    Y. ``partial=True`` (compile-time) marks a partial sum that the kernel reads back later
    (stored as is; see :func:`finish`).
    """
    raise _outside("ubl.store()")


@_builtin
def finish(operand: Any, row: Any, tile: Tile) -> None:
    """``ubl.finish(Y, row, j)``: the tile of Y at ``row`` is complete: apply the epilogue in place.

    For kernels that accumulate in Y (``ubl.load(Y, ...)`` + ``ubl.store(..., partial=True)``):
    call it once per row and tile, after the row's last partial store. In the plain entry point
    it emits nothing; in ``_ep`` it loads the tile (still in L1), applies the epilogue and stores it.
    """
    raise _outside("ubl.finish()")


@_builtin
def prefetch(operand: Any, row: Any, tile: Tile, *, write: bool = False) -> None:
    """``ubl.prefetch(X, row, j)``: prefetch a tile of X (or of Y with ``write=True``, intent to write)."""
    raise _outside("ubl.prefetch()")


@_builtin
def fma(a: Any, b: Any, c: Any) -> Any:
    """``ubl.fma(a, b, c)`` = a * b + c, fused; scalars (``W.weight(b, i)``, numbers) are broadcast."""
    raise _outside("ubl.fma()")


@_builtin
def block_fma(W: BlockSparse, b: Any, x: Any, acc: Any) -> Any:
    """``acc = ubl.block_fma(W, b, x, acc)``: acc[i] += W.weight(b, i) * x for every lane i of block b.

    ``acc`` is a register tile of ``W.block`` rows (``ubl.zeros(W.block, j)``), ``x`` the X tile of
    the block's column (``ubl.load(X, W.block_col(b), j)``); returns the updated tile.
    """
    raise _outside("ubl.block_fma()")


@_builtin
def load_pixels(operand: Any, channel: Any, row: Any, tile: Tile, dx: int = 0) -> Any:
    """``ubl.load_pixels(X, c, r + dy, j, dx)``: the pixels of image row ``row`` of channel c,
    columns j shifted by dx (-1..1), zero outside the image (padding 1).

    For a kernel over a ``ubl.PatternSparse`` weight (X is [Cin, H, W]). A compile-time row
    outside the image gives the constant 0.0 (``ubl.fma`` then folds the FMA away); a row the
    front end cannot prove inside (not a peeled ``ubl.range`` variable +- its peel) is checked at
    run time. Columns that leave the row at an edge tile (``ubl.tiles(..., edges=True)``) are
    shifted in as zeros.
    """
    raise _outside("ubl.load_pixels()")


@_builtin
def store_pixels(operand: Any, channel: Any, row: Any, tile: Tile, value: Any) -> None:
    """``ubl.store_pixels(Y, o, r, j, v)``: write the pixels of image row r of output channel o."""
    raise _outside("ubl.store_pixels()")


#: Every builtin, by name (``ubl.*`` functions the front end compiles).
BUILTINS = ("tiles", "range", "static_range", "zeros", "load", "store", "finish", "prefetch", "fma",
            "block_fma", "load_pixels", "store_pixels")


@dataclass
class _ParsedFunction:
    """What the front end reads of a decorated function: its AST (with the file's line numbers)."""

    fn: Callable[..., Any]
    name: str
    tree: ast.FunctionDef
    filename: str
    first_line: int
    source: str


@dataclass
class KernelFunction(_ParsedFunction):
    """A parsed DSL kernel: its AST, parameters and compile-time defaults."""

    params: dict[str, type[_ParamKind]]
    defaults: dict[str, Any]
    layout: str = "rotated"
    aligned: bool = False
    needs_specialized: bool = False
    doc: str = ""
    globals: dict[str, Any] = field(default_factory=dict)
    tune: dict[str, list[Any]] = field(default_factory=dict)  # the kernel's own search space, by knob

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise DSLError(f"kernel {self.name!r} is compiled, not called: use ubpdsl.compile_kernel()")

    @property
    def pattern(self) -> bool:
        """True for a direct-convolution kernel over a ``ubl.PatternSparse`` weight."""
        return any(k is PatternSparse for k in self.params.values())

    @property
    def constexprs(self) -> list[str]:
        return [p for p, k in self.params.items() if k is constexpr]

    def resolve_constants(self, constants: dict[str, Any] | None) -> dict[str, Any]:
        """Defaults overridden by ``constants``; unknown or missing names are errors."""
        constants = dict(constants or {})
        unknown = sorted(set(constants) - set(self.constexprs))
        if unknown:
            raise DSLError(f"kernel {self.name!r} has no constexpr parameter(s) {', '.join(unknown)}"
                           f"{did_you_mean(unknown[0], self.constexprs)} (it takes "
                           f"{', '.join(self.constexprs) or 'none'})")
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


def _tune_space(tune: Mapping[str, Sequence[Any]] | None, params: dict[str, type[_ParamKind]],
                where: str) -> dict[str, list[Any]]:
    """Check a kernel's ``tune={...}`` space: constexpr names to non-empty lists of scalars."""
    out: dict[str, list[Any]] = {}
    names = [p for p, k in params.items() if k is constexpr]
    for knob, values in (tune or {}).items():
        if knob not in names:
            raise DSLError(f"{where}: tune= names {knob!r}, which is not a constexpr parameter"
                           f"{did_you_mean(str(knob), names)}")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise DSLError(f"{where}: tune[{knob!r}] must be a non-empty list of values, got {values!r}")
        if not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise DSLError(f"{where}: tune[{knob!r}] values must be ints, floats, bools or strings")
        out[knob] = list(dict.fromkeys(values))
    return out


def _parse(fn: Callable[..., Any], layout: str, aligned: bool, needs_specialized: bool,
           tune: Mapping[str, Sequence[Any]] | None = None) -> KernelFunction:
    fdef, source, filename, first = _read_source(fn, "kernel")
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
                           "ubl.Input, ubl.Output, ubl.BlockSparse, ubl.PatternSparse or ubl.constexpr")
        params[arg.arg] = kind
    for kinds, label in (((Input,), "ubl.Input"), ((Output,), "ubl.Output"),
                         ((BlockSparse, PatternSparse), "ubl.BlockSparse or ubl.PatternSparse")):
        count = sum(1 for k in params.values() if k in kinds)
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
                          globals=fn.__globals__, tune=_tune_space(tune, params, _where(filename, fdef.lineno)))


def kernel(fn: Callable[..., Any] | None = None, *, layout: str = "rotated", aligned: bool = False,
           specialized: bool = False, tune: Mapping[str, Sequence[Any]] | None = None) -> Any:
    """Declare a DSL kernel: ``@ubl.kernel`` or ``@ubl.kernel(layout=..., tune={...})``.

    ``layout`` is how block weights are stored: ``"plain"`` (lane i = row start + i) or
    ``"rotated"`` (lane i = the row r of the block with r mod N == i, so an output-stationary
    kernel's accumulators never move). ``aligned=True`` declares an ABP kernel (blocks must
    start at multiples of N). ``specialized=True`` declares a kernel that only compiles with
    the mask baked in (it unrolls over the block structure).

    ``tune`` is the kernel's search space, beside its code: ``{"TILE": [1, 2, 4], "UNROLL": [1, 2]}``
    maps constexpr parameters to the values ``ubpdsl tune`` tries (the others stay at their
    defaults). Example::

        @ubl.kernel(layout="plain", tune={"TILE": [1, 2, 4]})
        def my_kernel(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2):
            ...
    """

    def wrap(f: Callable[..., Any]) -> KernelFunction:
        return _parse(f, layout, aligned, specialized, tune)

    return wrap(fn) if fn is not None else wrap


@dataclass
class HelperFunction(_ParsedFunction):
    """A parsed ``@ubl.func`` helper: inlined by the front end wherever a kernel (or helper) calls it."""

    signature: inspect.Signature
    constexprs: frozenset[str] = frozenset()  # parameters annotated ubl.constexpr (compile-time only)
    doc: str = ""
    globals: dict[str, Any] = field(default_factory=dict)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _outside(f"helper {self.name}()")

    @property
    def where(self) -> str:
        return _where(self.filename, self.tree.lineno)


def _read_source(fn: Callable[..., Any], what: str) -> tuple[ast.FunctionDef, str, str, int]:
    """The AST (line numbers of the file), dedented source, file name and first line of ``fn``."""
    try:
        lines, first = inspect.getsourcelines(fn)
        filename = inspect.getsourcefile(fn) or f"<{what}>"
    except (OSError, TypeError) as exc:
        raise DSLError(f"cannot read the source of {what} {getattr(fn, '__name__', fn)!r}: {exc}") from None
    source = textwrap.dedent("".join(lines))
    tree = ast.parse(source)
    ast.increment_lineno(tree, first - 1)
    fdef = tree.body[0]
    if not isinstance(fdef, ast.FunctionDef):
        raise DSLError(f"{_where(filename, first)}: @{what} must decorate a plain function")
    return fdef, source, filename, first


def func(fn: Callable[..., Any]) -> HelperFunction:
    """Declare a helper that kernels (and other helpers) call: ``@ubl.func``, like a Triton
    ``@triton.jit`` function called from another.

    The front end inlines the helper at every call site, so the generated code is the same as
    if its body were written there. It runs in its own scope: it sees its arguments and its
    module's globals, not the caller's variables. Arguments are passed positionally or by
    keyword: SSA values, compile-time constants, operands (X, Y, W), tiles and register tiles;
    parameters annotated ``ubl.constexpr`` must receive compile-time constants, and defaults
    must be compile-time constants. A helper returns nothing, one value or a tuple
    (``return acc``, ``return lo, hi``); a ``return`` inside a generated loop or a run-time
    ``if`` is refused. Values are passed by value: a helper that updates a register tile
    returns it (``acc = add_rows(W, k, acc)``). Recursion is refused. Example::

        @ubl.func
        def row_sum(X, W, r, j, UNROLL: ubl.constexpr = 1):
            acc = ubl.zeros(j)
            lo, hi = W.row_blocks(r)
            for b in ubl.range(lo, hi, unroll=UNROLL):
                acc = ubl.fma(W.weight(b, 0), ubl.load(X, W.block_col(b), j), acc)
            return acc
    """
    if isinstance(fn, (HelperFunction, KernelFunction)) or not callable(fn):
        raise DSLError(f"@ubl.func must decorate a plain function, not {type(fn).__name__}")
    fdef, source, filename, first = _read_source(fn, "ubl.func")
    a = fdef.args
    if a.vararg or a.kwarg:
        raise DSLError(f"{_where(filename, fdef.lineno)}: helper {fdef.name!r}: *args and **kwargs are not supported")
    sig = inspect.signature(fn)
    consts = set()
    for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs]:
        ann = arg.annotation
        kind = ann.attr if isinstance(ann, ast.Attribute) else ann.id if isinstance(ann, ast.Name) else None
        if kind == "constexpr":
            consts.add(arg.arg)
    for p in sig.parameters.values():
        d = p.default
        if d is not inspect.Parameter.empty and d is not None and not isinstance(d, (bool, int, float, str)):
            raise DSLError(f"{_where(filename, fdef.lineno)}: helper {fdef.name!r}: the default of {p.name} must "
                           f"be a compile-time constant (int, float, bool, str), not {type(d).__name__}")
    return HelperFunction(fn=fn, name=fdef.name, tree=fdef, filename=filename, first_line=first, source=source,
                          signature=sig, constexprs=frozenset(consts), doc=inspect.getdoc(fn) or "",
                          globals=fn.__globals__)


def is_builtin(obj: Any, name: str | None = None) -> bool:
    tag = getattr(obj, "__ubp_builtin__", None)
    return tag is not None and (name is None or tag == name)


PY_RANGE = builtins.range
