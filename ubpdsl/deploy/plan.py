"""The plan blob of the channel-major C runtime (``native/ubp_model.c``): format, writer and shared helpers.

The one owner of the format. Plans are made by :mod:`ubpdsl.deploy.graph` (any fx-traceable
pruned CNN, MobileNetV2 included); this module holds what that planner and the runtime's loader
share: the record layout, the blob writer, BatchNorm folding and the band sizing of the fused
expand + depthwise op.

Plan blob (little-endian)::

    int64 header[16]   magic "UBPM", version 2, n_ops, batch, C_in, H_in, W_in, C_out,
                       workspace bytes, n_kernels, kernel table offset, total bytes, scratch offset
    int64 ops[n_ops][16]   one record per op (below)
    payload            biases, weights, geometry, packed sparse weights (64-byte aligned)
    void *kernels[n_kernels]   filled by ubp_model_bind() once the kernels are loaded
    void *kernels_ep[n_kernels]   their fused-epilogue entry points (ubpdsl.abi.C_EP_SIGNATURE), filled
                       by ubp_model_bind_ep(); a kind 1 op with a bias then stores
                       clamp(W x + bias + residual) in one pass (NULL: the kernel, then a C pass)

Records of kinds 1..5 (:data:`OP_FIELDS`): kind (1 sparse 1x1 / linear, 2 depthwise 3x3, 3 pool with
bias + clamp, 4 input [B, C, HW] to channel-major, 5 expand 1x1 + depthwise fused in bands of output
rows), src, dst, C (a sparse op: its K), M, HW, kernel slot, packed offset, bias offset, residual, H, W, stride, weights
offset, pre-bias offset, clamp (0 none, 1 ReLU, 2 ReLU6; for a depthwise op: 1 = its source is the
model input in [B, C, H, W]). Kind 5 reuses HW as output rows per band and residual / clamp as the
workspace offsets of its two band buffers (input rows, expanded rows; one image at a time).

Records of the general kinds 6..13 (:data:`GRAPH_FIELDS`): kind, src, dst, C (input channels or
features), M (output channels), geometry offset (payload int64[8]: kernel h, w, stride h, w,
padding h, w, groups -- for an average pool count_include_pad --, source is NCHW), kernel slot (-1
dense), packed offset, bias offset, residual buffer, H, W (input plane), unused, weights offset
(dense weights [M, K]; an affine op's scales), im2col buffer (-1 none), clamp. Kinds: 6 conv /
linear, 7 max pool, 8 average pool, 9 global average pool, 10 flatten, 11 add, 12 per-channel
affine, 13 output ([C, B, H*W] -> [B, C*H*W]).

Buffers: -1 the model input ([B, C, H, W]), -2 the output ([B, features]), >= 0 a byte offset in
the workspace; activations in the workspace are [C, B, H, W]. Offsets of payload items are bytes
from the start of the blob; -1 means none (residual: -3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ubpdsl.errors import UbpError
from ubpdsl.masks import LayerMask

__all__ = ["PlanBlob", "PlanError", "fold_bn", "folded_mask", "field_index", "empty_record", "encode_plan",
           "head_bytes", "header_words", "band_rows", "band_buffer_floats", "c_plan_header"]

MAGIC = 0x4D504255
VERSION = 2
REC = 16
NO_RES = -3
ALIGN = 64
# The format's numbers, owned here: native/ubp_model.c includes the header c_plan_header() generates
# from them (native.py writes it at build time), so Python and C cannot drift.
#: header words (C: ``H_<name>``)
HEADER_FIELDS = ("MAGIC", "VERSION", "NOPS", "BATCH", "CIN", "HIN", "WIN", "COUT", "WS_BYTES", "NKERNELS",
                 "KERNELS_OFF", "TOTAL_BYTES", "SCRATCH_OFF")
#: record fields of kinds 1..5 (index = position in the int64[16] record; C: ``F_<NAME>``)
OP_FIELDS = ("kind", "src", "dst", "C", "M", "HW", "kernel", "packed", "bias", "res", "H", "W", "stride", "weights",
             "pre_bias", "clamp")
#: record fields of the general kinds 6..13 (C: ``G_<NAME>``)
GRAPH_FIELDS = ("kind", "src", "dst", "C", "M", "geom", "kernel", "packed", "bias", "res", "H", "W", "unused",
                "weights", "tmp", "clamp")
#: the int64[8] geometry of a general conv / pool (C: ``GM_<NAME>``)
GEOM_FIELDS = ("kh", "kw", "sh", "sw", "ph", "pw", "groups", "nchw")
#: fields reused by some kinds (C name -> the field it reuses): OP_EXPAND_DW's output rows per band
#: and band buffers, OP_DW's "source is [B, C, H, W]" flag
FIELD_ALIASES = {"F_BAND": "F_HW", "F_XB": "F_RES", "F_EB": "F_CLAMP", "F_SRC_NCHW": "F_CLAMP"}
#: op kinds (C: ``OP_<NAME>``)
OP_KINDS = {"PW": 1, "DW": 2, "POOL": 3, "INPUT": 4, "EXPAND_DW": 5, "CONV": 6, "MAXPOOL": 7, "AVGPOOL": 8,
            "GAP": 9, "FLATTEN": 10, "ADD": 11, "AFFINE": 12, "OUTPUT": 13}
#: epilogue clamp codes (C: ``CLAMP_<NAME>``)
CLAMPS = {"NONE": 0, "RELU": 1, "RELU6": 2}
#: buffer ids that are not workspace offsets
BUF_INPUT, BUF_OUTPUT = -1, -2
OP_PW, OP_DW, OP_POOL, OP_INPUT, OP_EXPAND_DW = (OP_KINDS[k] for k in ("PW", "DW", "POOL", "INPUT", "EXPAND_DW"))
OP_CONV, OP_MAXPOOL, OP_AVGPOOL, OP_GAP, OP_FLATTEN, OP_ADD, OP_AFFINE, OP_OUTPUT = (
    OP_KINDS[k] for k in ("CONV", "MAXPOOL", "AVGPOOL", "GAP", "FLATTEN", "ADD", "AFFINE", "OUTPUT"))
#: expands whose output (per image) is larger than this run fused with their depthwise in bands
FUSE_MIN_BYTES = 1 << 20
#: target size of one band's expanded buffer (stays in L2 between the kernel and the depthwise)
BAND_BYTES = 400 << 10


def c_plan_header() -> str:
    """``ubp_plan.h``: the plan format's numbers for ``native/ubp_model.c`` (generated, never edited)."""
    from ubpdsl import packing

    def enum(prefix: str, names: tuple[str, ...]) -> str:
        return "enum { " + ", ".join(f"{prefix}{n.upper()} = {i}" for i, n in enumerate(names)) + " };"

    lines = ["/* generated from ubpdsl/deploy/plan.py (the owner of the plan format): do not edit */",
             "#ifndef UBP_PLAN_DEFINED", "#define UBP_PLAN_DEFINED",
             f"#define UBP_MODEL_MAGIC 0x{MAGIC:08x}LL", f"#define UBP_MODEL_VERSION {VERSION}", f"#define REC {REC}",
             f"#define UBP_PLAN_ALIGN {ALIGN}", f"#define UBP_NO_RES ({NO_RES})",
             f"#define UBP_BUF_INPUT ({BUF_INPUT})", f"#define UBP_BUF_OUTPUT ({BUF_OUTPUT})",
             f"#define UBP_PACK_MAGIC 0x{packing.MAGIC:08x}", f"#define UBP_PACK_HEADER_WORDS {packing.HEADER_WORDS}",
             enum("H_", HEADER_FIELDS), enum("F_", OP_FIELDS), enum("G_", GRAPH_FIELDS), enum("GM_", GEOM_FIELDS),
             "enum { " + ", ".join(f"{k} = {v}" for k, v in FIELD_ALIASES.items()) + " };",
             "enum { " + ", ".join(f"OP_{k} = {v}" for k, v in OP_KINDS.items()) + " };",
             "enum { " + ", ".join(f"CLAMP_{k} = {v}" for k, v in CLAMPS.items()) + " };",
             "/* the packed blob format the plan check validates (ubpdsl.packing owns it) */",
             f"#define UBP_PACK_VERSION {packing.VERSION}", f"#define UBP_PACK_COL_PAD {packing.COL_PAD}",
             f"#define UBP_PACK_ALIGN {packing.ALIGN}", f"#define UBP_PACK_MAX_BLOCK {packing.MAX_BLOCK}",
             f"#define UBP_PACK_MAX_DIM {packing.MAX_DIM}", enum("PK_", packing.HEADER_FIELDS),
             "#endif", ""]
    return "\n".join(lines)


