"""The soak as a system test (issue 28): ``bench.soak`` for two minutes against a real ``gemserve
serve``, every answer classified. Its report is bench/results/soak_<model>.json and the "Soak"
sections of docs/benchmarks.md (``make soak``: two hours); this run writes to a temporary
directory and leaves the docs alone. The RSS slope over two minutes says nothing of a leak, so its
limit is opened here: what this test proves is the classification (no 5xx, no wrong status, no
broken stream, no timeout, the server alive and stopped)."""

from __future__ import annotations

import json

import pytest

from bench import soak

pytestmark = pytest.mark.slow


def test_two_minutes_of_mixed_traffic_have_no_unexpected_outcome(tmp_path) -> None:
    out = tmp_path / "soak.json"
    argv = ["--minutes", "2", "--warmup-min", "0.5", "--sample-s", "5", "--idle-probe-min", "0.75"]
    argv += ["--rss-slope-limit", "1000000", "--no-doc", "--out", str(out)]
    argv += ["--server-log", str(tmp_path / "server.log")]
    code = soak.main(argv)
    assert out.is_file(), f"the soak ended before its first result (exit {code}): {tmp_path / 'server.log'}"
    result = json.loads(out.read_text())
    verdict = result["verdict"]
    assert verdict["unexpected_errors"] == 0, result["totals"]
    assert all(verdict["checks"].values()), verdict["checks"]
    assert code == 0
    # The mix reached every expected kind of answer: served, refused as bad input, cut by the client.
    assert {"ok", "expected_4xx", "disconnect"} <= set(result["totals"]), result["totals"]
    assert set(result["totals"]) <= {"ok", "expected_4xx", "disconnect", "429"}
    assert result["server"]["stopped_by"] == "SIGINT"  # it shut down gracefully when asked
