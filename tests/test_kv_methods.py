"""SnapKV, H2O, StreamingLLM and PyramidKV: what they keep, how the cache shrinks, and errors.

Scoring is checked against a slow reference built from explicit attention weights of a small
random Llama (eager attention, ``output_attentions=True``); cache shapes and decode-time eviction
run through the engine's own hook calls; the needle tests use the real model.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicCache

from compressors import CompressionError, build_method
from compressors.base import KVAttachment, Target, cache_bytes
from compressors.kv_pruner import ScoredKVPruner
from compressors.probe import active_probe, decoder_layers, install_probe_attention
from compressors.pyramidkv import pyramid_budgets
from compressors.units import MAX_SENTENCE_TOKENS, chunk_starts, pick_whole_units, sentence_starts
from contract.needles import build_case
from server.engine.hf import HFEngine
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams
from server.models import LoadedModel
from tests.test_units import units_of

TINY_VOCAB = 128


# ---- a small random Llama: 2 layers, 4 query heads sharing 2 KV heads -----------------------
@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.2,  # peaky attention, so top-k has no near-ties
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tiny_ids() -> torch.Tensor:
    return torch.randint(0, TINY_VOCAB, (1, 96), generator=torch.Generator().manual_seed(1))


def eager_attentions(model: LlamaForCausalLM, ids: torch.Tensor) -> list[torch.Tensor]:
    """Reference attention weights ``(heads, n, n)`` per layer from eager attention."""
    model.set_attn_implementation("eager")
    with torch.inference_mode():
        out = model(ids, output_attentions=True)
    return [a[0].float() for a in out.attentions]


def prefill_and_compress(model, ids: torch.Tensor, method: ScoredKVPruner, default_budget: int = 1024, tokenizer=None):
    """The method attached to one prefill of any model, as the engine attaches it: the cache and
    the attachment (its selection, and its state: what the cache holds)."""
    install_probe_attention(model)
    cache = DynamicCache(config=model.config)
    n = int(ids.shape[1])
    with (
        torch.inference_mode(),
        method.attach(model, ids, cache, default_budget, tokenizer) as hooks,
        hooks.prefill(),
    ):
        model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(n).unsqueeze(0), use_cache=True)
    return cache, hooks


def full_cache(model, ids: torch.Tensor) -> DynamicCache:
    install_probe_attention(model)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache


def assert_top_k(kept: list[set[int]], scores: torch.Tensor, keep: int, forced: list[int]) -> None:
    """Per KV head: the forced entries plus ``keep - len(forced)`` others that no dropped entry
    outscores (max pooling makes exact ties, so any tie-break is right)."""
    for head_kept, head_scores in zip(kept, scores, strict=True):
        assert len(head_kept) == keep and set(forced) <= head_kept
        chosen = [head_scores[i] for i in head_kept - set(forced)]
        dropped = [head_scores[i] for i in range(len(head_scores)) if i not in head_kept]
        assert min(chosen) >= max(dropped) - 1e-6


def kept_sets(hooks: KVAttachment, layer: int) -> list[set[int]]:
    return [set(row.tolist()) for row in hooks.state.positions[layer]]


# ---- scoring against explicit attention weights ----------------------------------------------
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_snapkv_keeps_what_explicit_window_attention_ranks_highest(tiny_model, tiny_ids, pooling):
    n, window, budget, groups = tiny_ids.shape[1], 8, 40, 2
    reference = eager_attentions(tiny_model, tiny_ids)
    method = build_method("snapkv", {"budget": budget, "window": window, "pooling": pooling, "span": "token"})
    cache, hooks = prefill_and_compress(tiny_model, tiny_ids, method)
    full = full_cache(tiny_model, tiny_ids)
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    for layer, weights in enumerate(reference):
        summed = weights[:, -window:, : n - window].sum(dim=1)  # (heads, n - window)
        pooled = pool(summed.unsqueeze(0), kernel_size=5, padding=2, stride=1).squeeze(0)
        per_kv = pooled.view(2, groups, -1).mean(dim=1)
        scores = torch.cat([per_kv, torch.zeros(2, window)], dim=1)
        assert_top_k(kept_sets(hooks, layer), scores, budget, list(range(n - window, n)))
        # The cache holds the real entries at those positions, per KV head, in position order.
        positions = hooks.state.positions[layer]
        assert cache.layers[layer].keys.shape == (1, 2, budget, 16)
        for head in range(2):
            torch.testing.assert_close(
                cache.layers[layer].keys[0, head], full.layers[layer].keys[0, head, positions[head]]
            )
            torch.testing.assert_close(
                cache.layers[layer].values[0, head], full.layers[layer].values[0, head, positions[head]]
            )


def test_h2o_keeps_the_heaviest_hitters_of_all_prompt_queries(tiny_model, tiny_ids):
    n, budget = tiny_ids.shape[1], 32
    reference = eager_attentions(tiny_model, tiny_ids)
    method = build_method("h2o", {"budget": budget})
    _, hooks = prefill_and_compress(tiny_model, tiny_ids, method)
    recent = list(range(n - budget // 2, n))
    for layer, weights in enumerate(reference):
        received = weights.sum(dim=1).view(2, 2, n).mean(dim=1)  # every query's attention, per KV head
        assert_top_k(kept_sets(hooks, layer), received, budget, recent)


def test_h2o_accumulation_is_chunked_yet_exact(tiny_model, tiny_ids):
    """Blocks of queries (never n x n) add up to the explicit attention column sums."""
    from compressors.kv_scoring import accumulated_attention

    captured = {}

    def grab(module, query, key, value):
        captured.setdefault(module.layer_idx, (module, query, key))

    from compressors.probe import attention_probe

    install_probe_attention(tiny_model)
    with torch.inference_mode(), attention_probe(grab):
        tiny_model(tiny_ids)
    reference = eager_attentions(tiny_model, tiny_ids)
    for layer, (module, query, key) in captured.items():
        for chunk in (7, 32, 1000):
            torch.testing.assert_close(accumulated_attention(module, query, key, chunk), reference[layer].sum(dim=1))


def test_streamingllm_keeps_sinks_and_recent_window_at_original_positions(tiny_model, tiny_ids):
    n, budget, sinks = tiny_ids.shape[1], 24, 4
    method = build_method("streamingllm", {"budget": budget, "sinks": sinks})
    cache, hooks = prefill_and_compress(tiny_model, tiny_ids, method)
    expected = [*range(sinks), *range(n - (budget - sinks), n)]
    assert hooks.selection.kept_indices == expected
    for layer in range(2):
        assert hooks.state.positions[layer].tolist() == [expected, expected]
    # Decoding the next token at its original position n over the pruned cache is exactly full
    # attention with the evicted prompt tokens masked out for that query (positions 0..n).
    token = torch.tensor([[5]])
    with torch.inference_mode():
        pruned = tiny_model(input_ids=token, past_key_values=cache, position_ids=torch.tensor([[n]])).logits[0, -1]
        tiny_model.set_attn_implementation("eager")
        mask = torch.full((n + 1, n + 1), float("-inf")).triu(1)
        hidden = [i for i in range(n) if i not in expected]
        mask[n, hidden] = float("-inf")
        masked = tiny_model(torch.cat([tiny_ids, token], dim=1), attention_mask=mask[None, None]).logits[0, -1]
    torch.testing.assert_close(pruned, masked, rtol=1e-4, atol=1e-4)


def test_pyramidkv_budgets_fall_with_depth_and_average_the_budget(tiny_model, tiny_ids):
    budgets = pyramid_budgets(list(range(30)), budget=1024, window=32, beta=20)
    values = list(budgets.values())
    assert values == sorted(values, reverse=True) and values[0] > 1024 > values[-1]
    assert sum(values) / len(values) == pytest.approx(1024, abs=1)
    method = build_method("pyramidkv", {"budget": 40, "window": 8, "span": "token"})
    cache, _ = prefill_and_compress(tiny_model, tiny_ids, method)
    expected = pyramid_budgets([0, 1], 40, 8, 20)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [expected[0], expected[1]]


# ---- decode-time eviction through the engine's hooks -------------------------------------------
@pytest.fixture(scope="module")
def tiny_engine(tiny_model, loaded_model) -> HFEngine:
    """The engine around the tiny model (the real tokenizer only names token ids)."""
    loaded = LoadedModel("tiny-llama", Path("."), tiny_model, loaded_model.tokenizer, 2048, torch.device("cpu"))
    install_probe_attention(tiny_model)
    return HFEngine(loaded)


def decode_and_watch(
    engine: HFEngine, ids: list[int], method: ScoredKVPruner, steps: int
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """prefill (pruning) -> ``steps`` decode steps via the engine; cache length per layer per step,
    and the original positions each layer's heads hold at the end."""
    prompt = torch.tensor([ids])
    cache = DynamicCache(config=engine.model.config)
    lengths = []
    attached = method.attach(engine.model, prompt, cache, engine.default_budget, engine.tokenizer)
    with torch.inference_mode(), attached as hooks:
        logits = engine.prefill(hooks, cache, None)
        lengths.append([layer.keys.shape[-2] for layer in cache.layers])
        for step in range(steps):
            token = int(logits.argmax()) % TINY_VOCAB
            logits = engine.decode_one_token(token, cache, hooks.next_position + step, hooks)
            lengths.append([layer.keys.shape[-2] for layer in cache.layers])
    assert active_probe() is None
    return lengths, hooks.state.positions


