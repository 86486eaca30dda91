"""Shared fixtures: the real embedded model, loaded once per test session.

Tests run on CPU against SmolLM2-135M-Instruct (converted once into the cache dir), so what
they assert is what users get. Use ``engine`` for direct calls; never time anything here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

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
