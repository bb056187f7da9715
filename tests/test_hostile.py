"""Regression tests for hostile or faulty inputs (issue 10, classes 3 bundle side, 4, 5 files, 6).

Each test builds the bad input the way an attacker or an unlucky user would, runs the real CLI,
C program or library call, and checks the outcome: a one-line error with a non-zero exit, or a
correct result (checked against numpy) -- never a traceback, a signal or a silent acceptance.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fuzz_support import deflate_bomb, set_zip_flag

from ubpdsl.compiler import random_problem
from ubpdsl.errors import MaskError, UbpError
from ubpdsl.export import BundleError, build_bundle_main, export_bundle, load_bundle
from ubpdsl.masks import LayerMask, save_masks

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def cli(*args: str, cwd: Path | None = None, timeout: float = 300, env: dict | None = None
        ) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ubpdsl.cli", *args], capture_output=True, text=True,
                          check=False, cwd=cwd, timeout=timeout, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str = "") -> None:
    """Exit 1, exactly one ``error:`` line on stderr, no traceback."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert re.search(pattern, errors[0]), errors[0]


def layer(name: str, M: int = 12, K: int = 9, N: int = 4, seed: int = 0) -> LayerMask:
    p = random_problem(M, K, N, 0.5, seed=seed)
    return LayerMask(name, (M, K), N, p.rows.astype(np.int32), p.cols.astype(np.int32), p.weight)


def qemu_ready() -> bool:
    from ubpdsl.runtime import qemu

    return qemu.qemu_available() and qemu.aarch64_sysroot() is not None


# ------------------------------------------------------------------------------- class 4: names


@pytest.mark.parametrize("bad", ["a\nb", "a\tb", "x/y", "nul\0", "cr\r", "", "#comment", "x" * 201])
def test_layer_names_with_control_characters_or_slashes_are_refused(bad):
    with pytest.raises(MaskError):
        LayerMask(bad, (8, 4), 4, [0], [0])


def test_colliding_layer_names_are_refused_by_compile_and_tune(tmp_path):
    save_masks(tmp_path / "m.npz", [layer("a.b"), layer("a_b", seed=1)])
    for cmd in (["compile"], ["tune", "--trials", "1", "--no-progress"]):
        proc = cli(*cmd, "--mask", str(tmp_path / "m.npz"), "-o", str(tmp_path / "out"))
        assert_one_line_error(proc, "'a.b' and 'a_b' map to the same file name")
    with pytest.raises(MaskError, match="same file name"):
        export_bundle(tmp_path / "m.npz", tmp_path / "bundle")
    assert not (tmp_path / "out").exists() and not (tmp_path / "bundle").exists()


def test_non_ascii_layer_name_compiles_and_tunes_end_to_end(tmp_path):
    """A non-ASCII name maps to one ASCII file stem everywhere (compile, tune's delivery, the symbol)."""
    from ubpdsl.runtime.loader import HostKernel

    lm = layer("schicht.ä")
    save_masks(tmp_path / "m.npz", [lm])
    proc = cli("compile", "--mask", str(tmp_path / "m.npz"), "-o", str(tmp_path / "build"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "build" / "host" / "schicht__.host.so").is_file()
    proc = cli("tune", "--mask", str(tmp_path / "m.npz"), "--trials", "2", "-j", "0", "--no-progress", "--no-dense",
               "--pixels", "8", "-o", str(tmp_path / "tuned"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "tuned" / "manifest.json").read_text())
    files = manifest["layers"]["schicht.ä"]["files"]
    assert files["so"] == "schicht__.host.so"
    x = np.random.default_rng(0).standard_normal((lm.C, 8)).astype(np.float32)
    blob = np.fromfile(tmp_path / "tuned" / files["packed"], np.uint8) if "packed" in files else None
    y = HostKernel(tmp_path / "tuned" / files["so"], "ubp_schicht__", lm.R, lm.C)(x, blob)
    np.testing.assert_allclose(y, lm.weight @ x, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ class 3/4: the bundle readers


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    masks = {n: layer(n, M, K, seed=i) for i, (n, M, K) in enumerate([("conv.0", 12, 9), ("fc", 10, 16)])}
    bundle = export_bundle(masks, root / "bundle", targets=["host", "aarch64-neon"])
    exe = build_bundle_main("host", root / "bundle_main")
    return bundle, masks, exe


@pytest.fixture
def bundle_copy(small_bundle, tmp_path):
    bundle, masks, exe = small_bundle
    dst = tmp_path / "bundle"
    shutil.copytree(bundle, dst, symlinks=True)
    return dst, masks, exe


def _run_c(exe: Path, bundle: Path, layer_name: str, target: str = "host") -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), str(bundle), target, layer_name], capture_output=True, text=True, timeout=60,
                          check=False)


