"""Tests of ubpdsl.runtime: build, ELF checks, loading, cache, headers, qemu, the C example.

The DSL compiler is not needed: the kernels are small hand-written LLVM IR modules with the
exact kernel C ABI (a naive dense GEMM reading W from the packed blob or from a baked
constant, plus kernels that crash, hang, or return error codes).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ubpdsl.errors import BuildError, RunError, TargetError, UbpError
from ubpdsl.runtime.build import (
    build_shared_object,
    build_shared_object_cached,
    check_self_contained,
    compile_llvm_ir,
    emit_asm,
    link_shared,
    read_elf,
)
from ubpdsl.runtime.cache import CompileCache
from ubpdsl.runtime.header import render_header
from ubpdsl.runtime.loader import HostKernel
from ubpdsl.runtime.qemu import aarch64_sysroot, qemu_available, run_aarch64, run_qemu
from ubpdsl.runtime.targets import TARGET_NAMES, get_target, host_target
from ubpdsl.runtime.toolchain import lld_cmd, run_tool, tool, toolchain_versions, zig_cmd

ROOT = Path(__file__).resolve().parents[1]
M, K = 7, 13

PACKED_MAGIC = 0x44504255  # "UBPD" little endian
PACKED_VERSION = 1


def pack_dense(w: np.ndarray) -> np.ndarray:
    """Packed blob of the reference kernel: u32 magic, M, K, version, then float32 W[M, K]."""
    m, k = w.shape
    head = struct.pack("<4I", PACKED_MAGIC, m, k, PACKED_VERSION)
    return np.frombuffer(head + np.ascontiguousarray(w, dtype=np.float32).tobytes(), dtype=np.uint8).copy()


def _float_ir(v: float) -> str:
    """An fp32 value as an exact LLVM IR float literal (hex double)."""
    bits = struct.unpack("<Q", struct.pack("<d", float(np.float32(v))))[0]
    return f"0x{bits:016X}"


def dense_kernel_ir(symbol: str, M: int, K: int, baked: np.ndarray | None = None) -> str:
    """LLVM IR of ``int32_t symbol(x, y, n, packed_w)`` computing y = W @ x (dense, naive).

    With ``baked`` (float32 [M, K]) W is a constant global and packed_w is ignored (may be
    NULL); otherwise W is read from the packed blob after its 16-byte header, which is
    checked (rc 1 on mismatch). n < 0 returns 2.
    """
    lines = []
    if baked is not None:
        vals = ", ".join(f"float {_float_ir(v)}" for v in baked.reshape(-1))
        lines.append(f"@W = private unnamed_addr constant [{M * K} x float] [{vals}], align 64")
    lines.append(f"""
define i32 @{symbol}(ptr noalias readonly %x, ptr noalias %y, i64 %n, ptr noalias readonly %pw) #0 {{
entry:
  %badn = icmp slt i64 %n, 0
  br i1 %badn, label %err_n, label %check
err_n:
  ret i32 2
err_hdr:
  ret i32 1""")
    if baked is not None:
        lines.append("""check:
  br label %start""")
        wbase = "@W"
    else:
        lines.append(f"""check:
  %isnull = icmp eq ptr %pw, null
  br i1 %isnull, label %err_hdr, label %hdr
hdr:
  %magic = load i32, ptr %pw, align 4
  %pm = getelementptr i32, ptr %pw, i64 1
  %hm = load i32, ptr %pm, align 4
  %pk = getelementptr i32, ptr %pw, i64 2
  %hk = load i32, ptr %pk, align 4
  %pv = getelementptr i32, ptr %pw, i64 3
  %hv = load i32, ptr %pv, align 4
  %ok1 = icmp eq i32 %magic, {PACKED_MAGIC}
  %ok2 = icmp eq i32 %hm, {M}
  %ok3 = icmp eq i32 %hk, {K}
  %ok4 = icmp eq i32 %hv, {PACKED_VERSION}
  %a1 = and i1 %ok1, %ok2
  %a2 = and i1 %a1, %ok3
  %a3 = and i1 %a2, %ok4
  br i1 %a3, label %start, label %err_hdr""")
        wbase = "%wb"
    lines.append(f"""start:
{"  %wb = getelementptr i8, ptr %pw, i64 16" if baked is None else ""}
  br label %li
li:
  %i = phi i64 [ 0, %start ], [ %i1, %li_next ]
  %idone = icmp eq i64 %i, {M}
  br i1 %idone, label %exit, label %lj
