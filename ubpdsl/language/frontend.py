"""The DSL front end: a kernel's Python AST -> a ``ubp`` dialect MLIR module.

Like Triton's code generator, this walks the AST of a decorated function and emits IR for
it, instead of running it. Compile-time values (ints, floats, bools, constexprs, the shape of
W and, for mask-specialised kernels, W's block structure) are folded in Python; everything
else becomes SSA values. Loops and data-dependent ``if``s carry the variables they assign
as ``scf.for`` iter_args / ``scf.if`` results, so accumulators live in registers.

The generated function has the fixed C ABI of every ubp kernel::

    int32_t SYMBOL(const float *x, float *y, int64_t n, const void *packed_w)

returning one of the codes of :mod:`ubpdsl.abi` (0 on success; n < 0, a NULL, mismatching or
inconsistent packed blob and, in a ``check_bounds`` build, an out-of-bounds access are errors).
Errors in the kernel source raise :class:`DSLError` with ``file:line: message``.
"""

from __future__ import annotations

import ast
import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
from mlir import ir
from mlir.dialects import arith, func, memref, scf, vector

from ubpdsl import abi
from ubpdsl.dialects import ubp as ubp_dialect
from ubpdsl.errors import DSLError, did_you_mean
from ubpdsl.language.core import (
    OPERAND_ATTRS,
    PY_RANGE,
    BlockSparse,
    HelperFunction,
    Input,
    KernelFunction,
    Output,
    PatternSparse,
    constexpr,
    is_builtin,
)
from ubpdsl.packing import COL_PAD, BlockData

#: Most iterations one ``ubl.static_range`` loop may unroll to.
MAX_STATIC_TRIPS = 1 << 16
#: Largest ``unroll=`` factor of ``ubl.range``.
MAX_UNROLL = 256
#: Most kernel statements one compilation may emit (unrolled copies counted): a bound on
#: compile time and code size, checked as the statements are emitted.
MAX_STATEMENTS = 1 << 18
#: Largest ubl.tiles tile, in vector registers (a machine has 16 or 32; more only spills).
MAX_TILE_REGISTERS = 64


@dataclass(frozen=True)
class VectorShape:
    """How wide one vector register is on the target (lanes of f32; scalable for SVE)."""

    lanes: int
    scalable: bool = False
    cheap_masks: bool = False  # masked loads/stores cost about what plain ones do (AVX-512, AVX2)


@dataclass(frozen=True)
class PatternSpec:
    """What a direct-convolution (pattern) kernel is specialised on: the image and the library."""

    height: int
    width: int
    library: np.ndarray  # int32[P, T]: kept taps (3 * ky + kx) of each pattern

    @property
    def num_patterns(self) -> int:
        return int(self.library.shape[0])

    @property
    def taps(self) -> int:
        return int(self.library.shape[1])


@dataclass
class KernelSpec:
    """Everything a kernel is specialised on at compile time."""

    symbol: str
    M: int
    K: int
    N: int
    vector: VectorShape
    constants: dict[str, Any]
    baked: BlockData | None = None  # mask-specialised: the block structure as constants
    check_bounds: bool = False  # every access checked at run time (abi.ERR_OUT_OF_BOUNDS)
    pattern: PatternSpec | None = None  # a direct 3x3 convolution over a ubl.PatternSparse weight


# ---------------------------------------------------------------------------------------------
# Front-end values that are not plain SSA values


@dataclass
class Dense:
    """A dense operand (X or Y): a memref<rows x ? x f32>."""

    memref: ir.Value
    rows: int
    name: str
    output: bool


@dataclass
class Weights:
    """The block-sparse operand: an SSA handle, plus the constants when mask-specialised."""

    handle: ir.Value
    M: int
    K: int
    N: int
    baked: BlockData | None


@dataclass
class PWeights:
    """The pattern-sparse operand of a direct 3x3 convolution: an SSA handle and its compile-time shape."""

    handle: ir.Value
    M: int
    K: int
    spec: PatternSpec


@dataclass
class Tile:
    """A tile over n: columns [start, start + width), masked at ``limit`` in the tail.

    ``left``/``right``: the tile starts at column 0 / ends at the row's last column (the edge
    tiles of ``ubl.tiles(..., edges=True)``), known at compile time.
    """

    start: ir.Value
    limit: ir.Value | None
    vec_type: ir.VectorType
    width: int | ir.Value
    left: bool = False
    right: bool = False


@dataclass
class Epilogue:
    """The epilogue of a ``_ep`` entry point, read once at entry (``ubp.epilogue_view``)."""

    bias: ir.Value  # memref<M x f32> (zeros when the caller passed none)
    residual: ir.Value  # memref<M x ? x f32> (only read when has_residual)
    has_residual: ir.Value  # i1
    lo: ir.Value  # f32 (-inf when not clamping)
    hi: ir.Value  # f32 (+inf when not clamping)


@dataclass
class RegTile:
    """N vector values used together (N accumulator rows): a register tile."""

    values: list[ir.Value]


def _node_line(node: ast.AST) -> int:
    return getattr(node, "lineno", 0)


@dataclass
class _Inlined:
    """A ``@ubl.func`` helper being inlined: the helper, its call site and the generated-region depth there."""

    helper: HelperFunction
    site: str  # file:line of the call
    depth: int  # CodeGen._dynamic at the call ('return' is only allowed at this depth)


class _Return(Exception):  # noqa: N818 - control flow, not an error
    """A helper's ``return`` (compile-time control flow: unwinds to the inlined call)."""

    def __init__(self, value: Any):
        super().__init__()
        self.value = value


