"""The shadow check (``--shadow-fraction``, issue 26): a sample of the greedy compressed answers
rerun with full attention while the batch is idle. It runs only when idle, never changes the
response, and counts agreement (``gemserve_shadow_checks_total``)."""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.engine.hf_async import SHADOW_QUEUE, HFAsyncEngine, RequestStream
from server.engine.types import CompressionSpec, GenerationRequest, GenerationResult, SamplingParams
from server.metrics import ServerMetrics
from server.settings import Settings

COLOURS = ("red", "blue", "green", "yellow", "white", "black", "pink", "gray")
FACTS = " ".join(f"The {c} box holds {i} marbles." for i, c in enumerate(COLOURS))
QUESTION = f"{FACTS} What is the capital of France?"


@pytest.fixture(scope="module")
def prompt(engine) -> list[int]:
    """~100 tokens: long enough for GemFilter at budget 16 or 32 (payoff_ratio 0) to drop most of it."""
    return engine.encode_chat([{"role": "user", "content": QUESTION}])


def request(
    prompt_ids: list[int], method: str = "gemfilter", budget: int | None = 16, **sampling: Any
) -> GenerationRequest:
    sampling.setdefault("max_tokens", 6)
    sampling.setdefault("temperature", 0.0)
    knobs = {"budget": budget, "payoff_ratio": 0.0} if method == "gemfilter" else {}
    return GenerationRequest(list(prompt_ids), SamplingParams(**sampling), CompressionSpec(method=method, knobs=knobs))


async def result_of(stream: RequestStream) -> GenerationResult:
    results = [event async for event in stream if isinstance(event, GenerationResult)]
    assert len(results) == 1
    return results[0]


