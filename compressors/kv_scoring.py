"""Shared machinery of the KV-pruning methods: attention scores -> top-k per KV head -> gather.

kvpress's ``ScorerPress`` idea: a method only says how it scores the cached entries; this
module computes attention weights from the probed query/key states (never an ``n x n``
matrix), picks what to keep per KV head, and shrinks the real ``DynamicCache`` tensors so the
bytes really drop. Caches stay at KV-head count: query heads of a GQA group are averaged into
one score per KV head, and the chosen indices gather the KV heads themselves.

Sliding-window layers (Gemma 3's local layers) are never pruned: their cache already holds at
most ``sliding_window`` tokens and the model's mask code assumes it holds the latest ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from compressors.base import Selection
from compressors.probe import attention_probe, layer_window, repeat_kv_heads

# Queries per block when accumulating attention over a whole prompt: (heads, 256, n) float32
# is ~75 MB at n = 8K, far from the n x n matrix a single block would be.
QUERY_CHUNK = 256

# score(module, query, key) -> (kv_heads, kv_len) scores for one layer, float32.
LayerScorer = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def is_sliding_module(module: nn.Module) -> bool:
    """A local-attention layer (a sliding window, however the architecture declares it)."""
    return layer_window(module) is not None


def is_prunable_layer(layer: object) -> bool:
    """Cache layers this module may shrink: full-attention dynamic layers holding tensors."""
    keys = getattr(layer, "keys", None)
    return not isinstance(layer, DynamicSlidingWindowLayer) and isinstance(keys, torch.Tensor) and keys.dim() == 4


def causal_logits(query: torch.Tensor, key: torch.Tensor, query_start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ``q . k`` of a block of queries over all keys in float32, and where each query's future is.

    ``query (1, H, q, d)`` holds the queries at absolute positions ``query_start ..
    query_start + q - 1`` of a sequence whose keys are ``key (1, H_kv, k, d)`` (positions
    ``0..k-1``). Returns ``logits (H, q, k)`` (GQA keys repeated to line up with the query heads)
    and the bool ``future (q, k)`` mask of keys after each query.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    keys = repeat_kv_heads(key, heads // kv_heads)[0].to(torch.float32)
    logits = torch.matmul(query[0].to(torch.float32), keys.transpose(-1, -2))
    q_len, k_len = logits.shape[-2], logits.shape[-1]
    query_pos = torch.arange(query_start, query_start + q_len, device=logits.device).unsqueeze(1)
    future = torch.arange(k_len, device=logits.device).unsqueeze(0) > query_pos
    return logits, future


def attention_weights(module: nn.Module, query: torch.Tensor, key: torch.Tensor, query_start: int) -> torch.Tensor:
    """Softmax attention ``(H, q, k)`` of a block of queries over all keys, causal, in float32
    (positions as in :func:`causal_logits`), with the module's scaling and logit softcap."""
    logits, future = causal_logits(query, key, query_start)
    logits = logits * (getattr(module, "scaling", None) or query.shape[-1] ** -0.5)
    softcap = getattr(module, "attn_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)


def window_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, window: int) -> torch.Tensor:
    """``(H, n)``: attention of the last ``window`` prompt queries summed over the window
    (``window x n`` per head, causal inside the window) — SnapKV's observation window."""
    n = key.shape[-2]
    window = min(window, query.shape[-2])
    return attention_weights(module, query[:, :, -window:, :], key, n - window).sum(dim=1)


def accumulated_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, chunk: int = QUERY_CHUNK
) -> torch.Tensor:
    """``(H, n)``: attention each key received, summed over every query (H2O's heavy-hitter
    score), in blocks of ``chunk`` queries; a block ending at ``e`` only looks at keys ``< e``.

    This runs over the whole prompt, so it avoids every pass it can: GQA groups share their
    keys (no repeat), exp and max are in place, and ``sum_i p_ij = sum_i e_ij / s_i`` is one
    batched mat-vec instead of a normalising division.
    """
    heads, kv_heads = query.shape[1], key.shape[1]
    groups, q_len, n = heads // kv_heads, query.shape[-2], key.shape[-2]
    offset = n - q_len  # queries are the last q_len positions
    scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    queries = (query[0].to(torch.float32) * scaling).view(kv_heads, groups, q_len, -1)
    keys_t = key[0].to(torch.float32).transpose(-1, -2)  # (H_kv, d, n)
    softcap = getattr(module, "attn_logit_softcapping", None)
    total = torch.zeros(kv_heads, groups, n, dtype=torch.float32, device=query.device)
    for start in range(0, q_len, chunk):
        end = min(start + chunk, q_len)
        rows, visible = end - start, offset + end
        block = queries[:, :, start:end].reshape(kv_heads, groups * rows, -1)
        logits = torch.matmul(block, keys_t[:, :, :visible]).view(kv_heads, groups, rows, visible)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        # Only the block's own last `rows` keys can lie in a query's future.
        future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
        logits[..., visible - rows :].masked_fill_(future, float("-inf"))
        logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
        inverse_sums = logits.sum(dim=-1).reciprocal_().unsqueeze(-2)  # (H_kv, g, 1, rows)
        total[..., :visible] += torch.matmul(inverse_sums, logits).squeeze(-2)
    return total.view(heads, n)


