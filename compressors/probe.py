"""A probe point inside every model's attention, for every architecture.

transformers 5.x calls the function registered in ``AttentionInterface`` under the model's
``_attn_implementation`` with query/key states *after* RoPE and any q/k norms (shared
DESIGN.md, "Method contract"). We register one function, ``gemserve``, that, when a probe is
active in the current context, first shows it the states, then computes attention with the
active attention backend (:mod:`compressors.attention`; SDPA, unchanged, when none is active).
Methods read attention through it instead of copying per-architecture attention code.

A probe may raise :class:`StopForward` to end the forward pass at that layer: GemFilter
uses this so the filter pass never runs the attention output of layer r or any later layer.

An :func:`after_attention` hook runs once a layer's attention output is computed, when the
layer's cache entries have done their work for this forward: the KV pruners shrink that layer's
cache there, so a prefill never holds more than one layer's unpruned K/V.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask


class PrefillAttention(Protocol):
    """What :func:`use_attention` installs: an attention backend (compressors/attention/), or the
    hf engine's ragged batch. Structural, so this module imports neither."""

    def attend(
        self,
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...


ATTENTION_NAME = "gemserve"

# probe(module, query, key, value): query (batch, heads, q_len, head_dim), key/value
# (batch, kv_heads, kv_len, head_dim), keys including whatever the cache held before.
AttentionProbe = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], None]

# hook(module, query_len): after the attention of ``module`` over a block of ``query_len`` queries.
AfterAttentionHook = Callable[[nn.Module, int], None]

_active_probe: ContextVar[AttentionProbe | None] = ContextVar("gemserve_attention_probe", default=None)
_active_backend: ContextVar[PrefillAttention | None] = ContextVar("gemserve_attention_backend", default=None)
_after_attention: ContextVar[AfterAttentionHook | None] = ContextVar("gemserve_after_attention", default=None)


class StopForward(Exception):
    """Raised by a probe to end a forward pass early; carries whatever the probe computed."""

    def __init__(self, payload: Any = None) -> None:
        super().__init__("forward stopped by attention probe")
        self.payload = payload


def probed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    probe = _active_probe.get()
    if probe is not None:
        probe(module, query, key, value)
    backend = _active_backend.get()
    if backend is None:
        output = sdpa_attention(module, query, key, value, attention_mask, **kwargs)
    else:
        output = backend.attend(module, query, key, value, attention_mask, **kwargs)
    after = _after_attention.get()
    if after is not None:
        after(module, int(query.shape[-2]))
    return output


def sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that on the CPU a GQA call with a mask keeps K/V at their
    KV-head count (``enable_gqa``). transformers repeats K/V per query head whenever a mask is given
    (a CUDA kernel-dispatch rule), which on the CPU made a 512-token chunk of GemFilter's filter pass
    over a 4K prompt's cache ~1.2x slower than one forward over the whole prompt (issue 23); the
    batch's prefill chunks measured 25 ms vs 6 ms a layer (server/engine/batch_forward.py)."""
    if needs_exact_attention(module, kwargs):
        return exact_attention(module, query, key, value, attention_mask, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    plain = kwargs.get("position_bias") is None and kwargs.get("cache") is None and kwargs.get("dropout", 0.0) == 0.0
    if plain and is_cpu_half_decode(query, attention_mask):
        return decode_attention_float32(query, key, value, attention_mask, kwargs.get("scaling")), None
    if query.device.type != "cpu" or attention_mask is None or groups == 1 or not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, scale=kwargs.get("scaling"), enable_gqa=True
    )
    return out.transpose(1, 2).contiguous(), None


HALF_DTYPES = (torch.bfloat16, torch.float16)


def is_cpu_half_decode(query: torch.Tensor, attention_mask: torch.Tensor | None) -> bool:
    """One query per sequence (a decode step) in bfloat16 or float16 on the CPU, with no mask or a
    boolean one: the shape torch's CPU SDPA runs slowly (:func:`decode_attention_float32`)."""
    mask_ok = attention_mask is None or (
        attention_mask.dtype == torch.bool and attention_mask.dim() == 4 and attention_mask.shape[1] == 1
    )
    return query.device.type == "cpu" and query.shape[-2] == 1 and query.dtype in HALF_DTYPES and mask_ok


def decode_attention_float32(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scale: float | None
) -> torch.Tensor:
    """``query (B, H, 1, d)`` over ``key``/``value (B, H_kv, n, d)`` -> ``(B, 1, H, d)``, computed in
    float32 (scores, softmax and the weighted sum) and returned in the query's dtype.

    Written by hand because torch's CPU SDPA (2.13) runs a single bfloat16 query through its
    flash kernel's padded query blocks: 0.35 ms a layer over a 576-entry cache, 5.9 ms over 8K
    (float32 SDPA: 0.04 / 0.8 ms), where these three ops in float32 take 0.15 / 1.7 ms, and round
    the scores less. K/V stay at their KV-head count: the query heads of a group share one matmul."""
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
    scores = torch.matmul(grouped, key.float().transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)
    if mask is not None:  # (B or 1, 1, 1, n): the same keys for every head of a sequence
        scores = scores.masked_fill(~mask.reshape(mask.shape[0], 1, 1, -1), float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), value.float())  # values may be wider (MLA)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2).to(query.dtype)