@pytest.mark.parametrize("name", ["h2o", "streamingllm"])
def test_evicting_methods_stay_at_budget_over_200_decode_steps(tiny_engine, tiny_ids, name):
    budget = 48
    method = build_method(name, {"budget": budget})
    lengths, positions = decode_and_watch(tiny_engine, tiny_ids[0].tolist(), method, steps=200)
    assert all(step == [budget, budget] for step in lengths)
    n = tiny_ids.shape[1]
    last = n + 200  # decode steps took positions n .. n + 199
    for layer_positions in positions.values():
        for head in layer_positions.tolist():
            assert head == sorted(head) and len(set(head)) == budget
            if name == "streamingllm":
                assert head == [0, 1, 2, 3, *range(last - (budget - 4), last)]
            else:  # H2O never evicts its recent half
                assert set(range(last - budget // 2, last)) <= set(head)


def test_snapkv_cache_grows_from_budget_while_decoding(tiny_engine, tiny_ids):
    method = build_method("snapkv", {"budget": 32, "window": 8})
    lengths, _ = decode_and_watch(tiny_engine, tiny_ids[0].tolist(), method, steps=10)
    assert [step[0] for step in lengths] == list(range(32, 43))


@pytest.mark.slow
def test_h2o_stays_at_budget_while_decoding_the_real_model(engine):
    """The real model through engine.generate with ignore_eos: 40 tokens past a 64-entry budget."""
    ids = engine.encode_chat([{"role": "user", "content": "Write a long story about a lighthouse. " * 12}])
    method = build_method("h2o", {"budget": 64})
    lengths = decode_and_watch_real(engine, ids, method, steps=40)
    assert all(set(step) == {64} for step in lengths)
    result = engine.generate(
        GenerationRequest(
            ids, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), CompressionSpec("h2o", {"budget": 64})
        )
    )
    assert result.finish_reason == "length" and result.completion_tokens == 40
    assert result.compression.kv_bytes_after == result.compression.kv_bytes_before * 64 // len(ids)


def decode_and_watch_real(engine: HFEngine, ids: list[int], method: ScoredKVPruner, steps: int) -> list[list[int]]:
    prompt = torch.tensor([ids])
    cache = DynamicCache(config=engine.model.config)
    lengths = []
    attached = method.attach(engine.model, prompt, cache, engine.default_budget, engine.tokenizer)
    with torch.inference_mode(), attached as hooks:
        logits = engine.prefill(hooks, cache, None)
        for step in range(steps):
            logits = engine.decode_one_token(int(logits.argmax()), cache, hooks.next_position + step, hooks)
            lengths.append([layer.keys.shape[-2] for layer in cache.layers])
    return lengths


def attach_all_then_run(
    model, prompts: list[torch.Tensor], methods: list[ScoredKVPruner], steps: int
) -> list[tuple[list[int], KVAttachment, DynamicCache]]:
    """Attach each method to its prompt, all before any forward; prefill them in turn, then decode
    them in turn, one greedy token each per round. Per request: its tokens, attachment and cache."""
    install_probe_attention(model)
    caches = [DynamicCache(config=model.config) for _ in prompts]
    with torch.inference_mode(), ExitStack() as stack:
        attached = [
            stack.enter_context(method.attach(model, ids, cache, 1024))
            for method, ids, cache in zip(methods, prompts, caches, strict=True)
        ]
        tokens: list[list[int]] = []
        for hooks, ids, cache in zip(attached, prompts, caches, strict=True):
            with hooks.prefill():
                positions = torch.arange(ids.shape[1]).unsqueeze(0)
                logits = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits
            tokens.append([int(logits[0, -1].argmax())])
        for step in range(steps):
            for hooks, cache, out in zip(attached, caches, tokens, strict=True):
                token, position = torch.tensor([[out[-1]]]), torch.tensor([[hooks.next_position + step]])
                with hooks.decode_step():
                    logits = model(input_ids=token, past_key_values=cache, position_ids=position).logits
                out.append(int(logits[0, -1].argmax()))
    return list(zip(tokens, attached, caches, strict=True))


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("snapkv", {"ratio": 0.5, "window": 8, "span": "token"}),
        ("pyramidkv", {"ratio": 0.5, "window": 8, "span": "chunk"}),
        ("h2o", {"ratio": 0.5}),
        ("streamingllm", {"ratio": 0.5}),
    ],
)
def test_one_method_object_serves_interleaved_requests_as_fresh_ones_do(tiny_model, tiny_ids, name, knobs):
    """A method holds no per-request state: one object attached to two requests at once (prompts of
    different lengths, so different budgets and positions), prefilled and decoded interleaved, gives
    each exactly what a fresh method object gives it alone."""
    other = torch.randint(0, TINY_VOCAB, (1, 80), generator=torch.Generator().manual_seed(2))
    prompts = [tiny_ids, other]
    shared = build_method(name, knobs)
    together = attach_all_then_run(tiny_model, prompts, [shared, shared], steps=20)
    for ids, (tokens, hooks, cache) in zip(prompts, together, strict=True):
        [(alone_tokens, alone, alone_cache)] = attach_all_then_run(tiny_model, [ids], [build_method(name, knobs)], 20)
        assert tokens == alone_tokens
        assert hooks.selection.kept_indices == alone.selection.kept_indices
        assert hooks.selection.details == alone.selection.details
        assert hooks.state.positions.keys() == alone.state.positions.keys()
        for layer, positions in hooks.state.positions.items():
            assert torch.equal(positions, alone.state.positions[layer]), layer
        for got, want in zip(cache.layers, alone_cache.layers, strict=True):
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
    assert together[0][1].state is not together[1][1].state


