"""ubpdsl: unaligned block pruning (UBP) for fast sparse inference on mobile CPUs.

Subpackages: ``ubpdsl.prune`` (BED and reference selectors, sparsifier, masks.npz),
``ubpdsl.language`` (the kernel DSL), ``ubpdsl.kernels`` (shipped kernel variants),
``ubpdsl.dialects`` (the ``ubp`` MLIR dialect and its lowering), ``ubpdsl.runtime``
(build, load, run on host and under qemu) and ``ubpdsl.autotune``.
"""

__version__ = "0.1.0"
