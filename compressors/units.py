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
"""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import PreTrainedTokenizerBase

MAX_UNIT_TOKENS = 24  # a four-part code with its dashes and full stop is 20 SmolLM2 tokens
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


def pick_whole_units(pooled: torch.Tensor, keep: int, tail: int, begins: torch.Tensor) -> list[int]:
    """The ``keep`` kept positions, sorted, chosen a unit at a time.

    ``pooled`` ``(n,)`` are token scores (higher is better), ``begins`` ``(n,)`` marks where each
    unit starts. The units under the last ``tail`` tokens are kept first (whole, so the
    question is not cut mid-word either). Then units go best first by their best token's
    score; a unit larger than what is left of the budget is passed over for a smaller one.
    Only when no whole unit fits the last free slots are the best single tokens left taken,
    so exactly ``keep`` positions come back.
    """
    n = pooled.numel()
    keep = min(keep, n)
    begins = begins.clone()
    begins[0] = True
    unit = torch.cumsum(begins.to(torch.long), dim=0) - 1
    count = int(unit[-1]) + 1
    size = torch.bincount(unit, minlength=count)
    first = torch.nonzero(begins).view(-1)
    unit_score = torch.full((count,), float("-inf")).scatter_reduce(0, unit, pooled.to(torch.float32), "amax")
    chosen = torch.zeros(count, dtype=torch.bool)
    left = keep
    protected = min(tail, keep)
    forced_tokens = torch.zeros(n, dtype=torch.bool)
    if protected:
        tail_unit = int(unit[n - protected])
        if n - int(first[tail_unit]) <= keep:
            chosen[tail_unit:] = True
            left -= n - int(first[tail_unit])
        else:  # the tail's first unit does not fit whole: protect exactly the last tokens
            forced_tokens[n - protected :] = True
            left -= protected
            chosen[tail_unit + 1 :] = True  # units wholly inside the tail, already counted
    sizes = size.tolist()
    for index in torch.argsort(unit_score, descending=True, stable=True).tolist():
        if left == 0:
            break
        if chosen[index] or sizes[index] > left:
            continue
        chosen[index] = True
        left -= sizes[index]
    kept = chosen[unit] | forced_tokens
    if left > 0:  # no whole unit fits the last slots: the best remaining tokens fill them
        rest = pooled.to(torch.float32).masked_fill(kept, float("-inf"))
        kept[torch.topk(rest, left).indices] = True
    return torch.nonzero(kept).view(-1).tolist()
