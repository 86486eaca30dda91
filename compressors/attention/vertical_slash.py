"""``vertical_slash``: MInference's pattern, vertical columns and slash diagonals, per head.

Jiang et al., "MInference 1.0: Accelerating Pre-filling for Long-Context LLMs via Dynamic Sparse
Attention", 2024 (https://arxiv.org/abs/2407.02490), Algorithm 2. Estimate, then compute:

1. :func:`vertical_and_slash_scores`: the last ``last_q`` queries attend over every key (softmax,
   causal); summing their weights per key gives the *vertical* score of each column, summing per
   distance ``i - j`` gives the *slash* score of each diagonal. Cost ``last_q x n`` per head.
2. The top ``vertical_size`` columns and the top ``slash_size`` diagonals (beyond the local band,
   which is always computed) make the pattern. As in MInference's kernel, a diagonal is computed
   as the key blocks it crosses; a column is computed as a gathered token column.

The first ``sinks`` columns are always kept (MInference forces its first 30 columns in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors.attention.base import SparseBackend
from compressors.attention.kernel import SparsePattern, block_count
from compressors.knobs import knob
from compressors.kv_scoring import attention_weights


def vertical_and_slash_scores(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, last_q: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H_kv, n)`` vertical scores (by key position) and ``(H_kv, n)`` slash scores (by distance
    ``i - j``) from the attention of the last ``last_q`` queries, averaged over each GQA group."""
    heads, n = query.shape[1], key.shape[-2]
    kv_heads = key.shape[1]
    window = min(last_q, n)
    weights = attention_weights(module, query[:, :, -window:, :], key, n - window)  # (H, W, n), causal
    vertical = weights.sum(dim=1)
    positions = torch.arange(n - window, n, device=key.device).unsqueeze(1)
    distance = (positions - torch.arange(n, device=key.device).unsqueeze(0)).clamp(min=0)  # future keys weigh 0
    slash = torch.zeros(heads, n, dtype=torch.float32, device=key.device)
    slash.scatter_add_(1, distance.reshape(1, -1).expand(heads, -1), weights.reshape(heads, -1))
    groups = heads // kv_heads
    return vertical.view(kv_heads, groups, n).mean(dim=1), slash.view(kv_heads, groups, n).mean(dim=1)


def slash_blocks(offsets: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
    """``offsets (H_kv, S)`` diagonal distances -> bool ``(H_kv, QB, QB)``: the key blocks each
    diagonal crosses in each query block (at most two per block)."""
    kv_heads = offsets.shape[0]
    qb = block_count(n, block_size)
    starts = (torch.arange(qb, device=offsets.device) * block_size).view(1, qb, 1)
    first = starts - offsets.unsqueeze(1)  # key of the block's first query on this diagonal
    last = first + block_size - 1
    blocks = torch.zeros(kv_heads, qb, qb + 1, dtype=torch.bool, device=offsets.device)
    for edge in (first, last):
        index = torch.where(edge >= 0, edge // block_size, qb)  # off the left edge: a spare column
        blocks.scatter_(2, index, True)
    return blocks[..., :qb]


@dataclass
class VerticalSlashAttention(SparseBackend):
    """Knobs: ``last_q`` (queries the pattern is estimated from; MInference: 64), ``vertical_size``
    (columns kept per KV head), ``slash_size`` (diagonals kept per KV head, beyond the local band),
    ``sinks`` (first columns always kept), plus ``block_size`` and ``last_dense``. The local band
    is the query's own block and the one before it."""

    name: ClassVar[str] = "vertical_slash"

    last_q: int = knob(64, minimum=1, description="last queries the pattern is estimated from (MInference: 64)")
    vertical_size: int = knob(512, minimum=0, description="key columns kept per KV head")
    slash_size: int = knob(64, minimum=0, description="diagonals kept per KV head beyond the local band")
    sinks: int = knob(30, minimum=0, description="first key columns always kept")

    def pattern(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> SparsePattern:
        n = key.shape[-2]
        local_blocks = 1
        vertical, slash = vertical_and_slash_scores(module, query, key, self.last_q)
        vertical[:, : self.sinks] = float("inf")
        columns = vertical.topk(min(self.vertical_size + self.sinks, n), dim=-1).indices.sort(dim=-1).values
        # Diagonals closer than the band's reach are computed by the band anyway.
        slash[:, : (local_blocks + 1) * self.block_size] = float("-inf")
        far = max(0, n - (local_blocks + 1) * self.block_size)
        offsets = slash.topk(min(self.slash_size, far), dim=-1).indices
        blocks = slash_blocks(offsets, n, self.block_size)
        return SparsePattern(self.block_size, local_blocks, blocks.cpu(), columns.cpu())
