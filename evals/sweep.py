"""Many methods on one prompt, paying each expensive pass once (in-process eval only).

A budget curve runs every method at five budgets; on 2 CPU cores a 16K-token prefill of Gemma 3
takes over a minute, so running each (method, budget) alone would spend most of an eval on the
same work. What does not depend on the budget is done once per prompt here:

- GemFilter's filter pass: the scores are the same for every budget (and every ``span``) with the
  same layer, scoring, window and filter attention; each budget only picks its top-k from them.
- The full prefill of ``none`` and every KV method with the same attention backend: the KV
  methods prune after it, so one prefill feeds them all. Each KV method's scorer observes that
  one prefill; methods differing only in budget share one observer's scores.

Then each method gets its own copy of the cache and decodes through the engine's own decode
loop. The answers are the ones :meth:`HFEngine.generate` gives (tests/test_eval_runner.py checks
this token for token); timings of shared work are not per-method timings, so the eval reports
accuracy from here and leaves speed to the benchmarks.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from compressors import KVCompressor, Method, PromptSelector
from compressors.base import Attachment, KVAttachment, Target, cache_bytes, keep_everything, model_dtype
from compressors.gemfilter import SKIPPED_TOO_SHORT, GemFilter
from compressors.probe import active_probe, attention_probe
from contract.protocol import MetricsInfo
from server.engine.batch_forward import new_request_cache
from server.engine.hf import HFEngine
from server.engine.types import GenerationRequest, GenerationResult

BUDGET_KNOBS = ("budget", "ratio")


def run_many(engine: HFEngine, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """``requests`` share ``prompt_ids`` and differ in ``compression``; results in their order."""
    if len({tuple(r.prompt_ids) for r in requests}) > 1:
        raise ValueError("run_many takes requests for one prompt")
    methods = [engine.check_request(request) for request in requests]
    results: dict[int, GenerationResult] = {}
    with torch.inference_mode():
        selectors = [i for i, m in enumerate(methods) if isinstance(m, PromptSelector)]
        for group in group_by(selectors, lambda i: filter_key(engine, methods[i])):
            results.update(run_selector_group(engine, [requests[i] for i in group], [methods[i] for i in group], group))
        full = [i for i, m in enumerate(methods) if not isinstance(m, PromptSelector)]
        for group in group_by(full, lambda i: attention_key(requests[i])):
            results.update(run_prefill_group(engine, [requests[i] for i in group], [methods[i] for i in group], group))
    return [results[i] for i in range(len(requests))]


def group_by(indices: list[int], key: Any) -> list[list[int]]:
    groups: dict[Any, list[int]] = {}
    for index in indices:
        groups.setdefault(key(index), []).append(index)
    return list(groups.values())


def attention_key(request: GenerationRequest) -> str:
    return repr((request.compression.attention, sorted(request.compression.attention_knobs.items())))


def filter_key(engine: HFEngine, method: Method) -> str:
    """What a GemFilter's scores depend on (not its budget, pooling or span)."""
    assert isinstance(method, GemFilter)
    return repr(
        (
            method.filter_layer(engine.model),
            method.scoring,
            method.window,
            method.filter_attention,
            sorted((method.filter_attention_knobs or {}).items()),
        )
    )


def run_selector_group(
    engine: HFEngine, requests: list[GenerationRequest], methods: list[Method], indices: list[int]
) -> dict[int, GenerationResult]:
    prompt = torch.tensor([requests[0].prompt_ids], dtype=torch.long, device=engine.device)
    n = int(prompt.shape[1])
    scores: tuple[torch.Tensor, dict[str, Any]] | None = None
    out: dict[int, GenerationResult] = {}
    for index, request, method in zip(indices, requests, methods, strict=True):
        assert isinstance(method, GemFilter)
        started = time.perf_counter()
        keep = method.resolve_budget(n, engine.default_budget)
        if keep >= n:
            selection = method.selection(engine.model, n, list(range(n)), started)
        elif not method.pays_off(engine.model, n, keep):
            selection = method.selection(engine.model, n, list(range(n)), started, SKIPPED_TOO_SHORT)
        else:
            if scores is None:
                scores = method.filter_scores(engine.model, prompt, engine.filter_model)
            target = Target(engine.model, prompt, None, engine.default_budget, engine.tokenizer)
            selection = method.selection_from_scores(target, scores[0], keep, started, scores[1])
            selection.filter_dtype = model_dtype(method.scoring_model(engine.model, engine.filter_model))
        # What GemFilter's attach() would yield, from the shared scores.
        out[index] = prefill_and_decode(engine, request, method, method.attachment_for(prompt, selection))
    return out