# ---- real model: exact per-layer shapes ---------------------------------------------------------
def test_snapkv_span_keeps_each_heads_best_whole_units(tiny_model, tiny_ids):
    """span="chunk" (no tokenizer needed): per layer and KV head, exactly the units
    :func:`~compressors.units.pick_whole_units` picks from the explicit reference scores, with the
    window as the protected tail; the cache holds those entries."""
    n, window, budget, groups = tiny_ids.shape[1], 8, 40, 2
    reference = eager_attentions(tiny_model, tiny_ids)
    method = build_method("snapkv", {"budget": budget, "window": window, "span": "chunk"})
    cache, hooks = prefill_and_compress(tiny_model, tiny_ids, method)
    full = full_cache(tiny_model, tiny_ids)
    chunks = chunk_starts(n, 8)
    for layer, weights in enumerate(reference):
        summed = weights[:, -window:, : n - window].sum(dim=1)
        pooled = F.avg_pool1d(summed.unsqueeze(0), kernel_size=5, padding=2, stride=1).squeeze(0)
        scores = torch.cat([pooled.view(2, groups, -1).mean(dim=1), torch.zeros(2, window)], dim=1)
        positions = hooks.state.positions[layer]
        assert positions.shape == (2, budget) and cache.layers[layer].keys.shape == (1, 2, budget, 16)
        for head in range(2):
            assert positions[head].tolist() == pick_whole_units(scores[head], budget, window, chunks)
            assert set(range(n - window, n)) <= set(positions[head].tolist())
            torch.testing.assert_close(
                cache.layers[layer].keys[0, head], full.layers[layer].keys[0, head, positions[head]]
            )
        whole = [set(range(s, min(s + 8, n))) for s in range(0, n, 8)]
        kept = set(positions[0].tolist())
        # every 8-token chunk is kept whole or not at all (40 = 5 chunks: no single-token fill)
        assert all(c <= kept or not (c & kept) for c in whole)
    assert hooks.selection.details["span"] == "chunk"