def _expected(lm: LayerMask, n: int = 5) -> np.ndarray:
    k, j = np.meshgrid(np.arange(lm.C), np.arange(n), indexing="ij")
    return lm.weight @ (((k * 7 + j * 3) % 11 - 5) / 4.0).astype(np.float32)


def _index_rows(path: Path) -> list[list[str]]:
    return [ln.split("\t") for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    path.write_text("# edited\n" + "".join("\t".join(r) + "\n" for r in rows))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_c_reader_runs_a_good_bundle(small_bundle):
    bundle, masks, exe = small_bundle
    for name, lm in masks.items():
        proc = _run_c(exe, bundle, name)
        assert proc.returncode == 0, proc.stderr
        y = np.array(proc.stdout.split(), np.float32).reshape(lm.R, 5)
        np.testing.assert_allclose(y, _expected(lm), rtol=1e-5, atol=1e-5)


def test_injected_tsv_row_pointing_outside_is_refused(bundle_copy, tmp_path):
    root, _, exe = bundle_copy
    evil = tmp_path / "evil.so"
    shutil.copy(root / "host" / "fc.host.so", evil)
    index = root / "host" / "kernels.tsv"
    rows = _index_rows(index)
    # what a layer name "x\tubp_fc\t...\n" would have produced, and a plain row with a path
    rows.append(["evil", "ubp_fc", "10", "16", "4", "../../evil.so", "-", _sha(evil), "-"])
    _write_rows(index, rows)
    proc = _run_c(exe, root, "evil")
    assert proc.returncode == 3 and "malformed row" in proc.stderr, proc.stderr
    with pytest.raises(BundleError):
        load_bundle(root)


@pytest.mark.parametrize("what", ["so", "packed"])
def test_symlinked_file_is_refused_by_both_readers(bundle_copy, tmp_path, what):
    root, _, exe = bundle_copy
    name = "fc.host.so" if what == "so" else "fc.packed.bin"
    outside = tmp_path / name
    shutil.move(root / "host" / name, outside)
    os.symlink(outside, root / "host" / name)
    proc = _run_c(exe, root, "fc")
    assert proc.returncode == 3 and "symbolic link" in proc.stderr, proc.stderr
    with pytest.raises(BundleError, match="symbolic link"):
        load_bundle(root)


def test_truncated_or_corrupt_blob_is_refused_by_the_c_reader(bundle_copy):
    """Blob damaged and its sha256 updated in the index: the C reader's validator still refuses it."""
    root, masks, exe = bundle_copy
    blob_path = root / "host" / "fc.packed.bin"
    good = blob_path.read_bytes()
    header = np.frombuffer(good[:48], "<i4")
    damages = {
        "truncated": good[: len(good) // 2],
        "short header": good[:20],
        "column past K": None,
        "row_ptr decreasing": None,
        "offset outside": None,
    }
    cols = bytearray(good)
    np.frombuffer(cols, "<i4", count=1, offset=int(header[9]))[...] = 10_000
    damages["column past K"] = bytes(cols)
    rp = bytearray(good)
    np.frombuffer(rp, "<i4", count=1, offset=int(header[7]) + 4)[...] = 1 << 30
    damages["row_ptr decreasing"] = bytes(rp)
    off = bytearray(good)
    np.frombuffer(off, "<i4", count=1, offset=4 * 10)[...] = 1 << 28
    damages["offset outside"] = bytes(off)
    index = root / "host" / "kernels.tsv"
    rows = _index_rows(index)
    for what, data in damages.items():
        blob_path.write_bytes(data)
        for r in rows:
            if r[0] == "fc":
                r[8] = _sha(blob_path)
        _write_rows(index, rows)
        proc = _run_c(exe, root, "fc")
        assert proc.returncode == 3, (what, proc.returncode, proc.stderr)
        assert proc.stderr.strip() and "fc.packed.bin" in proc.stderr, (what, proc.stderr)


def test_c_reader_checks_sha256(bundle_copy):
    root, _, exe = bundle_copy
    so = root / "host" / "conv_0.host.so"
    data = bytearray(so.read_bytes())
    data[-1] ^= 0xFF
    so.write_bytes(bytes(data))
    proc = _run_c(exe, root, "conv.0")
    assert proc.returncode == 3 and "sha256" in proc.stderr, proc.stderr


@pytest.mark.parametrize("edit", ["drop field", "extra field", "M not a number", "N zero", "absolute so"])
def test_c_reader_rejects_malformed_rows(bundle_copy, edit):
    root, _, exe = bundle_copy
    index = root / "host" / "kernels.tsv"
    rows = _index_rows(index)
    r = rows[0]
    if edit == "drop field":
        del r[6]
    elif edit == "extra field":
        r.append("x")
    elif edit == "M not a number":
        r[2] = "12abc"
    elif edit == "N zero":
        r[4] = "0"
    else:
        r[5] = "/usr/lib/x86_64-linux-gnu/libc.so.6"
    _write_rows(index, rows)
    proc = _run_c(exe, root, r[0])
    assert proc.returncode == 3 and "malformed row" in proc.stderr, proc.stderr


def test_manifest_missing_keys_or_nested_deeply_are_one_line_errors(bundle_copy):
    root, _, _ = bundle_copy
    m = json.loads((root / "manifest.json").read_text())
    del m["layers"]["fc"]["targets"]["host"]["kernel"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="'kernel' entry needs features and triple"):
        load_bundle(root)
    del m["targets"]["host"]["features"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="malformed target 'host'"):
        load_bundle(root)
    (root / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="nested deeper"):
        load_bundle(root)


def _readme_blocks() -> list[str]:
    text = (ROOT / "examples" / "embed_c" / "README.md").read_text()
    return [b for b in re.findall(r"```sh\n(.*?)```", text, re.S) if "ubpdsl compile" in b]  # not the prune


def _run_readme_script(tmp_path: Path, script: str) -> tuple[LayerMask, subprocess.CompletedProcess]:
    """Run ``script`` (bash -e) from a directory laid out like the repository root, masks.npz with conv1."""
    lm = layer("conv1", 16, 12)
    save_masks(tmp_path / "masks.npz", [lm])
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return lm, subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300, check=False)


@pytest.mark.parametrize("which", ["host", "aarch64"])
def test_embed_c_readme_commands_run_as_written(tmp_path, which):
    """The README's sh blocks, extracted verbatim, build and run main.c; y matches numpy."""
    blocks = _readme_blocks()
    assert len(blocks) == 2
    script = blocks[0] if which == "host" else blocks[1]
    if which == "aarch64" and not qemu_ready():
        pytest.skip("needs qemu-user and libc6-arm64-cross")
    lm, proc = _run_readme_script(tmp_path, script)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if re.match(r"-?[\d.]", ln)]  # y, not compile's report
    y = np.array(" ".join(lines).split(), np.float32).reshape(lm.R, 5)
    np.testing.assert_allclose(y, _expected(lm), rtol=1e-5, atol=1e-5)


