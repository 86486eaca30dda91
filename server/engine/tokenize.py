"""Prompt -> token ids, one rule for every backend so they all see the same ids."""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.types import RequestError


def encode_prompt(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Plain completion text, with the tokenizer's own special tokens (e.g. BOS)."""
    if not text:
        raise RequestError("prompt must not be empty", param="prompt")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]]) -> list[int]:
    """Chat turns through the model's chat template, ending with the generation prefix."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    if tokenizer.chat_template is None:
        # Base models (e.g. Gemma 3 270M pt) have no template: join the turns as plain text.
        return encode_prompt(tokenizer, "\n\n".join(str(m.get("content") or "") for m in messages))
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return list(ids)