def crumbs(positions: torch.Tensor, units: list[list[int]]) -> int:
    """Kept entries, summed over KV heads, that lie in units the head keeps only part of."""
    total = 0
    for kept in positions.tolist():
        held = set(kept)
        total += sum(len(held & set(u)) for u in units if 0 < len(held & set(u)) < len(u))
    return total


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "h2o"])
def test_span_sentence_on_the_real_model_keeps_whole_sentences_at_the_budget(engine, loaded_model, name):
    """Each head's cache holds whole sentences: only the last free slots, fewer than a sentence's
    cap, may hold pieces of one; the paper's token top-k leaves far more crumbs."""
    case = build_case(1024, 0.5, seed=3, count_tokens=lambda text: len(engine.encode_prompt(text)))
    ids = torch.tensor([engine.encode_chat([{"role": "user", "content": case.user_message()}])])
    units = units_of(sentence_starts(engine.tokenizer, ids))
    method = build_method(name, {"budget": 256, "span": "sentence"})
    cache, hooks = prefill_and_compress(loaded_model.model, ids, method, tokenizer=engine.tokenizer)
    _, tokens = prefill_and_compress(loaded_model.model, ids, build_method(name, {"budget": 256, "span": "token"}))
    heads = loaded_model.model.config.num_key_value_heads
    for layer, positions in hooks.state.positions.items():
        assert cache.layers[layer].keys.shape[2] == positions.shape[1]
        assert crumbs(positions, units) < heads * MAX_SENTENCE_TOKENS, layer
    assert sum(crumbs(p, units) for p in hooks.state.positions.values()) * 4 < sum(
        crumbs(p, units) for p in tokens.state.positions.values()
    )
    assert hooks.selection.kv_tokens_per_head == 256 and hooks.selection.details["span"] == "sentence"


