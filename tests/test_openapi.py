"""The published OpenAPI document says what the server accepts (server/openapi.py): the model's
bounds written in, and ``compression`` as exact branches built from the knobs' declared bounds.
tests/test_schemathesis.py checks the same agreement by fuzzing the served app; these pin it
down value by value, without a model."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pydantic
import pytest

from compressors import CompressionError, build_method
from compressors.attention import ATTENTION_BACKENDS, build_attention
from compressors.knobs import knob_bounds, knob_description, knob_model, knob_rows
from compressors.registry import METHODS
from contract.protocol import BOUND_KEY, UNSUPPORTED_FIELDS, CompressionParams
from server.app import create_app
from server.engine.types import RequestOptions
from server.openapi import compression_schema, method_schema_name
from server.settings import Settings

HF_OPTIONS = RequestOptions(
    vocab_size=49152,
    max_model_len=8192,
    methods=tuple(METHODS),
    default_method="none",
    attentions=tuple(ATTENTION_BACKENDS),
    default_attention="dense",
    filter_layers=30,
    positions=("compact", "original"),
)
VLLM_OPTIONS = RequestOptions(
    vocab_size=49152,
    max_model_len=8192,
    methods=("none", "gemfilter"),
    default_method="none",
    attentions=("dense",),
    default_attention="dense",
    filter_layers=14,
    positions=("compact",),
)


def published(options: RequestOptions) -> dict[str, Any]:
    app = create_app(Settings())
    app.state.gemserve.engine = type("FakeEngine", (), {"request_options": lambda self: options})()
    return app.openapi()


def schema_accepts(schema: dict[str, Any], value: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def server_accepts(compression: dict[str, Any], options: RequestOptions = HF_OPTIONS) -> bool:
    """What the server's checks say (hf backend): the request model, then the method with its
    knobs and the backends with theirs."""
    try:
        CompressionParams.model_validate(compression)
    except pydantic.ValidationError:
        return False
    knobs = {k: v for k, v in compression.items() if k not in ("method", "attention", "attention_knobs")}
    knobs.pop("return_selection", None)
    knobs.pop("return_scores", None)
    try:
        method = build_method(compression.get("method") or options.default_method, knobs)
        build_attention(compression.get("attention") or options.default_attention, compression.get("attention_knobs"))
    except CompressionError:
        return False
    layer = getattr(method, "layer", None)
    return layer is None or layer < options.filter_layers


def test_model_bounds_are_written_in() -> None:
    document = published(HF_OPTIONS)
    text = json.dumps(document)
    assert BOUND_KEY not in text
    completion = document["components"]["schemas"]["CompletionRequest"]["properties"]
    token_id = completion["prompt"]["anyOf"][2]["items"]
    assert token_id == {"type": "integer", "minimum": 0, "maximum": 49151}
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == 8191
    tokenize_ids = document["components"]["schemas"]["TokenizeRequest"]["properties"]["prompt"]["anyOf"][1]
    assert tokenize_ids["items"]["maximum"] == 49151


def method_branches_of(schema: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The branches of method ``name``'s component (one, or one per filter-pass backend)."""
    component = schema["$defs"][method_schema_name(name)]
    return component.get("anyOf", [component])


def test_compression_is_a_union_discriminated_by_method() -> None:
    """One component per method, named for a generated client's class, each reached from the
    discriminator's mapping; the standalone schema and the document's hold the same components."""
    schema = compression_schema(HF_OPTIONS)
    union = schema["allOf"][0]
    mapping = union["discriminator"]["mapping"]
    assert union["discriminator"]["propertyName"] == "method"
    assert union["discriminator"]["defaultMapping"] == mapping["none"]  # `method` left out: the default's
    assert set(mapping) == set(METHODS)
    assert [ref["$ref"] for ref in union["oneOf"]] == list(mapping.values())
    assert all(ref == "#/$defs/" + method_schema_name(method) for method, ref in mapping.items())
    document = published(HF_OPTIONS)["components"]["schemas"]
    for method in METHODS:
        assert document[method_schema_name(method)] == schema["$defs"][method_schema_name(method)]
    refs = document["CompressionParams"]["allOf"][0]["discriminator"]["mapping"]
    assert refs["gemfilter"] == "#/components/schemas/CompressionGemfilter"
    # Resolved inside the document, as a client sees it.
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/CompressionParams", "components": {"schemas": document}}
    )
    assert validator.is_valid({"method": "gemfilter", "budget": 64, "span": "word"})
    assert not validator.is_valid({"method": "none", "budget": 64})  # none takes no budget
    assert validator.is_valid({"return_selection": True})  # the default method: `method` may be left out
    assert not validator.is_valid({"method": "gemfilter", "observation": 8})  # no such GemFilter knob


