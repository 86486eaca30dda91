"""The hf backend's engine core: the step loop between the scheduler and the model runner.

Each :meth:`EngineCore.step`:

1. tells the scheduler which requests were cancelled (a waiting one never starts; a running one
   ends with ``cancelled`` before its next forward: at most one more token after a disconnect);
2. asks the scheduler for a plan (:mod:`server.engine.scheduler`: decode tokens, prefill chunks,
   filter-pass chunks under one token budget; admissions and preemptions);
3. has the runner drop the caches of preempted requests and execute the plan
   (:mod:`server.engine.runner`);
4. hands each chosen token to its request's :class:`~server.engine.sequence.Sequence` (events,
   stop conditions) and tells the scheduler which requests finished or failed.

Single-threaded: the caller (a worker thread of the async engine, or ``HFEngine.events`` for one
request) calls :meth:`step` in a loop; :meth:`add` and the counts are safe from other threads.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time

import torch
from transformers import PreTrainedTokenizerBase

from server.allocator import heap_for_step
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.runner import ModelRunner
from server.engine.scheduler import Scheduler, StepPlan
from server.engine.sequence import Emit, Sequence
from server.engine.step_trace import StepTrace
from server.engine.types import GenerationRequest
from server.measure import SharedPeakMeter

logger = logging.getLogger(__name__)


class EngineCore:
    """A :class:`Scheduler`, a :class:`ModelRunner` and the requests' sequences (see the module doc)."""

    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: set[int],
        id_prefix: str = "",
    ) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.meter = SharedPeakMeter(runner.device)
        # Request ids are keys in the runner, which cores on one engine share: a second core there
        # (the shadow check's, server/engine/hf_async.py) numbers its requests under its own prefix.
        self.id_prefix = id_prefix
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._sequences: dict[str, Sequence] = {}
        self.trace: StepTrace | None = None  # ``--step-trace``: a line per step

    # ---- what other threads may call ------------------------------------------------------
    def add(self, request: GenerationRequest, emit: Emit) -> str:
        """Queue an admitted request (the engine's ``check_request`` built its method); its id here."""
        request_id = f"{self.id_prefix}{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        sequence = Sequence(request, emit, self.eos_token_ids, detok, self.meter)
        work = self.runner.add(request_id, request)
        # The method and backend hold this run's state (counted pairs, kept positions): they moved
        # to the runner, so a request object run again is checked again and gets fresh ones.
        request.method = request.attention = None
        with self._lock:
            self._sequences[request_id] = sequence
        self.scheduler.add(work)
        return request_id

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def batch_size(self) -> int:
        return self.scheduler.batch_size

    @property
    def running_tokens(self) -> int:
        return self.scheduler.running_tokens

    @property
    def waiting_tokens(self) -> int:
        return self.scheduler.waiting_tokens

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the loop's body ----------------------------------------------------------------------
    def step(self) -> None:
        # Inference mode for the whole step: the runner's forwards and the method hooks inside it.
        started, clock = time.time(), time.perf_counter()
        with torch.inference_mode():
            cancelled = self._cancelled()
            plan = self.scheduler.schedule()
            heap_for_step(max((c.tokens for c in (*plan.prefills, *plan.filters)), default=0))
            for request_id in plan.preempted:
                self.runner.free(request_id)
            for request_id in cancelled:
                self._end_cancelled(request_id)
            for request_id in plan.started:
                self._sequences[request_id].start()
            finished, failed = self._run(plan) if not plan.empty or plan.started else (set(), set())
            for request_id in self.scheduler.update(plan, finished, failed):
                self._forget(request_id)
        if self.trace is not None:
            self.trace.record(plan, started, time.perf_counter() - clock)
        self.meter.sample_now()

    def _cancelled(self) -> list[str]:
        with self._lock:
            gone = [i for i, s in self._sequences.items() if s.request.cancelled.is_set() and not s.finished]
        for request_id in gone:
            self.scheduler.cancel(request_id)
        return gone

    def _end_cancelled(self, request_id: str) -> None:
        sequence = self._sequences[request_id]
        if sequence.report is None:  # nothing to report yet: no result
            sequence.drop()
        else:
            sequence.finish("cancelled")
        self._forget(request_id)

    def _run(self, plan: StepPlan) -> tuple[set[str], set[str]]:
        result = self.runner.execute(plan)
        for request_id, kept in result.selected.items():
            self.scheduler.selected(request_id, kept)
        for request_id, error in result.failed.items():
            self._sequences[request_id].fail(error)
        for request_id, prefilled in result.prefilled.items():
            if request_id not in result.failed:
                sequence = self._sequences[request_id]
                sequence.prefilled(
                    prefilled.report, prefilled.prefill_ms, prefilled.select_ms, prefilled.kv_cache_bytes
                )
        finished = set()
        for request_id, token in result.sampled.items():
            sequence = self._sequences[request_id]
            sequence.take(token)
            if sequence.finished:
                finished.add(request_id)
        return finished, set(result.failed)

    def _forget(self, request_id: str) -> None:
        self.runner.remove(request_id)
        with self._lock:
            self._sequences.pop(request_id, None)

    def fail_all(self, error: BaseException) -> None:
        """The step itself failed: end every request rather than leave one waiting for ever."""
        for request_id in self.scheduler.fail_all():
            sequence = self._sequences.get(request_id)
            if sequence is not None and not sequence.finished:
                sequence.fail(error)
            self._forget(request_id)
