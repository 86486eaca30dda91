"""GemFilter: early layers pick the prompt tokens that matter.

Shi et al., "Discovering the Gems in Early Layers: Accelerating Long-Context LLMs with 1000x
Input Token Reduction", 2024 (https://arxiv.org/abs/2409.17422), Algorithm 1.

Filter pass: run decoder layers ``0..r-1`` over the whole prompt with no KV cache; at layer
``r`` score every prompt token from the query/key states (after RoPE and any q/k norm, GQA
heads expanded), smooth with a 1-D average pool (kernel 5), keep the top-k, sorted ascending
so the text keeps its order. The filter pass stops inside layer ``r``'s attention: no
attention output, no later layer. The caller then prefills the full model on the kept ids
with fresh contiguous positions (the paper), or at their places in the prompt (``positions``).

Scores (knobs ``scoring`` and ``window``) are summed over the query heads and averaged over
the last ``window`` prompt queries (each query sees only the keys at or before it):

- ``"inner_product"``: raw ``q . k_j``. With ``window=1`` this is exactly the paper's
  Algorithm 1 (the last token's query only).
- ``"attention"``: per-head softmax of ``q . k_j`` (SnapKV's observation-window score).
- ``"fused"`` (default): both, each pooled and turned into a rank (0..1), merged by ``fuse``:
  the maximum (a token is kept when either scoring ranks it high) or the mean (a token ranked
  high by both beats one only a single scoring likes).

Why the default, measured on SmolLM2-135M at layer 18 with the top 1024 kept (answer recall;
``bench.gemfilter_scoring``, raw data in ``bench/results/``): neither score alone was robust.
On early magic-number needles at 3.5K the inner product kept 1.00 and attention 0.19. On real
prose at 4K/7K attention kept 0.90/0.92 and the inner product 0.61/0.33. Fused kept 1.00,
0.97, 0.92, and 0.94 on fresh 8K synthetic needles (inner 0.78, attention 0.87). The paper's
last-query score kept 0.90, 0.39, 0.00 and 0.50. The window costs ``window x n`` dot products,
nothing next to a filter pass of ``r`` full layers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from compressors.attention import ATTENTION_BACKENDS, AttentionBackend, build_attention
from compressors.base import (
    Attachment,
    CacheSizes,
    CompressionError,
    Preparation,
    PromptSelector,
    Selection,
    Target,
    model_dtype,
    selected_attachment,
)
from compressors.knobs import Conflict, knob
from compressors.kv_scoring import causal_logits, window_attention
from compressors.probe import (
    StopForward,
    attention_probe,
    decoder_layers,
    install_probe_attention,
    repeat_kv_heads,
    use_attention,
    uses_probe_attention,
    windowed_layers,
)
from compressors.profile import attached_profile
from compressors.units import (
    DEFAULT_CHUNK_TOKENS,
    MAX_SENTENCE_TOKENS,
    MAX_UNIT_TOKENS,
    SPANS,
    pick_whole_units,
    unit_begins,
)


def default_filter_layer(config: PretrainedConfig) -> int:
    """The layer of the model's profile (:mod:`compressors.profile`, from ``gemserve calibrate``;
    shipped for the embedded models); otherwise about half depth.

    Fallback rule: layer ``L // 2``. For models mixing sliding-window and global layers (Gemma
    3), the first global-attention layer at or after half depth, since a sliding layer is
    trained to look only at its local window and cannot rank far-away tokens.
    """
    text_config = config.get_text_config()
    num_layers = int(text_config.num_hidden_layers)
    profile = attached_profile(config)
    if profile is not None:
        return profile.filter_layer
    half = num_layers // 2
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        global_layers = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
        later = [i for i in global_layers if i >= half]
        if later:
            return later[0]
        if global_layers:
            return global_layers[-1]
    return half


SCORINGS = ("fused", "inner_product", "attention")
# How scoring="fused" merges its two rankings (issue 26): "max", a token's best rank, or "mean".
# The mean answered more at k=1024 on the first runs (held-out 4K 0.67 vs 0.39, Gemma 8K depth 0)
# and not on new prompts (code family, seed 47: k=256 0.51 vs 0.62; dialogue/emails seed 43: k=256
# 0.66 vs 0.69, k=1024 0.47 vs 0.57): docs/benchmarks.md, "The filter layer's scoring".
FUSES = ("max", "mean")
DEFAULT_FUSE = "max"
# Sentences (issue 26), measured with `gemserve eval` on SmolLM2 (bench/results/eval_smollm2_units,
# k=256 at 1K-4K, three tasks x three tuning haystacks x three depths, 81 prompts): mean score 0.68
# (sentence) vs 0.63 (word, the default before; token 0.47 and chunk 0.52 in an earlier run) and
# 0.59 (none); ~8 kept pieces of text per prompt instead of ~20. Checked on the held-out dialogue
# and emails families and on Gemma 3 270M at 8K/16K: docs/benchmarks.md, "Selection units, head
# and confidence".
DEFAULT_SPAN = "sentence"

# The filter pass's attention backend when a request names none (compressors.attention). Dense:
# in bench.attention (SmolLM2, 2K-8K, two haystack families) every sparse filter pass was faster
# (8K TTFT ratio 0.44 streaming vs 0.72 dense) but answered fewer needles at 8K (1/4 vs 2/4), and
# the rule keeps dense unless a backend answers at least as often. docs/benchmarks.md.
DEFAULT_FILTER_ATTENTION = "dense"
# The first prompt tokens kept whole, like the tail (issue 26): the chat template's system turn,
# the instruction, a document's title. 32: on Gemma 3 270M at 8K/16K (completion prompts, the
# instruction first) word units answered 5 of 6 prompts with it, 3 without (16K depth 0 and 8K
# depth 0.5 recovered); with sentence units it changed neither Gemma (5 of 6) nor SmolLM2's suite
# mean (0.68). docs/benchmarks.md, "Selection units, head and confidence".
DEFAULT_HEAD = 32
# Where the kept tokens sit for the rotary embedding: "compact" renumbers them 0..k-1 (the paper's
# code feeds the kept ids as a new prompt), "original" keeps their places in the prompt, so the
# question is as far from the needle as in the whole prompt and decoding goes on at position n.
# Measured on SmolLM2 (bfloat16, 1K-4K, the tuning and the held-out families): original scored 0.49
# / 0.46 against compact's 0.65 / 0.72 at k=256, and 0.53 / 0.54 against 0.57 / 0.52 at k=1024
# (docs/benchmarks.md, "The kept tokens' positions").
POSITIONS = ("compact", "original")
DEFAULT_POSITIONS = "compact"
# A request may widen a selection it is not sure of (selection_confidence below ``fallback_below``):
# to the whole prompt (``fallback="none"``) or to ``fallback=N`` tokens.
FALLBACKS = ("none",)
DEFAULT_FALLBACK_BELOW = 0.5
SKIPPED_TOO_SHORT = "prompt too short for budget"
MAX_PAYOFF_RATIO = 1000.0


def positions_for(model: PreTrainedModel) -> tuple[str, ...]:
    """The ``positions`` this model can run: not ``original`` where a layer attends through a
    sliding window (it was trained on distances inside it; kept tokens at their prompt places put
    neighbours thousands of positions apart: Gemma 3 answered noise, docs/benchmarks.md)."""
    return ("compact",) if windowed_layers(model) else POSITIONS


def default_payoff_ratio(config: PretrainedConfig) -> float:
    """The profile's measured ratio (bench/filter_payoff.py); otherwise the cost model's
    ``L / (L - r - 1)``: with prefill cost roughly linear in length, a filter pass over ``n``
    tokens costs ``(r + 1) / L`` of a full prefill, and the kept ``k`` tokens cost ``k / n`` of it."""
    profile = attached_profile(config)
    if profile is not None and profile.payoff_ratio is not None:
        return profile.payoff_ratio
    # A profile knows the full depth; a truncated filter model's own config does not.
    num_layers = int(profile.architecture[1]) if profile else int(config.get_text_config().num_hidden_layers)
    layer = default_filter_layer(config)
    return num_layers / max(1, num_layers - layer - 1)


def last_query_scores(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """``query (1, H, q, d)``, ``key (1, H_kv, n, d)`` -> ``(n,)`` scores of the last query,
    summed over the query heads (GQA keys repeated to line up with them)."""
    groups = query.shape[1] // key.shape[1]
    keys = repeat_kv_heads(key, groups)
    last_query = query[:, :, -1:, :].to(torch.float32)
    return torch.matmul(last_query, keys.to(torch.float32).transpose(-1, -2))[0, :, 0, :].sum(dim=0)


def window_inner_products(query: torch.Tensor, key: torch.Tensor, window: int) -> torch.Tensor:
    """``(n,)``: raw ``q . k_j`` of the last ``window`` queries, summed over the query heads and
    averaged over the window; a query's future keys count 0. ``window=1``: :func:`last_query_scores`."""
    window = min(window, query.shape[-2])
    if window == 1:
        return last_query_scores(query, key)
    logits, future = causal_logits(query[:, :, -window:, :], key, key.shape[-2] - window)  # (H, W, n)
    return logits.masked_fill(future, 0.0).sum(dim=(0, 1)) / window


