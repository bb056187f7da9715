"""A user kernel with its own tunable knobs (docs/dsl.md): tune, bench and run it from the CLI or Python.

    ubpdsl emit examples/user_kernel/mykernels.py:my_kernel --stage ubp
    ubpdsl bench --variant examples/user_kernel/mykernels.py:my_kernel --quick --shapes fc_2
"""

import ubpdsl.language as ubl


@ubl.kernel(layout="rotated", tune={"TILE": [1, 2, 4], "UNROLL": [1, 2]})
def my_kernel(X: ubl.Input, Y: ubl.Output, W: ubl.BlockSparse, TILE: ubl.constexpr = 2,
              UNROLL: ubl.constexpr = 1):
    """Output-stationary: N accumulator rows in registers, each row stored once it is complete."""
    N = W.block
    for j in ubl.tiles(X.n, TILE):
        acc = ubl.zeros(N, j)
        for r0 in range(0, W.rows, N):
            for p in ubl.static_range(N):
                lo, hi = W.row_blocks(r0 + p)
                for b in ubl.range(lo, hi, unroll=UNROLL):
                    acc = ubl.block_fma(W, b, ubl.load(X, W.block_col(b), j), acc)
                if r0 + p < W.rows:
                    ubl.store(Y, r0 + p, j, acc[p])
                acc[p] = 0.0
