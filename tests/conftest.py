"""Shared fixtures: the real embedded model, loaded once per test session.

Tests run on CPU against SmolLM2-135M-Instruct (converted once into the cache dir), so what
they assert is what users get. Use ``engine`` for direct calls; never time anything here.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def loaded_model():
    from server.models import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


@pytest.fixture(scope="session")
def engine(loaded_model):
    from server.engine.hf import HFEngine

    return HFEngine(loaded_model)


@pytest.fixture(scope="session")
def count_tokens(engine) -> Callable[[str], int]:
    return lambda text: len(engine.encode_prompt(text))


# ---- HTTP server fixtures (issue 3) ---------------------------------------------------------
TEST_API_KEY = "test-secret-key"


@contextmanager
def serve_app(app) -> Iterator[str]:
    """Run ``app`` with uvicorn in a background thread on a free loopback port; yield its URL
    once ``/ready`` answers 200. Shuts the server down (draining requests) on exit."""
    import httpx
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError(f"test server on {url} did not become ready")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=120)


def make_test_app(engine, **settings):
    """An app around the session's model: a fresh scheduler per app, no model reload."""
    from server.app import create_app
    from server.engine.scheduler import HFAsyncEngine
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
