"""Whole-span selection: choose kept tokens a word (or a chunk) at a time, never half a number.

A token-level top-k keeps the tokens that scored high, one by one. Numbers and rare words are
several tokens (SmolLM2 and Gemma 3 split digits one by one), and the tokens inside a number
often score lower than its first digit: a four-part code then loses its middle digits while
the budget goes on single-token crumbs elsewhere. Here a prompt is cut into units, a unit
scores its best token's score, and whole units are taken best first until the budget is full
(ChunkKV, Liu et al. 2025, https://arxiv.org/abs/2502.00299, chooses fixed-size chunks the
same way; a "word" unit follows the text instead of a fixed size).

A word unit is a run of tokens with no whitespace between them ("7391-2048-5562-0193." is one
unit), cut every ``MAX_UNIT_TOKENS`` so a long URL or hash cannot swallow the budget. The unit
boundaries come from the tokenizer's vocabulary once (which pieces start or end with
whitespace), then cost one table lookup per prompt token.

A sentence unit (issue 26) is a run of whole words that ends after sentence punctuation
(``. ! ? ;``, closing quotes or brackets allowed after it) or at a line break: a log line, a
table row, a chat turn, a sentence of prose. Kept as units, a budget holds a few whole pieces of
text instead of many crumbs cut out of their sentences. A sentence longer than its cap is cut at
a word start, so a word is never split.
"""

from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache
from itertools import pairwise

import torch
from transformers import PreTrainedTokenizerBase

# What a top-k keeps a unit at a time: single tokens (the papers), whitespace-delimited words (a
# number is never split), fixed chunks of ``chunk_size`` tokens, or sentences (issue 26).
SPANS = ("token", "word", "chunk", "sentence")
DEFAULT_CHUNK_TOKENS = 8
MAX_UNIT_TOKENS = 24  # a four-part code with its dashes and full stop is 20 SmolLM2 tokens
MAX_SENTENCE_TOKENS = 48  # a needle sentence with a four-part code is ~30 SmolLM2 tokens, a log line ~40
SENTENCE_END = frozenset(".!?;")
CLOSERS = frozenset("\"')]}\u00bb\u201d\u2019")
NEWLINE_MARKS = frozenset("\n\r\u010a\u010d")
# How byte-level BPE (GPT-2 style: Ġ space, Ċ newline, ĉ tab, č return) and SentencePiece (▁)
# vocabularies spell whitespace at the edge of a piece.
WHITESPACE_MARKS = frozenset(" \t\n\r\u0120\u010a\u0109\u010d\u2581")
BYTE_WHITESPACE = frozenset({"<0x20>", "<0x0A>", "<0x09>", "<0x0D>"})


@lru_cache(maxsize=8)
def vocabulary_edges(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts_with_space, ends_with_space)``: bool per vocabulary id. Special tokens count as
    whitespace on both sides, so a chat template's markers are units of their own. A piece that
    is only whitespace starts a unit but does not end one: it joins the word after it."""
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
    starts = torch.zeros(size, dtype=torch.bool)
    ends = torch.zeros(size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    for piece, index in tokenizer.get_vocab().items():
        if index in special or piece in BYTE_WHITESPACE:
            starts[index] = ends[index] = True
        elif piece:
            starts[index] = piece[0] in WHITESPACE_MARKS
            ends[index] = piece[-1] in WHITESPACE_MARKS and not all(c in WHITESPACE_MARKS for c in piece)
    return starts, ends


@lru_cache(maxsize=8)
def sentence_edges(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ends_sentence, starts_line)``: bool per vocabulary id. A piece ends a sentence when, its
    trailing whitespace and closing quotes or brackets aside, it ends with ``. ! ? ;``, or when it
    holds a line break; it starts a line when it begins with one. Special tokens do both."""
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=0) + 1)
    ends = torch.zeros(size, dtype=torch.bool)
    starts = torch.zeros(size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids) | {int(i) for i in getattr(tokenizer, "added_tokens_decoder", {})}
    for piece, index in tokenizer.get_vocab().items():
        if index in special or piece in ("<0x0A>", "<0x0D>"):
            ends[index] = starts[index] = True
            continue
        core = piece.rstrip("".join(WHITESPACE_MARKS)).rstrip("".join(CLOSERS))
        ends[index] = (bool(core) and core[-1] in SENTENCE_END) or any(c in NEWLINE_MARKS for c in piece)
        starts[index] = bool(piece) and piece[0] in NEWLINE_MARKS
    return ends, starts


