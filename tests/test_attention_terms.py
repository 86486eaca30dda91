"""Attention terms SDPA cannot compute are honoured on GemServe's attention path (issue 27).

GPT-OSS adds a learned per-head sink logit to the softmax's denominator (``s_aux``); Gemma 2
soft-caps its attention logits. GemServe routes every model's attention through its probe
(compressors/probe.py), which computes SDPA: before this fix GPT-OSS's sinks were dropped there,
and every answer was silently different from the model's own (max |logit diff| ~0.3 on logits of
~0.6 for the tiny model below). Such layers now run as the model's own eager attention, under
every attention backend, so the logits equal the model's, prefill and decode.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, GptOssConfig, GptOssForCausalLM, PreTrainedModel
from transformers.cache_utils import DynamicCache

from compressors.attention import ATTENTION_BACKENDS, build_attention
from compressors.probe import install_probe_attention, use_attention

PROMPT_TOKENS = 40  # past the sliding window (8) and, with block_size 16, long enough to sparsify


def tiny_gpt_oss() -> PreTrainedModel:
    config = GptOssConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=8,
        max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    model = GptOssForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # random init leaves them near 0: make them matter
    return model


def tiny_gemma2() -> PreTrainedModel:
    config = Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=8,
        max_position_embeddings=256,
        attn_logit_softcapping=1.0,  # small, so the cap changes the logits
        query_pre_attn_scalar=16,
    )
    return Gemma2ForCausalLM(config)


def pair(build) -> tuple[PreTrainedModel, PreTrainedModel]:
    """The model with its own eager attention, and a copy on GemServe's attention path."""
    torch.manual_seed(0)
    model = build()
    model.config._attn_implementation = "eager"
    model.eval()
    served = copy.deepcopy(model)
    install_probe_attention(served)
    return model, served


def prefill_then_decode(model: PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        prefill = model(ids[:, :-1], past_key_values=cache, use_cache=True).logits
        decode = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits
    return prefill, decode


@pytest.mark.parametrize("build", [tiny_gpt_oss, tiny_gemma2], ids=["gpt_oss_sinks", "gemma2_softcap"])
@pytest.mark.parametrize("backend", [None, *ATTENTION_BACKENDS], ids=lambda b: b or "probe_default")
def test_served_logits_equal_the_models_own_attention(build, backend) -> None:
    model, served = pair(build)
    ids = torch.randint(0, 128, (1, PROMPT_TOKENS + 1), generator=torch.Generator().manual_seed(1))
    expected = prefill_then_decode(model, ids)
    knobs = {"block_size": 16, "last_dense": 0} if backend not in (None, "dense") else None
    attention = None if backend is None else build_attention(backend, knobs)
    with use_attention(attention):
        got = prefill_then_decode(served, ids)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)
    if attention is not None:
        stats = attention.stats
        assert stats.sparse_layers == 0 and stats.sliding_layers == 0  # both layers ran exactly


def test_the_fix_is_what_makes_them_equal() -> None:
    """Plain SDPA over the same GPT-OSS weights (sinks dropped) does differ: the test above can fail."""
    model, served = pair(tiny_gpt_oss)
    ids = torch.randint(0, 128, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        own = model(ids).logits
        for layer in served.model.layers:
            layer.self_attn.sinks.zero_().add_(-1e4)  # a sink no query attends to: SDPA's math
        without_sinks = served(ids).logits
    assert (own - without_sinks).abs().max() > 0.05
