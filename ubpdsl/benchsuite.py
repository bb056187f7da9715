"""The benchmark suite against the peers: cases, tuning, interleaved timing, CSV / markdown / PNG.

One process measures every runtime a user could pick (:mod:`ubpdsl.bench_peers`) beside ours on
the same matrices, interleaved, single thread (and 2 threads where a peer supports it), and reports
speedups over the fastest dense library of each case (``torch.mm`` with MKL or numpy with
OpenBLAS) measured in the same interleaved run. Every runner's output is
checked against dense torch (float64) before it is timed; a wrong result is reported ``wrong``
and never timed.

Ours are three runners per case:

* ``ubp`` - the unaligned-block kernel (wros) on the BED mask, tuned per case;
* ``ubp_abp`` - the aligned-block kernel (aligned_rows) on an aligned mask with the same number
  of blocks, tuned the same way;
* ``ubp_wros_aligned`` - ``ubp``'s kernel and constants on that aligned mask (the mask's effect
  at equal code and equal nnz).

Tuning is one function (:data:`Tuner`): :func:`sweep_tuner` (a staged sweep over the wros /
aligned_rows constants, labelled "swept") or :func:`autotune_tuner` (``ubpdsl.autotune``'s
Optuna study with a small trial budget). ``benchmarks/suite.py`` and ``ubpdsl bench`` drive
:func:`run_suite`.
"""

from __future__ import annotations

import csv
import ctypes
import functools
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

from ubpdsl.autotune.measure import CacheScrubber  # noqa: E402
from ubpdsl.autotune.measure import interleaved_medians as _interleaved_medians  # noqa: E402
from ubpdsl.bench_peers import PEERS, Case, Peer, Prepared, square_block_weights, thread_limit  # noqa: E402
from ubpdsl.compiler import CompiledKernel, Problem, compile_kernel  # noqa: E402
from ubpdsl.config import KernelConfig  # noqa: E402
from ubpdsl.errors import UbpError  # noqa: E402
from ubpdsl.kernels import VARIANTS  # noqa: E402
from ubpdsl.runtime.loader import aligned_copy, aligned_empty  # noqa: E402

__all__ = [
    "SUITE", "SPARSITIES", "BLOCKS", "Result", "Tuned", "Tuner", "sweep_tuner", "default_tuner", "autotune_tuner",
    "make_case", "shape_cases", "mobilenetv2_cases", "mask_cases", "ours_peers", "run_case", "run_suite",
    "interleaved_medians", "geomean", "machine_info", "copy_bandwidth", "write_csv", "render_markdown",
    "plot_speedups", "summarize", "setup_process",
]

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
#: A case built on demand (cases hold their input arrays: building them all up front costs memory).
CaseSpec = Callable[[], Case]
SPARSITIES: tuple[float, ...] = (0.5, 0.75, 0.9)
BLOCKS: tuple[int, ...] = (2, 4, 8)
#: Targets for ours (single thread, geomean over the suite): speedup over dense per sparsity,
#: speedup over the best peer, slowdown allowed against our aligned kernel.
TARGET_VS_DENSE = {0.5: 1.3, 0.75: 2.5, 0.9: 5.0}
TARGET_VS_PEER = 2.0
TARGET_VS_ABP = 1.10

_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD = -3, -1


# ------------------------------------------------------------------------------- measurement


def setup_process() -> None:
    """Pin libraries to one thread, flush denormals, keep large allocations off fresh mmap pages.

    glibc hands out outputs above the mmap threshold as fresh pages (page faults on every call,
    bimodal timings); raising the threshold makes libraries that allocate their result (scipy)
    reuse heap memory like the runners that write into preallocated outputs.
    """
    import torch

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):  # not glibc: the trap is documented, timings may be bimodal
        pass


@functools.cache
def shared_scrubber() -> CacheScrubber:
    """The process's default scrubber (its buffers are allocated once, on first use)."""
    return CacheScrubber()


def interleaved_medians(fns: dict[str, Callable[[], object]], min_time: float = 0.3, max_reps: int = 200,
                        min_reps: int = 5, cache: str | None = None,
                        scrubber: CacheScrubber | None = None, clock: str = "wall") -> dict[str, float]:
    """:func:`ubpdsl.autotune.measure.interleaved_medians` with this process's shared scrubber."""
    if cache == "cold" and scrubber is None:
        scrubber = shared_scrubber()
    return _interleaved_medians(fns, min_time, max_reps, min_reps, cache, scrubber, clock=clock)


def geomean(values: Iterable[float]) -> float:
    """Geometric mean of the positive finite values (nan when there are none)."""
    vals = [v for v in values if v > 0 and math.isfinite(v)]
    return float(np.exp(np.mean(np.log(vals)))) if vals else float("nan")


def copy_bandwidth(mbytes: int = 64, reps: int = 7) -> float:
    """STREAM-like copy bandwidth in GB/s (bytes read + bytes written), one thread, out of cache."""
    src = np.ones(mbytes * (1 << 20) // 4, np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = []
    for _ in range(reps):
        t = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - t)
    return 2 * src.nbytes / float(np.median(best)) / 1e9