@pytest.fixture(scope="module")
def story_ids(engine) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": "Tell me about harbours and ferries. " * 30}])


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streamingllm", "pyramidkv"])
def test_real_cache_shapes_equal_the_budget(engine, loaded_model, story_ids, name):
    budget = 64
    method = build_method(name, {"budget": budget})
    ids = torch.tensor([story_ids])
    cache, hooks = prefill_and_compress(loaded_model.model, ids, method, tokenizer=loaded_model.tokenizer)
    config = loaded_model.model.config
    expected = (
        pyramid_budgets(list(range(config.num_hidden_layers)), budget, 32, 20)
        if name == "pyramidkv"
        else dict.fromkeys(range(config.num_hidden_layers), budget)
    )
    for index, layer in enumerate(cache.layers):
        assert layer.keys.shape == (1, config.num_key_value_heads, expected[index], 64)
        assert layer.values.shape == layer.keys.shape
    assert hooks.selection.details["kv_tokens_per_layer"] == {str(i): b for i, b in expected.items()}
    assert len(story_ids) > 300


# ---- pruning during the prefill (issue 14) ------------------------------------------------------
def prefill_then_prune(model, ids: torch.Tensor, method: ScoredKVPruner, tokenizer, default_budget: int = 1024):
    """The reference: prefill the whole prompt, then prune the full cache (the after-prefill path,
    what ``gemserve eval``'s shared prefill uses); logits, cache and selection."""
    install_probe_attention(model)
    cache = DynamicCache(config=model.config)
    n = int(ids.shape[1])
    attachment = KVAttachment(method, Target(model, ids, cache, default_budget, tokenizer))
    with torch.inference_mode(), attachment.prefill():
        positions = torch.arange(n, device=ids.device).unsqueeze(0)
        logits = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits
    return logits, cache, attachment


