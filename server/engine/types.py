"""What goes into an engine and what comes out.

Requests are plain dataclasses; results carry the response's own ``compression`` and ``metrics``
models (contract/protocol.py, torch-free), which the engine fills directly: one definition of
each, from the engine to the SDK.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from contract.protocol import CompressionInfo, MetricsInfo

if TYPE_CHECKING:
    from compressors import Method
    from compressors.attention import AttentionBackend


class RequestError(ValueError):
    """The request cannot be served as asked (HTTP 400); ``param`` names the field, ``code`` is
    OpenAI's machine-readable reason where it has one (``context_length_exceeded``)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class RequestOptions:
    """What this engine accepts in a request, for the published OpenAPI document
    (server/openapi.py): the bounds only the loaded model knows, and the compression methods and
    attention backends the backend can run."""

    vocab_size: int
    max_model_len: int
    methods: tuple[str, ...]
    default_method: str
    attentions: tuple[str, ...]
    default_attention: str
    filter_layers: int  # GemFilter's ``layer`` is in [0, filter_layers)
    positions: tuple[str, ...]  # GemFilter's ``positions`` the backend can run


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be >= 1, got {self.max_tokens}", param="max_tokens")
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}", param="top_p")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty", param="stop")


@dataclass
class CompressionSpec:
    """The request's ``compression`` object: method, its knobs, whether to return the selection, and
    the attention backend of the full model's prefill (GemFilter's filter-pass backend is a knob)."""

    method: str | None = None  # None: the server's default method
    knobs: dict[str, Any] = field(default_factory=dict)
    return_selection: bool = False
    return_scores: bool = False  # implies return_selection
    attention: str | None = None  # the prefill's attention backend; None: the server's default
    attention_knobs: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    compression: CompressionSpec = field(default_factory=CompressionSpec)
    request_id: str = ""
    arrival_time: float = field(default_factory=time.perf_counter)  # TTFT counts from here
    queue_ms: float = 0.0  # set by the scheduler when the request leaves the queue
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated_tokens: int = 0  # counted by the engine as it decodes, also for a request cut short
    # Built and validated once, at admission (the engine's check_request), then carried here.
    method: Method | None = None
    attention: AttentionBackend | None = None
    # KV-cache entries per layer the request holds at most (compressed prompt + max_tokens): what
    # the hf batch's token budget reserves for it; set by check_request.
    cache_tokens: int = 0
    # Called by the hf scheduler when the request leaves the queue and joins the batch.
    on_start: Callable[[GenerationRequest], None] | None = None
    # Called once by the engine when it is done with the request (finished, failed or cancelled):
    # the server counts generated tokens here, so those decoded before a disconnect count too.
    on_finish: Callable[[GenerationRequest], None] | None = None

    def finish(self) -> None:
        hook, self.on_finish = self.on_finish, None
        if hook is not None:
            hook(self)


@dataclass
class TokenDelta:
    """One generated token and the text it made printable (may be "" mid-character)."""

    token_id: int
    text: str


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    compression: CompressionInfo
    metrics: MetricsInfo

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)
