"""Kernel bundles: every pruned layer of a model compiled for one or more targets, in one directory.

``ubpdsl export`` turns a masks.npz (with the pruned weights) plus per-layer kernel configurations
(tuned by ``ubpdsl tune``, else the default ``wros``) into a *bundle*::

    bundle/
      manifest.json                 format "ubpdsl.bundle/1": toolchain versions, targets, variants,
                                    per layer its mask hash and, per target, config, files, sha256s
      masks.npz                     the blocks and pruned weights the kernels were built from
      <target>/<layer>.<target>.so  self-contained kernel (DT_SONAME = this file name)
      <target>/<layer>.h            C prototype, shape macros, packed-weight layout
      <target>/<layer>.packed.bin   packed weights (data-driven kernels; absent when baked)
      <target>/kernels.tsv          the same per-layer facts as plain text, for C programs

A pattern-kind layer (PatDNN masks) runs on the direct 3x3 pattern kernel (``pattern_direct``,
symbol ``ubp_pattern_<layer>``, a "UBPP" blob, x = the image [Cin, H*W], n = H*W) where that
applies: no pixel mask, a 3x3 convolution with stride 1, padding 1, dilation 1 (checked on the
model when one is given) and a known image size (``images``, else the model run on its example).
Otherwise it runs as N = 1 blocks of its GEMM view on the block kernel. The manifest records
which per target: ``"op": "pattern"`` with ``"image": [H, W]``, or ``"op": "gemm"``
(:func:`pattern_layer_images` decides).

(``<layer>`` is the layer name with every character outside ``[A-Za-z0-9_]`` replaced by ``_``;
the kernel symbol is ``ubp_<layer>``.) One directory per target keeps headers and packed weights of
different targets apart, since a tuned configuration may differ per target.

``ubpdsl compile`` writes the same format (one configuration from its options for every layer).
Writing into an existing bundle *extends* it: the kernels asked for are (re)built, every other
kernel is kept, and the one manifest lists every layer and target; every layer must keep a kernel
for every target (else an error says which). A bundle built from other masks is replaced.

:func:`load_bundle` reads a bundle back and checks it completely before anything runs: the
manifest's format and fields, every file's presence and sha256, that each ``.so`` is an ELF for its
target's architecture and exports its symbol, that each packed blob's header matches its layer, and
that masks.npz agrees with the manifest. A host kernel built for CPU features this machine lacks is
refused too. Every problem is a :class:`BundleError` with a one-line message.

:func:`configs_for` is the single place where kernel configurations are chosen: tuned ones from a
``ubpdsl tune`` output (its ``manifest.json``, format ``ubpdsl.tuned/1``) where available, the default
configuration for every other layer.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import stat
import struct
import tempfile
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import click
import numpy as np

import ubpdsl
from ubpdsl.cli_common import load_model, model_options
from ubpdsl.config import DEFAULT_VARIANT, KernelConfig
from ubpdsl.errors import MaskError, PackError, UbpError
from ubpdsl.guard import ensure_dir, read_json
from ubpdsl.identity import blocks_hash, file_sha256
from ubpdsl.names import check_layer_name, check_unique_stems, file_stem, kernel_symbol
from ubpdsl.packing import unpack, unpack_pattern
from ubpdsl.runtime.targets import TARGET_NAMES

__all__ = [
    "BUNDLE_FORMAT",
    "DEFAULT_VARIANT",
    "Bundle",
    "BundleError",
    "KernelConfig",
    "configs_for",
    "export",
    "export_bundle",
    "load_bundle",
    "load_tuned_configs",
    "pattern_layer_images",
]

BUNDLE_FORMAT = "ubpdsl.bundle/1"
TUNED_FORMAT = "ubpdsl.tuned/1"
#: What ``ubpdsl compile`` wrote before it wrote bundles.
OLD_BUILD_FORMAT = "ubpdsl.build/1"
MANIFEST = "manifest.json"
MASKS = "masks.npz"
INDEX = "kernels.tsv"
#: The tab-separated columns of kernels.tsv (the C reader, examples/embed_c/bundle_main.c, reads them in this order).
#: K is the rows of x the kernel reads: Cin for a pattern kernel (x = the image, n = H*W).
INDEX_COLUMNS = ("layer", "symbol", "M", "K", "N", "so", "packed", "so_sha256", "packed_sha256")
#: What runs a layer (the manifest's per-target ``"op"``): its GEMM view on a block kernel, or the
#: direct 3x3 pattern kernel.
OPS = ("gemm", "pattern")
_ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


class BundleError(UbpError):
    """A bundle is missing, inconsistent with its manifest, or does not fit the model or machine."""




# ------------------------------------------------------------------------------------ configurations


def load_tuned_configs(path: str | os.PathLike[str]) -> tuple[str, dict[str, KernelConfig]]:
    """``(target, {layer: config})`` from a ``ubpdsl tune`` output directory or its manifest.json."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise UbpError(f"tuned configurations {path}: no such file (give a `ubpdsl tune -o DIR` directory)")
    data = read_json(p, f"tuned configurations {p}")
    if not isinstance(data, dict) or data.get("format") != TUNED_FORMAT:
        fmt = data.get("format") if isinstance(data, dict) else None
        raise UbpError(f"tuned configurations {p}: format {fmt!r} is not {TUNED_FORMAT!r} "
                       "(expected the manifest.json written by `ubpdsl tune`)")
    target = data.get("target")
    layers = data.get("layers")
    if target not in TARGET_NAMES or not isinstance(layers, dict):
        raise UbpError(f"tuned configurations {p}: needs a known 'target' and a 'layers' object")
    out: dict[str, KernelConfig] = {}
    for name, entry in layers.items():
        if not isinstance(entry, dict) or "tuned_config" not in entry:
            raise UbpError(f"tuned configurations {p}: layer {name!r} has no tuned_config")
        cfg = KernelConfig.from_json(entry["tuned_config"], source=str(p))
        _check_kernel_unchanged(p, name, cfg, entry.get("kernel_identity"))
        shape = (entry.get("M"), entry.get("K"), entry.get("N"))
        if all(isinstance(v, int) for v in shape):
            cfg = replace(cfg, tuned_for=shape)
        out[name] = cfg
    return str(target), out


