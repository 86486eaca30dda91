"""The vllm backend's filter passes interleave, a chunk each, in one worker thread
(server/engine/filter_passes.py): a short pass no longer waits behind a long one's whole pass.

No vLLM needed: ``VLLMEngine._select`` runs on the truncated filter model before ``start()``.
A gate pass holds the worker while the passes under test queue up, so every test sees them all
pending at once, whatever the thread timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

import pytest
import torch

from compressors import Method, Selection
from evals.needles import build_case
from server.engine.filter_model import FilterModel, load_filter_model
from server.engine.filter_passes import DEFAULT_CHUNK_TOKENS, FilterPasses
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from server.engine.vllm import VLLMEngine
from server.engine.vllm_setup import VLLMSettings
from server.protocol import MetricsInfo

KNOBS = {"budget": 128, "payoff_ratio": 0.0}


@pytest.fixture(scope="module")
def filter_model(loaded_model) -> FilterModel:
    return load_filter_model(loaded_model.path)


@pytest.fixture(scope="module")
def prompts(engine, count_tokens) -> dict[str, list[int]]:
    """Three needle prompts: a long one (several chunks), a middle one and a short one (one chunk)."""
    sizes = {"long": 1400, "middle": 900, "short": 300}
    cases = {name: build_case(n, depth=0.5, seed=70 + n, count_tokens=count_tokens) for name, n in sizes.items()}
    ids = {name: engine.encode_chat([{"role": "user", "content": c.user_message()}]) for name, c in cases.items()}
    assert ids["short"] and len(ids["short"]) <= DEFAULT_CHUNK_TOKENS < len(ids["long"])
    return ids


@pytest.fixture
def vllm_engine(filter_model, loaded_model) -> Generator[VLLMEngine, None, None]:
    settings = VLLMSettings(filter_chunk_tokens=DEFAULT_CHUNK_TOKENS)  # whatever the environment says
    engine = VLLMEngine("smollm2", Path("."), loaded_model.tokenizer, filter_model, 2048, options=settings)
    yield engine
    engine._filter_passes.close()


def gemfilter_request(vllm_engine: VLLMEngine, ids: list[int]) -> tuple[GenerationRequest, Method]:
    request = GenerationRequest(
        prompt_ids=ids,
        sampling=SamplingParams(max_tokens=1),
        compression=CompressionSpec(method="gemfilter", knobs=KNOBS),
    )
    return request, vllm_engine.check_request(request)


def sequential_kept(vllm_engine: VLLMEngine, method: Method, ids: list[int]) -> list[int]:
    """What the method keeps in one unchunked pass on the same filter model."""
    model = vllm_engine.filter_model.model
    selection = method.select(model, torch.tensor([ids]), vllm_engine.default_budget, vllm_engine.tokenizer)
    return selection.kept_indices


def hold(started: threading.Event, gate: threading.Event) -> Generator[None, None, None]:
    """A pass whose first step blocks the worker until ``gate`` opens."""
    started.set()
    assert gate.wait(timeout=60)
    return
    yield


def record_chunks(monkeypatch, passes: FilterPasses, on_chunk: Callable[[int, int], None] | None = None):
    """Record every chunk policy call as (prompt length, start, size)."""
    chunks: list[tuple[int, int, int]] = []
    policy = passes.chunk_tokens

    def recording(start: int, remaining: int) -> int:
        size = policy(start, remaining)
        chunks.append((start + remaining, start, size))
        if on_chunk is not None:
            on_chunk(start, remaining)
        return size

    monkeypatch.setattr(passes, "chunk_tokens", recording)
    return chunks


async def select_all(vllm_engine: VLLMEngine, requests: dict[str, tuple[GenerationRequest, Method]], before_gate):
    """Queue every request's pass behind a gate, run ``before_gate``, open it; the selections and
    the order they completed in."""
    started, gate = threading.Event(), threading.Event()
    gate_pass = vllm_engine._filter_passes.submit(hold(started, gate), threading.Event(), lambda: None)
    await asyncio.to_thread(started.wait, 60)
    order: list[str] = []

    async def select(name: str) -> Selection:
        request, method = requests[name]
        selection = await vllm_engine._select(request, method, MetricsInfo())
        order.append(name)
        return selection

    tasks = {name: asyncio.create_task(select(name)) for name in requests}
    await asyncio.sleep(0)  # every task submits its pass, in order, before the gate opens
    assert vllm_engine._filter_passes.pending == len(requests)
    before_gate()
    gate.set()
    await gate_pass
    selections = {name: await task for name, task in tasks.items()}
    return selections, order


def test_short_pass_submitted_after_a_long_one_finishes_first(vllm_engine, prompts, monkeypatch) -> None:
    chunks = record_chunks(monkeypatch, vllm_engine._filter_passes)
    requests = {name: gemfilter_request(vllm_engine, prompts[name]) for name in ("long", "short")}
    selections, order = asyncio.run(select_all(vllm_engine, requests, lambda: None))

    assert order == ["short", "long"]
    n_long, n_short = len(prompts["long"]), len(prompts["short"])
    # The long pass took one chunk while the short one waited, then its other chunks alone.
    size = DEFAULT_CHUNK_TOKENS
    assert n_short <= size < n_long
    rest = [(n_long, start, min(size, n_long - start)) for start in range(size, n_long, size)]
    assert chunks == [(n_long, 0, size), (n_short, 0, n_short), *rest]
    for name, (_, method) in requests.items():
        assert len(selections[name].kept_indices) == KNOBS["budget"]
        assert selections[name].kept_indices == sequential_kept(vllm_engine, method, prompts[name])


def test_cancelled_pass_never_completes_and_the_others_finish(vllm_engine, prompts, monkeypatch) -> None:
    requests = {name: gemfilter_request(vllm_engine, prompts[name]) for name in ("long", "middle", "short")}
    n_long = len(prompts["long"])

    def cancel_long_mid_pass(start: int, remaining: int) -> None:
        if start + remaining == n_long:  # during its first chunk: dropped before the second
            requests["long"][0].cancelled.set()

    chunks = record_chunks(monkeypatch, vllm_engine._filter_passes, cancel_long_mid_pass)
    cancel_middle = requests["middle"][0].cancelled.set  # while pending: never starts
    selections, order = asyncio.run(select_all(vllm_engine, requests, cancel_middle))

    # Turns: long's first chunk (cancelled meanwhile), middle dropped unstarted, short whole, long dropped.
    assert order == ["middle", "short", "long"]
    lengths = [n for n, _, _ in chunks]
    assert lengths.count(n_long) == 1 and len(prompts["middle"]) not in lengths
    for name in ("long", "middle"):  # keeps everything: no selection was made
        assert selections[name].kept_indices == list(range(len(prompts[name])))
        assert selections[name].layer is None
    _, method = requests["short"]
    assert selections["short"].kept_indices == sequential_kept(vllm_engine, method, prompts["short"])
    assert len(selections["short"].kept_indices) == KNOBS["budget"]


def counting(steps: int, result: Any) -> Generator[None, None, Any]:
    for _ in range(steps):
        yield
    return result


def failing() -> Generator[None, None, None]:
    yield
    raise RuntimeError("filter pass failed")


def test_close_drains_pending_passes_and_errors_reach_the_caller() -> None:
    passes = FilterPasses(lambda: 1, chunk_tokens=4)

    async def scenario() -> tuple[list[Any], BaseException | None]:
        futures = [passes.submit(counting(n, n), threading.Event(), lambda: None) for n in (3, 1, 5)]
        failure = passes.submit(failing(), threading.Event(), lambda: None)
        await asyncio.to_thread(passes.close)  # returns once every pending pass has ended
        assert all(f.done() for f in futures) and failure.done()
        with pytest.raises(RuntimeError, match="shut down"):
            passes.submit(counting(0, 0), threading.Event(), lambda: None)
        results = [await f for f in futures]
        try:
            await failure
        except RuntimeError as exc:
            return results, exc
        return results, None

    results, error = asyncio.run(scenario())
    assert results == [3, 1, 5]
    assert error is not None and "failed" in str(error)


def test_chunk_policy_is_one_fixed_chunk_alone_or_not() -> None:
    passes = FilterPasses(lambda: 1, chunk_tokens=512)
    assert passes.chunk_tokens(0, 2000) == 512  # alone: a pass that arrives waits one chunk at most
    passes._pending.append(object())  # type: ignore[arg-type]  # another pass waits
    assert passes.chunk_tokens(0, 2000) == 512
    assert passes.chunk_tokens(1800, 200) == 200