def sentence_starts(
    tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor, cap: int = MAX_SENTENCE_TOKENS
) -> torch.Tensor:
    """``(n,)`` bool: True where a sentence unit begins (see the module doc): a word start after a
    sentence end or at a line break; a sentence over ``cap`` tokens is cut at a word start."""
    ids = input_ids.reshape(-1).cpu()
    words = word_starts(tokenizer, ids)
    ends, line_starts = sentence_edges(tokenizer)
    ids = ids.clamp(0, ends.numel() - 1)
    breaks = line_starts[ids].clone()
    breaks[1:] |= ends[ids[:-1]]
    begins = words & breaks
    if begins.numel():
        begins[0] = True
    return cap_at_words(begins, words, cap)


def unit_begins(
    span: str,
    input_ids: torch.Tensor,
    tokenizer: PreTrainedTokenizerBase | None,
    sentence_tokens: int = MAX_SENTENCE_TOKENS,
    chunk_size: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor | None:
    """``(n,)`` bool: where each unit of ``span`` begins; None for single tokens."""
    if span == "chunk":
        return chunk_starts(int(input_ids.shape[-1]), chunk_size)
    if span in ("word", "sentence"):
        if tokenizer is None:
            raise RuntimeError(f"span='{span}' needs the tokenizer to find where words start")
        if span == "sentence":
            return sentence_starts(tokenizer, input_ids, sentence_tokens)
        return word_starts(tokenizer, input_ids)
    return None


def cap_at_words(begins: torch.Tensor, words: torch.Tensor, cap: int) -> torch.Tensor:
    """Cut every unit longer than ``cap`` tokens at word starts (and a single word longer than
    ``cap``, which only a cap below a word's own cap can meet, every ``cap`` tokens)."""
    out = begins.clone()
    n = out.numel()
    starts = torch.nonzero(words | begins).view(-1).tolist()
    bounds = sorted({0, *torch.nonzero(begins).view(-1).tolist(), n})
    cuts: list[int] = []
    # Only a unit longer than ``cap`` can be cut: walk the word starts of those alone, in plain
    # lists (a Python loop indexing a tensor per word cost 160 ms at 123K tokens).
    for first, end in pairwise(bounds):
        if end - first <= cap:
            continue
        inside = starts[bisect_left(starts, first) : bisect_left(starts, end)]
        if not inside:
            continue
        unit_start, opens_unit = first, bool(begins[first])
        for word, after in zip(inside, [*inside[1:], end], strict=True):
            if not (word == first and opens_unit) and after - unit_start > cap:
                cuts.append(word)
                unit_start = word
    if cuts:
        out[torch.tensor(cuts)] = True
    return cap_unit_length(out, cap)


def word_starts(tokenizer: PreTrainedTokenizerBase, input_ids: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: True where a token begins a word unit (see the module doc)."""
    ids = input_ids.reshape(-1).cpu()
    starts_space, ends_space = vocabulary_edges(tokenizer)
    ids = ids.clamp(0, starts_space.numel() - 1)
    begins = starts_space[ids].clone()
    begins[1:] |= ends_space[ids[:-1]]
    if begins.numel():
        begins[0] = True
    return cap_unit_length(begins, MAX_UNIT_TOKENS)


def chunk_starts(n: int, chunk_size: int) -> torch.Tensor:
    """``(n,)`` bool: fixed-size units of ``chunk_size`` tokens (ChunkKV's chunks)."""
    begins = torch.zeros(n, dtype=torch.bool)
    begins[::chunk_size] = True
    return begins


def cap_unit_length(begins: torch.Tensor, limit: int) -> torch.Tensor:
    """Start a new unit every ``limit`` tokens inside a longer one."""
    unit = torch.cumsum(begins.to(torch.long), dim=0)
    first = torch.nonzero(begins).view(-1)
    offset = torch.arange(begins.numel()) - first[unit - 1]
    return begins | (offset % limit == 0)


def pick_whole_units(pooled: torch.Tensor, keep: int, tail: int, begins: torch.Tensor, head: int = 0) -> list[int]:
    """The ``keep`` kept positions, sorted, chosen a unit at a time.

    ``pooled`` ``(n,)`` are token scores (higher is better), ``begins`` ``(n,)`` marks where each
    unit starts. The units under the last ``tail`` tokens are kept first, then those under the
    first ``head`` tokens, each whole (so the question and the instruction are not cut mid-word
    either) where the budget holds them, else exactly those tokens. Then units go best first by
    their best token's score; a unit larger than what is left of the budget is passed over for a
    smaller one. Only when no whole unit fits the last free slots are the best single tokens left
    taken, so exactly ``keep`` positions come back.
    """
    n = pooled.numel()
    keep = min(keep, n)
    unit = unit_index(begins)
    count = int(unit[-1]) + 1
    units = _Units(unit, count, keep)
    tail = min(tail, keep)
    if tail:
        units.protect(range(int(unit[n - tail]), count), torch.arange(n - tail, n))
    head = min(head, units.left, n - tail)
    if head:
        units.protect(range(int(unit[head - 1]) + 1), torch.arange(head))
    unit_score = best_per_unit(pooled, unit)
    sizes = units.size.tolist()
    for index in torch.argsort(unit_score, descending=True, stable=True).tolist():
        if units.left == 0:
            break
        if units.chosen[index] or sizes[index] > units.left:
            continue
        units.chosen[index] = True
        units.left -= sizes[index]
    kept = units.kept()
    if units.left > 0:  # no whole unit fits the last slots: the best remaining tokens fill them
        rest = pooled.to(torch.float32).masked_fill(kept, float("-inf"))
        kept[torch.topk(rest, units.left).indices] = True
    return torch.nonzero(kept).view(-1).tolist()


def pick_whole_units_per_head(
    scores: torch.Tensor, keep: int, tail: int, begins: torch.Tensor, head: int = 0
) -> torch.Tensor:
    """``scores (H, n)`` -> ``(H, keep)`` kept positions, sorted per row: :func:`pick_whole_units`
    on each row (a KV head's own scores), with the same units, tail and head for every row."""
    rows = [pick_whole_units(row, keep, tail, begins, head) for row in scores.to(torch.float32).cpu()]
    return torch.tensor(rows, dtype=torch.long).view(scores.shape[0], min(keep, scores.shape[-1]))


def unit_index(begins: torch.Tensor) -> torch.Tensor:
    """``(n,)``: each token's unit number, from where units begin (the first token always does)."""
    begins = begins.clone()
    begins[0] = True
    return torch.cumsum(begins.to(torch.long), dim=0) - 1


def best_per_unit(pooled: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Each unit's score: its best token's."""
    count = int(unit[-1]) + 1
    return torch.full((count,), float("-inf")).scatter_reduce(0, unit, pooled.to(torch.float32), "amax")


class _Units:
    """The bookkeeping of :func:`pick_whole_units`: chosen units, single forced tokens, free slots."""

    def __init__(self, unit: torch.Tensor, count: int, keep: int) -> None:
        self.unit = unit
        self.size = torch.bincount(unit, minlength=count)
        self.chosen = torch.zeros(count, dtype=torch.bool)
        self.forced = torch.zeros(unit.numel(), dtype=torch.bool)
        self.left = keep

    def kept(self) -> torch.Tensor:
        return self.chosen[self.unit] | self.forced

    def protect(self, region_units: range, region_tokens: torch.Tensor) -> None:
        """Keep the units ``region_units`` whole if the free slots hold them, else exactly the
        positions ``region_tokens`` (and the units wholly inside them); at most ``left`` new ones."""
        before = int(self.kept().sum())
        whole = self.chosen.clone()
        whole[region_units.start : region_units.stop] = True
        added = int((whole[self.unit] | self.forced).sum()) - before
        if added <= self.left:
            self.chosen, self.left = whole, self.left - added
            return
        self.forced[region_tokens] = True
        inside = torch.zeros_like(self.chosen)
        inside[region_units.start : region_units.stop] = True
        outside = torch.ones_like(self.forced)
        outside[region_tokens] = False
        inside[self.unit[outside & inside[self.unit]]] = False  # units reaching out of the region
        self.chosen |= inside
        self.left -= int(self.kept().sum()) - before
