"""GemFilter on the real SmolLM2 model: the method contract of shared DESIGN.md, checked."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from transformers import DynamicCache, Gemma3TextConfig
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from compressors import CompressionError
from compressors.attention import build_attention
from compressors.gemfilter import (
    DEFAULT_FILTER_ATTENTION,
    GemFilter,
    default_filter_layer,
    default_payoff_ratio,
    filter_pass_scores,
    last_query_scores,
    pick_indices,
    pooled_scores,
    selection_confidence,
)
from compressors.probe import active_probe, decoder_layers, repeat_kv_heads
from contract.needles import build_case
from server.engine.types import CompressionSpec, GenerationRequest, SamplingParams


def chat_ids(engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def haystack_ids(engine, count_tokens, tokens: int, depth: float, seed: int) -> tuple[list[int], object]:
    case = build_case(tokens, depth=depth, seed=seed, count_tokens=count_tokens)
    return chat_ids(engine, case.user_message()), case


def greedy(engine, prompt_ids: list[int], method: str, max_tokens: int = 12, **knobs):
    request = GenerationRequest(
        prompt_ids=prompt_ids,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        compression=CompressionSpec(method=method, knobs=knobs, return_selection=True),
    )
    return engine.generate(request)


# ---- selection -------------------------------------------------------------------------------
def test_pick_indices_pools_protects_tail_and_sorts() -> None:
    scores = torch.zeros(20)
    scores[3] = 10.0  # pooled with kernel 5, positions 1..5 share this peak
    picked = pick_indices(scores, keep=6, kernel_size=5, tail=2)
    assert picked == sorted(set(picked))
    assert len(picked) == 6
    assert {18, 19} <= set(picked)
    assert set(picked) - {18, 19} <= {1, 2, 3, 4, 5}
    assert 3 in picked


def test_pick_indices_tail_larger_than_budget_keeps_the_last_tokens() -> None:
    assert pick_indices(torch.arange(50, dtype=torch.float32).flip(0), keep=4, kernel_size=5, tail=32) == [
        46,
        47,
        48,
        49,
    ]


@pytest.mark.parametrize(("budget", "tail"), [(64, 32), (200, 0), (100, 16)])
def test_kept_indices_sorted_unique_exactly_k_with_tail(loaded_model, engine, count_tokens, budget, tail) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 500, depth=0.5, seed=11)
    n = len(ids)
    # payoff_ratio=0: filter even where a full prefill would be cheaper (this tests the selection).
    selection = GemFilter(budget=budget, tail=tail, payoff_ratio=0).select(
        loaded_model.model, torch.tensor([ids]), 1024, engine.tokenizer
    )
    kept = selection.kept_indices
    assert len(kept) == budget == selection.kept_tokens
    assert kept == sorted(set(kept))
    assert all(0 <= i < n for i in kept)
    assert set(range(n - tail, n)) <= set(kept)
    assert selection.protected_tail == tail
    assert selection.layer == default_filter_layer(loaded_model.model.config)


def test_ratio_resolves_to_a_budget(loaded_model, engine, count_tokens) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 400, depth=0.3, seed=12)
    selection = GemFilter(ratio=0.25).select(loaded_model.model, torch.tensor([ids]), 1024, engine.tokenizer)
    assert selection.kept_tokens == -(-len(ids) // 4)  # ceil


def test_selection_spans_are_the_kept_text(engine, count_tokens) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 500, depth=0.4, seed=13)
    result = greedy(engine, ids, "gemfilter", max_tokens=1, budget=96)
    selection = result.compression.selection
    assert result.compression.kept_tokens == 96
    assert sum(span.end - span.start for span in selection.spans) == 96
    kept = selection.kept_indices
    assert [i for span in selection.spans for i in range(span.start, span.end)] == kept
    for span in selection.spans:
        assert span.text == engine.decode(ids[span.start : span.end])


# ---- k >= n is a no-op ---------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [{"budget": 100_000}, {"ratio": 1.0}])
def test_budget_covering_the_prompt_is_identical_to_none(engine, count_tokens, knobs) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 300, depth=0.5, seed=14)
    full = greedy(engine, ids, "none", max_tokens=16)
    gem = greedy(engine, ids, "gemfilter", max_tokens=16, **knobs)
    assert gem.compression.kept_tokens == len(ids)
    assert gem.token_ids == full.token_ids
    assert gem.metrics.kv_cache_bytes == full.metrics.kv_cache_bytes


# ---- a prompt too short for the budget is not filtered (issue 11) -------------------------------
@pytest.mark.slow
def test_prompt_too_short_for_the_budget_skips_the_filter_pass(loaded_model, engine, count_tokens) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 700, depth=0.5, seed=17)
    ratio = default_payoff_ratio(loaded_model.model.config)
    budget = 512
    assert len(ids) < ratio * budget  # below the measured break-even length
    full = greedy(engine, ids, "none", max_tokens=12)
    gem = greedy(engine, ids, "gemfilter", max_tokens=12, budget=budget)
    assert gem.compression.skipped == "prompt too short for budget"
    assert gem.compression.kept_tokens == len(ids)
    assert gem.compression.filter_attention is None  # no filter pass ran
    assert gem.token_ids == full.token_ids
    forced = greedy(engine, ids, "gemfilter", max_tokens=1, budget=budget, payoff_ratio=0)
    assert forced.compression.skipped is None
    assert forced.compression.kept_tokens == budget
    assert forced.compression.filter_attention.backend == DEFAULT_FILTER_ATTENTION == "dense"


def test_payoff_ratio_falls_back_to_the_cost_model_for_unknown_models() -> None:
    config = Gemma3TextConfig(
        num_hidden_layers=18,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=100,
    )
    layer = default_filter_layer(config)
    assert layer == 11
    assert default_payoff_ratio(config) == pytest.approx(18 / (18 - 11 - 1))


# ---- the filter pass stops at layer r and keeps no cache -------------------------------------
@contextmanager
def record_layer_calls(model) -> Iterator[tuple[list[int], list[int], list[dict]]]:
    """Forward hooks on every decoder layer and every attention output projection."""
    layers_called: list[int] = []
    o_proj_called: list[int] = []
    layer_kwargs: list[dict] = []
    handles = []

    def on_layer(index: int):
        def hook(_module, _args, kwargs) -> None:
            layers_called.append(index)
            layer_kwargs.append(kwargs)

        return hook

    for index, layer in enumerate(decoder_layers(model)):
        handles.append(layer.register_forward_pre_hook(on_layer(index), with_kwargs=True))
        handles.append(layer.self_attn.o_proj.register_forward_hook(lambda *_a, i=index: o_proj_called.append(i)))
    try:
        yield layers_called, o_proj_called, layer_kwargs
    finally:
        for handle in handles:
            handle.remove()


# Backend knobs that leave a ~300-token prompt partly uncomputed (the defaults cover it all).
SHORT_PROMPT_KNOBS = {
    "dense": {},
    "block_sparse": {"block_size": 32, "dense_above": 1.0},
    "streaming": {"block_size": 32, "window": 64, "dense_above": 1.0},
    "vertical_slash": {"block_size": 32, "vertical_size": 16, "slash_size": 4, "dense_above": 1.0},
}


@pytest.mark.parametrize(
    ("layer", "attention"),
    [(0, "dense"), (7, "dense"), (None, "dense"), (7, "block_sparse"), (None, "streaming"), (None, "vertical_slash")],
)
def test_filter_pass_never_runs_past_layer_r(loaded_model, engine, count_tokens, layer, attention) -> None:
    model = loaded_model.model
    r = default_filter_layer(model.config) if layer is None else layer
    ids, _ = haystack_ids(engine, count_tokens, 300, depth=0.5, seed=15)
    backend = build_attention(attention, SHORT_PROMPT_KNOBS[attention])
    with record_layer_calls(model) as (layers_called, o_proj_called, layer_kwargs):
        scores = filter_pass_scores(model, torch.tensor([ids]), r, attention=backend)
    assert scores.shape == (2, len(ids))  # fused: the inner-product and attention rows
    # The backend computed exactly the attention of layers 0..r-1, sparse where it is a sparse one.
    computed = backend.stats.dense_layers if attention == "dense" else backend.stats.sparse_layers
    assert computed == r
    assert backend.stats.density == 1.0 if attention == "dense" else backend.stats.density < 1.0
    assert layers_called == list(range(r + 1))  # layer r is entered (for q and k) ...
    assert o_proj_called == list(range(r))  # ... but its attention output is never computed
    # No KV cache in the filter pass: nothing is handed to the layers to fill.
    assert all(kwargs.get("past_key_values") is None for kwargs in layer_kwargs)
    assert all(not kwargs.get("use_cache") for kwargs in layer_kwargs)
    assert active_probe() is None  # the probe is removed on exit
    with record_layer_calls(model) as (after, _, _):  # and the hooks above are gone, too
        pass
    assert after == []


def test_engine_filter_pass_with_hooks_end_to_end(loaded_model, engine, count_tokens) -> None:
    """Through the engine: the first layer calls (the filter pass) stop at r, then the real
    prefill runs all layers on the kept tokens only."""
    model = loaded_model.model
    r = default_filter_layer(model.config)
    ids, _ = haystack_ids(engine, count_tokens, 400, depth=0.5, seed=16)
    with record_layer_calls(model) as (layers_called, _, layer_kwargs):
        result = greedy(engine, ids, "gemfilter", max_tokens=1, budget=64)
    num_layers = len(decoder_layers(model))
    assert layers_called[: r + 1] == list(range(r + 1))
    assert layers_called[r + 1 : r + 1 + num_layers] == list(range(num_layers))  # the prefill
    assert all(kwargs.get("past_key_values") is None for kwargs in layer_kwargs[: r + 1])
    prefill_positions = layer_kwargs[r + 1]["position_ids"]
    assert prefill_positions.tolist() == [list(range(64))]  # fresh contiguous positions
    assert result.compression.kept_tokens == 64


def test_original_positions_prefill_the_kept_tokens_at_their_places_and_decode_on_after_the_prompt(
    loaded_model, engine, count_tokens
) -> None:
    """positions='original': the same kept tokens, rotary positions = their indices in the prompt,
    decoding at n, n+1...; the tokens equal a by-hand greedy run of the model with those positions."""
    model = loaded_model.model
    r = default_filter_layer(model.config)
    ids, _ = haystack_ids(engine, count_tokens, 400, depth=0.5, seed=16)
    n, steps = len(ids), 5
    knobs = {"budget": 64, "payoff_ratio": 0.0}
    compact = greedy(engine, ids, "gemfilter", max_tokens=steps, **knobs)
    with record_layer_calls(model) as (_, _, layer_kwargs):
        result = greedy(engine, ids, "gemfilter", max_tokens=steps, positions="original", **knobs)
    kept = result.compression.selection.kept_indices
    assert kept == compact.compression.selection.kept_indices  # the same selection
    assert len(kept) == 64 and kept[-1] == n - 1 and kept != list(range(64))
    num_layers = len(decoder_layers(model))
    forwards = [kw["position_ids"].tolist() for kw in layer_kwargs[r + 1 :: num_layers]]
    assert forwards[0] == [kept]  # the prefill, after the filter pass's r + 1 layer calls
    assert forwards[1:] == [[[n + step]] for step in range(steps - 1)]  # each decode, after the prompt
    by_hand: list[int] = []
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        out = model(
            input_ids=torch.tensor([[ids[i] for i in kept]]),
            position_ids=torch.tensor([kept]),
            past_key_values=cache,
            use_cache=True,
        )
        for step in range(steps):
            by_hand.append(int(out.logits[0, -1].argmax()))
            out = model(
                input_ids=torch.tensor([[by_hand[-1]]]),
                position_ids=torch.tensor([[n + step]]),
                past_key_values=cache,
                use_cache=True,
            )
    assert result.token_ids == by_hand


def manual_query_key(model, ids: list[int], r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``r``'s query and key states after RoPE, recomputed by hand from its input."""
    base = model.base_model
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        hidden = base(input_ids=input_ids, use_cache=False, output_hidden_states=True).hidden_states[r]
        layer = decoder_layers(model)[r]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden)
        shape = (1, len(ids), -1, attn.head_dim)
        query = attn.q_proj(normed).view(shape).transpose(1, 2)
        key = attn.k_proj(normed).view(shape).transpose(1, 2)
        cos, sin = base.rotary_emb(normed, position_ids=torch.arange(len(ids)).unsqueeze(0))
        return apply_rotary_pos_emb(query, key, cos, sin)


