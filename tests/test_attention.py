"""Attention backends (issue 11): the sparse kernel against an explicit masked-dense reference,
every backend against SDPA where its pattern covers everything, density counted, bad input refused.

The reference here is built from the pattern's documented meaning (union of the local band, the
far blocks and the columns), independently of the kernel's disjoint parts and their merge.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from compressors import CompressionError, build_method
from compressors.attention import ATTENTION_BACKENDS, build_attention
from compressors.attention.kernel import (
    SparsePattern,
    block_count,
    explicit_attention,
    fused_cpu_attention,
    pattern_cost,
    sliding_window_pattern,
    sparse_attention,
)
from compressors.probe import StopForward, attention_probe
from server.engine.types import CompressionSpec, GenerationRequest, RequestError, SamplingParams

SPARSE_BACKENDS = [name for name in ATTENTION_BACKENDS if name != "dense"]
# Knobs under which each backend's pattern covers every causal pair of a prompt up to 100K tokens.
# dense_above=1.0: the kernel itself runs (by default so dense a pattern would run as SDPA).
COVER_ALL: dict[str, dict[str, Any]] = {
    "streaming": {"sinks": 0, "window": 100_000, "dense_above": 1.0},
    "block_sparse": {"threshold": 1.0, "dense_above": 1.0},
    "vertical_slash": {"vertical_size": 100_000, "slash_size": 100_000, "dense_above": 1.0},
}
# Partial patterns on short prompts: small blocks so a few hundred tokens hold many.
PARTIAL: dict[str, dict[str, Any]] = {
    "streaming": {"block_size": 32, "window": 64, "sinks": 4, "last_dense": 0, "dense_above": 1.0},
    "block_sparse": {"block_size": 32, "threshold": 0.6, "last_dense": 0, "dense_above": 1.0},
    "vertical_slash": {
        "block_size": 32,
        "vertical_size": 24,
        "slash_size": 6,
        "sinks": 4,
        "last_dense": 32,
        "dense_above": 1.0,
    },
}


def pattern_mask(pattern: SparsePattern, n: int, kv_heads: int) -> torch.Tensor:
    """``(H_kv, n, n)`` bool: the pairs :class:`SparsePattern` says a query sees (its docstring)."""
    size, local = pattern.block_size, pattern.local_blocks
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    causal = j <= i
    band_start = (i // size - local) * size
    mask = (causal & (j >= band_start)).expand(kv_heads, n, n).clone()
    far = causal & (j // size < i // size - local)
    if pattern.blocks is not None:
        mask |= pattern.blocks[:, i // size, j // size] & far
    if pattern.columns is not None:
        for head in range(kv_heads):
            column = torch.zeros(n, dtype=torch.bool)
            column[pattern.columns[head]] = True
            mask[head] |= column.unsqueeze(0) & (j < band_start) & causal
    return mask


def masked_reference(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense softmax attention with everything outside ``mask (H_kv, n, n)`` set to -inf."""
    groups = q.shape[1] // k.shape[1]
    keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.matmul(q, keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.repeat_interleave(groups, 0).unsqueeze(0), float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), values)


# ---- the kernel on random tensors -------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "block", "local"), [(300, 32, 0), (257, 32, 1), (512, 64, 2), (100, 16, 0), (383, 32, 3), (33, 16, 5)]
)
def test_kernel_equals_masked_reference_and_counts_its_pairs(n, block, local) -> None:
    torch.manual_seed(n)
    heads, kv_heads, dim = 6, 2, 16
    q, k, v = torch.randn(1, heads, n, dim), torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim)
    qb = block_count(n, block)
    blocks = torch.rand(kv_heads, qb, qb) < 0.3
    columns = torch.stack([torch.randperm(n)[:7].sort().values for _ in range(kv_heads)])
    pattern = SparsePattern(block, local, blocks, columns)
    mask = pattern_mask(pattern, n, kv_heads)
    out = sparse_attention(q, k, v, pattern, 0.25)
    torch.testing.assert_close(out, masked_reference(q, k, v, mask, 0.25), atol=2e-6, rtol=1e-5)
    cost = pattern_cost(pattern, heads, n)
    assert cost.computed_pairs == int(mask.sum()) * (heads // kv_heads)
    assert cost.causal_pairs == heads * n * (n + 1) // 2


@pytest.mark.parametrize(("n", "block"), [(300, 32), (256, 64), (97, 16)])
def test_kernel_with_every_block_is_causal_sdpa(n, block) -> None:
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 8, n, 32), torch.randn(1, 2, n, 32), torch.randn(1, 2, n, 32)
    qb = block_count(n, block)
    pattern = SparsePattern(block, 1, torch.ones(2, qb, qb, dtype=torch.bool))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.2)
    torch.testing.assert_close(sparse_attention(q, k, v, pattern, 0.2), expected, atol=2e-6, rtol=1e-5)
    cost = pattern_cost(pattern, 8, n)
    assert cost.computed_pairs == cost.causal_pairs


