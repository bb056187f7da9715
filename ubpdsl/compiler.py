"""The compiler driver: DSL kernel + layer mask + target -> IR stages, or a cached ``.so``.

Stages (what ``ubpdsl emit --stage`` prints):

* ``ubp``      the kernel in the ``ubp`` dialect, straight from the front end;
* ``lowered``  after the Python ``ubp`` lowering: scf / vector / memref / arith;
* ``llvm``     the LLVM dialect;
* ``llvm-ir``  LLVM IR text;
* ``asm``      target assembly (opt -O3 + llc).

:func:`compile_kernel` builds a self-contained shared object (no DT_NEEDED, no libc calls)
with a C header and a manifest, through a compile cache keyed like Triton's: toolchain
versions, target, compiler and kernel source, constants and (for mask-specialised kernels)
the mask's content hash. Data-driven kernels depend only on the layer's shape, so one
build serves every mask of that shape.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlir import ir

import ubpdsl
from ubpdsl import abi
from ubpdsl.dialects import lowering
from ubpdsl.dialects.ubp import make_context
from ubpdsl.errors import BuildError, DSLError, MaskError, UbpError
from ubpdsl.identity import atomic_copy, atomic_write, blocks_hash, bytes_sha256, layer_hash
from ubpdsl.language.core import PY_RANGE, HelperFunction, KernelFunction
from ubpdsl.language.frontend import KernelSpec, PatternSpec, VectorShape, build_ubp_module
from ubpdsl.names import file_stem
from ubpdsl.packing import (
    MAX_DIM,
    BlockData,
    PatternData,
    block_data,
    check_shape,
    layout_description,
    library_taps,
    pack,
    pack_pattern,
    pattern_data,
    pattern_layout_description,
)
from ubpdsl.runtime import build as rt_build
from ubpdsl.runtime.cache import CompileCache
from ubpdsl.runtime.header import render_header
from ubpdsl.runtime.targets import Target, get_target
from ubpdsl.runtime.toolchain import toolchain_versions

STAGES = ("ubp", "lowered", "llvm", "llvm-ir", "asm")
_SYMBOL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Problem:
    """One layer to compile for: its GEMM view and blocks (weights needed for baked builds)."""

    name: str
    M: int
    K: int
    N: int
    rows: np.ndarray
    cols: np.ndarray
    weight: np.ndarray | None

    @classmethod
    def from_mask(cls, mask: Any) -> Problem:
        """From a :class:`ubpdsl.masks.LayerMask`."""
        weight = None if mask.weight is None else np.asarray(mask.weight, np.float32).reshape(mask.R, mask.C)
        return cls(mask.name, int(mask.R), int(mask.C), int(mask.block), np.asarray(mask.rows),
                   np.asarray(mask.cols), weight)

    def blocks_hash(self) -> str:
        """sha256 of the block structure (:func:`ubpdsl.identity.blocks_hash`)."""
        return blocks_hash(self.M, self.K, self.N, self.rows, self.cols)

    def content_hash(self) -> str:
        """sha256 of blocks and weights (:func:`ubpdsl.identity.layer_hash`)."""
        return layer_hash((self.M, self.K), self.N, self.rows, self.cols, self.weight)

    def block_data(self, layout: str, aligned: bool) -> BlockData:
        if self.weight is None:
            raise MaskError(f"layer {self.name}: masks.npz has no weights for this layer; the kernel needs them "
                            "(save the mask with weights, e.g. `ubpdsl prune` writes them)")
        return block_data(self.M, self.K, self.N, self.rows, self.cols, self.weight, layout, aligned=aligned,
                          layer=self.name)


@dataclass(frozen=True)
class PatternProblem:
    """One pattern-pruned 3x3 convolution to compile a direct-convolution kernel for.

    ``ids[o, c]`` indexes ``library`` (``[P, 3, 3]`` 0/1, as :class:`ubpdsl.prune.scheme_masks.PatternMask`),
    -1 = kernel removed; ``weight`` is ``float32[Cout, Cin, 3, 3]`` (None: shape-only, for
    emitting); the image is ``height`` x ``width`` (stride 1, padding 1). M = Cout, K = Cin.
    """

    name: str
    M: int
    K: int
    height: int
    width: int
    library: np.ndarray
    ids: np.ndarray
    weight: np.ndarray | None

    N = 1  # the GEMM view's block height (a pattern layer has no blocks)

    @classmethod
    def from_mask(cls, mask: Any, weight: Any, height: int, width: int) -> PatternProblem:
        """From a :class:`~ubpdsl.prune.scheme_masks.PatternMask`, its weights and the image size."""
        cout, cin = int(mask.shape[0]), int(mask.shape[1])
        w = None if weight is None else np.asarray(weight, np.float32).reshape(cout, cin, 3, 3)
        return cls(mask.name, cout, cin, int(height), int(width), np.asarray(mask.library), np.asarray(mask.ids), w)

    @property
    def pixels(self) -> int:
        return self.height * self.width

    def check(self) -> None:
        check_shape(self.M, self.K, 1, layer=self.name)
        for what, v in (("height", self.height), ("width", self.width)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= MAX_DIM:
                raise MaskError(f"layer {self.name}: image {what} must be an integer in 1..{MAX_DIM}, got {v!r}")
        if self.height * self.width > MAX_DIM:
            raise MaskError(f"layer {self.name}: image of {self.height}x{self.width} pixels exceeds {MAX_DIM}")
        if np.shape(self.ids) != (self.M, self.K):
            raise MaskError(f"layer {self.name}: pattern ids must have shape [{self.M}, {self.K}]")

    def taps(self) -> np.ndarray:
        """int32[P, 4]: the library as tap indices (what the kernel is specialised on)."""
        return library_taps(self.library, layer=self.name)

    def pattern_data(self) -> PatternData:
        if self.weight is None:
            raise MaskError(f"layer {self.name}: the pattern kernel needs the layer's weights")
        return pattern_data(self.library, self.ids, self.weight, layer=self.name)

    def content_hash(self) -> str:
        """sha256 of shape, image, library, ids and weights."""
        h = hashlib.sha256(f"pattern\0{self.M}\0{self.K}\0{self.height}\0{self.width}\0".encode())
        for arr in (self.taps(), np.asarray(self.ids, np.int16)):
            h.update(np.ascontiguousarray(arr).tobytes())
        if self.weight is not None:
            h.update(np.ascontiguousarray(self.weight, np.float32).tobytes())
        return h.hexdigest()


def parse_image(text: str) -> tuple[int, int]:
    """``"H,W"`` (or ``"HxW"``) -> (H, W); a one-line UbpError otherwise."""
    parts = text.replace("x", ",").split(",")
    try:
        h, w = (int(p) for p in parts)
    except ValueError:
        raise UbpError(f"--image must be H,W (two positive integers), got {text!r}") from None
    if not (1 <= h <= MAX_DIM and 1 <= w <= MAX_DIM and h * w <= MAX_DIM):
        raise UbpError(f"--image {h},{w}: H, W and H*W must be in 1..{MAX_DIM}")
    return h, w


def load_pattern_problems(mask_path: str | Path, schemes_path: str | Path, image: tuple[int, int],
                          layers: tuple[str, ...] = ()) -> list[PatternProblem]:
    """The pattern layers of the masks.npz (format 2) at ``schemes_path`` (usually ``mask_path``
    itself) with their weights from ``mask_path``.

    masks.npz holds a pattern layer's kept weights as N = 1 blocks of its GEMM view
    [Cout, Cin*9] beside its library and pattern ids. ``image`` is the (H, W) every layer
    runs on (stride 1, padding 1). A layer without weights, or whose shape disagrees, is a
    one-line MaskError.
    """
    from ubpdsl.masks import load_masks
    from ubpdsl.prune.scheme_masks import load_schemes

    patterns, _ = load_schemes(schemes_path)
    masks = load_masks(mask_path)
    if layers:
        missing = [n for n in layers if n not in patterns]
        if missing:
            raise MaskError(f"{schemes_path} has no pattern layer {missing[0]!r}; pattern layers: "
                            f"{', '.join(patterns) or 'none'}")
        patterns = {n: patterns[n] for n in layers}
    if not patterns:
        raise MaskError(f"{schemes_path} holds no pattern layers")
    out = []
    for name, pm in patterns.items():
        cout, cin = pm.shape[:2]
        m = masks.get(name)
        if m is None or m.weight is None:
            raise MaskError(f"layer {name}: {mask_path} has no weights for this pattern layer")
        if (int(m.R), int(m.C)) != (cout, cin * 9):
            raise MaskError(f"layer {name}: masks.npz has a {m.R}x{m.C} weight, the pattern is {cout}x{cin}x3x3")
        w = np.asarray(m.weight, np.float32).reshape(cout, cin, 3, 3) * pm.dense_mask()
        out.append(PatternProblem.from_mask(pm, w.astype(np.float32), *image))
    return out


def random_pattern_problem(cout: int, cin: int, height: int, width: int, removed: float = 0.25,
                           num_patterns: int = 8, seed: int = 0, name: str | None = None) -> PatternProblem:
    """A reproducible random pattern layer: Gaussian weights, a random library of ``num_patterns``
    patterns, random pattern ids and a fraction ``removed`` of the kernels removed."""
    from ubpdsl.prune.pattern import all_patterns

    rng = np.random.default_rng(seed)
    cands = all_patterns()
    library = cands[rng.choice(len(cands), num_patterns, replace=False)].reshape(num_patterns, 3, 3)
    ids = rng.integers(0, num_patterns, (cout, cin)).astype(np.int16)
    ids[rng.random((cout, cin)) < removed] = -1
    lib = np.concatenate([library.reshape(num_patterns, 9), np.zeros((1, 9), bool)])
    w = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32) * lib[ids.astype(np.int64)].reshape(cout, cin, 3, 3)
    return PatternProblem(name or f"pattern_{cout}x{cin}_{height}x{width}", cout, cin, height, width,
                          library.astype(np.uint8), ids, w.astype(np.float32))


def random_problem(M: int, K: int, N: int, sparsity: float, seed: int = 0, *, aligned: bool = False,
                   name: str | None = None) -> Problem:
    """A reproducible random layer: Gaussian weights, blocks chosen by BED (unaligned) or by
    aligned_select (ABP, the same number of blocks where M allows it)."""
    from ubpdsl.prune.selectors import aligned_select, bed_select, blocks_to_mask, budget

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((M, K)).astype(np.float32)
    m = budget(M, K, N, sparsity)
    if aligned:
        rows, cols = aligned_select(np.abs(w), min(m, K * (M // N)), N)
    else:
        rows, cols = bed_select(np.abs(w), m, N)
    w = w * blocks_to_mask(rows, cols, M, K, N)
    label = name or f"{'aligned' if aligned else 'random'}_{M}x{K}"
    return Problem(label, M, K, N, rows, cols, w.astype(np.float32))


def resolve_target(target: str | Target, vector_bits: int | None = None) -> Target:
    """The target, narrowed to ``vector_bits`` wide registers when asked (fixed-width targets).

    On x86-64 a 256-bit build drops the AVX-512 features (AVX2 + FMA code), a 128-bit build
    also drops AVX (SSE code); on NEON only 128 bits exist; SVE's width is the hardware's.
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    return tgt.narrowed(vector_bits)


