"""Request and response models: OpenAI's schema plus GemServe's ``compression`` extension.

One definition shared by the server and the SDK (clients/), so this module imports pydantic
only: never torch, never the engine. Fields follow OpenAI's order, extensions last.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

logger = logging.getLogger(__name__)

METHOD_NAMES_HINT = "none | gemfilter | snapkv | h2o | streamingllm | pyramidkv"
ATTENTION_NAMES_HINT = "dense | streaming | vertical_slash | block_sparse"


# OpenAI's seed is any integer; torch's generator (ours and vLLM's) takes 64 bits: a seed is
# folded into [0, 2**63), so every integer is a valid seed and the published schema needs no bound
# (a 64-bit bound does not survive JSON Schema tools that read numbers as doubles).
SEED_MODULUS = 2**63


def fold_seed(seed: int) -> int:
    return seed % SEED_MODULUS


class OpenAIBaseModel(BaseModel):
    # OpenAI clients send fields we may not know yet: ignore them (the request model logs their
    # names) rather than fail. Strict types: ``true`` is not 1, ``"yes"`` is not true, 1.0 is
    # not a token id (an int is still a float). Python's JSON reader takes NaN and Infinity:
    # refused as "not a finite number", never compared with a bound.
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def encodable_text(value: str) -> str:
    """JSON may carry a lone UTF-16 surrogate (``"\\ud800"``) that no UTF-8 text holds: tokenizers
    and chat templates fail on it, so every text field that reaches one is checked here, once."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"text holds a lone UTF-16 surrogate (U+{ord(value[exc.start]):04X} at character {exc.start}), "
            "which is not valid Unicode text"
        ) from None
    return value


# Text a tokenizer will see (prompts, chat content, stop strings).
Text = Annotated[str, AfterValidator(encodable_text)]


def integral_float_as_int(value: Any) -> Any:
    """JSON Schema counts ``16.0`` as an integer, and a JavaScript client cannot tell the two
    apart: an integral float is the int it spells. ``16.5`` and ``true`` stay what they are (and
    are refused where an integer is due)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def integer(**constraints: Any) -> Any:
    """An int field type that takes ``16.0`` as 16; ``constraints`` are ``Field``'s (ge, le...),
    placed before the validator so the published schema states them as JSON Schema bounds."""
    return Annotated[int, Field(**constraints), BeforeValidator(integral_float_as_int)]


Int = integer()


def schema_only(schema: dict[str, Any]) -> WithJsonSchema:
    """The published schema of an OpenAI field GemServe takes only at its neutral value: the
    document says exactly what is accepted, while the validator below keeps its own message
    ("n: only n=1 is supported", not a generic "must equal")."""
    return WithJsonSchema(schema)


NULL: dict[str, Any] = {"type": "null"}


class FieldError(ValueError):
    """A request field the server refuses; ``param`` names it in the 400 (a model-level
    validator has no field location of its own)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _is_default(value: Any, *harmless: Any) -> bool:
    """``value`` is null or equals one of ``harmless`` as JSON compares them (``false`` is not 0)."""
    return value is None or any(json_equal(value, h) for h in harmless)


def json_equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return a == b


class Neutral(NamedTuple):
    """An unsupported OpenAI field's neutral values: the predicate the server applies, and the same
    set as JSON Schema for the published document (server/openapi.py)."""

    accepts: Callable[[Any], bool]
    schema: dict[str, Any]


def neutral(*values: Any) -> Neutral:
    """The field may be null or equal one of ``values``."""
    return Neutral(lambda v: _is_default(v, *values), {"anyOf": [*({"const": v} for v in values), NULL]})


