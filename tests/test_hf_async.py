"""Scheduler behaviour: queue limits (429), client disconnect, mid-stream errors, draining."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import openai
import pytest

from server.app import create_app, serve_in_background
from server.engine.base import EngineNotReadyError, QueueFullError
from server.engine.hf_async import HFAsyncEngine
from server.engine.types import GenerationRequest, GenerationResult, SamplingParams, TokenDelta
from server.settings import Settings
from tests.conftest import serve_app
from tests.test_server_http import error_of, sse_events

LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": True, "temperature": 0, "stream": True}


class RecordingEngine:
    """Wraps the sync HFEngine and records, for every token the scheduler emits, whether the
    request had already been cancelled at that moment; ``results`` gets each final GenerationResult."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.cancelled_at_token: list[bool] = []
        self.results: list[GenerationResult] = []
        self.finished = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def new_core(self, *args: Any, **kwargs: Any) -> Any:
        core = self.inner.new_core(*args, **kwargs)
        add = core.add

        def recording_add(request: GenerationRequest, emit: Any) -> str:
            def recording_emit(event: Any) -> None:
                if isinstance(event, TokenDelta):
                    self.cancelled_at_token.append(request.cancelled.is_set())
                elif isinstance(event, GenerationResult):
                    self.results.append(event)
                    self.finished.set()
                emit(event)

            return add(request, recording_emit)

        core.add = recording_add
        return core


class FailingEngine:
    """An AsyncEngine that breaks after ``fail_after`` events (a crash mid-generation)."""

    def __init__(self, inner: HFAsyncEngine, fail_after: int = 2) -> None:
        self.inner = inner
        self.fail_after = fail_after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, request: GenerationRequest) -> AsyncIterator[TokenDelta | GenerationResult]:
        return self._break(self.inner.stream(request))

    async def _break(self, events: Any) -> AsyncIterator[TokenDelta | GenerationResult]:
        try:
            seen = 0
            async for event in events:
                yield event
                seen += 1
                if seen == self.fail_after:
                    raise RuntimeError("simulated engine crash: secret internals")
        finally:
            await events.aclose()


def read_first_tokens(lines: Iterator[str], count: int) -> None:
    """Consume SSE lines until ``count`` tokens arrived. Takes the caller's line iterator: dropping
    an httpx line iterator closes the response, which would disconnect the stream."""
    seen = 0
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
            seen += 1
            if seen == count:
                return
    raise AssertionError("stream ended early")


def test_disconnect_stops_generation_within_one_step(engine) -> None:
    recorder = RecordingEngine(engine)
    app = create_app(Settings(), engine=HFAsyncEngine(recorder))
    with serve_app(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=120) as response:
            read_first_tokens(response.iter_lines(), 3)
        # leaving the block closed the connection mid-stream
        assert recorder.finished.wait(120), "engine did not stop after the client left"
    result = recorder.results[0]
    assert result.finish_reason == "cancelled"
    assert result.completion_tokens < LONG_STREAM["max_tokens"]
    tokens_after_cancel = sum(recorder.cancelled_at_token)
    assert tokens_after_cancel <= 1, recorder.cancelled_at_token


def test_queue_full_is_429_with_retry_after(engine) -> None:
    app = create_app(Settings(max_concurrency=1, max_queue=0), engine=HFAsyncEngine(engine, 1, 0, retry_after_s=3))
    with serve_app(app) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json=LONG_STREAM, timeout=120) as busy:
            busy_lines = busy.iter_lines()
            read_first_tokens(busy_lines, 1)  # the only slot is now taken
            rejected = httpx.post(f"{url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
            error = error_of(rejected, 429)
            assert rejected.headers["retry-after"] == "3"
            assert error["type"] == "rate_limit_error" and error["code"] == "queue_full"
            assert "max_queue=0" in error["message"]
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.completions.create(model=engine.model_name, prompt="Hi", max_tokens=1)
            gauges = httpx.get(f"{url}/metrics").text
            assert 'gemserve_requests_running{backend="hf",model="smollm2-135m-instruct"} 1.0' in gauges
            assert (
                'gemserve_requests_total{backend="hf",method="none",model="smollm2-135m-instruct",status="429"} 2.0'
                in (gauges)
            )
        # the slot frees once the cancelled request finishes its current decode step
        assert eventually_accepted(f"{url}/v1/completions", {"prompt": "Hi", "max_tokens": 1})


def eventually_accepted(url: str, payload: dict, attempts: int = 120) -> bool:
    for _ in range(attempts):
        response = httpx.post(url, json=payload, timeout=120)
        if response.status_code == 200:
            return True
        assert response.status_code == 429, response.text
        time.sleep(0.5)
    return False


def test_error_mid_stream_sends_error_event_then_done(engine) -> None:
    app = create_app(Settings(), engine=FailingEngine(HFAsyncEngine(engine)))
    with serve_app(app) as url:
        payload = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True, "stream": True}
        response = httpx.post(f"{url}/v1/completions", json=payload, timeout=120)
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "internal_error"
        assert "secret" not in error["message"]
        assert all("error" not in json.loads(e) for e in events[:-2])
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError):
            list(client.completions.create(model=engine.model_name, prompt="Hello", max_tokens=8, stream=True))
        metrics = httpx.get(f"{url}/metrics").text
        assert 'status="500"' in metrics


