"""Property-based API fuzzing: no request the schema allows (or nearly allows) may cause a 5xx.

Generation is stubbed (at most two tokens, no forward pass) so hundreds of cases stay fast, but
everything before it is real: the schema, validation, tokenisation, the method registry's
knob checks, the engine's context-length checks and the scheduler.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis

from server.app import create_app
from server.engine.hf_async import HFAsyncEngine
from server.engine.types import GenerationRequest, GenerationResult, TokenDelta
from server.protocol import CompressionInfo, MetricsInfo
from server.settings import Settings
from tests.conftest import serve_app

# `make test-schema` runs 300 per operation (GEMSERVE_SCHEMA_EXAMPLES); `make test` a quick 40.
MAX_EXAMPLES = int(os.environ.get("GEMSERVE_SCHEMA_EXAMPLES", "40"))


class StubGenerationEngine:
    """The real HFEngine for everything but generation, which returns canned tokens."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def stream(self, request: GenerationRequest) -> Iterator[TokenDelta | GenerationResult]:
        method = self.inner.check_request(request)
        tokens = [42] * min(request.sampling.max_tokens, 2)
        for token in tokens:
            yield TokenDelta(token_id=token, text="x")
        n = len(request.prompt_ids)
        report = CompressionInfo(method=method.name, prompt_tokens=n, kept_tokens=n, ratio=1.0, select_ms=0.0)
        yield GenerationResult("x" * len(tokens), tokens, "length", n, report, MetricsInfo(ttft_ms=1, e2e_ms=1))


# The schema comes from an app built without a model (building the OpenAPI needs none).
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture(scope="module")
def stub_server_url(engine) -> Iterator[str]:
    app = create_app(Settings(max_queue=1000), engine=HFAsyncEngine(StubGenerationEngine(engine), max_queue=1000))
    with serve_app(app) as url:
        yield url


@schema.parametrize()
@hypothesis.settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(hypothesis.HealthCheck),
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
)
def test_no_server_errors(case: Any, stub_server_url: str) -> None:
    response = case.call(base_url=stub_server_url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}, response.text[:500]
