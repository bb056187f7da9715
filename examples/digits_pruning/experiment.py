"""Gradual pruning of a small CNN on scikit-learn's digits: BED (unaligned) vs aligned vs unstructured.

For each seed: train the dense ``digits-cnn``, then from that same dense checkpoint prune
gradually (cubic schedule, masks re-selected every 2 epochs) to 50 / 75 / 90 % sparsity
(two configurations of which layers are pruned, see ``CONFIGS``)
with N = 4 blocks chosen by BED (unaligned), aligned N x 1 blocks, or single weights
(unstructured), and fine-tune; every method gets the same schedule, optimizer and
number of steps. Test accuracy (mean +- std over seeds) goes to a markdown table.

    .venv/bin/python examples/digits_pruning/experiment.py            # full run: 3 seeds, ~5-10 min
    .venv/bin/python examples/digits_pruning/experiment.py --quick    # smoke run, 1 seed

Each run uses one intra-op thread and runs go to ``--workers`` processes (default 2,
one per core): the convolutions here are tiny, and two OpenMP threads per process only
spin against each other (and against anything else on the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from ubpdsl.models import DigitsCNN, digits_data
from ubpdsl.prune.schedule import CubicSchedule
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.prune.trainer import evaluate, fit

HERE = Path(__file__).resolve().parent
METHODS = ("bed", "aligned", "unstructured")
SPARSITIES = (0.5, 0.75, 0.9)


@dataclass(frozen=True)
class Settings:
    block: int = 4
    batch_size: int = 64
    dense_epochs: int = 40
    dense_lr: float = 0.05
    prune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ramp_updates: int = 8  # n in the cubic schedule: n + 1 mask updates
    epochs_per_update: int = 2  # dt, in epochs
    finetune_epochs: int = 10  # after the last mask update
    importance: str = "abs"


# Which layers stay dense. The 16x9 first conv (1.5 % of the weights) always does. The
# classifier (10x256) has R = 10, not a multiple of N = 4: aligned blocks can never cover
# its rows 8 and 9 (the classes "8" and "9"), so the second configuration keeps it dense to
# compare the selectors where both block kinds can reach every row.
CONFIGS = {
    "prune conv2, conv3, fc": ("conv1",),
    "prune conv2, conv3 (fc dense)": ("conv1", "fc"),
}


def _steps_per_epoch(n_train: int, batch_size: int) -> int:
    return n_train // batch_size


def _sgd(model: torch.nn.Module, lr: float, s: Settings) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def train_dense(seed: int, s: Settings) -> tuple[dict[str, torch.Tensor], float]:
    torch.set_num_threads(1)
    x, y, xt, yt = digits_data()
    torch.manual_seed(seed)
    model = DigitsCNN()
    steps = s.dense_epochs * _steps_per_epoch(len(y), s.batch_size)
    opt = _sgd(model, s.dense_lr, s)
    fit(
        model,
        x,
        y,
        opt,
        steps,
        s.batch_size,
        seed=seed,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
    )
    return model.state_dict(), evaluate(model, xt, yt)


def prune_run(
    config: str, seed: int, method: str, sparsity: float, dense: dict[str, torch.Tensor], s: Settings
) -> dict:
    torch.set_num_threads(1)
    x, y, xt, yt = digits_data()
    model = DigitsCNN()
    model.load_state_dict(dense)
    spe = _steps_per_epoch(len(y), s.batch_size)
    schedule = CubicSchedule(sparsity, num_updates=s.ramp_updates, update_every=s.epochs_per_update * spe)
    steps = schedule.end_step + 1 + s.finetune_epochs * spe
    sparsifier = UnalignedBlockSparsifier(
        sparsity, block=s.block, method=method, importance=s.importance, skip=CONFIGS[config]
    )
    sparsifier.prepare(model, config=None)
    opt = _sgd(model, s.prune_lr, s)
    t = time.perf_counter()
    updates = fit(
        model,
        x,
        y,
        opt,
        steps,
        s.batch_size,
        seed=1000 + seed,
        sparsifier=sparsifier,
        schedule=schedule,
        lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps),
    )
    seconds = time.perf_counter() - t
    achieved = updates[-1].achieved
    acc = evaluate(model, xt, yt)
    sparsifier.squash_mask()
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model_sparsity = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return {
        "config": config,
        "seed": seed,
        "method": method,
        "sparsity": sparsity,
        "achieved": achieved,
        "model_sparsity": model_sparsity,
        "test_acc": acc,
        "seconds": seconds,
    }


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def markdown_table(config: str, dense_accs: list[float], runs: list[dict], seeds: int) -> str:
    runs = [r for r in runs if r["config"] == config]
    lines = [
        f"**{config}** (sparsity of the pruned layers; test accuracy in %, mean ± std over {seeds} seeds)",
        "",
        "| sparsity | BED (unaligned, N=4) | aligned (N=4) | unstructured |",
        "|---|---|---|---|",
        f"| 0 % (dense) | {_mean_std(dense_accs)} | {_mean_std(dense_accs)} | {_mean_std(dense_accs)} |",
    ]
    for sp in SPARSITIES:
        cells = []
        for method in METHODS:
            accs = [r["test_acc"] for r in runs if r["method"] == method and r["sparsity"] == sp]
            cells.append(_mean_std(accs))
        lines.append(f"| {round(100 * sp)} % | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="1 seed, short training: a smoke test")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    args = ap.parse_args()

    s = Settings()
    seeds = list(range(args.seeds))
    if args.quick:
        s = Settings(dense_epochs=4, ramp_updates=2, epochs_per_update=1, finetune_epochs=1)
        seeds = [0]
    t0 = time.perf_counter()
    ctx = get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        dense_jobs = {seed: pool.submit(train_dense, seed, s) for seed in seeds}
        dense = {seed: job.result() for seed, job in dense_jobs.items()}
        for seed in seeds:
            print(f"seed {seed}: dense test accuracy {100 * dense[seed][1]:.2f} %", flush=True)
        jobs = [
            pool.submit(prune_run, config, seed, method, sp, dense[seed][0], s)
            for config in CONFIGS
            for seed in seeds
            for sp in SPARSITIES
            for method in METHODS
        ]
        runs = []
        for job in jobs:
            r = job.result()
            runs.append(r)
            print(
                f"[{r['config']}] seed {r['seed']} {r['method']:>12} s={r['sparsity']:.2f}: "
                f"achieved {r['achieved']:.4f}, "
                f"(whole model {r['model_sparsity']:.4f}), test {100 * r['test_acc']:.2f} % ({r['seconds']:.1f} s)",
                flush=True,
            )
    elapsed = time.perf_counter() - t0
    dense_accs = [dense[seed][1] for seed in seeds]
    table = "\n\n".join(markdown_table(c, dense_accs, runs, len(seeds)) for c in CONFIGS)
    print()
    print(table)
    print(f"\ntotal wall time {elapsed:.0f} s with {args.workers} workers")
    if not args.quick:
        args.out.write_text(
            json.dumps(
                {
                    "settings": asdict(s),
                    "configs": {c: list(skip) for c, skip in CONFIGS.items()},
                    "seeds": seeds,
                    "dense_test_acc": {str(seed): dense[seed][1] for seed in seeds},
                    "runs": runs,
                    "wall_seconds": elapsed,
                    "torch": torch.__version__,
                },
                indent=2,
            )
            + "\n"
        )
        (HERE / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
