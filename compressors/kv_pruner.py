"""The one place that prunes a KV cache: score at prefill -> top-k per KV head -> gather.

A method (SnapKV, H2O, StreamingLLM, PyramidKV) subclasses :class:`ScoredKVPruner` and says
only *what* to keep: a per-layer scorer run on the probed attention states during prefill,
which entries are forced in (observation window, recent tokens, sinks), per-layer budgets,
and, for methods that keep evicting while decoding, the eviction scores. Everything else —
the probe, the gather of the real ``DynamicCache`` tensors, the bookkeeping of which original
positions each KV head still holds, the selection report — lives here, once.

The method object holds only its knobs; one request's scores, kept positions and caps live in
its :class:`PruneState`, which the request's attachment owns and passes to every hook.

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
from dataclasses import dataclass, field
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
from compressors.units import pick_whole_units_per_head


@dataclass
class PruneState:
    """One request's pruning state (:meth:`ScoredKVPruner.new_state`), owned by its attachment."""

    collected: LayerScores | None = None  # the prefill's scores, per layer
    budget: int = 0  # the resolved budget before clamping to the prompt (what decoding holds to)
    positions: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (kv_heads, len) original positions
    caps: dict[int, int] = field(default_factory=dict)  # layer -> most entries it may hold while decoding
    next_position: int = 0  # the next decoded token's position
    begins: torch.Tensor | None = None  # (n,) bool, where each kept unit begins; None: single tokens


