"""Fuzz: hostile and damaged masks.npz files (formats 1 and 2), through load_masks in-process and the real CLI.

In-process (hypothesis, many cases): byte flips, truncations and appended bytes on a valid file;
the loader must return exactly the original layers (zip CRCs protect the data) or raise MaskError.
Through ``ubpdsl inspect`` / ``ubpdsl compile`` in a bounded subprocess: forged arrays with wrong
dtypes and shapes, huge declared shapes, tall blocks, bombs, encrypted members, non-zip files, and the
format-2 members: unknown kinds, bad pattern libraries and ids, ids that disagree with the blocks, bad
pixel masks.
"""

from __future__ import annotations

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import (
    BYTE_DAMAGE,
    COUNTS,
    assert_all_clean,
    cli_verdict,
    damage_bytes,
    deflate_bomb,
    npy,
    record,
    run_cli,
    set_zip_flag,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl.compiler import random_problem
from ubpdsl.errors import UbpError
from ubpdsl.masks import LayerMask, PatternMask, load_masks, save_masks

FUZZ = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


_LIB = np.zeros((2, 3, 3), np.uint8)
_LIB[0].flat[[0, 1, 4, 8]] = 1
_LIB[1].flat[[2, 4, 6, 7]] = 1


def _good_layers() -> list[LayerMask]:
    out = []
    for i, (M, K) in enumerate([(12, 9), (8, 20)]):
        p = random_problem(M, K, 4, 0.5, seed=i)
        out.append(LayerMask(f"f.{i}", (M, K), 4, p.rows.astype(np.int32), p.cols.astype(np.int32), p.weight))
    pm = PatternMask("conv", (4, 3, 3, 3), _LIB, np.array([[0, 1, -1]] * 4, np.int16))
    w = np.random.default_rng(2).standard_normal(pm.shape).astype(np.float32) * pm.dense_mask()
    out.append(LayerMask.from_pattern(pm, w, np.eye(5, dtype=bool)))  # format 2: pattern kind and pixel mask
    return out


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, dict[str, str]]:
    path = tmp_path_factory.mktemp("fm") / "good.npz"
    save_masks(path, _good_layers())
    return path.read_bytes(), {n: m.content_hash() for n, m in load_masks(path).items()}


def _load_verdict(path: Path, hashes: dict[str, str]) -> str | None:
    try:
        got = load_masks(path)
    except UbpError:
        return None
    except Exception as exc:  # noqa: BLE001 - this is what the fuzz looks for
        return f"{type(exc).__name__}: {str(exc)[:160]}"
    if {n: m.content_hash() for n, m in got.items()} != hashes:
        return "loaded different layers than were saved"
    return None


@FUZZ
@given(data=st.data())
def test_fuzz_masks_byte_damage_in_process(good, tmp_path, data):
    raw, hashes = good
    buf = bytearray(raw)
    kind = data.draw(st.sampled_from(BYTE_DAMAGE))
    damage_bytes(data.draw, buf, kind)
    path = tmp_path / "damaged.npz"
    path.write_bytes(bytes(buf))
    why = _load_verdict(path, hashes)
    record("masks: byte damage (in-process)", kind, why)
    assert why is None, why


def _zip(path: Path, members: dict[str, bytes], *, flags: int = 0) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    if flags:
        set_zip_flag(path, flags)
    return path


def _layer_members(shape=(12, 9), block=(4, 1), rows=None, cols=None, weight=None, name="L") -> dict[str, bytes]:
    rows = np.array([0, 4], np.int32) if rows is None else rows
    cols = np.array([1, 2], np.int32) if cols is None else cols
    m = {"format.npy": npy(np.array("ubpdsl.masks/1")), f"{name}.shape.npy": npy(np.asarray(shape)),
         f"{name}.block.npy": npy(np.asarray(block)), f"{name}.rows.npy": npy(rows), f"{name}.cols.npy": npy(cols)}
    if weight is not None:
        m[f"{name}.weight.npy"] = npy(weight)
    return m