def test_window_1_inner_product_is_the_papers_last_query_dot_keys(loaded_model, engine, count_tokens) -> None:
    """The paper's scoring: sum_heads q_last . k_j after RoPE, recomputed by hand."""
    model, r = loaded_model.model, 5
    ids, _ = haystack_ids(engine, count_tokens, 200, depth=0.5, seed=17)
    query, key = manual_query_key(model, ids, r)
    keys = repeat_kv_heads(key, query.shape[1] // key.shape[1])
    expected = torch.einsum("hd,hnd->n", query[0, :, -1, :], keys[0])
    with torch.inference_mode():
        got = filter_pass_scores(model, torch.tensor([ids]), r, scoring="inner_product", window=1)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
    assert torch.allclose(last_query_scores(query, key), expected, rtol=1e-4, atol=1e-4)


def manual_window_scores(query: torch.Tensor, key: torch.Tensor, window: int, softmax: bool) -> torch.Tensor:
    """Per query of the window, one at a time: its scores over the keys it can see, summed over
    heads, then averaged over the window."""
    keys = repeat_kv_heads(key, query.shape[1] // key.shape[1])[0]
    n, head_dim = key.shape[-2], query.shape[-1]
    expected = torch.zeros(n)
    for position in range(n - window, n):  # each query sees keys 0..position only
        logits = torch.einsum("hd,hnd->hn", query[0, :, position, :], keys[:, : position + 1])
        scores = torch.softmax(logits / head_dim**0.5, dim=-1) if softmax else logits
        expected[: position + 1] += scores.sum(dim=0)
    return expected / window


@pytest.mark.parametrize("scoring", ["inner_product", "attention"])
def test_window_scores_equal_manual_per_query_loop(loaded_model, engine, count_tokens, scoring) -> None:
    model, r, window = loaded_model.model, 7, 16
    ids, _ = haystack_ids(engine, count_tokens, 200, depth=0.5, seed=17)
    query, key = manual_query_key(model, ids, r)
    expected = manual_window_scores(query, key, window, softmax=scoring == "attention")
    with torch.inference_mode():
        got = filter_pass_scores(model, torch.tensor([ids]), r, scoring=scoring, window=window)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3)
    if scoring == "attention":  # every query-head softmax row sums to 1
        assert abs(float(got.sum()) - query.shape[1]) < 1e-3


def test_fused_scores_keep_the_tokens_either_scoring_ranks_best() -> None:
    n = 12
    inner = torch.zeros(n)
    inner[3] = 100.0  # only the inner product likes token 3
    attention = torch.zeros(n)
    attention[7] = 1.0  # only attention likes token 7
    kept = pick_indices(torch.stack([inner, attention]), keep=2, kernel_size=1, tail=0)
    assert kept == [3, 7]  # a raw sum would keep 3 and whatever ties next
    assert pick_indices(inner, keep=1, kernel_size=1, tail=0) == [3]


def test_fused_scores_merged_by_the_mean_keep_what_both_scorings_rank_high() -> None:
    # Token 3 is each scoring's second best; 0 only the inner product's best, 9 only attention's
    # (each ranked last by the other). The best rank keeps the two favourites, the mean rank 3.
    inner = torch.tensor([9.0, 1, 1, 8, 1, 1, 1, 1, 1, -1])
    attention = torch.tensor([-1.0, 1, 1, 8, 1, 1, 1, 1, 1, 9])
    scores = torch.stack([inner, attention])
    assert pick_indices(scores, keep=2, kernel_size=1, tail=0) == [0, 9]
    assert pick_indices(scores, keep=1, kernel_size=1, tail=0, fuse="mean") == [3]
    ranks = pooled_scores(scores, kernel_size=1, fuse="mean")
    assert ranks[[3, 0, 9]].tolist() == pytest.approx([0.8, 0.45, 0.45])  # (0.8 + 0.8) / 2, (0.9 + 0) / 2


def test_selection_reports_its_scoring(loaded_model, engine, count_tokens) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 200, depth=0.5, seed=17)
    input_ids = torch.tensor([ids])
    default = GemFilter(budget=64).select(loaded_model.model, input_ids, 1024, engine.tokenizer)
    paper = GemFilter(budget=64, scoring="inner_product", window=1, span="token", head=0).select(
        loaded_model.model, input_ids, 1024
    )
    assert default.details == {
        "scoring": "fused",
        "fuse": "max",
        "window": 32,
        "span": "sentence",
        "protected_head": 32,
    }
    assert paper.details == {"scoring": "inner_product", "window": 1, "span": "token"}
    assert len(default.kept_indices) == len(paper.kept_indices) == 64
    assert default.kept_indices != paper.kept_indices  # the window changes what is kept