# OpenAI fields that change what a response means and that GemServe does not implement: a
# request that sets one to anything but its neutral value is a 400 naming it, never answered as
# if it were absent (a client asking for JSON mode must learn it did not get it).
UNSUPPORTED_FIELDS: dict[str, Neutral] = {
    "tools": neutral([]),
    "tool_choice": neutral("none"),
    "functions": neutral([]),
    "function_call": neutral("none"),
    "response_format": neutral({"type": "text"}),
    "top_logprobs": neutral(0),
    "best_of": neutral(1),
    "audio": neutral(),
    "modalities": neutral(["text"]),
    "prediction": neutral(),
    "guided_json": neutral(),
    "guided_regex": neutral(),
    "guided_choice": neutral(),
    "guided_grammar": neutral(),
    "min_tokens": neutral(0),
    "stop_token_ids": neutral([]),
}


def check_extra_fields(model: type[BaseModel], data: Any) -> None:
    """400 for an unsupported field that would change the answer; log the harmless unknown ones
    (as vLLM does) so an operator sees what clients send."""
    if not isinstance(data, dict):
        return
    unknown = [key for key in data if key not in model.model_fields]
    for key in unknown:
        field = UNSUPPORTED_FIELDS.get(key)
        if field is not None and not field.accepts(data[key]):
            raise FieldError(f"{key} is not supported by this server; leave it out or unset", param=key)
    ignored = [key[:64] for key in unknown if key not in UNSUPPORTED_FIELDS]
    if ignored:
        logger.info("ignoring request fields the server does not know: %s", ", ".join(ignored[:20]))


# ---- the compression extension --------------------------------------------------------------
def named_method(value: Any) -> Any:
    """``method`` is the union's discriminator: a name, or left out for the server's default. A
    null would match no branch of the published schema (a discriminator names a branch)."""
    if value is None:
        raise ValueError("null names no method: leave `method` out for the server's default")
    return value


class CompressionParams(BaseModel):
    """``compression`` on a request: which method, its budget and knobs.

    Knobs beyond the common ones (``window``, ``kernel_size``, ``sinks``, ``tail``...) are
    accepted here and checked by the method registry, which names the allowed ones on error.
    """

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    method: Annotated[str | None, BeforeValidator(named_method)] = Field(
        None, description=f"Compression method ({METHOD_NAMES_HINT}); left out: the server's default"
    )
    budget: Int | None = Field(None, description="Tokens to keep (prompt tokens or KV entries per head)")
    ratio: float | None = Field(
        None, description="Fraction of the prompt to keep, in (0, 1]; with budget, the budget caps it"
    )
    layer: Int | None = Field(None, description="GemFilter's filter layer (default: calibrated per model)")
    return_selection: bool = Field(
        False, description="Return the kept token indices, the kept text spans and the prompt as kept/dropped segments"
    )
    return_scores: bool = Field(
        False,
        description="With the selection: GemFilter's per-token scores (at most 2048 bins) or a KV method's kept "
        "positions per layer (at most 256 bins each); implies return_selection",
    )
    attention: str | None = Field(
        None, description=f"Attention backend of the prefill ({ATTENTION_NAMES_HINT}); default: server's (dense)"
    )
    attention_knobs: dict[str, Any] | None = Field(
        None, description="Knobs of the attention backend, e.g. {'threshold': 0.9} for block_sparse"
    )
    filter_attention: str | None = Field(
        None, description=f"GemFilter only: attention backend of the filter pass's layers < r ({ATTENTION_NAMES_HINT})"
    )
    filter_attention_knobs: dict[str, Any] | None = Field(None, description="GemFilter only: knobs of filter_attention")

    def knobs(self) -> dict[str, Any]:
        """Every method knob the request sent, null ones too, for the method registry to validate
        (null is the knob's default, but a knob the method lacks is refused even when null, as the
        published schema says). The prefill's attention backend is not a method knob: the engine
        builds it."""
        return self.model_dump(
            exclude={"method", "return_selection", "return_scores", "attention", "attention_knobs"},
            exclude_unset=True,
        )


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


Seed = Annotated[integer(), AfterValidator(fold_seed)]
# A stop string is never empty (it would end every generation before its first token).
StopText = Annotated[Text, Field(min_length=1)]


