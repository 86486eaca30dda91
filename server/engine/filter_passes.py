"""The vllm backend's filter passes: each runs whole, in a thread of its own, and between decoder
layers the cores go to the pending pass with the least work left.

Why whole (issue 23): a pass cut into token chunks, with other passes' chunks between them, keeps a
KV cache of layers ``0..r`` while it runs and cost 1.10-1.15x the whole pass (8K tokens, chunks of
512-2048, 2-core CPU): each chunk's masked attention over its cached prefix, the cache growing
chunk by chunk. A whole pass is one forward with causal SDPA and no cache: exactly the pass alone.

Why turns: a short prompt's pass must not wait behind a long one's whole pass (issue 15 measured
21.6 s for a 781-token pass queued behind a 6K one, against 3.7 s when they shared the thread). A
hook before every decoder layer of the filter model lets the pending pass with the least work left
(prompt tokens x layers still to run) take the cores: one computes at a time (a baton), and a short
pass that arrives waits for at most one layer of a long one, then runs to its end. Shortest work
first minimises the mean wait; a long pass waits while shorter ones keep arriving, which the
admission queue bounds. A pass that is cancelled is dropped at its next layer (or before it starts).

Results go back to the awaiting coroutine through an asyncio future, settled on its own loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from transformers import PreTrainedModel

from compressors.probe import decoder_layers
from server.allocator import heap_for_step, release_free_heap

logger = logging.getLogger(__name__)


class PassDropped(Exception):
    """Raised inside a dropped pass's forward (at a layer boundary) to end it."""


class FilterPass:
    """One request's pass: its work, its size, the event that cancels it, and where its result goes."""

    def __init__(
        self,
        work: Callable[[], Any],
        tokens: int,
        layers: int,
        cancelled: threading.Event,
        skipped: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        order: int,
    ) -> None:
        self.work = work
        self.tokens = tokens
        self.layers = layers
        self.layers_done = 0
        self.cancelled = cancelled
        self.skipped = skipped  # the result of a pass dropped before it ended
        self.loop = loop
        self.order = order  # submission order: ties go to the earlier pass
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

    @property
    def work_left(self) -> int:
        """Prompt tokens x layers still to run; a dropped pass goes first (it only has to leave)."""
        return -1 if self.dropped else self.tokens * max(0, self.layers - self.layers_done)

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
    """Passes over ``model`` (the filter model), each in its own thread, one computing at a time;
    ``threads()`` gives torch's thread count for the next turn."""

    def __init__(self, model: PreTrainedModel, threads: Callable[[], int]) -> None:
        self.threads = threads
        self._turn = threading.Condition()
        self._ready: list[FilterPass] = []  # submitted, not running, not finished
        self._running: FilterPass | None = None
        self._workers: set[threading.Thread] = set()
        self._closed = False
        self._order = itertools.count()
        self._local = threading.local()  # the pass this thread runs
        self._hooks = [layer.register_forward_pre_hook(self._between_layers) for layer in decoder_layers(model)]

    @property
    def pending(self) -> int:
        """Passes submitted and not finished (running or waiting for their turn)."""
        with self._turn:
            return len(self._ready) + (self._running is not None)

    def submit(
        self,
        work: Callable[[], Any],
        tokens: int,
        layers: int,
        cancelled: threading.Event,
        skipped: Callable[[], Any],
    ) -> asyncio.Future[Any]:
        """Queue a pass (from a coroutine): ``work()`` runs in a thread of its own, its forwards over
        the filter model taking turns with other passes' at layer boundaries; the future gets its
        result, or ``skipped()`` if ``cancelled`` is set before it ends. ``tokens`` and ``layers`` size
        its work for the turn order."""
        job = FilterPass(work, tokens, layers, cancelled, skipped, asyncio.get_running_loop(), next(self._order))
        worker = threading.Thread(target=self._run, args=(job,), name="gemfilter-pass", daemon=True)
        with self._turn:
            if self._closed:
                raise RuntimeError("the filter passes are shut down")
            self._ready.append(job)
            self._workers.add(worker)
            worker.start()  # under the lock: close() never sees a worker that has not started
        return job.future

    def close(self) -> None:
        """Refuse new passes, wait until every pending one has delivered its result, remove the hooks."""
        with self._turn:
            self._closed = True
            while self._workers:
                self._turn.wait()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # ---- in a pass's own thread ------------------------------------------------------------
    def _run(self, job: FilterPass) -> None:
        self._local.job = job
        try:
            job.finish(*self._outcome(job))
        finally:
            with self._turn:
                self._workers.discard(threading.current_thread())
                self._turn.notify_all()
                idle = self._running is None and not self._ready
            if idle:  # as the hf batch does when it idles (server/allocator.py)
                release_free_heap()

    def _outcome(self, job: FilterPass) -> tuple[Any, BaseException | None]:
        """The pass's result or error; the cores go to the next pass as soon as it stops computing."""
        try:
            return self._work(job), None
        except PassDropped:
            pass
        except Exception as exc:
            return None, exc
        finally:
            self._leave(job)
        try:
            return job.skipped(), None
        except Exception as exc:
            return None, exc

    def _work(self, job: FilterPass) -> Any:
        self._take_turn(job)
        if job.dropped:
            raise PassDropped
        with torch.inference_mode():
            return job.work()

    def _take_turn(self, job: FilterPass) -> None:
        """Wait until no pass computes and ``job`` has the least work left of those waiting."""
        with self._turn:
            while self._running is not None or self._next() is not job:
                self._turn.wait()
            self._ready.remove(job)
            self._running = job
        # Per turn: OpenMP's thread count is a per-thread setting, and the right count changes as
        # vLLM starts and finishes requests. One pass computes at a time, so the heap's threshold
        # is set for its size (server/allocator.py: a long pass returns its freed blocks at once).
        torch.set_num_threads(self.threads())
        heap_for_step(job.tokens)

    def _between_layers(self, module: Any, args: Any) -> None:
        """Before each decoder layer: drop a cancelled pass, or hand the cores to a pass with less
        work left. A forward outside the passes (no pass in this thread) goes on untouched."""
        job: FilterPass | None = getattr(self._local, "job", None)
        if job is None:
            return
        if job.dropped:
            raise PassDropped
        with self._turn:
            waiting = self._next()
            hand_over = waiting is not None and waiting.work_left < job.work_left
            if hand_over:
                self._running = None
                self._ready.append(job)
                self._turn.notify_all()
        if hand_over:
            self._take_turn(job)
            if job.dropped:
                raise PassDropped
        job.layers_done += 1  # the layer starting now: at the next boundary work_left counts from the one after

    def _leave(self, job: FilterPass) -> None:
        with self._turn:
            if self._running is job:
                self._running = None
            elif job in self._ready:
                self._ready.remove(job)
            self._turn.notify_all()

    def _next(self) -> FilterPass | None:
        return min(self._ready, key=lambda j: (j.work_left, j.order), default=None)
