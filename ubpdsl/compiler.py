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

import dataclasses
import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from mlir import ir

import ubpdsl
from ubpdsl.dialects import lowering
from ubpdsl.dialects.ubp import make_context
from ubpdsl.errors import BuildError, DSLError, MaskError, TargetError, UbpError
from ubpdsl.language.core import KernelFunction
from ubpdsl.language.frontend import KernelSpec, VectorShape, build_ubp_module
from ubpdsl.names import file_stem
from ubpdsl.packing import BlockData, block_data, layout_description, pack
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

    def block_data(self, layout: str, aligned: bool) -> BlockData:
        if self.weight is None:
            raise MaskError(f"layer {self.name}: masks.npz has no weights for this layer; the kernel needs them "
                            "(save the mask with weights, e.g. `ubpdsl prune` writes them)")
        return block_data(self.M, self.K, self.N, self.rows, self.cols, self.weight, layout, aligned=aligned,
                          layer=self.name)


def resolve_target(target: str | Target, vector_bits: int | None = None) -> Target:
    """The target, narrowed to ``vector_bits`` wide registers when asked (fixed-width targets).

    On x86-64 a 256-bit build drops the AVX-512 features (AVX2 + FMA code), a 128-bit build
    also drops AVX (SSE code); on NEON only 128 bits exist; SVE's width is the hardware's.
    """
    tgt = target if isinstance(target, Target) else get_target(target)
    if vector_bits is None or vector_bits == tgt.vector_bits:
        return tgt
    if tgt.scalable:
        raise TargetError(f"target {tgt.name}: the vector length is the hardware's (scalable); "
                          "vector_bits cannot be set")
    if vector_bits not in (128, 256) or vector_bits > tgt.vector_bits or tgt.arch != "x86_64":
        raise TargetError(f"target {tgt.name}: vector_bits must be 128 or 256 and at most {tgt.vector_bits} "
                          f"(x86-64 only), got {vector_bits}")
    drop = ("avx512",) if vector_bits == 256 else ("avx512", "avx", "fma", "f16c", "vaes", "vpclmulqdq")
    feats = [f for f in tgt.features.split(",") if f and not any(f[1:].startswith(d) for d in drop)]
    feats += [f"-{d}" for d in ("avx512f",) + (("avx", "fma") if vector_bits == 128 else ())]
    return dataclasses.replace(tgt, name=tgt.name, features=",".join(feats), vector_bits=vector_bits)


def _spec(kernel: KernelFunction, problem: Problem, target: Target, constants: dict[str, Any] | None,
          specialize: bool, symbol: str) -> tuple[KernelSpec, BlockData | None]:
    if not _SYMBOL_RE.match(symbol):
        raise DSLError(f"symbol {symbol!r} is not a valid C identifier")
    if problem.M < 1 or problem.K < 1 or problem.N < 1:
        raise MaskError(f"layer {problem.name}: empty shape M={problem.M}, K={problem.K}, N={problem.N}")
    consts = kernel.resolve_constants(constants)
    baked = None
    data = None
    if problem.weight is not None or specialize or kernel.needs_specialized:
        data = problem.block_data(kernel.layout, kernel.aligned)
    if specialize or kernel.needs_specialized:
        baked = data
    vec = VectorShape(target.vector_lanes_f32, target.scalable, cheap_masks=target.arch == "x86_64")
    return KernelSpec(symbol, problem.M, problem.K, problem.N, vec, consts, baked), data


def _stage_text(kernel: KernelFunction, spec: KernelSpec, target: Target, stage: str) -> str:
    if stage not in STAGES:
        raise UbpError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    ctx = make_context()
    with ctx, ir.Location.unknown():
        module = build_ubp_module(kernel, spec)
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


def emit(kernel: KernelFunction, problem: Problem, target: str | Target = "host", stage: str = "ubp", *,
         constants: dict[str, Any] | None = None, specialize: bool = False, symbol: str = "ubp_kernel",
         vector_bits: int | None = None) -> str:
    """The kernel at one compilation stage, as text."""
    tgt = resolve_target(target, vector_bits)
    spec, _ = _spec(kernel, problem, tgt, constants, specialize, symbol)
    return _stage_text(kernel, spec, tgt, stage)


