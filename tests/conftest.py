"""Shared test setup: a private compile cache per test session, single-threaded numerics."""

from __future__ import annotations

import os
import tempfile

import pytest

# Every test session compiles into its own cache, so results never depend on old builds.
_CACHE = tempfile.mkdtemp(prefix="ubpdsl-test-cache-")
os.environ.setdefault("UBPDSL_CACHE_DIR", _CACHE)


@pytest.fixture(scope="session")
def compile_cache():
    from ubpdsl.runtime.cache import CompileCache

    return CompileCache(os.environ["UBPDSL_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _one_thread_no_ftz():
    """Every test runs torch single-threaded (tiny layers: intra-op threads only spin against
    each other on a shared machine) and restores the process state afterwards. Benchmarks turn
    on flush-to-zero (torch BSR is slow on denormals); it is process-wide and would make
    hypothesis see the smallest subnormal as 0, so no test may leak it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    torch.set_flush_denormal(False)
