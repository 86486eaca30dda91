"""The one place that prunes a KV cache: score at prefill -> top-k per KV head -> gather.

A method (SnapKV, H2O, StreamingLLM, PyramidKV) subclasses :class:`ScoredKVPruner` and says
only *what* to keep: a per-layer scorer run on the probed attention states during prefill,
which entries are forced in (observation window, recent tokens, sinks), per-layer budgets,
and, for methods that keep evicting while decoding, the eviction scores. Everything else —
the probe, the gather of the real ``DynamicCache`` tensors, the bookkeeping of which original
positions each KV head still holds, the selection report — lives here, once.

Pruning happens inside the prefill (:class:`PruningAttachment`, what the engine attaches): each
layer's scores are computed from its probed query/key states just before its attention, and its
cache is cut to the layer's budget just after it (:func:`compressors.probe.after_attention`), so
only one layer's full K/V is alive at a time, as with kvpress's forward hooks. The kept entries
are exactly those of pruning the full cache after the prefill (:meth:`ScoredKVPruner.compress`,
kept for callers that share one prefill between methods): a layer's cache is only read by that
layer's attention, which has run by the time it is cut.

Positions: the engine keeps each token's original position (prefill ``0..n-1``, decode goes
on at ``n``), and cached keys carry the RoPE rotation of their original position, so pruning
changes which keys a query sees, never the relative distances it sees them at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from compressors.base import KVAttachment, KVCompressor, Selection, Target, layer_bytes
from compressors.kv_scoring import (
    MIN_PREFILL_QUERIES,
    LayerScorer,
    LayerScores,
    collect_layer_scores,
    drop_entry,
    gather_layer,
    prunable_layers,
    prune_selection,
    top_indices,
)
from compressors.probe import after_attention


@dataclass
class ScoredKVPruner(KVCompressor):
    """Base of the KV pruners; subclasses override the hooks below, not :meth:`compress`."""

    # True for methods whose cache never exceeds the budget, decode included (H2O, StreamingLLM).
    evicts_during_decode: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Per-request state (the engine builds a fresh method object per request).
        self._collected: LayerScores | None = None
        self._positions: dict[int, torch.Tensor] = {}  # layer -> (kv_heads, len) original positions
        self._caps: dict[int, int] = {}  # layer -> most entries it may hold while decoding
        self._next_position = 0

    # ---- hooks for subclasses -------------------------------------------------------------
    def layer_scorer(self) -> LayerScorer | None:
        """Scores computed during prefill, per full-attention layer; None needs no scores."""
        return None

    def always_score(self) -> bool:
        """Score even when the budget keeps the whole prompt (methods that evict later need it)."""
        return self.evicts_during_decode

    def forced_entries(self, prompt_tokens: int, keep: int) -> torch.Tensor:
        """``(n,)`` bool: entries every head keeps whatever their score; at most ``keep`` of them."""
        return torch.zeros(prompt_tokens, dtype=torch.bool)

    def layer_budgets(self, layers: list[int], budget: int) -> dict[int, int]:
        """Entries each prunable layer keeps; the same budget everywhere by default."""
        return dict.fromkeys(layers, budget)

    def on_pruned(self, layer_idx: int, indices: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Called with the ``(kv_heads, k)`` indices a layer kept and its ``(kv_heads, n)`` prefill
        scores (None when none were needed), before decoding starts."""

    def eviction_scores(self, layer_idx: int) -> torch.Tensor:
        """``(kv_heads, len)``: the lowest-scoring evictable entry goes first while decoding."""
        return self._positions[layer_idx].to(torch.float32)  # oldest first

    def evictable(self, layer_idx: int, length: int) -> torch.Tensor:
        """``(len,)`` bool: which cache slots (in cache order) may be evicted while decoding."""
        return torch.ones(length, dtype=torch.bool)

    def on_evicted(self, layer_idx: int, keep_mask: torch.Tensor) -> None:
        """Called with the ``(kv_heads, len)`` keep mask of one decode-time eviction."""

    # ---- the KVCompressor contract ---------------------------------------------------------
    def target_budget(self, prompt_tokens: int, default_budget: int) -> int:
        """The budget before clamping to the prompt: what decode-time eviction holds to."""
        if self.ratio is not None:
            return self.resolve_budget(prompt_tokens, default_budget)
        return self.budget if self.budget is not None else default_budget

    def cache_tokens(self, prompt_tokens: int, max_tokens: int, default_budget: int) -> int:
        """Entries per layer on average (PyramidKV's uneven budgets average to the budget); a method
        that evicts while decoding never grows past its budget."""
        kept = self.resolve_budget(prompt_tokens, default_budget)
        if not self.evicts_during_decode:
            return kept + max_tokens
        return min(kept + max_tokens, max(kept, self.target_budget(prompt_tokens, default_budget)))

    def keeps_whole_prompt(self, prompt_tokens: int) -> bool:
        """Known before prefill (without the engine's default budget) to keep every prompt token."""
        if self.ratio is not None:  # a budget given with it caps it
            return self.ratio >= 1.0 and (self.budget is None or self.budget >= prompt_tokens)
        return self.budget is not None and self.budget >= prompt_tokens

    @contextmanager
    def prefill_observer(self, model: PreTrainedModel, prompt_tokens: int) -> Iterator[None]:
        scorer = self.layer_scorer()
        if scorer is None or (self.keeps_whole_prompt(prompt_tokens) and not self.always_score()):
            yield
            return
        with collect_layer_scores(scorer) as collected:
            self._collected = collected
            yield

    def kv_attachment(self, target: Target) -> KVAttachment:
        return PruningAttachment(self, target)

    def compress(self, cache: Cache, prompt_tokens: int, default_budget: int) -> Selection:
        """Prune a cache the whole prompt has been prefilled into (scores from ``prefill_observer``)."""
        started = time.perf_counter()
        budgets = self.begin(prunable_layers(cache), prompt_tokens, default_budget)
        for layer_idx, keep in budgets.items():
            self.prune_layer(cache, layer_idx, prompt_tokens, keep)
        return self.finish(prompt_tokens, (time.perf_counter() - started) * 1000.0)

    def begin(self, layers: list[int], prompt_tokens: int, default_budget: int) -> dict[int, int]:
        """Check the knobs, set up the decode bookkeeping; return the entries each layer keeps."""
        self.validate()
        target = self.target_budget(prompt_tokens, default_budget)
        self.prepare_budget(target)
        # A budget that holds the whole prompt keeps it everywhere (PyramidKV's uneven split too).
        uniform = target >= prompt_tokens
        budgets = dict.fromkeys(layers, target) if uniform else self.layer_budgets(layers, target)
        self._caps = budgets
        self._next_position = prompt_tokens
        return {layer_idx: min(budget, prompt_tokens) for layer_idx, budget in budgets.items()}

    def finish(self, prompt_tokens: int, prune_ms: float) -> Selection:
        """The selection once every layer is pruned; select_ms = scoring + ``prune_ms``."""
        score_ms = self._collected.elapsed_ms if self._collected is not None else 0.0
        return prune_selection(self.name, prompt_tokens, self._positions, score_ms + prune_ms)

    def validate_for_prompt(self, prompt_tokens: int, default_budget: int) -> None:
        # The same check compress() makes after the prefill, made before it.
        self.prepare_budget(self.target_budget(prompt_tokens, default_budget))

    def prepare_budget(self, budget: int) -> None:
        """Check the knobs against the resolved budget (raise :class:`CompressionError`) and derive
        any per-request sizes from it."""

    def prune_layer(self, cache: Cache, layer_idx: int, prompt_tokens: int, keep: int) -> None:
        layer = cache.layers[layer_idx]
        kv_heads = int(layer.keys.shape[1])
        needs_scores = keep < prompt_tokens or self.always_score()
        scores = self.prefill_scores(layer_idx, kv_heads, prompt_tokens) if needs_scores else None
        if scores is None or keep >= prompt_tokens:
            indices = torch.arange(prompt_tokens, device=layer.keys.device).expand(kv_heads, -1)
        else:
            indices = top_indices(scores, keep, self.forced(keep, prompt_tokens))
            gather_layer(layer, indices)
        self._positions[layer_idx] = indices
        self.on_pruned(layer_idx, indices, scores)

    def forced(self, keep: int, prompt_tokens: int) -> torch.Tensor:
        forced = self.forced_entries(prompt_tokens, keep)
        if int(forced.sum()) > keep:
            raise RuntimeError(f"{self.name} forced {int(forced.sum())} entries into a budget of {keep}")
        return forced

    def prefill_scores(self, layer_idx: int, kv_heads: int, prompt_tokens: int) -> torch.Tensor:
        if self.layer_scorer() is None or prompt_tokens < MIN_PREFILL_QUERIES:
            return torch.zeros(kv_heads, prompt_tokens)
        if self._collected is None or layer_idx not in self._collected.scores:
            raise RuntimeError(f"{self.name}: no attention scores were collected for layer {layer_idx}")
        return self._collected.scores[layer_idx]

    def after_decode_step(self, cache: Cache) -> None:
        """Record the new token's position; evict one entry per head where over the cap."""
        position = self._next_position
        self._next_position += 1
        for layer_idx, positions in self._positions.items():
            new = torch.full((positions.shape[0], 1), position, dtype=positions.dtype, device=positions.device)
            self._positions[layer_idx] = torch.cat([positions, new], dim=-1)
            if self.evicts_during_decode and self._positions[layer_idx].shape[-1] > self._caps[layer_idx]:
                self.evict_one(cache, layer_idx)

    def evict_one(self, cache: Cache, layer_idx: int) -> None:
        scores = self.eviction_scores(layer_idx).clone()
        length = scores.shape[-1]
        scores[:, ~self.evictable(layer_idx, length).to(scores.device)] = float("inf")
        victims = scores.argmin(dim=-1)
        keep_mask = torch.ones_like(scores, dtype=torch.bool)
        keep_mask[torch.arange(scores.shape[0]), victims] = False
        drop_entry(cache.layers[layer_idx], keep_mask)
        positions = self._positions[layer_idx]
        self._positions[layer_idx] = positions[keep_mask].view(positions.shape[0], length - 1)
        self.on_evicted(layer_idx, keep_mask)

    def kv_positions(self) -> dict[int, torch.Tensor]:
        """Original positions each prunable layer's KV heads hold now: ``(kv_heads, len)``."""
        return dict(self._positions)


