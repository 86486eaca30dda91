"""The vllm backend's filter passes, stepped round-robin in one worker thread.

The filter model's compute is shared (one model, one set of cores), so every pass runs in one
thread; but a pass is a generator of chunks (:meth:`compressors.base.Method.attach_steps` with
``Target.chunk_tokens``), and the thread runs one chunk of each pending pass in turn. A short
prompt's pass then ends after a few chunks even while a long one runs, instead of waiting behind
its whole pass (head-of-line blocking). A pass alone is chunked too: a request that arrives
during it waits for one chunk, not for the rest of a long prompt.

Results go back to the awaiting coroutine through an asyncio future, settled on its own loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Tokens per chunk while other passes wait: small enough that a waiting short pass gets a turn
# within ~one chunk's compute, large enough that each forward still runs wide matmuls. A pure
# token count, so it means the same on CPU and GPU (the time per chunk differs).
DEFAULT_CHUNK_TOKENS = 512


class FilterPass:
    """One request's pass: its steps, the event that cancels it, and where its result goes."""

    def __init__(
        self,
        steps: Generator[None, None, Any],
        cancelled: threading.Event,
        skipped: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.steps = steps
        self.cancelled = cancelled
        self.skipped = skipped  # the result of a pass dropped before it ended
        self.loop = loop
        self.future: asyncio.Future[Any] = loop.create_future()
        # Set (on the loop) when the awaiting coroutine gave up on the future: nobody wants the result.
        self.abandoned = threading.Event()
        self.future.add_done_callback(self._on_done)

    def _on_done(self, future: asyncio.Future[Any]) -> None:
        if future.cancelled():
            self.abandoned.set()

    @property
    def dropped(self) -> bool:
        return self.cancelled.is_set() or self.abandoned.is_set()

    def step(self) -> bool:
        """Run one chunk (or drop the pass); True once the pass is over and its result sent."""
        if self.dropped:
            try:
                self.steps.close()  # runs the generator's cleanup (a half-built pass holds a cache)
            except Exception:  # the pass is dropped either way; the worker must go on
                logger.exception("a cancelled filter pass failed to close")
            self.finish(self.skipped())
            return True
        try:
            with torch.inference_mode():  # per step: the thread runs other passes between them
                next(self.steps)
        except StopIteration as done:
            self.finish(done.value)
            return True
        except Exception as exc:
            self.finish(error=exc)
            return True
        return False

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        try:
            self.loop.call_soon_threadsafe(settle_future, self.future, result, error)
        except RuntimeError:  # the loop closed: nobody awaits this pass any more
            logger.debug("filter pass finished after its event loop closed")


def settle_future(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled by its awaiting coroutine meanwhile
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


class FilterPasses:
    """Pending filter passes, one worker thread stepping them round-robin, a chunk per step."""

    def __init__(self, threads: Callable[[], int], chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> None:
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        self.threads = threads  # torch's thread count for the next step
        self.chunk_size = chunk_tokens
        self._pending: deque[FilterPass] = deque()  # the pass being stepped is out of it meanwhile
        self._wake = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None  # started with the first pass

    @property
    def pending(self) -> int:
        return len(self._pending)

    def chunk_tokens(self, start: int, remaining: int) -> int:
        """A ``Target.chunk_tokens`` policy: one fixed chunk, alone or not, so a pass that arrives
        gets its turn after at most one chunk of the running one."""
        return min(remaining, self.chunk_size)

    def submit(
        self, steps: Generator[None, None, Any], cancelled: threading.Event, skipped: Callable[[], Any]
    ) -> asyncio.Future[Any]:
        """Queue a pass (from a coroutine); the future gets its result, or ``skipped()`` if
        ``cancelled`` is set before it ends. ``steps`` runs only in the worker thread."""
        job = FilterPass(steps, cancelled, skipped, asyncio.get_running_loop())
        with self._wake:
            if self._closed:
                raise RuntimeError("the filter passes are shut down")
            if self._worker is None:
                self._worker = threading.Thread(target=self._run, name="gemfilter", daemon=True)
                self._worker.start()
            self._pending.append(job)
            self._wake.notify()
        return job.future

    def close(self) -> None:
        """Refuse new passes, finish the pending ones, stop the worker (blocks until it has)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            worker = self._worker
        if worker is not None:
            worker.join()

    def _next(self) -> FilterPass | None:
        with self._wake:
            while not self._pending and not self._closed:
                self._wake.wait()
            return self._pending.popleft() if self._pending else None  # None: closed and drained

    def _run(self) -> None:
        while (job := self._next()) is not None:
            # Per step and in this thread: OpenMP's thread count is a per-thread setting, and the
            # right count changes as vLLM starts and finishes requests.
            torch.set_num_threads(self.threads())
            if not job.step():
                with self._wake:
                    self._pending.append(job)
