"""Plan a pruned CNN for the channel-major C runtime (``ubp_model_run``): the one planner.

The model is traced with ``torch.fx`` (shapes from one example input) and lowered node by node
into the ops of a plan blob (format and record layout in :mod:`ubpdsl.deploy.plan`, run by
``native/ubp_model.c``):

* a pruned 1x1 conv (stride 1, no padding, groups 1) or pruned ``Linear``: op kind 1, its ubpdsl
  kernel over the whole batch (n = batch x pixels); a following ``BatchNorm2d`` is folded into
  the weights (:func:`ubpdsl.deploy.plan.fold_bn`), a following residual add and ReLU / ReLU6 /
  Hardtanh(0, 6) are stored through the kernel's fused-epilogue entry point (``_ep``);
* the inverted-residual pattern -- a pruned 1x1 expand (+ BN + ReLU6) whose sole user is a
  depthwise 3x3 (+ BN + ReLU6) -- runs fused (kind 5) when the expanded tensor is large
  (``fuse_min_bytes``): the expand is computed in bands of output rows that the depthwise consumes
  from cache; otherwise the expand's bias + ReLU6 are applied by the depthwise while staging;
* a depthwise 3x3 conv (padding 1, stride 1 or 2) followed by ReLU6: the depthwise op (kind 2);
* any other ``Conv2d`` (any kernel, stride, padding, groups; dilation 1) or ``Linear``: kind 6,
  im2col into the workspace (columns = batch x output pixels), then the ubpdsl kernel when pruned
  (groups 1), else a dense GEMM on the folded weights, with the same fused BN / add / activation;
* max / average pools kxk, adaptive average pool to 1, flatten (a transpose from [C, B, H, W] to
  the [C*H*W, B] columns of a linear layer; free when H = W = 1), residual adds, standalone
  BatchNorm and activations, dropout / identity (nothing): kinds 7..12;
* anything else is a :class:`~ubpdsl.deploy.plan.PlanError` naming the node.

``start`` / ``stop`` cut the model: the nodes up to ``start`` (e.g. a dense stem) and after
``stop`` (e.g. a dense classifier) stay torch modules (:attr:`GraphSpec.head`, :attr:`GraphSpec.tail`,
run by XNNPACK inside ExecuTorch). Buffers are placed in one workspace by lifetime (largest first,
lowest free offset).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.nn import functional as F

from ubpdsl.deploy.plan import (
    ALIGN,
    BAND_BYTES,
    BUF_INPUT,
    BUF_OUTPUT,
    FUSE_MIN_BYTES,
    NO_RES,
    OP_ADD,
    OP_AFFINE,
    OP_AVGPOOL,
    OP_CONV,
    OP_DW,
    OP_EXPAND_DW,
    OP_FLATTEN,
    OP_GAP,
    OP_INPUT,
    OP_MAXPOOL,
    OP_OUTPUT,
    OP_PW,
    PlanBlob,
    PlanError,
    _Payload,
    band_buffer_floats,
    band_rows,
    empty_record,
    encode_plan,
    field_index,
    fold_bn,
    folded_mask,
    head_bytes,
)
from ubpdsl.masks import LayerMask

__all__ = ["GraphSpec", "trace_graph", "build_graph_plan", "OP_CONV", "OP_MAXPOOL", "OP_AVGPOOL", "OP_GAP",
           "OP_FLATTEN", "OP_ADD", "OP_AFFINE", "OP_OUTPUT"]

INPUT, OUTPUT = BUF_INPUT, BUF_OUTPUT

_RELU = {nn.ReLU, F.relu, torch.relu, torch.relu_, F.relu_, "relu", "relu_"}
_RELU6 = {nn.ReLU6, F.relu6, "relu6"}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_"}
_FLATTEN = {nn.Flatten, torch.flatten, "flatten", "view", "reshape"}
_IDENTITY = {nn.Dropout, nn.Identity, F.dropout, "contiguous", "clone"}


@dataclass
class _Op:
    """One op before buffer placement: record fields (ints, virtual buffers as ``('v', id)``)."""

    fields: dict[str, Any]
    reads: list[int]
    writes: int | None
    temps: list[int] = field(default_factory=list)


@dataclass
class GraphSpec:
    """A traced, BN-folded model ready to be planned at any batch size."""

    ops: list[_Op]
    sizes: dict[int, int]  # virtual buffer -> floats per image
    masks: dict[str, LayerMask]  # the pruned layers, BN folded (build their kernels from these)
    in_shape: tuple[int, int, int]  # per image, of the planned part
    out_shape: tuple[int, ...]  # per image, of the model output
    out_value: int  # the virtual buffer holding the output (channel-major), or INPUT
    out_hw: int
    out_c: int
    scratch_floats: int  # depthwise staging (op kind 2)
    nchw_ok: set[int] = field(default_factory=set)  # op indices that read the model input in NCHW
    head: nn.Module | None = None  # the part before ``start`` (None: the plan starts at the model input)
    tail: nn.Module | None = None  # the part after ``stop`` (None: the plan ends at the model output)
    fixed: set[int] = field(default_factory=set)  # buffers sized for one image whatever the batch (bands)


def _target_key(node: fx.Node, modules: Mapping[str, nn.Module]) -> Any:
    if node.op == "call_module":
        return type(modules[node.target])
    if node.op in ("call_function", "call_method"):
        return node.target
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise PlanError(f"node {node.name} ({node.op} {node.target}) does not produce one tensor")
    return tuple(int(d) for d in meta.shape)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _arg(node: fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def trace_graph(model: nn.Module, masks: Mapping[str, LayerMask], example: torch.Tensor, *,
                start: str | None = None, stop: str | None = None, fuse_min_bytes: int | None = FUSE_MIN_BYTES,
                band_bytes: int = BAND_BYTES) -> GraphSpec:
    """Trace ``model`` (eval mode) on ``example`` ([B, C, H, W]) and lower it (see the module docstring).

    ``masks``: the pruned layers (module names). ``start``: an fx node name (a module's name with
    dots as underscores, e.g. ``relu`` or ``features_0_2``) after which the plan begins; the nodes
    up to it become :attr:`GraphSpec.head`. ``stop``: the node whose value the plan returns; the
    nodes after it become :attr:`GraphSpec.tail` (e.g. a dense classifier left to XNNPACK).
    A pruned 1x1 conv (+ BN + ReLU6) feeding a depthwise 3x3 + ReLU6 whose output is larger than
    ``fuse_min_bytes`` per image runs fused with it (op kind 5) in bands of about ``band_bytes``
    (None: never fuse; smaller blocks gain more at batch > 1 from one kernel call over the batch).
    """
    if model.training:
        raise PlanError("put the model in eval mode before planning (BatchNorm is folded)")
    if example.dim() != 4:
        raise PlanError(f"the planner needs a [B, C, H, W] input, got shape {list(example.shape)}")
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is the user's model
        first = (str(exc).strip().splitlines() or [""])[0]
        raise PlanError(f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: {first}") from None
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    return _Lowering(gm, masks, start, stop, fuse_min_bytes, band_bytes).run()


class _Lowering:
    def __init__(self, gm: fx.GraphModule, masks: Mapping[str, LayerMask], start: str | None,
                 stop: str | None = None, fuse_min_bytes: int | None = FUSE_MIN_BYTES,
                 band_bytes: int = BAND_BYTES) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.masks = masks
        self.nodes = list(gm.graph.nodes)
        self.start = start
        self.stop = stop
        self.stop_node: fx.Node | None = None
        self.fixed: set[int] = set()
        self.fuse_min_bytes = fuse_min_bytes
        self.band_bytes = band_bytes
        self.ops: list[_Op] = []
        self.sizes: dict[int, int] = {}
        self.value: dict[fx.Node, int] = {}  # node -> virtual buffer (INPUT for the input)
        self.folded: dict[str, LayerMask] = {}
        self.pre_bias: dict[int, np.ndarray] = {}  # buffer whose bias + ReLU6 the depthwise applies
        self.done: set[fx.Node] = set()
        self.scratch = 0
        self.nchw_ok: set[int] = set()

    # ------------------------------------------------------------------ helpers
    def new(self, floats: int) -> int:
        vid = len(self.sizes)
        self.sizes[vid] = int(floats)
        return vid

    def new_fixed(self, floats: int) -> int:
        """A buffer of ``floats`` whatever the batch (a fused op's band buffers: one image at a time)."""
        vid = self.new(floats)
        self.fixed.add(vid)
        return vid

    def emit(self, reads: list[int], writes: int | None, temps: list[int] | None = None, **fields: Any) -> int:
        self.ops.append(_Op(fields, [r for r in reads if r is not None], writes, list(temps or [])))
        return len(self.ops) - 1

    def key(self, node: fx.Node) -> Any:
        return _target_key(node, self.modules)

    def sole_user(self, node: fx.Node) -> fx.Node | None:
        if node is self.stop_node:
            return None  # nothing after the plan's last node is fused into it
        users = list(node.users)
        return users[0] if len(users) == 1 and users[0].op != "output" else None

    def clamp_of(self, node: fx.Node) -> int | None:
        """0/1/2 if ``node`` is an activation we fuse (ReLU, ReLU6 / Hardtanh(0, 6)), else None."""
        k = self.key(node)
        if k in _RELU:
            return 1
        if k in _RELU6:
            return 2
        if k is nn.Hardtanh:
            m = self.modules[node.target]
            return 2 if (m.min_val, m.max_val) == (0.0, 6.0) else None
        if k is F.hardtanh and (_arg(node, 1, "min_val", -1.0), _arg(node, 2, "max_val", 1.0)) == (0.0, 6.0):
            return 2
        return None

    def src(self, node: fx.Node, arg: Any) -> int:
        if not isinstance(arg, fx.Node) or arg not in self.value:
            raise PlanError(f"node {node.name}: its input {arg!r} is not a tensor the plan computes")
        return self.value[arg]

    def add_operands(self, node: fx.Node) -> tuple[Any, Any]:
        if len(node.args) != 2 or node.kwargs.get("alpha", 1) != 1:
            raise PlanError(f"node {node.name}: only a + b of two tensors is supported")
        return node.args[0], node.args[1]

    # ------------------------------------------------------------------ main walk
    def run(self) -> GraphSpec:
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise PlanError(f"the model must take one input, it takes {len(placeholders)}")
        first = placeholders[0]
        head = tail = None
        if self.start is not None:
            head, first = self._split_head()
        if self.stop is not None:
            tail, self.stop_node = self._split_tail()
        self.in_node = first
        self.value[first] = INPUT
        in_shape = _shape(first)[1:]
        if len(in_shape) != 3:
            raise PlanError(f"the planned part must start from a [B, C, H, W] tensor, got {list(_shape(first))}")
        out_node = None
        for node in self.nodes:
            if node in self.done or node is first or node.op in ("placeholder", "get_attr"):
                continue
            if node.op == "output":
                out_node = node.args[0]
                break
            self.lower(node)
            if self.stop_node is not None and self.stop_node in self.value:
                out_node = self.stop_node
                break
        if not isinstance(out_node, fx.Node) or out_node not in self.value:
            raise PlanError("the model must return one tensor")
        if self.value[out_node] == INPUT:
            raise PlanError("the planned part computes nothing (its output is its input)")
        oshape = _shape(out_node)[1:]
        out_c, out_hw = (oshape[0], int(np.prod(oshape[1:]))) if len(oshape) >= 1 else (1, 1)
        return GraphSpec(self.ops, self.sizes, self.folded, tuple(in_shape), oshape, self.value[out_node], out_hw,
                         out_c, self.scratch, self.nchw_ok, head, tail, self.fixed)

    def _split_tail(self) -> tuple[nn.Module, fx.Node]:
        by_name = {n.name: n for n in self.nodes}
        if self.stop not in by_name or by_name[self.stop].op in ("placeholder", "output", "get_attr"):
            names = ", ".join(n.name for n in self.nodes if n.op not in ("placeholder", "output"))
            raise PlanError(f"stop node {self.stop!r} is not a node of the traced model ({names})")
        cut = by_name[self.stop]
        if cut in self.done:
            raise PlanError(f"stop node {self.stop!r} is before the start node {self.start!r}")
        idx = self.nodes.index(cut)
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {cut: graph.placeholder("x")}
        for n in self.nodes[idx + 1:]:
            for a in n.all_input_nodes:
                if a in env:
                    continue
                if a.op != "get_attr":
                    raise PlanError(f"cannot stop at {self.stop!r}: node {n.name} also uses {a.name} from before it")
                env[a] = graph.node_copy(a, lambda b: env[b])
            env[n] = graph.node_copy(n, lambda a: env[a])
            self.done.add(n)
        return fx.GraphModule(self.gm, graph), cut

    def _split_head(self) -> tuple[nn.Module, fx.Node]:
        by_name = {n.name: n for n in self.nodes}
        if self.start not in by_name or by_name[self.start].op in ("placeholder", "output"):
            names = ", ".join(n.name for n in self.nodes if n.op not in ("placeholder", "output"))
            raise PlanError(f"start node {self.start!r} is not a node of the traced model ({names})")
        cut = by_name[self.start]
        idx = self.nodes.index(cut)
        before = set(self.nodes[:idx + 1])
        for n in self.nodes[idx + 1:]:
            for a in n.all_input_nodes:
                if a in before and a is not cut and a.op != "get_attr":
                    raise PlanError(f"cannot split at {self.start!r}: node {n.name} also uses {a.name} "
                                    "from before it")
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.nodes[:idx + 1]:
            env[n] = graph.node_copy(n, lambda a: env[a])
        graph.output(env[cut])
        head = fx.GraphModule(self.gm, graph)
        for n in self.nodes[:idx + 1]:
            self.done.add(n)
        return head, cut

    def lower(self, node: fx.Node) -> None:
        k = self.key(node)
        if node.op == "call_method" and node.target == "size":
            return  # only used by view/reshape, checked there through the shapes
        if k is nn.Conv2d or k is nn.Linear:
            return self.conv(node)
        if k in _IDENTITY:
            self.value[node] = self.src(node, node.args[0])
            return
        if k in _FLATTEN:
            return self.flatten(node)
        if k in (nn.MaxPool2d, F.max_pool2d, nn.AvgPool2d, F.avg_pool2d):
            return self.pool(node)
        if k in (nn.AdaptiveAvgPool2d, F.adaptive_avg_pool2d):
            return self.gap(node)
        if k in _ADD:
            a, b = self.add_operands(node)
            return self.standalone(node, self.src(node, a), res=self.src(node, b))
        if k is nn.BatchNorm2d:
            bn = self.modules[node.target]
            s = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
            t = (bn.bias - bn.running_mean * s).detach()
            return self.standalone(node, self.src(node, node.args[0]), scale=s.numpy(), shift=t.numpy())
        if self.clamp_of(node) is not None:
            return self.standalone(node, self.src(node, node.args[0]))
        what = node.target
        if node.op == "call_module":
            what = f"{node.target} ({type(self.modules[node.target]).__name__})"
        raise PlanError(f"node {node.name}: {node.op} {getattr(what, '__name__', what)} is not supported by the "
                        "planner (conv, linear, BatchNorm, ReLU/ReLU6, pools, flatten, add)")

    # ------------------------------------------------------------------ fused chains
    def chain(self, node: fx.Node, *, bn: bool, res_ok: bool) -> tuple[fx.Node, Any, fx.Node | None, int]:
        """Follow ``node``'s sole users: [BatchNorm2d] [+ residual] [activation]; returns
        (last node, bn module or None, residual node or None, clamp)."""
        cur, bnm, res, clamp = node, None, None, 0
        u = self.sole_user(cur)
        if bn and u is not None and self.key(u) is nn.BatchNorm2d:
            bnm, cur = self.modules[u.target], u
            u = self.sole_user(cur)
        if res_ok and u is not None and self.key(u) in _ADD:
            a, b = self.add_operands(u)
            other = b if a is cur else a
            if isinstance(other, fx.Node) and other in self.value and other is not cur and \
                    _shape(other) == _shape(cur):
                res, cur = other, u
                u = self.sole_user(cur)
        if u is not None and self.clamp_of(u) is not None:
            clamp, cur = self.clamp_of(u), u
        return cur, bnm, res, clamp

    def dw_ok(self, node: fx.Node) -> bool:
        """A depthwise 3x3 / pad 1 / stride 1-2 conv + [BN] + ReLU6 (no residual): op kind 2."""
        if self.key(node) is not nn.Conv2d:
            return False
        m = self.modules[node.target]
        if not (m.groups == m.in_channels == m.out_channels and _pair(m.kernel_size) == (3, 3)
                and _pair(m.padding) == (1, 1) and _pair(m.stride) in ((1, 1), (2, 2)) and _pair(m.dilation) == (1, 1)
                and m.padding_mode == "zeros" and node.target not in self.masks):
            return False
        _, _, res, clamp = self.chain(node, bn=True, res_ok=False)
        return clamp == 2 and res is None

    def conv(self, node: fx.Node) -> None:
        m = self.modules[node.target]
        name = str(node.target)
        is_lin = isinstance(m, nn.Linear)
        x = node.args[0]
        src = self.src(node, x)
        ishape = _shape(x)[1:]
        last, bnm, res, clamp = self.chain(node, bn=not is_lin, res_ok=True)
        wf, bias = self.folded_weights(m, bnm)
        for n in self._between(node, last):
            self.done.add(n)
        if is_lin:
            if len(ishape) != 1:
                raise PlanError(f"node {node.name}: a linear layer on a {len(ishape) + 1}-D tensor (flatten first)")
            C, H, W, M = ishape[0], 1, 1, m.out_features
            geom = [1, 1, 1, 1, 0, 0, 1]
        else:
            if len(ishape) != 3:
                raise PlanError(f"node {node.name}: conv input must be [B, C, H, W]")
            if _pair(m.dilation) != (1, 1) or m.padding_mode != "zeros" or isinstance(m.padding, str) and \
                    m.padding != "valid":
                raise PlanError(f"node {node.name}: dilation, padding modes and string padding are not supported")
            C, H, W = ishape
            M = m.out_channels
            pad = (0, 0) if m.padding == "valid" else _pair(m.padding)
            geom = [*_pair(m.kernel_size), *_pair(m.stride), *pad, m.groups]
            if self.dw_ok(node):
                return self.depthwise(node, last, src, wf, bias, C, H, W, _pair(m.stride)[0])
        oshape = _shape(last)[1:]
        kh, kw, sh, sw, ph, pw, groups = geom
        direct = is_lin or (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0)
        # the depthwise after this conv applies its bias + ReLU6 while staging (no epilogue pass here)
        u = self.sole_user(last)
        defer = (clamp == 2 and res is None and u is not None and self.dw_ok(u))
        pruned = name in self.masks
        if pruned:
            if groups != 1:
                raise PlanError(f"node {node.name}: a pruned grouped convolution is not supported")
            mask = self.masks[name]
            if getattr(mask, "pixel_keep", None) is not None:
                raise PlanError(f"layer {name} has an activation (pixel) mask: the channel-major planner does "
                                "not run pixel-masked layers; export them as a bundle (ubpdsl export --runtime bundle)")
            if tuple(mask.shape) != tuple(m.weight.shape):
                raise PlanError(f"layer {name}: mask shape {tuple(mask.shape)} != weight {tuple(m.weight.shape)}")
            self.folded[name] = folded_mask(mask, wf)
            if defer and direct and not is_lin and self.fuse_min_bytes is not None and \
                    4 * M * H * W > self.fuse_min_bytes:
                return self.expand_depthwise(u, src, name, bias, C, H, W, M)
        out = self.new(int(np.prod(oshape)))
        self.value[last] = out
        if pruned and direct:  # kind 1: the kernel, bias (+ residual) + clamp fused into its stores (_ep)
            fields: dict[str, Any] = dict(kind=OP_PW, src=("v", src), dst=("v", out), C=C, M=M, HW=H * W,
                                          kernel=name, clamp=0)
            if defer:
                self.pre_bias[out] = np.zeros(M, np.float32) if bias is None else bias
            elif bias is not None or res is not None or clamp:
                fields["bias"] = np.ascontiguousarray(np.zeros(M, np.float32) if bias is None else bias, "<f4")
                fields["clamp"] = clamp
                if res is not None:
                    fields["res"] = ("v", self.value[res])
            self.emit([src, self.value[res] if res is not None and not defer else None], out, **fields)
            return
        fields = dict(kind=OP_CONV, C=C, M=M, H=H, W=W, res=NO_RES, clamp=clamp)
        if defer:
            self.pre_bias[out] = np.zeros(M, np.float32) if bias is None else bias
            fields["clamp"] = 0
        elif bias is not None:
            fields["bias"] = np.ascontiguousarray(bias, "<f4")
        if res is not None:
            fields["res"] = ("v", self.value[res])
        if pruned:
            fields["kernel"] = name
        else:
            fields["weights"] = np.ascontiguousarray(wf, "<f4")
        temp = None
        if not direct:
            Ho, Wo = oshape[1], oshape[2]
            temp = self.new((C // groups) * kh * kw * Ho * Wo)
            fields["tmp"] = ("v", temp)
        fields["geom"] = np.asarray([*geom, 0], "<i8")  # NCHW flag set when planned at batch > 1
        fields["src"] = ("v", src)
        fields["dst"] = ("v", out)
        i = self.emit([src, self.value[res] if res is not None else None], out, [temp] if temp is not None else [],
                      **fields)
        if src == INPUT and not direct and (res is None or self.value[res] != INPUT):
            self.nchw_ok.add(i)

    def expand_depthwise(self, dw: fx.Node, src: int, name: str, pre: np.ndarray | None, C: int, H: int, W: int,
                         hidden: int) -> None:
        """Pruned 1x1 expand (+ BN + ReLU6, folded: ``pre``) feeding the depthwise ``dw``: op kind 5, the
        expand computed in bands of output rows that the depthwise consumes from cache."""
        m = self.modules[dw.target]
        last, bnm, _, _ = self.chain(dw, bn=True, res_ok=False)
        wf, bias = self.folded_weights(m, bnm)
        for n in self._between(dw, last):
            self.done.add(n)
        stride = _pair(m.stride)[0]
        band = band_rows(hidden, H, W, stride, self.band_bytes)
        xf, ef = band_buffer_floats(C, hidden, H, W, stride, band)
        xb, eb = self.new_fixed(xf), self.new_fixed(ef)
        out = self.new(int(np.prod(_shape(last)[1:])))
        self.value[last] = out
        from ubpdsl.deploy.native import dw_scratch_floats

        self.scratch = max(self.scratch, dw_scratch_floats(H, W, stride))
        f32 = lambda a: np.ascontiguousarray(np.zeros(hidden, np.float32) if a is None else a, "<f4")  # noqa: E731
        # fields reused by kind 5: HW = output rows per band, res / clamp = the two band buffers
        self.emit([src], out, [xb, eb], kind=OP_EXPAND_DW, src=("v", src), dst=("v", out), C=hidden, M=C, HW=band,
                  kernel=name, H=H, W=W, stride=stride, weights=np.ascontiguousarray(wf, "<f4"), bias=f32(bias),
                  pre_bias=f32(pre), res=("v", xb), clamp=("v", eb))

    @staticmethod
    def folded_weights(m: nn.Module, bnm: nn.BatchNorm2d | None) -> tuple[np.ndarray, np.ndarray | None]:
        """``m``'s weights as [M, K] and bias with ``bnm`` (if any) folded in."""
        w = m.weight.detach()
        if bnm is None:
            bias = None if m.bias is None else m.bias.detach().float().numpy()
            return w.reshape(w.shape[0], -1).float().numpy(), bias
        return fold_bn(w, bnm, m.bias)

    def depthwise(self, node: fx.Node, last: fx.Node, src: int, wf: np.ndarray, bias: np.ndarray | None, C: int,
                  H: int, W: int, stride: int) -> None:
        out_shape = _shape(last)[1:]
        out = self.new(int(np.prod(out_shape)))
        self.value[last] = out
        pre = self.pre_bias.pop(src, None)
        fields = dict(kind=OP_DW, C=C, H=H, W=W, stride=stride, weights=np.ascontiguousarray(wf, "<f4"),
                      bias=np.ascontiguousarray(np.zeros(C, np.float32) if bias is None else bias, "<f4"),
                      src=("v", src), dst=("v", out), nchw=0)
        if pre is not None:
            fields["pre_bias"] = np.ascontiguousarray(pre, "<f4")
        from ubpdsl.deploy.native import dw_scratch_floats

        self.scratch = max(self.scratch, dw_scratch_floats(H, W, stride))  # the C code owns the staging
        i = self.emit([src], out, **fields)
        if src == INPUT:
            self.nchw_ok.add(i)

    def _between(self, first: fx.Node, last: fx.Node) -> list[fx.Node]:
        out, cur = [first], first
        while cur is not last:
            cur = next(iter(cur.users))
            out.append(cur)
        return out

    def standalone(self, node: fx.Node, src: int, *, res: int | None = None, scale: np.ndarray | None = None,
                   shift: np.ndarray | None = None) -> None:
        """add / BatchNorm / activation not fused into a conv: one affine op (+ a following activation)."""
        clamp = self.clamp_of(node) or 0
        last = node
        u = self.sole_user(node)
        if not clamp and u is not None and self.clamp_of(u) is not None:
            clamp, last = self.clamp_of(u), u
            self.done.add(u)
        shape = _shape(node)[1:]
        C = shape[0]
        hw = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        out = self.new(int(np.prod(shape)))
        self.value[last] = out
        fields: dict[str, Any] = dict(kind=OP_ADD if res is not None else OP_AFFINE, C=C, H=hw, W=1, clamp=clamp,
                                      src=("v", src), dst=("v", out), res=NO_RES if res is None else ("v", res))
        if scale is not None:
            fields["weights"] = np.ascontiguousarray(scale, "<f4")
            fields["bias"] = np.ascontiguousarray(shift, "<f4")
        self.emit([src, res], out, **fields)

    def flatten(self, node: fx.Node) -> None:
        x = node.args[0]
        src = self.src(node, x)
        ishape, oshape = _shape(x), _shape(node)
        if len(oshape) != 2 or oshape[0] != ishape[0]:
            raise PlanError(f"node {node.name}: only flattening to [B, features] is supported, got {list(oshape)}")
        if len(ishape) == 2:
            self.value[node] = src
            return
        C, hw = ishape[1], int(np.prod(ishape[2:]))
        if hw == 1:
            self.value[node] = src  # [C, B, 1, 1] is [C, B] already
            return
        out = self.new(oshape[1])
        self.value[node] = out
        self.emit([src], out, kind=OP_FLATTEN, C=C, H=hw, W=1, src=("v", src), dst=("v", out))

    def pool(self, node: fx.Node) -> None:
        k = self.key(node)
        is_max = k in (nn.MaxPool2d, F.max_pool2d)
        if node.op == "call_module":
            m = self.modules[node.target]
            ks, st, pad = m.kernel_size, m.stride, m.padding
            ceil = m.ceil_mode
            dil = getattr(m, "dilation", 1)
            cip = getattr(m, "count_include_pad", True)
            div = getattr(m, "divisor_override", None)
            ret = getattr(m, "return_indices", False)
        else:
            ks = _arg(node, 1, "kernel_size", None)
            st = _arg(node, 2, "stride", None)
            pad = _arg(node, 3, "padding", 0)
            if is_max:
                dil, ceil, ret = _arg(node, 4, "dilation", 1), _arg(node, 5, "ceil_mode", False), \
                    _arg(node, 6, "return_indices", False)
                cip, div = True, None
            else:
                ceil, cip, div = _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True), \
                    _arg(node, 6, "divisor_override", None)
                dil, ret = 1, False
        st = ks if st is None or st == [] else st
        if ceil or _pair(dil) != (1, 1) or div is not None or ret:
            raise PlanError(f"node {node.name}: pools with ceil_mode, dilation, divisor_override or indices "
                            "are not supported")
        x = node.args[0]
        src = self.src(node, x)
        C, H, W = _shape(x)[1:]
        out = self.new(int(np.prod(_shape(node)[1:])))
        self.value[node] = out
        geom = np.asarray([*_pair(ks), *_pair(st), *_pair(pad), int(bool(cip)), 0], "<i8")
        i = self.emit([src], out, kind=OP_MAXPOOL if is_max else OP_AVGPOOL, C=C, H=H, W=W, geom=geom,
                      src=("v", src), dst=("v", out))
        if src == INPUT:
            self.nchw_ok.add(i)

    def gap(self, node: fx.Node) -> None:
        size = self.modules[node.target].output_size if node.op == "call_module" else _arg(node, 1, "output_size", None)
        if _pair(size) != (1, 1):
            raise PlanError(f"node {node.name}: adaptive average pooling only to 1x1 is supported, got {size}")
        x = node.args[0]
        src = self.src(node, x)
        C, H, W = _shape(x)[1:]
        out = self.new(C)
        self.value[node] = out
        self.emit([src], out, kind=OP_GAP, C=C, H=H, W=W, src=("v", src), dst=("v", out))


def _place(intervals: dict[int, tuple[int, int, int]]) -> tuple[dict[int, int], int]:
    """Offsets for buffers {id: (bytes, first op, last op)}: largest first, lowest offset free of
    every placed buffer whose lifetime overlaps; returns (offsets, total bytes)."""
    placed: list[tuple[int, int, int, int]] = []  # offset, end, first, last
    offsets: dict[int, int] = {}
    total = 0
    for vid, (size, a, b) in sorted(intervals.items(), key=lambda kv: (-kv[1][0], kv[0])):
        size += (-size) % ALIGN
        busy = sorted((o, e) for o, e, pa, pb in placed if not (pb < a or b < pa))
        off = 0
        for o, e in busy:
            if off + size <= o:
                break
            off = max(off, e)
        placed.append((off, off + size, a, b))
        offsets[vid] = off
        total = max(total, off + size)
    return offsets, total


def build_graph_plan(spec: GraphSpec, packed: Mapping[str, np.ndarray | None], batch: int) -> PlanBlob:
    """The plan blob of ``spec`` at ``batch`` (``packed``: each pruned layer's packed weights, None
    for a mask-specialised kernel)."""
    if batch < 1:
        raise PlanError(f"batch must be >= 1, got {batch}")
    ops = [_Op(dict(o.fields), list(o.reads), o.writes, list(o.temps)) for o in spec.ops]
    sizes = dict(spec.sizes)
    C, H, W = spec.in_shape
    # at batch > 1 the input is [B, C, H, W]: ops that can read it so get the NCHW flag, the others
    # read a channel-major copy made first (at batch 1 both layouts are the same)
    if batch > 1:
        readers = [i for i, o in enumerate(ops) if INPUT in o.reads]
        nchw = {i for i in readers if i in spec.nchw_ok}
        for i in nchw:
            if ops[i].fields["kind"] == OP_DW:
                ops[i].fields["nchw"] = 1
            else:
                g = ops[i].fields["geom"].copy()
                g[7] = 1
                ops[i].fields["geom"] = g
        if set(readers) - nchw:
            cm = len(sizes)
            sizes[cm] = C * H * W
            for i in set(readers) - nchw:
                o = ops[i]
                o.reads = [cm if r == INPUT else r for r in o.reads]
                o.fields = {k: ("v", cm) if isinstance(v, tuple) and v == ("v", INPUT) else v
                            for k, v in o.fields.items()}
            ops.insert(0, _Op(dict(kind=OP_INPUT, dst=("v", cm), C=C, HW=H * W), [], cm))
    # the output: [C, B, HW] -> [B, C * HW]; at batch 1 the last op writes it directly
    out_v = spec.out_value
    last = ops[-1] if ops else None
    if batch == 1 and last is not None and last.writes == out_v and out_v not in last.reads and \
            all(out_v not in o.reads for o in ops):
        last.fields["dst"] = OUTPUT
        last.writes = None
        sizes.pop(out_v)
    else:
        ops.append(_Op(dict(kind=OP_OUTPUT, C=spec.out_c, H=spec.out_hw, W=1, src=("v", out_v), dst=OUTPUT),
                       [out_v], None))
    # lifetimes -> offsets
    life: dict[int, list[int]] = {}
    for i, o in enumerate(ops):
        for v in [*o.reads, o.writes, *o.temps]:
            if v is not None and v >= 0:
                life.setdefault(v, [i, i])[1] = i
    offsets, arena = _place({v: (4 * (1 if v in spec.fixed else batch) * sizes[v], a, b)
                             for v, (a, b) in life.items()})
    ws = arena
    scratch = ws
    ws += 4 * spec.scratch_floats + (-4 * spec.scratch_floats) % ALIGN

    pay = _Payload(head_bytes(len(ops)))
    slots: list[str] = []
    records: list[list[int]] = []
    for o in ops:
        rec = empty_record()
        kind = o.fields["kind"]
        for k, v in o.fields.items():
            if isinstance(v, tuple):  # a virtual buffer
                v = offsets[v[1]] if v[1] >= 0 else v[1]
            elif isinstance(v, np.ndarray):
                v = pay.add(v)
            elif k == "kernel":
                slots.append(v)
                p = packed.get(v)
                rec[field_index(kind, "packed")] = -1 if p is None else pay.add(np.ascontiguousarray(p, np.uint8))
                v = len(slots) - 1
            rec[field_index(kind, k)] = int(v)
        if kind == OP_DW:
            rec[6] = 0
        records.append(rec)
    return encode_plan(records, pay, slots, batch, (C, H, W), spec.out_c * spec.out_hw, ws, scratch)