def token_scores(module: nn.Module, query: torch.Tensor, key: torch.Tensor, scoring: str, window: int) -> torch.Tensor:
    """GemFilter's score of every prompt token at the filter layer (see the module doc): ``(n,)``,
    or ``(2, n)`` for ``fused`` (inner product and attention rows, merged by :func:`pick_indices`).
    Memory: ``heads x window x n`` float32 logits, ~150 MB for 9 heads at 128K tokens."""
    if scoring == "inner_product":
        return window_inner_products(query, key, window)
    attention = window_attention(module, query, key, window).sum(dim=0) / min(window, query.shape[-2])
    if scoring == "attention":
        return attention
    return torch.stack([window_inner_products(query, key, window), attention])  # fused: pick_indices merges


def pooled_scores(scores: torch.Tensor, kernel_size: int, fuse: str = DEFAULT_FUSE) -> torch.Tensor:
    """``(n,)`` or ``(m, n)`` scores -> ``(n,)``: each row average-pooled; m rows to fuse are
    turned into ranks (0..1) and a token takes its best rank over the rows (``fuse="max"``) or
    their mean (``"mean"``)."""
    n = scores.shape[-1]
    rows = scores.reshape(-1, 1, n).to(torch.float32)
    pooled = F.avg_pool1d(rows, kernel_size=kernel_size, padding=kernel_size // 2, stride=1).view(-1, n)
    if pooled.shape[0] > 1:
        ranks = pooled.argsort(dim=-1).argsort(dim=-1).to(torch.float32) / n
        pooled = ranks.mean(dim=0) if fuse == "mean" else ranks.amax(dim=0)
    return pooled.view(n).clone()


def pick_indices(
    scores: torch.Tensor,
    keep: int,
    kernel_size: int,
    tail: int,
    unit_begins: torch.Tensor | None = None,
    head: int = 0,
    fuse: str = DEFAULT_FUSE,
) -> list[int]:
    """Pool, force the protected tail in, take the top ``keep`` and sort them ascending.

    ``scores`` is ``(n,)``, or ``(m, n)`` for m scorings to fuse (:func:`pooled_scores`). With
    ``unit_begins`` (``(n,)`` bool, where each word or chunk starts) whole units are kept
    instead of single tokens (:func:`compressors.units.pick_whole_units`)."""
    return pick_pooled(pooled_scores(scores, kernel_size, fuse), keep, tail, unit_begins, head)


def pick_pooled(
    pooled: torch.Tensor, keep: int, tail: int, unit_begins: torch.Tensor | None = None, head: int = 0
) -> list[int]:
    """:func:`pick_indices` on scores already pooled (``(n,)``, left unchanged): the last ``tail``
    and then the first ``head`` tokens kept first (as far as ``keep`` holds them)."""
    pooled = pooled.clone()
    n = pooled.numel()
    if unit_begins is not None:
        return pick_whole_units(pooled, keep, tail, unit_begins, head)
    protected = min(tail, keep, n)
    if protected:
        pooled[n - protected :] = float("inf")
    head = min(head, keep - protected, n - protected)
    if head:
        pooled[:head] = float("inf")
    kept = torch.topk(pooled, keep).indices
    return sorted(kept.tolist())


def selection_confidence(scores: torch.Tensor, scoring: str, kept: list[int], head: int, tail: int) -> float | None:
    """How sure a selection is: the share of the filter layer's attention mass (its window queries'
    softmax, summed over heads) that the kept tokens hold, among the tokens the selection chose
    (the protected head and tail, and the first token, where attention sinks pile up, left
    out). 1: everything the layer attended to was kept; ``(k - protected) / (n - protected)``
    when attention is flat. None for ``scoring="inner_product"``, which computes no attention."""
    if scoring == "inner_product":
        return None
    mass = (scores[-1] if scores.dim() == 2 else scores).to(torch.float32).cpu().clamp_min(0.0)
    n = mass.numel()
    chosen = torch.ones(n, dtype=torch.bool)
    chosen[: max(1, head)] = False
    chosen[n - min(tail, n) :] = False
    total = float(mass[chosen].sum())
    if total <= 0.0:
        return None
    kept_mask = torch.zeros(n, dtype=torch.bool)
    kept_mask[torch.tensor(kept, dtype=torch.long)] = True
    return min(1.0, float(mass[chosen & kept_mask].sum()) / total)


@dataclass
class GemFilter(PromptSelector):
    """Early-layer token selection. Knobs: ``budget``/``ratio`` (tokens to keep), ``layer``
    (filter layer r; None = calibrated default for the model), ``scoring`` (``fused``,
    ``inner_product`` or ``attention``), ``fuse`` (how ``fused`` merges its two rankings: ``max``
    or ``mean``), ``window`` (final prompt queries averaged; the paper: 1),
    ``kernel_size`` (average pooling, paper: 5), ``tail`` (final prompt tokens always kept: the
    question and the chat template's generation prefix), ``filter_attention`` and
    ``filter_attention_knobs`` (the attention backend of layers ``< r`` in the filter pass, see
    :mod:`compressors.attention`), ``payoff_ratio`` (filter only prompts of at least this many
    times the kept tokens, since a shorter one costs more filtered than whole; None: measured
    per model, 0: always filter), ``span`` (``token``, ``word`` or ``chunk``: what the top-k keeps
    whole, :mod:`compressors.units`) and ``chunk_size`` (tokens per chunk for ``span="chunk"``)."""

    name: ClassVar[str] = "gemfilter"
    CONFLICTS: ClassVar[tuple[Conflict, ...]] = (
        Conflict(
            (("fallback", None), ("scoring", ("inner_product",))),
            "a fallback needs the selection's confidence, which scoring='inner_product' does not compute "
            "(use scoring='fused' or 'attention')",
            "compression.fallback",
        ),
    )

    layer: int | None = knob(
        None,
        minimum=0,
        description=(
            "filter layer r whose attention scores the prompt; null: the model's profile, else the first "
            "global layer near half depth"
        ),
    )
    scoring: str = knob(
        "fused",
        choices=SCORINGS,
        description=(
            "fused: inner products and softmax attention, their ranks merged by fuse; inner_product: the"
            " paper's q.k; attention: softmax only"
        ),
    )
    fuse: str = knob(
        DEFAULT_FUSE,
        choices=FUSES,
        description=(
            "with scoring=fused, how the two rankings merge: max, a token's best rank; mean, its mean rank "
            "(the other scorings have one ranking)"
        ),
    )
    window: int = knob(32, minimum=1, description="last prompt queries whose scores are averaged (the paper: 1)")
    kernel_size: int = knob(5, minimum=1, odd=True, description="width of the average pooling over token scores")
    tail: int = knob(
        32, minimum=0, description="last prompt tokens kept first (the question, the chat template's generation prefix)"
    )
    filter_attention: str = knob(
        DEFAULT_FILTER_ATTENTION,
        choices=tuple(ATTENTION_BACKENDS),
        description="attention backend of layers < r in the filter pass",
    )
    filter_attention_knobs: dict[str, Any] | None = field(
        default=None, metadata={"description": "knobs of filter_attention's backend"}
    )
    payoff_ratio: float | None = knob(
        None,
        minimum=0.0,
        maximum=MAX_PAYOFF_RATIO,
        description=(
            "filter only prompts of at least this many times the kept tokens, shorter ones are kept "
            "whole; null: the model's profile; 0: always"
        ),
    )
    span: str = knob(
        DEFAULT_SPAN,
        choices=SPANS,
        description="what the top-k keeps whole: a sentence (or log line, chat turn), a word, a token, a chunk",
    )
    chunk_size: int = knob(DEFAULT_CHUNK_TOKENS, minimum=1, maximum=256, description="tokens per chunk with span=chunk")
    sentence_tokens: int = knob(
        MAX_SENTENCE_TOKENS,
        minimum=MAX_UNIT_TOKENS,
        maximum=512,
        description="with span=sentence: a longer sentence is cut at a word start after this many tokens",
    )
    head: int = knob(
        DEFAULT_HEAD, minimum=0, description="first prompt tokens kept first (system prompt, instruction, title)"
    )
    positions: str = knob(
        DEFAULT_POSITIONS,
        choices=POSITIONS,
        description=(
            "rotary positions of the kept tokens: compact 0..k-1 (the paper) or original, their places in "
            "the prompt, decoding on at the prompt's length (hf backend, models without sliding-window layers)"
        ),
    )
    fallback: str | int | None = knob(
        None,
        choices=FALLBACKS,
        minimum=1,
        description=(
            "when confidence < fallback_below: 'none' runs the prompt uncompressed, N widens the "
            "selection to N tokens; null: never"
        ),
    )
    fallback_below: float = knob(
        DEFAULT_FALLBACK_BELOW, minimum=0.0, maximum=1.0, description="the confidence under which the fallback runs"
    )

    def validate(self) -> None:
        super().validate()
        self.filter_backend()  # filter_attention_knobs against the backend they configure

    def fallback_keep(self, prompt_tokens: int, default_budget: int) -> int | None:
        """Tokens a low-confidence selection widens to: the whole prompt (``fallback="none"``) or
        ``fallback=N`` tokens; None when no fallback is asked for."""
        if self.fallback == "none":
            return prompt_tokens
        if isinstance(self.fallback, int):
            return max(self.resolve_budget(prompt_tokens, default_budget), min(self.fallback, prompt_tokens))
        return None

    def most_kept(self, prompt_tokens: int, default_budget: int) -> int:
        """The most prompt tokens the prefill can see: the budget, or what its fallback widens to."""
        keep = self.resolve_budget(prompt_tokens, default_budget)
        return max(keep, self.fallback_keep(prompt_tokens, default_budget) or 0)

    def prefill_positions(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> int:
        # The whole prompt's positions when nothing is dropped (too short to pay off) or when the kept
        # tokens keep their places; else the most the prefill may keep (a fallback may widen it).
        if self.positions == "original" or not self.selects_with_model(model, prompt_tokens, default_budget):
            return prompt_tokens
        return self.most_kept(prompt_tokens, default_budget)

    def attachment_for(self, prompt_ids: torch.Tensor, selection: Selection) -> Attachment:
        """The prefill of ``selection``'s kept ids, at the positions this method's knob asks for."""
        return selected_attachment(prompt_ids, selection, original_positions=self.positions == "original")

    def cache_tokens(self, prompt_tokens: int, max_tokens: int, default_budget: int) -> int:
        return self.most_kept(prompt_tokens, default_budget) + max_tokens

    def cache_sizes(
        self, model: PreTrainedModel, prompt_tokens: int, max_tokens: int, default_budget: int
    ) -> CacheSizes:
        """The prefill planned at the budget; the most it may hold counts the fallback's widening
        (the runner tells the scheduler when a fallback widened the prefill)."""
        if not self.selects_with_model(model, prompt_tokens, default_budget):
            return CacheSizes(prompt_tokens, prompt_tokens, prompt_tokens + max_tokens)
        keep = self.resolve_budget(prompt_tokens, default_budget)
        return CacheSizes(keep, keep, self.cache_tokens(prompt_tokens, max_tokens, default_budget))

    def filter_backend(self) -> AttentionBackend:
        """A fresh backend for one filter pass (it counts what that pass computed)."""
        return build_attention(self.filter_attention, self.filter_attention_knobs, field="filter_attention")

    def pays_off(self, model: PreTrainedModel, prompt_tokens: int, keep: int) -> bool:
        """Is the prompt long enough that the filter pass plus the prefill of ``keep`` tokens costs
        less than prefilling all ``prompt_tokens``?"""
        ratio = self.payoff_ratio if self.payoff_ratio is not None else default_payoff_ratio(model.config)
        return prompt_tokens >= ratio * keep

    def selects_with_model(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> bool:
        """The filter pass runs unless the budget covers the prompt or the prompt is too short to pay off."""
        keep = self.resolve_budget(prompt_tokens, default_budget)
        return keep < prompt_tokens and self.pays_off(model, prompt_tokens, keep)

    def filter_pass(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> tuple[int, int] | None:
        if not self.selects_with_model(model, prompt_tokens, default_budget):
            return None
        chunks = self.filter_backend().prefills_in_chunks
        return self.filter_layer(model) + 1, min(self.window, prompt_tokens) if chunks else prompt_tokens

    def filter_layer(self, model: PreTrainedModel) -> int:
        return self.layer if self.layer is not None else default_filter_layer(model.config)

    def validate_for_model(self, model: PreTrainedModel) -> None:
        num_layers = len(decoder_layers(model))
        layer = self.filter_layer(model)
        if not 0 <= layer < num_layers:
            raise CompressionError(
                f"layer {layer} is out of range: this model has layers 0..{num_layers - 1}",
                param="compression.layer",
            )
        if self.positions not in positions_for(model):
            windowed = windowed_layers(model)
            raise CompressionError(
                f"positions='original' cannot run on {model.config.model_type}: {len(windowed)} of its "
                f"{num_layers} layers attend through a sliding window of {min(windowed.values())} tokens, "
                "trained only on distances inside it, and the kept tokens' places put neighbours thousands "
                "of positions apart (Gemma 3 answered noise); use positions='compact'",
                param="compression.positions",
            )

    def select(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        default_budget: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Selection:
        """``tokenizer`` tells where words start (``span="word"``); other spans need none."""
        preparation = self.prepare(Target(model, input_ids, None, default_budget, tokenizer))
        return preparation.run_whole().selection()

    def prepare(self, target: Target) -> GemFilterPreparation:
        """The selection, its filter pass run a chunk at a time by the caller (:class:`Preparation`)."""
        return GemFilterPreparation(self, target)

    def scoring_model(self, model: PreTrainedModel, filter_model: PreTrainedModel | None) -> PreTrainedModel:
        """The model the filter pass runs on: ``filter_model`` (``model``'s first layers, maybe in a
        cheaper dtype, :attr:`Target.filter_model`) when it holds this request's filter layer, else
        ``model`` itself."""
        if filter_model is not None and self.filter_layer(model) < len(decoder_layers(filter_model)):
            return filter_model
        return model

    def filter_scores(
        self, model: PreTrainedModel, input_ids: torch.Tensor, filter_model: PreTrainedModel | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The filter pass (on :meth:`scoring_model`), whole: this method's scores of every prompt
        token and its attention report."""
        backend = self.filter_backend()
        scorer = self.scoring_model(model, filter_model)
        scores = filter_pass_scores(scorer, input_ids, self.filter_layer(model), self.scoring, self.window, backend)
        return scores, backend.report()

    def choose(
        self, scores: torch.Tensor, keep: int, input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase | None
    ) -> list[int]:
        """The ``keep`` kept positions from the filter pass's scores, whole units per ``span``."""
        return self.choose_pooled(pooled_scores(scores, self.kernel_size, self.fuse), keep, input_ids, tokenizer)

    def choose_pooled(
        self, pooled: torch.Tensor, keep: int, input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase | None
    ) -> list[int]:
        # On the CPU whatever device the filter pass ran on: n scores, and the units' bookkeeping.
        begins = self.unit_begins(input_ids, tokenizer)
        return pick_pooled(pooled.cpu(), keep, self.tail, None if begins is None else begins.cpu(), self.head)

    def selection_from_scores(
        self,
        target: Target,
        scores: torch.Tensor,
        keep: int,
        started: float,
        filter_report: dict[str, Any] | None = None,
    ) -> Selection:
        """The :class:`Selection` from a filter pass's ``scores``: the budget's pick, its confidence,
        and, when the request asked for a fallback and the confidence is below ``fallback_below``,
        the wider pick instead (the response says so in ``compression.fallback``)."""
        n = target.prompt_tokens
        pooled = pooled_scores(scores, self.kernel_size, self.fuse).cpu()  # n floats: pick and strip here
        kept = self.choose_pooled(pooled, keep, target.prompt_ids, target.tokenizer)
        confidence = selection_confidence(scores, self.scoring, kept, self.head, self.tail)
        wider = self.fallback_keep(n, target.default_budget)
        fell_back = wider is not None and wider > keep and confidence is not None and confidence < self.fallback_below
        if fell_back:
            assert wider is not None
            kept = self.choose_pooled(pooled, wider, target.prompt_ids, target.tokenizer)
        selection = self.selection(target.model, n, kept, started, None, filter_report)
        selection.confidence = confidence
        selection.fallback = ("none" if len(kept) == n else f"budget:{len(kept)}") if fell_back else None
        selection.token_scores = pooled
        return selection

    def unit_begins(self, input_ids: torch.Tensor, tokenizer: PreTrainedTokenizerBase | None) -> torch.Tensor | None:
        return unit_begins(self.span, input_ids, tokenizer, self.sentence_tokens, self.chunk_size)

    def selection(
        self,
        model: PreTrainedModel,
        n: int,
        kept: list[int],
        start: float,
        skipped: str | None = None,
        filter_report: dict[str, Any] | None = None,
    ) -> Selection:
        keep = len(kept)
        details: dict[str, object] = {"scoring": self.scoring, "window": min(self.window, n), "span": self.span}
        if self.scoring == "fused":
            details["fuse"] = self.fuse
        if self.head:
            details["protected_head"] = min(self.head, keep, n)
        return Selection(
            method=self.name,
            prompt_tokens=n,
            kept_indices=kept,
            select_ms=(time.perf_counter() - start) * 1000.0,
            protected_tail=min(self.tail, keep, n),
            layer=self.filter_layer(model),
            details=details,
            skipped=skipped,
            filter_attention=filter_report,
        )


def filter_pass_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    layer: int,
    scoring: str = "fused",
    window: int = 32,
    attention: AttentionBackend | None = None,
) -> torch.Tensor:
    """Run layers ``0..layer-1`` and stop inside ``layer``'s attention; return the ``(n,)`` scores
    (``(2, n)`` for ``fused``: inner product and attention, merged by :func:`pick_indices`).
    ``attention`` computes the attention of layers ``< layer`` (None: dense SDPA)."""
    if not uses_probe_attention(model):
        install_probe_attention(model)

    def score_and_stop(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        if getattr(module, "layer_idx", None) == layer:
            raise StopForward(token_scores(module, query, key, scoring, window))

    with torch.inference_mode(), attention_probe(score_and_stop), use_attention(attention):
        try:
            model.base_model(input_ids=input_ids, use_cache=False)
        except StopForward as stop:
            return stop.payload
    raise RuntimeError(f"the filter pass never reached layer {layer}'s attention")


class ResumableFilterPass:
    """:func:`filter_pass_scores` run a chunk of the prompt at a time (:meth:`run`), for a
    continuous batch that runs other requests' forwards in between. A first chunk that is the whole
    prompt is the pass as always, with no cache at all; otherwise layers ``0..layer`` keep a KV
    cache of the prompt while the pass runs (``(layer + 1) / L`` of a full prefill's cache), each
    chunk stops inside ``layer``'s attention after its keys are cached, and the last chunk, which
    must hold the ``window`` scored queries, scores every prompt token. Same math as one pass
    (causal attention over the same keys), so the scores agree to float rounding."""

    def __init__(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        layer: int,
        scoring: str,
        window: int,
        attention: AttentionBackend,
    ) -> None:
        self.model = model
        self.input_ids = input_ids
        self.layer = layer
        self.scoring = scoring
        self.window = window
        self.attention = attention
        self.done = 0  # prompt tokens the pass has run
        self.scores: torch.Tensor | None = None
        self._cache: Any = None  # the pass's own cache, dropped when it ends

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def tail(self) -> int:
        """The last chunk's least length: the scored queries; the whole pass where the backend
        cannot run one in chunks."""
        return min(self.window, self.tokens) if self.attention.prefills_in_chunks else self.tokens

    def run(self, start: int, tokens: int) -> None:
        """Run prompt tokens ``start .. start + tokens - 1`` (the pass goes in order, each chunk
        once; a last chunk shorter than :attr:`tail` is refused: it could not score)."""
        n = self.tokens
        end = start + tokens
        if start != self.done or tokens < 1 or end > n:
            raise ValueError(f"filter pass chunk {start}..{end} out of order (done: {self.done} of {n})")
        if end < n and n - end < self.tail:
            raise ValueError(f"filter pass chunk {start}..{end} leaves {n - end} tokens, fewer than {self.tail}")
        if start == 0 and end == n:
            self.scores = filter_pass_scores(
                self.model, self.input_ids, self.layer, self.scoring, self.window, self.attention
            )
            self.done = n
            return
        if not uses_probe_attention(self.model):
            install_probe_attention(self.model)
        if self._cache is None:
            from transformers.cache_utils import DynamicCache

            self._cache = DynamicCache(config=self.model.config)
        last = end == n
        layer, scoring, window = self.layer, self.scoring, self.window

        def score_or_stop(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            if getattr(module, "layer_idx", None) == layer:
                raise StopForward(token_scores(module, query, key, scoring, window) if last else None)

        positions = torch.arange(start, end, device=self.input_ids.device).unsqueeze(0)
        with torch.inference_mode(), attention_probe(score_or_stop), use_attention(self.attention):
            try:
                ids = self.input_ids[:, start:end]
                self.model.base_model(input_ids=ids, past_key_values=self._cache, position_ids=positions)
            except StopForward as stop:
                self.scores = stop.payload if last else None
            else:
                raise RuntimeError(f"the filter pass never reached layer {layer}'s attention")
        self.done = end
        if last:
            self._cache = None


class GemFilterPreparation(Preparation):
    """One request's selection on its way: the filter pass (when it runs) a chunk at a time, then
    the pick. ``select_ms`` is wall time from here to the pick, other requests' work between the
    chunks included."""

    def __init__(self, method: GemFilter, target: Target) -> None:
        super().__init__()
        method.validate()
        method.validate_for_model(target.model)
        self.method = method
        self.target = target
        self.started = time.perf_counter()
        n = target.prompt_tokens
        self.keep = method.resolve_budget(n, target.default_budget)
        self.skipped: str | None = None
        self.scorer: PreTrainedModel | None = None
        self.backend: AttentionBackend | None = None
        self.filter_pass: ResumableFilterPass | None = None
        if self.keep < n and not method.pays_off(target.model, n, self.keep):
            self.skipped = SKIPPED_TOO_SHORT
        elif self.keep < n:
            self.scorer = method.scoring_model(target.model, target.filter_model)
            self.backend = method.filter_backend()
            layer = method.filter_layer(target.model)
            self.filter_pass = ResumableFilterPass(
                self.scorer, target.prompt_ids, layer, method.scoring, method.window, self.backend
            )
            self.filter_tokens = n
            self.filter_layers = layer + 1
            self.filter_tail = self.filter_pass.tail
        self._selection: Selection | None = None

    def run_filter(self, start: int, tokens: int) -> None:
        assert self.filter_pass is not None, "no filter pass runs for this request"
        self.filter_pass.run(start, tokens)

    def selection(self) -> Selection:
        if self._selection is None:
            self._selection = self._pick()
        return self._selection

    def attachment(self) -> Attachment:
        selection = self.selection()
        return self.method.attachment_for(self.target.prompt_ids, selection)

    def _pick(self) -> Selection:
        method, target = self.method, self.target
        n = target.prompt_tokens
        if self.filter_pass is None:  # k >= n (identical to `none`) or too short to pay off
            return method.selection(target.model, n, list(range(n)), self.started, self.skipped)
        if self.filter_pass.scores is None:
            raise RuntimeError(f"the filter pass ran {self.filter_pass.done} of {n} tokens: it has not ended")
        assert self.scorer is not None and self.backend is not None
        selection = method.selection_from_scores(
            target, self.filter_pass.scores, self.keep, self.started, self.backend.report()
        )
        selection.filter_dtype = model_dtype(self.scorer)
        self.filter_pass = None  # its tensors go with it; the selection stays
        return selection
