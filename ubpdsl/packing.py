"""The packed weight format of ubp kernels (the one owner: writer, reader and validator).

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
byte offsets (each 64-byte aligned). :func:`pack` writes it, :func:`unpack` reads it back and
validates every field (a :class:`~ubpdsl.errors.PackError` naming the field otherwise).
Generated kernels check the header in O(1) (see :mod:`ubpdsl.abi` for the return codes);
the full O(M + B) validation is :func:`unpack`'s job, on every blob read from a file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ubpdsl import abi
from ubpdsl.errors import MaskError, PackError

MAGIC = 0x31504255  # "UBP1" little endian
VERSION = 1
#: The header's int32 words, in order (their index is the word's position).
HEADER_FIELDS = ("magic", "version", "M", "K", "N", "B", "layout", "off_row_ptr", "off_block_rows",
                 "off_block_cols", "off_values", "total_bytes")
HEADER_WORDS = len(HEADER_FIELDS)
HEADER_BYTES = 4 * HEADER_WORDS
(H_MAGIC, H_VERSION, H_M, H_K, H_N, H_B, H_LAYOUT, H_OFF_ROW_PTR, H_OFF_BLOCK_ROWS, H_OFF_BLOCK_COLS,
 H_OFF_VALUES, H_TOTAL_BYTES) = range(HEADER_WORDS)
COL_PAD = 16  # block_cols has COL_PAD trailing copies of its last entry (prefetch look-ahead)
LAYOUT_CODES = {"plain": 0, "rotated": 1}
ALIGN = 64  # every section starts on a multiple of this many bytes
#: Largest block height N (a kernel keeps N accumulator rows in registers).
MAX_BLOCK = 64
#: Largest M or K of a layer.
MAX_DIM = 1 << 24
#: Largest blob: kernels read the header words as signed 32-bit integers.
MAX_BYTES = (1 << 31) - 1


def check_shape(M: int, K: int, N: int, *, layer: str = "?", error: type[Exception] = MaskError) -> None:
    """M, K, N within the format's limits (checked before anything is allocated from them)."""
    for name, v in (("M", M), ("K", K), ("N", N)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise error(f"layer {layer}: {name} must be an integer, got {v!r}")
    if not (1 <= M <= MAX_DIM and 1 <= K <= MAX_DIM):
        raise error(f"layer {layer}: shape M={M}, K={K} outside 1..{MAX_DIM}")
    if not 1 <= N <= min(MAX_BLOCK, M):
        raise error(f"layer {layer}: block height N={N} must be in 1..min({MAX_BLOCK}, M={M})")


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
    check_shape(M, K, N, layer=layer)
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


def padded(n: int) -> int:
    """``n`` rounded up to a multiple of ALIGN (where the next section starts)."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _sections(M: int, N: int, B: int) -> list[tuple[str, int, int]]:
    """(header field of the offset, element count, element bytes) of each section, in blob order."""
    return [("off_row_ptr", M + N + 1, 4), ("off_block_rows", B, 4), ("off_block_cols", B + COL_PAD, 4),
            ("off_values", B * N, 4)]


def section_offsets(M: int, N: int, B: int) -> tuple[dict[str, int], int]:
    """``({offset field: byte offset}, total_bytes)``: the only layout the format allows."""
    offsets, pos = {}, padded(HEADER_BYTES)
    for field, count, size in _sections(M, N, B):
        offsets[field] = pos
        pos += padded(count * size)
    return offsets, pos


def pack(data: BlockData) -> np.ndarray:
    """The data-driven blob (uint8, 64-byte aligned sections) for ``data``."""
    B, N = data.num_blocks, data.N
    offsets, total = section_offsets(data.M, N, B)
    if total > MAX_BYTES:
        raise PackError(f"packed blob of {total} bytes exceeds the format's limit of {MAX_BYTES} bytes")
    blob = np.zeros(total, np.uint8)
    header = np.array([MAGIC, VERSION, data.M, data.K, N, B, LAYOUT_CODES[data.layout], *offsets.values(),
                       total], dtype="<u4")
    blob[:HEADER_BYTES] = header.view(np.uint8)
    for off, arr in zip(offsets.values(), (data.row_ptr, data.block_rows, data.block_cols, data.values), strict=True):
        raw = np.ascontiguousarray(arr).view(np.uint8)
        blob[off: off + raw.size] = raw
    return blob


def unpack(blob: np.ndarray | bytes | bytearray | memoryview, *, M: int | None = None, K: int | None = None,
           N: int | None = None, layout: str | None = None, what: str = "packed blob") -> BlockData:
    """Read and fully validate a data-driven blob; the arrays are copies.

    Checks the header (length, magic, version, layout, M/K/N/B in range and equal to the
    expected values when given, every offset and total_bytes those of the one layout
    :func:`pack` writes, total_bytes equal to the blob's length) and the content (row_ptr
    starts at 0, never decreases, ends at B and is empty for rows past M - N; block_rows agree
    with row_ptr; columns in [0, K) and sorted within a row; the padding repeats the last
    column; blocks of one column do not overlap). Raises PackError ``"<what>: <field> ..."``
    on the first violation. The weight values themselves are not checked (any float is valid).
    """
    def fail(msg: str) -> PackError:
        return PackError(f"{what}: {msg}")

    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise fail(f"must be a 1-D uint8 array, got {blob.dtype} with shape {blob.shape}")
        raw = np.ascontiguousarray(blob)
    elif isinstance(blob, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(bytes(blob), np.uint8)
    else:
        raise fail(f"must be bytes or a uint8 numpy array, not {type(blob).__name__}")
    size = int(raw.size)
    if size < HEADER_BYTES:
        raise fail(f"{size} bytes, shorter than the {HEADER_BYTES}-byte header")
    h = dict(zip(HEADER_FIELDS, (int(v) for v in raw[:HEADER_BYTES].view("<i4")), strict=True))
    if h["magic"] & 0xFFFFFFFF != MAGIC:
        raise fail(f"magic is 0x{h['magic'] & 0xFFFFFFFF:08x}, not 0x{MAGIC:08x} ('UBP1'): not a packed blob")
    if h["version"] != VERSION:
        raise fail(f"version is {h['version']}, this ubpdsl reads version {VERSION}")
    codes = {v: k for k, v in LAYOUT_CODES.items()}
    if h["layout"] not in codes:
        raise fail(f"layout code {h['layout']} is neither 0 (plain) nor 1 (rotated)")
    got_layout = codes[h["layout"]]
    for name, want in (("M", M), ("K", K), ("N", N)):
        if want is not None and h[name] != want:
            raise fail(f"{name} is {h[name]}, expected {want}")
    if layout is not None and got_layout != layout:
        raise fail(f"layout is {got_layout}, expected {layout}")
    m, k, n, b = h["M"], h["K"], h["N"], h["B"]
    check_shape(m, k, n, layer=what, error=PackError)
    if not 0 <= b <= k * (m // n):
        raise fail(f"B is {b}, outside 0..{k * (m // n)} (the most non-overlapping {n}x1 blocks in {m}x{k})")
    offsets, total = section_offsets(m, n, b)
    for field, want in offsets.items():
        if h[field] != want:
            raise fail(f"{field} is {h[field]}, expected {want} (the sections follow the header in order, "
                       f"each starting on a multiple of {ALIGN} bytes)")
    if h["total_bytes"] != total:
        raise fail(f"total_bytes is {h['total_bytes']}, expected {total} for M={m}, N={n}, B={b}")
    if size != total:
        raise fail(f"the blob has {size} bytes, its header says {total} (truncated or padded)")
    row_ptr, block_rows, block_cols, values = (
        raw[offsets[f]: offsets[f] + count * width].view("<f4" if f == "off_values" else "<i4").astype(
            np.float32 if f == "off_values" else np.int32)
        for f, count, width in _sections(m, n, b))
    if row_ptr[0] != 0:
        raise fail(f"row_ptr[0] is {row_ptr[0]}, not 0")
    steps = np.diff(row_ptr.astype(np.int64))
    for r in np.flatnonzero(steps < 0)[:1]:
        raise fail(f"row_ptr decreases at row {r + 1} ({row_ptr[r]} -> {row_ptr[r + 1]})")
    if row_ptr[-1] != b:
        raise fail(f"row_ptr[{m + n}] is {row_ptr[-1]}, not B={b}")
    if row_ptr[m - n + 1] != b:
        raise fail(f"row_ptr: blocks start past the last possible row {m - n} (row_ptr[{m - n + 1}] = "
                   f"{row_ptr[m - n + 1]} < B={b})")
    expect_rows = np.repeat(np.arange(m + n, dtype=np.int32), steps)
    for i in np.flatnonzero(block_rows != expect_rows)[:1]:
        raise fail(f"block_rows[{i}] is {block_rows[i]}, row_ptr puts block {i} at row {expect_rows[i]}")
    cols = block_cols[:b]
    for i in np.flatnonzero((cols < 0) | (cols >= k))[:1]:
        raise fail(f"block_cols[{i}] is {cols[i]}, outside 0..{k - 1}")
    for i in np.flatnonzero((block_rows[1:] == block_rows[:-1]) & (cols[1:] <= cols[:-1]))[:1]:
        raise fail(f"block_cols[{i + 1}] is {cols[i + 1]}: blocks of row {block_rows[i]} are not sorted by column")
    last = int(cols[-1]) if b else 0
    for i in np.flatnonzero(block_cols[b:] != last)[:1]:
        raise fail(f"block_cols[{b + i}] is {block_cols[b + i]}: the {COL_PAD} padding entries must repeat {last}")
    by_col = np.lexsort((block_rows, cols))
    r2, c2 = block_rows[by_col].astype(np.int64), cols[by_col]
    for i in np.flatnonzero((c2[1:] == c2[:-1]) & (r2[1:] - r2[:-1] < n))[:1]:
        raise fail(f"block_rows: blocks at rows {r2[i]} and {r2[i + 1]} of column {c2[i]} overlap (N={n})")
    return BlockData(m, k, n, got_layout, row_ptr, block_rows, block_cols, values)


def layout_description(layout: str) -> str:
    """Human-readable description of the packed blob (goes into generated C headers)."""
    lanes = ("lane i = W[start + i][col]" if layout == "plain"
             else "lane i = W[r][col] for the row r of the block with r % N == i (rotated)")
    return (
        "packed_w: little-endian blob, 64-byte aligned sections.\n"
        f"  int32 header[{HEADER_WORDS}] = {{ 0x{MAGIC:08x} 'UBP1', {VERSION}, M, K, N, B, "
        "layout (0 plain, 1 rotated),\n"
        "                       off_row_ptr, off_block_rows, off_block_cols, off_values, total_bytes }\n"
        "  int32 row_ptr[M+N+1] blocks starting at row r: [row_ptr[r], row_ptr[r + 1])\n"
        f"  int32 block_rows[B], block_cols[B + {COL_PAD}]   sorted by (row, col); {COL_PAD} trailing copies of\n"
        "                         the last column let kernels prefetch ahead\n"
        f"  float values[B * N]    block b at values[b*N .. b*N+N-1], {lanes}\n"
        "Write it with ubpdsl.packing.pack() and validate it with ubpdsl.packing.unpack(); the kernel\n"
        f"returns {abi.ERR_HEADER} if the header does not match, {abi.ERR_BAD_BLOB} if its sizes and offsets "
        f"are inconsistent,\n{abi.ERR_NULL_WEIGHTS} if packed_w is NULL."
    )
