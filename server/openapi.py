"""The published OpenAPI document: FastAPI's, made to say exactly what the server accepts.

FastAPI derives the request schemas from contract/protocol.py. Two things it cannot know are
written in here, so that a client validating against ``/openapi.json`` and the server agree
(schemathesis checks both directions in ``make test-schema``):

- the OpenAI fields GemServe takes only at their neutral values (``tools: []``...), with them;
- the bounds only the loaded model knows, marked in protocol.py with ``x-gemserve-bound``: a
  token id is below the vocabulary size, ``max_tokens`` below the context;
- ``compression``: which knobs a method takes depends on the method, and which attention knobs
  on the backend, so the object is all of: a union discriminated by ``method`` over one
  component per method the engine runs (``CompressionGemfilter``...: exactly its knobs, as the
  JSON Schema of the method's knob model, the pydantic model the server validates them with,
  derived from their declarations, and the values it may not take together, compressors/knobs.py;
  a generated client gets a class per method), and one of a branch per attention backend it runs
  (``attention`` and exactly its ``attention_knobs``, from the backend's knob model); the same
  for GemFilter's ``filter_attention`` inside its component. Fields left out or null take the
  server's defaults (``method`` too: the default method's component does not require it).

The one rule between fields JSON Schema cannot state is the context: prompt tokens plus
``max_tokens`` must fit it (400 with code ``context_length_exceeded``, as OpenAI answers).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from compressors.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION
from compressors.gemfilter import POSITIONS
from compressors.knobs import Bounds, conflict_schema, knob_bounds, knob_model, make_knob_model
from compressors.registry import METHODS
from contract.protocol import BOUND_KEY, NULL, UNSUPPORTED_FIELDS, CompressionParams
from server.engine.types import RequestOptions


def openapi_schema(app: FastAPI, options: RequestOptions | None) -> dict[str, Any]:
    """FastAPI's document with the engine's bounds and choices written in, minus the 422 it adds
    to every route with a body (invalid requests are 400s here, server/errors.py). Cached once
    the engine is loaded; before that, the model's bounds are left open."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    write_model_bounds(schema, options)
    for name in ("CompletionRequest", "ChatCompletionRequest"):
        if name in components:
            list_unsupported_fields(components[name])
    if "CompressionParams" in components:
        components.update(compression_components(options))
    if options is not None:
        app.openapi_schema = schema
    return schema


def write_model_bounds(node: Any, options: RequestOptions | None) -> None:
    """Replace every ``x-gemserve-bound`` marker with the number it stands for."""
    if isinstance(node, list):
        for item in node:
            write_model_bounds(item, options)
        return
    if not isinstance(node, dict):
        return
    bound = node.pop(BOUND_KEY, None)
    if bound is not None and options is not None:
        # max_tokens: at least one prompt token shares the context with the output.
        node["maximum"] = {"vocab": options.vocab_size, "max_tokens": options.max_model_len}[bound] - 1
    for value in node.values():
        write_model_bounds(value, options)


def list_unsupported_fields(request: dict[str, Any]) -> None:
    """The OpenAI fields the server takes only at their neutral values, with those values: a
    client sending ``tools: [...]`` is told so by the schema as by the server."""
    for name, field in UNSUPPORTED_FIELDS.items():
        request["properties"][name] = {**field.schema, "description": "Not supported: only this neutral value"}


# ---- compression ----------------------------------------------------------------------------
def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    if schema.get("type") == "null" or NULL in schema.get("anyOf", []):
        return schema
    return {"anyOf": [schema, NULL]}


def model_knobs(cls: type, overrides: dict[str, Bounds] | None = None) -> dict[str, dict[str, Any]]:
    """Knob name -> its JSON Schema: pydantic's, from the class's knob model (compressors/knobs.py),
    null added (the default). ``overrides``: narrower bounds only the loaded engine knows (its
    layers, the positions it runs), in a model of their own."""
    model = make_knob_model(cls, {**knob_bounds(cls), **overrides}) if overrides else knob_model(cls)
    return {name: published_knob(schema) for name, schema in model.model_json_schema()["properties"].items()}


def published_knob(schema: dict[str, Any]) -> dict[str, Any]:
    """One knob's schema as the document states it: null too, and no title (the name says it) or
    null default (the server decides: "default" would claim a value)."""
    kept = {key: value for key, value in schema.items() if key != "title"}
    notes = {key: kept.pop(key) for key in ("description", "default") if key in kept}
    if notes.get("default", 0) is None:
        del notes["default"]
    return {**nullable(kept), **notes}


def backend_knobs(name: str) -> dict[str, Any]:
    """``attention_knobs`` for backend ``name``: exactly its knobs, or null."""
    properties = model_knobs(ATTENTION_BACKENDS[name])
    return nullable({"type": "object", "properties": properties, "additionalProperties": False})


def choice(value: str, default: str) -> dict[str, Any]:
    """A name field of a branch: the name itself; null too where it is the server's default."""
    return {"anyOf": [{"const": value}, NULL]} if value == default else {"const": value}


