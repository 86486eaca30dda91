"""The ``vllm`` backend: GemFilter on a truncated HF model in front of vLLM's V1 ``AsyncLLM``.

A request's path: tokenise here (same chat template as the ``hf`` backend) -> a prompt
selector (GemFilter) picks the kept token ids on the :mod:`filter model
<server.engine.filter_model>` (layers ``0..r`` only; each pass runs whole, the pending passes taking
turns between layers, :mod:`server.engine.filter_passes`) -> vLLM generates from the kept ids
as a ``TokensPrompt`` with fresh contiguous positions, streamed as ``DELTA`` outputs -> a client
disconnect (iterator closed, or ``request.cancelled``) calls ``AsyncLLM.abort(request_id)``.

Methods that prune the KV cache (SnapKV, H2O, StreamingLLM...) would have to reach into
vLLM's paged cache, which this backend does not do: they are refused with a 400 naming the
methods it supports.

Its settings and its construction from the server's settings live in
:mod:`server.engine.vllm_setup`. vLLM spawns its engine in separate processes, so programs that
build this engine need an ``if __name__ == "__main__":`` guard (the ``gemserve`` console script
has one).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from compressors import CompressionError, Method, Selection, build_method
from compressors.attention import DEFAULT_ATTENTION, build_attention
from compressors.base import Target, dtype_name, keep_everything
from compressors.gemfilter import GemFilter
from compressors.registry import METHODS
from contract.protocol import MetricsInfo
from server.engine.admission import Admission, AdmittedCounts, Ticket
from server.engine.base import EngineEvent
from server.engine.checks import check_method_fits, check_prompt_and_sampling, compression_report
from server.engine.filter_model import FilterModel, available_cores, filter_device, filter_thread_count
from server.engine.filter_passes import FilterPasses
from server.engine.hf import DEFAULT_BUDGET
from server.engine.tokenize import PromptEncoder
from server.engine.types import (
    CompressionSpec,
    GenerationRequest,
    GenerationResult,
    RequestError,
    RequestOptions,
    TokenDelta,
)
from server.engine.vllm_measure import (
    KV_BYTES_FORMULA,
    ProcessTreeMemoryMeter,
    kv_bytes_per_token,
)
from server.measure import elapsed_ms

if TYPE_CHECKING:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from server.engine.vllm_settings import VLLMSettings

logger = logging.getLogger(__name__)

# Methods that act before any KV cache exists: the only ones a backend that owns no cache can run.
SUPPORTED_KINDS = ("none", "prompt")
# Prompt length / kept tokens below which GemFilter's filter pass (HF, in this process) plus vLLM's
# prefill of the kept ids costs more than vLLM's prefill of the whole prompt: the crossover of the
# bench/results/vllm_prefill*.json runs (k=1024: 1.37x at 2K, 0.73x at 4K, i.e. ~3K).
VLLM_PAYOFF_RATIO = 3.0


def supported_methods() -> list[str]:
    return [name for name, cls in METHODS.items() if cls.kind in SUPPORTED_KINDS]


class VLLMEngine(AdmittedCounts):
    """The ``vllm`` :class:`~server.engine.base.AsyncEngine`."""

    backend = "vllm"

    def __init__(
        self,
        name: str,
        model_dir: Path,
        tokenizer: PreTrainedTokenizerBase,
        filter_model: FilterModel,
        max_model_len: int,
        options: VLLMSettings,
        default_method: str = "none",
        default_budget: int = DEFAULT_BUDGET,
        max_queue: int = 64,
        retry_after_s: int = 1,
        engine_args: AsyncEngineArgs | None = None,
    ) -> None:
        """``engine_args``: vLLM's, passthrough included (server/engine/vllm_setup.py builds them); None
        only for an engine that never starts vLLM (tests of the filter passes and admission)."""
        self.name = name
        self.model_dir = model_dir
        self.tokenizer = tokenizer
        self.filter_model = filter_model
        self.engine_args = engine_args
        self._max_model_len = max_model_len
        self.encoder = PromptEncoder(tokenizer, max_model_len)
        self.default_method = default_method
        self.default_budget = default_budget
        self.options = options
        max_num_seqs = options.max_num_seqs if engine_args is None else int(engine_args.max_num_seqs)
        self.admission = Admission(max_num_seqs, "max_num_seqs", max_queue, retry_after_s)
        self.llm: AsyncLLM | None = None
        self.kv_bytes_per_token = 0
        self._filter_passes = FilterPasses(filter_model.model, self.filter_threads)
        self.resolve_method(default_method)

    # ---- what the routes read --------------------------------------------------------------
    @property
    def model_name(self) -> str:
        return self.name

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def dtype(self) -> str:
        """vLLM's dtype once it runs; before, what the engine arguments ask for."""
        if self.llm is not None:
            return dtype_name(self.llm.model_config.dtype)
        return "auto" if self.engine_args is None else str(self.engine_args.dtype)

    @property
    def filter_dtype(self) -> str:
        return dtype_name(self.filter_model.dtype)

    # Tokenisation follows the same rules as HFEngine, so both backends see the same ids.
    def request_options(self) -> RequestOptions:
        return RequestOptions(
            vocab_size=len(self.tokenizer),
            max_model_len=self.max_model_len,
            methods=tuple(supported_methods()),
            default_method=self.default_method,
            attentions=(DEFAULT_ATTENTION,),  # vLLM prefills with its own kernels
            default_attention=DEFAULT_ATTENTION,
            filter_layers=self.filter_model.max_layer + 1,
            positions=("compact",),  # a TokensPrompt takes no position ids
        )

    def encode_prompt(self, text: str | list[int]) -> list[int]:
        return self.encoder.encode_prompt(text)

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encoder.encode_chat(messages)

    # ---- validation ------------------------------------------------------------------------
    def resolve_method(self, name: str | None, knobs: dict[str, Any] | None = None) -> Method:
        """Build the method; refuse KV methods; give GemFilter the full model's filter layer."""
        name = self.default_method if name is None else name
        try:
            method = build_method(name, knobs)
        except CompressionError as exc:
            raise RequestError(str(exc), param=exc.param) from exc
        if method.kind not in SUPPORTED_KINDS:
            raise RequestError(
                f"method '{name}' prunes the KV cache, which the vllm backend cannot reach (vLLM owns a paged "
                f"cache); this backend supports: {', '.join(supported_methods())}",
                param="compression.method",
            )
        if isinstance(method, GemFilter):
            if method.positions != "compact":
                raise RequestError(
                    "positions='original' needs the hf backend: vLLM numbers a prompt's tokens 0..k-1 and "
                    "takes no position ids (this backend runs GemFilter with positions='compact')",
                    param="compression.positions",
                )
            # The truncated filter model would compute a wrong default layer from its own config.
            layer = self.filter_model.default_layer if method.layer is None else method.layer
            if layer > self.filter_model.max_layer:
                raise RequestError(self.layer_out_of_range(layer), param="compression.layer")
            # The truncated model's config would give a wrong cost model too: use vLLM's measured one.
            payoff = VLLM_PAYOFF_RATIO if method.payoff_ratio is None else method.payoff_ratio
            method = dataclasses.replace(method, layer=layer, payoff_ratio=payoff)
        return method

    def layer_out_of_range(self, layer: int) -> str:
        """Why ``layer`` cannot run here, and the restart that would serve it (when one can)."""
        held = f"the vllm backend's filter model holds layers 0..{self.filter_model.max_layer}"
        last = self.filter_model.full_num_layers - 1
        if layer > last:
            return f"layer {layer} is out of range: this model has layers 0..{last} ({held})"
        return f"layer {layer} is out of range: {held} (start it with GEMSERVE_VLLM_FILTER_LAYER={layer})"

    def check_attention(self, spec: CompressionSpec) -> None:
        """vLLM computes the prefill with its own attention; only ``dense`` can be honoured."""
        try:
            name = DEFAULT_ATTENTION if spec.attention is None else spec.attention
            backend = build_attention(name, spec.attention_knobs)
        except CompressionError as exc:
            raise RequestError(str(exc), param=exc.param) from exc
        if backend.name != DEFAULT_ATTENTION:
            raise RequestError(
                f"attention backend '{backend.name}' needs the hf backend: vLLM prefills with its own attention "
                "kernels (GemFilter's filter pass runs here and takes compression.filter_attention)",
                param="compression.attention",
            )

    def check_request(self, request: GenerationRequest) -> Method:
        check_prompt_and_sampling(request, len(self.tokenizer))
        method = self.resolve_method(request.compression.method, request.compression.knobs)
        self.check_attention(request.compression)
        check_method_fits(request, method, self.filter_model.model, self.max_model_len, self.default_budget)
        request.method = method
        return method

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.engine_args is None:
            raise RuntimeError("this VLLMEngine was built without vLLM engine arguments: it cannot start vLLM")
        start = time.perf_counter()
        # In a thread so the event loop (health checks) keeps answering during the long start;
        # AsyncLLM starts its output tasks lazily on the first request, in the serving loop.
        self.llm = await asyncio.to_thread(AsyncLLM.from_engine_args, self.engine_args)
        self.kv_bytes_per_token = kv_bytes_per_token(self.llm)
        # After vLLM has sized its KV cache (gpu_memory_utilization of the GPU): the filter model
        # lives in the rest, so leave it room (docs/vllm.md, "Tensor parallelism"). It keeps the
        # dtype it was loaded in (--filter-dtype).
        self.filter_model.place(self.filter_model.dtype, filter_device(self.options.filter_device))
        parallel = self.llm.vllm_config.parallel_config
        logger.info(
            "vLLM engine started in %.1f s (%s, %d KV bytes per token, tensor parallel %d, pipeline parallel %d)",
            time.perf_counter() - start,
            self.llm.model_config.dtype,
            self.kv_bytes_per_token,
            parallel.tensor_parallel_size,
            parallel.pipeline_parallel_size,
        )
        self.admission.accepting = True

    async def shutdown(self) -> None:
        await self.admission.drain(timeout_s=60.0)
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        await asyncio.to_thread(self._filter_passes.close)  # finishes any pass still pending

    async def abort(self, vllm_request_id: str) -> None:
        if self.llm is not None:
            await self.llm.abort(vllm_request_id)
        logger.info("aborted vLLM request %s", vllm_request_id)

    # ---- the request path ------------------------------------------------------------------
    def stream(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Admit now (errors raise here, before any response byte), generate in the iterator."""
        ticket = self.admission.admit(lambda: self.check_request(request))
        assert request.method is not None and self.llm is not None  # set by check_request; accepting after start
        return self._generate(request, request.method, ticket)

    async def _generate(self, request: GenerationRequest, method: Method, ticket: Ticket) -> AsyncIterator[EngineEvent]:
        metrics = MetricsInfo()
        try:
            with ProcessTreeMemoryMeter() as meter:
                selection = await self._select(request, method, metrics)
                ticket.start_running()
                result = None
                async for event in self._decode(request, method, selection, metrics):
                    if isinstance(event, GenerationResult):
                        result = event
                    else:
                        yield event
            if result is None:
                return
            metrics.peak_memory_bytes = meter.peak_bytes
            metrics.memory_baseline_bytes = meter.baseline_bytes
            metrics.memory_source = f"{meter.source}; kv_cache_bytes computed={KV_BYTES_FORMULA}"
            request.finish()  # count before the route can answer with it
            yield result
        finally:
            ticket.release()
            request.finish()

    async def _select(self, request: GenerationRequest, method: Method, metrics: MetricsInfo) -> Selection:
        """The method (a prompt selector, or ``none``) attached to the filter model, its pass taking
        turns with other requests' passes (server/engine/filter_passes.py); the wait before it starts
        is queue time. A request cancelled before its pass ends keeps everything (it never decodes).
        vLLM owns the cache, so none is attached."""

        def skipped() -> Selection:  # the client left before the pass ended
            metrics.queue_ms = metrics.queue_ms or elapsed_ms(request.arrival_time)  # left before it began
            return keep_everything(method.name, len(request.prompt_ids))

        def work() -> Selection:  # in the pass's own thread, once it has the cores
            metrics.queue_ms = elapsed_ms(request.arrival_time)
            ids = torch.tensor([request.prompt_ids], dtype=torch.long, device=self.filter_model.device)
            target = Target(self.filter_model.model, ids, None, self.default_budget, self.tokenizer)
            return method.attachment(target).selection

        tokens, layers = len(request.prompt_ids), self.filter_model.num_layers
        if method.selects_with_model(self.filter_model.model, tokens, self.default_budget):
            selection: Selection = await self._filter_passes.submit(work, tokens, layers, request.cancelled, skipped)
        else:
            selection = work()  # no forward (none, or a budget that keeps everything): no turn to wait for
        metrics.select_ms = selection.select_ms
        return selection

    def filter_threads(self) -> int:
        return filter_thread_count(self.options.filter_threads, self.admission.running, available_cores())

    async def _decode(
        self, request: GenerationRequest, method: Method, selection: Selection, metrics: MetricsInfo
    ) -> AsyncIterator[EngineEvent]:
        """Hand the kept ids to vLLM and relay its deltas; abort it if we stop early."""
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        assert self.llm is not None  # checked at admission
        kept_ids = [request.prompt_ids[i] for i in selection.kept_indices]
        sampling = request.sampling
        params = VLLMSamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop=list(sampling.stop) or None,
            ignore_eos=sampling.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        vllm_id = f"{request.request_id or 'req'}-{uuid.uuid4().hex[:8]}"
        token_ids: list[int] = []
        text_parts: list[str] = []
        finish_reason = "length"
        submitted = time.perf_counter()
        first_token_at: float | None = None
        outputs = self.llm.generate(TokensPrompt(prompt_token_ids=kept_ids), params, vllm_id)
        finished = False
        try:
            if request.cancelled.is_set():
                finish_reason = "cancelled"
            else:
                async for output in outputs:
                    completion = output.outputs[0]
                    new_ids = list(completion.token_ids)
                    if new_ids and first_token_at is None:
                        first_token_at = time.perf_counter()
                        metrics.prefill_ms = elapsed_ms(submitted, first_token_at)
                        metrics.ttft_ms = elapsed_ms(request.arrival_time, first_token_at)
                    token_ids.extend(new_ids)
                    request.generated_tokens += len(new_ids)
                    text_parts.append(completion.text)
                    for i, token in enumerate(new_ids):
                        yield TokenDelta(token_id=token, text=completion.text if i == len(new_ids) - 1 else "")
                    if output.finished:
                        finish_reason = map_finish_reason(completion.finish_reason)
                        break
                    if request.cancelled.is_set():
                        finish_reason = "cancelled"
                        break
            finished = finish_reason != "cancelled"
        finally:
            if not finished:  # closed early (client gone) or cancelled: free vLLM's slot now
                await self.abort(vllm_id)
            await outputs.aclose()
        end = time.perf_counter()
        metrics.e2e_ms = elapsed_ms(request.arrival_time, end)
        if first_token_at is not None:
            metrics.decode_ms = elapsed_ms(first_token_at, end)
            if len(token_ids) > 1 and metrics.decode_ms > 0:
                metrics.output_tokens_per_s = (len(token_ids) - 1) / (metrics.decode_ms / 1000.0)
        metrics.kv_cache_bytes = self.kv_bytes_per_token * (len(kept_ids) + len(token_ids))
        yield GenerationResult(
            text="".join(text_parts),
            token_ids=token_ids,
            finish_reason=finish_reason,
            prompt_tokens=len(request.prompt_ids),
            compression=compression_report(method, selection, self.tokenizer, request.prompt_ids, request.compression),
            metrics=metrics,
        )


def map_finish_reason(reason: str | None) -> str:
    """vLLM's ``stop``/``length``/``abort`` -> the engine's ``stop``/``length``/``cancelled``."""
    if reason == "abort":
        return "cancelled"
    return reason if reason in ("stop", "length") else "stop"
