"""masks.npz ("ubpdsl.masks/2", and /1 files): round trips, validation and hostile files."""

from __future__ import annotations

import ast
import io
import os
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubpdsl.errors import MaskError, UbpError
from ubpdsl.masks import FORMAT, LayerMask, load_masks, save_masks, validate_blocks
from ubpdsl.prune.selectors import bed_select, blocks_to_mask, budget

NAME = "features.1.conv.0.0"


def make_layer(name=NAME, shape=(24, 6, 1, 1), N=4, sparsity=0.75, weights=True, seed=0) -> LayerMask:
    rng = np.random.default_rng(seed)
    R, C = shape[0], int(np.prod(shape[1:]))
    w = rng.standard_normal((R, C)).astype(np.float32)
    rows, cols = bed_select(np.abs(w), budget(R, C, N, sparsity), N)
    weight = w * blocks_to_mask(rows, cols, R, C, N) if weights else None
    return LayerMask(name, shape, N, rows, cols, weight)


def write_npz(path: Path, arrays: dict, allow_pickle: bool = False) -> Path:
    """An npz written by numpy itself, with whatever keys and arrays a test wants."""
    with open(path, "wb") as f:
        np.savez(f, allow_pickle=allow_pickle, **arrays)
    return path


def layer_arrays(lm: LayerMask) -> dict[str, np.ndarray]:
    d = {
        "format": np.array(FORMAT),
        f"{lm.name}.shape": np.array(lm.shape, dtype=np.int64),
        f"{lm.name}.block": np.array([lm.block, 1], dtype=np.int64),
        f"{lm.name}.rows": lm.rows,
        f"{lm.name}.cols": lm.cols,
    }
    if lm.weight is not None:
        d[f"{lm.name}.weight"] = lm.weight
    return d


