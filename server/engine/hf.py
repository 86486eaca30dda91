"""The transformers backend: compression plan -> prefill -> decode, one token at a time.

Shaped after gpt-fast: ``prefill`` and ``decode_one_token`` are small and separate, and
compression sits at the prefill boundary. Every method, ``none`` included, runs this same
path on the same model (last-token logits only in prefill), so timings compare methods and
nothing else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from contextlib import nullcontext
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from compressors import CompressionError, KVCompressor, Method, PromptSelector, Selection, build_method
from compressors.attention import DEFAULT_ATTENTION, AttentionBackend, build_attention
from compressors.base import cache_bytes
from compressors.probe import use_attention
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.plan import check_context_length, check_method_for_prompt, compression_report
from server.engine.sampling import choose_token, make_generator
from server.engine.tokenize import PromptEncoder
from server.engine.types import (
    CompressionReport,
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    TokenDelta,
)
from server.measure import PeakMemoryMeter, RequestMetrics, elapsed_ms, sync
from server.models import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 1024


class HFEngine:
    """Runs one request at a time on a loaded transformers model (the scheduler serialises)."""

    backend = "hf"

    def __init__(
        self,
        loaded: LoadedModel,
        default_method: str = "none",
        default_budget: int = DEFAULT_BUDGET,
        default_attention: str = DEFAULT_ATTENTION,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.device = loaded.device
        self.default_method = default_method
        self.default_budget = default_budget
        self.default_attention = default_attention
        self.eos_token_ids = collect_eos_ids(loaded)
        self.encoder = PromptEncoder(self.tokenizer, loaded.max_model_len)
        build_method(default_method).validate_for_model(self.model)
        build_attention(default_attention)

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    # ---- tokenisation -------------------------------------------------------------------
    def encode_prompt(self, text: str) -> list[int]:
        return self.encoder.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encoder.encode_chat(messages)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    # ---- validation, before a request is queued ------------------------------------------
    def resolve_method(self, spec: CompressionSpec) -> Method:
        try:
            method = build_method(self.default_method if spec.method is None else spec.method, spec.knobs)
            method.validate_for_model(self.model)
        except CompressionError as exc:
            raise RequestError(str(exc), param=exc.param) from exc
        return method

    def resolve_attention(self, spec: CompressionSpec) -> AttentionBackend:
        """A fresh backend for this request's prefill (it counts the pairs it computes)."""
        try:
            name = self.default_attention if spec.attention is None else spec.attention
            return build_attention(name, spec.attention_knobs)
        except CompressionError as exc:
            raise RequestError(str(exc), param=exc.param) from exc

    def check_request(self, request: GenerationRequest) -> Method:
        """Raise :class:`RequestError` for anything that would fail later; return the method."""
        if not request.prompt_ids:
            raise RequestError("prompt must not be empty", param="prompt")
        request.sampling.validate()
        method = self.resolve_method(request.compression)
        self.resolve_attention(request.compression)
        check_context_length(
            len(request.prompt_ids), method, request.sampling.max_tokens, self.max_model_len, self.default_budget
        )
        check_method_for_prompt(method, len(request.prompt_ids), self.default_budget)
        return method

    # ---- the request path -----------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        for event in self.stream(request):
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("engine stream ended without a result")

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a :class:`TokenDelta` per generated token, then one :class:`GenerationResult`."""
        method = self.check_request(request)
        metrics = RequestMetrics(queue_ms=request.queue_ms)
        meter = PeakMemoryMeter(self.device)
        with meter, torch.inference_mode():
            result = yield from self._run(request, method, metrics, meter)
        metrics.peak_memory_bytes = meter.peak_bytes
        metrics.memory_baseline_bytes = meter.baseline_bytes
        metrics.memory_source = meter.source
        yield result

    def _run(
        self, request: GenerationRequest, method: Method, metrics: RequestMetrics, meter: PeakMemoryMeter
    ) -> Generator[TokenDelta, None, GenerationResult]:
        prompt = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        n = prompt.shape[1]
        selection, prefill_ids = self.select_prompt(method, prompt)
        metrics.select_ms = selection.select_ms

        cache = DynamicCache(config=self.model.config)
        attention = self.resolve_attention(request.compression)
        start = time.perf_counter()
        logits, kv_before = self.prefill(prefill_ids, cache, method, attention)
        if isinstance(method, KVCompressor):
            selection = method.compress(cache, n, self.default_budget)
        sync(self.device)
        meter.sample_now()
        metrics.prefill_ms = elapsed_ms(start)
        report = self.report(request, method, selection, cache, kv_before, attention)
        position = int(prefill_ids.shape[1]) if not isinstance(method, KVCompressor) else n
        return (yield from self.decode_from(request, method, cache, logits, position, report, metrics))

    def report(
        self,
        request: GenerationRequest,
        method: Method,
        selection: Selection,
        cache: DynamicCache,
        kv_before: int,
        attention: AttentionBackend,
    ) -> CompressionReport:
        """The response's ``compression`` once the cache is final (pruned, for KV methods)."""
        report = compression_report(
            method, selection, self.tokenizer, request.prompt_ids, request.compression.return_selection
        )
        if isinstance(method, KVCompressor):
            report.kv_bytes_before, report.kv_bytes_after = kv_before, cache_bytes(cache)
        report.attention = attention.report()
        return report

    def decode_from(
        self,
        request: GenerationRequest,
        method: Method,
        cache: DynamicCache,
        logits: torch.Tensor,
        position: int,
        report: CompressionReport,
        metrics: RequestMetrics,
    ) -> Generator[TokenDelta, None, GenerationResult]:
        """From the prefill's last logits to the result: sample, yield, decode one token at a time.
        ``position`` is the next token's position (a pruned cache is shorter than the sequence)."""
        metrics.kv_cache_bytes = cache_bytes(cache)
        sampling = request.sampling
        generator = make_generator(sampling, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        finish_reason = "length"
        decode_start = time.perf_counter()
        token = choose_token(logits, sampling, generator)
        metrics.ttft_ms = elapsed_ms(request.arrival_time)
        while True:
            if token in self.eos_token_ids and not sampling.ignore_eos:
                finish_reason = "stop"
                break
            text = detok.add(token)
            yield TokenDelta(token_id=token, text=text)
            if detok.stopped:
                finish_reason = "stop"
                break
            if len(detok.token_ids) >= sampling.max_tokens:
                break
            if request.cancelled.is_set():
                finish_reason = "cancelled"
                break
            logits = self.decode_one_token(token, cache, position, method)
            position += 1
            token = choose_token(logits, sampling, generator)
        tail = detok.flush()
        if tail:
            yield TokenDelta(token_id=-1, text=tail)
        sync(self.device)
        generated = len(detok.token_ids)
        metrics.decode_ms = elapsed_ms(decode_start)
        metrics.e2e_ms = elapsed_ms(request.arrival_time)
        # Tokens after the first, over the time spent producing them (first token is TTFT's).
        decode_after_first = metrics.e2e_ms - metrics.ttft_ms
        if generated > 1 and decode_after_first > 0:
            metrics.output_tokens_per_s = (generated - 1) / (decode_after_first / 1000.0)
        return GenerationResult(
            text=detok.text,
            token_ids=list(detok.token_ids),
            finish_reason=finish_reason,
            prompt_tokens=len(request.prompt_ids),
            compression=report,
            metrics=metrics,
        )

    def select_prompt(self, method: Method, prompt: torch.Tensor) -> tuple[Selection, torch.Tensor]:
        """Run a prompt selector (GemFilter); other methods keep every prompt token here."""
        n = int(prompt.shape[1])
        if isinstance(method, PromptSelector):
            selection = method.select(self.model, prompt, self.default_budget, self.tokenizer)
            sync(self.device)
            if selection.kept_tokens == n:
                return selection, prompt
            kept = torch.tensor(selection.kept_indices, dtype=torch.long, device=self.device)
            return selection, prompt.index_select(1, kept)
        return Selection(method=method.name, prompt_tokens=n, kept_indices=list(range(n))), prompt

    def prefill(
        self, ids: torch.Tensor, cache: DynamicCache, method: Method, attention: AttentionBackend | None = None
    ) -> tuple[torch.Tensor, int]:
        """Fill the cache with ``ids`` at positions ``0..len-1`` with ``attention`` computing the
        attention (None: dense); return last-token logits and the cache bytes before any pruning."""
        observe = (
            method.prefill_observer(self.model, int(ids.shape[1]))
            if isinstance(method, KVCompressor)
            else nullcontext()
        )
        with observe, use_attention(attention):
            logits = self.forward(ids, cache, start_position=0)
        return logits, cache_bytes(cache)

    def decode_one_token(self, token: int, cache: DynamicCache, position: int, method: Method) -> torch.Tensor:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        if isinstance(method, KVCompressor):
            with method.decode_observer(self.model):
                logits = self.forward(ids, cache, start_position=position)
            method.after_decode_step(cache)
            return logits
        return self.forward(ids, cache, start_position=position)

    def forward(self, ids: torch.Tensor, cache: DynamicCache, start_position: int) -> torch.Tensor:
        """One forward; positions are explicit because a pruned cache is shorter than the
        sequence it stands for. Only the last position's logits are computed."""
        positions = torch.arange(start_position, start_position + ids.shape[1], device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]


def collect_eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids
