"""From LLVM IR text to a self-contained shared object (and object file) for one target.

Pipeline (:func:`build_shared_object`)::

    LLVM IR text --opt -O3--> bitcode --llc -O3 -filetype=obj -relocation-model=pic--> kernel.o
    kernel.o [+ memfuncs.o] --ld.lld -shared --no-undefined--> kernel.so  (+ kernel.h)

The ``.so`` must be self-contained: no ``DT_NEEDED`` entry and no undefined dynamic symbol,
so it loads anywhere (ctypes, a C program, an Android app) without a libc dependency.
:func:`check_self_contained` verifies that with a small pure-Python ELF64 reader.

libc memory functions: LLVM may lower ``llvm.memset``/``llvm.memcpy``/``llvm.memmove`` (or
zeroing/copy loops it recognises) to calls of the libc functions ``memset``/``memcpy``/
``memmove``. Rather than failing, :func:`link_shared` then links a tiny freestanding
implementation of exactly those three (built from IR marked ``"no-builtins"`` so it cannot
turn into a call to itself) with *hidden* visibility: they are neither exported nor
interposable. Any other undefined symbol (``sinf``, ``malloc`` ...) is a BuildError naming
the symbols. Pass ``mem_shims=False`` to make the three functions an error too.
"""

from __future__ import annotations

import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ubpdsl.errors import BuildError

from .cache import CompileCache
from .targets import Target
from .toolchain import lld_cmd, run_tool, tool, toolchain_versions

__all__ = [
    "BuildArtifact",
    "ElfInfo",
    "MEM_FUNCTIONS",
    "compile_llvm_ir",
    "optimize_llvm_ir",
    "emit_asm",
    "link_shared",
    "read_elf",
    "check_self_contained",
    "build_shared_object",
    "build_shared_object_cached",
]

#: libc functions LLVM may emit calls to, which :func:`link_shared` can supply itself.
MEM_FUNCTIONS = frozenset({"memset", "memcpy", "memmove"})

_EM_NAMES = {62: "x86_64", 183: "aarch64"}


# --------------------------------------------------------------------------- ELF reading


@dataclass
class ElfInfo:
    """What the build checks need from an ELF64 little-endian file.

    ``defined``/``undefined`` come from ``.dynsym`` for shared objects and executables, from
    ``.symtab`` for relocatable objects (global and weak symbols only).
    """

    path: Path
    machine: str
    elf_type: str  # "rel", "exec", "dyn"
    needed: list[str] = field(default_factory=list)
    defined: list[str] = field(default_factory=list)
    undefined: list[str] = field(default_factory=list)
    exported_functions: list[str] = field(default_factory=list)
    #: defined symbol -> (address, size) from the symbol table read (see ``read_elf(symtab=)``)
    addresses: dict[str, tuple[int, int]] = field(default_factory=dict)


def _cstr(table: bytes, offset: int) -> str:
    end = table.index(b"\0", offset)
    return table[offset:end].decode("utf-8", errors="replace")


def read_elf(path: Path, *, symtab: bool = False) -> ElfInfo:
    """Parse the section headers, symbol table and dynamic section of an ELF64 LE file.

    ``symtab=True`` reads ``.symtab`` even for linked files (e.g. a static executable's
    function addresses, for counting the instructions of one function under qemu).
    """
    try:
        return _read_elf(Path(path), symtab)
    except (struct.error, ValueError, IndexError, ZeroDivisionError) as exc:
        raise BuildError(f"{path}: malformed ELF file ({exc})") from exc