def prefill_pruning(model, ids: torch.Tensor, method: ScoredKVPruner, tokenizer, default_budget: int = 1024):
    """What the engine attaches: each layer pruned right after its attention."""
    install_probe_attention(model)
    cache = DynamicCache(config=model.config)
    n = int(ids.shape[1])
    with (
        torch.inference_mode(),
        method.attach(model, ids, cache, default_budget, tokenizer) as hooks,
        hooks.prefill(),
    ):
        positions = torch.arange(n, device=ids.device).unsqueeze(0)
        logits = model(input_ids=ids, past_key_values=cache, position_ids=positions).logits
    return logits, cache, hooks


@pytest.mark.parametrize(
    ("name", "knobs"),
    [
        ("snapkv", {"budget": 40, "window": 8, "span": "token"}),
        ("pyramidkv", {"budget": 40, "window": 8, "span": "token"}),
        ("h2o", {"budget": 40}),
        ("streamingllm", {"budget": 40}),
        ("snapkv", {"budget": 500, "span": "token"}),  # a budget over the prompt keeps everything
        ("snapkv", {"budget": 40, "window": 8}),  # whole sentences (the default span)
        ("pyramidkv", {"budget": 40, "window": 8, "span": "chunk"}),
        ("h2o", {"budget": 40, "span": "sentence"}),
    ],
)
@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=pytest.mark.slow)])
def test_pruning_during_prefill_keeps_exactly_what_pruning_after_it_keeps(
    tiny_model, tiny_ids, loaded_model, story_ids, which, name, knobs
):
    model, ids = (tiny_model, tiny_ids) if which == "tiny" else (loaded_model.model, torch.tensor([story_ids]))
    tokenizer = loaded_model.tokenizer  # the tiny model's ids are SmolLM2 vocabulary ids too
    ref_logits, ref_cache, ref = prefill_then_prune(model, ids, build_method(name, knobs), tokenizer)
    logits, cache, hooks = prefill_pruning(model, ids, build_method(name, knobs), tokenizer)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert hooks.selection.kept_indices == ref.selection.kept_indices
    assert hooks.selection.details == ref.selection.details
    assert hooks.kv_bytes_before == ref.kv_bytes_before == cache_bytes(full_cache(model, ids))
    for layer, positions in hooks.state.positions.items():
        assert torch.equal(positions, ref.state.positions[layer]), layer
    for got, want in zip(cache.layers, ref_cache.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)


@pytest.mark.parametrize("name", ["snapkv", "h2o", "streamingllm", "pyramidkv"])
def test_prefill_holds_at_most_one_unpruned_layer(loaded_model, story_ids, name):
    """When each decoder layer starts, every earlier layer's cache is already cut to its budget."""
    model = loaded_model.model
    budget, n = 64, len(story_ids)
    seen: list[list[int]] = []
    cache = DynamicCache(config=model.config)

    def record(module, args) -> None:
        seen.append([layer.keys.shape[-2] if layer.is_initialized else 0 for layer in cache.layers])

    handles = [layer.register_forward_pre_hook(record) for layer in decoder_layers(model)]
    try:
        ids = torch.tensor([story_ids])
        method = build_method(name, {"budget": budget})
        attached = method.attach(model, ids, cache, 1024, loaded_model.tokenizer)
        with torch.inference_mode(), attached as hooks, hooks.prefill():
            model(input_ids=ids, past_key_values=cache, position_ids=torch.arange(n).unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    assert len(seen) == model.config.num_hidden_layers
    for index, lengths in enumerate(seen):
        assert all(0 < length < n for length in lengths[:index]), (index, lengths)
        assert all(length == 0 for length in lengths[index:]), (index, lengths)
    assert max(layer.keys.shape[-2] for layer in cache.layers) < n


def test_kv_method_metrics_select_ms_is_the_compression_select_ms(engine, story_ids):
    """It was 0 in ``metrics`` while ``compression`` reported the pruning time."""
    request = GenerationRequest(
        story_ids, SamplingParams(max_tokens=1, temperature=0.0), CompressionSpec("snapkv", {"budget": 64})
    )
    result = engine.generate(request)
    assert result.metrics.select_ms == result.compression.select_ms > 0
    assert result.metrics.select_ms <= result.metrics.prefill_ms  # scoring and pruning run inside the prefill


# ---- bad knobs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "knobs", "param", "message"),
    [
        ("snapkv", {"window": 0}, "compression.window", "window of method 'snapkv' must be >= 1"),
        ("snapkv", {"kernel_size": 4}, "compression.kernel_size", "positive odd number"),
        ("snapkv", {"pooling": "median"}, "compression.pooling", "pooling of method 'snapkv' must be one of avg, max"),
        ("pyramidkv", {"beta": 0}, "compression.beta", "beta of method 'pyramidkv' must be >= 1"),
        ("streamingllm", {"sinks": -1}, "compression.sinks", "sinks of method 'streamingllm' must be >= 0"),
        ("h2o", {"recent_fraction": 1.5}, "compression.recent_fraction", r"must be in \[0, 1\]"),
        ("h2o", {"budget": 0}, "compression.budget", "budget of method 'h2o' must be >= 1"),
        ("snapkv", {"window": "wide"}, "compression.window", "must be int"),
    ],
)
def test_bad_knobs_raise_clear_errors(name, knobs, param, message):
    with pytest.raises(CompressionError, match=message) as info:
        build_method(name, knobs)
    assert info.value.param == param