# ---- the needle survives the filter -----------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("depth", "seed"), [(0.1, 2004), (0.1, 2012), (0.25, 2015), (0.5, 2001), (0.75, 2002), (1.0, 2003)]
)
@pytest.mark.slow
def test_needle_in_3500_token_haystack_found_with_budget_1024(engine, count_tokens, depth, seed) -> None:
    """Magic-number needles (the family full attention answers reliably on SmolLM2) from early to
    late in the prompt. The early ones are where the scoring matters: of these three, the
    paper's last-query scoring answered 2 and softmax window attention alone 0 (measured when
    the default was chosen); the default fused scoring must answer all."""
    ids, case = haystack_ids(engine, count_tokens, 3500, depth=depth, seed=seed)
    assert 3300 <= len(ids) <= 3600
    assert case.needle.sentence.startswith("The special magic number")
    result = greedy(engine, ids, "gemfilter", max_tokens=20, budget=1024)
    assert result.compression.kept_tokens == 1024
    assert case.needle.found_in(result.text), (case.needle, result.text)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("depth", "seed", "filter_attention"), [(0.3, 2021, DEFAULT_FILTER_ATTENTION), (0.7, 2022, "streaming")]
)
@pytest.mark.slow
def test_needle_in_4k_haystack_answered_by_default_and_with_a_sparse_filter_pass(
    engine, count_tokens, depth, seed, filter_attention
) -> None:
    """~4K tokens, k=1024: the needle is answered with GemFilter's default filter pass, and with a
    streaming one that really ran sparse in every layer before r."""
    ids, case = haystack_ids(engine, count_tokens, 4000, depth=depth, seed=seed)
    assert 3800 <= len(ids) <= 4100
    result = greedy(engine, ids, "gemfilter", max_tokens=20, budget=1024, filter_attention=filter_attention)
    report = result.compression.filter_attention
    assert report.backend == filter_attention
    if filter_attention == "streaming":
        assert report.sparse_layers == default_filter_layer(engine.model.config)
        assert report.density < 0.6
    else:
        assert report.density == 1.0
    assert case.needle.found_in(result.text), (case.needle, result.text)


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"budget": 0}, "budget of method 'gemfilter' must be >= 1"),
        ({"budget": -3}, "budget of method 'gemfilter' must be >= 1"),
        ({"ratio": 0.0}, "ratio of method 'gemfilter' must be in (0, 1]"),
        ({"kernel_size": 4}, "kernel_size of method 'gemfilter' must be a positive odd"),
        ({"tail": -1}, "tail of method 'gemfilter' must be >= 0"),
        ({"layer": -1}, "layer of method 'gemfilter' must be >= 0"),
        ({"scoring": "cosine"}, "scoring of method 'gemfilter' must be one of fused, inner_product, attention"),
        ({"window": 0}, "window of method 'gemfilter' must be >= 1"),
        ({"head": -1}, "head of method 'gemfilter' must be >= 0"),
        ({"sentence_tokens": 8}, "sentence_tokens of method 'gemfilter' must be in [24, 512]"),
        ({"fallback": "dense"}, "fallback of method 'gemfilter' must be one of none, or a number >= 1"),
        ({"fallback": 0}, "fallback of method 'gemfilter' must be one of none, or a number >= 1"),
        ({"fallback_below": 1.5}, "fallback_below of method 'gemfilter' must be in [0, 1]"),
        ({"fallback": 512, "scoring": "inner_product"}, "a fallback needs the selection's confidence"),
        ({"fallback": "none", "scoring": "inner_product"}, "a fallback needs the selection's confidence"),
    ],
)
def test_invalid_knobs_raise_compression_error(knobs, message) -> None:
    with pytest.raises(CompressionError) as info:
        GemFilter(**knobs).validate()
    assert message in str(info.value)