@pytest.mark.parametrize(("n", "window", "block"), [(300, 50, 32), (600, 512, 128), (129, 128, 64)])
def test_sliding_window_band_equals_the_models_band_mask(n, window, block) -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 4, n, 16), torch.randn(1, 1, n, 16), torch.randn(1, 1, n, 16)
    i, j = torch.arange(n).unsqueeze(1), torch.arange(n).unsqueeze(0)
    band = ((j <= i) & (j > i - window)).unsqueeze(0)  # transformers' sliding_window_overlay
    out = sparse_attention(q, k, v, sliding_window_pattern(window, block), 0.25, window=window)
    torch.testing.assert_close(out, masked_reference(q, k, v, band, 0.25), atol=2e-6, rtol=1e-5)


def test_explicit_and_fused_cpu_attention_agree() -> None:
    """Off the CPU the kernel writes the scores out; both paths give the same output and LSE."""
    torch.manual_seed(3)
    q, k, v = torch.randn(5, 1, 24, 16), torch.randn(5, 1, 40, 16), torch.randn(5, 1, 40, 16)
    mask = torch.zeros(5, 1, 1, 40)
    mask[:, :, :, 30:] = float("-inf")
    fused, fused_lse = fused_cpu_attention(q, k, v, mask, 0.3)
    explicit, explicit_lse = explicit_attention(q, k, v, mask, 0.3)
    torch.testing.assert_close(fused, explicit, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(fused_lse, explicit_lse, atol=2e-5, rtol=1e-5)


# ---- the real model -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def long_ids(engine, count_tokens) -> list[int]:
    from contract.needles import build_case

    case = build_case(700, depth=0.4, seed=41, count_tokens=count_tokens)
    return engine.encode_chat([{"role": "user", "content": case.user_message()}])


@pytest.fixture(scope="module")
def layer_states(loaded_model, long_ids):
    """(module, query, key, value) of layer 9 of SmolLM2 on a ~700-token prompt."""
    captured: dict[str, Any] = {}

    def probe(module, query, key, value) -> None:
        if module.layer_idx == 9:
            captured["states"] = (module, query.clone(), key.clone(), value.clone())
            raise StopForward()

    with torch.inference_mode(), attention_probe(probe), pytest.raises(StopForward):
        loaded_model.model.base_model(input_ids=torch.tensor([long_ids]), use_cache=False)
    return captured["states"]


def prefill_logits(engine, ids: list[int], attention: str, knobs: dict[str, Any] | None = None):
    from transformers.cache_utils import DynamicCache

    backend = build_attention(attention, knobs)
    cache = DynamicCache(config=engine.model.config)
    prompt = torch.tensor([ids])
    with torch.inference_mode(), build_method("none").attach(engine.model, prompt, cache, 1024) as hooks:
        logits = engine.prefill(hooks, cache, backend)
    return logits, backend


@pytest.mark.parametrize("name", SPARSE_BACKENDS)
def test_covering_pattern_gives_dense_logits(engine, long_ids, name) -> None:
    dense, _ = prefill_logits(engine, long_ids, "dense")
    sparse, backend = prefill_logits(engine, long_ids, name, COVER_ALL[name])
    torch.testing.assert_close(sparse, dense, atol=1e-3, rtol=1e-3)
    assert int(sparse.argmax()) == int(dense.argmax())
    assert backend.stats.sparse_layers == engine.model.config.num_hidden_layers  # it really ran, every layer
    assert backend.stats.density == 1.0


@pytest.mark.parametrize("name", SPARSE_BACKENDS)
def test_partial_pattern_equals_masked_reference_on_real_states(layer_states, name) -> None:
    module, q, k, v = layer_states
    backend = build_attention(name, PARTIAL[name])
    n = q.shape[-2]
    pattern = backend.with_dense_tail(backend.pattern(module, q, k), n, k.shape[1])
    mask = pattern_mask(pattern, n, k.shape[1])
    out, _ = backend.attend(module, q, k, v, None, scaling=module.scaling)
    expected = masked_reference(q, k, v, mask, module.scaling).transpose(1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    # Density is what was computed: the pattern's pairs, counted independently here, below 1.
    groups = q.shape[1] // k.shape[1]
    assert backend.stats.computed_pairs == int(mask.sum()) * groups
    assert backend.stats.causal_pairs == q.shape[1] * n * (n + 1) // 2
    assert 0.0 < backend.stats.density < 0.9


def test_a_pattern_too_dense_to_pay_runs_as_sdpa_and_is_counted_dense(layer_states) -> None:
    module, q, k, v = layer_states
    backend = build_attention("streaming", {"block_size": 32, "window": 512, "dense_above": 0.6})
    out, _ = backend.attend(module, q, k, v, None, scaling=module.scaling)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=module.scaling)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert backend.stats.dense_layers == 1 and backend.stats.sparse_layers == 0
    assert backend.stats.density == 1.0


def test_engine_reports_density_and_decode_stays_dense(engine, long_ids) -> None:
    request = GenerationRequest(
        prompt_ids=long_ids,
        sampling=SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
        compression=CompressionSpec(
            attention="block_sparse", attention_knobs={"block_size": 64, "threshold": 0.8, "dense_above": 1.0}
        ),
    )
    result = engine.generate(request)
    report = result.compression.attention
    assert report.backend == "block_sparse"
    assert 0.0 < report.density < 1.0
    # One prefill forward: each layer computed once; the 3 decode steps did not reach the backend.
    assert report.sparse_layers == engine.model.config.num_hidden_layers
    assert report.dense_layers == 0
    assert report.knobs["threshold"] == 0.8
    assert result.completion_tokens == 4


def test_dense_is_the_default_and_reports_density_one(engine, long_ids) -> None:
    request = GenerationRequest(prompt_ids=long_ids, sampling=SamplingParams(max_tokens=1, temperature=0.0))
    report = engine.generate(request).compression.attention
    assert report.backend == "dense"
    assert report.density == 1.0
    assert report.dense_layers == engine.model.config.num_hidden_layers


# ---- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "knobs", "param", "message"),
    [
        ("sparse_magic", {}, "compression.attention", "allowed: dense, streaming, vertical_slash, block_sparse"),
        ("block_sparse", {"treshold": 0.5}, "compression.attention_knobs.treshold", "its knobs:"),
        ("block_sparse", {"threshold": 0.0}, "compression.attention_knobs.threshold", "(0, 1]"),
        ("block_sparse", {"threshold": "high"}, "compression.attention_knobs.threshold", "must be float"),
        ("streaming", {"window": 0}, "compression.attention_knobs.window", ">= 1"),
        ("vertical_slash", {"block_size": 8}, "compression.attention_knobs.block_size", "in [16, 4096]"),
        ("dense", {"threshold": 0.9}, "compression.attention_knobs.threshold", "its knobs: sliding_band"),
        ("streaming", {"sinks": True}, "compression.attention_knobs.sinks", "must be int"),
        ("block_sparse", {"dense_above": 0}, "compression.attention_knobs.dense_above", "(0, 1]"),
    ],
)
def test_bad_backend_or_knob_is_a_request_error_naming_what_is_allowed(engine, name, knobs, param, message) -> None:
    spec = CompressionSpec(attention=name, attention_knobs=knobs)
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as err:
        engine.check_request(GenerationRequest(prompt_ids=[1, 2, 3], compression=spec))
    assert err.value.param == param


def test_filter_attention_is_a_gemfilter_knob_only() -> None:
    with pytest.raises(CompressionError, match="has no knob 'filter_attention'") as err:
        build_method("snapkv", {"filter_attention": "block_sparse"})
    assert err.value.param == "compression.filter_attention"
    with pytest.raises(CompressionError, match="filter_attention of method 'gemfilter' must be one of dense,") as err:
        build_method("gemfilter", {"filter_attention": "nope"})
    assert err.value.param == "compression.filter_attention"
    with pytest.raises(CompressionError) as err:
        build_method("gemfilter", {"filter_attention": "block_sparse", "filter_attention_knobs": {"threshold": 2}})
    assert err.value.param == "compression.filter_attention_knobs.threshold"


def test_a_huge_backend_name_is_not_echoed_back(engine) -> None:
    spec = CompressionSpec(attention="x" * 100_000)
    with pytest.raises(RequestError) as err:
        engine.check_request(GenerationRequest(prompt_ids=[1, 2, 3], compression=spec))
    assert len(str(err.value)) < 300
