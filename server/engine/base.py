"""The backend-agnostic async engine the HTTP routes talk to.

Every backend (``hf`` through :class:`server.engine.hf_async.HFAsyncEngine`, ``vllm``)
implements :class:`AsyncEngine`. The routes never see a backend's internals: they encode,
check, and iterate ``stream()``, whose last item is the :class:`GenerationResult`.

Errors a backend raises, and the status the web layer maps them to (server/errors.py):

- :class:`~server.engine.types.RequestError` (a ``ValueError``) -> 400
- :class:`QueueFullError` -> 429 with ``Retry-After``
- :class:`EngineNotReadyError` -> 503 (still loading, or shutting down)
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from server.engine.types import GenerationRequest, GenerationResult, RequestOptions, TokenDelta

EngineEvent = TokenDelta | GenerationResult


class EventStream(Protocol):
    """What ``stream()`` returns: an async iterator of events that can be closed early.
    An async generator satisfies it; ``aclose()`` must cancel the request."""

    def __aiter__(self) -> EventStream: ...

    async def __anext__(self) -> EngineEvent: ...

    async def aclose(self) -> None: ...


class QueueFullError(RuntimeError):
    """The wait queue is full: try again after ``retry_after_s`` seconds (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineNotReadyError(RuntimeError):
    """The engine is not accepting requests: still loading or draining for shutdown (HTTP 503)."""


@runtime_checkable
class AsyncEngine(Protocol):
    """What the web layer needs from a backend.

    ``stream()`` is an async generator: it yields one :class:`TokenDelta` per generated token
    and ends with exactly one :class:`GenerationResult`. Closing it early (``aclose()``, which
    happens when the client disconnects) or setting ``request.cancelled`` aborts the request
    within one decode step. ``request.queue_ms`` is set when the request leaves the queue.
    """

    backend: str
    default_method: str

    @property
    def model_name(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def dtype(self) -> str:
        """What the served model computes in (``bfloat16``, ``float32``...: server/precision.py)."""
        ...

    @property
    def filter_dtype(self) -> str:
        """What GemFilter's filter pass computes in."""
        ...

    @property
    def num_running(self) -> int:
        """Requests generating right now."""
        ...

    @property
    def num_waiting(self) -> int:
        """Requests admitted but waiting for a free slot."""
        ...

    def request_options(self) -> RequestOptions:
        """What a request may ask of this engine (the OpenAPI document's bounds and choices)."""
        ...

    def encode_prompt(self, text: str | list[int]) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]: ...

    def check_request(self, request: GenerationRequest) -> None:
        """Raise :class:`RequestError` (-> 400) for anything that would fail later."""
        ...

    def stream(self, request: GenerationRequest) -> EventStream:
        """Admit the request now and return its event iterator.

        A plain (not ``async``) method on purpose: admission errors (:class:`RequestError`,
        :class:`QueueFullError`, :class:`EngineNotReadyError`) are raised by the call itself,
        before any byte of a response is sent, so the route can answer 400/429/503 with a JSON
        body instead of an event stream. Errors while generating come out of the iterator.
        """
        ...

    async def start(self) -> None:
        """Start workers; called once from the app's lifespan after the model is loaded."""
        ...

    async def shutdown(self) -> None:
        """Stop admitting, let in-flight and queued requests finish, stop workers."""
        ...
