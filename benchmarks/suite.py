"""The full benchmark run against the peers: CSV, markdown report and PNG plot into a directory.

A thin script around :mod:`ubpdsl.benchsuite` (the same code as ``ubpdsl bench``), kept here so
the suite can run from a checkout:

    python benchmarks/suite.py --out docs/bench            # the full suite (~30 min on 2 cores)
    python benchmarks/suite.py --suite mobilenetv2 --quick # under 2 minutes

Every option of ``ubpdsl bench --help`` is accepted.
"""

from __future__ import annotations

import sys

from ubpdsl.cli import main


def run(argv: list[str] | None = None) -> int:
    """Run ``ubpdsl bench`` with ``argv`` (default: the command line)."""
    return main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":  # the compile pool spawns workers that re-import this file
    sys.exit(run())
