"""Two tuning processes share one study in a real PostgreSQL server (Debian's postgresql).

The fixture installs ``postgresql`` with apt-get when it is missing (root only), starts a
private cluster in a temporary directory as the ``postgres`` user on 127.0.0.1 and a free
port, and stops it afterwards. It skips, saying why, only when that is impossible.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_autotune_util import ROOT, make_masks, tune_cmd


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _as_postgres(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    runner = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-c"]
    if runner[0] == "su":
        cmd = [" ".join(cmd)]
    return subprocess.run([*runner, *cmd], capture_output=True, text=True, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    pg = _pg_bin()
    if pg is None:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("PostgreSQL is not installed and cannot be installed here (needs root and apt-get)")
        r = subprocess.run(["apt-get", "install", "-y", "-q", "postgresql"], capture_output=True, text=True,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
        pg = _pg_bin()
        if pg is None:
            pytest.skip(f"apt-get install postgresql failed: {(r.stderr or r.stdout).strip()[-300:]}")
    if os.geteuid() == 0 and subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
        pytest.skip("no postgres system user to run the server as (postgres refuses to run as root)")
    tmp = Path(tempfile.mkdtemp(prefix="ubp-pg-"))
    data, sock = tmp / "data", tmp / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(sock, "postgres")
        run = _as_postgres
    else:
        def run(cmd, **kw):
            return subprocess.run(cmd, capture_output=True, text=True, **kw)
    port = _free_port()
    r = run([str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"], timeout=120)
    assert r.returncode == 0, r.stderr
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off"
    r = run([str(pg / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(tmp / "log"), "-w", "start"], timeout=120)
    assert r.returncode == 0, r.stderr + (tmp / "log").read_text() if (tmp / "log").exists() else r.stderr
    try:
        r = run([str(pg / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "ubptune"], timeout=60)
        assert r.returncode == 0, r.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/ubptune"
    finally:
        run([str(pg / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def test_two_workers_share_one_study(tmp_path, postgres_url):
    import optuna

    masks = make_masks(tmp_path / "masks.npz", [(64, 48)])
    trials = 14
    procs = []
    for i in range(2):
        env = dict(os.environ, UBPDSL_CACHE_DIR=str(tmp_path / f"cache{i}"))
        procs.append(subprocess.Popen(
            tune_cmd("--mask", str(masks), "--trials", str(trials), "--storage", postgres_url, "--pixels", "48",
                     "-j", "1", "--no-dense", "--seed", str(i), "-o", str(tmp_path / f"out{i}")),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=170) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
    storage = optuna.storages.RDBStorage(postgres_url.replace("postgresql://", "postgresql+psycopg://"))
    summaries = optuna.get_all_study_summaries(storage)
    assert len(summaries) == 1  # both processes worked on the same study
    study = optuna.load_study(study_name=summaries[0].study_name, storage=storage)
    ts = study.get_trials(deepcopy=False)
    numbers = [t.number for t in ts]
    assert sorted(numbers) == list(range(len(ts)))  # every trial recorded exactly once
    assert len({t._trial_id for t in ts}) == len(ts)
    assert not [t for t in ts if t.state.name in ("RUNNING", "WAITING")]
    measured = [t for t in ts if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    finished = [t for t in ts if t.state.name in ("COMPLETE", "FAIL")]
    assert len(finished) >= trials
    pids = {t.user_attrs.get("pid") for t in finished}
    assert len(pids) == 2, f"both workers should have finished trials: {[(t.number, t.user_attrs) for t in ts]}"
    for t in measured:
        assert len(t.values) == 1 and t.user_attrs["seconds"] > 0
