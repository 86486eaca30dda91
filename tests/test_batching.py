"""Continuous batching on the hf backend (scheduler + model runner): batched outputs equal solo
ones (with preemptions forced too), cancellation mid-batch, admission by the batch's memory,
chunked prefill (and filter pass) equal to unchunked."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import torch

from compressors import build_method
from compressors.base import Target
from compressors.gemfilter import ResumableFilterPass, filter_pass_scores
from contract.needles import build_case
from server.engine import runner as runner_module
from server.engine.batch_forward import GrowingLayer, Segment, forward_segments, make_room, new_request_cache
from server.engine.core import EngineCore
from server.engine.hf_async import HFAsyncEngine
from server.engine.runner import forward_ids
from server.engine.types import GenerationRequest, GenerationResult, TokenDelta
from tests.conftest import serve_app
from tests.test_engine import request


@pytest.fixture(scope="module")
def prompts(engine, count_tokens) -> list[list[int]]:
    """Four needle prompts of mixed lengths (~200 to ~1400 tokens)."""
    cases = [build_case(n, depth=0.4, seed=40 + n, count_tokens=count_tokens) for n in (1400, 200, 900, 500)]
    return [engine.encode_chat([{"role": "user", "content": c.user_message()}]) for c in cases]


class Recorder:
    """The scheduler's emit target for one request; and what every step did."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.result: GenerationResult | None = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, TokenDelta) and event.token_id >= 0:
            self.tokens.append(event.token_id)
        elif isinstance(event, GenerationResult):
            self.result = event


def run_batch(engine, requests: list[GenerationRequest], core: EngineCore, monitor=None) -> list[Recorder]:
    recorders = [Recorder() for _ in requests]
    for req, recorder in zip(requests, recorders, strict=True):
        engine.check_request(req)
        core.add(req, recorder)
    steps = 0
    while core.has_work():
        core.step()
        steps += 1
        if monitor is not None:
            monitor(core, steps)
    return recorders


@pytest.mark.parametrize(
    ("method", "knobs"),
    [
        ("none", {}),
        ("gemfilter", {"budget": 192, "payoff_ratio": 0.0, "span": "token"}),
        ("gemfilter", {"budget": 192, "payoff_ratio": 0.0, "positions": "original"}),
    ],
)
@pytest.mark.slow
def test_batch_of_four_mixed_prompts_equals_each_alone(engine, prompts, method, knobs, monkeypatch) -> None:
    alone = [engine.generate(request(ids, method, knobs, max_tokens=40, ignore_eos=True)) for ids in prompts]

    shared_chunks: list[int] = []  # prefill chunks that rode in a decode forward

    def recording_forward(model, segments):
        if any(s.length == 1 for s in segments):  # someone decodes in this forward
            shared_chunks.extend(s.length for s in segments if s.length > 1)
        return forward_segments(model, segments)

    monkeypatch.setattr(runner_module, "forward_segments", recording_forward)
    batch_sizes: list[int] = []
    batched = run_batch(
        engine,
        [request(ids, method, knobs, max_tokens=40, ignore_eos=True) for ids in prompts],
        engine.new_core(max_running=4, step_tokens=128, idle_budget=256),
        monitor=lambda s, _: batch_sizes.append(s.batch_size),
    )
    assert max(batch_sizes) == 4  # all four ran in one step at some point
    assert shared_chunks and max(shared_chunks) <= 128  # later prompts prefilled in chunks, among decodes
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.result is not None
        assert recorder.tokens == solo.token_ids  # token for token
        assert recorder.result.compression.kept_tokens == solo.compression.kept_tokens
    if method == "gemfilter":
        assert all(r.result.compression.kept_tokens == 192 for r in batched)
    # Peak memory under a shared batch says whose it is.
    assert all("whole_process_shared_with_up_to_3_other_requests" in r.result.metrics.memory_source for r in batched)