def kept_positions(engine, name: str, knobs: dict) -> tuple[int, list[int], int]:
    ids = engine.encode_chat([{"role": "user", "content": "Short question: what is two plus two?"}])
    request = GenerationRequest(ids, SamplingParams(max_tokens=4), CompressionSpec(name, knobs, return_selection=True))
    result = engine.generate(request)
    assert result.compression.selection is not None
    return len(ids), result.compression.selection.kept_indices, result.compression.kept_tokens


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv"])
def test_budget_below_the_window_keeps_the_newest_tokens(engine, name):
    """kvpress's semantics: the observation window is part of the budget, so a budget smaller
    than it keeps the newest ``budget`` tokens (every layer, every head)."""
    n, kept, per_head = kept_positions(engine, name, {"ratio": 0.1})
    budget = math.ceil(0.1 * n)
    assert budget < 32 and per_head == budget
    assert kept == list(range(n - budget, n))


def test_budget_below_the_sinks_keeps_budget_minus_one_sinks_and_the_newest(engine):
    n, kept, per_head = kept_positions(engine, "streamingllm", {"budget": 3, "sinks": 4})
    assert per_head == 3 and kept == [0, 1, n - 1]


def test_budget_caps_a_whole_prompt_ratio(engine):
    """ratio 1.0 keeps the whole prompt unless a budget caps it: then the pruner must score."""
    n, _, per_head = kept_positions(engine, "snapkv", {"ratio": 1.0, "budget": 5, "window": 2})
    assert n > 5 and per_head == 5


def test_code_built_method_is_held_to_its_declared_types_and_bounds():
    from compressors.snapkv import SnapKV

    with pytest.raises(CompressionError, match="knob 'budget' of method 'snapkv' must be int"):
        SnapKV(budget=True).validate()
    with pytest.raises(CompressionError, match="kernel_size of method 'snapkv' must be a positive odd number"):
        SnapKV(kernel_size=4).validate()
    with pytest.raises(CompressionError, match=r"knob 'budget' of method 'snapkv' must be between -2147483647 and"):
        SnapKV(budget=2**40).validate()
    method = SnapKV(budget=8.0, ratio=1)  # as a request's would be: 8.0 is the int 8, 1 the float 1.0
    method.validate()
    assert (method.budget, type(method.budget), method.ratio, type(method.ratio)) == (8, int, 1.0, float)


def test_budget_caps_the_ratio(engine):
    n, _, per_head = kept_positions(engine, "snapkv", {"ratio": 0.9, "budget": 5, "window": 2})
    assert math.ceil(0.9 * n) > 5 and per_head == 5


# ---- real needles at ~3K tokens, budget 1024 -----------------------------------------------------
# SmolLM2-135M with *full* attention misses most mid-document needles at 3-4K tokens (see
# docs/benchmarks.md), so these tests place the needle at the end of the document, where full
# attention answers: they show each method keeps a real needle and the pruned cache still
# decodes it correctly. Accuracy across depths is the benchmark's job (bench/kv_shared.py).
NEEDLE_METHODS = ["snapkv", "h2o", "pyramidkv", "streamingllm"]


