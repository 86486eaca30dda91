"""Whole-span selection (compressors/units.py): exact budget, sorted, tail kept, units never split."""

from __future__ import annotations

import random

import pytest
import torch

from compressors.gemfilter import GemFilter, pick_indices
from compressors.units import (
    MAX_SENTENCE_TOKENS,
    MAX_UNIT_TOKENS,
    cap_at_words,
    cap_unit_length,
    chunk_starts,
    pick_whole_units,
    pick_whole_units_per_head,
    sentence_starts,
    word_starts,
)


def random_units(rng: random.Random, n: int) -> torch.Tensor:
    """Unit starts with sizes 1..6, a third of them single tokens (as words are in real text)."""
    begins = torch.zeros(n, dtype=torch.bool)
    at = 0
    while at < n:
        begins[at] = True
        at += 1 if rng.random() < 0.35 else rng.randint(2, 6)
    return begins


def units_of(begins: torch.Tensor) -> list[list[int]]:
    out: list[list[int]] = []
    for i, start in enumerate(begins.tolist()):
        if start or not out:
            out.append([])
        out[-1].append(i)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_whole_units_exact_budget_sorted_tail_and_never_split(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(60, 500)
    begins = random_units(rng, n)
    scores = torch.tensor([rng.random() for _ in range(n)])
    keep = rng.randint(1, n // 2)
    tail = rng.choice([0, 8, 32])
    kept = pick_whole_units(scores, keep, tail, begins)
    assert len(kept) == keep
    assert kept == sorted(set(kept))
    assert set(range(n - min(tail, keep), n)) <= set(kept)
    kept_set = set(kept)
    units = units_of(begins)
    tail_unit = next(u for u in units if (n - min(tail, keep)) in u) if min(tail, keep) else None
    for unit in units:
        held = [i in kept_set for i in unit]
        if unit is tail_unit and n - unit[0] > keep:
            continue  # the tail's first unit did not fit whole: exactly the last `tail` tokens are kept
        assert all(held) or not any(held), (unit, held)


def test_best_units_first_and_a_high_digit_keeps_its_whole_number() -> None:
    # Units: [0] [1 2 3 4 5] [6] [7] [8 9] ; token 3 (inside the number) scores highest.
    begins = torch.tensor([1, 1, 0, 0, 0, 0, 1, 1, 1, 0], dtype=torch.bool)
    scores = torch.tensor([0.1, 0.2, 0.05, 0.9, 0.0, 0.0, 0.5, 0.4, 0.3, 0.0])
    assert pick_whole_units(scores, keep=6, tail=0, begins=begins) == [1, 2, 3, 4, 5, 6]
    # Token level would split that number: it keeps 3 and the other high tokens around it.
    assert pick_indices(scores, keep=6, kernel_size=1, tail=0) == [0, 1, 3, 6, 7, 8]


def test_tail_is_kept_from_its_first_unit_and_a_unit_that_cannot_fit_is_passed_over() -> None:
    begins = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)  # [0-2] [3] [4 5] [6-9]
    scores = torch.tensor([0.9, 0.9, 0.9, 0.1, 0.8, 0.8, 0.0, 0.0, 0.0, 0.0])
    # tail=2 lands inside [6-9]: the whole unit (4 tokens) is protected; 2 slots left: [0-2] does not fit.
    assert pick_whole_units(scores, keep=6, tail=2, begins=begins) == [4, 5, 6, 7, 8, 9]


def test_when_no_whole_unit_fits_the_best_single_tokens_fill_the_budget() -> None:
    begins = chunk_starts(12, 3)  # four units of three
    scores = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.8, 0.7, 0.1, 0.6, 0.1, 0.0, 0.0, 0.0])
    assert pick_whole_units(scores, keep=4, tail=0, begins=begins) == [3, 4, 5, 7]


