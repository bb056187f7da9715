"""``ubpdsl tune``: find the fastest kernel config for every layer of a masks.npz and build it.

Everything the user can get wrong is checked before any study is opened or changed: the
target name, the masks file (and its weights, when they are needed), the pixel map, the
runner URL and the storage URL (it must answer a query). Results go to ``--out``: per layer
the best ``.so``, header, packed weights (data-driven kernels) and ``manifest.json``, a
summary table (default config vs tuned vs dense ``torch.mm``, also in ``summary.md``) and
``tuning_history.png``.

Timing is cold by default (``--cache cold``: the caches are scrubbed before every timed call,
as for a layer that runs after other layers of a network); ``--cache warm`` times back-to-back
calls. The mode is recorded in the manifest and the summary, and warm and cold results are
cached and stored in separate studies.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from ubpdsl.cli_common import load_model, model_options
from ubpdsl.errors import MaskError, UbpError
from ubpdsl.identity import atomic_copy, atomic_write, content_file
from ubpdsl.kernels import VARIANTS, kernel_identity
from ubpdsl.runtime.targets import TARGET_NAMES

__all__ = ["tune", "run_tune", "load_layers", "LayerSummary"]


#: Largest x plus y of one layer's timing problem, (K + M) * n float32 values, and largest dense weight.
MAX_OPERAND_BYTES = 1 << 30

#: Finished trials per layer by default: a MobileNetV2 masks.npz (36 layers) in < 10 min on 2 cores.
DEFAULT_TRIALS = 12


def load_layers(mask_path: str, layer_names: tuple[str, ...], pixels: int | None, pixels_map: str | None,
                need_weights: bool, loaded: Any = None) -> list[Any]:
    """The layers to tune, each with its n (see :func:`ubpdsl.models.layer_columns`); MaskError for missing
    layers or weights, UbpError for an n whose operands would not fit in memory."""
    from ubpdsl.autotune.space import Layer
    from ubpdsl.compiler import Problem
    from ubpdsl.masks import load_masks
    from ubpdsl.names import check_unique_stems

    if not Path(mask_path).is_file():
        raise MaskError(f"masks file {mask_path} does not exist")
    masks = load_masks(mask_path)
    if not masks:
        raise MaskError(f"{mask_path} holds no layers")
    everything = masks
    if layer_names:
        missing = [n for n in layer_names if n not in masks]
        if missing:
            raise MaskError(f"{mask_path} has no layer {missing[0]!r}; layers: {', '.join(masks)}")
        masks = {n: masks[n] for n in layer_names}
    check_unique_stems(masks)
    for name, m in masks.items():
        if m.R * m.C * 4 > MAX_OPERAND_BYTES:
            raise UbpError(f"layer {name}: a {m.R}x{m.C} weight is {m.R * m.C * 4 >> 20} MiB, more than tune "
                           f"handles ({MAX_OPERAND_BYTES >> 20} MiB)")
        if m.weight is None and need_weights:
            raise MaskError(f"layer {name}: {mask_path} has no weights, and tune needs them to build and deliver "
                            "the kernels (save the masks with weights, e.g. `ubpdsl prune` does, or pass "
                            "--synthetic-weights to tune data-driven kernels on random weights)")
    from ubpdsl.models import layer_columns

    columns = layer_columns(everything, pixels=pixels, pixels_map=pixels_map, loaded=loaded)
    layers = []
    for name, m in masks.items():
        n = int(columns[name])
        if (m.R + m.C) * n * 4 > MAX_OPERAND_BYTES:
            raise UbpError(f"layer {name}: n = {n} makes x and y {(m.R + m.C) * n * 4 >> 20} MiB "
                           f"(limit {MAX_OPERAND_BYTES >> 20} MiB); give a smaller --pixels / --pixels-map / --batch")
        problem = Problem.from_mask(m)
        if problem.weight is None:  # timing only depends on the block structure
            rng = np.random.default_rng(0)
            w = np.zeros((problem.M, problem.K), np.float32)
            for i in range(problem.N):
                w[problem.rows + i, problem.cols] = rng.uniform(0.5, 1.5, len(problem.rows))
            problem = Problem(problem.name, problem.M, problem.K, problem.N, problem.rows, problem.cols, w)
        layers.append(Layer(problem, n))
    return layers


@dataclass
class LayerSummary:
    """Final numbers for one layer (seconds, or estimated cycles when ``estimate``)."""

    layer: str
    shape: str
    n: int
    default: float
    tuned: float
    dense: float | None
    config: str
    trials: int
    failed: int
    cached: bool
    estimate: bool
    gflops: float | None
    cache: str | None = None  # timing mode ("cold" / "warm"); None for estimates


def run_tune(mask_path: str, *, target: str = "host", trials: int = DEFAULT_TRIALS, storage: str | None = None,
             out_dir: str = "build", layer_names: tuple[str, ...] = (), pixels: int | None = None,
             pixels_map: str | None = None, model: Any = None, jobs: int = 2, timeout: float = 20.0,
             runner: str | None = None, ssh_options: tuple[str, ...] = (), force: bool = False,
             synthetic_weights: bool = False, seed: int = 0, cache_dir: str | None = None, dense: bool = True,
             progress: bool = True, cache: str = "cold", echo: Any = click.echo,
             variants: tuple[str, ...] = ()) -> list[LayerSummary]:
    """The ``tune`` command as a function (see :func:`tune`); returns the per-layer summary.

    ``model``: a :class:`~ubpdsl.models.LoadedModel` (or a built-in spec name) whose example input
    gives every layer's n. ``variants``: search only these kernels (shipped names or user kernel
    files ``FILE.py:name``; default: the shipped variants).
    """
    from ubpdsl.autotune.runner import get_runner
    from ubpdsl.autotune.study import CACHE_MODES, Tuner, TuneSettings
    from ubpdsl.guard import ensure_dir
    from ubpdsl.runtime.targets import get_target

    # 1. validate everything before touching any study
    get_target(target)  # TargetError naming the known targets
    if trials < 1:
        raise UbpError(f"--trials must be >= 1, got {trials}")
    if cache not in CACHE_MODES:
        raise UbpError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if isinstance(model, str):
        from ubpdsl.models import resolve_model

        model = resolve_model(model, pretrained=False)
    from ubpdsl.kernels import variant_name

    variants = tuple(dict.fromkeys(variant_name(v) for v in variants))  # loads (and checks) each kernel now
    layers = load_layers(mask_path, layer_names, pixels, pixels_map, not synthetic_weights, loaded=model)
    ensure_dir(out_dir)  # a file in the way is reported now, not after the tuning
    the_runner = get_runner(runner, ssh_options) if runner else None
    settings = TuneSettings(target=target, trials=trials, storage=storage,
                            cache_dir=Path(cache_dir) if cache_dir else None, jobs=jobs, timeout=timeout, seed=seed,
                            force=force, weights=not synthetic_weights, cache=cache, variants=variants)
    warnings.filterwarnings("ignore", module="optuna")
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(layers) * trials, desc="tuning", unit="trial", dynamic_ncols=True, leave=True)

    def on_trial(layer: str, k: int, value: float | None) -> None:
        if bar is not None:
            bar.set_postfix_str(layer[-24:], refresh=False)
            bar.update(k)

    tuner = Tuner(settings, runner=the_runner, on_trial=on_trial)
    out = Path(out_dir)
    summaries: list[LayerSummary] = []
    manifest: dict[str, Any] = {"format": "ubpdsl.tuned/1", "target": target, "layers": {}}
    results = []
    try:
        _ = tuner.storage  # connect (TuneError if unreachable) before anything else
        manifest["cache"] = tuner.cache_mode
        if tuner.estimate:
            from ubpdsl.autotune.mca import estimate_label

            echo(f"note: {target} is timed by a cost model: every number is an {estimate_label(target)}", err=True)
        for layer in layers:
            before = bar.n if bar is not None else 0
            res = tuner.tune_layer(layer)
            if res.from_cache and res.best not in tuner.recent:
                tuner.recent.append(res.best)
            if bar is not None:  # cached layers and top-ups count as their whole budget
                bar.update(max(0, before + trials - bar.n))
            results.append(res)
            summaries.append(_deliver(tuner, layer, res, out, manifest, dense and not tuner.estimate
                                      and the_runner is None))
    finally:
        if bar is not None:
            bar.close()
        tuner.close()
    manifest["machine"] = _machine()
    ensure_dir(out)
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    table = format_table(summaries, target)
    atomic_write(out / "summary.md", table + "\n")
    echo(table)
    try:
        plot_history(results, out / "tuning_history.png", estimate=tuner.estimate,
                     confirmed={s.layer: s.default / s.tuned for s in summaries})
        echo(f"wrote {len(summaries)} tuned kernel(s), {out / 'manifest.json'}, {out / 'tuning_history.png'}")
    except Exception as exc:  # noqa: BLE001 - the plot is a nicety; the kernels are written
        echo(f"warning: could not draw the tuning history: {exc}", err=True)
    return summaries


def _deliver(tuner: Any, layer: Any, res: Any, out: Path, manifest: dict[str, Any], dense: bool) -> LayerSummary:
    """Build the best config into ``out`` and measure default vs tuned (vs torch.mm) once more."""
    from ubpdsl.guard import ensure_dir
    from ubpdsl.names import file_stem

    best = tuner.compile(layer, res.best, final=True)
    default = tuner.compile(layer, res.default)
    ensure_dir(out)
    safe = file_stem(layer.name)
    files = {"so": out / f"{safe}.{tuner.target.name}.so", "header": out / f"{safe}.h"}
    atomic_copy(Path(best["so"]), files["so"])
    atomic_copy(Path(best["header"]), files["header"])
    if best.get("packed") and tuner.settings.weights:  # never ship packed random (synthetic) weights
        files["packed"] = out / f"{safe}.packed.bin"
        atomic_copy(Path(best["packed"]), files["packed"])
    dense_s = gflops = None
    if res.from_cache and res.final:  # unchanged layer: the numbers of the run that tuned it
        t_def, t_tuned, dense_s = res.final["default"], res.final["tuned"], res.final.get("dense")
        if not dense:
            dense_s = None
    elif res.estimate:
        t_def = tuner.estimate_cost(layer, res.default, default)
        t_tuned = tuner.estimate_cost(layer, res.best, best)
    else:
        entries = [tuner._entry("default", layer, default), tuner._entry("tuned", layer, best)]
        shape = (layer.problem.M, layer.problem.K, layer.n)
        known = tuner.dense_times.get(shape)
        if dense and known is None:
            wfile = content_file(tuner.workdir, layer.problem.weight.astype(np.float32), ".f32")
            entries.append({"name": "torch.mm", "kind": "torch_mm", "M": layer.problem.M, "K": layer.problem.K,
                            "weight": str(wfile)})
        outcome = tuner.measure(layer, entries, rounds=21, budget_s=0.6)
        if not outcome.ok:
            raise UbpError(f"layer {layer.name}: final measurement failed: {outcome.message}")
        r = outcome.result["results"]
        t_def = r[0]["median_s"]
        # the same config is the same kernel: its two timings differ only by noise
        t_tuned = t_def if res.best.key() == res.default.key() else t_def * r[1]["ratio"]
        if dense and known is None:
            dense_s = t_def * r[2]["ratio"]
            tuner.dense_times[shape] = dense_s
        elif dense:
            dense_s = known
    if not res.estimate:
        gflops = layer.useful_flops / t_tuned / 1e9
    if not (res.from_cache and res.final):
        tuner.remember_final(res, {"default": t_def, "tuned": t_tuned, "dense": dense_s})
    p = layer.problem
    manifest["layers"][layer.name] = {
        **best["manifest"], "files": {k: v.name for k, v in files.items()}, "n": layer.n,
        "tuned_config": res.best.to_json(), "default_config": res.default.to_json(),
        "trials": res.trials, "failed_trials": res.failed, "from_cache": res.from_cache, "study": res.study,
        "estimate": res.estimate, "default_value": t_def, "tuned_value": t_tuned, "dense_torch_mm_s": dense_s,
        "unit": "cycles (llvm-mca estimate)" if res.estimate else "seconds (median, thread CPU time)",
        "cache": tuner.cache_mode,  # how the numbers (and the choice of config) were timed: cold / warm caches
    }
    if res.best.variant not in VARIANTS:  # a user kernel file: export refuses it once the kernel changed
        manifest["layers"][layer.name]["kernel_identity"] = kernel_identity(res.best.kernel)
    label = res.best.label() + (" (= default)" if res.best.key() == res.default.key() else "")
    return LayerSummary(layer.name, f"{p.M}x{p.K} N={p.N}", layer.n, t_def, t_tuned, dense_s, label,
                        res.trials, res.failed, res.from_cache, res.estimate, gflops, tuner.cache_mode)


def format_table(rows: list[LayerSummary], target: str) -> str:
    """The summary table (markdown), with geometric means."""
    from ubpdsl.autotune.study import geomean

    est = any(r.estimate for r in rows)
    if est:
        from ubpdsl.autotune.mca import estimate_label

        head = (f"target {target}: {estimate_label(target)} -- not a measurement\n\n"
                "| layer | shape | n | default (cycles, est.) | tuned (cycles, est.) | speedup (est.) | config "
                "| trials |")
        sep = "|---|---|---|---|---|---|---|---|"
        lines = [head, sep]
        for r in rows:
            lines.append(f"| {r.layer} | {r.shape} | {r.n} | {r.default:.0f} | {r.tuned:.0f} | "
                         f"{r.default / r.tuned:.2f}x | {r.config} | {r.trials}{' (cached)' if r.cached else ''} |")
        lines.append(f"\ngeometric mean speedup over the default config (estimate): "
                     f"{geomean(r.default / r.tuned for r in rows):.2f}x")
        return "\n".join(lines)
    head = ("| layer | shape | n | default (us) | tuned (us) | torch.mm (us) | tuned vs default | tuned vs torch.mm "
            "| useful GFLOP/s | config | trials (failed) |")
    modes = {r.cache for r in rows if r.cache}
    how = {"cold": "cold caches (scrubbed before every call)", "warm": "warm caches (back-to-back calls)"}
    mode = ", ".join(how.get(m, m) for m in sorted(modes)) or "measured"
    lines = [f"target {target}: measured with {mode}, single thread, medians of interleaved runs\n", head,
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = f"{r.dense * 1e6:.1f}" if r.dense else "-"
        vs_dense = f"{r.dense / r.tuned:.2f}x" if r.dense else "-"
        lines.append(f"| {r.layer} | {r.shape} | {r.n} | {r.default * 1e6:.1f} | {r.tuned * 1e6:.1f} | {dense} | "
                     f"{r.default / r.tuned:.2f}x | {vs_dense} | {r.gflops:.1f} | {r.config} | "
                     f"{r.trials} ({r.failed}){' cached' if r.cached else ''} |")
    lines.append(f"\ngeometric means: tuned vs default {geomean(r.default / r.tuned for r in rows):.2f}x, "
                 f"useful GFLOP/s {geomean(r.gflops for r in rows if r.gflops):.1f}"
                 + (f", tuned vs torch.mm {geomean(r.dense / r.tuned for r in rows if r.dense):.2f}x"
                    if any(r.dense for r in rows) else ""))
    return "\n".join(lines)


def plot_history(results: list[Any], path: Path, estimate: bool = False,
                 confirmed: dict[str, float] | None = None) -> None:
    """Best-so-far speedup over the default config, per layer, against the trial number.

    Every trial is timed against the default config in the same measurement, so the default
    trial is 1.0x by definition; ``confirmed`` (layer -> speedup) marks the final measurement of
    the chosen config, the number the summary table prints.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    labelled = len(results) <= 12
    for res in results:
        xs, ys, best = [], [], None
        for i, (_, value) in enumerate(sorted(res.history), start=1):
            if value is not None and value > 0:
                best = value if best is None else min(best, value)
            if best is not None:
                xs.append(i)
                ys.append(1.0 / best)
        if not xs:
            continue
        (line,) = ax.step(xs, ys, where="post", label=res.layer if labelled else None, alpha=0.8)
        if confirmed and res.layer in confirmed:
            ax.plot([xs[-1]], [confirmed[res.layer]], marker="o", ls="none", color=line.get_color())
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("finished trial")
    ax.set_ylabel("best speedup over default config" + (" (llvm-mca estimate)" if estimate else ""))
    title = "ubpdsl tune: tuning history" + (" -- ESTIMATE" if estimate else "")
    if confirmed:
        title += "\n(dot: the final confirmation run, as in the summary table)"
    ax.set_title(title, fontsize="medium")
    if labelled:
        ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _machine() -> dict[str, Any]:
    import platform

    import optuna

    from ubpdsl.autotune.measure import machine_info
    from ubpdsl.runtime.toolchain import toolchain_versions

    return {**machine_info(), "platform": platform.platform(), "toolchain": toolchain_versions(),
            "optuna": optuna.__version__, "numpy": np.__version__}


