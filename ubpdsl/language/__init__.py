"""The ubpdsl kernel language: what a kernel author imports (``import ubpdsl.language as ubl``).

A kernel is a Python function decorated with :func:`kernel`. Its parameters are typed:
``ubl.Input`` (the dense activations X[K, n]), ``ubl.Output`` (Y[M, n], fully written by the
kernel), ``ubl.BlockSparse`` (the weight operand W[M, K] made of N x 1 blocks that may start at
any row) and ``ubl.constexpr`` (compile-time constants: tile width, unroll, strategy flags).
The body is not run by Python: it is parsed from its AST and compiled to the ``ubp`` MLIR
dialect (see :mod:`ubpdsl.language.frontend`). Example::

    @ubl.kernel(layout="plain")
    def stream(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2):
        for j in ubl.tiles(X.n, TILE):
            for r in range(W.rows):
                ubl.store(Y, r, j, ubl.zeros(j))
            for r in range(W.rows):
                lo, hi = W.row_blocks(r)
                for b in range(lo, hi):
                    x = ubl.load(X, W.block_col(b), j)
                    for i in ubl.static_range(W.block):
                        y = ubl.load(Y, r + i, j)
                        ubl.store(Y, r + i, j, ubl.fma(W.weight(b, i), x, y))

Inside a kernel:

* ``for j in ubl.tiles(n, TILE)`` walks n in tiles of TILE vector registers. The tail (n not a
  multiple of the tile) gives the same result on every target: if the loop body loads from the
  ``ubl.Output`` (a read-modify-write of Y), the tail always runs masked on the leftover columns,
  so no column is processed twice; otherwise (and with the default ``tail="overlap"``) it may
  rerun the body on the last whole tile ending at n, overlapping the previous one (a body that
  writes its Y tile from registers only gets the same values), masked only when n is smaller
  than one tile. ``tail="mask"`` asks for the masked tail in any case. On x86-64, where masked
  loads and stores are cheap, the tail is always a masked tile of just enough registers (the
  body is emitted once per register count up to TILE).
* ``ubl.prefetch(Y, r, j, write=True)`` prefetches an output tile with intent to write.
* ``range(lo, hi[, step])`` is a loop in the generated code (``scf.for``); ``ubl.range(...,
  unroll=U)`` unrolls it U times with a remainder loop; ``ubl.static_range`` unrolls it fully
  at compile time (its bounds must be compile-time constants). Limits (a DSLError at the
  loop's line, before any code is emitted): ``frontend.MAX_UNROLL``, ``MAX_STATIC_TRIPS``
  iterations per static_range and ``MAX_STATEMENTS`` emitted statements per kernel.
* Variables assigned in a loop or a data-dependent ``if`` are carried as SSA values (registers).
* ``ubl.prefetch(X, row, j)`` prefetches a tile of X; ``ubl.store(Y, r, j, v, streaming=True)``
  writes with non-temporal (cache-bypassing) stores where the tile is full.
* Epilogues: every kernel also gets a ``<symbol>_ep`` entry point that stores
  ``clamp(W x + bias + residual)``: the epilogue is applied at each final ``ubl.store`` to Y. A
  kernel that accumulates in Y marks those stores ``partial=True`` and calls
  ``ubl.finish(Y, r, j)`` once a row is complete (see docs/dsl.md, *Epilogues*).
* ``ubl.zeros(j)`` is a zero tile; ``ubl.zeros(N, j)`` is N of them (a register tile, indexed
  with compile-time integers: ``acc[p]``, ``acc[p] = 0.0``).
* Helpers: ``@ubl.func`` declares a function a kernel (or another helper) calls, like a Triton
  ``@triton.jit`` function calling another. The front end inlines it at each call site (the
  code is the same as the body written there), in its own scope (its parameters and its
  module's globals); arguments by position or keyword (values, constants, operands, tiles,
  register tiles), compile-time defaults, ``ubl.constexpr`` parameters; it returns nothing,
  a value or a tuple. Recursion and Python-only constructs are DSLErrors at the helper's
  file:line; a changed helper changes the compile key of every kernel that calls it::

      @ubl.func
      def add_row_blocks(X, W, r, j, acc, UNROLL: ubl.constexpr = 1):
          lo, hi = W.row_blocks(r)
          for b in ubl.range(lo, hi, unroll=UNROLL):
              acc = ubl.block_fma(W, b, ubl.load(X, W.block_col(b), j), acc)
          return acc

See docs/dsl.md for the reference (each construct with an example); ``help(ubl.tiles)`` etc.
document each builtin.

* ``W.rows``, ``W.cols``, ``W.block`` are compile-time ints (and ``W.lookahead``: how far
  past a block ``W.block_col`` may look, the padding of the packed block columns); ``W.row_blocks(r)`` gives the
  range of blocks starting at row r; ``W.block_row(b)``, ``W.block_col(b)``, ``W.weight(b, i)``
  read one block; ``ubl.block_fma(W, b, x, acc)`` adds w(b, i) * x to acc[i] for every i.
* When the kernel is compiled mask-specialised, W's structure is known at compile time: with
  compile-time indices these calls return constants, so ``static_range`` loops over rows and
  blocks bake the whole block structure into straight-line code.
"""

from __future__ import annotations

from typing import Any

from ubpdsl.errors import did_you_mean
from ubpdsl.language.core import (
    BlockSparse,
    HelperFunction,
    Input,
    KernelFunction,
    Output,
    PatternSparse,
    Tile,
    block_fma,
    constexpr,
    finish,
    fma,
    func,
    kernel,
    load,
    load_pixels,
    prefetch,
    range,
    static_range,
    store,
    store_pixels,
    tiles,
    zeros,
)

__all__ = [
    "BlockSparse",
    "HelperFunction",
    "Input",
    "KernelFunction",
    "Output",
    "PatternSparse",
    "block_fma",
    "constexpr",
    "finish",
    "fma",
    "func",
    "kernel",
    "load",
    "load_pixels",
    "prefetch",
    "range",
    "static_range",
    "store",
    "store_pixels",
    "Tile",
    "tiles",
    "zeros",
]


def __getattr__(name: str) -> Any:
    """``ubl.lod`` -> AttributeError "ubl has no 'lod'; did you mean 'load'?" (also in kernels)."""
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"ubl has no {name!r}{did_you_mean(name, __all__)}")


def __dir__() -> list[str]:
    return sorted(__all__)
