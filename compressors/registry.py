"""Method name -> class: the one place that lists the methods."""

from __future__ import annotations

from typing import Any

from compressors.base import CompressionError, Method
from compressors.full import FullAttention
from compressors.gemfilter import GemFilter
from compressors.h2o import H2O
from compressors.knobs import request_knobs, short_repr
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
    """Instantiate and validate a method: its knobs through its knob model (compressors/knobs.py),
    then its own rules between them; unknown names or knobs raise :class:`CompressionError`
    listing what is allowed."""
    cls = METHODS.get(name)
    if cls is None:
        raise CompressionError(
            f"unknown compression method {short_repr(name, 200)}; allowed: {', '.join(METHODS)}",
            param="compression.method",
        )
    knobs = request_knobs(cls, f"method '{name}'", dict(knobs or {}), "compression")
    method = cls(**knobs)
    method.validate()
    return method
