"""Bundles: export, reload, tuned configs, the C program under qemu, and bad bundles refused up front."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn import functional as F

from ubpdsl.errors import MaskError, UbpError
from ubpdsl.export import (
    BUNDLE_FORMAT,
    BundleError,
    KernelConfig,
    configs_for,
    export,
    export_bundle,
    load_bundle,
    load_tuned_configs,
    run_bundle_main,
)
from ubpdsl.masks import save_masks
from ubpdsl.prune.sparsifier import UnalignedBlockSparsifier
from ubpdsl.torch_ops import swap_to_kernels


def pruned_model(seed: int = 0) -> tuple[nn.Module, dict]:
    """conv 3x3 (stride 2, bias) -> 1x1 conv -> Linear, pruned one-shot to 75 % with BED, N = 4."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(16, 24, 1, bias=False),
                          nn.ReLU(), nn.Flatten(), nn.Linear(24 * 4 * 4, 10)).eval()
    sp = UnalignedBlockSparsifier(0.75, block=4)
    sp.prepare(model, config=None)
    sp.step()
    sp.squash_mask()
    return model, sp.to_layer_masks()


def _qemu_ready() -> bool:
    from ubpdsl.runtime import qemu

    return qemu.qemu_available() and qemu.aarch64_sysroot() is not None


@pytest.fixture(scope="module")
def model_masks():
    return pruned_model()


@pytest.fixture(scope="module")
def bundle(model_masks, tmp_path_factory):
    model, masks = model_masks
    return export_bundle(masks, tmp_path_factory.mktemp("b") / "bundle",
                         targets=["host", "aarch64-neon", "aarch64-sve"], model=model)


@pytest.fixture
def copy_of(bundle, tmp_path):
    def make():
        dst = tmp_path / "copy"
        shutil.copytree(bundle, dst)
        return dst
    return make


def _rewrite_manifest(root, edit):
    m = json.loads((root / "manifest.json").read_text())
    edit(m)
    (root / "manifest.json").write_text(json.dumps(m))


def test_bundle_layout_and_manifest(bundle, model_masks):
    _, masks = model_masks
    b = load_bundle(bundle)
    m = b.manifest
    assert m["format"] == BUNDLE_FORMAT
    assert set(m["targets"]) == {"host", "aarch64-neon", "aarch64-sve"}
    assert {"llvm", "zig"} <= set(m["toolchain"])
    assert m["variants"] == ["wros"]
    assert b.layers == list(masks)
    for name, entry in m["layers"].items():
        assert entry["mask_sha256"] == masks[name].content_hash()
        assert entry["module"]["type"] in ("Conv2d", "Linear")
        for t, te in entry["targets"].items():
            so = bundle / te["files"]["so"]
            assert so.name == f"{name}.{t}.so" and so.parent.name == t
            assert (bundle / te["files"]["packed"]).is_file() and (bundle / te["files"]["header"]).is_file()
            assert te["config_source"] == "default"
    index = (bundle / "aarch64-neon" / "kernels.tsv").read_text().splitlines()
    te = m["layers"]["0"]["targets"]["aarch64-neon"]
    assert index[1].split("\t") == ["0", "ubp_0", "16", "27", "4", "0.aarch64-neon.so", "0.packed.bin",
                                     te["sha256"]["so"], te["sha256"]["packed"]]
    assert (bundle / "masks.npz").is_file()