lj:
  %j = phi i64 [ 0, %li ], [ %j1, %lj_next ]
  %jdone = icmp eq i64 %j, %n
  br i1 %jdone, label %li_next, label %lk
lk:
  %k = phi i64 [ 0, %lj ], [ %k1, %lk ]
  %acc = phi float [ 0.0, %lj ], [ %acc1, %lk ]
  %wi0 = mul i64 %i, {K}
  %wi = add i64 %wi0, %k
  %wp = getelementptr float, ptr {wbase}, i64 %wi
  %wv = load float, ptr %wp, align 4
  %xi0 = mul i64 %k, %n
  %xi = add i64 %xi0, %j
  %xp = getelementptr float, ptr %x, i64 %xi
  %xv = load float, ptr %xp, align 4
  %acc1 = call float @llvm.fmuladd.f32(float %wv, float %xv, float %acc)
  %k1 = add i64 %k, 1
  %kdone = icmp eq i64 %k1, {K}
  br i1 %kdone, label %lj_next, label %lk
lj_next:
  %yi0 = mul i64 %i, %n
  %yi = add i64 %yi0, %j
  %yp = getelementptr float, ptr %y, i64 %yi
  store float %acc1, ptr %yp, align 4
  %j1 = add i64 %j, 1
  br label %lj
li_next:
  %i1 = add i64 %i, 1
  br label %li
exit:
  ret i32 0
}}

declare float @llvm.fmuladd.f32(float, float, float)

attributes #0 = {{ nounwind }}
""")
    return "\n".join(lines)


def crash_kernel_ir(symbol: str) -> str:
    """A kernel with the right ABI that dereferences a bad pointer (SIGSEGV)."""
    return f"""
define i32 @{symbol}(ptr %x, ptr %y, i64 %n, ptr %pw) {{
  %bad = inttoptr i64 8 to ptr
  %v = load volatile float, ptr %bad, align 4
  store float %v, ptr %y, align 4
  ret i32 0
}}
"""


def hang_kernel_ir(symbol: str) -> str:
    """A kernel that never returns (volatile loads in an endless loop)."""
    return f"""
define i32 @{symbol}(ptr %x, ptr %y, i64 %n, ptr %pw) {{
entry:
  br label %loop
loop:
  %v = load volatile float, ptr %x, align 4
  br label %loop
}}
"""


def memset_kernel_ir(symbol: str, M: int) -> str:
    """y = 0 via the llvm.memset intrinsic, which lowers to a libc memset call."""
    return f"""
define i32 @{symbol}(ptr %x, ptr %y, i64 %n, ptr %pw) {{
  %cnt = mul i64 %n, {4 * M}
  call void @llvm.memset.p0.i64(ptr align 4 %y, i8 0, i64 %cnt, i1 false)
  ret i32 0
}}
declare void @llvm.memset.p0.i64(ptr, i8, i64, i1)
"""


def libm_kernel_ir(symbol: str) -> str:
    """A kernel calling sinf: a libc dependency the build must refuse."""
    return f"""