def _v2_members(kind="pattern", library=_LIB, ids=None, pixel_keep=None, extra=None) -> dict[str, bytes]:
    """A valid format-2 pattern layer L ([2, 2, 3, 3], kernels (0, 0) and (1, 1) kept), then edited."""
    ids = np.array([[0, -1], [-1, 1]], np.int16) if ids is None else ids
    m = _layer_members(shape=(2, 2, 3, 3), block=(1, 1), rows=np.array([0] * 4 + [1] * 4, np.int32),
                       cols=np.array([0, 1, 4, 8, 11, 13, 15, 16], np.int32))
    m["format.npy"] = npy(np.array("ubpdsl.masks/2"))
    for field, value in (("kind", None if kind is None else np.array(kind)), ("pattern_library", library),
                         ("pattern_ids", ids), ("pixel_keep", pixel_keep)):
        if value is not None:
            m[f"L.{field}.npy"] = value if isinstance(value, bytes) else npy(value)
    m.update(extra or {})
    return m


def _huge_header(shape, descr="<f4") -> bytes:
    b = io.BytesIO()
    np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
    return b.getvalue() + b"\0" * 64


def _forged_cases(tmp: Path) -> dict[str, Path]:
    w = np.zeros((12, 9), np.float32)
    cases: dict[str, dict[str, bytes]] = {
        "shape float": _layer_members(shape=np.array([12.0, 9.0])),
        "shape 0-d": _layer_members(shape=np.int64(12)),
        "shape negative": _layer_members(shape=(-12, 9)),
        "shape 2**40": _layer_members(shape=(2**40, 2**20)),
        "shape 9 dims": _layer_members(shape=(2,) * 9),
        "block [3]": _layer_members(block=(4, 1, 1)),
        "block float": _layer_members(block=np.array([4.0, 1.0])),
        "block 10**9 on 2x8": _layer_members(shape=(2, 8), block=(10**9, 1), rows=np.zeros(0, np.int32),
                                             cols=np.zeros(0, np.int32)),
        "block 0": _layer_members(block=(0, 1)),
        "block 65": _layer_members(shape=(80, 8), block=(65, 1), rows=np.zeros(0, np.int32),
                                   cols=np.zeros(0, np.int32)),
        "rows float": _layer_members(rows=np.array([0.0, 4.0])),
        "rows 2-d": _layer_members(rows=np.zeros((2, 1), np.int32)),
        "rows out of range": _layer_members(rows=np.array([0, 11], np.int32)),
        "rows int64 huge": _layer_members(rows=np.array([0, 2**40])),
        "overlapping blocks": _layer_members(rows=np.array([0, 2], np.int32), cols=np.array([1, 1], np.int32)),
        "rows/cols length differ": _layer_members(cols=np.array([1], np.int32)),
        "weight wrong shape": _layer_members(weight=np.zeros((9, 12), np.float32)),
        "weight int": _layer_members(weight=np.zeros((12, 9), np.int32)),
        "weight NaN": _layer_members(weight=np.where(np.ones_like(w, bool), np.nan, w)),
        "weight outside blocks": _layer_members(weight=np.ones((12, 9), np.float32)),
        "weight object": {**_layer_members(), "L.weight.npy": npy(np.array([None, 1], dtype=object))},
        "weight header claims 2**31 elements": {**_layer_members(), "L.weight.npy": _huge_header((2**16, 2**15))},
        "weight header claims shape of the layer, data short": {**_layer_members(), "L.weight.npy":
                                                                _huge_header((12, 9))},
        "no format": {k: v for k, v in _layer_members().items() if k != "format.npy"},
        "format wrong": {**_layer_members(), "format.npy": npy(np.array("ubpdsl.masks/3"))},
        "format huge string": {**_layer_members(), "format.npy": npy(np.array("x" * 100_000))},
        "unknown field": {**_layer_members(), "L.bias.npy": npy(np.zeros(3))},
        "not .npy member": {**_layer_members(), "evil.sh": b"rm -rf /"},
        "bad npy magic": {**_layer_members(), "L.rows.npy": b"\x93NUMPX" + b"\0" * 100},
        "npy version 3": {**_layer_members(), "L.rows.npy": b"\x93NUMPY\x03\x00" + b"\0" * 100},
        "layer name with newline": _layer_members(name="a\nb"),
        "layer name with tab": _layer_members(name="a\tb"),
        "layer name 300 chars": _layer_members(name="x" * 300),
        "v2 kind unknown": _v2_members(kind="diagonal"),
        "v2 kind object": _v2_members(kind=None, extra={"L.kind.npy": npy(np.array(["pattern"], dtype=object))}),
        "v2 kind huge string": _v2_members(kind="p" * 100_000),
        "v2 kind int": _v2_members(kind=None, extra={"L.kind.npy": npy(np.array(7))}),
        "v2 pattern without ids": {k: v for k, v in _v2_members().items() if k != "L.pattern_ids.npy"},
        "v2 pattern keys on a blocks layer": _v2_members(kind="blocks"),
        "v2 library 3-weight pattern": _v2_members(library=np.eye(3, dtype=np.uint8)[None]),
        "v2 library without centre": _v2_members(library=np.array([[[1, 1, 1], [1, 0, 0], [0, 0, 0]]], np.uint8)),
        "v2 library entries 2": _v2_members(library=_LIB * 2),
        "v2 library repeated": _v2_members(library=np.stack([_LIB[0], _LIB[0]])),
        "v2 library float": _v2_members(library=_LIB.astype(np.float32)),
        "v2 library 10**6 patterns (header)": _v2_members(library=_huge_header((10**6, 3, 3), "|u1")),
        "v2 library 4x4": _v2_members(library=np.ones((1, 4, 4), np.uint8)),
        "v2 ids out of range": _v2_members(ids=np.array([[0, -1], [-1, 2]], np.int16)),
        "v2 ids -2": _v2_members(ids=np.array([[0, -2], [-1, 1]], np.int16)),
        "v2 ids wrong shape": _v2_members(ids=np.zeros((2, 3), np.int16)),
        "v2 ids header claims 2**40": _v2_members(ids=_huge_header((2**20, 2**20), "<i2")),
        "v2 ids disagree with blocks": _v2_members(ids=np.array([[1, -1], [-1, 1]], np.int16)),
        "v2 pattern on a 1x1 conv": {**_layer_members(), "format.npy": npy(np.array("ubpdsl.masks/2")),
                                     "L.kind.npy": npy(np.array("pattern")), "L.pattern_library.npy": npy(_LIB),
                                     "L.pattern_ids.npy": npy(np.zeros((12, 9), np.int16))},
        "v2 pixel mask empty": _v2_members(pixel_keep=np.zeros((4, 4), np.uint8)),
        "v2 pixel mask 3-d": _v2_members(pixel_keep=np.ones((2, 2, 2), np.uint8)),
        "v2 pixel mask 0x5": _v2_members(pixel_keep=np.ones((0, 5), np.uint8)),
        "v2 pixel mask values 3": _v2_members(pixel_keep=np.full((2, 2), 3, np.uint8)),
        "v2 pixel mask float": _v2_members(pixel_keep=np.ones((2, 2), np.float64)),
        "v2 pixel mask object": _v2_members(pixel_keep=np.array([[1, None]], dtype=object)),
        "v2 pixel mask header claims 2**32": _v2_members(pixel_keep=_huge_header((2**16, 2**16), "|u1")),
        "v1 with a pixel mask": {**_layer_members(), "L.pixel_keep.npy": npy(np.ones((2, 2), np.uint8))},
        "v1 with a kind": {**_layer_members(), "L.kind.npy": npy(np.array("pattern"))},
        "old schemes sidecar": {"format.npy": npy(np.array("ubpdsl.schemes/1")),
                                "L.pixel_keep.npy": npy(np.ones((2, 2), np.uint8))},
        "colliding names": {**_layer_members(name="a.b"), **{k: v for k, v in _layer_members(name="a_b").items()
                                                            if k != "format.npy"}},
    }
    out = {name: _zip(tmp / f"case{i}.npz", members) for i, (name, members) in enumerate(cases.items())}
    out["encrypted"] = _zip(tmp / "enc.npz", _layer_members(), flags=0x1)
    out["deflate bomb"] = deflate_bomb(tmp / "bomb.npz")
    (tmp / "notzip.npz").write_bytes(b"PK\x03\x04 not really a zip" * 10)
    out["not a zip"] = tmp / "notzip.npz"
    (tmp / "empty.npz").write_bytes(b"")
    out["empty file"] = tmp / "empty.npz"
    (tmp / "dir.npz").mkdir()
    out["a directory"] = tmp / "dir.npz"
    (tmp / "link.npz").symlink_to(tmp / "missing-target.npz")
    out["dangling symlink"] = tmp / "link.npz"
    return out


