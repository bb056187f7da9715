"""``ubpdsl prune`` and ``ubpdsl inspect``: one-shot pruning to masks.npz, and a look inside one.

Both are attached to the main CLI group by :mod:`ubpdsl.cli`, which turns a
:class:`~ubpdsl.errors.UbpError` into a one-line ``error: ...`` with exit code 1; click
usage errors exit with 2.
"""

from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from ubpdsl.cli_common import load_model, model_options
from ubpdsl.errors import UbpError

__all__ = ["inspect", "prune"]

_METHODS = ("bed", "optimal", "aligned", "unstructured", "pattern")
_IMPORTANCES = ("abs", "sq", "taylor")
_MAX_PLOT_ELEMENTS = 1 << 26  # one R x C byte image per layer in --plot


def _parse_layer_sparsity(items: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UbpError(f"--layer-sparsity expects NAME=S, got {item!r}")
        try:
            out[name] = float(value)
        except ValueError:
            raise UbpError(f"--layer-sparsity {item!r}: {value!r} is not a number") from None
    return out


@click.command("prune")
@model_options(required=True)
@click.option("--sparsity", type=float, required=True, help="Target fraction of zero weights, in [0, 1).")
@click.option("--block", type=int, default=4, show_default=True, help="Block size N (rows per Nx1 block).")
@click.option(
    "--method",
    type=click.Choice(_METHODS),
    default="bed",
    show_default=True,
    help="Block selector; pattern = PatDNN pattern + connectivity pruning of the 3x3 convs.",
)
@click.option(
    "--patterns", type=click.IntRange(1, 56), default=8, show_default=True, help="Pattern library size (pattern)."
)
@click.option(
    "--reweighted",
    is_flag=True,
    help="BLK-REW: first train with the reweighted block-group regulariser on the spec's data.",
)
@click.option("--reweighted-steps", type=click.IntRange(min=1), default=200, show_default=True, help="Its batches.")
@click.option("--reweighted-lambda", type=float, default=1e-3, show_default=True, help="Its lambda.")
@click.option(
    "--activation-sparsity",
    type=float,
    metavar="S",
    help="Also drop S of each conv's output positions (random static pixel masks, stored in OUTPUT).",
)
@click.option(
    "--importance", type=click.Choice(_IMPORTANCES), default="abs", show_default=True, help="Weight score."
)
@click.option("--global", "global_budget", is_flag=True, help="One block budget shared by all layers.")
@click.option("--skip", multiple=True, metavar="NAME", help="Leave this layer dense (repeatable; fnmatch).")
@click.option("--layer-sparsity", multiple=True, metavar="NAME=S", help="Per-layer sparsity (repeatable).")
@click.option(
    "--calibration-batches",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Batches of the spec's data for --importance taylor.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the initial weights.")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="masks.npz to write.",
)
def prune(
    model_spec: str,
    weights: Path | None,
    input_shape: str | None,
    input_dtype: str | None,
    batch: int,
    sparsity: float,
    block: int,
    method: str,
    importance: str,
    global_budget: bool,
    skip: tuple[str, ...],
    layer_sparsity: tuple[str, ...],
    calibration_batches: int,
    seed: int,
    output: Path,
    patterns: int = 8,
    reweighted: bool = False,
    reweighted_steps: int = 200,
    reweighted_lambda: float = 1e-3,
    activation_sparsity: float | None = None,
) -> None:
    """Prune a model's weights once and write the kept blocks and pruned weights to masks.npz.

    Every Linear and ungrouped Conv layer is pruned to Nx1 blocks that may start at any
    row (method bed or optimal), only at multiples of N (aligned), or to single weights
    (unstructured, stored as N = 1 blocks); method pattern gives 3x3 convs layers of kind
    pattern. --activation-sparsity adds a pixel mask to each conv (a conv left dense is
    written with all its weights). Depthwise/grouped convolutions stay dense and are listed
    as skipped. For gradual pruning during training use
    ubpdsl.prune.sparsifier.UnalignedBlockSparsifier (see docs/pruning.md).

    \b
    Example:
      ubpdsl prune --model mobilenetv2 --sparsity 0.75 --block 4 -o masks.npz
      ubpdsl prune --model mobilenetv2 --sparsity 0.9 --global --skip classifier.1 -o m.npz
      ubpdsl prune --model digits-cnn --weights cnn.pt --sparsity 0.5 --layer-sparsity fc=0.25 -o m.npz
      ubpdsl prune --model digits-cnn --method pattern --sparsity 0.75 -o m.npz
      ubpdsl prune --model digits-cnn --reweighted --sparsity 0.75 -o m.npz
      ubpdsl prune --model mobilenetv2 --sparsity 0.75 --activation-sparsity 0.3 -o m.npz
    """
    import torch

    from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier

    if not 0.0 <= sparsity < 1.0:
        raise UbpError(f"--sparsity must be in [0, 1), got {sparsity}")
    from ubpdsl.masks import MAX_BLOCK

    if activation_sparsity is not None and not 0.0 < activation_sparsity < 1.0:
        raise UbpError(f"--activation-sparsity must be in (0, 1), got {activation_sparsity}")

    if not 1 <= block <= MAX_BLOCK:
        raise UbpError(f"--block must be in 1..{MAX_BLOCK}, got {block}")
    overrides = _parse_layer_sparsity(layer_sparsity)
    click.echo(f"loading {model_spec}" + (f" weights from {weights}" if weights else ""), err=True)
    loaded = load_model(model_spec, weights, input_shape, input_dtype, batch, seed=seed)
    model = loaded.model
    if importance == "taylor" and loaded.calibration is None:
        raise UbpError(f"--importance taylor needs data, and model {model_spec!r} has none built in")
    if reweighted and loaded.calibration is None:
        raise UbpError(f"--reweighted needs data, and model {model_spec!r} has none built in")
    if weights is None and loaded.builtin and not loaded.pretrained:
        click.echo(
            f"note: {model_spec} has no shipped weights; pruning its seed-{seed} initialisation", err=True
        )

    if method == "pattern":
        from ubpdsl.prune.pattern import PatternSparsifier

        if global_budget:
            raise UbpError("--global does not apply to --method pattern")
        sparsifier = PatternSparsifier(
            sparsity, num_patterns=patterns, importance=importance, skip=skip, layer_sparsity=overrides, progress=True
        )
    else:
        sparsifier = UnalignedBlockSparsifier(
            sparsity_level=sparsity,
            block=block,
            method=method,
            importance=importance,
            global_budget=global_budget,
            skip=skip,
            layer_sparsity=overrides,
            progress=True,
        )
    sparsifier.prepare(model, config=None)
    if reweighted:
        from ubpdsl.prune.reweighted import ReweightedGroupRegularizer, reweighted_train

        names = [g["module_fqn"] for g in sparsifier.groups]
        reg = ReweightedGroupRegularizer(
            model, lam=reweighted_lambda, block=block, update_every=50, layers=names,
            grouping="aligned" if method == "aligned" else "unaligned",
        )
        loss = reweighted_train(model, loaded.calibration(reweighted_steps), reg)
        click.echo(f"reweighted training: {reweighted_steps} batches, last loss {loss:.4f}", err=True)
    if importance == "taylor":
        from tqdm import tqdm

        for xb, yb in tqdm(
            loaded.calibration(calibration_batches),
            total=calibration_batches,
            desc="gradients",
            unit="batch",
            leave=False,
        ):
            model.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            sparsifier.accumulate_importance()
    sparsifier.step()
    sparsifier.squash_mask()

    layers = sparsifier.to_layer_masks(include_weights=True)
    if activation_sparsity is not None:
        from ubpdsl.prune.activation import attach_pixel_masks, random_pixel_masks

        shape = tuple(loaded.require_example().shape[1:])
        pixels = random_pixel_masks(model, shape, activation_sparsity, seed=seed, skip=skip)
        weights = {name: model.get_submodule(name).weight for name in pixels}
        layers = attach_pixel_masks(layers, pixels, weights, block)
    if not layers:
        raise UbpError("nothing pruned: every selected layer has sparsity 0")
    from ubpdsl.guard import ensure_dir
    from ubpdsl.masks import save_masks

    ensure_dir(output.parent)
    save_masks(output, layers)

    kept = sum(lm.nnz for lm in layers.values())
    total = sum(lm.R * lm.C for lm in layers.values())
    for lm in layers.values():
        if lm.num_blocks == 0:
            click.echo(f"warning: layer {lm.name} keeps no weight at all", err=True)
            continue
        empty = int(np.count_nonzero(~lm.dense_mask().any(axis=1)))
        if global_budget and (empty > lm.R // 2 or lm.sparsity > max(0.99, sparsity + (1 - sparsity) / 2)):
            click.echo(f"warning: --global left layer {lm.name} at {lm.sparsity:.2%} sparsity with {empty} of "
                       f"{lm.R} output rows empty (its weights are small next to other layers'); cap it with "
                       f"--layer-sparsity {lm.name}=S or --skip {lm.name}", err=True)
    for s in sparsifier.skipped:
        click.echo(f"skipped {s.name}: {s.reason}")
    dense = [g["module_fqn"] for g in sparsifier.groups if g["module_fqn"] not in layers]
    for name in dense:
        click.echo(f"dense   {name}: sparsity 0, not written")
    kinds = [lm.kind for lm in layers.values()]
    if "pattern" in kinds or activation_sparsity is not None:
        click.echo(f"{kinds.count('pattern')} pattern layers, "
                   f"{sum(lm.pixel_keep is not None for lm in layers.values())} pixel masks")
    n_eff = ",".join(str(n) for n in sorted({lm.block for lm in layers.values()}))  # dense pixel layers: --block
    click.echo(
        f"wrote {output}: {len(layers)} layers, N={n_eff}, method {method}, "
        f"sparsity {1 - kept / max(1, total):.4f} over pruned layers"
    )


def _layer_rows(layers: dict) -> list[tuple[str, ...]]:
    rows = []
    for lm in layers.values():
        n = int(lm.block)
        aligned = float(np.mean(np.asarray(lm.rows) % n == 0)) if lm.num_blocks else float("nan")
        covered = np.zeros(lm.R, dtype=bool)  # O(R + blocks): a huge declared shape costs no R x C mask
        for i in range(n):
            covered[np.asarray(lm.rows, dtype=np.int64) + i] = True
        empty_rows = int(lm.R - np.count_nonzero(covered))
        rows.append(
            (
                lm.name,
                "x".join(str(s) for s in lm.shape),
                f"{lm.R}x{lm.C}",
                str(n),
                str(lm.num_blocks),
                f"{lm.sparsity:.4f}",
                "-" if np.isnan(aligned) else f"{aligned:.3f}",
                str(empty_rows),
                "yes" if lm.weight is not None else "no",
                lm.kind,
                "-" if lm.pixel_keep is None else f"{lm.kept_pixels}/{lm.pixel_keep.size}",
            )
        )
    return rows


def _format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    left = {0, 1, 2, 9}

    def fmt(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths)), *(fmt(r) for r in rows)])