def prefill_and_decode(
    engine: HFEngine, request: GenerationRequest, method: Method, hooks: Attachment
) -> GenerationResult:
    metrics = MetricsInfo(select_ms=hooks.selection.select_ms)
    cache = new_request_cache(engine.model)
    attention = request.attention  # built by check_request
    assert attention is not None
    logits = engine.prefill(hooks, cache, attention)
    report = engine.report(request, method, hooks, cache, attention)
    return engine.decode_from(request, hooks, cache, logits, report, metrics)


def run_prefill_group(
    engine: HFEngine, requests: list[GenerationRequest], methods: list[Method], indices: list[int]
) -> dict[int, GenerationResult]:
    """One full prefill for ``none`` and every KV method of one attention backend."""
    prompt = torch.tensor([requests[0].prompt_ids], dtype=torch.long, device=engine.device)
    n = int(prompt.shape[1])
    kv = [m for m in methods if isinstance(m, KVCompressor)]
    leaders = observer_leaders(kv, n)
    cache = new_request_cache(engine.model)
    attention = requests[0].attention  # built by check_request; the group shares its one prefill
    assert attention is not None
    with observe_all(engine, leaders, n) as observed:  # the observers run here, so prefill gets a plain method
        logits = engine.prefill(Attachment(prompt, keep_everything("none", n)), cache, attention)
    kv_before = cache_bytes(cache)
    out: dict[int, GenerationResult] = {}
    for index, request, method in zip(indices, requests, methods, strict=True):
        own = copy.deepcopy(cache)
        with method.attach(engine.model, prompt, own, engine.default_budget, engine.tokenizer) as hooks:
            if isinstance(hooks, KVAttachment):
                assert isinstance(method, KVCompressor)
                # What its leader observed of the shared prefill, its own copy.
                hooks.adopt_prefill(kv_before, copy.deepcopy(observed.get(observer_key(method))))
            else:
                hooks.adopt_prefill(kv_before)
            report = engine.report(request, method, hooks, own, attention)
            out[index] = engine.decode_from(request, hooks, own, logits.clone(), report, MetricsInfo())
    return out


def observer_key(method: KVCompressor) -> str:
    knobs = {k: getattr(method, k) for k in method.knobs() if k not in BUDGET_KNOBS}
    return repr((type(method).__name__, sorted(knobs.items())))


def observer_leaders(methods: list[KVCompressor], prompt_tokens: int) -> dict[str, KVCompressor]:
    """One method per scorer configuration observes the prefill: the one with the smallest
    budget, since a budget holding the whole prompt may skip scoring."""
    leaders: dict[str, KVCompressor] = {}
    for method in sorted(methods, key=lambda m: m.target_budget(prompt_tokens, 1 << 30)):
        leaders.setdefault(observer_key(method), method)
    return leaders


@contextmanager
def observe_all(engine: HFEngine, leaders: dict[str, KVCompressor], prompt_tokens: int) -> Iterator[dict[str, Any]]:
    """Every leader's prefill observer at once: each sets its probe in turn, and one probe that
    calls them all is active during the forward. Yields what each observes, by observer key
    (complete once the context has exited)."""
    with ExitStack() as stack:
        probes = []
        observed: dict[str, Any] = {}
        for key, method in leaders.items():
            before = active_probe()
            observed[key] = stack.enter_context(method.prefill_observer(engine.model, prompt_tokens))
            if active_probe() is not before:
                probes.append(active_probe())

        def fan_out(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            for probe in probes:
                probe(module, query, key, value)

        stack.enter_context(attention_probe(fan_out))
        yield observed