class PlanError(UbpError):
    """The model does not have the structure the planner supports."""


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d,
            bias: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(W * s[:, None], beta - mean * s [+ bias * s])`` with ``s = gamma / sqrt(var + eps)``; W as
    [M, prod(rest)]; ``bias``: the convolution's own bias, if it has one."""
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w = weight.detach().double().reshape(weight.shape[0], -1) * s[:, None]
    b = (bn.bias.detach().double() - bn.running_mean.detach().double() * s).float().numpy()
    if bias is not None:
        b = (b + (bias.detach().double() * s).float().numpy()).astype(np.float32)
    return w.float().numpy(), b


def folded_mask(mask: LayerMask, w: np.ndarray) -> LayerMask:
    """``mask`` with the folded weights ``w`` ([R, C]) kept only inside its blocks."""
    return LayerMask(mask.name, mask.shape, mask.block, mask.rows, mask.cols, w * mask.dense_mask())


@dataclass
class PlanBlob:
    """A plan: the blob (64-byte aligned uint8), its kernel slots and shapes."""

    blob: np.ndarray
    kernel_slots: list[str]  # layer name per slot
    batch: int
    in_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int]
    workspace_bytes: int


class _Payload:
    def __init__(self, start: int) -> None:
        self.parts: list[bytes] = []
        self.size = start

    def add(self, data: np.ndarray | bytes) -> int:
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        pad = (-self.size) % ALIGN
        if pad:
            self.parts.append(b"\0" * pad)
            self.size += pad
        off = self.size
        self.parts.append(raw)
        self.size += len(raw)
        return off


