"""Tuning one layer, and a whole masks.npz, with a persistent Optuna study.

Per layer there is one study (name ``ubp:<target>:<layer>:<cache>:<key[:16]>``, the key of the
tuned-config cache; ``<cache>`` is the timing mode, ``cold`` or ``warm``, or ``estimate``) in
an Optuna storage: SQLite in the cache directory by default, or any SQLAlchemy URL
(``postgresql://...``) shared by tuning processes on many machines.

The loop (ask/tell, so several processes can work on one study):

1. known-good configs are enqueued first (the default config is trial 0 on a fresh study);
2. each process asks a batch of trials (one per compile worker), maps each to a canonical
   :class:`~.space.Config`, rejects infeasible ones (state PRUNED, reason recorded) and
   short-cuts configs already measured in the study (same value, attribute ``duplicate_of``);
3. the rest compile in parallel worker processes (through the compile cache, under a shape-only
   symbol so that layers of the same shape share data-driven builds) while the previous batch
   is being timed (a two-stage pipeline);
4. each is timed in a fresh subprocess, interleaved with the layer's default config as the
   fixed reference (objective: median over rounds of candidate time / reference time; lower
   is better), or costed by the llvm-mca model for AArch64 targets without a runner. Timing
   is ``cold`` by default (the caches are scrubbed before every timed call, as for a layer
   inside a network) or ``warm`` (back-to-back calls); the mode is part of the cache key and
   the study name, so results of the two never mix;
5. each trial is told as soon as it is measured: a finished trial is committed and survives
   Ctrl-C, ``kill -9`` or a crash. Trials left RUNNING by a dead process on this host (or with a
   stale heartbeat, for RDB storages) are failed as ``abandoned`` and re-enqueued on the next run.

The budget counts finished trials (complete, or failed by the candidate itself): a rerun
only tops the study up to it. Infeasible proposals do not count.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import multiprocessing
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ubpdsl.autotune import space as sp
from ubpdsl.autotune.measure import CACHE_MODES
from ubpdsl.autotune.runner import LocalRunner, Outcome, Runner
from ubpdsl.autotune.tuned_cache import TunedCache, tuned_key
from ubpdsl.errors import UbpError
from ubpdsl.identity import content_file
from ubpdsl.runtime.targets import Target, get_target

__all__ = ["TuneError", "TuneSettings", "LayerResult", "Tuner", "open_storage", "study_name", "compile_job",
           "count_finished", "CACHE_MODES"]

_HOST = socket.gethostname()

#: Symbol of kernels built while tuning: shape-only (data-driven) builds are then shared through the
#: compile cache by every layer of the same shape. The delivered kernel gets the layer's own symbol.
TUNE_SYMBOL = "ubp_tune_kernel"

#: Seconds a RUNNING trial may lack its owner (host, pid) before it counts as abandoned.
_OWNER_GRACE_S = 5.0


class TuneError(UbpError):
    """The tuner cannot start or continue (bad storage URL, bad options)."""


@dataclass
class TuneSettings:
    """Everything that decides how a run tunes (CLI options map here one to one)."""

    target: str = "host"
    trials: int = 12
    storage: str | None = None
    cache_dir: Path | None = None
    jobs: int = 2
    timeout: float = 20.0
    seed: int = 0
    force: bool = False
    weights: bool = True  # False: synthetic weights, data-driven configs only
    budget_s: float = 0.15
    rounds: int = 11
    cache: str = "cold"  # timing mode, one of CACHE_MODES (ignored by llvm-mca estimates)
    variants: tuple[str, ...] = ()  # variant names searched (shipped or /abs/FILE.py:name); () = shipped


@dataclass
class LayerResult:
    """The outcome of tuning one layer."""

    layer: str
    n: int
    best: sp.Config
    default: sp.Config
    best_value: float  # candidate / default (time or estimated cycles); < 1 is faster
    trials: int
    failed: int
    from_cache: bool
    estimate: bool
    history: list[tuple[int, float | None]] = field(default_factory=list)
    study: str = ""
    key: str = ""
    final: dict[str, Any] | None = None  # the last summary numbers stored with the cached entry
    cache: str | None = None  # timing mode ("cold" / "warm"); None for llvm-mca estimates


# ----------------------------------------------------------------------------------------- storage


def _cache_root(settings: TuneSettings) -> Path:
    from ubpdsl.runtime.cache import default_cache_dir

    return Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()


def storage_url(settings: TuneSettings) -> str:
    """The storage URL: the given one (postgresql:// uses psycopg 3), or SQLite in the cache dir."""
    url = settings.storage
    if not url:
        path = _cache_root(settings) / "autotune" / "studies.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def open_storage(settings: TuneSettings) -> Any:
    """An Optuna RDB storage, connected and checked; :class:`TuneError` if unreachable.

    Nothing is created or changed in an existing storage until it answered a query.
    """
    import optuna
    import sqlalchemy

    url = storage_url(settings)
    if "://" not in url:
        raise TuneError(f"--storage {settings.storage!r} is not a database URL (sqlite:///path.db or postgresql://...)")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("postgresql"):
        engine_kwargs = {"connect_args": {"connect_timeout": 5}, "pool_pre_ping": True}
    elif url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 60}}
        db = url.split(":///", 1)[-1]
        if db and not Path(db).parent.exists():
            raise TuneError(f"cannot open storage {settings.storage}: directory {Path(db).parent} does not exist")
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any driver error is "unreachable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TuneError(f"cannot reach storage {_redact(settings.storage or url)}: {first[:300]}") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat = {} if url.startswith("sqlite") else {"heartbeat_interval": 30, "grace_period": 120}
    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except Exception as exc:  # noqa: BLE001
            # Workers starting together on a fresh database race to create Optuna's tables: the
            # loser sees a unique violation, and a retry finds the tables in place.
            if attempt < 5:
                time.sleep(0.3 + random.random() * (attempt + 1))
                continue
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TuneError(f"cannot open storage {_redact(settings.storage or url)}: {first[:300]}") from None
    raise AssertionError("unreachable")


