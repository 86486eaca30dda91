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
- :meth:`HFAsyncEngine.shutdown` stops admitting and waits for in-flight and queued requests;
- with ``shadow_fraction`` > 0, :class:`ShadowCheck` reruns a sample of the compressed answers
  with full attention on a second core that the same thread steps only while the batch is idle,
  and counts whether the answers agree (``gemserve_shadow_checks_total``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections import Counter, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.allocator import release_free_heap
from server.engine.admission import Admission, AdmittedCounts
from server.engine.base import EngineEvent
from server.engine.checks import CONTEXT_LENGTH_EXCEEDED
from server.engine.hf import HFEngine
from server.engine.scheduler import DEFAULT_MAX_RUNNING, DEFAULT_STEP_TOKENS
from server.engine.step_trace import StepTrace
from server.engine.types import (
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    RequestOptions,
    SamplingParams,
    TokenDelta,
)

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


@contextmanager
def no_openmp_team() -> Iterator[int]:
    """Run the block on one thread (its OpenMP team never forms); yields the thread count it had.

    Why: the batch computes on the scheduler thread, not the thread that loaded the model. Once two
    threads of the process have each run a parallel region with 2+ threads, libgomp counts more
    threads than cores and stops spinning between regions: every small op of a decode step then
    waits on a futex wake. On 2 cores a bfloat16 SmolLM2 decode step took 67-78 ms on a second
    thread against 44-53 ms on the first, and one 1x576 by 576x1536 linear 150 vs 80 us. With the
    loading thread held to one thread, the scheduler thread's team is the only one, and as fast."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield threads
    finally:
        torch.set_num_threads(threads)


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
        shadow_fraction: float = 0.0,
        intra_op_threads: int | None = None,
        warm_up_at_start: bool = False,
        step_trace: Path | None = None,
    ) -> None:
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        if not 0.0 <= shadow_fraction <= 1.0:
            raise ValueError(f"shadow_fraction must be in [0, 1], got {shadow_fraction}")
        self.engine = engine
        self.max_concurrency = max_concurrency
        self.max_batch_tokens = max_batch_tokens
        self.admission = Admission(max_concurrency, "max_concurrency", max_queue, retry_after_s)
        self.core = engine.new_core(max_concurrency, max_batch_tokens, step_tokens, idle_budget)
        self.core.trace = StepTrace(step_trace) if step_trace is not None else None
        self.shadow = ShadowCheck(engine, shadow_fraction, max_batch_tokens, step_tokens) if shadow_fraction else None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.intra_op_threads = intra_op_threads
        self.warm_up_at_start = warm_up_at_start
        self.warm_up_ms: float | None = None
        self._warmed = threading.Event()
        self._warm_up_error: BaseException | None = None

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

    def shadow_counts(self) -> tuple[dict[tuple[str, str, str], int], dict[str, int]]:
        """For /metrics: shadow checks by (method, budget, agree) and skipped ones by reason."""
        return self.shadow.counts() if self.shadow is not None else ({}, {})

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Start the worker thread; with ``warm_up_at_start``, admit requests only once it warmed up."""
        self._stop.clear()
        self._warmed.clear()
        self._warm_up_error = None
        self._thread = threading.Thread(target=self._loop, name="hf-scheduler", daemon=True)
        self._thread.start()
        try:
            await asyncio.to_thread(self._warmed.wait)
        except asyncio.CancelledError:  # the server stops during the warm-up: the thread ends after it
            self._stop.set()
            self._wake.set()
            raise
        if self._warm_up_error is not None or not self._thread.is_alive():
            await self.shutdown()
            reason = self._warm_up_error or "the scheduler thread ended"
            raise RuntimeError(f"the warm-up failed: {reason}") from self._warm_up_error
        self.admission.accepting = True

    async def shutdown(self) -> None:
        """Stop admitting; let every admitted request (running or queued) finish."""
        await self.admission.drain()
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        if self.core.trace is not None:
            self.core.trace.close()
        if self.shadow is not None:  # not waited for: dropped, counted as skipped
            self.shadow.drop_all("shutdown")

    def _loop(self) -> None:
        """The worker thread: step the batch while it has work; while it has none, one step of the
        shadow check at a time (re-checking the batch before each); else hand the heap's free pages
        back to the OS (server/allocator.py: at rest the RSS follows the tensors alive) and sleep
        until a request arrives."""
        self._set_up_thread()
        worked = False
        while not self._stop.is_set():
            if self.core.has_work():
                worked = True
                try:
                    self.core.step()
                except Exception as exc:  # the scheduler's own bug: fail what it held, keep serving
                    logger.exception("scheduler step failed")
                    self.core.fail_all(exc)
            elif self.shadow is not None and self.shadow.has_work():
                worked = True
                self.shadow.step()
            else:
                if worked:
                    release_free_heap()
                    worked = False
                self._wake.wait(timeout=0.1)
                self._wake.clear()

    def _set_up_thread(self) -> None:
        """On the worker thread, the one that will run every forward: its OpenMP thread count, then
        the warm-up (its kernels); start() waits for this and reports a failure (never ready)."""
        try:
            if self.intra_op_threads is not None:
                torch.set_num_threads(self.intra_op_threads)  # OpenMP's thread count is per calling thread
            if self.warm_up_at_start:
                self.warm_up_ms = self.engine.warm_up()
                logger.info("warm-up: %.0f ms (none and gemfilter on a short prompt)", self.warm_up_ms)
                release_free_heap()
        except BaseException as exc:
            logger.exception("warm-up failed")
            self._warm_up_error = exc
            self._stop.set()
            if not isinstance(exc, Exception):
                raise
        finally:
            self._warmed.set()

    # ---- the request path ----------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> RequestStream:
        ticket = self.admission.admit(lambda: self.check_request(request))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Item] = asyncio.Queue()

        def end() -> None:  # on the event loop: counts and the drain see the request leave
            ticket.release()

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
            if self.shadow is not None and isinstance(item, GenerationResult):  # the answer is on its way
                self.shadow.offer(request, item)

        request.on_start = lambda _: loop.call_soon_threadsafe(ticket.start_running)
        self.core.add(request, emit)
        self._wake.set()
        return RequestStream(request, events)


