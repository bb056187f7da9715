"""Lowering of the ``ubp`` dialect to upstream MLIR, and on to LLVM IR.

Two steps, both driven from Python:

1. :func:`lower_ubp` (a Python pass, registered with ``PassManager.add``; Python rewrite
   patterns applied by the greedy driver) rewrites every ``ubp`` op into ``memref`` /
   ``vector`` / ``arith`` (+ a few ``llvm`` ops that view the raw C pointers of the kernel ABI
   as memrefs). The block-sparse operand becomes four memrefs
   (``row_ptr``, ``block_rows``, ``block_cols``, ``values``), either views into the packed
   blob (data-driven) or constant globals (mask-specialised).
2. :func:`lower_to_llvm` runs the upstream pipeline (canonicalize, CSE, LICM, scf -> cf,
   vector/memref/arith/index/func -> llvm) and :func:`translate_to_llvm_ir` gives LLVM IR text.

The packed blob read by data-driven kernels is described (and its constants owned) by
:mod:`ubpdsl.packing`; the return codes of the header check come from :mod:`ubpdsl.abi`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from mlir import ir
from mlir.dialects import arith, builtin, llvm, memref, scf, vector
from mlir.dialects import llvm as llvm_dialect
from mlir.passmanager import PassManager
from mlir.rewrite import (
    GreedyRewriteConfig,
    PatternRewriter,
    RewritePatternSet,
    apply_patterns_and_fold_greedily,
)

from ubpdsl import abi
from ubpdsl import packing as pk
from ubpdsl.errors import BuildError

# The packed blob is viewed as a byte memref of this (nominal) size: the real size is only
# known to the caller; every access is at offsets the header itself supplies.
_NOMINAL_BYTES = 1 << 40


@dataclass
class _Weights:
    """The memrefs a ``!ubp.weights`` value lowers to."""

    block: int
    row_ptr: ir.Value
    block_rows: ir.Value
    block_cols: ir.Value
    values: ir.Value
    header: list[ir.Value] | None  # data-driven only: the header's i32 words (zeros for a NULL blob)
    nonnull: ir.Value | None  # data-driven only: i1, packed_w != NULL
    rows: int
    cols: int
    layout: str


@dataclass
class _Patterns:
    """The memrefs and header words a ``!ubp.patterns`` value lowers to."""

    filter_order: ir.Value
    group_ptr: ir.Value
    kernel_chan: ir.Value
    values: ir.Value
    raw: ir.Value  # the blob as bytes (the library is read from it by check_patterns)
    nonnull: ir.Value
    header: list[ir.Value]
    rows: int
    cols: int
    height: int
    width: int
    library: np.ndarray  # int32[P, T], compiled in


def _i64_attr(value: int) -> ir.IntegerAttr:
    return ir.IntegerAttr.get(ir.IntegerType.get_signless(64), value)


def _i(value: int, ty: str = "index") -> ir.Value:
    return arith.constant(ir.Type.parse(ty), value)


def _memref_from_ptr(ptr: ir.Value, shape: list[int | ir.Value], elem: ir.Type) -> ir.Value:
    """View a raw pointer as an identity-layout memref (sizes may be dynamic i64/index values)."""
    rank = len(shape)
    i64 = ir.IntegerType.get_signless(64)
    desc_ty = ir.Type.parse(
        f"!llvm.struct<(ptr, ptr, i64, array<{rank} x i64>, array<{rank} x i64>)>"
    )

    def as_i64(v: int | ir.Value) -> ir.Value:
        if isinstance(v, int):
            return llvm.mlir_constant(ir.IntegerAttr.get(i64, v))
        if isinstance(v.type, ir.IndexType):
            return arith.index_cast(i64, v)
        return v

    sizes = [as_i64(s) for s in shape]
    strides: list[ir.Value] = [None] * rank  # type: ignore[list-item]
    acc: ir.Value = llvm.mlir_constant(ir.IntegerAttr.get(i64, 1))
    for d in reversed(range(rank)):
        strides[d] = acc
        if d:
            acc = llvm.mul(acc, sizes[d], overflow_flags=0)
    d = llvm.mlir_poison(desc_ty)
    d = llvm.insertvalue(d, ptr, [0])
    d = llvm.insertvalue(d, ptr, [1])
    d = llvm.insertvalue(d, llvm.mlir_constant(ir.IntegerAttr.get(i64, 0)), [2])
    for k in range(rank):
        d = llvm.insertvalue(d, sizes[k], [3, k])
        d = llvm.insertvalue(d, strides[k], [4, k])
    dims = "x".join("?" if not isinstance(s, int) else str(s) for s in shape)
    mr_ty = ir.Type.parse(f"memref<{dims}x{elem}>")
    return builtin.unrealized_conversion_cast([mr_ty], [d])


def _int_attr(op: ir.Operation, name: str) -> int:
    return ir.IntegerAttr(op.attributes[name]).value


def _str_attr(op: ir.Operation, name: str) -> str:
    return ir.StringAttr(op.attributes[name]).value


def _global_constant(module_op: ir.Operation, name: str, attr: ir.DenseElementsAttr,
                     elem: ir.Type) -> ir.Value:
    """Emit a private constant memref.global in the module and return its memref."""
    n = len(attr)
    mr_ty = ir.MemRefType.get([n], elem)
    body = module_op.regions[0].blocks[0]
    with ir.InsertionPoint.at_block_begin(body):
        memref.global_(name, ir.TypeAttr.get(mr_ty), sym_visibility="private",
                       initial_value=attr, constant=True, alignment=64)
    return memref.get_global(mr_ty, name)


def _c32(v: int) -> ir.Value:
    """An i32 constant of a header word value (values >= 2**31 wrap, as the word is read signed)."""
    return arith.constant(ir.IntegerType.get_signless(32), v - (1 << 32) if v >= (1 << 31) else v)


def _c64(v: int) -> ir.Value:
    return arith.constant(ir.IntegerType.get_signless(64), v)


def _eq(a: ir.Value, b: ir.Value) -> ir.Value:
    return arith.cmpi(arith.CmpIPredicate.eq, a, b)


def _header_checks(words: list[ir.Value], expected: dict[int, int], count_word: int, max_count: int, start: int,
                   sizes: Callable[[ir.Value], dict[int, ir.Value]], total_word: int) -> tuple[ir.Value, ir.Value]:
    """``(match, consistent)``, i1 values of a packed blob's i32 header ``words`` (O(1)).

    match: every word of ``expected`` holds its value. consistent: the count word is in
    [0, max_count], each offset word of ``sizes(count)`` (in order) is where the previous
    section ends (padded to :data:`ubpdsl.packing.ALIGN`), the first at ``start``, and the
    total-bytes word is the end of the last. Sizes are computed in i64: no overflow whatever the
    header words hold.
    """
    i64 = ir.IntegerType.get_signless(64)
    match = arith.constant(ir.IntegerType.get_signless(1), 1)
    for k, want in expected.items():
        match = arith.andi(match, _eq(words[k], _c32(want)))
    count = arith.extsi(i64, words[count_word])
    consistent = arith.andi(arith.cmpi(arith.CmpIPredicate.sge, count, _c64(0)),
                            arith.cmpi(arith.CmpIPredicate.sle, count, _c64(max_count)))
    pos = _c64(start)
    for k, size in sizes(count).items():
        consistent = arith.andi(consistent, _eq(arith.extsi(i64, words[k]), pos))
        pos = arith.addi(pos, arith.andi(arith.addi(size, _c64(pk.ALIGN - 1)), _c64(-pk.ALIGN)))
    return match, arith.andi(consistent, _eq(arith.extsi(i64, words[total_word]), pos))


class _Lowering:
    """The ubp -> upstream rewrites.

    Step 1 (:meth:`materialize_weights`, a walk) turns every ``!ubp.weights`` handle into the
    memrefs it stands for, bundled by a ``builtin.unrealized_conversion_cast`` back to the
    handle type (the usual type-conversion idiom); constant globals for mask-specialised
    kernels are created here, at module level. Step 2 is a ``RewritePatternSet`` of Python
    patterns, one per op, applied greedily; each pattern reads the memrefs off the cast.
    """

    def __init__(self, module_op: ir.Operation):
        self.module_op = module_op
        self.counter = 0

    def record(self, value: ir.Value) -> _Weights:
        cast = value.owner
        if not isinstance(cast, ir.Operation):
            cast = getattr(cast, "operation", cast)
        if cast.name != "builtin.unrealized_conversion_cast" or "ubp.layout" not in cast.attributes:
            raise BuildError("ubp lowering: a weights operand does not come from ubp.sparse_weights/baked_weights")
        ops = list(cast.operands)
        data_driven = len(ops) > 4
        return _Weights(block=_block_of(value.type), row_ptr=ops[0], block_rows=ops[1], block_cols=ops[2],
                        values=ops[3], header=ops[5:] if data_driven else None,
                        nonnull=ops[4] if data_driven else None, rows=_int_attr(cast, "ubp.rows"),
                        cols=_int_attr(cast, "ubp.cols"), layout=_str_attr(cast, "ubp.layout"))

    def _bundle(self, op: ir.Operation, memrefs: list[ir.Value]) -> ir.Value:
        """The handle as a cast of its memrefs (metadata kept as attributes of the cast)."""
        cast = builtin.UnrealizedConversionCastOp([op.results[0].type], memrefs)
        for key in ("rows", "cols", "layout"):
            cast.attributes[f"ubp.{key}"] = op.attributes[key]
        return cast.results[0]

    # -- operands -------------------------------------------------------------------------
    def dense_view(self, op: ir.Operation) -> list[ir.Value]:
        rows = _int_attr(op, "rows")
        n = op.operands[1]
        return [_memref_from_ptr(op.operands[0], [rows, n], ir.F32Type.get())]

    def sparse_weights(self, op: ir.Operation) -> list[ir.Value]:
        i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
        idx = ir.IndexType.get()
        rows, block = _int_attr(op, "rows"), _int_attr(op, "block")
        ptr = op.operands[0]
        nonnull = llvm.icmp(llvm.ICmpPredicate.ne, ptr, llvm.mlir_zero(ptr.type))
        raw = _memref_from_ptr(ptr, [_NOMINAL_BYTES], i8)
        raw = memref.cast(ir.Type.parse("memref<?xi8>"), raw)
        # The header is only read when packed_w is not NULL (check_weights then returns
        # ERR_NULL_WEIGHTS and nothing else is read); the views below never dereference.
        read = scf.IfOp(nonnull, [i32] * pk.HEADER_WORDS, has_else=True)
        with ir.InsertionPoint(read.then_block):
            header = memref.view(ir.MemRefType.get([pk.HEADER_WORDS], i32), raw, _i(0), [])
            scf.YieldOp([memref.load(header, [_i(k)]) for k in range(pk.HEADER_WORDS)])
        with ir.InsertionPoint(read.else_block):
            zero = arith.constant(i32, 0)
            scf.YieldOp([zero] * pk.HEADER_WORDS)
        words = list(read.results)

        def word(k: int) -> ir.Value:
            return arith.index_cast(idx, words[k])

        nblocks = word(pk.H_B)
        dyn_i32 = ir.Type.parse("memref<?xi32>")
        row_ptr = memref.view(ir.MemRefType.get([rows + block + 1], i32), raw, word(pk.H_OFF_ROW_PTR), [])
        brows = memref.view(dyn_i32, raw, word(pk.H_OFF_BLOCK_ROWS), [nblocks])
        # block_cols carries COL_PAD extra entries so that a prefetch may look ahead.
        bcols = memref.view(dyn_i32, raw, word(pk.H_OFF_BLOCK_COLS), [arith.addi(nblocks, _i(pk.COL_PAD))])
        nvals = arith.muli(nblocks, _i(block))
        vals = memref.view(ir.Type.parse("memref<?xf32>"), raw, word(pk.H_OFF_VALUES), [nvals])
        return [self._bundle(op, [row_ptr, brows, bcols, vals, nonnull, *words])]

    def baked_weights(self, op: ir.Operation) -> list[ir.Value]:
        i32, f32 = ir.IntegerType.get_signless(32), ir.F32Type.get()
        self.counter += 1
        tag = f"__ubp_w{self.counter}"
        gl = {}
        for key, elem in (("row_ptr", i32), ("block_rows", i32), ("block_cols", i32), ("values", f32)):
            attr = ir.DenseElementsAttr(op.attributes[key])
            if len(attr) == 0:  # a memref.global cannot be empty: keep one unused element
                attr = ir.DenseElementsAttr.get(np.zeros(1, np.float32 if elem == f32 else np.int32))
            gl[key] = _global_constant(self.module_op, f"{tag}_{key}", attr, elem)
        return [self._bundle(op, [gl["row_ptr"], gl["block_rows"], gl["block_cols"], gl["values"]])]

    def check_weights(self, op: ir.Operation) -> list[ir.Value]:
        """The status code of the weight operand (:mod:`ubpdsl.abi`): always OK when baked; else
        ERR_NULL_WEIGHTS for a NULL blob, ERR_HEADER when magic, version, M, K, N or layout differ,
        ERR_BAD_BLOB when B, the offsets or total_bytes are not those :func:`ubpdsl.packing.pack`
        writes for this M, K, N (O(1): the arrays themselves are trusted)."""
        rec = self.record(op.operands[0])
        if rec.header is None:
            return [_c32(abi.OK)]
        expected = {pk.H_MAGIC: pk.MAGIC, pk.H_VERSION: pk.VERSION, pk.H_M: rec.rows, pk.H_K: rec.cols,
                    pk.H_N: rec.block, pk.H_LAYOUT: pk.LAYOUT_CODES[rec.layout]}

        def sizes(nb: ir.Value) -> dict[int, ir.Value]:
            return {pk.H_OFF_ROW_PTR: _c64(4 * (rec.rows + rec.block + 1)),
                    pk.H_OFF_BLOCK_ROWS: arith.muli(nb, _c64(4)),
                    pk.H_OFF_BLOCK_COLS: arith.muli(arith.addi(nb, _c64(pk.COL_PAD)), _c64(4)),
                    pk.H_OFF_VALUES: arith.muli(nb, _c64(4 * rec.block))}

        match, consistent = _header_checks(rec.header, expected, pk.H_B, rec.cols * (rec.rows // rec.block),
                                           pk.padded(pk.HEADER_BYTES), sizes, pk.H_TOTAL_BYTES)
        code = arith.select(consistent, _c32(abi.OK), _c32(abi.ERR_BAD_BLOB))
        code = arith.select(match, code, _c32(abi.ERR_HEADER))
        return [arith.select(rec.nonnull, code, _c32(abi.ERR_NULL_WEIGHTS))]

    # -- block access -----------------------------------------------------------------------
    def row_blocks(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        idx = ir.IndexType.get()
        r = op.operands[1]
        lo = arith.index_cast(idx, memref.load(rec.row_ptr, [r]))
        hi = arith.index_cast(idx, memref.load(rec.row_ptr, [arith.addi(r, _i(1))]))
        return [lo, hi]

    def num_blocks(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        idx = ir.IndexType.get()
        if rec.header is not None:
            return [arith.index_cast(idx, rec.header[pk.H_B])]
        return [arith.index_cast(idx, memref.load(rec.row_ptr, [_i(rec.rows + rec.block)]))]

    def block_row(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        return [arith.index_cast(ir.IndexType.get(), memref.load(rec.block_rows, [op.operands[1]]))]

    def block_col(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        return [arith.index_cast(ir.IndexType.get(), memref.load(rec.block_cols, [op.operands[1]]))]

    def _weight(self, rec: _Weights, b: ir.Value, lane: int) -> ir.Value:
        pos = arith.addi(arith.muli(b, _i(rec.block)), _i(lane))
        return memref.load(rec.values, [pos])

    def block_weight(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        return [self._weight(rec, op.operands[1], _int_attr(op, "lane"))]

    def block_fma(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record(op.operands[0])
        b, x = op.operands[1], op.operands[2]
        accs = list(op.operands)[3:]
        if len(accs) != rec.block:
            raise BuildError(f"ubp.block_fma: needs {rec.block} accumulators, got {len(accs)}")
        xt = ir.VectorType(x.type)
        if xt.scalable and (rec.block % 4 == 0 or rec.block == 2) and xt.shape[0] % 4 == 0:
            return self._sve_block_fma(rec, b, x, accs)
        # One vector load of the block's N weights, each lane broadcast from it: AArch64 then
        # loads the block with one ldr q and FMAs by element (not N scalar loads).
        wvec = vector.load(ir.VectorType.get([rec.block], ir.F32Type.get()), rec.values,
                           [arith.muli(b, _i(rec.block))])
        out = []
        for lane, acc in enumerate(accs):
            w = vector.broadcast(x.type, vector.extract(wvec, [], [lane]))
            out.append(vector.fma(w, x, acc))
        return out

    def _sve_block_fma(self, rec: _Weights, b: ir.Value, x: ir.Value, accs: list[ir.Value]) -> list[ir.Value]:
        """SVE: each 4 weights replicated to every 128-bit segment (``dupq``) and FMAed by index
        (``fmla z.s, z.s, z.s[i]``), not broadcast lane by lane; x and the accumulators are
        handled as their ``vector<[4]xf32>`` registers. A block of 2 weights is loaded as 64 bits
        into the low half of each segment (``ldr d`` + ``dupq``; not ``ld1rd``, whose all-true
        predicate the masked tail cannot spare), not one ``dup`` per weight."""
        f32, i32, i64 = ir.F32Type.get(), ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
        reg = ir.VectorType.get([4], f32, scalable=[True])
        parts = ir.VectorType(x.type).shape[0] // 4
        xs = [vector.scalable_extract(reg, x, 4 * k) for k in range(parts)]
        out = []
        for lane, acc in enumerate(accs):
            if lane % 4 == 0:
                wq = vector.load(ir.VectorType.get([min(4, rec.block)], f32), rec.values,
                                 [arith.addi(arith.muli(b, _i(rec.block)), _i(lane))])
                ins = vector.scalable_insert(wq, llvm.mlir_poison(reg), 0)
                wdup = llvm.call_intrinsic(reg, "llvm.aarch64.sve.dupq.lane.nxv4f32",
                                           [ins, llvm.mlir_constant(ir.IntegerAttr.get(i64, 0))], [], [])
            idx = llvm.mlir_constant(ir.IntegerAttr.get(i32, lane % 4))
            for k in range(parts):
                a = vector.scalable_extract(reg, acc, 4 * k)
                r = llvm.call_intrinsic(reg, "llvm.aarch64.sve.fmla.lane.nxv4f32", [a, xs[k], wdup, idx], [], [])
                acc = vector.scalable_insert(r, acc, 4 * k)
            out.append(acc)
        return out

    # -- tiles ------------------------------------------------------------------------------
    def tiles(self, op: ir.Operation) -> list[ir.Value]:
        n = op.operands[0]
        width = _int_attr(op, "width")
        step = _i(width)
        if ir.BoolAttr(op.attributes["scalable"]).value:
            step = arith.muli(vector.vscale(), step)
        full = arith.muli(arith.divui(n, step), step)
        return [full, step]

    def _mask(self, vec_ty: ir.VectorType, col: ir.Value, limit: ir.Value) -> ir.Value:
        mask_ty = ir.VectorType.get(vec_ty.shape, ir.IntegerType.get_signless(1),
                                    scalable=vec_ty.scalable_dims)
        return vector.create_mask(mask_ty, [arith.subi(limit, col)])

    @staticmethod
    def _row_start(src: ir.Value, row: ir.Value, col: ir.Value) -> tuple[ir.Value, ir.Value]:
        """``src`` as a flat memref and the element index of (row, col), with row * n formed in bytes.

        The element offset is ``(row * (4 n)) >> 2`` (an exact shift): LLVM folds the shift into
        the 4-byte element scale, so the address is one multiply-add by the loop-invariant 4n
        (AArch64 ``madd``), not a multiply, a shift and an add per data-dependent row.
        """
        mr = ir.MemRefType(src.type)
        flat = memref.collapse_shape(ir.MemRefType.get([ir.ShapedType.get_dynamic_size()], mr.element_type),
                                     src, ir.ArrayAttr.get([ir.ArrayAttr.get([_i64_attr(0), _i64_attr(1)])]))
        n4 = arith.muli(memref.dim(src, _i(1)), _i(4))
        start = arith.shrsi(arith.muli(row, n4), _i(2), is_exact=True)
        return flat, arith.addi(start, col)

    @staticmethod
    def _rows_of(vec_ty: ir.VectorType) -> tuple[int, ir.VectorType] | None:
        """A 2-D tile ``vector<R x L x f32>`` (R registers of L lanes): (R, the register type)."""
        if vec_ty.rank != 2:
            return None
        return vec_ty.shape[0], ir.VectorType.get([vec_ty.shape[1]], vec_ty.element_type)

    def load_tile(self, op: ir.Operation) -> list[ir.Value]:
        src, row, col = op.operands[0], op.operands[1], op.operands[2]
        vec_ty = ir.VectorType(op.results[0].type)
        split = self._rows_of(vec_ty)
        if split is not None:  # one load per register, inserted into the 2-D tile
            regs, reg_ty = split
            lanes = reg_ty.shape[0]
            limit = op.operands[3] if len(op.operands) == 4 else None
            zero = ir.FloatAttr.get_f32(0.0)
            tile = arith.constant(vec_ty, ir.DenseElementsAttr.get_splat(vec_ty, zero))
            flat, at = self._row_start(src, row, col)
            for k in range(regs):
                c = arith.addi(col, _i(k * lanes))
                if limit is None:
                    part = vector.load(reg_ty, flat, [arith.addi(at, _i(k * lanes))])
                else:
                    part = vector.maskedload(reg_ty, src, [row, c], self._mask(reg_ty, c, limit),
                                             arith.constant(reg_ty, ir.DenseElementsAttr.get_splat(reg_ty, zero)))
                tile = vector.insert(part, tile, [], [k])
            return [tile]
        if len(op.operands) == 3:
            flat, at = self._row_start(src, row, col)
            return [vector.load(vec_ty, flat, [at])]
        zero = arith.constant(vec_ty, ir.DenseElementsAttr.get_splat(vec_ty, ir.FloatAttr.get_f32(0.0)))
        mask = self._mask(vec_ty, col, op.operands[3])
        return [vector.maskedload(vec_ty, src, [row, col], mask, zero)]

    def store_tile(self, op: ir.Operation) -> list[ir.Value]:
        dst, row, col, val = (op.operands[i] for i in range(4))
        split = self._rows_of(ir.VectorType(val.type))
        if split is not None:  # one store per register of the 2-D tile
            regs, reg_ty = split
            lanes = reg_ty.shape[0]
            nontemporal = "ubp.nontemporal" in op.attributes and len(op.operands) == 4
            flat, at = self._row_start(dst, row, col)
            for k in range(regs):
                part = vector.extract(val, [], [k])
                if len(op.operands) == 4:
                    vector.store(part, flat, [arith.addi(at, _i(k * lanes))],
                                 nontemporal=True if nontemporal else None)
                else:
                    c = arith.addi(col, _i(k * lanes))
                    vector.maskedstore(dst, [row, c], self._mask(reg_ty, c, op.operands[4]), part)
            return []
        if len(op.operands) == 4:
            nontemporal = "ubp.nontemporal" in op.attributes
            flat, at = self._row_start(dst, row, col)
            vector.store(val, flat, [at], nontemporal=True if nontemporal else None)
        else:
            mask = self._mask(ir.VectorType(val.type), col, op.operands[4])
            vector.maskedstore(dst, [row, col], mask, val)
        return []

    def _global(self, name: str, attr: ir.DenseElementsAttr, elem: ir.Type, constant: bool) -> ir.Value:
        """A private module-level memref.global (``constant=False``: zero-filled .bss, not file bytes)."""
        mr_ty = ir.MemRefType.get([len(attr)], elem)
        with ir.InsertionPoint.at_block_begin(self.module_op.regions[0].blocks[0]):
            memref.global_(name, ir.TypeAttr.get(mr_ty), sym_visibility="private",
                           initial_value=attr, constant=constant, alignment=64)
        return memref.get_global(mr_ty, name)

    @staticmethod
    def _address(mr: ir.Value) -> ir.Value:
        """The i64 address of a memref's first element."""
        i64 = ir.IntegerType.get_signless(64)
        return arith.index_cast(i64, memref.extract_aligned_pointer_as_index(mr))

    def epilogue_view(self, op: ir.Operation) -> list[ir.Value]:
        """Read the ``ubp_epilogue`` struct (:data:`ubpdsl.abi.EPILOGUE_LAYOUT`) once, branch-free:
        a NULL ``ep`` reads a constant default struct (version 1, no flags, no bias or residual);
        a NULL bias reads a zero array of M floats (so each store adds bias[r] unconditionally)."""
        i32, i64, f32 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.F32Type.get()
        rows = _int_attr(op, "rows")
        ep, n = op.operands[0], op.operands[1]
        ptr_ty = ep.type
        self.counter += 1
        tag = f"__ubp_ep{self.counter}"
        default = np.zeros(abi.EPILOGUE_BYTES // 4, np.int32)
        default[0] = abi.EPILOGUE_VERSION
        dflt = self._address(self._global(f"{tag}_default", ir.DenseElementsAttr.get(default), i32, True))
        zeros = self._address(self._global(f"{tag}_zero_bias", ir.DenseElementsAttr.get(np.zeros(rows, np.float32)),
                                           f32, False))
        nonnull = llvm.icmp(llvm.ICmpPredicate.ne, ep, llvm.mlir_zero(ptr_ty))
        addr = arith.select(nonnull, llvm.ptrtoint(i64, ep), dflt)
        base = llvm.inttoptr(ptr_ty, addr)
        words = _memref_from_ptr(base, [abi.EPILOGUE_BYTES // 4], i32)
        quads = _memref_from_ptr(base, [abi.EPILOGUE_BYTES // 8], i64)
        floats = _memref_from_ptr(base, [abi.EPILOGUE_BYTES // 4], f32)
        offsets = {name: off for name, _, off in abi.EPILOGUE_LAYOUT}
        version = memref.load(words, [_i(offsets["version"] // 4)])
        flags = memref.load(words, [_i(offsets["flags"] // 4)])
        bias_i = memref.load(quads, [_i(offsets["bias"] // 8)])
        res_i = memref.load(quads, [_i(offsets["residual"] // 8)])
        lo = memref.load(floats, [_i(offsets["lo"] // 4)])
        hi = memref.load(floats, [_i(offsets["hi"] // 4)])
        zero64 = arith.constant(i64, 0)
        ok = arith.andi(_eq(version, _c32(abi.EPILOGUE_VERSION)),
                        _eq(arith.andi(flags, _c32(~abi.EP_KNOWN_FLAGS)), _c32(0)))
        clamp = arith.cmpi(arith.CmpIPredicate.ne, arith.andi(flags, _c32(abi.EP_CLAMP)), _c32(0))
        # a NaN bound would be skipped by the clamp's compares (a silent wrong result): refused
        nan_bound = arith.ori(arith.cmpf(arith.CmpFPredicate.UNO, lo, lo), arith.cmpf(arith.CmpFPredicate.UNO, hi, hi))
        ok = arith.andi(ok, arith.xori(arith.andi(clamp, nan_bound), arith.constant(ir.IntegerType.get_signless(1), 1)))
        code = arith.select(ok, _c32(abi.OK), _c32(abi.ERR_BAD_EPILOGUE))
        lo = arith.select(clamp, lo, arith.constant(f32, float("-inf")))
        hi = arith.select(clamp, hi, arith.constant(f32, float("inf")))
        has_bias = arith.cmpi(arith.CmpIPredicate.ne, bias_i, zero64)
        bias_ptr = llvm.inttoptr(ptr_ty, arith.select(has_bias, bias_i, zeros))
        bias = _memref_from_ptr(bias_ptr, [rows], f32)
        residual = _memref_from_ptr(llvm.inttoptr(ptr_ty, res_i), [rows, n], f32)
        has_res = arith.cmpi(arith.CmpIPredicate.ne, res_i, zero64)
        return [code, bias, residual, has_res, lo, hi]

    def prefetch_tile(self, op: ir.Operation) -> list[ir.Value]:
        src, row, col = op.operands[0], op.operands[1], op.operands[2]
        floats_per_line = 16  # 64-byte cache lines
        lines = max(1, (_int_attr(op, "width") + floats_per_line - 1) // floats_per_line)
        write = "ubp.write" in op.attributes
        flat, at = self._row_start(src, row, col)
        for i in range(lines):
            c = at if i == 0 else arith.addi(at, _i(i * floats_per_line))
            memref.prefetch(flat, [c], is_write=write, locality_hint=3, is_data_cache=True)
        return []

    # -- the pattern-sparse operand (direct 3x3 convolution) -------------------------------
    def pattern_weights(self, op: ir.Operation) -> list[ir.Value]:
        """Views into the pattern blob at the offsets its header gives (read only when not NULL)."""
        i8, i32 = ir.IntegerType.get_signless(8), ir.IntegerType.get_signless(32)
        idx = ir.IndexType.get()
        rows = _int_attr(op, "rows")
        lib = np.asarray(ir.DenseElementsAttr(op.attributes["library"]), np.int32)
        P = lib.size // pk.PATTERN_TAPS
        ptr = op.operands[0]
        nonnull = llvm.icmp(llvm.ICmpPredicate.ne, ptr, llvm.mlir_zero(ptr.type))
        raw = memref.cast(ir.Type.parse("memref<?xi8>"), _memref_from_ptr(ptr, [_NOMINAL_BYTES], i8))
        words_n = pk.PATTERN_HEADER_WORDS
        read = scf.IfOp(nonnull, [i32] * words_n, has_else=True)
        with ir.InsertionPoint(read.then_block):
            header = memref.view(ir.MemRefType.get([words_n], i32), raw, _i(0), [])
            scf.YieldOp([memref.load(header, [_i(k)]) for k in range(words_n)])
        with ir.InsertionPoint(read.else_block):
            scf.YieldOp([arith.constant(i32, 0)] * words_n)
        words = list(read.results)

        def word(k: int) -> ir.Value:
            return arith.index_cast(idx, words[k])

        nk = word(pk.P_NK)
        dyn_i32, dyn_f32 = ir.Type.parse("memref<?xi32>"), ir.Type.parse("memref<?xf32>")
        order = memref.view(ir.MemRefType.get([rows], i32), raw, word(pk.P_OFF_FILTER_ORDER), [])
        gptr = memref.view(ir.MemRefType.get([rows * P + 1], i32), raw, word(pk.P_OFF_GROUP_PTR), [])
        chan = memref.view(dyn_i32, raw, word(pk.P_OFF_KERNEL_CHAN), [nk])
        vals = memref.view(dyn_f32, raw, word(pk.P_OFF_VALUES), [arith.muli(nk, _i(pk.PATTERN_TAPS))])
        cast = builtin.UnrealizedConversionCastOp([op.results[0].type], [order, gptr, chan, vals, raw, nonnull,
                                                                        *words])
        for key in ("rows", "cols", "height", "width", "library"):
            cast.attributes[f"ubp.{key}"] = op.attributes[key]
        return [cast.results[0]]

    def record_patterns(self, value: ir.Value) -> _Patterns:
        cast = value.owner
        cast = getattr(cast, "operation", cast)
        if cast.name != "builtin.unrealized_conversion_cast" or "ubp.library" not in cast.attributes:
            raise BuildError("ubp lowering: a patterns operand does not come from ubp.pattern_weights")
        ops = list(cast.operands)
        lib = np.asarray(ir.DenseElementsAttr(cast.attributes["ubp.library"]), np.int32)
        return _Patterns(*ops[:6], header=ops[6:], rows=_int_attr(cast, "ubp.rows"), cols=_int_attr(cast, "ubp.cols"),
                         height=_int_attr(cast, "ubp.height"), width=_int_attr(cast, "ubp.width"),
                         library=lib.reshape(-1, pk.PATTERN_TAPS))

    def check_patterns(self, op: ir.Operation) -> list[ir.Value]:
        """ERR_NULL_WEIGHTS for a NULL blob, ERR_HEADER when magic, version, M, K, P, T or the library
        differ from the kernel's, ERR_BAD_BLOB when NK, the offsets or total_bytes are not those
        :func:`ubpdsl.packing.pack_pattern` writes or group_ptr does not run from 0 to NK,
        ERR_BAD_PIXELS when n != H * W; else OK."""
        rec = self.record_patterns(op.operands[0])
        n = op.operands[1]
        i1, i32, i64 = (ir.IntegerType.get_signless(b) for b in (1, 32, 64))
        P, T = rec.library.shape
        expected = {pk.P_MAGIC: pk.PATTERN_MAGIC, pk.P_VERSION: pk.PATTERN_VERSION, pk.P_M: rec.rows,
                    pk.P_K: rec.cols, pk.P_P: P, pk.P_T: T}

        def sizes(nk: ir.Value) -> dict[int, ir.Value]:
            return {pk.P_OFF_LIBRARY: _c64(4 * P * T), pk.P_OFF_FILTER_ORDER: _c64(4 * rec.rows),
                    pk.P_OFF_GROUP_PTR: _c64(4 * (rec.rows * P + 1)), pk.P_OFF_KERNEL_CHAN: arith.muli(nk, _c64(4)),
                    pk.P_OFF_VALUES: arith.muli(nk, _c64(4 * T))}

        match, consistent = _header_checks(rec.header, expected, pk.P_NK, rec.rows * rec.cols,
                                           pk.padded(pk.PATTERN_HEADER_BYTES), sizes, pk.P_TOTAL_BYTES)
        # The library (and group_ptr's two ends) are read only from a blob whose header matches and is
        # consistent; group_ptr must run from 0 to NK, the kernel count the header sizes its arrays by.
        lib_ok = scf.IfOp(arith.andi(match, consistent), [i1, i1], has_else=True)
        with ir.InsertionPoint(lib_ok.then_block):
            view = memref.view(ir.MemRefType.get([P * T], i32), rec.raw, _i(pk.padded(pk.PATTERN_HEADER_BYTES)), [])
            same = arith.constant(i1, 1)
            for q, want in enumerate(rec.library.reshape(-1)):
                same = arith.andi(same, _eq(memref.load(view, [_i(q)]), _c32(int(want))))
            ends = arith.andi(_eq(memref.load(rec.group_ptr, [_i(0)]), _c32(0)),
                              _eq(memref.load(rec.group_ptr, [_i(rec.rows * P)]), rec.header[pk.P_NK]))
            scf.YieldOp([same, ends])
        with ir.InsertionPoint(lib_ok.else_block):
            scf.YieldOp([arith.constant(i1, 0), arith.constant(i1, 0)])
        code = arith.select(_eq(arith.index_cast(i64, n), _c64(rec.height * rec.width)), _c32(abi.OK),
                            _c32(abi.ERR_BAD_PIXELS))
        code = arith.select(lib_ok.results[1], code, _c32(abi.ERR_BAD_BLOB))
        code = arith.select(lib_ok.results[0], code, _c32(abi.ERR_HEADER))
        code = arith.select(consistent, code, _c32(abi.ERR_BAD_BLOB))
        code = arith.select(match, code, _c32(abi.ERR_HEADER))
        return [arith.select(rec.nonnull, code, _c32(abi.ERR_NULL_WEIGHTS))]

    def filter_channel(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record_patterns(op.operands[0])
        return [arith.index_cast(ir.IndexType.get(), memref.load(rec.filter_order, [op.operands[1]]))]

    def pattern_kernels(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record_patterns(op.operands[0])
        idx = ir.IndexType.get()
        at = arith.addi(arith.muli(op.operands[1], _i(rec.library.shape[0])), _i(_int_attr(op, "pattern")))
        lo = arith.index_cast(idx, memref.load(rec.group_ptr, [at]))
        hi = arith.index_cast(idx, memref.load(rec.group_ptr, [arith.addi(at, _i(1))]))
        return [lo, hi]

    def kernel_channel(self, op: ir.Operation) -> list[ir.Value]:
        rec = self.record_patterns(op.operands[0])
        return [arith.index_cast(ir.IndexType.get(), memref.load(rec.kernel_chan, [op.operands[1]]))]

    def tap_weight(self, op: ir.Operation) -> list[ir.Value]:
        """One vector load of the kernel's T weights (CSE shares it between the taps), one lane of it:
        AArch64 then FMAs by element from one ``ldr q``."""
        rec = self.record_patterns(op.operands[0])
        T = rec.library.shape[1]
        wvec = vector.load(ir.VectorType.get([T], ir.F32Type.get()), rec.values, [arith.muli(op.operands[1], _i(T))])
        return [vector.extract(wvec, [], [_int_attr(op, "tap")])]

    def shift_tile(self, op: ir.Operation) -> list[ir.Value]:
        """Lanes moved by ``shift`` (-1: up, lane i = v[i - 1]; 1: down, lane i = v[i + 1]), a zero shifted
        in: a shuffle with a zero vector (fixed width; NEON ``ext``), ``llvm.vector.splice.left/right`` per SVE
        register."""
        v = op.operands[0]
        shift = _int_attr(op, "shift")
        vt = ir.VectorType(v.type)
        width = vt.shape[0]
        zero = arith.constant(vt, ir.DenseElementsAttr.get_splat(vt, ir.FloatAttr.get_f32(0.0)))
        if not vt.scalable:
            # one contiguous window of the concatenation (a single NEON ``ext``)
            if shift < 0:
                return [vector.shuffle(zero, v, list(range(width - 1, 2 * width - 1)))]
            return [vector.shuffle(v, zero, list(range(1, width + 1)))]
        f32, i32 = ir.F32Type.get(), ir.IntegerType.get_signless(32)
        reg = ir.VectorType.get([4], f32, scalable=[True])
        parts = [vector.scalable_extract(reg, v, 4 * k) for k in range(width // 4)]
        zreg = arith.constant(reg, ir.DenseElementsAttr.get_splat(reg, ir.FloatAttr.get_f32(0.0)))
        imm = llvm.mlir_constant(ir.IntegerAttr.get(i32, 1))
        # LLVM 22: splice.right(a, b, 1) = a's last lane, then b; splice.left(a, b, 1) = a from lane 1, then b
        name = "llvm.vector.splice.right.nxv4f32" if shift < 0 else "llvm.vector.splice.left.nxv4f32"
        out = zero
        for k in range(len(parts)):
            if shift < 0:
                a, b = (parts[k - 1] if k else zreg), parts[k]
            else:
                a, b = parts[k], (parts[k + 1] if k + 1 < len(parts) else zreg)
            r = llvm.call_intrinsic(reg, name, [a, b, imm], [], [])
            out = vector.scalable_insert(r, out, 4 * k)
        return [out]

    def materialize_weights(self) -> None:
        handles: list[ir.Operation] = []

        def collect(o: ir.Operation) -> ir.WalkResult:
            if o.name in ("ubp.sparse_weights", "ubp.baked_weights", "ubp.pattern_weights"):
                handles.append(o)
            return ir.WalkResult.ADVANCE

        self.module_op.walk(collect, ir.WalkOrder.PRE_ORDER)
        for o in handles:
            with ir.InsertionPoint(o), o.location:
                (bundle,) = getattr(self, o.name.split(".", 1)[1])(o)
            o.results[0].replace_all_uses_with(bundle)
            o.erase()

    def patterns(self) -> RewritePatternSet:
        """One Python rewrite pattern per remaining ubp op."""
        patterns = RewritePatternSet()
        for name in ("dense_view", "check_weights", "num_blocks", "row_blocks", "block_row", "block_col",
                     "block_weight", "block_fma", "tiles", "load_tile", "store_tile", "prefetch_tile",
                     "epilogue_view",
                     "check_patterns", "filter_channel", "pattern_kernels", "kernel_channel", "tap_weight",
                     "shift_tile"):
            patterns.add(f"ubp.{name}", self._pattern(getattr(self, name)))
        return patterns

    @staticmethod
    def _pattern(build):  # noqa: ANN001, ANN205 - (op) -> list[Value]
        def rewrite(op: ir.Operation, rewriter: PatternRewriter) -> None:
            with rewriter.ip, op.location:
                values = build(op)
            if values:
                rewriter.replace_op(op, values)
            else:
                rewriter.erase_op(op.operation)

        return rewrite

    def run(self) -> None:
        self.materialize_weights()
        config = GreedyRewriteConfig()
        apply_patterns_and_fold_greedily(self.module_op, self.patterns().freeze(), config)
        leftover: list[str] = []

        def check(o: ir.Operation) -> ir.WalkResult:
            if o.name.startswith("ubp."):
                leftover.append(o.name)
            return ir.WalkResult.ADVANCE

        self.module_op.walk(check, ir.WalkOrder.PRE_ORDER)
        if leftover:
            raise BuildError(f"ubp lowering left ops behind: {', '.join(sorted(set(leftover)))}")


def _block_of(weights_type: ir.Type) -> int:
    """N of a ``!ubp.weights<N : i64>`` type."""
    text = str(weights_type)
    try:
        return int(text[text.index("<") + 1:].split(":")[0])
    except ValueError:
        raise BuildError(f"ubp lowering: malformed weights type {text}") from None


def lower_ubp(module: ir.Module | ir.Operation) -> None:
    """Rewrite all ``ubp`` ops of ``module`` into upstream dialects (in place)."""
    module_op = module.operation if isinstance(module, ir.Module) else module
    _Lowering(module_op).run()


def _python_pass(op: ir.Operation, pass_) -> None:  # noqa: ANN001 - ExternalPass
    try:
        lower_ubp(op)
    except BuildError:
        pass_.signal_pass_failure()
        raise


CLEANUP = "canonicalize,cse,loop-invariant-code-motion,canonicalize,cse"
TO_LLVM = (
    "convert-vector-to-scf,lower-affine,convert-scf-to-cf,"
    "convert-vector-to-llvm,convert-ub-to-llvm,"
    "expand-strided-metadata,finalize-memref-to-llvm,convert-arith-to-llvm,convert-index-to-llvm,"
    "convert-func-to-llvm,convert-cf-to-llvm,reconcile-unrealized-casts,canonicalize,cse"
)


def lower_to_upstream(module: ir.Module) -> None:
    """ubp -> scf/vector/memref/arith (the ``lowered`` stage), cleaned up."""
    pm = PassManager("builtin.module")
    pm.add(_python_pass, name="ubp-lower", argument="ubp-lower",
           description="lower the ubp dialect to memref/vector/arith")
    pm.add(CLEANUP)
    _run(pm, module, "ubp lowering")


def lower_to_llvm(module: ir.Module) -> None:
    """The ``lowered`` stage -> the LLVM dialect (the ``llvm`` stage)."""
    pm = PassManager.parse(f"builtin.module({TO_LLVM})")
    _run(pm, module, "lowering to the LLVM dialect")


def translate_to_llvm_ir(module: ir.Module) -> str:
    """LLVM dialect module -> LLVM IR text."""
    return str(llvm_dialect.translate_module_to_llvmir(module.operation))


def _run(pm: PassManager, module: ir.Module, what: str) -> None:
    try:
        pm.run(module.operation)
    except ir.MLIRError as exc:  # pragma: no cover - compiler bug, reported verbatim
        raise BuildError(f"{what} failed: {exc}") from None