@click.command("tune")
@click.option("--mask", "mask_path", required=True, type=click.Path(dir_okay=False), help="masks.npz")
@click.option("--target", default="host", show_default=True, help=", ".join(TARGET_NAMES))
@click.option("--trials", default=DEFAULT_TRIALS, show_default=True, help="finished trials per layer (a rerun tops up)")
@click.option("--storage", default=None, help="Optuna storage URL (default: SQLite in the cache dir); "
              "postgresql://user:pw@host/db shares studies across machines")
@click.option("-o", "--out", "out_dir", default="build", show_default=True, type=click.Path(file_okay=False))
@click.option("--layer", "layer_names", multiple=True, help="tune only this layer (repeatable)")
@click.option("--pixels", default=None, type=int, help="n (GEMM columns: output pixels x batch) for every layer "
              "that neither --model nor --pixels-map gives one")
@click.option("--pixels-map", default=None, type=click.Path(dir_okay=False), help="JSON {layer: n}")
@model_options(what="Each layer's n comes from running its example input once (with --batch).")
@click.option("-j", "--jobs", default=2, show_default=True, help="parallel compile workers (0: in process)")
@click.option("--timeout", default=20.0, show_default=True, help="seconds before a hanging candidate is killed")
@click.option("--runner", default=None, help="time on another machine: ssh://user@host[:port]")
@click.option("--ssh-option", "ssh_options", multiple=True, help="extra ssh option, e.g. -oIdentityFile=key")
@click.option("--force", is_flag=True, help="ignore the tuned-config cache (the study still resumes)")
@click.option("--synthetic-weights", is_flag=True, help="masks without weights: time data-driven kernels on "
              "random weights (no packed weights are written)")