# ---- the shadow check ---------------------------------------------------------------------------
SHADOW_QUEUE = 4  # shadow jobs waiting for an idle batch; beyond it a sampled request is skipped


@dataclass
class ShadowJob:
    """A compressed answer to rerun with full attention: the request's prompt and stop conditions,
    the labels it is counted under, and the answer it is compared with."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    ignore_eos: bool
    method: str
    budget: str
    answer: str
    dropped: bool = False  # counted as skipped (shutdown): its result, if any, is not compared


def budget_label(knobs: dict[str, Any], default_budget: int) -> str:
    """The budget a request asked for, as a metric label: ``256``, ``ratio:0.1``, ``ratio:0.1,max:256``
    (no ``budget`` or ``ratio`` knob: the server's default budget)."""
    budget, ratio = knobs.get("budget"), knobs.get("ratio")
    if ratio is None:
        return str(budget if budget is not None else default_budget)
    return f"ratio:{ratio}" if budget is None else f"ratio:{ratio},max:{budget}"


class ShadowCheck:
    """The operators' shadow check (``--shadow-fraction``): for a sampled share of the greedy
    requests whose compression dropped prompt tokens, the same prompt runs again uncompressed with
    dense attention, greedy, for as many tokens as the answer had (one more when it stopped by
    itself, so a longer full answer shows), and the two texts are compared (whitespace stripped).

    It runs on a core of its own on the engine's runner (request ids ``shadow-N``), one request at
    a time, its prefill in chunks of the step budget; :meth:`HFAsyncEngine._loop` steps it only
    while the batch has no work, one step at a time, so a user request waits at most one shadow
    step (a paused shadow keeps its cache). The user's answer was sent before: it never changes.
    Everything here runs on the worker thread but :meth:`counts` (any thread) and :meth:`drop_all`
    (after the worker stopped).
    """

    def __init__(
        self,
        engine: HFEngine,
        fraction: float,
        max_batch_tokens: int | None,
        step_tokens: int,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.fraction = fraction
        self.max_batch_tokens = max_batch_tokens
        self.rng = rng or random.Random()
        # It shares the runner with the batch's core: ids of its own.
        self.core = engine.new_core(1, max_batch_tokens, step_tokens, idle_budget=step_tokens, id_prefix="shadow-")
        self.pending: deque[ShadowJob] = deque()
        self.running: tuple[ShadowJob, GenerationRequest] | None = None
        self._lock = threading.Lock()
        self._checks: Counter[tuple[str, str, str]] = Counter()
        self._skipped: Counter[str] = Counter()

    def counts(self) -> tuple[dict[tuple[str, str, str], int], dict[str, int]]:
        with self._lock:
            return dict(self._checks), dict(self._skipped)

    def _skip(self, reason: str) -> None:
        with self._lock:
            self._skipped[reason] += 1

    # ---- a user request finished ----------------------------------------------------------
    def offer(self, request: GenerationRequest, result: GenerationResult) -> None:
        """Queue a shadow of this finished request if it is compressed and sampled."""
        info = result.compression
        if info.method == "none" or info.kept_tokens >= info.prompt_tokens:
            return  # nothing dropped: nothing to check
        if result.finish_reason not in ("stop", "length") or self.rng.random() >= self.fraction:
            return
        sampling = request.sampling
        if sampling.temperature != 0:
            self._skip("not_greedy")  # a sampled answer differs from any other run anyway
            return
        if len(self.pending) >= SHADOW_QUEUE:
            self._skip("queue_full")
            return
        self.pending.append(
            ShadowJob(
                prompt_ids=list(request.prompt_ids),
                max_tokens=result.completion_tokens + (1 if result.finish_reason == "stop" else 0),
                stop=list(sampling.stop),
                ignore_eos=sampling.ignore_eos,
                method=info.method,
                budget=budget_label(request.compression.knobs, self.engine.default_budget),
                answer=result.text,
            )
        )

    # ---- the worker thread, while the batch is idle -----------------------------------------
    def has_work(self) -> bool:
        return bool(self.pending) or self.core.has_work()

    def step(self) -> None:
        """One step of the running shadow, starting the next queued one when none runs."""
        while not self.core.has_work() and self.pending:
            self._start(self.pending.popleft())
        if not self.core.has_work():
            return
        try:
            self.core.step()
        except Exception as exc:
            logger.exception("shadow check step failed")
            self.core.fail_all(exc)

    def _start(self, job: ShadowJob) -> None:
        request = GenerationRequest(
            prompt_ids=job.prompt_ids,
            sampling=SamplingParams(
                max_tokens=max(1, job.max_tokens), temperature=0.0, stop=job.stop, ignore_eos=job.ignore_eos
            ),
            compression=CompressionSpec(method="none", attention="dense"),
            request_id="shadow",
        )
        try:
            self.engine.check_request(request)
            if self.max_batch_tokens is not None and request.cache_tokens > self.max_batch_tokens:
                self._skip("too_long")  # the uncompressed prompt would not fit the batch's memory
                return
            self.core.add(request, lambda item: self._finished(job, item))
        except RequestError:
            self._skip("rejected")
            return
        except Exception:  # the engine's own bug: this shadow is lost, the worker thread is not
            logger.exception("shadow check request could not start")
            self._skip("failed")
            return
        self.running = (job, request)

    def _finished(self, job: ShadowJob, item: TokenDelta | GenerationResult | BaseException | None) -> None:
        if isinstance(item, TokenDelta) or job.dropped:
            return
        self.running = None
        if isinstance(item, GenerationResult) and item.finish_reason in ("stop", "length"):
            agree = item.text.strip() == job.answer.strip()
            with self._lock:  # both series, the other at 0: an agreement rate never lacks its numerator
                self._checks[(job.method, job.budget, str(agree).lower())] += 1
                self._checks[(job.method, job.budget, str(not agree).lower())] += 0
        else:
            self._skip("failed")

    def drop_all(self, reason: str) -> None:
        """The server stops: the running shadow and the queued ones are dropped, not waited for."""
        dropped = list(self.pending)
        self.pending.clear()
        if self.running is not None:
            job, request = self.running
            request.cancelled.set()
            dropped.append(job)
            self.running = None
        for job in dropped:
            job.dropped = True
            self._skip(reason)
