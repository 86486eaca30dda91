"""The forwards of a continuous batch: one decode forward for many requests, and their caches.

Why not transformers' own continuous batching (``generate_batch`` / ``ContinuousBatchingManager``):
it owns a paged cache and the sampling loop, so a request could not bring a cache that a KV method
pruned to its own length per layer and head, attention probes (H2O) or a sparse prefill backend.
What this module adds instead is small:

- :class:`RaggedDecode`: the batch's new tokens go through the model as one ``(1, B)`` sequence
  (every linear layer runs once for the whole batch, the part that batching makes cheap), while
  each token's attention reads only its own request's cache, at its own length (a pruned cache is
  shorter than its sequence, a GemFilter one shorter than its prompt). No padding, no mask: one
  decode query sees every entry its cache holds, exactly as when it decodes alone.
- :class:`GrowingLayer`: a cache layer with room to grow, so a decode step writes one entry instead
  of copying the whole layer (``DynamicLayer`` concatenates per token: O(cache) bytes per step).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from compressors.probe import use_attention

# A 4-D mask makes transformers' mask builders return it untouched (masking_utils'
# early exit): the ragged attention below needs none, and no cache method is asked for sizes.
_NO_MASK = torch.ones(1, 1, 1, 1, dtype=torch.bool)


class GrowingLayer(DynamicLayer):
    """A :class:`DynamicLayer` whose ``keys`` / ``values`` are views of buffers with room for
    ``SLACK`` more entries. Assigning other tensors (the KV pruners' gather) drops the buffers, so
    a pruned layer never keeps its unpruned bytes alive; the next update buffers the pruned ones."""

    SLACK = 256  # entries of room: a reallocation per 256 decode steps; at most 256 entries unused

    def __init__(self) -> None:
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None
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
            self._key_buffer = _buffer_with(self._keys, length, key_states, end + self.SLACK)
            self._value_buffer = _buffer_with(self._values, length, value_states, end + self.SLACK)
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


def new_request_cache(model: PreTrainedModel) -> DynamicCache:
    """A request's cache: one layer object per decoder layer (the KV pruners need them before the
    prefill), full-attention layers that grow in place; sliding-window layers as transformers has them."""
    cache = DynamicCache(config=model.config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class RaggedDecode:
    """One decode forward for ``len(caches)`` requests: the cache the model's layers write to, and
    the attention backend that reads it (:func:`compressors.probe.use_attention`)."""

    def __init__(self, caches: list[DynamicCache]) -> None:
        self.caches = caches
        self._states: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # ---- what a decoder layer calls on its cache ---------------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(1, kv_heads, B, d)``: request i's new entry goes into its own cache; each request's
        full states wait for :meth:`attend`."""
        self._states[layer_idx] = [
            cache.update(key_states[:, :, i : i + 1], value_states[:, :, i : i + 1], layer_idx)
            for i, cache in enumerate(self.caches)
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
        """``(1, B, heads, d)``: request i's query over request i's keys, the same SDPA call as alone."""
        states = self._states.pop(int(module.layer_idx))
        outputs = [
            sdpa_attention_forward(module, query[:, :, i : i + 1], keys, values, None, **kwargs)[0]
            for i, (keys, values) in enumerate(states)
        ]
        return torch.cat(outputs, dim=1), None


def decode_batch(
    model: PreTrainedModel, tokens: list[int], positions: list[int], caches: list[DynamicCache]
) -> torch.Tensor:
    """One forward for every request's next token (at its own position, into its own cache):
    ``(B, vocab)`` logits."""
    device = model.device
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    position_ids = torch.tensor([positions], dtype=torch.long, device=device)
    ragged = RaggedDecode(caches)
    with use_attention(ragged):  # type: ignore[arg-type]  # duck-typed: attend() is all it needs
        out = model.base_model(
            input_ids=ids,
            position_ids=position_ids,
            past_key_values=ragged,
            attention_mask=_NO_MASK.to(device),
            use_cache=True,
        )
    return logits_of(model, out.last_hidden_state[0])


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