def npy_bytes(descr: str, shape: tuple, data: bytes) -> bytes:
    """A hand-made .npy member whose header may lie about the data that follows."""
    header = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode("latin1")
    header += b" " * ((64 - (10 + len(header) + 1) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


# --------------------------------------------------------------------------------------------------
# LayerMask and round trips
# --------------------------------------------------------------------------------------------------


def test_layer_properties_and_dense_mask():
    lm = LayerMask("fc", (10, 3, 2), 2, np.array([0, 4, 8, 1]), np.array([5, 5, 5, 0]))
    assert (lm.R, lm.C, lm.num_blocks, lm.nnz) == (10, 6, 4, 8)
    assert lm.sparsity == pytest.approx(1 - 8 / 60)
    expect = np.zeros((10, 6), bool)
    expect[0:2, 5] = expect[4:6, 5] = expect[8:10, 5] = expect[1:3, 0] = True
    np.testing.assert_array_equal(lm.dense_mask(), expect)
    assert lm.rows.dtype == np.int32 and lm.cols.dtype == np.int32
    lm.validate()


def test_weight_of_original_shape_is_reshaped():
    w = np.zeros((8, 2, 3, 3), np.float64)
    w[0:4, 0, 0, 0] = 1.0
    lm = LayerMask("conv", w.shape, 4, [0], [0], w)
    assert lm.weight.shape == (8, 18) and lm.weight.dtype == np.float32
    lm.validate()


@pytest.mark.parametrize("weights", [True, False])
def test_round_trip(tmp_path, weights):
    layers = {
        NAME: make_layer(weights=weights),
        "classifier.1": make_layer("classifier.1", (40, 12), N=2, sparsity=0.5, weights=weights, seed=1),
        "a.b.c.d.e": make_layer("a.b.c.d.e", (9, 3), N=8, sparsity=0.8, weights=weights, seed=2),
    }
    path = tmp_path / "masks.npz"
    save_masks(path, layers)
    back = load_masks(path)
    assert list(back) == list(layers)
    for name, lm in layers.items():
        got = back[name]
        assert got.name == name and got.shape == lm.shape and got.block == lm.block
        np.testing.assert_array_equal(got.dense_mask(), lm.dense_mask())
        order = np.lexsort((got.cols, got.rows))
        np.testing.assert_array_equal(order, np.arange(got.num_blocks))  # stored sorted by (row, col)
        assert (got.weight is None) == (not weights)
        if weights:
            np.testing.assert_array_equal(got.weight, lm.weight)
        assert got.content_hash() == lm.content_hash()
    # raw keys as documented in INTERFACES.md
    with np.load(path, allow_pickle=False) as z:
        assert str(z["format"]) == FORMAT
        assert z[f"{NAME}.block"].tolist() == [4, 1]
        assert z[f"{NAME}.shape"].tolist() == [24, 6, 1, 1]
        assert z[f"{NAME}.rows"].dtype == np.int32


def test_save_accepts_iterable_and_is_atomic(tmp_path):
    path = tmp_path / "m.npz"
    path.write_bytes(b"old contents")
    save_masks(path, [make_layer()])
    assert list(load_masks(path)) == [NAME]
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]  # no temp file left behind
    # a failing save leaves the previous file untouched and no temp file
    bad = LayerMask("bad", (8, 1), 4, [0, 2], [0, 0])
    with pytest.raises(MaskError, match="'bad'"):
        save_masks(path, [make_layer(), bad])
    assert list(load_masks(path)) == [NAME]
    assert sorted(os.listdir(tmp_path)) == ["m.npz"]


def test_save_rejects_duplicates_and_mismatched_keys(tmp_path):
    with pytest.raises(MaskError, match="twice"):
        save_masks(tmp_path / "x.npz", [make_layer(), make_layer()])
    with pytest.raises(MaskError, match="different key"):
        save_masks(tmp_path / "x.npz", {"other": make_layer()})


def test_content_hash():
    lm = make_layer()
    perm = np.random.default_rng(0).permutation(lm.num_blocks)
    shuffled = LayerMask("other.name", lm.shape, lm.block, lm.rows[perm], lm.cols[perm], lm.weight)
    assert shuffled.content_hash() == lm.content_hash()  # order and name do not matter
    no_w = LayerMask(lm.name, lm.shape, lm.block, lm.rows, lm.cols)
    assert no_w.content_hash() != lm.content_hash()
    w2 = lm.weight.copy()
    w2[lm.rows[0], lm.cols[0]] += 1.0
    assert LayerMask(lm.name, lm.shape, lm.block, lm.rows, lm.cols, w2).content_hash() != lm.content_hash()
    fewer = LayerMask(lm.name, lm.shape, lm.block, lm.rows[1:], lm.cols[1:])
    assert fewer.content_hash() != no_w.content_hash()
    shifted = LayerMask(lm.name, lm.shape, lm.block, lm.rows, (lm.cols + 1) % lm.C)  # still disjoint
    assert shifted.content_hash() != no_w.content_hash()
    assert LayerMask(lm.name, (24, 6), lm.block, lm.rows, lm.cols).content_hash() != no_w.content_hash()
    assert len(lm.content_hash()) == 64


# --------------------------------------------------------------------------------------------------
# Validation of blocks and weights
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,cols,pattern",
    [
        ([0, 5], [0, 1], r"block 1 \(row 5, col 1\) is out of range"),  # R-N = 4
        ([0, -1], [0, 1], r"block 1 \(row -1, col 1\) is out of range"),
        ([0, 0], [0, 3], r"block 1 \(row 0, col 3\) is out of range"),
        ([2, 0, 3], [1, 0, 1], r"block 2 \(row 3, col 1\) overlaps block 0 \(row 2, col 1\)"),
        ([1, 1], [2, 2], r"block 1 \(row 1, col 2\) overlaps block 0"),
    ],
)
def test_validate_blocks_names_layer_and_block(rows, cols, pattern):
    with pytest.raises(MaskError, match=r"layer 'blk\.x': " + pattern):
        validate_blocks(np.array(rows), np.array(cols), 6, 3, 2, layer="blk.x")


def test_validate_blocks_accepts_touching_blocks():
    validate_blocks(np.array([0, 2, 4, 1]), np.array([0, 0, 0, 1]), 6, 2, 2)


def test_validate_blocks_other_errors():
    with pytest.raises(MaskError, match="N must be an integer >= 1"):
        validate_blocks(np.array([0]), np.array([0]), 4, 4, 0, "L")
    with pytest.raises(MaskError, match="2 rows but 1 cols"):
        validate_blocks(np.array([0, 1]), np.array([0]), 4, 4, 1, "L")
    with pytest.raises(MaskError, match="integers"):
        validate_blocks(np.array([0.0]), np.array([0]), 4, 4, 1, "L")


