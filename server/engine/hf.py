"""The transformers backend: checks at admission, then a scheduler, a model runner and the loop
between them.

Shaped after vLLM V1's seam: :mod:`server.engine.scheduler` plans each step under one token
budget and never calls the model, :mod:`server.engine.runner` owns the model, the caches and the
method attachments and executes a plan, :mod:`server.engine.core` steps one through the other.
Every method, ``none`` included, runs the same path on the same model (last-token logits only in
prefill), so timings compare methods and nothing else; a request served alone
(:meth:`HFEngine.events`, synchronous; the async API's ``stream()`` is in hf_async.py) is a batch
of one on the same runner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from compressors import CompressionError, Method, build_method
from compressors.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION, AttentionBackend, build_attention
from compressors.base import Attachment, cache_bytes, model_dtype
from compressors.gemfilter import positions_for
from compressors.probe import decoder_layers, use_attention
from compressors.registry import METHODS
from contract.protocol import CompressionInfo, MetricsInfo
from server.engine.checks import check_method_fits, check_prompt_and_sampling
from server.engine.core import EngineCore
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.filter_model import load_filter_model
from server.engine.runner import ModelRunner, forward_ids, prefill_report
from server.engine.sampling import choose_token, make_generator
from server.engine.scheduler import DEFAULT_MAX_RUNNING, DEFAULT_STEP_TOKENS, Scheduler
from server.engine.sequence import Sequence
from server.engine.tokenize import PromptEncoder
from server.engine.types import (
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    RequestOptions,
    SamplingParams,
    TokenDelta,
)
from server.measure import SharedPeakMeter
from server.models import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 1024
WARM_UP_TOKENS = 256  # the warm-up prompt: long enough for a filter pass, short enough to cost ~1 s


def check_per_head_cache(model: PreTrainedModel) -> None:
    """The hf engine's batched forward and the KV methods work on caches of per-head keys and values.
    Multi-head latent attention (DeepSeek-V2/V3 and their kin: a ``kv_lora_rank``) caches a
    compressed latent and expands it into keys and values after the cache: refused at start-up,
    naming what is missing, rather than failing at the first decode step."""
    config = model.config.get_text_config()
    if getattr(config, "kv_lora_rank", None):
        raise ValueError(
            f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank={config.kv_lora_rank}): its cache "
            "holds a compressed latent, not per-head keys and values, which the hf backend's batched decode and KV "
            "methods need; this architecture is not supported on the hf backend"
        )


class HFEngine:
    """A loaded transformers model and the steps of a request on it: checks at admission, the
    prefill (in steps), the decode forwards; :class:`~server.engine.scheduler.Scheduler` runs them
    for a batch of requests, :meth:`stream` for one."""

    backend = "hf"

    def __init__(
        self,
        loaded: LoadedModel,
        default_method: str = "none",
        default_budget: int = DEFAULT_BUDGET,
        default_attention: str = DEFAULT_ATTENTION,
    ) -> None:
        check_per_head_cache(loaded.model)
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
        self.filter_model = separate_filter_model(loaded)
        self.runner = ModelRunner(self.model, self.tokenizer, default_budget, self.filter_model)

    @property
    def model_name(self) -> str:
        return self.loaded.name

    @property
    def dtype(self) -> str:
        return self.loaded.dtype_name

    @property
    def filter_dtype(self) -> str:
        return model_dtype(self.filter_model) if self.filter_model is not None else self.dtype

    @property
    def max_model_len(self) -> int:
        return self.loaded.max_model_len

    # ---- tokenisation -------------------------------------------------------------------
    def encode_prompt(self, text: str | list[int]) -> list[int]:
        return self.encoder.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encoder.encode_chat(messages)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    # ---- validation, before a request is queued ------------------------------------------
    def request_options(self) -> RequestOptions:
        return RequestOptions(
            vocab_size=len(self.tokenizer),
            max_model_len=self.max_model_len,
            methods=tuple(METHODS),
            default_method=self.default_method,
            attentions=tuple(ATTENTION_BACKENDS),
            default_attention=self.default_attention,
            filter_layers=len(decoder_layers(self.model)),
            positions=positions_for(self.model),
        )

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
        check_method_fits(request, method, self.model, self.max_model_len, self.default_budget)
        request.method, request.attention = method, attention
        request.cache_tokens = self.runner.work_of(request).peak_tokens
        return method

    # ---- the request path -----------------------------------------------------------------
    def warm_up(self) -> float:
        """Run ``none`` and GemFilter (filter pass, kept prefill, decode) once on a short prompt;
        milliseconds taken. The first forward down each path pays one-time costs that would
        otherwise land on the first user's TTFT: on the CPU the first 1.5K-token request took 1.13x
        the later ones' TTFT for ``none`` and 1.32x for GemFilter, 1.02x and 1.00x after this
        (bench/first_request.py); on a GPU the CUDA context and kernel loading."""
        started = time.perf_counter()
        fits = min(WARM_UP_TOKENS, self.max_model_len - 2)  # the prompt and its 2 output tokens fit
        if fits < 8:
            logger.info("warm-up skipped: a %d-token context leaves no room for its prompt", self.max_model_len)
            return 0.0
        sentence = self.encode_prompt("GemServe warms up before it takes requests.")  # short: any size check passes
        ids = (sentence * (fits // len(sentence) + 1))[:fits]
        for method, knobs in (("none", {}), ("gemfilter", {"budget": max(1, len(ids) // 4), "payoff_ratio": 0.0})):
            sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            self.generate(GenerationRequest(ids, sampling, CompressionSpec(method, knobs)))
        return (time.perf_counter() - started) * 1000.0

    def generate(self, request: GenerationRequest) -> GenerationResult:
        for event in self.events(request):
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("engine stream ended without a result")

    def events(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a :class:`TokenDelta` per generated token, then one :class:`GenerationResult`: the
        request alone in a batch of its own (the same scheduler, runner and forwards the server
        batches with)."""
        if request.method is None or request.attention is None:  # not admitted by the async engine
            self.check_request(request)
        events: list[TokenDelta | GenerationResult | BaseException | None] = []
        core = self.new_core(max_running=1)
        core.add(request, events.append)
        while core.has_work():
            core.step()
            for event in events:
                if isinstance(event, BaseException):
                    raise event
                if event is not None:
                    yield event
            events.clear()

    def new_core(
        self,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_batch_tokens: int | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        idle_budget: int | None = None,
        id_prefix: str = "",
    ) -> EngineCore:
        """A batch on this engine's runner: its scheduler with these limits, and the step loop
        (``id_prefix``: its request ids', unique among the cores sharing the runner)."""
        scheduler = Scheduler(max_running, max_batch_tokens, step_tokens, idle_budget, self.runner.break_even)
        return EngineCore(self.runner, scheduler, self.tokenizer, self.eos_token_ids, id_prefix)

    def decode_from(
        self,
        request: GenerationRequest,
        hooks: Attachment,
        cache: DynamicCache,
        logits: torch.Tensor,
        report: CompressionInfo,
        metrics: MetricsInfo,
    ) -> GenerationResult:
        """Decode, alone, a request whose prefill the caller ran (``gemserve eval`` shares one
        prefill between methods): from the prefill's last ``logits`` to the result."""
        events: list[TokenDelta | GenerationResult | BaseException | None] = []
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        sequence = Sequence(request, events.append, self.eos_token_ids, detok, SharedPeakMeter(self.device))
        sequence.metrics = metrics
        sequence.prefilled(report, metrics.prefill_ms, metrics.select_ms, cache_bytes(cache))
        generator = make_generator(request.sampling, self.device)
        position = hooks.next_position
        with torch.inference_mode():
            while True:
                token = choose_token(logits, request.sampling, generator)
                sequence.take(token)
                if sequence.finished:
                    break
                logits = self.decode_one_token(token, cache, position, hooks)
                position += 1
        result = events[-1]
        assert isinstance(result, GenerationResult)
        return result

    def report(
        self,
        request: GenerationRequest,
        method: Method,
        hooks: Attachment,
        cache: DynamicCache,
        attention: AttentionBackend,
    ) -> CompressionInfo:
        """The response's ``compression`` for a prefill the caller ran (``gemserve eval``)."""
        return prefill_report(self.tokenizer, request, method, hooks, cache, attention)

    def prefill(
        self, hooks: Attachment, cache: DynamicCache, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Fill the cache with ``hooks.prefill_ids`` at positions ``0..len-1`` (or the attachment's
        own), the method's prefill hooks around it and ``attention`` computing the attention (None:
        dense); last-token logits."""
        with hooks.prefill(), use_attention(attention):
            return self.forward(hooks.prefill_ids, cache, 0, hooks.prefill_position_ids)

    def decode_one_token(self, token: int, cache: DynamicCache, position: int, hooks: Attachment) -> torch.Tensor:
        """A decode forward of one request alone, its method's decode hooks around it."""
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        with hooks.decode_step():
            return self.forward(ids, cache, start_position=position)

    def forward(
        self, ids: torch.Tensor, cache: DynamicCache, start_position: int, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        return forward_ids(self.model, ids, cache, start_position, position_ids)


def separate_filter_model(loaded: LoadedModel) -> PreTrainedModel | None:
    """GemFilter's filter pass in a dtype other than the model's (``--filter-dtype``) runs on a copy of
    layers ``0..r`` (r: the calibrated filter layer) in that dtype; None when the dtypes agree. A
    request asking for a deeper layer runs its pass on the model itself."""
    wanted = loaded.filter_dtype
    if wanted is None or wanted.name == loaded.dtype_name:
        return None
    copy = load_filter_model(loaded.path, dtype=wanted.torch_dtype, known_profile=loaded.profile, look_up_profile=False)
    copy.place(wanted.torch_dtype, str(loaded.device))
    logger.info(
        "GemFilter's filter pass in %s on layers 0..%d (%.1f MiB of weights), the model in %s",
        wanted.name,
        copy.max_layer,
        copy.parameter_bytes() / 2**20,
        loaded.dtype_name,
    )
    return copy.model


def collect_eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config.eos_token_id, loaded.tokenizer.eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, list | tuple):
            ids.update(int(i) for i in source)
    return ids
