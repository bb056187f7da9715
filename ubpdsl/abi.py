"""The C ABI of every generated kernel: its signature and its return codes (the one owner).

Every kernel ubpdsl builds exports::

    int32_t <symbol>(const float *x, float *y, int64_t n, const void *packed_w);

``x`` is [K, n] row-major fp32, ``y`` is [M, n] row-major fp32 (fully overwritten on success),
``packed_w`` the packed weight blob of :mod:`ubpdsl.packing` (ignored, may be NULL, for
mask-specialised kernels whose weights are baked into the code). The return code is one of
:data:`KERNEL_ERRORS` (0 on success).

Kernels that support a fused epilogue (every shipped variant, and every user kernel that does
not read Y back without marking its partial stores, see docs/dsl.md) also export::

    int32_t <symbol>_ep(const float *x, float *y, int64_t n, const void *packed_w,
                        const ubp_epilogue *ep);

which stores ``y = clamp(W x + bias[:, None] + residual, lo, hi)`` in the kernel's own store
(no second pass over y). ``ubp_epilogue`` is the versioned struct of :data:`C_EPILOGUE_STRUCT`:
``version`` must be :data:`EPILOGUE_VERSION`, ``flags`` a subset of :data:`EP_KNOWN_FLAGS`
(:data:`EP_CLAMP`: apply ``lo``/``hi``), ``bias`` [M] or NULL, ``residual`` [M, n] (the layout
of y, not overlapping y) or NULL. ``ep == NULL`` is no epilogue (the plain kernel's result); an
unknown version or flag returns :data:`ERR_BAD_EPILOGUE`. The numbers are public and never change meaning; new
codes are only ever added. The loader, the qemu runner, the generated C headers and the docs
all take them from here. Standard library only (the generated headers and the timing worker's
callers use it without numpy).
"""

from __future__ import annotations

