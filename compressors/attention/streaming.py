"""``streaming``: the Λ-shaped pattern, attention sinks plus a local window.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks", 2023
(https://arxiv.org/abs/2309.17453); Han et al., "LM-Infinite", 2023
(https://arxiv.org/abs/2308.16137) apply the same Λ shape to prefill. Every query sees the first
``sinks`` tokens and the ``window`` tokens before it; nothing is estimated, so it costs nothing to
choose, and it cannot see a fact outside its window (it drops needles, as measured in issue 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compressors.attention.base import SparseBackend
from compressors.attention.kernel import SparsePattern, block_count
from compressors.knobs import knob


@dataclass
class StreamingAttention(SparseBackend):
    """Knobs: ``sinks`` (first tokens every query sees; StreamingLLM: 4), ``window`` (recent tokens
    each query sees, rounded up to whole blocks: query ``i`` sees from the start of block
    ``i // block_size - ceil(window / block_size)``), plus ``block_size`` and ``last_dense``."""

    name: ClassVar[str] = "streaming"

    sinks: int = knob(4, minimum=0, description="first tokens every query sees")
    window: int = knob(1024, minimum=1, description="recent tokens each query sees, rounded up to whole blocks")

    def pattern(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> SparsePattern:
        kv_heads, n = key.shape[1], key.shape[-2]
        sinks = torch.arange(min(self.sinks, n)).expand(kv_heads, -1)  # a pattern lives on the CPU (SparsePattern)
        return SparsePattern(self.block_size, block_count(self.window, self.block_size), columns=sinks)
