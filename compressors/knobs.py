"""Knob values from JSON (ints, floats, strings, bools, objects) checked against a dataclass field's type.

One definition for the method registry and the attention-backend registry.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any

from compressors.base import CompressionError


def accepts(annotation: Any, value: Any) -> bool:
    """Does ``value`` fit ``annotation`` (``int``, ``float``, ``str``, ``bool``, ``dict[...]``, unions)?
    ``True`` is not an int here, and an int is a float."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    for option in options:
        if option is type(None):
            if value is None:
                return True
            continue
        origin = typing.get_origin(option) or option
        if isinstance(value, bool) and origin is not bool:
            continue
        if isinstance(value, origin) or (origin is float and isinstance(value, int)):
            return True
    return False


def type_names(annotation: Any) -> str:
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    names = [(typing.get_origin(t) or t).__name__ for t in options if t is not type(None)]
    return " or ".join("object" if name == "dict" else name for name in names)


# Every integer knob is a count of tokens, blocks or layers (or a pool width): none means
# anything past 32 bits, and torch overflows on some past 63.
MAX_KNOB_INT = 2**31 - 1


def check_knob_type(owner: str, knob: str, value: Any, annotation: Any, param_prefix: str = "compression") -> None:
    if not accepts(annotation, value):
        raise CompressionError(
            f"knob '{knob}' of {owner} must be {type_names(annotation)}, got {short_repr(value)}",
            param=f"{param_prefix}.{knob}",
        )
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_KNOB_INT:
        raise CompressionError(
            f"knob '{knob}' of {owner} must be between -{MAX_KNOB_INT} and {MAX_KNOB_INT}, got {short_repr(value)}",
            param=f"{param_prefix}.{knob}",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise CompressionError(
            f"knob '{knob}' of {owner} must be a finite number, got {value}", param=f"{param_prefix}.{knob}"
        )


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: errors never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