def _spec(kernel: KernelFunction, problem: Problem | PatternProblem, target: Target,
          constants: dict[str, Any] | None, specialize: bool, symbol: str,
          check_bounds: bool = False) -> tuple[KernelSpec, BlockData | PatternData | None]:
    if not _SYMBOL_RE.match(symbol):
        raise DSLError(f"symbol {symbol!r} is not a valid C identifier")
    if kernel.pattern != isinstance(problem, PatternProblem):
        if kernel.pattern:
            raise DSLError(f"kernel {kernel.name!r} is a direct convolution over a ubl.PatternSparse weight: "
                           "compile it for a pattern layer (a PatternMask), not a block mask")
        raise DSLError(f"layer {problem.name} is a pattern layer: it needs a ubl.PatternSparse kernel "
                       f"(e.g. pattern_direct), not {kernel.name!r}")
    vec = VectorShape(target.vector_lanes_f32, target.scalable, cheap_masks=target.arch == "x86_64")
    if isinstance(problem, PatternProblem):
        problem.check()
        if specialize or check_bounds:
            raise DSLError(f"kernel {kernel.name!r}: pattern kernels are data-driven and unchecked "
                           "(no --specialize, no --check-bounds)")
        consts = kernel.resolve_constants(target.kernel_constants(kernel.constexprs, constants))
        pspec = PatternSpec(problem.height, problem.width, problem.taps())
        data = problem.pattern_data() if problem.weight is not None else None
        return KernelSpec(symbol, problem.M, problem.K, 1, vec, consts, None, False, pspec), data
    check_shape(problem.M, problem.K, problem.N, layer=problem.name)  # before anything is sized from them
    consts = kernel.resolve_constants(target.kernel_constants(kernel.constexprs, constants))
    baked = None
    data = None
    if problem.weight is not None or specialize or kernel.needs_specialized:
        data = problem.block_data(kernel.layout, kernel.aligned)
    if specialize or kernel.needs_specialized:
        baked = data
    return KernelSpec(symbol, problem.M, problem.K, problem.N, vec, consts, baked, bool(check_bounds)), data


