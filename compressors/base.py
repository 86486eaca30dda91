"""The method contract: what a compression method is, what it returns.

Two kinds of method (shared DESIGN.md, "The request path"):

* a :class:`PromptSelector` maps the prompt's token ids to the kept token ids before any KV
  cache exists (GemFilter); the model then prefills only the kept ids with fresh positions;
* a :class:`KVCompressor` prefills the whole prompt and prunes the real cache tensors
  afterwards (SnapKV, StreamingLLM), and may keep pruning while decoding (H2O).

Methods take a model and token ids, never a request or a backend: this package knows torch
and transformers, nothing of HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache


class CompressionError(ValueError):
    """Bad method name, knob or value; ``param`` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def contiguous_spans(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted indices -> half-open runs ``[(start, end), ...]`` of consecutive positions."""
    spans: list[tuple[int, int]] = []
    for index in indices:
        if spans and spans[-1][1] == index:
            spans[-1] = (spans[-1][0], index + 1)
        else:
            spans.append((index, index + 1))
    return spans


@dataclass
class Selection:
    """What a method kept of an ``n``-token prompt.

    ``kept_indices`` are positions in the original prompt, sorted ascending and unique. For a
    prompt selector they are the tokens the model sees; for a KV compressor they are the
    union over layers and heads of what the cache holds (per-head sets may differ).
    """

    method: str
    prompt_tokens: int
    kept_indices: list[int]
    select_ms: float = 0.0
    protected_tail: int = 0
    layer: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None  # why a selector kept everything without running (e.g. prompt too short)
    filter_attention: dict[str, Any] | None = None  # the filter pass's attention report (GemFilter)

    @property
    def kept_tokens(self) -> int:
        return len(self.kept_indices)

    @property
    def ratio(self) -> float:
        return self.kept_tokens / self.prompt_tokens if self.prompt_tokens else 1.0

    @property
    def spans(self) -> list[tuple[int, int]]:
        return contiguous_spans(self.kept_indices)


def cache_bytes(cache: Cache | None) -> int:
    """Bytes of every key and value tensor the cache holds right now (not an estimate)."""
    if cache is None:
        return 0
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


@dataclass
class Method:
    """A compression method: typed dataclass fields are its knobs, with paper defaults.

    ``budget`` (tokens) and ``ratio`` (fraction of the prompt) are shared by every method
    except ``none``; at most one may be given.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "none" | "prompt" | "kv"

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """Raise :class:`CompressionError` for values no prompt could make valid."""

    def validate_for_model(self, model: PreTrainedModel) -> None:
        """Raise :class:`CompressionError` for values this model cannot take."""

    def validate_for_prompt(self, prompt_tokens: int, default_budget: int) -> None:
        """Raise :class:`CompressionError` for knobs at odds with the budget this prompt resolves
        to (a ``ratio`` or the server's default is only a number of tokens once the prompt is
        known). The engine calls it at admission, before any compute and before any response byte."""


@dataclass
class BudgetedMethod(Method):
    budget: int | None = None
    ratio: float | None = None

    def validate(self) -> None:
        if self.budget is not None and self.ratio is not None:
            raise CompressionError("give either 'budget' or 'ratio', not both", param="compression.budget")
        if self.budget is not None and (isinstance(self.budget, bool) or self.budget <= 0):
            raise CompressionError(
                f"budget must be a positive number of tokens, got {self.budget}", param="compression.budget"
            )
        if self.ratio is not None and not 0.0 < self.ratio <= 1.0:
            raise CompressionError(f"ratio must be in (0, 1], got {self.ratio}", param="compression.ratio")

    def resolve_budget(self, prompt_tokens: int, default_budget: int) -> int:
        """Tokens to keep for a prompt of this length; never more than the prompt."""
        if self.ratio is not None:
            return max(1, min(prompt_tokens, math.ceil(self.ratio * prompt_tokens)))
        budget = self.budget if self.budget is not None else default_budget
        return min(budget, prompt_tokens)


@dataclass
class PromptSelector(BudgetedMethod):
    """Chooses which prompt tokens the model will see, before any KV cache exists."""

    kind: ClassVar[str] = "prompt"

    def select(
        self,
        model: PreTrainedModel,
        input_ids: torch.Tensor,
        default_budget: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Selection:
        """``input_ids``: ``(1, n)`` -> :class:`Selection` with sorted unique kept indices
        (``tokenizer``: the prompt's, for selectors that keep whole words)."""
        raise NotImplementedError


@dataclass
class KVCompressor(BudgetedMethod):
    """Prefills the whole prompt, then shrinks the real cache tensors.

    The engine calls, in order: ``prefill_observer`` around the prefill forward (a context in
    which the method may read attention through :mod:`compressors.probe`), ``compress`` once
    after prefill, then ``decode_observer`` around each decode forward followed by
    ``after_decode_step`` (for methods that keep evicting, like H2O).
    """

    kind: ClassVar[str] = "kv"

    @contextmanager
    def prefill_observer(self, model: PreTrainedModel, prompt_tokens: int) -> Iterator[None]:
        yield

    def compress(self, cache: Cache, prompt_tokens: int, default_budget: int) -> Selection:
        raise NotImplementedError

    @contextmanager
    def decode_observer(self, model: PreTrainedModel) -> Iterator[None]:
        yield

    def after_decode_step(self, cache: Cache) -> None:
        """Called after every decode forward; the default keeps the cache as it is."""