@dataclass
class ScoredKVPruner(KVCompressor):
    """Base of the KV pruners; subclasses override the hooks below, not :meth:`compress`."""

    # True for methods whose cache never exceeds the budget, decode included (H2O, StreamingLLM).
    evicts_during_decode: ClassVar[bool] = False

    # ---- hooks for subclasses -------------------------------------------------------------
    def new_state(self, target: Target) -> PruneState:
        """A fresh state for one request; a method that keeps more returns a subclass of it."""
        return PruneState(begins=self.unit_begins(target))

    def unit_begins(self, target: Target) -> torch.Tensor | None:
        """Where the units each KV head keeps whole begin (:mod:`compressors.units`); None: tokens."""
        return None

    def choose(self, scores: torch.Tensor, keep: int, prompt_tokens: int, state: PruneState) -> torch.Tensor:
        """``scores (H_kv, n)`` -> ``(H_kv, keep)`` kept positions, sorted per head: the forced
        entries and the best-scoring others, whole units of them where the request has units
        (the forced runs at the prompt's start and end then protected as the units' head and tail,
        extended to whole units where the budget holds them)."""
        forced = self.forced(keep, prompt_tokens, state)
        if state.begins is None:
            return top_indices(scores, keep, forced)
        head, tail = forced_runs(forced)
        return pick_whole_units_per_head(scores, keep, tail, state.begins, head).to(scores.device)

    def layer_scorer(self) -> LayerScorer | None:
        """Scores computed during prefill, per full-attention layer; None needs no scores."""
        return None

    def always_score(self) -> bool:
        """Score even when the budget keeps the whole prompt (methods that evict later need it)."""
        return self.evicts_during_decode

    def forced_entries(self, prompt_tokens: int, keep: int, state: PruneState) -> torch.Tensor:
        """``(n,)`` bool: entries every head keeps whatever their score; at most ``keep`` of them."""
        return torch.zeros(prompt_tokens, dtype=torch.bool)

    def layer_budgets(self, layers: list[int], budget: int) -> dict[int, int]:
        """Entries each prunable layer keeps; the same budget everywhere by default."""
        return dict.fromkeys(layers, budget)

    def on_pruned(self, layer_idx: int, indices: torch.Tensor, scores: torch.Tensor | None, state: PruneState) -> None:
        """Called with the ``(kv_heads, k)`` indices a layer kept and its ``(kv_heads, n)`` prefill
        scores (None when none were needed), before decoding starts."""

    def eviction_scores(self, layer_idx: int, state: PruneState) -> torch.Tensor:
        """``(kv_heads, len)``: the lowest-scoring evictable entry goes first while decoding."""
        return state.positions[layer_idx].to(torch.float32)  # oldest first

    def evictable(self, layer_idx: int, length: int, state: PruneState) -> torch.Tensor:
        """``(len,)`` bool: which cache slots (in cache order) may be evicted while decoding."""
        return torch.ones(length, dtype=torch.bool)

    def on_evicted(self, layer_idx: int, keep_mask: torch.Tensor, state: PruneState) -> None:
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
    def prefill_observer(self, model: PreTrainedModel, prompt_tokens: int) -> Iterator[LayerScores | None]:
        """Yields the per-layer scores the forward in this context fills in (None: none needed)."""
        scorer = self.layer_scorer()
        if scorer is None or (self.keeps_whole_prompt(prompt_tokens) and not self.always_score()):
            yield None
            return
        with collect_layer_scores(scorer) as collected:
            yield collected

    def kv_attachment(self, target: Target) -> KVAttachment:
        return PruningAttachment(self, target)

    def compress(
        self,
        cache: Cache,
        prompt_tokens: int,
        default_budget: int,
        state: PruneState,
        observed: LayerScores | None = None,
    ) -> Selection:
        """Prune a cache the whole prompt has been prefilled into (scores from ``prefill_observer``)."""
        started = time.perf_counter()
        state.collected = observed
        budgets = self.begin(prunable_layers(cache), prompt_tokens, default_budget, state)
        for layer_idx, keep in budgets.items():
            self.prune_layer(cache, layer_idx, prompt_tokens, keep, state)
        return self.finish(prompt_tokens, (time.perf_counter() - started) * 1000.0, state)

    def begin(self, layers: list[int], prompt_tokens: int, default_budget: int, state: PruneState) -> dict[int, int]:
        """Check the knobs, set up the decode bookkeeping; return the entries each layer keeps."""
        self.validate()
        target = self.target_budget(prompt_tokens, default_budget)
        self.check_budget(target)
        # A budget that holds the whole prompt keeps it everywhere (PyramidKV's uneven split too).
        uniform = target >= prompt_tokens
        budgets = dict.fromkeys(layers, target) if uniform else self.layer_budgets(layers, target)
        state.budget = target
        state.caps = budgets
        state.next_position = prompt_tokens
        return {layer_idx: min(budget, prompt_tokens) for layer_idx, budget in budgets.items()}

    def finish(self, prompt_tokens: int, prune_ms: float, state: PruneState) -> Selection:
        """The selection once every layer is pruned; select_ms = scoring + ``prune_ms``."""
        score_ms = state.collected.elapsed_ms if state.collected is not None else 0.0
        return prune_selection(self.name, prompt_tokens, state.positions, score_ms + prune_ms, **self.details())

    def details(self) -> dict[str, object]:
        """What the selection reports of how it chose, besides the per-layer counts."""
        return {}

    def validate_for_prompt(self, prompt_tokens: int, default_budget: int) -> None:
        # The same check compress() makes after the prefill, made before it.
        self.check_budget(self.target_budget(prompt_tokens, default_budget))

    def check_budget(self, budget: int) -> None:
        """Check the knobs against the resolved budget (raise :class:`CompressionError`)."""

    def prune_layer(self, cache: Cache, layer_idx: int, prompt_tokens: int, keep: int, state: PruneState) -> None:
        layer = cache.layers[layer_idx]
        kv_heads = int(layer.keys.shape[1])
        needs_scores = keep < prompt_tokens or self.always_score()
        scores = self.prefill_scores(layer_idx, kv_heads, prompt_tokens, state) if needs_scores else None
        if scores is None or keep >= prompt_tokens:
            indices = torch.arange(prompt_tokens, device=layer.keys.device).expand(kv_heads, -1)
        else:
            indices = self.choose(scores, keep, prompt_tokens, state)
            gather_layer(layer, indices)
        state.positions[layer_idx] = indices
        self.on_pruned(layer_idx, indices, scores, state)

    def forced(self, keep: int, prompt_tokens: int, state: PruneState) -> torch.Tensor:
        forced = self.forced_entries(prompt_tokens, keep, state)
        if int(forced.sum()) > keep:
            raise RuntimeError(f"{self.name} forced {int(forced.sum())} entries into a budget of {keep}")
        return forced

    def prefill_scores(self, layer_idx: int, kv_heads: int, prompt_tokens: int, state: PruneState) -> torch.Tensor:
        if self.layer_scorer() is None or prompt_tokens < MIN_PREFILL_QUERIES:
            return torch.zeros(kv_heads, prompt_tokens)
        if state.collected is None or layer_idx not in state.collected.scores:
            raise RuntimeError(f"{self.name}: no attention scores were collected for layer {layer_idx}")
        return state.collected.scores[layer_idx]

    def after_decode_step(self, cache: Cache, state: PruneState) -> None:
        """Record the new token's position; evict one entry per head where over the cap."""
        position = state.next_position
        state.next_position += 1
        for layer_idx, positions in state.positions.items():
            new = torch.full((positions.shape[0], 1), position, dtype=positions.dtype, device=positions.device)
            state.positions[layer_idx] = torch.cat([positions, new], dim=-1)
            if self.evicts_during_decode and state.positions[layer_idx].shape[-1] > state.caps[layer_idx]:
                self.evict_one(cache, layer_idx, state)

    def evict_one(self, cache: Cache, layer_idx: int, state: PruneState) -> None:
        scores = self.eviction_scores(layer_idx, state).clone()
        length = scores.shape[-1]
        scores[:, ~self.evictable(layer_idx, length, state).to(scores.device)] = float("inf")
        victims = scores.argmin(dim=-1)
        keep_mask = torch.ones_like(scores, dtype=torch.bool)
        keep_mask[torch.arange(scores.shape[0]), victims] = False
        drop_entry(cache.layers[layer_idx], keep_mask)
        positions = state.positions[layer_idx]
        state.positions[layer_idx] = positions[keep_mask].view(positions.shape[0], length - 1)
        self.on_evicted(layer_idx, keep_mask, state)


