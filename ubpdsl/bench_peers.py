"""The runtimes a user could pick instead of ubpdsl, each prepared for one benchmark case.

A :class:`Case` is one GEMM Y[M, n] = W[M, K] @ X[K, n] at one sparsity and block size N, with
three masks of the same size: the unaligned BED mask (what ubpdsl runs), an aligned N x 1 mask
with the same number of blocks (what ABP and BSR runtimes need) and an N x N square-block mask
with the same number of nonzeros (torch's CPU BSR needs square blocks). Every peer runs on the
mask its format handles best, so the comparison never handicaps a peer.

A :class:`Peer` turns a case into a :class:`Prepared` runner: ``call()`` does one multiplication
into a preallocated output (nothing allocated per call where the library allows it),
``output()`` returns that output, ``matrix`` is the weight matrix it multiplies (the dense
reference is ``torch.mm`` on it in float64).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ubpdsl.compiler import Problem
from ubpdsl.runtime.loader import aligned_empty

__all__ = ["Case", "Peer", "Prepared", "PEERS", "thread_limit", "square_block_weights"]


@dataclass
class Case:
    """One benchmark problem: shape, block size, sparsity, input and the three masks."""

    suite: str
    shape: str
    source: str  # "random", "pretrained" or "masks.npz"
    M: int
    K: int
    n: int
    N: int
    sparsity: float
    x: np.ndarray  # [K, n] float32
    unaligned: Problem  # BED blocks and the pruned weights
    aligned: Problem  # aligned blocks, same number of blocks
    square: np.ndarray | None  # N x N block pruned weights with the same nnz (None: shape not divisible)

    @property
    def blocks(self) -> int:
        return int(len(self.unaligned.rows))

    @property
    def label(self) -> str:
        return f"{self.shape} N={self.N} s={self.sparsity:.2f} ({self.source})"


@dataclass
class Prepared:
    """A runner bound to one case: ``call()`` computes into a preallocated output."""

    call: Callable[[], object]
    output: Callable[[], np.ndarray]
    matrix: np.ndarray  # the [M, K] weights this runner multiplies
    mask: str  # "unaligned", "aligned", "square" or "dense"
    config: str = ""
    keep: list[Any] = field(default_factory=list, repr=False)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.matrix))


@dataclass(frozen=True)
class Peer:
    """A runtime: how to prepare it for a case, and what it supports."""

    key: str
    label: str
    prepare: Callable[[Case, int], Prepared]
    max_threads: int = 1  # > 1: also timed with 2 threads
    family: str = "peer"  # "dense", "peer", "ours" or "bound" (a floor, not a runtime)
    slow: bool = False  # worth fewer repetitions
    available: Callable[[], str | None] = lambda: None  # None, or why it cannot run here


@contextlib.contextmanager
def thread_limit(threads: int) -> Iterator[None]:
    """Run torch, MKL and OpenBLAS with ``threads`` threads inside the block."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        ctx: Any = threadpool_limits(limits=threads)
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        ctx = contextlib.nullcontext()
    try:
        with ctx:
            yield
    finally:
        torch.set_num_threads(old)