define i32 @{symbol}(ptr %x, ptr %y, i64 %n, ptr %pw) {{
  %v = load float, ptr %x, align 4
  %s = call float @sinf(float %v)
  store float %s, ptr %y, align 4
  ret i32 0
}}
declare float @sinf(float)
"""


needs_qemu = pytest.mark.skipif(not qemu_available(), reason="qemu-aarch64 missing: install Debian's qemu-user")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((M, K)).astype(np.float32)


@pytest.fixture(scope="module")
def xs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((K, 37)).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Keep the tests' compile cache (qemu harness builds) out of the user's ~/.cache."""
    old = os.environ.get("UBPDSL_CACHE_DIR")
    os.environ["UBPDSL_CACHE_DIR"] = str(tmp_path_factory.mktemp("ubpdsl-cache"))
    yield
    if old is None:
        del os.environ["UBPDSL_CACHE_DIR"]
    else:
        os.environ["UBPDSL_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def builds(tmp_path_factory, weights):
    """The packed reference kernel built for every target, and a baked one for the host."""
    out = tmp_path_factory.mktemp("builds")
    arts = {t: build_shared_object(dense_kernel_ir("ubp_ref", M, K), get_target(t), out, f"ref.{t}")
            for t in TARGET_NAMES}
    arts["host-baked"] = build_shared_object(
        dense_kernel_ir("ubp_refb", M, K, baked=weights), get_target("host"), out, "refb.host"
    )
    return arts


# --------------------------------------------------------------------------- targets, toolchain


def test_targets():
    assert get_target("aarch64-neon").vector_bits == 128
    sve = get_target("aarch64-sve")
    assert sve.scalable and sve.vector_bits == 128 and "+sve" in sve.features
    host = host_target()
    assert host.name == "host" and get_target("host") is host
    flags = Path("/proc/cpuinfo").read_text()
    expected = 512 if " avx512f" in flags else 256 if " avx2" in flags else 128
    assert host.vector_bits == expected
    assert host.cache_key()["triple"] == host.triple
    with pytest.raises(TargetError, match=r"unknown target 'riscv'; choose one of host, aarch64-neon, aarch64-sve"):
        get_target("riscv")


def test_toolchain():
    versions = toolchain_versions()
    assert versions["llvm"].startswith("22.")
    assert {"zig", "lld"} <= versions.keys()
    for name in ("llc", "opt", "FileCheck", "llvm-mca"):
        assert tool(name).is_file()
    with pytest.raises(BuildError, match="no-such-tool"):
        tool("no-such-tool")
    with pytest.raises(BuildError, match="expected value token|error"):
        compile_llvm_ir("define i32 @f() { ret i32 zork }", get_target("host"), Path("/nonexistent/x.o"))
    with pytest.raises(BuildError, match="exit code 3"):
        run_tool(["sh", "-c", "echo boom >&2; exit 3"])


# --------------------------------------------------------------------------- host build + ctypes


@pytest.mark.parametrize("n", [1, 16, 37])
def test_host_packed_kernel_matches_numpy(builds, weights, n):
    kernel = HostKernel(builds["host"].so, "ubp_ref", M, K)
    x = np.random.default_rng(n).standard_normal((K, n)).astype(np.float32)
    np.testing.assert_allclose(kernel(x, pack_dense(weights)), weights @ x, rtol=1e-5, atol=1e-5)


def test_host_baked_kernel_and_output_buffer(builds, weights, xs):
    kernel = HostKernel(builds["host-baked"].so, "ubp_refb", M, K)
    y = np.full((M, xs.shape[1]), np.nan, dtype=np.float32)
    out = kernel(xs, None, y)
    assert out is y
    np.testing.assert_allclose(y, weights @ xs, rtol=1e-5, atol=1e-5)
    assert kernel(xs[:, :0]).shape == (M, 0)


def test_host_kernel_error_code_raises(builds, weights, xs):
    kernel = HostKernel(builds["host"].so, "ubp_ref", M, K)
    with pytest.raises(RunError, match=r"kernel ubp_ref returned error code 1: packed weight blob header"):
        kernel(xs, pack_dense(weights[:, :5]))
    with pytest.raises(RunError, match="error code 1"):
        kernel(xs, None)  # this kernel needs its packed blob


def test_host_kernel_validates_arguments(builds, weights, xs):
    kernel = HostKernel(builds["host"].so, "ubp_ref", M, K)
    packed = pack_dense(weights)
    with pytest.raises(UbpError, match="float32"):
        kernel(xs.astype(np.float64), packed)
    with pytest.raises(UbpError, match=r"shape \[K=13, n\]"):
        kernel(xs[:5], packed)
    with pytest.raises(UbpError, match="C-contiguous"):
        kernel(np.asfortranarray(xs), packed)
    with pytest.raises(UbpError, match="uint8"):
        kernel(xs, packed.view(np.int8))
    with pytest.raises(UbpError, match=r"shape \[M=7, n=37\]"):
        kernel(xs, packed, np.empty((M, 3), np.float32))
    with pytest.raises(RunError, match="no symbol 'nope'"):
        HostKernel(builds["host"].so, "nope", M, K)


# --------------------------------------------------------------------------- ELF checks, linking


def test_shared_objects_are_self_contained(builds):
    for name, art in builds.items():
        info = read_elf(art.so)
        assert info.needed == [] and info.undefined == [], name
        assert info.machine == art.target.arch
        assert check_self_contained(art.so) == list(art.symbols)
    assert builds["host"].symbols == ("ubp_ref",)


def test_checker_flags_dt_needed_and_undefined(tmp_path):
    target = get_target("host")
    dummy_obj = compile_llvm_ir("define i32 @dummy() { ret i32 1 }", target, tmp_path / "dummy.o")
    dummy_so = link_shared([dummy_obj], tmp_path / "libdummy.so", soname="libdummy.so")
    ir = "declare i32 @dummy()\ndefine i32 @f() {\n  %r = call i32 @dummy()\n  ret i32 %r\n}\n"
    obj = compile_llvm_ir(ir, target, tmp_path / "f.o")
    with_needed = tmp_path / "with_needed.so"
    run_tool([*lld_cmd(), "-shared", "-o", with_needed, obj, dummy_so])
    with pytest.raises(BuildError, match=r"DT_NEEDED\): libdummy.so"):
        check_self_contained(with_needed)
    with_undef = tmp_path / "with_undef.so"
    run_tool([*lld_cmd(), "-shared", "-o", with_undef, obj])
    with pytest.raises(BuildError, match="undefined dynamic symbols: dummy"):
        check_self_contained(with_undef)
    with pytest.raises(BuildError, match="external functions dummy"):
        link_shared([obj], tmp_path / "refused.so")


def test_read_elf_rejects_garbage(tmp_path, builds):
    (tmp_path / "junk").write_bytes(b"not an elf at all" * 8)
    with pytest.raises(BuildError, match="not an ELF"):
        read_elf(tmp_path / "junk")
    (tmp_path / "cut.so").write_bytes(builds["host"].so.read_bytes()[:200])
    with pytest.raises(BuildError, match="malformed ELF"):
        check_self_contained(tmp_path / "cut.so")


def test_memset_intrinsic_gets_freestanding_shim(tmp_path, xs):
    art = build_shared_object(memset_kernel_ir("ubp_zero", M), get_target("host"), tmp_path, "zero")
    assert art.symbols == ("ubp_zero",)  # memset is linked in, hidden, not exported
    y = HostKernel(art.so, "ubp_zero", M, K)(xs)
    assert not y.any()
    with pytest.raises(BuildError, match="sinf"):
        build_shared_object(libm_kernel_ir("ubp_sin"), get_target("host"), tmp_path, "sin")


def test_emit_asm():
    assert "zmm" in emit_asm(dense_kernel_ir("ubp_ref", M, 32), get_target("host"))
    sve = emit_asm(dense_kernel_ir("ubp_ref", M, K), get_target("aarch64-sve"))
    assert "ubp_ref:" in sve and "z0" in sve


# --------------------------------------------------------------------------- header


def test_header_compiles_as_c_and_cpp(tmp_path):
    text = render_header(
        "ubp_conv1", M=96, K=16, N=4, description="layer conv1, target host\nvariant: baked */ end",
        packed_layout="none: weights are baked", baked=True,
    )
    assert "#define UBP_CONV1_M 96" in text and "#define UBP_CONV1_N 4" in text
    assert 'extern "C"' in text and "#include <stdint.h>" in text
    (tmp_path / "ubp_conv1.h").write_text(text)
    use = (
        '#include "ubp_conv1.h"\n#include "ubp_conv1.h"\n'  # twice: the include guard works
        "int32_t (*p)(const float *, float *, int64_t, const void *) = ubp_conv1;\n"
    )
    for lang, driver in (("c", "cc"), ("c++", "c++")):
        src = tmp_path / f"use.{'c' if lang == 'c' else 'cpp'}"
        src.write_text(use)
        run_tool([*zig_cmd(), driver, "-c", "-Wall", "-Werror", "-I", tmp_path, src, "-o", src.with_suffix(".o")])
    with pytest.raises(BuildError):
        render_header("not valid", M=1, K=1, N=None, description="", packed_layout="", baked=False)


# --------------------------------------------------------------------------- cache


def _race_put(root: str, key: str, tag: str, barrier) -> str:
    barrier.wait()
    cache = CompileCache(root)
    return str(cache.put(key, {"a.bin": tag.encode() * 100_000, "b.txt": tag.encode()}))


def test_cache_hit_miss_and_key(tmp_path):
    cache = CompileCache(tmp_path / "c")
    k1 = cache.key(target={"b": 1, "a": 2}, source="x", mask=b"\x00\x01")
    assert k1 == cache.key(mask=b"\x00\x01", source="x", target={"a": 2, "b": 1})
    assert k1 != cache.key(target={"b": 1, "a": 2}, source="y", mask=b"\x00\x01")
    assert cache.get(k1) is None
    src = tmp_path / "kernel.so"
    src.write_bytes(b"ELF")
    entry = cache.put(k1, {"kernel.so": src, "meta.json": b"{}"})
    assert cache.get(k1) == entry
    assert (entry / "kernel.so").read_bytes() == b"ELF" and (entry / "meta.json").read_bytes() == b"{}"
    assert cache.put(k1, {"other": b""}) == entry and not (entry / "other").exists()
    os.environ["UBPDSL_CACHE_DIR"], old = str(tmp_path / "env"), os.environ.get("UBPDSL_CACHE_DIR")
    try:
        assert CompileCache().root == tmp_path / "env"
    finally:
        os.environ["UBPDSL_CACHE_DIR"] = old


def test_cached_build(tmp_path, weights, xs):
    cache = CompileCache(tmp_path / "c")
    ir = dense_kernel_ir("ubp_ref", M, K)
    first = build_shared_object_cached(ir, get_target("host"), "ref", "/* h */\n", cache=cache)
    assert first.so.parent.parent.parent == cache.root and first.header.read_text() == "/* h */\n"
    again = build_shared_object_cached(ir, get_target("host"), "ref", "/* h */\n", cache=cache)
    assert again == first and again.symbols == ("ubp_ref",)
    other = build_shared_object_cached(ir, get_target("host"), "ref", cache=cache, key_parts={"mask": "x"})
    assert other.so != first.so and other.header is None
    y = HostKernel(again.so, "ubp_ref", M, K)(xs, pack_dense(weights))
    np.testing.assert_allclose(y, weights @ xs, rtol=1e-5, atol=1e-5)


def test_cache_concurrent_put_keeps_one_complete_entry(tmp_path):
    root = str(tmp_path / "race")
    key = CompileCache.key(test="race")
    ctx = multiprocessing.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(2)
        with ctx.Pool(2) as pool:
            paths = pool.starmap(_race_put, [(root, key, "A", barrier), (root, key, "B", barrier)])
    assert paths[0] == paths[1]
    entry = Path(paths[0])
    tag = (entry / "b.txt").read_text()
    assert tag in ("A", "B") and (entry / "a.bin").read_bytes() == tag.encode() * 100_000
    assert sorted(p.name for p in entry.parent.iterdir()) == [key]  # no temp dirs left


def test_cache_put_losing_the_race_keeps_the_winner(tmp_path, monkeypatch):
    cache = CompileCache(tmp_path)
    key = cache.key(test="lost race")
    real_rename = os.rename

    def rename_after_other_writer(src, dst):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "f").write_bytes(b"winner")
        real_rename(src, dst)

    monkeypatch.setattr("ubpdsl.runtime.cache.os.rename", rename_after_other_writer)
    entry = cache.put(key, {"f": b"loser"})
    assert (entry / "f").read_bytes() == b"winner"
    assert [p.name for p in entry.parent.iterdir()] == [key]


