"""Prompt -> token ids, one rule for every backend so they all see the same ids.

Clients send text of any size; tokenizing it costs time and memory in proportion. So before any
tokenization :class:`PromptEncoder` refuses text that cannot fit the context whatever it holds:
no token spans more characters than the vocabulary's longest piece, so a prompt of more than
``max_model_len x longest piece`` characters is more tokens than the context (a factor of 2 on
top covers normalizers that compose characters). The routes call the encoder in a worker thread,
so even a prompt under that bound never stalls the event loop.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

from server.engine.checks import check_token_ids
from server.engine.types import RequestError

# Headroom over the longest piece: a normalizer may merge characters (NFC composition), so a
# token can cover slightly more input characters than its piece holds.
NORMALIZER_SLACK = 2


def longest_piece_chars(tokenizer: PreTrainedTokenizerBase) -> int:
    """Characters in the vocabulary's longest piece (a byte-level piece has one char per byte, so
    this bounds the input characters one token can cover)."""
    return max((len(piece) for piece in tokenizer.get_vocab()), default=1)


class PromptEncoder:
    """Text or chat turns -> ids, refusing what cannot fit ``max_model_len`` before tokenizing."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.piece_chars = longest_piece_chars(tokenizer)
        self.max_chars = max_model_len * self.piece_chars * NORMALIZER_SLACK

    def check_size(self, chars: int, param: str) -> None:
        if chars > self.max_chars:
            raise RequestError(
                f"{param} is {chars} characters, more than fit in the model's context of {self.max_model_len} "
                f"tokens (a token of this tokenizer spans at most {self.piece_chars} characters)",
                param=param,
            )

    def encode_prompt(self, text: str | list[int]) -> list[int]:
        """Plain completion text, with the tokenizer's own special tokens (e.g. BOS); a token-id
        prompt is checked against the vocabulary and returned as it is."""
        if isinstance(text, list):
            check_token_ids(text, len(self.tokenizer))
            return list(text)
        if not text:
            raise RequestError("prompt must not be empty", param="prompt")
        self.check_size(len(text), "prompt")
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        return ids or self.document_start(param="prompt")

    def document_start(self, param: str) -> list[int]:
        """The prompt for text that tokenizes to nothing (a lone control character): the start of
        a document, as OpenAI's completions take ``<|endoftext|>`` for an empty prompt."""
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.eos_token_id
        if start is None:
            raise RequestError(f"{param} holds no token and this tokenizer has no start-of-text token", param=param)
        return [start]

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Chat turns through the model's chat template, ending with the generation prefix."""
        if not messages:
            raise RequestError("messages must not be empty", param="messages")
        self.check_size(sum(len(str(m.get("content") or "")) for m in messages), "messages")
        if self.tokenizer.chat_template is None:
            # Base models (e.g. Gemma 3 270M pt) have no template: join the turns as plain text.
            text = "\n\n".join(str(m.get("content") or "") for m in messages)
            return self.encode_prompt(text) if text else self.document_start(param="messages")
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
        return list(ids)
