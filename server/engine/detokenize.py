"""Incremental detokenisation with stop strings.

Text is released only when it is final: not ending in a partial UTF-8 character and not
possibly the start of a stop string. When a stop string appears the text is cut before it.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.token_ids: list[int] = []
        self.text = ""  # all text decoded so far (up to a stop string, once found)
        self.emitted = 0  # characters of ``text`` already released
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Add one token; return newly final text (may be empty)."""
        self.token_ids.append(token_id)
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is still incomplete
            return ""
        self.text = text
        for stop in self.stop:
            at = text.find(stop, max(0, self.emitted - len(stop)))
            if at != -1:
                self.text = text[:at]
                self.stopped = True
        safe_end = len(self.text) if self.stopped else len(self.text) - self._held_back(self.text)
        return self._release(safe_end)

    def flush(self) -> str:
        """Release everything left (end of generation)."""
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        held = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:size]):
                    held = size
                    break
        return held

    def _release(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