__all__ = [
    "C_EPILOGUE_STRUCT",
    "C_EP_SIGNATURE",
    "C_SIGNATURE",
    "EPILOGUE_BYTES",
    "EPILOGUE_LAYOUT",
    "EPILOGUE_SUFFIX",
    "EPILOGUE_VERSION",
    "EP_CLAMP",
    "EP_KNOWN_FLAGS",
    "ERR_BAD_EPILOGUE",
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
    "c_ep_declaration",
    "c_epilogue_struct",
    "ep_symbol",
    "pack_epilogue",
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
#: The ``ubp_epilogue`` struct of a ``_ep`` call has an unknown version or unknown flags.
ERR_BAD_EPILOGUE = 6

#: n is not H * W of a direct-convolution (pattern) kernel compiled for an H x W image.
ERR_BAD_PIXELS = 7

#: Meaning of every return code a kernel may give.
KERNEL_ERRORS: dict[int, str] = {
    OK: "success",
    ERR_HEADER: "packed weight blob header mismatch (wrong layer, shape, layout or format version)",
    ERR_BAD_N: "invalid n (negative)",
    ERR_NULL_WEIGHTS: "packed_w is NULL but this kernel reads its weights from the packed blob",
    ERR_OUT_OF_BOUNDS: "out-of-bounds access caught by a bounds-checked (--check-bounds) build",
    ERR_BAD_BLOB: "packed weight blob is inconsistent (block count, offsets or total size)",
    ERR_BAD_EPILOGUE: "the ubp_epilogue struct has an unknown version, unknown flags or a NaN clamp bound",
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
    ERR_BAD_EPILOGUE: "UBP_ERR_BAD_EPILOGUE",
    ERR_BAD_PIXELS: "UBP_ERR_BAD_PIXELS",
}

#: The kernel signature with ``{symbol}`` for the name.
C_SIGNATURE = "int32_t {symbol}(const float *x, float *y, int64_t n, const void *packed_w)"

#: The name of a kernel's epilogue entry point is its symbol plus this suffix.
EPILOGUE_SUFFIX = "_ep"
#: The signature of the epilogue entry point, with ``{symbol}`` for the kernel's (plain) name.
C_EP_SIGNATURE = ("int32_t {symbol}_ep(const float *x, float *y, int64_t n, const void *packed_w, "
                  "const ubp_epilogue *ep)")
#: The ``ubp_epilogue`` version kernels built by this ubpdsl accept.
EPILOGUE_VERSION = 1
#: ``ubp_epilogue.flags`` bit: clamp to [lo, hi] (``min(max(v, lo), hi)``, NaN kept, as torch.clamp).
EP_CLAMP = 1
#: Every flag bit this version knows; any other bit set is ERR_BAD_EPILOGUE.
EP_KNOWN_FLAGS = EP_CLAMP
#: The struct's fields: (name, C type, byte offset); 32 bytes on LP64 (x86-64 and AArch64 Linux).
EPILOGUE_LAYOUT = (("version", "uint32_t", 0), ("flags", "uint32_t", 4), ("bias", "const float *", 8),
                   ("residual", "const float *", 16), ("lo", "float", 24), ("hi", "float", 28))
#: Size in bytes of the version-1 struct.
EPILOGUE_BYTES = 32

C_EPILOGUE_STRUCT = """#ifndef UBP_EPILOGUE_DEFINED
#define UBP_EPILOGUE_DEFINED
#define UBP_EPILOGUE_VERSION {version}
#define UBP_EP_CLAMP {clamp}u  /* flags bit: clamp to [lo, hi] */
/* The epilogue of a <kernel>_ep call: y = clamp(W x + bias[r] + residual[r, :], lo, hi).
 * Zero-initialise it, set version = UBP_EPILOGUE_VERSION and the parts you want. */
typedef struct ubp_epilogue {{
    uint32_t version;        /* UBP_EPILOGUE_VERSION (else UBP_ERR_BAD_EPILOGUE) */
    uint32_t flags;          /* UBP_EP_CLAMP or 0; unknown bits: UBP_ERR_BAD_EPILOGUE */
    const float *bias;       /* [M] per-row bias, or NULL */
    const float *residual;   /* [M, n] row-major like y (must not overlap y), or NULL */
    float lo, hi;            /* clamp bounds when flags & UBP_EP_CLAMP (ReLU: 0, INFINITY; ReLU6: 0, 6);
                                NaN: UBP_ERR_BAD_EPILOGUE */
}} ubp_epilogue;
#endif"""


def ep_symbol(symbol: str) -> str:
    """The epilogue entry point of kernel ``symbol`` (``ubp_conv1`` -> ``ubp_conv1_ep``)."""
    return symbol + EPILOGUE_SUFFIX


def c_ep_declaration(symbol: str) -> str:
    """The C prototype of the epilogue entry point of kernel ``symbol`` (no semicolon)."""
    return C_EP_SIGNATURE.format(symbol=symbol)


def c_epilogue_struct() -> str:
    """The ``ubp_epilogue`` typedef and its macros, inside an include guard."""
    return C_EPILOGUE_STRUCT.format(version=EPILOGUE_VERSION, clamp=EP_CLAMP)


def pack_epilogue(bias_addr: int = 0, residual_addr: int = 0, lo: float | None = None,
                  hi: float | None = None, *, version: int = EPILOGUE_VERSION, flags: int | None = None) -> bytes:
    """The 32 bytes of a ``ubp_epilogue`` (little endian, LP64) for addresses of bias/residual (0: NULL).

    Clamping is on when ``lo`` or ``hi`` is given (the missing bound is -inf / +inf).
    """
    import struct

    clamp = lo is not None or hi is not None
    if flags is None:
        flags = EP_CLAMP if clamp else 0
    return struct.pack("<IIQQff", version, flags, bias_addr, residual_addr,
                       float("-inf") if lo is None else float(lo), float("inf") if hi is None else float(hi))
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