def test_embed_c_example_without_its_blob_does_not_crash(tmp_path):
    """main.c refuses to call a data-driven kernel without its packed weights (exit 1, no signal)."""
    script = _readme_blocks()[0].replace("./embed conv1.packed.bin 5", "./embed")
    _, proc = _run_readme_script(tmp_path, script)
    assert proc.returncode == 1 and "packed" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


# ------------------------------------------------------------------ class 5: bombs, hangs, limits


def forge_masks(path: Path, arrays: dict[str, np.ndarray], *, compress: bool = True) -> Path:
    """A masks.npz written with plain numpy (no validation): whatever the arrays say."""
    (np.savez_compressed if compress else np.savez)(path, format=np.array("ubpdsl.masks/1"), **arrays)
    return path


def test_deflate_bomb_is_refused_before_allocating(tmp_path):
    bomb = deflate_bomb(tmp_path / "bomb.npz")
    assert bomb.stat().st_size < 1 << 20
    for cmd in (["inspect", str(bomb)], ["compile", "--mask", str(bomb), "-o", str(tmp_path / "o")]):
        proc = cli(*cmd, timeout=60)
        assert_one_line_error(proc, "deflate bomb")


def test_declared_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "m.npz"
    save_masks(path, [layer("big", 64, 64)])
    proc = cli("inspect", str(path), env={**os.environ, "UBPDSL_MAX_MASK_BYTES": "1000"})
    assert_one_line_error(proc, "declares more than 1000 bytes")
    assert cli("inspect", str(path)).returncode == 0