class CommonSamplingFields(OpenAIBaseModel):
    """Fields completions and chat share, in OpenAI's order."""

    frequency_penalty: Annotated[float | None, schema_only({"anyOf": [{"const": 0}, NULL]})] = Field(
        0.0, description="Not supported: must be 0"
    )
    logit_bias: Annotated[
        dict[str, float] | None, schema_only({"anyOf": [{"type": "object", "maxProperties": 0}, NULL]})
    ] = Field(None, description="Not supported: must be empty")
    logprobs: Annotated[Any, schema_only({"anyOf": [{"const": False}, {"const": 0}, NULL]})] = Field(
        None, description="Not supported: must be false, 0 or null"
    )
    n: Annotated[Int | None, schema_only({"anyOf": [{"const": 1}, NULL]})] = Field(
        1, description="Number of choices; only 1 is supported"
    )
    presence_penalty: Annotated[float | None, schema_only({"anyOf": [{"const": 0}, NULL]})] = Field(
        0.0, description="Not supported: must be 0"
    )
    seed: Seed | None = Field(None, description="Seed for sampled decoding (any integer; folded into 63 bits)")
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = Field(
        None, description="Up to 4 non-empty strings that end generation"
    )
    stream: bool | None = Field(False, description="Stream tokens as server-sent events")
    stream_options: StreamOptions | None = Field(None, description="include_usage: usage on the last chunk")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass")
    user: str | None = None
    # ---- extensions ----
    compression: CompressionParams | None = Field(None, description="GemServe: prompt/KV compression")
    ignore_eos: bool = Field(False, description="Keep generating past end-of-sequence (benchmarks)")

    @model_validator(mode="before")
    @classmethod
    def refuse_unsupported_fields(cls, data: Any) -> Any:
        check_extra_fields(cls, data)
        return data

    @model_validator(mode="after")
    def reject_unsupported(self) -> CommonSamplingFields:
        if self.n not in (None, 1):
            raise FieldError("only n=1 is supported", param="n")
        if self.frequency_penalty not in (None, 0, 0.0):
            raise FieldError("frequency_penalty is not supported (must be 0)", param="frequency_penalty")
        if self.presence_penalty not in (None, 0, 0.0):
            raise FieldError("presence_penalty is not supported (must be 0)", param="presence_penalty")
        if self.logit_bias:
            raise FieldError("logit_bias is not supported", param="logit_bias")
        if self.logprobs not in (None, False, 0):
            raise FieldError("logprobs is not supported", param="logprobs")
        return self

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


# Marks a bound only the loaded model knows (its vocabulary, its context): server/openapi.py
# writes the number in when it publishes the document.
BOUND_KEY = "x-gemserve-bound"

# A prompt is never empty (the schema says so, so a client's validator agrees with the server);
# token ids are non-negative ints (the vocabulary's upper end is the engine's to check).
PromptText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[integer(ge=0, json_schema_extra={BOUND_KEY: "vocab"})], Field(min_length=1)]
# At least one token; at most what the context leaves after a one-token prompt (the sum of
# prompt and max_tokens is checked against the context at admission: context_length_exceeded).
MaxTokens = integer(ge=1, json_schema_extra={BOUND_KEY: "max_tokens"})
OneText = Annotated[list[PromptText], Field(min_length=1, max_length=1)]
OneTokenIds = Annotated[list[TokenIds], Field(min_length=1, max_length=1)]


