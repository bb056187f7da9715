"""Plan a pruned inverted-residual subgraph (MobileNetV2 style) for the channel-major C runtime.

The subgraph is everything between the stem and the classifier: inverted-residual blocks (1x1
expand (sparse) + BN + ReLU6, depthwise 3x3 + BN + ReLU6, 1x1 project (sparse) + BN, optional
residual add) and a final 1x1 conv + BN + ReLU6 followed by global average pooling. BatchNorm is
folded into the preceding conv (scaling a row keeps its block pattern), so every pruned layer
becomes ``y = W' x + b`` and its kernel is built from the folded weights.

Plan blob (little-endian; read by ``native/ubp_model.c``)::

    int64 header[16]   magic "UBPM", version 2, n_ops, batch, C_in, H_in, W_in, C_out,
                       workspace bytes, n_kernels, kernel table offset, total bytes, scratch offset
    int64 ops[n_ops][16]   kind (1 sparse 1x1, 2 depthwise, 3 pool, 4 input to channel-major,
                       5 expand + depthwise fused in bands of output rows),
                       src, dst, C (a sparse op: its K), M, HW, kernel slot, packed offset, bias offset, residual,
                       H, W, stride, weights offset, pre-bias offset, clamp (0 none, 1 ReLU, 2 ReLU6;
                       for a depthwise op: 1 = its source is the model input in [B, C, H, W])
    payload            biases, depthwise weights [C, 9], packed sparse weights (64-byte aligned)
    void *kernels[n_kernels]   filled by ubp_model_bind() once the kernels are loaded
    void *kernels_ep[n_kernels]   their fused-epilogue entry points (ubpdsl.abi.C_EP_SIGNATURE), filled
                       by ubp_model_bind_ep(); a sparse op with a bias then stores
                       clamp(W x + bias + residual) in one pass (NULL: the kernel, then a C pass)

Buffers: -1 the model input ([B, C, H, W]), -2 the output ([B, C_out]), >= 0 a byte offset in the
workspace; activations in the workspace are [C, B, H, W]. Offsets of payload items are bytes from the
start of the blob; -1 means none (residual: -3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ubpdsl.errors import UbpError
from ubpdsl.masks import LayerMask

__all__ = ["Block", "Subgraph", "PlanBlob", "fold_bn", "folded_mask", "extract_subgraph", "build_plan",
           "split_mobilenet"]

MAGIC = 0x4D504255
VERSION = 2
REC = 16
# The format's numbers, owned here: native/ubp_model.c includes the header c_plan_header() generates
# from them (native.py writes it at build time), so Python and C cannot drift.
#: header words (C: ``H_<name>``)
HEADER_FIELDS = ("MAGIC", "VERSION", "NOPS", "BATCH", "CIN", "HIN", "WIN", "COUT", "WS_BYTES", "NKERNELS",
                 "KERNELS_OFF", "TOTAL_BYTES", "SCRATCH_OFF")
#: op record fields of kinds 1..5 (C: ``F_<NAME>``)
OP_FIELDS = ("kind", "src", "dst", "C", "M", "HW", "kernel", "packed", "bias", "res", "H", "W", "stride", "weights",
             "pre_bias", "clamp")
#: op record fields of the general kinds 6..13 (C: ``G_<NAME>``; planned by ubpdsl.deploy.graph)
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
#: blocks whose expanded tensor (per image) is larger than this run expand + depthwise fused in bands
FUSE_MIN_BYTES = 1 << 20
#: target size of one band's expanded buffer (stays in L2 between the kernel and the depthwise)
BAND_BYTES = 400 << 10
NO_RES = -3
ALIGN = 64


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


def fold_bn(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[np.ndarray, np.ndarray]:
    """``(W * s[:, None], beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``; W as [M, prod(rest)]."""
    s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double()
    w = weight.detach().double().reshape(weight.shape[0], -1) * s[:, None]
    b = bn.bias.detach().double() - bn.running_mean.detach().double() * s
    return w.float().numpy(), b.float().numpy()


@dataclass
class Block:
    """One inverted-residual block, BN folded."""

    expand: str | None  # layer name of the sparse 1x1 expand conv (None when t = 1)
    expand_bias: np.ndarray | None
    dw_weight: np.ndarray  # [hidden, 9]
    dw_bias: np.ndarray
    stride: int
    project: str
    project_bias: np.ndarray
    residual: bool
    cin: int
    hidden: int
    cout: int


@dataclass
class Subgraph:
    """The channel-major subgraph: blocks, the final 1x1 conv (+ReLU6) and the pool."""

    blocks: list[Block]
    final: str
    final_bias: np.ndarray
    cin: int
    cout: int
    masks: dict[str, LayerMask] = field(default_factory=dict)  # folded weights, for the kernels


def split_mobilenet(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """``(stem, subgraph modules, classifier)`` of a MobileNetV2 (ubpdsl.models or torchvision names)."""
    feats = getattr(model, "features", None)
    cls = getattr(model, "classifier", None)
    if not isinstance(feats, nn.Sequential) or cls is None or len(feats) < 3:
        raise PlanError(f"{type(model).__name__} is not a MobileNetV2 (features + classifier)")
    return feats[0], list(feats[1:]), cls


def _mask_for(masks: Mapping[str, LayerMask], name: str) -> LayerMask:
    if name not in masks:
        raise PlanError(f"layer {name!r} is not pruned (no mask): every 1x1 conv of the subgraph must be")
    return masks[name]


def folded_mask(mask: LayerMask, w: np.ndarray) -> LayerMask:
    """``mask`` with the folded weights ``w`` ([R, C]) kept only inside its blocks."""
    return LayerMask(mask.name, mask.shape, mask.block, mask.rows, mask.cols, w * mask.dense_mask())


def extract_subgraph(model: nn.Module, masks: Mapping[str, LayerMask], prefix: str = "features") -> Subgraph:
    """The BN-folded subgraph of a pruned MobileNetV2 in eval mode (``masks``: its 1x1 convs' masks)."""
    if model.training:
        raise PlanError("put the model in eval mode before planning (BatchNorm is folded)")
    _, mods, _ = split_mobilenet(model)
    blocks: list[Block] = []
    folded: dict[str, LayerMask] = {}
    for i, blk in enumerate(mods[:-1], start=1):
        seq = getattr(blk, "conv", None)
        if not isinstance(seq, nn.Sequential) or len(seq) not in (3, 4):
            raise PlanError(f"{prefix}.{i} is not an inverted-residual block")
        base = f"{prefix}.{i}.conv"
        expand = None
        eb = None
        j = 0
        if len(seq) == 4:
            conv, bn = seq[0][0], seq[0][1]
            expand = f"{base}.0.0"
            w, eb = fold_bn(conv.weight, bn)
            folded[expand] = folded_mask(_mask_for(masks, expand), w)
            j = 1
        dw, dbn = seq[j][0], seq[j][1]
        if dw.kernel_size != (3, 3) or dw.groups != dw.in_channels or dw.padding != (1, 1):
            raise PlanError(f"{base}.{j}.0 is not a depthwise 3x3 conv with padding 1")
        dww, dwb = fold_bn(dw.weight, dbn)
        proj, pbn = seq[j + 1], seq[j + 2]
        project = f"{base}.{j + 1}"
        pw, pb = fold_bn(proj.weight, pbn)
        folded[project] = folded_mask(_mask_for(masks, project), pw)
        blocks.append(Block(expand, eb, dww, dwb, int(dw.stride[0]), project, pb, bool(blk.use_res_connect),
                            int(dw.in_channels) if expand is None else int(seq[0][0].in_channels),
                            int(dw.in_channels), int(proj.out_channels)))
    last = mods[-1]
    final = f"{prefix}.{len(mods)}.0"
    if not isinstance(last, nn.Sequential) or last[0].kernel_size != (1, 1):
        raise PlanError(f"{prefix}.{len(mods)} is not the final 1x1 conv + BN + ReLU6")
    fw, fb = fold_bn(last[0].weight, last[1])
    folded[final] = folded_mask(_mask_for(masks, final), fw)
    return Subgraph(blocks, final, fb, blocks[0].cin, int(last[0].out_channels), folded)


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


def _band_rows(hidden: int, H: int, W: int, stride: int, budget: int) -> int:
    """Output rows per band of a fused expand + depthwise so one band's expanded rows fit ``budget``."""
    ho = (H - 1) // stride + 1
    band = 1
    while band < ho and hidden * 4 * W * (band * stride + 3 - stride) <= budget:
        band += 1
    return max(1, band - 1) if band < ho else ho


def build_plan(sub: Subgraph, packed: Mapping[str, np.ndarray | None], batch: int, hw: tuple[int, int], *,
               fuse_min_bytes: int | None = FUSE_MIN_BYTES, band_bytes: int = BAND_BYTES) -> PlanBlob:
    """The plan blob for ``sub`` at ``batch`` and input ``hw`` (the stem's output size, e.g. 112x112).

    ``packed``: each sparse layer's packed weights (None for a mask-specialised kernel). Blocks whose
    expanded tensor (per image) exceeds ``fuse_min_bytes`` run expand + depthwise fused in bands of
    about ``band_bytes``, one image at a time (None: never fuse). Smaller blocks are not fused: at
    batch > 1 they gain more from one kernel call over the whole batch.
    """
    from ubpdsl.deploy.native import dw_scratch_floats

    if batch < 1:
        raise PlanError(f"batch must be >= 1, got {batch}")
    H, W = hw
    ws = 0

    def alloc(nbytes: int) -> int:
        nonlocal ws
        off = ws
        ws += nbytes + (-nbytes) % ALIGN
        return off

    # Buffer sizes (floats): block io, expand outputs, depthwise outputs.
    io = e = d = sc = 0
    h, w = H, W
    for b in sub.blocks:
        io = max(io, b.cin * h * w)
        e = max(e, b.hidden * h * w)
        ho, wo = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
        sc = max(sc, dw_scratch_floats(h, w, b.stride))  # the depthwise's staging and masks
        h, w = ho, wo
        d = max(d, b.hidden * h * w)
        io = max(io, b.cout * h * w)
    e = max(e, sub.cout * h * w)
    f = 4 * batch
    X = [alloc(f * io), alloc(f * io)]
    E, D = alloc(f * e), alloc(f * d)
    scratch = alloc(4 * sc)
    # fused blocks: output rows per band, and the band buffers' sizes (floats)
    bands: dict[int, int] = {}
    xb = eb = 0
    h, w = H, W
    for i, b in enumerate(sub.blocks):
        if b.expand is not None and fuse_min_bytes is not None and 4 * b.hidden * h * w > fuse_min_bytes:
            bands[i] = _band_rows(b.hidden, h, w, b.stride, band_bytes)
            rows = min(h, bands[i] * b.stride + 3 - b.stride)
            xb, eb = max(xb, b.cin * rows * w), max(eb, b.hidden * rows * w)
        h, w = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
    XB, EB = (alloc(4 * xb), alloc(4 * eb)) if bands else (-1, -1)

    n_ops_max = 4 * len(sub.blocks) + 4
    head_bytes = 8 * REC * (1 + n_ops_max)
    pay = _Payload(head_bytes)
    ops: list[list[int]] = []
    slots: list[str] = []

    def op(**kw: int) -> None:
        rec = [0] * REC
        rec[7] = rec[8] = -1  # packed, bias
        rec[9] = NO_RES
        rec[14] = -1  # pre-bias
        for k, v in kw.items():
            rec[OP_FIELDS.index(k)] = int(v)
        ops.append(rec)

    def sparse(name: str, src: int, dst: int, K: int, M: int, hw_: int, **kw: int) -> None:
        p = packed.get(name)
        slots.append(name)
        op(kind=OP_PW, src=src, dst=dst, C=K, M=M, HW=hw_, kernel=len(slots) - 1,
           packed=-1 if p is None else pay.add(np.ascontiguousarray(p, np.uint8)), **kw)

    f32 = lambda a: np.ascontiguousarray(a, "<f4")  # noqa: E731
    cur = -1
    first = sub.blocks[0]
    # [B, C, H, W] -> [C, B, H, W]: not needed at batch 1, nor when the first block starts with its
    # depthwise (it reads planes in either layout) and has no residual.
    src_nchw = batch > 1 and first.expand is None and not first.residual
    if batch > 1 and not src_nchw:
        op(kind=OP_INPUT, dst=X[0], C=sub.cin, HW=H * W)
        cur = X[0]
    h, w = H, W
    for i, b in enumerate(sub.blocks):
        src = cur
        pre = -1
        ho, wo = (h - 1) // b.stride + 1, (w - 1) // b.stride + 1
        if i in bands:
            p = packed.get(b.expand)
            slots.append(b.expand)
            # fields reused by OP_EXPAND_DW: HW = output rows per band, res / clamp = band buffers
            op(kind=OP_EXPAND_DW, src=src, dst=D, C=b.hidden, M=b.cin, HW=bands[i], kernel=len(slots) - 1,
               packed=-1 if p is None else pay.add(np.ascontiguousarray(p, np.uint8)), H=h, W=w, stride=b.stride,
               weights=pay.add(f32(b.dw_weight)), bias=pay.add(f32(b.dw_bias)),
               pre_bias=pay.add(f32(b.expand_bias)), res=XB, clamp=EB)
        else:
            if b.expand is not None:
                sparse(b.expand, src, E, b.cin, b.hidden, h * w)
                pre = pay.add(f32(b.expand_bias))
                src = E
            op(kind=OP_DW, src=src, dst=D, C=b.hidden, H=h, W=w, stride=b.stride,
               weights=pay.add(f32(b.dw_weight)), bias=pay.add(f32(b.dw_bias)), pre_bias=pre,
               clamp=int(src_nchw and i == 0))  # clamp field = "source is [B, C, H, W]" for OP_DW
        out = X[1] if cur == X[0] else X[0]
        sparse(b.project, D, out, b.hidden, b.cout, ho * wo, bias=pay.add(f32(b.project_bias)),
               res=cur if b.residual else NO_RES, clamp=0)
        cur, h, w = out, ho, wo
    sparse(sub.final, cur, E, sub.blocks[-1].cout, sub.cout, h * w)
    op(kind=OP_POOL, src=E, dst=-2, C=sub.cout, HW=h * w, bias=pay.add(f32(sub.final_bias)), clamp=2)

    kernels_off = pay.add(b"\0" * (2 * 8 * len(slots)))  # the plain and the _ep entry points
    total = pay.size
    header = [MAGIC, VERSION, len(ops), batch, sub.cin, H, W, sub.cout, ws, len(slots), kernels_off, total, scratch]
    blob = _aligned_bytes(total)
    head = np.zeros(REC * (1 + n_ops_max), "<i8")
    head[:len(header)] = header
    head[REC:REC * (1 + len(ops))] = np.asarray(ops, "<i8").ravel()
    raw = head.tobytes() + b"".join(pay.parts)
    blob[:] = np.frombuffer(raw, np.uint8)
    return PlanBlob(blob, slots, batch, (batch, sub.cin, H, W), (batch, sub.cout), ws)