def test_word_units_follow_whitespace_and_keep_a_code_with_its_dashes(engine) -> None:
    text = "The magic code for Oslo is 7391-2048-5562-0193. Then\n\nnext words here."
    ids = torch.tensor(engine.tokenizer(text)["input_ids"])
    units = [engine.tokenizer.decode(ids[u].tolist()) for u in units_of(word_starts(engine.tokenizer, ids))]
    assert " 7391-2048-5562-0193." in units
    assert units[:3] == ["The", " magic", " code"]
    assert all(len(u) <= MAX_UNIT_TOKENS * 8 for u in units)


def test_gemfilter_span_word_never_splits_a_word_on_a_real_prompt(loaded_model, engine) -> None:
    from evals.tasks import build_sample

    sample = build_sample("niah_single", "records", 900, 0.5, 11, lambda s: len(engine.encode_chat(s.chat_messages())))
    ids = torch.tensor([engine.encode_chat(sample.chat_messages())])
    selection = GemFilter(budget=200, span="word", payoff_ratio=0).select(
        loaded_model.model, ids, 1024, engine.tokenizer
    )
    kept = set(selection.kept_indices)
    assert len(kept) == 200
    assert selection.details["span"] == "word"
    begins = word_starts(engine.tokenizer, ids)
    tail_start = ids.shape[1] - 32
    for unit in units_of(begins):
        if unit[-1] >= tail_start:
            continue  # the protected tail
        held = [i in kept for i in unit]
        assert all(held) or not any(held), engine.tokenizer.decode(ids[0, unit].tolist())


def test_per_head_pick_is_each_rows_own_pick() -> None:
    rng = random.Random(3)
    begins = random_units(rng, 60)
    scores = torch.rand(3, 60, generator=torch.Generator().manual_seed(3))
    picked = pick_whole_units_per_head(scores, 17, 4, begins, head=2)
    assert picked.shape == (3, 17) and picked.dtype == torch.long
    for row, kept in zip(scores, picked.tolist(), strict=True):
        assert kept == pick_whole_units(row, 17, 4, begins, head=2)
    assert len({tuple(k) for k in picked.tolist()}) > 1  # each head keeps its own units


def test_span_word_without_a_tokenizer_is_an_internal_error(loaded_model) -> None:
    with pytest.raises(RuntimeError, match="needs the tokenizer"):
        GemFilter(budget=8, span="word", payoff_ratio=0).select(loaded_model.model, torch.arange(40).view(1, -1), 8)


def test_bad_span_knobs_are_400s(engine) -> None:
    from server.engine.types import CompressionSpec, GenerationRequest, RequestError

    for knobs, param in (({"span": "paragraph"}, "compression.span"), ({"chunk_size": 0}, "compression.chunk_size")):
        request = GenerationRequest(prompt_ids=[1, 2, 3], compression=CompressionSpec(method="gemfilter", knobs=knobs))
        with pytest.raises(RequestError) as caught:
            engine.check_request(request)
        assert caught.value.param == param


# ---- sentence units and the protected head (issue 26) ---------------------------------------------
SENTENCES_TEXT = (
    "The magic code for Oslo is 7391-2048-5562-0193. Is it? Yes!\n"
    "2024-03-07 14:02:11 INFO api-3 GET /v1/orders/48213 200 31ms\n"
    "| 48213 | Graz | shipped | 17.40 |\n"
    'He said "stop." Then pi is 3.14 and e is 2.71; both are numbers.'
)


def test_sentence_units_follow_punctuation_and_lines(engine) -> None:
    ids = torch.tensor(engine.tokenizer(SENTENCES_TEXT)["input_ids"])
    units = [engine.tokenizer.decode(ids[u].tolist()) for u in units_of(sentence_starts(engine.tokenizer, ids))]
    assert units[0] == "The magic code for Oslo is 7391-2048-5562-0193."
    assert units[1:3] == [" Is it?", " Yes!"]
    assert any(u.strip() == "2024-03-07 14:02:11 INFO api-3 GET /v1/orders/48213 200 31ms" for u in units)
    assert any(u.strip() == "| 48213 | Graz | shipped | 17.40 |" for u in units)
    assert '\nHe said "stop."' in units  # a closing quote after the full stop ends the sentence too
    assert " Then pi is 3.14 and e is 2.71;" in units  # a decimal point ends nothing


