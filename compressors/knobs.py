"""Knobs: a method's or attention backend's dataclass fields, each with a type and declared bounds.

Values from JSON (ints, floats, strings, bools, objects) are checked against the field's type and
:class:`Bounds`; the same declaration gives the knob's JSON Schema (server/openapi.py). One
definition for the method registry, the attention-backend registry and ``validate()``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from compressors.errors import CompressionError


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


# ---- bounds: one declaration serves the check and the JSON Schema -----------------------------
@dataclass(frozen=True)
class Bounds:
    """What a knob's value may be beyond its type, declared once on the dataclass field (see
    :func:`knob`): :func:`check_knob` and :func:`check_declared_bounds` enforce it and
    :func:`knob_schema` publishes it in the OpenAPI document, so schema and server cannot disagree."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    odd: bool = False
    choices: tuple[str, ...] | None = None


def knob(
    default: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    exclusive_minimum: bool = False,
    odd: bool = False,
    choices: tuple[str, ...] | None = None,
    description: str = "",
) -> Any:
    """A dataclass field that is a request knob: its default, bounds and what it does, declared once
    (``window: int = knob(32, minimum=1, description="...")``); the check, the OpenAPI document,
    the CLI's help and docs/api.md's knob table are all read from here."""
    bounds = Bounds(minimum, maximum, exclusive_minimum, odd, choices)
    return dataclasses.field(default=default, metadata={"bounds": bounds, "description": description})


@dataclass(frozen=True)
class Conflict:
    """Knob values a request may not give together, declared once on the method
    (``CONFLICTS``): :func:`check_conflicts` refuses them with ``message`` and
    :func:`conflict_schema` writes the same rule into the OpenAPI branch, so a client validating
    against the schema is refused what the server refuses. ``when`` maps each knob to the values
    that conflict, or to None for any value but null (null takes the default)."""

    when: tuple[tuple[str, tuple[Any, ...] | None], ...]
    message: str
    param: str

    def holds(self, obj: Any) -> bool:
        return all(
            getattr(obj, name) is not None if values is None else getattr(obj, name) in values
            for name, values in self.when
        )


def check_conflicts(obj: Any, conflicts: tuple[Conflict, ...]) -> None:
    for conflict in conflicts:
        if conflict.holds(obj):
            raise CompressionError(conflict.message, param=conflict.param)


def conflict_schema(conflicts: tuple[Conflict, ...]) -> dict[str, Any] | None:
    """JSON Schema that forbids every conflict, spelled positively (some knob of each conflict
    escapes it: null or left out, or a value outside the conflicting ones) so that generators
    such as schemathesis can draw from it, which they cannot from a ``not`` over an object."""
    if not conflicts:
        return None
    return {
        "allOf": [
            {
                "anyOf": [
                    {"properties": {name: {"type": "null"} if values is None else {"not": {"enum": list(values)}}}}
                    for name, values in conflict.when
                ]
            }
            for conflict in conflicts
        ]
    }


def knob_bounds(cls: type) -> dict[str, Bounds]:
    """Knob name -> its bounds (an empty :class:`Bounds` where the field declares none)."""
    return {f.name: f.metadata.get("bounds", Bounds()) for f in dataclasses.fields(cls)}


def knob_description(cls: type, name: str) -> str:
    """What knob ``name`` of ``cls`` does, from its declaration ("" where none is given)."""
    return next(f.metadata.get("description", "") for f in dataclasses.fields(cls) if f.name == name)


def knob_default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def knob_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, what it takes, default, description) per knob of ``cls``: the CLI's help and
    docs/api.md's knob table are printed from these."""
    hints = typing.get_type_hints(cls)
    rows = []
    for name, bounds in knob_bounds(cls).items():
        limits = bounds_text(bounds)
        takes = f"{type_names(hints[name])}, {limits}" if limits else type_names(hints[name])
        default = knob_default(cls, name)
        rows.append((name, takes, json.dumps(default), knob_description(cls, name)))
    return rows


def bounds_text(bounds: Bounds) -> str | None:
    """What ``bounds`` asks for, in the words of an error message; None when it asks nothing."""
    numeric = _numeric_text(bounds)
    if bounds.choices is not None:
        names = f"one of {', '.join(bounds.choices)}"
        return f"{names}, or a number {numeric}" if numeric else names
    return numeric


