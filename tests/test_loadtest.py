"""The load tester: statistics against hand-computed fixtures, runs against the stub and the real server."""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures.scripted_engine import API_KEY, ScriptedEngine, serve_scripted

from clients import loadtest
from clients.loadtest import check_target
from clients.loadtest_report import RequestRecord, describe, parse_slo, percentile, summarize
from clients.loadtest_runner import inter_arrival_s
from clients.loadtest_workload import jsonl_workload
from contract.methods import parse_methods

FIXTURES = Path(__file__).parent / "fixtures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SUMMARY_FIELDS = {
    "requests", "duration_s", "request_throughput", "output_token_throughput", "total_token_throughput",
    "input_tokens", "output_tokens", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "prompt_tokens", "kept_tokens",
    "accuracy", "goodput", "server_metrics",
}  # fmt: skip
RECORD_FIELDS = {
    "method", "index", "start_s", "ok", "error_type", "error_message", "request_id", "ttft_ms", "e2e_ms", "itl_ms",
    "tpot_ms", "prompt_tokens", "output_tokens", "kept_tokens", "expected", "correct", "output_text", "server_metrics",
}  # fmt: skip
OUTPUT_FILES = {"results.json", "requests.csv", "latency_cdf.png", "ttft_by_method.png", "throughput_over_time.png"}


# ---- statistics ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", json.loads((FIXTURES / "loadtest_percentiles.json").read_text())["cases"])
def test_percentiles_match_hand_computed_values(case: dict[str, Any]) -> None:
    for q, expected in case["percentiles"].items():
        assert percentile(case["values"], float(q)) == pytest.approx(expected)
    assert describe(case["values"])["mean"] == pytest.approx(case["mean"])


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)
    assert describe([None, None]) == {"count": 0, "mean": None, "p50": None, "p90": None, "p99": None}


def assert_close(actual: Any, expected: Any, where: str) -> None:
    """Equal, numbers to float precision, nested dicts key by key."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), where
        for key, value in expected.items():
            assert_close(actual[key], value, f"{where}.{key}")
    else:
        assert actual == pytest.approx(expected), where


def test_summary_matches_hand_computed_fixture() -> None:
    fixture = json.loads((FIXTURES / "loadtest_records.json").read_text())
    records = [RequestRecord(**row) for row in fixture["records"]]
    summary = summarize(records, {k: float(v) for k, v in fixture["slo"].items()})
    for name, expected in fixture["expected"].items():
        assert_close(summary[name], expected, name)
    assert summarize(records, {"tpot": 400.0})["goodput"]["good_requests"] == 2  # one-token request has no TPOT


def test_parse_slo() -> None:
    assert parse_slo("ttft:500, e2e:3000,tpot:50") == {"ttft": 500.0, "e2e": 3000.0, "tpot": 50.0}
    assert parse_slo(None) == {}
    for bad in ("ttft=5", "latency:5", "ttft:fast", "e2e:-1"):
        with pytest.raises(ValueError, match="slo"):
            parse_slo(bad)


def test_method_specs() -> None:
    """The loadtest reads the evals' grammar (contract/methods.py): budgets, ratios, knobs, default."""
    assert parse_methods(["none"])[0].compression() == {"method": "none"}  # sent explicitly
    assert parse_methods(["gemfilter:1024"])[0].compression() == {"method": "gemfilter", "budget": 1024}
    assert parse_methods(["snapkv:0.25"])[0].compression() == {"method": "snapkv", "ratio": 0.25}
    assert parse_methods(["snapkv:0.25+window=16"])[0].compression() == {
        "method": "snapkv",
        "window": 16,
        "ratio": 0.25,
    }
    assert parse_methods(["default"])[0].compression() is None  # the server picks: nothing GemServe-only is sent
    assert [m.label for m in parse_methods(["none", "gemfilter:1024", "snapkv:0.25"])] == [
        "none", "gemfilter:1024", "snapkv:0.25",
    ]  # fmt: skip
    for bad in ("gemfilter:lots", "gemfilter:0", ":12", "none:64", "default+x=1", "snapkv:1.5"):
        with pytest.raises(ValueError):
            parse_methods([bad])
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods(["snapkv:64", "snapkv:64"])


def test_gamma_arrivals_have_the_requested_mean_and_spread() -> None:
    rng = random.Random(0)
    poisson = [inter_arrival_s(rng, 4.0, 1.0) for _ in range(20000)]
    bursty = [inter_arrival_s(rng, 4.0, 0.25) for _ in range(20000)]
    assert statistics.fmean(poisson) == pytest.approx(0.25, rel=0.05)
    assert statistics.fmean(bursty) == pytest.approx(0.25, rel=0.05)
    # Coefficient of variation of a gamma(k) gap is 1/sqrt(k): 1 for Poisson, 2 for burstiness 0.25.
    assert statistics.stdev(poisson) / statistics.fmean(poisson) == pytest.approx(1.0, rel=0.05)
    assert statistics.stdev(bursty) / statistics.fmean(bursty) == pytest.approx(2.0, rel=0.1)
    assert inter_arrival_s(rng, math.inf, 1.0) == 0.0


