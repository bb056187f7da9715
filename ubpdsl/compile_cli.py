"""``ubpdsl compile`` and ``ubpdsl emit``: build a bundle of kernels from a masks.npz, or show any IR stage."""

from __future__ import annotations

import re
from typing import Any

import click

from ubpdsl.config import DEFAULT_VARIANT
from ubpdsl.errors import MaskError, UbpError
from ubpdsl.runtime.targets import TARGET_NAMES


def parse_constants(items: tuple[str, ...]) -> dict[str, Any]:
    """``("TILE=4", "UNROLL=2")`` -> ``{"TILE": 4, "UNROLL": 2}`` (ints, floats, bools, strings)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.isidentifier():
            raise UbpError(f"--const expects NAME=VALUE, got {item!r}")
        value: Any = raw
        if re.fullmatch(r"[+-]?\d+", raw):
            value = int(raw)
        elif raw in ("true", "false", "True", "False"):
            value = raw.lower() == "true"
        else:
            try:
                value = float(raw)
            except ValueError:
                value = raw
        out[name] = value
    return out


def load_kernel(spec: str, name: str | None = None):  # noqa: ANN201 - KernelFunction
    """A shipped variant by name, or a @ubl.kernel function from a user's file (``FILE.py[:NAME]``)."""
    from ubpdsl.kernels import get_variant

    return get_variant(spec, name)


def _problems(mask_path: str, layer: str | None) -> list[Any]:
    from ubpdsl.compiler import Problem
    from ubpdsl.masks import load_masks

    layers = load_masks(mask_path)
    if layer is not None:
        if layer not in layers:
            raise MaskError(f"{mask_path} has no layer {layer!r}; layers: {', '.join(layers) or 'none'}")
        layers = {layer: layers[layer]}
    if not layers:
        raise MaskError(f"{mask_path} holds no layers")
    return [Problem.from_mask(m) for m in layers.values()]


@click.command("compile")
@click.option("--mask", "mask_path", required=True, type=click.Path(dir_okay=False), help="masks.npz (with weights)")
@click.option("--layer", "layers", multiple=True, help="compile only this layer (repeatable; default: all)")
@click.option("--target", "targets", multiple=True, type=click.Choice(TARGET_NAMES),
              help="target to build for (repeatable; default: host)")
@click.option("--variant", default=DEFAULT_VARIANT, show_default=True,
              help="shipped variant, or a user kernel FILE.py:NAME (docs/dsl.md)")
@click.option("--kernel", "kernel_name", default=None, help="kernel name inside a .py file with several")
@click.option("--const", "consts", multiple=True, metavar="NAME=VALUE", help="compile-time constant (repeatable)")
@click.option("--specialize", is_flag=True, help="bake the mask and weights into the .so")
@click.option("--vector-bits", type=int, default=None, help="narrower vectors than the target's (fixed-width only)")
@click.option("--check-bounds", is_flag=True,
              help="check every load/store at run time: the kernel returns 4 instead of going out of bounds")
@click.option("-o", "--out", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="replace what -o holds (a bundle, or any non-empty directory) "
              "instead of adding to it")
@click.option("--patterns", "patterns", is_flag=True,
              help="compile the pattern layers of --mask (masks.npz format 2) with a direct 3x3 "
              "convolution kernel (default variant pattern_direct; symbol ubp_pattern_<layer>; "
              "needs --image)")
@click.option("--image", default=None, metavar="H,W", help="with --patterns: the image size of the pattern layers")
def compile_cmd(mask_path: str, layers: tuple[str, ...], targets: tuple[str, ...], variant: str,
                kernel_name: str | None, consts: tuple[str, ...], specialize: bool, vector_bits: int | None,
                check_bounds: bool, out_dir: str, force: bool, patterns: bool,
                image: str | None) -> None:
    """Compile the layers of a masks.npz into a bundle: per target .so files, headers, one manifest.

    \b
    Example:
      ubpdsl compile --mask masks.npz --target host --target aarch64-sve --const TILE=2 -o build/
    Writes build/<target>/<layer>.<target>.so, build/<target>/<layer>.h,
    build/<target>/<layer>.packed.bin (data-driven kernels), build/<target>/kernels.tsv,
    build/masks.npz and build/manifest.json: the bundle format of `ubpdsl export`, with one
    kernel configuration (these options) for every layer. A later compile or export into the
    same folder adds its targets and layers to the bundle (rebuilding those it names).
    """
    from ubpdsl.compiler import resolve_target
    from ubpdsl.config import KernelConfig
    from ubpdsl.export import echo_summary, export_bundle
    from ubpdsl.kernels import variant_name

    if patterns:
        _compile_patterns(mask_path, mask_path, image, layers, targets, variant, kernel_name, consts, out_dir)
        return
    spec = variant if kernel_name is None else f"{variant}:{kernel_name}"
    kernel = load_kernel(spec)
    name = variant_name(spec)
    for t in targets or ("host",):
        resolve_target(t, vector_bits)  # TargetError: --vector-bits does not fit this target
    config = KernelConfig(name, parse_constants(consts), specialize, vector_bits, check_bounds,
                          source="command-line")
    out = export_bundle(mask_path, out_dir, targets=targets or ("host",), layers=layers or None, config=config,
                        kernels={name: kernel}, force=force, echo=click.echo)
    echo_summary(out)


