"""Model resolution and loading: the embedded default, and clear errors for what is missing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.models import (
    ALIASES,
    DEFAULT_MODEL,
    ModelNotFoundError,
    convert_gguf,
    load_model,
    resolve_model_dir,
)


def test_default_model_is_the_converted_embedded_gguf(loaded_model) -> None:
    name, path = resolve_model_dir(None)
    assert name == DEFAULT_MODEL == loaded_model.name
    assert isinstance(path, Path)
    assert (path / "config.json").is_file()
    assert any(path.glob("*.safetensors"))  # converted once, reused after
    assert loaded_model.max_model_len == 8192
    assert loaded_model.model.config.num_hidden_layers == 30
    assert loaded_model.tokenizer.chat_template


def test_missing_gguf_file_names_the_path(tmp_path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ModelNotFoundError, match=re.escape(f"GGUF file '{missing}' does not exist")):
        resolve_model_dir(str(missing), cache_dir=tmp_path)


def test_dir_without_config_names_the_missing_file(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match=re.escape(f"model dir '{tmp_path}' has no config.json")):
        resolve_model_dir(str(tmp_path), cache_dir=tmp_path)


def test_unknown_alias_lists_what_was_looked_for(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_dir("no-such-model", cache_dir=tmp_path)
    message = str(info.value)
    assert "model 'no-such-model' not found" in message
    for alias in ALIASES:
        assert alias in message
    assert ".gguf file" in message and "config.json" in message and "hub id" in message


def test_a_file_that_is_neither_dir_nor_gguf(tmp_path) -> None:
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match=r"is neither a model dir nor a \.gguf file"):
        resolve_model_dir(str(stray), cache_dir=tmp_path)


def test_corrupt_gguf_gives_a_clear_error_and_leaves_no_cache_entry(tmp_path) -> None:
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"this is not a GGUF file at all" * 100)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotFoundError, match=re.escape(f"could not read GGUF file '{corrupt}'")):
        convert_gguf(corrupt, cache)
    models = cache / "models"
    assert not models.exists() or not any((p / "config.json").is_file() for p in models.iterdir())


def test_corrupt_gguf_through_load_model(tmp_path) -> None:
    corrupt = tmp_path / "junk.gguf"
    corrupt.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ModelNotFoundError, match="could not read GGUF file"):
        load_model(str(corrupt), device="cpu", cache_dir=tmp_path / "cache")


def test_max_model_len_cannot_exceed_the_context() -> None:
    with pytest.raises(ValueError, match="--max-model-len 9000 exceeds the model's context of 8192 tokens"):
        load_model(DEFAULT_MODEL, device="cpu", max_model_len=9000)


def test_max_model_len_caps_the_context() -> None:
    assert load_model(DEFAULT_MODEL, device="cpu", max_model_len=2048).max_model_len == 2048
