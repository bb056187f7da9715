"""Kernel variants shipped with ubpdsl, written in the DSL (see library.py)."""

from ubpdsl.kernels.library import VARIANTS, aligned_rows, block_stream, wros, wros_unrolled

__all__ = ["VARIANTS", "aligned_rows", "block_stream", "wros", "wros_unrolled"]