def method_branches(method: str, options: RequestOptions) -> list[dict[str, Any]]:
    """``method`` with exactly its knobs; the attention fields are constrained by their own part.
    One branch per filter backend for GemFilter (``filter_attention`` and exactly its knobs)."""
    cls = METHODS[method]
    overrides = {}
    if "layer" in knob_bounds(cls):
        overrides["layer"] = Bounds(minimum=0, maximum=options.filter_layers - 1)
    if "positions" in knob_bounds(cls):
        overrides["positions"] = Bounds(choices=options.positions)
    knobs = model_knobs(cls, overrides)
    branch = {
        "type": "object",
        "properties": {
            "method": {"const": method},  # the discriminator: never null (left out: the default's branch)
            **knobs,
            "return_selection": {"type": "boolean"},
            "return_scores": {"type": "boolean"},
            "attention": {},
            "attention_knobs": {},
        },
        "required": ["method"] if method != options.default_method else [],
        "additionalProperties": False,
        **(conflict_schema(cls.CONFLICTS) or {}),
    }
    branches = [branch]
    if "filter_attention" in knobs:
        default = cls.__dataclass_fields__["filter_attention"].default
        branches = [with_backend(branch, "filter_attention", name, default) for name in ATTENTION_BACKENDS]
    return branches


def with_backend(branch: dict[str, Any], field: str, name: str, default: str) -> dict[str, Any]:
    """``branch`` with ``<field>`` naming backend ``name`` and ``<field>_knobs`` exactly its knobs."""
    properties = {**branch["properties"], field: choice(name, default), f"{field}_knobs": backend_knobs(name)}
    required = branch["required"] + ([field] if name != default else [])
    return {**branch, "properties": properties, "required": required}


def attention_part(options: RequestOptions) -> dict[str, Any]:
    """``attention`` names a backend the engine runs and ``attention_knobs`` holds exactly its knobs."""
    base: dict[str, Any] = {"properties": {}, "required": []}
    return {"anyOf": [with_backend(base, "attention", name, options.default_attention) for name in options.attentions]}


def all_options() -> RequestOptions:
    """Before the engine has loaded: every method and backend, open bounds."""
    return RequestOptions(
        vocab_size=0,
        max_model_len=0,
        methods=tuple(METHODS),
        default_method="none",
        attentions=tuple(ATTENTION_BACKENDS),
        default_attention=DEFAULT_ATTENTION,
        filter_layers=2**31,
        positions=POSITIONS,
    )


def method_schema_name(method: str) -> str:
    """``gemfilter`` -> ``CompressionGemfilter``: the component a generated client names a class after."""
    return "Compression" + "".join(part.capitalize() for part in method.split("_"))


def method_schemas(options: RequestOptions) -> dict[str, dict[str, Any]]:
    """One named schema per method the engine runs: exactly its knobs (GemFilter: a branch per
    filter-pass backend, each with exactly that backend's knobs)."""
    schemas = {}
    for method in options.methods:
        branches = method_branches(method, options)
        name = method_schema_name(method)
        summary = first_sentence(METHODS[method].__doc__ or method)
        body = branches[0] if len(branches) == 1 else {"type": "object", "anyOf": branches}
        schemas[name] = {"title": name, "description": summary, **body}
    return schemas


def first_sentence(doc: str) -> str:
    """A docstring's first sentence, on one line, reST's double backticks made Markdown's."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    end = paragraph.find(". ")
    return (paragraph if end == -1 else paragraph[: end + 1]).replace("``", "`")


def compression_params(options: RequestOptions, ref_root: str) -> dict[str, Any]:
    """``compression``: a union discriminated by ``method`` over the methods' schemas (at
    ``ref_root``), and the prefill attention backend with exactly its knobs."""
    mapping = {method: ref_root + method_schema_name(method) for method in options.methods}
    return {
        "title": "CompressionParams",
        "description": (CompressionParams.__doc__ or "").strip().splitlines()[0]
        + f" `method` picks the schema; left out, it is the server's default ({options.default_method})."
        + " Any other field left out or null takes the server's default.",
        "type": "object",
        "allOf": [
            {
                "oneOf": [{"$ref": ref} for ref in mapping.values()],
                # `method` may be left out (the default method): OpenAPI 3.2's defaultMapping says
                # which component that is; 3.1 tools ignore the key.
                "discriminator": {
                    "propertyName": "method",
                    "mapping": mapping,
                    "defaultMapping": mapping[options.default_method],
                },
            },
            attention_part(options),
        ],
    }


def compression_components(options: RequestOptions | None) -> dict[str, dict[str, Any]]:
    """``CompressionParams`` and a component per method, for the document's ``components.schemas``."""
    options = options or all_options()
    return {"CompressionParams": compression_params(options, "#/components/schemas/"), **method_schemas(options)}


def compression_schema(options: RequestOptions | None) -> dict[str, Any]:
    """``CompressionParams`` standing alone (the methods' schemas under ``$defs``): what a
    validator outside the document checks a request's ``compression`` against."""
    options = options or all_options()
    return {**compression_params(options, "#/$defs/"), "$defs": method_schemas(options)}