def test_layermask_rejects_bad_values():
    with pytest.raises(MaskError, match="'L': rows must be integers"):
        LayerMask("L", (8, 2), 2, np.array([0.5]), np.array([0]))
    with pytest.raises(MaskError, match="'L': weight must be floating"):
        LayerMask("L", (8, 2), 2, [0], [0], np.zeros((8, 2), np.int32))
    with pytest.raises(MaskError, match=r"'L': weight shape \(2, 8\) does not match"):
        LayerMask("L", (8, 2), 2, [0], [0], np.zeros((2, 8), np.float32))
    with pytest.raises(MaskError, match="'L': block size N must be an integer >= 1"):
        LayerMask("L", (8, 2), 0, [0], [0])
    with pytest.raises(MaskError, match="'L': shape dimensions must be >= 1"):
        LayerMask("L", (8, 0), 2, [0], [0])
    with pytest.raises(MaskError, match="layer name"):
        LayerMask("", (8, 2), 2, [0], [0])
    with pytest.raises(MaskError, match=r"elements \(limit"):
        LayerMask("huge", (10**6, 10**6), 4, [0], [0])  # checked before anything is allocated


def test_validate_weight_outside_blocks():
    w = np.zeros((8, 2), np.float32)
    w[0:4, 1] = 1.0
    w[6, 0] = 0.5
    lm = LayerMask("L.w", (8, 2), 4, [0], [1], w)
    with pytest.raises(MaskError, match=r"layer 'L.w': weight\[6, 0\] = 0.5 is nonzero but not in any kept"):
        lm.validate()
    w[6, 0] = 0.0
    w[1, 1] = np.nan
    with pytest.raises(MaskError, match=r"weight\[1, 1\] is not finite"):
        LayerMask("L.w", (8, 2), 4, [0], [1], w).validate()


# --------------------------------------------------------------------------------------------------
# Hostile and broken files
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path) -> Path:
    path = tmp_path / "good.npz"
    save_masks(path, [make_layer()])
    return path


def test_missing_file(tmp_path):
    with pytest.raises(MaskError, match="no such masks file"):
        load_masks(tmp_path / "nope.npz")
    with pytest.raises(MaskError, match="not a regular file"):
        load_masks(tmp_path)


def test_truncated_file(tmp_path, good):
    data = good.read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        p = tmp_path / f"cut{cut}.npz"
        p.write_bytes(data[:cut])
        with pytest.raises(MaskError, match="cut"):
            load_masks(p)


def test_not_an_npz(tmp_path):
    p = tmp_path / "text.npz"
    p.write_text("hello, I am not a zip file\n")
    with pytest.raises(MaskError, match="not a valid zip"):
        load_masks(p)
    p = tmp_path / "plain.npz"
    np.save(open(p, "wb"), np.arange(3))  # a .npy, not an .npz
    with pytest.raises(MaskError, match="not a valid zip"):
        load_masks(p)
    p = tmp_path / "other.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(MaskError, match="'readme.txt' is not a .npy array"):
        load_masks(p)


def test_zip_with_garbage_member(tmp_path):
    p = tmp_path / "garbage.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("format.npy", np.random.default_rng(0).bytes(300))
    with pytest.raises(MaskError, match="'format': corrupt array"):
        load_masks(p)


def test_corrupt_member_data_crc(tmp_path, good):
    lm = make_layer()
    p = write_npz(tmp_path / "stored.npz", layer_arrays(lm))  # stored, not deflated
    data = bytearray(p.read_bytes())
    needle = lm.weight.tobytes()[:32]
    at = bytes(data).index(needle)
    data[at + 5] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(MaskError, match=rf"layer '{NAME}': key '{NAME}.weight': corrupt array.*CRC"):
        load_masks(p)


def test_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arrays = layer_arrays(make_layer())
    arrays[f"{NAME}.rows"] = np.array([Evil()], dtype=object)
    p = write_npz(tmp_path / "evil.npz", arrays, allow_pickle=True)
    with pytest.raises(MaskError, match=rf"layer '{NAME}': key '{NAME}.rows': holds Python objects"):
        load_masks(p)
    assert not marker.exists()
    arrays = layer_arrays(make_layer())
    arrays["format"] = np.array([FORMAT], dtype=object)
    p = write_npz(tmp_path / "evil2.npz", arrays, allow_pickle=True)
    with pytest.raises(MaskError, match="'format': holds Python objects"):
        load_masks(p)


def test_format_key(tmp_path):
    arrays = layer_arrays(make_layer())
    del arrays["format"]
    with pytest.raises(MaskError, match="missing 'format' key"):
        load_masks(write_npz(tmp_path / "a.npz", arrays))
    arrays["format"] = np.array("ubpdsl.masks/3")
    with pytest.raises(MaskError, match="unsupported masks format 'ubpdsl.masks/3'"):
        load_masks(write_npz(tmp_path / "b.npz", arrays))
    arrays["format"] = np.array([1, 2])
    with pytest.raises(MaskError, match="'format' must be one string"):
        load_masks(write_npz(tmp_path / "c.npz", arrays))


