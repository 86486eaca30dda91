"""The vllm backend's filter passes (server/engine/filter_passes.py): each runs whole, in one forward
with no cache, and between decoder layers the cores go to the pass with the least work left, so a
short pass never waits behind a long one's whole pass.

No vLLM needed: ``VLLMEngine._select`` runs on the truncated filter model before ``start()``. A
recording hook after the passes' own one sees which pass computes each layer; it can also stop a
pass at a layer until the test has done something, so every test sees the same interleaving
whatever the thread timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from compressors import Method, Selection
from compressors.probe import decoder_layers
from contract.needles import build_case
from contract.protocol import MetricsInfo
from server.engine.filter_model import FilterModel, load_filter_model
from server.engine.filter_passes import FilterPasses
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from server.engine.vllm import VLLMEngine
from server.engine.vllm_setup import VLLMSettings

KNOBS = {"budget": 128, "payoff_ratio": 0.0}


@pytest.fixture(scope="module")
def filter_model(loaded_model) -> FilterModel:
    return load_filter_model(loaded_model.path)


@pytest.fixture(scope="module")
def prompts(engine, count_tokens) -> dict[str, list[int]]:
    sizes = {"long": 1400, "middle": 900, "short": 300}
    cases = {name: build_case(n, depth=0.5, seed=70 + n, count_tokens=count_tokens) for name, n in sizes.items()}
    return {name: engine.encode_chat([{"role": "user", "content": c.user_message()}]) for name, c in cases.items()}


@pytest.fixture
def vllm_engine(filter_model, loaded_model) -> Generator[VLLMEngine, None, None]:
    engine = VLLMEngine("smollm2", Path("."), loaded_model.tokenizer, filter_model, 2048, options=VLLMSettings())
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
    """What the method keeps in one pass on the same filter model, outside the passes."""
    model = vllm_engine.filter_model.model
    selection = method.select(model, torch.tensor([ids]), vllm_engine.default_budget, vllm_engine.tokenizer)
    return selection.kept_indices


@contextmanager
def recording(
    vllm_engine: VLLMEngine, at_layer: Callable[[int, int], None] | None = None
) -> Iterator[list[tuple[int, int]]]:
    """Every layer a pass computes as (its prompt tokens, layer), after the passes' own hook let it
    go on; ``at_layer(tokens, layer)`` runs there too, in the pass's thread."""
    passes = vllm_engine._filter_passes
    seen: list[tuple[int, int]] = []

    def hook(module: Any, args: Any) -> None:
        job = getattr(passes._local, "job", None)
        if job is not None:
            seen.append((job.tokens, int(module.self_attn.layer_idx)))
            if at_layer is not None:
                at_layer(job.tokens, int(module.self_attn.layer_idx))

    handles = [layer.register_forward_pre_hook(hook) for layer in decoder_layers(vllm_engine.filter_model.model)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


async def select(vllm_engine: VLLMEngine, request: GenerationRequest, method: Method) -> Selection:
    return await vllm_engine._select(request, method, MetricsInfo())


def runs(seen: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """``seen`` as (tokens, first layer, last layer) runs of one pass each."""
    out: list[tuple[int, int, int]] = []
    for tokens, layer in seen:
        if out and out[-1][0] == tokens and out[-1][2] == layer - 1:
            out[-1] = (tokens, out[-1][1], layer)
        else:
            out.append((tokens, layer, layer))
    return out


@pytest.mark.slow
def test_a_pass_alone_is_one_whole_forward_equal_to_the_pass_outside(vllm_engine, prompts) -> None:
    request, method = gemfilter_request(vllm_engine, prompts["long"])
    last = vllm_engine.filter_model.max_layer
    with recording(vllm_engine) as seen:
        selection = asyncio.run(select(vllm_engine, request, method))
    n = len(prompts["long"])
    assert runs(seen) == [(n, 0, last)]  # every layer once: no chunks, no second forward
    assert selection.kept_indices == sequential_kept(vllm_engine, method, prompts["long"])
    assert len(selection.kept_indices) == KNOBS["budget"]


@pytest.mark.slow
def test_a_short_pass_takes_the_cores_at_the_next_layer_and_finishes_first(vllm_engine, prompts) -> None:
    long_request, long_method = gemfilter_request(vllm_engine, prompts["long"])
    short_request, short_method = gemfilter_request(vllm_engine, prompts["short"])
    n_long, n_short = len(prompts["long"]), len(prompts["short"])
    long_at_layer_2, short_submitted = threading.Event(), threading.Event()

    def pause_long(tokens: int, layer: int) -> None:
        if tokens == n_long and layer == 2:
            long_at_layer_2.set()
            assert short_submitted.wait(timeout=60)

    async def scenario() -> tuple[list[str], dict[str, Selection]]:
        order: list[str] = []

        async def run(name: str, request: GenerationRequest, method: Method) -> Selection:
            selection = await select(vllm_engine, request, method)
            order.append(name)
            return selection

        long_task = asyncio.create_task(run("long", long_request, long_method))
        await asyncio.to_thread(long_at_layer_2.wait, 60)
        short_task = asyncio.create_task(run("short", short_request, short_method))
        await asyncio.sleep(0)  # the short pass is submitted while the long one computes layer 2
        assert vllm_engine._filter_passes.pending == 2
        short_submitted.set()
        return order, {"long": await long_task, "short": await short_task}

    with recording(vllm_engine, pause_long) as seen:
        order, selections = asyncio.run(scenario())
    last = vllm_engine.filter_model.max_layer
    assert order == ["short", "long"]
    assert runs(seen) == [(n_long, 0, 2), (n_short, 0, last), (n_long, 3, last)]
    assert selections["long"].kept_indices == sequential_kept(vllm_engine, long_method, prompts["long"])
    assert selections["short"].kept_indices == sequential_kept(vllm_engine, short_method, prompts["short"])


def test_a_request_that_runs_no_pass_does_not_wait_for_a_running_one(vllm_engine, prompts) -> None:
    """``none``, or a budget covering the prompt, runs no forward: it gets its selection while a long
    pass is held at a layer, instead of waiting for its turn."""
    long_request, long_method = gemfilter_request(vllm_engine, prompts["long"])
    n_long = len(prompts["long"])
    held, release = threading.Event(), threading.Event()

    def hold_long(tokens: int, layer: int) -> None:
        if tokens == n_long and layer == 1:
            held.set()
            assert release.wait(timeout=60)

    def plain(method: str, **knobs: Any) -> tuple[GenerationRequest, Method]:
        request = GenerationRequest(
            prompt_ids=prompts["middle"],
            sampling=SamplingParams(max_tokens=1),
            compression=CompressionSpec(method=method, knobs=knobs),
        )
        return request, vllm_engine.check_request(request)

    async def scenario() -> list[Selection]:
        long_task = asyncio.create_task(select(vllm_engine, long_request, long_method))
        await asyncio.to_thread(held.wait, 60)
        try:
            quick = [
                await asyncio.wait_for(select(vllm_engine, *plain(method, **knobs)), timeout=30)
                for method, knobs in (("none", {}), ("gemfilter", {"budget": 4096}))
            ]
        finally:
            release.set()
        await long_task
        return quick

    with recording(vllm_engine, hold_long):
        selections = asyncio.run(scenario())
    n = len(prompts["middle"])
    assert [s.kept_indices for s in selections] == [list(range(n))] * 2


def test_queued_passes_run_least_work_first_and_cancelled_ones_never_compute(vllm_engine, prompts) -> None:
    """A gate pass holds the cores while three queue; the middle one is cancelled while it waits, the
    long one during its first layer: it stops at its next one. The short one runs whole."""
    requests = {name: gemfilter_request(vllm_engine, prompts[name]) for name in ("long", "middle", "short")}
    n = {name: len(ids) for name, ids in prompts.items()}
    passes = vllm_engine._filter_passes
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        assert gate.wait(timeout=60)

    def cancel_long(tokens: int, layer: int) -> None:
        if tokens == n["long"] and layer == 0:
            requests["long"][0].cancelled.set()

    async def scenario() -> tuple[list[str], dict[str, Selection]]:
        gate_pass = passes.submit(hold, 0, 0, threading.Event(), lambda: None)
        await asyncio.to_thread(started.wait, 60)
        order: list[str] = []

        async def run(name: str) -> Selection:
            selection = await select(vllm_engine, *requests[name])
            order.append(name)
            return selection

        tasks = {name: asyncio.create_task(run(name)) for name in ("long", "middle", "short")}
        await asyncio.sleep(0)  # all three submitted behind the gate
        assert passes.pending == 4
        requests["middle"][0].cancelled.set()
        gate.set()
        await gate_pass
        return order, {name: await task for name, task in tasks.items()}

    with recording(vllm_engine, cancel_long) as seen:
        order, selections = asyncio.run(scenario())
    last = vllm_engine.filter_model.max_layer
    assert order[0] == "middle"  # dropped first: it only had to leave
    assert runs(seen) == [(n["short"], 0, last), (n["long"], 0, 0)]
    for name in ("long", "middle"):  # keeps everything: no selection was made
        assert selections[name].kept_indices == list(range(n[name]))
        assert selections[name].layer is None
    _, method = requests["short"]
    assert selections["short"].kept_indices == sequential_kept(vllm_engine, method, prompts["short"])


def test_close_drains_pending_passes_and_errors_reach_the_caller(filter_model) -> None:
    passes = FilterPasses(filter_model.model, lambda: 1)

    def failing() -> None:
        raise RuntimeError("filter pass failed")

    async def scenario() -> tuple[list[Any], BaseException | None]:
        futures = [passes.submit(lambda n=n: n, 1, 1, threading.Event(), lambda: None) for n in (3, 1, 5)]
        failure = passes.submit(failing, 1, 1, threading.Event(), lambda: None)
        await asyncio.to_thread(passes.close)  # returns once every pending pass has ended
        await asyncio.sleep(0)  # the results are settled on this loop
        assert all(f.done() for f in futures) and failure.done()
        with pytest.raises(RuntimeError, match="shut down"):
            passes.submit(lambda: 0, 1, 1, threading.Event(), lambda: None)
        results = [await f for f in futures]
        try:
            await failure
        except RuntimeError as exc:
            return results, exc
        return results, None

    results, error = asyncio.run(scenario())
    assert results == [3, 1, 5]
    assert error is not None and "failed" in str(error)
    assert all(not layer._forward_pre_hooks for layer in decoder_layers(filter_model.model))  # hooks removed


def test_each_turn_sets_the_heap_for_its_pass_and_the_last_pass_releases_it(filter_model, monkeypatch) -> None:
    """One pass computes at a time, so the heap's threshold follows the running pass's size
    (server/allocator.py); when no pass is left, the heap's free pages go back."""
    import server.engine.filter_passes as filter_passes

    events: list[tuple[str, int]] = []
    monkeypatch.setattr(filter_passes, "heap_for_step", lambda tokens: events.append(("heap", tokens)))
    monkeypatch.setattr(filter_passes, "release_free_heap", lambda: events.append(("release", 0)) or True)
    passes = FilterPasses(filter_model.model, lambda: 1)

    async def scenario() -> None:
        for tokens in (8000, 300):
            await passes.submit(lambda: None, tokens, 1, threading.Event(), lambda: None)
        await asyncio.to_thread(passes.close)

    asyncio.run(scenario())
    assert [tokens for kind, tokens in events if kind == "heap"] == [8000, 300]
    # The first pass's worker may still be ending when the second is submitted: then only the
    # last one finds nothing left to run.
    assert events[-1] == ("release", 0) and events.count(("release", 0)) in (1, 2)