#: Cases that also run through the real CLI (a subprocess each: slower); ``compile`` loads the compiler too.
CLI_CASES = {"block 10**9 on 2x8", "deflate bomb", "encrypted", "colliding names", "weight NaN", "not a zip",
             "shape 2**40", "layer name with tab", "weight object", "a directory", "dangling symlink",
             "weight header claims 2**31 elements", "rows out of range", "empty file", "v2 kind unknown",
             "v2 ids header claims 2**40", "v2 ids disagree with blocks", "v2 pixel mask header claims 2**32",
             "v2 library without centre"}
COMPILE_TOO = {"block 10**9 on 2x8", "deflate bomb", "encrypted", "colliding names", "layer name with tab",
               "v2 kind unknown", "v2 ids disagree with blocks"}


def test_fuzz_masks_v2_base_case_is_valid(tmp_path):
    """The forged format-2 cases edit a file that loads: each one breaks exactly the rule it names."""
    got = load_masks(_zip(tmp_path / "v2.npz", _v2_members(pixel_keep=np.ones((2, 2), np.uint8))))["L"]
    assert got.kind == "pattern" and got.kept_pixels == 4


def test_fuzz_masks_forged_files_in_process(tmp_path):
    for name, path in _forged_cases(tmp_path).items():
        try:
            got = load_masks(path)
            # every other forged case breaks a rule of the format; two names that share a file stem only
            # matter where files are written (compile refuses them), so inspect may read them
            why = None if name == "colliding names" and sorted(got) == ["a.b", "a_b"] else "accepted a forged file"
        except UbpError:
            why = None
        except Exception as exc:  # noqa: BLE001 - what the fuzz looks for
            why = f"{type(exc).__name__}: {str(exc)[:160]}"
        record("masks: forged files (in-process)", name, why)
    assert_all_clean("masks: forged files (in-process)")


def test_fuzz_masks_forged_files_through_the_cli(tmp_path):
    cases = {k: v for k, v in _forged_cases(tmp_path).items() if k in CLI_CASES}
    assert len(cases) == len(CLI_CASES)

    def one(item: tuple[str, Path]) -> None:
        name, path = item
        cmds = [["inspect", str(path)]]
        if name in COMPILE_TOO:
            cmds.append(["compile", "--mask", str(path), "-o", str(tmp_path / "o" / name[:20])])
        for cmd in cmds:
            r = run_cli(*cmd, timeout=120)
            # exit 0 is only right for a file that loads in-process as well
            record("masks: forged files (CLI)", f"{cmd[0]} {name}", cli_verdict(r, lambda r, p=path: _loads(p)))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, cases.items()))
    assert_all_clean("masks: forged files (CLI)")


def _loads(path: Path) -> bool:
    try:
        load_masks(path)
        return True
    except UbpError:
        return False


def test_fuzz_masks_report():
    """The in-process fuzz's counts (it runs first, in file order; each of its cases asserts itself)."""
    if COUNTS["masks: byte damage (in-process)"]["tried"]:
        assert_all_clean("masks: byte damage (in-process)")
