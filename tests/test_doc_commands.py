"""Every shell command the docs show is run, so a documented command cannot rot.

Commands come from README.md, docs/**/*.md and examples/**/*.md: fenced ```sh / ```bash /
```shell blocks (every line), ```console blocks (the ``$ `` lines) and 4-space indented blocks whose
first line starts with a command (ubpdsl, python, make, ./, cc, qemu-aarch64, zig ...). Lines ending
in ``\\`` continue on the next. Each file's commands run in order, in a fresh temporary directory
that has copies of the repository's examples/ and benchmarks/ (scripts that write beside
themselves cannot touch the checkout) and .venv as a symbolic link, with this interpreter's bin
directory first on PATH, each bounded in time; ``cd`` carries over to the next command of the same
block (each block starts in that directory). A non-zero exit fails the test. A command that cannot
run here (a board over ssh, a remote database, a 20-minute benchmark, `make demo` which CI runs
itself) must end in ``# not run: <reason>``; the test requires the reason and prints how many were
skipped."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_GLOBS = ("README.md", "docs/**/*.md", "examples/**/*.md")
FENCED_SHELL = {"sh", "bash", "shell", "console"}
#: The first word of a line that makes an indented block a block of commands.
COMMAND_WORDS = ("ubpdsl", "python", "python3", ".venv/bin/", "make", "./", "cc", "gcc", "clang", "qemu-aarch64",
                 "zig", "nice", "cd", "bash", "env", "pip")
NOT_RUN = re.compile(r"#\s*not run\b:?\s*(.*)$")
TIMEOUT_S = 240  # per command
COPIED = ("examples", "benchmarks")


@dataclass(frozen=True)
class Command:
    file: str
    line: int
    text: str
    not_run: str | None  # the reason, when marked `# not run: ...`
    block: int = 0  # commands of one block share the working directory (cd)


def _is_command(line: str) -> bool:
    word = line.strip()
    return any(word == w or word.startswith(w if w.endswith("/") else w + " ") for w in COMMAND_WORDS)


def _commands_of(lines: list[tuple[int, str]], file: str, block: int = 0) -> list[Command]:
    """Join ``\\`` continuations, drop comment-only lines, note `# not run:` markers."""
    out: list[Command] = []
    buf: list[str] = []
    start = 0
    for no, raw in lines:
        line = raw.rstrip()
        if not buf:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = no
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        text = " ".join(part.strip() for part in buf)
        buf = []
        m = NOT_RUN.search(text)
        out.append(Command(file, start, text, m.group(1).strip() if m else None, block))
    if buf:
        raise AssertionError(f"{file}:{start}: a command ends in a line continuation")
    return out


def extract(path: Path) -> list[Command]:
    """The shell commands shown in a markdown file, in order."""
    rel = str(path.relative_to(ROOT))
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Command] = []
    i = 0
    prev_blank = True
    while i < len(lines):
        line = lines[i]
        fence = re.match(r"^(\s*)(```+|~~~+)\s*([\w+-]*)", line)
        if fence:
            indent, marker, lang = fence.groups()
            body: list[tuple[int, str]] = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(marker):
                body.append((i + 1, lines[i][len(indent):] if lines[i].startswith(indent) else lines[i]))
                i += 1
            i += 1
            if lang == "console":
                body = [(no, t.strip()[2:]) for no, t in body if t.strip().startswith("$ ")]
            if lang in FENCED_SHELL:
                out += _commands_of(body, rel, i)
            prev_blank = False
            continue
        if prev_blank and line.startswith("    ") and _is_command(line):
            block: list[tuple[int, str]] = []
            while i < len(lines) and lines[i].startswith("    ") and lines[i].strip():  # up to a blank line
                block.append((i + 1, lines[i]))
                i += 1
            # a deeper-indented line continues the command above it (a wrapped synopsis)
            base = len(block[0][1]) - len(block[0][1].lstrip())
            joined: list[tuple[int, str]] = []
            for no, t in block:
                if joined and t.strip() and len(t) - len(t.lstrip()) > base and not joined[-1][1].endswith("\\"):
                    joined[-1] = (joined[-1][0], joined[-1][1] + " \\")
                joined.append((no, t))
            out += _commands_of(joined, rel, i)
            prev_blank = False
            continue
        prev_blank = not line.strip()
        i += 1
    return out


def doc_files() -> list[Path]:
    files = {p for g in DOC_GLOBS for p in ROOT.glob(g)}
    return sorted(p for p in files if ".venv" not in p.parts and extract(p))


def _run_file(path: Path) -> tuple[list[str], list[str]]:
    """Run the file's commands; returns (failures, skipped reasons)."""
    failures: list[str] = []
    skipped: list[str] = []
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", "MPLBACKEND": "Agg",
           "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="ubp-doc-") as tmp:
        work = Path(tmp)
        for name in COPIED:
            shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        (work / ".venv").symlink_to(Path(sys.prefix))  # `.venv/bin/python ...` as the docs write it
        cwd = work
        where = work / ".cwd"
        block = None
        for cmd in extract(path):
            if cmd.block != block:
                block, cwd = cmd.block, work
            label = f"{cmd.file}:{cmd.line}: {cmd.text}"
            if cmd.not_run is not None:
                if not cmd.not_run:
                    failures.append(f"{label}\n    `# not run:` needs a reason")
                skipped.append(f"{cmd.file}:{cmd.line} ({cmd.not_run})")
                continue
            script = f'cd "$1" || exit 97\n{cmd.text}\nrc=$?\npwd > "$2"\nexit $rc\n'
            t0 = time.monotonic()
            try:
                res = subprocess.run(["bash", "-c", script, "doc", str(cwd), str(where)], cwd=cwd, env=env,
                                     capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
                                     stdin=subprocess.DEVNULL)
            except subprocess.TimeoutExpired:
                failures.append(f"{label}\n    timed out after {TIMEOUT_S} s")
                break
            took = time.monotonic() - t0
            print(f"{took:6.1f} s  rc={res.returncode}  {label}")
            if res.returncode != 0:
                failures.append(f"{label}\n    exit {res.returncode}: {(res.stderr or res.stdout).strip()[-1500:]}")
                break  # later commands of the file build on this one
            if where.is_file():
                cwd = Path(where.read_text().strip())
    return failures, skipped