@pytest.mark.parametrize("field", ["shape", "block", "rows", "cols"])
def test_layer_missing_key(tmp_path, field):
    arrays = layer_arrays(make_layer())
    del arrays[f"{NAME}.{field}"]
    with pytest.raises(MaskError, match=rf"layer '{NAME}': missing key '{NAME}.{field}'"):
        load_masks(write_npz(tmp_path / "m.npz", arrays))


def test_unknown_field(tmp_path):
    arrays = layer_arrays(make_layer())
    arrays[f"{NAME}.bias"] = np.zeros(3)
    with pytest.raises(MaskError, match=rf"layer '{NAME}': unknown field 'bias'"):
        load_masks(write_npz(tmp_path / "m.npz", arrays))


@pytest.mark.parametrize(
    "field,value,pattern",
    [
        ("rows", lambda lm: lm.rows.astype(np.float32), "rows must be integers"),
        ("cols", lambda lm: lm.cols.astype(np.float64), "cols must be integers"),
        ("cols", lambda lm: lm.cols.astype(str), "cols must be integers"),
        ("weight", lambda lm: lm.weight.astype(np.int32), "weight must be floating point"),
        ("shape", lambda lm: np.array([24.0, 6.0]), "shape must be integers"),
        ("block", lambda lm: np.array([4]), r"must be \[N, 1\]"),
        ("block", lambda lm: np.array([0, 1]), r"block must be \[N, 1\] with N >= 1.*got \[0, 1\]"),
        ("block", lambda lm: np.array([4, 2]), r"got \[4, 2\]"),
        ("shape", lambda lm: np.array([24, 0]), "dimensions must be >= 1"),
        ("weight", lambda lm: lm.weight[:, :5].copy(), r"weight shape \(24, 5\) does not match"),
        ("weight", lambda lm: lm.weight.ravel(), "must have 2 dimension"),
        ("rows", lambda lm: lm.rows[:-1].copy(), "8 rows but 9 cols"),
    ],
)
def test_bad_fields(tmp_path, field, value, pattern):
    lm = make_layer()
    arrays = layer_arrays(lm)
    arrays[f"{NAME}.{field}"] = value(lm)
    with pytest.raises(MaskError, match=rf"layer '{NAME}'.*{pattern}"):
        load_masks(write_npz(tmp_path / "m.npz", arrays))


def test_blocks_out_of_range_and_overlapping_on_load(tmp_path):
    lm = make_layer(weights=False)
    arrays = layer_arrays(lm)
    rows = lm.rows.copy()
    rows[3] = 21  # R - N = 20
    arrays[f"{NAME}.rows"] = rows
    with pytest.raises(MaskError, match=rf"layer '{NAME}': block 3 \(row 21, col {lm.cols[3]}\) is out of range"):
        load_masks(write_npz(tmp_path / "a.npz", arrays))
    rows = np.array([0, 2], np.int32)
    arrays[f"{NAME}.rows"], arrays[f"{NAME}.cols"] = rows, np.array([5, 5], np.int32)
    with pytest.raises(MaskError, match=rf"layer '{NAME}': block 1 \(row 2, col 5\) overlaps block 0"):
        load_masks(write_npz(tmp_path / "b.npz", arrays))


def test_weight_outside_blocks_on_load(tmp_path):
    lm = make_layer()
    arrays = layer_arrays(lm)
    w = lm.weight.copy()
    r, c = np.argwhere(~lm.dense_mask())[0]
    w[r, c] = 3.0
    arrays[f"{NAME}.weight"] = w
    with pytest.raises(MaskError, match=rf"layer '{NAME}': weight\[{r}, {c}\] = 3.0 is nonzero"):
        load_masks(write_npz(tmp_path / "m.npz", arrays))


