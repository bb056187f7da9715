"""Packed weight layout of ubp kernels: block metadata and weights in one aligned blob.

Blocks are sorted by (start row, column). ``row_ptr`` has M + N + 1 entries: the blocks that
start at row r are ``[row_ptr[r], row_ptr[r + 1])`` (rows past the last possible start are
empty, so a kernel may ask for any row r < M + N without a bounds check).

Weights of block b live at ``values[b*N : b*N + N]``:

* ``plain``: lane i holds W[start + i, col];
* ``rotated``: lane i holds W[r, col] for the row r of the block with r mod N == i (WROS:
  the accumulator of row r stays in slot r mod N for the whole row walk, no shuffles).

The data-driven blob (little endian) is a header of 12 int32 words
``magic "UBP1", version 1, M, K, N, B, layout (0 plain / 1 rotated), off_row_ptr,
off_block_rows, off_block_cols, off_values, total_bytes`` followed by the arrays at those
byte offsets (each 64-byte aligned). Kernels check magic, version, M, K, N and layout and
return error code 1 on a mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ubpdsl.errors import MaskError

MAGIC = 0x31504255
VERSION = 1
HEADER_WORDS = 12
COL_PAD = 16  # block_cols has COL_PAD trailing copies of its last entry (prefetch look-ahead)
LAYOUT_CODES = {"plain": 0, "rotated": 1}
_ALIGN = 64


@dataclass(frozen=True)
class BlockData:
    """Block structure and weights of one layer, sorted and laid out for a kernel."""

    M: int
    K: int
    N: int
    layout: str
    row_ptr: np.ndarray  # int32[M + N + 1]
    block_rows: np.ndarray  # int32[B]
    block_cols: np.ndarray  # int32[B + COL_PAD]
    values: np.ndarray  # float32[B * N]

    @property
    def num_blocks(self) -> int:
        return int(self.block_rows.shape[0])


def block_data(M: int, K: int, N: int, rows: np.ndarray, cols: np.ndarray, weight: np.ndarray,
               layout: str, *, aligned: bool = False, layer: str = "?") -> BlockData:
    """Sort and lay out the blocks of one layer (validated: range, overlap, alignment)."""
    if layout not in LAYOUT_CODES:
        raise MaskError(f"layer {layer}: unknown weight layout {layout!r}")
    rows = np.asarray(rows)
    cols = np.asarray(cols)
    if rows.shape != cols.shape or rows.ndim != 1:
        raise MaskError(f"layer {layer}: rows and cols must be 1-D arrays of the same length")
    if not (np.issubdtype(rows.dtype, np.integer) and np.issubdtype(cols.dtype, np.integer)):
        raise MaskError(f"layer {layer}: block rows/cols must be integers, got {rows.dtype}/{cols.dtype}")
    weight = np.asarray(weight)
    if weight.dtype != np.float32:
        raise MaskError(f"layer {layer}: weights must be float32, got {weight.dtype}")
    if weight.shape != (M, K):
        raise MaskError(f"layer {layer}: weight shape {weight.shape} does not match the GEMM view ({M}, {K})")
    rows = rows.astype(np.int64)
    cols = cols.astype(np.int64)
    for b in np.flatnonzero((rows < 0) | (rows > M - N) | (cols < 0) | (cols >= K))[:1]:
        raise MaskError(f"layer {layer}: block {b} (row {rows[b]}, col {cols[b]}) lies outside W[{M}, {K}] "
                        f"with N={N}")
    if aligned:
        for b in np.flatnonzero(rows % N)[:1]:
            raise MaskError(f"layer {layer}: block {b} starts at row {rows[b]}, not a multiple of N={N}: "
                            "the aligned (ABP) kernel needs aligned blocks")
    order = np.lexsort((cols, rows))
    rows, cols = rows[order], cols[order]
    # Overlap: within one column, consecutive starts must be at least N apart.
    by_col = np.lexsort((rows, cols))
    r2, c2 = rows[by_col], cols[by_col]
    clash = np.flatnonzero((c2[1:] == c2[:-1]) & (r2[1:] - r2[:-1] < N))
    if clash.size:
        i = clash[0]
        raise MaskError(f"layer {layer}: blocks at (row {r2[i]}, col {c2[i]}) and (row {r2[i + 1]}, "
                        f"col {c2[i]}) overlap (N={N})")
    counts = np.bincount(rows, minlength=M + N)[: M + N]
    # row_ptr[r] = number of blocks starting before row r (M + N + 1 entries).
    row_ptr = np.concatenate([[0], np.cumsum(counts)])
    lanes = np.arange(N)
    if layout == "plain":
        src_rows = rows[:, None] + lanes[None, :]
    else:
        # lane i holds the row r in [start, start + N) with r % N == i
        src_rows = rows[:, None] + (lanes[None, :] - rows[:, None]) % N
    values = weight[src_rows, cols[:, None]].astype(np.float32).reshape(-1)
    pad = np.full(COL_PAD, cols[-1] if cols.size else 0, np.int64)
    return BlockData(M, K, N, layout, row_ptr.astype(np.int32), rows.astype(np.int32),
                     np.concatenate([cols, pad]).astype(np.int32), values)


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def pack(data: BlockData) -> np.ndarray:
    """The data-driven blob (uint8, 64-byte aligned sections) for ``data``."""
    B, N = data.num_blocks, data.N
    off_row_ptr = _pad(HEADER_WORDS * 4)
    off_rows = off_row_ptr + _pad(4 * (data.M + N + 1))
    off_cols = off_rows + _pad(4 * B)
    off_vals = off_cols + _pad(4 * (B + COL_PAD))
    total = off_vals + _pad(4 * B * N)
    blob = np.zeros(total, np.uint8)
    header = np.array([MAGIC, VERSION, data.M, data.K, N, B, LAYOUT_CODES[data.layout], off_row_ptr,
                       off_rows, off_cols, off_vals, total], dtype=np.uint32)
    blob[: HEADER_WORDS * 4] = header.view(np.uint8)
    blob[off_row_ptr: off_row_ptr + 4 * (data.M + N + 1)] = data.row_ptr.view(np.uint8)
    blob[off_rows: off_rows + 4 * B] = data.block_rows.view(np.uint8)
    blob[off_cols: off_cols + 4 * (B + COL_PAD)] = data.block_cols.view(np.uint8)
    blob[off_vals: off_vals + 4 * B * N] = data.values.view(np.uint8)
    return blob


def layout_description(layout: str) -> str:
    """Human-readable description of the packed blob (goes into generated C headers)."""
    lanes = ("lane i = W[start + i][col]" if layout == "plain"
             else "lane i = W[r][col] for the row r of the block with r % N == i (rotated)")
    return (
        "packed_w: little-endian blob, 64-byte aligned sections.\n"
        "  int32 header[12] = { 0x31504255 'UBP1', 1, M, K, N, B, layout (0 plain, 1 rotated),\n"
        "                       off_row_ptr, off_block_rows, off_block_cols, off_values, total_bytes }\n"
        "  int32 row_ptr[M+N+1] blocks starting at row r: [row_ptr[r], row_ptr[r + 1])\n"
        "  int32 block_rows[B], block_cols[B + 16]   sorted by (row, col); 16 trailing copies of\n"
        "                         the last column let kernels prefetch ahead\n"
        f"  float values[B * N]    block b at values[b*N .. b*N+N-1], {lanes}\n"
        "Write it with ubpdsl.packing.pack(); the kernel returns 1 if the header does not match."
    )
