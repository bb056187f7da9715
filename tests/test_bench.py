"""Benchmark suite tests: every peer is right on a tiny shape, a wrong runner is reported and not
timed, our runners are right, the quick CLI run writes CSV / markdown / PNG, bad options are one-line
errors."""

from __future__ import annotations

import csv
import ctypes
import math

import numpy as np
import pytest

from ubpdsl import benchsuite as bs
from ubpdsl.bench_peers import PEERS, Peer, Prepared
from ubpdsl.cli import main


@pytest.fixture(scope="module")
def tiny() -> bs.Case:
    w = np.random.default_rng(3).standard_normal((16, 8)).astype(np.float32)
    return bs.make_case("test", "tiny", w, 20, 4, 0.5, "random")


def test_case_masks_have_equal_size(tiny: bs.Case) -> None:
    assert len(tiny.aligned.rows) == len(tiny.unaligned.rows) == tiny.blocks
    assert np.all(np.asarray(tiny.aligned.rows) % tiny.N == 0)
    assert np.count_nonzero(tiny.square) == np.count_nonzero(tiny.unaligned.weight)


@pytest.mark.parametrize("peer", PEERS, ids=[p.key for p in PEERS])
def test_peer_matches_dense(peer: Peer, tiny: bs.Case) -> None:
    assert peer.available() is None, peer.available()
    prep = peer.prepare(tiny, 1)
    prep.call()
    prep.call()  # twice: outputs are overwritten, not accumulated
    ref = prep.matrix.astype(np.float64) @ tiny.x.astype(np.float64)
    np.testing.assert_allclose(prep.output(), ref, rtol=1e-4, atol=1e-4)
    assert bs._check(prep.output(), ref) is None


def test_wrong_runner_is_reported_not_timed(tiny: bs.Case) -> None:
    calls = []

    def prepare(case: bs.Case, threads: int) -> Prepared:
        y = np.zeros((case.M, case.n), np.float32)

        def call() -> None:
            calls.append(1)
            y[:] = 1.0  # not W @ x

        return Prepared(call, lambda: y, case.unaligned.weight, "unaligned")

    bad = Peer("bad", "a wrong kernel", prepare)
    res = {r.runner: r for r in bs.run_case(tiny, [PEERS[0], bad], (1,), min_time=0.01)}
    assert res["bad"].status == "wrong" and "max error" in res["bad"].detail
    assert math.isnan(res["bad"].seconds) and len(calls) == 1  # called once for the check, never timed
    assert res["dense"].status == "ok" and res["dense"].speedup == pytest.approx(1.0)
    md = bs.summary_markdown(bs.summarize(list(res.values())), "t")
    assert "Wrong results" in md and "a wrong kernel" in md


def test_ours_are_right(tiny: bs.Case) -> None:
    res = bs.run_case(tiny, [PEERS[0], *bs.ours_peers(bs.default_tuner())], (1,), min_time=0.01)
    by = {r.runner: r for r in res}
    for key in ("ubp", "ubp_abp", "ubp_wros_aligned"):
        assert by[key].status == "ok", by[key].detail
        assert by[key].seconds > 0 and by[key].speedup > 0
    assert by["ubp"].mask == "unaligned" and by["ubp_abp"].mask == "aligned"


def test_unavailable_peer_is_reported(tiny: bs.Case) -> None:
    gone = Peer("gone", "missing library", lambda c, t: None, available=lambda: "not installed")  # type: ignore
    res = {r.runner: r for r in bs.run_case(tiny, [PEERS[0], gone], (1,), min_time=0.01)}
    assert res["gone"].status == "unavailable" and res["gone"].detail == "not installed"


def test_quick_cli_writes_csv_markdown_png(tmp_path, capsys) -> None:
    out = tmp_path / "bench"
    rc = main(["bench", "--quick", "--shapes", "fc_2", "--min-time", "0.02", "--out", str(out)])
    assert rc == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    runners = {r["runner"] for r in rows}
    assert {"dense", "ubp", "ubp_abp", "mlir_csr", "torch_bsr"} <= runners
    assert all(r["status"] in ("ok", "unavailable") for r in rows), [r for r in rows if r["status"] != "ok"]
    md = (out / "report.md").read_text()
    assert "CPU:" in md and "copy bandwidth" in md and "ours vs best peer" in md and "cold caches" in md
    assert (out / "speedup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[1/1] fc_2" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--sparsity", "1.5"], "outside [0, 1)"),
    (["--block", "3"], "--block 3 is not one of"),
    (["--shapes", "nope"], "unknown shape 'nope'"),
    (["--mask", "/nonexistent/masks.npz"], "no such file"),
    (["--threads", "2"], "must include 1"),
])
def test_bad_options_are_one_line_errors(args: list[str], msg: str, tmp_path, capsys) -> None:
    rc = main(["bench", "--quick", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert rc == 1 and msg in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_cache_modes_scrub_or_rewarm_before_every_timed_call() -> None:
    calls: list[str] = []
    scrub = bs.CacheScrubber(1 << 20)
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    bs.interleaved_medians(fns, min_time=0.0, min_reps=3, max_reps=3, cache="cold", scrubber=scrub)
    assert scrub.count == 2 + 3 * 2  # the round-time probe and every timed call
    assert ctypes.string_at(scrub.dst.addr, scrub.nbytes) == ctypes.string_at(scrub.src.addr, scrub.nbytes)
    calls.clear()
    bs.interleaved_medians(fns, min_time=0.0, min_reps=3, max_reps=3, cache="warm")
    assert calls.count("a") == calls.count("b") == 2 + 2 + 2 * 3
    assert all(calls[i] == calls[i + 1] for i in range(0, len(calls), 2))  # each timed call follows its own
    with pytest.raises(bs.UbpError, match="cache must be one of cold, warm"):
        bs.interleaved_medians(fns, cache="lukewarm")


def test_thread_clock_counts_work_not_waiting() -> None:
    """clock="thread" times this thread's CPU time: a call that sleeps costs ~nothing, one that
    computes costs about its wall time; wall clock counts the sleep."""
    import time

    def spin() -> None:
        end = time.thread_time() + 0.004
        while time.thread_time() < end:
            pass

    fns = {"sleep": lambda: time.sleep(0.004), "spin": spin}
    thread = bs.interleaved_medians(fns, min_time=0.0, min_reps=3, max_reps=3, clock="thread")
    wall = bs.interleaved_medians(fns, min_time=0.0, min_reps=3, max_reps=3)
    assert thread["sleep"] < 0.002 <= 0.004 <= thread["spin"]
    assert wall["sleep"] >= 0.004
    with pytest.raises(bs.UbpError, match="clock must be one of wall, thread"):
        bs.interleaved_medians(fns, clock="cpu")


def test_bad_cache_option_is_one_line_error(tmp_path, capsys) -> None:
    rc = main(["bench", "--quick", "--cache", "hot", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc != 0 and "hot" in err and "Traceback" not in err
