"""The C ABI of every generated kernel: its signature and its return codes (the one owner).

Every kernel ubpdsl builds exports::

    int32_t <symbol>(const float *x, float *y, int64_t n, const void *packed_w);

``x`` is [K, n] row-major fp32, ``y`` is [M, n] row-major fp32 (fully overwritten on success),
``packed_w`` the packed weight blob of :mod:`ubpdsl.packing` (ignored, may be NULL, for
mask-specialised kernels whose weights are baked into the code). The return code is one of
:data:`KERNEL_ERRORS` (0 on success). The numbers are public and never change meaning; new
codes are only ever added. The loader, the qemu runner, the generated C headers and the docs
all take them from here. Standard library only (the generated headers and the timing worker's
callers use it without numpy).
"""

from __future__ import annotations

__all__ = [
    "C_SIGNATURE",
    "ERR_BAD_BLOB",
    "ERR_BAD_N",
    "ERR_BAD_PIXELS",
    "ERR_HEADER",
    "ERR_NULL_WEIGHTS",
    "ERR_OUT_OF_BOUNDS",
    "KERNEL_ERRORS",
    "OK",
    "PATTERN_SYMBOL_PREFIX",
    "c_declaration",
    "c_return_code_defines",
    "describe_error",
    "pattern_symbol",
]

#: Success.
OK = 0
#: The packed blob's header does not match the kernel (magic, version, M, K, N or layout).
ERR_HEADER = 1
#: n < 0.
ERR_BAD_N = 2
#: packed_w is NULL but the kernel reads its weights from the blob (data-driven build).
ERR_NULL_WEIGHTS = 3
#: A load or store outside X, Y or the block arrays, caught by a ``check_bounds`` build.
ERR_OUT_OF_BOUNDS = 4
#: The header's block count, offsets or total size are inconsistent with M, K, N.
ERR_BAD_BLOB = 5

#: n is not H * W of a direct-convolution (pattern) kernel compiled for an H x W image.
ERR_BAD_PIXELS = 6

#: Meaning of every return code a kernel may give.
KERNEL_ERRORS: dict[int, str] = {
    OK: "success",
    ERR_HEADER: "packed weight blob header mismatch (wrong layer, shape, layout or format version)",
    ERR_BAD_N: "invalid n (negative)",
    ERR_NULL_WEIGHTS: "packed_w is NULL but this kernel reads its weights from the packed blob",
    ERR_OUT_OF_BOUNDS: "out-of-bounds access caught by a bounds-checked (--check-bounds) build",
    ERR_BAD_BLOB: "packed weight blob is inconsistent (block count, offsets or total size)",
    ERR_BAD_PIXELS: "n is not H*W of the image this convolution kernel was compiled for",
}

#: Macro names of the codes in generated C headers (shared by every kernel, guarded).
_C_NAMES: dict[int, str] = {
    OK: "UBP_OK",
    ERR_HEADER: "UBP_ERR_HEADER",
    ERR_BAD_N: "UBP_ERR_BAD_N",
    ERR_NULL_WEIGHTS: "UBP_ERR_NULL_WEIGHTS",
    ERR_OUT_OF_BOUNDS: "UBP_ERR_OUT_OF_BOUNDS",
    ERR_BAD_BLOB: "UBP_ERR_BAD_BLOB",
    ERR_BAD_PIXELS: "UBP_ERR_BAD_PIXELS",
}

#: The kernel signature with ``{symbol}`` for the name.
C_SIGNATURE = "int32_t {symbol}(const float *x, float *y, int64_t n, const void *packed_w)"

#: Symbol prefix of pattern (direct 3x3 convolution) kernels: ``ubp_pattern_<layer>``, a symbol of
#: its own beside the block kernels' ``ubp_<layer>``, with the same C signature: ``x`` is
#: [Cin, H, W] (= [K, n]), ``y`` is [Cout, H, W] (= [M, n]), n = H * W of the image the kernel was
#: compiled for (else ERR_BAD_PIXELS), ``packed_w`` the pattern blob of
#: :func:`ubpdsl.packing.pack_pattern`. 3x3 convolution, stride 1, padding 1.
PATTERN_SYMBOL_PREFIX = "ubp_pattern_"


def pattern_symbol(layer_stem: str) -> str:
    """The C symbol of the pattern kernel of a layer (``layer_stem``: a C-safe layer name)."""
    return PATTERN_SYMBOL_PREFIX + layer_stem


def describe_error(rc: int) -> str:
    """Human-readable meaning of a kernel return code."""
    return KERNEL_ERRORS.get(rc, "unknown error code")


def c_declaration(symbol: str) -> str:
    """The C prototype of kernel ``symbol`` (no trailing semicolon)."""
    return C_SIGNATURE.format(symbol=symbol)


def c_return_code_defines() -> str:
    """``#define UBP_OK 0`` ... for every code, with its meaning, inside an include guard."""
    lines = ["#ifndef UBP_RETURN_CODES_DEFINED", "#define UBP_RETURN_CODES_DEFINED"]
    width = max(len(name) for name in _C_NAMES.values())
    for code, name in _C_NAMES.items():
        lines.append(f"#define {name:<{width}} {code}  /* {KERNEL_ERRORS[code]} */")
    lines.append("#endif")
    return "\n".join(lines)
