"""Pattern (PatDNN) direct convolution and a pixel-masked UBP layer vs dense vs our UBP kernel.

    .venv/bin/python benchmarks/bench_pattern.py [--sparsity 0.78] [--pixel-keep 0.5] [--quick] [--no-host] [--no-neon]
        [--clock thread|wall] [--neon-rows 8]

Per 3x3 layer (ResNet / MobileNet-like shapes, stride 1, padding 1) one Gaussian weight is
pruned twice to the same number of kept weights: by ``pattern_masks`` (8 patterns of 4 weights
+ connectivity pruning) for ``pattern_direct``, and by BED (unaligned N = 4 blocks) over the
im2col GEMM view [Cout, Cin*9] for ``wros`` (our UBP kernel). Each kernel's small knob grid is
timed first and its fastest point kept; then, in one interleaved run (warm caches, medians,
single thread): the pattern kernel on the raw input [Cin, H, W]; the UBP kernel on a
precomputed im2col X and with the im2col (torch unfold) included; dense torch conv2d; dense
torch.mm on a precomputed im2col X. Dense is the faster of the two. The pixel-masked layer
(semi-structured activation sparsity) is the same UBP kernel on the kept im2col columns only
(a random static mask keeping ``--pixel-keep`` of the output positions), timed on the gathered
columns and with the gather (unfold + index_select) and the scatter back included. Every output
is checked against torch first. Then executed AArch64 NEON instructions of one call of each
kernel under qemu (pattern, UBP GEMM, pixel-masked UBP, and the UBP kernel with every block
kept as the dense reference), from :mod:`ubpdsl.runtime.insncount`, in total and per useful
lane (one kept weight times one computed pixel, as in ``ubpdsl bench --target aarch64-neon``).
Host times use this thread's CPU time by default (``--clock thread``): on a shared, overloaded
machine a wall-clock sample of a long call includes the time it was descheduled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import machine_header  # noqa: E402

from ubpdsl.benchsuite import interleaved_medians  # noqa: E402
from ubpdsl.compiler import PatternProblem, Problem, compile_kernel  # noqa: E402
from ubpdsl.kernels import PATTERN_VARIANTS, VARIANTS  # noqa: E402
from ubpdsl.prune.pattern import pattern_masks  # noqa: E402
from ubpdsl.prune.selectors import bed_select, blocks_to_mask  # noqa: E402
from ubpdsl.runtime.loader import HostKernel, aligned_copy, aligned_empty  # noqa: E402

#: (name, Cout, Cin, H, W): ResNet-18 stage convs and MobileNet/VGG-like 3x3 layers.
SHAPES = [
    ("resnet_s2", 64, 64, 56, 56),
    ("resnet_s3", 128, 128, 28, 28),
    ("resnet_s4", 256, 256, 14, 14),
    ("resnet_s5", 512, 512, 7, 7),
    ("mbnet_like", 96, 32, 28, 28),
]
QUICK = [("resnet_s4", 256, 256, 14, 14), ("small_odd", 32, 16, 13, 11)]
N = 4
PATTERN_GRID = [({"TILE": t, "ROWS": r}, vb) for t in (1, 2, 4) for r in (4, 8) for vb in (512, 256)]
CLOCK = "thread"  # set by --clock


def do_bench(fns, min_time: float) -> dict[str, float]:
    """Median seconds per call of each function, interleaved, warm caches, on the chosen clock."""
    return interleaved_medians(fns, min_time=min_time, cache="warm", clock=CLOCK)


UBP_GRID = [({"TILE": t, "UNROLL": u}, vb) for t in (2, 4) for u in (1, 2) for vb in (512, 256)]


def layer(name: str, cout: int, cin: int, h: int, w: int, sparsity: float, seed: int = 0):
    """The pattern problem, the UBP problem with the same kept weights, and an input."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((cout, cin, 3, 3)).astype(np.float32)
    mask, ids, library = pattern_masks(np.abs(weight), sparsity)
    pw = (weight * mask).astype(np.float32)
    pat = PatternProblem(name, cout, cin, h, w, library.astype(np.uint8), ids, pw)
    kept = int(mask.sum())
    g = weight.reshape(cout, cin * 9)
    rows, cols = bed_select(np.abs(g), max(1, round(kept / N)), N)
    ubp = Problem(name, cout, cin * 9, N, rows, cols, (g * blocks_to_mask(rows, cols, cout, cin * 9, N)).astype(
        np.float32))
    x = rng.standard_normal((cin, h * w)).astype(np.float32)
    return pat, ubp, x, kept


def pixel_keep(h: int, w: int, keep: float, seed: int = 0) -> np.ndarray:
    """Indices of the kept output positions of a random static pixel mask (at least one)."""
    rng = np.random.default_rng(seed + 1)
    n = h * w
    return np.sort(rng.choice(n, max(1, round(keep * n)), replace=False))