def test_encrypted_member_is_one_line_error(tmp_path):
    path = tmp_path / "m.npz"
    save_masks(path, [layer("fc")])
    set_zip_flag(path, 0x1)
    assert_one_line_error(cli("inspect", str(path)), "encrypted")


@pytest.mark.parametrize("N", [10**9, 3, 65])
def test_block_taller_than_the_layer_is_refused_at_load(tmp_path, N):
    """N = 10**9 on a 2x8 layer hung inspect and compile; N > rows or N > 64 is now refused at load."""
    M = 2 if N != 65 else 80
    path = forge_masks(tmp_path / "m.npz", {"L.shape": np.array([M, 8]), "L.block": np.array([N, 1]),
                                            "L.rows": np.zeros(0, np.int32), "L.cols": np.zeros(0, np.int32)})
    for cmd in (["inspect", str(path)], ["compile", "--mask", str(path), "-o", str(tmp_path / "o")]):
        assert_one_line_error(cli(*cmd, timeout=60), "block must be \\[N, 1\\] with N >= 1 and N <= ")


def test_inspect_of_a_huge_empty_layer_needs_no_r_by_c_memory(tmp_path):
    """A 200-byte file may declare a 2**16 x (2**15 - 1) layer with no blocks: inspect answers under 2 GiB of memory."""
    from fuzz_support import run

    R, C = 2**16, 2**15 - 1
    path = forge_masks(tmp_path / "m.npz", {"L.shape": np.array([R, C]), "L.block": np.array([4, 1]),
                                            "L.rows": np.zeros(0, np.int32), "L.cols": np.zeros(0, np.int32)})
    r = run([sys.executable, "-m", "ubpdsl.cli", "inspect", str(path)], timeout=120)
    assert r.returncode == 0, r.stderr
    row = next(ln.split() for ln in r.stdout.splitlines() if ln.startswith("L "))
    assert row[4] == "0" and row[7] == str(R)  # blocks, empty_rows
    r = run([sys.executable, "-m", "ubpdsl.cli", "inspect", str(path), "--plot", str(tmp_path / "p.png")], timeout=120)
    assert r.returncode == 1 and "too many to draw" in r.stderr, r.stderr
    r = run([sys.executable, "-m", "ubpdsl.cli", "tune", "--mask", str(path), "--synthetic-weights", "--no-progress",
             "--pixels", "16", "-o", str(tmp_path / "o")], timeout=120)
    assert r.returncode == 1 and "more than tune handles" in r.stderr, r.stderr


def test_pixel_map_values_are_bounded(tmp_path):
    path = tmp_path / "m.npz"
    save_masks(path, [layer("fc")])
    pm = tmp_path / "pixels.json"
    for content, pattern in ((json.dumps({"fc": 10**11}), "integers in 1..16777216"),
                             ("[" * 50_000 + "]" * 50_000, "nested deeper"),
                             (json.dumps({"fc": 1.5}), "integers in"),
                             ("\xff\xfe", "not readable JSON")):
        pm.write_text(content, encoding="latin-1")
        proc = cli("tune", "--mask", str(path), "--pixels-map", str(pm), "--no-progress", "-o", str(tmp_path / "o"))
        assert_one_line_error(proc, pattern)
    assert_one_line_error(cli("tune", "--mask", str(path), "--pixels", str(10**11), "-o", str(tmp_path / "o")),
                          "--pixels must be in")


# ------------------------------------------------------------------------- class 6: tracebacks


def test_output_under_a_regular_file_is_one_line_error(tmp_path):
    path = tmp_path / "m.npz"
    save_masks(path, [layer("fc")])
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    under = str(blocker / "sub")
    for cmd in (["compile", "--mask", str(path), "-o", under],
                ["tune", "--mask", str(path), "--pixels", "16", "--trials", "1", "--no-progress", "-o", under],
                ["export", "--mask", str(path), "-o", under],
                ["prune", "--model", "digits-cnn", "--sparsity", "0.5", "-o", str(blocker / "m.npz")]):
        assert_one_line_error(cli(*cmd), "is a file, not a directory|exists and is not a directory")
    assert blocker.read_text() == "I am a file"