def machine_info() -> dict[str, str]:
    """CPU model, ISA, library versions and thread settings (heads every report)."""
    import torch

    from ubpdsl.runtime.targets import host_target
    from ubpdsl.runtime.toolchain import toolchain_versions

    model, flags = "unknown", ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1]
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512vl", "avx512_bf16", "amx_tile") if f in flags.split()]
    info = {
        "cpu": model,
        "arch": platform.machine(),
        "cores": str(os.cpu_count()),
        "isa": " ".join(isa) or "?",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_blas": "MKL" if torch.backends.mkl.is_available() else "no MKL",
    }
    try:
        import scipy

        info["scipy"] = scipy.__version__
    except ImportError:
        info["scipy"] = "missing"
    try:
        from threadpoolctl import threadpool_info

        libs = {f"{d.get('internal_api')} {d.get('version')}" for d in threadpool_info()
                if d.get("user_api") == "blas"}
        info["blas"] = ", ".join(sorted(libs)) or "?"
    except Exception:  # noqa: BLE001 - only a header line
        info["blas"] = "?"
    try:
        import importlib.metadata as md

        info["mlir_bindings"] = md.version("xtc-mlir-python-bindings")
    except Exception:  # noqa: BLE001
        info["mlir_bindings"] = "?"
    try:
        tgt = host_target()
        info["llc_cpu"] = f"{tgt.cpu}, {tgt.vector_bits}-bit vectors"
        info["llvm"] = toolchain_versions().get("llvm", "?")
    except UbpError as exc:
        info["llc_cpu"] = f"unavailable ({exc})"
    return info


# ------------------------------------------------------------------------------------ cases


def _prune(w: np.ndarray, N: int, sparsity: float) -> tuple[Problem, Problem]:
    from ubpdsl.prune.selectors import aligned_select, bed_select, blocks_to_mask, budget

    M, K = w.shape
    if N < 1 or M < N:
        raise UbpError(f"block N={N} does not fit M={M}")
    m = max(1, budget(M, K, N, sparsity))
    out = []
    for select in (bed_select, aligned_select):
        rows, cols = select(np.abs(w), m, N)
        pw = (w * blocks_to_mask(rows, cols, M, K, N)).astype(np.float32)
        out.append((rows, cols, pw))
    return out[0], out[1]  # type: ignore[return-value]


def make_case(suite: str, shape: str, w: np.ndarray, n: int, N: int, sparsity: float, source: str,
              seed: int = 1) -> Case:
    """A case from dense weights ``w`` [M, K]: BED mask, aligned mask (same blocks), square mask."""
    if not 0.0 <= sparsity < 1.0:
        raise UbpError(f"sparsity must be in [0, 1), got {sparsity}")
    w = np.ascontiguousarray(w, np.float32)
    M, K = w.shape
    (ru, cu, wu), (ra, ca, wa) = _prune(w, N, sparsity)
    # 64-byte aligned, like the torch tensors a runtime passes (numpy only guarantees 16)
    x = aligned_copy(np.random.default_rng(seed).standard_normal((K, n)), np.float32)
    nnz = int(np.count_nonzero(wu))
    return Case(suite, shape, source, M, K, n, N, float(sparsity), x,
                Problem(f"{shape}_u{N}", M, K, N, ru, cu, wu), Problem(f"{shape}_a{N}", M, K, N, ra, ca, wa),
                square_block_weights(w, nnz, N))


def _mbv2_pointwise() -> list[tuple[str, np.ndarray, int]]:
    """(name, weight [Cout, Cin], output pixels at 224x224) of MobileNetV2's 1x1 convolutions."""
    import torch

    from ubpdsl.models import build_model

    net = build_model("mobilenetv2", pretrained=True)
    sizes: dict[str, int] = {}
    hooks = []
    for name, mod in net.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (1, 1) and mod.groups == 1:
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: sizes.__setitem__(name, int(o.shape[2] * o.shape[3]))))
    with torch.no_grad():
        net(torch.zeros(1, 3, 224, 224))
    for h in hooks:
        h.remove()
    mods = dict(net.named_modules())
    return [(name, mods[name].weight.detach().numpy()[:, :, 0, 0].copy(), n) for name, n in sizes.items()]


def shape_cases(shapes: Sequence[str], sparsities: Sequence[float], blocks: Sequence[int],
                pretrained: bool = True) -> list[CaseSpec]:
    """The shape suite: Gaussian weights for every shape; the mbv2_* shapes also with the real
    pretrained MobileNetV2 layer of that shape (``pretrained=True`` and the weights installed)."""
    unknown = [s for s in shapes if s not in SUITE]
    if unknown:
        raise UbpError(f"unknown shape {unknown[0]!r} (known: {', '.join(SUITE)})")
    real: dict[tuple[int, int, int], tuple[str, np.ndarray]] = {}
    if pretrained and any(s.startswith("mbv2") for s in shapes):
        for name, w, n in _mbv2_pointwise():
            real.setdefault((w.shape[0], w.shape[1], n), (name, w))
    out: list[CaseSpec] = []
    for shape in shapes:
        M, K, n = SUITE[shape]
        w = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
        sources = [("random", w)]
        if (M, K, n) in real:
            sources.append((f"pretrained {real[(M, K, n)][0]}", real[(M, K, n)][1]))
        for N in blocks:
            for s in sparsities:
                for src, ww in sources:
                    out.append(functools.partial(make_case, "shapes", shape, ww, n, N, s, src))
    return out


def mobilenetv2_cases(sparsities: Sequence[float], blocks: Sequence[int], unique: bool = True) -> list[CaseSpec]:
    """MobileNetV2's own 1x1 convolutions with masks from BED on the pretrained weights.

    ``unique`` keeps the first layer of each (M, K, n) shape (repeated blocks time the same).
    """
    seen: set[tuple[int, int, int]] = set()
    out: list[CaseSpec] = []
    for name, w, n in _mbv2_pointwise():
        key = (w.shape[0], w.shape[1], n)
        if unique and key in seen:
            continue
        seen.add(key)
        for N in blocks:
            if w.shape[0] < N:
                continue
            for s in sparsities:
                out.append(functools.partial(make_case, "mobilenetv2", name, w, n, N, s, "pretrained"))
    return out


