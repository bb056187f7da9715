"""Build and load the model-level C runtime (``native/ubp_model.c``, which includes the depthwise
convolution ``native/dwconv.c``) and run a plan from Python.

``libubp_model.so`` is compiled with zig cc (-O3; -march=native for the host, cortex-a76 for
AArch64) and cached like kernels (``runtime.cache``, keyed by source and flags). A
:class:`ModelRunner` owns a plan blob with its kernel slots bound and one workspace allocated
once: :meth:`ModelRunner.run` does no allocation beyond its output and no Python per layer.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ubpdsl import abi
from ubpdsl.deploy.plan import PlanBlob, c_plan_header
from ubpdsl.errors import BuildError, RunError

__all__ = ["NATIVE_DIR", "build_model_lib", "compile_model_object", "ModelRunner", "PROFILE_KINDS", "dwconv3x3",
           "dw_scratch_floats"]

NATIVE_DIR = Path(__file__).resolve().parent / "native"
MODEL_C = NATIVE_DIR / "ubp_model.c"
#: every C source of the runtime (ubp_model.c includes the others): the build cache key hashes them all
MODEL_SOURCES = (MODEL_C, NATIVE_DIR / "dwconv.c")
#: what ubp_model_run_profiled accumulates, in this order
PROFILE_KINDS = ("input layout", "sparse kernels", "epilogues", "depthwise", "pool",
                 "fused expand + depthwise: depthwise", "fused expand + depthwise: band copy + expand kernel")
ERRORS = {10: "plan header mismatch", 11: "a kernel slot is not bound", 12: "bad op in the plan",
          13: "an offset, size or shape in the plan is out of range"}


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
    plan_header = c_plan_header()  # and this one
    src = hashlib.sha256(b"".join(p.read_bytes() for p in MODEL_SOURCES)).hexdigest()

    def build(out: Path) -> None:
        (out.parent / "ubp_epilogue.h").write_text(ep_header)
        (out.parent / "ubp_plan.h").write_text(plan_header)
        run_tool([*zig_cmd(), "cc", *flags, f"-I{out.parent}", str(MODEL_C), "-o", str(out)],
                 what=f"zig cc ({name})")

    return _cached(name, {"src": src, "flags": flags, "ep_header": ep_header, "plan_header": plan_header}, build)


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
    lib.ubp_model_validate.restype = ctypes.c_int32
    lib.ubp_model_validate.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ubp_model_check_slot.restype = ctypes.c_int32
    lib.ubp_model_check_slot.argtypes = [ctypes.c_void_p, *[ctypes.c_int64] * 3]
    for fn in (lib.ubp_model_run, lib.ubp_model_run_profiled):
        fn.restype = ctypes.c_int32
    lib.ubp_model_run.argtypes = [ctypes.c_void_p] * 4
    lib.ubp_model_run_profiled.argtypes = [ctypes.c_void_p] * 5
    lib.ubp_dwconv3x3_scratch_floats.restype = ctypes.c_int64
    lib.ubp_dwconv3x3_scratch_floats.argtypes = [ctypes.c_int64] * 3
    lib.ubp_dwconv3x3.restype = ctypes.c_int32
    lib.ubp_dwconv3x3.argtypes = [ctypes.c_void_p, ctypes.c_void_p, *[ctypes.c_int64] * 5, *[ctypes.c_void_p] * 3,
                                  ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


@functools.cache
def _host_lib() -> ctypes.CDLL:
    return _load(build_model_lib("host"))


def dw_scratch_floats(h: int, w: int, stride: int) -> int:
    """Scratch floats the runtime's depthwise needs for an ``h`` x ``w`` plane (asked of the C code,
    which owns the staging layout)."""
    n = int(_host_lib().ubp_dwconv3x3_scratch_floats(h, w, stride))
    if n < 0:
        raise BuildError(f"no depthwise 3x3 for a {h}x{w} plane at stride {stride}")
    return n


def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, stride: int = 1,
              pre_bias: torch.Tensor | None = None, clamp: int = 2, src_nchw: bool = False) -> torch.Tensor:
    """The runtime's depthwise 3x3 (pad 1) on its own: ``x`` ``[C, B, H, W]`` (``[B, C, H, W]`` when
    ``src_nchw``) -> ``[C, B, Ho, Wo]``; ``weight`` ``[C, 9]``; ``pre_bias`` ``[C]`` applies
    ``relu6(x + pre_bias)`` to the input; ``clamp``: 0 none, 1 ReLU, 2 ReLU6 on the output."""
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # noqa: E731
    x, weight, bias = f32(x), f32(weight), f32(bias)
    pre = None if pre_bias is None else f32(pre_bias)
    B, C = (x.shape[0], x.shape[1]) if src_nchw else (x.shape[1], x.shape[0])
    H, W = x.shape[2], x.shape[3]
    if weight.shape != (C, 9) or bias.shape != (C,) or (pre is not None and pre.shape != (C,)):
        raise RunError(f"dwconv3x3: weight [C, 9], bias [C], pre_bias [C] for C = {C}")
    y = torch.empty(C, B, (H - 1) // stride + 1, (W - 1) // stride + 1)
    scratch = torch.empty(dw_scratch_floats(H, W, stride) + 16)
    rc = _host_lib().ubp_dwconv3x3(x.data_ptr(), y.data_ptr(), C, B, H, W, stride, weight.data_ptr(),
                                   bias.data_ptr(), None if pre is None else pre.data_ptr(), clamp, int(src_nchw),
                                   scratch.data_ptr())
    if rc != 0:
        raise RunError(f"ubp_dwconv3x3 rejected its arguments (code {rc})")
    return y


class ModelRunner:
    """A bound plan, its kernels kept alive and its workspace, callable on ``[B, C, H, W]`` tensors."""

    def __init__(self, plan: PlanBlob, kernels: Mapping[str, object], *, fused_epilogues: bool = True) -> None:
        """``kernels``: layer name -> object with an ``address`` (``torch_ops.NativeKernel``) and,
        optionally, an ``ep_address`` (the ``_ep`` entry point; bound unless ``fused_epilogues``
        is False, which keeps the kernel + separate C epilogue pass)."""
        self.plan = plan
        self._kernels = [kernels[name] for name in plan.kernel_slots]  # keep the .so files loaded
        self._lib = _host_lib()
        ptr = plan.blob.ctypes.data
        rc = self._lib.ubp_model_validate(ptr, plan.blob.nbytes)
        if rc != 0:
            raise RunError(f"not a valid plan: {ERRORS.get(rc, f'code {rc}')}")
        for slot, k in enumerate(self._kernels):
            rc = 0
            if getattr(k, "M", None) is not None and getattr(k, "K", None) is not None:
                rc = self._lib.ubp_model_check_slot(ptr, slot, int(k.M), int(k.K))
            if rc == 0:
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