def test_sparse_linear_on_a_0d_tensor_is_one_line_error(small_bundle):
    import torch
    from torch import nn

    from ubpdsl.torch_ops import swap_to_kernels

    bundle, masks, _ = small_bundle
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 10, bias=False))
    with torch.no_grad():
        model.fc.weight.copy_(torch.from_numpy(masks["fc"].weight))
    swap_to_kernels(model, bundle, layers=["fc"])
    with pytest.raises(UbpError, match="expected input"):
        model(torch.tensor(1.0))
    x = torch.randn(3, 16)
    torch.testing.assert_close(model(x), x @ torch.from_numpy(masks["fc"].weight).t(), rtol=1e-5, atol=1e-5)


def _children(pid: int) -> set[int]:
    out = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(d.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    """A process's command line, or '' once it has exited (it may between listing and reading)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def test_kill_9_of_tune_leaves_no_compile_worker(tmp_path):
    path = tmp_path / "m.npz"
    save_masks(path, [layer("big", 96, 64)])
    env = {**os.environ, "UBPDSL_CACHE_DIR": str(tmp_path / "cache")}  # cold cache: real compiles
    proc = subprocess.Popen([sys.executable, "-m", "ubpdsl.cli", "tune", "--mask", str(path), "--trials", "40",
                             "--pixels", "196", "-j", "2", "--no-progress", "-o", str(tmp_path / "o")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
            time.sleep(0.2)
            workers |= {c for c in _children(proc.pid) if "multiprocessing" in _cmdline(c)}
        assert len(workers) >= 1, "tune started no compile worker"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them running if the test fails
        os.kill(w, signal.SIGKILL)
    assert not left, f"compile workers {left} outlived the killed tune"


def test_two_tunes_on_one_study_both_succeed_and_keep_every_trial(tmp_path):
    import optuna

    path = tmp_path / "m.npz"
    lm = layer("fc", 48, 40)
    save_masks(path, [lm])
    env = {**os.environ, "UBPDSL_CACHE_DIR": str(tmp_path / "cache")}
    argv = [sys.executable, "-m", "ubpdsl.cli", "tune", "--mask", str(path), "--trials", "6", "-j", "1",
            "--no-progress", "--no-dense", "--pixels", "16"]
    procs = [subprocess.Popen([*argv, "-o", str(tmp_path / f"o{i}")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    # they really met on one study: one of them waited for the other (the per-study lock)
    assert any("another tune is working on study" in err for _, err in outs), [e[-500:] for _, e in outs]
    storage = f"sqlite:///{tmp_path / 'cache' / 'autotune' / 'studies.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 6 and not [t for t in trials if t.state == optuna.trial.TrialState.RUNNING]
    for i in range(2):  # both outputs hold a correct kernel
        from ubpdsl.runtime.loader import HostKernel

        files = json.loads((tmp_path / f"o{i}" / "manifest.json").read_text())["layers"]["fc"]["files"]
        blob = np.fromfile(tmp_path / f"o{i}" / files["packed"], np.uint8) if "packed" in files else None
        x = np.random.default_rng(i).standard_normal((lm.C, 7)).astype(np.float32)
        y = HostKernel(tmp_path / f"o{i}" / files["so"], "ubp_fc", lm.R, lm.C)(x, blob)
        np.testing.assert_allclose(y, lm.weight @ x, rtol=1e-5, atol=1e-5)


def test_exclusive_lock_makes_a_second_process_wait(tmp_path):
    """guard.exclusive_lock: a second holder is told it waits and gets the lock only after the first."""
    from ubpdsl.guard import exclusive_lock

    lock = tmp_path / "locks" / "study.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom ubpdsl.guard import exclusive_lock\n"
                               f"with exclusive_lock({str(lock)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(2)\n"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited: list[float] = []
    start = time.monotonic()
    with exclusive_lock(lock, on_wait=lambda: waited.append(time.monotonic())):
        got = time.monotonic()
    holder.wait(timeout=30)
    assert waited and got - start > 0.5 and holder.returncode == 0