async def wait_until(condition: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def checks_done(async_engine: HFAsyncEngine) -> int:
    checks, _ = async_engine.shadow_counts()
    return sum(checks.values())


def full_attention_agrees(engine, prompt: list[int], answer: GenerationResult) -> str:
    """What the shadow should find: the same prompt uncompressed, as many tokens (one more after a stop)."""
    max_tokens = answer.completion_tokens + (1 if answer.finish_reason == "stop" else 0)
    full = engine.generate(request(prompt, "none", None, max_tokens=max_tokens))
    return "true" if full.text.strip() == answer.text.strip() else "false"


@pytest.mark.slow
def test_shadow_never_changes_the_response_and_counts_agreement(engine, prompt) -> None:
    budgets = (32, 16)  # on this prompt 32 answers like full attention and 16 does not (either is fine here)

    async def serve(fraction: float) -> tuple[list[GenerationResult], HFAsyncEngine, str]:
        async_engine = HFAsyncEngine(engine, shadow_fraction=fraction)
        metrics = ServerMetrics()
        metrics.bind_engine(async_engine, "served")
        await async_engine.start()
        try:
            # One after the other: the first one's shadow runs while the second arrives.
            results = [await result_of(async_engine.stream(request(prompt, budget=b))) for b in budgets]
            if fraction:
                await wait_until(lambda: checks_done(async_engine) == len(budgets))
        finally:
            await async_engine.shutdown()
        return results, async_engine, metrics.render().decode()

    plain, _, _ = asyncio.run(serve(0.0))
    shadowed, async_engine, exposition = asyncio.run(serve(1.0))

    def answer(r: GenerationResult) -> tuple:
        return r.token_ids, r.text, r.finish_reason, r.compression.kept_tokens, r.prompt_tokens

    assert [answer(r) for r in shadowed] == [answer(r) for r in plain]
    assert all(r.compression.kept_tokens < r.compression.prompt_tokens for r in shadowed)  # compressed: checked
    expected = {}
    for budget, result in zip(budgets, shadowed, strict=True):
        agree = full_attention_agrees(engine, prompt, result)
        expected[("gemfilter", str(budget), agree)] = 1
        expected[("gemfilter", str(budget), "false" if agree == "true" else "true")] = 0  # both series exist
    assert async_engine.shadow_counts() == (expected, {})
    samples = {
        (s.labels["method"], s.labels["budget"], s.labels["agree"]): s.value
        for family in text_string_to_metric_families(exposition)
        if family.name == "gemserve_shadow_checks"
        for s in family.samples
        if s.name == "gemserve_shadow_checks_total" and s.labels["model"] == "served" and s.labels["backend"] == "hf"
    }
    assert samples == expected


def test_shadow_steps_only_while_the_batch_is_idle(engine, prompt) -> None:
    """A shadow step never starts while the batch has work; a request that arrives during one
    runs right after it, and the paused shadow resumes (and is counted) once the batch is idle."""
    async_engine = HFAsyncEngine(engine, shadow_fraction=1.0)
    shadow = async_engine.shadow
    assert shadow is not None
    log: list[tuple[str, bool, bool]] = []  # (core, batch busy when its step began, ... when it ended)
    in_shadow, submitted = threading.Event(), threading.Event()
    user_step, shadow_step = async_engine.core.step, shadow.core.step

    def spy(name: str, step: Callable[[], None]) -> Callable[[], None]:
        def spied() -> None:
            busy = async_engine.core.has_work()
            if name == "shadow" and not in_shadow.is_set():  # hold the first shadow step until a request arrives
                in_shadow.set()
                assert submitted.wait(60)
            step()
            log.append((name, busy, async_engine.core.has_work()))

        return spied

    async_engine.core.step = spy("user", user_step)  # type: ignore[method-assign]
    shadow.core.step = spy("shadow", shadow_step)  # type: ignore[method-assign]

    async def scenario() -> None:
        await async_engine.start()
        try:
            await result_of(async_engine.stream(request(prompt)))  # compressed, greedy: shadowed
            assert await asyncio.to_thread(in_shadow.wait, 60)
            arriving = async_engine.stream(request(prompt, "none", None, max_tokens=3))  # queued in the batch now
            submitted.set()
            await result_of(arriving)
            await wait_until(lambda: checks_done(async_engine) == 1)
        finally:
            submitted.set()
            await async_engine.shutdown()

    asyncio.run(scenario())
    names = [name for name, _, _ in log]
    assert not [entry for entry in log if entry[0] == "shadow" and entry[1]], log  # never began with work waiting
    for entry, following in itertools.pairwise(log):
        if entry[0] == "shadow" and entry[2]:  # a request arrived during it: the batch steps next
            assert following[0] == "user", log
    paused = names.index("shadow")
    resumed = names.index("shadow", paused + 1)
    assert "user" in names[paused:resumed]  # the second request ran between two steps of the shadow
    assert log[paused][2]  # it had arrived during the held step


def test_uncompressed_or_sampled_requests_queue_no_shadow(engine, prompt) -> None:
    async_engine = HFAsyncEngine(engine, shadow_fraction=1.0)
    shadow = async_engine.shadow
    assert shadow is not None
    added: list[GenerationRequest] = []
    add = shadow.core.add

    def spied_add(shadow_request: GenerationRequest, emit: Any) -> str:
        added.append(shadow_request)
        return add(shadow_request, emit)

    shadow.core.add = spied_add  # type: ignore[method-assign]

    async def scenario() -> list[GenerationResult]:
        await async_engine.start()
        try:
            return [
                await result_of(async_engine.stream(r))
                for r in (
                    request(prompt, temperature=0.8, seed=1),  # compressed but sampled: skipped, counted
                    request(prompt, "none", None),  # greedy, uncompressed
                    request(prompt, budget=4096),  # greedy, GemFilter's budget covers the prompt: nothing dropped
                )
            ]
        finally:
            await async_engine.shutdown()

    sampled, uncompressed, covered = asyncio.run(scenario())
    assert sampled.compression.kept_tokens < sampled.compression.prompt_tokens
    assert uncompressed.compression.method == "none"
    assert covered.compression.method == "gemfilter"
    assert covered.compression.kept_tokens == covered.compression.prompt_tokens
    assert added == [] and not shadow.pending
    assert async_engine.shadow_counts() == ({}, {"not_greedy": 1})


def test_queue_is_bounded_and_shutdown_drops_pending_shadows(engine, prompt) -> None:
    """Six compressed answers finish while the batch is busy: four shadows queue, two are skipped;
    shutdown does not wait for the shadows still to run."""
    async_engine = HFAsyncEngine(engine, shadow_fraction=1.0)
    count = SHADOW_QUEUE + 2

    async def scenario() -> None:
        await async_engine.start()
        try:
            streams = [async_engine.stream(request(prompt)) for _ in range(count)]  # one busy stretch
            await asyncio.gather(*(result_of(s) for s in streams))
        finally:
            await async_engine.shutdown()

    asyncio.run(scenario())
    checks, skipped = async_engine.shadow_counts()
    assert skipped.pop("queue_full") == count - SHADOW_QUEUE
    assert sum(checks.values()) + skipped.pop("shutdown", 0) == SHADOW_QUEUE
    assert skipped == {}


def test_the_setting_is_checked(engine) -> None:
    assert Settings().shadow_fraction == 0.0
    assert HFAsyncEngine(engine).shadow is None  # off by default: no second core
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        Settings(shadow_fraction=1.5)
    with pytest.raises(ValidationError, match="hf backend only"):
        Settings(backend="vllm", shadow_fraction=0.1)
    with pytest.raises(ValueError, match="shadow_fraction must be in"):
        HFAsyncEngine(engine, shadow_fraction=-0.1)
