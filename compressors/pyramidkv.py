"""PyramidKV: SnapKV's scores with per-layer budgets that fall with depth.

Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling",
2024 (https://arxiv.org/abs/2406.02069), Section 3.

Lower layers spread attention widely, upper layers focus on a few tokens, so lower layers get
more of the budget. As in the authors' code: the prefix budget (``budget - window``) of the top
layer is ``prefix / beta``, the bottom layer gets ``2 * prefix - top``, and layers in between
fall linearly; every layer also keeps the observation window. The mean over layers is the
budget, so total KV bytes match SnapKV's at the same budget; per-layer cache lengths differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compressors.knobs import knob
from compressors.snapkv import SnapKV


def pyramid_budgets(layers: list[int], budget: int, window: int, beta: int) -> dict[int, int]:
    """Per-layer budgets (window included), linear from bottom to top, mean exactly ``budget``: each
    layer gets the rounded running total minus the layers below it, so rounding never adds up to
    more than the budget (the response's ``kept_tokens`` is this mean)."""
    prefix = budget - window
    top = prefix // beta
    bottom = 2 * prefix - top
    count = len(layers)
    if count == 1:
        return {layers[0]: budget}
    step = (bottom - top) / (count - 1)
    budgets: dict[int, int] = {}
    exact_total, given = 0.0, 0
    for rank, layer in enumerate(layers):
        exact_total += bottom - rank * step
        budgets[layer] = window + round(exact_total) - given
        given = round(exact_total)
    return budgets


@dataclass
class PyramidKV(SnapKV):
    """Knobs: SnapKV's, plus ``beta`` (how steep the pyramid is: top layer keeps ``1/beta`` of
    the mean prefix budget; paper: 20)."""

    name: ClassVar[str] = "pyramidkv"

    beta: int = knob(
        20,
        minimum=1,
        description="steepness of the pyramid: the top layer keeps 1/beta of the mean prefix budget (paper: 20)",
    )

    def layer_budgets(self, layers: list[int], budget: int) -> dict[int, int]:
        return pyramid_budgets(layers, budget, min(self.window, budget), self.beta)
