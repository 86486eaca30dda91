"""The hf backend's model runner: it owns the model, each request's cache and method attachment,
and executes the scheduler's :class:`~server.engine.scheduler.StepPlan`.

One step:

1. requests the plan admitted get an empty cache and their method's :class:`Preparation`;
2. one forward for every decode token and prefill chunk that can share it (a ragged batch,
   :mod:`server.engine.batch_forward`); a request alone in the step, or whose prefill cannot be
   chunked (a KV method's observer needs every query at once), runs its own forward; a method
   that reads its own decode forward (H2O) decodes alone;
3. the GemFilter filter-pass chunks (layers ``0..r`` only), each as long as the plan says; a
   pass that ends picks the kept tokens, whose prefill the next step plans;
4. a token is sampled for every decode, and for every prefill that ended before anything was
   generated (the first token).

A preempted request loses its cache and attachment (:meth:`ModelRunner.free`) but keeps what it
generated and its sampling generator: when it runs again the filter pass and prefill are
recomputed (the same selection: they are deterministic), the generated tokens re-run after the
prompt (in the prefill's chunks, or one decode step each where the prefill cannot be chunked),
and it samples on from where it stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache

from compressors import Method
from compressors.attention import AttentionBackend
from compressors.base import Attachment, Preparation, Target, cache_bytes
from compressors.probe import decoder_layers, use_attention
from contract.protocol import AttentionInfo, CompressionInfo
from server.engine.batch_forward import GrowingLayer, Segment, forward_segments, make_room, new_request_cache
from server.engine.checks import compression_report
from server.engine.sampling import choose_token, make_generator
from server.engine.scheduler import Chunk, StepPlan, Work
from server.engine.types import GenerationRequest
from server.measure import elapsed_ms, sync

logger = logging.getLogger(__name__)


def attention_break_even(model: PreTrainedModel) -> float:
    """The context length at which one query's attention costs as much as its linear layers:
    ``2 * params`` FLOPs per token against ``4 * layers * heads * head_dim`` per cached key."""
    config = model.config.get_text_config()
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    per_key = 4 * int(config.num_hidden_layers) * heads * head_dim
    params = sum(p.numel() for p in model.parameters())
    return max(1.0, 2.0 * params / per_key)


def forward_ids(
    model: PreTrainedModel,
    ids: torch.Tensor,
    cache: DynamicCache,
    start_position: int,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """One forward; positions are explicit because a pruned cache is shorter than the sequence it
    stands for: ``start_position..`` or ``position_ids`` ``(1, len)`` (a selection that kept its
    tokens' places). Only the last position's logits are computed."""
    positions = position_ids
    if positions is None:
        positions = torch.arange(start_position, start_position + ids.shape[1], device=ids.device).unsqueeze(0)
    out = model(input_ids=ids, past_key_values=cache, position_ids=positions, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


@dataclass
class Prefilled:
    """What the response reports of a prefill that ended (its first run's, after a preemption)."""

    report: CompressionInfo
    prefill_ms: float
    select_ms: float
    kv_cache_bytes: int


@dataclass
class StepResult:
    sampled: dict[str, int] = field(default_factory=dict)  # request -> the token this step chose
    prefilled: dict[str, Prefilled] = field(default_factory=dict)  # first prefills that ended
    failed: dict[str, BaseException] = field(default_factory=dict)
    # Filter passes that ended this step: the prompt tokens their selection kept (more than the
    # planned budget when a low-confidence selection fell back to a wider one).
    selected: dict[str, int] = field(default_factory=dict)


class RunState:
    """One request on the runner. ``tokens`` and the sampling generator survive a preemption; the
    cache, the attachment and the prefill's ids do not."""

    def __init__(self, request: GenerationRequest, device: torch.device) -> None:
        method, attention = request.method, request.attention
        assert method is not None and attention is not None  # built by the engine's check_request
        self.request = request
        self.method: Method = method
        self.attention: AttentionBackend = attention
        self.generator = make_generator(request.sampling, device)
        self.tokens: list[int] = []  # generated so far
        self.prefilled = False  # its first prefill ended (what the response reports is final)
        self.cache: DynamicCache | None = None
        self.preparation: Preparation | None = None
        self.hooks: Attachment | None = None
        self.prefill_ids: list[int] = []  # the attachment's ids, then the generated ones re-run
        self.prefill_places: list[int] | None = None  # their rotary positions, when not 0..len-1
        self.fed = 0  # generated tokens in the cache
        self.position = 0  # of the next token fed
        self.started = 0.0  # the prefill's first chunk

    def drop_cache(self) -> None:
        self.cache = self.preparation = self.hooks = None
        self.prefill_ids = []
        self.prefill_places = None
        self.fed = self.position = 0


class ModelRunner:
    """Executes plans on ``model`` (see the module doc)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        default_budget: int,
        filter_model: PreTrainedModel | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.default_budget = default_budget
        self.filter_model = filter_model
        self.device = model.device
        self.layers = len(decoder_layers(model))
        self.break_even = attention_break_even(model)
        self._states: dict[str, RunState] = {}

    # ---- requests --------------------------------------------------------------------------
    def add(self, request_id: str, request: GenerationRequest) -> Work:
        """Take an admitted request (its method and backend built); what the scheduler needs of it."""
        work = self.work_of(request, request_id)
        self._states[request_id] = RunState(request, self.device)
        return work

    def work_of(self, request: GenerationRequest, request_id: str = "") -> Work:
        """The request's sizes as the scheduler plans them (``request.method`` built)."""
        method, attention = request.method, request.attention
        assert method is not None and attention is not None
        n, budget = len(request.prompt_ids), self.default_budget
        sizes = method.cache_sizes(self.model, n, request.sampling.max_tokens, budget)
        filter_pass = method.filter_pass(self.model, n, budget)
        layers, tail = filter_pass if filter_pass is not None else (0, 1)
        return Work(
            request_id=request_id,
            prefill_tokens=sizes.prefill,
            cache_tokens=sizes.kept,
            max_cache_tokens=sizes.most,
            filter_tokens=n if filter_pass is not None else 0,
            filter_cost=layers / self.layers,
            filter_tail=tail,
            chunked=method.chunkable_prefill and attention.prefills_in_chunks,
        )

    def free(self, request_id: str) -> None:
        """Preempted: its cache and attachment go; what it generated stays."""
        state = self._states.get(request_id)
        if state is not None:
            state.drop_cache()

    def remove(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    # ---- one step ---------------------------------------------------------------------------
    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for request_id in plan.started:
            self._guard(result, [request_id], lambda r=request_id: self._start(self._states[r]))
        chunks = {c.request_id: c for c in plan.prefills if c.request_id not in result.failed}
        shared_decodes = [
            d.request_id
            for d in plan.decodes
            if d.request_id not in result.failed and self._hooks(d.request_id).batched_decode
        ]
        together = [c for c in chunks.values() if self.chunked(self._states[c.request_id])]
        alone = [c for c in chunks.values() if c not in together]
        if len(shared_decodes) + len(together) > 1:
            ids = shared_decodes + [c.request_id for c in together]
            self._guard(result, ids, lambda: self._forward_shared(shared_decodes, together, result))
        elif together:
            alone.append(together[0])
        elif shared_decodes:
            request_id = shared_decodes[0]
            self._guard(result, [request_id], lambda: self._decode_alone(request_id, result))
        for chunk in alone:
            self._guard(result, [chunk.request_id], lambda c=chunk: self._prefill_alone(c, result))
        for decode in plan.decodes:
            if decode.request_id not in shared_decodes and decode.request_id not in result.failed:
                self._guard(result, [decode.request_id], lambda r=decode.request_id: self._decode_alone(r, result))
        for chunk in plan.filters:
            if chunk.request_id not in result.failed:
                self._guard(result, [chunk.request_id], lambda c=chunk: self._filter(c))
            if chunk.last and chunk.request_id not in result.failed:
                result.selected[chunk.request_id] = int(self._hooks(chunk.request_id).prefill_ids.shape[-1])
        return result

    def _guard(self, result: StepResult, request_ids: list[str], work: object) -> None:
        """Run ``work``; if it raises, every request in it failed (the batch goes on)."""
        try:
            work()  # type: ignore[operator]
        except Exception as exc:
            logger.exception("step failed (requests %s)", request_ids)
            for request_id in request_ids:
                result.failed.setdefault(request_id, exc)
                result.sampled.pop(request_id, None)

    def _hooks(self, request_id: str) -> Attachment:
        hooks = self._states[request_id].hooks
        assert hooks is not None, f"request {request_id} decodes before its prefill"
        return hooks

    def chunked(self, state: RunState) -> bool:
        """May this request's prefill run in chunks (its method hooks nothing inside the forward
        and its attention backend computes a chunk over a cache)?"""
        return state.method.chunkable_prefill and state.attention.prefills_in_chunks

    def _start(self, state: RunState) -> None:
        """An empty cache and the method's preparation; the attachment at once if no pass runs."""
        state.cache = new_request_cache(self.model)
        prompt = torch.tensor([state.request.prompt_ids], dtype=torch.long, device=self.device)
        target = Target(
            self.model, prompt, state.cache, self.default_budget, self.tokenizer, filter_model=self.filter_model
        )
        state.preparation = state.method.prepare(target)
        if not state.preparation.filter_tokens:
            self._attach(state)

    def _attach(self, state: RunState) -> None:
        assert state.preparation is not None
        state.hooks = state.preparation.attachment()
        state.preparation = None
        # After a preemption a chunkable prefill re-runs the generated tokens (all but the last,
        # which the next decode feeds); an unchunkable one re-feeds them in decode steps.
        replay = state.tokens[:-1] if self.chunked(state) else []
        state.prefill_ids = state.hooks.prefill_ids[0].tolist() + replay
        kept_places = state.hooks.prefill_position_ids
        if kept_places is not None:
            after = state.hooks.next_position
            state.prefill_places = kept_places[0].tolist() + list(range(after, after + len(replay)))
        if self.chunked(state):
            assert state.cache is not None
            make_room(state.cache, len(state.prefill_ids) + GrowingLayer.SLACK)

    def _filter(self, chunk: Chunk) -> None:
        state = self._states[chunk.request_id]
        assert state.preparation is not None, f"request {chunk.request_id} has no filter pass"
        state.preparation.run_filter(chunk.start, chunk.tokens)
        if chunk.last:
            self._attach(state)

    # ---- forwards ---------------------------------------------------------------------------
    def _segment(self, chunk: Chunk) -> Segment:
        state = self._states[chunk.request_id]
        assert state.cache is not None
        self._mark_start(state, chunk)
        ids = state.prefill_ids[chunk.start : chunk.start + chunk.tokens]
        return Segment(ids, chunk.start, state.cache, state.attention, self._chunk_positions(state, chunk))

    @staticmethod
    def _chunk_positions(state: RunState, chunk: Chunk) -> list[int] | None:
        """The chunk's rotary positions when they are not its indices in the cache."""
        if state.prefill_places is None:
            return None
        return state.prefill_places[chunk.start : chunk.start + chunk.tokens]

    def _decode_segment(self, request_id: str) -> Segment:
        state = self._states[request_id]
        assert state.cache is not None
        return Segment([state.tokens[state.fed]], state.position, state.cache)

    def _forward_shared(self, decodes: list[str], chunks: list[Chunk], result: StepResult) -> None:
        segments = [self._decode_segment(r) for r in decodes] + [self._segment(c) for c in chunks]
        logits = forward_segments(self.model, segments)
        for row, request_id in enumerate(decodes):
            self._hooks(request_id).after_decode()
            self._decoded(request_id, logits[row], result)
        for row, chunk in enumerate(chunks, start=len(decodes)):
            self._chunk_done(chunk, logits[row], result)

    def _prefill_alone(self, chunk: Chunk, result: StepResult) -> None:
        """A chunk in a forward of its own, the method's prefill hooks and the backend around it
        (the whole prefill of a KV method, whose observer reads every query)."""
        state = self._states[chunk.request_id]
        hooks = self._hooks(chunk.request_id)
        assert state.cache is not None
        self._mark_start(state, chunk)
        ids = state.prefill_ids[chunk.start : chunk.start + chunk.tokens]
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = self._chunk_positions(state, chunk)
        position_ids = None if positions is None else torch.tensor([positions], device=self.device)
        with hooks.prefill(), use_attention(state.attention):
            logits = forward_ids(self.model, tensor, state.cache, chunk.start, position_ids)
        self._chunk_done(chunk, logits, result)

    def _decode_alone(self, request_id: str, result: StepResult) -> None:
        state = self._states[request_id]
        hooks = self._hooks(request_id)
        assert state.cache is not None
        ids = torch.tensor([[state.tokens[state.fed]]], dtype=torch.long, device=self.device)
        with hooks.decode_step():
            logits = forward_ids(self.model, ids, state.cache, state.position)
        self._decoded(request_id, logits, result)

    # ---- after a forward ----------------------------------------------------------------------
    def _mark_start(self, state: RunState, chunk: Chunk) -> None:
        if chunk.start == 0:
            sync(self.device)
            state.started = time.perf_counter()

    def _chunk_done(self, chunk: Chunk, logits: torch.Tensor, result: StepResult) -> None:
        if not chunk.last:
            return
        state = self._states[chunk.request_id]
        hooks = self._hooks(chunk.request_id)
        replayed = len(state.prefill_ids) - int(hooks.prefill_ids.shape[-1])
        state.fed = replayed
        state.position = hooks.next_position + replayed
        if not state.prefilled:
            sync(self.device)
            state.prefilled = True
            result.prefilled[chunk.request_id] = Prefilled(
                report=self.report(state),
                prefill_ms=elapsed_ms(state.started),
                select_ms=hooks.selection.select_ms,
                kv_cache_bytes=cache_bytes(state.cache),
            )
        if not state.tokens:
            self._sample(chunk.request_id, logits, result)

    def _decoded(self, request_id: str, logits: torch.Tensor, result: StepResult) -> None:
        """After a decode forward fed ``tokens[fed]``: a new token, unless it re-fed an old one."""
        state = self._states[request_id]
        state.fed += 1
        state.position += 1
        if state.fed == len(state.tokens):
            self._sample(request_id, logits, result)

    def _sample(self, request_id: str, logits: torch.Tensor, result: StepResult) -> None:
        state = self._states[request_id]
        token = choose_token(logits, state.request.sampling, state.generator)
        state.tokens.append(token)
        result.sampled[request_id] = token

    def report(self, state: RunState) -> CompressionInfo:
        assert state.hooks is not None and state.cache is not None
        return prefill_report(self.tokenizer, state.request, state.method, state.hooks, state.cache, state.attention)


def prefill_report(
    tokenizer: PreTrainedTokenizerBase,
    request: GenerationRequest,
    method: Method,
    hooks: Attachment,
    cache: DynamicCache,
    attention: AttentionBackend,
) -> CompressionInfo:
    """The response's ``compression`` once the cache is final (pruned, for KV methods)."""
    report = compression_report(method, hooks.selection, tokenizer, request.prompt_ids, request.compression)
    if hooks.kv_bytes_before is not None:
        report.kv_bytes_before, report.kv_bytes_after = hooks.kv_bytes_before, cache_bytes(cache)
    report.attention = AttentionInfo.model_validate(attention.report())
    return report