class CodeGen:
    """Emits the ubp module of one kernel for one specialisation."""

    def __init__(self, kernel: KernelFunction, spec: KernelSpec, epilogue: bool = False):
        self.k = kernel
        self.spec = spec
        self.epilogue = epilogue  # emit the ``_ep`` entry point (abi.C_EP_SIGNATURE)
        self._ep: Epilogue | None = None
        self._user_output_loads = 0  # ubl.load(Y, ...) in the source (not finish)
        self._partial_stores = 0
        self._finishes = 0
        self.env: dict[str, Any] = {}
        self.index = ir.IndexType.get()
        self.f32 = ir.F32Type.get()
        self.i1 = ir.IntegerType.get_signless(1)
        self._node: ast.AST | None = None
        self._statements = 0  # emitted so far (MAX_STATEMENTS)
        self._output_loads = 0  # ubl.load calls on the Output emitted so far (tail rule of ubl.tiles)
        self._oob_flag: ir.Value | None = None  # check_bounds: memref<1xi32> holding the status
        self._ranges: dict[ir.Value, tuple[int, int]] = {}  # index values known to lie in [lo, hi)
        self._pw: PWeights | None = None  # the pattern-sparse operand (direct-convolution kernels)
        # Where names and errors come from: the kernel, or the @ubl.func helper being inlined.
        self._file = kernel.filename
        self._globals: dict[str, Any] = kernel.globals
        self._inline: list[_Inlined] = []  # the helpers being inlined, outermost first
        self._dynamic = 0  # generated loops and run-time ifs around the current statement

    # -- errors -------------------------------------------------------------------------------
    def error(self, msg: str, node: ast.AST | None = None) -> DSLError:
        where = node or self._node
        if where is not None:
            line = _node_line(where)
        else:
            line = self._inline[-1].helper.tree.lineno if self._inline else self.k.first_line
        if self._inline:
            calls = (f"helper {i.helper.name!r} called at {i.site}" for i in reversed(self._inline))
            msg += f" (in {', '.join(calls)})"
        return DSLError(f"{self._file}:{line}: {msg}")

    # -- module -------------------------------------------------------------------------------
    @property
    def epilogue_refusal(self) -> str | None:
        """Why this kernel cannot have a ``_ep`` entry point (None: it can), known after :meth:`build`.

        A kernel that reads Y back but marks no store ``partial=True`` and finishes no row
        accumulates in Y with final stores: the epilogue would be applied more than once.
        """
        if self._user_output_loads and not (self._partial_stores or self._finishes):
            return (f"kernel {self.k.name!r} reads Y back (ubl.load of the Output) but marks no store "
                    "partial=True and calls no ubl.finish, so an epilogue would apply at every store of a "
                    "partial sum; mark them (docs/dsl.md, Epilogues)")
        return None

    def build(self, module: ir.Module | None = None) -> ir.Module:
        """Emit the kernel's function (the ``_ep`` one when ``epilogue``) into ``module`` (new if None)."""
        spec = self.spec
        module = module or ir.Module.create()
        ptr = ir.Type.parse("!llvm.ptr")
        i32 = ir.IntegerType.get_signless(32)
        i64 = ir.IntegerType.get_signless(64)
        params = [ptr, ptr, i64, ptr] + ([ptr] if self.epilogue else [])
        symbol = abi.ep_symbol(spec.symbol) if self.epilogue else spec.symbol
        with ir.InsertionPoint(module.body):
            fn = func.FuncOp(symbol, ir.FunctionType.get(params, [i32]))
            fn.attributes["ubp.kernel"] = ir.StringAttr.get(self.k.name)
            # C ABI contract: y does not overlap x or packed_w, so loads of the block metadata
            # may be reused across stores to y (noalias on every pointer argument).
            noalias = ir.DictAttr.get({"llvm.noalias": ir.UnitAttr.get()})
            fn.arg_attrs = ir.ArrayAttr.get([noalias, noalias, ir.DictAttr.get({}), noalias]
                                            + ([noalias] if self.epilogue else []))
            entry = fn.add_entry_block()
        with ir.InsertionPoint(entry):
            xp, yp, n64, wp = list(entry.arguments)[:4]
            n = arith.index_cast(self.index, n64)
            dyn = ir.ShapedType.get_dynamic_size()
            X = ubp_dialect.op("dense_view", [xp, n], [ir.MemRefType.get([spec.K, dyn], self.f32)],
                               {"rows": _i64(spec.K)}).result
            Y = ubp_dialect.op("dense_view", [yp, n], [ir.MemRefType.get([spec.M, dyn], self.f32)],
                               {"rows": _i64(spec.M)}).result
            wty = ubp_dialect.weights_type(spec.N)
            common = {"rows": _i64(spec.M), "cols": _i64(spec.K), "block": _i64(spec.N),
                      "layout": ir.StringAttr.get(self.k.layout)}
            if spec.pattern is not None:
                ps = spec.pattern
                W = ubp_dialect.op("pattern_weights", [wp], [ubp_dialect.patterns_type(ps.num_patterns)],
                                   {"rows": _i64(spec.M), "cols": _i64(spec.K), "height": _i64(ps.height),
                                    "width": _i64(ps.width),
                                    "library": ir.DenseElementsAttr.get(
                                        np.ascontiguousarray(ps.library, np.int32).reshape(-1))}).result
                w_code = ubp_dialect.op("check_patterns", [W, n], [i32]).result
            elif spec.baked is None:
                W = ubp_dialect.op("sparse_weights", [wp], [wty], common).result
            else:
                b = spec.baked
                attrs = dict(common)
                for key, arr in (("row_ptr", b.row_ptr), ("block_rows", b.block_rows),
                                 ("block_cols", b.block_cols), ("values", b.values)):
                    attrs[key] = ir.DenseElementsAttr.get(np.ascontiguousarray(arr))
                W = ubp_dialect.op("baked_weights", [], [wty], attrs).result
            if spec.pattern is None:
                w_code = ubp_dialect.op("check_weights", [W], [i32]).result
            n_ok = arith.cmpi(arith.CmpIPredicate.sge, n64, arith.constant(i64, 0))
            code = arith.select(n_ok, w_code, arith.constant(i32, abi.ERR_BAD_N))
            if self.epilogue:
                f32 = self.f32
                view = ubp_dialect.op("epilogue_view", [entry.arguments[4], n],
                                      [i32, ir.MemRefType.get([spec.M], f32), ir.MemRefType.get([spec.M, dyn], f32),
                                       self.i1, f32, f32], {"rows": _i64(spec.M)})
                ep_code, bias, residual, has_res, lo, hi = view.results
                self._ep = Epilogue(bias, residual, has_res, lo, hi)
                is_ok = arith.cmpi(arith.CmpIPredicate.eq, code, arith.constant(i32, abi.OK))
                code = arith.select(is_ok, ep_code, code)
            run = arith.cmpi(arith.CmpIPredicate.eq, code, arith.constant(i32, abi.OK))
            if spec.check_bounds:
                # The status of the body: a stack slot that a failed check sets to ERR_OUT_OF_BOUNDS
                # (the access itself is skipped); the kernel returns it once the body has run.
                self._oob_flag = memref.alloca(ir.MemRefType.get([1], i32), [], [])
                memref.store(arith.constant(i32, abi.OK), self._oob_flag, [self.const_index(0)])
            if_op = scf.IfOp(run)
            with ir.InsertionPoint(if_op.then_block):
                self._bind_params(X, Y, W, n)
                self.visit_body(self.k.tree.body, top=True)
                scf.YieldOp([])
            if self._oob_flag is not None:
                code = arith.select(run, memref.load(self._oob_flag, [self.const_index(0)]), code)
            func.ReturnOp([code])
        return module

    def _bind_params(self, X: ir.Value, Y: ir.Value, W: ir.Value, n: ir.Value) -> None:
        spec = self.spec
        self.n = n
        for name, kind in self.k.params.items():
            if kind is Input:
                self.env[name] = Dense(X, spec.K, name, False)
            elif kind is Output:
                self.env[name] = Dense(Y, spec.M, name, True)
            elif kind is BlockSparse:
                self.env[name] = Weights(W, spec.M, spec.K, spec.N, spec.baked)
            elif kind is PatternSparse:
                if spec.pattern is None:
                    raise self.error("a ubl.PatternSparse kernel needs a pattern layer (PatternProblem)")
                self._pw = PWeights(W, spec.M, spec.K, spec.pattern)
                self.env[name] = self._pw
            elif kind is constexpr:
                self.env[name] = spec.constants[name]

    # -- statements ---------------------------------------------------------------------------
    def visit_body(self, stmts: list[ast.stmt], top: bool = False) -> None:
        for i, st in enumerate(stmts):
            if isinstance(st, ast.Return) and not self._inline:
                if st.value is not None:
                    raise self.error("a kernel returns nothing (its C function returns the status)", st)
                if not (top and i == len(stmts) - 1):
                    raise self.error("'return' is only allowed as the last statement of the kernel", st)
                continue
            self.visit_stmt(st)

    def visit_stmt(self, st: ast.stmt) -> None:
        self._node = st
        self._statements += 1
        if self._statements > MAX_STATEMENTS:
            raise self.error(f"the kernel unrolls to more than {MAX_STATEMENTS} statements (static_range, "
                             "unroll= or a baked mask too large): unroll less", st)
        if isinstance(st, ast.Expr):
            if isinstance(st.value, ast.Constant) and isinstance(st.value.value, str):
                return  # docstring
            self.expr(st.value)
        elif isinstance(st, ast.Assign):
            value = self.expr(st.value)
            for target in st.targets:
                self.assign(target, value)
        elif isinstance(st, ast.AugAssign):
            cur = self.expr(_load(st.target))
            self.assign(st.target, self.binop(st.op, cur, self.expr(st.value), st))
        elif isinstance(st, ast.AnnAssign) and st.value is not None:
            self.assign(st.target, self.expr(st.value))
        elif isinstance(st, ast.For):
            self.visit_for(st)
        elif isinstance(st, ast.If):
            self.visit_if(st)
        elif isinstance(st, ast.Pass):
            pass
        elif isinstance(st, ast.Return):  # in a helper (visit_body handles the kernel's own)
            if self._dynamic != self._inline[-1].depth:
                raise self.error("'return' inside a generated loop or a run-time if is not supported in a "
                                 "helper: assign the result and return it after the loop", st)
            raise _Return(None if st.value is None else self.expr(st.value))
        else:
            raise self.error(f"unsupported statement in a kernel: {type(st).__name__}", st)

    def assign(self, target: ast.expr, value: Any) -> None:
        if isinstance(target, ast.Name):
            self.env[target.id] = value
        elif isinstance(target, ast.Tuple):
            if not isinstance(value, tuple) or len(value) != len(target.elts):
                raise self.error(f"cannot unpack into {len(target.elts)} names", target)
            for t, v in zip(target.elts, value, strict=True):
                self.assign(t, v)
        elif isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
            tile = self.env.get(target.value.id)
            if not isinstance(tile, RegTile):
                raise self.error("only register tiles (ubl.zeros(N, j)) support item assignment", target)
            i = self._static_int(self.expr(target.slice), target, "a register tile index")
            if not 0 <= i < len(tile.values):
                raise self.error(f"register tile index {i} out of range 0..{len(tile.values) - 1}", target)
            vals = list(tile.values)
            vals[i] = self.coerce(value, vals[i].type, target)
            self.env[target.value.id] = RegTile(vals)
        else:
            raise self.error("unsupported assignment target", target)

    # -- loops --------------------------------------------------------------------------------
    def visit_for(self, st: ast.For) -> None:
        if st.orelse:
            raise self.error("for/else is not supported", st)
        it = st.iter
        if not isinstance(it, ast.Call):
            raise self.error("a kernel loop must iterate over range(), ubl.range(), ubl.static_range() "
                             "or ubl.tiles()", st)
        fn = self.expr(it.func)
        args = [self.expr(a) for a in it.args]
        kwargs = {kw.arg: self.expr(kw.value) for kw in it.keywords}
        if is_builtin(fn, "static_range"):
            self.loop_static(st, args, kwargs)
            return
        self._dynamic += 1
        try:
            self.loop_dynamic(st, fn, args, kwargs)
        finally:
            self._dynamic -= 1

    def loop_static(self, st: ast.For, args: list[Any], kwargs: dict[str, Any]) -> None:
        """``for i in ubl.static_range(...)``: the body once per value, the loop variable a constant."""
        it = st.iter
        bounds = self._range_args(args, kwargs, it, allow_unroll=False)
        lo, hi, step = (self._static_int(b, it, "ubl.static_range bounds") for b in bounds[:3])
        if step == 0:
            raise self.error("ubl.static_range step must not be 0", it)
        trips = len(PY_RANGE(lo, hi, step))
        if trips > MAX_STATIC_TRIPS:
            raise self.error(f"ubl.static_range unrolls {trips} iterations, more than {MAX_STATIC_TRIPS}: "
                             "use range() for a loop in the generated code", it)
        for v in PY_RANGE(lo, hi, step):
            self.assign(st.target, v)
            self.visit_body(st.body)

    def loop_dynamic(self, st: ast.For, fn: Any, args: list[Any], kwargs: dict[str, Any]) -> None:
        """A loop in the generated code: ``ubl.tiles``, ``range`` or ``ubl.range``."""
        it = st.iter
        if is_builtin(fn, "tiles"):
            self.loop_tiles(st, args, kwargs)
        elif fn is PY_RANGE or is_builtin(fn, "range"):
            peel = kwargs.pop("peel", 0) if is_builtin(fn, "range") else 0
            lo, hi, step, unroll = self._range_args(args, kwargs, it, allow_unroll=is_builtin(fn, "range"))
            unroll = self._static_int(unroll, it, "unroll")
            if not 1 <= unroll <= MAX_UNROLL:
                raise self.error(f"unroll must be in 1..{MAX_UNROLL}, got {unroll}", it)
            peel = self._static_int(peel, it, "peel")
            if peel:
                self.loop_peeled(st, lo, hi, step, unroll, peel, it)
            else:
                self.loop_range(st, lo, hi, step, unroll)
        else:
            raise self.error("a kernel loop must iterate over range(), ubl.range(), ubl.static_range() "
                             "or ubl.tiles()", st)

    def _range_args(self, args: list[Any], kwargs: dict[str, Any], node: ast.AST,
                    allow_unroll: bool) -> tuple[Any, Any, Any, Any]:
        unroll = kwargs.pop("unroll", 1)
        if unroll != 1 and not allow_unroll:
            raise self.error("unroll= is only accepted by ubl.range()", node)
        if kwargs:
            raise self.error(f"unexpected keyword(s) {', '.join(kwargs)}", node)
        if len(args) == 1:
            return 0, args[0], 1, unroll
        if len(args) == 2:
            return args[0], args[1], 1, unroll
        if len(args) == 3:
            return args[0], args[1], args[2], unroll
        raise self.error("range takes 1 to 3 arguments", node)

    def _carried(self, body: list[ast.stmt]) -> list[str]:
        names = []
        for name in sorted(_assigned_names(body)):
            if name in self.env:
                v = self.env[name]
                if isinstance(v, (ir.Value, RegTile)) or (isinstance(v, (int, float)) and not isinstance(v, bool)):
                    names.append(name)
                elif isinstance(v, (Dense, Weights, PWeights, Tile)):
                    raise self.error(f"cannot reassign {name!r} (a kernel operand or tile) inside a loop or if")
        return names

    def _flatten(self, names: list[str]) -> list[ir.Value]:
        flat = []
        for name in names:
            v = self.env[name]
            if isinstance(v, RegTile):
                flat.extend(v.values)
            else:
                flat.append(self.materialize(v))
        return flat

    def _unflatten(self, names: list[str], values: list[ir.Value], like: dict[str, Any]) -> None:
        pos = 0
        for name in names:
            proto = like[name]
            if isinstance(proto, RegTile):
                k = len(proto.values)
                self.env[name] = RegTile(list(values[pos:pos + k]))
                pos += k
            else:
                self.env[name] = values[pos]
                pos += 1

    def _yield_values(self, names: list[str], types: list[ir.Type], node: ast.AST) -> list[ir.Value]:
        out: list[tuple[str, Any]] = []
        for name in names:
            v = self.env.get(name)
            if isinstance(v, RegTile):
                out.extend((name, x) for x in v.values)
            else:
                out.append((name, v))
        if len(out) != len(types):
            raise self.error("a variable carried by a loop/if changed its kind (register tile vs value)", node)
        values = []
        for (name, v), t in zip(out, types, strict=True):
            try:
                values.append(self.coerce(v, t, node))
            except DSLError:
                got = v.type if isinstance(v, ir.Value) else _describe(v)
                raise self.error(f"type mismatch: {name!r} is {t} before the loop/if but {got} inside it",
                                 node) from None
        return values

    def emit_for(self, lo: ir.Value, hi: ir.Value, step: ir.Value, names: list[str], node: ast.AST,
                 body_fn) -> None:  # noqa: ANN001
        """An scf.for carrying ``names``; ``body_fn(iv)`` emits the body."""
        init = self._flatten(names)
        like = {n: self.env[n] for n in names}
        loop = scf.ForOp(lo, hi, step, init)
        with ir.InsertionPoint(loop.body):
            self._unflatten(names, list(loop.inner_iter_args), like)
            body_fn(loop.induction_variable)
            scf.YieldOp(self._yield_values(names, [v.type for v in init], node))
        self._unflatten(names, list(loop.results), like)

    def loop_range(self, st: ast.For, lo: Any, hi: Any, step: Any, unroll: int) -> None:
        if not isinstance(step, int) or step <= 0:
            raise self.error("range step must be a positive compile-time integer", st)
        names = self._carried(st.body)
        scope = set(self.env)
        lo_v, hi_v = self.materialize(lo, self.index), self.materialize(hi, self.index)

        known = getattr(self, "_pending_range", None)  # set by loop_peeled for its middle loop
        self._pending_range = None

        def body(iv: ir.Value, copies: int) -> None:
            for u in PY_RANGE(copies):
                v = iv if u == 0 else arith.addi(iv, self.const_index(u * step))
                if known is not None:  # every copy stays inside the loop's bounds
                    self._ranges[v] = known
                self.assign(st.target, v)
                self.visit_body(st.body)

        if unroll == 1:
            self.emit_for(lo_v, hi_v, self.const_index(step), names, st, lambda iv: body(iv, 1))
        else:
            span = unroll * step
            trips = arith.floordivsi(arith.subi(hi_v, lo_v), self.const_index(span))
            trips = arith.maxsi(trips, self.const_index(0))
            mid = arith.addi(lo_v, arith.muli(trips, self.const_index(span)))
            self.emit_for(lo_v, mid, self.const_index(span), names, st, lambda iv: body(iv, unroll))
            self.emit_for(mid, hi_v, self.const_index(step), names, st, lambda iv: body(iv, 1))
        self._drop_new(scope, names)

    def loop_peeled(self, st: ast.For, lo: Any, hi: Any, step: Any, unroll: int, peel: int, node: ast.AST) -> None:
        """``ubl.range(lo, hi, peel=E)``: the first and last E iterations with a compile-time
        loop variable, the ones in between as a loop whose variable is known to lie in
        [lo + E, hi - E) (``load_pixels`` proves rows inside the image from it)."""
        if not (isinstance(lo, int) and isinstance(hi, int) and isinstance(step, int)) or step < 1:
            raise self.error("ubl.range(..., peel=E) needs compile-time bounds and a positive step", node)
        if not 0 <= peel <= MAX_STATIC_TRIPS:
            raise self.error(f"peel must be in 0..{MAX_STATIC_TRIPS}, got {peel}", node)
        values = PY_RANGE(lo, hi, step)
        head = list(values[:peel])
        mid = values[peel: max(peel, len(values) - peel)]
        tail = list(values[max(peel, len(values) - peel):])
        for v in head:
            self.assign(st.target, v)
            self.visit_body(st.body)
        if len(mid):
            self._pending_range = (mid[0], mid[-1] + 1)  # every value the loop variable takes
            self.loop_range(st, mid[0], mid[-1] + 1, step, unroll)
        for v in tail:
            self.assign(st.target, v)
            self.visit_body(st.body)

    def _drop_new(self, scope: set[str], keep: list[str]) -> None:
        for name in list(self.env):
            if name not in scope and name not in keep:
                del self.env[name]

    def loop_tiles(self, st: ast.For, args: list[Any], kwargs: dict[str, Any]) -> None:
        if set(kwargs) - {"tail", "edges"} or len(args) != 2:
            raise self.error("ubl.tiles(n, TILE, tail=..., edges=...) takes the extent and the tile size in vector "
                             "registers", st)
        n, tile = args
        edges = kwargs.get("edges", False)
        if not isinstance(edges, bool):
            raise self.error("ubl.tiles: edges= must be a compile-time bool", st)
        if edges:
            self.loop_edge_tiles(st, n, tile)
            return
        tail_mode = kwargs.get("tail", "overlap")
        if tail_mode not in ("overlap", "mask"):
            raise self.error(f"ubl.tiles: tail= must be 'overlap' or 'mask', got {tail_mode!r}", st)
        tile = self._static_int(tile, st, "the tile size of ubl.tiles")
        if not 1 <= tile <= MAX_TILE_REGISTERS:
            raise self.error(f"the tile size must be 1..{MAX_TILE_REGISTERS} vector registers, got {tile}", st)
        vs = self.spec.vector
        if vs.scalable and tile & (tile - 1):
            raise self.error(f"the tile size must be a power of two on a scalable-vector target, got {tile}", st)
        width = tile * vs.lanes
        vec_type = self._tile_type(tile)
        n_v = self.materialize(n, self.index)
        res = ubp_dialect.op("tiles", [n_v], [self.index, self.index],
                             {"width": _i64(width), "scalable": ir.BoolAttr.get(vs.scalable)})
        full_end, step = res.results
        saved = dict(self.env)
        names = self._carried(st.body)
        if names:
            raise self.error(f"variables assigned in a ubl.tiles loop are private to the tile: {', '.join(names)}",
                             st)

        def body(start: ir.Value, limit: ir.Value | None, regs: int = tile) -> None:
            self.env = dict(saved)
            w = regs * vs.lanes if not vs.scalable else step
            vt = vec_type if regs == tile else self._tile_type(regs)
            self.assign(st.target, Tile(start, limit, vt, w))
            self.visit_body(st.body)

        loads_before = self._output_loads
        self.emit_for(self.const_index(0), full_end, step, [], st, lambda iv: body(iv, None))
        # A body that reads the Output (read-modify-write of Y) must not see a column twice: its
        # tail is masked on every target, whatever tail= says (an overlapped tail would add twice).
        reads_output = self._output_loads > loads_before
        # The tail: the columns past the last whole tile, in one of three ways.
        # - Where masked loads and stores are cheap (x86): a masked tile of just enough registers,
        #   a power of two (LLVM shuffles a vector<48xf32> element by element) or the tile itself;
        #   the body is emitted once per register count.
        # - tail="mask", or a body that loads from the Output: the whole tile, masked (a kernel that
        #   reads back what it wrote to Y must not process a column twice).
        # - tail="overlap" (the default) and a body that never loads from Y: when n holds at least
        #   one whole tile, recompute the last columns ending at n (overlapping the previous tile;
        #   a kernel that writes its Y tile in full from registers only is unaffected) at full
        #   vector speed, unmasked, on just enough registers (a power of two: n = 49 with 16-column
        #   tiles computes 52 columns, not 64) where the vector width is fixed, on the whole tile
        #   where it is scalable; masked only when n < one tile.
        counts = sorted({1 << i for i in range(tile.bit_length()) if 1 << i < tile} | {tile})
        tail = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ult, full_end, n_v))
        with ir.InsertionPoint(tail.then_block):
            if vs.cheap_masks and not vs.scalable and tile > 1:
                self._narrow_tails(body, arith.subi(n_v, full_end), full_end, n_v, counts, vs.lanes)
            elif tail_mode == "mask" or reads_output:
                body(full_end, n_v)
            else:
                whole = scf.IfOp(arith.cmpi(arith.CmpIPredicate.uge, n_v, step), has_else=True)
                with ir.InsertionPoint(whole.then_block):
                    if vs.scalable or tile == 1:
                        body(arith.subi(n_v, step), None)
                    else:
                        self._narrow_tails(body, arith.subi(n_v, full_end), None, n_v, counts, vs.lanes)
                    scf.YieldOp([])
                with ir.InsertionPoint(whole.else_block):
                    body(full_end, n_v)
                    scf.YieldOp([])
            scf.YieldOp([])
        self.env = saved

    def loop_edge_tiles(self, st: ast.For, n: Any, tile: Any) -> None:
        """``ubl.tiles(n, TILE, edges=True)``: a left edge tile, whole interior tiles, a right edge
        tile ending at n (overlapping); a row narrower than one tile is one masked tile."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise self.error("ubl.tiles(..., edges=True) needs a compile-time row width >= 1 (e.g. W.width)", st)
        tile = self._static_int(tile, st, "the tile size of ubl.tiles")
        if not 1 <= tile <= MAX_TILE_REGISTERS:
            raise self.error(f"the tile size must be 1..{MAX_TILE_REGISTERS} vector registers, got {tile}", st)
        if self._carried(st.body):
            raise self.error("variables assigned in a ubl.tiles loop are private to the tile", st)
        vs = self.spec.vector
        width = tile * vs.lanes
        vec_type = ir.VectorType.get([width], self.f32, scalable=[vs.scalable])
        saved = dict(self.env)

        def body(start: ir.Value, limit: ir.Value | None, left: bool, right: bool) -> None:
            self.env = dict(saved)
            w = width if not vs.scalable else step
            self.assign(st.target, Tile(start, limit, vec_type, w, left, right))
            self.visit_body(st.body)

        def split(w: int | ir.Value) -> None:
            body(self.const_index(0), None, True, False)
            w_v = self.materialize(w, self.index)
            last = self.const_index(n - w) if isinstance(w, int) else arith.subi(self.const_index(n), w)
            self.emit_for(w_v, last, w_v, [], st, lambda iv: body(iv, None, False, False))
            body(last, None, False, True)

        if not vs.scalable:
            step = width
            if n <= width:
                body(self.const_index(0), self.const_index(n), True, True)
            else:
                split(width)
        else:
            (_, step) = ubp_dialect.op("tiles", [self.const_index(n)], [self.index, self.index],
                                       {"width": _i64(width), "scalable": ir.BoolAttr.get(True)}).results
            narrow = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ule, self.const_index(n), step), has_else=True)
            with ir.InsertionPoint(narrow.then_block):
                body(self.const_index(0), self.const_index(n), True, True)
                scf.YieldOp([])
            with ir.InsertionPoint(narrow.else_block):
                split(step)
                scf.YieldOp([])
        self.env = saved

    def _tile_type(self, regs: int) -> ir.VectorType:
        """The value type of a tile of ``regs`` vector registers.

        One ``vector<regs*lanes x f32>`` (scalable on SVE) when ``regs`` is a power of two; else,
        where the width is fixed, ``vector<regs x lanes x f32>``: LLVM splits a power-of-two vector
        into registers but shuffles a ``vector<24xf32>`` element by element, while the rows of a
        2-D vector are lowered as separate registers (NEON: TILE=6 is 24 accumulators at N=4).
        """
        vs = self.spec.vector
        if vs.scalable or regs & (regs - 1) == 0:
            return ir.VectorType.get([regs * vs.lanes], self.f32, scalable=[vs.scalable])
        return ir.VectorType.get([regs, vs.lanes], self.f32)

    def _narrow_tails(self, body: Any, rem: ir.Value, start: ir.Value | None, n_v: ir.Value, counts: list[int],
                      lanes: int) -> None:
        """The body on a tile of counts[0] registers if rem fits in it, else try the next count.

        ``start`` given: a masked tile from ``start`` to n. ``start`` None: an unmasked tile ending
        at n (it overlaps the columns before ``n - rem``; the caller ensures n holds the tile).
        """
        regs, rest = counts[0], counts[1:]

        def run() -> None:
            if start is None:
                body(arith.subi(n_v, self.const_index(regs * lanes)), None, regs)
            else:
                body(start, n_v, regs)

        if not rest:
            run()
            return
        fits = scf.IfOp(arith.cmpi(arith.CmpIPredicate.ule, rem, self.const_index(regs * lanes)), has_else=True)
        with ir.InsertionPoint(fits.then_block):
            run()
            scf.YieldOp([])
        with ir.InsertionPoint(fits.else_block):
            self._narrow_tails(body, rem, start, n_v, rest, lanes)
            scf.YieldOp([])

    # -- if -----------------------------------------------------------------------------------
    def visit_if(self, st: ast.If) -> None:
        cond = self.expr(st.test)
        if isinstance(cond, (bool, int)):
            self.visit_body(st.body if cond else st.orelse)
            return
        if not isinstance(cond, ir.Value) or cond.type != self.i1:
            raise self.error("an if condition must be a comparison or a compile-time constant", st.test)
        self._dynamic += 1
        try:
            self._if_dynamic(st, cond)
        finally:
            self._dynamic -= 1

    def _if_dynamic(self, st: ast.If, cond: ir.Value) -> None:
        """A run-time ``if``: an scf.if yielding the variables its branches assign."""
        names = self._carried(st.body + st.orelse)
        scope = set(self.env)
        init = self._flatten(names)
        like = {n: self.env[n] for n in names}
        types = [v.type for v in init]
        if_op = scf.IfOp(cond, types, has_else=bool(st.orelse) or bool(names))
        saved = dict(self.env)
        with ir.InsertionPoint(if_op.then_block):
            self.visit_body(st.body)
            scf.YieldOp(self._yield_values(names, types, st))
        if bool(st.orelse) or bool(names):
            self.env = dict(saved)
            with ir.InsertionPoint(if_op.else_block):
                self.visit_body(st.orelse)
                scf.YieldOp(self._yield_values(names, types, st))
        self.env = saved
        self._unflatten(names, list(if_op.results), like)
        self._drop_new(scope, names)

    # -- expressions --------------------------------------------------------------------------
    def expr(self, node: ast.expr) -> Any:
        prev, self._node = self._node, node
        try:
            return self._expr(node)
        finally:
            self._node = prev

    def _expr(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (bool, int, float, str)):
                return node.value
            raise self.error(f"unsupported constant {node.value!r}")
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            if node.id in self._globals:
                return self._globals[node.id]
            if node.id == "range":
                return PY_RANGE
            if node.id in ("min", "max", "len", "print"):
                return {"min": min, "max": max, "len": len, "print": print}[node.id]
            known = [*self.env, *self._globals, "range", "min", "max", "len", "print"]
            raise self.error(f"name {node.id!r} is not defined{did_you_mean(node.id, known)}")
        if isinstance(node, ast.Attribute):
            return self.attribute(self.expr(node.value), node.attr, node)
        if isinstance(node, ast.Tuple):
            return tuple(self.expr(e) for e in node.elts)
        if isinstance(node, ast.BinOp):
            return self.binop(node.op, self.expr(node.left), self.expr(node.right), node)
        if isinstance(node, ast.UnaryOp):
            v = self.expr(node.operand)
            if isinstance(node.op, ast.USub):
                if isinstance(v, (int, float)):
                    return -v
                return self.binop(ast.Sub(), 0.0 if self._is_float(v) else 0, v, node)
            if isinstance(node.op, ast.Not) and isinstance(v, bool):
                return not v
            if isinstance(node.op, ast.Not) and isinstance(v, ir.Value) and v.type == self.i1:
                return arith.xori(v, arith.constant(self.i1, 1))
            raise self.error(f"unsupported unary operator {type(node.op).__name__}")
        if isinstance(node, ast.Compare):
            if len(node.ops) != 1:
                raise self.error("chained comparisons are not supported; use 'and'")
            return self.compare(node.ops[0], self.expr(node.left), self.expr(node.comparators[0]), node)
        if isinstance(node, ast.BoolOp):
            vals = [self.expr(v) for v in node.values]
            if all(isinstance(v, bool) for v in vals):
                return all(vals) if isinstance(node.op, ast.And) else any(vals)
            acc = self.materialize(vals[0], self.i1)
            for v in vals[1:]:
                v = self.materialize(v, self.i1)
                acc = arith.andi(acc, v) if isinstance(node.op, ast.And) else arith.ori(acc, v)
            return acc
        if isinstance(node, ast.Subscript):
            base = self.expr(node.value)
            idx = self.expr(node.slice)
            if isinstance(base, RegTile):
                i = self._static_int(idx, node, "a register tile index")
                if not 0 <= i < len(base.values):
                    raise self.error(f"register tile index {i} out of range 0..{len(base.values) - 1}")
                return base.values[i]
            if isinstance(base, (tuple, list)):
                return base[self._static_int(idx, node, "an index")]
            raise self.error("only register tiles and tuples can be indexed")
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.IfExp):
            cond = self.expr(node.test)
            if isinstance(cond, (bool, int)):
                return self.expr(node.body if cond else node.orelse)
            a, b = self.expr(node.body), self.expr(node.orelse)
            ty = next((v.type for v in (a, b) if isinstance(v, ir.Value)), None)
            if ty is None:
                ty = self.f32 if isinstance(a, float) or isinstance(b, float) else self.index
            return arith.select(self.materialize(cond, self.i1), self.coerce(a, ty, node), self.coerce(b, ty, node))
        raise self.error(f"unsupported expression in a kernel: {type(node).__name__}")

    def attribute(self, base: Any, attr: str, node: ast.AST) -> Any:
        if isinstance(base, Dense):
            if attr == "rows":
                return base.rows
            if attr == "n":
                return self.n
        elif isinstance(base, Weights):
            if attr in ("rows", "cols", "block", "lookahead"):
                return {"rows": base.M, "cols": base.K, "block": base.N, "lookahead": COL_PAD}[attr]
            if attr in ("row_blocks", "block_row", "block_col", "weight"):
                return _BoundMethod(base, attr)
            if attr == "num_blocks":
                if base.baked is None:
                    raise self.error("W.num_blocks is a compile-time int only in mask-specialised kernels; "
                                     "walk the blocks with W.row_blocks(r)", node)
                return base.baked.num_blocks
        elif isinstance(base, PWeights):
            ps = base.spec
            values = {"rows": base.M, "cols": base.K, "height": ps.height, "width": ps.width,
                      "num_patterns": ps.num_patterns, "taps": ps.taps}
            if attr in values:
                return values[attr]
            if attr in ("filter_channel", "pattern_kernels", "kernel_channel", "tap_weight", "tap"):
                return _BoundMethod(base, attr)
        elif isinstance(base, Tile):
            if attr == "start":
                return base.start
            if attr == "width":
                return base.width
        elif not isinstance(base, (ir.Value, RegTile, int, float)):
            try:
                return getattr(base, attr)
            except AttributeError as exc:
                if getattr(base, "__name__", None) == "ubpdsl.language":  # "ubl has no 'lod'; did you mean ..."
                    raise self.error(str(exc), node) from None
                raise self.error(f"{_describe(base)} has no attribute {attr!r}"
                                 f"{did_you_mean(attr, [a for a in dir(base) if not a.startswith('_')])}",
                                 node) from None
        kind = {Dense: "Output" if getattr(base, "output", False) else "Input", Weights: "BlockSparse",
                PWeights: "PatternSparse", Tile: "Tile"}.get(type(base))
        hint = did_you_mean(attr, OPERAND_ATTRS[kind]) if kind else ""
        raise self.error(f"{_describe(base)} has no attribute {attr!r}{hint}", node)

    def call(self, node: ast.Call) -> Any:
        fn = self.expr(node.func)
        args = [self.expr(a) for a in node.args]
        kwargs = {kw.arg: self.expr(kw.value) for kw in node.keywords}
        if isinstance(fn, _BoundMethod):
            if isinstance(fn.weights, PWeights):
                return self.pattern_method(fn.weights, fn.name, args, kwargs, node)
            return self.weights_method(fn.weights, fn.name, args, kwargs, node)
        if is_builtin(fn):
            name = fn.__ubp_builtin__
            handler = getattr(self, f"builtin_{name}", None)
            if handler is None:
                raise self.error(f"ubl.{name}() is only valid as a for-loop iterator")
            return handler(node, *args, **kwargs)
        if fn in (min, max):
            return self.min_max(fn, args, kwargs, node)
        if isinstance(fn, HelperFunction):
            return self.inline(fn, args, kwargs, node)
        if isinstance(fn, KernelFunction):
            raise self.error(f"cannot call kernel {fn.name!r} from a kernel: declare the shared code with "
                             "@ubl.func and call that", node)
        if callable(fn) and hasattr(fn, "__code__"):  # a plain Python function
            raise self.error(f"cannot call function {fn.__name__!r} in a kernel: declare it with @ubl.func "
                             "(a kernel calls ubl builtins, W's methods, min/max and @ubl.func helpers)", node)
        raise self.error(f"cannot call {_describe(fn)} in a kernel", node)

    def inline(self, h: HelperFunction, args: list[Any], kwargs: dict[str, Any], node: ast.AST) -> Any:
        """Call the ``@ubl.func`` helper ``h``: its body emitted here, in its own scope; its return value."""
        if any(i.helper is h for i in self._inline):
            chain = " -> ".join([*(i.helper.name for i in self._inline), h.name])
            raise self.error(f"helper {h.name!r} is recursive ({chain}): helpers are inlined, so a helper "
                             "cannot call itself", node)
        try:
            bound = h.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise self.error(f"helper {h.name}() ({h.where}): {exc}", node) from None
        bound.apply_defaults()
        for name in sorted(h.constexprs):
            v = bound.arguments[name]
            if isinstance(v, (ir.Value, Dense, Weights, PWeights, Tile, RegTile)) or v is None:
                raise self.error(f"helper {h.name}(): {name} is ubl.constexpr, so it needs a compile-time "
                                 f"constant, got {_describe(v)}", node)
        saved = (self.env, self._globals, self._file)
        self._inline.append(_Inlined(h, f"{self._file}:{_node_line(node)}", self._dynamic))
        self.env, self._globals, self._file = dict(bound.arguments), h.globals, h.filename
        try:
            self.visit_body(h.tree.body)
            return None
        except _Return as ret:
            return ret.value
        finally:
            self._inline.pop()
            self.env, self._globals, self._file = saved

    def min_max(self, fn: Any, args: list[Any], kwargs: dict[str, Any], node: ast.AST) -> Any:
        """``min``/``max`` of integers: folded when all are compile-time, else arith.minsi/maxsi."""
        if kwargs or len(args) < 2:
            raise self.error(f"{fn.__name__}() takes two or more integer arguments", node)
        if all(isinstance(a, int) and not isinstance(a, bool) for a in args):
            return fn(*args)
        op = arith.minsi if fn is min else arith.maxsi
        acc = self.materialize(args[0], self.index)
        for a in args[1:]:
            acc = op(acc, self.materialize(a, self.index))
        return acc

    # -- W methods ----------------------------------------------------------------------------
    def weights_method(self, W: Weights, name: str, args: list[Any], kwargs: dict[str, Any],
                       node: ast.AST) -> Any:
        if kwargs:
            raise self.error(f"W.{name}() takes no keyword arguments", node)
        want = {"row_blocks": 1, "block_row": 1, "block_col": 1, "weight": 2}[name]
        if len(args) != want:
            raise self.error(f"W.{name}() takes {want} argument(s)", node)
        first = args[0]
        if W.baked is not None and isinstance(first, int):
            b = W.baked
            if name == "row_blocks":
                if not 0 <= first < W.M + W.N:
                    raise self.error(f"row {first} is out of range", node)
                return int(b.row_ptr[first]), int(b.row_ptr[first + 1])
            self._check_block(first, b, node)
            if name == "block_row":
                return int(b.block_rows[first])
            if name == "block_col":
                return int(b.block_cols[first])
            lane = self._static_int(args[1], node, "the lane of W.weight")
            return float(b.values[first * W.N + lane])
        idx = self.materialize(first, self.index)
        zero = [self.const_index(0)]
        checking = self._oob_flag is not None
        if name == "row_blocks":
            ok = self._between(idx, 0, W.M + W.N) if checking else None
            return tuple(self._checked(
                ok, [self.index] * 2,
                lambda: list(ubp_dialect.op("row_blocks", [W.handle, idx], [self.index, self.index]).results),
                lambda: zero * 2))
        if name in ("block_row", "block_col"):
            ok = None
            if checking:  # block_cols has COL_PAD look-ahead entries past the last block
                pad = COL_PAD if name == "block_col" else 0
                ok = self._between(idx, 0, self.binop(ast.Add(), self._num_blocks(W), pad, node))
            (v,) = self._checked(ok, [self.index], lambda: [ubp_dialect.op(name, [W.handle, idx], [self.index]).result],
                                 lambda: zero)
            if checking and name == "block_col":  # a column outside X (a corrupt blob) is an error too
                (v,) = self._checked(self._between(v, 0, W.K), [self.index], lambda: [v], lambda: zero)
            return v
        lane = self._static_int(args[1], node, "the lane of W.weight")
        if not 0 <= lane < W.N:
            raise self.error(f"lane {lane} out of range 0..{W.N - 1}", node)
        ok = self._between(idx, 0, self._num_blocks(W)) if checking else None
        (v,) = self._checked(
            ok, [self.f32],
            lambda: [ubp_dialect.op("block_weight", [W.handle, idx], [self.f32], {"lane": _i64(lane)}).result],
            lambda: [arith.constant(self.f32, 0.0)])
        return v

    # -- the pattern-sparse operand (direct 3x3 convolution) ----------------------------------
    def pattern_method(self, W: PWeights, name: str, args: list[Any], kwargs: dict[str, Any],
                       node: ast.AST) -> Any:
        if kwargs:
            raise self.error(f"W.{name}() takes no keyword arguments", node)
        want = {"filter_channel": 1, "pattern_kernels": 2, "kernel_channel": 1, "tap_weight": 2, "tap": 2}[name]
        if len(args) != want:
            raise self.error(f"W.{name}() takes {want} argument(s)", node)
        ps = W.spec
        if name == "tap":
            p = self._static_int(args[0], node, "the pattern of W.tap")
            t = self._static_int(args[1], node, "the tap of W.tap")
            if not (0 <= p < ps.num_patterns and 0 <= t < ps.taps):
                raise self.error(f"W.tap({p}, {t}): pattern in 0..{ps.num_patterns - 1}, tap in 0..{ps.taps - 1}",
                                 node)
            q = int(ps.library[p, t])
            return q // 3 - 1, q % 3 - 1
        if self._oob_flag is not None:
            raise self.error("bounds-checked builds of pattern kernels are not supported", node)
        idx = self.materialize(args[0], self.index)
        if name == "pattern_kernels":
            p = self._static_int(args[1], node, "the pattern of W.pattern_kernels")
            if not 0 <= p < ps.num_patterns:
                raise self.error(f"pattern {p} out of range 0..{ps.num_patterns - 1}", node)
            return tuple(ubp_dialect.op("pattern_kernels", [W.handle, idx], [self.index, self.index],
                                        {"pattern": _i64(p)}).results)
        if name == "tap_weight":
            t = self._static_int(args[1], node, "the tap of W.tap_weight")
            if not 0 <= t < ps.taps:
                raise self.error(f"tap {t} out of range 0..{ps.taps - 1}", node)
            return ubp_dialect.op("tap_weight", [W.handle, idx], [self.f32], {"tap": _i64(t)}).result
        return ubp_dialect.op(name, [W.handle, idx], [self.index]).result

    def _pixel_args(self, node: ast.AST, what: str, operand: Any, channel: Any, row: Any,
                    tile: Any) -> tuple[Dense, PWeights, Tile]:
        if self._pw is None:
            raise self.error(f"{what} needs a kernel over a ubl.PatternSparse weight (an image layer)", node)
        if self._oob_flag is not None:
            raise self.error("bounds-checked builds of pattern kernels are not supported", node)
        if not isinstance(operand, Dense):
            raise self.error(f"{what}: the first argument must be X or Y", node)
        if not isinstance(tile, Tile):
            raise self.error(f"{what}: the fourth argument must be a tile from ubl.tiles(W.width, T, edges=True)", node)
        if isinstance(channel, int) and not 0 <= channel < operand.rows:
            raise self.error(f"{what}: channel {channel} is outside {operand.name} (0..{operand.rows - 1})", node)
        return operand, self._pw, tile

    def _pixel_col(self, row: Any, t: Tile, dx: int, width: int) -> tuple[ir.Value, ir.Value | None]:
        """The flat column (row * width + start + dx) and the mask limit of a tile of image row ``row``."""
        base = self.materialize(row * width if isinstance(row, int) else
                                arith.muli(row, self.const_index(width)), self.index)
        col = arith.addi(base, t.start)
        if dx:
            col = arith.addi(col, self.const_index(dx))
        return col, (None if t.limit is None else arith.addi(base, t.limit))

    def builtin_load_pixels(self, node: ast.AST, operand: Any = None, channel: Any = None, row: Any = None,
                            tile: Any = None, dx: Any = 0) -> Any:
        d, W, t = self._pixel_args(node, "ubl.load_pixels", operand, channel, row, tile)
        dx = self._static_int(dx, node, "dx of ubl.load_pixels")
        if not -1 <= dx <= 1:
            raise self.error(f"ubl.load_pixels: dx must be -1, 0 or 1, got {dx}", node)
        H, Wd = W.spec.height, W.spec.width
        if isinstance(row, int) and not 0 <= row < H:
            return 0.0  # the padding: ubl.fma folds the product away
        ch = self.materialize(channel, self.index)
        self._output_loads += d.output

        def load() -> list[ir.Value]:
            edge = (dx < 0 and t.left) or (dx > 0 and t.right)
            col, limit = self._pixel_col(row, t, 0 if edge else dx, Wd)
            operands = [d.memref, ch, col] + ([limit] if limit is not None else [])
            v = ubp_dialect.op("load_tile", operands, [t.vec_type]).result
            if edge:  # the pixel past the edge is the padding: shift a zero in
                v = ubp_dialect.op("shift_tile", [v], [t.vec_type], {"shift": _i64(dx)}).result
            return [v]

        if isinstance(row, int):
            return load()[0]
        if not isinstance(row, ir.Value) or row.type != self.index:
            raise self.error("ubl.load_pixels: the row must be an integer", node)
        lo, hi = self._ranges.get(row, (-1, H + 1))
        if 0 <= lo and hi <= H:
            return load()[0]
        inside = self._between(row, 0, H)  # not provably inside: checked at run time
        guard = scf.IfOp(inside, [t.vec_type], has_else=True)
        with ir.InsertionPoint(guard.then_block):
            scf.YieldOp(load())
        with ir.InsertionPoint(guard.else_block):
            scf.YieldOp([self._zero_vec(t.vec_type)])
        return guard.results[0]

    def builtin_store_pixels(self, node: ast.AST, operand: Any = None, channel: Any = None, row: Any = None,
                             tile: Any = None, value: Any = None) -> None:
        d, W, t = self._pixel_args(node, "ubl.store_pixels", operand, channel, row, tile)
        if not d.output:
            raise self.error(f"ubl.store_pixels: {d.name} is an input; only the ubl.Output operand can be written",
                             node)
        if isinstance(row, int) and not 0 <= row < W.spec.height:
            raise self.error(f"ubl.store_pixels: row {row} is outside the image (0..{W.spec.height - 1})", node)
        col, limit = self._pixel_col(row, t, 0, W.spec.width)
        v = self.coerce(value, t.vec_type, node)
        ch = self.materialize(channel, self.index)
        ubp_dialect.op("store_tile", [d.memref, ch, col, v] + ([limit] if limit is not None else []), [])

    def _check_block(self, b: int, data: BlockData, node: ast.AST) -> None:
        if not 0 <= b < data.num_blocks:
            raise self.error(f"block {b} is out of range (the mask has {data.num_blocks} blocks)", node)

    # -- bounds checks (check_bounds builds) --------------------------------------------------
    def _between(self, v: ir.Value, lo: int | ir.Value, hi: int | ir.Value) -> ir.Value:
        """i1: lo <= v < hi (signed)."""
        lo_v, hi_v = self.materialize(lo, self.index), self.materialize(hi, self.index)
        return arith.andi(arith.cmpi(arith.CmpIPredicate.sge, v, lo_v), arith.cmpi(arith.CmpIPredicate.slt, v, hi_v))

    def _checked(self, ok: ir.Value, types: list[ir.Type], access: Any, fallback: Any) -> list[ir.Value]:
        """``access()`` when ``ok``; else record ERR_OUT_OF_BOUNDS and use ``fallback()`` instead
        (both return a list of values of ``types``). Unchecked builds just call ``access()``."""
        if self._oob_flag is None:
            return access()
        guard = scf.IfOp(ok, types, has_else=True)
        with ir.InsertionPoint(guard.then_block):
            scf.YieldOp(access())
        with ir.InsertionPoint(guard.else_block):
            code = arith.constant(ir.IntegerType.get_signless(32), abi.ERR_OUT_OF_BOUNDS)
            memref.store(code, self._oob_flag, [self.const_index(0)])
            scf.YieldOp(fallback())
        return list(guard.results)

    def _tile_ok(self, d: Dense, row: ir.Value, t: Tile) -> ir.Value | None:
        """i1: the row is inside the operand and the tile's columns inside [0, n)."""
        if self._oob_flag is None:
            return None
        ok = self._between(row, 0, d.rows)
        ok = arith.andi(ok, arith.cmpi(arith.CmpIPredicate.sge, t.start, self.const_index(0)))
        end = t.limit if t.limit is not None else arith.addi(t.start, self.materialize(t.width, self.index))
        return arith.andi(ok, arith.cmpi(arith.CmpIPredicate.sle, end, self.n))

    def _num_blocks(self, W: Weights) -> int | ir.Value:
        if W.baked is not None:
            return W.baked.num_blocks
        return ubp_dialect.op("num_blocks", [W.handle], [self.index]).result

    # -- builtins -----------------------------------------------------------------------------
    def builtin_zeros(self, node: ast.AST, *args: Any) -> Any:
        if len(args) == 1 and isinstance(args[0], Tile):
            return self._zero_vec(args[0].vec_type)
        if len(args) == 2 and isinstance(args[1], Tile):
            count = self._static_int(args[0], node, "the row count of ubl.zeros")
            if count < 1 or count > 64:
                raise self.error(f"ubl.zeros: row count {count} must be in 1..64", node)
            z = self._zero_vec(args[1].vec_type)
            return RegTile([z] * count)
        raise self.error("ubl.zeros takes a tile (ubl.zeros(j)) or a row count and a tile (ubl.zeros(N, j))", node)

    def _zero_vec(self, vt: ir.VectorType) -> ir.Value:
        return arith.constant(vt, ir.DenseElementsAttr.get_splat(vt, ir.FloatAttr.get(self.f32, 0.0)))

    def _dense_tile_args(self, node: ast.AST, what: str, operand: Any, row: Any,
                         tile: Any) -> tuple[Dense, ir.Value, Tile]:
        if not isinstance(operand, Dense):
            raise self.error(f"{what}: the first argument must be a dense operand (X or Y)", node)
        if not isinstance(tile, Tile):
            raise self.error(f"{what}: the third argument must be a tile from ubl.tiles()", node)
        if isinstance(row, int) and not 0 <= row < operand.rows:
            raise self.error(f"{what}: row {row} is outside {operand.name} (rows 0..{operand.rows - 1})", node)
        return operand, self.materialize(row, self.index), tile

    def builtin_load(self, node: ast.AST, operand: Any = None, row: Any = None, tile: Any = None) -> ir.Value:
        d, r, t = self._dense_tile_args(node, "ubl.load", operand, row, tile)
        self._output_loads += d.output
        self._user_output_loads += d.output
        operands = [d.memref, r, t.start] + ([t.limit] if t.limit is not None else [])
        (v,) = self._checked(self._tile_ok(d, r, t), [t.vec_type],
                             lambda: [ubp_dialect.op("load_tile", operands, [t.vec_type]).result],
                             lambda: [self._zero_vec(t.vec_type)])
        return v

    def builtin_store(self, node: ast.AST, operand: Any = None, row: Any = None, tile: Any = None,
                      value: Any = None, streaming: Any = False, partial: Any = False) -> None:
        d, r, t = self._dense_tile_args(node, "ubl.store", operand, row, tile)
        if not d.output:
            raise self.error(f"ubl.store: {d.name} is an input; only the ubl.Output operand can be written", node)
        if not isinstance(streaming, bool):
            raise self.error("ubl.store: streaming= must be a compile-time bool", node)
        if not isinstance(partial, bool):
            raise self.error("ubl.store: partial= must be a compile-time bool", node)
        self._partial_stores += partial
        v = self.coerce(value, t.vec_type, node)
        attrs = {"ubp.nontemporal": ir.UnitAttr.get()} if streaming and t.limit is None else {}

        def store() -> list[ir.Value]:
            out = v if partial or self._ep is None else self._apply_epilogue(v, r, t)
            operands = [d.memref, r, t.start, out] + ([t.limit] if t.limit is not None else [])
            ubp_dialect.op("store_tile", operands, [], attrs)
            return []

        self._checked(self._tile_ok(d, r, t), [], store, list)

    def builtin_finish(self, node: ast.AST, operand: Any = None, row: Any = None, tile: Any = None) -> None:
        d, r, t = self._dense_tile_args(node, "ubl.finish", operand, row, tile)
        if not d.output:
            raise self.error(f"ubl.finish: {d.name} is an input; only rows of the ubl.Output are finished", node)
        self._finishes += 1
        self._output_loads += 1  # a read-modify-write of Y in the _ep entry point: same tail in both
        if self._ep is None:
            return
        limit = [t.limit] if t.limit is not None else []

        def finish() -> list[ir.Value]:
            v = ubp_dialect.op("load_tile", [d.memref, r, t.start, *limit], [t.vec_type]).result
            ubp_dialect.op("store_tile", [d.memref, r, t.start, self._apply_epilogue(v, r, t), *limit], [])
            return []

        self._checked(self._tile_ok(d, r, t), [], finish, list)

    def _apply_epilogue(self, v: ir.Value, row: ir.Value, t: Tile) -> ir.Value:
        """clamp(v + bias[row] + residual[row, tile], lo, hi): the epilogue of a final store."""
        ep = self._ep
        vt = v.type
        v = arith.addf(v, vector.broadcast(vt, memref.load(ep.bias, [row])))
        has_res = scf.IfOp(ep.has_residual, [vt], has_else=True)
        with ir.InsertionPoint(has_res.then_block):
            limit = [t.limit] if t.limit is not None else []
            scf.YieldOp([ubp_dialect.op("load_tile", [ep.residual, row, t.start, *limit], [vt]).result])
        with ir.InsertionPoint(has_res.else_block):
            scf.YieldOp([self._zero_vec(vt)])
        v = arith.addf(v, has_res.results[0])
        # select(v < lo, lo, v): NaN stays NaN (as torch.clamp); one max/min instruction on x86 and NEON
        lo, hi = vector.broadcast(vt, ep.lo), vector.broadcast(vt, ep.hi)
        v = arith.select(arith.cmpf(arith.CmpFPredicate.OLT, v, lo), lo, v)
        return arith.select(arith.cmpf(arith.CmpFPredicate.OGT, v, hi), hi, v)

    def builtin_prefetch(self, node: ast.AST, operand: Any = None, row: Any = None, tile: Any = None,
                         write: Any = False) -> None:
        d, r, t = self._dense_tile_args(node, "ubl.prefetch", operand, row, tile)
        if not isinstance(write, bool):
            raise self.error("ubl.prefetch: write= must be a compile-time bool", node)
        if write and not d.output:
            raise self.error(f"ubl.prefetch: write=True needs the ubl.Output operand, {d.name} is an input", node)
        width = math.prod(t.vec_type.shape)
        attrs = {"width": _i64(width)} | ({"ubp.write": ir.UnitAttr.get()} if write else {})

        def prefetch() -> list[ir.Value]:
            ubp_dialect.op("prefetch_tile", [d.memref, r, t.start], [], attrs)
            if write and self._ep is not None:  # the final store of this tile will also read the residual
                has_res = scf.IfOp(self._ep.has_residual)
                with ir.InsertionPoint(has_res.then_block):
                    ubp_dialect.op("prefetch_tile", [self._ep.residual, r, t.start], [], {"width": _i64(width)})
                    scf.YieldOp([])
            return []

        self._checked(self._tile_ok(d, r, t), [], prefetch, list)

    def builtin_fma(self, node: ast.AST, a: Any = None, b: Any = None, c: Any = None) -> ir.Value:
        vt = next((v.type for v in (a, b, c) if isinstance(v, ir.Value) and isinstance(v.type, ir.VectorType)),
                  None)
        if vt is None:
            raise self.error("ubl.fma needs at least one vector operand", node)
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0 for v in (a, b)):
            return self.coerce(c, vt, node)  # a compile-time zero factor (e.g. a pixel row outside the image)
        return vector.fma(*(self.coerce(v, vt, node) for v in (a, b, c)))

    def builtin_block_fma(self, node: ast.AST, W: Any = None, b: Any = None, x: Any = None,
                          acc: Any = None) -> RegTile:
        if not isinstance(W, Weights):
            raise self.error("ubl.block_fma: the first argument must be the ubl.BlockSparse operand", node)
        if not isinstance(acc, RegTile) or len(acc.values) != W.N:
            raise self.error(f"ubl.block_fma: the accumulator must be a register tile of N={W.N} rows "
                             "(ubl.zeros(W.block, j))", node)
        if not isinstance(x, ir.Value) or not isinstance(x.type, ir.VectorType):
            raise self.error("ubl.block_fma: x must be a vector tile (ubl.load(X, col, j))", node)
        vt = x.type
        if W.baked is not None and isinstance(b, int):
            self._check_block(b, W.baked, node)
            out = []
            for lane, a in enumerate(acc.values):
                w = float(W.baked.values[b * W.N + lane])
                out.append(vector.fma(self.coerce(w, vt, node), x, self.coerce(a, vt, node)))
            return RegTile(out)
        accs = [self.coerce(a, vt, node) for a in acc.values]
        b_v = self.materialize(b, self.index)
        ok = self._between(b_v, 0, self._num_blocks(W)) if self._oob_flag is not None else None
        return RegTile(self._checked(
            ok, [vt] * W.N, lambda: list(ubp_dialect.op("block_fma", [W.handle, b_v, x, *accs], [vt] * W.N).results),
            lambda: accs))

    # -- arithmetic ---------------------------------------------------------------------------
    _PY_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Div: operator.truediv}

    def binop(self, op: ast.operator, a: Any, b: Any, node: ast.AST) -> Any:
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            fn = self._PY_OPS.get(type(op))
            if fn is None:
                raise self.error(f"unsupported operator {type(op).__name__}", node)
            try:
                return fn(a, b)
            except ZeroDivisionError:
                raise self.error("division by zero in a compile-time expression", node) from None
        if isinstance(a, RegTile) or isinstance(b, RegTile):
            raise self.error("arithmetic on a whole register tile is not supported; index it (acc[i])", node)
        if not isinstance(a, (int, float, ir.Value)) or not isinstance(b, (int, float, ir.Value)):
            raise self.error(f"unsupported operands for {type(op).__name__}: {_describe(a)}, {_describe(b)}", node)
        vt = next((v.type for v in (a, b) if isinstance(v, ir.Value) and isinstance(v.type, ir.VectorType)), None)
        if vt is not None or self._is_float(a) or self._is_float(b):
            ty = vt or self.f32
            x, y = self.coerce(a, ty, node), self.coerce(b, ty, node)
            fns = {ast.Add: arith.addf, ast.Sub: arith.subf, ast.Mult: arith.mulf, ast.Div: arith.divf}
            if type(op) not in fns:
                raise self.error(f"operator {type(op).__name__} is not defined on floats", node)
            return fns[type(op)](x, y)
        x, y = self.materialize(a, self.index), self.materialize(b, self.index)
        fns = {ast.Add: arith.addi, ast.Sub: arith.subi, ast.Mult: arith.muli,
               ast.FloorDiv: arith.floordivsi, ast.Mod: arith.remsi}
        if type(op) not in fns:
            raise self.error(f"operator {type(op).__name__} is not defined on integers", node)
        out = fns[type(op)](x, y)
        # Interval facts (of peeled loop variables) survive adding or subtracting a constant.
        if isinstance(op, (ast.Add, ast.Sub)):
            if isinstance(a, ir.Value) and a in self._ranges and isinstance(b, int):
                d = b if isinstance(op, ast.Add) else -b
                self._ranges[out] = (self._ranges[a][0] + d, self._ranges[a][1] + d)
            elif isinstance(op, ast.Add) and isinstance(b, ir.Value) and b in self._ranges and isinstance(a, int):
                self._ranges[out] = (self._ranges[b][0] + a, self._ranges[b][1] + a)
        return out

    def compare(self, op: ast.cmpop, a: Any, b: Any, node: ast.AST) -> Any:
        py = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
              ast.Eq: operator.eq, ast.NotEq: operator.ne}
        if type(op) not in py:
            raise self.error(f"unsupported comparison {type(op).__name__}", node)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return py[type(op)](a, b)
        folded = self._compare_by_range(op, a, b)
        if folded is not None:
            return folded
        if self._is_float(a) or self._is_float(b):
            preds = {ast.Lt: arith.CmpFPredicate.OLT, ast.LtE: arith.CmpFPredicate.OLE,
                     ast.Gt: arith.CmpFPredicate.OGT, ast.GtE: arith.CmpFPredicate.OGE,
                     ast.Eq: arith.CmpFPredicate.OEQ, ast.NotEq: arith.CmpFPredicate.UNE}
            return arith.cmpf(preds[type(op)], self.coerce(a, self.f32, node), self.coerce(b, self.f32, node))
        preds = {ast.Lt: arith.CmpIPredicate.slt, ast.LtE: arith.CmpIPredicate.sle,
                 ast.Gt: arith.CmpIPredicate.sgt, ast.GtE: arith.CmpIPredicate.sge,
                 ast.Eq: arith.CmpIPredicate.eq, ast.NotEq: arith.CmpIPredicate.ne}
        return arith.cmpi(preds[type(op)], self.materialize(a, self.index), self.materialize(b, self.index))

    def _compare_by_range(self, op: ast.cmpop, a: Any, b: Any) -> bool | None:
        """A comparison of an index with a known range (a peeled loop's variable +- constants) and a
        compile-time int, when every value of the range gives the same answer; else None."""
        def interval(v: Any) -> tuple[int, int] | None:
            if isinstance(v, bool):
                return None
            if isinstance(v, int):
                return v, v
            if isinstance(v, ir.Value) and v in self._ranges:
                lo, hi = self._ranges[v]
                return lo, hi - 1
            return None

        ia, ib = interval(a), interval(b)
        if ia is None or ib is None or (isinstance(a, int) and isinstance(b, int)):
            return None
        (alo, ahi), (blo, bhi) = ia, ib
        if isinstance(op, ast.Lt):
            return True if ahi < blo else False if alo >= bhi else None
        if isinstance(op, ast.LtE):
            return True if ahi <= blo else False if alo > bhi else None
        if isinstance(op, ast.Gt):
            return True if alo > bhi else False if ahi <= blo else None
        if isinstance(op, ast.GtE):
            return True if alo >= bhi else False if ahi < blo else None
        return None

    def _is_float(self, v: Any) -> bool:
        if isinstance(v, float):
            return True
        return isinstance(v, ir.Value) and (v.type == self.f32 or isinstance(v.type, ir.VectorType))

    # -- conversions --------------------------------------------------------------------------
    def const_index(self, v: int) -> ir.Value:
        return arith.constant(self.index, v)

    def materialize(self, v: Any, ty: ir.Type | None = None) -> ir.Value:
        """A compile-time value as an SSA value (of type ``ty`` when given)."""
        if isinstance(v, ir.Value):
            if ty is not None and v.type != ty:
                raise self.error(f"expected a value of type {ty}, got {v.type}")
            return v
        if isinstance(v, bool):
            return arith.constant(self.i1, int(v))
        if isinstance(v, int) and (ty is None or ty == self.index):
            return self.const_index(v)
        if isinstance(v, (int, float)) and (ty is None or ty == self.f32):
            return arith.constant(self.f32, float(v))
        if isinstance(v, (int, float)) and ty is not None and isinstance(ty, ir.VectorType):
            return self.coerce(v, ty)
        raise self.error(f"cannot use {_describe(v)} here" + (f" (expected {ty})" if ty else ""))

    def coerce(self, v: Any, ty: ir.Type, node: ast.AST | None = None) -> ir.Value:
        """``v`` as a value of type ``ty``: numbers become constants, scalars are broadcast."""
        if isinstance(v, ir.Value) and v.type == ty:
            return v
        if isinstance(ty, ir.VectorType):
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return arith.constant(ty, ir.DenseElementsAttr.get_splat(ty, ir.FloatAttr.get(self.f32, float(v))))
            if isinstance(v, ir.Value) and v.type == self.f32:
                return vector.broadcast(ty, v)
        if ty == self.f32 and isinstance(v, (int, float)) and not isinstance(v, bool):
            return arith.constant(self.f32, float(v))
        if ty == self.index and isinstance(v, int) and not isinstance(v, bool):
            return self.const_index(v)
        got = v.type if isinstance(v, ir.Value) else _describe(v)
        raise self.error(f"type mismatch: expected {ty}, got {got}", node)

    def _static_int(self, v: Any, node: ast.AST, what: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"{what} must be a compile-time integer", node)
        return v


