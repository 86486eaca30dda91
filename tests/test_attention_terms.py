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

from compressors.attention import ATTENTION_BACKENDS, build_attention
from compressors.probe import use_attention
from tests.test_architectures import assert_same_logits, models, prefill_then_decode, prompt


@pytest.mark.parametrize("name", ["gpt_oss", "gemma2"], ids=["gpt_oss_sinks", "gemma2_softcap"])
@pytest.mark.parametrize("backend", [None, *ATTENTION_BACKENDS], ids=lambda b: b or "probe_default")
def test_served_logits_equal_the_models_own_attention(name, backend) -> None:
    model, served = models(name)
    knobs = {"block_size": 16, "last_dense": 0} if backend not in (None, "dense") else None
    attention = None if backend is None else build_attention(backend, knobs)
    with use_attention(attention):
        got = prefill_then_decode(served, prompt())
    assert_same_logits(got, prefill_then_decode(model, prompt()))
    if attention is not None:
        stats = attention.stats
        assert stats.sparse_layers == 0 and stats.sliding_layers == 0  # every layer ran exactly


def test_the_fix_is_what_makes_them_equal() -> None:
    """Plain SDPA over the same GPT-OSS weights (sinks dropped) does differ: the test above can fail."""
    model, served = models("gpt_oss")
    served = copy.deepcopy(served)  # the shared copy stays as it is
    ids = prompt()[:, :-1]
    with torch.no_grad():
        own = model(ids).logits
        for layer in served.model.layers:
            layer.self_attn.sinks.zero_().add_(-1e4)  # a sink no query attends to: SDPA's math
        without_sinks = served(ids).logits
    assert (own - without_sinks).abs().max() > 0.05
