"""A pruned model in ExecuTorch: its channel-major plan as one custom operator, the rest on XNNPACK.

* torch side: ``ubpdsl::subgraph(Tensor x, int plan_id) -> Tensor`` and its out variant
  ``ubpdsl::subgraph.out`` (torch.library; eager calls run the plan through ``libubp_model``), so
  ``torch.export`` keeps the subgraph as one node, the XNNPACK partitioner takes the dense head and
  tail (e.g. a stem and a classifier), and ``to_executorch`` picks the out variant.
* ExecuTorch side: ``libubp_et.so`` (``native/et_shim.cpp`` + ``ubp_model.c``, built with the
  system C++ compiler against the wheel's headers and ``libexecutorch.so``) registers the same
  operator with ExecuTorch's registry when it is loaded. The plan (weights and bound kernels) and
  its workspace are registered under ``plan_id`` by :func:`register_plan`; the ``.pte`` holds
  only the id.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
from pathlib import Path

import torch
from torch import nn

from ubpdsl.deploy.native import NATIVE_DIR, ModelRunner, compile_model_object
from ubpdsl.errors import BuildError, RunError, UbpError

__all__ = ["DeployedGraph", "SubgraphModule", "build_et_shim", "et_available", "export_pte",
           "load_pte", "register_plan", "build_et_shim_aarch64"]

SHIM_CPP = NATIVE_DIR / "et_shim.cpp"
MAX_PLANS = 64
_RUNNERS: dict[int, ModelRunner] = {}
_SHIM: ctypes.CDLL | None = None

_LIB = torch.library.Library("ubpdsl", "FRAGMENT")
_LIB.define("subgraph(Tensor x, int plan_id) -> Tensor")
_LIB.define("subgraph.out(Tensor x, int plan_id, *, Tensor(a!) out) -> Tensor(a!)")


def _runner(plan_id: int) -> ModelRunner:
    r = _RUNNERS.get(int(plan_id))
    if r is None:
        raise RunError(f"ubpdsl::subgraph: plan {plan_id} is not registered")
    return r


def _subgraph_cpu(x: torch.Tensor, plan_id: int) -> torch.Tensor:
    return _runner(plan_id)(x.contiguous())


def _subgraph_out_cpu(x: torch.Tensor, plan_id: int, *, out: torch.Tensor) -> torch.Tensor:
    r = _runner(plan_id)
    out.resize_(r.plan.out_shape)
    r.run_into(x.contiguous(), out)
    return out


def _subgraph_fake(x: torch.Tensor, plan_id: int) -> torch.Tensor:
    r = _runner(plan_id)
    return x.new_empty(r.plan.out_shape)


def _subgraph_out_fake(x: torch.Tensor, plan_id: int, *, out: torch.Tensor) -> torch.Tensor:
    return out


_LIB.impl("subgraph", _subgraph_cpu, "CPU")
_LIB.impl("subgraph.out", _subgraph_out_cpu, "CPU")
torch.library.register_fake("ubpdsl::subgraph", _subgraph_fake, lib=_LIB)
torch.library.register_fake("ubpdsl::subgraph.out", _subgraph_out_fake, lib=_LIB)


def et_available() -> bool:
    """True if the ``executorch`` package (the optional extra) is importable."""
    import importlib.util

    return importlib.util.find_spec("executorch") is not None and \
        importlib.util.find_spec("executorch.exir") is not None


def _et_root() -> Path:
    if not et_available():
        raise UbpError("executorch is not installed: pip install 'ubpdsl[executorch]' (executorch==1.5.1)")
    import executorch

    for p in executorch.__path__:
        if (Path(p) / "include" / "executorch").is_dir() and (Path(p) / "lib" / "libexecutorch.so").is_file():
            return Path(p)
    raise UbpError("the installed executorch wheel ships no headers or libexecutorch.so")


_CXX_DEFS = ["-DC10_USING_CUSTOM_GENERATED_MACROS", "-DET_EVENT_TRACER_ENABLED"]  # as its CMake config says


def _includes(root: Path) -> list[str]:
    inc = root / "include"
    return [f"-I{inc}", f"-I{inc / 'executorch' / 'runtime' / 'core' / 'portable_type' / 'c10'}"]


def build_et_shim() -> Path:
    """``libubp_et.so`` for the host (cached by sources, compiler and ExecuTorch version)."""
    from ubpdsl.deploy.native import _cached

    root = _et_root()
    cxx = os.environ.get("CXX", "c++")
    obj = compile_model_object("host")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise BuildError(f"no C++ compiler for the ExecuTorch shim ({cxx}): {exc}") from None
    from importlib.metadata import version as dist_version

    parts = {"shim": hashlib.sha256(SHIM_CPP.read_bytes()).hexdigest(), "obj": hashlib.sha256(obj.read_bytes())
             .hexdigest(), "cxx": version, "executorch": dist_version("executorch"), "root": str(root)}

    def build(out: Path) -> None:
        lib = root / "lib"
        cmd = [cxx, "-std=c++17", "-O2", "-fPIC", "-shared", *_CXX_DEFS, *_includes(root), str(SHIM_CPP), str(obj),
               f"-L{lib}", "-lexecutorch", f"-Wl,-rpath,{lib}", "-o", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BuildError(f"building the ExecuTorch shim failed: {r.stderr.strip()[-2000:]}")

    return _cached("libubp_et.so", parts, build)


def build_et_shim_aarch64(out_dir: Path) -> Path:
    """Cross-compile the shim and the runtime for AArch64 (objects only: the wheel has no AArch64
    ``libexecutorch.so`` to link against); returns the shim's object file."""
    from ubpdsl.runtime.toolchain import run_tool, zig_cmd

    root = _et_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    compile_model_object("aarch64")
    out = out_dir / "et_shim.aarch64.o"
    run_tool([*zig_cmd(), "c++", "-target", "aarch64-linux-gnu", "-std=c++17", "-O2", "-fPIC", *_CXX_DEFS,
              *_includes(root), "-c", str(SHIM_CPP), "-o", str(out)], what="zig c++ (ExecuTorch shim, AArch64)")
    return out