def _redact(url: str) -> str:
    """A URL without its password."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        user = cred.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in cred else url
    return url


def study_name(layer: sp.Layer, target: Target, key: str, cache: str | None = None) -> str:
    """``ubp:<target>:<layer>:<cache>:<key[:16]>`` (``estimate`` in place of the timing mode when None)."""
    return f"ubp:{target.name}:{layer.name}:{cache or 'estimate'}:{key[:16]}"


def count_finished(trials: Iterable[Any]) -> tuple[int, int]:
    """(finished, failed) trials toward the budget: complete ones, and those the candidate failed."""
    from optuna.trial import TrialState

    done = failed = 0
    for t in trials:
        if t.state == TrialState.COMPLETE:
            done += 1
        elif t.state == TrialState.FAIL and t.user_attrs.get("fail_reason") not in (None, "abandoned"):
            done += 1
            failed += 1
    return done, failed


# ----------------------------------------------------------------------------------------- compiling


def compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Compile one config (runs in a worker process); returns paths, or ``{"error": ...}``."""
    try:
        from ubpdsl.compiler import compile_kernel
        from ubpdsl.runtime.cache import CompileCache

        config = sp.Config.from_json(job["config"])
        target = config.target_for(get_target(job["target"]))
        ck = compile_kernel(config.kernel, job["problem"], target, constants=config.constants,
                            specialize=config.specialize, symbol=job["symbol"],
                            cache=CompileCache(job["cache_root"]))
        packed = None
        if ck.packed is not None:  # content-addressed: layers with other weights never share the file
            packed = str(content_file(job["workdir"], ck.packed, ".packed"))
        return {"so": str(ck.so), "obj": str(ck.obj), "header": str(ck.header), "ll": str(ck.so.parent / "kernel.ll"),
                "packed": packed, "manifest": ck.manifest, "symbol": ck.symbol, "cache_hit": ck.cache_hit}
    except UbpError as exc:
        return {"error": f"compile failed: {str(exc).splitlines()[0][:400]}"}
    except Exception as exc:  # noqa: BLE001 - a compiler bug must not stop tuning
        return {"error": f"compile failed: {type(exc).__name__}: {str(exc)[:400]}"}


