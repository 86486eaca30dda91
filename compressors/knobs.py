"""Knobs: a method's or attention backend's request parameters, declared once on its dataclass.

Each knob is a dataclass field declared with :func:`knob` (its default, bounds and what it does).
From those declarations every class gets one strict pydantic model (:func:`knob_model`), which does
all the checking: types (``true`` is not an int, a string not a number; an int is a float, and an
integral float such as ``8.0`` is the int 8, as JSON Schema counts it), bounds, finite floats,
unknown names. The same model gives each knob's JSON Schema in ``/openapi.json``
(server/openapi.py), and the CLI's ``--list-knobs`` and docs/api.md's table (:func:`knob_rows`).
A :class:`pydantic.ValidationError` becomes a :class:`CompressionError` naming the knob, worded
from the declaration (:func:`knob_error`), for a request (:func:`request_knobs`) and for a method
built in code alike (:func:`check_declared_bounds`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, GetCoreSchemaHandler, ValidationError, create_model
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import CoreSchema, ErrorDetails, core_schema

from compressors.errors import CompressionError

# Every integer knob is a count of tokens, blocks or layers (or a pool width): none means
# anything past 32 bits, and torch overflows on some past 63.
MAX_KNOB_INT = 2**31 - 1


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: errors never echo a huge input back."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- the declaration ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Bounds:
    """What a knob's value may be beyond its type, declared once on the dataclass field (see
    :func:`knob`): the knob model enforces it and publishes it in the OpenAPI document, so
    schema and server cannot disagree. ``choices`` bound a string, the numeric bounds a number (a
    knob may take either: GemFilter's fallback is ``"none"`` or a budget)."""

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
    (``window: int = knob(32, minimum=1, description="...")``); the class's knob model, and through
    it the check, the OpenAPI document, the CLI's help and docs/api.md's knob table, are read from here."""
    bounds = Bounds(minimum, maximum, exclusive_minimum, odd, choices)
    return dataclasses.field(default=default, metadata={"bounds": bounds, "description": description})


def knob_bounds(cls: type) -> dict[str, Bounds]:
    """Knob name -> its bounds (an empty :class:`Bounds` where the field declares none)."""
    return {f.name: f.metadata.get("bounds", Bounds()) for f in dataclasses.fields(cls)}


def knob_description(cls: type, name: str) -> str:
    """What knob ``name`` of ``cls`` does, from its declaration ("" where none is given)."""
    return next(f.metadata.get("description", "") for f in dataclasses.fields(cls) if f.name == name)


# ---- the model: one per class, derived from the declarations ------------------------------------
# Strict: no coercion but the one integral_float_as_int makes; a knob the class lacks is an error.
KNOB_CONFIG = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


@functools.cache
def knob_model(cls: type) -> type[BaseModel]:
    """``cls``'s knobs as one strict pydantic model (built once per class)."""
    return make_knob_model(cls, knob_bounds(cls))


def make_knob_model(cls: type, bounds: dict[str, Bounds]) -> type[BaseModel]:
    """The knob model of ``cls`` with ``bounds`` (its declared ones, or narrower ones the loaded
    engine publishes, server/openapi.py)."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {
        f.name: (knob_type(hints[f.name], bounds[f.name]), Field(f.default, description=knob_description(cls, f.name)))
        for f in dataclasses.fields(cls)
    }
    return create_model(f"{cls.__name__}Knobs", __config__=KNOB_CONFIG, **fields)


def union_members(annotation: Any) -> tuple[Any, ...]:
    return typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)


def knob_type(annotation: Any, bounds: Bounds) -> Any:
    """The pydantic type of a knob declared as ``annotation`` (``int``, ``float``, ``str``,
    ``bool``, ``dict[...]``, unions of them with None) inside ``bounds``: each member of a union
    takes the bounds meant for it."""
    return functools.reduce(operator.or_, (member_type(member, bounds) for member in union_members(annotation)))


def member_type(kind: Any, bounds: Bounds) -> Any:
    if kind is int:
        # integral_int runs first (8.0 -> 8); the constraints stand before it so that the JSON
        # Schema states them as the integer's bounds.
        odd = (Odd(),) if bounds.odd else ()
        return Annotated[(int, Field(**numeric_constraints(bounds, integer=True)), *odd, integral_int)]
    if kind is float:
        return Annotated[float, Field(**numeric_constraints(bounds, integer=False))]
    if kind is str and bounds.choices is not None:
        return Literal[bounds.choices]
    return kind


def numeric_constraints(bounds: Bounds, integer: bool) -> dict[str, float]:
    """``Field``'s ge/gt/le for ``bounds``; an integer is always within ±:data:`MAX_KNOB_INT`."""
    low = bounds.minimum if bounds.minimum is not None else (-MAX_KNOB_INT if integer else None)
    high = bounds.maximum if bounds.maximum is not None else (MAX_KNOB_INT if integer else None)
    constraints: dict[str, float] = {}
    if low is not None:
        constraints["gt" if bounds.exclusive_minimum else "ge"] = low
    if high is not None:
        constraints["le"] = min(high, MAX_KNOB_INT) if integer else high
    return constraints


def integral_float_as_int(value: Any) -> Any:
    """JSON Schema counts ``8.0`` as an integer, and a JavaScript client cannot tell the two apart."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


integral_int = BeforeValidator(integral_float_as_int)


@dataclass(frozen=True)
class Odd:
    """An int knob that takes odd numbers only (a pooling width): checked after the int and its
    bounds, published as ``not: {multipleOf: 2}``."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(self, schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {**handler(schema), "not": {"multipleOf": 2}}

    @staticmethod
    def check(value: int) -> int:
        if value % 2 == 0:
            raise ValueError("an odd number is due")
        return value


# ---- validation: the model checks, the error speaks the declaration's words ---------------------
def request_knobs(cls: type, owner: str, knobs: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A request's ``knobs`` for ``cls`` as its model takes them (null: the knob's default, left
    to the dataclass; a name ``cls`` lacks is refused even when null, never ignored)."""
    fields = knob_model(cls).model_fields
    given = {name: value for name, value in knobs.items() if value is not None or name not in fields}
    return validated(cls, owner, given, prefix)


def validated(cls: type, owner: str, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` through ``cls``'s knob model; :class:`CompressionError` naming ``prefix.<knob>``
    (the first bad one, in ``values``' order) otherwise."""
    try:
        checked = knob_model(cls).model_validate(values)
    except ValidationError as exc:
        raise knob_error(cls, owner, values, exc.errors(), prefix) from None
    return {name: getattr(checked, name) for name in values}


def check_declared_bounds(obj: Any, owner: str, prefix: str) -> None:
    """Every knob of dataclass ``obj`` through its class's model: a method or backend built in code,
    not from a request, is held to the same rules, and holds what the model makes of its values
    (``8.0`` the int 8, as a request's would be)."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    for name, value in validated(type(obj), owner, values, prefix).items():
        setattr(obj, name, value)


# pydantic's errors for a value of the right type outside the declared bounds (value_error: Odd).
BOUND_ERRORS = frozenset({"greater_than", "greater_than_equal", "less_than_equal", "value_error"})


def knob_error(
    cls: type, owner: str, values: dict[Any, Any], errors: list[ErrorDetails], prefix: str
) -> CompressionError:
    """pydantic's ``errors`` told as one :class:`CompressionError`: the knobs ``cls`` lacks, else
    the first bad knob (one error per member of its union), in the words of its declaration."""
    unknown = [unknown_name(error) for error in errors if error["type"] in ("extra_forbidden", "invalid_key")]
    if unknown:
        return unknown_knobs_error(cls, owner, unknown, prefix)
    order = list(values)
    name = min((error["loc"][0] for error in errors), key=order.index)
    mine = [error for error in errors if error["loc"][0] == name]
    return CompressionError(knob_message(cls, owner, str(name), mine, values[name]), param=f"{prefix}.{name}")


def unknown_name(error: ErrorDetails) -> Any:
    # A key that is no string (a caller's dict, never JSON's) is an unknown knob too, named as given.
    return error["input"] if error["type"] == "invalid_key" else error["loc"][0]


def unknown_knobs_error(cls: type, owner: str, unknown: list[Any], prefix: str) -> CompressionError:
    names = sorted(unknown, key=str)
    allowed = ", ".join(knob_bounds(cls)) or "none"
    return CompressionError(
        f"{owner} has no knob {', '.join(short_repr(name, 100) for name in names[:5])}; its knobs: {allowed}",
        param=f"{prefix}.{str(names[0])[:100]}",
    )


def out_of_bounds(error: ErrorDetails) -> bool:
    """The value has the knob's type but not its bounds: a string outside ``choices`` fails a
    Literal (anything else failing it is of the wrong type), and an int fails a float only when
    too large for one (``10**400``)."""
    kind, value = error["type"], error["input"]
    return (
        kind in BOUND_ERRORS
        or (kind == "literal_error" and isinstance(value, str))
        or (kind == "float_type" and isinstance(value, int) and not isinstance(value, bool))
    )


def knob_message(cls: type, owner: str, name: str, errors: list[ErrorDetails], value: Any) -> str:
    """Knob ``name``'s ``errors`` (one per member of its union) in the declaration's words: its
    type, else ±:data:`MAX_KNOB_INT` for a huge integer, else its bounds."""
    bounded = [error for error in errors if out_of_bounds(error)]
    if not bounded:
        if any(error["type"] == "finite_number" for error in errors):
            return f"knob '{name}' of {owner} must be a finite number, got {value}"
        annotation = typing.get_type_hints(cls)[name]
        return f"knob '{name}' of {owner} must be {type_names(annotation)}, got {short_repr(value)}"
    value = bounded[0]["input"]  # as the model read it: 8.0 is 8
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_KNOB_INT:
        return f"knob '{name}' of {owner} must be between -{MAX_KNOB_INT} and {MAX_KNOB_INT}, got {short_repr(value)}"
    return f"{name} of {owner} must be {bounds_text(knob_bounds(cls)[name])}, got {short_repr(value)}"


def type_names(annotation: Any) -> str:
    """``int | None`` -> ``int``, ``dict[str, Any]`` -> ``object``: a knob's type in words."""
    names = [(typing.get_origin(t) or t).__name__ for t in union_members(annotation) if t is not type(None)]
    return " or ".join("object" if name == "dict" else name for name in names)


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


def knob_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """(name, what it takes, default, description) per knob of ``cls``, from its knob model: the
    CLI's help and docs/api.md's knob table are printed from these."""
    hints, bounds = typing.get_type_hints(cls), knob_bounds(cls)
    rows = []
    for name, field in knob_model(cls).model_fields.items():
        limits = bounds_text(bounds[name])
        takes = f"{type_names(hints[name])}, {limits}" if limits else type_names(hints[name])
        rows.append((name, takes, json.dumps(field.default), field.description or ""))
    return rows


# ---- rules between knobs -------------------------------------------------------------------------
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