def _shim() -> ctypes.CDLL:
    global _SHIM
    if _SHIM is None:
        from executorch.extension.pybindings import portable_lib  # noqa: F401  (loads libexecutorch.so first)

        lib = ctypes.CDLL(str(build_et_shim()), mode=os.RTLD_LOCAL | os.RTLD_NOW)
        lib.ubp_et_register_plan.restype = ctypes.c_int32
        lib.ubp_et_register_plan.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p]
        _SHIM = lib
    return _SHIM


def register_plan(plan_id: int, runner: ModelRunner | None, *, executorch: bool = True) -> None:
    """Make ``runner``'s plan callable as ``ubpdsl::subgraph(x, plan_id)`` (torch, and ExecuTorch
    unless ``executorch`` is False); ``None`` unregisters ``plan_id``."""
    if not 0 <= plan_id < MAX_PLANS:
        raise UbpError(f"plan id must be in 0..{MAX_PLANS - 1}, got {plan_id}")
    if runner is None:
        _RUNNERS.pop(plan_id, None)
    else:
        _RUNNERS[plan_id] = runner
    if executorch:
        plan, ws = (None, None) if runner is None else (runner.plan_address, runner.workspace_address)
        rc = _shim().ubp_et_register_plan(plan_id, plan, ws)
        if rc != 0:
            raise RunError(f"ubp_et_register_plan({plan_id}) failed with code {rc}")


class SubgraphModule(nn.Module):
    """Calls ``ubpdsl::subgraph`` on a registered plan."""

    def __init__(self, plan_id: int) -> None:
        super().__init__()
        self.plan_id = int(plan_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.ubpdsl.subgraph(x, self.plan_id)


class DeployedGraph(nn.Module):
    """[head] -> ``ubpdsl::subgraph`` (a :mod:`ubpdsl.deploy.graph` plan) -> [tail]; head and tail dense (XNNPACK).

    ``head``: the part of the model before the plan's ``start`` (None: the plan takes the input);
    ``out_shape``: one example's output shape of the plan (the operator returns ``[B, prod(out_shape)]``);
    ``tail``: the part after the plan's ``stop`` (None: the plan's output is the model's).
    """

    def __init__(self, head: nn.Module | None, plan_id: int, out_shape: tuple[int, ...],
                 tail: nn.Module | None = None) -> None:
        super().__init__()
        self.head = head
        self.subgraph = SubgraphModule(plan_id)
        self.out_shape = tuple(int(d) for d in out_shape)
        self.tail = tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.subgraph(self.head(x) if self.head is not None else x)
        y = y if len(self.out_shape) == 1 else y.reshape(y.shape[0], *self.out_shape)
        return self.tail(y) if self.tail is not None else y


def export_pte(model: nn.Module, example: torch.Tensor, path: Path | None = None) -> bytes:
    """``torch.export`` + XNNPACK partitioner + ``to_executorch``: the program's bytes (and ``path``)."""
    _et_root()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    model = model.eval()
    with torch.no_grad():
        ep = torch.export.export(model, (example,))
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    buf = edge.to_executorch().buffer
    if path is not None:
        Path(path).write_bytes(buf)
    return buf


class EtProgram:
    """A loaded ``.pte`` run by ExecuTorch's Python runtime (pybindings), one input, one output."""

    def __init__(self, buf: bytes, threads: int = 1) -> None:
        from executorch.extension.pybindings import portable_lib as pl

        _shim()  # our operator must be registered before the program's methods are loaded
        pl._unsafe_reset_threadpool(threads)
        self._buf = bytes(buf)  # the runtime reads from this buffer for as long as the program lives
        try:
            self._mod = pl._load_for_executorch_from_buffer(self._buf)
        except RuntimeError as exc:
            raise RunError(f"ExecuTorch cannot load the program: {str(exc).splitlines()[0]}") from None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._mod.forward((x,))[0]


def load_pte(buf: bytes, threads: int = 1) -> EtProgram:
    """Load a program with ExecuTorch's runtime (our shim loaded first)."""
    return EtProgram(buf, threads)

