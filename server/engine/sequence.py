"""One request's output side in the hf backend's batch: its tokens become events.

The engine core (server/engine/core.py) hands each token the model runner chose to the request's
:class:`Sequence`, which detokenizes it, checks the stop conditions and emits a :class:`TokenDelta`
per generated token, then one :class:`GenerationResult` (or the error that ended it). The cache
and the method's attachment live in the runner (server/engine/runner.py), the plan in the
scheduler: a preemption does not touch the sequence.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from contract.protocol import CompressionInfo, MetricsInfo
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.types import GenerationRequest, GenerationResult, TokenDelta
from server.measure import PeakWatch, SharedPeakMeter, elapsed_ms

# What a sequence hands its reader: an event, the exception that ended it, or None (it ended
# without a result: cancelled before it started).
Emit = Callable[[TokenDelta | GenerationResult | BaseException | None], None]


class Sequence:
    """A request's events from admission to its last one."""

    def __init__(
        self,
        request: GenerationRequest,
        emit: Emit,
        eos_token_ids: set[int],
        detokenizer: IncrementalDetokenizer,
        meter: SharedPeakMeter,
    ) -> None:
        self.request = request
        self.emit = emit
        self.eos_token_ids = eos_token_ids
        self.detok = detokenizer
        self.meter = meter
        self.metrics = MetricsInfo(queue_ms=request.queue_ms)
        self.report: CompressionInfo | None = None
        self.watch: PeakWatch | None = None
        self.finished = False
        self._decode_start = 0.0
        self._token_times: list[float] = []

    def start(self) -> None:
        """Joins the batch: its wait ends, its memory is watched from here (once: a preempted
        request that joins again has waited inside its run, not in the queue)."""
        if self.watch is not None:
            return
        self.request.queue_ms = self.metrics.queue_ms = elapsed_ms(self.request.arrival_time)
        if self.request.on_start is not None:
            self.request.on_start(self.request)
        self.watch = self.meter.open()

    def prefilled(self, report: CompressionInfo, prefill_ms: float, select_ms: float, kv_cache_bytes: int) -> None:
        """Its first prefill ended: what the response reports of the compression and the prefill."""
        self.report = report
        self.metrics.prefill_ms = prefill_ms
        self.metrics.select_ms = select_ms
        self.metrics.kv_cache_bytes = kv_cache_bytes
        self._decode_start = time.perf_counter()

    def take(self, token: int) -> None:
        """Emit ``token`` (unless it ends the sequence) and decide whether to go on; the first is
        the time to first token."""
        if not self._token_times and not self.metrics.ttft_ms:
            self.metrics.ttft_ms = elapsed_ms(self.request.arrival_time)
        sampling = self.request.sampling
        if token in self.eos_token_ids and not sampling.ignore_eos:
            self.finish("stop")
            return
        self._token_times.append(time.perf_counter())
        self.request.generated_tokens += 1
        self.emit(TokenDelta(token_id=token, text=self.detok.add(token)))
        if self.detok.stopped:
            self.finish("stop")
        elif len(self.detok.token_ids) >= sampling.max_tokens:
            self.finish("length")
        elif self.request.cancelled.is_set():
            self.finish("cancelled")

    # ---- the end -------------------------------------------------------------------------
    def finish(self, finish_reason: str) -> None:
        """The result: flush the detokenizer, close the metrics, let go of the cache."""
        tail = self.detok.flush()
        if tail:
            self.emit(TokenDelta(token_id=-1, text=tail))
        metrics = self.metrics
        generated = len(self.detok.token_ids)
        if self._decode_start:
            metrics.decode_ms = elapsed_ms(self._decode_start)
        metrics.e2e_ms = elapsed_ms(self.request.arrival_time)
        # Tokens after the first, over the time spent producing them (first token is TTFT's).
        decode_after_first = metrics.e2e_ms - metrics.ttft_ms
        if generated > 1 and decode_after_first > 0:
            metrics.output_tokens_per_s = (generated - 1) / (decode_after_first / 1000.0)
        gaps = [(b - a) * 1000.0 for a, b in zip(self._token_times, self._token_times[1:], strict=False)]
        if gaps:
            metrics.itl_p50_ms = statistics.median(gaps)
            metrics.itl_max_ms = max(gaps)
        self.release()
        assert self.report is not None  # a request finishes only once prefilled
        self.emit(
            GenerationResult(
                text=self.detok.text,
                token_ids=list(self.detok.token_ids),
                finish_reason=finish_reason,
                prompt_tokens=len(self.request.prompt_ids),
                compression=self.report,
                metrics=metrics,
            )
        )

    def fail(self, error: BaseException) -> None:
        self.release()
        self.emit(error)

    def drop(self) -> None:
        """Cancelled before it started: no work, no result."""
        self.release()
        self.emit(None)

    def release(self) -> None:
        self.finished = True
        if self.watch is not None:
            self.meter.close(self.watch)
            self.metrics.peak_memory_bytes = self.watch.peak_bytes
            self.metrics.memory_baseline_bytes = self.watch.baseline_bytes
            self.metrics.memory_source = self.meter.source_for(self.watch)
            self.watch = None
