"""Every method, one list: tests here run once per case, so a new method is covered by one line.

Like kvpress's ``tests/default_presses.py``: ``METHOD_CASES`` names each method with knobs small
enough for short prompts; the tests below are parametrised over it and use the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from compressors import METHODS, CompressionError, KVCompressor, build_method
from compressors.probe import active_probe
from server.engine.types import CompressionSpec, GenerationRequest, RequestError, SamplingParams


@dataclass(frozen=True)
class MethodCase:
    name: str
    knobs: dict[str, Any] = field(default_factory=dict)

    def with_budget(self, budget: int) -> dict[str, Any]:
        return self.knobs if self.name == "none" else {**self.knobs, "budget": budget}


METHOD_CASES = [
    MethodCase("none"),
    MethodCase("gemfilter", {"tail": 8}),
    MethodCase("snapkv", {"window": 8}),
    MethodCase("h2o", {"recent_fraction": 0.5}),
    MethodCase("streamingllm", {"sinks": 4}),
    MethodCase("pyramidkv", {"window": 8}),
]
CASE_IDS = [case.name for case in METHOD_CASES]
KV_CASES = [case for case in METHOD_CASES if METHODS[case.name].kind == "kv"]
KV_IDS = [case.name for case in KV_CASES]

PROMPT = (
    "Read the notes and answer.\n"
    "The lighthouse on the northern rocks was painted red in 1921. The ferry leaves at nine. "
    "The baker on Mill Street opens at six and sells rye bread. The code for the blue chest is 4417.\n"
    "Question: What is the code for the blue chest?"
)


def greedy(engine, ids: list[int], method: str, knobs: dict[str, Any], max_tokens: int = 8):
    sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return engine.generate(GenerationRequest(ids, sampling, CompressionSpec(method, knobs)))


@pytest.fixture(scope="module")
def prompt_ids(engine) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": PROMPT}])


@pytest.fixture(scope="module")
def full_output(engine, prompt_ids):
    return greedy(engine, prompt_ids, "none", {})


def test_every_method_is_a_case():
    assert set(METHODS) == set(CASE_IDS)


@pytest.mark.parametrize("case", METHOD_CASES, ids=CASE_IDS)
def test_budget_at_least_prompt_is_identical_to_none(engine, prompt_ids, full_output, case):
    """budget >= n (and, for methods that evict while decoding, >= n + max_tokens) keeps every
    entry, so greedy output must match full attention token for token."""
    result = greedy(engine, prompt_ids, case.name, case.with_budget(len(prompt_ids) + 64))
    assert result.token_ids == full_output.token_ids
    assert result.compression.kept_tokens == len(prompt_ids)
    if METHODS[case.name].kind == "kv":
        assert result.compression.kv_bytes_after == result.compression.kv_bytes_before > 0


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if c.name != "none"], ids=CASE_IDS[1:])
@pytest.mark.parametrize("ratio", [0.0, -0.5, 1.5])
def test_ratio_outside_unit_interval_is_rejected(case, ratio):
    with pytest.raises(CompressionError, match=r"ratio of method '\w+' must be in \(0, 1\]") as info:
        build_method(case.name, {**case.knobs, "ratio": ratio})
    assert info.value.param == "compression.ratio"


@pytest.mark.parametrize("case", [c for c in METHOD_CASES if c.name != "none"], ids=CASE_IDS[1:])
def test_unknown_knob_names_the_allowed_ones(engine, prompt_ids, case):
    request = GenerationRequest(prompt_ids, compression=CompressionSpec(case.name, {"no_such_knob": 1}))
    with pytest.raises(RequestError, match="its knobs: budget, ratio") as info:
        engine.check_request(request)
    assert info.value.param == "compression.no_such_knob"


@pytest.mark.parametrize("case", KV_CASES, ids=KV_IDS)
def test_compressed_request_reports_smaller_cache_and_selection(engine, prompt_ids, case):
    budget = 24
    sampling = SamplingParams(max_tokens=2, temperature=0.0)
    spec = CompressionSpec(case.name, case.with_budget(budget), return_selection=True)
    result = engine.generate(GenerationRequest(prompt_ids, sampling, spec))
    report = result.compression
    assert report.kv_bytes_after < report.kv_bytes_before
    # Uniform-budget methods hold exactly budget/n of the full cache; PyramidKV's mean is the budget.
    expected = report.kv_bytes_before * budget / len(prompt_ids)
    assert report.kv_bytes_after == pytest.approx(expected, rel=0.05)
    assert report.selection is not None
    kept = report.selection.kept_indices
    # kept_tokens is what each head holds; the selection lists the union over heads, named apart.
    assert report.kept_tokens == budget and report.ratio == budget / len(prompt_ids)
    assert kept == sorted(set(kept)) and len(kept) == report.kept_tokens_union >= budget
    assert all(0 <= i < len(prompt_ids) for i in kept)
    assert active_probe() is None  # the probe is gone once the request is done


@pytest.mark.parametrize("case", KV_CASES, ids=KV_IDS)
def test_kv_methods_are_kv_compressors(case):
    method = build_method(case.name, case.with_budget(64))
    assert isinstance(method, KVCompressor)
    assert {"budget", "ratio"} <= set(method.knobs())