def _check_kernel_unchanged(path: Path, layer: str, cfg: KernelConfig, recorded: Any) -> None:
    """A tuned config of a user kernel file is only valid for the kernel it was tuned with.

    ``ubpdsl tune`` records :func:`ubpdsl.kernels.kernel_identity` of a user kernel; a kernel whose
    source, globals, flags or knobs changed since (or an entry without the record) is refused.
    """
    from ubpdsl.kernels import VARIANTS, kernel_identity

    if cfg.variant in VARIANTS:
        return
    if not isinstance(recorded, str):
        raise UbpError(f"tuned configurations {path}: layer {layer!r} was tuned with the kernel {cfg.variant} "
                       "but records no kernel_identity: re-run `ubpdsl tune` with this kernel")
    try:
        now = kernel_identity(cfg.kernel)
    except UbpError as exc:
        raise UbpError(f"tuned configurations {path}: layer {layer!r}: {exc}") from None
    if now != recorded:
        raise UbpError(f"tuned configurations {path}: layer {layer!r} was tuned with the kernel {cfg.variant}, which "
                       "has changed since: re-run `ubpdsl tune` with the current kernel")


def configs_for(layers: Mapping[str, Any], target: str, tuned: Mapping[str, KernelConfig] | None = None,
                default: KernelConfig | None = None) -> dict[str, KernelConfig]:
    """The kernel config of every layer for ``target``: tuned where given, else ``default``.

    ``layers`` maps names to :class:`~ubpdsl.masks.LayerMask`; a tuned entry recorded for another
    GEMM shape than the layer's (a stale tune output) is an error rather than a silent mismatch.
    """
    tuned = tuned or {}
    out: dict[str, KernelConfig] = {}
    for name, mask in layers.items():
        cfg = tuned.get(name)
        if cfg is None:
            out[name] = default or KernelConfig()
            continue
        if cfg.tuned_for is not None and cfg.tuned_for != (mask.R, mask.C, mask.block):
            M, K, N = cfg.tuned_for
            raise UbpError(f"layer {name}: tuned for M,K,N = {M},{K},{N} but the mask is "
                           f"{mask.R},{mask.C},{mask.block}: re-run `ubpdsl tune` on this masks.npz")
        out[name] = cfg
    return out


# ------------------------------------------------------------------------------------------- export


def _pattern_geometry(module: Any) -> bool:
    """The convolution the pattern kernel computes: 3x3, stride 1, padding 1, dilation 1, ungrouped."""
    from torch import nn

    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (3, 3) and tuple(module.stride) == (1, 1)
            and module.padding in ((1, 1), "same") and tuple(module.dilation) == (1, 1) and module.groups == 1
            and module.padding_mode == "zeros")


def pattern_layer_images(masks: Mapping[str, Any], *, model: Any = None, example: Any = None,
                         images: Mapping[str, tuple[int, int]] | tuple[int, int] | None = None
                         ) -> dict[str, tuple[int, int]]:
    """``{layer: (H, W)}`` of the pattern-kind layers of ``masks`` that run on the pattern kernel.

    A pattern layer qualifies without a pixel mask, when its convolution is 3x3 with stride 1,
    padding 1, dilation 1 and no groups (checked on ``model`` when given) and its input image size
    is known: ``images`` (one ``(H, W)`` for every pattern layer, or per layer), else the model run
    once on ``example``. Every other layer runs as N = 1 blocks on the block kernel.
    """
    from ubpdsl.compiler import MAX_DIM

    cand = [n for n, m in masks.items() if m.kind == "pattern" and m.pixel_keep is None]
    if model is not None:
        cand = [n for n in cand if _pattern_geometry(model.get_submodule(n))]
    out: dict[str, tuple[int, int]] = {}
    if isinstance(images, tuple):
        images = dict.fromkeys(cand, images)
    for n in cand:
        if images is not None and n in images:
            out[n] = (int(images[n][0]), int(images[n][1]))
    rest = [n for n in cand if n not in out]
    if rest and model is not None and example is not None:
        from ubpdsl.models import _run_hooked

        def record(name: str, inp: Any) -> None:
            out.setdefault(name, tuple(int(v) for v in inp[0].shape[-2:]))

        _run_hooked(model, example, [(model.get_submodule(n), lambda mod, i, o, n=n: record(n, i)) for n in rest])
    for n, (h, w) in out.items():
        if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM and h * w <= MAX_DIM):
            raise UbpError(f"layer {n}: image {h}x{w} for the pattern kernel is out of range")
    return out


def _module_info(model: Any, name: str, mask: Any) -> dict[str, Any]:
    """Geometry of the model's layer ``name`` (recorded in the manifest); its kept weights must be the mask's."""
    from torch import nn

    module = model.get_submodule(name)  # existence and shape: checked by models.check_masks_fit_model
    weight = module.weight
    if mask.weight is not None:
        # The kept weights must be the model's (one-shot pruning keeps them; a fine-tuned model is
        # checked through its --weights): the mask was made from this model.
        w = weight.detach().float().reshape(mask.R, mask.C).cpu().numpy() * mask.dense_mask()
        if not np.array_equal(w, mask.weight):
            diff = float(np.abs(w - mask.weight).max())
            raise BundleError(f"layer {name}: the model's weights differ from masks.npz (max |diff| {diff:.3g}): "
                              "save the masks from this model (sparsifier.save_masks) after training")
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "kernel_size": list(module.kernel_size), "stride": list(module.stride),
                "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                "dilation": list(module.dilation), "groups": module.groups, "bias": module.bias is not None}
    if isinstance(module, nn.Linear):
        return {"type": "Linear", "bias": module.bias is not None}
    return {"type": type(module).__name__, "bias": getattr(module, "bias", None) is not None}


def _write_index(target_dir: Path, target: str, layers: Mapping[str, Any]) -> None:
    """kernels.tsv of ``target`` from the manifest's layer entries."""
    lines = [f"# ubpdsl bundle kernel index: {' '.join(INDEX_COLUMNS)} ('-': weights baked into the .so)"]
    for name, entry in layers.items():
        te = entry["targets"][target]
        files, shas = te["files"], te["sha256"]
        row = [name, te["symbol"], entry["M"], _kernel_k(entry, te), entry["N"], Path(files["so"]).name,
               Path(files["packed"]).name if "packed" in files else None, shas["so"], shas.get("packed")]
        lines.append("\t".join("-" if v is None else str(v) for v in row))
    (target_dir / INDEX).write_text("\n".join(lines) + "\n")


def _x_rows(K: int, op: str) -> int:
    """Rows of x a layer's kernel reads: K of the GEMM view, Cin (= K / 9) for a pattern kernel."""
    return K // 9 if op == "pattern" else K


def _kernel_k(entry: Mapping[str, Any], te: Mapping[str, Any]) -> int:
    """:func:`_x_rows` of a manifest entry and its target entry."""
    return _x_rows(entry["K"], te.get("op", "gemm"))


