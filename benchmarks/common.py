"""Shared benchmark helpers: the shape suite, machine header, interleaved median timing."""

from __future__ import annotations

import os
import platform

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ubpdsl.benchsuite import SUITE, geomean, interleaved_medians  # noqa: E402,F401 - one definition, shared


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