class PruningAttachment(KVAttachment):
    """A :class:`ScoredKVPruner` on one request: each full-attention layer's cache is scored and
    cut to its budget right after that layer's prefill attention."""

    method: ScoredKVPruner

    def __init__(self, method: ScoredKVPruner, target: Target) -> None:
        super().__init__(method, target)
        self._budgets: dict[int, int] = {}  # layers still to prune -> entries they keep
        self._unpruned_bytes = 0  # what the pruned layers held before their cut
        self._prune_ms = 0.0

    @contextmanager
    def prefill(self) -> Iterator[None]:
        n = self.prompt_tokens
        self._budgets = self.method.begin(full_attention_layers(self.cache), n, self.default_budget)
        with self.method.prefill_observer(self.model, n), after_attention(self.prune_after_attention):
            yield
        if self._budgets:
            raise RuntimeError(
                f"{self.method.name}: the prefill never ran the attention of layers {sorted(self._budgets)}"
            )
        sliding = sum(layer_bytes(self.cache.layers[i]) for i in sliding_layers(self.cache))
        self.kv_bytes_before = self._unpruned_bytes + sliding
        self.selection = self.method.finish(n, self._prune_ms)

    def prune_after_attention(self, module: torch.nn.Module, query_len: int) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        if query_len == self.prompt_tokens and layer_idx in self._budgets:
            self.prune(int(layer_idx))

    def prune(self, layer_idx: int) -> None:
        started = time.perf_counter()
        self._unpruned_bytes += layer_bytes(self.cache.layers[layer_idx])
        self.method.prune_layer(self.cache, layer_idx, self.prompt_tokens, self._budgets.pop(layer_idx))
        collected = self.method._collected
        if collected is not None:  # consumed: the scores need not outlive their layer
            collected.scores.pop(layer_idx, None)
        self._prune_ms += (time.perf_counter() - started) * 1000.0


def full_attention_layers(cache: Cache) -> list[int]:
    """Indices of the cache layers the pruners may shrink, known before the cache holds anything
    (a cache built from the model's config has one layer object per decoder layer)."""
    if not cache.layers:
        raise ValueError("build the cache from the model's config (DynamicCache(config=...)) to prune it per layer")
    return [i for i, layer in enumerate(cache.layers) if not isinstance(layer, DynamicSlidingWindowLayer)]


def sliding_layers(cache: Cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicSlidingWindowLayer)]