def _existing_bundle(out: Path, force: bool) -> Bundle | None:
    """The bundle already in ``out`` (to extend), None for a fresh one; refuses anything else there."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BundleError(f"{out} exists and is not a directory")
    if force or not any(out.iterdir()):
        return None
    fmt = None
    if (out / MANIFEST).is_file():
        try:
            data = json.loads((out / MANIFEST).read_text())
            fmt = data.get("format") if isinstance(data, dict) else None
        except (OSError, UnicodeDecodeError, ValueError):
            fmt = None
    if fmt == OLD_BUILD_FORMAT:
        raise BundleError(f"{out} holds an older `ubpdsl compile` output ({OLD_BUILD_FORMAT}); compile and export "
                          "write bundles now: remove it (or pass --force) and re-run")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"{out} is a non-empty directory that is not a bundle; choose another -o (or --force)")
    try:
        return load_bundle(out)
    except BundleError as exc:
        raise BundleError(f"cannot add to {exc} (pass --force to replace it)") from None


def export_bundle(masks: str | os.PathLike[str] | Mapping[str, Any], out_dir: str | os.PathLike[str], *,
                  targets: Iterable[str] = ("host",),
                  tuned: Mapping[str, Mapping[str, KernelConfig]] | None = None,
                  model: Any = None, layers: Iterable[str] | None = None, force: bool = False,
                  echo: Callable[[str], None] | None = None, config: KernelConfig | None = None,
                  kernels: Mapping[str, Any] | None = None, example: Any = None,
                  images: Mapping[str, tuple[int, int]] | tuple[int, int] | None = None) -> Path:
    """Compile every layer of ``masks`` for every target into the bundle ``out_dir``; returns its path.

    ``masks``: a masks.npz path or ``{name: LayerMask}`` (weights required). ``tuned``:
    ``{target: {layer: KernelConfig}}`` (see :func:`load_tuned_configs`); layers without one get
    ``config`` (default: the default :class:`KernelConfig`). ``kernels``: ``{variant: KernelFunction}``
    for variants that are not shipped (a user's kernel file). ``model``: optional, the pruned torch
    model: its layers must exist with the masks' shapes and weights, and their geometry goes into the
    manifest; ``example`` (its input batch) also checks each pixel mask against its layer's output size
    and gives the image size of pattern layers. ``images``: the image size of pattern layers (one
    ``(H, W)`` or per layer); pattern layers run on the pattern kernel where it applies
    (:func:`pattern_layer_images`), else as N = 1 blocks.
    The bundle is assembled in a temporary directory and renamed into place. An existing
    bundle in ``out_dir`` is extended (see the module docstring); with ``force`` it, or any other
    non-empty directory, is replaced.
    """
    from ubpdsl.abi import pattern_symbol
    from ubpdsl.compiler import PatternProblem, Problem, compile_kernel
    from ubpdsl.kernels import PATTERN_VARIANTS
    from ubpdsl.masks import load_masks, save_masks
    from ubpdsl.runtime.targets import get_target
    from ubpdsl.runtime.toolchain import toolchain_versions

    say = echo or (lambda _msg: None)
    if isinstance(masks, (str, os.PathLike)):
        if not Path(masks).is_file():
            raise MaskError(f"masks file {masks} does not exist")
        masks = load_masks(masks)
    layer_masks = dict(masks)
    if layers is not None:
        wanted = list(layers)
        missing = [n for n in wanted if n not in layer_masks]
        if missing:
            raise MaskError(f"masks.npz has no layer {missing[0]!r}; layers: {', '.join(layer_masks)}")
        layer_masks = {n: layer_masks[n] for n in wanted}
    if not layer_masks:
        raise MaskError("no layers to export")
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise UbpError("give at least one target")
    tgts = {t: get_target(t) for t in targets}  # TargetError for unknown names
    tuned = dict(tuned or {})
    for t in tuned:
        if t not in tgts:
            raise UbpError(f"tuned configurations for target {t!r}, which is not exported (targets: "
                           f"{', '.join(targets)})")
    # Everything checkable is checked before the first compile.
    check_unique_stems(layer_masks)
    modules: dict[str, Any] = {}
    for name, mask in layer_masks.items():
        if mask.weight is None:
            raise MaskError(f"layer {name}: masks.npz has no weights; the kernels need them "
                            "(save the masks with weights, e.g. sparsifier.save_masks or `ubpdsl prune`)")
        mask.validate()
    if model is not None:
        from ubpdsl.models import check_masks_fit_model

        check_masks_fit_model(model, layer_masks, "masks.npz", example)
        for name, mask in layer_masks.items():
            modules[name] = _module_info(model, name, mask)
    direct = pattern_layer_images(layer_masks, model=model, example=example, images=images)
    configs = {t: configs_for(layer_masks, t, tuned.get(t), config) for t in targets}
    for per_layer in configs.values():  # a pattern kernel unless the config names one
        for name in direct:
            if per_layer[name].variant not in PATTERN_VARIANTS:
                per_layer[name] = KernelConfig("pattern_direct")
    user_kernels = dict(kernels or {})
    for t, per_layer in configs.items():
        for name, cfg in per_layer.items():
            if cfg.variant not in user_kernels:
                try:
                    cfg.kernel  # noqa: B018 - UbpError for an unknown variant, before the first compile
                except UbpError as exc:
                    raise UbpError(f"layer {name} ({t}): {exc}") from None

    out = Path(out_dir)
    old = _existing_bundle(out, force)
    old_masks: dict[str, Any] = {}
    if old is not None:
        old_masks = old.masks()
        changed = [n for n in layer_masks if n in old_masks
                   and old_masks[n].content_hash() != layer_masks[n].content_hash()]
        if changed:
            say(f"note: replacing {out}: it was built from other masks (layer {changed[0]} differs)")
            old, old_masks = None, {}
    all_masks = {**old_masks, **layer_masks}
    all_targets = list(dict.fromkeys([*(old.targets if old else []), *targets]))
    if old is not None:
        for name in all_masks:
            for t in all_targets:
                if not ((name in layer_masks and t in targets) or (name in old_masks and t in old.targets)):
                    raise BundleError(
                        f"bundle {out} has kernels of {', '.join(old.layers)} for {', '.join(old.targets)}: adding "
                        f"these would leave layer {name!r} without a {t} kernel; build every layer for "
                        f"{', '.join(all_targets)}, or write a new bundle (another -o, or --force)")
    ensure_dir(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_masks(tmp / MASKS, all_masks)
        manifest: dict[str, Any] = {
            "format": BUNDLE_FORMAT,
            "ubpdsl": ubpdsl.__version__,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "exported_on": {"machine": platform.machine(), "python": platform.python_version()},
            "toolchain": toolchain_versions(),
            "targets": {**(old.manifest["targets"] if old else {}),
                        **{t: {"triple": g.triple, "cpu": g.cpu, "features": g.features,
                               "vector_bits": g.vector_bits, "scalable": g.scalable} for t, g in tgts.items()}},
            "masks": {"file": MASKS, "sha256": file_sha256(tmp / MASKS)},
            "layers": {},
        }
        kept = 0
        for name, mask in all_masks.items():
            prev = old.manifest["layers"][name] if old is not None and name in old_masks else None
            manifest["layers"][name] = {
                "shape": list(mask.shape), "M": mask.R, "K": mask.C, "N": mask.block, "blocks": mask.num_blocks,
                "sparsity": round(mask.sparsity, 6), "mask_sha256": mask.content_hash(),
                "blocks_sha256": blocks_hash(mask.R, mask.C, mask.block, mask.rows, mask.cols),
                "module": modules.get(name, prev["module"] if prev else None), "targets": {},
                "kind": mask.kind,
                "pixels": None if mask.pixel_keep is None else {"shape": list(mask.pixel_keep.shape),
                                                                "kept": mask.kept_pixels},
            }
            if mask.pattern is not None:
                manifest["layers"][name]["pattern"] = {"patterns": len(mask.pattern.library),
                                                       "kernels_kept": int((mask.pattern.ids >= 0).sum())}
            for t in (old.targets if prev else []):  # kept: this layer's kernels of targets not rebuilt now
                if not (name in layer_masks and t in targets):
                    manifest["layers"][name]["targets"][t] = prev["targets"][t]
                    for rel in prev["targets"][t]["files"].values():
                        ensure_dir((tmp / rel).parent)
                        shutil.copyfile(old.root / rel, tmp / rel)
                    kept += 1
        for t in targets:
            tdir = tmp / t
            for name, mask in layer_masks.items():
                cfg = configs[t][name]
                kernel = user_kernels.get(cfg.variant) or cfg.kernel
                if name in direct:
                    problem: Any = PatternProblem.from_mask(mask.pattern, mask.weight, *direct[name])
                    symbol = pattern_symbol(file_stem(name))
                else:
                    problem, symbol = Problem.from_mask(mask), kernel_symbol(name)
                ck = compile_kernel(kernel, problem, cfg.target_for(get_target(t)),
                                    constants=dict(cfg.constants), specialize=cfg.specialize,
                                    symbol=symbol, check_bounds=cfg.check_bounds)
                files = ck.save(tdir)
                rel = {k: f"{t}/{p.name}" for k, p in files.items()}
                manifest["layers"][name]["targets"][t] = {
                    "symbol": ck.symbol, "config": cfg.to_json(), "config_source": cfg.source,
                    "op": "pattern" if name in direct else "gemm",
                    **({"image": list(direct[name])} if name in direct else {}),
                    "constants": ck.constants, "specialized": ck.specialized,
                    "files": rel, "sha256": {k: file_sha256(p) for k, p in files.items()},
                    "kernel": {k: ck.manifest[k] for k in ("triple", "cpu", "features", "cache_key", "mask_hash",
                                                           "variant", "soname")},
                }
                label = replace(cfg, constants=ck.constants).label()
                how = "default" if cfg.source == "default" else "tuned" if tuned.get(t, {}).get(name) else cfg.source
                say(f"{t:>12}  {name}: {label} ({how} config, {'cached' if ck.cache_hit else 'built'})")
        if kept:
            say(f"kept {kept} kernel(s) of {out} ({', '.join(old.targets)})")
        manifest["variants"] = sorted({te["config"]["variant"] for e in manifest["layers"].values()
                                       for te in e["targets"].values()})
        for t in all_targets:
            _write_index(tmp / t, t, manifest["layers"])
            manifest.setdefault("indexes", {})[t] = {"file": f"{t}/{INDEX}", "sha256": file_sha256(tmp / t / INDEX)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        load_bundle(tmp, check_host=False)  # never hand out a bundle that would not load
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ loading


@dataclass(frozen=True)
class KernelFiles:
    """One layer's kernel for one target, as found (and verified) in a bundle."""

    layer: str
    target: str
    symbol: str
    M: int
    K: int
    N: int
    so: Path
    header: Path
    packed: Path | None
    features: str
    triple: str
    op: str = "gemm"  # "pattern": the direct 3x3 pattern kernel (x = the image [Cin, H*W]), see OPS
    image: tuple[int, int] | None = None  # (H, W) a pattern kernel was compiled for

    @property
    def x_rows(self) -> int:
        """Rows of x the kernel reads (:func:`_x_rows`)."""
        return _x_rows(self.K, self.op)

    def packed_weights(self) -> np.ndarray | None:
        """The packed weight blob (uint8, 64-byte aligned copy) or None for baked kernels."""
        if self.packed is None:
            return None
        raw = np.fromfile(self.packed, dtype=np.uint8)
        buf = np.empty(raw.size + 64, np.uint8)  # keep the blob 64-byte aligned like the packer does
        start = (-buf.ctypes.data) % 64
        blob = buf[start:start + raw.size]
        blob[:] = raw
        return blob


class Bundle:
    """A verified bundle directory (see :func:`load_bundle`)."""

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        self.root = root
        self.manifest = manifest
        self._masks: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Bundle({str(self.root)!r}, layers={len(self.layers)}, targets={self.targets})"

    @property
    def layers(self) -> list[str]:
        return list(self.manifest["layers"])

    @property
    def targets(self) -> list[str]:
        return list(self.manifest["targets"])

    def masks(self) -> dict[str, Any]:
        """The bundle's masks.npz (blocks and pruned weights)."""
        if self._masks is None:
            from ubpdsl.masks import load_masks

            self._masks = load_masks(self.root / MASKS)
        return self._masks

    def kernel(self, layer: str, target: str = "host") -> KernelFiles:
        """The kernel of ``layer`` for ``target``; BundleError naming what exists otherwise."""
        entry = self.manifest["layers"].get(layer)
        if entry is None:
            known = ", ".join(self.layers[:8]) + (", ..." if len(self.layers) > 8 else "")
            raise BundleError(f"bundle {self.root} has no layer {layer!r} (layers: {known})")
        t = entry["targets"].get(target)
        if t is None:
            raise BundleError(f"bundle {self.root}: layer {layer!r} was not exported for {target} "
                              f"(targets: {', '.join(entry['targets'])})")
        files = t["files"]
        op = t.get("op", "gemm")
        return KernelFiles(layer, target, t["symbol"], entry["M"], entry["K"], entry["N"], self.root / files["so"],
                           self.root / files["header"], self.root / files["packed"] if "packed" in files else None,
                           t["kernel"]["features"], t["kernel"]["triple"], op,
                           tuple(t["image"]) if op == "pattern" else None)

    def pick_target(self, machine: str | None = None, cpu_flags: set[str] | None = None) -> str:
        """The bundle target this machine runs natively: ``host`` on x86-64; on AArch64 ``aarch64-sve``
        when the CPU has SVE and the bundle has SVE kernels, else ``aarch64-neon`` (an SVE kernel on a
        CPU without SVE dies with SIGILL). ``machine``/``cpu_flags`` default to this machine's."""
        from ubpdsl.runtime.targets import _cpuinfo_flags

        here = (machine or platform.machine()).lower()
        here = {"amd64": "x86_64", "arm64": "aarch64"}.get(here, here)
        if here != "aarch64":
            wanted = ["host"]
        else:
            flags = _cpuinfo_flags() if cpu_flags is None else cpu_flags
            wanted = (["aarch64-sve"] if "sve" in flags else []) + ["aarch64-neon", "host"]
        for t in wanted:
            if t in self.manifest["targets"]:
                return t
        raise BundleError(f"bundle {self.root} has no kernels for this {here} machine (targets: "
                          f"{', '.join(self.targets)})")

    def check_runs_here(self, target: str = "host") -> None:
        """BundleError unless this machine can run the bundle's ``target`` kernels natively."""
        if target not in self.manifest["targets"]:
            raise BundleError(f"bundle {self.root} has no {target} kernels (targets: {', '.join(self.targets)})")
        info = self.manifest["targets"][target]
        arch = info["triple"].split("-", 1)[0]
        here = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
        if arch != here:
            raise BundleError(f"bundle {self.root}: the {target} kernels are {arch} code; this machine is {here} "
                              + ("(run them under qemu, or re-export for host)" if arch == "aarch64" else ""))
        if target == "aarch64-sve" and self.pick_target() != "aarch64-sve":
            raise BundleError(f"bundle {self.root}: this CPU has no SVE, so the aarch64-sve kernels would die "
                              "with SIGILL; use the aarch64-neon kernels (Bundle.pick_target() chooses)")
        if target == "host":
            from ubpdsl.runtime.targets import host_target

            have = {f[1:] for f in host_target().features.split(",") if f.startswith("+")}
            need = {f[1:] for f in info["features"].split(",") if f.startswith("+")}
            lacking = sorted(need - have)
            if lacking:
                raise BundleError(f"bundle {self.root}: its host kernels were built for CPU {info['cpu']} and need "
                                  f"{', '.join(lacking)}, which this CPU lacks: re-export the bundle on this machine")


def _fail(root: Path, msg: str) -> BundleError:
    return BundleError(f"bundle {root}: {msg}")


def _inside(root: Path, rel: Any) -> Path:
    """``root / rel`` if ``rel`` names a regular file inside the bundle, reached without any symlink."""
    if (not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel
            or any(part in ("", ".", "..") for part in rel.split("/"))
            or any(unicodedata.category(ch) == "Cc" for ch in rel)):
        raise _fail(root, f"manifest names the file {rel!r}, which is not a relative path inside the bundle")
    path = root / rel
    try:
        st = path.lstat()
        real, top = path.resolve(strict=True), root.resolve(strict=True)
    except (OSError, RuntimeError):
        raise _fail(root, f"{rel} is listed in the manifest but missing") from None
    if stat.S_ISLNK(st.st_mode) or real != top / rel or not real.is_relative_to(top):
        raise _fail(root, f"{rel} is a symbolic link or lies behind one: a bundle holds only regular files")
    if not stat.S_ISREG(st.st_mode):
        raise _fail(root, f"{rel} is not a regular file")
    return path


def _check_file(root: Path, rel: Any, sha: Any) -> Path:
    path = _inside(root, rel)
    if not isinstance(sha, str) or file_sha256(path) != sha:
        raise _fail(root, f"{rel} does not match the manifest (sha256 differs): the file changed after export")
    return path


def _check_so(root: Path, rel: str, target: str, triple: str, symbol: str) -> None:
    from ubpdsl.runtime.build import read_elf

    path = root / rel
    head = path.read_bytes()[:20]
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise _fail(root, f"{rel} is not an ELF shared object")
    e_machine = struct.unpack_from("<H", head, 18)[0]
    machine = _ELF_MACHINES.get(e_machine, f"e_machine={e_machine}")
    want = triple.split("-", 1)[0]
    if machine != want:
        raise _fail(root, f"{rel} is {machine} code, but the manifest lists it as the {target} ({want}) kernel: "
                          "a .so built for another target")
    try:
        info = read_elf(path)
    except UbpError as exc:
        raise _fail(root, f"{rel}: {exc}") from None
    if info.elf_type != "dyn" or symbol not in info.exported_functions:
        raise _fail(root, f"{rel} does not export the kernel {symbol}")


def _check_packed(root: Path, rel: str, M: int, K: int, N: int, op: str = "gemm") -> None:
    """The blob is a valid packed weight blob for M, K, N (header and content, ubpdsl.packing.unpack),
    or for a pattern kernel a valid pattern blob for M, K / 9 (ubpdsl.packing.unpack_pattern)."""
    try:
        blob = np.fromfile(root / rel, dtype=np.uint8)
        if op == "pattern":
            unpack_pattern(blob, M=M, K=_x_rows(K, op), what=rel)
        else:
            unpack(blob, M=M, K=K, N=N, what=rel)
    except PackError as exc:
        raise _fail(root, str(exc)) from None


def _check_layer_entry(root: Path, name: str, entry: Any, targets: dict[str, Any]) -> None:
    """Every manifest field a reader relies on, with its type: a malformed entry is one line, no KeyError."""
    try:
        check_layer_name(name)
    except MaskError as exc:
        raise _fail(root, f"{MANIFEST}: {exc}") from None
    if not isinstance(entry, dict) or not all(type(entry.get(k)) is int and entry[k] >= 1 for k in "MKN"):
        raise _fail(root, f"{MANIFEST}: layer {name!r} needs positive integers M, K and N")
    per_target = entry.get("targets")
    if not isinstance(per_target, dict) or set(per_target) != set(targets):
        have = set(per_target) if isinstance(per_target, dict) else set()
        missing = sorted(set(targets) - have) or sorted(have - set(targets))
        raise _fail(root, f"layer {name!r} has no kernel for {', '.join(missing) or '?'}")
    from ubpdsl.abi import pattern_symbol

    for t, te in per_target.items():
        files, shas, kern = (te.get(k) if isinstance(te, dict) else None for k in ("files", "sha256", "kernel"))
        op = te.get("op", "gemm") if isinstance(te, dict) else None
        if op not in OPS:
            raise _fail(root, f"layer {name!r} ({t}): op {op!r} is not one of {', '.join(OPS)}")
        if op == "pattern":
            image = te.get("image")
            if (not isinstance(image, list) or len(image) != 2 or not all(type(v) is int and v >= 1 for v in image)
                    or entry["K"] % 9 or entry["N"] != 1):
                raise _fail(root, f"layer {name!r} ({t}): a pattern kernel needs an image [H, W], K = 9 x Cin "
                                  "and N = 1")
        symbol = pattern_symbol(file_stem(name)) if op == "pattern" else kernel_symbol(name)
        if (not isinstance(files, dict) or not isinstance(shas, dict) or "so" not in files or "header" not in files
                or not set(files) <= {"so", "header", "packed"}):
            raise _fail(root, f"layer {name!r} ({t}): the manifest lists no .so or header")
        if te.get("symbol") != symbol:
            raise _fail(root, f"layer {name!r} ({t}): kernel symbol {te.get('symbol')!r}, expected {symbol!r}")
        if not isinstance(kern, dict) or not all(isinstance(kern.get(k), str) for k in ("features", "triple")):
            raise _fail(root, f"layer {name!r} ({t}): the manifest's 'kernel' entry needs features and triple")
        for rel in files.values():
            if not isinstance(rel, str) or not rel.startswith(f"{t}/") or "/" in rel[len(t) + 1:]:
                raise _fail(root, f"layer {name!r} ({t}): file {rel!r} is not a relative path inside the "
                                  f"bundle's {t}/ directory")


def _check_index(root: Path, target: str, path: Path, layers: dict[str, Any]) -> None:
    """kernels.tsv (read by C programs) must have one well-formed row per layer, agreeing with the manifest."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(root, f"{target}/{INDEX}: unreadable ({exc})") from None
    seen = set()
    for no, line in enumerate(text.split("\n"), 1):
        if not line or line.startswith("#"):
            continue
        cells = line.split("\t")
        entry = layers.get(cells[0])
        if len(cells) != len(INDEX_COLUMNS) or entry is None or cells[0] in seen:
            raise _fail(root, f"{target}/{INDEX}:{no}: malformed row (expected {len(INDEX_COLUMNS)} tab-separated "
                              f"fields naming a layer of the manifest once)")
        seen.add(cells[0])
        te = entry["targets"][target]
        files, shas = te["files"], te["sha256"]
        want = [cells[0], te.get("symbol"), str(entry["M"]), str(_kernel_k(entry, te)), str(entry["N"]),
                Path(files["so"]).name, Path(files["packed"]).name if "packed" in files else "-",
                shas.get("so"), shas.get("packed", "-")]
        if cells != want:
            raise _fail(root, f"{target}/{INDEX}:{no}: row of layer {cells[0]!r} disagrees with {MANIFEST}")
    if seen != set(layers):
        raise _fail(root, f"{target}/{INDEX} lacks layer {sorted(set(layers) - seen)[0]!r}")


def load_bundle(path: str | os.PathLike[str] | Bundle, *, check_host: bool = False) -> Bundle:
    """Open and fully verify a bundle; with ``check_host``, also that its host kernels run here."""
    if isinstance(path, Bundle):
        if check_host:
            path.check_runs_here("host")
        return path
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist (create one with `ubpdsl export`)")
    _inside(root, MANIFEST)  # a regular file, not a symlink out of the bundle
    manifest = read_json(root / MANIFEST, f"bundle {root}: {MANIFEST}", error=BundleError)
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        if fmt == OLD_BUILD_FORMAT:
            raise _fail(root, f"an older `ubpdsl compile` output ({OLD_BUILD_FORMAT}): re-run `ubpdsl compile`, "
                              "which writes bundles now")
        raise _fail(root, f"{MANIFEST} has format {fmt!r}, expected {BUNDLE_FORMAT!r}")
    targets, layers, masks = manifest.get("targets"), manifest.get("layers"), manifest.get("masks")
    if not isinstance(targets, dict) or not isinstance(layers, dict) or not isinstance(masks, dict) or not layers:
        raise _fail(root, f"{MANIFEST} needs non-empty 'targets', 'layers' and 'masks' objects")
    for t, info in targets.items():
        if t not in TARGET_NAMES or not isinstance(info, dict) or not all(
                isinstance(info.get(k), str) for k in ("triple", "cpu", "features")):
            raise _fail(root, f"{MANIFEST}: unknown or malformed target {t!r} (needs triple, cpu and features)")
    if masks.get("file") != MASKS:
        raise _fail(root, f"{MANIFEST}: the masks file must be {MASKS!r}, got {masks.get('file')!r}")
    _check_file(root, MASKS, masks.get("sha256"))
    indexes = manifest.get("indexes") or {}
    if not isinstance(indexes, dict):
        raise _fail(root, f"{MANIFEST}: 'indexes' must be an object")
    for name, entry in layers.items():
        _check_layer_entry(root, name, entry, targets)
    for name, entry in layers.items():
        M, K, N = entry["M"], entry["K"], entry["N"]
        for t, te in entry["targets"].items():
            files, shas = te["files"], te["sha256"]
            for kind, rel in files.items():
                _check_file(root, rel, shas.get(kind))
            _check_so(root, files["so"], t, targets[t]["triple"], te["symbol"])
            if "packed" in files:
                _check_packed(root, files["packed"], M, K, N, te.get("op", "gemm"))
            elif not te.get("specialized"):
                raise _fail(root, f"layer {name!r} ({t}): a data-driven kernel without packed weights")
    bundle = Bundle(root, manifest)
    try:
        stored = bundle.masks()
    except MaskError as exc:
        raise _fail(root, f"{MASKS}: {exc}") from None
    if set(stored) != set(layers):
        extra = sorted(set(stored) ^ set(layers))
        raise _fail(root, f"{MASKS} and {MANIFEST} list different layers (e.g. {extra[0]!r})")
    for name, mask in stored.items():
        if mask.content_hash() != layers[name].get("mask_sha256"):
            raise _fail(root, f"layer {name!r}: {MASKS} does not match the manifest's mask hash")
    for t, idx in indexes.items():
        if t not in targets or not isinstance(idx, dict):
            raise _fail(root, f"{MANIFEST}: index of unknown target {t!r}")
        _check_index(root, t, _check_file(root, idx.get("file"), idx.get("sha256")), layers)
    if check_host:
        bundle.check_runs_here("host")
    return bundle


# ------------------------------------------------------------------------------------ the C example

#: The C program that runs one layer of a bundle (in the source tree, not in the wheel).
BUNDLE_MAIN_C = Path(__file__).resolve().parents[1] / "examples" / "embed_c" / "bundle_main.c"


#: ``run_bundle_main``'s target that lets the C program pick the AArch64 variant the CPU runs.
AARCH64_DISPATCH = "aarch64"


def _is_aarch64(target: str) -> bool:
    from ubpdsl.runtime.targets import get_target

    return target == AARCH64_DISPATCH or get_target(target).is_aarch64


def build_bundle_main(target: str, out: Path, source: Path = BUNDLE_MAIN_C) -> Path:
    """Compile ``bundle_main.c`` with zig for ``target`` (AArch64: a dynamic glibc program); returns it."""
    from ubpdsl.runtime.toolchain import run_tool, zig_cmd

    if not source.is_file():
        raise UbpError(f"{source} not found: the C example lives in the source tree (examples/embed_c)")
    triple = ["-target", "aarch64-linux-gnu.2.17"] if _is_aarch64(target) else []
    out.parent.mkdir(parents=True, exist_ok=True)
    run_tool([*zig_cmd(), "cc", *triple, "-O2", str(source), "-ldl", "-o", str(out)], what="zig cc (bundle_main)")
    return out


def run_bundle_main(bundle: str | os.PathLike[str] | Bundle, target: str, layer: str, x: np.ndarray, *,
                    exe: Path | None = None, sve_bits: int | None = 256, timeout: float = 120,
                    bias: np.ndarray | None = None, residual: np.ndarray | None = None, lo: float | None = None,
                    hi: float | None = None) -> np.ndarray:
    """Run ``layer``'s ``target`` kernel from the bundle through the C program; returns y [M, n].

    Given any of ``bias`` ([M]), ``residual`` ([M, n]), ``lo``, ``hi``, the program calls the
    kernel's fused-epilogue entry point ``<symbol>_ep``: y = clamp(W x + bias + residual, lo, hi).

    AArch64 targets run under qemu-user with Debian's AArch64 glibc (``libc6-arm64-cross``); SVE
    kernels with a ``sve_bits`` vector length. ``target`` :data:`AARCH64_DISPATCH` (``"aarch64"``)
    lets the program pick SVE or NEON from the CPU's capabilities: it runs on an SVE CPU of
    ``sve_bits`` bits, or on a NEON-only CPU when ``sve_bits`` is None. ``exe``: an already built
    ``bundle_main``.
    """
    import subprocess

    from ubpdsl.errors import RunError
    from ubpdsl.runtime import qemu

    b = load_bundle(bundle)
    files = b.kernel(layer, "aarch64-neon" if target == AARCH64_DISPATCH else target)
    x = np.ascontiguousarray(x, dtype="<f4")
    if x.ndim != 2 or x.shape[0] != files.x_rows:
        raise UbpError(f"layer {layer}: x must be [K={files.x_rows}, n], got {list(x.shape)}")
    with tempfile.TemporaryDirectory(prefix="ubp-bundle-main-") as tmp:
        prog = exe or build_bundle_main(target, Path(tmp) / "bundle_main")
        xfile = Path(tmp) / "x.f32"
        x.tofile(xfile)
        argv = [str(prog), str(b.root), target, layer, str(xfile), str(x.shape[1])]
        if bias is not None or residual is not None or lo is not None or hi is not None:
            ep = []
            for name, arr, shape in (("bias", bias, (files.M,)), ("residual", residual, (files.M, x.shape[1]))):
                if arr is None:
                    ep.append("-")
                    continue
                arr = np.ascontiguousarray(arr, dtype="<f4")
                if arr.shape != shape:
                    raise UbpError(f"layer {layer}: {name} must be {list(shape)}, got {list(arr.shape)}")
                arr.tofile(Path(tmp) / f"{name}.f32")
                ep.append(str(Path(tmp) / f"{name}.f32"))
            argv += [*ep, repr(float("-inf" if lo is None else lo)), repr(float("inf" if hi is None else hi))]
        if _is_aarch64(target):
            sysroot = qemu.aarch64_sysroot()
            if sysroot is None:
                raise RunError("no AArch64 glibc for qemu: install Debian's libc6-arm64-cross")
            bits = sve_bits if target in ("aarch64-sve", AARCH64_DISPATCH) else None
            argv = [qemu.qemu_binary(), *qemu.qemu_cpu_args(bits), "-L", str(sysroot), *argv]
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RunError(f"bundle_main ({target}, {layer}) timed out after {timeout:g} s") from None
    if res.returncode != 0:
        raise RunError(f"bundle_main ({target}, {layer}) failed with exit code {res.returncode}: "
                       f"{res.stderr.strip()[-500:]}")
    return np.array(res.stdout.split(), dtype=np.float32).reshape(files.M, x.shape[1])


# ---------------------------------------------------------------------------------------------- CLI


@click.command("export")
@click.option("--mask", "mask_path", required=True, type=click.Path(dir_okay=False),
              help="masks.npz with the pruned weights")
@click.option("--tuned", "tuned_paths", multiple=True, type=click.Path(),
              help="output of `ubpdsl tune -o DIR` (the dir or its manifest.json); repeat per target")
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGET_NAMES),
              help="target to build for (repeatable; default: host)")
@click.option("--layer", "layers", multiple=True, help="export only this layer (repeatable)")
@model_options(what="The pruned model: the masks are checked against it and its layer geometry recorded "
               "(bundle); the model to export (--runtime executorch).")
@click.option("--image", default=None, metavar="H,W", help="input image size of the pattern layers (else from "
              "--model's example input): they run on the direct 3x3 pattern kernel, not as N=1 blocks")
@click.option("-o", "--out", "out_dir", default="bundle", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="replace what -o holds (a bundle, or any non-empty directory) "
              "instead of adding to it")
@click.option("--runtime", type=click.Choice(["bundle", "executorch"]), default="bundle", show_default=True,
              help="bundle: kernels only; executorch: a .pte of the whole --model (pruned part on our "
                   "kernels, the rest on XNNPACK) with its kernel library")
@click.option("--start", default=None, metavar="NODE", help="executorch: the fx node after which our part "
              "begins (the nodes up to it stay on XNNPACK; default: the input)")
@click.option("--stop", default=None, metavar="NODE", help="executorch: the fx node where our part ends (the "
              "nodes after it stay on XNNPACK; default: the output)")
@click.option("--plan-id", type=click.IntRange(0, 63), default=0, show_default=True,
              help="executorch: the id the program calls its plan by (unique per application)")
def export(mask_path: str, tuned_paths: tuple[str, ...], targets: tuple[str, ...], layers: tuple[str, ...],
           model_spec: str | None, weights: str | None, input_shape: str | None, input_dtype: str | None,
           batch: int, image: str | None, out_dir: str, force: bool, runtime: str, start: str | None,
           stop: str | None, plan_id: int) -> None:
    """Build a bundle: every pruned layer's kernel per target, packed weights, headers, one manifest;
    or (--runtime executorch) an ExecuTorch program of the whole model.

    \b
    Example:
      ubpdsl tune --mask masks.npz -o tuned/
      ubpdsl export --mask masks.npz --tuned tuned/ --target host --target aarch64-neon -o bundle/
      ubpdsl export --runtime executorch --model net.py:Net --weights pruned.pt \\
          --input-shape 3,32,32 --mask masks.npz --tuned tuned/ -o net_et/
    Layers without a tuned configuration use the default wros kernel. Only the --target targets
    are built (default: those of the --tuned outputs, else host); a tuned output for another
    target is ignored. Into an existing bundle, the kernels are added (see `ubpdsl compile`).
    Load the bundle with ubpdsl.export.load_bundle, run a model on it with
    ubpdsl.torch_ops.swap_to_kernels, or from C with examples/embed_c/bundle_main.c.

    \b
    --runtime executorch (needs pip install 'ubpdsl[executorch]'): the model is traced with
    torch.fx; BatchNorm is folded into the pruned layers, whose kernels are built for the host from
    the folded weights; the traced part runs as one ubpdsl::subgraph operator (channel-major, one
    C call), --start/--stop leave a dense head/tail to XNNPACK (mobilenetv2: stem and classifier by
    default). -o gets model.pte, plan.bin, bundle/, libubp_et.so (the kernel library), its sources,
    manifest.json and a README.md on loading it from Python (ubpdsl.deploy.et_export.load_executorch)
    and C++. The program's batch is --batch.
    """
    if runtime == "executorch":
        if image is not None:
            raise UbpError("--image applies to bundles (pattern layers run as N=1 blocks in --runtime executorch)")
        return _export_executorch(mask_path, tuned_paths, targets, layers, model_spec, weights, input_shape,
                                  input_dtype, batch, out_dir, force, start, stop, plan_id)
    if start or stop:
        raise UbpError("--start / --stop apply to --runtime executorch")
    tuned: dict[str, dict[str, KernelConfig]] = {}
    for p in tuned_paths:
        t, cfgs = load_tuned_configs(p)
        if t in tuned:
            raise UbpError(f"two --tuned outputs for target {t}")
        tuned[t] = cfgs
    chosen = list(targets) or sorted(tuned) or ["host"]
    for t in [t for t in tuned if t not in chosen]:  # tuned on (or for) another target: not asked for
        click.echo(f"note: --tuned configurations for {t} are not used: {t} is not a --target", err=True)
        del tuned[t]
    model = example = None
    if weights is not None and model_spec is None:
        raise UbpError("--weights needs --model")
    if model_spec is not None:
        loaded = load_model(model_spec, weights, input_shape, input_dtype, batch, pretrained=weights is None)
        model, example = loaded.model, loaded.example
    from ubpdsl.compiler import parse_image

    out = export_bundle(mask_path, out_dir, targets=chosen, tuned=tuned, model=model,
                        layers=layers or None, force=force, echo=click.echo, example=example,
                        images=None if image is None else parse_image(image))
    echo_summary(out)


def _export_executorch(mask_path: str, tuned_paths: tuple[str, ...], targets: tuple[str, ...],
                       layers: tuple[str, ...], model_spec: str | None, weights: str | None, input_shape: str | None,
                       input_dtype: str | None, batch: int, out_dir: str, force: bool, start: str | None,
                       stop: str | None, plan_id: int) -> None:
    """``export --runtime executorch``: option checks, then :func:`ubpdsl.deploy.et_export.export_executorch`."""
    from ubpdsl.deploy.executorch import _et_root

    _et_root()  # first: the optional extra
    if model_spec is None:
        raise UbpError("--runtime executorch needs --model (the pruned model to export)")
    if layers:
        raise UbpError("--layer does not apply to --runtime executorch (every pruned layer is in the program)")
    if [t for t in targets if t != "host"]:
        raise UbpError("--runtime executorch builds for the host only (the kernel library is built against "
                       "the installed ExecuTorch)")
    tuned: dict[str, KernelConfig] = {}
    for p in tuned_paths:
        t, cfgs = load_tuned_configs(p)
        if t != "host":
            click.echo(f"note: --tuned configurations for {t} are not used: the program runs on the host", err=True)
            continue
        tuned.update(cfgs)
    if not Path(mask_path).is_file():
        raise MaskError(f"masks file {mask_path} does not exist")
    from ubpdsl.deploy.et_export import export_executorch
    from ubpdsl.masks import load_masks

    loaded = load_model(model_spec, weights, input_shape, input_dtype, batch, pretrained=weights is None)
    if start is None and stop is None and model_spec == "mobilenetv2":
        from ubpdsl.deploy.pipeline import MOBILENET_V2

        start, stop = MOBILENET_V2["start"], MOBILENET_V2["stop"]
    out = export_executorch(loaded.model, load_masks(mask_path), loaded.require_example(), out_dir,
                            tuned=tuned or None, start=start, stop=stop, plan_id=plan_id, force=force)
    click.echo(f"wrote {out}: model.pte (plan id {plan_id}, batch {batch}), plan.bin, bundle/, libubp_et.so; "
               f"load it with ubpdsl.deploy.et_export.load_executorch (see {out / 'README.md'})")


def echo_summary(out: Path) -> None:
    """The closing line of ``export`` and ``compile``: what the bundle now holds."""
    bundle = load_bundle(out)
    n_files = sum(len(t["files"]) for e in bundle.manifest["layers"].values() for t in e["targets"].values())
    click.echo(f"wrote bundle {out}: {len(bundle.layers)} layer(s) x {len(bundle.targets)} target(s) "
               f"({', '.join(bundle.targets)}), {n_files} kernel files, {out / MANIFEST}")