def _numeric_text(bounds: Bounds) -> str | None:
    if bounds.odd:
        return "a positive odd number" if bounds.minimum == 1 else f"an odd number >= {bounds.minimum or 1:g}"
    low, high = bounds.minimum, bounds.maximum
    if low is not None and high is not None:
        return f"in {'(' if bounds.exclusive_minimum else '['}{low:g}, {high:g}]"
    if low is not None:
        return f"{'>' if bounds.exclusive_minimum else '>='} {low:g}"
    if high is not None:
        return f"<= {high:g}"
    return None


def within(bounds: Bounds, value: Any) -> bool:
    """``choices`` bound a string, the numeric bounds a number (a knob may take either: the
    fallback is ``"none"`` or a budget)."""
    if value is None or isinstance(value, bool | dict):
        return True
    if isinstance(value, str):
        return bounds.choices is None or value in bounds.choices
    if bounds.minimum is not None and (value <= bounds.minimum if bounds.exclusive_minimum else value < bounds.minimum):
        return False
    if bounds.maximum is not None and value > bounds.maximum:
        return False
    return not (bounds.odd and value % 2 == 0)


def check_knob(owner: str, knob: str, value: Any, annotation: Any, bounds: Bounds, param: str) -> Any:
    """The knob's value, type-checked and inside its bounds (an integral float such as ``8.0`` is
    the int 8, as JSON Schema counts it); :class:`CompressionError` naming ``param`` otherwise."""
    value = integral_float_as_int(value, annotation)
    check_knob_type(owner, knob, value, annotation, param_prefix=param.rsplit(".", 1)[0])
    if not within(bounds, value):
        raise CompressionError(f"{knob} of {owner} must be {bounds_text(bounds)}, got {short_repr(value)}", param=param)
    return value


def integral_float_as_int(value: Any, annotation: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and accepts(annotation, 0) and not accepts(annotation, 0.5):
        return int(value)
    return value


def knob_schema(annotation: Any, bounds: Bounds) -> dict[str, Any]:
    """The JSON Schema of a knob of type ``annotation`` (``int``, ``float``, ``str``, ``bool``,
    ``X | None``) inside ``bounds``."""
    options = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    schemas = [_option_schema(typing.get_origin(t) or t, bounds) for t in options]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _option_schema(kind: type, bounds: Bounds) -> dict[str, Any]:
    if kind is type(None):
        return {"type": "null"}
    if kind is bool:
        return {"type": "boolean"}
    if kind is str:
        return {"type": "string", "enum": list(bounds.choices)} if bounds.choices else {"type": "string"}
    if kind is dict:
        return {"type": "object"}
    schema: dict[str, Any] = {"type": "integer" if kind is int else "number"}
    low = bounds.minimum if bounds.minimum is not None else (-MAX_KNOB_INT if kind is int else None)
    high = bounds.maximum if bounds.maximum is not None else (MAX_KNOB_INT if kind is int else None)
    if low is not None:
        schema["exclusiveMinimum" if bounds.exclusive_minimum else "minimum"] = low
    if high is not None:
        schema["maximum"] = min(high, MAX_KNOB_INT) if kind is int else high
    if bounds.odd:
        schema["not"] = {"multipleOf": 2}
    return schema


def check_declared_bounds(obj: Any, owner: str, param_prefix: str) -> None:
    """Every knob of dataclass ``obj`` inside its declared bounds (a method or backend built in
    code, not from a request, is held to the same rules)."""
    hints = typing.get_type_hints(type(obj))
    for name, bounds in knob_bounds(type(obj)).items():
        value = getattr(obj, name)
        if not accepts(hints[name], value):
            raise CompressionError(
                f"knob '{name}' of {owner} must be {type_names(hints[name])}, got {short_repr(value)}",
                param=f"{param_prefix}.{name}",
            )
        if not within(bounds, value):
            raise CompressionError(
                f"{name} of {owner} must be {bounds_text(bounds)}, got {short_repr(value)}",
                param=f"{param_prefix}.{name}",
            )