@pytest.mark.parametrize("cap", [MAX_UNIT_TOKENS, 32, MAX_SENTENCE_TOKENS])
def test_sentence_units_tile_the_prompt_never_split_a_word_and_respect_the_cap(engine, cap: int) -> None:
    from evals.tasks import build_sample

    for haystack in ("prose", "records", "noise"):
        sample = build_sample(
            "niah_single", haystack, 700, 0.5, 5, lambda s: len(engine.encode_prompt(s.completion_prompt()))
        )
        ids = torch.tensor(engine.encode_prompt(sample.completion_prompt()))
        begins = sentence_starts(engine.tokenizer, ids, cap)
        units = units_of(begins)
        assert [i for u in units for i in u] == list(range(ids.numel()))  # they tile the prompt
        assert max(len(u) for u in units) <= cap
        words = word_starts(engine.tokenizer, ids)
        assert not bool((begins & ~words).any())  # a unit only begins where a word does
        assert len(units) < words.sum() / 3  # whole sentences, not words


def test_head_is_kept_whole_with_the_tail_and_exactly_the_budget() -> None:
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(80, 400)
        begins = random_units(rng, n)
        scores = torch.tensor([rng.random() for _ in range(n)])
        keep, head, tail = rng.randint(20, n // 2), rng.choice([1, 8, 16]), rng.choice([0, 8])
        kept = pick_whole_units(scores, keep, tail, begins, head=head)
        assert len(kept) == keep and kept == sorted(set(kept))
        assert set(range(head)) | set(range(n - tail, n)) <= set(kept)
        head_units = [u for u in units_of(begins) if u[0] < head]
        assert all(set(u) <= set(kept) for u in head_units)  # the budget held them: whole
    # A head that reaches into a unit the budget cannot hold: exactly the head's tokens.
    begins = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.bool)  # [0-5] [6] [7] [8] [9]
    scores = torch.tensor([0.0] * 6 + [0.9, 0.8, 0.1, 0.0])
    assert pick_whole_units(scores, keep=4, tail=1, begins=begins, head=2) == [0, 1, 6, 9]


def test_token_span_keeps_the_head_too() -> None:
    scores = torch.tensor([0.0, 0.0, 0.9, 0.1, 0.8, 0.0, 0.0, 0.0])
    assert pick_indices(scores, keep=4, kernel_size=1, tail=1, head=1) == [0, 2, 4, 7]


def greedy_cut_over_every_word(begins: torch.Tensor, words: torch.Tensor, cap: int) -> torch.Tensor:
    """The cut as first written: one pass over every word start of the prompt."""
    out = begins.clone()
    starts = torch.nonzero(words | begins).view(-1).tolist()
    unit_start = 0
    for word, after in zip(starts, [*starts[1:], out.numel()], strict=True):
        if out[word]:
            unit_start = word
        elif after - unit_start > cap:
            out[word] = True
            unit_start = word
    return cap_unit_length(out, cap)


def test_cutting_only_the_long_units_equals_the_pass_over_every_word() -> None:
    generator = torch.Generator().manual_seed(0)
    for trial in range(600):
        n = 1 + trial % 200
        words = torch.rand(n, generator=generator) < (0.05, 0.3, 0.8)[trial % 3]
        begins = torch.rand(n, generator=generator) < (0.0, 0.01, 0.05, 0.2)[trial % 4]
        begins[0] = True
        cap = (1, 2, 5, 16, 48)[trial % 5]
        assert torch.equal(cap_at_words(begins, words, cap), greedy_cut_over_every_word(begins, words, cap))