def test_layer_out_of_range_names_the_model_layers(loaded_model) -> None:
    with pytest.raises(CompressionError, match=r"layer 30 is out of range: this model has layers 0\.\.29"):
        GemFilter(layer=30).validate_for_model(loaded_model.model)


# ---- the default layer ------------------------------------------------------------------------
def test_smollm2_uses_the_layer_of_its_shipped_profile(loaded_model) -> None:
    from server.model_profiles import SHIPPED_DIR

    assert loaded_model.profile_source == str(SHIPPED_DIR / "smollm2-135m-instruct.json")
    assert default_filter_layer(loaded_model.model.config) == loaded_model.profile.filter_layer == 18
    assert default_payoff_ratio(loaded_model.model.config) == loaded_model.profile.payoff_ratio == 2.3


def test_fallback_layer_is_a_global_attention_layer_for_sliding_window_models() -> None:
    config = Gemma3TextConfig(num_hidden_layers=18, hidden_size=64, intermediate_size=128, num_attention_heads=2)
    global_layers = [i for i, kind in enumerate(config.layer_types) if kind == "full_attention"]
    assert global_layers == [5, 11, 17]
    assert default_filter_layer(config) == 11  # first global layer at or after half depth (9)


# ---- selection confidence and the fallback (issue 26) ----------------------------------------------
def test_confidence_is_in_0_1_and_higher_when_the_needle_dominates() -> None:
    n, kept = 100, list(range(40, 50)) + list(range(92, 100))  # a 10-token unit and the 8-token tail
    flat = torch.ones(2, n)
    peaked = torch.ones(2, n)
    peaked[1, 40:50] = 50.0  # the attention row: the filter layer looks at the kept unit
    peaked[1, 0] = 1000.0  # an attention sink on the first token counts for nothing
    low = selection_confidence(flat, "fused", kept, head=0, tail=8)
    high = selection_confidence(peaked, "fused", kept, head=0, tail=8)
    assert low == pytest.approx(10 / 91)  # flat attention: the kept share of the tokens it chose from
    assert high == pytest.approx(500 / (500 + 81))
    assert 0.0 <= low < high <= 1.0
    assert selection_confidence(peaked[1], "attention", kept, head=0, tail=8) == pytest.approx(high)
    assert selection_confidence(peaked[0], "inner_product", kept, head=0, tail=8) is None


