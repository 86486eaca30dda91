"""What an attention backend is, and where the model's attention calls reach it.

Every model routed through :mod:`compressors.probe` calls the active backend's :meth:`attend` for
each layer's attention, with query/key/value after RoPE and any q/k norm: inside
``with use_attention(backend):`` (:mod:`compressors.probe`) that call goes to ``backend``; outside
it is plain SDPA. The engine opens that context around a
prefill only, so decode stays dense whatever the request asked for.

A sparse backend only *estimates* a :class:`~compressors.attention.kernel.SparsePattern` per layer
(``pattern``); the shared kernel computes exactly that pattern, and the backend counts what it
computed so the response can say how much was skipped (``density``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressors.attention.kernel import (
    PatternCost,
    SparsePattern,
    causal_pairs,
    pattern_cost,
    sliding_window_cost,
    sliding_window_pattern,
    sparse_attention,
)
from compressors.knobs import check_declared_bounds, knob
from compressors.probe import layer_window, needs_exact_attention, sdpa_attention


@dataclass
class AttentionStats:
    """What one backend computed over the prefill forwards it served (all layers, all query heads)."""

    computed_pairs: int = 0
    causal_pairs: int = 0
    sparse_layers: int = 0  # layer calls computed from an estimated pattern
    sliding_layers: int = 0  # sliding-window layers computed as their exact band
    dense_layers: int = 0  # layer calls computed dense (backend ``dense``, or a case a pattern cannot serve)
    estimate_ms: float = 0.0

    @property
    def density(self) -> float:
        """Fraction of the causal query-key pairs computed."""
        return self.computed_pairs / self.causal_pairs if self.causal_pairs else 1.0

    def add(self, cost: PatternCost) -> None:
        self.computed_pairs += cost.computed_pairs
        self.causal_pairs += cost.causal_pairs


@dataclass
class AttentionBackend:
    """A prefill attention computation; typed dataclass fields are its knobs, with paper defaults.

    Built per request (like a method), so :attr:`stats` counts that request's prefill only.
    """

    name: ClassVar[str]
    # A prefill split into chunks (continuous batching) computes each chunk's queries against the
    # cached keys: exact for dense attention; a sparse pattern is estimated over the whole square.
    prefills_in_chunks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self.stats = AttentionStats()

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def knob_values(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        """Raise :class:`CompressionError` for knob values no prompt could make valid: the knobs
        through the class's knob model (the types and bounds the fields declare, compressors/knobs.py)."""
        check_declared_bounds(self, f"attention backend '{self.name}'", "attention")

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """The layer's attention output ``(batch, q_len, heads, head_dim)``, as transformers expects."""
        n = query.shape[-2]
        if n < 2:  # a decode step: always dense, not counted (prefill only)
            return sdpa_attention(module, query, key, value, attention_mask, **kwargs)
        window = layer_window(module)
        # A layer with attention sinks or soft-capping runs as the model's own attention (exact).
        one_sequence = query.shape[0] == 1 and key.shape[-2] == n and not needs_exact_attention(module, kwargs)
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        if one_sequence and window is not None and window < n and self.bands_sliding_layers():
            out = sparse_attention(query, key, value, sliding_window_pattern(window, BAND_BLOCK), scale, window)
            self.stats.sliding_layers += 1
            self.stats.add(sliding_window_cost(query.shape[1], n, window))
            return out.transpose(1, 2).contiguous(), None
        if one_sequence and window is None and attention_mask is None and self.sparsifies(n):
            return self.sparse_layer(module, query, key, value, scale), None
        self.count_dense(query.shape[1], n, key.shape[-2])
        return sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    def count_dense(self, heads: int, queries: int, keys: int) -> None:
        """A layer computed densely: ``queries`` (the last of ``keys`` positions) over their causal keys."""
        self.stats.dense_layers += 1
        self.stats.add(PatternCost(*(chunk_pairs(heads, queries, keys),) * 2))

    def bands_sliding_layers(self) -> bool:
        return True

    def sparsifies(self, n: int) -> bool:
        """Whether a full-attention layer over ``n`` queries gets an estimated pattern (dense: never)."""
        return False

    def sparse_layer(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        raise NotImplementedError

    def report(self) -> dict[str, Any]:
        """The response's account of this backend: name, knobs, density and what it covered."""
        return {
            "backend": self.name,
            "density": round(self.stats.density, 6),
            "computed_pairs": self.stats.computed_pairs,
            "causal_pairs": self.stats.causal_pairs,
            "sparse_layers": self.stats.sparse_layers,
            "sliding_layers": self.stats.sliding_layers,
            "dense_layers": self.stats.dense_layers,
            "estimate_ms": round(self.stats.estimate_ms, 3),
            "knobs": self.knob_values(),
        }


# Block size of the exact band computed for sliding-window layers.
BAND_BLOCK = 128


def chunk_pairs(heads: int, queries: int, keys: int) -> int:
    """Causal pairs of the last ``queries`` of ``keys`` positions (a prefill chunk after cached keys)."""
    if keys <= queries:
        return causal_pairs(heads, queries)
    return heads * queries * (keys - queries) + causal_pairs(heads, queries)


@dataclass
class SparseBackend(AttentionBackend):
    """A backend that estimates a pattern per layer and computes it with the shared kernel.

    Knobs shared by every sparse backend: ``block_size`` (tokens per query/key block; 128 as in
    FlexPrefill), ``dense_above`` (a layer whose pattern would compute more than this fraction of
    the causal pairs runs as dense SDPA instead: faster, and exact; 1.0 never) and
    ``last_dense`` (the query blocks within the final ``last_dense`` prompt
    tokens attend densely: the first generated token, and GemFilter's scoring window, are read
    from them).
    """

    prefills_in_chunks: ClassVar[bool] = False

    block_size: int = knob(128, minimum=16, maximum=4096, description="tokens per query and key block of the pattern")
    last_dense: int = knob(
        128, minimum=0, description="query blocks within the final last_dense prompt tokens attend densely"
    )
    dense_above: float = knob(
        0.6,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        description=(
            "a layer whose pattern covers more of the causal pairs than this runs dense (exact, faster); 1.0: never"
        ),
    )

    def pattern(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> SparsePattern:
        """Estimate the pattern for one layer: ``query (1, H, n, d)``, ``key (1, H_kv, n, d)``."""
        raise NotImplementedError

    def sparsifies(self, n: int) -> bool:
        # Below a few blocks a pattern cannot skip anything worth its estimate.
        return n > 2 * self.block_size

    def sparse_layer(
        self, module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float
    ) -> torch.Tensor:
        n = query.shape[-2]
        start = time.perf_counter()
        pattern = self.with_dense_tail(self.pattern(module, query, key), n, key.shape[1])
        self.stats.estimate_ms += (time.perf_counter() - start) * 1000.0
        cost = pattern_cost(pattern, query.shape[1], n)
        if cost.computed_pairs > self.dense_above * cost.causal_pairs:
            # Per computed pair the sparse kernel costs 1.5-3x SDPA (bench.attention at 8K): a pattern
            # this dense is cheaper, and exact, as dense SDPA.
            self.stats.dense_layers += 1
            self.stats.add(PatternCost(cost.causal_pairs, cost.causal_pairs))
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
            return out.transpose(1, 2).contiguous()
        out = sparse_attention(query, key, value, pattern, scale)
        self.stats.sparse_layers += 1
        self.stats.add(cost)
        return out.transpose(1, 2).contiguous()

    def with_dense_tail(self, pattern: SparsePattern, n: int, kv_heads: int) -> SparsePattern:
        """Give every block to the query blocks that start within the last ``last_dense`` queries
        (always the last block): a block straddling that line stays sparse, since making it dense
        would cost a whole row of queries for the few of them inside the tail."""
        if not self.last_dense:
            return pattern
        qb = -(-n // pattern.block_size)
        none = pattern.blocks is None
        blocks = torch.zeros(kv_heads, qb, qb, dtype=torch.bool) if none else pattern.blocks.clone()
        first_row = min(qb - 1, -(-max(0, n - self.last_dense) // pattern.block_size))
        blocks[:, first_row:, :] = True
        return SparsePattern(pattern.block_size, pattern.local_blocks, blocks, pattern.columns)