def square_block_weights(w: np.ndarray, nnz: int, N: int) -> np.ndarray | None:
    """Keep the N x N tiles of largest |w| sum holding about ``nnz`` weights (None if not divisible)."""
    M, K = w.shape
    if M % N or K % N:
        return None
    tiles = np.abs(w).reshape(M // N, N, K // N, N).sum(axis=(1, 3))
    keep = max(1, round(nnz / (N * N)))
    flat = np.argsort(-tiles, axis=None, kind="stable")[:keep]
    tmask = np.zeros(tiles.size, bool)
    tmask[flat] = True
    mask = np.repeat(np.repeat(tmask.reshape(tiles.shape), N, axis=0), N, axis=1)
    return (w * mask).astype(np.float32)


# ---------------------------------------------------------------------------------- the peers


def _dense_torch(case: Case, threads: int) -> Prepared:
    import torch

    w = torch.from_numpy(np.ascontiguousarray(case.unaligned.weight))
    x = torch.from_numpy(case.x)
    y = torch.empty((case.M, case.n))
    return Prepared(lambda: torch.mm(w, x, out=y), lambda: y.numpy(), case.unaligned.weight, "dense")


def _numpy(case: Case, threads: int) -> Prepared:
    w = np.ascontiguousarray(case.unaligned.weight)
    y = aligned_empty((case.M, case.n))
    return Prepared(lambda: np.matmul(w, case.x, out=y), lambda: y, w, "dense")


def _write_y(case: Case, threads: int) -> Prepared:
    """Not a GEMM: fills Y with zeros (which is W @ X for W = 0). Timed in the same cache state as
    the runners, it is a measured floor: no kernel that writes Y once can beat it."""
    y = aligned_empty((case.M, case.n))
    return Prepared(lambda: y.fill(0.0), lambda: y, np.zeros((case.M, case.K), np.float32), "none")


def _scipy(fmt: str) -> Callable[[Case, int], Prepared]:
    def prepare(case: Case, threads: int) -> Prepared:
        import scipy.sparse as sps

        if fmt == "csr":
            w = case.unaligned.weight
            a = sps.csr_matrix(w)
            mask = "unaligned"
        else:
            w = case.aligned.weight
            a = sps.bsr_matrix(w, blocksize=(case.N, 1))
            mask = "aligned"
        a.sort_indices()
        out: list[np.ndarray] = [np.empty(0)]

        def call() -> None:  # scipy allocates its result; mallopt keeps that off mmap (see benchsuite)
            out[0] = a @ case.x

        return Prepared(call, lambda: out[0], w, mask, keep=[a])

    return prepare


def _torch_sparse(fmt: str) -> Callable[[Case, int], Prepared]:
    def prepare(case: Case, threads: int) -> Prepared:
        import torch

        from ubpdsl.errors import UbpError

        torch.set_flush_denormal(True)  # BSR on CPU is 7-13x slower on denormals otherwise
        if fmt == "csr":
            w = case.unaligned.weight
            with warnings.catch_warnings():  # "sparse CSR support is in beta state"
                warnings.simplefilter("ignore", UserWarning)
                a = torch.from_numpy(w).to_sparse_csr()
            mask = "unaligned"
        else:
            if case.square is None:
                raise UbpError(f"torch BSR needs square {case.N}x{case.N} blocks: M={case.M}, K={case.K} "
                               f"not divisible by {case.N}")
            w = case.square
            a = torch.from_numpy(w).to_sparse_bsr((case.N, case.N))
            mask = "square"
        x = torch.from_numpy(case.x)
        y = torch.empty((case.M, case.n))
        return Prepared(lambda: torch.mm(a, x, out=y), lambda: y.numpy(), w, mask, keep=[a])

    return prepare


def _mlir(fmt: str) -> Callable[[Case, int], Prepared]:
    def prepare(case: Case, threads: int) -> Prepared:
        from ubpdsl.bench_mlir import build_mlir_spmm

        w = case.unaligned.weight if fmt == "csr" else case.aligned.weight
        k = build_mlir_spmm(fmt, w, case.x, case.N)
        return Prepared(k.call, lambda: k.y, w, "unaligned" if fmt == "csr" else "aligned", "vl=16", keep=[k])

    return prepare


def _mlir_available() -> str | None:
    from ubpdsl.bench_mlir import mlir_available

    return mlir_available()


def _scipy_available() -> str | None:
    try:
        import scipy.sparse  # noqa: F401
    except ImportError:
        return "scipy is not installed (pip install scipy)"
    return None


#: Every peer, in report order (ours are added by :mod:`ubpdsl.benchsuite`).
PEERS: list[Peer] = [
    Peer("dense", "dense torch.mm (MKL)", _dense_torch, 2, "dense"),
    Peer("numpy", "numpy matmul (OpenBLAS)", _numpy, 2, "dense"),
    Peer("scipy_csr", "scipy CSR", _scipy("csr"), 1, available=_scipy_available),
    Peer("scipy_bsr", "scipy BSR (Nx1, aligned)", _scipy("bsr"), 1, slow=True, available=_scipy_available),
    Peer("torch_csr", "torch CSR", _torch_sparse("csr"), 2),
    Peer("torch_bsr", "torch BSR (NxN, same nnz)", _torch_sparse("bsr"), 2),
    Peer("mlir_csr", "MLIR sparsifier CSR", _mlir("csr"), 1, available=_mlir_available),
    Peer("mlir_bsr", "MLIR sparsifier BSR (Nx1, aligned)", _mlir("bsr"), 1, available=_mlir_available),
    Peer("write_y", "floor: write Y once (fill with 0)", _write_y, 2, "bound"),
]