def per_kv_head(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """``(H, n)`` query-head scores -> ``(H_kv, n)``: the mean over each GQA group."""
    heads, n = scores.shape
    return scores.view(kv_heads, heads // kv_heads, n).mean(dim=1)


def top_indices(scores: torch.Tensor, keep: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """``scores (H_kv, n)`` -> ``(H_kv, keep)`` indices, sorted ascending per head.

    ``forced`` (a bool ``(n,)`` mask) marks entries every head keeps whatever their score
    (SnapKV's window, H2O's recent tokens, StreamingLLM's sinks); they count towards ``keep``.
    """
    scores = scores.to(torch.float32).clone()
    if forced is not None:
        scores[:, forced.to(scores.device)] = float("inf")
    return torch.topk(scores, keep, dim=-1).indices.sort(dim=-1).values


def gather_layer(layer: object, indices: torch.Tensor) -> None:
    """Replace a cache layer's tensors by the entries at ``indices (H_kv, k)``, per KV head."""
    keys: torch.Tensor = layer.keys  # type: ignore[attr-defined]
    index = indices.to(keys.device).unsqueeze(0).unsqueeze(-1)
    layer.keys = keys.gather(2, index.expand(keys.shape[0], -1, -1, keys.shape[-1])).contiguous()  # type: ignore[attr-defined]
    values: torch.Tensor = layer.values  # type: ignore[attr-defined]
    layer.values = values.gather(2, index.expand(values.shape[0], -1, -1, values.shape[-1])).contiguous()  # type: ignore[attr-defined]


def drop_entry(layer: object, keep_mask: torch.Tensor) -> None:
    """Drop cache entries where ``keep_mask (H_kv, k)`` is False; each head keeps the same count."""
    kept = keep_mask.sum(dim=-1)
    if not bool((kept == kept[0]).all()):
        raise ValueError("every KV head must keep the same number of entries")
    positions = torch.arange(keep_mask.shape[-1], device=keep_mask.device).expand_as(keep_mask)
    indices = positions[keep_mask].view(keep_mask.shape[0], int(kept[0]))
    gather_layer(layer, indices)


@dataclass
class LayerScores:
    """Scores collected per layer index by a probe during one forward, plus the time it took."""

    scores: dict[int, torch.Tensor] = field(default_factory=dict)
    elapsed_ms: float = 0.0


# A forward with fewer queries is a decode step, which the prefill's probes ignore; so a one-token
# prompt's prefill is never scored (nor needs to be: one entry has nothing to be ranked against).
MIN_PREFILL_QUERIES = 2


@contextmanager
def collect_layer_scores(scorer: LayerScorer, min_query_len: int = MIN_PREFILL_QUERIES) -> Iterator[LayerScores]:
    """Run ``scorer`` on every full-attention layer's probed states during the forwards in this
    context; forwards with fewer than ``min_query_len`` queries (decode steps) are ignored."""
    collected = LayerScores()

    def probe(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None or is_sliding_module(module) or query.shape[-2] < min_query_len:
            return
        start = time.perf_counter()
        collected.scores[int(layer_idx)] = scorer(module, query, key)
        collected.elapsed_ms += (time.perf_counter() - start) * 1000.0

    with attention_probe(probe):
        yield collected


def kept_positions(positions: dict[int, torch.Tensor]) -> list[int]:
    """Union over layers and heads of the original positions the cache holds, sorted."""
    if not positions:
        return []
    union = torch.unique(torch.cat([p.reshape(-1) for p in positions.values()]))
    return [int(i) for i in union.tolist()]


def prune_selection(
    name: str,
    prompt_tokens: int,
    positions: dict[int, torch.Tensor],
    select_ms: float,
    **details: object,
) -> Selection:
    """The :class:`Selection` a KV pruner reports: entries per head (mean over layers), the union of
    kept positions, per-layer counts."""
    per_head = round(sum(int(p.shape[-1]) for p in positions.values()) / len(positions)) if positions else prompt_tokens
    return Selection(
        method=name,
        prompt_tokens=prompt_tokens,
        kept_indices=kept_positions(positions) if positions else list(range(prompt_tokens)),
        kv_tokens_per_head=per_head,
        select_ms=select_ms,
        layer_positions=dict(positions),  # a snapshot: decode steps replace entries, never mutate them
        details={
            "kv_tokens_per_layer": {str(i): int(p.shape[-1]) for i, p in sorted(positions.items())},
            **details,
        },
    )


def prunable_layers(cache: Cache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if is_prunable_layer(layer)]
