"""The ``ubp`` MLIR dialect, defined with IRDL through the Python bindings (no C++).

``ubp`` describes an unaligned-block sparse GEMM kernel Y[M, n] = W[M, K] . X[K, n] at the
level of its structure: the operands (dense activations viewed from raw C pointers, the
block-sparse weight operand read from a packed blob or baked into the code), iteration over
the blocks that start at a row (a row group), per-block access (start row, column, weights),
the block FMA that updates N accumulator rows at once, and tiles over n with a masked tail.
Loops themselves are upstream ``scf.for`` / ``scf.if``: IRDL cannot declare terminators, so
``ubp`` keeps to region-free ops and the loop nest stays in a dialect every pass knows.

The ops (generic syntax; every op verifies its operand and result types):

* ``ubp.dense_view(%ptr: !llvm.ptr, %n: index) {rows}``            -> ``memref<rows x ? x f32>``
* ``ubp.sparse_weights(%packed: !llvm.ptr) {rows, cols, block, layout}`` -> ``!ubp.weights<N>``
* ``ubp.baked_weights() {rows, cols, block, layout, row_ptr, block_rows, block_cols, values}``
  -> ``!ubp.weights<N>`` (the mask-specialised operand: the block structure is constant data)
* ``ubp.check_weights(%W)`` -> ``i32``: the status of the weight operand, a return code of
  :mod:`ubpdsl.abi` (0: the packed blob's header matches the kernel; always 0 when baked)
* ``ubp.num_blocks(%W)`` -> ``index``: B, the number of blocks (bounds-checked builds)
* ``ubp.row_blocks(%W, %r)`` -> ``(index, index)``: the blocks starting at row r are [lo, hi)
* ``ubp.block_row(%W, %b)``, ``ubp.block_col(%W, %b)`` -> ``index``
* ``ubp.block_weight(%W, %b) {lane}`` -> ``f32``
* ``ubp.block_fma(%W, %b, %x, %acc_0 .. %acc_{N-1})`` -> N x ``vector<T x f32>``:
  acc_i += w(b, i) * x (the N accumulator rows stay separate SSA values: registers)
* ``ubp.pattern_weights(%packed: !llvm.ptr) {rows, cols, height, width, library}`` ->
  ``!ubp.patterns<P>``: the pattern-sparse weight of a 3x3 convolution (PatDNN), read from a
  pattern blob (:func:`ubpdsl.packing.pack_pattern`); the library (int32[P, 4] taps) is compiled in
* ``ubp.check_patterns(%W, %n)`` -> ``i32``: 0, or the :mod:`ubpdsl.abi` code of a NULL,
  mismatching (header or library) or inconsistent blob, or of n != height * width
* ``ubp.filter_channel(%W, %f)``, ``ubp.kernel_channel(%W, %k)`` -> ``index``
* ``ubp.pattern_kernels(%W, %f) {pattern}`` -> ``(index, index)``: the kernels of filter f with that pattern
* ``ubp.tap_weight(%W, %k) {tap}`` -> ``f32``
* ``ubp.shift_tile(%v) {shift}`` -> the tile moved by ``shift`` (-1 or 1) lanes, a zero shifted in
  (shift -1: lane i = v[i - 1], lane 0 = 0; shift 1: lane i = v[i + 1], the last lane 0)
* ``ubp.tiles(%n) {width, scalable}`` -> ``(index, index)``: end of the full tiles, tile step
* ``ubp.load_tile(%X, %row, %col0[, %limit])`` -> ``vector<T x f32>`` (masked when limit given)
* ``ubp.store_tile(%Y, %row, %col0, %v[, %limit])``; a ``ubp.nontemporal`` unit attribute
  asks for streaming (cache-bypassing) stores
* ``ubp.epilogue_view(%ep: !llvm.ptr, %n: index) {rows}`` -> ``(i32 code, memref<rows x f32> bias,
  memref<rows x ? x f32> residual, i1 has_residual, f32 lo, f32 hi)``: the ``ubp_epilogue``
  struct of a ``_ep`` entry point (:mod:`ubpdsl.abi`) read once: its status code, the bias
  (zeros when NULL), the residual view, and the clamp bounds (-inf, +inf when not clamping;
  a NULL ``ep`` is no epilogue)
* ``ubp.prefetch_tile(%X, %row, %col0) {width}``: prefetch the cache lines of a tile; a
  ``ubp.write`` unit attribute prefetches with intent to write (an output tile about to be stored)
"""

