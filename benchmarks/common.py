"""Shared benchmark helpers: the shape suite, machine header, interleaved median timing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# name: (M, K, n) from ../shared/design/BENCHMARKS.md
SUITE: dict[str, tuple[int, int, int]] = {
    "mbv2_1": (96, 16, 12544),
    "mbv2_2": (144, 24, 3136),
    "mbv2_3": (192, 32, 784),
    "mbv2_4": (384, 64, 196),
    "mbv2_5": (576, 96, 196),
    "mbv2_6": (960, 160, 49),
    "mbv2_7": (1280, 320, 49),
    "r18_1": (64, 576, 3136),
    "r18_2": (128, 1152, 784),
    "r18_3": (256, 2304, 196),
    "r18_4": (512, 4608, 49),
    "fc_1": (1536, 384, 128),
    "fc_2": (384, 1536, 128),
}


def machine_header() -> str:
    """CPU model, ISA and library versions, printed above every table."""
    import torch

    from ubpdsl.runtime.targets import host_target
    from ubpdsl.runtime.toolchain import toolchain_versions

    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tgt = host_target()
    tools = toolchain_versions()
    return (f"# machine: {model}, {platform.machine()}, llc cpu {tgt.cpu}, vector {tgt.vector_bits} bits\n"
            f"# python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
            f"(threads {torch.get_num_threads()}), llvm {tools.get('llvm', '?')}\n"
            f"# single thread; medians of interleaved repetitions")


def interleaved_medians(fns: dict[str, Callable[[], object]], min_time: float = 0.3,
                        max_reps: int = 200) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved round-robin to cancel drift."""
    for f in fns.values():  # warm-up
        f()
        f()
    # calibrate: how many rounds fit in ~min_time
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    round_time = max(time.perf_counter() - t0, 1e-6)
    reps = int(min(max_reps, max(5, min_time / round_time)))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            samples[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in samples.items()}


def geomean(values: list[float]) -> float:
    vals = [v for v in values if v > 0]
    return float(np.exp(np.mean(np.log(vals)))) if vals else float("nan")
