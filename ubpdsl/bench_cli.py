"""``ubpdsl bench``: our kernels beside every peer runtime, measured the same way, in one run.

Writes ``results.csv``, ``report.md`` and a PNG plot (speedup over dense vs sparsity, per shape)
into ``--out``; the logic lives in :mod:`ubpdsl.benchsuite`.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ubpdsl.cli_common import load_model, model_options
from ubpdsl.errors import UbpError
from ubpdsl.runtime.targets import TARGET_NAMES

__all__ = ["bench"]


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UbpError(f"--{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UbpError(f"--{what} is empty")
    return vals


def _ints(text: str, what: str, allowed: set[int] | None = None) -> list[int]:
    try:
        vals = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UbpError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not vals:
        raise UbpError(f"--{what} is empty")
    if allowed is not None:
        bad = [v for v in vals if v not in allowed]
        if bad:
            raise UbpError(f"--{what} {bad[0]} is not one of {sorted(allowed)}")
    return vals


def _arm_bench(target: str, shapes: str | None, sparsity: str | None, block: str | None, quick: bool,
               vl: str | None, consts: tuple[str, ...], out_dir: str) -> None:
    """``--target aarch64-*``: instruction counts under qemu and llvm-mca estimates (ubpdsl.armcost)."""
    import shlex
    import sys

    from ubpdsl import armcost
    from ubpdsl import benchsuite as bs
    from ubpdsl.compile_cli import parse_constants

    sps = _floats(sparsity, "sparsity") if sparsity else ([0.75] if quick else [0.75, 0.9])
    blocks = _ints(block, "block", {2, 4, 8}) if block else ([4] if quick else list(bs.BLOCKS))
    names = [s.strip() for s in shapes.split(",") if s.strip()] if shapes else (
        ["mbv2_3", "fc_2"] if quick else list(bs.SUITE))
    vls: list[int | None] | None = None
    if target == "aarch64-sve":
        vls = list(_ints(vl, "vl", {128, 256, 512})) if vl else ([256] if quick else None)
    elif vl:
        raise UbpError("--vl applies to --target aarch64-sve only")
    constants = parse_constants(consts)
    specs = bs.shape_cases(names, sps, blocks, pretrained=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    def progress(case, rows) -> None:
        msg = ", ".join(f"{r.kernel} VL{r.vl_bits} {r.per_lane:.3f}" for r in rows)
        click.echo(f"{case.label}: insns/lane {msg}  ({time.perf_counter() - t0:.0f}s)", err=True)

    rows = armcost.run_cases(specs, target, vls=vls, constants=constants, progress=progress)
    stem = f"arm_counts_{target.split('-')[1]}"
    armcost.write_csv(rows, out / f"{stem}.csv")
    command = "ubpdsl bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    (out / f"{stem}.md").write_text(armcost.render_markdown(rows, command))
    for it in armcost.summary(rows):
        mca = ", ".join(f"{k[4:]} {armcost.mca_text(v, it.get(f'mca_floor_{k[4:]}'))}" for k, v in it.items()
                        if k.startswith("mca_") and not k.startswith("mca_floor_"))
        click.echo(f"{it['target']} VL {it['vl_bits']} N={it['N']} {it['sparsity']:.0%} {it['kernel']}: "
                   f"{it['insns_per_lane']:.3f} instructions per useful lane (count)"
                   + (f"; llvm-mca cycles/lane (estimate) {mca}" if mca else ""))
    click.echo(f"wrote {out / (stem + '.csv')}, {out / (stem + '.md')} in {time.perf_counter() - t0:.0f}s", err=True)


@click.command("bench")
@click.option("--suite", type=click.Choice(["shapes", "mobilenetv2"]), default="shapes", show_default=True,
              help="shapes: the 13-shape suite (random weights; mbv2_* also with the pretrained layer); "
                   "mobilenetv2: MobileNetV2's own 1x1 convolutions with BED masks on the pretrained weights.")
@click.option("--mask", "mask_path", type=click.Path(dir_okay=False), default=None,
              help="Benchmark the layers of this masks.npz instead of a suite.")
@click.option("--shapes", default=None, help="Comma-separated subset of the shape suite (e.g. r18_2,fc_1).")
@click.option("--sparsity", default=None, help="Comma-separated sparsities [default: 0.5,0.75,0.9; quick: 0.75].")
@click.option("--block", default=None, help="Comma-separated block sizes N [default: 2,4,8; quick: 4].")
@click.option("--quick", is_flag=True, help="One sparsity, N=4, default kernel constants, 1 thread, short timing.")
@click.option("--threads", default=None, help="Thread counts to time [default: 1,2; quick: 1].")
@click.option("--tuner", type=click.Choice(["sweep", "autotune", "default"]), default=None,
              help="How our kernels are tuned [default: sweep; quick: default constants].")
@click.option("--trials", type=int, default=8, show_default=True, help="Trials per layer for --tuner autotune.")
@click.option("--min-time", type=float, default=None, help="Seconds of interleaved timing per case [0.3; quick 0.1].")
@click.option("--cache", type=click.Choice(["cold", "warm"]), default="cold", show_default=True,
              help="Cache state of every timed call (and of tuning): cold scrubs the caches first, as for a "
                   "layer inside a network; warm runs the same call once right before.")
@click.option("--pixels", type=int, default=None, help="n (GEMM columns) for every --mask layer that neither "
              "--model nor --pixels-map gives one.")
@click.option("--pixels-map", default=None, type=click.Path(dir_okay=False), help="JSON {layer: n} for --mask.")
@model_options(what="With --mask: each layer's n comes from running its example input once (with --batch).")
@click.option("--variant", default="wros", show_default=True, metavar="NAME|FILE.py:NAME",
              help="the kernel of our unaligned runner: a shipped variant or your own @ubl.kernel (docs/dsl.md)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="bench-out", show_default=True,
              help="Directory for results.csv, report.md and the plot.")
@click.option("--target", type=click.Choice(TARGET_NAMES), default="host",
              show_default=True, help="aarch64-*: no timing; executed-instruction counts per useful lane under "
                                      "qemu and llvm-mca cycle estimates, UBP (wros) beside ABP (aligned_rows).")
@click.option("--vl", default=None, help="SVE vector lengths to count, comma-separated bits [128,256,512; quick 256].")
@click.option("--const", "consts", multiple=True, help="KEY=VALUE kernel constant for --target aarch64-* runs.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="PNG plot path [default: OUT/speedup.png].")
def bench(suite: str, mask_path: str | None, shapes: str | None, sparsity: str | None, block: str | None,
          quick: bool, threads: str | None, tuner: str | None, trials: int, min_time: float | None,
          cache: str, pixels: int | None, pixels_map: str | None, model_spec: str | None, weights: Path | None,
          input_shape: str | None, input_dtype: str | None, batch: int, variant: str, out_dir: str, target: str,
          vl: str | None, consts: tuple[str, ...], plot_path: str | None) -> None:
    """Time ubpdsl's kernels beside dense torch.mm, numpy, scipy, torch and MLIR sparse.

    Every runner's output is checked against dense torch first (a wrong one is reported, not
    timed); timings are interleaved medians, speedups are over the fastest dense library (torch.mm
    or numpy) of each case in the same run.

    \b
    Example:
      ubpdsl bench --suite mobilenetv2 --quick --out bench-out
      ubpdsl bench --shapes r18_2,fc_1 --sparsity 0.9 --block 4 --threads 1
      ubpdsl bench --mask masks.npz --model mobilenetv2 --plot masks.png
      ubpdsl bench --variant mykernels.py:my_kernel --quick --shapes fc_2
      ubpdsl bench --target aarch64-neon --block 4 --out docs
    """
    if target != "host":
        if variant != "wros":
            raise UbpError("--variant is for host timing runs; --target aarch64-* counts wros and aligned_rows")
        if mask_path or suite != "shapes":
            raise UbpError("--target aarch64-* runs the shape suite only (use --shapes to subset)")
        _arm_bench(target, shapes, sparsity, block, quick, vl, consts, out_dir)
        return
    from ubpdsl import benchsuite as bs
    from ubpdsl.kernels import variant_name

    variant = variant_name(variant)  # loads (and checks) a user kernel before anything runs

    sps = _floats(sparsity, "sparsity") if sparsity else ([0.75] if quick else list(bs.SPARSITIES))
    bad = [s for s in sps if not 0 <= s < 1]
    if bad:
        raise UbpError(f"--sparsity {bad[0]} is outside [0, 1)")
    blocks = _ints(block, "block", {2, 4, 8}) if block else ([4] if quick else list(bs.BLOCKS))
    nts = _ints(threads, "threads", {1, 2}) if threads else ([1] if quick else [1, 2])
    if 1 not in nts:
        raise UbpError("--threads must include 1 (dense torch.mm at 1 thread is the main baseline)")
    how = tuner or ("default" if quick else "sweep")
    if how == "autotune":
        tuner_fn = bs.autotune_tuner(trials)
    elif how == "sweep":
        tuner_fn = bs.sweep_tuner(cache=cache)
    else:
        tuner_fn = bs.default_tuner()
    mt = min_time if min_time is not None else (0.1 if quick else 0.3)

    if mask_path:
        if not Path(mask_path).is_file():
            raise UbpError(f"--mask {mask_path}: no such file")
        from ubpdsl.masks import load_masks
        from ubpdsl.models import layer_columns

        loaded = None
        if model_spec is not None:
            loaded = load_model(model_spec, weights, input_shape, input_dtype, batch, pretrained=False)
        columns = layer_columns(load_masks(mask_path), pixels=pixels, pixels_map=pixels_map, loaded=loaded)
        specs = bs.mask_cases(mask_path, columns)
        title = f"ubpdsl bench: {Path(mask_path).name}"
    elif suite == "mobilenetv2":
        specs = bs.mobilenetv2_cases(sps, blocks)
        title = "ubpdsl bench: MobileNetV2 1x1 convolutions (pretrained weights, BED masks)"
    else:
        names = [s.strip() for s in shapes.split(",") if s.strip()] if shapes else list(bs.SUITE)
        specs = bs.shape_cases(names, sps, blocks)
        title = "ubpdsl bench: shape suite"
    if not specs:
        raise UbpError("nothing to benchmark (no layers or cases selected)")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = Path(plot_path) if plot_path else out / "speedup.png"
    info = bs.machine_info()
    bw = bs.copy_bandwidth()
    click.echo(f"{info['cpu']} ({info['isa']}); copy bandwidth {bw:.1f} GB/s; {len(specs)} cases, "
               f"threads {nts}, tuner {how}, {cache} caches", err=True)
    t0 = time.perf_counter()

    def progress(i: int, case: bs.Case, res: list[bs.Result]) -> None:
        one = {r.runner: r for r in res if r.threads == 1}
        ours = one.get("ubp")
        peers = [r for r in one.values() if r.family in ("peer", "dense") and r.status == "ok"]
        best = max(peers, key=lambda r: r.speedup) if peers else None
        bad = [r.runner for r in res if r.status == "wrong"]
        msg = (f"[{i + 1}/{len(specs)}] {case.label}: ours "
               f"{ours.speedup:.2f}x dense" if ours and ours.status == "ok" else
               f"[{i + 1}/{len(specs)}] {case.label}: ours {ours.status if ours else 'missing'}")
        if best:
            msg += f", best peer {best.runner} {best.speedup:.2f}x"
        if "ubp_abp" in one and one["ubp_abp"].status == "ok":
            msg += f", our aligned {one['ubp_abp'].speedup:.2f}x"
        if bad:
            msg += f", WRONG: {', '.join(bad)}"
        click.echo(msg + f"  ({time.perf_counter() - t0:.0f}s)", err=True)

    results = bs.run_suite(specs, tuner=tuner_fn, threads=nts, min_time=mt, progress=progress, bandwidth=bw,
                           cache=cache, variant=variant)
    csv_path = out / "results.csv"
    bs.write_csv(results, csv_path)
    bs.plot_speedups(results, plot)
    try:
        rel = str(plot.resolve().relative_to(out.resolve()))
    except ValueError:
        rel = str(plot)
    md = bs.render_markdown(results, info, nts, bw, title, rel, cache)
    (out / "report.md").write_text(md + f"\nRun: `ubpdsl bench` ... in {time.perf_counter() - t0:.0f} s, "
                                   f"tuner {how}, {cache} caches, min-time {mt}.\n")
    click.echo(f"wrote {csv_path}, {out / 'report.md'}, {plot} in {time.perf_counter() - t0:.0f}s", err=True)
    for s in bs.summarize(results, 1).sparsities:
        sm = bs.summarize(results, 1)
        ours = sm.vs_dense.get("ubp", {}).get(s, float("nan"))
        click.echo(f"sparsity {s:.0%}: ours {ours:.2f}x dense, {sm.ours_vs_best_peer.get(s, float('nan')):.2f}x "
                   f"best peer, aligned kernel / ours {sm.ours_vs_abp.get(s, float('nan')):.2f}")
