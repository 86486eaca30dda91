"""Incremental detokenisation with stop strings, in time linear in the output length.

Each token is decoded once, with a few tokens of context: by ``tokenizers``' ``DecodeStream``
for a fast (Rust-backed) tokenizer, by a window of the last tokens otherwise (the same
technique). Nothing re-decodes the whole output.

Text is released only when it is final: not ending in a partial UTF-8 character and not
possibly the start of a stop string. When a stop string appears the text is cut before it
(before the earliest, when several appear at once).
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream
from transformers import PreTrainedTokenizerBase


class WindowDecodeStream:
    """``DecodeStream``'s contract for a tokenizer without a Rust backend: ``step`` returns the
    text a token adds, or None while a character is incomplete. It decodes only the tokens
    since the last text returned, after those that produced that text as context (a token's
    text can depend on its neighbour's, e.g. SentencePiece's leading space): vLLM's scheme."""

    def __init__(self, skip_special_tokens: bool) -> None:
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: the context tokens
        self.read = 0  # tokens before this are already returned as text

    def step(self, tokenizer: PreTrainedTokenizerBase, token_id: int) -> str | None:
        self.ids.append(token_id)
        skip = self.skip_special_tokens
        before = tokenizer.decode(self.ids[self.prefix : self.read], skip_special_tokens=skip)
        after = tokenizer.decode(self.ids[self.prefix :], skip_special_tokens=skip)
        if after.endswith("\ufffd") or len(after) <= len(before):
            return None
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]


class IncrementalDetokenizer:
    """``add(token)`` returns the text that became final; ``flush()`` the rest at the end.
    ``text`` is all text so far (cut before a stop string once one is found), ``token_ids``
    every token added, ``stopped`` whether a stop string was found."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.stopped = False
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._stream: Any
        if backend is not None:
            self._decoder, self._stream = backend, DecodeStream(skip_special_tokens=skip_special_tokens)
        else:
            self._decoder, self._stream = tokenizer, WindowDecodeStream(skip_special_tokens)
        self._released: list[str] = []  # final text handed out, in pieces (joined on demand)
        self._pending = ""  # decoded text not yet released: shorter than the longest stop string

    @property
    def text(self) -> str:
        return "".join(self._released) + self._pending

    def add(self, token_id: int) -> str:
        """Add one token; return newly final text (may be empty)."""
        self.token_ids.append(token_id)
        if self.stopped:
            return ""
        piece = self._stream.step(self._decoder, token_id)
        if not piece:  # a multi-byte character is still incomplete (or the token has no text)
            return ""
        # Released text never holds the start of a stop string, so searching the pending
        # text suffices: the work per token is bounded by the stop strings' lengths.
        window = self._pending + piece
        found = [at for at in (window.find(stop) for stop in self.stop) if at != -1]
        if found:
            self._pending, self.stopped = window[: min(found)], True
            return self.flush()
        held = self._held_back(window)
        self._pending = window[len(window) - held :]
        return self._release(window[: len(window) - held])

    def flush(self) -> str:
        """Release everything left (end of generation)."""
        out, self._pending = self._pending, ""
        return self._release(out)

    def _held_back(self, text: str) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def _release(self, out: str) -> str:
        if out:
            self._released.append(out)
        return out
