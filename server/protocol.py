"""Request and response models: OpenAI's schema plus GemServe's ``compression`` extension.

One definition shared by the server and the SDK (clients/), so this module imports pydantic
only: never torch, never the engine. Fields follow OpenAI's order, extensions last.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

logger = logging.getLogger(__name__)

METHOD_NAMES_HINT = "none | gemfilter | snapkv | h2o | streamingllm | pyramidkv"
ATTENTION_NAMES_HINT = "dense | streaming | vertical_slash | block_sparse"


# OpenAI's seed is a 64-bit integer; torch's generator takes no more.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


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


class FieldError(ValueError):
    """A request field the server refuses; ``param`` names it in the 400 (a model-level
    validator has no field location of its own)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _is_default(value: Any, *harmless: Any) -> bool:
    return value is None or any(value == h for h in harmless)


# OpenAI fields that change what a response means and that GemServe does not implement: a
# request that sets one to anything but its neutral value is a 400 naming it, never answered as
# if it were absent (a client asking for JSON mode must learn it did not get it). Name ->
# predicate "this value is neutral".
UNSUPPORTED_FIELDS: dict[str, Callable[[Any], bool]] = {
    "tools": lambda v: _is_default(v, []),
    "tool_choice": lambda v: _is_default(v, "none"),
    "functions": lambda v: _is_default(v, []),
    "function_call": lambda v: _is_default(v, "none"),
    "response_format": lambda v: _is_default(v, {"type": "text"}),
    "top_logprobs": lambda v: _is_default(v, 0),
    "best_of": lambda v: _is_default(v, 1),
    "audio": lambda v: _is_default(v),
    "modalities": lambda v: _is_default(v, ["text"]),
    "prediction": lambda v: _is_default(v),
    "guided_json": lambda v: _is_default(v),
    "guided_regex": lambda v: _is_default(v),
    "guided_choice": lambda v: _is_default(v),
    "guided_grammar": lambda v: _is_default(v),
    "min_tokens": lambda v: _is_default(v, 0),
    "stop_token_ids": lambda v: _is_default(v, []),
}


def check_extra_fields(model: type[BaseModel], data: Any) -> None:
    """400 for an unsupported field that would change the answer; log the harmless unknown ones
    (as vLLM does) so an operator sees what clients send."""
    if not isinstance(data, dict):
        return
    unknown = [key for key in data if key not in model.model_fields]
    for key in unknown:
        neutral = UNSUPPORTED_FIELDS.get(key)
        if neutral is not None and not neutral(data[key]):
            raise FieldError(f"{key} is not supported by this server; leave it out or unset", param=key)
    ignored = [key[:64] for key in unknown if key not in UNSUPPORTED_FIELDS]
    if ignored:
        logger.info("ignoring request fields the server does not know: %s", ", ".join(ignored[:20]))


# ---- the compression extension --------------------------------------------------------------
class CompressionParams(BaseModel):
    """``compression`` on a request: which method, its budget and knobs.

    Knobs beyond the common ones (``window``, ``kernel_size``, ``sinks``, ``tail``...) are
    accepted here and checked by the method registry, which names the allowed ones on error.
    """

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    method: str | None = Field(None, description=f"Compression method ({METHOD_NAMES_HINT}); default: server's")
    budget: int | None = Field(None, description="Tokens to keep (prompt tokens or KV entries per head)")
    ratio: float | None = Field(None, description="Fraction of the prompt to keep, in (0, 1]; instead of budget")
    layer: int | None = Field(None, description="GemFilter's filter layer (default: calibrated per model)")
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
        """Every method knob the request set, for the method registry to validate (the prefill's
        attention backend is not a method knob: the engine builds it)."""
        return self.model_dump(
            exclude={"method", "return_selection", "return_scores", "attention", "attention_knobs"},
            exclude_none=True,
        )


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class CommonSamplingFields(OpenAIBaseModel):
    """Fields completions and chat share, in OpenAI's order."""

    frequency_penalty: float | None = Field(0.0, description="Not supported: must be 0")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported")
    logprobs: Any = Field(None, description="Not supported")
    n: int | None = Field(1, description="Number of choices; only 1 is supported")
    presence_penalty: float | None = Field(0.0, description="Not supported: must be 0")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Seed for sampled decoding (64-bit)")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings that end generation")
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

    @field_validator("stop")
    @classmethod
    def at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

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


# A prompt is never empty (the schema says so, so a client's validator agrees with the server);
# token ids are non-negative ints (the vocabulary's upper end is the engine's to check).
PromptText = Annotated[Text, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
OneText = Annotated[list[PromptText], Field(min_length=1, max_length=1)]
OneTokenIds = Annotated[list[TokenIds], Field(min_length=1, max_length=1)]


class CompletionRequest(CommonSamplingFields):
    model: str | None = Field(None, description="Model name (see /v1/models); default: the served model")
    prompt: PromptText | OneText | TokenIds | OneTokenIds = Field(
        ..., description="Text or token ids; a list must hold exactly one prompt"
    )
    echo: bool | None = Field(False, description="Not supported")
    max_tokens: int | None = Field(16, ge=1, description="Tokens to generate at most")
    suffix: str | None = Field(None, description="Not supported")

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
    max_tokens: int | None = Field(None, ge=1, description="Deprecated by OpenAI in favour of max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="Tokens to generate at most")

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
