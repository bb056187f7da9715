"""``ubpdsl.dialects``: the ``ubp`` MLIR dialect (IRDL, :mod:`.ubp`) and its lowering to upstream
MLIR and LLVM IR (:mod:`.lowering`)."""