@pytest.mark.slow
def test_kv_methods_decode_in_the_batch_and_h2o_alone(engine, prompts) -> None:
    """SnapKV / StreamingLLM caches share the decode forward; H2O (which reads the decode attention)
    decodes in its own forward in the same steps. Each equals its solo run."""
    specs = [("snapkv", {"budget": 128}), ("streamingllm", {"budget": 96}), ("h2o", {"budget": 128}), ("none", {})]
    alone = [
        engine.generate(request(ids, m, k, max_tokens=10, ignore_eos=True))
        for ids, (m, k) in zip(prompts, specs, strict=True)
    ]
    batched = run_batch(
        engine,
        [request(ids, m, k, max_tokens=10, ignore_eos=True) for ids, (m, k) in zip(prompts, specs, strict=True)],
        engine.new_core(max_running=4),
    )
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.tokens == solo.token_ids
        assert recorder.result.compression.kv_bytes_after == solo.compression.kv_bytes_after


@pytest.mark.slow
def test_a_request_cancelled_mid_batch_stops_within_one_step(engine, prompts) -> None:
    alone = [engine.generate(request(ids, max_tokens=24, ignore_eos=True)) for ids in prompts[1:]]
    requests = [request(ids, max_tokens=24, ignore_eos=True) for ids in prompts[1:]]
    victim = requests[1]
    at_cancel: list[int] = []

    def cancel_after_five_tokens(core: EngineCore, _: int) -> None:
        if victim.generated_tokens >= 5 and not victim.cancelled.is_set():
            victim.cancelled.set()
            at_cancel.append(victim.generated_tokens)

    recorders = run_batch(engine, requests, engine.new_core(max_running=3), monitor=cancel_after_five_tokens)
    cancelled = recorders[1]
    assert cancelled.result is not None and cancelled.result.finish_reason == "cancelled"
    assert len(cancelled.tokens) <= at_cancel[0] + 1  # at most one more token after the cancel
    for index in (0, 2):  # the others finish, exactly as alone
        assert recorders[index].result.finish_reason == "length"
        assert recorders[index].tokens == alone[index].token_ids


@pytest.mark.slow
def test_memory_counts_compressed_sizes_so_more_requests_run_at_once(engine, prompts) -> None:
    ids = prompts[2]  # ~900 tokens
    budget = 2 * (len(ids) + 16) + 10  # two uncompressed prompts fit, not three

    def running_after_admission(method: str, knobs: dict[str, Any]) -> tuple[int, int]:
        core = engine.new_core(max_running=8, max_batch_tokens=budget)
        for _ in range(4):
            req = request(ids, method, knobs, max_tokens=16)
            engine.check_request(req)
            core.add(req, Recorder())
        core.step()  # admits, runs the first step
        running, waiting = core.num_running, core.num_waiting
        while core.has_work():  # finish them: nothing is left behind
            core.step()
        return running, waiting

    assert running_after_admission("none", {}) == (2, 2)
    assert running_after_admission("snapkv", {"budget": 256}) == (4, 0)
    # While its pass runs a GemFilter request holds the pass's cache (layers 0..4 of 30 here: less
    # than the 256 kept tokens); then the kept tokens, which fit 4 times.
    assert running_after_admission("gemfilter", {"budget": 256, "payoff_ratio": 0.0, "layer": 4}) == (4, 0)


