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
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from compressors import CompressionError, Method, build_method
from compressors.attention import DEFAULT_ATTENTION, AttentionBackend, build_attention
from compressors.base import Attachment, cache_bytes
from compressors.probe import use_attention
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.plan import check_method_fits, check_prompt_and_sampling, compression_report
from server.engine.sampling import choose_token, make_generator
from server.engine.tokenize import PromptEncoder
from server.engine.types import CompressionSpec, GenerationRequest, GenerationResult, RequestError, TokenDelta
from server.measure import PeakMemoryMeter, elapsed_ms, sync
from server.models import LoadedModel
from server.protocol import AttentionInfo, CompressionInfo, MetricsInfo

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
        """Raise :class:`RequestError` for anything that would fail later. Builds the request's
        method and attention backend once and carries them on the request."""
        check_prompt_and_sampling(request, len(self.tokenizer))
        method = self.resolve_method(request.compression)
        attention = self.resolve_attention(request.compression)
        check_method_fits(request, method, self.max_model_len, self.default_budget)
        request.method, request.attention = method, attention
        return method

    # ---- the request path -----------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        for event in self.stream(request):
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("engine stream ended without a result")

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a :class:`TokenDelta` per generated token, then one :class:`GenerationResult`."""
        if request.method is None or request.attention is None:  # not admitted by the async engine
            self.check_request(request)
        method, attention = request.method, request.attention
        assert method is not None and attention is not None  # set by check_request
        # Both hold this run's state (kept positions, counted pairs): a request object run again
        # is checked again and gets fresh ones.
        request.method = request.attention = None
        metrics = MetricsInfo(queue_ms=request.queue_ms)
        meter = PeakMemoryMeter(self.device)
        with meter, torch.inference_mode():
            result = yield from self._run(request, method, attention, metrics, meter)
        metrics.peak_memory_bytes = meter.peak_bytes
        metrics.memory_baseline_bytes = meter.baseline_bytes
        metrics.memory_source = meter.source
        yield result

    def _run(
        self,
        request: GenerationRequest,
        method: Method,
        attention: AttentionBackend,
        metrics: MetricsInfo,
        meter: PeakMemoryMeter,
    ) -> Generator[TokenDelta, None, GenerationResult]:
        prompt = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        cache = DynamicCache(config=self.model.config)
        with method.attach(self.model, prompt, cache, self.default_budget, self.tokenizer) as hooks:
            sync(self.device)
            start = time.perf_counter()
            logits = self.prefill(hooks, cache, attention)
            sync(self.device)
            meter.sample_now()
            metrics.prefill_ms = elapsed_ms(start)
            metrics.select_ms = hooks.selection.select_ms
            report = self.report(request, method, hooks, cache, attention)
            return (yield from self.decode_from(request, hooks, cache, logits, report, metrics))

    def report(
        self,
        request: GenerationRequest,
        method: Method,
        hooks: Attachment,
        cache: DynamicCache,
        attention: AttentionBackend,
    ) -> CompressionInfo:
        """The response's ``compression`` once the cache is final (pruned, for KV methods)."""
        report = compression_report(
            method, hooks.selection, self.tokenizer, request.prompt_ids, request.compression.return_selection
        )
        if hooks.kv_bytes_before is not None:
            report.kv_bytes_before, report.kv_bytes_after = hooks.kv_bytes_before, cache_bytes(cache)
        report.attention = AttentionInfo.model_validate(attention.report())
        return report

    def decode_from(
        self,
        request: GenerationRequest,
        hooks: Attachment,
        cache: DynamicCache,
        logits: torch.Tensor,
        report: CompressionInfo,
        metrics: MetricsInfo,
    ) -> Generator[TokenDelta, None, GenerationResult]:
        """From the prefill's last logits to the result: sample, yield, decode one token at a time
        at positions from ``hooks.next_position`` (a pruned cache is shorter than the sequence)."""
        metrics.kv_cache_bytes = cache_bytes(cache)
        sampling = request.sampling
        generator = make_generator(sampling, self.device)
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        finish_reason = "length"
        position = hooks.next_position
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
            logits = self.decode_one_token(token, cache, position, hooks)
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

    def prefill(
        self, hooks: Attachment, cache: DynamicCache, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Fill the cache with ``hooks.prefill_ids`` at positions ``0..len-1``, the method's prefill
        hooks around it and ``attention`` computing the attention (None: dense); last-token logits."""
        with hooks.prefill(), use_attention(attention):
            return self.forward(hooks.prefill_ids, cache, start_position=0)

    def decode_one_token(self, token: int, cache: DynamicCache, position: int, hooks: Attachment) -> torch.Tensor:
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        with hooks.decode_step():
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