@click.option("--seed", default=0, show_default=True)
@click.option("--no-dense", is_flag=True, help="skip the dense torch.mm comparison")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--variant", "variants", multiple=True, metavar="NAME|FILE.py:NAME",
              help="search only these kernels (repeatable): shipped variants or your own @ubl.kernel with "
              "its tune= knobs (docs/dsl.md); default: every shipped variant")
@click.option("--cache", "cache", default="cold", show_default=True, metavar="cold|warm",
              help="timing mode. cold: the caches are scrubbed (8 MiB copied) before every timed call, because "
              "a layer in a network runs after other layers and its operands are not in cache; configs that "
              "win warm can lose 2-4x cold. warm: back-to-back calls with the operands cached (a "
              "microbenchmark). Warm and cold results are cached and stored separately; llvm-mca estimates "
              "ignore it")
@click.option("--patterns", "patterns", is_flag=True,
              help="tune the direct 3x3 convolution kernels of --mask's pattern layers instead "
              "(every point of the kernels' tune= spaces; host: timed warm, AArch64: "
              "instructions under qemu); needs --image")
@click.option("--image", default=None, metavar="H,W", help="with --patterns: the image size of the pattern layers")
def tune(mask_path: str, target: str, trials: int, storage: str | None, out_dir: str, layer_names: tuple[str, ...],
         pixels: int | None, pixels_map: str | None, model_spec: str | None, weights: Path | None,
         input_shape: str | None, input_dtype: str | None, batch: int, jobs: int, timeout: float, runner: str | None,
         ssh_options: tuple[str, ...], force: bool, synthetic_weights: bool, seed: int, no_dense: bool,
         no_progress: bool, cache: str, variants: tuple[str, ...], patterns: bool,
         image: str | None) -> None:
    """Tune the kernel of every layer of a masks.npz and write the fastest .so files.

    \b
    Example:
      ubpdsl tune --mask masks.npz --model mobilenetv2 -o build/
      ubpdsl tune --mask masks.npz --model mynet.py:TinyResNet --input-shape 3,32,32 --batch 8
      ubpdsl tune --mask masks.npz --target aarch64-sve          # llvm-mca estimate
      ubpdsl tune --mask masks.npz --pixels 196 --variant mykernels.py:my_kernel --variant wros
      ubpdsl tune --mask masks.npz --storage postgresql://tuner@db/ubp --trials 64
    Interrupted runs resume where they stopped; unchanged layers come from the cache.
    """
    if patterns:
        from ubpdsl.autotune.pattern import tune_pattern_layers
        from ubpdsl.compiler import parse_image
        from ubpdsl.runtime.targets import get_target

        if image is None:
            raise UbpError("--patterns needs --image H,W (the image size the pattern layers run on)")
        get_target(target)
        tune_pattern_layers(mask_path, mask_path, parse_image(image), target=target, out_dir=out_dir,
                            layers=layer_names, variants=variants, echo=click.echo)
        return
    loaded = None
    if model_spec is not None:
        loaded = load_model(model_spec, weights, input_shape, input_dtype, batch, pretrained=False)
    elif weights or input_shape or input_dtype or batch != 1:
        raise UbpError("--weights, --input-shape, --input-dtype and --batch need --model")
    run_tune(mask_path, target=target, trials=trials, storage=storage, out_dir=out_dir, layer_names=layer_names,
             pixels=pixels, pixels_map=pixels_map, model=loaded, jobs=jobs, timeout=timeout, runner=runner,
             ssh_options=ssh_options, force=force, synthetic_weights=synthetic_weights, seed=seed,
             dense=not no_dense, progress=not no_progress, cache=cache, variants=variants)
