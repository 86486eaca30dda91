"""Property-based API fuzzing: no request the schema allows (or nearly allows) may cause a 5xx.

Generation is stubbed (one token, no forward pass) so hundreds of cases stay fast, but everything
around it is real: the schema, validation, tokenisation, the method registry's knob checks, the
engine's context-length checks, admission and the batch scheduler.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from typing import Any

import hypothesis
import pytest
import schemathesis
import torch

from compressors.base import Attachment, keep_everything
from server.app import create_app
from server.engine.hf_async import HFAsyncEngine
from server.protocol import CompressionInfo
from server.settings import Settings
from tests.conftest import serve_app

# `make test-schema` runs 300 per operation (GEMSERVE_SCHEMA_EXAMPLES); `make test` a quick 40.
MAX_EXAMPLES = int(os.environ.get("GEMSERVE_SCHEMA_EXAMPLES", "40"))


class StubGenerationEngine:
    """The real HFEngine for everything but generation: the prefill is skipped and the first token
    (42) is the only one, so the real scheduler, detokenizer and result path run without a forward."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def prefill_steps(self, sequence: Any, chunk_tokens: Any) -> Generator[None, None, torch.Tensor]:
        request = sequence.request
        n = len(request.prompt_ids)
        prompt = torch.tensor([request.prompt_ids])
        sequence.hooks = Attachment(prompt, keep_everything(sequence.method.name, n))
        sequence.report = CompressionInfo(
            method=sequence.method.name, prompt_tokens=n, kept_tokens=n, ratio=1.0, select_ms=0.0
        )
        request.sampling.max_tokens = 1  # the one token below ends it: no decode forward
        logits = torch.full((len(self.inner.tokenizer),), float("-inf"))
        logits[42] = 0.0
        return logits
        yield  # a generator, as the engine's


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