def test_hostile_sizes(tmp_path):
    arrays = layer_arrays(make_layer(weights=False))
    # a shape claiming 10^12 weights: refused before anything of that size is allocated
    arrays[f"{NAME}.shape"] = np.array([10**6, 10**6], np.int64)
    with pytest.raises(MaskError, match=rf"layer '{NAME}'.*limit"):
        load_masks(write_npz(tmp_path / "a.npz", arrays))
    # more blocks than can fit
    arrays = layer_arrays(make_layer(weights=False))
    arrays[f"{NAME}.rows"] = np.zeros(37, np.int32)
    arrays[f"{NAME}.cols"] = np.zeros(37, np.int32)
    with pytest.raises(MaskError, match=r"37 blocks cannot fit in a 24x6 weight with N=4 \(at most 36\)"):
        load_masks(write_npz(tmp_path / "b.npz", arrays))
    # .npy headers that lie: 10^12 elements claimed, 16 bytes present
    for key in ("format", f"{NAME}.rows", f"{NAME}.weight"):
        p = tmp_path / "lie.npz"
        with zipfile.ZipFile(p, "w") as z:
            for k, a in layer_arrays(make_layer()).items():
                if k == key:
                    continue
                buf = io.BytesIO()
                np.save(buf, a)
                z.writestr(k + ".npy", buf.getvalue())
            z.writestr(key + ".npy", npy_bytes("<i4", (10**12,), b"\0" * 16))
        with pytest.raises(MaskError, match=r"claims 1000000000000 elements"):
            load_masks(p)


def test_duplicate_keys(tmp_path):
    p = tmp_path / "dup.npz"
    with zipfile.ZipFile(p, "w") as z:
        for k, a in [*layer_arrays(make_layer()).items(), ("format", np.array(FORMAT))]:
            buf = io.BytesIO()
            np.save(buf, a)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
                z.writestr(k + ".npy", buf.getvalue())
    with pytest.raises(MaskError, match="key 'format' appears twice"):
        load_masks(p)


def test_npy_bytes_helper_is_valid_npy():
    arr = np.load(io.BytesIO(npy_bytes("<i4", (4,), np.arange(4, dtype="<i4").tobytes())))
    assert arr.tolist() == [0, 1, 2, 3]
    header = npy_bytes("<f8", (2, 3), b"")[10:].decode("latin1")
    assert ast.literal_eval(header.strip())["shape"] == (2, 3)


def test_errors_are_ubp_errors(good):
    assert issubclass(MaskError, UbpError)
    assert isinstance(load_masks(good)[NAME], LayerMask)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_random_corruption_gives_maskerror_or_valid_masks(tmp_path, data):
    """Flipping random bytes never produces anything but valid masks or a MaskError."""
    path = tmp_path / "fuzz.npz"
    if not path.exists():
        lm = make_layer()
        write_npz(path, layer_arrays(lm))
    raw = bytearray(path.read_bytes())
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(1, 255)), min_size=1, max_size=4))
    for at, x in flips:
        raw[at] ^= x
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(raw))
    try:
        out = load_masks(bad)
    except MaskError:
        return
    for lm in out.values():
        lm.validate()


# ------------------------------------------------------------------ format 2: layer kinds, pixel masks


def _pattern_layer(pixel_keep=None) -> LayerMask:
    from ubpdsl.masks import PatternMask

    rng = np.random.default_rng(4)
    lib = np.zeros((3, 3, 3), np.uint8)
    for p, idx in enumerate([(0, 1, 4, 8), (2, 4, 6, 7), (3, 4, 5, 7)]):
        lib[p].flat[list(idx)] = 1
    ids = rng.integers(-1, 3, size=(6, 5)).astype(np.int16)
    pm = PatternMask("conv", (6, 5, 3, 3), lib, ids)
    w = rng.standard_normal((6, 5, 3, 3)).astype(np.float32) * pm.dense_mask()
    return LayerMask.from_pattern(pm, w, pixel_keep)


def test_v1_file_still_loads_and_v2_fields_are_refused_in_v1(tmp_path):
    lm = make_layer()
    arrays = layer_arrays(lm)
    arrays["format"] = np.array("ubpdsl.masks/1")
    got = load_masks(write_npz(tmp_path / "v1.npz", arrays))[NAME]
    assert got.kind == "blocks" and got.pattern is None and got.pixel_keep is None
    assert got.content_hash() == lm.content_hash()
    arrays[f"{NAME}.pixel_keep"] = np.ones((2, 2), np.uint8)
    with pytest.raises(MaskError, match="unknown field 'pixel_keep'.*format ubpdsl.masks/1"):
        load_masks(write_npz(tmp_path / "v1x.npz", arrays))