@pytest.mark.slow
def test_a_forced_fallback_runs_the_prompt_uncompressed_and_says_so(engine, count_tokens) -> None:
    ids, _ = haystack_ids(engine, count_tokens, 900, depth=0.5, seed=21)
    full = greedy(engine, ids, "none", max_tokens=12)
    forced = greedy(
        engine, ids, "gemfilter", max_tokens=12, budget=128, payoff_ratio=0, fallback="none", fallback_below=1.0
    )
    never = greedy(
        engine, ids, "gemfilter", max_tokens=12, budget=128, payoff_ratio=0, fallback="none", fallback_below=0.0
    )
    assert 0.0 <= forced.compression.confidence <= 1.0
    assert forced.compression.fallback == "none"
    assert forced.compression.kept_tokens == len(ids)
    assert forced.token_ids == full.token_ids  # the same ids at the same positions: the same answer
    assert never.compression.fallback is None and never.compression.kept_tokens == 128
    assert never.compression.confidence == forced.compression.confidence
    widened = greedy(
        engine, ids, "gemfilter", max_tokens=4, budget=128, payoff_ratio=0, fallback=300, fallback_below=1.0
    )
    assert widened.compression.fallback == "budget:300" and widened.compression.kept_tokens == 300
    assert set(never.compression.selection.kept_indices) - set(range(len(ids) - 32, len(ids))) <= set(
        widened.compression.selection.kept_indices
    )  # widening keeps what the budget kept (word units: nearly always; here exactly)


