"""The ssh remote runner, against an sshd on 127.0.0.1 started by the test (temp host key,
temp authorized_keys, a free port). Skips, saying why, when Debian's openssh-server is
missing and cannot be installed (needs root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_autotune_robust import _bad_so
from test_autotune_util import make_masks, run_tune

from ubpdsl.autotune import space as sp
from ubpdsl.autotune.remote import RunnerError, SshRunner
from ubpdsl.autotune.study import Tuner, TuneSettings
from ubpdsl.compiler import random_problem

SSHD = "/usr/sbin/sshd"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd():
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("openssh-server is not installed and cannot be installed here (needs root and apt-get)")
        subprocess.run(["apt-get", "install", "-y", "-q", "openssh-server", "openssh-client"], capture_output=True,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), timeout=600)
        if not os.path.exists(SSHD):
            pytest.skip("apt-get install openssh-server failed")
    if os.geteuid() != 0:
        pytest.skip("the loopback sshd test runs sshd as root (privilege separation)")
    tmp = Path(tempfile.mkdtemp(prefix="ubp-sshd-"))
    os.chmod(tmp, 0o700)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp / key)], check=True)
    (tmp / "authorized_keys").write_text((tmp / "client_key.pub").read_text())
    os.chmod(tmp / "authorized_keys", 0o600)
    port = _free_port()
    (tmp / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {tmp / 'host_key'}\nPidFile {tmp / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {tmp / 'authorized_keys'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nSubsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "sshd.log", "w"))
    options = (f"-oIdentityFile={tmp / 'client_key'}", f"-oUserKnownHostsFile={tmp / 'known_hosts'}",
               "-oStrictHostKeyChecking=accept-new", "-oLogLevel=ERROR")
    user = os.environ.get("USER") or "root"
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        yield f"ssh://{user}@127.0.0.1:{port}", options
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def test_remote_runner_protocol(tmp_path, sshd):
    url, options = sshd
    runner = SshRunner.from_url(url, options)
    layer = sp.Layer(random_problem(48, 32, 4, 0.75), 32)
    tuner = Tuner(TuneSettings(cache_dir=tmp_path / "cache", jobs=0, timeout=4.0), runner=runner)
    try:
        assert runner.arch == os.uname().machine
        good = tuner.compile(layer, sp.default_config(tuner.target))
        ok = tuner.measure(layer, [tuner._entry("ref", layer, good), tuner._entry("cand", layer, good)])
        assert ok.ok, ok.message
        assert tuner._check(layer, tuner._reference_y(layer), ok.result["results"][1]) is None
        symbol = good["symbol"]
        for kind, status in (("segfault", "crash"), ("hang", "timeout")):
            bad = dict(good, so=str(_bad_so(tmp_path, kind, symbol)))
            out = tuner.measure(layer, [tuner._entry("ref", layer, good), tuner._entry("cand", layer, bad)])
            assert out.status == status, (kind, out)
        assert "SIGSEGV" in tuner.measure(layer, [tuner._entry("c", layer, dict(
            good, so=str(tmp_path / "segfault.so")))]).message
    finally:
        tuner.close()


def test_tune_over_ssh_and_unreachable_runner(tmp_path, sshd):
    url, options = sshd
    masks = make_masks(tmp_path / "masks.npz", [(32, 16)])
    args = ["--mask", str(masks), "--trials", "4", "--runner", url, "-o", str(tmp_path / "out"), "--pixels", "32"]
    for opt in options:
        args.append(f"--ssh-option={opt}")
    r = run_tune(args, tmp_path / "cache")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "layer0.host.so").is_file()
    with pytest.raises(RunnerError, match="cannot reach runner"):
        SshRunner.from_url(f"ssh://nobody@127.0.0.1:{_free_port()}", options).connect()
