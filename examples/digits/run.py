"""The digits example end to end: the same pipeline as ``make demo`` (``python -m ubpdsl.demo``).

    .venv/bin/python examples/digits/run.py                    # ~1-2 min on 2 cores
    .venv/bin/python examples/digits/run.py --trials 12        # tune longer
    .venv/bin/python examples/digits/run.py --no-tune --quick  # smoke run

The steps live in :mod:`ubpdsl.demo` (train, prune with BED, tune, export, swap in the kernels,
check the AArch64 kernels under qemu); README.md walks through them with the API calls.
"""

from __future__ import annotations

import sys

from ubpdsl.demo import main

if __name__ == "__main__":  # the tuner compiles in spawned worker processes
    sys.exit(main(sys.argv[1:]))
