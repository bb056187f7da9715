"""BED speed and quality: prints numbers (not a test).

1. BED on every 1x1 convolution of the pretrained MobileNetV2 (|w| importance, 75 %, N = 4): total time,
   native engine and numpy engine.
2. BED (native and numpy engines) vs the exact optimum on a 1024x1024 Gaussian matrix (75 %, N = 4):
   times, speed-ups, score ratio.
3. BED / optimum kept-score ratio on the full-size MobileNetV2 1x1 layers at 50/75/90 % and N = 2/4/8
   (aligned blocks for comparison).

Single-threaded, candidates interleaved in one process, medians of repetitions; speed-ups are ratios of
medians from the same run.  The engine is switched with ``UBPDSL_BED_ENGINE`` (read at every call).
Run: ``.venv/bin/python benchmarks/bench_bed.py [--quick]``.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from ubpdsl.prune import bed_native  # noqa: E402
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


@contextlib.contextmanager
def bed_engine(name: str):
    """Run BED on engine ``name`` (``native`` or ``numpy``) inside the block."""
    old = os.environ.get("UBPDSL_BED_ENGINE")
    os.environ["UBPDSL_BED_ENGINE"] = name
    try:
        yield
    finally:
        if old is None:
            del os.environ["UBPDSL_BED_ENGINE"]
        else:
            os.environ["UBPDSL_BED_ENGINE"] = old


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
    if bed_native.engine() != "native":
        raise SystemExit(f"native BED engine unavailable: {bed_native.LOAD_ERROR}")
    layers = mobilenet_layers()
    n_w = sum(a.size for _, a in layers)

    # 1. all MobileNetV2 1x1 layers at 75 %, N = 4
    def all_layers():
        return [bed_select(a, budget(*a.shape, 4, 0.75), 4) for _, a in layers]

    t_all = {}
    for name in ("native", "numpy"):
        with bed_engine(name):
            all_layers()  # warm-up (and the native build)
            t_all[name], _ = timed(all_layers, args.reps)
    blocks = sum(budget(*a.shape, 4, 0.75) for _, a in layers)
    print(
        f"\n[1] MobileNetV2: BED on all {len(layers)} 1x1 conv layers ({n_w} weights, {blocks} blocks), 75 %, N=4 "
        f"(median of {args.reps}; target < 1000 ms):\n"
        f"    native {t_all['native'] * 1e3:.1f} ms, numpy {t_all['numpy'] * 1e3:.0f} ms"
    )

    # 2. 1024x1024 Gaussian, BED (both engines) vs optimal, interleaved
    sc = importance(np.random.default_rng(0).standard_normal((1024, 1024)))
    m = budget(1024, 1024, 4, 0.75)
    for name in ("native", "numpy"):
        with bed_engine(name):
            bed_select(sc, m, 4)  # warm-up
    tn, tp, tob = [], [], []
    for _ in range(max(3, args.reps)):
        with bed_engine("native"):
            t, b = timed(lambda: bed_select(sc, m, 4), 1)
        tn.append(t)
        with bed_engine("numpy"):
            t, bp = timed(lambda: bed_select(sc, m, 4), 1)
        tp.append(t)
        t, o = timed(lambda: optimal_select(sc, m, 4), 1)
        tob.append(t)
    same = all(np.array_equal(x, y) for x, y in zip(b, bp, strict=True))
    t_n, t_p, t_o = (statistics.median(x) for x in (tn, tp, tob))
    s_b, s_o = kept_score(sc, *b, 4), kept_score(sc, *o, 4)
    s_a = kept_score(sc, *aligned_select(sc, m, 4), 4)
    print(
        f"\n[2] 1024x1024 Gaussian |w|, 75 %, N=4 (m={m}), median of {len(tn)}:\n"
        f"    BED native {t_n * 1e3:.1f} ms, BED numpy {t_p * 1e3:.0f} ms, optimal {t_o * 1e3:.0f} ms\n"
        f"    -> native BED {t_o / t_n:.1f}x faster than optimal (target >= 20x), "
        f"{t_p / t_n:.1f}x faster than numpy BED; engines agree: {same}\n"
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