def mask_cases(path: str, columns: Mapping[str, int]) -> list[CaseSpec]:
    """The layers of a masks.npz: its own blocks (unaligned) and an aligned mask of the same size.

    ``columns`` gives every layer's n (see :func:`ubpdsl.models.layer_columns`). Layers without
    weights get Gaussian weights under the mask.
    """
    from ubpdsl.masks import load_masks

    layers = load_masks(path)
    missing = [name for name in layers if name not in columns]
    if missing:
        raise UbpError(f"layer {missing[0]!r} has no n: give --model, --pixels-map or --pixels")
    return [functools.partial(_mask_case, name, lm, int(columns[name])) for name, lm in layers.items()]


def _mask_case(name: str, lm: Any, n: int) -> Case:
    from ubpdsl.prune.selectors import aligned_select, blocks_to_mask

    M, K, N = int(lm.R), int(lm.C), int(lm.block)
    if lm.weight is not None:
        dense = np.asarray(lm.weight, np.float32).reshape(M, K)
    else:
        dense = np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)
    mask = blocks_to_mask(lm.rows, lm.cols, M, K, N)
    wu = (dense * mask).astype(np.float32)
    ra, ca = aligned_select(np.abs(dense), len(lm.rows), N)
    wa = (dense * blocks_to_mask(ra, ca, M, K, N)).astype(np.float32)
    x = aligned_copy(np.random.default_rng(1).standard_normal((K, n)), np.float32)
    return Case("masks", name, "masks.npz", M, K, n, N, float(lm.sparsity), x,
                Problem(f"{name}_u", M, K, N, np.asarray(lm.rows), np.asarray(lm.cols), wu),
                Problem(f"{name}_a", M, K, N, ra, ca, wa), square_block_weights(dense, int(mask.sum()), N))


# ------------------------------------------------------------------------------------- ours


@dataclass
class Tuned:
    """A tuned kernel of ours for one problem."""

    ck: CompiledKernel
    variant: str
    constants: dict[str, Any]
    how: str  # "swept", "autotuned", "default"
    specialize: bool = False
    vector_bits: int | None = None

    @property
    def label(self) -> str:
        return f"{KernelConfig(self.variant, self.constants, self.specialize, self.vector_bits).label()} {self.how}"


#: (problem, x, variant) -> the tuned kernel. Swap :func:`sweep_tuner` for :func:`autotune_tuner`.
Tuner = Callable[[Problem, np.ndarray, str], Tuned]

_POOL: Any = None


def _compile_job(args: tuple[str, Problem, dict[str, Any], bool, int | None]) -> CompiledKernel:
    from ubpdsl.runtime.targets import get_target

    variant, problem, constants, specialize, vbits = args
    config = KernelConfig(variant, constants, specialize, vbits)
    return compile_kernel(config.kernel, problem, config.target_for(get_target("host")), constants=constants,
                          specialize=specialize)


def _compile_many(jobs: list[tuple[str, Problem, dict[str, Any], bool, int | None]], workers: int = 2
                  ) -> list[CompiledKernel | UbpError]:
    """Compile in a small spawn pool (the compile cache makes repeats instant); errors returned."""
    global _POOL
    out: list[CompiledKernel | UbpError] = []
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            try:
                out.append(_compile_job(j))
            except UbpError as exc:
                out.append(exc)
        return out
    import concurrent.futures as cf
    import multiprocessing

    if _POOL is None:
        _POOL = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futs = [_POOL.submit(_compile_job, j) for j in jobs]
    for f in futs:
        try:
            out.append(f.result())
        except UbpError as exc:
            out.append(exc)
    return out


def shutdown_pool() -> None:
    """Stop the compile workers (called at the end of a run)."""
    global _POOL
    if _POOL is not None:
        _POOL.shutdown(cancel_futures=True)
        _POOL = None


def feasible(problem: Problem, variant: str, constants: dict[str, Any], n: int, target: Any = None) -> bool:
    """Whether the sweep may try this config: the autotuner's rule (:func:`ubpdsl.autotune.space.infeasible`)."""
    from ubpdsl.autotune import space as sp
    from ubpdsl.runtime.targets import host_target

    layer = sp.Layer(problem, n)
    return sp.infeasible(KernelConfig(variant, constants), layer, target or host_target(), True) is None


def _check(got: np.ndarray, ref: np.ndarray) -> str | None:
    """None when ``got`` matches the float64 reference, else a one-line reason."""
    if got is None or got.shape != ref.shape:
        return f"output shape {None if got is None else got.shape} != {ref.shape}"
    got = np.asarray(got, np.float64)
    if not np.all(np.isfinite(got)):
        return "output has NaN or Inf"
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(got - ref).max())
    if err > 1e-4 * scale:
        return f"max error {err:.3g} (scale {scale:.3g})"
    return None


