"""Worker of tests/test_fuzz_plan.py: damage real plan blobs and push them through libubp_model (ctypes).

Run as ``python fuzz_plan_worker.py SPEC.json`` in a bounded subprocess (a segfault must not take
the test process down). A case is damage to one copy of a
pristine (unbound) plan; the C side must then either reject it (ubp_model_validate /
ubp_model_check_slot / ubp_model_bind give an error code) or run it without touching memory outside
the input (read only), the output and the workspace (each framed by canary pages, checked after
every run) -- and without writing the plan itself. Each case prints ``case <i> ...`` before it
touches the C side and draws its damage from its own seed, so after a crash the caller restarts
the worker at case i + 1 (``start`` in the spec). The last line is a JSON summary.
"""

from __future__ import annotations

import ctypes
import json
import sys
from collections import Counter

import numpy as np

GUARD = 4096  # canary bytes before and after every buffer
CANARY = 0xA5
MAX_RUN_WS = 64 << 20  # an accepted plan asking for more workspace is not run (the caller's malloc decides)
REC = 16
HOSTILE = [0, 1, 2, 3, 4, 7, 8, 13, 14, 16, 63, 64, -1, -2, -3, -4, -64, 2**31 - 1, 2**31, 2**32, 2**40, 2**62,
           2**63 - 1, -2**63, -2**31]