def test_pattern_and_pixel_layer_roundtrip(tmp_path):
    keep = np.random.default_rng(1).random((4, 7)) > 0.5
    lm = _pattern_layer(keep)
    save_masks(tmp_path / "m.npz", [lm, make_layer()])
    with np.load(tmp_path / "m.npz") as z:
        assert str(z["format"]) == "ubpdsl.masks/2" and str(z["conv.kind"]) == "pattern"
        assert str(z[f"{NAME}.kind"]) == "blocks"
    got = load_masks(tmp_path / "m.npz")
    g = got["conv"]
    assert g.kind == "pattern" and g.block == 1 and g.kept_pixels == int(keep.sum())
    assert np.array_equal(g.pattern.ids, lm.pattern.ids) and np.array_equal(g.pixel_keep, keep)
    # independent reference: the kept weights are where library[ids] is set, nothing else
    lib = np.concatenate([lm.pattern.library, np.zeros((1, 3, 3), bool)])
    assert np.array_equal(g.dense_mask(), lib[lm.pattern.ids.astype(int)].reshape(6, 45))
    assert g.content_hash() == lm.content_hash()
    assert LayerMask.from_pattern(lm.pattern, lm.weight).content_hash() != lm.content_hash()  # pixel mask counts
    assert got[NAME].kind == "blocks" and got[NAME].content_hash() == make_layer().content_hash()


def test_dense_layer_with_pixel_mask():
    w = np.arange(1, 1 + 12 * 9, dtype=np.float32).reshape(12, 1, 3, 3)
    lm = LayerMask.dense("d", w, 4, np.eye(3, dtype=bool))
    lm.validate()
    assert lm.block == 4 and lm.sparsity == 0 and lm.kept_pixels == 3
    assert LayerMask.dense("d", w[:10], 4).block == 1  # 10 rows: N = 4 does not tile them


def _v2_arrays(lm: LayerMask) -> dict[str, np.ndarray]:
    arrays = layer_arrays(lm)
    arrays["format"] = np.array("ubpdsl.masks/2")
    return arrays


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.__setitem__("conv.kind", np.array("diagonal")), "unknown layer kind 'diagonal'"),
        (lambda a: a.__setitem__("conv.kind", np.array(["pattern", "x"])), "kind must be one string"),
        (lambda a: a.pop("conv.pattern_ids"), "kind 'pattern' needs keys"),
        (lambda a: a.__setitem__("conv.kind", np.array("blocks")), "belongs to kind 'pattern'"),
        (lambda a: a.__setitem__("conv.pattern_ids", np.full((6, 5), 3, np.int16)), "pattern id 3"),
        (lambda a: a.__setitem__("conv.pattern_ids", np.zeros((5, 6), np.int16)), "pattern ids must have shape"),
        (lambda a: a.__setitem__("conv.pattern_ids", np.zeros((6, 5), np.float32)), "pattern ids must be integers"),
        (lambda a: a.__setitem__("conv.pattern_library", np.ones((60, 3, 3), np.uint8)), "at most 56"),
        (lambda a: a.__setitem__("conv.block", np.array([2, 1])), "N = 1 blocks|out of range|overlaps"),
        (lambda a: a.__setitem__("conv.cols", a["conv.cols"][::-1] * 0), "overlaps|not the pattern"),
        (lambda a: a.__setitem__("conv.pixel_keep", np.zeros((3, 3), np.uint8)), "keeps no output position"),
        (lambda a: a.__setitem__("conv.pixel_keep", np.ones(9, np.uint8)), "must have 2 dimension"),
        (lambda a: a.__setitem__("conv.pixel_keep", np.ones((3, 3), np.float32)), "pixel mask must be 0/1"),
    ],
)
def test_bad_v2_layers_rejected_with_one_line(tmp_path, edit, message):
    lm = _pattern_layer(np.ones((3, 3), bool))
    arrays = _v2_arrays(lm)
    arrays["conv.kind"] = np.array("pattern")
    arrays["conv.pattern_library"] = lm.pattern.library.astype(np.uint8)
    arrays["conv.pattern_ids"] = lm.pattern.ids
    arrays["conv.pixel_keep"] = lm.pixel_keep.astype(np.uint8)
    assert load_masks(write_npz(tmp_path / "ok.npz", arrays))["conv"].kind == "pattern"
    edit(arrays)
    with pytest.raises(MaskError, match=message) as err:
        load_masks(write_npz(tmp_path / "bad.npz", arrays))
    assert "\n" not in str(err.value) and "bad.npz" in str(err.value)


def test_old_schemes_sidecar_gets_a_hint(tmp_path):
    p = write_npz(tmp_path / "s.npz", {"format": np.array("ubpdsl.schemes/1"), "c.pixel_keep": np.ones((2, 2))})
    with pytest.raises(MaskError, match="schemes.npz sidecar of an earlier ubpdsl"):
        load_masks(p)
