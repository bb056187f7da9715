"""MLIR ``sparse_tensor`` peers: CSR and BSR SpMM through the upstream ``sparsifier`` pipeline.

The kernel is a ``linalg.generic`` Y[m, j] += A[m, k] * X[k, j] with loop order (m, k, j) (the
dense pixel loop innermost, so ``vl`` can vectorise it), the sparse operand built from
caller-owned arrays with ``sparse_tensor.assemble`` and the result written into the caller's
Y buffer with ``bufferization.materialize_in_destination``: nothing is allocated per call, so the
sparsifier's per-call result-buffer leak (see BENCHMARKS.md) cannot happen.

BSR stores N x 1 blocks at aligned rows. The 2-D block encoding
``(i floordiv N : dense, j : compressed, i mod N : dense)`` crashes this build's sparsifier when
the tensor is assembled from buffers, so BSR is written in its level space directly: a 3-D tensor
A3[M/N, K, N] with levels (dense, compressed, dense) - byte for byte the BSR storage (block row
pointers, block column indices, N values per block) and the loop nest the sparsifier would emit
after demapping the block encoding.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ubpdsl.errors import UbpError

__all__ = ["MlirSpmm", "build_mlir_spmm", "mlir_available"]



def mlir_available() -> str | None:
    """None when the MLIR sparse_tensor stack is importable, else the reason it is not."""
    try:
        from mlir import execution_engine, passmanager, runtime  # noqa: F401
        from mlir.dialects import sparse_tensor  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the bindings are a dependency
        return f"MLIR Python bindings unavailable: {exc}"
    return None


def _csr_source(M: int, K: int, n: int) -> str:
    T = f"tensor<{M}x{n}xf32>"
    return f"""
#ENC = #sparse_tensor.encoding<{{ map = (i, j) -> (i : dense, j : compressed), posWidth = 32, crdWidth = 32 }}>
func.func @spmm(%pos: memref<?xi32>, %crd: memref<?xi32>, %val: memref<?xf32>, %xm: memref<{K}x{n}xf32>,
                %y: memref<{M}x{n}xf32>) attributes {{ llvm.emit_c_interface }} {{
  %p = bufferization.to_tensor %pos restrict : memref<?xi32> to tensor<?xi32>
  %c = bufferization.to_tensor %crd restrict : memref<?xi32> to tensor<?xi32>
  %v = bufferization.to_tensor %val restrict : memref<?xf32> to tensor<?xf32>
  %x = bufferization.to_tensor %xm restrict : memref<{K}x{n}xf32> to tensor<{K}x{n}xf32>
  %A = sparse_tensor.assemble (%p, %c), %v : (tensor<?xi32>, tensor<?xi32>), tensor<?xf32>
       to tensor<{M}x{K}xf32, #ENC>
  %yt = bufferization.to_tensor %y restrict writable : memref<{M}x{n}xf32> to {T}
  %zero = arith.constant 0.0 : f32
  %z = linalg.fill ins(%zero : f32) outs(%yt : {T}) -> {T}
  %r = linalg.generic {{indexing_maps = [affine_map<(m, k, j) -> (m, k)>, affine_map<(m, k, j) -> (k, j)>,
                                        affine_map<(m, k, j) -> (m, j)>],
                       iterator_types = ["parallel", "reduction", "parallel"]}}
      ins(%A, %x : tensor<{M}x{K}xf32, #ENC>, tensor<{K}x{n}xf32>) outs(%z : {T}) {{
      ^bb0(%a: f32, %b: f32, %o: f32):
        %pr = arith.mulf %a, %b : f32
        %s = arith.addf %o, %pr : f32
        linalg.yield %s : f32
  }} -> {T}
  bufferization.materialize_in_destination %r in restrict writable %y : ({T}, memref<{M}x{n}xf32>) -> ()
  return
}}
"""


def _bsr_source(M: int, K: int, n: int, N: int) -> str:
    MB = M // N
    T = f"tensor<{MB}x{N}x{n}xf32>"
    A = f"tensor<{MB}x{K}x{N}xf32, #ENC>"
    return f"""
#ENC = #sparse_tensor.encoding<{{ map = (b, k, i) -> (b : dense, k : compressed, i : dense),
                                 posWidth = 32, crdWidth = 32 }}>