@pytest.mark.slow
@pytest.mark.parametrize("name", NEEDLE_METHODS)
def test_needle_found_at_3k_tokens_with_budget_1024(engine, name):
    case = build_case(3000, 1.0, seed=9, count_tokens=lambda text: len(engine.encode_prompt(text)))
    ids = engine.encode_chat([{"role": "user", "content": case.user_message()}])
    sampling = SamplingParams(max_tokens=16, temperature=0.0)
    result = engine.generate(GenerationRequest(ids, sampling, CompressionSpec(name, {"budget": 1024})))
    assert 2800 <= len(ids) <= 3100
    kv = result.compression
    assert kv.kv_bytes_after == pytest.approx(kv.kv_bytes_before * 1024 / len(ids), rel=0.02)
    assert case.needle.found_in(result.text), f"{name} answered {result.text!r}, expected {case.needle.answer}"


@pytest.mark.parametrize(
    ("forced", "runs"),
    [
        ([1, 1, 0, 0, 0, 1], (2, 1)),
        ([0, 0, 0, 1, 1, 1], (0, 3)),
        ([1, 0, 0, 0, 0, 0], (1, 0)),
        ([0, 0, 0, 0, 0, 0], (0, 0)),
        ([1, 1, 1, 1, 1, 1], (0, 6)),
    ],
)
def test_forced_runs_are_the_protected_head_and_tail(forced: list[int], runs: tuple[int, int]) -> None:
    from compressors.kv_pruner import forced_runs

    assert forced_runs(torch.tensor(forced, dtype=torch.bool)) == runs


def test_forced_entries_inside_the_prompt_cannot_be_kept_as_whole_units() -> None:
    from compressors.kv_pruner import forced_runs

    with pytest.raises(RuntimeError, match="inside the prompt"):
        forced_runs(torch.tensor([1, 0, 1, 0, 1], dtype=torch.bool))


def test_h2o_span_keeps_the_recent_tokens_and_whole_units_while_evicting_one_at_a_time(tiny_engine, tiny_ids):
    """The prefill keeps whole chunks besides the recent half; decoding then evicts single entries
    and stays at the budget, the recent half never evicted."""
    budget, n = 48, tiny_ids.shape[1]
    method = build_method("h2o", {"budget": budget, "span": "chunk"})
    _, prefilled = prefill_and_compress(tiny_engine.model, tiny_ids, method)
    chunks = [set(range(s, s + 8)) for s in range(0, n, 8)]  # n = 96: the recent 24 are the last 3 chunks
    for layer_positions in prefilled.state.positions.values():
        for head in layer_positions.tolist():
            assert len(head) == budget and set(range(n - budget // 2, n)) <= set(head)
            assert all(c <= set(head) or not (c & set(head)) for c in chunks)  # 6 whole chunks
    lengths, positions = decode_and_watch(tiny_engine, tiny_ids[0].tolist(), method, steps=30)
    assert all(step == [budget, budget] for step in lengths)
    for layer_positions in positions.values():
        for head in layer_positions.tolist():
            assert set(range(n + 30 - budget // 2, n + 30)) <= set(head)


# ---- a protected head for SnapKV / PyramidKV (issue 26, item 5) ------------------------------------
@pytest.mark.parametrize(
    ("keep", "head", "expected"),
    [
        (10, 4, [0, 1, 2, 3, 17, 18, 19]),  # the window (3) and the head (4) fit: the rest is scored
        (5, 4, [0, 1, 17, 18, 19]),  # the window first, then as much head as the budget holds
        (3, 4, [17, 18, 19]),  # a budget the window fills keeps no head
        (10, 0, [17, 18, 19]),  # head 0: the paper's SnapKV
    ],
)
def test_snapkv_head_is_forced_after_the_window(keep: int, head: int, expected: list[int]) -> None:
    from compressors.kv_scoring import top_indices

    for name in ("snapkv", "pyramidkv"):
        method = build_method(name, {"budget": keep, "window": 3, "head": head})
        forced = method.forced_entries(20, keep, None)
        assert forced.nonzero().flatten().tolist() == expected
        # every head keeps them, whatever their scores (the lowest here), and exactly keep in all
        kept = top_indices(-torch.arange(20.0).repeat(2, 1), keep, forced)
        assert kept.shape == (2, keep) and all(set(expected) <= set(row.tolist()) for row in kept)