from __future__ import annotations

from mlir import ir
from mlir.dialects import irdl

DIALECT_NAME = "ubp"

# The dialect definition in IRDL's own syntax: readable, and parsed by the bindings.
IRDL_SOURCE = r"""
irdl.dialect @ubp {
  irdl.type @weights {
    %n = irdl.any
    irdl.parameters(block: %n)
  }

  irdl.operation @dense_view {
    %ptr = irdl.is !llvm.ptr
    %idx = irdl.is index
    irdl.operands(ptr: %ptr, n: %idx)
    %rows = irdl.base "#builtin.integer"
    irdl.attributes {"rows" = %rows}
    %mr = irdl.base "!builtin.memref"
    irdl.results(view: %mr)
  }

  irdl.operation @sparse_weights {
    %ptr = irdl.is !llvm.ptr
    irdl.operands(packed: %ptr)
    %r = irdl.base "#builtin.integer"
    %c = irdl.base "#builtin.integer"
    %n = irdl.base "#builtin.integer"
    %s = irdl.base "#builtin.string"
    irdl.attributes {"rows" = %r, "cols" = %c, "block" = %n, "layout" = %s}
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    irdl.results(weights: %w)
  }

  irdl.operation @baked_weights {
    irdl.operands()
    %r = irdl.base "#builtin.integer"
    %c = irdl.base "#builtin.integer"
    %n = irdl.base "#builtin.integer"
    %s = irdl.base "#builtin.string"
    %d0 = irdl.base "#builtin.dense_int_or_fp_elements"
    %d1 = irdl.base "#builtin.dense_int_or_fp_elements"
    %d2 = irdl.base "#builtin.dense_int_or_fp_elements"
    %d3 = irdl.base "#builtin.dense_int_or_fp_elements"
    irdl.attributes {"rows" = %r, "cols" = %c, "block" = %n, "layout" = %s,
                     "row_ptr" = %d0, "block_rows" = %d1, "block_cols" = %d2, "values" = %d3}
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    irdl.results(weights: %w)
  }

  irdl.type @patterns {
    %p = irdl.any
    irdl.parameters(patterns: %p)
  }

  irdl.operation @pattern_weights {
    %ptr = irdl.is !llvm.ptr
    irdl.operands(packed: %ptr)
    %r = irdl.base "#builtin.integer"
    %c = irdl.base "#builtin.integer"
    %h = irdl.base "#builtin.integer"
    %wd = irdl.base "#builtin.integer"
    %lib = irdl.base "#builtin.dense_int_or_fp_elements"
    irdl.attributes {"rows" = %r, "cols" = %c, "height" = %h, "width" = %wd, "library" = %lib}
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    irdl.results(weights: %w)
  }

  irdl.operation @check_patterns {
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, n: %idx)
    %c = irdl.is i32
    irdl.results(code: %c)
  }

  irdl.operation @filter_channel {
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, filter: %idx)
    irdl.results(channel: %idx)
  }

  irdl.operation @pattern_kernels {
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, filter: %idx)
    %i = irdl.base "#builtin.integer"
    irdl.attributes {"pattern" = %i}
    irdl.results(lo: %idx, hi: %idx)
  }

  irdl.operation @kernel_channel {
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, kernel: %idx)
    irdl.results(channel: %idx)
  }

  irdl.operation @tap_weight {
    %any = irdl.any
    %w = irdl.parametric @ubp::@patterns<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, kernel: %idx)
    %i = irdl.base "#builtin.integer"
    irdl.attributes {"tap" = %i}
    %f = irdl.is f32
    irdl.results(value: %f)
  }

  irdl.operation @shift_tile {
    %vec = irdl.base "!builtin.vector"
    irdl.operands(tile: %vec)
    %i = irdl.base "#builtin.integer"
    irdl.attributes {"shift" = %i}
    irdl.results(result: %vec)
  }

  irdl.operation @check_weights {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    irdl.operands(weights: %w)
    %c = irdl.is i32
    irdl.results(code: %c)
  }

  irdl.operation @num_blocks {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    irdl.operands(weights: %w)
    %idx = irdl.is index
    irdl.results(count: %idx)
  }

  irdl.operation @row_blocks {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, row: %idx)
    irdl.results(lo: %idx, hi: %idx)
  }

  irdl.operation @block_row {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, block: %idx)
    irdl.results(row: %idx)
  }

  irdl.operation @block_col {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, block: %idx)
    irdl.results(col: %idx)
  }

  irdl.operation @block_weight {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    %idx = irdl.is index
    irdl.operands(weights: %w, block: %idx)
    %i = irdl.base "#builtin.integer"
    irdl.attributes {"lane" = %i}
    %f = irdl.is f32
    irdl.results(value: %f)
  }

  irdl.operation @block_fma {
    %any = irdl.any
    %w = irdl.parametric @ubp::@weights<%any>
    %idx = irdl.is index
    %x = irdl.base "!builtin.vector"
    irdl.operands(weights: %w, block: %idx, x: %x, acc: variadic %x)
    irdl.results(result: variadic %x)
  }

  irdl.operation @tiles {
    %idx = irdl.is index
    irdl.operands(n: %idx)
    %i = irdl.base "#builtin.integer"
    %t = irdl.is true
    %f = irdl.is false
    %b = irdl.any_of(%t, %f)
    irdl.attributes {"width" = %i, "scalable" = %b}
    irdl.results(full_end: %idx, step: %idx)
  }

  irdl.operation @load_tile {
    %mr = irdl.base "!builtin.memref"
    %idx = irdl.is index
    irdl.operands(source: %mr, row: %idx, col: %idx, limit: optional %idx)
    %vec = irdl.base "!builtin.vector"
    irdl.results(tile: %vec)
  }

  irdl.operation @prefetch_tile {
    %mr = irdl.base "!builtin.memref"
    %idx = irdl.is index
    irdl.operands(source: %mr, row: %idx, col: %idx)
    %w = irdl.base "#builtin.integer"
    irdl.attributes {"width" = %w}
    irdl.results()
  }

  irdl.operation @epilogue_view {
    %ptr = irdl.is !llvm.ptr
    %idx = irdl.is index
    irdl.operands(ep: %ptr, n: %idx)
    %rows = irdl.base "#builtin.integer"
    irdl.attributes {"rows" = %rows}
    %c = irdl.is i32
    %mb = irdl.base "!builtin.memref"
    %mr = irdl.base "!builtin.memref"
    %b = irdl.is i1
    %f = irdl.is f32
    irdl.results(code: %c, bias: %mb, residual: %mr, has_residual: %b, lo: %f, hi: %f)
  }

  irdl.operation @store_tile {
    %mr = irdl.base "!builtin.memref"
    %idx = irdl.is index
    %vec = irdl.base "!builtin.vector"
    irdl.operands(dest: %mr, row: %idx, col: %idx, value: %vec, limit: optional %idx)
    irdl.results()
  }
}
"""