def test_internal_failure_is_500_without_internals_and_logged(engine, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(Settings(), engine=FailingEngine(HFAsyncEngine(engine)))
    with serve_app(app) as url, caplog.at_level(logging.ERROR):
        payload = {"prompt": "Hello", "max_tokens": 8, "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=payload, headers={"X-Request-Id": "req-500"}, timeout=120)
    error = error_of(response, 500)
    assert error["type"] == "internal_error"
    assert "secret" not in response.text and "Traceback" not in response.text
    assert response.headers["x-request-id"] == "req-500"
    failure_logs = [r for r in caplog.records if "req-500" in r.getMessage()]
    assert failure_logs and failure_logs[0].exc_info is not None  # the traceback goes to the log


def request(max_tokens: int = 2) -> GenerationRequest:
    return GenerationRequest(prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def last_event(events: AsyncIterator[TokenDelta | GenerationResult]) -> GenerationResult:
    result = None
    async for event in events:
        result = event
    assert isinstance(result, GenerationResult)
    return result


def test_admission_queue_cancel_and_drain(engine) -> None:
    recorder = RecordingEngine(engine)

    async def scenario() -> tuple[GenerationResult, GenerationResult]:
        scheduler = HFAsyncEngine(recorder, max_concurrency=1, max_queue=2)
        await scheduler.start()
        first, second, abandoned = (scheduler.stream(request()) for _ in range(3))
        assert scheduler.num_waiting == 3
        with pytest.raises(QueueFullError):
            scheduler.stream(request())
        await abandoned.aclose()  # cancelled while queued: must never run
        consumers = [asyncio.create_task(last_event(s)) for s in (first, second)]
        await asyncio.sleep(0)
        await scheduler.shutdown()  # drains: returns only when both have finished
        assert scheduler.num_running == 0 and scheduler.num_waiting == 0
        with pytest.raises(EngineNotReadyError):
            scheduler.stream(request())
        done = await asyncio.gather(*consumers)
        return done[0], done[1]

    first, second = asyncio.run(scenario())
    assert first.finish_reason == second.finish_reason == "length"
    assert first.completion_tokens == second.completion_tokens == 2
    assert len(recorder.results) == 2  # the abandoned request never reached the model
    assert second.metrics.queue_ms > first.metrics.queue_ms  # it waited for the first to finish


def test_two_slots_run_two_requests_at_once(engine) -> None:
    recorder = RecordingEngine(engine)

    async def scenario() -> int:
        scheduler = HFAsyncEngine(recorder, max_concurrency=2, max_queue=0)
        await scheduler.start()
        streams = [scheduler.stream(request(max_tokens=1000)) for _ in range(2)]
        for stream in streams:  # a first token from each: both are generating now
            assert isinstance(await stream.__anext__(), TokenDelta)
        running = scheduler.num_running
        with pytest.raises(QueueFullError):
            scheduler.stream(request())
        for stream in streams:
            await stream.aclose()
        await scheduler.shutdown()  # returns once both cancelled requests have stopped
        return running

    assert asyncio.run(scenario()) == 2
    assert [r.finish_reason for r in recorder.results] == ["cancelled", "cancelled"]


def test_only_the_scheduler_thread_computes_with_several_threads(engine) -> None:
    """The loading thread is held to one OpenMP thread (no team of its own: libgomp then keeps the
    scheduler thread's team spinning between a decode step's small ops); the scheduler thread
    computes with the threads the loader had."""
    import torch

    from server.engine.hf_async import no_openmp_team

    before = torch.get_num_threads()
    with no_openmp_team() as threads:
        assert threads == before and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    seen: list[int] = []

    async def scenario() -> None:
        scheduler = HFAsyncEngine(engine, intra_op_threads=before + 1)  # not this thread's count
        step = scheduler.core.step

        def recording_step() -> None:
            seen.append(torch.get_num_threads())
            step()

        scheduler.core.step = recording_step
        await scheduler.start()
        await last_event(scheduler.stream(request()))
        await scheduler.shutdown()

    asyncio.run(scenario())
    assert seen and set(seen) == {before + 1} and torch.get_num_threads() == before


def test_warm_up_runs_on_the_scheduler_thread_before_the_first_request_is_admitted(engine, monkeypatch) -> None:
    """The warm-up (none and gemfilter once, the engine's own generate) runs on the thread that will
    run every forward, and start() returns, admitting requests, only after it."""
    calls: list[tuple[str, bool]] = []
    warm_up = engine.warm_up

    def recording_warm_up() -> float:
        calls.append((threading.current_thread().name, scheduler.admission.accepting))
        return warm_up()

    monkeypatch.setattr(engine, "warm_up", recording_warm_up)

    async def scenario() -> float | None:
        await scheduler.start()
        assert scheduler.admission.accepting
        result = await last_event(scheduler.stream(request()))
        assert isinstance(result, GenerationResult)
        await scheduler.shutdown()
        return scheduler.warm_up_ms

    scheduler = HFAsyncEngine(engine, warm_up_at_start=True)
    warmed_ms = asyncio.run(scenario())
    assert calls == [("hf-scheduler", False)]  # once, on the scheduler thread, before admitting
    assert warmed_ms is not None and warmed_ms > 0
    calls.clear()

    async def without_warm_up() -> None:  # off unless asked (tests, an app embedding the engine)
        quiet = HFAsyncEngine(engine)
        await quiet.start()
        await quiet.shutdown()

    asyncio.run(without_warm_up())
    assert calls == []


def test_a_failed_warm_up_keeps_the_server_unready_with_the_reason(engine, monkeypatch) -> None:
    def broken_warm_up() -> float:
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(engine, "warm_up", broken_warm_up)
    app = create_app(Settings(), engine=HFAsyncEngine(engine, warm_up_at_start=True))
    with serve_in_background(app, wait_ready=False) as url:
        deadline = time.monotonic() + 30
        while (ready := httpx.get(f"{url}/ready", timeout=5)).json().get("error") is None:
            assert time.monotonic() < deadline, ready.text
            time.sleep(0.05)
    assert ready.status_code == 503
    assert "the warm-up failed: no kernel for this dtype" in ready.json()["error"]


def test_the_warm_up_fits_a_small_context(engine) -> None:
    """A server started with a short --max-model-len still warms up (its prompt fits the context)."""
    import dataclasses

    from server.engine.hf import HFEngine

    for context in (24, 16, 10):
        small = HFEngine(dataclasses.replace(engine.loaded, max_model_len=context))
        assert small.max_model_len == context and small.warm_up() > 0
    assert HFEngine(dataclasses.replace(engine.loaded, max_model_len=3)).warm_up() == 0.0  # no room: skipped


def test_step_trace_has_a_line_per_step_that_adds_up_to_the_requests(engine, tmp_path) -> None:
    """A long prompt arriving while a short one decodes: the traced prefill chunks cover each
    prompt exactly once, some beside a decode token; the decode tokens are every token but each
    request's first (the prefill samples it); the steps follow one another in time."""
    trace = tmp_path / "steps.jsonl"
    prompts = [list(range(100, 140)), list(range(100, 250))]

    async def scenario() -> list[GenerationResult]:
        scheduler = HFAsyncEngine(engine, max_concurrency=2, step_tokens=32, step_trace=trace)
        await scheduler.start()
        sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        first = scheduler.stream(GenerationRequest(prompts[0], sampling))
        assert isinstance(await first.__anext__(), TokenDelta)  # decoding now
        second = scheduler.stream(GenerationRequest(prompts[1], sampling))
        results = [await last_event(first), await last_event(second)]
        await scheduler.shutdown()
        return results

    results = asyncio.run(scenario())
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    assert sum(tokens for line in lines for _, tokens in line["prefill"]) == sum(map(len, prompts))
    assert sum(line["decodes"] for line in lines) == sum(len(r.token_ids) - 1 for r in results)
    assert any(line["decodes"] and line["prefill"] for line in lines)  # a chunk rode beside a decode
    assert all(line["seconds"] > 0 and not line["filter"] and not line["preempted"] for line in lines)
    assert all(a["time"] + a["seconds"] <= b["time"] + 1e-3 for a, b in itertools.pairwise(lines))
