"""Fuzz: damaged and hostile bundles, through the C reader (bundle_main) and load_bundle.

* C reader, hypothesis: packed blobs with random byte damage *and the index's sha256 updated* (so
  only the blob validator stands between the damage and the kernel), kernels.tsv rows edited at
  random, .so files damaged without a matching sha256, files replaced by symbolic links. Exit 0
  must print ``W' @ x`` for the weights the damaged blob encodes (decoded here with numpy);
  anything else must be a non-zero exit with a message -- never a signal.
* load_bundle in-process, hypothesis: manifest.json with a field deleted or replaced by random
  JSON; kernels.tsv edits with the manifest's index sha256 updated; hostile layer names. The
  result is a :class:`~ubpdsl.errors.UbpError` or a bundle whose every kernel entry reads back.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import BYTE_DAMAGE, COUNTS, assert_all_clean, c_verdict, damage_bytes, record, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl.compiler import random_problem
from ubpdsl.errors import UbpError
from ubpdsl.export import build_bundle_main, export_bundle, load_bundle
from ubpdsl.masks import LayerMask

FUZZ = settings(max_examples=80, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
C_CLASS = "bundle: C reader"
PY_CLASS = "bundle: load_bundle (in-process)"


def _layer(name: str, M: int, K: int, seed: int) -> LayerMask:
    p = random_problem(M, K, 4, 0.5, seed=seed)
    return LayerMask(name, (M, K), 4, p.rows.astype(np.int32), p.cols.astype(np.int32), p.weight)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fb")
    masks = {"conv.0": _layer("conv.0", 12, 9, 0), "fc": _layer("fc", 10, 16, 1)}
    bundle = export_bundle(masks, root / "bundle", targets=["host"])
    exe = build_bundle_main("host", root / "bundle_main")
    return bundle, masks, exe


@pytest.fixture
def work(made, tmp_path):
    bundle, masks, exe = made

    def fresh() -> Path:
        dst = tmp_path / "b"
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(bundle, dst)
        return dst
    return fresh, masks, exe


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _x(K: int, n: int = 5) -> np.ndarray:
    k, j = np.meshgrid(np.arange(K), np.arange(n), indexing="ij")
    return (((k * 7 + j * 3) % 11 - 5) / 4.0).astype(np.float32)


def decode_blob(blob: bytes, M: int, K: int, N: int) -> np.ndarray:
    """Dense W of a packed blob, written from the format description (packing.py), independent of it."""
    h = np.frombuffer(blob[:48], "<i4")
    B, layout, off_rp, off_rows, off_cols, off_vals = (int(v) for v in h[5:11])
    rows = np.frombuffer(blob, "<i4", count=B, offset=off_rows)
    cols = np.frombuffer(blob, "<i4", count=B, offset=off_cols)
    vals = np.frombuffer(blob, "<f4", count=B * N, offset=off_vals).reshape(B, N).astype(np.float64)
    W = np.zeros((M, K))
    for b in range(B):
        for i in range(N):
            r = rows[b] + i if layout == 0 else rows[b] + (i - rows[b]) % N
            W[r, cols[b]] += vals[b, i]
    return W


def _y_matches(r, W: np.ndarray, x: np.ndarray) -> bool:
    try:
        y = np.array(r.stdout.split(), np.float64).reshape(W.shape[0], x.shape[1])
    except ValueError:
        return False
    if not np.all(np.isfinite(W)):
        return True  # inf/nan weights: any order of summation is as right as another
    return np.allclose(y, W @ x, rtol=1e-4, atol=1e-4)


def _index(root: Path) -> Path:
    return root / "host" / "kernels.tsv"


def _set_index_sha(root: Path, layer: str, col: int, sha: str) -> None:
    lines = _index(root).read_text().split("\n")
    for i, ln in enumerate(lines):
        cells = ln.split("\t")
        if cells[0] == layer:
            cells[col] = sha
            lines[i] = "\t".join(cells)
    _index(root).write_text("\n".join(lines))


def _run_c(exe: Path, root: Path, layer: str):
    return run([exe, root, "host", layer], timeout=30)


# ------------------------------------------------------------------------------------- C reader


@FUZZ
@given(data=st.data())
def test_fuzz_c_reader_damaged_blob_with_updated_sha(work, data):
    fresh, masks, exe = work
    root = fresh()
    name = data.draw(st.sampled_from(sorted(masks)))
    lm = masks[name]
    stem = name.replace(".", "_")
    path = root / "host" / f"{stem}.packed.bin"
    blob = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from([*BYTE_DAMAGE, "flip header", "int32 set"]))
    if kind in BYTE_DAMAGE:
        damage_bytes(data.draw, blob, kind)
    elif kind == "flip header":
        blob[data.draw(st.integers(0, 47))] ^= data.draw(st.integers(1, 255))
    else:  # one int32 word anywhere set to an edge value
        word = data.draw(st.integers(0, len(blob) // 4 - 1))
        value = data.draw(st.sampled_from([-1, 0, 1, 2**31 - 1, -(2**31), lm.R, lm.C, lm.R + 4, 64, 10**6]))
        blob[4 * word:4 * word + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(blob))
    _set_index_sha(root, name, 8, _sha(bytes(blob)))
    r = _run_c(exe, root, name)

    def ok(r) -> bool:  # exit 0: the printed y must be what the (still valid) blob encodes
        return _y_matches(r, decode_blob(bytes(blob), lm.R, lm.C, 4), _x(lm.C))

    why = c_verdict(r, ok)
    record(C_CLASS, f"blob {kind}", why)
    assert why is None, (why, r.stderr)


@FUZZ
@given(data=st.data())
def test_fuzz_c_reader_edited_index(work, data):
    fresh, masks, exe = work
    root = fresh()
    text = _index(root).read_text()
    kind = data.draw(st.sampled_from(["char", "insert", "delete", "line", "swap cells"]))
    if kind == "char":
        pos = data.draw(st.integers(0, len(text) - 1))
        ch = data.draw(st.sampled_from(["\t", "\n", "/", ".", "0", "-", "\0", "a", " "]))
        text = text[:pos] + ch + text[pos + 1:]
    elif kind == "insert":
        pos = data.draw(st.integers(0, len(text)))
        text = text[:pos] + data.draw(st.text(max_size=40)) + text[pos:]
    elif kind == "delete":
        a = data.draw(st.integers(0, len(text) - 1))
        text = text[:a] + text[a + data.draw(st.integers(1, 30)):]
    elif kind == "line":
        evil = data.draw(st.sampled_from(["../host/fc.host.so", "/bin/sh", "fc.host.so/../../x.so", "fc.host.so"]))
        text += "\t".join(["fc", "ubp_fc", "10", "16", "4", evil, "-", _sha(b""), "-"]) + "\n"
    else:
        lines = text.split("\n")
        cells = lines[1].split("\t")
        i, j = data.draw(st.integers(0, 8)), data.draw(st.integers(0, 8))
        cells[i], cells[j] = cells[j], cells[i]
        lines[1] = "\t".join(cells)
        text = "\n".join(lines)
    _index(root).write_bytes(text.encode("utf-8", "surrogatepass"))
    for name, lm in masks.items():
        r = _run_c(exe, root, name)
        why = c_verdict(r, lambda r, lm=lm, name=name: _y_matches(
            r, decode_blob((root / "host" / f"{name.replace('.', '_')}.packed.bin").read_bytes(), lm.R, lm.C, 4),
            _x(lm.C)))
        record(C_CLASS, f"index {kind}", why)
        assert why is None, (why, r.stderr)


@pytest.mark.parametrize("what", ["so flip", "so truncated", "so symlink", "blob symlink", "index symlink",
                                  "so is a directory", "blob missing", "so empty"])
def test_fuzz_c_reader_file_attacks(work, tmp_path, what):
    fresh, masks, exe = work
    root = fresh()
    so, blob = root / "host" / "fc.host.so", root / "host" / "fc.packed.bin"
    if what == "so flip":
        data = bytearray(so.read_bytes())
        data[len(data) // 2] ^= 0x55
        so.write_bytes(bytes(data))
    elif what == "so truncated":
        so.write_bytes(so.read_bytes()[:100])
    elif what in ("so symlink", "blob symlink", "index symlink"):
        target = {"so symlink": so, "blob symlink": blob, "index symlink": _index(root)}[what]
        outside = tmp_path / target.name
        shutil.move(target, outside)
        os.symlink(outside, target)
    elif what == "so is a directory":
        so.unlink()
        so.mkdir()
    elif what == "blob missing":
        blob.unlink()
    else:
        so.write_bytes(b"")
    r = _run_c(exe, root, "fc")
    why = c_verdict(r) or (None if r.returncode != 0 else "accepted a damaged bundle")
    record(C_CLASS, what, why)
    assert why is None, (why, r.stderr)
    try:
        load_bundle(root)
        why = "load_bundle accepted a damaged bundle"
    except UbpError:
        why = None
    except Exception as exc:  # noqa: BLE001
        why = f"{type(exc).__name__}: {exc}"
    record(PY_CLASS, what, why)
    assert why is None


# -------------------------------------------------------------------------------- load_bundle


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


JSON = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=6)


def _py_verdict(root: Path) -> str | None:
    try:
        b = load_bundle(root)
        for name in b.layers:
            for t in b.targets:
                f = b.kernel(name, t)
                assert f.so.is_file() and f.header.is_file()
            try:
                b.check_runs_here("host")
            except UbpError:
                pass
    except UbpError:
        return None
    except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    return None


@FUZZ
@given(data=st.data())
def test_fuzz_load_bundle_manifest_mutations(work, data):
    fresh, _, _ = work
    root = fresh()
    manifest = json.loads((root / "manifest.json").read_text())
    paths = [p for p in _paths(manifest) if p]
    path = data.draw(st.sampled_from(paths))
    m = copy.deepcopy(manifest)
    parent = m
    for k in path[:-1]:
        parent = parent[k]
    kind = data.draw(st.sampled_from(["delete", "replace", "huge"]))
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "replace":
        parent[path[-1]] = data.draw(JSON)
    else:
        parent[path[-1]] = data.draw(st.sampled_from([10**30, -1, "x" * 10_000, "a\nb\tc", "../../etc/passwd", [[[]]]]))
    (root / "manifest.json").write_text(json.dumps(m))
    why = _py_verdict(root)
    record(PY_CLASS, f"manifest {kind} {'/'.join(map(str, path))[:60]}", why)
    assert why is None, why


@FUZZ
@given(data=st.data())
def test_fuzz_load_bundle_index_edits_with_updated_sha(work, data):
    fresh, _, _ = work
    root = fresh()
    text = _index(root).read_text()
    pos = data.draw(st.integers(0, len(text)))
    text = text[:pos] + data.draw(st.text(min_size=1, max_size=30)) + text[pos + data.draw(st.integers(0, 10)):]
    raw = text.encode("utf-8", "surrogatepass")
    _index(root).write_bytes(raw)
    m = json.loads((root / "manifest.json").read_text())
    m["indexes"]["host"]["sha256"] = _sha(raw)
    (root / "manifest.json").write_text(json.dumps(m))
    why = _py_verdict(root)
    if why is None:
        try:  # an accepted index must still be exactly the one export wrote, row for row
            load_bundle(root)
            rows = [ln for ln in text.split("\n") if ln and not ln.startswith("#")]
            assert len(rows) == 2
        except UbpError:
            pass
        except AssertionError:
            why = "accepted an index with extra or missing rows"
    record(PY_CLASS, "index edit", why)
    assert why is None, why


@settings(max_examples=400, derandomize=True, deadline=None, database=None)
@given(name=st.text(max_size=220))
def test_fuzz_layer_names_map_to_safe_files_or_are_refused(name):
    """Any text is refused as a layer name (MaskError) or maps to an ASCII file stem and C symbol."""
    import re

    from ubpdsl.errors import MaskError
    from ubpdsl.names import check_unique_stems, file_stem, kernel_symbol

    try:
        stem = file_stem(name)
    except MaskError:
        unsafe = (not name or len(name) > 200 or name.startswith("#") or any(c in name for c in "/\\\n\t\r\0")
                  or any(ord(c) < 32 or 0x7f <= ord(c) < 0xa0 for c in name)
                  or any(c in "\u2028\u2029" or 0xd800 <= ord(c) < 0xe000 for c in name))
        why = None if unsafe else "refused a safe name"
    else:
        ok = (re.fullmatch(r"[A-Za-z0-9_]{1,200}", stem)
              and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", kernel_symbol(name))
              and not any(c in name for c in "\t\n/"))
        why = None if ok else f"unsafe stem {stem!r}"
        if why is None and stem != name:
            try:
                check_unique_stems([name, stem])
                why = "a name and its stem were not reported as a collision"
            except MaskError:
                pass
    record("names", "text", why)
    assert why is None, (name, why)


def test_fuzz_bundle_report():
    """Counts of the classes above (each case asserted itself)."""
    for cls in (C_CLASS, PY_CLASS, "names"):
        if COUNTS[cls]["tried"]:
            assert_all_clean(cls)
