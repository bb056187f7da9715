"""Build and load the model-level C runtime (``native/ubp_model.c``) and run a plan from Python.

``libubp_model.so`` is compiled with zig cc (-O3; -march=native for the host, cortex-a76 for
AArch64) and cached like kernels (``runtime.cache``, keyed by source and flags). A
:class:`ModelRunner` owns a plan blob with its kernel slots bound and one workspace allocated
once: :meth:`ModelRunner.run` does no allocation beyond its output and no Python per layer.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ubpdsl import abi
from ubpdsl.deploy.plan import PlanBlob
from ubpdsl.errors import BuildError, RunError

__all__ = ["NATIVE_DIR", "build_model_lib", "compile_model_object", "ModelRunner", "PROFILE_KINDS"]

NATIVE_DIR = Path(__file__).resolve().parent / "native"
MODEL_C = NATIVE_DIR / "ubp_model.c"
#: what ubp_model_run_profiled accumulates, in this order
PROFILE_KINDS = ("input layout", "sparse kernels", "epilogues", "depthwise", "pool", "fused expand + depthwise")
ERRORS = {10: "plan header mismatch", 11: "a kernel slot is not bound", 12: "bad op in the plan"}


def _flags(target: str) -> list[str]:
    if target == "host":
        return ["-O3", "-march=native", "-fPIC"]
    if target == "aarch64":
        return ["-O3", "-target", "aarch64-linux-gnu", "-mcpu=cortex_a76", "-fPIC"]
    raise BuildError(f"unknown target {target!r} for the model runtime (host, aarch64)")


def _cached(name: str, parts: dict, build) -> Path:
    from ubpdsl.runtime.cache import CompileCache
    from ubpdsl.runtime.toolchain import toolchain_versions

    cache = CompileCache()
    key = cache.key(what=name, toolchain=toolchain_versions(), **parts)
    entry = cache.get(key)
    if entry is None:
        with tempfile.TemporaryDirectory(prefix="ubp-deploy-") as tmp:
            out = Path(tmp) / name
            build(out)
            entry = cache.put(key, {name: out})
    return entry / name


def _zig_build(name: str, target: str, mode: str) -> Path:
    from ubpdsl.runtime.toolchain import run_tool, zig_cmd

    flags = [*_flags(target), mode]
    ep_header = "#include <stdint.h>\n" + abi.c_epilogue_struct() + "\n"  # ubp_model.c includes it

    def build(out: Path) -> None:
        (out.parent / "ubp_epilogue.h").write_text(ep_header)
        run_tool([*zig_cmd(), "cc", *flags, f"-I{out.parent}", str(MODEL_C), "-o", str(out)],
                 what=f"zig cc ({name})")

    return _cached(name, {"src": hashlib.sha256(MODEL_C.read_bytes()).hexdigest(), "flags": flags,
                          "ep_header": ep_header}, build)


def compile_model_object(target: str = "host") -> Path:
    """``ubp_model.o`` (position independent) for ``target`` -- for linking into a shim (cached)."""
    return _zig_build("ubp_model.o", target, "-c")


def build_model_lib(target: str = "host") -> Path:
    """``libubp_model.so`` for ``target`` (cached)."""
    return _zig_build("libubp_model.so", target, "-shared")


def _load(path: Path, mode: int = os.RTLD_LOCAL) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path), mode=mode | os.RTLD_NOW)
    lib.ubp_model_workspace_bytes.restype = ctypes.c_int64
    lib.ubp_model_workspace_bytes.argtypes = [ctypes.c_void_p]
    lib.ubp_model_bind.restype = ctypes.c_int32
    lib.ubp_model_bind.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.ubp_model_bind_ep.restype = ctypes.c_int32
    lib.ubp_model_bind_ep.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    for fn in (lib.ubp_model_run, lib.ubp_model_run_profiled):
        fn.restype = ctypes.c_int32
    lib.ubp_model_run.argtypes = [ctypes.c_void_p] * 4
    lib.ubp_model_run_profiled.argtypes = [ctypes.c_void_p] * 5
    return lib


class ModelRunner:
    """A bound plan, its kernels kept alive and its workspace, callable on ``[B, C, H, W]`` tensors."""

    def __init__(self, plan: PlanBlob, kernels: Mapping[str, object], *, fused_epilogues: bool = True) -> None:
        """``kernels``: layer name -> object with an ``address`` (``torch_ops.NativeKernel``) and,
        optionally, an ``ep_address`` (the ``_ep`` entry point; bound unless ``fused_epilogues``
        is False, which keeps the kernel + separate C epilogue pass)."""
        self.plan = plan
        self._kernels = [kernels[name] for name in plan.kernel_slots]  # keep the .so files loaded
        self._lib = _load(build_model_lib("host"))
        ptr = plan.blob.ctypes.data
        for slot, k in enumerate(self._kernels):
            rc = self._lib.ubp_model_bind(ptr, slot, k.address)
            ep = getattr(k, "ep_address", None) if fused_epilogues else None
            if rc == 0 and ep is not None:
                rc = self._lib.ubp_model_bind_ep(ptr, slot, ep)
            if rc != 0:
                raise RunError(f"ubp_model_bind({plan.kernel_slots[slot]}) failed: {ERRORS.get(rc, rc)}")
        nbytes = self._lib.ubp_model_workspace_bytes(ptr)
        if nbytes != plan.workspace_bytes:
            raise RunError(f"plan workspace mismatch: {nbytes} != {plan.workspace_bytes}")
        self.workspace = torch.empty(nbytes // 4 + 16, dtype=torch.float32)  # 64-byte aligned by torch

    @property
    def plan_address(self) -> int:
        return int(self.plan.blob.ctypes.data)

    @property
    def workspace_address(self) -> int:
        return int(self.workspace.data_ptr())

    def _check(self, x: torch.Tensor) -> None:
        if tuple(x.shape) != self.plan.in_shape or x.dtype != torch.float32 or not x.is_contiguous():
            raise RunError(f"subgraph input must be a contiguous float32 tensor of shape {list(self.plan.in_shape)}, "
                           f"got {x.dtype} {list(x.shape)}")

    def run_into(self, x: torch.Tensor, y: torch.Tensor, profile: np.ndarray | None = None) -> None:
        """``y = subgraph(x)``; ``profile`` (float64[len(PROFILE_KINDS)], optional) accumulates seconds per kind."""
        self._check(x)
        if profile is None:
            rc = self._lib.ubp_model_run(self.plan_address, x.data_ptr(), y.data_ptr(), self.workspace_address)
        else:
            rc = self._lib.ubp_model_run_profiled(self.plan_address, x.data_ptr(), y.data_ptr(),
                                                  self.workspace_address, profile.ctypes.data)
        if rc != 0:
            why = ERRORS.get(rc) or (f"kernel returned {rc - 100}" if rc >= 100 else f"code {rc}")
            raise RunError(f"ubp_model_run failed: {why}")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(self.plan.out_shape, dtype=torch.float32)
        self.run_into(x, y)
        return y
