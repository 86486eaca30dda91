"""The hf backend's iteration-level scheduler: one batch, stepped one forward at a time.

Each :meth:`Scheduler.step`:

1. drops cancelled requests (a waiting one never starts; a running one ends with ``cancelled``
   before its next forward: at most one more token after a disconnect);
2. moves waiting requests into the batch, first come first served, while the batch has fewer
   than ``max_running`` requests and their reserved cache tokens fit ``max_batch_tokens`` (a
   request reserves what its cache holds at most: the prompt *after compression* plus
   ``max_tokens``; so compressed requests let more run at once);
3. advances the oldest prefilling request by one step: GemFilter's filter pass and the prefill
   itself run in chunks while others decode, each chunk sized so its cost stays near
   ``prefill_chunk_tokens`` tokens of linear work (fewer tokens deeper into a long prompt, where
   each query attends to more keys), so a long prompt does not stall everyone's token stream.
   With nobody decoding, a prefill runs whole;
4. runs one forward for every decoding request that can share it plus the prefill's chunk, if it
   has one (the tokens as one ragged sequence, :mod:`server.engine.batch_forward`), then one
   forward per request whose method reads the decode forward (H2O).

Single-threaded: the caller (a worker thread of the async engine, or the synchronous
``HFEngine.stream``) calls :meth:`step` in a loop; :meth:`add` and the counts are safe to call
from other threads.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel

from server.engine.batch_forward import Segment, forward_segments, new_request_cache
from server.engine.sequence import Emit, Sequence
from server.engine.types import GenerationRequest
from server.measure import SharedPeakMeter, elapsed_ms

if TYPE_CHECKING:
    from server.engine.hf import HFEngine

logger = logging.getLogger(__name__)

# Measured on SmolLM2-135M, 2 CPU cores (docs/benchmarks.md, "Continuous batching"): see
# bench/batching.py for the p99 inter-token latency while an 8K prompt is prefilled.
DEFAULT_PREFILL_CHUNK_TOKENS = 32
DEFAULT_MAX_RUNNING = 8


def attention_break_even(model: PreTrainedModel) -> float:
    """The context length at which one query's attention costs as much as its linear layers:
    ``2 * params`` FLOPs per token against ``4 * layers * heads * head_dim`` per cached key."""
    config = model.config.get_text_config()
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    per_key = 4 * int(config.num_hidden_layers) * heads * head_dim
    params = sum(p.numel() for p in model.parameters())
    return max(1.0, 2.0 * params / per_key)


class Scheduler:
    """Waiting -> prefilling -> decoding, one :meth:`step` at a time (see the module doc)."""

    def __init__(
        self,
        engine: HFEngine,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_batch_tokens: int | None = None,
        prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be >= 1, got {max_running}")
        if prefill_chunk_tokens < 1:
            raise ValueError(f"prefill_chunk_tokens must be >= 1, got {prefill_chunk_tokens}")
        self.engine = engine
        self.model = engine.model
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.break_even = attention_break_even(self.model)
        self.meter = SharedPeakMeter(engine.device)
        self._lock = threading.Lock()
        self._waiting: deque[Sequence] = deque()
        self._prefilling: deque[Sequence] = deque()
        self._decoding: list[Sequence] = []
        self.running_tokens = 0  # reserved by the requests in the batch
        self.batch_size = 0  # requests in the last decode forward

    # ---- what other threads may call ------------------------------------------------------
    def add(self, request: GenerationRequest, emit: Emit) -> None:
        """Queue an admitted request (``engine.check_request`` has built its method)."""
        sequence = self.engine.new_sequence(request, emit, self.meter)
        with self._lock:
            self._waiting.append(sequence)

    @property
    def waiting_tokens(self) -> int:
        with self._lock:
            return sum(s.cache_tokens for s in self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    def has_work(self) -> bool:
        return bool(self._waiting or self._prefilling or self._decoding)

    # ---- the loop's body ----------------------------------------------------------------------
    def step(self) -> None:
        # Inference mode for the whole step, not inside the prefill generators: a guard entered
        # in a generator would stay on across its yields, under other requests' work.
        with torch.inference_mode():
            self.drop_cancelled()
            self.admit()
            head = self._prefilling[0] if self._prefilling else None
            if head is not None:
                self.prefill_step(head)  # may join the decoders now: it decodes in this step
            chunk_of = head if head is not None and head.chunk is not None and not head.finished else None
            if self._decoding:
                self.decode_step(chunk_of)  # the chunk rides in the shared decode forward
            elif chunk_of is not None:
                self._run([chunk_of], lambda: self.run_chunk_alone(chunk_of))
            self.forget_finished()
        self.meter.sample_now()

    def drop_cancelled(self) -> None:
        with self._lock:
            gone = [s for s in self._waiting if s.request.cancelled.is_set()]
            for sequence in gone:
                self._waiting.remove(sequence)
        for sequence in gone:
            sequence.drop()
        for sequence in [s for s in (*self._prefilling, *self._decoding) if s.request.cancelled.is_set()]:
            if sequence.report is None:  # still prefilling: nothing to report
                sequence.drop()
            else:
                sequence.finish("cancelled")
        self.forget_finished()

    def admit(self) -> None:
        while True:
            with self._lock:
                if not self._waiting or self.num_running >= self.max_running:
                    return
                head = self._waiting[0]
                if (
                    self.max_batch_tokens is not None
                    and self.running_tokens + head.cache_tokens > self.max_batch_tokens
                ):
                    return  # first come first served: a large request is not overtaken for ever
                self._waiting.popleft()
                self.running_tokens += head.cache_tokens
            head.request.queue_ms = head.metrics.queue_ms = elapsed_ms(head.request.arrival_time)
            if head.request.on_start is not None:
                head.request.on_start(head.request)
            try:
                head.start(new_request_cache(self.model), self.engine.prefill_steps(head, self.chunk_tokens))
            except Exception as exc:  # e.g. no memory for its cache: this request fails, not the batch
                logger.exception("could not start request %s", head.request.request_id)
                self._release_budget(head)
                head.fail(exc)
                continue
            self._prefilling.append(head)

    def chunk_tokens(self, start: int, remaining: int) -> int:
        """The next prefill chunk at position ``start``: whole when nobody waits on this step,
        else ``prefill_chunk_tokens`` scaled down by the attention each query does at ``start``."""
        if not self._decoding:
            return remaining
        scaled = int(self.prefill_chunk_tokens / (1.0 + start / self.break_even))
        return max(1, min(remaining, scaled))

    def prefill_step(self, sequence: Sequence) -> None:
        """Advance a prefill by one step; the logits of the chunk the last step ran go in."""
        assert sequence.prefill is not None  # set by start()
        try:
            sequence.chunk = sequence.prefill.send(sequence.sent)
            sequence.sent = None
            return
        except StopIteration as done:
            logits = done.value
        except Exception as exc:  # this request's own failure: the batch goes on
            logger.exception("prefill failed (request %s)", sequence.request.request_id)
            self._prefilling.remove(sequence)
            self._release_budget(sequence)
            sequence.fail(exc)
            return
        self._prefilling.remove(sequence)
        sequence.begin_decoding(logits)
        if sequence.finished:
            self._release_budget(sequence)
        else:
            self._decoding.append(sequence)

    def decode_step(self, chunk_of: Sequence | None = None) -> None:
        """One forward for the decoders that share it (and ``chunk_of``'s prefill chunk), then one
        per decoder whose method reads its own decode forward."""
        shared = [s for s in self._decoding if s.hooks is not None and s.hooks.batched_decode]
        alone = [s for s in self._decoding if s not in shared]
        self.batch_size = len(shared) + len(alone)
        if shared or chunk_of is not None:
            together = shared + ([chunk_of] if chunk_of is not None else [])
            self._run(together, lambda: self.forward_shared(shared, chunk_of))
        for sequence in alone:
            self._run([sequence], lambda s=sequence: self.decode_alone(s))
        self.forget_finished()

    def forward_shared(self, decoders: list[Sequence], chunk_of: Sequence | None) -> None:
        segments = [Segment([s.token], s.position, s.cache) for s in decoders]  # type: ignore[arg-type]
        if chunk_of is not None:
            assert chunk_of.chunk is not None
            segments.append(chunk_of.chunk)
        logits = forward_segments(self.model, segments)
        for row, sequence in enumerate(decoders):
            assert sequence.hooks is not None
            sequence.hooks.after_decode()
            sequence.advance(logits[row])
        if chunk_of is not None:
            chunk_of.sent, chunk_of.chunk = logits[-1], None

    def run_chunk_alone(self, sequence: Sequence) -> None:
        assert sequence.hooks is not None and sequence.chunk is not None
        sequence.sent = self.engine.run_chunk(sequence.hooks, sequence.chunk)
        sequence.chunk = None

    def decode_alone(self, sequence: Sequence) -> None:
        assert sequence.hooks is not None and sequence.cache is not None
        logits = self.engine.decode_one_token(sequence.token, sequence.cache, sequence.position, sequence.hooks)
        sequence.advance(logits)

    def _run(self, batch: list[Sequence], work: Callable[[], None]) -> None:
        try:
            work()
        except Exception as exc:  # a shared forward failed: every request in it failed
            logger.exception("decode step failed (requests %s)", [s.request.request_id for s in batch])
            for sequence in batch:
                if not sequence.finished:
                    sequence.fail(exc)

    def fail_all(self, error: BaseException) -> None:
        """The scheduler itself failed: end every request rather than leave one waiting for ever."""
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for sequence in [*waiting, *self._prefilling, *self._decoding]:
            if not sequence.finished:
                sequence.fail(error)
        self._prefilling.clear()
        self._decoding.clear()
        self.running_tokens = 0

    def forget_finished(self) -> None:
        for sequence in [s for s in (*self._prefilling, *self._decoding) if s.finished]:
            if sequence in self._prefilling:
                self._prefilling.remove(sequence)
            else:
                self._decoding.remove(sequence)
            self._release_budget(sequence)

    def _release_budget(self, sequence: Sequence) -> None:
        with self._lock:
            self.running_tokens -= sequence.cache_tokens