def test_every_method_component_lists_exactly_its_knobs() -> None:
    schema = compression_schema(HF_OPTIONS)
    common = {"method", "return_selection", "return_scores", "attention", "attention_knobs"}
    for name, cls in METHODS.items():
        mine = method_branches_of(schema, name)
        assert mine, name
        for branch in mine:
            assert set(branch["properties"]) == common | set(cls.knobs()), name
            assert branch["additionalProperties"] is False


def test_vllm_document_offers_only_what_vllm_runs() -> None:
    schema = compression_schema(VLLM_OPTIONS)
    assert not schema_accepts(schema, {"method": "snapkv"})
    assert not schema_accepts(schema, {"attention": "block_sparse"})
    assert schema_accepts(schema, {"method": "gemfilter", "filter_attention": "block_sparse", "layer": 13})
    assert not schema_accepts(schema, {"method": "gemfilter", "layer": 14})
    assert schema_accepts(schema, {"method": "gemfilter", "positions": "compact"})
    assert not schema_accepts(schema, {"method": "gemfilter", "positions": "original"})  # vLLM takes no position ids
    assert schema_accepts(compression_schema(HF_OPTIONS), {"method": "gemfilter", "positions": "original"})


# Each knob at and across the bounds its field declares, some knobs on the wrong method or backend,
# and integral floats: the schema and the server's checks must answer alike.
CASES = [
    {},
    {"method": None},
    {"method": "none", "budget": 64},
    {"method": "gemfilter", "budget": 0},
    {"method": "gemfilter", "budget": 1},
    {"method": "gemfilter", "budget": 64.0},
    {"method": "gemfilter", "budget": 64.5},
    {"method": "gemfilter", "ratio": 0.0},
    {"method": "gemfilter", "ratio": 1.0},
    {"method": "gemfilter", "positions": "original"},
    {"method": "gemfilter", "positions": "shifted"},
    {"method": "snapkv", "positions": "original"},
    {"method": "gemfilter", "ratio": 0.5, "budget": 10},
    {"method": "gemfilter", "kernel_size": 4},
    {"method": "gemfilter", "kernel_size": 5},
    {"method": "gemfilter", "layer": 29},
    {"method": "gemfilter", "layer": 30},
    {"method": "gemfilter", "span": "chunk", "chunk_size": 256},
    {"method": "gemfilter", "chunk_size": 257},
    {"method": "gemfilter", "scoring": "cosine"},
    {"method": "gemfilter", "payoff_ratio": 1000.0},
    {"method": "gemfilter", "payoff_ratio": 1000.5},
    {"method": "gemfilter", "filter_attention": "streaming", "filter_attention_knobs": {"window": 64}},
    {"method": "gemfilter", "filter_attention": "streaming", "filter_attention_knobs": {"threshold": 0.5}},
    {"method": "gemfilter", "filter_attention": "dense", "filter_attention_knobs": {"sliding_band": False}},
    {"method": "gemfilter", "fallback": 512},
    {"method": "gemfilter", "fallback": 0},
    {"method": "gemfilter", "fallback": "dense"},
    {"method": "gemfilter", "fallback": 512, "scoring": "inner_product"},
    {"method": "gemfilter", "fallback": "none", "scoring": "inner_product"},
    {"method": "gemfilter", "fallback": "none", "scoring": "attention"},
    {"method": "gemfilter", "fallback": None, "scoring": "inner_product"},
    {"method": "snapkv", "window": 0},
    {"method": "snapkv", "window": 64, "budget": 16},
    {"method": "snapkv", "pooling": "max"},
    {"method": "snapkv", "pooling": "median"},
    {"method": "snapkv", "sinks": 4},
    {"method": "h2o", "recent_fraction": 1.0},
    {"method": "h2o", "recent_fraction": 1.01},
    {"method": "streamingllm", "sinks": 0, "budget": 1},
    {"method": "streamingllm", "sinks": -1},
    {"method": "pyramidkv", "beta": 0},
    {"method": "pyramidkv", "beta": 1},
    {"method": "none", "attention": "block_sparse", "attention_knobs": {"threshold": 1.0}},
    {"method": "none", "attention": "block_sparse", "attention_knobs": {"threshold": 0.0}},
    {"method": "none", "attention": "block_sparse", "attention_knobs": {"block_size": 15}},
    {"method": "none", "attention": "block_sparse", "attention_knobs": {"block_size": 4096}},
    {"method": "none", "attention": "vertical_slash", "attention_knobs": {"last_q": 0}},
    {"method": "none", "attention": "dense", "attention_knobs": {"window": 64}},
    {"method": "none", "attention": "streaming", "attention_knobs": {"window": None}},
    {"method": "snapkv", "budget": 2**31},
    {"method": "snapkv", "budget": True},
    {"method": "snapkv", "window": None},
    {"method": "none", "layer": None},
    {"method": "snapkv", "widnow": None},
    {"method": "none", "attention": "streaming", "attention_knobs": {"": None}},
]


