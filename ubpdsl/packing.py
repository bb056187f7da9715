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


def _read_header(blob: np.ndarray | bytes | bytearray | memoryview, what: str,
                 fields: tuple[str, ...]) -> tuple[np.ndarray, dict[str, int]]:
    """The blob as uint8 and its header words (int32 little endian) by name; PackError if the
    blob is not bytes / a 1-D uint8 array or is shorter than the header."""
    if isinstance(blob, np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise PackError(f"{what}: must be a 1-D uint8 array, got {blob.dtype} with shape {blob.shape}")
        raw = np.ascontiguousarray(blob)
    elif isinstance(blob, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(bytes(blob), np.uint8)
    else:
        raise PackError(f"{what}: must be bytes or a uint8 numpy array, not {type(blob).__name__}")
    nbytes = 4 * len(fields)
    if raw.size < nbytes:
        raise PackError(f"{what}: {int(raw.size)} bytes, shorter than the {nbytes}-byte header")
    return raw, dict(zip(fields, (int(v) for v in raw[:nbytes].view("<i4")), strict=True))


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

    raw, h = _read_header(blob, what, HEADER_FIELDS)
    size = int(raw.size)
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


# ---------------------------------------------------------------------------------------------
# The packed pattern format (PatDNN's FKW: filter-kernel-weight), for direct 3x3 convolution kernels

PATTERN_MAGIC = 0x50504255  # "UBPP" little endian
PATTERN_VERSION = 1
#: The pattern header's int32 words, in order.
PATTERN_HEADER_FIELDS = ("magic", "version", "M", "K", "P", "T", "NK", "off_library", "off_filter_order",
                         "off_group_ptr", "off_kernel_chan", "off_values", "total_bytes")
PATTERN_HEADER_WORDS = len(PATTERN_HEADER_FIELDS)
PATTERN_HEADER_BYTES = 4 * PATTERN_HEADER_WORDS
(P_MAGIC, P_VERSION, P_M, P_K, P_P, P_T, P_NK, P_OFF_LIBRARY, P_OFF_FILTER_ORDER, P_OFF_GROUP_PTR,
 P_OFF_KERNEL_CHAN, P_OFF_VALUES, P_TOTAL_BYTES) = range(PATTERN_HEADER_WORDS)
#: Most patterns in a library (every 3x3 pattern of 4 weights with the centre: C(8, 3)).
MAX_PATTERNS = 56
#: Weights kept per 3x3 kernel.
PATTERN_TAPS = 4


@dataclass(frozen=True)
class PatternData:
    """A pattern-pruned 3x3 convolution, laid out for a direct-convolution kernel.

    Filters (output channels) are reordered so that filters with the same pattern signature
    (kept kernels per pattern) are neighbours; ``filter_order[f]`` is the output channel of the
    f-th filter (the permutation that restores the output order). The kernels of filter f with
    pattern p are ``group_ptr[f*P + p] .. group_ptr[f*P + p + 1] - 1``, sorted by input channel;
    kernel k reads input channel ``kernel_chan[k]`` and keeps the weights
    ``values[k*T .. k*T + T - 1]`` at the taps ``library[p]`` (tap = 3 * ky + kx, ascending).
    """

    M: int
    K: int
    library: np.ndarray  # int32[P, T]: kept taps of each pattern
    filter_order: np.ndarray  # int32[M]
    group_ptr: np.ndarray  # int32[M * P + 1]
    kernel_chan: np.ndarray  # int32[NK]
    values: np.ndarray  # float32[NK * T]

    @property
    def num_patterns(self) -> int:
        return int(self.library.shape[0])

    @property
    def num_kernels(self) -> int:
        return int(self.kernel_chan.shape[0])

    def pattern_of_kernels(self) -> np.ndarray:
        """int32[NK]: each kernel's pattern id (derived from group_ptr)."""
        P = self.num_patterns
        counts = np.diff(self.group_ptr.astype(np.int64))
        return np.repeat(np.tile(np.arange(P, dtype=np.int32), self.M), counts)

    def dense(self) -> np.ndarray:
        """float32[M, K, 3, 3]: the convolution weight this data encodes (removed kernels are 0)."""
        P, T = self.library.shape
        out = np.zeros((self.M, self.K, 9), np.float32)
        counts = np.diff(self.group_ptr.astype(np.int64))
        filt = np.repeat(np.repeat(self.filter_order, P), counts)
        taps = self.library[self.pattern_of_kernels()]
        out[filt[:, None], self.kernel_chan[:, None], taps] = self.values.reshape(-1, T)
        return out.reshape(self.M, self.K, 3, 3)


def library_taps(library: np.ndarray, *, layer: str = "?") -> np.ndarray:
    """A pattern library ``[P, 3, 3]`` (0/1, 4 kept each) as ``int32[P, 4]`` ascending tap indices."""
    lib = np.asarray(library)
    if lib.ndim != 3 or lib.shape[1:] != (3, 3) or not 1 <= lib.shape[0] <= MAX_PATTERNS:
        raise MaskError(f"layer {layer}: a pattern library is [P, 3, 3] with P in 1..{MAX_PATTERNS}, "
                        f"got shape {lib.shape}")
    flat = lib.reshape(lib.shape[0], 9) != 0
    for p in np.flatnonzero(flat.sum(axis=1) != PATTERN_TAPS)[:1]:
        raise MaskError(f"layer {layer}: pattern {p} keeps {int(flat[p].sum())} weights, not {PATTERN_TAPS}")
    return np.nonzero(flat)[1].reshape(-1, PATTERN_TAPS).astype(np.int32)


def pattern_data(library: np.ndarray, ids: np.ndarray, weight: np.ndarray, *, layer: str = "?") -> PatternData:
    """Lay out a pattern-pruned layer: ``ids[Cout, Cin]`` index ``library`` (-1: kernel removed),
    ``weight`` is ``float32[Cout, Cin, 3, 3]`` (only the pattern's taps are read)."""
    taps = library_taps(library, layer=layer)
    P = taps.shape[0]
    ids = np.asarray(ids)
    weight = np.asarray(weight)
    if ids.ndim != 2 or ids.dtype.kind not in "iu":
        raise MaskError(f"layer {layer}: pattern ids must be a 2-D integer array, got {ids.dtype} {ids.shape}")
    M, K = ids.shape
    check_shape(M, K, 1, layer=layer)
    if weight.dtype != np.float32 or weight.shape != (M, K, 3, 3):
        raise MaskError(f"layer {layer}: weights must be float32 [{M}, {K}, 3, 3], got {weight.dtype} "
                        f"{list(weight.shape)}")
    ids = ids.astype(np.int64)
    for o, i in np.argwhere((ids < -1) | (ids >= P))[:1]:
        raise MaskError(f"layer {layer}: kernel ({o}, {i}) has pattern id {ids[o, i]} (library has {P}; -1 = removed)")
    # Pattern signature of each filter: its kernels per pattern. Filters with equal signatures
    # become neighbours (the most kernels first), so they run the same code path back to back.
    counts = np.stack([(ids == p).sum(axis=1) for p in range(P)], axis=1)  # [M, P]
    order = np.lexsort(tuple(counts[:, p] for p in reversed(range(P))) + (-counts.sum(axis=1),))
    # lexsort: last key is primary -> total kept (descending), then per-pattern counts
    chans, vals, group = [], [], [0]
    w9 = weight.reshape(M, K, 9)
    for o in order:
        for p in range(P):
            cs = np.flatnonzero(ids[o] == p)
            chans.append(cs)
            vals.append(w9[o, cs][:, taps[p]])
            group.append(group[-1] + cs.size)
    kernel_chan = np.concatenate(chans).astype(np.int32) if chans else np.zeros(0, np.int32)
    values = np.concatenate(vals).astype(np.float32).reshape(-1) if vals else np.zeros(0, np.float32)
    return PatternData(M, K, taps, order.astype(np.int32), np.asarray(group, np.int32), kernel_chan, values)


def _pattern_sections(M: int, P: int, T: int, NK: int) -> list[tuple[str, int]]:
    """(offset field, element count) of each section (all 4-byte elements), in blob order."""
    return [("off_library", P * T), ("off_filter_order", M), ("off_group_ptr", M * P + 1),
            ("off_kernel_chan", NK), ("off_values", NK * T)]


def pattern_section_offsets(M: int, P: int, T: int, NK: int) -> tuple[dict[str, int], int]:
    """``({offset field: byte offset}, total_bytes)``: the only layout the pattern format allows."""
    offsets, pos = {}, padded(PATTERN_HEADER_BYTES)
    for field, count in _pattern_sections(M, P, T, NK):
        offsets[field] = pos
        pos += padded(4 * count)
    return offsets, pos


def pack_pattern(data: PatternData) -> np.ndarray:
    """The pattern blob (uint8, 64-byte aligned sections) for ``data``."""
    P, T = data.library.shape
    offsets, total = pattern_section_offsets(data.M, P, T, data.num_kernels)
    if total > MAX_BYTES:
        raise PackError(f"packed pattern blob of {total} bytes exceeds the format's limit of {MAX_BYTES} bytes")
    blob = np.zeros(total, np.uint8)
    header = np.array([PATTERN_MAGIC, PATTERN_VERSION, data.M, data.K, P, T, data.num_kernels, *offsets.values(),
                       total], dtype="<u4")
    blob[:PATTERN_HEADER_BYTES] = header.view(np.uint8)
    arrays = (data.library, data.filter_order, data.group_ptr, data.kernel_chan, data.values)
    for off, arr in zip(offsets.values(), arrays, strict=True):
        raw = np.ascontiguousarray(arr, "<f4" if arr.dtype == np.float32 else "<i4").view(np.uint8).reshape(-1)
        blob[off: off + raw.size] = raw
    return blob


def unpack_pattern(blob: np.ndarray | bytes | bytearray | memoryview, *, M: int | None = None,
                   K: int | None = None, library: np.ndarray | None = None,
                   what: str = "packed pattern blob") -> PatternData:
    """Read and fully validate a pattern blob; the arrays are copies.

    Checks the header (length, magic, version, M/K/P/T/NK in range and equal to the expected
    values when given, every offset and total_bytes those of the one layout :func:`pack_pattern`
    writes, total_bytes equal to the blob's length) and the content (every pattern 4 distinct
    ascending taps with the centre, no pattern twice, equal to ``library`` when given;
    filter_order a permutation of 0..M-1; group_ptr starts at 0, never decreases, ends at NK;
    input channels in [0, K), strictly increasing inside a group). Raises one-line
    :class:`PackError` ``"<what>: <field> ..."`` on the first violation.
    """
    def fail(msg: str) -> PackError:
        return PackError(f"{what}: {msg}")

    raw, h = _read_header(blob, what, PATTERN_HEADER_FIELDS)
    size = int(raw.size)
    if h["magic"] & 0xFFFFFFFF != PATTERN_MAGIC:
        raise fail(f"magic is 0x{h['magic'] & 0xFFFFFFFF:08x}, not 0x{PATTERN_MAGIC:08x} ('UBPP'): "
                   "not a packed pattern blob")
    if h["version"] != PATTERN_VERSION:
        raise fail(f"version is {h['version']}, this ubpdsl reads pattern version {PATTERN_VERSION}")
    for name, want in (("M", M), ("K", K)):
        if want is not None and h[name] != want:
            raise fail(f"{name} is {h[name]}, expected {want}")
    m, k, p, t, nk = h["M"], h["K"], h["P"], h["T"], h["NK"]
    check_shape(m, k, 1, layer=what, error=PackError)
    if not 1 <= p <= MAX_PATTERNS:
        raise fail(f"P is {p}, outside 1..{MAX_PATTERNS}")
    if t != PATTERN_TAPS:
        raise fail(f"T is {t}, a pattern keeps {PATTERN_TAPS} weights")
    if not 0 <= nk <= m * k:
        raise fail(f"NK is {nk}, outside 0..{m * k} (M x K kernels)")
    offsets, total = pattern_section_offsets(m, p, t, nk)
    for field, want in offsets.items():
        if h[field] != want:
            raise fail(f"{field} is {h[field]}, expected {want} (the sections follow the header in order, "
                       f"each starting on a multiple of {ALIGN} bytes)")
    if h["total_bytes"] != total:
        raise fail(f"total_bytes is {h['total_bytes']}, expected {total} for M={m}, P={p}, NK={nk}")
    if size != total:
        raise fail(f"the blob has {size} bytes, its header says {total} (truncated or padded)")
    lib, order, gptr, chan, values = (
        raw[offsets[f]: offsets[f] + 4 * count].view("<f4" if f == "off_values" else "<i4").astype(
            np.float32 if f == "off_values" else np.int32)
        for f, count in _pattern_sections(m, p, t, nk))
    lib = lib.reshape(p, t)
    for q in range(p):
        taps = lib[q]
        if (taps < 0).any() or (taps > 8).any() or (np.diff(taps) <= 0).any() or 4 not in taps:
            raise fail(f"library[{q}] is {taps.tolist()}: a pattern is {t} ascending taps in 0..8 with the centre 4")
    if len({tuple(r) for r in lib.tolist()}) != p:
        raise fail("library repeats a pattern")
    if library is not None and not np.array_equal(lib, np.asarray(library)):
        raise fail("library differs from the one the kernel was compiled for")
    if not np.array_equal(np.sort(order), np.arange(m)):
        raise fail("filter_order is not a permutation of the output channels 0..M-1")
    if gptr[0] != 0:
        raise fail(f"group_ptr[0] is {gptr[0]}, not 0")
    steps = np.diff(gptr.astype(np.int64))
    for i in np.flatnonzero(steps < 0)[:1]:
        raise fail(f"group_ptr decreases at {i + 1} ({gptr[i]} -> {gptr[i + 1]})")
    if gptr[-1] != nk:
        raise fail(f"group_ptr[{m * p}] is {gptr[-1]}, not NK={nk}")
    for i in np.flatnonzero((chan < 0) | (chan >= k))[:1]:
        raise fail(f"kernel_chan[{i}] is {chan[i]}, outside 0..{k - 1}")
    group_of = np.repeat(np.arange(m * p), steps)
    for i in np.flatnonzero((group_of[1:] == group_of[:-1]) & (chan[1:] <= chan[:-1]))[:1]:
        raise fail(f"kernel_chan[{i + 1}] is {chan[i + 1]}: channels of a group must increase")
    filt = group_of // p
    for i in np.flatnonzero((filt[1:] == filt[:-1]) & (chan[1:] == chan[:-1]))[:1]:
        raise fail(f"kernel_chan[{i + 1}]: filter {filt[i]} has two kernels on input channel {chan[i]}")
    return PatternData(m, k, lib, order, gptr, chan, values)


def pattern_layout_description() -> str:
    """Human-readable description of the packed pattern blob (goes into generated C headers)."""
    return (
        "packed_w: little-endian pattern blob (FKW), 64-byte aligned sections.\n"
        f"  int32 header[{PATTERN_HEADER_WORDS}] = {{ 0x{PATTERN_MAGIC:08x} 'UBPP', {PATTERN_VERSION}, M=Cout, "
        "K=Cin, P patterns, T=4 taps, NK kernels,\n"
        "      off_library, off_filter_order, off_group_ptr, off_kernel_chan, off_values, total_bytes }\n"
        "  int32 library[P*T]        kept taps (3*ky + kx, ascending) of each pattern\n"
        "  int32 filter_order[M]     output channel of the f-th filter (filters grouped by pattern signature)\n"
        "  int32 group_ptr[M*P + 1]  kernels of filter f with pattern p: [group_ptr[f*P+p], group_ptr[f*P+p+1])\n"
        "  int32 kernel_chan[NK]     input channel of each kernel\n"
        "  float values[NK*T]        kept weights of kernel k at values[k*T .. k*T+T-1]\n"
        "x is [K, H, W], y is [M, H, W] (3x3, stride 1, padding 1); n = H*W.\n"
        "Write it with ubpdsl.packing.pack_pattern() and validate it with ubpdsl.packing.unpack_pattern();\n"
        f"the kernel returns {abi.ERR_HEADER} if the header or library does not match, {abi.ERR_BAD_BLOB} if its "
        f"sizes and offsets are inconsistent,\n{abi.ERR_NULL_WEIGHTS} if packed_w is NULL, {abi.ERR_BAD_PIXELS} "
        "if n != H*W."
    )
