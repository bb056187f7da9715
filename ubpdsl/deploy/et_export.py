"""Export a user's pruned model to an ExecuTorch program directory, and load one back.

``ubpdsl export --runtime executorch`` is a thin wrapper over :func:`export_executorch`: the
model (any fx-traceable CNN), its masks and optionally tuned kernel configurations become::

    out/
      model.pte          torch.export + XNNPACK partitioner + to_executorch: the dense head / tail
                         on XNNPACK, the pruned part one ``ubpdsl::subgraph.out(x, plan_id)`` node
      plan.bin           the plan blob of that part (deploy.plan format: folded weights, packed
                         sparse weights, empty kernel slots), 64-byte aligned when loaded
      bundle/            the host kernels of the BN-folded pruned layers (a ubpdsl bundle)
      libubp_et.so       the kernel library: registers ``ubpdsl::subgraph.out`` with ExecuTorch
                         when loaded, and exports the C runtime (ubp_model_*) and
                         ``ubp_et_register_plan``
      src/               its sources (et_shim.cpp, ubp_model.c, dwconv.c, ubp_epilogue.h) to
                         build it into an app against the app's own ExecuTorch
      manifest.json      format "ubpdsl.executorch/1": plan id, batch, shapes, kernel slots (layer,
                         .so, symbols), sha256 of every file
      README.md          how to load it from Python and from C++

:func:`load_executorch` loads such a directory in ExecuTorch's Python runtime: it checks the
manifest and every file's sha256, loads the bundle (checked by :func:`ubpdsl.export.load_bundle`),
binds the kernels into the plan, registers it and loads the program.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ubpdsl.errors import UbpError

__all__ = ["FORMAT", "build_cpp_example", "cpp_example_args", "export_executorch", "load_executorch"]

FORMAT = "ubpdsl.executorch/1"
MANIFEST = "manifest.json"
#: a C++ program that loads an export directory without Python (README steps 1-5)
CPP_EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "executorch_cpp" / "et_main.cpp"


def _require_executorch() -> None:
    from ubpdsl.deploy.executorch import _et_root

    _et_root()  # one-line UbpError when the optional extra is missing


def export_executorch(model: nn.Module, masks: Mapping[str, Any], example: torch.Tensor,
                      out_dir: str | os.PathLike[str], *, tuned: Mapping[str, Any] | None = None,
                      start: str | None = None, stop: str | None = None, plan_id: int = 0,
                      force: bool = False, source: str = "masks.npz") -> Path:
    """Write the ExecuTorch program directory of ``model`` (eval mode, pruned weights) to ``out_dir``.

    ``masks``: ``{layer: LayerMask}``; ``example``: one input batch (its batch size is the
    program's); ``tuned``: ``{layer: KernelConfig}`` for the host (others use the default kernel);
    ``start`` / ``stop``: fx node names cutting off a dense head / tail (see
    :func:`ubpdsl.deploy.graph.trace_graph`); ``plan_id``: the id the program calls its plan by
    (0..63, unique among the programs an application loads at once). Errors are one-line
    :class:`UbpError` s: executorch missing, masks not fitting the model, a node the planner does
    not support (named), an existing non-empty ``out_dir`` without ``force``.
    """
    _require_executorch()
    from ubpdsl.deploy import executorch as det
    from ubpdsl.deploy.pipeline import prepare_graph
    from ubpdsl.deploy.plan import header_words
    from ubpdsl.export import load_bundle
    from ubpdsl.guard import ensure_dir
    from ubpdsl.identity import file_sha256
    from ubpdsl.models import check_masks_fit_model

    if not 0 <= plan_id < det.MAX_PLANS:
        raise UbpError(f"plan id must be in 0..{det.MAX_PLANS - 1}, got {plan_id}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UbpError(f"{out} exists and is not empty (pass --force to replace it)")
    check_masks_fit_model(model, masks, source, example)
    model = model.eval()
    if example.dim() != 4 or example.dtype != torch.float32:
        raise UbpError(f"the ExecuTorch export needs a float32 [B, C, H, W] input, got {example.dtype} "
                       f"{list(example.shape)}")
    batch = int(example.shape[0])
    parent = out.resolve().parent
    ensure_dir(parent, "output directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    try:
        gdep = prepare_graph(model, masks, example, tmp, tuned=tuned, start=start, stop=stop)
        runner = gdep.runner(batch)
        program = det.DeployedGraph(gdep.spec.head, plan_id, gdep.spec.out_shape, gdep.spec.tail).eval()
        previous = det._RUNNERS.get(plan_id)
        det.register_plan(plan_id, runner, executorch=False)  # torch.export runs the op's fake / eager impl
        try:
            det.export_pte(program, example, tmp / "model.pte")
            with torch.no_grad():
                expected = program(example)
        finally:
            det.register_plan(plan_id, previous, executorch=False)
        blob = np.array(runner.plan.blob)  # a copy: kernel slots as planned (empty), not the bound addresses
        kernels_off = header_words(blob)["KERNELS_OFF"]
        blob[kernels_off:kernels_off + 16 * len(runner.plan.kernel_slots)] = 0
        (tmp / "plan.bin").write_bytes(blob.tobytes())
        shutil.copyfile(det.build_et_shim(), tmp / "libubp_et.so")
        _copy_sources(tmp / "src")
        bundle = load_bundle(tmp / "bundle")
        slots = []
        for i, name in enumerate(runner.plan.kernel_slots):
            k = bundle.kernel(name)
            slots.append({"slot": i, "layer": name, "so": str(Path(k.so).relative_to(tmp)), "symbol": k.symbol,
                          "symbol_ep": f"{k.symbol}_ep" if gdep.kernels[name].ep_address is not None else None})
        files = ["model.pte", "plan.bin", "libubp_et.so"]
        manifest = {
            "format": FORMAT, "plan_id": plan_id, "batch": batch,
            "input_shape": list(example.shape), "output_shape": list(expected.shape),
            "plan_input_shape": list(runner.plan.in_shape), "plan_output_shape": list(runner.plan.out_shape),
            "workspace_bytes": int(runner.plan.workspace_bytes), "kernel_slots": slots,
            "head": gdep.spec.head is not None, "tail": gdep.spec.tail is not None,
            "executorch": _et_version(), "files": {f: file_sha256(tmp / f) for f in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "README.md").write_text(_readme(manifest))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _et_version() -> str:
    from importlib.metadata import version

    return version("executorch")


def _copy_sources(dst: Path) -> None:
    from ubpdsl import abi
    from ubpdsl.deploy.executorch import SHIM_CPP
    from ubpdsl.deploy.native import MODEL_SOURCES

    dst.mkdir()
    for p in (SHIM_CPP, *MODEL_SOURCES):
        shutil.copyfile(p, dst / p.name)
    (dst / "ubp_epilogue.h").write_text("#include <stdint.h>\n" + abi.c_epilogue_struct() + "\n")


def _readme(m: Mapping[str, Any]) -> str:
    slots = "\n".join(f"| {s['slot']} | {s['layer']} | {s['so']} | {s['symbol']} | {s['symbol_ep'] or '-'} |"
                      for s in m["kernel_slots"])
    return f"""# A pruned model for ExecuTorch (written by `ubpdsl export --runtime executorch`)

`model.pte` runs the model's dense parts on ExecuTorch's XNNPACK delegate and its pruned part as one
operator, `ubpdsl::subgraph.out(x, plan_id={m['plan_id']})`, whose kernel library is `libubp_et.so`.
The program holds only the plan id: the plan (`plan.bin`: folded and packed weights) and the sparse
kernels (`bundle/`) are loaded and registered by the application before the program runs.
Input {m['input_shape']} float32 (NCHW; the batch is fixed at {m['batch']}), output {m['output_shape']}.
Built against ExecuTorch {m['executorch']}.

## Python (ExecuTorch's runtime, `pip install 'ubpdsl[executorch]'`)

```python
from ubpdsl.deploy.et_export import load_executorch
prog = load_executorch("{'.'}")          # checks the files, binds the kernels, registers the plan
y = prog(x)                              # x: torch.float32 tensor of shape {m['input_shape']}
```

## C++ (an app linking ExecuTorch)

1. Load the kernel library before loading the program: link `libubp_et.so` (or build
   `src/et_shim.cpp` + `src/ubp_model.c` into the app against its ExecuTorch headers and
   `libexecutorch`; `ubp_model.c` includes `dwconv.c` and `ubp_epilogue.h`). Its static
   initialiser registers `ubpdsl::subgraph.out`.
2. Read `plan.bin` into memory aligned to 64 bytes; it must stay alive and is modified by binding.
   Check it with `ubp_model_validate(plan, size_in_bytes)` (0 = ok) before anything else: it is
   a file, and the runtime trusts a validated plan's offsets.
3. For each kernel slot, `dlopen` its `.so` and bind its symbols (`ubp_model_bind(plan, slot,
   dlsym(h, symbol))`, and, if given, `ubp_model_bind_ep(plan, slot, dlsym(h, symbol_ep))`):

| slot | layer | .so | symbol | symbol_ep |
|---|---|---|---|---|
{slots}

4. Allocate `ubp_model_workspace_bytes(plan)` bytes ({m['workspace_bytes']}), 64-byte aligned, and call
   `ubp_et_register_plan({m['plan_id']}, plan, workspace)` (0 = ok). One workspace per plan: do
   not run the program on two threads at once.
5. Load and run `model.pte` as any program (`executorch::extension::Module`, or `Program::load` +
   `load_method`), with the XNNPACK backend and the optimized (or portable) kernels linked in.

`examples/executorch_cpp/et_main.cpp` in the ubpdsl sources does all five steps against the
ExecuTorch wheel's libraries (`ubpdsl.deploy.et_export.build_cpp_example` builds it).

```c
int32_t ubp_model_bind(void *plan, int64_t slot, int32_t (*fn)(const float *, float *, int64_t, const void *));
int32_t ubp_model_bind_ep(void *plan, int64_t slot, void *fn_ep);
int64_t ubp_model_workspace_bytes(const void *plan);
int32_t ubp_model_validate(const void *plan, int64_t nbytes);
int32_t ubp_et_register_plan(int64_t id, const void *plan, void *workspace);
```
"""


class LoadedProgram:
    """A loaded export directory: call it on an input batch; keeps the plan, kernels and workspace alive."""

    def __init__(self, program: Any, runner: Any, manifest: dict[str, Any]) -> None:
        self.program = program
        self.runner = runner
        self.manifest = manifest

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        want = tuple(self.manifest["input_shape"])
        if tuple(x.shape) != want or x.dtype != torch.float32:
            raise UbpError(f"the program takes a float32 tensor of shape {list(want)}, got {x.dtype} "
                           f"{list(x.shape)}")
        return self.program(x.contiguous())


def _manifest(root: Path) -> dict[str, Any]:
    from ubpdsl.guard import read_json
    from ubpdsl.identity import file_sha256

    m = read_json(root / MANIFEST, f"ExecuTorch export {root}")
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise UbpError(f"{root / MANIFEST}: not a {FORMAT} manifest (written by `ubpdsl export --runtime executorch`)")
    files = m.get("files")
    if not isinstance(files, dict) or set(files) != {"model.pte", "plan.bin", "libubp_et.so"}:
        raise UbpError(f"{root / MANIFEST}: 'files' must list model.pte, plan.bin and libubp_et.so")
    for name, sha in files.items():
        if not (root / name).is_file():
            raise UbpError(f"{root}: {name} is missing")
        if file_sha256(root / name) != sha:
            raise UbpError(f"{root / name}: sha256 does not match the manifest (corrupt or modified)")
    ints = ("plan_id", "batch", "workspace_bytes")
    if not all(isinstance(m.get(k), int) and m[k] >= 0 for k in ints) or \
            not isinstance(m.get("kernel_slots"), list):
        raise UbpError(f"{root / MANIFEST}: needs integers {', '.join(ints)} and a list 'kernel_slots'")
    return m


def load_executorch(path: str | os.PathLike[str], threads: int = 1) -> LoadedProgram:
    """Load an :func:`export_executorch` directory into ExecuTorch's Python runtime (see the module docstring)."""
    _require_executorch()
    from ubpdsl.deploy import executorch as det
    from ubpdsl.deploy.native import ModelRunner
    from ubpdsl.deploy.plan import PlanBlob, _aligned_bytes, header_words
    from ubpdsl.export import load_bundle
    from ubpdsl.torch_ops import NativeKernel

    root = Path(path)
    m = _manifest(root)
    raw = (root / "plan.bin").read_bytes()
    blob = _aligned_bytes(len(raw))
    blob[:] = np.frombuffer(raw, np.uint8)
    h = header_words(blob)
    slots = [s.get("layer") if isinstance(s, dict) else None for s in m["kernel_slots"]]
    if h is None or h["TOTAL_BYTES"] != len(raw) or h["NKERNELS"] != len(slots) or h["BATCH"] != m["batch"]:
        raise UbpError(f"{root / 'plan.bin'}: its header does not match the manifest")
    bundle = load_bundle(root / "bundle", check_host=True)
    missing = [s for s in slots if s not in bundle.layers]
    if missing:
        raise UbpError(f"{root / 'bundle'} has no kernel for layer {missing[0]!r}")
    kernels = {name: NativeKernel(bundle.kernel(name)) for name in set(slots)}
    B, C, H, W, F = (h[k] for k in ("BATCH", "CIN", "HIN", "WIN", "COUT"))
    plan = PlanBlob(blob, slots, B, (B, C, H, W), (B, F), h["WS_BYTES"])
    runner = ModelRunner(plan, kernels)
    det.register_plan(int(m["plan_id"]), runner)
    program = det.load_pte((root / "model.pte").read_bytes(), threads)
    return LoadedProgram(program, runner, m)


def build_cpp_example(export_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                      source: Path = CPP_EXAMPLE) -> Path:
    """Compile ``examples/executorch_cpp/et_main.cpp`` with the system C++ compiler against the
    installed ExecuTorch (its runtime, optimized kernels and XNNPACK backend) and ``export_dir``'s
    ``libubp_et.so``; returns the program (run it with :func:`cpp_example_args`)."""
    import subprocess

    from ubpdsl.deploy.executorch import _CXX_DEFS, _et_root, _includes
    from ubpdsl.errors import BuildError

    root = _et_root()
    if not source.is_file():
        raise UbpError(f"{source} not found: the C++ example lives in the source tree (examples/executorch_cpp)")
    lib, shim = root / "lib", Path(export_dir).resolve() / "libubp_et.so"
    cmd = [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", *_CXX_DEFS, *_includes(root), str(source), "-o", str(out),
           "-Wl,--no-as-needed", str(shim), f"-L{lib}", "-lexecutorch", "-lexecutorch_kernels_optimized",
           "-lexecutorch_backend_xnnpack", "-ldl", f"-Wl,-rpath,{lib}", f"-Wl,-rpath,{shim.parent}"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise BuildError(f"no C++ compiler for the ExecuTorch example: {exc}") from None
    if r.returncode != 0:
        raise BuildError(f"building et_main failed: {r.stderr.strip()[-2000:]}")
    return Path(out)


def cpp_example_args(export_dir: str | os.PathLike[str]) -> list[str]:
    """The kernel-slot arguments of ``et_main`` for ``export_dir`` (from its checked manifest)."""
    m = _manifest(Path(export_dir))
    return [str(v) for s in m["kernel_slots"] for v in (s["so"], s["symbol"], s["symbol_ep"] or "-")]
