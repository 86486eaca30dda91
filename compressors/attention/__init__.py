"""Prefill attention backends: ``dense`` (SDPA) and sparse patterns computed by one shared kernel.

Name -> class lives here, the one place that lists backends; :func:`build_attention` validates a
request's backend and knobs (unknown ones -> :class:`~compressors.base.CompressionError` naming the
allowed ones, HTTP 400).
"""

from __future__ import annotations

from typing import Any, get_type_hints

from compressors.attention.base import AttentionBackend, AttentionStats, SparseBackend
from compressors.attention.block_sparse import BlockSparseAttention
from compressors.attention.dense import DenseAttention
from compressors.attention.streaming import StreamingAttention
from compressors.attention.vertical_slash import VerticalSlashAttention
from compressors.base import CompressionError
from compressors.knobs import check_knob, knob_bounds, short_repr
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
    knobs = dict(knobs or {})
    allowed = cls.knobs()
    unknown = sorted(set(knobs) - set(allowed), key=str)  # even when null: never ignored
    prefix = f"compression.{field}_knobs"
    if unknown:
        raise CompressionError(
            f"attention backend '{name}' has no knob {', '.join(short_repr(k) for k in unknown)}; "
            f"its knobs: {', '.join(allowed) if allowed else 'none'}",
            param=f"{prefix}.{unknown[0]}",
        )
    hints, bounds = get_type_hints(cls), knob_bounds(cls)
    knobs = {
        key: check_knob(f"attention backend '{name}'", key, value, hints[key], bounds[key], param=f"{prefix}.{key}")
        for key, value in knobs.items()
        if value is not None  # null: the default
    }
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