@pytest.mark.slow
def test_a_fallback_in_a_batch_widens_the_planned_prefill(engine, count_tokens) -> None:
    from server.engine.scheduler import Scheduler

    ids, _ = haystack_ids(engine, count_tokens, 900, depth=0.3, seed=22)
    other, _ = haystack_ids(engine, count_tokens, 400, depth=0.6, seed=23)
    solo = greedy(engine, ids, "none", max_tokens=6)
    core = engine.new_core(step_tokens=64)
    events: dict[str, list] = {"a": [], "b": []}
    for key, prompt, knobs in (
        ("a", ids, {"budget": 128, "payoff_ratio": 0, "fallback": "none", "fallback_below": 1.0}),
        ("b", other, {"budget": 64, "payoff_ratio": 0}),
    ):
        request = GenerationRequest(
            prompt_ids=prompt,
            sampling=SamplingParams(max_tokens=6, temperature=0.0),
            compression=CompressionSpec(method="gemfilter", knobs=knobs),
        )
        engine.check_request(request)
        core.add(request, events[key].append)
    assert isinstance(core.scheduler, Scheduler)
    while core.has_work():
        core.step()
    result = events["a"][-1]
    assert result.compression.fallback == "none" and result.compression.kept_tokens == len(ids)
    assert result.token_ids == solo.token_ids
    assert events["b"][-1].compression.kept_tokens == 64