# --------------------------------------------------------------------------- qemu


@needs_qemu
@pytest.mark.parametrize(("target", "sve_bits"), [
    ("aarch64-neon", None), ("aarch64-sve", 128), ("aarch64-sve", 256), ("aarch64-sve", 512),
])
def test_aarch64_under_qemu_matches_numpy(builds, weights, xs, target, sve_bits):
    y = run_aarch64(builds[target].obj, "ubp_ref", xs, pack_dense(weights), M, sve_bits=sve_bits)
    np.testing.assert_allclose(y, weights @ xs, rtol=1e-5, atol=1e-5)


@needs_qemu
def test_qemu_failures_raise_run_error(builds, weights, xs, tmp_path):
    neon = get_target("aarch64-neon")
    with pytest.raises(RunError, match="error code 1"):
        run_aarch64(builds["aarch64-neon"].obj, "ubp_ref", xs, pack_dense(weights[:2]), M)
    with pytest.raises(RunError, match="SIGILL"):  # SVE code on a CPU without SVE
        run_aarch64(builds["aarch64-sve"].obj, "ubp_ref", xs, pack_dense(weights), M)
    crash = compile_llvm_ir(crash_kernel_ir("ubp_crash"), neon, tmp_path / "crash.o")
    with pytest.raises(RunError, match="crashed under qemu-aarch64.*SIGSEGV"):
        run_aarch64(crash, "ubp_crash", xs, None, M)
    hang = compile_llvm_ir(hang_kernel_ir("ubp_hang"), neon, tmp_path / "hang.o")
    with pytest.raises(RunError, match="timed out after 3 s"):
        run_aarch64(hang, "ubp_hang", xs, None, M, timeout=3)
    with pytest.raises(RunError, match="invalid SVE vector length"):
        run_aarch64(builds["aarch64-sve"].obj, "ubp_ref", xs, None, M, sve_bits=100)
    assert not list(tmp_path.glob("*core*"))