def test_targets_must_be_loopback_unless_given_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GEMSERVE_BASE_URL", raising=False)
    assert check_target(None) == "http://127.0.0.1:8000"
    monkeypatch.setenv("GEMSERVE_BASE_URL", "http://10.1.2.3:8000")
    with pytest.raises(ValueError, match="--base-url"):
        check_target(None)
    assert check_target("http://10.1.2.3:8000") == "http://10.1.2.3:8000"
    monkeypatch.setenv("GEMSERVE_BASE_URL", "http://localhost:9000/v1")
    assert check_target(None) == "http://localhost:9000"


def test_jsonl_workload(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_text(
        '{"prompt": "a", "expected": "b"}\n\n{"messages": [{"role": "user", "content": "c"}], "max_tokens": 3}\n'
    )
    items = jsonl_workload(path, output_len=9)
    assert [(i.prompt, i.messages, i.max_tokens, i.expected) for i in items] == [
        ("a", None, 9, "b"),
        (None, [{"role": "user", "content": "c"}], 3, None),
    ]
    path.write_text('{"prompt": "a", "messages": []}\n')
    with pytest.raises(ValueError, match="exactly one"):
        jsonl_workload(path, 9)
    with pytest.raises(FileNotFoundError):
        jsonl_workload(tmp_path / "missing.jsonl", 9)


def test_gemserve_cli_runs_loadtest(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main as gemserve

    assert gemserve(["loadtest", "--compare", "none,none"]) == 2
    assert "gemserve loadtest: error: methods listed twice: none" in capsys.readouterr().err


def test_bad_arguments_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest.main(["--method", "gemfilter", "--compare", "none"]) == 2
    assert "not both" in capsys.readouterr().err
    assert loadtest.main(["--compare", "none,none"]) == 2
    assert "twice" in capsys.readouterr().err
    assert loadtest.main(["--base-url", "http://127.0.0.1:9", "--num-requests", "1"]) == 2  # nothing listens
    assert "Connection" in capsys.readouterr().err


# ---- against the real app around a scripted engine (tests/fixtures/scripted_engine.py) -----------
@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[str, ScriptedEngine]]:
    with serve_scripted(ScriptedEngine(token_delay_s=0.005)) as served:
        yield served


def run_cli(url: str, out: Path, *extra: str) -> int:
    argv = ["--base-url", url, "--api-key", API_KEY, "--output-dir", str(out), "--no-progress", *extra]
    return loadtest.main(argv)


def test_compare_run_writes_every_output(stub: tuple[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url, engine = stub
    engine.requests.clear()
    rc = run_cli(url, tmp_path, "--input-len", "200", "--output-len", "5", "--num-requests", "4", "--warmup", "1",
                 "--compare", "none,gemfilter:64,default", "--request-rate", "50", "--slo", "ttft:60000")  # fmt: skip
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == OUTPUT_FILES
    assert all((tmp_path / name).read_bytes().startswith(PNG_MAGIC) for name in OUTPUT_FILES if name.endswith(".png"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["summary"]) == ["none", "gemfilter:64", "default"]
    for summary in results["summary"].values():
        assert set(summary) == SUMMARY_FIELDS
        assert summary["requests"] == {"sent": 4, "completed": 4, "failed": 0, "errors": {}}
        assert summary["output_tokens"] == 20 and summary["itl_ms"]["count"] == 16
        assert summary["goodput"]["good_requests"] == 4
    assert results["summary"]["gemfilter:64"]["kept_tokens"]["mean"] == 64
    assert len(results["requests"]) == 12 and all(set(r) == RECORD_FIELDS for r in results["requests"])
    # Same workload per method: the scripted engine tokenises by words, so prompts land at or under 200 "tokens".
    by_index = sorted(results["requests"], key=lambda r: r["index"])  # records come in finishing order
    prompts = {m: [r["prompt_tokens"] for r in by_index if r["method"] == m] for m in results["summary"]}
    assert prompts["none"] == prompts["gemfilter:64"] == prompts["default"] and max(prompts["none"]) <= 200
    # 3 methods x (1 warmup + 4) requests; "default" sends no compression field at all.
    compressions = [(r.compression.method, r.compression.knobs) for r in engine.requests]
    assert compressions == [("none", {})] * 5 + [("gemfilter", {"budget": 64})] * 5 + [(None, {})] * 5
    table = capsys.readouterr().out
    rows = [line.split()[0] for line in table.splitlines()[3:6]]
    assert rows == ["none", "gemfilter:64", "default"]
    csv_lines = (tmp_path / "requests.csv").read_text().splitlines()
    assert len(csv_lines) == 13 and csv_lines[0].startswith("method,index,ok,error_type")


def test_closed_loop_concurrency_caps_requests_in_flight(stub: tuple[str, Any], tmp_path: Path) -> None:
    url, engine = stub
    engine.max_in_flight = 0
    rc = run_cli(url, tmp_path, "--input-len", "50", "--output-len", "20", "--num-requests", "6", "--concurrency", "2",
                 "--warmup", "0")  # fmt: skip
    assert rc == 0
    assert engine.max_in_flight == 2


def test_duration_bounds_the_run(stub: tuple[str, Any], tmp_path: Path) -> None:
    rc = run_cli(stub[0], tmp_path, "--input-len", "20", "--output-len", "2", "--num-requests", "40",
                 "--request-rate", "10", "--duration", "0.5", "--warmup", "0")  # fmt: skip
    assert rc == 0
    sent = json.loads((tmp_path / "results.json").read_text())["summary"]["default"]["requests"]["sent"]
    assert 1 <= sent < 40  # ~5 expected at 10/s for 0.5 s; 40 would take ~4 s


def test_errors_are_counted_by_type(stub: tuple[str, Any], tmp_path: Path) -> None:
    workload = tmp_path / "w.jsonl"
    lines = [{"prompt": "fail"}, {"prompt": "flaky:9"}, {"prompt": "flaky:9"}, {"prompt": "one two"}]
    workload.write_text("\n".join(json.dumps(line) for line in lines))
    rc = run_cli(stub[0], tmp_path / "out", "--dataset", str(workload), "--num-requests", "4", "--warmup", "0")
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "results.json").read_text())["summary"]["default"]
    assert summary["requests"] == {
        "sent": 4,
        "completed": 1,
        "failed": 3,
        "errors": {"APIError": 1, "RateLimitError": 2},
    }  # fmt: skip  (a failure after the stream started is an error event: openai's APIError)


def test_waits_for_a_loading_server() -> None:
    from clients.sdk import GemServe

    engine = ScriptedEngine()
    engine.release = threading.Event()
    try:
        with serve_scripted(engine, wait_ready=False) as (url, _), GemServe(url) as client:
            with pytest.raises(TimeoutError, match="not ready"):
                loadtest.wait_until_ready(client, timeout_s=0.3)
            threading.Timer(0.5, engine.release.set).start()
            loadtest.wait_until_ready(client, timeout_s=30)
    finally:
        engine.release.set()


@pytest.mark.slow
def test_real_ctrl_c_prints_and_writes_the_partial_summary(tmp_path: Path) -> None:
    engine = ScriptedEngine(token_delay_s=0.02)  # ~1 s per request: SIGINT lands mid-run
    command = [sys.executable, "-m", "clients.loadtest", "--api-key", API_KEY, "--output-dir", str(tmp_path),
               "--no-progress", "--input-len", "20", "--output-len", "50", "--num-requests", "50",
               "--concurrency", "1", "--warmup", "0"]  # fmt: skip
    with serve_scripted(engine) as (url, _):
        process = subprocess.Popen(
            [*command, "--base-url", url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while engine.finished < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "default" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True
    assert 2 <= results["summary"]["default"]["requests"]["completed"] < 50


# ---- against the real server ---------------------------------------------------------------------
@pytest.mark.slow
def test_small_real_run_compares_methods(server_url: str, tmp_path: Path) -> None:
    rc = run_cli(server_url, tmp_path, "--input-len", "300", "--output-len", "8", "--num-requests", "2",
                 "--warmup", "0", "--concurrency", "1", "--compare", "none,gemfilter:96", "--ignore-eos")  # fmt: skip
    assert rc == 0
    assert {p.name for p in tmp_path.iterdir()} == OUTPUT_FILES
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["summary"]) == ["none", "gemfilter:96"]
    none, gemfilter = results["summary"]["none"], results["summary"]["gemfilter:96"]
    for summary in (none, gemfilter):
        assert set(summary) == SUMMARY_FIELDS
        assert summary["requests"]["completed"] == 2
        assert summary["output_tokens"] == 16  # ignore_eos: exactly --output-len each
        assert summary["ttft_ms"]["p50"] > 0 and summary["tpot_ms"]["count"] == 2
        assert summary["server_metrics"]["prefill_ms"]["count"] == 2
    assert 250 <= none["prompt_tokens"]["p50"] <= 300  # /tokenize counted the chat-templated prompt
    assert none["kept_tokens"]["mean"] == none["prompt_tokens"]["mean"]
    assert gemfilter["kept_tokens"]["mean"] == 96  # 288 tokens: long enough to filter
    assert {r["method"] for r in results["requests"]} == {"none", "gemfilter:96"}
