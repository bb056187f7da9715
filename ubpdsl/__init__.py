"""ubpdsl: unaligned block pruning (UBP) for fast sparse inference on mobile CPUs.

Subpackages: ``ubpdsl.prune`` (BED and reference selectors, sparsifier, masks.npz),
``ubpdsl.language`` (the kernel DSL), ``ubpdsl.kernels`` (shipped kernel variants),
``ubpdsl.dialects`` (the ``ubp`` MLIR dialect and its lowering), ``ubpdsl.runtime``
(build, load, run on host and under qemu) and ``ubpdsl.autotune``. ``ubpdsl.run_kernel``
builds and runs any kernel on arrays; ``ubpdsl.testing.do_bench`` times functions.
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import ubpdsl` stays light
    """``ubpdsl.run_kernel`` (:func:`ubpdsl.testing.run_kernel`), imported on first use."""
    if name == "run_kernel":
        from ubpdsl.testing import run_kernel

        return run_kernel
    raise AttributeError(f"module 'ubpdsl' has no attribute {name!r}")
