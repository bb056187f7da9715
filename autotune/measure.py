"""The timing worker: a stdlib-only script that times kernels in its own process.

The tuner runs this file as a fresh subprocess for every candidate (``python3 measure.py``,
a JSON request on stdin, a JSON result on stdout), locally or on a remote machine after
shipping it with the ``.so`` files. A candidate that segfaults or never returns takes only
this process down; the parent records it as failed and goes on. It imports nothing but the
standard library (plus torch when a dense ``torch.mm`` entry is asked for), so any machine
with a ``python3`` can time kernels.

Request::

    {"n": 196, "warmup": 3, "rounds": 15, "budget_s": 0.4, "sample_s": 2e-4,
     "entries": [{"name": "ref", "so": "a.so", "symbol": "ubp_x", "M": 64, "K": 32, "packed": "a.bin"},
                 {"name": "cand", ...},
                 {"name": "torch.mm", "kind": "torch_mm", "M": 64, "K": 32, "weight": "w.f32"}]}

Optional fields: ``"cache": "warm" | "cold"`` (default ``"warm"``) and ``"scrub_bytes"``
(cold only, default 8 MiB).

Protocol: X is a deterministic pattern (:func:`make_x`, reproducible by the caller), all
buffers are 64-byte aligned and allocated once; every entry is warmed up, then each round
times every entry once (in a fresh seeded random order each round: a kernel can run slower
right after some other code, and a rotating order would keep the same neighbours), so a
candidate and the reference always see the same machine state:

* ``warm``: a sample is ``inner`` back-to-back calls (together >= ``sample_s``), so the
  kernel's operands (X, packed weights, Y) stay in the caches from one call to the next.
* ``cold``: before *every* timed call the caches are scrubbed by copying ``scrub_bytes``
  from one buffer into another (``ctypes.memmove``: every byte of both buffers is read or
  written, ~2x ``scrub_bytes`` of traffic, which evicts X, W and Y from L1/L2), and only the
  kernel call is timed (the clock's own overhead, measured at start-up, is subtracted). A
  sample is one call (``inner`` = 1); there are more rounds instead, as many as fit in
  ``budget_s`` (scrubbing counts toward it). This is how a layer runs inside a network: the
  layers before it have evicted its operands. The two buffers are allocated once.

The loop runs at least ``rounds`` rounds, then more while ``budget_s`` lasts (at most 50x
``rounds``). Results: per entry the median seconds per call, and per entry the median over
rounds of its time divided by entry 0's time in the same round (drift cancels in the ratio),
the number of rounds, ``inner`` and ``scrubs`` (cache scrubs before its timed calls; 0 when
warm); at the top level ``cache``, ``scrub_bytes`` and the total ``scrubs``. ``check``
values are y at fixed positions, for the caller to compare with W @ X.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

try:
    from ubpdsl.errors import UbpError as _ModeError
    from ubpdsl.runtime.kernel_so import load_symbol
except ImportError:  # a bare `python -S measure.py`: kernel_so.py is beside it, or in ../runtime
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, next((d for d in (_here, os.path.join(os.path.dirname(_here), "runtime"))
                             if os.path.isfile(os.path.join(d, "kernel_so.py"))), _here))
    from kernel_so import load_symbol  # type: ignore[no-redef]

    _ModeError = ValueError  # type: ignore[misc,assignment]

_PATTERN_LEN = 4093  # prime: the pattern never lines up with a row of X


def make_x(K: int, n: int) -> bytes:
    """The input X[K, n] (fp32, row-major) as bytes: a fixed pattern of values in [0.5, 1.5)."""
    pattern = struct.pack(f"<{_PATTERN_LEN}f", *[0.5 + ((i * 2654435761) % 1000) / 1000.0
                                                  for i in range(_PATTERN_LEN)])
    total = K * n * 4
    reps = total // len(pattern) + 1
    return (pattern * reps)[:total]


def check_positions(M: int, n: int, count: int = 96) -> list[int]:
    """Flat indices of y compared against the reference: spread out, plus the last column."""
    size = M * n
    pos = {(i * 7919 + 13) % size for i in range(count)}
    step = max(1, M // 16)
    pos.update(r * n + n - 1 for r in range(0, M, step))
    pos.add(size - 1)
    return sorted(pos)


class _Buffer:
    """A 64-byte-aligned, zero-initialised byte buffer."""

    def __init__(self, nbytes: int, data: bytes | None = None) -> None:
        self._raw = ctypes.create_string_buffer(max(1, nbytes) + 64)
        base = ctypes.addressof(self._raw)
        self.addr = (base + 63) // 64 * 64
        if data is not None:
            ctypes.memmove(self.addr, data, len(data))


def _make_call(entry: dict[str, Any], x: _Buffer, xbytes: bytes, n: int) -> tuple[Any, Any]:
    """A zero-argument function running the entry once, and a reader of its output."""
    M, K = int(entry["M"]), int(entry["K"])
    if entry.get("kind", "so") == "torch_mm":
        import torch

        torch.set_num_threads(1)
        torch.set_flush_denormal(True)
        with open(entry["weight"], "rb") as f:
            w = torch.frombuffer(bytearray(f.read()), dtype=torch.float32).reshape(M, K)
        xt = torch.frombuffer(bytearray(xbytes), dtype=torch.float32).reshape(K, n)
        yt = torch.empty(M, n)

        def run_torch() -> int:
            torch.mm(w, xt, out=yt)
            return 0

        return run_torch, lambda pos: [float(yt.view(-1)[p]) for p in pos]
    lib, fn = load_symbol(entry["so"], entry["symbol"])
    packed = None
    if entry.get("packed"):
        with open(entry["packed"], "rb") as f:
            blob = f.read()
        packed = _Buffer(len(blob), blob)
    y = _Buffer(M * n * 4)
    pw = packed.addr if packed is not None else None
    xa, ya = x.addr, y.addr
    keep = (lib, packed, y)

    def run_so() -> int:
        return fn(xa, ya, n, pw)

    def read(pos: list[int]) -> list[float]:
        arr = (ctypes.c_float * (M * n)).from_address(ya)
        _ = keep
        return [float(arr[p]) for p in pos]

    return run_so, read


def _thread_clock() -> Any:
    """CPU time of this thread in seconds: time the kernel ran, not time it waited for a core.

    Other processes share the machine; wall-clock samples of a descheduled call are 2-3x too
    long, while thread CPU time only sees cache interference. Falls back to perf_counter.
    """
    try:
        time.thread_time()
        return time.thread_time
    except (AttributeError, OSError):
        return time.perf_counter


#: Bytes copied to scrub the caches before every timed call in cold mode (well above a 2 MiB L2).
SCRUB_BYTES = 8 << 20

#: Timing modes: ``cold`` scrubs the caches before every timed call (a layer inside a network runs
#: after other layers have evicted its operands), ``warm`` times back-to-back calls. The one
#: definition: the tuner and the benchmark suite import it from here.
CACHE_MODES = ("cold", "warm")


class CacheScrubber:
    """Evicts the caches between timed calls: copies ``nbytes`` (default :data:`SCRUB_BYTES`, well
    above an L2) between two buffers allocated once, every byte read and written (not timed).

    "Cold" timing is what a layer sees inside a network, where other layers ran in between: its
    output and (for large layers) its input and weights are not in the core's cache. Kernels can
    rank very differently warm and cold, so tuning and measurement use this one scrubber.
    """

    def __init__(self, nbytes: int = SCRUB_BYTES) -> None:
        self.nbytes = max(4096, int(nbytes))
        self.src = _Buffer(self.nbytes)
        self.dst = _Buffer(self.nbytes)
        ctypes.memset(self.src.addr, 0x5A, self.nbytes)  # fault every page in now, not in the loop
        ctypes.memset(self.dst.addr, 0xA5, self.nbytes)
        self.count = 0

    def __call__(self) -> None:
        ctypes.memmove(self.dst.addr, self.src.addr, self.nbytes)
        self.count += 1


def interleaved_samples(fns: Sequence[Callable[[], Any]], *, rounds: int, cache: str | None = None,
                        scrub: Callable[[], Any] | None = None, inner: Sequence[int] | None = None,
                        budget_s: float = 0.0, max_rounds: int | None = None,
                        clock: Callable[[], float] = time.perf_counter, overhead: float = 0.0,
                        seed: int = 0) -> list[list[float]]:
    """The one timing loop: seconds per call of each of ``fns``, one sample per round.

    Every round calls each function in a fresh (seeded) random order: a runner is slower right
    after some others, so a fixed or rotating order would charge one runner for its neighbour.
    At least ``rounds`` rounds; more, up to ``max_rounds``, while less than ``budget_s`` seconds
    have passed. ``cache``: ``"cold"`` runs ``scrub`` before every timed call (one call per sample,
    ``overhead`` -- the clock's own cost -- subtracted); ``"warm"`` runs the function once, untimed,
    before its sample; None times the calls as they come. Outside cold mode a sample is the mean
    of ``inner[i]`` back-to-back calls.
    """
    if cache not in (None, *CACHE_MODES):
        raise _ModeError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if cache == "cold" and scrub is None:
        raise _ModeError("cold timing needs a cache scrubber")
    count = len(fns)
    reps = [1] * count if cache == "cold" or inner is None else [max(1, int(r)) for r in inner]
    samples: list[list[float]] = [[] for _ in fns]
    shuffle = random.Random(seed).shuffle
    perf = time.perf_counter
    limit = max(rounds, max_rounds or rounds)
    start = perf()
    k = 0
    while k < rounds or (k < limit and perf() - start < budget_s):
        order = list(range(count))
        shuffle(order)
        for i in order:
            fn = fns[i]
            if cache == "cold":
                scrub()  # type: ignore[misc]
                t0 = clock()
                fn()
                samples[i].append(max(clock() - t0 - overhead, 1e-9))
                continue
            if cache == "warm":
                fn()
            r = reps[i]
            t0 = clock()
            for _ in range(r):
                fn()
            samples[i].append(max(clock() - t0, 1e-9) / r)
        k += 1
    return samples


#: Clocks of :func:`interleaved_medians`: ``wall`` (perf_counter: includes time other processes held
#: the core) and ``thread`` (this thread's CPU time: the work done, robust on a shared machine).
CLOCKS = ("wall", "thread")


def interleaved_medians(fns: Mapping[str, Callable[[], Any]], min_time: float = 0.3, max_reps: int = 200,
                        min_reps: int = 5, cache: str | None = None, scrubber: Callable[[], Any] | None = None,
                        sample_s: float = 0.0, clock: str = "wall") -> dict[str, float]:
    """Median seconds per call of each function, by :func:`interleaved_samples`.

    Each function is called twice first (warm-up); one probe round sets the number of rounds to
    about ``min_time`` seconds of ``clock`` (between ``min_reps`` and ``max_reps``). ``sample_s`` > 0
    repeats fast functions back to back to make each sample last about that long (not in cold mode).
    ``cache`` "cold" uses ``scrubber`` (default: a fresh :class:`CacheScrubber`). ``clock``: one of
    :data:`CLOCKS`.
    """
    if cache not in (None, *CACHE_MODES):
        raise _ModeError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    if clock not in CLOCKS:
        raise _ModeError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    timer = _thread_clock() if clock == "thread" else time.perf_counter
    if cache == "cold" and scrubber is None:
        scrubber = CacheScrubber()
    names = list(fns)
    calls = [fns[k] for k in names]
    for f in calls:  # warm-up
        f()
        f()
    probe = interleaved_samples(calls, rounds=1, cache=cache, scrub=scrubber, clock=timer)
    round_time = max(sum(s[0] for s in probe), 1e-6)
    rounds = int(min(max_reps, max(min_reps, min_time / round_time)))
    inner = [max(1, int(sample_s / max(s[0], 1e-9))) for s in probe] if sample_s > 0 else None
    samples = interleaved_samples(calls, rounds=rounds, cache=cache, scrub=scrubber, inner=inner, clock=timer)
    return {k: statistics.median(v) for k, v in zip(names, samples, strict=True)}


def _clock_overhead(clock: Any) -> float:
    """Median cost of reading ``clock`` twice (subtracted from single-call samples)."""
    samples = []
    for _ in range(51):
        t0 = clock()
        samples.append(clock() - t0)
    return max(0.0, statistics.median(samples))


def run(request: dict[str, Any]) -> dict[str, Any]:
    """Time the request's entries (see the module docstring); returns the result dict."""
    n = int(request["n"])
    entries = request["entries"]
    mode = request.get("cache", "warm")
    if mode not in CACHE_MODES:
        return {"ok": False, "error": f"cache must be one of {', '.join(CACHE_MODES)}, got {mode!r}"}
    cold = mode == "cold"
    K = int(entries[0]["K"])
    xbytes = make_x(K, n)
    x = _Buffer(len(xbytes), xbytes)
    calls = []
    for e in entries:
        calls.append(_make_call(e, x, xbytes, n))
    scrub = CacheScrubber(int(request.get("scrub_bytes", SCRUB_BYTES))) if cold else None
    # warm-up, checking return codes
    single = []
    for (fn, _), e in zip(calls, entries, strict=True):
        for _ in range(int(request.get("warmup", 3))):
            rc = fn()
            if rc != 0:
                return {"ok": False, "error": f"{e['name']}: kernel returned error code {rc}"}
        t0 = time.perf_counter()
        fn()
        single.append(max(time.perf_counter() - t0, 1e-7))
        if len(single) == 1 and single[0] > float(request.get("max_call_s", 5.0)):
            return {"ok": False, "error": f"{e['name']}: one call takes {single[0]:.1f} s"}
    sample_s = float(request.get("sample_s", 2e-4))
    inner = [1 if cold else max(1, int(sample_s / t)) for t in single]
    rounds = int(request.get("rounds", 15))
    budget = float(request.get("budget_s", 0.5))
    clock = _thread_clock()
    overhead = _clock_overhead(clock) if cold else 0.0
    times = interleaved_samples([c[0] for c in calls], rounds=rounds, cache=mode, scrub=scrub, inner=inner,
                                budget_s=budget, max_rounds=50 * rounds, clock=clock, overhead=overhead)
    ratios = [[t / t0 for t, t0 in zip(ts, times[0], strict=True)] for ts in times]
    scrubs = [len(times[i]) if cold else 0 for i in range(len(entries))]
    results = []
    for i, e in enumerate(entries):
        M = int(e["M"])
        pos = check_positions(M, n) if request.get("check", True) else []
        results.append({"name": e["name"], "median_s": statistics.median(times[i]),
                        "min_s": min(times[i]), "ratio": statistics.median(ratios[i]),
                        "rounds": len(times[i]), "inner": inner[i], "scrubs": scrubs[i],
                        "check": calls[i][1](pos)})
    return {"ok": True, "results": results, "cache": mode, "scrub_bytes": scrub.nbytes if scrub else 0,
            "scrubs": scrub.count if scrub else 0, "clock_overhead_s": overhead, "machine": machine_info()}


def machine_info() -> dict[str, str]:
    """CPU model and platform of the machine running the worker."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() in ("model name", "CPU part"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "machine": platform.machine(), "python": platform.python_version()}


def main() -> int:
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    request = json.loads(sys.stdin.read())
    try:
        result = run(request)
    except Exception as exc:  # reported to the parent as a failed candidate, never a traceback
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
