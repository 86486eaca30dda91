"""Property-based API fuzzing with every schemathesis check: no 5xx, and the published OpenAPI
document and the server agree both ways (a request the schema allows is served, one it forbids is
refused with a 4xx error JSON; responses match their schemas).

The schema is the served app's own ``/openapi.json``, with the loaded model's bounds and the
engine's compression branches in it (server/openapi.py). One rule between fields is beyond JSON
Schema: prompt tokens plus ``max_tokens`` must fit the context. A schema-valid request refused
for that alone (400, code ``context_length_exceeded``, as OpenAI answers) is not counted against
the schema; any other refusal of schema-valid data is.

Generation is stubbed (one token, no forward pass) so hundreds of cases stay fast, but everything
around it is real: the schema, validation, tokenisation, the method registry's knob checks, the
engine's context-length checks, admission and the batch scheduler.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
from schemathesis.checks import CHECKS
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from contract.protocol import CompressionInfo
from server.app import create_app
from server.engine.checks import CONTEXT_LENGTH_EXCEEDED
from server.engine.core import EngineCore
from server.engine.hf_async import HFAsyncEngine
from server.engine.runner import ModelRunner, Prefilled, StepResult
from server.engine.scheduler import Scheduler, StepPlan
from server.settings import Settings
from tests.conftest import serve_app

# `make test-schema` runs 300 per operation (GEMSERVE_SCHEMA_EXAMPLES); `make test` a quick 40.
MAX_EXAMPLES = int(os.environ.get("GEMSERVE_SCHEMA_EXAMPLES", "40"))


class StubRunner(ModelRunner):
    """The real runner's bookkeeping with no forward: a prefill that ends reports the whole prompt
    kept and chooses token 42, the only one (``max_tokens`` becomes 1)."""

    def execute(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        for chunk in plan.prefills:
            if not chunk.last:
                continue
            request = self._states[chunk.request_id].request
            n = len(request.prompt_ids)
            name = request.compression.method or "none"
            report = CompressionInfo(method=name, prompt_tokens=n, kept_tokens=n, ratio=1.0, select_ms=0.0)
            result.prefilled[chunk.request_id] = Prefilled(report, prefill_ms=0.0, select_ms=0.0, kv_cache_bytes=0)
            request.sampling.max_tokens = 1  # the one token ends it: no decode step
            result.sampled[chunk.request_id] = 42
        return result


class StubGenerationEngine:
    """The real HFEngine for everything but generation: its batches run on a :class:`StubRunner`,
    so the real scheduler, detokenizer and result path run without a forward."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.stub = StubRunner(inner.model, inner.tokenizer, inner.default_budget)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def new_core(self, max_running: int = 8, max_batch_tokens: int | None = None, *args: Any) -> EngineCore:
        scheduler = Scheduler(max_running, max_batch_tokens, break_even=self.stub.break_even)
        return EngineCore(self.stub, scheduler, self.inner.tokenizer, self.inner.eos_token_ids)


@pytest.fixture(scope="module")
def stub_server(engine) -> Iterator[tuple[Any, str]]:
    app = create_app(Settings(max_queue=1000), engine=HFAsyncEngine(StubGenerationEngine(engine), max_queue=1000))
    with serve_app(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def stub_server_url(stub_server: tuple[Any, str]) -> str:
    return stub_server[1]


@pytest.fixture(scope="module")
def served_schema(stub_server: tuple[Any, str]) -> Any:
    """The document the server publishes once its engine is loaded (serve_app waits for that)."""
    app, _ = stub_server
    return schemathesis.openapi.from_dict(app.openapi())


def error_code(response: Any) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


@schemathesis.check
def positive_data_accepted_within_context(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis's positive_data_acceptance, except for the context rule (module docstring)."""
    if response.status_code == 400 and error_code(response) == CONTEXT_LENGTH_EXCEEDED:
        return None
    return positive_data_acceptance(ctx, response, case)


ALL_CHECKS = [check for check in CHECKS.get_all() if check is not positive_data_acceptance]

# The operations, known before any model loads; each runs against the served document, whose
# bounds need the engine (schemathesis's from_fixture does not run under this pytest).
OPERATIONS = [
    result.ok().label
    for result in schemathesis.openapi.from_dict(create_app(Settings()).openapi()).get_all_operations()
]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
@pytest.mark.parametrize("label", OPERATIONS)
def test_schema_and_server_agree(label: str, mode: GenerationMode, served_schema: Any, stub_server_url: str) -> None:
    operation = next(r.ok() for r in served_schema.get_all_operations() if r.ok().label == label)
    if mode is GenerationMode.NEGATIVE and not operation.body.items and not list(operation.iter_parameters()):
        pytest.skip(f"{label} takes no input: no request to it is schema-invalid")

    @hypothesis.given(operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    def agree(case: Any) -> None:
        response = case.call_and_validate(base_url=stub_server_url, timeout=60, checks=ALL_CHECKS)
        assert response.status_code < 500, f"{label} -> {response.status_code}: {response.text[:500]}"
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text[:500]

    agree()
