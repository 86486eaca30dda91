"""The method contract: what a compression method is, what it returns, how the engine drives it.

Two kinds of method (shared DESIGN.md, "The request path"):

* a :class:`PromptSelector` maps the prompt's token ids to the kept token ids before any KV
  cache exists (GemFilter); the model then prefills only the kept ids (at fresh positions, or at
  their places in the prompt);
* a :class:`KVCompressor` prefills the whole prompt and shrinks the real cache tensors (SnapKV,
  StreamingLLM: each layer as soon as its attention is done), and may keep pruning while decoding
  (H2O).

Every method is driven through one lifecycle, in the spirit of kvpress's ``with press(model):``::

    with method.attach(model, prompt_ids, cache, default_budget, tokenizer) as hooks:
        with hooks.prefill():
            forward(hooks.prefill_ids, hooks.prefill_position_ids if set, else 0 .. len - 1)
        hooks.selection               # what was kept, final once prefill() has exited
        for each generated token:     # positions go on at hooks.next_position
            with hooks.decode_step():
                forward(token)

The HF engine, the vLLM engine (whose methods are prompt selectors only) and the tests all drive
this protocol; none of them asks a method what kind it is.

A continuous-batching engine needs three more answers, which every method and attachment gives:
:meth:`Method.prepare` builds the attachment through a :class:`Preparation`, whose model work over
the prompt before the prefill (GemFilter's filter pass) runs a chunk at a time, as large as the
engine's scheduler plans, with other requests' forwards between them; the method's
``chunkable_prefill`` says whether its attachment's ``prefill()`` hooks nothing inside the forward,
so the prefill may be split into chunks (each its own forward, or riding in others');
``batched_decode`` says the same of ``decode_step()``, whose work then is all in
:meth:`Attachment.after_decode`, run after a decode forward shared with other requests.

Methods take a model and token ids, never a request or a backend: this package knows torch
and transformers, nothing of HTTP.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from compressors.errors import CompressionError
from compressors.knobs import Conflict, check_conflicts, check_declared_bounds, knob


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
    union over layers and heads of what the cache holds (per-head sets may differ), and
    ``kv_tokens_per_head`` is what each head holds (mean over layers): that is what the method
    kept, so ``kept_tokens`` reports it.
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
    filter_dtype: str | None = None  # the dtype the filter pass ran in (GemFilter, when it ran)
    # What a response shows when it asks for scores (server/engine/spans.py bins both), kept as
    # tensors so nothing is converted unless asked: a prompt selector's ``(n,)`` score of each
    # prompt token (higher = more worth keeping), and a KV method's original positions each
    # layer's heads hold after prefill, ``{layer: (kv_heads, len)}``.
    token_scores: torch.Tensor | None = None
    layer_positions: dict[int, torch.Tensor] | None = None
    kv_tokens_per_head: int | None = None  # KV methods: cache entries per head after prefill
    # GemFilter: how sure the selection is (compressors.gemfilter.selection_confidence), and what a
    # low confidence widened it to ("none": the whole prompt, "budget:N"); None: it kept its budget.
    confidence: float | None = None
    fallback: str | None = None

    @property
    def kept_tokens(self) -> int:
        """Tokens the model works with: the prompt tokens it sees, or a KV cache's entries per head."""
        return len(self.kept_indices) if self.kv_tokens_per_head is None else self.kv_tokens_per_head

    @property
    def kept_tokens_union(self) -> int | None:
        """KV methods: prompt positions some layer's head holds (None for prompt selectors)."""
        return None if self.kv_tokens_per_head is None else len(self.kept_indices)

    @property
    def ratio(self) -> float:
        return self.kept_tokens / self.prompt_tokens if self.prompt_tokens else 1.0

    @property
    def spans(self) -> list[tuple[int, int]]:
        return contiguous_spans(self.kept_indices)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def model_dtype(model: torch.nn.Module) -> str:
    """The dtype a model's weights hold, by name."""
    return dtype_name(next(model.parameters()).dtype)


def cache_bytes(cache: Cache | None) -> int:
    """Bytes of every key and value tensor the cache holds right now (not an estimate)."""
    if cache is None:
        return 0
    return sum(layer_bytes(layer) for layer in cache.layers)


