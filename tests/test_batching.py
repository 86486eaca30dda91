"""Continuous batching on the hf backend: batched outputs equal solo ones, cancellation mid-batch,
admission by the batch's token budget, chunked prefill (and filter pass) equal to unchunked."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
import torch

from compressors import build_method
from compressors.attention import build_attention
from compressors.base import Target, drive
from compressors.gemfilter import chunked_filter_pass_scores, filter_pass_scores
from evals.needles import build_case
from server.engine import scheduler as scheduler_module
from server.engine.batch_forward import GrowingLayer, Segment, forward_segments, new_request_cache
from server.engine.hf_async import HFAsyncEngine
from server.engine.scheduler import Scheduler
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


def run_batch(engine, requests: list[GenerationRequest], scheduler: Scheduler, monitor=None) -> list[Recorder]:
    recorders = [Recorder() for _ in requests]
    for req, recorder in zip(requests, recorders, strict=True):
        engine.check_request(req)
        scheduler.add(req, recorder)
    steps = 0
    while scheduler.has_work():
        scheduler.step()
        steps += 1
        if monitor is not None:
            monitor(scheduler, steps)
    return recorders


@pytest.mark.parametrize(
    ("method", "knobs"), [("none", {}), ("gemfilter", {"budget": 192, "payoff_ratio": 0.0, "span": "token"})]
)
def test_batch_of_four_mixed_prompts_equals_each_alone(engine, prompts, method, knobs, monkeypatch) -> None:
    alone = [engine.generate(request(ids, method, knobs, max_tokens=40, ignore_eos=True)) for ids in prompts]

    shared_chunks: list[int] = []  # prefill chunks that rode in a decode forward

    def recording_forward(model, segments):
        shared_chunks.extend(s.length for s in segments if s.length > 1)
        return forward_segments(model, segments)

    monkeypatch.setattr(scheduler_module, "forward_segments", recording_forward)
    batch_sizes: list[int] = []
    scheduler = Scheduler(engine, max_running=4, prefill_chunk_tokens=128)
    batched = run_batch(
        engine,
        [request(ids, method, knobs, max_tokens=40, ignore_eos=True) for ids in prompts],
        scheduler,
        monitor=lambda s, _: batch_sizes.append(s.batch_size),
    )
    assert max(batch_sizes) == 4  # all four decoded in one forward at some step
    assert shared_chunks and max(shared_chunks) <= 128  # later prompts prefilled in chunks, among decodes
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.result is not None
        assert recorder.tokens == solo.token_ids  # token for token
        assert recorder.result.compression.kept_tokens == solo.compression.kept_tokens
    if method == "gemfilter":
        assert all(r.result.compression.kept_tokens == 192 for r in batched)
    # Peak memory under a shared batch says whose it is.
    assert all("whole_process_shared_with_up_to_3_other_requests" in r.result.metrics.memory_source for r in batched)


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
        Scheduler(engine, max_running=4),
    )
    for solo, recorder in zip(alone, batched, strict=True):
        assert recorder.tokens == solo.token_ids
        assert recorder.result.compression.kv_bytes_after == solo.compression.kv_bytes_after


def test_a_request_cancelled_mid_batch_stops_within_one_step(engine, prompts) -> None:
    alone = [engine.generate(request(ids, max_tokens=24, ignore_eos=True)) for ids in prompts[1:]]
    requests = [request(ids, max_tokens=24, ignore_eos=True) for ids in prompts[1:]]
    victim = requests[1]
    at_cancel: list[int] = []

    def cancel_after_five_tokens(scheduler: Scheduler, _: int) -> None:
        if victim.generated_tokens >= 5 and not victim.cancelled.is_set():
            victim.cancelled.set()
            at_cancel.append(victim.generated_tokens)

    recorders = run_batch(engine, requests, Scheduler(engine, max_running=3), monitor=cancel_after_five_tokens)
    cancelled = recorders[1]
    assert cancelled.result is not None and cancelled.result.finish_reason == "cancelled"
    assert len(cancelled.tokens) <= at_cancel[0] + 1  # at most one more token after the cancel
    for index in (0, 2):  # the others finish, exactly as alone
        assert recorders[index].result.finish_reason == "length"
        assert recorders[index].tokens == alone[index].token_ids


def test_budget_counts_compressed_sizes_so_more_requests_run_at_once(engine, prompts) -> None:
    ids = prompts[2]  # ~900 tokens
    budget = 2 * (len(ids) + 16) + 10  # two uncompressed requests fit, not three

    def running_after_admission(method: str, knobs: dict[str, Any]) -> tuple[int, int]:
        scheduler = Scheduler(engine, max_running=8, max_batch_tokens=budget)
        for _ in range(4):
            req = request(ids, method, knobs, max_tokens=16)
            engine.check_request(req)
            scheduler.add(req, Recorder())
        scheduler.admit()
        running, waiting = scheduler.num_running, scheduler.num_waiting
        while scheduler.has_work():  # finish them: nothing is left behind
            scheduler.step()
        return running, waiting

    assert running_after_admission("none", {}) == (2, 2)
    assert running_after_admission("snapkv", {"budget": 256}) == (4, 0)
    assert running_after_admission("gemfilter", {"budget": 256, "payoff_ratio": 0.0}) == (4, 0)


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
            next(running.iter_lines())
            busy = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert busy.status_code == 429 and busy.headers["retry-after"] == "4"
        metrics = client.get("/metrics").text
        for gauge in ("gemserve_batch_size", "gemserve_batch_running_tokens", "gemserve_batch_waiting_tokens"):
            assert f"{gauge}{{" in metrics


def test_chunked_prefill_logits_equal_one_forward(engine, prompts) -> None:
    """Chunks run alone (nobody decoding) and chunks riding in a shared forward with other requests'
    decode tokens both end in the logits of one unchunked prefill."""
    ids = torch.tensor([prompts[0]])
    method = build_method("none")
    others = []
    with torch.inference_mode():
        for n in (5, 30):  # two decoding requests to share the forward with
            cache = new_request_cache(engine.model)
            engine.forward(torch.tensor([prompts[1][:n]]), cache, 0)
            others.append((prompts[1][n], n, cache))

    def last_logits(chunk: int | None, shared: bool = False) -> torch.Tensor:
        cache = new_request_cache(engine.model)
        with torch.inference_mode(), method.attach(engine.model, ids, cache, 1024) as hooks:
            policy = None if chunk is None else (lambda start, remaining: min(chunk, remaining))
            steps = engine.prefill_chunks(hooks, cache, build_attention("dense"), policy)
            logits = None
            while True:
                try:
                    segment = steps.send(logits)
                except StopIteration as done:
                    assert cache.get_seq_length() == ids.shape[1]
                    return done.value
                if not shared:
                    logits = engine.run_chunk(hooks, segment)
                    continue
                decoders = [Segment([token], position, c) for token, position, c in others]
                logits = forward_segments(engine.model, [*decoders, segment])[-1]
                for layer_caches in (c for _, _, c in others):  # keep the others' caches as they were
                    layer_caches.crop(layer_caches.get_seq_length() - 1)

    whole = last_logits(None)
    for chunk in (37, 256):
        torch.testing.assert_close(last_logits(chunk), whole, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_logits(100, shared=True), whole, rtol=1e-4, atol=1e-4)


def test_chunked_filter_pass_scores_and_keeps_what_one_pass_does(engine, prompts) -> None:
    model = engine.model
    ids = torch.tensor([prompts[0]])
    gem = build_method("gemfilter", {"budget": 256, "payoff_ratio": 0.0})
    layer = gem.filter_layer(model)
    one = filter_pass_scores(model, ids, layer, "fused", 32)
    steps = chunked_filter_pass_scores(
        model, ids, layer, "fused", 32, gem.filter_backend(), lambda start, remaining: min(100, remaining)
    )
    count = 0
    while True:
        try:
            next(steps)
            count += 1
        except StopIteration as done:
            chunked = done.value
            break
    assert count == len(prompts[0]) // 100 - 1 or count == len(prompts[0]) // 100  # the last chunk holds >= window
    torch.testing.assert_close(chunked, one, rtol=1e-4, atol=1e-4)
    target = Target(model, ids, None, 1024, engine.tokenizer, lambda start, remaining: min(100, remaining))
    with torch.inference_mode():
        chunked_selection = drive(gem.select_steps(target))
    assert chunked_selection.kept_indices == gem.select(model, ids, 1024, engine.tokenizer).kept_indices


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


def test_async_engine_batches_concurrent_requests(engine, prompts) -> None:
    async def scenario() -> tuple[list[GenerationResult], int]:
        async_engine = HFAsyncEngine(engine, max_concurrency=4, max_queue=4, prefill_chunk_tokens=256)
        await async_engine.start()
        seen_batch = 0

        async def consume(ids: list[int]) -> GenerationResult:
            nonlocal seen_batch
            async for event in async_engine.stream(request(ids, max_tokens=32, ignore_eos=True)):
                seen_batch = max(seen_batch, async_engine.scheduler.batch_size)
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
