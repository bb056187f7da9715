"""Fuzz: forged plan blobs (ubpdsl.deploy.plan format) against the C runtime's validation.

A plan travels with a model, so a damaged or hostile one must give an error code from
``ubp_model_validate`` / ``ubp_model_check_slot`` / ``ubp_model_bind`` -- or, when it is still a
consistent plan, run without reading or writing outside its buffers. Real plans (every op kind:
a MobileNetV2-style subgraph unfused and with fused expand + depthwise bands, the general planner
on the digits CNN and on a model with every other general op) are damaged word by word (hostile
values, off-by-one / off-by-64 offsets), in their payload's geometry and packed-blob headers, by
random bytes and by truncation; each case runs in a bounded subprocess (tests/fuzz_plan_worker.py)
with canary pages around input, output and workspace.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fuzz_support import c_verdict, record, report, run

from ubpdsl import abi
from ubpdsl.deploy.native import build_model_lib
from ubpdsl.errors import RunError

WORKER = Path(__file__).with_name("fuzz_plan_worker.py")
CASES = 1500  # per plan


def _kernels(kernels: dict, slots: list[str]) -> list:
    out = []
    for name in slots:
        k = kernels[name]
        ep = abi.ep_symbol(k.files.symbol) if k.ep_address is not None else None
        out.append([str(k.files.so), k.files.symbol, ep, int(k.M), int(k.K)])
    return out


class _ReadsInput(torch.nn.Module):
    """A residual add of the model input and a global average pool: op kinds 4 (input to
    channel-major at batch > 1), 9 and 11."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(y) + x, 1).flatten(1)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """Pristine plans of every op kind with their kernels: [(name, PlanBlob, kernels)]."""
    from test_executorch import TinyMobileNet, _bed, _Odd, _random_bn

    from ubpdsl.deploy.graph import build_graph_plan
    from ubpdsl.deploy.pipeline import MOBILENET_V2, prepare_graph
    from ubpdsl.models import DigitsCNN

    tmp = tmp_path_factory.mktemp("plans")
    torch.manual_seed(0)
    out = []
    mb = _random_bn(TinyMobileNet())
    masks = _bed(mb, [n for n, m in mb.named_modules()
                      if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) and m.groups == 1])
    for name, batch, kw in (("mobilenet b1", 1, {}), ("mobilenet b2 fused", 2, {"fuse_min_bytes": 0, "band_bytes": 1})):
        g = prepare_graph(mb, masks, torch.randn(batch, 3, 32, 32), tmp / name.replace(" ", "_"), **MOBILENET_V2, **kw)
        out.append((name, build_graph_plan(g.spec, {n: k.packed for n, k in g.kernels.items()}, batch), g.kernels))
    torch.manual_seed(1)
    graphs = (("digits", _random_bn(DigitsCNN()), ["conv2", "conv3", "fc"], torch.randn(2, 1, 8, 8)),
              ("general ops", _random_bn(_Odd()), ["a", "c"], torch.randn(2, 3, 11, 13)),
              ("input readers", _ReadsInput().eval(), ["conv"], torch.randn(2, 4, 5, 5)))
    for name, model, layers, x in graphs:
        g = prepare_graph(model, _bed(model, layers), x, tmp / name.replace(" ", "_"))
        out.append((name, build_graph_plan(g.spec, {n: k.packed for n, k in g.kernels.items()}, 2), g.kernels))
    kinds = {int(k) for _, p, _ in out for k in p.blob.view("<i8")[16:16 * (1 + int(p.blob.view("<i8")[2])):16]}
    # every op kind a planner emits is fuzzed; kind 3 (pool + bias + clamp) is written by no planner
    # since the planners became one, and is reached only by the word damage of the kind field
    assert kinds == set(range(1, 14)) - {3}, kinds
    return out


def test_fuzz_plans_through_the_c_runtime(plans, tmp_path):
    spec = {"lib": str(build_model_lib("host")), "seed": 20261201, "cases": CASES, "start": 0, "plans": []}
    for name, p, kernels in plans:
        path = tmp_path / f"{name.replace(' ', '_')}.npy"
        np.save(path, p.blob)
        spec["plans"].append({"name": name, "blob": str(path), "in_shape": list(p.in_shape),
                              "out_shape": list(p.out_shape), "kernels": _kernels(kernels, p.kernel_slots)})
    counts: Counter = Counter()
    failures: list[str] = []
    while True:  # a crash ends the worker at its case: record it, restart after it
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        r = run([sys.executable, str(WORKER), str(tmp_path / "spec.json")], timeout=600)
        lines = r.stdout.strip().splitlines()
        if r.returncode == 0 and lines and lines[-1].startswith("{"):
            summary = json.loads(lines[-1])
            counts.update(summary["counts"])
            failures += summary["failures"]
            break
        cases = [ln for ln in lines if ln.startswith("case ")]
        why = c_verdict(r) or f"exit {r.returncode}"
        if not cases or len(failures) > 200:
            pytest.fail(f"the worker died ({why}) before its first case:\n{r.stderr[-2000:]}")
        counts["tried"] += len(cases)
        counts[f"crash ({why})"] += 1
        failures.append(f"{cases[-1]}: {why}")
        spec["start"] = int(cases[-1].split()[1]) + 1
    for i in range(counts["tried"] - len(failures)):
        record("plan blob", str(i), None)
    for f in failures:
        record("plan blob", f, "crash, memory outside the plan's buffers touched, or a pristine plan refused")
    print(json.dumps(counts, indent=1, sort_keys=True))
    report("plan blob")
    assert not failures, failures[:20]
    rejected = sum(v for k, v in counts.items() if k.startswith("rejected"))
    assert rejected > counts["tried"] // 3  # the damage was mostly caught at validation, not luck
    assert counts.get("accepted, ran", 0) > 0


def test_runner_refuses_a_forged_plan(plans):
    from ubpdsl.deploy.native import ModelRunner

    name, p, kernels = plans[0]
    bad = type(p)(p.blob.copy(), p.kernel_slots, p.batch, p.in_shape, p.out_shape, p.workspace_bytes)
    bad.blob.view("<i8")[16 + 1] = 1 << 40  # the first op's source: far outside the workspace
    with pytest.raises(RunError, match="out of range") as exc:
        ModelRunner(bad, kernels)
    assert "\n" not in str(exc.value)


def test_binder_refuses_a_kernel_of_the_wrong_shape(plans):
    """A mask-specialised kernel's shape is not in the plan: the binder checks it per slot."""
    from ubpdsl.deploy.native import ModelRunner

    name, p, kernels = plans[0]
    a = p.kernel_slots[0]
    b = next(s for s in p.kernel_slots if (kernels[s].M, kernels[s].K) != (kernels[a].M, kernels[a].K))
    swapped = dict(kernels)
    swapped[a] = kernels[b]
    fresh = type(p)(p.blob.copy(), p.kernel_slots, p.batch, p.in_shape, p.out_shape, p.workspace_bytes)
    with pytest.raises(RunError, match="out of range"):
        ModelRunner(fresh, swapped)