@pytest.mark.slow
def test_requests_grow_as_they_decode_and_the_newest_is_preempted_then_recomputed(engine, prompts) -> None:
    """A memory budget the batch outgrows while decoding: the newest request is preempted (its cache
    dropped), recomputed when room frees up, and every output still equals its solo run: a
    chunkable prefill re-runs the generated tokens in its chunks, a KV method (whole prefill)
    re-feeds them in decode steps, a GemFilter request re-runs its pass and picks the same tokens
    (here at their places in the prompt: the replayed tokens go on after it)."""
    specs = [
        (prompts[1], "none", {}),
        (prompts[3], "gemfilter", {"budget": 128, "payoff_ratio": 0.0, "positions": "original"}),
        (prompts[2], "snapkv", {"budget": 128}),
        (prompts[0], "h2o", {"budget": 96}),
    ]
    alone = [engine.generate(request(ids, m, k, max_tokens=24, ignore_eos=True)) for ids, m, k in specs]
    batch = [request(ids, m, k, max_tokens=24, ignore_eos=True) for ids, m, k in specs]
    sizes = [len(specs[0][0]), 128, 128, 96]
    budget = sum(sizes) + 20  # every prompt fits; not every prompt plus its 24 tokens
    core = engine.new_core(max_running=4, max_batch_tokens=max(budget, len(specs[1][0]) + 10), step_tokens=64)
    held: list[int] = []
    batched = run_batch(engine, batch, core, monitor=lambda c, _: held.append(c.running_tokens))
    assert core.preemptions >= 1
    assert max(held) <= core.scheduler.max_batch_tokens
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.result is not None and recorder.result.finish_reason == "length"
        assert recorder.tokens == solo.token_ids
        assert recorder.result.compression.kept_tokens == solo.compression.kept_tokens


@pytest.mark.slow
def test_a_request_at_its_prompt_positions_is_preempted_and_replayed_after_the_prompt(
    engine, prompts, monkeypatch
) -> None:
    """GemFilter with positions='original', the newest request, preempted mid-decode by a budget its
    growth outruns: recomputed, its generated tokens replayed at n, n+1... (not after the kept
    tokens), and every token equal to its solo run."""
    knobs = {"budget": 128, "payoff_ratio": 0.0, "positions": "original"}
    specs = [(prompts[1], "none", {}), (prompts[3], "gemfilter", knobs)]
    alone = [engine.generate(request(ids, m, k, max_tokens=220, ignore_eos=True)) for ids, m, k in specs]
    freed: list[str] = []
    free = engine.runner.free

    def recording_free(request_id: str) -> None:
        freed.append(request_id)
        free(request_id)

    monkeypatch.setattr(engine.runner, "free", recording_free)
    core = engine.new_core(max_running=2, max_batch_tokens=740, step_tokens=64)  # 420 + 348 entries at the end
    recorders = [Recorder(), Recorder()]
    request_ids = []
    for (ids, method, method_knobs), recorder in zip(specs, recorders, strict=True):
        batched = request(ids, method, method_knobs, max_tokens=220, ignore_eos=True)
        engine.check_request(batched)
        request_ids.append(core.add(batched, recorder))
    while core.has_work():
        core.step()
    assert request_ids[1] in freed  # the GemFilter request was the one preempted
    for solo, recorder in zip(alone, recorders, strict=True):
        assert recorder.tokens == solo.token_ids


