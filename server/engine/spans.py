"""The one renderer of what a method kept: a :class:`Selection` -> the response's ``selection``.

Both views of a selection read what this module builds, so neither has its own idea of a span:
``gemserve generate --show-selection`` prints :func:`format_segments`, and the viewer page
(server/viewer/) draws the same ``segments``, ``scores`` and ``layer_coverage`` from the response.

* ``segments``: the whole prompt cut into alternating kept and dropped runs of tokens, each with
  its text, so the prompt can be shown with what was dropped dimmed; ``spans`` are the kept runs.
* ``scores`` (on request): a prompt selector's per-token score (GemFilter's pooled filter-layer
  score) binned to at most :data:`MAX_SCORE_BINS` values, for a heat strip over the prompt.
* ``layer_coverage`` (on request): for a KV method, per layer, the fraction of each bin's
  (head, position) pairs the cache kept after prefill, at most :data:`MAX_LAYER_BINS` bins per
  layer: PyramidKV's budgets narrow with depth, SnapKV's heads pick differently.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedTokenizerBase

from compressors import Selection
from contract.protocol import (
    LayerCoverage,
    LayerKept,
    ScoreStrip,
    SelectionInfo,
    SelectionSegment,
    SelectionSpan,
)

# Bounds on what a response carries besides the prompt's own text: 2048 floats for a heat strip
# (one per token up to 2048 tokens) and 256 per layer for coverage (30 layers: 7680 floats).
MAX_SCORE_BINS = 2048
MAX_LAYER_BINS = 256
DIGITS = 4  # rounding of the binned values: enough to rank, a third of the JSON of full floats


def selection_info(
    selection: Selection, tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], with_scores: bool = False
) -> SelectionInfo:
    segments = prompt_segments(tokenizer, prompt_ids, selection.kept_indices)
    info = SelectionInfo(
        kept_indices=selection.kept_indices,
        protected_tail=selection.protected_tail,
        spans=kept_spans(segments),
        segments=segments,
        **selection.details,
    )
    if with_scores:
        n = len(prompt_ids)
        if selection.token_scores is not None:
            info.scores = score_strip(selection.token_scores, MAX_SCORE_BINS)
        if selection.layer_positions:
            info.layer_coverage = layer_coverage(selection.layer_positions, n, MAX_LAYER_BINS)
    return info


def prompt_segments(
    tokenizer: PreTrainedTokenizerBase, prompt_ids: list[int], kept_indices: list[int]
) -> list[SelectionSegment]:
    """The prompt as consecutive runs ``[start, end)`` of kept or dropped tokens, each decoded on
    its own (a character split across a run boundary decodes as U+FFFD on both sides)."""
    n = len(prompt_ids)
    kept = torch.zeros(n, dtype=torch.bool)
    kept[torch.tensor(kept_indices, dtype=torch.long)] = True
    # Boundaries: where kept-ness changes between neighbours.
    changes = (torch.nonzero(kept[1:n] != kept[: n - 1]).view(-1) + 1).tolist() if n > 1 else []
    starts = [0, *changes]
    ends = [*changes, n]
    return [
        SelectionSegment(
            start=start,
            end=end,
            kept=bool(kept[start]),
            text=tokenizer.decode(prompt_ids[start:end], skip_special_tokens=False),
        )
        for start, end in zip(starts, ends, strict=True)
        if end > start
    ]


def kept_spans(segments: list[SelectionSegment]) -> list[SelectionSpan]:
    return [SelectionSpan(start=s.start, end=s.end, text=s.text) for s in segments if s.kept]


def bin_size(n: int, max_bins: int) -> int:
    return max(1, math.ceil(n / max_bins))


def score_strip(scores: torch.Tensor, max_bins: int) -> ScoreStrip:
    """``(n,)`` scores -> the highest of each bin, scaled so the prompt's lowest is 0 and highest 1
    (a bin shows its best token: one strong token in a bin is what selection keeps)."""
    values = scores.detach().to(torch.float32).reshape(-1).cpu()
    values = torch.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    size = bin_size(scaled.numel(), max_bins)
    pad = (-scaled.numel()) % size
    binned = torch.nn.functional.pad(scaled, (0, pad), value=0.0).view(-1, size).amax(dim=1)
    return ScoreStrip(bin_tokens=size, values=[round(v, DIGITS) for v in binned.tolist()])


def layer_coverage(positions: dict[int, torch.Tensor], prompt_tokens: int, max_bins: int) -> LayerCoverage:
    """Per layer: of each bin's ``heads x tokens`` (position, head) pairs, the fraction the cache
    holds. Positions past the prompt (decode tokens) are not counted."""
    size = bin_size(prompt_tokens, max_bins)
    bins = math.ceil(prompt_tokens / size)
    per_bin = torch.full((bins,), float(size))
    per_bin[-1] = prompt_tokens - size * (bins - 1)
    layers = []
    for layer_idx, held in sorted(positions.items()):
        held = held.detach().to("cpu", torch.long)
        heads = int(held.shape[0]) if held.dim() > 1 else 1
        prompt_positions = held[held < prompt_tokens]
        counts = torch.bincount(prompt_positions // size, minlength=bins).to(torch.float32)
        coverage = counts / (per_bin * heads)
        layers.append(
            LayerKept(
                layer=layer_idx,
                kv_heads=heads,
                kv_tokens=int(held.shape[-1]),
                coverage=[round(v, DIGITS) for v in coverage.tolist()],
            )
        )
    return LayerCoverage(bin_tokens=size, layers=layers)


def format_segments(info: SelectionInfo, max_chars: int = 160) -> str:
    """The terminal's view of ``segments``: each kept run with its positions and text, each dropped
    run as a count (``max_chars`` cuts a long kept run's text in the middle)."""
    lines = []
    for segment in info.segments:
        tokens = segment.end - segment.start
        if not segment.kept:
            lines.append(f"  ... {tokens} token{'s' * (tokens != 1)} dropped ...")
            continue
        text = segment.text
        if len(text) > max_chars:
            half = max_chars // 2
            text = f"{text[:half]} [...] {text[-half:]}"
        lines.append(f"  [{segment.start}:{segment.end}] {text!r}")
    return "\n".join(lines)