def _compiler_fingerprint() -> str:
    """Hash of the compiler's own sources: a change to them invalidates cached builds."""
    h = hashlib.sha256(ubpdsl.__version__.encode())
    root = Path(__file__).resolve().parent
    for mod in (root / "language" / "frontend.py", root / "packing.py", Path(lowering.__file__),
                Path(lowering.__file__).with_name("ubp.py"), Path(rt_build.__file__)):
        h.update(mod.read_bytes())
    return h.hexdigest()


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

    def __call__(self, x: np.ndarray, y: np.ndarray | None = None, *, sve_bits: int | None = None) -> np.ndarray:
        """Y = W @ x: natively on the host, under qemu for AArch64 targets (correctness only)."""
        if self.target.is_aarch64:
            from ubpdsl.runtime import qemu

            bits = sve_bits if self.target.scalable else None
            return qemu.run_aarch64(self.obj, self.symbol, np.ascontiguousarray(x, np.float32), self.packed,
                                    self.M, sve_bits=bits)
        if self._host is None:
            from ubpdsl.runtime.loader import HostKernel

            self._host = HostKernel(self.so, self.symbol, self.M, self.K)
        return self._host(x, self.packed, y)

    def save(self, out_dir: Path) -> dict[str, Path]:
        """Copy the artifacts to ``out_dir``: ``<layer>.<target>.so`` (its DT_SONAME), ``<layer>.h``
        and, for data-driven kernels, the packed weights ``<layer>.packed.bin``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        so_name = self.manifest["soname"]
        layer = so_name[: -len(f".{self.target.name}.so")]
        files = {"so": out_dir / so_name, "header": out_dir / f"{layer}.h"}
        shutil.copyfile(self.so, files["so"])
        shutil.copyfile(self.header, files["header"])
        if self.packed is not None:
            files["packed"] = out_dir / f"{layer}.packed.bin"
            self.packed.tofile(files["packed"])
        return files


def compile_kernel(kernel: KernelFunction, problem: Problem | Any, target: str | Target = "host", *,
                   constants: dict[str, Any] | None = None, specialize: bool = False,
                   symbol: str | None = None, cache: CompileCache | None = None,
                   vector_bits: int | None = None) -> CompiledKernel:
    """Compile ``kernel`` for one layer and target into a cached, self-contained ``.so``."""
    problem = problem if isinstance(problem, Problem) else Problem.from_mask(problem)
    tgt = resolve_target(target, vector_bits)
    safe_name = file_stem(problem.name)
    symbol = symbol or "ubp_" + safe_name
    soname = f"{safe_name}.{tgt.name}.so"  # the file name programs linked against it will look for
    spec, data = _spec(kernel, problem, tgt, constants, specialize, symbol)
    cache = cache or CompileCache()
    baked = spec.baked is not None
    mask_hash = _data_hash(data)
    key_parts = {
        "toolchain": toolchain_versions(),
        "compiler": _compiler_fingerprint(),
        "target": tgt.cache_key(),
        "kernel": kernel.name,
        "kernel_source": kernel.source,
        "layout": kernel.layout,
        "constants": spec.constants,
        "symbol": symbol,
        "soname": soname,
        "shape": [problem.M, problem.K, problem.N],
        "mask": mask_hash if baked else None,
    }
    key = cache.key(**key_parts)
    packed = None if baked or data is None else pack(data)
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
        "M": problem.M, "K": problem.K, "N": problem.N,
        "mask_hash": mask_hash,
        "toolchain": key_parts["toolchain"],
        "ubpdsl": ubpdsl.__version__,
        "cache_key": key,
    }
    hit = cache.get(key)
    if hit is None:
        llvm_ir = _stage_text(kernel, spec, tgt, "llvm-ir")
        header = render_header(symbol, M=problem.M, K=problem.K, N=problem.N,
                               description=f"layer {problem.name}: variant {kernel.name}, target {tgt.name}, "
                                           f"constants {json.dumps(spec.constants, sort_keys=True)}",
                               packed_layout=layout_description(kernel.layout), baked=baked)
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
    return CompiledKernel(symbol=symbol, variant=kernel.name, target=tgt, M=problem.M, K=problem.K, N=problem.N,
                          constants=spec.constants, specialized=baked, so=hit / "kernel.so", obj=hit / "kernel.o",
                          header=hit / "kernel.h", manifest=manifest, packed=packed, cache_hit=cache_hit)


def _data_hash(data: BlockData | None) -> str | None:
    if data is None:
        return None
    h = hashlib.sha256(f"{data.M},{data.K},{data.N},{data.layout}".encode())
    for arr in (data.row_ptr, data.block_rows, data.block_cols, data.values):
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()
