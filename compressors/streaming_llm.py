"""StreamingLLM: a few attention sinks plus a rolling window of the most recent tokens.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024
(https://arxiv.org/abs/2309.17453), Section 3.2.

The first ``sinks`` tokens soak up attention mass the softmax has to put somewhere, so they
stay; the rest of the budget is the most recent tokens. After prefill the cache holds
``sinks + (budget - sinks)`` recent prompt tokens, and every decode step evicts the oldest
non-sink entry, so the cache never exceeds the budget. No attention scores are needed.

Positions (a deliberate difference from the paper): the paper re-indexes positions inside the
cache (a token's RoPE position is its slot in the cache) so generation can run past the
model's trained context. Here each token keeps its original position: cached keys were
rotated at their original positions during prefill, and decode continues at ``n, n+1, ...``.
Re-indexing would mean un-rotating and re-rotating every cached key after each eviction, and
buys nothing here because the engine never lets ``prompt + max_tokens`` exceed the model's
context, so every position the model sees is one it was trained on. The query-to-recent-token
distances are exactly those of full attention; only the sinks sit farther away than in the
paper's scheme.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from compressors.knobs import knob
from compressors.kv_pruner import PruneState, ScoredKVPruner


@dataclass
class StreamingLLM(ScoredKVPruner):
    """Knobs: ``budget``/``ratio`` (cache entries, prefill and decode) and ``sinks`` (first
    tokens always kept; paper: 4)."""

    name: ClassVar[str] = "streamingllm"
    evicts_during_decode: ClassVar[bool] = True

    sinks: int = knob(
        4, minimum=0, description="first tokens kept as attention sinks; the rest of the budget is the newest tokens"
    )

    def kept_sinks(self, budget: int) -> int:
        # The sinks are part of the budget: one smaller than sinks + 1 keeps budget - 1 of them and
        # the newest token (as kvpress's window presses cap their window at the budget).
        return min(self.sinks, budget - 1)

    def forced_entries(self, prompt_tokens: int, keep: int, state: PruneState) -> torch.Tensor:
        """Exactly ``keep`` entries: the sinks and the most recent ``keep - sinks`` tokens."""
        sinks = min(self.kept_sinks(state.budget), keep)
        forced = torch.zeros(prompt_tokens, dtype=torch.bool)
        forced[:sinks] = True
        forced[prompt_tokens - (keep - sinks) :] = True
        return forced

    def evictable(self, layer_idx: int, length: int, state: PruneState) -> torch.Tensor:
        evictable = torch.ones(length, dtype=torch.bool)
        evictable[: self.kept_sinks(state.budget)] = False
        return evictable