@pytest.mark.parametrize("compression", CASES, ids=lambda case: json.dumps(case)[:80])
def test_schema_and_server_answer_alike(compression: dict[str, Any]) -> None:
    schema = compression_schema(HF_OPTIONS)
    assert schema_accepts(schema, compression) == server_accepts(compression), compression


@pytest.mark.parametrize("name", sorted(UNSUPPORTED_FIELDS))
def test_unsupported_fields_neutral_values_agree(name: str) -> None:
    field = UNSUPPORTED_FIELDS[name]
    for value in (
        None,
        [],
        "none",
        {"type": "text"},
        {"type": "json_object"},
        0,
        0.0,
        1,
        1.0,
        False,
        True,
        ["text"],
        "x",
    ):
        assert field.accepts(value) == schema_accepts(field.schema, value), (name, value)


# ---- knobs as one declaration: described, published, listed, documented -------------------------
REGISTRIES = [*METHODS.values(), *ATTENTION_BACKENDS.values()]


@pytest.mark.parametrize("cls", REGISTRIES, ids=lambda cls: cls.name)
def test_every_knob_says_what_it_does(cls: type) -> None:
    missing = [name for name in knob_bounds(cls) if len(knob_description(cls, name)) < 10]
    assert not missing, f"{cls.name}: describe {missing} where they are declared (knob(..., description=...))"


@pytest.mark.parametrize("cls", REGISTRIES, ids=lambda cls: cls.name)
def test_each_class_has_one_strict_knob_model(cls: type) -> None:
    """The one model the server validates a request's knobs with and /openapi.json publishes."""
    model = knob_model(cls)
    assert model is knob_model(cls) and list(model.model_fields) == cls.knobs()
    assert model.model_config["strict"] and model.model_config["extra"] == "forbid"


def test_the_published_knobs_carry_their_description_and_default() -> None:
    schema = compression_schema(HF_OPTIONS)
    branches = method_branches_of(schema, "gemfilter")
    head = branches[0]["properties"]["head"]
    assert head["default"] == 32 and head["description"] == knob_description(METHODS["gemfilter"], "head")
    assert "default" not in branches[0]["properties"]["budget"]  # null: the server decides
    backends = schema["allOf"][1]["anyOf"]
    streaming = next(b for b in backends if b["properties"]["attention"] == {"const": "streaming"})
    window = streaming["properties"]["attention_knobs"]["anyOf"][0]["properties"]["window"]
    assert window["default"] == 1024 and "recent tokens" in window["description"]


def test_docs_knob_tables_are_the_declarations() -> None:
    from cli.knob_docs import DOC, rendered, section

    assert section(DOC.read_text()) == rendered(), "docs/api.md is stale: run python -m cli.knob_docs"


def test_the_cli_lists_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    from cli.main import main

    with pytest.raises(SystemExit) as exit_code:
        main(["generate", "--list-knobs"])
    assert exit_code.value.code == 0
    out = capsys.readouterr().out
    for cls in REGISTRIES:
        assert f"\n  {cls.name}" in out
        for name, takes, default, text in knob_rows(cls):
            assert f"    {name} ({takes}; default {default}): {text}" in out