def layer_bytes(layer: object) -> int:
    """Bytes of one cache layer's key and value tensors (0 before it holds any)."""
    return sum(
        tensor.numel() * tensor.element_size()
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None))
        if isinstance(tensor, torch.Tensor)
    )


@dataclass
class Method:
    """A compression method: typed dataclass fields are its knobs (declared with
    :func:`~compressors.knobs.knob`, one pydantic model of them per class), with paper defaults.

    ``budget`` (tokens) and ``ratio`` (fraction of the prompt) are shared by every method
    except ``none``; given both, the budget caps the ratio.
    """

    name: ClassVar[str]
    kind: ClassVar[str]  # "none" | "prompt" | "kv"
    # Its attachment's prefill() hooks nothing inside the forward, known before it is attached: an
    # engine may plan the prefill in chunks with other requests' forwards between them.
    chunkable_prefill: ClassVar[bool] = True
    # Knob values that may not be given together (one declaration: the 400 and the schema).
    CONFLICTS: ClassVar[tuple[Conflict, ...]] = ()

    @classmethod
    def knobs(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def validate(self) -> None:
        """Raise :class:`CompressionError` for values no prompt could make valid: the knobs through
        the class's knob model (the types and bounds their fields declare, compressors/knobs.py),
        then the values they may not take together (subclasses add rules between knobs)."""
        check_declared_bounds(self, f"method '{self.name}'", "compression")
        check_conflicts(self, self.CONFLICTS)

    def validate_for_model(self, model: PreTrainedModel) -> None:
        """Raise :class:`CompressionError` for values this model cannot take."""

    def validate_for_prompt(self, prompt_tokens: int, default_budget: int) -> None:
        """Raise :class:`CompressionError` for knobs at odds with the budget this prompt resolves
        to (a ``ratio`` or the server's default is only a number of tokens once the prompt is
        known). The engine calls it at admission, before any compute and before any response byte."""

    def prefill_positions(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> int:
        """Positions the prompt takes before the first generated token (the context check at
        admission): the whole prompt here."""
        return prompt_tokens

    def selects_with_model(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> bool:
        """Does choosing what to keep run the model over the prompt before the prefill (GemFilter's
        filter pass)? False: it is decided without a forward (``none``, KV methods, a selector that
        keeps everything), so an engine need not queue it behind other requests' passes."""
        return False

    def cache_tokens(self, prompt_tokens: int, max_tokens: int, default_budget: int) -> int:
        """The most entries per layer this request's KV cache holds once prefilled, to its last
        token (the whole prompt plus every output): a request beyond a batch's memory never runs."""
        return prompt_tokens + max_tokens

    def cache_sizes(
        self, model: PreTrainedModel, prompt_tokens: int, max_tokens: int, default_budget: int
    ) -> CacheSizes:
        """What a batch's scheduler plans for this request (see :class:`CacheSizes`)."""
        return CacheSizes(prompt_tokens, prompt_tokens, self.cache_tokens(prompt_tokens, max_tokens, default_budget))

    def filter_pass(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> tuple[int, int] | None:
        """The pass :meth:`prepare`'s :class:`Preparation` will run over the prompt, as
        ``(layers, tail)`` (decoder layers it runs, least length of its last chunk); None: none."""
        return None

    @contextmanager
    def attach(
        self,
        model: PreTrainedModel,
        prompt_ids: torch.Tensor,
        cache: Cache | None,
        default_budget: int,
        tokenizer: PreTrainedTokenizerBase | None = None,
    ) -> Iterator[Attachment]:
        """Attach this method to one request on ``model``: ``prompt_ids (1, n)``, the request's
        empty ``cache`` (None where the caller owns no cache, e.g. in front of vLLM), the server's
        default budget, the prompt's tokenizer (for selectors that keep whole words)."""
        yield self.attachment(Target(model, prompt_ids, cache, default_budget, tokenizer))

    def prepare(self, target: Target) -> Preparation:
        """The attachment, built in steps where the method runs the model before the prefill
        (:class:`Preparation`); at once otherwise."""
        return Preparation(lambda: self.attachment(target))

    def attachment(self, target: Target) -> Attachment:
        """This method's hooks for one request; the base keeps everything and hooks nothing."""
        return Attachment(target.prompt_ids, keep_everything(self.name, target.prompt_tokens))


@dataclass(frozen=True)
class CacheSizes:
    """A request's sizes in cache entries per layer, known at admission."""

    prefill: int  # tokens the prefill runs (a selector: the kept ones)
    kept: int  # entries the cache holds once prefilled (a KV method: what it keeps)
    most: int  # the most it ever holds, to its last token (its method may evict as it decodes)


@dataclass
class Target:
    """What a method is attached to (see :meth:`Method.attach`)."""

    model: PreTrainedModel
    prompt_ids: torch.Tensor
    cache: Cache | None
    default_budget: int
    tokenizer: PreTrainedTokenizerBase | None = None
    # The first layers of ``model`` in another dtype, for a prompt selector's pass that only ranks
    # tokens (GemFilter's filter pass in bfloat16 beside a float32 model); None: ``model`` itself.
    filter_model: PreTrainedModel | None = None

    @property
    def prompt_tokens(self) -> int:
        return int(self.prompt_ids.shape[-1])


class Preparation:
    """An attachment on its way: the model work a method does over the prompt before its prefill
    (a pass over ``filter_tokens`` tokens through ``filter_layers`` decoder layers: GemFilter's
    filter pass), run by :meth:`run_filter` a chunk at a time in the order of the prompt, each as
    large as the caller plans; then :meth:`attachment`. The base has no such work. No chunk
    leaves a hook active: the caller runs other requests' forwards between them."""

    filter_tokens: int = 0
    filter_layers: int = 0
    # The pass's last chunk holds at least this many tokens (the queries that score); a pass
    # that cannot be chunked has its whole length here.
    filter_tail: int = 1

    def __init__(self, build: Callable[[], Attachment] | None = None) -> None:
        self._build = build

    def run_filter(self, start: int, tokens: int) -> None:
        raise RuntimeError(f"{type(self).__name__} has no filter pass to run")

    def run_whole(self) -> Preparation:
        """Run what is left of the pass at once (a caller with no batch to share it with)."""
        if self.filter_tokens:
            self.run_filter(0, self.filter_tokens)
        return self

    def attachment(self) -> Attachment:
        """The attachment, once the pass (if any) has run to its end."""
        assert self._build is not None  # subclasses with a pass override this
        return self._build()


class Attachment:
    """One request's method on one model: the ids to prefill and the hooks around the forwards.

    ``selection`` is final once :meth:`prefill` has exited. ``kv_bytes_before`` is the bytes the
    unpruned cache held (KV methods only; None where nothing is pruned).
    """

    def __init__(
        self, prefill_ids: torch.Tensor, selection: Selection, prefill_position_ids: torch.Tensor | None = None
    ) -> None:
        self.prefill_ids = prefill_ids
        self.selection = selection
        # (1, len) rotary positions of prefill_ids when they are not 0..len-1: a selection that keeps
        # the kept tokens' places in the prompt (GemFilter's positions="original"). The cache still
        # holds the ids in order; only the positions the model encodes differ.
        self.prefill_position_ids = prefill_position_ids
        self.kv_bytes_before: int | None = None

    @property
    def batched_decode(self) -> bool:
        """decode_step() hooks nothing inside the forward: this request may decode in a forward
        shared with other requests, followed by :meth:`after_decode`."""
        return True

    @property
    def next_position(self) -> int:
        """The first generated token's position: decode goes on after the prefilled ids (after the
        whole prompt when they kept their places in it)."""
        if self.prefill_position_ids is not None:
            return self.selection.prompt_tokens
        return int(self.prefill_ids.shape[-1])

    @contextmanager
    def prefill(self) -> Iterator[None]:
        """Around the prefill forward."""
        yield

    @contextmanager
    def decode_step(self) -> Iterator[None]:
        """Around each decode forward."""
        yield
        self.after_decode()

    def after_decode(self) -> None:
        """After each decode forward (alone or shared with other requests)."""

    def adopt_prefill(self, kv_bytes_before: int) -> None:
        """The cache was filled by a prefill shared with other methods, while this method's
        observer watched (``gemserve eval`` runs one prefill for many methods): finish the method
        on it now, as :meth:`prefill` would have."""


def keep_everything(name: str, prompt_tokens: int) -> Selection:
    return Selection(method=name, prompt_tokens=prompt_tokens, kept_indices=list(range(prompt_tokens)))


@dataclass
class BudgetedMethod(Method):
    budget: int | None = knob(
        None,
        minimum=1,
        description=(
            "prompt tokens to keep (a KV method: cache entries per layer and KV head); null: the ratio, "
            "else the server's default budget"
        ),
    )
    ratio: float | None = knob(
        None,
        minimum=0.0,
        maximum=1.0,
        exclusive_minimum=True,
        description="fraction of the prompt to keep; with a budget too, the budget caps it",
    )

    def resolve_budget(self, prompt_tokens: int, default_budget: int) -> int:
        """Tokens to keep for a prompt of this length; never more than the prompt. With both a
        ``ratio`` and a ``budget``, the budget caps what the ratio asks ("10%, at most 2048")."""
        if self.ratio is not None:
            keep = max(1, min(prompt_tokens, math.ceil(self.ratio * prompt_tokens)))
            return keep if self.budget is None else min(keep, self.budget)
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

    def prefill_positions(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> int:
        # The kept tokens restart at position 0; a selector that does not run keeps the whole prompt.
        if not self.selects_with_model(model, prompt_tokens, default_budget):
            return prompt_tokens
        return self.resolve_budget(prompt_tokens, default_budget)

    def selects_with_model(self, model: PreTrainedModel, prompt_tokens: int, default_budget: int) -> bool:
        return True

    def cache_tokens(self, prompt_tokens: int, max_tokens: int, default_budget: int) -> int:
        return self.resolve_budget(prompt_tokens, default_budget) + max_tokens

    def cache_sizes(
        self, model: PreTrainedModel, prompt_tokens: int, max_tokens: int, default_budget: int
    ) -> CacheSizes:
        # A selector that does not run (its budget covers the prompt, or it is too short to pay
        # off) keeps every token.
        selects = self.selects_with_model(model, prompt_tokens, default_budget)
        kept = self.resolve_budget(prompt_tokens, default_budget) if selects else prompt_tokens
        return CacheSizes(kept, kept, kept + max_tokens)

    def attachment(self, target: Target) -> Attachment:
        return self.prepare(target).run_whole().attachment()

    def prepare(self, target: Target) -> Preparation:
        """Select (a selector that runs the model overrides this to do it in steps): the prefill
        sees only the kept ids."""
        selection = self.select(target.model, target.prompt_ids, target.default_budget, target.tokenizer)
        return Preparation(lambda: selected_attachment(target.prompt_ids, selection))


def kept_ids(prompt_ids: torch.Tensor, selection: Selection) -> torch.Tensor:
    """``(1, n)`` prompt ids -> ``(1, k)`` ids at the selection's kept indices."""
    if selection.kept_tokens == int(prompt_ids.shape[-1]):
        return prompt_ids
    kept = torch.tensor(selection.kept_indices, dtype=torch.long, device=prompt_ids.device)
    return prompt_ids.index_select(-1, kept)


def selected_attachment(prompt_ids: torch.Tensor, selection: Selection, original_positions: bool = False) -> Attachment:
    """A prompt selector's attachment: the kept ids, at fresh positions ``0..k-1`` (the paper's
    GemFilter) or, with ``original_positions``, at their places in the prompt, so the model sees
    the distances it would see in the whole prompt and decodes on from position ``n``."""
    ids = kept_ids(prompt_ids, selection)
    if not original_positions or ids is prompt_ids:
        return Attachment(ids, selection)
    positions = torch.tensor([selection.kept_indices], dtype=torch.long, device=prompt_ids.device)
    return Attachment(ids, selection, positions)


@dataclass
class KVCompressor(BudgetedMethod):
    """Prefills the whole prompt and shrinks the real cache tensors.

    A subclass may implement only the after-prefill contract: ``prefill_observer`` around the
    prefill forward (a context in which it may read attention through :mod:`compressors.probe`),
    ``compress`` once the cache is full, then ``decode_observer`` around each decode forward
    followed by ``after_decode_step`` (methods that keep evicting, like H2O). :meth:`attach`
    drives them in that order; :class:`compressors.kv_pruner.ScoredKVPruner` attaches its own
    hooks instead, which prune each layer during the prefill.

    The method object is its knobs only: what one request needs to remember (the prefill's scores,
    the positions its cache holds) lives in the state :meth:`new_state` makes, which the request's
    :class:`KVAttachment` owns and hands to each hook. So one method object may serve any number of
    requests, in turn or interleaved.
    """

    kind: ClassVar[str] = "kv"
    chunkable_prefill: ClassVar[bool] = False  # its observer and pruning need every prompt query at once

    def cache_tokens(self, prompt_tokens: int, max_tokens: int, default_budget: int) -> int:
        return self.resolve_budget(prompt_tokens, default_budget) + max_tokens

    def cache_sizes(
        self, model: PreTrainedModel, prompt_tokens: int, max_tokens: int, default_budget: int
    ) -> CacheSizes:
        kept = self.resolve_budget(prompt_tokens, default_budget)
        return CacheSizes(prompt_tokens, kept, self.cache_tokens(prompt_tokens, max_tokens, default_budget))

    def observes_decode(self) -> bool:
        """Whether :meth:`decode_observer` reads the decode forward (then the request decodes alone)."""
        return type(self).decode_observer is not KVCompressor.decode_observer

    def attachment(self, target: Target) -> Attachment:
        if target.cache is None:
            raise CompressionError(f"method '{self.name}' prunes the KV cache: it needs the request's cache")
        return self.kv_attachment(target)

    def kv_attachment(self, target: Target) -> KVAttachment:
        return KVAttachment(self, target)

    def new_state(self, target: Target) -> Any:
        """A fresh state for one request's hooks below, made from what it attaches to (None: the
        method needs none)."""
        return None

    @contextmanager
    def prefill_observer(self, model: PreTrainedModel, prompt_tokens: int) -> Iterator[Any]:
        """Around the prefill forward; yields what it observes (complete once the context has
        exited), which :meth:`compress` then takes. The method itself keeps none of it."""
        yield None

    def compress(
        self, cache: Cache, prompt_tokens: int, default_budget: int, state: Any, observed: Any = None
    ) -> Selection:
        """Shrink the full cache; ``observed``: what :meth:`prefill_observer` yielded over its prefill."""
        raise NotImplementedError

    @contextmanager
    def decode_observer(self, model: PreTrainedModel, state: Any) -> Iterator[None]:
        yield

    def after_decode_step(self, cache: Cache, state: Any) -> None:
        """Called after every decode forward; the default keeps the cache as it is."""


class KVAttachment(Attachment):
    """A KV method on one request: observe the prefill, compress the full cache, then the decode hooks.
    Its prefill is one forward: the observer and the pruning need every prompt query and key at once.

    ``state`` is this request's (from :meth:`KVCompressor.new_state`); only the method's hooks
    change it.
    """

    def __init__(self, method: KVCompressor, target: Target) -> None:
        assert target.cache is not None  # checked by KVCompressor.attachment
        super().__init__(target.prompt_ids, keep_everything(method.name, target.prompt_tokens))
        self.method = method
        self.model = target.model
        self.cache: Cache = target.cache
        self.default_budget = target.default_budget
        self.state: Any = method.new_state(target)

    @property
    def prompt_tokens(self) -> int:
        return int(self.prefill_ids.shape[-1])

    @contextmanager
    def prefill(self) -> Iterator[None]:
        with self.method.prefill_observer(self.model, self.prompt_tokens) as observed:
            yield
        self.adopt_prefill(cache_bytes(self.cache), observed)

    def adopt_prefill(self, kv_bytes_before: int, observed: Any = None) -> None:
        """``observed``: what this method's :meth:`~KVCompressor.prefill_observer` yielded over the
        shared prefill (one of the same knobs, budget aside, yields the same). This request owns it
        from here: give each attachment its own copy."""
        self.kv_bytes_before = kv_bytes_before
        self.selection = self.method.compress(self.cache, self.prompt_tokens, self.default_budget, self.state, observed)

    @property
    def batched_decode(self) -> bool:
        return not self.method.observes_decode()

    @contextmanager
    def decode_step(self) -> Iterator[None]:
        with self.method.decode_observer(self.model, self.state):
            yield
        self.after_decode()

    def after_decode(self) -> None:
        self.method.after_decode_step(self.cache, self.state)
