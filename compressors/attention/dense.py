"""``dense``: every pair the model attends to, with PyTorch SDPA; the default and the reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compressors.attention.base import AttentionBackend
from compressors.knobs import knob


@dataclass
class DenseAttention(AttentionBackend):
    """Exactly the model's attention. Knob ``sliding_band``: compute a sliding-window layer (Gemma
    3's local layers) as its exact band of ``window`` keys per query (same math, it skips only the
    pairs the model's own mask hides; 16x faster per layer at 16K on 2 cores) instead of SDPA over
    all ``n x n`` pairs with the band as a mask (``False``: what transformers does)."""

    name: ClassVar[str] = "dense"

    sliding_band: bool = knob(
        True, description="compute a sliding-window layer as its exact band, not all pairs under a mask"
    )

    def bands_sliding_layers(self) -> bool:
        return self.sliding_band