def test_bundle_loads_again_and_runs_layers(bundle, model_masks):
    model, masks = model_masks
    b = load_bundle(str(bundle))
    fast = swap_to_kernels(copy.deepcopy(model), b)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_tuned_configs_are_used(tmp_path, model_masks):
    model, masks = model_masks
    tuned_dir = tmp_path / "tuned"
    tuned_dir.mkdir()
    layers = {
        "0": {"M": 16, "K": 27, "N": 4, "tuned_config": {"variant": "wros", "constants": {"TILE": 2, "UNROLL": 2},
                                                          "specialize": False, "vector_bits": None}},
        "2": {"M": 24, "K": 16, "N": 4, "tuned_config": {"variant": "wros_unrolled", "constants": {"TILE": 1},
                                                          "specialize": True, "vector_bits": None}},
    }
    (tuned_dir / "manifest.json").write_text(json.dumps({"format": "ubpdsl.tuned/1", "target": "host",
                                                         "layers": layers}))
    target, cfgs = load_tuned_configs(tuned_dir)
    assert target == "host" and cfgs["2"].specialize and cfgs["0"].constants == {"TILE": 2, "UNROLL": 2}
    chosen = configs_for(masks, "host", cfgs)
    assert chosen["5"] == KernelConfig()  # not tuned: the default
    out = export_bundle(masks, tmp_path / "bundle", tuned={"host": cfgs}, model=model)
    entry = load_bundle(out).manifest["layers"]
    assert entry["0"]["targets"]["host"]["constants"]["TILE"] == 2
    assert entry["2"]["targets"]["host"]["specialized"] and "packed" not in entry["2"]["targets"]["host"]["files"]
    assert "\t-\n" in (out / "host" / "kernels.tsv").read_text()  # baked: no packed weights
    assert entry["5"]["targets"]["host"]["config_source"] == "default"
    fast = swap_to_kernels(copy.deepcopy(model), out)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_stale_or_foreign_tuned_configs_are_refused(tmp_path, model_masks):
    _, masks = model_masks
    with pytest.raises(UbpError, match="layer 0: tuned for M,K,N = 16,28,4"):
        configs_for(masks, "host", {"0": KernelConfig(tuned_for=(16, 28, 4))})
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "ubpdsl.build/1", "layers": {}}))
    with pytest.raises(UbpError, match="is not 'ubpdsl.tuned/1'"):
        load_tuned_configs(tmp_path)
    with pytest.raises(UbpError, match="no such file"):
        load_tuned_configs(tmp_path / "nowhere")


@pytest.mark.parametrize("target", ["aarch64-neon", "aarch64-sve"])
def test_c_program_runs_bundle_layer_under_qemu(bundle, model_masks, target):
    """examples/embed_c/bundle_main.c dlopens the bundle's AArch64 .so; its y matches torch's conv."""
    if not _qemu_ready():
        pytest.skip("needs Debian's qemu-user and libc6-arm64-cross (make test installs both)")
    model, _ = model_masks
    img = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    cols = F.unfold(img, 3, padding=1, stride=2)[0]  # the conv's im2col input, [27, 16]
    with torch.no_grad():
        want = model[0](img)[0] - model[0].bias.view(-1, 1, 1)  # the kernel computes W @ x, no bias
    y = run_bundle_main(bundle, target, "0", cols.numpy())
    np.testing.assert_allclose(y, want.reshape(16, -1).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", ["host", "aarch64-neon"])
def test_c_program_runs_the_fused_epilogue(bundle, model_masks, target):
    """bundle_main's BIAS_FILE RES_FILE LO HI mode calls <symbol>_ep: y = clamp(W x + bias + res, lo, hi)."""
    if target != "host" and not _qemu_ready():
        pytest.skip("needs Debian's qemu-user and libc6-arm64-cross (make test installs both)")
    _, masks = model_masks
    w = masks["2"].weight.reshape(24, 16).astype(np.float64)  # the pruned 1x1 conv's weights
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 10)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    res = rng.standard_normal((24, 10)).astype(np.float32)
    want = np.clip(w @ x + bias[:, None] + res, 0.0, 6.0)
    np.testing.assert_allclose(run_bundle_main(bundle, target, "2", x, bias=bias, residual=res, lo=0.0, hi=6.0),
                               want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_bundle_main(bundle, target, "2", x, bias=bias), w @ x + bias[:, None],
                               rtol=1e-4, atol=1e-5)  # no residual, no clamp
    np.testing.assert_allclose(run_bundle_main(bundle, target, "2", x), w @ x, rtol=1e-4, atol=1e-5)  # plain