func.func @spmm(%pos: memref<?xi32>, %crd: memref<?xi32>, %val: memref<?xf32>, %xm: memref<{K}x{n}xf32>,
                %y2: memref<{M}x{n}xf32>) attributes {{ llvm.emit_c_interface }} {{
  %y = memref.expand_shape %y2 [[0, 1], [2]] output_shape [{MB}, {N}, {n}]
       : memref<{M}x{n}xf32> into memref<{MB}x{N}x{n}xf32>
  %p = bufferization.to_tensor %pos restrict : memref<?xi32> to tensor<?xi32>
  %c = bufferization.to_tensor %crd restrict : memref<?xi32> to tensor<?xi32>
  %v = bufferization.to_tensor %val restrict : memref<?xf32> to tensor<?xf32>
  %x = bufferization.to_tensor %xm restrict : memref<{K}x{n}xf32> to tensor<{K}x{n}xf32>
  %A = sparse_tensor.assemble (%p, %c), %v : (tensor<?xi32>, tensor<?xi32>), tensor<?xf32> to {A}
  %yt = bufferization.to_tensor %y restrict writable : memref<{MB}x{N}x{n}xf32> to {T}
  %zero = arith.constant 0.0 : f32
  %z = linalg.fill ins(%zero : f32) outs(%yt : {T}) -> {T}
  %r = linalg.generic {{indexing_maps = [affine_map<(b, k, i, j) -> (b, k, i)>, affine_map<(b, k, i, j) -> (k, j)>,
                                        affine_map<(b, k, i, j) -> (b, i, j)>],
                       iterator_types = ["parallel", "reduction", "parallel", "parallel"]}}
      ins(%A, %x : {A}, tensor<{K}x{n}xf32>) outs(%z : {T}) {{
      ^bb0(%a: f32, %bx: f32, %o: f32):
        %pr = arith.mulf %a, %bx : f32
        %s = arith.addf %o, %pr : f32
        linalg.yield %s : f32
  }} -> {T}
  bufferization.materialize_in_destination %r in restrict writable %y : ({T}, memref<{MB}x{N}x{n}xf32>) -> ()
  return
}}
"""


@dataclass
class MlirSpmm:
    """A jitted MLIR SpMM bound to its operands: ``call()`` computes Y = A @ X into ``y``."""

    fmt: str
    y: np.ndarray
    _fn: Any = field(repr=False)
    _packed: Any = field(repr=False)
    _keep: list[Any] = field(default_factory=list, repr=False)

    def call(self) -> None:
        self._fn(self._packed)


def _storage(fmt: str, w: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, coordinates, values) of ``w`` in the kernel's format (int32 indices)."""
    import scipy.sparse as sps

    if fmt == "csr":
        a = sps.csr_matrix(w)
        a.sort_indices()
        return a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data.astype(np.float32)
    b = sps.bsr_matrix(w, blocksize=(N, 1))
    b.sort_indices()
    return b.indptr.astype(np.int32), b.indices.astype(np.int32), np.ascontiguousarray(b.data.ravel(), np.float32)


def build_mlir_spmm(fmt: str, w: np.ndarray, x: np.ndarray, N: int = 1, vl: int = 16) -> MlirSpmm:
    """Compile the ``fmt`` ("csr" or "bsr") SpMM for ``w`` [M, K] and ``x`` [K, n] and bind its buffers.

    Raises :class:`UbpError` when the shape does not fit the format (BSR: M divisible by N) or the
    pipeline fails.
    """
    from mlir import execution_engine, ir, passmanager
    from mlir import runtime as rt

    M, K = w.shape
    n = x.shape[1]
    if fmt == "csr":
        src = _csr_source(M, K, n)
    elif fmt == "bsr":
        if M % N:
            raise UbpError(f"MLIR BSR needs M={M} divisible by N={N}")
        src = _bsr_source(M, K, n, N)
    else:
        raise UbpError(f"unknown MLIR sparse format {fmt!r} (csr or bsr)")
    ctx = ir.Context()
    try:
        with ctx:
            module = ir.Module.parse(src)
            pm = passmanager.PassManager.parse(
                f"builtin.module(sparsifier{{vl={vl} enable-runtime-library=false}})")
            pm.run(module.operation)
            engine = execution_engine.ExecutionEngine(module, opt_level=3)
    except Exception as exc:  # MLIRError and friends: report, never crash the suite
        raise UbpError(f"MLIR {fmt} pipeline failed: {str(exc).splitlines()[0]}") from None
    pos, crd, val = _storage(fmt, np.asarray(w, np.float32), N)
    from ubpdsl.runtime.loader import aligned_copy, aligned_empty

    xc = aligned_copy(x, np.float32)
    y = aligned_empty((M, n))
    y[...] = 0.0
    arrays = [pos, crd, val, xc, y]
    descs = [ctypes.pointer(ctypes.pointer(rt.get_ranked_memref_descriptor(a))) for a in arrays]
    packed = (ctypes.c_void_p * len(descs))(*[ctypes.cast(d, ctypes.c_void_p) for d in descs])
    fn = engine.lookup("spmm")
    return MlirSpmm(fmt, y, fn, packed, [ctx, module, engine, arrays, descs])