class CompletionRequest(CommonSamplingFields):
    model: str | None = Field(None, description="Model name (see /v1/models); default: the served model")
    prompt: PromptText | OneText | TokenIds | OneTokenIds = Field(
        ..., description="Text or token ids; a list must hold exactly one prompt"
    )
    echo: Annotated[bool | None, schema_only({"anyOf": [{"const": False}, NULL]})] = Field(
        False, description="Not supported: must be false"
    )
    max_tokens: MaxTokens | None = Field(16, description="Tokens to generate at most")
    suffix: Annotated[str | None, schema_only({"anyOf": [{"const": ""}, NULL]})] = Field(
        None, description="Not supported: must be empty"
    )

    @model_validator(mode="after")
    def single_prompt(self) -> CompletionRequest:
        if self.echo:
            raise FieldError("echo is not supported", param="echo")
        if self.suffix:
            raise FieldError("suffix is not supported", param="suffix")
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str) and len(prompt) != 1:
            raise FieldError("exactly one prompt per request is supported", param="prompt")
        return self

    def prompt_text_or_ids(self) -> str | list[int]:
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], list | str):
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


class ContentPart(OpenAIBaseModel):
    type: Literal["text"] = "text"
    text: Text


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def template_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """The turns as the chat template gets them, for generation and ``/tokenize`` alike.
    "developer" is OpenAI's new name for "system"; chat templates know "system"."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class ChatCompletionRequest(CommonSamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, description="The conversation so far")
    model: str | None = Field(None, description="Model name (see /v1/models); default: the served model")
    max_tokens: MaxTokens | None = Field(None, description="Deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: MaxTokens | None = Field(None, description="Tokens to generate at most")

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def template_messages(self) -> list[dict[str, str]]:
        return template_messages(self.messages)


# ---- responses ----------------------------------------------------------------------------
class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class SelectionSpan(BaseModel):
    start: int
    end: int
    text: str


class SelectionSegment(BaseModel):
    """A run of prompt tokens ``[start, end)`` that was all kept or all dropped, with its text."""

    start: int
    end: int
    kept: bool
    text: str


class ScoreStrip(BaseModel):
    """A prompt selector's score of every prompt token, binned: ``values[i]`` is the highest score
    of tokens ``[i * bin_tokens, (i + 1) * bin_tokens)``, scaled to [0, 1] over the prompt."""

    bin_tokens: int
    values: list[float]


class LayerKept(BaseModel):
    layer: int
    kv_heads: int
    kv_tokens: int = Field(description="Entries per head after prefill")
    coverage: list[float] = Field(description="Per bin of prompt tokens: fraction of its (head, token) pairs kept")


class LayerCoverage(BaseModel):
    """Which prompt positions a KV method's cache holds after prefill, per layer, in bins."""

    bin_tokens: int
    layers: list[LayerKept]


class SelectionInfo(BaseModel):
    """What was kept (server/engine/spans.py builds it): the kept positions, the kept ``spans`` and
    the whole prompt as kept/dropped ``segments``; with ``return_scores``, ``scores`` (prompt
    selectors) or ``layer_coverage`` (KV methods). Method details (``scoring``, ``span``,
    ``kv_tokens_per_layer``...) come as extra fields."""

    model_config = ConfigDict(extra="allow")

    kept_indices: list[int]
    protected_tail: int = 0
    spans: list[SelectionSpan] = Field(default_factory=list)
    segments: list[SelectionSegment] = Field(default_factory=list)
    scores: ScoreStrip | None = None
    layer_coverage: LayerCoverage | None = None


class AttentionInfo(BaseModel):
    """What an attention backend computed over a prefill: ``density = computed_pairs / causal_pairs``
    (query-key pairs over all layers and query heads; a dense prefill has density 1)."""

    model_config = ConfigDict(extra="allow")

    backend: str
    density: float
    computed_pairs: int = 0
    causal_pairs: int = 0
    sparse_layers: int = 0
    sliding_layers: int = 0
    dense_layers: int = 0
    estimate_ms: float = 0.0
    knobs: dict[str, Any] = Field(default_factory=dict)


