"""The ``hf`` backend behind the async API: a bounded wait queue in front of worker threads.

:class:`HFEngine` is synchronous and runs one forward at a time per thread. This wrapper gives it
the :class:`~server.engine.base.AsyncEngine` shape (it schedules nothing: each thread runs one
request from its prefill to its last token):

- admission (:mod:`server.engine.admission`, shared with the vllm backend) happens in
  :meth:`HFAsyncEngine.stream` itself: a full queue raises :class:`QueueFullError` (-> 429)
  before any response byte is sent;
- ``max_concurrency`` worker threads (1 by default: on a CPU one forward already uses every
  core) each run one request's generator to the end; the rest wait, at most ``max_queue``;
- tokens cross from the worker thread to the event loop through an ``asyncio.Queue``
  (``call_soon_threadsafe``), so the loop never blocks on torch;
- closing the iterator (client disconnect) sets ``request.cancelled``; the engine checks it
  after every decode step, so at most one more token is computed;
- :meth:`HFAsyncEngine.shutdown` stops admitting and waits for in-flight and queued requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from server.engine.admission import Admission, AdmittedCounts, Ticket
from server.engine.base import EngineEvent
from server.engine.hf import HFEngine
from server.engine.types import GenerationRequest, GenerationResult, TokenDelta
from server.measure import elapsed_ms

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
        # A finished request ignores this; a running one stops after its current decode step.
        if not self._done:
            self.request.cancelled.set()
            self._done = True

    def __del__(self) -> None:
        self.cancel()


class HFAsyncEngine(AdmittedCounts):
    """:class:`HFEngine` + a bounded queue + worker threads: the ``hf`` :class:`AsyncEngine`."""

    backend = "hf"

    def __init__(self, engine: HFEngine, max_concurrency: int = 1, max_queue: int = 64, retry_after_s: int = 1) -> None:
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.admission = Admission(max_concurrency, "max_concurrency", max_queue, retry_after_s)
        self._slots: asyncio.Semaphore | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()

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

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.engine.encode_chat(messages)

    def check_request(self, request: GenerationRequest) -> None:
        self.engine.check_request(request)

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._executor = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="hf-engine")
        self.admission.accepting = True

    async def shutdown(self) -> None:
        """Stop admitting; let every admitted request (running or queued) finish."""
        self.admission.accepting = False
        if self._tasks:
            logger.info("draining %d request(s) before shutdown", len(self._tasks))
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- the request path ----------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> RequestStream:
        ticket = self.admission.admit(lambda: self.check_request(request))
        events: asyncio.Queue[_Item] = asyncio.Queue()
        task = asyncio.create_task(self._serve(request, ticket, events), name=f"request-{request.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return RequestStream(request, events)

    async def _serve(self, request: GenerationRequest, ticket: Ticket, events: asyncio.Queue[_Item]) -> None:
        """Wait for a slot, then run the request's generator in a worker thread."""
        assert self._slots is not None and self._executor is not None  # set by start()
        loop = asyncio.get_running_loop()
        try:
            async with self._slots:
                request.queue_ms = elapsed_ms(request.arrival_time)
                if request.cancelled.is_set():  # the client left while waiting: skip the work
                    events.put_nowait(_END)
                    return
                ticket.start_running()
                await loop.run_in_executor(self._executor, self._run_in_thread, request, events, loop)
        except Exception as exc:  # e.g. the executor shut down under us: surface it to the reader
            events.put_nowait(_Failure(exc))
        finally:
            ticket.release()
            request.finish()

    def _run_in_thread(
        self, request: GenerationRequest, events: asyncio.Queue[_Item], loop: asyncio.AbstractEventLoop
    ) -> None:
        def emit(item: _Item) -> None:
            loop.call_soon_threadsafe(events.put_nowait, item)

        try:
            for event in self.engine.stream(request):
                if isinstance(event, TokenDelta):
                    request.generated_tokens += 1
                else:  # the result: count before the route can answer with it
                    request.finish()
                emit(event)
        except Exception as exc:  # reported to the reader, which turns it into a 500 / error event
            emit(_Failure(exc))
            return
        emit(_END)