def _lib(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ubp_model_validate.restype = ctypes.c_int32
    lib.ubp_model_validate.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ubp_model_check_slot.restype = ctypes.c_int32
    lib.ubp_model_check_slot.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for name in ("ubp_model_bind", "ubp_model_bind_ep"):
        getattr(lib, name).restype = ctypes.c_int32
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    lib.ubp_model_workspace_bytes.restype = ctypes.c_int64
    lib.ubp_model_workspace_bytes.argtypes = [ctypes.c_void_p]
    lib.ubp_model_run.restype = ctypes.c_int32
    lib.ubp_model_run.argtypes = [ctypes.c_void_p] * 4
    return lib


class Framed:
    """``nbytes`` of 64-byte aligned memory with canary pages on both sides."""

    def __init__(self, nbytes: int, fill: np.ndarray | None = None) -> None:
        self.raw = np.full(nbytes + 2 * GUARD + 64, CANARY, np.uint8)
        start = GUARD + (-(self.raw.ctypes.data + GUARD)) % 64
        self.start, self.nbytes = start, nbytes
        if fill is not None:
            self.raw[start:start + nbytes] = fill.view(np.uint8).reshape(-1)[:nbytes]
        self.ptr = self.raw.ctypes.data + start

    def guards_ok(self) -> bool:
        return bool((self.raw[:self.start] == CANARY).all() and (self.raw[self.start + self.nbytes:] == CANARY).all())

    def body(self) -> np.ndarray:
        return self.raw[self.start:self.start + self.nbytes]


def _aligned_copy(blob: np.ndarray) -> np.ndarray:
    buf = np.zeros(blob.nbytes + 64, np.uint8)
    s = (-buf.ctypes.data) % 64
    out = buf[s:s + blob.nbytes]
    out[:] = blob
    return out


def _value(rng: np.random.Generator, cur: int, nbytes: int, ws: int) -> int:
    pick = rng.integers(0, 4)
    if pick == 0:
        return int(HOSTILE[rng.integers(len(HOSTILE))])
    if pick == 1:
        return cur + int(rng.choice([-64, -16, -8, -4, -1, 1, 4, 8, 16, 64, 4096]))
    if pick == 2:
        return int(rng.choice([nbytes, nbytes - 4, nbytes - 64, ws, ws - 4, ws + 4, cur * 2, cur // 2, -cur]))
    return int(rng.integers(-2**63, 2**63 - 1, dtype=np.int64))


def _damage(rng: np.random.Generator, blob: np.ndarray) -> tuple[np.ndarray, int, str]:
    """(damaged copy, the size the caller passes, description)."""
    b = _aligned_copy(blob)
    w = b.view("<i8")
    n_ops = int(w[2])
    nbytes, ws = b.nbytes, int(w[8])
    kind = rng.integers(0, 8)
    if kind <= 2:  # one word of an op record
        i, j = int(rng.integers(n_ops)), int(rng.integers(REC))
        pos = REC * (1 + i) + j
        old, op_kind = int(w[pos]), int(w[REC * (1 + i)])
        w[pos] = _wrap(_value(rng, old, nbytes, ws))
        return b, nbytes, f"op {i} (kind {op_kind}) field {j}: {old} -> {int(w[pos])}"
    if kind == 3:  # a header word
        j = int(rng.integers(13))
        old = int(w[j])
        w[j] = _wrap(_value(rng, old, nbytes, ws))
        return b, nbytes, f"header word {j}: {old} -> {int(w[j])}"
    if kind == 4:  # a payload word the ops point at (geometry, a packed blob header)
        offs = sorted({int(w[REC * (1 + i) + f]) for i in range(n_ops) for f in (5, 7)} - {-1})
        offs = [o for o in offs if REC * 8 <= o < nbytes - 64]
        if offs:
            o = offs[int(rng.integers(len(offs)))] + 4 * int(rng.integers(16))
            v32 = b[o:o + 4].view("<i4")
            old = int(v32[0])
            v32[0] = np.int32(((_value(rng, old, nbytes, ws) + 2**31) % 2**32) - 2**31)
            return b, nbytes, f"payload int32 at {o}: {old} -> {int(v32[0])}"
    if kind == 5:  # truncated, the header's size patched (or not) to match
        cut = int(rng.integers(0, nbytes))
        t = _aligned_copy(b[:cut]) if cut else _aligned_copy(b[:1])
        patch = bool(rng.integers(2)) and cut >= 128
        if patch:
            t[88:96] = np.frombuffer(np.int64(cut).tobytes(), np.uint8)
        return t, max(cut, 1) if cut else 1, f"truncated to {cut} bytes (header size patched: {patch})"
    # random bytes in the header + records (kind 6) or anywhere (kind 7)
    hi = 8 * REC * (1 + n_ops) if kind == 6 else nbytes
    k = int(rng.integers(1, 9))
    pos = rng.integers(0, hi, size=k)
    b[pos] = rng.integers(0, 256, size=k, dtype=np.uint8)
    return b, nbytes, f"{k} random bytes at {sorted(int(p) for p in pos)}"


def _wrap(v: int) -> np.int64:
    return np.int64(((v + 2**63) % 2**64) - 2**63)


def _one(lib: ctypes.CDLL, b: np.ndarray, nbytes: int, kernels: list, x_np: np.ndarray, out_n: int,
         pristine: bool) -> list:
    """[outcome, problem or None] of one (damaged) plan through validate, check_slot, bind and run."""
    rc = lib.ubp_model_validate(b.ctypes.data, nbytes)
    for slot, (addr, eaddr, M, K) in enumerate(kernels):
        if rc == 0:
            rc = lib.ubp_model_check_slot(b.ctypes.data, slot, M, K)
        if rc == 0:
            rc = lib.ubp_model_bind(b.ctypes.data, slot, addr)
        if rc == 0 and eaddr:
            rc = lib.ubp_model_bind_ep(b.ctypes.data, slot, eaddr)
    if rc != 0:
        return [f"rejected (code {rc})", f"the pristine plan is rejected with code {rc}" if pristine else None]
    ws = lib.ubp_model_workspace_bytes(b.ctypes.data)
    if ws < 0:
        return ["accepted, then refused", f"accepted, then workspace_bytes {ws}"]
    if ws > MAX_RUN_WS:
        return ["accepted, workspace too large to run", None]
    x, y, wsb = Framed(x_np.nbytes, x_np), Framed(4 * out_n), Framed(ws)
    before = b.copy()
    rc = lib.ubp_model_run(b.ctypes.data, x.ptr, y.ptr, wsb.ptr)
    bad = [f"{n} canary overwritten" for n, f in (("input", x), ("output", y), ("workspace", wsb)) if not f.guards_ok()]
    if not np.array_equal(x.body(), x_np.view(np.uint8)):
        bad.append("input written")
    if not np.array_equal(before, b):
        bad.append("plan written")
    if pristine and rc != 0:
        bad.append(f"the pristine plan fails to run with code {rc}")
    return ["accepted, ran" if rc == 0 else f"accepted, run returned {rc}", ", ".join(bad) or None]


def main() -> None:
    spec = json.loads(open(sys.argv[1]).read())
    lib = _lib(spec["lib"])
    counts: Counter = Counter()
    failures: list[str] = []
    case = 0
    libs = []  # keep the kernel libraries loaded
    for plan in spec["plans"]:
        blob = np.load(plan["blob"])
        kernels = []
        for so, sym, ep, M, K in plan["kernels"]:
            kl = ctypes.CDLL(so)
            libs.append(kl)
            addr = ctypes.cast(getattr(kl, sym), ctypes.c_void_p).value
            eaddr = ctypes.cast(getattr(kl, ep), ctypes.c_void_p).value if ep else None
            kernels.append((addr, eaddr, M, K))
        x_np = np.random.default_rng(0).standard_normal(int(np.prod(plan["in_shape"]))).astype(np.float32)
        out_n = int(np.prod(plan["out_shape"]))
        for _ in range(spec["cases"]):
            if case < spec["start"]:
                case += 1
                continue
            rng = np.random.default_rng([spec["seed"], case])
            b, nbytes, desc = (_aligned_copy(blob), blob.nbytes, "pristine") if case % 200 == 0 else _damage(rng, blob)
            print(f"case {case} {plan['name']}: {desc}", flush=True)
            case += 1
            counts["tried"] += 1
            outcome, problem = _one(lib, b, nbytes, kernels, x_np, out_n, desc == "pristine")
            counts[outcome] += 1
            if problem:
                failures.append(f"case {case - 1} {plan['name']}: {desc}: {problem}")
    print(json.dumps({"counts": counts, "failures": failures}), flush=True)


if __name__ == "__main__":
    main()