class CompressionInfo(BaseModel):
    """What the compression kept: ``ratio = kept_tokens / prompt_tokens``."""

    method: str
    prompt_tokens: int
    kept_tokens: int = Field(
        description="Prompt tokens the model saw (GemFilter), or KV-cache entries each head holds after the "
        "prefill (KV methods; mean over layers where budgets differ per layer)"
    )
    kept_tokens_union: int | None = Field(
        None,
        description="KV methods: prompt positions that at least one layer's head holds (heads keep different "
        "positions, so this exceeds kept_tokens)",
    )
    ratio: float
    select_ms: float
    layer: int | None = None
    kv_bytes_before: int | None = None
    kv_bytes_after: int | None = None
    skipped: str | None = Field(None, description="Why the method kept everything without running")
    attention: AttentionInfo | None = None
    filter_attention: AttentionInfo | None = None
    filter_dtype: str | None = Field(None, description="The dtype GemFilter's filter pass ran in, when it ran")
    confidence: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="GemFilter: the share of the filter layer's attention (outside the protected head and "
        "tail) that the budget's selection held; low means the layer attended to much it could not keep",
    )
    fallback: str | None = Field(
        None,
        description="GemFilter: what a confidence below compression.fallback_below widened the selection "
        "to: 'none' (the whole prompt, uncompressed) or 'budget:N'; null when it kept its budget",
    )
    selection: SelectionInfo | None = None


class MetricsInfo(BaseModel):
    """What the request cost, measured (times in ms; memory named by its source). The engine fills
    this model itself as the request runs."""

    queue_ms: float = 0.0
    select_ms: float = Field(
        0.0,
        description="Choosing what to keep: GemFilter's filter pass (before prefill_ms), or a KV method's "
        "scoring and pruning (inside prefill_ms, which it runs during); equals compression.select_ms",
    )
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    e2e_ms: float = 0.0
    output_tokens_per_s: float = 0.0
    itl_p50_ms: float = Field(0.0, description="Median gap between this request's consecutive tokens, server side")
    itl_max_ms: float = Field(0.0, description="Longest gap between this request's consecutive tokens")
    kv_cache_bytes: int = 0
    peak_memory_bytes: int = 0
    memory_baseline_bytes: int = 0
    memory_source: str = Field(
        "",
        description="What peak_memory_bytes measures; under a shared batch it is the whole process's peak "
        "over this request's lifetime, and the source says so ('...:whole_process_shared_with_up_to_N_...')",
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChoiceFields(BaseModel):
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class CompletionChoice(ChoiceFields):
    text: str


class GemServeFields(BaseModel):
    """The fields every response and stream chunk shares, with what GemServe adds to OpenAI's:
    what compression kept and what the request cost (on responses and the final chunk)."""

    created: int = Field(default_factory=now)
    model: str
    usage: UsageInfo | None = None
    compression: CompressionInfo | None = None
    metrics: MetricsInfo | None = None


class CompletionResponse(GemServeFields):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(ChoiceFields):
    message: ChatResponseMessage


class ChatCompletionResponse(GemServeFields):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionChunkChoice(ChoiceFields):
    delta: ChatDelta


class ChatCompletionChunk(GemServeFields):
    """One SSE event of a streamed chat completion; the last carries usage/compression/metrics."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionChunkChoice]


class CompletionChunk(GemServeFields):
    """One SSE event of a streamed completion (OpenAI uses the ``text_completion`` object)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "gemserve"
    max_model_len: int | None = None  # vLLM may report null
    backend: str | None = None
    dtype: str | None = Field(None, description="What the model computes in (--dtype, resolved for this hardware)")
    filter_dtype: str | None = Field(None, description="What GemFilter's filter pass computes in (--filter-dtype)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(OpenAIBaseModel):
    # Exactly one of prompt / messages, as the schema's oneOf says; neither is nullable.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]},
    )

    model: str | None = None
    prompt: PromptText | TokenIds = Field(  # type: ignore[assignment]
        None, description="Plain text, tokenised without a chat template, or token ids (as /v1/completions takes)"
    )
    messages: list[ChatMessage] = Field(  # type: ignore[assignment]
        None, min_length=1, description="Chat turns, tokenised with the chat template"
    )

    @model_validator(mode="after")
    def exactly_one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