def _reference(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Dense torch.mm in float64: the reference every runner is checked against."""
    import torch

    return torch.mm(torch.from_numpy(w).double(), torch.from_numpy(x).double()).numpy()


#: A declared space up to this many configs is swept whole; a larger one knob by knob.
MAX_GRID = 16


def _sweep_declared(problem: Problem, variant: str, space: dict[str, list[Any]], n: int,
                    best_of: Callable[[list[dict[str, Any]]], tuple[dict[str, Any], CompiledKernel] | None]) -> Tuned:
    """Tune a user kernel over its own ``tune=`` knobs: the whole grid when it is small, else one knob
    at a time (each at its best so far, starting from every knob's first value)."""
    import itertools

    def ok(c: dict[str, Any]) -> bool:
        return feasible(problem, variant, c, n)

    combos = [dict(zip(space, vals, strict=True)) for vals in itertools.product(*space.values())]
    best = None
    if len(combos) <= MAX_GRID:
        cands = [c for c in combos if ok(c)]
        best = best_of(cands) if cands else None
    else:
        cfg = {k: v[0] for k, v in space.items()}
        for knob, values in space.items():
            cands = [{**cfg, knob: v} for v in values if ok({**cfg, knob: v})]
            got = best_of(cands) if cands else None
            if got is not None:
                best, cfg = got, got[0]
    if best is None:  # nothing feasible and right: the default, which run_case then checks and reports
        ck = _compile_many([(variant, problem, {}, False, None)], 1)[0]
        if isinstance(ck, UbpError):
            raise ck
        return Tuned(ck, variant, dict(ck.constants), "default")
    return Tuned(best[1], variant, dict(best[1].constants), "swept")


def sweep_tuner(quick: bool = False, min_time: float = 0.2, workers: int = 2, cache: str = "cold") -> Tuner:
    """A staged sweep: the two widest feasible TILEs x PANEL {0,8,16,32,64} x YPREFETCH {0,8}
    (the knobs that matter most once Y is out of cache); then UNROLL {1,2} x PREFETCH {0,8,16} at
    the best; then the other feasible TILEs (of 1, 2, 4, 8). Every stage times its candidates
    interleaved, in the ``cache`` state the suite measures in ("cold": caches scrubbed before
    every call). ``quick``: the variant's default constants only (labelled "default"). A user
    kernel (not a shipped variant) that declares ``tune=`` is swept over that space instead
    (:func:`_sweep_declared`)."""

    def tune(problem: Problem, x: np.ndarray, variant: str) -> Tuned:
        from ubpdsl.kernels import get_variant

        kern = get_variant(variant)
        n = x.shape[1]
        if quick:
            ck = _compile_many([(variant, problem, {}, False, None)], 1)[0]
            if isinstance(ck, UbpError):
                raise ck
            return Tuned(ck, variant, dict(ck.constants), "default")
        tiles = [t for t in (1, 2, 4, 8) if feasible(problem, variant, {"TILE": t, "UNROLL": 1}, n)]
        ref = _reference(problem.weight, x)
        y = aligned_empty((problem.M, n))

        def best_of(cfgs: list[dict[str, Any]]) -> tuple[dict[str, Any], CompiledKernel] | None:
            cfgs = [{k: v for k, v in c.items() if k in knobs} for c in cfgs]  # knobs the kernel has
            cfgs = [dict(c) for c in {tuple(sorted(c.items())): c for c in cfgs}.values()]  # drop repeats
            cks = _compile_many([(variant, problem, c, False, None) for c in cfgs], workers)
            fns: dict[int, Callable[[], object]] = {}
            for i, ck in enumerate(cks):
                if isinstance(ck, UbpError):
                    continue
                h = ck._host or _load(ck)
                h.call_raw(x, y, n, ck.packed)
                if _check(y, ref) is None:
                    fns[i] = (lambda h=h, pk=ck.packed: h.call_raw(x, y, n, pk))
            if not fns:
                return None
            times = interleaved_medians(fns, min_time=min_time, max_reps=60, min_reps=7,  # type: ignore[arg-type]
                                        cache=cache)
            i = min(times, key=times.__getitem__)
            return cfgs[i], cks[i]  # type: ignore[return-value]

        knobs = kern.constexprs
        if variant not in VARIANTS and kern.tune:  # a user kernel: sweep the tune= space it declares
            return _sweep_declared(problem, variant, kern.tune, n, best_of)
        grid_tiles = sorted(tiles)[-2:] or [None]
        panels = [p for p in (0, 8, 16, 32, 64) if p < problem.M] if "PANEL" in knobs else [None]
        ypfs = (0, 8) if "YPREFETCH" in knobs else (None,)
        grid = [{k: v for k, v in (("TILE", t), ("PANEL", p), ("YPREFETCH", d)) if v is not None}
                for t in grid_tiles for p in panels for d in ypfs]
        best = best_of(grid)
        if best is None:  # every config wrong or failing: hand back the default, run_case reports it
            ck = _compile_many([(variant, problem, {}, False, None)], 1)[0]
            if isinstance(ck, UbpError):
                raise ck
            return Tuned(ck, variant, dict(ck.constants), "default")
        cfg0 = best[0]
        pfs = (0, 8, 16) if "PREFETCH" in knobs else (None,)
        second = [{**cfg0, "UNROLL": u, **({"PREFETCH": d} if d is not None else {})}
                  for u in (1, 2) if feasible(problem, variant, {**cfg0, "UNROLL": u}, n) for d in pfs]
        best = best_of(second) or best
        cfg0 = best[0]
        others = [t for t in tiles if t != cfg0.get("TILE")]
        if others:
            best = best_of([cfg0, *({**cfg0, "TILE": t} for t in others)]) or best
        cfg, ck = best
        return Tuned(ck, variant, dict(ck.constants), "swept")

    return tune


def default_tuner() -> Tuner:
    """Default constants, no search (quick runs)."""
    return sweep_tuner(quick=True)


def autotune_tuner(trials: int = 8) -> Tuner:
    """``ubpdsl.autotune``'s Optuna study (persistent, cached) with a small trial budget.

    For wros the tuner searches every shipped variant it may use on the mask, for a user kernel
    (``FILE.py:name``) that kernel's own ``tune=`` space; for the aligned-kernel runner the search
    is not constrained to aligned_rows, so that runner keeps the sweep.
    """
    from ubpdsl.autotune import space as sp
    from ubpdsl.autotune.study import Tuner as OptunaTuner
    from ubpdsl.autotune.study import TuneSettings

    tuners: dict[str, OptunaTuner] = {}
    sweep = sweep_tuner()

    def tune(problem: Problem, x: np.ndarray, variant: str) -> Tuned:
        if variant == "aligned_rows":
            return sweep(problem, x, variant)
        if variant not in tuners:  # wros: every shipped variant; a user kernel: its own tune= space
            tuners[variant] = OptunaTuner(TuneSettings(trials=trials, jobs=2,
                                                       variants=() if variant == "wros" else (variant,)))
        res = tuners[variant].tune_layer(sp.Layer(problem, x.shape[1]))
        c = res.best
        got = _compile_many([(c.variant, problem, dict(c.constants), c.specialize, c.vector_bits)], 1)[0]
        if isinstance(got, UbpError):
            raise got
        return Tuned(got, c.variant, dict(c.constants), f"autotuned ({res.trials} trials)", c.specialize,
                     c.vector_bits)

    tune.close = lambda: [t.close() for t in tuners.values()]  # type: ignore[attr-defined]
    return tune


def _load(ck: CompiledKernel) -> Any:
    from ubpdsl.runtime.loader import HostKernel

    ck._host = HostKernel(ck.so, ck.symbol, ck.M, ck.K)
    return ck._host


def _kernel_runner(tuned: Tuned, problem: Problem, x: np.ndarray, mask: str) -> Prepared:
    ck = tuned.ck
    host = ck._host or _load(ck)
    n = x.shape[1]
    y = aligned_empty((problem.M, n))
    return Prepared(lambda: host.call_raw(x, y, n, ck.packed), lambda: y, problem.weight, mask, tuned.label,
                    keep=[ck])


def ours_peers(tuner: Tuner, variant: str = "wros") -> list[Peer]:
    """Our three runners (see the module docstring), tuned by ``tuner`` once per case; ``variant``
    is the kernel of the unaligned runner (a shipped name or a user kernel ``/abs/FILE.py:name``)."""
    from ubpdsl.kernels import get_variant

    memo: dict[int, Tuned] = {}
    short = get_variant(variant).name

    def ubp(case: Case, threads: int) -> Prepared:
        t = tuner(case.unaligned, case.x, variant)
        memo.clear()
        memo[id(case)] = t
        return _kernel_runner(t, case.unaligned, case.x, "unaligned")

    def abp(case: Case, threads: int) -> Prepared:
        t = tuner(case.aligned, case.x, "aligned_rows")
        return _kernel_runner(t, case.aligned, case.x, "aligned")

    def wros_aligned(case: Case, threads: int) -> Prepared:
        t = memo.get(id(case)) or tuner(case.unaligned, case.x, variant)
        got = _compile_many([(t.variant, case.aligned, t.constants, t.specialize, t.vector_bits)], 1)[0]
        if isinstance(got, UbpError):
            raise got
        same = Tuned(got, t.variant, t.constants, f"config of ubp ({t.how})", t.specialize, t.vector_bits)
        return _kernel_runner(same, case.aligned, case.x, "aligned")

    return [
        Peer("ubp", f"ours: unaligned kernel ({short}, tuned)", ubp, 1, "ours"),
        Peer("ubp_abp", "ours: aligned kernel (aligned_rows, tuned)", abp, 1, "ours"),
        Peer("ubp_wros_aligned", f"ours: {short} on the aligned mask", wros_aligned, 1, "ours"),
    ]


# ------------------------------------------------------------------------------------- runs


@dataclass
class Result:
    """One runner on one case at one thread count (a CSV row)."""

    suite: str
    shape: str
    source: str
    M: int
    K: int
    n: int
    N: int
    sparsity: float
    threads: int
    runner: str
    label: str
    family: str
    mask: str = ""
    config: str = ""
    status: str = "ok"  # ok, wrong, error, unavailable
    detail: str = ""
    seconds: float = float("nan")
    dense_seconds: float = float("nan")
    speedup: float = float("nan")  # dense_seconds / seconds, same interleaved run
    baseline: str = ""  # the dense runner whose time is dense_seconds: the fastest dense library of the case
    useful_gflops: float = float("nan")  # 2 * nnz * n / seconds
    nnz: int = 0
    bw_floor_seconds: float = float("nan")  # (X + Y bytes) / copy bandwidth


def run_case(case: Case, peers: Sequence[Peer], threads: Sequence[int] = (1,), min_time: float = 0.3,
             bandwidth: float | None = None, cache: str | None = "cold",
             scrubber: CacheScrubber | None = None) -> list[Result]:
    """Prepare, check and time every runner on ``case``: one interleaved group per thread count.

    Dense torch.mm (key ``dense``) must be among ``peers``; the baseline of every speedup is the
    fastest dense library (family ``dense``: torch.mm with MKL, numpy with OpenBLAS) in the same
    interleaved run, so no speedup is inflated by a slow dense library.
    """
    results: list[Result] = []
    base = dict(suite=case.suite, shape=case.shape, source=case.source, M=case.M, K=case.K, n=case.n, N=case.N,
                sparsity=case.sparsity)
    floor = (case.K + case.M) * case.n * 4 / (bandwidth * 1e9) if bandwidth else float("nan")
    for nt in threads:
        group = [p for p in peers if p.max_threads >= nt]
        fns: dict[str, Callable[[], object]] = {}
        rows: dict[str, Result] = {}
        with thread_limit(nt):
            for p in group:
                r = Result(**base, threads=nt, runner=p.key, label=p.label, family=p.family,  # type: ignore[arg-type]
                           bw_floor_seconds=floor)
                rows[p.key] = r
                why = p.available()
                if why:
                    r.status, r.detail = "unavailable", why
                    continue
                try:
                    prep = p.prepare(case, nt)
                    prep.call()
                    got = prep.output()
                except UbpError as exc:
                    r.status, r.detail = "unavailable", str(exc).splitlines()[0]
                    continue
                except Exception as exc:  # noqa: BLE001 - a peer library failing is a result, not a crash
                    r.status, r.detail = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    continue
                r.mask, r.config, r.nnz = prep.mask, prep.config, prep.nnz
                bad = _check(got, _reference(prep.matrix, case.x))
                if bad:
                    r.status, r.detail = "wrong", bad  # reported, never timed
                    continue
                fns[p.key] = prep.call
            if "dense" not in fns:
                raise UbpError("dense torch.mm must be among the runners (it is the baseline)")
            slow = any(p.slow for p in group if p.key in fns)
            times = interleaved_medians(fns, min_time=min_time, min_reps=3 if slow else 5, cache=cache,
                                        scrubber=scrubber)
        families = {p.key: p.family for p in group}
        base_key = min((k for k in times if families[k] == "dense"), key=lambda k: times[k])
        td = times[base_key]
        for key, t in times.items():
            r = rows[key]
            r.seconds, r.dense_seconds, r.speedup = t, td, td / t
            r.useful_gflops = 2 * r.nnz * case.n / t / 1e9
        for r in rows.values():
            r.dense_seconds, r.baseline = td, base_key
        results.extend(rows[p.key] for p in group)
    return results


def run_suite(cases: Iterable[Case | CaseSpec], *, tuner: Tuner | None = None, threads: Sequence[int] = (1,),
              min_time: float = 0.3, peers: Sequence[Peer] | None = None,
              progress: Callable[[int, Case, list[Result]], None] | None = None,
              bandwidth: float | None = None, cache: str = "cold", variant: str = "wros") -> list[Result]:
    """Run every case (see :func:`run_case`) in the ``cache`` state (see :func:`interleaved_medians`);
    ``progress(i, case, results)`` after each one; ``variant``: our unaligned runner's kernel."""
    setup_process()
    runners = list(peers if peers is not None else PEERS) + ours_peers(tuner or sweep_tuner(cache=cache), variant)
    out: list[Result] = []
    try:
        for i, spec in enumerate(cases):
            case = spec if isinstance(spec, Case) else spec()
            res = run_case(case, runners, threads, min_time, bandwidth, cache)
            out.extend(res)
            if progress:
                progress(i, case, res)
    finally:
        shutdown_pool()
        close = getattr(tuner, "close", None)
        if close is not None:
            close()
    return out


# ---------------------------------------------------------------------------------- reports


def write_csv(results: Sequence[Result], path: Path) -> None:
    """All results, one row per runner x case x thread count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        names = list(Result.__dataclass_fields__)
        wr = csv.DictWriter(f, fieldnames=names)
        wr.writeheader()
        for r in results:
            wr.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(r).items()})


@dataclass
class Summary:
    """Geomean speedups by sparsity and the target verdicts (single thread)."""

    sparsities: list[float]
    labels: dict[str, str]
    vs_dense: dict[str, dict[float, float]]  # runner -> sparsity -> geomean speedup over dense
    counts: dict[str, dict[float, int]]
    ours_vs_best_peer: dict[float, float]
    best_peer_vs_dense: dict[float, float]
    ours_vs_abp: dict[float, float]  # geomean t(abp) / t(ours): >= 1/1.10 meets the target
    ours_vs_wros_aligned: dict[float, float]
    wrong: list[Result] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)


def summarize(results: Sequence[Result], threads: int = 1, suite: str | None = None,
              source_prefix: str | None = None) -> Summary:
    """Geomeans over the cases (shapes x N) at each sparsity, one thread count."""
    rs = [r for r in results if r.threads == threads and (suite is None or r.suite == suite)
          and (source_prefix is None or r.source.startswith(source_prefix))]
    sps = sorted({r.sparsity for r in rs})
    labels = {r.runner: r.label for r in rs}
    by_case: dict[tuple, dict[str, Result]] = {}
    for r in rs:
        by_case.setdefault((r.shape, r.source, r.N, r.sparsity), {})[r.runner] = r

    def ok(r: Result | None) -> bool:
        return r is not None and r.status == "ok" and r.seconds > 0

    vs: dict[str, dict[float, list[float]]] = {}
    best_peer: dict[float, list[float]] = {}
    bp_dense: dict[float, list[float]] = {}
    abp: dict[float, list[float]] = {}
    wa: dict[float, list[float]] = {}
    for (_, _, _, s), rr in by_case.items():
        for k, r in rr.items():
            if ok(r):
                vs.setdefault(k, {}).setdefault(s, []).append(r.speedup)
        ours = rr.get("ubp")
        peers = [r for r in rr.values() if r.family in ("peer", "dense") and ok(r)]
        if ok(ours) and peers:
            bp = min(peers, key=lambda r: r.seconds)
            best_peer.setdefault(s, []).append(bp.seconds / ours.seconds)  # type: ignore[union-attr]
            bp_dense.setdefault(s, []).append(bp.speedup)
        if ok(ours) and ok(rr.get("ubp_abp")):
            abp.setdefault(s, []).append(rr["ubp_abp"].seconds / ours.seconds)  # type: ignore[union-attr]
        if ok(ours) and ok(rr.get("ubp_wros_aligned")):
            wa.setdefault(s, []).append(rr["ubp_wros_aligned"].seconds / ours.seconds)  # type: ignore[union-attr]
    unavailable = {}
    for r in rs:
        if r.status in ("unavailable", "error") and r.runner not in unavailable:
            unavailable[r.runner] = r.detail
    return Summary(
        sps, labels,
        {k: {s: geomean(v) for s, v in d.items()} for k, d in vs.items()},
        {k: {s: len(v) for s, v in d.items()} for k, d in vs.items()},
        {s: geomean(v) for s, v in best_peer.items()},
        {s: geomean(v) for s, v in bp_dense.items()},
        {s: geomean(v) for s, v in abp.items()},
        {s: geomean(v) for s, v in wa.items()},
        [r for r in rs if r.status == "wrong"],
        unavailable,
    )


def _fmt(v: float | None, suffix: str = "x") -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.2f}{suffix}"


def _verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def summary_markdown(sm: Summary, title: str) -> str:
    """The per-sparsity geomean table and target verdicts of one summary."""
    cols = sm.sparsities
    out = [f"### {title}", "", "Geometric mean of the speedup over the fastest dense library of each case "
           "(torch.mm or numpy, same interleaved run), "
           "over shapes x N:", "",
           "| runner | " + " | ".join(f"{s:.0%}" for s in cols) + " | cases |",
           "|---|" + "---|" * len(cols) + "---|"]
    order = sorted(sm.vs_dense, key=lambda k: (0 if k.startswith("ubp") else 1, -sm.vs_dense[k].get(cols[-1], 0)))
    for k in order:
        cnt = max(sm.counts[k].values())
        out.append(f"| {sm.labels[k]} | " + " | ".join(_fmt(sm.vs_dense[k].get(s)) for s in cols) + f" | {cnt} |")
    out += ["", "| check | " + " | ".join(f"{s:.0%}" for s in cols) + " |", "|---|" + "---|" * len(cols)]
    ours = sm.vs_dense.get("ubp", {})
    out.append("| ours vs dense (target) | " + " | ".join(
        f"{_fmt(ours.get(s))} (>= {TARGET_VS_DENSE.get(s, float('nan'))}x: "
        f"{_verdict(ours.get(s, 0) >= TARGET_VS_DENSE.get(s, float('inf')))})" if s in TARGET_VS_DENSE
        else _fmt(ours.get(s)) for s in cols) + " |")
    out.append("| best peer vs dense (per case) | " + " | ".join(_fmt(sm.best_peer_vs_dense.get(s)) for s in cols)
               + " |")
    out.append("| ours vs best peer (>= 2x) | " + " | ".join(
        f"{_fmt(sm.ours_vs_best_peer.get(s))} ({_verdict(sm.ours_vs_best_peer.get(s, 0) >= TARGET_VS_PEER)})"
        for s in cols) + " |")
    out.append("| ours vs our aligned kernel, same blocks (t_abp / t_ours, >= 0.91) | " + " | ".join(
        f"{_fmt(sm.ours_vs_abp.get(s))} ({_verdict(sm.ours_vs_abp.get(s, 0) >= 1 / TARGET_VS_ABP)})"
        for s in cols) + " |")
    out.append("| wros aligned mask / unaligned mask (t_aligned / t_unaligned) | " + " | ".join(
        _fmt(sm.ours_vs_wros_aligned.get(s)) for s in cols) + " |")
    if sm.unavailable:
        out += ["", "Unavailable or failing runners (reason from the first case):"]
        out += [f"- {sm.labels.get(k, k)}: {v}" for k, v in sm.unavailable.items()]
    if sm.wrong:
        out += ["", f"**Wrong results ({len(sm.wrong)}), not timed:**"]
        out += [f"- {r.label} on {r.shape} N={r.N} s={r.sparsity}: {r.detail}" for r in sm.wrong[:20]]
    return "\n".join(out)


def detail_markdown(results: Sequence[Result], threads: int = 1) -> str:
    """One row per case: speedup over dense of each runner, dense GFLOP/s, the bandwidth limit."""
    rs = [r for r in results if r.threads == threads]
    runners: list[str] = []
    labels: dict[str, str] = {}
    for r in rs:
        if r.runner not in runners and r.family != "bound":
            runners.append(r.runner)
            labels[r.runner] = r.runner
    cases: dict[tuple, dict[str, Result]] = {}
    for r in rs:
        cases.setdefault((r.suite, r.shape, r.source, r.N, r.sparsity), {})[r.runner] = r
    head = ("| shape | source | N | sparsity | dense | dense ms | dense GFLOP/s | limit | "
            + " | ".join(labels[k] for k in runners) + " | ours GFLOP/s | ours config |")
    out = [head, "|" + "---|" * (9 + len(runners))]
    for (_, shape, src, N, s), rr in cases.items():
        d = rr.get(next(iter(rr.values())).baseline or "dense")
        if d is None or not math.isfinite(d.seconds):
            continue
        dense_gf = 2 * d.M * d.K * d.n / d.seconds / 1e9
        lim = d.seconds / d.bw_floor_seconds if math.isfinite(d.bw_floor_seconds) else float("nan")
        wy = rr.get("write_y")
        if wy is not None and wy.status == "ok":
            lim = min(lim, wy.speedup) if math.isfinite(lim) else wy.speedup
        cells = []
        for k in runners:
            r = rr.get(k)
            if r is None:
                cells.append("")
            elif r.status != "ok":
                cells.append(r.status)
            else:
                cells.append(f"{r.speedup:.2f}")
        ours = rr.get("ubp")
        src_short = src.split(" ")[0]
        out.append(f"| {shape} | {src_short} | {N} | {s:.0%} | {d.runner} | {d.seconds * 1e3:.3f} | {dense_gf:.1f} | "
                   f"{_fmt(lim)} | " + " | ".join(cells)
                   + f" | {_fmt(ours.useful_gflops if ours else None, '')} | {ours.config if ours else ''} |")
    return "\n".join(out)


def machine_markdown(info: dict[str, str], threads: Sequence[int], bandwidth: float | None) -> str:
    """The report header: machine, ISA, library versions, threads, copy bandwidth."""
    lines = [f"- CPU: {info.get('cpu')} ({info.get('arch')}, {info.get('cores')} cores); ISA: {info.get('isa')}",
             f"- LLVM codegen: {info.get('llc_cpu')}, llvm {info.get('llvm')}",
             f"- python {info.get('python')}, numpy {info.get('numpy')} ({info.get('blas')}), "
             f"scipy {info.get('scipy')}, torch {info.get('torch')} ({info.get('torch_blas')}), "
             f"MLIR bindings {info.get('mlir_bindings')}",
             f"- threads: {', '.join(map(str, threads))} (torch.set_num_threads + threadpoolctl; ours and the "
             "MLIR / scipy peers are single-threaded, so only the others appear at 2 threads)"]
    if bandwidth:
        lines.append(f"- STREAM-like copy bandwidth (numpy copyto, 64 MiB, one thread): {bandwidth:.1f} GB/s "
                     "(read + write)")
    return "\n".join(lines)


def render_markdown(results: Sequence[Result], info: dict[str, str], threads: Sequence[int],
                    bandwidth: float | None, title: str = "ubpdsl benchmark", plot: str | None = None,
                    cache: str | None = None) -> str:
    """The whole report: machine header, summaries (1 and 2 threads, per mask source), detail table."""
    parts = [f"# {title}", "", machine_markdown(info, threads, bandwidth), ""]
    if cache == "cold":
        parts += ["Timing: **cold caches** (an 8 MB buffer is copied before every timed call, so no runner "
                  "finds its output or inputs in L1/L2, as for a layer inside a network); tuning used the same "
                  "state.", ""]
    elif cache == "warm":
        parts += ["Timing: **warm caches** (every timed call right after an untimed call of the same runner).", ""]
    suites = sorted({r.suite for r in results})
    for suite in suites:
        sources = sorted({r.source.split(" ")[0] for r in results if r.suite == suite})
        for src in sources:
            parts += [summary_markdown(summarize(results, 1, suite, src),
                                       f"{suite}, {src} weights, 1 thread"), ""]
    if any(r.threads == 2 for r in results):
        sm2 = summarize(results, 2)
        cols = sm2.sparsities
        parts += ["### 2 threads (peers that use them; speedup over the fastest 2-thread dense library)", "",
                  "| runner | " + " | ".join(f"{s:.0%}" for s in cols) + " |", "|---|" + "---|" * len(cols)]
        for k, d in sm2.vs_dense.items():
            parts.append(f"| {sm2.labels[k]} | " + " | ".join(_fmt(d.get(s)) for s in cols) + " |")
        parts.append("")
    if plot:
        parts += [f"![speedup over dense vs sparsity]({plot})", ""]
    parts += ["### Every case, 1 thread (speedup over the fastest dense library, named in `dense`; "
              "`limit` = dense time over the larger of "
              "the measured time to write Y once (fill with 0, same run, same cache state) and the time to stream "
              "X and Y once at the copy bandwidth: no kernel can beat dense by more on that case)", "",
              detail_markdown(results, 1), ""]
    return "\n".join(parts)


def plot_speedups(results: Sequence[Result], path: Path, block: int | None = None, threads: int = 1) -> None:
    """Speedup over dense, one line (or marker set) per runner.

    One sparsity (e.g. ``--quick``): a single chart with the layers along x. Several: one panel
    per shape with speedup against sparsity (geomean over sources).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rs = [r for r in results if r.threads == threads and r.status == "ok" and r.runner != "dense"]
    blocks = sorted({r.N for r in rs})
    if block is None or block not in blocks:
        block = 4 if 4 in blocks else (blocks[0] if blocks else 4)
    rs = [r for r in rs if r.N == block]
    shapes = list(dict.fromkeys(r.shape for r in rs))
    runners = list(dict.fromkeys(r.runner for r in rs))
    labels = {r.runner: r.label for r in rs}
    sparsities = sorted({r.sparsity for r in rs})
    title = f"speedup over the fastest dense library, N={block}x1 blocks, {threads} thread(s)"
    if len(sparsities) <= 1:
        fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(shapes) + 2) + 3.5, 4.5))
        xs = range(len(shapes))
        for k in runners:
            ys = [geomean([r.speedup for r in rs if r.shape == shape and r.runner == k] or [float("nan")])
                  for shape in shapes]
            ours = k.startswith("ubp")
            ax.plot(xs, ys, "-o" if ours else ".", label=labels[k], linewidth=2.0 if k == "ubp" else 0.0,
                    markersize=7 if ours else 6)
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_xticks(list(xs), shapes, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("speedup over dense (log)")
        ax.set_xlabel("layer")
        pct = f", sparsity {sparsities[0]:.0%}" if sparsities else ""
        ax.set_title(title + pct, fontsize=10)
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return
    cols = min(4, len(shapes))
    rows = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    ticks = [round(s * 100) for s in sparsities]
    for ax, shape in zip(axes.flat, shapes, strict=False):
        for k in runners:
            pts: dict[float, list[float]] = {}
            for r in rs:
                if r.shape == shape and r.runner == k:
                    pts.setdefault(r.sparsity, []).append(r.speedup)
            if pts:
                xs = sorted(pts)
                style = "-o" if k.startswith("ubp") else "--."
                ax.plot([s * 100 for s in xs], [geomean(pts[s]) for s in xs], style, label=labels[k],
                        linewidth=2.2 if k == "ubp" else 1.0)
        ax.axhline(1.0, color="k", linewidth=0.6)
        ax.set_xticks(ticks, [f"{t}" for t in ticks])
        ax.set_xlim(ticks[0] - 5, ticks[-1] + 5)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("sparsity %", fontsize=8)
        ax.set_ylabel("speedup over dense", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(shapes):]:
        ax.axis("off")
    handles, labs = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=min(4, max(1, len(labs))), fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * math.ceil(len(labs) / 4), 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