def test_the_c_runtime_takes_the_plan_format_from_python():
    """plan.py owns the format's numbers: ubp_model.c includes the generated ubp_plan.h and
    defines none of them itself; the built library is the one made with the current header."""
    import re

    from ubpdsl.deploy import plan as fmt
    from ubpdsl.deploy.native import MODEL_SOURCES

    head = fmt.c_plan_header()
    for name, value in fmt.OP_KINDS.items():
        assert f"OP_{name} = {value}" in head
    for i, name in enumerate(fmt.HEADER_FIELDS):
        assert f"H_{name} = {i}" in head
    for i, name in enumerate(fmt.OP_FIELDS):
        assert f"F_{name.upper()} = {i}" in head
    for i, name in enumerate(fmt.GRAPH_FIELDS):
        assert f"G_{name.upper()} = {i}" in head
    assert f"UBP_MODEL_VERSION {fmt.VERSION}" in head and f"0x{fmt.MAGIC:08x}" in head
    def defined(text: str) -> set[str]:
        names = set(re.findall(r"#define\s+(\w+)", text))
        for body in re.findall(r"enum\s*\{([^}]*)\}", text):
            names |= {m.group(1) for m in re.finditer(r"(\w+)\s*(?:=[^,]*)?(?:,|$)", body.strip())}
        return names

    generated = defined(head) - {"UBP_PLAN_DEFINED"}
    assert {"OP_CONV", "F_KIND", "G_TMP", "GM_NCHW", "H_SCRATCH_OFF", "CLAMP_RELU6", "REC"} <= generated
    for src in MODEL_SOURCES:
        twice = defined(src.read_text()) & generated
        assert not twice, f"{src.name} defines {sorted(twice)} by hand"
    assert '#include "ubp_plan.h"' in MODEL_SOURCES[0].read_text()


def test_executorch_shim_refuses_a_forged_plan(plans):
    """The ExecuTorch shim runs the same check when a plan is registered: a code, not an abort.
    (It trusts the size the header declares: ubp_et_register_plan takes no size.)"""
    try:
        from ubpdsl.deploy import executorch as det
    except ImportError:  # pragma: no cover
        pytest.skip("torch.library pieces missing")
    if not det.et_available():
        pytest.skip("executorch (optional extra) is not installed")
    _, p, _ = plans[2]
    shim = det._shim()
    for word, value in ((0, 0), (16 + 1, 1 << 40), (16 + 3, -5), (10, 3), (9, 1 << 40)):
        bad = p.blob.copy()
        bad.view("<i8")[word] = value
        assert shim.ubp_et_register_plan(5, bad.ctypes.data, None) == 2, (word, value)
    ok = p.blob.copy()
    assert shim.ubp_et_register_plan(5, ok.ctypes.data, None) == 0
    assert shim.ubp_et_register_plan(5, None, None) == 0  # unregister
