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
def _restore_denormals():
    """Benchmarks turn on flush-to-zero (torch BSR is slow on denormals); it is process-wide
    and would make hypothesis see the smallest subnormal as 0, so no test may leak it."""
    yield
    import torch

    torch.set_flush_denormal(False)
