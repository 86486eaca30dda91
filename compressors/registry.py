"""Method name -> class: the one place that lists the methods."""

from __future__ import annotations

from typing import Any, get_type_hints

from compressors.base import CompressionError, Method
from compressors.full import FullAttention
from compressors.gemfilter import GemFilter
from compressors.h2o import H2O
from compressors.knobs import check_knob, knob_bounds, short_repr
from compressors.pyramidkv import PyramidKV
from compressors.snapkv import SnapKV
from compressors.streaming_llm import StreamingLLM

METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        FullAttention,
        GemFilter,
        SnapKV,
        H2O,
        StreamingLLM,
        PyramidKV,
    )
}


def method_names() -> list[str]:
    return list(METHODS)


def build_method(name: str, knobs: dict[str, Any] | None = None) -> Method:
    """Instantiate and validate a method; unknown names or knobs raise :class:`CompressionError`
    listing what is allowed."""
    cls = METHODS.get(name)
    if cls is None:
        raise CompressionError(
            f"unknown compression method {short_repr(name, 200)}; allowed: {', '.join(METHODS)}",
            param="compression.method",
        )
    knobs = dict(knobs or {})
    allowed = cls.knobs()
    unknown = sorted(set(knobs) - set(allowed))  # even when null: a misspelt knob is never ignored
    if unknown:
        allowed_text = ", ".join(allowed) if allowed else "none"
        raise CompressionError(
            f"method '{name}' has no knob {', '.join(short_repr(k, 100) for k in unknown[:5])}; "
            f"its knobs: {allowed_text}",
            param=f"compression.{unknown[0][:100]}",
        )
    hints, bounds = get_type_hints(cls), knob_bounds(cls)
    knobs = {
        key: check_knob(f"method '{name}'", key, value, hints[key], bounds[key], param=f"compression.{key}")
        for key, value in knobs.items()
        if value is not None  # null: the default
    }
    method = cls(**knobs)
    method.validate()
    return method