class PruningAttachment(KVAttachment):
    """A :class:`ScoredKVPruner` on one request: each full-attention layer's cache is scored and
    cut to its budget right after that layer's prefill attention."""

    method: ScoredKVPruner
    state: PruneState

    def __init__(self, method: ScoredKVPruner, target: Target) -> None:
        super().__init__(method, target)
        self._budgets: dict[int, int] = {}  # layers still to prune -> entries they keep
        self._unpruned_bytes = 0  # what the pruned layers held before their cut
        self._prune_ms = 0.0

    @contextmanager
    def prefill(self) -> Iterator[None]:
        n = self.prompt_tokens
        self._budgets = self.method.begin(full_attention_layers(self.cache), n, self.default_budget, self.state)
        with self.method.prefill_observer(self.model, n) as collected, after_attention(self.prune_after_attention):
            self.state.collected = collected
            yield
        if self._budgets:
            raise RuntimeError(
                f"{self.method.name}: the prefill never ran the attention of layers {sorted(self._budgets)}"
            )
        sliding = sum(layer_bytes(self.cache.layers[i]) for i in sliding_layers(self.cache))
        self.kv_bytes_before = self._unpruned_bytes + sliding
        self.selection = self.method.finish(n, self._prune_ms, self.state)

    def prune_after_attention(self, module: torch.nn.Module, query_len: int) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        if query_len == self.prompt_tokens and layer_idx in self._budgets:
            self.prune(int(layer_idx))

    def prune(self, layer_idx: int) -> None:
        started = time.perf_counter()
        self._unpruned_bytes += layer_bytes(self.cache.layers[layer_idx])
        keep = self._budgets.pop(layer_idx)
        self.method.prune_layer(self.cache, layer_idx, self.prompt_tokens, keep, self.state)
        collected = self.state.collected
        if collected is not None:  # consumed: the scores need not outlive their layer
            collected.scores.pop(layer_idx, None)
        self._prune_ms += (time.perf_counter() - started) * 1000.0


def forced_runs(forced: torch.Tensor) -> tuple[int, int]:
    """The lengths of the forced runs at the start and at the end of a ``(n,)`` bool mask; the
    pruners force only those (sinks or a head, a window or recent tokens)."""
    n = forced.numel()
    free = torch.nonzero(~forced).view(-1)
    if free.numel() == 0:
        return 0, n
    head, tail = int(free[0]), n - 1 - int(free[-1])
    if int(forced.sum()) != head + tail:
        raise RuntimeError("a pruner forced entries inside the prompt, which whole units cannot protect")
    return head, tail


def full_attention_layers(cache: Cache) -> list[int]:
    """Indices of the cache layers the pruners may shrink, known before the cache holds anything
    (a cache built from the model's config has one layer object per decoder layer)."""
    if not cache.layers:
        raise ValueError("build the cache from the model's config (DynamicCache(config=...)) to prune it per layer")
    return [i for i, layer in enumerate(cache.layers) if not isinstance(layer, DynamicSlidingWindowLayer)]


def sliding_layers(cache: Cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, DynamicSlidingWindowLayer)]
