"""``gemserve serve``: flags over GEMSERVE_* env vars, and a real process from start to drain."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.harness import checkout_environment, free_port, log_tail, serve_command, start_server, stop_server
from cli.commands.serve import settings_from_args
from cli.main import build_parser
from server.engine.scheduler import DEFAULT_MAX_RUNNING


def test_flags_override_env_and_env_overrides_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GEMSERVE_MAX_QUEUE", "7")
    monkeypatch.setenv("GEMSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(
        [
            "serve",
            "--port",
            "9001",
            "--api-key",
            "from-flag",
            "--default-method",
            "gemfilter",
            "--max-num-batched-tokens",
            "48",
        ]
    )
    settings = settings_from_args(args)
    assert settings.max_num_batched_tokens == 48
    assert settings.port == 9001
    assert settings.max_queue == 7
    assert settings.api_key == "from-flag"
    assert settings.default_method == "gemfilter"
    assert settings.max_concurrency == DEFAULT_MAX_RUNNING and settings.max_batch_tokens is None
    assert settings.warmup is True  # on by default
    assert settings_from_args(build_parser().parse_args(["serve", "--no-warmup"])).warmup is False


def test_bad_setting_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--max-concurrency", "0"])
    with pytest.raises(ValueError, match="max_concurrency"):
        settings_from_args(args)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--backend", "vllm", "--step-trace", "steps.jsonl"], "records the hf backend's steps, not vllm's"),
        (["--step-trace", "/no/such/dir/steps.jsonl"], "no directory /no/such/dir to write the step trace"),
    ],
)
def test_a_step_trace_that_cannot_be_written_is_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        settings_from_args(build_parser().parse_args(["serve", *flags]))


@pytest.mark.slow
def test_unknown_backend_fails_fast() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--backend", "tgi"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown backend 'tgi'; available: hf" in proc.stderr  # more backends may follow 'hf'


def wait_for(url: str, status: int, deadline: float) -> httpx.Response:
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=5)
            if response.status_code == status:
                return response
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} never answered {status}")


@pytest.mark.slow
def test_serve_process_loads_serves_and_exits_cleanly(tmp_path: Path) -> None:
    """The real process through the benchmarks' harness: /health first, /ready once loaded, one
    completion, and SIGINT ends it with exit code 0 and the access log line written."""
    port = free_port()
    log = tmp_path / "server.log"
    proc = start_server(serve_command(port, "--device", "cpu"), checkout_environment(), log)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        assert wait_for(f"{url}/health", 200, deadline).json() == {"status": "ok"}
        ready = wait_for(f"{url}/ready", 200, deadline).json()
        assert ready["ready"] is True and ready["backend"] == "hf"
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1}, timeout=120)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 1
    finally:
        stopped = stop_server(proc, grace_s=120)
    assert stopped["exit_code"] == 0 and stopped["stopped_by"] == "SIGINT", log_tail(log)
    assert "http=POST /v1/completions status=200 method=none" in log.read_text()  # the one-line access log
    assert "warm-up: " in log.read_text()  # before /ready: the first request paid no one-time set-up