class _Compiler:
    """Compiles jobs in parallel worker processes (``jobs`` > 0) or in this process (0)."""

    def __init__(self, jobs: int, fn: Callable[[dict[str, Any]], dict[str, Any]], timeout: float = 600) -> None:
        self.jobs = jobs
        self.fn = fn
        self.timeout = timeout
        self._pool: cf.ProcessPoolExecutor | None = None

    def _get_pool(self) -> cf.ProcessPoolExecutor:
        if self._pool is None:
            from ubpdsl.guard import die_with_parent  # workers must not outlive a killed tune

            self._pool = cf.ProcessPoolExecutor(self.jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=die_with_parent, initargs=(os.getpid(),))
        return self._pool

    def submit(self, jobs: list[dict[str, Any]]) -> list[cf.Future[dict[str, Any]]]:
        """Start compiling ``jobs``; in-process mode compiles right away."""
        if self.jobs <= 0:
            done = []
            for j in jobs:
                f: cf.Future[dict[str, Any]] = cf.Future()
                f.set_result(self.fn(j))
                done.append(f)
            return done
        pool = self._get_pool()
        futures = [pool.submit(self.fn, j) for j in jobs]
        for f in futures:
            f.started_at = time.monotonic()  # type: ignore[attr-defined]
        return futures

    def result(self, future: cf.Future[dict[str, Any]]) -> dict[str, Any]:
        """The compile result, or ``{"error": ...}`` (timeout, crashed compiler process)."""
        started = getattr(future, "started_at", time.monotonic())
        try:
            return future.result(timeout=max(1.0, started + self.timeout - time.monotonic()))
        except cf.TimeoutError:
            self._reset()
            return {"error": f"compile did not finish within {self.timeout:.0f} s"}
        except Exception as exc:  # noqa: BLE001 - BrokenProcessPool: a compiler crash
            self._reset()
            return {"error": f"compiler process died: {type(exc).__name__}"}

    def _reset(self) -> None:
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# ----------------------------------------------------------------------------------------- tuner


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Heartbeat:
    """Records heartbeats of in-flight trials (RDB storages with heartbeats) from a thread."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        self.ids: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
        if interval:
            self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
            self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            for tid in list(self.ids):
                try:
                    self.storage.record_heartbeat(tid)
                except Exception:  # noqa: BLE001 - next beat retries
                    pass

    def add(self, tid: int) -> None:
        self.ids.add(tid)
        if self._thread is not None:
            try:
                self.storage.record_heartbeat(tid)
            except Exception:  # noqa: BLE001
                pass

    def stop(self) -> None:
        self._stop.set()


class Tuner:
    """Tunes layers for one target; see the module docstring for the loop.

    ``compile_fn`` and ``runner`` can be replaced (tests inject crashing kernels; ``--runner``
    gives a remote machine). ``on_trial`` is called after every finished trial (progress bar).
    """

    def __init__(self, settings: TuneSettings, *, runner: Runner | None = None,
                 compile_fn: Callable[[dict[str, Any]], dict[str, Any]] = compile_job,
                 on_trial: Callable[[str, int, float | None], None] | None = None) -> None:
        self.settings = settings
        if settings.cache not in CACHE_MODES:
            raise TuneError(f"--cache must be one of {', '.join(CACHE_MODES)}, got {settings.cache!r}")
        self.target = get_target(settings.target)  # TargetError for an unknown target
        self.runner: Runner = runner or LocalRunner()
        self.estimate = self.target.runner != "native" and runner is None  # no local timing: a cost model
        if runner is not None and hasattr(runner, "connect"):
            runner.connect()  # RunnerError when unreachable, before any study is opened
            arch = getattr(runner, "arch", None)
            if arch and arch.replace("arm64", "aarch64") != self.target.arch:
                raise TuneError(f"runner {runner.name} is a {arch} machine; it cannot run {self.target.name} kernels")
        self.cache_root = _cache_root(settings)
        self.workdir = self.cache_root / "autotune" / "work"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tuned = TunedCache(self.cache_root)
        self.compiler = _Compiler(settings.jobs, compile_fn)
        self.on_trial = on_trial
        self._storage: Any = None
        self._heartbeat: _Heartbeat | None = None
        self.recent: list[sp.Config] = []
        self.dense_times: dict[tuple[int, int, int], float] = {}  # (M, K, n) -> torch.mm s, once per run

    # -- setup ------------------------------------------------------------------------------------

    @property
    def storage(self) -> Any:
        if self._storage is None:
            self._storage = open_storage(self.settings)
            self._heartbeat = _Heartbeat(self._storage)
        return self._storage

    def close(self) -> None:
        self.compiler.close()
        self.runner.close()
        if self._heartbeat is not None:
            self._heartbeat.stop()

    @property
    def default_config(self) -> sp.Config:
        """The reference config: wros at its defaults, or the first searched kernel's (``--variant``)."""
        return sp.default_config(self.target, *self.settings.variants[:1])

    @property
    def cache_mode(self) -> str | None:
        """The timing mode ("cold" or "warm"), or None when configs are costed by llvm-mca (no caches)."""
        return None if self.estimate else self.settings.cache

    def key(self, layer: sp.Layer) -> str:
        """The tuned-config cache key of ``layer`` (also names its study); includes the timing mode."""
        from ubpdsl.compiler import compiler_fingerprint
        from ubpdsl.kernels import VARIANTS, variant_identities
        from ubpdsl.runtime.toolchain import toolchain_versions

        return tuned_key(mask=layer.problem.blocks_hash(), shape=[layer.problem.M, layer.problem.K, layer.problem.N],
                         n=layer.n, target=self.target.cache_key(), toolchain=toolchain_versions(),
                         compiler=compiler_fingerprint(),
                         kernels=variant_identities(self.settings.variants or VARIANTS),
                         runner=self.runner.name, estimate=self.estimate, weights=self.settings.weights,
                         cache=self.cache_mode)

    def _job(self, layer: sp.Layer, config: sp.Config, final: bool = False) -> dict[str, Any]:
        return {"config": config.to_json(), "target": self.target.name, "problem": layer.problem,
                "symbol": _symbol(layer.name) if final else TUNE_SYMBOL, "cache_root": str(self.cache_root),
                "workdir": str(self.workdir)}

    def compile(self, layer: sp.Layer, config: sp.Config, final: bool = False) -> dict[str, Any]:
        """Compile one config now (in this process); raises on failure. ``final``: with the layer's symbol."""
        res = compile_job(self._job(layer, config, final))
        if "error" in res:
            raise UbpError(f"layer {layer.name}: {config.label()}: {res['error']}")
        return res

    # -- measuring --------------------------------------------------------------------------------

    def _entry(self, name: str, layer: sp.Layer, built: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "so": built["so"], "symbol": built["symbol"], "M": layer.problem.M,
                "K": layer.problem.K, "packed": built.get("packed")}

    def _reference_y(self, layer: sp.Layer) -> np.ndarray | None:
        if layer.problem.weight is None:
            return None
        from ubpdsl.autotune.measure import make_x

        x = np.frombuffer(make_x(layer.problem.K, layer.n), np.float32).reshape(layer.problem.K, layer.n)
        return layer.problem.weight.astype(np.float64) @ x.astype(np.float64)

    def _check(self, layer: sp.Layer, ref_y: np.ndarray | None, result: dict[str, Any]) -> str | None:
        if ref_y is None:
            return None
        from ubpdsl.autotune.measure import check_positions

        pos = check_positions(layer.problem.M, layer.n)
        want = ref_y.reshape(-1)[pos]
        got = np.asarray(result["check"], np.float64)
        scale = np.abs(layer.problem.weight).sum(axis=1).max() * 1.5 + 1e-6
        bad = np.nonzero(~(np.abs(got - want) <= 1e-4 * scale))[0]
        if len(bad):
            i = int(bad[0])
            r, c = divmod(pos[i], layer.n)
            return f"wrong result: y[{r},{c}] = {got[i]:.6g}, expected {want[i]:.6g}"
        return None

    def measure(self, layer: sp.Layer, entries: list[dict[str, Any]], *, rounds: int | None = None,
                budget_s: float | None = None) -> Outcome:
        request = {"n": layer.n, "warmup": 2, "rounds": rounds or self.settings.rounds,
                   "budget_s": self.settings.budget_s if budget_s is None else budget_s, "sample_s": 2e-4,
                   "cache": self.cache_mode or "warm", "entries": entries, "check": True}
        return self.runner.run(request, timeout=self.settings.timeout)

    def estimate_cost(self, layer: sp.Layer, config: sp.Config, built: dict[str, Any]) -> float:
        """AArch64 without a device: instructions counted under qemu x llvm-mca cycles per instruction
        of the inner loop (:func:`ubpdsl.armcost.call_cost`); the static llvm-mca model without qemu."""
        from ubpdsl.autotune.mca import estimate_cycles
        from ubpdsl.runtime import build as rt_build
        from ubpdsl.runtime import qemu

        target = config.target_for(self.target)
        asm = rt_build.emit_asm(Path(built["ll"]).read_text(), target)
        if qemu.qemu_available():
            from ubpdsl.armcost import call_cost
            from ubpdsl.autotune.measure import make_x

            x = np.frombuffer(make_x(layer.problem.K, layer.n), np.float32).reshape(layer.problem.K, layer.n)
            packed = np.fromfile(built["packed"], np.uint8) if built.get("packed") else None
            sve_bits = 256 if target.scalable else None  # Neoverse V1, the SVE core of the mca model
            return call_cost(Path(built["obj"]), built["symbol"], x, packed, layer.problem.M, asm, self.target.name,
                             sve_bits=sve_bits)["cycles"]
        k = config.kernel
        est = estimate_cycles(asm, self.target.name, M=layer.problem.M, N=layer.problem.N, blocks=layer.blocks,
                              n=layer.n, tile=int(config.constants.get("TILE", 1)),
                              unroll=int(config.constants.get("UNROLL", 1)),
                              output_stationary=k.layout == "rotated" or k.aligned)
        return float(est["cycles"])

    # -- the loop ---------------------------------------------------------------------------------

    def tune_layer(self, layer: sp.Layer) -> LayerResult:
        """Tune ``layer`` up to the trial budget (resuming its study), or answer from the cache.

        Two tuners on this machine never work on one study at once: the second waits for the
        first (a per-study file lock) and then answers from the cache or tops the study up.
        """
        import hashlib
        import sys

        from ubpdsl.guard import exclusive_lock

        name = study_name(layer, self.target, self.key(layer), self.cache_mode)

        def waiting() -> None:
            print(f"note: layer {layer.name}: another tune is working on study {name}; waiting for it",
                  file=sys.stderr, flush=True)

        lock = hashlib.sha256(name.encode()).hexdigest()[:32]  # layer names may be long or non-ASCII
        with exclusive_lock(self.cache_root / "autotune" / "locks" / f"{lock}.lock", on_wait=waiting):
            return self._tune_layer(layer)

    def _tune_layer(self, layer: sp.Layer) -> LayerResult:
        import optuna
        from optuna.trial import TrialState

        s = self.settings
        default = self.default_config
        key = self.key(layer)
        if not s.force:
            cached = self.cached_result(layer, key)
            if cached is not None:
                return cached
        name = study_name(layer, self.target, key, self.cache_mode)
        sampler = optuna.samplers.TPESampler(multivariate=True, seed=s.seed + os.getpid() % 1000,
                                             n_startup_trials=max(4, min(10, s.trials // 3)))
        try:
            study = optuna.create_study(study_name=name, storage=self.storage, sampler=sampler,
                                        direction="minimize", load_if_exists=True)
        except optuna.exceptions.DuplicatedStudyError:  # created concurrently by another process
            study = optuna.load_study(study_name=name, storage=self.storage, sampler=sampler)
        study.set_user_attr("layer", layer.name)
        study.set_user_attr("cache", self.cache_mode)
        self._recover(study)
        if not study.trials:
            seeds = sp.seed_configs(layer, self.target, s.weights)
            # warm start: the best configs of the layers tuned before in this run
            seeds += [c for c in self.recent[-3:] if c not in seeds
                      and sp.infeasible(c, layer, self.target, s.weights) is None]
            if s.variants:  # a restricted search: each searched kernel at its defaults, then the seeds in it
                seeds = [sp.default_config(self.target, v) for v in s.variants] + seeds
                seeds = [c for i, c in enumerate(seeds) if c.variant in s.variants and c not in seeds[:i]
                         and sp.infeasible(c, layer, self.target, s.weights) is None]
            for c in seeds:
                study.enqueue_trial(sp.trial_params(c, self.target, s.variants), user_attrs={"seed": True},
                                    skip_if_exists=True)

        ref_built = self.compile(layer, default)
        ref_entry = self._entry("default", layer, ref_built)
        ref_y = self._reference_y(layer)
        ref_cost = self.estimate_cost(layer, default, ref_built) if self.estimate else None
        asked, limit = 0, 6 * s.trials + 10
        inflight: list[tuple[Any, sp.Config, cf.Future[dict[str, Any]]]] = []
        asked_trials: list[Any] = []
        try:
            while True:
                trials = study.get_trials(deepcopy=False)
                done, _ = count_finished(trials)
                room = s.trials - done - len(inflight)
                new: list[tuple[Any, sp.Config]] = []
                if room > 0 and asked < limit:
                    measured = {t.user_attrs.get("config"): t for t in trials
                                if t.state == TrialState.COMPLETE and "config" in t.user_attrs}
                    for _ in range(max(1, min(max(1, s.jobs), room))):
                        trial = study.ask()
                        asked += 1
                        asked_trials.append(trial)
                        config = self._propose(study, trial, layer, measured)
                        if config is not None:
                            new.append((trial, config))
                if not inflight and not new:
                    if room <= 0 or asked >= limit:
                        break
                    continue
                # compile the new batch in the workers while the previous batch is timed here
                futures = self.compiler.submit([self._job(layer, c) for _, c in new])
                for trial, config, fut in inflight:
                    value = self._evaluate(layer, trial, config, self.compiler.result(fut), ref_entry, ref_y,
                                           ref_cost)
                    try:
                        if value is None:
                            study.tell(trial, state=TrialState.FAIL)
                        else:
                            study.tell(trial, value)
                    except optuna.exceptions.UpdateFinishedTrialError:
                        pass  # another process (on another machine) declared the trial abandoned
                    self._notify(layer, value)
                inflight = [(t, c, f) for (t, c), f in zip(new, futures, strict=True)]
        except BaseException:
            # Ctrl-C or a crash of the tuner itself: hand unfinished trials back for the next run.
            for trial in asked_trials:
                self._abandon(study, trial._trial_id, None)
            raise
        return self._finish(study, layer, key, default)

    def cached_result(self, layer: sp.Layer, key: str | None = None) -> LayerResult | None:
        """The tuned-config cache's answer for ``layer`` (at least ``trials`` trials, same timing mode), or None."""
        key = key or self.key(layer)
        hit = self.tuned.get(key)
        if hit is None or hit.get("trials", 0) < self.settings.trials:
            return None
        # an entry without a timing mode predates cold timing: it was timed warm (or estimated)
        hit_cache = hit.get("cache", None if hit.get("estimate") else "warm")
        if hit_cache != self.cache_mode:
            return None
        return LayerResult(layer.name, layer.n, sp.Config.from_json(hit["best"]), self.default_config,
                           float(hit["best_value"]), int(hit["trials"]), int(hit.get("failed", 0)), True,
                           bool(hit.get("estimate")), [tuple(h) for h in hit.get("history", [])],
                           hit.get("study", ""), key, hit.get("final"), hit_cache)

    def _confirm(self, layer: sp.Layer, complete: list[Any], default: sp.Config, best_cfg: sp.Config,
                 best_value: float, top: int = 3) -> tuple[sp.Config, float]:
        """Re-time the few best configs side by side, longer: the noisiest lucky trial does not win."""
        ranked: list[sp.Config] = []
        for t in sorted(complete, key=lambda t: t.value):
            c = sp.Config.from_json(json.loads(t.user_attrs["config"]))
            if c not in ranked and c != default:
                ranked.append(c)
            if len(ranked) == top:
                break
        if len(ranked) < 2:
            return best_cfg, best_value
        try:
            builds = [self.compile(layer, c) for c in [default, *ranked]]
        except UbpError:
            return best_cfg, best_value
        entries = [self._entry(f"c{i}", layer, b) for i, b in enumerate(builds)]
        out = self.measure(layer, entries, rounds=21, budget_s=0.5)
        if not out.ok:
            return best_cfg, best_value
        ratios = [r["ratio"] for r in out.result["results"][1:]]
        i = min(range(len(ratios)), key=ratios.__getitem__)
        return ranked[i], float(ratios[i])

    def remember_final(self, res: LayerResult, final: dict[str, Any]) -> None:
        """Store the summary numbers with the tuned-config cache entry (an unchanged rerun reuses them)."""
        entry = self.tuned.get(res.key) if res.key else None
        if entry is not None:
            self.tuned.put(res.key, {**entry, "final": final})

    def _propose(self, study: Any, trial: Any, layer: sp.Layer, measured: dict[str, Any]) -> sp.Config | None:
        """The trial's config, or None when it was already told (infeasible, or measured before)."""
        from optuna.trial import TrialState

        s = self.settings
        trial.set_user_attr("host", _HOST)
        trial.set_user_attr("pid", os.getpid())
        if self._heartbeat is not None:
            self._heartbeat.add(trial._trial_id)
        config = sp.suggest(trial, layer, self.target, s.weights, s.variants)
        trial.set_user_attr("config", config.key())
        trial.set_user_attr("label", config.label())
        why = sp.infeasible(config, layer, self.target, s.weights)
        if why is not None:
            trial.set_user_attr("infeasible", why)
            study.tell(trial, state=TrialState.PRUNED)
            return None
        prev = measured.get(config.key())
        if prev is not None:
            trial.set_user_attr("duplicate_of", prev.number)
            for k in ("seconds", "ref_seconds", "gflops", "cycles", "estimate"):
                if k in prev.user_attrs:
                    trial.set_user_attr(k, prev.user_attrs[k])
            study.tell(trial, prev.value)
            self._notify(layer, prev.value)
            return None
        return config

    def _notify(self, layer: sp.Layer, value: float | None) -> None:
        if self.on_trial is not None:
            self.on_trial(layer.name, 1, value)

    def _evaluate(self, layer: sp.Layer, trial: Any, config: sp.Config, built: dict[str, Any],
                  ref_entry: dict[str, Any], ref_y: np.ndarray | None, ref_cost: float | None) -> float | None:
        if "error" in built:
            trial.set_user_attr("fail_reason", built["error"][:500])
            return None
        is_default = config.key() == self.default_config.key()  # the reference: 1.0 by definition
        if self.estimate:
            try:
                cycles = self.estimate_cost(layer, config, built)
            except UbpError as exc:
                trial.set_user_attr("fail_reason", f"cost model: {str(exc)[:300]}")
                return None
            trial.set_user_attr("cycles", cycles)
            trial.set_user_attr("estimate", True)
            return 1.0 if is_default else (cycles / ref_cost if ref_cost else None)
        out = self.measure(layer, [ref_entry, self._entry("candidate", layer, built)])
        if not out.ok:
            trial.set_user_attr("fail_reason", f"{out.status}: {out.message}"[:500])
            return None
        ref, cand = out.result["results"]
        wrong = self._check(layer, ref_y, cand)
        if wrong:
            trial.set_user_attr("fail_reason", wrong)
            return None
        trial.set_user_attr("seconds", cand["median_s"])
        trial.set_user_attr("ref_seconds", ref["median_s"])
        trial.set_user_attr("gflops", layer.useful_flops / cand["median_s"] / 1e9)
        return 1.0 if is_default else float(cand["ratio"])

    def _abandon(self, study: Any, trial_id: int, config: sp.Config | None) -> None:
        from optuna.trial import TrialState

        storage = study._storage
        try:
            frozen = storage.get_trial(trial_id)
            if frozen.state != TrialState.RUNNING:
                return
            storage.set_trial_user_attr(trial_id, "fail_reason", "abandoned")
            storage.set_trial_state_values(trial_id, TrialState.FAIL)
            if frozen.params:
                study.enqueue_trial(dict(frozen.params), user_attrs={"retry_of": frozen.number}, skip_if_exists=False)
        except Exception:  # noqa: BLE001 - best effort; the next run recovers by pid
            pass

    def _recover(self, study: Any) -> None:
        """Fail and re-enqueue trials left RUNNING by dead tuning processes."""
        from optuna.trial import TrialState

        try:
            import optuna

            if getattr(study._storage, "get_heartbeat_interval", lambda: None)():
                optuna.storages.fail_stale_trials(study)
        except Exception:  # noqa: BLE001
            pass
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if any("pid" not in t.user_attrs for t in running):
            # A process killed inside study.ask() (the sampler runs after the trial is created) leaves
            # a RUNNING trial with no owner; a live owner records itself within a moment.
            time.sleep(_OWNER_GRACE_S)
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        for t in running:
            host, pid = t.user_attrs.get("host"), t.user_attrs.get("pid")
            if pid is None or host == _HOST and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                self._abandon(study, t._trial_id, None)

    def _finish(self, study: Any, layer: sp.Layer, key: str, default: sp.Config) -> LayerResult:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        done, failed = count_finished(trials)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        history = [(t.number, t.value if t.state == TrialState.COMPLETE else None)
                   for t in trials if t.state in (TrialState.COMPLETE, TrialState.FAIL)
                   and t.user_attrs.get("fail_reason") != "abandoned"]
        if not complete:
            raise TuneError(f"layer {layer.name}: every candidate failed ({failed} failures); "
                            f"see the study {study.study_name}")
        best = min(complete, key=lambda t: t.value)
        best_cfg = sp.Config.from_json(json.loads(best.user_attrs["config"]))
        best_value = float(best.value)
        if not self.estimate:
            best_cfg, best_value = self._confirm(layer, complete, default, best_cfg, best_value)
        # The default is the reference (ratio 1): never return something measured slower.
        if best_value > 1.0:
            best_cfg, best_value = default, 1.0
        result = LayerResult(layer.name, layer.n, best_cfg, default, best_value, done, failed, False, self.estimate,
                             history, study.study_name, key, cache=self.cache_mode)
        if best_cfg not in self.recent:
            self.recent.append(best_cfg)
        self.tuned.put(key, {"layer": layer.name, "best": best_cfg.to_json(), "best_value": best_value,
                             "trials": done, "failed": failed, "estimate": self.estimate,
                             "history": history, "study": study.study_name, "target": self.target.name,
                             "cache": self.cache_mode, "time": time.time()})
        return result


def _symbol(layer: str) -> str:
    from ubpdsl.names import kernel_symbol

    return kernel_symbol(layer)


def geomean(values: Iterable[float]) -> float:
    vals = [v for v in values if v and v > 0 and math.isfinite(v)]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")
