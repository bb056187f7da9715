"""BED speed and quality: prints numbers (not a test).

1. BED on every 1x1 convolution of the pretrained MobileNetV2 (|w| importance, 75 %, N = 4): total time.
2. BED vs the exact optimum on a 1024x1024 Gaussian matrix (75 %, N = 4): times, speed-up, score ratio.
3. BED / optimum kept-score ratio on the full-size MobileNetV2 1x1 layers at 50/75/90 % and N = 2/4/8
   (aligned blocks for comparison).

Single-threaded, candidates interleaved in one process, medians of repetitions.
Run: ``.venv/bin/python benchmarks/bench_bed.py [--quick]``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ubpdsl.prune.selectors import (  # noqa: E402
    aligned_select,
    bed_select,
    budget,
    importance,
    kept_score,
    optimal_select,
)


def machine_info() -> str:
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (
        f"cpu: {cpu} ({os.cpu_count()} logical cores, load avg {os.getloadavg()[0]:.2f})\n"
        f"python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"{platform.system()} {platform.machine()}"
    )


def timed(fn, reps: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def mobilenet_layers() -> list[tuple[str, np.ndarray]]:
    import torch

    from ubpdsl.pretrained import mobilenet_v2_state_dict

    torch.set_num_threads(1)
    sd = mobilenet_v2_state_dict()
    return [
        (k.removesuffix(".weight"), importance(v.reshape(v.shape[0], -1)))
        for k, v in sd.items()
        if v.ndim == 4 and v.shape[2:] == (1, 1)
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip the full-size quality sweep")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    print(machine_info())
    layers = mobilenet_layers()
    n_w = sum(a.size for _, a in layers)

    # 1. all MobileNetV2 1x1 layers at 75 %, N = 4
    def all_layers():
        return [bed_select(a, budget(*a.shape, 4, 0.75), 4) for _, a in layers]

    all_layers()  # warm-up
    t_bed, _ = timed(all_layers, args.reps)
    blocks = sum(budget(*a.shape, 4, 0.75) for _, a in layers)
    print(
        f"\n[1] MobileNetV2: BED on all {len(layers)} 1x1 conv layers ({n_w} weights, {blocks} blocks), "
        f"75 %, N=4: {t_bed * 1e3:.0f} ms total (median of {args.reps}; target < 1000 ms)"
    )

    # 2. 1024x1024 Gaussian, BED vs optimal, interleaved
    sc = importance(np.random.default_rng(0).standard_normal((1024, 1024)))
    m = budget(1024, 1024, 4, 0.75)
    bed_select(sc, m, 4)
    tb, tob = [], []
    for _ in range(max(2, args.reps // 2)):
        t, b = timed(lambda: bed_select(sc, m, 4), 1)
        tb.append(t)
        t, o = timed(lambda: optimal_select(sc, m, 4), 1)
        tob.append(t)
    t_b, t_o = statistics.median(tb), statistics.median(tob)
    s_b, s_o = kept_score(sc, *b, 4), kept_score(sc, *o, 4)
    s_a = kept_score(sc, *aligned_select(sc, m, 4), 4)
    print(
        f"\n[2] 1024x1024 Gaussian |w|, 75 %, N=4 (m={m}): BED {t_b * 1e3:.0f} ms, optimal {t_o * 1e3:.0f} ms "
        f"-> BED {t_o / t_b:.1f}x faster (target >= 20x)\n"
        f"    kept score: BED/optimal {s_b / s_o:.5f}, aligned/optimal {s_a / s_o:.5f}"
    )

    if args.quick:
        return
    # 3. quality on the full-size MobileNetV2 1x1 layers
    print("\n[3] MobileNetV2 1x1 layers, full size: kept |w| relative to the optimum (per layer)")
    print("    sparsity  N   BED mean   BED min    aligned mean   BED time   optimal time")
    for s in (0.5, 0.75, 0.9):
        for N in (2, 4, 8):
            rb, ra, tb_sum, to_sum = [], [], 0.0, 0.0
            for _, a in layers:
                mm = budget(*a.shape, N, s)
                t0 = time.perf_counter()
                b = bed_select(a, mm, N)
                t1 = time.perf_counter()
                o = optimal_select(a, mm, N)
                t2 = time.perf_counter()
                tb_sum += t1 - t0
                to_sum += t2 - t1
                so = kept_score(a, *o, N)
                rb.append(kept_score(a, *b, N) / so)
                ra.append(kept_score(a, *aligned_select(a, mm, N), N) / so)
            print(
                f"    {s:7.0%}  {N}   {np.mean(rb):.5f}    {np.min(rb):.5f}    {np.mean(ra):.5f}"
                f"        {tb_sum * 1e3:6.0f} ms  {to_sum * 1e3:7.0f} ms"
            )


if __name__ == "__main__":
    main()