# --------------------------------------------------------------------------- C example


def _embed_cmd(art, out_dir: Path, triple: list[str]) -> list:
    shutil.copy(art.so, out_dir / art.so.name)
    header = render_header("ubp_ref", M=M, K=K, N=None, description="reference dense kernel",
                           packed_layout="u32 magic, M, K, version; float32 W[M, K]", baked=False)
    (out_dir / "ubp_ref.h").write_text(header)
    return [*zig_cmd(), "cc", *triple, "-O2", '-DUBP_HEADER="ubp_ref.h"', "-DUBP_KERNEL=ubp_ref",
            "-DUBP_M=UBP_REF_M", "-DUBP_K=UBP_REF_K", "-I", out_dir, ROOT / "examples/embed_c/main.c",
            out_dir / art.so.name, "-Wl,-rpath,$ORIGIN", "-o", out_dir / "embed"]


def _expected_embed_output(w: np.ndarray, n: int = 5) -> np.ndarray:
    k, j = np.meshgrid(np.arange(w.shape[1]), np.arange(n), indexing="ij")
    x = (((k * 7 + j * 3) % 11 - 5) / 4.0).astype(np.float32)
    return w @ x


def test_embed_c_example_on_host(builds, weights, tmp_path):
    run_tool(_embed_cmd(builds["host"], tmp_path, []))
    pack_dense(weights).tofile(tmp_path / "w.bin")
    out = subprocess.run([tmp_path / "embed", tmp_path / "w.bin"], capture_output=True, text=True, check=True)
    y = np.loadtxt(out.stdout.splitlines(), dtype=np.float32)
    np.testing.assert_allclose(y, _expected_embed_output(weights), rtol=1e-5, atol=1e-5)


