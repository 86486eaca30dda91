"""Shared fixtures: the real embedded model, loaded once per test session.

Tests run on CPU against SmolLM2-135M-Instruct (converted once into the cache dir), so what
they assert is what users get. Use ``engine`` for direct calls; never time anything here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def loaded_model():
    from server.models import load_model

    # float32 whatever the CPU: the exactness tests compare against float32 references; tests/test_precision.py
    # covers the other dtypes.
    return load_model("smollm2-135m-instruct", device="cpu", dtype="float32", filter_dtype="float32")


@pytest.fixture(scope="session")
def engine(loaded_model):
    from server.engine.hf import HFEngine

    return HFEngine(loaded_model)


@pytest.fixture(scope="session")
def count_tokens(engine) -> Callable[[str], int]:
    return lambda text: len(engine.encode_prompt(text))


# ---- HTTP server fixtures (issue 3) ---------------------------------------------------------
TEST_API_KEY = "test-secret-key"


def serve_app(app) -> AbstractContextManager[str]:
    """Serve ``app`` on a free loopback port in a background thread; the context yields its URL."""
    from server.app import serve_in_background

    return serve_in_background(app)


def make_test_app(engine, **settings):
    """An app around the session's model: a fresh scheduler per app, no model reload."""
    from server.app import create_app
    from server.engine.hf_async import HFAsyncEngine
    from server.settings import Settings

    config = Settings(**settings)
    async_engine = HFAsyncEngine(engine, config.max_concurrency, config.max_queue, config.retry_after_s)
    return create_app(config, engine=async_engine)


@pytest.fixture(scope="session")
def server_url(engine) -> Iterator[str]:
    """Base URL (no ``/v1``) of a real GemServe on the default model, no API key."""
    with serve_app(make_test_app(engine)) as url:
        yield url


@pytest.fixture(scope="session")
def server_url_with_key(engine) -> Iterator[str]:
    """Like ``server_url`` but every route except /health and /ready needs ``TEST_API_KEY``."""
    with serve_app(make_test_app(engine, api_key=TEST_API_KEY)) as url:
        yield url
