"""The transformers backend: compression plan -> prefill -> decode, one token at a time.

Shaped after gpt-fast: ``prefill`` and ``decode_one_token`` are small and separate, and
compression sits at the prefill boundary. Every method, ``none`` included, runs this same
path on the same model (last-token logits only in prefill), so timings compare methods and
nothing else. The scheduler (server/engine/scheduler.py) batches the decode forwards of many
requests and interleaves their prefills; a request served alone takes the same path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

from compressors import CompressionError, Method, build_method
from compressors.attention import ATTENTION_BACKENDS, DEFAULT_ATTENTION, AttentionBackend, build_attention
from compressors.base import Attachment, ChunkPolicy, Target, cache_bytes, model_dtype
from compressors.probe import decoder_layers, use_attention
from compressors.registry import METHODS
from server.engine.batch_forward import Segment
from server.engine.detokenize import IncrementalDetokenizer
from server.engine.filter_model import load_filter_model
from server.engine.plan import check_method_fits, check_prompt_and_sampling, compression_report
from server.engine.scheduler import Scheduler
from server.engine.sequence import Emit, Sequence
from server.engine.tokenize import PromptEncoder
from server.engine.types import (
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    RequestOptions,
    TokenDelta,
)
from server.measure import SharedPeakMeter, elapsed_ms, sync
from server.models import LoadedModel
from server.protocol import AttentionInfo, CompressionInfo, MetricsInfo

logger = logging.getLogger(__name__)

DEFAULT_BUDGET = 1024


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
        check_method_fits(request, method, self.max_model_len, self.default_budget)
        request.method, request.attention = method, attention
        request.cache_tokens = method.cache_tokens(
            len(request.prompt_ids), request.sampling.max_tokens, self.default_budget
        )
        return method

    # ---- the request path -----------------------------------------------------------------
    def generate(self, request: GenerationRequest) -> GenerationResult:
        for event in self.stream(request):
            if isinstance(event, GenerationResult):
                return event
        raise RuntimeError("engine stream ended without a result")

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        """Yield a :class:`TokenDelta` per generated token, then one :class:`GenerationResult`: the
        request alone in a batch of its own (the same scheduler and forwards the server batches with)."""
        if request.method is None or request.attention is None:  # not admitted by the async engine
            self.check_request(request)
        events: list[TokenDelta | GenerationResult | BaseException | None] = []
        scheduler = Scheduler(self, max_running=1)
        scheduler.add(request, events.append)
        while scheduler.has_work():
            scheduler.step()
            for event in events:
                if isinstance(event, BaseException):
                    raise event
                if event is not None:
                    yield event
            events.clear()

    def new_sequence(self, request: GenerationRequest, emit: Emit, meter: SharedPeakMeter) -> Sequence:
        """The admitted request as the scheduler's :class:`Sequence`. Its method and attention
        backend hold this run's state (kept positions, counted pairs): they move to the sequence,
        so a request object run again is checked again and gets fresh ones."""
        method, attention = request.method, request.attention
        assert method is not None and attention is not None  # set by check_request
        request.method = request.attention = None
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        return Sequence(request, method, attention, emit, self.eos_token_ids, detok, meter)

    def decode_from(
        self,
        request: GenerationRequest,
        method: Method,
        hooks: Attachment,
        cache: DynamicCache,
        logits: torch.Tensor,
        report: CompressionInfo,
        metrics: MetricsInfo,
    ) -> GenerationResult:
        """Decode, alone, a request whose prefill the caller ran (``gemserve eval`` shares one
        prefill between methods): from the prefill's last ``logits`` to the result."""
        assert request.attention is not None  # built by check_request
        events: list[TokenDelta | GenerationResult | BaseException | None] = []
        detok = IncrementalDetokenizer(self.tokenizer, request.sampling.stop)
        sequence = Sequence(
            request, method, request.attention, events.append, self.eos_token_ids, detok, SharedPeakMeter(self.device)
        )
        sequence.metrics, sequence.cache, sequence.hooks, sequence.report = metrics, cache, hooks, report
        with torch.inference_mode():
            sequence.begin_decoding(logits)
            while not sequence.finished:
                sequence.advance(self.decode_one_token(sequence.token, cache, sequence.position, hooks))
        result = events[-1]
        assert isinstance(result, GenerationResult)
        return result

    def prefill_steps(
        self, sequence: Sequence, chunk_tokens: ChunkPolicy
    ) -> Generator[Segment | None, torch.Tensor | None, torch.Tensor]:
        """Attach the method, prefill (in chunks where the method and the attention backend allow:
        ``chunk_tokens`` sizes each; one forward otherwise), yielding between units of work (None:
        the step did its work; a :class:`Segment`: a prefill chunk for the scheduler to run, whose
        logits it sends back); return the last prompt position's logits. ``prefill_ms`` and
        ``select_ms`` are wall times, the batch's decode steps between the chunks included."""
        request, method, cache = sequence.request, sequence.method, sequence.cache
        assert cache is not None  # given by the scheduler
        prompt = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.device)
        target = Target(
            self.model, prompt, cache, self.default_budget, self.tokenizer, chunk_tokens, filter_model=self.filter_model
        )
        hooks = yield from method.attach_steps(target)
        sequence.hooks = hooks
        sync(self.device)
        start = time.perf_counter()
        logits = yield from self.prefill_chunks(hooks, cache, sequence.attention, chunk_tokens)
        sync(self.device)
        sequence.metrics.prefill_ms = elapsed_ms(start)
        sequence.metrics.select_ms = hooks.selection.select_ms
        sequence.report = self.report(request, method, hooks, cache, sequence.attention)
        return logits

    def prefill_chunks(
        self, hooks: Attachment, cache: DynamicCache, attention: AttentionBackend, chunk_tokens: ChunkPolicy | None
    ) -> Generator[Segment | None, torch.Tensor | None, torch.Tensor]:
        """:meth:`prefill`, where the method and the backend allow it a chunk at a time: each chunk
        is yielded as a :class:`Segment` for the caller to run (alone, :meth:`run_chunk`, or in the
        batch's decode forward) and send its last logits back."""
        if chunk_tokens is None or not (hooks.chunkable_prefill and attention.prefills_in_chunks):
            return self.prefill(hooks, cache, attention)
        ids = hooks.prefill_ids[0].tolist()
        start = 0
        while True:
            end = start + chunk_tokens(start, len(ids) - start)
            logits = yield Segment(ids[start:end], start, cache, attention)
            if end >= len(ids):
                assert logits is not None  # sent by whoever ran the chunk
                return logits
            start = end

    def run_chunk(self, hooks: Attachment, chunk: Segment) -> torch.Tensor:
        """A prefill chunk in a forward of its own (nobody else to share it with)."""
        ids = torch.tensor([chunk.token_ids], dtype=torch.long, device=self.device)
        with hooks.prefill(), use_attention(chunk.attention):
            return self.forward(ids, chunk.cache, start_position=chunk.start)

    def report(
        self,
        request: GenerationRequest,
        method: Method,
        hooks: Attachment,
        cache: DynamicCache,
        attention: AttentionBackend,
    ) -> CompressionInfo:
        """The response's ``compression`` once the cache is final (pruned, for KV methods)."""
        report = compression_report(method, hooks.selection, self.tokenizer, request.prompt_ids, request.compression)
        if hooks.kv_bytes_before is not None:
            report.kv_bytes_before, report.kv_bytes_after = hooks.kv_bytes_before, cache_bytes(cache)
        report.attention = AttentionInfo.model_validate(attention.report())
        return report

    def prefill(
        self, hooks: Attachment, cache: DynamicCache, attention: AttentionBackend | None = None
    ) -> torch.Tensor:
        """Fill the cache with ``hooks.prefill_ids`` at positions ``0..len-1``, the method's prefill
        hooks around it and ``attention`` computing the attention (None: dense); last-token logits."""
        with hooks.prefill(), use_attention(attention):
            return self.forward(hooks.prefill_ids, cache, start_position=0)

    def decode_one_token(self, token: int, cache: DynamicCache, position: int, hooks: Attachment) -> torch.Tensor:
        """A decode forward of one request alone, its method's decode hooks around it."""
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)
        with hooks.decode_step():
            return self.forward(ids, cache, start_position=position)

    def forward(self, ids: torch.Tensor, cache: DynamicCache, start_position: int) -> torch.Tensor:
        """One forward; positions are explicit because a pruned cache is shorter than the
        sequence it stands for. Only the last position's logits are computed."""
        positions = torch.arange(start_position, start_position + ids.shape[1], device=self.device).unsqueeze(0)
        out = self.model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]


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