@dataclass
class _BoundMethod:
    weights: Weights | PWeights
    name: str


def _describe(v: Any) -> str:
    if isinstance(v, ir.Value):
        return f"a value of type {v.type}"
    if isinstance(v, Dense):
        return f"dense operand {v.name}"
    if isinstance(v, Weights):
        return "the block-sparse operand"
    if isinstance(v, PWeights):
        return "the pattern-sparse operand"
    if isinstance(v, Tile):
        return "a tile"
    if isinstance(v, RegTile):
        return f"a register tile of {len(v.values)} rows"
    return repr(v)


def _load(target: ast.expr) -> ast.expr:
    """The load form of an assignment target (for ``x += ...``)."""
    node = ast.parse(ast.unparse(target), mode="eval").body
    return ast.copy_location(node, target)


def _assigned_names(stmts: list[ast.stmt]) -> set[str]:
    names: set[str] = set()

    def targets(t: ast.expr) -> None:
        if isinstance(t, ast.Name):
            names.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                targets(e)
        elif isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name):
            names.add(t.value.id)

    for st in stmts:
        for node in ast.walk(st):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets(node.target)
            elif isinstance(node, ast.For):
                targets(node.target)
    return names


def _i64(v: int) -> ir.Attribute:
    return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), v)


def build_ubp_module(kernel: KernelFunction, spec: KernelSpec, epilogue: bool | None = None) -> ir.Module:
    """Compile ``kernel`` for ``spec`` to a ubp-dialect module (current context).

    The module holds the plain entry point and, unless ``epilogue`` is False, the ``_ep`` one
    (:data:`ubpdsl.abi.C_EP_SIGNATURE`). ``epilogue=None`` adds it when the kernel allows it
    (:func:`epilogue_refusal`); ``True`` makes a refusal a :class:`DSLError`.
    """
    if kernel.needs_specialized and spec.baked is None:
        raise DSLError(f"{kernel.filename}:{kernel.tree.lineno}: kernel {kernel.name!r} is mask-specialised "
                       "(specialized=True): compile it with the mask baked in")
    gen = CodeGen(kernel, spec)
    try:
        module = gen.build()
        refusal = gen.epilogue_refusal
        if refusal is not None and epilogue:
            raise DSLError(f"{kernel.filename}:{kernel.tree.lineno}: no _ep entry point: {refusal}")
        if refusal is None and epilogue is not False:
            gen = CodeGen(kernel, spec, epilogue=True)
            gen.build(module)
    except RecursionError:
        raise gen.error("kernel too deeply nested") from None
    if not module.operation.verify():  # pragma: no cover - verify raises with diagnostics
        raise gen.error("generated IR does not verify")
    return module


def has_epilogue(module: ir.Module, spec: KernelSpec) -> bool:
    """True if ``module`` (from :func:`build_ubp_module`) defines the ``_ep`` entry point."""
    name = abi.ep_symbol(spec.symbol)
    return any(ir.StringAttr(op.attributes["sym_name"]).value == name for op in module.body.operations
               if "sym_name" in op.attributes)