def _aligned_bytes(size: int) -> np.ndarray:
    buf = np.zeros(size + ALIGN, np.uint8)
    start = (-buf.ctypes.data) % ALIGN
    return buf[start:start + size]


def field_index(kind: int, name: str) -> int:
    """Position of field ``name`` in a record of op ``kind`` (the one table of the record layout)."""
    if kind >= OP_CONV:
        return GRAPH_FIELDS.index(name)
    return OP_FIELDS.index("clamp" if name == "nchw" else name)  # OP_DW's nchw flag shares the clamp field


def empty_record() -> list[int]:
    """A record with every optional field unset: packed, bias, weights, pre-bias / im2col -1, no residual."""
    rec = [0] * REC
    for name in ("kernel", "packed", "bias", "weights", "pre_bias"):  # same positions in GRAPH_FIELDS
        rec[OP_FIELDS.index(name)] = -1
    rec[OP_FIELDS.index("res")] = NO_RES
    return rec


def encode_plan(records: list[list[int]], pay: _Payload, slots: list[str], batch: int,
                in_shape: tuple[int, int, int], out_features: int, workspace: int, scratch: int) -> PlanBlob:
    """The plan blob: header, ``records`` (``pay`` must have been started at ``head_bytes(len(records))``),
    the payload and the two kernel tables (plain and ``_ep`` entry points, filled by binding)."""
    kernels_off = pay.add(b"\0" * (2 * 8 * max(1, len(slots))))
    total = pay.size
    C, H, W = in_shape
    header = [MAGIC, VERSION, len(records), batch, C, H, W, out_features, workspace, len(slots), kernels_off, total,
              scratch]
    blob = _aligned_bytes(total)
    head = np.zeros(REC * (1 + len(records)), "<i8")
    head[:len(header)] = header
    if records:
        head[REC:] = np.asarray(records, "<i8").ravel()
    blob[:] = np.frombuffer(head.tobytes() + b"".join(pay.parts), np.uint8)
    return PlanBlob(blob, slots, batch, (batch, C, H, W), (batch, out_features), workspace)


def header_words(blob: np.ndarray) -> dict[str, int] | None:
    """The header of a plan blob by :data:`HEADER_FIELDS` name, or None if the blob is shorter than one."""
    if len(blob) < 8 * REC:
        return None
    words = np.asarray(blob[:8 * REC]).view("<i8")
    return {name: int(words[i]) for i, name in enumerate(HEADER_FIELDS)}


def head_bytes(n_ops: int) -> int:
    """Bytes of the header and ``n_ops`` records (where the payload starts)."""
    return 8 * REC * (1 + n_ops)


def band_rows(hidden: int, H: int, W: int, stride: int, budget: int = BAND_BYTES) -> int:
    """Output rows per band of a fused expand + depthwise (kind 5) so one band's expanded rows fit ``budget``."""
    ho = (H - 1) // stride + 1
    band = 1
    while band < ho and hidden * 4 * W * (band * stride + 3 - stride) <= budget:
        band += 1
    return max(1, band - 1) if band < ho else ho


def band_buffer_floats(cin: int, hidden: int, H: int, W: int, stride: int, band: int) -> tuple[int, int]:
    """Floats of a fused op's band buffers: input rows ``[cin, rows, W]``, expanded rows ``[hidden, rows, W]``."""
    rows = min(H, band * stride + 3 - stride)
    return cin * rows * W, hidden * rows * W
