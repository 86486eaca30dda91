"""SnapKV: the prompt's last queries already know which prefix entries generation will need.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", 2024
(https://arxiv.org/abs/2404.14469), Section 4 / Listing 1.

During prefill, per layer, the last ``window`` queries (the observation window) attend over all
prompt keys: softmax weights ``(heads, window, n)``, causal inside the window, computed here from
the probed states (SDPA returns no weights; never ``n x n``). They are summed over the window,
pooled along the sequence (kernel 5, average or max) so neighbours of a hit survive with it, and
averaged over the query heads of each GQA group so the cache stays at KV-head count. Each KV head
keeps its top ``budget - window`` prefix entries plus the whole window.

``span`` (issue 26, item 5) is GemFilter's idea applied per KV head: a head keeps whole words or
sentences (:mod:`compressors.units`), best first by their best entry's score, instead of single
entries. Sentences are the default (measured: DEFAULT_KV_SPAN); ``span="token"`` is the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compressors.base import Target
from compressors.knobs import knob
from compressors.kv_pruner import PruneState, ScoredKVPruner
from compressors.kv_scoring import LayerScorer, per_kv_head, window_attention
from compressors.units import DEFAULT_CHUNK_TOKENS, SPANS, unit_begins

POOLINGS = ("avg", "max")
# Whole sentences per KV head (issue 26, item 5), measured with `gemserve eval` on SmolLM2 at k=256,
# 1K-4K, 81 prompts per run: tuning families 0.63 (sentence) vs 0.26 (token, the paper's) and 0.57
# (none); held-out dialogue / emails / code 0.67 vs 0.20 and 0.51, below token in no cell.
# bench/results/eval_smollm2_kv_span*, docs/benchmarks.md "Whole units for the KV methods".
DEFAULT_KV_SPAN = "sentence"


def pool_scores(scores: torch.Tensor, kernel_size: int, pooling: str) -> torch.Tensor:
    """``(H, m)`` -> ``(H, m)``: 1-D pooling along the sequence, stride 1, same length. A prompt no
    longer than the observation window has no prefix (``m = 0``), which torch's kernels refuse."""
    if kernel_size == 1 or scores.shape[-1] == 0:
        return scores
    pool = F.avg_pool1d if pooling == "avg" else F.max_pool1d
    return pool(scores.unsqueeze(0), kernel_size=kernel_size, padding=kernel_size // 2, stride=1).squeeze(0)


def snapkv_scores(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, window: int, kernel_size: int, pooling: str
) -> torch.Tensor:
    """``query (1, H, n, d)``, ``key (1, H_kv, n, d)`` -> ``(H_kv, n)`` SnapKV scores; the window's
    own entries score 0 (they are always kept)."""
    n = key.shape[-2]
    window = min(window, n)
    weights = window_attention(module, query, key, window)  # (H, n)
    prefix = pool_scores(weights[:, : n - window], kernel_size, pooling)
    scores = torch.zeros_like(weights)
    scores[:, : n - window] = prefix
    return per_kv_head(scores, key.shape[1])


@dataclass
class SnapKV(ScoredKVPruner):
    """Knobs: ``budget``/``ratio`` (cache entries per KV head after prefill), ``window``
    (observation window, paper: 32), ``kernel_size`` (pooling, paper: 5), ``pooling`` ("avg"
    or "max"; the paper's code uses avg), ``head`` (first tokens kept whatever their score; 0: the
    paper), ``span`` (what a head keeps whole: a sentence by default, a word, a chunk, or ``token``,
    the paper's top-k; GemFilter's default caps). The cache grows by one entry per decoded token. The
    window is part of the budget: a budget at or below it keeps the newest ``budget`` tokens (as
    kvpress's SnapKV, whose window tokens score highest)."""

    name: ClassVar[str] = "snapkv"

    window: int = knob(
        32,
        minimum=1,
        description="observation window: the last prompt queries whose attention scores the cache (kept too)",
    )
    kernel_size: int = knob(5, minimum=1, odd=True, description="width of the pooling over the window's attention")
    pooling: str = knob("avg", choices=POOLINGS, description="how the window's attention is pooled over neighbours")
    head: int = knob(
        0,
        minimum=0,
        description="first prompt tokens every head keeps (instruction, system prompt), after the window",
    )
    span: str = knob(
        DEFAULT_KV_SPAN,
        choices=SPANS,
        description=(
            "what each KV head keeps whole: a sentence (or log line, chat turn), a word, "
            f"a chunk of {DEFAULT_CHUNK_TOKENS} tokens, a token (the paper)"
        ),
    )

    def layer_scorer(self) -> LayerScorer | None:
        def score(module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
            return snapkv_scores(module, query, key, self.window, self.kernel_size, self.pooling)

        return score

    def details(self) -> dict[str, object]:
        return {"span": self.span}

    def unit_begins(self, target: Target) -> torch.Tensor | None:
        return unit_begins(self.span, target.prompt_ids, target.tokenizer)

    def forced_entries(self, prompt_tokens: int, keep: int, state: PruneState) -> torch.Tensor:
        """The observation window, then the protected head as far as the budget holds it (as
        GemFilter's ``head``: issue 26)."""
        forced = torch.zeros(prompt_tokens, dtype=torch.bool)
        window = min(self.window, keep)
        forced[prompt_tokens - window :] = True
        head = min(self.head, keep - window, prompt_tokens - window)
        forced[:head] = True
        return forced