def test_extractor_finds_the_known_forms(tmp_path):
    """Fenced, console and indented blocks; continuations; markers; prose and code are not commands."""
    doc = ROOT / "docs" / ".doc_commands_selftest.md"
    doc.write_text(
        "Intro\n\n```sh\nubpdsl prune --model digits-cnn \\\n    -o m.npz   # trailing comment\n# a comment\n```\n\n"
        "```console\n$ ubpdsl inspect m.npz\nlayer 0 ...\n```\n\n"
        "```python\nimport ubpdsl\n```\n\n"
        "    ubpdsl tune --mask m.npz --runner ssh://pi@board   # not run: needs a board\n"
        "    make demo    # not run:\n\n"
        "    def kernel(X):\n        pass\n\n"
        "    masks.npz ──prune──▶ bundle\n")
    try:
        cmds = extract(doc)
    finally:
        doc.unlink()
    texts = [c.text for c in cmds]
    assert texts[0].startswith("ubpdsl prune --model digits-cnn") and "-o m.npz" in texts[0]
    assert texts[1] == "ubpdsl inspect m.npz"
    assert [c.not_run for c in cmds[2:]] == ["needs a board", ""]
    assert len(cmds) == 4


@pytest.fixture(scope="module")
def runs():
    """Every file's run, two files at a time (most of a command's time is start-up and waiting)."""
    pool = ThreadPoolExecutor(2)
    futures = {p: pool.submit(_run_file, p) for p in doc_files()}
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_commands_run(path, runs):
    failures, skipped = runs[path].result()
    print(f"{path.relative_to(ROOT)}: {len(skipped)} command(s) marked `# not run`"
          + "".join(f"\n    {s}" for s in skipped))
    assert not failures, "\n".join(failures)
