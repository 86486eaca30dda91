"""``block_sparse``: per-head block selection by estimated attention mass (FlexPrefill / XAttention).

Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence
Inference", 2025 (https://arxiv.org/abs/2502.20766), query-aware pattern; Xu et al., "XAttention",
2025 (https://arxiv.org/abs/2503.16428). Estimate, then compute:

1. :func:`estimated_block_mass`: each query block is represented by its mean query; its softmax
   over every visible key, summed per key block, estimates how much attention mass the block's
   queries put on each key block. Cost ``H x QB x n`` dot products, ``1/block_size`` of dense.
2. :func:`blocks_covering`: per KV head and query block, the fewest key blocks whose estimated mass,
   with the sink and local blocks (always kept), reaches ``threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressors.attention.base import SparseBackend
from compressors.attention.kernel import SparsePattern, block_count, real_queries_per_block
from compressors.knobs import knob

# Query blocks estimated per matmul: bounds the (H, rows, n) float32 logits to ~75 MB at 32K tokens.
ESTIMATE_ROWS = 64


def estimated_block_mass(module: nn.Module, query: torch.Tensor, key: torch.Tensor, block_size: int) -> torch.Tensor:
    """``query (1, H, n, d)``, ``key (1, H_kv, n, d)`` -> ``(H_kv, QB, QB)``: the estimated share of
    each query block's attention on each key block (rows sum to 1 over the visible blocks), averaged
    over the query heads of each GQA group."""
    _, heads, n, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    qb = block_count(n, block_size)
    pad = qb * block_size - n
    scale = getattr(module, "scaling", None) or dim**-0.5
    queries = F.pad(query[0].to(torch.float32), (0, 0, 0, pad)).view(heads, qb, block_size, dim).sum(dim=2)
    queries = queries / real_queries_per_block(n, block_size, query.device).view(1, qb, 1)
    queries = queries.view(kv_heads, groups, qb, dim)
    keys_t = F.pad(key[0].to(torch.float32), (0, 0, 0, pad)).transpose(-1, -2)  # (H_kv, d, QB*B)
    key_pos = torch.arange(qb * block_size, device=query.device)
    mass = torch.empty(kv_heads, qb, qb, dtype=torch.float32, device=query.device)
    for start in range(0, qb, ESTIMATE_ROWS):
        end = min(start + ESTIMATE_ROWS, qb)
        logits = torch.matmul(queries[:, :, start:end], keys_t.unsqueeze(1)) * scale  # (H_kv, G, rows, QB*B)
        # A row sees the keys up to its block's end (its own block whole: an estimate, not causal).
        row_end = (torch.arange(start, end, device=query.device) + 1) * block_size
        hidden = (key_pos.unsqueeze(0) >= row_end.unsqueeze(1)) | (key_pos >= n).unsqueeze(0)
        weights = torch.softmax(logits.masked_fill(hidden, float("-inf")), dim=-1)
        mass[:, start:end] = weights.view(kv_heads, groups, end - start, qb, block_size).sum(dim=-1).mean(dim=1)
    return mass


def blocks_covering(mass: torch.Tensor, threshold: float, local_blocks: int, sink_blocks: int) -> torch.Tensor:
    """``mass (H_kv, QB, QB)`` -> bool ``(H_kv, QB, QB)``: per row the sink blocks plus the fewest far
    blocks (left of the local band) whose mass, added to the band's and the sinks', reaches
    ``threshold``."""
    qb = mass.shape[-1]
    rows = torch.arange(qb, device=mass.device).unsqueeze(1)
    cols = torch.arange(qb, device=mass.device).unsqueeze(0)
    causal = cols <= rows
    band = causal & (cols >= rows - local_blocks)
    sinks = causal & (cols < sink_blocks)
    fixed = band | sinks
    fixed_mass = (mass * fixed).sum(dim=-1, keepdim=True)
    candidates = mass.masked_fill(~(causal & ~fixed), -1.0)
    ordered, order = candidates.sort(dim=-1, descending=True)
    before = ordered.clamp(min=0).cumsum(dim=-1) - ordered.clamp(min=0)
    take = (fixed_mass + before < threshold) & (ordered >= 0)
    chosen = torch.zeros_like(take).scatter_(-1, order, take)
    return chosen | sinks.unsqueeze(0)


@dataclass
class BlockSparseAttention(SparseBackend):
    """Knobs: ``threshold`` (estimated attention mass each query block must cover, FlexPrefill's
    gamma: 1.0 keeps every block), ``local_blocks`` (blocks before a query's own, always kept),
    ``sink_blocks`` (first blocks, always kept), plus ``block_size`` and ``last_dense``."""

    name: ClassVar[str] = "block_sparse"

    threshold: float = knob(
        0.9,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        description="estimated attention mass each query block must cover (FlexPrefill's gamma; 1.0 keeps every block)",
    )
    local_blocks: int = knob(1, minimum=0, description="blocks before a query's own, always kept")
    sink_blocks: int = knob(1, minimum=0, description="first blocks, always kept")

    def pattern(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> SparsePattern:
        if self.threshold >= 1.0:  # everything: no estimate needed
            qb = block_count(key.shape[-2], self.block_size)
            blocks = torch.ones(key.shape[1], qb, qb, dtype=torch.bool)
            return SparsePattern(self.block_size, self.local_blocks, blocks)
        mass = estimated_block_mass(module, query, key, self.block_size)
        blocks = blocks_covering(mass, self.threshold, self.local_blocks, self.sink_blocks)
        return SparsePattern(self.block_size, self.local_blocks, blocks.cpu())
