"""The forwards of a continuous batch: one decode forward for many requests, and their caches.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``):
it owns a paged cache and the sampling loop, so a request could not bring a cache that a KV method
pruned to its own length per layer and head, attention probes (H2O) or a sparse prefill backend.
What this module adds instead is small:

- :class:`RaggedBatch`: the batch's new tokens, and a chunk of one request's prefill, go through
  the model as one ``(1, T)`` sequence (every linear layer runs once for all of them, the part that
  batching makes cheap), while each request's attention reads only its own cache, at its own
  length (a pruned cache is shorter than its sequence, a GemFilter one shorter than its prompt).
  No padding: one decode query sees every entry its cache holds, exactly as when it decodes alone;
  a prefill chunk gets its causal mask. A chunk riding in the decode forward costs the decode
  steps little (measured: a separate 8-token forward at position 8K took 540 ms, a 3-token
  decode step 220 ms on this project's 2 CPU cores).
- :class:`GrowingLayer`: a cache layer with room to grow, so a decode step writes one entry instead
  of copying the whole layer (``DynamicLayer`` concatenates per token: O(cache) bytes per step).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer

from compressors.attention import AttentionBackend
from compressors.probe import layer_window, sdpa_attention, use_attention

# A 4-D mask makes transformers' mask builders return it untouched (masking_utils'
# early exit): the ragged attention below needs none, and no cache method is asked for sizes.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose ``keys`` / ``values`` are views of buffers with room for more
    entries (at most an eighth of the layer, or ``SLACK``, unused). Assigning other tensors (the KV
    pruners' gather) drops the buffers, so a pruned layer never keeps its unpruned bytes alive; the
    next update buffers the pruned ones."""

    # Room to grow by: 256 entries, or an eighth of the layer (a prefill in chunks grows by whole
    # chunks; copying a 6K-entry layer every 256 of them showed in the decode steps' p99).
    SLACK = 256

    def __init__(self) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
        self.room = 0  # entries its buffers hold at least (:func:`make_room`)
        super().__init__()

    @property  # type: ignore[override]
    def keys(self) -> torch.Tensor | None:
        return self._keys

    @keys.setter
    def keys(self, tensor: torch.Tensor | None) -> None:
        self._keys = tensor
        if not _is_view_of(tensor, self._key_buffer):
            self._key_buffer = None

    @property  # type: ignore[override]
    def values(self) -> torch.Tensor | None:
        return self._values

    @values.setter
    def values(self, tensor: torch.Tensor | None) -> None:
        self._values = tensor
        if not _is_view_of(tensor, self._value_buffer):
            self._value_buffer = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if self._key_buffer is None or self._value_buffer is None or end > self._key_buffer.shape[-2]:
            capacity = max(self.room, end + max(self.SLACK, end // 8))
            self._key_buffer = _buffer_with(self._keys, length, key_states, capacity)
            self._value_buffer = _buffer_with(self._values, length, value_states, capacity)
        self._key_buffer[:, :, length:end] = key_states
        self._value_buffer[:, :, length:end] = value_states
        self.keys = self._key_buffer[:, :, :end]
        self.values = self._value_buffer[:, :, :end]
        return self._keys, self._values  # type: ignore[return-value]


def _is_view_of(tensor: torch.Tensor | None, buffer: torch.Tensor | None) -> bool:
    return tensor is not None and buffer is not None and tensor.data_ptr() == buffer.data_ptr()


def _buffer_with(held: torch.Tensor | None, length: int, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """A ``capacity``-entry buffer shaped like ``new`` holding the layer's first ``length`` entries."""
    batch, heads, _, dim = new.shape
    buffer = new.new_empty(batch, heads, capacity, dim)
    if length and held is not None:
        buffer[:, :, :length] = held
    return buffer


def make_room(cache: DynamicCache, entries: int) -> None:
    """Size the growing layers' buffers for ``entries`` from the start (a chunked prefill's whole
    prompt and room to decode): its chunks then write in place, where growing by an eighth copied
    every layer a dozen times over a 6K-token prefill, each copy a spike in the step's time."""
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            layer.room = entries


def new_request_cache(model: PreTrainedModel) -> DynamicCache:
    """A request's cache: one layer object per decoder layer (the KV pruners need them before the
    prefill), full-attention layers that grow in place; sliding-window layers as transformers has them."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


@dataclass
class Segment:
    """One request's tokens in a shared forward: a decode token, or a chunk of its prefill (then
    ``attention`` is its prefill backend, which computes and counts the chunk's attention)."""

    token_ids: list[int]
    start: int  # the first token's position; a prefill chunk's index in its cache too (``positions``: its own)
    cache: DynamicCache
    attention: AttentionBackend | None = None
    positions: list[int] | None = None  # rotary positions, when a selection kept its tokens' places

    @property
    def length(self) -> int:
        return len(self.token_ids)

    def position_ids(self) -> list[int]:
        return self.positions if self.positions is not None else list(range(self.start, self.start + self.length))


class RaggedBatch:
    """One forward for many requests' segments laid end to end as one ``(1, T)`` sequence: the
    cache the model's layers write to, and the attention backend that reads it
    (:func:`compressors.probe.use_attention`). Each segment attends to its own cache only."""

    def __init__(self, segments: list[Segment]) -> None:
        self.segments = segments
        self._states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def _slices(self) -> list[slice]:
        bounds = [0]
        for segment in self.segments:
            bounds.append(bounds[-1] + segment.length)
        return [slice(a, b) for a, b in itertools.pairwise(bounds)]

    # ---- what a decoder layer calls on its cache ---------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, kv_heads, T, d)``: each segment's new entries go into its own cache; each one's
        full states wait for :meth:`attend`."""
        self._states[layer_idx] = [
            segment.cache.update(key_states[:, :, part], value_states[:, :, part], layer_idx)
            for segment, part in zip(self.segments, self._slices(), strict=True)
        ]
        return key_states, value_states

    # ---- the attention backend ------------------------------------------------------------------
    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        """``(1, T, heads, d)``: each segment's queries over its own keys. A decode token is the same
        SDPA call as alone (it sees every entry its cache holds); a prefill chunk gets its causal
        (and sliding-window) mask and its own backend."""
        states = self._states.pop(int(module.layer_idx))
        outputs = []
        for segment, part, (keys, values) in zip(self.segments, self._slices(), states, strict=True):
            q = query[:, :, part]
            if segment.length == 1:
                outputs.append(sdpa_attention(module, q, keys, values, None, **kwargs)[0])
                continue
            outputs.append(self.attend_chunk(module, segment, q, keys, values, **kwargs))
        return torch.cat(outputs, dim=1), None

    def attend_chunk(
        self,
        module: nn.Module,
        segment: Segment,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        """A prefill chunk's queries over its cache: dense, causal (and banded on a sliding-window
        layer), counted by the chunk's backend (SDPA keeping K/V at KV-head count on the CPU:
        :func:`compressors.probe.sdpa_attention`)."""
        mask = chunk_mask(segment.start, segment.length, keys.shape[-2], layer_window(module))
        if segment.attention is not None and getattr(module, "attn_logit_softcapping", None):
            return segment.attention.attend(module, query, keys, values, mask.to(query.device), **kwargs)[0]
        out, _ = sdpa_attention(module, query, keys, values, mask.to(query.device), **kwargs)
        if segment.attention is not None:
            segment.attention.count_dense(query.shape[1], segment.length, keys.shape[-2])
        return out


def chunk_mask(start: int, length: int, keys: int, window: int | None) -> torch.Tensor:
    """``(1, 1, length, keys)`` bool: queries at ``start..start+length-1`` over the last ``keys``
    positions before ``start + length`` (contiguous: a chunked prefill's cache is never pruned)."""
    queries = torch.arange(start, start + length).unsqueeze(1)
    positions = torch.arange(start + length - keys, start + length).unsqueeze(0)
    visible = positions <= queries
    if window is not None:
        visible &= positions > queries - window
    return visible.view(1, 1, length, keys)


def forward_segments(model: PreTrainedModel, segments: list[Segment]) -> torch.Tensor:
    """One forward for every segment (each at its own positions, into its own cache): ``(S, vocab)``
    logits of each segment's last token."""
    device = model.device
    ids = torch.tensor([[t for s in segments for t in s.token_ids]], dtype=torch.long, device=device)
    positions = [p for s in segments for p in s.position_ids()]
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)
    ragged = RaggedBatch(segments)
    with use_attention(ragged):
        out = model.base_model(
            input_ids=ids,
            position_ids=position_ids,
            past_key_values=ragged,
            attention_mask=_NO_MASK.to(device),
            use_cache=True,
        )
    last_rows = torch.tensor([part.stop - 1 for part in ragged._slices()], device=device)
    return logits_of(model, out.last_hidden_state[0].index_select(0, last_rows))


def logits_of(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """``(B, hidden)`` final hidden states -> ``(B, vocab)`` logits, as the model's LM head computes
    them (with Gemma's final soft-capping). Written as ``W @ h.T``: for a few rows MKL's
    ``h @ W.T`` (what ``nn.Linear`` calls) was 3-4x slower on this project's 2-core AMD CPU (a
    49152 x 576 head, 4 rows: 43 ms vs 11 ms); the product is the same."""
    head = model.get_output_embeddings()
    logits = torch.mm(head.weight, hidden.T).T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