def test_c_program_rejects_unknown_layer(bundle, tmp_path):
    if not _qemu_ready():
        pytest.skip("needs Debian's qemu-user and libc6-arm64-cross")
    from ubpdsl.export import build_bundle_main
    from ubpdsl.runtime import qemu

    exe = build_bundle_main("aarch64-neon", tmp_path / "bundle_main")
    res = subprocess.run([qemu.qemu_binary(), *qemu.qemu_cpu_args(None), "-L", str(qemu.aarch64_sysroot()), str(exe),
                          str(bundle), "aarch64-neon", "nope"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "layer nope is not in" in res.stderr


# ------------------------------------------------------------------------------------- bad bundles


def test_tampered_file_is_refused(copy_of):
    root = copy_of()
    (root / "host" / "2.packed.bin").write_bytes((root / "host" / "2.packed.bin").read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(BundleError, match=r"host/2.packed.bin does not match the manifest \(sha256 differs\)"):
        load_bundle(root)


def test_missing_file_is_refused(copy_of):
    root = copy_of()
    (root / "aarch64-sve" / "5.aarch64-sve.so").unlink()
    with pytest.raises(BundleError, match="aarch64-sve/5.aarch64-sve.so is listed in the manifest but missing"):
        load_bundle(root)


def test_so_for_another_target_is_refused(copy_of):
    """An AArch64 .so under the host name (and a manifest made to agree): caught by its ELF machine."""
    root = copy_of()
    from ubpdsl.identity import file_sha256 as _sha256

    shutil.copyfile(root / "aarch64-neon" / "2.aarch64-neon.so", root / "host" / "2.host.so")
    _rewrite_manifest(root, lambda m: m["layers"]["2"]["targets"]["host"]["sha256"].update(
        so=_sha256(root / "host" / "2.host.so")))
    with pytest.raises(BundleError, match=r"host/2.host.so is aarch64 code.*host \(x86_64\) kernel"):
        load_bundle(root)


def test_packed_weights_of_another_layer_are_refused(copy_of):
    root = copy_of()
    from ubpdsl.identity import file_sha256 as _sha256

    shutil.copyfile(root / "host" / "0.packed.bin", root / "host" / "2.packed.bin")
    _rewrite_manifest(root, lambda m: m["layers"]["2"]["targets"]["host"]["sha256"].update(
        packed=_sha256(root / "host" / "2.packed.bin")))
    with pytest.raises(BundleError, match="2.packed.bin: M is 16, expected 24"):
        load_bundle(root)


def test_missing_layer_is_refused(copy_of, bundle, model_masks):
    b = load_bundle(bundle)
    with pytest.raises(BundleError, match="has no layer 'conv9'"):
        b.kernel("conv9")
    root = copy_of()
    _rewrite_manifest(root, lambda m: m["layers"]["2"]["targets"].pop("aarch64-neon"))
    with pytest.raises(BundleError, match="layer '2' has no kernel for aarch64-neon"):
        load_bundle(root)
    root2 = root.with_name("copy2")
    shutil.copytree(bundle, root2)
    _rewrite_manifest(root2, lambda m: m["layers"].pop("5"))
    with pytest.raises(BundleError, match="masks.npz and manifest.json list different layers"):
        load_bundle(root2)


def test_manifest_problems_are_one_line_errors(copy_of, tmp_path):
    root = copy_of()
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json is not readable JSON"):
        load_bundle(root)
    (root / "manifest.json").write_text(json.dumps({"format": "ubpdsl.build/1"}))
    with pytest.raises(BundleError, match=r"older `ubpdsl compile` output \(ubpdsl.build/1\): re-run `ubpdsl compile`"):
        load_bundle(root)
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(tmp_path / "nothing")


def test_escaping_paths_are_refused(copy_of):
    root = copy_of()
    _rewrite_manifest(root, lambda m: m["layers"]["0"]["targets"]["host"]["files"].update(so="../../etc/passwd"))
    with pytest.raises(BundleError, match="not a relative path inside the bundle"):
        load_bundle(root)


def test_host_kernels_for_a_richer_cpu_are_refused(copy_of):
    root = copy_of()
    _rewrite_manifest(root, lambda m: m["targets"]["host"].update(
        features=m["targets"]["host"]["features"] + ",+amx-tile", cpu="sapphirerapids"))
    b = load_bundle(root)  # the files are fine ...
    with pytest.raises(BundleError, match="need amx-tile, which this CPU lacks"):
        b.check_runs_here("host")  # ... but they must not run here
    with pytest.raises(BundleError, match="aarch64 code; this machine is x86_64"):
        b.check_runs_here("aarch64-neon")


def test_export_checks_inputs_before_compiling(tmp_path, model_masks):
    model, masks = model_masks
    no_w = {n: copy.copy(m) for n, m in masks.items()}
    no_w["2"].weight = None
    with pytest.raises(MaskError, match="layer 2: masks.npz has no weights"):
        export_bundle(no_w, tmp_path / "a")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[2].weight.mul_(2)
    with pytest.raises(BundleError, match="layer 2: the model's weights differ from masks.npz"):
        export_bundle(masks, tmp_path / "b", model=other)
    with pytest.raises(UbpError, match="unknown target"):
        export_bundle(masks, tmp_path / "c", targets=["riscv"])
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="non-empty directory that is not a bundle"):
        export_bundle(masks, tmp_path / "d")
    assert (tmp_path / "d" / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_export_command(tmp_path, model_masks):
    _, masks = model_masks
    save_masks(tmp_path / "masks.npz", masks)
    runner = CliRunner()
    out = tmp_path / "bundle"
    res = runner.invoke(export, ["--mask", str(tmp_path / "masks.npz"), "--layer", "2", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote bundle" in res.output and load_bundle(out).layers == ["2"]
    # a rerun into the same bundle adds its layer (same masks, same targets)
    res = runner.invoke(export, ["--mask", str(tmp_path / "masks.npz"), "--layer", "5", "-o", str(out)])
    assert res.exit_code == 0 and load_bundle(out).layers == ["2", "5"]
    res = runner.invoke(export, ["--mask", str(tmp_path / "masks.npz"), "--layer", "zz", "-o", str(tmp_path / "x")])
    assert isinstance(res.exception, MaskError) and "has no layer 'zz'" in str(res.exception)
    assert "\n" not in str(res.exception)


def test_cli_prints_one_line_error(tmp_path, capsys):
    """Through `ubpdsl` itself when `export` is attached to the CLI (error: ..., exit 1, no traceback)."""
    from ubpdsl import cli

    if "export" not in cli.cli.commands:
        pytest.skip("export is not attached to the ubpdsl CLI yet")
    rc = cli.main(["export", "--mask", str(tmp_path / "missing.npz"), "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_demo_quick_run(tmp_path, capsys):
    """`make demo`'s pipeline end to end on a short schedule, without tuning."""
    from ubpdsl.demo import run_demo

    res = run_demo(tmp_path / "demo", dense_epochs=2, updates=1, epochs_per_update=1, finetune_epochs=1, tune=False)
    out = capsys.readouterr().out
    assert res["parity"] and res["agree"] == 450
    assert res["accuracy"]["pruned, ubpdsl kernels"] == res["accuracy"]["pruned, dense torch (masked)"]
    assert "Summary" in out and "parity, kernels vs masked dense model: PASS" in out
    assert set(load_bundle(tmp_path / "demo" / "bundle").targets) == {"host", "aarch64-neon", "aarch64-sve"}
    if _qemu_ready():
        assert all("(ok)" in v for v in res["aarch64"].values()), res["aarch64"]


@pytest.mark.parametrize("sve_bits, chosen", [(None, "aarch64-neon"), (256, "aarch64-sve")])
def test_c_program_picks_sve_or_neon_from_the_cpu(bundle, model_masks, tmp_path, sve_bits, chosen):
    """TARGET aarch64: SVE kernels on a CPU with SVE, NEON kernels without (qemu -cpu models), same y."""
    if not _qemu_ready():
        pytest.skip("needs Debian's qemu-user and libc6-arm64-cross (make test installs both)")
    import subprocess

    from ubpdsl.export import build_bundle_main
    from ubpdsl.runtime import qemu

    model, _ = model_masks
    img = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    cols = F.unfold(img, 3, padding=1, stride=2)[0]
    with torch.no_grad():
        want = (model[0](img)[0] - model[0].bias.view(-1, 1, 1)).reshape(16, -1).numpy()
    np.testing.assert_allclose(run_bundle_main(bundle, "aarch64", "0", cols.numpy(), sve_bits=sve_bits), want,
                               rtol=1e-4, atol=1e-5)
    exe = build_bundle_main("aarch64", tmp_path / "bundle_main")
    run = [qemu.qemu_binary(), *qemu.qemu_cpu_args(sve_bits), "-L", str(qemu.aarch64_sysroot()), str(exe),
           str(bundle)]
    r = subprocess.run([*run, "aarch64", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and f"target {chosen}" in r.stderr, r.stderr
    if sve_bits is None:  # an explicit SVE request on a NEON-only CPU: a clear refusal, not SIGILL
        r = subprocess.run([*run, "aarch64-sve", "0"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 1 and "has no SVE" in r.stderr, (r.returncode, r.stderr)


def test_python_side_picks_neon_without_sve(bundle):
    b = load_bundle(bundle)
    assert b.pick_target("x86_64") == "host"
    assert b.pick_target("aarch64", {"fp", "asimd", "sve"}) == "aarch64-sve"
    assert b.pick_target("aarch64", {"fp", "asimd"}) == "aarch64-neon"
