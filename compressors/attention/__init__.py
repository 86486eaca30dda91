"""Prefill attention backends: ``dense`` (SDPA) and sparse patterns computed by one shared kernel.

Name -> class lives here, the one place that lists backends; :func:`build_attention` validates a
request's backend and knobs through the backend's knob model (compressors/knobs.py; unknown ones ->
:class:`~compressors.base.CompressionError` naming the allowed ones, HTTP 400).
"""

from __future__ import annotations

from typing import Any

from compressors.attention.base import AttentionBackend, AttentionStats, SparseBackend
from compressors.attention.block_sparse import BlockSparseAttention
from compressors.attention.dense import DenseAttention
from compressors.attention.streaming import StreamingAttention
from compressors.attention.vertical_slash import VerticalSlashAttention
from compressors.base import CompressionError
from compressors.knobs import request_knobs, short_repr
from compressors.probe import use_attention

ATTENTION_BACKENDS: dict[str, type[AttentionBackend]] = {
    cls.name: cls for cls in (DenseAttention, StreamingAttention, VerticalSlashAttention, BlockSparseAttention)
}
DEFAULT_ATTENTION = "dense"


def attention_names() -> list[str]:
    return list(ATTENTION_BACKENDS)


def build_attention(name: str, knobs: dict[str, Any] | None = None, field: str = "attention") -> AttentionBackend:
    """Instantiate and validate a backend. ``field`` names the request field in errors
    (``attention`` or ``filter_attention``); knobs are reported as ``compression.<field>_knobs.<knob>``."""
    cls = ATTENTION_BACKENDS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CompressionError(
            f"unknown attention backend {short_repr(name)}; allowed: {', '.join(ATTENTION_BACKENDS)}",
            param=f"compression.{field}",
        )
    prefix = f"compression.{field}_knobs"
    knobs = request_knobs(cls, f"attention backend '{name}'", dict(knobs or {}), prefix)
    backend = cls(**knobs)
    try:
        backend.validate()
    except CompressionError as exc:
        knob = (exc.param or "").rsplit(".", 1)[-1]
        raise CompressionError(str(exc), param=f"{prefix}.{knob}" if knob else exc.param) from exc
    return backend


__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_ATTENTION",
    "AttentionBackend",
    "AttentionStats",
    "BlockSparseAttention",
    "DenseAttention",
    "SparseBackend",
    "StreamingAttention",
    "VerticalSlashAttention",
    "attention_names",
    "build_attention",
    "use_attention",
]