def load_ubp_dialect(context: ir.Context | None = None) -> None:
    """Register the ``ubp`` dialect in ``context`` (or the current one); idempotent."""
    ctx = context or ir.Context.current
    if getattr(ctx, "_ubp_loaded", False):
        return
    with ctx, ir.Location.unknown():
        definition = ir.Module.parse(IRDL_SOURCE)
        irdl.load_dialects(definition)
    # Keep the definition module alive as long as the context.
    ctx._ubp_definition = definition  # type: ignore[attr-defined]
    ctx._ubp_loaded = True  # type: ignore[attr-defined]


def make_context() -> ir.Context:
    """A fresh MLIR context with the ``ubp`` dialect loaded."""
    ctx = ir.Context()
    load_ubp_dialect(ctx)
    return ctx


def weights_type(block: int) -> ir.Type:
    """The ``!ubp.weights<N>`` type (in the current context)."""
    return ir.Type.parse(f"!ubp.weights<{block} : i64>")


def patterns_type(num_patterns: int) -> ir.Type:
    """The ``!ubp.patterns<P>`` type (in the current context)."""
    return ir.Type.parse(f"!ubp.patterns<{num_patterns} : i64>")


def op(name: str, operands: list[ir.Value], results: list[ir.Type] | None = None,
       attributes: dict[str, ir.Attribute] | None = None) -> ir.Operation:
    """Create a ``ubp.<name>`` op at the current insertion point."""
    return ir.Operation.create(
        f"{DIALECT_NAME}.{name}",
        results=results or [],
        operands=operands,
        attributes=attributes or {},
    )