def im2col(x: torch.Tensor, cin: int, h: int, w: int) -> torch.Tensor:
    return F.unfold(x.view(1, cin, h, w), 3, padding=1)[0]


def best(kernel, problem, x, grid, min_time: float):
    """The fastest grid point (compiled host kernel, constants)."""
    from ubpdsl.runtime.targets import get_target

    built = {}
    host_bits = get_target("host").vector_bits
    for consts, bits in grid:
        if bits > host_bits:
            continue
        ck = compile_kernel(kernel, problem, "host", constants=consts, vector_bits=bits)
        built[f"{consts} {bits}-bit"] = ck
    xs = aligned_copy(x)
    ys = {key: aligned_empty((problem.M, x.shape[1])) for key in built}
    hosts = {key: HostKernel(ck.so, ck.symbol, problem.M, problem.K) for key, ck in built.items()}
    times = do_bench({key: (lambda k=key: hosts[k](xs, built[k].packed, ys[k])) for key in built},
                     min_time=min_time)
    key = min(times, key=times.get)
    return built[key], key


def host_row(name: str, cout: int, cin: int, h: int, w: int, sparsity: float, keep: float,
             min_time: float) -> str:
    """One layer's table row (printed as it is measured)."""
    pat, ubp, x, kept = layer(name, cout, cin, h, w, sparsity)
    xcol_t = im2col(torch.from_numpy(x), cin, h, w).contiguous()
    xcol = aligned_copy(xcol_t.numpy())
    kept_px = pixel_keep(h, w, keep)
    kept_t = torch.from_numpy(kept_px)
    xpix = aligned_copy(xcol[:, kept_px])
    ypix = aligned_empty((cout, len(kept_px)))
    pk, pkey = best(PATTERN_VARIANTS["pattern_direct"], pat, x, PATTERN_GRID, min_time / 3)
    uk, ukey = best(VARIANTS["wros"], ubp, xcol, UBP_GRID, min_time / 3)
    xs = aligned_copy(x)
    ph, uh = HostKernel(pk.so, pk.symbol, cout, cin), HostKernel(uk.so, uk.symbol, cout, cin * 9)
    yp, yu = aligned_empty((cout, h * w)), aligned_empty((cout, h * w))
    xt = torch.from_numpy(x).view(1, cin, h, w)
    wd = torch.from_numpy(pat.weight)
    wd_mm = torch.from_numpy(np.ascontiguousarray(ubp.weight))
    ref = F.conv2d(xt, wd, padding=1).numpy().reshape(cout, h * w)
    np.testing.assert_allclose(ph(xs, pk.packed, yp), ref, rtol=1e-3, atol=1e-3)
    ref_u = (wd_mm @ xcol_t).numpy()
    np.testing.assert_allclose(uh(xcol, uk.packed, yu), ref_u, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(uh(xpix, uk.packed, ypix), ref_u[:, kept_px], rtol=1e-3, atol=1e-3)
    yfull = torch.zeros(cout, h * w)

    def ubp_im2col():
        xc = im2col(torch.from_numpy(xs), cin, h, w).contiguous().numpy()
        uh(xc, uk.packed, yu)

    def pix_im2col():
        xc = im2col(torch.from_numpy(xs), cin, h, w).index_select(1, kept_t).contiguous().numpy()
        uh(xc, uk.packed, ypix)
        yfull[:, kept_t] = torch.from_numpy(ypix)

    t = do_bench({
        "pattern": lambda: ph(xs, pk.packed, yp),
        "ubp": lambda: uh(xcol, uk.packed, yu),
        "ubp_im2col": ubp_im2col,
        "pix": lambda: uh(xpix, uk.packed, ypix),
        "pix_im2col": pix_im2col,
        "conv2d": lambda: F.conv2d(xt, wd, padding=1),
        "mm": lambda: torch.mm(wd_mm, xcol_t),
    }, min_time=min_time)
    dense = min(t["conv2d"], t["mm"])
    us = {k: f"{v * 1e6:.0f} us" for k, v in t.items()}
    row = (f"| {name} {cout}x{cin} {h}x{w} | {kept} (pattern) / {len(ubp.rows) * N} (UBP) | "
           f"{us['pattern']} {pkey} | {us['ubp']} {ukey} | {us['conv2d']} | {us['mm']} | "
           f"{dense / t['pattern']:.2f} | {t['ubp'] / t['pattern']:.2f} | "
           f"{t['ubp_im2col'] / t['pattern']:.2f} | {us['pix']} | {dense / t['pix']:.2f} | "
           f"{t['ubp'] / t['pix']:.2f} | {t['ubp_im2col'] / t['pix_im2col']:.2f} |")
    print(row, flush=True)
    return row


def host_rows(shapes, sparsity: float, keep: float, min_time: float) -> list[str]:
    torch.set_num_threads(1)
    out = ["| layer | kept weights | pattern (best knobs) | UBP wros (best knobs) | dense conv2d | dense mm | "
           "dense / pattern | UBP GEMM / pattern | UBP+im2col / pattern | pixel-masked UBP | dense / pixel | "
           "UBP / pixel | UBP+im2col / pixel+gather+scatter |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for shape in shapes:
        out.append(host_row(*shape, sparsity, keep, min_time))
    return out


def neon_rows(shapes, sparsity: float, keep: float, rows: int = 8) -> list[str]:
    from ubpdsl.armcost import register_tile
    from ubpdsl.runtime.insncount import count_call

    out = ["| layer | pattern insns | UBP GEMM insns | pixel-masked UBP insns | dense (all blocks) insns | "
           "per useful lane: pattern | UBP | pixel | dense | dense / pattern | UBP / pattern | UBP / pixel |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(out), flush=True)
    for name, cout, cin, h, w in shapes:
        pat, ubp, x, kept = layer(name, cout, cin, h, w, sparsity)
        xcol = im2col(torch.from_numpy(x), cin, h, w).contiguous().numpy()
        xpix = np.ascontiguousarray(xcol[:, pixel_keep(h, w, keep)])
        k_full = cin * 9
        rows_d = np.repeat(np.arange(0, cout - N + 1, N), k_full)
        cols_d = np.tile(np.arange(k_full), len(rows_d) // k_full)
        dense = Problem(name + "_dense", cout, k_full, N, rows_d, cols_d, np.ascontiguousarray(ubp.weight))
        tile = {"TILE": register_tile(N)}
        res = {}
        lanes = {"pattern": kept * h * w, "ubp": len(ubp.rows) * N * h * w, "pixel": len(ubp.rows) * N * xpix.shape[1],
                 "dense": cout * k_full * h * w}
        for label, kernel, problem, xin, consts in (
                ("pattern", PATTERN_VARIANTS["pattern_direct"], pat, x, {"TILE": 1 if w < 8 else 2, "ROWS": rows}),
                ("ubp", VARIANTS["wros"], ubp, xcol, tile), ("pixel", VARIANTS["wros"], ubp, xpix, tile),
                ("dense", VARIANTS["wros"], dense, xcol, tile)):
            ck = compile_kernel(kernel, problem, "aarch64-neon", constants=consts)
            counts, y = count_call(ck.obj, ck.symbol, np.ascontiguousarray(xin, np.float32), ck.packed, cout)
            if label == "pattern":
                want = F.conv2d(torch.from_numpy(x).view(1, cin, h, w), torch.from_numpy(pat.weight), padding=1)
                want = want.numpy().reshape(cout, h * w)
            else:
                want = problem.weight @ np.asarray(xin)
            np.testing.assert_allclose(y, want, rtol=1e-3, atol=1e-3)
            res[label] = counts.as_dict()
        p, u, q, d = (res[k]["total"] for k in ("pattern", "ubp", "pixel", "dense"))
        per = {k: res[k]["total"] / lanes[k] for k in lanes}
        out.append(f"| {name} {cout}x{cin} {h}x{w} | {p:,} | {u:,} | {q:,} | {d:,} | {per['pattern']:.3f} | "
                   f"{per['ubp']:.3f} | {per['pixel']:.3f} | {per['dense']:.3f} | {d / p:.2f} | {u / p:.2f} | "
                   f"{u / q:.2f} |")
        print(out[-1], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.78, help="fraction of weights removed (default 0.78)")
    ap.add_argument("--pixel-keep", type=float, default=0.5,
                    help="fraction of output positions the pixel-masked layer computes (default 0.5)")
    ap.add_argument("--quick", action="store_true", help="two small layers")
    ap.add_argument("--min-time", type=float, default=0.4)
    ap.add_argument("--no-neon", action="store_true", help="skip the qemu instruction counts")
    ap.add_argument("--no-host", action="store_true", help="skip the host timings (counts only)")
    ap.add_argument("--neon-rows", type=int, default=8, help="ROWS of the pattern kernel counted on NEON (default 8)")
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="time host calls by this thread's CPU time (default) or the wall clock")
    args = ap.parse_args()
    global CLOCK
    CLOCK = args.clock
    shapes = QUICK if args.quick else SHAPES
    print(machine_header())
    print(f"# pixel-masked UBP layer: {args.pixel_keep} of the output positions kept (random static mask)")
    if not args.no_host:
        print(f"# host, single thread, sparsity {args.sparsity}, warm caches; times are medians of one interleaved run "
              f"({args.clock} clock)")
        host_rows(shapes, args.sparsity, args.pixel_keep, args.min_time)
    if not args.no_neon:
        print("\n# AArch64 NEON: executed instructions of one call under qemu (cortex-a76 model, no SVE); "
              f"pattern_direct TILE=2 (1 below 8 columns), ROWS={args.neon_rows}; wros TILE from register_tile(4)")
        neon_rows(shapes, args.sparsity, args.pixel_keep, args.neon_rows)


if __name__ == "__main__":
    main()