def _stage_text(kernel: KernelFunction, spec: KernelSpec, target: Target, stage: str,
                epilogue: bool | None = None) -> str:
    if stage not in STAGES:
        raise UbpError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    ctx = make_context()
    with ctx, ir.Location.unknown():
        module = build_ubp_module(kernel, spec, epilogue)
        if stage == "ubp":
            return str(module)
        lowering.lower_to_upstream(module)
        if stage == "lowered":
            return str(module)
        lowering.lower_to_llvm(module)
        if stage == "llvm":
            return str(module)
        llvm_ir = lowering.translate_to_llvm_ir(module)
    if stage == "llvm-ir":
        return llvm_ir
    return rt_build.emit_asm(llvm_ir, target)


def emit(kernel: KernelFunction, problem: Problem | PatternProblem, target: str | Target = "host",
         stage: str = "ubp", *,
         constants: dict[str, Any] | None = None, specialize: bool = False, symbol: str = "ubp_kernel",
         vector_bits: int | None = None, check_bounds: bool = False, epilogue: bool | None = None) -> str:
    """The kernel at one compilation stage, as text (``check_bounds``, ``epilogue``: see
    :func:`compile_kernel`)."""
    tgt = resolve_target(target, vector_bits)
    spec, _ = _spec(kernel, problem, tgt, constants, specialize, symbol, check_bounds)
    return _stage_text(kernel, spec, tgt, stage, epilogue)