def _compile_patterns(mask_path: str, schemes_path: str, image: str | None, layers: tuple[str, ...],
                      targets: tuple[str, ...], variant: str, kernel_name: str | None, consts: tuple[str, ...],
                      out_dir: str) -> None:
    """``compile --patterns``: every pattern layer -> <out>/<target>/<layer>.<target>.so, .h, .packed.bin."""
    from pathlib import Path

    from ubpdsl.compiler import compile_kernel, load_pattern_problems, parse_image

    if image is None:
        raise UbpError("--patterns needs --image H,W (the image size the pattern layers run on)")
    if variant == DEFAULT_VARIANT and kernel_name is None:
        variant = "pattern_direct"
    kernel = load_kernel(variant if kernel_name is None else f"{variant}:{kernel_name}")
    problems = load_pattern_problems(mask_path, schemes_path, parse_image(image), layers)
    constants = parse_constants(consts)
    for t in targets or ("host",):
        for problem in problems:
            ck = compile_kernel(kernel, problem, t, constants=constants)
            files = ck.save(Path(out_dir) / t)
            click.echo(f"{problem.name}: {ck.symbol} -> {files['so']}")


@click.command("emit")
@click.argument("kernel_spec", metavar="KERNEL")
@click.option("--stage", type=click.Choice(["ubp", "lowered", "llvm", "llvm-ir", "asm"]), default="ubp",
              show_default=True)
@click.option("--target", type=click.Choice(TARGET_NAMES), default="host", show_default=True)
@click.option("--kernel", "kernel_name", default=None, help="kernel name inside a .py file with several")
@click.option("--mask", "mask_path", default=None, type=click.Path(dir_okay=False))
@click.option("--layer", default=None, help="layer of --mask (default: the first)")
@click.option("--shape", default="16,32,4", show_default=True, metavar="M,K,N",
              help="without --mask: a random BED mask of this shape")
@click.option("--sparsity", default=0.75, show_default=True, type=float)
@click.option("--const", "consts", multiple=True, metavar="NAME=VALUE")
@click.option("--specialize", is_flag=True, help="bake the mask into the code")
@click.option("--vector-bits", type=int, default=None, help="narrower vectors than the target's (fixed-width only)")
@click.option("--check-bounds", is_flag=True,
              help="check every load/store at run time: the kernel returns 4 instead of going out of bounds")
def emit_cmd(kernel_spec: str, stage: str, target: str, kernel_name: str | None, mask_path: str | None,
             layer: str | None, shape: str, sparsity: float, consts: tuple[str, ...], specialize: bool,
             vector_bits: int | None, check_bounds: bool) -> None:
    """Print a kernel at one compilation stage (ubp, lowered, llvm, llvm-ir, asm).

    \b
    KERNEL is a shipped variant (block_stream, wros, wros_unrolled, aligned_rows)
    or a Python file with @ubl.kernel functions, FILE.py[:NAME] (docs/dsl.md). Example:
      ubpdsl emit wros --stage lowered --target aarch64-sve --shape 64,64,4
    """
    from ubpdsl.compiler import emit, random_problem

    kernel = load_kernel(kernel_spec, kernel_name)
    if mask_path is not None:
        problem = _problems(mask_path, layer)[0]
    else:
        try:
            M, K, N = (int(v) for v in shape.split(","))
        except ValueError:
            raise UbpError(f"--shape expects M,K,N, got {shape!r}") from None
        if min(M, K, N) < 1 or N > M:
            raise UbpError(f"--shape {shape}: need M >= N >= 1 and K >= 1")
        if not 0 <= sparsity < 1:
            raise UbpError(f"--sparsity must be in [0, 1), got {sparsity}")
        problem = random_problem(M, K, N, sparsity, aligned=kernel.aligned)
    click.echo(emit(kernel, problem, target, stage, constants=parse_constants(consts), specialize=specialize,
                    vector_bits=vector_bits, check_bounds=check_bounds))


compile = compile_cmd  # noqa: A001 - the name the CLI attaches
emit = emit_cmd
