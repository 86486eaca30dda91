"""The ``hf`` backend behind the async API: admission in front of a continuously batched scheduler.

- admission (:mod:`server.engine.admission`, shared with the vllm backend) happens in
  :meth:`HFAsyncEngine.stream` itself, before any response byte is sent: a request whose cache
  could never fit the batch's token budget is a 400, a full queue a 429 (:class:`QueueFullError`);
- one worker thread steps the :class:`~server.engine.core.EngineCore` (a scheduler planning each
  step under one token budget, a model runner executing it): up to ``max_concurrency`` requests in
  the batch, the rest wait, at most ``max_queue``;
- tokens cross from the worker thread to the event loop through an ``asyncio.Queue``
  (``call_soon_threadsafe``), so the loop never blocks on torch;
- closing the iterator (client disconnect) sets ``request.cancelled``; the scheduler drops the
  request before its next forward, so at most one more token is computed;
- :meth:`HFAsyncEngine.shutdown` stops admitting and waits for in-flight and queued requests.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from server.engine.admission import Admission, AdmittedCounts
from server.engine.base import EngineEvent
from server.engine.hf import HFEngine
from server.engine.plan import CONTEXT_LENGTH_EXCEEDED
from server.engine.scheduler import DEFAULT_MAX_RUNNING, DEFAULT_STEP_TOKENS
from server.engine.types import GenerationRequest, GenerationResult, RequestError, RequestOptions, TokenDelta

logger = logging.getLogger(__name__)


@dataclass
class _Failure:
    """An exception raised in the worker thread, carried to the event loop."""

    error: BaseException


class _End:
    """Marks the end of a request's event stream."""


_END = _End()
_Item = EngineEvent | _Failure | _End


class RequestStream(AsyncIterator[EngineEvent]):
    """The events of one admitted request. ``aclose()`` (or garbage collection) cancels it."""

    def __init__(self, request: GenerationRequest, events: asyncio.Queue[_Item]) -> None:
        self.request = request
        self._events = events
        self._done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> EngineEvent:
        if self._done:
            raise StopAsyncIteration
        item = await self._events.get()
        if isinstance(item, _End):
            self._done = True
            raise StopAsyncIteration
        if isinstance(item, _Failure):
            self._done = True
            raise item.error
        if isinstance(item, GenerationResult):
            self._done = True
        return item

    async def aclose(self) -> None:
        self.cancel()

    def cancel(self) -> None:
        # A finished request ignores this; a running one stops before its next forward.
        if not self._done:
            self.request.cancelled.set()
            self._done = True

    def __del__(self) -> None:
        self.cancel()


class HFAsyncEngine(AdmittedCounts):
    """:class:`HFEngine` + admission + the batch's :class:`~server.engine.core.EngineCore` stepped
    by one worker thread: the ``hf`` :class:`AsyncEngine`."""

    backend = "hf"

    def __init__(
        self,
        engine: HFEngine,
        max_concurrency: int = DEFAULT_MAX_RUNNING,
        max_queue: int = 64,
        retry_after_s: int = 1,
        max_batch_tokens: int | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        idle_budget: int | None = None,
    ) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.max_batch_tokens = max_batch_tokens
        self.admission = Admission(max_concurrency, "max_concurrency", max_queue, retry_after_s)
        self.core = engine.new_core(max_concurrency, max_batch_tokens, step_tokens, idle_budget)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._open: set[asyncio.Future[None]] = set()  # one per admitted request, done when it ends

    # ---- what the routes read ------------------------------------------------------------
    @property
    def default_method(self) -> str:
        return self.engine.default_method

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def dtype(self) -> str:
        return self.engine.dtype

    @property
    def filter_dtype(self) -> str:
        return self.engine.filter_dtype

    def request_options(self) -> RequestOptions:
        return self.engine.request_options()

    def encode_prompt(self, text: str | list[int]) -> list[int]:
        return self.engine.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.engine.encode_chat(messages)

    def check_request(self, request: GenerationRequest) -> None:
        self.engine.check_request(request)
        budget = self.max_batch_tokens
        if budget is not None and request.cache_tokens > budget:
            raise RequestError(
                f"this request needs {request.cache_tokens} KV-cache tokens (its prompt after compression plus "
                f"max_tokens), more than the batch holds (max_batch_tokens={budget}); compress the prompt "
                "(e.g. compression.method='gemfilter') or lower max_tokens",
                param="max_tokens",
                code=CONTEXT_LENGTH_EXCEEDED,  # this deployment's context is the batch's
            )

    def batch_gauges(self) -> dict[str, int]:
        """For /metrics: requests in the last step, cache tokens the batch holds and the queue
        wants, preemptions so far."""
        return {
            "batch_size": self.core.batch_size if self.core.has_work() else 0,
            "running_tokens": self.core.running_tokens,
            "waiting_tokens": self.core.waiting_tokens,
            "preemptions": self.core.preemptions,
        }

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="hf-scheduler", daemon=True)
        self._thread.start()
        self.admission.accepting = True

    async def shutdown(self) -> None:
        """Stop admitting; let every admitted request (running or queued) finish."""
        self.admission.accepting = False
        if self._open:
            logger.info("draining %d request(s) before shutdown", len(self._open))
            await asyncio.gather(*self._open, return_exceptions=True)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _loop(self) -> None:
        """The worker thread: step the batch while it has work, sleep until a request arrives."""
        while not self._stop.is_set():
            if not self.core.has_work():
                self._wake.wait(timeout=0.1)
                self._wake.clear()
                continue
            try:
                self.core.step()
            except Exception as exc:  # the scheduler's own bug: fail what it held, keep serving
                logger.exception("scheduler step failed")
                self.core.fail_all(exc)

    # ---- the request path ----------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> RequestStream:
        ticket = self.admission.admit(lambda: self.check_request(request))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Item] = asyncio.Queue()
        ended: asyncio.Future[None] = loop.create_future()
        self._open.add(ended)
        ended.add_done_callback(self._open.discard)

        def end() -> None:  # on the event loop: counts and the drain see the request leave
            ticket.release()
            if not ended.done():
                ended.set_result(None)

        def emit(item: TokenDelta | GenerationResult | BaseException | None) -> None:  # scheduler thread
            if isinstance(item, TokenDelta):
                loop.call_soon_threadsafe(events.put_nowait, item)
                return
            request.finish()  # count generated tokens before the route can answer with the result
            loop.call_soon_threadsafe(end)
            if isinstance(item, GenerationResult):
                loop.call_soon_threadsafe(events.put_nowait, item)
            elif isinstance(item, BaseException):
                loop.call_soon_threadsafe(events.put_nowait, _Failure(item))
            loop.call_soon_threadsafe(events.put_nowait, _END)

        request.on_start = lambda _: loop.call_soon_threadsafe(ticket.start_running)
        self.core.add(request, emit)
        self._wake.set()
        return RequestStream(request, events)
