"""H2O: heavy hitters (entries that gathered the most attention) plus the most recent tokens.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models", NeurIPS 2023 (https://arxiv.org/abs/2306.14048), Algorithm 1.

Prefill: each entry's score is the attention it received, summed over *all* prompt queries
(computed in query blocks, never ``n x n``) and averaged over each GQA group's query heads. Each
KV head keeps the last ``recent`` prompt tokens plus its top ``budget - recent`` heavy hitters.
Decode: every step adds the new query's attention to the scores of the entries it saw, and once a
layer holds more than ``budget`` entries the lowest-scoring entry outside the recent window goes,
so the cache never exceeds the budget (paper defaults: half heavy, half recent).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel

from compressors.base import Target
from compressors.knobs import knob
from compressors.kv_pruner import PruneState, ScoredKVPruner
from compressors.kv_scoring import (
    LayerScorer,
    accumulated_attention,
    attention_weights,
    is_sliding_module,
    per_kv_head,
)
from compressors.probe import attention_probe
from compressors.units import DEFAULT_CHUNK_TOKENS, SPANS, unit_begins


def h2o_scores(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``(H_kv, n)``: attention received from every prompt query, GQA groups averaged."""
    return per_kv_head(accumulated_attention(module, query, key), key.shape[1])


@dataclass
class H2OState(PruneState):
    """A request's :class:`PruneState` plus the attention each held entry has gathered so far."""

    accumulated: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (kv_heads, len), cache order


def accumulated(state: PruneState) -> dict[int, torch.Tensor]:
    assert isinstance(state, H2OState)  # made by H2O.new_state
    return state.accumulated


@dataclass
class H2O(ScoredKVPruner):
    """Knobs: ``budget``/``ratio`` (cache entries per KV head, prefill and decode), and
    ``recent_fraction`` (share of the budget for the most recent tokens; paper: 0.5), ``span``
    (what the prefill's pick keeps whole: ``token``, the paper, or a sentence, word or chunk; the
    decode-time eviction stays one entry at a time)."""

    name: ClassVar[str] = "h2o"
    evicts_during_decode: ClassVar[bool] = True

    recent_fraction: float = knob(
        0.5,
        minimum=0.0,
        maximum=1.0,
        description="share of the budget for the newest tokens; the rest by accumulated attention",
    )
    span: str = knob(
        "token",
        choices=SPANS,
        description=(
            "what the prefill's pick keeps whole: a token (the paper), a sentence, a word, "
            f"a chunk of {DEFAULT_CHUNK_TOKENS} tokens"
        ),
    )

    def new_state(self, target: Target) -> H2OState:
        return H2OState(begins=self.unit_begins(target))

    def unit_begins(self, target: Target) -> torch.Tensor | None:
        return unit_begins(self.span, target.prompt_ids, target.tokenizer)

    def details(self) -> dict[str, object]:
        return {"span": self.span}

    def recent_tokens(self, budget: int) -> int:
        return min(budget, math.ceil(budget * self.recent_fraction))

    def layer_scorer(self) -> LayerScorer | None:
        return h2o_scores

    def forced_entries(self, prompt_tokens: int, keep: int, state: PruneState) -> torch.Tensor:
        forced = torch.zeros(prompt_tokens, dtype=torch.bool)
        forced[prompt_tokens - min(self.recent_tokens(state.budget), keep) :] = True
        return forced

    def on_pruned(self, layer_idx: int, indices: torch.Tensor, scores: torch.Tensor | None, state: PruneState) -> None:
        if scores is None:
            raise RuntimeError("H2O needs its prefill scores to keep evicting while decoding")
        accumulated(state)[layer_idx] = scores.gather(-1, indices.to(scores.device))

    @contextmanager
    def decode_observer(self, model: PreTrainedModel, state: PruneState) -> Iterator[None]:
        held = accumulated(state)

        def accumulate(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            layer_idx = getattr(module, "layer_idx", None)
            if layer_idx not in held or is_sliding_module(module):
                return
            weights = attention_weights(module, query, key, key.shape[-2] - query.shape[-2]).sum(dim=1)
            seen = held[layer_idx]
            grown = torch.cat([seen, seen.new_zeros(seen.shape[0], weights.shape[-1] - seen.shape[-1])], dim=-1)
            held[layer_idx] = grown + per_kv_head(weights, key.shape[1])

        with attention_probe(accumulate):
            yield

    def eviction_scores(self, layer_idx: int, state: PruneState) -> torch.Tensor:
        return accumulated(state)[layer_idx]

    def evictable(self, layer_idx: int, length: int, state: PruneState) -> torch.Tensor:
        evictable = torch.ones(length, dtype=torch.bool)
        recent = self.recent_tokens(state.budget)
        if recent:
            evictable[length - recent :] = False
        return evictable

    def on_evicted(self, layer_idx: int, keep_mask: torch.Tensor, state: PruneState) -> None:
        held = accumulated(state)
        held[layer_idx] = held[layer_idx][keep_mask].view(held[layer_idx].shape[0], -1)