#: What decides a build besides the kernel: every file of these packages (walked, not listed),
#: and these modules of the ubpdsl package.
_COMPILER_PACKAGES = ("ubpdsl.language", "ubpdsl.dialects", "ubpdsl.runtime")
_COMPILER_MODULES = ("packing.py", "compiler.py", "abi.py")


def compiler_sources() -> list[tuple[str, Path]]:
    """(name, path) of every file the compiler fingerprint covers, sorted by name."""
    import importlib

    root = Path(__file__).resolve().parent
    files = [(f"ubpdsl/{m}", root / m) for m in _COMPILER_MODULES if (root / m).is_file()]
    for pkg in _COMPILER_PACKAGES:
        pkg_dir = Path(importlib.import_module(pkg).__file__).resolve().parent
        files += [(f"{pkg}/{f.relative_to(pkg_dir).as_posix()}", f) for f in pkg_dir.rglob("*")
                  if f.is_file() and "__pycache__" not in f.parts and f.suffix not in (".pyc", ".pyo")]
    return sorted(files)


@functools.cache
def compiler_fingerprint() -> str:
    """sha256 of everything in the compiler that decides its output: the ubpdsl version, the
    MLIR bindings' version and every source file (``.py``, ``.c``, ``.h`` ...) of the language,
    dialects and runtime packages plus the packing and compiler modules. Computed once per
    process (the code that runs is the code that was imported)."""
    import importlib.metadata

    h = hashlib.sha256(ubpdsl.__version__.encode() + b"\0")
    for dist in ("xtc-mlir-python-bindings",):
        try:
            h.update(f"{dist}={importlib.metadata.version(dist)}\0".encode())
        except importlib.metadata.PackageNotFoundError:
            h.update(f"{dist}=?\0".encode())
    for name, f in compiler_sources():
        h.update(f"{name}\0{f.stat().st_size}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def kernel_globals(kernel: KernelFunction) -> dict[str, Any]:
    """The module globals ``kernel`` reads, as JSON values for its cache key.

    Like Triton's JITFunction: every name the kernel body loads that is a global of its module
    (and every ``a.b.c`` attribute chain starting at one) is resolved now and keyed by value, so
    changing ``SCALE = 2.0`` to ``3.0`` rebuilds. Numbers, strings, tuples, modules, DSL builtins
    and functions of ubpdsl itself (whose source the compiler fingerprint covers) are supported;
    a ``@ubl.func`` helper is keyed by its source and, recursively, the globals it reads (so
    editing a helper rebuilds every kernel that calls it); any other value is a
    :class:`DSLError` naming the global and its line.
    """
    return _read_globals(kernel, set())


def _read_globals(fn: KernelFunction | HelperFunction, seen: set[int]) -> dict[str, Any]:
    """:func:`kernel_globals` of a kernel or helper; ``seen``: the helpers already keyed (a cycle ends)."""
    import ast

    out: dict[str, Any] = {}
    params = set(fn.params) if isinstance(fn, KernelFunction) else set(fn.signature.parameters)

    def chain(node: ast.AST) -> list[str] | None:
        if isinstance(node, ast.Name):
            return [node.id]
        if isinstance(node, ast.Attribute):
            base = chain(node.value)
            return None if base is None else [*base, node.attr]
        return None

    for node in (n for st in fn.tree.body for n in ast.walk(st)):
        names = chain(node) if isinstance(node, ast.Attribute | ast.Name) else None
        if not names or names[0] in params or names[0] not in fn.globals:
            continue
        value: Any = fn.globals[names[0]]
        for i in range(len(names)):
            if i:
                if not inspect.ismodule(value) or not hasattr(value, names[i]):
                    break  # an attribute of a value the front end interprets (X.n, W.rows ...)
                value = getattr(value, names[i])
            dotted = ".".join(names[: i + 1])
            if dotted not in out:
                out[dotted] = _global_key(value, dotted, fn, getattr(node, "lineno", fn.first_line), seen)
    return out


def _global_key(value: Any, name: str, fn: KernelFunction | HelperFunction, line: int, seen: set[int]) -> Any:
    import types

    if isinstance(value, HelperFunction):
        if id(value) in seen:  # keyed already (or a recursive helper, which the front end refuses)
            return ["func", value.name]
        seen.add(id(value))
        return ["func", value.name, value.source, _read_globals(value, seen)]
    if value is None or isinstance(value, bool | int | float | str):
        return [type(value).__name__, repr(value)]
    if isinstance(value, tuple | list):
        return [type(value).__name__, [_global_key(v, name, fn, line, seen) for v in value]]
    if isinstance(value, np.generic | np.ndarray):
        arr = np.asarray(value)
        return ["ndarray", arr.dtype.str, list(arr.shape), bytes_sha256(arr)]
    if inspect.ismodule(value):
        return ["module", value.__name__]
    if getattr(value, "__ubp_builtin__", None):
        return ["builtin", value.__ubp_builtin__]
    if isinstance(value, types.BuiltinFunctionType) or value is PY_RANGE:
        return ["builtin", getattr(value, "__qualname__", repr(value))]
    module = getattr(value, "__module__", None) or ""
    if module == "ubpdsl" or module.startswith("ubpdsl."):
        return ["ubpdsl", module, getattr(value, "__qualname__", type(value).__qualname__)]
    what = "kernel" if isinstance(fn, KernelFunction) else "helper"
    raise DSLError(f"{fn.filename}:{line}: {what} {fn.name!r} reads the global {name!r} of type "
                   f"{type(value).__name__}, which cannot be part of its compile key; use a number, string, "
                   "tuple or a constexpr parameter")


@dataclass
class CompiledKernel:
    """A built kernel: its .so, header, manifest and (data-driven) packed weights."""

    symbol: str
    variant: str
    target: Target
    M: int
    K: int
    N: int
    constants: dict[str, Any]
    specialized: bool
    so: Path
    obj: Path
    header: Path
    manifest: dict[str, Any]
    packed: np.ndarray | None
    cache_hit: bool = False
    _host: Any = field(default=None, repr=False)

    @property
    def has_epilogue(self) -> bool:
        """True if the library exports ``<symbol>_ep`` (fused bias, residual, clamp)."""
        return bool(self.manifest.get("epilogue"))

    def __call__(self, x: np.ndarray, y: np.ndarray | None = None, *, sve_bits: int | None = None,
                 bias: np.ndarray | None = None, residual: np.ndarray | None = None,
                 clamp: tuple[float | None, float | None] | None = None) -> np.ndarray:
        """Y = W @ x: natively on the host, under qemu for AArch64 targets (correctness only).

        With ``bias`` [M], ``residual`` [M, n] or ``clamp`` (lo, hi; None for an open side) the
        ``_ep`` entry point stores clamp(W x + bias + residual, lo, hi) instead.
        """
        from ubpdsl.runtime.loader import HostKernel, epilogue_args

        ep = epilogue_args(self.symbol, self.M, np.shape(x)[-1] if np.ndim(x) == 2 else 0, bias, residual, clamp,
                           self.has_epilogue)
        if self.target.runner == "qemu-aarch64":
            from ubpdsl.runtime import qemu

            bits = sve_bits if self.target.scalable else None
            return qemu.run_aarch64(self.obj, self.symbol, np.ascontiguousarray(x, np.float32), self.packed,
                                    self.M, sve_bits=bits, epilogue=ep)
        if self._host is None:
            self._host = HostKernel(self.so, self.symbol, self.M, self.K, epilogue=self.has_epilogue)
        return self._host(x, self.packed, y, epilogue=ep)

    def save(self, out_dir: Path) -> dict[str, Path]:
        """Copy the artifacts to ``out_dir``: ``<layer>.<target>.so`` (its DT_SONAME), ``<layer>.h``
        and, for data-driven kernels, the packed weights ``<layer>.packed.bin``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        so_name = self.manifest["soname"]
        layer = so_name[: -len(f".{self.target.name}.so")]
        files = {"so": out_dir / so_name, "header": out_dir / f"{layer}.h"}
        atomic_copy(self.so, files["so"])  # a program may have the old one loaded: never rewrite it in place
        atomic_copy(self.header, files["header"])
        if self.packed is not None:
            files["packed"] = out_dir / f"{layer}.packed.bin"
            atomic_write(files["packed"], self.packed.tobytes())
        return files


def compile_kernel(kernel: KernelFunction, problem: Problem | Any, target: str | Target = "host", *,
                   constants: dict[str, Any] | None = None, specialize: bool = False,
                   symbol: str | None = None, cache: CompileCache | None = None,
                   vector_bits: int | None = None, check_bounds: bool = False,
                   epilogue: bool | None = None) -> CompiledKernel:
    """Compile ``kernel`` for one layer and target into a cached, self-contained ``.so``.

    The library exports ``symbol`` and, unless ``epilogue=False``, ``symbol_ep`` (the fused
    epilogue, :data:`ubpdsl.abi.C_EP_SIGNATURE`) when the kernel allows it (``epilogue=None``;
    ``True`` makes a kernel that does not a :class:`DSLError`); ``manifest["epilogue"]`` says
    which.

    ``check_bounds=True`` builds a checking kernel: every load, store and prefetch checks its
    row and columns, every block index its range, and a violation skips the access and makes
    the kernel return :data:`ubpdsl.abi.ERR_OUT_OF_BOUNDS` (slower; for testing kernels).
    """
    if not isinstance(problem, (Problem, PatternProblem)):
        problem = Problem.from_mask(problem)
    pattern = isinstance(problem, PatternProblem)
    tgt = resolve_target(target, vector_bits)
    safe_name = file_stem(problem.name)
    symbol = symbol or (abi.pattern_symbol(safe_name) if pattern else "ubp_" + safe_name)
    soname = f"{safe_name}.{tgt.name}.so"  # the file name programs linked against it will look for
    spec, data = _spec(kernel, problem, tgt, constants, specialize, symbol, check_bounds)
    cache = cache or CompileCache()
    baked = spec.baked is not None
    mask_hash = None if data is None else problem.content_hash()  # blocks and weights
    key_parts = {
        "toolchain": toolchain_versions(),
        "compiler": compiler_fingerprint(),
        "target": tgt.cache_key(),
        "kernel": kernel.name,
        "kernel_source": kernel.source,
        "kernel_globals": kernel_globals(kernel),
        "kernel_flags": [kernel.layout, kernel.aligned, kernel.needs_specialized],
        "layout": kernel.layout,
        "constants": spec.constants,
        "symbol": symbol,
        "soname": soname,
        "shape": [problem.M, problem.K, problem.N],
        "mask": mask_hash if baked else None,
        "check_bounds": spec.check_bounds,
        "epilogue": epilogue,
    }
    if pattern:  # the kernel is specialised on the image and the library, not on the weights
        key_parts["pattern"] = [problem.height, problem.width, spec.pattern.library.tolist()]
    key = cache.key(**key_parts)
    if baked or data is None:
        packed = None
    else:
        packed = pack_pattern(data) if pattern else pack(data)
    manifest = {
        "format": "ubpdsl.kernel/1",
        "symbol": symbol,
        "soname": soname,
        "layer": problem.name,
        "variant": kernel.name,
        "target": tgt.name,
        "triple": tgt.triple,
        "cpu": tgt.cpu,
        "features": tgt.features,
        "constants": spec.constants,
        "vector_bits": spec.vector.lanes * 32,
        "specialized": baked,
        "check_bounds": spec.check_bounds,
        "M": problem.M, "K": problem.K, "N": problem.N,
        **({"kind": "pattern", "height": problem.height, "width": problem.width} if pattern else {}),
        "mask_hash": mask_hash,
        "toolchain": key_parts["toolchain"],
        "ubpdsl": ubpdsl.__version__,
        "cache_key": key,
    }
    hit = cache.get(key)
    if hit is None:
        llvm_ir = _stage_text(kernel, spec, tgt, "llvm-ir", epilogue)
        manifest["epilogue"] = f"@{abi.ep_symbol(symbol)}(" in llvm_ir
        header = render_header(symbol, M=problem.M, K=problem.K, N=problem.N,
                               description=f"layer {problem.name}: variant {kernel.name}, target {tgt.name}, "
                                           f"constants {json.dumps(spec.constants, sort_keys=True)}",
                               packed_layout=pattern_layout_description() if pattern
                               else layout_description(kernel.layout), baked=baked,
                               check_bounds=spec.check_bounds, epilogue=manifest["epilogue"])
        with tempfile.TemporaryDirectory(prefix="ubp-build-") as tmp:
            art = rt_build.build_shared_object(llvm_ir, tgt, Path(tmp), soname[: -len(".so")], header)
            if symbol not in art.symbols:
                raise BuildError(f"{art.so}: does not export {symbol}")
            hit = cache.put(key, {"kernel.so": art.so, "kernel.o": art.obj, "kernel.h": art.header,
                                  "kernel.ll": llvm_ir.encode(),
                                  "manifest.json": json.dumps(manifest, indent=2, sort_keys=True).encode()})
        cache_hit = False
    else:
        cache_hit = True
        try:
            manifest["epilogue"] = bool(json.loads((hit / "manifest.json").read_text()).get("epilogue"))
        except (OSError, ValueError):
            manifest["epilogue"] = False
    return CompiledKernel(symbol=symbol, variant=kernel.name, target=tgt, M=problem.M, K=problem.K, N=problem.N,
                          constants=spec.constants, specialized=baked, so=hit / "kernel.so", obj=hit / "kernel.o",
                          header=hit / "kernel.h", manifest=manifest, packed=packed, cache_hit=cache_hit)