def _plot_block_map(layers: dict, path: Path) -> None:
    """One panel per layer: kept aligned blocks, kept unaligned blocks, pruned weights."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    items = list(layers.values())
    for lm in items:
        if lm.R * lm.C > _MAX_PLOT_ELEMENTS:
            raise UbpError(f"layer {lm.name} has {lm.R * lm.C} weights, too many to draw (limit {_MAX_PLOT_ELEMENTS}); "
                           "choose smaller layers with --layer")
    ncols = min(4, len(items))
    nrows = (len(items) + ncols - 1) // ncols
    fig = Figure(figsize=(4 * ncols, 3.2 * nrows + 0.6), layout="constrained")
    colors = ["#ffffff", "#1f77b4", "#ff7f0e"]
    cmap = ListedColormap(colors)
    for i, lm in enumerate(items):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        code = np.zeros((lm.R, lm.C), dtype=np.uint8)
        n = int(lm.block)
        for r, c in zip(np.asarray(lm.rows), np.asarray(lm.cols), strict=True):
            code[r : r + n, c] = 1 if r % n == 0 else 2
        ax.imshow(code, cmap=cmap, vmin=0, vmax=2, interpolation="nearest", aspect="auto")
        ax.set_title(f"{lm.name}\n{lm.R}x{lm.C}, N={n}, s={lm.sparsity:.2f}", fontsize=8)
        ax.set_xlabel("column", fontsize=7)
        ax.set_ylabel("row", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.legend(
        handles=[
            Patch(color=colors[1], label="aligned block"),
            Patch(color=colors[2], label="unaligned block"),
            Patch(facecolor=colors[0], edgecolor="black", label="pruned"),
        ],
        loc="outside lower center",
        ncols=3,
        fontsize=8,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise UbpError(f"cannot write {path}: {exc.strerror or exc}") from None


@click.command("inspect")
@click.argument("masks_path", metavar="MASKS.npz", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), help="Write a PNG block map here.")
@click.option("--layer", "only", multiple=True, metavar="NAME", help="Only this layer (repeatable).")
def inspect(masks_path: Path, plot: Path | None, only: tuple[str, ...]) -> None:
    """Print a per-layer summary of masks.npz; optionally draw its block map.

    Columns: weight shape, GEMM view RxC, block size N, number of blocks, sparsity,
    fraction of blocks that start at a multiple of N (aligned), rows of W with no
    kept weight, whether pruned weights are stored, the layer kind (blocks or pattern)
    and the output pixels kept by its pixel mask (- without one).

    \b
    Example:
      ubpdsl inspect masks.npz
      ubpdsl inspect masks.npz --plot blocks.png --layer features.18.0
    """
    from ubpdsl.masks import load_masks

    if not masks_path.is_file():
        raise UbpError(f"{masks_path} does not exist")
    layers = load_masks(masks_path)
    if only:
        unknown = [n for n in only if n not in layers]
        if unknown:
            raise UbpError(f"{masks_path} has no layer {unknown[0]!r}")
        layers = {n: layers[n] for n in only}
    header = ("layer", "shape", "RxC", "N", "blocks", "sparsity", "aligned", "empty_rows", "weights", "kind", "pixels")
    click.echo(_format_table(header, _layer_rows(layers)))
    kept = sum(lm.nnz for lm in layers.values())
    total = sum(lm.R * lm.C for lm in layers.values())
    click.echo(
        f"{len(layers)} layers, {kept} of {total} weights kept, sparsity {1 - kept / max(1, total):.4f}"
    )
    if plot is not None:
        if not layers:
            raise UbpError("no layer to plot")
        _plot_block_map(layers, plot)
        click.echo(f"wrote {plot}")