def test_admission_400_for_a_request_that_can_never_fit_and_429_when_full(engine, prompts) -> None:
    ids = prompts[2]
    budget = len(ids)  # the whole prompt fits, not the prompt plus its max_tokens
    async_engine = HFAsyncEngine(engine, max_concurrency=1, max_queue=0, retry_after_s=4, max_batch_tokens=budget)
    from server.app import create_app
    from server.settings import Settings

    app = create_app(Settings(max_concurrency=1, max_queue=0), engine=async_engine)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        too_big = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 16})
        assert too_big.status_code == 400
        error = too_big.json()["error"]
        assert error["param"] == "max_tokens" and f"max_batch_tokens={budget}" in error["message"]
        # The same prompt compressed fits: the budget counts the kept tokens.
        fits = client.post(
            "/v1/completions",
            json={"prompt": ids, "max_tokens": 4, "compression": {"method": "gemfilter", "budget": 256}},
        )
        assert fits.status_code == 200, fits.text
        assert fits.json()["compression"]["kept_tokens"] == 256
        with client.stream(
            "POST", "/v1/completions", json={"prompt": "Hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
        ) as running:
            # Keep the line iterator: a dropped one closes the response, the server sees the client
            # leave and cancels the stream, and the busy request then fits.
            stream_lines = running.iter_lines()
            first = next(stream_lines)
            assert running.status_code == 200, (running.status_code, first)
            busy = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            counts = (async_engine.admission.running, async_engine.admission.waiting, first)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "4", counts
        metrics = client.get("/metrics").text
        for gauge in (
            "gemserve_batch_size",
            "gemserve_batch_running_tokens",
            "gemserve_batch_waiting_tokens",
            "gemserve_batch_preemptions_total",
        ):
            assert f"{gauge}{{" in metrics


@pytest.mark.slow
def test_chunked_prefill_logits_equal_one_forward(engine, prompts) -> None:
    """Chunks run alone (nobody decoding) and chunks riding in a shared forward with other requests'
    decode tokens both end in the logits of one unchunked prefill."""
    ids = prompts[0]
    others = []
    with torch.inference_mode():
        for n in (5, 30):  # two decoding requests to share the forward with
            cache = new_request_cache(engine.model)
            engine.forward(torch.tensor([prompts[1][:n]]), cache, 0)
            others.append((prompts[1][n], n, cache))

    def last_logits(chunk: int, shared: bool = False) -> torch.Tensor:
        cache = new_request_cache(engine.model)
        with torch.inference_mode():
            for start in range(0, len(ids), chunk):
                part = ids[start : start + chunk]
                if not shared:
                    logits = forward_ids(engine.model, torch.tensor([part]), cache, start)
                    continue
                decoders = [Segment([token], position, c) for token, position, c in others]
                logits = forward_segments(engine.model, [*decoders, Segment(part, start, cache)])[-1]
                for layer_caches in (c for _, _, c in others):  # keep the others' caches as they were
                    layer_caches.crop(layer_caches.get_seq_length() - 1)
        assert cache.get_seq_length() == len(ids)
        return logits

    whole = last_logits(len(ids))
    for chunk in (37, 256):
        torch.testing.assert_close(last_logits(chunk), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_logits(100, shared=True), whole, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_chunked_filter_pass_scores_and_keeps_what_one_pass_does(engine, prompts) -> None:
    model = engine.model
    ids = torch.tensor([prompts[0]])
    n = ids.shape[1]
    gem = build_method("gemfilter", {"budget": 256, "payoff_ratio": 0.0})
    layer = gem.filter_layer(model)
    one = filter_pass_scores(model, ids, layer, "fused", 32)
    resumable = ResumableFilterPass(model, ids, layer, "fused", 32, gem.filter_backend())
    starts = list(range(0, n - 100 - 32, 100))
    with torch.inference_mode():
        for start in starts:
            resumable.run(start, 100)
            assert resumable.scores is None  # only the last chunk scores
        with pytest.raises(ValueError, match="fewer than 32"):  # a last chunk must hold the scored window
            resumable.run(resumable.done, n - resumable.done - 1)
        resumable.run(resumable.done, n - resumable.done)
    assert resumable.scores is not None
    torch.testing.assert_close(resumable.scores, one, rtol=1e-4, atol=1e-4)
    preparation = gem.prepare(Target(model, ids, None, 1024, engine.tokenizer))
    assert (preparation.filter_tokens, preparation.filter_layers, preparation.filter_tail) == (n, layer + 1, 32)
    with torch.inference_mode():
        for start in range(0, n - 100 - 32, 100):
            preparation.run_filter(start, 100)
        preparation.run_filter(preparation.filter_pass.done, n - preparation.filter_pass.done)
    chunked = preparation.attachment().selection
    assert chunked.kept_indices == gem.select(model, ids, 1024, engine.tokenizer).kept_indices


def test_ragged_decode_equals_each_cache_alone(loaded_model) -> None:
    """One forward over three caches of different lengths gives each request's own logits."""
    model = loaded_model.model
    torch.manual_seed(0)
    lengths = (5, 40, 17)
    prompts = [torch.randint(100, 5000, (1, n)) for n in lengths]
    solo_caches, batch_caches, tokens = [], [], []
    with torch.inference_mode():
        for ids in prompts:
            for caches in (solo_caches, batch_caches):
                cache = new_request_cache(model)
                logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
                caches.append(cache)
            tokens.append(int(logits.argmax()))
        decoders = [Segment([t], n, c) for t, n, c in zip(tokens, lengths, batch_caches, strict=True)]
        batched = forward_segments(model, decoders)
        for i, (cache, n) in enumerate(zip(solo_caches, lengths, strict=True)):
            solo = model(
                input_ids=torch.tensor([[tokens[i]]]),
                past_key_values=cache,
                position_ids=torch.tensor([[n]]),
                use_cache=True,
            ).logits[0, -1]
            torch.testing.assert_close(batched[i], solo, rtol=1e-4, atol=1e-4)
            assert batch_caches[i].get_seq_length() == n + 1


def test_growing_layer_writes_in_place_and_drops_its_buffer_when_pruned() -> None:
    layer = GrowingLayer()
    keys = torch.randn(1, 2, 10, 4)
    layer.update(keys, keys.clone())
    buffer = layer._key_buffer
    assert buffer is not None and buffer.shape[-2] == 10 + GrowingLayer.SLACK
    step = torch.randn(1, 2, 1, 4)
    full_keys, _ = layer.update(step, step.clone())
    assert layer._key_buffer is buffer  # no copy of the layer per decode step
    torch.testing.assert_close(full_keys, torch.cat([keys, step], dim=-2))
    layer.keys = full_keys[:, :, :3].clone()  # what a KV pruner's gather does
    assert layer._key_buffer is None  # the unpruned buffer is not kept alive
    assert layer.get_seq_length() == 3


@pytest.mark.parametrize("room", [0, 2000], ids=["grows-by-an-eighth", "room-made"])
def test_a_chunked_prefill_with_room_made_never_copies_its_layer(loaded_model, room: int) -> None:
    """The runner makes room for a chunked prefill's whole prompt: 30 chunks of 64 tokens write into
    one buffer per layer; without it the layer is copied to a new buffer as it grows."""
    cache = new_request_cache(loaded_model.model)
    make_room(cache, room)
    layers = [layer for layer in cache.layers if isinstance(layer, GrowingLayer)]
    assert layers
    chunks = [torch.randn(1, 2, 64, 4) for _ in range(30)]
    buffers: list[torch.Tensor] = []  # held, so a freed buffer's address is not handed out again
    for chunk in chunks:
        for layer in layers[:2]:
            layer.update(chunk, chunk.clone())
            if not any(layer._key_buffer is b for b in buffers):
                buffers.append(layer._key_buffer)
    torch.testing.assert_close(layers[0].keys, torch.cat(chunks, dim=-2))
    if room:
        assert len(buffers) == 2, "one buffer per layer"
    else:  # 64 -> 320 entries, then 640, 960, 1280, 1600, 1920: six buffers per layer
        assert len(buffers) == 2 * 6


@pytest.mark.slow
def test_async_engine_batches_concurrent_requests(engine, prompts) -> None:
    async def scenario() -> tuple[list[GenerationResult], int]:
        async_engine = HFAsyncEngine(engine, max_concurrency=4, max_queue=4, step_tokens=256)
        await async_engine.start()
        seen_batch = 0

        async def consume(ids: list[int]) -> GenerationResult:
            nonlocal seen_batch
            async for event in async_engine.stream(request(ids, max_tokens=32, ignore_eos=True)):
                seen_batch = max(seen_batch, async_engine.core.batch_size)
                if isinstance(event, GenerationResult):
                    return event
            raise AssertionError("no result")

        results = await asyncio.gather(*(consume(ids) for ids in prompts[1:]))
        await async_engine.shutdown()
        return list(results), seen_batch

    results, seen_batch = asyncio.run(scenario())
    assert seen_batch == 3
    assert [r.completion_tokens for r in results] == [32, 32, 32]
    assert all(r.metrics.queue_ms >= 0 and r.metrics.itl_p50_ms > 0 for r in results)
