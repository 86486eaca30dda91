"""One request inside the hf backend's batch: its cache, its method's hooks, its decode state.

The scheduler (server/engine/scheduler.py) moves a :class:`Sequence` through
waiting -> prefilling (its prefill steps, chunk by chunk) -> decoding (a token per batch step) ->
finished, and the sequence turns each token into the request's events: a :class:`TokenDelta`
per generated token, then one :class:`GenerationResult` (or the error that ended it).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Generator

import torch
from transformers.cache_utils import DynamicCache

from compressors import Method
from compressors.attention import AttentionBackend
from compressors.base import Attachment, cache_bytes
from server.engine.batch_forward import Segment
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.sampling import choose_token, make_generator
from server.engine.types import GenerationRequest, GenerationResult, TokenDelta
from server.measure import PeakWatch, SharedPeakMeter, elapsed_ms
from server.protocol import CompressionInfo, MetricsInfo

# What a sequence hands its reader: an event, the exception that ended it, or None (it ended
# without a result: cancelled before it started).
Emit = Callable[[TokenDelta | GenerationResult | BaseException | None], None]


class Sequence:
    """A request's state from admission to its last event."""

    def __init__(
        self,
        request: GenerationRequest,
        method: Method,
        attention: AttentionBackend,
        emit: Emit,
        eos_token_ids: set[int],
        detokenizer: IncrementalDetokenizer,
        meter: SharedPeakMeter,
    ) -> None:
        self.request = request
        self.method = method
        self.attention = attention
        self.emit = emit
        self.eos_token_ids = eos_token_ids
        self.detok = detokenizer
        self.generator = make_generator(request.sampling, meter.device)
        self.meter = meter
        self.metrics = MetricsInfo(queue_ms=request.queue_ms)
        self.cache: DynamicCache | None = None
        self.hooks: Attachment | None = None
        self.report: CompressionInfo | None = None
        # The prefill's steps, set when it starts: they yield a Segment when a chunk is to run,
        # whose logits go back in at the next step (``sent``).
        self.prefill: Generator[Segment | None, torch.Tensor | None, torch.Tensor] | None = None
        self.chunk: Segment | None = None
        self.sent: torch.Tensor | None = None
        self.watch: PeakWatch | None = None
        self.position = 0
        self.token = -1  # the last sampled token: the input of its next decode step
        self.finished = False
        self._decode_start = 0.0
        self._token_times: list[float] = []

    @property
    def cache_tokens(self) -> int:
        """What the batch's token budget reserves for this request (set at admission)."""
        return self.request.cache_tokens

    # ---- decoding ------------------------------------------------------------------------
    def begin_decoding(self, logits: torch.Tensor) -> None:
        """From the prefill's last logits: the first token (TTFT), then decode at the positions
        after the prefilled ids (a pruned cache is shorter than the sequence it stands for)."""
        assert self.hooks is not None  # set by the prefill
        self.metrics.kv_cache_bytes = cache_bytes(self.cache)
        self.position = self.hooks.next_position
        self._decode_start = time.perf_counter()
        token = choose_token(logits, self.request.sampling, self.generator)
        self.metrics.ttft_ms = elapsed_ms(self.request.arrival_time)
        self.take(token)

    def advance(self, logits: torch.Tensor) -> None:
        """After a decode forward fed ``self.token`` at ``self.position``."""
        self.position += 1
        self.take(choose_token(logits, self.request.sampling, self.generator))

    def take(self, token: int) -> None:
        """Emit ``token`` (unless it ends the sequence) and decide whether to go on."""
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
        else:
            self.token = token

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

    def start(self, cache: DynamicCache, prefill: Generator[Segment | None, torch.Tensor | None, torch.Tensor]) -> None:
        """Joins the batch: its memory is watched from here."""
        self.cache, self.prefill = cache, prefill
        self.watch = self.meter.open()

    def release(self) -> None:
        self.finished = True
        self.cache = self.hooks = None
        self.prefill = self.chunk = self.sent = None
        if self.watch is not None:
            self.meter.close(self.watch)
            self.metrics.peak_memory_bytes = self.watch.peak_bytes
            self.metrics.memory_baseline_bytes = self.watch.baseline_bytes
            self.metrics.memory_source = self.meter.source_for(self.watch)
            self.watch = None