def _read_elf(path: Path, symtab: bool = False) -> ElfInfo:
    data = path.read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise BuildError(f"{path}: not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise BuildError(f"{path}: only 64-bit little-endian ELF is supported")
    (e_type, e_machine, _ver, _entry, _phoff, e_shoff, _flags, _ehsize, _phentsize, _phnum,
     e_shentsize, e_shnum, _shstrndx) = struct.unpack_from("<HHIQQQIHHHHHH", data, 16)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, e_shoff + i * e_shentsize) for i in range(e_shnum)
    ]
    if not sections:
        raise BuildError(f"{path}: ELF file without section headers cannot be checked")

    def body(idx: int) -> bytes:
        _n, _t, _f, _a, off, size, *_ = sections[idx]
        return data[off:off + size]

    info = ElfInfo(
        path=path,
        machine=_EM_NAMES.get(e_machine, f"e_machine={e_machine}"),
        elf_type={1: "rel", 2: "exec", 3: "dyn"}.get(e_type, f"e_type={e_type}"),
    )
    sht_wanted = 11 if e_type in (2, 3) and not symtab else 2  # SHT_DYNSYM for linked files, SHT_SYMTAB for .o
    for idx, section in enumerate(sections):
        sh_type, sh_link, entsize = section[1], section[6], section[9]
        if sh_type == sht_wanted:
            strtab = body(sh_link)
            raw = body(idx)
            for k in range(1, len(raw) // entsize):  # entry 0 is the null symbol
                st_name, st_info, st_other, st_shndx, st_value, st_size = struct.unpack_from(
                    "<IBBHQQ", raw, k * entsize
                )
                bind, stype, visibility = st_info >> 4, st_info & 0xF, st_other & 0x3
                if bind not in (1, 2) or not st_name:  # GLOBAL, WEAK
                    continue
                name = _cstr(strtab, st_name)
                if st_shndx == 0:  # SHN_UNDEF
                    info.undefined.append(name)
                else:
                    info.defined.append(name)
                    info.addresses[name] = (st_value, st_size)
                    if stype == 2 and visibility in (0, 3):  # STT_FUNC, default/protected
                        info.exported_functions.append(name)
        elif sh_type == 6:  # SHT_DYNAMIC
            strtab = body(sh_link)
            raw = body(idx)
            for k in range(len(raw) // 16):
                tag, val = struct.unpack_from("<qQ", raw, k * 16)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    info.needed.append(_cstr(strtab, val))
    return info


def check_self_contained(so: Path) -> list[str]:
    """Raise BuildError unless ``so`` has no DT_NEEDED entry and no undefined dynamic symbol.

    Returns the exported function symbols (the kernels) on success.
    """
    info = read_elf(Path(so))
    problems = []
    if info.needed:
        problems.append(f"depends on shared libraries (DT_NEEDED): {', '.join(info.needed)}")
    if info.undefined:
        problems.append(f"has undefined dynamic symbols: {', '.join(sorted(info.undefined))}")
    if problems:
        raise BuildError(f"{so} is not self-contained: " + "; ".join(problems))
    return sorted(info.exported_functions)


# --------------------------------------------------------------------------- compiling


def optimize_llvm_ir(llvm_ir: str, target: Target, opt_level: int = 3) -> bytes:
    """Run ``opt -O<level>`` for ``target`` on IR text; return the optimised bitcode."""
    if opt_level not in (0, 1, 2, 3):
        raise BuildError(f"opt_level must be 0..3, not {opt_level}")
    proc = run_tool(
        [tool("opt"), f"-O{opt_level}", *target.llvm_flags(), "-o", "-", "-"],
        input=llvm_ir.encode(),
        what=f"opt (target {target.name})",
    )
    return proc.stdout


def _llc(bitcode: bytes, target: Target, opt_level: int, filetype: str, out: str) -> bytes:
    proc = run_tool(
        [
            tool("llc"), f"-O{opt_level}", *target.llvm_flags(), f"-filetype={filetype}",
            "-relocation-model=pic", "-o", out, "-",
        ],
        input=bitcode,
        what=f"llc (target {target.name})",
    )
    return proc.stdout


def compile_llvm_ir(llvm_ir: str, target: Target, out_obj: Path, opt_level: int = 3) -> Path:
    """Compile LLVM IR text to a position-independent ELF object file for ``target``."""
    out_obj = Path(out_obj)
    out_obj.parent.mkdir(parents=True, exist_ok=True)
    bitcode = optimize_llvm_ir(llvm_ir, target, opt_level)
    _llc(bitcode, target, opt_level, "obj", str(out_obj))
    return out_obj


def emit_asm(llvm_ir: str, target: Target, opt_level: int = 3) -> str:
    """The assembly ``llc`` generates for ``target`` (after ``opt``), as text."""
    bitcode = optimize_llvm_ir(llvm_ir, target, opt_level)
    return _llc(bitcode, target, opt_level, "asm", "-").decode()


# --------------------------------------------------------------------------- linking

# Byte loops in functions marked "no-builtins": LoopIdiomRecognize may not turn them back
# into calls of memset/memcpy. Hidden visibility keeps them out of the .so's exports.
_MEMFUNCS_IR = """
define hidden ptr @memset(ptr %d, i32 %c, i64 %n) #0 {
entry:
  %b = trunc i32 %c to i8
  br label %loop
loop:
  %i = phi i64 [ 0, %entry ], [ %i1, %body ]
  %done = icmp eq i64 %i, %n
  br i1 %done, label %exit, label %body
body:
  %p = getelementptr i8, ptr %d, i64 %i
  store i8 %b, ptr %p
  %i1 = add i64 %i, 1
  br label %loop
exit:
  ret ptr %d
}

define hidden ptr @memmove(ptr %d, ptr %s, i64 %n) #0 {
entry:
  %di = ptrtoint ptr %d to i64
  %si = ptrtoint ptr %s to i64
  %backward = icmp ugt i64 %di, %si
  br i1 %backward, label %bloop, label %floop
floop:
  %i = phi i64 [ 0, %entry ], [ %i1, %fbody ]
  %fdone = icmp eq i64 %i, %n
  br i1 %fdone, label %exit, label %fbody
fbody:
  %ps = getelementptr i8, ptr %s, i64 %i
  %v = load i8, ptr %ps
  %pd = getelementptr i8, ptr %d, i64 %i
  store i8 %v, ptr %pd
  %i1 = add i64 %i, 1
  br label %floop
bloop:
  %j = phi i64 [ %n, %entry ], [ %j1, %bbody ]
  %bdone = icmp eq i64 %j, 0
  br i1 %bdone, label %exit, label %bbody
bbody:
  %j1 = sub i64 %j, 1
  %qs = getelementptr i8, ptr %s, i64 %j1
  %w = load i8, ptr %qs
  %qd = getelementptr i8, ptr %d, i64 %j1
  store i8 %w, ptr %qd
  br label %bloop
exit:
  ret ptr %d
}

; memcpy's regions never overlap, so memmove's forward/backward copy serves it too.
@memcpy = hidden alias ptr (ptr, ptr, i64), ptr @memmove

attributes #0 = { nounwind "no-builtins" }
"""

_TRIPLE_OF_MACHINE = {"x86_64": "x86_64-unknown-linux-gnu", "aarch64": "aarch64-unknown-linux-gnu"}
_LLD_EMULATION = {"x86_64": "elf_x86_64", "aarch64": "aarch64linux"}


def _memfuncs_object(machine: str, out_obj: Path) -> Path:
    target = Target(
        name=f"{machine}-memfuncs", triple=_TRIPLE_OF_MACHINE[machine], cpu="generic",
        features="", vector_bits=128,
    )
    bitcode = optimize_llvm_ir(_MEMFUNCS_IR, target, opt_level=2)
    _llc(bitcode, target, 2, "obj", str(out_obj))
    return out_obj


def link_shared(
    objs: list[Path], out_so: Path, *, soname: str | None = None, mem_shims: bool = True
) -> Path:
    """Link ELF objects into a self-contained shared object with ld.lld.

    ``-shared --no-undefined``, no libraries (so no DT_NEEDED), ``--hash-style=both``,
    ``-z now -z relro -z noexecstack``, debug info stripped. The architecture is taken from
    the objects (``-m elf_x86_64`` / ``-m aarch64linux``). Undefined ``memset``/``memcpy``/
    ``memmove`` are satisfied by a hidden freestanding implementation when ``mem_shims``;
    any other undefined symbol raises BuildError before lld runs.
    """
    objs = [Path(o) for o in objs]
    if not objs:
        raise BuildError("link_shared: no object files given")
    out_so = Path(out_so)
    out_so.parent.mkdir(parents=True, exist_ok=True)
    infos = [read_elf(o) for o in objs]
    machines = {i.machine for i in infos}
    if len(machines) != 1 or next(iter(machines)) not in _LLD_EMULATION:
        raise BuildError(f"link_shared: objects must all be x86_64 or all aarch64, got {sorted(machines)}")
    machine = machines.pop()
    defined = {s for i in infos for s in i.defined}
    missing = {s for i in infos for s in i.undefined} - defined
    unknown = sorted(missing - MEM_FUNCTIONS) if mem_shims else sorted(missing)
    if unknown:
        hint = ""
        if set(unknown) & MEM_FUNCTIONS:
            hint = " (memset/memcpy/memmove come from llvm.mem* intrinsics; allow mem_shims)"
        raise BuildError(
            f"kernel code calls external functions {', '.join(unknown)}: a self-contained .so "
            f"cannot depend on libc{hint}"
        )
    with tempfile.TemporaryDirectory(prefix="ubpdsl-link-") as tmp:
        link_objs = list(objs)
        if missing:
            link_objs.append(_memfuncs_object(machine, Path(tmp) / "memfuncs.o"))
        cmd = [
            *lld_cmd(), "-shared", "-m", _LLD_EMULATION[machine], "--no-undefined",
            "--hash-style=both", "-z", "now", "-z", "relro", "-z", "noexecstack",
            "--strip-debug", "--build-id=sha1", "-o", str(out_so),
        ]
        if soname:
            cmd += ["-soname", soname]
        run_tool([*cmd, *map(str, link_objs)], what="ld.lld")
    return out_so


# --------------------------------------------------------------------------- all in one


@dataclass(frozen=True)
class BuildArtifact:
    """Files produced by :func:`build_shared_object` (``header`` is None when none was given)."""

    so: Path
    obj: Path
    header: Path | None
    target: Target
    symbols: tuple[str, ...]  # exported function symbols of the .so


def build_shared_object(
    llvm_ir: str,
    target: Target,
    out_dir: Path,
    name: str,
    header: str | None = None,
    *,
    opt_level: int = 3,
) -> BuildArtifact:
    """Compile and link ``llvm_ir`` into ``out_dir/<name>.o`` and ``out_dir/<name>.so``.

    Writes ``out_dir/<name>.h`` when ``header`` text is given. The .so is checked with
    :func:`check_self_contained`, and its machine must match ``target``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    obj = compile_llvm_ir(llvm_ir, target, out_dir / f"{name}.o", opt_level)
    so = link_shared([obj], out_dir / f"{name}.so", soname=f"{name}.so")
    symbols = check_self_contained(so)
    machine = read_elf(so).machine
    if machine != target.arch:
        raise BuildError(f"{so}: built for {machine}, expected {target.arch} (target {target.name})")
    header_path = None
    if header is not None:
        header_path = out_dir / f"{name}.h"
        header_path.write_text(header)
    return BuildArtifact(so=so, obj=obj, header=header_path, target=target, symbols=tuple(symbols))


def build_shared_object_cached(
    llvm_ir: str,
    target: Target,
    name: str,
    header: str | None = None,
    *,
    opt_level: int = 3,
    cache: CompileCache | None = None,
    key_parts: dict[str, object] | None = None,
) -> BuildArtifact:
    """:func:`build_shared_object` through the :class:`~ubpdsl.runtime.cache.CompileCache`.

    The key covers the toolchain versions, ``target.cache_key()``, the IR, the name, the
    header text, ``opt_level`` and any ``key_parts`` (e.g. the mask hash, for bookkeeping).
    The returned paths point into the cache entry: copy them out, don't modify them.
    """
    cache = cache or CompileCache()
    key = cache.key(
        kind="shared-object",
        toolchain=toolchain_versions(),
        target=target.cache_key(),
        llvm_ir=llvm_ir,
        name=name,
        header=header,
        opt_level=opt_level,
        extra=key_parts or {},
    )
    files = {"so": f"{name}.so", "obj": f"{name}.o", "header": f"{name}.h" if header is not None else None}
    entry = cache.get(key)
    if entry is None:
        with tempfile.TemporaryDirectory(prefix="ubpdsl-build-") as tmp:
            art = build_shared_object(llvm_ir, target, Path(tmp), name, header, opt_level=opt_level)
            entry = cache.put(key, {p.name: p for p in (art.so, art.obj, art.header) if p is not None})
    so = entry / files["so"]
    return BuildArtifact(
        so=so,
        obj=entry / files["obj"],
        header=entry / files["header"] if files["header"] else None,
        target=target,
        symbols=tuple(check_self_contained(so)),
    )