@needs_qemu
@pytest.mark.skipif(aarch64_sysroot() is None,
                    reason="AArch64 glibc missing: install Debian's libc6-arm64-cross")
def test_embed_c_example_aarch64_under_qemu(builds, weights, tmp_path):
    art = builds["aarch64-neon"]
    run_tool(_embed_cmd(art, tmp_path, ["-target", "aarch64-linux-gnu.2.17"]))
    assert read_elf(tmp_path / "embed").needed == [art.so.name, "libc.so.6"]
    pack_dense(weights).tofile(tmp_path / "w.bin")
    proc = run_qemu([tmp_path / "embed", tmp_path / "w.bin"], sysroot=aarch64_sysroot(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    y = np.loadtxt(proc.stdout.decode().splitlines(), dtype=np.float32)
    np.testing.assert_allclose(y, _expected_embed_output(weights), rtol=1e-5, atol=1e-5)


def test_aligned_empty_is_cache_line_aligned_and_used_for_outputs() -> None:
    from ubpdsl.runtime.loader import aligned_copy, aligned_empty, check_kernel_args

    for shape in [(3, 5), (1,), (0, 7), (17, 33)]:
        a = aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
        assert a.ctypes.data % 64 == 0 or a.size == 0  # an empty array has no data to align
        a[...] = 1.0  # the whole extent is ours
    src = np.arange(15, dtype=np.float64).reshape(3, 5)
    c = aligned_copy(src, np.float32)
    assert c.dtype == np.float32 and c.ctypes.data % 64 == 0 and np.array_equal(c, src.astype(np.float32))
    x = np.ones((4, 9), np.float32)
    _, _, y = check_kernel_args("k", 6, 4, x, None, None)
    assert y.shape == (6, 9) and y.ctypes.data % 64 == 0


def test_target_kernel_defaults_fill_only_declared_missing_constants():
    from ubpdsl.runtime.targets import get_target

    neon = get_target("aarch64-neon")
    assert neon.kernel_constants(["TILE", "PREFETCH"], {"TILE": 6}) == {"PREFETCH": 0, "TILE": 6}
    assert neon.kernel_constants(["PREFETCH"], {"PREFETCH": 8}) == {"PREFETCH": 8}
    assert neon.kernel_constants(["TILE"], None) == {}
    assert get_target("host").kernel_constants(["PREFETCH"], None) == {}