def layer_window(module: nn.Module) -> int | None:
    """The sliding window of this attention layer, None for full attention. Gemma, Qwen2, GPT-OSS
    set ``sliding_window`` on each attention module; Mistral and Mixtral only pass the config's
    to their attention call, for every layer (and a config's ``layer_types`` says which layers)."""
    if hasattr(module, "sliding_window"):
        return module.sliding_window
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is not None and layer_types is not None and hasattr(module, "layer_idx"):
        return window if layer_types[module.layer_idx] == "sliding_attention" else None
    return window


def windowed_layers(model: PreTrainedModel) -> dict[int, int]:
    """Decoder layer index -> its sliding window, for the attention layers that have one."""
    layers = enumerate(decoder_layers(model))
    windows = {i: layer_window(layer.self_attn) for i, layer in layers if hasattr(layer, "self_attn")}
    return {index: window for index, window in windows.items() if window is not None}


def needs_exact_attention(module: nn.Module, kwargs: dict[str, Any]) -> bool:
    """Does this layer's attention hold a term SDPA cannot compute: attention sinks (a learned
    per-head logit in the softmax's denominator: GPT-OSS's ``s_aux``) or logit soft-capping
    (Gemma 2)? Such a layer is computed by the model's own eager attention, by every backend."""
    return kwargs.get("s_aux") is not None or bool(
        kwargs.get("softcap") or getattr(module, "attn_logit_softcapping", None)
    )


def exact_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own ``eager_attention_forward`` (its modeling module's, found by the module's
    class, so no architecture is named here), given the additive mask eager attention expects:
    the probe's masks are SDPA's (boolean, or None for plain causal attention)."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise TypeError(
            f"{type(module).__name__} has attention sinks or logit soft-capping, which SDPA cannot compute, "
            "and its modeling module has no eager_attention_forward to compute them"
        )
    return eager(module, query, key, value, additive_mask(attention_mask, query, key), **kwargs)


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """SDPA's mask as eager attention's float mask (0, or the dtype's lowest where hidden). None
    means what it means to SDPA here: the ``q_len`` queries are the last of the ``kv_len`` keys and
    see every key up to their own (transformers gives None only where a sliding window hides
    nothing; a decode step sees every entry its cache holds)."""
    lowest = torch.finfo(query.dtype).min
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    if mask is not None:
        return zero.masked_fill(~mask, lowest) if mask.dtype == torch.bool else mask
    q_len, kv_len = query.shape[-2], key.shape[-2]
    rows = torch.arange(kv_len - q_len, kv_len, device=query.device).unsqueeze(-1)
    cols = torch.arange(kv_len, device=query.device).unsqueeze(0)
    return zero.masked_fill(cols > rows, lowest)[None, None]


def install_probe_attention(model: PreTrainedModel) -> None:
    """Route the model's attention through :func:`probed_attention` (SDPA math, same masks)."""
    AttentionInterface.register(ATTENTION_NAME, probed_attention)
    # Without a registered mask function transformers builds no causal mask at all.
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    model.set_attn_implementation(ATTENTION_NAME)


def uses_probe_attention(model: PreTrainedModel) -> bool:
    return model.config._attn_implementation == ATTENTION_NAME


@contextmanager
def attention_probe(probe: AttentionProbe) -> Iterator[None]:
    """Activate ``probe`` for forwards run in this context; always removed on exit."""
    token = _active_probe.set(probe)
    try:
        yield
    finally:
        _active_probe.reset(token)


@contextmanager
def use_attention(backend: PrefillAttention | None) -> Iterator[None]:
    """Compute the attention of forwards run in this context with ``backend`` (None: SDPA)."""
    token = _active_backend.set(backend)
    try:
        yield
    finally:
        _active_backend.reset(token)


@contextmanager
def after_attention(hook: AfterAttentionHook) -> Iterator[None]:
    """Call ``hook`` after every attention computed in this context; always removed on exit."""
    token = _after_attention.set(hook)
    try:
        yield
    finally:
        _after_attention.reset(token)


def active_probe() -> AttentionProbe | None:
    return _active_probe.get()


def repeat_kv_heads(states: torch.Tensor, groups: int) -> torch.Tensor:
    """``(b, kv_heads, n, d)`` -> ``(b, kv_heads * groups, n, d)`` to line up with query heads."""
    if groups == 1:
        return states
    return states.repeat_interleave(groups, dim=1)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layer list of a causal LM (Llama, Mistral, Qwen2, Phi-3, Gemma 3...)."""
    layers = getattr(model.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} does not expose decoder layers at model.base_model.layers")
    return layers
